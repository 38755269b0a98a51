package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/robfig/cron/v3"

	"github.com/stasis-project/stasis/agent/mysql"
	"github.com/stasis-project/stasis/agent/retention"
	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/config"
)

// Service is the long-running agent: schedules, retention, live tracking, the control
// socket and systemd notifications.
type Service struct {
	log     *slog.Logger
	opts    Options
	repo    *chain.Repository
	load    func() (*config.Config, error)
	started time.Time

	mu      sync.Mutex
	cfg     *config.Config
	vols    map[string]*serviceVolume
	cron    *cron.Cron
	state   *stateFile
	metrics *metrics
	ctx     context.Context
	running sync.WaitGroup
}

// serviceVolume is one configured volume and its runtime state.
type serviceVolume struct {
	spec   config.Volume
	vol    *Volume
	busy   sync.Mutex // one snapshot per volume at a time
	status VolumeStatus
	smu    sync.Mutex
}

// VolumeStatus is what `stasis status` shows for a volume.
type VolumeStatus struct {
	Volume       string    `json:"volume"`
	Source       string    `json:"source"`
	Running      bool      `json:"running"`
	LastSnapshot string    `json:"last_snapshot,omitempty"`
	LastResult   string    `json:"last_result,omitempty"` // "ok" or the error
	LastAt       time.Time `json:"last_at,omitempty"`
	LastFailure  string    `json:"last_failure,omitempty"`
	LastFailedAt time.Time `json:"last_failed_at,omitempty"`
	LastFreezeMS float64   `json:"last_freeze_ms"`
	NextRun      time.Time `json:"next_run,omitempty"`
	Tracking     string    `json:"tracking"`
	Snapshots    int       `json:"snapshots"`
	StoredBytes  int64     `json:"stored_bytes"`
}

// NewService opens (creating if needed) the configured repository. load re-reads the
// configuration for SIGHUP.
func NewService(ctx context.Context, cfg *config.Config, load func() (*config.Config, error), openRepo func(string) (*chain.Repository, error), opts Options) (*Service, error) {
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	opts.KeepTracking = true
	r, err := openRepo(cfg.Repository)
	if err != nil {
		return nil, err
	}
	st, err := openState(filepath.Join(cfg.StateDir, "state.json"))
	if err != nil {
		return nil, err
	}
	s := &Service{log: opts.Log, opts: opts, repo: r, load: load, cfg: cfg, vols: map[string]*serviceVolume{}, state: st,
		started: time.Now(), ctx: ctx, metrics: newMetrics()}
	return s, nil
}

// Run schedules every volume, runs catch-up snapshots, tells systemd it is ready and serves
// until ctx ends; then it stops scheduling, waits for (or aborts) running snapshots and
// returns. reload receives a value on SIGHUP.
func (s *Service) Run(ctx context.Context, reload <-chan struct{}) error {
	s.ctx = ctx
	s.apply(s.cfg)
	daemon.SdNotify(false, daemon.SdNotifyReady)
	s.notifyStatus()
	s.catchUp()
	var watchdog <-chan time.Time
	if d, err := daemon.SdWatchdogEnabled(false); err == nil && d > 0 {
		t := time.NewTicker(d / 2)
		defer t.Stop()
		watchdog = t.C
	}
	statusTick := time.NewTicker(30 * time.Second)
	defer statusTick.Stop()
	for {
		select {
		case <-ctx.Done():
			daemon.SdNotify(false, daemon.SdNotifyStopping)
			s.log.Info("stopping: waiting for running snapshots to finish or abort")
			s.mu.Lock()
			stopped := s.cron.Stop()
			s.mu.Unlock()
			<-stopped.Done()
			s.running.Wait()
			s.mu.Lock()
			for _, v := range s.vols {
				v.vol.Close()
			}
			s.mu.Unlock()
			return nil
		case <-reload:
			cfg, err := s.load()
			if err != nil {
				s.log.Error("configuration reload refused; keeping the running configuration", "err", err)
				continue
			}
			s.log.Info("configuration reloaded", "volumes", len(cfg.Volumes))
			s.apply(cfg)
			s.notifyStatus()
		case <-watchdog:
			daemon.SdNotify(false, daemon.SdNotifyWatchdog)
		case <-statusTick.C:
			s.notifyStatus()
		}
	}
}

// apply (re)builds the schedules. Volumes whose spec is unchanged keep their trackers.
func (s *Service) apply(cfg *config.Config) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cron != nil {
		<-s.cron.Stop().Done()
	}
	next := map[string]*serviceVolume{}
	for _, spec := range cfg.Volumes {
		old, ok := s.vols[spec.Name]
		if ok && sameSpec(old.spec, spec) {
			old.spec = spec
			next[spec.Name] = old
			continue
		}
		if ok {
			old.vol.Close()
		}
		next[spec.Name] = &serviceVolume{spec: spec, vol: NewVolume(SpecFromConfig(spec), s.opts),
			status: VolumeStatus{Volume: spec.Name, Source: spec.Source}}
	}
	for name, old := range s.vols {
		if _, ok := next[name]; !ok {
			old.vol.Close()
		}
	}
	s.cfg, s.vols = cfg, next
	s.cron = cron.New()
	for _, v := range next {
		for _, sched := range v.spec.Parsed {
			v := v
			s.cron.Schedule(sched, cron.FuncJob(func() { s.scheduled(v) }))
		}
	}
	s.cron.Start()
}

func sameSpec(a, b config.Volume) bool {
	return reflect.DeepEqual(SpecFromConfig(a), SpecFromConfig(b))
}

// SpecFromConfig turns a configured volume into what a Volume needs.
func SpecFromConfig(v config.Volume) VolumeSpec {
	spec := VolumeSpec{Name: v.Name, Source: v.Source, MaxFreeze: time.Duration(v.MaxFreeze), NoFreeze: v.NoFreeze, ChunkSize: v.ChunkSize}
	if v.MySQL == nil && v.Hooks == nil {
		return spec
	}
	app := &AppSpec{}
	if h := v.Hooks; h != nil {
		app.PreHooks, app.PostHooks, app.HookTimeout = h.Pre, h.Post, time.Duration(h.Timeout)
	}
	if m := v.MySQL; m != nil {
		app.DSNFile = m.DSNFile
		app.CrashConsistentOnFailure = m.OnFailure == "crash-consistent"
		app.MySQL = &mysql.Config{Mode: m.Mode, LockTimeout: time.Duration(m.LockTimeout),
			LongQueryThreshold: time.Duration(m.LongQueryThreshold), KillLongQueries: m.KillLongQueries,
			MaxHold: time.Duration(v.MaxFreeze) + time.Duration(m.LockTimeout) + 30*time.Second}
	}
	spec.App = app
	return spec
}

// scheduled runs from cron: a schedule firing during a running snapshot is skipped.
func (s *Service) scheduled(v *serviceVolume) {
	if !v.busy.TryLock() {
		s.log.Warn("schedule fired while a snapshot of this volume is running: skipped", "volume", v.spec.Name)
		return
	}
	s.running.Add(1)
	defer s.running.Done()
	defer v.busy.Unlock()
	s.state.setLastRun(v.spec.Name, time.Now())
	s.snapshot(v, "", chain.KindAuto)
}

// catchUp takes one snapshot for each volume whose schedule should have fired while the
// agent was not running (like systemd's Persistent=true).
func (s *Service) catchUp() {
	if !*s.cfg.CatchUp {
		return
	}
	s.mu.Lock()
	vols := s.vols
	s.mu.Unlock()
	now := time.Now()
	for _, v := range vols {
		last, ok := s.state.lastRun(v.spec.Name)
		if !ok {
			s.state.setLastRun(v.spec.Name, now) // first start: nothing was missed
			continue
		}
		missed := false
		for _, sched := range v.spec.Parsed {
			if sched.Next(last).Before(now) {
				missed = true
			}
		}
		if missed {
			s.log.Info("a scheduled snapshot was missed while the agent was down: catching up", "volume", v.spec.Name, "last_run", last)
			go s.scheduled(v)
		}
	}
}

// Snapshot takes a manual (or named auto) snapshot now, waiting for a running one; said is
// told when it has to wait.
func (s *Service) Snapshot(volume, name string, said func(string)) (*Outcome, error) {
	s.mu.Lock()
	v, ok := s.vols[volume]
	s.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("no volume %q in %s", volume, s.cfg.Path)
	}
	if !v.busy.TryLock() {
		if said != nil {
			said(fmt.Sprintf("a snapshot of %s is running; waiting for it to finish", volume))
		}
		v.busy.Lock()
	}
	s.running.Add(1)
	defer s.running.Done()
	defer v.busy.Unlock()
	return s.snapshot(v, name, chain.KindManual)
}

// snapshot takes one snapshot with the volume's busy lock held, then applies retention.
func (s *Service) snapshot(v *serviceVolume, name, kind string) (*Outcome, error) {
	ctx := s.ctx
	v.smu.Lock()
	v.status.Running = true
	v.smu.Unlock()
	defer func() {
		v.smu.Lock()
		v.status.Running = false
		v.smu.Unlock()
		s.notifyStatus()
	}()
	holder := fmt.Sprintf("pid %d (stasis agent: snapshot of %s) since %s", os.Getpid(), v.spec.Name, time.Now().UTC().Format(time.RFC3339))
	unlock, err := s.lock(ctx, holder)
	if err != nil {
		s.recordFailure(v, err)
		return nil, err
	}
	defer unlock()
	if kind == chain.KindAuto && name == "" {
		if name, err = s.autoName(ctx, v.spec.Name, time.Now()); err != nil {
			s.recordFailure(v, err)
			return nil, err
		}
	}
	out, err := v.vol.Snapshot(ctx, s.repo, Request{Name: name, Kind: kind})
	s.metrics.observe(v.spec.Name, out, err)
	if err != nil {
		s.recordFailure(v, err)
		return nil, err
	}
	s.log.Info("snapshot taken", "volume", v.spec.Name, "snapshot", out.Snapshot.Name, "consistency", out.Snapshot.Consistency,
		"tracking", out.Capture.Tracking, "read_bytes", out.Capture.BytesRead, "new_bytes", out.Snapshot.NewBytes,
		"freeze_ms", Millis(out.Capture.Freeze), "duration", out.Duration.Round(time.Millisecond))
	v.smu.Lock()
	v.status.LastSnapshot, v.status.LastResult, v.status.LastAt = out.Snapshot.Name, "ok", time.Now()
	v.status.LastFreezeMS = Millis(out.Capture.Freeze)
	v.smu.Unlock()
	s.state.setResult(v.spec.Name, "ok", "")
	if _, err := s.prune(ctx, v.spec, false); err != nil {
		s.log.Error("retention failed", "volume", v.spec.Name, "err", err)
	}
	s.metrics.packBytes.Set(float64(s.repo.PackBytes()))
	return out, nil
}

func (s *Service) lock(ctx context.Context, holder string) (func(), error) {
	// Another writer (a CLI gc, another volume's snapshot) may hold the lock briefly.
	deadline := time.Now().Add(10 * time.Minute)
	for {
		unlock, err := s.repo.Lock(ctx, holder)
		if err == nil || !errors.Is(err, chain.ErrLocked) || time.Now().After(deadline) {
			return unlock, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (s *Service) recordFailure(v *serviceVolume, err error) {
	s.log.Error("snapshot failed", "volume", v.spec.Name, "err", err)
	v.smu.Lock()
	v.status.LastResult, v.status.LastAt = err.Error(), time.Now()
	v.status.LastFailure, v.status.LastFailedAt = err.Error(), time.Now()
	v.smu.Unlock()
	s.state.setResult(v.spec.Name, "failed", err.Error())
}

// autoName returns auto_YYYYMMDD_N, N counting the volume's auto snapshots of that day.
func (s *Service) autoName(ctx context.Context, volume string, now time.Time) (string, error) {
	snaps, _, err := s.repo.Snapshots(ctx)
	if err != nil {
		return "", err
	}
	prefix := "auto_" + now.Format("20060102") + "_"
	n := 0
	for _, sn := range snaps {
		if sn.Volume == volume && strings.HasPrefix(sn.Name, prefix) {
			if k, err := strconv.Atoi(strings.TrimPrefix(sn.Name, prefix)); err == nil && k > n {
				n = k
			}
		}
	}
	return fmt.Sprintf("%s%d", prefix, n+1), nil
}

// Prune applies a volume's retention (all volumes if volume is ""), or only reports with
// dryRun. The caller must not hold the repository lock.
func (s *Service) Prune(volume string, dryRun bool) ([]PruneDecision, error) {
	s.mu.Lock()
	cfg := s.cfg
	s.mu.Unlock()
	var out []PruneDecision
	for _, v := range cfg.Volumes {
		if volume != "" && v.Name != volume {
			continue
		}
		var unlock func()
		if !dryRun {
			var err error
			if unlock, err = s.lock(s.ctx, fmt.Sprintf("pid %d (stasis agent: prune %s)", os.Getpid(), v.Name)); err != nil {
				return nil, err
			}
		}
		d, err := s.prune(s.ctx, v, dryRun)
		if unlock != nil {
			unlock()
		}
		if err != nil {
			return nil, err
		}
		out = append(out, d...)
	}
	return out, nil
}

// PruneDecision is one snapshot's fate under retention.
type PruneDecision struct {
	Volume  string    `json:"volume"`
	Name    string    `json:"name"`
	ID      string    `json:"id"`
	Created time.Time `json:"created"`
	Keep    bool      `json:"keep"`
	Reason  string    `json:"reason"`
}

// prune applies retention to one volume; the lock is held unless dryRun.
func (s *Service) prune(ctx context.Context, v config.Volume, dryRun bool) ([]PruneDecision, error) {
	snaps, _, err := s.repo.Snapshots(ctx)
	if err != nil {
		return nil, err
	}
	decisions, victims := Plan(snaps, v, time.Now())
	if dryRun || len(victims) == 0 {
		return decisions, nil
	}
	if err := s.repo.Delete(ctx, victims...); err != nil {
		return decisions, err
	}
	for _, d := range victims {
		s.log.Info("retention deleted a snapshot", "volume", v.Name, "snapshot", d.Name)
	}
	if *s.cfg.GCAfterPrune {
		st, err := s.repo.GC(ctx)
		if err != nil {
			return decisions, fmt.Errorf("gc after retention: %w", err)
		}
		s.log.Info("gc", "freed_bytes", st.BytesFreed, "packs_deleted", st.PacksDeleted)
	}
	return decisions, nil
}

// Plan applies a volume's retention policy to the repository's snapshots, in the local
// time zone, returning every decision and the snapshots to delete.
func Plan(snaps []*chain.Snapshot, v config.Volume, now time.Time) ([]PruneDecision, []*chain.Snapshot) {
	byID := map[string]*chain.Snapshot{}
	var in []retention.Snapshot
	for _, sn := range snaps {
		if sn.Volume != v.Name {
			continue
		}
		byID[sn.ID] = sn
		in = append(in, retention.Snapshot{ID: sn.ID, Name: sn.Name, Created: sn.Created, Auto: sn.Kind == chain.KindAuto})
	}
	r := v.Retention
	ds := retention.Apply(in, retention.Policy{KeepAuto: *r.KeepAuto, KeepDays: *r.KeepDays, KeepDaily: *r.KeepDaily,
		KeepWeekly: *r.KeepWeekly, KeepMonthly: *r.KeepMonthly}, now, time.Local)
	var out []PruneDecision
	var victims []*chain.Snapshot
	for _, d := range ds {
		out = append(out, PruneDecision{Volume: v.Name, Name: d.Snapshot.Name, ID: d.Snapshot.ID, Created: d.Snapshot.Created, Keep: d.Keep, Reason: d.Reason})
		if !d.Keep {
			victims = append(victims, byID[d.Snapshot.ID])
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Created.Before(out[j].Created) })
	return out, victims
}

// Status reports every volume, with its snapshot count read from the repository.
func (s *Service) Status() []VolumeStatus { return s.status(true) }

// status reports every volume; without counts it does no I/O, for the periodic STATUS=.
func (s *Service) status(counts bool) []VolumeStatus {
	s.mu.Lock()
	vols := s.vols
	c := s.cron
	s.mu.Unlock()
	var snaps []*chain.Snapshot
	if counts {
		snaps, _, _ = s.repo.Snapshots(s.ctx)
	}
	entries := c.Entries()
	var out []VolumeStatus
	for name, v := range vols {
		v.smu.Lock()
		st := v.status
		v.smu.Unlock()
		if ok, why := v.vol.Tracking(); ok {
			st.Tracking = "tracked: the next snapshot reads only what changed"
		} else {
			st.Tracking = "full scan next: " + why
		}
		for _, sn := range snaps {
			if sn.Volume == name {
				st.Snapshots++
			}
		}
		for _, e := range entries {
			for _, sched := range v.spec.Parsed {
				if e.Schedule == sched && (st.NextRun.IsZero() || e.Next.Before(st.NextRun)) {
					st.NextRun = e.Next
				}
			}
		}
		if f, ok := s.state.failure(name); ok && st.LastFailure == "" {
			st.LastFailure = f
		}
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Volume < out[j].Volume })
	return out
}

func (s *Service) notifyStatus() {
	var parts []string
	for _, st := range s.status(false) {
		p := st.Volume + ": "
		switch {
		case st.Running:
			p += "snapshot running"
		case st.LastResult == "":
			p += "no snapshot yet"
		case st.LastResult == "ok":
			p += "last " + st.LastSnapshot
		default:
			p += "last FAILED"
		}
		parts = append(parts, p)
	}
	daemon.SdNotify(false, "STATUS="+strings.Join(parts, "; "))
}

// stateFile keeps what must survive restarts: when each volume's schedule last ran (for
// catch-up) and its last result.
type stateFile struct {
	path string
	mu   sync.Mutex
	data struct {
		Volumes map[string]*volumeState `json:"volumes"`
	}
}

type volumeState struct {
	LastRun     time.Time `json:"last_run"`
	LastResult  string    `json:"last_result,omitempty"`
	LastFailure string    `json:"last_failure,omitempty"`
}

func openState(path string) (*stateFile, error) {
	st := &stateFile{path: path}
	st.data.Volumes = map[string]*volumeState{}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return st, os.MkdirAll(filepath.Dir(path), 0o700)
	}
	if err != nil {
		return nil, fmt.Errorf("agent state: %w", err)
	}
	if err := json.Unmarshal(b, &st.data); err != nil || st.data.Volumes == nil {
		// A damaged state file costs one catch-up decision, not the agent.
		st.data.Volumes = map[string]*volumeState{}
	}
	return st, nil
}

func (st *stateFile) get(v string) *volumeState {
	if st.data.Volumes[v] == nil {
		st.data.Volumes[v] = &volumeState{}
	}
	return st.data.Volumes[v]
}

func (st *stateFile) lastRun(v string) (time.Time, bool) {
	st.mu.Lock()
	defer st.mu.Unlock()
	s, ok := st.data.Volumes[v]
	if !ok || s.LastRun.IsZero() {
		return time.Time{}, false
	}
	return s.LastRun, true
}

func (st *stateFile) failure(v string) (string, bool) {
	st.mu.Lock()
	defer st.mu.Unlock()
	s, ok := st.data.Volumes[v]
	if !ok || s.LastFailure == "" {
		return "", false
	}
	return s.LastFailure, true
}

func (st *stateFile) setLastRun(v string, t time.Time) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.get(v).LastRun = t.UTC()
	st.save()
}

func (st *stateFile) setResult(v, result, failure string) {
	st.mu.Lock()
	defer st.mu.Unlock()
	s := st.get(v)
	s.LastResult = result
	if failure != "" {
		s.LastFailure = failure
	}
	st.save()
}

// save writes atomically; called with mu held.
func (st *stateFile) save() {
	b, _ := json.MarshalIndent(st.data, "", "  ")
	tmp := st.path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err == nil {
		os.Rename(tmp, st.path)
	}
}

// Repository is the repository the service writes, for the FUSE view.
func (s *Service) Repository() *chain.Repository { return s.repo }

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
	"runtime/debug"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
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

	mu       sync.Mutex
	cfg      *config.Config
	vols     map[string]*serviceVolume
	groups   map[string]*serviceGroup
	cron     *cron.Cron
	state    *stateFile
	metrics  *metrics
	ctx      context.Context
	running  sync.WaitGroup
	replicas []*replicator // one per replica repository
	retainMu sync.Mutex    // the agent's own retention runs take turns
}

// serviceVolume is one configured volume and its runtime state.
type serviceVolume struct {
	spec   config.Volume
	vol    *Volume
	busy   sync.Mutex  // one snapshot per volume at a time
	manual atomic.Bool // the snapshot holding busy is a manual one
	status VolumeStatus
	smu    sync.Mutex
}

// serviceGroup is one configured consistency group.
type serviceGroup struct {
	spec    config.Group
	members []*serviceVolume // in name order
	status  VolumeStatus
	smu     sync.Mutex
}

// job is what one snapshot takes: a volume alone, or a group and its members.
type job struct {
	name   string
	vols   []*serviceVolume // in name order
	group  *serviceGroup    // nil for a volume alone
	status *VolumeStatus
	smu    *sync.Mutex
}

func (s *Service) volumeJob(v *serviceVolume) *job {
	return &job{name: v.spec.Name, vols: []*serviceVolume{v}, status: &v.status, smu: &v.smu}
}

func (s *Service) groupJob(g *serviceGroup) *job {
	return &job{name: g.spec.Name, vols: g.members, group: g, status: &g.status, smu: &g.smu}
}

// tryLock takes every member's busy lock, or none.
func (j *job) tryLock() bool {
	for i, v := range j.vols {
		if !v.busy.TryLock() {
			for _, u := range j.vols[:i] {
				u.busy.Unlock()
			}
			return false
		}
	}
	return true
}

func (j *job) lock() {
	for _, v := range j.vols {
		v.busy.Lock()
	}
}

func (j *job) unlock() {
	for _, v := range j.vols {
		v.busy.Unlock()
	}
}

// VolumeStatus is what `stasis status` shows for a volume or a group.
type VolumeStatus struct {
	Volume       string    `json:"volume"`
	Members      []string  `json:"members,omitempty"` // a group's volumes
	Source       string    `json:"source,omitempty"`
	Running      bool      `json:"running"`
	LastSnapshot string    `json:"last_snapshot,omitempty"`
	LastResult   string    `json:"last_result,omitempty"` // "ok" or the error
	LastAt       time.Time `json:"-"`
	LastFailure  string    `json:"last_failure,omitempty"`
	LastFailedAt time.Time `json:"-"`
	LastFreezeMS float64   `json:"last_freeze_ms"`
	NextRun      time.Time `json:"-"`
	// RetryAt is when a failed or skipped scheduled snapshot is tried again.
	RetryAt   time.Time `json:"-"`
	Tracking  string    `json:"tracking"`
	Snapshots int       `json:"snapshots"`
	// AddedBytes is what the volume's snapshots still in the repository added when they were
	// taken (stats has the exact stored and exclusive bytes, at the cost of a tree walk).
	AddedBytes int64 `json:"added_bytes"`
}

// MarshalJSON writes times as every report does (RFC 3339, UTC, milliseconds) and leaves
// out the ones that never happened.
func (v VolumeStatus) MarshalJSON() ([]byte, error) {
	type plain VolumeStatus
	out := struct {
		plain
		LastAt       string `json:"last_at,omitempty"`
		LastFailedAt string `json:"last_failed_at,omitempty"`
		NextRun      string `json:"next_run,omitempty"`
		RetryAt      string `json:"retry_at,omitempty"`
	}{plain: plain(v)}
	for _, t := range []struct {
		dst *string
		t   time.Time
	}{{&out.LastAt, v.LastAt}, {&out.LastFailedAt, v.LastFailedAt}, {&out.NextRun, v.NextRun}, {&out.RetryAt, v.RetryAt}} {
		if !t.t.IsZero() {
			*t.dst = stampTime(t.t)
		}
	}
	return json.Marshal(out)
}

// UnmarshalJSON reads what MarshalJSON wrote (the CLI reads the agent's status).
func (v *VolumeStatus) UnmarshalJSON(b []byte) error {
	type plain VolumeStatus
	var in struct {
		plain
		LastAt       string `json:"last_at"`
		LastFailedAt string `json:"last_failed_at"`
		NextRun      string `json:"next_run"`
		RetryAt      string `json:"retry_at"`
	}
	if err := json.Unmarshal(b, &in); err != nil {
		return err
	}
	*v = VolumeStatus(in.plain)
	for _, t := range []struct {
		dst *time.Time
		s   string
	}{{&v.LastAt, in.LastAt}, {&v.LastFailedAt, in.LastFailedAt}, {&v.NextRun, in.NextRun}, {&v.RetryAt, in.RetryAt}} {
		if t.s != "" {
			*t.dst, _ = time.Parse(time.RFC3339Nano, t.s)
		}
	}
	return nil
}

// NewService opens (creating if needed) the configured repository. load re-reads the
// configuration for SIGHUP.
func NewService(ctx context.Context, cfg *config.Config, load func() (*config.Config, error), open Opener, opts Options) (*Service, error) {
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	opts.KeepTracking = true
	r, err := open(ctx, cfg.Repository, cfg.PasswordFile)
	if err != nil {
		return nil, err
	}
	st, err := openState(filepath.Join(cfg.StateDir, "state.json"))
	if err != nil {
		return nil, err
	}
	s := &Service{log: opts.Log, opts: opts, repo: r, load: load, cfg: cfg, vols: map[string]*serviceVolume{}, state: st,
		started: time.Now(), ctx: ctx, metrics: newMetrics()}
	s.replicas = newReplicators(s, cfg, open)
	return s, nil
}

// Run schedules every volume, runs catch-up snapshots, tells systemd it is ready and serves
// until ctx ends; then it stops scheduling, waits for (or aborts) running snapshots and
// returns. reload receives a value on SIGHUP.
func (s *Service) Run(ctx context.Context, reload <-chan struct{}) error {
	s.ctx = ctx
	s.apply(s.cfg)
	for _, p := range s.replicas {
		s.running.Add(1)
		go func() {
			defer s.running.Done()
			p.run(ctx)
		}()
		p.wake() // catch up with what an earlier run left
	}
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
			if !slices.Equal(replicaLocations(cfg), replicaLocations(s.cfg)) || cfg.Repository != s.cfg.Repository {
				s.log.Warn("the repository and the replicas' repositories change at the next restart of the agent (replica retention changes now)")
			}
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
	groups := map[string]*serviceGroup{}
	for _, spec := range cfg.Groups {
		g := &serviceGroup{spec: spec, status: VolumeStatus{Volume: spec.Name}}
		if old, ok := s.groups[spec.Name]; ok {
			g.status = old.status
		}
		members := append([]string(nil), spec.Volumes...)
		sort.Strings(members)
		for _, m := range members {
			g.members = append(g.members, next[m])
		}
		g.status.Members = members
		groups[spec.Name] = g
	}
	s.cfg, s.vols, s.groups = cfg, next, groups
	s.cron = cron.New()
	for _, v := range next {
		for _, sched := range v.spec.Parsed {
			j := s.volumeJob(v)
			s.cron.Schedule(sched, cron.FuncJob(func() { s.scheduled(j) }))
		}
	}
	for _, g := range groups {
		for _, sched := range g.spec.Parsed {
			j := s.groupJob(g)
			s.cron.Schedule(sched, cron.FuncJob(func() { s.scheduled(j) }))
		}
	}
	s.cron.Start()
}

func sameSpec(a, b config.Volume) bool {
	return reflect.DeepEqual(SpecFromConfig(a), SpecFromConfig(b))
}

// replicaLocations lists where a configuration replicates, one entry per replica
// and password file.
func replicaLocations(cfg *config.Config) []string {
	var out []string
	for _, r := range cfg.Replicas() {
		out = append(out, r.Repository+" "+r.PasswordFile)
	}
	return out
}

// SpecFromConfig turns a configured volume into what a Volume needs.
func SpecFromConfig(v config.Volume) VolumeSpec {
	return VolumeSpec{Name: v.Name, Source: v.Source, MaxFreeze: time.Duration(v.MaxFreeze), NoFreeze: v.NoFreeze,
		ChunkSize: v.ChunkSize, App: appSpec(v.MySQL, v.Hooks, time.Duration(v.MaxFreeze)), MaxReadRate: v.MaxReadRateBytes}
}

// appSpec turns configured database and hooks into quiescing, or nil for none.
func appSpec(m *config.MySQL, h *config.Hooks, maxFreeze time.Duration) *AppSpec {
	if m == nil && h == nil {
		return nil
	}
	app := &AppSpec{}
	if h != nil {
		app.PreHooks, app.PostHooks, app.HookTimeout = h.Pre, h.Post, time.Duration(h.Timeout)
	}
	if m != nil {
		app.DSNFile = m.DSNFile
		app.CrashConsistentOnFailure = m.OnFailure == "crash-consistent"
		app.MySQL = &mysql.Config{Mode: m.Mode, LockTimeout: time.Duration(m.LockTimeout),
			LongQueryThreshold: time.Duration(m.LongQueryThreshold), KillLongQueries: m.KillLongQueries,
			MaxHold: maxFreeze + time.Duration(m.LockTimeout) + 30*time.Second}
	}
	return app
}

// scheduled runs from cron: a schedule firing during a running scheduled snapshot of the
// volume (or of any member of the group) is skipped; one that finds a manual snapshot
// running, or fails, is retried (see retry).
func (s *Service) scheduled(j *job) { s.attempt(j, 1) }

// attempt is try n of a scheduled snapshot.
func (s *Service) attempt(j *job, n int) {
	if !j.tryLock() {
		if j.manualRunning() {
			s.retry(j, n, "a manual snapshot of it was running")
			return
		}
		s.log.Warn("schedule fired while a scheduled snapshot of this volume is running: skipped", "volume", j.name)
		return
	}
	s.running.Add(1)
	defer s.running.Done()
	s.clearRetry(j)
	s.state.setLastRun(j.name, time.Now())
	_, err := s.snapshot(j, Request{Kind: chain.KindAuto})
	j.unlock()
	if err != nil && s.ctx.Err() == nil {
		s.retry(j, n, err.Error())
	}
}

// maxRetryDelay caps the doubling retry delay.
const maxRetryDelay = 30 * time.Minute

// retry schedules try n+1 of a scheduled snapshot after the configured delay, doubled at
// each try, unless the tries are used up, the agent stops, the configuration changed, or
// the next scheduled run comes first.
func (s *Service) retry(j *job, n int, why string) {
	s.mu.Lock()
	attempts, delay := *s.cfg.RetryAttempts, time.Duration(s.cfg.RetryDelay)
	s.mu.Unlock()
	if n > attempts {
		if attempts > 0 {
			s.log.Warn("scheduled snapshot not retried again: waiting for the next scheduled run", "volume", j.name, "tries", n, "reason", why)
		}
		return
	}
	d := min(delay<<(n-1), maxRetryDelay)
	at := time.Now().Add(d)
	if next := s.nextRun(j); !next.IsZero() && !next.After(at) {
		s.log.Info("scheduled snapshot not retried: the next scheduled run comes first", "volume", j.name, "next_run", next, "reason", why)
		return
	}
	s.log.Warn("retrying the scheduled snapshot", "volume", j.name, "in", d.String(), "retry", n, "of", attempts, "reason", why)
	j.smu.Lock()
	j.status.RetryAt = at
	j.smu.Unlock()
	s.notifyStatus()
	time.AfterFunc(d, func() {
		if s.ctx.Err() != nil || !s.current(j) {
			return
		}
		s.attempt(j, n+1)
	})
}

func (s *Service) clearRetry(j *job) {
	j.smu.Lock()
	j.status.RetryAt = time.Time{}
	j.smu.Unlock()
}

// current reports whether j's volumes (or group) are still the configured ones: a reload
// replaces them, and a retry of the old configuration's job must not run.
func (s *Service) current(j *job) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if j.group != nil {
		return s.groups[j.name] == j.group
	}
	return s.vols[j.name] == j.vols[0]
}

// nextRun is when the job's schedules fire next (zero if they never do).
func (s *Service) nextRun(j *job) time.Time {
	s.mu.Lock()
	c := s.cron
	scheds := j.schedules()
	s.mu.Unlock()
	var next time.Time
	for _, e := range c.Entries() {
		for _, sched := range scheds {
			if e.Schedule == sched && (next.IsZero() || e.Next.Before(next)) {
				next = e.Next
			}
		}
	}
	return next
}

func (j *job) schedules() []cron.Schedule {
	if j.group != nil {
		return j.group.spec.Parsed
	}
	return j.vols[0].spec.Parsed
}

// manualRunning reports whether a manual snapshot holds one of the job's volumes.
func (j *job) manualRunning() bool {
	for _, v := range j.vols {
		if v.manual.Load() {
			return true
		}
	}
	return false
}

// catchUp takes one snapshot for each volume or group whose schedule should have fired
// while the agent was not running (like systemd's Persistent=true).
func (s *Service) catchUp() {
	if !*s.cfg.CatchUp {
		return
	}
	s.mu.Lock()
	var jobs []*job
	var scheds [][]cron.Schedule
	for _, v := range s.vols {
		jobs, scheds = append(jobs, s.volumeJob(v)), append(scheds, v.spec.Parsed)
	}
	for _, g := range s.groups {
		jobs, scheds = append(jobs, s.groupJob(g)), append(scheds, g.spec.Parsed)
	}
	s.mu.Unlock()
	now := time.Now()
	for i, j := range jobs {
		last, ok := s.state.lastRun(j.name)
		if !ok {
			s.state.setLastRun(j.name, now) // first start: nothing was missed
			continue
		}
		missed := false
		for _, sched := range scheds[i] {
			if sched.Next(last).Before(now) {
				missed = true
			}
		}
		if missed {
			s.log.Info("a scheduled snapshot was missed while the agent was down: catching up", "volume", j.name, "last_run", last)
			go s.scheduled(j)
		}
	}
}

// Snapshot takes a manual snapshot of a volume or group now, waiting for a running one;
// said is told when it has to wait.
func (s *Service) Snapshot(name string, req Request, said func(string)) ([]*Outcome, error) {
	s.mu.Lock()
	var j *job
	if v, ok := s.vols[name]; ok {
		j = s.volumeJob(v)
	} else if g, ok := s.groups[name]; ok {
		j = s.groupJob(g)
	}
	s.mu.Unlock()
	if j == nil {
		return nil, fmt.Errorf("no volume or group %q in %s", name, s.cfg.Path)
	}
	if !j.tryLock() {
		if said != nil {
			said(fmt.Sprintf("a snapshot of %s is running; waiting for it to finish", name))
		}
		j.lock()
	}
	for _, v := range j.vols {
		v.manual.Store(true)
	}
	s.running.Add(1)
	defer s.running.Done()
	defer j.unlock()
	defer func() {
		for _, v := range j.vols {
			v.manual.Store(false)
		}
	}()
	req.Kind = chain.KindManual
	return s.snapshot(j, req)
}

// snapshot takes one snapshot of the job with its busy locks held, then applies retention.
// A panic while snapshotting is that snapshot's failure, not the agent's end.
func (s *Service) snapshot(j *job, req Request) (outs []*Outcome, err error) {
	ctx := s.ctx
	defer func() { // last: after the panic recovery below has set err
		h, n := s.afterConfig(j)
		AfterSnapshot(ctx, h, n, NewResult(s.repo.Host(), j.name, req.Kind, outs, err), s.log)
	}()
	j.smu.Lock()
	j.status.Running = true
	j.smu.Unlock()
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("internal error (a bug in stasis; please report it): %v\n%s", r, debug.Stack())
			s.recordFailure(j, err)
		}
		j.smu.Lock()
		j.status.Running = false
		j.smu.Unlock()
		s.notifyStatus()
	}()
	// Snapshots take no repository lock: their packs are protected from a concurrent gc by
	// the writer's heartbeat (chain/leases.go). Only retention below takes the deletion lock.
	if req.Kind == chain.KindAuto && req.Name == "" {
		if req.Name, err = s.autoName(ctx, j, time.Now()); err != nil {
			s.recordFailure(j, err)
			return nil, err
		}
	}
	if j.group == nil {
		var out *Outcome
		if out, err = j.vols[0].vol.Snapshot(ctx, s.repo, req); err == nil {
			outs = []*Outcome{out}
		}
	} else {
		vols := make([]*Volume, len(j.vols))
		for i, v := range j.vols {
			vols[i] = v.vol
		}
		outs, err = SnapshotGroup(ctx, s.repo, GroupSpecFromConfig(j.group.spec), vols, req)
	}
	for i, v := range j.vols {
		var out *Outcome
		if err == nil {
			out = outs[i]
		}
		s.metrics.observe(v.spec.Name, out, err)
	}
	if err != nil {
		s.recordFailure(j, err)
		return nil, err
	}
	for i, v := range j.vols {
		out := outs[i]
		s.log.Info("snapshot taken", "volume", v.spec.Name, "group", out.Snapshot.Group, "snapshot", out.Snapshot.Name, "consistency", out.Snapshot.Consistency,
			"tracking", out.Capture.Tracking, "read_bytes", out.Capture.BytesRead, "new_bytes", out.Snapshot.NewBytes,
			"freeze_ms", Millis(out.Capture.Freeze), "duration", out.Duration.Round(time.Millisecond))
	}
	j.smu.Lock()
	j.status.LastSnapshot, j.status.LastResult, j.status.LastAt = outs[0].Snapshot.Name, "ok", time.Now()
	j.status.LastFreezeMS = Millis(outs[0].Capture.Freeze)
	j.smu.Unlock()
	s.state.setResult(j.name, "ok", "")
	s.retainAfter(ctx, j)
	for _, p := range s.replicas {
		for _, v := range j.vols {
			if p.serves(v.spec.Name) {
				p.wake()
				break
			}
		}
	}
	s.metrics.packBytes(s.repo.PackBytes())
	return outs, nil
}

// GroupSpecFromConfig turns a configured group into what SnapshotGroup needs.
func GroupSpecFromConfig(g config.Group) *GroupSpec {
	app := appSpec(g.MySQL, g.Hooks, time.Duration(g.MaxFreeze))
	return &GroupSpec{Name: g.Name, MaxFreeze: time.Duration(g.MaxFreeze), App: app}
}

// ownSnapshots lists this host's snapshots: retention, automatic names and counts never
// touch another machine's snapshots in a shared repository.
func (s *Service) ownSnapshots(ctx context.Context) ([]*chain.Snapshot, []error, error) {
	snaps, bad, err := s.repo.Snapshots(ctx)
	return chain.OfHost(snaps, s.repo.Host()), bad, err
}

// afterConfig returns the job's hooks (for the after phase) and the notification settings.
func (s *Service) afterConfig(j *job) (*config.Hooks, *config.Notify) {
	s.mu.Lock()
	n := s.cfg.Notify
	s.mu.Unlock()
	if j.group != nil {
		return j.group.spec.Hooks, n
	}
	return j.vols[0].spec.Hooks, n
}

// holder describes the agent doing what, for whoever finds the deletion lock held.
func (s *Service) holder(what string) string {
	return fmt.Sprintf("pid %d (stasis agent: %s) on %s since %s", os.Getpid(), what, s.repo.Host(), stampTime(time.Now()))
}

// retainAfter applies the job's retention after a snapshot. The agent's own jobs take
// turns; when another process holds the deletion lock (a gc from the CLI or another host)
// for more than a minute, retention waits for the next snapshot rather than holding this
// job up: deleting late never loses data.
//
// A committed snapshot gets its retention even when the agent is stopping, so a stop right
// after a commit does not leave a quota exceeded until the next run: it goes on for up to
// retainGrace after the stop (the unit allows 30 s); past that it is cut short (gc is safe
// to interrupt).
func (s *Service) retainAfter(ctx context.Context, j *job) {
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	stop := context.AfterFunc(ctx, func() { time.AfterFunc(retainGrace, cancel) })
	defer stop()
	ctx = rctx
	s.retainMu.Lock()
	defer s.retainMu.Unlock()
	unlock, err := s.lockWithin(ctx, s.holder("retention of "+j.name), time.Minute)
	if errors.Is(err, chain.ErrLocked) {
		s.log.Warn("retention deferred to the next snapshot", "volume", j.name, "reason", err)
		return
	}
	if err != nil {
		s.log.Error("retention failed", "volume", j.name, "err", err)
		return
	}
	defer unlock()
	s.mu.Lock()
	cfg := s.cfg
	s.mu.Unlock()
	if _, err = Retain(ctx, s.repo, cfg, j.name, false, s.log); err != nil {
		s.log.Error("retention failed", "volume", j.name, "err", err)
	}
}

// retainGrace is how long retention after a committed snapshot may go on once the agent is
// stopping.
const retainGrace = 15 * time.Second

func (s *Service) lock(ctx context.Context, holder string) (func(), error) {
	// Another deleter (a CLI gc, another host's prune) may hold the lock briefly.
	return s.lockWithin(ctx, holder, 10*time.Minute)
}

// lockWithin takes the deletion lock, waiting up to wait for another holder to finish.
func (s *Service) lockWithin(ctx context.Context, holder string, wait time.Duration) (func(), error) {
	deadline := time.Now().Add(wait)
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

func (s *Service) recordFailure(j *job, err error) {
	s.log.Error("snapshot failed", "volume", j.name, "err", err)
	j.smu.Lock()
	j.status.LastResult, j.status.LastAt = err.Error(), time.Now()
	j.status.LastFailure, j.status.LastFailedAt = err.Error(), time.Now()
	j.smu.Unlock()
	s.state.setResult(j.name, "failed", err.Error())
}

// autoName returns auto_YYYYMMDD_N, N counting the automatic snapshots of that day of the
// volume (or of every member of the group, which all get the same name).
// nameZone is the time zone of a job's automatic names: its schedules' CRON_TZ when they
// all name the same one, else the machine's.
func (s *Service) nameZone(j *job) *time.Location {
	specs := j.vols[0].spec.Schedules
	if j.group != nil {
		specs = j.group.spec.Schedules
	}
	var zone string
	for i, spec := range specs {
		z := config.ScheduleZone(spec)
		if i > 0 && z != zone {
			return time.Local
		}
		zone = z
	}
	if zone == "" {
		return time.Local
	}
	loc, err := time.LoadLocation(zone)
	if err != nil {
		return time.Local
	}
	return loc
}

func (s *Service) autoName(ctx context.Context, j *job, now time.Time) (string, error) {
	snaps, _, err := s.ownSnapshots(ctx)
	if err != nil {
		return "", err
	}
	prefix := "auto_" + now.In(s.nameZone(j)).Format("20060102") + "_"
	n := 0
	for _, sn := range snaps {
		for _, v := range j.vols {
			if sn.Volume == v.spec.Name && strings.HasPrefix(sn.Name, prefix) {
				if k, err := strconv.Atoi(strings.TrimPrefix(sn.Name, prefix)); err == nil && k > n {
					n = k
				}
			}
		}
	}
	return fmt.Sprintf("%s%d", prefix, n+1), nil
}

// Prune applies the retention of a volume or group (of all of them if name is ""), or
// only reports with dryRun. The caller must not hold the repository lock.
func (s *Service) Prune(name string, dryRun bool) ([]PruneDecision, error) {
	s.mu.Lock()
	cfg := s.cfg
	s.mu.Unlock()
	if !dryRun {
		what := name
		if what == "" {
			what = "every volume"
		}
		unlock, err := s.lock(s.ctx, s.holder("prune "+what))
		if err != nil {
			return nil, err
		}
		defer unlock()
	}
	return Retain(s.ctx, s.repo, cfg, name, dryRun, s.log)
}

// PruneDecision is one snapshot's fate under retention.
type PruneDecision struct {
	Volume  string    `json:"volume"`
	Group   string    `json:"group,omitempty"`
	Name    string    `json:"name"`
	ID      string    `json:"id"`
	Created time.Time `json:"created"`
	Keep    bool      `json:"keep"`
	Reason  string    `json:"reason"`
}

// MarshalJSON writes Created as every report writes times (RFC 3339, UTC, milliseconds).
func (d PruneDecision) MarshalJSON() ([]byte, error) {
	type plain PruneDecision
	return json.Marshal(struct {
		plain
		Created string `json:"created"`
	}{plain(d), stampTime(d.Created)})
}

// UnmarshalJSON reads what MarshalJSON wrote (the CLI reads the agent's decisions).
func (d *PruneDecision) UnmarshalJSON(b []byte) error {
	type plain PruneDecision
	var in struct {
		plain
		Created string `json:"created"`
	}
	if err := json.Unmarshal(b, &in); err != nil {
		return err
	}
	*d = PruneDecision(in.plain)
	d.Created, _ = time.Parse(time.RFC3339Nano, in.Created)
	return nil
}

// Retain applies the configuration's retention to this host's chains in r — every volume
// and group, or only the one called name — deleting what the policies do not keep (unless
// dryRun) and, with gc_after_prune, running gc once afterwards. The agent (after each
// snapshot, and for stasis prune through its socket) and the CLI without an agent both
// prune through it. The caller holds the deletion lock.
func Retain(ctx context.Context, r *chain.Repository, cfg *config.Config, name string, dryRun bool, log *slog.Logger) ([]PruneDecision, error) {
	snaps, _, err := r.Snapshots(ctx)
	if err != nil {
		return nil, err
	}
	decisions, victims := PlanConfig(chain.OfHost(snaps, r.Host()), cfg, name, time.Now())
	if dryRun || len(victims) == 0 {
		return decisions, nil
	}
	if err := r.Delete(ctx, victims...); err != nil {
		return decisions, err
	}
	for _, d := range victims {
		log.Info("retention deleted a snapshot", "volume", d.Volume, "snapshot", d.Name)
	}
	if *cfg.GCAfterPrune {
		st, err := r.GC(ctx, chain.GCOptions{})
		if err != nil {
			return decisions, fmt.Errorf("gc after retention: %w", err)
		}
		log.Info("gc", "freed_bytes", st.BytesFreed, "packs_deleted", st.PacksDeleted)
	}
	return decisions, nil
}

// Plan applies a volume's retention policy to its own snapshots (a group's snapshots follow
// the group's policy), in the local time zone, returning every decision and the snapshots
// to delete.
func Plan(snaps []*chain.Snapshot, v config.Volume, now time.Time) ([]PruneDecision, []*chain.Snapshot) {
	byID := map[string]*chain.Snapshot{}
	var in []retention.Snapshot
	for _, sn := range snaps {
		if sn.Volume != v.Name || sn.GroupID != "" {
			continue
		}
		byID[sn.ID] = sn
		in = append(in, retention.Snapshot{ID: sn.ID, Name: sn.Name, Created: sn.Created, Auto: sn.Kind == chain.KindAuto, Protected: sn.Protected})
	}
	var out []PruneDecision
	var victims []*chain.Snapshot
	for _, d := range retention.Apply(in, policy(v.Retention), now, time.Local) {
		out = append(out, PruneDecision{Volume: v.Name, Name: d.Snapshot.Name, ID: d.Snapshot.ID, Created: d.Snapshot.Created, Keep: d.Keep, Reason: d.Reason})
		if !d.Keep {
			victims = append(victims, byID[d.Snapshot.ID])
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Created.Before(out[j].Created) })
	return out, victims
}

// PlanGroup applies a group's retention policy to its group snapshots, each (all its
// members) one unit.
func PlanGroup(snaps []*chain.Snapshot, g config.Group, now time.Time) ([]PruneDecision, []*chain.Snapshot) {
	members := map[string][]*chain.Snapshot{}
	var in []retention.Snapshot
	for _, sn := range snaps {
		if sn.Group != g.Name || sn.GroupID == "" {
			continue
		}
		if _, ok := members[sn.GroupID]; !ok {
			in = append(in, retention.Snapshot{ID: sn.GroupID, Name: sn.Name, Created: sn.Created, Auto: sn.Kind == chain.KindAuto})
		}
		members[sn.GroupID] = append(members[sn.GroupID], sn)
	}
	for i := range in { // a group snapshot is protected if any member is
		for _, sn := range members[in[i].ID] {
			in[i].Protected = in[i].Protected || sn.Protected
		}
	}
	var out []PruneDecision
	var victims []*chain.Snapshot
	for _, d := range retention.Apply(in, policy(g.Retention), now, time.Local) {
		for _, sn := range members[d.Snapshot.ID] {
			out = append(out, PruneDecision{Volume: sn.Volume, Group: g.Name, Name: sn.Name, ID: sn.ID, Created: sn.Created, Keep: d.Keep, Reason: d.Reason})
			if !d.Keep {
				victims = append(victims, sn)
			}
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].Created.Equal(out[j].Created) {
			return out[i].Created.Before(out[j].Created)
		}
		return out[i].Volume < out[j].Volume
	})
	return out, victims
}

// PlanConfig applies the retention of every configured volume and group (or only the one
// named), as Plan and PlanGroup do.
func PlanConfig(snaps []*chain.Snapshot, cfg *config.Config, name string, now time.Time) ([]PruneDecision, []*chain.Snapshot) {
	var all []PruneDecision
	var victims []*chain.Snapshot
	for _, v := range cfg.Volumes {
		if name == "" || v.Name == name {
			d, vs := Plan(snaps, v, now)
			all, victims = append(all, d...), append(victims, vs...)
		}
	}
	for _, g := range cfg.Groups {
		if name == "" || g.Name == name {
			d, vs := PlanGroup(snaps, g, now)
			all, victims = append(all, d...), append(victims, vs...)
		}
	}
	return all, victims
}

func policy(r config.Retention) retention.Policy {
	return retention.Policy{KeepAuto: *r.KeepAuto, KeepDays: *r.KeepDays, KeepLast: *r.KeepLast, KeepHourly: *r.KeepHourly,
		KeepDaily: *r.KeepDaily, KeepWeekly: *r.KeepWeekly, KeepMonthly: *r.KeepMonthly, KeepYearly: *r.KeepYearly}
}

// Status reports every volume, with its snapshot count read from the repository.
func (s *Service) Status() []VolumeStatus { return s.status(true) }

// Replicas reports each replica repository's state.
func (s *Service) Replicas() []*ReplicaStatus {
	var out []*ReplicaStatus
	for _, p := range s.replicas {
		out = append(out, p.snapshot())
	}
	return out
}

// List lists the repository's snapshots, every host's.
func (s *Service) List() ([]*chain.Snapshot, error) {
	snaps, _, err := s.repo.Snapshots(s.ctx)
	return snaps, err
}

// status reports every volume and group; without counts it does no I/O, for the periodic
// STATUS=.
func (s *Service) status(counts bool) []VolumeStatus {
	s.mu.Lock()
	vols, groups := s.vols, s.groups
	c := s.cron
	s.mu.Unlock()
	var snaps []*chain.Snapshot
	if counts {
		snaps, _, _ = s.ownSnapshots(s.ctx)
	}
	entries := c.Entries()
	fill := func(name string, st VolumeStatus, scheds []cron.Schedule, count func(*chain.Snapshot) bool) VolumeStatus {
		for _, sn := range snaps {
			if count(sn) {
				st.Snapshots++
				st.AddedBytes += sn.NewBytes
			}
		}
		for _, e := range entries {
			for _, sched := range scheds {
				if e.Schedule == sched && (st.NextRun.IsZero() || e.Next.Before(st.NextRun)) {
					st.NextRun = e.Next
				}
			}
		}
		if f, ok := s.state.failure(name); ok && st.LastFailure == "" {
			st.LastFailure = f
		}
		return st
	}
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
		out = append(out, fill(name, st, v.spec.Parsed, func(sn *chain.Snapshot) bool { return sn.Volume == name }))
	}
	for name, g := range groups {
		g.smu.Lock()
		st := g.status
		g.smu.Unlock()
		st.Tracking = "group of " + strings.Join(st.Members, ", ")
		seen := map[string]bool{}
		out = append(out, fill(name, st, g.spec.Parsed, func(sn *chain.Snapshot) bool {
			if sn.Group != name || seen[sn.GroupID] {
				return false
			}
			seen[sn.GroupID] = true
			return true
		}))
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

// LastFailure reads the agent's state file in stateDir: the last snapshot of volume, if it
// failed, is the error it failed with ("" otherwise).
func LastFailure(stateDir, volume string) string {
	b, err := os.ReadFile(filepath.Join(stateDir, "state.json"))
	if err != nil {
		return ""
	}
	var st struct {
		Volumes map[string]volumeState `json:"volumes"`
	}
	if json.Unmarshal(b, &st) != nil {
		return ""
	}
	s := st.Volumes[volume]
	if s.LastResult == "failed" {
		return s.LastFailure
	}
	return ""
}

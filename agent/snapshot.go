// Package agent takes snapshots of volumes: it resolves the source, keeps a changed-block
// tracker per volume, runs the capture rounds with a guarded freeze, and commits to the
// repository. The CLI uses it for one snapshot; the long-running service keeps Volumes (and
// their trackers) between snapshots so incrementals read only what changed. Several
// volumes can be snapshotted as one consistency group, frozen in one window.
package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stasis-project/stasis/agent/mysql"
	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/capture"
	"github.com/stasis-project/stasis/chain/capture/blocktrace"
	"github.com/stasis-project/stasis/chain/fsimage"
	"github.com/stasis-project/stasis/chain/fsimage/filesystems"
	"github.com/stasis-project/stasis/fsfreeze"
)

// VolumeSpec is a validated volume to snapshot.
type VolumeSpec struct {
	Name      string
	Source    string // device, partition, mount point or image file
	MaxFreeze time.Duration
	NoFreeze  bool
	ChunkSize int // for the volume's first snapshot; 0 for the default
	App       *AppSpec
	// MaxReadRate paces reads before the freeze, bytes per second (0: no limit).
	MaxReadRate int64
}

// GroupSpec is a consistency group: volumes snapshotted at one instant, with the group's
// own freeze limit (for the whole window) and application quiescing.
type GroupSpec struct {
	Name      string
	MaxFreeze time.Duration
	App       *AppSpec
}

// AppSpec is application quiescing around the freeze: hooks and a database lock.
type AppSpec struct {
	PreHooks, PostHooks []string
	HookTimeout         time.Duration
	MySQL               *mysql.Config // nil: no database
	DSNFile             string
	// CrashConsistentOnFailure takes the snapshot anyway (not labelled "app") when the
	// database lock cannot be had; otherwise the snapshot fails.
	CrashConsistentOnFailure bool
}

// LogHolder holds log output while filesystems are frozen (stderr may be on one of them).
type LogHolder interface {
	Hold()
	Release()
}

// Options are the environment a Volume works in.
type Options struct {
	Log *slog.Logger
	// GuardCommand starts the freeze guard (stasis's own executable, "freeze-guard").
	GuardCommand []string
	Hold         LogHolder
	// KeepTracking keeps the tracker running after a snapshot, so the next one is a
	// tracked incremental. The CLI takes one snapshot and does not.
	KeepTracking bool
	// FreezeHook runs inside every freeze window (test seam; nil in production).
	FreezeHook func()
	// TrackerDisk, if set, replaces the device number the tracker watches (test seam: a
	// tracker of the wrong device must be caught by its proof).
	TrackerDisk func(actual uint64) uint64
}

// Request is one snapshot to take.
type Request struct {
	Name string // "" for the default name
	Kind string // chain.KindManual or chain.KindAuto
	// Tags and Note describe the snapshot for people (list --tag filters on tags).
	Tags []string
	Note string
	// Force continues a chain from a source that is not the one the chain was made from
	// (another filesystem, another size).
	Force bool
	// Progress, if set, is told how many bytes were handed to the repository.
	Progress func(n int64)
	// AddTotal, if set, is told (per volume) how many bytes a snapshot that reads its
	// volume's allocated data will read, before it starts: progress then has a total and an
	// ETA. A tracked incremental, which reads only what changed, says nothing.
	AddTotal func(n int64)
}

// Outcome is a committed snapshot and how it was captured.
type Outcome struct {
	Snapshot *chain.Snapshot
	Capture  capture.Result
	Write    chain.WriteStats
	Warnings []string
	Duration time.Duration
}

// Volume snapshots one volume. Snapshot calls are serialised.
type Volume struct {
	spec VolumeSpec
	opts Options

	mu      sync.Mutex
	tracker *blocktrace.Tracker
	trackOf trackedState // what the running tracker's dirty set is relative to
	// tracking mirrors "tracker kept after a committed snapshot", readable without mu,
	// which a running snapshot holds; untracked says why the last snapshot had no usable
	// tracker.
	tracking  atomic.Bool
	untracked atomic.Value
}

type trackedState struct {
	snapshot string // ID of the snapshot whose freeze the tracker's dirty set starts at
	identity *chain.SourceIdentity
}

// NewVolume prepares a volume; nothing is opened until the first snapshot.
func NewVolume(spec VolumeSpec, opts Options) *Volume {
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	return &Volume{spec: spec, opts: opts}
}

// Name is the volume's name.
func (v *Volume) Name() string { return v.spec.Name }

// Tracking says whether the next snapshot can be a tracked incremental, and if not why.
// It does not wait for a running snapshot.
func (v *Volume) Tracking() (bool, string) {
	if v.tracking.Load() {
		return true, ""
	}
	if why, _ := v.untracked.Load().(string); why != "" {
		return false, "the device's writes cannot be tracked: " + why
	}
	return false, "no tracker running (first snapshot since start, or tracking unavailable)"
}

// Close stops the tracker.
func (v *Volume) Close() {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.stopTracker()
}

func (v *Volume) stopTracker() {
	v.tracking.Store(false)
	if v.tracker != nil {
		v.tracker.Close()
		v.tracker = nil
	}
}

// Snapshot takes one snapshot into r, whose writer lock the caller holds.
func (v *Volume) Snapshot(ctx context.Context, r *chain.Repository, req Request) (*Outcome, error) {
	outs, err := SnapshotGroup(ctx, r, nil, []*Volume{v}, req)
	if err != nil {
		return nil, err
	}
	return outs[0], nil
}

// prepared is one volume made ready for a capture.
type prepared struct {
	v        *Volume
	src      *capture.Source
	w        *chain.SnapshotWriter
	member   *capture.Member
	targets  []fsfreeze.Target
	identity *chain.SourceIdentity
	// fullReason says why this is not a tracked incremental ("" if it is).
	fullReason string
	warnings   []string
	committed  bool
}

func (p *prepared) warn(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	p.warnings = append(p.warnings, msg)
	p.v.opts.Log.Warn(msg, "volume", p.v.spec.Name)
}

// SnapshotGroup takes one snapshot of each volume into r (whose writer lock the caller
// holds), with every filesystem of every volume frozen in one window: the snapshots are
// the volumes at one instant. With g nil it is a single volume with its own settings.
// Either every volume's snapshot is committed, or none is.
func SnapshotGroup(ctx context.Context, r *chain.Repository, g *GroupSpec, vols []*Volume, req Request) ([]*Outcome, error) {
	start := time.Now()
	byName := append([]*Volume(nil), vols...)
	sort.Slice(byName, func(i, j int) bool { return byName[i].spec.Name < byName[j].spec.Name })
	for _, v := range byName { // in name order, so two groups never deadlock
		v.mu.Lock()
		defer v.mu.Unlock()
	}
	lead := vols[0]
	maxFreeze, app := lead.spec.MaxFreeze, lead.spec.App
	var groupName, groupID string
	if g != nil {
		maxFreeze, app = g.MaxFreeze, g.App
		groupName, groupID = g.Name, newGroupID()
	}
	now := time.Now()
	ps := make([]*prepared, 0, len(vols))
	defer func() {
		for _, p := range ps {
			if !p.committed {
				p.w.Abort()
				p.v.stopTracker() // its dirty set now belongs to no snapshot
			}
			p.src.Close()
		}
	}()
	for _, v := range vols {
		p, err := v.prepare(ctx, r, req, chain.SnapshotOptions{Group: groupName, GroupID: groupID, Now: now})
		if err != nil {
			if g != nil {
				err = fmt.Errorf("group %s: volume %s: %w", g.Name, v.spec.Name, err)
			}
			return nil, err
		}
		ps = append(ps, p)
	}
	// The final round (database lock, freeze, thaw) runs at normal priority.
	opts := capture.Options{MaxFreeze: maxFreeze, FinalReadHook: lead.opts.FreezeHook, Boost: fsfreeze.BoostPriority}
	var targets []fsfreeze.Target
	for _, p := range ps {
		opts.Members = append(opts.Members, p.member)
		targets = append(targets, p.targets...)
	}
	appState := &appState{}
	if len(targets) > 0 {
		var release func()
		opts.Freeze, release = lead.freezer(targets, maxFreeze)
		defer release()
		if app != nil {
			opts.Quiesce = lead.quiescer(app, groupOrVolume(g, lead), appState, ps[0].warn)
		}
	} else if app != nil {
		ps[0].warn("application quiescing needs a frozen final round, which this snapshot does not have: hooks and database lock skipped")
	}
	results, err := capture.Run(ctx, opts)
	if errors.Is(err, fsfreeze.ErrNotSupported) {
		for _, p := range ps {
			p.warn("%v: taking a crash-consistent snapshot instead", err)
			p.member.Tracker = nil
			p.v.stopTracker()
		}
		opts.Freeze, opts.Quiesce = nil, nil
		results, err = capture.Run(ctx, opts)
	}
	what := lead.spec.Source
	if g != nil {
		what = "group " + g.Name
	}
	if err != nil {
		return nil, fmt.Errorf("snapshot of %s failed, nothing was committed: %w", what, err)
	}
	outs := make([]*Outcome, len(ps))
	for i, p := range ps {
		res := results[i]
		consistency := chain.ConsistencyCrash
		if res.Frozen {
			consistency = chain.ConsistencyFSFrozen
			if appState.quiesced {
				consistency = chain.ConsistencyApp
			}
		}
		p.w.Snapshot().Consistency = consistency
		s, err := p.w.Commit(ctx, captureInfo(res, p, time.Since(start)), appState.record())
		if err != nil {
			for _, done := range ps[:i] {
				if derr := r.Delete(ctx, done.w.Snapshot()); derr != nil {
					p.warn("could not remove %s/%s of the failed group snapshot: %v", done.v.spec.Name, done.w.Snapshot().Name, derr)
				}
				done.committed = false
			}
			return nil, fmt.Errorf("snapshot of %s failed, nothing was committed: %w", what, err)
		}
		p.committed = true
		if !res.Frozen && res.NotFrozen != "" && opts.Freeze != nil {
			p.warn("the snapshot is crash-consistent: %s", res.NotFrozen)
		}
		outs[i] = &Outcome{Snapshot: s, Capture: res, Write: p.w.Stats(), Warnings: p.warnings}
	}
	for i, p := range ps {
		outs[i].Duration = time.Since(start)
		v := p.v
		if results[i].Tracking == capture.Untracked {
			v.untracked.Store(results[i].Untracked)
		} else {
			v.untracked.Store("")
		}
		if v.tracker != nil && v.opts.KeepTracking && results[i].Tracking != capture.Untracked && results[i].Frozen {
			v.trackOf = trackedState{snapshot: outs[i].Snapshot.ID, identity: p.identity}
			v.tracking.Store(true)
		} else {
			v.stopTracker()
		}
	}
	return outs, nil
}

func groupOrVolume(g *GroupSpec, v *Volume) string {
	if g != nil {
		return g.Name
	}
	return v.spec.Name
}

func newGroupID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// prepare resolves the volume, decides between a tracked incremental and a full scan,
// starts its writer (and tracker), and describes it as a capture member.
func (v *Volume) prepare(ctx context.Context, r *chain.Repository, req Request, so chain.SnapshotOptions) (*prepared, error) {
	vol, err := capture.Resolve(v.spec.Source)
	if err != nil {
		return nil, err
	}
	src, err := capture.OpenSource(vol.Device)
	if err != nil {
		return nil, err
	}
	p := &prepared{v: v, src: src}
	ok := false
	defer func() {
		if !ok {
			src.Close()
		}
	}()
	var mounts []string
	if !v.spec.NoFreeze {
		for _, m := range vol.Mounts {
			if m.ReadOnly {
				continue
			}
			if m.Point == "" {
				return nil, fmt.Errorf("the %s filesystem on %s is mounted at %s, but something else is mounted over it there: it cannot be frozen, and a snapshot would be torn; unmount what covers it (or set no_freeze for a crash-consistent snapshot)",
					m.FSType, devName(m.Dev), strings.Join(m.Covered, ", "))
			}
			mounts = append(mounts, m.Point)
			p.targets = append(p.targets, fsfreeze.Target{Path: m.Point, Dev: m.Dev})
		}
		if unfreezable := vol.Unfreezable(); len(unfreezable) > 0 {
			var uses []string
			for _, u := range unfreezable {
				uses = append(uses, u.String())
			}
			return nil, fmt.Errorf("cannot snapshot %s consistently (it would be torn): %s (or set no_freeze, --no-freeze, to read it as it is, crash-consistent)",
				v.spec.Source, strings.Join(uses, "; "))
		}
	}
	freeze := len(p.targets) > 0
	p.identity = sourceIdentity(vol, src)

	// A tracked incremental needs a tracker that has run since this volume's newest
	// snapshot froze, that snapshot still there, on the same device and filesystems.
	snaps, _, err := r.Snapshots(ctx)
	if err != nil {
		return nil, err
	}
	parent := chain.Latest(snaps, r.Host(), v.spec.Name)
	if d := otherSource(parent, p.identity, v.spec.Source); d != "" && !req.Force {
		return nil, fmt.Errorf("volume %s's chain was made from another source (%s): refusing to add this one to it; give the snapshot another volume name, or --force to continue the chain anyway", v.spec.Name, d)
	}
	switch {
	case parent == nil:
		p.fullReason = "first snapshot of the volume"
	case !freeze:
		p.fullReason = "no filesystem to freeze: tracked incrementals need a frozen final round"
	case v.tracker == nil:
		p.fullReason = "no tracker was running since the previous snapshot"
	case parent.ID != v.trackOf.snapshot:
		p.fullReason = "the tracker's changes are relative to another snapshot than the newest"
	default:
		if d := v.trackOf.identity.Differs(p.identity); d != "" {
			p.fullReason = "the source is not the one tracked: " + d
		}
	}
	tracked := p.fullReason == ""
	so.Volume, so.Name, so.Kind, so.Tags, so.Note = v.spec.Name, req.Name, req.Kind, req.Tags, req.Note
	so.Size, so.ChunkSize, so.Source, so.Identity, so.FromParent = src.Size, v.spec.ChunkSize, v.spec.Source, p.identity, tracked
	// The parent just listed (the tracker's changes are relative to it): the writer builds
	// on it, not on whatever is newest when it starts, and fails if it was deleted meanwhile.
	so.Parent = parent
	p.w, err = r.NewSnapshot(ctx, so)
	if errors.Is(err, chain.ErrParentDamaged) {
		p.fullReason = "the previous snapshot references chunks verify found damaged: reading the volume whole stores them again (`stasis repair` then clears the damage list)"
		tracked, so.FromParent = false, false
		p.w, err = r.NewSnapshot(ctx, so)
	}
	if !tracked {
		v.stopTracker()
	}
	if err != nil {
		return nil, err
	}
	defer func() {
		if !ok {
			p.w.Abort()
		}
	}()
	full, allocated, err := p.fullRuns(vol)
	if err != nil {
		return nil, err
	}
	var cw capture.Writer = p.w
	if req.Progress != nil {
		cw = progressWriter{p.w, req.Progress}
	}
	if req.AddTotal != nil && !tracked {
		var n int64
		for _, r := range full {
			n += (r.End - r.Start) * int64(p.w.ChunkSize())
		}
		req.AddTotal(min(n, src.Size))
	}
	p.member = &capture.Member{Name: v.spec.Name, Source: src, Writer: cw, Full: full, FullScan: !tracked, Allocated: allocated}
	if v.spec.MaxReadRate > 0 {
		p.member.ReadLimit = capture.NewReadLimit(v.spec.MaxReadRate)
	}
	if freeze {
		p.member.Sync = capture.SyncMounts(mounts)
		if v.tracker == nil {
			blocktrace.RemoveStale()
			disk := vol.Disk
			if v.opts.TrackerDisk != nil {
				disk = v.opts.TrackerDisk(disk)
			}
			v.tracker, err = blocktrace.Start(blocktrace.Config{Disk: disk, Start: vol.Start, Sectors: src.Size / 512, ChunkSize: p.w.ChunkSize()})
			if err != nil {
				p.warn("%v; the volume is read whole and compared while frozen, if that fits max-freeze", err)
				v.tracker = nil
			}
		}
		if v.tracker != nil {
			p.member.Tracker = v.tracker
		}
	}
	ok = true
	return p, nil
}

// fullRuns lists what a full scan reads: the allocated blocks of a filesystem stasis can
// map, else every byte (an image file's data extents).
func (p *prepared) fullRuns(vol *capture.Volume) ([]capture.ChunkRun, func() ([]capture.ChunkRun, error), error) {
	src, cs := p.src, p.w.ChunkSize()
	ranges, err := src.DataRanges()
	if err != nil {
		return nil, nil, err
	}
	full := capture.Chunks(ranges, cs, src.Size)
	if vol.IsFile {
		return full, nil, nil
	}
	allocated := func() ([]capture.ChunkRun, error) {
		ext, _, err := filesystems.Allocated(src, src.Size)
		if err != nil {
			return nil, err
		}
		rs := make([]capture.Range, len(ext))
		for i, e := range ext {
			rs[i] = capture.Range{Start: e.Start, End: e.End}
		}
		return capture.Chunks(rs, cs, src.Size), nil
	}
	runs, err := allocated()
	if err != nil {
		if !errors.Is(err, fsimage.ErrNoFilesystem) {
			p.warn("cannot read the filesystem's allocation map (%v): reading the whole device", err)
		}
		return full, nil, nil
	}
	return runs, allocated, nil
}

// captureInfo is what the manifest records of how the snapshot was read.
func captureInfo(res capture.Result, p *prepared, d time.Duration) map[string]any {
	info := map[string]any{"tracking": res.Tracking, "rounds": res.Rounds, "bytes_read": res.BytesRead,
		"freeze_ms": Millis(res.Freeze), "final_chunks": res.FinalChunks, "final_read_bytes": res.FinalRead,
		"unread_allocated_chunks": res.Unread, "duration_ms": d.Milliseconds()}
	if res.Untracked != "" {
		info["untracked"] = res.Untracked
	}
	if !res.Frozen && res.NotFrozen != "" {
		info["not_frozen"] = res.NotFrozen
	}
	if p.fullReason != "" && res.Tracking != capture.Tracked {
		info["full_scan"] = p.fullReason
	}
	if len(res.Gaps) > 0 {
		info["tracking_gaps"] = res.Gaps
	}
	return info
}

// Millis converts a duration to fractional milliseconds, as reports show freeze times.
func Millis(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// freezer returns the capture's Freezer, which freezes the targets under a guard and holds
// log output while they are frozen, and what releases it (call it once the capture is
// over). The first attempt's guard process starts at once, in the background: its start-up
// (tens of milliseconds) overlaps the reading rounds instead of leading the freeze and
// lengthening an application's lock. A retried attempt starts its own. The mount points
// stay open (busy) from then until the capture ends.
func (v *Volume) freezer(targets []fsfreeze.Target, maxFreeze time.Duration) (capture.Freezer, func()) {
	opts := fsfreeze.Options{MaxFreeze: maxFreeze, GuardCommand: v.opts.GuardCommand}
	type ready struct {
		p   *fsfreeze.Prepared
		err error
	}
	pending := make(chan ready, 1)
	go func() {
		p, err := fsfreeze.Prepare(targets, opts)
		pending <- ready{p, err}
	}()
	prepared := func() (*fsfreeze.Prepared, error) {
		if pending != nil {
			r := <-pending
			pending = nil
			return r.p, r.err
		}
		return fsfreeze.Prepare(targets, opts)
	}
	release := func() {
		if pending != nil {
			if r := <-pending; r.p != nil {
				r.p.Close()
			}
			pending = nil
		}
	}
	return func() (func() (time.Duration, error), error) {
		p, err := prepared()
		if err != nil {
			return nil, err
		}
		if v.opts.Hold != nil {
			v.opts.Hold.Hold()
		}
		fz, err := p.Freeze()
		if err != nil {
			if v.opts.Hold != nil {
				v.opts.Hold.Release()
			}
			return nil, err
		}
		return func() (time.Duration, error) {
			d, err := fz.Thaw()
			if v.opts.Hold != nil {
				v.opts.Hold.Release()
			}
			switch {
			case errors.Is(err, fsfreeze.ErrTimeout):
				err = fmt.Errorf("the filesystems stayed frozen for max-freeze %s, so they were thawed and this attempt discarded (the device is too busy, or reads too slow; raise max-freeze or retry): %w", maxFreeze, err)
			case errors.Is(err, fsfreeze.ErrThawedEarly):
				err = fmt.Errorf("%w: %w", capture.ErrWindowBroken, err)
			}
			return d, err
		}, nil
	}, release
}

func devName(dev uint64) string {
	return fmt.Sprintf("device %d:%d", unix.Major(dev), unix.Minor(dev))
}

type progressWriter struct {
	*chain.SnapshotWriter
	add func(int64)
}

func (w progressWriter) Put(ctx context.Context, i int64, data []byte) error {
	err := w.SnapshotWriter.Put(ctx, i, data)
	w.add(int64(len(data)))
	return err
}

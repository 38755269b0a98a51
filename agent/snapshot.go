// Package agent takes snapshots of volumes: it resolves the source, keeps a changed-block
// tracker per volume, runs the capture rounds with a guarded freeze, and commits to the
// repository. The CLI uses it for one snapshot; the long-running service keeps Volumes (and
// their trackers) between snapshots so incrementals read only what changed.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

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
}

// Request is one snapshot to take.
type Request struct {
	Name string // "" for the default name
	Kind string // chain.KindManual or chain.KindAuto
	// Progress, if set, is told how many bytes were handed to the repository.
	Progress func(n int64)
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
	// which a running snapshot holds.
	tracking atomic.Bool
}

type trackedState struct {
	snapshot string // ID of the snapshot whose freeze the tracker's dirty set starts at
	size     int64
	chunk    int
}

// NewVolume prepares a volume; nothing is opened until the first snapshot.
func NewVolume(spec VolumeSpec, opts Options) *Volume {
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	return &Volume{spec: spec, opts: opts}
}

// Tracking says whether the next snapshot can be a tracked incremental, and if not why.
// It does not wait for a running snapshot.
func (v *Volume) Tracking() (bool, string) {
	if !v.tracking.Load() {
		return false, "no tracker running (first snapshot since start, or tracking unavailable)"
	}
	return true, ""
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
	v.mu.Lock()
	defer v.mu.Unlock()
	start := time.Now()
	out := &Outcome{}
	warn := func(format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		out.Warnings = append(out.Warnings, msg)
		v.opts.Log.Warn(msg, "volume", v.spec.Name)
	}
	vol, err := capture.Resolve(v.spec.Source)
	if err != nil {
		return nil, err
	}
	src, err := capture.OpenSource(vol.Device)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	var mounts []string
	for _, m := range vol.Mounts {
		if !m.ReadOnly {
			mounts = append(mounts, m.Point)
		}
	}
	freeze := len(mounts) > 0 && !v.spec.NoFreeze

	// A tracked incremental needs a tracker that has run since this volume's newest
	// snapshot froze, and that snapshot still there with the same geometry.
	snaps, _, err := r.Snapshots(ctx)
	if err != nil {
		return nil, err
	}
	parent := chain.Latest(snaps, v.spec.Name)
	tracked := v.tracker != nil && parent != nil && parent.ID == v.trackOf.snapshot &&
		parent.SizeBytes == src.Size && v.trackOf.size == src.Size && freeze
	if !tracked {
		v.stopTracker()
	}
	host, _ := os.Hostname()
	w, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: v.spec.Name, Name: req.Name, Kind: req.Kind,
		Size: src.Size, ChunkSize: v.spec.ChunkSize, Source: v.spec.Source, Host: host, FromParent: tracked})
	if err != nil {
		return nil, err
	}
	committed := false
	defer func() {
		if !committed {
			w.Abort()
			v.stopTracker() // its dirty set now belongs to no snapshot
		}
	}()

	ranges, err := src.DataRanges()
	if err != nil {
		return nil, err
	}
	full := capture.Chunks(ranges, w.ChunkSize(), src.Size)
	var allocated func() ([]capture.ChunkRun, error)
	if !vol.IsFile {
		allocated = func() ([]capture.ChunkRun, error) {
			ext, _, err := filesystems.Allocated(src, src.Size)
			if err != nil {
				return nil, err
			}
			rs := make([]capture.Range, len(ext))
			for i, e := range ext {
				rs[i] = capture.Range{Start: e.Start, End: e.End}
			}
			return capture.Chunks(rs, w.ChunkSize(), src.Size), nil
		}
		if runs, err := allocated(); err == nil {
			full = runs
		} else {
			if !errors.Is(err, fsimage.ErrNoFilesystem) {
				warn("cannot read the filesystem's allocation map (%v): reading the whole device", err)
			}
			allocated = nil
		}
	}
	var cw capture.Writer = w
	if req.Progress != nil {
		cw = progressWriter{w, req.Progress}
	}
	opts := capture.Options{Source: src, Writer: cw, Full: full, FullScan: !tracked, Allocated: allocated}
	if freeze && v.tracker == nil {
		blocktrace.RemoveStale()
		v.tracker, err = blocktrace.Start(blocktrace.Config{Disk: vol.Disk, Start: vol.Start, Sectors: src.Size / 512, ChunkSize: w.ChunkSize()})
		if err != nil {
			warn("%v; without tracking the device cannot be read while frozen, so the snapshot is crash-consistent", err)
			v.tracker = nil
			freeze = false
		}
	}
	consistency := chain.ConsistencyCrash
	app := &appState{}
	if freeze {
		consistency = chain.ConsistencyFSFrozen
		opts.Tracker = v.tracker
		opts.Sync = capture.SyncMounts(mounts)
		opts.Freeze = v.freezer(mounts)
		opts.FinalReadHook = v.opts.FreezeHook
		if v.spec.App != nil {
			opts.Quiesce = v.quiescer(app, warn)
		}
	} else if v.spec.App != nil {
		warn("application quiescing needs a frozen final round, which this snapshot does not have: hooks and database lock skipped")
	}
	res, err := capture.Run(ctx, opts)
	if errors.Is(err, fsfreeze.ErrNotSupported) {
		warn("%v: taking a crash-consistent snapshot instead", err)
		consistency = chain.ConsistencyCrash
		opts.Freeze, opts.Tracker, opts.FullScan = nil, nil, true
		v.stopTracker()
		res, err = capture.Run(ctx, opts)
	}
	if err != nil {
		return nil, fmt.Errorf("snapshot of %s failed, nothing was committed: %w", v.spec.Source, err)
	}
	if app.quiesced && consistency == chain.ConsistencyFSFrozen {
		consistency = chain.ConsistencyApp
	}
	w.Snapshot().Consistency = consistency
	info := map[string]any{"tracking": res.Tracking, "rounds": res.Rounds, "bytes_read": res.BytesRead,
		"freeze_ms": Millis(res.Freeze), "final_chunks": res.FinalChunks, "unread_allocated_chunks": res.Unread,
		"duration_ms": time.Since(start).Milliseconds()}
	if len(res.Gaps) > 0 {
		info["tracking_gaps"] = res.Gaps
	}
	s, err := w.Commit(ctx, info, app.record())
	if err != nil {
		return nil, fmt.Errorf("snapshot of %s failed, nothing was committed: %w", v.spec.Source, err)
	}
	committed = true
	if v.tracker != nil && v.opts.KeepTracking {
		v.trackOf = trackedState{snapshot: s.ID, size: src.Size, chunk: w.ChunkSize()}
		v.tracking.Store(true)
	} else {
		v.stopTracker()
	}
	out.Snapshot, out.Capture, out.Write, out.Duration = s, res, w.Stats(), time.Since(start)
	return out, nil
}

// Millis converts a duration to fractional milliseconds, as reports show freeze times.
func Millis(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// freezer freezes mounts under a guard, holding log output while they are frozen.
func (v *Volume) freezer(mounts []string) capture.Freezer {
	return func() (func() (time.Duration, error), error) {
		if v.opts.Hold != nil {
			v.opts.Hold.Hold()
		}
		fz, err := fsfreeze.Freeze(mounts, fsfreeze.Options{MaxFreeze: v.spec.MaxFreeze, GuardCommand: v.opts.GuardCommand})
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
			if errors.Is(err, fsfreeze.ErrTimeout) {
				err = fmt.Errorf("the filesystems stayed frozen for max-freeze %s, so they were thawed and this attempt discarded (the device is too busy, or reads too slow; raise max-freeze or retry): %w", v.spec.MaxFreeze, err)
			}
			return d, err
		}, nil
	}
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

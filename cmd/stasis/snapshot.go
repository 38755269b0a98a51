package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/capture"
	"github.com/stasis-project/stasis/chain/capture/allocmap"
	"github.com/stasis-project/stasis/chain/capture/blocktrace"
	"github.com/stasis-project/stasis/fsfreeze"
)

// snapshotJSON is what `snapshot --json` prints: the list fields plus how it was captured.
type snapshotJSON struct {
	listEntry
	Tracking      string   `json:"tracking"`
	Rounds        int      `json:"rounds"`
	FreezeMS      float64  `json:"freeze_ms"`
	BytesRead     int64    `json:"bytes_read"`
	BytesStored   int64    `json:"bytes_stored"`
	MetadataBytes int64    `json:"metadata_bytes"`
	ChunksStored  int64    `json:"chunks_stored"`
	FinalChunks   int      `json:"final_chunks"`
	DurationMS    int64    `json:"duration_ms"`
	Warnings      []string `json:"warnings,omitempty"`
}

type snapshotFlags struct {
	source, volume, name string
	asJSON, noFreeze     bool
	chunkSize            int
	maxFreeze            time.Duration
}

func newSnapshotCmd(g *globals) *cobra.Command {
	var f snapshotFlags
	cmd := &cobra.Command{
		Use:   "snapshot --source DEV|MOUNTPOINT|IMAGE --volume NAME [--name NAME]",
		Short: "Take a snapshot of a block device, partition, mount point or image file",
		Long: `Take a snapshot of --source as the next link of volume --volume's chain. The
volume's first snapshot stores every non-empty chunk; later snapshots store only chunks the
repository does not hold yet.

For a device with mounted filesystems, stasis tracks writes to the device while it reads it
(pre-copy rounds), then freezes every filesystem on it (FIFREEZE) only long enough to read
the chunks written meanwhile, and thaws: the snapshot is the device as it was at the freeze
instant, labelled "fs-frozen". The freeze never lasts longer than --max-freeze; if stasis
dies while frozen, a guard process thaws within --max-freeze + 1 s, and "stasis thaw --all"
thaws whatever stasis froze.

A device with no mounted filesystem, an image file, --no-freeze, or a filesystem that cannot
freeze gives a snapshot read as it is, labelled "crash".

Without --name the snapshot is named manual_YYYYMMDD_HHMMSS (UTC). Names are unique per volume.`,
		Example: `  stasis snapshot --source /dev/vdb --volume data --name before-upgrade
  stasis snapshot --source /var/lib/mysql --volume db --json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runSnapshot(cmd, g, f) },
	}
	fl := cmd.Flags()
	fl.StringVar(&f.source, "source", "", "block device, partition, mount point or image file to snapshot")
	fl.StringVar(&f.volume, "volume", "", "volume (chain) name")
	fl.StringVar(&f.name, "name", "", "snapshot name, unique in the volume")
	fl.BoolVar(&f.asJSON, "json", false, "print the result as JSON")
	fl.BoolVar(&f.noFreeze, "no-freeze", false, "do not freeze filesystems (crash-consistent snapshot)")
	fl.DurationVar(&f.maxFreeze, "max-freeze", 5*time.Second, "longest time filesystems may stay frozen")
	fl.IntVar(&f.chunkSize, "chunk-size", 0, "chunk size in bytes for a new volume (default 65536); fixed afterwards")
	return cmd
}

func runSnapshot(cmd *cobra.Command, g *globals, f snapshotFlags) error {
	ctx := cmd.Context()
	start := time.Now()
	if f.source == "" || f.volume == "" {
		return fmt.Errorf("--source and --volume are required")
	}
	if err := chain.ValidName("volume", f.volume); err != nil {
		return err
	}
	if f.maxFreeze <= 0 {
		return fmt.Errorf("--max-freeze must be positive")
	}
	vol, err := capture.Resolve(f.source)
	if err != nil {
		return err
	}
	src, err := capture.OpenSource(vol.Device)
	if err != nil {
		return err
	}
	defer src.Close()
	log := g.logger()
	var warnings []string
	warn := func(msg string, args ...any) {
		warnings = append(warnings, fmt.Sprintf(msg, args...))
		log.Warn(fmt.Sprintf(msg, args...))
	}

	// Which filesystems to freeze: writable ones mounted on the device.
	var mounts []string
	for _, m := range vol.Mounts {
		if !m.ReadOnly {
			mounts = append(mounts, m.Point)
		}
	}
	freeze := len(mounts) > 0 && !f.noFreeze

	r, unlock, err := g.lockRepo(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	host, _ := os.Hostname()
	w, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: f.volume, Name: f.name, Size: src.Size,
		ChunkSize: f.chunkSize, Source: f.source, Host: host})
	if err != nil {
		return err
	}
	committed := false
	defer func() {
		if !committed {
			w.Abort()
		}
	}()
	ranges, err := src.DataRanges()
	if err != nil {
		return err
	}
	// Free space is neither read nor stored when the filesystem's allocation map is known.
	var allocated func() ([]capture.ChunkRun, error)
	if !vol.IsFile {
		allocated = func() ([]capture.ChunkRun, error) {
			ext, _, err := allocmap.Allocated(src, src.Size)
			if err != nil {
				return nil, err
			}
			r := make([]capture.Range, len(ext))
			for i, e := range ext {
				r[i] = capture.Range{Start: e.Start, End: e.End}
			}
			return capture.Chunks(r, w.ChunkSize(), src.Size), nil
		}
	}
	full := capture.Chunks(ranges, w.ChunkSize(), src.Size)
	if allocated != nil {
		if runs, err := allocated(); err == nil {
			full = runs
		} else {
			if !errors.Is(err, allocmap.ErrUnknown) {
				warn("cannot read the filesystem's allocation map (%v): reading the whole device", err)
			}
			allocated = nil
		}
	}
	prog := newProgress(cmd.ErrOrStderr(), "reading "+f.source, src.Size)
	opts := capture.Options{Source: src, Writer: progressWriter{w, prog}, Full: full, FullScan: true, Allocated: allocated}

	var tracker *blocktrace.Tracker
	if freeze {
		blocktrace.RemoveStale()
		tracker, err = blocktrace.Start(blocktrace.Config{Disk: vol.Disk, Start: vol.Start, Sectors: src.Size / 512, ChunkSize: w.ChunkSize()})
		if err != nil {
			warn("%v; without tracking the device cannot be read while frozen, so the snapshot is crash-consistent", err)
			freeze = false
		} else {
			defer tracker.Close()
			opts.Tracker = tracker
		}
	}
	consistency := chain.ConsistencyCrash
	if freeze {
		consistency = chain.ConsistencyFSFrozen
		opts.Sync = capture.SyncMounts(mounts)
		opts.Freeze = freezer(mounts, f.maxFreeze, g.logHold)
		opts.FinalReadHook = testFreezeHook()
	}
	res, err := capture.Run(ctx, opts)
	prog.done()
	if errors.Is(err, fsfreeze.ErrNotSupported) {
		warn("%v: taking a crash-consistent snapshot instead", err)
		consistency = chain.ConsistencyCrash
		opts.Freeze, opts.Tracker = nil, nil
		res, err = capture.Run(ctx, opts)
	}
	if err != nil {
		return fmt.Errorf("snapshot of %s failed, nothing was committed: %w", f.source, err)
	}
	w.Snapshot().Consistency = consistency
	ws := w.Stats()
	info := map[string]any{"tracking": res.Tracking, "rounds": res.Rounds, "bytes_read": res.BytesRead,
		"freeze_ms": ms(res.Freeze), "final_chunks": res.FinalChunks, "unread_allocated_chunks": res.Unread, "duration_ms": time.Since(start).Milliseconds()}
	if len(res.Gaps) > 0 {
		info["tracking_gaps"] = res.Gaps
	}
	s, err := w.Commit(ctx, info, nil)
	if err != nil {
		return fmt.Errorf("snapshot of %s failed, nothing was committed: %w", f.source, err)
	}
	committed = true
	ws = w.Stats()
	if f.asJSON {
		return printJSON(cmd, snapshotJSON{listEntry: toListEntry(s), Tracking: res.Tracking, Rounds: res.Rounds,
			FreezeMS: ms(res.Freeze), BytesRead: res.BytesRead, BytesStored: ws.DataBytes + ws.TreeBytes,
			MetadataBytes: ws.MetadataBytes, ChunksStored: ws.ChunksStored, FinalChunks: res.FinalChunks,
			DurationMS: time.Since(start).Milliseconds(), Warnings: warnings})
	}
	frozen := ""
	if res.Frozen {
		frozen = fmt.Sprintf(", frozen %.1f ms", ms(res.Freeze))
	}
	fmt.Fprintf(cmd.OutOrStdout(), "snapshot %s/%s (%s, %s): %s volume, read %s in %d rounds, %s new in %s%s\n",
		s.Volume, s.Name, s.ID[:12], s.Consistency, humanize.IBytes(uint64(s.SizeBytes)), humanize.IBytes(uint64(res.BytesRead)),
		res.Rounds, humanize.IBytes(uint64(s.NewBytes)), time.Since(start).Round(time.Millisecond), frozen)
	return nil
}

// testFreezeHook is a seam for the end-to-end tests, which must observe the device at the
// freeze instant: STASIS_TEST_FREEZE_HOOK is a shell command run inside the freeze window
// (it must not write to the frozen filesystems), STASIS_TEST_HOLD_FREEZE a duration to wait
// there. Neither is meant for users.
func testFreezeHook() func() {
	hook := os.Getenv("STASIS_TEST_FREEZE_HOOK")
	hold, _ := time.ParseDuration(os.Getenv("STASIS_TEST_HOLD_FREEZE"))
	if hook == "" && hold == 0 {
		return nil
	}
	return func() {
		if hook != "" {
			exec.Command("sh", "-c", hook).Run()
		}
		time.Sleep(hold)
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// freezer freezes mounts under a guard, holding log output while they are frozen: stderr
// may be a file on one of them.
func freezer(mounts []string, maxFreeze time.Duration, hold *holdHandler) capture.Freezer {
	return func() (func() (time.Duration, error), error) {
		exe, err := os.Executable()
		if err != nil {
			return nil, err
		}
		hold.hold()
		fz, err := fsfreeze.Freeze(mounts, fsfreeze.Options{MaxFreeze: maxFreeze, GuardCommand: []string{exe, "freeze-guard"}})
		if err != nil {
			hold.release()
			return nil, err
		}
		return func() (time.Duration, error) {
			d, err := fz.Thaw()
			hold.release()
			if errors.Is(err, fsfreeze.ErrTimeout) {
				err = fmt.Errorf("the filesystems stayed frozen for --max-freeze %s, so they were thawed and this attempt discarded (the device is too busy, or reads too slow; raise --max-freeze or retry): %w", maxFreeze, err)
			}
			return d, err
		}, nil
	}
}

// progressWriter counts bytes Put for the progress line.
type progressWriter struct {
	*chain.SnapshotWriter
	p *progress
}

func (w progressWriter) Put(ctx context.Context, i int64, data []byte) error {
	err := w.SnapshotWriter.Put(ctx, i, data)
	w.p.add(int64(len(data)))
	return err
}

package capture

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/bits-and-blooms/bitset"
	"golang.org/x/sys/unix"
)

// Writer is what capture needs of a snapshot writer.
type Writer interface {
	ChunkWriter
	// WaitSaved returns when the writer has no I/O in flight, so nothing is written while
	// the filesystems are frozen (the repository may be on one of them).
	WaitSaved(ctx context.Context) error
}

// Tracker reports the chunks written since its previous Take. blocktrace.Tracker is one.
type Tracker interface {
	// Take returns the dirty chunks and clears them; a non-empty gap means writes may
	// have been missed, and every chunk must be treated as dirty.
	Take() (dirty *bitset.BitSet, gap string)
	// Drain waits until every write completed before the call is in the dirty set.
	Drain(ctx context.Context) error
}

// Freezer freezes the volume's filesystems. thaw MUST be called exactly once and returns how
// long they were frozen; it fails if the freeze hit its time limit.
type Freezer func() (thaw func() (time.Duration, error), err error)

// Options describe one capture.
type Options struct {
	Source *Source
	Writer Writer
	// Full lists what a full scan reads: every chunk that may hold data.
	Full []ChunkRun
	// Tracker, if not nil, has been tracking the device; Run takes its dirty sets. With a
	// Tracker and FullScan false, round 0 reads only what the tracker reports.
	Tracker  Tracker
	FullScan bool
	// Freeze, if not nil, makes the final round point-in-time: it needs a Tracker.
	Freeze Freezer
	// Quiesce runs just before the freeze (application hooks, database locks); the
	// returned release runs right after the thaw, also on failure.
	Quiesce func(ctx context.Context) (release func(), err error)
	// Sync flushes the filesystems' dirty pages before the final round, so the freeze
	// itself has little left to write and the final dirty set stays small.
	Sync func() error
	// MaxRounds bounds pre-copy rounds after round 0 (default 4); SmallEnough is the dirty
	// set at which pre-copying stops (default 256 chunks); MaxHeld bounds the chunks the
	// final round holds in memory (default 4096).
	MaxRounds   int
	SmallEnough int
	MaxHeld     int
	// FinalReadHook, if set, runs inside the freeze window before the final read (tests).
	FinalReadHook func()
	// Allocated, if set, re-reads the filesystems' allocation maps. After a full scan Run
	// calls it while frozen, when the maps on disk are exact, and also reads any allocated
	// chunk that no round has read: Full came from maps read while the filesystem was live,
	// which may lag behind (ext4 updates bitmaps in place only at journal checkpoints). A
	// tracked incremental without gaps needs no check: every write since the previous
	// freeze, when the maps were exact, is in the dirty sets.
	Allocated func() ([]ChunkRun, error)
}

// Result says how a capture went; it goes into the snapshot manifest.
type Result struct {
	Tracking    string        // "tracked" or "full-scan"
	Rounds      int           // reading rounds, the final one included
	BytesRead   int64         // bytes read from the source
	Frozen      bool          // the final round ran under a freeze
	Freeze      time.Duration // FIFREEZE of the first filesystem to FITHAW of the last
	FinalChunks int           // chunks read while frozen
	Unread      int           // allocated chunks no round had read, found by the check under the freeze
	Gaps        []string      // why tracking fell back to a full scan
}

// ErrFinalRound is wrapped when the frozen final round could not complete cleanly.
var ErrFinalRound = errors.New("final capture round failed")

// Run captures the source into the writer. With Freeze set, the result equals the device at
// the instant the freeze completed: see docs/CONSISTENCY.md for why.
func Run(ctx context.Context, o Options) (Result, error) {
	if o.MaxRounds == 0 {
		o.MaxRounds = 4
	}
	if o.SmallEnough == 0 {
		o.SmallEnough = 256
	}
	if o.MaxHeld == 0 {
		o.MaxHeld = 4096
	}
	res := Result{Tracking: "tracked"}
	everRead := bitset.New(uint((o.Source.Size + int64(o.Writer.ChunkSize()) - 1) / int64(o.Writer.ChunkSize())))
	var extra []ChunkRun // allocated chunks found unread under a previous freeze
	read := func(runs []ChunkRun) error {
		for _, r := range runs {
			for c := r.Start; c < r.End; c++ {
				everRead.Set(uint(c))
			}
		}
		st, err := Copy(ctx, o.Source, o.Writer, runs)
		res.BytesRead += st.BytesRead
		res.Rounds++
		return err
	}
	full := func(why string) error {
		res.Tracking = "full-scan"
		if why != "" {
			res.Gaps = append(res.Gaps, why)
		}
		return read(o.Full)
	}
	// Round 0.
	if o.FullScan || o.Tracker == nil {
		if err := full(""); err != nil {
			return res, err
		}
	} else {
		dirty, gap := o.Tracker.Take()
		var err error
		if gap != "" {
			err = full(gap)
		} else {
			err = read(Runs(dirty))
		}
		if err != nil {
			return res, err
		}
	}
	if o.Freeze == nil || o.Tracker == nil {
		return res, nil
	}
	// Pre-copy: re-read what was written meanwhile until little is left.
	for r := 0; r < o.MaxRounds; r++ {
		if err := o.Tracker.Drain(ctx); err != nil {
			return res, err
		}
		dirty, gap := o.Tracker.Take()
		if gap != "" {
			if err := full(gap); err != nil {
				return res, err
			}
			continue
		}
		if int(dirty.Count()) <= o.SmallEnough {
			if err := read(Runs(dirty)); err != nil {
				return res, err
			}
			break
		}
		if err := read(Runs(dirty)); err != nil {
			return res, err
		}
	}
	// Final round, tried a few times: a gap or too many dirty chunks under the freeze
	// thaws, pre-copies once more and tries again.
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		if o.Sync != nil {
			if err := o.Sync(); err != nil {
				return res, fmt.Errorf("sync filesystems: %w", err)
			}
		}
		if err := o.Tracker.Drain(ctx); err != nil {
			return res, err
		}
		if dirty, gap := o.Tracker.Take(); gap != "" {
			if err := full(gap); err != nil {
				return res, err
			}
		} else {
			for _, r := range extra {
				for c := r.Start; c < r.End; c++ {
					dirty.Set(uint(c))
				}
			}
			extra = nil
			if err := read(Runs(dirty)); err != nil {
				return res, err
			}
		}
		if err := o.Writer.WaitSaved(ctx); err != nil {
			return res, err
		}
		held, err := finalRound(ctx, o, &res, everRead, &extra)
		if err == nil {
			for _, h := range held.chunks {
				if err := o.Writer.Put(ctx, h.index, h.data); err != nil {
					held.free()
					return res, err
				}
			}
			held.free()
			return res, nil
		}
		lastErr = err
		if !errors.Is(err, errRetry) {
			return res, err
		}
	}
	return res, fmt.Errorf("%w: %v", ErrFinalRound, lastErr)
}

var errRetry = errors.New("retry the final round")

type heldChunk struct {
	index int64
	data  []byte
}

type heldChunks struct {
	mem    []byte
	chunks []heldChunk
}

func (h *heldChunks) free() {
	if h.mem != nil {
		unix.Munmap(h.mem)
		h.mem = nil
	}
}

// finalRound quiesces, freezes, reads the last dirty chunks into memory and thaws. Between
// freeze and thaw it does no I/O but reading the source, and allocates nothing large.
func finalRound(ctx context.Context, o Options, res *Result, everRead *bitset.BitSet, extra *[]ChunkRun) (*heldChunks, error) {
	var release func()
	if o.Quiesce != nil {
		var err error
		if release, err = o.Quiesce(ctx); err != nil {
			return nil, err
		}
	}
	// Memory for the held chunks is mapped before the freeze.
	cs := int64(o.Writer.ChunkSize())
	mem, err := unix.Mmap(-1, 0, int(int64(o.MaxHeld)*cs), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		if release != nil {
			release()
		}
		return nil, fmt.Errorf("allocate final-round memory: %w", err)
	}
	held := &heldChunks{mem: mem}
	thaw, err := o.Freeze()
	if err != nil {
		held.free()
		if release != nil {
			release()
		}
		return nil, err
	}
	readErr := func() error {
		if o.FinalReadHook != nil {
			o.FinalReadHook()
		}
		dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		if err := o.Tracker.Drain(dctx); err != nil {
			return err
		}
		dirty, gap := o.Tracker.Take()
		if gap != "" {
			return fmt.Errorf("%w: %s", errRetry, gap)
		}
		if o.Allocated != nil && res.Tracking == "full-scan" {
			alloc, err := o.Allocated()
			if err != nil {
				return fmt.Errorf("read allocation maps while frozen: %w", err)
			}
			var missing []ChunkRun
			for _, r := range alloc {
				for c := r.Start; c < r.End; c++ {
					if !everRead.Test(uint(c)) && !dirty.Test(uint(c)) {
						dirty.Set(uint(c))
						missing = append(missing, ChunkRun{c, c + 1})
					}
				}
			}
			res.Unread += len(missing)
			if int(dirty.Count()) > o.MaxHeld {
				*extra = missing // read them before the next attempt
			}
		}
		if int(dirty.Count()) > o.MaxHeld {
			return fmt.Errorf("%w: %d chunks to read while frozen (more than %d)", errRetry, dirty.Count(), o.MaxHeld)
		}
		off := int64(0)
		for i, ok := dirty.NextSet(0); ok; i, ok = dirty.NextSet(i + 1) {
			idx := int64(i)
			n := min(cs, o.Source.Size-idx*cs)
			if n <= 0 {
				continue
			}
			buf := mem[off : off+alignUp(n, 4096)]
			got, err := o.Source.f.ReadAt(buf, idx*cs)
			if int64(got) < n {
				return fmt.Errorf("read %s at %d: %v", o.Source.Path, idx*cs, err)
			}
			held.chunks = append(held.chunks, heldChunk{index: idx, data: buf[:n]})
			res.BytesRead += n
			off += alignUp(n, 4096)
		}
		return nil
	}()
	frozenFor, thawErr := thaw()
	if release != nil {
		release()
	}
	res.Freeze = frozenFor
	res.Frozen = true
	res.Rounds++
	res.FinalChunks = len(held.chunks)
	if readErr == nil {
		readErr = thawErr
	}
	if readErr != nil {
		held.free()
		return nil, readErr
	}
	return held, nil
}

// Runs turns a dirty set into sorted chunk runs.
func Runs(dirty *bitset.BitSet) []ChunkRun {
	var runs []ChunkRun
	for i, ok := dirty.NextSet(0); ok; i, ok = dirty.NextSet(i + 1) {
		c := int64(i)
		if n := len(runs); n > 0 && runs[n-1].End == c {
			runs[n-1].End++
			continue
		}
		runs = append(runs, ChunkRun{c, c + 1})
	}
	return runs
}

// SyncMounts returns a Sync function that calls syncfs(2) on each mount point.
func SyncMounts(points []string) func() error {
	return func() error {
		for _, p := range points {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			err = unix.Syncfs(int(f.Fd()))
			f.Close()
			if err != nil {
				return fmt.Errorf("syncfs %s: %w", p, err)
			}
		}
		return nil
	}
}

package capture

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"time"
	"unsafe"

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

// Tracker reports the chunks written since its previous Take, and proves that it sees the
// device's I/O at all. blocktrace.Tracker is one.
type Tracker interface {
	// Take returns the dirty chunks and clears them; a non-empty gap means writes may
	// have been missed, and every chunk must be treated as dirty.
	Take() (dirty *bitset.BitSet, gap string)
	// Drain waits until every write completed before the call is in the dirty set.
	Drain(ctx context.Context) error
	// ExpectReads announces byte ranges about to be read from the device; after reading
	// them and Drain, CheckReads fails unless the tracker saw reads covering them all.
	ExpectReads(ranges []Range)
	CheckReads() error
	// CheckWrites fails if the kernel counted more writes to the device than the tracker
	// saw. Meaningful after Drain while nothing writes (under the freeze).
	CheckWrites() error
}

// Freezer freezes the filesystems of every member. thaw MUST be called exactly once and
// returns how long they were frozen; it fails if the freeze hit its time limit or if the
// filesystems did not stay frozen (someone else thawed them): then the window proves
// nothing.
type Freezer func() (thaw func() (time.Duration, error), err error)

// Member is one volume of a capture: a volume alone, or one of a consistency group whose
// volumes are all frozen in one window.
type Member struct {
	Name   string // for messages
	Source *Source
	Writer Writer
	// Full lists what a full scan reads: every chunk that may hold data.
	Full []ChunkRun
	// Tracker, if not nil, has been tracking the device; Run takes its dirty sets once it
	// has proven it sees the device. With a Tracker and FullScan false, round 0 reads only
	// what the tracker reports.
	Tracker  Tracker
	FullScan bool
	// Sync flushes the member's filesystems' dirty pages before the final round, so the
	// freeze itself has little left to write and the final dirty set stays small.
	Sync func() error
	// Allocated, if set, re-reads the filesystems' allocation maps. Under the freeze the
	// maps on disk are exact: after a full scan Run reads any allocated chunk that no round
	// has read (Full came from maps read while the filesystem was live, which may lag:
	// ext4 updates bitmaps in place only at journal checkpoints), and an untracked member
	// reads exactly what they list. A tracked incremental without gaps needs no check:
	// every write since the previous freeze, when the maps were exact, is in the dirty sets.
	Allocated func() ([]ChunkRun, error)
	// ReadLimit, if set, paces every read of the rounds before the freeze (max_read_rate),
	// so a snapshot leaves the disk to the applications. The final round, under the freeze,
	// never waits for it: it reads at full speed.
	ReadLimit Limiter
}

// Limiter paces reads: WaitN blocks until n more bytes may be read (rate.Limiter).
type Limiter interface {
	WaitN(ctx context.Context, n int) error
}

// Options describe one capture.
type Options struct {
	Members []*Member
	// Freeze, if not nil, makes the final round point-in-time for every member whose
	// tracker is proven, and for untracked members whose whole allocated data can be
	// re-read within MaxFreeze.
	Freeze Freezer
	// MaxFreeze is the freeze's time limit (the Freezer enforces it); Run uses it to decide
	// whether a frozen full read of an untracked member can fit. Default 5 s.
	MaxFreeze time.Duration
	// Boost, if set, raises the capture's priority for the final round (the lock, the
	// freeze, the thaw, the release) and returns what lowers it again.
	Boost func() (restore func())
	// Quiesce runs just before the freeze (application hooks, database locks); the
	// returned release runs right after the thaw, also on failure.
	Quiesce func(ctx context.Context) (release func(), err error)
	// MaxRounds bounds pre-copy rounds after round 0 (default 4); SmallEnough is the dirty
	// set at which pre-copying stops (default 256 chunks); MaxHeld bounds the chunks the
	// final round holds in memory, for all members together (default 4096).
	MaxRounds   int
	SmallEnough int
	MaxHeld     int
	// FinalReadHook, if set, runs inside the freeze window before the final read (tests).
	FinalReadHook func()
}

// Tracking modes, as results and manifests report them.
const (
	Tracked   = "tracked"   // a proven tracker; round 0 read only what it reported
	FullScan  = "full-scan" // a proven tracker, but round 0 read everything (first snapshot, gap)
	Untracked = "untracked" // no usable tracker: full hash-compared reads, frozen only if they fit
)

// Result says how one member's capture went; it goes into the snapshot manifest.
type Result struct {
	Tracking  string // Tracked, FullScan or Untracked
	Untracked string // why no tracker could be used (Tracking == Untracked)
	Rounds    int    // reading rounds, the final one included
	BytesRead int64  // bytes read from the source
	// Frozen: the snapshot equals the device at the freeze instant.
	Frozen      bool
	NotFrozen   string        // why not, when a freeze was asked for
	Freeze      time.Duration // FIFREEZE of the first filesystem to FITHAW of the last
	FinalChunks int           // chunks read while frozen and held
	FinalRead   int64         // bytes read while frozen
	Unread      int           // allocated chunks no round had read, found under the freeze
	Gaps        []string      // why tracking fell back to a full scan
}

// ErrFinalRound is wrapped when the frozen final round could not complete cleanly.
var ErrFinalRound = errors.New("final capture round failed")

// errRetry marks a final-round attempt to thaw, re-read and try again.
var errRetry = errors.New("retry the final round")

// maxReadRate bounds how fast any disk is assumed to read when deciding whether a frozen
// full read could fit a freeze window, before one has been measured.
const maxReadRate = 4 << 30

// member is one member's state during Run.
type member struct {
	*Member
	res      Result
	tracked  bool           // the tracker is proven and in use
	everRead *bitset.BitSet // chunks read in some round (for the Unread check)
	// carry is what a failed final-round attempt took from the tracker and did not store;
	// carryGap, a gap it found. The next attempt reads them before freezing again.
	carry    *bitset.BitSet
	carryGap string
	fp       *fingerprints // of every chunk read, for an untracked frozen read; nil if none
	fpFull   bool          // fp covers a full read
	rate     float64       // bytes per second of the last full read
	// lastDirty is how many chunks the round before the final one read: about what the
	// final round will hold.
	lastDirty int64
}

// Run captures every member. With Freeze set, each member whose Result says Frozen equals
// its device at the instant the freeze completed (see docs/CONSISTENCY.md), and all such
// members of one Run share that instant.
func Run(ctx context.Context, o Options) ([]Result, error) {
	if o.MaxRounds == 0 {
		o.MaxRounds = 4
	}
	if o.SmallEnough == 0 {
		o.SmallEnough = 256
	}
	if o.MaxHeld == 0 {
		o.MaxHeld = 4096
	}
	if o.MaxFreeze == 0 {
		o.MaxFreeze = 5 * time.Second
	}
	ms := make([]*member, len(o.Members))
	for i, m := range o.Members {
		ms[i] = &member{Member: m, tracked: m.Tracker != nil,
			everRead: bitset.New(uint(chunkCount(m.Source.Size, m.Writer.ChunkSize())))}
		if o.Freeze != nil && ms[i].fullBytes() <= int64(o.MaxFreeze.Seconds()*maxReadRate) {
			ms[i].fp = newFingerprints(m.Full)
		}
	}
	results := func() []Result {
		out := make([]Result, len(ms))
		for i, m := range ms {
			out[i] = m.res
		}
		return out
	}
	for _, m := range ms {
		if err := m.round0(ctx); err != nil {
			return results(), err
		}
	}
	if o.Freeze == nil {
		for _, m := range ms {
			m.res.NotFrozen = "no freeze was asked for"
		}
		return results(), nil
	}
	for _, m := range ms {
		if err := m.precopy(ctx, o); err != nil {
			return results(), err
		}
	}
	// Final round, tried a few times: a gap or too many dirty chunks under the freeze
	// thaws, pre-copies once more and tries again.
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		for _, m := range ms {
			if err := m.prepareFinal(ctx); err != nil {
				return results(), err
			}
		}
		for _, m := range ms {
			if err := m.Writer.WaitSaved(ctx); err != nil {
				return results(), err
			}
		}
		held, err := finalRound(ctx, o, ms)
		if err == nil {
			defer held.free()
			for _, h := range held.chunks {
				if err := h.m.Writer.Put(ctx, h.index, h.data); err != nil {
					return results(), err
				}
			}
			return results(), nil
		}
		lastErr = err
		if !errors.Is(err, errRetry) {
			return results(), err
		}
	}
	return results(), fmt.Errorf("%w: %v", ErrFinalRound, lastErr)
}

func chunkCount(size int64, cs int) int64 { return (size + int64(cs) - 1) / int64(cs) }

// fullBytes is what a full read of the member reads.
func (m *member) fullBytes() int64 {
	var n int64
	for _, r := range m.Full {
		n += r.End - r.Start
	}
	return n * int64(m.Writer.ChunkSize())
}

// read reads runs in one round. With expect, the tracker must see every read (round 0).
func (m *member) read(ctx context.Context, runs []ChunkRun, expect bool) error {
	for _, r := range runs {
		for c := r.Start; c < r.End; c++ {
			m.everRead.Set(uint(c))
		}
	}
	expect = expect && m.tracked && len(runs) > 0
	if expect {
		m.Tracker.ExpectReads(m.byteRanges(runs))
	}
	// Fingerprints serve only once they cover a full read (the frozen compare of an untracked
	// member): a tracked member's reads of dirty chunks are not fingerprinted until then.
	full := sameRuns(runs, m.Full)
	var w ChunkWriter = m.Writer
	if m.fp != nil && (m.fpFull || full) {
		w = fingerprintingWriter{m.Writer, m.fp}
	}
	start := time.Now()
	st, err := Copy(ctx, m.Source, w, runs, m.ReadLimit)
	m.res.BytesRead += st.BytesRead
	m.res.Rounds++
	if err != nil {
		return err
	}
	if d := time.Since(start).Seconds(); full && d > 0 {
		m.rate = float64(st.BytesRead) / d
		m.fpFull = m.fp != nil
	}
	if expect {
		if err := m.Tracker.Drain(ctx); err != nil {
			return err
		}
		if err := m.Tracker.CheckReads(); err != nil {
			m.demote(fmt.Sprintf("its own reads of round 0 were not all seen: %v", err))
		}
	}
	return nil
}

func sameRuns(a, b []ChunkRun) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// byteRanges converts chunk runs to the device byte ranges they cover.
func (m *member) byteRanges(runs []ChunkRun) []Range {
	cs := int64(m.Writer.ChunkSize())
	out := make([]Range, 0, len(runs))
	for _, r := range runs {
		out = append(out, Range{r.Start * cs, min(r.End*cs, m.Source.Size)})
	}
	return out
}

// demote stops trusting the tracker for the rest of this capture.
func (m *member) demote(why string) {
	if !m.tracked {
		return
	}
	m.tracked = false
	m.res.Tracking, m.res.Untracked = Untracked, why
}

// prove makes a read of one chunk of its own and checks that the tracker saw it: a tracked
// incremental that reads nothing would otherwise prove nothing about the device.
func (m *member) prove(ctx context.Context) error {
	cs := int64(m.Writer.ChunkSize())
	chunk := int64(0)
	if n := m.fullBytes() / cs; n > 0 {
		k := rand.Int64N(n)
		for _, r := range m.Full {
			if k < r.End-r.Start {
				chunk = r.Start + k
				break
			}
			k -= r.End - r.Start
		}
	}
	buf, err := alignedBuffer(int(cs))
	if err != nil {
		return err
	}
	defer unix.Munmap(buf)
	n := min(cs, m.Source.Size-chunk*cs)
	m.Tracker.ExpectReads([]Range{{chunk * cs, chunk*cs + n}})
	if err := m.Source.readDirect(buf[:alignUp(n, 4096)], chunk*cs); err != nil {
		return err
	}
	m.res.BytesRead += n
	if err := m.Tracker.Drain(ctx); err != nil {
		return err
	}
	if err := m.Tracker.CheckReads(); err != nil {
		m.demote(fmt.Sprintf("a proof read of chunk %d was not seen: %v", chunk, err))
	}
	return nil
}

// round0 proves the tracker, then reads what changed (tracked) or everything.
func (m *member) round0(ctx context.Context) error {
	m.res.Tracking = FullScan
	if m.tracked {
		if err := m.prove(ctx); err != nil {
			return err
		}
	}
	if !m.tracked {
		if m.Tracker == nil {
			m.res.Tracking, m.res.Untracked = Untracked, "no tracker"
		}
		return m.read(ctx, m.Full, false)
	}
	if m.FullScan {
		return m.read(ctx, m.Full, true)
	}
	dirty, gap := m.Tracker.Take()
	if gap != "" {
		return m.full(ctx, gap)
	}
	m.res.Tracking = Tracked
	if err := m.read(ctx, Runs(dirty), true); err != nil {
		return err
	}
	if !m.tracked {
		// The proof failed: the dirty set cannot be trusted; read everything.
		return m.read(ctx, m.Full, false)
	}
	return nil
}

// full re-reads everything after a tracking gap.
func (m *member) full(ctx context.Context, why string) error {
	if m.res.Tracking != Untracked {
		m.res.Tracking = FullScan
	}
	if why != "" {
		m.res.Gaps = append(m.res.Gaps, why)
	}
	return m.read(ctx, m.Full, false)
}

// precopy re-reads what was written meanwhile until little is left.
func (m *member) precopy(ctx context.Context, o Options) error {
	if !m.tracked {
		return nil
	}
	for r := 0; r < o.MaxRounds; r++ {
		if err := m.Tracker.Drain(ctx); err != nil {
			return err
		}
		dirty, gap := m.Tracker.Take()
		if gap != "" {
			if err := m.full(ctx, gap); err != nil {
				return err
			}
			continue
		}
		if err := m.read(ctx, Runs(dirty), false); err != nil {
			return err
		}
		if int(dirty.Count()) <= o.SmallEnough {
			break
		}
	}
	return nil
}

// prepareFinal runs before each final-round attempt: flush the filesystems, and read what
// changed since the last round so the frozen read stays small. An untracked member whose
// fingerprints do not cover a full read gets one now.
func (m *member) prepareFinal(ctx context.Context) error {
	if m.Sync != nil {
		if err := m.Sync(); err != nil {
			return fmt.Errorf("sync filesystems of %s: %w", m.Name, err)
		}
	}
	if !m.tracked {
		if m.fp != nil && !m.fpFull {
			return m.read(ctx, m.Full, false)
		}
		return nil
	}
	if err := m.Tracker.Drain(ctx); err != nil {
		return err
	}
	dirty, gap := m.Tracker.Take()
	if gap == "" {
		gap = m.carryGap
	}
	if gap != "" {
		m.carry, m.carryGap = nil, ""
		return m.full(ctx, gap)
	}
	if m.carry != nil {
		dirty.InPlaceUnion(m.carry)
	}
	m.lastDirty = int64(dirty.Count())
	if err := m.read(ctx, Runs(dirty), false); err != nil {
		return err
	}
	m.carry = nil
	return nil
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

// SyncMounts returns a Sync function that calls syncfs(2) on each mount point and, on
// ext4, checkpoints the journal: FIFREEZE does both, and what they leave undone it does
// while writers wait (a journal filled by a busy writer took FIFREEZE 5–12 ms here; after
// a checkpoint, 4–7 ms).
func SyncMounts(points []string) func() error {
	return func() error {
		for _, p := range points {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			err = unix.Syncfs(int(f.Fd()))
			if err == nil {
				checkpointJournal(int(f.Fd()))
			}
			f.Close()
			if err != nil {
				return fmt.Errorf("syncfs %s: %w", p, err)
			}
		}
		return nil
	}
}

// ext4IocCheckpoint is EXT4_IOC_CHECKPOINT, _IOW('f', 43, __u32) (Linux 5.13).
const ext4IocCheckpoint = 0x4004662b

// checkpointJournal writes an ext4 filesystem's journalled metadata to its home locations
// and empties the journal. It only saves the freeze work: where the kernel or the
// filesystem lacks it, nothing is lost.
func checkpointJournal(fd int) {
	var fs unix.Statfs_t
	if unix.Fstatfs(fd, &fs) != nil || fs.Type != unix.EXT4_SUPER_MAGIC {
		return
	}
	var flags uint32 // neither discard nor zero-out the journal: only checkpoint it
	unix.Syscall(unix.SYS_IOCTL, uintptr(fd), ext4IocCheckpoint, uintptr(unsafe.Pointer(&flags)))
}

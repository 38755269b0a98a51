package capture_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bits-and-blooms/bitset"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/capture"
	"github.com/stasis-project/stasis/test/testenv"
	"golang.org/x/sys/unix"
)

// fakeTracker is a scripted tracker for testing Run's round logic: each Take returns the
// next scripted answer; Drain applies the scripted writes to the source file first. Its
// proofs pass unless readsErr or writesErr say otherwise.
type fakeTracker struct {
	takes     []take
	n         int
	drain     func()
	readsErr  error
	writesErr func() error
	expected  [][]capture.Range
}

type take struct {
	dirty []uint
	gap   string
}

func (f *fakeTracker) Take() (*bitset.BitSet, string) {
	if f.n >= len(f.takes) {
		return bitset.New(0), ""
	}
	t := f.takes[f.n]
	f.n++
	b := bitset.New(0)
	for _, c := range t.dirty {
		b.Set(c)
	}
	return b, t.gap
}

func (f *fakeTracker) Drain(context.Context) error {
	if f.drain != nil {
		f.drain()
	}
	return nil
}

func (f *fakeTracker) ExpectReads(r []capture.Range) { f.expected = append(f.expected, r) }
func (f *fakeTracker) CheckReads() error             { return f.readsErr }
func (f *fakeTracker) CheckWrites() error {
	if f.writesErr != nil {
		return f.writesErr()
	}
	return nil
}

type fixture struct {
	r    *chain.Repository
	w    *chain.SnapshotWriter
	src  *capture.Source
	data []byte // what the source holds now
	file *os.File
}

func setup(t *testing.T) *fixture {
	t.Helper()
	ctx := context.Background()
	r := testenv.MemoryRepo(t)
	data := make([]byte, 4<<20)
	rand.New(rand.NewSource(1)).Read(data)
	path := filepath.Join(t.TempDir(), "src.img")
	os.WriteFile(path, data, 0o600)
	src, err := capture.OpenSource(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	w, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "v", Size: src.Size, ChunkSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	f, _ := os.OpenFile(path, os.O_RDWR, 0)
	t.Cleanup(func() { f.Close() })
	return &fixture{r: r, w: w, src: src, data: data, file: f}
}

// change writes n bytes of value v at chunk c, in the file and in the expected data.
func (fx *fixture) change(c int64, v byte) {
	copy(fx.data[c*65536:], bytes.Repeat([]byte{v}, 100))
	fx.file.WriteAt(fx.data[c*65536:c*65536+100], c*65536)
}

func (fx *fixture) member(tr capture.Tracker, fullScan bool) *capture.Member {
	m := &capture.Member{Name: "v", Source: fx.src, Writer: fx.w, Full: []capture.ChunkRun{{Start: 0, End: 64}}, FullScan: fullScan}
	if tr != nil {
		m.Tracker = tr
	}
	return m
}

// commitAndCompare commits the snapshot and checks it holds want.
func (fx *fixture) commitAndCompare(t *testing.T, want []byte) {
	t.Helper()
	s, err := fx.w.Commit(context.Background(), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, s.SizeBytes)
	if _, err := fx.r.SnapshotReader(s).ReadAt(context.Background(), out, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out, want) {
		t.Fatal("snapshot differs from the source at the freeze")
	}
}

// freezer counts freezes; atFreeze runs inside the window and may change the source (it
// stands for the state the freeze captures: later changes must not be in the snapshot).
func freezer(count *int, atFreeze func()) capture.Freezer {
	return func() (func() (time.Duration, error), error) {
		*count++
		if atFreeze != nil {
			atFreeze()
		}
		return func() (time.Duration, error) { return time.Millisecond, nil }, nil
	}
}

// TestGapFallsBackToFullScan: a tracker gap between rounds makes Run re-read everything,
// and the result still matches the source as it was when frozen.
func TestGapFallsBackToFullScan(t *testing.T) {
	fx := setup(t)
	writes := 0
	tr := &fakeTracker{takes: []take{{gap: "3 trace events were lost"}, {dirty: []uint{1}}, {dirty: []uint{2}}, {dirty: []uint{5}}}}
	// Every Drain models writes that happened meanwhile: chunk 1, 2 and 5 change.
	tr.drain = func() {
		if writes < 3 {
			fx.change([]int64{1, 2, 5}[writes], byte(writes+1))
			writes++
		}
	}
	frozen := 0
	res, err := capture.Run(context.Background(), capture.Options{Members: []*capture.Member{fx.member(tr, true)}, Freeze: freezer(&frozen, nil)})
	if err != nil {
		t.Fatal(err)
	}
	r := res[0]
	if frozen != 1 || !r.Frozen || r.Tracking != capture.FullScan || len(r.Gaps) != 1 || r.Gaps[0] != "3 trace events were lost" {
		t.Fatalf("result %+v", r)
	}
	if r.BytesRead < 2*int64(len(fx.data)) {
		t.Fatalf("read %d bytes: the gap did not trigger a second full read", r.BytesRead)
	}
	fx.commitAndCompare(t, fx.data)
}

// TestFinalRoundFailures: a gap under the freeze retries; a freeze that times out fails the
// capture, and the writer can still be aborted cleanly.
func TestFinalRoundFailures(t *testing.T) {
	fx := setup(t)
	gaps := []take{{}, {gap: "x"}, {}, {gap: "y"}, {}, {gap: "z"}} // pre-copy, then every final round has a gap
	tr := &fakeTracker{takes: append([]take{{}}, gaps...)}
	thaws := 0
	_, err := capture.Run(context.Background(), capture.Options{Members: []*capture.Member{fx.member(tr, true)}, MaxRounds: 1,
		Freeze: func() (func() (time.Duration, error), error) {
			return func() (time.Duration, error) { thaws++; return time.Millisecond, nil }, nil
		},
	})
	if !errors.Is(err, capture.ErrFinalRound) || thaws != 3 {
		t.Fatalf("err %v after %d thaws; want ErrFinalRound after 3 attempts, each thawed", err, thaws)
	}
	fx.w.Abort()

	fx2 := setup(t)
	timeout := errors.New("freeze exceeded its time limit")
	_, err = capture.Run(context.Background(), capture.Options{Members: []*capture.Member{fx2.member(&fakeTracker{}, true)},
		Freeze: func() (func() (time.Duration, error), error) {
			return func() (time.Duration, error) { return 6 * time.Second, timeout }, nil
		},
	})
	if !errors.Is(err, timeout) {
		t.Fatalf("a timed-out freeze returned %v", err)
	}
	fx2.w.Abort()
}

// TestProofReads: every capture with a tracker first reads one chunk of its own and expects
// the tracker to see it, also when the tracked incremental has nothing to read.
func TestProofReads(t *testing.T) {
	fx := setup(t)
	tr := &fakeTracker{}
	frozen := 0
	res, err := capture.Run(context.Background(), capture.Options{Members: []*capture.Member{fx.member(tr, false)}, Freeze: freezer(&frozen, nil)})
	if err != nil {
		t.Fatal(err)
	}
	if res[0].Tracking != capture.Tracked || !res[0].Frozen || len(tr.expected) != 1 || len(tr.expected[0]) != 1 ||
		tr.expected[0][0].End-tr.expected[0][0].Start != 65536 {
		t.Fatalf("result %+v, expected reads %v: want one proof read of one chunk", res[0], tr.expected)
	}
	fx.w.Abort()
}

// TestUnprovenTracker: a tracker that does not see the proof read is not used: the member
// is read whole, and with a freeze re-read whole while frozen, holding what changed; the
// snapshot equals the device at the freeze, and says why it was not tracked.
func TestUnprovenTracker(t *testing.T) {
	fx := setup(t)
	tr := &fakeTracker{readsErr: errors.New("0 of 128 sectors read were reported")}
	// The tracker's (wrong) dirty sets would say nothing changed; chunk 9 changes before
	// the freeze and chunk 10 at it: both must be in the snapshot.
	tr.drain = func() { fx.change(9, 7) }
	frozen := 0
	var atFreeze []byte
	res, err := capture.Run(context.Background(), capture.Options{Members: []*capture.Member{fx.member(tr, false)},
		Freeze: freezer(&frozen, func() { fx.change(10, 8); atFreeze = append([]byte(nil), fx.data...) })})
	if err != nil {
		t.Fatal(err)
	}
	r := res[0]
	if r.Tracking != capture.Untracked || !strings.Contains(r.Untracked, "0 of 128 sectors") || !r.Frozen || frozen != 1 {
		t.Fatalf("result %+v", r)
	}
	if r.FinalRead < int64(len(fx.data)) || r.FinalChunks < 1 {
		t.Fatalf("frozen read %d bytes, held %d chunks: want the whole device read and chunk 10 held", r.FinalRead, r.FinalChunks)
	}
	fx.change(11, 9) // after the thaw: not in the snapshot
	fx.commitAndCompare(t, atFreeze)
}

// TestUntrackedTooLarge: an untracked member whose frozen full read would not fit max-freeze
// is not frozen at all (nor is its database locked): the snapshot is crash-consistent and
// says why.
func TestUntrackedTooLarge(t *testing.T) {
	fx := setup(t)
	frozen, quiesced := 0, 0
	res, err := capture.Run(context.Background(), capture.Options{Members: []*capture.Member{fx.member(nil, true)},
		MaxFreeze: time.Nanosecond, Freeze: freezer(&frozen, nil),
		Quiesce: func(context.Context) (func(), error) { quiesced++; return func() {}, nil }})
	if err != nil {
		t.Fatal(err)
	}
	r := res[0]
	if frozen != 0 || quiesced != 0 || r.Frozen || r.Tracking != capture.Untracked || !strings.Contains(r.NotFrozen, "max-freeze") {
		t.Fatalf("frozen %d, quiesced %d, result %+v", frozen, quiesced, r)
	}
	fx.commitAndCompare(t, fx.data)
}

// TestMissedWritesDemote: when the kernel counted writes the tracker did not see (checked
// under the freeze), the attempt is retried with the member read whole and compared.
func TestMissedWritesDemote(t *testing.T) {
	fx := setup(t)
	missed := true
	tr := &fakeTracker{writesErr: func() error {
		if missed {
			return errors.New("the kernel counted 8 sectors written, the tracker saw 0")
		}
		return nil
	}}
	frozen := 0
	var atFreeze []byte
	res, err := capture.Run(context.Background(), capture.Options{Members: []*capture.Member{fx.member(tr, false)},
		Freeze: freezer(&frozen, func() { fx.change(3, byte(frozen)); atFreeze = append([]byte(nil), fx.data...) })})
	if err != nil {
		t.Fatal(err)
	}
	r := res[0]
	if frozen != 2 || r.Tracking != capture.Untracked || !strings.Contains(r.Untracked, "tracker saw 0") || !r.Frozen {
		t.Fatalf("freezes %d, result %+v", frozen, r)
	}
	fx.commitAndCompare(t, atFreeze)
}

// TestGroupOneFreeze: two members are frozen in one window; both snapshots hold the state at
// that instant.
func TestGroupOneFreeze(t *testing.T) {
	a, b := setup(t), setup(t)
	ta, tb := &fakeTracker{}, &fakeTracker{}
	ta.drain = func() { a.change(4, 1) } // written before the freeze: in the dirty set...
	ta.takes = []take{{}, {dirty: []uint{4}}, {dirty: []uint{4}}}
	frozen := 0
	var wantA, wantB []byte
	res, err := capture.Run(context.Background(), capture.Options{
		Members: []*capture.Member{a.member(ta, true), b.member(tb, true)},
		Freeze: freezer(&frozen, func() {
			wantA, wantB = append([]byte(nil), a.data...), append([]byte(nil), b.data...)
		})})
	if err != nil {
		t.Fatal(err)
	}
	if frozen != 1 || !res[0].Frozen || !res[1].Frozen || res[0].Freeze != res[1].Freeze {
		t.Fatalf("%d freezes, results %+v", frozen, res)
	}
	a.commitAndCompare(t, wantA)
	b.commitAndCompare(t, wantB)
}

// TestRetryKeepsTakenChunks: a final round that fails after taking the tracker's dirty set
// (here: someone thawed inside the window) does not lose it: the next attempt reads those
// chunks, though the tracker will not report them again.
func TestRetryKeepsTakenChunks(t *testing.T) {
	fx := setup(t)
	tr := &fakeTracker{}
	// precopy Take, prepare Take, then under the first freeze chunk 7 is reported (it was
	// written just before); nothing after.
	tr.takes = []take{{}, {}, {dirty: []uint{7}}}
	tr.drain = func() {
		if tr.n == 2 {
			fx.change(7, 42)
		}
	}
	thaws := 0
	var atFreeze []byte
	res, err := capture.Run(context.Background(), capture.Options{Members: []*capture.Member{fx.member(tr, true)},
		Freeze: func() (func() (time.Duration, error), error) {
			atFreeze = append([]byte(nil), fx.data...)
			return func() (time.Duration, error) {
				thaws++
				if thaws == 1 {
					return time.Millisecond, fmt.Errorf("%w: thawed by someone", capture.ErrWindowBroken)
				}
				return time.Millisecond, nil
			}, nil
		}})
	if err != nil || thaws != 2 || !res[0].Frozen {
		t.Fatalf("err %v, %d thaws, result %+v", err, thaws, res[0])
	}
	fx.commitAndCompare(t, atFreeze)
}

// recordingLimit records whether each wait happened inside the freeze window.
type recordingLimit struct {
	frozen        *bool
	calls, inside int
	bytes         int64
}

func (l *recordingLimit) WaitN(_ context.Context, n int) error {
	l.calls++
	l.bytes += int64(n)
	if *l.frozen {
		l.inside++
	}
	return nil
}

// TestReadLimitNeverInsideTheFreeze: max_read_rate paces round 0 and the pre-copy rounds,
// which read with the filesystems live, and never the final round under the freeze.
func TestReadLimitNeverInsideTheFreeze(t *testing.T) {
	fx := setup(t)
	tr := &fakeTracker{takes: []take{{dirty: []uint{3, 9}}, {dirty: []uint{3}}, {dirty: []uint{5, 6}}}}
	frozen := false
	limit := &recordingLimit{frozen: &frozen}
	m := fx.member(tr, true)
	m.ReadLimit = limit
	res, err := capture.Run(context.Background(), capture.Options{Members: []*capture.Member{m},
		Freeze: func() (func() (time.Duration, error), error) {
			frozen = true
			return func() (time.Duration, error) { frozen = false; return time.Millisecond, nil }, nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	if !res[0].Frozen || res[0].FinalChunks == 0 {
		t.Fatalf("the final round read nothing under a freeze: %+v", res[0])
	}
	if limit.calls == 0 || limit.bytes < 4<<20 {
		t.Fatalf("the limit paced %d reads of %d bytes: round 0 read the whole 4 MiB unpaced", limit.calls, limit.bytes)
	}
	if limit.inside != 0 {
		t.Fatalf("%d reads waited for the limit inside the freeze window", limit.inside)
	}
}

// TestReadLimitPaces: a real limit slows a read to its rate.
func TestReadLimitPaces(t *testing.T) {
	fx := setup(t)
	// 4 MiB at 2 MiB/s: the first read of up to 4 MiB goes at once, so read twice.
	limit := capture.NewReadLimit(2 << 20)
	start := time.Now()
	for i := 0; i < 2; i++ {
		if _, err := capture.Copy(context.Background(), fx.src, fx.w, []capture.ChunkRun{{Start: 0, End: 64}}, limit); err != nil {
			t.Fatal(err)
		}
	}
	if d := time.Since(start); d < 1500*time.Millisecond || d > 10*time.Second {
		t.Fatalf("8 MiB at 2 MiB/s with a 4 MiB burst took %v, want about 2 s", d)
	}
}

// TestSyncMountsCheckpointsJournal: the pre-freeze sync leaves an ext4 journal empty (its
// superblock's "Journal start" is 0), so FIFREEZE has no checkpoint to write while writers
// wait; syncfs alone leaves the journal's transactions in place.
func TestSyncMountsCheckpointsJournal(t *testing.T) {
	dev, _ := testenv.LoopDevice(t, 128<<20)
	testenv.Mkfs(t, "ext4", dev)
	mnt := testenv.Mount(t, dev)
	journalStart := func() string {
		out := testenv.Run(t, "dumpe2fs", "-h", dev)
		for _, line := range strings.Split(out, "\n") {
			if v, ok := strings.CutPrefix(line, "Journal start:"); ok {
				return strings.TrimSpace(v)
			}
		}
		t.Fatalf("dumpe2fs -h %s shows no journal start:\n%s", dev, out)
		return ""
	}
	for i := 0; i < 100; i++ {
		os.WriteFile(filepath.Join(mnt, fmt.Sprint(i)), []byte("metadata to journal"), 0o644)
	}
	f, err := os.Open(mnt)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	if got := journalStart(); got == "0" {
		t.Fatal("the journal is empty after syncfs alone: this test cannot tell a checkpoint from none")
	}
	if err := capture.SyncMounts([]string{mnt})(); err != nil {
		t.Fatal(err)
	}
	if got := journalStart(); got != "0" {
		t.Fatalf("journal start %s after SyncMounts, want 0 (checkpointed)", got)
	}
}

// TestSyncMountsOnFrozenFilesystem: the pre-freeze sync returns on a filesystem someone
// else froze (FIFREEZE then fails with a clear error) instead of waiting for their thaw.
func TestSyncMountsOnFrozenFilesystem(t *testing.T) {
	dev, _ := testenv.LoopDevice(t, 128<<20)
	testenv.Mkfs(t, "ext4", dev)
	mnt := testenv.Mount(t, dev) // its cleanup thaws first
	os.WriteFile(filepath.Join(mnt, "f"), []byte("journalled"), 0o644)
	testenv.Run(t, "fsfreeze", "-f", mnt)
	defer testenv.Run(t, "fsfreeze", "-u", mnt)
	done := make(chan error, 1)
	go func() { done <- capture.SyncMounts([]string{mnt})() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("SyncMounts waits on a filesystem frozen by someone else")
	}
}

// TestBoostSpansTheFinalRound: the priority boost starts before the applications' lock and
// ends after their release, around the freeze.
func TestBoostSpansTheFinalRound(t *testing.T) {
	fx := setup(t)
	var events []string
	m := fx.member(&fakeTracker{takes: []take{{dirty: []uint{3}}, {dirty: []uint{5}}}}, true)
	_, err := capture.Run(context.Background(), capture.Options{Members: []*capture.Member{m},
		Boost: func() func() {
			events = append(events, "boost")
			return func() { events = append(events, "unboost") }
		},
		Quiesce: func(context.Context) (func(), error) {
			events = append(events, "lock")
			return func() { events = append(events, "unlock") }, nil
		},
		Freeze: func() (func() (time.Duration, error), error) {
			events = append(events, "freeze")
			return func() (time.Duration, error) { events = append(events, "thaw"); return time.Millisecond, nil }, nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := strings.Join(events, " "), "boost lock freeze thaw unlock unboost"; got != want {
		t.Fatalf("final round: %s, want %s", got, want)
	}
	fx.commitAndCompare(t, fx.data)
}

package capture_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/bits-and-blooms/bitset"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/capture"
	"github.com/stasis-project/stasis/chain/memory"
)

// fakeTracker is a scripted tracker for testing Run's round logic: each Take returns the
// next scripted answer; Drain applies the scripted writes to the source file first.
type fakeTracker struct {
	takes []take
	n     int
	drain func()
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

func setup(t *testing.T) (*chain.Repository, *chain.SnapshotWriter, *capture.Source, []byte, string) {
	t.Helper()
	ctx := context.Background()
	be := memory.New()
	chain.Init(ctx, be)
	r, _ := chain.Open(ctx, be, nil)
	unlock, _ := r.Lock(ctx, "t")
	t.Cleanup(unlock)
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
	return r, w, src, data, path
}

func readBack(t *testing.T, r *chain.Repository, s *chain.Snapshot) []byte {
	out := make([]byte, s.SizeBytes)
	if _, err := r.Reader(s).ReadAt(context.Background(), out, 0); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestGapFallsBackToFullScan: a tracker gap between rounds makes Run re-read everything,
// and the result still matches the source as it was when frozen.
func TestGapFallsBackToFullScan(t *testing.T) {
	r, w, src, data, path := setup(t)
	f, _ := os.OpenFile(path, os.O_RDWR, 0)
	defer f.Close()
	writes := 0
	tr := &fakeTracker{
		takes: []take{{gap: "3 trace events were lost"}, {dirty: []uint{1}}, {dirty: []uint{2}}, {dirty: []uint{5}}},
	}
	// Every Drain models writes that happened meanwhile: chunk 1, 2 and 5 change.
	tr.drain = func() {
		if writes < 3 {
			c := []int64{1, 2, 5}[writes]
			copy(data[c*65536:], bytes.Repeat([]byte{byte(writes + 1)}, 100))
			f.WriteAt(data[c*65536:c*65536+100], c*65536)
			writes++
		}
	}
	frozen := false
	res, err := capture.Run(context.Background(), capture.Options{
		Source: src, Writer: w, Full: []capture.ChunkRun{{Start: 0, End: 64}}, Tracker: tr, FullScan: true,
		Freeze: func() (func() (time.Duration, error), error) {
			frozen = true
			return func() (time.Duration, error) { return time.Millisecond, nil }, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if !frozen || res.Tracking != "full-scan" || len(res.Gaps) != 1 || res.Gaps[0] != "3 trace events were lost" {
		t.Fatalf("result %+v", res)
	}
	if res.BytesRead < 2*int64(len(data)) {
		t.Fatalf("read %d bytes: the gap did not trigger a second full read", res.BytesRead)
	}
	s, err := w.Commit(context.Background(), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readBack(t, r, s), data) {
		t.Fatal("snapshot differs from the source at the freeze")
	}
}

// TestFinalRoundFailures: a gap under the freeze retries; a freeze that times out fails the
// capture, and the writer can still be aborted cleanly.
func TestFinalRoundFailures(t *testing.T) {
	_, w, src, _, _ := setup(t)
	gaps := []take{{}, {gap: "x"}, {}, {gap: "y"}, {}, {gap: "z"}} // pre-copy, then every final round has a gap
	tr := &fakeTracker{takes: append([]take{{}}, gaps...)}
	thaws := 0
	_, err := capture.Run(context.Background(), capture.Options{
		Source: src, Writer: w, Full: []capture.ChunkRun{{Start: 0, End: 64}}, Tracker: tr, FullScan: true, MaxRounds: 1,
		Freeze: func() (func() (time.Duration, error), error) {
			return func() (time.Duration, error) { thaws++; return time.Millisecond, nil }, nil
		},
	})
	if !errors.Is(err, capture.ErrFinalRound) || thaws != 3 {
		t.Fatalf("err %v after %d thaws; want ErrFinalRound after 3 attempts, each thawed", err, thaws)
	}
	w.Abort()

	_, w2, src2, _, _ := setup(t)
	timeout := errors.New("freeze exceeded its time limit")
	_, err = capture.Run(context.Background(), capture.Options{
		Source: src2, Writer: w2, Full: []capture.ChunkRun{{Start: 0, End: 64}}, Tracker: &fakeTracker{}, FullScan: true,
		Freeze: func() (func() (time.Duration, error), error) {
			return func() (time.Duration, error) { return 6 * time.Second, timeout }, nil
		},
	})
	if !errors.Is(err, timeout) {
		t.Fatalf("a timed-out freeze returned %v", err)
	}
	w2.Abort()
}

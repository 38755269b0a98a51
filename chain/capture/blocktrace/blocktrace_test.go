package blocktrace_test

import (
	"context"
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/stasis-project/stasis/chain/capture"
	"github.com/stasis-project/stasis/chain/capture/blocktrace"
	"github.com/stasis-project/stasis/test/testenv"
)

func devNum(t *testing.T, dev string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(dev, &st); err != nil {
		t.Fatal(err)
	}
	return st.Rdev
}

func startOn(t *testing.T, disk uint64, size int64, bufKiB int) *blocktrace.Tracker {
	t.Helper()
	testenv.RequireRoot(t)
	tr, err := blocktrace.Start(blocktrace.Config{Disk: disk, Sectors: size / 512, ChunkSize: 65536, BufferKiB: bufKiB})
	if err != nil {
		t.Fatalf("tracking unavailable: %v", err)
	}
	t.Cleanup(func() { tr.Close() })
	return tr
}

// devices returns a request-based (loop) and a bio-based (zram) device of size bytes.
func devices(t *testing.T, size int64) map[string]func(t *testing.T) string {
	return map[string]func(t *testing.T) string{
		"loop": func(t *testing.T) string { dev, _ := testenv.LoopDevice(t, size); return dev },
		"zram": func(t *testing.T) string { return testenv.ZramDevice(t, size) },
	}
}

func openDirect(t *testing.T, dev string) (*os.File, []byte) {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	buf, _ := unix.Mmap(-1, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	buf[0] = 1 // zram stores zero pages specially; write data
	return f, buf
}

// TestTracksCompletedWrites: exactly the chunks written are dirty after Drain, on a
// request-based and a bio-based device; the kernel's write count agrees.
func TestTracksCompletedWrites(t *testing.T) {
	const size = 64 << 20
	for name, mk := range devices(t, size) {
		t.Run(name, func(t *testing.T) {
			dev := mk(t)
			tr := startOn(t, devNum(t, dev), size, 0)
			f, buf := openDirect(t, dev)
			want := map[uint]bool{}
			for _, off := range []int64{0, 65536 * 7, 65536*100 + 4096, 65536*1023 - 4096} {
				if _, err := f.WriteAt(buf[:4096], off); err != nil {
					t.Fatal(err)
				}
				want[uint(off/65536)] = true
			}
			// A write straddling two chunks dirties both.
			f.WriteAt(buf[:8192], 65536*500-4096)
			want[499], want[500] = true, true
			if err := tr.Drain(context.Background()); err != nil {
				t.Fatal(err)
			}
			if err := tr.CheckWrites(); err != nil {
				t.Fatal(err)
			}
			dirty, gap := tr.Take()
			if gap != "" {
				t.Fatalf("unexpected gap: %s", gap)
			}
			if int(dirty.Count()) != len(want) {
				t.Fatalf("dirty chunks %v, want %v", dirty, want)
			}
			for c := range want {
				if !dirty.Test(c) {
					t.Errorf("chunk %d written but not dirty", c)
				}
			}
			// Reads are not writes; Take cleared the set.
			f.ReadAt(buf[:4096], 65536*300)
			tr.Drain(context.Background())
			if dirty, _ := tr.Take(); dirty.Count() != 0 {
				t.Fatalf("reads or old writes reported dirty: %v", dirty)
			}
		})
	}
}

// TestWriteZeroesIsAWrite: zeroing a range (BLKZEROOUT: write-zeroes, which the kernel's
// trace shows as "N" or "WZ") dirties it, like any operation that is not a read.
func TestWriteZeroesIsAWrite(t *testing.T) {
	testenv.RequireTool(t, "blkdiscard")
	const size = 64 << 20
	dev, _ := testenv.LoopDevice(t, size)
	tr := startOn(t, devNum(t, dev), size, 0)
	testenv.Run(t, "blkdiscard", "-z", "-o", "1048576", "-l", "1048576", dev)
	tr.Drain(context.Background())
	dirty, gap := tr.Take()
	if gap != "" || dirty.Count() != 16 || !dirty.Test(16) || !dirty.Test(31) {
		t.Fatalf("after zeroing chunks 16-31: dirty %v, gap %q", dirty, gap)
	}
}

// TestReadProof: reads the tracker was told to expect are seen in full; a range that was
// not read is not; and a tracker given the wrong device (so it sees no events at all)
// fails both proofs instead of reporting an empty, trusted dirty set.
func TestReadProof(t *testing.T) {
	const size = 64 << 20
	for name, mk := range devices(t, size) {
		t.Run(name, func(t *testing.T) {
			dev := mk(t)
			f, buf := openDirect(t, dev)
			check := func(tr *blocktrace.Tracker, read, expect capture.Range) error {
				tr.ExpectReads([]capture.Range{expect})
				for off := read.Start; off < read.End; off += int64(len(buf)) {
					if _, err := f.ReadAt(buf[:min(int64(len(buf)), read.End-off)], off); err != nil {
						t.Fatal(err)
					}
				}
				if err := tr.Drain(context.Background()); err != nil {
					t.Fatal(err)
				}
				return tr.CheckReads()
			}
			tr := startOn(t, devNum(t, dev), size, 0)
			if err := check(tr, capture.Range{Start: 1 << 20, End: 5 << 20}, capture.Range{Start: 1 << 20, End: 5 << 20}); err != nil {
				t.Fatalf("4 MiB read in 1 MiB pieces: %v", err)
			}
			if err := check(tr, capture.Range{Start: 8 << 20, End: 9 << 20}, capture.Range{Start: 8 << 20, End: 10 << 20}); !errors.Is(err, blocktrace.ErrUnproven) {
				t.Fatalf("half of the expected range read: %v, want ErrUnproven", err)
			}
			// A tracker of another device (the wrong device number): no events for ours.
			other := mk(t)
			wrong := startOn(t, devNum(t, other), size, 0)
			if err := check(wrong, capture.Range{Start: 0, End: 1 << 20}, capture.Range{Start: 0, End: 1 << 20}); !errors.Is(err, blocktrace.ErrUnproven) {
				t.Fatalf("tracker of another device: %v, want ErrUnproven", err)
			}
			// Its write check passes (nothing was written to the other device)...
			wrong.Drain(context.Background())
			if err := wrong.CheckWrites(); err != nil {
				t.Fatalf("other device, no writes: %v", err)
			}
			// ...but a tracker that missed writes to its device fails it: writes made while
			// the tracker's events were switched off stand for writes a driver does not
			// report.
			tr2 := startOn(t, devNum(t, other), size, 0)
			tr2.Pause(t)
			g, _ := os.OpenFile(other, os.O_RDWR|unix.O_DIRECT, 0)
			g.WriteAt(buf[:65536], 0)
			g.Close()
			tr2.Resume(t)
			tr2.Drain(context.Background())
			if err := tr2.CheckWrites(); !errors.Is(err, blocktrace.ErrUnproven) {
				t.Fatalf("writes the tracker did not see: %v, want ErrUnproven", err)
			}
		})
	}
}

package blocktrace_test

import (
	"context"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/stasis-project/stasis/chain/capture/blocktrace"
	"github.com/stasis-project/stasis/test/testenv"
)

func startOn(t *testing.T, dev string, size int64, bufKiB int) *blocktrace.Tracker {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(dev, &st); err != nil {
		t.Fatal(err)
	}
	tr, err := blocktrace.Start(blocktrace.Config{Disk: st.Rdev, Sectors: size / 512, ChunkSize: 65536, BufferKiB: bufKiB})
	if err != nil {
		t.Skipf("tracking unavailable here: %v", err)
	}
	t.Cleanup(func() { tr.Close() })
	return tr
}

// TestTracksCompletedWrites: exactly the chunks written (and synced) are dirty after Drain.
func TestTracksCompletedWrites(t *testing.T) {
	const size = 64 << 20
	dev, _ := testenv.LoopDevice(t, size)
	tr := startOn(t, dev, size, 0)
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf, _ := unix.Mmap(-1, 0, 8192, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
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
}

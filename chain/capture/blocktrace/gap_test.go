package blocktrace

import (
	"context"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stasis-project/stasis/test/testenv"
)

// TestOverrunIsAGap: when the ring buffer overflows (here: the reader is held up while a
// tiny buffer takes thousands of events), Take must report a gap instead of a partial set.
func TestOverrunIsAGap(t *testing.T) {
	const size = 256 << 20
	dev, _ := testenv.LoopDevice(t, size)
	var st unix.Stat_t
	unix.Stat(dev, &st)
	tr, err := Start(Config{Disk: st.Rdev, Sectors: size / 512, ChunkSize: 65536, BufferKiB: 4})
	if err != nil {
		t.Skipf("tracking unavailable here: %v", err)
	}
	defer tr.Close()
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf, _ := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	tr.mu.Lock() // the reader blocks on its first event; the kernel keeps recording
	time.Sleep(50 * time.Millisecond)
	for i := int64(0); i < 5000; i++ {
		f.WriteAt(buf, (i*7919%(size/4096))*4096)
	}
	tr.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tr.Drain(ctx)
	dirty, gap := tr.Take()
	if gap == "" {
		t.Fatalf("5000 writes through a 4 KiB buffer with a stalled reader: no gap reported, %d chunks dirty", dirty.Count())
	}
	t.Logf("gap: %s", gap)
	// After the gap is reported, tracking goes on normally.
	f.WriteAt(buf, 65536*3)
	tr.Drain(ctx)
	if d, gap := tr.Take(); gap != "" || !d.Test(3) {
		t.Fatalf("after a gap: dirty %v gap %q", d, gap)
	}
}

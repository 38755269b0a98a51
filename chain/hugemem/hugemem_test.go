package hugemem

import (
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestMap(t *testing.T) {
	for _, size := range []int{1, 4096, Page - 1, Page, 3*Page + 5, 40 << 20} {
		b, err := Map(size)
		if err != nil {
			t.Fatal(err)
		}
		if len(b) != size || cap(b)%Page != 0 || cap(b) < size {
			t.Fatalf("Map(%d): len %d cap %d", size, len(b), cap(b))
		}
		if p := uintptr(unsafe.Pointer(&b[0])); p%Page != 0 {
			t.Fatalf("Map(%d) at %#x, not aligned to a huge page", size, p)
		}
		full := b[:cap(b)]
		for i := range full {
			if full[i] != 0 {
				t.Fatalf("Map(%d): byte %d is %d, not zero", size, i, full[i])
			}
		}
		for i := range full {
			full[i] = byte(i)
		}
		Prefault(b, size)
		if err := Unmap(b[:0]); err != nil {
			t.Fatalf("Unmap after Map(%d): %v", size, err)
		}
	}
	if _, err := Map(0); err == nil {
		t.Fatal("Map(0) succeeded")
	}
}

// TestAdvise: advising Go heap buffers of any size and alignment is safe and leaves their
// contents alone.
func TestAdvise(t *testing.T) {
	for _, size := range []int{0, 1, 4096, Page - 1, Page, Page + 1, 3 * Page, 40 << 20} {
		for _, off := range []int{0, 1, 4095} {
			b := make([]byte, size+off)
			for i := range b {
				b[i] = byte(i)
			}
			Advise(b[off:])
			Advise(b[off:off]) // empty, with capacity
			for i := range b {
				if b[i] != byte(i) {
					t.Fatalf("size %d offset %d: byte %d changed", size, off, i)
				}
			}
		}
	}
}

// TestMake: a Make buffer starts on a huge page, holds n bytes, and (where transparent
// huge pages are on) fills in huge pages all through, where a plain make() of the same
// size is only partly huge-page aligned.
func TestMake(t *testing.T) {
	for _, n := range []int{1, Page, 4 << 20, 5<<20 + 3} {
		b := Make(n)
		if len(b) != 0 || cap(b) != n {
			t.Fatalf("Make(%d): len %d cap %d", n, len(b), cap(b))
		}
		b = b[:n]
		if p := uintptr(unsafe.Pointer(&b[0])); p%Page != 0 {
			t.Fatalf("Make(%d) at %#x, not aligned to a huge page", n, p)
		}
		for i := range b {
			if b[i] != 0 {
				t.Fatalf("Make(%d): byte %d is %d", n, i, b[i])
			}
			b[i] = byte(i)
		}
	}
}

// TestMakeFaults: touching a fresh 4 MiB Make buffer costs a fault per huge page, not
// one per 4 KiB page (1,024), where transparent huge pages are on. It runs in a new
// process: memory the runtime recycles is resident already and would fault not at all.
func TestMakeFaults(t *testing.T) {
	mode, err := os.ReadFile("/sys/kernel/mm/transparent_hugepage/enabled")
	if err != nil || strings.Contains(string(mode), "[never]") {
		t.Skip("transparent huge pages are off here")
	}
	if raceEnabled {
		t.Skip("the race detector's shadow memory adds faults of its own")
	}
	if os.Getenv("HUGEMEM_CHILD") == "" {
		cmd := exec.Command(os.Args[0], "-test.run=^TestMakeFaults$", "-test.v")
		cmd.Env = append(os.Environ(), "HUGEMEM_CHILD=1")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		return
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	for _, mk := range []struct {
		name string
		b    func() []byte
		max  int64
	}{
		{"Make", func() []byte { return Make(4 << 20)[:4<<20] }, 16},
		{"make (the control)", func() []byte { return make([]byte, 4<<20) }, 1 << 20},
	} {
		b := mk.b()
		before := threadFaults(t)
		for i := 0; i < len(b); i += 4096 {
			b[i] = 1
		}
		faults := threadFaults(t) - before
		t.Logf("%s: %d faults", mk.name, faults)
		if faults > mk.max {
			t.Errorf("touching a fresh 4 MiB %s buffer took %d page faults", mk.name, faults)
		}
		runtime.KeepAlive(b)
	}
}

// threadFaults counts the calling thread's minor page faults so far.
func threadFaults(t *testing.T) int64 {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		t.Fatal(err)
	}
	return ru.Minflt
}

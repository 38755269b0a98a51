package chain

import (
	"testing"
	"time"
)

// TestBufferList: put buffers come back from get (no new memory to fault in), at most
// keep of them are kept, foreign sizes are refused, and an idle list lets them go.
func TestBufferList(t *testing.T) {
	l := &bufferList{size: 1 << 20, keep: 2, idle: 100 * time.Millisecond}
	a, b, c := l.get(), l.get(), l.get()
	if cap(a) != 1<<20 || len(a) != 0 {
		t.Fatalf("get: len %d cap %d", len(a), cap(a))
	}
	l.put(append(a, 1, 2, 3))
	l.put(b)
	l.put(c)                // beyond keep
	l.put(make([]byte, 10)) // not one of ours
	if n := len(l.free); n != 2 {
		t.Fatalf("%d buffers kept, want 2", n)
	}
	got := map[*byte]bool{&l.get()[:1][0]: true, &l.get()[:1][0]: true}
	if !got[&a[:1][0]] || !got[&b[:1][0]] {
		t.Fatal("get did not hand back the buffers put")
	}
	l.put(a)
	time.Sleep(300 * time.Millisecond)
	l.mu.Lock()
	n := len(l.free)
	l.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d buffers kept after the idle time", n)
	}
}

// TestScratch: scratch buffers have room for what is asked, and new ones are no larger:
// sizing each for the largest possible blob made every one the GC took cost a thousand
// page faults to replace.
func TestScratch(t *testing.T) {
	if b := compressBuffers.New().(*[]byte); cap(*b) != 0 {
		t.Fatalf("a new scratch buffer has room for %d bytes before anything asked", cap(*b))
	}
	for _, n := range []int{100, storedBound(64 << 10), storedBound(MaxChunkSize)} {
		bp := scratch(n)
		if cap(*bp) < n || len(*bp) != 0 {
			t.Fatalf("scratch(%d): len %d cap %d", n, len(*bp), cap(*bp))
		}
		compressBuffers.Put(bp)
	}
}

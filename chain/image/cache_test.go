package image

import (
	"bytes"
	"io"
	"math/rand"
	"runtime"
	"sync"
	"testing"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/test/testenv"
)

// TestImageReadsExactUnderConcurrency: random reads from many goroutines, sequential ones
// that trigger prefetch among them, return the stored bytes, while the cache stays within
// its byte budget.
func TestImageReadsExactUnderConcurrency(t *testing.T) {
	const chunk = 16 << 10
	rng := rand.New(rand.NewSource(1))
	data := make([]byte, 3<<20+777)
	rng.Read(data[:1<<20]) // random, then text, then zeros (never stored)
	for i := 1 << 20; i < 2<<20; i++ {
		data[i] = "abcdefgh\n"[i%9]
	}
	sr := testenv.MemorySnapshot(t, data, chunk)
	cache := NewCache(10 * chunk)
	im := &Reader{sr: sr, cache: cache, size: int64(len(data)), loaders: make(chan struct{}, 4)}
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(seed int64) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(seed))
			off := int64(0)
			for i := 0; i < 300; i++ {
				n := 1 + rng.Intn(100<<10)
				if seed%2 == 0 { // random
					off = rng.Int63n(int64(len(data)))
				}
				p := make([]byte, n)
				got, err := im.ReadAt(p, off)
				want := data[min(off, int64(len(data))):min(off+int64(n), int64(len(data)))]
				if got != len(want) || !bytes.Equal(p[:got], want) {
					t.Errorf("read of %d at %d: %d bytes (%v), differ", n, off, got, err)
					return
				}
				if got < n && err != io.EOF {
					t.Errorf("short read at %d without EOF: %v", off, err)
				}
				off += int64(got)
				if off >= int64(len(data)) {
					off = 0
				}
			}
		}(int64(g))
	}
	wg.Wait()
	for len(im.loaders) > 0 { // let prefetches finish before checking the budget
		runtime.Gosched()
	}
	cache.mu.Lock()
	defer cache.mu.Unlock()
	if cache.bytes > cache.budget || cache.bytes <= 0 {
		t.Fatalf("cache holds %d bytes, budget %d", cache.bytes, cache.budget)
	}
	if cache.reused == 0 {
		t.Fatal("no load reused an evicted buffer: the recycling path did not run")
	}
}

// TestCacheBuffersFromSlabs: while the cache fills, new buffers are cut from shared slabs:
// each has exactly the room asked for (an append cannot spill into its neighbour), none
// overlaps another, and a chunk too large for a slab gets none.
func TestCacheBuffersFromSlabs(t *testing.T) {
	c := NewCache(64 << 20)
	var bufs [][]byte
	for i := 0; i < 200; i++ { // more than one slab's worth
		b := c.buffer(64 << 10)
		if len(b) != 64<<10 || cap(b) != 64<<10 {
			t.Fatalf("buffer %d: len %d cap %d, want 64 KiB each", i, len(b), cap(b))
		}
		for j := range b {
			b[j] = byte(i)
		}
		bufs = append(bufs, b)
	}
	for i, b := range bufs {
		for j := range b {
			if b[j] != byte(i) {
				t.Fatalf("buffer %d was overwritten by another", i)
			}
		}
	}
	if b := c.buffer(4 << 20); b != nil {
		t.Fatalf("a 4 MiB chunk got a %d-byte slab buffer", cap(b))
	}
}

// TestPinSurvivesEviction: bytes pinned for a reply stay intact while other reads evict
// their chunks from the cache, and their buffers are recycled only after Release.
func TestPinSurvivesEviction(t *testing.T) {
	const chunk = 16 << 10
	data := make([]byte, 64*chunk)
	rand.New(rand.NewSource(2)).Read(data)
	sr := testenv.MemorySnapshot(t, data, chunk)
	cache := NewCache(4 * chunk)
	im := NewReader(sr, cache, nil)
	var p chain.Pinned
	if err := im.Pin(chunk/2, 3*chunk, &p); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, chunk)
	for off := int64(8 * chunk); off < int64(len(data)); off += chunk { // evicts the pinned chunks
		if _, err := im.ReadAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	cache.mu.Lock()
	reusedWhilePinned := cache.reused
	cache.mu.Unlock()
	if reusedWhilePinned == 0 {
		t.Fatal("no buffer was recycled: the reads did not evict anything")
	}
	if got := bytes.Join(p.Vecs, nil); !bytes.Equal(got, data[chunk/2:chunk/2+3*chunk]) {
		t.Fatal("pinned bytes changed while their chunks were evicted")
	}
	free := len(cache.free)
	p.Release()
	if len(cache.free) != free+4 {
		t.Fatalf("releasing 4 evicted chunks left %d free buffers, want %d", len(cache.free), free+4)
	}
	if err := im.Pin(int64(len(data))-1, 2, &p); err == nil {
		t.Fatal("a pin past the image's end succeeded")
	}
}

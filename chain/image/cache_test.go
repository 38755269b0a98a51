package image

import (
	"bytes"
	"context"
	"io"
	"math/rand"
	"runtime"
	"sync"
	"testing"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/test/testenv"
)

// snapshotOf stores data as a snapshot in an in-memory repository.
func snapshotOf(t *testing.T, data []byte, chunk int) *chain.SnapshotReader {
	t.Helper()
	ctx := context.Background()
	r := testenv.MemoryRepo(t)
	w, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "v", Name: "s", Size: int64(len(data)), ChunkSize: chunk})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i*chunk < len(data); i++ {
		if err := w.Put(ctx, int64(i), data[i*chunk:min(len(data), (i+1)*chunk)]); err != nil {
			t.Fatal(err)
		}
	}
	s, err := w.Commit(ctx, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return r.SnapshotReader(s)
}

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
	sr := snapshotOf(t, data, chunk)
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

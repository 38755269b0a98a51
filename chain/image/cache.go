package image

import (
	"context"
	"io"
	"sync"
	"sync/atomic"

	lru "github.com/hashicorp/golang-lru/v2"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/hugemem"
)

// Cache keeps decompressed chunks by content ID, bounded by bytes and shared by every
// reader of a process (and every snapshot: identical chunks are one entry, so the
// metadata two snapshots share is decompressed and checked once). Concurrent
// misses on one chunk load it once. Buffers of evicted chunks are reused once no reader
// is copying from them: fresh memory costs the kernel a page fault per 4 KiB, which was a
// large part of a sequential read's CPU.
type Cache struct {
	mu      sync.Mutex
	lru     *lru.Cache[chain.ID, *chunk]
	loading map[chain.ID]*chunkLoad
	bytes   int64
	budget  int64
	free    [][]byte // buffers of evicted chunks nobody reads any more
	slab    []byte   // what is left of the memory new buffers are cut from
	reused  int64    // loads that got a recycled buffer (for tests)
}

// chunk is a cached chunk. refs counts readers copying from data; an evicted chunk's buffer
// is recycled when the last of them releases it. Both are guarded by Cache.mu.
type chunk struct {
	data    []byte
	refs    int
	evicted bool
}

type chunkLoad struct {
	ch   *chunk
	done chan struct{}
	err  error
}

const maxFreeBuffers = 64

func NewCache(budget int64) *Cache {
	c := &Cache{budget: budget, loading: map[chain.ID]*chunkLoad{}}
	c.lru, _ = lru.NewWithEvict(1<<20, func(_ chain.ID, ch *chunk) {
		// Called under c.mu, from Add and RemoveOldest.
		c.bytes -= int64(len(ch.data))
		ch.evicted = true
		if ch.refs == 0 {
			c.recycle(ch)
		}
	})
	return c
}

// recycle keeps an unreferenced chunk's buffer for a later load. Called under c.mu.
func (c *Cache) recycle(ch *chunk) {
	if ch.data != nil && len(c.free) < maxFreeBuffers {
		c.free = append(c.free, ch.data[:0])
	}
	ch.data = nil
}

// buffer returns a recycled buffer of at least n bytes or, while the cache fills, one
// cut from a slab; nil for a large chunk with nothing to recycle.
func (c *Cache) buffer(n int) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := len(c.free) - 1; i >= 0; i-- {
		if b := c.free[i]; cap(b) >= n {
			c.free[i] = c.free[len(c.free)-1]
			c.free = c.free[:len(c.free)-1]
			c.reused++
			return b[:n]
		}
	}
	if n > slabSize/8 {
		return nil
	}
	if len(c.slab)+n > cap(c.slab) {
		c.slab = hugemem.Make(slabSize)
	}
	b := c.slab[len(c.slab) : len(c.slab)+n : len(c.slab)+n]
	c.slab = c.slab[:len(c.slab)+n]
	return b
}

// slabSize is the memory new chunk buffers are cut from, in huge pages: filling the cache
// with separately allocated 64 KiB buffers cost 16 page faults each (~14 µs apiece on the
// bench VM), a fifth of the CPU of a cold sequential read through the view.
const slabSize = 4 << 20

// get returns chunk i of sr (with content id), loading it on a miss. The caller reads
// ch.data and MUST call release(ch) exactly once when done with it.
func (c *Cache) get(ctx context.Context, sr *chain.SnapshotReader, i int64, id chain.ID) (*chunk, error) {
	c.mu.Lock()
	if ch, ok := c.lru.Get(id); ok {
		ch.refs++
		c.mu.Unlock()
		return ch, nil
	}
	if l, ok := c.loading[id]; ok {
		l.ch.refs++
		c.mu.Unlock()
		<-l.done
		if l.err != nil {
			c.release(l.ch)
			return nil, l.err
		}
		return l.ch, nil
	}
	l := &chunkLoad{ch: &chunk{refs: 1}, done: make(chan struct{})}
	c.loading[id] = l
	c.mu.Unlock()

	data, err := sr.LoadChunk(ctx, i, id, c.buffer(sr.ChunkLen(i)))
	c.mu.Lock()
	delete(c.loading, id)
	if err != nil {
		l.err = err
	} else {
		l.ch.data = data
		c.lru.Add(id, l.ch)
		c.bytes += int64(len(data))
		for c.bytes > c.budget && c.lru.Len() > 1 {
			c.lru.RemoveOldest()
		}
	}
	c.mu.Unlock()
	close(l.done)
	if err != nil {
		c.release(l.ch)
		return nil, err
	}
	return l.ch, nil
}

// release ends a reader's use of ch.
func (c *Cache) release(ch *chunk) {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch.refs--
	if ch.refs == 0 && ch.evicted {
		c.recycle(ch)
	}
}

// contains reports whether chunk id is cached, without touching its recency.
func (c *Cache) contains(id chain.ID) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Contains(id)
}

// prefetchChunks is how far ahead of a sequential reader chunks are loaded, in parallel
// with the reads the kernel sends: disk reads overlap decompression.
const prefetchChunks = 32

// Reader reads a snapshot's volume image through a Cache. It implements io.ReaderAt
// (the filesystem readers' view of a device) and is safe for concurrent use.
type Reader struct {
	sr    *chain.SnapshotReader
	cache *Cache
	size  int64
	// loaders bounds background chunk loads for the whole mount.
	loaders   chan struct{}
	readahead bool
	// next is where the last read ended: a read starting there is sequential.
	next  atomic.Int64
	mu    sync.Mutex
	ahead int64 // the first chunk not yet scheduled for prefetch
}

// NewReader reads sr through cache. loaders bounds background chunk loads (sequential
// read-ahead and Prefetch), shared by all the readers of a process; nil disables them.
func NewReader(sr *chain.SnapshotReader, cache *Cache, loaders chan struct{}) *Reader {
	return &Reader{sr: sr, cache: cache, size: sr.Snapshot().SizeBytes, loaders: loaders, readahead: loaders != nil}
}

// WithoutReadahead turns off sequential read-ahead, for readers that know what they will
// read next and say so with Prefetch.
func (im *Reader) WithoutReadahead() *Reader {
	im.readahead = false
	return im
}

// Size is the volume's size in bytes.
func (im *Reader) Size() int64 { return im.size }

// Snapshot is the snapshot being read.
func (im *Reader) Snapshot() *chain.SnapshotReader { return im.sr }

// prefetch schedules loads of the chunks after chunk last, as far as prefetchChunks
// ahead, skipping those cached or already scheduled. When every loader is busy it stops
// and the next sequential read continues: prefetching never queues behind real reads.
func (im *Reader) prefetch(last int64) {
	cs := int64(im.sr.Snapshot().ChunkSize)
	end := min(last+1+prefetchChunks, (im.size+cs-1)/cs)
	im.mu.Lock()
	defer im.mu.Unlock()
	for i := max(last+1, im.ahead); i < end; i++ {
		select {
		case im.loaders <- struct{}{}:
		default:
			im.ahead = i
			return
		}
		go im.load(i)
	}
	im.ahead = max(im.ahead, end)
}

// load loads chunk i into the cache and frees the loader slot its caller took.
func (im *Reader) load(i int64) {
	defer func() { <-im.loaders }()
	ctx := context.Background()
	id, err := im.sr.ChunkID(ctx, i)
	if err != nil || id.IsZero() || im.cache.contains(id) {
		return
	}
	if ch, err := im.cache.get(ctx, im.sr, i, id); err == nil { // errors surface when the data is really read
		im.cache.release(ch)
	}
}

// Prefetch starts loading the chunks under [off, off+n) in the background. It waits for a
// free loader before each, so a caller that prefetches a window ahead of its reads keeps
// every loader busy and the cache no fuller than the window.
func (im *Reader) Prefetch(off, n int64) {
	if im.loaders == nil || n <= 0 || off < 0 || off >= im.size {
		return
	}
	cs := int64(im.sr.Snapshot().ChunkSize)
	for i := off / cs; i <= (min(off+n, im.size)-1)/cs; i++ {
		im.loaders <- struct{}{}
		go im.load(i)
	}
}

func (im *Reader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= im.size {
		return 0, io.EOF
	}
	im.readAhead(off, int64(len(p)))
	// io.ReaderAt has no context; reads are bounded chunk loads.
	return im.sr.ReadAtFrom(context.Background(), p, off, im.fromCache)
}

// readAhead starts prefetching after a read of n bytes at off that continues the last one.
func (im *Reader) readAhead(off, n int64) {
	if im.readahead && n >= 16<<10 && im.next.Swap(off+n) == off {
		im.prefetch((off + n - 1) / int64(im.sr.Snapshot().ChunkSize))
	}
}

// Pin is ReadAt for a caller that passes the bytes on after it returns, without copying
// them: it appends the pieces of [off, off+n) to p, held in the cache (which does not
// reuse them) until p.Release. A read continuing the last one starts read-ahead, as in
// ReadAt. The range must lie within the image.
func (im *Reader) Pin(off, n int64, p *chain.Pinned) error {
	im.readAhead(off, n)
	return im.sr.PinFrom(context.Background(), off, n, im.fromCache, p)
}

// Visit calls fn with the bytes of [off, off+n) of the image in order, straight from the
// cache (see chain.SnapshotReader.VisitFrom): a reader that only passes the bytes on saves
// ReadAt's copy. Sequential read-ahead is not started; say what comes next with Prefetch.
func (im *Reader) Visit(off, n int64, fn func(p []byte) error) error {
	return im.sr.VisitFrom(context.Background(), off, n, im.fromCache, fn)
}

// fromCache is the chain.ChunkSource of the shared cache.
func (im *Reader) fromCache(ctx context.Context, i int64, id chain.ID) ([]byte, func(), error) {
	ch, err := im.cache.get(ctx, im.sr, i, id)
	if err != nil {
		return nil, nil, err
	}
	return ch.data, func() { im.cache.release(ch) }, nil
}

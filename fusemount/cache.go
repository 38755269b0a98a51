package fusemount

import (
	"context"
	"io"
	"sync"
	"sync/atomic"

	lru "github.com/hashicorp/golang-lru/v2"
	"golang.org/x/sync/singleflight"

	"github.com/stasis-project/stasis/chain"
)

// chunkCache keeps decompressed chunks by content ID, bounded by bytes and shared by every
// open file of a mount (and every snapshot: identical chunks are one entry). Concurrent
// misses on one chunk load it once.
type chunkCache struct {
	mu     sync.Mutex
	lru    *lru.Cache[chain.ID, []byte]
	bytes  int64
	budget int64
	loads  singleflight.Group
}

func newChunkCache(budget int64) *chunkCache {
	c := &chunkCache{budget: budget}
	c.lru, _ = lru.NewWithEvict(1<<20, func(_ chain.ID, b []byte) { c.bytes -= int64(len(b)) })
	return c
}

// get returns chunk i of sr (with content id), loading it on a miss. The slice is shared:
// callers must not modify it.
func (c *chunkCache) get(ctx context.Context, sr *chain.SnapshotReader, i int64, id chain.ID) ([]byte, error) {
	c.mu.Lock()
	b, ok := c.lru.Get(id)
	c.mu.Unlock()
	if ok {
		return b, nil
	}
	v, err, _ := c.loads.Do(string(id[:]), func() (any, error) {
		b, err := sr.LoadChunk(ctx, i, id, nil)
		if err != nil {
			return nil, err
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		c.lru.Add(id, b)
		c.bytes += int64(len(b))
		for c.bytes > c.budget && c.lru.Len() > 1 {
			c.lru.RemoveOldest()
		}
		return b, nil
	})
	if err != nil {
		return nil, err
	}
	return v.([]byte), nil
}

// contains reports whether chunk id is cached, without touching its recency.
func (c *chunkCache) contains(id chain.ID) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Contains(id)
}

// prefetchChunks is how far ahead of a sequential reader chunks are loaded, in parallel
// with the reads the kernel sends: disk reads overlap decompression.
const prefetchChunks = 32

// image reads a snapshot's volume image through the cache. It implements io.ReaderAt
// (the filesystem readers' view of a device) and is safe for concurrent use.
type image struct {
	sr    *chain.SnapshotReader
	cache *chunkCache
	size  int64
	// loaders bounds background chunk loads for the whole mount.
	loaders chan struct{}
	// next is where the last read ended: a read starting there is sequential.
	next  atomic.Int64
	mu    sync.Mutex
	ahead int64 // the first chunk not yet scheduled for prefetch
}

// prefetch schedules loads of the chunks after chunk last, as far as prefetchChunks
// ahead, skipping those cached or already scheduled. When every loader is busy it stops
// and the next sequential read continues: prefetching never queues behind real reads.
func (im *image) prefetch(last int64) {
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
		go func(i int64) {
			defer func() { <-im.loaders }()
			ctx := context.Background()
			id, err := im.sr.ChunkID(ctx, i)
			if err != nil || id.IsZero() || im.cache.contains(id) {
				return
			}
			im.cache.get(ctx, im.sr, i, id) // errors surface when the data is really read
		}(i)
	}
	im.ahead = max(im.ahead, end)
}

func (im *image) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= im.size {
		return 0, io.EOF
	}
	ctx := context.Background() // io.ReaderAt has no context; reads are bounded chunk loads
	cs := int64(im.sr.Snapshot().ChunkSize)
	if im.loaders != nil && len(p) >= 16<<10 && im.next.Swap(off+int64(len(p))) == off {
		im.prefetch((off + int64(len(p)) - 1) / cs)
	}
	n := 0
	for n < len(p) && off < im.size {
		i := off / cs
		id, err := im.sr.ChunkID(ctx, i)
		if err != nil {
			return n, err
		}
		within := off - i*cs
		var c int
		if id.IsZero() {
			c = min(len(p)-n, im.sr.ChunkLen(i)-int(within))
			clear(p[n : n+c])
		} else {
			b, err := im.cache.get(ctx, im.sr, i, id)
			if err != nil {
				return n, err
			}
			c = copy(p[n:], b[within:])
		}
		n += c
		off += int64(c)
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

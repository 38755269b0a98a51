package fusemount

import (
	"context"
	"io"
	"sync"

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

// image reads a snapshot's volume image through the cache. It implements io.ReaderAt
// (the filesystem readers' view of a device) and is safe for concurrent use.
type image struct {
	sr    *chain.SnapshotReader
	cache *chunkCache
	size  int64
}

func (im *image) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= im.size {
		return 0, io.EOF
	}
	ctx := context.Background() // io.ReaderAt has no context; reads are bounded chunk loads
	cs := int64(im.sr.Snapshot().ChunkSize)
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

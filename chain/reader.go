package chain

import (
	"context"
	"fmt"
	"io"
)

// SnapshotReader reads a committed snapshot's volume image. Safe for concurrent use.
type SnapshotReader struct {
	r    *Reader
	snap *Snapshot
	tree *treeReader
}

// SnapshotReader returns a reader of snap's volume.
func (r *Reader) SnapshotReader(snap *Snapshot) *SnapshotReader {
	return &SnapshotReader{r: r, snap: snap, tree: newTreeReader(r, snap.Root, snap.Chunks())}
}

// Snapshot returns the snapshot being read.
func (sr *SnapshotReader) Snapshot() *Snapshot { return sr.snap }

// ChunkLen returns the length of chunk i (the last chunk may be short).
func (sr *SnapshotReader) ChunkLen(i int64) int {
	cs := int64(sr.snap.ChunkSize)
	if rest := sr.snap.SizeBytes - i*cs; rest < cs {
		return int(rest)
	}
	return int(cs)
}

// ChunkID returns chunk i's ID (ZeroID for an all-zero chunk).
func (sr *SnapshotReader) ChunkID(ctx context.Context, i int64) (ID, error) {
	return sr.tree.lookup(ctx, i)
}

// LoadChunk returns the content of a chunk with the given ID, as Walk reports it; zero
// chunks are filled with zeros. dst is reused when large enough.
func (sr *SnapshotReader) LoadChunk(ctx context.Context, i int64, id ID, dst []byte) ([]byte, error) {
	n := sr.ChunkLen(i)
	if id.IsZero() {
		if cap(dst) < n {
			dst = make([]byte, n)
		}
		dst = dst[:n]
		clear(dst)
		return dst, nil
	}
	b, err := sr.r.LoadBlob(ctx, id, dst)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s/%s chunk %d: %w", sr.snap.Volume, sr.snap.Name, i, err)
	}
	if len(b) != n {
		return nil, corruptf("snapshot %s/%s chunk %d: %d bytes, want %d", sr.snap.Volume, sr.snap.Name, i, len(b), n)
	}
	return b, nil
}

// ReadChunk returns the content of chunk i.
func (sr *SnapshotReader) ReadChunk(ctx context.Context, i int64, dst []byte) ([]byte, error) {
	id, err := sr.ChunkID(ctx, i)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s/%s chunk %d: %w", sr.snap.Volume, sr.snap.Name, i, err)
	}
	return sr.LoadChunk(ctx, i, id, dst)
}

// Walk calls fn in order for every chunk that is not all zeros, without reading chunk data.
func (sr *SnapshotReader) Walk(ctx context.Context, fn func(i int64, id ID) error) error {
	return sr.tree.walk(ctx, nil, fn)
}

// ReadAt implements io.ReaderAt semantics over the volume image.
func (sr *SnapshotReader) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	var buf []byte
	return sr.ReadAtFrom(ctx, p, off, func(ctx context.Context, i int64, id ID) ([]byte, func(), error) {
		chunk, err := sr.LoadChunk(ctx, i, id, buf)
		buf = chunk
		return chunk, func() {}, err
	})
}

// ChunkSource returns the content of chunk i, whose ID is id (never ZeroID), and a
// function the caller calls exactly once when it no longer reads the content.
type ChunkSource func(ctx context.Context, i int64, id ID) (data []byte, done func(), err error)

// ReadAtFrom is ReadAt with the content of non-zero chunks from src (a cache, say); zero
// chunks read as zeros without asking it.
func (sr *SnapshotReader) ReadAtFrom(ctx context.Context, p []byte, off int64, src ChunkSource) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("negative offset")
	}
	if off >= sr.snap.SizeBytes {
		return 0, io.EOF
	}
	want := min(int64(len(p)), sr.snap.SizeBytes-off)
	n := 0
	err := sr.VisitFrom(ctx, off, want, src, func(b []byte) error {
		if &b[0] == &zeros[0] { // a zero chunk: clearing is cheaper than copying zeros
			clear(p[n : n+len(b)])
			n += len(b)
		} else {
			n += copy(p[n:], b)
		}
		return nil
	})
	if err == nil && n < len(p) {
		err = io.EOF
	}
	return n, err
}

// VisitFrom calls fn with the bytes of [off, off+n) of the volume in order, piece by
// piece (never empty), without copying them: non-zero chunks' content straight from src,
// zero chunks as a shared zero slice. fn must neither modify nor keep the slice. A range that does
// not lie within the volume is an error, before fn is called.
func (sr *SnapshotReader) VisitFrom(ctx context.Context, off, n int64, src ChunkSource, fn func(p []byte) error) error {
	return sr.visit(ctx, off, n, src, func(p []byte, done func()) error {
		err := fn(p)
		done()
		return err
	})
}

// Pinned holds pieces of a volume in place in the source they came from (a cache), for a
// caller that hands them on after the call that got them returns: a FUSE reply written
// to the kernel straight from the cache. The zero value is empty.
type Pinned struct {
	Vecs  [][]byte // the pieces, in order; read-only
	dones []func()
}

// Len is the number of bytes held.
func (p *Pinned) Len() int {
	n := 0
	for _, v := range p.Vecs {
		n += len(v)
	}
	return n
}

// Release lets the source reuse every piece held, and empties p for reuse.
func (p *Pinned) Release() {
	for _, done := range p.dones {
		done()
	}
	clear(p.Vecs)
	clear(p.dones)
	p.Vecs, p.dones = p.Vecs[:0], p.dones[:0]
}

// PinFrom appends the pieces of [off, off+n) that VisitFrom would visit to p, each held
// until p.Release. After an error p holds what it pinned before it; release it all the same.
func (sr *SnapshotReader) PinFrom(ctx context.Context, off, n int64, src ChunkSource, p *Pinned) error {
	return sr.visit(ctx, off, n, src, func(b []byte, done func()) error {
		p.Vecs = append(p.Vecs, b)
		p.dones = append(p.dones, done)
		return nil
	})
}

// visit is VisitFrom handing fn each piece with the function that releases it, which fn
// must call exactly once, now or later.
func (sr *SnapshotReader) visit(ctx context.Context, off, n int64, src ChunkSource, fn func(p []byte, done func()) error) error {
	if off < 0 || n < 0 || n > sr.snap.SizeBytes-off {
		return fmt.Errorf("snapshot %s/%s: bytes [%d, %d) are outside its %d-byte volume", sr.snap.Volume, sr.snap.Name, off, off+n, sr.snap.SizeBytes)
	}
	cs := int64(sr.snap.ChunkSize)
	for end := off + n; off < end; {
		i := off / cs
		id, err := sr.ChunkID(ctx, i)
		if err != nil {
			return fmt.Errorf("snapshot %s/%s chunk %d: %w", sr.snap.Volume, sr.snap.Name, i, err)
		}
		within := off - i*cs
		c := min(int64(sr.ChunkLen(i))-within, end-off)
		if id.IsZero() {
			for z := c; z > 0; {
				k := min(z, int64(len(zeros)))
				if err := fn(zeros[:k], noRelease); err != nil {
					return err
				}
				z -= k
			}
		} else {
			data, done, err := src(ctx, i, id)
			if err != nil {
				return err
			}
			if err := fn(data[within:within+c], done); err != nil {
				return err
			}
		}
		off += c
	}
	return nil
}

func noRelease() {}

// zeros is what VisitFrom hands out for all-zero chunks.
var zeros = make([]byte, 1<<20)

package files

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/zeebo/blake3"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/fsimage"
)

// Segment is a run of a regular file's bytes: data at Phys in the filesystem's device,
// or a hole (Phys -1) that reads as zeros.
type Segment struct {
	Off, Len int64
	Phys     int64
}

// Hole reports whether the segment reads as zeros without being stored.
func (s Segment) Hole() bool { return s.Phys < 0 }

// maxSegments bounds the map of one file (and 4× as many calls to Map): a hostile image
// cannot make it unbounded, and a real file this fragmented is read rather than mapped.
const maxSegments = 1 << 20

// Segments maps a regular file's bytes to the image. ok is false when the file's data is
// not in blocks (inline data) or too fragmented to map: then it can only be read.
func (e *Entry) Segments() (segs []Segment, ok bool, err error) {
	m, isMapper := e.Node.(fsimage.Mapper)
	if !isMapper || e.Attr.Mode&fsimage.S_IFMT != fsimage.S_IFREG {
		return nil, false, nil
	}
	size := int64(min(e.Attr.Size, 1<<62))
	for off, calls := int64(0), 0; off < size; calls++ {
		if calls == 4*maxSegments { // holes mapped a block at a time (indirect maps), or hostile
			return nil, false, nil
		}
		phys, n, err := fsimage.MapWithin(m, off, e.FS.size)
		if errors.Is(err, fsimage.ErrNotMapped) {
			return nil, false, nil
		}
		if err != nil {
			return nil, false, e.FS.damage(e.Path, err)
		}
		n = min(n, size-off)
		if k := len(segs); k > 0 {
			last := &segs[k-1]
			if (last.Hole() && phys < 0) || (!last.Hole() && phys >= 0 && last.Phys+last.Len == phys) {
				last.Len += n
				off += n
				continue
			}
		}
		if len(segs) == maxSegments {
			return nil, false, nil
		}
		if phys < 0 {
			phys = -1
		}
		segs = append(segs, Segment{Off: off, Len: n, Phys: phys})
		off += n
	}
	return segs, true, nil
}

// direct reports whether the filesystem's bytes at an offset are the image's bytes at
// base+offset: not so when a journal was replayed in memory.
func (f *Filesystem) direct() bool {
	r, ok := f.fs.(fsimage.Replayer)
	return !ok || !r.Replayed()
}

// sameChunks compares the chunks under n bytes at pa (in a's filesystem) and pb (in b's)
// by their IDs. known is false when that cannot tell: the ranges are not at the same place
// in both images, or a journal replay moved some bytes elsewhere.
func sameChunks(ctx context.Context, a *Filesystem, pa int64, b *Filesystem, pb int64, n int64) (known, same bool, err error) {
	sa, sb := a.vol.snap, b.vol.snap
	if a.vol.img == nil || b.vol.img == nil || a.base+pa != b.base+pb || sa.ChunkSize != sb.ChunkSize || !a.direct() || !b.direct() {
		return false, false, nil
	}
	cs := int64(sa.ChunkSize)
	ra, rb := a.vol.img.Snapshot(), b.vol.img.Snapshot()
	for i := (a.base + pa) / cs; i <= (a.base+pa+n-1)/cs; i++ {
		ida, err := ra.ChunkID(ctx, i)
		if err != nil {
			return false, false, err
		}
		idb, err := rb.ChunkID(ctx, i)
		if err != nil {
			return false, false, err
		}
		if ida != idb {
			return true, false, nil
		}
	}
	return true, true, nil
}

// compareUnit is how much of two files is read and compared at a time, and the unit in
// which changed bytes are counted.
const compareUnit = chain.DefaultChunkSize

// Compare compares two regular files' contents. Ranges both files map to the same
// unchanged chunks are skipped without reading; the rest is read and compared, with the
// chunks of the next pieces loading in the background. added and removed count the bytes
// of a and b in the compareUnit-sized pieces that differ, and the bytes past the shorter
// file's end.
func Compare(ctx context.Context, a, b *Entry) (same bool, added, removed int64, err error) {
	sizeA, sizeB := int64(a.Attr.Size), int64(b.Attr.Size)
	common := min(sizeA, sizeB)
	segA, okA, err := a.Segments()
	if err != nil {
		return false, 0, 0, err
	}
	segB, okB, err := b.Segments()
	if err != nil {
		return false, 0, 0, err
	}
	// The pieces to read, each at most compareUnit long, with where each file has it.
	type piece struct{ off, n, pa, pb int64 }
	var pieces []piece
	split := func(off, n, pa, pb int64) {
		for d := int64(0); d < n; d += compareUnit {
			p := piece{off + d, min(compareUnit, n-d), -1, -1}
			if pa >= 0 {
				p.pa = pa + d
			}
			if pb >= 0 {
				p.pb = pb + d
			}
			pieces = append(pieces, p)
		}
	}
	if !okA || !okB {
		split(0, common, -1, -1)
	} else {
		err = walkSegments(segA, segB, common, func(off, n int64, pa, pb int64) error {
			if pa < 0 && pb < 0 {
				return nil
			}
			if pa < 0 || pb < 0 {
				split(off, n, pa, pb)
				return nil
			}
			// Chunk by chunk. A chunk that holds only this file's bytes, in both, at the
			// same place, differs exactly when its ID does: no need to read it. The
			// chunks at the ends of extents hold other files' blocks too: read those.
			cs := int64(a.FS.vol.snap.ChunkSize)
			if cs <= 0 { // no snapshot behind the files (RootOf): one unknown piece
				split(off, n, pa, pb)
				return nil
			}
			for d := int64(0); d < n; {
				l := min(n-d, cs-(a.FS.base+pa+d)%cs)
				known, eq, err := sameChunks(ctx, a.FS, pa+d, b.FS, pb+d, l)
				switch {
				case err != nil:
					return err
				case known && eq:
				case known && l == cs:
					added, removed = added+l, removed+l
				default:
					split(off+d, l, pa+d, pb+d)
				}
				d += l
			}
			return nil
		})
		if err != nil {
			return false, 0, 0, err
		}
	}
	const window = 32 // pieces loading ahead of the comparison
	var bufA, bufB []byte
	if len(pieces) > 0 {
		bufs := comparePool.Get().(*[2][]byte)
		defer comparePool.Put(bufs)
		bufA, bufB = bufs[0], bufs[1]
	}
	for k, next := 0, 0; k < len(pieces); k++ {
		for ; next < len(pieces) && next < k+window; next++ {
			if p := pieces[next]; p.pa >= 0 || p.pb >= 0 {
				a.FS.prefetch(p.pa, p.n)
				b.FS.prefetch(p.pb, p.n)
			}
		}
		if err := ctx.Err(); err != nil {
			return false, 0, 0, err
		}
		p := pieces[k]
		if err := readFull(a, bufA[:p.n], p.off); err != nil {
			return false, 0, 0, err
		}
		if err := readFull(b, bufB[:p.n], p.off); err != nil {
			return false, 0, 0, err
		}
		if !bytes.Equal(bufA[:p.n], bufB[:p.n]) {
			added += p.n
			removed += p.n
		}
	}
	added, removed = added+max(0, sizeB-common), removed+max(0, sizeA-common)
	return added == 0 && removed == 0, added, removed, nil
}

var comparePool = sync.Pool{New: func() any { return &[2][]byte{make([]byte, compareUnit), make([]byte, compareUnit)} }}

// prefetch starts loading the chunks under n bytes at phys (nothing for -1).
func (f *Filesystem) prefetch(phys, n int64) {
	if phys >= 0 && f.vol.img != nil && f.direct() {
		f.vol.img.Prefetch(f.base+phys, n)
	}
}

// visit calls fn with the n bytes at phys, straight from the image cache, and reports
// whether it could: not when the bytes are not the image's (a replayed journal), nor
// without a cached image. Errors name the snapshot and the path p.
func (f *Filesystem) visit(p string, phys, n int64, fn func(b []byte) error) (bool, error) {
	if phys < 0 || f.vol.img == nil || !f.direct() {
		return false, nil
	}
	var fnErr error
	err := f.vol.img.Visit(f.base+phys, n, func(b []byte) error {
		fnErr = fn(b)
		return fnErr
	})
	if err != nil && err != fnErr {
		err = f.damage(p, err)
	}
	return true, err
}

// walkSegments calls fn for each run of [0, size) where both maps are uniform, with the
// physical offsets in each at the run's start (-1 for holes).
func walkSegments(a, b []Segment, size int64, fn func(off, n, pa, pb int64) error) error {
	i, j := 0, 0
	for off := int64(0); off < size; {
		for i < len(a) && a[i].Off+a[i].Len <= off {
			i++
		}
		for j < len(b) && b[j].Off+b[j].Len <= off {
			j++
		}
		if i == len(a) || j == len(b) {
			return fmt.Errorf("file map ends at %d, before %d", off, size) // Segments covers the file: a bug
		}
		n := min(a[i].Off+a[i].Len, b[j].Off+b[j].Len, size) - off
		if err := fn(off, n, at(a[i], off), at(b[j], off)); err != nil {
			return err
		}
		off += n
	}
	return nil
}

func at(s Segment, off int64) int64 {
	if s.Hole() {
		return -1
	}
	return s.Phys + off - s.Off
}

func readFull(e *Entry, p []byte, off int64) error {
	n, err := e.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		return e.FS.damage(e.Path, fsimage.Corruptf("file ends at %d, before its size", off+int64(n)))
	}
	return err
}

// Hash returns the BLAKE3-256 of a regular file's content, in hex.
func Hash(ctx context.Context, e *Entry) (string, error) {
	h := blake3.New()
	bufp := restorePool.Get().(*[]byte)
	defer restorePool.Put(bufp)
	buf := *bufp
	size := int64(e.Attr.Size)
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		l := min(int64(len(buf)), size-off)
		if err := readFull(e, buf[:l], off); err != nil {
			return "", err
		}
		h.Write(buf[:l])
		off += l
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

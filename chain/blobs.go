package chain

import (
	"context"
	"errors"
	"fmt"
	"io"
)

// errNotIndexed marks a blob no index file names.
var errNotIndexed = fmt.Errorf("%w: blob missing from the index", ErrCorrupt)

// LoadBlob reads, decrypts, decompresses and verifies one blob. dst is reused when large
// enough. A blob that is missing, or whose every indexed copy is damaged, yields an
// ErrCorrupt error; a damaged copy is passed over for another one (a later snapshot may
// have stored the chunk again, after verify found the first copy damaged).
func (r *Reader) LoadBlob(ctx context.Context, id ID, dst []byte) ([]byte, error) {
	for attempt := 0; ; attempt++ {
		out, err := r.loadBlobOnce(ctx, id, dst)
		if (errors.Is(err, ErrNotExist) || errors.Is(err, errNotIndexed)) && attempt == 0 && r.index.changed(ctx) {
			// A gc may have repacked the blob, or a snapshot committed since our index was
			// read (a long-running mount sees new snapshots): reload and retry.
			if lerr := r.index.refresh(ctx); lerr != nil {
				return nil, lerr
			}
			continue
		}
		return out, err
	}
}

func (r *Reader) loadBlobOnce(ctx context.Context, id ID, dst []byte) ([]byte, error) {
	loc, ok, err := r.index.lookup(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("find blob %s: %w", id.Short(), err)
	}
	if !ok {
		return nil, fmt.Errorf("%w: %s", errNotIndexed, id.Short())
	}
	out, err := r.readBlob(ctx, loc, dst)
	if err == nil || !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrNotExist) {
		return out, err
	}
	// The first copy is damaged or gone: try every other one.
	locs, lerr := r.index.locations(ctx, id)
	if lerr != nil {
		return nil, err
	}
	for _, l := range locs {
		if l.pack == loc.pack && l.e.Offset == loc.e.Offset {
			continue
		}
		if out, err2 := r.readBlob(ctx, l, dst); err2 == nil {
			r.index.found.Add(id, l)
			return out, nil
		}
	}
	return nil, err
}

// readBlob reads one stored copy of a blob and checks it.
func (r *Reader) readBlob(ctx context.Context, loc blobLoc, dst []byte) ([]byte, error) {
	e, pack := loc.e, loc.pack
	var stored []byte
	switch {
	case (e.Comp != compNone || r.keys != nil) && int(e.Length) <= maxStoredLen:
		// Compressed or sealed bytes are only a step on the way: reuse their buffer (fresh
		// memory costs a page fault per 4 KiB).
		bp := scratch(int(e.Length))
		defer compressBuffers.Put(bp)
		stored = (*bp)[:e.Length]
	case e.Comp == compNone && r.keys == nil && cap(dst) >= int(e.Length):
		stored = dst[:e.Length] // raw: straight into the caller's buffer
	default:
		stored = make([]byte, e.Length)
	}
	if _, err := r.be.ReadAt(ctx, Handle{Type: PackFile, Name: pack.String()}, stored, int64(e.Offset)); err != nil {
		if errors.Is(err, ErrNotExist) {
			return nil, err
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, corruptf("blob %s: pack %s is truncated", e.ID.Short(), pack.Short())
		}
		return nil, fmt.Errorf("read blob %s from pack %s: %w", e.ID.Short(), pack.Short(), err)
	}
	out, err := r.decodeBlob(stored, e, dst)
	if err != nil {
		return nil, fmt.Errorf("blob %s in pack %s: %w", e.ID.Short(), pack.Short(), err)
	}
	return out, nil
}

// decodeBlob turns a blob's stored bytes back into its content and checks it against its ID.
func (r *Reader) decodeBlob(stored []byte, e packEntry, dst []byte) ([]byte, error) {
	if r.keys != nil {
		bp := scratch(len(stored))
		defer compressBuffers.Put(bp)
		var err error
		if stored, err = r.keys.open((*bp)[:0], stored, e.ID[:]); err != nil {
			return nil, err
		}
		if e.Comp == compNone {
			// The plaintext is in a pooled buffer that goes back to the pool on return:
			// the caller gets its own copy.
			if cap(dst) < len(stored) {
				dst = make([]byte, 0, len(stored))
			}
			stored = append(dst[:0], stored...)
		}
	}
	out, err := decompress(stored, e.Comp, int(e.RawLen), dst)
	if err != nil {
		return nil, err
	}
	if len(out) != int(e.RawLen) || r.blobID(out) != e.ID {
		return nil, corruptf("content does not match its hash")
	}
	return out, nil
}

// encodeBlob compresses and (in an encrypted repository) seals a blob's content for
// storing, into dst.
func (r *Reader) encodeBlob(id ID, raw, dst []byte) ([]byte, compression) {
	if r.keys == nil {
		return r.codec.compress(raw, dst)
	}
	bp := scratch(storedBound(len(raw)))
	defer compressBuffers.Put(bp)
	plain, comp := r.codec.compress(raw, *bp)
	return r.keys.seal(dst[:0], plain, id[:]), comp
}

// loadPage implements pageLoader for readers of committed trees.
func (r *Reader) loadPage(ctx context.Context, id ID, level int) ([]ID, error) {
	if p, ok := r.pages.Get(id); ok {
		return p, nil
	}
	b, err := r.LoadBlob(ctx, id, nil)
	if err != nil {
		return nil, fmt.Errorf("tree page %s: %w", id.Short(), err)
	}
	p, err := decodePage(b, level)
	if err != nil {
		return nil, fmt.Errorf("tree page %s: %w", id.Short(), err)
	}
	r.pages.Add(id, p)
	return p, nil
}

package chain

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"sort"
	"sync"

	"github.com/zeebo/blake3"
)

// diskIndex answers lookups from a version 2 index file by binary search in the file, so
// a reader's memory does not grow with the number of blobs. The whole file is checked
// against its name and checksum when opened; records read later are checked again for
// bounds, and a blob read through them is checked against its hash.
type diskIndex struct {
	read func(ctx context.Context, p []byte, off int64) (int, error)
	hdr  *indexHeader
}

// openDiskIndex opens a version 2 index file of size bytes, read through read, checking it
// against its own checksum in one streaming pass.
func openDiskIndex(ctx context.Context, size int64, read func(context.Context, []byte, int64) (int, error)) (*diskIndex, error) {
	if size < int64(len(indexMagic))+4+32 {
		return nil, corruptf("index file is %d bytes, too short", size)
	}
	// One pass over the file: its last 32 bytes are the hash of the rest.
	body := blake3.New()
	buf := make([]byte, min(size, 1<<20))
	var tail [32]byte
	for off := int64(0); off < size; {
		n := int(min(int64(len(buf)), size-off))
		if err := readFullAt(ctx, read, buf[:n], off); err != nil {
			return nil, err
		}
		bodyPart := max(0, min(int64(n), size-32-off))
		body.Write(buf[:bodyPart])
		for i := bodyPart; i < int64(n); i++ {
			tail[off+i-(size-32)] = buf[i]
		}
		off += int64(n)
	}
	if ID(body.Sum(nil)) != ID(tail) {
		return nil, corruptf("index file checksum mismatch")
	}
	head := make([]byte, 12)
	if err := readFullAt(ctx, read, head, 0); err != nil {
		return nil, err
	}
	if string(head[:8]) != indexMagic {
		return nil, corruptf("index file is not version 2")
	}
	fixed := 12 + int64(binary.LittleEndian.Uint32(head[8:]))*indexPackSize + 4 + indexFanoutSize
	if fixed+32 > size {
		return nil, corruptf("index file header does not fit")
	}
	hb := make([]byte, fixed)
	if err := readFullAt(ctx, read, hb, 0); err != nil {
		return nil, err
	}
	hdr, err := decodeIndexHeader(hb, size)
	if err != nil {
		return nil, err
	}
	return &diskIndex{read: read, hdr: hdr}, nil
}

// openDiskIndexBytes opens an index file held in memory (for tests and fuzzing).
func openDiskIndexBytes(b []byte) (*diskIndex, error) {
	read := func(_ context.Context, p []byte, off int64) (int, error) {
		if off >= int64(len(b)) {
			return 0, io.EOF
		}
		n := copy(p, b[off:])
		if n < len(p) {
			return n, io.EOF
		}
		return n, nil
	}
	return openDiskIndex(context.Background(), int64(len(b)), read)
}

func readFullAt(ctx context.Context, read func(context.Context, []byte, int64) (int, error), p []byte, off int64) error {
	n, err := read(ctx, p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		return corruptf("index file ends early at %d", off+int64(n))
	}
	return err
}

const idAt = 4 + 1 // in a blob record: pack number, flags, then the ID

// all returns every record of blob id (a blob may be stored in several packs). The
// binary search probes the file record by record only while the candidates span more than
// searchWindow records; the rest is read in one piece and searched in memory, so a lookup
// in a small or medium index costs one read.
func (d *diskIndex) all(ctx context.Context, id ID) ([]blobLoc, error) {
	h := d.hdr
	lo, hi := uint32(0), h.fanout[id[0]]
	if id[0] > 0 {
		lo = h.fanout[id[0]-1]
	}
	end := h.fanout[id[0]]
	bufp := searchBuffers.Get().(*[]byte)
	defer searchBuffers.Put(bufp)
	rec := (*bufp)[:indexBlobSize]
	for hi-lo > searchWindow { // the first record whose ID is not below id lies in [lo, hi]
		m := lo + (hi-lo)/2
		if err := readFullAt(ctx, d.read, rec, h.blobs+int64(m)*indexBlobSize); err != nil {
			return nil, err
		}
		if bytes.Compare(rec[idAt:idAt+32], id[:]) < 0 {
			lo = m + 1
		} else {
			hi = m
		}
	}
	// Read the candidates and a few records past them (further copies of the blob).
	wend := min(end, hi+searchExtra)
	win := (*bufp)[indexBlobSize:][:int64(wend-lo)*indexBlobSize]
	if err := readFullAt(ctx, d.read, win, h.blobs+int64(lo)*indexBlobSize); err != nil {
		return nil, err
	}
	at := func(i uint32) []byte { return win[int64(i-lo)*indexBlobSize:][:indexBlobSize] }
	first := lo + uint32(sort.Search(int(wend-lo), func(k int) bool {
		r := at(lo + uint32(k))
		return bytes.Compare(r[idAt:idAt+32], id[:]) >= 0
	}))
	var out []blobLoc
	for i := first; i < end; i++ {
		r := rec
		if i < wend {
			r = at(i)
		} else if err := readFullAt(ctx, d.read, rec, h.blobs+int64(i)*indexBlobSize); err != nil {
			return nil, err
		}
		if !bytes.Equal(r[idAt:idAt+32], id[:]) {
			break
		}
		x, err := h.decodeBlob(r)
		if err != nil {
			return nil, err
		}
		out = append(out, blobLoc{pack: h.packs[x.pack], packSize: h.sizes[x.pack], e: x.e})
	}
	return out, nil
}

// searchWindow is how many candidate records a lookup reads at once instead of probing
// (about 24 KiB); searchExtra, how many records past them it reads for further copies.
const (
	searchWindow = 512
	searchExtra  = 4
)

// searchBuffers hold a lookup's record and window: lookups run once per chunk read, and
// fresh garbage at that rate costs page faults as the heap grows.
var searchBuffers = sync.Pool{New: func() any {
	b := make([]byte, (1+searchWindow+1+searchExtra)*indexBlobSize)
	return &b
}}

// each calls fn for every record, in order, reading the file in large pieces.
func (d *diskIndex) each(ctx context.Context, fn func(blobLoc) error) error {
	h := d.hdr
	const batch = 4096
	buf := make([]byte, batch*indexBlobSize)
	for first := int64(0); first < int64(h.count); first += batch {
		n := min(batch, int64(h.count)-first)
		if err := readFullAt(ctx, d.read, buf[:n*indexBlobSize], h.blobs+first*indexBlobSize); err != nil {
			return err
		}
		for i := int64(0); i < n; i++ {
			x, err := h.decodeBlob(buf[i*indexBlobSize:])
			if err != nil {
				return err
			}
			if err := fn(blobLoc{pack: h.packs[x.pack], packSize: h.sizes[x.pack], e: x.e}); err != nil {
				return err
			}
		}
	}
	return nil
}

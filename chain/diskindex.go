package chain

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"

	lru "github.com/hashicorp/golang-lru/v2"
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

// openDiskIndex opens the index file named id, of size bytes, read through read.
func openDiskIndex(ctx context.Context, id ID, size int64, read func(context.Context, []byte, int64) (int, error)) (*diskIndex, error) {
	if size < int64(len(indexMagic))+4+32 {
		return nil, corruptf("index file is %d bytes, too short", size)
	}
	// One pass over the file: its name is the hash of all of it, and its last 32 bytes
	// the hash of the rest.
	whole, body := blake3.New(), blake3.New()
	buf := make([]byte, min(size, 1<<20))
	var tail [32]byte
	for off := int64(0); off < size; {
		n := int(min(int64(len(buf)), size-off))
		if err := readFullAt(ctx, read, buf[:n], off); err != nil {
			return nil, err
		}
		whole.Write(buf[:n])
		bodyPart := max(0, min(int64(n), size-32-off))
		body.Write(buf[:bodyPart])
		for i := bodyPart; i < int64(n); i++ {
			tail[off+i-(size-32)] = buf[i]
		}
		off += int64(n)
	}
	if ID(whole.Sum(nil)) != id {
		return nil, corruptf("index file %s: content does not match its name", id.Short())
	}
	if ID(body.Sum(nil)) != ID(tail) {
		return nil, corruptf("index file %s: checksum mismatch", id.Short())
	}
	head := make([]byte, 12)
	if err := readFullAt(ctx, read, head, 0); err != nil {
		return nil, err
	}
	if string(head[:8]) != indexMagic {
		return nil, corruptf("index file %s is not version 2", id.Short())
	}
	fixed := 12 + int64(binary.LittleEndian.Uint32(head[8:]))*indexPackSize + 4 + indexFanoutSize
	if fixed+32 > size {
		return nil, corruptf("index file %s: header does not fit", id.Short())
	}
	hb := make([]byte, fixed)
	if err := readFullAt(ctx, read, hb, 0); err != nil {
		return nil, err
	}
	hdr, err := decodeIndexHeader(hb, size)
	if err != nil {
		return nil, fmt.Errorf("index file %s: %w", id.Short(), err)
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
	return openDiskIndex(context.Background(), Hash(b), int64(len(b)), read)
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

// lookup finds blob id: its entry and pack, or ok false.
func (d *diskIndex) lookup(ctx context.Context, id ID) (packEntry, ID, bool, error) {
	h := d.hdr
	lo, hi := uint32(0), h.fanout[id[0]]
	if id[0] > 0 {
		lo = h.fanout[id[0]-1]
	}
	rec := make([]byte, indexBlobSize)
	const idAt = 4 + 1 // pack number, flags, then the ID
	for lo < hi {      // the first record whose ID is not below id
		m := lo + (hi-lo)/2
		if err := readFullAt(ctx, d.read, rec, h.blobs+int64(m)*indexBlobSize); err != nil {
			return packEntry{}, ID{}, false, err
		}
		if bytes.Compare(rec[idAt:idAt+32], id[:]) < 0 {
			lo = m + 1
		} else {
			hi = m
		}
	}
	if lo >= h.fanout[id[0]] {
		return packEntry{}, ID{}, false, nil
	}
	if err := readFullAt(ctx, d.read, rec, h.blobs+int64(lo)*indexBlobSize); err != nil {
		return packEntry{}, ID{}, false, err
	}
	if !bytes.Equal(rec[idAt:idAt+32], id[:]) {
		return packEntry{}, ID{}, false, nil
	}
	x, err := h.decodeBlob(rec)
	if err != nil {
		return packEntry{}, ID{}, false, err
	}
	return x.e, h.packs[x.pack], true, nil
}

// readerIndex is the index of a repository opened with OpenReader: version 2 files are
// searched on disk, version 1 files (written by older stasis, until the next gc rewrites
// them) are held in memory, and recent answers are cached. Safe for concurrent use.
type readerIndex struct {
	files map[ID]*diskIndex // by index file name; nil for a version 1 file
	mem   *blobIndex
	found *lru.Cache[ID, foundBlob]
}

type foundBlob struct {
	e    packEntry
	pack ID
}

// readerCacheSize bounds the answers a reader remembers (about 100 bytes each).
const readerCacheSize = 16384

func (x *readerIndex) lookup(ctx context.Context, id ID) (packEntry, ID, bool, error) {
	if f, ok := x.found.Get(id); ok {
		return f.e, f.pack, true, nil
	}
	if loc, pack, ok := x.mem.lookup(id); ok {
		return packEntry{ID: id, Type: loc.typ, Zstd: loc.zstd, Offset: loc.offset, Length: loc.length, RawLen: loc.rawLen}, pack, true, nil
	}
	for _, d := range x.files {
		if d == nil {
			continue
		}
		e, pack, ok, err := d.lookup(ctx, id)
		if err != nil {
			return packEntry{}, ID{}, false, err
		}
		if ok {
			x.found.Add(id, foundBlob{e, pack})
			return e, pack, true, nil
		}
	}
	return packEntry{}, ID{}, false, nil
}

package chain

import (
	"encoding/binary"
	"fmt"
	"sync"
)

// Index file layout (format version 1, little-endian). Its name is the hex ID of its content.
//
//	"STASIDX1" | pack count u32
//	per pack:  pack ID [32] | pack size u64 | entry count u32 | entries (45 bytes each, as in packs)
//	BLAKE3-256 of all preceding bytes [32]
//
// An index file is written after the packs it names are durable and before any snapshot
// manifest refers to their blobs, which is what makes a commit atomic.

const indexMagic = "STASIDX1"

// indexedPack is one pack's section of an index file.
type indexedPack struct {
	ID      ID
	Size    int64
	Entries []packEntry
}

func encodeIndex(packs []indexedPack) []byte {
	b := []byte(indexMagic)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(packs)))
	for _, p := range packs {
		b = append(b, p.ID[:]...)
		b = binary.LittleEndian.AppendUint64(b, uint64(p.Size))
		b = binary.LittleEndian.AppendUint32(b, uint32(len(p.Entries)))
		for _, e := range p.Entries {
			b = e.append(b)
		}
	}
	sum := Hash(b)
	return append(b, sum[:]...)
}

// decodeIndex parses an index file, checking its checksum and every entry's bounds.
func decodeIndex(b []byte) ([]indexedPack, error) {
	if len(b) < len(indexMagic)+4+32 {
		return nil, corruptf("index file is %d bytes, too short", len(b))
	}
	if string(b[:8]) != indexMagic {
		return nil, corruptf("index file does not start with %q (format version 1)", indexMagic)
	}
	body, sum := b[:len(b)-32], b[len(b)-32:]
	if Hash(body) != ID(sum) {
		return nil, corruptf("index file checksum mismatch")
	}
	rest := body[8:]
	count := binary.LittleEndian.Uint32(rest)
	rest = rest[4:]
	if uint64(count)*(32+8+4) > uint64(len(rest)) {
		return nil, corruptf("index pack count %d does not fit", count)
	}
	packs := make([]indexedPack, 0, count)
	for i := uint32(0); i < count; i++ {
		if len(rest) < 32+8+4 {
			return nil, corruptf("index file truncated in pack %d", i)
		}
		var p indexedPack
		copy(p.ID[:], rest)
		size := binary.LittleEndian.Uint64(rest[32:])
		if size > 1<<40 {
			return nil, corruptf("pack %s: size %d out of range", p.ID.Short(), size)
		}
		p.Size = int64(size)
		n := binary.LittleEndian.Uint32(rest[40:])
		rest = rest[44:]
		if uint64(n)*packEntrySize > uint64(len(rest)) {
			return nil, corruptf("pack %s: %d entries do not fit in the index file", p.ID.Short(), n)
		}
		p.Entries = make([]packEntry, 0, n)
		for j := uint32(0); j < n; j++ {
			e, err := decodePackEntry(rest, p.Size)
			if err != nil {
				return nil, fmt.Errorf("pack %s: %w", p.ID.Short(), err)
			}
			p.Entries = append(p.Entries, e)
			rest = rest[packEntrySize:]
		}
		packs = append(packs, p)
	}
	if len(rest) != 0 {
		return nil, corruptf("index file has %d trailing bytes", len(rest))
	}
	return packs, nil
}

// location is where a blob is stored: 20 bytes per blob plus the map's overhead.
type location struct {
	pack   uint32 // position in blobIndex.packs
	offset uint32
	length uint32
	rawLen uint32
	typ    BlobType
	zstd   bool
}

// blobIndex maps blob IDs to their locations. Safe for concurrent use.
type blobIndex struct {
	mu      sync.RWMutex
	blobs   map[ID]location
	packs   []ID
	packPos map[ID]uint32
	sizes   []int64
}

func newBlobIndex() *blobIndex {
	return &blobIndex{blobs: map[ID]location{}, packPos: map[ID]uint32{}}
}

// add records a pack's entries. A blob already present keeps its first location: any copy
// holds the same bytes, and gc writes the new index before deleting the old packs.
func (x *blobIndex) add(p indexedPack) {
	x.mu.Lock()
	defer x.mu.Unlock()
	pos, ok := x.packPos[p.ID]
	if !ok {
		pos = uint32(len(x.packs))
		x.packs = append(x.packs, p.ID)
		x.sizes = append(x.sizes, p.Size)
		x.packPos[p.ID] = pos
	}
	for _, e := range p.Entries {
		if _, ok := x.blobs[e.ID]; ok {
			continue
		}
		x.blobs[e.ID] = location{pack: pos, offset: e.Offset, length: e.Length, rawLen: e.RawLen, typ: e.Type, zstd: e.Zstd}
	}
}

func (x *blobIndex) lookup(id ID) (location, ID, bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	l, ok := x.blobs[id]
	if !ok {
		return l, ID{}, false
	}
	return l, x.packs[l.pack], true
}

func (x *blobIndex) has(id ID) bool {
	x.mu.RLock()
	defer x.mu.RUnlock()
	_, ok := x.blobs[id]
	return ok
}

func (x *blobIndex) hasPack(id ID) bool {
	x.mu.RLock()
	defer x.mu.RUnlock()
	_, ok := x.packPos[id]
	return ok
}

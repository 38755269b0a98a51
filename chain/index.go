package chain

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"sort"
)

// Index file layout (version 2, little-endian). Its name is the hex ID of its content.
//
//	"STASIDX2" | pack count u32 | per pack: pack ID [32] | pack size u64
//	blob count u32 | fanout [256]u32: blobs whose ID's first byte is <= i
//	blobs sorted by (ID, pack number): pack number u32 | entry (45 bytes, as in packs)
//	BLAKE3-256 of all preceding bytes [32]
//
// Sorted fixed-size records let a reader find a blob with a binary search in the file
// instead of holding every entry in memory (see diskIndex). Version 1 files ("STASIDX1":
// per pack, its ID, size, entry count and entries in pack order) are still read.
//
// An index file is written after the packs it names are durable and before any snapshot
// manifest refers to their blobs, which is what makes a commit atomic.

const (
	indexMagicV1    = "STASIDX1"
	indexMagic      = "STASIDX2"
	indexPackSize   = 32 + 8
	indexBlobSize   = 4 + packEntrySize
	indexFanoutSize = 256 * 4
)

// indexedPack is one pack's section of an index file.
type indexedPack struct {
	ID      ID
	Size    int64
	Entries []packEntry
}

// indexedBlob is one record of a version 2 index file.
type indexedBlob struct {
	pack uint32
	e    packEntry
}

func encodeIndex(packs []indexedPack) []byte {
	var blobs []indexedBlob
	for i, p := range packs {
		for _, e := range p.Entries {
			blobs = append(blobs, indexedBlob{uint32(i), e})
		}
	}
	sort.SliceStable(blobs, func(i, j int) bool {
		if c := bytes.Compare(blobs[i].e.ID[:], blobs[j].e.ID[:]); c != 0 {
			return c < 0
		}
		return blobs[i].pack < blobs[j].pack
	})
	b := []byte(indexMagic)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(packs)))
	for _, p := range packs {
		b = append(b, p.ID[:]...)
		b = binary.LittleEndian.AppendUint64(b, uint64(p.Size))
	}
	b = binary.LittleEndian.AppendUint32(b, uint32(len(blobs)))
	var fanout [256]uint32
	for _, x := range blobs {
		fanout[x.e.ID[0]]++
	}
	sum := uint32(0)
	for _, n := range fanout {
		sum += n
		b = binary.LittleEndian.AppendUint32(b, sum)
	}
	for _, x := range blobs {
		b = binary.LittleEndian.AppendUint32(b, x.pack)
		b = x.e.append(b)
	}
	h := Hash(b)
	return append(b, h[:]...)
}

// indexHeader is the part of a version 2 index file before the blob records.
type indexHeader struct {
	packs  []ID
	sizes  []int64
	count  uint32
	fanout [256]uint32
	blobs  int64 // offset of the first blob record
}

// decodeIndexHeader parses a version 2 header from the file's first bytes, given the
// file's total size, checking that the sizes add up.
func decodeIndexHeader(b []byte, fileSize int64) (*indexHeader, error) {
	if len(b) < len(indexMagic)+4 || string(b[:8]) != indexMagic {
		return nil, corruptf("index file does not start with %q (format version 2)", indexMagic)
	}
	packs := int64(binary.LittleEndian.Uint32(b[8:]))
	fixed := int64(12) + packs*indexPackSize + 4 + indexFanoutSize
	if fixed+32 > fileSize || int64(len(b)) < fixed {
		return nil, corruptf("index pack count %d does not fit", packs)
	}
	h := &indexHeader{blobs: fixed}
	for i := int64(0); i < packs; i++ {
		rec := b[12+i*indexPackSize:]
		var id ID
		copy(id[:], rec)
		size := binary.LittleEndian.Uint64(rec[32:])
		if size > 1<<40 {
			return nil, corruptf("pack %s: size %d out of range", id.Short(), size)
		}
		h.packs = append(h.packs, id)
		h.sizes = append(h.sizes, int64(size))
	}
	rest := b[12+packs*indexPackSize:]
	h.count = binary.LittleEndian.Uint32(rest)
	if fixed+int64(h.count)*indexBlobSize+32 != fileSize {
		return nil, corruptf("index file of %d bytes does not hold %d blobs", fileSize, h.count)
	}
	prev := uint32(0)
	for i := range h.fanout {
		h.fanout[i] = binary.LittleEndian.Uint32(rest[4+i*4:])
		if h.fanout[i] < prev {
			return nil, corruptf("index fanout decreases at %d", i)
		}
		prev = h.fanout[i]
	}
	if prev != h.count {
		return nil, corruptf("index fanout counts %d blobs, header %d", prev, h.count)
	}
	return h, nil
}

// decodeIndexBlob parses one blob record, checking it against the header.
func (h *indexHeader) decodeBlob(rec []byte) (indexedBlob, error) {
	pack := binary.LittleEndian.Uint32(rec)
	if int(pack) >= len(h.packs) {
		return indexedBlob{}, corruptf("index blob names pack %d of %d", pack, len(h.packs))
	}
	e, err := decodePackEntry(rec[4:], h.sizes[pack])
	if err != nil {
		return indexedBlob{}, fmt.Errorf("pack %s: %w", h.packs[pack].Short(), err)
	}
	return indexedBlob{pack, e}, nil
}

// decodeIndex parses an index file (either version), checking its checksum and every
// entry's bounds; version 2 records must be in order and sit in their fanout bucket.
func decodeIndex(b []byte) ([]indexedPack, error) {
	if len(b) < len(indexMagic)+4+32 {
		return nil, corruptf("index file is %d bytes, too short", len(b))
	}
	body, sum := b[:len(b)-32], b[len(b)-32:]
	if Hash(body) != ID(sum) {
		return nil, corruptf("index file checksum mismatch")
	}
	if string(b[:8]) == indexMagicV1 {
		return decodeIndexV1(body)
	}
	h, err := decodeIndexHeader(b, int64(len(b)))
	if err != nil {
		return nil, err
	}
	packs := make([]indexedPack, len(h.packs))
	for i := range packs {
		packs[i] = indexedPack{ID: h.packs[i], Size: h.sizes[i]}
	}
	var prev indexedBlob
	for i := int64(0); i < int64(h.count); i++ {
		x, err := h.decodeBlob(b[h.blobs+i*indexBlobSize:])
		if err != nil {
			return nil, err
		}
		if i > 0 {
			if c := bytes.Compare(prev.e.ID[:], x.e.ID[:]); c > 0 || c == 0 && prev.pack >= x.pack {
				return nil, corruptf("index blobs out of order at %d", i)
			}
		}
		if first := x.e.ID[0]; uint32(i) >= h.fanout[first] || first > 0 && uint32(i) < h.fanout[first-1] {
			return nil, corruptf("index blob %d outside its fanout bucket", i)
		}
		packs[x.pack].Entries = append(packs[x.pack].Entries, x.e)
		prev = x
	}
	return packs, nil
}

// decodeIndexV1 parses the body (without checksum) of a version 1 index file.
func decodeIndexV1(body []byte) ([]indexedPack, error) {
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

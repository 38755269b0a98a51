package chain

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"sync"
)

// Pack file layout (format version 1, all integers little-endian):
//
//	header   "STASPACK" | version u8 = 1 | 7 reserved zero bytes          16 bytes
//	blobs    each blob's stored bytes (zstd frame or raw), back to back
//	entries  count × packEntry                                             45 bytes each
//	trailer  count u32 | crc32c(entries) u32 | "STASPEND"                  16 bytes
//
// The entries are repeated in the index file that commits the pack, so readers never need
// the trailer; it makes every pack self-describing for verify and repair.

const (
	packMagic       = "STASPACK"
	packEndMagic    = "STASPEND"
	packVersion     = 1
	packHeaderSize  = 16
	packTrailerSize = 16
	packEntrySize   = 1 + 32 + 4 + 4 + 4
)

// BlobType tells what a blob holds.
type BlobType uint8

// Blob types.
const (
	DataBlob BlobType = 1 // a chunk of volume data
	TreeBlob BlobType = 2 // a page of a snapshot's block map
)

func (t BlobType) String() string {
	switch t {
	case DataBlob:
		return "data"
	case TreeBlob:
		return "tree"
	}
	return fmt.Sprintf("blobtype(%d)", t)
}

const flagZstd = 0x80 // in packEntry.flags: stored bytes are a zstd frame

// packEntry locates one blob inside a pack.
type packEntry struct {
	Type   BlobType
	Zstd   bool
	ID     ID
	Offset uint32 // from the start of the pack file
	Length uint32 // stored length
	RawLen uint32 // length after decompression
}

func (e packEntry) append(b []byte) []byte {
	flags := byte(e.Type)
	if e.Zstd {
		flags |= flagZstd
	}
	b = append(b, flags)
	b = append(b, e.ID[:]...)
	b = binary.LittleEndian.AppendUint32(b, e.Offset)
	b = binary.LittleEndian.AppendUint32(b, e.Length)
	return binary.LittleEndian.AppendUint32(b, e.RawLen)
}

// ErrCorrupt is wrapped by every error that reports damaged repository data.
var ErrCorrupt = errors.New("repository data is corrupt")

func corruptf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
}

// maxBlobSize bounds any blob's raw length, so hostile entries cannot make us allocate
// unbounded buffers: the largest chunk size plus slack.
const maxBlobSize = MaxChunkSize + 4096

func decodePackEntry(b []byte, packSize int64) (packEntry, error) {
	var e packEntry
	flags := b[0]
	e.Zstd = flags&flagZstd != 0
	e.Type = BlobType(flags &^ flagZstd)
	if e.Type != DataBlob && e.Type != TreeBlob {
		return e, corruptf("unknown blob type %d", flags)
	}
	copy(e.ID[:], b[1:33])
	e.Offset = binary.LittleEndian.Uint32(b[33:])
	e.Length = binary.LittleEndian.Uint32(b[37:])
	e.RawLen = binary.LittleEndian.Uint32(b[41:])
	if e.RawLen > maxBlobSize || e.Length > maxBlobSize+maxBlobSize/8 {
		return e, corruptf("blob %s: length %d/%d out of range", e.ID.Short(), e.Length, e.RawLen)
	}
	if !e.Zstd && e.Length != e.RawLen {
		return e, corruptf("blob %s: raw blob with stored length %d != %d", e.ID.Short(), e.Length, e.RawLen)
	}
	if e.Offset < packHeaderSize || (packSize >= 0 && int64(e.Offset)+int64(e.Length) > packSize-packTrailerSize) {
		return e, corruptf("blob %s: offset %d+%d outside the pack", e.ID.Short(), e.Offset, e.Length)
	}
	return e, nil
}

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// packBuilder accumulates blobs for one pack in memory.
type packBuilder struct {
	buf     []byte
	entries []packEntry
}

// packBufferSize fits a full pack, one more maximal blob and the entry table.
const packBufferSize = PackSize + 2*MaxChunkSize

// packBuffers recycles pack buffers: allocating (and zeroing) 40 MB per pack cost more
// CPU than hashing the data in it.
var packBuffers = sync.Pool{New: func() any {
	b := make([]byte, 0, packBufferSize)
	return &b
}}

func releasePackBuffer(b []byte) {
	if cap(b) == packBufferSize {
		b = b[:0]
		packBuffers.Put(&b)
	}
}

func newPackBuilder() *packBuilder {
	p := &packBuilder{buf: (*packBuffers.Get().(*[]byte))[:0]}
	p.buf = append(p.buf, packMagic...)
	p.buf = append(p.buf, packVersion, 0, 0, 0, 0, 0, 0, 0)
	return p
}

func (p *packBuilder) size() int { return len(p.buf) }

// add appends one stored blob and returns its entry.
func (p *packBuilder) add(t BlobType, id ID, stored []byte, zstd bool, rawLen int) packEntry {
	e := packEntry{Type: t, Zstd: zstd, ID: id, Offset: uint32(len(p.buf)), Length: uint32(len(stored)), RawLen: uint32(rawLen)}
	p.buf = append(p.buf, stored...)
	p.entries = append(p.entries, e)
	return e
}

// finish appends the entry table and trailer and returns the pack's bytes and ID.
func (p *packBuilder) finish() ([]byte, ID) {
	start := len(p.buf)
	for _, e := range p.entries {
		p.buf = e.append(p.buf)
	}
	crc := crc32.Checksum(p.buf[start:], crcTable)
	p.buf = binary.LittleEndian.AppendUint32(p.buf, uint32(len(p.entries)))
	p.buf = binary.LittleEndian.AppendUint32(p.buf, crc)
	p.buf = append(p.buf, packEndMagic...)
	return p.buf, Hash(p.buf)
}

// decodePackTrailer reads the entry table of a whole pack file.
func decodePackTrailer(pack []byte) ([]packEntry, error) {
	if len(pack) < packHeaderSize+packTrailerSize {
		return nil, corruptf("pack is %d bytes, too short", len(pack))
	}
	if string(pack[:8]) != packMagic {
		return nil, corruptf("pack does not start with %q", packMagic)
	}
	if pack[8] != packVersion {
		return nil, corruptf("pack format version %d is not supported (this stasis reads version %d)", pack[8], packVersion)
	}
	tr := pack[len(pack)-packTrailerSize:]
	if string(tr[8:]) != packEndMagic {
		return nil, corruptf("pack does not end with %q", packEndMagic)
	}
	count := int64(binary.LittleEndian.Uint32(tr))
	tableLen := count * packEntrySize
	if tableLen > int64(len(pack)-packHeaderSize-packTrailerSize) {
		return nil, corruptf("pack entry count %d does not fit in %d bytes", count, len(pack))
	}
	table := pack[len(pack)-packTrailerSize-int(tableLen) : len(pack)-packTrailerSize]
	if crc32.Checksum(table, crcTable) != binary.LittleEndian.Uint32(tr[4:]) {
		return nil, corruptf("pack entry table checksum mismatch")
	}
	dataEnd := int64(len(pack)) - tableLen
	entries := make([]packEntry, 0, count)
	for i := int64(0); i < count; i++ {
		e, err := decodePackEntry(table[i*packEntrySize:], dataEnd)
		if err != nil {
			return nil, err
		}
		entries = append(entries, e)
	}
	return entries, nil
}

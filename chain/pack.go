package chain

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"sync"
	"time"

	"github.com/stasis-project/stasis/chain/hugemem"
)

// Pack file layout (all integers little-endian):
//
//	header   "STASPACK" | version u8 | 7 random bytes (unique name)        16 bytes
//	blobs    each blob's stored bytes (compressed or raw; sealed if encrypted), back to back
//	table    version 1: count × packEntry (45 bytes each)
//	         version 2 (encrypted repositories): the same, sealed (AES-256-GCM)
//	trailer  count u32 (v2: sealed table length) | crc32c(table) u32 | "STASPEND"   16 bytes
//
// The entries are repeated in the index file that commits the pack, so readers never need
// the table; it makes every pack self-describing for verify and repair.

const (
	packMagic       = "STASPACK"
	packEndMagic    = "STASPEND"
	packVersion     = 1
	packVersionSeal = 2
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

// In packEntry.flags, beside the blob type: how the stored bytes are compressed.
const (
	flagZstd = 0x80
	flagS2   = 0x40
)

// packEntry locates one blob inside a pack.
type packEntry struct {
	Type   BlobType
	Comp   compression
	ID     ID
	Offset uint32 // from the start of the pack file
	Length uint32 // stored length
	RawLen uint32 // length after decompression
}

func (e packEntry) append(b []byte) []byte {
	flags := byte(e.Type)
	switch e.Comp {
	case compZstd:
		flags |= flagZstd
	case compS2:
		flags |= flagS2
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
// unbounded buffers: the largest chunk size plus slack; maxStoredLen bounds what is stored
// for it (an incompressible blob grown by a codec's framing, and by sealing).
const (
	maxBlobSize  = MaxChunkSize + 4096
	maxStoredLen = maxBlobSize + maxBlobSize/8 + sealOverhead
)

func decodePackEntry(b []byte, packSize int64) (packEntry, error) {
	var e packEntry
	flags := b[0]
	switch flags & (flagZstd | flagS2) {
	case 0:
		e.Comp = compNone
	case flagZstd:
		e.Comp = compZstd
	case flagS2:
		e.Comp = compS2
	default:
		return e, corruptf("blob flags %#x name two codecs", flags)
	}
	e.Type = BlobType(flags &^ (flagZstd | flagS2))
	if e.Type != DataBlob && e.Type != TreeBlob {
		return e, corruptf("unknown blob type %d", flags)
	}
	copy(e.ID[:], b[1:33])
	e.Offset = binary.LittleEndian.Uint32(b[33:])
	e.Length = binary.LittleEndian.Uint32(b[37:])
	e.RawLen = binary.LittleEndian.Uint32(b[41:])
	if e.RawLen > maxBlobSize || e.Length > maxStoredLen {
		return e, corruptf("blob %s: length %d/%d out of range", e.ID.Short(), e.Length, e.RawLen)
	}
	if e.Comp == compNone && e.Length != e.RawLen && e.Length != e.RawLen+sealOverhead {
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

// packBuffers recycles pack buffers. A fresh one costs more CPU than hashing the data in it:
// zeroing 40 MB, and faulting it in page by page as it fills (87% of a full snapshot's
// 38,000 page faults, ~14 µs each on the bench VM, when a sync.Pool the GC emptied handed
// out new ones). Kept buffers are live, so the runtime never returns their memory to the
// kernel; new ones are advised into huge pages; all are dropped after a minute unused, so
// an idle agent does not hold them.
var packBuffers = bufferList{size: packBufferSize, keep: 4, idle: time.Minute}

// bufferList keeps up to keep buffers of one size for reuse.
type bufferList struct {
	size, keep int
	idle       time.Duration

	mu    sync.Mutex
	free  [][]byte
	timer *time.Timer
}

func (l *bufferList) get() []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	if n := len(l.free); n > 0 {
		b := l.free[n-1]
		l.free = l.free[:n-1]
		return b[:0]
	}
	return hugemem.Make(l.size) // filling it faults in 2 MiB pages, not 4 KiB ones
}

// put takes back a buffer from get; one that grew elsewhere (cap changed) is left to the GC.
func (l *bufferList) put(b []byte) {
	if cap(b) != l.size {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.free) < l.keep {
		l.free = append(l.free, b[:0])
	}
	if l.timer == nil {
		l.timer = time.AfterFunc(l.idle, l.drop)
	} else {
		l.timer.Reset(l.idle)
	}
}

func (l *bufferList) drop() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.free = nil
}

func newPackBuilder() *packBuilder {
	p := &packBuilder{buf: packBuffers.get()}
	p.buf = append(p.buf, packMagic...)
	p.buf = append(p.buf, packVersion)
	// Seven random bytes make every pack's name unique. Two writers storing the same blobs
	// in the same order (the same data snapshotted again after a delete) would otherwise
	// write byte-identical packs under one name: the second Save is a no-op, and a gc that
	// deletes the first writer's garbage pack would take the second writer's data with it.
	var salt [7]byte
	rand.Read(salt[:])
	p.buf = append(p.buf, salt[:]...)
	return p
}

func (p *packBuilder) size() int { return len(p.buf) }

// add appends one stored blob and returns its entry.
func (p *packBuilder) add(t BlobType, id ID, stored []byte, comp compression, rawLen int) packEntry {
	e := packEntry{Type: t, Comp: comp, ID: id, Offset: uint32(len(p.buf)), Length: uint32(len(stored)), RawLen: uint32(rawLen)}
	p.buf = append(p.buf, stored...)
	p.entries = append(p.entries, e)
	return e
}

// packTableAAD binds a sealed entry table to its role.
var packTableAAD = []byte("stasis pack table v2")

// finish appends the entry table (sealed with keys, if not nil) and trailer and returns the
// pack's bytes and ID.
func (p *packBuilder) finish(keys *suite) ([]byte, ID) {
	var table []byte
	for _, e := range p.entries {
		table = e.append(table)
	}
	count := uint32(len(p.entries))
	if keys != nil {
		p.buf[8] = packVersionSeal
		table = keys.seal(nil, table, packTableAAD)
		count = uint32(len(table))
	}
	p.buf = append(p.buf, table...)
	p.buf = binary.LittleEndian.AppendUint32(p.buf, count)
	p.buf = binary.LittleEndian.AppendUint32(p.buf, crc32.Checksum(table, crcTable))
	p.buf = append(p.buf, packEndMagic...)
	return p.buf, Hash(p.buf)
}

// decodePackTrailer reads the entry table of a whole pack file; keys opens a sealed one.
func decodePackTrailer(pack []byte, keys *suite) ([]packEntry, error) {
	if len(pack) < packHeaderSize+packTrailerSize {
		return nil, corruptf("pack is %d bytes, too short", len(pack))
	}
	if string(pack[:8]) != packMagic {
		return nil, corruptf("pack does not start with %q", packMagic)
	}
	switch v := pack[8]; {
	case v == packVersion && keys == nil, v == packVersionSeal && keys != nil:
	case v == packVersion || v == packVersionSeal:
		return nil, corruptf("pack format version %d does not belong in this repository", v)
	default:
		return nil, corruptf("pack format version %d is not supported (this stasis reads versions %d and %d)", v, packVersion, packVersionSeal)
	}
	tr := pack[len(pack)-packTrailerSize:]
	if string(tr[8:]) != packEndMagic {
		return nil, corruptf("pack does not end with %q", packEndMagic)
	}
	n := int64(binary.LittleEndian.Uint32(tr))
	tableLen := n * packEntrySize
	if keys != nil {
		tableLen = n
	}
	if tableLen > int64(len(pack)-packHeaderSize-packTrailerSize) {
		return nil, corruptf("pack entry table of %d bytes does not fit in %d bytes", tableLen, len(pack))
	}
	table := pack[len(pack)-packTrailerSize-int(tableLen) : len(pack)-packTrailerSize]
	if crc32.Checksum(table, crcTable) != binary.LittleEndian.Uint32(tr[4:]) {
		return nil, corruptf("pack entry table checksum mismatch")
	}
	dataEnd := int64(len(pack)) - tableLen
	if keys != nil {
		var err error
		if table, err = keys.open(nil, table, packTableAAD); err != nil {
			return nil, fmt.Errorf("pack entry table: %w", err)
		}
		if len(table)%packEntrySize != 0 {
			return nil, corruptf("pack entry table of %d bytes", len(table))
		}
	}
	count := int64(len(table)) / packEntrySize
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

// repacker copies stored blobs (as read from other packs) into new packs and indexes them:
// gc's rewrite of mostly-garbage packs and repair's salvage of damaged ones.
type repacker struct {
	r     *Repository
	what  string // for errors: "gc", "repair"
	pb    *packBuilder
	packs []indexedPack
}

func newRepacker(r *Repository, what string) *repacker {
	return &repacker{r: r, what: what, pb: newPackBuilder()}
}

// add appends a blob in its stored form, saving the pack when it is full.
func (rp *repacker) add(ctx context.Context, e packEntry, stored []byte) error {
	rp.pb.add(e.Type, e.ID, stored, e.Comp, int(e.RawLen))
	if rp.pb.size() >= packTarget {
		return rp.flush(ctx)
	}
	return nil
}

func (rp *repacker) flush(ctx context.Context) error {
	if len(rp.pb.entries) == 0 {
		return nil
	}
	data, id := rp.pb.finish(rp.r.keys)
	if err := rp.r.be.Save(ctx, Handle{Type: PackFile, Name: id.String()}, data); err != nil {
		return fmt.Errorf("%s: save pack: %w", rp.what, err)
	}
	rp.packs = append(rp.packs, indexedPack{ID: id, Size: int64(len(data)), Entries: rp.pb.entries})
	packBuffers.put(data)
	rp.pb = newPackBuilder()
	return nil
}

// finish saves the last pack and an index file naming every new pack; it returns how many
// packs were written.
func (rp *repacker) finish(ctx context.Context) (int, error) {
	if err := rp.flush(ctx); err != nil {
		return 0, err
	}
	if len(rp.packs) > 0 {
		if _, err := rp.r.saveIndex(ctx, rp.packs); err != nil {
			return 0, err
		}
	}
	return len(rp.packs), nil
}

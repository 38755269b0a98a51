package chain

import (
	"encoding/hex"
	"fmt"
	"sync"

	"github.com/zeebo/blake3"
)

// ID names a blob (chunk or tree page), a pack or an index file by the BLAKE3-256 hash of
// its content. The all-zero ID is reserved: in a block map it means "this chunk (or this
// whole subtree) reads as zeros and nothing is stored for it".
type ID [32]byte

// ZeroID marks an all-zero chunk or subtree in a block map.
var ZeroID ID

// Hash returns the content ID of b.
//
// Beyond one BLAKE3 chunk, blake3.Sum256 builds an 8 KiB hasher on the stack: run on a
// fresh goroutine (a chunk load, say), that grows the goroutine's stack into memory
// never touched before, a page fault per 4 KiB (~14 µs each on some VMs; a 200 MB file
// restore took 1,600 of them there). A pooled hasher lives on the heap and is reused.
func Hash(b []byte) ID {
	if len(b) <= blake3ChunkLen {
		return ID(blake3.Sum256(b))
	}
	h := hashers.Get().(*blake3.Hasher)
	h.Reset()
	h.Write(b)
	var id ID
	h.Sum(id[:0])
	hashers.Put(h)
	return id
}

// blake3ChunkLen is the input size up to which blake3.Sum256 needs no hasher.
const blake3ChunkLen = 1024

var hashers = sync.Pool{New: func() any { return blake3.New() }}

// IsZero reports whether id is the reserved all-zero ID.
func (id ID) IsZero() bool { return id == ZeroID }

// String returns the full lowercase hex form.
func (id ID) String() string { return hex.EncodeToString(id[:]) }

// Short returns the first 8 hex digits, for messages.
func (id ID) Short() string { return hex.EncodeToString(id[:4]) }

// ParseID parses a full 64-digit hex ID.
func ParseID(s string) (ID, error) {
	var id ID
	if len(s) != 2*len(id) {
		return id, fmt.Errorf("invalid id %q: want %d hex digits", s, 2*len(id))
	}
	if _, err := hex.Decode(id[:], []byte(s)); err != nil {
		return id, fmt.Errorf("invalid id %q: %w", s, err)
	}
	return id, nil
}

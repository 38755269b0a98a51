// Package allocmap reads which parts of a block device a filesystem has allocated, from the
// filesystem's own metadata: ext4 block bitmaps and XFS free-space B+trees. Capture reads
// only allocated blocks, so free space (deleted files included) is neither read nor stored.
//
// The input is untrusted (a damaged or hostile filesystem): every number is bounds-checked,
// and any doubt returns an error, on which the caller reads the whole device instead.
package allocmap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Extent is a byte range [Start, End) of the device.
type Extent struct{ Start, End int64 }

// ErrUnknown is returned for a device whose filesystem this package cannot map: the caller
// must read everything.
var ErrUnknown = errors.New("no allocation map for this filesystem")

// Allocated returns the allocated extents of the filesystem on r (a device of size bytes),
// sorted and merged, and the filesystem's name.
func Allocated(r io.ReaderAt, size int64) ([]Extent, string, error) {
	sb := make([]byte, 4096)
	if _, err := r.ReadAt(sb, 0); err != nil && !errors.Is(err, io.EOF) {
		return nil, "", fmt.Errorf("read superblock: %w", err)
	}
	switch {
	case string(sb[:4]) == "XFSB":
		ext, err := xfsAllocated(r, size, sb)
		return ext, "xfs", err
	case binary.LittleEndian.Uint16(sb[1024+0x38:]) == 0xEF53:
		ext, err := ext4Allocated(r, size, sb[1024:2048])
		return ext, "ext4", err
	}
	return nil, "", ErrUnknown
}

// builder collects block runs into merged byte extents.
type builder struct {
	bs    int64
	limit int64 // device size
	out   []Extent
}

func (b *builder) add(firstBlock, blocks int64) error {
	if blocks <= 0 {
		return nil
	}
	start, end := firstBlock*b.bs, (firstBlock+blocks)*b.bs
	if firstBlock < 0 || start >= b.limit || end < start {
		return fmt.Errorf("block run %d+%d outside the %d-byte device", firstBlock, blocks, b.limit)
	}
	end = min(end, b.limit)
	if n := len(b.out); n > 0 && start <= b.out[n-1].End {
		if end > b.out[n-1].End {
			b.out[n-1].End = end
		}
		return nil
	}
	if n := len(b.out); n > 0 && start < b.out[n-1].Start {
		return b.insert(Extent{start, end})
	}
	b.out = append(b.out, Extent{start, end})
	return nil
}

// insert handles an out-of-order run (metadata of another group): rare, so a re-sort is fine.
func (b *builder) insert(e Extent) error {
	b.out = append(b.out, e)
	for i := len(b.out) - 1; i > 0 && b.out[i].Start < b.out[i-1].Start; i-- {
		b.out[i], b.out[i-1] = b.out[i-1], b.out[i]
	}
	merged := b.out[:1]
	for _, x := range b.out[1:] {
		last := &merged[len(merged)-1]
		if x.Start <= last.End {
			last.End = max(last.End, x.End)
			continue
		}
		merged = append(merged, x)
	}
	b.out = merged
	return nil
}

func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("read %d bytes at %d: %w", len(p), off, err)
}

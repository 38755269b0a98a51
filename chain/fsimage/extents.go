package fsimage

import "fmt"

// Extent is a byte range [Start, End) of the device holding a filesystem.
type Extent struct{ Start, End int64 }

// Allocator is implemented by readers that can list the blocks their filesystem has
// allocated, from its own allocation metadata (ext4 block bitmaps, XFS free-space trees).
// Capture reads only those blocks, so free space is neither read nor stored.
type Allocator interface {
	// Allocated returns the allocated extents, sorted and merged, inside the device, and
	// the part of the device past the filesystem's end, if any: the filesystem cannot
	// vouch that it is unused.
	Allocated() ([]Extent, error)
}

// ExtentBuilder collects block runs into sorted, merged byte extents clipped to the device.
type ExtentBuilder struct {
	bs    int64
	limit int64
	out   []Extent
}

// NewExtentBuilder builds extents of blocks of bs bytes on a device of limit bytes.
func NewExtentBuilder(bs, limit int64) *ExtentBuilder { return &ExtentBuilder{bs: bs, limit: limit} }

// Add records blocks [first, first+n). A run that starts outside the device is corruption.
func (b *ExtentBuilder) Add(first, n int64) error {
	if n <= 0 {
		return nil
	}
	if first < 0 || first > b.limit/b.bs || n > b.limit/b.bs+1 {
		return Corruptf("block run %d+%d outside the %d-byte device", first, n, b.limit)
	}
	start, end := first*b.bs, min((first+n)*b.bs, b.limit)
	if start >= b.limit {
		return Corruptf("block run %d+%d outside the %d-byte device", first, n, b.limit)
	}
	if k := len(b.out); k > 0 && start <= b.out[k-1].End && start >= b.out[k-1].Start {
		b.out[k-1].End = max(b.out[k-1].End, end)
		return nil
	}
	if k := len(b.out); k > 0 && start < b.out[k-1].Start {
		b.insert(Extent{start, end}) // metadata of another group: rare, a re-sort is fine
		return nil
	}
	b.out = append(b.out, Extent{start, end})
	return nil
}

func (b *ExtentBuilder) insert(e Extent) {
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
}

// Rest records every byte from block first to the end of the device: the part of a device
// past its filesystem's last block (a device grown before its filesystem was, or one mkfs
// left a tail of, rounding to a RAID stripe). Nothing there is known to be free.
func (b *ExtentBuilder) Rest(first int64) error {
	if first*b.bs >= b.limit {
		return nil
	}
	return b.Add(first, (b.limit-first*b.bs+b.bs-1)/b.bs)
}

// Extents returns what was added.
func (b *ExtentBuilder) Extents() []Extent { return b.out }

// String is for messages.
func (e Extent) String() string { return fmt.Sprintf("[%d, %d)", e.Start, e.End) }

package ext4

import (
	"fmt"
	"io"

	"github.com/stasis-project/stasis/chain/fsimage"
)

const bgBlockUninit = 0x2 // group descriptor flag: the block bitmap was never initialised

var _ fsimage.Allocator = (*FS)(nil)

// OpenOnDisk opens the image as it is written on the device, without replaying the
// journal, for its allocation map and identity. A mounted filesystem's bitmaps may lag its
// journal; a frozen one's are exact (FIFREEZE checkpoints the journal and clears the
// needs-recovery flag).
func OpenOnDisk(dev io.ReaderAt, size int64) (*FS, error) { return open(dev, size) }

// UUID returns the filesystem's UUID.
func (f *FS) UUID() [16]byte { return f.uuid }

// Allocated implements fsimage.Allocator from the block bitmaps. Groups whose bitmap was
// never initialised (BLOCK_UNINIT) hold only their metadata, which is included, as the
// kernel counts it when it initialises such a bitmap. The device past the filesystem's last
// block is allocated too.
func (f *FS) Allocated() ([]fsimage.Extent, error) {
	if f.bigalloc {
		return nil, fmt.Errorf("%w: ext4 bigalloc (cluster bitmaps)", fsimage.ErrUnsupported)
	}
	bs := uint64(f.bs)
	if f.perGroup > bs*8 {
		return nil, fsimage.Corruptf("ext4: %d blocks per group do not fit one bitmap block", f.perGroup)
	}
	itableBlocks := (uint64(f.inodesPerGroup)*uint64(f.inodeSize) + bs - 1) / bs
	gdtBlocks := (f.groups + f.perBlock - 1) / f.perBlock
	if itableBlocks > f.perGroup || f.reservedGDT > f.perGroup {
		return nil, fsimage.Corruptf("ext4: group metadata larger than a group")
	}
	b := fsimage.NewExtentBuilder(f.bs, f.size)
	// Blocks before the first group (the boot block with 1 KiB blocks).
	if err := b.Add(0, int64(f.first)); err != nil {
		return nil, err
	}
	descs := make([]byte, f.bs)
	bitmap := make([]byte, f.bs)
	for g := uint64(0); g < f.groups; g++ {
		if g%f.perBlock == 0 {
			loc, err := f.descriptorBlock(g / f.perBlock)
			if err != nil {
				return nil, err
			}
			if err := fsimage.ReadFull(f.dev, descs, int64(loc)*f.bs); err != nil {
				return nil, fmt.Errorf("ext4 group descriptors: %w", err)
			}
		}
		d := descs[(g%f.perBlock)*uint64(f.descSize):]
		blockBitmap := uint64(le.Uint32(d[0x0:]))
		inodeBitmap := uint64(le.Uint32(d[0x4:]))
		inodeTable := uint64(le.Uint32(d[0x8:]))
		if f.descSize >= 64 {
			blockBitmap |= uint64(le.Uint32(d[0x20:])) << 32
			inodeBitmap |= uint64(le.Uint32(d[0x24:])) << 32
			inodeTable |= uint64(le.Uint32(d[0x28:])) << 32
		}
		for _, m := range [][2]uint64{{blockBitmap, 1}, {inodeBitmap, 1}, {inodeTable, itableBlocks}} {
			if m[0] < f.first || m[0] >= f.blocks || m[1] > f.blocks-m[0] {
				return nil, fsimage.Corruptf("ext4 group %d: metadata block %d outside the filesystem", g, m[0])
			}
		}
		start := f.first + g*f.perGroup
		n := min(f.perGroup, f.blocks-start)
		if le.Uint16(d[0x12:])&bgBlockUninit != 0 {
			for _, m := range [][2]uint64{{start, min(n, f.baseMetaBlocks(g, gdtBlocks))}, {blockBitmap, 1}, {inodeBitmap, 1}, {inodeTable, itableBlocks}} {
				if err := b.Add(int64(m[0]), int64(m[1])); err != nil {
					return nil, err
				}
			}
			continue
		}
		if err := fsimage.ReadFull(f.dev, bitmap, int64(blockBitmap)*f.bs); err != nil {
			return nil, fmt.Errorf("ext4 group %d bitmap: %w", g, err)
		}
		run := int64(-1)
		for i := uint64(0); i < n; i++ {
			set := bitmap[i>>3]&(1<<(i&7)) != 0
			switch {
			case set && run < 0:
				run = int64(i)
			case !set && run >= 0:
				if err := b.Add(int64(start)+run, int64(i)-run); err != nil {
					return nil, err
				}
				run = -1
			}
		}
		if run >= 0 {
			if err := b.Add(int64(start)+run, int64(n)-run); err != nil {
				return nil, err
			}
		}
	}
	if err := b.Rest(int64(f.blocks)); err != nil {
		return nil, err
	}
	return b.Extents(), nil
}

// baseMetaBlocks counts the superblock backup and descriptor blocks at the start of group
// g, as the kernel's ext4_num_base_meta_blocks does.
func (f *FS) baseMetaBlocks(g, gdtBlocks uint64) uint64 {
	n := uint64(0)
	if f.hasSuper(g) {
		n = 1
	}
	if !f.metaBG || g < f.firstMeta*f.perBlock {
		if n > 0 {
			if f.metaBG {
				n += f.firstMeta
			} else {
				n += gdtBlocks
			}
			n += f.reservedGDT
		}
		return n
	}
	first := g / f.perBlock * f.perBlock
	if g == first || g == first+1 || g == first+f.perBlock-1 {
		n++
	}
	return n
}

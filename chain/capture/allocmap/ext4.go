package allocmap

import (
	"encoding/binary"
	"fmt"
	"io"
)

const (
	ext4Incompat64Bit   = 0x80
	ext4IncompatMetaBG  = 0x10
	ext4RoCompatBigaloc = 0x200
	ext4BGBlockUninit   = 0x2
)

// ext4Allocated maps an ext4 (or ext2/3) filesystem from its block bitmaps. Groups whose
// bitmap was never initialised (BLOCK_UNINIT) hold only their metadata, which is included.
func ext4Allocated(r io.ReaderAt, size int64, sb []byte) ([]Extent, error) {
	le := binary.LittleEndian
	logBS := le.Uint32(sb[0x18:])
	if logBS > 6 {
		return nil, fmt.Errorf("ext4: block size 2^%d KiB out of range", logBS)
	}
	bs := int64(1024) << logBS
	incompat, roCompat := le.Uint32(sb[0x60:]), le.Uint32(sb[0x64:])
	if incompat&ext4IncompatMetaBG != 0 || roCompat&ext4RoCompatBigaloc != 0 {
		return nil, fmt.Errorf("%w: ext4 with meta_bg or bigalloc", ErrUnknown)
	}
	blocks := int64(le.Uint32(sb[0x4:]))
	descSize := int64(32)
	if incompat&ext4Incompat64Bit != 0 {
		blocks |= int64(le.Uint32(sb[0x150:])) << 32
		descSize = int64(le.Uint16(sb[0xFE:]))
		if descSize < 64 || descSize > 1024 || descSize&(descSize-1) != 0 {
			return nil, fmt.Errorf("ext4: descriptor size %d invalid", descSize)
		}
	}
	first := int64(le.Uint32(sb[0x14:]))
	perGroup := int64(le.Uint32(sb[0x20:]))
	if perGroup == 0 || perGroup > bs*8 || blocks <= first || blocks*bs > size {
		return nil, fmt.Errorf("ext4: geometry (%d blocks of %d, %d per group) does not fit the %d-byte device", blocks, bs, perGroup, size)
	}
	inodesPerGroup, inodeSize := int64(le.Uint32(sb[0x28:])), int64(le.Uint16(sb[0x58:]))
	if inodeSize == 0 {
		inodeSize = 128
	}
	itableBlocks := (inodesPerGroup*inodeSize + bs - 1) / bs
	reservedGDT := int64(le.Uint16(sb[0xCE:]))
	groups := (blocks - first + perGroup - 1) / perGroup
	gdtBlocks := (groups*descSize + bs - 1) / bs
	if itableBlocks > perGroup || reservedGDT+gdtBlocks > perGroup {
		return nil, fmt.Errorf("ext4: group metadata larger than a group")
	}
	gdt := make([]byte, gdtBlocks*bs)
	if err := readFull(r, gdt, (first+1)*bs); err != nil {
		return nil, fmt.Errorf("ext4 group descriptors: %w", err)
	}
	b := &builder{bs: bs, limit: size}
	// Blocks before the first group (boot block with 1 KiB blocks) and the primary
	// superblock and descriptors.
	if err := b.add(0, first+1+gdtBlocks+reservedGDT); err != nil {
		return nil, err
	}
	bitmap := make([]byte, bs)
	for g := int64(0); g < groups; g++ {
		d := gdt[g*descSize : (g+1)*descSize]
		blockBitmap := int64(le.Uint32(d[0x0:]))
		inodeBitmap := int64(le.Uint32(d[0x4:]))
		inodeTable := int64(le.Uint32(d[0x8:]))
		if descSize >= 64 {
			blockBitmap |= int64(le.Uint32(d[0x20:])) << 32
			inodeBitmap |= int64(le.Uint32(d[0x24:])) << 32
			inodeTable |= int64(le.Uint32(d[0x28:])) << 32
		}
		for _, m := range []struct{ at, n int64 }{{blockBitmap, 1}, {inodeBitmap, 1}, {inodeTable, itableBlocks}} {
			if m.at < first || m.at+m.n > blocks {
				return nil, fmt.Errorf("ext4 group %d: metadata block %d outside the filesystem", g, m.at)
			}
		}
		start := first + g*perGroup
		n := min(perGroup, blocks-start)
		flags := le.Uint16(d[0x12:])
		if flags&ext4BGBlockUninit != 0 {
			// Backup superblock and descriptors (at most), and this group's metadata.
			for _, m := range [][2]int64{{start, min(n, 1+gdtBlocks+reservedGDT)}, {blockBitmap, 1}, {inodeBitmap, 1}, {inodeTable, itableBlocks}} {
				if err := b.add(m[0], m[1]); err != nil {
					return nil, err
				}
			}
			continue
		}
		if err := readFull(r, bitmap, blockBitmap*bs); err != nil {
			return nil, fmt.Errorf("ext4 group %d bitmap: %w", g, err)
		}
		run := int64(-1)
		for i := int64(0); i < n; i++ {
			set := bitmap[i>>3]&(1<<(i&7)) != 0
			switch {
			case set && run < 0:
				run = i
			case !set && run >= 0:
				if err := b.add(start+run, i-run); err != nil {
					return nil, err
				}
				run = -1
			}
		}
		if run >= 0 {
			if err := b.add(start+run, n-run); err != nil {
				return nil, err
			}
		}
	}
	return b.out, nil
}

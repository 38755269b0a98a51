// Package ext4 reads ext2/3/4 filesystem images: extent and block-mapped files, holes and
// unwritten extents (zeros), linear and htree directories (read linearly: an htree's index
// blocks look like empty entries), fast, slow and inline symlinks, inline data, xattrs in the
// inode, in a block and in EA inodes, 64bit and meta_bg layouts. An image that needs
// recovery (captured mounted and unfrozen) is read with its journal replayed in memory.
// Checksums are not verified; structure is, so damage is an error rather than a panic.
package ext4

import (
	"encoding/binary"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/stasis-project/stasis/chain/fsimage"
)

var le = binary.LittleEndian

const (
	superOffset = 1024
	magic       = 0xEF53

	incompatCompression = 0x1
	incompatFiletype    = 0x2
	incompatJournalDev  = 0x8
	incompatMetaBG      = 0x10
	incompat64Bit       = 0x80
	incompatDirData     = 0x1000
	incompatEncrypt     = 0x10000

	roCompatSparseSuper = 0x1
	roCompatHugeFile    = 0x8
	roCompatBigalloc    = 0x200
	compatSparseSuper2  = 0x200

	flagHugeFile   = 0x40000
	flagExtents    = 0x80000
	flagEAInode    = 0x200000
	flagInlineData = 0x10000000

	rootIno     = 2
	maxSymlink  = 4096
	maxDirBytes = 256 << 20 // a directory larger than this is treated as damage
	maxXattr    = 1 << 20
)

// Probe reports whether the image starts like ext2/3/4.
func Probe(dev io.ReaderAt) bool {
	var b [2]byte
	_, err := dev.ReadAt(b[:], superOffset+0x38)
	return err == nil && le.Uint16(b[:]) == magic
}

// FS is an ext4 image.
type FS struct {
	dev            io.ReaderAt
	size           int64
	bs             int64
	blocks         uint64
	inodes         uint32
	inodesPerGroup uint32
	inodeSize      int64
	descSize       int64
	filetype       bool
	hugeFile       bool
	needsRecovery  bool
	journalIno     uint64

	// Where group descriptors are: read one at a time, when an inode of that group is
	// first wanted, so a huge (or hostile) group count costs nothing up front.
	groups, perBlock, first, perGroup uint64
	metaBG, sparseSuper, sparseSuper2 bool
	firstMeta                         uint64
	backups                           [2]uint64
	reservedGDT                       uint64
	bigalloc                          bool
	uuid                              [16]byte
}

// hasSuper reports whether group g holds a superblock backup (and so, with meta_bg, its
// descriptor block comes one block later).
func (f *FS) hasSuper(g uint64) bool {
	switch {
	case g == 0:
		return true
	case f.sparseSuper2:
		return g == f.backups[0] || g == f.backups[1]
	case g <= 1 || !f.sparseSuper:
		return true
	case g&1 == 0:
		return false
	}
	for _, base := range []uint64{3, 5, 7} {
		p := base
		for p < g {
			p *= base
		}
		if p == g {
			return true
		}
	}
	return false
}

// descriptor returns group g's descriptor.
func (f *FS) descriptor(g uint64) ([]byte, error) {
	if g >= f.groups {
		return nil, fsimage.Corruptf("group %d of %d", g, f.groups)
	}
	loc, err := f.descriptorBlock(g / f.perBlock)
	if err != nil {
		return nil, err
	}
	d := make([]byte, f.descSize)
	return d, fsimage.ReadFull(f.dev, d, int64(loc)*f.bs+int64(g%f.perBlock)*f.descSize)
}

// descriptorBlock returns where descriptor block nr (of groups nr*perBlock...) is.
func (f *FS) descriptorBlock(nr uint64) (uint64, error) {
	loc := f.first + nr + 1
	if f.metaBG && nr >= f.firstMeta {
		mg := nr * f.perBlock
		loc = mg*f.perGroup + f.first
		if f.hasSuper(mg) {
			loc++
		}
	}
	if loc >= f.blocks {
		return 0, fsimage.Corruptf("descriptor block %d beyond the filesystem", loc)
	}
	return loc, nil
}

var _ fsimage.FS = (*FS)(nil)

// Open reads the superblock and group descriptors of the image on dev (size bytes). A
// filesystem that needs recovery is seen with its journal's committed transactions
// replayed (in memory), as the kernel would mount it.
func Open(dev io.ReaderAt, size int64) (*FS, error) {
	f, err := open(dev, size)
	if err != nil || !f.needsRecovery {
		return f, err
	}
	blocks, err := f.journalOverlay(f.journalIno)
	if err != nil {
		return nil, fmt.Errorf("replay the journal: %w", err)
	}
	if len(blocks) == 0 {
		return f, nil
	}
	f2, err := open(&replayed{dev: dev, bs: f.bs, blocks: blocks}, size)
	if err != nil {
		return nil, fmt.Errorf("after replaying the journal: %w", err)
	}
	return f2, nil
}

func open(dev io.ReaderAt, size int64) (*FS, error) {
	sb := make([]byte, 1024)
	if err := fsimage.ReadFull(dev, sb, superOffset); err != nil {
		return nil, fmt.Errorf("ext4 superblock: %w", err)
	}
	if le.Uint16(sb[0x38:]) != magic {
		return nil, fsimage.Corruptf("no ext4 superblock")
	}
	f := &FS{dev: dev, size: size}
	logBS := le.Uint32(sb[0x18:])
	if logBS > 6 {
		return nil, fsimage.Corruptf("ext4 block size 2^%d KiB", logBS)
	}
	f.bs = 1024 << logBS
	incompat, roCompat, compat := le.Uint32(sb[0x60:]), le.Uint32(sb[0x64:]), le.Uint32(sb[0x5C:])
	if bad := incompat & (incompatCompression | incompatJournalDev | incompatDirData | incompatEncrypt); bad != 0 {
		return nil, fmt.Errorf("%w: ext4 incompatible features %#x (compression, journal device, dirdata or encryption)", fsimage.ErrUnsupported, bad)
	}
	f.filetype = incompat&incompatFiletype != 0
	f.needsRecovery = incompat&incompatRecover != 0 && compat&compatHasJournal != 0
	f.journalIno = uint64(le.Uint32(sb[0xE0:]))
	f.hugeFile = roCompat&roCompatHugeFile != 0
	f.blocks = uint64(le.Uint32(sb[0x4:]))
	f.descSize = 32
	if incompat&incompat64Bit != 0 {
		f.blocks |= uint64(le.Uint32(sb[0x150:])) << 32
		f.descSize = int64(le.Uint16(sb[0xFE:]))
		if f.descSize < 64 || f.descSize > 1024 || f.descSize&(f.descSize-1) != 0 {
			return nil, fsimage.Corruptf("ext4 descriptor size %d", f.descSize)
		}
	}
	if f.blocks == 0 || f.blocks > uint64(size/f.bs)+1 {
		return nil, fsimage.Corruptf("ext4 has %d blocks of %d bytes but the image is %d bytes", f.blocks, f.bs, size)
	}
	f.inodes = le.Uint32(sb[0x0:])
	f.inodesPerGroup = le.Uint32(sb[0x28:])
	perGroup := uint64(le.Uint32(sb[0x20:]))
	first := uint64(le.Uint32(sb[0x14:]))
	f.inodeSize = 128
	if le.Uint32(sb[0x4C:]) >= 1 { // dynamic revision
		f.inodeSize = int64(le.Uint16(sb[0x58:]))
	}
	if f.inodeSize < 128 || f.inodeSize > f.bs || f.inodeSize&(f.inodeSize-1) != 0 {
		return nil, fsimage.Corruptf("ext4 inode size %d", f.inodeSize)
	}
	if perGroup == 0 || f.inodesPerGroup == 0 || first >= f.blocks {
		return nil, fsimage.Corruptf("ext4 group geometry")
	}
	groups := (f.blocks - first + perGroup - 1) / perGroup
	if uint64(f.inodes) > groups*uint64(f.inodesPerGroup) {
		return nil, fsimage.Corruptf("ext4 counts %d inodes in %d groups of %d", f.inodes, groups, f.inodesPerGroup)
	}
	f.groups = groups
	f.perBlock = uint64(f.bs / f.descSize)
	f.first, f.perGroup = first, perGroup
	f.metaBG = incompat&incompatMetaBG != 0
	f.firstMeta = uint64(le.Uint32(sb[0x104:]))
	f.sparseSuper = roCompat&roCompatSparseSuper != 0
	f.sparseSuper2 = compat&compatSparseSuper2 != 0
	f.backups = [2]uint64{uint64(le.Uint32(sb[0x24C:])), uint64(le.Uint32(sb[0x250:]))}
	f.reservedGDT = uint64(le.Uint16(sb[0xCE:]))
	f.bigalloc = roCompat&roCompatBigalloc != 0
	copy(f.uuid[:], sb[0x68:0x78])
	if _, err := f.descriptor(0); err != nil {
		return nil, fmt.Errorf("ext4 group descriptors: %w", err)
	}
	return f, nil
}

// Type implements fsimage.FS.
func (f *FS) Type() string { return "ext4" }

// Root implements fsimage.FS.
func (f *FS) Root() uint64 { return rootIno }

func (f *FS) block(n uint64) ([]byte, error) {
	if n >= f.blocks {
		return nil, fsimage.Corruptf("block %d beyond the filesystem's %d", n, f.blocks)
	}
	b := make([]byte, f.bs)
	return b, fsimage.ReadFull(f.dev, b, int64(n)*f.bs)
}

// Open implements fsimage.FS.
func (f *FS) Open(ino uint64) (fsimage.Inode, error) { return f.inode(ino) }

func (f *FS) inode(ino uint64) (*inode, error) {
	if ino == 0 || ino > uint64(f.inodes) {
		return nil, fsimage.Corruptf("inode %d out of range 1..%d", ino, f.inodes)
	}
	group, index := (ino-1)/uint64(f.inodesPerGroup), (ino-1)%uint64(f.inodesPerGroup)
	d, err := f.descriptor(group)
	if err != nil {
		return nil, fmt.Errorf("inode %d: %w", ino, err)
	}
	table := uint64(le.Uint32(d[0x8:]))
	if f.descSize >= 64 {
		table |= uint64(le.Uint32(d[0x28:])) << 32
	}
	off := table*uint64(f.bs) + index*uint64(f.inodeSize)
	if table >= f.blocks || off/uint64(f.bs) >= f.blocks {
		return nil, fsimage.Corruptf("inode %d: inode table at block %d is outside the filesystem", ino, table)
	}
	raw := make([]byte, f.inodeSize)
	if err := fsimage.ReadFull(f.dev, raw, int64(off)); err != nil {
		return nil, fmt.Errorf("inode %d: %w", ino, err)
	}
	n := &inode{fs: f, ino: ino, raw: raw}
	n.mode = uint32(le.Uint16(raw[0:]))
	n.flags = le.Uint32(raw[0x20:])
	n.size = uint64(le.Uint32(raw[0x4:])) | uint64(le.Uint32(raw[0x6C:]))<<32
	n.fileACL = uint64(le.Uint32(raw[0x68:])) | uint64(le.Uint16(raw[0x76:]))<<32
	if f.inodeSize > 128 {
		n.extra = int64(le.Uint16(raw[0x80:]))
		if 128+n.extra > f.inodeSize || n.extra&3 != 0 {
			return nil, fsimage.Corruptf("inode %d: extra size %d", ino, n.extra)
		}
	}
	if n.mode&fsimage.S_IFMT == 0 || le.Uint16(raw[0x1A:]) == 0 && le.Uint32(raw[0x14:]) != 0 {
		return nil, fsimage.Corruptf("inode %d is not in use", ino)
	}
	return n, nil
}

type inode struct {
	fs      *FS
	ino     uint64
	raw     []byte
	mode    uint32
	flags   uint32
	size    uint64
	fileACL uint64
	extra   int64 // i_extra_isize
}

var _ fsimage.Inode = (*inode)(nil)

func (n *inode) typ() uint32 { return n.mode & fsimage.S_IFMT }

// timestamp decodes a 32-bit seconds field and its optional extra word (epoch bits and
// nanoseconds), which exists when i_extra_isize covers it.
func (n *inode) timestamp(at, extraAt int) time.Time {
	sec := int64(int32(le.Uint32(n.raw[at:])))
	var nsec int64
	if int64(extraAt)+4 <= 128+n.extra {
		x := le.Uint32(n.raw[extraAt:])
		sec += int64(x&3) << 32
		nsec = int64(x >> 2)
	}
	return time.Unix(sec, nsec)
}

func (n *inode) Attr() fsimage.Attr {
	r := n.raw
	a := fsimage.Attr{
		Ino:   n.ino,
		Mode:  n.mode,
		Nlink: uint32(le.Uint16(r[0x1A:])),
		UID:   uint32(le.Uint16(r[0x2:])) | uint32(le.Uint16(r[0x78:]))<<16,
		GID:   uint32(le.Uint16(r[0x18:])) | uint32(le.Uint16(r[0x7A:]))<<16,
		Size:  n.size,
		Ctime: n.timestamp(0xC, 0x84),
		Mtime: n.timestamp(0x10, 0x88),
		Atime: n.timestamp(0x8, 0x8C),
	}
	a.Blocks = uint64(le.Uint32(r[0x1C:]))
	if n.fs.hugeFile {
		a.Blocks |= uint64(le.Uint16(r[0x74:])) << 32
		if n.flags&flagHugeFile != 0 {
			a.Blocks *= uint64(n.fs.bs / 512)
		}
	}
	if t := n.typ(); t == fsimage.S_IFBLK || t == fsimage.S_IFCHR {
		// Old encoding in i_block[0], new (huge) encoding in i_block[1]; both are the
		// kernel's new_encode_dev form when read back.
		if a.Rdev = le.Uint32(r[0x28:]); a.Rdev == 0 {
			a.Rdev = le.Uint32(r[0x2C:])
		}
	}
	return a
}

func (n *inode) iblock() []byte { return n.raw[0x28 : 0x28+60] }

func (n *inode) ReadAt(p []byte, off int64) (int, error) {
	if n.typ() != fsimage.S_IFREG {
		return 0, fmt.Errorf("inode %d is not a regular file", n.ino)
	}
	return n.read(p, off)
}

// read reads the inode's data whatever its type.
func (n *inode) read(p []byte, off int64) (int, error) {
	if n.flags&flagInlineData != 0 {
		data, err := n.inlineData()
		if err != nil {
			return 0, err
		}
		if off >= int64(len(data)) {
			if off >= int64(n.size) {
				return 0, io.EOF
			}
			return 0, fsimage.Corruptf("inode %d: inline data shorter than the file", n.ino)
		}
		c := copy(p, data[off:])
		if c < len(p) {
			return c, io.EOF
		}
		return c, nil
	}
	return fsimage.SlabReader(n.fs.dev, int64(min(n.size, 1<<62)), p, off, n.mapOffset)
}

// mapOffset maps a byte offset of the file to the image.
func (n *inode) mapOffset(off int64) (int64, int64, error) {
	bs := n.fs.bs
	lblk := uint64(off / bs)
	var pblk, count uint64
	var hole bool
	var err error
	if n.flags&flagExtents != 0 {
		pblk, count, hole, err = n.mapExtent(lblk)
	} else {
		pblk, hole, err = n.mapIndirect(lblk)
		count = 1
	}
	if err != nil {
		return 0, 0, fmt.Errorf("inode %d block %d: %w", n.ino, lblk, err)
	}
	within := off % bs
	length := int64(count)*bs - within
	if hole {
		return -1, length, nil
	}
	if pblk+count > n.fs.blocks || pblk+count < pblk {
		return 0, 0, fsimage.Corruptf("inode %d: blocks %d+%d beyond the filesystem", n.ino, pblk, count)
	}
	return int64(pblk)*bs + within, length, nil
}

const (
	extentMagic    = 0xF30A
	maxExtentDepth = 5
	initMaxLen     = 32768
)

// mapExtent finds logical block lblk in the extent tree: the physical block and how many
// blocks from there are contiguous, or a hole (or unwritten extent) and its length.
func (n *inode) mapExtent(lblk uint64) (pblk, count uint64, hole bool, err error) {
	node := n.iblock()
	// bound is where the subtree being searched ends: the next entry of an index above it
	// starts there, so a hole after a leaf's last extent ends there too, not at 2^32.
	bound := uint64(1 << 32)
	for depth := -1; ; {
		if len(node) < 12 || le.Uint16(node) != extentMagic {
			return 0, 0, false, fsimage.Corruptf("bad extent header")
		}
		entries, d := int(le.Uint16(node[2:])), int(le.Uint16(node[6:]))
		if 12+entries*12 > len(node) || d > maxExtentDepth || depth >= 0 && d != depth {
			return 0, 0, false, fsimage.Corruptf("extent node with %d entries at depth %d", entries, d)
		}
		// The last entry starting at or before lblk.
		i := -1
		lo, hi := 0, entries
		for lo < hi {
			m := (lo + hi) / 2
			if uint64(le.Uint32(node[12+m*12:])) <= lblk {
				i, lo = m, m+1
			} else {
				hi = m
			}
		}
		if d == 0 {
			next := bound // first block of the next extent, ending a hole
			if i+1 < entries {
				next = uint64(le.Uint32(node[12+(i+1)*12:]))
			}
			if next <= lblk {
				return 0, 0, false, fsimage.Corruptf("extents out of order")
			}
			if i < 0 {
				return 0, next - lblk, true, nil
			}
			e := node[12+i*12:]
			start, length := uint64(le.Uint32(e)), uint64(le.Uint16(e[4:]))
			unwritten := length > initMaxLen
			if unwritten {
				length -= initMaxLen
			}
			if lblk >= start+length {
				return 0, next - lblk, true, nil
			}
			if unwritten {
				return 0, start + length - lblk, true, nil
			}
			phys := uint64(le.Uint16(e[6:]))<<32 | uint64(le.Uint32(e[8:]))
			return phys + lblk - start, start + length - lblk, false, nil
		}
		if i < 0 {
			// Before the first index entry: a hole up to it.
			return 0, uint64(le.Uint32(node[12:])) - lblk, true, nil
		}
		if i+1 < entries {
			bound = uint64(le.Uint32(node[12+(i+1)*12:]))
		}
		e := node[12+i*12:]
		child := uint64(le.Uint16(e[8:]))<<32 | uint64(le.Uint32(e[4:]))
		if node, err = n.fs.block(child); err != nil {
			return 0, 0, false, err
		}
		depth = d - 1
	}
}

// mapIndirect walks the classic direct/indirect/double/triple block map.
func (n *inode) mapIndirect(lblk uint64) (uint64, bool, error) {
	per := uint64(n.fs.bs / 4)
	ib := n.iblock()
	if lblk < 12 {
		b := uint64(le.Uint32(ib[lblk*4:]))
		return b, b == 0, nil
	}
	lblk -= 12
	level, span := 1, per
	for lblk >= span {
		lblk -= span
		level++
		if level > 3 {
			return 0, false, fsimage.Corruptf("block beyond a triple-indirect map")
		}
		span *= per
	}
	ptr := uint64(le.Uint32(ib[(11+level)*4:]))
	for ; level > 0; level-- {
		if ptr == 0 {
			return 0, true, nil
		}
		blk, err := n.fs.block(ptr)
		if err != nil {
			return 0, false, err
		}
		span /= per
		ptr = uint64(le.Uint32(blk[(lblk/span)*4:]))
		lblk %= span
	}
	return ptr, ptr == 0, nil
}

// inlineData is the content of an inline-data inode: i_block, then the system.data xattr.
func (n *inode) inlineData() ([]byte, error) {
	data := append([]byte(nil), n.iblock()...)
	if n.size > 60 {
		xs, err := n.rawXattrs(false)
		if err != nil {
			return nil, err
		}
		for _, x := range xs {
			if x.Name == "system.data" {
				data = append(data, x.Value...)
			}
		}
	}
	if uint64(len(data)) > n.size && n.typ() != fsimage.S_IFDIR {
		data = data[:n.size]
	}
	return data, nil
}

func (n *inode) Readlink() (string, error) {
	if n.typ() != fsimage.S_IFLNK {
		return "", fmt.Errorf("inode %d is not a symbolic link", n.ino)
	}
	if n.size == 0 || n.size > maxSymlink {
		return "", fsimage.Corruptf("symlink inode %d has length %d", n.ino, n.size)
	}
	eaBlocks := uint64(0)
	if n.fileACL != 0 {
		eaBlocks = uint64(n.fs.bs / 512)
	}
	if n.flags&(flagInlineData|flagExtents) == 0 && n.flags&flagEAInode == 0 && uint64(le.Uint32(n.raw[0x1C:])) <= eaBlocks && n.size < 60 {
		return string(n.iblock()[:n.size]), nil // fast symlink
	}
	b := make([]byte, n.size)
	if _, err := n.read(b, 0); err != nil && err != io.EOF {
		return "", err
	}
	return string(b), nil
}

func (n *inode) ReadDir() ([]fsimage.DirEntry, error) {
	if n.typ() != fsimage.S_IFDIR {
		return nil, fmt.Errorf("inode %d is not a directory", n.ino)
	}
	var out []fsimage.DirEntry
	if n.flags&flagInlineData != 0 {
		data, err := n.inlineData()
		if err != nil {
			return nil, err
		}
		// Four bytes of parent inode, the rest of i_block, then system.data: each is a
		// run of entries of its own.
		if out, err = n.parseDirBlock(out, data[4:60]); err != nil {
			return nil, err
		}
		if len(data) > 60 {
			return n.parseDirBlock(out, data[60:])
		}
		return out, nil
	}
	if n.size > maxDirBytes {
		return nil, fsimage.Corruptf("directory inode %d has size %d", n.ino, n.size)
	}
	bs := n.fs.bs
	blk := make([]byte, bs)
	for off := int64(0); off < int64(n.size); {
		phys, length, err := n.mapOffset(off)
		if err != nil {
			return nil, err
		}
		if phys < 0 { // a hole in a directory: skip it
			off += length
			continue
		}
		if err := fsimage.ReadFull(n.fs.dev, blk, phys); err != nil {
			return nil, err
		}
		if out, err = n.parseDirBlock(out, blk); err != nil {
			return nil, err
		}
		off += bs
	}
	return out, nil
}

// parseDirBlock appends the entries of one directory block (or inline region).
func (n *inode) parseDirBlock(out []fsimage.DirEntry, b []byte) ([]fsimage.DirEntry, error) {
	for pos := 0; pos+8 <= len(b); {
		ino := le.Uint32(b[pos:])
		recLen := int(le.Uint16(b[pos+4:]))
		if n.fs.bs >= 65536 && (recLen == 65535 || recLen == 0) {
			recLen = int(n.fs.bs)
		}
		nameLen := int(b[pos+6])
		if !n.fs.filetype {
			nameLen = int(le.Uint16(b[pos+6:]))
		}
		if recLen < 8 || recLen&3 != 0 || pos+recLen > len(b) || 8+nameLen > recLen {
			return out, fsimage.Corruptf("directory inode %d: entry at %d has length %d, name %d", n.ino, pos, recLen, nameLen)
		}
		if ino != 0 && nameLen > 0 {
			name := string(b[pos+8 : pos+8+nameLen])
			if name != "." && name != ".." {
				if strings.ContainsRune(name, '/') || strings.ContainsRune(name, 0) {
					return out, fsimage.Corruptf("directory inode %d: name %q", n.ino, name)
				}
				out = append(out, fsimage.DirEntry{Name: name, Ino: uint64(ino)})
			}
		}
		pos += recLen
	}
	return out, nil
}

func (n *inode) Xattrs() ([]fsimage.Xattr, error) { return n.rawXattrs(true) }

const xattrMagic = 0xEA020000

var xattrPrefix = map[byte]string{
	1: "user.", 2: "system.posix_acl_access", 3: "system.posix_acl_default",
	4: "trusted.", 6: "security.", 7: "system.", 8: "system.richacl",
}

// rawXattrs lists the inode's xattrs, in-inode first. public hides the internal
// system.data and converts POSIX ACLs to the form getxattr(2) returns.
func (n *inode) rawXattrs(public bool) ([]fsimage.Xattr, error) {
	var out []fsimage.Xattr
	if start := 128 + n.extra; n.extra > 0 && start+4 <= n.fs.inodeSize && le.Uint32(n.raw[start:]) == xattrMagic {
		region := n.raw[start+4:]
		var err error
		if out, err = n.parseXattrs(out, region, region, public); err != nil {
			return nil, err
		}
	}
	if n.fileACL != 0 {
		blk, err := n.fs.block(n.fileACL)
		if err != nil {
			return nil, fmt.Errorf("inode %d xattr block: %w", n.ino, err)
		}
		if le.Uint32(blk) != xattrMagic {
			return nil, fsimage.Corruptf("inode %d: xattr block %d has no header", n.ino, n.fileACL)
		}
		if out, err = n.parseXattrs(out, blk[32:], blk, public); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func (n *inode) parseXattrs(out []fsimage.Xattr, entries, values []byte, public bool) ([]fsimage.Xattr, error) {
	for pos := 0; pos+4 <= len(entries) && le.Uint32(entries[pos:]) != 0; {
		if pos+16 > len(entries) {
			return nil, fsimage.Corruptf("inode %d: xattr entry past its region", n.ino)
		}
		e := entries[pos:]
		nameLen, index := int(e[0]), e[1]
		valOff, valIno, valSize := int(le.Uint16(e[2:])), uint64(le.Uint32(e[4:])), int(le.Uint32(e[8:]))
		if 16+nameLen > len(e) || valSize > maxXattr {
			return nil, fsimage.Corruptf("inode %d: xattr entry at %d", n.ino, pos)
		}
		name := string(e[16 : 16+nameLen])
		pos += (16 + nameLen + 3) &^ 3
		var value []byte
		if valIno != 0 {
			v, err := n.eaInodeValue(valIno, valSize)
			if err != nil {
				return nil, err
			}
			value = v
		} else {
			if valOff+valSize > len(values) {
				return nil, fsimage.Corruptf("inode %d: xattr %q value outside its region", n.ino, name)
			}
			value = append([]byte(nil), values[valOff:valOff+valSize]...)
		}
		prefix, ok := xattrPrefix[index]
		if !ok {
			continue
		}
		full := prefix + name
		if public {
			if full == "system.data" {
				continue
			}
			if index == 2 || index == 3 {
				v, err := aclToXattr(value)
				if err != nil {
					return nil, fmt.Errorf("inode %d %s: %w", n.ino, full, err)
				}
				value = v
			}
		}
		out = append(out, fsimage.Xattr{Name: full, Value: value})
	}
	return out, nil
}

// eaInodeValue reads a large xattr value kept in its own inode (ea_inode feature).
func (n *inode) eaInodeValue(ino uint64, size int) ([]byte, error) {
	ea, err := n.fs.inode(ino)
	if err != nil {
		return nil, fmt.Errorf("inode %d xattr value: %w", n.ino, err)
	}
	if ea.flags&flagEAInode == 0 || ea.flags&flagInlineData != 0 || ea.size != uint64(size) {
		return nil, fsimage.Corruptf("inode %d: xattr value inode %d does not match", n.ino, ino)
	}
	v := make([]byte, size)
	if _, err := ea.read(v, 0); err != nil && err != io.EOF {
		return nil, err
	}
	return v, nil
}

// ACL tags that carry an id.
const (
	aclUser  = 0x02
	aclGroup = 0x08
)

// aclToXattr converts ext4's compact POSIX ACL (version 1, short entries without ids) to
// the xattr form the kernel returns (version 2, every entry 8 bytes).
func aclToXattr(b []byte) ([]byte, error) {
	if len(b) < 4 || le.Uint32(b) != 1 {
		return nil, fsimage.Corruptf("ACL header")
	}
	out := le.AppendUint32(nil, 2)
	for pos := 4; pos < len(b); {
		if pos+4 > len(b) {
			return nil, fsimage.Corruptf("ACL entry")
		}
		tag, perm := le.Uint16(b[pos:]), le.Uint16(b[pos+2:])
		id := uint32(0xFFFFFFFF)
		pos += 4
		if tag == aclUser || tag == aclGroup {
			if pos+4 > len(b) {
				return nil, fsimage.Corruptf("ACL entry")
			}
			id = le.Uint32(b[pos:])
			pos += 4
		}
		out = le.AppendUint16(out, tag)
		out = le.AppendUint16(out, perm)
		out = le.AppendUint32(out, id)
	}
	return out, nil
}

// Map implements fsimage.Mapper.
func (n *inode) Map(off int64) (int64, int64, error) {
	if n.typ() != fsimage.S_IFREG {
		return 0, 0, fmt.Errorf("inode %d is not a regular file", n.ino)
	}
	if n.flags&flagInlineData != 0 {
		return 0, 0, fsimage.ErrNotMapped
	}
	if off < 0 {
		return 0, 0, fmt.Errorf("negative offset")
	}
	return n.mapOffset(off)
}

// Replayed implements fsimage.Replayer: the journal needed recovery and was replayed.
func (f *FS) Replayed() bool {
	_, ok := f.dev.(*replayed)
	return ok
}

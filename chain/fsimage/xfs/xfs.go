// Package xfs reads XFS v5 (CRC-enabled) filesystem images: files in extent lists and
// B+trees (reflinked files are just extents that share blocks), holes and unwritten extents
// as zeros, directories in every form (short-form, block, leaf, node), local and remote
// symlinks, and xattrs in short-form, leaf and node attribute forks with remote values.
// It does not replay the log: a frozen filesystem is clean; a crash-consistent one shows
// its last checkpoint. Checksums are not verified; structure is, so damage is an error.
package xfs

import (
	"encoding/binary"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/stasis-project/stasis/chain/fsimage"
)

var be = binary.BigEndian

const (
	sbMagic = 0x58465342 // XFSB

	incompatFtype       = 0x1
	incompatNeedsRepair = 0x10

	inodeMagic = 0x494e // IN
	coreSize   = 176    // v3 inode core

	fmtDev     = 0
	fmtLocal   = 1
	fmtExtents = 2
	fmtBtree   = 3

	flags2Bigtime  = 0x8
	flags2NRext64  = 0x10
	diflagRealtime = 0x1

	maxExtents  = 1 << 20 // per fork; more is treated as damage
	maxBtreeLvl = 9
	maxSymlink  = 1024
	dirLeafOff  = 1 << 35 // directory data blocks live below this byte offset
	maxXattr    = 1 << 20
	maxDirBytes = 256 << 20 // directory data larger than this is treated as damage
	maxAttrBlks = 4096      // attribute fork blocks read for one listing
)

// Probe reports whether the image starts like XFS.
func Probe(dev io.ReaderAt) bool {
	var b [4]byte
	_, err := dev.ReadAt(b[:], 0)
	return err == nil && be.Uint32(b[:]) == sbMagic
}

// FS is an XFS image.
type FS struct {
	dev       io.ReaderAt
	bs        int64
	dblocks   uint64
	agblocks  uint64
	agcount   uint64
	agblklog  uint
	inopblog  uint
	inodeSize int64
	rootIno   uint64
	dirBlk    int64 // directory block size in bytes
	ftype     bool
	size      int64 // of the device
	sectSize  int64
	uuid      [16]byte
}

var _ fsimage.FS = (*FS)(nil)

// Open reads the superblock of the image on dev (size bytes).
func Open(dev io.ReaderAt, size int64) (*FS, error) {
	sb := make([]byte, 512)
	if err := fsimage.ReadFull(dev, sb, 0); err != nil {
		return nil, fmt.Errorf("xfs superblock: %w", err)
	}
	if be.Uint32(sb) != sbMagic {
		return nil, fsimage.Corruptf("no xfs superblock")
	}
	if v := be.Uint16(sb[100:]) & 0xF; v != 5 {
		return nil, fmt.Errorf("%w: XFS version %d (only v5, the default since xfsprogs 3.2.3, is read)", fsimage.ErrUnsupported, v)
	}
	f := &FS{dev: dev, size: size}
	f.bs = int64(be.Uint32(sb[4:]))
	f.sectSize = int64(be.Uint16(sb[102:]))
	copy(f.uuid[:], sb[32:48])
	f.dblocks = be.Uint64(sb[8:])
	f.rootIno = be.Uint64(sb[56:])
	f.agblocks = uint64(be.Uint32(sb[84:]))
	f.agcount = uint64(be.Uint32(sb[88:]))
	f.inodeSize = int64(be.Uint16(sb[104:]))
	blocklog, inodelog := sb[120], sb[122]
	f.inopblog, f.agblklog = uint(sb[123]), uint(sb[124])
	dirblklog := uint(sb[192])
	incompat := be.Uint32(sb[216:])
	switch {
	case blocklog < 9 || blocklog > 16 || f.bs != 1<<blocklog:
		return nil, fsimage.Corruptf("xfs block size %d", f.bs)
	case inodelog < 8 || inodelog > 11 || f.inodeSize != 1<<inodelog || f.inodeSize > f.bs:
		return nil, fsimage.Corruptf("xfs inode size %d", f.inodeSize)
	case f.inopblog != uint(blocklog-inodelog):
		return nil, fsimage.Corruptf("xfs inodes per block")
	case f.agblklog > 31 || f.agblocks == 0 || f.agblocks > 1<<f.agblklog || f.agcount == 0:
		return nil, fsimage.Corruptf("xfs allocation groups (%d of %d blocks)", f.agcount, f.agblocks)
	case f.dblocks > uint64(size/f.bs)+1 || f.dblocks > f.agcount*f.agblocks:
		return nil, fsimage.Corruptf("xfs has %d blocks of %d bytes but the image is %d bytes", f.dblocks, f.bs, size)
	case f.sectSize < 512 || f.sectSize > f.bs || f.sectSize&(f.sectSize-1) != 0:
		return nil, fsimage.Corruptf("xfs sector size %d", f.sectSize)
	case dirblklog > 8 || f.bs<<dirblklog > 1<<16:
		return nil, fsimage.Corruptf("xfs directory block size")
	case incompat&incompatNeedsRepair != 0:
		return nil, fmt.Errorf("%w: the xfs filesystem is marked as needing xfs_repair", fsimage.ErrUnsupported)
	}
	f.dirBlk = f.bs << dirblklog
	f.ftype = incompat&incompatFtype != 0
	return f, nil
}

// Type implements fsimage.FS.
func (f *FS) Type() string { return "xfs" }

// Root implements fsimage.FS.
func (f *FS) Root() uint64 { return f.rootIno }

// fsbByte converts a filesystem block number (AG number and block within it) to a byte
// offset in the image.
func (f *FS) fsbByte(fsb uint64) (int64, error) {
	ag, agb := fsb>>f.agblklog, fsb&(1<<f.agblklog-1)
	if ag >= f.agcount || agb >= f.agblocks {
		return 0, fsimage.Corruptf("block %d (AG %d block %d) outside the filesystem", fsb, ag, agb)
	}
	return int64(ag*f.agblocks+agb) * f.bs, nil
}

func (f *FS) block(fsb uint64) ([]byte, error) {
	off, err := f.fsbByte(fsb)
	if err != nil {
		return nil, err
	}
	b := make([]byte, f.bs)
	return b, fsimage.ReadFull(f.dev, b, off)
}

// Open implements fsimage.FS.
func (f *FS) Open(ino uint64) (fsimage.Inode, error) { return f.inode(ino) }

func (f *FS) inode(ino uint64) (*inode, error) {
	agino := ino & (1<<(f.inopblog+f.agblklog) - 1)
	ag := ino >> (f.inopblog + f.agblklog)
	agb, idx := agino>>f.inopblog, agino&(1<<f.inopblog-1)
	if ag >= f.agcount || agb >= f.agblocks {
		return nil, fsimage.Corruptf("inode %d outside the filesystem", ino)
	}
	raw := make([]byte, f.inodeSize)
	if err := fsimage.ReadFull(f.dev, raw, int64(ag*f.agblocks+agb)*f.bs+int64(idx)*f.inodeSize); err != nil {
		return nil, fmt.Errorf("inode %d: %w", ino, err)
	}
	if be.Uint16(raw) != inodeMagic || raw[4] != 3 {
		return nil, fsimage.Corruptf("inode %d: bad magic or version", ino)
	}
	if be.Uint64(raw[152:]) != ino {
		return nil, fsimage.Corruptf("inode %d: records itself as inode %d", ino, be.Uint64(raw[152:]))
	}
	n := &inode{fs: f, ino: ino, raw: raw}
	n.mode = uint32(be.Uint16(raw[2:]))
	n.size = be.Uint64(raw[56:])
	n.flags2 = be.Uint64(raw[120:])
	if n.flags2&flags2NRext64 != 0 {
		n.nextents, n.anextents = be.Uint64(raw[24:]), uint64(be.Uint32(raw[76:]))
	} else {
		n.nextents, n.anextents = uint64(be.Uint32(raw[76:])), uint64(be.Uint16(raw[80:]))
	}
	literal := f.inodeSize - coreSize
	forkoff := int64(raw[82]) * 8
	if forkoff > literal {
		return nil, fsimage.Corruptf("inode %d: attribute fork offset %d", ino, forkoff)
	}
	n.dfork = raw[coreSize:]
	if forkoff > 0 {
		n.dfork, n.afork = raw[coreSize:coreSize+forkoff], raw[coreSize+forkoff:]
	}
	if be.Uint16(raw[90:])&diflagRealtime != 0 {
		return nil, fmt.Errorf("%w: inode %d lives on a realtime device", fsimage.ErrUnsupported, ino)
	}
	if n.mode&fsimage.S_IFMT == 0 {
		return nil, fsimage.Corruptf("inode %d is free", ino)
	}
	return n, nil
}

type inode struct {
	fs                  *FS
	ino                 uint64
	raw                 []byte
	mode                uint32
	size                uint64
	flags2              uint64
	nextents, anextents uint64
	dfork, afork        []byte

	once    sync.Once
	extents []extent // data fork, sorted; loaded on first use
	extErr  error
}

var _ fsimage.Inode = (*inode)(nil)

func (n *inode) typ() uint32 { return n.mode & fsimage.S_IFMT }

func (n *inode) timestamp(at int) time.Time {
	if n.flags2&flags2Bigtime != 0 {
		ns := be.Uint64(n.raw[at:])
		return time.Unix(int64(ns/1e9)-1<<31, int64(ns%1e9))
	}
	return time.Unix(int64(int32(be.Uint32(n.raw[at:]))), int64(be.Uint32(n.raw[at+4:])))
}

func (n *inode) Attr() fsimage.Attr {
	r := n.raw
	a := fsimage.Attr{
		Ino:    n.ino,
		Mode:   n.mode,
		Nlink:  be.Uint32(r[16:]),
		UID:    be.Uint32(r[8:]),
		GID:    be.Uint32(r[12:]),
		Size:   n.size,
		Blocks: be.Uint64(r[64:]) * uint64(n.fs.bs/512),
		Atime:  n.timestamp(32),
		Mtime:  n.timestamp(40),
		Ctime:  n.timestamp(48),
	}
	if t := n.typ(); t == fsimage.S_IFBLK || t == fsimage.S_IFCHR {
		// XFS keeps (major << 18 | minor) in the data fork; the kernel shows new_encode_dev.
		d := be.Uint32(n.dfork)
		major, minor := d>>18, d&(1<<18-1)
		a.Rdev = minor&0xff | major<<8 | (minor&^0xff)<<12
	}
	return a
}

// extent is one mapping of file blocks to filesystem blocks.
type extent struct {
	off, block, count uint64 // in filesystem blocks
	unwritten         bool
}

func decodeExtent(b []byte) extent {
	l0, l1 := be.Uint64(b), be.Uint64(b[8:])
	return extent{
		unwritten: l0>>63 != 0,
		off:       l0 >> 9 & (1<<54 - 1),
		block:     (l0&0x1ff)<<43 | l1>>21,
		count:     l1 & (1<<21 - 1),
	}
}

// forkExtents lists a data or attribute fork's extents, from the inode's list or B+tree.
func (n *inode) forkExtents(fork []byte, format byte, count uint64) ([]extent, error) {
	var out []extent
	switch format {
	case fmtExtents:
		if count*16 > uint64(len(fork)) {
			return nil, fsimage.Corruptf("inode %d: %d extents do not fit the fork", n.ino, count)
		}
		for i := uint64(0); i < count; i++ {
			out = append(out, decodeExtent(fork[i*16:]))
		}
	case fmtBtree:
		if len(fork) < 4 {
			return nil, fsimage.Corruptf("inode %d: B+tree root", n.ino)
		}
		level, recs := int(be.Uint16(fork)), int(be.Uint16(fork[2:]))
		maxrecs := (len(fork) - 4) / 16
		if level == 0 || level > maxBtreeLvl || recs > maxrecs {
			return nil, fsimage.Corruptf("inode %d: B+tree root with level %d and %d records", n.ino, level, recs)
		}
		// Every block is read once: a block reached twice is damage, and without the
		// check a tree whose nodes all point at one child costs maxrecs^levels reads.
		visited := map[uint64]bool{}
		for i := 0; i < recs; i++ {
			ptr := be.Uint64(fork[4+maxrecs*8+i*8:])
			var err error
			if out, err = n.btreeBlock(out, ptr, level-1, visited); err != nil {
				return nil, err
			}
		}
	default:
		return nil, fsimage.Corruptf("inode %d: fork format %d", n.ino, format)
	}
	if len(out) > maxExtents {
		return nil, fsimage.Corruptf("inode %d: more than %d extents", n.ino, maxExtents)
	}
	for i, e := range out {
		if e.count == 0 || i > 0 && out[i-1].off+out[i-1].count > e.off {
			return nil, fsimage.Corruptf("inode %d: extents overlap or are empty", n.ino)
		}
	}
	return out, nil
}

const bmbtMagic = 0x424d4133 // BMA3

func (n *inode) btreeBlock(out []extent, ptr uint64, level int, visited map[uint64]bool) ([]extent, error) {
	if visited[ptr] || len(visited) > maxExtents {
		return nil, fsimage.Corruptf("inode %d: B+tree block %d reached twice, or too many blocks", n.ino, ptr)
	}
	visited[ptr] = true
	b, err := n.fs.block(ptr)
	if err != nil {
		return nil, fmt.Errorf("inode %d B+tree: %w", n.ino, err)
	}
	const hdr = 72
	if be.Uint32(b) != bmbtMagic || int(be.Uint16(b[4:])) != level || be.Uint64(b[56:]) != n.ino {
		return nil, fsimage.Corruptf("inode %d: B+tree block %d has a bad header", n.ino, ptr)
	}
	recs := int(be.Uint16(b[6:]))
	if level == 0 {
		if hdr+recs*16 > len(b) {
			return nil, fsimage.Corruptf("inode %d: B+tree leaf with %d records", n.ino, recs)
		}
		for i := 0; i < recs; i++ {
			out = append(out, decodeExtent(b[hdr+i*16:]))
		}
		if len(out) > maxExtents {
			return nil, fsimage.Corruptf("inode %d: more than %d extents", n.ino, maxExtents)
		}
		return out, nil
	}
	maxrecs := (len(b) - hdr) / 16
	if recs > maxrecs {
		return nil, fsimage.Corruptf("inode %d: B+tree node with %d records", n.ino, recs)
	}
	for i := 0; i < recs; i++ {
		if out, err = n.btreeBlock(out, be.Uint64(b[hdr+maxrecs*8+i*8:]), level-1, visited); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func (n *inode) dataExtents() ([]extent, error) {
	n.once.Do(func() { n.extents, n.extErr = n.forkExtents(n.dfork, n.raw[5], n.nextents) })
	return n.extents, n.extErr
}

// mapper returns the byte-offset mapping of a list of extents, for fsimage.SlabReader.
func (n *inode) mapper(exts []extent) func(off int64) (int64, int64, error) {
	bs := n.fs.bs
	return func(off int64) (int64, int64, error) {
		blk := uint64(off / bs)
		within := off % bs
		i := sort.Search(len(exts), func(i int) bool { return exts[i].off+exts[i].count > blk })
		if i == len(exts) {
			return -1, 1 << 62, nil // hole to the end
		}
		e := exts[i]
		if blk < e.off {
			return -1, int64(e.off-blk)*bs - within, nil
		}
		rest := int64(e.off+e.count-blk)*bs - within
		if e.unwritten {
			return -1, rest, nil
		}
		// The run must stay in one AG, where blocks are contiguous on disk.
		start := e.block + blk - e.off
		if (start >> n.fs.agblklog) != (start+e.count-(blk-e.off)-1)>>n.fs.agblklog {
			return 0, 0, fsimage.Corruptf("inode %d: extent crosses an allocation group", n.ino)
		}
		phys, err := n.fs.fsbByte(start)
		if err != nil {
			return 0, 0, err
		}
		if _, err := n.fs.fsbByte(start + e.count - (blk - e.off) - 1); err != nil {
			return 0, 0, err
		}
		return phys + within, rest, nil
	}
}

func (n *inode) ReadAt(p []byte, off int64) (int, error) {
	if n.typ() != fsimage.S_IFREG {
		return 0, fmt.Errorf("inode %d is not a regular file", n.ino)
	}
	if n.raw[5] == fmtLocal { // not made by Linux, but legal
		return readLocal(n.dfork, n.size, p, off)
	}
	exts, err := n.dataExtents()
	if err != nil {
		return 0, err
	}
	return fsimage.SlabReader(n.fs.dev, int64(min(n.size, 1<<62)), p, off, n.mapper(exts))
}

func readLocal(fork []byte, size uint64, p []byte, off int64) (int, error) {
	if size > uint64(len(fork)) {
		return 0, fsimage.Corruptf("local data of %d bytes in a %d-byte fork", size, len(fork))
	}
	if off >= int64(size) {
		return 0, io.EOF
	}
	c := copy(p, fork[off:size])
	if c < len(p) {
		return c, io.EOF
	}
	return c, nil
}

const symlinkMagic = 0x58534c4d // XSLM

func (n *inode) Readlink() (string, error) {
	if n.typ() != fsimage.S_IFLNK {
		return "", fmt.Errorf("inode %d is not a symbolic link", n.ino)
	}
	if n.size == 0 || n.size > maxSymlink {
		return "", fsimage.Corruptf("symlink inode %d has length %d", n.ino, n.size)
	}
	if n.raw[5] == fmtLocal {
		if n.size > uint64(len(n.dfork)) {
			return "", fsimage.Corruptf("symlink inode %d", n.ino)
		}
		return string(n.dfork[:n.size]), nil
	}
	exts, err := n.dataExtents()
	if err != nil {
		return "", err
	}
	// Remote symlinks: every block starts with a header saying how many bytes follow.
	var target []byte
	blocks := 0
	for _, e := range exts {
		for i := uint64(0); i < e.count && uint64(len(target)) < n.size; i++ {
			if blocks++; blocks > maxSymlink {
				return "", fsimage.Corruptf("symlink inode %d: too many blocks", n.ino)
			}
			b, err := n.fs.block(e.block + i)
			if err != nil {
				return "", err
			}
			size := int(be.Uint32(b[8:]))
			if be.Uint32(b) != symlinkMagic || 56+size > len(b) {
				return "", fsimage.Corruptf("symlink inode %d: block header", n.ino)
			}
			target = append(target, b[56:56+size]...)
		}
	}
	if uint64(len(target)) != n.size {
		return "", fsimage.Corruptf("symlink inode %d: %d of %d bytes", n.ino, len(target), n.size)
	}
	return string(target), nil
}

func (n *inode) ReadDir() ([]fsimage.DirEntry, error) {
	if n.typ() != fsimage.S_IFDIR {
		return nil, fmt.Errorf("inode %d is not a directory", n.ino)
	}
	if n.raw[5] == fmtLocal {
		return n.shortformDir()
	}
	exts, err := n.dataExtents()
	if err != nil {
		return nil, err
	}
	// Data blocks are those below the leaf offset; a directory block may span several
	// filesystem blocks and, in principle, several extents.
	perDir := uint64(n.fs.dirBlk / n.fs.bs)
	limit := uint64(dirLeafOff / n.fs.bs)
	var out []fsimage.DirEntry
	buf := make([]byte, n.fs.dirBlk)
	last := ^uint64(0)
	read := int64(0)
	mapFn := n.mapper(exts)
	for _, e := range exts {
		for b := e.off; b < e.off+e.count && b < limit; b++ {
			d := b / perDir
			if d == last {
				continue
			}
			last = d
			if read += n.fs.dirBlk; read > maxDirBytes {
				return nil, fsimage.Corruptf("directory inode %d: more than %d bytes of data", n.ino, maxDirBytes)
			}
			if _, err := fsimage.SlabReader(n.fs.dev, dirLeafOff, buf, int64(d)*n.fs.dirBlk, mapFn); err != nil {
				return nil, err
			}
			if out, err = n.parseDataBlock(out, buf); err != nil {
				return nil, err
			}
		}
	}
	return out, nil
}

const (
	dirBlockMagic = 0x58444233 // XDB3: single-block directory
	dirDataMagic  = 0x58444433 // XDD3: data block of a leaf or node directory
	dirHdr        = 64
)

func (n *inode) parseDataBlock(out []fsimage.DirEntry, b []byte) ([]fsimage.DirEntry, error) {
	end := len(b)
	switch be.Uint32(b) {
	case dirDataMagic:
	case dirBlockMagic:
		count := int(be.Uint32(b[len(b)-8:]))
		end = len(b) - 8 - count*8
		if end < dirHdr {
			return nil, fsimage.Corruptf("directory inode %d: block tail counts %d", n.ino, count)
		}
	default:
		return nil, fsimage.Corruptf("directory inode %d: data block magic %#x", n.ino, be.Uint32(b))
	}
	for pos := dirHdr; pos < end; {
		if pos+8 > end {
			return nil, fsimage.Corruptf("directory inode %d: entry at %d", n.ino, pos)
		}
		if be.Uint16(b[pos:]) == 0xFFFF { // unused space
			l := int(be.Uint16(b[pos+2:]))
			if l < 8 || l%8 != 0 || pos+l > end {
				return nil, fsimage.Corruptf("directory inode %d: free space of %d at %d", n.ino, l, pos)
			}
			pos += l
			continue
		}
		ino := be.Uint64(b[pos:])
		nameLen := int(b[pos+8])
		size := 8 + 1 + nameLen + 2
		if n.fs.ftype {
			size++
		}
		size = (size + 7) &^ 7
		if nameLen == 0 || pos+size > end {
			return nil, fsimage.Corruptf("directory inode %d: entry at %d", n.ino, pos)
		}
		name := string(b[pos+9 : pos+9+nameLen])
		if err := appendName(&out, n.ino, name, ino); err != nil {
			return nil, err
		}
		pos += size
	}
	return out, nil
}

func appendName(out *[]fsimage.DirEntry, dir uint64, name string, ino uint64) error {
	if name == "." || name == ".." {
		return nil
	}
	if strings.ContainsAny(name, "/\x00") {
		return fsimage.Corruptf("directory inode %d: name %q", dir, name)
	}
	*out = append(*out, fsimage.DirEntry{Name: name, Ino: ino})
	return nil
}

// shortformDir lists a directory kept inside its inode.
func (n *inode) shortformDir() ([]fsimage.DirEntry, error) {
	f := n.dfork
	if len(f) < 6 {
		return nil, fsimage.Corruptf("directory inode %d: short-form header", n.ino)
	}
	count, wide := int(f[0]), f[1] != 0
	inoLen := 4
	if wide {
		inoLen = 8
	}
	pos := 2 + inoLen
	var out []fsimage.DirEntry
	for i := 0; i < count; i++ {
		if pos+3 > len(f) {
			return nil, fsimage.Corruptf("directory inode %d: short-form entry %d", n.ino, i)
		}
		nameLen := int(f[pos])
		name := pos + 3
		ip := name + nameLen
		if n.fs.ftype {
			ip++
		}
		if nameLen == 0 || ip+inoLen > len(f) {
			return nil, fsimage.Corruptf("directory inode %d: short-form entry %d", n.ino, i)
		}
		var ino uint64
		if wide {
			ino = be.Uint64(f[ip:])
		} else {
			ino = uint64(be.Uint32(f[ip:]))
		}
		if err := appendName(&out, n.ino, string(f[name:name+nameLen]), ino); err != nil {
			return nil, err
		}
		pos = ip + inoLen
	}
	return out, nil
}

// Attribute namespaces and on-disk names.
const (
	attrLocal      = 0x01
	attrRoot       = 0x02
	attrSecure     = 0x04
	attrParent     = 0x08
	attrIncomplete = 0x80

	attrLeafMagic   = 0x3bee // XFS_ATTR3_LEAF_MAGIC
	attrRemoteMagic = 0x5841524d
	attrLeafHdr     = 80
)

func (n *inode) Xattrs() ([]fsimage.Xattr, error) {
	if n.afork == nil {
		return nil, nil
	}
	var out []fsimage.Xattr
	add := func(flags byte, name string, value []byte) error {
		if flags&(attrParent|attrIncomplete) != 0 {
			return nil
		}
		full, v, err := publicAttr(flags, name, value)
		if err != nil {
			return fmt.Errorf("inode %d xattr %q: %w", n.ino, name, err)
		}
		out = append(out, fsimage.Xattr{Name: full, Value: v})
		if strings.HasPrefix(full, "system.") { // the kernel lists the raw form too
			out = append(out, fsimage.Xattr{Name: "trusted." + name, Value: value})
		}
		return nil
	}
	switch n.raw[83] {
	case fmtLocal:
		f := n.afork
		if len(f) < 4 {
			return nil, fsimage.Corruptf("inode %d: attribute header", n.ino)
		}
		count := int(f[2])
		pos := 4
		for i := 0; i < count; i++ {
			if pos+3 > len(f) {
				return nil, fsimage.Corruptf("inode %d: attribute %d", n.ino, i)
			}
			nl, vl, flags := int(f[pos]), int(f[pos+1]), f[pos+2]
			if pos+3+nl+vl > len(f) {
				return nil, fsimage.Corruptf("inode %d: attribute %d", n.ino, i)
			}
			name := string(f[pos+3 : pos+3+nl])
			if err := add(flags, name, append([]byte(nil), f[pos+3+nl:pos+3+nl+vl]...)); err != nil {
				return nil, err
			}
			pos += 3 + nl + vl
		}
	case fmtExtents, fmtBtree:
		exts, err := n.forkExtents(n.afork, n.raw[83], n.anextents)
		if err != nil {
			return nil, err
		}
		blocks := 0
		for _, e := range exts {
			for i := uint64(0); i < e.count; i++ {
				if blocks++; blocks > maxAttrBlks {
					return nil, fsimage.Corruptf("inode %d: attribute fork of more than %d blocks", n.ino, maxAttrBlks)
				}
				b, err := n.fs.block(e.block + i)
				if err != nil {
					return nil, err
				}
				if be.Uint32(b) == attrRemoteMagic || be.Uint16(b[8:]) != attrLeafMagic {
					continue // remote values and B+tree nodes
				}
				if err := n.leafAttrs(b, exts, add); err != nil {
					return nil, err
				}
			}
		}
	default:
		return nil, fsimage.Corruptf("inode %d: attribute fork format %d", n.ino, n.raw[83])
	}
	return out, nil
}

func (n *inode) leafAttrs(b []byte, exts []extent, add func(byte, string, []byte) error) error {
	count := int(be.Uint16(b[56:]))
	if attrLeafHdr+count*8 > len(b) {
		return fsimage.Corruptf("inode %d: attribute leaf with %d entries", n.ino, count)
	}
	for i := 0; i < count; i++ {
		e := b[attrLeafHdr+i*8:]
		idx, flags := int(be.Uint16(e[4:])), e[6]
		if flags&attrLocal != 0 {
			if idx+3 > len(b) {
				return fsimage.Corruptf("inode %d: attribute name at %d", n.ino, idx)
			}
			vl, nl := int(be.Uint16(b[idx:])), int(b[idx+2])
			if idx+3+nl+vl > len(b) {
				return fsimage.Corruptf("inode %d: attribute at %d", n.ino, idx)
			}
			if err := add(flags, string(b[idx+3:idx+3+nl]), append([]byte(nil), b[idx+3+nl:idx+3+nl+vl]...)); err != nil {
				return err
			}
			continue
		}
		if idx+9 > len(b) {
			return fsimage.Corruptf("inode %d: remote attribute name at %d", n.ino, idx)
		}
		blk, vl, nl := uint64(be.Uint32(b[idx:])), int(be.Uint32(b[idx+4:])), int(b[idx+8])
		if idx+9+nl > len(b) || vl > maxXattr {
			return fsimage.Corruptf("inode %d: remote attribute at %d", n.ino, idx)
		}
		if flags&attrIncomplete != 0 {
			continue
		}
		v, err := n.remoteValue(exts, blk, vl)
		if err != nil {
			return err
		}
		if err := add(flags, string(b[idx+9:idx+9+nl]), v); err != nil {
			return err
		}
	}
	return nil
}

// remoteValue reads an attribute value kept in its own blocks of the attribute fork,
// starting at fork block blk; every block starts with a header giving its byte count.
func (n *inode) remoteValue(exts []extent, blk uint64, size int) ([]byte, error) {
	v := make([]byte, 0, size)
	mapFn := n.mapper(exts)
	b := make([]byte, n.fs.bs)
	for len(v) < size {
		if blk > 1<<32 {
			return nil, fsimage.Corruptf("inode %d: remote attribute beyond its fork", n.ino)
		}
		phys, _, err := mapFn(int64(blk) * n.fs.bs)
		if err != nil {
			return nil, err
		}
		if phys < 0 {
			return nil, fsimage.Corruptf("inode %d: remote attribute block %d is not mapped", n.ino, blk)
		}
		if err := fsimage.ReadFull(n.fs.dev, b, phys); err != nil {
			return nil, err
		}
		got := int(be.Uint32(b[8:]))
		if be.Uint32(b) != attrRemoteMagic || got == 0 || 56+got > len(b) || len(v)+got > size {
			return nil, fsimage.Corruptf("inode %d: remote attribute block header", n.ino)
		}
		v = append(v, b[56:56+got]...)
		blk++
	}
	return v, nil
}

// ACL tags with ids.
const (
	aclUser  = 0x02
	aclGroup = 0x08
)

// publicAttr names an attribute as getxattr(2) shows it; XFS keeps POSIX ACLs as trusted
// "SGI_ACL_FILE"/"SGI_ACL_DEFAULT" in its own big-endian layout, shown in the VFS form.
func publicAttr(flags byte, name string, v []byte) (string, []byte, error) {
	switch {
	case flags&attrRoot != 0 && (name == "SGI_ACL_FILE" || name == "SGI_ACL_DEFAULT"):
		full := "system.posix_acl_access"
		if name == "SGI_ACL_DEFAULT" {
			full = "system.posix_acl_default"
		}
		if len(v) < 4 || 4+int(be.Uint32(v))*12 != len(v) {
			return "", nil, fsimage.Corruptf("ACL of %d bytes", len(v))
		}
		le := binary.LittleEndian
		out := le.AppendUint32(nil, 2)
		for pos := 4; pos < len(v); pos += 12 {
			tag, id, perm := be.Uint32(v[pos:]), be.Uint32(v[pos+4:]), be.Uint16(v[pos+8:])
			if tag != aclUser && tag != aclGroup {
				id = 0xFFFFFFFF
			}
			out = le.AppendUint16(out, uint16(tag))
			out = le.AppendUint16(out, perm)
			out = le.AppendUint32(out, id)
		}
		return full, out, nil
	case flags&attrRoot != 0:
		return "trusted." + name, v, nil
	case flags&attrSecure != 0:
		return "security." + name, v, nil
	}
	return "user." + name, v, nil
}

// Map implements fsimage.Mapper.
func (n *inode) Map(off int64) (int64, int64, error) {
	if n.typ() != fsimage.S_IFREG {
		return 0, 0, fmt.Errorf("inode %d is not a regular file", n.ino)
	}
	if n.raw[5] == fmtLocal {
		return 0, 0, fsimage.ErrNotMapped
	}
	exts, err := n.dataExtents()
	if err != nil {
		return 0, 0, err
	}
	if off < 0 {
		return 0, 0, fmt.Errorf("negative offset")
	}
	return n.mapper(exts)(off)
}

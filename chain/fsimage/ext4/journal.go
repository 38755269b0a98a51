package ext4

import (
	"encoding/binary"
	"fmt"
	"io"

	"github.com/stasis-project/stasis/chain/fsimage"
)

// A filesystem captured while mounted and not frozen (a crash-consistent snapshot) may
// have committed transactions in its jbd2 journal that are not yet written to their
// places. Like the kernel mounting it, the reader replays them — in memory, as an overlay
// of the image's blocks; the image is never written.

var be = binary.BigEndian

const (
	compatHasJournal = 0x4
	incompatRecover  = 0x4

	jbdMagic      = 0xC03B3998
	jbdDescriptor = 1
	jbdCommit     = 2
	jbdSuperV1    = 3
	jbdSuperV2    = 4
	jbdRevoke     = 5

	jbdRevokeFeature = 0x1
	jbd64Bit         = 0x2
	jbdAsyncCommit   = 0x4
	jbdCsumV2        = 0x8
	jbdCsumV3        = 0x10
	jbdFastCommit    = 0x20

	tagEscape   = 0x1
	tagSameUUID = 0x2
	tagLast     = 0x8
)

// journalCopy is where a replayed block's newest committed copy is.
type journalCopy struct {
	off     int64 // byte offset in the image
	escaped bool  // the copy's first four bytes were the journal magic, replaced by zeros
}

// replayed is the image with the journal's committed blocks laid over it.
type replayed struct {
	dev    io.ReaderAt
	bs     int64
	blocks map[uint64]journalCopy
}

func (r *replayed) ReadAt(p []byte, off int64) (int, error) {
	n, err := r.dev.ReadAt(p, off)
	var blk []byte
	for b := off / r.bs; b*r.bs < off+int64(n); b++ {
		c, ok := r.blocks[uint64(b)]
		if !ok {
			continue
		}
		if blk == nil {
			blk = make([]byte, r.bs)
		}
		if err := fsimage.ReadFull(r.dev, blk, c.off); err != nil {
			return 0, fmt.Errorf("journal copy of block %d: %w", b, err)
		}
		if c.escaped {
			be.PutUint32(blk, jbdMagic)
		}
		start := max(b*r.bs, off)
		end := min((b+1)*r.bs, off+int64(n))
		copy(p[start-off:end-off], blk[start-b*r.bs:end-b*r.bs])
	}
	return n, err
}

// journalOverlay reads the journal in inode ino and returns the committed blocks to lay
// over the image, or nil when the journal is empty.
func (f *FS) journalOverlay(ino uint64) (map[uint64]journalCopy, error) {
	j, err := f.inode(ino)
	if err != nil {
		return nil, fmt.Errorf("journal inode: %w", err)
	}
	// where returns the image offset of journal block lb.
	where := func(lb uint64) (int64, error) {
		if lb*uint64(f.bs) >= j.size {
			return 0, fsimage.Corruptf("journal block %d beyond the journal", lb)
		}
		phys, _, err := j.mapOffset(int64(lb) * f.bs)
		if err != nil {
			return 0, err
		}
		if phys < 0 {
			return 0, fsimage.Corruptf("journal block %d is not mapped", lb)
		}
		return phys, nil
	}
	block := make([]byte, f.bs)
	read := func(lb uint64) error {
		off, err := where(lb)
		if err != nil {
			return err
		}
		return fsimage.ReadFull(f.dev, block, off)
	}
	if err := read(0); err != nil {
		return nil, fmt.Errorf("journal superblock: %w", err)
	}
	if be.Uint32(block) != jbdMagic || (be.Uint32(block[4:]) != jbdSuperV1 && be.Uint32(block[4:]) != jbdSuperV2) {
		return nil, fsimage.Corruptf("journal superblock has no magic")
	}
	if int64(be.Uint32(block[12:])) != f.bs {
		return nil, fmt.Errorf("%w: journal block size %d differs from the filesystem's", fsimage.ErrUnsupported, be.Uint32(block[12:]))
	}
	maxlen, first := uint64(be.Uint32(block[16:])), uint64(be.Uint32(block[20:]))
	seq, start := be.Uint32(block[24:]), uint64(be.Uint32(block[28:]))
	var incompat uint32
	if be.Uint32(block[4:]) == jbdSuperV2 {
		incompat = be.Uint32(block[40:])
	}
	if start == 0 {
		return nil, nil // clean
	}
	if incompat&^(jbdRevokeFeature|jbd64Bit|jbdAsyncCommit|jbdCsumV2|jbdCsumV3|jbdFastCommit) != 0 {
		return nil, fmt.Errorf("%w: journal features %#x", fsimage.ErrUnsupported, incompat)
	}
	// The scan reads at most maxlen blocks: bound it by the image as well as by the journal
	// inode's (equally untrusted) size.
	if maxlen*uint64(f.bs) > j.size || maxlen > f.blocks || first == 0 || first >= maxlen || start < first || start >= maxlen {
		return nil, fsimage.Corruptf("journal geometry (first %d, start %d, length %d)", first, start, maxlen)
	}
	wide, csumV3 := incompat&jbd64Bit != 0, incompat&jbdCsumV3 != 0
	tail := 0
	if incompat&(jbdCsumV2|jbdCsumV3) != 0 {
		tail = 4
	}
	next := func(lb uint64) uint64 {
		if lb+1 >= maxlen {
			return first
		}
		return lb + 1
	}

	// Scan: collect each transaction's tags and revokes until the log ends; only
	// transactions that reached their commit block count.
	type tag struct {
		fsBlock uint64
		at      uint64 // journal block of the copy
		escaped bool
	}
	type transaction struct {
		seq     uint32
		tags    []tag
		revokes []uint64
	}
	var done []transaction
	cur := transaction{seq: seq}
	pos := start
	for visited := uint64(0); visited < maxlen; {
		if err := read(pos); err != nil {
			return nil, err
		}
		if be.Uint32(block) != jbdMagic || be.Uint32(block[8:]) != cur.seq {
			break // the end of the log
		}
		visited++
		switch be.Uint32(block[4:]) {
		case jbdDescriptor:
			data := pos
			for p := 12; ; {
				size := 8
				if csumV3 {
					size = 16
				} else if wide {
					size = 12
				}
				if p+size > len(block)-tail {
					break
				}
				var t tag
				var flags uint32
				t.fsBlock = uint64(be.Uint32(block[p:]))
				if csumV3 {
					flags = be.Uint32(block[p+4:])
					if wide {
						t.fsBlock |= uint64(be.Uint32(block[p+8:])) << 32
					}
				} else {
					flags = uint32(be.Uint16(block[p+6:]))
					if wide {
						t.fsBlock |= uint64(be.Uint32(block[p+8:])) << 32
					}
				}
				data = next(data)
				visited++
				t.at, t.escaped = data, flags&tagEscape != 0
				cur.tags = append(cur.tags, t)
				p += size
				if flags&tagSameUUID == 0 {
					p += 16
				}
				if flags&tagLast != 0 {
					break
				}
			}
			pos = next(data)
		case jbdCommit:
			done = append(done, cur)
			cur = transaction{seq: cur.seq + 1}
			pos = next(pos)
		case jbdRevoke:
			used := int(be.Uint32(block[12:]))
			rec := 4
			if wide {
				rec = 8
			}
			if used > len(block) || used < 16 {
				return nil, fsimage.Corruptf("journal revoke block of %d bytes", used)
			}
			for p := 16; p+rec <= used; p += rec {
				if wide {
					cur.revokes = append(cur.revokes, be.Uint64(block[p:]))
				} else {
					cur.revokes = append(cur.revokes, uint64(be.Uint32(block[p:])))
				}
			}
			pos = next(pos)
		default:
			visited = maxlen // an unknown block type ends the log
		}
	}

	// A block revoked by a transaction at or after the one that logged it is not replayed.
	revoked := map[uint64]uint32{}
	for _, t := range done {
		for _, b := range t.revokes {
			revoked[b] = t.seq
		}
	}
	out := map[uint64]journalCopy{}
	for _, t := range done {
		for _, tg := range t.tags {
			if r, ok := revoked[tg.fsBlock]; ok && tidGEQ(r, t.seq) {
				continue
			}
			if tg.fsBlock >= f.blocks {
				return nil, fsimage.Corruptf("journal names block %d beyond the filesystem", tg.fsBlock)
			}
			off, err := where(tg.at)
			if err != nil {
				return nil, err
			}
			out[tg.fsBlock] = journalCopy{off: off, escaped: tg.escaped}
		}
	}
	return out, nil
}

// tidGEQ compares journal transaction IDs as the kernel's tid_geq does: they are 32-bit
// and wrap, so a is at or after b when the signed distance from b to a is not negative.
func tidGEQ(a, b uint32) bool { return int32(a-b) >= 0 }

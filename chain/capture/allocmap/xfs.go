package allocmap

import (
	"encoding/binary"
	"fmt"
	"io"
	"sort"
)

const xfsBtreeHeader = 56 // short-form v5 (CRC) btree block header

// xfsAllocated maps an XFS v5 filesystem: everything but the extents in each allocation
// group's by-block free-space B+tree is allocated.
func xfsAllocated(r io.ReaderAt, size int64, sb []byte) ([]Extent, error) {
	be := binary.BigEndian
	bs := int64(be.Uint32(sb[4:]))
	dblocks := int64(be.Uint64(sb[8:]))
	agBlocks := int64(be.Uint32(sb[84:]))
	agCount := int64(be.Uint32(sb[88:]))
	version := be.Uint16(sb[100:]) & 0xf
	sectSize := int64(be.Uint16(sb[102:]))
	if version != 5 {
		return nil, fmt.Errorf("%w: XFS version %d (only v5 is mapped)", ErrUnknown, version)
	}
	if bs < 512 || bs > 65536 || bs&(bs-1) != 0 || sectSize < 512 || sectSize > bs || agBlocks <= 0 || agCount <= 0 ||
		dblocks <= 0 || dblocks*bs > size || agCount > dblocks/agBlocks+1 {
		return nil, fmt.Errorf("xfs: geometry (%d blocks of %d, %d AGs of %d) does not fit the %d-byte device", dblocks, bs, agCount, agBlocks, size)
	}
	b := &builder{bs: bs, limit: size}
	block := make([]byte, bs)
	for ag := int64(0); ag < agCount; ag++ {
		agStart := ag * agBlocks
		agLen := min(agBlocks, dblocks-agStart)
		if agLen <= 0 {
			return nil, fmt.Errorf("xfs: AG %d starts past the end", ag)
		}
		agf := make([]byte, sectSize)
		if err := readFull(r, agf, agStart*bs+sectSize); err != nil {
			return nil, fmt.Errorf("xfs AG %d header: %w", ag, err)
		}
		if string(agf[:4]) != "XAGF" {
			return nil, fmt.Errorf("xfs AG %d: bad AGF magic", ag)
		}
		root, levels := int64(be.Uint32(agf[16:])), int(be.Uint32(agf[28:]))
		if levels < 1 || levels > 8 {
			return nil, fmt.Errorf("xfs AG %d: free-space tree depth %d", ag, levels)
		}
		var free [][2]int64
		visited := map[int64]bool{}
		var walk func(bno int64, level int) error
		walk = func(bno int64, level int) error {
			if bno <= 0 || bno >= agLen || visited[bno] {
				return fmt.Errorf("xfs AG %d: free-space tree block %d invalid or repeated", ag, bno)
			}
			visited[bno] = true
			if err := readFull(r, block, (agStart+bno)*bs); err != nil {
				return err
			}
			if string(block[:4]) != "AB3B" || int(be.Uint16(block[4:])) != level {
				return fmt.Errorf("xfs AG %d block %d: not a level-%d free-space tree block", ag, bno, level)
			}
			n := int64(be.Uint16(block[6:]))
			maxRecs := (bs - xfsBtreeHeader) / 8
			if level > 0 {
				maxRecs = (bs - xfsBtreeHeader) / 12
			}
			if n > maxRecs {
				return fmt.Errorf("xfs AG %d block %d: %d records", ag, bno, n)
			}
			if level == 0 {
				for i := int64(0); i < n; i++ {
					rec := block[xfsBtreeHeader+8*i:]
					start, count := int64(be.Uint32(rec)), int64(be.Uint32(rec[4:]))
					if start+count > agLen || count == 0 {
						return fmt.Errorf("xfs AG %d: free extent %d+%d outside the AG", ag, start, count)
					}
					free = append(free, [2]int64{start, count})
				}
				return nil
			}
			ptrs := make([]int64, n)
			for i := int64(0); i < n; i++ {
				ptrs[i] = int64(be.Uint32(block[xfsBtreeHeader+maxRecs*8+4*i:]))
			}
			for _, p := range ptrs {
				if err := walk(p, level-1); err != nil {
					return err
				}
			}
			return nil
		}
		if err := walk(root, levels-1); err != nil {
			return nil, err
		}
		sort.Slice(free, func(i, j int) bool { return free[i][0] < free[j][0] })
		pos := int64(0)
		for _, f := range free {
			if f[0] < pos {
				return nil, fmt.Errorf("xfs AG %d: overlapping free extents", ag)
			}
			if err := b.add(agStart+pos, f[0]-pos); err != nil {
				return nil, err
			}
			pos = f[0] + f[1]
		}
		if err := b.add(agStart+pos, agLen-pos); err != nil {
			return nil, err
		}
	}
	return b.out, nil
}

package xfs

import (
	"fmt"
	"sort"

	"github.com/stasis-project/stasis/chain/fsimage"
)

var _ fsimage.Allocator = (*FS)(nil)

// UUID returns the filesystem's UUID.
func (f *FS) UUID() [16]byte { return f.uuid }

const (
	agfMagic       = 0x58414746 // XAGF
	bnoMagic       = 0x41423342 // AB3B: by-block free-space tree, v5
	shortBtreeHdr  = 56         // short-form v5 btree block header
	maxFreeSpaceLv = 8
)

// Allocated implements fsimage.Allocator: everything but the extents in each allocation
// group's by-block free-space B+tree is allocated (the internal log included), and so is
// the device past the last AG.
func (f *FS) Allocated() ([]fsimage.Extent, error) {
	b := fsimage.NewExtentBuilder(f.bs, f.size)
	block := make([]byte, f.bs)
	agf := make([]byte, f.sectSize)
	for ag := uint64(0); ag < f.agcount; ag++ {
		agStart := ag * f.agblocks
		if agStart >= f.dblocks {
			return nil, fsimage.Corruptf("xfs AG %d starts past the end", ag)
		}
		agLen := min(f.agblocks, f.dblocks-agStart)
		if err := fsimage.ReadFull(f.dev, agf, int64(agStart)*f.bs+f.sectSize); err != nil {
			return nil, fmt.Errorf("xfs AG %d header: %w", ag, err)
		}
		if be.Uint32(agf) != agfMagic {
			return nil, fsimage.Corruptf("xfs AG %d: bad AGF magic", ag)
		}
		root, levels := uint64(be.Uint32(agf[16:])), int(be.Uint32(agf[28:]))
		if levels < 1 || levels > maxFreeSpaceLv {
			return nil, fsimage.Corruptf("xfs AG %d: free-space tree depth %d", ag, levels)
		}
		var free [][2]uint64
		// A block seen twice is a loop or shared subtree: damage, and without this check
		// a hostile tree costs exponential reads.
		visited := map[uint64]bool{}
		var walk func(bno uint64, level int) error
		walk = func(bno uint64, level int) error {
			if bno == 0 || bno >= agLen || visited[bno] {
				return fsimage.Corruptf("xfs AG %d: free-space tree block %d invalid or repeated", ag, bno)
			}
			visited[bno] = true
			if err := fsimage.ReadFull(f.dev, block, int64(agStart+bno)*f.bs); err != nil {
				return err
			}
			if be.Uint32(block) != bnoMagic || int(be.Uint16(block[4:])) != level {
				return fsimage.Corruptf("xfs AG %d block %d: not a level-%d free-space tree block", ag, bno, level)
			}
			n := uint64(be.Uint16(block[6:]))
			recSize := uint64(8)
			if level > 0 {
				recSize = 12 // key (8) + pointer (4)
			}
			maxRecs := (uint64(f.bs) - shortBtreeHdr) / recSize
			if n > maxRecs {
				return fsimage.Corruptf("xfs AG %d block %d: %d records", ag, bno, n)
			}
			if level == 0 {
				for i := uint64(0); i < n; i++ {
					rec := block[shortBtreeHdr+8*i:]
					start, count := uint64(be.Uint32(rec)), uint64(be.Uint32(rec[4:]))
					if count == 0 || start >= agLen || count > agLen-start {
						return fsimage.Corruptf("xfs AG %d: free extent %d+%d outside the AG", ag, start, count)
					}
					free = append(free, [2]uint64{start, count})
				}
				return nil
			}
			ptrs := make([]uint64, n)
			for i := range ptrs {
				ptrs[i] = uint64(be.Uint32(block[shortBtreeHdr+maxRecs*8+4*uint64(i):]))
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
		pos := uint64(0)
		for _, fr := range free {
			if fr[0] < pos {
				return nil, fsimage.Corruptf("xfs AG %d: overlapping free extents", ag)
			}
			if err := b.Add(int64(agStart+pos), int64(fr[0]-pos)); err != nil {
				return nil, err
			}
			pos = fr[0] + fr[1]
		}
		if err := b.Add(int64(agStart+pos), int64(agLen-pos)); err != nil {
			return nil, err
		}
	}
	if err := b.Rest(int64(f.dblocks)); err != nil {
		return nil, err
	}
	return b.Extents(), nil
}

package chain

import (
	"context"
	"encoding/binary"
	"math/rand"
	"testing"
)

// encodeIndexV1 writes the version 1 layout that older stasis wrote, to test reading it.
func encodeIndexV1(packs []indexedPack) []byte {
	b := []byte(indexMagicV1)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(packs)))
	for _, p := range packs {
		b = append(b, p.ID[:]...)
		b = binary.LittleEndian.AppendUint64(b, uint64(p.Size))
		b = binary.LittleEndian.AppendUint32(b, uint32(len(p.Entries)))
		for _, e := range p.Entries {
			b = e.append(b)
		}
	}
	sum := Hash(b)
	return append(b, sum[:]...)
}

// containsEntry reports whether packs lists e in the pack with ID pack.
func containsEntry(packs []indexedPack, pack ID, e packEntry) bool {
	for _, p := range packs {
		if p.ID != pack {
			continue
		}
		for _, x := range p.Entries {
			if x == e {
				return true
			}
		}
	}
	return false
}

// fakePacks makes n entries spread over a few packs.
func fakePacks(rng *rand.Rand, n int) []indexedPack {
	packs := make([]indexedPack, 4)
	for i := range packs {
		rng.Read(packs[i].ID[:])
		packs[i].Size = 1 << 30
	}
	for i := 0; i < n; i++ {
		var e packEntry
		rng.Read(e.ID[:])
		e.Type, e.Offset, e.Length, e.RawLen = DataBlob, uint32(rng.Intn(1<<29)), 4096, 65536
		e.Comp = compZstd
		p := &packs[rng.Intn(len(packs))]
		p.Entries = append(p.Entries, e)
	}
	return packs
}

// TestDiskIndexFindsEveryBlob: every blob of a version 2 file is found by binary search,
// with every copy of a blob stored in several packs, absent IDs are not, and IDs at the
// edges of fanout buckets work; in a small index (lookups read a bucket at once) and a large
// one (lookups probe, then read a window; copies reach past it).
func TestDiskIndexFindsEveryBlob(t *testing.T) {
	for _, n := range []int{5000, 300000} {
		rng := rand.New(rand.NewSource(1))
		packs := fakePacks(rng, n)
		var edge packEntry // IDs 00.. and ff..
		edge.Type, edge.Offset, edge.Length, edge.RawLen = DataBlob, 4096, 1, 1
		packs[0].Entries = append(packs[0].Entries, edge)
		for i := range edge.ID {
			edge.ID[i] = 0xff
		}
		packs[1].Entries = append(packs[1].Entries, edge)
		// Copies: some blobs stored again, up to 2*searchExtra more times.
		for i := 0; i < 50; i++ {
			e := packs[2].Entries[rng.Intn(len(packs[2].Entries))]
			for c := rng.Intn(2*searchExtra) + 1; c > 0; c-- {
				e.Offset = uint32(rng.Intn(1 << 29))
				p := &packs[rng.Intn(len(packs))]
				p.Entries = append(p.Entries, e)
			}
		}
		copies := map[ID]int{}
		for _, p := range packs {
			for _, e := range p.Entries {
				copies[e.ID]++
			}
		}
		d, err := openDiskIndexBytes(encodeIndex(packs))
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		for _, p := range packs {
			for _, e := range p.Entries {
				locs, err := d.all(ctx, e.ID)
				found := false
				for _, l := range locs {
					found = found || l.e == e && l.pack == p.ID
				}
				if err != nil || len(locs) != copies[e.ID] || !found {
					t.Fatalf("%d blobs: blob %s: %d of %d copies, this one found %v, %v", n, e.ID.Short(), len(locs), copies[e.ID], found, err)
				}
			}
		}
		for i := 0; i < 1000; i++ {
			var id ID
			rng.Read(id[:])
			if locs, err := d.all(ctx, id); len(locs) > 0 || err != nil {
				t.Fatalf("absent blob %s found (%v)", id.Short(), err)
			}
		}
		if n > 256*searchWindow && d.hdr.fanout[0] <= searchWindow {
			t.Fatalf("%d blobs: the first bucket holds %d records: the probing path is not tested", n, d.hdr.fanout[0])
		}
	}
	packs := fakePacks(rand.New(rand.NewSource(1)), 5000)
	b := encodeIndex(packs)
	b[len(b)/2] ^= 1
	if _, err := openDiskIndexBytes(b); err == nil {
		t.Fatal("a damaged index file opened")
	}
}

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
// absent IDs are not, and IDs at the edges of fanout buckets work.
func TestDiskIndexFindsEveryBlob(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	packs := fakePacks(rng, 5000)
	var edge packEntry // IDs 00.. and ff..
	edge.Type, edge.Offset, edge.Length, edge.RawLen = DataBlob, 4096, 1, 1
	packs[0].Entries = append(packs[0].Entries, edge)
	for i := range edge.ID {
		edge.ID[i] = 0xff
	}
	packs[1].Entries = append(packs[1].Entries, edge)
	d, err := openDiskIndexBytes(encodeIndex(packs))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, p := range packs {
		for _, e := range p.Entries {
			locs, err := d.all(ctx, e.ID)
			if err != nil || len(locs) != 1 || locs[0].e != e || locs[0].pack != p.ID {
				t.Fatalf("blob %s: %+v, %v", e.ID.Short(), locs, err)
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
	b := encodeIndex(packs)
	b[len(b)/2] ^= 1
	if _, err := openDiskIndexBytes(b); err == nil {
		t.Fatal("a damaged index file opened")
	}
}

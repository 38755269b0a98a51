package chain

import (
	"context"
	"fmt"
	"math/rand"
	"testing"
)

// FakeIndexFile returns the name and content of a version 2 index file listing n made-up
// blobs, for tests of index loading from outside the package.
func FakeIndexFile(n int, seed int64) (Handle, []byte) {
	b := encodeIndex(fakePacks(rand.New(rand.NewSource(seed)), n))
	return Handle{Type: IndexFile, Name: Hash(b).String()}, b
}

// RewriteIndexV1 turns every index file of be into the version 1 layout older stasis
// wrote, as a repository made before version 2 would have them.
func RewriteIndexV1(ctx context.Context, be Backend) error {
	var names []string
	be.List(ctx, IndexFile, func(fi FileInfo) error { names = append(names, fi.Name); return nil })
	for _, name := range names {
		h := Handle{Type: IndexFile, Name: name}
		b, err := be.ReadAll(ctx, h)
		if err != nil {
			return err
		}
		packs, err := decodeIndex(b)
		if err != nil {
			return err
		}
		v1 := encodeIndexV1(packs)
		if err := be.Save(ctx, Handle{Type: IndexFile, Name: Hash(v1).String()}, v1); err != nil {
			return err
		}
		if err := be.Remove(ctx, h); err != nil {
			return err
		}
	}
	return nil
}

// SwapTwoBlobs exchanges the stored bytes of two blobs of equal stored length in one pack
// of r's backend be, as an attacker with write access could; false if there are none.
func SwapTwoBlobs(t testing.TB, r *Repository, be Backend) bool {
	ctx := context.Background()
	byLen := map[[2]string][]blobLoc{}
	r.index.eachEntry(ctx, func(_ string, l blobLoc) error {
		k := [2]string{l.pack.String(), fmt.Sprint(l.e.Length)}
		byLen[k] = append(byLen[k], l)
		return nil
	})
	for k, locs := range byLen {
		if len(locs) < 2 {
			continue
		}
		h := Handle{Type: PackFile, Name: k[0]}
		data, err := be.ReadAll(ctx, h)
		if err != nil {
			t.Fatal(err)
		}
		a, b := locs[0].e, locs[1].e
		x := append([]byte(nil), data[a.Offset:a.Offset+a.Length]...)
		copy(data[a.Offset:], data[b.Offset:b.Offset+b.Length])
		copy(data[b.Offset:], x)
		if err := be.Remove(ctx, h); err != nil {
			t.Fatal(err)
		}
		if err := be.Save(ctx, h, data); err != nil {
			t.Fatal(err)
		}
		return true
	}
	return false
}

// SetPackTarget makes packs close at n bytes for one test, so small volumes make several.
func SetPackTarget(t testing.TB, n int) {
	old := packTarget
	packTarget = n
	t.Cleanup(func() { packTarget = old })
}

// PageIDs lists the pages of a snapshot's block map below its root.
func PageIDs(ctx context.Context, r *Reader, s *Snapshot) []ID {
	var ids []ID
	newTreeReader(r, s.Root, s.Chunks()).walk(ctx, func(id ID, _ int) bool {
		if id != s.Root {
			ids = append(ids, id)
		}
		return true
	}, func(int64, ID) error { return nil })
	return ids
}

// ReferencesAny is referencesAny, for tests from outside the package.
func ReferencesAny(ctx context.Context, r *Reader, s *Snapshot, ids map[ID]bool) (bool, error) {
	return r.referencesAny(ctx, s, ids)
}

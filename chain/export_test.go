package chain

import (
	"context"
	"math/rand"
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
	be.List(ctx, IndexFile, func(name string, _ int64) error { names = append(names, name); return nil })
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

package testenv

import (
	"context"
	"testing"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/memory"
)

// MemoryRepo is a new unencrypted repository in memory, opened for writing with a cache of
// its own, closed when the test ends.
func MemoryRepo(t testing.TB) *chain.Repository {
	t.Helper()
	ctx := context.Background()
	be := memory.New()
	if _, err := chain.Init(ctx, be, chain.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	r, err := chain.Open(ctx, be, chain.Options{CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// MemorySnapshot stores data as snapshot v/s, in chunks of the given size, in a new
// MemoryRepo and returns its reader.
func MemorySnapshot(t testing.TB, data []byte, chunk int) *chain.SnapshotReader {
	t.Helper()
	ctx := context.Background()
	r := MemoryRepo(t)
	w, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "v", Name: "s", Size: int64(len(data)), ChunkSize: chunk})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i*chunk < len(data); i++ {
		if err := w.Put(ctx, int64(i), data[i*chunk:min(len(data), (i+1)*chunk)]); err != nil {
			t.Fatal(err)
		}
	}
	s, err := w.Commit(ctx, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return r.SnapshotReader(s)
}

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

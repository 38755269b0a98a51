package chain_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/memory"
)

// TestOpenReaderMemoryFlat: a repository's index costs about a byte and a quarter of memory
// per blob (its filters), not the 73 bytes an in-memory index cost: the entries stay on disk.
func TestOpenReaderMemoryFlat(t *testing.T) {
	ctx := context.Background()
	withBlobs := func(n int) chain.Backend {
		be := memory.New()
		if _, err := chain.Init(ctx, be, chain.InitOptions{}); err != nil {
			t.Fatal(err)
		}
		h, b := chain.FakeIndexFile(n, int64(n))
		if err := be.Save(ctx, h, b); err != nil {
			t.Fatal(err)
		}
		return be
	}
	// heap is what opening adds to the heap and keeps (the backend's own bytes excluded).
	// heap is what opening and one lookup (which loads the index) add to the heap and keep
	// (the backend's own bytes excluded).
	heap := func(be chain.Backend) uint64 {
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		r, err := chain.Open(ctx, be, chain.Options{CacheDir: t.TempDir()})
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		if _, err := r.LoadBlob(ctx, chain.ID{1}, nil); !errors.Is(err, chain.ErrCorrupt) {
			t.Fatalf("absent blob: %v", err)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		runtime.KeepAlive(r)
		return after.HeapAlloc - min(after.HeapAlloc, before.HeapAlloc)
	}
	small := heap(withBlobs(2000))
	big := heap(withBlobs(200000))
	t.Logf("%d bytes with 2,000 blobs, %d with 200,000", small, big)
	if perBlob := float64(big-min(big, small)) / 198000; perBlob > 2 {
		t.Fatalf("the index costs %.1f bytes of memory per blob", perBlob)
	}
}

// TestOpenReaderReadsEverySnapshot: a repository opened for reading returns every
// snapshot bit-exact, sees snapshots committed after it opened, keeps reading across a gc
// that repacks and deletes, and refuses to write.
func TestOpenReaderReadsEverySnapshot(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewSource(5))
	r, be := newRepo(t)
	v := newVolume(rng, 2<<20+999, 16<<10)
	want := map[string][]byte{}
	for _, name := range []string{"a", "b", "c"} {
		v.scribble(rng, 30)
		v.snapshot(t, r, name, false, nil)
		want[name] = append([]byte(nil), v.data...)
	}
	// Index files as stasis wrote them before format version 2: still read.
	if err := chain.RewriteIndexV1(ctx, be); err != nil {
		t.Fatal(err)
	}
	reader, err := chain.OpenReader(ctx, be, chain.Options{CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	check := func(when string) {
		t.Helper()
		snaps, _, err := reader.Snapshots(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(snaps) != len(want) {
			t.Fatalf("%s: %d snapshots, want %d", when, len(snaps), len(want))
		}
		for _, s := range snaps {
			if !bytes.Equal(readAll(t, reader, s), want[s.Name]) {
				t.Fatalf("%s: %s reads back different bytes", when, s.Name)
			}
		}
	}
	check("at open")
	v.scribble(rng, 30)
	v.snapshot(t, r, "d", false, nil) // committed after the reader opened
	want["d"] = append([]byte(nil), v.data...)
	check("after a new snapshot")
	unlock, _ := r.Lock(ctx, "test")
	snaps, _, _ := r.Snapshots(ctx)
	if err := r.Delete(ctx, snaps[0]); err != nil {
		t.Fatal(err)
	}
	unlock()
	delete(want, snaps[0].Name)
	gc(t, r)
	check("after delete and gc")
}

// countingBackend counts manifest reads.
type countingBackend struct {
	chain.Backend
	manifestReads int
}

func (c *countingBackend) ReadAll(ctx context.Context, h chain.Handle) ([]byte, error) {
	if h.Type == chain.SnapshotFile {
		c.manifestReads++
	}
	return c.Backend.ReadAll(ctx, h)
}

// TestSnapshotsReadsEachManifestOnce: listing again reads only manifests not seen before,
// and still shows new snapshots and drops deleted ones.
func TestSnapshotsReadsEachManifestOnce(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewSource(3))
	w, be := newRepo(t)
	v := newVolume(rng, 256<<10, 16<<10)
	for _, name := range []string{"a", "b", "c"} {
		v.scribble(rng, 5)
		v.snapshot(t, w, name, false, nil)
	}
	cb := &countingBackend{Backend: be}
	r, err := chain.OpenReader(ctx, cb, chain.Options{CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	names := func() string {
		snaps, _, err := r.Snapshots(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, s := range snaps {
			out = append(out, s.Name)
		}
		return strings.Join(out, ",")
	}
	if got := names(); got != "a,b,c" || cb.manifestReads != 3 {
		t.Fatalf("first listing: %s after %d reads", got, cb.manifestReads)
	}
	if got := names(); got != "a,b,c" || cb.manifestReads != 3 {
		t.Fatalf("second listing: %s, %d reads in all (want no new read)", got, cb.manifestReads)
	}
	v.snapshot(t, w, "d", false, nil)
	unlock, _ := w.Lock(ctx, "test")
	snaps, _, _ := w.Snapshots(ctx)
	if err := w.Delete(ctx, snaps[0]); err != nil {
		t.Fatal(err)
	}
	unlock()
	if got := names(); got != "b,c,d" || cb.manifestReads != 4 {
		t.Fatalf("after adding d and deleting a: %s, %d reads in all (want one new)", got, cb.manifestReads)
	}
}

// manifestCounter counts whole-file reads of manifests.
type manifestCounter struct {
	chain.Backend
	manifestReads atomic.Int64
}

func (c *manifestCounter) ReadAll(ctx context.Context, h chain.Handle) ([]byte, error) {
	if h.Type == chain.SnapshotFile {
		c.manifestReads.Add(1)
	}
	return c.Backend.ReadAll(ctx, h)
}

// TestManifestCache: a second process with the same cache directory lists snapshots
// without downloading a manifest again; a damaged cached copy is fetched anew, and copies
// of deleted snapshots go.
func TestManifestCache(t *testing.T) {
	ctx := context.Background()
	r, be := newEncryptedRepo(t)
	v := newVolume(rand.New(rand.NewSource(2)), 256<<10, 16<<10)
	a := v.snapshot(t, r, "a", false, nil)
	v.snapshot(t, r, "b", false, nil)
	cache := t.TempDir()
	open := func() (*chain.Reader, *manifestCounter) {
		cb := &manifestCounter{Backend: be}
		rd, err := chain.OpenReader(ctx, cb, chain.Options{CacheDir: cache, Password: password("correct horse")})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { rd.Close() })
		return rd, cb
	}
	r1, c1 := open()
	if snaps, _, err := r1.Snapshots(ctx); err != nil || len(snaps) != 2 || c1.manifestReads.Load() != 2 {
		t.Fatalf("first listing: %d snapshots, %d manifest reads, %v", len(snaps), c1.manifestReads.Load(), err)
	}
	r2, c2 := open()
	if snaps, _, err := r2.Snapshots(ctx); err != nil || len(snaps) != 2 || c2.manifestReads.Load() != 0 {
		t.Fatalf("second process: %d snapshots, %d manifest reads, %v", len(snaps), c2.manifestReads.Load(), err)
	}
	files, _ := filepath.Glob(filepath.Join(cache, "*", "snapshots", "*"))
	if len(files) != 2 {
		t.Fatalf("cached manifests: %v", files)
	}
	os.WriteFile(files[0], []byte("garbage"), 0o600)
	r3, c3 := open()
	if snaps, bad, err := r3.Snapshots(ctx); err != nil || len(snaps) != 2 || len(bad) != 0 || c3.manifestReads.Load() != 1 {
		t.Fatalf("with a damaged cached copy: %d snapshots, %v bad, %d reads, %v", len(snaps), bad, c3.manifestReads.Load(), err)
	}
	unlock, _ := r.Lock(ctx, "t")
	r.Delete(ctx, a)
	unlock()
	r4, _ := open()
	r4.Snapshots(ctx)
	if files, _ := filepath.Glob(filepath.Join(cache, "*", "snapshots", "*")); len(files) != 1 {
		t.Fatalf("cached manifests after a deletion: %v", files)
	}
}

// TestAlteredConfigIDNamesNoPath: the repository ID in the config names the local cache
// directory; a config altered to make it a path is refused, and nothing is created outside
// the cache directory.
func TestAlteredConfigIDNamesNoPath(t *testing.T) {
	ctx := context.Background()
	be := memory.New()
	if _, err := chain.Init(ctx, be, chain.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	top := t.TempDir()
	cache := filepath.Join(top, "a", "cache")
	for _, id := range []string{"../../escaped", "0123456789ABCDEF0123456789ABCDEF", "0123", ""} {
		cfg := []byte(`{"format":"stasis-repository","version":2,"id":"` + id + `"}`)
		if err := be.Save(ctx, chain.Handle{Type: chain.ConfigFile}, cfg); err != nil {
			t.Fatal(err)
		}
		_, err := chain.OpenReader(ctx, be, chain.Options{CacheDir: cache})
		if !errors.Is(err, chain.ErrCorrupt) || !strings.Contains(err.Error(), "restore it from a copy") {
			t.Errorf("config with ID %q: %v", id, err)
		}
	}
	if entries, _ := os.ReadDir(top); len(entries) > 1 || len(entries) == 1 && entries[0].Name() != "a" {
		t.Fatalf("created %v beside the cache", entries)
	}
}

// TestWriterNeedsValidHost: snapshots name their host, so a writer on a host whose name
// could not be read back (a '/' in it) refuses to start and says how to name the host.
func TestWriterNeedsValidHost(t *testing.T) {
	ctx := context.Background()
	be := memory.New()
	if _, err := chain.Init(ctx, be, chain.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	r, err := chain.Open(ctx, be, chain.Options{CacheDir: t.TempDir(), Host: "a/b"})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "v", Name: "s", Size: 1 << 20}); err == nil || !strings.Contains(err.Error(), "`host:`") {
		t.Fatalf("writer on host a/b: %v", err)
	}
}

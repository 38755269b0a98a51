package e2e

import (
	"encoding/json"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/stasis-project/stasis/test/testenv"
)

// TestSparseTerabyte: snapshotting a 1 TiB sparse file keeps peak RSS under 256 MB, and an
// incremental touching 10 chunks writes under 1 MiB of metadata.
func TestSparseTerabyte(t *testing.T) {
	const size = 1 << 40
	dir := t.TempDir()
	src := filepath.Join(dir, "tera.img")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Skipf("filesystem of %s cannot hold a 1 TiB sparse file: %v", dir, err)
	}
	rng := rand.New(rand.NewSource(11))
	buf := make([]byte, 4<<20)
	for i := 0; i < 16; i++ { // 64 MiB of data spread over the whole terabyte
		rng.Read(buf)
		if _, err := f.WriteAt(buf, rng.Int63n(size/(4<<20))*(4<<20)); err != nil {
			t.Fatal(err)
		}
	}
	f.Sync()
	repo := newRepo(t)
	r := testenv.StasisPeakRSS(t, "snapshot", "-r", repo, "--source", src, "--volume", "tera", "--json")
	if r.Code != 0 {
		t.Fatalf("snapshot: %s", r.Stderr)
	}
	t.Logf("full snapshot of 1 TiB sparse: peak RSS %d MiB", r.MaxRSSKiB>>10)
	if r.MaxRSSKiB > 256<<10 {
		t.Fatalf("peak RSS %d MiB, limit 256 MiB", r.MaxRSSKiB>>10)
	}
	repoSize := func() int64 {
		var n int64
		filepath.Walk(repo, func(_ string, info os.FileInfo, _ error) error {
			if info.Mode().IsRegular() {
				n += info.Size()
			}
			return nil
		})
		return n
	}
	before := repoSize()
	for i := 0; i < 10; i++ { // 10 chunks far apart, in different leaf pages
		c := rng.Int63n(size / 65536)
		rng.Read(buf[:100])
		f.WriteAt(buf[:100], c*65536)
	}
	f.Sync()
	r = testenv.StasisPeakRSS(t, "snapshot", "-r", repo, "--source", src, "--volume", "tera", "--json")
	if r.Code != 0 {
		t.Fatalf("incremental: %s", r.Stderr)
	}
	var res struct {
		MetadataBytes int64 `json:"metadata_bytes"`
		ChunksStored  int64 `json:"chunks_stored"`
	}
	json.Unmarshal([]byte(r.Stdout), &res)
	grown := repoSize() - before
	t.Logf("incremental of 10 chunks: metadata %d KiB, repository grew %d KiB, peak RSS %d MiB", res.MetadataBytes>>10, grown>>10, r.MaxRSSKiB>>10)
	if res.ChunksStored != 10 {
		t.Fatalf("stored %d chunks, want 10", res.ChunksStored)
	}
	if res.MetadataBytes >= 1<<20 || grown >= 1<<20+10*65536 {
		t.Fatalf("metadata %d bytes (repository grew %d) for 10 chunks; want under 1 MiB", res.MetadataBytes, grown)
	}
	if r.MaxRSSKiB > 256<<10 {
		t.Fatalf("peak RSS %d MiB, limit 256 MiB", r.MaxRSSKiB>>10)
	}
}

package chain_test

import (
	"bytes"
	"context"
	"math/rand"
	"strings"
	"testing"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/memory"
)

// TestCopyIsExactAndIncremental copies a chain into repositories with the same and with
// other blob IDs: every copy reads back bit for bit, a later copy reads only the chunks
// that changed, copying again copies nothing, and the copies form a chain of their own
// (deleting a middle one and collecting keeps the rest exact).
func TestCopyIsExactAndIncremental(t *testing.T) {
	ctx := context.Background()
	src, _ := newEncryptedRepo(t)
	sameKeys := func() *chain.Repository {
		be := memory.New()
		if _, err := chain.Init(ctx, be, chain.InitOptions{Password: []byte("other"), KDF: testKDF, SameKeysAs: src.Reader}); err != nil {
			t.Fatal(err)
		}
		return openRepo(t, be, chain.Options{Password: password("other")})
	}
	dsts := map[string]func() *chain.Repository{
		"plain":          func() *chain.Repository { r, _ := newRepo(t); return r },
		"other keys":     func() *chain.Repository { r, _ := newEncryptedRepo(t); return r },
		"same keys":      sameKeys,
		"same keys, new": sameKeys,
	}
	rng := rand.New(rand.NewSource(5))
	const chunk = 16 << 10
	v := newVolume(rng, 4<<20, chunk)
	var snaps []*chain.Snapshot
	var images [][]byte
	for i, name := range []string{"a", "b", "c", "d"} {
		if i > 0 {
			v.scribble(rng, 5) // at most 5 chunks change
		}
		snaps = append(snaps, v.snapshot(t, src, name, false, nil))
		images = append(images, bytes.Clone(v.data))
	}
	for what, mk := range dsts {
		t.Run(what, func(t *testing.T) {
			dst := mk()
			var copies []*chain.Snapshot
			for i, s := range snaps {
				var st chain.CopyStats
				c, err := chain.Copy(ctx, src.Reader, dst, s, &st)
				if err != nil {
					t.Fatal(err)
				}
				if c.Name != s.Name || !c.Created.Equal(s.Created) || c.Host != s.Host || c.Consistency != s.Consistency {
					t.Fatalf("copy of %s is %+v", s.Name, c)
				}
				if !bytes.Equal(readAll(t, dst.Reader, c), images[i]) {
					t.Fatalf("copy of %s differs from the original", s.Name)
				}
				if i > 0 && st.ChunksRead > 10 {
					t.Fatalf("incremental copy of %s read %d chunks; at most 10 changed", s.Name, st.ChunksRead)
				}
				if i == 0 && what == "same keys, new" {
					// A repository with the same IDs that already holds the data reads nothing.
					var first, again chain.CopyStats
					other := sameKeys()
					if _, err := chain.Copy(ctx, dst.Reader, other, c, &first); err != nil {
						t.Fatal(err)
					}
					unlock, _ := other.Lock(ctx, "t")
					os, _, _ := other.Snapshots(ctx)
					other.Delete(ctx, os...)
					unlock()
					if _, err := chain.Copy(ctx, src.Reader, other, s, &again); err != nil {
						t.Fatal(err)
					}
					if first.ChunksRead == 0 || again.ChunksRead != 0 {
						t.Fatalf("copies read %d and %d chunks, want some for the first and none for the second", first.ChunksRead, again.ChunksRead)
					}
				}
				copies = append(copies, c)
			}
			var st chain.CopyStats
			for _, s := range snaps {
				if _, err := chain.Copy(ctx, src.Reader, dst, s, &st); err != nil {
					t.Fatal(err)
				}
			}
			if st.Copied != 0 || st.Skipped != len(snaps) || st.ChunksRead != 0 {
				t.Fatalf("copying again: %+v", st)
			}
			unlock, err := dst.Lock(ctx, "test")
			if err != nil {
				t.Fatal(err)
			}
			if err := dst.Delete(ctx, copies[1]); err != nil {
				t.Fatal(err)
			}
			unlock()
			gc(t, dst)
			for i, c := range copies {
				if i != 1 && !bytes.Equal(readAll(t, dst.Reader, c), images[i]) {
					t.Fatalf("after deleting a middle copy, %s differs", c.Name)
				}
			}
		})
	}
}

// TestCopyAfterSourceLostTheBase: when the source no longer has the snapshot the
// destination's newest copy came from, the copy is a full one, still exact.
func TestCopyAfterSourceLostTheBase(t *testing.T) {
	ctx := context.Background()
	src, _ := newRepo(t)
	dst, _ := newEncryptedRepo(t)
	rng := rand.New(rand.NewSource(6))
	v := newVolume(rng, 1<<20, 16<<10)
	a := v.snapshot(t, src, "a", false, nil)
	var st chain.CopyStats
	if _, err := chain.Copy(ctx, src.Reader, dst, a, &st); err != nil {
		t.Fatal(err)
	}
	unlock, _ := src.Lock(ctx, "t")
	src.Delete(ctx, a)
	unlock()
	gc(t, src)
	v.scribble(rng, 3)
	b := v.snapshot(t, src, "b", false, nil)
	st = chain.CopyStats{}
	c, err := chain.Copy(ctx, src.Reader, dst, b, &st)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readAll(t, dst.Reader, c), v.data) {
		t.Fatal("full copy differs")
	}
	if st.ChunksRead == 0 {
		t.Fatal("full copy read nothing")
	}
}

// TestDamageStopsInheritance: while verify's damage lists name blobs, no snapshot keeps its
// parent's unchanged chunks: an incremental is refused (the agent reads the volume whole
// instead), and a copy into the damaged repository copies every chunk again, so the new copy
// reads back whole and repair finds no damaged snapshot but the old copy.
func TestDamageStopsInheritance(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewSource(6))
	src, _ := newRepo(t)
	dst, dbe := newRepo(t)
	v := newVolume(rng, 1<<20, 16<<10)
	one, err := chain.Copy(ctx, src.Reader, dst, v.snapshot(t, src, "one", false, nil), nil)
	if err != nil {
		t.Fatal(err)
	}
	dbe.List(ctx, chain.PackFile, func(fi chain.FileInfo) error {
		dbe.Corrupt(chain.Handle{Type: chain.PackFile, Name: fi.Name}, 16+10) // the first blob
		return nil
	})
	if rep, err := dst.Verify(ctx, true, nil); err != nil || rep.OK() {
		t.Fatalf("verify of a damaged pack: %v %+v", err, rep)
	}
	_, err = dst.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "vol", Size: int64(len(v.data)), ChunkSize: v.chunkSize, FromParent: true})
	if err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("an incremental on a damaged parent: %v", err)
	}
	v.scribble(rng, 3)
	two, err := chain.Copy(ctx, src.Reader, dst, v.snapshot(t, src, "two", false, nil), nil)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readAll(t, dst.Reader, two), v.data) {
		t.Fatal("the copy made after damage does not read back")
	}
	unlock, _ := dst.Lock(ctx, "t")
	rep, err := dst.Repair(ctx)
	unlock()
	if err != nil || rep.Damaged[two.ID] {
		t.Fatalf("repair: %v, damaged %v (the new copy is %s, the old %s)", err, rep.Damaged, two.ID, one.ID)
	}
	// Damage beyond repair that the newest copy does not reference (a volume copied, damaged
	// and deleted) does not stop incrementals on it.
	packs := func() map[string]bool {
		m := map[string]bool{}
		dbe.List(ctx, chain.PackFile, func(fi chain.FileInfo) error { m[fi.Name] = true; return nil })
		return m
	}
	before := packs()
	w := newVolume(rng, 256<<10, 16<<10)
	x, err := chain.Copy(ctx, src.Reader, dst, w.snapshotOf(t, src, "other", "x", false, nil), nil)
	if err != nil {
		t.Fatal(err)
	}
	for p := range packs() {
		if !before[p] {
			dbe.Corrupt(chain.Handle{Type: chain.PackFile, Name: p}, 16+10)
		}
	}
	if rep, err := dst.Verify(ctx, true, nil); err != nil || rep.Damaged[x.ID] == "" {
		t.Fatalf("verify of the damaged copy x: %v %+v", err, rep)
	}
	unlock, _ = dst.Lock(ctx, "t")
	if err := dst.Delete(ctx, x); err != nil {
		t.Fatal(err)
	}
	rep, err = dst.Repair(ctx)
	unlock()
	if err != nil || len(rep.Unrecoverable) == 0 {
		t.Fatalf("repair after x's damage: %v, %+v", err, rep)
	}
	w2, err := dst.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "vol", Size: int64(len(v.data)), ChunkSize: v.chunkSize, FromParent: true})
	if err != nil {
		t.Fatalf("an incremental on a copy that references no damaged blob: %v", err)
	}
	w2.Abort()
	v.scribble(rng, 3)
	three, err := chain.Copy(ctx, src.Reader, dst, v.snapshot(t, src, "three", false, nil), nil)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readAll(t, dst.Reader, three), v.data) {
		t.Fatal("the incremental copy after repair does not read back")
	}
}

// TestReferencesAny: a snapshot references the blobs of its chunks and of its block map's
// pages, root and inner, and nothing else.
func TestReferencesAny(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewSource(7))
	r, _ := newRepo(t)
	v := newVolume(rng, (chain.Fanout+10)*(4<<10), 4<<10) // two levels of pages
	s := v.snapshot(t, r, "s", false, nil)
	var leaf chain.ID
	r.SnapshotReader(s).Walk(ctx, func(_ int64, id chain.ID) error { leaf = id; return nil })
	pages := chain.PageIDs(ctx, r.Reader, s)
	if len(pages) == 0 || leaf.IsZero() {
		t.Fatalf("no inner page (%d) or no chunk", len(pages))
	}
	for what, id := range map[string]chain.ID{"a chunk": leaf, "the root": s.Root, "an inner page": pages[len(pages)-1]} {
		if got, err := chain.ReferencesAny(ctx, r.Reader, s, map[chain.ID]bool{id: true}); err != nil || !got {
			t.Errorf("%s: %v, %v", what, got, err)
		}
	}
	if got, err := chain.ReferencesAny(ctx, r.Reader, s, map[chain.ID]bool{chain.Hash([]byte("elsewhere")): true}); err != nil || got {
		t.Errorf("an unrelated blob: %v, %v", got, err)
	}
}

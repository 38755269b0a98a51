package chain_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand"
	"slices"
	"testing"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/memory"
)

// TestRandomHistories drives repositories through random sequences of their operations
// and checks them against a model after every step. Operations: full and incremental
// snapshots of two volumes that keep changing (small edits, whole chunks zeroed, chunks
// duplicated from elsewhere or restored from older images, the volume resized), a
// snapshot aborted half-written, a snapshot open while another is deleted and gc runs
// (deleting its parent must be refused), a snapshot started after gc marked packs and
// still running when they go, deletes of any snapshot, protection, gc at several
// thresholds, reopening the repository with a new cache (half the time without the
// backend's lock, so the deletion lock is a lease, as on object storage), copies into a
// second repository and deletes and gc there. After each step every snapshot the model
// holds reads back bit for bit and the listing holds exactly the model's snapshots; at
// the end verify reads every pack of both repositories and finds nothing wrong. One of
// the two is encrypted. A failure names the seed and the step.
func TestRandomHistories(t *testing.T) {
	seeds, steps := 12, 40
	if testing.Short() {
		seeds = 4
	}
	for seed := int64(1); seed <= int64(seeds); seed++ {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) { randomHistory(t, seed, steps) })
	}
}

// histRepo is a repository under test and what it should hold: snapshot ID → image.
type histRepo struct {
	r      *chain.Repository
	be     *memory.Backend
	opts   chain.Options // to reopen it
	images map[string][]byte
	snaps  map[string]*chain.Snapshot
}

func randomHistory(t *testing.T, seed int64, steps int) {
	ctx := context.Background()
	rng := rand.New(rand.NewSource(seed))
	newHist := func(encrypted bool) *histRepo {
		h := &histRepo{images: map[string][]byte{}, snaps: map[string]*chain.Snapshot{}}
		if encrypted {
			h.r, h.be = newEncryptedRepo(t)
			h.opts.Password = password("correct horse")
		} else {
			h.r, h.be = newRepo(t)
		}
		return h
	}
	// Odd seeds keep the source encrypted, even ones the copy: sealed manifests, keyed IDs
	// and copies between repositories with different blob IDs.
	src, dst := newHist(seed%2 == 1), newHist(seed%2 == 0)
	vols := map[string]*volume{
		"a": newVolume(rng, 1<<20+rng.Intn(1<<16), 16<<10),
		"b": newVolume(rng, 512<<10, 64<<10),
	}
	past := map[string][][]byte{} // every image of each volume ever snapshotted, deleted ones too
	step, what := 0, ""
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("seed %d, step %d (%s): %s", seed, step, what, fmt.Sprintf(format, args...))
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			fail("%v", err)
		}
	}
	locked := func(h *histRepo, fn func()) {
		unlock, err := h.r.Lock(ctx, "history")
		must(err)
		defer unlock()
		fn()
	}
	pick := func(h *histRepo) *chain.Snapshot {
		if len(h.snaps) == 0 {
			return nil
		}
		ids := slices.Sorted(maps.Keys(h.snaps))
		return h.snaps[ids[rng.Intn(len(ids))]]
	}
	change := func(name string) {
		v := vols[name]
		cs := v.chunkSize
		switch rng.Intn(6) {
		case 4: // chunks back as they were in an earlier image, maybe of a deleted snapshot
			if old := past[name]; len(old) > 0 {
				img := old[rng.Intn(len(old))]
				off := rng.Intn(min(len(img), len(v.data))/cs) * cs
				copy(v.data[off:min(off+4*cs, len(v.data))], img[off:min(off+4*cs, len(img))])
			}
		case 0:
			v.scribble(rng, 1+rng.Intn(20))
		case 1: // a whole chunk zeroed: stored as nothing
			off := rng.Intn(len(v.data)/cs) * cs
			clear(v.data[off:min(off+cs, len(v.data))])
		case 2: // a chunk duplicated elsewhere: stored once
			from, to := rng.Intn(len(v.data)/cs)*cs, rng.Intn(len(v.data)/cs)*cs
			copy(v.data[to:min(to+cs, len(v.data))], v.data[from:from+cs])
		case 3: // the volume resized: a new chain starts
			if rng.Intn(4) == 0 {
				n := len(v.data) + (rng.Intn(5)-2)*cs + rng.Intn(2)*4096
				grown := make([]byte, max(n, 2*cs))
				copy(grown, v.data)
				v.data = grown
			}
		}
	}
	// write takes a snapshot of volume name, incremental (only the chunks that differ from
	// the parent the writer chose) when it can. mid, if set, runs half-way through and is
	// given the writer's parent.
	write := func(h *histRepo, name string, mid func(parent *chain.Snapshot)) {
		v := vols[name]
		size := int64(len(v.data))
		incremental := rng.Intn(3) > 0
		w, err := h.r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: name, Name: fmt.Sprint("s", step), Size: size, ChunkSize: v.chunkSize, FromParent: incremental})
		if err != nil && incremental { // no parent, or it has another size
			incremental = false
			w, err = h.r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: name, Name: fmt.Sprint("s", step), Size: size, ChunkSize: v.chunkSize})
		}
		must(err)
		var todo []int64
		for i := int64(0); i < w.Snapshot().Chunks(); i++ {
			off := i * int64(v.chunkSize)
			chunk := v.data[off:min(off+int64(v.chunkSize), size)]
			if incremental {
				parent := h.images[w.Parent().ID]
				if bytes.Equal(parent[off:min(off+int64(v.chunkSize), size)], chunk) {
					continue
				}
			}
			todo = append(todo, i)
		}
		rng.Shuffle(len(todo), func(i, j int) { todo[i], todo[j] = todo[j], todo[i] })
		for k, i := range todo {
			if mid != nil && k == len(todo)/2 {
				mid(w.Parent())
			}
			off := i * int64(v.chunkSize)
			must(w.Put(ctx, i, v.data[off:min(off+int64(v.chunkSize), size)]))
		}
		if mid != nil && len(todo) == 0 {
			mid(w.Parent())
		}
		s, err := w.Commit(ctx, nil, nil)
		must(err)
		h.images[s.ID], h.snaps[s.ID] = bytes.Clone(v.data), s
		past[name] = append(past[name], h.images[s.ID])
	}
	// del deletes a random snapshot; the parent of a snapshot being taken is refused.
	del := func(h *histRepo, building *chain.Snapshot) {
		s := pick(h)
		if s == nil {
			return
		}
		locked(h, func() {
			err := h.r.Delete(ctx, s)
			if building != nil && s.ID == building.ID {
				if !errors.Is(err, chain.ErrInUse) {
					fail("deleting the parent of a snapshot being taken: %v, want ErrInUse", err)
				}
				return
			}
			must(err)
			delete(h.images, s.ID)
			delete(h.snaps, s.ID)
		})
	}
	collect := func(h *histRepo) {
		locked(h, func() {
			_, err := h.r.GC(ctx, chain.GCOptions{MaxUnused: []float64{0, 0.1, 0.5, 1}[rng.Intn(4)]})
			must(err)
		})
	}
	check := func(h *histRepo, where string) {
		list, bad, err := h.r.Snapshots(ctx)
		must(err)
		if len(bad) > 0 {
			fail("%s: unreadable manifests %v", where, bad)
		}
		if len(list) != len(h.snaps) {
			fail("%s lists %d snapshots, the model holds %d", where, len(list), len(h.snaps))
		}
		for _, s := range list {
			want, ok := h.images[s.ID]
			if !ok {
				fail("%s lists %s/%s, which the model does not hold", where, s.Volume, s.Name)
			}
			got := make([]byte, s.SizeBytes)
			if _, err := h.r.SnapshotReader(s).ReadAt(ctx, got, 0); err != nil {
				fail("%s: read %s/%s: %v", where, s.Volume, s.Name, err)
			}
			if !bytes.Equal(got, want) {
				fail("%s: %s/%s reads back different bytes", where, s.Volume, s.Name)
			}
		}
	}

	for step = 0; step < steps; step++ {
		name := []string{"a", "b"}[rng.Intn(2)]
		switch op := rng.Intn(13); {
		case op < 4:
			what = "snapshot of " + name
			change(name)
			write(src, name, nil)
		case op == 4:
			what = "aborted snapshot of " + name
			v := vols[name]
			change(name)
			w, err := src.r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: name, Name: fmt.Sprint("aborted", step), Size: int64(len(v.data)), ChunkSize: v.chunkSize})
			must(err)
			for i := int64(0); i < w.Snapshot().Chunks()/2; i++ {
				off := i * int64(v.chunkSize)
				must(w.Put(ctx, i, v.data[off:min(off+int64(v.chunkSize), int64(len(v.data)))]))
			}
			w.Abort()
		case op == 5:
			what = "snapshot of " + name + " open across a delete and gc"
			change(name)
			write(src, name, func(parent *chain.Snapshot) { del(src, parent); collect(src) })
		case op == 11:
			// Writer A runs while gc marks packs, so the marks wait; B starts after the
			// marks (old chunks back, maybe only in marked packs) and is still running
			// when A ends and gc carries the marks out: B must not have used them.
			what = "a snapshot of " + name + " started after gc marked packs, running as they go"
			other := map[string]string{"a": "b", "b": "a"}[name]
			a, err := src.r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: other, Name: fmt.Sprint("blocker", step), Size: int64(len(vols[other].data)), ChunkSize: vols[other].chunkSize})
			must(err)
			del(src, a.Parent())
			collect(src)
			change(name)
			change(name)
			write(src, name, func(*chain.Snapshot) { a.Abort(); collect(src) })
		case op == 6:
			what = "delete"
			del(src, nil)
		case op == 7:
			what = "gc"
			collect(src)
		case op == 8:
			what = "protect, delete refused, unprotect"
			if s := pick(src); s != nil {
				must(src.r.Protect(ctx, s, true))
				locked(src, func() {
					if err := src.r.Delete(ctx, s); err == nil {
						fail("a protected snapshot was deleted")
					}
				})
				must(src.r.Protect(ctx, s, false))
			}
		case op == 9:
			what = "reopen"
			var be chain.Backend = src.be
			if rng.Intn(2) == 0 {
				be = noLocker{src.be} // as on object storage: the deletion lock is a lease
			}
			src.r = openRepo(t, be, src.opts)
		case op == 10:
			what = "copy"
			if s := pick(src); s != nil {
				list, _, err := dst.r.Snapshots(ctx)
				must(err)
				if chain.CopyOf(list, s) == nil {
					c, err := chain.Copy(ctx, src.r.Reader, dst.r, s, nil)
					must(err)
					dst.images[c.ID], dst.snaps[c.ID] = bytes.Clone(src.images[s.ID]), c
				}
			}
		case op == 12:
			what = "delete and gc in the copy"
			del(dst, nil)
			collect(dst)
		}
		check(src, "source")
		check(dst, "copy")
	}
	what = "verify"
	for _, h := range []*histRepo{src, dst} {
		rep, err := h.r.Verify(ctx, true, nil)
		must(err)
		if !rep.OK() {
			fail("verify: %v", rep.Problems)
		}
	}
}

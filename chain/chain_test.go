package chain_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/memory"
)

// volume is an in-memory source image that tests modify between snapshots.
type volume struct {
	data      []byte
	chunkSize int
}

func newVolume(rng *rand.Rand, size, chunkSize int) *volume {
	v := &volume{data: make([]byte, size), chunkSize: chunkSize}
	// A mix like a real disk: random regions, repetitive text, zeros.
	for off := 0; off < size; off += chunkSize {
		end := min(off+chunkSize, size)
		switch rng.Intn(4) {
		case 0:
			rng.Read(v.data[off:end])
		case 1:
			copy(v.data[off:end], bytes.Repeat([]byte("the quick brown fox "), chunkSize/20+1))
		}
	}
	return v
}

// scribble changes n random small regions.
func (v *volume) scribble(rng *rand.Rand, n int) {
	for i := 0; i < n; i++ {
		off := rng.Intn(len(v.data) - 100)
		rng.Read(v.data[off : off+1+rng.Intn(100)])
	}
}

func (v *volume) snapshot(t *testing.T, r *chain.Repository, name string, fromParent bool, changed []int64) *chain.Snapshot {
	t.Helper()
	return v.snapshotOf(t, r, "vol", name, fromParent, changed)
}

// snapshotOf writes a snapshot of the volume as volume; snapshots take no lock.
func (v *volume) snapshotOf(t *testing.T, r *chain.Repository, volume, name string, fromParent bool, changed []int64) *chain.Snapshot {
	t.Helper()
	ctx := context.Background()
	w, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: volume, Name: name, Size: int64(len(v.data)), ChunkSize: v.chunkSize, FromParent: fromParent})
	if err != nil {
		t.Fatal(err)
	}
	put := func(i int64) {
		off := int(i) * v.chunkSize
		if err := w.Put(ctx, i, v.data[off:min(off+v.chunkSize, len(v.data))]); err != nil {
			t.Fatal(err)
		}
	}
	if changed == nil {
		for i := int64(0); i < w.Snapshot().Chunks(); i++ {
			put(i)
		}
	}
	for _, i := range changed {
		put(i)
	}
	s, err := w.Commit(ctx, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func readAll(t *testing.T, r *chain.Reader, s *chain.Snapshot) []byte {
	t.Helper()
	out := make([]byte, s.SizeBytes)
	if _, err := r.SnapshotReader(s).ReadAt(context.Background(), out, 0); err != nil {
		t.Fatalf("read %s: %v", s.Name, err)
	}
	return out
}

func newRepo(t *testing.T) (*chain.Repository, *memory.Backend) {
	t.Helper()
	be := memory.New()
	ctx := context.Background()
	if _, err := chain.Init(ctx, be, chain.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := chain.Init(ctx, be, chain.InitOptions{}); !errors.Is(err, chain.ErrExists) {
		t.Fatalf("second Init: %v, want ErrExists", err)
	}
	return openRepo(t, be, chain.Options{}), be
}

// openRepo opens be for writing, with a cache of its own, closed at cleanup.
func openRepo(t *testing.T, be chain.Backend, opts chain.Options) *chain.Repository {
	t.Helper()
	if opts.CacheDir == "" {
		opts.CacheDir = t.TempDir()
	}
	r, err := chain.Open(context.Background(), be, opts)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// gc runs a collection under the deletion lock.
func gc(t *testing.T, r *chain.Repository) chain.GCStats {
	t.Helper()
	ctx := context.Background()
	unlock, err := r.Lock(ctx, "test gc")
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	st, err := r.GC(ctx, chain.GCOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func TestChainDeleteAnyKeepsOthersExact(t *testing.T) {
	for _, victim := range []string{"first", "middle", "last"} {
		t.Run(victim, func(t *testing.T) {
			ctx := context.Background()
			rng := rand.New(rand.NewSource(1))
			r, _ := newRepo(t)
			v := newVolume(rng, 3<<20+12345, 16<<10) // odd size: short last chunk
			want := map[string][]byte{}
			var snaps []*chain.Snapshot
			for i, name := range []string{"first", "s2", "middle", "s4", "last"} {
				if i > 0 {
					v.scribble(rng, 40)
				}
				s := v.snapshot(t, r, name, false, nil)
				snaps = append(snaps, s)
				want[name] = append([]byte(nil), v.data...)
			}
			for _, s := range snaps {
				if !bytes.Equal(readAll(t, r.Reader, s), want[s.Name]) {
					t.Fatalf("%s reads back different bytes", s.Name)
				}
			}
			list, _, _ := r.Snapshots(ctx)
			target, err := chain.Find(list, r.Host(), "vol/"+victim)
			if err != nil {
				t.Fatal(err)
			}
			unlock, _ := r.Lock(ctx, "test")
			if err := r.Delete(ctx, target); err != nil {
				t.Fatal(err)
			}
			unlock()
			before, err := r.Stats(ctx)
			if err != nil {
				t.Fatal(err)
			}
			st := gc(t, r) // no snapshot runs: gc frees what it marks at once
			if st.BlobsDeleted == 0 || st.BytesFreed <= 0 {
				t.Errorf("gc after deleting %s freed nothing: %+v", victim, st)
			}
			// stats said what gc would free, and gc freed that (less new pack tables).
			if d := st.BytesFreed - before.ReclaimableBytes; d > 0 || d < -PackOverhead {
				t.Errorf("stats said %d bytes reclaimable, gc freed %d", before.ReclaimableBytes, st.BytesFreed)
			}
			if rs, err := r.Stats(ctx); err != nil || rs.ReclaimableBytes > rs.PackBytes/10 {
				t.Errorf("after gc %d of %d pack bytes are reclaimable (%v)", rs.ReclaimableBytes, rs.PackBytes, err)
			}
			list, _, _ = r.Snapshots(ctx)
			if len(list) != 4 {
				t.Fatalf("%d snapshots left, want 4", len(list))
			}
			for _, s := range list {
				if !bytes.Equal(readAll(t, r.Reader, s), want[s.Name]) {
					t.Fatalf("after deleting %s and gc, %s reads back different bytes", victim, s.Name)
				}
			}
			rep, err := r.Verify(ctx, true, nil)
			if err != nil || !rep.OK() {
				t.Fatalf("verify: %v %v", err, rep.Problems)
			}
		})
	}
}

func TestIncrementalStoresOnlyChanges(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewSource(2))
	r, _ := newRepo(t)
	v := newVolume(rng, 8<<20, 64<<10)
	full := v.snapshot(t, r, "full", false, nil)
	if full.Parent != "" {
		t.Fatalf("first snapshot has parent %s", full.Parent)
	}
	// Full scan of unchanged data: nothing but a manifest is new.
	same := v.snapshot(t, r, "same", false, nil)
	if same.NewBytes != 0 || same.Root != full.Root || same.Parent != full.ID {
		t.Fatalf("unchanged rescan: new_bytes %d, root equal %v, parent %q", same.NewBytes, same.Root == full.Root, same.Parent)
	}
	// Change two chunks and take a tracked incremental that puts only those.
	copy(v.data[5*64<<10:], bytes.Repeat([]byte{7}, 100))
	copy(v.data[100*64<<10+17:], bytes.Repeat([]byte{9}, 100))
	inc := v.snapshot(t, r, "inc", true, []int64{5, 100})
	if inc.NewBytes == 0 || inc.NewBytes > 3*64<<10 {
		t.Fatalf("incremental of 2 chunks added %d bytes", inc.NewBytes)
	}
	if !bytes.Equal(readAll(t, r.Reader, inc), v.data) {
		t.Fatal("tracked incremental reads back different bytes")
	}
	// Identical chunks within one snapshot are stored once.
	dup := &volume{data: bytes.Repeat(v.data[5*64<<10:6*64<<10], 32), chunkSize: 64 << 10}
	w, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "dup", Size: int64(len(dup.data)), ChunkSize: dup.chunkSize})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 32; i++ {
		w.Put(ctx, int64(i), dup.data[i*64<<10:(i+1)*64<<10])
	}
	if n := w.Stats().ChunksStored; n != 0 {
		t.Fatalf("a chunk already in the repository was stored again %d times", n)
	}
	s, err := w.Commit(ctx, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if s.Name == "" || s.Kind != chain.KindManual || s.Consistency != chain.ConsistencyCrash {
		t.Fatalf("defaults: %+v", s)
	}
	if !bytes.Equal(readAll(t, r.Reader, s), dup.data) {
		t.Fatal("dedup volume reads back different bytes")
	}
}

func TestCorruptPackNamesDamagedSnapshots(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewSource(3))
	r, be := newRepo(t)
	v := newVolume(rng, 2<<20, 16<<10)
	a := v.snapshot(t, r, "a", false, nil)
	v2 := newVolume(rng, 1<<20, 16<<10)
	b := v2.snapshotOf(t, r, "other", "b", false, nil)
	// Damage a data chunk of snapshot a only: find the pack holding a's first chunk.
	var packs []string
	be.List(ctx, chain.PackFile, func(fi chain.FileInfo) error { packs = append(packs, fi.Name); return nil })
	if len(packs) != 2 {
		t.Fatalf("want one pack per snapshot, got %d", len(packs))
	}
	// Pick the pack that belongs to a: the one whose blobs a's reader uses.
	damaged := ""
	for _, p := range packs {
		be.Corrupt(chain.Handle{Type: chain.PackFile, Name: p}, 16+10) // inside the first blob
		if _, err := r.SnapshotReader(a).ReadChunk(ctx, firstDataChunk(t, r.Reader, a), nil); err != nil {
			damaged = p
			break
		}
		be.Corrupt(chain.Handle{Type: chain.PackFile, Name: p}, 16+10) // undo
	}
	if damaged == "" {
		t.Fatal("could not damage snapshot a")
	}
	if _, err := r.SnapshotReader(a).ReadAt(ctx, make([]byte, a.SizeBytes), 0); !errors.Is(err, chain.ErrCorrupt) {
		t.Fatalf("reading a damaged snapshot: %v, want ErrCorrupt", err)
	}
	if rep, err := r.Verify(ctx, false, nil); err != nil || !rep.OK() {
		t.Fatalf("verify without --read-data cannot see damage inside a pack of the right size: %v %v", err, rep.Problems)
	}
	rep, err := r.Verify(ctx, true, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK() || rep.Damaged[a.ID] == "" {
		t.Fatalf("verify --read-data did not name snapshot a: %+v", rep)
	}
	if _, bad := rep.Damaged[b.ID]; bad {
		t.Fatalf("verify blames the intact snapshot b: %s", rep.Damaged[b.ID])
	}
	if !bytes.Equal(readAll(t, r.Reader, b), v2.data) {
		t.Fatal("intact snapshot b unreadable")
	}
	unlock, _ := r.Lock(ctx, "t")
	defer unlock()
	if _, err := r.GC(ctx, chain.GCOptions{}); err == nil {
		// gc may run (a's pages are intact) but must not make b unreadable
		if !bytes.Equal(readAll(t, r.Reader, b), v2.data) {
			t.Fatal("gc on a damaged repository broke snapshot b")
		}
	}
}

func firstDataChunk(t *testing.T, r *chain.Reader, s *chain.Snapshot) int64 {
	first := int64(-1)
	r.SnapshotReader(s).Walk(context.Background(), func(i int64, id chain.ID) error {
		if first < 0 {
			first = i
		}
		return nil
	})
	return first
}

func TestLockAndNames(t *testing.T) {
	ctx := context.Background()
	r, _ := newRepo(t)
	if err := r.Delete(ctx, &chain.Snapshot{ID: "x"}); !errors.Is(err, chain.ErrNotLocked) {
		t.Fatalf("deleting without the lock: %v", err)
	}
	v := &volume{data: make([]byte, 1<<20), chunkSize: 64 << 10}
	v.data[5] = 1
	s := v.snapshot(t, r, "x", false, nil)
	if _, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "vol", Name: "x", Size: 1 << 20}); err == nil {
		t.Fatal("a duplicate name in the same volume was accepted")
	}
	if _, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "vol", Size: 1 << 20, ChunkSize: 128 << 10}); err == nil {
		t.Fatal("changing a volume's chunk size was accepted")
	}
	for _, bad := range []string{"../x", ".hidden", "a/b", string(make([]byte, 200))} {
		if _, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "vol", Name: bad, Size: 1 << 20}); err == nil {
			t.Errorf("snapshot name %q accepted", bad)
		}
	}
	list, _, _ := r.Snapshots(ctx)
	for _, ref := range []string{s.ID, s.ID[:6], "vol/x", r.Host() + ":vol/x"} {
		if got, err := chain.Find(list, r.Host(), ref); err != nil || got.ID != s.ID {
			t.Errorf("Find(%q) = %v, %v", ref, got, err)
		}
	}
	for _, ref := range []string{"vol/nope", "ffffffff", "ab", "otherhost:vol/x"} {
		if _, err := chain.Find(list, r.Host(), ref); !errors.Is(err, chain.ErrNotFound) {
			t.Errorf("Find(%q) = %v, want ErrNotFound", ref, err)
		}
	}
}

func TestStatsExclusiveBytes(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewSource(4))
	r, _ := newRepo(t)
	v := newVolume(rng, 4<<20, 64<<10)
	v.snapshot(t, r, "a", false, nil)
	rng.Read(v.data[:64<<10]) // one incompressible chunk only b has
	b := v.snapshot(t, r, "b", false, nil)
	st, err := r.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Chains) != 1 || len(st.Chains[0].Snapshots) != 2 {
		t.Fatalf("stats: %+v", st)
	}
	sb := st.Chains[0].Snapshots[1]
	// b's exclusive bytes: its new chunk plus the tree pages only it has.
	if sb.ExclusiveBytes < 64<<10 || sb.ExclusiveBytes > 64<<10+8<<10 {
		t.Fatalf("b exclusive = %d, want about 64 KiB", sb.ExclusiveBytes)
	}
	before := st.PackBytes
	unlock, _ := r.Lock(ctx, "t")
	r.Delete(ctx, b)
	unlock()
	gs := gc(t, r)
	st2, _ := r.Stats(ctx)
	freed := before - st2.PackBytes
	if freed < sb.ExclusiveBytes-4096 || freed > sb.ExclusiveBytes+PackOverhead {
		t.Fatalf("deleting b freed %d bytes, stats said %d (gc %+v)", freed, sb.ExclusiveBytes, gs)
	}
}

// PackOverhead is a generous bound on pack headers and tables in a small test.
const PackOverhead = 64 << 10

func TestCreatedOrder(t *testing.T) {
	s := []*chain.Snapshot{{ID: "b", Created: time.Unix(2, 0)}, {ID: "a", Created: time.Unix(2, 0)}, {ID: "c", Created: time.Unix(1, 0)}}
	chain.SortSnapshots(s)
	if s[0].ID != "c" || s[1].ID != "a" || s[2].ID != "b" {
		t.Fatalf("order %s %s %s", s[0].ID, s[1].ID, s[2].ID)
	}
}

// TestGCInTheSameSessionAsASnapshot: a long-lived process (the agent) snapshots and then
// collects garbage; the packs the snapshot just wrote are not orphans.
func TestGCInTheSameSessionAsASnapshot(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewSource(12))
	r, _ := newRepo(t)
	v := newVolume(rng, 2<<20, 16<<10)
	v.snapshot(t, r, "a", false, nil)
	for i := 0; i < 3; i++ {
		v.scribble(rng, 20)
		w, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "vol", Size: int64(len(v.data)), ChunkSize: v.chunkSize})
		if err != nil {
			t.Fatal(err)
		}
		for c := 0; c < len(v.data)/v.chunkSize; c++ {
			w.Put(ctx, int64(c), v.data[c*v.chunkSize:(c+1)*v.chunkSize])
		}
		s, err := w.Commit(ctx, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		gc(t, r)
		if !bytes.Equal(readAll(t, r.Reader, s), v.data) {
			t.Fatalf("round %d: the snapshot just taken is unreadable after gc in the same session", i)
		}
		if rep, err := r.Verify(ctx, true, nil); err != nil || !rep.OK() {
			t.Fatalf("round %d: verify after gc in the same session: %v %v", i, err, rep.Problems)
		}
	}
}

// TestProtect: a protected snapshot cannot be deleted (nothing is, in that call), list says
// so, unprotecting releases it, and gc drops protections of snapshots that are gone.
func TestProtect(t *testing.T) {
	ctx := context.Background()
	r, be := newRepo(t)
	v := newVolume(rand.New(rand.NewSource(3)), 1<<20, 16<<10)
	a := v.snapshot(t, r, "a", false, nil)
	b := v.snapshot(t, r, "b", false, nil)
	if err := r.Protect(ctx, a, true); err != nil {
		t.Fatal(err)
	}
	if err := r.Protect(ctx, a, true); err != nil {
		t.Fatalf("protecting twice: %v", err)
	}
	snaps, _, _ := r.Snapshots(ctx)
	if !snaps[0].Protected || snaps[1].Protected {
		t.Fatalf("protected flags: %v %v", snaps[0].Protected, snaps[1].Protected)
	}
	unlock, err := r.Lock(ctx, "test")
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Delete(ctx, b, a); !errors.Is(err, chain.ErrProtected) {
		t.Fatalf("deleting a protected snapshot: %v", err)
	}
	if snaps, _, _ := r.Snapshots(ctx); len(snaps) != 2 {
		t.Fatal("a refused delete deleted something")
	}
	if err := r.Protect(ctx, a, false); err != nil {
		t.Fatal(err)
	}
	if err := r.Delete(ctx, a); err != nil {
		t.Fatal(err)
	}
	// A protection that arrives after its snapshot is gone is dropped by gc.
	if err := r.Protect(ctx, a, true); err != nil {
		t.Fatal(err)
	}
	unlock()
	gc(t, r)
	if n := len(objectsOf(be, chain.ProtectFile)); n != 0 {
		t.Fatalf("%d stale protections after gc", n)
	}
	if !bytes.Equal(readAll(t, r.Reader, b), v.data) {
		t.Fatal("b changed")
	}
}

// failingPacks fails every pack save after the first ok ones.
type failingPacks struct {
	chain.Backend
	mu sync.Mutex
	ok int
}

func (f *failingPacks) Save(ctx context.Context, h chain.Handle, data []byte) error {
	if h.Type == chain.PackFile {
		f.mu.Lock()
		defer f.mu.Unlock()
		if f.ok == 0 {
			return errors.New("no space left on device")
		}
		f.ok--
	}
	return f.Backend.Save(ctx, h, data)
}

// TestFailedCommitLeavesNoPacks: when the pack that fails is the one the commit closes
// (its tree pages, after every Put succeeded), the packs saved before it are removed too:
// the repository is as before, not left with garbage for gc.
func TestFailedCommitLeavesNoPacks(t *testing.T) {
	chain.SetPackTarget(t, 64<<10)
	ctx := context.Background()
	const chunk = 16 << 10
	data := make([]byte, 64*chunk)
	rand.New(rand.NewSource(2)).Read(data)
	// take writes the snapshot through a backend that saves ok packs, then fails.
	take := func(ok int) (saved int, commitErr error) {
		_, be := newRepo(t)
		fb := &failingPacks{Backend: be, ok: ok}
		r := openRepo(t, fb, chain.Options{})
		w, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "v", Name: "s", Size: int64(len(data)), ChunkSize: chunk})
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 64; i++ {
			if err := w.Put(ctx, int64(i), data[i*chunk:(i+1)*chunk]); err != nil {
				t.Fatalf("put %d: %v (only the commit's pack may fail)", i, err)
			}
		}
		_, commitErr = w.Commit(ctx, nil, nil)
		be.List(ctx, chain.PackFile, func(chain.FileInfo) error { saved++; return nil })
		return saved, commitErr
	}
	all, err := take(1 << 30)
	if err != nil || all < 2 {
		t.Fatalf("a snapshot of %d packs: %v", all, err)
	}
	left, err := take(all - 1) // every pack but the commit's
	if err == nil {
		t.Fatal("the commit succeeded though its pack could not be saved")
	}
	if left != 0 {
		t.Fatalf("%d packs of the failed snapshot left in the repository", left)
	}
}

// parallelMemory is a memory backend that, like object storage, saves packs in parallel.
type parallelMemory struct{ *memory.Backend }

func (parallelMemory) SaveConcurrency() int { return 3 }

// TestPackRampForParallelSavers: a writer to a backend that saves several packs at once
// closes its first packs small (4, 8, 16 MiB, then the full size), so an incremental's data
// is uploading while it is still read, and WaitSaved (before a capture's final round)
// saves the pack being built too; a local backend's writer fills full-size packs and
// saves an open pack only at Commit.
func TestPackRampForParallelSavers(t *testing.T) {
	ctx := context.Background()
	data := make([]byte, 40<<20)
	rand.New(rand.NewSource(3)).Read(data)
	for _, parallel := range []bool{false, true} {
		var be chain.Backend = memory.New()
		if parallel {
			be = parallelMemory{be.(*memory.Backend)}
		}
		if _, err := chain.Init(ctx, be, chain.InitOptions{}); err != nil {
			t.Fatal(err)
		}
		r := openRepo(t, be, chain.Options{})
		w, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "v", Name: "s", Size: int64(len(data)), ChunkSize: 64 << 10})
		if err != nil {
			t.Fatal(err)
		}
		saved := func() (n int64) {
			be.List(ctx, chain.PackFile, func(fi chain.FileInfo) error { n += fi.Size; return nil })
			return n
		}
		for c := 0; c < len(data)/(64<<10); c++ {
			if c == 320 { // 20 MiB put
				if err := w.WaitSaved(ctx); err != nil {
					t.Fatal(err)
				}
				if n := saved(); parallel && n < 20<<20 || !parallel && n != 0 {
					t.Errorf("parallel saver %v: %d bytes of packs saved after WaitSaved at 20 MiB", parallel, n)
				}
			}
			if err := w.Put(ctx, int64(c), data[c*64<<10:(c+1)*64<<10]); err != nil {
				t.Fatal(err)
			}
		}
		snap, err := w.Commit(ctx, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		var sizes []int64
		be.List(ctx, chain.PackFile, func(fi chain.FileInfo) error { sizes = append(sizes, fi.Size); return nil })
		sort.Slice(sizes, func(i, j int) bool { return sizes[i] < sizes[j] })
		mib := func(n int64) int64 { return n >> 20 }
		got := make([]int64, len(sizes))
		for i, s := range sizes {
			got[i] = mib(s)
		}
		want := []int64{8, 32} // MiB, rounded down: 40 MiB in full-size packs
		if parallel {
			want = []int64{4, 8, 8, 20} // WaitSaved closed the third at 20 MiB
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("parallel saver %v: packs of %v MiB, want %v", parallel, got, want)
		}
		if back := readAll(t, r.Reader, snap); !bytes.Equal(back, data) {
			t.Fatalf("parallel saver %v: the snapshot reads back different bytes", parallel)
		}
		r.Close()
	}
}

// smallSnapshot is a snapshot of a new 1 MiB volume (zero chunks, a short last chunk) in a
// memory repository, with the random source that made it.
func smallSnapshot(t *testing.T, seed int64) (*rand.Rand, *volume, *chain.SnapshotReader) {
	rng := rand.New(rand.NewSource(seed))
	r, _ := newRepo(t)
	v := newVolume(rng, 1<<20+777, 16<<10)
	return rng, v, r.SnapshotReader(v.snapshot(t, r, "s", false, nil))
}

// TestVisitFrom: the pieces VisitFrom hands out are the volume's bytes, in order, for any
// range (zero chunks, a short last chunk, ranges starting and ending inside chunks); a
// range outside the volume is an error before any piece; fn's error stops the walk as is.
func TestVisitFrom(t *testing.T) {
	ctx := context.Background()
	rng, v, sr := smallSnapshot(t, 7)
	loads := 0
	src := func(ctx context.Context, i int64, id chain.ID) ([]byte, func(), error) {
		loads++
		b, err := sr.LoadChunk(ctx, i, id, nil)
		return b, func() {}, err
	}
	size := int64(len(v.data))
	for k := 0; k < 300; k++ {
		off := rng.Int63n(size)
		n := rng.Int63n(size - off + 1)
		var got []byte
		if err := sr.VisitFrom(ctx, off, n, src, func(p []byte) error {
			if len(p) == 0 {
				t.Fatal("an empty piece")
			}
			got = append(got, p...)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, v.data[off:off+n]) {
			t.Fatalf("[%d, %d): the pieces differ from the volume", off, off+n)
		}
		// ReadAtFrom, built on it, into a buffer holding garbage: zero chunks are cleared.
		p := bytes.Repeat([]byte{0xff}, int(n))
		if k, err := sr.ReadAtFrom(ctx, p, off, src); err != nil || int64(k) != n || !bytes.Equal(p, v.data[off:off+n]) {
			t.Fatalf("ReadAtFrom [%d, %d): %d bytes, %v, or different bytes", off, off+n, k, err)
		}
	}
	if loads == 0 {
		t.Fatal("no chunk came from the source")
	}
	for _, bad := range [][2]int64{{-1, 10}, {size - 5, 6}, {0, size + 1}, {10, -1}} {
		called := false
		err := sr.VisitFrom(ctx, bad[0], bad[1], src, func([]byte) error { called = true; return nil })
		if err == nil || called {
			t.Errorf("range [%d, +%d): err %v, fn called %v; want an error first", bad[0], bad[1], err, called)
		}
	}
	stop := errors.New("stop")
	calls := 0
	if err := sr.VisitFrom(ctx, 0, size, src, func([]byte) error { calls++; return stop }); err != stop || calls != 1 {
		t.Errorf("fn's error: VisitFrom returned %v after %d calls, want it as is after 1", err, calls)
	}
}

// TestPinFrom: pinned pieces are the volume's bytes, each chunk the source gave is held
// until Release and released exactly once, also after the source fails half-way.
func TestPinFrom(t *testing.T) {
	ctx := context.Background()
	rng, v, sr := smallSnapshot(t, 8)
	held, failAt := 0, int64(-1)
	src := func(ctx context.Context, i int64, id chain.ID) ([]byte, func(), error) {
		if i == failAt {
			return nil, nil, errors.New("chunk unreadable")
		}
		b, err := sr.LoadChunk(ctx, i, id, nil)
		held++
		released := false
		return b, func() {
			if released {
				t.Fatalf("chunk %d released twice", i)
			}
			released = true
			held--
		}, err
	}
	size := int64(len(v.data))
	var p chain.Pinned
	pinned := 0
	for k := 0; k < 200; k++ {
		off := rng.Int63n(size)
		n := rng.Int63n(size - off + 1)
		if err := sr.PinFrom(ctx, off, n, src, &p); err != nil {
			t.Fatal(err)
		}
		if got := bytes.Join(p.Vecs, nil); int64(p.Len()) != n || !bytes.Equal(got, v.data[off:off+n]) {
			t.Fatalf("[%d, %d): %d pinned bytes that differ from the volume", off, off+n, p.Len())
		}
		pinned += held
		p.Release()
		if held != 0 || len(p.Vecs) != 0 {
			t.Fatalf("after Release: %d chunks still held, %d pieces left", held, len(p.Vecs))
		}
	}
	if pinned == 0 {
		t.Fatal("nothing was pinned: every range read as zeros")
	}
	if err := sr.PinFrom(ctx, size-5, 6, src, &p); err == nil || p.Len() != 0 {
		t.Fatalf("a range past the end: err %v, %d bytes pinned", err, p.Len())
	}
	for i := int64(1); i < int64(len(v.data))/(16<<10); i++ { // a source failing after some pins
		if id, _ := sr.ChunkID(ctx, i); !id.IsZero() {
			failAt = i
			break
		}
	}
	if err := sr.PinFrom(ctx, 0, size, src, &p); err == nil || !strings.Contains(err.Error(), "unreadable") {
		t.Fatalf("the source's error: %v", err)
	}
	p.Release()
	if held != 0 {
		t.Fatalf("%d chunks held after releasing a failed pin", held)
	}
}

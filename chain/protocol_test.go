package chain_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/memory"
)

// noLocker hides the memory backend's lock, as object storage has none: the deletion lock
// is then taken with lease objects.
type noLocker struct{ *memory.Backend }

func (n noLocker) Lock() {} // not a chain.Locker: different signature

// TestWriterBeforeMarkBlocksDeletion: a snapshot that started before gc marked packs keeps
// them from being deleted until it has finished, whatever it references; a gc after it
// finishes deletes them.
func TestWriterBeforeMarkBlocksDeletion(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewSource(31))
	r, _ := newRepo(t)
	v := newVolume(rng, 1<<20, 16<<10)
	old := v.snapshot(t, r, "old", false, nil)
	// A writer starts now, and will reference old's chunks (a full scan of the same data, as
	// another volume: old is not its parent, which could not be deleted while it runs).
	w, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "copy", Name: "late", Size: int64(len(v.data)), ChunkSize: v.chunkSize})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < len(v.data)/v.chunkSize; i++ {
		if err := w.Put(ctx, int64(i), v.data[i*v.chunkSize:(i+1)*v.chunkSize]); err != nil {
			t.Fatal(err)
		}
	}
	// Meanwhile the old snapshot is deleted and gc runs: its packs are marked, not deleted.
	unlock, _ := r.Lock(ctx, "t")
	if err := r.Delete(ctx, old); err != nil {
		t.Fatal(err)
	}
	unlock()
	st := gc(t, r)
	if st.PacksDeleted != 0 || len(st.Waiting) == 0 || !strings.Contains(st.Waiting[0], "snapshot of") {
		t.Fatalf("gc with a writer running from before the marks: %+v", st)
	}
	late, err := w.Commit(ctx, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Now nobody runs: gc re-reads the snapshots, sees late needs those blobs, keeps them.
	st = gc(t, r)
	if !bytes.Equal(readAll(t, r.Reader, late), v.data) {
		t.Fatalf("the writer's snapshot lost blobs to gc (%+v)", st)
	}
	if rep, err := r.Verify(ctx, true, nil); err != nil || !rep.OK() {
		t.Fatalf("verify: %v %v", err, rep.Problems)
	}
}

// TestWriterAfterMarkStoresAgain: a snapshot started after gc marked a pack does not
// reference it: it stores the chunk again, so the marked pack can go while it runs.
func TestWriterAfterMarkStoresAgain(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewSource(32))
	r, be := newRepo(t)
	v := newVolume(rng, 1<<20, 16<<10)
	old := v.snapshot(t, r, "old", false, nil)
	unlock, _ := r.Lock(ctx, "t")
	r.Delete(ctx, old)
	unlock()
	// A writer that holds gc back while it marks, so the marks cannot be carried out yet.
	blocker, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "blocker", Size: 1 << 16})
	if err != nil {
		t.Fatal(err)
	}
	st := gc(t, r)
	if st.BytesMarked == 0 || st.PacksDeleted != 0 {
		t.Fatalf("gc: %+v", st)
	}
	time.Sleep(10 * time.Millisecond) // the memory backend's clock: after the mark
	late := v.snapshot(t, r, "late", false, nil)
	if late.NewBytes == 0 {
		t.Fatal("a writer started after the marks referenced the marked packs")
	}
	blocker.Abort()
	st = gc(t, r)
	if st.PacksDeleted == 0 {
		t.Fatalf("marked packs not deleted once no writer needs them: %+v", st)
	}
	if !bytes.Equal(readAll(t, r.Reader, late), v.data) {
		t.Fatal("the late snapshot lost data")
	}
	_ = be
}

// TestOrphansOfDeadWriters: packs of a writer that died (no commit, heartbeat stale) are
// deleted; those of a writer still running are not.
func TestOrphansOfDeadWriters(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewSource(33))
	chain.SetPackTarget(t, 128<<10)
	r, be := newRepo(t)
	other := openRepo(t, be, chain.Options{Host: "other"}) // another process
	v := newVolume(rng, 4<<20, 64<<10)
	running, err := other.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "vol", Size: int64(len(v.data)), ChunkSize: v.chunkSize})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < len(v.data)/v.chunkSize; i++ {
		running.Put(ctx, int64(i), v.data[i*v.chunkSize:(i+1)*v.chunkSize])
	}
	running.WaitSaved(ctx)
	countPacks := func() int { return len(objectsOf(be, chain.PackFile)) }
	n := countPacks()
	if n == 0 {
		t.Fatal("the writer saved no pack")
	}
	gc(t, r)
	if countPacks() != n {
		t.Fatal("gc deleted the packs of a running writer")
	}
	// The writer dies: its heartbeat objects age past LeaseStale.
	for h := range be.Files() {
		if h.Type == chain.WriterFile {
			be.SetModTime(h, time.Now().Add(-2*chain.LeaseStale))
		}
	}
	for h := range be.Files() {
		if h.Type == chain.PackFile {
			be.SetModTime(h, time.Now().Add(-2*chain.LeaseStale))
		}
	}
	st := gc(t, r)
	if countPacks() != 0 || st.BytesFreed == 0 || len(objectsOf(be, chain.WriterFile)) != 0 {
		t.Fatalf("a dead writer's packs and heartbeat: %d packs, %d heartbeat objects left (%+v)", countPacks(), len(objectsOf(be, chain.WriterFile)), st)
	}
}

// TestGCRefusesDamagedIndex: with one index file unreadable, gc deletes nothing (it cannot
// know what that file's packs hold); once the file is back, every snapshot is intact.
func TestGCRefusesDamagedIndex(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewSource(34))
	r, be := newRepo(t)
	v := newVolume(rng, 1<<20, 16<<10)
	a := v.snapshot(t, r, "a", false, nil)
	want := append([]byte(nil), v.data...)
	v.scribble(rng, 20)
	b := v.snapshot(t, r, "b", false, nil)
	unlock, _ := r.Lock(ctx, "t")
	r.Delete(ctx, b)
	unlock()
	idx := objectsOf(be, chain.IndexFile)
	for _, h := range idx {
		be.Corrupt(h, 100)
	}
	fresh := openRepo(t, be, chain.Options{})
	unlock, _ = fresh.Lock(ctx, "t")
	_, err := fresh.GC(ctx, chain.GCOptions{})
	unlock()
	if err == nil || !strings.Contains(err.Error(), "gc refuses to run: index file") {
		t.Fatalf("gc with a damaged index file: %v", err)
	}
	for _, h := range idx {
		be.Corrupt(h, 100)
	}
	fresh = openRepo(t, be, chain.Options{})
	if !bytes.Equal(readAll(t, fresh.Reader, a), want) {
		t.Fatal("snapshot a lost data")
	}
	if rep, err := fresh.Verify(ctx, true, nil); err != nil || !rep.OK() {
		t.Fatalf("verify: %v %v", err, rep.Problems)
	}
}

// TestDamageHealsAndRepairs: verify records a damaged chunk; the next snapshot of a source
// that still has it stores it again instead of referencing the damaged copy, which makes
// every older snapshot with that chunk exact again; repair drops the damaged copy.
func TestDamageHealsAndRepairs(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewSource(35))
	r, be := newRepo(t)
	v := newVolume(rng, 2<<20, 16<<10)
	a := v.snapshot(t, r, "a", false, nil)
	packs := objectsOf(be, chain.PackFile)
	be.Corrupt(packs[0], 16+5) // inside the first blob of the first pack
	rep, err := r.Verify(ctx, true, nil)
	if err != nil || rep.OK() || len(rep.DamagedBlobs) == 0 || rep.Damaged[a.ID] == "" {
		t.Fatalf("verify of a damaged pack: %v %+v", err, rep)
	}
	if len(objectsOf(be, chain.DamageFile)) != 1 {
		t.Fatal("verify recorded no damage list")
	}
	// The source still has every chunk: a new snapshot heals.
	b := v.snapshot(t, r, "b", false, nil)
	if b.NewBytes == 0 {
		t.Fatal("the new snapshot referenced the damaged chunk instead of storing it")
	}
	for _, s := range []*chain.Snapshot{a, b} {
		if !bytes.Equal(readAll(t, r.Reader, s), v.data) {
			t.Fatalf("%s is not exact after healing", s.Name)
		}
	}
	unlock, _ := r.Lock(ctx, "t")
	rr, err := r.Repair(ctx)
	unlock()
	if err != nil || rr.PacksRewritten != 1 || len(rr.Unrecoverable) != 0 || rr.BlobsDropped == 0 {
		t.Fatalf("repair: %v %+v", err, rr)
	}
	gc(t, r)
	if rep, err := r.Verify(ctx, true, nil); err != nil || !rep.OK() {
		t.Fatalf("verify after heal, repair and gc: %v %v", err, rep.Problems)
	}
	if len(objectsOf(be, chain.DamageFile)) != 0 {
		t.Fatal("the damage list outlived the repair")
	}
}

// TestLeaseLock: on a backend that cannot lock, the deletion lock is a lease object: a
// second holder is refused naming the first; a stale lease (its holder died) is taken over.
func TestLeaseLock(t *testing.T) {
	ctx := context.Background()
	be := noLocker{memory.New()}
	if _, err := chain.Init(ctx, be, chain.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	r1, r2 := openRepo(t, be, chain.Options{Host: "host-a"}), openRepo(t, be, chain.Options{Host: "host-b"})
	unlock, err := r1.Lock(ctx, "pid 1 (stasis gc) on host-a")
	if err != nil {
		t.Fatal(err)
	}
	var le *chain.LockedError
	if _, err := r2.Lock(ctx, "pid 2"); !errors.As(err, &le) || !strings.Contains(le.Holder, "host-a") {
		t.Fatalf("second lock: %v", err)
	}
	unlock()
	unlock2, err := r2.Lock(ctx, "pid 2")
	if err != nil {
		t.Fatalf("lock after release: %v", err)
	}
	// Holder 2 dies: its lease goes stale.
	for h := range be.Files() {
		if h.Type == chain.LockFile {
			be.SetModTime(h, time.Now().Add(-2*chain.LeaseStale))
		}
	}
	unlock3, err := r1.Lock(ctx, "pid 3")
	if err != nil {
		t.Fatalf("a stale lease was not taken over: %v", err)
	}
	unlock3()
	_ = unlock2
}

// TestConcurrentWritersAndGC: two "hosts" keep snapshotting into one repository while a
// third deletes and collects, with no lock between them; afterwards every snapshot left
// reads back exactly and verify finds nothing wrong.
func TestConcurrentWritersAndGC(t *testing.T) {
	ctx := context.Background()
	be := noLocker{memory.New()}
	if _, err := chain.Init(ctx, be, chain.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	type kept struct {
		host string
		snap *chain.Snapshot
		data []byte
	}
	var mu sync.Mutex
	var all []kept
	var wg, writers sync.WaitGroup
	stop := make(chan struct{})
	for h := 0; h < 2; h++ {
		writers.Add(1)
		go func(h int) {
			defer writers.Done() // also when a failed snapshot ends the goroutine
			host := fmt.Sprint("host-", h)
			r := openRepo(t, be, chain.Options{Host: host})
			rng := rand.New(rand.NewSource(int64(40 + h)))
			v := newVolume(rng, 512<<10, 16<<10)
			for round := 0; round < 15; round++ {
				v.scribble(rng, 10)
				s := v.snapshot(t, r, fmt.Sprint("s", round), false, nil)
				mu.Lock()
				all = append(all, kept{host, s, append([]byte(nil), v.data...)})
				mu.Unlock()
			}
		}(h)
	}
	wg.Add(1)
	deleted := map[string]bool{}
	go func() {
		defer wg.Done()
		r := openRepo(t, be, chain.Options{Host: "janitor"})
		for {
			select {
			case <-stop:
				return
			default:
			}
			snaps, _, _ := r.Snapshots(ctx)
			unlock, err := r.Lock(ctx, "janitor")
			if err != nil {
				continue
			}
			if len(snaps) > 4 {
				// Refused (ErrInUse) when one is the parent of a snapshot being taken.
				if r.Delete(ctx, snaps[0], snaps[2]) == nil {
					mu.Lock()
					deleted[snaps[0].ID], deleted[snaps[2].ID] = true, true
					mu.Unlock()
				}
			}
			if _, err := r.GC(ctx, chain.GCOptions{}); err != nil {
				t.Errorf("gc: %v", err)
			}
			unlock()
		}
	}()
	// Stop the janitor when the writers are done.
	writers.Wait()
	close(stop)
	wg.Wait()
	if len(all) != 30 {
		t.Fatalf("%d snapshots written, want 30", len(all))
	}
	r := openRepo(t, be, chain.Options{})
	gc(t, r)
	checked := 0
	for _, k := range all {
		if deleted[k.snap.ID] {
			continue
		}
		if !bytes.Equal(readAll(t, r.Reader, k.snap), k.data) {
			t.Fatalf("%s's %s reads back different bytes", k.host, k.snap.Name)
		}
		checked++
	}
	if rep, err := r.Verify(ctx, true, nil); err != nil || !rep.OK() {
		t.Fatalf("verify: %v %v", err, rep.Problems)
	}
	t.Logf("%d snapshots written by two hosts, %d deleted meanwhile, %d checked", len(all), len(deleted), checked)
}

// TestHeartbeatKeepsItsStart: a writer's heartbeat refreshes without ever removing its
// start object (gc compares its time with deletion lists), and leaves nothing at the end.
func TestHeartbeatKeepsItsStart(t *testing.T) {
	ctx := context.Background()
	old := chain.LeaseRefresh
	chain.LeaseRefresh = 20 * time.Millisecond
	defer func() { chain.LeaseRefresh = old }()
	r, be := newRepo(t)
	v := newVolume(rand.New(rand.NewSource(1)), 256<<10, 16<<10)
	w, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "vol", Size: int64(len(v.data)), ChunkSize: v.chunkSize})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(150 * time.Millisecond) // several refreshes
	var names []string
	for _, h := range objectsOf(be, chain.WriterFile) {
		names = append(names, h.Name)
	}
	starts := 0
	for _, n := range names {
		if strings.HasSuffix(n, ".start") {
			starts++
		}
	}
	if starts != 1 || len(names) != 2 {
		t.Fatalf("heartbeat objects after refreshes: %v (want the start and the newest refresh)", names)
	}
	for i := int64(0); i < w.Snapshot().Chunks(); i++ {
		w.Put(ctx, i, v.data[i*int64(v.chunkSize):(i+1)*int64(v.chunkSize)])
	}
	if _, err := w.Commit(ctx, nil, nil); err != nil {
		t.Fatal(err)
	}
	if n := len(objectsOf(be, chain.WriterFile)); n != 0 {
		t.Fatalf("%d heartbeat objects left after the commit", n)
	}
}

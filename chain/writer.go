package chain

import (
	"context"
	"errors"
	"fmt"
	"golang.org/x/sync/errgroup"
	"slices"
	"sync"
	"time"
)

// PackSize is the size at which a pack is closed and saved. Tens of MB keep a repository of
// millions of chunks at thousands of files, and suit object storage.
const PackSize = 32 << 20

// packTarget is the size packs are closed at (PackSize; smaller in tests).
var packTarget = PackSize

// SnapshotOptions describes a snapshot to write.
type SnapshotOptions struct {
	Volume      string
	Name        string // empty: "manual_YYYYMMDD_HHMMSS" (UTC) or, for auto snapshots, required
	Kind        string // KindManual (default) or KindAuto
	Consistency string // ConsistencyCrash (default), ConsistencyFSFrozen or ConsistencyApp
	Size        int64  // volume size in bytes
	ChunkSize   int    // 0: the volume's chunk size, or DefaultChunkSize for its first snapshot
	Source      string
	Host        string // "": the repository handle's host
	Identity    *SourceIdentity
	// Group and GroupID mark a member of a consistency group snapshot.
	Group, GroupID string
	// Tags and Note describe the snapshot for people; Protected keeps it from retention
	// and deletion until unprotected.
	Tags []string
	Note string
	// FromParent starts the block map from the parent's, so that only chunks Put are
	// changed: for a tracked incremental. Otherwise the map starts empty (all zeros) and the
	// caller must Put every non-zero chunk: a full scan, where unchanged chunks and pages
	// still cost nothing because they are already stored.
	FromParent bool
	// Parent, if set, is the parent (a snapshot of the same host and volume, as the caller
	// has just listed it) instead of the newest one: the agent's tracked incrementals build
	// on the snapshot their tracker started from, copies on the copy of the source's parent.
	// NewSnapshot confirms it still exists once the writer's heartbeat names it.
	Parent *Snapshot
	Now    time.Time // creation time; zero means time.Now()
}

// WriteStats counts what a snapshot writer stored.
type WriteStats struct {
	ChunksPut     int64 // chunks handed to Put
	ZeroChunks    int64 // of those, all-zero
	ChunksStored  int64 // chunks whose content was new to the repository
	DataBytes     int64 // stored (compressed) bytes of new chunks
	TreeBytes     int64 // stored bytes of new block-map pages
	PackBytes     int64 // bytes of pack files written
	IndexBytes    int64 // bytes of the index file written
	MetadataBytes int64 // everything but chunk data: pages, pack tables, index, manifest
}

// SnapshotWriter writes one snapshot. It takes no lock: any number of writers, on any
// number of hosts, may write at once, and deletions wait for it (see gc.go). Put is safe for
// concurrent use; Commit and Abort are called exactly once, after every Put has returned.
type SnapshotWriter struct {
	r          *Repository
	snap       Snapshot
	parent     *Snapshot
	parentTree *treeReader
	heartbeat  *lease
	avoidPacks map[ID]bool // packs gc has marked for deletion: their blobs do not count
	damaged    map[ID]bool // blobs verify found damaged: they are stored again

	mu      sync.Mutex // guards everything below
	tree    *treeBuilder
	pack    *packBuilder
	session map[ID]sessionBlob
	packs   []*sessionPack
	ready   []*sessionPack // closed, not yet handed to the saver
	stats   WriteStats
	err     error // first save error; every later call fails with it
	done    bool

	saves    chan *sessionPack
	saved    sync.WaitGroup
	inflight sync.WaitGroup // packs handed to the saver and not yet saved
	savers   int            // packs saved at once
}

type sessionBlob struct {
	pack  int // index in packs; len(packs) means the pack being built
	entry packEntry
}

type sessionPack struct {
	id      ID
	data    []byte // kept until saved, so blobs can be read back meanwhile
	size    int64
	entries []packEntry
	saved   bool
}

// NewSnapshot starts a snapshot. It takes no lock.
func (r *Repository) NewSnapshot(ctx context.Context, opts SnapshotOptions) (*SnapshotWriter, error) {
	if err := ValidName("volume", opts.Volume); err != nil {
		return nil, err
	}
	now := opts.Now
	if now.IsZero() {
		now = time.Now()
	}
	now = now.UTC().Truncate(time.Millisecond)
	if opts.Kind == "" {
		opts.Kind = KindManual
	}
	if opts.Kind != KindManual && opts.Kind != KindAuto {
		return nil, fmt.Errorf("unknown snapshot kind %q", opts.Kind)
	}
	if opts.Consistency == "" {
		opts.Consistency = ConsistencyCrash
	}
	if opts.Size <= 0 {
		return nil, fmt.Errorf("volume %s: source is empty (size %d)", opts.Volume, opts.Size)
	}
	if opts.Host == "" {
		opts.Host = r.host
	}
	if err := checkHost(opts.Host); err != nil {
		return nil, fmt.Errorf("%w: snapshots name their host; set `host:` in the config", err)
	}
	for _, tag := range opts.Tags {
		if err := ValidName("tag", tag); err != nil {
			return nil, err
		}
	}
	// The parent first, so the heartbeat can name it: from the heartbeat on, the parent is
	// not deleted (Delete) and gc keeps every pack this writer might dedup against (see
	// gc.go), so the lists read below are at least as new as what gc assumes. A newest
	// snapshot deleted in between is chosen again; a parent the caller named is not.
	for attempt := 1; ; attempt++ {
		parent := opts.Parent
		if parent == nil {
			snaps, _, err := r.Snapshots(ctx)
			if err != nil {
				return nil, err
			}
			parent = Latest(snaps, opts.Host, opts.Volume)
		} else if parent.Volume != opts.Volume || (parent.Host != opts.Host && parent.Host != "") {
			return nil, fmt.Errorf("volume %s: snapshot %s/%s of %s cannot be its parent", opts.Volume, parent.Volume, parent.Name, parent.Host)
		}
		parentID := ""
		if parent != nil {
			parentID = parent.ID
		}
		hb, err := startLease(ctx, r.Reader, WriterFile, fmt.Sprintf("snapshot of %s:%s", opts.Host, opts.Volume), parentID)
		if err != nil {
			return nil, fmt.Errorf("announce the snapshot in %s: %w", r.Location(), err)
		}
		w, err := r.newWriter(ctx, opts, now, hb, parent)
		if err != nil {
			hb.release()
			if errors.Is(err, errParentGone) && opts.Parent == nil && attempt < 3 {
				continue
			}
			return nil, err
		}
		return w, nil
	}
}

// ErrParentDamaged refuses an incremental on a parent that references a blob verify found
// damaged: its unchanged chunks would be kept, damaged ones included. A full scan (every
// chunk Put) stores them again.
var ErrParentDamaged = errors.New("references chunks verify found damaged, which an incremental would keep: take a full scan, which stores them again")

// errParentGone: the parent a writer chose was deleted before its heartbeat named it.
var errParentGone = errors.New("was deleted as this snapshot started: take the snapshot again")

func (r *Repository) newWriter(ctx context.Context, opts SnapshotOptions, now time.Time, hb *lease, parent *Snapshot) (*SnapshotWriter, error) {
	// Three listings, each a round trip on object storage: at once.
	var avoid, damaged map[ID]bool
	var snaps []*Snapshot
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() (err error) { avoid, err = deletionCandidates(gctx, r.Reader); return err })
	g.Go(func() (err error) { damaged, err = damagedBlobs(gctx, r.Reader); return err })
	g.Go(func() (err error) { snaps, _, err = r.Snapshots(gctx); return err })
	if err := g.Wait(); err != nil {
		return nil, err
	}
	// The parent was chosen before the heartbeat named it: if it was deleted meanwhile,
	// Delete could not have seen the heartbeat, and its chunks may be gone.
	if parent != nil && !slices.ContainsFunc(snaps, func(s *Snapshot) bool { return s.ID == parent.ID }) {
		return nil, fmt.Errorf("volume %s: snapshot %s, the one this snapshot builds on, %w", opts.Volume, parent.Name, errParentGone)
	}
	if opts.Name == "" {
		opts.Name = uniqueName(snaps, opts.Host, opts.Volume, "manual_"+now.Format("20060102_150405"))
	}
	if err := ValidName("snapshot", opts.Name); err != nil {
		return nil, err
	}
	for _, s := range snaps {
		if s.Volume == opts.Volume && s.Name == opts.Name && (s.Host == opts.Host || s.Host == "") {
			return nil, fmt.Errorf("volume %s already has a snapshot named %q (id %s): choose another name or delete it first", opts.Volume, opts.Name, s.ID)
		}
	}
	chunkSize := opts.ChunkSize
	if parent != nil {
		if chunkSize != 0 && chunkSize != parent.ChunkSize {
			return nil, fmt.Errorf("volume %s uses %d-byte chunks (fixed by its first snapshot); cannot use %d", opts.Volume, parent.ChunkSize, chunkSize)
		}
		chunkSize = parent.ChunkSize
	}
	if chunkSize == 0 {
		chunkSize = DefaultChunkSize
	}
	if chunkSize < MinChunkSize || chunkSize > MaxChunkSize || chunkSize&(chunkSize-1) != 0 {
		return nil, fmt.Errorf("chunk size %d: must be a power of two from %d to %d", chunkSize, MinChunkSize, MaxChunkSize)
	}
	w := &SnapshotWriter{
		r: r, parent: parent, heartbeat: hb, avoidPacks: avoid, damaged: damaged,
		snap: Snapshot{Format: manifestVersion, Volume: opts.Volume, Name: opts.Name, Kind: opts.Kind,
			Consistency: opts.Consistency, Created: now, SizeBytes: opts.Size, ChunkSize: chunkSize,
			Fanout: Fanout, Source: opts.Source, Host: opts.Host, Identity: opts.Identity, Group: opts.Group, GroupID: opts.GroupID,
			Tags: opts.Tags, Note: opts.Note},
		session: map[ID]sessionBlob{},
		saves:   make(chan *sessionPack, 1),
	}
	base := ZeroID
	if parent != nil {
		w.snap.Parent = parent.ID
		if parent.SizeBytes == opts.Size && parent.ChunkSize == chunkSize {
			w.parentTree = newTreeReader(r.Reader, parent.Root, parent.Chunks())
		}
		if opts.FromParent {
			if parent.SizeBytes != opts.Size {
				return nil, fmt.Errorf("volume %s changed size (%d → %d bytes): take a full scan", opts.Volume, parent.SizeBytes, opts.Size)
			}
			// Unchanged chunks would be the parent's, damaged ones included.
			if bad, err := r.referencesAny(ctx, parent, damaged); err != nil || bad {
				if err == nil {
					err = fmt.Errorf("%s/%s in %s: %w", parent.Volume, parent.Name, r.Location(), ErrParentDamaged)
				}
				return nil, fmt.Errorf("volume %s: %w", opts.Volume, err)
			}
			base = parent.Root
		}
	} else if opts.FromParent {
		return nil, fmt.Errorf("volume %s has no snapshot to build an incremental on: take a full scan", opts.Volume)
	}
	w.tree = newTreeBuilder(w, w.snap.Chunks(), base)
	w.pack = newPackBuilder()
	savers := 1
	if ps, ok := r.be.(ParallelSaver); ok {
		savers = max(1, ps.SaveConcurrency())
	}
	w.savers = savers
	w.saved.Add(savers)
	for range savers {
		go w.saver(ctx)
	}
	return w, nil
}

// uniqueName returns base, or base_2, base_3... if taken in host's volume.
func uniqueName(snaps []*Snapshot, host, volume, base string) string {
	name := base
	for n := 2; ; n++ {
		taken := false
		for _, s := range snaps {
			if s.Volume == volume && s.Name == name && (s.Host == host || s.Host == "") {
				taken = true
			}
		}
		if !taken {
			return name
		}
		name = fmt.Sprintf("%s_%d", base, n)
	}
}

// Snapshot returns the manifest being written (complete after Commit).
func (w *SnapshotWriter) Snapshot() *Snapshot { return &w.snap }

// Parent returns the snapshot this one follows in the chain, or nil.
func (w *SnapshotWriter) Parent() *Snapshot { return w.parent }

// ChunkSize is the chunk size Put expects.
func (w *SnapshotWriter) ChunkSize() int { return w.snap.ChunkSize }

// Stats returns what has been stored so far.
func (w *SnapshotWriter) Stats() WriteStats {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.stats
}

// Put records the content of chunk i. data must be the chunk's full length (ChunkSize, or
// less for the volume's last chunk); it is not retained. Putting a chunk again replaces it.
func (w *SnapshotWriter) Put(ctx context.Context, i int64, data []byte) error {
	want := int64(w.snap.ChunkSize)
	if i == w.snap.Chunks()-1 {
		want = w.snap.SizeBytes - i*want
	}
	if int64(len(data)) != want {
		return fmt.Errorf("chunk %d: got %d bytes, want %d", i, len(data), want)
	}
	id := ZeroID
	var stored []byte
	var comp compression
	zero := AllZero(data)
	if !zero {
		id = w.r.blobID(data)
		known, err := w.known(ctx, i, id)
		if err != nil {
			return err
		}
		if !known {
			buf := scratch(storedBound(len(data)))
			defer compressBuffers.Put(buf)
			stored, comp = w.r.encodeBlob(id, data, *buf)
		}
	}
	w.mu.Lock()
	err := w.put(ctx, i, id, zero, stored, comp, len(data))
	ready := w.ready
	w.ready = nil
	w.mu.Unlock()
	if err != nil {
		return err
	}
	return w.send(ctx, ready)
}

// PutKnown records chunk i as blob id, as Put would for content with that ID, if the
// repository already holds a usable copy; it reports false (recording nothing) if not, and
// the caller must Put the content. Copies between repositories with the same blob IDs use
// it to skip reading chunks the destination has.
func (w *SnapshotWriter) PutKnown(ctx context.Context, i int64, id ID) (bool, error) {
	if i < 0 || i >= w.snap.Chunks() || id.IsZero() {
		return false, fmt.Errorf("chunk %d: outside the volume, or a zero ID", i)
	}
	known, err := w.known(ctx, i, id)
	if err != nil || !known {
		return false, err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return true, w.put(ctx, i, id, false, nil, 0, 0)
}

func (w *SnapshotWriter) put(ctx context.Context, i int64, id ID, zero bool, stored []byte, comp compression, rawLen int) error {
	if err := w.usable(); err != nil {
		return err
	}
	w.stats.ChunksPut++
	if zero {
		w.stats.ZeroChunks++
	} else if stored != nil {
		if _, dup := w.session[id]; !dup {
			w.addBlob(DataBlob, id, stored, comp, rawLen)
			w.stats.ChunksStored++
			w.stats.DataBytes += int64(len(stored))
		}
	}
	return w.tree.set(ctx, i, id)
}

// known reports whether blob id is already stored where this snapshot may reference it:
// written in this session, or the same chunk of the parent (which is live), or indexed in a
// pack gc has not marked for deletion — and not found damaged by verify.
func (w *SnapshotWriter) known(ctx context.Context, i int64, id ID) (bool, error) {
	if w.damaged[id] {
		w.mu.Lock()
		_, ok := w.session[id]
		w.mu.Unlock()
		return ok, nil
	}
	w.mu.Lock()
	_, ok := w.session[id]
	w.mu.Unlock()
	if ok {
		return true, nil
	}
	if w.parentTree != nil && i < w.parentTree.chunks {
		if pid, err := w.parentTree.lookup(ctx, i); err == nil && pid == id {
			return true, nil
		}
	}
	return w.indexed(ctx, id)
}

// indexed reports whether an index names a copy of id in a pack not marked for deletion.
func (w *SnapshotWriter) indexed(ctx context.Context, id ID) (bool, error) {
	locs, err := w.r.index.locations(ctx, id)
	if err != nil {
		return false, err
	}
	for _, l := range locs {
		if !w.avoidPacks[l.pack] {
			return true, nil
		}
	}
	return false, nil
}

// send hands closed packs to the saver, blocking while it is busy: that bounds memory to
// about three packs. w.mu must not be held.
func (w *SnapshotWriter) send(ctx context.Context, ready []*sessionPack) error {
	for _, p := range ready {
		w.inflight.Add(1)
		select {
		case w.saves <- p:
		case <-ctx.Done():
			w.inflight.Done()
			return ctx.Err()
		}
	}
	return nil
}

// WaitSaved returns once every pack closed so far is saved: after it, and until the next
// Put, the writer does no I/O (its heartbeat writes only to the repository's own
// writers/ objects, never on a frozen filesystem if the repository is not on one... and if
// it is, a heartbeat write blocks only the heartbeat). Capture calls it before freezing
// filesystems, one of which may hold the repository.
//
// To a backend that saves several packs at once (object storage), it first closes the
// pack being built: its upload then runs alongside the uploads already in flight instead
// of alone after the final round, and Commit uploads only what the final round read and
// the block map. On a local disk that only moves the pack's flush before the freeze and
// adds a flush at Commit (measured slower there): not done.
func (w *SnapshotWriter) WaitSaved(ctx context.Context) error {
	w.mu.Lock()
	if err := w.usable(); err != nil {
		w.mu.Unlock()
		return err
	}
	if w.savers >= 2 {
		w.closePack()
	}
	ready := w.ready
	w.ready = nil
	w.mu.Unlock()
	if err := w.send(ctx, ready); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() { w.inflight.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		return ctx.Err()
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

func (w *SnapshotWriter) usable() error {
	if w.done {
		return errors.New("snapshot writer already finished")
	}
	return w.err
}

// addBlob appends a blob to the current pack, closing the pack when full; w.mu held.
func (w *SnapshotWriter) addBlob(t BlobType, id ID, stored []byte, comp compression, rawLen int) {
	e := w.pack.add(t, id, stored, comp, rawLen)
	w.session[id] = sessionBlob{pack: len(w.packs), entry: e}
	if w.pack.size() >= w.packLimit() {
		w.closePack()
	}
}

// packLimit is the size at which the pack being built is closed. With a backend that saves
// several packs at once (object storage), a writer's first packs are smaller (4, 8, 16 MiB,
// then packTarget): an incremental of a few tens of MiB then uploads most of its data while
// it is still reading, instead of all of it after the capture; a large snapshot makes only
// a few more packs.
func (w *SnapshotWriter) packLimit() int {
	if w.savers < 2 {
		return packTarget
	}
	return min(packTarget, rampPack<<min(len(w.packs), 8))
}

// rampPack is the size of the first pack of a writer to a parallel-saving backend.
const rampPack = 4 << 20

// closePack queues the current pack for the saver; w.mu held.
func (w *SnapshotWriter) closePack() {
	if len(w.pack.entries) == 0 {
		return
	}
	data, id := w.pack.finish(w.r.keys)
	p := &sessionPack{id: id, data: data, size: int64(len(data)), entries: w.pack.entries}
	w.packs = append(w.packs, p)
	w.ready = append(w.ready, p)
	w.stats.PackBytes += p.size
	w.pack = newPackBuilder()
}

// saver writes closed packs in the background so hashing and compressing go on meanwhile.
func (w *SnapshotWriter) saver(ctx context.Context) {
	defer w.saved.Done()
	for p := range w.saves {
		err := w.r.be.Save(ctx, Handle{Type: PackFile, Name: p.id.String()}, p.data)
		w.mu.Lock()
		if err != nil && w.err == nil {
			w.err = fmt.Errorf("save pack: %w", err)
		}
		p.saved = err == nil
		if p.saved {
			packBuffers.put(p.data)
			p.data = nil
		}
		w.mu.Unlock()
		w.inflight.Done()
	}
}

// loadPage implements pageStore, reading pages written earlier in this session too.
func (w *SnapshotWriter) loadPage(ctx context.Context, id ID, level int) ([]ID, error) {
	// Called with w.mu held (from tree.set/commit).
	sb, ok := w.session[id]
	if !ok {
		p, err := w.r.loadPage(ctx, id, level)
		if err != nil {
			return nil, err
		}
		return append([]ID(nil), p...), nil // the builder edits pages in place
	}
	var stored []byte
	switch {
	case sb.pack == len(w.packs):
		stored = w.pack.buf[sb.entry.Offset : sb.entry.Offset+sb.entry.Length]
	case w.packs[sb.pack].data != nil:
		stored = w.packs[sb.pack].data[sb.entry.Offset : sb.entry.Offset+sb.entry.Length]
	default:
		p := w.packs[sb.pack]
		b, err := w.r.readBlob(ctx, blobLoc{pack: p.id, packSize: p.size, e: sb.entry}, nil)
		if err != nil {
			return nil, err
		}
		return decodePage(b, level)
	}
	raw, err := w.r.decodeBlob(stored, sb.entry, nil)
	if err != nil {
		return nil, err
	}
	return decodePage(append([]byte(nil), raw...), level)
}

// storePage implements pageStore; w.mu held.
func (w *SnapshotWriter) storePage(ctx context.Context, level int, entries []ID) (ID, error) {
	empty := true
	for _, e := range entries {
		if !e.IsZero() {
			empty = false
			break
		}
	}
	if empty {
		return ZeroID, nil
	}
	raw := encodePage(level, entries)
	id := w.r.blobID(raw)
	if _, ok := w.session[id]; ok {
		return id, nil
	}
	if !w.damaged[id] {
		known, err := w.indexed(ctx, id)
		if err != nil {
			return ZeroID, err
		}
		if known {
			return id, nil
		}
	}
	stored, comp := w.r.encodeBlob(id, raw, make([]byte, 0, len(raw)+sealOverhead+64))
	w.stats.TreeBytes += int64(len(stored))
	w.addBlob(TreeBlob, id, stored, comp, len(raw))
	// The next snapshot of the volume starts from this map: keep the page decoded, so an
	// agent's incrementals do not fetch their parent's pages again (a round trip each on
	// object storage). A page's content never changes for its ID.
	w.r.pages.Add(id, append([]ID(nil), entries...))
	return id, nil
}

// Commit makes the snapshot durable and visible: packs, then the index file naming them,
// then the manifest. capture and app are recorded in the manifest as they are.
func (w *SnapshotWriter) Commit(ctx context.Context, capture, app map[string]any) (*Snapshot, error) {
	w.mu.Lock()
	if err := w.usable(); err != nil {
		w.mu.Unlock()
		w.Abort()
		return nil, err
	}
	root, err := w.tree.commit(ctx)
	w.closePack()
	ready := w.ready
	w.ready = nil
	w.done = true
	w.mu.Unlock()
	if err == nil {
		err = w.send(ctx, ready)
	}
	close(w.saves)
	w.saved.Wait()
	defer w.heartbeat.release()
	if err == nil {
		err = w.err
	}
	if err == nil {
		err = ctx.Err()
	}
	if err == nil {
		// Past this point the snapshot references blobs gc might otherwise collect: only a
		// writer known to be alive may go on.
		err = w.heartbeat.fresh()
	}
	if err != nil {
		w.removeSaved() // unindexed, and its own: the repository is left as it was
		return nil, err
	}
	var index []indexedPack
	for _, p := range w.packs {
		index = append(index, indexedPack{ID: p.id, Size: p.size, Entries: p.entries})
	}
	if len(index) > 0 {
		plain := encodeIndex(index)
		stored := plain
		if w.r.keys != nil {
			stored = w.r.keys.seal(nil, plain, indexAAD)
		}
		name := Hash(stored).String()
		if err := w.r.be.Save(ctx, Handle{Type: IndexFile, Name: name}, stored); err != nil {
			return nil, fmt.Errorf("save index: %w", err)
		}
		w.stats.IndexBytes = int64(len(stored))
		if err := w.r.index.add(name, plain); err != nil {
			w.r.log.Warn("could not cache the new index file; it is read again when needed", "err", err)
		}
	}
	w.snap.Root = root
	w.snap.NewBytes = w.stats.PackBytes + w.stats.IndexBytes
	w.snap.Capture, w.snap.App = capture, app
	b, name, err := w.r.encodeManifest(&w.snap)
	if err != nil {
		return nil, err
	}
	w.stats.MetadataBytes = w.stats.PackBytes - w.stats.DataBytes + w.stats.IndexBytes + int64(len(b))
	if err := w.r.be.Save(ctx, Handle{Type: SnapshotFile, Name: name}, b); err != nil {
		// The index file stays: it names complete packs, and gc reclaims them.
		return nil, fmt.Errorf("save snapshot manifest: %w", err)
	}
	w.snap.ID = name
	return &w.snap, nil
}

// Abort discards the snapshot. Packs it saved stay, unindexed, until gc removes them (a
// pack with the same content may be another writer's). Safe to call after a failed Commit.
func (w *SnapshotWriter) Abort() {
	w.mu.Lock()
	if w.done {
		w.mu.Unlock()
		return
	}
	w.done = true
	w.mu.Unlock()
	close(w.saves)
	w.saved.Wait()
	w.removeSaved()
	w.heartbeat.release()
}

// removeSaved removes the packs this writer saved, once the saver has stopped. They are
// its own (pack names are unique: see packBuilder) and unindexed: a snapshot that is not
// committed leaves the repository as it was, rather than garbage for gc.
func (w *SnapshotWriter) removeSaved() {
	ctx := context.Background()
	for _, p := range w.packs {
		if p.saved {
			if err := w.r.be.Remove(ctx, Handle{Type: PackFile, Name: p.id.String()}); err != nil && !errors.Is(err, ErrNotExist) {
				w.r.log.Warn("could not remove a pack of the uncommitted snapshot; gc removes it", "pack", p.id.Short(), "err", err)
			}
		}
	}
}

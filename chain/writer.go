package chain

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"
)

// PackSize is the size at which a pack is closed and saved. Tens of MB keep a repository of
// millions of chunks at thousands of files, and suit object storage later.
const PackSize = 32 << 20

// SnapshotOptions describes a snapshot to write.
type SnapshotOptions struct {
	Volume      string
	Name        string // empty: "manual_YYYYMMDD_HHMMSS" (UTC) or, for auto snapshots, required
	Kind        string // KindManual (default) or KindAuto
	Consistency string // ConsistencyCrash (default), ConsistencyFSFrozen or ConsistencyApp
	Size        int64  // volume size in bytes
	ChunkSize   int    // 0: the volume's chunk size, or DefaultChunkSize for its first snapshot
	Source      string
	Host        string
	Identity    *SourceIdentity
	// Group and GroupID mark a member of a consistency group snapshot.
	Group, GroupID string
	// FromParent starts the block map from the parent's, so that only chunks Put are
	// changed: for a tracked incremental. Otherwise the map starts empty (all zeros) and the
	// caller must Put every non-zero chunk: a full scan, where unchanged chunks and pages
	// still cost nothing because they are already stored.
	FromParent bool
	Now        time.Time // creation time; zero means time.Now()
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

// SnapshotWriter writes one snapshot. Put is safe for concurrent use; Commit and Abort are
// called exactly once, after every Put has returned.
type SnapshotWriter struct {
	r      *Repository
	snap   Snapshot
	parent *Snapshot

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

// NewSnapshot starts a snapshot. The writer lock must be held until Commit or Abort returns.
func (r *Repository) NewSnapshot(ctx context.Context, opts SnapshotOptions) (*SnapshotWriter, error) {
	if err := r.checkLocked(); err != nil {
		return nil, err
	}
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
	snaps, _, err := r.Snapshots(ctx)
	if err != nil {
		return nil, err
	}
	if opts.Name == "" {
		opts.Name = uniqueName(snaps, opts.Volume, "manual_"+now.Format("20060102_150405"))
	}
	if err := ValidName("snapshot", opts.Name); err != nil {
		return nil, err
	}
	if s, _ := Find(snaps, opts.Volume+"/"+opts.Name); s != nil {
		return nil, fmt.Errorf("volume %s already has a snapshot named %q (id %s): choose another name or delete it first", opts.Volume, opts.Name, s.ID)
	}
	parent := Latest(snaps, opts.Volume)
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
		r: r, parent: parent,
		snap: Snapshot{Format: manifestVersion, Volume: opts.Volume, Name: opts.Name, Kind: opts.Kind,
			Consistency: opts.Consistency, Created: now, SizeBytes: opts.Size, ChunkSize: chunkSize,
			Fanout: Fanout, Source: opts.Source, Host: opts.Host, Identity: opts.Identity, Group: opts.Group, GroupID: opts.GroupID},
		session: map[ID]sessionBlob{},
		saves:   make(chan *sessionPack, 1),
	}
	base := ZeroID
	if parent != nil {
		w.snap.Parent = parent.ID
		if opts.FromParent {
			if parent.SizeBytes != opts.Size {
				return nil, fmt.Errorf("volume %s changed size (%d → %d bytes): take a full scan", opts.Volume, parent.SizeBytes, opts.Size)
			}
			base = parent.Root
		}
	} else if opts.FromParent {
		return nil, fmt.Errorf("volume %s has no snapshot to build an incremental on: take a full scan", opts.Volume)
	}
	w.tree = newTreeBuilder(w, w.snap.Chunks(), base)
	w.pack = newPackBuilder()
	w.saved.Add(1)
	go w.saver(ctx)
	return w, nil
}

// uniqueName returns base, or base_2, base_3... if taken in volume.
func uniqueName(snaps []*Snapshot, volume, base string) string {
	name := base
	for n := 2; ; n++ {
		if s, _ := Find(snaps, volume+"/"+name); s == nil {
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
	var zstd bool
	zero := AllZero(data)
	if !zero {
		id = Hash(data)
		if !w.known(id) {
			buf := compressBuffers.Get().(*[]byte)
			defer compressBuffers.Put(buf)
			stored, zstd = compressBlob(data, *buf)
		}
	}
	w.mu.Lock()
	err := w.put(ctx, i, id, zero, stored, zstd, len(data))
	ready := w.ready
	w.ready = nil
	w.mu.Unlock()
	if err != nil {
		return err
	}
	return w.send(ctx, ready)
}

func (w *SnapshotWriter) put(ctx context.Context, i int64, id ID, zero bool, stored []byte, zstd bool, rawLen int) error {
	if err := w.usable(); err != nil {
		return err
	}
	w.stats.ChunksPut++
	if zero {
		w.stats.ZeroChunks++
	} else if stored != nil && !w.knownLocked(id) {
		w.addBlob(DataBlob, id, stored, zstd, rawLen)
		w.stats.ChunksStored++
		w.stats.DataBytes += int64(len(stored))
	}
	return w.tree.set(ctx, i, id)
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
// Put, the writer does no I/O. Capture calls it before freezing filesystems, one of which
// may hold the repository.
func (w *SnapshotWriter) WaitSaved(ctx context.Context) error {
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

func (w *SnapshotWriter) known(id ID) bool {
	if w.r.index().has(id) {
		return true
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	_, ok := w.session[id]
	return ok
}

func (w *SnapshotWriter) knownLocked(id ID) bool {
	if _, ok := w.session[id]; ok {
		return true
	}
	return w.r.index().has(id)
}

// addBlob appends a blob to the current pack, closing the pack when full; w.mu held.
func (w *SnapshotWriter) addBlob(t BlobType, id ID, stored []byte, zstd bool, rawLen int) {
	e := w.pack.add(t, id, stored, zstd, rawLen)
	w.session[id] = sessionBlob{pack: len(w.packs), entry: e}
	if w.pack.size() >= PackSize {
		w.closePack()
	}
}

// closePack queues the current pack for the saver; w.mu held.
func (w *SnapshotWriter) closePack() {
	if len(w.pack.entries) == 0 {
		return
	}
	data, id := w.pack.finish()
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
			releasePackBuffer(p.data)
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
		b, err := w.r.readBlob(ctx, w.packs[sb.pack].id, sb.entry, nil)
		if err != nil {
			return nil, err
		}
		return decodePage(b, level)
	}
	raw, err := decompressBlob(stored, sb.entry.Zstd, int(sb.entry.RawLen), nil)
	if err != nil {
		return nil, err
	}
	return decodePage(raw, level)
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
	id := Hash(raw)
	if w.knownLocked(id) {
		return id, nil
	}
	stored, zstd := compressBlob(raw, nil)
	w.stats.TreeBytes += int64(len(stored))
	w.addBlob(TreeBlob, id, stored, zstd, len(raw))
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
	if err == nil {
		err = w.err
	}
	if err == nil {
		err = ctx.Err()
	}
	if err != nil {
		w.cleanup()
		return nil, err
	}
	var index []indexedPack
	for _, p := range w.packs {
		index = append(index, indexedPack{ID: p.id, Size: p.size, Entries: p.entries})
	}
	var indexID ID
	if len(index) > 0 {
		b := encodeIndex(index)
		indexID = Hash(b)
		if err := w.r.be.Save(ctx, Handle{Type: IndexFile, Name: indexID.String()}, b); err != nil {
			w.cleanup()
			return nil, fmt.Errorf("save index: %w", err)
		}
		w.stats.IndexBytes = int64(len(b))
	}
	w.snap.Root = root
	w.snap.NewBytes = w.stats.PackBytes + w.stats.IndexBytes
	w.snap.Capture, w.snap.App = capture, app
	b, id, err := encodeManifest(&w.snap)
	if err != nil {
		return nil, err
	}
	w.stats.MetadataBytes = w.stats.PackBytes - w.stats.DataBytes + w.stats.IndexBytes + int64(len(b))
	if err := w.r.be.Save(ctx, Handle{Type: SnapshotFile, Name: id}, b); err != nil {
		// The index file stays: it names complete packs, and gc reclaims them.
		return nil, fmt.Errorf("save snapshot manifest: %w", err)
	}
	w.snap.ID = id
	idx := w.r.index()
	for _, p := range index {
		idx.add(p)
	}
	if len(index) > 0 {
		w.r.mu.Lock()
		w.r.indexFiles = append(w.r.indexFiles, indexID)
		w.r.mu.Unlock()
	}
	return &w.snap, nil
}

// Abort discards the snapshot, removing the packs it saved. Safe to call after a failed Commit.
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
	w.cleanup()
}

// cleanup removes packs this session saved, so a failed snapshot leaves the repository as it
// was. Best effort: whatever stays is unreferenced and gc removes it.
func (w *SnapshotWriter) cleanup() {
	ctx := context.Background()
	for _, p := range w.packs {
		if p.saved && !w.r.index().hasPack(p.id) {
			if err := w.r.be.Remove(ctx, Handle{Type: PackFile, Name: p.id.String()}); err != nil && !errors.Is(err, ErrNotExist) && !errors.Is(err, os.ErrNotExist) {
				w.r.log.Warn("could not remove pack of an aborted snapshot; gc will", "pack", p.id.Short(), "err", err)
			}
		}
	}
}

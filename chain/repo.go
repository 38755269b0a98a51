// Package chain stores snapshots of block devices as incremental chains in a repository.
//
// A repository holds content-addressed blobs (volume chunks and block-map pages) packed into
// pack files, index files that say where each blob is, and one manifest per snapshot. Every
// snapshot has a complete block map, so deleting any snapshot never changes another; blobs
// nobody references any more are reclaimed by GC. See docs/FORMAT.md.
package chain

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
)

// RepoConfig is the repository's config file.
type RepoConfig struct {
	Format  string    `json:"format"`
	Version int       `json:"version"`
	ID      string    `json:"id"`
	Created time.Time `json:"created"`
}

const (
	repoFormat  = "stasis-repository"
	repoVersion = 1
)

// Sentinel errors, tested with errors.Is.
var (
	ErrNotRepository = errors.New("not a stasis repository")
	ErrVersion       = errors.New("unsupported repository format version")
	ErrExists        = errors.New("repository already exists")
	ErrNotFound      = errors.New("snapshot not found")
	ErrNotLocked     = errors.New("repository writer lock not held")
)

// Repository is an open repository. Reading methods are safe for concurrent use; writing
// methods require the writer lock (Lock) and must not run concurrently with each other.
type Repository struct {
	be  Backend
	log *slog.Logger
	cfg RepoConfig

	idx        *blobIndex
	reader     *readerIndex // set instead of idx by OpenReader
	indexFiles []ID
	indexErrs  []error              // index files that could not be read, for verify
	seen       map[string]bool      // every index file name at the last (re)load
	manifests  map[string]*Snapshot // decoded manifests by file name, from the last listing

	pages *lru.Cache[ID, []ID] // decoded tree pages, shared by every reader

	mu     sync.Mutex
	locked bool
}

// Init creates a new repository in be.
func Init(ctx context.Context, be Backend) error {
	if _, err := be.Stat(ctx, Handle{Type: ConfigFile}); err == nil {
		return fmt.Errorf("%s: %w", be.Location(), ErrExists)
	}
	cfg := RepoConfig{Format: repoFormat, Version: repoVersion, ID: Hash([]byte(time.Now().String() + be.Location())).String()[:32], Created: time.Now().UTC()}
	b, _ := json.MarshalIndent(cfg, "", "  ")
	return be.Save(ctx, Handle{Type: ConfigFile}, append(b, '\n'))
}

// Open reads the repository's config and index. log may be nil.
func Open(ctx context.Context, be Backend, log *slog.Logger) (*Repository, error) {
	r, err := openConfig(ctx, be, log)
	if err != nil {
		return nil, err
	}
	if err := r.loadIndex(ctx); err != nil {
		return nil, err
	}
	return r, nil
}

// OpenReader opens a repository for reading snapshots only, with memory that does not
// grow with the repository: blobs are found by binary search in the index files rather
// than in an in-memory index. Lock, stats and verify need Open.
func OpenReader(ctx context.Context, be Backend, log *slog.Logger) (*Repository, error) {
	r, err := openConfig(ctx, be, log)
	if err != nil {
		return nil, err
	}
	found, _ := lru.New[ID, foundBlob](readerCacheSize)
	r.reader = &readerIndex{files: map[ID]*diskIndex{}, mem: newBlobIndex(), found: found}
	if err := r.refreshReader(ctx); err != nil {
		return nil, err
	}
	return r, nil
}

// ErrReaderOnly refuses writing, stats and verify on a repository opened with OpenReader.
var ErrReaderOnly = errors.New("repository opened for reading snapshots only")

// refreshReader opens index files that appeared since the last call and forgets removed
// ones (a gc replaces them).
func (r *Repository) refreshReader(ctx context.Context) error {
	sizes := map[string]int64{}
	if err := r.be.List(ctx, IndexFile, func(name string, size int64) error {
		sizes[name] = size
		return nil
	}); err != nil {
		return fmt.Errorf("list index files: %w", err)
	}
	r.mu.Lock()
	old := r.reader
	r.mu.Unlock()
	next := &readerIndex{files: map[ID]*diskIndex{}, mem: old.mem, found: old.found}
	rebuildMem := false
	for id := range old.files {
		if _, ok := sizes[id.String()]; !ok && old.files[id] == nil {
			rebuildMem = true // a version 1 file went away: its blobs must go too
		}
	}
	if rebuildMem {
		next.mem = newBlobIndex()
	}
	var errs []error
	for name, size := range sizes {
		id, err := ParseID(name)
		if err != nil {
			errs = append(errs, corruptf("index file %q: bad name", name))
			continue
		}
		if d, ok := old.files[id]; ok && (d != nil || !rebuildMem) {
			next.files[id] = d
			continue
		}
		h := Handle{Type: IndexFile, Name: name}
		read := func(ctx context.Context, p []byte, off int64) (int, error) { return r.be.ReadAt(ctx, h, p, off) }
		head := make([]byte, 8)
		if err := readFullAt(ctx, read, head, 0); err != nil {
			if errors.Is(err, ErrNotExist) {
				continue // removed by a concurrent gc after it wrote its replacement
			}
			errs = append(errs, fmt.Errorf("index file %s: %w", id.Short(), err))
			continue
		}
		if string(head) == indexMagicV1 {
			b, err := r.be.ReadAll(ctx, h)
			if err == nil && Hash(b) != id {
				err = corruptf("content does not match its name")
			}
			var packs []indexedPack
			if err == nil {
				packs, err = decodeIndex(b)
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("index file %s: %w", id.Short(), err))
				continue
			}
			for _, p := range packs {
				next.mem.add(p)
			}
			next.files[id] = nil
			continue
		}
		d, err := openDiskIndex(ctx, id, size, read)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		next.files[id] = d
	}
	for _, err := range errs {
		r.log.Warn("damaged index file skipped; run `stasis verify`", "err", err)
	}
	next.found.Purge() // a gc may have moved blobs
	seen := map[string]bool{}
	for name := range sizes {
		seen[name] = true
	}
	r.mu.Lock()
	r.reader, r.seen = next, seen
	r.mu.Unlock()
	return nil
}

// locate finds a blob's entry and pack.
func (r *Repository) locate(ctx context.Context, id ID) (packEntry, ID, bool, error) {
	r.mu.Lock()
	reader, idx := r.reader, r.idx
	r.mu.Unlock()
	if reader != nil {
		return reader.lookup(ctx, id)
	}
	loc, pack, ok := idx.lookup(id)
	return packEntry{ID: id, Type: loc.typ, Zstd: loc.zstd, Offset: loc.offset, Length: loc.length, RawLen: loc.rawLen}, pack, ok, nil
}

// reload re-reads the index in whichever form this repository keeps it.
func (r *Repository) reload(ctx context.Context) error {
	if r.reader != nil {
		return r.refreshReader(ctx)
	}
	return r.loadIndex(ctx)
}

// openConfig reads and checks the repository's config.
func openConfig(ctx context.Context, be Backend, log *slog.Logger) (*Repository, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	b, err := be.ReadAll(ctx, Handle{Type: ConfigFile})
	if errors.Is(err, ErrNotExist) {
		return nil, fmt.Errorf("%s has no config file: %w; create one with `stasis init -r %s`", be.Location(), ErrNotRepository, be.Location())
	}
	if err != nil {
		return nil, fmt.Errorf("read repository config: %w", err)
	}
	var cfg RepoConfig
	if err := json.Unmarshal(b, &cfg); err != nil || cfg.Format != repoFormat {
		return nil, fmt.Errorf("%s: config file is not a stasis repository config: %w", be.Location(), ErrNotRepository)
	}
	if cfg.Version != repoVersion {
		return nil, fmt.Errorf("%s: format version %d, this stasis reads version %d: %w; use a stasis release that supports it", be.Location(), cfg.Version, repoVersion, ErrVersion)
	}
	pages, _ := lru.New[ID, []ID](1024)
	return &Repository{be: be, log: log, cfg: cfg, pages: pages}, nil
}

// Config returns the repository's config.
func (r *Repository) Config() RepoConfig { return r.cfg }

// Backend returns the backend the repository is stored in.
func (r *Repository) Backend() Backend { return r.be }

// Location names the repository for messages.
func (r *Repository) Location() string { return r.be.Location() }

func (r *Repository) loadIndex(ctx context.Context) error {
	idx := newBlobIndex()
	var files []ID
	var errs []error
	var names []string
	if err := r.be.List(ctx, IndexFile, func(name string, _ int64) error {
		names = append(names, name)
		return nil
	}); err != nil {
		return fmt.Errorf("list index files: %w", err)
	}
	sort.Strings(names)
	for _, name := range names {
		id, err := ParseID(name)
		if err != nil {
			errs = append(errs, corruptf("index file %q: bad name", name))
			continue
		}
		b, err := r.be.ReadAll(ctx, Handle{Type: IndexFile, Name: name})
		if errors.Is(err, ErrNotExist) {
			continue // removed by a concurrent gc after it wrote its replacement
		}
		if err != nil {
			return fmt.Errorf("read index file %s: %w", id.Short(), err)
		}
		if Hash(b) != id {
			errs = append(errs, corruptf("index file %s: content does not match its name", id.Short()))
			continue
		}
		packs, err := decodeIndex(b)
		if err != nil {
			errs = append(errs, fmt.Errorf("index file %s: %w", id.Short(), err))
			continue
		}
		for _, p := range packs {
			idx.add(p)
		}
		files = append(files, id)
	}
	for _, err := range errs {
		r.log.Warn("damaged index file skipped; run `stasis verify`", "err", err)
	}
	seen := map[string]bool{}
	for _, name := range names {
		seen[name] = true
	}
	r.mu.Lock()
	r.idx, r.indexFiles, r.indexErrs, r.seen = idx, files, errs, seen
	r.mu.Unlock()
	return nil
}

func (r *Repository) index() *blobIndex {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.idx
}

// Lock takes the writer lock. holder describes this process for a refused caller, for
// example "pid 123 (stasis snapshot data) since 2026-11-23T10:00:00Z". The index is reloaded
// so that the writer sees every change committed before it got the lock.
func (r *Repository) Lock(ctx context.Context, holder string) (unlock func(), err error) {
	if r.reader != nil {
		return nil, ErrReaderOnly
	}
	l, ok := r.be.(Locker)
	if !ok {
		return nil, fmt.Errorf("backend %s cannot lock", r.be.Location())
	}
	release, err := l.Lock(ctx, holder)
	if err != nil {
		return nil, err
	}
	if err := r.loadIndex(ctx); err != nil {
		release()
		return nil, err
	}
	r.mu.Lock()
	r.locked = true
	r.mu.Unlock()
	return func() {
		r.mu.Lock()
		r.locked = false
		r.mu.Unlock()
		release()
	}, nil
}

func (r *Repository) checkLocked() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.locked {
		return ErrNotLocked
	}
	return nil
}

// LoadBlob reads, decompresses and verifies one blob. dst is reused when large enough.
// A blob that is missing or whose content does not match its ID yields an ErrCorrupt error.
func (r *Repository) LoadBlob(ctx context.Context, id ID, dst []byte) ([]byte, error) {
	for attempt := 0; ; attempt++ {
		out, err := r.loadBlobOnce(ctx, id, dst)
		if (errors.Is(err, ErrNotExist) || errors.Is(err, errNotIndexed)) && attempt == 0 && r.indexChanged(ctx) {
			// A gc may have repacked the blob, or a snapshot committed since our index was
			// read (a long-running mount sees new snapshots): reload and retry.
			if lerr := r.reload(ctx); lerr != nil {
				return nil, lerr
			}
			continue
		}
		return out, err
	}
}

// errNotIndexed marks a blob no index file names.
var errNotIndexed = fmt.Errorf("%w: blob missing from the index", ErrCorrupt)

// indexChanged reports whether the set of index files differs from the one loaded: only
// then is reloading worth it (a damaged snapshot asks again and again).
func (r *Repository) indexChanged(ctx context.Context) bool {
	r.mu.Lock()
	seen := r.seen
	r.mu.Unlock()
	changed, n := false, 0
	err := r.be.List(ctx, IndexFile, func(name string, _ int64) error {
		n++
		if !seen[name] {
			changed = true
		}
		return nil
	})
	return err != nil || changed || n != len(seen)
}

func (r *Repository) loadBlobOnce(ctx context.Context, id ID, dst []byte) ([]byte, error) {
	e, pack, ok, err := r.locate(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("find blob %s: %w", id.Short(), err)
	}
	if !ok {
		return nil, fmt.Errorf("%w: %s", errNotIndexed, id.Short())
	}
	return r.readBlob(ctx, pack, e, dst)
}

func (r *Repository) readBlob(ctx context.Context, pack ID, e packEntry, dst []byte) ([]byte, error) {
	var stored []byte
	switch {
	case e.Zstd && int(e.Length) <= MaxChunkSize+MaxChunkSize/8:
		// Compressed bytes are only a step on the way: reuse their buffer (fresh memory
		// costs a page fault per 4 KiB).
		bp := compressBuffers.Get().(*[]byte)
		defer compressBuffers.Put(bp)
		stored = (*bp)[:e.Length]
	case !e.Zstd && cap(dst) >= int(e.Length):
		stored = dst[:e.Length] // raw: straight into the caller's buffer
	default:
		stored = make([]byte, e.Length)
	}
	if _, err := r.be.ReadAt(ctx, Handle{Type: PackFile, Name: pack.String()}, stored, int64(e.Offset)); err != nil {
		if errors.Is(err, ErrNotExist) {
			return nil, err
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, corruptf("blob %s: pack %s is truncated", e.ID.Short(), pack.Short())
		}
		return nil, fmt.Errorf("read blob %s from pack %s: %w", e.ID.Short(), pack.Short(), err)
	}
	out, err := decompressBlob(stored, e.Zstd, int(e.RawLen), dst)
	if err != nil {
		return nil, fmt.Errorf("blob %s in pack %s: %w", e.ID.Short(), pack.Short(), err)
	}
	if Hash(out) != e.ID {
		return nil, corruptf("blob %s in pack %s: content does not match its hash", e.ID.Short(), pack.Short())
	}
	return out, nil
}

// loadPage implements pageLoader for readers of committed trees.
func (r *Repository) loadPage(ctx context.Context, id ID, level int) ([]ID, error) {
	if p, ok := r.pages.Get(id); ok {
		return p, nil
	}
	b, err := r.LoadBlob(ctx, id, nil)
	if err != nil {
		return nil, fmt.Errorf("tree page %s: %w", id.Short(), err)
	}
	p, err := decodePage(b, level)
	if err != nil {
		return nil, fmt.Errorf("tree page %s: %w", id.Short(), err)
	}
	r.pages.Add(id, p)
	return p, nil
}

// Snapshots lists every readable snapshot, oldest first. Manifests that cannot be read are
// skipped and returned as errors in bad (verify reports them).
func (r *Repository) Snapshots(ctx context.Context) (snaps []*Snapshot, bad []error, err error) {
	// A manifest never changes (its name is its hash), so one read per repository
	// lifetime is enough: the agent and the mount list snapshots often.
	r.mu.Lock()
	known := r.manifests
	r.mu.Unlock()
	seen := make(map[string]*Snapshot, len(known))
	err = r.be.List(ctx, SnapshotFile, func(name string, _ int64) error {
		s, ok := known[name]
		if !ok {
			b, err := r.be.ReadAll(ctx, Handle{Type: SnapshotFile, Name: name})
			if errors.Is(err, ErrNotExist) {
				return nil // deleted meanwhile
			}
			if err != nil {
				return err
			}
			if s, err = decodeManifest(name, b); err != nil {
				bad = append(bad, err)
				return nil
			}
		}
		seen[name] = s
		c := *s // callers get their own copy to keep
		snaps = append(snaps, &c)
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("list snapshots: %w", err)
	}
	r.mu.Lock()
	r.manifests = seen
	r.mu.Unlock()
	SortSnapshots(snaps)
	return snaps, bad, nil
}

// SortSnapshots orders snapshots oldest first (ties by ID, so the order is total).
func SortSnapshots(snaps []*Snapshot) {
	sort.Slice(snaps, func(i, j int) bool {
		if !snaps[i].Created.Equal(snaps[j].Created) {
			return snaps[i].Created.Before(snaps[j].Created)
		}
		return snaps[i].ID < snaps[j].ID
	})
}

// Find resolves a reference: a snapshot ID or unique ID prefix (at least 4 digits), or
// VOLUME/NAME.
func Find(snaps []*Snapshot, ref string) (*Snapshot, error) {
	if vol, name, ok := strings.Cut(ref, "/"); ok {
		for _, s := range snaps {
			if s.Volume == vol && s.Name == name {
				return s, nil
			}
		}
		return nil, fmt.Errorf("%w: no snapshot named %q in volume %q (see `stasis list`)", ErrNotFound, name, vol)
	}
	if len(ref) < 4 {
		return nil, fmt.Errorf("%w: %q: give at least 4 digits of the ID, or VOLUME/NAME", ErrNotFound, ref)
	}
	var found *Snapshot
	for _, s := range snaps {
		if strings.HasPrefix(s.ID, ref) {
			if found != nil {
				return nil, fmt.Errorf("%w: ID prefix %q matches several snapshots; give more digits", ErrNotFound, ref)
			}
			found = s
		}
	}
	if found == nil {
		return nil, fmt.Errorf("%w: no snapshot has an ID starting with %q (see `stasis list`)", ErrNotFound, ref)
	}
	return found, nil
}

// Latest returns the newest snapshot of volume, or nil.
func Latest(snaps []*Snapshot, volume string) *Snapshot {
	var last *Snapshot
	for _, s := range snaps {
		if s.Volume == volume {
			last = s
		}
	}
	return last
}

// Delete removes snapshots' manifests. Their blobs stay until GC; no other snapshot changes.
func (r *Repository) Delete(ctx context.Context, snaps ...*Snapshot) error {
	if err := r.checkLocked(); err != nil {
		return err
	}
	for _, s := range snaps {
		if err := r.be.Remove(ctx, Handle{Type: SnapshotFile, Name: s.ID}); err != nil {
			return fmt.Errorf("delete snapshot %s/%s: %w", s.Volume, s.Name, err)
		}
	}
	return nil
}

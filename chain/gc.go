package chain

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/bits-and-blooms/bloom/v3"
)

// GC reclaims space no snapshot references, while other hosts may be writing snapshots
// into the repository without any lock. The protocol (docs/FORMAT.md has the argument):
//
//  1. With the deletion lock, gc finds the live blobs (every snapshot's block map) and each
//     pack's live bytes. A pack with no live blob, or one mostly garbage whose live blobs it
//     copies into new packs (indexed before anything else changes), is marked: gc writes a
//     deletion list naming it. Writers that start after the list exists read it and store
//     such blobs again instead of referencing them.
//  2. A deletion list is carried out once every writer alive now started after the list
//     was written (by the storage's clock): any writer that could have referenced a marked
//     pack without knowing has finished, and its manifest is visible. gc then re-reads the
//     snapshots and deletes only marked packs none of whose live blobs lacks another copy.
//     Index files naming them are rewritten first; then the packs go.
//  3. A pack no index file names (a writer died before committing) is deleted only if it is
//     older than every writer alive now.
//
// So one gc run frees what the previous runs marked, as soon as no writer that could need
// it runs; with no snapshot running, it frees its own marks at once.
type GCStats struct {
	PacksDeleted   int      `json:"packs_deleted"`
	PacksRewritten int      `json:"packs_rewritten"`
	PacksWritten   int      `json:"packs_written"`
	BlobsDeleted   int      `json:"blobs_deleted"`
	BytesFreed     int64    `json:"bytes_freed"`  // pack bytes deleted, less those repacking wrote
	BytesMarked    int64    `json:"bytes_marked"` // marked for deletion, not freed yet
	Waiting        []string `json:"waiting,omitempty"`
}

// GCOptions tune a collection.
type GCOptions struct {
	// MaxUnused is the fraction of a pack that may be garbage before gc rewrites it
	// (default 0.1): lower frees more, at the cost of copying live blobs.
	MaxUnused float64
	// DryRun computes what gc would do and changes nothing.
	DryRun bool
}

// liveSet says which blobs snapshots reference: a Bloom filter, so it never says a live blob
// is garbage (a false positive keeps some garbage for a later run).
type liveSet struct {
	r      *Reader
	filter *bloom.BloomFilter
	pages  map[ID]bool // tree pages already walked
	walked map[string]bool
}

func newLiveSet(r *Reader, expected uint) *liveSet {
	return &liveSet{r: r, filter: bloom.NewWithEstimates(max(expected, 1024), 0.001), pages: map[ID]bool{}, walked: map[string]bool{}}
}

// add walks snapshots not walked yet; a page that cannot be read fails the walk.
func (l *liveSet) add(ctx context.Context, snaps []*Snapshot) error {
	for _, s := range snaps {
		if l.walked[s.ID] {
			continue
		}
		l.walked[s.ID] = true
		tr := newTreeReader(l.r, s.Root, s.Chunks())
		err := tr.walk(ctx, func(id ID, _ int) bool {
			l.filter.Add(id[:])
			if l.pages[id] {
				return false
			}
			l.pages[id] = true
			return true
		}, func(_ int64, id ID) error {
			l.filter.Add(id[:])
			return nil
		})
		if err != nil {
			return fmt.Errorf("snapshot %s/%s (%s): %w", s.Volume, s.Name, s.ID, err)
		}
	}
	return nil
}

func (l *liveSet) has(id ID) bool { return l.filter.Test(id[:]) }

// packUse is what the index says about one pack.
type packUse struct {
	size       int64
	total      int64 // stored bytes of its blobs
	live       int64 // of those, live
	blobs      int
	liveBlobs  int
	indexFiles map[string]bool
}

// GC collects garbage; it needs the deletion lock.
func (r *Repository) GC(ctx context.Context, opts GCOptions) (GCStats, error) {
	var st GCStats
	if err := r.checkLocked(); err != nil {
		return st, err
	}
	if opts.MaxUnused <= 0 {
		opts.MaxUnused = 0.1
	}
	if err := r.index.refresh(ctx); err != nil {
		return st, err
	}
	bad, err := r.index.badFiles(ctx)
	if err != nil {
		return st, err
	}
	for name, e := range bad {
		return st, fmt.Errorf("gc refuses to run: index file %s cannot be read (%v), so gc cannot tell which packs hold live blobs; run `stasis verify`, restore the file or `stasis repair`", name[:8], e)
	}
	snaps, badSnaps, err := r.Snapshots(ctx)
	if err != nil {
		return st, err
	}
	if len(badSnaps) > 0 {
		return st, fmt.Errorf("gc refuses to run: %w; run `stasis verify` and remove the damaged manifest", badSnaps[0])
	}
	uses, entries, err := r.packUses(ctx)
	if err != nil {
		return st, err
	}
	live := newLiveSet(r.Reader, uint(entries))
	if err := live.add(ctx, snaps); err != nil {
		return st, fmt.Errorf("gc refuses to run, it cannot tell what a damaged snapshot references: %w; delete that snapshot or repair the repository", err)
	}
	if err := r.countLive(ctx, uses, live); err != nil {
		return st, err
	}
	marked, err := deletionCandidates(ctx, r.Reader)
	if err != nil {
		return st, err
	}

	// Step 1: mark dead packs, and copy the live blobs of mostly dead ones.
	var dead, rewrite []ID
	for id, u := range uses {
		switch {
		case marked[id]:
		case u.live == 0:
			dead = append(dead, id)
		case float64(u.total-u.live) > opts.MaxUnused*float64(u.total):
			rewrite = append(rewrite, id)
		}
	}
	sort.Slice(dead, func(i, j int) bool { return dead[i].String() < dead[j].String() })
	sort.Slice(rewrite, func(i, j int) bool { return rewrite[i].String() < rewrite[j].String() })
	for _, id := range append(append([]ID(nil), dead...), rewrite...) {
		st.BytesMarked += uses[id].size
	}
	if opts.DryRun {
		for _, id := range rewrite {
			st.PacksRewritten++
			st.BytesMarked -= uses[id].live
		}
		st.PacksDeleted = len(dead) + len(rewrite)
		return st, nil
	}
	if len(rewrite) > 0 {
		written, copied, err := r.repack(ctx, rewrite, live)
		if err != nil {
			return st, err
		}
		st.PacksRewritten, st.PacksWritten = len(rewrite), written
		st.BytesMarked -= copied
		st.BytesFreed -= copied
	}
	if len(dead)+len(rewrite) > 0 {
		if err := r.deletionLease.fresh(); err != nil {
			return st, err
		}
		if _, err := writeList(ctx, r.Reader, DeletionFile, deletionList{Created: time.Now().UTC(), Packs: append(dead, rewrite...)}); err != nil {
			return st, fmt.Errorf("gc: write deletion list: %w", err)
		}
	}

	// Step 2: carry out the deletion lists no running writer can still need.
	if err := r.finishDeletions(ctx, live, &st); err != nil {
		return st, err
	}
	// Step 3: packs no index names, older than every running writer.
	if err := r.deleteOrphans(ctx, &st); err != nil {
		return st, err
	}
	r.dropStaleProtections(ctx)
	return st, r.index.refresh(ctx)
}

// dropStaleProtections removes protections of snapshots that no longer exist (protected
// after their deletion began). A failure only leaves them for the next gc.
func (r *Repository) dropStaleProtections(ctx context.Context) {
	protected, err := r.Protected(ctx)
	if err != nil || len(protected) == 0 {
		return
	}
	snaps, bad, err := r.Snapshots(ctx)
	if err != nil || len(bad) > 0 {
		return // an unreadable manifest might be a protected snapshot's
	}
	for _, s := range snaps {
		delete(protected, s.ID)
	}
	for id := range protected {
		r.be.Remove(ctx, Handle{Type: ProtectFile, Name: id})
	}
}

// packUses reads every index entry once: each pack's size and blobs.
func (r *Reader) packUses(ctx context.Context) (map[ID]*packUse, int64, error) {
	uses := map[ID]*packUse{}
	var entries int64
	err := r.index.eachEntry(ctx, func(file string, l blobLoc) error {
		u := uses[l.pack]
		if u == nil {
			u = &packUse{size: l.packSize, indexFiles: map[string]bool{}}
			uses[l.pack] = u
		}
		if !u.indexFiles[file] {
			u.indexFiles[file] = true
			if len(u.indexFiles) > 1 {
				return nil // the same pack named by two index files: count it once
			}
		}
		u.total += int64(l.e.Length)
		u.blobs++
		entries++
		return nil
	})
	return uses, entries, err
}

// countLive sets each pack's live bytes.
func (r *Reader) countLive(ctx context.Context, uses map[ID]*packUse, live *liveSet) error {
	first := map[ID]string{} // the index file whose entries count for a pack
	return r.index.eachEntry(ctx, func(file string, l blobLoc) error {
		if f, ok := first[l.pack]; ok && f != file {
			return nil
		}
		first[l.pack] = file
		if u := uses[l.pack]; u != nil && live.has(l.e.ID) { // nil: indexed since packUses
			u.live += int64(l.e.Length)
			u.liveBlobs++
		}
		return nil
	})
}

// repack copies the live blobs of packs into new packs and indexes them, checking each
// blob on the way. It returns how many packs it wrote and the live bytes copied.
func (r *Repository) repack(ctx context.Context, packs []ID, live *liveSet) (int, int64, error) {
	want := map[ID]bool{}
	for _, p := range packs {
		want[p] = true
	}
	var todo []blobLoc
	if err := r.index.eachEntry(ctx, func(_ string, l blobLoc) error {
		if want[l.pack] && live.has(l.e.ID) {
			todo = append(todo, l)
		}
		return nil
	}); err != nil {
		return 0, 0, err
	}
	sort.Slice(todo, func(i, j int) bool {
		if todo[i].pack != todo[j].pack {
			return todo[i].pack.String() < todo[j].pack.String()
		}
		return todo[i].e.Offset < todo[j].e.Offset
	})
	var copied int64
	rp := newRepacker(r, "gc")
	placed := map[ID]bool{}
	for _, l := range todo {
		if placed[l.e.ID] {
			continue
		}
		stored := make([]byte, l.e.Length)
		if _, err := r.be.ReadAt(ctx, Handle{Type: PackFile, Name: l.pack.String()}, stored, int64(l.e.Offset)); err != nil {
			return 0, 0, fmt.Errorf("gc: read blob %s: %w", l.e.ID.Short(), err)
		}
		if _, err := r.decodeBlob(stored, l.e, nil); err != nil {
			return 0, 0, fmt.Errorf("gc refuses to copy damaged blob %s of pack %s: %w; run `stasis repair`", l.e.ID.Short(), l.pack.Short(), err)
		}
		placed[l.e.ID] = true
		copied += int64(l.e.Length)
		if err := rp.add(ctx, l.e, stored); err != nil {
			return 0, 0, err
		}
	}
	n, err := rp.finish(ctx)
	return n, copied, err
}

// saveIndex writes an index file naming packs (sealed in an encrypted repository) and
// makes it known to this process.
func (r *Reader) saveIndex(ctx context.Context, packs []indexedPack) (string, error) {
	plain := encodeIndex(packs)
	stored := plain
	if r.keys != nil {
		stored = r.keys.seal(nil, plain, indexAAD)
	}
	name := Hash(stored).String()
	if err := r.be.Save(ctx, Handle{Type: IndexFile, Name: name}, stored); err != nil {
		return "", fmt.Errorf("save index: %w", err)
	}
	if err := r.index.add(name, plain); err != nil {
		r.log.Warn("could not cache an index file; it is read again when needed", "err", err)
	}
	return name, nil
}

// finishDeletions carries out the deletion lists that no running writer can still need.
func (r *Repository) finishDeletions(ctx context.Context, live *liveSet, st *GCStats) error {
	lists, err := readLists[deletionList](ctx, r.Reader, DeletionFile)
	if err != nil {
		return err
	}
	if len(lists) == 0 {
		return nil
	}
	writers, _, err := listHolders(ctx, r.Reader, WriterFile)
	if err != nil {
		return err
	}
	var ready []namedList[deletionList]
	for _, l := range lists {
		blocked := ""
		for _, w := range writers {
			if !w.started.After(l.written) {
				blocked = fmt.Sprintf("%s (pid %d on %s) started before the packs were marked", w.info.Holder, w.info.PID, w.info.Host)
				break
			}
		}
		if blocked != "" {
			st.Waiting = append(st.Waiting, fmt.Sprintf("%d marked packs wait for %s", len(l.list.Packs), blocked))
			continue
		}
		ready = append(ready, l)
	}
	if len(ready) == 0 {
		return nil
	}
	// Snapshots committed since the walk may reference marked blobs: walk them too.
	snaps, bad, err := r.Snapshots(ctx)
	if err != nil {
		return err
	}
	if len(bad) > 0 {
		return fmt.Errorf("gc: %w", bad[0])
	}
	if err := live.add(ctx, snaps); err != nil {
		return err
	}
	marked := map[ID]bool{}
	for _, l := range lists {
		for _, p := range l.list.Packs {
			marked[p] = true
		}
	}
	// A live blob in a marked pack must have a copy in a pack that is not marked.
	elsewhere := map[ID]bool{}
	needCopy := map[ID][]ID{} // pack -> live blobs in it
	if err := r.index.eachEntry(ctx, func(_ string, l blobLoc) error {
		if !live.has(l.e.ID) {
			return nil
		}
		if marked[l.pack] {
			needCopy[l.pack] = append(needCopy[l.pack], l.e.ID)
		} else {
			elsewhere[l.e.ID] = true
		}
		return nil
	}); err != nil {
		return err
	}
	uses, _, err := r.packUses(ctx)
	if err != nil {
		return err
	}
	doomed := map[ID]bool{}
	for _, l := range ready {
		for _, p := range l.list.Packs {
			keep := false
			for _, b := range needCopy[p] {
				if !elsewhere[b] {
					keep = true
					break
				}
			}
			if !keep {
				doomed[p] = true
			}
		}
	}
	if err := r.deletionLease.fresh(); err != nil {
		return err
	}
	// Index files naming doomed packs are rewritten without them, first.
	if err := r.rewriteIndexes(ctx, doomed); err != nil {
		return err
	}
	for p := range doomed {
		err := r.be.Remove(ctx, Handle{Type: PackFile, Name: p.String()})
		if err != nil && !errors.Is(err, ErrNotExist) {
			return fmt.Errorf("gc: remove pack: %w", err)
		}
		if u := uses[p]; u != nil {
			st.BytesFreed += u.size
			st.BlobsDeleted += u.blobs - u.liveBlobs
			st.BytesMarked -= u.size
		}
		st.PacksDeleted++
	}
	for _, l := range ready {
		if err := r.be.Remove(ctx, Handle{Type: DeletionFile, Name: l.name}); err != nil && !errors.Is(err, ErrNotExist) {
			return err
		}
	}
	st.BytesMarked = max(st.BytesMarked, 0)
	return nil
}

// rewriteIndexes replaces every index file that names a doomed pack with one that does not
// (or removes it), and merges index files when there are many. New files are saved before
// old ones are removed, so every blob stays findable throughout.
func (r *Repository) rewriteIndexes(ctx context.Context, doomed map[ID]bool) error {
	files, err := r.index.snapshot(ctx)
	if err != nil {
		return err
	}
	var affected []*indexFile
	for _, f := range files {
		for _, p := range f.disk.hdr.packs {
			if doomed[p] {
				affected = append(affected, f)
				break
			}
		}
	}
	// Many small files: merge the smallest into one, up to a bound on memory.
	if len(files) > maxIndexFiles {
		sort.Slice(files, func(i, j int) bool { return files[i].disk.hdr.count < files[j].disk.hdr.count })
		var n uint32
		seen := map[*indexFile]bool{}
		for _, f := range affected {
			seen[f] = true
		}
		for _, f := range files[:len(files)-maxIndexFiles/2] {
			if n+f.disk.hdr.count > maxMergeEntries {
				break
			}
			n += f.disk.hdr.count
			if !seen[f] {
				affected = append(affected, f)
			}
		}
	}
	if len(affected) == 0 {
		return nil
	}
	byPack := map[ID]*indexedPack{}
	var order []ID
	for _, f := range affected {
		if err := f.disk.each(ctx, func(l blobLoc) error {
			if doomed[l.pack] {
				return nil
			}
			p := byPack[l.pack]
			if p == nil {
				p = &indexedPack{ID: l.pack, Size: l.packSize}
				byPack[l.pack] = p
				order = append(order, l.pack)
			}
			p.Entries = append(p.Entries, l.e)
			return nil
		}); err != nil {
			return err
		}
	}
	var packs []indexedPack
	for _, id := range order {
		packs = append(packs, dedupEntries(*byPack[id]))
	}
	if len(packs) > 0 {
		if _, err := r.saveIndex(ctx, packs); err != nil {
			return err
		}
	}
	for _, f := range affected {
		if err := r.be.Remove(ctx, Handle{Type: IndexFile, Name: f.name}); err != nil && !errors.Is(err, ErrNotExist) {
			return fmt.Errorf("gc: remove old index: %w", err)
		}
	}
	return r.index.refresh(ctx)
}

// Index files are merged when there are more than maxIndexFiles, at most maxMergeEntries
// entries at a time (about 45 bytes each in memory).
const (
	maxIndexFiles   = 64
	maxMergeEntries = 4 << 20
)

// dedupEntries drops repeated entries of one pack (two index files naming the same pack).
func dedupEntries(p indexedPack) indexedPack {
	seen := map[uint32]bool{}
	out := p.Entries[:0]
	for _, e := range p.Entries {
		if !seen[e.Offset] {
			seen[e.Offset] = true
			out = append(out, e)
		}
	}
	p.Entries = out
	return p
}

// deleteOrphans removes packs no index file names, written before every running writer
// started (so none of them can be about to index it). Both times are the storage's.
func (r *Repository) deleteOrphans(ctx context.Context, st *GCStats) error {
	// A writer missing from the listing below started after listedAt: what is older than
	// listedAt and every listed writer's start cannot be a live writer's.
	listedAt := r.storageNow()
	writers, _, err := listHolders(ctx, r.Reader, WriterFile)
	if err != nil {
		return err
	}
	// Read the index after the writers: a writer that finished meanwhile has its index
	// file written before its heartbeat went.
	if err := r.index.refresh(ctx); err != nil {
		return err
	}
	indexed := map[ID]bool{}
	files, err := r.index.snapshot(ctx)
	if err != nil {
		return err
	}
	for _, f := range files {
		for _, p := range f.disk.hdr.packs {
			indexed[p] = true
		}
	}
	if bad, _ := r.index.badFiles(ctx); len(bad) > 0 {
		return nil // an unreadable index may name any pack: delete nothing unindexed
	}
	var orphans []FileInfo
	if err := r.be.List(ctx, PackFile, func(fi FileInfo) error {
		id, err := ParseID(fi.Name)
		if err != nil || indexed[id] {
			return nil // not ours, or live
		}
		if !fi.ModTime.Before(listedAt) {
			return nil // perhaps a writer's that started after the listing
		}
		for _, w := range writers {
			if !fi.ModTime.Before(w.started) {
				return nil // perhaps that writer's
			}
		}
		orphans = append(orphans, fi)
		return nil
	}); err != nil {
		return err
	}
	if err := r.deletionLease.fresh(); err != nil {
		return err
	}
	for _, fi := range orphans {
		if err := r.be.Remove(ctx, Handle{Type: PackFile, Name: fi.Name}); err != nil && !errors.Is(err, ErrNotExist) {
			return err
		}
		st.PacksDeleted++
		st.BytesFreed += fi.Size
	}
	// Uploads a writer killed mid-Save left behind, begun before every running writer.
	if c, ok := r.be.(IncompleteCleaner); ok {
		// Every writer writes its heartbeat before any upload, so what began before the
		// oldest live writer started is a dead one's.
		before := listedAt
		for _, w := range writers {
			if w.started.Before(before) {
				before = w.started
			}
		}
		if _, err := c.CleanIncomplete(ctx, before); err != nil {
			r.log.Warn("could not clean incomplete uploads", "err", err)
		}
	}
	// Heartbeats of dead writers are debris too.
	_, stale, err := listHolders(ctx, r.Reader, WriterFile)
	if err == nil {
		for _, h := range stale {
			for _, name := range h.objects {
				r.be.Remove(ctx, Handle{Type: WriterFile, Name: name})
			}
		}
	}
	return nil
}

package chain

import (
	"context"
	"errors"
	"fmt"
)

// GCStats says what a garbage collection did.
type GCStats struct {
	PacksDeleted   int
	PacksRewritten int
	PacksWritten   int
	BlobsDeleted   int
	BytesFreed     int64
}

// repackBelow: a pack whose live bytes fall below this fraction is rewritten, so at most
// a tenth of the space stays garbage after gc, at the cost of copying live blobs.
const repackBelow = 0.9

// GC deletes blobs no snapshot references. Packs with no live blob are deleted; packs mostly
// garbage are rewritten. The order keeps every committed snapshot readable at every instant:
// new packs, then a new index naming every live blob, then removal of old index files, then
// removal of old packs. It refuses to run while any manifest or tree page is unreadable,
// since it could not know what those reference.
func (r *Repository) GC(ctx context.Context) (GCStats, error) {
	var st GCStats
	if err := r.checkLocked(); err != nil {
		return st, err
	}
	// Start from what the backend holds now, not from what this process read earlier: a
	// pack is an orphan only if no index file on disk names it.
	if err := r.loadIndex(ctx); err != nil {
		return st, err
	}
	snaps, bad, err := r.Snapshots(ctx)
	if err != nil {
		return st, err
	}
	if len(bad) > 0 {
		return st, fmt.Errorf("gc refuses to run: %w; run `stasis verify` and remove the damaged manifest", bad[0])
	}
	live := newRefWalker(r)
	for i, s := range snaps {
		if err := live.add(ctx, s, int32(i)); err != nil {
			return st, fmt.Errorf("gc refuses to run, it cannot tell what a damaged snapshot references: %w; delete that snapshot or repair the repository", err)
		}
	}

	// Every pack named by an index file, once, with all its entries.
	r.mu.Lock()
	oldFiles := append([]ID(nil), r.indexFiles...)
	r.mu.Unlock()
	packs := map[ID]indexedPack{}
	var order []ID
	for _, f := range oldFiles {
		b, err := r.be.ReadAll(ctx, Handle{Type: IndexFile, Name: f.String()})
		if err != nil {
			return st, fmt.Errorf("read index file %s: %w", f.Short(), err)
		}
		list, err := decodeIndex(b)
		if err != nil {
			return st, fmt.Errorf("index file %s: %w", f.Short(), err)
		}
		for _, p := range list {
			if _, ok := packs[p.ID]; !ok {
				packs[p.ID] = p
				order = append(order, p.ID)
			}
		}
	}

	// Decide each pack's fate. A blob is kept in the first pack that holds it.
	placed := map[ID]bool{}
	var keep, rewrite, drop []indexedPack
	for _, id := range order {
		p := packs[id]
		var liveBytes, total int64
		for _, e := range p.Entries {
			total += int64(e.Length)
			if _, ok := live.owner[e.ID]; ok && !placed[e.ID] {
				placed[e.ID] = true
				liveBytes += int64(e.Length)
			}
		}
		switch {
		case liveBytes == total:
			keep = append(keep, p)
		case liveBytes == 0:
			drop = append(drop, p)
		case float64(liveBytes) < repackBelow*float64(total):
			rewrite = append(rewrite, p)
		default:
			keep = append(keep, p)
		}
	}

	// Packs in the backend that no index names: left by a crashed or failed writer.
	var orphans []string
	if err := r.be.List(ctx, PackFile, func(name string, size int64) error {
		id, err := ParseID(name)
		if err != nil {
			return nil // not ours; leave it alone
		}
		if _, ok := packs[id]; !ok {
			orphans = append(orphans, name)
			st.BytesFreed += size
		}
		return nil
	}); err != nil {
		return st, err
	}

	if len(rewrite) == 0 && len(drop) == 0 && len(oldFiles) <= 1 {
		for _, name := range orphans {
			if err := r.be.Remove(ctx, Handle{Type: PackFile, Name: name}); err != nil && !errors.Is(err, ErrNotExist) {
				return st, err
			}
			st.PacksDeleted++
		}
		return st, nil
	}

	// Copy live blobs out of mostly-dead packs, checking each against its hash on the way.
	var newPacks []indexedPack
	pb := newPackBuilder()
	flush := func() error {
		if len(pb.entries) == 0 {
			return nil
		}
		data, id := pb.finish()
		if err := r.be.Save(ctx, Handle{Type: PackFile, Name: id.String()}, data); err != nil {
			return fmt.Errorf("gc: save pack: %w", err)
		}
		newPacks = append(newPacks, indexedPack{ID: id, Size: int64(len(data)), Entries: pb.entries})
		releasePackBuffer(data)
		st.PacksWritten++
		pb = newPackBuilder()
		return nil
	}
	copied := map[ID]bool{}
	for _, p := range rewrite {
		for _, e := range p.Entries {
			if _, ok := live.owner[e.ID]; !ok || copied[e.ID] {
				continue
			}
			stored := make([]byte, e.Length)
			if _, err := r.be.ReadAt(ctx, Handle{Type: PackFile, Name: p.ID.String()}, stored, int64(e.Offset)); err != nil {
				return st, fmt.Errorf("gc: read blob %s: %w", e.ID.Short(), err)
			}
			raw, err := decompressBlob(stored, e.Zstd, int(e.RawLen), nil)
			if err == nil && Hash(raw) != e.ID {
				err = corruptf("content does not match its hash")
			}
			if err != nil {
				return st, fmt.Errorf("gc refuses to copy damaged blob %s of pack %s: %w", e.ID.Short(), p.ID.Short(), err)
			}
			pb.add(e.Type, e.ID, stored, e.Zstd, int(e.RawLen))
			copied[e.ID] = true
			if pb.size() >= PackSize {
				if err := flush(); err != nil {
					return st, err
				}
			}
		}
	}
	if err := flush(); err != nil {
		return st, err
	}

	// One index naming every kept and new pack replaces all the old index files.
	all := append(append([]indexedPack(nil), keep...), newPacks...)
	b := encodeIndex(all)
	newFile := Hash(b)
	if err := r.be.Save(ctx, Handle{Type: IndexFile, Name: newFile.String()}, b); err != nil {
		return st, fmt.Errorf("gc: save index: %w", err)
	}
	for _, f := range oldFiles {
		if f == newFile {
			continue
		}
		if err := r.be.Remove(ctx, Handle{Type: IndexFile, Name: f.String()}); err != nil && !errors.Is(err, ErrNotExist) {
			return st, fmt.Errorf("gc: remove old index: %w", err)
		}
	}
	for _, p := range append(drop, rewrite...) {
		for _, e := range p.Entries {
			if !copied[e.ID] {
				st.BlobsDeleted++
			}
		}
		if err := r.be.Remove(ctx, Handle{Type: PackFile, Name: p.ID.String()}); err != nil && !errors.Is(err, ErrNotExist) {
			return st, fmt.Errorf("gc: remove pack: %w", err)
		}
		st.PacksDeleted++
		st.BytesFreed += p.Size
	}
	st.PacksRewritten = len(rewrite)
	for _, name := range orphans {
		if err := r.be.Remove(ctx, Handle{Type: PackFile, Name: name}); err != nil && !errors.Is(err, ErrNotExist) {
			return st, err
		}
		st.PacksDeleted++
	}
	for _, p := range newPacks {
		st.BytesFreed -= p.Size
	}
	return st, r.loadIndex(ctx)
}

package chain

import (
	"context"
	"errors"
	"sort"
	"time"
)

// RepairReport says what repair did.
type RepairReport struct {
	PacksRewritten int `json:"packs_rewritten"`
	BlobsSalvaged  int `json:"blobs_salvaged"`
	BlobsDropped   int `json:"blobs_dropped"` // damaged copies left behind for gc
	// Unrecoverable are damaged blobs with no intact copy; the snapshots needing them are
	// damaged until a new snapshot of a source that still has the same chunk stores it.
	Unrecoverable []ID            `json:"unrecoverable,omitempty"`
	Damaged       map[string]bool `json:"damaged_snapshots,omitempty"` // snapshot IDs
}

// Repair, with the deletion lock, reads every pack that holds a damaged blob (as verify
// --read-data recorded them) or fails its check, copies its intact blobs to new packs,
// indexes them and marks the old pack for deletion (gc removes it). Blobs with no intact
// copy anywhere stay listed as damaged: writers store them again when they meet them on a
// source, which heals every snapshot that has the same chunk.
func (r *Repository) Repair(ctx context.Context) (*RepairReport, error) {
	if err := r.checkLocked(); err != nil {
		return nil, err
	}
	rep := &RepairReport{Damaged: map[string]bool{}}
	if err := r.index.refresh(ctx); err != nil {
		return nil, err
	}
	damaged, err := damagedBlobs(ctx, r.Reader)
	if err != nil {
		return nil, err
	}
	// The packs holding a copy of a listed blob, and each one's verdict.
	suspects := map[ID]bool{}
	if err := r.index.eachEntry(ctx, func(_ string, l blobLoc) error {
		if damaged[l.e.ID] {
			suspects[l.pack] = true
		}
		return nil
	}); err != nil {
		return nil, err
	}
	packs := make([]ID, 0, len(suspects))
	for p := range suspects {
		packs = append(packs, p)
	}
	sort.Slice(packs, func(i, j int) bool { return packs[i].String() < packs[j].String() })
	var marked []ID
	rp := newRepacker(r, "repair")
	intact := map[ID]bool{}
	for _, p := range packs {
		bad := r.checkPack(ctx, p)
		if len(bad) == 0 {
			continue // every copy in it is fine (the damage was elsewhere)
		}
		var entries []packEntry
		if err := r.index.eachEntry(ctx, func(_ string, l blobLoc) error {
			if l.pack == p {
				entries = append(entries, l.e)
			}
			return nil
		}); err != nil {
			return nil, err
		}
		_, whole := bad[ZeroID]
		for _, e := range entries {
			if _, isBad := bad[e.ID]; isBad || whole {
				rep.BlobsDropped++
				continue
			}
			stored := make([]byte, e.Length)
			if _, err := r.be.ReadAt(ctx, Handle{Type: PackFile, Name: p.String()}, stored, int64(e.Offset)); err != nil {
				rep.BlobsDropped++
				continue
			}
			rep.BlobsSalvaged++
			intact[e.ID] = true
			if err := rp.add(ctx, e, stored); err != nil {
				return nil, err
			}
		}
		marked = append(marked, p)
	}
	if _, err := rp.finish(ctx); err != nil {
		return nil, err
	}
	rep.PacksRewritten = len(marked)
	if len(marked) > 0 {
		if _, err := writeList(ctx, r.Reader, DeletionFile, deletionList{Created: time.Now().UTC(), Packs: marked}); err != nil {
			return nil, err
		}
	}
	// What has no intact copy left stays listed; the rest comes off the damage lists.
	stillBad := map[ID]bool{}
	for id := range damaged {
		locs, err := r.index.locations(ctx, id)
		if err != nil {
			return nil, err
		}
		ok := false
		for _, l := range locs {
			if !contains(marked, l.pack) {
				if _, err := r.readBlob(ctx, l, nil); err == nil {
					ok = true
					break
				}
			}
		}
		if !ok {
			stillBad[id] = true
			rep.Unrecoverable = append(rep.Unrecoverable, id)
		}
	}
	sort.Slice(rep.Unrecoverable, func(i, j int) bool { return rep.Unrecoverable[i].String() < rep.Unrecoverable[j].String() })
	lists, err := readLists[damageList](ctx, r.Reader, DamageFile)
	if err != nil {
		return nil, err
	}
	if len(rep.Unrecoverable) > 0 {
		if _, err := writeList(ctx, r.Reader, DamageFile, damageList{Found: time.Now().UTC(), Blobs: rep.Unrecoverable}); err != nil {
			return nil, err
		}
	}
	for _, l := range lists {
		if err := r.be.Remove(ctx, Handle{Type: DamageFile, Name: l.name}); err != nil && !errors.Is(err, ErrNotExist) {
			return nil, err
		}
	}
	if len(stillBad) > 0 {
		snaps, _, err := r.Snapshots(ctx)
		if err != nil {
			return nil, err
		}
		for _, s := range snaps {
			reason, err := r.verifySnapshot(ctx, s, map[ID]string{}, map[ID]string{})
			if err != nil {
				return nil, err
			}
			if reason != "" || r.references(ctx, s, stillBad) {
				rep.Damaged[s.ID] = true
			}
		}
	}
	return rep, r.index.refresh(ctx)
}

func contains(ids []ID, id ID) bool {
	for _, x := range ids {
		if x == id {
			return true
		}
	}
	return false
}

// references reports whether snapshot s uses any of blobs.
func (r *Reader) references(ctx context.Context, s *Snapshot, blobs map[ID]bool) bool {
	found := false
	tr := newTreeReader(r, s.Root, s.Chunks())
	tr.walk(ctx, func(id ID, _ int) bool {
		if blobs[id] {
			found = true
		}
		return !found
	}, func(_ int64, id ID) error {
		if blobs[id] {
			found = true
			return errStop
		}
		return nil
	})
	return found
}

var errStop = errors.New("stop")

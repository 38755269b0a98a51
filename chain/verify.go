package chain

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
)

// VerifyReport lists what verify found. A repository is healthy when Problems is empty.
type VerifyReport struct {
	Snapshots int      `json:"snapshots"`
	Packs     int      `json:"packs"`
	Blobs     int      `json:"blobs"`
	BytesRead int64    `json:"bytes_read"`
	Problems  []string `json:"problems"`
	// Damaged maps a damaged snapshot's ID to the first reason found.
	Damaged map[string]string `json:"damaged_snapshots"`
	// DamagedBlobs are blobs with no intact copy; new snapshots store them again.
	DamagedBlobs []ID `json:"damaged_blobs"`
}

// OK reports whether nothing was found wrong.
func (v *VerifyReport) OK() bool { return len(v.Problems) == 0 }

// Verify checks the repository's structure: every index file and manifest decodes, every
// indexed pack exists with the right size, and every snapshot's block map reads and names
// only indexed blobs. With readData it also reads every pack and checks every blob, and
// records the damaged ones in a damage list: new snapshots store them again from the
// source (healing every older snapshot that has the same chunk), and `stasis repair`
// drops the damaged copies. progress, if not nil, is called with bytes read so far and the
// total to read.
func (r *Reader) Verify(ctx context.Context, readData bool, progress func(done, total int64)) (*VerifyReport, error) {
	rep := &VerifyReport{Damaged: map[string]string{}, Problems: []string{}, DamagedBlobs: []ID{}}
	if err := r.index.refresh(ctx); err != nil {
		return nil, err
	}
	bad, err := r.index.badFiles(ctx)
	if err != nil {
		return nil, err
	}
	for name, err := range bad {
		rep.Problems = append(rep.Problems, fmt.Sprintf("index file %s: %v", name[:8], err))
	}
	snaps, badSnaps, err := r.Snapshots(ctx)
	if err != nil {
		return nil, err
	}
	for _, err := range badSnaps {
		rep.Problems = append(rep.Problems, err.Error())
	}
	rep.Snapshots = len(snaps)
	uses, entries, err := r.packUses(ctx)
	if err != nil {
		return nil, err
	}
	rep.Packs, rep.Blobs = len(uses), int(entries)

	// Damaged copies, by pack: a whole pack (missing, wrong size) or single blobs.
	badCopy := map[ID]map[ID]string{} // pack -> blob (ZeroID: all) -> reason
	var mu sync.Mutex
	mark := func(pack, blob ID, reason string) {
		mu.Lock()
		defer mu.Unlock()
		if badCopy[pack] == nil {
			badCopy[pack] = map[ID]string{}
		}
		badCopy[pack][blob] = reason
		rep.Problems = append(rep.Problems, reason)
	}
	var total, done int64
	ids := make([]ID, 0, len(uses))
	for id, u := range uses {
		ids = append(ids, id)
		total += u.size
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i].String() < ids[j].String() })
	var g errgroup.Group // pack checks never fail: damage is reported, not returned
	g.SetLimit(2)
	for _, id := range ids {
		u := uses[id]
		h := Handle{Type: PackFile, Name: id.String()}
		size, err := r.be.Stat(ctx, h)
		if err != nil {
			if errors.Is(err, ErrNotExist) {
				mark(id, ZeroID, fmt.Sprintf("pack %s is missing", id.Short()))
				continue
			}
			return nil, err
		}
		if size != u.size {
			mark(id, ZeroID, fmt.Sprintf("pack %s is %d bytes, the index says %d", id.Short(), size, u.size))
			continue
		}
		if !readData {
			continue
		}
		g.Go(func() error {
			found := r.checkPack(ctx, id)
			for blob, reason := range found {
				mark(id, blob, reason)
			}
			mu.Lock()
			rep.BytesRead += u.size
			done += u.size
			if progress != nil {
				progress(done, total)
			}
			mu.Unlock()
			return nil
		})
		if ctx.Err() != nil {
			break
		}
	}
	g.Wait()
	if err := ctx.Err(); err != nil {
		return nil, err
	}

	// A blob is damaged when none of its copies is intact.
	damagedCopy := func(l blobLoc) (string, bool) {
		m := badCopy[l.pack]
		if m == nil {
			return "", false
		}
		if reason, ok := m[ZeroID]; ok {
			return reason, true
		}
		reason, ok := m[l.e.ID]
		return reason, ok
	}
	damaged := map[ID]string{}
	if len(badCopy) > 0 {
		if err := r.index.eachEntry(ctx, func(_ string, l blobLoc) error {
			if reason, bad := damagedCopy(l); bad {
				if _, seen := damaged[l.e.ID]; !seen {
					damaged[l.e.ID] = reason
				}
			}
			return nil
		}); err != nil {
			return nil, err
		}
		for id := range damaged {
			locs, err := r.index.locations(ctx, id)
			if err != nil {
				return nil, err
			}
			for _, l := range locs {
				if _, bad := damagedCopy(l); !bad {
					delete(damaged, id) // an intact copy remains
					break
				}
			}
		}
	}
	for id := range damaged {
		rep.DamagedBlobs = append(rep.DamagedBlobs, id)
	}
	sort.Slice(rep.DamagedBlobs, func(i, j int) bool { return rep.DamagedBlobs[i].String() < rep.DamagedBlobs[j].String() })

	// Walk every snapshot; a page's verdict is shared by every snapshot that has it.
	pageVerdict := map[ID]string{}
	for _, s := range snaps {
		reason, err := r.verifySnapshot(ctx, s, damaged, pageVerdict)
		if err != nil {
			return nil, err
		}
		if reason != "" {
			rep.Damaged[s.ID] = reason
			rep.Problems = append(rep.Problems, fmt.Sprintf("snapshot %s/%s (%s) is damaged: %s", s.Volume, s.Name, s.ID, reason))
		}
	}
	sort.Strings(rep.Problems)
	if readData && len(rep.DamagedBlobs) > 0 {
		known, err := damagedBlobs(ctx, r)
		if err != nil {
			return nil, err
		}
		var fresh []ID
		for _, id := range rep.DamagedBlobs {
			if !known[id] {
				fresh = append(fresh, id)
			}
		}
		if len(fresh) > 0 {
			if _, err := writeList(ctx, r, DamageFile, damageList{Found: time.Now().UTC(), Blobs: fresh}); err != nil {
				return nil, fmt.Errorf("record damaged blobs: %w", err)
			}
		}
	}
	return rep, nil
}

// verifySnapshot walks one snapshot's block map, returning why it is damaged or "".
func (r *Reader) verifySnapshot(ctx context.Context, s *Snapshot, damaged map[ID]string, verdict map[ID]string) (string, error) {
	var rec func(id ID, level int) (string, error)
	rec = func(id ID, level int) (string, error) {
		if id.IsZero() {
			return "", nil
		}
		if reason, ok := damaged[id]; ok {
			return reason, nil
		}
		if v, ok := verdict[id]; ok {
			return v, nil
		}
		if _, ok, err := r.index.lookup(ctx, id); err != nil {
			return "", err
		} else if !ok {
			verdict[id] = fmt.Sprintf("blob %s is missing", id.Short())
			return verdict[id], nil
		}
		if level < 0 {
			return "", nil
		}
		entries, err := r.loadPage(ctx, id, level)
		v := ""
		if err != nil {
			v = err.Error()
		} else {
			for _, e := range entries {
				if v, err = rec(e, level-1); err != nil {
					return "", err
				}
				if v != "" {
					break
				}
			}
		}
		verdict[id] = v
		return v, nil
	}
	return rec(s.Root, treeDepth(s.Chunks())-1)
}

// checkPack reads a whole pack and returns its damaged blobs with reasons (ZeroID for
// damage outside any blob). A pack whose content matches its name is intact.
func (r *Reader) checkPack(ctx context.Context, id ID) map[ID]string {
	bad := map[ID]string{}
	h := Handle{Type: PackFile, Name: id.String()}
	data, err := r.be.ReadAll(ctx, h)
	if err != nil {
		bad[ZeroID] = fmt.Sprintf("pack %s: %v", id.Short(), err)
		return bad
	}
	if Hash(data) == id {
		if _, err := decodePackTrailer(data, r.keys); err != nil {
			bad[ZeroID] = fmt.Sprintf("pack %s: %v", id.Short(), err)
		}
		return bad
	}
	var entries []packEntry
	r.index.eachEntry(ctx, func(_ string, l blobLoc) error {
		if l.pack == id {
			entries = append(entries, l.e)
		}
		return nil
	})
	for _, e := range entries {
		end := int64(e.Offset) + int64(e.Length)
		if end > int64(len(data)) {
			bad[e.ID] = fmt.Sprintf("blob %s: pack %s is truncated", e.ID.Short(), id.Short())
			continue
		}
		if _, err := r.decodeBlob(data[e.Offset:end], e, nil); err != nil {
			bad[e.ID] = fmt.Sprintf("%s blob %s in pack %s: %v", e.Type, e.ID.Short(), id.Short(), err)
		}
	}
	if len(bad) == 0 {
		// The damage is outside the blobs (the table or trailer): every blob reads, so no
		// blob is damaged, but the pack is reported (under its own ID, which no blob has).
		bad[id] = fmt.Sprintf("pack %s: content does not match its name (damage outside the blobs)", id.Short())
	}
	return bad
}

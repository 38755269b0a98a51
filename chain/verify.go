package chain

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"

	"golang.org/x/sync/errgroup"
)

// VerifyReport lists what verify found. A repository is healthy when Problems is empty.
type VerifyReport struct {
	Snapshots int
	Packs     int
	Blobs     int
	BytesRead int64
	Problems  []string
	// Damaged maps a damaged snapshot's ID to the first reason found.
	Damaged map[string]string
}

// OK reports whether nothing was found wrong.
func (v *VerifyReport) OK() bool { return len(v.Problems) == 0 }

// Verify checks the repository's structure: every index file and manifest decodes, every
// indexed pack exists with the right size, and every snapshot's block map reads and names
// only indexed blobs. With readData it also reads every pack and checks every blob's hash.
// progress, if not nil, is called with bytes read so far and the total to read.
func (r *Repository) Verify(ctx context.Context, readData bool, progress func(done, total int64)) (*VerifyReport, error) {
	if r.reader != nil {
		return nil, ErrReaderOnly
	}
	rep := &VerifyReport{Damaged: map[string]string{}}
	r.mu.Lock()
	for _, err := range r.indexErrs {
		rep.Problems = append(rep.Problems, err.Error())
	}
	r.mu.Unlock()
	snaps, bad, err := r.Snapshots(ctx)
	if err != nil {
		return nil, err
	}
	for _, err := range bad {
		rep.Problems = append(rep.Problems, err.Error())
	}
	rep.Snapshots = len(snaps)

	idx := r.index()
	idx.mu.RLock()
	packs := append([]ID(nil), idx.packs...)
	sizes := append([]int64(nil), idx.sizes...)
	rep.Blobs = len(idx.blobs)
	idx.mu.RUnlock()
	rep.Packs = len(packs)

	damagedBlobs := map[ID]string{}
	var dmu sync.Mutex
	markPack := func(pos int, reason string) {
		dmu.Lock()
		defer dmu.Unlock()
		rep.Problems = append(rep.Problems, reason)
		idx.mu.RLock()
		defer idx.mu.RUnlock()
		for id, l := range idx.blobs {
			if int(l.pack) == pos {
				damagedBlobs[id] = reason
			}
		}
	}
	var total int64
	for _, s := range sizes {
		total += s
	}
	var done int64
	var g errgroup.Group // pack checks never fail: damage is reported, not returned
	g.SetLimit(2)
	for pos, id := range packs {
		h := Handle{Type: PackFile, Name: id.String()}
		size, err := r.be.Stat(ctx, h)
		if err != nil {
			if errors.Is(err, ErrNotExist) {
				markPack(pos, fmt.Sprintf("pack %s is missing", id.Short()))
				continue
			}
			return nil, err
		}
		if size != sizes[pos] {
			markPack(pos, fmt.Sprintf("pack %s is %d bytes, the index says %d", id.Short(), size, sizes[pos]))
			continue
		}
		if !readData {
			continue
		}
		g.Go(func() error {
			bad := r.checkPack(ctx, id)
			dmu.Lock()
			rep.BytesRead += sizes[pos]
			done += sizes[pos]
			if progress != nil {
				progress(done, total)
			}
			for blob, reason := range bad {
				damagedBlobs[blob] = reason
				rep.Problems = append(rep.Problems, reason)
			}
			dmu.Unlock()
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

	// Walk every snapshot; a page's verdict is shared by every snapshot that has it.
	pageVerdict := map[ID]string{}
	for _, s := range snaps {
		reason := r.verifySnapshot(ctx, s, idx, damagedBlobs, pageVerdict)
		if reason != "" {
			rep.Damaged[s.ID] = reason
			rep.Problems = append(rep.Problems, fmt.Sprintf("snapshot %s/%s (%s) is damaged: %s", s.Volume, s.Name, s.ID, reason))
		}
	}
	sort.Strings(rep.Problems)
	return rep, nil
}

func (r *Repository) verifySnapshot(ctx context.Context, s *Snapshot, idx *blobIndex, damaged map[ID]string, verdict map[ID]string) string {
	var rec func(id ID, level int) string
	rec = func(id ID, level int) string {
		if id.IsZero() {
			return ""
		}
		if reason, ok := damaged[id]; ok {
			return reason
		}
		if !idx.has(id) {
			return fmt.Sprintf("blob %s is missing", id.Short())
		}
		if level < 0 {
			return ""
		}
		if v, ok := verdict[id]; ok {
			return v
		}
		entries, err := r.loadPage(ctx, id, level)
		v := ""
		if err != nil {
			v = err.Error()
		} else {
			for _, e := range entries {
				if v = rec(e, level-1); v != "" {
					break
				}
			}
		}
		verdict[id] = v
		return v
	}
	return rec(s.Root, treeDepth(s.Chunks())-1)
}

// checkPack reads a whole pack and returns its damaged blobs with reasons. A pack whose
// content matches its name is intact; otherwise each indexed blob is checked on its own.
func (r *Repository) checkPack(ctx context.Context, id ID) map[ID]string {
	bad := map[ID]string{}
	h := Handle{Type: PackFile, Name: id.String()}
	data, err := r.be.ReadAll(ctx, h)
	if err != nil {
		bad[id] = fmt.Sprintf("pack %s: %v", id.Short(), err)
		return bad
	}
	if Hash(data) == id {
		if _, err := decodePackTrailer(data); err != nil {
			bad[id] = fmt.Sprintf("pack %s: %v", id.Short(), err)
		}
		return bad
	}
	idx := r.index()
	idx.mu.RLock()
	pos := idx.packPos[id]
	var entries []packEntry
	for blob, l := range idx.blobs {
		if l.pack == pos {
			entries = append(entries, packEntry{ID: blob, Type: l.typ, Zstd: l.zstd, Offset: l.offset, Length: l.length, RawLen: l.rawLen})
		}
	}
	idx.mu.RUnlock()
	for _, e := range entries {
		end := int64(e.Offset) + int64(e.Length)
		if end > int64(len(data)) {
			bad[e.ID] = fmt.Sprintf("blob %s: pack %s is truncated", e.ID.Short(), id.Short())
			continue
		}
		raw, err := decompressBlob(data[e.Offset:end], e.Zstd, int(e.RawLen), nil)
		if err == nil && Hash(raw) != e.ID {
			err = corruptf("content does not match its hash")
		}
		if err != nil {
			bad[e.ID] = fmt.Sprintf("%s blob %s in pack %s: %v", e.Type, e.ID.Short(), id.Short(), err)
		}
	}
	if len(bad) == 0 {
		bad[ID{}] = fmt.Sprintf("pack %s: content does not match its name (damage outside the blobs)", id.Short())
	}
	return bad
}

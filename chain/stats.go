package chain

import (
	"context"
	"time"
)

// SnapshotStats is one snapshot's share of its chain.
type SnapshotStats struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Created   time.Time `json:"created"`
	SizeBytes int64     `json:"size_bytes"`
	// NewBytes is what the snapshot added to the repository when it was taken.
	NewBytes int64 `json:"new_bytes"`
	// ExclusiveBytes is what only this snapshot references: what deleting it (and gc) frees.
	ExclusiveBytes int64 `json:"exclusive_bytes"`
}

// ChainStats is one volume's chain: what cloud consoles call the chain capacity.
type ChainStats struct {
	Volume       string          `json:"volume"`
	Snapshots    []SnapshotStats `json:"snapshots"`
	LogicalBytes int64           `json:"logical_bytes"` // size of the newest snapshot's volume
	StoredBytes  int64           `json:"stored_bytes"`  // stored bytes of every blob the chain references
}

// RepoStats covers the whole repository.
type RepoStats struct {
	Chains          []ChainStats `json:"chains"`
	PackBytes       int64        `json:"pack_bytes"`       // every pack file
	ReferencedBytes int64        `json:"referenced_bytes"` // blobs some snapshot references
	GarbageBytes    int64        `json:"garbage_bytes"`    // what gc would reclaim, at most
}

// Stats computes capacity figures by walking every snapshot's block map once.
func (r *Repository) Stats(ctx context.Context) (*RepoStats, error) {
	if r.reader != nil {
		return nil, ErrReaderOnly
	}
	snaps, _, err := r.Snapshots(ctx)
	if err != nil {
		return nil, err
	}
	owners := newRefWalker(r)
	for i, s := range snaps {
		if err := owners.add(ctx, s, int32(i)); err != nil {
			return nil, err
		}
	}
	idx := r.index()
	stored := func(id ID) int64 {
		l, _, ok := idx.lookup(id)
		if !ok {
			return 0
		}
		return int64(l.length)
	}
	exclusive := make([]int64, len(snaps))
	st := &RepoStats{}
	for id, o := range owners.owner {
		n := stored(id)
		st.ReferencedBytes += n
		if o != shared {
			exclusive[o] += n
		}
	}
	idx.mu.RLock()
	for _, s := range idx.sizes {
		st.PackBytes += s
	}
	idx.mu.RUnlock()
	st.GarbageBytes = st.PackBytes - st.ReferencedBytes
	if st.GarbageBytes < 0 {
		st.GarbageBytes = 0
	}

	byVolume := map[string]int{}
	for i, s := range snaps {
		c, ok := byVolume[s.Volume]
		if !ok {
			c = len(st.Chains)
			byVolume[s.Volume] = c
			st.Chains = append(st.Chains, ChainStats{Volume: s.Volume})
		}
		ch := &st.Chains[c]
		ch.Snapshots = append(ch.Snapshots, SnapshotStats{ID: s.ID, Name: s.Name, Created: s.Created,
			SizeBytes: s.SizeBytes, NewBytes: s.NewBytes, ExclusiveBytes: exclusive[i]})
		ch.LogicalBytes = s.SizeBytes
	}
	// A chain's stored bytes: every blob its snapshots reference, counted once.
	for c := range st.Chains {
		w := newRefWalker(r)
		for _, s := range snaps {
			if s.Volume == st.Chains[c].Volume {
				if err := w.add(ctx, s, 0); err != nil {
					return nil, err
				}
			}
		}
		for id := range w.owner {
			st.Chains[c].StoredBytes += stored(id)
		}
	}
	return st, nil
}

// PackBytes is the total size of the pack files the index names: cheap, no tree walk.
func (r *Repository) PackBytes() int64 {
	idx := r.index()
	if idx == nil { // OpenReader
		return 0
	}
	idx.mu.RLock()
	defer idx.mu.RUnlock()
	var n int64
	for _, s := range idx.sizes {
		n += s
	}
	return n
}

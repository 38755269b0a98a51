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
	Host         string          `json:"host,omitempty"`
	Volume       string          `json:"volume"`
	Snapshots    []SnapshotStats `json:"snapshots"`
	LogicalBytes int64           `json:"logical_bytes"` // size of the newest snapshot's volume
	StoredBytes  int64           `json:"stored_bytes"`  // stored bytes of every blob the chain references
}

// RepoStats covers the whole repository.
type RepoStats struct {
	Chains          []ChainStats `json:"chains"`
	PackBytes       int64        `json:"pack_bytes"`       // every indexed pack file
	ReferencedBytes int64        `json:"referenced_bytes"` // blobs some snapshot references
	// ReclaimableBytes is what gc (with its default max-unused) would free: packs with no
	// live blob, and the garbage of packs it would rewrite.
	ReclaimableBytes int64 `json:"reclaimable_bytes"`
}

// refWalker visits the blobs snapshots reference, each subtree once per distinct owner.
type refWalker struct {
	r *Reader
	// owner is the first snapshot (index into the walked list) that referenced a blob, or
	// shared (-1) once a second one did.
	owner map[ID]int32
}

const shared = -1

func newRefWalker(r *Reader) *refWalker { return &refWalker{r: r, owner: map[ID]int32{}} }

// add walks snapshot number s. A page that cannot be read fails the walk.
func (w *refWalker) add(ctx context.Context, snap *Snapshot, s int32) error {
	tr := newTreeReader(w.r, snap.Root, snap.Chunks())
	visit := func(id ID) bool {
		o, seen := w.owner[id]
		switch {
		case !seen:
			w.owner[id] = s
		case o == s || o == shared:
			return false
		default:
			w.owner[id] = shared
		}
		return true
	}
	return tr.walk(ctx, func(id ID, _ int) bool { return visit(id) }, func(_ int64, id ID) error {
		visit(id)
		return nil
	})
}

// Stats computes capacity figures by walking every snapshot's block map once.
func (r *Reader) Stats(ctx context.Context) (*RepoStats, error) {
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
	stored := func(id ID) int64 {
		l, ok, err := r.index.lookup(ctx, id)
		if err != nil || !ok {
			return 0
		}
		return int64(l.e.Length)
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
	uses, entries, err := r.packUses(ctx)
	if err != nil {
		return nil, err
	}
	live := newLiveSet(r, uint(entries))
	if err := live.add(ctx, snaps); err != nil {
		return nil, err
	}
	if err := r.countLive(ctx, uses, live); err != nil {
		return nil, err
	}
	for _, u := range uses {
		st.PackBytes += u.size
		switch {
		case u.live == 0:
			st.ReclaimableBytes += u.size
		case float64(u.total-u.live) > 0.1*float64(u.total):
			st.ReclaimableBytes += u.size - u.live
		}
	}
	type key struct{ host, volume string }
	byVolume := map[key]int{}
	for i, s := range snaps {
		k := key{s.Host, s.Volume}
		c, ok := byVolume[k]
		if !ok {
			c = len(st.Chains)
			byVolume[k] = c
			st.Chains = append(st.Chains, ChainStats{Host: s.Host, Volume: s.Volume})
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
			if s.Volume == st.Chains[c].Volume && s.Host == st.Chains[c].Host {
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

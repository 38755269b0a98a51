package chain

import (
	"context"
	"fmt"
)

// refWalker visits the blobs snapshots reference, each subtree once per distinct owner.
// It backs gc (what is live), stats (who holds what) and verify (what is damaged).
type refWalker struct {
	r *Repository
	// owner is the first snapshot (index into the walked list) that referenced a blob, or
	// shared (-1) once a second one did.
	owner map[ID]int32
}

const shared = -1

func newRefWalker(r *Repository) *refWalker { return &refWalker{r: r, owner: map[ID]int32{}} }

// add walks snapshot number s. A page that cannot be read fails the walk.
func (w *refWalker) add(ctx context.Context, snap *Snapshot, s int32) error {
	chunks := snap.Chunks()
	var rec func(id ID, level int) error
	rec = func(id ID, level int) error {
		if id.IsZero() {
			return nil
		}
		o, seen := w.owner[id]
		switch {
		case !seen:
			w.owner[id] = s
		case o == s || o == shared:
			return nil
		default:
			w.owner[id] = shared
		}
		if level < 0 {
			return nil
		}
		entries, err := w.r.loadPage(ctx, id, level)
		if err != nil {
			return err
		}
		for _, e := range entries {
			if err := rec(e, level-1); err != nil {
				return err
			}
		}
		return nil
	}
	if err := rec(snap.Root, treeDepth(chunks)-1); err != nil {
		return fmt.Errorf("snapshot %s/%s (%s): %w", snap.Volume, snap.Name, snap.ID, err)
	}
	return nil
}

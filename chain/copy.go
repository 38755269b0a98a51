package chain

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"

	"golang.org/x/sync/errgroup"
)

// CopyStats says what copying snapshots did.
type CopyStats struct {
	Copied  int `json:"copied"`
	Skipped int `json:"skipped"` // already in the destination
	// ChunksRead and BytesRead count chunk content read from the source: a copy reads only
	// chunks that changed since the last snapshot it copied (or, between repositories with
	// the same blob IDs, only chunks the destination lacks).
	ChunksRead int64 `json:"chunks_read"`
	BytesRead  int64 `json:"bytes_read"`
	// BytesStored is what the destination grew by (packs, index files, manifests).
	BytesStored int64 `json:"bytes_stored"`
}

// copyReaders is how many chunks a copy reads from the source at once: object storage
// answers each read after a round trip, so several are kept in flight.
var copyReaders = max(8, 2*runtime.GOMAXPROCS(0))

// CopyOf returns the snapshot in snaps that is a copy of s (or s's original): same host,
// volume, name and creation time. Copies keep all four, so this is how a second
// repository knows what it already has.
func CopyOf(snaps []*Snapshot, s *Snapshot) *Snapshot {
	for _, c := range snaps {
		if c.Host == s.Host && c.Volume == s.Volume && c.Name == s.Name && c.Created.Equal(s.Created) {
			return c
		}
	}
	return nil
}

// sameBlobIDs reports whether two repositories name equal content with equal IDs: both
// unencrypted, or encrypted with one master key (stasis init --copy-keys-from).
func sameBlobIDs(a, b *Reader) bool {
	if (a.keys == nil) != (b.keys == nil) {
		return false
	}
	return a.keys == nil || a.keys.idKey == b.keys.idKey
}

// Copy copies snap from src into dst, bit for bit, keeping its host, volume, name, time,
// labels and capture records; it does nothing if dst already has it. It takes no lock: it
// is a writer like a snapshot. When dst's newest snapshot of the volume is a copy of one
// src still has, only the chunks that differ between that one and snap are read and
// stored; otherwise every non-zero chunk is, except (with the same blob IDs) chunks dst
// already holds. Copy snapshots oldest first so chains stay incremental. st, if not nil,
// adds up what was copied.
func Copy(ctx context.Context, src *Reader, dst *Repository, snap *Snapshot, st *CopyStats) (*Snapshot, error) {
	if st == nil {
		st = &CopyStats{}
	}
	dstSnaps, _, err := dst.Snapshots(ctx)
	if err != nil {
		return nil, err
	}
	if c := CopyOf(dstSnaps, snap); c != nil {
		st.Skipped++
		return c, nil
	}
	srcSnaps, _, err := src.Snapshots(ctx)
	if err != nil {
		return nil, err
	}
	host := snap.Host
	if host == "" {
		host = src.Host()
	}
	opts := SnapshotOptions{Volume: snap.Volume, Name: snap.Name, Kind: snap.Kind, Consistency: snap.Consistency,
		Size: snap.SizeBytes, ChunkSize: snap.ChunkSize, Source: snap.Source, Host: host, Identity: snap.Identity,
		Group: snap.Group, GroupID: snap.GroupID, Tags: snap.Tags, Note: snap.Note, Now: snap.Created}
	// The base: the destination's newest copy of this volume whose original the source
	// still has, with the same geometry. If it references a damaged blob, the writer refuses
	// it and every chunk is copied again (unchanged ones kept from it could be damaged).
	var base *Snapshot
	if p := Latest(dstSnaps, host, snap.Volume); p != nil && p.SizeBytes == snap.SizeBytes && p.ChunkSize == snap.ChunkSize {
		if orig := CopyOf(srcSnaps, p); orig != nil && orig.SizeBytes == p.SizeBytes && orig.ChunkSize == p.ChunkSize {
			base = orig
			opts.Parent, opts.FromParent = p, true
		}
	}
	w, err := dst.NewSnapshot(ctx, opts)
	if errors.Is(err, ErrParentDamaged) {
		base, opts.FromParent = nil, false
		w, err = dst.NewSnapshot(ctx, opts)
	}
	if err != nil {
		return nil, fmt.Errorf("copy %s/%s: %w", snap.Volume, snap.Name, err)
	}
	sr := src.SnapshotReader(snap)
	same := sameBlobIDs(src, dst.Reader)
	var chunks, bytes atomic.Int64
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(copyReaders)
	each := func(i int64, id ID) error {
		g.Go(func() error {
			if same && !id.IsZero() {
				if ok, err := w.PutKnown(gctx, i, id); ok || err != nil {
					return err
				}
			}
			data, err := sr.LoadChunk(gctx, i, id, nil)
			if err != nil {
				return err
			}
			if !id.IsZero() {
				chunks.Add(1)
				bytes.Add(int64(len(data)))
			}
			return w.Put(gctx, i, data)
		})
		return gctx.Err()
	}
	if base != nil {
		err = diffTrees(ctx, newTreeReader(src, base.Root, base.Chunks()), sr.tree, each)
	} else {
		err = sr.Walk(ctx, each)
	}
	if werr := g.Wait(); err == nil {
		err = werr
	}
	if err != nil {
		w.Abort()
		return nil, fmt.Errorf("copy %s/%s: %w", snap.Volume, snap.Name, err)
	}
	out, err := w.Commit(ctx, snap.Capture, snap.App)
	if err != nil {
		return nil, fmt.Errorf("copy %s/%s: %w", snap.Volume, snap.Name, err)
	}
	st.Copied++
	st.ChunksRead += chunks.Load()
	st.BytesRead += bytes.Load()
	st.BytesStored += out.NewBytes
	return out, nil
}

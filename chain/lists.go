package chain

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Two kinds of repository-wide lists change what writers may reuse:
//
//   - deletions/NAME: packs gc has marked for deletion (their blobs were garbage, or live
//     ones were copied to new packs). A writer that has read the list stores such a blob
//     again instead of referencing it, so gc can delete the packs once every writer that
//     started before the list was written has finished (see gc.go).
//   - damaged/NAME: blobs verify found damaged. Writers store them again from the source;
//     readers skip the damaged copy for the new one; repair drops it.

// deletionList is the content of a deletions/ object.
type deletionList struct {
	Created time.Time `json:"created"`
	Packs   []ID      `json:"packs"`
}

// damageList is the content of a damaged/ object.
type damageList struct {
	Found time.Time `json:"found"`
	Blobs []ID      `json:"blobs"`
}

// namedList is a list object with its name and the storage's time of writing it.
type namedList[T any] struct {
	name    string
	written time.Time
	list    T
}

func readLists[T any](ctx context.Context, r *Reader, t FileType) ([]namedList[T], error) {
	var out []namedList[T]
	err := r.be.List(ctx, t, func(fi FileInfo) error {
		b, err := r.be.ReadAll(ctx, Handle{Type: t, Name: fi.Name})
		if errors.Is(err, ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		plain, err := r.openObject(t, fi.Name, b)
		if err != nil {
			return err
		}
		var l T
		if err := json.Unmarshal(plain, &l); err != nil {
			return corruptf("%s/%s: %v", t, fi.Name, err)
		}
		out = append(out, namedList[T]{name: fi.Name, written: fi.ModTime, list: l})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", t, err)
	}
	return out, nil
}

func writeList(ctx context.Context, r *Reader, t FileType, v any) (string, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return "", err
	}
	name := randomName()
	return name, r.be.Save(ctx, Handle{Type: t, Name: name}, r.sealObject(t, name, b))
}

// deletionCandidates returns every pack some deletion list names.
func deletionCandidates(ctx context.Context, r *Reader) (map[ID]bool, error) {
	lists, err := readLists[deletionList](ctx, r, DeletionFile)
	if err != nil {
		return nil, err
	}
	out := map[ID]bool{}
	for _, l := range lists {
		for _, p := range l.list.Packs {
			out[p] = true
		}
	}
	return out, nil
}

// damagedBlobs returns every blob some damage list names.
func damagedBlobs(ctx context.Context, r *Reader) (map[ID]bool, error) {
	lists, err := readLists[damageList](ctx, r, DamageFile)
	if err != nil {
		return nil, err
	}
	out := map[ID]bool{}
	for _, l := range lists {
		for _, b := range l.list.Blobs {
			out[b] = true
		}
	}
	return out, nil
}

// errFound stops a walk that found what it looked for.
var errFound = errors.New("found")

// referencesAny reports whether snap's block map names any of ids (a chunk or a page of the
// map). A snapshot that kept snap's unchanged chunks would keep such a blob: with ids the
// damaged blobs, it says whether an incremental on snap could carry damage on. It reads
// snap's whole block map, so it is asked only when ids is not empty.
func (r *Reader) referencesAny(ctx context.Context, snap *Snapshot, ids map[ID]bool) (bool, error) {
	if snap == nil || len(ids) == 0 {
		return false, nil
	}
	found := false
	err := newTreeReader(r, snap.Root, snap.Chunks()).walk(ctx, func(id ID, _ int) bool {
		found = found || ids[id]
		return !found
	}, func(_ int64, id ID) error {
		if ids[id] {
			return errFound
		}
		return nil
	})
	if found || errors.Is(err, errFound) {
		return true, nil
	}
	return false, err
}

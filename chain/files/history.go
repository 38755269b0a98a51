package files

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/zeebo/blake3"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/fsimage"
)

// Version is one distinct content of a path across snapshots.
type Version struct {
	Type string `json:"type"`
	// Hash is the BLAKE3-256 of a file's content, a link's target or a directory's names.
	Hash   string    `json:"hash"`
	Size   int64     `json:"size"`
	Mode   uint32    `json:"mode"`
	Mtime  time.Time `json:"mtime"` // in the first snapshot holding this version
	Target string    `json:"target,omitempty"`
	// First and Last are the oldest and newest snapshots holding it; Snapshots counts them.
	First     *chain.Snapshot `json:"-"`
	Last      *chain.Snapshot `json:"-"`
	Snapshots int             `json:"snapshots"`
}

// History lists the distinct versions of path p in vols (one volume's snapshots, oldest
// first), each once, in the order they first appear. Snapshots without the path are
// skipped. A file's content is hashed only where it differs from the previous snapshot's
// (found by its chunks, as Diff does).
func History(ctx context.Context, vols []*Volume, p string) ([]*Version, error) {
	var out []*Version
	byKey := map[string]*Version{}
	var prev *Entry
	var prevKey string
	for _, v := range vols {
		e, err := v.Lookup(ctx, p)
		if errors.Is(err, ErrNotFound) {
			prev = nil
			continue
		}
		if err != nil {
			return nil, err
		}
		key, err := versionKey(ctx, e, prev, prevKey)
		if err != nil {
			return nil, err
		}
		prev, prevKey = e, key
		if ver, ok := byKey[key]; ok {
			ver.Last = v.snap
			ver.Snapshots++
			continue
		}
		_, hash, _ := strings.Cut(key, ":")
		ver := &Version{Type: e.Type(), Hash: hash, Mode: e.Attr.Mode, Mtime: e.Attr.Mtime,
			First: v.snap, Last: v.snap, Snapshots: 1}
		switch e.Attr.Mode & fsimage.S_IFMT {
		case fsimage.S_IFREG:
			ver.Size = int64(e.Attr.Size)
		case fsimage.S_IFLNK:
			if ver.Target, err = e.Readlink(); err != nil {
				return nil, err
			}
			ver.Size = int64(len(ver.Target))
		}
		byKey[key] = ver
		out = append(out, ver)
	}
	return out, nil
}

// versionKey is "type:hash" of an entry's content; prev, when not nil, is the same path
// in the previous snapshot, whose key is reused if the content is unchanged.
func versionKey(ctx context.Context, e, prev *Entry, prevKey string) (string, error) {
	typ := e.Type()
	if prev != nil && prev.Type() == typ && typ == "file" {
		same, _, _, err := Compare(ctx, prev, e)
		if err != nil {
			return "", err
		}
		if same {
			return prevKey, nil
		}
	}
	var h string
	switch e.Attr.Mode & fsimage.S_IFMT {
	case fsimage.S_IFREG:
		var err error
		if h, err = Hash(ctx, e); err != nil {
			return "", err
		}
	case fsimage.S_IFLNK:
		t, err := e.Readlink()
		if err != nil {
			return "", err
		}
		h = hashString(t)
	case fsimage.S_IFDIR:
		cs, err := e.Node.ReadDir()
		if err != nil {
			return "", e.FS.damage(e.Path, err)
		}
		names := make([]string, len(cs))
		for i, c := range cs {
			names[i] = c.Name
		}
		h = hashString(strings.Join(slices.Sorted(slices.Values(names)), "\x00"))
	default:
		h = hashString(fmt.Sprint(e.Attr.Rdev))
	}
	return typ + ":" + h, nil
}

func hashString(s string) string {
	sum := blake3.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// Match reports whether a path (relative, as Entry.Path) matches a find pattern: a glob
// on the whole path when the pattern holds a "/" ("/etc/*.conf", "home/*/.ssh"), else on
// the last component ("*.conf"). A malformed pattern matches nothing.
func Match(pattern, p string) bool {
	if strings.Contains(pattern, "/") {
		ok, _ := path.Match(strings.TrimPrefix(pattern, "/"), p)
		return ok
	}
	ok, _ := path.Match(pattern, path.Base(p))
	return ok && p != ""
}

// ValidPattern checks a find pattern's syntax.
func ValidPattern(pattern string) error {
	_, err := path.Match(strings.TrimPrefix(pattern, "/"), "")
	return err
}

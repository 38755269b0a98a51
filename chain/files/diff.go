package files

import (
	"bytes"
	"context"
	"errors"
	"slices"

	"github.com/stasis-project/stasis/chain/fsimage"
)

// Change is one difference between two snapshots.
type Change struct {
	// Op is "+" (added), "-" (removed), "M" (content, link target or device changed) or
	// "U" (metadata only). A path whose type changed is "-" then "+".
	Op   string `json:"op"`
	Path string `json:"path"` // from the volume's root, with a leading "/"
	Type string `json:"type"` // file, dir, symlink, chardev, blockdev, fifo, socket
	// What lists what changed for M and U: content, target, device, mode, owner, mtime,
	// xattrs (POSIX ACLs are xattrs), atime (only when asked).
	What []string `json:"what,omitempty"`
	// AddedBytes and RemovedBytes are file bytes new in the second snapshot and gone
	// from the first: whole files for + and -, the differing 64 KiB pieces and any
	// growth or truncation for M.
	AddedBytes   int64 `json:"added_bytes,omitempty"`
	RemovedBytes int64 `json:"removed_bytes,omitempty"`
}

// DiffOptions tune Diff.
type DiffOptions struct {
	Atime bool // report access-time changes too (noise under relatime, so off by default)
}

// DiffStats sums a diff.
type DiffStats struct {
	Added        int   `json:"added"`
	Removed      int   `json:"removed"`
	Modified     int   `json:"modified"`
	Metadata     int   `json:"metadata_only"`
	AddedBytes   int64 `json:"added_bytes"`
	RemovedBytes int64 `json:"removed_bytes"`
}

func (s *DiffStats) count(c Change) {
	switch c.Op {
	case "+":
		s.Added++
	case "-":
		s.Removed++
	case "M":
		s.Modified++
	case "U":
		s.Metadata++
	}
	s.AddedBytes += c.AddedBytes
	s.RemovedBytes += c.RemovedBytes
}

type differ struct {
	ctx   context.Context
	opts  DiffOptions
	fn    func(Change) error
	stats DiffStats
}

func (d *differ) emit(c Change) error {
	d.stats.count(c)
	return d.fn(c)
}

// Diff reports, in path order, how the tree at p (a path as for Lookup; "" for the whole
// volume) differs from snapshot a to snapshot b. Unchanged file contents are recognised
// by their extents mapping to the same chunks in both snapshots, without reading them;
// metadata the snapshots share is parsed from one cached copy of its chunks.
func Diff(ctx context.Context, a, b *Volume, p string, opts DiffOptions, fn func(Change) error) (DiffStats, error) {
	d := &differ{ctx: ctx, opts: opts, fn: fn}
	p, err := Clean(p)
	if err != nil {
		return d.stats, err
	}
	if p == "" {
		return d.stats, d.volumes(a, b)
	}
	x, errA := a.Lookup(ctx, p)
	y, errB := b.Lookup(ctx, p)
	switch {
	case errA != nil && !errors.Is(errA, ErrNotFound):
		return d.stats, errA
	case errB != nil && !errors.Is(errB, ErrNotFound):
		return d.stats, errB
	case errA != nil && errB != nil:
		return d.stats, errB
	case errA != nil:
		err = d.tree("+", y)
	case errB != nil:
		err = d.tree("-", x)
	default:
		err = d.entries(x, y)
	}
	return d.stats, err
}

// volumes compares whole volumes, partition by partition.
func (d *differ) volumes(a, b *Volume) error {
	fa, err := a.Filesystems()
	if err != nil {
		return err
	}
	fb, err := b.Filesystems()
	if err != nil {
		return err
	}
	byName := func(fss []*Filesystem, name string) *Filesystem {
		if i := slices.IndexFunc(fss, func(f *Filesystem) bool { return f.name == name }); i >= 0 {
			return fss[i]
		}
		return nil
	}
	for _, f := range fa {
		x, err := f.Root()
		if err != nil {
			return err
		}
		if g := byName(fb, f.name); g != nil {
			y, rerr := g.Root()
			if rerr != nil {
				return rerr
			}
			err = d.entries(x, y)
		} else {
			err = d.tree("-", x)
		}
		if err != nil {
			return err
		}
	}
	for _, g := range fb {
		if byName(fa, g.name) != nil {
			continue
		}
		y, err := g.Root()
		if err != nil {
			return err
		}
		if err := d.tree("+", y); err != nil {
			return err
		}
	}
	return nil
}

// tree reports e and everything under it as added or removed.
func (d *differ) tree(op string, e *Entry) error {
	return Walk(d.ctx, e, func(e *Entry) error {
		c := Change{Op: op, Path: "/" + e.Path, Type: e.Type()}
		if e.Attr.Mode&fsimage.S_IFMT == fsimage.S_IFREG {
			if op == "+" {
				c.AddedBytes = int64(e.Attr.Size)
			} else {
				c.RemovedBytes = int64(e.Attr.Size)
			}
		}
		return d.emit(c)
	})
}

// entries compares one path's entries, then, for directories, their children.
func (d *differ) entries(x, y *Entry) error {
	if err := d.ctx.Err(); err != nil {
		return err
	}
	if x.Attr.Mode&fsimage.S_IFMT != y.Attr.Mode&fsimage.S_IFMT {
		if err := d.tree("-", x); err != nil {
			return err
		}
		return d.tree("+", y)
	}
	c := Change{Path: "/" + y.Path, Type: y.Type()}
	var changed []string
	switch y.Attr.Mode & fsimage.S_IFMT {
	case fsimage.S_IFREG:
		same, added, removed, err := Compare(d.ctx, x, y)
		if err != nil {
			return err
		}
		if !same {
			changed = append(changed, "content")
			c.AddedBytes, c.RemovedBytes = added, removed
		}
	case fsimage.S_IFLNK:
		tx, err := x.Readlink()
		if err != nil {
			return err
		}
		ty, err := y.Readlink()
		if err != nil {
			return err
		}
		if tx != ty {
			changed = append(changed, "target")
		}
	case fsimage.S_IFCHR, fsimage.S_IFBLK:
		if x.Attr.Rdev != y.Attr.Rdev {
			changed = append(changed, "device")
		}
	}
	meta, err := d.metadata(x, y)
	if err != nil {
		return err
	}
	c.What = append(changed, meta...)
	switch {
	case len(changed) > 0:
		c.Op = "M"
	case len(meta) > 0:
		c.Op = "U"
	}
	if c.Op != "" {
		if err := d.emit(c); err != nil {
			return err
		}
	}
	if !y.IsDir() {
		return nil
	}
	return d.children(x, y)
}

// metadata lists what differs besides content: what restore sets (ctime cannot be set,
// and the link count follows the tree).
func (d *differ) metadata(x, y *Entry) ([]string, error) {
	var what []string
	ax, ay := x.Attr, y.Attr
	if ax.Mode != ay.Mode {
		what = append(what, "mode")
	}
	if ax.UID != ay.UID || ax.GID != ay.GID {
		what = append(what, "owner")
	}
	if !ax.Mtime.Equal(ay.Mtime) {
		what = append(what, "mtime")
	}
	if d.opts.Atime && !ax.Atime.Equal(ay.Atime) {
		what = append(what, "atime")
	}
	xx, err := x.Xattrs()
	if err != nil {
		return nil, err
	}
	xy, err := y.Xattrs()
	if err != nil {
		return nil, err
	}
	if !slices.EqualFunc(xx, xy, func(a, b fsimage.Xattr) bool { return a.Name == b.Name && bytes.Equal(a.Value, b.Value) }) {
		what = append(what, "xattrs")
	}
	return what, nil
}

// children merges two sorted listings.
func (d *differ) children(x, y *Entry) error {
	cx, err := x.Children()
	if err != nil {
		return err
	}
	cy, err := y.Children()
	if err != nil {
		return err
	}
	i, j := 0, 0
	for i < len(cx) || j < len(cy) {
		switch {
		case j == len(cy) || (i < len(cx) && cx[i].Path < cy[j].Path):
			err = d.tree("-", cx[i])
			i++
		case i == len(cx) || cy[j].Path < cx[i].Path:
			err = d.tree("+", cy[j])
			j++
		default:
			err = d.entries(cx[i], cy[j])
			i, j = i+1, j+1
		}
		if err != nil {
			return err
		}
	}
	return nil
}

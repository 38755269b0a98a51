// Package files answers questions about the files inside snapshots without mounting
// them: list a directory, read a file, compare two snapshots, trace a file's versions,
// find paths, and restore files and trees. It reads through the same ext4 and XFS readers
// as the FUSE view, from the same chunk cache, so every byte is hash-checked and damage is
// an error naming the snapshot and the path, never wrong data.
//
// Paths are slash-separated and relative to the volume's root ("" is the root). A volume
// with a partition table shows its partitions as the first component ("part2/etc").
package files

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"slices"
	"strings"
	"sync"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/fsimage"
	"github.com/stasis-project/stasis/chain/fsimage/filesystems"
	"github.com/stasis-project/stasis/chain/image"
)

// ErrNotFound means a path does not exist in a snapshot.
var ErrNotFound = errors.New("no such file or directory")

// Volume is one snapshot's volume, opened for its files. The partition table and the
// filesystems are read on first use. Safe for concurrent use.
type Volume struct {
	img  *image.Reader
	snap *chain.Snapshot

	once  sync.Once
	whole *Filesystem   // the image is one filesystem
	parts []*Filesystem // or a partition table: part1, part2...
	err   error
}

// Open opens snapshot s, read through img.
func Open(img *image.Reader) *Volume {
	return &Volume{img: img, snap: img.Snapshot().Snapshot()}
}

// Snapshot is the snapshot whose files v shows.
func (v *Volume) Snapshot() *chain.Snapshot { return v.snap }

// Label names the snapshot in messages: VOLUME/NAME.
func (v *Volume) Label() string { return v.snap.Volume + "/" + v.snap.Name }

// Filesystem is a filesystem of a volume: the whole image or one partition.
type Filesystem struct {
	vol  *Volume
	name string // "" for the whole image, else "part<N>"
	base int64  // where it starts in the image, bytes
	size int64

	once sync.Once
	fs   fsimage.FS
	err  error

	mu      sync.Mutex
	parents map[uint64]dirLink // directory inode → where it is listed, as found
}

// dirLink is where a directory is listed: in which directory, under which name.
type dirLink struct {
	parent uint64
	name   string
}

// adopt records that directory ino is listed in directory parent as name, and returns
// where it was listed before if that was elsewhere. In ext4 and XFS a directory has
// exactly one name: one listed twice is damage, and walking it under every name could take
// for ever (forty levels of two names each are 2^40 paths).
func (f *Filesystem) adopt(ino, parent uint64, name string) (before dirLink, ok bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.parents == nil {
		f.parents = map[uint64]dirLink{}
	}
	here := dirLink{parent, name}
	if l, seen := f.parents[ino]; seen && l != here {
		return l, false
	}
	f.parents[ino] = here
	return dirLink{}, true
}

func (v *Volume) open() error {
	v.once.Do(func() {
		parts, err := fsimage.Partitions(v.img, v.img.Size())
		if err != nil {
			v.err = fmt.Errorf("%s: partition table: %w", v.Label(), err)
			return
		}
		if len(parts) == 0 {
			v.whole = &Filesystem{vol: v, size: v.img.Size()}
			return
		}
		for _, p := range parts {
			v.parts = append(v.parts, &Filesystem{vol: v, name: fmt.Sprintf("part%d", p.Index), base: p.Start, size: p.Size})
		}
	})
	return v.err
}

// Filesystems returns the volume's filesystems: one with the name "" for an image without
// a partition table, else one per partition ("part1"...).
func (v *Volume) Filesystems() ([]*Filesystem, error) {
	if err := v.open(); err != nil {
		return nil, err
	}
	if v.whole != nil {
		return []*Filesystem{v.whole}, nil
	}
	return v.parts, nil
}

// Partitioned reports whether the volume has a partition table.
func (v *Volume) Partitioned() (bool, error) {
	if err := v.open(); err != nil {
		return false, err
	}
	return v.whole == nil, nil
}

// Name is "" for a whole-image filesystem, else "part<N>".
func (f *Filesystem) Name() string { return f.name }

// FS opens the filesystem (ext4 with its journal replayed in memory when it needs recovery).
func (f *Filesystem) FS() (fsimage.FS, error) {
	f.once.Do(func() {
		dev := io.ReaderAt(f.vol.img)
		if f.base != 0 || f.size != f.vol.img.Size() {
			dev = io.NewSectionReader(f.vol.img, f.base, f.size)
		}
		f.fs, f.err = filesystems.Open(dev, f.size)
		if f.err != nil {
			where := f.vol.Label()
			if f.name != "" {
				where += " " + f.name
			}
			f.err = fmt.Errorf("%s: %w", where, f.err)
		}
	})
	return f.fs, f.err
}

// Caveats says what the files of the volume may not show exactly: a crash-consistent
// snapshot of XFS, whose log the reader does not replay, shows the metadata as last
// written in place, without the newest changes still in the log.
func (v *Volume) Caveats() []string {
	if v.snap.Consistency != "crash" {
		return nil
	}
	fss, err := v.Filesystems()
	if err != nil {
		return nil // the error surfaces on use
	}
	var out []string
	for _, f := range fss {
		if fsys, err := f.FS(); err == nil && fsys.Type() == "xfs" {
			where := v.Label()
			if f.name != "" {
				where += " " + f.name
			}
			out = append(out, where+" is a crash-consistent XFS snapshot and its log is not replayed: the newest changes before it may be missing (frozen and app snapshots are exact)")
		}
	}
	return out
}

// RootOf returns the root directory of a filesystem the caller opened, named label in
// errors: its files without a snapshot behind them (no chunk IDs to compare by, so Compare
// reads). The fuzz target reads hostile images this way.
func RootOf(fsys fsimage.FS, label string) (*Entry, error) {
	f := &Filesystem{vol: &Volume{snap: &chain.Snapshot{Volume: label}}}
	f.once.Do(func() { f.fs = fsys })
	return f.Root()
}

// Root returns the filesystem's root directory.
func (f *Filesystem) Root() (*Entry, error) {
	fsys, err := f.FS()
	if err != nil {
		return nil, err
	}
	return f.entry(f.name, fsys.Root())
}

func (f *Filesystem) entry(p string, ino uint64) (*Entry, error) {
	n, err := f.fs.Open(ino)
	if err != nil {
		return nil, f.damage(p, err)
	}
	return &Entry{FS: f, Path: p, Ino: ino, Node: n, Attr: n.Attr()}, nil
}

// damage names the snapshot and the path in an error from the readers or the repository.
func (f *Filesystem) damage(p string, err error) error {
	return fmt.Errorf("%s:/%s: %w", f.vol.Label(), p, err)
}

// Entry is one file, directory or other inode at a path of a snapshot.
type Entry struct {
	FS   *Filesystem
	Path string // relative to the volume's root, partition first
	Ino  uint64
	Node fsimage.Inode
	Attr fsimage.Attr

	up    *Entry // the directory listed to find it (nil for a root or a looked-up path)
	depth int
}

// Type is the entry's kind: file, dir, symlink, chardev, blockdev, fifo or socket.
func (e *Entry) Type() string { return TypeName(e.Attr.Mode) }

// TypeName names the type bits of a mode.
func TypeName(mode uint32) string {
	switch mode & fsimage.S_IFMT {
	case fsimage.S_IFREG:
		return "file"
	case fsimage.S_IFDIR:
		return "dir"
	case fsimage.S_IFLNK:
		return "symlink"
	case fsimage.S_IFCHR:
		return "chardev"
	case fsimage.S_IFBLK:
		return "blockdev"
	case fsimage.S_IFIFO:
		return "fifo"
	case fsimage.S_IFSOCK:
		return "socket"
	}
	return "unknown"
}

// IsDir reports whether the entry is a directory.
func (e *Entry) IsDir() bool { return e.Attr.Mode&fsimage.S_IFMT == fsimage.S_IFDIR }

// Children lists a directory, sorted by name.
func (e *Entry) Children() ([]*Entry, error) {
	des, err := e.Node.ReadDir()
	if err != nil {
		return nil, e.FS.damage(e.Path, err)
	}
	slices.SortFunc(des, func(a, b fsimage.DirEntry) int { return strings.Compare(a.Name, b.Name) })
	if e.depth >= maxDepth {
		return nil, e.FS.damage(e.Path, fsimage.Corruptf("directories nested over %d deep", maxDepth))
	}
	out := make([]*Entry, 0, len(des))
	for _, d := range des {
		if d.Name == "" || d.Name == "." || d.Name == ".." || strings.Contains(d.Name, "/") {
			return nil, e.FS.damage(e.Path, fsimage.Corruptf("directory entry named %q", d.Name))
		}
		c, err := e.FS.entry(path.Join(e.Path, d.Name), d.Ino)
		if err != nil {
			return nil, err
		}
		c.up, c.depth = e, e.depth+1
		if c.IsDir() {
			for a := e; a != nil; a = a.up {
				if a.Ino == c.Ino {
					return nil, e.FS.damage(c.Path, fsimage.Corruptf("directory inode %d contains itself", c.Ino))
				}
			}
			if before, ok := e.FS.adopt(c.Ino, e.Ino, d.Name); !ok {
				return nil, e.FS.damage(c.Path, fsimage.Corruptf("directory inode %d is listed twice (as %q in directory inode %d, and here); a directory has one name", c.Ino, before.name, before.parent))
			}
		}
		out = append(out, c)
	}
	return out, nil
}

// maxDepth bounds directory nesting: a hostile image's loops end in an error, not a crash.
const maxDepth = 4096

// Readlink returns a symbolic link's target.
func (e *Entry) Readlink() (string, error) {
	t, err := e.Node.Readlink()
	if err != nil {
		return "", e.FS.damage(e.Path, err)
	}
	return t, nil
}

// Xattrs returns the extended attributes (POSIX ACLs among them, as the kernel shows them).
func (e *Entry) Xattrs() ([]fsimage.Xattr, error) {
	xs, err := e.Node.Xattrs()
	if err != nil {
		return nil, e.FS.damage(e.Path, err)
	}
	slices.SortFunc(xs, func(a, b fsimage.Xattr) int { return strings.Compare(a.Name, b.Name) })
	return xs, nil
}

// ReadAt reads a regular file.
func (e *Entry) ReadAt(p []byte, off int64) (int, error) {
	n, err := e.Node.ReadAt(p, off)
	if err != nil && err != io.EOF {
		return n, e.FS.damage(e.Path, err)
	}
	return n, err
}

// Clean turns a user's path into the package's form: slash-separated, relative, no "."
// or "..". "/" and "" are the root.
func Clean(p string) (string, error) {
	var out []string
	for _, c := range strings.Split(p, "/") {
		switch c {
		case "", ".":
		case "..":
			return "", fmt.Errorf("path %q: \"..\" is not allowed; give the path from the volume's root", p)
		default:
			out = append(out, c)
		}
	}
	return strings.Join(out, "/"), nil
}

// Lookup finds a path. Symbolic links are not followed: a link in the middle of a path is
// an error, a link at its end is the link itself. On a partitioned volume, the first
// component names the partition and "" has no entry (see Filesystems).
func (v *Volume) Lookup(ctx context.Context, p string) (*Entry, error) {
	p, err := Clean(p)
	if err != nil {
		return nil, err
	}
	fss, err := v.Filesystems()
	if err != nil {
		return nil, err
	}
	f, rest := fss[0], p
	if f.name != "" {
		first, r, _ := strings.Cut(p, "/")
		i := slices.IndexFunc(fss, func(f *Filesystem) bool { return f.name == first })
		if i < 0 {
			names := make([]string, len(fss))
			for i, f := range fss {
				names[i] = f.name
			}
			return nil, fmt.Errorf("%s is a partitioned disk: start the path with a partition (%s): %w", v.Label(), strings.Join(names, ", "), ErrNotFound)
		}
		f, rest = fss[i], r
	}
	e, err := f.Root()
	if err != nil {
		return nil, err
	}
	for c := range strings.SplitSeq(rest, "/") {
		if c == "" {
			continue
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if !e.IsDir() {
			return nil, fmt.Errorf("%s:/%s is a %s, not a directory: %w", v.Label(), e.Path, e.Type(), ErrNotFound)
		}
		des, err := e.Node.ReadDir()
		if err != nil {
			return nil, f.damage(e.Path, err)
		}
		i := slices.IndexFunc(des, func(d fsimage.DirEntry) bool { return d.Name == c })
		if i < 0 {
			return nil, fmt.Errorf("%s:/%s: %w", v.Label(), path.Join(e.Path, c), ErrNotFound)
		}
		if e, err = f.entry(path.Join(e.Path, c), des[i].Ino); err != nil {
			return nil, err
		}
	}
	return e, nil
}

// Walk calls fn for e and everything under it, parents before children, names in order.
func Walk(ctx context.Context, e *Entry, fn func(*Entry) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := fn(e); err != nil || !e.IsDir() {
		return err
	}
	children, err := e.Children()
	if err != nil {
		return err
	}
	for _, c := range children {
		if err := Walk(ctx, c, fn); err != nil {
			return err
		}
	}
	return nil
}

// Roots returns the root directory of each filesystem of the volume (see Filesystems).
func (v *Volume) Roots() ([]*Entry, error) {
	fss, err := v.Filesystems()
	if err != nil {
		return nil, err
	}
	roots := make([]*Entry, len(fss))
	for i, f := range fss {
		if roots[i], err = f.Root(); err != nil {
			return nil, err
		}
	}
	return roots, nil
}

// Walk walks every filesystem of the volume.
func (v *Volume) Walk(ctx context.Context, fn func(*Entry) error) error {
	roots, err := v.Roots()
	if err != nil {
		return err
	}
	for _, root := range roots {
		if err := Walk(ctx, root, fn); err != nil {
			return err
		}
	}
	return nil
}

package files

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"github.com/stasis-project/stasis/chain/fsimage"
)

// RestoreOptions tune Restore.
type RestoreOptions struct {
	// Overwrite replaces existing files at the paths the snapshot holds (in place: other
	// files in existing directories are left alone). Without it an existing path is refused.
	Overwrite bool
	// Progress, if set, is called with the file bytes written so far.
	Progress func(bytes int64)
	// NoFlush returns without waiting for the restored files to reach stable storage, as
	// cp does: faster, but a crash soon after may lose or truncate them.
	NoFlush bool
}

// RestoreStats says what a restore did.
type RestoreStats struct {
	Files     int   `json:"files"`
	Dirs      int   `json:"dirs"`
	Symlinks  int   `json:"symlinks"`
	Hardlinks int   `json:"hardlinks"`
	Special   int   `json:"special"` // device nodes, FIFOs, sockets
	Bytes     int64 `json:"bytes_written"`
	// Owners is false when the restore ran without root: files belong to the caller.
	Owners bool `json:"owners_restored"`
	// Problems lists metadata that could not be set (an xattr the target filesystem
	// refuses...): the content is restored, that attribute is not.
	Problems []string `json:"problems"`
}

const maxProblems = 100

type restorer struct {
	ctx  context.Context
	opts RestoreOptions
	to   string
	// writers write files' data and metadata, several at once: a file is created (and
	// named) in tree order, then filled in the background.
	writers *errgroup.Group
	bytes   atomic.Int64

	mu    sync.Mutex // guards stats
	stats RestoreStats
	// links maps an inode with several names to where its first name was restored.
	links map[uint64]linked
}

// fileWriters is how many files are written at once: reading a chunk (disk, decompress,
// hash check) and writing it overlap across files.
var fileWriters = 2 * runtime.GOMAXPROCS(0)

type linked struct {
	base int    // directory fd the path is relative to
	rel  string // slash-separated
}

// Restore recreates e, and everything under it, inside the existing directory to, with
// owners (as root), modes, nanosecond times, xattrs and POSIX ACLs, symbolic links, hard
// links (as links, within what is restored), holes (as holes), device nodes, FIFOs and
// sockets. e's last path component is created inside to; a filesystem's root restores
// its contents into to. Nothing in to is followed: every path is opened relative to its
// parent with O_NOFOLLOW, so a symlink planted in the target cannot redirect a write.
//
// A new path appears only once complete: it is built in a temporary directory inside to
// and renamed into place, and removed if the restore fails. With Overwrite, existing
// paths are replaced in place.
func Restore(ctx context.Context, e *Entry, to string, opts RestoreOptions) (*RestoreStats, error) {
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(fileWriters)
	r := &restorer{ctx: gctx, opts: opts, to: to, writers: g, links: map[uint64]linked{}}
	r.stats.Owners = os.Geteuid() == 0
	r.stats.Problems = []string{}
	rootfd, err := unix.Open(to, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("restore target %s: %w (give an existing directory with --to)", to, err)
	}
	defer unix.Close(rootfd)
	var tops []*Entry
	if e.IsDir() && (e.Path == "" || e.Path == e.FS.name) {
		if tops, err = e.Children(); err != nil {
			return nil, err
		}
	} else {
		tops = []*Entry{e}
	}
	var fresh []*Entry
	isFresh := map[*Entry]bool{} // built in the temporary directory, then renamed into place
	for _, t := range tops {
		name := path.Base(t.Path)
		if _, err := lstatAt(rootfd, name); err == nil {
			if !opts.Overwrite {
				return nil, fmt.Errorf("%s already exists: restore into another directory, or pass --overwrite to replace what the snapshot holds", filepath.Join(to, name))
			}
		} else if errors.Is(err, unix.ENOENT) {
			fresh = append(fresh, t)
			isFresh[t] = true
		} else {
			return nil, fmt.Errorf("%s: %w", filepath.Join(to, name), err)
		}
	}
	tmpName := fmt.Sprintf(".stasis-restore-%d", os.Getpid())
	tmpfd := -1
	if len(fresh) > 0 {
		if err := unix.Mkdirat(rootfd, tmpName, 0o700); err != nil {
			return nil, fmt.Errorf("create a temporary directory in %s: %w", to, err)
		}
		if tmpfd, err = unix.Openat(rootfd, tmpName, unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_RDONLY|unix.O_CLOEXEC, 0); err != nil {
			unix.Unlinkat(rootfd, tmpName, unix.AT_REMOVEDIR)
			return nil, err
		}
		defer func() {
			unix.Close(tmpfd)
			os.RemoveAll(filepath.Join(to, tmpName)) // empty after success; a failure's partial tree otherwise
		}()
	}
	err = func() error {
		for _, t := range tops {
			name := path.Base(t.Path)
			base := rootfd
			if isFresh[t] {
				base = tmpfd
			}
			if err := r.entry(base, base, name, name, t); err != nil {
				return err
			}
		}
		return nil
	}()
	// A writer's failure cancels the walk: report the failure, not the cancellation.
	if werr := g.Wait(); werr != nil && (err == nil || errors.Is(err, context.Canceled)) {
		err = werr
	}
	r.stats.Bytes = r.bytes.Load()
	if err != nil {
		return &r.stats, err
	}
	// Directories' times were set after their entries were made; data written since
	// does not touch them.
	for _, t := range fresh {
		name := path.Base(t.Path)
		if err := unix.Renameat2(tmpfd, name, rootfd, name, unix.RENAME_NOREPLACE); err != nil {
			return &r.stats, fmt.Errorf("move the restored %s into place: %w", filepath.Join(to, name), err)
		}
		r.times(rootfd, name, name, t) // a directory moved to a new parent may have its times touched
	}
	if r.opts.NoFlush {
		return &r.stats, nil
	}
	if err := syncfs(rootfd); err != nil { // one flush for the whole tree, not one per file
		return &r.stats, fmt.Errorf("flush the restored files to %s: %w", to, err)
	}
	return &r.stats, nil
}

func lstatAt(dirfd int, name string) (*unix.Stat_t, error) {
	var st unix.Stat_t
	if err := unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return nil, err
	}
	return &st, nil
}

// where names a target path in messages.
func (r *restorer) where(rel string) string { return filepath.Join(r.to, filepath.FromSlash(rel)) }

func (r *restorer) problem(rel, what string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.stats.Problems) < maxProblems {
		r.stats.Problems = append(r.stats.Problems, fmt.Sprintf("%s: %s: %v", r.where(rel), what, err))
	}
}

// entry restores e as name in the directory dirfd; base and rel locate it for hard links.
func (r *restorer) entry(base, dirfd int, name, rel string, e *Entry) error {
	if err := r.ctx.Err(); err != nil {
		return err
	}
	typ := e.Attr.Mode & fsimage.S_IFMT
	reuseDir := false
	if r.opts.Overwrite {
		if st, err := lstatAt(dirfd, name); err == nil {
			isDir := st.Mode&unix.S_IFMT == unix.S_IFDIR
			switch {
			case isDir && typ == fsimage.S_IFDIR:
				reuseDir = true
			case isDir:
				return fmt.Errorf("%s is a directory and the snapshot has a %s there: move it away first (--overwrite replaces files, never directories)", r.where(rel), e.Type())
			default:
				if err := unix.Unlinkat(dirfd, name, 0); err != nil {
					return fmt.Errorf("replace %s: %w", r.where(rel), err)
				}
			}
		}
	}
	switch typ {
	case fsimage.S_IFDIR:
		return r.dir(base, dirfd, name, rel, e, reuseDir)
	case fsimage.S_IFREG:
		if e.Attr.Nlink > 1 {
			if first, ok := r.links[e.Ino]; ok {
				return r.link(first, dirfd, name, rel)
			}
		}
		if err := r.file(dirfd, name, rel, e); err != nil {
			return err
		}
		if e.Attr.Nlink > 1 {
			r.links[e.Ino] = linked{base: base, rel: rel}
		}
		return nil
	case fsimage.S_IFLNK:
		target, err := e.Readlink()
		if err != nil {
			return err
		}
		if err := unix.Symlinkat(target, dirfd, name); err != nil {
			return fmt.Errorf("create %s: %w", r.where(rel), err)
		}
		r.count(&r.stats.Symlinks)
		r.meta(-1, dirfd, name, rel, e)
		return nil
	default: // devices, FIFOs, sockets
		if err := unix.Mknodat(dirfd, name, typ|0o600, int(decodeDev(e.Attr.Rdev))); err != nil {
			if errors.Is(err, unix.EPERM) && (typ == fsimage.S_IFCHR || typ == fsimage.S_IFBLK) {
				r.problem(rel, "device node not created (only root can)", err) // the rest goes on
				return nil
			}
			return fmt.Errorf("create %s %s: %w", e.Type(), r.where(rel), err)
		}
		r.count(&r.stats.Special)
		r.meta(-1, dirfd, name, rel, e)
		return nil
	}
}

func (r *restorer) dir(base, dirfd int, name, rel string, e *Entry, reuse bool) error {
	if !reuse {
		if err := unix.Mkdirat(dirfd, name, 0o700); err != nil {
			return fmt.Errorf("create %s: %w", r.where(rel), err)
		}
	}
	fd, err := unix.Openat(dirfd, name, unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", r.where(rel), err)
	}
	defer unix.Close(fd)
	children, err := e.Children()
	if err != nil {
		return err
	}
	for _, c := range children {
		cname := path.Base(c.Path)
		if err := r.entry(base, fd, cname, rel+"/"+cname, c); err != nil {
			return err
		}
	}
	r.count(&r.stats.Dirs)
	r.meta(fd, dirfd, name, rel, e) // after the children, which change its times
	return nil
}

// file creates a regular file, then writes its data (skipping holes) and metadata in
// the background.
func (r *restorer) file(dirfd int, name, rel string, e *Entry) error {
	fd, err := unix.Openat(dirfd, name, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("create %s: %w", r.where(rel), err)
	}
	parent, err := unix.Dup(dirfd) // for the metadata calls made through the parent
	if err != nil {
		unix.Close(fd)
		return err
	}
	r.writers.Go(func() error {
		defer unix.Close(fd)
		defer unix.Close(parent)
		if err := r.fill(fd, rel, e); err != nil {
			return err
		}
		r.count(&r.stats.Files)
		r.meta(fd, parent, name, rel, e)
		return nil
	})
	return nil
}

// fill writes a file's data, skipping its holes, with the chunks of the next megabytes
// loading meanwhile.
func (r *restorer) fill(fd int, rel string, e *Entry) error {
	size := int64(e.Attr.Size)
	segs, ok, err := e.Segments()
	if err != nil {
		return err
	}
	if !ok {
		segs = []Segment{{Off: 0, Len: size, Phys: -1}}
	}
	var bufp *[]byte // taken only for bytes that cannot come straight from the cache
	defer func() {
		if bufp != nil {
			restorePool.Put(bufp)
		}
	}()
	buffer := func() []byte {
		if bufp == nil {
			bufp = restorePool.Get().(*[]byte)
		}
		return *bufp
	}
	ahead := int64(0) // file offset up to which chunks were asked for
	for _, s := range segs {
		if ok && s.Hole() {
			continue
		}
		for off := s.Off; off < s.Off+s.Len; {
			if err := r.ctx.Err(); err != nil {
				return err
			}
			if ok {
				for ahead < min(off+readWindow, s.Off+s.Len) { // within this extent
					ahead = max(ahead, off)
					n := min(restoreUnit, s.Off+s.Len-ahead)
					e.FS.prefetch(s.Phys+ahead-s.Off, n)
					ahead += n
				}
			}
			l := min(restoreUnit, s.Off+s.Len-off)
			if err := r.copyOut(fd, rel, e, s, off, l, buffer); err != nil {
				return err
			}
			off += l
			if done := r.bytes.Add(l); r.opts.Progress != nil {
				r.opts.Progress(done)
			}
		}
	}
	if err := unix.Ftruncate(fd, size); err != nil {
		return fmt.Errorf("set the size of %s: %w", r.where(rel), err)
	}
	// A large file is flushed by its writer, in parallel with the other writers' reads;
	// small ones (and directories, renames) by the one syncfs at the end.
	if size >= flushAlone && !r.opts.NoFlush {
		if err := fdatasync(fd); err != nil {
			return fmt.Errorf("flush %s: %w", r.where(rel), err)
		}
	}
	return nil
}

// copyOut writes the l bytes at offset off of e (inside segment s, a real segment when
// s.Phys >= 0) to fd: straight from the image cache when it can, through a buffer of at
// least l bytes from buffer otherwise.
func (r *restorer) copyOut(fd int, rel string, e *Entry, s Segment, off, l int64, buffer func() []byte) error {
	at := off
	write := func(b []byte) error {
		if _, err := unix.Pwrite(fd, b, at); err != nil {
			return fmt.Errorf("write %s: %w", r.where(rel), err)
		}
		at += int64(len(b))
		return nil
	}
	if s.Phys >= 0 {
		if done, err := e.FS.visit(e.Path, s.Phys+off-s.Off, l, write); done || err != nil {
			return err
		}
	}
	buf := buffer()[:l]
	if err := readFull(e, buf, off); err != nil {
		return err
	}
	return write(buf)
}

// The flushes, a seam for tests.
var syncfs, fdatasync = unix.Syncfs, unix.Fdatasync

// flushAlone is the size from which a restored file is flushed on its own.
const flushAlone = 1 << 20

// readWindow is how far ahead of its writes a file's chunks are loaded.
const readWindow = 4 << 20

// restoreUnit is how much of a file is read and written at a time.
const restoreUnit = 1 << 20

var restorePool = sync.Pool{New: func() any { b := make([]byte, restoreUnit); return &b }}

func (r *restorer) count(n *int) {
	r.mu.Lock()
	*n++
	r.mu.Unlock()
}

// link makes name another name of an inode restored earlier.
func (r *restorer) link(first linked, dirfd int, name, rel string) error {
	dir, last := path.Split(first.rel)
	fd, err := openDirBeneath(first.base, strings.TrimSuffix(dir, "/"))
	if err != nil {
		return fmt.Errorf("hard link %s: %w", r.where(rel), err)
	}
	defer func() {
		if fd != first.base {
			unix.Close(fd)
		}
	}()
	if err := unix.Linkat(fd, last, dirfd, name, 0); err != nil {
		return fmt.Errorf("hard link %s: %w", r.where(rel), err)
	}
	r.count(&r.stats.Hardlinks)
	return nil
}

// openDirBeneath opens a directory path relative to base, following no symlink.
func openDirBeneath(base int, rel string) (int, error) {
	fd := base
	for c := range strings.SplitSeq(rel, "/") {
		if c == "" {
			continue
		}
		next, err := unix.Openat(fd, c, unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if fd != base {
			unix.Close(fd)
		}
		if err != nil {
			return -1, err
		}
		fd = next
	}
	return fd, nil
}

// meta sets owner, mode, xattrs and times, in that order: chown clears set-id bits, and
// setting an ACL adjusts the mode's group bits to the ACL's mask, which chmod would
// override. fd is the open file or directory, or -1 for links and special files, which are
// changed through their parent without following them.
func (r *restorer) meta(fd, dirfd int, name, rel string, e *Entry) {
	a := e.Attr
	isLink := a.Mode&fsimage.S_IFMT == fsimage.S_IFLNK
	if r.stats.Owners {
		if err := unix.Fchownat(dirfd, name, int(a.UID), int(a.GID), unix.AT_SYMLINK_NOFOLLOW); err != nil {
			r.problem(rel, "owner", err)
		}
	}
	if !isLink {
		var err error
		if fd >= 0 {
			err = unix.Fchmod(fd, a.Mode&0o7777)
		} else {
			err = unix.Fchmodat(dirfd, name, a.Mode&0o7777, 0)
		}
		if err != nil {
			r.problem(rel, "mode", err)
		}
	}
	xs, err := e.Xattrs()
	if err != nil {
		r.problem(rel, "xattrs", err)
	}
	for _, x := range xs {
		if fd >= 0 {
			err = unix.Fsetxattr(fd, x.Name, x.Value, 0)
		} else {
			// The parent is an open descriptor: only the last component is looked up, unfollowed.
			err = unix.Lsetxattr(fmt.Sprintf("/proc/self/fd/%d/%s", dirfd, name), x.Name, x.Value, 0)
		}
		if err != nil {
			r.problem(rel, "xattr "+x.Name, err)
		}
	}
	r.times(dirfd, name, rel, e)
}

func (r *restorer) times(dirfd int, name, rel string, e *Entry) {
	ts := []unix.Timespec{unix.NsecToTimespec(e.Attr.Atime.UnixNano()), unix.NsecToTimespec(e.Attr.Mtime.UnixNano())}
	if err := unix.UtimesNanoAt(dirfd, name, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		r.problem(rel, "times", err)
	}
}

// decodeDev turns the readers' device number (the kernel's 32-bit encoding, as FUSE takes
// it) into a dev_t for mknod.
func decodeDev(rdev uint32) uint64 {
	major := (rdev & 0xfff00) >> 8
	minor := (rdev & 0xff) | ((rdev >> 12) & 0xfff00)
	return unix.Mkdev(major, minor)
}

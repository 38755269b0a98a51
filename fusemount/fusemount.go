// Package fusemount shows a repository's snapshots as a read-only FUSE filesystem:
//
//	MOUNTPOINT/<volume>/<snapshot>/      the snapshot's files (ext4 or XFS), or part1/, part2/...
//	MOUNTPOINT/<volume>/<snapshot>.img   the raw volume image, readable at any offset
//	MOUNTPOINT/<volume>/<snapshot>.json  the snapshot's manifest (consistency, binlog position...)
//	MOUNTPOINT/<volume>/latest           symlink to the newest snapshot's folder
//
// Snapshot contents never change, so the kernel caches them (keep-cache, long entry and
// attribute timeouts); the lists of volumes and snapshots are re-read at most once a
// second, so new snapshots appear and deleted ones disappear without remounting. Reads go
// through one bounded chunk cache shared by every open file; nothing serialises them.
package fusemount

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	lru "github.com/hashicorp/golang-lru/v2"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/image"
)

// Options configure a mount.
type Options struct {
	// AllowOther lets other local users in; default_permissions is then always on, so each
	// sees only what the snapshot's permissions allow.
	AllowOther bool
	// Volume, if set, shows only that volume ("VOLUME" of this host, "HOST:VOLUME" of another).
	Volume string
	Log    *slog.Logger

	listEvery time.Duration // how often the snapshot list is re-read; listTTL if zero (tests set it)
}

const (
	listTTL     = time.Second     // volumes and snapshot lists
	listTimeout = time.Minute     // for one re-read of the snapshot list
	listRetry   = 5 * time.Second // after a failed one
	contentTTL  = 24 * time.Hour  // immutable snapshot content
	cacheBytes  = 16 << 20        // decompressed chunks shared by all open files
)

// view is the state shared by every node of one mount.
type view struct {
	repo *chain.Reader
	opts Options

	cache   *image.Cache
	loaders chan struct{}                  // background chunk loads in flight, for all files
	states  *lru.Cache[string, *snapState] // by snapshot ID

	mu sync.Mutex // guards states

	listMu  sync.Mutex // held across a re-read: the requests waiting share its result
	snaps   []*chain.Snapshot
	fetched time.Time // when snaps was read
	failed  time.Time // when a re-read last failed, since snaps was read
	listErr error     // why
}

// state returns the shared content state of snapshot s.
func (v *view) state(s *chain.Snapshot) *snapState {
	v.mu.Lock()
	defer v.mu.Unlock()
	if st, ok := v.states.Get(s.ID); ok {
		return st
	}
	st := &snapState{v: v, snap: s, img: image.NewReader(v.repo.SnapshotReader(s), v.cache, v.loaders)}
	v.states.Add(s.ID, st)
	return st
}

// list returns the snapshots, re-reading the repository at most once per listTTL. When the
// re-read fails it returns the previous list with the error: good enough to show, not to
// say that a name does not exist. After a failure the next re-read waits listRetry, so
// that while the storage is unreachable lookups do not each wait out its timeouts.
//
// The re-read is shared by every request waiting on it, so it does not stop when the one
// that started it is interrupted: the kernel interrupts a request whenever its caller gets
// a signal (every Go program gets SIGURG to preempt goroutines), and giving up there made a
// lookup answer "no such file" for a snapshot committed after the previous listing.
func (v *view) list(ctx context.Context) ([]*chain.Snapshot, error) {
	v.listMu.Lock()
	defer v.listMu.Unlock()
	every := v.opts.listEvery
	if every == 0 {
		every = listTTL
	}
	if time.Since(v.fetched) < every {
		return v.snaps, nil
	}
	if time.Since(v.failed) < listRetry {
		return v.snaps, v.listErr
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), listTimeout)
	defer cancel()
	snaps, _, err := v.repo.Snapshots(ctx)
	if err != nil {
		v.opts.Log.Warn("cannot list snapshots; showing the previous list", "err", err, "retry_in", listRetry)
		v.failed, v.listErr = time.Now(), err
		return v.snaps, err
	}
	v.failed, v.listErr = time.Time{}, nil
	var out []*chain.Snapshot
	for _, s := range snaps {
		if v.opts.Volume == "" || v.folder(s) == v.opts.Volume {
			out = append(out, s)
		}
	}
	v.snaps, v.fetched = out, time.Now()
	return out, nil
}

// folder names s's volume folder: VOLUME for this host's snapshots, HOST:VOLUME for another
// host's in a shared repository (as the CLI names them).
func (v *view) folder(s *chain.Snapshot) string {
	if s.Host == "" || s.Host == v.repo.Host() {
		return s.Volume
	}
	return s.Host + ":" + s.Volume
}

func ino(parts ...string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(strings.Join(parts, "/")))
	return h.Sum64() | 1<<63 // clear of the root's and go-fuse's automatic numbers
}

type rootNode struct {
	fs.Inode
	v *view
}

var (
	_ fs.NodeReaddirer = (*rootNode)(nil)
	_ fs.NodeLookuper  = (*rootNode)(nil)
)

func (r *rootNode) volumes(ctx context.Context) ([]string, error) {
	seen := map[string]bool{}
	var out []string
	snaps, err := r.v.list(ctx)
	for _, s := range snaps {
		if f := r.v.folder(s); !seen[f] {
			seen[f] = true
			out = append(out, f)
		}
	}
	return out, err
}

// notFound is a lookup's answer for a name not in the list: ENOENT only when the list is
// current; when it could not be re-read, the name may exist, so EIO (the log says why).
func notFound(listErr error) syscall.Errno {
	if listErr != nil {
		return syscall.EIO
	}
	return syscall.ENOENT
}

func (r *rootNode) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	var es []fuse.DirEntry
	vols, _ := r.volumes(ctx) // the previous list if it cannot be re-read; the log says why
	for _, vol := range vols {
		es = append(es, fuse.DirEntry{Name: vol, Mode: fuse.S_IFDIR, Ino: ino(vol)})
	}
	return fs.NewListDirStream(es), 0
}

func (r *rootNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	vols, err := r.volumes(ctx)
	for _, vol := range vols {
		if vol == name {
			out.SetEntryTimeout(listTTL)
			out.SetAttrTimeout(listTTL)
			out.Mode = fuse.S_IFDIR | 0o555
			out.Nlink = 2
			return r.NewInode(ctx, &volumeNode{v: r.v, volume: name}, fs.StableAttr{Mode: fuse.S_IFDIR, Ino: ino(name)}), 0
		}
	}
	return nil, notFound(err)
}

type volumeNode struct {
	fs.Inode
	v      *view
	volume string
}

var (
	_ fs.NodeReaddirer = (*volumeNode)(nil)
	_ fs.NodeLookuper  = (*volumeNode)(nil)
	_ fs.NodeGetattrer = (*volumeNode)(nil)
)

func (n *volumeNode) snapshots(ctx context.Context) ([]*chain.Snapshot, error) {
	var out []*chain.Snapshot
	snaps, err := n.v.list(ctx)
	for _, s := range snaps {
		if n.v.folder(s) == n.volume {
			out = append(out, s)
		}
	}
	return out, err
}

func (n *volumeNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = fuse.S_IFDIR | 0o555
	out.Nlink = 2
	out.SetTimeout(listTTL)
	return 0
}

func (n *volumeNode) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	snaps, _ := n.snapshots(ctx) // the previous list if it cannot be re-read; the log says why
	var es []fuse.DirEntry
	for _, s := range snaps {
		es = append(es, fuse.DirEntry{Name: s.Name, Mode: fuse.S_IFDIR, Ino: ino(n.volume, s.ID, "dir")},
			fuse.DirEntry{Name: s.Name + ".img", Mode: fuse.S_IFREG, Ino: ino(n.volume, s.ID)},
			fuse.DirEntry{Name: s.Name + ".json", Mode: fuse.S_IFREG, Ino: ino(n.volume, s.ID, "json")})
	}
	if len(snaps) > 0 {
		es = append(es, fuse.DirEntry{Name: "latest", Mode: fuse.S_IFLNK, Ino: ino(n.volume, "latest")})
	}
	return fs.NewListDirStream(es), 0
}

func (n *volumeNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	snaps, err := n.snapshots(ctx)
	if name == "latest" && len(snaps) > 0 {
		target := snaps[len(snaps)-1].Name
		out.SetEntryTimeout(listTTL)
		out.SetAttrTimeout(listTTL)
		out.Mode = fuse.S_IFLNK | 0o777
		out.Nlink = 1
		out.Size = uint64(len(target))
		t := snaps[len(snaps)-1].Created
		out.SetTimes(&t, &t, &t)
		// The target changes as snapshots land: a new inode per target.
		return n.NewInode(ctx, &fs.MemSymlink{Data: []byte(target), Attr: out.Attr}, fs.StableAttr{Mode: fuse.S_IFLNK, Ino: ino(n.volume, "latest", target)}), 0
	}
	for _, s := range snaps {
		if s.Name == name {
			d := &snapshotDir{snapState: n.v.state(s)}
			var a fuse.AttrOut
			d.Getattr(ctx, nil, &a)
			out.Attr = a.Attr
			out.SetEntryTimeout(listTTL) // so a deleted snapshot disappears
			out.SetAttrTimeout(contentTTL)
			return n.NewInode(ctx, d, fs.StableAttr{Mode: fuse.S_IFDIR, Ino: ino(n.volume, s.ID, "dir")}), 0
		}
		if s.Name+".json" == name {
			b, _ := json.MarshalIndent(manifestView(s), "", "  ")
			b = append(b, '\n')
			out.SetEntryTimeout(listTTL)
			out.SetAttrTimeout(contentTTL)
			out.Mode = fuse.S_IFREG | 0o444
			out.Nlink = 1
			out.Size = uint64(len(b))
			t := s.Created
			out.SetTimes(&t, &t, &t)
			return n.NewInode(ctx, &fs.MemRegularFile{Data: b, Attr: fuse.Attr{Mode: 0o444, Mtime: uint64(t.Unix())}},
				fs.StableAttr{Mode: fuse.S_IFREG, Ino: ino(n.volume, s.ID, "json")}), 0
		}
		if s.Name+".img" == name {
			img := &imageNode{v: n.v, snap: s, img: n.v.state(s).img}
			img.fill(&out.Attr)
			out.SetEntryTimeout(listTTL) // so a deleted snapshot disappears
			out.SetAttrTimeout(contentTTL)
			return n.NewInode(ctx, img, fs.StableAttr{Mode: fuse.S_IFREG, Ino: ino(n.volume, s.ID)}), 0
		}
	}
	return nil, notFound(err)
}

// manifestView is what <snapshot>.json shows: the manifest with its ID.
func manifestView(s *chain.Snapshot) any {
	return struct {
		ID string `json:"id"`
		*chain.Snapshot
	}{s.ID, s}
}

// imageNode is a snapshot's raw volume image.
type imageNode struct {
	fs.Inode
	v    *view
	snap *chain.Snapshot
	img  *image.Reader
}

var (
	_ fs.NodeGetattrer = (*imageNode)(nil)
	_ fs.NodeOpener    = (*imageNode)(nil)
	_ fs.NodeReader    = (*imageNode)(nil)
)

func (n *imageNode) fill(a *fuse.Attr) {
	// The raw volume holds every file, root's own included: only root may read it, even
	// when other users are let into the view to read what the files' permissions allow.
	a.Mode = fuse.S_IFREG | 0o400
	a.Nlink = 1
	a.Size = uint64(n.snap.SizeBytes)
	a.Blocks = (a.Size + 511) / 512
	t := n.snap.Created
	a.SetTimes(&t, &t, &t)
}

func (n *imageNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.fill(&out.Attr)
	out.SetTimeout(contentTTL)
	return 0
}

func (n *imageNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&(syscall.O_WRONLY|syscall.O_RDWR) != 0 {
		return nil, 0, syscall.EROFS
	}
	return nil, fuse.FOPEN_KEEP_CACHE, 0
}

func (n *imageNode) Read(ctx context.Context, f fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off >= n.snap.SizeBytes {
		return fuse.ReadResultData(nil), 0
	}
	if end := off + int64(len(dest)); end > n.snap.SizeBytes {
		dest = dest[:n.snap.SizeBytes-off]
	}
	pr := pinnedPool.Get().(*pinnedResult)
	if err := n.img.Pin(off, int64(len(dest)), &pr.Pinned); err != nil {
		pr.Done()
		// Never wrong bytes: a damaged chunk is an I/O error for this read, logged.
		n.v.opts.Log.Error("read from snapshot failed", "volume", n.snap.Volume, "snapshot", n.snap.Name, "offset", off, "err", err)
		return nil, syscall.EIO
	}
	return pr, 0
}

// Mounted is a served mount.
type Mounted struct {
	server *fuse.Server
	dir    string
}

// ErrInsideRepository refuses a mount point inside a local repository.
var ErrInsideRepository = errors.New("mount point is inside the repository")

// Mount serves repo read-only at dir. repoDir, if not empty, is the local repository's
// directory, which the mount point must not be inside.
func Mount(repo *chain.Reader, repoDir, dir string, opts Options) (*Mounted, error) {
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	absDir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if st, err := os.Stat(absDir); err != nil {
		return nil, fmt.Errorf("mount point %s: %w; create the directory first (mkdir -p %s)", dir, err, absDir)
	} else if !st.IsDir() {
		return nil, fmt.Errorf("mount point %s is not a directory", dir)
	}
	if fstype, ok := MountedAt(absDir); ok && fstype == "fuse.stasis" {
		return nil, fmt.Errorf("%s already serves snapshots (another stasis mount); `stasis umount %s` first", dir, dir)
	}
	if repoDir != "" {
		absRepo, _ := filepath.Abs(repoDir)
		if absDir == absRepo || strings.HasPrefix(absDir, absRepo+"/") {
			return nil, fmt.Errorf("%s: %w %s; choose a directory outside it", dir, ErrInsideRepository, repoDir)
		}
	}
	states, _ := lru.New[string, *snapState](32)
	v := &view{repo: repo, opts: opts, cache: image.NewCache(cacheBytes), states: states, loaders: make(chan struct{}, 2*runtime.GOMAXPROCS(0))}
	entry, attr := listTTL, listTTL
	mo := fuse.MountOptions{
		FsName: "stasis", Name: "stasis",
		// Read-only twice over: the kernel refuses writes, and no node has write methods.
		Options:    []string{"ro", "default_permissions"},
		AllowOther: opts.AllowOther,
		// POSIX ACLs in snapshots are enforced by the kernel, as on the live system.
		EnableAcl: true,
		// Large reads: fewer round trips per sequential megabyte.
		MaxWrite:     1 << 20,
		MaxReadAhead: 1 << 20,
	}
	server, err := fs.Mount(absDir, &rootNode{v: v}, &fs.Options{MountOptions: mo, EntryTimeout: &entry, AttrTimeout: &attr})
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w (FUSE needs /dev/fuse, usable by this user, and fusermount3 from the fuse3 package; `stasis doctor` checks both)", dir, err)
	}
	raiseReadahead(absDir, opts.Log)
	return &Mounted{server: server, dir: absDir}, nil
}

// MountedAt returns the filesystem type mounted at dir (absolute), if something is.
func MountedAt(dir string) (fstype string, ok bool) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", false
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		// id parent major:minor root mountpoint options [optional...] - fstype source super
		if len(f) < 7 || unescapeMount(f[4]) != dir {
			continue
		}
		for i := 6; i < len(f)-1; i++ {
			if f[i] == "-" {
				fstype, ok = f[i+1], true // the last mount at dir is the visible one
				break
			}
		}
	}
	return fstype, ok
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, "\\") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var c byte
			if _, err := fmt.Sscanf(s[i+1:i+4], "%o", &c); err == nil {
				b.WriteByte(c)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Users lists the processes using something under dir (open files, working directories,
// roots): what keeps an unmount busy.
func Users(dir string) []string {
	procs, _ := filepath.Glob("/proc/[0-9]*")
	var out []string
	under := func(p string) bool { return p == dir || strings.HasPrefix(p, dir+"/") }
	for _, proc := range procs {
		links := []string{filepath.Join(proc, "cwd"), filepath.Join(proc, "root")}
		fds, _ := filepath.Glob(filepath.Join(proc, "fd", "*"))
		links = append(links, fds...)
		for _, l := range links {
			if t, err := os.Readlink(l); err == nil && under(t) {
				comm, _ := os.ReadFile(filepath.Join(proc, "comm"))
				out = append(out, fmt.Sprintf("pid %s (%s)", filepath.Base(proc), strings.TrimSpace(string(comm))))
				break
			}
		}
	}
	return out
}

// readaheadKB is the kernel readahead for the mount. FUSE starts at 128 KiB, which keeps
// one or two reads in flight: too few to decompress on every core while the disk works.
const readaheadKB = 4096

// raiseReadahead sets the mount's backing-device readahead (root only; without it reads
// are just slower).
func raiseReadahead(dir string, log *slog.Logger) {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return
	}
	p := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	if err := os.WriteFile(p, []byte(fmt.Sprint(readaheadKB)), 0); err != nil {
		log.Debug("cannot raise the mount's readahead", "path", p, "err", err)
	}
}

// Wait blocks until the filesystem is unmounted (by Unmount or `umount`).
func (m *Mounted) Wait() { m.server.Wait() }

// ErrBusy means files are open under the mount.
var ErrBusy = errors.New("mount is busy")

// Unmount unmounts; with files open it fails with ErrBusy and keeps serving.
func (m *Mounted) Unmount() error {
	if err := m.server.Unmount(); err != nil {
		if errors.Is(err, syscall.EBUSY) || strings.Contains(err.Error(), "busy") {
			return fmt.Errorf("%s: %w: files are open under it (see `fuser -m %s`); close them and stop again", m.dir, ErrBusy, m.dir)
		}
		return err
	}
	return nil
}

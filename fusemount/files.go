package fusemount

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	lru "github.com/hashicorp/golang-lru/v2"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/fsimage"
	"github.com/stasis-project/stasis/chain/fsimage/filesystems"
	"github.com/stasis-project/stasis/chain/image"
)

// volumeFS is one filesystem inside a snapshot (the whole image or one partition),
// opened on first access.
type volumeFS struct {
	v     *view
	label string // "data/before-upgrade" or "data/before-upgrade/part2", for logs
	base  uint64 // mixes the snapshot and partition into inode numbers
	img   *image.Reader
	start int64       // where the filesystem starts in img
	dev   io.ReaderAt // img from start on
	size  int64

	once     sync.Once
	fsys     fsimage.FS
	rootNode fsimage.Inode // parsed once with the filesystem
	err      error

	// Directory listings, by inode, a bounded number of them: `ls -l` reads a directory and
	// then looks up every name in it, which must not parse the directory twice.
	dirs *lru.Cache[uint64, *listing]
}

// listing is a parsed directory: in order for readdir, by name for lookup.
type listing struct {
	entries []fsimage.DirEntry
	byName  map[string]uint64
}

func newVolumeFS(v *view, label string, img *image.Reader, start, size int64) *volumeFS {
	h := fnv.New64a()
	h.Write([]byte(label))
	dirs, _ := lru.New[uint64, *listing](64)
	var dev io.ReaderAt = img
	if start != 0 || size != img.Size() {
		dev = io.NewSectionReader(img, start, size)
	}
	return &volumeFS{v: v, label: label, base: h.Sum64(), img: img, start: start, dev: dev, size: size, dirs: dirs}
}

func (m *volumeFS) open() (fsimage.FS, error) {
	m.once.Do(func() {
		m.fsys, m.err = filesystems.Open(m.dev, m.size)
		if m.err != nil {
			m.v.opts.Log.Error("cannot read the filesystem in a snapshot; its raw image is there to loop-mount", "snapshot", m.label, "err", m.err)
			return
		}
		if m.rootNode, m.err = m.fsys.Open(m.fsys.Root()); m.err != nil {
			m.v.opts.Log.Error("cannot read the root directory of a snapshot", "snapshot", m.label, "err", m.err)
		}
	})
	return m.fsys, m.err
}

// fuseIno is the inode number the mount shows: unique across snapshots and partitions,
// equal for hard links.
func (m *volumeFS) fuseIno(ino uint64) uint64 {
	return (m.base+ino*0x9E3779B97F4A7C15)&^(1<<63) | 1<<62
}

// errno turns a reader error into what the caller sees, logging damage: never a panic,
// never wrong bytes.
func (m *volumeFS) errno(what string, ino uint64, err error) syscall.Errno {
	if errors.Is(err, fsimage.ErrNotFound) {
		return syscall.ENOENT
	}
	m.v.opts.Log.Error("cannot read from a snapshot", "snapshot", m.label, "op", what, "inode", ino, "err", err)
	return syscall.EIO
}

func (m *volumeFS) listing(ino uint64, node fsimage.Inode) (*listing, error) {
	if l, ok := m.dirs.Get(ino); ok {
		return l, nil
	}
	es, err := node.ReadDir()
	if err != nil {
		return nil, err
	}
	l := &listing{entries: es, byName: make(map[string]uint64, len(es))}
	for _, e := range es {
		l.byName[e.Name] = e.Ino
	}
	m.dirs.Add(ino, l)
	return l, nil
}

// lookup resolves name in directory ino (parsed as dir) and makes the child's node.
func (m *volumeFS) lookup(ctx context.Context, parent *fs.Inode, ino uint64, dir fsimage.Inode, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	l, err := m.listing(ino, dir)
	if err != nil {
		return nil, m.errno("readdir", ino, err)
	}
	child, ok := l.byName[name]
	if !ok {
		return nil, syscall.ENOENT
	}
	node, err := m.fsys.Open(child)
	if err != nil {
		return nil, m.errno("lookup "+name, child, err)
	}
	a := node.Attr()
	m.fill(&out.Attr, child, a)
	out.SetEntryTimeout(contentTTL)
	out.SetAttrTimeout(contentTTL)
	return parent.NewInode(ctx, &fileNode{m: m, ino: child, node: node}, fs.StableAttr{Mode: a.Mode & fsimage.S_IFMT, Ino: m.fuseIno(child)}), 0
}

func (m *volumeFS) readdir(ino uint64, dir fsimage.Inode) (fs.DirStream, syscall.Errno) {
	l, err := m.listing(ino, dir)
	if err != nil {
		return nil, m.errno("readdir", ino, err)
	}
	out := make([]fuse.DirEntry, len(l.entries))
	for i, e := range l.entries {
		out[i] = fuse.DirEntry{Name: e.Name, Ino: m.fuseIno(e.Ino)}
	}
	return fs.NewListDirStream(out), 0
}

// root opens the filesystem and returns its root directory.
func (m *volumeFS) root() (fsimage.Inode, syscall.Errno) {
	if _, err := m.open(); err != nil {
		return nil, syscall.EIO
	}
	return m.rootNode, 0
}

func (m *volumeFS) lookupRoot(ctx context.Context, parent *fs.Inode, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	node, errno := m.root()
	if errno != 0 {
		return nil, errno
	}
	return m.lookup(ctx, parent, m.fsys.Root(), node, name, out)
}

func (m *volumeFS) readdirRoot() (fs.DirStream, syscall.Errno) {
	node, errno := m.root()
	if errno != 0 {
		return nil, errno
	}
	return m.readdir(m.fsys.Root(), node)
}

// fillFolder describes one of the view's own read-only folders.
func fillFolder(out *fuse.Attr, created time.Time) {
	out.Mode = fuse.S_IFDIR | 0o555
	out.Nlink = 2
	out.SetTimes(&created, &created, &created)
}

// fillRootDir describes a folder that shows this filesystem: its root directory's owner,
// mode and times, or, while it cannot be read, a plain read-only folder of the snapshot's
// time.
func (m *volumeFS) fillRootDir(out *fuse.Attr, created time.Time) {
	fillFolder(out, created)
	if node, errno := m.root(); errno == 0 {
		m.fill(out, m.fsys.Root(), node.Attr())
	}
}

func (m *volumeFS) fill(out *fuse.Attr, ino uint64, a fsimage.Attr) {
	out.Ino = m.fuseIno(ino)
	out.Mode = a.Mode
	out.Nlink = a.Nlink
	out.Owner = fuse.Owner{Uid: a.UID, Gid: a.GID}
	out.Size = a.Size
	out.Blocks = a.Blocks
	out.Rdev = a.Rdev
	out.Blksize = 4096
	out.SetTimes(&a.Atime, &a.Mtime, &a.Ctime)
}

// fileNode is any file, directory or link inside a snapshot's filesystem.
type fileNode struct {
	fs.Inode
	m    *volumeFS
	ino  uint64
	node fsimage.Inode
}

var (
	_ fs.NodeGetattrer   = (*fileNode)(nil)
	_ fs.NodeLookuper    = (*fileNode)(nil)
	_ fs.NodeReaddirer   = (*fileNode)(nil)
	_ fs.NodeOpener      = (*fileNode)(nil)
	_ fs.NodeReader      = (*fileNode)(nil)
	_ fs.NodeReadlinker  = (*fileNode)(nil)
	_ fs.NodeGetxattrer  = (*fileNode)(nil)
	_ fs.NodeListxattrer = (*fileNode)(nil)
)

func (n *fileNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.m.fill(&out.Attr, n.ino, n.node.Attr())
	out.SetTimeout(contentTTL)
	return 0
}

func (n *fileNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return n.m.lookup(ctx, &n.Inode, n.ino, n.node, name, out)
}

func (n *fileNode) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	return n.m.readdir(n.ino, n.node)
}

func (n *fileNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC) != 0 {
		return nil, 0, syscall.EROFS
	}
	return nil, fuse.FOPEN_KEEP_CACHE, 0
}

func (n *fileNode) Read(ctx context.Context, f fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if r, ok, err := n.m.pin(n.node, off, int64(len(dest))); ok {
		if err != nil {
			return nil, n.m.errno("read", n.ino, err)
		}
		return r, 0
	}
	got, err := n.node.ReadAt(dest, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, n.m.errno("read", n.ino, err)
	}
	// A vector goes to /dev/fuse with one writev: go-fuse would try to splice plain
	// data through a pipe too small for a 1 MiB read, and log each failure.
	return fuse.ReadResultVector([][]byte{dest[:got]}), 0
}

func (n *fileNode) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	t, err := n.node.Readlink()
	if err != nil {
		return nil, n.m.errno("readlink", n.ino, err)
	}
	return []byte(t), 0
}

// pin maps n bytes of a regular file at off to the image and holds them in the chunk
// cache for a reply written straight from it: no copy into go-fuse's buffer. ok is false
// when the file cannot be read that way (data in the inode, an image shown with its
// journal replayed, more pieces than one writev takes) and ReadAt must copy.
func (m *volumeFS) pin(node fsimage.Inode, off, n int64) (r fuse.ReadResult, ok bool, err error) {
	mapper, isMapper := node.(fsimage.Mapper)
	if replayer, replays := m.fsys.(fsimage.Replayer); !isMapper || replays && replayer.Replayed() {
		return nil, false, nil
	}
	end := min(off+n, int64(min(node.Attr().Size, 1<<62)))
	if off < 0 || off >= end {
		return fuse.ReadResultData(nil), true, nil
	}
	pr := pinnedPool.Get().(*pinnedResult)
	for off < end {
		phys, k, err := fsimage.MapWithin(mapper, off, m.size)
		if errors.Is(err, fsimage.ErrNotMapped) {
			pr.Done()
			return nil, false, nil
		}
		k = min(k, end-off)
		if err == nil && phys >= 0 {
			err = m.img.Pin(m.start+phys, k, &pr.Pinned)
		}
		if err != nil {
			pr.Done()
			return nil, true, err
		}
		for z := k; phys < 0 && z > 0; z -= int64(len(holeZeros)) { // a hole
			pr.Vecs = append(pr.Vecs, holeZeros[:min(z, int64(len(holeZeros)))])
		}
		if len(pr.Vecs) > maxPieces { // a fragmented file: a copy is one piece
			pr.Done()
			return nil, false, nil
		}
		off += k
	}
	return pr, true, nil
}

// maxPieces bounds the pieces of one reply: writev takes at most 1,024 (UIO_MAXIOV), and a
// reply go-fuse cannot write leaves the reader waiting. A 1 MiB read of 64 KiB chunks is 16.
const maxPieces = 512

// holeZeros is what holes read as.
var holeZeros = make([]byte, 128<<10)

// pinnedResult is a read's reply held in the chunk cache: go-fuse writes its pieces to
// /dev/fuse with one writev (it never tries to splice a result with Slices) and then calls
// Done, which lets the cache reuse them.
type pinnedResult struct{ chain.Pinned }

var pinnedPool = sync.Pool{New: func() any { return new(pinnedResult) }}

func (r *pinnedResult) Size() int { return r.Len() }

func (r *pinnedResult) Slices() ([][]byte, fuse.Status) { return r.Vecs, fuse.OK }

func (r *pinnedResult) Bytes(buf []byte) ([]byte, fuse.Status) {
	buf = buf[:0]
	for _, v := range r.Vecs {
		buf = append(buf, v...)
	}
	return buf, fuse.OK
}

func (r *pinnedResult) Done() {
	r.Release()
	pinnedPool.Put(r)
}

// visibleXattrs lists the attributes the caller may see: trusted.* only for root, as the
// kernel shows them only to CAP_SYS_ADMIN on the live filesystem.
func (n *fileNode) visibleXattrs(ctx context.Context) ([]fsimage.Xattr, syscall.Errno) {
	xs, err := n.node.Xattrs()
	if err != nil {
		return nil, n.m.errno("xattrs", n.ino, err)
	}
	if caller, ok := fuse.FromContext(ctx); ok && caller.Uid == 0 {
		return xs, 0
	}
	out := xs[:0:0]
	for _, x := range xs {
		if !strings.HasPrefix(x.Name, "trusted.") {
			out = append(out, x)
		}
	}
	return out, 0
}

func (n *fileNode) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	xs, errno := n.visibleXattrs(ctx)
	if errno != 0 {
		return 0, errno
	}
	for _, x := range xs {
		if x.Name == attr {
			if len(dest) < len(x.Value) {
				return uint32(len(x.Value)), syscall.ERANGE
			}
			return uint32(copy(dest, x.Value)), 0
		}
	}
	return 0, syscall.ENODATA
}

func (n *fileNode) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	xs, errno := n.visibleXattrs(ctx)
	if errno != 0 {
		return 0, errno
	}
	var b strings.Builder
	for _, x := range xs {
		b.WriteString(x.Name)
		b.WriteByte(0)
	}
	if len(dest) < b.Len() {
		return uint32(b.Len()), syscall.ERANGE
	}
	return uint32(copy(dest, b.String())), 0
}

// snapState is what a mount knows about one snapshot's content: its image, and the
// filesystems in it once someone looked. Kept per snapshot ID (a bounded number) so the
// parse survives the short-lived directory entries of the snapshot list.
type snapState struct {
	v    *view
	snap *chain.Snapshot
	img  *image.Reader

	once  sync.Once
	whole *volumeFS   // the image is one filesystem
	parts []*volumeFS // or a partition table; parts[i] is names[i]
	names []string
	err   error
}

func (d *snapState) open() error {
	d.once.Do(func() {
		label := d.snap.Volume + "/" + d.snap.Name
		parts, err := fsimage.Partitions(d.img, d.img.Size())
		if err != nil {
			d.err = err
			d.v.opts.Log.Error("cannot read the partition table of a snapshot", "snapshot", label, "err", err)
			return
		}
		if len(parts) == 0 {
			d.whole = newVolumeFS(d.v, label, d.img, 0, d.img.Size())
			return
		}
		for _, p := range parts {
			name := fmt.Sprintf("part%d", p.Index)
			d.names = append(d.names, name)
			d.parts = append(d.parts, newVolumeFS(d.v, label+"/"+name, d.img, p.Start, p.Size))
		}
	})
	return d.err
}

// snapshotDir is MOUNTPOINT/<volume>/<snapshot>/: the snapshot's filesystem, or part1/,
// part2/, ... for a partitioned image. Nothing is parsed until someone looks inside.
type snapshotDir struct {
	fs.Inode
	*snapState
}

var (
	_ fs.NodeGetattrer = (*snapshotDir)(nil)
	_ fs.NodeLookuper  = (*snapshotDir)(nil)
	_ fs.NodeReaddirer = (*snapshotDir)(nil)
)

func (d *snapshotDir) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	if d.open() == nil && d.whole != nil {
		d.whole.fillRootDir(&out.Attr, d.snap.Created)
	} else {
		fillFolder(&out.Attr, d.snap.Created)
	}
	out.SetTimeout(contentTTL)
	return 0
}

func (d *snapshotDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if d.open() != nil {
		return nil, syscall.EIO
	}
	if d.whole != nil {
		return d.whole.lookupRoot(ctx, &d.Inode, name, out)
	}
	for i, n := range d.names {
		if n == name {
			pd := &partitionDir{m: d.parts[i], created: d.snap.Created}
			pd.fill(&out.Attr)
			out.SetEntryTimeout(contentTTL)
			out.SetAttrTimeout(contentTTL)
			return d.NewInode(ctx, pd, fs.StableAttr{Mode: fuse.S_IFDIR, Ino: out.Ino}), 0
		}
	}
	return nil, syscall.ENOENT
}

func (d *snapshotDir) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	if d.open() != nil {
		return nil, syscall.EIO
	}
	if d.whole != nil {
		return d.whole.readdirRoot()
	}
	var es []fuse.DirEntry
	for i, n := range d.names {
		es = append(es, fuse.DirEntry{Name: n, Mode: fuse.S_IFDIR, Ino: d.parts[i].fuseIno(0)})
	}
	return fs.NewListDirStream(es), 0
}

// partitionDir is part<N>/ of a partitioned snapshot: that partition's filesystem.
type partitionDir struct {
	fs.Inode
	m       *volumeFS
	created time.Time // the snapshot's
}

var (
	_ fs.NodeGetattrer = (*partitionDir)(nil)
	_ fs.NodeLookuper  = (*partitionDir)(nil)
	_ fs.NodeReaddirer = (*partitionDir)(nil)
)

func (p *partitionDir) fill(out *fuse.Attr) {
	out.Ino = p.m.fuseIno(0)
	p.m.fillRootDir(out, p.created)
}

func (p *partitionDir) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	p.fill(&out.Attr)
	out.SetTimeout(contentTTL)
	return 0
}

func (p *partitionDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return p.m.lookupRoot(ctx, &p.Inode, name, out)
}

func (p *partitionDir) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	return p.m.readdirRoot()
}

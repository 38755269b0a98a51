package testenv

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stasis-project/stasis/chain/fsimage"
)

// TreeEntry is everything the ground-truth tests compare about one path.
type TreeEntry struct {
	Mode     uint32 // type and permission bits
	UID, GID uint32
	Size     int64
	Mtime    int64 // nanoseconds
	Nlink    uint32
	Link     string            // symlink target
	Xattrs   map[string]string // name → hex value
	Hash     string            // content of regular files
	LinkedTo string            // first path (in walk order) with the same inode
}

// Tree maps slash-separated relative paths ("" is the root) to entries.
type Tree map[string]TreeEntry

// ScanTree describes the directory tree at dir as the kernel shows it.
func ScanTree(t testing.TB, dir string) Tree {
	t.Helper()
	tree := Tree{}
	seen := map[uint64]string{}
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		rel = filepath.ToSlash(rel)
		if rel == "." {
			rel = ""
		}
		var st syscall.Stat_t
		if err := syscall.Lstat(p, &st); err != nil {
			return err
		}
		e := TreeEntry{Mode: st.Mode, UID: st.Uid, GID: st.Gid, Size: st.Size, Mtime: st.Mtim.Nano(), Nlink: uint32(st.Nlink)}
		if st.Mode&syscall.S_IFMT == syscall.S_IFDIR {
			e.Size = 0 // directory sizes are the filesystem's business, not content
		}
		if first, ok := seen[st.Ino]; ok && st.Mode&syscall.S_IFMT != syscall.S_IFDIR {
			e.LinkedTo = first
		} else {
			seen[st.Ino] = rel
		}
		switch st.Mode & syscall.S_IFMT {
		case syscall.S_IFLNK:
			e.Link, err = os.Readlink(p)
		case syscall.S_IFREG:
			e.Hash, err = hashReader(func() (io.ReadCloser, error) { return os.Open(p) })
		}
		if err != nil {
			return err
		}
		e.Xattrs, err = listXattrs(p)
		tree[rel] = e
		return err
	})
	if err != nil {
		t.Fatalf("scan %s: %v", dir, err)
	}
	return tree
}

func hashReader(open func() (io.ReadCloser, error)) (string, error) {
	r, err := open()
	if err != nil {
		return "", err
	}
	defer r.Close()
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func listXattrs(p string) (map[string]string, error) {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		if err == unix.ENOTSUP {
			return nil, nil
		}
		return nil, fmt.Errorf("listxattr %s: %w", p, err)
	}
	out := map[string]string{}
	for _, name := range strings.Split(string(buf[:n]), "\x00") {
		if name == "" {
			continue
		}
		v := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, name, v)
		if err != nil {
			return nil, fmt.Errorf("getxattr %s %s: %w", p, name, err)
		}
		out[name] = hex.EncodeToString(v[:m])
	}
	if len(out) == 0 {
		return nil, nil
	}
	return out, nil
}

// ScanFS describes the tree a filesystem reader shows, in the same terms as ScanTree.
func ScanFS(t testing.TB, fsys fsimage.FS) Tree {
	t.Helper()
	tree := Tree{}
	seen := map[uint64]string{}
	var walk func(rel string, ino uint64)
	walk = func(rel string, ino uint64) {
		n, err := fsys.Open(ino)
		if err != nil {
			t.Fatalf("open %q (inode %d): %v", rel, ino, err)
		}
		a := n.Attr()
		e := TreeEntry{Mode: a.Mode, UID: a.UID, GID: a.GID, Size: int64(a.Size), Mtime: a.Mtime.UnixNano(), Nlink: a.Nlink}
		if first, ok := seen[ino]; ok && a.Mode&fsimage.S_IFMT != fsimage.S_IFDIR {
			e.LinkedTo = first
		} else {
			seen[ino] = rel
		}
		xs, err := n.Xattrs()
		if err != nil {
			t.Fatalf("xattrs of %q: %v", rel, err)
		}
		for _, x := range xs {
			if e.Xattrs == nil {
				e.Xattrs = map[string]string{}
			}
			e.Xattrs[x.Name] = hex.EncodeToString(x.Value)
		}
		switch a.Mode & fsimage.S_IFMT {
		case fsimage.S_IFDIR:
			e.Size = 0
			es, err := n.ReadDir()
			if err != nil {
				t.Fatalf("readdir %q: %v", rel, err)
			}
			sort.Slice(es, func(i, j int) bool { return es[i].Name < es[j].Name })
			tree[rel] = e
			for _, c := range es {
				walk(path.Join(rel, c.Name), c.Ino)
			}
			return
		case fsimage.S_IFLNK:
			if e.Link, err = n.Readlink(); err != nil {
				t.Fatalf("readlink %q: %v", rel, err)
			}
		case fsimage.S_IFREG:
			e.Hash, err = hashReader(func() (io.ReadCloser, error) {
				return io.NopCloser(io.NewSectionReader(n, 0, int64(a.Size))), nil
			})
			if err != nil {
				t.Fatalf("read %q: %v", rel, err)
			}
		}
		tree[rel] = e
	}
	walk("", fsys.Root())
	return tree
}

// CompareTrees fails the test with the first differences between want and got.
func CompareTrees(t testing.TB, want, got Tree) {
	t.Helper()
	var diffs []string
	for p, w := range want {
		g, ok := got[p]
		if !ok {
			diffs = append(diffs, fmt.Sprintf("%q missing", p))
			continue
		}
		if ws, gs := fmt.Sprintf("%+v", w), fmt.Sprintf("%+v", g); ws != gs {
			diffs = append(diffs, fmt.Sprintf("%q:\n  want %s\n  got  %s", p, ws, gs))
		}
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			diffs = append(diffs, fmt.Sprintf("%q should not exist", p))
		}
	}
	if len(want) < 2 {
		diffs = append(diffs, "the reference tree is empty: nothing was compared")
	}
	sort.Strings(diffs)
	if len(diffs) > 0 {
		if len(diffs) > 15 {
			diffs = append(diffs[:15], fmt.Sprintf("... and %d more", len(diffs)-15))
		}
		t.Fatalf("%d of %d paths differ:\n%s", len(diffs), len(want), strings.Join(diffs, "\n"))
	}
}

// TrickyTree describes the content BuildTrickyTree writes.
type TrickyTree struct {
	BigFile    int64 // size of big.bin (0: none)
	DirEntries int   // files in many/
	// Striped is the size of striped.bin (0: none): data in every other 4 KiB block, a
	// hole in each other one, so one extent per 4 KiB of data (12 MiB makes 1,536: an
	// ext4 extent tree of depth 2, an XFS extent btree).
	Striped int64
}

// BuildTrickyTree writes a tree that exercises a filesystem reader: sparse, empty, tiny
// (inline-data sized) and big files, a large directory, hard links, short and long
// symlinks, xattrs small and large, Unicode names, owners, odd modes, nanosecond times.
func BuildTrickyTree(t testing.TB, dir string, opt TrickyTree) {
	t.Helper()
	rng := rand.New(rand.NewSource(42))
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	write := func(rel string, data []byte, mode os.FileMode) string {
		p := filepath.Join(dir, rel)
		must(os.MkdirAll(filepath.Dir(p), 0o755))
		must(os.WriteFile(p, data, mode))
		must(os.Chmod(p, mode))
		return p
	}
	write("empty", nil, 0o644)
	write("tiny.txt", []byte("forty bytes of inline data, or so.....\n"), 0o644)
	write("small.txt", []byte(strings.Repeat("a line of text that repeats\n", 5)), 0o640)
	write("docs/readme.md", []byte("# hello\n"), 0o644)
	text := make([]byte, 300<<10)
	for i := range text {
		text[i] = "abcdefghij klmnop\n"[rng.Intn(18)]
	}
	write("docs/text.txt", text, 0o644)
	write("Ünïcödé/日本語のファイル.txt", []byte("こんにちは\n"), 0o644)
	write("Ünïcödé/emoji-😀.txt", []byte("smile\n"), 0o644)
	secret := write("secret/root-only.key", []byte("top secret\n"), 0o600)
	must(os.Chmod(filepath.Dir(secret), 0o755))
	write("public/readable.txt", []byte("anyone may read this\n"), 0o644)
	owned := write("owned-by-1234", []byte("owned\n"), 0o4755)
	must(os.Lchown(owned, 1234, 5678))

	// Sparse: data islands in a 64 MiB file, holes between and at the end.
	sp, err := os.Create(filepath.Join(dir, "sparse.bin"))
	must(err)
	for _, off := range []int64{0, 5 << 20, 5<<20 + 70000, 33 << 20} {
		b := make([]byte, 12345)
		rng.Read(b)
		_, err := sp.WriteAt(b, off)
		must(err)
	}
	must(sp.Truncate(64 << 20))
	must(sp.Close())

	if opt.Striped > 0 {
		st, err := os.Create(filepath.Join(dir, "striped.bin"))
		must(err)
		b := make([]byte, 4096)
		for off := int64(0); off < opt.Striped; off += 2 * 4096 {
			rng.Read(b)
			_, err := st.WriteAt(b, off)
			must(err)
		}
		must(st.Truncate(opt.Striped))
		must(st.Close())
	}

	if opt.BigFile > 0 {
		bf, err := os.Create(filepath.Join(dir, "big.bin"))
		must(err)
		buf := make([]byte, 1<<20)
		for done := int64(0); done < opt.BigFile; done += int64(len(buf)) {
			rng.Read(buf[:len(buf)/2]) // half random, half text: compresses somewhat
			copy(buf[len(buf)/2:], text)
			n := min(int64(len(buf)), opt.BigFile-done)
			_, err := bf.Write(buf[:n])
			must(err)
		}
		must(bf.Close())
	}
	for i := 0; i < opt.DirEntries; i++ {
		write(fmt.Sprintf("many/entry-%05d", i), nil, 0o644)
	}

	must(os.Link(filepath.Join(dir, "docs/readme.md"), filepath.Join(dir, "hardlink-to-readme")))
	must(os.Link(filepath.Join(dir, "docs/readme.md"), filepath.Join(dir, "Ünïcödé/another-link")))
	must(os.Symlink("docs/readme.md", filepath.Join(dir, "short-link")))
	long := strings.Repeat("a-very-long-directory-name/", 12) + "target"
	must(os.Symlink(long, filepath.Join(dir, "long-link")))
	must(os.Symlink("/nonexistent/dangling", filepath.Join(dir, "dangling-link")))
	must(os.MkdirAll(filepath.Join(dir, "deep/a/b/c/d/e"), 0o750))
	write("deep/a/b/c/d/e/bottom.txt", []byte("bottom\n"), 0o644)
	must(syscall.Mkfifo(filepath.Join(dir, "fifo"), 0o644))

	xa := filepath.Join(dir, "with-xattrs.txt")
	write("with-xattrs.txt", []byte("has attributes\n"), 0o644)
	must(unix.Setxattr(xa, "user.short", []byte("v"), 0))
	must(unix.Setxattr(xa, "user.comment", []byte("a longer comment value"), 0))
	big := make([]byte, 700)
	rng.Read(big)
	must(unix.Setxattr(xa, "user.big", big, 0)) // does not fit in the inode
	must(unix.Setxattr(filepath.Join(dir, "docs"), "user.on-a-dir", []byte("yes"), 0))
	must(unix.Lsetxattr(filepath.Join(dir, "short-link"), "trusted.on-a-link", []byte("t"), 0))

	// Distinct nanosecond times, last so nothing above touches them again.
	base := time.Date(2024, 2, 29, 12, 34, 56, 123456789, time.UTC)
	i := 0
	must(filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		i++
		ts := []unix.Timespec{unix.NsecToTimespec(base.UnixNano()), unix.NsecToTimespec(base.Add(time.Duration(i) * 1001 * time.Millisecond).UnixNano())}
		return unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW)
	}))
}

// PopulateWithKernel mounts the filesystem image img, copies src (if any) into it with cp -a and
// adds what only the kernel writes: unwritten (preallocated) ranges, a file in hundreds of
// extents, xattrs too big for the inode or many of them, an ACL, and (where the
// filesystem can) a reflinked copy. Then it unmounts.
func PopulateWithKernel(t testing.TB, img, src string) {
	t.Helper()
	mnt := Mount(t, img, "-o", "loop")
	if src != "" {
		Run(t, "cp", "-a", src+"/.", mnt)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	un := filepath.Join(mnt, "unwritten.bin")
	Run(t, "fallocate", "-l", "3M", un)
	f, err := os.OpenFile(un, os.O_WRONLY, 0)
	must(err)
	_, err = f.WriteAt([]byte("written in the middle of preallocated space"), 1<<20+17)
	must(err)
	must(f.Close())

	f, err = os.Create(filepath.Join(mnt, "fragmented.bin"))
	must(err)
	for i := int64(0); i < 300; i++ {
		_, err := f.WriteAt([]byte(fmt.Sprintf("island %d\n", i)), i*64<<10)
		must(err)
		must(f.Sync()) // one allocation per island
	}
	must(f.Close())

	xa := filepath.Join(mnt, "many-xattrs")
	must(os.WriteFile(xa, []byte("x\n"), 0o644))
	for i := 0; i < 20; i++ {
		must(unix.Setxattr(xa, fmt.Sprintf("user.attribute-number-%02d", i), []byte(strings.Repeat("v", i*2)), 0))
	}
	var st unix.Statfs_t
	must(unix.Statfs(mnt, &st))
	if st.Type == unix.XFS_SUPER_MAGIC { // ext4 keeps all of an inode's xattrs in one block
		must(unix.Setxattr(xa, "user.remote", []byte(strings.Repeat("remote value ", 700)), 0))
	}
	must(unix.Setxattr(xa, "security.label", []byte("secret-label"), 0))

	acl := filepath.Join(mnt, "with-acl")
	must(os.WriteFile(acl, []byte("acl\n"), 0o640))
	SetACL(t, acl, 1234, 4)

	if _, err := os.Stat(filepath.Join(mnt, "big.bin")); err == nil {
		Run(t, "cp", "--reflink=auto", filepath.Join(mnt, "big.bin"), filepath.Join(mnt, "big-copy.bin"))
	}
	Run(t, "umount", mnt)
}

// SetACL gives path the access ACL user::rw- user:UID:PERM group::r-- mask::PERM other::---
// (PERM in rwx bits, 4 = r--), written as the kernel's system.posix_acl_access xattr.
func SetACL(t testing.TB, path string, uid uint32, perm uint16) {
	t.Helper()
	le := binary.LittleEndian
	v := le.AppendUint32(nil, 2)
	for _, e := range [][3]uint32{{0x01, 6, 0xFFFFFFFF}, {0x02, uint32(perm), uid}, {0x04, 4, 0xFFFFFFFF}, {0x10, uint32(perm | 4), 0xFFFFFFFF}, {0x20, 0, 0xFFFFFFFF}} {
		v = le.AppendUint16(le.AppendUint16(v, uint16(e[0])), uint16(e[1]))
		v = le.AppendUint32(v, e[2])
	}
	if err := unix.Setxattr(path, "system.posix_acl_access", v, 0); err != nil {
		t.Fatalf("set an ACL on %s: %v", path, err)
	}
}

// GarbageImage creates a file of size pseudo-random bytes: a filesystem made on it has
// stale non-zero data in every block it has not written, so a reader that shows
// unwritten or freed space instead of zeros is caught.
func GarbageImage(t testing.TB, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rng := rand.New(rand.NewSource(size))
	buf := make([]byte, 1<<20)
	for done := int64(0); done < size; done += int64(len(buf)) {
		rng.Read(buf)
		if _, err := f.Write(buf[:min(int64(len(buf)), size-done)]); err != nil {
			t.Fatal(err)
		}
	}
}

package files

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/fsimage"
)

// fakeFS is a directory graph, as a hostile image could describe one.
type fakeFS map[uint64][]fsimage.DirEntry

func (f fakeFS) Type() string { return "fake" }
func (f fakeFS) Root() uint64 { return 1 }
func (f fakeFS) Open(ino uint64) (fsimage.Inode, error) {
	if _, ok := f[ino]; !ok {
		return fakeFile(ino), nil
	}
	return fakeDir{f, ino}, nil
}

type fakeDir struct {
	fs  fakeFS
	ino uint64
}

func (d fakeDir) Attr() fsimage.Attr                { return fsimage.Attr{Ino: d.ino, Mode: fsimage.S_IFDIR | 0o755} }
func (d fakeDir) ReadAt([]byte, int64) (int, error) { return 0, errors.New("a directory") }
func (d fakeDir) ReadDir() ([]fsimage.DirEntry, error) {
	return append([]fsimage.DirEntry(nil), d.fs[d.ino]...), nil
}
func (d fakeDir) Readlink() (string, error)        { return "", errors.New("a directory") }
func (d fakeDir) Xattrs() ([]fsimage.Xattr, error) { return nil, nil }

type fakeFile uint64

func (f fakeFile) Attr() fsimage.Attr {
	return fsimage.Attr{Ino: uint64(f), Mode: fsimage.S_IFREG | 0o644}
}
func (f fakeFile) ReadAt([]byte, int64) (int, error)    { return 0, nil }
func (f fakeFile) ReadDir() ([]fsimage.DirEntry, error) { return nil, errors.New("a file") }
func (f fakeFile) Readlink() (string, error)            { return "", errors.New("a file") }
func (f fakeFile) Xattrs() ([]fsimage.Xattr, error)     { return nil, nil }

func fakeRoot(t *testing.T, fsys fakeFS) *Entry {
	t.Helper()
	f := &Filesystem{vol: &Volume{snap: &chain.Snapshot{Volume: "v", Name: "s"}}}
	f.once.Do(func() { f.fs = fsys })
	root, err := f.Root()
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// TestHostileDirectoryGraphs: a directory that contains its ancestor, one listed in two
// directories, and names that would leave the restore target end a walk with a corruption
// error instead of looping, taking for ever or escaping.
func TestHostileDirectoryGraphs(t *testing.T) {
	// Forty levels of a directory listed twice in the one above: 2^40 paths to walk.
	diamonds := fakeFS{}
	for i := uint64(1); i <= 40; i++ {
		diamonds[i] = []fsimage.DirEntry{{Name: "a", Ino: i + 1}, {Name: "b", Ino: i + 1}}
	}
	diamonds[41] = nil
	for name, fsys := range map[string]fakeFS{
		"cycle":    {1: {{Name: "a", Ino: 2}}, 2: {{Name: "b", Ino: 3}}, 3: {{Name: "up", Ino: 2}}},
		"self":     {1: {{Name: "me", Ino: 1}}},
		"shared":   {1: {{Name: "a", Ino: 2}, {Name: "b", Ino: 2}}, 2: {{Name: "f", Ino: 9}}},
		"diamonds": diamonds,
		"dotdot":   {1: {{Name: "..", Ino: 5}}},
		"slash":    {1: {{Name: "a/../../etc", Ino: 5}}},
		"emptyish": {1: {{Name: "", Ino: 5}}},
	} {
		t.Run(name, func(t *testing.T) {
			visited := 0
			err := Walk(context.Background(), fakeRoot(t, fsys), func(*Entry) error {
				if visited++; visited > 1000 {
					return errors.New("still walking")
				}
				return nil
			})
			if !errors.Is(err, fsimage.ErrCorrupt) {
				t.Fatalf("walk ended with %v after %d entries, want a corruption error", err, visited)
			}
		})
	}
	// A file with two names (a hard link) is fine, and so is walking a tree twice.
	links := fakeFS{1: {{Name: "a", Ino: 2}, {Name: "b", Ino: 9}}, 2: {{Name: "f", Ino: 9}}}
	root := fakeRoot(t, links)
	for range 2 {
		var paths []string
		if err := Walk(context.Background(), root, func(e *Entry) error { paths = append(paths, e.Path); return nil }); err != nil {
			t.Fatal(err)
		}
		if len(paths) != 4 {
			t.Fatalf("walked %v", paths)
		}
	}
}

func TestCleanAndMatch(t *testing.T) {
	for in, want := range map[string]string{"": "", "/": "", "/etc//x/": "etc/x", "./a/./b": "a/b"} {
		if got, err := Clean(in); err != nil || got != want {
			t.Errorf("Clean(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := Clean("/etc/../root"); err == nil {
		t.Error(`Clean accepted ".."`)
	}
	for _, c := range []struct {
		pattern, path string
		want          bool
	}{
		{"*.conf", "etc/nginx/nginx.conf", true},
		{"*.conf", "etc/nginx", false},
		{"/etc/*.conf", "etc/a.conf", true},
		{"/etc/*.conf", "etc/sub/a.conf", false},
		{"etc/*/a.conf", "etc/sub/a.conf", true},
		{"*", "", false}, // the root has no name
		{"[", "x", false},
	} {
		if got := Match(c.pattern, c.path); got != c.want {
			t.Errorf("Match(%q, %q) = %v", c.pattern, c.path, got)
		}
	}
}

// bigFile is a regular file of 2 MiB of 'x'.
type bigFile struct{ fakeFile }

const bigSize = 2 << 20

func (f bigFile) Attr() fsimage.Attr {
	a := f.fakeFile.Attr()
	a.Size = bigSize
	return a
}

func (f bigFile) ReadAt(p []byte, off int64) (int, error) {
	n := max(0, min(int64(len(p)), bigSize-off))
	for i := range p[:n] {
		p[i] = 'x'
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

type withBig struct{ fakeFS }

func (w withBig) Open(ino uint64) (fsimage.Inode, error) {
	if ino == 7 {
		return bigFile{fakeFile(7)}, nil
	}
	return w.fakeFS.Open(ino)
}

// TestRestoreFlushes: a restore flushes a large file by itself and the rest with one
// syncfs before it returns; with NoFlush it does neither, and restores the same files.
func TestRestoreFlushes(t *testing.T) {
	defer func(s, d func(int) error) { syncfs, fdatasync = s, d }(syncfs, fdatasync)
	var fsFlushes, fileFlushes int
	syncfs = func(fd int) error { fsFlushes++; return unix.Syncfs(fd) }
	fdatasync = func(fd int) error { fileFlushes++; return unix.Fdatasync(fd) }
	for _, noFlush := range []bool{false, true} {
		fsFlushes, fileFlushes = 0, 0
		f := &Filesystem{vol: &Volume{snap: &chain.Snapshot{Volume: "v", Name: "s"}}}
		f.once.Do(func() {
			f.fs = withBig{fakeFS{1: {{Name: "d", Ino: 2}}, 2: {{Name: "big", Ino: 7}, {Name: "small", Ino: 8}}}}
		})
		root, err := f.Root()
		if err != nil {
			t.Fatal(err)
		}
		to := t.TempDir()
		if _, err := Restore(context.Background(), root, to, RestoreOptions{NoFlush: noFlush}); err != nil {
			t.Fatal(err)
		}
		if b, err := os.ReadFile(filepath.Join(to, "d", "big")); err != nil || len(b) != bigSize || b[bigSize-1] != 'x' {
			t.Fatalf("NoFlush %v: the big file restored as %d bytes (%v)", noFlush, len(b), err)
		}
		if want := map[bool][2]int{false: {1, 1}, true: {0, 0}}[noFlush]; [2]int{fileFlushes, fsFlushes} != want {
			t.Errorf("NoFlush %v: %d file flushes and %d syncfs, want %v", noFlush, fileFlushes, fsFlushes, want)
		}
	}
}

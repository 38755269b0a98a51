package e2e

import (
	"bytes"
	"errors"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stasis-project/stasis/test/testenv"
)

// TestMountImages serves a repository over real FUSE: images read back bit-exact at any
// offset, writes fail with EROFS, new snapshots appear and deleted ones go without a
// remount, an image loop-mounts to browse its files, and SIGTERM unmounts.
func TestMountImages(t *testing.T) {
	testenv.RequireRoot(t)
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	dir := t.TempDir()
	tree := filepath.Join(dir, "tree")
	os.MkdirAll(filepath.Join(tree, "docs"), 0o755)
	os.WriteFile(filepath.Join(tree, "docs", "note.txt"), []byte("hello from the past\n"), 0o644)
	src := filepath.Join(dir, "vol.img")
	testenv.Run(t, "mkfs.ext4", "-q", "-F", "-d", tree, src, "64M")
	repo := newRepo(t)
	testenv.MustStasis(t, "snapshot", "-r", repo, "--source", src, "--volume", "v", "--name", "a")
	want := testenv.HashFile(t, src, 0)

	mnt := filepath.Join(dir, "mnt")
	served := startMount(t, repo, mnt, "v/a.img")
	cmd := served.cmd
	img := filepath.Join(mnt, "v", "a.img")
	if testenv.HashFile(t, img, 0) != want {
		t.Fatal("the image read through the mount differs from the source")
	}
	// Random reads at odd offsets.
	srcData, _ := os.ReadFile(src)
	fi, _ := os.Open(img)
	rng := rand.New(rand.NewSource(1))
	for i := 0; i < 200; i++ {
		off := rng.Int63n(int64(len(srcData)) - 10000)
		n := 1 + rng.Intn(9999)
		buf := make([]byte, n)
		if _, err := fi.ReadAt(buf, off); err != nil || !bytes.Equal(buf, srcData[off:off+int64(n)]) {
			t.Fatalf("read of %d bytes at %d differs (%v)", n, off, err)
		}
	}
	fi.Close()
	if b, err := os.ReadFile(filepath.Join(mnt, "v", "a.json")); err != nil || !bytes.Contains(b, []byte(`"consistency": "crash"`)) || !bytes.Contains(b, []byte(`"id": "`)) {
		t.Fatalf("a.json: %s %v", b, err)
	}
	if target, err := os.Readlink(filepath.Join(mnt, "v", "latest")); err != nil || target != "a" {
		t.Fatalf("latest -> %q (%v)", target, err)
	}
	for _, op := range []func() error{
		func() error { return os.WriteFile(filepath.Join(mnt, "v", "new"), []byte("x"), 0o644) },
		func() error { _, err := os.OpenFile(img, os.O_WRONLY, 0); return err },
		func() error { return os.Remove(img) },
		func() error { return os.Chmod(img, 0o777) },
		func() error { return os.Mkdir(filepath.Join(mnt, "v", "d"), 0o755) },
	} {
		if err := op(); !errors.Is(err, syscall.EROFS) {
			t.Fatalf("a write operation in the view gave %v, want EROFS", err)
		}
	}
	// Browse the snapshot's files through a read-only loop mount of the image.
	browse := testenv.Mount(t, img, "-o", "ro,loop,noload")
	if b, err := os.ReadFile(filepath.Join(browse, "docs", "note.txt")); err != nil || string(b) != "hello from the past\n" {
		t.Fatalf("file in the snapshot: %q %v", b, err)
	}
	testenv.Run(t, "umount", browse)
	// A new snapshot appears, a deleted one disappears, without remounting.
	// New data, so the new snapshot's chunks are in an index file the mount has not seen.
	sf, _ := os.OpenFile(src, os.O_WRONLY, 0)
	noise := make([]byte, 3<<20)
	rng.Read(noise)
	sf.WriteAt(noise, 20<<20)
	sf.Close()
	wantB := testenv.HashFile(t, src, 0)
	testenv.MustStasis(t, "snapshot", "-r", repo, "--source", src, "--volume", "v", "--name", "b")
	testenv.MustStasis(t, "delete", "-r", repo, "v/a")
	testenv.MustStasis(t, "gc", "-r", repo) // repacks what the mount had located
	time.Sleep(2500 * time.Millisecond)     // the list is cached for a second
	if _, err := os.Stat(filepath.Join(mnt, "v", "b.img")); err != nil {
		t.Fatalf("new snapshot not shown: %v\nmount's log:\n%s", err, served.stderr)
	}
	if testenv.HashFile(t, filepath.Join(mnt, "v", "b.img"), 0) != wantB {
		t.Fatal("a snapshot committed after the mount started reads back wrong")
	}
	if _, err := os.Stat(img); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("deleted snapshot still shown: %v", err)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("mount exited with %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("mount did not exit on SIGTERM")
	}
	if exec.Command("mountpoint", "-q", mnt).Run() == nil {
		t.Fatal("still mounted after SIGTERM")
	}
	// Refused inside the repository.
	if r := testenv.Stasis(t, "mount", "-r", repo, filepath.Join(repo, "snapshots")); r.Code == 0 {
		t.Fatal("a mount point inside the repository was accepted")
	}
}

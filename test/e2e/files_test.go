package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stasis-project/stasis/test/testenv"
)

// served is a running `stasis mount`.
type served struct {
	cmd    *exec.Cmd
	stderr *bytes.Buffer
}

// serveMount runs `stasis mount` on mnt until the test ends and waits for want (a path
// relative to mnt) to appear. It returns the process's stderr so far.
func serveMount(t *testing.T, repo, mnt, want string, extra ...string) *bytes.Buffer {
	return startMount(t, repo, mnt, want, extra...).stderr
}

func startMount(t *testing.T, repo, mnt, want string, extra ...string) *served {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	os.MkdirAll(mnt, 0o755)
	cmd := exec.Command(testenv.Binary(t), append([]string{"mount", "-r", repo, mnt}, extra...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		exec.Command("fusermount3", "-uz", mnt).Run()
		cmd.Process.Kill()
		cmd.Wait()
	})
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Lstat(filepath.Join(mnt, want)); err == nil {
			return &served{cmd: cmd, stderr: &stderr}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the mount never showed %s\n%s", want, stderr.String())
		}
	}
}

// TestMountFilesGroundTruth builds ext4 and XFS images with tricky content (a 200 MB file,
// sparse files, a 20,000-entry directory, hard links, symlinks, xattrs, ACLs, Unicode,
// inline data, 0600 root files), snapshots them, and compares every path of the FUSE
// view with the kernel's own read-only mount of the same images. Then it checks that the
// view is read-only and that a non-root user sees only what permissions allow.
func TestMountFilesGroundTruth(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "mkfs.xfs")
	dir := t.TempDir()
	os.Chmod(dir, 0o755) // so the unprivileged user below can reach the mount point
	os.Chmod(filepath.Dir(dir), 0o755)
	src := filepath.Join(dir, "tree")
	testenv.BuildTrickyTree(t, src, testenv.TrickyTree{BigFile: 200 << 20, DirEntries: 20000, Striped: 12 << 20})
	repo := newRepo(t)
	images := map[string]string{}
	for _, fstype := range []string{"ext4", "xfs"} {
		img := filepath.Join(dir, fstype+".img")
		testenv.GarbageImage(t, img, 512<<20)
		if fstype == "ext4" {
			testenv.Run(t, "mkfs.ext4", "-q", "-F", "-T", "default", "-E", "nodiscard", "-O", "inline_data", "-d", src, img)
			testenv.PopulateWithKernel(t, img, "")
		} else {
			testenv.Run(t, "mkfs.xfs", "-q", "-f", "-K", img)
			testenv.PopulateWithKernel(t, img, src)
		}
		testenv.MustStasis(t, "snapshot", "-r", repo, "--source", img, "--volume", fstype, "--name", "s1")
		images[fstype] = img
	}
	mnt := filepath.Join(dir, "mnt")
	stderr := serveMount(t, repo, mnt, "xfs/s1.img", "--allow-other")
	defer func() {
		// 1 MiB reads of big.bin: nothing may be logged per read (go-fuse's failed splices were).
		if strings.Contains(stderr.String(), "splice") {
			t.Errorf("the mount logged while serving reads:\n%.2000s", stderr.String())
		}
	}()

	for fstype, img := range images {
		t.Run(fstype, func(t *testing.T) {
			opts := "ro,loop,noload"
			if fstype == "xfs" {
				opts = "ro,loop,norecovery"
			}
			kernel := testenv.Mount(t, img, "-o", opts)
			view := filepath.Join(mnt, fstype, "s1")
			testenv.CompareTrees(t, testenv.ScanTree(t, kernel), testenv.ScanTree(t, view))

			// Random access at any offset and length, against the kernel's bytes.
			for _, name := range []string{"big.bin", "sparse.bin", "striped.bin", "docs/text.txt"} {
				want, _ := os.ReadFile(filepath.Join(kernel, name))
				f, err := os.Open(filepath.Join(view, name))
				if err != nil {
					t.Fatal(err)
				}
				rng := rand.New(rand.NewSource(int64(len(want))))
				for i := 0; i < 300; i++ {
					off := rng.Int63n(int64(len(want)))
					buf := make([]byte, 1+rng.Intn(300<<10))
					n, _ := f.ReadAt(buf, off)
					if end := min(off+int64(len(buf)), int64(len(want))); n != int(end-off) || !bytes.Equal(buf[:n], want[off:end]) {
						t.Fatalf("%s: read of %d bytes at %d differs from the kernel's (%d bytes)", name, len(buf), off, n)
					}
				}
				f.Close()
			}

			// Read-only twice over: every kind of change fails with EROFS.
			file := filepath.Join(view, "docs", "readme.md")
			for what, op := range map[string]func() error{
				"write":    func() error { _, err := os.OpenFile(file, os.O_WRONLY, 0); return err },
				"create":   func() error { return os.WriteFile(filepath.Join(view, "new"), []byte("x"), 0o644) },
				"delete":   func() error { return os.Remove(file) },
				"rename":   func() error { return os.Rename(file, filepath.Join(view, "moved")) },
				"chmod":    func() error { return os.Chmod(file, 0o777) },
				"chown":    func() error { return os.Chown(file, 1, 1) },
				"mkdir":    func() error { return os.Mkdir(filepath.Join(view, "d"), 0o755) },
				"symlink":  func() error { return os.Symlink("x", filepath.Join(view, "l")) },
				"truncate": func() error { return os.Truncate(file, 0) },
				"setxattr": func() error { return unix.Setxattr(file, "user.x", []byte("y"), 0) },
			} {
				if err := op(); !errors.Is(err, syscall.EROFS) {
					t.Errorf("%s in the view gave %v, want EROFS", what, err)
				}
			}

			// Another local user: the 0600 root file is refused, a 0644 one is readable.
			asNobody := func(path string) (string, error) {
				out, err := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", path).CombinedOutput()
				return string(out), err
			}
			if out, err := asNobody(filepath.Join(view, "public", "readable.txt")); err != nil || out != "anyone may read this\n" {
				t.Fatalf("nobody cannot read a 0644 file through --allow-other: %v %q", err, out)
			}
			if out, err := asNobody(filepath.Join(view, "secret", "root-only.key")); err == nil || !strings.Contains(out, "Permission denied") {
				t.Fatalf("nobody read a 0600 root file through the view: %v %q", err, out)
			}
			// Nor through the raw image, which holds every file.
			if out, err := asNobody(view + ".img"); err == nil || !strings.Contains(out, "Permission denied") {
				t.Fatalf("nobody read the raw image through the view: %v %.80q", err, out)
			}
			if f, err := os.Open(view + ".img"); err != nil {
				t.Fatalf("root cannot read the raw image: %v", err)
			} else {
				f.Close()
			}
		})
	}
	if target, err := os.Readlink(filepath.Join(mnt, "xfs", "latest")); err != nil || target != "s1" {
		t.Fatalf("latest -> %q (%v), want s1", target, err)
	}
}

// TestMountPartitions: an image with a GPT holding ext4 and XFS shows part1/ and part2/,
// each equal to the kernel's mount of that partition.
func TestMountPartitions(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "sfdisk")
	testenv.RequireTool(t, "mkfs.xfs")
	dir := t.TempDir()
	src := filepath.Join(dir, "tree")
	testenv.BuildTrickyTree(t, src, testenv.TrickyTree{DirEntries: 500})
	img := filepath.Join(dir, "disk.img")
	testenv.GarbageImage(t, img, 700<<20)
	cmd := exec.Command("sfdisk", "-q", img)
	cmd.Stdin = strings.NewReader("label: gpt\nsize=300MiB\nsize=360MiB\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v\n%s", err, out)
	}
	disk := strings.TrimSpace(testenv.Run(t, "losetup", "-f", "-P", "--show", img))
	t.Cleanup(func() { exec.Command("losetup", "-d", disk).Run() })
	for i := 0; i < 50; i++ {
		if _, err := os.Stat(disk + "p2"); err == nil {
			break
		}
		exec.Command("partx", "-a", disk).Run()
		time.Sleep(100 * time.Millisecond)
	}
	testenv.Run(t, "mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-d", src, disk+"p1")
	testenv.Run(t, "mkfs.xfs", "-q", "-f", "-K", disk+"p2")
	testenv.PopulateWithKernel(t, disk+"p2", src)
	repo := newRepo(t)
	testenv.MustStasis(t, "snapshot", "-r", repo, "--source", disk, "--volume", "disk", "--name", "s")
	mnt := filepath.Join(dir, "mnt")
	serveMount(t, repo, mnt, "disk/s.img")
	entries, err := os.ReadDir(filepath.Join(mnt, "disk", "s"))
	if err != nil || len(entries) != 2 || entries[0].Name() != "part1" || entries[1].Name() != "part2" {
		t.Fatalf("snapshot folder of a partitioned disk: %v %v", entries, err)
	}
	for i, opts := range []string{"ro,noload", "ro,norecovery"} {
		part := disk + []string{"p1", "p2"}[i]
		kernel := testenv.Mount(t, part, "-o", opts)
		testenv.CompareTrees(t, testenv.ScanTree(t, kernel), testenv.ScanTree(t, filepath.Join(mnt, "disk", "s", entries[i].Name())))
		testenv.Run(t, "umount", kernel)
	}
}

// TestMountFragmentedFile: a file in 1 KiB pieces with holes between (an ext4 with 1 KiB
// blocks) reads right through the view, 1 MiB at a time: such a read is a thousand pieces,
// more than one writev can send, and must not leave the reader waiting. Its thousand
// extents also take an extent tree of depth 2, whose leaves' trailing holes end where the
// next leaf starts (the reader once read everything after the first leaf as zeros).
func TestMountFragmentedFile(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.img")
	testenv.Run(t, "truncate", "-s", "64M", img)
	testenv.Run(t, "mkfs.ext4", "-q", "-F", "-b", "1024", "-E", "nodiscard", img)
	live := testenv.Mount(t, img, "-o", "loop")
	want := make([]byte, 2<<20)
	rand.New(rand.NewSource(5)).Read(want)
	f, err := os.Create(filepath.Join(live, "striped.bin"))
	if err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(want); off += 1024 {
		if off%2048 == 0 {
			f.WriteAt(want[off:off+1024], int64(off))
		} else {
			clear(want[off : off+1024]) // a hole
		}
	}
	f.Truncate(int64(len(want)))
	f.Close()
	testenv.Run(t, "umount", live)
	repo := newRepo(t)
	testenv.MustStasis(t, "snapshot", "-r", repo, "--source", img, "--volume", "v", "--name", "s")
	mnt := filepath.Join(dir, "mnt")
	serveMount(t, repo, mnt, "v/s.img")
	type result struct {
		b   []byte
		err error
	}
	got := make(chan result, 1)
	go func() {
		b, err := os.ReadFile(filepath.Join(mnt, "v", "s", "striped.bin"))
		got <- result{b, err}
	}()
	select {
	case r := <-got:
		b := r.b
		if r.err != nil {
			t.Fatal(r.err)
		}
		if i := firstDifference(b, want); i >= 0 {
			t.Fatalf("striped.bin reads %d bytes through the view that differ from what was written, first at byte %d", len(b), i)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("reading a fragmented file through the view hangs")
	}
}

// firstDifference is the offset of the first byte where a and b differ (or where the
// shorter ends), -1 if they are equal.
func firstDifference(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

// TestMountDamage: a corrupt pack and a hostile inode give EIO for what they touch, with a
// log line; every byte the view does return is right; other snapshots browse normally and
// the mount keeps serving.
func TestMountDamage(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	repo := newRepo(t)
	images := map[string]string{}
	for _, vol := range []string{"good", "hostile", "bad"} {
		src := filepath.Join(dir, vol+"-tree")
		testenv.BuildTrickyTree(t, src, testenv.TrickyTree{BigFile: 4 << 20, DirEntries: 100})
		// Incompressible and unique to its volume: the bad snapshot's packs then hold the
		// victim as raw 64 KiB blobs, each of which the damage below hits wherever the
		// writer placed it (the order of blobs in a pack varies from run to run).
		victim := make([]byte, 300000)
		rand.New(rand.NewSource(int64(len(vol)))).Read(victim)
		os.WriteFile(filepath.Join(src, "victim-"+vol), victim, 0o644)
		img := filepath.Join(dir, vol+".img")
		testenv.Run(t, "mkfs.ext4", "-q", "-F", "-d", src, img, "64M")
		if vol == "hostile" { // break the victim's extent header: malformed metadata
			testenv.Run(t, "debugfs", "-w", "-R", "sif /victim-hostile block[0] 0x12345678", img)
		}
		packsBefore := map[string]bool{}
		for _, p := range packFiles(t, repo) {
			packsBefore[p] = true
		}
		testenv.MustStasis(t, "snapshot", "-r", repo, "--source", img, "--volume", vol, "--name", "s")
		images[vol] = img
		if vol == "bad" { // flip bytes all through the packs only this snapshot wrote
			for _, p := range packFiles(t, repo) {
				if packsBefore[p] {
					continue
				}
				f, _ := os.OpenFile(p, os.O_RDWR, 0)
				st, _ := f.Stat()
				for off := int64(1000); off < st.Size(); off += 16 << 10 {
					b := make([]byte, 1)
					f.ReadAt(b, off)
					b[0] ^= 0x5a
					f.WriteAt(b, off)
				}
				f.Close()
			}
		}
	}
	mnt := filepath.Join(dir, "mnt")
	stderr := serveMount(t, repo, mnt, "bad/s.img")

	// Every regular file of the damaged snapshots reads either right or with EIO.
	eio := 0
	for _, vol := range []string{"hostile", "bad"} {
		kernel := testenv.Mount(t, images[vol], "-o", "ro,loop,noload")
		filepath.WalkDir(kernel, func(p string, d os.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() {
				return nil
			}
			rel, _ := filepath.Rel(kernel, p)
			want, _ := os.ReadFile(p)
			got, err := os.ReadFile(filepath.Join(mnt, vol, "s", rel))
			switch {
			case errors.Is(err, syscall.EIO):
				eio++
			case err != nil && vol == "bad": // a damaged directory on the way: also EIO
				if !errors.Is(err, syscall.EIO) && !errors.Is(err, os.ErrNotExist) {
					t.Errorf("%s/%s: %v, want EIO", vol, rel, err)
				}
			case err != nil:
				t.Errorf("%s/%s: %v", vol, rel, err)
			case !bytes.Equal(got, want):
				t.Errorf("%s/%s: the view returned wrong bytes instead of an error", vol, rel)
			}
			return nil
		})
		testenv.Run(t, "umount", kernel)
	}
	if _, err := os.ReadFile(filepath.Join(mnt, "hostile", "s", "victim-hostile")); !errors.Is(err, syscall.EIO) {
		t.Errorf("a file with a malformed extent tree read as %v, want EIO", err)
	}
	if eio < 2 {
		t.Errorf("only %d reads failed: the damage was not noticed", eio)
	}
	if !strings.Contains(stderr.String(), "cannot read") {
		t.Errorf("no log line about the damage:\n%s", stderr.String())
	}
	// The undamaged snapshot still browses exactly, from the same mount.
	kernel := testenv.Mount(t, images["good"], "-o", "ro,loop,noload")
	testenv.CompareTrees(t, testenv.ScanTree(t, kernel), testenv.ScanTree(t, filepath.Join(mnt, "good", "s")))

	// File restore reads a file's extents straight from the chunk cache: right bytes from
	// the good snapshot, then, with one byte of the file's stored data flipped, an error
	// naming the snapshot and the path, and nothing left behind.
	to := filepath.Join(dir, "restored")
	os.Mkdir(to, 0o755)
	testenv.MustStasis(t, "restore", "-r", repo, "good/s:/victim-good", "--to", to)
	want, _ := os.ReadFile(filepath.Join(kernel, "victim-good"))
	if got, _ := os.ReadFile(filepath.Join(to, "victim-good")); len(want) == 0 || !bytes.Equal(got, want) {
		t.Fatalf("the good snapshot's file restored wrong (%d bytes, want %d)", len(got), len(want))
	}
	os.RemoveAll(to)
	os.Mkdir(to, 0o755)
	flipped := false
	for _, p := range packFiles(t, repo) { // incompressible: stored raw, found by content
		b, _ := os.ReadFile(p)
		if at := bytes.Index(b, want[200000:200064]); at >= 0 {
			b[at+10] ^= 0x5a
			os.WriteFile(p, b, 0o600)
			flipped = true
		}
	}
	if !flipped {
		t.Fatal("the victim's bytes are in no pack")
	}
	r := testenv.Stasis(t, "restore", "-r", repo, "good/s:/", "--to", to) // the whole tree
	if r.Code == 0 || !strings.Contains(r.Stderr, "good/s:/victim-good") {
		t.Errorf("restore of a tree with a damaged file: exit %d, stderr %q; want an error naming good/s:/victim-good", r.Code, r.Stderr)
	}
	if left, _ := os.ReadDir(to); len(left) != 0 {
		t.Errorf("a failed restore left %v in %s", left, to)
	}
}

// TestMountBusy: with a file open under the mount, SIGINT says the mount is busy and keeps
// serving; once it is closed, SIGINT unmounts and exits 0.
func TestMountBusy(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "tree")
	os.MkdirAll(src, 0o755)
	os.WriteFile(filepath.Join(src, "open-me"), []byte("still here\n"), 0o644)
	img := filepath.Join(dir, "v.img")
	testenv.Run(t, "mkfs.ext4", "-q", "-F", "-d", src, img, "16M")
	repo := newRepo(t)
	testenv.MustStasis(t, "snapshot", "-r", repo, "--source", img, "--volume", "v", "--name", "s")
	mnt := filepath.Join(dir, "mnt")
	m := startMount(t, repo, mnt, "v/s.img")
	f, err := os.Open(filepath.Join(mnt, "v", "s", "open-me"))
	if err != nil {
		t.Fatal(err)
	}
	m.cmd.Process.Signal(syscall.SIGINT)
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(m.stderr.String(), "busy"); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no busy message with a file open:\n%s", m.stderr.String())
		}
	}
	if b, err := io.ReadAll(f); err != nil || string(b) != "still here\n" {
		t.Fatalf("the open file after a refused unmount: %q %v", b, err)
	}
	// stasis umount names who keeps it busy; a second mount on the same directory, or on
	// one that does not exist, is refused with the reason.
	if r := testenv.Stasis(t, "umount", mnt); r.Code == 0 || !strings.Contains(r.Stderr, fmt.Sprintf("pid %d", os.Getpid())) {
		t.Fatalf("umount of a busy mount: exit %d: %s", r.Code, r.Stderr)
	}
	if r := testenv.Stasis(t, "mount", "-r", repo, mnt); r.Code == 0 || !strings.Contains(r.Stderr, "already serves snapshots") {
		t.Fatalf("a second mount on the same directory: exit %d: %s", r.Code, r.Stderr)
	}
	if r := testenv.Stasis(t, "mount", "-r", repo, filepath.Join(dir, "nowhere")); r.Code == 0 || !strings.Contains(r.Stderr, "mkdir -p") {
		t.Fatalf("a mount on a missing directory: exit %d: %s", r.Code, r.Stderr)
	}
	f.Close()
	m.cmd.Process.Signal(syscall.SIGINT)
	done := make(chan error, 1)
	go func() { done <- m.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("mount exited with %v\n%s", err, m.stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("mount did not exit on SIGINT once nothing was open")
	}
	if exec.Command("mountpoint", "-q", mnt).Run() == nil {
		t.Fatal("still mounted")
	}
}

// TestMountHostFolders: in a repository shared by hosts, the view shows this host's
// volumes as VOLUME and another host's as HOST:VOLUME, each with its own snapshots.
func TestMountHostFolders(t *testing.T) {
	dir := t.TempDir()
	repo := newRepo(t)
	hashes := map[string]string{}
	for i, host := range []string{"alpha", "beta"} {
		src := filepath.Join(dir, host+".img")
		os.WriteFile(src, []byte(strings.Repeat(fmt.Sprint(host, i), 50000)), 0o644)
		if r := testenv.StasisEnv(t, []string{"STASIS_HOST=" + host}, "snapshot", "-r", repo, "--source", src, "--volume", "data", "--name", "s"); r.Code != 0 {
			t.Fatalf("snapshot as %s: %s", host, r.Stderr)
		}
		hashes[host] = testenv.HashFile(t, src, 0)
	}
	t.Setenv("STASIS_HOST", "alpha")
	mnt := filepath.Join(dir, "mnt")
	startMount(t, repo, mnt, "beta:data/s.img")
	entries, _ := os.ReadDir(mnt)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if strings.Join(names, ",") != "beta:data,data" {
		t.Fatalf("the view's root: %v", names)
	}
	for folder, host := range map[string]string{"data": "alpha", "beta:data": "beta"} {
		if got := testenv.HashFile(t, filepath.Join(mnt, folder, "s.img"), 0); got != hashes[host] {
			t.Fatalf("%s/s.img is not %s's snapshot", folder, host)
		}
	}
}

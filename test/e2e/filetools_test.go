package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/rand"
	"os"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/zeebo/blake3"
	"golang.org/x/sys/unix"

	"github.com/stasis-project/stasis/test/testenv"
)

// fileToolsVolume is a mounted filesystem on a loop device snapshotted into repo as
// volume "v": the ground truth is the kernel's view of mnt at each snapshot.
type fileToolsVolume struct {
	repo, mnt string
}

func newFileToolsVolume(t *testing.T, fstype string) *fileToolsVolume {
	dev, _ := testenv.LoopDevice(t, 512<<20)
	testenv.Mkfs(t, fstype, dev)
	v := &fileToolsVolume{repo: filepath.Join(t.TempDir(), "repo"), mnt: testenv.Mount(t, dev)}
	testenv.MustStasis(t, "init", "-r", v.repo)
	return v
}

// snapshot records the kernel's view of mnt/tree, then snapshots the volume as name.
func (v *fileToolsVolume) snapshot(t *testing.T, name string, extra ...string) testenv.Tree {
	t.Helper()
	testenv.Run(t, "sync")
	tree := testenv.ScanTree(t, filepath.Join(v.mnt, "tree"))
	testenv.MustStasis(t, append([]string{"snapshot", "-q", "-r", v.repo, "--source", v.mnt, "--volume", "v", "--name", name}, extra...)...)
	return tree
}

// mutator changes a tree at random, in every way diff must see.
type mutator struct {
	t    *testing.T
	rng  *rand.Rand
	root string
	n    int
}

func (m *mutator) must(err error) {
	m.t.Helper()
	if err != nil {
		m.t.Fatal(err)
	}
}

// pick returns a random path under root (relative) of the given type bits, or "".
func (m *mutator) pick(typ uint32) string {
	var all []string
	filepath.WalkDir(m.root, func(p string, d os.DirEntry, err error) error {
		if err != nil || p == m.root {
			return nil
		}
		var st syscall.Stat_t
		if syscall.Lstat(p, &st) == nil && st.Mode&syscall.S_IFMT == typ {
			rel, _ := filepath.Rel(m.root, p)
			all = append(all, rel)
		}
		return nil
	})
	if len(all) == 0 {
		return ""
	}
	sort.Strings(all)
	return all[m.rng.Intn(len(all))]
}

func (m *mutator) data(n int) []byte {
	b := make([]byte, n)
	m.rng.Read(b)
	return b
}

// step applies one random mutation and says which.
func (m *mutator) step() string {
	m.n++
	abs := func(rel string) string { return filepath.Join(m.root, rel) }
	file, dir := m.pick(syscall.S_IFREG), m.pick(syscall.S_IFDIR)
	if dir == "" {
		dir = "."
	}
	switch op := m.rng.Intn(17); {
	case op == 0 || file == "":
		p := filepath.Join(dir, fmt.Sprintf("new-%d", m.n))
		m.must(os.WriteFile(abs(p), m.data(m.rng.Intn(200<<10)), 0o644))
		return "create " + p
	case op == 1:
		m.must(os.Remove(abs(file)))
		return "delete " + file
	case op == 2:
		to := filepath.Join(dir, fmt.Sprintf("renamed-%d", m.n))
		m.must(os.Rename(abs(file), abs(to)))
		return "rename " + file + " " + to
	case op == 3:
		fi, err := os.Stat(abs(file))
		m.must(err)
		m.must(os.Truncate(abs(file), fi.Size()/2))
		return "truncate " + file
	case op == 4:
		f, err := os.OpenFile(abs(file), os.O_APPEND|os.O_WRONLY, 0)
		m.must(err)
		_, err = f.Write(m.data(1 + m.rng.Intn(100<<10)))
		m.must(err)
		m.must(f.Close())
		return "extend " + file
	case op == 5:
		f, err := os.OpenFile(abs(file), os.O_WRONLY, 0)
		m.must(err)
		fi, _ := f.Stat()
		_, err = f.WriteAt(m.data(1+m.rng.Intn(10000)), fi.Size()/2)
		m.must(err)
		m.must(f.Close())
		return "overwrite " + file
	case op == 6:
		m.must(os.Chmod(abs(file), os.FileMode(0o600|m.rng.Intn(0o100))))
		return "chmod " + file
	case op == 7:
		m.must(os.Lchown(abs(file), 1000+m.rng.Intn(5), 2000+m.rng.Intn(5)))
		return "chown " + file
	case op == 8:
		when := time.Date(2025, 1, 1, 0, 0, 0, m.rng.Intn(1e9), time.UTC).Add(time.Duration(m.rng.Intn(1e6)) * time.Second)
		m.must(os.Chtimes(abs(file), when, when))
		return "touch " + file
	case op == 9:
		m.must(unix.Setxattr(abs(file), fmt.Sprintf("user.x%d", m.rng.Intn(3)), m.data(1+m.rng.Intn(40)), 0))
		return "setxattr " + file
	case op == 10:
		testenv.SetACL(m.t, abs(file), uint32(1000+m.rng.Intn(9)), uint16(m.rng.Intn(8)))
		return "acl " + file
	case op == 11:
		to := filepath.Join(dir, fmt.Sprintf("hardlink-%d", m.n))
		m.must(os.Link(abs(file), abs(to)))
		return "link " + file + " " + to
	case op == 12:
		fi, err := os.Stat(abs(file))
		m.must(err)
		if fi.Size() < 64<<10 {
			return "(too small to punch) " + file
		}
		fd, err := unix.Open(abs(file), unix.O_WRONLY, 0)
		m.must(err)
		m.must(unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 16<<10, fi.Size()/2))
		unix.Close(fd)
		return "punch " + file
	case op == 13:
		p := filepath.Join(dir, fmt.Sprintf("link-%d", m.n))
		m.must(os.Symlink(fmt.Sprintf("target-%d", m.rng.Intn(3)), abs(p)))
		if old := m.pick(syscall.S_IFLNK); old != "" {
			os.Remove(abs(old))
			m.must(os.Symlink(fmt.Sprintf("retargeted-%d", m.n), abs(old)))
		}
		return "symlinks " + p
	case op == 14:
		p := filepath.Join(dir, fmt.Sprintf("dir-%d", m.n))
		m.must(os.MkdirAll(abs(filepath.Join(p, "sub")), 0o750))
		m.must(os.WriteFile(abs(filepath.Join(p, "sub", "f")), m.data(100), 0o644))
		return "mkdir " + p
	case op == 15:
		if dir == "." {
			return "(no dir to remove)"
		}
		m.must(os.RemoveAll(abs(dir)))
		return "rmtree " + dir
	default: // the type changes: a file becomes a directory
		m.must(os.Remove(abs(file)))
		m.must(os.Mkdir(abs(file), 0o755))
		m.must(os.WriteFile(abs(filepath.Join(file, "inside")), []byte("x"), 0o644))
		return "file→dir " + file
	}
}

// sneakyRewrite changes bytes in the middle of the largest file in place and puts its
// mtime back: only the content tells, as with a tool that preserves times.
func (m *mutator) sneakyRewrite() string {
	var biggest string
	var size int64
	filepath.WalkDir(m.root, func(p string, d os.DirEntry, err error) error {
		if fi, e := os.Lstat(p); err == nil && e == nil && fi.Mode().IsRegular() && fi.Size() > size {
			biggest, size = p, fi.Size()
		}
		return nil
	})
	fi, err := os.Stat(biggest)
	m.must(err)
	f, err := os.OpenFile(biggest, os.O_WRONLY, 0)
	m.must(err)
	_, err = f.WriteAt(m.data(100), size/2+int64(m.rng.Intn(4096)))
	m.must(err)
	m.must(f.Close())
	m.must(os.Chtimes(biggest, fi.ModTime(), fi.ModTime()))
	return "sneaky rewrite " + biggest
}

// expectedDiff is what stasis diff must report between two kernel views: path → ops
// ("-+" for a type change), with the same definitions (content or target → M; mode,
// owner, mtime, xattrs → U; link counts and atimes ignored).
func expectedDiff(a, b testenv.Tree) map[string]string {
	out := map[string]string{}
	key := func(p string) string { return "/" + p }
	for p, x := range a {
		y, ok := b[p]
		switch {
		case !ok:
			out[key(p)] += "-"
		case x.Mode&syscall.S_IFMT != y.Mode&syscall.S_IFMT:
			out[key(p)] = "-+"
		case x.Hash != y.Hash || x.Link != y.Link || x.Size != y.Size:
			out[key(p)] = "M"
		case x.Mode != y.Mode || x.UID != y.UID || x.GID != y.GID || x.Mtime != y.Mtime || fmt.Sprint(x.Xattrs) != fmt.Sprint(y.Xattrs):
			out[key(p)] = "U"
		}
	}
	for p := range b {
		if _, ok := a[p]; !ok {
			out[key(p)] += "+"
		}
	}
	// Under a path whose type changed, the old children are removed and the new added.
	return out
}

// stasisDiff runs stasis diff --json and returns path → ops.
func stasisDiff(t *testing.T, repo, a, b, p string) (map[string]string, map[string]int64) {
	t.Helper()
	out := testenv.MustStasis(t, "diff", "--json", "-r", repo, a, b, p)
	var res struct {
		Changes []struct{ Op, Path string }
		Stats   map[string]int64
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("diff --json: %v\n%s", err, out)
	}
	got := map[string]string{}
	for _, c := range res.Changes {
		got[c.Path] += c.Op
	}
	return got, res.Stats
}

func compareDiffs(t *testing.T, want, got map[string]string, ops []string) {
	t.Helper()
	var bad []string
	for p, w := range want {
		if got[p] != w {
			bad = append(bad, fmt.Sprintf("%s: want %q, got %q", p, w, got[p]))
		}
	}
	for p, g := range got {
		if _, ok := want[p]; !ok {
			bad = append(bad, fmt.Sprintf("%s: want nothing, got %q", p, g))
		}
	}
	if len(want) == 0 {
		bad = append(bad, "the mutations changed nothing: the test compared nothing")
	}
	sort.Strings(bad)
	if len(bad) > 0 {
		t.Fatalf("stasis diff differs from the kernel's trees on %d of %d paths:\n%s\nmutations: %s", len(bad), len(want), strings.Join(bad, "\n"), strings.Join(ops, "; "))
	}
}

// TestFileToolsAgainstKernel: on ext4 and XFS, for rounds of random mutations between
// snapshots, stasis diff equals the comparison of the kernel's two trees path for path;
// restore of the tree equals the kernel's tree (content, owners, modes, times, xattrs,
// ACLs, links, holes); ls, cat and find agree with the kernel.
func TestFileToolsAgainstKernel(t *testing.T) {
	for _, fstype := range []string{"ext4", "xfs"} {
		t.Run(fstype, func(t *testing.T) {
			v := newFileToolsVolume(t, fstype)
			root := filepath.Join(v.mnt, "tree")
			testenv.BuildTrickyTree(t, root, testenv.TrickyTree{BigFile: 3 << 20, DirEntries: 300, Striped: 12 << 20})
			testenv.SetACL(t, filepath.Join(root, "small.txt"), 1234, 4)
			holes, err := os.Create(filepath.Join(v.mnt, "holes.bin")) // out of the mutator's reach
			if err != nil {
				t.Fatal(err)
			}
			holes.WriteAt([]byte("island"), 40<<20)
			holes.WriteAt([]byte("end"), 100<<20)
			holes.Close()
			trees := []testenv.Tree{v.snapshot(t, "s0")}
			rng := rand.New(rand.NewSource(int64(len(fstype))))
			m := &mutator{t: t, rng: rng, root: root}
			for round := 1; round <= 3; round++ {
				var ops []string
				for i := 0; i < 25; i++ {
					ops = append(ops, m.step())
				}
				ops = append(ops, m.sneakyRewrite())
				trees = append(trees, v.snapshot(t, fmt.Sprintf("s%d", round)))
				got, stats := stasisDiff(t, v.repo, fmt.Sprintf("v/s%d", round-1), fmt.Sprintf("v/s%d", round), "/tree")
				compareDiffs(t, expectedDiff(trees[round-1], trees[round]), rebaseDiff(got), ops)
				if stats["added"]+stats["removed"]+stats["modified"]+stats["metadata_only"] != int64(len(got)) && !hasTypeChange(got) {
					t.Fatalf("stats %v do not count the %d changes", stats, len(got))
				}
			}
			// Crash-consistent snapshots (no freeze): ext4's newest metadata is in its
			// journal, replayed in memory; the diff must see the replayed trees. (The XFS
			// reader does not replay XFS's log: the commands say so, tested below.)
			var crash testenv.Tree
			if fstype == "ext4" {
				var ops []string
				for i := 0; i < 25; i++ {
					ops = append(ops, m.step())
				}
				ops = append(ops, m.sneakyRewrite())
				crash = v.snapshot(t, "c1", "--no-freeze")
				got, _ := stasisDiff(t, v.repo, "v/s3", "v/c1", "/tree")
				compareDiffs(t, expectedDiff(trees[3], crash), rebaseDiff(got), ops)
			} else {
				v.snapshot(t, "c1", "--no-freeze")
				r := testenv.Stasis(t, "ls", "-r", v.repo, "v/c1")
				if r.Code != 0 || !strings.Contains(r.Stderr, "log is not replayed") {
					t.Fatalf("ls of a crash-consistent XFS snapshot: exit %d, no caveat: %s", r.Code, r.Stderr)
				}
			}

			// Between a snapshot and itself nothing changed.
			if same, _ := stasisDiff(t, v.repo, "v/s2", "v/s2", ""); len(same) != 0 {
				t.Fatalf("a snapshot differs from itself: %v", same)
			}
			last := trees[3]

			// restore: the tree as the kernel showed it, onto another filesystem.
			dev, _ := testenv.LoopDevice(t, 512<<20)
			testenv.Mkfs(t, "ext4", dev)
			out := testenv.Mount(t, dev)
			testenv.MustStasis(t, "restore", "-r", v.repo, "v/s3:/tree", "--to", out)
			testenv.CompareTrees(t, last, testenv.ScanTree(t, filepath.Join(out, "tree")))
			if leftovers, _ := filepath.Glob(filepath.Join(out, ".stasis-restore-*")); len(leftovers) > 0 {
				t.Fatalf("restore left %v", leftovers)
			}
			// A single file, with its holes kept as holes.
			testenv.MustStasis(t, "restore", "-r", v.repo, "v/s3:/holes.bin", "--to", out)
			if st, orig := blocks(t, filepath.Join(out, "holes.bin")), blocks(t, filepath.Join(v.mnt, "holes.bin")); st > orig+8 || st > 1<<10 {
				t.Fatalf("holes.bin restored with %d blocks, the original has %d: holes were filled", st, orig)
			}
			if a, b := testenv.HashFile(t, filepath.Join(out, "holes.bin"), 0), testenv.HashFile(t, filepath.Join(v.mnt, "holes.bin"), 0); a != b {
				t.Fatal("holes.bin restored with other content")
			}
			// An existing path is refused, and nothing is left behind.
			r := testenv.Stasis(t, "restore", "-r", v.repo, "v/s3:/tree", "--to", out)
			if r.Code == 0 || !strings.Contains(r.Stderr, "already exists") {
				t.Fatalf("restore over an existing tree: exit %d, %s", r.Code, r.Stderr)
			}
			// --overwrite replaces files in place and never follows a symlink planted there.
			victim := filepath.Join(t.TempDir(), "victim")
			os.WriteFile(victim, []byte("must not change"), 0o644)
			var deep []string
			for p, e := range last {
				if strings.Contains(p, "/") && e.Mode&syscall.S_IFMT == syscall.S_IFREG {
					deep = append(deep, p)
				}
			}
			sort.Strings(deep)
			planted := filepath.Join(out, "tree", deep[0])
			os.Remove(planted)
			if err := os.Symlink(victim, planted); err != nil {
				t.Fatal(err)
			}
			testenv.MustStasis(t, "restore", "-r", v.repo, "v/s3:/tree", "--to", out, "--overwrite")
			if b, _ := os.ReadFile(victim); string(b) != "must not change" {
				t.Fatalf("restore wrote through a planted symlink: victim holds %q", b)
			}
			testenv.CompareTrees(t, last, testenv.ScanTree(t, filepath.Join(out, "tree")))
			// --no-flush restores the same tree (returning before it reaches the disk); a
			// volume restore refuses it.
			quick := filepath.Join(out, "quick")
			os.Mkdir(quick, 0o755)
			testenv.MustStasis(t, "restore", "-r", v.repo, "v/s3:/tree", "--to", quick, "--no-flush")
			testenv.CompareTrees(t, last, testenv.ScanTree(t, filepath.Join(quick, "tree")))
			if r := testenv.Stasis(t, "restore", "-r", v.repo, "v/s3", "--to", filepath.Join(quick, "img"), "--no-flush"); r.Code == 0 || !strings.Contains(r.Stderr, "--no-flush is for restoring files") {
				t.Fatalf("a volume restore with --no-flush: exit %d, %s", r.Code, r.Stderr)
			}

			// ls, cat and find against the kernel's tree.
			var listed []struct{ Name, Type string }
			if err := json.Unmarshal([]byte(testenv.MustStasis(t, "ls", "--json", "-r", v.repo, "v/s3:/tree/"+path.Dir(deep[0]))), &listed); err != nil {
				t.Fatal(err)
			}
			var want, gotNames []string
			for p := range last {
				if path.Dir(p) == path.Dir(deep[0]) {
					want = append(want, path.Base(p))
				}
			}
			for _, l := range listed {
				gotNames = append(gotNames, l.Name)
			}
			sort.Strings(want)
			if strings.Join(want, ",") != strings.Join(gotNames, ",") {
				t.Fatalf("ls lists %v, the kernel %v", gotNames, want)
			}
			for p, e := range last {
				if e.Mode&syscall.S_IFMT == syscall.S_IFREG && e.Size > 1<<20 {
					content := testenv.MustStasis(t, "cat", "-r", v.repo, "v/s3:/tree/"+p)
					if int64(len(content)) != e.Size || sha256Hex([]byte(content)) != e.Hash {
						t.Fatalf("cat %s: %d bytes, differ from the kernel's %d", p, len(content), e.Size)
					}
				}
			}
			found := strings.Fields(testenv.MustStasis(t, "find", "-r", v.repo, "--volume", "v", "--newer", "1h", "--older", "2099-01-01", "*.txt"))
			var wantFound []string
			named := map[string]testenv.Tree{}
			if crash != nil {
				named["c1"] = crash
			}
			for i, tr := range trees {
				named[fmt.Sprintf("s%d", i)] = tr
			}
			for name, tr := range named {
				for p := range tr {
					if strings.HasSuffix(p, ".txt") {
						wantFound = append(wantFound, fmt.Sprintf("v/%s:/tree/%s", name, p))
					}
				}
			}
			if crash == nil {
				found = slices.DeleteFunc(found, func(f string) bool { return strings.HasPrefix(f, "v/c1:") })
			}
			sort.Strings(found)
			sort.Strings(wantFound)
			if strings.Join(found, "\n") != strings.Join(wantFound, "\n") {
				t.Fatalf("find *.txt:\n%s\nthe kernel's trees:\n%s", strings.Join(found, "\n"), strings.Join(wantFound, "\n"))
			}
		})
	}
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func blake3Hex(b []byte) string {
	sum := blake3.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func hasTypeChange(d map[string]string) bool {
	for _, ops := range d {
		if len(ops) > 1 {
			return true
		}
	}
	return false
}

// rebaseDiff makes stasis diff's paths (from the volume's root) relative to /tree.
func rebaseDiff(d map[string]string) map[string]string {
	out := map[string]string{}
	for p, ops := range d {
		rel := strings.TrimPrefix(strings.TrimPrefix(p, "/tree"), "/")
		out["/"+rel] = ops
	}
	return out
}

func blocks(t *testing.T, p string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks
}

// TestFileHistory: a file rewritten across 10 snapshots, sometimes back to an earlier
// content and sometimes left alone, lists exactly its distinct contents, each with the
// first and last snapshot holding it and how many do.
func TestFileHistory(t *testing.T) {
	v := newFileToolsVolume(t, "ext4")
	os.MkdirAll(filepath.Join(v.mnt, "tree"), 0o755)
	f := filepath.Join(v.mnt, "tree", "config.txt")
	contents := []string{"a", "b", "b", "c", "a", "", "d", "d", "d", "e"} // "" = deleted
	type version struct {
		first, last string
		n           int
	}
	want := map[string]*version{}
	var order []string
	for i, c := range contents {
		name := fmt.Sprintf("s%d", i)
		if c == "" {
			os.Remove(f)
		} else {
			data := []byte(strings.Repeat(c, 100000+i)) // rewritten even when equal: new blocks
			data = data[:100000]
			if err := os.WriteFile(f+".tmp", data, 0o644); err != nil {
				t.Fatal(err)
			}
			os.Rename(f+".tmp", f)
			if want[c] == nil {
				want[c] = &version{first: name}
				order = append(order, c)
			}
			want[c].last = name
			want[c].n++
		}
		v.snapshot(t, name)
	}
	var got []struct {
		Hash      string
		Size      int64
		Snapshots int
		First     struct{ Name string }
		Last      struct{ Name string }
	}
	if err := json.Unmarshal([]byte(testenv.MustStasis(t, "history", "--json", "-r", v.repo, "v:/tree/config.txt")), &got); err != nil {
		t.Fatal(err)
	}
	if len(got) != len(order) {
		t.Fatalf("history lists %d versions, the file had %d distinct contents: %+v", len(got), len(order), got)
	}
	for i, c := range order {
		w, g := want[c], got[i]
		if g.First.Name != w.first || g.Last.Name != w.last || g.Snapshots != w.n || g.Size != 100000 ||
			g.Hash != blake3Hex([]byte(strings.Repeat(c, 100000))) {
			t.Fatalf("version %d (%q): got %+v, want first %s last %s in %d snapshots", i+1, c, g, w.first, w.last, w.n)
		}
	}
	r := testenv.Stasis(t, "history", "-r", v.repo, "v:/tree/never-existed")
	if r.Code != 1 || !strings.Contains(r.Stderr, "no snapshot of v holds") {
		t.Fatalf("history of a missing file: exit %d, %s", r.Code, r.Stderr)
	}
	r = testenv.Stasis(t, "cat", "-r", v.repo, "v/s0:/tree")
	if r.Code != 1 || !strings.Contains(r.Stderr, "not a regular file") {
		t.Fatalf("cat of a directory: exit %d, %s", r.Code, r.Stderr)
	}
}

// TestFileToolsPartitionedDisk: on a disk with a partition table, the file commands take
// the partition as the path's first component, as the view does.
func TestFileToolsPartitionedDisk(t *testing.T) {
	part, disk := testenv.PartitionedLoop(t, 96<<20)
	testenv.Mkfs(t, "ext4", part)
	mnt := testenv.Mount(t, part)
	os.MkdirAll(filepath.Join(mnt, "etc"), 0o755)
	os.WriteFile(filepath.Join(mnt, "etc", "hostname"), []byte("partitioned\n"), 0o644)
	testenv.Run(t, "umount", mnt)
	repo := filepath.Join(t.TempDir(), "repo")
	testenv.MustStasis(t, "init", "-r", repo)
	testenv.MustStasis(t, "snapshot", "-q", "-r", repo, "--source", disk, "--volume", "disk", "--name", "s")
	if out := testenv.MustStasis(t, "ls", "-r", repo, "disk/s"); strings.TrimSpace(out) != "part1/" {
		t.Fatalf("ls of a partitioned disk's root: %q, want part1/", out)
	}
	if out := testenv.MustStasis(t, "cat", "-r", repo, "disk/s:part1/etc/hostname"); out != "partitioned\n" {
		t.Fatalf("cat part1/etc/hostname: %q", out)
	}
	r := testenv.Stasis(t, "cat", "-r", repo, "disk/s:/etc/hostname")
	if r.Code != 1 || !strings.Contains(r.Stderr, "start the path with a partition (part1)") {
		t.Fatalf("a path without the partition: exit %d, %s", r.Code, r.Stderr)
	}
	out := t.TempDir()
	testenv.MustStasis(t, "restore", "-r", repo, "disk/s:part1/etc", "--to", out)
	if b, _ := os.ReadFile(filepath.Join(out, "etc", "hostname")); string(b) != "partitioned\n" {
		t.Fatalf("restored part1/etc/hostname holds %q", b)
	}
}

// TestRestoreFilesNoSpace: a file restore that runs out of space says so (not "context
// canceled") and leaves nothing behind.
func TestRestoreFilesNoSpace(t *testing.T) {
	v := newFileToolsVolume(t, "ext4")
	os.MkdirAll(filepath.Join(v.mnt, "tree"), 0o755)
	big := make([]byte, 20<<20)
	rand.New(rand.NewSource(4)).Read(big)
	for i := 0; i < 3; i++ {
		os.WriteFile(filepath.Join(v.mnt, "tree", fmt.Sprintf("big%d", i)), big, 0o644)
	}
	for i := 0; i < 300; i++ { // still being walked when a writer fails
		os.WriteFile(filepath.Join(v.mnt, "tree", fmt.Sprintf("small%03d", i)), big[:5000], 0o644)
	}
	v.snapshot(t, "s")
	dev, _ := testenv.LoopDevice(t, 24<<20)
	testenv.Mkfs(t, "ext4", dev)
	small := testenv.Mount(t, dev)
	r := testenv.Stasis(t, "restore", "-r", v.repo, "v/s:/tree", "--to", small)
	if r.Code != 1 || !strings.Contains(r.Stderr, "no space left on device") {
		t.Fatalf("restore onto a full filesystem: exit %d, %s", r.Code, r.Stderr)
	}
	entries, _ := os.ReadDir(small)
	for _, e := range entries {
		if e.Name() != "lost+found" {
			t.Fatalf("a failed restore left %s behind", e.Name())
		}
	}
}

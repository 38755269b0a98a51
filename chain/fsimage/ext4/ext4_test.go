package ext4

import (
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stasis-project/stasis/chain/fsimage/fsimagetest"
	"github.com/stasis-project/stasis/test/testenv"
)

// TestAgainstKernel builds images with mkfs.ext4 -d in several layouts and compares what
// the reader shows with the kernel's own read-only mount of the same image.
func TestAgainstKernel(t *testing.T) {
	testenv.RequireRoot(t)
	src := t.TempDir()
	testenv.BuildTrickyTree(t, src, testenv.TrickyTree{BigFile: 3 << 20, DirEntries: 3000, Striped: 12 << 20})
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"default", nil},
		{"inline-data", []string{"-O", "inline_data"}},
		{"block-mapped-1k", []string{"-t", "ext3", "-b", "1024"}},
		{"meta-bg-no-64bit", []string{"-O", "meta_bg,^resize_inode,^64bit", "-b", "1024"}},
		{"small-inodes", []string{"-I", "128"}},
		{"kernel-populated", nil}, // htree directories, unwritten extents
		{"grown", nil},            // resize2fs from 64 to 320 MiB: groups added after mkfs
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "fs.img")
			if tc.name == "grown" {
				testenv.GarbageImage(t, img, 320<<20)
				testenv.Run(t, "mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "nodiscard", img, "64M")
				testenv.Run(t, "resize2fs", img)
				testenv.PopulateWithKernel(t, img, src)
			} else if tc.name == "kernel-populated" {
				testenv.GarbageImage(t, img, 256<<20) // so stale blocks are not zeros by luck
				testenv.Run(t, "mkfs.ext4", "-q", "-F", "-T", "default", "-E", "nodiscard", img)
				testenv.PopulateWithKernel(t, img, src)
			} else {
				args := append(append([]string{"-q", "-F", "-d", src}, tc.args...), img, "256M")
				testenv.Run(t, "mkfs.ext4", args...)
			}
			mnt := testenv.Mount(t, img, "-o", "ro,loop,noload")
			fsimagetest.CompareWithKernel(t, img, testenv.ScanTree(t, mnt), openFS)
		})
	}
}

// TestJournalReplay: an image copied while its filesystem is mounted (a crash-consistent
// snapshot) whose journal holds committed transactions not yet written in place reads
// like the kernel's mount of it, which replays the journal — not like the stale blocks.
func TestJournalReplay(t *testing.T) {
	testenv.RequireRoot(t)
	// The kernel writes journaled blocks in place on its own schedule (seconds later, as a
	// rule): try a few times for a copy taken before it did.
	for attempt := 1; ; attempt++ {
		dir := t.TempDir()
		crash := crashImage(t, dir)
		stale := testenv.Mount(t, crash, "-o", "ro,loop,noload")
		staleTree := testenv.ScanTree(t, stale)
		testenv.Run(t, "umount", stale)
		if _, ok := staleTree["d/f100"]; ok {
			if attempt < 3 {
				continue
			}
			t.Skip("the kernel wrote every journaled block in place before the copy, three times: nothing to replay here")
		}
		// The kernel replays when it may write the device: mount a copy read-write-capable.
		replayedImg := filepath.Join(dir, "replayed.img")
		testenv.Run(t, "cp", "--sparse=always", crash, replayedImg)
		want := testenv.ScanTree(t, testenv.Mount(t, replayedImg, "-o", "loop"))
		fsimagetest.CompareWithKernel(t, crash, want, openFS)
		return
	}
}

// crashImage copies an ext4 image while it is mounted and its latest changes are committed
// to the journal but not yet written in place, and returns the copy's path.
func crashImage(t testing.TB, dir string) string {
	t.Helper()
	img, crash := filepath.Join(dir, "live.img"), filepath.Join(dir, "crash.img")
	testenv.Run(t, "truncate", "-s", "128M", img)
	testenv.Run(t, "mkfs.ext4", "-q", "-F", "-E", "nodiscard", img)
	live := testenv.Mount(t, img, "-o", "loop")
	testenv.Run(t, "sync")
	// fsync commits each change to the journal; the blocks in place are written back later.
	script := `set -e
mkdir -p d/sub
for i in $(seq 1 150); do echo "file $i" | dd of=d/f$i conv=fsync status=none; done
ln d/f1 d/sub/hard; ln -s ../f2 d/sub/soft
rm d/f3 d/f4; echo replaced | dd of=d/f5 conv=fsync status=none`
	cmd := exec.Command("sh", "-c", script)
	cmd.Dir = live
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	testenv.Run(t, "cp", "--sparse=always", img, crash) // what a crash-consistent capture sees
	testenv.Run(t, "umount", live)
	return crash
}

// TestTidGEQ: transaction IDs wrap at 2^32, as in the kernel.
func TestTidGEQ(t *testing.T) {
	for _, c := range []struct {
		a, b uint32
		want bool
	}{{5, 5, true}, {6, 5, true}, {5, 6, false}, {0, 0xFFFFFFFF, true}, {0xFFFFFFFF, 0, false}, {3, 0xFFFFFFF0, true}} {
		if got := tidGEQ(c.a, c.b); got != c.want {
			t.Errorf("tidGEQ(%#x, %#x) = %v, want %v", c.a, c.b, got, c.want)
		}
	}
}

package ext4

import (
	"path/filepath"
	"testing"

	"github.com/stasis-project/stasis/fusemount/fsimage/fsimagetest"
	"github.com/stasis-project/stasis/test/testenv"
)

// TestAgainstKernel builds images with mkfs.ext4 -d in several layouts and compares what
// the reader shows with the kernel's own read-only mount of the same image.
func TestAgainstKernel(t *testing.T) {
	testenv.RequireRoot(t)
	src := t.TempDir()
	testenv.BuildTrickyTree(t, src, testenv.TrickyTree{BigFile: 3 << 20, DirEntries: 3000})
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
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "fs.img")
			if tc.name == "kernel-populated" {
				testenv.GarbageImage(t, img, 256<<20) // so stale blocks are not zeros by luck
				testenv.Run(t, "mkfs.ext4", "-q", "-F", "-T", "default", "-E", "nodiscard", img)
				testenv.PopulateWithKernel(t, img, src)
			} else {
				args := append(append([]string{"-q", "-F", "-d", src}, tc.args...), img, "256M")
				testenv.Run(t, "mkfs.ext4", args...)
			}
			mnt := testenv.Mount(t, img, "-o", "ro,loop,noload")
			fsimagetest.CompareWithKernel(t, img, testenv.ScanTree(t, mnt), open)
		})
	}
}

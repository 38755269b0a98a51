package xfs

import (
	"fmt"
	"path/filepath"
	"testing"

	"github.com/stasis-project/stasis/chain/fsimage/fsimagetest"
	"github.com/stasis-project/stasis/test/testenv"
)

// TestAgainstKernel fills XFS images through the kernel (every directory form from
// short-form to node, B+tree-mapped and reflinked files, unwritten extents, short-form,
// leaf and remote xattrs, ACLs) and compares the reader with the kernel's read-only mount.
func TestAgainstKernel(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "mkfs.xfs")
	src := t.TempDir()
	testenv.BuildTrickyTree(t, src, testenv.TrickyTree{BigFile: 3 << 20, DirEntries: 3000, Striped: 12 << 20})
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"default", nil},
		{"1k-blocks-8k-dirs", []string{"-b", "size=1024", "-n", "size=8192"}},
		{"no-ftype-bits-512-inodes", []string{"-i", "size=512", "-m", "bigtime=0"}},
		{"rmapbt-8-ags", []string{"-m", "rmapbt=1", "-d", "agcount=8"}},
		{"grown", []string{"-d", "size=320m"}}, // then grown online to 480 MiB: AGs added after mkfs
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "fs.img")
			size := int64(320 << 20)
			if tc.name == "grown" || tc.name == "rmapbt-8-ags" {
				size = 640 << 20
			}
			testenv.GarbageImage(t, img, size)
			testenv.Run(t, "mkfs.xfs", append(append([]string{"-q", "-f", "-K"}, tc.args...), img)...)
			if tc.name == "grown" {
				mnt := testenv.Mount(t, img, "-o", "loop")
				testenv.Run(t, "xfs_growfs", "-D", fmt.Sprint((480<<20)/4096), mnt)
				testenv.Run(t, "umount", mnt)
			}
			testenv.PopulateWithKernel(t, img, src)
			mnt := testenv.Mount(t, img, "-o", "ro,loop,norecovery")
			fsimagetest.CompareWithKernel(t, img, testenv.ScanTree(t, mnt), open)
		})
	}
}

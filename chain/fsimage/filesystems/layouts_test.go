package filesystems_test

import (
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/stasis-project/stasis/chain/fsimage/filesystems"
	"github.com/stasis-project/stasis/test/testenv"
)

// TestAllocatedCoversUsedBlocks: on filesystems of many layouts, filled by the kernel, with
// files deleted afterwards (free space between used blocks) and some grown after mkfs as
// cloud volumes are, every block the filesystem's own tools count as in use (dumpe2fs's
// bitmaps, xfs_db's free-space trees) is in Allocated. A block left out would be missing
// from every full snapshot, silently: this is what "empty blocks not stored" must never
// mean. It also bounds what Allocated claims beyond the tools' count (metadata stasis
// reads whole), so a map that gives up and claims everything is caught too.
func TestAllocatedCoversUsedBlocks(t *testing.T) {
	testenv.RequireRoot(t)
	src := t.TempDir()
	testenv.BuildTrickyTree(t, src, testenv.TrickyTree{BigFile: 3 << 20, DirEntries: 500, Striped: 4 << 20})
	type layout struct {
		name, fstype string
		mkfs         []string
		size         int64
		// growTo grows the filesystem to this size after mkfs: XFS online (xfs_growfs), ext4
		// offline (resize2fs on the unmounted device; online resizing needs
		// CAP_SYS_RESOURCE, which the test machines do not grant).
		growTo int64
		// deviceOnly grows the device but not the filesystem, as a cloud disk is grown
		// before its filesystem: the device's new tail, written with a marker, is not the
		// filesystem's, and must be read.
		deviceOnly bool
	}
	for _, l := range []layout{
		{"ext4-default", "ext4", nil, 256 << 20, 0, false},
		{"ext4-uninit-groups", "ext4", []string{"-b", "4096"}, 1 << 30, 0, false}, // groups never written: BLOCK_UNINIT, superblock backups
		{"ext4-1k-ext3", "ext4", []string{"-t", "ext3", "-b", "1024"}, 128 << 20, 0, false},
		{"ext4-ext2", "ext4", []string{"-t", "ext2"}, 128 << 20, 0, false},
		{"ext4-meta-bg-1k", "ext4", []string{"-O", "meta_bg,^resize_inode,^64bit", "-b", "1024"}, 128 << 20, 0, false},
		{"ext4-no-flex-bg-gdt-csum", "ext4", []string{"-O", "^flex_bg,^metadata_csum,uninit_bg"}, 256 << 20, 0, false},
		{"ext4-sparse-super2", "ext4", []string{"-O", "sparse_super2,^resize_inode"}, 256 << 20, 0, false},
		{"ext4-grown", "ext4", []string{"-b", "4096"}, 96 << 20, 640 << 20, false},
		{"ext4-1k-grown", "ext4", nil, 64 << 20, 384 << 20, false},
		{"ext4-device-grown", "ext4", nil, 96 << 20, 200<<20 + 3<<10, true},
		{"xfs-default", "xfs", nil, 320 << 20, 0, false},
		{"xfs-1k-blocks", "xfs", []string{"-b", "size=1024"}, 320 << 20, 0, false},
		{"xfs-many-ags", "xfs", []string{"-d", "agcount=8"}, 640 << 20, 0, false},
		{"xfs-rmapbt", "xfs", []string{"-m", "rmapbt=1,reflink=1"}, 320 << 20, 0, false},
		{"xfs-raid-stripes", "xfs", []string{"-d", "su=64k,sw=4"}, 640 << 20, 0, false}, // as on md RAID
		{"xfs-grown-online", "xfs", nil, 320 << 20, 1 << 30, false},
		{"xfs-device-grown", "xfs", nil, 320 << 20, 400 << 20, true},
	} {
		t.Run(l.name, func(t *testing.T) {
			if l.fstype == "xfs" {
				testenv.RequireTool(t, "mkfs.xfs")
			}
			dev, img := testenv.LoopDevice(t, l.size)
			if l.fstype == "ext4" {
				testenv.Run(t, "mkfs.ext4", append(append([]string{"-q", "-F"}, l.mkfs...), dev)...)
			} else {
				testenv.Run(t, "mkfs.xfs", append(append([]string{"-q", "-f"}, l.mkfs...), dev)...)
			}
			grow := func() {
				if err := os.Truncate(img, l.growTo); err != nil {
					t.Fatal(err)
				}
				testenv.Run(t, "losetup", "-c", dev)
			}
			if l.deviceOnly {
				grow()
				f, err := os.OpenFile(img, os.O_WRONLY, 0)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := f.WriteAt([]byte("not the filesystem's"), l.growTo-50<<20); err != nil {
					t.Fatal(err)
				}
				f.Close()
			} else if l.growTo > 0 && l.fstype == "ext4" {
				grow()
				testenv.Run(t, "resize2fs", dev)
			}
			mnt := testenv.Mount(t, dev)
			if l.growTo > 0 && l.fstype == "xfs" && !l.deviceOnly {
				grow()
				testenv.Run(t, "xfs_growfs", mnt)
			}
			testenv.Run(t, "cp", "-a", src+"/.", mnt)
			for i := 0; i < 3; i++ { // a second copy, partly deleted: free holes between used blocks
				testenv.Run(t, "cp", "-a", src, filepath.Join(mnt, "copy"+string(rune('0'+i))))
			}
			testenv.Run(t, "rm", "-rf", filepath.Join(mnt, "copy1"), filepath.Join(mnt, "big.bin"))
			testenv.Run(t, "umount", mnt)

			size := l.size
			if l.growTo > 0 {
				size = l.growTo
			}
			f, err := os.Open(dev)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			extents, name, err := filesystems.Allocated(f, size)
			if err != nil || name != l.fstype {
				t.Fatalf("Allocated: %v (%s)", err, name)
			}
			var ext [][2]int64
			for _, e := range extents {
				ext = append(ext, [2]int64{e.Start, e.End})
			}
			free := testenv.FreeRanges(t, l.fstype, img)
			sort.Slice(free, func(i, j int) bool { return free[i][0] < free[j][0] })
			// Walk the device: every byte outside the tools' free ranges must be allocated.
			var used, claimedFree int64
			fi, ei := 0, 0
			for off := int64(0); off < size; {
				for fi < len(free) && free[fi][1] <= off {
					fi++
				}
				for ei < len(ext) && ext[ei][1] <= off {
					ei++
				}
				inFree := fi < len(free) && free[fi][0] <= off
				inAlloc := ei < len(ext) && ext[ei][0] <= off
				next := min(size, nextBound(free, fi, off), nextBound(ext, ei, off))
				switch {
				case !inFree && !inAlloc:
					t.Fatalf("bytes %d–%d are in use (the filesystem's tools count them) but not in Allocated: a full snapshot would miss them", off, next)
				case !inFree:
					used += next - off
				case inAlloc:
					claimedFree += next - off
				}
				off = next
			}
			t.Logf("%s: %d MiB in use, Allocated claims %d KiB of free space too, in %d extents", strings.TrimPrefix(l.name, l.fstype+"-"), used>>20, claimedFree>>10, len(ext))
			if claimedFree > used/10+1<<20 {
				t.Fatalf("Allocated claims %d bytes the filesystem counts as free (in use: %d)", claimedFree, used)
			}
		})
	}
}

// nextBound is the first range boundary after off in sorted ranges rs, from rs[i] on (the
// first range not ending at or before off).
func nextBound(rs [][2]int64, i int, off int64) int64 {
	if i >= len(rs) {
		return 1 << 62
	}
	if rs[i][0] > off {
		return rs[i][0]
	}
	return rs[i][1]
}

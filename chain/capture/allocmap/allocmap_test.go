package allocmap

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// mkfsImage makes a small filesystem image with the real mkfs, or skips.
func mkfsImage(t testing.TB, fstype string, size int64) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), fstype+".img")
	f, _ := os.Create(img)
	f.Truncate(size)
	f.Close()
	var cmd *exec.Cmd
	if fstype == "ext4" {
		cmd = exec.Command("mkfs.ext4", "-q", "-F", img)
	} else {
		cmd = exec.Command("mkfs.xfs", "-q", "-f", img)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Skipf("mkfs.%s unavailable: %v %s", fstype, err, out)
	}
	return img
}

// TestFreshFilesystems: a new filesystem's allocated extents are its metadata: a small part
// of the device, including the superblock.
func TestFreshFilesystems(t *testing.T) {
	for _, fstype := range []string{"ext4", "xfs"} {
		img := mkfsImage(t, fstype, 320<<20)
		f, _ := os.Open(img)
		ext, name, err := Allocated(f, 320<<20)
		f.Close()
		if err != nil || name != fstype {
			t.Fatalf("%s: %v (%s)", fstype, err, name)
		}
		var total int64
		for i, e := range ext {
			if e.Start >= e.End || (i > 0 && e.Start <= ext[i-1].End) {
				t.Fatalf("%s: extents not sorted and merged: %v", fstype, ext)
			}
			total += e.End - e.Start
		}
		if ext[0].Start != 0 || total == 0 || total > 80<<20 {
			t.Fatalf("%s: %d bytes allocated in %d extents on a fresh 320 MiB filesystem", fstype, total, len(ext))
		}
		t.Logf("%s: %d KiB allocated in %d extents", fstype, total>>10, len(ext))
	}
	if _, _, err := Allocated(bytes.NewReader(make([]byte, 1<<20)), 1<<20); err != ErrUnknown {
		t.Fatalf("zeros: %v, want ErrUnknown", err)
	}
}

// FuzzAllocated: hostile metadata must give an error or sane extents, never a panic, a hang
// or a huge allocation. Seeds are the metadata ends of real mkfs images.
func FuzzAllocated(f *testing.F) {
	for _, fstype := range []string{"ext4", "xfs"} {
		img := mkfsImage(f, fstype, 320<<20)
		b, _ := os.ReadFile(img)
		f.Add(b[:256<<10])
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		const size = 320 << 20
		ext, _, err := Allocated(bytes.NewReader(b), size)
		if err != nil {
			return
		}
		for _, e := range ext {
			if e.Start < 0 || e.End > size || e.Start >= e.End {
				t.Fatalf("extent %v outside the device", e)
			}
		}
	})
}

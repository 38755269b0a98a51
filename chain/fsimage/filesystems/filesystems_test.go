package filesystems

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stasis-project/stasis/chain/fsimage"
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
// of the device, including the superblock; its identity is mkfs's UUID.
func TestFreshFilesystems(t *testing.T) {
	for _, fstype := range []string{"ext4", "xfs"} {
		img := mkfsImage(t, fstype, 320<<20)
		f, _ := os.Open(img)
		ext, name, err := Allocated(f, 320<<20)
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
		id, err := Identify(f, 320<<20)
		f.Close()
		want, _ := exec.Command("blkid", "-s", "UUID", "-o", "value", img).Output()
		if err != nil || id.Type != fstype || id.UUID != string(bytes.TrimSpace(want)) {
			t.Fatalf("%s: identity %+v, %v; blkid says %q", fstype, id, err, want)
		}
	}
	if _, _, err := Allocated(bytes.NewReader(make([]byte, 1<<20)), 1<<20); !errors.Is(err, fsimage.ErrNoFilesystem) {
		t.Fatalf("zeros: %v, want ErrNoFilesystem", err)
	}
	if id, err := Identify(bytes.NewReader(make([]byte, 1<<20)), 1<<20); err != nil || id != (Identity{}) {
		t.Fatalf("zeros: identity %+v, %v", id, err)
	}
}

// TestHugeBlockCount: a 64bit ext4 superblock claiming 2^60 blocks (blocks*bs overflows)
// is refused as damage, with no panic and no huge allocation. This crashed `stasis
// snapshot` and the agent once.
func TestHugeBlockCount(t *testing.T) {
	img := make([]byte, 64<<10)
	sb := img[1024:]
	binary.LittleEndian.PutUint16(sb[0x38:], 0xEF53)
	binary.LittleEndian.PutUint32(sb[0x18:], 2)      // 4 KiB blocks
	binary.LittleEndian.PutUint32(sb[0x60:], 0x80)   // 64bit
	binary.LittleEndian.PutUint16(sb[0xFE:], 64)     // descriptor size
	binary.LittleEndian.PutUint32(sb[0x4:], 1<<20)   // blocks, low
	binary.LittleEndian.PutUint32(sb[0x150:], 1<<28) // blocks, high: 2^60 blocks
	binary.LittleEndian.PutUint32(sb[0x20:], 32768)
	binary.LittleEndian.PutUint32(sb[0x28:], 8192)
	binary.LittleEndian.PutUint32(sb[0x0:], 8192)
	for _, size := range []int64{64 << 10, 1 << 62} {
		_, _, err := Allocated(bytes.NewReader(img), size)
		if !errors.Is(err, fsimage.ErrCorrupt) {
			t.Fatalf("device of %d bytes: %v, want ErrCorrupt", size, err)
		}
	}
}

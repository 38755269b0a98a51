package capture

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestUnfreezableFromKernelTrees: what /sys and /proc say is read right: device-mapper and
// md devices stacked on the volume's devices (with the mapper name and the device to use
// instead), and a writable filesystem on them mounted only in another mount namespace (one
// line per filesystem, however many processes share that namespace). A filesystem mounted
// here too, a read-only one, and another device's are not listed. This machine has no
// device-mapper or md, so the trees are built as the kernel lays them out; the mount
// namespace case runs for real in the e2e TestHiddenWriterRefused.
func TestUnfreezableFromKernelTrees(t *testing.T) {
	dir := t.TempDir()
	oldSys, oldProc := sysBlock, procDir
	sysBlock, procDir = filepath.Join(dir, "sys"), filepath.Join(dir, "proc")
	defer func() { sysBlock, procDir = oldSys, oldProc }()
	mk := func(p, content string) {
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	link := func(target, p string) {
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.Symlink(target, p); err != nil {
			t.Fatal(err)
		}
	}
	// 250:0 is the disk, 250:1 and 250:2 its partitions; dm-3 (vg-data) sits on 250:1, md127 on 250:2.
	mk(filepath.Join(dir, "devices", "dm-3", "dm", "name"), "vg-data\n")
	os.MkdirAll(filepath.Join(dir, "devices", "md127", "md"), 0o755)
	link(filepath.Join(dir, "devices", "dm-3"), filepath.Join(sysBlock, "250:1", "holders", "dm-3"))
	link(filepath.Join(dir, "devices", "md127"), filepath.Join(sysBlock, "250:2", "holders", "md127"))
	os.MkdirAll(filepath.Join(sysBlock, "250:0", "holders"), 0o755)
	link("mnt:[1]", filepath.Join(procDir, "self", "ns", "mnt"))
	info := "" +
		"30 1 250:0 / /srv rw,relatime - ext4 /dev/vdz rw\n" + // visible here as well
		"31 1 250:1 / /data rw,relatime - ext4 /dev/vdz1 rw\n" + // only there: listed
		"32 1 250:1 / /data2 rw,relatime - ext4 /dev/vdz1 rw\n" + // the same filesystem again
		"33 1 250:2 / /ro ro,relatime - ext4 /dev/vdz2 ro\n" + // read-only superblock
		"34 1 251:0 / /other rw,relatime - ext4 /dev/vdy rw\n" // not this volume
	for _, pid := range []string{"100", "101"} { // two processes of one namespace
		link("mnt:[2]", filepath.Join(procDir, pid, "ns", "mnt"))
		mk(filepath.Join(procDir, pid, "mountinfo"), info)
		mk(filepath.Join(procDir, pid, "comm"), "containerd-shim\n")
	}
	link("mnt:[1]", filepath.Join(procDir, "1", "ns", "mnt")) // this namespace: not read
	mk(filepath.Join(procDir, "1", "mountinfo"), "garbage\n")
	// Another user's process: its namespace link cannot be read without CAP_SYS_PTRACE,
	// its mountinfo can.
	mk(filepath.Join(procDir, "300", "mountinfo"), "40 1 250:2 / /x rw - ext4 /dev/vdz2 rw\n")
	mk(filepath.Join(procDir, "300", "comm"), "podman\n")

	ours := map[uint64]bool{unix.Mkdev(250, 0): true, unix.Mkdev(250, 1): true, unix.Mkdev(250, 2): true}
	got := unfreezable(ours, map[uint64]bool{unix.Mkdev(250, 0): true})
	var lines []string
	for _, u := range got {
		lines = append(lines, u.String())
	}
	all := strings.Join(lines, "\n")
	if len(got) != 4 || !strings.Contains(lines[3], "mounted at /x in another mount namespace (that of pid 300, podman)") ||
		!strings.Contains(lines[0], "/dev/dm-3 (/dev/mapper/vg-data) is stacked on") || !strings.Contains(lines[0], "make /dev/dm-3 the volume's source") ||
		!strings.Contains(lines[1], "/dev/md127 (an md array) is stacked on") ||
		!strings.Contains(lines[2], "mounted at /data in another mount namespace (that of pid 100, containerd-shim)") {
		t.Fatalf("got %d:\n%s", len(got), all)
	}
}

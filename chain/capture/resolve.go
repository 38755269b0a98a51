package capture

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Mount is one mounted filesystem on a volume.
type Mount struct {
	Point  string // a mount point where this filesystem is visible ("" if none is)
	FSType string
	// ReadOnly: the filesystem itself (its superblock) is read-only, so nothing can write
	// to it through any mount. A read-only bind mount of a writable filesystem is not.
	ReadOnly bool
	Dev      uint64 // device number of the mounted block device (partition or disk)
	// Covered lists mount points of this filesystem that show another filesystem, mounted
	// over them; if Point is "" every mount point is covered and it cannot be frozen.
	Covered []string
}

// Volume is a resolved source: the block device to read and the filesystems mounted on it.
type Volume struct {
	Device string // /dev/... block device, or the image file
	IsFile bool
	Dev    uint64 // device number (0 for a file)
	// Disk is the whole disk's device number and Start the volume's first sector on it:
	// block-layer events for a partition are reported on the whole disk.
	Disk  uint64
	Start int64
	// Mounts lists one mount per filesystem (superblock) on the device or its partitions.
	Mounts []Mount

	devs map[uint64]bool // the device and its partitions
}

// Unfreezable says what else writes to the volume where freezing its Mounts cannot stop
// it (a device stacked on it, a filesystem mounted only in another mount namespace), each
// with what to do instead: a snapshot with a freeze must refuse while there is any. It
// reads /sys and every process's mount namespace, so it is asked only where it matters.
func (v *Volume) Unfreezable() []Unfreezable {
	if v.IsFile {
		return nil
	}
	visible := map[uint64]bool{}
	for _, m := range v.Mounts {
		visible[m.Dev] = true
	}
	return unfreezable(v.devs, visible)
}

// Resolve turns --source (a block device, a partition, a mount point, or an image file)
// into a Volume, reading /proc/self/mountinfo and /sys.
func Resolve(source string) (*Volume, error) {
	st, err := os.Stat(source)
	if err != nil {
		return nil, fmt.Errorf("source %s does not exist: %w; give a block device (e.g. /dev/vdb), a mount point or an image file", source, ErrBadSource)
	}
	mounts, err := readMountinfo()
	if err != nil {
		return nil, err
	}
	var dev uint64
	switch {
	case st.IsDir():
		var sst unix.Stat_t
		if err := unix.Stat(source, &sst); err != nil {
			return nil, err
		}
		var found *mountEntry
		for i := range mounts {
			if mounts[i].point == filepath.Clean(source) {
				found = &mounts[i]
			}
		}
		if found == nil {
			return nil, fmt.Errorf("source %s is a directory but not a mount point: %w; give the mount point of the filesystem (see `findmnt -T %s`)", source, ErrBadSource, source)
		}
		dev = found.dev
		if !isBlockDev(dev) {
			return nil, fmt.Errorf("source %s is a %s filesystem without a block device: %w", source, found.fstype, ErrBadSource)
		}
		source = devPath(dev)
	case st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0:
		var sst unix.Stat_t
		if err := unix.Stat(source, &sst); err != nil {
			return nil, err
		}
		dev = sst.Rdev
	case st.Mode().IsRegular():
		return &Volume{Device: source, IsFile: true}, nil
	default:
		if _, err := OpenSource(source); err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("source %s: %w", source, ErrBadSource)
	}
	v := &Volume{Device: source, Dev: dev, Disk: dev}
	// A partition: find its disk and offset in /sys/dev/block/M:m/{partition,start,..}.
	sys := fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(dev), unix.Minor(dev))
	// A symlink into /sys/devices: resolve it, or ".." below would be taken lexically.
	if real, err := filepath.EvalSymlinks(sys); err == nil {
		sys = real
	}
	if _, err := os.Stat(filepath.Join(sys, "partition")); err == nil {
		start, err := readInt(filepath.Join(sys, "start"))
		if err != nil {
			return nil, fmt.Errorf("partition %s: %w", source, err)
		}
		parentDev, err := os.ReadFile(filepath.Join(sys, "..", "dev"))
		if err != nil {
			return nil, fmt.Errorf("partition %s: disk: %w", source, err)
		}
		v.Disk = parseDevNum(strings.TrimSpace(string(parentDev)))
		v.Start = start
	}
	// Devices in this volume: itself and, for a whole disk, its partitions.
	ours := map[uint64]bool{dev: true}
	if entries, err := os.ReadDir(sys); err == nil {
		for _, e := range entries {
			if b, err := os.ReadFile(filepath.Join(sys, e.Name(), "dev")); err == nil {
				if _, err := os.Stat(filepath.Join(sys, e.Name(), "partition")); err == nil {
					ours[parseDevNum(strings.TrimSpace(string(b)))] = true
				}
			}
		}
	}
	byDev := map[uint64]int{}
	for _, m := range mounts {
		if !ours[m.dev] {
			continue
		}
		i, ok := byDev[m.dev]
		if !ok { // one Mount per superblock: bind mounts share it
			i = len(v.Mounts)
			byDev[m.dev] = i
			v.Mounts = append(v.Mounts, Mount{FSType: m.fstype, ReadOnly: m.superRO, Dev: m.dev})
		}
		mt := &v.Mounts[i]
		if mt.Point != "" {
			continue
		}
		// The path must show this filesystem: something mounted over the point hides it.
		var st unix.Stat_t
		if err := unix.Stat(m.point, &st); err == nil && st.Dev == m.dev {
			mt.Point = m.point
		} else {
			mt.Covered = append(mt.Covered, m.point)
		}
	}
	v.devs = ours
	return v, nil
}

type mountEntry struct {
	dev     uint64
	root    string
	point   string
	fstype  string
	superRO bool // the superblock's options say ro
}

func readMountinfo() ([]mountEntry, error) {
	return readMountinfoFile(filepath.Join(procDir, "self", "mountinfo"))
}

// readMountinfoFile parses a mountinfo file: full mounts first, then bind mounts of
// subdirectories.
func readMountinfoFile(path string) ([]mountEntry, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []mountEntry
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, f := range fields {
			if f == "-" {
				sep = i
				break
			}
		}
		if len(fields) < 6 || sep < 6 || sep+1 >= len(fields) {
			continue
		}
		e := mountEntry{dev: parseDevNum(fields[2]), root: unescape(fields[3]), point: unescape(fields[4]), fstype: fields[sep+1]}
		// Per-mount options (field 6) may say ro for a read-only bind of a writable
		// filesystem; the superblock's options (after the source) say what it is.
		if sep+3 < len(fields) {
			for _, o := range strings.Split(fields[sep+3], ",") {
				if o == "ro" {
					e.superRO = true
				}
			}
		}
		if e.root != "/" {
			// A bind mount of a subdirectory: it shares the superblock; prefer the full mount.
			e.point = "\x00" + e.point
		}
		out = append(out, e)
	}
	// Full mounts first, so the mount chosen for a superblock shows the whole filesystem.
	var full, binds []mountEntry
	for _, e := range out {
		if strings.HasPrefix(e.point, "\x00") {
			e.point = e.point[1:]
			binds = append(binds, e)
		} else {
			full = append(full, e)
		}
	}
	return append(full, binds...), sc.Err()
}

// unescape decodes mountinfo's octal escapes (\040 for space and so on).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func parseDevNum(s string) uint64 {
	maj, min, ok := strings.Cut(s, ":")
	if !ok {
		return 0
	}
	a, _ := strconv.ParseUint(maj, 10, 32)
	b, _ := strconv.ParseUint(min, 10, 32)
	return unix.Mkdev(uint32(a), uint32(b))
}

func isBlockDev(dev uint64) bool {
	_, err := os.Stat(fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(dev), unix.Minor(dev)))
	return err == nil
}

// devPath finds /dev/NAME for a device number through /sys's uevent.
func devPath(dev uint64) string {
	b, err := os.ReadFile(fmt.Sprintf("/sys/dev/block/%d:%d/uevent", unix.Major(dev), unix.Minor(dev)))
	if err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if name, ok := strings.CutPrefix(line, "DEVNAME="); ok {
				return "/dev/" + name
			}
		}
	}
	return fmt.Sprintf("/dev/block/%d:%d", unix.Major(dev), unix.Minor(dev))
}

func readInt(path string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
}

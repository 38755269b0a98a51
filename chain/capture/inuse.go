package capture

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Unfreezable is something that writes to a volume where freezing its filesystems cannot
// stop it, and what to do about it.
type Unfreezable struct{ What, Fix string }

func (u Unfreezable) String() string { return u.What + "; " + u.Fix }

// sysBlock and procDir are where the kernel describes block devices and processes; tests of
// the parsing point them at trees of their own.
var (
	sysBlock = "/sys/dev/block"
	procDir  = "/proc"
)

// unfreezable describes what writes to the devices in ours (a volume's device and its
// partitions) where freezing the volume's visible filesystems cannot stop it:
//
//   - a device stacked on one of them (a device-mapper target: LVM, dm-crypt; an md array):
//     the filesystems on it are not on this volume's list, so they are not frozen;
//   - a filesystem on one of them mounted only in another mount namespace (a container's),
//     which this process cannot see, let alone freeze.
//
// A snapshot taken while either writes would be torn, whatever its label said. Active swap
// on a partition is not listed: its content is worthless after a restore anyway, and a whole
// disk with a swap partition is the usual VM layout.
func unfreezable(ours map[uint64]bool, visible map[uint64]bool) []Unfreezable {
	var out []Unfreezable
	devs := make([]uint64, 0, len(ours))
	for d := range ours {
		devs = append(devs, d)
	}
	sort.Slice(devs, func(i, j int) bool { return devs[i] < devs[j] })
	for _, d := range devs {
		dir := filepath.Join(sysBlock, fmt.Sprintf("%d:%d", unix.Major(d), unix.Minor(d)), "holders")
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			what := "/dev/" + e.Name()
			if name, err := os.ReadFile(filepath.Join(dir, e.Name(), "dm", "name")); err == nil {
				what += " (/dev/mapper/" + strings.TrimSpace(string(name)) + ")"
			} else if strings.HasPrefix(e.Name(), "md") {
				what += " (an md array)"
			}
			out = append(out, Unfreezable{
				What: fmt.Sprintf("%s is stacked on %s: the filesystems on it are not frozen with this volume's", what, devPath(d)),
				Fix:  fmt.Sprintf("make /dev/%s the volume's source: its filesystems are frozen there", e.Name())})
		}
	}
	return append(out, hiddenMounts(ours, visible)...)
}

// hiddenMounts lists filesystems on the devices in ours mounted in another mount namespace
// and nowhere in this one (visible: the devices mounted here). One line per filesystem.
func hiddenMounts(ours map[uint64]bool, visible map[uint64]bool) []Unfreezable {
	self, _ := os.Readlink(filepath.Join(procDir, "self", "ns", "mnt"))
	pids, _ := filepath.Glob(filepath.Join(procDir, "[0-9]*"))
	sort.Slice(pids, func(i, j int) bool { return pidOf(pids[i]) < pidOf(pids[j]) })
	seenNS := map[string]bool{self: true}
	seenDev := map[uint64]bool{}
	var out []Unfreezable
	for _, p := range pids {
		// Reading another user's namespace link takes CAP_SYS_PTRACE, which the service
		// does not have; its mountinfo is readable all the same, so read that.
		ns, err := os.Readlink(filepath.Join(p, "ns", "mnt"))
		if err != nil {
			ns = p
		}
		if seenNS[ns] {
			continue
		}
		seenNS[ns] = true
		entries, err := readMountinfoFile(filepath.Join(p, "mountinfo"))
		if err != nil {
			continue // the process went
		}
		for _, m := range entries {
			if !ours[m.dev] || visible[m.dev] || seenDev[m.dev] || m.superRO {
				continue
			}
			seenDev[m.dev] = true
			comm, _ := os.ReadFile(filepath.Join(p, "comm"))
			out = append(out, Unfreezable{
				What: fmt.Sprintf("%s is mounted at %s in another mount namespace (that of pid %d, %s), where stasis cannot freeze it", devPath(m.dev), m.point, pidOf(p), strings.TrimSpace(string(comm))),
				Fix:  "unmount it there, or run stasis in that mount namespace"})
		}
	}
	return out
}

func pidOf(dir string) int {
	n, _ := strconv.Atoi(filepath.Base(dir))
	return n
}

package testenv

import (
	"bufio"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// FreeRanges lists the free byte ranges of the ext4 or XFS filesystem in img, as the
// filesystem's own tools (dumpe2fs, xfs_db) report them: an oracle independent of stasis.
func FreeRanges(t testing.TB, fstype, img string) [][2]int64 {
	t.Helper()
	var out [][2]int64
	switch fstype {
	case "ext4":
		b, err := exec.Command("dumpe2fs", img).Output()
		if err != nil {
			t.Fatalf("dumpe2fs: %v", err)
		}
		var bs int64
		sc := bufio.NewScanner(strings.NewReader(string(b)))
		for sc.Scan() {
			line := sc.Text()
			if v, ok := strings.CutPrefix(line, "Block size:"); ok {
				bs, _ = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			}
			v, ok := strings.CutPrefix(line, "  Free blocks: ")
			if !ok || bs == 0 {
				continue
			}
			for _, r := range strings.Split(v, ", ") {
				a, z, found := strings.Cut(strings.TrimSpace(r), "-")
				if !found {
					z = a
				}
				x, err1 := strconv.ParseInt(a, 10, 64)
				y, err2 := strconv.ParseInt(z, 10, 64)
				if err1 == nil && err2 == nil {
					out = append(out, [2]int64{x * bs, (y + 1) * bs})
				}
			}
		}
	case "xfs":
		geo, err := exec.Command("xfs_db", "-r", "-c", "sb 0", "-c", "p blocksize agblocks", img).Output()
		if err != nil {
			t.Fatalf("xfs_db: %v", err)
		}
		var bs, agBlocks int64
		for _, line := range strings.Split(string(geo), "\n") {
			k, v, _ := strings.Cut(line, " = ")
			n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			switch strings.TrimSpace(k) {
			case "blocksize":
				bs = n
			case "agblocks":
				agBlocks = n
			}
		}
		b, err := exec.Command("xfs_db", "-r", "-c", "freesp -d", img).Output()
		if err != nil {
			t.Fatalf("xfs_db freesp: %v", err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) != 3 {
				continue
			}
			ag, err1 := strconv.ParseInt(f[0], 10, 64)
			bno, err2 := strconv.ParseInt(f[1], 10, 64)
			n, err3 := strconv.ParseInt(f[2], 10, 64)
			if err1 == nil && err2 == nil && err3 == nil {
				start := (ag*agBlocks + bno) * bs
				out = append(out, [2]int64{start, start + n*bs})
			}
		}
	default:
		t.Fatalf("no free-space oracle for %s", fstype)
	}
	if len(out) == 0 {
		t.Fatalf("%s reported no free space in %s", fstype, img)
	}
	return out
}

// ZeroRanges overwrites byte ranges of a file with zeros.
func ZeroRanges(t testing.TB, path string, ranges [][2]int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zero := make([]byte, 1<<20)
	for _, r := range ranges {
		for off := r[0]; off < r[1]; off += int64(len(zero)) {
			n := min(int64(len(zero)), r[1]-off)
			if _, err := f.WriteAt(zero[:n], off); err != nil {
				t.Fatal(err)
			}
		}
	}
}

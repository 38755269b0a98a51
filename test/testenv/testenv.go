// Package testenv gives integration tests the real things they drive: the stasis binary,
// loop devices, filesystems and mounts. Everything it creates is removed by t.Cleanup.
// Tests that need root skip with a clear reason when not run as root; CI runs as root.
package testenv

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// RequireRoot skips the test unless it runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (loop devices, mounts, freezing); CI runs it as root")
	}
}

// RequireTool skips the test if a command is missing.
func RequireTool(t testing.TB, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Skipf("needs %s (installed by .ci/run): %v", name, err)
	}
}

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// scratch is the test process's directory for the binary and the index cache (see Main).
var scratch string

// Main runs a package's tests (from TestMain) with one scratch directory for the stasis
// binary and, through STASIS_CACHE_DIR, every stasis process's index cache; it is removed
// afterwards, so runs leave nothing in /var/cache/stasis or /tmp.
func Main(m *testing.M) {
	dir, err := os.MkdirTemp("", "stasis-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	scratch = dir
	if os.Getenv("STASIS_CACHE_DIR") == "" {
		os.Setenv("STASIS_CACHE_DIR", filepath.Join(dir, "cache"))
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// Binary builds cmd/stasis once per test process and returns its path.
func Binary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Join(filepath.Dir(file), "..", "..")
		dir := scratch
		if dir == "" {
			var err error
			if dir, err = os.MkdirTemp("", "stasis-bin-"); err != nil {
				buildErr = err
				return
			}
		}
		binPath = filepath.Join(dir, "stasis")
		cmd := exec.Command("go", "build", "-o", binPath, "./cmd/stasis")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0") // as make build: the binary users get
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// Result is a finished command.
type Result struct {
	Stdout, Stderr string
	Code           int
	MaxRSSKiB      int64
}

// Stasis runs the binary with args and returns what it printed and its exit status.
func Stasis(t testing.TB, args ...string) Result {
	t.Helper()
	return StasisEnv(t, nil, args...)
}

// StasisPeakRSS runs the binary under /usr/bin/time and returns its peak RSS too. The
// rusage of a child started straight from the test would not do: Linux carries the
// parent's high-water RSS into a vfork-exec'd child's ru_maxrss, and this test process is
// large. time(1) is a small parent.
func StasisPeakRSS(t testing.TB, args ...string) Result {
	t.Helper()
	RequireTool(t, "/usr/bin/time")
	out := filepath.Join(t.TempDir(), "rss")
	res := run(t, exec.Command("/usr/bin/time", append([]string{"-f", "%M", "-o", out, Binary(t)}, args...)...))
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatalf("time(1) wrote no report: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	fmt.Sscan(lines[len(lines)-1], &res.MaxRSSKiB)
	return res
}

// run runs cmd, capturing its output and exit status; it fails the test only if the
// command could not run at all.
func run(t testing.TB, cmd *exec.Cmd) Result {
	t.Helper()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	res := Result{Stdout: out.String(), Stderr: errb.String()}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		res.Code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run %v: %v", cmd.Args, err)
	}
	return res
}

// MustStasis runs the binary and fails the test on a non-zero exit.
func MustStasis(t testing.TB, args ...string) string {
	t.Helper()
	r := Stasis(t, args...)
	if r.Code != 0 {
		t.Fatalf("stasis %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.Code, r.Stdout, r.Stderr)
	}
	return r.Stdout
}

// Run runs a command and fails the test if it fails.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// LoopDevice attaches a new sparse image of size bytes to a loop device.
func LoopDevice(t testing.TB, size int64) (dev, img string) {
	t.Helper()
	RequireRoot(t)
	img = filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	dev = strings.TrimSpace(Run(t, "losetup", "-f", "--show", img))
	t.Cleanup(func() {
		for i := 0; i < 50; i++ { // the kernel may hold it briefly after an unmount
			if exec.Command("losetup", "-d", dev).Run() == nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Errorf("could not detach %s", dev)
	})
	return dev, img
}

// Mkfs makes a filesystem (ext4 or xfs) on dev.
func Mkfs(t testing.TB, fstype, dev string) {
	t.Helper()
	switch fstype {
	case "ext4":
		Run(t, "mkfs.ext4", "-q", "-F", dev)
	case "xfs":
		RequireTool(t, "mkfs.xfs")
		Run(t, "mkfs.xfs", "-q", "-f", dev)
	default:
		t.Fatalf("unknown filesystem %s", fstype)
	}
}

// Mount mounts dev on a new directory and unmounts it at cleanup.
func Mount(t testing.TB, dev string, opts ...string) string {
	t.Helper()
	dir := t.TempDir()
	args := append(append([]string{}, opts...), dev, dir)
	Run(t, "mount", args...)
	t.Cleanup(func() {
		// A failed test may leave the filesystem frozen (that failure is reported by the
		// test itself): thaw it, or the unmount would hang or leave it frozen for good.
		exec.Command("fsfreeze", "-u", dir).Run()
		for i := 0; i < 50; i++ {
			if exec.Command("mountpoint", "-q", dir).Run() != nil || exec.Command("umount", dir).Run() == nil {
				return // unmounted already by the test, or now
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Errorf("could not unmount %s", dir)
	})
	return dir
}

// HashFile returns the SHA-256 of a file or device (first size bytes if size > 0).
func HashFile(t testing.TB, path string, size int64) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	var r io.Reader = f
	if size > 0 {
		r = io.LimitReader(f, size)
	}
	if _, err := io.CopyBuffer(h, r, make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// TreeDigest summarises every file under dir (names, sizes, contents), to show that a
// failed command left a repository unchanged.
func TreeDigest(t testing.TB, dir string) string {
	t.Helper()
	h := sha256.New()
	err := filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if rel == "lock" { // the lock file's holder line is rewritten by every writer
			return nil
		}
		fmt.Fprintf(h, "%s %v %d\n", rel, info.Mode(), info.Size())
		if info.Mode().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			h.Write(b)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// StasisEnv runs the binary with extra environment variables.
func StasisEnv(t testing.TB, env []string, args ...string) Result {
	t.Helper()
	cmd := exec.Command(Binary(t), args...)
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	return run(t, cmd)
}

// WritableWithin reports whether a file can be created and fsynced in dir within d: a
// frozen filesystem blocks the write.
func WritableWithin(dir string, d time.Duration) bool {
	done := make(chan error, 1)
	go func() {
		f, err := os.CreateTemp(dir, "probe-")
		if err == nil {
			_, err = f.WriteString("probe")
			if err == nil {
				err = f.Sync()
			}
			f.Close()
			os.Remove(f.Name())
		}
		done <- err
	}()
	select {
	case err := <-done:
		return err == nil
	case <-time.After(d):
		return false
	}
}

// PartitionedLoop attaches a new image with an MBR partition table holding one partition
// that starts 17 MiB in (so partition and disk sectors differ), and returns the partition's
// device.
func PartitionedLoop(t testing.TB, size int64) (part, disk string) {
	t.Helper()
	RequireRoot(t)
	img := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(size)
	f.Close()
	disk, parts := AttachPartitioned(t, img, "start=34816, type=83\n")
	return parts[0], disk
}

// AttachPartitioned writes the sfdisk script layout to the image file img, attaches it to
// a loop device with its partitions, and returns the disk and partition devices. The loop
// device is detached at cleanup.
func AttachPartitioned(t testing.TB, img, layout string) (disk string, parts []string) {
	t.Helper()
	RequireRoot(t)
	RequireTool(t, "sfdisk")
	RunInput(t, strings.NewReader(layout), "sfdisk", "-q", img)
	disk = strings.TrimSpace(Run(t, "losetup", "-f", "-P", "--show", img))
	t.Cleanup(func() {
		for i := 0; i < 50; i++ {
			if exec.Command("losetup", "-d", disk).Run() == nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Errorf("could not detach %s", disk)
	})
	n := strings.Count(strings.TrimSpace(layout), "\n") + 1
	for k := 1; k <= n; k++ {
		part := fmt.Sprintf("%sp%d", disk, k)
		if _, err := os.Stat(part); err != nil {
			exec.Command("partx", "-a", disk).Run() // where the kernel's scan did not add it
		}
		for i := 0; ; i++ {
			if _, err := os.Stat(part); err == nil {
				break
			}
			if i == 50 {
				t.Fatalf("partition %s did not appear", part)
			}
			time.Sleep(100 * time.Millisecond)
		}
		// udev is not there to settle it: wait until the kernel reports its size.
		for i := 0; i < 50; i++ {
			if b, err := os.ReadFile(fmt.Sprintf("/sys/class/block/%s/size", filepath.Base(part))); err == nil && strings.TrimSpace(string(b)) != "0" {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		parts = append(parts, part)
	}
	return disk, parts
}

// RunInput runs a command with stdin and fails the test if it fails.
func RunInput(t testing.TB, stdin io.Reader, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Stdin = stdin
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// ZramDevice creates a new zram device of size bytes (a bio-based block device, like
// device-mapper and md) and removes it at cleanup. Devices the test did not create (zram0
// may be someone's swap) are never touched.
func ZramDevice(t testing.TB, size int64) string {
	t.Helper()
	RequireRoot(t)
	b, err := os.ReadFile("/sys/class/zram-control/hot_add")
	if err != nil {
		if _, serr := os.Stat("/sys/class/zram-control"); serr != nil {
			exec.Command("modprobe", "zram", "num_devices=0").Run()
			b, err = os.ReadFile("/sys/class/zram-control/hot_add")
		}
		if err != nil {
			t.Skipf("zram is not available: %v", err)
		}
	}
	n := strings.TrimSpace(string(b))
	dev := "/dev/zram" + n
	t.Cleanup(func() {
		for i := 0; i < 50; i++ { // an unmount may still be releasing it
			if os.WriteFile("/sys/class/zram-control/hot_remove", []byte(n), 0) == nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Errorf("could not remove %s", dev)
	})
	if err := os.WriteFile("/sys/block/zram"+n+"/disksize", []byte(fmt.Sprint(size)), 0); err != nil {
		t.Fatalf("zram%s disksize: %v", n, err)
	}
	for i := 0; i < 50; i++ {
		if _, err := os.Stat(dev); err == nil {
			return dev
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s did not appear", dev)
	return ""
}

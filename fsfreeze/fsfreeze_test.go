package fsfreeze_test

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stasis-project/stasis/fsfreeze"
	"github.com/stasis-project/stasis/test/testenv"
)

// TestMain doubles as the guard process: the tests start their own binary with
// STASIS_TEST_GUARD=1 as the guard command.
func TestMain(m *testing.M) {
	if os.Getenv("STASIS_TEST_GUARD") == "1" {
		args := os.Args[1:]
		// --deadline D --state FILE -- TARGETS...
		deadline, _ := time.ParseDuration(args[1])
		if err := fsfreeze.RunGuard(deadline, args[3], args[5:]); err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func guardCommand(t *testing.T) []string {
	t.Setenv("STASIS_TEST_GUARD", "1")
	return []string{os.Args[0]}
}

func mounted(t *testing.T) string {
	dev, _ := testenv.LoopDevice(t, 64<<20)
	testenv.Mkfs(t, "ext4", dev)
	return testenv.Mount(t, dev)
}

func target(t *testing.T, path string) fsfreeze.Target {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return fsfreeze.Target{Path: path, Dev: st.Dev}
}

// TestFreezeThaw: writers block while frozen and proceed after Thaw; the state file exists
// exactly while frozen; the frozen time is reported; the guard exits cleanly.
func TestFreezeThaw(t *testing.T) {
	mnt := mounted(t)
	state := t.TempDir()
	fz, err := fsfreeze.Freeze([]fsfreeze.Target{target(t, mnt)}, fsfreeze.Options{MaxFreeze: 5 * time.Second, StateDir: state, GuardCommand: guardCommand(t)})
	if err != nil {
		t.Fatal(err)
	}
	if files, _ := filepath.Glob(filepath.Join(state, "frozen-*.json")); len(files) != 1 {
		t.Fatalf("state files while frozen: %v", files)
	}
	if testenv.WritableWithin(mnt, 300*time.Millisecond) {
		t.Fatal("a write went through while frozen")
	}
	if frozen, err := fsfreeze.IsFrozen(mnt); err != nil || !frozen {
		t.Fatalf("IsFrozen = %v, %v", frozen, err)
	}
	d, err := fz.Thaw()
	if err != nil || d < 300*time.Millisecond {
		t.Fatalf("Thaw = %v, %v", d, err)
	}
	if !testenv.WritableWithin(mnt, 2*time.Second) {
		t.Fatal("still frozen after Thaw")
	}
	if files, _ := filepath.Glob(filepath.Join(state, "frozen-*.json")); len(files) != 0 {
		t.Fatalf("state files left after thaw: %v", files)
	}
}

// TestDeadline: past MaxFreeze the filesystem thaws by itself and Thaw reports ErrTimeout.
func TestDeadline(t *testing.T) {
	mnt := mounted(t)
	fz, err := fsfreeze.Freeze([]fsfreeze.Target{target(t, mnt)}, fsfreeze.Options{MaxFreeze: 200 * time.Millisecond, StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if !testenv.WritableWithin(mnt, 2*time.Second) {
		t.Fatal("the deadline did not thaw")
	}
	if _, err := fz.Thaw(); !errors.Is(err, fsfreeze.ErrTimeout) {
		t.Fatalf("Thaw after the deadline: %v, want ErrTimeout", err)
	}
}

// TestOnlyWhatWeFroze: a filesystem someone else froze is refused and left frozen; the same
// superblock twice (a bind mount) is refused before anything is frozen.
func TestOnlyWhatWeFroze(t *testing.T) {
	mnt := mounted(t)
	testenv.Run(t, "fsfreeze", "-f", mnt)
	defer testenv.Run(t, "fsfreeze", "-u", mnt)
	if _, err := fsfreeze.Freeze([]fsfreeze.Target{target(t, mnt)}, fsfreeze.Options{MaxFreeze: time.Second, StateDir: t.TempDir(), GuardCommand: guardCommand(t)}); !errors.Is(err, fsfreeze.ErrAlreadyFrozen) {
		t.Fatalf("freezing a frozen fs: %v", err)
	}
	time.Sleep(200 * time.Millisecond) // what a guard would need to thaw it by mistake
	if frozen, _ := fsfreeze.IsFrozen(mnt); !frozen {
		t.Fatal("stasis thawed a filesystem it did not freeze")
	}
	testenv.Run(t, "fsfreeze", "-u", mnt)
	bind := testenv.Mount(t, mnt, "--bind")
	if _, err := fsfreeze.Freeze([]fsfreeze.Target{{Path: mnt}, {Path: bind}}, fsfreeze.Options{MaxFreeze: time.Second, StateDir: t.TempDir()}); err == nil {
		t.Fatal("the same superblock twice was accepted")
	}
	if !testenv.WritableWithin(mnt, time.Second) {
		t.Fatal("a refused freeze left the filesystem frozen")
	}
	testenv.Run(t, "fsfreeze", "-f", mnt) // for the deferred -u
}

// TestCovered: a mount point with another filesystem mounted over it is refused: freezing
// through it would freeze the wrong filesystem.
func TestCovered(t *testing.T) {
	mnt := mounted(t)
	want := target(t, mnt)
	over := mounted(t)
	testenv.Run(t, "mount", "--bind", over, mnt)
	defer exec.Command("umount", mnt).Run()
	_, err := fsfreeze.Freeze([]fsfreeze.Target{want}, fsfreeze.Options{MaxFreeze: time.Second, StateDir: t.TempDir()})
	if !errors.Is(err, fsfreeze.ErrCovered) {
		t.Fatalf("freezing a covered mount point: %v, want ErrCovered", err)
	}
	if !testenv.WritableWithin(over, time.Second) {
		t.Fatal("the filesystem mounted over the point was frozen")
	}
}

// TestThawedEarly: a thaw by someone else inside the window is reported, so the caller does
// not take the window as point-in-time.
func TestThawedEarly(t *testing.T) {
	mnt := mounted(t)
	fz, err := fsfreeze.Freeze([]fsfreeze.Target{target(t, mnt)}, fsfreeze.Options{MaxFreeze: 5 * time.Second, StateDir: t.TempDir(), GuardCommand: guardCommand(t)})
	if err != nil {
		t.Fatal(err)
	}
	testenv.Run(t, "fsfreeze", "-u", mnt)
	if _, err := fz.Thaw(); !errors.Is(err, fsfreeze.ErrThawedEarly) {
		t.Fatalf("Thaw after someone else thawed: %v, want ErrThawedEarly", err)
	}
}

// guardHarness plays the freezer's side of the guard protocol by hand.
type guardHarness struct {
	cmd  *exec.Cmd
	pipe *os.File
	out  io.Reader
}

func startGuardByHand(t *testing.T, deadline time.Duration, state string, mnt string) *guardHarness {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "--deadline", deadline.String(), "--state", state, "--", mnt+"=0")
	cmd.Env = append(os.Environ(), "STASIS_TEST_GUARD=1")
	cmd.ExtraFiles = []*os.File{r}
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r.Close()
	buf := make([]byte, 6)
	if _, err := io.ReadFull(out, buf); err != nil || string(buf) != "ready\n" {
		t.Fatalf("guard said %q, %v", buf, err)
	}
	t.Cleanup(func() { w.Close(); cmd.Process.Kill(); cmd.Wait() })
	return &guardHarness{cmd: cmd, pipe: w, out: out}
}

// TestGuardFreezerDies: when the freezer's end of the pipe closes without "done", the guard
// thaws what was being frozen and removes the state file.
func TestGuardFreezerDies(t *testing.T) {
	mnt := mounted(t)
	state := filepath.Join(t.TempDir(), "frozen-1.json")
	os.WriteFile(state, []byte("{}"), 0o600)
	g := startGuardByHand(t, time.Minute, state, mnt)
	io.WriteString(g.pipe, "start\nfreezing 0\n")
	testenv.Run(t, "fsfreeze", "-f", mnt)
	g.pipe.Close() // the freezer died
	if err := g.cmd.Wait(); err != nil {
		t.Fatalf("guard: %v", err)
	}
	if !testenv.WritableWithin(mnt, time.Second) {
		t.Fatal("the guard did not thaw after the freezer died")
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Fatalf("state file after a clean thaw: %v", err)
	}
}

// TestGuardOutlivesSlowFreeze: past its deadline the guard thaws, and keeps thawing while
// the freezer lives: a FIFREEZE that completes after the deadline is undone too. It never
// thaws a filesystem the freezer said was not its own.
func TestGuardOutlivesSlowFreeze(t *testing.T) {
	mnt := mounted(t)
	g := startGuardByHand(t, 200*time.Millisecond, "", mnt)
	io.WriteString(g.pipe, "start\nfreezing 0\n")
	testenv.Run(t, "fsfreeze", "-f", mnt)
	if !testenv.WritableWithin(mnt, 2*time.Second) {
		t.Fatal("the guard did not thaw at its deadline")
	}
	testenv.Run(t, "fsfreeze", "-f", mnt) // a late FIFREEZE of ours completes
	if !testenv.WritableWithin(mnt, 2*time.Second) {
		t.Fatal("the guard did not thaw a freeze that completed after its deadline")
	}
	io.WriteString(g.pipe, "notours 0\n")
	time.Sleep(100 * time.Millisecond)
	testenv.Run(t, "fsfreeze", "-f", mnt) // now someone else's
	defer testenv.Run(t, "fsfreeze", "-u", mnt)
	time.Sleep(400 * time.Millisecond)
	if frozen, _ := fsfreeze.IsFrozen(mnt); !frozen {
		t.Fatal("the guard thawed a filesystem that was not ours")
	}
	io.WriteString(g.pipe, "done\n")
	g.pipe.Close()
	outb, _ := io.ReadAll(g.out)
	if err := g.cmd.Wait(); err != nil || !strings.Contains(string(outb), "thawed 0") {
		t.Fatalf("guard: %v, said %q", err, outb)
	}
}

// TestSlowFIFREEZE: a FIFREEZE that outlasts max-freeze (its filesystem's image sits on a
// frozen filesystem, so its dirty data cannot be written) makes Freeze thaw it as soon as it
// returns, freeze nothing more, and fail with the reason.
func TestSlowFIFREEZE(t *testing.T) {
	outer := mounted(t)
	img := filepath.Join(outer, "inner.img")
	testenv.Run(t, "truncate", "-s", "64M", img)
	testenv.Run(t, "mkfs.ext4", "-q", "-F", img)
	inner := strings.TrimSpace(testenv.Run(t, "losetup", "-f", "--show", img))
	t.Cleanup(func() { exec.Command("losetup", "-d", inner).Run() })
	p1 := testenv.Mount(t, inner)
	p2 := mounted(t)
	if err := os.WriteFile(filepath.Join(p1, "dirty"), make([]byte, 16<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	testenv.Run(t, "fsfreeze", "-f", outer)
	unfrozen := make(chan struct{})
	go func() {
		time.Sleep(1500 * time.Millisecond)
		exec.Command("fsfreeze", "-u", outer).Run()
		close(unfrozen)
	}()
	t.Cleanup(func() { <-unfrozen })
	start := time.Now()
	// No guard: Freeze itself must undo the late FIFREEZE (a guard would thaw it later).
	_, err := fsfreeze.Freeze([]fsfreeze.Target{target(t, p1), target(t, p2)}, fsfreeze.Options{MaxFreeze: 500 * time.Millisecond, StateDir: t.TempDir()})
	if !errors.Is(err, fsfreeze.ErrTimeout) || !strings.Contains(err.Error(), "FIFREEZE took") {
		t.Fatalf("after %s: %v, want the slow FIFREEZE reported as a timeout", time.Since(start), err)
	}
	for _, m := range []string{p1, p2} {
		if frozen, _ := fsfreeze.IsFrozen(m); frozen {
			t.Fatalf("%s is frozen after the failed freeze", m)
		}
	}
}

// TestThawAll thaws what a state file names, as after the freezer and its guard died.
func TestThawAll(t *testing.T) {
	mnt := mounted(t)
	state := t.TempDir()
	testenv.Run(t, "fsfreeze", "-f", mnt)
	os.WriteFile(filepath.Join(state, "frozen-999999-1.json"), []byte(`{"pid":999999,"mounts":["`+mnt+`"]}`), 0o600)
	thawed, err := fsfreeze.ThawAll(state)
	if err != nil || len(thawed) != 1 || thawed[0] != mnt {
		t.Fatalf("ThawAll = %v, %v", thawed, err)
	}
	if !testenv.WritableWithin(mnt, time.Second) {
		t.Fatal("still frozen after ThawAll")
	}
	if files, _ := filepath.Glob(filepath.Join(state, "*")); len(files) != 0 {
		t.Fatalf("state files left: %v", files)
	}
}

// TestPreparedAhead: a freeze prepared long before it is used (the guard started while the
// rounds read) behaves as one made at once: nothing is frozen and no state file exists
// until Freeze, and the guard's deadline runs from the freeze, not from its start. A
// prepared freeze closed unused leaves no guard process behind.
func TestPreparedAhead(t *testing.T) {
	mnt := mounted(t)
	state := t.TempDir()
	opts := fsfreeze.Options{MaxFreeze: 300 * time.Millisecond, StateDir: state, GuardCommand: guardCommand(t)}
	p, err := fsfreeze.Prepare([]fsfreeze.Target{target(t, mnt)}, opts)
	if err != nil {
		t.Fatal(err)
	}
	if len(children(t)) != 1 {
		t.Fatalf("guard processes after Prepare: %v", children(t))
	}
	time.Sleep(1500 * time.Millisecond) // past the guard's deadline (max-freeze + 1 s) had it started
	if frozen, _ := fsfreeze.IsFrozen(mnt); frozen {
		t.Fatal("frozen before Freeze")
	}
	if files, _ := filepath.Glob(filepath.Join(state, "frozen-*.json")); len(files) != 0 {
		t.Fatalf("state files before Freeze: %v", files)
	}
	fz, err := p.Freeze()
	if err != nil {
		t.Fatal(err)
	}
	if frozen, _ := fsfreeze.IsFrozen(mnt); !frozen {
		t.Fatal("not frozen after Freeze")
	}
	if _, err := fz.Thaw(); err != nil {
		t.Fatalf("Thaw: %v (the guard's deadline ran from its start?)", err)
	}
	p, err = fsfreeze.Prepare([]fsfreeze.Target{target(t, mnt)}, opts)
	if err != nil {
		t.Fatal(err)
	}
	p.Close()
	if c := children(t); len(c) != 0 {
		t.Fatalf("processes left after Close: %v", c)
	}
	if !testenv.WritableWithin(mnt, time.Second) {
		t.Fatal("not writable after Close")
	}
}

// children lists this process's live child processes.
func children(t *testing.T) []string {
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	var out []string
	for _, s := range stats {
		b, err := os.ReadFile(s)
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...
		rest := string(b[strings.LastIndexByte(string(b), ')')+2:])
		f := strings.Fields(rest)
		if len(f) > 1 && f[1] == fmt.Sprint(os.Getpid()) && f[0] != "Z" {
			out = append(out, s)
		}
	}
	return out
}

package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stasis-project/stasis/test/testenv"
)

// configuredAgent is an agent started on a configuration the test wrote.
type configuredAgent struct {
	cfg, repo string
	log       *testLog
	stop      func() // SIGTERM and wait; safe to call more than once
}

// stopAgent stops the agent as systemd does, waiting for it to exit.
func stopAgent(t *testing.T, a *configuredAgent) {
	t.Helper()
	a.stop()
}

// startAgent writes a configuration with body (volumes:, groups:) and starts the agent with
// env, waiting until it answers on its socket.
func startAgent(t *testing.T, body string, env ...string) *configuredAgent {
	t.Helper()
	return startAgentWrapped(t, nil, body, env...)
}

// startAgentWrapped is startAgent with the agent run under a wrapper command (prlimit...).
func startAgentWrapped(t *testing.T, wrapper []string, body string, env ...string) *configuredAgent {
	t.Helper()
	dir := t.TempDir()
	a := &configuredAgent{cfg: filepath.Join(dir, "stasis.yaml"), repo: filepath.Join(dir, "repo")}
	cfg := fmt.Sprintf("repository: %s\nmount: \"\"\nstate_dir: %s\nsocket: %s\ncatch_up: false\n%s",
		a.repo, filepath.Join(dir, "state"), filepath.Join(dir, "sock"), body)
	if err := os.WriteFile(a.cfg, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	argv := append(append([]string(nil), wrapper...), testenv.Binary(t), "agent", "--config", a.cfg)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	a.log = &testLog{t: t}
	cmd.Stderr = a.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	a.stop = func() { once.Do(func() { cmd.Process.Signal(unix.SIGTERM); cmd.Wait() }) }
	t.Cleanup(a.stop)
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if testenv.Stasis(t, "--config", a.cfg, "status").Code == 0 {
			return a
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent did not answer:\n%s", a.log.String())
		}
	}
}

// snapshot takes a snapshot of a volume or group through the agent; a group gives one
// entry per member.
func (a *configuredAgent) snapshot(t *testing.T, name, snap string) []snapOut {
	t.Helper()
	r := testenv.Stasis(t, "--config", a.cfg, "snapshot", name, "--name", snap, "--json")
	if r.Code != 0 {
		t.Fatalf("snapshot %s: %s\n%s", name, r.Stderr, a.log.String())
	}
	var outs []snapOut
	if strings.HasPrefix(strings.TrimSpace(r.Stdout), "[") {
		if err := json.Unmarshal([]byte(r.Stdout), &outs); err != nil {
			t.Fatal(err)
		}
		return outs
	}
	var one snapOut
	if err := json.Unmarshal([]byte(r.Stdout), &one); err != nil {
		t.Fatal(err)
	}
	return []snapOut{one}
}

// TestAgentTrackedZram: on a bio-based device (zram, as LVM, dm-crypt and md), the agent's
// tracker proves it sees the device and 10 consecutive tracked incrementals, with writers
// running, each equal the device at the freeze instant.
func TestAgentTrackedZram(t *testing.T) {
	for _, fstype := range []string{"ext4", "xfs"} {
		t.Run(fstype, func(t *testing.T) {
			dev := testenv.ZramDevice(t, 320<<20) // XFS needs 300 MB
			testenv.Mkfs(t, fstype, dev)
			mnt := testenv.Mount(t, dev)
			w := testenv.StartWriters(t, mnt, 2, 5)
			frozen := filepath.Join(t.TempDir(), "frozen.img")
			a := startAgent(t, fmt.Sprintf("volumes:\n  - name: z\n    source: %s\n    schedules: []\n    max_freeze: 30s\n", mnt),
				"STASIS_TEST_FREEZE_HOOK="+copyDeviceHook(dev, frozen))
			tracked := 0
			for i := 0; i < 11; i++ {
				s := a.snapshot(t, "z", fmt.Sprint("a", i))[0]
				if s.Consistency != "fs-frozen" {
					t.Fatalf("snapshot %d: %+v", i, s)
				}
				if i > 0 {
					if s.Capture["tracking"] != "tracked" {
						t.Fatalf("snapshot %d is not a tracked incremental: %v", i, s.Capture)
					}
					tracked++
				}
				img := filepath.Join(t.TempDir(), "export.img")
				testenv.MustStasis(t, "export", "-r", a.repo, fmt.Sprintf("z/a%d", i), img)
				assertSameAllocated(t, fstype, frozen, img, fmt.Sprintf("snapshot %d (%v, read %d bytes)", i, s.Capture["tracking"], s.BytesRead))
				os.Remove(img)
				time.Sleep(100 * time.Millisecond)
			}
			if tracked != 10 || w.Written.Load() == 0 {
				t.Fatalf("%d tracked incrementals, writers wrote %d bytes", tracked, w.Written.Load())
			}
		})
	}
}

// TestTrackerSelfProof: a tracker watching the wrong device (it sees none of the volume's
// I/O) is caught by its proof read: the snapshot says it is untracked and why, reads the
// volume whole and compares it while frozen, and is still exact. Without the proof, its
// empty dirty sets would be trusted and the writes made during the copy lost.
func TestTrackerSelfProof(t *testing.T) {
	dev, _ := testenv.LoopDevice(t, 256<<20)
	other, _ := testenv.LoopDevice(t, 256<<20)
	testenv.Mkfs(t, "ext4", dev)
	mnt := testenv.Mount(t, dev)
	repo := newRepo(t)
	testenv.StartWriters(t, mnt, 3, 9)
	time.Sleep(300 * time.Millisecond)
	var st unix.Stat_t
	if err := unix.Stat(other, &st); err != nil {
		t.Fatal(err)
	}
	wrong := fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	frozen := filepath.Join(t.TempDir(), "frozen.img")
	for i := 0; i < 3; i++ {
		r := testenv.StasisEnv(t, []string{"STASIS_TEST_TRACKER_DISK=" + wrong, "STASIS_TEST_FREEZE_HOOK=" + copyDeviceHook(dev, frozen)},
			"snapshot", "-r", repo, "--source", mnt, "--volume", "p", "--name", fmt.Sprint("p", i), "--json", "--max-freeze", "30s")
		if r.Code != 0 {
			t.Fatalf("snapshot: %s", r.Stderr)
		}
		var s snapOut
		json.Unmarshal([]byte(r.Stdout), &s)
		why, _ := s.Capture["untracked"].(string)
		if s.Capture["tracking"] != "untracked" || !strings.Contains(why, "proof read") || s.Consistency != "fs-frozen" {
			t.Fatalf("snapshot with a blind tracker: %+v", s)
		}
		if fr, _ := s.Capture["final_read_bytes"].(float64); fr < 8<<20 {
			t.Fatalf("the frozen round read %v bytes: the volume was not re-read whole", s.Capture["final_read_bytes"])
		}
		img := filepath.Join(t.TempDir(), "export.img")
		testenv.MustStasis(t, "export", "-r", repo, fmt.Sprintf("p/p%d", i), img)
		assertSameAllocated(t, "ext4", frozen, img, fmt.Sprintf("snapshot %d with a blind tracker", i))
	}
	// With a freeze window too short for a whole re-read, it is not frozen at all and
	// says so: crash-consistent, never labelled as if it were tracked.
	r := testenv.StasisEnv(t, []string{"STASIS_TEST_TRACKER_DISK=" + wrong},
		"snapshot", "-r", repo, "--source", mnt, "--volume", "p", "--name", "short", "--json", "--max-freeze", "10ms")
	var s snapOut
	json.Unmarshal([]byte(r.Stdout), &s)
	if r.Code != 0 || s.Consistency != "crash" || !strings.Contains(fmt.Sprint(s.Capture["not_frozen"]), "max-freeze") {
		t.Fatalf("short window: exit %d, %+v\n%s", r.Code, s, r.Stderr)
	}
}

// TestOvermountedVolume: when something is mounted over the volume's mount point, its
// filesystem cannot be frozen through that path: the snapshot refuses and says why,
// rather than freezing the filesystem on top and calling the volume's fs-frozen.
func TestOvermountedVolume(t *testing.T) {
	dev, _ := testenv.LoopDevice(t, 128<<20)
	testenv.Mkfs(t, "ext4", dev)
	mnt := testenv.Mount(t, dev)
	over, _ := testenv.LoopDevice(t, 64<<20)
	testenv.Mkfs(t, "ext4", over)
	testenv.Run(t, "mount", over, mnt)
	defer exec.Command("umount", mnt).Run()
	r := testenv.Stasis(t, "snapshot", "-r", newRepo(t), "--source", dev, "--volume", "o")
	if r.Code == 0 || !strings.Contains(r.Stderr, "something else is mounted over it") {
		t.Fatalf("snapshot of a covered volume: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
}

// TestHiddenWriterRefused: a filesystem on the volume mounted only in another mount
// namespace (a container's), written to there, cannot be frozen from here, so a snapshot
// would be torn: it is refused with the reason and what to do, nothing is committed, and
// doctor says the same; --no-freeze reads it as it is, labelled crash. Active swap on a
// partition does not count: the usual VM disk (root filesystem plus swap) is frozen and
// exact.
func TestHiddenWriterRefused(t *testing.T) {
	testenv.RequireTool(t, "unshare")
	dev, _ := testenv.LoopDevice(t, 128<<20)
	testenv.Mkfs(t, "ext4", dev)
	hidden := t.TempDir()
	// A writer in a private mount namespace; it dies with the test process.
	ns := exec.Command("unshare", "-m", "--propagation", "private", "sh", "-c",
		"mount "+dev+" "+hidden+" && echo mounted && i=0 && while [ $i -lt 1200 ]; do head -c 65536 /dev/urandom > "+hidden+"/f$((i%50)); sync; sleep 0.1; i=$((i+1)); done")
	ns.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := ns.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := ns.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Process.Kill(); ns.Wait() }) // the namespace, and its mount, go with it
	if line, _ := bufio.NewReader(out).ReadString('\n'); line != "mounted\n" {
		t.Fatalf("the namespace's mount failed: %q", line)
	}
	repo := newRepo(t)
	r := testenv.Stasis(t, "snapshot", "-r", repo, "--source", dev, "--volume", "h")
	if r.Code == 0 || !strings.Contains(r.Stderr, "in another mount namespace (that of pid") || !strings.Contains(r.Stderr, "--no-freeze") {
		t.Fatalf("snapshot of a volume written in another mount namespace: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
	if list := testenv.MustStasis(t, "list", "-r", repo, "--json"); strings.Contains(list, `"name"`) {
		t.Fatalf("a refused snapshot left something: %s", list)
	}
	cfg := filepath.Join(t.TempDir(), "stasis.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("repository: %s\nvolumes:\n  - name: h\n    source: %s\n", repo, dev)), 0o600)
	if d := testenv.Stasis(t, "doctor", "--config", cfg); d.Code == 0 || !strings.Contains(d.Stdout+d.Stderr, "another mount namespace") {
		t.Fatalf("doctor on it: exit %d\n%s%s", d.Code, d.Stdout, d.Stderr)
	}
	var s snapOut
	json.Unmarshal([]byte(testenv.MustStasis(t, "snapshot", "-r", repo, "--source", dev, "--volume", "h", "--no-freeze", "--json")), &s)
	if s.Consistency != "crash" {
		t.Fatalf("--no-freeze snapshot: %+v", s)
	}

	// Root filesystem and active swap on one disk: the disk is snapshotted, frozen.
	img := filepath.Join(t.TempDir(), "vm.img")
	os.WriteFile(img, nil, 0o600)
	os.Truncate(img, 160<<20)
	disk, parts := testenv.AttachPartitioned(t, img, "start=2048, size=229376, type=83\nstart=231424, type=82\n")
	testenv.Mkfs(t, "ext4", parts[0])
	root := testenv.Mount(t, parts[0])
	testenv.Run(t, "mkswap", "-q", parts[1])
	testenv.Run(t, "swapon", parts[1])
	t.Cleanup(func() { exec.Command("swapoff", parts[1]).Run() }) // before the detach
	testenv.StartWriters(t, root, 2, 5)
	frozen := filepath.Join(t.TempDir(), "frozen.img")
	r = testenv.StasisEnv(t, []string{"STASIS_TEST_FREEZE_HOOK=" + copyDeviceHook(parts[0], frozen)},
		"snapshot", "-r", repo, "--source", disk, "--volume", "vm", "--name", "s", "--json")
	s = snapOut{}
	json.Unmarshal([]byte(r.Stdout), &s)
	if r.Code != 0 || s.Consistency != "fs-frozen" {
		t.Fatalf("snapshot of a disk with a swap partition: exit %d, %+v\n%s", r.Code, s, r.Stderr)
	}
	whole := filepath.Join(t.TempDir(), "export.img")
	testenv.MustStasis(t, "export", "-r", repo, "vm/s", whole)
	part := filepath.Join(t.TempDir(), "p1.img")
	testenv.Run(t, "dd", "if="+whole, "of="+part, "bs=512", "skip=2048", "count=229376", "status=none")
	assertSameAllocated(t, "ext4", frozen, part, "the root partition in the snapshot")
}

// TestReadOnlyBindListedFirst: a read-only bind of the filesystem's root listed before its
// writable mount does not make stasis take the filesystem for read-only: it is frozen, and
// the snapshot is exact.
func TestReadOnlyBindListedFirst(t *testing.T) {
	dev, _ := testenv.LoopDevice(t, 256<<20)
	testenv.Mkfs(t, "ext4", dev)
	ro := testenv.Mount(t, dev)
	testenv.Run(t, "mount", "-o", "remount,bind,ro", ro)
	rw := testenv.Mount(t, dev)
	testenv.StartWriters(t, rw, 2, 3)
	time.Sleep(200 * time.Millisecond)
	frozen := filepath.Join(t.TempDir(), "frozen.img")
	repo := newRepo(t)
	r := testenv.StasisEnv(t, []string{"STASIS_TEST_FREEZE_HOOK=" + copyDeviceHook(dev, frozen)},
		"snapshot", "-r", repo, "--source", dev, "--volume", "b", "--name", "b", "--json")
	var s snapOut
	json.Unmarshal([]byte(r.Stdout), &s)
	if r.Code != 0 || s.Consistency != "fs-frozen" {
		t.Fatalf("exit %d, %+v\n%s", r.Code, s, r.Stderr)
	}
	img := filepath.Join(t.TempDir(), "export.img")
	testenv.MustStasis(t, "export", "-r", repo, "b/b", img)
	assertSameAllocated(t, "ext4", frozen, img, "the snapshot")
}

// crossWriter appends record n to a file on each volume in turn, fsyncing each: in any
// snapshot of the volumes at one instant, the second file holds at most as many records as
// the first, and at most one fewer.
type crossWriter struct {
	stop chan struct{}
	wg   sync.WaitGroup
	n    atomic.Int64
}

func startCrossWriter(t *testing.T, dirs ...string) *crossWriter {
	c := &crossWriter{stop: make(chan struct{})}
	var files []*os.File
	for _, d := range dirs {
		f, err := os.OpenFile(filepath.Join(d, "cross.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		for n := int64(1); ; n++ {
			select {
			case <-c.stop:
				return
			default:
			}
			for _, f := range files {
				f.WriteString(testenv.Record(n))
				f.Sync()
			}
			c.n.Store(n)
		}
	}()
	t.Cleanup(func() {
		close(c.stop)
		c.wg.Wait()
		for _, f := range files {
			f.Close()
		}
	})
	return c
}

// records counts the intact records of cross.log in an exported image.
func records(t *testing.T, fstype, img string) int64 {
	t.Helper()
	opts := "ro,loop,noload"
	if fstype == "xfs" {
		opts = "ro,loop,nouuid"
	}
	dir := testenv.Mount(t, img, "-o", opts)
	defer exec.Command("umount", dir).Run()
	b, err := os.ReadFile(filepath.Join(dir, "cross.log"))
	if err != nil {
		t.Fatal(err)
	}
	rec := int64(len(testenv.Record(0)))
	n := int64(len(b)) / rec
	for i := int64(0); i < n; i++ {
		if string(b[i*rec:(i+1)*rec]) != testenv.Record(i+1) {
			t.Fatalf("record %d damaged", i+1)
		}
	}
	return n
}

// TestGroupOneInstant: a group of two volumes — two loop devices, and a loop device with a
// zram one — is frozen in one window: each member equals its device at that instant, and
// a record written to both volumes in order never shows up torn across them.
func TestGroupOneInstant(t *testing.T) {
	for _, second := range []string{"loop", "zram"} {
		t.Run("loop+"+second, func(t *testing.T) {
			devs := make([]string, 2)
			devs[0], _ = testenv.LoopDevice(t, 256<<20)
			if second == "zram" {
				devs[1] = testenv.ZramDevice(t, 256<<20)
			} else {
				devs[1], _ = testenv.LoopDevice(t, 256<<20)
			}
			var mnts []string
			for _, d := range devs {
				testenv.Mkfs(t, "ext4", d)
				mnt := testenv.Mount(t, d)
				testenv.StartWriters(t, mnt, 1, 11)
				mnts = append(mnts, mnt)
			}
			cross := startCrossWriter(t, mnts...)
			tmp := t.TempDir()
			copies := []string{filepath.Join(tmp, "a.img"), filepath.Join(tmp, "b.img")}
			hook := copyDeviceHook(devs[0], copies[0]) + "; " + copyDeviceHook(devs[1], copies[1])
			a := startAgent(t, fmt.Sprintf(`volumes:
  - name: a
    source: %s
  - name: b
    source: %s
groups:
  - name: g
    volumes: [a, b]
    schedules: []
    max_freeze: 30s
`, mnts[0], mnts[1]), "STASIS_TEST_FREEZE_HOOK="+hook)
			for i := 0; i < 4; i++ {
				time.Sleep(200 * time.Millisecond)
				outs := a.snapshot(t, "g", fmt.Sprint("g", i))
				if len(outs) != 2 || outs[0].Group != "g" || outs[0].GroupID == "" || outs[0].GroupID != outs[1].GroupID || outs[0].Created != outs[1].Created {
					t.Fatalf("group snapshot %d: %+v", i, outs)
				}
				counts := make([]int64, 2)
				for k, s := range outs {
					if s.Consistency != "fs-frozen" || s.FreezeMS != outs[0].FreezeMS {
						t.Fatalf("member %s: %+v", s.Volume, s)
					}
					img := filepath.Join(tmp, "export.img")
					testenv.MustStasis(t, "export", "-r", a.repo, s.Volume+"/"+s.Name, img)
					assertSameAllocated(t, "ext4", copies[k], img, fmt.Sprintf("group snapshot %d member %s", i, s.Volume))
					counts[k] = records(t, "ext4", img)
					os.Remove(img)
				}
				if counts[1] > counts[0] || counts[0] > counts[1]+1 {
					t.Fatalf("group snapshot %d is torn: %d records on a, %d on b", i, counts[0], counts[1])
				}
				t.Logf("group snapshot %d: frozen %.1f ms, %d/%d cross records", i, outs[0].FreezeMS, counts[0], counts[1])
			}
			if cross.n.Load() == 0 {
				t.Fatal("the cross-volume writer wrote nothing")
			}
			// list --group shows the members; retention of the group keeps them together.
			if got := listJSON(t, "-r", a.repo, "--group", "g"); len(got) != 8 {
				t.Fatalf("list --group g: %d entries", len(got))
			}
		})
	}
}

// TestControlSocketUnderLoad: 5,000 idle connections and some garbage do not stop the agent
// from answering `stasis status` within a second, and it stays up — with a descriptor limit
// (1024) far below the number of connections, where accept fails with EMFILE.
func TestControlSocketUnderLoad(t *testing.T) {
	testenv.RequireTool(t, "prlimit")
	a := startAgentWrapped(t, []string{"prlimit", "--nofile=1024:1024", "--"}, "volumes: []\n")
	sock := filepath.Join(filepath.Dir(a.cfg), "sock")
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := 0; i < 5000; i++ {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		conns = append(conns, c)
	}
	conns[0].Write(bytes.Repeat([]byte("{"), 100<<10)) // an endless request
	start := time.Now()
	r := testenv.Stasis(t, "--config", a.cfg, "status", "--json")
	if r.Code != 0 || time.Since(start) > time.Second {
		t.Fatalf("status with 5,000 idle connections took %s: exit %d %s", time.Since(start), r.Code, r.Stderr)
	}
	// The idle ones are dropped after the request timeout; the agent is still there.
	time.Sleep(6 * time.Second)
	if r := testenv.Stasis(t, "--config", a.cfg, "status"); r.Code != 0 {
		t.Fatalf("agent gone after the idle connections: %s\n%s", r.Stderr, a.log.String())
	}
}

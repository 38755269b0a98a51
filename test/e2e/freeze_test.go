package e2e

import (
	"encoding/json"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stasis-project/stasis/test/testenv"
)

type snapOut struct {
	listed
	Capture     map[string]any `json:"capture"`
	Tracking    string         `json:"tracking"`
	Rounds      int            `json:"rounds"`
	FreezeMS    float64        `json:"freeze_ms"`
	BytesRead   int64          `json:"bytes_read"`
	FinalChunks int            `json:"final_chunks"`
}

func fsck(t *testing.T, fstype, img string) {
	t.Helper()
	var cmd *exec.Cmd
	if fstype == "ext4" {
		cmd = exec.Command("e2fsck", "-fn", img)
	} else {
		// A frozen XFS keeps committed changes in its log, as after a crash: mounting
		// replays it (what any mount of the snapshot does), then repair must find nothing.
		dir := testenv.Mount(t, img, "-o", "loop,nouuid")
		testenv.Run(t, "umount", dir)
		cmd = exec.Command("xfs_repair", "-n", "-f", img)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s reports problems in the exported image: %v\n%s", cmd.Path, err, out)
	}
}

// TestPointInTimeExact: with writers running on the mounted filesystem, every snapshot
// exports exactly the device as it was while frozen (hashed by a hook inside the freeze
// window), the export passes fsck, and every record fsynced before the snapshot is in it.
func TestPointInTimeExact(t *testing.T) {
	// zram is bio-based, as device-mapper (LVM, dm-crypt) and md are: its completions come
	// as block_bio_complete, not block_rq_complete.
	for _, variant := range []string{"ext4", "xfs", "ext4-partition", "ext4-zram", "xfs-zram"} {
		t.Run(variant, func(t *testing.T) {
			fstype, kind, _ := strings.Cut(variant, "-")
			var dev string
			switch kind {
			case "partition": // block events arrive for the whole disk with absolute sectors
				dev, _ = testenv.PartitionedLoop(t, 352<<20)
			case "zram":
				dev = testenv.ZramDevice(t, 320<<20)
			default:
				dev, _ = testenv.LoopDevice(t, 320<<20)
			}
			testenv.Mkfs(t, fstype, dev)
			mnt := testenv.Mount(t, dev)
			repo := newRepo(t)
			w := testenv.StartWriters(t, mnt, 3, 1)
			time.Sleep(300 * time.Millisecond)
			tmp := t.TempDir()
			iterations := 4
			for i := 0; i < iterations; i++ {
				frozenCopy := filepath.Join(tmp, "frozen.img")
				synced := w.Synced()
				r := testenv.StasisEnv(t, []string{"STASIS_TEST_FREEZE_HOOK=" + copyDeviceHook(dev, frozenCopy)},
					"snapshot", "-r", repo, "--source", mnt, "--volume", fstype, "--name", fmt.Sprint("s", i), "--json", "--max-freeze", "30s")
				if r.Code != 0 {
					t.Fatalf("snapshot %d: %s", i, r.Stderr)
				}
				var s snapOut
				if err := json.Unmarshal([]byte(r.Stdout), &s); err != nil {
					t.Fatal(err)
				}
				// The tracker proved it sees this device: the frozen round read only the
				// chunks written since the last round, not the whole device.
				if s.Consistency != "fs-frozen" || s.Rounds < 2 || s.FreezeMS <= 0 || s.Capture["tracking"] != "full-scan" {
					t.Fatalf("snapshot %d: %+v", i, s)
				}
				img := filepath.Join(tmp, "export.img")
				testenv.MustStasis(t, "export", "-r", repo, fmt.Sprintf("%s/s%d", fstype, i), img)
				assertSameAllocated(t, fstype, frozenCopy, img, fmt.Sprintf("snapshot %d (%d rounds, %d chunks in the final one)", i, s.Rounds, s.FinalChunks))
				fsck(t, fstype, img)
				checkRecords(t, fstype, img, synced)
				os.Remove(img)
				t.Logf("snapshot %d: %d rounds, froze %.1f ms, %d chunks in the final round, writers wrote %d MiB so far", i, s.Rounds, s.FreezeMS, s.FinalChunks, w.Written.Load()>>20)
			}
			if w.Written.Load() == 0 {
				t.Fatal("the writers wrote nothing: the test proved nothing")
			}
		})
	}
}

// copyDeviceHook is a freeze hook (run inside the window) copying dev to file. O_DIRECT:
// the block device's page cache may hold stale pages (mkfs wrote through it; the
// filesystem's writes do not).
func copyDeviceHook(dev, file string) string {
	return fmt.Sprintf("dd if=%s of=%s iflag=direct bs=4M status=none", dev, file)
}

// assertSameAllocated checks that the exported image equals the device copied inside the
// freeze window, on every block the filesystem had allocated (free space is skipped by
// design, and the frozen copy's own tools say which blocks are free). It removes the copy.
func assertSameAllocated(t *testing.T, fstype, frozenCopy, img, what string) {
	t.Helper()
	if _, err := os.Stat(frozenCopy); err != nil {
		t.Fatalf("%s: the freeze hook did not run: %v", what, err)
	}
	free := testenv.FreeRanges(t, fstype, frozenCopy)
	testenv.ZeroRanges(t, frozenCopy, free)
	testenv.ZeroRanges(t, img, free)
	if testenv.HashFile(t, img, 0) != testenv.HashFile(t, frozenCopy, 0) {
		t.Fatalf("%s differs from the device at the freeze instant", what)
	}
	os.Remove(frozenCopy)
}

// checkRecords mounts the exported image and checks that the log holds at least the
// records fsynced before the snapshot started, each intact.
func checkRecords(t *testing.T, fstype, img string, synced int64) {
	t.Helper()
	opts := "ro,loop,noload"
	if fstype == "xfs" {
		opts = "ro,loop,nouuid"
	}
	dir := testenv.Mount(t, img, "-o", opts)
	b, err := os.ReadFile(filepath.Join(dir, testenv.LogName))
	if err != nil {
		t.Fatal(err)
	}
	rec := int64(len(testenv.Record(0)))
	n := int64(len(b)) / rec
	if n < synced {
		t.Fatalf("the snapshot holds %d records, but %d were fsynced before it started", n, synced)
	}
	for i := int64(0); i < n; i++ {
		if string(b[i*rec:(i+1)*rec]) != testenv.Record(i+1) {
			t.Fatalf("record %d is damaged in the snapshot", i+1)
		}
	}
	exec.Command("umount", dir).Run()
}

// TestSIGKILLNeverLeavesFrozen kills snapshots at random moments, often inside a widened
// freeze window: the filesystem must be writable again within max-freeze + 2 s, and the
// repository must verify with no half-made snapshot.
func TestSIGKILLNeverLeavesFrozen(t *testing.T) {
	dev, _ := testenv.LoopDevice(t, 256<<20)
	testenv.Mkfs(t, "ext4", dev)
	mnt := testenv.Mount(t, dev)
	repo := newRepo(t)
	testenv.StartWriters(t, mnt, 2, 2)
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	const maxFreeze = 2 * time.Second
	killedFrozen := 0
	for round := 0; round < 8; round++ {
		cmd := exec.Command(testenv.Binary(t), "snapshot", "-r", repo, "--source", mnt, "--volume", "k",
			"--name", fmt.Sprint("k", round), "--max-freeze", maxFreeze.String())
		hold := "0s"
		if round%2 == 0 {
			hold = "1500ms" // the kill lands inside the freeze window
		}
		cmd.Env = append(os.Environ(), "STASIS_TEST_HOLD_FREEZE="+hold)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(200+rng.Intn(900)) * time.Millisecond)
		if states, _ := filepath.Glob(fmt.Sprintf("/run/stasis/frozen-%d-*.json", cmd.Process.Pid)); len(states) > 0 {
			killedFrozen++
		}
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		if !testenv.WritableWithin(mnt, maxFreeze+2*time.Second) {
			t.Fatalf("round %d: %s still frozen %v after SIGKILL", round, mnt, maxFreeze+2*time.Second)
		}
		if r := testenv.Stasis(t, "verify", "-r", repo, "--read-data"); r.Code != 0 {
			t.Fatalf("round %d: verify after SIGKILL:\n%s%s", round, r.Stdout, r.Stderr)
		}
	}
	t.Logf("%d of 8 kills landed while frozen", killedFrozen)
	if killedFrozen == 0 {
		t.Fatal("no kill landed inside a freeze window: the test proved nothing")
	}
	// A snapshot after all that still works and is exact enough to fsck.
	testenv.MustStasis(t, "snapshot", "-r", repo, "--source", mnt, "--volume", "k", "--name", "after")
	img := filepath.Join(t.TempDir(), "after.img")
	testenv.MustStasis(t, "export", "-r", repo, "k/after", img)
	fsck(t, "ext4", img)
}

// TestThawAll: when the snapshot and its guard are both killed while frozen (as a
// cgroup-wide kill would), `stasis thaw --all` thaws what stasis froze.
func TestThawAll(t *testing.T) {
	dev, _ := testenv.LoopDevice(t, 128<<20)
	testenv.Mkfs(t, "ext4", dev)
	mnt := testenv.Mount(t, dev)
	repo := newRepo(t)
	cmd := exec.Command(testenv.Binary(t), "snapshot", "-r", repo, "--source", mnt, "--volume", "t", "--max-freeze", "60s")
	cmd.Env = append(os.Environ(), "STASIS_TEST_HOLD_FREEZE=30s")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	deadline := time.Now().Add(10 * time.Second)
	for testenv.WritableWithin(mnt, 300*time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the snapshot never froze the filesystem")
		}
	}
	state := fmt.Sprintf("frozen-%d-", cmd.Process.Pid)
	exec.Command("pkill", "-KILL", "-f", "freeze-guard.*"+state).Run()
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	if testenv.WritableWithin(mnt, 500*time.Millisecond) {
		t.Fatal("the filesystem thawed with both stasis and its guard killed: the test cannot show thaw --all works")
	}
	out := testenv.MustStasis(t, "thaw", "--all")
	if !strings.Contains(out, "thawed "+mnt) {
		t.Fatalf("thaw --all said: %s", out)
	}
	if !testenv.WritableWithin(mnt, 2*time.Second) {
		t.Fatal("still frozen after thaw --all")
	}
	if out := testenv.MustStasis(t, "thaw", "--all"); !strings.Contains(out, "nothing frozen") {
		t.Fatalf("second thaw --all: %s", out)
	}
}

// TestFreeSpaceSkipped: deleted files are neither read nor stored, and the files that
// remain come back intact.
func TestFreeSpaceSkipped(t *testing.T) {
	for _, fstype := range []string{"ext4", "xfs"} {
		t.Run(fstype, func(t *testing.T) {
			const size = 400 << 20
			dev, _ := testenv.LoopDevice(t, size)
			testenv.Mkfs(t, fstype, dev)
			mnt := testenv.Mount(t, dev)
			rng := rand.New(rand.NewSource(3))
			big := make([]byte, 150<<20)
			rng.Read(big)
			os.WriteFile(filepath.Join(mnt, "deleted"), big, 0o644)
			testenv.Run(t, "sync")
			os.Remove(filepath.Join(mnt, "deleted"))
			keep := big[:10<<20]
			os.WriteFile(filepath.Join(mnt, "kept"), keep, 0o644)
			testenv.Run(t, "sync")
			repo := newRepo(t)
			r := testenv.Stasis(t, "snapshot", "-r", repo, "--source", dev, "--volume", "v", "--name", "a", "--json")
			if r.Code != 0 {
				t.Fatal(r.Stderr)
			}
			var s snapOut
			json.Unmarshal([]byte(r.Stdout), &s)
			t.Logf("%s: read %d MiB, stored %d MiB of a %d MiB device", fstype, s.BytesRead>>20, s.NewBytes>>20, size>>20)
			if s.BytesRead > 100<<20 || s.NewBytes > 40<<20 {
				t.Fatalf("free space was not skipped: read %d, stored %d bytes", s.BytesRead, s.NewBytes)
			}
			img := filepath.Join(t.TempDir(), "a.img")
			testenv.MustStasis(t, "export", "-r", repo, "v/a", img)
			opts := "ro,loop,noload"
			if fstype == "xfs" {
				opts = "ro,loop,nouuid,norecovery"
			}
			dir := testenv.Mount(t, img, "-o", opts)
			got, err := os.ReadFile(filepath.Join(dir, "kept"))
			if err != nil || string(got) != string(keep) {
				t.Fatalf("kept file differs in the snapshot (%v)", err)
			}
		})
	}
}

// TestNestedSlowFreezeKills: a disk image on filesystem X holds two partitions, the volume;
// a pre hook dirties p1 and freezes X, so FIFREEZE(p1) cannot finish until the test thaws X
// 1.5 s later — longer than max_freeze (1 s). stasis is killed at random moments from the
// freeze guard's start to past the window, 20 times: no filesystem may stay frozen 2 s past
// max_freeze after the kill.
func TestNestedSlowFreezeKills(t *testing.T) {
	xdev, _ := testenv.LoopDevice(t, 512<<20)
	testenv.Mkfs(t, "ext4", xdev)
	x := testenv.Mount(t, xdev)
	img := filepath.Join(x, "disk.img")
	testenv.Run(t, "truncate", "-s", "256M", img)
	disk, devs := testenv.AttachPartitioned(t, img, "size=100MiB, type=83\nsize=100MiB, type=83\n")
	t.Cleanup(func() { exec.Command("fsfreeze", "-u", x).Run() })
	var parts []string
	for _, p := range devs {
		testenv.Mkfs(t, "ext4", p)
		parts = append(parts, testenv.Mount(t, p))
	}
	dir := t.TempDir()
	marker := filepath.Join(dir, "x-frozen")
	hook := filepath.Join(dir, "pre")
	os.WriteFile(hook, []byte(fmt.Sprintf("#!/bin/sh\ndd if=/dev/urandom of=%s/dirty bs=1M count=8 status=none\nfsfreeze -f %s\ntouch %s\n",
		parts[0], x, marker)), 0o755)
	cfg := writeCfg(t, dir, fmt.Sprintf(`repository: %s
mount: ""
socket: %s
state_dir: %s
volumes:
  - name: nested
    source: %s
    schedules: []
    max_freeze: 1s
    hooks:
      pre: [%s]
`, filepath.Join(dir, "repo"), filepath.Join(dir, "sock"), filepath.Join(dir, "state"), disk, hook))
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	const maxFreeze = time.Second
	killedInWindow := 0
	for run := 0; run < 20; run++ {
		os.Remove(marker)
		cmd := exec.Command(testenv.Binary(t), "--config", cfg, "snapshot", "nested", "--name", fmt.Sprint("n", run))
		var stderr strings.Builder
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// The test stands for what unblocks X: 1.5 s after the hook froze it.
		for i := 0; i < 300; i++ {
			if _, err := os.Stat(marker); err == nil {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		thawX := time.AfterFunc(1500*time.Millisecond, func() { exec.Command("fsfreeze", "-u", x).Run() })
		time.Sleep(time.Duration(rng.Intn(2500)) * time.Millisecond)
		if states, _ := filepath.Glob(fmt.Sprintf("/run/stasis/frozen-%d-*.json", cmd.Process.Pid)); len(states) > 0 {
			killedInWindow++
		}
		cmd.Process.Signal(syscall.SIGKILL)
		killed := time.Now()
		cmd.Wait()
		for _, p := range parts {
			if !testenv.WritableWithin(p, time.Until(killed.Add(maxFreeze+2*time.Second))+2*time.Second) {
				t.Fatalf("run %d: %s still frozen %s after the kill\n%s", run, p, maxFreeze+2*time.Second, stderr.String())
			}
		}
		thawX.Stop()
		exec.Command("fsfreeze", "-u", x).Run()
	}
	t.Logf("%d of 20 kills landed with a freeze state file present", killedInWindow)
	if killedInWindow == 0 {
		t.Fatal("no kill landed while stasis was freezing: the test proved nothing")
	}
}

// TestThawedInsideTheWindow: when someone else thaws the volume's filesystem inside the
// freeze window and a write goes through, that window is discarded: the final round is
// retried, and what is committed as fs-frozen equals the device at the retry's freeze. If
// every window is broken, nothing is committed.
func TestThawedInsideTheWindow(t *testing.T) {
	dev, _ := testenv.LoopDevice(t, 256<<20)
	testenv.Mkfs(t, "ext4", dev)
	mnt := testenv.Mount(t, dev)
	repo := newRepo(t)
	testenv.StartWriters(t, mnt, 2, 21)
	tmp := t.TempDir()
	frozen, once := filepath.Join(tmp, "frozen.img"), filepath.Join(tmp, "once")
	for _, thaw := range []string{"fsfreeze -u " + mnt, testenv.Binary(t) + " thaw --all"} {
		os.Remove(once)
		// The first window is broken: thawed, and a probe written through.
		hook := fmt.Sprintf("if [ ! -e %s ]; then touch %s; %s; echo probe > %s/probe && sync %s/probe; fi; %s",
			once, once, thaw, mnt, mnt, copyDeviceHook(dev, frozen))
		r := testenv.StasisEnv(t, []string{"STASIS_TEST_FREEZE_HOOK=" + hook},
			"snapshot", "-r", repo, "--source", mnt, "--volume", "w", "--json", "--max-freeze", "30s")
		if r.Code != 0 {
			t.Fatalf("%s: %s", thaw, r.Stderr)
		}
		var s snapOut
		json.Unmarshal([]byte(r.Stdout), &s)
		if _, err := os.Stat(filepath.Join(mnt, "probe")); err != nil || s.Consistency != "fs-frozen" {
			t.Fatalf("%s: probe %v, snapshot %+v", thaw, err, s)
		}
		img := filepath.Join(tmp, "export.img")
		testenv.MustStasis(t, "export", "-r", repo, "w/"+s.Name, img)
		assertSameAllocated(t, "ext4", frozen, img, "the snapshot after a broken window ("+thaw+")")
		os.Remove(img)
		os.Remove(filepath.Join(mnt, "probe"))
	}
	// Every window broken: the snapshot fails, nothing is committed.
	before := len(list(t, repo))
	hook := fmt.Sprintf("fsfreeze -u %s; echo probe > %s/probe", mnt, mnt)
	r := testenv.StasisEnv(t, []string{"STASIS_TEST_FREEZE_HOOK=" + hook}, "snapshot", "-r", repo, "--source", mnt, "--volume", "w")
	if r.Code == 0 || !strings.Contains(r.Stderr, "thawed by someone else") || len(list(t, repo)) != before {
		t.Fatalf("every window broken: exit %d, %s", r.Code, r.Stderr)
	}
}

// TestFrozenWindowAtNormalPriority: run with lowered CPU and I/O priority (as the unit
// runs the agent: Nice=, IOSchedulingClass=), stasis raises every thread to normal
// priority for the frozen window, and the freeze guard (which may have to thaw) runs at
// normal priority too.
func TestFrozenWindowAtNormalPriority(t *testing.T) {
	testenv.RequireTool(t, "ionice")
	dev, _ := testenv.LoopDevice(t, 64<<20)
	testenv.Mkfs(t, "ext4", dev)
	mnt := testenv.Mount(t, dev)
	os.WriteFile(filepath.Join(mnt, "f"), []byte("data"), 0o644)
	repo := filepath.Join(t.TempDir(), "repo")
	testenv.MustStasis(t, "init", "-r", repo)
	out := filepath.Join(t.TempDir(), "priorities")
	// stasis's threads, and the guard's (started before the window, from the lowered process).
	hook := `{ for t in /proc/$PPID/task/*; do echo "${t##*/} nice=$(cut -d' ' -f19 $t/stat) io=$(ionice -p ${t##*/})"; done
		for g in $(pgrep -P $PPID -f freeze-guard); do for t in /proc/$g/task/*; do echo "guard ${t##*/} nice=$(cut -d' ' -f19 $t/stat) io=$(ionice -p ${t##*/})"; done; done; } > ` + out
	cmd := exec.Command("nice", "-n", "10", "ionice", "-c", "3", testenv.Binary(t), "snapshot", "-r", repo, "--source", mnt, "--volume", "v", "--json")
	cmd.Env = append(os.Environ(), "STASIS_TEST_FREEZE_HOOK="+hook)
	b, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(b), `"consistency": "fs-frozen"`) {
		t.Fatalf("snapshot: %v\n%s", err, b)
	}
	lines, _ := os.ReadFile(out)
	if len(strings.TrimSpace(string(lines))) == 0 || !strings.Contains(string(lines), "guard ") {
		t.Fatalf("the freeze hook recorded no thread of stasis or of its guard:\n%s", lines)
	}
	for _, l := range strings.Split(strings.TrimSpace(string(lines)), "\n") {
		if !strings.Contains(l, "nice=0 ") || strings.Contains(l, "idle") {
			t.Fatalf("a thread ran the frozen window at lowered priority: %s\nall:\n%s", l, lines)
		}
	}
}

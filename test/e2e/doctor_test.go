package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stasis-project/stasis/test/testenv"
)

type finding struct {
	Check, Volume, Severity, Message, Fix string
}

// doctor runs `stasis doctor --json` with a configuration and returns its findings and exit.
func doctor(t *testing.T, cfg string, env ...string) ([]finding, int) {
	t.Helper()
	r := testenv.StasisEnv(t, env, "doctor", "--config", cfg, "--json")
	var fs []finding
	if err := json.Unmarshal([]byte(r.Stdout), &fs); err != nil {
		t.Fatalf("doctor output: %v\n%s\n%s", err, r.Stdout, r.Stderr)
	}
	return fs, r.Code
}

func expectFinding(t *testing.T, fs []finding, check, severity, text string) {
	t.Helper()
	for _, f := range fs {
		if f.Check == check && f.Severity == severity && strings.Contains(f.Message, text) {
			if severity != "ok" && f.Fix == "" {
				t.Errorf("%s finding without a fix: %s", check, f.Message)
			}
			return
		}
	}
	t.Errorf("no %s %s finding containing %q in %+v", severity, check, text, fs)
}

func writeCfg(t *testing.T, dir, body string) string {
	p := filepath.Join(dir, fmt.Sprintf("doctor-%d.yaml", time.Now().UnixNano()))
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestDoctor provokes each check it can on this machine and expects its finding.
func TestDoctor(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	os.Chmod(dir, 0o755)

	// A healthy volume: ext4 on a loop device, repository elsewhere with room.
	dev, _ := testenv.LoopDevice(t, 64<<20)
	testenv.Mkfs(t, "ext4", dev)
	mnt := testenv.Mount(t, dev)
	repo := filepath.Join(dir, "repo")
	testenv.MustStasis(t, "init", "-r", repo)
	// Healthy: the agent runs, with one volume on a loop device.
	a := startAgent(t, fmt.Sprintf("volumes:\n  - name: good\n    source: %s\n", mnt))
	fs, code := doctor(t, a.cfg)
	expectFinding(t, fs, "agent", "ok", "the agent answers")
	stopAgent(t, a)
	// The same without an agent, from here on.
	healthy := writeCfg(t, dir, fmt.Sprintf("repository: %s\nstate_dir: %s\nsocket: %s\nvolumes:\n  - name: good\n    source: %s\n", repo, filepath.Join(dir, "state"), filepath.Join(dir, "sock"), mnt))
	expectFinding(t, fs, "filesystem", "ok", "can be frozen")
	expectFinding(t, fs, "source", "ok", "request-based")
	expectFinding(t, fs, "tracking", "ok", "a tracker saw this device's I/O")
	expectFinding(t, fs, "schedule", "ok", "next snapshot")
	expectFinding(t, fs, "repository", "ok", "MiB free")
	if code != 0 {
		t.Errorf("a healthy setup exits %d: %+v", code, fs)
	}
	fs, _ = doctor(t, healthy)
	expectFinding(t, fs, "agent", "warning", "the agent is not running")

	// A bio-based device (zram, as device-mapper and md): tracked, as its proof shows.
	zdev := testenv.ZramDevice(t, 64<<20)
	testenv.Mkfs(t, "ext4", zdev)
	zmnt := testenv.Mount(t, zdev)
	fs, _ = doctor(t, writeCfg(t, dir, fmt.Sprintf("repository: %s\nvolumes:\n  - {name: z, source: %s}\n", repo, zmnt)))
	expectFinding(t, fs, "source", "ok", "bio-based")
	expectFinding(t, fs, "tracking", "ok", "a tracker saw this device's I/O")

	// Something mounted over the volume's mount point: an error, since it cannot freeze.
	coverDev, _ := testenv.LoopDevice(t, 64<<20)
	testenv.Mkfs(t, "ext4", coverDev)
	testenv.Run(t, "mount", coverDev, zmnt)
	fs, _ = doctor(t, writeCfg(t, dir, fmt.Sprintf("repository: %s\nvolumes:\n  - {name: z, source: %s}\n", repo, zdev)))
	exec.Command("umount", zmnt).Run()
	expectFinding(t, fs, "filesystem", "error", "something else is mounted over it")

	// Missing source (error, exit 2), image file, root filesystem, read-only mount.
	img := filepath.Join(dir, "disk.img")
	os.WriteFile(img, make([]byte, 1<<20), 0o644)
	roDev, _ := testenv.LoopDevice(t, 64<<20)
	testenv.Mkfs(t, "ext4", roDev)
	roMnt := testenv.Mount(t, roDev, "-o", "ro")
	cfg := writeCfg(t, dir, fmt.Sprintf("repository: %s\nvolumes:\n  - {name: gone, source: /dev/does-not-exist}\n  - {name: file, source: %s}\n  - {name: root, source: /}\n  - {name: ro, source: %s}\n", repo, img, roMnt))
	fs, code = doctor(t, cfg)
	expectFinding(t, fs, "source", "error", "does not exist")
	expectFinding(t, fs, "source", "warning", "is an image file, not a block device")
	expectFinding(t, fs, "filesystem", "warning", "root filesystem")
	expectFinding(t, fs, "filesystem", "ok", "mounted read-only")
	if code != 3 {
		t.Errorf("errors must exit 3, got %d", code)
	}

	// Repository: missing; locked (by whom); on the volume it backs up; too little space.
	fs, _ = doctor(t, writeCfg(t, dir, fmt.Sprintf("repository: %s\nvolumes: []\n", filepath.Join(dir, "nope"))))
	expectFinding(t, fs, "repository", "warning", "does not exist yet")
	os.WriteFile(filepath.Join(repo, "lock"), []byte("pid 777 (stasis gc) since then\n"), 0o600)
	release := startFlock(t, filepath.Join(repo, "lock"))
	fs, code = doctor(t, healthy)
	release()
	expectFinding(t, fs, "repository", "warning", "locked by pid 777 (stasis gc)")
	if code != 4 {
		t.Errorf("warnings must exit 4, got %d", code)
	}
	inside := filepath.Join(mnt, "repo")
	testenv.MustStasis(t, "init", "-r", inside)
	fs, _ = doctor(t, writeCfg(t, dir, fmt.Sprintf("repository: %s\nvolumes:\n  - {name: self, source: %s}\n", inside, mnt)))
	expectFinding(t, fs, "repository", "warning", "on the same disk as the volume it backs up")
	// A repository on a partition of the disk that is the volume: the same disk too.
	part, disk := testenv.PartitionedLoop(t, 64<<20)
	testenv.Mkfs(t, "ext4", part)
	onPart := filepath.Join(testenv.Mount(t, part), "repo")
	testenv.MustStasis(t, "init", "-r", onPart)
	fs, _ = doctor(t, writeCfg(t, dir, fmt.Sprintf("repository: %s\nvolumes:\n  - {name: disk, source: %s}\n", onPart, disk)))
	expectFinding(t, fs, "repository", "warning", "on the same disk as the volume it backs up")
	smallDev, _ := testenv.LoopDevice(t, 16<<20)
	testenv.Mkfs(t, "ext4", smallDev)
	small := filepath.Join(testenv.Mount(t, smallDev), "repo")
	testenv.MustStasis(t, "init", "-r", small)
	bigDev, _ := testenv.LoopDevice(t, 512<<20)
	fs, _ = doctor(t, writeCfg(t, dir, fmt.Sprintf("repository: %s\nvolumes:\n  - {name: big, source: %s}\n", small, bigDev)))
	expectFinding(t, fs, "repository", "error", "likely need")

	// The last failure is reported with its reason.
	os.MkdirAll(filepath.Join(dir, "state"), 0o700)
	os.WriteFile(filepath.Join(dir, "state", "state.json"), []byte(`{"volumes":{"good":{"last_result":"failed","last_failure":"database lock: access denied"}}}`), 0o600)
	fs, _ = doctor(t, healthy)
	expectFinding(t, fs, "last-failure", "warning", "database lock: access denied")

	// Another stasis process holding a freeze; another program tracing block events.
	sleeper := exec.Command("sleep", "30")
	sleeper.Start()
	defer func() { sleeper.Process.Kill(); sleeper.Wait() }()
	os.MkdirAll("/run/stasis", 0o755)
	state := fmt.Sprintf("/run/stasis/frozen-%d.json", sleeper.Process.Pid)
	os.WriteFile(state, []byte(`{"mounts":[]}`), 0o600)
	defer os.Remove(state)
	inst := "/sys/kernel/tracing/instances/doctor-test"
	if err := os.Mkdir(inst, 0o700); err == nil {
		defer func() { os.WriteFile(inst+"/events/block/enable", []byte("0"), 0); os.Remove(inst) }()
		os.WriteFile(inst+"/events/block/enable", []byte("1"), 0)
	}
	fs, _ = doctor(t, healthy)
	expectFinding(t, fs, "freeze", "warning", fmt.Sprintf("pid %d", sleeper.Process.Pid))
	expectFinding(t, fs, "tracking", "warning", "doctor-test")

	// fusermount3 missing from PATH.
	fs, _ = doctor(t, healthy, "PATH=/nonexistent")
	expectFinding(t, fs, "fuse", "warning", "fusermount3 is not installed")

	// Not root: the binary and the file where an unprivileged user can reach them.
	open, err := os.MkdirTemp("/tmp", "stasis-doctor-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(open)
	os.Chmod(open, 0o755)
	shared := filepath.Join(open, "stasis")
	testenv.Run(t, "cp", testenv.Binary(t), shared)
	os.Chmod(shared, 0o755)
	cfgCopy := filepath.Join(open, "stasis.yaml")
	b, _ := os.ReadFile(healthy)
	os.WriteFile(cfgCopy, b, 0o644)
	out, _ := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", shared, "doctor", "--config", cfgCopy, "--json").Output()
	var asNobody []finding
	json.Unmarshal(out, &asNobody)
	expectFinding(t, asNobody, "privileges", "error", "not running as root")
}

// TestDoctorQuotaAndDatabase: the retention quota, and the database account's problems.
func TestDoctorQuotaAndDatabase(t *testing.T) {
	v := newDBVolume(t, "")
	v.srv.Exec(t, v.db, "CREATE USER weak@localhost IDENTIFIED BY 'pw'")
	v.writeConfig(t, "    retention: {keep_auto: 1}\n    mysql:\n      dsn_file: "+v.dsnFile+"\n      long_query_threshold: 1s\n")
	// One automatic snapshot puts the volume at its quota of 1.
	agentCmd := exec.Command(testenv.Binary(t), "agent", "--config", v.cfg)
	b, _ := os.ReadFile(v.cfg)
	os.WriteFile(v.cfg, []byte(strings.Replace(string(b), "schedules: []", `schedules: ["@every 1s"]`, 1)), 0o600)
	agentCmd.Start()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if m, _ := filepath.Glob(filepath.Join(v.repo, "snapshots", "*")); len(m) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no automatic snapshot")
		}
		time.Sleep(300 * time.Millisecond)
	}
	agentCmd.Process.Signal(os.Interrupt)
	agentCmd.Wait()
	go v.db.Exec("INSERT INTO bank.accounts SELECT 1000 + SLEEP(4), 0") // a long query
	time.Sleep(1500 * time.Millisecond)
	fs, _ := doctor(t, v.cfg)
	expectFinding(t, fs, "retention", "ok", "at the quota of 1")
	expectFinding(t, fs, "mysql", "ok", "connects and has the needed grants")
	expectFinding(t, fs, "mysql", "warning", "of user root, running a statement")
	os.WriteFile(v.dsnFile, []byte("weak:pw@unix("+v.srv.Socket+")/"), 0o600)
	fs, code := doctor(t, v.cfg)
	expectFinding(t, fs, "mysql", "error", "GRANT RELOAD")
	if code != 3 {
		t.Errorf("exit %d", code)
	}
	os.WriteFile(v.dsnFile, []byte("weak:bad@unix("+v.srv.Socket+")/"), 0o600)
	fs, _ = doctor(t, v.cfg)
	expectFinding(t, fs, "mysql", "error", "access denied")

	// Renamed in the configuration, the volume's automatic snapshots are an orphaned chain
	// nothing prunes: doctor says so, and how to prune it.
	b, _ = os.ReadFile(v.cfg)
	os.WriteFile(v.cfg, []byte(strings.Replace(string(b), "- name: db\n", "- name: db2\n", 1)), 0o600)
	fs, _ = doctor(t, v.cfg)
	expectFinding(t, fs, "repository", "warning", "volume db is no longer configured but has")
	for _, f := range fs {
		if strings.Contains(f.Message, "no longer configured") && !strings.Contains(f.Fix, "stasis prune --volume db") {
			t.Errorf("orphaned chain finding without the prune command: %+v", f)
		}
	}
}

package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stasis-project/stasis/test/testenv"
)

type agentEnv struct {
	cfg, repo, socket, notify string
	metrics                   string
	view                      string
	log                       *testLog
	mnts                      []string
	notes                     chan string
}

// newAgentEnv writes a configuration with two loop volumes (ext4, mounted, writers running).
func newAgentEnv(t *testing.T, schedules string, retention string, withView ...bool) *agentEnv {
	dir := t.TempDir()
	l, err := net.Listen("tcp", "127.0.0.1:0") // a free port for the metrics
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := l.Addr().String()
	l.Close()
	e := &agentEnv{metrics: metricsAddr, cfg: filepath.Join(dir, "stasis.yaml"), repo: filepath.Join(dir, "repo"), socket: filepath.Join(dir, "stasis.sock")}
	var vols strings.Builder
	for i := 0; i < 2; i++ {
		dev, _ := testenv.LoopDevice(t, 128<<20)
		testenv.Mkfs(t, "ext4", dev)
		mnt := testenv.Mount(t, dev)
		testenv.StartWriters(t, mnt, 1, int64(i))
		e.mnts = append(e.mnts, mnt)
		fmt.Fprintf(&vols, "  - name: vol%d\n    source: %s\n    schedules: [%q]\n    retention: %s\n", i, mnt, schedules, retention)
	}
	view := `""`
	if len(withView) > 0 && withView[0] {
		e.view = filepath.Join(dir, "view")
		view = e.view + "\nmount_allow_other: true"
		os.Chmod(dir, 0o755) // so another user can reach the view
		os.Chmod(filepath.Dir(dir), 0o755)
		t.Cleanup(func() { exec.Command("fusermount3", "-uz", e.view).Run() })
	}
	cfg := fmt.Sprintf("repository: %s\nmount: %s\nstate_dir: %s\nsocket: %s\nmetrics_listen: %s\nvolumes:\n%s",
		e.repo, view, filepath.Join(dir, "state"), e.socket, e.metrics, vols.String())
	if err := os.WriteFile(e.cfg, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	// A datagram socket standing in for systemd's NOTIFY_SOCKET.
	e.notify = filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: e.notify, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	e.notes = make(chan string, 1000)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return
			}
			e.notes <- string(buf[:n])
		}
	}()
	return e
}

func (e *agentEnv) start(t *testing.T, env ...string) *exec.Cmd {
	cmd := exec.Command(testenv.Binary(t), "agent", "--config", e.cfg)
	cmd.Env = append(append(os.Environ(), "NOTIFY_SOCKET="+e.notify), env...)
	e.log = &testLog{t: t}
	cmd.Stderr = e.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

// waitNote waits for a notification containing want.
func (e *agentEnv) waitNote(t *testing.T, want string, d time.Duration) {
	t.Helper()
	deadline := time.After(d)
	for {
		select {
		case n := <-e.notes:
			if strings.Contains(n, want) {
				return
			}
		case <-deadline:
			t.Fatalf("no %q notification within %v", want, d)
		}
	}
}

type testLog struct {
	t   *testing.T
	mu  sync.Mutex
	all strings.Builder
}

func (l *testLog) Write(p []byte) (int, error) {
	l.t.Logf("agent: %s", strings.TrimRight(string(p), "\n"))
	l.mu.Lock()
	l.all.Write(p)
	l.mu.Unlock()
	return len(p), nil
}

func (l *testLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.all.String()
}

func listJSON(t *testing.T, args ...string) []map[string]any {
	var out []map[string]any
	if err := json.Unmarshal([]byte(testenv.MustStasis(t, append([]string{"list", "--json"}, args...)...)), &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestAgentSchedulesAndRetention runs the real agent with @every 3s schedules on two busy
// volumes: auto snapshots appear with their names, retention keeps exactly the quota, manual
// snapshots taken through the socket stay, incrementals are tracked, and systemd hears
// READY=1 and STOPPING=1.
func TestAgentSchedulesAndRetention(t *testing.T) {
	e := newAgentEnv(t, "@every 3s", "{keep_auto: 3, keep_days: 30, keep_daily: 0, keep_weekly: 0, keep_monthly: 0}")
	agentCmd := e.start(t)
	e.waitNote(t, "READY=1", 10*time.Second)
	time.Sleep(4 * time.Second)
	out := testenv.MustStasis(t, "--config", e.cfg, "snapshot", "vol0", "--name", "keepme", "--json")
	if !strings.Contains(out, `"name": "keepme"`) {
		t.Fatalf("manual snapshot through the agent: %s", out)
	}
	time.Sleep(16 * time.Second)
	status := testenv.MustStasis(t, "--config", e.cfg, "status", "--json")
	if !strings.Contains(status, `"volume": "vol1"`) || !strings.Contains(status, `"next_run"`) {
		t.Fatalf("status: %s", status)
	}
	resp, err := http.Get("http://" + e.metrics + "/metrics")
	if err != nil {
		t.Fatalf("metrics: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`stasis_snapshots_total{result="ok",volume="vol0"}`, `stasis_last_freeze_milliseconds{volume="vol1"}`, "stasis_repository_pack_bytes"} {
		if !strings.Contains(string(body), want) {
			t.Fatalf("metrics lack %s:\n%s", want, body)
		}
	}
	dry := testenv.MustStasis(t, "--config", e.cfg, "prune", "--dry-run")
	if !strings.Contains(dry, "keepme") || !strings.Contains(dry, "manual snapshots are never pruned") {
		t.Fatalf("prune --dry-run: %s", dry)
	}
	agentCmd.Process.Signal(syscall.SIGTERM)
	e.waitNote(t, "STOPPING=1", 30*time.Second)
	done := make(chan error, 1)
	go func() { done <- agentCmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("agent exit after SIGTERM: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("agent did not exit within 30 s of SIGTERM")
	}
	today := time.Now().Format("20060102")
	for _, vol := range []string{"vol0", "vol1"} {
		snaps := listJSON(t, "-r", e.repo, "--volume", vol)
		auto := 0
		tracked := 0
		for _, s := range snaps {
			name := s["name"].(string)
			if s["kind"] == "auto" {
				auto++
				if !strings.HasPrefix(name, "auto_"+today+"_") && !strings.HasPrefix(name, "auto_"+time.Now().Add(-time.Minute).Format("20060102")+"_") {
					t.Errorf("auto snapshot named %q", name)
				}
				if c, ok := s["capture"].(map[string]any); ok && c["tracking"] == "tracked" {
					tracked++
					// A tracked incremental reads what was written, not the volume.
					if read, size := c["bytes_read"].(float64), s["size_bytes"].(float64); read >= size/2 {
						t.Errorf("%s/%s: tracked incremental read %.0f of %.0f bytes", vol, name, read, size)
					}
				}
			}
			if s["consistency"] != "fs-frozen" {
				t.Errorf("%s/%s is %v", vol, name, s["consistency"])
			}
		}
		if auto != 3 {
			t.Fatalf("%s: %d auto snapshots kept, the quota is 3: %v", vol, auto, snaps)
		}
		if tracked == 0 {
			t.Fatalf("%s: no tracked incremental among the kept auto snapshots", vol)
		}
	}
	if snaps := listJSON(t, "-r", e.repo, "--volume", "vol0"); snaps[0]["name"] != "keepme" && !strings.Contains(fmt.Sprint(snaps), "keepme") {
		t.Fatal("the manual snapshot was pruned")
	}
	// Without the agent, prune takes the same path (agent.Retain): it agrees with what the
	// agent's retention left, snapshot for snapshot.
	var decisions []struct {
		Volume, Name string
		Keep         bool
	}
	if err := json.Unmarshal([]byte(testenv.MustStasis(t, "--config", e.cfg, "prune", "--dry-run", "--json")), &decisions); err != nil {
		t.Fatal(err)
	}
	if n := len(listJSON(t, "-r", e.repo)); len(decisions) != n {
		t.Fatalf("prune without the agent decided about %d snapshots of %d", len(decisions), n)
	}
	for _, d := range decisions {
		if !d.Keep {
			t.Fatalf("prune without the agent would delete %s/%s, which the agent's retention kept", d.Volume, d.Name)
		}
	}
	testenv.MustStasis(t, "verify", "-r", e.repo, "--read-data")
}

// TestAgentKilledMidSnapshot: SIGKILL during a (widened) freeze; the filesystems thaw, the
// repository verifies, and a restarted agent catches up on the missed schedule.
func TestAgentKilledMidSnapshot(t *testing.T) {
	e := newAgentEnv(t, "@every 4s", "{keep_auto: 10}", true)
	a := e.start(t, "STASIS_TEST_HOLD_FREEZE=1500ms")
	e.waitNote(t, "READY=1", 10*time.Second)
	deadline := time.Now().Add(20 * time.Second)
	for testenv.WritableWithin(e.mnts[0], 200*time.Millisecond) && testenv.WritableWithin(e.mnts[1], 200*time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no snapshot froze a volume")
		}
	}
	a.Process.Signal(syscall.SIGKILL)
	a.Wait()
	for _, m := range e.mnts {
		if !testenv.WritableWithin(m, 5*time.Second+2*time.Second) {
			t.Fatalf("%s still frozen after the agent was killed", m)
		}
	}
	testenv.MustStasis(t, "verify", "-r", e.repo, "--read-data")
	before := len(listJSON(t, "-r", e.repo))
	time.Sleep(5 * time.Second) // a schedule is missed
	e.notes = make(chan string, 1000)
	a2 := e.start(t)
	e.waitNote(t, "READY=1", 10*time.Second)
	time.Sleep(2 * time.Second) // the catch-up runs at once, before the next 4 s tick
	after := len(listJSON(t, "-r", e.repo))
	// The dead agent's view was cleared and the new agent serves it, new snapshots included.
	entries, err := os.ReadDir(filepath.Join(e.view, "vol0"))
	if err != nil || len(entries) < 2 {
		t.Fatalf("the view after restart: %v %v", entries, err)
	}
	// mount_allow_other: another user browses the newest snapshot's files, and is kept out
	// of what the snapshot's permissions keep them out of (lost+found is 0700 root).
	asNobody := func(args ...string) (string, error) {
		out, err := exec.Command("setpriv", append([]string{"--reuid=65534", "--regid=65534", "--clear-groups"}, args...)...).CombinedOutput()
		return string(out), err
	}
	if out, err := asNobody("ls", filepath.Join(e.view, "vol0", "latest")+"/"); err != nil || !strings.Contains(out, "lost+found") {
		t.Fatalf("another user cannot list the newest snapshot through the agent's view: %v %s", err, out)
	}
	if out, err := asNobody("ls", filepath.Join(e.view, "vol0", "latest", "lost+found")); err == nil || !strings.Contains(out, "Permission denied") {
		t.Fatalf("another user listed a 0700 root directory through the view: %v %s", err, out)
	}
	a2.Process.Signal(syscall.SIGTERM)
	a2.Wait()
	if exec.Command("mountpoint", "-q", e.view).Run() == nil {
		t.Fatal("the view is still mounted after the agent stopped")
	}
	if after <= before {
		t.Fatalf("no catch-up snapshot after restart: %d before, %d after", before, after)
	}
	testenv.MustStasis(t, "verify", "-r", e.repo, "--read-data")
}

// TestConfigCheck: the CLI reports a bad configuration with its line and key path.
func TestConfigCheck(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("volumes:\n  - name: a\n    source: /dev/does-not-exist\n    schedules: [\"@daily\", \"99 * * * *\"]\n"), 0o600)
	r := testenv.Stasis(t, "config", "check", bad)
	if r.Code == 0 || !strings.Contains(r.Stderr, bad+":3: volumes[0].source") || !strings.Contains(r.Stderr, bad+":4: volumes[0].schedules[1]") {
		t.Fatalf("config check: exit %d\n%s", r.Code, r.Stderr)
	}
	// Type errors name the key and say what it takes, every one in one run.
	types := filepath.Join(dir, "types.yaml")
	os.WriteFile(types, []byte("volumes:\n  - name: a\n    source: /dev/vdb\n    max_freeze: [5s]\n    retention: {keep_daily: lots}\ngroups:\n  name: g\n"), 0o600)
	r = testenv.Stasis(t, "config", "check", types)
	for _, want := range []string{
		types + ":4: volumes[0].max_freeze: wrong type: expected a duration like 5s, 500ms or 1m30s, found a list",
		types + `:5: volumes[0].retention.keep_daily: wrong type: expected a whole number, found the text "lots"`,
		types + ":7: groups: wrong type: expected a list",
	} {
		if r.Code != 1 || !strings.Contains(r.Stderr, want) {
			t.Fatalf("config check of type errors: exit %d, no %q in\n%s", r.Code, want, r.Stderr)
		}
	}
	if strings.Contains(r.Stderr, "config.") || strings.Contains(r.Stderr, "!!") {
		t.Fatalf("config check shows Go or YAML internals:\n%s", r.Stderr)
	}
	good := filepath.Join(dir, "good.yaml")
	os.WriteFile(good, []byte("volumes:\n  - name: a\n    source: "+bad+"\n"), 0o600)
	if out := testenv.MustStasis(t, "config", "check", good); !strings.Contains(out, "is valid") {
		t.Fatalf("config check of a good file: %s", out)
	}
}

// TestAgentReload: SIGHUP with a broken file keeps the running configuration; with a good
// one the new configuration takes over.
func TestAgentReload(t *testing.T) {
	e := newAgentEnv(t, "@every 1h", "{keep_auto: 5}")
	a := e.start(t)
	e.waitNote(t, "READY=1", 10*time.Second)
	good, _ := os.ReadFile(e.cfg)
	os.WriteFile(e.cfg, append(good, []byte("bogus_key: 1\n")...), 0o600)
	a.Process.Signal(syscall.SIGHUP)
	waitLog(t, e, "configuration reload refused")
	if !strings.Contains(e.log.String(), "unknown key") {
		t.Fatalf("the refusal does not say why:\n%s", e.log.String())
	}
	os.WriteFile(e.cfg, good, 0o600)
	if out := testenv.MustStasis(t, "--config", e.cfg, "status"); !strings.Contains(out, "vol0") {
		t.Fatalf("status after a refused reload: %s", out)
	}
	// Now a good change: hourly becomes every 2 s, and snapshots start to appear.
	os.WriteFile(e.cfg, []byte(strings.ReplaceAll(string(good), "@every 1h", "@every 2s")), 0o600)
	a.Process.Signal(syscall.SIGHUP)
	waitLog(t, e, "configuration reloaded")
	deadline := time.Now().Add(15 * time.Second)
	for len(listJSON(t, "-r", e.repo)) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the reloaded schedules never ran")
		}
		time.Sleep(500 * time.Millisecond)
	}
	a.Process.Signal(syscall.SIGTERM)
	a.Wait()
}

func waitLog(t *testing.T, e *agentEnv, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(e.log.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("the agent never logged %q:\n%s", want, e.log.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestAfterHooksAndNotify: an after hook runs once per snapshot, after the commit or the
// failure, and knows the result; the webhook receives each result as JSON.
func TestAfterHooksAndNotify(t *testing.T) {
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	record := filepath.Join(dir, "after.log")
	hook := filepath.Join(dir, "after.sh")
	os.WriteFile(hook, []byte("#!/bin/sh\necho \"$STASIS_PHASE $STASIS_VOLUME $STASIS_RESULT [$STASIS_SNAPSHOT] $STASIS_ERROR\" >> "+record+"\n"), 0o755)
	var mu sync.Mutex
	var posts []map[string]any
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var m map[string]any
		json.NewDecoder(r.Body).Decode(&m)
		mu.Lock()
		posts = append(posts, m)
		mu.Unlock()
	}))
	defer srv.Close()
	src := filepath.Join(dir, "disk.img")
	os.WriteFile(src, []byte(strings.Repeat("after hooks ", 100000)), 0o644)
	a := startAgent(t, fmt.Sprintf("notify: {url: %s/ping, on: [failure, success]}\nvolumes:\n  - name: data\n    source: %s\n    schedules: []\n    hooks: {after: [%s]}\n", srv.URL, src, hook))
	a.snapshot(t, "data", "one")
	if r := testenv.Stasis(t, "--config", a.cfg, "snapshot", "data", "--name", "one"); r.Code == 0 {
		t.Fatal("a second snapshot named one succeeded")
	}
	b, _ := os.ReadFile(record)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) != 2 || lines[0] != "after data ok [data/one] " || !strings.HasPrefix(lines[1], "after data failed [] ") || !strings.Contains(lines[1], "already has a snapshot named") {
		t.Fatalf("after hook runs:\n%s", b)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(posts) != 2 || posts[0]["result"] != "ok" || posts[1]["result"] != "failed" || posts[0]["volume"] != "data" {
		t.Fatalf("webhook posts: %v", posts)
	}
}

// TestAgentRetriesScheduledSnapshots: a scheduled snapshot that fires while a manual one
// runs, and then fails (a pre hook fails once), is retried after retry_delay (doubling)
// instead of waiting for the next slot, and `stasis status` shows the pending retry.
func TestAgentRetriesScheduledSnapshots(t *testing.T) {
	dir := t.TempDir()
	dev, _ := testenv.LoopDevice(t, 64<<20)
	testenv.Mkfs(t, "ext4", dev)
	mnt := testenv.Mount(t, dev)
	hook := filepath.Join(dir, "pre.sh")
	slow, failOnce := filepath.Join(dir, "slow"), filepath.Join(dir, "fail-once")
	os.WriteFile(hook, []byte(fmt.Sprintf("#!/bin/sh\nif [ -e %[1]s ]; then rm %[1]s; sleep 5; exit 0; fi\nif [ -e %[2]s ]; then rm %[2]s; echo deliberate failure >&2; exit 1; fi\n", slow, failOnce)), 0o755)
	start := time.Now()
	a := startAgent(t, fmt.Sprintf("retry_delay: 1s\nretry_attempts: 3\nvolumes:\n  - name: data\n    source: %s\n    schedules: [\"@every 10s\"]\n    hooks: {pre: [%s]}\n", mnt, hook))
	time.Sleep(time.Until(start.Add(6 * time.Second)))
	os.WriteFile(slow, nil, 0o600)
	os.WriteFile(failOnce, nil, 0o600)
	manual := exec.Command(testenv.Binary(t), "--config", a.cfg, "snapshot", "data", "--name", "manual")
	if err := manual.Start(); err != nil {
		t.Fatal(err)
	}
	sawRetry := false
	var auto []map[string]any
	for deadline := start.Add(19 * time.Second); time.Now().Before(deadline) && len(auto) == 0; time.Sleep(200 * time.Millisecond) {
		if out := testenv.Stasis(t, "--config", a.cfg, "status").Stdout; strings.Contains(out, "retry ") {
			sawRetry = true
		}
		auto = nil
		for _, s := range listJSON(t, "-r", a.repo) {
			if s["kind"] == "auto" {
				auto = append(auto, s)
			}
		}
	}
	if err := manual.Wait(); err != nil {
		t.Fatalf("the manual snapshot failed: %v\n%s", err, a.log.String())
	}
	log := a.log.String()
	if len(auto) != 1 {
		t.Fatalf("%d automatic snapshots before the next slot, want 1 (the retry's)\n%s", len(auto), log)
	}
	for _, want := range []string{"a manual snapshot of it was running", "deliberate failure", "retrying the scheduled snapshot"} {
		if !strings.Contains(log, want) {
			t.Fatalf("the agent did not log %q:\n%s", want, log)
		}
	}
	if !sawRetry {
		t.Fatalf("stasis status never showed the pending retry\n%s", log)
	}
}

// onTerminal runs the binary under script(1), so that stderr is a terminal, and returns
// everything it printed there.
func onTerminal(t *testing.T, args ...string) string {
	t.Helper()
	testenv.RequireTool(t, "script")
	quoted := []string{testenv.Binary(t)}
	for _, a := range args {
		quoted = append(quoted, "'"+strings.ReplaceAll(a, "'", `'\''`)+"'")
	}
	out, err := exec.Command("script", "-qfec", strings.Join(quoted, " "), "/dev/null").CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %v\n%s", args, err, out)
	}
	return string(out)
}

// mixedImageAndRepo makes an image file of size bytes of mixed data and an empty
// repository, in a new directory.
func mixedImageAndRepo(t *testing.T, size int64) (dir, img, repo string) {
	dir = t.TempDir()
	img = filepath.Join(dir, "data.img")
	f, _ := os.Create(img)
	testenv.FillMixed(t, rand.New(rand.NewSource(size)), f, size)
	f.Close()
	repo = filepath.Join(dir, "repo")
	testenv.MustStasis(t, "init", "-r", repo)
	return dir, img, repo
}

// TestSnapshotProgress: on a terminal, a snapshot shows its progress with the total it
// reads and an ETA, taken directly and through the agent; off a terminal, nothing.
func TestSnapshotProgress(t *testing.T) {
	_, img, repo := mixedImageAndRepo(t, 96<<20)
	if out := onTerminal(t, "snapshot", "-r", repo, "--source", img, "--volume", "direct"); !strings.Contains(out, "/ 96 MiB") || !strings.Contains(out, "ETA") {
		t.Fatalf("no progress with a total and an ETA on a terminal:\n%q", out)
	}
	if r := testenv.Stasis(t, "snapshot", "-r", repo, "--source", img, "--volume", "piped"); r.Code != 0 || strings.Contains(r.Stderr, "ETA") {
		t.Fatalf("progress off a terminal (exit %d): %q", r.Code, r.Stderr)
	}
	a := startAgent(t, fmt.Sprintf("volumes:\n  - name: data\n    source: %s\n    schedules: []\n", img))
	if out := onTerminal(t, "--config", a.cfg, "snapshot", "data"); !strings.Contains(out, "snapshot of data:") || !strings.Contains(out, "/ 96 MiB") || !strings.Contains(out, "ETA") {
		t.Fatalf("no progress from the agent on a terminal:\n%q\n%s", out, a.log.String())
	}
}

// TestAgentReplicatesPerVolume: a volume with its own replicate goes to its own replica
// with its own retention; the others go to the top-level replica; status shows both.
func TestAgentReplicatesPerVolume(t *testing.T) {
	dir := t.TempDir()
	var srcs []string
	for i := 0; i < 2; i++ {
		src := filepath.Join(dir, fmt.Sprintf("disk%d.img", i))
		os.WriteFile(src, []byte(strings.Repeat(fmt.Sprintf("volume %d ", i), 50000)), 0o644)
		srcs = append(srcs, src)
	}
	shared, own := filepath.Join(dir, "shared-replica"), filepath.Join(dir, "own-replica")
	keep := func(n int) string {
		return fmt.Sprintf("{keep_auto: %d, keep_days: 30, keep_daily: 0, keep_weekly: 0, keep_monthly: 0}", n)
	}
	a := startAgent(t, fmt.Sprintf(`replicate: {repository: %s, retention: %s}
volumes:
  - name: plain
    source: %s
    schedules: ["@every 1s"]
    retention: %s
  - name: special
    source: %s
    schedules: ["@every 1s"]
    retention: %s
    replicate: {repository: %s, retention: %s}
`, shared, keep(3), srcs[0], keep(10), srcs[1], keep(10), own, keep(1)))
	volumesIn := func(repo string) map[string]int {
		out := map[string]int{}
		r := testenv.Stasis(t, "list", "-r", repo, "--json")
		var snaps []map[string]any
		if r.Code == 0 && json.Unmarshal([]byte(r.Stdout), &snaps) == nil {
			for _, s := range snaps {
				out[s["volume"].(string)]++
			}
		}
		return out
	}
	var inShared, inOwn map[string]int
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(300 * time.Millisecond) {
		inShared, inOwn = volumesIn(shared), volumesIn(own)
		// Enough snapshots for both retentions to have worked.
		if inShared["plain"] == 3 && inOwn["special"] == 1 && len(listJSON(t, "-r", a.repo, "--volume", "special")) >= 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("replicas never settled: shared %v, own %v\n%s", inShared, inOwn, a.log.String())
		}
	}
	if inShared["special"] != 0 || inOwn["plain"] != 0 {
		t.Fatalf("a volume went to the other's replica: shared %v, own %v", inShared, inOwn)
	}
	var st struct {
		Replicas []struct{ Repository string } `json:"replicas"`
	}
	json.Unmarshal([]byte(testenv.MustStasis(t, "--config", a.cfg, "status", "--json")), &st)
	if len(st.Replicas) != 2 || st.Replicas[0].Repository != shared || st.Replicas[1].Repository != own {
		t.Fatalf("status shows replicas %+v", st.Replicas)
	}
}

// TestMaxReadRate: --max-read-rate (and max_read_rate) paces a snapshot's reads; a bad
// rate is refused with the form to use.
func TestMaxReadRate(t *testing.T) {
	dir, img, repo := mixedImageAndRepo(t, 24<<20)
	start := time.Now()
	testenv.MustStasis(t, "snapshot", "-q", "-r", repo, "--source", img, "--volume", "fast")
	fast := time.Since(start)
	start = time.Now()
	testenv.MustStasis(t, "snapshot", "-q", "-r", repo, "--source", img, "--volume", "paced", "--max-read-rate", "8MiB/s")
	paced := time.Since(start)
	// 24 MiB at 8 MiB/s, the first 4 MiB at once: 2.5 s at least.
	if paced < 2500*time.Millisecond || paced < fast+time.Second {
		t.Fatalf("a snapshot paced to 8 MiB/s took %v (unpaced %v)", paced, fast)
	}
	r := testenv.Stasis(t, "snapshot", "-r", repo, "--source", img, "--volume", "x", "--max-read-rate", "fast")
	if r.Code != 1 || !strings.Contains(r.Stderr, "like 200MiB/s") {
		t.Fatalf("a bad rate: exit %d, %s", r.Code, r.Stderr)
	}
	cfg := filepath.Join(dir, "bad.yaml")
	os.WriteFile(cfg, []byte("volumes:\n  - name: a\n    source: "+img+"\n    max_read_rate: 10\n"), 0o600)
	r = testenv.Stasis(t, "config", "check", cfg)
	if r.Code != 1 || !strings.Contains(r.Stderr, cfg+":4: volumes[0].max_read_rate") {
		t.Fatalf("config check of a bad max_read_rate: exit %d, %s", r.Code, r.Stderr)
	}
}

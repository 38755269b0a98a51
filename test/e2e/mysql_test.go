package e2e

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stasis-project/stasis/test/testenv"
)

const accounts, startBalance = 100, 1000

// dbVolume is a MariaDB server whose datadir is on a loop-mounted ext4 volume, with a stasis
// configuration for it.
type dbVolume struct {
	mnt, cfg, repo, dsnFile string
	srv                     *testenv.MariaDB
	db                      *sql.DB
}

func newDBVolume(t testing.TB, mysqlYAML string) *dbVolume {
	dev, _ := testenv.LoopDevice(t, 512<<20)
	testenv.Mkfs(t, "ext4", dev)
	v := &dbVolume{mnt: testenv.Mount(t, dev)}
	datadir := filepath.Join(v.mnt, "mysql")
	testenv.InitMariaDB(t, datadir)
	v.srv = testenv.StartMariaDB(t, datadir)
	v.db = v.srv.DB(t)
	createBank(t, v.srv, v.db)
	dir := t.TempDir()
	v.repo = filepath.Join(dir, "repo")
	v.dsnFile = filepath.Join(dir, "mysql.dsn")
	os.WriteFile(v.dsnFile, []byte(v.srv.DSN("root", "")+"\n"), 0o600)
	v.cfg = filepath.Join(dir, "stasis.yaml")
	v.writeConfig(t, mysqlYAML)
	return v
}

// createBank creates the tables the workload and the checks use.
func createBank(t testing.TB, srv *testenv.MariaDB, db *sql.DB) {
	srv.Exec(t, db, "CREATE DATABASE bank",
		"CREATE TABLE bank.accounts (id INT PRIMARY KEY, balance BIGINT NOT NULL) ENGINE=InnoDB",
		"CREATE TABLE bank.audit (id INT AUTO_INCREMENT PRIMARY KEY, note VARCHAR(64)) ENGINE=MyISAM")
	for i := 0; i < accounts; i++ {
		srv.Exec(t, db, fmt.Sprintf("INSERT INTO bank.accounts VALUES (%d, %d)", i, startBalance))
	}
}

func (v *dbVolume) writeConfig(t testing.TB, mysqlYAML string) {
	cfg := fmt.Sprintf("repository: %s\nmount: \"\"\nsocket: %s\nstate_dir: %s\nvolumes:\n  - name: db\n    source: %s\n    schedules: []\n%s",
		v.repo, filepath.Join(filepath.Dir(v.cfg), "sock"), filepath.Join(filepath.Dir(v.cfg), "state"), v.mnt, mysqlYAML)
	if err := os.WriteFile(v.cfg, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
}

// workload runs InnoDB transfers (the total never changes) and MyISAM inserts (ids without
// gaps) until stop, recording commit latencies.
type workload struct {
	stop      chan struct{}
	wg        sync.WaitGroup
	commits   atomic.Int64
	mu        sync.Mutex
	latencies []time.Duration
	spans     [][2]time.Time // start and end of each commit
}

// stall is the longest commit that overlapped [from, to].
func (w *workload) stall(from, to time.Time) time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	var m time.Duration
	for _, s := range w.spans {
		if s[1].After(from) && s[0].Before(to) {
			m = max(m, s[1].Sub(s[0]))
		}
	}
	return m
}

func startWorkload(t testing.TB, db *sql.DB) *workload {
	w := &workload{stop: make(chan struct{})}
	for g := 0; g < 3; g++ {
		w.wg.Add(1)
		go func(seed int64) {
			defer w.wg.Done()
			rng := rand.New(rand.NewSource(seed))
			for {
				select {
				case <-w.stop:
					return
				default:
				}
				start := time.Now()
				a, b, amt := rng.Intn(accounts), rng.Intn(accounts), rng.Intn(50)
				tx, err := db.Begin()
				if err != nil {
					continue
				}
				_, err1 := tx.Exec("UPDATE bank.accounts SET balance = balance - ? WHERE id = ?", amt, a)
				_, err2 := tx.Exec("UPDATE bank.accounts SET balance = balance + ? WHERE id = ?", amt, b)
				if err1 != nil || err2 != nil {
					tx.Rollback()
					continue
				}
				if tx.Commit() == nil {
					w.commits.Add(1)
					w.mu.Lock()
					w.latencies = append(w.latencies, time.Since(start))
					w.spans = append(w.spans, [2]time.Time{start, time.Now()})
					w.mu.Unlock()
				}
			}
		}(int64(g))
	}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		for i := 0; ; i++ {
			select {
			case <-w.stop:
				return
			default:
			}
			db.Exec("INSERT INTO bank.audit (note) VALUES (?)", fmt.Sprint("event ", i))
		}
	}()
	t.Cleanup(w.halt)
	return w
}

func (w *workload) halt() {
	select {
	case <-w.stop:
	default:
		close(w.stop)
	}
	w.wg.Wait()
}

func (w *workload) maxLatencySince(from int) time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	var m time.Duration
	for _, l := range w.latencies[min(from, len(w.latencies)):] {
		m = max(m, l)
	}
	return m
}

func (w *workload) count() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.latencies)
}

// checkRestored starts a second server on a copy of the snapshot's datadir (with the same
// binary log basename, as InnoDB recovery needs) and checks every table and invariant, and
// that the binary log ends exactly at the recorded position.
//
// The datadir comes either from the exported volume mounted by the kernel, or (viaFiles)
// from `stasis restore db/NAME:/mysql --to DIR`, which must also print the coordinates.
func checkRestored(t *testing.T, v *dbVolume, name string, app map[string]any, viaFiles bool) {
	t.Helper()
	copyDir := filepath.Join(t.TempDir(), "datadir")
	if viaFiles {
		into := filepath.Dir(copyDir)
		out := testenv.MustStasis(t, "restore", "-r", v.repo, "db/"+name+":/mysql", "--to", into)
		if want := fmt.Sprintf("binlog position %v:%v", app["binlog_file"], app["binlog_position"]); !strings.Contains(out, want) {
			t.Fatalf("restore of the datadir did not print %q:\n%s", want, out)
		}
		copyDir = filepath.Join(into, "mysql")
	} else {
		img := filepath.Join(t.TempDir(), "db.img")
		testenv.MustStasis(t, "export", "-r", v.repo, "db/"+name, img)
		view := testenv.Mount(t, img, "-o", "ro,loop,noload")
		testenv.Run(t, "cp", "-a", filepath.Join(view, "mysql"), copyDir)
		testenv.Run(t, "umount", view)
	}
	checkDatabase(t, name, copyDir, filepath.Join(copyDir, "mysql-bin"), app)
}

// checkDatabase starts a server on a restored datadir, with the binary log at logBin (the
// basename the source used, in its restored place), and checks that the binary log ends
// at the recorded position, every table passes CHECK TABLE and the invariants hold.
func checkDatabase(t *testing.T, name, datadir, logBin string, app map[string]any) {
	t.Helper()
	file, _ := app["binlog_file"].(string)
	pos, _ := app["binlog_position"].(float64)
	if file == "" || pos == 0 {
		t.Fatalf("snapshot %s recorded no binlog coordinates: %v", name, app)
	}
	st, err := os.Stat(filepath.Join(filepath.Dir(logBin), file))
	if err != nil || st.Size() != int64(pos) {
		t.Fatalf("snapshot %s: binlog %s is %v bytes in the snapshot, recorded position %v (%v)", name, file, st, pos, err)
	}
	srv := testenv.StartMariaDBLogBin(t, datadir, logBin)
	db := srv.DB(t)
	for _, table := range []string{"bank.accounts", "bank.audit", "mysql.user", "mysql.db"} {
		var tbl, op, typ, msg string
		if err := db.QueryRow("CHECK TABLE "+table).Scan(&tbl, &op, &typ, &msg); err != nil || msg != "OK" {
			t.Fatalf("snapshot %s: CHECK TABLE %s: %s %v", name, table, msg, err)
		}
	}
	var sum, n int64
	db.QueryRow("SELECT SUM(balance), COUNT(*) FROM bank.accounts").Scan(&sum, &n)
	if sum != accounts*startBalance || n != accounts {
		t.Fatalf("snapshot %s: %d accounts holding %d, want %d holding %d", name, n, sum, accounts, accounts*startBalance)
	}
	var cnt, maxID sql.NullInt64
	db.QueryRow("SELECT COUNT(*), MAX(id) FROM bank.audit").Scan(&cnt, &maxID)
	if cnt.Int64 != maxID.Int64 {
		t.Fatalf("snapshot %s: MyISAM audit has %d rows up to id %d: torn", name, cnt.Int64, maxID.Int64)
	}
}

func snapshotDB(t testing.TB, v *dbVolume, name string, env ...string) (map[string]any, testenv.Result) {
	r := testenv.StasisEnv(t, env, "--config", v.cfg, "snapshot", "db", "--name", name, "--json")
	if r.Code != 0 {
		return nil, r
	}
	var out map[string]any
	if err := json.Unmarshal([]byte(r.Stdout), &out); err != nil {
		t.Fatal(err)
	}
	return out, r
}

// TestMariaDBConsistentSnapshots: under a continuous workload, app-consistent snapshots
// restore into a server that starts, passes CHECK TABLE, keeps the invariants and whose
// binary log ends at the recorded position.
func TestMariaDBConsistentSnapshots(t *testing.T) {
	v := newDBVolume(t, "    mysql:\n      dsn_file: DSN\n      lock_timeout: 5s\n")
	v.writeConfig(t, strings.Replace("    mysql:\n      dsn_file: DSN\n      lock_timeout: 5s\n", "DSN", v.dsnFile, 1))
	if out := testenv.MustStasis(t, "config", "check", v.cfg); !strings.Contains(out, "is valid") {
		t.Fatalf("config check: %s", out)
	}
	w := startWorkload(t, v.db)
	time.Sleep(time.Second)
	for i := 0; i < 3; i++ {
		out, r := snapshotDB(t, v, fmt.Sprint("s", i))
		if out == nil {
			t.Fatalf("snapshot %d: %s", i, r.Stderr)
		}
		if out["consistency"] != "app" {
			t.Fatalf("snapshot %d is %v, want app", i, out["consistency"])
		}
		time.Sleep(500 * time.Millisecond)
	}
	w.halt()
	if w.commits.Load() < 100 {
		t.Fatalf("the workload committed only %d transactions", w.commits.Load())
	}
	for i, s := range listJSON(t, "-r", v.repo) {
		app, _ := s["app"].(map[string]any)
		if app["database"] != "MariaDB" || app["lock_mode"] != "backup-stage" || app["gtid"] == nil {
			t.Fatalf("recorded app info: %v", app)
		}
		t.Logf("%s: lock wait %.1f ms, hold %.1f ms, binlog %v:%v, gtid %v", s["name"], app["lock_wait_ms"], app["lock_hold_ms"], app["binlog_file"], app["binlog_position"], app["gtid"])
		checkRestored(t, v, s["name"].(string), app, i > 0)
	}
}

// TestMariaDBLongQuery: a long query that would block the lock makes the snapshot give up
// within lock_timeout with a message naming it; kill_long_queries kills it instead; with
// on_failure: crash-consistent the snapshot is taken anyway and not labelled app.
func TestMariaDBLongQuery(t *testing.T) {
	v := newDBVolume(t, "")
	v.srv.Exec(t, v.db, "CREATE TABLE bank.slow (x INT) ENGINE=InnoDB")
	// A long write on a table of its own: it holds a metadata lock FTWRL must wait for,
	// without getting in the workload's way by itself.
	long := func() chan error {
		done := make(chan error, 1)
		go func() {
			_, err := v.db.Exec("INSERT INTO bank.slow SELECT SLEEP(30)")
			done <- err
		}()
		time.Sleep(1500 * time.Millisecond) // older than the threshold
		return done
	}
	base := "    mysql:\n      dsn_file: " + v.dsnFile + "\n      lock_timeout: 2s\n      long_query_threshold: 1s\n"

	v.writeConfig(t, base)
	q := long()
	w := startWorkload(t, v.db)
	before := w.count()
	start := time.Now()
	_, r := snapshotDB(t, v, "blocked")
	took := time.Since(start)
	// The blocker is named by session, user and age; its statement text (other people's
	// data) is never reported, logged or kept.
	if r.Code == 0 || !strings.Contains(r.Stderr, "of user root, running a statement") || strings.Contains(r.Stderr, "SLEEP") ||
		!strings.Contains(r.Stderr, "kill_long_queries") {
		t.Fatalf("snapshot behind a long query: exit %d: %s", r.Code, r.Stderr)
	}
	if took > 15*time.Second {
		t.Fatalf("gave up after %v", took)
	}
	if stall := w.maxLatencySince(before); stall > 2*time.Second+500*time.Millisecond {
		t.Fatalf("writers stalled %v, longer than lock_timeout", stall)
	}

	// FTWRL itself behind the query (no threshold): abandoned after lock_timeout, KILLed,
	// writers resume, and no lock request is left queued.
	v.writeConfig(t, "    mysql:\n      dsn_file: "+v.dsnFile+"\n      lock_timeout: 2s\n      long_query_threshold: 0s\n      mode: ftwrl\n")
	before = w.count()
	_, r = snapshotDB(t, v, "ftwrl-blocked")
	if r.Code == 0 || !strings.Contains(r.Stderr, "did not get the lock within lock_timeout (2s)") {
		t.Fatalf("FTWRL behind a long query: exit %d: %s", r.Code, r.Stderr)
	}
	var queued int
	v.db.QueryRow("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'FLUSH TABLES WITH READ LOCK%'").Scan(&queued)
	if queued != 0 {
		t.Fatal("an abandoned FTWRL is still queued on the server")
	}
	if stall := w.maxLatencySince(before); stall > 3*time.Second {
		t.Fatalf("writers stalled %v behind an abandoned FTWRL (lock_timeout 2s)", stall)
	}

	v.writeConfig(t, base+"      on_failure: crash-consistent\n")
	out, r := snapshotDB(t, v, "anyway")
	if out == nil || out["consistency"] == "app" {
		t.Fatalf("on_failure crash-consistent: %v %s", out, r.Stderr)
	}

	v.writeConfig(t, base+"      kill_long_queries: true\n")
	out, r = snapshotDB(t, v, "killed")
	if out == nil || out["consistency"] != "app" {
		t.Fatalf("kill_long_queries: %v %s", out, r.Stderr)
	}
	select {
	case err := <-q:
		if err == nil {
			// SLEEP returns 1 when interrupted by KILL QUERY instead of an error.
			t.Log("the long query was interrupted")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the long query was not killed")
	}
	w.halt()
}

// TestMariaDBConnectionErrors: clear, specific errors for a server that is down, a wrong
// password, a missing privilege.
func TestMariaDBConnectionErrors(t *testing.T) {
	v := newDBVolume(t, "")
	v.srv.Exec(t, v.db, "CREATE USER weak@localhost IDENTIFIED BY 'pw'", "CREATE USER snap@localhost IDENTIFIED BY 'pw'",
		"GRANT RELOAD, BINLOG MONITOR, PROCESS ON *.* TO snap@localhost")
	cases := []struct{ dsn, want string }{
		{"root:@unix(/nonexistent/mysqld.sock)/", "does not exist: is the server running"},
		{"snap:wrong@unix(" + v.srv.Socket + ")/", "access denied"},
		{"weak:pw@unix(" + v.srv.Socket + ")/", "GRANT RELOAD, BINLOG MONITOR"},
	}
	for _, c := range cases {
		os.WriteFile(v.dsnFile, []byte(c.dsn), 0o600)
		v.writeConfig(t, "    mysql:\n      dsn_file: "+v.dsnFile+"\n")
		r := testenv.Stasis(t, "config", "check", v.cfg)
		if r.Code == 0 || !strings.Contains(r.Stderr, c.want) {
			t.Errorf("config check with %s: exit %d: %s", c.dsn, r.Code, r.Stderr)
		}
		if _, r := snapshotDB(t, v, "x"); r.Code == 0 || !strings.Contains(r.Stderr, "database lock") {
			t.Errorf("snapshot with %s: exit %d: %s", c.dsn, r.Code, r.Stderr)
		}
	}
	os.WriteFile(v.dsnFile, []byte("snap:pw@unix("+v.srv.Socket+")/"), 0o600)
	os.Chmod(v.dsnFile, 0o644)
	if _, r := snapshotDB(t, v, "x"); r.Code == 0 || !strings.Contains(r.Stderr, "chmod 600") {
		t.Errorf("a world-readable dsn_file: %s", r.Stderr)
	}
	os.Chmod(v.dsnFile, 0o600)
	if out, r := snapshotDB(t, v, "ok"); out == nil || out["consistency"] != "app" {
		t.Errorf("with the right grants: %v %s", out, r.Stderr)
	}
}

// TestHooksAroundTheFreeze: a failing pre hook aborts before anything is locked or frozen,
// and the post hooks still run; a hanging hook is killed at its timeout.
func TestHooksAroundTheFreeze(t *testing.T) {
	dev, _ := testenv.LoopDevice(t, 64<<20)
	testenv.Mkfs(t, "ext4", dev)
	mnt := testenv.Mount(t, dev)
	dir := t.TempDir()
	marker := filepath.Join(dir, "post-ran")
	hook := func(name, body string) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o755)
		return p
	}
	// The failing pre hook proves nothing is frozen yet: it writes to the filesystem.
	fail := hook("pre-fail", "echo checking the app; touch "+mnt+"/pre-was-writable; exit 7")
	post := hook("post", "touch "+marker)
	hang := hook("pre-hang", "sleep 60")
	cfg := filepath.Join(dir, "stasis.yaml")
	write := func(pre string) {
		os.WriteFile(cfg, []byte(fmt.Sprintf("repository: %s\nmount: \"\"\nsocket: %s\nvolumes:\n  - name: h\n    source: %s\n    hooks:\n      pre: [%s]\n      post: [%s]\n      timeout: 1s\n",
			filepath.Join(dir, "repo"), filepath.Join(dir, "sock"), mnt, pre, post)), 0o600)
	}
	write(fail)
	r := testenv.Stasis(t, "--config", cfg, "snapshot", "h")
	if r.Code == 0 || !strings.Contains(r.Stderr, "exit status 7") || !strings.Contains(r.Stderr, "nothing was locked or frozen") {
		t.Fatalf("failing pre hook: exit %d: %s", r.Code, r.Stderr)
	}
	if _, err := os.Stat(filepath.Join(mnt, "pre-was-writable")); err != nil {
		t.Fatal("the pre hook ran while the filesystem was frozen")
	}
	if _, err := os.Stat(marker); err != nil {
		t.Fatal("post hooks did not run after the failure")
	}
	os.Remove(marker)
	write(hang)
	start := time.Now()
	r = testenv.Stasis(t, "--config", cfg, "snapshot", "h")
	if r.Code == 0 || !strings.Contains(r.Stderr, "was killed") || time.Since(start) > 20*time.Second {
		t.Fatalf("hanging pre hook: exit %d after %v: %s", r.Code, time.Since(start), r.Stderr)
	}
	write(post) // a pre hook that succeeds
	r = testenv.Stasis(t, "--config", cfg, "snapshot", "h", "--json")
	if r.Code != 0 || !strings.Contains(r.Stdout, `"consistency": "app"`) {
		t.Fatalf("hooks that succeed: exit %d: %s %s", r.Code, r.Stdout, r.Stderr)
	}
	_ = context.Background
}

// BenchmarkMariaDBTrackedLock measures, for tracked incrementals taken by the agent under a
// transactional workload, how long the database lock is held and how long writers stall
// (the longest commit overlapping each snapshot). Run: make bench-mysql.
func BenchmarkMariaDBTrackedLock(b *testing.B) {
	v := newDBVolume(b, "")
	v.writeConfig(b, "    mysql:\n      dsn_file: "+v.dsnFile+"\n      lock_timeout: 5s\n")
	agent := exec.Command(testenv.Binary(b), "agent", "--config", v.cfg)
	if err := agent.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { agent.Process.Signal(syscall.SIGTERM); agent.Wait() }()
	time.Sleep(2 * time.Second)
	w := startWorkload(b, v.db)
	time.Sleep(time.Second)
	var holds, stalls, baseline []float64
	for i := 0; i < 9; i++ {
		from := time.Now()
		out, r := snapshotDB(b, v, fmt.Sprint("b", i))
		to := time.Now()
		if out == nil {
			b.Fatalf("snapshot: %s", r.Stderr)
		}
		if i == 0 { // the first is a full scan; the tracker runs from here on
			continue
		}
		if out["tracking"] != "tracked" {
			b.Fatalf("snapshot %d was not tracked: %v", i, out["tracking"])
		}
		app, _ := out["app"].(map[string]any)
		holds = append(holds, app["lock_hold_ms"].(float64))
		stalls = append(stalls, float64(w.stall(from, to).Microseconds())/1000)
		time.Sleep(time.Second)
		baseline = append(baseline, float64(w.stall(to.Add(200*time.Millisecond), time.Now()).Microseconds())/1000)
	}
	w.halt()
	med := func(x []float64) float64 { sort.Float64s(x); return x[len(x)/2] }
	b.ReportMetric(med(holds), "lock-hold-ms-median")
	b.ReportMetric(med(stalls), "writer-stall-ms-median")
	b.ReportMetric(med(baseline), "commit-ms-without-snapshot")
	b.Logf("lock hold ms %v; writer stall ms %v; longest commit between snapshots ms %v", holds, stalls, baseline)
}

// TestMariaDBGroup: a server with its datadir on one volume and its binary log on another,
// snapshotted as a consistency group under the database lock (without the agent): both
// members are app-consistent at one instant, and the restored pair starts, with the
// binary log ending at the recorded position and every invariant holding.
func TestMariaDBGroup(t *testing.T) {
	var mnts []string
	for i := 0; i < 2; i++ {
		dev, _ := testenv.LoopDevice(t, 512<<20)
		testenv.Mkfs(t, "ext4", dev)
		mnts = append(mnts, testenv.Mount(t, dev))
	}
	datadir, binlogDir := filepath.Join(mnts[0], "mysql"), filepath.Join(mnts[1], "binlog")
	os.Mkdir(binlogDir, 0o750)
	testenv.InitMariaDB(t, datadir)
	srv := testenv.StartMariaDBLogBin(t, datadir, filepath.Join(binlogDir, "mysql-bin"))
	db := srv.DB(t)
	createBank(t, srv, db)
	dir := t.TempDir()
	repo, dsn, cfg := filepath.Join(dir, "repo"), filepath.Join(dir, "mysql.dsn"), filepath.Join(dir, "stasis.yaml")
	os.WriteFile(dsn, []byte(srv.DSN("root", "")+"\n"), 0o600)
	os.WriteFile(cfg, []byte(fmt.Sprintf(`repository: %s
mount: ""
socket: %s
state_dir: %s
volumes:
  - name: data
    source: %s
  - name: logs
    source: %s
groups:
  - name: db
    volumes: [data, logs]
    schedules: []
    mysql:
      dsn_file: %s
      lock_timeout: 5s
`, repo, filepath.Join(dir, "sock"), filepath.Join(dir, "state"), mnts[0], mnts[1], dsn)), 0o600)
	w := startWorkload(t, db)
	time.Sleep(time.Second)
	var last []map[string]any
	for i := 0; i < 2; i++ {
		r := testenv.Stasis(t, "--config", cfg, "snapshot", "db", "--name", fmt.Sprint("g", i), "--json")
		if r.Code != 0 {
			t.Fatalf("group snapshot %d: %s", i, r.Stderr)
		}
		last = nil
		if err := json.Unmarshal([]byte(r.Stdout), &last); err != nil || len(last) != 2 {
			t.Fatalf("group snapshot %d: %v\n%s", i, err, r.Stdout)
		}
		for _, m := range last {
			if m["consistency"] != "app" || m["group"] != "db" || m["group_id"] != last[0]["group_id"] {
				t.Fatalf("member %v of group snapshot %d: %v %v %v", m["volume"], i, m["consistency"], m["group"], m["group_id"])
			}
		}
		time.Sleep(500 * time.Millisecond)
	}
	w.halt()
	// Restore the pair: the datadir and the binary log, each out of its own volume's
	// snapshot, to new places; the server is told where the log now is.
	restored := t.TempDir()
	for _, m := range last {
		img := filepath.Join(t.TempDir(), "vol.img")
		testenv.MustStasis(t, "export", "-r", repo, fmt.Sprintf("%v/%v", m["volume"], m["name"]), img)
		view := testenv.Mount(t, img, "-o", "ro,loop,noload")
		sub := map[any]string{"data": "mysql", "logs": "binlog"}[m["volume"]]
		testenv.Run(t, "cp", "-a", filepath.Join(view, sub), filepath.Join(restored, sub))
		testenv.Run(t, "umount", view)
	}
	// The binary log index names the logs by their absolute paths: point it at the copies.
	index := filepath.Join(restored, "binlog", "mysql-bin.index")
	b, err := os.ReadFile(index)
	if err != nil || !strings.Contains(string(b), binlogDir) {
		t.Fatalf("binlog index %q: %v", b, err)
	}
	os.WriteFile(index, []byte(strings.ReplaceAll(string(b), binlogDir, filepath.Join(restored, "binlog"))), 0o640)
	app, _ := last[0]["app"].(map[string]any)
	checkDatabase(t, "db/g1", filepath.Join(restored, "mysql"), filepath.Join(restored, "binlog", "mysql-bin"), app)
}

package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stasis-project/stasis/test/testenv"
)

// remoteHost is one machine of a fleet sharing a repository: the real binary with its own
// host name and index cache.
type remoteHost struct {
	name string
	env  []string
}

func (h remoteHost) run(t *testing.T, args ...string) testenv.Result {
	t.Helper()
	return testenv.StasisEnv(t, h.env, args...)
}

func (h remoteHost) must(t *testing.T, args ...string) string {
	t.Helper()
	r := h.run(t, args...)
	if r.Code != 0 {
		t.Fatalf("%s: stasis %s: exit %d\n%s%s", h.name, strings.Join(args, " "), r.Code, r.Stdout, r.Stderr)
	}
	return r.Stdout
}

// passwordFile writes a passphrase file as an operator would: root's, mode 0600.
func passwordFile(t *testing.T, pw string) string {
	t.Helper()
	dir := t.TempDir()
	os.Chmod(dir, 0o700)
	p := filepath.Join(dir, "password")
	if err := os.WriteFile(p, []byte(pw+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// fleet returns hosts sharing the S3 location loc; extra goes into every host's environment.
func fleet(t *testing.T, s3 *testenv.S3, names []string, extra ...string) []remoteHost {
	var hosts []remoteHost
	for _, n := range names {
		env := append(append([]string{"STASIS_HOST=" + n, "STASIS_CACHE_DIR=" + t.TempDir(), "STASIS_TEST_KDF_TARGET=1ms"}, s3.Env()...), extra...)
		hosts = append(hosts, remoteHost{name: n, env: env})
	}
	return hosts
}

func listAs(t *testing.T, h remoteHost, args ...string) []listed {
	t.Helper()
	var out []listed
	if err := json.Unmarshal([]byte(h.must(t, append([]string{"list", "--json"}, args...)...)), &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestS3FleetSharedRepository: two hosts snapshot a volume of the same name into one
// encrypted S3 repository while a third deletes old snapshots and runs gc, for many rounds
// at once, with no lock between them. Every snapshot that was not deleted exports bit for
// bit what its source held, each host's chain stays its own, and verify --read-data finds
// nothing wrong.
func TestS3FleetSharedRepository(t *testing.T) {
	testenv.RequireRoot(t)
	s3 := testenv.StartS3(t)
	loc := s3.Location("fleet")
	pw := passwordFile(t, "fleet passphrase")
	hosts := fleet(t, s3, []string{"host-a", "host-b", "janitor"}, "STASIS_PASSWORD_FILE="+pw)
	hosts[0].must(t, "init", "--encryption", "-r", loc)

	const rounds = 50
	var mu sync.Mutex
	want := map[string]string{} // host:volume/name -> hash of the source when snapshotted
	var failures []string
	fail := func(format string, args ...any) {
		mu.Lock()
		failures = append(failures, fmt.Sprintf(format, args...))
		mu.Unlock()
	}
	var writers sync.WaitGroup
	for i, h := range hosts[:2] {
		src := filepath.Join(t.TempDir(), "disk.img")
		f, err := os.Create(src)
		if err != nil {
			t.Fatal(err)
		}
		rng := rand.New(rand.NewSource(int64(i)))
		testenv.FillMixed(t, rng, f, 4<<20)
		writers.Add(1)
		go func() {
			defer writers.Done()
			defer f.Close()
			for r := 0; r < rounds; r++ {
				testenv.Scribble(t, rng, f, 4<<20, 20)
				f.Sync()
				hash := testenv.HashFile(t, src, 0)
				name := fmt.Sprintf("r%03d", r)
				res := h.run(t, "snapshot", "-r", loc, "--source", src, "--volume", "data", "--name", name)
				if res.Code != 0 {
					fail("%s round %d: exit %d: %s", h.name, r, res.Code, res.Stderr)
					return
				}
				mu.Lock()
				want[h.name+":data/"+name] = hash
				mu.Unlock()
			}
		}()
	}
	stop := make(chan struct{})
	janitorDone := make(chan int)
	go func() {
		deleted := 0
		defer func() { janitorDone <- deleted }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			var snaps []listed
			res := hosts[2].run(t, "list", "-r", loc, "--json")
			if res.Code != 0 || json.Unmarshal([]byte(res.Stdout), &snaps) != nil {
				fail("janitor list: exit %d: %s", res.Code, res.Stderr)
				return
			}
			byHost := map[string][]listed{}
			for _, s := range snaps {
				byHost[s.Host] = append(byHost[s.Host], s)
			}
			for host, ss := range byHost {
				if len(ss) <= 3 {
					continue
				}
				victim := ss[rand.Intn(len(ss)-1)] // any but the newest: a middle one too
				ref := host + ":data/" + victim.Name
				if res := hosts[2].run(t, "delete", "-r", loc, ref); res.Code != 0 {
					fail("janitor delete %s: exit %d: %s", ref, res.Code, res.Stderr)
					return
				}
				mu.Lock()
				delete(want, ref)
				mu.Unlock()
				deleted++
			}
			if res := hosts[2].run(t, "gc", "-r", loc); res.Code != 0 {
				fail("janitor gc: exit %d: %s", res.Code, res.Stderr)
				return
			}
		}
	}()
	writers.Wait()
	close(stop)
	deleted := <-janitorDone
	if len(failures) > 0 {
		t.Fatalf("%d failures, first: %s", len(failures), failures[0])
	}
	if deleted < 10 {
		t.Fatalf("the janitor deleted only %d snapshots: the test did not exercise concurrent deletion", deleted)
	}
	hosts[2].must(t, "gc", "-r", loc)
	hosts[2].must(t, "gc", "-r", loc)

	snaps := listAs(t, hosts[2], "-r", loc)
	if len(snaps) != len(want) {
		t.Fatalf("the repository lists %d snapshots; %d were taken and not deleted", len(snaps), len(want))
	}
	for _, s := range snaps {
		ref := s.Host + ":data/" + s.Name
		h, ok := want[ref]
		if !ok {
			t.Fatalf("unexpected snapshot %s", ref)
		}
		out := filepath.Join(t.TempDir(), "export.img")
		hosts[2].must(t, "export", "-r", loc, ref, out)
		if got := testenv.HashFile(t, out, 0); got != h {
			t.Fatalf("%s exports other bytes than its source held", ref)
		}
		os.Remove(out)
	}
	// Each host sees its own chain under the plain volume name.
	a := listAs(t, hosts[0], "-r", loc, "--host", "host-a")
	if len(a) == 0 || a[len(a)-1].Host != "host-a" {
		t.Fatalf("host-a's list: %+v", a)
	}
	hosts[0].must(t, "export", "-r", loc, "data/"+a[len(a)-1].Name, filepath.Join(t.TempDir(), "own.img"))
	if r := hosts[2].run(t, "verify", "--read-data", "-r", loc); r.Code != 0 {
		t.Fatalf("verify --read-data: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
	t.Logf("%d rounds on 2 hosts, %d deletions with gc alongside, %d snapshots verified", rounds, deleted, len(snaps))
}

// objects counts the files under dir (a bucket prefix as versitygw stores it).
func objects(t *testing.T, dir string) int {
	t.Helper()
	n := 0
	filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			n++
		}
		return nil
	})
	return n
}

// TestS3KilledUploadCollected: a snapshot killed with SIGKILL while uploading leaves
// packs no index names. Committed snapshots are untouched, gc deletes the dead writer's
// packs and heartbeat, and a new snapshot then works and exports exact.
func TestS3KilledUploadCollected(t *testing.T) {
	testenv.RequireRoot(t)
	s3 := testenv.StartS3(t)
	loc := s3.Location("killed")
	h := fleet(t, s3, []string{"host-a"})[0]
	h.must(t, "init", "-r", loc)
	src := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(9))
	testenv.FillMixed(t, rng, f, 16<<20)
	h.must(t, "snapshot", "-r", loc, "--source", src, "--volume", "data", "--name", "first")
	firstHash := testenv.HashFile(t, src, 0)
	packsDir := filepath.Join(s3.Dir, s3.Bucket, "killed", "packs")
	before := objects(t, packsDir)

	big := filepath.Join(t.TempDir(), "big.img")
	g, err := os.Create(big)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for i := 0; i < 160; i++ { // incompressible: many packs
		rng.Read(buf)
		g.Write(buf)
	}
	g.Close()
	cmd := exec.Command(testenv.Binary(t), "snapshot", "-r", loc, "--source", big, "--volume", "big", "--name", "killed")
	cmd.Env = append(os.Environ(), h.env...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for objects(t, packsDir) < before+2 {
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatal("the snapshot uploaded no pack within 60 s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	leftover := objects(t, packsDir)
	if leftover <= before {
		t.Fatalf("no packs left behind (%d before, %d after): nothing to test", before, leftover)
	}
	if snaps := listAs(t, h, "-r", loc); len(snaps) != 1 || snaps[0].Name != "first" {
		t.Fatalf("after the kill the repository lists %+v", snaps)
	}
	if r := h.run(t, "verify", "-r", loc); r.Code != 0 {
		t.Fatalf("verify after the kill: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
	// The dead writer ran on this machine: its process is gone, so gc need not wait for
	// its heartbeat to go stale (from another machine it would wait LeaseStale; the chain
	// package's protocol tests cover that) and collects its packs at once.
	h.must(t, "gc", "-r", loc)
	if n := objects(t, packsDir); n != before {
		t.Fatalf("after the writer died, gc left %d pack files; %d belong to committed snapshots", n, before)
	}
	writersDir := filepath.Join(s3.Dir, s3.Bucket, "killed", "writers")
	if n := objects(t, writersDir); n != 0 {
		t.Fatalf("gc left %d heartbeat objects of the dead writer", n)
	}
	testenv.Scribble(t, rng, f, 16<<20, 10)
	f.Close()
	h.must(t, "snapshot", "-r", loc, "--source", src, "--volume", "data", "--name", "second")
	secondHash := testenv.HashFile(t, src, 0)
	for name, hash := range map[string]string{"first": firstHash, "second": secondHash} {
		out := filepath.Join(t.TempDir(), name+".img")
		h.must(t, "export", "-r", loc, "data/"+name, out)
		if testenv.HashFile(t, out, 0) != hash {
			t.Fatalf("%s exports other bytes than its source held", name)
		}
	}
}

// TestCopyToS3AndBack: copy a local chain to an encrypted S3 repository with other keys,
// incrementally, and restore from the copy bit for bit; a repository made with
// --copy-keys-from shares IDs so copying into it reads only what it lacks.
func TestCopyToS3AndBack(t *testing.T) {
	testenv.RequireRoot(t)
	s3 := testenv.StartS3(t)
	h := fleet(t, s3, []string{"host-a"})[0]
	local := filepath.Join(t.TempDir(), "repo")
	h.must(t, "init", "-r", local)
	src := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rng := rand.New(rand.NewSource(3))
	testenv.FillMixed(t, rng, f, 16<<20)
	hashes := map[string]string{}
	snap := func(name string) {
		h.must(t, "snapshot", "-r", local, "--source", src, "--volume", "data", "--name", name)
		hashes[name] = testenv.HashFile(t, src, 0)
	}
	snap("one")
	remote := s3.Location("copy")
	pw := passwordFile(t, "remote passphrase")
	env := append(h.env, "STASIS_PASSWORD_FILE="+pw)
	enc := remoteHost{name: "host-a", env: env}
	enc.must(t, "init", "--encryption", "-r", remote)
	type copyOut struct {
		Stats struct {
			Copied     int   `json:"copied"`
			Skipped    int   `json:"skipped"`
			ChunksRead int64 `json:"chunks_read"`
		} `json:"stats"`
	}
	copyTo := func() copyOut {
		var out copyOut
		res := h.run(t, "copy", "--from", local, "--to", remote, "--to-password-file", pw, "--json")
		if res.Code != 0 {
			t.Fatalf("copy: exit %d\n%s", res.Code, res.Stderr)
		}
		if err := json.Unmarshal([]byte(res.Stdout), &out); err != nil {
			t.Fatal(err)
		}
		return out
	}
	if c := copyTo(); c.Stats.Copied != 1 {
		t.Fatalf("first copy: %+v", c)
	}
	changed := testenv.Scribble(t, rng, f, 16<<20, 3)
	snap("two")
	c := copyTo()
	if c.Stats.Copied != 1 || c.Stats.Skipped != 1 || c.Stats.ChunksRead > int64(2*len(changed)) {
		t.Fatalf("incremental copy after %d small changes: %+v", len(changed), c)
	}
	// The copy is encrypted: none of the volume's names are in the bucket in the clear (key
	// files name the host and user that made them, as restic's do: FORMAT.md).
	for _, marker := range []string{"data", "one", "two", "host-a"} {
		out, _ := exec.Command("grep", "-rl", "--exclude-dir=keys", "--", `"`+marker+`"`, filepath.Join(s3.Dir, s3.Bucket, "copy")).Output()
		if len(out) > 0 {
			t.Fatalf("%q appears in the clear in %s", marker, out)
		}
	}
	// Restore from the copy.
	for _, name := range []string{"one", "two"} {
		out := filepath.Join(t.TempDir(), name+".img")
		enc.must(t, "export", "-r", remote, "data/"+name, out)
		if testenv.HashFile(t, out, 0) != hashes[name] {
			t.Fatalf("the S3 copy of %s differs", name)
		}
	}
	// The same repository as s3://bucket/prefix, the endpoint from AWS_ENDPOINT_URL.
	byBucket := remoteHost{name: "host-a", env: append(env, "AWS_ENDPOINT_URL=http://"+s3.Endpoint)}
	if got := listAs(t, byBucket, "-r", "s3://"+s3.Bucket+"/copy"); len(got) != 2 {
		t.Fatalf("s3://%s/copy lists %d snapshots, want 2", s3.Bucket, len(got))
	}
	// A wrong passphrase is refused with its own exit status and changes nothing.
	bad := passwordFile(t, "wrong")
	if r := h.run(t, "copy", "-r", local, "--to", remote, "--to-password-file", bad); r.Code != 12 {
		t.Fatalf("copy with a wrong passphrase: exit %d, want 12\n%s", r.Code, r.Stderr)
	}
	// Same keys: a third repository made with --copy-keys-from gets IDs equal to the
	// remote's; copying the remote into it twice reads nothing the second time.
	third := filepath.Join(t.TempDir(), "third")
	pw3 := passwordFile(t, "third passphrase")
	thirdHost := remoteHost{name: "host-a", env: append(h.env, "STASIS_PASSWORD_FILE="+pw3, "STASIS_FROM_PASSWORD_FILE="+pw)}
	thirdHost.must(t, "init", "-r", third, "--copy-keys-from", remote)
	res := enc.must(t, "copy", "-r", remote, "--to", third, "--to-password-file", pw3, "--json")
	var first copyOut
	json.Unmarshal([]byte(res), &first)
	if first.Stats.Copied != 2 {
		t.Fatalf("copy into the same-key repository: %s", res)
	}
	var names []string
	for _, s := range listAs(t, thirdHost, "-r", third) {
		names = append(names, s.Name)
	}
	sort.Strings(names)
	if strings.Join(names, ",") != "one,two" {
		t.Fatalf("the same-key copy lists %v", names)
	}
}

// TestAgentReplicates runs the agent with a local repository and replicate: to an
// encrypted S3 repository reached through a proxy that fails a fifth of the requests.
// Replication keeps going (failed passes are retried), catches up once the network heals,
// keeps its own retention, reports its lag and last success in status and the metrics, and
// every replicated snapshot exports exactly what the local one does.
func TestAgentReplicates(t *testing.T) {
	testenv.RequireRoot(t)
	s3 := testenv.StartS3(t)
	proxy := testenv.StartFaultProxy(t, s3.Endpoint, 0.2, 1)
	replica := fmt.Sprintf("s3:http://%s/%s/replica", proxy.Addr, s3.Bucket)
	pw := passwordFile(t, "replica passphrase")
	creds := passwordFile(t, fmt.Sprintf("[default]\naws_access_key_id = %s\naws_secret_access_key = %s", s3.Access, s3.Secret))
	src := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(4))
	testenv.FillMixed(t, rng, f, 8<<20)
	var wmu sync.Mutex // the writer below and the test's own scribbles
	stopWriter := make(chan struct{})
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		for {
			select {
			case <-stopWriter:
				return
			case <-time.After(300 * time.Millisecond):
			}
			wmu.Lock()
			testenv.Scribble(t, rng, f, 8<<20, 5)
			wmu.Unlock()
		}
	}()
	defer func() { close(stopWriter); <-writerDone; f.Close() }()
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	metrics := l.Addr().String()
	l.Close()
	a := startAgent(t, fmt.Sprintf(`metrics_listen: %s
s3: {credentials_file: %s}
replicate:
  repository: %s
  password_file: %s
  retention: {keep_auto: 2, keep_days: 30, keep_daily: 0, keep_weekly: 0, keep_monthly: 0}
volumes:
  - name: data
    source: %s
    schedules: ["@every 2s"]
    retention: {keep_auto: 5, keep_days: 30, keep_daily: 0, keep_weekly: 0, keep_monthly: 0}
`, metrics, creds, replica, pw, src), "STASIS_TEST_KDF_TARGET=1ms")
	type replicaStatus struct {
		Lag         int    `json:"lag"`
		Snapshots   int    `json:"snapshots"`
		LastSuccess string `json:"last_success"`
		LastError   string `json:"last_error"`
		CopiedBytes int64  `json:"copied_bytes"`
	}
	type status struct {
		Replica  *replicaStatus
		Replicas []*replicaStatus `json:"replicas"`
	}
	read := func() status {
		var st status
		r := testenv.Stasis(t, "--config", a.cfg, "status", "--json")
		if r.Code != 0 || json.Unmarshal([]byte(r.Stdout), &st) != nil || len(st.Replicas) != 1 {
			t.Fatalf("status: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
		}
		st.Replica = st.Replicas[0]
		return st
	}
	// With faults, snapshots go on and replication makes progress.
	for deadline := time.Now().Add(40 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		if st := read(); st.Replica.Snapshots >= 2 && st.Replica.CopiedBytes > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("replication made no progress through the faulty network: %+v\n%s", read().Replica, a.log.String())
		}
	}
	if proxy.Faults.Load() == 0 {
		t.Fatal("the proxy injected no fault")
	}
	proxy.SetRate(0)
	for deadline := time.Now().Add(40 * time.Second); ; time.Sleep(300 * time.Millisecond) {
		st := read()
		if st.Replica.Lag == 0 && st.Replica.LastSuccess != "" && st.Replica.LastError == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("replication did not catch up once the network healed: %+v", st.Replica)
		}
	}
	resp, err := http.Get("http://" + metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, series := range []string{"stasis_replica_lag_snapshots", "stasis_replica_last_success_timestamp_seconds", "stasis_replica_bytes_stored_total"} {
		if !strings.Contains(string(body), series+"{replica=") {
			t.Fatalf("metrics lack %s", series)
		}
	}
	// Stop the agent, then compare: the replica keeps at most its own quota (plus one a
	// pass may have copied before its retention ran), and each replicated snapshot is
	// bit for bit the local one.
	stopAgent(t, a)
	env := append(s3.Env(), "STASIS_PASSWORD_FILE="+pw, "STASIS_CACHE_DIR="+t.TempDir())
	direct := fmt.Sprintf("s3:http://%s/%s/replica", s3.Endpoint, s3.Bucket)
	var remote []listed
	r := testenv.StasisEnv(t, env, "list", "-r", direct, "--json")
	if r.Code != 0 || json.Unmarshal([]byte(r.Stdout), &remote) != nil {
		t.Fatalf("list the replica: exit %d\n%s", r.Code, r.Stderr)
	}
	local := list(t, a.repo)
	if len(remote) == 0 || len(remote) > 3 {
		t.Fatalf("the replica holds %d snapshots; its retention keeps 2", len(remote))
	}
	if len(local) > 6 {
		t.Fatalf("the local repository holds %d snapshots; its retention keeps 5", len(local))
	}
	compared := 0
	for _, s := range remote {
		for _, l := range local {
			if l.Name != s.Name {
				continue
			}
			out := filepath.Join(t.TempDir(), "replica.img")
			if r := testenv.StasisEnv(t, env, "export", "-r", direct, "data/"+s.Name, out); r.Code != 0 {
				t.Fatalf("export from the replica: %s", r.Stderr)
			}
			if testenv.HashFile(t, out, 0) != exportHash(t, a.repo, "data/"+s.Name) {
				t.Fatalf("the replica of %s differs from the local snapshot", s.Name)
			}
			compared++
		}
	}
	if compared == 0 {
		t.Fatal("no replicated snapshot is still in the local repository to compare with")
	}
	if r := testenv.StasisEnv(t, env, "verify", "--read-data", "-r", direct); r.Code != 0 {
		t.Fatalf("verify the replica: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
}

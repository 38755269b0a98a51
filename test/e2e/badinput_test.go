package e2e

import (
	"encoding/json"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stasis-project/stasis/test/testenv"
)

// TestBadInput: each mistake gets a specific message, a non-zero exit and an unchanged repository.
func TestBadInput(t *testing.T) {
	dir := t.TempDir()
	repo := newRepo(t)
	src := filepath.Join(dir, "src.img")
	os.WriteFile(src, []byte(strings.Repeat("data", 100000)), 0o600)
	testenv.MustStasis(t, "snapshot", "-r", repo, "--source", src, "--volume", "v", "--name", "a")
	empty := filepath.Join(dir, "empty")
	os.Mkdir(empty, 0o700)
	foreign := filepath.Join(dir, "foreign")
	os.Mkdir(foreign, 0o700)
	os.WriteFile(filepath.Join(foreign, "notes.txt"), []byte("mine"), 0o600)
	future := filepath.Join(dir, "future")
	testenv.MustStasis(t, "init", "-r", future)
	cfgPath := filepath.Join(future, "config")
	var cfg map[string]any
	b, _ := os.ReadFile(cfgPath)
	json.Unmarshal(b, &cfg)
	cfg["version"] = 99
	b, _ = json.Marshal(cfg)
	os.WriteFile(cfgPath, b, 0o600)
	emptyFile := filepath.Join(dir, "zero-length.img")
	os.WriteFile(emptyFile, nil, 0o600)

	cases := []struct {
		name string
		args []string
		want string
	}{
		{"missing source", []string{"snapshot", "-r", repo, "--source", filepath.Join(dir, "nope"), "--volume", "v"}, "does not exist"},
		{"directory source", []string{"snapshot", "-r", repo, "--source", dir, "--volume", "v"}, "is a directory"},
		{"character device", []string{"snapshot", "-r", repo, "--source", "/dev/null", "--volume", "v"}, "character device"},
		{"empty source", []string{"snapshot", "-r", repo, "--source", emptyFile, "--volume", "v"}, "is empty"},
		{"bad volume name", []string{"snapshot", "-r", repo, "--source", src, "--volume", "../x"}, "invalid volume name"},
		{"duplicate name", []string{"snapshot", "-r", repo, "--source", src, "--volume", "v", "--name", "a"}, "already has a snapshot named"},
		{"uninitialised dir", []string{"list", "-r", empty}, "stasis init"},
		{"missing repo", []string{"list", "-r", filepath.Join(dir, "none")}, "does not exist"},
		{"foreign dir", []string{"snapshot", "-r", foreign, "--source", src, "--volume", "v"}, "not a stasis repository"},
		{"init over foreign dir", []string{"init", "-r", foreign}, "not empty"},
		{"init twice", []string{"init", "-r", repo}, "already a repository"},
		{"future format", []string{"list", "-r", future}, "format version 99"},
		{"unknown snapshot", []string{"export", "-r", repo, "v/nope", filepath.Join(dir, "x.img")}, "no snapshot named"},
		{"unknown id", []string{"delete", "-r", repo, "v/a", "deadbeef"}, "no snapshot has an ID"},
		{"export over a file", []string{"export", "-r", repo, "v/a", src}, "already exists"},
		{"restore without --to", []string{"restore", "-r", repo, "v/a"}, "--to is required"},
	}
	before := testenv.TreeDigest(t, repo)
	foreignBefore := testenv.TreeDigest(t, foreign)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := testenv.Stasis(t, c.args...)
			if r.Code == 0 {
				t.Fatalf("exit 0; stdout %s", r.Stdout)
			}
			if !strings.Contains(r.Stderr, c.want) {
				t.Fatalf("stderr %q does not say %q", r.Stderr, c.want)
			}
		})
	}
	if testenv.TreeDigest(t, repo) != before || testenv.TreeDigest(t, foreign) != foreignBefore {
		t.Fatal("a failed command changed a repository or a foreign directory")
	}
	if entries, _ := os.ReadDir(empty); len(entries) != 0 {
		t.Fatal("an uninitialised directory was written to")
	}
	if n := len(list(t, repo)); n != 1 {
		t.Fatalf("%d snapshots after failed commands, want 1", n)
	}
}

// TestLockedRepository: a second writer is refused with the holder's name.
func TestLockedRepository(t *testing.T) {
	testenv.RequireRoot(t)
	repo := newRepo(t)
	// Hold the lock the way a writer does, from another process: flock(1) on the lock file.
	lock := filepath.Join(repo, "lock")
	os.WriteFile(lock, []byte("pid 4242 (stasis snapshot --volume big) on host since 2026-01-01T00:00:00Z\n"), 0o600)
	holder := startFlock(t, lock)
	defer holder()
	r := testenv.Stasis(t, "gc", "-r", repo)
	if r.Code != 11 || !strings.Contains(r.Stderr, "is locked by pid 4242 (stasis snapshot --volume big)") {
		t.Fatalf("gc while locked: exit %d (want 11): %s", r.Code, r.Stderr)
	}
	// Readers and snapshots do not need the lock.
	testenv.MustStasis(t, "list", "-r", repo)
	src := filepath.Join(t.TempDir(), "small.img")
	os.WriteFile(src, []byte(strings.Repeat("stasis ", 100000)), 0o644)
	testenv.MustStasis(t, "snapshot", "-r", repo, "--source", src, "--volume", "v")
	// --retry-lock waits for the holder to go.
	go func() { time.Sleep(1500 * time.Millisecond); holder() }()
	start := time.Now()
	r = testenv.Stasis(t, "gc", "-r", repo, "--retry-lock", "30s")
	if r.Code != 0 || time.Since(start) < time.Second {
		t.Fatalf("gc --retry-lock: exit %d after %v: %s", r.Code, time.Since(start), r.Stderr)
	}
}

// TestENOSPC fills a small filesystem holding the repository: the snapshot fails with a
// clear error and the repository is exactly as before.
func TestENOSPC(t *testing.T) {
	dev, _ := testenv.LoopDevice(t, 48<<20)
	testenv.Mkfs(t, "ext4", dev)
	mnt := testenv.Mount(t, dev)
	repo := filepath.Join(mnt, "repo")
	testenv.MustStasis(t, "init", "-r", repo)
	rng := rand.New(rand.NewSource(5))
	dir := t.TempDir()
	small := filepath.Join(dir, "small.img")
	f, _ := os.Create(small)
	testenv.FillMixed(t, rng, f, 4<<20)
	f.Close()
	testenv.MustStasis(t, "snapshot", "-r", repo, "--source", small, "--volume", "s", "--name", "ok")
	big := filepath.Join(dir, "big.img")
	f, _ = os.Create(big)
	buf := make([]byte, 1<<20)
	for i := 0; i < 96; i++ { // incompressible, twice the filesystem
		rng.Read(buf)
		f.Write(buf)
	}
	f.Close()
	before, listBefore := testenv.TreeDigest(t, repo), listTree(repo)
	r := testenv.Stasis(t, "snapshot", "-r", repo, "--source", big, "--volume", "b")
	if r.Code == 0 || !strings.Contains(r.Stderr, "no space left on device") || !strings.Contains(r.Stderr, "nothing was committed") {
		t.Fatalf("snapshot onto a full filesystem: exit %d: %s", r.Code, r.Stderr)
	}
	if testenv.TreeDigest(t, repo) != before {
		t.Fatalf("the failed snapshot changed the repository:\nbefore:\n%s\nafter:\n%s\n%s", listBefore, listTree(repo), r.Stderr)
	}
	testenv.MustStasis(t, "verify", "-r", repo, "--read-data")
	testenv.MustStasis(t, "export", "-r", repo, "s/ok", filepath.Join(dir, "ok.img"))
	if testenv.HashFile(t, filepath.Join(dir, "ok.img"), 0) != testenv.HashFile(t, small, 0) {
		t.Fatal("the committed snapshot no longer exports bit-exact")
	}
}

// listTree lists a tree's paths with their modes and sizes, for messages.
func listTree(dir string) string {
	var b strings.Builder
	filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err == nil {
			rel, _ := filepath.Rel(dir, p)
			fmt.Fprintf(&b, "%s %v %d\n", rel, info.Mode(), info.Size())
		}
		return nil
	})
	return b.String()
}

package e2e

import (
	"encoding/json"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stasis-project/stasis/test/testenv"
)

// markerImage writes an image file whose chunks carry marker in plain text.
func markerImage(t *testing.T, path, marker string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	testenv.FillMixed(t, rand.New(rand.NewSource(11)), f, size)
	for off := int64(0); off < size; off += 64 << 10 {
		f.WriteAt([]byte(marker), off+123)
	}
}

// grepRepo returns the files under dir that contain s.
func grepRepo(dir, s string) string {
	out, _ := exec.Command("grep", "-rlF", "--", s, dir).Output()
	return strings.TrimSpace(string(out))
}

// TestEncryptedRepository drives an encrypted local repository as an operator would:
// init says what it made; snapshots, list, export and the FUSE view work with the
// passphrase file; no plaintext marker, volume or snapshot name is in the repository's
// files; a wrong or missing passphrase is one clear line and exit 12; keys can be added,
// changed and removed with every snapshot staying readable; the last key cannot go.
func TestEncryptedRepository(t *testing.T) {
	dir := t.TempDir()
	repo := filepath.Join(dir, "repo")
	pw := passwordFile(t, "first passphrase")
	env := []string{"STASIS_TEST_KDF_TARGET=1ms", "STASIS_CACHE_DIR=" + t.TempDir()}
	run := func(pwFile string, args ...string) testenv.Result {
		e := env
		if pwFile != "" {
			e = append(append([]string(nil), env...), "STASIS_PASSWORD_FILE="+pwFile)
		}
		return testenv.StasisEnv(t, e, args...)
	}
	must := func(pwFile string, args ...string) string {
		t.Helper()
		r := run(pwFile, args...)
		if r.Code != 0 {
			t.Fatalf("stasis %s: exit %d\n%s%s", strings.Join(args, " "), r.Code, r.Stdout, r.Stderr)
		}
		return r.Stdout
	}
	if out := must(pw, "init", "--encryption", "-r", repo); !strings.Contains(out, "encrypted (aes-256-gcm)") {
		t.Fatalf("init says: %s", out)
	}
	marker := "PLAINTEXT-MARKER-7f3a9c"
	src := filepath.Join(dir, "disk.img")
	markerImage(t, src, marker, 8<<20)
	want := testenv.HashFile(t, src, 0)
	must(pw, "snapshot", "-r", repo, "--source", src, "--volume", "secretvolume", "--name", "secretname")
	for _, s := range []string{marker, "secretvolume", "secretname", src} {
		if files := grepRepo(repo, s); files != "" {
			t.Fatalf("%q is readable in the repository's files:\n%s", s, files)
		}
	}
	if grepRepo(src, marker) == "" {
		t.Fatal("the marker is not in the source: the grep proves nothing")
	}
	out := filepath.Join(dir, "export.img")
	must(pw, "export", "-r", repo, "secretvolume/secretname", out)
	if testenv.HashFile(t, out, 0) != want {
		t.Fatal("the encrypted snapshot does not export bit for bit")
	}
	os.Remove(out)

	// Wrong and missing passphrases: one line, exit 12, nothing from deep inside.
	wrong := passwordFile(t, "not it")
	for what, r := range map[string]testenv.Result{
		"wrong":   run(wrong, "list", "-r", repo),
		"missing": run("", "list", "-r", repo),
	} {
		lines := strings.Split(strings.TrimSpace(r.Stderr), "\n")
		if r.Code != 12 || len(lines) != 1 || !strings.Contains(r.Stderr, "passphrase") {
			t.Fatalf("%s passphrase: exit %d, stderr:\n%s", what, r.Code, r.Stderr)
		}
	}
	// A passphrase file others can read is refused, naming the fix.
	loose := filepath.Join(dir, "loose")
	os.WriteFile(loose, []byte("first passphrase\n"), 0o644)
	if r := run(loose, "list", "-r", repo); r.Code != 12 || !strings.Contains(r.Stderr, "chmod 600") {
		t.Fatalf("a world-readable passphrase file: exit %d: %s", r.Code, r.Stderr)
	}

	// The FUSE view of the encrypted repository.
	mnt := filepath.Join(dir, "view")
	serveMount(t, repo, mnt, "secretvolume/secretname.img", "--password-file", pw)
	if testenv.HashFile(t, filepath.Join(mnt, "secretvolume", "secretname.img"), 0) != want {
		t.Fatal("the view of the encrypted snapshot differs from the source")
	}
	exec.Command("fusermount3", "-u", mnt).Run()

	// Keys: add a second, change it, remove the first; the last cannot go.
	type key struct {
		ID      string `json:"id"`
		Current bool   `json:"current"`
	}
	keys := func(pwFile string) []key {
		var ks []key
		if err := json.Unmarshal([]byte(must(pwFile, "key", "list", "-r", repo, "--json")), &ks); err != nil {
			t.Fatal(err)
		}
		return ks
	}
	second := passwordFile(t, "second passphrase")
	must(pw, "key", "add", "-r", repo, "--new-password-file", second)
	if ks := keys(second); len(ks) != 2 {
		t.Fatalf("after key add: %+v", ks)
	}
	third := passwordFile(t, "third passphrase")
	must(second, "key", "passwd", "-r", repo, "--new-password-file", third)
	if r := run(second, "list", "-r", repo); r.Code != 12 {
		t.Fatalf("the changed passphrase still opens the repository: exit %d", r.Code)
	}
	var first string
	for _, k := range keys(pw) {
		if k.Current {
			first = k.ID
		}
	}
	must(third, "key", "remove", "-r", repo, first[:8])
	if r := run(pw, "list", "-r", repo); r.Code != 12 {
		t.Fatalf("a removed key still opens the repository: exit %d", r.Code)
	}
	ks := keys(third)
	if len(ks) != 1 {
		t.Fatalf("keys left: %+v", ks)
	}
	if r := run(third, "key", "remove", "-r", repo, ks[0].ID[:8]); r.Code == 0 || !strings.Contains(r.Stderr, "only key") {
		t.Fatalf("removing the last key: exit %d: %s", r.Code, r.Stderr)
	}
	must(third, "export", "-r", repo, "secretvolume/secretname", out)
	if testenv.HashFile(t, out, 0) != want {
		t.Fatal("after key changes the snapshot does not export bit for bit")
	}
	must(third, "verify", "--read-data", "-r", repo)
}

// TestAgentCreatesEncrypted: with password_file set, the agent creates its repository
// encrypted; the CLI then reads it with the configuration's passphrase; doctor checks the
// passphrase file and tells a wrong one apart.
func TestAgentCreatesEncrypted(t *testing.T) {
	pw := passwordFile(t, "agent passphrase")
	src := filepath.Join(t.TempDir(), "disk.img")
	markerImage(t, src, "AGENT-MARKER-42", 4<<20)
	a := startAgent(t, fmt.Sprintf("password_file: %s\nvolumes:\n  - {name: data, source: %s, schedules: []}\n", pw, src), "STASIS_TEST_KDF_TARGET=1ms")
	a.snapshot(t, "data", "one")
	b, err := os.ReadFile(filepath.Join(a.repo, "config"))
	if err != nil || !strings.Contains(string(b), `"encryption"`) {
		t.Fatalf("the agent's repository is not encrypted: %s", b)
	}
	if grepRepo(a.repo, "AGENT-MARKER-42") != "" {
		t.Fatal("the marker is readable in the agent's repository")
	}
	snaps := listJSON(t, "--config", a.cfg)
	if len(snaps) != 1 || snaps[0]["name"] != "one" {
		t.Fatalf("list through the configuration: %v", snaps)
	}
	fs, _ := doctor(t, a.cfg)
	expectFinding(t, fs, "secrets", "ok", "is root's and private")
	expectFinding(t, fs, "repository", "ok", "encrypted")
	os.WriteFile(pw, []byte("something else\n"), 0o600)
	fs, code := doctor(t, a.cfg)
	expectFinding(t, fs, "repository", "error", "does not open")
	if code != 3 {
		t.Fatalf("doctor with a wrong passphrase: exit %d", code)
	}
	os.Chmod(pw, 0o644)
	fs, _ = doctor(t, a.cfg)
	expectFinding(t, fs, "secrets", "error", "readable by others")
}

package e2e

import (
	"bytes"
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

// TestKill9AnyMoment kills snapshot, delete and gc with SIGKILL at random moments. After
// every kill the repository must verify with --read-data, and every committed snapshot must
// export bit-exact.
func TestKill9AnyMoment(t *testing.T) {
	rounds := 50
	if testing.Short() {
		rounds = 10
	}
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	seed := rng.Int63()
	rng = rand.New(rand.NewSource(seed))
	t.Logf("seed %d", seed)
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	const size = 40 << 20
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	testenv.FillMixed(t, rng, f, size)
	repo := newRepo(t)
	// How long each operation takes here, so kills land at every stage on fast and slow
	// machines alike. Every fifth round runs to completion and refreshes the estimate (CI
	// machines slow down and speed up under load); the others are killed at a moment drawn
	// from 0 to 1.2 times the estimate.
	took := map[string]time.Duration{}
	for _, args := range [][]string{
		{"snapshot", "-r", repo, "--source", src, "--volume", "v", "--name", "base"},
		{"gc", "-r", repo},
	} {
		start := time.Now()
		testenv.MustStasis(t, args...)
		took[args[0]] = time.Since(start)
	}
	took["delete"] = took["gc"]
	want := map[string]string{"base": testenv.HashFile(t, src, 0)} // snapshot name → source hash when attempted
	killed, completed := 0, 0
	for round := 0; round < rounds; round++ {
		var args []string
		snaps := list(t, repo)
		switch op := rng.Intn(10); {
		case op < 6 || len(snaps) == 0:
			testenv.Scribble(t, rng, f, size, 1+rng.Intn(200))
			if rng.Intn(4) == 0 { // sometimes lots of new data, so packs get saved mid-snapshot
				buf := make([]byte, 8<<20)
				rng.Read(buf)
				f.WriteAt(buf, rng.Int63n(size-int64(len(buf))))
			}
			name := fmt.Sprintf("r%d", round)
			want[name] = testenv.HashFile(t, src, 0)
			args = []string{"snapshot", "-r", repo, "--source", src, "--volume", "v", "--name", name}
		case op < 8:
			args = []string{"delete", "-r", repo, "v/" + snaps[rng.Intn(len(snaps))].Name}
		default:
			args = []string{"gc", "-r", repo}
		}
		cmd := exec.Command(testenv.Binary(t), args...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		kill := time.After(time.Duration(rng.Int63n(int64(took[args[0]])*6/5 + 1)))
		if round%5 == 4 {
			kill = nil // runs to completion
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("round %d: %v failed on its own: %v\n%s", round, args, err, stderr.String())
			}
			completed++
			if kill == nil {
				took[args[0]] = time.Since(start)
			}
		case <-kill:
			cmd.Process.Signal(syscall.SIGKILL)
			<-done
			killed++
		}
		if r := testenv.Stasis(t, "verify", "-r", repo, "--read-data"); r.Code != 0 {
			t.Fatalf("round %d: after killing %v: verify failed:\n%s%s", round, args, r.Stdout, r.Stderr)
		}
		if round%10 == 9 || round == rounds-1 {
			for _, s := range list(t, repo) {
				if got := exportHash(t, repo, "v/"+s.Name); got != want[s.Name] {
					t.Fatalf("round %d: committed snapshot %s does not export bit-exact", round, s.Name)
				}
			}
		}
		// Keep the repository small so the test stays fast.
		if snaps := list(t, repo); len(snaps) > 6 {
			testenv.MustStasis(t, "delete", "-r", repo, "v/"+snaps[0].Name)
		}
	}
	t.Logf("%d of %d operations killed mid-way, %d completed", killed, rounds, completed)
	if killed < rounds/4 {
		t.Fatalf("the kill timing is off: %d killed, %d completed of %d", killed, completed, rounds)
	}
	// The kernel released every lock; the repository is writable and collectable.
	testenv.MustStasis(t, "gc", "-r", repo)
	testenv.MustStasis(t, "verify", "-r", repo, "--read-data")
	if entries, _ := os.ReadDir(filepath.Join(repo, "tmp")); len(entries) != 0 {
		t.Errorf("temporary files left after a clean gc: %d", len(entries))
	}
}

// TestCorruptPack flips bytes in a pack: verify names the damaged snapshot (and only it),
// export and restore of it fail loudly and leave no wrong data behind.
func TestCorruptPack(t *testing.T) {
	rng := rand.New(rand.NewSource(9))
	dir := t.TempDir()
	repo := newRepo(t)
	packsBefore := map[string]bool{}
	for _, vol := range []string{"good", "bad"} {
		src := filepath.Join(dir, vol+".img")
		f, _ := os.Create(src)
		testenv.FillMixed(t, rng, f, 8<<20)
		f.Close()
		for _, p := range packFiles(t, repo) {
			packsBefore[p] = true
		}
		testenv.MustStasis(t, "snapshot", "-r", repo, "--source", src, "--volume", vol, "--name", "s")
	}
	var badPack string
	for _, p := range packFiles(t, repo) {
		if !packsBefore[p] {
			badPack = p
		}
	}
	pf, err := os.OpenFile(badPack, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	st, _ := pf.Stat()
	for _, off := range []int64{100, st.Size() / 2} {
		b := make([]byte, 1)
		pf.ReadAt(b, off)
		b[0] ^= 0x5a
		pf.WriteAt(b, off)
	}
	pf.Close()

	r := testenv.Stasis(t, "verify", "-r", repo, "--read-data")
	if r.Code != 3 || !strings.Contains(r.Stdout, "snapshot bad/s") || strings.Contains(r.Stdout, "snapshot good/s") {
		t.Fatalf("verify --read-data: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
	out := filepath.Join(dir, "export.img")
	r = testenv.Stasis(t, "export", "-r", repo, "bad/s", out)
	if r.Code == 0 || !strings.Contains(r.Stderr, "corrupt") {
		t.Fatalf("export of a damaged snapshot: exit %d: %s", r.Code, r.Stderr)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 2 {
		t.Fatalf("export left files behind: %v", entries)
	}
	target := filepath.Join(dir, "good.img") // an existing file: restore must not write wrong bytes into it
	before := testenv.HashFile(t, target, 0)
	r = testenv.Stasis(t, "restore", "-r", repo, "bad/s", "--to", filepath.Join(dir, "new.img"))
	if r.Code == 0 || !strings.Contains(r.Stderr, "corrupt") {
		t.Fatalf("restore of a damaged snapshot: exit %d: %s", r.Code, r.Stderr)
	}
	if _, err := os.Stat(filepath.Join(dir, "new.img")); err == nil {
		t.Fatal("a failed restore to a new file left the file behind")
	}
	if testenv.HashFile(t, target, 0) != before {
		t.Fatal("an unrelated file changed")
	}
	testenv.MustStasis(t, "export", "-r", repo, "good/s", out)
	if testenv.HashFile(t, out, 0) != before {
		t.Fatal("the intact snapshot does not export bit-exact")
	}

	// The way out: damage does not spread into the next snapshot, which stores the damaged
	// chunks again from the source and so heals the older snapshot; repair rewrites the
	// damaged pack; gc removes it; everything verifies and exports exactly.
	badSrc := filepath.Join(dir, "bad.img")
	want := testenv.HashFile(t, badSrc, 0)
	testenv.MustStasis(t, "snapshot", "-r", repo, "--source", badSrc, "--volume", "bad", "--name", "again")
	for _, ref := range []string{"bad/again", "bad/s"} {
		if got := exportHash(t, repo, ref); got != want {
			t.Fatalf("%s does not export the source after the source was snapshotted again", ref)
		}
	}
	r = testenv.Stasis(t, "repair", "-r", repo, "--json")
	var rep struct {
		PacksRewritten int             `json:"packs_rewritten"`
		Unrecoverable  []string        `json:"unrecoverable"`
		Damaged        map[string]bool `json:"damaged_snapshots"`
	}
	if r.Code != 0 || json.Unmarshal([]byte(r.Stdout), &rep) != nil || rep.PacksRewritten != 1 || len(rep.Damaged) != 0 {
		t.Fatalf("repair: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
	testenv.MustStasis(t, "gc", "-r", repo)
	testenv.MustStasis(t, "gc", "-r", repo)
	if _, err := os.Stat(badPack); err == nil {
		t.Fatal("the damaged pack is still there after repair and gc")
	}
	testenv.MustStasis(t, "verify", "-r", repo, "--read-data")
	for _, ref := range []string{"bad/again", "bad/s"} {
		if got := exportHash(t, repo, ref); got != want {
			t.Fatalf("%s does not export exactly after repair and gc", ref)
		}
	}
	if exportHash(t, repo, "good/s") != before {
		t.Fatal("good/s changed")
	}
}

func packFiles(t *testing.T, repo string) []string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(repo, "packs", "*", "*"))
	return m
}

// TestTrackedSnapshotAfterDamage: once verify has found damaged chunks, the agent's next
// snapshot of a tracked volume reads it whole instead of keeping its parent's unchanged
// chunks (which would keep the damaged ones), says why, and stores the damaged chunks
// again, healing the older snapshots: repair then finds no damaged snapshot, and the
// snapshot after that is tracked again.
func TestTrackedSnapshotAfterDamage(t *testing.T) {
	dev, _ := testenv.LoopDevice(t, 128<<20)
	testenv.Mkfs(t, "ext4", dev)
	mnt := testenv.Mount(t, dev)
	rng := rand.New(rand.NewSource(21))
	f, err := os.Create(filepath.Join(mnt, "data"))
	if err != nil {
		t.Fatal(err)
	}
	testenv.FillMixed(t, rng, f, 16<<20)
	f.Close()
	a := startAgent(t, fmt.Sprintf("volumes:\n  - name: v\n    source: %s\n    schedules: []\n", mnt))
	a.snapshot(t, "v", "s0")
	touch := func(name string) {
		if err := os.WriteFile(filepath.Join(mnt, name), []byte(name), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	touch("one")
	if s := a.snapshot(t, "v", "s1")[0]; s.Capture["tracking"] != "tracked" {
		t.Fatalf("s1 is not tracked: %v", s.Capture)
	}
	// Damage the biggest pack: s0's, with most of data's chunks, which no later change touches.
	var biggest string
	var size int64
	for _, p := range packFiles(t, a.repo) {
		if st, err := os.Stat(p); err == nil && st.Size() > size {
			biggest, size = p, st.Size()
		}
	}
	pf, err := os.OpenFile(biggest, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for off := int64(4096); off < size; off += size / 8 {
		b := make([]byte, 1)
		pf.ReadAt(b, off)
		b[0] ^= 0x5a
		pf.WriteAt(b, off)
	}
	pf.Close()
	if r := testenv.Stasis(t, "verify", "-r", a.repo, "--read-data"); r.Code != 3 {
		t.Fatalf("verify --read-data of a damaged pack: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}

	touch("two")
	s := a.snapshot(t, "v", "s2")[0]
	if s.Capture["tracking"] == "tracked" || !strings.Contains(fmt.Sprint(s.Capture["full_scan"]), "damaged") {
		t.Fatalf("the snapshot after damage was found kept its parent's chunks: %v", s.Capture)
	}
	// s2 stored the damaged chunks again: it is intact, and so is every older snapshot
	// except for chunks the volume no longer holds (a metadata block rewritten since).
	r := testenv.Stasis(t, "repair", "-r", a.repo, "--json")
	var rep struct {
		Damaged map[string]bool `json:"damaged_snapshots"`
	}
	if r.Code != 0 || json.Unmarshal([]byte(r.Stdout), &rep) != nil || rep.Damaged[s.ID] {
		t.Fatalf("repair after the healing snapshot %s: exit %d\n%s%s", s.ID, r.Code, r.Stdout, r.Stderr)
	}
	testenv.MustStasis(t, "gc", "-r", a.repo)
	testenv.MustStasis(t, "gc", "-r", a.repo) // the rewritten pack goes once its deletion list is swept
	if r := testenv.Stasis(t, "verify", "-r", a.repo, "--read-data"); strings.Contains(r.Stdout, "v/s2") {
		t.Fatalf("verify after repair names the healing snapshot:\n%s", r.Stdout)
	}
	touch("three")
	if s := a.snapshot(t, "v", "s3")[0]; s.Capture["tracking"] != "tracked" {
		t.Fatalf("tracking did not resume after repair: %v", s.Capture)
	}
}

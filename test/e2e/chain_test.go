// Package e2e drives the real stasis binary against real files, loop devices and
// filesystems, as a user would.
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
	"testing"
	"time"

	"github.com/stasis-project/stasis/test/testenv"
)

type listed struct {
	ID          string  `json:"id"`
	Host        string  `json:"host"`
	Volume      string  `json:"volume"`
	Name        string  `json:"name"`
	Created     string  `json:"created"`
	Kind        string  `json:"kind"`
	Consistency string  `json:"consistency"`
	SizeBytes   int64   `json:"size_bytes"`
	NewBytes    int64   `json:"new_bytes"`
	Parent      *string `json:"parent"`
	Group       string  `json:"group"`
	GroupID     string  `json:"group_id"`
}

func list(t *testing.T, repo string) []listed {
	t.Helper()
	var out []listed
	if err := json.Unmarshal([]byte(testenv.MustStasis(t, "list", "-r", repo, "--json")), &out); err != nil {
		t.Fatal(err)
	}
	return out
}

func newRepo(t *testing.T) string {
	t.Helper()
	repo := filepath.Join(t.TempDir(), "repo")
	testenv.MustStasis(t, "init", "-r", repo)
	return repo
}

// exportHash exports a snapshot and returns the image's hash.
func exportHash(t *testing.T, repo, ref string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "export.img")
	testenv.MustStasis(t, "export", "-r", repo, ref, out)
	defer os.Remove(out)
	return testenv.HashFile(t, out, 0)
}

// TestBitExactAcrossDeletes: every snapshot of a randomly changing source exports exactly
// the source as it was, also after deleting the first, a middle and the last snapshot.
func TestBitExactAcrossDeletes(t *testing.T) {
	for _, kind := range []string{"file", "device"} {
		t.Run(kind, func(t *testing.T) {
			rng := rand.New(rand.NewSource(42))
			const size = 48<<20 + 4096*3 // not a multiple of the chunk size
			var src string
			if kind == "device" {
				src, _ = testenv.LoopDevice(t, size)
			} else {
				src = filepath.Join(t.TempDir(), "src.img")
			}
			f, err := os.OpenFile(src, os.O_RDWR|os.O_CREATE, 0o600)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			testenv.FillMixed(t, rng, f, size)
			repo := newRepo(t)
			want := map[string]string{}
			for i := 0; i < 6; i++ {
				if i > 0 {
					testenv.Scribble(t, rng, f, size, 30)
				}
				f.Sync()
				name := "s" + string(rune('0'+i))
				testenv.MustStasis(t, "snapshot", "-r", repo, "--source", src, "--volume", "vol", "--name", name)
				want[name] = testenv.HashFile(t, src, 0)
			}
			snaps := list(t, repo)
			if len(snaps) != 6 || snaps[0].Parent != nil || snaps[1].Parent == nil || *snaps[1].Parent != snaps[0].ID {
				t.Fatalf("chain shape wrong: %+v", snaps)
			}
			for _, s := range snaps {
				if s.Kind != "manual" || s.Consistency != "crash" || s.SizeBytes != size {
					t.Fatalf("listed fields: %+v", s)
				}
				if s.Name != "s0" && s.NewBytes > 2<<20 {
					t.Errorf("%s added %d bytes for 30 small writes", s.Name, s.NewBytes)
				}
			}
			check := func(when string) {
				for _, s := range list(t, repo) {
					if got := exportHash(t, repo, "vol/"+s.Name); got != want[s.Name] {
						t.Fatalf("%s: export of %s differs from the source as it was", when, s.Name)
					}
				}
				testenv.MustStasis(t, "verify", "-r", repo, "--read-data")
			}
			check("before deletes")
			for _, victim := range []string{"s0", "s3", "s5"} { // first, middle, last
				testenv.MustStasis(t, "delete", "-r", repo, "vol/"+victim)
				testenv.MustStasis(t, "gc", "-r", repo)
				delete(want, victim)
				check("after deleting " + victim)
			}
			if n := len(list(t, repo)); n != 3 {
				t.Fatalf("%d snapshots left, want 3", n)
			}
		})
	}
}

// TestRestoreWritesOnlyDifferingChunks rolls a device back and counts the chunks written.
func TestRestoreWritesOnlyDifferingChunks(t *testing.T) {
	rng := rand.New(rand.NewSource(7))
	const size = 32 << 20
	dev, _ := testenv.LoopDevice(t, size)
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	testenv.FillMixed(t, rng, f, size)
	f.Sync()
	repo := newRepo(t)
	testenv.MustStasis(t, "snapshot", "-r", repo, "--source", dev, "--volume", "d", "--name", "good")
	good := testenv.HashFile(t, dev, 0)
	// Change 5 distinct 64 KiB chunks.
	for _, chunk := range []int64{3, 50, 51, 200, 511} {
		buf := make([]byte, 100)
		rng.Read(buf)
		f.WriteAt(buf, chunk*65536+1000)
	}
	f.Sync()
	var res struct {
		Chunks        int64 `json:"chunks"`
		ChunksWritten int64 `json:"chunks_written"`
	}
	out := testenv.MustStasis(t, "restore", "-r", repo, "d/good", "--to", dev, "--json")
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatal(err)
	}
	if res.ChunksWritten != 5 || res.Chunks != size/65536 {
		t.Fatalf("restore wrote %d of %d chunks, want 5 of %d", res.ChunksWritten, res.Chunks, size/65536)
	}
	if testenv.HashFile(t, dev, 0) != good {
		t.Fatal("device differs from the snapshot after restore")
	}
	// A second restore has nothing to do.
	out = testenv.MustStasis(t, "restore", "-r", repo, "d/good", "--to", dev, "--json")
	json.Unmarshal([]byte(out), &res)
	if res.ChunksWritten != 0 {
		t.Fatalf("restore onto an identical device wrote %d chunks", res.ChunksWritten)
	}
}

// TestRestoreRefusesMountedDevice: rolling back a mounted filesystem would corrupt it.
func TestRestoreRefusesMountedDevice(t *testing.T) {
	dev, _ := testenv.LoopDevice(t, 64<<20)
	testenv.Mkfs(t, "ext4", dev)
	repo := newRepo(t)
	testenv.MustStasis(t, "snapshot", "-r", repo, "--source", dev, "--volume", "d", "--name", "a")
	mnt := testenv.Mount(t, dev)
	os.WriteFile(filepath.Join(mnt, "new"), []byte("x"), 0o600)
	r := testenv.Stasis(t, "restore", "-r", repo, "d/a", "--to", dev)
	if r.Code == 0 || !strings.Contains(r.Stderr, "mounted or held open") {
		t.Fatalf("restore onto a mounted device: exit %d, %s", r.Code, r.Stderr)
	}
}

// TestRestoreOntoFile covers both a new file (created like export) and an existing one.
func TestRestoreOntoFile(t *testing.T) {
	rng := rand.New(rand.NewSource(8))
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	f, _ := os.Create(src)
	defer f.Close()
	testenv.FillMixed(t, rng, f, 8<<20)
	repo := newRepo(t)
	testenv.MustStasis(t, "snapshot", "-r", repo, "--source", src, "--volume", "f", "--name", "a")
	want := testenv.HashFile(t, src, 0)
	target := filepath.Join(dir, "new.img")
	testenv.MustStasis(t, "restore", "-r", repo, "f/a", "--to", target)
	if testenv.HashFile(t, target, 0) != want {
		t.Fatal("restore to a new file differs")
	}
	testenv.Scribble(t, rng, f, 8<<20, 3)
	// Open for writing by a program (this test): refused, naming it.
	if r := testenv.Stasis(t, "restore", "-r", repo, "f/a", "--to", src); r.Code == 0 || !strings.Contains(r.Stderr, "is open for writing by process") {
		t.Fatalf("restore onto a file open for writing: exit %d, %s", r.Code, r.Stderr)
	}
	f.Close()
	testenv.MustStasis(t, "restore", "-r", repo, "f/a", "--to", src)
	if testenv.HashFile(t, src, 0) != want {
		t.Fatal("restore onto the changed file differs")
	}
	// The backing file of an attached loop device (a filesystem may be mounted from it):
	// refused, naming the device, and left as it was.
	loop := strings.TrimSpace(testenv.Run(t, "losetup", "-f", "--show", src))
	defer exec.Command("losetup", "-d", loop).Run()
	r := testenv.Stasis(t, "restore", "-r", repo, "f/a", "--to", src)
	if r.Code == 0 || !strings.Contains(r.Stderr, "backs the loop device "+loop) {
		t.Fatalf("restore onto a loop device's backing file: exit %d, %s", r.Code, r.Stderr)
	}
}

// TestPruneFlags: retention from the command line, without a configuration, as restic
// forget does: a dry run changes nothing, the real run keeps what the rules say (and what
// is protected), and the space comes back.
func TestPruneFlags(t *testing.T) {
	repo := newRepo(t)
	src := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(8))
	testenv.FillMixed(t, rng, f, 2<<20)
	for i := 0; i < 5; i++ {
		testenv.Scribble(t, rng, f, 2<<20, 50)
		testenv.MustStasis(t, "snapshot", "-r", repo, "--source", src, "--volume", "v", "--name", fmt.Sprint("s", i))
	}
	f.Close()
	if r := testenv.Stasis(t, "prune", "-r", repo, "--keep-last", "2"); r.Code != 0 {
		t.Fatalf("prune: %s", r.Stderr)
	}
	if n := len(list(t, repo)); n != 5 {
		t.Fatalf("manual snapshots were pruned without --include-manual: %d left", n)
	}
	out := testenv.MustStasis(t, "prune", "-r", repo, "--volume", "v", "--keep-last", "2", "--include-manual", "--dry-run", "--json")
	var ds []struct {
		Name string `json:"name"`
		Keep bool   `json:"keep"`
	}
	if err := json.Unmarshal([]byte(out), &ds); err != nil || len(ds) != 5 {
		t.Fatalf("dry run: %v %s", err, out)
	}
	if len(list(t, repo)) != 5 {
		t.Fatal("a dry run deleted snapshots")
	}
	testenv.MustStasis(t, "protect", "-r", repo, "v/s0")
	testenv.MustStasis(t, "prune", "-r", repo, "--volume", "v", "--keep-last", "2", "--include-manual")
	if r := testenv.Stasis(t, "delete", "-r", repo, "v/s0"); r.Code == 0 || !strings.Contains(r.Stderr, "unprotect") {
		t.Fatalf("delete of a protected snapshot: exit %d: %s", r.Code, r.Stderr)
	}
	testenv.MustStasis(t, "unprotect", "-r", repo, "v/s0")
	testenv.MustStasis(t, "delete", "-r", repo, "v/s0")
	var names []string
	for _, s := range list(t, repo) {
		names = append(names, s.Name)
	}
	if strings.Join(names, ",") != "s3,s4" {
		t.Fatalf("after prune --keep-last 2: %v", names)
	}
	if r := testenv.Stasis(t, "prune", "-r", repo, "--volume", "nope", "--keep-last", "1"); r.Code == 0 || !strings.Contains(r.Stderr, "no snapshots of volume") {
		t.Fatalf("prune of an unknown volume: exit %d: %s", r.Code, r.Stderr)
	}
	testenv.MustStasis(t, "verify", "--read-data", "-r", repo)
	// Shell completion offers the repository's snapshots.
	if out := testenv.MustStasis(t, "__complete", "export", "-r", repo, "v/"); !strings.Contains(out, "v/s3\nv/s4\n") {
		t.Fatalf("completion of export: %q", out)
	}
}

// TestDeleteRefusesRunningParent: while a snapshot is being taken (held in its freeze
// window), deleting the snapshot it builds on is refused with the reason, and deletes
// nothing; once it has finished the delete works, gc runs, and the new snapshot is exact.
// Before, the parent's manifest went, and a gc while the new one ran could delete chunks it
// had taken from its parent without storing them.
func TestDeleteRefusesRunningParent(t *testing.T) {
	dev, _ := testenv.LoopDevice(t, 128<<20)
	testenv.Mkfs(t, "ext4", dev)
	mnt := testenv.Mount(t, dev)
	rng := rand.New(rand.NewSource(12))
	f, err := os.Create(filepath.Join(mnt, "data"))
	if err != nil {
		t.Fatal(err)
	}
	testenv.FillMixed(t, rng, f, 8<<20)
	f.Sync()
	repo := newRepo(t)
	testenv.MustStasis(t, "snapshot", "-r", repo, "--source", mnt, "--volume", "v", "--name", "first")
	testenv.Scribble(t, rng, f, 8<<20, 30)
	f.Close()

	frozen := filepath.Join(t.TempDir(), "frozen.img")
	cmd := exec.Command(testenv.Binary(t), "snapshot", "-r", repo, "--source", mnt, "--volume", "v", "--name", "second", "--max-freeze", "30s")
	cmd.Env = append(os.Environ(), "STASIS_TEST_FREEZE_HOOK="+copyDeviceHook(dev, frozen), "STASIS_TEST_HOLD_FREEZE=3s")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var waitErr error
	waited := make(chan struct{})
	go func() { waitErr = cmd.Wait(); close(waited) }()
	// Registered after the mount's: runs before it, so a failed test does not leave the
	// snapshot holding the filesystem (frozen, busy) while the mount and loop device go.
	t.Cleanup(func() { cmd.Process.Kill(); <-waited })
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(frozen); err == nil {
			break // inside the freeze window: the writer is running
		}
		if time.Now().After(deadline) {
			t.Fatalf("the snapshot never reached its freeze window: %s", out.String())
		}
	}
	r := testenv.Stasis(t, "delete", "-r", repo, "v/first")
	if r.Code == 0 || !strings.Contains(r.Stderr, "a snapshot being taken builds on it") || !strings.Contains(r.Stderr, "snapshot of") {
		t.Fatalf("deleting the parent of a running snapshot: exit %d, %s", r.Code, r.Stderr)
	}
	if <-waited; waitErr != nil {
		t.Fatalf("snapshot: %v %s", waitErr, out.String())
	}
	if n := len(list(t, repo)); n != 2 {
		t.Fatalf("%d snapshots after the refused delete, want 2", n)
	}
	testenv.MustStasis(t, "delete", "-r", repo, "v/first")
	testenv.MustStasis(t, "gc", "-r", repo)
	img := filepath.Join(t.TempDir(), "second.img")
	testenv.MustStasis(t, "export", "-r", repo, "v/second", img)
	assertSameAllocated(t, "ext4", frozen, img, "the snapshot taken while its parent's delete was refused")
	testenv.MustStasis(t, "verify", "-r", repo, "--read-data")
}

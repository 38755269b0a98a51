package fsfreeze_test

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stasis-project/stasis/fsfreeze"
	"github.com/stasis-project/stasis/test/testenv"
)

func mounted(t *testing.T) string {
	dev, _ := testenv.LoopDevice(t, 64<<20)
	testenv.Mkfs(t, "ext4", dev)
	return testenv.Mount(t, dev)
}

// TestFreezeThaw: writers block while frozen and proceed after Thaw; the state file exists
// exactly while frozen; the frozen time is reported.
func TestFreezeThaw(t *testing.T) {
	mnt := mounted(t)
	state := t.TempDir()
	fz, err := fsfreeze.Freeze([]string{mnt}, fsfreeze.Options{MaxFreeze: 5 * time.Second, StateDir: state})
	if err != nil {
		t.Fatal(err)
	}
	if files, _ := filepath.Glob(filepath.Join(state, "frozen-*.json")); len(files) != 1 {
		t.Fatalf("state files while frozen: %v", files)
	}
	if testenv.WritableWithin(mnt, 300*time.Millisecond) {
		t.Fatal("a write went through while frozen")
	}
	if frozen, err := fsfreeze.IsFrozen(mnt); err != nil || !frozen {
		t.Fatalf("IsFrozen = %v, %v", frozen, err)
	}
	d, err := fz.Thaw()
	if err != nil || d < 300*time.Millisecond {
		t.Fatalf("Thaw = %v, %v", d, err)
	}
	if !testenv.WritableWithin(mnt, 2*time.Second) {
		t.Fatal("still frozen after Thaw")
	}
	if files, _ := filepath.Glob(filepath.Join(state, "frozen-*.json")); len(files) != 0 {
		t.Fatalf("state files left after thaw: %v", files)
	}
}

// TestDeadline: past MaxFreeze the filesystem thaws by itself and Thaw reports ErrTimeout.
func TestDeadline(t *testing.T) {
	mnt := mounted(t)
	fz, err := fsfreeze.Freeze([]string{mnt}, fsfreeze.Options{MaxFreeze: 200 * time.Millisecond, StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if !testenv.WritableWithin(mnt, 2*time.Second) {
		t.Fatal("the deadline did not thaw")
	}
	if _, err := fz.Thaw(); !errors.Is(err, fsfreeze.ErrTimeout) {
		t.Fatalf("Thaw after the deadline: %v, want ErrTimeout", err)
	}
}

// TestOnlyWhatWeFroze: a filesystem someone else froze is refused and left frozen; the same
// superblock twice (a bind mount) is refused before anything is frozen.
func TestOnlyWhatWeFroze(t *testing.T) {
	mnt := mounted(t)
	testenv.Run(t, "fsfreeze", "-f", mnt)
	defer testenv.Run(t, "fsfreeze", "-u", mnt)
	if _, err := fsfreeze.Freeze([]string{mnt}, fsfreeze.Options{MaxFreeze: time.Second, StateDir: t.TempDir()}); !errors.Is(err, fsfreeze.ErrAlreadyFrozen) {
		t.Fatalf("freezing a frozen fs: %v", err)
	}
	if frozen, _ := fsfreeze.IsFrozen(mnt); !frozen {
		t.Fatal("stasis thawed a filesystem it did not freeze")
	}
	testenv.Run(t, "fsfreeze", "-u", mnt)
	bind := testenv.Mount(t, mnt, "--bind")
	if _, err := fsfreeze.Freeze([]string{mnt, bind}, fsfreeze.Options{MaxFreeze: time.Second, StateDir: t.TempDir()}); err == nil {
		t.Fatal("the same superblock twice was accepted")
	}
	if !testenv.WritableWithin(mnt, time.Second) {
		t.Fatal("a refused freeze left the filesystem frozen")
	}
	testenv.Run(t, "fsfreeze", "-f", mnt) // for the deferred -u
}

// TestThawAll thaws what a state file names, as after the freezer and its guard died.
func TestThawAll(t *testing.T) {
	mnt := mounted(t)
	state := t.TempDir()
	testenv.Run(t, "fsfreeze", "-f", mnt)
	os.WriteFile(filepath.Join(state, "frozen-999999.json"), []byte(`{"pid":999999,"mounts":["`+mnt+`"]}`), 0o600)
	thawed, err := fsfreeze.ThawAll(state)
	if err != nil || len(thawed) != 1 || thawed[0] != mnt {
		t.Fatalf("ThawAll = %v, %v", thawed, err)
	}
	if !testenv.WritableWithin(mnt, time.Second) {
		t.Fatal("still frozen after ThawAll")
	}
	if files, _ := filepath.Glob(filepath.Join(state, "*")); len(files) != 0 {
		t.Fatalf("state files left: %v", files)
	}
}

package fusemount

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/local"
	"github.com/stasis-project/stasis/chain/memory"
	"github.com/stasis-project/stasis/test/testenv"
)

// TestInterruptedLookupFindsNewSnapshot: a signal to a process in a lookup makes the kernel
// send FUSE an INTERRUPT, which cancels the request's context. Go programs get such signals
// all the time (the runtime preempts goroutines with SIGURG), so a listing refresh that
// gave up on the cancellation answered "no such file" for a snapshot committed after the
// mount's previous listing: `stat v/b.img` failed though b existed. Every snapshot
// committed before the lookup must be found, however its request is interrupted.
func TestInterruptedLookupFindsNewSnapshot(t *testing.T) {
	testenv.RequireRoot(t)
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	dir := t.TempDir()
	be, err := local.Create(filepath.Join(dir, "repo"))
	if err != nil {
		t.Fatal(err)
	}
	repo := openRepo(t, be)
	commit := func(name string) { commitSnapshot(t, repo, name) }
	commit("s0")
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	m, err := Mount(repo.Reader, "", mnt, Options{Log: slog.New(slog.NewTextHandler(io.Discard, nil)), listEvery: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Unmount()
	if _, err := os.Stat(filepath.Join(mnt, "v", "s0.img")); err != nil {
		t.Fatal(err)
	}

	// The thread that looks up, and a goroutine that keeps signalling it.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	tid := unix.Gettid()
	var stop, sent atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for stop.Load() == 0 {
			unix.Tgkill(os.Getpid(), tid, unix.SIGURG) // what the runtime sends to preempt
			sent.Add(1)
			time.Sleep(5 * time.Microsecond)
		}
	}()
	defer func() { stop.Store(1); <-done }()

	for i := 1; i <= 30; i++ {
		name := fmt.Sprintf("s%d", i)
		commit(name)
		time.Sleep(60 * time.Millisecond) // the mount's listing is stale now
		var st unix.Stat_t
		var err error
		for {
			if err = unix.Stat(filepath.Join(mnt, "v", name+".img"), &st); !errors.Is(err, syscall.EINTR) {
				break
			}
		}
		if err != nil {
			t.Fatalf("snapshot %s, committed before the lookup, not found under signals: %v", name, err)
		}
	}
	if sent.Load() < 100 {
		t.Fatalf("only %d signals sent: the test did not interrupt lookups", sent.Load())
	}
}

// openRepo initialises a repository on be and opens it until the test ends.
func openRepo(t *testing.T, be chain.Backend) *chain.Repository {
	t.Helper()
	ctx := context.Background()
	if _, err := chain.Init(ctx, be, chain.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	repo, err := chain.Open(ctx, be, chain.Options{CacheDir: t.TempDir(), Host: "h"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { repo.Close() })
	return repo
}

// commitSnapshot commits a one-chunk snapshot v/name whose content starts with its name.
func commitSnapshot(t *testing.T, repo *chain.Repository, name string) {
	t.Helper()
	ctx := context.Background()
	w, err := repo.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "v", Name: name, Size: 64 << 10, ChunkSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 64<<10)
	copy(data, name)
	if err := w.Put(ctx, 0, data); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Commit(ctx, nil, nil); err != nil {
		t.Fatal(err)
	}
}

// unreachable is a backend whose listings fail while down is set, counting them.
type unreachable struct {
	chain.Backend
	down  atomic.Bool
	lists atomic.Int64
}

func (u *unreachable) List(ctx context.Context, t chain.FileType, fn func(chain.FileInfo) error) error {
	if t == chain.SnapshotFile {
		u.lists.Add(1)
	}
	if u.down.Load() {
		return errors.New("connection refused")
	}
	return u.Backend.List(ctx, t, fn)
}

// TestListWhileStorageUnreachable: while the repository cannot be listed, the mount keeps
// the last list, with the error (so lookups answer EIO for names not on it), and tries the
// storage again only every listRetry, not on every lookup (each of which would wait out
// the storage's timeouts). Once the storage answers, new snapshots show.
func TestListWhileStorageUnreachable(t *testing.T) {
	ctx := context.Background()
	be := &unreachable{Backend: memory.New()}
	repo := openRepo(t, be)
	commit := func(name string) { commitSnapshot(t, repo, name) }
	commit("a")
	v := &view{repo: repo.Reader, opts: Options{Log: slog.New(slog.DiscardHandler), listEvery: time.Nanosecond}}
	vol := &volumeNode{v: v, volume: "v"}
	if snaps, err := vol.snapshots(ctx); err != nil || len(snaps) != 1 {
		t.Fatalf("%d snapshots, %v", len(snaps), err)
	}
	commit("b")
	be.down.Store(true)
	before := be.lists.Load()
	for i := 0; i < 20; i++ {
		snaps, err := vol.snapshots(ctx)
		if err == nil || len(snaps) != 1 || snaps[0].Name != "a" {
			t.Fatalf("storage down: %d snapshots, %v; want the last list and the error", len(snaps), err)
		}
	}
	if n := be.lists.Load() - before; n != 1 {
		t.Fatalf("storage down: %d listings for 20 lookups, want 1 until listRetry passes", n)
	}
	be.down.Store(false)
	v.listMu.Lock()
	v.failed = time.Now().Add(-listRetry) // as if listRetry had passed
	v.listMu.Unlock()
	if snaps, err := vol.snapshots(ctx); err != nil || len(snaps) != 2 {
		t.Fatalf("storage back: %d snapshots, %v", len(snaps), err)
	}
}

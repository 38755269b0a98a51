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
	ctx := context.Background()
	dir := t.TempDir()
	be, err := local.Create(filepath.Join(dir, "repo"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := chain.Init(ctx, be, chain.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	repo, err := chain.Open(ctx, be, chain.Options{CacheDir: filepath.Join(dir, "cache")})
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	commit := func(name string) {
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

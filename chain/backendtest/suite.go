// Package backendtest is the conformance suite every chain.Backend implementation must pass.
package backendtest

import (
	"bytes"
	"context"
	"errors"
	"io"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/stasis-project/stasis/chain"
)

// Suite runs the conformance tests against backends made by newBackend, which must return
// an empty backend each time.
func Suite(t *testing.T, newBackend func(t *testing.T) chain.Backend) {
	ctx := context.Background()
	t.Run("SaveReadAll", func(t *testing.T) {
		b := newBackend(t)
		h := chain.Handle{Type: chain.SnapshotFile, Name: "abc"}
		if _, err := b.ReadAll(ctx, h); !errors.Is(err, chain.ErrNotExist) {
			t.Fatalf("ReadAll of missing file: got %v, want ErrNotExist", err)
		}
		data := []byte("hello, repository")
		if err := b.Save(ctx, h, data); err != nil {
			t.Fatal(err)
		}
		data[0] = 'X' // the backend must have copied
		got, err := b.ReadAll(ctx, h)
		if err != nil || string(got) != "hello, repository" {
			t.Fatalf("ReadAll = %q, %v", got, err)
		}
		if n, err := b.Stat(ctx, h); err != nil || n != int64(len(got)) {
			t.Fatalf("Stat = %d, %v", n, err)
		}
		if err := b.Save(ctx, h, got); err != nil {
			t.Fatalf("saving the same content again must succeed: %v", err)
		}
	})
	t.Run("ReadAt", func(t *testing.T) {
		b := newBackend(t)
		h := chain.Handle{Type: chain.PackFile, Name: "00112233"}
		data := bytes.Repeat([]byte("0123456789"), 1000)
		if err := b.Save(ctx, h, data); err != nil {
			t.Fatal(err)
		}
		p := make([]byte, 10)
		if n, err := b.ReadAt(ctx, h, p, 5); err != nil || n != 10 || string(p) != "5678901234" {
			t.Fatalf("ReadAt = %d %q %v", n, p, err)
		}
		n, err := b.ReadAt(ctx, h, p, int64(len(data)-4))
		if n != 4 || err == nil {
			t.Fatalf("short ReadAt at end = %d, %v; want 4 and an error", n, err)
		}
		if _, err := b.ReadAt(ctx, chain.Handle{Type: chain.PackFile, Name: "ffee"}, p, 0); !errors.Is(err, chain.ErrNotExist) {
			t.Fatalf("ReadAt of missing file: %v", err)
		}
	})
	t.Run("ListRemove", func(t *testing.T) {
		b := newBackend(t)
		for _, name := range []string{"aa01", "bb02", "cc03"} {
			if err := b.Save(ctx, chain.Handle{Type: chain.PackFile, Name: name}, []byte(name)); err != nil {
				t.Fatal(err)
			}
		}
		if err := b.Save(ctx, chain.Handle{Type: chain.IndexFile, Name: "dd04"}, []byte("x")); err != nil {
			t.Fatal(err)
		}
		list := func() []string {
			var names []string
			err := b.List(ctx, chain.PackFile, func(fi chain.FileInfo) error {
				if fi.Size != 4 {
					t.Errorf("%s: size %d", fi.Name, fi.Size)
				}
				if time.Since(fi.ModTime) > time.Hour || time.Until(fi.ModTime) > time.Hour {
					t.Errorf("%s: modification time %v is not the storage's now", fi.Name, fi.ModTime)
				}
				names = append(names, fi.Name)
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			sort.Strings(names)
			return names
		}
		if got := list(); len(got) != 3 || got[0] != "aa01" || got[2] != "cc03" {
			t.Fatalf("List = %v", got)
		}
		if err := b.Remove(ctx, chain.Handle{Type: chain.PackFile, Name: "bb02"}); err != nil {
			t.Fatal(err)
		}
		if err := b.Remove(ctx, chain.Handle{Type: chain.PackFile, Name: "bb02"}); !errors.Is(err, chain.ErrNotExist) {
			t.Fatalf("second Remove: %v", err)
		}
		if got := list(); len(got) != 2 || got[1] != "cc03" {
			t.Fatalf("List after Remove = %v", got)
		}
		stop := errors.New("stop")
		if err := b.List(ctx, chain.PackFile, func(chain.FileInfo) error { return stop }); !errors.Is(err, stop) {
			t.Fatalf("List must return fn's error, got %v", err)
		}
		// Every file type is stored and listed on its own, a type with no files included.
		for _, ft := range []chain.FileType{chain.KeyFileType, chain.WriterFile, chain.DeletionFile, chain.DamageFile, chain.LockFile, chain.ProtectFile} {
			n := 0
			b.List(ctx, ft, func(chain.FileInfo) error { n++; return nil })
			if n != 0 {
				t.Fatalf("empty %s lists %d files", ft, n)
			}
			if err := b.Save(ctx, chain.Handle{Type: ft, Name: "x1.start"}, []byte("lease")); err != nil {
				t.Fatalf("save %s: %v", ft, err)
			}
			b.List(ctx, ft, func(fi chain.FileInfo) error {
				if fi.Name != "x1.start" {
					t.Errorf("%s lists %q", ft, fi.Name)
				}
				n++
				return nil
			})
			if n != 1 {
				t.Fatalf("%s lists %d files", ft, n)
			}
		}
	})
	t.Run("Concurrent", func(t *testing.T) {
		b := newBackend(t)
		var wg sync.WaitGroup
		for i := 0; i < 8; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				h := chain.Handle{Type: chain.PackFile, Name: string(rune('a'+i)) + "0000"}
				data := bytes.Repeat([]byte{byte(i)}, 4096)
				if err := b.Save(ctx, h, data); err != nil {
					t.Error(err)
					return
				}
				p := make([]byte, 4096)
				for j := 0; j < 50; j++ {
					if _, err := b.ReadAt(ctx, h, p, 0); err != nil && err != io.EOF {
						t.Error(err)
						return
					}
					if !bytes.Equal(p, data) {
						t.Errorf("file %d: read wrong bytes", i)
						return
					}
				}
			}(i)
		}
		wg.Wait()
	})
	t.Run("Lock", func(t *testing.T) {
		b := newBackend(t)
		l, ok := b.(chain.Locker)
		if !ok {
			t.Skip("backend does not implement chain.Locker")
		}
		unlock, err := l.Lock(ctx, "pid 1 (test) since now")
		if err != nil {
			t.Fatal(err)
		}
		_, err = l.Lock(ctx, "pid 2")
		var le *chain.LockedError
		if !errors.As(err, &le) || !errors.Is(err, chain.ErrLocked) || le.Holder != "pid 1 (test) since now" {
			t.Fatalf("second Lock = %v; want a LockedError naming pid 1", err)
		}
		if err := unlock(); err != nil {
			t.Fatal(err)
		}
		unlock, err = l.Lock(ctx, "pid 3")
		if err != nil {
			t.Fatalf("Lock after unlock: %v", err)
		}
		unlock()
	})
}

// Package memory is an in-memory chain.Backend for fast tests of code built on the repository.
package memory

import (
	"context"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/stasis-project/stasis/chain"
)

// Backend keeps files in a map. The zero value is not usable; call New.
type Backend struct {
	mu     sync.Mutex
	files  map[chain.Handle][]byte
	times  map[chain.Handle]time.Time
	holder string
}

var (
	_ chain.Backend = (*Backend)(nil)
	_ chain.Locker  = (*Backend)(nil)
)

// New returns an empty backend.
func New() *Backend {
	return &Backend{files: map[chain.Handle][]byte{}, times: map[chain.Handle]time.Time{}}
}

// Location names the backend.
func (b *Backend) Location() string { return "memory" }

// Save stores a copy of data.
func (b *Backend) Save(ctx context.Context, h chain.Handle, data []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.files[h]; !ok {
		b.times[h] = time.Now()
	}
	b.files[h] = append([]byte(nil), data...)
	return nil
}

func (b *Backend) get(h chain.Handle) ([]byte, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	d, ok := b.files[h]
	if !ok {
		return nil, fmt.Errorf("%s: %w", h, chain.ErrNotExist)
	}
	return d, nil
}

// ReadAt reads part of a file.
func (b *Backend) ReadAt(ctx context.Context, h chain.Handle, p []byte, off int64) (int, error) {
	d, err := b.get(h)
	if err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, fmt.Errorf("negative offset")
	}
	if off >= int64(len(d)) {
		return 0, io.EOF
	}
	n := copy(p, d[off:])
	if n < len(p) {
		return n, io.ErrUnexpectedEOF
	}
	return n, nil
}

// ReadAll returns a copy of a file.
func (b *Backend) ReadAll(ctx context.Context, h chain.Handle) ([]byte, error) {
	d, err := b.get(h)
	return append([]byte(nil), d...), err
}

// Stat returns a file's size.
func (b *Backend) Stat(ctx context.Context, h chain.Handle) (int64, error) {
	d, err := b.get(h)
	return int64(len(d)), err
}

// Remove deletes a file.
func (b *Backend) Remove(ctx context.Context, h chain.Handle) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.files[h]; !ok {
		return fmt.Errorf("%s: %w", h, chain.ErrNotExist)
	}
	delete(b.files, h)
	delete(b.times, h)
	return nil
}

// List calls fn for each file of type t.
func (b *Backend) List(ctx context.Context, t chain.FileType, fn func(chain.FileInfo) error) error {
	b.mu.Lock()
	var list []chain.FileInfo
	for h, d := range b.files {
		if h.Type == t {
			list = append(list, chain.FileInfo{Name: h.Name, Size: int64(len(d)), ModTime: b.times[h]})
		}
	}
	b.mu.Unlock()
	for _, e := range list {
		if err := fn(e); err != nil {
			return err
		}
	}
	return nil
}

// SetModTime changes a file's modification time, as if it had been saved then (tests of
// grace periods).
func (b *Backend) SetModTime(h chain.Handle, t time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.files[h]; ok {
		b.times[h] = t
	}
}

// Close does nothing.
func (b *Backend) Close() error { return nil }

// Lock takes the writer lock for this process.
func (b *Backend) Lock(ctx context.Context, holder string) (func() error, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.holder != "" {
		return nil, &chain.LockedError{Location: "memory", Holder: b.holder}
	}
	b.holder = holder
	return func() error {
		b.mu.Lock()
		b.holder = ""
		b.mu.Unlock()
		return nil
	}, nil
}

// Corrupt flips one byte of a stored file, for corruption tests.
func (b *Backend) Corrupt(h chain.Handle, off int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if d := b.files[h]; off < len(d) {
		d[off] ^= 0xff
	}
}

// Files returns a copy of every file, for tests that inspect what a repository stores.
func (b *Backend) Files() map[chain.Handle][]byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make(map[chain.Handle][]byte, len(b.files))
	for h, d := range b.files {
		out[h] = append([]byte(nil), d...)
	}
	return out
}

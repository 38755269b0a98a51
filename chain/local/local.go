// Package local stores a stasis repository in a directory on a local filesystem.
//
// Every file is written to tmp/, fsynced, renamed into place and its directory fsynced, so a
// crash leaves either the whole file or none of it. The writer lock is an flock(2) on the
// file "lock", which the kernel releases when the holder dies.
package local

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stasis-project/stasis/chain"
)

// Backend is a repository directory.
type Backend struct {
	dir string

	mu    sync.Mutex
	files map[string]*os.File // open read handles, bounded by maxOpen
	order []string
}

var (
	_ chain.Backend = (*Backend)(nil)
	_ chain.Locker  = (*Backend)(nil)
)

const maxOpen = 64

// Create makes the repository directory layout under dir (which may exist but must be empty
// of repository files) and returns a backend for it.
func Create(dir string) (*Backend, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create repository directory: %w", err)
	}
	for _, sub := range []string{"tmp", string(chain.PackFile), string(chain.IndexFile), string(chain.SnapshotFile),
		string(chain.KeyFileType), string(chain.WriterFile), string(chain.LockFile), string(chain.DeletionFile), string(chain.DamageFile), string(chain.ProtectFile)} {
		if err := os.Mkdir(filepath.Join(dir, sub), 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("create repository directory: %w", err)
		}
	}
	if err := syncDir(dir); err != nil {
		return nil, err
	}
	return &Backend{dir: dir, files: map[string]*os.File{}}, nil
}

// Open returns a backend for an existing directory. It does not check that the directory holds
// a repository: chain.Open does that by reading the config.
func Open(dir string) (*Backend, error) {
	st, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("open repository: %w", err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("open repository: %s is not a directory", dir)
	}
	return &Backend{dir: dir, files: map[string]*os.File{}}, nil
}

// Location is the repository directory.
func (b *Backend) Location() string { return b.dir }

func (b *Backend) path(h chain.Handle) string {
	switch h.Type {
	case chain.ConfigFile:
		return filepath.Join(b.dir, "config")
	case chain.PackFile:
		// Two hex digits of fan-out keep directories small at millions of chunks.
		if len(h.Name) > 2 {
			return filepath.Join(b.dir, string(h.Type), h.Name[:2], h.Name)
		}
	}
	return filepath.Join(b.dir, string(h.Type), h.Name)
}

func validName(h chain.Handle) error {
	if h.Type != chain.ConfigFile && (h.Name == "" || strings.ContainsAny(h.Name, "/\\") || strings.HasPrefix(h.Name, ".")) {
		return fmt.Errorf("invalid file name %q", h.Name)
	}
	return nil
}

// Save writes data atomically and durably.
func (b *Backend) Save(ctx context.Context, h chain.Handle, data []byte) error {
	if err := validName(h); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	final := b.path(h)
	if st, err := os.Stat(final); err == nil && st.Size() == int64(len(data)) {
		return nil // content-addressed: same name, same size, same content
	}
	tmp, err := os.CreateTemp(filepath.Join(b.dir, "tmp"), fmt.Sprintf("save-%d-", os.Getpid()))
	if err != nil {
		return fmt.Errorf("save %s: %w", h, err)
	}
	done := false
	defer func() {
		if !done {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err := tmp.Write(data); err != nil {
		return fmt.Errorf("save %s: %w", h, err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("save %s: fsync: %w", h, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("save %s: %w", h, err)
	}
	dir := filepath.Dir(final)
	if h.Type != chain.ConfigFile { // a pack's fan-out directory, or a type older stasis lacked
		if err := os.Mkdir(dir, 0o700); err == nil {
			if err := syncDir(filepath.Dir(dir)); err != nil {
				return err
			}
		} else if !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("save %s: %w", h, err)
		}
	}
	if err := os.Rename(tmp.Name(), final); err != nil {
		return fmt.Errorf("save %s: %w", h, err)
	}
	done = true
	return syncDir(dir)
}

func (b *Backend) open(h chain.Handle) (*os.File, error) {
	p := b.path(h)
	b.mu.Lock()
	defer b.mu.Unlock()
	if f, ok := b.files[p]; ok {
		return f, nil
	}
	f, err := os.Open(p)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%s: %w", h, chain.ErrNotExist)
		}
		return nil, err
	}
	if len(b.order) >= maxOpen {
		// os.File reference-counts its descriptor: a ReadAt in flight finishes before
		// the close takes effect, and a later one fails with ErrClosed and retries.
		old := b.order[0]
		b.order = b.order[1:]
		b.files[old].Close()
		delete(b.files, old)
	}
	b.files[p] = f
	b.order = append(b.order, p)
	return f, nil
}

// ReadAt reads from a file at an offset.
func (b *Backend) ReadAt(ctx context.Context, h chain.Handle, p []byte, off int64) (int, error) {
	if err := validName(h); err != nil {
		return 0, err
	}
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	for attempt := 0; ; attempt++ {
		f, err := b.open(h)
		if err != nil {
			return 0, err
		}
		n, err := f.ReadAt(p, off)
		if errors.Is(err, os.ErrClosed) && attempt < 3 {
			continue // evicted from the handle cache by a concurrent open
		}
		return n, err
	}
}

// ReadAll reads a whole file.
func (b *Backend) ReadAll(ctx context.Context, h chain.Handle) ([]byte, error) {
	if err := validName(h); err != nil {
		return nil, err
	}
	data, err := os.ReadFile(b.path(h))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", h, chain.ErrNotExist)
	}
	return data, err
}

// Stat returns a file's size.
func (b *Backend) Stat(ctx context.Context, h chain.Handle) (int64, error) {
	if err := validName(h); err != nil {
		return 0, err
	}
	st, err := os.Stat(b.path(h))
	if errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("%s: %w", h, chain.ErrNotExist)
	}
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

// Remove deletes a file and fsyncs its directory.
func (b *Backend) Remove(ctx context.Context, h chain.Handle) error {
	if err := validName(h); err != nil {
		return err
	}
	p := b.path(h)
	b.mu.Lock()
	if f, ok := b.files[p]; ok {
		f.Close()
		delete(b.files, p)
		for i, o := range b.order {
			if o == p {
				b.order = append(b.order[:i], b.order[i+1:]...)
				break
			}
		}
	}
	b.mu.Unlock()
	if err := os.Remove(p); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%s: %w", h, chain.ErrNotExist)
		}
		return err
	}
	if h.Type == chain.PackFile {
		// Drop an emptied fan-out directory; fails harmlessly while it holds other packs.
		if os.Remove(filepath.Dir(p)) == nil {
			return syncDir(filepath.Join(b.dir, string(chain.PackFile)))
		}
	}
	return syncDir(filepath.Dir(p))
}

// List calls fn for each file of type t. A type whose directory does not exist yet (a
// repository made by an older stasis) has no files.
func (b *Backend) List(ctx context.Context, t chain.FileType, fn func(chain.FileInfo) error) error {
	root := filepath.Join(b.dir, string(t))
	return filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			if p == root && errors.Is(err, os.ErrNotExist) {
				return nil
			}
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if d.IsDir() {
			if t != chain.PackFile && p != root {
				return filepath.SkipDir
			}
			return nil
		}
		if strings.HasPrefix(d.Name(), ".") {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil // removed while listing
			}
			return err
		}
		return fn(chain.FileInfo{Name: d.Name(), Size: info.Size(), ModTime: info.ModTime()})
	})
}

// Close releases cached file handles.
func (b *Backend) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, f := range b.files {
		f.Close()
	}
	b.files, b.order = map[string]*os.File{}, nil
	return nil
}

// Lock takes the exclusive deletion lock with flock(2) on the file "lock" and records holder
// in it. Temporary files of dead writers (older than TmpGrace) are removed once it is held.
func (b *Backend) Lock(ctx context.Context, holder string) (func() error, error) {
	p := filepath.Join(b.dir, "lock")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock repository: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		defer f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			who, _ := io.ReadAll(io.LimitReader(f, 4096))
			h := strings.TrimSpace(string(who))
			if h == "" {
				h = "another process"
			}
			return nil, &chain.LockedError{Location: b.dir, Holder: h}
		}
		return nil, fmt.Errorf("lock repository: %w", err)
	}
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(holder+"\n"), 0)
	}
	b.cleanTmp()
	return func() error {
		f.Truncate(0)
		return f.Close() // closing the descriptor releases the flock
	}, nil
}

// TmpGrace is how old a temporary file must be before it counts as left by a dead writer.
// Writers take no lock: a younger one may be another process's Save in progress, and no
// single Save takes an hour.
const TmpGrace = time.Hour

// CleanIncomplete removes temporary files of interrupted Saves last written before
// olderThan (gc passes the time the oldest live writer started): those of a process that
// no longer exists, and any older than TmpGrace. A temporary file names its process.
func (b *Backend) CleanIncomplete(ctx context.Context, olderThan time.Time) (int, error) {
	entries, err := os.ReadDir(filepath.Join(b.dir, "tmp"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return 0, err
	}
	n := 0
	for _, e := range entries {
		info, err := e.Info()
		if err != nil || !info.ModTime().Before(olderThan) {
			continue
		}
		if time.Since(info.ModTime()) > TmpGrace || !saverAlive(e.Name()) {
			if os.Remove(filepath.Join(b.dir, "tmp", e.Name())) == nil {
				n++
			}
		}
	}
	return n, nil
}

// saverAlive reports whether the process that created temporary file name ("save-PID-...")
// may still be running: in doubt, yes.
func saverAlive(name string) bool {
	var pid int
	if _, err := fmt.Sscanf(name, "save-%d-", &pid); err != nil || pid <= 0 {
		return true
	}
	return unix.Kill(pid, 0) != unix.ESRCH
}

func (b *Backend) cleanTmp() {
	entries, _ := os.ReadDir(filepath.Join(b.dir, "tmp"))
	for _, e := range entries {
		if info, err := e.Info(); err == nil && time.Since(info.ModTime()) > TmpGrace {
			os.Remove(filepath.Join(b.dir, "tmp", e.Name()))
		}
	}
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}

// Holder reports whether a writer holds dir's lock right now, and who. It takes and drops
// the lock itself when free, so it is only for diagnostics.
func Holder(dir string) (string, bool) {
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_RDONLY, 0)
	if err != nil {
		return "", false
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err == nil {
		unix.Flock(int(f.Fd()), unix.LOCK_UN)
		return "", false
	}
	who, _ := io.ReadAll(io.LimitReader(f, 4096))
	h := strings.TrimSpace(string(who))
	if h == "" {
		h = "another process"
	}
	return h, true
}

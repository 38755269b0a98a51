package chain

import (
	"context"
	"errors"
)

// FileType is a class of repository file. Each type lives in its own namespace.
type FileType string

// The repository's file types.
const (
	ConfigFile   FileType = "config"
	PackFile     FileType = "packs"
	IndexFile    FileType = "index"
	SnapshotFile FileType = "snapshots"
)

// Handle names one file in a backend.
type Handle struct {
	Type FileType
	Name string
}

func (h Handle) String() string {
	if h.Type == ConfigFile {
		return "config"
	}
	return string(h.Type) + "/" + h.Name
}

// ErrNotExist is returned (wrapped) by backends for a file that does not exist.
var ErrNotExist = errors.New("file does not exist")

// Backend stores the repository's files. Implementations must be safe for concurrent use.
//
// Save MUST be atomic and durable: when it returns nil the whole file is on stable storage,
// and a crash at any moment leaves either no file or the complete file, never a prefix.
// Files are immutable once saved: Save of an existing handle with the same content is a no-op
// success; callers never rewrite a file with different content (every name is a content hash,
// except config, which is written once by Init).
type Backend interface {
	// Location names the backend for messages, e.g. a directory path.
	Location() string
	Save(ctx context.Context, h Handle, data []byte) error
	// ReadAt reads len(p) bytes at off; a short read returns io.ErrUnexpectedEOF or io.EOF.
	ReadAt(ctx context.Context, h Handle, p []byte, off int64) (int, error)
	ReadAll(ctx context.Context, h Handle) ([]byte, error)
	Stat(ctx context.Context, h Handle) (size int64, err error)
	// Remove deletes a file durably. Removing a missing file returns an ErrNotExist error.
	Remove(ctx context.Context, h Handle) error
	// List calls fn for every file of type t, in no particular order.
	List(ctx context.Context, t FileType, fn func(name string, size int64) error) error
	Close() error
}

// Locker is implemented by backends that can serialise writers. Lock takes the exclusive
// writer lock, recording holder (a one-line description) so that a refused caller can name
// who holds it; it fails at once with an ErrLocked error when another writer holds the lock.
// The lock MUST be released if the holding process dies (SIGKILL included).
type Locker interface {
	Lock(ctx context.Context, holder string) (unlock func() error, err error)
}

// ErrLocked is returned (wrapped in a *LockedError) when another writer holds the lock.
var ErrLocked = errors.New("repository is locked")

// LockedError says who holds the repository lock.
type LockedError struct {
	Location string
	Holder   string
}

func (e *LockedError) Error() string {
	return "repository " + e.Location + " is locked by " + e.Holder +
		"; wait for that command to finish (or stop it) and try again"
}

func (e *LockedError) Unwrap() error { return ErrLocked }

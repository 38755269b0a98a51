package chain

import (
	"context"
	"errors"
	"time"
)

// FileType is a class of repository file. Each type lives in its own namespace.
type FileType string

// The repository's file types.
const (
	ConfigFile   FileType = "config"
	PackFile     FileType = "packs"
	IndexFile    FileType = "index"
	SnapshotFile FileType = "snapshots"
	KeyFileType  FileType = "keys"      // encrypted repositories: wrapped master keys
	WriterFile   FileType = "writers"   // heartbeats of snapshots being written
	DeletionFile FileType = "deletions" // packs gc will delete once no writer can need them
	DamageFile   FileType = "damaged"   // blobs verify found damaged
	LockFile     FileType = "locks"     // deletion leases, where the backend cannot lock
	ProtectFile  FileType = "protected" // snapshots kept from deletion and retention, by ID
)

// FileInfo describes a listed file. ModTime is the storage's own clock (the server's, for
// object storage), so it is comparable across hosts.
type FileInfo struct {
	Name    string
	Size    int64
	ModTime time.Time
}

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
// success; callers never rewrite a file with different content (a name is a content hash or
// random, except config, which is written once by Init).
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
	List(ctx context.Context, t FileType, fn func(FileInfo) error) error
	Close() error
}

// Locker is implemented by backends that can serialise deleters (delete, prune, gc,
// repair; snapshots take no lock). Lock takes the exclusive deletion lock, recording holder
// (a one-line description) so that a refused caller can name who holds it; it fails at once
// with an ErrLocked error when another process holds the lock. The lock MUST be released if
// the holding process dies (SIGKILL included). Backends that cannot do this (object
// storage) get lease objects instead (see LeaseLock).
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

// ParallelSaver is implemented by backends that gain from several Saves at once (object
// storage, where each upload waits on round trips): a writer keeps that many packs
// uploading.
type ParallelSaver interface {
	SaveConcurrency() int
}

// IncompleteCleaner is implemented by backends where an interrupted Save leaves hidden
// debris (object storage's incomplete multipart uploads): gc aborts those begun before
// olderThan (the storage's clock), when no running writer can still be completing them.
type IncompleteCleaner interface {
	CleanIncomplete(ctx context.Context, olderThan time.Time) (int, error)
}

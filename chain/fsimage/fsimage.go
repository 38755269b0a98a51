// Package fsimage defines what the FUSE view needs from a filesystem reader: a read-only,
// random-access view of the files inside a volume image. The readers (ext4, xfs) parse
// untrusted bytes: they bound every loop and allocation by the image's own geometry, and
// report damage as ErrCorrupt instead of panicking, hanging or returning wrong bytes.
package fsimage

import (
	"errors"
	"fmt"
	"io"
	"time"
)

// ErrCorrupt means the image's metadata does not make sense.
var ErrCorrupt = errors.New("filesystem metadata is corrupt")

// ErrUnsupported means the image uses a feature this reader does not implement.
var ErrUnsupported = errors.New("unsupported filesystem feature")

// ErrNotFound means a name does not exist in a directory.
var ErrNotFound = errors.New("no such file")

// Corruptf returns an error wrapping ErrCorrupt.
func Corruptf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
}

// FS is one filesystem. Implementations are safe for concurrent use.
type FS interface {
	// Type names the filesystem ("ext4", "xfs").
	Type() string
	// Root is the root directory's inode number.
	Root() uint64
	// Open parses inode ino.
	Open(ino uint64) (Inode, error)
}

// Inode is a parsed inode. Methods that do not apply to its type return an error.
// Safe for concurrent use.
type Inode interface {
	Attr() Attr
	// ReadAt reads a regular file; holes and unwritten extents read as zeros.
	ReadAt(p []byte, off int64) (int, error)
	// ReadDir lists a directory, without "." and "..".
	ReadDir() ([]DirEntry, error)
	// Readlink returns a symbolic link's target.
	Readlink() (string, error)
	// Xattrs lists extended attributes with their full names ("user.x", "security.selinux"),
	// values as the kernel's getxattr(2) shows them.
	Xattrs() ([]Xattr, error)
}

// ErrNotMapped means a file's data is not in blocks of the image (ext4 inline data, XFS
// local format): it lives in the inode and can only be read.
var ErrNotMapped = errors.New("file data is stored in its inode")

// Mapper is implemented by the inodes of both readers: where a regular file's bytes live
// in the image, so holes can stay holes and two snapshots' files can be compared by the
// chunks under their extents.
type Mapper interface {
	// Map returns where byte off of the file lives: the image's byte offset, or -1 for a
	// hole or unwritten range (which reads as zeros), and how many bytes from there the
	// answer holds (at least 1; a hole may run past the end of the file). It returns
	// ErrNotMapped for a file whose data is in its inode.
	Map(off int64) (phys, n int64, err error)
}

// MapWithin is m.Map(off) checked against the device the filesystem lies on, size bytes:
// every answer advances, and mapped bytes lie within the device (a hostile superblock can
// describe a larger one, so the readers' own checks do not cover it). Errors are m's,
// ErrNotMapped included, or ErrCorrupt.
func MapWithin(m Mapper, off, size int64) (phys, n int64, err error) {
	phys, n, err = m.Map(off)
	switch {
	case err != nil:
		return 0, 0, err
	case n <= 0:
		return 0, 0, Corruptf("empty mapping at offset %d", off)
	case phys >= 0 && (phys > size || n > size-phys):
		return 0, 0, Corruptf("bytes [%d, %d) of the file map outside the %d-byte device", off, off+n, size)
	}
	return phys, n, nil
}

// Replayer is implemented by filesystems that may show an image with its journal replayed
// in memory. When Replayed is true, some metadata and data read at an offset come from a
// copy elsewhere in the image, so contents cannot be compared by position alone.
type Replayer interface {
	Replayed() bool
}

// Attr is what stat(2) shows.
type Attr struct {
	Ino                 uint64
	Mode                uint32 // type bits (S_IFMT) and permissions
	Nlink               uint32
	UID, GID            uint32
	Size                uint64
	Blocks              uint64 // 512-byte units
	Rdev                uint32 // device number for block and character devices
	Atime, Mtime, Ctime time.Time
}

// DirEntry is one name in a directory.
type DirEntry struct {
	Name string
	Ino  uint64
}

// Xattr is one extended attribute.
type Xattr struct {
	Name  string
	Value []byte
}

// ReadFull reads len(p) bytes at off or fails; a short image is corruption, not EOF.
func ReadFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return Corruptf("read of %d bytes at %d runs past the end of the image", len(p), off)
	}
	return err
}

// Mode type bits, as in stat(2).
const (
	S_IFMT   = 0o170000
	S_IFSOCK = 0o140000
	S_IFLNK  = 0o120000
	S_IFREG  = 0o100000
	S_IFBLK  = 0o060000
	S_IFDIR  = 0o040000
	S_IFCHR  = 0o020000
	S_IFIFO  = 0o010000
)

// SlabReader reads a file made of mapped and unmapped runs. Map returns, for a logical
// byte offset, the physical byte offset holding it (or -1 for a hole or unwritten range)
// and how many bytes from there the mapping covers (at least 1).
func SlabReader(dev io.ReaderAt, size int64, p []byte, off int64, mapFn func(off int64) (phys int64, n int64, err error)) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("negative offset")
	}
	if off >= size {
		return 0, io.EOF
	}
	want := p
	if rest := size - off; int64(len(want)) > rest {
		want = want[:rest]
	}
	done := 0
	for done < len(want) {
		phys, n, err := mapFn(off + int64(done))
		if err != nil {
			return done, err
		}
		if n <= 0 {
			return done, Corruptf("empty mapping at offset %d", off+int64(done))
		}
		part := want[done:]
		if int64(len(part)) > n {
			part = part[:n]
		}
		if phys < 0 {
			clear(part)
		} else if err := ReadFull(dev, part, phys); err != nil {
			return done, err
		}
		done += len(part)
	}
	if done < len(p) {
		return done, io.EOF
	}
	return done, nil
}

// Package fsfreeze freezes and thaws filesystems (FIFREEZE/FITHAW), and makes sure a freeze
// never outlives its purpose: every freeze has a deadline, and a guard process thaws the
// filesystems if the freezing process dies or hangs. This is the only package that issues
// these ioctls.
package fsfreeze

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// The ioctls are _IOWR('X', 119/120, int); x/sys/unix does not define them.
const (
	ioctlFreeze = 0xC0045877
	ioctlThaw   = 0xC0045878
)

// Sentinel errors, tested with errors.Is.
var (
	// ErrNotSupported: the filesystem cannot be frozen (EOPNOTSUPP).
	ErrNotSupported = errors.New("filesystem cannot be frozen")
	// ErrAlreadyFrozen: someone else froze it (EBUSY); we never thaw what we did not freeze.
	ErrAlreadyFrozen = errors.New("filesystem is already frozen by another program")
	// ErrTimeout: the freeze reached its deadline and was thawed before the work finished.
	ErrTimeout = errors.New("freeze exceeded its time limit and was thawed")
)

func freezeFD(fd int) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), ioctlFreeze, 0)
	switch errno {
	case 0:
		return nil
	case unix.EOPNOTSUPP:
		return ErrNotSupported
	case unix.EBUSY:
		return ErrAlreadyFrozen
	}
	return errno
}

// errNotFrozen is FITHAW's EINVAL: the filesystem was not frozen.
var errNotFrozen = errors.New("not frozen")

// thawFD thaws; a filesystem that is not frozen gives errNotFrozen.
func thawFD(fd int) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), ioctlThaw, 0)
	switch errno {
	case 0:
		return nil
	case unix.EINVAL:
		return errNotFrozen
	}
	return errno
}

// ThawPath thaws the filesystem mounted at path. Not frozen is not an error.
func ThawPath(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("thaw %s: %w", path, err)
	}
	defer f.Close()
	if err := thawFD(int(f.Fd())); err != nil && !errors.Is(err, errNotFrozen) {
		return fmt.Errorf("thaw %s: %w", path, err)
	}
	return nil
}

// IsFrozen reports whether the filesystem at path is frozen, by trying to freeze it: a
// frozen one answers EBUSY. Only for diagnostics: it briefly freezes an unfrozen one.
func IsFrozen(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	switch err := freezeFD(int(f.Fd())); {
	case errors.Is(err, ErrAlreadyFrozen):
		return true, nil
	case err == nil:
		if err := thawFD(int(f.Fd())); err != nil && !errors.Is(err, errNotFrozen) {
			return false, err
		}
		return false, nil
	default:
		return false, err
	}
}

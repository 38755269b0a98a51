// Package trust decides whether a file stasis runs or reads secrets from, as root, can be
// trusted: whoever can change it (or a directory on its path) could run code as root or
// swap in their own password.
package trust

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// Check returns an error naming the problem and the fix unless path (resolved through
// symlinks), and every directory above it, belong to root or to this process's user and
// are writable by nobody else (a directory with the sticky bit, like /tmp, may be shared).
// With secret, the file must also be unreadable by others.
func Check(path string, secret bool) error {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return err
	}
	euid := uint32(os.Geteuid())
	st, err := os.Stat(real)
	if err != nil {
		return err
	}
	if err := owned(real, st, euid); err != nil {
		return err
	}
	if m := st.Mode().Perm(); m&0o022 != 0 {
		return fmt.Errorf("%s is writable by others than its owner (mode %04o): chmod go-w %s", path, m, real)
	}
	if m := st.Mode().Perm(); secret && m&0o077 != 0 {
		return fmt.Errorf("%s is readable by others (mode %04o): chmod 600 %s", path, m, real)
	}
	for dir := filepath.Dir(real); ; dir = filepath.Dir(dir) {
		dst, err := os.Stat(dir)
		if err != nil {
			return err
		}
		if err := owned(dir, dst, euid); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		if m := dst.Mode(); m.Perm()&0o022 != 0 && m&os.ModeSticky == 0 {
			return fmt.Errorf("%s: directory %s is writable by others (mode %04o), who could replace it: chmod go-w %s", path, dir, m.Perm(), dir)
		}
		if dir == "/" || dir == "." {
			return nil
		}
	}
}

func owned(path string, st os.FileInfo, euid uint32) error {
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	if sys.Uid != 0 && sys.Uid != euid {
		return fmt.Errorf("%s belongs to uid %d, not to root: chown root %s", path, sys.Uid, path)
	}
	return nil
}

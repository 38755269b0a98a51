package trust

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCheck(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: ownership by another user is part of the test")
	}
	dir := t.TempDir()
	f := filepath.Join(dir, "hook")
	os.WriteFile(f, []byte("#!/bin/sh\n"), 0o700)
	if err := Check(f, true); err != nil {
		t.Fatalf("a root-owned 0700 file in a root-owned directory: %v", err)
	}
	for _, c := range []struct {
		name   string
		setup  func()
		secret bool
		want   string
	}{
		{"group writable", func() { os.Chmod(f, 0o720) }, false, "writable by others"},
		{"world readable secret", func() { os.Chmod(f, 0o744) }, true, "readable by others"},
		{"owned by nobody", func() { os.Chmod(f, 0o700); os.Chown(f, 65534, 65534) }, false, "belongs to uid 65534"},
		{"directory writable by others", func() { os.Chown(f, 0, 0); os.Chmod(dir, 0o777) }, false, "directory " + dir + " is writable by others"},
	} {
		c.setup()
		err := Check(f, c.secret)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
	os.Chmod(dir, 0o777|os.ModeSticky) // like /tmp
	if err := Check(f, false); err != nil {
		t.Fatalf("a sticky directory: %v", err)
	}
}

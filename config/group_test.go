package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestLookupGroup: a group from /etc/group by name or number, one only NSS knows through
// getent (a stand-in getent on PATH here), and a clear error for neither.
func TestLookupGroup(t *testing.T) {
	for _, name := range []string{"root", "0"} {
		if gid, err := LookupGroup(name); err != nil || gid != 0 {
			t.Errorf("LookupGroup(%q) = %d, %v; want 0", name, gid, err)
		}
	}
	bin := t.TempDir()
	script := "#!/bin/sh\n[ \"$1 $2\" = \"group ldap-ops\" ] && echo 'ldap-ops:*:4321:alice,bob' && exit 0\nexit 2\n"
	if err := os.WriteFile(filepath.Join(bin, "getent"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+":"+os.Getenv("PATH"))
	if gid, err := LookupGroup("ldap-ops"); err != nil || gid != 4321 {
		t.Errorf("a group known only to getent: %d, %v; want 4321", gid, err)
	}
	if _, err := LookupGroup("no-such-group-here"); err == nil || !strings.Contains(err.Error(), "no-such-group-here") {
		t.Errorf("an unknown group: %v, want an error naming it", err)
	}
}

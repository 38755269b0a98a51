package config

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"os/user"
	"strconv"
	"time"
)

// LookupGroup returns the ID of a group named by name or number. The binary is built
// without cgo (it starts faster, and runs on any Linux), so the standard library reads
// /etc/group itself; a group that only NSS knows (LDAP, SSSD, systemd-userdb) is asked
// of getent(1), which goes through the system's NSS as a C program would.
func LookupGroup(name string) (int, error) {
	if g, err := user.LookupGroup(name); err == nil {
		return strconv.Atoi(g.Gid)
	}
	if g, err := user.LookupGroupId(name); err == nil {
		return strconv.Atoi(g.Gid)
	}
	return getentGroup(name)
}

// getentGroup asks getent for a group: its output is "name:password:gid:members".
func getentGroup(name string) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "getent", "group", name).Output()
	if err != nil {
		return 0, fmt.Errorf("group %q: no such group (neither in /etc/group nor known to getent)", name)
	}
	fields := bytes.Split(bytes.TrimSpace(bytes.SplitN(out, []byte("\n"), 2)[0]), []byte(":"))
	if len(fields) < 3 {
		return 0, fmt.Errorf("group %q: getent answered %q", name, out)
	}
	gid, err := strconv.Atoi(string(fields[2]))
	if err != nil || gid < 0 {
		return 0, fmt.Errorf("group %q: getent answered %q", name, out)
	}
	return gid, nil
}

package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/stasis-project/stasis/test/testenv"
)

// TestDebPackage builds the packages with `make package`, installs the .deb with dpkg,
// checks its files, the binary, the example configuration and the unit, then purges it.
func TestDebPackage(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "dpkg")
	if _, err := os.Stat("/usr/bin/stasis"); err == nil {
		t.Skip("/usr/bin/stasis exists: not touching an installed stasis")
	}
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	mk := exec.Command("make", "package")
	mk.Dir = root
	if out, err := mk.CombinedOutput(); err != nil {
		t.Fatalf("make package: %v\n%s", err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(root, "dist", "stasis_*_amd64.deb"))
	rpms, _ := filepath.Glob(filepath.Join(root, "dist", "stasis-*.rpm"))
	if len(debs) != 1 || len(rpms) != 1 {
		t.Fatalf("dist/ holds %v and %v", debs, rpms)
	}
	testenv.Run(t, "dpkg", "-i", debs[0])
	t.Cleanup(func() { exec.Command("dpkg", "--purge", "stasis").Run() })
	for _, f := range []string{"/usr/bin/stasis", "/lib/systemd/system/stasis.service", "/etc/stasis/stasis.yaml",
		"/usr/share/bash-completion/completions/stasis", "/usr/share/zsh/vendor-completions/_stasis", "/usr/share/doc/stasis/CONFIG.md",
		"/usr/share/doc/stasis/CLI.md", "/usr/share/man/man8/stasis.8", "/usr/share/man/man8/stasis-snapshot.8"} {
		if _, err := os.Stat(f); err != nil {
			t.Errorf("package did not install %s", f)
		}
	}
	conffiles := testenv.Run(t, "dpkg-query", "--control-show", "stasis", "conffiles")
	if !strings.Contains(conffiles, "/etc/stasis/stasis.yaml") {
		t.Errorf("the example configuration is not a conffile: %q", conffiles)
	}
	if out := testenv.Run(t, "/usr/bin/stasis", "--version"); !strings.Contains(out, "stasis version 0.1.0") {
		t.Errorf("stasis --version: %s", out)
	}
	if out := testenv.Run(t, "/usr/bin/stasis", "config", "check", "/etc/stasis/stasis.yaml"); !strings.Contains(out, "is valid") {
		t.Errorf("config check of the shipped file: %s", out)
	}
	if _, err := exec.LookPath("systemd-analyze"); err == nil {
		if out, err := exec.Command("systemd-analyze", "verify", "/lib/systemd/system/stasis.service").CombinedOutput(); err != nil || len(strings.TrimSpace(string(out))) > 0 {
			t.Errorf("systemd-analyze verify: %v\n%s", err, out)
		}
	}
	for _, cmd := range []string{"snapshot", "restore", "agent", "mount", "prune"} {
		if out := testenv.Run(t, "/usr/bin/stasis", cmd, "--help"); !strings.Contains(out, "Usage:") || len(out) < 300 {
			t.Errorf("stasis %s --help is too thin:\n%s", cmd, out)
		}
	}
	testenv.Run(t, "dpkg", "-r", "stasis")
	for _, f := range []string{"/usr/bin/stasis", "/lib/systemd/system/stasis.service"} {
		if _, err := os.Stat(f); err == nil {
			t.Errorf("%s left after dpkg -r", f)
		}
	}
	if _, err := os.Stat("/etc/stasis/stasis.yaml"); err != nil {
		t.Error("dpkg -r removed the configuration (it must stay until purge)")
	}
	testenv.Run(t, "dpkg", "--purge", "stasis")
	if _, err := os.Stat("/etc/stasis/stasis.yaml"); err == nil {
		t.Error("configuration left after purge")
	}
}

// TestPackageScripts: an upgrade (deb prerm "upgrade", rpm %preun 1) leaves the agent
// running and the postinstall restarts it; a removal (deb "remove", rpm 0) stops it.
func TestPackageScripts(t *testing.T) {
	_, file, _, _ := runtime.Caller(0)
	scripts := filepath.Join(filepath.Dir(file), "..", "..", "packaging", "scripts")
	dir := t.TempDir()
	logf := filepath.Join(dir, "calls")
	os.WriteFile(filepath.Join(dir, "systemctl"), []byte("#!/bin/sh\necho \"$*\" >> "+logf+"\n"), 0o755)
	run := func(script string, args ...string) string {
		os.Remove(logf)
		cmd := exec.Command("sh", append([]string{filepath.Join(scripts, script)}, args...)...)
		cmd.Env = append(os.Environ(), "PATH="+dir+":"+os.Getenv("PATH"), "STASIS_SYSTEMD_RUNTIME="+dir)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s %v: %v\n%s", script, args, err, out)
		}
		b, _ := os.ReadFile(logf)
		return string(b)
	}
	for _, arg := range []string{"upgrade", "1"} {
		if calls := run("preremove.sh", arg); strings.Contains(calls, "stop") {
			t.Errorf("prerm %s stopped the agent: %q", arg, calls)
		}
	}
	for _, arg := range []string{"remove", "0"} {
		if calls := run("preremove.sh", arg); !strings.Contains(calls, "stop stasis.service") {
			t.Errorf("prerm %s did not stop the agent: %q", arg, calls)
		}
	}
	for _, args := range [][]string{{"configure", "0.1.0"}, {"2"}} {
		if calls := run("postinstall.sh", args...); !strings.Contains(calls, "try-restart stasis.service") {
			t.Errorf("postinst %v did not restart the agent: %q", args, calls)
		}
	}
}

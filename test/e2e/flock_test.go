package e2e

import (
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"
)

// startFlock holds an exclusive flock on path from a separate process until the returned
// function is called, as a concurrent stasis writer would.
func startFlock(t *testing.T, path string) func() {
	t.Helper()
	cmd := exec.Command("flock", "-x", path, "sleep", "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // sleep holds the lock too
	if err := cmd.Start(); err != nil {
		t.Skipf("flock(1) unavailable: %v", err)
	}
	time.Sleep(200 * time.Millisecond) // let it take the lock
	var once sync.Once
	release := func() { once.Do(func() { syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); cmd.Wait() }) }
	t.Cleanup(release)
	return release
}

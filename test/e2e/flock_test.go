package e2e

import (
	"os/exec"
	"testing"
	"time"
)

// startFlock holds an exclusive flock on path from a separate process until the returned
// function is called, as a concurrent stasis writer would.
func startFlock(t *testing.T, path string) func() {
	t.Helper()
	cmd := exec.Command("flock", "-x", path, "sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Skipf("flock(1) unavailable: %v", err)
	}
	time.Sleep(200 * time.Millisecond) // let it take the lock
	return func() { cmd.Process.Kill(); cmd.Wait() }
}

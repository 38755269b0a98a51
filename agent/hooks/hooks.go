// Package hooks runs the pre-freeze and post-thaw commands of a volume: each with a time
// limit (its whole process group is killed at the limit), its output sent to the log. A hook
// runs as root, so it must be a file only root can change, and it gets a minimal
// environment, not the agent's.
package hooks

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/stasis-project/stasis/agent/trust"
)

// Env is the environment every hook starts from; Run adds STASIS_PHASE and the caller's.
var Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "HOME=/root"}

// Run runs commands in order, stopping at the first failure (a non-zero exit, a command
// that cannot start, one others than root could change, or the timeout). Each entry is an
// executable path, run without a shell; env is added to Env (STASIS_VOLUME...).
func Run(ctx context.Context, phase string, cmds []string, timeout time.Duration, env []string, log *slog.Logger) error {
	for _, c := range cmds {
		if err := runOne(ctx, phase, c, timeout, env, log); err != nil {
			return err
		}
	}
	return nil
}

func runOne(ctx context.Context, phase, path string, timeout time.Duration, env []string, log *slog.Logger) error {
	if err := trust.Check(path, false); err != nil {
		return fmt.Errorf("%s hook refused: %w", phase, err)
	}
	cmd := exec.Command(path)
	cmd.Env = append(append(append([]string(nil), Env...), env...), "STASIS_PHASE="+phase)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("%s hook %s cannot start: %w", phase, path, err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		logLines(out, log.With("hook", path, "phase", phase))
	}()
	done := make(chan error, 1)
	go func() { wg.Wait(); done <- cmd.Wait() }()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case err := <-done:
		if err != nil {
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				return fmt.Errorf("%s hook %s failed with exit status %d (its output is in the log)", phase, path, ee.ExitCode())
			}
			return fmt.Errorf("%s hook %s: %w", phase, path, err)
		}
		return nil
	case <-timer.C:
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // the hook and anything it started
		<-done
		return fmt.Errorf("%s hook %s did not finish within %s and was killed", phase, path, timeout)
	case <-ctx.Done():
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		return ctx.Err()
	}
}

func logLines(r io.Reader, log *slog.Logger) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		log.Info("hook output", "line", sc.Text())
	}
}

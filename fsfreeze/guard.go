package fsfreeze

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
)

// DefaultStateDir is where frozen-state files live: /run is a tmpfs, never a filesystem we
// freeze, and is emptied at boot.
const DefaultStateDir = "/run/stasis"

// Options configure a guarded freeze.
type Options struct {
	// MaxFreeze bounds the freeze: past it the filesystems are thawed and Thaw reports
	// ErrTimeout. The guard process thaws one second later if this process cannot.
	MaxFreeze time.Duration
	// GuardCommand starts the guard: argv of a program that runs RunGuard (for stasis,
	// its own executable with the hidden freeze-guard command). Empty disables the guard
	// (tests of this package only).
	GuardCommand []string
	// StateDir holds the state file naming what is frozen, for `stasis thaw --all`.
	StateDir string
}

// Frozen is a set of frozen filesystems. Thaw must be called exactly once.
type Frozen struct {
	files     []*os.File
	frozen    int // files[:frozen] are frozen by us
	paths     []string
	start     time.Time
	state     string
	guard     *exec.Cmd
	guardPipe *os.File

	mu       sync.Mutex
	thawed   bool
	timedOut bool
	timer    *time.Timer
	elapsed  time.Duration
	thawErr  error
}

// state is the JSON content of a state file.
type state struct {
	PID        int       `json:"pid"`
	Mounts     []string  `json:"mounts"`
	Since      time.Time `json:"since"`
	ThawBefore time.Time `json:"thaw_before"`
}

// Freeze freezes every filesystem mounted at mounts (one mount per superblock: callers
// dedupe bind mounts) after starting the guard. If any freeze fails, the ones already frozen
// are thawed before it returns. Nothing here writes to the filesystems being frozen: the
// state file goes to StateDir, which must be on another filesystem.
func Freeze(mounts []string, opts Options) (*Frozen, error) {
	if opts.MaxFreeze <= 0 {
		return nil, fmt.Errorf("freeze: a positive time limit is required")
	}
	if opts.StateDir == "" {
		opts.StateDir = DefaultStateDir
	}
	fz := &Frozen{paths: mounts}
	devs := map[uint64]string{}
	for _, m := range mounts {
		f, err := os.Open(m)
		if err != nil {
			fz.closeFiles()
			return nil, fmt.Errorf("freeze %s: %w", m, err)
		}
		var st syscall.Stat_t
		if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
			f.Close()
			fz.closeFiles()
			return nil, fmt.Errorf("freeze %s: %w", m, err)
		}
		if other, dup := devs[st.Dev]; dup {
			f.Close()
			fz.closeFiles()
			return nil, fmt.Errorf("freeze: %s and %s are the same filesystem; freeze it once", other, m)
		}
		devs[st.Dev] = m
		fz.files = append(fz.files, f)
	}
	if err := os.MkdirAll(opts.StateDir, 0o700); err != nil {
		fz.closeFiles()
		return nil, fmt.Errorf("freeze: state directory: %w", err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(opts.StateDir, &st); err == nil {
		if m, ok := devs[st.Dev]; ok {
			fz.closeFiles()
			return nil, fmt.Errorf("freeze: state directory %s is on %s, which would be frozen; use a tmpfs such as /run", opts.StateDir, m)
		}
	}
	now := time.Now()
	b, _ := json.Marshal(state{PID: os.Getpid(), Mounts: mounts, Since: now.UTC(), ThawBefore: now.Add(opts.MaxFreeze + time.Second).UTC()})
	fz.state = filepath.Join(opts.StateDir, fmt.Sprintf("frozen-%d.json", os.Getpid()))
	if err := os.WriteFile(fz.state, b, 0o600); err != nil {
		fz.closeFiles()
		return nil, fmt.Errorf("freeze: write state file: %w", err)
	}
	if len(opts.GuardCommand) > 0 {
		if err := fz.startGuard(opts, mounts); err != nil {
			os.Remove(fz.state)
			fz.closeFiles()
			return nil, err
		}
	}
	fz.start = time.Now()
	for i, f := range fz.files {
		if err := freezeFD(int(f.Fd())); err != nil {
			fz.Thaw() // thaws only files[:frozen]: never what someone else froze
			return nil, fmt.Errorf("freeze %s: %w", mounts[i], err)
		}
		fz.frozen = i + 1
	}
	fz.timer = time.AfterFunc(opts.MaxFreeze, func() {
		fz.mu.Lock()
		defer fz.mu.Unlock()
		if !fz.thawed {
			fz.timedOut = true
			fz.thawLocked()
		}
	})
	return fz, nil
}

func (fz *Frozen) startGuard(opts Options, mounts []string) error {
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("freeze guard: %w", err)
	}
	args := append(append([]string{}, opts.GuardCommand[1:]...),
		"--deadline", (opts.MaxFreeze + time.Second).String(), "--state", fz.state, "--")
	cmd := exec.Command(opts.GuardCommand[0], append(args, mounts...)...)
	cmd.ExtraFiles = []*os.File{r} // fd 3: EOF means the freezer died
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		r.Close()
		w.Close()
		return err
	}
	if err := cmd.Start(); err != nil {
		r.Close()
		w.Close()
		return fmt.Errorf("start freeze guard: %w", err)
	}
	r.Close()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "ready" {
		w.Close()
		cmd.Process.Kill()
		cmd.Wait()
		return fmt.Errorf("freeze guard did not start (%q): %v", line, err)
	}
	fz.guard, fz.guardPipe = cmd, w
	return nil
}

// Thaw thaws everything frozen, stops the guard, removes the state file, and returns how
// long the filesystems were frozen (from the first FIFREEZE to the last FITHAW). It returns
// ErrTimeout if the deadline thawed them first.
func (fz *Frozen) Thaw() (time.Duration, error) {
	fz.mu.Lock()
	if fz.timer != nil {
		fz.timer.Stop()
	}
	if !fz.thawed {
		fz.thawLocked()
	}
	elapsed, err, timedOut := fz.elapsed, fz.thawErr, fz.timedOut
	fz.mu.Unlock()
	if fz.guard != nil {
		io.WriteString(fz.guardPipe, "done\n")
		fz.guardPipe.Close()
		fz.guard.Wait()
		fz.guard = nil
	}
	os.Remove(fz.state)
	fz.closeFiles()
	if err == nil && timedOut {
		err = ErrTimeout
	}
	return elapsed, err
}

func (fz *Frozen) thawLocked() {
	var errs []error
	for i := fz.frozen - 1; i >= 0; i-- {
		if err := thawFD(int(fz.files[i].Fd())); err != nil {
			errs = append(errs, fmt.Errorf("thaw %s: %w", fz.paths[i], err))
		}
	}
	fz.elapsed = time.Since(fz.start)
	fz.thawed = true
	fz.thawErr = errors.Join(errs...)
}

func (fz *Frozen) closeFiles() {
	for _, f := range fz.files {
		f.Close()
	}
	fz.files = nil
}

// RunGuard is the guard process's body. It opens the mounts, says "ready" on stdout, then
// waits on fd 3: "done" means the freezer thawed and the guard exits; EOF without "done"
// means the freezer died, and the guard thaws at once; reaching the deadline thaws too.
// It writes nothing anywhere but stdout, which the freezer reads.
func RunGuard(deadline time.Duration, stateFile string, mounts []string) error {
	var files []*os.File
	for _, m := range mounts {
		f, err := os.Open(m)
		if err != nil {
			return err
		}
		files = append(files, f)
	}
	ctl := os.NewFile(3, "freezer")
	if ctl == nil {
		return fmt.Errorf("freeze guard: no control pipe on fd 3")
	}
	fmt.Println("ready")
	done := make(chan bool, 1)
	go func() {
		line, _ := bufio.NewReader(ctl).ReadString('\n')
		done <- strings.TrimSpace(line) == "done"
	}()
	select {
	case ok := <-done:
		if ok {
			return nil
		}
	case <-time.After(deadline):
	}
	var errs []error
	for i := len(files) - 1; i >= 0; i-- {
		if err := thawFD(int(files[i].Fd())); err != nil {
			errs = append(errs, fmt.Errorf("thaw %s: %w", mounts[i], err))
		}
	}
	if stateFile != "" {
		os.Remove(stateFile)
	}
	return errors.Join(errs...)
}

// ThawAll thaws every filesystem named by a state file in stateDir and removes the files.
// It returns the mounts it thawed. For `stasis thaw --all` and systemd's ExecStopPost.
func ThawAll(stateDir string) ([]string, error) {
	if stateDir == "" {
		stateDir = DefaultStateDir
	}
	files, _ := filepath.Glob(filepath.Join(stateDir, "frozen-*.json"))
	sort.Strings(files)
	var thawed []string
	var errs []error
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var st state
		if err := json.Unmarshal(b, &st); err != nil {
			errs = append(errs, fmt.Errorf("state file %s: %w", f, err))
			os.Remove(f)
			continue
		}
		ok := true
		for i := len(st.Mounts) - 1; i >= 0; i-- {
			if err := ThawPath(st.Mounts[i]); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
				ok = false
				continue
			}
			thawed = append(thawed, st.Mounts[i])
		}
		if ok {
			os.Remove(f)
		}
	}
	return thawed, errors.Join(errs...)
}

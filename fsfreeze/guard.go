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
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// DefaultStateDir is where frozen-state files live: /run is a tmpfs, never a filesystem we
// freeze, and is emptied at boot.
const DefaultStateDir = "/run/stasis"

// ErrThawedEarly means a filesystem was no longer frozen when stasis thawed it: someone
// (an administrator's fsfreeze -u, `stasis thaw --all`, the guard past its deadline)
// thawed it inside the window, so writes may have reached it while stasis believed it
// frozen. Whatever was read in that window is not point-in-time.
var ErrThawedEarly = errors.New("a filesystem was thawed by someone else while stasis held it frozen")

// Options configure a guarded freeze.
type Options struct {
	// MaxFreeze bounds the freeze, from the first FIFREEZE call to the last FITHAW: past
	// it the filesystems are thawed and Thaw reports ErrTimeout. The guard process thaws
	// one second later if this process cannot.
	MaxFreeze time.Duration
	// GuardCommand starts the guard: argv of a program that runs RunGuard (for stasis,
	// its own executable with the hidden freeze-guard command). Empty disables the guard
	// (tests of this package only).
	GuardCommand []string
	// StateDir holds the state file naming what may be frozen, for `stasis thaw --all`.
	StateDir string
}

// Target is one filesystem to freeze: a path on it, and the device number the filesystem
// must have. A path can show another filesystem than the expected one (something mounted
// over the mount point); freezing that one would leave the volume's own writable.
type Target struct {
	Path string
	Dev  uint64 // st_dev the opened path must have; 0 skips the check
}

// Frozen is a set of frozen filesystems. Thaw must be called exactly once.
type Frozen struct {
	targets []Target
	files   []*os.File
	start   time.Time // the first FIFREEZE call
	state   string
	guard   *guardProc
	max     time.Duration

	mu       sync.Mutex
	frozen   []bool // frozen by us and not thawed yet
	ended    bool   // the window ended (Thaw or the timer): elapsed is final
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

var stateSeq atomic.Int64

// Freeze freezes every target (one per superblock: callers dedupe bind mounts) under a
// guard: Prepare, then Freeze. See Prepared.Freeze.
func Freeze(targets []Target, opts Options) (*Frozen, error) {
	p, err := Prepare(targets, opts)
	if err != nil {
		return nil, err
	}
	return p.Freeze()
}

// Prepared is a freeze made ready: the targets opened and checked, the guard process
// started and holding them open too. Starting a process costs tens of milliseconds; done
// before the freeze (while the last rounds read, before an application's lock is taken),
// it is not part of the freeze's lead-in. Freeze or Close must be called exactly once.
type Prepared struct {
	fz    *Frozen
	opts  Options
	paths []string
}

// Prepare opens every target and starts the guard, freezing nothing.
func Prepare(targets []Target, opts Options) (*Prepared, error) {
	if opts.MaxFreeze <= 0 {
		return nil, fmt.Errorf("freeze: a positive time limit is required")
	}
	if opts.StateDir == "" {
		opts.StateDir = DefaultStateDir
	}
	fz := &Frozen{targets: targets, max: opts.MaxFreeze, frozen: make([]bool, len(targets))}
	devs := map[uint64]string{}
	for _, t := range targets {
		f, dev, err := openTarget(t)
		if err != nil {
			fz.closeFiles()
			return nil, err
		}
		if other, dup := devs[dev]; dup {
			f.Close()
			fz.closeFiles()
			return nil, fmt.Errorf("freeze: %s and %s are the same filesystem; freeze it once", other, t.Path)
		}
		devs[dev] = t.Path
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
	paths := make([]string, len(targets))
	for i, t := range targets {
		paths[i] = t.Path
	}
	fz.state = filepath.Join(opts.StateDir, fmt.Sprintf("frozen-%d-%d.json", os.Getpid(), stateSeq.Add(1)))
	if len(opts.GuardCommand) > 0 {
		g, err := startGuard(opts, fz.state, targets)
		if err != nil {
			fz.closeFiles()
			return nil, err
		}
		fz.guard = g
	}
	return &Prepared{fz: fz, opts: opts, paths: paths}, nil
}

// Close releases a prepared freeze that was not used: the guard exits, nothing was frozen.
func (p *Prepared) Close() {
	p.fz.guard.finish()
	p.fz.closeFiles()
}

// Freeze freezes the prepared targets. The state file naming all of them is written before
// the first FIFREEZE and removed only once every one is known thawed. If any freeze fails,
// or one FIFREEZE alone outlasts MaxFreeze, the ones frozen are thawed and nothing more is
// frozen. Nothing here writes to the filesystems being frozen: the state file goes to
// StateDir, which must be on another filesystem.
func (p *Prepared) Freeze() (*Frozen, error) {
	fz, opts, targets := p.fz, p.opts, p.fz.targets
	now := time.Now()
	b, _ := json.Marshal(state{PID: os.Getpid(), Mounts: p.paths, Since: now.UTC(), ThawBefore: now.Add(opts.MaxFreeze + time.Second).UTC()})
	if err := writeSynced(fz.state, b); err != nil {
		p.Close()
		return nil, fmt.Errorf("freeze: write state file: %w", err)
	}
	if err := fz.guard.send("start"); err != nil {
		fz.guard.finish()
		os.Remove(fz.state)
		fz.closeFiles()
		return nil, err
	}
	fz.mu.Lock()
	fz.start = time.Now()
	fz.timer = time.AfterFunc(opts.MaxFreeze, func() {
		fz.mu.Lock()
		defer fz.mu.Unlock()
		if !fz.ended {
			fz.timedOut = true
			fz.thawFrozenLocked()
		}
	})
	fz.mu.Unlock()
	for i, f := range fz.files {
		if err := fz.guard.send("freezing " + strconv.Itoa(i)); err != nil {
			fz.Thaw()
			return nil, err
		}
		err := freezeFD(int(f.Fd()))
		fz.mu.Lock()
		if err == nil {
			fz.frozen[i] = true
		}
		timedOut := fz.timedOut
		if timedOut {
			// The window ended while this FIFREEZE ran: undo it now, not at Thaw.
			fz.thawFrozenLocked()
		}
		fz.mu.Unlock()
		if err != nil {
			fz.guard.send("notours " + strconv.Itoa(i)) // EBUSY: someone else's freeze
			fz.Thaw()
			return nil, fmt.Errorf("freeze %s: %w", targets[i].Path, err)
		}
		if timedOut {
			// This FIFREEZE returned after the time limit (its filesystem had to flush
			// through a stalled device): thaw it at once, freeze nothing more.
			took := time.Since(fz.start)
			fz.Thaw()
			return nil, fmt.Errorf("freeze %s: FIFREEZE took %s, more than max-freeze %s (its dirty data could not be written fast enough); thawed, nothing else frozen: %w",
				targets[i].Path, took.Round(time.Millisecond), opts.MaxFreeze, ErrTimeout)
		}
	}
	return fz, nil
}

// openTarget opens a target's path and checks it shows the expected filesystem.
func openTarget(t Target) (*os.File, uint64, error) {
	f, err := os.Open(t.Path)
	if err != nil {
		return nil, 0, fmt.Errorf("freeze %s: %w", t.Path, err)
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("freeze %s: %w", t.Path, err)
	}
	if t.Dev != 0 && st.Dev != t.Dev {
		f.Close()
		return nil, 0, fmt.Errorf("freeze %s: %w", t.Path, ErrCovered)
	}
	return f, st.Dev, nil
}

// ErrCovered means a path shows another filesystem than the one expected there: something
// is mounted over the mount point.
var ErrCovered = errors.New("the mount point shows another filesystem (something is mounted over it); the volume's own filesystem cannot be frozen through it")

func writeSynced(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// Thaw thaws everything frozen, stops the guard, removes the state file (once nothing can
// still be frozen), and returns how long the filesystems were frozen (from the first
// FIFREEZE to the last FITHAW). It returns ErrTimeout if the deadline thawed them first,
// and ErrThawedEarly if one was no longer frozen when stasis thawed it.
func (fz *Frozen) Thaw() (time.Duration, error) {
	fz.mu.Lock()
	if fz.timer != nil {
		fz.timer.Stop()
	}
	fz.thawFrozenLocked() // also what froze after the timer thawed the rest
	elapsed, err, timedOut := fz.elapsed, fz.thawErr, fz.timedOut
	stillFrozen := false
	for _, f := range fz.frozen {
		stillFrozen = stillFrozen || f
	}
	fz.mu.Unlock()
	guardThawed, guardErr := fz.guard.finish()
	if len(guardThawed) > 0 && !timedOut {
		err = errors.Join(err, fmt.Errorf("the freeze guard thawed %s: %w", strings.Join(guardThawed, ", "), ErrThawedEarly))
	}
	if guardErr != nil {
		err = errors.Join(err, guardErr)
	}
	if !stillFrozen {
		os.Remove(fz.state)
	}
	fz.closeFiles()
	if timedOut && !errors.Is(err, ErrTimeout) {
		err = errors.Join(err, ErrTimeout)
	}
	return elapsed, err
}

// thawFrozenLocked thaws what we froze and is still frozen, newest first, retrying a
// failing FITHAW a few times. A filesystem that was no longer frozen (EINVAL) was thawed
// by someone else. The first call ends the window.
func (fz *Frozen) thawFrozenLocked() {
	errs := []error{fz.thawErr}
	for i := len(fz.files) - 1; i >= 0; i-- {
		if !fz.frozen[i] {
			continue
		}
		err := thawFD(int(fz.files[i].Fd()))
		for try := 0; err != nil && !errors.Is(err, errNotFrozen) && try < 3; try++ {
			time.Sleep(10 * time.Millisecond)
			err = thawFD(int(fz.files[i].Fd()))
		}
		switch {
		case err == nil:
			fz.frozen[i] = false
		case errors.Is(err, errNotFrozen):
			fz.frozen[i] = false
			if !fz.timedOut {
				errs = append(errs, fmt.Errorf("thaw %s: %w", fz.targets[i].Path, ErrThawedEarly))
			}
		default:
			errs = append(errs, fmt.Errorf("thaw %s: %w; it may still be frozen: run `stasis thaw --all`", fz.targets[i].Path, err))
		}
	}
	if !fz.ended {
		fz.elapsed = time.Since(fz.start)
		fz.ended = true
	}
	fz.thawErr = errors.Join(errs...)
}

func (fz *Frozen) closeFiles() {
	for _, f := range fz.files {
		f.Close()
	}
	fz.files = nil
}

// guardProc is the running guard, seen from the freezer. A nil *guardProc does nothing.
type guardProc struct {
	cmd   *exec.Cmd
	pipe  *os.File // the guard's fd 3: messages to it; closing it without "done" means we died
	out   *bufio.Reader
	names []string
}

// The freezer tells the guard, one line each: "start" (the window starts: the guard's
// deadline runs from here), "freezing I" before the FIFREEZE of target I (from then on
// the guard counts it as possibly frozen by us), "notours I" when that FIFREEZE failed
// (someone else's freeze: never thaw it), and "done" when everything is thawed. The guard
// answers on stdout: "ready" once it has opened the targets, then "thawed I" for each
// filesystem it had to thaw itself.

func startGuard(opts Options, stateFile string, targets []Target) (*guardProc, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("freeze guard: %w", err)
	}
	args := append(append([]string{}, opts.GuardCommand[1:]...),
		"--deadline", (opts.MaxFreeze + time.Second).String(), "--state", stateFile, "--")
	g := &guardProc{pipe: w}
	for _, t := range targets {
		args = append(args, fmt.Sprintf("%s=%d", t.Path, t.Dev))
		g.names = append(g.names, t.Path)
	}
	cmd := exec.Command(opts.GuardCommand[0], args...)
	cmd.ExtraFiles = []*os.File{r} // fd 3: EOF means the freezer died
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		r.Close()
		w.Close()
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		r.Close()
		w.Close()
		return nil, fmt.Errorf("start freeze guard: %w", err)
	}
	r.Close()
	g.cmd, g.out = cmd, bufio.NewReader(out)
	line, err := g.out.ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "ready" {
		w.Close()
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("freeze guard did not start (%q): %v", line, err)
	}
	return g, nil
}

func (g *guardProc) send(msg string) error {
	if g == nil {
		return nil
	}
	if _, err := io.WriteString(g.pipe, msg+"\n"); err != nil {
		return fmt.Errorf("the freeze guard is gone (%v): freezing without it could leave a filesystem frozen", err)
	}
	return nil
}

// finish tells the guard we are done, and returns what it had to thaw and its failure.
func (g *guardProc) finish() ([]string, error) {
	if g == nil {
		return nil, nil
	}
	g.send("done")
	g.pipe.Close()
	var thawed []string
	for {
		line, err := g.out.ReadString('\n')
		if f := strings.Fields(line); len(f) == 2 && f[0] == "thawed" {
			if i, err := strconv.Atoi(f[1]); err == nil && i >= 0 && i < len(g.names) {
				thawed = append(thawed, g.names[i])
			}
		}
		if err != nil {
			break
		}
	}
	if err := g.cmd.Wait(); err != nil {
		return thawed, fmt.Errorf("freeze guard: %w", err)
	}
	return thawed, nil
}

// RunGuard is the guard process's body. targets are "PATH=DEV" (DEV the device number the
// path must show, 0 for any). It opens them, says "ready" on stdout, then follows the
// freezer's messages on fd 3. If the freezer dies (EOF without "done"), every target that
// may be frozen by it is thawed at once: by then its last FIFREEZE has returned (a process
// releases its files only after its system calls finish). If the deadline passes (it runs
// from "start"), those targets are thawed, and thawed again as long as the freezer lives
// without saying "done", so a FIFREEZE that completes late is undone too. The state file
// is removed only after a clean final thaw. It writes nothing anywhere but stdout.
func RunGuard(deadline time.Duration, stateFile string, targets []string) error {
	BoostPriority() // started by the lowered service before the window; it may have to thaw
	files := make([]*os.File, len(targets))
	for i, spec := range targets {
		path, devStr, _ := strings.Cut(spec, "=")
		dev, _ := strconv.ParseUint(devStr, 10, 64)
		f, _, err := openTarget(Target{Path: path, Dev: dev})
		if err != nil {
			return err
		}
		files[i] = f
	}
	ctl := os.NewFile(3, "freezer")
	if ctl == nil {
		return fmt.Errorf("freeze guard: no control pipe on fd 3")
	}
	fmt.Println("ready")
	type msg struct {
		line string
		eof  bool
	}
	msgs := make(chan msg)
	go func() {
		r := bufio.NewReader(ctl)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				msgs <- msg{eof: true}
				return
			}
			msgs <- msg{line: strings.TrimSpace(line)}
		}
	}()
	maybe := make([]bool, len(files))
	reported := make([]bool, len(files))
	var expired <-chan time.Time
	var again <-chan time.Time
	thawAll := func() error {
		var errs []error
		for i := len(files) - 1; i >= 0; i-- {
			if !maybe[i] {
				continue
			}
			err := thawFD(int(files[i].Fd()))
			switch {
			case err == nil:
				if !reported[i] {
					fmt.Printf("thawed %d\n", i)
					reported[i] = true
				}
			case errors.Is(err, errNotFrozen):
			default:
				errs = append(errs, fmt.Errorf("thaw %s: %w", files[i].Name(), err))
			}
		}
		return errors.Join(errs...)
	}
	for {
		select {
		case m := <-msgs:
			if m.eof {
				// The freezer died: its FIFREEZE calls have all returned. Thaw, and keep the
				// state file if that failed, for `stasis thaw --all`.
				err := thawAll()
				if err == nil && stateFile != "" {
					os.Remove(stateFile)
				}
				return err
			}
			f := strings.Fields(m.line)
			switch {
			case len(f) == 1 && f[0] == "done":
				return nil
			case len(f) == 1 && f[0] == "start":
				expired = time.After(deadline)
			case len(f) == 2 && (f[0] == "freezing" || f[0] == "notours"):
				if i, err := strconv.Atoi(f[1]); err == nil && i >= 0 && i < len(maybe) {
					maybe[i] = f[0] == "freezing"
				}
			}
		case <-expired:
			expired = nil
			thawAll()
			again = time.After(100 * time.Millisecond)
		case <-again:
			thawAll()
			again = time.After(100 * time.Millisecond)
		}
	}
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

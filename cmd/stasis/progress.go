package main

import (
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/dustin/go-humanize"
	"golang.org/x/term"
)

// progress shows bytes, rate and ETA on a terminal, at most a few times a second, and
// nothing at all when stderr is not a terminal (logs, pipes, systemd).
type progress struct {
	w     io.Writer
	label string
	total int64
	start time.Time

	mu    sync.Mutex
	n     int64
	last  time.Time
	shown bool
}

// progressOff silences progress (--quiet).
var progressOff bool

func newProgress(w io.Writer, label string, total int64) *progress {
	p := &progress{label: label, total: total, start: time.Now()}
	if f, ok := w.(*os.File); ok && !progressOff && term.IsTerminal(int(f.Fd())) {
		p.w = w
	}
	return p
}

func (p *progress) add(n int64) {
	if p == nil || p.w == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.n += n
	p.show(false)
}

// active reports whether progress is displayed at all (a terminal, no --quiet).
func (p *progress) active() bool { return p != nil && p.w != nil }

// addTotal adds to the total (a group's members each say theirs).
func (p *progress) addTotal(n int64) {
	if p == nil || p.w == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.total += n
}

// both sets what is done and the total, as the agent reports them.
func (p *progress) both(n, total int64) {
	if p == nil || p.w == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.n, p.total = n, total
	p.show(false)
}

func (p *progress) set(n int64) {
	if p == nil || p.w == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.n = n
	p.show(false)
}

func (p *progress) show(final bool) {
	now := time.Now()
	if !final && now.Sub(p.last) < 200*time.Millisecond {
		return
	}
	p.last = now
	el := now.Sub(p.start).Seconds()
	rate := float64(p.n) / max(el, 0.001)
	eta := "?"
	if rate > 0 && p.total > p.n {
		eta = time.Duration(float64(p.total-p.n) / rate * float64(time.Second)).Round(time.Second).String()
	}
	if p.total > 0 && p.n > p.total { // later rounds re-read what changed meanwhile
		p.total = p.n
	}
	if p.total <= 0 { // size unknown up front: bytes and rate only
		fmt.Fprintf(p.w, "\r\033[K%s: %s  %s/s", p.label, humanize.IBytes(uint64(p.n)), humanize.IBytes(uint64(rate)))
	} else {
		fmt.Fprintf(p.w, "\r\033[K%s: %s / %s  %s/s  ETA %s", p.label, humanize.IBytes(uint64(p.n)),
			humanize.IBytes(uint64(p.total)), humanize.IBytes(uint64(rate)), eta)
	}
	p.shown = true
}

// done clears the progress line.
func (p *progress) done() {
	if p == nil || p.w == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.shown {
		fmt.Fprint(p.w, "\r\033[K")
	}
}

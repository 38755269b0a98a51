package fsfreeze

import (
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// The service runs with lowered CPU and I/O priority (Nice=, IOSchedulingClass= in its
// unit), so the reads before the freeze leave the machine to its applications. The frozen
// window must not wait behind anyone: BoostPriority gives every thread of the process
// normal priority for it, and its restore puts the lowered ones back after the thaw. The
// guard, started before the window from the lowered service, raises itself for good.

const (
	ioprioWhoProcess = 1 // IOPRIO_WHO_PROCESS: one thread, by its ID
	ioprioClassShift = 13
	ioprioClassRT    = 1
	ioprioClassIdle  = 3
)

type threadPriority struct {
	nice   int // -20..19
	ioprio int // class << 13 | level; class 0 follows the nice value
}

// BoostPriority raises every thread whose CPU priority is below normal (nice > 0) or
// whose I/O class is idle or a best-effort level below normal, and returns what undoes it.
// It cannot fail the snapshot: a thread it cannot change keeps its priority.
func BoostPriority() (restore func()) {
	lowered := map[int]threadPriority{}
	var lowest *threadPriority
	// A thread started while its creator was being raised (the clone in flight as the
	// creator's priority changed, or its entry not yet listed) keeps the old priority:
	// passes repeat, a moment apart, until two in a row find nothing lowered. Threads
	// started after that come from raised threads and inherit their priority.
	for pass, clean := 0, 0; pass < 20 && clean < 2; pass++ {
		if pass > 0 {
			time.Sleep(100 * time.Microsecond)
		}
		clean++
		for _, tid := range threads() {
			p, ok := priorityOf(tid)
			if !ok || !p.lowered() {
				continue
			}
			if _, seen := lowered[tid]; !seen {
				lowered[tid] = p
			}
			if lowest == nil {
				lowest = &p
			}
			clean = 0
			setPriority(tid, threadPriority{nice: min(p.nice, 0), ioprio: 0})
		}
	}
	if len(lowered) == 0 {
		return func() {}
	}
	return func() {
		for _, tid := range threads() {
			if p, ok := lowered[tid]; ok {
				setPriority(tid, p)
			} else if cur, ok := priorityOf(tid); ok && !cur.lowered() {
				setPriority(tid, *lowest) // a thread started in the window, from a boosted one
			}
		}
	}
}

func (p threadPriority) lowered() bool {
	class, level := p.ioprio>>ioprioClassShift, p.ioprio&(1<<ioprioClassShift-1)
	return p.nice > 0 || class == ioprioClassIdle || (class == 2 && level > 4)
}

// threads lists the process's thread IDs.
func threads() []int {
	entries, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range entries {
		if tid, err := strconv.Atoi(e.Name()); err == nil {
			out = append(out, tid)
		}
	}
	return out
}

func priorityOf(tid int) (threadPriority, bool) {
	// getpriority(2) returns 20 - nice, so that no valid answer is negative.
	raw, err := unix.Getpriority(unix.PRIO_PROCESS, tid)
	if err != nil {
		return threadPriority{}, false
	}
	io, _, errno := unix.Syscall(unix.SYS_IOPRIO_GET, ioprioWhoProcess, uintptr(tid), 0)
	if errno != 0 {
		return threadPriority{}, false
	}
	return threadPriority{nice: 20 - raw, ioprio: int(io)}, true
}

func setPriority(tid int, p threadPriority) {
	unix.Setpriority(unix.PRIO_PROCESS, tid, p.nice)
	if p.ioprio>>ioprioClassShift != ioprioClassRT { // never grant a real-time class
		unix.Syscall(unix.SYS_IOPRIO_SET, ioprioWhoProcess, uintptr(tid), uintptr(p.ioprio))
	}
}

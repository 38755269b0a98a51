package fsfreeze

import (
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
)

// TestBoostPriorityCatchesNewThreads: threads the runtime starts while BoostPriority runs
// (inheriting the old priority from a creator being raised) are raised too.
func TestBoostPriorityCatchesNewThreads(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("raising a priority needs root")
	}
	low := threadPriority{nice: 10, ioprio: ioprioClassIdle << ioprioClassShift}
	for try := 0; try < 20; try++ {
		for _, tid := range threads() {
			setPriority(tid, low)
		}
		// Goroutines that end while locked to their thread take the thread with them:
		// the runtime keeps starting new ones.
		var stop atomic.Bool
		var wg sync.WaitGroup
		for g := 0; g < 4; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for !stop.Load() {
					done := make(chan struct{})
					go func() { runtime.LockOSThread(); close(done) }()
					<-done
				}
			}()
		}
		restore := BoostPriority()
		stop.Store(true)
		wg.Wait()
		var left []int
		for _, tid := range threads() {
			if p, ok := priorityOf(tid); ok && p.lowered() {
				left = append(left, tid)
			}
		}
		restore()
		for _, tid := range threads() {
			setPriority(tid, threadPriority{})
		}
		if len(left) > 0 {
			t.Fatalf("try %d: threads %v kept a lowered priority after BoostPriority", try, left)
		}
	}
}

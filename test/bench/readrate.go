package main

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// readRateBench measures what a full snapshot costs a foreground writer on the same disk
// (4 KiB writes, each made durable with fdatasync, every 10 ms), with no read limit and
// with --max-read-rate: the writer's latency percentiles during the snapshot, and the
// snapshot's wall time.
func readRateBench(dir string, v *volume, add func(string, time.Duration, string)) {
	measure := func(extra ...string) (lat []time.Duration, wall time.Duration) {
		repo := filepath.Join(dir, "readrate-repo")
		os.RemoveAll(repo)
		run(*stasis, "init", "-r", repo)
		defer os.RemoveAll(repo)
		f, err := os.OpenFile(filepath.Join(v.mnt, "foreground.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			fatal(err.Error())
		}
		defer f.Close()
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var mu sync.Mutex
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 4096)
			for {
				select {
				case <-stop:
					return
				case <-time.After(10 * time.Millisecond):
				}
				start := time.Now()
				f.Write(buf)
				unix.Fdatasync(int(f.Fd()))
				mu.Lock()
				lat = append(lat, time.Since(start))
				mu.Unlock()
			}
		}()
		os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
		start := time.Now()
		run(*stasis, append([]string{"snapshot", "-q", "-r", repo, "--source", v.dev, "--volume", "vol"}, extra...)...)
		wall = time.Since(start)
		close(stop)
		wg.Wait()
		sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
		return lat, wall
	}
	pct := func(lat []time.Duration, p int) time.Duration {
		if len(lat) == 0 {
			return 0
		}
		return lat[min(len(lat)-1, len(lat)*p/100)]
	}
	for _, c := range []struct {
		what  string
		extra []string
	}{{"no read limit", nil}, {"--max-read-rate 100MiB/s", []string{"--max-read-rate", "100MiB/s"}}} {
		lat, wall := measure(c.extra...)
		add("full snapshot with a foreground writer (4 KiB + fdatasync every 10 ms), "+c.what, wall,
			fmt.Sprintf("writer latency p50 %v, p99 %v, max %v (%d writes)", pct(lat, 50).Round(time.Microsecond),
				pct(lat, 99).Round(time.Microsecond), pct(lat, 100).Round(time.Microsecond), len(lat)))
	}
}

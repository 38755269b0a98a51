package main

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"runtime/pprof"
	"runtime/trace"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/stasis-project/stasis/agent"
	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/local"
)

// openLocked opens (creating) a repository, as the agent does; snapshots take no lock.
func openLocked(dir string) (*chain.Repository, func()) {
	ctx := context.Background()
	if _, err := os.Stat(filepath.Join(dir, "config")); err != nil {
		run(*stasis, "init", "-r", dir)
	}
	be, err := local.Open(dir)
	if err != nil {
		fatal(err.Error())
	}
	r, err := chain.Open(ctx, be, chain.Options{CacheDir: filepath.Join(dir, "..", "cache")})
	if err != nil {
		fatal(err.Error())
	}
	return r, func() { r.Close() }
}

// newTrackedVolume is a volume as the agent keeps it: its tracker runs between snapshots.
func newTrackedVolume(source string) *agent.Volume {
	return agent.NewVolume(agent.VolumeSpec{Name: "vol", Source: source, MaxFreeze: 5 * time.Second},
		agent.Options{GuardCommand: []string{*stasis, "freeze-guard"}, KeepTracking: true})
}

// trackedIncremental times a tracked incremental after 20 MiB of changes: the agent's
// steady state, where the tracker has run since the previous snapshot's freeze.
func trackedIncremental(dir string, v *volume) (time.Duration, *agent.Outcome) {
	return trackedAt(dir, filepath.Join(dir, "tracked-repo-"+filepath.Base(v.dev)), false, v)
}

// busyWriter does about 20 MB/s of random writes in dir (200 KiB every 10 ms, fsync every
// 100 ms) until stop is closed.
func busyWriter(dir string, stop chan struct{}, wg *sync.WaitGroup) {
	wg.Add(1)
	go func() {
		defer wg.Done()
		f, err := os.OpenFile(filepath.Join(dir, "busy"), os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return
		}
		defer f.Close()
		rng := rand.New(rand.NewSource(2))
		buf := make([]byte, 200<<10)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			rng.Read(buf)
			f.WriteAt(buf, rng.Int63n(512)*(1<<20))
			if i%10 == 0 {
				f.Sync()
			}
		}
	}()
}

// freezeWindows measures freeze times of tracked snapshots on a volume of size bytes while a
// writer does about 20 MB/s of random writes.
func freezeWindows(dir string, size int64, count int) (median, worst time.Duration, runs []time.Duration) {
	sub := filepath.Join(dir, fmt.Sprintf("freeze-%d", size>>30))
	os.MkdirAll(sub, 0o755)
	v := newVolume(sub, size)
	defer v.close()
	r, unlock := openLocked(filepath.Join(sub, "repo"))
	defer unlock()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	busyWriter(v.mnt, stop, &wg)
	vol := newTrackedVolume(v.mnt)
	for i := 0; i < count; i++ {
		out, err := vol.Snapshot(context.Background(), r, agent.Request{Name: fmt.Sprint("f", i)})
		if err != nil {
			fatal(err.Error())
		}
		if i > 0 { // the first is a full scan; the steady state is what matters
			runs = append(runs, out.Capture.Freeze)
		}
		time.Sleep(time.Second)
	}
	vol.Close()
	close(stop)
	wg.Wait()
	return spread(runs)
}

// groupFreezeWindows measures the freeze window of tracked group snapshots of two 2 GiB
// volumes, each with a writer at about 20 MB/s.
func groupFreezeWindows(dir string, count int) (median, worst time.Duration, runs []time.Duration) {
	var vols []*agent.Volume
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < 2; i++ {
		sub := filepath.Join(dir, fmt.Sprintf("group-%d", i))
		os.MkdirAll(sub, 0o755)
		v := newVolume(sub, 2<<30)
		defer v.close()
		busyWriter(v.mnt, stop, &wg)
		vol := agent.NewVolume(agent.VolumeSpec{Name: fmt.Sprint("member", i), Source: v.mnt, MaxFreeze: 5 * time.Second},
			agent.Options{GuardCommand: []string{*stasis, "freeze-guard"}, KeepTracking: true})
		defer vol.Close()
		vols = append(vols, vol)
	}
	r, unlock := openLocked(filepath.Join(dir, "group-repo"))
	defer unlock()
	spec := &agent.GroupSpec{Name: "g", MaxFreeze: 5 * time.Second}
	for i := 0; i < count; i++ {
		outs, err := agent.SnapshotGroup(context.Background(), r, spec, vols, agent.Request{Name: fmt.Sprint("g", i)})
		if err != nil {
			fatal(err.Error())
		}
		if i > 0 {
			runs = append(runs, outs[0].Capture.Freeze)
		}
		time.Sleep(time.Second)
	}
	close(stop)
	wg.Wait()
	return spread(runs)
}

func spread(runs []time.Duration) (median, worst time.Duration, all []time.Duration) {
	s := append([]time.Duration(nil), runs...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2], s[len(s)-1], runs
}

// trackedSeries times five tracked incrementals in a row, each after 20 MiB of changes, in
// a local repository and, with versitygw installed, an encrypted one on S3.
func trackedSeries(dir string, v *volume, add func(string, time.Duration, string)) {
	series := func(what string, r *chain.Repository) {
		vol := newTrackedVolume(v.mnt)
		defer vol.Close()
		if _, err := vol.Snapshot(context.Background(), r, agent.Request{Name: "base"}); err != nil {
			fatal(err.Error())
		}
		var runs []time.Duration
		var freezes []string
		if *cpuProfile != "" {
			f, err := os.Create(*cpuProfile + "." + strings.Fields(what)[0])
			if err != nil {
				fatal(err.Error())
			}
			defer f.Close()
			pprof.StartCPUProfile(f)
			defer pprof.StopCPUProfile()
		}
		if *goTrace != "" {
			f, err := os.Create(*goTrace + "." + strings.Fields(what)[0])
			if err != nil {
				fatal(err.Error())
			}
			defer f.Close()
			trace.Start(f)
			defer trace.Stop()
		}
		for i := 0; i < 5; i++ {
			v.change(20 << 20)
			var out *agent.Outcome
			runs = append(runs, timeIt(func() {
				var err error
				if out, err = vol.Snapshot(context.Background(), r, agent.Request{Name: fmt.Sprint("tracked-", i)}); err != nil {
					fatal(err.Error())
				}
			}))
			freezes = append(freezes, fmt.Sprintf("%.1f", agent.Millis(out.Capture.Freeze)))
		}
		add(what+": tracked incremental after 20 MiB changed, median of 5", median(runs), fmt.Sprintf("runs %v; freeze ms %v", runs, freezes))
	}
	r, done := openRepoAt(filepath.Join(dir, "tracked-series"), filepath.Join(dir, "cache"), false)
	series("local", r)
	done()
	if srv := startS3(dir); srv != nil {
		r, done := openRepoAt(srv.location("tracked-series"), filepath.Join(dir, "cache"), true)
		series("s3 (encrypted)", r)
		done()
		srv.stop()
	}
}

package main

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// mountBench measures the FUSE file view against the live filesystem (and restic mount
// when restic is installed): a cold sequential read of a 200 MB file, `ls -lR` of a
// 20,000-entry directory, and 1,000 random 4 KiB reads.
func mountBench(dir string, add func(string, time.Duration, string)) {
	os.MkdirAll(filepath.Join(dir, "mountbench"), 0o755)
	v := newVolume(filepath.Join(dir, "mountbench"), 1<<30)
	defer v.close()
	rng := rand.New(rand.NewSource(7))
	big := filepath.Join(v.mnt, "big.bin")
	f, err := os.Create(big)
	if err != nil {
		fatal(err.Error())
	}
	buf := make([]byte, 1<<20)
	text := bytes.Repeat([]byte("2026-11-23 12:00:00 GET /index.html 200 took=3ms\n"), len(buf)/2/49+1)
	for i := 0; i < 200; i++ { // half random, half text: like real data, compressible in part
		rng.Read(buf[:len(buf)/2])
		copy(buf[len(buf)/2:], text)
		f.Write(buf)
	}
	f.Close()
	many := filepath.Join(v.mnt, "many")
	os.Mkdir(many, 0o755)
	for i := 0; i < 20000; i++ {
		os.WriteFile(filepath.Join(many, fmt.Sprintf("entry-%05d", i)), []byte("x"), 0o644)
	}
	run("sync")
	repo := filepath.Join(dir, "mountbench-repo")
	run(*stasis, "init", "-r", repo)
	run(*stasis, "snapshot", "-r", repo, "--source", v.dev, "--volume", "vol", "--name", "s")
	fuseDir := filepath.Join(dir, "fuse")
	os.MkdirAll(fuseDir, 0o755)
	view := filepath.Join(fuseDir, "vol", "s")

	// Cold: page cache dropped, and a fresh mount process (empty chunk cache, nothing parsed).
	var peakRSS string // VmHWM of the last mount process
	serve := func() func() {
		stop := serveView(repo, fuseDir, "vol")
		return func() { peakRSS = stop() }
	}
	dropCaches := func() { os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0) }
	readAll := func(p string) { run("dd", "if="+p, "of=/dev/null", "bs=1M") }

	// Five of each, alternating: the host disk under the live reads varies run to run.
	var lives, views []time.Duration
	for i := 0; i < 5; i++ {
		dropCaches()
		lives = append(lives, timeIt(func() { readAll(big) }))
		stop := serve()
		dropCaches()
		views = append(views, timeIt(func() { readAll(filepath.Join(view, "big.bin")) }))
		stop()
	}
	live, seq := median(lives), median(views)
	add("sequential read of a 200 MB file, live ext4, cold, median of 5", live, fmt.Sprint(lives))
	add("the same file through the stasis view, cold, median of 5", seq, fmt.Sprintf("%.0f%% of live throughput; runs %v; mount peak RSS %s", 100*ratio(live, seq), views, peakRSS))

	var resticLs time.Duration // ls -lR of the same directory through restic mount
	if has("restic") {
		resticRepo := filepath.Join(dir, "mountbench-restic")
		os.Setenv("RESTIC_PASSWORD", "bench")
		run("restic", "init", "-q", "-r", resticRepo)
		run("restic", "backup", "-q", "-r", resticRepo, big, many)
		rmnt := filepath.Join(dir, "restic-mnt")
		os.MkdirAll(rmnt, 0o755)
		cmd := exec.Command("restic", "-r", resticRepo, "mount", rmnt)
		if err := cmd.Start(); err == nil {
			target := filepath.Join(rmnt, "snapshots", "latest", strings.TrimPrefix(big, "/"))
			for i := 0; i < 400; i++ {
				if _, err := os.Stat(target); err == nil {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			dropCaches()
			rt := timeIt(func() { readAll(target) })
			add("the same file through restic mount, cold", rt, fmt.Sprintf("stasis is %.1f× faster", ratio(rt, seq)))
			resticMany := filepath.Join(rmnt, "snapshots", "latest", strings.TrimPrefix(many, "/"))
			resticLs = timeIt(func() { run("ls", "-lR", resticMany) })
			exec.Command("fusermount3", "-u", rmnt).Run()
			cmd.Wait()
		}
	}

	stop := serve()
	dropCaches()
	t := timeIt(func() { run("ls", "-lR", filepath.Join(view, "many")) })
	lsNote := ""
	if resticLs > 0 {
		lsNote = fmt.Sprintf("restic mount: %.3f s (stasis %.1f× faster)", resticLs.Seconds(), ratio(resticLs, t))
	}
	add("ls -lR of the 20,000-entry directory through the view, cold", t, lsNote)
	t = timeIt(func() { run("ls", "-lR", filepath.Join(view, "many")) })
	add("ls -lR of the same directory again (kernel caches warm)", t, "")
	stop()

	stop = serve()
	defer stop()
	dropCaches()
	fd, err := unix.Open(filepath.Join(view, "big.bin"), unix.O_RDONLY, 0)
	if err != nil {
		fatal(err.Error())
	}
	defer unix.Close(fd)
	unix.Fadvise(fd, 0, 0, unix.FADV_RANDOM)
	var lat []time.Duration
	p := make([]byte, 4096)
	for i := 0; i < 1000; i++ {
		off := rng.Int63n(200<<20/4096) * 4096
		start := time.Now()
		if _, err := unix.Pread(fd, p, off); err != nil {
			fatal(err.Error())
		}
		lat = append(lat, time.Since(start))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	add("1,000 random 4 KiB reads of the file through the view, cold, median", lat[len(lat)/2],
		fmt.Sprintf("median %v, p90 %v, p99 %v, max %v", lat[len(lat)/2], lat[len(lat)*9/10], lat[len(lat)*99/100], lat[len(lat)-1]))

	// What one FUSE round trip costs here: ls -l asks for two xattrs per file, which the
	// kernel does not cache, so this bounds what `ls -lR` can reach.
	name := filepath.Join(view, "many", "entry-00001")
	start := time.Now()
	for i := 0; i < 2000; i++ {
		unix.Lgetxattr(name, "security.selinux", p)
	}
	rt := time.Since(start) / 2000
	add("one FUSE round trip (getxattr of an absent attribute), mean of 2,000", rt, fmt.Sprintf("%v; ls -l makes 2 per file", rt))
}

// serveView runs `stasis mount` of repo on fuseDir until want appears in it, and returns
// what stops it, which reports the mount's peak RSS.
func serveView(repo, fuseDir, want string) (stop func() (peakRSS string)) {
	os.MkdirAll(fuseDir, 0o755)
	cmd := exec.Command(*stasis, "mount", "-r", repo, fuseDir)
	if err := cmd.Start(); err != nil {
		fatal(err.Error())
	}
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(filepath.Join(fuseDir, want)); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	return func() (peak string) {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid)); err == nil {
			for _, l := range strings.Split(string(b), "\n") {
				if strings.HasPrefix(l, "VmHWM:") {
					peak = strings.TrimSpace(strings.TrimPrefix(l, "VmHWM:"))
				}
			}
		}
		exec.Command("fusermount3", "-u", fuseDir).Run()
		cmd.Wait()
		return peak
	}
}

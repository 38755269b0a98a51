// Command bench measures stasis against dd, restic and borg on a real loop device holding
// ext4 with ~600 MB of mixed files, as the issues' benchmarks ask. Run it as root:
//
//	make bench            (or: go run ./test/bench -stasis bin/stasis)
//
// Every figure is wall time with the page cache dropped before each step; compare ratios
// from the same run, since absolute numbers depend on the machine's disk.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/stasis-project/stasis/agent"
)

var (
	stasis      = flag.String("stasis", "bin/stasis", "stasis binary")
	work        = flag.String("work", "", "scratch directory (default: a new one under /var/tmp)")
	volSize     = flag.Int64("size", 2<<30, "volume size in bytes")
	chunkStudy  = flag.Bool("chunk-study", false, "also compare chunk sizes (16K..1M)")
	keep        = flag.Bool("keep", false, "keep the scratch directory")
	freezeBench = flag.Bool("freeze", true, "measure freeze windows on 2 and 8 GiB volumes")
	mountBenchF = flag.Bool("mount", true, "measure the FUSE file view")
	onlyMount   = flag.Bool("only-mount", false, "measure only the FUSE file view")
	layouts     = flag.Bool("layouts", true, "measure zram (bio-based) tracking and a two-volume group's freeze window")
	encBench    = flag.Bool("encryption", true, "compare an encrypted repository with an unencrypted one")
	s3BenchF    = flag.Bool("s3", true, "measure snapshots, copy, export and the view against S3 (versitygw)")
	filesBenchF = flag.Bool("files", true, "measure diff and file restore against diff -rq and cp -a through the view, and restic")
	onlyFiles   = flag.Bool("only-files", false, "measure only the file tools (fills a volume and takes its two snapshots first)")
	readRate    = flag.Bool("read-rate", true, "measure a foreground writer's latency during a full snapshot, with and without --max-read-rate")
	onlyRate    = flag.Bool("only-read-rate", false, "measure only that")
	onlyFull    = flag.Bool("only-full", false, "measure only full snapshots against dd, three of each")
	onlyS3Inc   = flag.Bool("only-s3-tracked", false, "measure only the tracked incremental into S3 (versitygw), against restic's incremental to the same server")
	traceS3     = flag.Bool("trace", false, "print every S3 request of the S3 benchmarks: start (ms from the start of the last timed tracked incremental), method, path, size, duration")
	cpuProfile  = flag.String("cpuprofile", "", "with -only-tracked: write CPU profiles of the timed incrementals to FILE.local and FILE.s3")
	goTrace     = flag.String("gotrace", "", "with -only-tracked: write Go execution traces of the timed incrementals to FILE.local and FILE.s3 (go tool trace)")
	onlyFreeze  = flag.Bool("only-freeze", false, "measure only freeze windows (2 and 8 GiB volumes under a writer)")
	onlyTracked = flag.Bool("only-tracked", false, "measure only tracked incrementals, local and into S3 (versitygw), 5 of each")
	onZram      = flag.Bool("zram", false, "with -only-tracked: on a zram volume (bio-based) instead of a loop device")
)

func main() {
	flag.Parse()
	if os.Geteuid() != 0 {
		fatal("bench needs root (loop devices, mounts, dropping caches)")
	}
	bin, err := filepath.Abs(*stasis)
	if err != nil {
		fatal(err.Error())
	}
	*stasis = bin
	dir := *work
	if dir == "" {
		dir, err = os.MkdirTemp("/var/tmp", "stasis-bench-")
		if err != nil {
			fatal(err.Error())
		}
	}
	os.Setenv("STASIS_CACHE_DIR", filepath.Join(dir, "cache")) // nothing left in /var/cache/stasis
	if !*keep {
		defer os.RemoveAll(dir)
		cleanups = append(cleanups, func() { os.RemoveAll(dir) })
	}
	rows := [][]string{}
	add := func(what string, d time.Duration, note string) {
		rows = append(rows, []string{what, fmt.Sprintf("%.3f s", d.Seconds()), note})
		fmt.Fprintf(os.Stderr, "%-55s %8.3f s  %s\n", what, d.Seconds(), note)
	}
	printRows := func() {
		fmt.Println("| step | wall | notes |")
		fmt.Println("|---|---|---|")
		for _, r := range rows {
			fmt.Printf("| %s | %s | %s |\n", r[0], r[1], r[2])
		}
	}
	if *onlyFreeze {
		freezeBenches(dir, add)
		printRows()
		return
	}
	if *onlyMount {
		mountBench(dir, add)
		printRows()
		return
	}
	var v *volume
	if *onZram && *onlyTracked {
		v = newZramVolume(dir, *volSize)
	} else {
		v = newVolume(dir, *volSize)
	}
	defer v.close()
	v.fill()
	if *onlyS3Inc {
		if srv := startS3(dir); srv != nil {
			_, resticInc := resticS3(srv, v)
			s3Tracked(dir, srv, v, resticInc, add)
			srv.stop()
		}
		printRows()
		return
	}
	if *onlyTracked {
		trackedSeries(dir, v, add)
		printRows()
		return
	}
	if *onlyRate {
		readRateBench(dir, v, add)
		printRows()
		return
	}
	if *onlyFiles {
		repo := filepath.Join(dir, "stasis-repo")
		run(*stasis, "init", "-r", repo)
		snapshot(repo, v.dev, "full")
		v.change(20 << 20)
		snapshot(repo, v.dev, "after-20MiB")
		filesBench(dir, v, repo, add)
		printRows()
		return
	}

	repo := filepath.Join(dir, "stasis-repo")
	dd, stasisFull, stasisFullStored := fullVsDD(v, repo, add)
	if *onlyFull {
		printRows()
		return
	}

	resticRepo := filepath.Join(dir, "restic-repo")
	haveRestic := has("restic")
	var resticFull time.Duration
	if haveRestic {
		os.Setenv("RESTIC_PASSWORD", "bench")
		run("restic", "init", "-q", "-r", resticRepo)
		resticFull = timeIt(func() {
			shell(fmt.Sprintf("restic backup -q -r %s --stdin --stdin-filename vol < %s", resticRepo, v.dev))
		})
		add("restic backup --stdin, full", resticFull, fmt.Sprintf("stasis is %.1f× faster; repository %s (stasis %s)", ratio(resticFull, stasisFull), mb(du(resticRepo)), mb(du(repo))))
	}
	borgRepo := filepath.Join(dir, "borg-repo")
	haveBorg := has("borg")
	if haveBorg {
		os.Setenv("BORG_PASSPHRASE", "")
		os.Setenv("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
		run("borg", "init", "-e", "none", borgRepo)
		t := timeIt(func() { run("borg", "create", "-C", "lz4", "--read-special", borgRepo+"::full", v.dev) })
		add("borg create -C lz4 --read-special, full", t, fmt.Sprintf("repository %s", mb(du(borgRepo))))
	}

	v.change(20 << 20)
	var resticInc, borgInc time.Duration
	var inc snapResult
	t := timeIt(func() { inc = snapshot(repo, v.dev, "after-20MiB") })
	add("stasis second snapshot after 20 MiB changed", t, fmt.Sprintf("%.2f× dd; tracking %s, read %s, added %s", ratio(t, dd), inc.Tracking, mb(inc.BytesRead), mb(inc.NewBytes)))
	if haveRestic {
		rt := timeIt(func() {
			shell(fmt.Sprintf("restic backup -q -r %s --stdin --stdin-filename vol < %s", resticRepo, v.dev))
		})
		resticInc = rt
		add("restic after 20 MiB changed", rt, fmt.Sprintf("stasis is %.1f× faster", ratio(rt, t)))
	}
	if haveBorg {
		bt := timeIt(func() { run("borg", "create", "-C", "lz4", "--read-special", borgRepo+"::inc", v.dev) })
		borgInc = bt
		add("borg after 20 MiB changed", bt, fmt.Sprintf("stasis is %.1f× faster", ratio(bt, t)))
	}

	if *filesBenchF {
		filesBench(dir, v, repo, add)
	}
	if *readRate {
		readRateBench(dir, v, add)
	}

	tt, tout := trackedIncremental(dir, v)
	add("stasis tracked incremental after 20 MiB changed (agent path)", tt, fmt.Sprintf("tracking %s, read %s, freeze %.1f ms; %.0f× faster than restic, %.0f× than borg",
		tout.Capture.Tracking, mb(tout.Capture.BytesRead), agent.Millis(tout.Capture.Freeze), ratio(resticInc, tt), ratio(borgInc, tt)))
	if *layouts {
		zv := newZramVolume(dir, *volSize)
		zv.fill()
		zt, zout := trackedIncremental(dir, zv)
		add("  the same on zram (bio-based, as LVM/dm-crypt/md)", zt, fmt.Sprintf("tracking %s, read %s, freeze %.1f ms; %.2f× the loop device's time",
			zout.Capture.Tracking, mb(zout.Capture.BytesRead), agent.Millis(zout.Capture.Freeze), ratio(zt, tt)))
		zv.close()
		med, worst, runs := groupFreezeWindows(dir, 8)
		add("group of two 2 GiB volumes, writers at ~20 MB/s on each (7 tracked group snapshots)", med,
			fmt.Sprintf("freeze window median %.1f ms, max %.1f ms; all %v", agent.Millis(med), agent.Millis(worst), runs))
	}

	if *freezeBench {
		freezeBenches(dir, add)
	}

	img := filepath.Join(dir, "export.img")
	ddImg := filepath.Join(dir, "dd.img")
	ddw := timeIt(func() { run("dd", "if="+v.dev, "of="+ddImg, "bs=4M", "iflag=direct", "conv=fsync") })
	add("dd writing the image to a file (conv=fsync)", ddw, "")
	t = timeIt(func() { run(*stasis, "export", "-r", repo, "vol/full", img) })
	add("stasis export (sparse, fsynced)", t, fmt.Sprintf("%.0f%% of dd's throughput; CPU %.2f s per GiB read back from the repository", 100*ratio(ddw, t),
		lastCPU.Seconds()/(float64(stasisFullStored)/(1<<30))))
	base := baseline{dd: dd, full: stasisFull, resticFull: resticFull, tracked: tt, resticInc: resticInc, export: t, repo: repo}
	var rs struct {
		ChunksWritten int64 `json:"chunks_written"`
	}
	t = timeIt(func() {
		out := run(*stasis, "restore", "-r", repo, "vol/after-20MiB", "--to", img, "--json")
		json.Unmarshal([]byte(out), &rs)
	})
	add("stasis restore of the newer snapshot onto the exported older image", t, fmt.Sprintf("%.0f%% of dd's throughput; %d chunks written", 100*ratio(ddw, t), rs.ChunksWritten))
	os.Remove(ddImg)

	if *encBench {
		encryptionBench(dir, v, base, add)
	}
	if *s3BenchF {
		s3Bench(dir, v, base, add)
	}
	if *chunkStudy {
		chunkSizes(dir, v)
	}
	if *mountBenchF {
		mountBench(dir, add)
	}
	printRows()
}

type snapResult struct {
	BytesRead     int64   `json:"bytes_read"`
	NewBytes      int64   `json:"new_bytes"`
	MetadataBytes int64   `json:"metadata_bytes"`
	Tracking      string  `json:"tracking"`
	FreezeMS      float64 `json:"freeze_ms"`
}

func snapshot(repo, dev, name string, extra ...string) snapResult {
	args := append([]string{"snapshot", "-r", repo, "--source", dev, "--volume", "vol", "--name", name, "--json"}, extra...)
	out := run(*stasis, args...)
	var r snapResult
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		fatal("snapshot output: " + err.Error())
	}
	return r
}

// chunkSizes measures the trade-off behind the default chunk size: bytes stored for an
// incremental of scattered small writes (a database's pattern) against index size and time.
func chunkSizes(dir string, v *volume) {
	fmt.Println("\n| chunk size | full snapshot | full stored | incremental (2,000 scattered 4 KiB writes) stored | of which metadata | incremental time |")
	fmt.Println("|---|---|---|---|---|---|")
	for _, cs := range []int{16 << 10, 64 << 10, 256 << 10, 1 << 20} {
		repo := filepath.Join(dir, fmt.Sprintf("cs-%d", cs))
		run(*stasis, "init", "-r", repo)
		var full, inc snapResult
		ft := timeIt(func() { full = snapshot(repo, v.dev, "full", "--chunk-size", fmt.Sprint(cs)) })
		v.scatter(2000, int64(cs))
		it := timeIt(func() { inc = snapshot(repo, v.dev, "inc") })
		fmt.Printf("| %d KiB | %.2f s | %s | %s | %s | %.2f s |\n", cs>>10, ft.Seconds(), mb(full.NewBytes), mb(inc.NewBytes), mb(inc.MetadataBytes), it.Seconds())
		os.RemoveAll(repo)
	}
}

type volume struct {
	img, dev, mnt string
	zram          string // the zram device's number, for a zram volume
	rng           *rand.Rand
}

func newVolume(dir string, size int64) *volume {
	v := &volume{img: filepath.Join(dir, "volume.img"), mnt: filepath.Join(dir, "mnt"), rng: rand.New(rand.NewSource(1))}
	f, err := os.Create(v.img)
	if err != nil {
		fatal(err.Error())
	}
	f.Truncate(size)
	f.Close()
	v.dev = strings.TrimSpace(run("losetup", "-f", "--show", v.img))
	cleanups = append(cleanups, v.close)
	v.mkfs()
	return v
}

// newZramVolume is a volume on a new zram device: bio-based, as LVM, dm-crypt and md are.
func newZramVolume(dir string, size int64) *volume {
	n := strings.TrimSpace(string(must(os.ReadFile("/sys/class/zram-control/hot_add"))))
	v := &volume{dev: "/dev/zram" + n, zram: n, mnt: filepath.Join(dir, "mnt-zram"+n), rng: rand.New(rand.NewSource(1))}
	cleanups = append(cleanups, v.close)
	if err := os.WriteFile("/sys/block/zram"+n+"/disksize", []byte(fmt.Sprint(size)), 0); err != nil {
		fatal(err.Error())
	}
	v.mkfs()
	return v
}

func (v *volume) mkfs() {
	run("mkfs.ext4", "-q", v.dev)
	os.Mkdir(v.mnt, 0o755)
	run("mount", v.dev, v.mnt)
}

func (v *volume) close() {
	exec.Command("umount", v.mnt).Run()
	if v.zram != "" {
		for i := 0; i < 20 && os.WriteFile("/sys/class/zram-control/hot_remove", []byte(v.zram), 0) != nil; i++ {
			time.Sleep(100 * time.Millisecond)
		}
		return
	}
	exec.Command("losetup", "-d", v.dev).Run()
}

func must[T any](v T, err error) T {
	if err != nil {
		fatal(err.Error())
	}
	return v
}

// fill writes ~600 MB: 200 MB random, 200 MB log-like text, 100 MB zeros, ~100 MB binaries.
func (v *volume) fill() {
	for _, d := range []string{"random", "text", "zeros", "bin"} {
		os.MkdirAll(filepath.Join(v.mnt, d), 0o755)
	}
	buf := make([]byte, 10<<20)
	for i := 0; i < 20; i++ {
		v.rng.Read(buf)
		os.WriteFile(filepath.Join(v.mnt, "random", fmt.Sprint(i)), buf, 0o644)
	}
	words := strings.Fields("GET POST user order invoice payment shipped error warning info debug request latency cache miss hit session login logout")
	for i := 0; i < 20; i++ {
		var b bytes.Buffer
		for b.Len() < 10<<20 {
			fmt.Fprintf(&b, "2026-11-%02d %02d:%02d:%02d.%03d %s %s id=%d took=%dms\n", 1+i, v.rng.Intn(24), v.rng.Intn(60), v.rng.Intn(60), v.rng.Intn(1000),
				words[v.rng.Intn(len(words))], words[v.rng.Intn(len(words))], v.rng.Intn(1e6), v.rng.Intn(500))
		}
		os.WriteFile(filepath.Join(v.mnt, "text", fmt.Sprint(i)), b.Bytes(), 0o644)
	}
	zero := make([]byte, 10<<20)
	for i := 0; i < 10; i++ {
		os.WriteFile(filepath.Join(v.mnt, "zeros", fmt.Sprint(i)), zero, 0o644)
	}
	var total int64
	entries, _ := os.ReadDir("/usr/bin")
	for _, e := range entries {
		if total > 100<<20 {
			break
		}
		b, err := os.ReadFile(filepath.Join("/usr/bin", e.Name()))
		if err != nil || !e.Type().IsRegular() {
			continue
		}
		os.WriteFile(filepath.Join(v.mnt, "bin", e.Name()), b, 0o755)
		total += int64(len(b))
	}
	run("sync")
	fmt.Fprintf(os.Stderr, "bench volume: %s on %s, %s used\n", mb(*volSize), v.dev, strings.TrimSpace(run("sh", "-c", "df --output=used -B1M "+v.mnt+" | tail -1"))+" MiB")
}

// change writes n bytes of new data: overwriting parts of existing files and a new file.
func (v *volume) change(n int64) {
	buf := make([]byte, 1<<20)
	for i := int64(0); i < n/2; i += int64(len(buf)) {
		v.rng.Read(buf)
		f, _ := os.OpenFile(filepath.Join(v.mnt, "random", fmt.Sprint(v.rng.Intn(20))), os.O_WRONLY, 0)
		f.WriteAt(buf, v.rng.Int63n(9<<20))
		f.Close()
	}
	big := make([]byte, n/2)
	v.rng.Read(big)
	os.WriteFile(filepath.Join(v.mnt, "new-file"), big, 0o644)
	run("sync")
}

// scatter overwrites count random 4 KiB blocks inside existing text files.
func (v *volume) scatter(count int, _ int64) {
	buf := make([]byte, 4096)
	for i := 0; i < count; i++ {
		v.rng.Read(buf)
		f, _ := os.OpenFile(filepath.Join(v.mnt, "text", fmt.Sprint(v.rng.Intn(20))), os.O_WRONLY, 0)
		f.WriteAt(buf, v.rng.Int63n((10<<20)/4096)*4096)
		f.Close()
	}
	run("sync")
}

func timeIt(fn func()) time.Duration {
	run("sync")
	os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
	start := time.Now()
	fn()
	return time.Since(start)
}

// lastCPU is the CPU time (user + system) of the last command run.
var lastCPU time.Duration

func run(name string, args ...string) string {
	cmd := exec.Command(name, args...)
	out, err := cmd.Output()
	if cmd.ProcessState != nil {
		lastCPU = cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	}
	if err != nil {
		msg := ""
		if ee, ok := err.(*exec.ExitError); ok {
			msg = string(ee.Stderr)
		}
		fatal(fmt.Sprintf("%s %s: %v %s", name, strings.Join(args, " "), err, msg))
	}
	return string(out)
}

func shell(cmd string) { run("sh", "-c", cmd) }

func has(name string) bool { _, err := exec.LookPath(name); return err == nil }

func du(dir string) int64 {
	var n int64
	filepath.Walk(dir, func(_ string, info os.FileInfo, err error) error {
		if err == nil && info.Mode().IsRegular() {
			n += info.Size()
		}
		return nil
	})
	return n
}

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func ratio(a, b time.Duration) float64 { return a.Seconds() / b.Seconds() }

func mb(n int64) string { return fmt.Sprintf("%.0f MiB", float64(n)/(1<<20)) }

// cleanups run on fatal errors too, so a failed bench leaves no loop device or mount.
var cleanups []func()

func fatal(msg string) {
	fmt.Fprintln(os.Stderr, "bench:", msg)
	for i := len(cleanups) - 1; i >= 0; i-- {
		cleanups[i]()
	}
	os.Exit(1)
}

// freezeBenches measures freeze windows of tracked snapshots of 2 and 8 GiB volumes under
// a writer.
func freezeBenches(dir string, add func(string, time.Duration, string)) {
	for _, size := range []int64{2 << 30, 8 << 30} {
		med, worst, runs := freezeWindows(dir, size, 8)
		add(fmt.Sprintf("freeze window, %d GiB volume, writer at ~20 MB/s (7 tracked snapshots)", size>>30), med,
			fmt.Sprintf("median %.1f ms, max %.1f ms; all %v", agent.Millis(med), agent.Millis(worst), runs))
	}
}

// fullVsDD times full snapshots into a new repository at repo against dd reading the whole
// device: three of each, alternating (disk throughput here varies from run to run: both see
// the same disk, and medians are compared), with the default codec and with
// --compression fast. It returns the median dd and snapshot times of the default codec's
// series and what its snapshot stored.
func fullVsDD(v *volume, repo string, add func(string, time.Duration, string)) (dd, t time.Duration, stored int64) {
	series := func(compression string) (dd, t time.Duration, full snapResult) {
		var dds, fulls, fullCPU []time.Duration
		for i := 0; i < 3; i++ {
			dds = append(dds, timeIt(func() { run("dd", "if="+v.dev, "of=/dev/null", "bs=4M", "iflag=direct") }))
			os.RemoveAll(repo)
			run(*stasis, "init", "-r", repo, "--compression", compression)
			fulls = append(fulls, timeIt(func() { full = snapshot(repo, v.dev, "full") }))
			fullCPU = append(fullCPU, lastCPU)
		}
		dd, t = median(dds), median(fulls)
		what := "stasis full snapshot, median of 3"
		if compression != "zstd" {
			what = "  the same with --compression " + compression
		} else {
			add("dd read of the device (bs=4M, O_DIRECT), median of 3", dd, fmt.Sprint(dds))
		}
		add(what, t, fmt.Sprintf("%.2f× dd; read %s, repository %s; runs %v; CPU %.2f s per GiB stored, %.2f s per GiB read",
			ratio(t, dd), mb(full.BytesRead), mb(du(repo)), fulls, median(fullCPU).Seconds()/(float64(full.NewBytes)/(1<<30)), median(fullCPU).Seconds()/(float64(full.BytesRead)/(1<<30))))
		return dd, t, full
	}
	dd, t, full := series("zstd")
	series("fast")
	// Leave the default codec's full snapshot in repo: the incrementals that follow build on it.
	os.RemoveAll(repo)
	run(*stasis, "init", "-r", repo)
	snapshot(repo, v.dev, "full")
	return dd, t, full.NewBytes
}

package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/stasis-project/stasis/agent"
	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/local"
	"github.com/stasis-project/stasis/chain/s3"
)

// baseline is what the main run measured, for the ratios below.
type baseline struct {
	dd, full, resticFull, tracked, resticInc, export time.Duration
	repo                                             string // the unencrypted repository: vol/full, vol/after-20MiB
}

const benchPassword = "stasis bench passphrase"

// s3Server is versitygw serving a directory on loopback for the benchmark.
type s3Server struct {
	endpoint, dir string
	cmd           *exec.Cmd
}

const s3Access, s3Secret = "stasisbench", "stasis-bench-secret"

func startS3(dir string) *s3Server {
	bin, err := exec.LookPath("versitygw")
	if err != nil {
		gopath := strings.TrimSpace(run("go", "env", "GOPATH"))
		bin = filepath.Join(gopath, "bin", "versitygw")
		if _, err := os.Stat(bin); err != nil {
			return nil
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fatal(err.Error())
	}
	addr := l.Addr().String()
	l.Close()
	s := &s3Server{endpoint: addr, dir: filepath.Join(dir, "s3")}
	os.MkdirAll(filepath.Join(s.dir, "bench"), 0o755)
	s.cmd = exec.Command(bin, "--access", s3Access, "--secret", s3Secret, "--port", addr, "posix", s.dir)
	if err := s.cmd.Start(); err != nil {
		fatal(err.Error())
	}
	cleanups = append(cleanups, s.stop)
	for i := 0; i < 200; i++ {
		if resp, err := http.Get("http://" + addr + "/"); err == nil {
			resp.Body.Close()
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	os.Setenv("AWS_ACCESS_KEY_ID", s3Access)
	os.Setenv("AWS_SECRET_ACCESS_KEY", s3Secret)
	return s
}

func (s *s3Server) stop() {
	if s.cmd.Process != nil {
		s.cmd.Process.Kill()
		s.cmd.Wait()
	}
}

func (s *s3Server) location(prefix string) string {
	return fmt.Sprintf("s3:http://%s/bench/%s", s.endpoint, prefix)
}

// openRepoAt opens (creating) a repository at a directory or s3: location, encrypted with
// the bench passphrase if encrypted, as the agent does.
func openRepoAt(loc, cache string, encrypted bool) (*chain.Repository, func()) {
	ctx := context.Background()
	var be chain.Backend
	var err error
	if strings.HasPrefix(loc, "s3:") {
		cfg, perr := s3.ParseLocation(loc)
		if perr != nil {
			fatal(perr.Error())
		}
		cfg.AccessKey, cfg.SecretKey = s3Access, s3Secret
		if *traceS3 {
			cfg.Transport = tracer{http.DefaultTransport}
		}
		be, err = s3.Open(ctx, cfg)
	} else if _, serr := os.Stat(filepath.Join(loc, "config")); serr != nil {
		be, err = local.Create(loc)
	} else {
		be, err = local.Open(loc)
	}
	if err != nil {
		fatal(err.Error())
	}
	if _, err := be.Stat(ctx, chain.Handle{Type: chain.ConfigFile}); err != nil {
		opts := chain.InitOptions{}
		if encrypted {
			opts.Password, opts.KDF = []byte(benchPassword), chain.TuneKDF(500*time.Millisecond)
		}
		if _, err := chain.Init(ctx, be, opts); err != nil {
			fatal(err.Error())
		}
	}
	r, err := chain.Open(ctx, be, chain.Options{CacheDir: cache, Password: func() ([]byte, error) { return []byte(benchPassword), nil }})
	if err != nil {
		fatal(err.Error())
	}
	return r, func() { r.Close() }
}

// trackedAt times a tracked incremental after 20 MiB of changes into the repository at loc.
func trackedAt(dir, loc string, encrypted bool, v *volume) (time.Duration, *agent.Outcome) {
	r, done := openRepoAt(loc, filepath.Join(dir, "cache"), encrypted)
	defer done()
	vol := newTrackedVolume(v.mnt)
	defer vol.Close()
	if _, err := vol.Snapshot(context.Background(), r, agent.Request{Name: "base"}); err != nil {
		fatal(err.Error())
	}
	v.change(20 << 20)
	var out *agent.Outcome
	t := timeIt(func() {
		traceStart.Store(time.Now().UnixNano())
		var err error
		if out, err = vol.Snapshot(context.Background(), r, agent.Request{Name: "tracked"}); err != nil {
			fatal(err.Error())
		}
	})
	return t, out
}

// viewRead times a cold sequential read of a snapshot's raw image through `stasis mount`.
func viewRead(dir, repo, ref string, env ...string) time.Duration {
	mnt := filepath.Join(dir, "view-"+fmt.Sprint(time.Now().UnixNano()))
	os.MkdirAll(mnt, 0o755)
	cmd := exec.Command(*stasis, "mount", "-r", repo, mnt)
	cmd.Env = append(os.Environ(), env...)
	if err := cmd.Start(); err != nil {
		fatal(err.Error())
	}
	defer func() { exec.Command("fusermount3", "-u", mnt).Run(); cmd.Wait() }()
	img := filepath.Join(mnt, strings.ReplaceAll(ref, "/", "/")+".img")
	for i := 0; i < 400; i++ {
		if _, err := os.Stat(img); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
	return timeIt(func() { run("dd", "if="+img, "of=/dev/null", "bs=1M") })
}

func mbps(bytes int64, d time.Duration) string {
	return fmt.Sprintf("%.0f MB/s", float64(bytes)/1e6/d.Seconds())
}

// encryptionBench compares an encrypted local repository with the unencrypted one of the
// main run: full snapshot, tracked incremental, export, the view's sequential read.
func encryptionBench(dir string, v *volume, b baseline, add func(string, time.Duration, string)) {
	env := []string{"STASIS_PASSWORD=" + benchPassword}
	repo := filepath.Join(dir, "encrypted-repo")
	var fulls []time.Duration
	for i := 0; i < 3; i++ {
		os.RemoveAll(repo)
		cmd := exec.Command(*stasis, "init", "--encryption", "-r", repo)
		cmd.Env = append(os.Environ(), env...)
		if out, err := cmd.CombinedOutput(); err != nil {
			fatal(string(out))
		}
		fulls = append(fulls, timeIt(func() { snapshotEnv(env, repo, v.dev, "full") }))
	}
	// Each command that opens an encrypted repository first stretches the passphrase
	// (Argon2id, tuned to ~0.5 s): once per process, so the agent pays it at start only.
	var encOpen, plainOpen []time.Duration
	for i := 0; i < 3; i++ {
		encOpen = append(encOpen, timeIt(func() { runEnv(env, *stasis, "list", "-r", repo) }))
		plainOpen = append(plainOpen, timeIt(func() { run(*stasis, "list", "-r", b.repo) }))
	}
	kdf := median(encOpen) - median(plainOpen)
	add("encrypted: opening the repository (passphrase stretching, once per process)", kdf, fmt.Sprintf("list takes %v encrypted, %v unencrypted", median(encOpen), median(plainOpen)))
	t := median(fulls)
	add("encrypted: stasis full snapshot, median of 3", t, fmt.Sprintf("%.2f× the unencrypted full (%.3f s); without the one-time opening %.2f×; repository %s; runs %v",
		ratio(t, b.full), b.full.Seconds(), ratio(t-kdf, b.full), mb(du(repo)), fulls))
	tt, out := trackedAt(dir, filepath.Join(dir, "encrypted-tracked"), true, v)
	add("encrypted: tracked incremental after 20 MiB changed", tt, fmt.Sprintf("%.2f× the unencrypted one (%.3f s); read %s, freeze %.1f ms",
		ratio(tt, b.tracked), b.tracked.Seconds(), mb(out.Capture.BytesRead), agent.Millis(out.Capture.Freeze)))
	// Exports alternate, three of each, so that both see the same disk.
	img := filepath.Join(dir, "encrypted-export.img")
	var plainEx, encEx []time.Duration
	for i := 0; i < 3; i++ {
		plainEx = append(plainEx, timeIt(func() { run(*stasis, "export", "-r", b.repo, "vol/full", img) }))
		os.Remove(img)
		encEx = append(encEx, timeIt(func() { runEnv(env, *stasis, "export", "-r", repo, "vol/full", img) }))
		os.Remove(img)
	}
	pe, t := median(plainEx), median(encEx)
	add("encrypted: stasis export, median of 3 (alternating with unencrypted ones)", t, fmt.Sprintf("%.2f× the unencrypted export (%.3f s); without the one-time opening %.2f×; runs %v vs %v",
		ratio(t, pe), pe.Seconds(), ratio(t-kdf, pe), encEx, plainEx))
	// copy between encrypted repositories: with other keys every chunk is re-hashed and
	// re-sealed; with the same keys (init --copy-keys-from) IDs match.
	pw := passwordFileFor(dir)
	copyEnv := append(env, "STASIS_TO_PASSWORD_FILE="+pw, "STASIS_FROM_PASSWORD_FILE="+pw)
	other, same := filepath.Join(dir, "copy-other-keys"), filepath.Join(dir, "copy-same-keys")
	runEnv(copyEnv, *stasis, "init", "--encryption", "-r", other)
	runEnv(copyEnv, *stasis, "init", "-r", same, "--copy-keys-from", repo)
	t = timeIt(func() { runEnv(copyEnv, *stasis, "copy", "--from", repo, "--to", other, "vol/full") })
	add("encrypted: stasis copy of the full snapshot to a repository with other keys", t, "")
	t = timeIt(func() { runEnv(copyEnv, *stasis, "copy", "--from", repo, "--to", same, "vol/full") })
	add("encrypted: the same copy to a repository made with --copy-keys-from", t, "")
	os.RemoveAll(other)
	os.RemoveAll(same)
	plain := viewRead(dir, b.repo, "vol/full")
	enc := viewRead(dir, repo, "vol/full", env...)
	add("view: sequential read of the raw image, cold, unencrypted", plain, mbps(*volSize, plain))
	add("view: the same, encrypted", enc, fmt.Sprintf("%s; %.2f× the unencrypted read", mbps(*volSize, enc), ratio(enc, plain)))
}

// s3Bench measures snapshots straight into S3 (versitygw on loopback), copy local → S3,
// restore and the view from S3, against restic to the same server.
func s3Bench(dir string, v *volume, b baseline, add func(string, time.Duration, string)) {
	srv := startS3(dir)
	if srv == nil {
		add("S3 benchmarks skipped: versitygw not installed (packaging/scripts/install-deps.sh --bench)", 0, "")
		return
	}
	defer srv.stop()
	env := []string{"STASIS_PASSWORD=" + benchPassword, "STASIS_CACHE_DIR=" + filepath.Join(dir, "s3-cache")}
	loc := srv.location("stasis")
	runEnv(env, *stasis, "init", "--encryption", "-r", loc)
	t := timeIt(func() { snapshotEnv(env, loc, v.dev, "full") })
	add("S3 (encrypted): stasis full snapshot", t, fmt.Sprintf("%.2f× dd; %.2f× the local full", ratio(t, b.dd), ratio(t, b.full)))
	s3full := t
	resticFull, resticInc := resticS3(srv, v)
	if resticFull > 0 {
		add("S3: restic backup --stdin, full", resticFull, fmt.Sprintf("stasis is %.1f× faster (goal 3×)", ratio(resticFull, s3full)))
		add("S3: restic after 20 MiB changed", resticInc, "")
	}
	s3Tracked(dir, srv, v, resticInc, add)

	// copy: the main run's local chain (full, after-20MiB) into a new S3 repository with
	// other keys, then the incremental second copy alone.
	cloc := srv.location("copy")
	runEnv(env, *stasis, "init", "--encryption", "-r", cloc)
	toEnv := append(env, "STASIS_TO_PASSWORD_FILE="+passwordFileFor(dir))
	t = timeIt(func() { runEnv(toEnv, *stasis, "copy", "-r", b.repo, "--to", cloc, "vol/full") })
	add("stasis copy local → S3 of the full snapshot", t, fmt.Sprintf("%.2f× the local full snapshot", ratio(t, b.full)))
	t = timeIt(func() { runEnv(toEnv, *stasis, "copy", "-r", b.repo, "--to", cloc, "vol/after-20MiB") })
	add("stasis copy local → S3 of the next snapshot (incremental)", t, "reads only the chunks that changed")

	img := filepath.Join(dir, "s3-export.img")
	t = timeIt(func() { runEnv(env, *stasis, "export", "-r", loc, "vol/full", img) })
	os.Remove(img)
	add("S3: stasis export (restore to a file)", t, mbps(*volSize, t))
	t = viewRead(dir, loc, "vol/full", env...)
	add("S3: the view's sequential read of the raw image, cold", t, mbps(*volSize, t))
}

// passwordFileFor writes the bench passphrase to a root-only file, for --to-password-file.
func passwordFileFor(dir string) string {
	p := filepath.Join(dir, "bench.pass")
	if err := os.WriteFile(p, []byte(benchPassword+"\n"), 0o600); err != nil {
		fatal(err.Error())
	}
	return p
}

func snapshotEnv(env []string, repo, dev, name string) {
	runEnv(env, *stasis, "snapshot", "-r", repo, "--source", dev, "--volume", "vol", "--name", name)
}

func runEnv(env []string, name string, args ...string) string {
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		fatal(fmt.Sprintf("%s %v: %v\n%s", name, args, err, out))
	}
	return string(out)
}

// resticS3 times restic's full backup of the volume (--stdin) into the S3 server, and its
// next backup after 20 MiB of changes; zero without restic.
func resticS3(srv *s3Server, v *volume) (full, inc time.Duration) {
	if !has("restic") {
		return 0, 0
	}
	rloc := fmt.Sprintf("s3:http://%s/bench/restic-%d", srv.endpoint, time.Now().UnixNano())
	os.Setenv("RESTIC_PASSWORD", "bench")
	run("restic", "init", "-q", "-r", rloc)
	backup := func() { shell(fmt.Sprintf("restic backup -q -r %s --stdin --stdin-filename vol < %s", rloc, v.dev)) }
	full = timeIt(backup)
	v.change(20 << 20)
	return full, timeIt(backup)
}

// s3Tracked times three tracked incrementals into S3, each in a chain of its own after a
// full snapshot and 20 MiB of changes, and compares their median with restic's incremental.
func s3Tracked(dir string, srv *s3Server, v *volume, resticInc time.Duration, add func(string, time.Duration, string)) {
	var runs []time.Duration
	var out *agent.Outcome
	for i := 0; i < 3; i++ {
		var tt time.Duration
		tt, out = trackedAt(dir, srv.location(fmt.Sprint("tracked-", i)), true, v)
		runs = append(runs, tt)
	}
	tt := median(runs)
	note := fmt.Sprintf("read %s, freeze %.1f ms; runs %v", mb(out.Capture.BytesRead), agent.Millis(out.Capture.Freeze), runs)
	if resticInc > 0 {
		note += fmt.Sprintf("; restic's incremental %.2f s: %.0f× faster (goal 20×)", resticInc.Seconds(), ratio(resticInc, tt))
	}
	add("S3 (encrypted): tracked incremental after 20 MiB changed, median of 3", tt, note)
}

// traceStart is when the timed operation began, for -trace's offsets.
var traceStart atomic.Int64

// tracer prints each S3 request: start offset from traceStart, method, path, body size,
// duration.
type tracer struct{ next http.RoundTripper }

func (t tracer) RoundTrip(req *http.Request) (*http.Response, error) {
	start := time.Now()
	resp, err := t.next.RoundTrip(req)
	fmt.Fprintf(os.Stderr, "s3 %7.1f ms %-6s %-60.60s %9d %6.1f ms\n", float64(start.UnixNano()-traceStart.Load())/1e6,
		req.Method, req.URL.Path+"?"+req.URL.RawQuery, req.ContentLength, float64(time.Since(start).Microseconds())/1e3)
	return resp, err
}

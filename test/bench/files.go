package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// filesBench measures the file tools on the bench volume's two snapshots, 20 MiB of
// changes apart (vol/full and vol/after-20MiB, the live filesystem being the second):
// stasis diff against diff -rq of the two snapshot folders through the view and against
// restic diff of file-level backups of the same two states; stasis restore of the 200 MB
// random/ directory against cp -a from the view and restic restore --include.
func filesBench(dir string, v *volume, repo string, add func(string, time.Duration, string)) {
	var res struct {
		Stats struct {
			Added, Removed, Modified int
			Metadata                 int `json:"metadata_only"`
		}
	}
	// The bench's own writes (the fill, the volume's backing file) are flushed first:
	// every flush measured below (syncfs, sync -f) would otherwise wait on them too.
	run("sync")

	// restic, file by file: the first state from the exported image, the second live, both
	// at one path so restic compares like with like.
	haveRestic := has("restic")
	resticRepo := filepath.Join(dir, "restic-files")
	at := filepath.Join(dir, "state")
	var ids []string
	if haveRestic {
		os.Setenv("RESTIC_PASSWORD", "bench")
		run("restic", "init", "-q", "-r", resticRepo)
		img := filepath.Join(dir, "state1.img")
		run(*stasis, "export", "-r", repo, "vol/full", img)
		os.MkdirAll(at, 0o755)
		for i, src := range []string{img, v.mnt} {
			if i == 0 {
				run("mount", "-o", "ro,loop,noload", src, at)
			} else {
				run("mount", "--bind", src, at)
			}
			out := run("restic", "backup", "-q", "--json", "-r", resticRepo, at)
			run("umount", at)
			for _, l := range strings.Split(out, "\n") {
				var m struct {
					MessageType string `json:"message_type"`
					SnapshotID  string `json:"snapshot_id"`
				}
				if json.Unmarshal([]byte(l), &m) == nil && m.MessageType == "summary" {
					ids = append(ids, m.SnapshotID)
				}
			}
		}
		os.Remove(img)
	}

	// stasis diff and restic diff, three of each, alternating: the host's disk and CPU
	// drift over a run, and the volume's own writeback settles after the snapshots.
	var out string
	var diffs, rdiffs []time.Duration
	for i := 0; i < 3; i++ {
		diffs = append(diffs, timeIt(func() { out = run(*stasis, "diff", "--json", "-r", repo, "vol/full", "vol/after-20MiB") }))
		if len(ids) == 2 {
			rdiffs = append(rdiffs, timeIt(func() { run("restic", "diff", "-r", resticRepo, ids[0], ids[1]) }))
		}
	}
	diff := median(diffs)
	json.Unmarshal([]byte(out), &res)
	s := res.Stats
	fuseDir := filepath.Join(dir, "files-view")
	stop := serveView(repo, fuseDir, "vol")
	viewDiff := timeIt(func() {
		runAllowFail("diff", "-rq", filepath.Join(fuseDir, "vol", "full"), filepath.Join(fuseDir, "vol", "after-20MiB"))
	})
	stop()
	add("stasis diff of the two snapshots 20 MiB apart, median of 3", diff, fmt.Sprintf("%d added, %d removed, %d modified, %d metadata; %.1f× faster than diff -rq through the view; runs %v",
		s.Added, s.Removed, s.Modified, s.Metadata, ratio(viewDiff, diff), diffs))
	add("  diff -rq of the two snapshot folders through the view, cold", viewDiff, "")
	if len(rdiffs) > 0 {
		rt := median(rdiffs)
		add("  restic diff of file-level backups of the same two states, median of 3", rt, fmt.Sprintf("stasis is %.1f× faster; runs %v", ratio(rt, diff), rdiffs))
	}

	// Restore of the 200 MB random/ directory against cp -a from the view (each cold, the
	// view mounted afresh), three of each, alternating: the disk's speed drifts.
	target := filepath.Join(dir, "restored")
	// Each run starts on a settled filesystem: the previous run's files removed and that
	// removal committed (with -o discard, its discards), so no run flushes another's work.
	fresh := func() string {
		os.RemoveAll(target)
		os.MkdirAll(target, 0o755)
		run("sync", "-f", target)
		return target
	}
	src := filepath.Join(fuseDir, "vol", "after-20MiB", "random")
	var rss, noFlushes, cps, cpSyncs, floors []time.Duration
	for i := 0; i < 3; i++ {
		fresh()
		rss = append(rss, timeIt(func() { run(*stasis, "restore", "-r", repo, "vol/after-20MiB:/random", "--to", target) }))
		fresh()
		noFlushes = append(noFlushes, timeIt(func() {
			run(*stasis, "restore", "-r", repo, "vol/after-20MiB:/random", "--to", target, "--no-flush")
		}))
		stop = serveView(repo, fuseDir, "vol")
		fresh()
		cps = append(cps, timeIt(func() { run("cp", "-a", src, target) }))
		stop()
		stop = serveView(repo, fuseDir, "vol")
		fresh()
		cpSyncs = append(cpSyncs, timeIt(func() {
			run("cp", "-a", src, target)
			run("sync", "-f", target)
		}))
		stop()
		// The floor of a flushed restore: writing the same 200 MB (20 files of 10 MB) from
		// memory and flushing them, with no reading or checking at all.
		fresh()
		floors = append(floors, timeIt(func() {
			for f := 0; f < 20; f++ {
				run("dd", "if=/dev/zero", "of="+filepath.Join(target, fmt.Sprint(f)), "bs=1M", "count=10", "status=none")
			}
			run("sync", "-f", target)
		}))
	}
	rs, noFlush, cp, cpSync, floor := median(rss), median(noFlushes), median(cps), median(cpSyncs), median(floors)
	add("stasis restore of the 200 MB random/ directory, cold (flushed to disk), median of 3", rs, fmt.Sprintf("%.2f× the time of cp -a from the view, %.2f× cp -a + sync; runs %v", ratio(rs, cp), ratio(rs, cpSync), rss))
	add("  the same with --no-flush (not flushed, as cp), median of 3", noFlush, fmt.Sprintf("%.2f× the time of cp -a from the view; runs %v", ratio(noFlush, cp), noFlushes))
	add("  cp -a of the same directory from the view, cold, median of 3", cp, fmt.Sprintf("runs %v", cps))
	add("  cp -a from the view, then sync -f, cold, median of 3", cpSync, fmt.Sprintf("runs %v", cpSyncs))
	add("  writing 200 MB in 20 files from memory (dd), then sync -f: a flushed restore's floor", floor, fmt.Sprintf("stasis restore is %.2f× this; runs %v", ratio(rs, floor), floors))
	if len(ids) == 2 {
		fresh()
		rt := timeIt(func() {
			run("restic", "restore", "-q", "-r", resticRepo, ids[1], "--include", filepath.Join(at, "random"), "--target", target)
		})
		add("  restic restore --include of the same directory", rt, fmt.Sprintf("stasis is %.1f× faster", ratio(rt, rs)))
	}
	os.RemoveAll(target)
	os.RemoveAll(resticRepo)
}

// runAllowFail runs a command whose non-zero exit is an answer (diff), not a failure.
func runAllowFail(name string, args ...string) {
	exec.Command(name, args...).Run()
}

package chain_test

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/local"
)

// BenchmarkWriterPeakRSS measures a snapshot writer's peak RSS in a repository whose index
// names STASIS_BENCH_INDEX_ENTRIES chunks (default 50 million; the packs need not exist):
// writers look blobs up in index files on disk through small filters, so their memory must
// not grow with the repository (goal: under 300 MB at 50 M). The writer runs in a child
// process under time(1), so neither the benchmark's nor the generator's memory counts.
func BenchmarkWriterPeakRSS(b *testing.B) {
	n := 50_000_000
	if v, err := strconv.Atoi(os.Getenv("STASIS_BENCH_INDEX_ENTRIES")); err == nil && v > 0 {
		n = v
	}
	if _, err := os.Stat("/usr/bin/time"); err != nil {
		b.Skip("needs /usr/bin/time")
	}
	dir := b.TempDir()
	child := func(mode string, wrap ...string) (string, time.Duration) {
		args := append(wrap, os.Args[0], "-test.run=^TestRSSChild$", "-test.v")
		cmd := exec.Command(args[0], args[1:]...)
		cmd.Env = append(os.Environ(), "STASIS_RSS_CHILD="+mode, "STASIS_RSS_DIR="+dir, fmt.Sprintf("STASIS_RSS_N=%d", n))
		start := time.Now()
		out, err := cmd.CombinedOutput()
		if err != nil {
			b.Fatalf("%s: %v\n%s", mode, err, out)
		}
		return string(out), time.Since(start)
	}
	_, gen := child("generate")
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		rss := filepath.Join(dir, "rss")
		out, took := child("write", "/usr/bin/time", "-f", "%M", "-o", rss)
		rb, _ := os.ReadFile(rss)
		lines := strings.Split(strings.TrimSpace(string(rb)), "\n")
		kib, _ := strconv.ParseFloat(lines[len(lines)-1], 64)
		b.ReportMetric(kib/1024, "peak-RSS-MB")
		b.ReportMetric(float64(n), "index-entries")
		b.Logf("%d index entries (generated in %v); writer: %v, peak RSS %.0f MB\n%s", n, gen.Round(time.Second), took.Round(time.Millisecond), kib/1024, out)
	}
}

// TestRSSChild is BenchmarkWriterPeakRSS's child process; run alone it does nothing.
func TestRSSChild(t *testing.T) {
	mode, dir := os.Getenv("STASIS_RSS_CHILD"), os.Getenv("STASIS_RSS_DIR")
	if mode == "" {
		t.Skip("the child process of BenchmarkWriterPeakRSS")
	}
	n, _ := strconv.Atoi(os.Getenv("STASIS_RSS_N"))
	ctx := context.Background()
	repo := filepath.Join(dir, "repo")
	switch mode {
	case "generate":
		be, err := local.Create(repo)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := chain.Init(ctx, be, chain.InitOptions{}); err != nil {
			t.Fatal(err)
		}
		const perFile = 1_000_000
		for i := 0; i*perFile < n; i++ {
			h, data := chain.FakeIndexFile(min(perFile, n-i*perFile), int64(i))
			if err := be.Save(ctx, h, data); err != nil {
				t.Fatal(err)
			}
		}
	case "write":
		debug.SetMemoryLimit(192 << 20) // as cmd/stasis runs
		be, err := local.Open(repo)
		if err != nil {
			t.Fatal(err)
		}
		r, err := chain.Open(ctx, be, chain.Options{CacheDir: filepath.Join(dir, "cache")})
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		// 256 MiB of new, incompressible chunks: every one is looked up and stored.
		const size, chunk = 256 << 20, 64 << 10
		w, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "v", Size: size, ChunkSize: chunk})
		if err != nil {
			t.Fatal(err)
		}
		rng := rand.New(rand.NewSource(1))
		buf := make([]byte, chunk)
		start := time.Now()
		for i := int64(0); i < size/chunk; i++ {
			rng.Read(buf)
			if err := w.Put(ctx, i, buf); err != nil {
				t.Fatal(err)
			}
		}
		s, err := w.Commit(ctx, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("snapshot of 256 MiB stored %d bytes in %v (index cache filled on first use)", s.NewBytes, time.Since(start).Round(time.Millisecond))
	}
}

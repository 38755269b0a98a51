package s3_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"strings"
	"testing"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/backendtest"
	"github.com/stasis-project/stasis/chain/s3"
	"github.com/stasis-project/stasis/test/testenv"
)

func open(t *testing.T, srv *testenv.S3, endpoint, prefix string) *s3.Backend {
	t.Helper()
	cfg := s3.Config{Endpoint: endpoint, Insecure: true, Bucket: srv.Bucket, Prefix: prefix, AccessKey: srv.Access, SecretKey: srv.Secret}
	b, err := s3.Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestSuite runs the backend conformance suite against a real S3 server (versitygw).
func TestSuite(t *testing.T) {
	srv := testenv.StartS3(t)
	n := 0
	backendtest.Suite(t, func(t *testing.T) chain.Backend {
		n++
		return open(t, srv, srv.Endpoint, "suite"+string(rune('a'+n)))
	})
}

// TestErrors: wrong credentials, a missing bucket and a malformed location say what to do.
func TestErrors(t *testing.T) {
	srv := testenv.StartS3(t)
	ctx := context.Background()
	if _, err := s3.Open(ctx, s3.Config{Endpoint: srv.Endpoint, Insecure: true, Bucket: srv.Bucket, AccessKey: srv.Access, SecretKey: "wrong"}); err == nil || !strings.Contains(err.Error(), "refused the credentials") {
		t.Fatalf("wrong secret: %v", err)
	}
	if _, err := s3.Open(ctx, s3.Config{Endpoint: srv.Endpoint, Insecure: true, Bucket: "nope", AccessKey: srv.Access, SecretKey: srv.Secret}); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("missing bucket: %v", err)
	}
	if _, err := s3.Open(ctx, s3.Config{Endpoint: srv.Endpoint, Insecure: true, Bucket: srv.Bucket}); err == nil || !strings.Contains(err.Error(), "AWS_ACCESS_KEY_ID") {
		t.Fatalf("no credentials: %v", err)
	}
	for _, loc := range []string{"s3:ftp://x/b", "s3:https:///b", "s3:https://host/"} {
		if _, err := s3.ParseLocation(loc); err == nil {
			t.Errorf("%s accepted", loc)
		}
	}
	c, err := s3.ParseLocation("s3:https://s3.example.net:9000/backups/fleet/one")
	if err != nil || c.Endpoint != "s3.example.net:9000" || c.Bucket != "backups" || c.Prefix != "fleet/one" || c.Insecure {
		t.Fatalf("parse: %+v %v", c, err)
	}
	// s3://bucket/prefix takes its endpoint from the configuration, else AWS's; a location
	// with a host keeps its own.
	c, err = s3.ParseLocation("s3://backups/fleet")
	if err != nil || c.Endpoint != "" || c.Bucket != "backups" || c.Prefix != "fleet" {
		t.Fatalf("parse s3://: %+v %v", c, err)
	}
	if d, err := c.WithEndpoint(""); err != nil || d.Endpoint != "s3.amazonaws.com" || d.Insecure {
		t.Fatalf("default endpoint: %+v %v", d, err)
	}
	if d, err := c.WithEndpoint("http://127.0.0.1:7070"); err != nil || d.Endpoint != "127.0.0.1:7070" || !d.Insecure {
		t.Fatalf("configured endpoint: %+v %v", d, err)
	}
	if _, err := c.WithEndpoint("s3.example.net/path"); err == nil {
		t.Fatal("an endpoint without a scheme was accepted")
	}
	if _, err := s3.ParseLocation("s3://"); err == nil {
		t.Fatal("s3:// without a bucket was accepted")
	}
	if d, _ := s3.ParseLocation("s3:https://h.example/b/p"); func() bool { e, _ := d.WithEndpoint("http://other:1"); return e.Endpoint != "h.example" }() {
		t.Fatal("a location's own host was replaced")
	}
}

// TestRepositoryThroughFaults: an encrypted repository in the bucket, written and read
// through a proxy that fails a quarter of the requests (dropped connections, 500/503,
// stalls, truncated bodies): every operation either succeeds with every byte right or fails
// with an error, and what was committed reads back exactly.
func TestRepositoryThroughFaults(t *testing.T) {
	srv := testenv.StartS3(t)
	proxy := testenv.StartFaultProxy(t, srv.Endpoint, 0.25, 1)
	ctx := context.Background()
	be := open(t, srv, proxy.Addr, "faulty")
	if _, err := chain.Init(ctx, be, chain.InitOptions{Password: []byte("pw"), KDF: chain.TuneKDF(0)}); err != nil {
		t.Fatal(err)
	}
	r, err := chain.Open(ctx, be, chain.Options{Password: func() ([]byte, error) { return []byte("pw"), nil }, CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(9))
	want := map[string][]byte{}
	for i := 0; i < 4; i++ {
		data := make([]byte, 3<<20)
		rng.Read(data[:1<<20])
		copy(data[1<<20:], bytes.Repeat([]byte("text "), 200000))
		w, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "v", Name: string(rune('a' + i)), Size: int64(len(data)), ChunkSize: 64 << 10})
		if err != nil {
			t.Fatal(err)
		}
		for c := 0; c < len(data)/(64<<10); c++ {
			if err := w.Put(ctx, int64(c), data[c*64<<10:(c+1)*64<<10]); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := w.Commit(ctx, nil, nil); err != nil {
			t.Fatal(err)
		}
		want[string(rune('a'+i))] = data
	}
	snaps, _, err := r.Snapshots(ctx)
	if err != nil || len(snaps) != 4 {
		t.Fatalf("%d snapshots, %v", len(snaps), err)
	}
	for _, s := range snaps {
		got := make([]byte, s.SizeBytes)
		if _, err := r.SnapshotReader(s).ReadAt(ctx, got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want[s.Name]) {
			t.Fatalf("%s reads back different bytes", s.Name)
		}
	}
	if proxy.Faults.Load() < 10 {
		t.Fatalf("only %d of %d requests failed: the test proved little", proxy.Faults.Load(), proxy.Total.Load())
	}
	t.Logf("%d of %d requests failed on purpose", proxy.Faults.Load(), proxy.Total.Load())
	proxy.SetRate(0)
	if rep, err := r.Verify(ctx, true, nil); err != nil || !rep.OK() {
		t.Fatalf("verify: %v %v", err, rep.Problems)
	}
}

// TestCorruptedUploadRefused: a byte flipped in transit in an upload is caught by the
// request's payload checksum (SigV4's signed SHA-256 over HTTP; TLS over HTTPS), so the
// server never stores it: Save fails, and nothing, or only the right bytes, is there.
func TestCorruptedUploadRefused(t *testing.T) {
	srv := testenv.StartS3(t)
	proxy := testenv.StartFaultProxy(t, srv.Endpoint, 0, 1)
	proxy.CorruptUploads(true)
	ctx := context.Background()
	through := open(t, srv, proxy.Addr, "corrupt")
	direct := open(t, srv, srv.Endpoint, "corrupt")
	for _, size := range []int{100, 1 << 20, 20 << 20} {
		data := make([]byte, size)
		rand.New(rand.NewSource(int64(size))).Read(data)
		h := chain.Handle{Type: chain.PackFile, Name: fmt.Sprintf("%064x", size)}
		if err := through.Save(ctx, h, data); err == nil {
			t.Fatalf("%d bytes: an upload corrupted in transit was accepted", size)
		}
		got, err := direct.ReadAll(ctx, h)
		if err == nil && !bytes.Equal(got, data) {
			t.Fatalf("%d bytes: the server stored the corrupted upload", size)
		}
	}
	if proxy.Faults.Load() == 0 {
		t.Fatal("the proxy corrupted nothing")
	}
}

package testenv

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// S3 is an S3-compatible server the test started: versitygw serving a directory, on a
// loopback port, with one bucket. It is stopped, and its directory removed, at cleanup.
type S3 struct {
	Endpoint       string // host:port
	Access, Secret string
	Bucket         string
	Dir            string // the served directory; the bucket is a folder in it
	cmd            *exec.Cmd
	log            string
}

// VersitygwPath finds the versitygw binary (installed by .ci/run with go install).
func VersitygwPath(t testing.TB) string {
	t.Helper()
	if p, err := exec.LookPath("versitygw"); err == nil {
		return p
	}
	for _, dir := range []string{os.Getenv("GOBIN"), filepath.Join(os.Getenv("HOME"), "go", "bin"), "/root/go/bin"} {
		if p := filepath.Join(dir, "versitygw"); dir != "" {
			if _, err := os.Stat(p); err == nil {
				return p
			}
		}
	}
	t.Skip("needs versitygw (installed by .ci/run: go install github.com/versity/versitygw/cmd/versitygw@v1.8.0)")
	return ""
}

// StartS3 starts versitygw with a bucket named "stasis".
func StartS3(t testing.TB) *S3 {
	t.Helper()
	bin := VersitygwPath(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	dir := t.TempDir()
	s := &S3{Endpoint: addr, Access: "stasistest", Secret: "stasis-test-secret-key", Bucket: "stasis", Dir: filepath.Join(dir, "data"), log: filepath.Join(dir, "versitygw.log")}
	if err := os.MkdirAll(filepath.Join(s.Dir, s.Bucket), 0o755); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(s.log)
	if err != nil {
		t.Fatal(err)
	}
	s.cmd = exec.Command(bin, "--access", s.Access, "--secret", s.Secret, "--port", addr, "posix", s.Dir)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { s.cmd.Wait(); logf.Close(); close(done) }()
	t.Cleanup(func() {
		s.cmd.Process.Kill()
		<-done
	})
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if resp, err := http.Get("http://" + addr + "/"); err == nil {
			resp.Body.Close()
			return s
		}
		select {
		case <-done:
			b, _ := os.ReadFile(s.log)
			t.Fatalf("versitygw exited:\n%s", b)
		default:
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(s.log)
			t.Fatalf("versitygw did not start:\n%s", b)
		}
	}
}

// Location is an s3: repository location in the bucket, under prefix.
func (s *S3) Location(prefix string) string {
	return fmt.Sprintf("s3:http://%s/%s/%s", s.Endpoint, s.Bucket, prefix)
}

// Env is the environment the stasis binary needs to reach the server.
func (s *S3) Env() []string {
	return []string{"AWS_ACCESS_KEY_ID=" + s.Access, "AWS_SECRET_ACCESS_KEY=" + s.Secret}
}

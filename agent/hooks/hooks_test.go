package hooks

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func script(t *testing.T, body string) string {
	p := filepath.Join(t.TempDir(), "hook")
	os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o755)
	return p
}

func TestHooks(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	ctx := context.Background()
	ok := script(t, `echo "flushing caches for $STASIS_VOLUME in $STASIS_PHASE"`)
	if err := Run(ctx, "pre", []string{ok}, 5*time.Second, []string{"STASIS_VOLUME=db"}, log); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), "flushing caches for db in pre") {
		t.Fatalf("hook output not logged: %s", buf.String())
	}
	fail := script(t, "echo broken >&2; exit 3")
	after := filepath.Join(t.TempDir(), "ran")
	second := script(t, "touch "+after)
	err := Run(ctx, "pre", []string{fail, second}, 5*time.Second, nil, log)
	if err == nil || !strings.Contains(err.Error(), "exit status 3") {
		t.Fatalf("failing hook: %v", err)
	}
	if _, err := os.Stat(after); err == nil {
		t.Fatal("a hook after a failed one ran")
	}
	if !strings.Contains(buf.String(), "broken") {
		t.Fatal("stderr of a hook not logged")
	}
	hang := script(t, "sleep 60 & sleep 60")
	start := time.Now()
	err = Run(ctx, "pre", []string{hang}, 300*time.Millisecond, nil, log)
	if err == nil || !strings.Contains(err.Error(), "was killed") || time.Since(start) > 5*time.Second {
		t.Fatalf("hanging hook: %v after %v", err, time.Since(start))
	}
	if err := Run(ctx, "pre", []string{"/does/not/exist"}, time.Second, nil, log); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Fatalf("missing hook: %v", err)
	}
}

// TestHookTrustAndEnvironment: a hook others could change is refused before it runs; a hook
// sees a minimal environment, not the agent's.
func TestHookTrustAndEnvironment(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	ran := filepath.Join(t.TempDir(), "ran")
	h := script(t, "touch "+ran)
	os.Chmod(h, 0o777)
	err := Run(context.Background(), "pre", []string{h}, time.Second, nil, log)
	if err == nil || !strings.Contains(err.Error(), "writable by others") {
		t.Fatalf("a world-writable hook: %v", err)
	}
	if _, err := os.Stat(ran); err == nil {
		t.Fatal("the refused hook ran")
	}
	t.Setenv("AGENT_SECRET", "s3cret")
	env := script(t, `echo "env: $(env | sort | tr '\n' ' ')"`)
	if err := Run(context.Background(), "post", []string{env}, 5*time.Second, []string{"STASIS_VOLUME=db"}, log); err != nil {
		t.Fatal(err)
	}
	if out := buf.String(); strings.Contains(out, "s3cret") || !strings.Contains(out, "STASIS_VOLUME=db") || !strings.Contains(out, "PATH=/usr/local/sbin") {
		t.Fatalf("hook environment: %s", out)
	}
}

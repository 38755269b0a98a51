package doctor

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stasis-project/stasis/chain/capture"
	"github.com/stasis-project/stasis/config"
)

// The checks that cannot be provoked on the test machine (no device-mapper or md, no
// unfreezable block filesystem, plenty of memory) are tested through their seams here; the
// others run for real in test/e2e/doctor_test.go.

func TestDoctorUnfreezableFilesystem(t *testing.T) {
	f := filesystemFinding(capture.Mount{Point: "/data", FSType: "vfat"})
	if f.Severity != SevWarning || !strings.Contains(f.Message, "cannot be frozen") || f.Fix == "" {
		t.Fatalf("vfat: %+v", f)
	}
	if f := filesystemFinding(capture.Mount{Point: "/data", FSType: "xfs"}); f.Severity != SevOK {
		t.Fatalf("xfs: %+v", f)
	}
}

func TestDoctorNoFuseNoTracing(t *testing.T) {
	cfg, _ := config.Parse("x.yaml", []byte("repository: /nonexistent/repo\nvolumes: []\n"), nil)
	env := DoctorEnv{Now: time.Now(), FuseDevice: "/nonexistent/fuse",
		Tracing: func() error {
			return errors.New("changed-block tracking unavailable: tracefs is not mounted and mounting it failed")
		}}
	seen := map[string]bool{}
	for _, f := range Doctor(context.Background(), cfg, env) {
		if f.Check == "fuse" && f.Severity == SevWarning && strings.Contains(f.Message, "/nonexistent/fuse is missing") {
			seen["fuse"] = true
		}
		if f.Check == "tracking" && f.Severity == SevWarning && strings.Contains(f.Message, "full scans") && strings.Contains(f.Fix, "mount -t tracefs") {
			seen["tracing"] = true
		}
	}
	if !seen["fuse"] || !seen["tracing"] {
		t.Fatalf("findings seen: %v", seen)
	}
}

func TestDoctorLowMemory(t *testing.T) {
	cfg, err := config.Parse("x.yaml", []byte("repository: /nonexistent/repo\nvolumes: []\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	env := DoctorEnv{Euid: 0, Now: time.Now(), FuseDevice: "/dev/null", MemAvailable: func() (int64, error) { return 100 << 20, nil }}
	for _, f := range Doctor(context.Background(), cfg, env) {
		if f.Check == "memory" {
			if f.Severity != SevWarning || !strings.Contains(f.Message, "only 100 MiB") {
				t.Fatalf("memory: %+v", f)
			}
			return
		}
	}
	t.Fatal("no memory finding")
}

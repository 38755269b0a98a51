package main

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

// TestJournalPriorities: each line starts with its syslog priority, so journald files
// errors as errors (`journalctl -p err`), and keeps the record's text.
func TestJournalPriorities(t *testing.T) {
	var out bytes.Buffer
	log := slog.New(newPriorityHandler(&out, slog.LevelDebug)).With("volume", "data")
	log.Error("snapshot failed", "err", "boom")
	log.Warn("careful")
	log.Info("snapshot taken", "freeze_ms", 12.5)
	log.Debug("detail")
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	want := []string{"<3>level=ERROR msg=\"snapshot failed\" volume=data err=boom", "<4>level=WARN msg=careful volume=data",
		"<6>level=INFO msg=\"snapshot taken\" volume=data freeze_ms=12.5", "<7>level=DEBUG msg=detail volume=data"}
	if len(lines) != len(want) {
		t.Fatalf("lines %q", lines)
	}
	for i := range want {
		if lines[i] != want[i] {
			t.Errorf("line %d: %q, want %q", i, lines[i], want[i])
		}
	}
}

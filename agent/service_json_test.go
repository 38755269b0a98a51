package agent

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// TestVolumeStatusJSON: times in one style, absent when they never happened, and read back
// as written (the CLI reads the agent's status).
func TestVolumeStatusJSON(t *testing.T) {
	at := time.Date(2026, 12, 2, 7, 0, 0, 123456789, time.UTC)
	for _, v := range []VolumeStatus{{Volume: "a"}, {Volume: "b", LastAt: at, NextRun: at.Add(time.Hour), RetryAt: at.Add(time.Minute), Members: []string{"x"}}} {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(b), "0001-01-01") || strings.Contains(string(b), "null") {
			t.Fatalf("zero time or null in %s", b)
		}
		if !v.LastAt.IsZero() && !strings.Contains(string(b), `"last_at":"2026-12-02T07:00:00.123Z"`) {
			t.Fatalf("time not in RFC 3339 UTC milliseconds: %s", b)
		}
		var back VolumeStatus
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		if back.Volume != v.Volume || !back.LastAt.Equal(v.LastAt.Truncate(time.Millisecond)) || !back.NextRun.Equal(v.NextRun.Truncate(time.Millisecond)) ||
			!back.RetryAt.Equal(v.RetryAt.Truncate(time.Millisecond)) {
			t.Fatalf("round trip: %+v, want %+v", back, v)
		}
	}
}

// TestPruneDecisionJSON: decisions carry their time in the reports' style, and read back.
func TestPruneDecisionJSON(t *testing.T) {
	d := PruneDecision{Volume: "v", Name: "n", ID: "id", Created: time.Date(2026, 12, 2, 8, 0, 0, 5e8, time.UTC), Keep: true, Reason: "r"}
	b, err := json.Marshal([]PruneDecision{d})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"created":"2026-12-02T08:00:00.500Z"`) || strings.Count(string(b), `"created"`) != 1 {
		t.Fatalf("JSON: %s", b)
	}
	var back []PruneDecision
	if err := json.Unmarshal(b, &back); err != nil || len(back) != 1 || back[0] != d {
		t.Fatalf("round trip: %+v %v", back, err)
	}
}

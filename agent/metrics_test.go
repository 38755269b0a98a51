package agent

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/capture"
)

// TestMetricsExposition: the series the docs list, in the Prometheus text format, with
// label values escaped (a replica's location is free text).
func TestMetricsExposition(t *testing.T) {
	m := newMetrics()
	out := &Outcome{Snapshot: &chain.Snapshot{NewBytes: 1234}, Duration: 300 * time.Millisecond,
		Capture: capture.Result{Frozen: true, Freeze: 7 * time.Millisecond, BytesRead: 5678}}
	m.observe("data", out, nil)
	m.observe("data", nil, errors.New("failed"))
	m.packBytes(42)
	loc := `s3:https://h/b "x"\y`
	m.replica(loc)
	m.replicaBytes(loc, 10)
	m.replicaLag(loc, 3)
	var b bytes.Buffer
	m.set.WritePrometheus(&b)
	text := b.String()
	for _, want := range []string{
		`stasis_snapshots_total{result="ok",volume="data"} 1`,
		`stasis_snapshots_total{result="failed",volume="data"} 1`,
		`stasis_snapshot_duration_seconds_bucket{volume="data",le="0.4"} 1`,
		`stasis_snapshot_duration_seconds_count{volume="data"} 1`,
		`stasis_freeze_milliseconds_bucket{volume="data",le="8"} 1`,
		`stasis_last_freeze_milliseconds{volume="data"} 7`,
		`stasis_bytes_stored_total{volume="data"} 1234`,
		`stasis_bytes_read_total{volume="data"} 5678`,
		`stasis_repository_pack_bytes 42`,
		`stasis_replica_bytes_stored_total{replica="s3:https://h/b \"x\"\\y"} 10`,
		`stasis_replica_lag_snapshots{replica="s3:https://h/b \"x\"\\y"} 3`,
		`stasis_replica_failures_total{replica="s3:https://h/b \"x\"\\y"} 0`,
		"# TYPE stasis_snapshots_total counter",
	} {
		if !strings.Contains(text, want+"\n") {
			t.Errorf("missing %s in:\n%s", want, text)
		}
	}
}

package agent

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strings"
	"time"

	vm "github.com/VictoriaMetrics/metrics"
)

// metrics are the agent's Prometheus series (docs/CONFIG.md, metrics_listen), kept in a
// VictoriaMetrics set: it writes the Prometheus text format without the protobuf stack of
// the Prometheus client, whose start-up every stasis process paid (the CLI and the freeze
// guard are the same binary).
type metrics struct {
	set *vm.Set
}

var (
	durationBuckets = exponential(0.05, 2, 14) // seconds
	freezeBuckets   = exponential(1, 2, 14)    // milliseconds
)

func exponential(start, factor float64, n int) []float64 {
	out := make([]float64, n)
	for i := range out {
		out[i] = start
		start *= factor
	}
	return out
}

func newMetrics() *metrics {
	vm.ExposeMetadata(true) // # TYPE lines
	m := &metrics{set: vm.NewSet()}
	m.set.NewGauge("stasis_repository_pack_bytes", nil)
	return m
}

// labels renders label pairs (names in sorted order, as Prometheus writes them) for a
// series name; values are escaped as the text format requires.
func labels(pairs ...string) string {
	var b strings.Builder
	b.WriteByte('{')
	for i := 0; i+1 < len(pairs); i += 2 {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(pairs[i])
		b.WriteString(`="`)
		b.WriteString(labelEscaper.Replace(pairs[i+1]))
		b.WriteByte('"')
	}
	b.WriteByte('}')
	return b.String()
}

var labelEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)

func (m *metrics) gauge(name string) *vm.Gauge { return m.set.GetOrCreateGauge(name, nil) }

func (m *metrics) observe(volume string, out *Outcome, err error) {
	v := labels("volume", volume)
	if err != nil {
		m.set.GetOrCreateCounter("stasis_snapshots_total" + labels("result", "failed", "volume", volume)).Inc()
		return
	}
	m.set.GetOrCreateCounter("stasis_snapshots_total" + labels("result", "ok", "volume", volume)).Inc()
	m.set.GetOrCreatePrometheusHistogramExt("stasis_snapshot_duration_seconds"+v, durationBuckets).Update(out.Duration.Seconds())
	if out.Capture.Frozen {
		m.gauge("stasis_last_freeze_milliseconds" + v).Set(Millis(out.Capture.Freeze))
		m.set.GetOrCreatePrometheusHistogramExt("stasis_freeze_milliseconds"+v, freezeBuckets).Update(Millis(out.Capture.Freeze))
	}
	m.set.GetOrCreateCounter("stasis_bytes_stored_total" + v).AddInt64(out.Snapshot.NewBytes)
	m.set.GetOrCreateCounter("stasis_bytes_read_total" + v).AddInt64(out.Capture.BytesRead)
	m.gauge("stasis_last_success_timestamp_seconds" + v).Set(float64(time.Now().Unix()))
}

func (m *metrics) packBytes(n int64) { m.gauge("stasis_repository_pack_bytes").Set(float64(n)) }

// The series of one replica repository, by location.
func (m *metrics) replicaLastSuccess(loc string) *vm.Gauge {
	return m.gauge("stasis_replica_last_success_timestamp_seconds" + labels("replica", loc))
}

func (m *metrics) replicaFailures(loc string) *vm.Counter {
	return m.set.GetOrCreateCounter("stasis_replica_failures_total" + labels("replica", loc))
}

// replica makes every series of a replica exist from the start.
func (m *metrics) replica(loc string) {
	m.replicaLag(loc, 0)
	m.replicaLastSuccess(loc)
	m.replicaBytes(loc, 0)
	m.replicaFailures(loc)
}

func (m *metrics) replicaLag(loc string, n int) {
	m.gauge("stasis_replica_lag_snapshots" + labels("replica", loc)).Set(float64(n))
}

func (m *metrics) replicaSuccess(loc string) {
	m.replicaLastSuccess(loc).Set(float64(time.Now().Unix()))
}

func (m *metrics) replicaBytes(loc string, n int64) {
	m.set.GetOrCreateCounter("stasis_replica_bytes_stored_total" + labels("replica", loc)).AddInt64(n)
}

func (m *metrics) replicaFailure(loc string) { m.replicaFailures(loc).Inc() }

// ServeMetrics serves /metrics on addr until ctx ends.
func (s *Service) ServeMetrics(ctx context.Context, addr string) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		s.metrics.set.WritePrometheus(w)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

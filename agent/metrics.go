package agent

import (
	"context"
	"errors"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics are the agent's Prometheus series.
type metrics struct {
	reg         *prometheus.Registry
	snapshots   *prometheus.CounterVec
	duration    *prometheus.HistogramVec
	freeze      *prometheus.GaugeVec
	freezeHist  *prometheus.HistogramVec
	stored      *prometheus.CounterVec
	read        *prometheus.CounterVec
	lastSuccess *prometheus.GaugeVec
	packBytes   prometheus.Gauge

	// Replication, by replica repository.
	replicaLag         *prometheus.GaugeVec
	replicaLastSuccess *prometheus.GaugeVec
	replicaBytes       *prometheus.CounterVec
	replicaFailures    *prometheus.CounterVec
}

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		snapshots: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "stasis_snapshots_total",
			Help: "Snapshots attempted, by volume and result (ok or failed)."}, []string{"volume", "result"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "stasis_snapshot_duration_seconds",
			Help: "Wall time of successful snapshots.", Buckets: prometheus.ExponentialBuckets(0.05, 2, 14)}, []string{"volume"}),
		freeze: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "stasis_last_freeze_milliseconds",
			Help: "How long the filesystems were frozen in the volume's last snapshot."}, []string{"volume"}),
		freezeHist: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "stasis_freeze_milliseconds",
			Help: "Freeze windows.", Buckets: prometheus.ExponentialBuckets(1, 2, 14)}, []string{"volume"}),
		stored: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "stasis_bytes_stored_total",
			Help: "Bytes snapshots added to the repository."}, []string{"volume"}),
		read: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "stasis_bytes_read_total",
			Help: "Bytes snapshots read from their sources."}, []string{"volume"}),
		lastSuccess: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "stasis_last_success_timestamp_seconds",
			Help: "Unix time of the volume's last successful snapshot."}, []string{"volume"}),
		packBytes: prometheus.NewGauge(prometheus.GaugeOpts{Name: "stasis_repository_pack_bytes",
			Help: "Bytes in the repository's pack files."}),
	}
	replica := []string{"replica"}
	m.replicaLag = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "stasis_replica_lag_snapshots",
		Help: "This host's snapshots the replica does not have yet."}, replica)
	m.replicaLastSuccess = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "stasis_replica_last_success_timestamp_seconds",
		Help: "Unix time of the last replication pass that copied everything."}, replica)
	m.replicaBytes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "stasis_replica_bytes_stored_total",
		Help: "Bytes replication added to the replica."}, replica)
	m.replicaFailures = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "stasis_replica_failures_total",
		Help: "Replication passes that failed (each is retried with a backoff)."}, replica)
	m.reg.MustRegister(m.snapshots, m.duration, m.freeze, m.freezeHist, m.stored, m.read, m.lastSuccess, m.packBytes,
		m.replicaLag, m.replicaLastSuccess, m.replicaBytes, m.replicaFailures)
	return m
}

func (m *metrics) observe(volume string, out *Outcome, err error) {
	if err != nil {
		m.snapshots.WithLabelValues(volume, "failed").Inc()
		return
	}
	m.snapshots.WithLabelValues(volume, "ok").Inc()
	m.duration.WithLabelValues(volume).Observe(out.Duration.Seconds())
	if out.Capture.Frozen {
		m.freeze.WithLabelValues(volume).Set(Millis(out.Capture.Freeze))
		m.freezeHist.WithLabelValues(volume).Observe(Millis(out.Capture.Freeze))
	}
	m.stored.WithLabelValues(volume).Add(float64(out.Snapshot.NewBytes))
	m.read.WithLabelValues(volume).Add(float64(out.Capture.BytesRead))
	m.lastSuccess.WithLabelValues(volume).Set(float64(time.Now().Unix()))
}

// ServeMetrics serves /metrics on addr until ctx ends.
func (s *Service) ServeMetrics(ctx context.Context, addr string) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(s.metrics.reg, promhttp.HandlerOpts{}))
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

package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/stasis-project/stasis/agent/hooks"
	"github.com/stasis-project/stasis/config"
)

// Result is a finished snapshot of a volume or group, as after hooks and notifications
// see it.
type Result struct {
	Host      string   `json:"host"`
	Volume    string   `json:"volume"` // the volume or group
	Result    string   `json:"result"` // "ok" or "failed"
	Error     string   `json:"error,omitempty"`
	Snapshots []string `json:"snapshots,omitempty"` // VOLUME/NAME of each committed snapshot
	Kind      string   `json:"kind"`
	Time      string   `json:"time"`
}

// NewResult describes the outcome of a snapshot of name (a volume or group).
func NewResult(host, name, kind string, outs []*Outcome, err error) Result {
	r := Result{Host: host, Volume: name, Result: "ok", Kind: kind, Time: stampTime(time.Now())}
	if err != nil {
		r.Result, r.Error = "failed", err.Error()
	}
	for _, o := range outs {
		if o != nil && o.Snapshot != nil {
			r.Snapshots = append(r.Snapshots, o.Snapshot.Volume+"/"+o.Snapshot.Name)
		}
	}
	return r
}

// AfterSnapshot runs the after hooks (once, whatever the result, with STASIS_RESULT,
// STASIS_ERROR and STASIS_SNAPSHOT) and sends the notification the configuration asks
// for. Neither changes the snapshot's result: their failures are logged.
func AfterSnapshot(ctx context.Context, h *config.Hooks, n *config.Notify, r Result, log *slog.Logger) {
	if h != nil && len(h.After) > 0 {
		env := []string{"STASIS_VOLUME=" + r.Volume, "STASIS_RESULT=" + r.Result, "STASIS_ERROR=" + r.Error,
			"STASIS_SNAPSHOT=" + strings.Join(r.Snapshots, " "), "STASIS_KIND=" + r.Kind}
		if err := hooks.Run(ctx, "after", h.After, time.Duration(h.Timeout), env, log); err != nil {
			log.Warn("after hook failed", "volume", r.Volume, "err", err)
		}
	}
	if n != nil {
		if err := Notify(ctx, n, r); err != nil {
			log.Warn("notification failed", "url", redactURL(n.URL), "err", err)
		}
	}
}

// Notify posts r as JSON to the webhook if its result is one the configuration sends: one
// attempt, bounded by the timeout, so a dead endpoint never piles up retries.
func Notify(ctx context.Context, n *config.Notify, r Result) error {
	want := "failure"
	if r.Result == "ok" {
		want = "success"
	}
	if !slices.Contains(n.On, want) {
		return nil
	}
	body, _ := json.Marshal(r)
	ctx, cancel := context.WithTimeout(ctx, time.Duration(n.Timeout))
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, n.URL, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "stasis")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode >= 300 {
		return fmt.Errorf("the webhook answered %s", resp.Status)
	}
	return nil
}

// redactURL keeps a webhook's secret path out of logs.
func redactURL(u string) string {
	if i := strings.Index(u, "://"); i >= 0 {
		if j := strings.Index(u[i+3:], "/"); j >= 0 {
			return u[:i+3+j] + "/…"
		}
	}
	return u
}

package agent

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/config"
	"github.com/stasis-project/stasis/test/testenv"
)

// TestRetentionWhileStopping: a snapshot committed just before the agent is told to stop
// still gets its retention (the agent's context is already cancelled when retainAfter
// runs), so a stop does not leave the quota exceeded.
func TestRetentionWhileStopping(t *testing.T) {
	ctx := context.Background()
	r := testenv.MemoryRepo(t)
	base := time.Now().Add(-time.Hour)
	for i := 0; i < 4; i++ {
		w, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: "v", Name: "auto_" + string(rune('a'+i)), Kind: chain.KindAuto,
			Size: 64 << 10, ChunkSize: 64 << 10, Now: base.Add(time.Duration(i) * time.Minute)})
		if err != nil {
			t.Fatal(err)
		}
		if err := w.Put(ctx, 0, make([]byte, 64<<10)); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Commit(ctx, nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	cfg, err := config.Parse("x.yaml", []byte("volumes:\n  - name: v\n    source: /dev/null\n    retention: {keep_auto: 3}\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	s := &Service{log: slog.New(slog.NewTextHandler(io.Discard, nil)), repo: r, cfg: cfg}
	stopping, cancel := context.WithCancel(ctx)
	cancel()
	s.retainAfter(stopping, &job{name: "v"})
	snaps, _, err := r.Snapshots(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != 3 {
		t.Fatalf("%d snapshots after retention with keep_auto 3", len(snaps))
	}
}

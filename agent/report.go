package agent

import "github.com/stasis-project/stasis/chain"

// SnapshotReport is a snapshot's outcome as the socket carries it.
type SnapshotReport struct {
	Snapshot *chain.Snapshot `json:"snapshot"`
	ID       string          `json:"id"`
	Figures
}

// Figures say how a snapshot was captured, as `snapshot --json` prints them.
type Figures struct {
	Tracking      string   `json:"tracking"`
	Rounds        int      `json:"rounds"`
	FreezeMS      float64  `json:"freeze_ms"`
	BytesRead     int64    `json:"bytes_read"`
	BytesStored   int64    `json:"bytes_stored"`
	MetadataBytes int64    `json:"metadata_bytes"`
	ChunksStored  int64    `json:"chunks_stored"`
	FinalChunks   int      `json:"final_chunks"`
	DurationMS    int64    `json:"duration_ms"`
	Warnings      []string `json:"warnings,omitempty"`
}

// Report summarises an Outcome.
func Report(o *Outcome) *SnapshotReport {
	return &SnapshotReport{Snapshot: o.Snapshot, ID: o.Snapshot.ID, Figures: Figures{Tracking: o.Capture.Tracking,
		Rounds: o.Capture.Rounds, FreezeMS: Millis(o.Capture.Freeze), BytesRead: o.Capture.BytesRead,
		BytesStored: o.Write.DataBytes + o.Write.TreeBytes, MetadataBytes: o.Write.MetadataBytes,
		ChunksStored: o.Write.ChunksStored, FinalChunks: o.Capture.FinalChunks,
		DurationMS: o.Duration.Milliseconds(), Warnings: o.Warnings}}
}

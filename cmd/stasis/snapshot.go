package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/capture"
)

// snapshotJSON is what `snapshot --json` prints: the list fields plus how it was captured.
type snapshotJSON struct {
	listEntry
	Tracking      string `json:"tracking"`
	Rounds        int    `json:"rounds"`
	FreezeMS      int64  `json:"freeze_ms"`
	BytesRead     int64  `json:"bytes_read"`
	BytesStored   int64  `json:"bytes_stored"`
	MetadataBytes int64  `json:"metadata_bytes"`
	ChunksStored  int64  `json:"chunks_stored"`
	DurationMS    int64  `json:"duration_ms"`
}

func newSnapshotCmd(g *globals) *cobra.Command {
	var source, volume, name string
	var asJSON bool
	var chunkSize int
	cmd := &cobra.Command{
		Use:   "snapshot --source DEV --volume NAME [--name NAME]",
		Short: "Take a snapshot of a block device or image file",
		Long: `Take a snapshot of --source (a block device or an image file) as the next link of
volume --volume's chain. The volume's first snapshot stores every non-empty chunk; later
snapshots store only chunks the repository does not hold yet.

Without --name the snapshot is named manual_YYYYMMDD_HHMMSS (UTC). Names are unique per
volume. The source is read as it is (crash-consistent).`,
		Example: `  stasis snapshot -r /var/lib/stasis/repo --source /dev/vdb --volume data --name before-upgrade`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			start := time.Now()
			if source == "" || volume == "" {
				return fmt.Errorf("--source and --volume are required")
			}
			if err := chain.ValidName("volume", volume); err != nil {
				return err
			}
			src, err := capture.OpenSource(source)
			if err != nil {
				return err
			}
			defer src.Close()
			r, unlock, err := g.lockRepo(ctx)
			if err != nil {
				return err
			}
			defer unlock()
			host, _ := os.Hostname()
			w, err := r.NewSnapshot(ctx, chain.SnapshotOptions{Volume: volume, Name: name, Size: src.Size,
				ChunkSize: chunkSize, Source: source, Host: host})
			if err != nil {
				return err
			}
			ranges, err := src.DataRanges()
			if err != nil {
				w.Abort()
				return err
			}
			runs := capture.Chunks(ranges, w.ChunkSize(), src.Size)
			prog := newProgress(cmd.ErrOrStderr(), "reading "+source, src.Size)
			cs, err := capture.Copy(ctx, src, progressWriter{w, prog}, runs)
			prog.done()
			if err != nil {
				w.Abort()
				return fmt.Errorf("snapshot of %s failed, nothing was committed: %w", source, err)
			}
			ws := w.Stats()
			info := map[string]any{"tracking": "full-scan", "rounds": 1, "bytes_read": cs.BytesRead,
				"bytes_stored": ws.DataBytes + ws.TreeBytes, "duration_ms": time.Since(start).Milliseconds()}
			s, err := w.Commit(ctx, info, nil)
			if err != nil {
				return fmt.Errorf("snapshot of %s failed, nothing was committed: %w", source, err)
			}
			ws = w.Stats()
			if asJSON {
				return printJSON(cmd, snapshotJSON{listEntry: toListEntry(s), Tracking: "full-scan", Rounds: 1,
					BytesRead: cs.BytesRead, BytesStored: ws.DataBytes + ws.TreeBytes, MetadataBytes: ws.MetadataBytes,
					ChunksStored: ws.ChunksStored, DurationMS: time.Since(start).Milliseconds()})
			}
			fmt.Fprintf(cmd.OutOrStdout(), "snapshot %s/%s (%s): %s volume, read %s, %s new in %s\n",
				s.Volume, s.Name, s.ID[:12], humanize.IBytes(uint64(s.SizeBytes)), humanize.IBytes(uint64(cs.BytesRead)),
				humanize.IBytes(uint64(s.NewBytes)), time.Since(start).Round(time.Millisecond))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&source, "source", "", "block device or image file to snapshot")
	f.StringVar(&volume, "volume", "", "volume (chain) name")
	f.StringVar(&name, "name", "", "snapshot name, unique in the volume")
	f.BoolVar(&asJSON, "json", false, "print the result as JSON")
	f.IntVar(&chunkSize, "chunk-size", 0, "chunk size in bytes for a new volume (default 65536); fixed afterwards")
	return cmd
}

// progressWriter counts bytes Put for the progress line.
type progressWriter struct {
	*chain.SnapshotWriter
	p *progress
}

func (w progressWriter) Put(ctx context.Context, i int64, data []byte) error {
	err := w.SnapshotWriter.Put(ctx, i, data)
	w.p.add(int64(len(data)))
	return err
}

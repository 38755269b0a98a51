package main

import (
	"fmt"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/image"
)

// findSnapshot opens the repository to read and resolves ref (see chain.Find).
func (g *globals) findSnapshot(cmd *cobra.Command, ref string) (*chain.Reader, *chain.Snapshot, error) {
	r, err := g.openReader(cmd.Context())
	if err != nil {
		return nil, nil, err
	}
	snaps, _, err := r.Snapshots(cmd.Context())
	if err != nil {
		r.Close()
		return nil, nil, err
	}
	s, err := chain.Find(snaps, r.Host(), ref)
	if err != nil {
		r.Close()
		return nil, nil, err
	}
	return r, s, nil
}

func newExportCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:               "export SNAPSHOT FILE",
		ValidArgsFunction: g.completeSnapshotFirst,
		Short:             "Write a snapshot's volume to a new sparse raw image file",
		Long: `Write the volume as it was in SNAPSHOT (ID prefix or VOLUME/NAME) to FILE, a new
sparse raw image (empty chunks are holes). FILE appears only once complete; a damaged
chunk fails the export and leaves nothing behind.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			start := time.Now()
			r, s, err := g.findSnapshot(cmd, args[0])
			if err != nil {
				return err
			}
			defer r.Close()
			prog := newProgress(cmd.ErrOrStderr(), "exporting", s.SizeBytes)
			st, err := image.Export(cmd.Context(), r.SnapshotReader(s), args[1], prog.set)
			prog.done()
			if err != nil {
				return fmt.Errorf("export of %s/%s failed: %w", s.Volume, s.Name, err)
			}
			return g.print(cmd, map[string]any{"snapshot": s.ID, "target": args[1], "size_bytes": s.SizeBytes,
				"bytes_written": st.BytesWritten, "duration_ms": time.Since(start).Milliseconds()},
				fmt.Sprintf("exported %s/%s to %s: %s volume, %s written in %s", s.Volume, s.Name, args[1],
					humanize.IBytes(uint64(s.SizeBytes)), humanize.IBytes(uint64(st.BytesWritten)), time.Since(start).Round(time.Millisecond)))
		},
	}
}

func newRestoreCmd(g *globals) *cobra.Command {
	var to string
	cmd := &cobra.Command{
		Use:               "restore SNAPSHOT --to PATH",
		ValidArgsFunction: g.completeSnapshotFirst,
		Short:             "Roll a device or file back to a snapshot, writing only chunks that differ",
		Long: `Make PATH (a block device or a file) hold the volume as it was in SNAPSHOT. PATH's
current content is compared chunk by chunk and only chunks that differ are written. A
device must not be mounted or in use, and must be at least as large as the volume. A
PATH that does not exist is created as with export.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" {
				return fmt.Errorf("--to is required: the device or file to restore onto")
			}
			start := time.Now()
			r, s, err := g.findSnapshot(cmd, args[0])
			if err != nil {
				return err
			}
			defer r.Close()
			prog := newProgress(cmd.ErrOrStderr(), "restoring", s.SizeBytes)
			st, err := image.Restore(cmd.Context(), r.SnapshotReader(s), to, prog.set)
			prog.done()
			if err != nil {
				return fmt.Errorf("restore of %s/%s onto %s failed after writing %d chunks: %w", s.Volume, s.Name, to, st.ChunksWritten, err)
			}
			return g.print(cmd, map[string]any{"snapshot": s.ID, "target": to, "chunks": st.Chunks,
				"chunks_written": st.ChunksWritten, "bytes_written": st.BytesWritten, "bytes_compared": st.BytesRead,
				"duration_ms": time.Since(start).Milliseconds()},
				fmt.Sprintf("restored %s/%s onto %s: %d of %d chunks differed and were written (%s) in %s",
					s.Volume, s.Name, to, st.ChunksWritten, st.Chunks, humanize.IBytes(uint64(st.BytesWritten)), time.Since(start).Round(time.Millisecond)))
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "device or file to restore onto")
	return cmd
}

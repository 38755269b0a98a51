package main

import (
	"fmt"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/files"
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
	var overwrite, noFlush bool
	cmd := &cobra.Command{
		Use:               "restore SNAPSHOT[:PATH] --to TARGET",
		ValidArgsFunction: g.completeSnapshotFirst,
		Short:             "Roll a device back to a snapshot, or restore files and directories from one",
		Long: `restore SNAPSHOT --to DEVICE makes DEVICE (a block device or a file) hold the volume as
it was in SNAPSHOT. Its current content is compared chunk by chunk and only chunks that
differ are written. A device must not be mounted or in use, and must be at least as large
as the volume. A target that does not exist is created as with export.

restore SNAPSHOT:PATH --to DIR recreates the file or tree PATH inside the directory DIR
(PATH's last component is created there; the root restores its contents into DIR), with
owners (as root), modes, nanosecond times, xattrs, ACLs, symbolic and hard links, holes,
device nodes and FIFOs. Nothing in DIR is followed. New paths appear only once complete.
An existing path is refused unless --overwrite, which replaces files in place (never a
directory with a file). The files are on stable storage when restore returns, unless
--no-flush (as cp: faster, but a crash soon after may lose them). Restoring a database
directory from an app-consistent snapshot prints the binlog position it was taken at.`,
		Example: "  stasis restore data/daily-2026-12-01 --to /dev/vdb\n  stasis restore data/daily-2026-12-01:/var/lib/mysql --to /srv/restore",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" {
				return fmt.Errorf("--to is required: the device or file to restore onto, or the directory to restore files into")
			}
			if _, _, ok := splitFileRef(args[0]); ok {
				return g.restoreFiles(cmd, args[0], to, files.RestoreOptions{Overwrite: overwrite, NoFlush: noFlush})
			}
			if overwrite {
				return fmt.Errorf("--overwrite is for restoring files (SNAPSHOT:PATH); a volume restore always overwrites its target")
			}
			if noFlush {
				return fmt.Errorf("--no-flush is for restoring files (SNAPSHOT:PATH); a volume restore always flushes its target")
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
	cmd.Flags().StringVar(&to, "to", "", "device or file to restore onto; with SNAPSHOT:PATH, the directory to restore into")
	cmd.Flags().BoolVar(&overwrite, "overwrite", false, "with SNAPSHOT:PATH: replace existing files")
	cmd.Flags().BoolVar(&noFlush, "no-flush", false, "with SNAPSHOT:PATH: return before the files reach the disk, as cp does")
	return cmd
}

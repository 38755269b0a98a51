package main

import (
	"fmt"
	"os"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/stasis-project/stasis/chain"
)

func newCopyCmd(g *globals) *cobra.Command {
	var from, to, toPasswordFile, host, volume string
	cmd := &cobra.Command{
		Use:   "copy [--from REPO] --to REPO [--host HOST] [--volume NAME] [SNAPSHOT...]",
		Short: "Copy snapshots to another repository (a directory or S3), incrementally",
		Long: `Copy snapshots of the repository --from (default -r) to the repository --to, oldest first: every
snapshot the destination does not have yet (a copy keeps the host, volume, name and time,
which is how it is recognised), or only those named, or of --host/--volume. A copy is
bit for bit the original, with its consistency labels and capture records.

Copies are incremental: once the destination has a copy of a volume's snapshot, the next
copy reads and stores only the chunks that changed since. The destination may be
encrypted with other keys (its passphrase from --to-password-file, $STASIS_TO_PASSWORD_FILE
or a prompt); made with "stasis init --copy-keys-from", it shares the source's blob IDs and
chunks it already holds are not even read. Copies take no lock: snapshots and other
copies may run at the same time.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if to == "" {
				return fmt.Errorf("--to is required: the repository to copy into")
			}
			if from != "" {
				g.repo = from
			}
			src, err := g.openReader(ctx)
			if err != nil {
				return err
			}
			defer src.Close()
			a := g.access()
			a.passwordFile = toPasswordFile
			if a.passwordFile == "" {
				a.passwordFile = os.Getenv("STASIS_TO_PASSWORD_FILE")
			}
			a.passwordEnvOff = true // $STASIS_PASSWORD(_FILE) are the source's
			dst, err := a.open(ctx, to)
			if err != nil {
				return fmt.Errorf("--to: %w", err)
			}
			defer dst.Close()
			snaps, _, err := src.Snapshots(ctx)
			if err != nil {
				return err
			}
			var todo []*chain.Snapshot
			if len(args) > 0 {
				for _, ref := range args {
					s, err := chain.Find(snaps, src.Host(), ref)
					if err != nil {
						return err
					}
					todo = append(todo, s)
				}
				chain.SortSnapshots(todo)
			} else {
				for _, s := range snaps {
					if (host == "" || s.Host == host) && (volume == "" || s.Volume == volume) {
						todo = append(todo, s)
					}
				}
			}
			var st chain.CopyStats
			copied := []listEntry{}
			for _, s := range todo {
				before := st.Copied
				c, err := chain.Copy(ctx, src, dst, s, &st)
				if err != nil {
					return err
				}
				if st.Copied > before {
					copied = append(copied, toListEntry(c))
					g.logger().Info("copied", "volume", s.Volume, "snapshot", s.Name)
				}
			}
			return g.print(cmd, map[string]any{"stats": st, "copied": copied},
				fmt.Sprintf("copied %s to %s (%s already there): read %s, stored %s",
					plural(st.Copied, "snapshot"), dst.Location(), plural(st.Skipped, "snapshot"),
					humanize.IBytes(uint64(st.BytesRead)), humanize.IBytes(uint64(st.BytesStored))))
		},
	}
	cmd.Flags().StringVar(&from, "from", "", "source repository (default -r, $STASIS_REPO or the configuration's)")
	cmd.Flags().StringVar(&to, "to", "", "destination repository: a directory or s3:https://host/bucket/prefix")
	cmd.Flags().StringVar(&toPasswordFile, "to-password-file", "", "file holding the destination's passphrase (default $STASIS_TO_PASSWORD_FILE, else asked)")
	cmd.Flags().StringVar(&host, "host", "", "only this host's snapshots")
	cmd.Flags().StringVar(&volume, "volume", "", "only this volume's snapshots")
	return cmd
}

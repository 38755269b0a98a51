package main

import (
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/stasis-project/stasis/chain"
)

// listEntry is one snapshot as `list --json` prints it.
type listEntry struct {
	ID          string         `json:"id"`
	Volume      string         `json:"volume"`
	Name        string         `json:"name"`
	Created     string         `json:"created"`
	Kind        string         `json:"kind"`
	Consistency string         `json:"consistency"`
	SizeBytes   int64          `json:"size_bytes"`
	NewBytes    int64          `json:"new_bytes"`
	Parent      *string        `json:"parent"`
	ChunkSize   int            `json:"chunk_size"`
	Source      string         `json:"source,omitempty"`
	Group       string         `json:"group,omitempty"`
	GroupID     string         `json:"group_id,omitempty"`
	Capture     map[string]any `json:"capture,omitempty"`
	App         map[string]any `json:"app,omitempty"`
}

func toListEntry(s *chain.Snapshot) listEntry {
	e := listEntry{ID: s.ID, Volume: s.Volume, Name: s.Name, Created: s.Created.Format(time.RFC3339),
		Kind: s.Kind, Consistency: s.Consistency, SizeBytes: s.SizeBytes, NewBytes: s.NewBytes,
		ChunkSize: s.ChunkSize, Source: s.Source, Group: s.Group, GroupID: s.GroupID, Capture: s.Capture, App: s.App}
	if s.Parent != "" {
		p := s.Parent
		e.Parent = &p
	}
	return e
}

func newListCmd(g *globals) *cobra.Command {
	var volume, group string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list [--volume NAME] [--group NAME] [--json]",
		Short: "List snapshots, oldest first",
		Long: `List snapshots, oldest first. Members of a group snapshot (volumes frozen in one window)
show the group's name and share a group ID.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := g.openRepo(cmd.Context())
			if err != nil {
				return err
			}
			snaps, bad, err := r.Snapshots(cmd.Context())
			if err != nil {
				return err
			}
			for _, b := range bad {
				g.logger().Warn("unreadable snapshot manifest; run `stasis verify`", "err", b)
			}
			out := []listEntry{}
			for _, s := range snaps {
				if (volume == "" || s.Volume == volume) && (group == "" || s.Group == group) {
					out = append(out, toListEntry(s))
				}
			}
			if asJSON {
				return printJSON(cmd, out)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tVOLUME\tNAME\tCREATED\tKIND\tCONSISTENCY\tSIZE\tNEW\tGROUP")
			for _, s := range out {
				created, _ := time.Parse(time.RFC3339, s.Created)
				grp := "-"
				if s.Group != "" {
					grp = s.Group + "/" + s.GroupID[:8]
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.ID[:12], s.Volume, s.Name,
					created.Local().Format("2006-01-02 15:04:05"), s.Kind, s.Consistency,
					humanize.IBytes(uint64(s.SizeBytes)), humanize.IBytes(uint64(s.NewBytes)), grp)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&volume, "volume", "", "only this volume's snapshots")
	cmd.Flags().StringVar(&group, "group", "", "only the members of this group's snapshots")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func newDeleteCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "delete SNAPSHOT...",
		Short: "Delete snapshots (by ID prefix or VOLUME/NAME)",
		Long: `Delete snapshots. No other snapshot changes: blocks a later snapshot still needs stay.
Run "stasis gc" afterwards to reclaim the space only the deleted snapshots used.
Every reference is resolved before anything is deleted.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			r, unlock, err := g.lockRepo(ctx)
			if err != nil {
				return err
			}
			defer unlock()
			snaps, _, err := r.Snapshots(ctx)
			if err != nil {
				return err
			}
			var victims []*chain.Snapshot
			for _, ref := range args {
				s, err := chain.Find(snaps, ref)
				if err != nil {
					return err
				}
				victims = append(victims, s)
			}
			for _, s := range victims {
				if err := r.Delete(ctx, s); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "deleted %s/%s (%s)\n", s.Volume, s.Name, s.ID[:12])
			}
			return nil
		},
	}
}

func newGCCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "gc",
		Short: "Reclaim space no snapshot references",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			r, unlock, err := g.lockRepo(ctx)
			if err != nil {
				return err
			}
			defer unlock()
			st, err := r.GC(ctx)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "gc: freed %s: %d packs deleted, %d rewritten into %d, %d blobs removed\n",
				humanize.IBytes(uint64(max(st.BytesFreed, 0))), st.PacksDeleted, st.PacksRewritten, st.PacksWritten, st.BlobsDeleted)
			return nil
		},
	}
}

func newVerifyCmd(g *globals) *cobra.Command {
	var readData bool
	cmd := &cobra.Command{
		Use:   "verify [--read-data]",
		Short: "Check the repository's structure, and with --read-data every chunk's hash",
		Long: `Check that every index file and manifest is intact, every pack exists with the
right size and every snapshot's block map is readable and complete. With --read-data,
read every pack and check every chunk against its hash. Damaged snapshots are named.
Exit status: 0 healthy, 3 problems found, 1 verify itself failed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			r, err := g.openRepo(ctx)
			if err != nil {
				return err
			}
			var total int64
			var prog *progress
			rep, err := r.Verify(ctx, readData, func(done, t int64) {
				if prog == nil {
					total = t
					prog = newProgress(cmd.ErrOrStderr(), "reading packs", total)
				}
				prog.set(done)
			})
			prog.done()
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			for _, p := range rep.Problems {
				fmt.Fprintln(out, "problem:", p)
			}
			what := "structure"
			if readData {
				what = fmt.Sprintf("structure and data (%s read)", humanize.IBytes(uint64(rep.BytesRead)))
			}
			if !rep.OK() {
				return exitError{3, fmt.Errorf("verify found %d problems (%d damaged snapshots) in %s", len(rep.Problems), len(rep.Damaged), r.Location())}
			}
			fmt.Fprintf(out, "repository %s is healthy: %s of %d snapshots, %d packs, %d blobs checked\n",
				r.Location(), what, rep.Snapshots, rep.Packs, rep.Blobs)
			return nil
		},
	}
	cmd.Flags().BoolVar(&readData, "read-data", false, "read every pack and check every chunk's hash")
	return cmd
}

func newStatsCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "stats [--json]",
		Short: "Show capacity per chain and per snapshot",
		Long: `Show, per volume (chain), its logical size and the bytes stored for it, and per
snapshot the bytes it added when taken and the bytes only it holds (what deleting it and
running gc would free).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := g.openRepo(cmd.Context())
			if err != nil {
				return err
			}
			st, err := r.Stats(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd, st)
			}
			out := cmd.OutOrStdout()
			b := func(n int64) string { return humanize.IBytes(uint64(n)) }
			fmt.Fprintf(out, "repository %s: %s in packs, %s referenced, %s reclaimable by gc\n",
				r.Location(), b(st.PackBytes), b(st.ReferencedBytes), b(st.GarbageBytes))
			for _, c := range st.Chains {
				fmt.Fprintf(out, "\nvolume %s: %d snapshots, logical size %s, stored %s\n", c.Volume, len(c.Snapshots), b(c.LogicalBytes), b(c.StoredBytes))
				tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
				fmt.Fprintln(tw, "  ID\tNAME\tCREATED\tADDED\tEXCLUSIVE")
				for _, s := range c.Snapshots {
					fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\n", s.ID[:12], s.Name, s.Created.Local().Format("2006-01-02 15:04:05"), b(s.NewBytes), b(s.ExclusiveBytes))
				}
				tw.Flush()
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

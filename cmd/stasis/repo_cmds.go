package main

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/stasis-project/stasis/chain"
)

// stamp is how JSON output writes times: RFC 3339, UTC, to the millisecond, everywhere.
func stamp(t time.Time) string { return t.UTC().Format("2006-01-02T15:04:05.000Z07:00") }

// listEntry is one snapshot as `list --json` prints it.
type listEntry struct {
	ID          string         `json:"id"`
	Host        string         `json:"host,omitempty"`
	Volume      string         `json:"volume"`
	Name        string         `json:"name"`
	Created     string         `json:"created"`
	Kind        string         `json:"kind"`
	Consistency string         `json:"consistency"`
	SizeBytes   int64          `json:"size_bytes"`
	NewBytes    int64          `json:"new_bytes"`
	Parent      string         `json:"parent,omitempty"`
	ChunkSize   int            `json:"chunk_size"`
	Source      string         `json:"source,omitempty"`
	Group       string         `json:"group,omitempty"`
	GroupID     string         `json:"group_id,omitempty"`
	Tags        []string       `json:"tags,omitempty"`
	Note        string         `json:"note,omitempty"`
	Protected   bool           `json:"protected,omitempty"`
	Capture     map[string]any `json:"capture,omitempty"`
	App         map[string]any `json:"app,omitempty"`
}

func toListEntry(s *chain.Snapshot) listEntry {
	return listEntry{ID: s.ID, Host: s.Host, Volume: s.Volume, Name: s.Name, Created: stamp(s.Created),
		Kind: s.Kind, Consistency: s.Consistency, SizeBytes: s.SizeBytes, NewBytes: s.NewBytes, Parent: s.Parent,
		ChunkSize: s.ChunkSize, Source: s.Source, Group: s.Group, GroupID: s.GroupID, Tags: s.Tags, Note: s.Note, Protected: s.Protected,
		Capture: s.Capture, App: s.App}
}

func newListCmd(g *globals) *cobra.Command {
	var volume, group, host, tag string
	cmd := &cobra.Command{
		Use:   "list [--host HOST] [--volume NAME] [--group NAME] [--tag TAG]",
		Short: "List snapshots, oldest first",
		Long: `List snapshots, oldest first, of every host that writes to the repository (a HOST
column appears when there are several; --host shows one). Members of a group snapshot
(volumes frozen in one window) show the group's name and share a group ID.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := g.openReader(cmd.Context())
			if err != nil {
				return err
			}
			defer r.Close()
			snaps, bad, err := r.Snapshots(cmd.Context())
			if err != nil {
				return err
			}
			for _, b := range bad {
				g.logger().Warn("unreadable snapshot manifest; run `stasis verify`", "err", b)
			}
			out := []listEntry{}
			hosts := map[string]bool{}
			for _, s := range snaps {
				if (volume == "" || s.Volume == volume) && (group == "" || s.Group == group) && (host == "" || s.Host == host) && (tag == "" || slices.Contains(s.Tags, tag)) {
					out = append(out, toListEntry(s))
					hosts[s.Host] = true
				}
			}
			if g.asJSON {
				return printJSON(cmd, out)
			}
			if g.quiet {
				return nil
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			withHost := len(hosts) > 1
			if withHost {
				fmt.Fprint(tw, "HOST\t")
			}
			fmt.Fprintln(tw, "ID\tVOLUME\tNAME\tCREATED\tKIND\tCONSISTENCY\tSIZE\tNEW\tGROUP\tTAGS")
			for _, s := range out {
				created, _ := time.Parse(time.RFC3339, s.Created)
				grp := "-"
				if s.Group != "" {
					grp = s.Group + "/" + s.GroupID[:8]
				}
				if withHost {
					fmt.Fprintf(tw, "%s\t", s.Host)
				}
				tags := strings.Join(s.Tags, ",")
				if s.Protected {
					tags = strings.TrimPrefix(tags+" [protected]", " ")
				}
				if s.Note != "" {
					tags = strings.TrimPrefix(tags+" \""+trim(s.Note, 40)+"\"", " ")
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.ID[:12], s.Volume, s.Name,
					created.Local().Format("2006-01-02 15:04:05"), s.Kind, s.Consistency,
					humanize.IBytes(uint64(s.SizeBytes)), humanize.IBytes(uint64(s.NewBytes)), grp, tags)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&host, "host", "", "only this host's snapshots")
	cmd.Flags().StringVar(&volume, "volume", "", "only this volume's snapshots")
	cmd.Flags().StringVar(&group, "group", "", "only the members of this group's snapshots")
	cmd.Flags().StringVar(&tag, "tag", "", "only snapshots with this tag")
	return cmd
}

func newDeleteCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:               "delete SNAPSHOT...",
		ValidArgsFunction: g.completeSnapshots,
		Short:             "Delete snapshots (by ID prefix or VOLUME/NAME)",
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
			victims, err := findAll(ctx, r.Reader, args)
			if err != nil {
				return err
			}
			deleted := []listEntry{}
			for _, s := range victims {
				if err := r.Delete(ctx, s); err != nil {
					return err
				}
				deleted = append(deleted, toListEntry(s))
				if !g.asJSON && !g.quiet {
					fmt.Fprintf(cmd.OutOrStdout(), "deleted %s/%s (%s)\n", s.Volume, s.Name, s.ID[:12])
				}
			}
			if g.asJSON {
				return printJSON(cmd, map[string]any{"deleted": deleted})
			}
			return nil
		},
	}
}

// findAll resolves every reference before anything is changed.
func findAll(ctx context.Context, r *chain.Reader, refs []string) ([]*chain.Snapshot, error) {
	snaps, _, err := r.Snapshots(ctx)
	if err != nil {
		return nil, err
	}
	var out []*chain.Snapshot
	for _, ref := range refs {
		s, err := chain.Find(snaps, r.Host(), ref)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

func newProtectCmd(g *globals, on bool) *cobra.Command {
	use, short := "protect", "Keep snapshots from deletion and retention until unprotected"
	if !on {
		use, short = "unprotect", "Let protected snapshots be deleted and pruned again"
	}
	return &cobra.Command{
		Use:               use + " SNAPSHOT...",
		Short:             short,
		Args:              cobra.MinimumNArgs(1),
		ValidArgsFunction: g.completeSnapshots,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			r, err := g.openRepo(ctx)
			if err != nil {
				return err
			}
			defer r.Close()
			todo, err := findAll(ctx, r.Reader, args)
			if err != nil {
				return err
			}
			done := []listEntry{}
			for _, s := range todo {
				if err := r.Protect(ctx, s, on); err != nil {
					return err
				}
				s.Protected = on
				done = append(done, toListEntry(s))
				if !g.asJSON && !g.quiet {
					fmt.Fprintf(cmd.OutOrStdout(), "%sed %s/%s\n", use, s.Volume, s.Name)
				}
			}
			if g.asJSON {
				return printJSON(cmd, done)
			}
			return nil
		},
	}
}

func newGCCmd(g *globals) *cobra.Command {
	var opts chain.GCOptions
	cmd := &cobra.Command{
		Use:   "gc [--dry-run] [--max-unused FRACTION]",
		Short: "Reclaim space no snapshot references",
		Long: `Reclaim space no snapshot references. Packs holding only garbage are deleted; packs
whose garbage exceeds --max-unused (a fraction, default 0.1) are rewritten with their live
chunks. Deletion happens in two steps so that snapshots being written meanwhile, here or on
other hosts, never lose a chunk: packs are first marked, and deleted by a later gc once
every snapshot writer that could have used them has finished. "waiting" lists writers
that hold deletions back. stats' "reclaimable" is what gc would free.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			r, unlock, err := g.lockRepo(ctx)
			if err != nil {
				return err
			}
			defer unlock()
			st, err := r.GC(ctx, opts)
			if err != nil {
				return err
			}
			verb := "freed"
			if opts.DryRun {
				verb = "would free"
			}
			text := fmt.Sprintf("gc: %s %s: %d packs deleted, %d rewritten into %d, %d chunks removed; %s marked for a later gc",
				verb, humanize.IBytes(uint64(max(st.BytesFreed, 0))), st.PacksDeleted, st.PacksRewritten, st.PacksWritten, st.BlobsDeleted,
				humanize.IBytes(uint64(st.BytesMarked)))
			for _, w := range st.Waiting {
				text += "\n  waiting for: " + w
			}
			if st.Waiting == nil {
				st.Waiting = []string{}
			}
			return g.print(cmd, st, text)
		},
	}
	cmd.Flags().BoolVar(&opts.DryRun, "dry-run", false, "say what gc would do; change nothing")
	cmd.Flags().Float64Var(&opts.MaxUnused, "max-unused", 0.1, "rewrite packs whose unused share exceeds this fraction (0 to 1)")
	return cmd
}

func newRepairCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "repair",
		Short: "Rewrite packs with damaged chunks, keeping every intact chunk",
		Long: `Run after verify --read-data found damage. Every pack holding a damaged chunk is read;
its intact chunks are copied to new packs and the old pack is marked for gc. Chunks with no
intact copy stay listed as damaged: the next snapshot of a volume that still has that
content stores it again, which heals every older snapshot that uses it. The snapshots still
damaged afterwards are named.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			r, unlock, err := g.lockRepo(ctx)
			if err != nil {
				return err
			}
			defer unlock()
			rep, err := r.Repair(ctx)
			if err != nil {
				return err
			}
			text := fmt.Sprintf("repair: %d packs rewritten, %d chunks salvaged, %d damaged copies left for gc; %d chunks have no intact copy",
				rep.PacksRewritten, rep.BlobsSalvaged, rep.BlobsDropped, len(rep.Unrecoverable))
			for id := range rep.Damaged {
				text += "\n  still damaged: snapshot " + id
			}
			if err := g.print(cmd, rep, text); err != nil {
				return err
			}
			if len(rep.Damaged) > 0 {
				return exitError{exitDamage, fmt.Errorf("%d snapshots stay damaged until a new snapshot stores the missing chunks", len(rep.Damaged))}
			}
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
			r, err := g.openReader(ctx)
			if err != nil {
				return err
			}
			defer r.Close()
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
			what := "structure"
			if readData {
				what = fmt.Sprintf("structure and data (%s read)", humanize.IBytes(uint64(rep.BytesRead)))
			}
			text := fmt.Sprintf("repository %s is healthy: %s of %d snapshots, %d packs, %d chunks checked",
				r.Location(), what, rep.Snapshots, rep.Packs, rep.Blobs)
			if !rep.OK() {
				text = ""
				for _, p := range rep.Problems {
					text += "problem: " + p + "\n"
				}
				if len(rep.DamagedBlobs) > 0 {
					text += "run `stasis repair` to rewrite the damaged packs, then snapshot the volumes again\n"
				}
			}
			if err := g.print(cmd, rep, strings.TrimSuffix(text, "\n")); err != nil {
				return err
			}
			if !rep.OK() {
				return exitError{exitDamage, fmt.Errorf("verify found %d problems (%d damaged snapshots) in %s", len(rep.Problems), len(rep.Damaged), r.Location())}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&readData, "read-data", false, "read every pack and check every chunk's hash")
	return cmd
}

func newStatsCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "stats",
		Short: "Show capacity per chain and per snapshot",
		Long: `Show, per volume (chain), its logical size and the bytes stored for it, and per
snapshot the bytes it added when taken and the bytes only it holds (what deleting it and
running gc would free).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := g.openReader(cmd.Context())
			if err != nil {
				return err
			}
			defer r.Close()
			st, err := r.Stats(cmd.Context())
			if err != nil {
				return err
			}
			if g.asJSON {
				return printJSON(cmd, st)
			}
			if g.quiet {
				return nil
			}
			out := cmd.OutOrStdout()
			b := func(n int64) string { return humanize.IBytes(uint64(n)) }
			fmt.Fprintf(out, "repository %s: %s in packs, %s referenced, %s reclaimable by gc\n",
				r.Location(), b(st.PackBytes), b(st.ReferencedBytes), b(st.ReclaimableBytes))
			for _, c := range st.Chains {
				vol := c.Volume
				if c.Host != "" && c.Host != r.Host() {
					vol = c.Host + ":" + c.Volume
				}
				fmt.Fprintf(out, "\nvolume %s: %s, logical size %s, stored %s\n", vol, plural(len(c.Snapshots), "snapshot"), b(c.LogicalBytes), b(c.StoredBytes))
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
	return cmd
}

// plural writes "1 snapshot", "2 snapshots".
func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

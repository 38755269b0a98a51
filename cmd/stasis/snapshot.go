package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/stasis-project/stasis/agent"
	"github.com/stasis-project/stasis/agent/control"
	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/capture"
	"github.com/stasis-project/stasis/config"
)

// snapshotJSON is what `snapshot --json` prints: the list fields plus how it was captured.
type snapshotJSON struct {
	listEntry
	agent.Figures
}

type snapshotFlags struct {
	app                  *agent.AppSpec
	source, volume, name string
	tags                 []string
	note                 string
	force                bool
	// done, if set, is told the outcome (configured volumes: after hooks, notify).
	done      func(outs []*agent.Outcome, err error)
	noFreeze  bool
	chunkSize int
	maxFreeze time.Duration
	maxRate   string // --max-read-rate
	rate      int64  // its bytes per second
}

func newSnapshotCmd(g *globals) *cobra.Command {
	var f snapshotFlags
	cmd := &cobra.Command{
		Use:               "snapshot {VOLUME | --source DEV|MOUNTPOINT|IMAGE --volume NAME} [--name NAME]",
		ValidArgsFunction: g.completeConfigured,
		Short:             "Take a snapshot of a block device, partition, mount point or image file",
		Long: `Take a snapshot of --source as the next link of volume --volume's chain. The
volume's first snapshot stores every non-empty chunk; later snapshots store only chunks the
repository does not hold yet.

For a device with mounted filesystems, stasis tracks writes to the device while it reads it
(pre-copy rounds), then freezes every filesystem on it (FIFREEZE) only long enough to read
the chunks written meanwhile, and thaws: the snapshot is the device as it was at the freeze
instant, labelled "fs-frozen". The freeze never lasts longer than --max-freeze; if stasis
dies while frozen, a guard process thaws within --max-freeze + 1 s, and "stasis thaw --all"
thaws whatever stasis froze.

A device with no mounted filesystem, an image file, --no-freeze, or a filesystem that cannot
freeze gives a snapshot read as it is, labelled "crash".

Without --name the snapshot is named manual_YYYYMMDD_HHMMSS (UTC). Names are unique per volume.

With a configuration file, "stasis snapshot VOLUME" snapshots a configured volume with its
settings; when the agent runs, it takes the snapshot (waiting for a running one).`,
		Example: `  stasis snapshot data --name before-upgrade          # a volume of /etc/stasis/stasis.yaml
  stasis snapshot --source /dev/vdb --volume data --name before-upgrade
  stasis snapshot --source /var/lib/mysql --volume db --json`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if f.maxRate != "" {
				n, err := config.ParseRate(f.maxRate)
				if err != nil {
					return fmt.Errorf("--max-read-rate %w", err)
				}
				f.rate = n
			}
			if len(args) == 1 {
				return runConfiguredSnapshot(cmd, g, args[0], f)
			}
			return runSnapshot(cmd, g, f)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.source, "source", "", "block device, partition, mount point or image file to snapshot")
	fl.StringVar(&f.volume, "volume", "", "volume (chain) name")
	fl.StringVar(&f.name, "name", "", "snapshot name, unique in the volume")
	fl.StringSliceVar(&f.tags, "tag", nil, "a tag for the snapshot (repeat, or comma-separated); list --tag filters on it")
	fl.StringVar(&f.note, "note", "", "a note describing the snapshot, shown by list")
	fl.BoolVar(&f.force, "force", false, "add to the volume's chain even if the source is not the one the chain was made from (another filesystem or size)")
	fl.BoolVar(&f.noFreeze, "no-freeze", false, "do not freeze filesystems (crash-consistent snapshot)")
	fl.DurationVar(&f.maxFreeze, "max-freeze", 5*time.Second, "longest time filesystems may stay frozen")
	fl.IntVar(&f.chunkSize, "chunk-size", 0, "chunk size in bytes for a new volume (default 65536); fixed afterwards")
	fl.StringVar(&f.maxRate, "max-read-rate", "", "pace reads before the freeze, like 200MiB/s (the frozen final round is never paced)")
	return cmd
}

// runConfiguredSnapshot snapshots a configured volume or group, through the agent when it
// runs.
func runConfiguredSnapshot(cmd *cobra.Command, g *globals, name string, f snapshotFlags) error {
	if f.source != "" || f.volume != "" {
		return fmt.Errorf("give either a configured VOLUME (or GROUP) or --source and --volume, not both")
	}
	cfg, err := g.loadConfig()
	if err != nil {
		return err
	}
	v, grp := cfg.VolumeByName(name), cfg.GroupByName(name)
	if v == nil && grp == nil {
		return fmt.Errorf("no volume or group %q in %s", name, cfg.Path)
	}
	prog := newProgress(cmd.ErrOrStderr(), "snapshot of "+name, 0)
	if f.maxRate != "" && control.Running(cfg.Socket) {
		return fmt.Errorf("the agent takes this snapshot, with max_read_rate from %s: drop --max-read-rate, or set max_read_rate there", cfg.Path)
	}
	resp, err := control.CallWithProgress(cfg.Socket, control.Request{Op: "snapshot", Volume: name, Name: f.name, Tags: f.tags, Note: f.note, Force: f.force},
		func(note string) { prog.done(); fmt.Fprintln(cmd.ErrOrStderr(), note) }, prog.both)
	prog.done()
	if err == nil {
		reports := resp.Group
		if len(reports) == 0 {
			reports = []*agent.SnapshotReport{resp.Snapshot}
		}
		for _, r := range reports {
			r.Snapshot.ID = r.ID           // manifests carry their ID in their name, not their JSON
			for _, w := range r.Warnings { // the agent logged them to its journal, not here
				fmt.Fprintf(cmd.ErrOrStderr(), "stasis: warning: %s: %s\n", r.Snapshot.Volume, w)
			}
		}
		return printSnapshots(cmd, g.asJSON, reports)
	}
	if !errors.Is(err, control.ErrNoAgent) {
		return err
	}
	g.repo = cfg.Repository
	// The configured repository is created on first use, as the agent does.
	r, err := g.accessFor(cfg).openOrInit(cmd.Context(), cfg.Repository)
	if err != nil {
		return err
	}
	r.Close()
	if grp != nil {
		f.done = func(outs []*agent.Outcome, err error) {
			agent.AfterSnapshot(cmd.Context(), grp.Hooks, cfg.Notify, agent.NewResult(r.Host(), name, chain.KindManual, outs, err), g.logger())
		}
		return runGroupSnapshot(cmd, g, cfg, grp, f)
	}
	f.source, f.volume = v.Source, v.Name
	if !cmd.Flags().Changed("max-freeze") {
		f.maxFreeze = time.Duration(v.MaxFreeze)
	}
	f.noFreeze = f.noFreeze || v.NoFreeze
	f.chunkSize = v.ChunkSize
	if f.maxRate == "" {
		f.rate = v.MaxReadRateBytes
	}
	f.app = agent.SpecFromConfig(*v).App
	f.done = func(outs []*agent.Outcome, err error) {
		agent.AfterSnapshot(cmd.Context(), v.Hooks, cfg.Notify, agent.NewResult(r.Host(), name, chain.KindManual, outs, err), g.logger())
	}
	return runSnapshot(cmd, g, f)
}

// runGroupSnapshot snapshots a configured group without the agent.
func runGroupSnapshot(cmd *cobra.Command, g *globals, cfg *config.Config, grp *config.Group, f snapshotFlags) error {
	ctx := cmd.Context()
	opts, err := g.volumeOptions()
	if err != nil {
		return err
	}
	var vols []*agent.Volume
	for _, name := range grp.Volumes {
		vc := cfg.VolumeByName(name)
		if _, err := capture.Resolve(vc.Source); err != nil {
			return fmt.Errorf("volume %s: %w", name, err)
		}
		spec := agent.SpecFromConfig(*vc)
		if f.maxRate != "" {
			spec.MaxReadRate = f.rate
		}
		vol := agent.NewVolume(spec, opts)
		defer vol.Close()
		vols = append(vols, vol)
	}
	spec := agent.GroupSpecFromConfig(*grp)
	if cmd.Flags().Changed("max-freeze") {
		spec.MaxFreeze = f.maxFreeze
	}
	r, err := g.openRepo(ctx) // snapshots take no lock (see chain/leases.go)
	if err != nil {
		return err
	}
	defer r.Close()
	prog := newProgress(cmd.ErrOrStderr(), "reading group "+grp.Name, 0)
	outs, err := agent.SnapshotGroup(ctx, r, spec, vols, f.request(prog))
	prog.done()
	if f.done != nil {
		f.done(outs, err)
	}
	if err != nil {
		return err
	}
	var reports []*agent.SnapshotReport
	for _, o := range outs {
		reports = append(reports, agent.Report(o))
	}
	return printSnapshots(cmd, g.asJSON, reports)
}

// volumeOptions is how the CLI's volumes work: its logger and log holder, its own
// executable as the freeze guard, and the test seams.
func (g *globals) volumeOptions() (agent.Options, error) {
	exe, err := os.Executable()
	if err != nil {
		return agent.Options{}, err
	}
	return agent.Options{Log: g.logger(), GuardCommand: []string{exe, "freeze-guard"}, Hold: g.logHold,
		FreezeHook: testFreezeHook(), TrackerDisk: testTrackerDisk()}, nil
}

// request is what the flags ask of a manual snapshot.
func (f snapshotFlags) request(prog *progress) agent.Request {
	return agent.Request{Name: f.name, Kind: chain.KindManual, Tags: f.tags, Note: f.note, Force: f.force, Progress: prog.add, AddTotal: prog.addTotal}
}

func runSnapshot(cmd *cobra.Command, g *globals, f snapshotFlags) error {
	ctx := cmd.Context()
	if f.source == "" || f.volume == "" {
		return fmt.Errorf("--source and --volume are required")
	}
	if err := chain.ValidName("volume", f.volume); err != nil {
		return err
	}
	if f.maxFreeze <= 0 {
		return fmt.Errorf("--max-freeze must be positive")
	}
	// Manifests record where a snapshot came from: an absolute path.
	if abs, err := filepath.Abs(f.source); err == nil {
		f.source = abs
	}
	// Check the source before opening the repository, so a typo fails fast.
	if _, err := capture.Resolve(f.source); err != nil {
		return err
	}
	opts, err := g.volumeOptions()
	if err != nil {
		return err
	}
	vol := agent.NewVolume(agent.VolumeSpec{Name: f.volume, Source: f.source, MaxFreeze: f.maxFreeze,
		NoFreeze: f.noFreeze, ChunkSize: f.chunkSize, App: f.app, MaxReadRate: f.rate}, opts)
	defer vol.Close()
	r, err := g.openRepo(ctx) // snapshots take no lock (see chain/leases.go)
	if err != nil {
		return err
	}
	defer r.Close()
	prog := newProgress(cmd.ErrOrStderr(), "reading "+f.source, 0)
	out, err := vol.Snapshot(ctx, r, f.request(prog))
	prog.done()
	if f.done != nil {
		f.done([]*agent.Outcome{out}, err)
	}
	if err != nil {
		return err
	}
	return printSnapshots(cmd, g.asJSON, []*agent.SnapshotReport{agent.Report(out)})
}

// printSnapshots prints one snapshot, or a group snapshot's members (a JSON array).
func printSnapshots(cmd *cobra.Command, asJSON bool, reports []*agent.SnapshotReport) error {
	if asJSON {
		if len(reports) == 1 {
			return printJSON(cmd, snapshotJSON{listEntry: toListEntry(reports[0].Snapshot), Figures: reports[0].Figures})
		}
		out := []snapshotJSON{}
		for _, r := range reports {
			out = append(out, snapshotJSON{listEntry: toListEntry(r.Snapshot), Figures: r.Figures})
		}
		return printJSON(cmd, out)
	}
	for _, r := range reports {
		printSnapshot(cmd, r)
	}
	return nil
}

func printSnapshot(cmd *cobra.Command, r *agent.SnapshotReport) {
	s := r.Snapshot
	frozen := ""
	if r.FreezeMS > 0 {
		frozen = fmt.Sprintf(", frozen %.1f ms", r.FreezeMS)
	}
	fmt.Fprintf(cmd.OutOrStdout(), "snapshot %s/%s (%s, %s): %s volume, read %s in %s, %s new in %s%s\n",
		s.Volume, s.Name, s.ID[:12], s.Consistency, humanize.IBytes(uint64(s.SizeBytes)), humanize.IBytes(uint64(r.BytesRead)),
		plural(r.Rounds, "round"), humanize.IBytes(uint64(s.NewBytes)), (time.Duration(r.DurationMS) * time.Millisecond).String(), frozen)
}

// testFreezeHook is a seam for the end-to-end tests, which must observe the device at the
// freeze instant: STASIS_TEST_FREEZE_HOOK is a shell command run inside the freeze window
// (it must not write to the frozen filesystems), STASIS_TEST_HOLD_FREEZE a duration to wait
// there. Neither is meant for users.
func testFreezeHook() func() {
	hook := os.Getenv("STASIS_TEST_FREEZE_HOOK")
	hold, _ := time.ParseDuration(os.Getenv("STASIS_TEST_HOLD_FREEZE"))
	if hook == "" && hold == 0 {
		return nil
	}
	return func() {
		if hook != "" {
			exec.Command("sh", "-c", hook).Run()
		}
		time.Sleep(hold)
	}
}

// testTrackerDisk is a seam for the end-to-end tests: STASIS_TEST_TRACKER_DISK=MAJ:MIN
// makes the tracker watch another device than the snapshot's, which its proof must catch.
func testTrackerDisk() func(uint64) uint64 {
	d := os.Getenv("STASIS_TEST_TRACKER_DISK")
	if d == "" {
		return nil
	}
	var maj, min uint32
	if _, err := fmt.Sscanf(d, "%d:%d", &maj, &min); err != nil {
		return nil
	}
	return func(uint64) uint64 { return unix.Mkdev(maj, min) }
}

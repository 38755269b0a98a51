package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/stasis-project/stasis/agent"
	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/capture"
)

// snapshotJSON is what `snapshot --json` prints: the list fields plus how it was captured.
type snapshotJSON struct {
	listEntry
	agent.Figures
}

type snapshotFlags struct {
	app                  *agent.AppSpec
	source, volume, name string
	asJSON, noFreeze     bool
	chunkSize            int
	maxFreeze            time.Duration
}

func newSnapshotCmd(g *globals) *cobra.Command {
	var f snapshotFlags
	cmd := &cobra.Command{
		Use:   "snapshot {VOLUME | --source DEV|MOUNTPOINT|IMAGE --volume NAME} [--name NAME]",
		Short: "Take a snapshot of a block device, partition, mount point or image file",
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
	fl.BoolVar(&f.asJSON, "json", false, "print the result as JSON")
	fl.BoolVar(&f.noFreeze, "no-freeze", false, "do not freeze filesystems (crash-consistent snapshot)")
	fl.DurationVar(&f.maxFreeze, "max-freeze", 5*time.Second, "longest time filesystems may stay frozen")
	fl.IntVar(&f.chunkSize, "chunk-size", 0, "chunk size in bytes for a new volume (default 65536); fixed afterwards")
	return cmd
}

// runConfiguredSnapshot snapshots a configured volume, through the agent when it runs.
func runConfiguredSnapshot(cmd *cobra.Command, g *globals, volume string, f snapshotFlags) error {
	if f.source != "" || f.volume != "" {
		return fmt.Errorf("give either a configured VOLUME or --source and --volume, not both")
	}
	cfg, err := g.loadConfig()
	if err != nil {
		return err
	}
	v := cfg.VolumeByName(volume)
	if v == nil {
		return fmt.Errorf("no volume %q in %s", volume, cfg.Path)
	}
	resp, err := agent.Call(cfg.Socket, agent.ControlRequest{Op: "snapshot", Volume: volume, Name: f.name},
		func(note string) { fmt.Fprintln(cmd.ErrOrStderr(), note) })
	if err == nil {
		resp.Snapshot.Snapshot.ID = resp.Snapshot.ID // manifests carry their ID in their name, not their JSON
		return printSnapshot(cmd, f.asJSON, resp.Snapshot)
	}
	if !errors.Is(err, agent.ErrNoAgent) {
		return err
	}
	g.repo = cfg.Repository
	// The configured repository is created on first use, as the agent does.
	if _, err := openOrCreateRepo(g.logger())(cfg.Repository); err != nil {
		return err
	}
	f.source, f.volume = v.Source, v.Name
	if !cmd.Flags().Changed("max-freeze") {
		f.maxFreeze = time.Duration(v.MaxFreeze)
	}
	f.noFreeze = f.noFreeze || v.NoFreeze
	f.chunkSize = v.ChunkSize
	f.app = agent.SpecFromConfig(*v).App
	return runSnapshot(cmd, g, f)
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
	// Check the source before taking the repository lock, so a typo fails fast.
	if _, err := capture.Resolve(f.source); err != nil {
		return err
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	log := g.logger()
	vol := agent.NewVolume(agent.VolumeSpec{Name: f.volume, Source: f.source, MaxFreeze: f.maxFreeze,
		NoFreeze: f.noFreeze, ChunkSize: f.chunkSize, App: f.app},
		agent.Options{Log: log, GuardCommand: []string{exe, "freeze-guard"}, Hold: g.logHold, FreezeHook: testFreezeHook()})
	defer vol.Close()
	r, unlock, err := g.lockRepo(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	prog := newProgress(cmd.ErrOrStderr(), "reading "+f.source, 0)
	out, err := vol.Snapshot(ctx, r, agent.Request{Name: f.name, Kind: chain.KindManual, Progress: prog.add})
	prog.done()
	if err != nil {
		return err
	}
	return printSnapshot(cmd, f.asJSON, agent.Report(out))
}

func printSnapshot(cmd *cobra.Command, asJSON bool, r *agent.SnapshotReport) error {
	s := r.Snapshot
	if asJSON {
		return printJSON(cmd, snapshotJSON{listEntry: toListEntry(s), Figures: r.Figures})
	}
	frozen := ""
	if r.FreezeMS > 0 {
		frozen = fmt.Sprintf(", frozen %.1f ms", r.FreezeMS)
	}
	fmt.Fprintf(cmd.OutOrStdout(), "snapshot %s/%s (%s, %s): %s volume, read %s in %d rounds, %s new in %s%s\n",
		s.Volume, s.Name, s.ID[:12], s.Consistency, humanize.IBytes(uint64(s.SizeBytes)), humanize.IBytes(uint64(r.BytesRead)),
		r.Rounds, humanize.IBytes(uint64(s.NewBytes)), (time.Duration(r.DurationMS) * time.Millisecond).String(), frozen)
	return nil
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

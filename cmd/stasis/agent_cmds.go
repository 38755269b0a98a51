package main

import (
	"context"
	"errors"
	"fmt"
	"github.com/stasis-project/stasis/agent/retention"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/stasis-project/stasis/agent"
	"github.com/stasis-project/stasis/agent/control"
	"github.com/stasis-project/stasis/agent/mysql"
	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/capture"
	"github.com/stasis-project/stasis/config"
	"github.com/stasis-project/stasis/fusemount"
)

// sourceProber checks configured sources against this machine for config validation.
type sourceProber struct{}

func (sourceProber) Devices(source string) ([]string, error) {
	v, err := capture.Resolve(source)
	if err != nil {
		return nil, err
	}
	if v.IsFile {
		p, err := filepath.EvalSymlinks(source)
		if err != nil {
			return nil, err
		}
		return []string{"file " + p}, nil
	}
	devs := []string{fmt.Sprintf("device %d:%d", unix.Major(v.Dev), unix.Minor(v.Dev))}
	if v.Disk != v.Dev {
		devs = append(devs, fmt.Sprintf("device %d:%d", unix.Major(v.Disk), unix.Minor(v.Disk)))
	}
	return devs, nil
}

// loadConfig reads the configuration named by --config (or the default file).
func (g *globals) loadConfig() (*config.Config, error) {
	path := g.config
	if path == "" {
		path = config.DefaultPath
	}
	return config.Load(path, sourceProber{})
}

// haveConfig reports whether commands should use a configuration file.
func (g *globals) haveConfig() bool {
	if g.config != "" {
		return true
	}
	_, err := os.Stat(config.DefaultPath)
	return err == nil && g.repo == "" && os.Getenv("STASIS_REPO") == ""
}

func newConfigCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "config", Short: "Work with the configuration file"}
	cmd.AddCommand(&cobra.Command{
		Use:   "check [FILE]",
		Short: "Validate a configuration file as the agent would at start",
		Long: `Validate FILE (default --config or ` + config.DefaultPath + `): keys, types, schedules, time
zones, volume names, and against this machine: sources exist and no two volumes overlap.
Every problem is listed with its line.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 1 {
				g.config = args[0]
			}
			c, err := g.loadConfig()
			if err != nil {
				return err
			}
			// Databases: the DSN connects and the account has what a snapshot needs.
			var dbErrs []string
			for _, v := range c.Volumes {
				spec := agent.SpecFromConfig(v)
				if spec.App == nil || spec.App.MySQL == nil || spec.App.MySQL.Mode == "none" {
					continue
				}
				dsn, err := mysql.ReadDSN(spec.App.DSNFile)
				if err == nil {
					cfg := *spec.App.MySQL
					cfg.DSN = dsn
					err = mysql.Check(cmd.Context(), cfg)
				}
				if err != nil {
					dbErrs = append(dbErrs, fmt.Sprintf("%s: volume %s: %v", c.Path, v.Name, err))
				}
			}
			if len(dbErrs) > 0 {
				return errors.New(strings.Join(dbErrs, "\n"))
			}
			type volumeCheck struct {
				Name   string `json:"name"`
				Source string `json:"source"`
				Next   string `json:"next_snapshot,omitempty"`
			}
			out := struct {
				Path       string        `json:"path"`
				Valid      bool          `json:"valid"`
				Repository string        `json:"repository"`
				Volumes    []volumeCheck `json:"volumes"`
			}{Path: c.Path, Valid: true, Repository: c.Repository, Volumes: []volumeCheck{}}
			text := fmt.Sprintf("%s is valid: repository %s, %s", c.Path, c.Repository, plural(len(c.Volumes), "volume"))
			if len(c.Volumes) == 0 {
				text += "\n  no volumes yet: add one under volumes: (name and source) and reload the agent"
			}
			for _, v := range c.Volumes {
				next := time.Time{}
				for _, s := range v.Parsed {
					if n := s.Next(time.Now()); next.IsZero() || n.Before(next) {
						next = n
					}
				}
				vc := volumeCheck{Name: v.Name, Source: v.Source}
				when := "no automatic snapshots (schedules: [])"
				if !next.IsZero() {
					vc.Next = stamp(next)
					when = "next snapshot " + next.Local().Format(time.RFC3339)
				}
				out.Volumes = append(out.Volumes, vc)
				text += fmt.Sprintf("\n  %s: %s, %s", v.Name, v.Source, when)
			}
			return g.print(cmd, out, text)
		},
	})
	return cmd
}

func newAgentCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "agent [--config FILE]",
		Short: "Run the snapshot service (schedules, retention, live tracking, control socket)",
		Long: `Run as a service (systemd Type=notify): snapshot each configured volume on its schedules,
apply retention after each snapshot, keep a changed-block tracker running between snapshots
so incrementals read only what changed, and answer the CLI on the control socket.
SIGHUP reloads the configuration (an invalid one is refused and the old one kept); SIGTERM
finishes or aborts the running snapshot (never leaving anything frozen) and exits.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			g.service = true
			cfg, err := g.loadConfig()
			if err != nil {
				return err
			}
			log := g.logger()
			exe, err := os.Executable()
			if err != nil {
				return err
			}
			acc := g.accessFor(cfg)
			svc, err := agent.NewService(ctx, cfg, g.loadConfig, func(ctx context.Context, loc, passwordFile string) (*chain.Repository, error) {
				a := *acc
				a.passwordFile = passwordFile
				return a.openOrInit(ctx, loc)
			},
				agent.Options{Log: log, GuardCommand: []string{exe, "freeze-guard"}, Hold: g.logHold, FreezeHook: testFreezeHook()})
			if err != nil {
				return err
			}
			ctx, cancel := context.WithCancel(ctx)
			defer cancel()
			if cfg.Mount != nil && *cfg.Mount != "" {
				// The view of the snapshots; a dead agent's stale mount is cleared first.
				exec.Command("fusermount3", "-uz", *cfg.Mount).Run()
				os.MkdirAll(*cfg.Mount, 0o755)
				m, err := fusemount.Mount(svc.Repository().Reader, localDir(cfg.Repository), *cfg.Mount, fusemount.Options{Log: log, AllowOther: cfg.MountAllowOther})
				if err != nil {
					return fmt.Errorf("mount %s: %w; set mount: \"\" to run without the view", *cfg.Mount, err)
				}
				defer func() {
					if err := m.Unmount(); err != nil {
						log.Warn("leaving the view mounted lazily", "err", err)
						exec.Command("fusermount3", "-uz", *cfg.Mount).Run()
					}
				}()
			}
			errc := make(chan error, 2)
			go func() { errc <- control.Serve(ctx, cfg.Socket, cfg.SocketGroup, svc, log) }()
			if cfg.MetricsListen != "" {
				go func() {
					if err := svc.ServeMetrics(ctx, cfg.MetricsListen); err != nil {
						errc <- fmt.Errorf("metrics_listen %s: %w", cfg.MetricsListen, err)
					}
				}()
			}
			hup := make(chan os.Signal, 1)
			signal.Notify(hup, syscall.SIGHUP)
			reload := make(chan struct{}, 1)
			go func() {
				for range hup {
					select {
					case reload <- struct{}{}:
					default:
					}
				}
			}()
			runErr := make(chan error, 1)
			go func() { runErr <- svc.Run(ctx, reload) }()
			select {
			case err := <-errc:
				cancel()
				<-runErr
				return err
			case err := <-runErr:
				return err
			}
		},
	}
}

func newStatusCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "status [--json]",
		Short: "Show each volume's last snapshot, next run, tracking and last failure",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := g.loadConfig()
			if err != nil {
				return err
			}
			resp, err := control.Call(cfg.Socket, control.Request{Op: "status"}, nil)
			if err != nil {
				if errors.Is(err, control.ErrNoAgent) {
					return fmt.Errorf("the agent is not running (no answer on %s): start it with `systemctl start stasis`", cfg.Socket)
				}
				return err
			}
			if g.asJSON {
				replicas := resp.Replicas
				if replicas == nil {
					replicas = []*agent.ReplicaStatus{}
				}
				return printJSON(cmd, statusJSON{Volumes: resp.Status, Replicas: replicas})
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "VOLUME\tLAST SNAPSHOT\tRESULT\tFREEZE\tNEXT RUN\tSNAPSHOTS\tTRACKING")
			for _, s := range resp.Status {
				result := s.LastResult
				if s.Running {
					result = "running"
				}
				next := "-"
				if !s.NextRun.IsZero() {
					next = humanize.Time(s.NextRun)
				}
				if !s.RetryAt.IsZero() && (s.NextRun.IsZero() || s.RetryAt.Before(s.NextRun)) {
					next = "retry " + humanize.Time(s.RetryAt)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%.1f ms\t%s\t%d\t%s\n", s.Volume, s.LastSnapshot, trim(result, 40), s.LastFreezeMS, next, s.Snapshots, s.Tracking)
			}
			tw.Flush()
			for _, s := range resp.Status {
				if s.LastFailure != "" {
					fmt.Fprintf(cmd.OutOrStdout(), "\n%s: last failure: %s\n", s.Volume, s.LastFailure)
				}
			}
			for _, rp := range resp.Replicas {
				state := "up to date"
				if rp.Lag > 0 {
					state = plural(rp.Lag, "snapshot") + " behind"
				}
				if rp.Running {
					state += ", copying now"
				}
				fmt.Fprintf(cmd.OutOrStdout(), "\nreplica %s: %s; %s there; last complete pass %s\n", rp.Repository, state, plural(rp.Snapshots, "snapshot"), orNever(rp.LastSuccess))
				if rp.LastError != "" {
					fmt.Fprintf(cmd.OutOrStdout(), "replica %s: last failure at %s: %s\n", rp.Repository, rp.LastErrorAt, rp.LastError)
				}
			}
			return nil
		},
	}
	return cmd
}

// statusJSON is what `status --json` prints.
type statusJSON struct {
	Volumes []agent.VolumeStatus `json:"volumes"`
	// Replicas: one per replica repository (the top-level replicate's first).
	Replicas []*agent.ReplicaStatus `json:"replicas"`
}

func orNever(s string) string {
	if s == "" {
		return "never"
	}
	return s
}

func trim(s string, n int) string {
	if len(s) > n {
		return s[:n-1] + "…"
	}
	return s
}

func newPruneCmd(g *globals) *cobra.Command {
	var dryRun, manualToo bool
	var volume, within string
	var p retention.Policy
	cmd := &cobra.Command{
		Use:   "prune [VOLUME|GROUP] [--dry-run] | prune --keep-... [--volume NAME] [--dry-run]",
		Short: "Apply retention: delete automatic snapshots the policy does not keep, then gc",
		Long: `Apply each configured volume's retention policy (or one volume's or group's), through
the agent when it runs. Or, with --keep-* flags, apply the policy the flags give to this
host's chains in the repository (-r), every volume or --volume NAME, without a configuration
(as restic forget and borg prune do): this is also how the chain of a volume no longer in
the configuration gets pruned.

A snapshot is kept if any rule keeps it: --keep-last N newest, --keep-within DURATION
(e.g. 36h, 14d), or the newest of each of the last N hours, days, weeks, months or years
that have one. Manual snapshots are never deleted (unless --include-manual, with --keep-*
flags), nor is a volume's newest snapshot. With
--dry-run, show every snapshot with the reason it would be kept or deleted, and change
nothing. gc follows (gc_after_prune).`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var decisions []agent.PruneDecision
			flagMode := false
			for _, f := range []string{"keep-last", "keep-within", "keep-hourly", "keep-daily", "keep-weekly", "keep-monthly", "keep-yearly"} {
				flagMode = flagMode || cmd.Flags().Changed(f)
			}
			if flagMode {
				if len(args) > 0 {
					return fmt.Errorf("with --keep-* flags, name the volume with --volume, not as an argument")
				}
				if within != "" {
					d, err := parseAge(within)
					if err != nil {
						return fmt.Errorf("--keep-within: %w", err)
					}
					p.KeepWithin = d
				}
				var err error
				if decisions, err = pruneWithPolicy(cmd.Context(), g, p, volume, dryRun, manualToo); err != nil {
					return err
				}
				return printDecisions(cmd, g, decisions, dryRun)
			}
			if volume != "" {
				return fmt.Errorf("--volume goes with --keep-* flags; for a configured volume, name it as an argument")
			}
			cfg, err := g.loadConfig()
			if err != nil {
				return err
			}
			if len(args) == 1 {
				volume = args[0]
				if cfg.VolumeByName(volume) == nil && cfg.GroupByName(volume) == nil {
					return fmt.Errorf("no volume or group %q in %s (a chain no longer configured: prune --volume %s --keep-last N)", volume, cfg.Path, volume)
				}
			}
			resp, err := control.Call(cfg.Socket, control.Request{Op: "prune", Volume: volume, DryRun: dryRun}, nil)
			switch {
			case err == nil:
				decisions = resp.Decisions
			case errors.Is(err, control.ErrNoAgent):
				decisions, err = pruneDirect(cmd.Context(), g, cfg, volume, dryRun)
				if err != nil {
					return err
				}
			default:
				return err
			}
			return printDecisions(cmd, g, decisions, dryRun)
		},
	}
	fl := cmd.Flags()
	fl.BoolVar(&dryRun, "dry-run", false, "show what would be deleted, delete nothing")
	fl.StringVar(&volume, "volume", "", "with --keep-*: only this volume's chain")
	fl.IntVar(&p.KeepLast, "keep-last", 0, "keep the newest N automatic snapshots")
	fl.StringVar(&within, "keep-within", "", "keep automatic snapshots younger than this (36h, 14d)")
	fl.IntVar(&p.KeepHourly, "keep-hourly", 0, "keep the newest snapshot of each of the last N hours")
	fl.IntVar(&p.KeepDaily, "keep-daily", 0, "keep the newest snapshot of each of the last N days")
	fl.IntVar(&p.KeepWeekly, "keep-weekly", 0, "keep the newest snapshot of each of the last N ISO weeks")
	fl.IntVar(&p.KeepMonthly, "keep-monthly", 0, "keep the newest snapshot of each of the last N months")
	fl.IntVar(&p.KeepYearly, "keep-yearly", 0, "keep the newest snapshot of each of the last N years")
	fl.BoolVar(&manualToo, "include-manual", false, "with --keep-*: apply the rules to manual snapshots too (by default they are never deleted)")
	return cmd
}

// parseAge reads a duration, also in days ("14d").
func parseAge(s string) (time.Duration, error) {
	if d, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.Atoi(d)
		if err != nil || n <= 0 || n > 100000 {
			return 0, fmt.Errorf("%q: write a number of days like 14d, or a duration like 36h", s)
		}
		return time.Duration(n) * 24 * time.Hour, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("%q: write a duration like 36h, or days like 14d", s)
	}
	return d, nil
}

// repoToPrune opens the repository for retention: with the deletion lock, or, for a dry
// run, without.
func (g *globals) repoToPrune(ctx context.Context, dryRun bool) (*chain.Repository, func(), error) {
	if !dryRun {
		return g.lockRepo(ctx)
	}
	r, err := g.openRepo(ctx)
	if err != nil {
		return nil, nil, err
	}
	return r, func() { r.Close() }, nil
}

// pruneWithPolicy applies p to this host's chains (or one), without a configuration.
func pruneWithPolicy(ctx context.Context, g *globals, p retention.Policy, volume string, dryRun, manualToo bool) ([]agent.PruneDecision, error) {
	r, unlock, err := g.repoToPrune(ctx, dryRun)
	if err != nil {
		return nil, err
	}
	defer unlock()
	snaps, _, err := r.Snapshots(ctx)
	if err != nil {
		return nil, err
	}
	var mine []*chain.Snapshot
	for _, s := range chain.OfHost(snaps, r.Host()) {
		if volume == "" || s.Volume == volume {
			mine = append(mine, s)
		}
	}
	if volume != "" && len(mine) == 0 {
		return nil, fmt.Errorf("this host (%s) has no snapshots of volume %q in %s", r.Host(), volume, r.Location())
	}
	decisions, victims := agent.PlanPolicy(mine, p, time.Now(), manualToo)
	if dryRun || len(victims) == 0 {
		return decisions, nil
	}
	if err := r.Delete(ctx, victims...); err != nil {
		return nil, err
	}
	gcAfter := true
	if c := g.configIfAny(); c != nil && c.GCAfterPrune != nil {
		gcAfter = *c.GCAfterPrune
	}
	if gcAfter {
		if _, err := r.GC(ctx, chain.GCOptions{}); err != nil {
			return decisions, err
		}
	}
	return decisions, nil
}

// printDecisions prints what retention decided.
func printDecisions(cmd *cobra.Command, g *globals, decisions []agent.PruneDecision, dryRun bool) error {
	if g.asJSON {
		if decisions == nil {
			decisions = []agent.PruneDecision{}
		}
		return printJSON(cmd, decisions)
	}
	if g.quiet {
		return nil
	}
	verb := "deleted"
	if dryRun {
		verb = "would delete"
	}
	for _, d := range decisions {
		what := "keep"
		if !d.Keep {
			what = verb
		}
		fmt.Fprintf(cmd.OutOrStdout(), "%-12s %s/%s (%s): %s\n", what, d.Volume, d.Name, d.Created.Local().Format("2006-01-02 15:04"), d.Reason)
	}
	return nil
}

// pruneDirect applies retention without an agent.
func pruneDirect(ctx context.Context, g *globals, cfg *config.Config, volume string, dryRun bool) ([]agent.PruneDecision, error) {
	g.repo = cfg.Repository
	r, unlock, err := g.repoToPrune(ctx, dryRun)
	if err != nil {
		return nil, err
	}
	defer unlock()
	return agent.Retain(ctx, r, cfg, volume, dryRun, g.logger()) // as the agent prunes
}

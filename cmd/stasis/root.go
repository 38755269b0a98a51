package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/journal"
	"github.com/spf13/cobra"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/local"
	"github.com/stasis-project/stasis/config"
)

// DefaultRepo is where stasis keeps snapshots when neither -r nor STASIS_REPO says otherwise.
const DefaultRepo = "/var/lib/stasis/repo"

type globals struct {
	repo    string
	config  string
	verbose bool
	logHold *holdHandler
	log     *slog.Logger
	// service logs at Info (what a journal wants); interactive commands only warn.
	service bool
}

func newRootCmd() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:   "stasis",
		Short: "Incremental, application-consistent snapshots of block devices",
		Long: `stasis snapshots block devices (or image files) into a repository as incremental
chains: the first snapshot of a volume is full (empty blocks are not stored), later
ones store only chunks that changed. Any snapshot can be deleted while every other
stays restorable; gc reclaims the space.

The repository is -r DIR, else $STASIS_REPO, else ` + DefaultRepo + `.`,
		Version:       version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVarP(&g.repo, "repo", "r", "", "repository directory (default $STASIS_REPO or "+DefaultRepo+")")
	root.PersistentFlags().BoolVarP(&g.verbose, "verbose", "v", false, "log details to stderr")
	root.PersistentFlags().StringVar(&g.config, "config", "", "configuration file (default "+config.DefaultPath+" when it exists); gives the repository and the volumes")
	root.AddCommand(
		newInitCmd(g), newSnapshotCmd(g), newListCmd(g), newDeleteCmd(g), newGCCmd(g),
		newVerifyCmd(g), newStatsCmd(g), newExportCmd(g), newRestoreCmd(g),
		newThawCmd(), newFreezeGuardCmd(), newAgentCmd(g), newStatusCmd(g), newPruneCmd(g), newConfigCmd(g),
		newMountCmd(g), newUmountCmd(), newDoctorCmd(g),
	)
	return root
}

// repoPath is -r, else the repository of an explicit --config, else $STASIS_REPO, else
// that of the default configuration file if there is one, else DefaultRepo.
func (g *globals) repoPath() string {
	if g.repo != "" {
		return g.repo
	}
	if g.config != "" {
		if c, err := config.Load(g.config, nil); err == nil {
			return c.Repository
		}
		return "" // openRepo reports the configuration's error
	}
	if env := os.Getenv("STASIS_REPO"); env != "" {
		return env
	}
	if g.haveConfig() {
		if c, err := config.Load(config.DefaultPath, nil); err == nil {
			return c.Repository
		}
	}
	return DefaultRepo
}

// logger logs to stderr through a handler that can hold records while filesystems are frozen.
func (g *globals) logger() *slog.Logger {
	if g.log == nil {
		level := slog.LevelWarn
		if g.service {
			level = slog.LevelInfo
		}
		if g.verbose {
			level = slog.LevelDebug
		}
		var h slog.Handler = slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})
		if onJournal, _ := journal.StderrIsJournalStream(); onJournal {
			h = newPriorityHandler(os.Stderr, level) // "<3>" prefixes: priorities for journalctl
		}
		g.logHold = newHoldHandler(h)
		g.log = slog.New(g.logHold)
	}
	return g.log
}

// openRepo opens the repository for reading.
func (g *globals) openRepo(ctx context.Context) (*chain.Repository, error) {
	return g.open(ctx, chain.Open)
}

// openReader opens the repository for reading snapshots only, in memory that does not
// grow with the repository (for the long-running mount).
func (g *globals) openReader(ctx context.Context) (*chain.Repository, error) {
	return g.open(ctx, chain.OpenReader)
}

func (g *globals) open(ctx context.Context, open func(context.Context, chain.Backend, *slog.Logger) (*chain.Repository, error)) (*chain.Repository, error) {
	path := g.repoPath()
	if path == "" {
		if _, err := config.Load(g.config, nil); err != nil {
			return nil, err
		}
	}
	be, err := local.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("repository %s does not exist; create it with `stasis init -r %s`", path, path)
		}
		return nil, err
	}
	return open(ctx, be, g.logger())
}

// lockRepo opens the repository and takes the writer lock, naming this command as holder.
func (g *globals) lockRepo(ctx context.Context) (*chain.Repository, func(), error) {
	r, err := g.openRepo(ctx)
	if err != nil {
		return nil, nil, err
	}
	host, _ := os.Hostname()
	holder := fmt.Sprintf("pid %d (stasis %s) on %s since %s", os.Getpid(),
		strings.Join(os.Args[1:], " "), host, time.Now().UTC().Format(time.RFC3339))
	unlock, err := r.Lock(ctx, holder)
	if err != nil {
		r.Backend().Close()
		return nil, nil, err
	}
	return r, func() { unlock(); r.Backend().Close() }, nil
}

func newInitCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "init",
		Short: "Create a repository",
		Long:  "Create an empty repository in a new or empty directory (-r, $STASIS_REPO or " + DefaultRepo + ").",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			path := g.repoPath()
			if entries, err := os.ReadDir(path); err == nil && len(entries) > 0 {
				if _, err := os.Stat(filepath.Join(path, "config")); err == nil {
					return fmt.Errorf("%s is already a repository: %w", path, chain.ErrExists)
				}
				return fmt.Errorf("%s is not empty and is not a stasis repository: choose an empty or new directory", path)
			}
			be, err := local.Create(path)
			if err != nil {
				return err
			}
			defer be.Close()
			if err := chain.Init(cmd.Context(), be); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "created repository %s\n", path)
			return nil
		},
	}
}

func printJSON(cmd *cobra.Command, v any) error {
	enc := json.NewEncoder(cmd.OutOrStdout())
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/journal"
	"github.com/spf13/cobra"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/config"
)

// DefaultRepo is where stasis keeps snapshots when neither -r nor STASIS_REPO says otherwise.
const DefaultRepo = "/var/lib/stasis/repo"

type globals struct {
	repo         string
	config       string
	passwordFile string
	cacheDir     string
	asJSON       bool
	quiet        bool
	retryLock    time.Duration
	verbose      bool
	logHold      *holdHandler
	log          *slog.Logger
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

The repository is -r DIR, else $STASIS_REPO, else ` + DefaultRepo + `.

` + exitCodesHelp,
		Version:       version,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRun: func(*cobra.Command, []string) {
			progressOff = g.quiet
		},
	}
	root.PersistentFlags().StringVarP(&g.repo, "repo", "r", "", "repository: a directory or s3:https://host/bucket/prefix (default $STASIS_REPO or "+DefaultRepo+")")
	root.PersistentFlags().StringVar(&g.passwordFile, "password-file", "", "file holding an encrypted repository's passphrase (default $STASIS_PASSWORD_FILE, else asked)")
	root.PersistentFlags().StringVar(&g.cacheDir, "cache-dir", "", "where checked copies of index files are kept (default /var/cache/stasis, or ~/.cache/stasis)")
	root.PersistentFlags().BoolVarP(&g.verbose, "verbose", "v", false, "log details to stderr")
	root.PersistentFlags().BoolVar(&g.asJSON, "json", false, "print results as JSON (times in RFC 3339, UTC, to the millisecond)")
	root.PersistentFlags().BoolVarP(&g.quiet, "quiet", "q", false, "print nothing but errors (and JSON when asked)")
	root.PersistentFlags().DurationVar(&g.retryLock, "retry-lock", 0, "wait up to this long for a repository's deletion lock held by another process (delete, prune, gc, repair)")
	root.PersistentFlags().StringVar(&g.config, "config", "", "configuration file (default "+config.DefaultPath+" when it exists); gives the repository and the volumes")
	root.AddCommand(
		newInitCmd(g), newSnapshotCmd(g), newListCmd(g), newDeleteCmd(g), newGCCmd(g),
		newVerifyCmd(g), newStatsCmd(g), newExportCmd(g), newRestoreCmd(g),
		newThawCmd(), newFreezeGuardCmd(), newAgentCmd(g), newStatusCmd(g), newPruneCmd(g), newConfigCmd(g),
		newMountCmd(g), newUmountCmd(), newDoctorCmd(g), newRepairCmd(g), newKeyCmd(g), newCopyCmd(g), newVersionCmd(g), newProtectCmd(g, true), newProtectCmd(g, false),
		newLsCmd(g), newCatCmd(g), newDiffCmd(g), newHistoryCmd(g), newFindCmd(g),
	)
	for _, c := range buildCommands {
		root.AddCommand(c())
	}
	return root
}

// buildCommands are commands only some builds have (man pages: the packaging's build).
var buildCommands []func() *cobra.Command

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

// access is how this command reaches repositories: flags, environment, configuration.
func (g *globals) access() *access {
	a := &access{log: g.logger(), passwordFile: g.passwordFile, cacheDir: g.cacheDir}
	if c := g.configIfAny(); c != nil {
		a.s3 = c.S3
		if a.passwordFile == "" && os.Getenv("STASIS_PASSWORD_FILE") == "" && g.repoPath() == c.Repository {
			a.passwordFile = c.PasswordFile
		}
		if a.cacheDir == "" {
			a.cacheDir = c.CacheDir
		}
		a.host = c.Host
	}
	if a.cacheDir == "" {
		a.cacheDir = defaultCacheDir()
	}
	return a
}

// accessFor is how the agent reaches its repositories: all from its configuration, never
// a prompt.
func (g *globals) accessFor(cfg *config.Config) *access {
	cache := cfg.CacheDir
	if cache == "" {
		cache = defaultCacheDir()
	}
	return &access{log: g.logger(), passwordFile: cfg.PasswordFile, s3: cfg.S3, cacheDir: cache, host: cfg.Host, noPrompt: true}
}

// localDir is loc when it is a directory, "" for object storage.
func localDir(loc string) string {
	if config.IsRemote(loc) {
		return ""
	}
	return loc
}

// configIfAny is the configuration commands use (--config, or the default file when -r and
// $STASIS_REPO do not name another repository), or nil.
func (g *globals) configIfAny() *config.Config {
	if !g.haveConfig() {
		return nil
	}
	path := g.config
	if path == "" {
		path = config.DefaultPath
	}
	c, err := config.Load(path, nil)
	if err != nil {
		return nil
	}
	return c
}

// defaultCacheDir is /var/cache/stasis for root, else the user's cache directory.
func defaultCacheDir() string {
	if d := os.Getenv("STASIS_CACHE_DIR"); d != "" {
		return d
	}
	if os.Geteuid() == 0 {
		return config.DefaultCacheDir
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "stasis")
	}
	return filepath.Join(os.TempDir(), "stasis-cache")
}

// location is the repository this command works on, checking an explicit --config.
func (g *globals) location() (string, error) {
	loc := g.repoPath()
	if loc == "" {
		if _, err := config.Load(g.config, nil); err != nil {
			return "", err
		}
	}
	return loc, nil
}

// openRepo opens the repository for reading and writing.
func (g *globals) openRepo(ctx context.Context) (*chain.Repository, error) {
	loc, err := g.location()
	if err != nil {
		return nil, err
	}
	return g.access().open(ctx, loc)
}

// openReader opens the repository for reading only.
func (g *globals) openReader(ctx context.Context) (*chain.Reader, error) {
	loc, err := g.location()
	if err != nil {
		return nil, err
	}
	return g.access().openReader(ctx, loc)
}

// holder describes this command for a refused locker.
func holder() string {
	host, _ := os.Hostname()
	return fmt.Sprintf("pid %d (stasis %s) on %s since %s", os.Getpid(),
		strings.Join(os.Args[1:], " "), host, time.Now().UTC().Format(time.RFC3339))
}

// lockRepo opens the repository and takes the deletion lock, naming this command as holder.
func (g *globals) lockRepo(ctx context.Context) (*chain.Repository, func(), error) {
	r, err := g.openRepo(ctx)
	if err != nil {
		return nil, nil, err
	}
	deadline := time.Now().Add(g.retryLock)
	unlock, err := r.Lock(ctx, holder())
	for errors.Is(err, chain.ErrLocked) && time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
		case <-time.After(min(time.Second, time.Until(deadline))):
		}
		if ctx.Err() != nil {
			break
		}
		unlock, err = r.Lock(ctx, holder())
	}
	if err != nil {
		r.Close()
		if errors.Is(err, chain.ErrLocked) {
			return nil, nil, exitError{exitLocked, err}
		}
		return nil, nil, err
	}
	return r, func() { unlock(); r.Close() }, nil
}

// kdfTarget is how long deriving a key from a passphrase should take: half a second, as
// restic and borg choose; STASIS_TEST_KDF_TARGET shortens it for the test suite only.
func kdfTarget() time.Duration {
	if d, err := time.ParseDuration(os.Getenv("STASIS_TEST_KDF_TARGET")); err == nil {
		return d
	}
	return 500 * time.Millisecond
}

func newInitCmd(g *globals) *cobra.Command {
	var encrypt bool
	var compression, copyKeysFrom string
	cmd := &cobra.Command{
		Use:   "init [--encryption] [--compression zstd|fast|none] [--copy-keys-from REPO]",
		Short: "Create a repository",
		Long: `Create an empty repository: a new or empty directory, or an S3 location
(s3:https://host/bucket/prefix, credentials in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY).
The location is -r, $STASIS_REPO or ` + DefaultRepo + `.

With --encryption every stored byte that reveals content is encrypted and authenticated
(AES-256-GCM) under a master key, which a passphrase (asked twice, or --password-file)
wraps; blob IDs are keyed, so the storage's holder cannot confirm guesses. Without it the
repository is not encrypted. --copy-keys-from makes an encrypted repository with the same
master key as another one (its passphrase is asked for), so copies between them are
incremental.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			loc, err := g.location()
			if err != nil {
				return err
			}
			a := g.access()
			opts := chain.InitOptions{Compression: compression}
			if copyKeysFrom != "" {
				src := *a
				src.passwordFile = os.Getenv("STASIS_FROM_PASSWORD_FILE")
				src.passwordEnvOff = true
				from, err := src.openReader(ctx, copyKeysFrom)
				if err != nil {
					return fmt.Errorf("--copy-keys-from: %w", err)
				}
				defer from.Close()
				opts.SameKeysAs = from
				encrypt = true
			}
			if encrypt {
				if opts.Password, err = a.newPassword(loc); err != nil {
					return err
				}
				opts.KDF = chain.TuneKDF(kdfTarget())
			}
			cfg, err := a.initRepo(ctx, loc, opts)
			if err != nil {
				return err
			}
			kind := "an unencrypted"
			if cfg.Encryption != "" {
				kind = "an encrypted (" + cfg.Encryption + ")"
			}
			return g.print(cmd, map[string]any{"location": loc, "id": cfg.ID, "encryption": cfg.Encryption, "compression": codecName(cfg.Compression)},
				fmt.Sprintf("created %s repository %s", kind, loc))
		},
	}
	cmd.Flags().BoolVar(&encrypt, "encryption", false, "encrypt the repository (asks for a passphrase, or --password-file)")
	cmd.Flags().StringVar(&compression, "compression", "", "codec for new chunks: zstd (default), fast, none")
	cmd.Flags().StringVar(&copyKeysFrom, "copy-keys-from", "", "share the master key of this encrypted repository (its passphrase from STASIS_FROM_PASSWORD_FILE or a prompt)")
	return cmd
}

func codecName(c string) string {
	if c == "" {
		return "zstd"
	}
	return c
}

// print reports a command's result: v as JSON with --json, else text unless --quiet.
func (g *globals) print(cmd *cobra.Command, v any, text string) error {
	if g.asJSON {
		return printJSON(cmd, v)
	}
	if !g.quiet && text != "" {
		_, err := fmt.Fprintln(cmd.OutOrStdout(), text)
		return err
	}
	return nil
}

func printJSON(cmd *cobra.Command, v any) error {
	enc := json.NewEncoder(cmd.OutOrStdout())
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newVersionCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version of stasis",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.print(cmd, map[string]string{"version": version, "go": runtime.Version()}, "stasis "+version+" ("+runtime.Version()+")")
		},
	}
}

// completeSnapshots completes snapshot references (VOLUME/NAME) from the repository.
func (g *globals) completeSnapshots(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
	r, err := g.openReader(cmd.Context())
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	defer r.Close()
	snaps, _, _ := r.Snapshots(cmd.Context())
	var out []string
	for _, s := range snaps {
		ref := s.Volume + "/" + s.Name
		if s.Host != "" && s.Host != r.Host() {
			ref = s.Host + ":" + ref
		}
		if strings.HasPrefix(ref, toComplete) {
			out = append(out, ref)
		}
	}
	return out, cobra.ShellCompDirectiveNoFileComp
}

// completeSnapshotFirst completes the first argument as a snapshot, the rest as files.
func (g *globals) completeSnapshotFirst(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveDefault
	}
	return g.completeSnapshots(cmd, args, toComplete)
}

// completeConfigured completes the configuration's volume and group names.
func (g *globals) completeConfigured(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
	c := g.configIfAny()
	if c == nil || len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var out []string
	for _, v := range c.Volumes {
		out = append(out, v.Name)
	}
	for _, gr := range c.Groups {
		out = append(out, gr.Name)
	}
	return out, cobra.ShellCompDirectiveNoFileComp
}

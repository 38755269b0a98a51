package main

import (
	"context"

	"fmt"

	"github.com/spf13/cobra"

	"github.com/stasis-project/stasis/agent/doctor"
	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/config"
)

func newDoctorCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "doctor [--config FILE] [--json]",
		Short: "Check everything that makes a snapshot fail, and say what to do",
		Long: `Check this machine and each configured volume: privileges, FUSE, changed-block
tracking, memory, the repository (exists, locked, free space, on the volume it backs up),
each source (exists, block device, filesystem freezable, device-mapper/md, root filesystem),
retention quota, the database account (connects, grants, long-running queries), the next
scheduled run and the last failure. Each problem comes with what to do.

Exit status: 0 all well, 1 warnings, 2 errors.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			path := g.config
			if path == "" {
				path = config.DefaultPath
			}
			// Without the system checks: doctor reports missing sources itself.
			cfg, err := config.Load(path, nil)
			if err != nil {
				return exitError{exitFailure, err}
			}
			env := doctor.DefaultDoctorEnv()
			env.OpenRepo = func(ctx context.Context) (*chain.Reader, error) {
				r, err := g.accessFor(cfg).openReader(ctx, cfg.Repository)
				if isMissing(err) {
					return nil, fmt.Errorf("%s: %w", cfg.Repository, chain.ErrNotRepository)
				}
				return r, err
			}
			findings := doctor.Doctor(cmd.Context(), cfg, env)
			worst := 0
			for _, f := range findings {
				switch f.Severity {
				case doctor.SevWarning:
					worst = max(worst, 1)
				case doctor.SevError:
					worst = 2
				}
			}
			if g.asJSON {
				if err := printJSON(cmd, findings); err != nil {
					return err
				}
			} else {
				for _, f := range findings {
					where := f.Check
					if f.Volume != "" {
						where = f.Volume + ": " + f.Check
					}
					fmt.Fprintf(cmd.OutOrStdout(), "%-7s %s: %s\n", f.Severity, where, f.Message)
					if f.Fix != "" && f.Severity != doctor.SevOK {
						fmt.Fprintf(cmd.OutOrStdout(), "        fix: %s\n", f.Fix)
					}
				}
			}
			switch worst {
			case 2:
				return exitError{exitDamage, fmt.Errorf("doctor found errors: snapshots will fail until they are fixed")}
			case 1:
				return exitError{exitWarnings, fmt.Errorf("doctor found warnings")}
			}
			return nil
		},
	}
	return cmd
}

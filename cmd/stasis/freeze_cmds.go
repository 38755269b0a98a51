package main

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/stasis-project/stasis/fsfreeze"
)

func newThawCmd() *cobra.Command {
	var all bool
	var stateDir string
	cmd := &cobra.Command{
		Use:   "thaw --all",
		Short: "Thaw every filesystem stasis froze",
		Long: `Thaw every filesystem named in stasis's freeze state files (` + fsfreeze.DefaultStateDir + `),
for example after stasis was killed while a snapshot was in its frozen window and its guard
was killed too. systemd runs it as ExecStopPost. Filesystems that are not frozen are skipped.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !all {
				return fmt.Errorf("say --all: stasis thaws only what it froze, all of it")
			}
			thawed, err := fsfreeze.ThawAll(stateDir)
			for _, m := range thawed {
				fmt.Fprintf(cmd.OutOrStdout(), "thawed %s\n", m)
			}
			if len(thawed) == 0 && err == nil {
				fmt.Fprintln(cmd.OutOrStdout(), "nothing frozen by stasis")
			}
			return err
		},
	}
	cmd.Flags().BoolVar(&all, "all", false, "thaw everything stasis froze")
	cmd.Flags().StringVar(&stateDir, "state-dir", fsfreeze.DefaultStateDir, "freeze state directory")
	cmd.Flags().MarkHidden("state-dir")
	return cmd
}

// newFreezeGuardCmd is the hidden guard process started by every freeze.
func newFreezeGuardCmd() *cobra.Command {
	var deadline time.Duration
	var state string
	cmd := &cobra.Command{
		Use:    "freeze-guard --deadline D --state FILE -- MOUNT...",
		Hidden: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			return fsfreeze.RunGuard(deadline, state, args)
		},
	}
	cmd.Flags().DurationVar(&deadline, "deadline", 6*time.Second, "thaw after this long")
	cmd.Flags().StringVar(&state, "state", "", "state file to remove after thawing")
	return cmd
}

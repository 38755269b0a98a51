//go:build man

// The man page generator links a Markdown renderer whose start-up work every command
// would pay; only the packaging's build (make package: go run -tags man) has it.

package main

import (
	"os"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
)

func init() { buildCommands = append(buildCommands, newManCmd) }

// newManCmd writes man pages for every command (the packages install them).
func newManCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "man DIR",
		Short:  "Write man pages for every command into DIR",
		Hidden: true,
		Args:   cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := os.MkdirAll(args[0], 0o755); err != nil {
				return err
			}
			return doc.GenManTree(cmd.Root(), &doc.GenManHeader{Title: "STASIS", Section: "8", Source: "stasis " + version}, args[0])
		},
	}
}

package main

import (
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/stasis-project/stasis/chain"
)

func newKeyCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "key",
		Short: "Manage the passphrases of an encrypted repository",
		Long: `An encrypted repository has one master key, wrapped by one key file per passphrase
(Argon2id). Adding or removing a passphrase rewrites only key files: no data is
re-encrypted. Whoever knows any passphrase can read every snapshot; removing a key stops
a passphrase from opening the repository, not a copy of the master key someone already took.`,
	}
	cmd.AddCommand(&cobra.Command{
		Use:   "list",
		Short: "List the key files",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := g.openReader(cmd.Context())
			if err != nil {
				return err
			}
			defer r.Close()
			keys, err := r.Keys(cmd.Context())
			if err != nil {
				return err
			}
			type keyEntry struct {
				ID      string `json:"id"`
				Current bool   `json:"current"`
				Created string `json:"created"`
				Host    string `json:"host,omitempty"`
				User    string `json:"user,omitempty"`
			}
			out := []keyEntry{}
			for _, k := range keys {
				out = append(out, keyEntry{ID: k.ID, Current: k.ID == r.KeyID(), Created: stamp(k.Created), Host: k.Host, User: k.User})
			}
			if g.asJSON {
				return printJSON(cmd, out)
			}
			if !r.Encrypted() {
				return g.print(cmd, nil, r.Location()+" is not encrypted: it has no keys")
			}
			if g.quiet {
				return nil
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, " \tID\tCREATED\tHOST\tUSER")
			for _, k := range out {
				mark := " "
				if k.Current {
					mark = "*"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", mark, k.ID[:12], k.Created, k.Host, k.User)
			}
			return tw.Flush()
		},
	})
	var newFile string
	addKey := func(cmd *cobra.Command, r *chain.Repository) (*chain.KeyFile, error) {
		a := g.access()
		a.passwordFile = newFile
		pw, err := a.newPassword("the new key of " + r.Location())
		if err != nil {
			return nil, err
		}
		return r.AddKey(cmd.Context(), pw, chain.TuneKDF(kdfTarget()))
	}
	add := &cobra.Command{
		Use:   "add [--new-password-file FILE]",
		Short: "Add a passphrase (asked twice, or read from --new-password-file)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := g.openRepo(cmd.Context())
			if err != nil {
				return err
			}
			defer r.Close()
			kf, err := addKey(cmd, r)
			if err != nil {
				return err
			}
			return g.print(cmd, map[string]any{"id": kf.ID}, "added key "+kf.ID[:12])
		},
	}
	add.Flags().StringVar(&newFile, "new-password-file", "", "file holding the new passphrase (root's, mode 0600)")
	passwd := &cobra.Command{
		Use:   "passwd [--new-password-file FILE]",
		Short: "Change the passphrase that opened the repository",
		Long: `Add a key for the new passphrase, then remove the key the current passphrase opened.
The new key is saved before the old one goes, so an interruption leaves both working.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := g.openRepo(cmd.Context())
			if err != nil {
				return err
			}
			defer r.Close()
			old := r.KeyID()
			kf, err := addKey(cmd, r)
			if err != nil {
				return err
			}
			if err := r.RemoveKey(cmd.Context(), old); err != nil {
				return fmt.Errorf("the new key %s works, but removing the old one failed: %w", kf.ID[:12], err)
			}
			return g.print(cmd, map[string]any{"id": kf.ID, "removed": old}, fmt.Sprintf("passphrase changed: key %s replaces %s", kf.ID[:12], old[:12]))
		},
	}
	passwd.Flags().StringVar(&newFile, "new-password-file", "", "file holding the new passphrase (root's, mode 0600)")
	cmd.AddCommand(add, passwd, &cobra.Command{
		Use:   "remove KEY-ID",
		Short: "Remove a key file (by ID prefix); the last one cannot go",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := g.openRepo(cmd.Context())
			if err != nil {
				return err
			}
			defer r.Close()
			if err := r.RemoveKey(cmd.Context(), args[0]); err != nil {
				return err
			}
			return g.print(cmd, map[string]any{"removed": args[0]}, "removed key "+args[0])
		},
	})
	return cmd
}

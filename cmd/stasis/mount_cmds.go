package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/stasis-project/stasis/fusemount"
)

func newMountCmd(g *globals) *cobra.Command {
	var opts fusemount.Options
	cmd := &cobra.Command{
		Use:   "mount MOUNTPOINT [--allow-other] [--volume NAME]",
		Short: "Show every snapshot as a read-only file system (until Ctrl-C or umount)",
		Long: `Serve the repository read-only at MOUNTPOINT:

  MOUNTPOINT/<volume>/<snapshot>/      the snapshot's files (ext4 or XFS), with owners, modes,
                                       times, links and xattrs; part1/, part2/... for a
                                       partitioned disk
  MOUNTPOINT/<volume>/<snapshot>.img   the raw volume image, readable at any offset
  MOUNTPOINT/<volume>/<snapshot>.json  the manifest (consistency, binlog position, sizes)
  MOUNTPOINT/<volume>/latest           symlink to the newest snapshot's folder

New snapshots appear and deleted ones disappear without remounting. Copy files back with cp.

Only the mounting user can see the mount unless --allow-other is given; then the kernel
checks each snapshot file's own permissions and ACLs (default_permissions is always on).
A damaged chunk or filesystem gives an I/O error for what it touches, and a log line.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := g.openReader(cmd.Context())
			if err != nil {
				return err
			}
			opts.Log = g.logger()
			m, err := fusemount.Mount(r, localDir(g.repoPath()), args[0], opts)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "serving %s read-only at %s; Ctrl-C or `stasis umount %s` to stop\n", r.Location(), args[0], args[0])
			sig := make(chan os.Signal, 2)
			signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
			done := make(chan struct{})
			go func() { m.Wait(); close(done) }()
			for {
				select {
				case <-done:
					return nil
				case <-sig:
					if err := m.Unmount(); err != nil {
						fmt.Fprintln(cmd.ErrOrStderr(), "stasis:", err)
						continue
					}
					<-done
					return nil
				}
			}
		},
	}
	cmd.Flags().BoolVar(&opts.AllowOther, "allow-other", false, "let other users in (their permissions are checked)")
	cmd.Flags().StringVar(&opts.Volume, "volume", "", "show only this volume")
	return cmd
}

func newUmountCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "umount MOUNTPOINT",
		Short: "Unmount a stasis mount",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			out, err := exec.Command("fusermount3", "-u", args[0]).CombinedOutput()
			if err == nil {
				return nil
			}
			if errors.Is(err, exec.ErrNotFound) {
				if err := syscall.Unmount(args[0], 0); err != nil {
					return fmt.Errorf("unmount %s: %w", args[0], err)
				}
				return nil
			}
			msg := strings.TrimSpace(string(out))
			if abs, err := filepath.Abs(args[0]); err == nil && strings.Contains(msg, "busy") {
				if users := fusemount.Users(abs); len(users) > 0 {
					msg += "; in use by " + strings.Join(users, ", ") + " (close their files or leave the directory, then try again)"
				}
			}
			return fmt.Errorf("unmount %s: %s", args[0], msg)
		},
	}
}

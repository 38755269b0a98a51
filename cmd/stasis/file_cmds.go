package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/files"
	"github.com/stasis-project/stasis/chain/fsimage"
	"github.com/stasis-project/stasis/chain/image"
)

// fileCacheBytes bounds the decompressed chunks a file command keeps: metadata two
// snapshots share is then read and checked once.
const fileCacheBytes = 16 << 20

// splitFileRef splits SNAPSHOT:PATH. SNAPSHOT is [HOST:]VOLUME/NAME (names hold no ':')
// or an ID prefix (then PATH starts with '/'); hasPath is false without a ':' after it.
func splitFileRef(ref string) (snap, p string, hasPath bool) {
	i := strings.IndexAny(ref, ":/")
	if i < 0 {
		return ref, "", false
	}
	if ref[i] == ':' {
		rest := ref[i+1:]
		if j := strings.IndexAny(rest, ":/"); j <= 0 || rest[j] != '/' {
			return ref[:i], rest, true // ID:PATH
		}
		i += 1 + strings.Index(rest, "/") // HOST:VOLUME/NAME...
	}
	k := strings.Index(ref[i:], ":")
	if k < 0 {
		return ref, "", false
	}
	return ref[:i+k], ref[i+k+1:], true
}

// fileSession reads the files of one or more snapshots of one repository.
type fileSession struct {
	r       *chain.Reader
	snaps   []*chain.Snapshot
	cache   *image.Cache
	loaders chan struct{}
	log     *slog.Logger
	// noReadahead turns off sequential read-ahead, for diff and history: they read the
	// scattered pieces that differ and prefetch those.
	noReadahead bool
}

func (g *globals) fileSession(ctx context.Context) (*fileSession, error) {
	r, err := g.openReader(ctx)
	if err != nil {
		return nil, err
	}
	snaps, _, err := r.Snapshots(ctx)
	if err != nil {
		r.Close()
		return nil, err
	}
	return &fileSession{r: r, snaps: snaps, cache: image.NewCache(fileCacheBytes), loaders: make(chan struct{}, 2*runtime.GOMAXPROCS(0)), log: g.logger()}, nil
}

func (fs *fileSession) Close() { fs.r.Close() }

func (fs *fileSession) volume(s *chain.Snapshot) *files.Volume {
	img := image.NewReader(fs.r.SnapshotReader(s), fs.cache, fs.loaders)
	if fs.noReadahead { // comparisons read scattered pieces and prefetch exactly those
		img.WithoutReadahead()
	}
	v := files.Open(img)
	for _, c := range v.Caveats() {
		fs.log.Warn(c)
	}
	return v
}

// open resolves a snapshot reference.
func (fs *fileSession) open(ref string) (*files.Volume, error) {
	s, err := chain.Find(fs.snaps, fs.r.Host(), ref)
	if err != nil {
		return nil, err
	}
	return fs.volume(s), nil
}

// lookup resolves SNAPSHOT:PATH to an entry.
func (fs *fileSession) lookup(ctx context.Context, ref string) (*files.Volume, *files.Entry, error) {
	snap, p, _ := splitFileRef(ref)
	v, err := fs.open(snap)
	if err != nil {
		return nil, nil, err
	}
	e, err := v.Lookup(ctx, p)
	return v, e, err
}

// fileEntry is how ls and find show an entry in JSON.
type fileEntry struct {
	Snapshot string `json:"snapshot,omitempty"` // VOLUME/NAME, for find
	Path     string `json:"path"`
	Name     string `json:"name"`
	Type     string `json:"type"`
	Mode     string `json:"mode"` // permission bits in octal
	UID      uint32 `json:"uid"`
	GID      uint32 `json:"gid"`
	Size     uint64 `json:"size"`
	Nlink    uint32 `json:"nlink"`
	Mtime    string `json:"mtime"`
	Target   string `json:"target,omitempty"`
}

func toFileEntry(e *files.Entry) (fileEntry, error) {
	out := fileEntry{Path: "/" + e.Path, Name: lastName(e.Path), Type: e.Type(), Mode: fmt.Sprintf("%04o", e.Attr.Mode&0o7777),
		UID: e.Attr.UID, GID: e.Attr.GID, Size: e.Attr.Size, Nlink: e.Attr.Nlink, Mtime: stamp(e.Attr.Mtime)}
	if e.Attr.Mode&fsimage.S_IFMT == fsimage.S_IFLNK {
		t, err := e.Readlink()
		if err != nil {
			return out, err
		}
		out.Target = t
	}
	return out, nil
}

func lastName(p string) string {
	if i := strings.LastIndex(p, "/"); i >= 0 {
		return p[i+1:]
	}
	if p == "" {
		return "/"
	}
	return p
}

// lsMode renders a mode as ls -l does.
func lsMode(mode uint32) string {
	typ := map[uint32]byte{fsimage.S_IFDIR: 'd', fsimage.S_IFLNK: 'l', fsimage.S_IFCHR: 'c', fsimage.S_IFBLK: 'b',
		fsimage.S_IFIFO: 'p', fsimage.S_IFSOCK: 's'}[mode&fsimage.S_IFMT]
	if typ == 0 {
		typ = '-'
	}
	b := []byte{typ}
	for i, c := range "rwxrwxrwx" {
		if mode&(1<<(8-i)) != 0 {
			b = append(b, byte(c))
		} else {
			b = append(b, '-')
		}
	}
	special := func(bit uint32, pos int, set, unset byte) {
		if mode&bit != 0 {
			if b[pos] == 'x' {
				b[pos] = set
			} else {
				b[pos] = unset
			}
		}
	}
	special(0o4000, 3, 's', 'S')
	special(0o2000, 6, 's', 'S')
	special(0o1000, 9, 't', 'T')
	return string(b)
}

func newLsCmd(g *globals) *cobra.Command {
	var long bool
	cmd := &cobra.Command{
		Use:               "ls SNAPSHOT[:PATH]",
		ValidArgsFunction: g.completeSnapshotFirst,
		Short:             "List a directory of a snapshot, without mounting it",
		Long: `List PATH (default: the root) in SNAPSHOT ([HOST:]VOLUME/NAME or an ID prefix). A
partitioned disk shows part1, part2... at its root: write VOLUME/NAME:part2/etc. Symbolic
links are not followed. -l shows mode, links, owner (numeric), size and modification time.`,
		Example: "  stasis ls data/daily-2026-12-01:/etc -l\n  stasis ls data/daily-2026-12-01:part2/home --json",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			fs, err := g.fileSession(ctx)
			if err != nil {
				return err
			}
			defer fs.Close()
			snap, p, _ := splitFileRef(args[0])
			v, err := fs.open(snap)
			if err != nil {
				return err
			}
			var entries []*files.Entry
			if clean, err := files.Clean(p); err == nil && clean == "" {
				if entries, err = v.Roots(); err != nil { // part1, part2... on a partitioned disk
					return err
				}
				if len(entries) == 1 && entries[0].FS.Name() == "" {
					if entries, err = entries[0].Children(); err != nil {
						return err
					}
				}
			} else {
				e, err := v.Lookup(ctx, p)
				if err != nil {
					return err
				}
				entries = []*files.Entry{e}
				if e.IsDir() {
					if entries, err = e.Children(); err != nil {
						return err
					}
				}
			}
			out := []fileEntry{}
			for _, e := range entries {
				fe, err := toFileEntry(e)
				if err != nil {
					return err
				}
				out = append(out, fe)
			}
			if g.asJSON {
				return printJSON(cmd, out)
			}
			if g.quiet {
				return nil
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 1, ' ', tabwriter.AlignRight)
			for i, fe := range out {
				name := fe.Name
				if fe.Type == "dir" {
					name += "/"
				}
				if fe.Target != "" {
					name += " -> " + fe.Target
				}
				if !long {
					fmt.Fprintln(cmd.OutOrStdout(), name)
					continue
				}
				mt := entries[i].Attr.Mtime.Local().Format("2006-01-02 15:04")
				fmt.Fprintf(tw, "%s\t %d\t %d\t %d\t %d\t %s\t %s\n", lsMode(entries[i].Attr.Mode), fe.Nlink, fe.UID, fe.GID, fe.Size, mt, name)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVarP(&long, "long", "l", false, "show mode, links, owner, size and time")
	return cmd
}

func newCatCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:               "cat SNAPSHOT:PATH",
		ValidArgsFunction: g.completeSnapshotFirst,
		Short:             "Write a file of a snapshot to standard output",
		Long: `Write the content of the regular file PATH in SNAPSHOT to standard output. Every
byte is checked against its hash; damage stops the output with an error naming the file.`,
		Example: "  stasis cat data/daily-2026-12-01:/etc/fstab\n  stasis cat data/daily-2026-12-01:/var/lib/app/db.sqlite > db.sqlite",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if _, _, ok := splitFileRef(args[0]); !ok {
				return fmt.Errorf("%q names no file: write SNAPSHOT:PATH, like data/daily-2026-12-01:/etc/fstab", args[0])
			}
			fs, err := g.fileSession(cmd.Context())
			if err != nil {
				return err
			}
			defer fs.Close()
			_, e, err := fs.lookup(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if e.Attr.Mode&fsimage.S_IFMT != fsimage.S_IFREG {
				return fmt.Errorf("%s is a %s, not a regular file (see stasis ls)", args[0], e.Type())
			}
			_, err = io.Copy(cmd.OutOrStdout(), io.NewSectionReader(e, 0, int64(e.Attr.Size)))
			return err
		},
	}
}

func newDiffCmd(g *globals) *cobra.Command {
	var opts files.DiffOptions
	cmd := &cobra.Command{
		Use:               "diff OLD NEW [PATH]",
		ValidArgsFunction: g.completeSnapshots,
		Short:             "Show which files changed between two snapshots",
		Long: `Compare the files of snapshot OLD with snapshot NEW (each [HOST:]VOLUME/NAME or an ID
prefix), under PATH or the whole volume. Each changed path is one line:
  +  added          -  removed
  M  content (or a link's target, a device's number) changed
  U  metadata only: mode, owner, mtime, xattrs or ACLs
A path whose type changed is removed, then added. Access times are ignored unless
--atime; change times are never compared (nothing can restore them). Unchanged files are
recognised from the chain's block maps without reading them.`,
		Example: "  stasis diff data/daily-2026-12-01 data/daily-2026-12-02\n  stasis diff data/a data/b /etc --json",
		Args:    cobra.RangeArgs(2, 3),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			fs, err := g.fileSession(ctx)
			if err != nil {
				return err
			}
			defer fs.Close()
			fs.noReadahead = true
			a, err := fs.open(args[0])
			if err != nil {
				return err
			}
			b, err := fs.open(args[1])
			if err != nil {
				return err
			}
			p := ""
			if len(args) == 3 {
				p = args[2]
			}
			changes := []files.Change{}
			w := cmd.OutOrStdout()
			stats, err := files.Diff(ctx, a, b, p, opts, func(c files.Change) error {
				if g.asJSON {
					changes = append(changes, c)
					return nil
				}
				if g.quiet {
					return nil
				}
				name := c.Path
				if c.Type == "dir" && name != "/" {
					name += "/"
				}
				_, err := fmt.Fprintf(w, "%-2s %s\n", c.Op, name)
				return err
			})
			if err != nil {
				return err
			}
			if g.asJSON {
				return printJSON(cmd, map[string]any{"old": snapshotRef(a.Snapshot()), "new": snapshotRef(b.Snapshot()), "changes": changes, "stats": stats})
			}
			return g.print(cmd, nil, fmt.Sprintf("\n%d added, %d removed, %d modified, %d with new metadata; %s added, %s removed",
				stats.Added, stats.Removed, stats.Modified, stats.Metadata, humanize.IBytes(uint64(stats.AddedBytes)), humanize.IBytes(uint64(stats.RemovedBytes))))
		},
	}
	cmd.Flags().BoolVar(&opts.Atime, "atime", false, "report access-time changes too")
	return cmd
}

// snapshotRef is how file commands name a snapshot in JSON.
func snapshotRef(s *chain.Snapshot) map[string]any {
	return map[string]any{"id": s.ID, "host": s.Host, "volume": s.Volume, "name": s.Name, "created": stamp(s.Created)}
}

// splitVolumePath splits [HOST:]VOLUME:PATH, using the repository's snapshots to tell a
// host from a volume (neither name holds ':'; a path may).
func splitVolumePath(snaps []*chain.Snapshot, defaultHost, ref string) (host, volume, p string, err error) {
	first, rest, ok := strings.Cut(ref, ":")
	if !ok {
		return "", "", "", fmt.Errorf("%q names no file: write VOLUME:PATH, like data:/etc/fstab", ref)
	}
	if second, p2, ok := strings.Cut(rest, ":"); ok {
		for _, s := range snaps {
			if s.Host == first && s.Volume == second {
				return first, second, p2, nil
			}
		}
	}
	return defaultHost, first, rest, nil
}

func newHistoryCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "history [HOST:]VOLUME:PATH",
		Short: "List every distinct version of a file across a volume's snapshots",
		Long: `List each distinct content PATH had in the volume's snapshots, oldest first: its
content hash, size, modification time, and the first and last snapshot holding it. The
snapshot to restore a good version from is then one command away. Contents equal to the
previous snapshot's are recognised from the block maps without reading them.`,
		Example: "  stasis history data:/etc/nginx/nginx.conf\n  stasis history web1:data:/var/www/index.html --json",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			fs, err := g.fileSession(ctx)
			if err != nil {
				return err
			}
			defer fs.Close()
			host, volume, p, err := splitVolumePath(fs.snaps, fs.r.Host(), args[0])
			if err != nil {
				return err
			}
			var vols []*files.Volume
			for _, s := range fs.snaps {
				if s.Volume == volume && (s.Host == host || s.Host == "") {
					vols = append(vols, fs.volume(s))
				}
			}
			if len(vols) == 0 {
				return fmt.Errorf("%w: host %s has no snapshots of volume %q (see stasis list)", chain.ErrNotFound, host, volume)
			}
			versions, err := files.History(ctx, vols, p)
			if err != nil {
				return err
			}
			if len(versions) == 0 {
				return fmt.Errorf("%w: no snapshot of %s holds %s", files.ErrNotFound, volume, p)
			}
			type version struct {
				*files.Version
				Mtime string         `json:"mtime"`
				First map[string]any `json:"first"`
				Last  map[string]any `json:"last"`
			}
			out := []version{}
			for _, v := range versions {
				out = append(out, version{Version: v, Mtime: stamp(v.Mtime), First: snapshotRef(v.First), Last: snapshotRef(v.Last)})
			}
			if g.asJSON {
				return printJSON(cmd, out)
			}
			if g.quiet {
				return nil
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "VERSION\tFIRST\tLAST\tSNAPSHOTS\tTYPE\tSIZE\tMODIFIED\tHASH")
			for i, v := range versions {
				fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n", i+1, v.First.Name, v.Last.Name, v.Snapshots, v.Type,
					humanize.IBytes(uint64(v.Size)), v.Mtime.Local().Format("2006-01-02 15:04:05"), v.Hash[:16])
			}
			return tw.Flush()
		},
	}
}

func newFindCmd(g *globals) *cobra.Command {
	var volume, newer, older string
	cmd := &cobra.Command{
		Use:   "find PATTERN",
		Short: "Find which snapshots hold files matching a pattern",
		Long: `Search this host's snapshots for paths matching PATTERN, a glob (* ? [a-z]): on the
whole path from the root when it holds a "/" ("/etc/*.conf", "/home/*/.ssh"), else on
the name ("*.sql"). Each match is printed as SNAPSHOT:PATH, ready for stasis cat or
stasis restore. --newer and --older take a date (2026-12-01, 2026-12-01T08:00:00Z) or an
age (36h, 14d).`,
		Example: "  stasis find '*.sql' --volume data --newer 7d\n  stasis find /etc/nginx/nginx.conf --json",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			pattern := args[0]
			if err := files.ValidPattern(pattern); err != nil {
				return fmt.Errorf("pattern %q: %w (see stasis find --help)", pattern, err)
			}
			var after, before time.Time
			var err error
			if newer != "" {
				if after, err = parseWhen(newer); err != nil {
					return fmt.Errorf("--newer %w", err)
				}
			}
			if older != "" {
				if before, err = parseWhen(older); err != nil {
					return fmt.Errorf("--older %w", err)
				}
			}
			ctx := cmd.Context()
			fs, err := g.fileSession(ctx)
			if err != nil {
				return err
			}
			defer fs.Close()
			host, vol := fs.r.Host(), ""
			if volume != "" {
				host, vol = chain.SplitVolume(host, volume)
			}
			out := []fileEntry{}
			searched := 0
			for _, s := range fs.snaps {
				if (s.Host != host && s.Host != "") || (vol != "" && s.Volume != vol) ||
					(!after.IsZero() && s.Created.Before(after)) || (!before.IsZero() && !s.Created.Before(before)) {
					continue
				}
				searched++
				label := s.Volume + "/" + s.Name
				err := fs.volume(s).Walk(ctx, func(e *files.Entry) error {
					if !files.Match(pattern, e.Path) {
						return nil
					}
					fe, err := toFileEntry(e)
					if err != nil {
						return err
					}
					fe.Snapshot = label
					if g.asJSON {
						out = append(out, fe)
					} else if !g.quiet {
						fmt.Fprintf(cmd.OutOrStdout(), "%s:%s\n", label, fe.Path)
					}
					return nil
				})
				if err != nil {
					return err
				}
			}
			if searched == 0 {
				return fmt.Errorf("%w: no snapshot matches the volume and dates given (see stasis list)", chain.ErrNotFound)
			}
			if g.asJSON {
				return printJSON(cmd, out)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&volume, "volume", "", "only this volume's snapshots ([HOST:]VOLUME)")
	cmd.Flags().StringVar(&newer, "newer", "", "only snapshots taken at or after this date or age")
	cmd.Flags().StringVar(&older, "older", "", "only snapshots taken before this date or age")
	return cmd
}

// parseWhen reads a date (2026-12-01, 2026-12-01T08:00:00Z, local time unless a zone is
// given) or an age before now (36h, 14d).
func parseWhen(s string) (time.Time, error) {
	for _, layout := range []string{time.RFC3339Nano, "2006-01-02T15:04:05", "2006-01-02 15:04:05", "2006-01-02 15:04", "2006-01-02"} {
		if t, err := time.ParseInLocation(layout, s, time.Local); err == nil {
			return t, nil
		}
	}
	if d, err := parseAge(s); err == nil {
		return time.Now().Add(-d), nil
	}
	return time.Time{}, fmt.Errorf("%q: write a date like 2026-12-01 or 2026-12-01T08:00:00Z, or an age like 36h or 14d", s)
}

// restoreFiles is restore SNAPSHOT:PATH --to DIR.
func (g *globals) restoreFiles(cmd *cobra.Command, ref, to string, opts files.RestoreOptions) error {
	ctx := cmd.Context()
	start := time.Now()
	fs, err := g.fileSession(ctx)
	if err != nil {
		return err
	}
	defer fs.Close()
	v, e, err := fs.lookup(ctx, ref)
	if err != nil {
		return err
	}
	prog := newProgress(cmd.ErrOrStderr(), "restoring", 0)
	if !e.IsDir() {
		prog.addTotal(int64(e.Attr.Size))
	} else if prog.active() { // the total costs a walk of the metadata: only for a terminal
		files.Walk(ctx, e, func(x *files.Entry) error {
			if x.Attr.Mode&fsimage.S_IFMT == fsimage.S_IFREG {
				prog.addTotal(int64(x.Attr.Size))
			}
			return nil
		})
	}
	opts.Progress = prog.set
	st, err := files.Restore(ctx, e, to, opts)
	prog.done()
	if err != nil {
		return fmt.Errorf("restore of %s into %s failed (nothing new was left behind%s): %w", ref, to, map[bool]string{true: "; with --overwrite, paths replaced so far stay replaced", false: ""}[opts.Overwrite], err)
	}
	s := v.Snapshot()
	result := map[string]any{"snapshot": snapshotRef(s), "path": "/" + e.Path, "target": to, "stats": st, "duration_ms": time.Since(start).Milliseconds()}
	text := fmt.Sprintf("restored %s:/%s into %s: %d files (%s), %d directories, %d symlinks, %d hard links, %d special files in %s",
		s.Volume+"/"+s.Name, e.Path, to, st.Files, humanize.IBytes(uint64(st.Bytes)), st.Dirs, st.Symlinks, st.Hardlinks, st.Special,
		time.Since(start).Round(time.Millisecond))
	if !st.Owners {
		text += "\nowners were not restored: run as root to restore them"
	}
	if bf, ok := s.App["binlog_file"]; ok {
		result["binlog_file"], result["binlog_position"] = bf, s.App["binlog_position"]
		text += fmt.Sprintf("\n%s snapshot: binlog position %v:%v", s.App["database"], bf, s.App["binlog_position"])
		if gtid, ok := s.App["gtid"]; ok {
			result["gtid"] = gtid
			text += fmt.Sprintf(", GTID %v", gtid)
		}
	}
	if len(st.Problems) > 0 {
		g.print(cmd, result, text)
		for _, p := range st.Problems {
			fmt.Fprintln(cmd.ErrOrStderr(), "stasis: not restored:", p)
		}
		return errors.New("some attributes could not be restored (listed above); the contents were")
	}
	return g.print(cmd, result, text)
}

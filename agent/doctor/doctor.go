// Package doctor is `stasis doctor`: it checks this machine, the configuration, the
// repository and each volume for what would make snapshots fail or be less than they
// claim, and says how to fix each problem.
package doctor

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stasis-project/stasis/agent"
	"github.com/stasis-project/stasis/agent/control"
	"github.com/stasis-project/stasis/agent/mysql"
	"github.com/stasis-project/stasis/agent/trust"
	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/capture"
	"github.com/stasis-project/stasis/chain/capture/blocktrace"
	"github.com/stasis-project/stasis/chain/local"
	"github.com/stasis-project/stasis/config"
)

// Severity of a doctor finding.
const (
	SevOK      = "ok"
	SevWarning = "warning"
	SevError   = "error"
)

// Finding is one doctor check's verdict.
type Finding struct {
	Check    string `json:"check"`
	Volume   string `json:"volume,omitempty"`
	Severity string `json:"severity"`
	Message  string `json:"message"`
	Fix      string `json:"fix,omitempty"`
}

// DoctorEnv is what the doctor reads about the machine; tests replace parts of it.
type DoctorEnv struct {
	Euid         int
	MemAvailable func() (int64, error) // bytes
	Now          time.Time
	FuseDevice   string       // /dev/fuse
	Tracing      func() error // blocktrace.Available
	// OpenRepo opens the configured repository to read (the CLI's way, with its password
	// and S3 settings); nil skips the repository checks.
	OpenRepo func(ctx context.Context) (*chain.Reader, error)
}

// DefaultDoctorEnv reads the real machine.
func DefaultDoctorEnv() DoctorEnv {
	return DoctorEnv{Euid: os.Geteuid(), MemAvailable: memAvailable, Now: time.Now(), FuseDevice: "/dev/fuse", Tracing: blocktrace.Available}
}

// snapshotMemory is what a snapshot needs at most: packs in flight, read buffers, the
// final round's held chunks (see chain and capture).
const snapshotMemory = 256 << 20

// Doctor checks everything that makes a snapshot fail and says what to do about each.
func Doctor(ctx context.Context, cfg *config.Config, env DoctorEnv) []Finding {
	var fs []Finding
	add := func(check, volume, sev, msg, fix string) {
		fs = append(fs, Finding{Check: check, Volume: volume, Severity: sev, Message: msg, Fix: fix})
	}
	if env.Euid != 0 {
		add("privileges", "", SevError, "not running as root: freezing filesystems, reading block devices and tracing need CAP_SYS_ADMIN",
			"run stasis as root (the packaged systemd unit does)")
	} else {
		add("privileges", "", SevOK, "running as root", "")
	}
	if _, err := control.Call(cfg.Socket, control.Request{Op: "status"}, nil); err == nil {
		add("agent", "", SevOK, "the agent answers on "+cfg.Socket, "")
	} else if errors.Is(err, control.ErrNoAgent) {
		add("agent", "", SevWarning, "the agent is not running (nothing answers on "+cfg.Socket+"): no scheduled snapshots are taken",
			"systemctl enable --now stasis")
	} else {
		add("agent", "", SevWarning, "the agent on "+cfg.Socket+" does not answer properly: "+err.Error(), "systemctl restart stasis, and see journalctl -u stasis")
	}
	if _, err := os.Stat(env.FuseDevice); err != nil {
		add("fuse", "", SevWarning, env.FuseDevice+" is missing: the snapshot view cannot be served", "modprobe fuse (and set mount: \"\" if you do not want the view)")
	} else if _, err := exec.LookPath("fusermount3"); err != nil {
		add("fuse", "", SevWarning, "fusermount3 is not installed: the snapshot view cannot be unmounted cleanly", "apt-get install fuse3 (or dnf install fuse3)")
	} else {
		add("fuse", "", SevOK, "/dev/fuse and fusermount3 present", "")
	}
	if env.Tracing == nil {
		env.Tracing = blocktrace.Available
	}
	if err := env.Tracing(); err != nil {
		add("tracking", "", SevWarning, fmt.Sprintf("%v: every snapshot reads its volume whole (full scans), frozen only if a second whole read fits max_freeze, else crash-consistent", err),
			"mount tracefs: mount -t tracefs none /sys/kernel/tracing")
	} else if foreign := blocktrace.ForeignInstances(); len(foreign) > 0 {
		add("tracking", "", SevWarning, "other programs trace block events now (tracefs instances "+strings.Join(foreign, ", ")+"): they compete for trace buffers",
			"stop the other tracer, or expect more full scans after lost events")
	} else {
		add("tracking", "", SevOK, "tracefs block events available", "")
	}
	if env.MemAvailable != nil {
		if avail, err := env.MemAvailable(); err == nil {
			if avail < snapshotMemory {
				add("memory", "", SevWarning, fmt.Sprintf("only %d MiB of memory available; a snapshot may need up to %d MiB", avail>>20, snapshotMemory>>20),
					"free memory or add swap before the next scheduled snapshot")
			} else {
				add("memory", "", SevOK, fmt.Sprintf("%d MiB available", avail>>20), "")
			}
		}
	}
	for _, state := range otherFreezers() {
		add("freeze", "", SevWarning, "another stasis process froze filesystems and is still running: "+state, "wait for it, or run stasis thaw --all if it hangs")
	}
	for _, sec := range secretFiles(cfg) {
		if sec.path == "" {
			continue
		}
		if err := trust.Check(sec.path, true); err != nil {
			add("secrets", "", SevError, sec.key+": "+err.Error(), "chown root:root "+sec.path+" && chmod 600 "+sec.path)
		} else {
			add("secrets", "", SevOK, sec.key+" "+sec.path+" is root's and private", "")
		}
	}
	var snaps []*chain.Snapshot // read once for every check below
	if env.OpenRepo != nil {
		r, err := env.OpenRepo(ctx)
		if err == nil {
			all, _, _ := r.Snapshots(ctx)
			snaps = chain.OfHost(all, r.Host())
			defer r.Close()
		}
		fs = append(fs, doctorRepository(cfg, r, err, snaps)...)
	}
	for _, v := range cfg.Volumes {
		fs = append(fs, doctorVolume(ctx, cfg, v, snaps, env)...)
	}
	return fs
}

// secretFiles lists the configured passphrase files: the repository's and each replica's.
func secretFiles(cfg *config.Config) []struct{ key, path string } {
	out := []struct{ key, path string }{{"password_file", cfg.PasswordFile}}
	if cfg.Replicate != nil {
		out = append(out, struct{ key, path string }{"replicate.password_file", cfg.Replicate.PasswordFile})
	}
	for _, v := range cfg.Volumes {
		if v.Replicate != nil {
			out = append(out, struct{ key, path string }{"volume " + v.Name + " replicate.password_file", v.Replicate.PasswordFile})
		}
	}
	return out
}

func doctorRepository(cfg *config.Config, r *chain.Reader, openErr error, snaps []*chain.Snapshot) []Finding {
	var fs []Finding
	add := func(sev, msg, fix string) {
		fs = append(fs, Finding{Check: "repository", Severity: sev, Message: msg, Fix: fix})
	}
	switch {
	case errors.Is(openErr, chain.ErrNotRepository):
		add(SevWarning, cfg.Repository+" does not exist yet", "the agent creates it at start; or run stasis init -r "+cfg.Repository)
		return fs
	case errors.Is(openErr, chain.ErrNeedPassword):
		add(SevError, cfg.Repository+" is encrypted and no password_file is configured", "set password_file in the configuration to a file holding the passphrase (mode 0600)")
		return fs
	case errors.Is(openErr, chain.ErrWrongPassword):
		add(SevError, "password_file "+cfg.PasswordFile+" does not open "+cfg.Repository, "put the repository's passphrase in it, or add a key for it with stasis key add")
		return fs
	case openErr != nil:
		add(SevError, "cannot read the repository: "+openErr.Error(), "check the repository location, its permissions or network, and the s3 settings")
		return fs
	}
	what := "unencrypted"
	if r.Encrypted() {
		what = "encrypted"
	}
	add(SevOK, fmt.Sprintf("%s opens (%s, %d snapshots of this host)", r.Location(), what, len(snaps)), "")
	for _, o := range orphanedChains(cfg, snaps) {
		add(SevWarning, fmt.Sprintf("volume %s is no longer configured but has %s: retention no longer prunes them", o.volume, plural(o.auto, "automatic snapshot")),
			fmt.Sprintf("stasis prune --volume %s --keep-last N (or stasis delete them), or configure it again", o.volume))
	}
	if config.IsRemote(cfg.Repository) {
		return fs
	}
	if who, locked := local.Holder(cfg.Repository); locked {
		add(SevWarning, "the repository is locked by "+who, "wait for that command to finish (or stop it)")
	}
	var st unix.Statfs_t
	if err := unix.Statfs(cfg.Repository, &st); err == nil {
		free := int64(st.Bavail) * int64(st.Bsize)
		need := expectedGrowth(cfg, snaps)
		if free < need {
			add(SevError, fmt.Sprintf("%d MiB free on the repository's filesystem; the next snapshots likely need %d MiB", free>>20, need>>20),
				"free space, lower retention (keep_auto, keep_days) and run stasis prune, or move the repository")
		} else {
			add(SevOK, fmt.Sprintf("%d MiB free (next snapshots likely need %d MiB)", free>>20, need>>20), "")
		}
	}
	return fs
}

type orphan struct {
	volume string
	auto   int
}

// orphanedChains lists this host's volumes with automatic snapshots that no volume or
// group of the configuration names any more.
func orphanedChains(cfg *config.Config, snaps []*chain.Snapshot) []orphan {
	known := map[string]bool{}
	for _, v := range cfg.Volumes {
		known[v.Name] = true
	}
	counts := map[string]int{}
	var order []string
	for _, s := range snaps {
		if known[s.Volume] || s.Kind != chain.KindAuto {
			continue
		}
		if counts[s.Volume] == 0 {
			order = append(order, s.Volume)
		}
		counts[s.Volume]++
	}
	out := make([]orphan, len(order))
	for i, v := range order {
		out[i] = orphan{v, counts[v]}
	}
	return out
}

func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)
}

// expectedGrowth estimates what the next snapshots add: the largest recent addition, per
// volume, or the allocated size for a volume without snapshots.
func expectedGrowth(cfg *config.Config, snaps []*chain.Snapshot) int64 {
	var total int64
	for _, v := range cfg.Volumes {
		var biggest int64
		n := 0
		for i := len(snaps) - 1; i >= 0 && n < 5; i-- {
			if snaps[i].Volume == v.Name {
				biggest = max(biggest, snaps[i].NewBytes)
				n++
			}
		}
		if n == 0 {
			if vol, err := capture.Resolve(v.Source); err == nil {
				if src, err := capture.OpenSource(vol.Device); err == nil {
					biggest = src.Size / 2 // a first snapshot, compressed: a rough guess
					src.Close()
				}
			}
		}
		total += biggest
	}
	return total
}

var freezable = map[string]bool{"ext2": true, "ext3": true, "ext4": true, "xfs": true, "btrfs": true, "f2fs": true,
	"jfs": true, "reiserfs": true, "gfs2": true, "ocfs2": true, "nilfs2": true}

func doctorVolume(ctx context.Context, cfg *config.Config, v config.Volume, snaps []*chain.Snapshot, env DoctorEnv) []Finding {
	var fs []Finding
	add := func(check, sev, msg, fix string) {
		fs = append(fs, Finding{Check: check, Volume: v.Name, Severity: sev, Message: msg, Fix: fix})
	}
	vol, err := capture.Resolve(v.Source)
	if err != nil {
		add("source", SevError, err.Error(), "fix source: in "+cfg.Path)
		return fs
	}
	if vol.IsFile {
		add("source", SevWarning, v.Source+" is an image file, not a block device: snapshots read it as it is (crash-consistent)", "point source: at the block device or mount point")
	} else {
		add("source", SevOK, fmt.Sprintf("%s is block device %d:%d (%s)", vol.Device, unix.Major(vol.Dev), unix.Minor(vol.Dev), deviceKind(vol.Disk)), "")
		fs = append(fs, trackingFinding(v, vol))
	}
	for _, u := range vol.Unfreezable() {
		if v.NoFreeze {
			add("filesystem", SevWarning, u.What+": snapshots read the volume as it is (no_freeze), crash-consistent at best", u.Fix)
		} else {
			add("filesystem", SevError, u.What+": a snapshot would be torn, so snapshots fail", u.Fix+" (or set no_freeze: true to read it as it is, crash-consistent)")
		}
	}
	for _, m := range vol.Mounts {
		if m.Point == "" && !m.ReadOnly {
			add("filesystem", SevError, fmt.Sprintf("the %s filesystem on %s is mounted at %s, but something else is mounted over it there: it cannot be frozen, so snapshots fail", m.FSType, vol.Device, strings.Join(m.Covered, ", ")),
				"unmount what covers it, or mount the filesystem somewhere visible too")
			continue
		}
		f := filesystemFinding(m)
		f.Volume = v.Name
		fs = append(fs, f)
	}
	if !config.IsRemote(cfg.Repository) && !vol.IsFile {
		if rd, ok := deviceOf(cfg.Repository); ok && (rd == vol.Dev || diskOf(rd) == vol.Disk) {
			add("repository", SevWarning, "the repository "+cfg.Repository+" is on the same disk as the volume it backs up: losing the disk loses the snapshots too",
				"keep the repository on another disk, or replicate: to another machine or a bucket")
		}
	}
	// Retention quota.
	auto := 0
	for _, s := range snaps {
		if s.Volume == v.Name && s.Kind == chain.KindAuto {
			auto++
		}
	}
	if q := *v.Retention.KeepAuto; auto >= q {
		add("retention", SevOK, fmt.Sprintf("%d automatic snapshots, at the quota of %d: each new one replaces the oldest", auto, q), "")
	}
	// Hooks run as root: only root may be able to change them.
	spec := agent.SpecFromConfig(v)
	if spec.App != nil {
		for _, h := range append(append([]string(nil), spec.App.PreHooks...), spec.App.PostHooks...) {
			if err := trust.Check(h, false); err != nil {
				add("hooks", SevError, "hook refused: "+err.Error(), "make the hook and its directories root's alone")
			}
		}
	}
	// Database.
	if spec.App != nil && spec.App.MySQL != nil && spec.App.MySQL.Mode != "none" {
		dsn, err := mysql.ReadDSN(spec.App.DSNFile)
		if err == nil {
			c := *spec.App.MySQL
			c.DSN = dsn
			err = mysql.Check(ctx, c)
			if err == nil {
				if long, lerr := mysql.LongQueries(ctx, c); lerr == nil && len(long) > 0 {
					add("mysql", SevWarning, "long-running queries would block the lock right now: "+strings.Join(long, "; "),
						"let them finish, or set kill_long_queries: true")
				}
			}
		}
		if err != nil {
			add("mysql", SevError, err.Error(), "fix the DSN or grants, then stasis config check")
		} else {
			add("mysql", SevOK, "the database account connects and has the needed grants", "")
		}
	}
	// Schedules and the last failure.
	next := time.Time{}
	for _, s := range v.Parsed {
		if n := s.Next(env.Now); next.IsZero() || n.Before(next) {
			next = n
		}
	}
	if !next.IsZero() {
		add("schedule", SevOK, "next snapshot "+next.Local().Format(time.RFC3339), "")
	}
	if f := agent.LastFailure(cfg.StateDir, v.Name); f != "" {
		add("last-failure", SevWarning, "the last snapshot failed: "+f, "fix the cause, then stasis snapshot "+v.Name)
	}
	return fs
}

// deviceKind says how the kernel's block layer drives a device: request-based devices
// (with a blk-mq queue) report completions as block_rq_complete, bio-based ones
// (device-mapper, md, zram) as block_bio_complete.
func deviceKind(disk uint64) string {
	if _, err := os.Stat(fmt.Sprintf("/sys/dev/block/%d:%d/mq", unix.Major(disk), unix.Minor(disk))); err == nil {
		return "request-based"
	}
	return "bio-based: device-mapper, md, zram or similar"
}

// trackingFinding proves, as every snapshot does, that a tracker sees the device's I/O.
func trackingFinding(v config.Volume, vol *capture.Volume) Finding {
	f := Finding{Check: "tracking", Volume: v.Name}
	src, err := capture.OpenSource(vol.Device)
	if err != nil {
		f.Severity, f.Message = SevError, err.Error()
		return f
	}
	size := src.Size
	src.Close()
	err = blocktrace.Probe(vol.Device, vol.Disk, vol.Start, size)
	switch {
	case err == nil:
		f.Severity, f.Message = SevOK, "a tracker saw this device's I/O (a proof read): incrementals read only what changed, and freezes last milliseconds"
	case errors.Is(err, blocktrace.ErrUnproven):
		f.Severity, f.Message = SevWarning, "the device's writes cannot be tracked ("+err.Error()+"): every snapshot reads the whole volume and, if a second whole read fits max_freeze, compares it while frozen; otherwise it is crash-consistent"
		f.Fix = "snapshot the underlying disk if there is one, or raise max_freeze for a small volume"
	default:
		f.Severity, f.Message = SevWarning, "changed-block tracking is unavailable: "+err.Error()
		f.Fix = "mount tracefs (mount -t tracefs none /sys/kernel/tracing) and run as root"
	}
	return f
}

// filesystemFinding judges one mounted filesystem of a volume.
func filesystemFinding(m capture.Mount) Finding {
	f := Finding{Check: "filesystem"}
	switch {
	case m.ReadOnly:
		f.Severity, f.Message = SevOK, m.Point+" is mounted read-only: nothing to freeze, snapshots are consistent"
	case !freezable[m.FSType]:
		f.Severity, f.Message = SevWarning, fmt.Sprintf("%s (%s) cannot be frozen: snapshots will be crash-consistent", m.Point, m.FSType)
		f.Fix = "use ext4 or XFS for application-consistent snapshots"
	case m.Point == "/":
		f.Severity, f.Message = SevWarning, "the root filesystem is on this volume: freezing it briefly stops every writer on the machine, logging included"
		f.Fix = "keep max_freeze short, and prefer a separate data volume"
	default:
		f.Severity, f.Message = SevOK, fmt.Sprintf("%s (%s) can be frozen", m.Point, m.FSType)
	}
	return f
}

// otherFreezers lists freeze state files of live processes other than this one.
func otherFreezers() []string {
	files, _ := filepath.Glob("/run/stasis/frozen-*.json")
	var out []string
	for _, f := range files {
		pid, err := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(filepath.Base(f), "frozen-"), ".json"))
		if err != nil || pid == os.Getpid() || unix.Kill(pid, 0) != nil {
			continue
		}
		out = append(out, fmt.Sprintf("pid %d (%s)", pid, f))
	}
	return out
}

func memAvailable() (int64, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "MemAvailable:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no MemAvailable in /proc/meminfo")
}

// deviceOf returns the device number of the filesystem holding path (or its nearest
// existing parent).
func deviceOf(path string) (uint64, bool) {
	for p := path; ; p = filepath.Dir(p) {
		var st unix.Stat_t
		if unix.Stat(p, &st) == nil {
			return st.Dev, true
		}
		if p == "/" || p == "." {
			return 0, false
		}
	}
}

// diskOf returns the whole disk holding block device dev (dev itself if it is a disk).
func diskOf(dev uint64) uint64 {
	sys := fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(dev), unix.Minor(dev))
	if _, err := os.Stat(filepath.Join(sys, "partition")); err != nil {
		return dev
	}
	real, err := filepath.EvalSymlinks(sys) // .../block/sda/sda1: the disk is the parent
	if err != nil {
		return dev
	}
	b, err := os.ReadFile(filepath.Join(real, "..", "dev"))
	if err != nil {
		return dev
	}
	var maj, mnr uint32
	if _, err := fmt.Sscanf(strings.TrimSpace(string(b)), "%d:%d", &maj, &mnr); err != nil {
		return dev
	}
	return unix.Mkdev(maj, mnr)
}

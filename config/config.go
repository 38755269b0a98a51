// Package config reads and validates stasis's YAML configuration. Every problem is reported
// with the file, the line and what to do; nothing is half-applied.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/robfig/cron/v3"
	"github.com/stasis-project/stasis/chain"
	"gopkg.in/yaml.v3"
)

// DefaultPath is where the agent and the CLI look without --config.
const DefaultPath = "/etc/stasis/stasis.yaml"

// Config is a validated configuration.
type Config struct {
	Path string `yaml:"-"`
	// Repository is a directory or an S3 location (s3:https://host/bucket/prefix).
	Repository string `yaml:"repository"`
	// PasswordFile holds the passphrase of an encrypted repository (mode 0600, root's);
	// with it, the agent creates the repository encrypted.
	PasswordFile string `yaml:"password_file"`
	// S3 says how to reach S3 locations (the repository's and replicate's).
	S3 *S3 `yaml:"s3"`
	// CacheDir keeps checked copies of index files (default /var/cache/stasis).
	CacheDir string `yaml:"cache_dir"`
	// Host names this machine in a shared repository (default: its hostname). Give each
	// machine its own: chains, retention and automatic names are per host.
	Host string `yaml:"host"`
	// Replicate copies every snapshot to a second repository, with its own retention.
	Replicate *Replicate `yaml:"replicate"`
	// Notify posts each snapshot's result to a webhook.
	Notify *Notify `yaml:"notify"`
	Mount  *string `yaml:"mount"` // nil: default; "": disabled
	// MountAllowOther lets every local user into the view; each reads only what the
	// snapshot's own permissions allow.
	MountAllowOther bool   `yaml:"mount_allow_other"`
	StateDir        string `yaml:"state_dir"`
	Socket          string `yaml:"socket"`
	SocketGroup     string `yaml:"socket_group"`
	MetricsListen   string `yaml:"metrics_listen"`
	// Retention is the default policy of every volume and group (each key a volume or
	// group leaves out comes from here, then from the built-in defaults).
	Retention    Retention `yaml:"retention"`
	Volumes      []Volume  `yaml:"volumes"`
	Groups       []Group   `yaml:"groups"`
	GCAfterPrune *bool     `yaml:"gc_after_prune"`
	CatchUp      *bool     `yaml:"catch_up"`
	// RetryDelay is the wait before retrying a scheduled snapshot that failed or was
	// skipped for a manual one, doubled at each attempt (up to 30 minutes);
	// RetryAttempts bounds the retries (0: none).
	RetryDelay    Duration `yaml:"retry_delay"`
	RetryAttempts *int     `yaml:"retry_attempts"`
	lines         map[string]int
}

// S3 is how to reach S3-compatible object storage.
type S3 struct {
	// Endpoint serves s3://bucket/prefix locations (default https://s3.amazonaws.com).
	Endpoint string `yaml:"endpoint"`
	Region   string `yaml:"region"`
	// CredentialsFile is an AWS shared credentials file ([default] aws_access_key_id = ...);
	// without it, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment are used.
	CredentialsFile string `yaml:"credentials_file"`
	Profile         string `yaml:"profile"`
}

// Replicate is a second repository every snapshot is copied to.
type Replicate struct {
	Repository   string    `yaml:"repository"`
	PasswordFile string    `yaml:"password_file"`
	Retention    Retention `yaml:"retention"`
}

// Volume is one volume to snapshot.
type Volume struct {
	Name      string   `yaml:"name"`
	Source    string   `yaml:"source"`
	Schedules []string `yaml:"schedules"`
	MaxFreeze Duration `yaml:"max_freeze"`
	NoFreeze  bool     `yaml:"no_freeze"`
	ChunkSize int      `yaml:"chunk_size"`
	// MaxReadRate paces the reads of a snapshot's rounds before the freeze ("200MiB/s");
	// MaxReadRateBytes is it in bytes per second (0: no limit).
	MaxReadRate      string    `yaml:"max_read_rate"`
	MaxReadRateBytes int64     `yaml:"-"`
	Retention        Retention `yaml:"retention"`
	MySQL            *MySQL    `yaml:"mysql"`
	Hooks            *Hooks    `yaml:"hooks"`
	// Replicate sends this volume's snapshots to its own replica (instead of the top-level
	// one), with its own retention there.
	Replicate *Replicate `yaml:"replicate"`

	// Parsed schedules, in the order given.
	Parsed []cron.Schedule `yaml:"-"`
}

// Group is a consistency group: volumes snapshotted together, frozen in one window, so the
// snapshots are the volumes at one instant (a database's data and log disks). For group
// snapshots the group's schedules, freeze limit, retention, database and hooks apply, not
// the members' own (which still apply to a member's solo snapshots).
type Group struct {
	Name      string    `yaml:"name"`
	Volumes   []string  `yaml:"volumes"`
	Schedules []string  `yaml:"schedules"`
	MaxFreeze Duration  `yaml:"max_freeze"`
	Retention Retention `yaml:"retention"`
	MySQL     *MySQL    `yaml:"mysql"`
	Hooks     *Hooks    `yaml:"hooks"`
	// Replicate sends this volume's snapshots to its own replica (instead of the top-level
	// one), with its own retention there.
	Replicate *Replicate `yaml:"replicate"`

	// Parsed schedules, in the order given.
	Parsed []cron.Schedule `yaml:"-"`
}

// MySQL makes a volume's snapshots consistent for a MySQL or MariaDB server on it.
type MySQL struct {
	DSNFile            string   `yaml:"dsn_file"`
	Mode               string   `yaml:"mode"`
	LockTimeout        Duration `yaml:"lock_timeout"`
	LongQueryThreshold Duration `yaml:"long_query_threshold"`
	KillLongQueries    bool     `yaml:"kill_long_queries"`
	OnFailure          string   `yaml:"on_failure"`
}

// Hooks are commands run around the freeze.
type Hooks struct {
	Pre  []string `yaml:"pre"`
	Post []string `yaml:"post"`
	// After runs once per snapshot, after it was committed or failed, with STASIS_RESULT.
	After   []string `yaml:"after"`
	Timeout Duration `yaml:"timeout"`
}

// Notify is a webhook told about snapshots: a JSON POST (healthchecks-style ping URLs work).
type Notify struct {
	URL string `yaml:"url"`
	// On lists the results that are sent: "failure" (default) and/or "success".
	On      []string `yaml:"on"`
	Timeout Duration `yaml:"timeout"` // default 10s; one attempt, never retried
}

// Retention is a volume's policy for automatic snapshots. Manual snapshots are never pruned.
type Retention struct {
	KeepAuto    *int `yaml:"keep_auto"`    // at most this many auto snapshots; the oldest go first
	KeepDays    *int `yaml:"keep_days"`    // auto snapshots older than this many days go; -1 keeps forever
	KeepLast    *int `yaml:"keep_last"`    // also keep the newest N, whatever their age
	KeepHourly  *int `yaml:"keep_hourly"`  // also keep the newest of each of the last N hours with snapshots
	KeepDaily   *int `yaml:"keep_daily"`   // ... of the last N days
	KeepWeekly  *int `yaml:"keep_weekly"`  // ... of the last N ISO weeks
	KeepMonthly *int `yaml:"keep_monthly"` // ... of the last N months
	KeepYearly  *int `yaml:"keep_yearly"`  // ... of the last N years
}

// Defaults.
const (
	DefaultRepository = "/var/lib/stasis/repo"
	DefaultMount      = "/run/stasis/snapshots"
	DefaultStateDir   = "/var/lib/stasis"
	DefaultCacheDir   = "/var/cache/stasis"
	DefaultSocket     = "/run/stasis/stasis.sock"
	DefaultMaxFreeze  = 5 * time.Second
	DefaultSchedule   = "@daily"
)

// Default retention: about a month of automatic snapshots, cloud-console style.
var (
	DefaultKeepAuto    = 64
	DefaultKeepDays    = 30
	DefaultKeepDaily   = 7
	DefaultKeepWeekly  = 4
	DefaultKeepMonthly = 6
)

// Duration is a time.Duration written as "5s", "1m30s".
type Duration time.Duration

// UnmarshalYAML parses a Go duration string. A bad one is reported as a type error, so
// decoding goes on and every other problem in the file is reported in the same run.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: cannot unmarshal !!%s into duration", n.Line, map[yaml.Kind]string{yaml.MappingNode: "map", yaml.SequenceNode: "seq"}[n.Kind])}}
	}
	var s string
	if err := n.Decode(&s); err != nil {
		return err
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: %q is not a duration: write it like 5s, 500ms or 1m30s", n.Line, s)}}
	}
	*d = Duration(v)
	return nil
}

// Error is one problem in a configuration file.
type Error struct {
	File string
	Line int
	Msg  string
}

func (e *Error) Error() string {
	if e.Line > 0 {
		return fmt.Sprintf("%s:%d: %s", e.File, e.Line, e.Msg)
	}
	return fmt.Sprintf("%s: %s", e.File, e.Msg)
}

// Errors is every problem found, so a user fixes them in one go.
type Errors []*Error

func (es Errors) Error() string {
	msgs := make([]string, len(es))
	for i, e := range es {
		msgs[i] = e.Error()
	}
	return strings.Join(msgs, "\n")
}

// Prober checks sources against the running system: that they exist and which block
// devices they occupy (a partition also occupies its disk). The agent supplies one built
// on capture.Resolve; tests supply fakes.
type Prober interface {
	Devices(source string) ([]string, error)
}

// Load reads and validates path. probe may be nil to skip the checks against the system.
func Load(path string, probe Prober) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("config file %s does not exist: create it (see docs/CONFIG.md) or pass --config", path)
		}
		return nil, fmt.Errorf("read config: %w", err)
	}
	return Parse(path, b, probe)
}

var lineRE = regexp.MustCompile(`^(?:yaml: )?line (\d+): (.*)$`)

// Parse validates a configuration held in memory; path is used in messages.
func Parse(path string, data []byte, probe Prober) (*Config, error) {
	c := &Config{Path: path, lines: map[string]int{}}
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, Errors{yamlError(path, err, nil)}
	}
	if root.Kind == 0 || len(root.Content) == 0 {
		return nil, Errors{{File: path, Msg: "the file is empty: it needs at least a volumes list (see docs/CONFIG.md)"}}
	}
	values := map[string]int{} // where each key's value starts, for type errors
	indexLines(root.Content[0], "", c.lines, values)
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(c); err != nil && !errors.Is(err, io.EOF) {
		var te *yaml.TypeError
		if errors.As(err, &te) {
			var es Errors
			for _, m := range te.Errors {
				es = append(es, yamlError(path, errors.New(m), values))
			}
			return nil, es
		}
		return nil, Errors{yamlError(path, err, values)}
	}
	es := c.validate(probe)
	if len(es) > 0 {
		return nil, es
	}
	return c, nil
}

// yamlError turns "yaml: line 3: field foo not found in type config.Volume" into a
// message with the line and a fix; keys names the key at each line, for type errors.
func yamlError(path string, err error, keys map[string]int) *Error {
	msg := err.Error()
	line := 0
	if m := lineRE.FindStringSubmatch(msg); m != nil {
		fmt.Sscan(m[1], &line)
		msg = m[2]
	}
	switch {
	case strings.Contains(msg, "not found in type"):
		field := strings.TrimPrefix(strings.SplitN(msg, " not found", 2)[0], "field ")
		msg = fmt.Sprintf("unknown key %q: check its spelling and indentation (docs/CONFIG.md lists every key)", field)
	case unmarshalRE.MatchString(msg):
		m := unmarshalRE.FindStringSubmatch(msg)
		msg = fmt.Sprintf("wrong type: expected %s, found %s", goTypeWords(m[3]), yamlWords(m[1], m[2]))
		if k := keyAt(keys, line, m[1] == "map" || m[1] == "seq"); k != "" {
			msg = k + ": " + msg
		}
	}
	return &Error{File: path, Line: line, Msg: msg}
}

// unmarshalRE matches the YAML library's type errors: "cannot unmarshal !!str `abc` into int".
var unmarshalRE = regexp.MustCompile("cannot unmarshal !!(\\w+)(?: `(.*)`)? into (\\S+)")

// keyAt names the key whose value starts at line: the outermost when the wrong value is a
// mapping or list (its first entry starts there too), else the innermost.
func keyAt(values map[string]int, line int, collection bool) string {
	best := ""
	for k, l := range values {
		if l != line {
			continue
		}
		if best == "" || (collection && len(k) < len(best)) || (!collection && len(k) > len(best)) {
			best = k
		}
	}
	return best
}

// goTypeWords says in a user's words what a Go type takes in YAML.
func goTypeWords(t string) string {
	t = strings.TrimPrefix(t, "*")
	switch {
	case strings.HasPrefix(t, "[]"):
		return "a list (one \"- item\" per line, or [a, b])"
	case strings.HasPrefix(t, "map["), strings.HasPrefix(t, "config."):
		return "a mapping (indented \"key: value\" lines)"
	case t == "string":
		return "a text value"
	case t == "duration":
		return "a duration like 5s, 500ms or 1m30s"
	case t == "bool":
		return "true or false"
	case strings.HasPrefix(t, "int"), strings.HasPrefix(t, "uint"):
		return "a whole number"
	case strings.HasPrefix(t, "float"):
		return "a number"
	}
	return t
}

// yamlWords describes a YAML value by its tag.
func yamlWords(tag, value string) string {
	switch tag {
	case "map":
		return "a mapping"
	case "seq":
		return "a list"
	case "str":
		return fmt.Sprintf("the text %q", value)
	case "int", "float":
		return "the number " + value
	case "bool":
		return value
	case "null":
		return "nothing"
	}
	return "a " + tag
}

// indexLines records the line of every key, as "volumes[0].schedules[1]", in keys, and the
// line where its value starts in values.
func indexLines(n *yaml.Node, prefix string, keys, values map[string]int) {
	switch n.Kind {
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			p := n.Content[i].Value
			if prefix != "" {
				p = prefix + "." + p
			}
			keys[p], values[p] = n.Content[i].Line, n.Content[i+1].Line
			indexLines(n.Content[i+1], p, keys, values)
		}
	case yaml.SequenceNode:
		for i, c := range n.Content {
			p := fmt.Sprintf("%s[%d]", prefix, i)
			keys[p], values[p] = c.Line, c.Line
			indexLines(c, p, keys, values)
		}
	}
}

// checkReplicate checks a replica: the top-level one, or a volume's own.
func (c *Config) checkReplicate(es *Errors, key string, r *Replicate) {
	if r.Repository == "" {
		c.errf(es, key, "repository is missing: give the second repository's location")
	} else {
		c.checkLocation(es, key+".repository", r.Repository)
		if r.Repository == c.Repository {
			c.errf(es, key+".repository", "is the repository itself: replicate to another one")
		}
	}
	if r.PasswordFile != "" && !filepath.IsAbs(r.PasswordFile) {
		c.errf(es, key+".password_file", "%q is not an absolute path", r.PasswordFile)
	}
	c.checkRetention(es, key+".retention", &r.Retention, nil)
	// One replica repository is opened once, with one passphrase.
	for _, other := range c.Replicas() {
		if other.Repository == r.Repository && other.PasswordFile != r.PasswordFile && other != r {
			c.errf(es, key+".password_file", "%s is also a replica with password_file %q: give every replica of one repository the same passphrase file", r.Repository, other.PasswordFile)
			return
		}
	}
}

// Replicas lists every configured replica: the top-level one first, then the volumes' own.
func (c *Config) Replicas() []*Replicate {
	var out []*Replicate
	if c.Replicate != nil {
		out = append(out, c.Replicate)
	}
	for i := range c.Volumes {
		if r := c.Volumes[i].Replicate; r != nil {
			out = append(out, r)
		}
	}
	return out
}

// ReplicaOf is where a volume's snapshots are replicated: its own replicate, else the
// top-level one (also for a volume no longer configured), else nil.
func (c *Config) ReplicaOf(volume string) *Replicate {
	if v := c.VolumeByName(volume); v != nil && v.Replicate != nil {
		return v.Replicate
	}
	return c.Replicate
}

func (c *Config) errf(es *Errors, key, format string, args ...any) {
	*es = append(*es, &Error{File: c.Path, Line: c.lines[key], Msg: key + ": " + fmt.Sprintf(format, args...)})
}

// cronParser accepts 5-field expressions, descriptors (@daily, @every 1h) and CRON_TZ=/TZ=.
var cronParser = cron.NewParser(cron.Minute | cron.Hour | cron.Dom | cron.Month | cron.Dow | cron.Descriptor)

func (c *Config) validate(probe Prober) Errors {
	var es Errors
	if c.Repository == "" {
		c.Repository = DefaultRepository
	}
	c.checkLocation(&es, "repository", c.Repository)
	if c.Host != "" {
		if chain.ValidName("host", c.Host) != nil {
			c.errf(&es, "host", "%q: use letters, digits, '.', '_', '@', '+' or '-' (up to 128), starting with a letter or digit", c.Host)
		}
	}
	// An empty cache_dir stays empty: commands then use $STASIS_CACHE_DIR, else
	// DefaultCacheDir (root) or the user's cache directory.
	if c.CacheDir != "" && !filepath.IsAbs(c.CacheDir) {
		c.errf(&es, "cache_dir", "%q is not an absolute path", c.CacheDir)
	}
	if c.PasswordFile != "" && !filepath.IsAbs(c.PasswordFile) {
		c.errf(&es, "password_file", "%q is not an absolute path", c.PasswordFile)
	}
	c.checkRetention(&es, "retention", &c.Retention, nil)
	if c.Replicate != nil {
		c.checkReplicate(&es, "replicate", c.Replicate)
	}
	if n := c.Notify; n != nil {
		if u, err := url.Parse(n.URL); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			c.errf(&es, "notify.url", "%q: write a URL like https://hc-ping.com/UUID", n.URL)
		}
		if len(n.On) == 0 {
			n.On = []string{"failure"}
		}
		for i, on := range n.On {
			if on != "failure" && on != "success" {
				c.errf(&es, fmt.Sprintf("notify.on[%d]", i), "%q: use failure or success", on)
			}
		}
		if n.Timeout == 0 {
			n.Timeout = Duration(10 * time.Second)
		} else if n.Timeout < 0 || time.Duration(n.Timeout) > 5*time.Minute {
			c.errf(&es, "notify.timeout", "%v: use a duration from 1s to 5m", time.Duration(n.Timeout))
		}
	}
	if c.S3 != nil && c.S3.Endpoint != "" {
		if u, err := url.Parse(c.S3.Endpoint); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || strings.Trim(u.Path, "/") != "" {
			c.errf(&es, "s3.endpoint", "%q: write it like https://s3.example.net", c.S3.Endpoint)
		}
	}
	if c.S3 != nil && c.S3.CredentialsFile != "" && !filepath.IsAbs(c.S3.CredentialsFile) {
		c.errf(&es, "s3.credentials_file", "%q is not an absolute path", c.S3.CredentialsFile)
	}
	if c.Mount == nil {
		m := DefaultMount
		c.Mount = &m
	}
	if *c.Mount != "" && !filepath.IsAbs(*c.Mount) {
		c.errf(&es, "mount", "%q is not an absolute path (use \"\" to disable the view)", *c.Mount)
	}
	if *c.Mount != "" && !IsRemote(c.Repository) && (*c.Mount == c.Repository || strings.HasPrefix(*c.Mount, c.Repository+"/")) {
		c.errf(&es, "mount", "%q is inside the repository %s: choose a directory outside it", *c.Mount, c.Repository)
	}
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	if !filepath.IsAbs(c.StateDir) {
		c.errf(&es, "state_dir", "%q is not an absolute path", c.StateDir)
	}
	if c.Socket == "" {
		c.Socket = DefaultSocket
	}
	if !filepath.IsAbs(c.Socket) {
		c.errf(&es, "socket", "%q is not an absolute path", c.Socket)
	}
	if c.SocketGroup != "" {
		if _, err := LookupGroup(c.SocketGroup); err != nil {
			c.errf(&es, "socket_group", "%q is not a group on this machine (groupadd %s, or leave it out)", c.SocketGroup, c.SocketGroup)
		}
	}
	if c.MetricsListen != "" {
		if host, port, err := net.SplitHostPort(c.MetricsListen); err != nil || port == "" || (host != "" && net.ParseIP(host) == nil && host != "localhost") {
			c.errf(&es, "metrics_listen", "%q: write an address like 127.0.0.1:9412 (or :9412 for every interface)", c.MetricsListen)
		} else if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			c.errf(&es, "metrics_listen", "%q: the port must be a number from 1 to 65535", c.MetricsListen)
		}
	}
	if c.GCAfterPrune == nil {
		t := true
		c.GCAfterPrune = &t
	}
	if c.CatchUp == nil {
		t := true
		c.CatchUp = &t
	}
	if c.RetryDelay == 0 {
		c.RetryDelay = Duration(time.Minute)
	} else if c.RetryDelay < Duration(time.Second) || c.RetryDelay > Duration(24*time.Hour) {
		c.errf(&es, "retry_delay", "%s is out of range: use 1s to 24h", time.Duration(c.RetryDelay))
	}
	if c.RetryAttempts == nil {
		n := 3
		c.RetryAttempts = &n
	} else if *c.RetryAttempts < 0 || *c.RetryAttempts > 100 {
		c.errf(&es, "retry_attempts", "%d is out of range: use 0 (no retries) to 100", *c.RetryAttempts)
	}
	// No volumes is valid (a fresh install): the agent runs and snapshots nothing.
	names := map[string]string{}   // volume and group names share one namespace
	devices := map[string]string{} // device → volume using it
	inGroup := map[string]string{}
	for i := range c.Groups {
		for _, m := range c.Groups[i].Volumes {
			inGroup[m] = c.Groups[i].Name
		}
	}
	for i := range c.Volumes {
		v := &c.Volumes[i]
		key := fmt.Sprintf("volumes[%d]", i)
		c.checkName(&es, key, "volume", v.Name, names)
		if v.Source == "" {
			c.errf(&es, key, "source is missing: give a block device, partition, mount point or image file")
		} else if probe != nil {
			devs, err := probe.Devices(v.Source)
			if err != nil {
				c.errf(&es, key+".source", "%v", err)
			}
			for _, d := range devs {
				if other, ok := devices[d]; ok && other != v.Name {
					c.errf(&es, key+".source", "%s overlaps volume %q (both use %s): a device may belong to one volume only", v.Source, other, d)
					break
				}
			}
			for _, d := range devs {
				devices[d] = v.Name
			}
		}
		// A group member takes no solo snapshots unless it asks for them.
		def := DefaultSchedule
		if inGroup[v.Name] != "" {
			def = ""
		}
		v.Schedules, v.Parsed = c.checkSchedules(&es, key, v.Schedules, def)
		c.checkMaxFreeze(&es, key, &v.MaxFreeze)
		if cs := v.ChunkSize; cs != 0 && (cs < 4096 || cs > 4<<20 || cs&(cs-1) != 0) {
			c.errf(&es, key+".chunk_size", "%d is not a power of two from 4096 to 4194304", cs)
		}
		if v.MaxReadRate != "" {
			n, err := ParseRate(v.MaxReadRate)
			if err != nil {
				c.errf(&es, key+".max_read_rate", "%v", err)
			}
			v.MaxReadRateBytes = n
		}

		c.checkMySQL(&es, key+".mysql", v.MySQL, probe)
		c.checkHooks(&es, key+".hooks", v.Hooks, probe)
		c.checkRetention(&es, key+".retention", &v.Retention, &c.Retention)
		if v.Replicate != nil {
			c.checkReplicate(&es, key+".replicate", v.Replicate)
		}
	}
	for i := range c.Groups {
		g := &c.Groups[i]
		key := fmt.Sprintf("groups[%d]", i)
		c.checkName(&es, key, "group", g.Name, names)
		if len(g.Volumes) < 2 {
			c.errf(&es, key+".volumes", "a group needs at least two volumes (a volume alone is snapshotted on its own)")
		}
		seen := map[string]bool{}
		for j, m := range g.Volumes {
			mk := fmt.Sprintf("%s.volumes[%d]", key, j)
			switch {
			case c.VolumeByName(m) == nil:
				c.errf(&es, mk, "%q is not a volume defined under volumes:", m)
			case seen[m]:
				c.errf(&es, mk, "volume %q is listed twice", m)
			case inGroup[m] != g.Name:
				c.errf(&es, mk, "volume %q is already in group %q: a volume belongs to one group at most", m, inGroup[m])
			}
			seen[m] = true
		}
		g.Schedules, g.Parsed = c.checkSchedules(&es, key, g.Schedules, DefaultSchedule)
		c.checkMaxFreeze(&es, key, &g.MaxFreeze)
		c.checkMySQL(&es, key+".mysql", g.MySQL, probe)
		c.checkHooks(&es, key+".hooks", g.Hooks, probe)
		c.checkRetention(&es, key+".retention", &g.Retention, &c.Retention)
	}
	return es
}

// checkName checks a volume's or group's name, unique across both.
func (c *Config) checkName(es *Errors, key, what, name string, names map[string]string) {
	switch {
	case name == "":
		c.errf(es, key, "name is missing: give the %s a name (letters, digits, . _ - @ +)", what)
	case chain.ValidName(what, name) != nil:
		c.errf(es, key+".name", "%q is not a valid %s name: use letters, digits, '.', '_', '@', '+' or '-', starting with a letter or digit", name, what)
	default:
		if other, dup := names[name]; dup {
			kind, at := strings.Fields(other)[0], c.lines[strings.Fields(other)[1]]
			if kind == what {
				c.errf(es, key+".name", "%s %q is already defined at line %d: names must be unique", what, name, at)
			} else {
				c.errf(es, key+".name", "%q is already the name of a %s at line %d: volume and group names must be unique", name, kind, at)
			}
		}
		names[name] = what + " " + key
	}
}

// checkSchedules parses schedules; with none given (no key at all) it uses def ("" for
// none). A spec the cron library would choke on is refused before it sees it.
func (c *Config) checkSchedules(es *Errors, key string, specs []string, def string) ([]string, []cron.Schedule) {
	if len(specs) == 0 && c.lines[key+".schedules"] == 0 && def != "" {
		specs = []string{def}
	}
	var parsed []cron.Schedule
	for j, spec := range specs {
		sched, err := parseSchedule(spec)
		if err != nil {
			c.errf(es, fmt.Sprintf("%s.schedules[%d]", key, j), "bad schedule %q: %v", spec, err)
			continue
		}
		parsed = append(parsed, sched)
	}
	return specs, parsed
}

// parseSchedule parses one cron spec, turning the library's errors (and panics, which
// some malformed time-zone prefixes cause) into messages that say how to write it.
func parseSchedule(spec string) (sched cron.Schedule, err error) {
	const how = `use 5 fields (minute hour day-of-month month day-of-week), a descriptor (@hourly, @daily, @weekly, @monthly) or "@every 4h", optionally after CRON_TZ=Zone and a space`
	body := spec
	if tz, ok := strings.CutPrefix(spec, "CRON_TZ="); ok || strings.HasPrefix(spec, "TZ=") {
		if !ok {
			tz = strings.TrimPrefix(spec, "TZ=")
		}
		zone, rest, found := strings.Cut(tz, " ")
		if !found || zone == "" || strings.TrimSpace(rest) == "" {
			return nil, fmt.Errorf("a time zone prefix needs a zone and then the schedule, like \"CRON_TZ=Asia/Shanghai 30 2 * * *\"")
		}
		if _, err := time.LoadLocation(zone); err != nil {
			return nil, fmt.Errorf("unknown time zone %q: use an IANA name such as Asia/Shanghai or UTC", zone)
		}
		body = strings.TrimSpace(rest)
	}
	if d, ok := strings.CutPrefix(body, "@every "); ok {
		if dur, err := time.ParseDuration(strings.TrimSpace(d)); err == nil && dur <= 0 {
			return nil, fmt.Errorf("@every needs a positive interval, like @every 4h")
		}
	}
	defer func() {
		if r := recover(); r != nil {
			sched, err = nil, fmt.Errorf("%v: %s", r, how)
		}
	}()
	sched, err = cronParser.Parse(spec)
	if err != nil {
		return nil, fmt.Errorf("%v: %s", err, how)
	}
	return sched, nil
}

func (c *Config) checkMaxFreeze(es *Errors, key string, d *Duration) {
	if *d == 0 {
		*d = Duration(DefaultMaxFreeze)
	}
	if *d < Duration(10*time.Millisecond) || *d > Duration(time.Minute) {
		c.errf(es, key+".max_freeze", "%s is out of range: use 10ms to 1m (5s is the default)", time.Duration(*d))
	}
}

func (c *Config) checkMySQL(es *Errors, k string, m *MySQL, probe Prober) {
	if m == nil {
		return
	}
	if m.DSNFile == "" {
		c.errf(es, k, "dsn_file is missing: name a file (mode 0600) holding the DSN, e.g. stasis:PASSWORD@unix(/run/mysqld/mysqld.sock)/")
	} else if probe != nil {
		if _, err := os.Stat(m.DSNFile); err != nil {
			c.errf(es, k+".dsn_file", "%v", err)
		}
	}
	switch m.Mode {
	case "":
		m.Mode = "auto"
	case "auto", "ftwrl", "backup-stage", "none":
	default:
		c.errf(es, k+".mode", "%q is not one of auto, ftwrl, backup-stage, none", m.Mode)
	}
	if m.LockTimeout == 0 {
		m.LockTimeout = Duration(10 * time.Second)
	}
	if m.LockTimeout < Duration(100*time.Millisecond) || m.LockTimeout > Duration(10*time.Minute) {
		c.errf(es, k+".lock_timeout", "%s is out of range: use 100ms to 10m", time.Duration(m.LockTimeout))
	}
	if c.lines[k+".long_query_threshold"] == 0 {
		m.LongQueryThreshold = Duration(20 * time.Second)
	}
	switch m.OnFailure {
	case "":
		m.OnFailure = "fail"
	case "fail", "crash-consistent":
	default:
		c.errf(es, k+".on_failure", "%q is not one of fail, crash-consistent", m.OnFailure)
	}
}

func (c *Config) checkHooks(es *Errors, k string, h *Hooks, probe Prober) {
	if h == nil {
		return
	}
	if h.Timeout == 0 {
		h.Timeout = Duration(30 * time.Second)
	}
	for _, phase := range []struct {
		name string
		list []string
	}{{"pre", h.Pre}, {"post", h.Post}, {"after", h.After}} {
		for j, p := range phase.list {
			hk := fmt.Sprintf("%s.%s[%d]", k, phase.name, j)
			if !filepath.IsAbs(p) {
				c.errf(es, hk, "%q is not an absolute path to an executable", p)
			} else if probe != nil {
				if st, err := os.Stat(p); err != nil {
					c.errf(es, hk, "%v", err)
				} else if st.Mode()&0o111 == 0 {
					c.errf(es, hk, "%s is not executable: chmod +x %s", p, p)
				}
			}
		}
	}
}

// maxKeepDays keeps keep_days (in days) far from overflowing a time.Duration.
const maxKeepDays = 100000

// checkRetention fills r's missing keys from base (the top-level retention:, already
// checked; nil for none), else the defaults, and checks the values.
func (c *Config) checkRetention(es *Errors, k string, r *Retention, base *Retention) {
	if base == nil {
		base = &Retention{}
	}
	for _, f := range []struct {
		name     string
		p, b     **int
		def, min int
	}{{"keep_auto", &r.KeepAuto, &base.KeepAuto, DefaultKeepAuto, 1}, {"keep_days", &r.KeepDays, &base.KeepDays, DefaultKeepDays, -1},
		{"keep_last", &r.KeepLast, &base.KeepLast, 0, 0}, {"keep_hourly", &r.KeepHourly, &base.KeepHourly, 0, 0},
		{"keep_daily", &r.KeepDaily, &base.KeepDaily, DefaultKeepDaily, 0}, {"keep_weekly", &r.KeepWeekly, &base.KeepWeekly, DefaultKeepWeekly, 0},
		{"keep_monthly", &r.KeepMonthly, &base.KeepMonthly, DefaultKeepMonthly, 0}, {"keep_yearly", &r.KeepYearly, &base.KeepYearly, 0, 0}} {
		if *f.p == nil {
			d := f.def
			if *f.b != nil {
				d = **f.b
			}
			*f.p = &d
		}
		if **f.p < f.min {
			c.errf(es, k+"."+f.name, "%d is below the minimum %d", **f.p, f.min)
		}
	}
	if *r.KeepDays > maxKeepDays {
		c.errf(es, k+".keep_days", "%d days is more than %d: use -1 to keep snapshots forever", *r.KeepDays, maxKeepDays)
	}
}

// IsRemote reports whether a repository location is object storage rather than a directory.
func IsRemote(loc string) bool { return strings.HasPrefix(loc, "s3:") }

// checkLocation checks a repository location: an absolute directory or an s3: location.
func (c *Config) checkLocation(es *Errors, key, loc string) {
	if IsRemote(loc) {
		rest := strings.TrimPrefix(loc, "s3:")
		withHost := (strings.HasPrefix(rest, "https://") || strings.HasPrefix(rest, "http://")) && strings.Count(strings.Trim(rest, "/"), "/") >= 3
		bucketOnly := strings.HasPrefix(rest, "//") && strings.Trim(rest, "/") != ""
		if !withHost && !bucketOnly {
			c.errf(es, key, "%q: write an S3 location like s3:https://s3.example.net/bucket/prefix, or s3://bucket/prefix with s3.endpoint", loc)
		}
		return
	}
	if !filepath.IsAbs(loc) {
		c.errf(es, key, "%q is not an absolute path (or an s3:https://host/bucket/prefix location)", loc)
	}
}

// GroupByName returns the named group, or nil.
func (c *Config) GroupByName(name string) *Group {
	for i := range c.Groups {
		if c.Groups[i].Name == name {
			return &c.Groups[i]
		}
	}
	return nil
}

// GroupOf returns the group a volume belongs to, or nil.
func (c *Config) GroupOf(volume string) *Group {
	for i := range c.Groups {
		for _, m := range c.Groups[i].Volumes {
			if m == volume {
				return &c.Groups[i]
			}
		}
	}
	return nil
}

// VolumeByName returns the named volume, or nil.
func (c *Config) VolumeByName(name string) *Volume {
	for i := range c.Volumes {
		if c.Volumes[i].Name == name {
			return &c.Volumes[i]
		}
	}
	return nil
}

// ScheduleZone returns the time zone a schedule names with a CRON_TZ= (or TZ=) prefix, or "".
func ScheduleZone(spec string) string {
	for _, p := range []string{"CRON_TZ=", "TZ="} {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(spec), p); ok {
			zone, _, _ := strings.Cut(rest, " ")
			return zone
		}
	}
	return ""
}

// ParseRate reads a read rate like "200MiB/s" or "50MB/s" (at least 64 KiB/s).
func ParseRate(s string) (int64, error) {
	amount, ok := strings.CutSuffix(strings.TrimSpace(s), "/s")
	if !ok {
		return 0, fmt.Errorf("%q: write a rate like 200MiB/s", s)
	}
	n, err := humanize.ParseBytes(amount)
	if err != nil || n < 64<<10 || n > 1<<40 {
		return 0, fmt.Errorf("%q: write a rate from 64KiB/s to 1TiB/s, like 200MiB/s", s)
	}
	return int64(n), nil
}

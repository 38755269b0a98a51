package config

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// fakeProber maps sources to devices; anything else does not exist.
type fakeProber map[string][]string

func (f fakeProber) Devices(source string) ([]string, error) {
	if d, ok := f[source]; ok {
		return d, nil
	}
	return nil, errors.New(source + " does not exist: give an existing block device, mount point or image file")
}

var probe = fakeProber{
	"/dev/vdb":  {"/dev/vdb"},
	"/dev/vdc":  {"/dev/vdc"},
	"/dev/vdc1": {"/dev/vdc1", "/dev/vdc"}, // a partition occupies its disk too
	"/srv/db":   {"/dev/vdd"},
	"/dev/vdd":  {"/dev/vdd"},
}

func TestMinimalConfigGetsDefaults(t *testing.T) {
	c, err := Parse("stasis.yaml", []byte("volumes:\n  - name: data\n    source: /dev/vdb\n"), probe)
	if err != nil {
		t.Fatal(err)
	}
	v := c.Volumes[0]
	if c.Repository != DefaultRepository || *c.Mount != DefaultMount || c.Socket != DefaultSocket {
		t.Fatalf("defaults: %+v", c)
	}
	if len(v.Schedules) != 1 || v.Schedules[0] != "@daily" || len(v.Parsed) != 1 || time.Duration(v.MaxFreeze) != 5*time.Second {
		t.Fatalf("volume defaults: %+v", v)
	}
	if *v.Retention.KeepAuto != 64 || *v.Retention.KeepDays != 30 || *v.Retention.KeepDaily != 7 {
		t.Fatalf("retention defaults: %+v", v.Retention)
	}
}

func TestNoVolumesIsValid(t *testing.T) {
	c, err := Parse("stasis.yaml", []byte("repository: /var/lib/stasis/repo\nvolumes: []\n"), probe)
	if err != nil || len(c.Volumes) != 0 {
		t.Fatalf("a fresh install's file: %v", err)
	}
}

func TestFullConfig(t *testing.T) {
	c, err := Parse("stasis.yaml", []byte(`
repository: /var/lib/stasis/repo
mount: ""
metrics_listen: 127.0.0.1:9412
volumes:
  - name: data
    source: /dev/vdb
    schedules: ["0 */4 * * *", "CRON_TZ=Asia/Shanghai 30 2 * * 1-5", "@daily", "@every 3s"]
    max_freeze: 2s
    retention:
      keep_auto: 10
      keep_days: -1
      keep_daily: 0
`), probe)
	if err != nil {
		t.Fatal(err)
	}
	v := c.Volumes[0]
	if *c.Mount != "" || len(v.Parsed) != 4 || *v.Retention.KeepDays != -1 || *v.Retention.KeepDaily != 0 || *v.Retention.KeepWeekly != 4 {
		t.Fatalf("parsed: %+v %+v", c, v.Retention)
	}
	// The time zone applies: 02:30 Shanghai is 18:30 UTC the day before.
	next := v.Parsed[1].Next(time.Date(2026, 11, 23, 0, 0, 0, 0, time.UTC))
	if next.UTC().Hour() != 18 || next.UTC().Minute() != 30 {
		t.Fatalf("CRON_TZ ignored: next run %v", next.UTC())
	}
}

// TestBadConfigs: each mistake gets its own message, naming the line.
func TestBadConfigs(t *testing.T) {
	cases := []struct {
		name, yaml, want string
	}{
		{"empty", "", "the file is empty"},
		{"not yaml", "volumes: [", "stasis.yaml:1:"},
		{"unknown top key", "volumes:\n  - name: a\n    source: /dev/vdb\nrepositry: /x\n", `stasis.yaml:4: unknown key "repositry"`},
		{"unknown volume key", "volumes:\n  - name: a\n    source: /dev/vdb\n    schedule: \"@daily\"\n", `stasis.yaml:4: unknown key "schedule"`},
		{"wrong type", "volumes:\n  - name: a\n    source: /dev/vdb\n    schedules: 5\n", "stasis.yaml:4: volumes[0].schedules: wrong type: expected a list (one \"- item\" per line, or [a, b]), found the number 5"},
		{"wrong type retention", "volumes:\n  - name: a\n    source: /dev/vdb\n    retention:\n      keep_auto: many\n", `stasis.yaml:5: volumes[0].retention.keep_auto: wrong type: expected a whole number, found the text "many"`},
		{"volumes as a mapping", "volumes:\n  name: a\n  source: /dev/vdb\n", "stasis.yaml:2: volumes: wrong type: expected a list (one \"- item\" per line, or [a, b]), found a mapping"},
		{"duration as a list", "volumes:\n  - name: a\n    source: /dev/vdb\n    max_freeze: [1]\n", "stasis.yaml:4: volumes[0].max_freeze: wrong type: expected a duration like 5s"},
		{"flow mapping", "volumes:\n  - name: a\n    source: /dev/vdb\n    retention: {keep_daily: x}\n", `stasis.yaml:4: volumes[0].retention.keep_daily: wrong type: expected a whole number, found the text "x"`},
		{"bad cron", "volumes:\n  - name: a\n    source: /dev/vdb\n    schedules: [\"61 * * * *\"]\n", `stasis.yaml:4: volumes[0].schedules[0]: bad schedule "61 * * * *"`},
		{"bad time zone", "volumes:\n  - name: a\n    source: /dev/vdb\n    schedules:\n      - CRON_TZ=Mars/Olympus 0 3 * * *\n", "stasis.yaml:5: volumes[0].schedules[0]: bad schedule \"CRON_TZ=Mars/Olympus 0 3 * * *\": unknown time zone"},
		{"duplicate names", "volumes:\n  - name: a\n    source: /dev/vdb\n  - name: a\n    source: /dev/vdc\n", `stasis.yaml:4: volumes[1].name: volume "a" is already defined at line 2`},
		{"missing source", "volumes:\n  - name: a\n", "stasis.yaml:2: volumes[0]: source is missing"},
		{"source does not exist", "volumes:\n  - name: a\n    source: /dev/nope\n", "stasis.yaml:3: volumes[0].source: /dev/nope does not exist"},
		{"same device twice", "volumes:\n  - name: a\n    source: /dev/vdd\n  - name: b\n    source: /srv/db\n", `stasis.yaml:5: volumes[1].source: /srv/db overlaps volume "a"`},
		{"partition of a volume's disk", "volumes:\n  - name: a\n    source: /dev/vdc\n  - name: b\n    source: /dev/vdc1\n", `overlaps volume "a"`},
		{"bad name", "volumes:\n  - name: ../x\n    source: /dev/vdb\n", `stasis.yaml:2: volumes[0].name: "../x" is not a valid volume name`},
		{"bad duration", "volumes:\n  - name: a\n    source: /dev/vdb\n    max_freeze: 5 seconds\n", `stasis.yaml:4: "5 seconds" is not a duration`},
		{"freeze too long", "volumes:\n  - name: a\n    source: /dev/vdb\n    max_freeze: 10m\n", "stasis.yaml:4: volumes[0].max_freeze: 10m0s is out of range"},
		{"bad keep_days", "volumes:\n  - name: a\n    source: /dev/vdb\n    retention: {keep_days: -2}\n", "volumes[0].retention.keep_days: -2 is below the minimum -1"},
		{"relative repository", "repository: repo\nvolumes:\n  - name: a\n    source: /dev/vdb\n", `stasis.yaml:1: repository: "repo" is not an absolute path`},
		{"mount inside repository", "repository: /r\nmount: /r/view\nvolumes:\n  - name: a\n    source: /dev/vdb\n", "stasis.yaml:2: mount: \"/r/view\" is inside the repository"},
		{"bad chunk size", "volumes:\n  - name: a\n    source: /dev/vdb\n    chunk_size: 1000\n", "volumes[0].chunk_size: 1000 is not a power of two"},
		// The cron library panics on these; they must be refused before it sees them.
		{"time zone without schedule", "volumes:\n  - name: a\n    source: /dev/vdb\n    schedules: [\"CRON_TZ=UTC\"]\n", `volumes[0].schedules[0]: bad schedule "CRON_TZ=UTC": a time zone prefix needs a zone and then the schedule`},
		{"TZ=0", "volumes:\n  - name: a\n    source: /dev/vdb\n    schedules: [\"TZ=0\"]\n", `bad schedule "TZ=0"`},
		{"empty time zone", "volumes:\n  - name: a\n    source: /dev/vdb\n    schedules: [\"CRON_TZ=\"]\n", `bad schedule "CRON_TZ="`},
		{"every zero", "volumes:\n  - name: a\n    source: /dev/vdb\n    schedules: [\"@every 0s\"]\n", `bad schedule "@every 0s": @every needs a positive interval`},
		{"keep_days overflow", "volumes:\n  - name: a\n    source: /dev/vdb\n    retention: {keep_days: 999999}\n", "keep_days: 999999 days is more than 100000"},
		{"relative state_dir", "state_dir: state\nvolumes: []\n", `state_dir: "state" is not an absolute path`},
		{"unknown socket_group", "socket_group: no-such-group-here\nvolumes: []\n", `socket_group: "no-such-group-here" is not a group`},
		{"bad metrics_listen", "metrics_listen: localhost\nvolumes: []\n", `metrics_listen: "localhost": write an address like`},
		{"metrics port out of range", "metrics_listen: 127.0.0.1:99999\nvolumes: []\n", "the port must be a number from 1 to 65535"},
		{"bad s3 location", "repository: s3:ftp://x/b/p\nvolumes: []\n", "write an S3 location like"},
		{"bad notify url", "notify: {url: not-a-url}\nvolumes: []\n", "notify.url"},
		{"bad notify on", "notify: {url: https://x.example/ping, on: [always]}\nvolumes: []\n", `notify.on[0]: "always"`},
		{"replicate to itself", "repository: /r\nreplicate: {repository: /r}\nvolumes: []\n", "replicate.repository: is the repository itself"},
		{"bad host", "host: ../x\nvolumes: []\n", `host: "../x"`},
		{"group of one", "volumes:\n  - name: a\n    source: /dev/vdb\ngroups:\n  - name: g\n    volumes: [a]\n", "groups[0].volumes: a group needs at least two volumes"},
		{"group of unknown volume", "volumes:\n  - name: a\n    source: /dev/vdb\ngroups:\n  - name: g\n    volumes: [a, b]\n", `groups[0].volumes[1]: "b" is not a volume defined under volumes:`},
		{"group named like a volume", "volumes:\n  - name: a\n    source: /dev/vdb\n  - name: b\n    source: /dev/vdc\ngroups:\n  - name: a\n    volumes: [a, b]\n", `groups[0].name: "a" is already the name of a volume at line 2`},
		{"volume in two groups", "volumes:\n  - name: a\n    source: /dev/vdb\n  - name: b\n    source: /dev/vdc\ngroups:\n  - name: g\n    volumes: [a, b]\n  - name: h\n    volumes: [b, a]\n", `is already in group`},
		{"bad group schedule", "volumes:\n  - name: a\n    source: /dev/vdb\n  - name: b\n    source: /dev/vdc\ngroups:\n  - name: g\n    volumes: [a, b]\n    schedules: [\"CRON_TZ=UTC\"]\n", `groups[0].schedules[0]: bad schedule`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Parse("stasis.yaml", []byte(c.yaml), probe)
			if err == nil {
				t.Fatalf("accepted:\n%s", c.yaml)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q does not contain %q", err, c.want)
			}
		})
	}
}

// TestEveryProblemAtOnce: a bad duration does not hide the problems after it.
func TestEveryProblemAtOnce(t *testing.T) {
	_, err := Parse("stasis.yaml", []byte("volumes:\n  - name: a\n    source: /dev/vdb\n    max_freeze: soon\n  - name: ../b\n    source: /dev/vdc\n    max_freeze: later\n"), probe)
	if err == nil {
		t.Fatal("accepted")
	}
	for _, want := range []string{`stasis.yaml:4: "soon" is not a duration`, `stasis.yaml:7: "later" is not a duration`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q missing from:\n%v", want, err)
		}
	}
}

// TestGroups: a group's members take no solo snapshots unless they have schedules of their
// own; the group gets the defaults a volume would.
func TestGroups(t *testing.T) {
	c, err := Parse("stasis.yaml", []byte(`
volumes:
  - name: data
    source: /dev/vdb
  - name: logs
    source: /dev/vdc
    schedules: ["@hourly"]
groups:
  - name: db
    volumes: [data, logs]
    max_freeze: 2s
`), probe)
	if err != nil {
		t.Fatal(err)
	}
	g := c.GroupByName("db")
	if g == nil || len(g.Parsed) != 1 || g.Schedules[0] != "@daily" || time.Duration(g.MaxFreeze) != 2*time.Second || *g.Retention.KeepAuto != 64 {
		t.Fatalf("group %+v", g)
	}
	if d := c.VolumeByName("data"); len(d.Parsed) != 0 {
		t.Fatalf("a member without schedules got solo schedules %v", d.Schedules)
	}
	if l := c.VolumeByName("logs"); len(l.Parsed) != 1 {
		t.Fatalf("a member's own schedules were dropped: %v", l.Schedules)
	}
	if c.GroupOf("logs") != g || c.GroupOf("nope") != nil {
		t.Fatal("GroupOf")
	}
}

func TestScheduleZone(t *testing.T) {
	for spec, want := range map[string]string{"CRON_TZ=Asia/Shanghai 30 2 * * *": "Asia/Shanghai", "TZ=UTC @daily": "UTC", "@hourly": "", "0 3 * * *": ""} {
		if got := ScheduleZone(spec); got != want {
			t.Errorf("ScheduleZone(%q) = %q, want %q", spec, got, want)
		}
	}
}

package retention

import (
	"fmt"
	"testing"
	"time"
)

var utc = time.UTC

func autoEvery(start time.Time, step time.Duration, n int) []Snapshot {
	var out []Snapshot
	for i := 0; i < n; i++ {
		at := start.Add(time.Duration(i) * step)
		out = append(out, Snapshot{ID: fmt.Sprint(i), Name: at.Format("auto_20060102_150405"), Created: at, Auto: true})
	}
	return out
}

func kept(ds []Decision) map[string]bool {
	m := map[string]bool{}
	for _, d := range ds {
		if d.Keep {
			m[d.Snapshot.ID] = true
		}
	}
	return m
}

func TestQuotaDropsOldest(t *testing.T) {
	now := time.Date(2026, 11, 23, 12, 0, 0, 0, utc)
	snaps := autoEvery(now.Add(-10*time.Hour), time.Hour, 10) // 10 within a day
	k := kept(Apply(snaps, Policy{KeepAuto: 4, KeepDays: 30}, now, utc))
	if len(k) != 4 || !k["9"] || !k["6"] || k["5"] {
		t.Fatalf("kept %v, want the 4 newest (6..9)", k)
	}
}

func TestKeepDays(t *testing.T) {
	now := time.Date(2026, 11, 23, 12, 0, 0, 0, utc)
	snaps := autoEvery(now.Add(-10*24*time.Hour), 24*time.Hour, 10) // one a day for 10 days
	k := kept(Apply(snaps, Policy{KeepAuto: 100, KeepDays: 3}, now, utc))
	// Ages 10..1 days: younger than 3 days are ages 2 and 1 (IDs 8, 9).
	if len(k) != 2 || !k["8"] || !k["9"] {
		t.Fatalf("kept %v", k)
	}
	k = kept(Apply(snaps, Policy{KeepAuto: 100, KeepDays: -1}, now, utc))
	if len(k) != 10 {
		t.Fatalf("keep_days -1 kept %d of 10", len(k))
	}
}

// TestGFS: hourly snapshots for 90 days, keep_days 1, 7 daily, 4 weekly, 3 monthly.
func TestGFS(t *testing.T) {
	now := time.Date(2026, 11, 23, 12, 30, 0, 0, utc) // a Monday
	snaps := autoEvery(now.Add(-90*24*time.Hour), time.Hour, 90*24)
	ds := Apply(snaps, Policy{KeepAuto: 1000, KeepDays: 1, KeepDaily: 7, KeepWeekly: 4, KeepMonthly: 3}, now, utc)
	k := map[time.Time]bool{}
	for _, d := range ds {
		if d.Keep {
			k[d.Snapshot.Created] = true
		}
	}
	at := func(m time.Month, d, h int) time.Time { return time.Date(2026, m, d, h, 30, 0, 0, utc) }
	// Younger than a day: the 23 snapshots from 13:30 yesterday to 11:30 today.
	for h := 1; h <= 23; h++ {
		if !k[now.Add(-time.Duration(h)*time.Hour)] {
			t.Fatalf("snapshot %dh old not kept", h)
		}
	}
	// Daily: the newest of Nov 17..21 (Nov 22 and 23 are already young enough).
	// Weekly: the newest of ISO weeks 46 and 45 (Sundays Nov 15 and 8).
	// Monthly: Oct 31 and Sep 30 (November's newest is today's).
	extra := []time.Time{at(11, 17, 23), at(11, 18, 23), at(11, 19, 23), at(11, 20, 23), at(11, 21, 23),
		at(11, 15, 23), at(11, 8, 23), at(10, 31, 23), at(9, 30, 23)}
	for _, e := range extra {
		if !k[e] {
			t.Fatalf("bucket snapshot %v not kept", e)
		}
	}
	if len(k) != 23+len(extra) {
		t.Fatalf("kept %d snapshots, want %d", len(k), 23+len(extra))
	}
}

func TestManualNeverPrunedAndNewestKept(t *testing.T) {
	now := time.Date(2026, 11, 23, 12, 0, 0, 0, utc)
	snaps := []Snapshot{
		{ID: "m-old", Created: now.Add(-400 * 24 * time.Hour)},
		{ID: "a-old", Created: now.Add(-300 * 24 * time.Hour), Auto: true},
		{ID: "a-newest", Created: now.Add(-200 * 24 * time.Hour), Auto: true},
	}
	k := kept(Apply(snaps, Policy{KeepAuto: 1, KeepDays: 1}, now, utc))
	if !k["m-old"] || !k["a-newest"] || k["a-old"] {
		t.Fatalf("kept %v: manual and the newest must stay, the old auto must go", k)
	}
}

func TestFutureDatedIgnored(t *testing.T) {
	now := time.Date(2026, 11, 23, 12, 0, 0, 0, utc)
	snaps := autoEvery(now.Add(-5*time.Hour), time.Hour, 5)
	snaps = append(snaps, Snapshot{ID: "future", Created: now.Add(48 * time.Hour), Auto: true})
	ds := Apply(snaps, Policy{KeepAuto: 2, KeepDays: 30}, now, utc)
	k := kept(ds)
	// The future one is kept and does not use up the quota: the 2 newest real ones stay.
	if !k["future"] || !k["4"] || !k["3"] || k["2"] || len(k) != 3 {
		t.Fatalf("kept %v", k)
	}
}

// TestDST: daily buckets follow the calendar in the configured zone across a DST change,
// including the 25-hour day.
func TestDST(t *testing.T) {
	ny, err := time.LoadLocation("America/New_York")
	if err != nil {
		t.Skip("no tzdata")
	}
	// DST ends 2026-11-01 02:00 in New York: that day has 25 hours.
	var snaps []Snapshot
	for d := 29; d <= 31; d++ {
		snaps = append(snaps, Snapshot{ID: fmt.Sprintf("oct%d-2330", d), Created: time.Date(2026, 10, d, 23, 30, 0, 0, ny), Auto: true})
	}
	snaps = append(snaps,
		Snapshot{ID: "nov1-0030", Created: time.Date(2026, 11, 1, 0, 30, 0, 0, ny), Auto: true},
		Snapshot{ID: "nov1-2330", Created: time.Date(2026, 11, 1, 23, 30, 0, 0, ny), Auto: true}, // 24h after 00:30 is 23:30 the same day
		Snapshot{ID: "nov2-0030", Created: time.Date(2026, 11, 2, 0, 30, 0, 0, ny), Auto: true},
	)
	now := time.Date(2026, 11, 2, 12, 0, 0, 0, ny)
	k := kept(Apply(snaps, Policy{KeepAuto: 100, KeepDays: 0, KeepDaily: 3}, now, ny))
	want := map[string]bool{"nov2-0030": true, "nov1-2330": true, "oct31-2330": true}
	if len(k) != 3 {
		t.Fatalf("kept %v, want %v", k, want)
	}
	for id := range want {
		if !k[id] {
			t.Fatalf("kept %v, want %v", k, want)
		}
	}
}

// TestLastHourlyYearlyWithin: keep_last keeps the newest N whatever their age; hourly and
// yearly buckets keep the newest of each hour and year; keep_within keeps by age.
func TestLastHourlyYearlyWithin(t *testing.T) {
	now := time.Date(2026, 11, 23, 12, 0, 0, 0, utc)
	// Every 20 minutes for 3 hours, all older than a year, except none: shift far back.
	old := autoEvery(now.Add(-400*24*time.Hour), 20*time.Minute, 9)
	k := kept(Apply(old, Policy{KeepLast: 2}, now, utc))
	if len(k) != 2 || !k["8"] || !k["7"] {
		t.Fatalf("keep_last 2 kept %v", k)
	}
	k = kept(Apply(old, Policy{KeepHourly: 2}, now, utc))
	// Hours: 0,1,2 -> hour 0; 3,4,5 -> hour 1; 6,7,8 -> hour 2: the newest of the last two hours.
	if len(k) != 2 || !k["8"] || !k["5"] {
		t.Fatalf("keep_hourly 2 kept %v", k)
	}
	years := []Snapshot{
		{ID: "a", Created: time.Date(2023, 6, 1, 0, 0, 0, 0, utc), Auto: true},
		{ID: "b", Created: time.Date(2024, 3, 1, 0, 0, 0, 0, utc), Auto: true},
		{ID: "c", Created: time.Date(2024, 9, 1, 0, 0, 0, 0, utc), Auto: true},
		{ID: "d", Created: time.Date(2025, 1, 1, 0, 0, 0, 0, utc), Auto: true},
	}
	k = kept(Apply(years, Policy{KeepYearly: 2}, now, utc))
	if len(k) != 2 || !k["d"] || !k["c"] {
		t.Fatalf("keep_yearly 2 kept %v", k)
	}
	recent := autoEvery(now.Add(-48*time.Hour), 6*time.Hour, 8) // 48h ago .. 6h ago
	k = kept(Apply(recent, Policy{KeepWithin: 25 * time.Hour}, now, utc))
	if len(k) != 4 || !k["4"] || k["3"] {
		t.Fatalf("keep_within 25h kept %v", k)
	}
}

// Package retention decides which automatic snapshots a volume keeps. It is a pure function
// of the snapshots, the policy, the clock and the time zone, so it is tested with a fake
// clock and previewed by `stasis prune --dry-run` exactly as it will run.
package retention

import (
	"fmt"
	"sort"
	"time"
)

// Policy is a volume's retention policy. Zero values of the bucket counts disable them.
type Policy struct {
	KeepAuto    int // at most this many auto snapshots (quota); the oldest go first
	KeepDays    int // auto snapshots older than this many days go; -1 keeps forever
	KeepLast    int // also keep the newest N auto snapshots, whatever their age
	KeepHourly  int // also keep the newest snapshot of each of the last N hours that have one
	KeepDaily   int // ... of each of the last N days
	KeepWeekly  int // ... of each of the last N ISO weeks
	KeepMonthly int // ... of each of the last N calendar months
	KeepYearly  int // ... of each of the last N calendar years
	// KeepWithin, if positive, keeps auto snapshots younger than it (as KeepDays does in days).
	KeepWithin time.Duration
}

// Snapshot is what the policy looks at.
type Snapshot struct {
	ID        string
	Name      string
	Created   time.Time
	Auto      bool
	Protected bool // kept, whatever the rules say (stasis protect)
}

// Decision is the verdict on one snapshot, with the reason, for previews and logs.
type Decision struct {
	Snapshot Snapshot
	Keep     bool
	Reason   string
}

// Apply decides for every snapshot of one volume. Manual snapshots are always kept;
// snapshots dated in the future (a clock that jumped) are kept and ignored by the rules; the
// volume's newest snapshot is always kept, so pruning never leaves a volume without one.
// Within the rest, an auto snapshot is kept when it is younger than KeepDays or is the
// newest of a daily, weekly or monthly bucket; then, if more than KeepAuto are kept, the
// oldest of them go. Days, weeks and months are calendar periods in loc, so a day is a day
// across daylight-saving changes.
func Apply(snaps []Snapshot, p Policy, now time.Time, loc *time.Location) []Decision {
	sorted := append([]Snapshot(nil), snaps...)
	sort.SliceStable(sorted, func(i, j int) bool { return sorted[i].Created.After(sorted[j].Created) }) // newest first
	out := make([]Decision, len(sorted))
	keep := map[int]string{}
	var autos []int // indexes of auto snapshots subject to the rules, newest first
	newest := -1
	for i, s := range sorted {
		out[i].Snapshot = s
		switch {
		case s.Created.After(now):
			keep[i] = "dated in the future: ignored by retention"
			continue
		case newest < 0:
			newest = i
		}
		if s.Protected {
			keep[i] = "protected (stasis unprotect releases it)"
			continue
		}
		if !s.Auto {
			keep[i] = "manual snapshots are never pruned"
			continue
		}
		autos = append(autos, i)
	}
	if newest >= 0 {
		if _, ok := keep[newest]; !ok {
			keep[newest] = "newest snapshot of the volume"
		}
	}
	ruled := map[int]string{}
	for _, i := range autos {
		s := sorted[i]
		age := now.Sub(s.Created)
		switch {
		case p.KeepDays < 0:
			ruled[i] = "keep_days -1 keeps every auto snapshot"
		case age < time.Duration(p.KeepDays)*24*time.Hour:
			ruled[i] = fmt.Sprintf("younger than %d days", p.KeepDays)
		case p.KeepWithin > 0 && age < p.KeepWithin:
			ruled[i] = fmt.Sprintf("younger than %v", p.KeepWithin)
		}
	}
	for k, i := range autos {
		if k >= p.KeepLast {
			break
		}
		if _, ok := ruled[i]; !ok {
			ruled[i] = fmt.Sprintf("one of the newest %d", p.KeepLast)
		}
	}
	bucket := func(n int, what string, key func(time.Time) string) {
		seen := map[string]bool{}
		for _, i := range autos {
			if len(seen) >= n {
				return
			}
			k := key(sorted[i].Created.In(loc))
			if seen[k] {
				continue
			}
			seen[k] = true
			if _, ok := ruled[i]; !ok {
				ruled[i] = fmt.Sprintf("newest of %s %s", what, k)
			}
		}
	}
	bucket(p.KeepHourly, "hour", func(t time.Time) string { return t.Format("2006-01-02 15h") })
	bucket(p.KeepDaily, "day", func(t time.Time) string { return t.Format("2006-01-02") })
	bucket(p.KeepWeekly, "week", func(t time.Time) string { y, w := t.ISOWeek(); return fmt.Sprintf("%d-W%02d", y, w) })
	bucket(p.KeepMonthly, "month", func(t time.Time) string { return t.Format("2006-01") })
	bucket(p.KeepYearly, "year", func(t time.Time) string { return t.Format("2006") })
	// The quota caps what the rules keep; the newest ones win.
	kept := 0
	for _, i := range autos {
		reason, ok := ruled[i]
		if !ok {
			continue
		}
		if p.KeepAuto > 0 && kept >= p.KeepAuto {
			continue
		}
		kept++
		if _, already := keep[i]; !already {
			keep[i] = reason
		}
	}
	for i := range out {
		if reason, ok := keep[i]; ok {
			out[i].Keep, out[i].Reason = true, reason
			continue
		}
		if _, ruledIn := ruled[i]; ruledIn {
			out[i].Reason = fmt.Sprintf("over the quota of %d auto snapshots", p.KeepAuto)
		} else {
			out[i].Reason = "older than keep_days, not among keep_last, in no hourly, daily, weekly, monthly or yearly bucket"
		}
	}
	return out
}

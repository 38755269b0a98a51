package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/stasis-project/stasis/agent/retention"
	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/config"
)

// ReplicaStatus is what `stasis status` shows about replication to the second repository.
type ReplicaStatus struct {
	Repository string `json:"repository"`
	Running    bool   `json:"running"`
	// Lag counts this host's snapshots newer than the replica's newest copy of their volume.
	Lag         int    `json:"lag"`
	Snapshots   int    `json:"snapshots"` // this host's snapshots in the replica
	LastSuccess string `json:"last_success,omitempty"`
	LastError   string `json:"last_error,omitempty"`
	LastErrorAt string `json:"last_error_at,omitempty"`
	CopiedBytes int64  `json:"copied_bytes"` // stored in the replica since the agent started
}

// Opener opens a configured repository for the agent, creating it on first use:
// passwordFile is its passphrase's file ("" for an unencrypted one).
type Opener func(ctx context.Context, location, passwordFile string) (*chain.Repository, error)

// replicator copies this host's snapshots of the volumes it serves to one replica
// repository after each snapshot, in the background, and applies the replica's own
// retention. A failed pass is retried at the next kick, with a backoff; the lag says how
// far behind the replica is. The agent runs one per replica repository: the top-level
// replicate serves every volume without a replicate of its own.
type replicator struct {
	s                      *Service
	open                   Opener
	kick                   chan struct{}
	location, passwordFile string

	mu      sync.Mutex
	replica *chain.Repository
	status  ReplicaStatus
}

func newReplicator(s *Service, r *config.Replicate, open Opener) *replicator {
	p := &replicator{s: s, open: open, location: r.Repository, passwordFile: r.PasswordFile, kick: make(chan struct{}, 1),
		status: ReplicaStatus{Repository: r.Repository}}
	s.metrics.replica(p.location)
	return p
}

// newReplicators makes one replicator per replica repository of the configuration.
func newReplicators(s *Service, cfg *config.Config, open Opener) []*replicator {
	var out []*replicator
	seen := map[string]bool{}
	for _, r := range cfg.Replicas() {
		if !seen[r.Repository] {
			seen[r.Repository] = true
			out = append(out, newReplicator(s, r, open))
		}
	}
	return out
}

// retention is the retention this replica applies to a volume's snapshots; ok is false
// for a volume it does not serve (the configuration sends it elsewhere, or nowhere).
func (p *replicator) retention(volume string) (r config.Retention, ok bool) {
	p.s.mu.Lock()
	rep := p.s.cfg.ReplicaOf(volume)
	p.s.mu.Unlock()
	if rep == nil || rep.Repository != p.location {
		return config.Retention{}, false
	}
	return rep.Retention, true
}

func (p *replicator) serves(volume string) bool {
	_, ok := p.retention(volume)
	return ok
}

// wake asks for a pass soon; it never blocks.
func (p *replicator) wake() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// run makes passes until ctx ends: when woken, and every retry period after a failure.
func (p *replicator) run(ctx context.Context) {
	defer func() {
		p.mu.Lock()
		if p.replica != nil {
			p.replica.Close()
		}
		p.mu.Unlock()
	}()
	backoff := time.Minute
	var retry <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.kick:
		case <-retry:
		}
		retry = nil
		if err := p.pass(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			p.s.log.Error("replication failed; retrying", "replica", p.location, "in", backoff, "err", err)
			p.s.metrics.replicaFailure(p.location)
			p.mu.Lock()
			p.status.LastError, p.status.LastErrorAt = err.Error(), stampTime(time.Now())
			p.mu.Unlock()
			retry = time.After(backoff)
			backoff = min(2*backoff, time.Hour)
			continue
		}
		backoff = time.Minute
	}
}

// pass copies every snapshot of this host the replica lacks, oldest first, then applies
// the replica's retention.
func (p *replicator) pass(ctx context.Context) error {
	p.mu.Lock()
	p.status.Running = true
	replica := p.replica
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		p.status.Running = false
		p.mu.Unlock()
	}()
	if replica == nil {
		r, err := p.open(ctx, p.location, p.passwordFile)
		if err != nil {
			return fmt.Errorf("open the replica: %w", err)
		}
		p.mu.Lock()
		p.replica, replica = r, r
		p.mu.Unlock()
	}
	todo, err := p.pending(ctx, replica)
	if err != nil {
		return err
	}
	var st chain.CopyStats
	for _, snap := range todo {
		before := st.BytesStored
		if _, err := chain.Copy(ctx, p.s.repo.Reader, replica, snap, &st); err != nil {
			if errors.Is(err, chain.ErrNotFound) || errors.Is(err, chain.ErrNotExist) {
				continue // deleted by retention meanwhile
			}
			p.updateLag(ctx, replica)
			return err
		}
		if st.BytesStored > before {
			p.s.metrics.replicaBytes(p.location, st.BytesStored-before)
			p.s.log.Info("replicated", "volume", snap.Volume, "snapshot", snap.Name, "replica", replica.Location(), "stored_bytes", st.BytesStored-before)
		}
	}
	if err := p.retain(ctx, replica); err != nil {
		p.s.log.Error("retention on the replica failed", "replica", replica.Location(), "err", err)
	}
	p.mu.Lock()
	p.status.CopiedBytes += st.BytesStored
	p.status.LastSuccess, p.status.LastError, p.status.LastErrorAt = stampTime(time.Now()), "", ""
	p.mu.Unlock()
	p.s.metrics.replicaSuccess(p.location)
	p.updateLag(ctx, replica)
	return nil
}

// pending returns this host's snapshots the replica should receive, oldest first: per
// volume it serves, those newer than the replica's newest copy (all of them for a volume
// the replica does not have yet). Older ones missing from the replica were deleted there
// by its own retention, and stay deleted.
func (p *replicator) pending(ctx context.Context, replica *chain.Repository) ([]*chain.Snapshot, error) {
	all, _, err := p.s.ownSnapshots(ctx)
	if err != nil {
		return nil, err
	}
	var own []*chain.Snapshot
	for _, s := range all {
		if p.serves(s.Volume) {
			own = append(own, s)
		}
	}
	theirs, _, err := replica.Snapshots(ctx)
	if err != nil {
		return nil, err
	}
	theirs = chain.OfHost(theirs, p.s.repo.Host())
	newest := map[string]time.Time{}
	for _, s := range theirs {
		if s.Created.After(newest[s.Volume]) {
			newest[s.Volume] = s.Created
		}
	}
	var todo []*chain.Snapshot
	for _, s := range own {
		if s.Created.After(newest[s.Volume]) && chain.CopyOf(theirs, s) == nil {
			todo = append(todo, s)
		}
	}
	p.mu.Lock()
	p.status.Lag, p.status.Snapshots = len(todo), len(theirs)
	p.mu.Unlock()
	p.s.metrics.replicaLag(p.location, len(todo))
	return todo, nil
}

// updateLag refreshes the lag after a pass.
func (p *replicator) updateLag(ctx context.Context, replica *chain.Repository) {
	if _, err := p.pending(ctx, replica); err != nil {
		p.s.log.Warn("cannot read the replica's snapshots", "err", err)
	}
}

// retain applies each served volume's replica retention to this host's chains in the
// replica: its automatic snapshots, group members included (they share names and times,
// so a group's members are kept or deleted together). Another host's snapshots, and
// volumes this replica does not serve, are never touched.
// If another process holds the replica's deletion lock, retention waits for the next pass.
func (p *replicator) retain(ctx context.Context, replica *chain.Repository) error {
	holder := fmt.Sprintf("pid %d (stasis agent: replica retention) on %s since %s", os.Getpid(), replica.Host(), stampTime(time.Now()))
	unlock, err := replica.Lock(ctx, holder)
	if errors.Is(err, chain.ErrLocked) {
		p.s.log.Warn("replica retention deferred to the next pass", "reason", err)
		return nil
	}
	if err != nil {
		return err
	}
	defer unlock()
	snaps, _, err := replica.Snapshots(ctx)
	if err != nil {
		return err
	}
	byVolume := map[string][]*chain.Snapshot{}
	for _, sn := range chain.OfHost(snaps, replica.Host()) {
		byVolume[sn.Volume] = append(byVolume[sn.Volume], sn)
	}
	var victims []*chain.Snapshot
	now := time.Now()
	for volume, list := range byVolume {
		if r, ok := p.retention(volume); ok {
			_, v := PlanReplica(list, r, now)
			victims = append(victims, v...)
		}
	}
	if len(victims) == 0 {
		return nil
	}
	if err := replica.Delete(ctx, victims...); err != nil {
		return err
	}
	for _, v := range victims {
		p.s.log.Info("replica retention deleted a snapshot", "volume", v.Volume, "snapshot", v.Name)
	}
	p.s.mu.Lock()
	gcAfter := *p.s.cfg.GCAfterPrune
	p.s.mu.Unlock()
	if gcAfter {
		if _, err := replica.GC(ctx, chain.GCOptions{}); err != nil {
			return fmt.Errorf("gc of the replica: %w", err)
		}
	}
	return nil
}

// PlanReplica applies one retention policy to every volume's snapshots in a replica.
func PlanReplica(snaps []*chain.Snapshot, r config.Retention, now time.Time) ([]PruneDecision, []*chain.Snapshot) {
	return PlanPolicy(snaps, policy(r), now, false)
}

// PlanPolicy applies p to each volume's snapshots among snaps (one host's), group members
// included: they share names and times, so a group's members are kept or deleted together.
// Manual snapshots are kept unless manualToo.
func PlanPolicy(snaps []*chain.Snapshot, p retention.Policy, now time.Time, manualToo bool) ([]PruneDecision, []*chain.Snapshot) {
	byVolume := map[string][]*chain.Snapshot{}
	for _, s := range snaps {
		byVolume[s.Volume] = append(byVolume[s.Volume], s)
	}
	var out []PruneDecision
	var victims []*chain.Snapshot
	for vol, ss := range byVolume {
		byID := map[string]*chain.Snapshot{}
		var in []retention.Snapshot
		for _, s := range ss {
			byID[s.ID] = s
			in = append(in, retention.Snapshot{ID: s.ID, Name: s.Name, Created: s.Created, Auto: manualToo || s.Kind == chain.KindAuto, Protected: s.Protected})
		}
		for _, d := range retention.Apply(in, p, now, time.Local) {
			out = append(out, PruneDecision{Volume: vol, Name: d.Snapshot.Name, ID: d.Snapshot.ID, Created: d.Snapshot.Created, Keep: d.Keep, Reason: d.Reason})
			if !d.Keep {
				victims = append(victims, byID[d.Snapshot.ID])
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Created.Before(out[j].Created) })
	return out, victims
}

// snapshot returns the current status.
func (p *replicator) snapshot() *ReplicaStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := p.status
	return &st
}

// stampTime writes times as every JSON report does: RFC 3339, UTC, milliseconds.
func stampTime(t time.Time) string { return t.UTC().Format("2006-01-02T15:04:05.000Z07:00") }

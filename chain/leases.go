package chain

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Liveness of snapshot writers and of deletion leases is shown by objects that the holder
// rewrites (as new objects) while it works: NAME.start once, then NAME.<sequence> every
// LeaseRefresh. Their modification times are the storage's clock, so hosts compare them
// without trusting each other's clocks. A holder whose newest object is older than
// LeaseStale is dead; a holder that could not refresh for LeaseStale/2 stops before its
// next irreversible step (a commit, a deletion), so it is never taken for dead while alive.
var (
	LeaseRefresh = time.Minute
	LeaseStale   = 10 * time.Minute
)

// leaseInfo is the content of a lease object.
type leaseInfo struct {
	Holder  string    `json:"holder"`
	Host    string    `json:"host"`
	PID     int       `json:"pid"`
	Created time.Time `json:"created"`
	// Machine, Boot and PIDNS say where PID lives (machine-id, boot_id, PID namespace): a
	// holder on this very machine whose process is gone, or from an earlier boot, is dead
	// at once, without waiting LeaseStale.
	Machine string `json:"machine,omitempty"`
	Boot    string `json:"boot,omitempty"`
	PIDNS   string `json:"pidns,omitempty"`
	// Parent is the snapshot a writer builds on (its ID), if any: its chunks may be
	// referenced without being stored again, so it is not deleted while the writer runs.
	Parent string `json:"parent,omitempty"`
}

// processPlace is this process's machine, boot and PID namespace, read once.
var processPlace = sync.OnceValue(func() [3]string {
	read := func(p string) string {
		b, _ := os.ReadFile(p)
		return strings.TrimSpace(string(b))
	}
	ns, _ := os.Readlink("/proc/self/ns/pid")
	return [3]string{read("/etc/machine-id"), read("/proc/sys/kernel/random/boot_id"), ns}
})

// deadHere reports whether info names a process of this machine that is known to be gone:
// one from an earlier boot, or one in this PID namespace that no longer exists. Anything
// it cannot tell counts as alive.
func (info leaseInfo) deadHere() bool {
	here := processPlace()
	if info.Machine == "" || info.Machine != here[0] || here[0] == "" {
		return false
	}
	if info.Boot != "" && here[1] != "" && info.Boot != here[1] {
		return true
	}
	if info.Boot != here[1] || info.PIDNS == "" || info.PIDNS != here[2] || info.PID <= 0 {
		return false
	}
	return syscall.Kill(info.PID, 0) == syscall.ESRCH
}

// lease keeps a holder's objects fresh in one file type.
type lease struct {
	r       *Reader
	t       FileType
	id      string
	info    leaseInfo
	mu      sync.Mutex
	last    string    // newest refresh object
	okAt    time.Time // when a refresh last succeeded
	stop    chan struct{}
	stopped chan struct{}
}

func randomName() string {
	b := make([]byte, 12)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// startLease writes the holder's start object and keeps refreshing until release. parent
// is a writer's parent snapshot's ID ("" for none, and for other leases).
func startLease(ctx context.Context, r *Reader, t FileType, holder, parent string) (*lease, error) {
	l := &lease{r: r, t: t, id: randomName(), stop: make(chan struct{}), stopped: make(chan struct{}),
		info: leaseInfo{Holder: holder, Host: r.host, PID: os.Getpid(), Created: time.Now().UTC(), Parent: parent}}
	place := processPlace()
	l.info.Machine, l.info.Boot, l.info.PIDNS = place[0], place[1], place[2]
	// The start object is also the first sign of life (one round trip, not two).
	if err := l.write(ctx, l.id+".start"); err != nil {
		return nil, err
	}
	l.last, l.okAt = l.id+".start", time.Now()
	r.leaseIDs.Store(l.id, l)
	go func() {
		defer close(l.stopped)
		tick := time.NewTicker(LeaseRefresh)
		defer tick.Stop()
		for {
			select {
			case <-l.stop:
				return
			case <-tick.C:
				if err := l.refresh(context.Background()); err != nil {
					r.log.Warn("could not refresh a lease; stopping before the next irreversible step if this goes on", "type", t, "err", err)
				}
			}
		}
	}()
	return l, nil
}

func (l *lease) write(ctx context.Context, name string) error {
	b, _ := json.Marshal(l.info)
	return l.r.be.Save(ctx, Handle{Type: l.t, Name: name}, l.r.sealObject(l.t, name, b))
}

func (l *lease) remove(ctx context.Context, name string) {
	if err := l.r.be.Remove(ctx, Handle{Type: l.t, Name: name}); err != nil && !errors.Is(err, ErrNotExist) {
		l.r.log.Warn("could not remove a lease object; it goes stale", "type", l.t, "name", name, "err", err)
	}
}

// refresh writes a new refresh object and removes the previous one.
func (l *lease) refresh(ctx context.Context) error {
	name := l.id + "." + strconv.FormatInt(time.Now().UnixNano(), 10)
	if err := l.write(ctx, name); err != nil {
		return err
	}
	l.mu.Lock()
	old := l.last
	l.last, l.okAt = name, time.Now()
	l.mu.Unlock()
	if old != "" && old != l.id+".start" { // the start object stays: it says when the holder began
		l.remove(ctx, old)
	}
	return nil
}

// fresh fails if the lease has not been refreshed for LeaseStale/2: others may soon take
// the holder for dead, so it must not take another irreversible step.
func (l *lease) fresh() error {
	if l == nil { // a backend lock (flock) that the kernel holds for as long as we live
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if since := time.Since(l.okAt); since > LeaseStale/2 {
		return fmt.Errorf("could not show this process alive in %s for %s (the storage was unreachable, or the process was paused): stopping, since others may take it for dead after %s", l.r.Location(), since.Round(time.Second), LeaseStale)
	}
	return nil
}

// release stops refreshing and removes the holder's objects.
func (l *lease) release() {
	close(l.stop)
	<-l.stopped
	l.r.leaseIDs.Delete(l.id)
	ctx := context.Background()
	l.mu.Lock()
	last := l.last
	l.mu.Unlock()
	if last != l.id+".start" {
		l.remove(ctx, last)
	}
	l.remove(ctx, l.id+".start")
}

// ownLease returns this handle's lease id, or nil.
func (r *Reader) ownLease(id string) *lease {
	l, _ := r.leaseIDs.Load(id)
	l2, _ := l.(*lease)
	return l2
}

// storageNow estimates the storage's clock: this machine's, less the skew measured from
// our own lease objects (an overestimate of the skew by the listing's latency, so the
// estimate errs early: toward counting others alive).
func (r *Reader) storageNow() time.Time {
	return time.Now().Add(-time.Duration(r.clockSkew.Load()))
}

// holderState is one holder seen in a listing.
type holderState struct {
	id       string
	started  time.Time // the storage's time of the start object
	lastSeen time.Time // the storage's time of the newest object
	newest   string    // the newest object's name
	info     leaseInfo
	objects  []string
}

// listHolders reads the holders of file type t; stale ones (dead for LeaseStale) are
// returned apart.
func listHolders(ctx context.Context, r *Reader, t FileType) (live, stale []holderState, err error) {
	by := map[string]*holderState{}
	err = r.be.List(ctx, t, func(fi FileInfo) error {
		id, suffix, ok := strings.Cut(fi.Name, ".")
		if !ok {
			return nil
		}
		h := by[id]
		if h == nil {
			h = &holderState{id: id}
			by[id] = h
		}
		h.objects = append(h.objects, fi.Name)
		if suffix == "start" {
			h.started = fi.ModTime
			if b, err := r.be.ReadAll(ctx, Handle{Type: t, Name: fi.Name}); err == nil {
				if plain, err := r.openObject(t, fi.Name, b); err == nil {
					json.Unmarshal(plain, &h.info)
				}
			}
		}
		if fi.ModTime.After(h.lastSeen) {
			h.lastSeen, h.newest = fi.ModTime, fi.Name
		}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("list %s: %w", t, err)
	}
	// Staleness is judged on the storage's clock: this machine's clock may be off. Our own
	// lease objects, when listed, say how far (their times are the storage's, and we wrote
	// the newest one no later than now); otherwise the last measurement stands.
	for id, h := range by {
		if l := r.ownLease(id); l != nil {
			l.mu.Lock()
			last, wrote := l.last, l.okAt // when that object's write returned, by this clock
			l.mu.Unlock()
			if last == h.newest {
				r.clockSkew.Store(int64(wrote.Sub(h.lastSeen)))
			}
		}
	}
	now := r.storageNow()
	ids := make([]string, 0, len(by))
	for id := range by {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		h := by[id]
		if h.started.IsZero() {
			h.started = h.lastSeen
		}
		if now.Sub(h.lastSeen) > LeaseStale || h.info.deadHere() {
			stale = append(stale, *h)
		} else {
			live = append(live, *h)
		}
	}
	return live, stale, nil
}

// leaseLock takes the deletion lock with lease objects, for backends that cannot lock
// (object storage): it writes its own lease, then gives up if any other live lease exists.
// Two that start at once may both give up (the caller retries); two never both hold it,
// since each lists after writing and the storage's listing is consistent.
func leaseLock(ctx context.Context, r *Reader, holder string) (func() error, error) {
	l, err := startLease(ctx, r, LockFile, holder, "")
	if err != nil {
		return nil, fmt.Errorf("lock repository: %w", err)
	}
	live, stale, err := listHolders(ctx, r, LockFile)
	if err != nil {
		l.release()
		return nil, err
	}
	for _, h := range live {
		if h.id != l.id {
			l.release()
			who := h.info.Holder
			if who == "" {
				who = "another process"
			}
			return nil, &LockedError{Location: r.Location(), Holder: who}
		}
	}
	for _, h := range stale { // a dead holder's leftovers
		for _, name := range h.objects {
			r.be.Remove(ctx, Handle{Type: LockFile, Name: name})
		}
	}
	r.mu.Lock()
	r.deletionLease = l
	r.mu.Unlock()
	return func() error {
		r.mu.Lock()
		r.deletionLease = nil
		r.mu.Unlock()
		l.release()
		return nil
	}, nil
}

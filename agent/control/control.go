// Package control is the agent's control socket: the protocol the CLI speaks to a running
// agent (stasis snapshot VOLUME, status, prune, list), its server and its client.
package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stasis-project/stasis/agent"
	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/config"
)

// The control socket speaks JSON lines: the client sends one Request; the agent answers
// with zero or more {"note": ...} lines (for example "waiting for the running snapshot")
// and one final Response line.

// Request asks the agent to do something.
type Request struct {
	Op     string `json:"op"` // status | snapshot | prune | list
	Volume string `json:"volume,omitempty"`
	Name   string `json:"name,omitempty"`
	DryRun bool   `json:"dry_run,omitempty"`
	// A snapshot's tags and note.
	Tags  []string `json:"tags,omitempty"`
	Note  string   `json:"note,omitempty"`
	Force bool     `json:"force,omitempty"`
}

// Response is the final answer.
type Response struct {
	Note      string                  `json:"note,omitempty"`
	Error     string                  `json:"error,omitempty"`
	Status    []agent.VolumeStatus    `json:"status,omitempty"`
	Replicas  []*agent.ReplicaStatus  `json:"replicas,omitempty"`
	Snapshot  *agent.SnapshotReport   `json:"snapshot,omitempty"`
	Group     []*agent.SnapshotReport `json:"group,omitempty"` // every member, for a group snapshot
	Decisions []agent.PruneDecision   `json:"decisions,omitempty"`
	Snapshots []*chain.Snapshot       `json:"snapshots,omitempty"`
	// Progress, on a line before the final one, says how far a snapshot is.
	Progress *ProgressNote `json:"progress,omitempty"`
	Final    bool          `json:"final"`
}

// ProgressNote is a running snapshot's progress: bytes handed to the repository, and the
// bytes it reads in all (0 while unknown, as for a tracked incremental).
type ProgressNote struct {
	Done  int64 `json:"done"`
	Total int64 `json:"total"`
}

// progressLines sends a snapshot's progress to the client, at most a few lines a second.
// Its methods are called from the capture's goroutines at once.
type progressLines struct {
	mu          sync.Mutex
	send        func(Response)
	done, total int64
	last        time.Time
}

func (p *progressLines) add(n int64)      { p.update(n, 0) }
func (p *progressLines) addTotal(n int64) { p.update(0, n) }

func (p *progressLines) update(done, total int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done += done
	p.total += total
	if now := time.Now(); total > 0 || now.Sub(p.last) >= 250*time.Millisecond {
		p.last = now
		p.send(Response{Progress: &ProgressNote{Done: p.done, Total: p.total}})
	}
}

// Handler is what the socket serves: the agent's Service.
type Handler interface {
	Status() []agent.VolumeStatus
	Replicas() []*agent.ReplicaStatus
	Snapshot(name string, req agent.Request, said func(string)) ([]*agent.Outcome, error)
	Prune(name string, dryRun bool) ([]agent.PruneDecision, error)
	List() ([]*chain.Snapshot, error)
}

// server serves one socket.
type server struct {
	h   Handler
	log *slog.Logger
	// unprivileged counts snapshots requested by users other than root.
	unprivileged atomic.Int32
}

// Serve listens on path (root only, or group-readable for group) until ctx ends.
func Serve(ctx context.Context, path, group string, h Handler, log *slog.Logger) error {
	s := &server{h: h, log: log}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return fmt.Errorf("another agent is serving %s: stop it first", path)
	}
	os.Remove(path) // a stale socket of a dead agent
	l, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	mode := os.FileMode(0o600)
	if group != "" {
		gid, err := config.LookupGroup(group)
		if err != nil {
			l.Close()
			return fmt.Errorf("socket_group: %w", err)
		}
		os.Chown(path, 0, gid)
		mode = 0o660
	}
	os.Chmod(path, mode)
	go func() {
		<-ctx.Done()
		l.Close()
		os.Remove(path)
	}()
	backoff := 5 * time.Millisecond
	idle := &idleConns{open: map[net.Conn]bool{}}
	for {
		conn, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			// Out of descriptors (EMFILE) or another passing failure: wait and go on, as
			// net/http does; the agent's schedules must not stop because of a client.
			s.log.Warn("control socket: accept failed; retrying", "err", err, "in", backoff)
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
				return nil
			}
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		idle.add(conn)
		go s.handle(conn, idle)
	}
}

// idleConns are connections that have not sent their request yet. Past maxIdle the oldest
// is closed: a flood of idle clients costs the agent a bounded number of descriptors and
// never keeps a real request out.
type idleConns struct {
	mu    sync.Mutex
	order []net.Conn
	open  map[net.Conn]bool
}

const maxIdle = 256

func (c *idleConns) add(conn net.Conn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.open[conn] = true
	c.order = append(c.order, conn)
	for len(c.open) > maxIdle && len(c.order) > 0 {
		old := c.order[0]
		c.order = c.order[1:]
		if c.open[old] {
			delete(c.open, old)
			old.Close()
		}
	}
	if len(c.order) > 4*maxIdle { // forget the ones already gone
		live := c.order[:0]
		for _, o := range c.order {
			if c.open[o] {
				live = append(live, o)
			}
		}
		c.order = live
	}
}

// done marks a connection as no longer idle.
func (c *idleConns) done(conn net.Conn) {
	c.mu.Lock()
	delete(c.open, conn)
	c.mu.Unlock()
}

// Limits on the control socket: a client has requestTimeout to send its request, of at
// most maxRequest bytes; callers other than root may have maxUnprivilegedSnapshots
// snapshots requested at a time.
const (
	requestTimeout           = 5 * time.Second
	maxRequest               = 64 << 10
	maxUnprivilegedSnapshots = 2
)

func (s *server) handle(conn net.Conn, idle *idleConns) {
	defer conn.Close()
	enc := json.NewEncoder(conn)
	var req Request
	conn.SetReadDeadline(time.Now().Add(requestTimeout))
	dec := json.NewDecoder(bufio.NewReader(io.LimitReader(conn, maxRequest)))
	err := dec.Decode(&req)
	idle.done(conn)
	if err != nil {
		enc.Encode(Response{Error: "bad request: " + err.Error(), Final: true})
		return
	}
	conn.SetReadDeadline(time.Time{})
	resp := Response{Final: true}
	switch req.Op {
	case "status":
		resp.Status = s.h.Status()
		resp.Replicas = s.h.Replicas()
	case "snapshot":
		if uid, ok := peerUID(conn); !ok || uid != 0 {
			if s.unprivileged.Add(1) > maxUnprivilegedSnapshots {
				s.unprivileged.Add(-1)
				resp.Error = fmt.Sprintf("%d snapshots requested by users other than root are already waiting or running; try again when they are done", maxUnprivilegedSnapshots)
				break
			}
			defer s.unprivileged.Add(-1)
		}
		var encMu sync.Mutex // notes and progress come from several goroutines
		send := func(r Response) {
			encMu.Lock()
			defer encMu.Unlock()
			enc.Encode(r)
		}
		prog := &progressLines{send: send}
		outs, err := s.h.Snapshot(req.Volume, agent.Request{Name: req.Name, Tags: req.Tags, Note: req.Note, Force: req.Force, Progress: prog.add, AddTotal: prog.addTotal},
			func(note string) { send(Response{Note: note}) })
		if err != nil {
			resp.Error = err.Error()
		} else {
			for _, o := range outs {
				resp.Group = append(resp.Group, agent.Report(o))
			}
			resp.Snapshot = resp.Group[0]
			if len(outs) == 1 {
				resp.Group = nil
			}
		}
	case "prune":
		d, err := s.h.Prune(req.Volume, req.DryRun)
		resp.Decisions = d
		if err != nil {
			resp.Error = err.Error()
		}
	case "list":
		snaps, err := s.h.List()
		resp.Snapshots = snaps
		if err != nil {
			resp.Error = err.Error()
		}
	default:
		resp.Error = fmt.Sprintf("unknown operation %q", req.Op)
	}
	enc.Encode(resp)
}

// ErrNoAgent means nothing answers on the control socket: the CLI then works directly.
var ErrNoAgent = errors.New("no agent is running")

// Running reports whether an agent answers on the control socket at path.
func Running(path string) bool {
	_, err := Call(path, Request{Op: "status"}, nil)
	return !errors.Is(err, ErrNoAgent)
}

// Call sends a request to a running agent; notes go to note as they arrive.
func Call(path string, req Request, note func(string)) (*Response, error) {
	return CallWithProgress(path, req, note, nil)
}

// CallWithProgress is Call, with a snapshot's progress going to progress as it arrives.
func CallWithProgress(path string, req Request, note func(string), progress func(done, total int64)) (*Response, error) {
	conn, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return nil, fmt.Errorf("%w (%v)", ErrNoAgent, err)
	}
	defer conn.Close()
	if err := json.NewEncoder(conn).Encode(req); err != nil {
		return nil, err
	}
	dec := json.NewDecoder(conn)
	for {
		var resp Response
		if err := dec.Decode(&resp); err != nil {
			return nil, fmt.Errorf("agent closed the connection: %w", err)
		}
		if !resp.Final {
			switch {
			case resp.Progress != nil:
				if progress != nil {
					progress(resp.Progress.Done, resp.Progress.Total)
				}
			case note != nil:
				note(resp.Note)
			}
			continue
		}
		if resp.Error != "" {
			return &resp, errors.New(resp.Error)
		}
		return &resp, nil
	}
}

// peerUID returns the uid of the process at the other end of a unix socket.
func peerUID(conn net.Conn) (uint32, bool) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return 0, false
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, false
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil || cerr != nil {
		return 0, false
	}
	return cred.Uid, true
}

package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"time"

	"github.com/stasis-project/stasis/chain"
)

// The control socket speaks JSON lines: the client sends one Request; the agent answers
// with zero or more {"note": ...} lines (for example "waiting for the running snapshot")
// and one final Response line.

// ControlRequest asks the agent to do something.
type ControlRequest struct {
	Op     string `json:"op"` // status | snapshot | prune | list
	Volume string `json:"volume,omitempty"`
	Name   string `json:"name,omitempty"`
	DryRun bool   `json:"dry_run,omitempty"`
}

// ControlResponse is the final answer.
type ControlResponse struct {
	Note      string            `json:"note,omitempty"`
	Error     string            `json:"error,omitempty"`
	Status    []VolumeStatus    `json:"status,omitempty"`
	Snapshot  *SnapshotReport   `json:"snapshot,omitempty"`
	Group     []*SnapshotReport `json:"group,omitempty"` // every member, for a group snapshot
	Decisions []PruneDecision   `json:"decisions,omitempty"`
	Snapshots []*chain.Snapshot `json:"snapshots,omitempty"`
	Final     bool              `json:"final"`
}

// SnapshotReport is a snapshot's outcome as the socket carries it.
type SnapshotReport struct {
	Snapshot *chain.Snapshot `json:"snapshot"`
	ID       string          `json:"id"`
	Figures
}

// Figures say how a snapshot was captured, as `snapshot --json` prints them.
type Figures struct {
	Tracking      string   `json:"tracking"`
	Rounds        int      `json:"rounds"`
	FreezeMS      float64  `json:"freeze_ms"`
	BytesRead     int64    `json:"bytes_read"`
	BytesStored   int64    `json:"bytes_stored"`
	MetadataBytes int64    `json:"metadata_bytes"`
	ChunksStored  int64    `json:"chunks_stored"`
	FinalChunks   int      `json:"final_chunks"`
	DurationMS    int64    `json:"duration_ms"`
	Warnings      []string `json:"warnings,omitempty"`
}

// Report summarises an Outcome.
func Report(o *Outcome) *SnapshotReport {
	return &SnapshotReport{Snapshot: o.Snapshot, ID: o.Snapshot.ID, Figures: Figures{Tracking: o.Capture.Tracking,
		Rounds: o.Capture.Rounds, FreezeMS: Millis(o.Capture.Freeze), BytesRead: o.Capture.BytesRead,
		BytesStored: o.Write.DataBytes + o.Write.TreeBytes, MetadataBytes: o.Write.MetadataBytes,
		ChunksStored: o.Write.ChunksStored, FinalChunks: o.Capture.FinalChunks,
		DurationMS: o.Duration.Milliseconds(), Warnings: o.Warnings}}
}

// ServeControl listens on path (root only, or group-readable for group) until ctx ends.
func (s *Service) ServeControl(ctx context.Context, path, group string) error {
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
		g, err := user.LookupGroup(group)
		if err != nil {
			l.Close()
			return fmt.Errorf("socket_group %q: %w", group, err)
		}
		gid, _ := strconv.Atoi(g.Gid)
		os.Chown(path, 0, gid)
		mode = 0o660
	}
	os.Chmod(path, mode)
	go func() {
		<-ctx.Done()
		l.Close()
		os.Remove(path)
	}()
	for {
		conn, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		go s.handle(conn)
	}
}

func (s *Service) handle(conn net.Conn) {
	defer conn.Close()
	enc := json.NewEncoder(conn)
	var req ControlRequest
	if err := json.NewDecoder(bufio.NewReader(conn)).Decode(&req); err != nil {
		enc.Encode(ControlResponse{Error: "bad request: " + err.Error(), Final: true})
		return
	}
	resp := ControlResponse{Final: true}
	switch req.Op {
	case "status":
		resp.Status = s.Status()
	case "snapshot":
		outs, err := s.Snapshot(req.Volume, req.Name, func(note string) { enc.Encode(ControlResponse{Note: note}) })
		if err != nil {
			resp.Error = err.Error()
		} else {
			for _, o := range outs {
				resp.Group = append(resp.Group, Report(o))
			}
			resp.Snapshot = resp.Group[0]
			if len(outs) == 1 {
				resp.Group = nil
			}
		}
	case "prune":
		d, err := s.Prune(req.Volume, req.DryRun)
		resp.Decisions = d
		if err != nil {
			resp.Error = err.Error()
		}
	case "list":
		snaps, _, err := s.repo.Snapshots(s.ctx)
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

// Call sends a request to a running agent; notes go to note as they arrive.
func Call(path string, req ControlRequest, note func(string)) (*ControlResponse, error) {
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
		var resp ControlResponse
		if err := dec.Decode(&resp); err != nil {
			return nil, fmt.Errorf("agent closed the connection: %w", err)
		}
		if !resp.Final {
			if note != nil {
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

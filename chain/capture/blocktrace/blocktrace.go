// Package blocktrace tracks which chunks of a block device are written, from userspace,
// with a tracefs instance recording block_rq_complete events filtered to the device. A chunk
// is dirty once a write to it has completed. Any sign that events may have been lost
// (ring-buffer overruns or drops, a reader error, a restart) makes the tracker report a gap,
// and the caller must then treat every chunk as dirty: tracking fails closed.
package blocktrace

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bits-and-blooms/bitset"
	"golang.org/x/sys/unix"
)

// TracefsDir is where tracefs is (or gets) mounted.
const TracefsDir = "/sys/kernel/tracing"

// ErrUnavailable is wrapped when tracking cannot run here (no tracefs, no block events, a
// device that is not request-based such as device-mapper or md).
var ErrUnavailable = errors.New("changed-block tracking unavailable")

// Config says what to track.
type Config struct {
	Disk      uint64 // device number events are reported on (the whole disk)
	Start     int64  // first sector of the volume on Disk (partitions)
	Sectors   int64  // volume length in 512-byte sectors
	ChunkSize int    // bytes per chunk
	// BufferKiB is the per-CPU ring buffer size; larger survives longer bursts.
	BufferKiB int
}

// Tracker records dirty chunks until Close. Safe for concurrent use.
type Tracker struct {
	cfg      Config
	dir      string
	pipe     *os.File
	chunks   int64
	sectorsP int64 // sectors per chunk

	mu      sync.Mutex
	dirty   *bitset.BitSet
	gap     string // why tracking may have missed writes since the last Take
	markers map[string]chan struct{}
	closed  bool

	baseLost  int64 // overrun + dropped counters when the last Take checked
	readerErr atomic.Value
	done      chan struct{}
}

var instanceSeq atomic.Int64

// Start creates a tracefs instance for the device and starts reading its events.
func Start(cfg Config) (*Tracker, error) {
	if cfg.ChunkSize <= 0 || cfg.ChunkSize%512 != 0 || cfg.Sectors <= 0 {
		return nil, fmt.Errorf("blocktrace: bad config %+v", cfg)
	}
	if cfg.BufferKiB == 0 {
		cfg.BufferKiB = 8192
	}
	if err := ensureTracefs(); err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(TracefsDir, "events/block/block_rq_complete")); err != nil {
		return nil, fmt.Errorf("%w: the kernel has no block_rq_complete trace event", ErrUnavailable)
	}
	name := fmt.Sprintf("stasis-%d-%d-%d-%d", unix.Major(cfg.Disk), unix.Minor(cfg.Disk), os.Getpid(), instanceSeq.Add(1))
	dir := filepath.Join(TracefsDir, "instances", name)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, fmt.Errorf("%w: create tracefs instance: %v", ErrUnavailable, err)
	}
	t := &Tracker{cfg: cfg, dir: dir, sectorsP: int64(cfg.ChunkSize / 512), markers: map[string]chan struct{}{}, done: make(chan struct{})}
	t.chunks = (cfg.Sectors + t.sectorsP - 1) / t.sectorsP
	t.dirty = bitset.New(uint(t.chunks))
	fail := func(err error) (*Tracker, error) {
		t.removeInstance()
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	filter := fmt.Sprintf("dev == %d", uint64(unix.Major(cfg.Disk))<<20|uint64(unix.Minor(cfg.Disk)))
	for _, w := range []struct{ file, value string }{
		{"buffer_size_kb", strconv.Itoa(cfg.BufferKiB)},
		{"events/block/block_rq_complete/filter", filter},
		{"events/block/block_rq_complete/enable", "1"},
		{"tracing_on", "1"},
	} {
		if err := os.WriteFile(filepath.Join(dir, w.file), []byte(w.value), 0); err != nil {
			return fail(fmt.Errorf("write %s: %v", w.file, err))
		}
	}
	pipe, err := os.Open(filepath.Join(dir, "trace_pipe"))
	if err != nil {
		return fail(err)
	}
	t.pipe = pipe
	lost, err := t.lostEvents()
	if err != nil {
		pipe.Close()
		return fail(err)
	}
	t.baseLost = lost
	go t.read()
	return t, nil
}

func ensureTracefs() error {
	if _, err := os.Stat(filepath.Join(TracefsDir, "instances")); err == nil {
		return nil
	}
	if err := unix.Mount("tracefs", TracefsDir, "tracefs", 0, ""); err != nil {
		return fmt.Errorf("%w: tracefs is not mounted at %s and mounting it failed: %v", ErrUnavailable, TracefsDir, err)
	}
	return nil
}

// Chunks is the number of chunks tracked.
func (t *Tracker) Chunks() int64 { return t.chunks }

// read parses trace_pipe lines until the instance is closed.
func (t *Tracker) read() {
	defer close(t.done)
	sc := bufio.NewScanner(t.pipe)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if i := strings.Index(line, "block_rq_complete: "); i >= 0 {
			t.event(line[i+len("block_rq_complete: "):])
			continue
		}
		if i := strings.Index(line, "stasis-marker-"); i >= 0 {
			m := strings.TrimSpace(line[i:])
			t.mu.Lock()
			if ch, ok := t.markers[m]; ok {
				close(ch)
				delete(t.markers, m)
			}
			closed := t.closed && m == "stasis-marker-close"
			t.mu.Unlock()
			if closed {
				return
			}
		}
	}
	err := sc.Err()
	if err == nil {
		err = errors.New("trace pipe closed")
	}
	t.readerErr.Store(err)
	t.mu.Lock()
	if t.gap == "" && !t.closed {
		t.gap = "trace reader stopped: " + err.Error()
	}
	t.mu.Unlock()
}

// event handles "MAJ,MIN RWBS (CMD) SECTOR + NR ...".
func (t *Tracker) event(s string) {
	f := strings.Fields(s)
	if len(f) < 2 {
		return
	}
	rwbs := f[1]
	if !strings.ContainsAny(rwbs, "WDZE") { // writes, discards, write-zeroes, secure erase
		return
	}
	plus := -1
	for i := 2; i < len(f); i++ {
		if f[i] == "+" {
			plus = i
			break
		}
	}
	if plus < 3 || plus+1 >= len(f) {
		return
	}
	sector, err1 := strconv.ParseInt(f[plus-1], 10, 64)
	nr, err2 := strconv.ParseInt(f[plus+1], 10, 64)
	if err1 != nil || err2 != nil {
		t.setGap("unparsable trace event: " + s)
		return
	}
	// Map from the disk to the volume, keeping only the volume's range.
	start, end := sector-t.cfg.Start, sector-t.cfg.Start+nr
	if end <= 0 || start >= t.cfg.Sectors {
		return
	}
	if nr == 0 { // a flush carries no data
		return
	}
	start = max(start, 0)
	end = min(end, t.cfg.Sectors)
	t.mu.Lock()
	for c := start / t.sectorsP; c <= (end-1)/t.sectorsP; c++ {
		t.dirty.Set(uint(c))
	}
	t.mu.Unlock()
}

func (t *Tracker) setGap(why string) {
	t.mu.Lock()
	if t.gap == "" {
		t.gap = why
	}
	t.mu.Unlock()
}

// lostEvents sums the overrun and dropped-event counters of every CPU's buffer.
func (t *Tracker) lostEvents() (int64, error) {
	stats, err := filepath.Glob(filepath.Join(t.dir, "per_cpu", "cpu*", "stats"))
	if err != nil || len(stats) == 0 {
		return 0, fmt.Errorf("no per-CPU trace statistics: %v", err)
	}
	var total int64
	for _, p := range stats {
		b, err := os.ReadFile(p)
		if err != nil {
			return 0, err
		}
		for _, line := range strings.Split(string(b), "\n") {
			k, v, ok := strings.Cut(line, ":")
			if !ok || (k != "overrun" && k != "dropped events") {
				continue
			}
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("%s: %q", p, line)
			}
			total += n
		}
	}
	return total, nil
}

// Take returns the chunks written since the previous Take (or Start) and clears them. gap
// is non-empty if writes may have been missed in that interval: the caller must then treat
// every chunk as dirty. Events already completed but not yet read may arrive after Take;
// call Drain first when that matters.
func (t *Tracker) Take() (dirty *bitset.BitSet, gap string) {
	lost, err := t.lostEvents()
	t.mu.Lock()
	defer t.mu.Unlock()
	dirty, t.dirty = t.dirty, bitset.New(uint(t.chunks))
	gap, t.gap = t.gap, ""
	switch {
	case err != nil && gap == "":
		gap = "cannot read trace statistics: " + err.Error()
	case lost != t.baseLost && gap == "":
		gap = fmt.Sprintf("%d trace events were lost (ring buffer overrun)", lost-t.baseLost)
	}
	t.baseLost = lost
	if t.closed && gap == "" {
		gap = "tracker closed"
	}
	return dirty, gap
}

// Drain waits until every event recorded before the call has been read: it writes a marker
// into the instance's buffer and waits for the reader to reach it. Per-CPU buffers are read
// merged in timestamp order, so the marker comes after every earlier completion.
func (t *Tracker) Drain(ctx context.Context) error {
	m := fmt.Sprintf("stasis-marker-%d", time.Now().UnixNano())
	ch := make(chan struct{})
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return errors.New("tracker closed")
	}
	t.markers[m] = ch
	t.mu.Unlock()
	if err := os.WriteFile(filepath.Join(t.dir, "trace_marker"), []byte(m), 0); err != nil {
		return fmt.Errorf("write trace marker: %w", err)
	}
	select {
	case <-ch:
		return nil
	case <-t.done:
		return errors.New("trace reader stopped")
	case <-ctx.Done():
		return fmt.Errorf("waiting for trace events: %w", ctx.Err())
	}
}

// Close stops tracking and removes the tracefs instance.
func (t *Tracker) Close() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.closed = true
	t.mu.Unlock()
	os.WriteFile(filepath.Join(t.dir, "events/block/block_rq_complete/enable"), []byte("0"), 0)
	// The reader stops at this marker; then the pipe can be closed and the instance removed.
	os.WriteFile(filepath.Join(t.dir, "trace_marker"), []byte("stasis-marker-close"), 0)
	select {
	case <-t.done:
	case <-time.After(2 * time.Second):
	}
	t.pipe.Close()
	return t.removeInstance()
}

func (t *Tracker) removeInstance() error {
	var err error
	for i := 0; i < 20; i++ {
		if err = unix.Rmdir(t.dir); err == nil || errors.Is(err, unix.ENOENT) {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("remove tracefs instance %s: %w", t.dir, err)
}

// RemoveStale removes tracefs instances left by stasis processes that no longer run.
func RemoveStale() {
	dirs, _ := filepath.Glob(filepath.Join(TracefsDir, "instances", "stasis-*"))
	for _, d := range dirs {
		parts := strings.Split(filepath.Base(d), "-")
		if len(parts) != 5 {
			continue
		}
		pid, err := strconv.Atoi(parts[3])
		if err != nil || unix.Kill(pid, 0) == nil {
			continue
		}
		unix.Rmdir(d)
	}
}

// Available says whether tracking can run here: tracefs mounted (or mountable) with the
// block_rq_complete event. The reason comes back as an ErrUnavailable error.
func Available() error {
	if err := ensureTracefs(); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(TracefsDir, "events/block/block_rq_complete")); err != nil {
		return fmt.Errorf("%w: the kernel has no block_rq_complete trace event", ErrUnavailable)
	}
	return nil
}

// ForeignInstances lists tracefs instances of other programs that record block events, which
// compete for the same events and buffers.
func ForeignInstances() []string {
	var out []string
	dirs, _ := filepath.Glob(filepath.Join(TracefsDir, "instances", "*"))
	for _, d := range dirs {
		if strings.HasPrefix(filepath.Base(d), "stasis-") {
			continue
		}
		if b, err := os.ReadFile(filepath.Join(d, "events/block/enable")); err == nil && strings.TrimSpace(string(b)) != "0" {
			out = append(out, filepath.Base(d))
		}
	}
	return out
}

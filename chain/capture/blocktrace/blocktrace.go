// Package blocktrace tracks which chunks of a block device are written, from userspace,
// with a tracefs instance recording the block layer's completion events filtered to the
// device: block_rq_complete for request-based devices (virtio, nvme, scsi, loop) and
// block_bio_complete for bio-based ones (device-mapper: LVM, dm-crypt; md; zram). A chunk
// is dirty once a write to it has completed.
//
// Tracking is never trusted on faith. Any sign that events may have been lost (ring-buffer
// overruns or drops, a reader error, a restart) is a gap, after which the caller must treat
// every chunk as dirty. And before a tracked result is used, the tracker must prove it sees
// the device: reads the caller makes (ExpectReads, CheckReads) must come back as completion
// events covering every sector read, and the kernel's own count of sectors written to the
// device must not exceed what the tracker saw (CheckWrites).
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

// ErrUnavailable is wrapped when tracking cannot run here (no tracefs, no block events).
var ErrUnavailable = errors.New("changed-block tracking unavailable")

// ErrUnproven is wrapped when the tracker did not see I/O it must have seen: the device's
// completions are not (all) reported, and its dirty sets cannot be trusted.
var ErrUnproven = errors.New("changed-block tracking cannot see this device")

// completionEvents are the events that report finished I/O. A device emits one or the
// other (a request's completion is traced once, and its bios are then not traced again),
// so both are enabled and each counts.
var completionEvents = []string{"block_rq_complete", "block_bio_complete"}

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

	events   []string // completion events enabled
	statPath string   // the disk's I/O statistics, for CheckWrites

	mu      sync.Mutex
	dirty   *bitset.BitSet
	gap     string // why tracking may have missed writes since the last Take
	markers map[string]chan struct{}
	closed  bool
	// written counts sectors of completed writes (anything but reads and discards) on the
	// whole disk since Start; baseStat is the kernel's written-sector count at Start.
	written  int64
	baseStat int64
	proof    *readProof

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
	var events []string
	for _, e := range completionEvents {
		if _, err := os.Stat(filepath.Join(TracefsDir, "events/block", e)); err == nil {
			events = append(events, e)
		}
	}
	if len(events) == 0 {
		return nil, fmt.Errorf("%w: the kernel has no block completion trace events", ErrUnavailable)
	}
	name := fmt.Sprintf("stasis-%d-%d-%d-%d", unix.Major(cfg.Disk), unix.Minor(cfg.Disk), os.Getpid(), instanceSeq.Add(1))
	dir := filepath.Join(TracefsDir, "instances", name)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, fmt.Errorf("%w: create tracefs instance: %v", ErrUnavailable, err)
	}
	t := &Tracker{cfg: cfg, dir: dir, sectorsP: int64(cfg.ChunkSize / 512), markers: map[string]chan struct{}{},
		done: make(chan struct{}), events: events,
		statPath: fmt.Sprintf("/sys/dev/block/%d:%d/stat", unix.Major(cfg.Disk), unix.Minor(cfg.Disk))}
	t.chunks = (cfg.Sectors + t.sectorsP - 1) / t.sectorsP
	t.dirty = bitset.New(uint(t.chunks))
	fail := func(err error) (*Tracker, error) {
		t.removeInstance()
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	filter := fmt.Sprintf("dev == %d", uint64(unix.Major(cfg.Disk))<<20|uint64(unix.Minor(cfg.Disk)))
	writes := []struct{ file, value string }{{"buffer_size_kb", strconv.Itoa(cfg.BufferKiB)}}
	for _, e := range events {
		writes = append(writes, struct{ file, value string }{"events/block/" + e + "/filter", filter},
			struct{ file, value string }{"events/block/" + e + "/enable", "1"})
	}
	writes = append(writes, struct{ file, value string }{"tracing_on", "1"})
	for _, w := range writes {
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
	// Read after the events are enabled: a write the kernel counts from here on completed
	// after the events were on, so the tracker sees it too.
	if t.baseStat, err = t.kernelWritten(); err != nil {
		pipe.Close()
		return fail(err)
	}
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
		if ev, ok := completion(line); ok {
			t.event(ev)
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

// completion returns the part of a trace line after "block_rq_complete: " or
// "block_bio_complete: ".
func completion(line string) (string, bool) {
	for _, e := range completionEvents {
		if i := strings.Index(line, e+": "); i >= 0 {
			return line[i+len(e)+2:], true
		}
	}
	return "", false
}

// Op classes of a completion, from its rwbs field.
const (
	opRead    = iota
	opDiscard // discard, secure erase: the data changed, but the kernel counts it apart
	opWrite   // writes, write-zeroes, zone appends, anything not known to leave data as it was
)

// classify reads an rwbs field: an optional preflush 'F', then the operation ('R' read,
// 'W' write, 'D' discard, 'N' other, 'Z' zone operations, 'F' a data-less flush). Only a
// read is known not to change data: every other operation counts as a write, so an
// operation this code has never seen (write-zeroes is 'N' on older kernels, 'WZ' on newer
// ones) dirties its range instead of being ignored.
func classify(rwbs string) int {
	op := strings.TrimPrefix(rwbs, "F")
	switch {
	case strings.HasPrefix(op, "R"):
		return opRead
	case strings.HasPrefix(op, "D"):
		return opDiscard
	}
	return opWrite
}

// event handles "MAJ,MIN RWBS [(CMD)] SECTOR + NR ...".
func (t *Tracker) event(s string) {
	f := strings.Fields(s)
	if len(f) < 2 {
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
		t.setGap("unparsable trace event: " + s)
		return
	}
	nr, err := strconv.ParseInt(f[plus+1], 10, 64)
	if err != nil || nr < 0 {
		t.setGap("unparsable trace event: " + s)
		return
	}
	if nr == 0 { // a flush carries no data (and its sector is -1)
		return
	}
	sector, err := strconv.ParseInt(f[plus-1], 10, 64)
	if err != nil || sector < 0 {
		t.setGap("unparsable trace event: " + s)
		return
	}
	class := classify(f[1])
	t.mu.Lock()
	defer t.mu.Unlock()
	if class == opWrite {
		t.written += nr
	}
	// Map from the disk to the volume, keeping only the volume's range.
	start, end := sector-t.cfg.Start, sector-t.cfg.Start+nr
	if end <= 0 || start >= t.cfg.Sectors {
		return
	}
	start = max(start, 0)
	end = min(end, t.cfg.Sectors)
	if class == opRead {
		if t.proof != nil {
			t.proof.saw(start, end)
		}
		return
	}
	for c := start / t.sectorsP; c <= (end-1)/t.sectorsP; c++ {
		t.dirty.Set(uint(c))
	}
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
	for _, e := range t.events {
		os.WriteFile(filepath.Join(t.dir, "events/block", e, "enable"), []byte("0"), 0)
	}
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
// block completion events. The reason comes back as an ErrUnavailable error. Whether a
// given device's completions are seen is proven per snapshot (ExpectReads, CheckWrites).
func Available() error {
	if err := ensureTracefs(); err != nil {
		return err
	}
	for _, e := range completionEvents {
		if _, err := os.Stat(filepath.Join(TracefsDir, "events/block", e)); err == nil {
			return nil
		}
	}
	return fmt.Errorf("%w: the kernel has no block completion trace events", ErrUnavailable)
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

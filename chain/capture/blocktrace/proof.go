package blocktrace

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stasis-project/stasis/chain/capture"
)

// sectorRange is [start, end) in the volume's 512-byte sectors.
type sectorRange struct{ start, end int64 }

// readProof collects read completions inside the ranges a caller is about to read.
type readProof struct {
	want []sectorRange // sorted, disjoint
	got  []sectorRange // covered parts of want, sorted, disjoint, merged
}

// saw records a completed read of [start, end); t.mu held.
func (p *readProof) saw(start, end int64) {
	i := sort.Search(len(p.want), func(i int) bool { return p.want[i].end > start })
	for ; i < len(p.want) && p.want[i].start < end; i++ {
		p.add(max(start, p.want[i].start), min(end, p.want[i].end))
	}
}

// add inserts [s, e) into got, merging neighbours. Reads usually arrive in order, so the
// common case appends or extends the last range.
func (p *readProof) add(s, e int64) {
	j := sort.Search(len(p.got), func(j int) bool { return p.got[j].end >= s })
	k := j
	for k < len(p.got) && p.got[k].start <= e {
		s, e = min(s, p.got[k].start), max(e, p.got[k].end)
		k++
	}
	if j == k {
		p.got = append(p.got, sectorRange{})
		copy(p.got[j+1:], p.got[j:])
		p.got[j] = sectorRange{s, e}
		return
	}
	p.got[j] = sectorRange{s, e}
	p.got = append(p.got[:j+1], p.got[k:]...)
}

// ExpectReads starts a proof: ranges (byte ranges of the volume, sorted) are about to be
// read by the caller, with reads that reach the device (O_DIRECT). After reading them and
// calling Drain, CheckReads says whether completion events covered every sector. A new
// call replaces the previous proof.
func (t *Tracker) ExpectReads(ranges []capture.Range) {
	p := &readProof{}
	for _, r := range ranges {
		s, e := r.Start/512, (r.End+511)/512
		if e <= s {
			continue
		}
		if n := len(p.want); n > 0 && s <= p.want[n-1].end {
			p.want[n-1].end = max(p.want[n-1].end, e)
			continue
		}
		p.want = append(p.want, sectorRange{s, e})
	}
	t.mu.Lock()
	t.proof = p
	t.mu.Unlock()
}

// CheckReads ends the proof started by ExpectReads: it returns an ErrUnproven error unless
// read completions covered every expected sector. Call Drain first.
func (t *Tracker) CheckReads() error {
	t.mu.Lock()
	p := t.proof
	t.proof = nil
	t.mu.Unlock()
	if p == nil {
		return fmt.Errorf("%w: no reads were expected", ErrUnproven)
	}
	var want, got int64
	for _, r := range p.want {
		want += r.end - r.start
	}
	for _, r := range p.got {
		got += r.end - r.start
	}
	if got < want {
		first := "none"
		if len(p.got) > 0 {
			first = fmt.Sprintf("%d events' worth starting at sector %d", len(p.got), p.got[0].start)
		}
		return fmt.Errorf("%w: %d of %d sectors read were reported as completed (%s): the device's completions are not (all) traced", ErrUnproven, got, want, first)
	}
	return nil
}

// CheckWrites compares the kernel's count of sectors written to the disk since Start with
// the sectors of the write completions the tracker saw; fewer seen than counted is an
// ErrUnproven error: writes happened that the tracker did not see (or saw with the wrong
// length). Call it after Drain while nothing writes to the device (under the freeze), or
// a write between the count and the drain may be reported as missing.
func (t *Tracker) CheckWrites() error {
	now, err := t.kernelWritten()
	if err != nil {
		return fmt.Errorf("%w: %v", ErrUnproven, err)
	}
	t.mu.Lock()
	seen, base := t.written, t.baseStat
	t.mu.Unlock()
	if counted := now - base; counted > seen {
		return fmt.Errorf("%w: the kernel counted %d sectors written to the device since tracking started, the tracker saw %d", ErrUnproven, counted, seen)
	}
	return nil
}

// kernelWritten reads the disk's written-sector count from its I/O statistics.
func (t *Tracker) kernelWritten() (int64, error) {
	b, err := os.ReadFile(t.statPath)
	if err != nil {
		return 0, fmt.Errorf("read %s: %v", t.statPath, err)
	}
	f := strings.Fields(string(b))
	if len(f) < 7 {
		return 0, fmt.Errorf("%s: %q has no write-sector field", t.statPath, b)
	}
	n, err := strconv.ParseInt(f[6], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: %v", t.statPath, err)
	}
	return n, nil
}

// Probe checks that a tracker sees the device: it starts one on disk (the volume starting
// at sector start, of size bytes, opened at path), reads 64 KiB of the volume with
// O_DIRECT, and checks the read came back as completion events. For `stasis doctor`: a
// snapshot makes the same proof for itself every time.
func Probe(path string, disk uint64, start, size int64) error {
	const n = 64 << 10
	if size < n {
		return fmt.Errorf("%s is smaller than a proof read", path)
	}
	t, err := Start(Config{Disk: disk, Start: start, Sectors: size / 512, ChunkSize: n, BufferKiB: 1024})
	if err != nil {
		return err
	}
	defer t.Close()
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	buf, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return err
	}
	defer unix.Munmap(buf)
	off := (size / 2) &^ (n - 1)
	t.ExpectReads([]capture.Range{{Start: off, End: off + n}})
	if _, err := f.ReadAt(buf, off); err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := t.Drain(ctx); err != nil {
		return err
	}
	return t.CheckReads()
}

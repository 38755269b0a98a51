package capture

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/bits-and-blooms/bitset"
	"github.com/cespare/xxhash/v2"
	"github.com/stasis-project/stasis/chain/hugemem"
)

type heldChunk struct {
	m     *member
	index int64
	data  []byte
}

// heldChunks is what the final round read while frozen, in memory mapped before the freeze,
// to be written after the thaw.
type heldChunks struct {
	mem    []byte
	used   int64
	chunks []heldChunk
}

func (h *heldChunks) free() {
	if h.mem != nil {
		hugemem.Unmap(h.mem)
		h.mem = nil
	}
}

// Bounds of how much of the held memory is touched before the freeze. The final rounds of
// tracked snapshots under steady writers hold a few dozen 64 KiB chunks.
const (
	minPrefault = 4 << 20
	maxPrefault = 64 << 20
)

// hold reserves room for n bytes, or returns nil when the memory is used up.
func (h *heldChunks) hold(m *member, index int64, n int64) []byte {
	size := alignUp(n, 4096)
	if h.used+size > int64(len(h.mem)) {
		return nil
	}
	b := h.mem[h.used : h.used+size]
	h.used += size
	h.chunks = append(h.chunks, heldChunk{m: m, index: index, data: b[:n]})
	return b
}

// ErrWindowBroken is wrapped by a Freezer's thaw error when the filesystems did not stay
// frozen for the whole window (someone else thawed one): the attempt is retried.
var ErrWindowBroken = errors.New("the freeze window was broken")

// errTooMany is returned (wrapped in errRetry) when the frozen read would need more memory
// than MaxHeld chunks.
var errTooMany = errors.New("too many chunks to read while frozen")

// finalRound quiesces, freezes every member's filesystems, reads the last dirty chunks (and,
// for untracked members that fit, every allocated chunk, keeping those that changed) into
// memory, and thaws. Between freeze and thaw it does no I/O but reading the sources and the
// trackers, and allocates nothing large.
func finalRound(ctx context.Context, o Options, ms []*member) (*heldChunks, error) {
	// Which untracked members can be read whole within the freeze: the estimate uses each
	// one's measured full-read rate, and leaves a fifth of the window for everything else.
	budget := o.MaxFreeze.Seconds() * 0.8
	var compare []*member
	for _, m := range ms {
		if m.tracked {
			continue
		}
		m.res.Frozen = false
		switch est := m.estimate(); {
		case m.fp == nil || !m.fpFull:
			m.res.NotFrozen = fmt.Sprintf("the device's writes cannot be tracked (%s) and its %s of data cannot be re-read within max-freeze %s", m.res.Untracked, bytesString(m.fullBytes()), o.MaxFreeze)
		case est > budget:
			m.res.NotFrozen = fmt.Sprintf("the device's writes cannot be tracked (%s) and re-reading its %s of data while frozen would take about %.1f s, more than max-freeze %s allows", m.res.Untracked, bytesString(m.fullBytes()), est, o.MaxFreeze)
		default:
			budget -= est
			compare = append(compare, m)
		}
	}
	anyTracked := false
	for _, m := range ms {
		anyTracked = anyTracked || m.tracked
	}
	if !anyTracked && len(compare) == 0 {
		return &heldChunks{}, nil // nothing can be made point-in-time: no freeze, no lock
	}
	// Memory for the held chunks and the frozen full reads is mapped before the lock and
	// the freeze, and its first part touched: page faults (slow on some virtual machines)
	// stay out of the window.
	maxCS := int64(0)
	for _, m := range ms {
		maxCS = max(maxCS, int64(m.Writer.ChunkSize()))
	}
	room := alignUp(maxCS, 4096) // what hold takes for one chunk
	mem, err := hugemem.Map(int(int64(o.MaxHeld) * room))
	if err != nil {
		return nil, fmt.Errorf("allocate final-round memory: %w", err)
	}
	// Touched ahead: room for twice what the rounds before held, at least 4 MiB, at most
	// 64 MiB (a fault inside the window may have to compact memory for a huge page).
	expect := int64(0)
	for _, m := range ms {
		expect += 2 * m.lastDirty * room
	}
	hugemem.Prefault(mem, int(min(max(expect, minPrefault), maxPrefault)))
	held := &heldChunks{mem: mem}
	var scratch []byte
	if len(compare) > 0 {
		if scratch, err = hugemem.Map(readSize); err != nil {
			held.free()
			return nil, err
		}
		hugemem.Prefault(scratch, readSize)
		defer hugemem.Unmap(scratch)
	}
	if o.Boost != nil {
		// From before the applications' lock to after their release: a lowered service
		// would otherwise hold a database lock and a freeze at the back of the run queue.
		defer o.Boost()()
	}
	var release func()
	if o.Quiesce != nil {
		if release, err = o.Quiesce(ctx); err != nil {
			held.free()
			return nil, err
		}
	}
	thaw, err := o.Freeze()
	if err != nil {
		held.free()
		if release != nil {
			release()
		}
		return nil, err
	}
	frozenAt := time.Now()
	compared := map[*member]bool{}
	readErr := func() error {
		if o.FinalReadHook != nil {
			o.FinalReadHook()
		}
		dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		sets := make([]*bitset.BitSet, len(ms))
		for i, m := range ms {
			if !m.tracked {
				continue
			}
			dirty, err := m.frozenDirty(dctx)
			if err != nil {
				return err
			}
			sets[i] = dirty
		}
		for i, m := range ms {
			if sets[i] == nil {
				continue
			}
			if err := m.readHeld(held, sets[i]); err != nil {
				return err
			}
		}
		deadline := frozenAt.Add(o.MaxFreeze * 9 / 10)
		for _, m := range compare {
			done, err := m.compareFrozen(held, scratch, deadline)
			if err != nil {
				return err
			}
			compared[m] = done
		}
		return nil
	}()
	frozenFor, thawErr := thaw()
	if release != nil {
		release()
	}
	for _, m := range ms {
		m.res.Freeze = frozenFor
		m.res.Rounds++
		m.res.FinalChunks = 0
	}
	for _, h := range held.chunks {
		h.m.res.FinalChunks++
	}
	if readErr == nil {
		readErr = thawErr
		if errors.Is(thawErr, ErrWindowBroken) {
			readErr = fmt.Errorf("%w: %w", errRetry, thawErr)
		}
	}
	if readErr != nil {
		held.free()
		return nil, readErr
	}
	for _, m := range ms {
		m.carry = nil // what was taken is held now, and stored after the thaw
		switch {
		case m.tracked:
			m.res.Frozen, m.res.NotFrozen = true, ""
		case compared[m]:
			m.res.Frozen, m.res.NotFrozen = true, ""
		case m.res.NotFrozen == "" && contains(compare, m):
			m.res.NotFrozen = fmt.Sprintf("the device's writes cannot be tracked (%s) and re-reading its data while frozen did not finish within max-freeze %s", m.res.Untracked, o.MaxFreeze)
		}
	}
	return held, nil
}

func contains(ms []*member, m *member) bool {
	for _, x := range ms {
		if x == m {
			return true
		}
	}
	return false
}

// frozenDirty drains a tracked member's tracker under the freeze and returns what to read.
func (m *member) frozenDirty(ctx context.Context) (*bitset.BitSet, error) {
	if err := m.Tracker.Drain(ctx); err != nil {
		return nil, err
	}
	if err := m.Tracker.CheckWrites(); err != nil {
		// The kernel counted writes the tracker did not see: its dirty sets cannot be
		// trusted. From now on the member is read whole and compared.
		m.demote(err.Error())
		return nil, fmt.Errorf("%w: %s: %v", errRetry, m.Name, err)
	}
	dirty, gap := m.Tracker.Take()
	if gap != "" {
		m.carryGap = gap
		return nil, fmt.Errorf("%w: %s: %s", errRetry, m.Name, gap)
	}
	if m.Allocated != nil && m.res.Tracking == FullScan {
		alloc, err := m.Allocated()
		if err != nil {
			return nil, fmt.Errorf("read allocation maps of %s while frozen: %w", m.Name, err)
		}
		for _, r := range alloc {
			for c := r.Start; c < r.End; c++ {
				if !m.everRead.Test(uint(c)) && !dirty.Test(uint(c)) {
					dirty.Set(uint(c))
					m.res.Unread++
				}
			}
		}
	}
	// Until the held chunks are stored, the set is this attempt's to keep: if the attempt
	// fails (too many chunks, a broken window), the next one reads it before freezing.
	m.carry = dirty.Clone()
	return dirty, nil
}

// readHeld reads the dirty chunks into held memory.
func (m *member) readHeld(held *heldChunks, dirty *bitset.BitSet) error {
	cs := int64(m.Writer.ChunkSize())
	for i, ok := dirty.NextSet(0); ok; i, ok = dirty.NextSet(i + 1) {
		idx := int64(i)
		n := min(cs, m.Source.Size-idx*cs)
		if n <= 0 {
			continue
		}
		buf := held.hold(m, idx, n)
		if buf == nil {
			return fmt.Errorf("%w: %w: more than %d chunks", errRetry, errTooMany, len(held.chunks))
		}
		got, err := m.Source.f.ReadAt(buf, idx*cs)
		if int64(got) < n {
			return fmt.Errorf("read %s at %d: %v", m.Source.Path, idx*cs, err)
		}
		m.res.BytesRead += n
		m.res.FinalRead += n
	}
	return nil
}

// compareFrozen reads every allocated chunk of an untracked member while frozen and holds
// those whose content differs from what the earlier rounds stored. It reports false if the
// deadline came first: the member is then not point-in-time, and what it holds is dropped.
func (m *member) compareFrozen(held *heldChunks, scratch []byte, deadline time.Time) (bool, error) {
	runs := m.Full
	if m.Allocated != nil {
		alloc, err := m.Allocated()
		if err != nil {
			return false, fmt.Errorf("read allocation maps of %s while frozen: %w", m.Name, err)
		}
		runs = alloc
	}
	cs := int64(m.Writer.ChunkSize())
	mark := len(held.chunks)
	used := held.used
	perRead := int64(len(scratch)) / cs
	for _, r := range runs {
		for first := r.Start; first < r.End; first += perRead {
			if time.Now().After(deadline) {
				held.chunks, held.used = held.chunks[:mark], used
				return false, nil
			}
			n := min(perRead, r.End-first)
			length := min(n*cs, m.Source.Size-first*cs)
			got, err := m.Source.f.ReadAt(scratch[:alignUp(length, 4096)], first*cs)
			if int64(got) < length {
				return false, fmt.Errorf("read %s at %d: %v", m.Source.Path, first*cs, err)
			}
			m.res.BytesRead += length
			m.res.FinalRead += length
			for c := int64(0); c < n; c++ {
				data := scratch[c*cs : min((c+1)*cs, length)]
				if sum, ok := m.fp.get(first + c); ok && sum == xxhash.Sum64(data) {
					continue
				}
				buf := held.hold(m, first+c, int64(len(data)))
				if buf == nil {
					return false, fmt.Errorf("%w: %w: %s changed in more than %d chunks during the copy", errRetry, errTooMany, m.Name, len(held.chunks))
				}
				copy(buf, data)
			}
		}
	}
	return true, nil
}

// estimate is how many seconds a frozen full read of the member would take.
func (m *member) estimate() float64 {
	if m.rate <= 0 {
		return 1e9
	}
	return float64(m.fullBytes()) / m.rate
}

func bytesString(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%d KiB", n>>10)
}

// fingerprints keeps a 64-bit hash of every chunk of a member's full read, indexed by the
// chunk's position in the runs: 8 bytes per allocated chunk. A chunk whose frozen content
// hashes the same is taken as unchanged; a change escapes only with probability 2^-64.
type fingerprints struct {
	runs  []ChunkRun
	first []int64 // position of each run's first chunk
	sums  []uint64
	have  []bool // written by concurrent Puts, each its own element
}

func newFingerprints(runs []ChunkRun) *fingerprints {
	f := &fingerprints{runs: runs}
	n := int64(0)
	for _, r := range runs {
		f.first = append(f.first, n)
		n += r.End - r.Start
	}
	f.sums = make([]uint64, n)
	f.have = make([]bool, n)
	return f
}

func (f *fingerprints) pos(chunk int64) (int64, bool) {
	i := sort.Search(len(f.runs), func(i int) bool { return f.runs[i].End > chunk })
	if i == len(f.runs) || chunk < f.runs[i].Start {
		return 0, false
	}
	return f.first[i] + chunk - f.runs[i].Start, true
}

func (f *fingerprints) get(chunk int64) (uint64, bool) {
	p, ok := f.pos(chunk)
	if !ok || !f.have[p] {
		return 0, false
	}
	return f.sums[p], true
}

// fingerprintingWriter records each chunk's fingerprint as it passes to the writer. Copy
// calls Put from several goroutines, for distinct chunks.
type fingerprintingWriter struct {
	ChunkWriter
	fp *fingerprints
}

func (w fingerprintingWriter) Put(ctx context.Context, i int64, data []byte) error {
	if p, ok := w.fp.pos(i); ok {
		w.fp.sums[p] = xxhash.Sum64(data)
		w.fp.have[p] = true
	}
	return w.ChunkWriter.Put(ctx, i, data)
}

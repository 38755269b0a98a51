// Package image writes a snapshot's volume out: export to a new sparse image file, or
// restore onto an existing device or file, writing only the chunks that differ.
package image

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"github.com/stasis-project/stasis/chain"
)

// Stats says what an export or restore did.
type Stats struct {
	Chunks        int64 // chunks in the volume
	ChunksWritten int64 // chunks written to the target
	BytesWritten  int64
	BytesRead     int64 // bytes of the target read to compare
}

// Progress, if not nil, is called with bytes of the volume handled so far. It may be
// called from several goroutines, never concurrently.
type Progress func(done int64)

// Export writes the snapshot to a new file at path as a sparse raw image: zero chunks are
// holes. The file appears only when complete and durable; on any error nothing is left.
func Export(ctx context.Context, sr *chain.SnapshotReader, path string, progress Progress) (Stats, error) {
	if _, err := os.Lstat(path); err == nil {
		return Stats{}, fmt.Errorf("%s already exists: choose a new file name, or use `stasis restore --to %s` to overwrite it", path, path)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".stasis-")
	if err != nil {
		return Stats{}, fmt.Errorf("export: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	snap := sr.Snapshot()
	if err := tmp.Truncate(snap.SizeBytes); err != nil {
		return Stats{}, fmt.Errorf("export: %w", err)
	}
	st, err := writeChunks(ctx, sr, tmp, progress)
	if err != nil {
		return st, err
	}
	if err := tmp.Sync(); err != nil {
		return st, fmt.Errorf("export: fsync: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return st, err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return st, fmt.Errorf("export: %w", err)
	}
	ok = true
	return st, syncDir(filepath.Dir(path))
}

// writeChunks writes every non-zero chunk into a file that reads as zeros elsewhere.
func writeChunks(ctx context.Context, sr *chain.SnapshotReader, f *os.File, progress Progress) (Stats, error) {
	snap := sr.Snapshot()
	st := Stats{Chunks: snap.Chunks()}
	type job struct {
		i  int64
		id chain.ID
	}
	g, ctx := errgroup.WithContext(ctx)
	jobs := make(chan job, 64)
	g.Go(func() error {
		defer close(jobs)
		return sr.Walk(ctx, func(i int64, id chain.ID) error {
			select {
			case jobs <- job{i, id}:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})
	})
	report := newReporter(progress)
	for k := 0; k < runtime.GOMAXPROCS(0)+1; k++ {
		g.Go(func() error {
			var buf []byte
			for j := range jobs {
				b, err := sr.LoadChunk(ctx, j.i, j.id, buf)
				if err != nil {
					return err
				}
				buf = b
				if _, err := f.WriteAt(b, j.i*int64(snap.ChunkSize)); err != nil {
					return fmt.Errorf("write %s: %w", f.Name(), err)
				}
				atomic.AddInt64(&st.ChunksWritten, 1)
				atomic.AddInt64(&st.BytesWritten, int64(len(b)))
				report(int64(len(b)))
			}
			return nil
		})
	}
	return st, g.Wait()
}

// newReporter serialises progress calls and turns increments into running totals.
func newReporter(progress Progress) func(n int64) {
	if progress == nil {
		return func(int64) {}
	}
	var mu sync.Mutex
	var done int64
	return func(n int64) {
		mu.Lock()
		defer mu.Unlock()
		done += n
		progress(done)
	}
}

// ErrTargetBusy is wrapped when a restore target device is mounted or held open.
var ErrTargetBusy = errors.New("target is in use")

// Restore makes target hold the snapshot's volume. A target that does not exist is created
// like Export does. An existing file or block device is compared chunk by chunk and only
// chunks that differ are written; a block device must not be mounted or open elsewhere
// (it is opened O_EXCL) and must be at least as large as the volume. Every chunk is checked
// against its hash before it is written, so a damaged repository fails the restore instead
// of writing wrong data; chunks written before the failure stay written.
func Restore(ctx context.Context, sr *chain.SnapshotReader, target string, progress Progress) (Stats, error) {
	st, err := os.Stat(target)
	if errors.Is(err, os.ErrNotExist) {
		return Export(ctx, sr, target, progress)
	}
	if err != nil {
		return Stats{}, fmt.Errorf("restore target: %w", err)
	}
	snap := sr.Snapshot()
	var f *os.File
	switch m := st.Mode(); {
	case m.IsRegular():
		if err := fileInUse(target, st); err != nil {
			return Stats{}, err
		}
		f, err = os.OpenFile(target, os.O_RDWR, 0)
		if err != nil {
			return Stats{}, fmt.Errorf("restore target: %w", err)
		}
		if st.Size() != snap.SizeBytes {
			if err := f.Truncate(snap.SizeBytes); err != nil {
				f.Close()
				return Stats{}, fmt.Errorf("restore target: resize to %d bytes: %w", snap.SizeBytes, err)
			}
		}
	case m&os.ModeDevice != 0 && m&os.ModeCharDevice == 0:
		f, err = os.OpenFile(target, os.O_RDWR|unix.O_EXCL|unix.O_DIRECT, 0)
		if errors.Is(err, unix.EBUSY) {
			return Stats{}, fmt.Errorf("%s is mounted or held open by another program: %w; unmount it (and stop what uses it) first", target, ErrTargetBusy)
		}
		if err != nil {
			return Stats{}, fmt.Errorf("restore target: %w", err)
		}
		size, err := f.Seek(0, 2)
		if err != nil {
			f.Close()
			return Stats{}, err
		}
		if size < snap.SizeBytes {
			f.Close()
			return Stats{}, fmt.Errorf("device %s holds %d bytes, the snapshot needs %d: restore to a larger device or to a file", target, size, snap.SizeBytes)
		}
	default:
		return Stats{}, fmt.Errorf("restore target %s is not a block device or regular file", target)
	}
	defer f.Close()
	align := int64(1)
	if !st.Mode().IsRegular() {
		// O_DIRECT transfers must be multiples of the logical sector size.
		ssz, err := unix.IoctlGetInt(int(f.Fd()), unix.BLKSSZGET)
		if err != nil {
			return Stats{}, fmt.Errorf("restore target %s: sector size: %w", target, err)
		}
		align = int64(ssz)
	}
	res, err := syncChunks(ctx, sr, f, align, progress)
	if err != nil {
		return res, err
	}
	if err := f.Sync(); err != nil {
		return res, fmt.Errorf("restore: fsync %s: %w", target, err)
	}
	return res, nil
}

// batchChunks is how many chunks syncChunks reads from the target at once.
const batchChunks = 64

// syncChunks writes into f every chunk whose content differs from the snapshot.
func syncChunks(ctx context.Context, sr *chain.SnapshotReader, f *os.File, align int64, progress Progress) (Stats, error) {
	snap := sr.Snapshot()
	cs := int64(snap.ChunkSize)
	n := snap.Chunks()
	st := Stats{Chunks: n}
	g, ctx := errgroup.WithContext(ctx)
	batches := make(chan int64)
	g.Go(func() error {
		defer close(batches)
		for first := int64(0); first < n; first += batchChunks {
			select {
			case batches <- first:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	})
	report := newReporter(progress)
	for k := 0; k < runtime.GOMAXPROCS(0)+1; k++ {
		g.Go(func() error {
			// O_DIRECT needs aligned memory: a private anonymous mapping is page-aligned.
			buf, err := unix.Mmap(-1, 0, int(batchChunks*cs), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
			if err != nil {
				return err
			}
			defer unix.Munmap(buf)
			for first := range batches {
				cnt := min(batchChunks, n-first)
				off := first * cs
				length := min(cnt*cs, snap.SizeBytes-off)
				got, err := f.ReadAt(buf[:alignUp(length, align)], off)
				if int64(got) < length {
					return fmt.Errorf("read target at %d: %w", off, err)
				}
				atomic.AddInt64(&st.BytesRead, length)
				if err := syncBatch(ctx, sr, f, buf, first, cnt, align, &st); err != nil {
					return err
				}
				report(length)
			}
			return nil
		})
	}
	return st, g.Wait()
}

// syncBatch compares one batch read into buf and writes the differing chunks back from buf,
// coalescing neighbours into one write.
func syncBatch(ctx context.Context, sr *chain.SnapshotReader, f *os.File, buf []byte, first, cnt, align int64, st *Stats) error {
	cs := int64(sr.Snapshot().ChunkSize)
	runStart := int64(-1)
	var runEnd int64 // byte offset in buf where the run of differing chunks ends
	flush := func() error {
		if runStart < 0 {
			return nil
		}
		off := first*cs + runStart
		if _, err := f.WriteAt(buf[runStart:alignUp(runEnd, align)], off); err != nil {
			return fmt.Errorf("write target at %d: %w", off, err)
		}
		atomic.AddInt64(&st.BytesWritten, runEnd-runStart)
		runStart = -1
		return nil
	}
	for c := int64(0); c < cnt; c++ {
		i := first + c
		want, err := sr.ChunkID(ctx, i)
		if err != nil {
			return err
		}
		size := int64(sr.ChunkLen(i))
		cur := buf[c*cs : c*cs+size]
		same := false
		if want.IsZero() {
			same = chain.AllZero(cur)
		} else {
			same = chain.Hash(cur) == want
		}
		if same {
			if err := flush(); err != nil {
				return err
			}
			continue
		}
		data, err := sr.LoadChunk(ctx, i, want, nil)
		if err != nil {
			return err
		}
		copy(cur, data)
		atomic.AddInt64(&st.ChunksWritten, 1)
		if runStart < 0 {
			runStart = c * cs
		}
		runEnd = c*cs + size
	}
	return flush()
}

// alignUp rounds a length up to a multiple of the sector size that O_DIRECT needs. A
// volume's last chunk may be short, but a device's size is a multiple of its sector size,
// so the rounded transfer stays inside it (rewriting bytes just read back).
func alignUp(n, align int64) int64 { return (n + align - 1) / align * align }

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// fileInUse refuses a restore target file that backs an attached loop device (a live
// filesystem may be mounted from it) or that a running program (a VM, say) has open for
// writing: rewriting it underneath them would corrupt what they hold.
func fileInUse(target string, st os.FileInfo) error {
	want, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	same := func(path string) bool {
		var s unix.Stat_t
		return unix.Stat(path, &s) == nil && s.Dev == want.Dev && s.Ino == want.Ino
	}
	loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, b := range loops {
		back, err := os.ReadFile(b)
		if err != nil {
			continue
		}
		if same(strings.TrimSpace(string(back))) {
			dev := filepath.Base(filepath.Dir(filepath.Dir(b)))
			return fmt.Errorf("%s backs the loop device /dev/%s: %w; detach it first (losetup -d /dev/%s), after unmounting what is mounted from it", target, dev, ErrTargetBusy, dev)
		}
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/fd/*")
	for _, fd := range procs {
		if !same(fd) {
			continue
		}
		pid := strings.Split(fd, "/")[2]
		if pid == strconv.Itoa(os.Getpid()) {
			continue
		}
		info, err := os.ReadFile(strings.Replace(fd, "/fd/", "/fdinfo/", 1))
		if err != nil || !openForWriting(string(info)) {
			continue
		}
		comm, _ := os.ReadFile("/proc/" + pid + "/comm")
		return fmt.Errorf("%s is open for writing by process %s (%s): %w; stop it first", target, pid, strings.TrimSpace(string(comm)), ErrTargetBusy)
	}
	return nil
}

// openForWriting reads the flags line of /proc/PID/fdinfo/FD (octal open flags).
func openForWriting(fdinfo string) bool {
	for _, line := range strings.Split(fdinfo, "\n") {
		if v, ok := strings.CutPrefix(line, "flags:"); ok {
			flags, err := strconv.ParseUint(strings.TrimSpace(v), 8, 64)
			return err == nil && flags&(unix.O_WRONLY|unix.O_RDWR) != 0
		}
	}
	return false
}

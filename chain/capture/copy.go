package capture

import (
	"context"
	"fmt"
	"io"
	"runtime"
	"sync/atomic"

	"github.com/stasis-project/stasis/chain/hugemem"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"
)

// ChunkWriter receives chunks. chain.SnapshotWriter implements it.
type ChunkWriter interface {
	// Put stores chunk i; safe for concurrent use; data is not retained.
	Put(ctx context.Context, i int64, data []byte) error
	ChunkSize() int
}

// Stats counts what a copy read.
type Stats struct {
	BytesRead int64
	Chunks    int64
}

// readSize is the size of one read: large sequential reads reach the device's throughput,
// as dd bs=4M does.
const readSize = 4 << 20

// Chunks turns byte ranges into the sorted, de-duplicated list of chunk index runs they touch.
func Chunks(ranges []Range, chunkSize int, size int64) []ChunkRun {
	cs := int64(chunkSize)
	var runs []ChunkRun
	for _, r := range ranges {
		if r.End > size {
			r.End = size
		}
		if r.Start >= r.End {
			continue
		}
		first, last := r.Start/cs, (r.End-1)/cs+1
		if n := len(runs); n > 0 && first <= runs[n-1].End {
			if last > runs[n-1].End {
				runs[n-1].End = last
			}
			continue
		}
		runs = append(runs, ChunkRun{first, last})
	}
	return runs
}

// ChunkRun is a run of chunk indexes [Start, End).
type ChunkRun struct{ Start, End int64 }

// NewReadLimit paces reads to bytesPerSecond on average (a read of up to readSize goes at
// once; the next waits for its share).
func NewReadLimit(bytesPerSecond int64) Limiter {
	return rate.NewLimiter(rate.Limit(bytesPerSecond), readSize)
}

// Copy reads the given chunk runs (sorted, as Chunks returns them) from src and Puts every
// chunk. Reads are sequential and large; hashing and compressing run on every core. limit,
// if not nil, paces the reads.
func Copy(ctx context.Context, src *Source, w ChunkWriter, runs []ChunkRun, limit Limiter) (Stats, error) {
	cs := int64(w.ChunkSize())
	perRead := max(1, readSize/cs)
	workers := 2 * runtime.GOMAXPROCS(0)

	type job struct {
		buf   []byte
		first int64
		n     int64 // chunks in buf
	}
	pool := make(chan []byte, workers+2)
	for i := 0; i < cap(pool); i++ {
		b, err := hugemem.Map(int(perRead * cs))
		if err != nil {
			return Stats{}, fmt.Errorf("allocate read buffer: %w", err)
		}
		defer hugemem.Unmap(b)
		pool <- b
	}
	g, gctx := errgroup.WithContext(ctx)
	jobs := make(chan job)
	var st Stats
	for k := 0; k < workers; k++ {
		g.Go(func() error {
			for j := range jobs {
				for c := int64(0); c < j.n; c++ {
					i := j.first + c
					end := c*cs + min(cs, src.Size-i*cs) // the last chunk may be short
					if err := w.Put(gctx, i, j.buf[c*cs:end]); err != nil {
						return fmt.Errorf("chunk %d: %w", i, err)
					}
					atomic.AddInt64(&st.Chunks, 1)
				}
				pool <- j.buf
			}
			return nil
		})
	}
	g.Go(func() error {
		defer close(jobs)
		for _, run := range runs {
			for first := run.Start; first < run.End; first += perRead {
				n := min(perRead, run.End-first)
				var buf []byte
				select {
				case buf = <-pool:
				case <-gctx.Done():
					return nil
				}
				off := first * cs
				length := min(n*cs, src.Size-off)
				if limit != nil {
					if err := limit.WaitN(gctx, int(length)); err != nil {
						pool <- buf
						return err
					}
				}
				// O_DIRECT needs an aligned length; the device size is a multiple of the
				// sector size, so reading whole chunks stays inside it except at the end.
				got, err := src.f.ReadAt(buf[:alignUp(length, 4096)], off)
				if err != nil && err != io.EOF || int64(got) < length {
					if err == nil || err == io.EOF {
						err = io.ErrUnexpectedEOF
					}
					return fmt.Errorf("read %s at %d: %w", src.Path, off, err)
				}
				atomic.AddInt64(&st.BytesRead, length)
				select {
				case jobs <- job{buf: buf, first: first, n: n}:
				case <-gctx.Done():
					return nil
				}
			}
		}
		return nil
	})
	if err := g.Wait(); err != nil {
		return st, err
	}
	return st, ctx.Err() // a cancelled caller gets no partial success
}

func alignUp(n, a int64) int64 { return (n + a - 1) / a * a }

// alignedBuffer returns page-aligned memory, as O_DIRECT requires.
func alignedBuffer(size int) ([]byte, error) {
	b, err := unix.Mmap(-1, 0, int(alignUp(int64(size), 4096)), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("allocate read buffer: %w", err)
	}
	return b, nil
}

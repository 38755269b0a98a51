package testenv

import (
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Writers keep a mounted filesystem busy: random overwrites of files, new and deleted
// files, and an append-only log of numbered records, each fsynced.
type Writers struct {
	dir     string
	stop    chan struct{}
	wg      sync.WaitGroup
	synced  atomic.Int64 // highest log record number known durable
	Written atomic.Int64 // bytes written
}

// LogName is the file the fsynced records go to, inside the writers' directory.
const LogName = "records.log"

// Record returns the text of log record n (fixed width, so record n ends at (n+1)*len).
func Record(n int64) string { return fmt.Sprintf("record %012d stasis\n", n) }

// StartWriters starts n random writers plus the log writer in dir; they stop at cleanup.
func StartWriters(t testing.TB, dir string, n int, seed int64) *Writers {
	w := &Writers{dir: dir, stop: make(chan struct{})}
	w.wg.Add(n + 1)
	for i := 0; i < n; i++ {
		go w.random(rand.New(rand.NewSource(seed+int64(i))), i)
	}
	go w.log()
	t.Cleanup(w.Stop)
	return w
}

// Synced returns the number of log records known to be durable now.
func (w *Writers) Synced() int64 { return w.synced.Load() }

// Stop stops the writers and waits for them.
func (w *Writers) Stop() {
	select {
	case <-w.stop:
	default:
		close(w.stop)
	}
	w.wg.Wait()
}

func (w *Writers) stopped() bool {
	select {
	case <-w.stop:
		return true
	default:
		return false
	}
}

func (w *Writers) random(rng *rand.Rand, id int) {
	defer w.wg.Done()
	buf := make([]byte, 256<<10)
	for !w.stopped() {
		name := filepath.Join(w.dir, fmt.Sprintf("w%d-%d", id, rng.Intn(8)))
		switch rng.Intn(10) {
		case 0:
			os.Remove(name)
		default:
			f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o644)
			if err != nil {
				continue
			}
			n := 4096 * (1 + rng.Intn(len(buf)/4096))
			rng.Read(buf[:n])
			f.WriteAt(buf[:n], int64(rng.Intn(64))*4096)
			if rng.Intn(3) == 0 {
				f.Sync()
			}
			f.Close()
			w.Written.Add(int64(n))
		}
		time.Sleep(time.Duration(rng.Intn(3)) * time.Millisecond)
	}
}

func (w *Writers) log() {
	defer w.wg.Done()
	f, err := os.OpenFile(filepath.Join(w.dir, LogName), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	for n := int64(1); !w.stopped(); n++ {
		if _, err := f.WriteString(Record(n)); err != nil {
			return
		}
		if f.Sync() == nil {
			w.synced.Store(n)
		}
	}
}

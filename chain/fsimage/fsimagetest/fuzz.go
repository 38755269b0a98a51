// Package fsimagetest helps fuzz the filesystem readers. A fuzz input is a sparse image:
// the image size, then (sector number, 512 bytes) records; every other sector reads as
// zeros. Seeds are real images made by mkfs, reduced to the sectors the reader touches
// while walking them, so the fuzzer mutates metadata rather than megabytes of zeros.
package fsimagetest

import (
	"encoding/binary"
	"flag"
	"io"
	"os"
	"path"
	"sort"
	"sync"
	"testing"

	"github.com/stasis-project/stasis/chain/fsimage"
	"github.com/stasis-project/stasis/test/testenv"
)

const sector = 512

// BuildSeeds reports whether a fuzz target should build its seed images: not in a fuzzing
// worker process, which receives its inputs from the coordinator. Workers are killed when
// -fuzztime runs out, without running cleanups, so whatever a worker sets up (a loop mount,
// a temporary image) would be left behind.
func BuildSeeds() bool {
	w := flag.Lookup("test.fuzzworker")
	return w == nil || w.Value.String() != "true"
}

// sparse is the decoded image.
type sparse struct {
	size    int64
	sectors map[int64][]byte
}

func (s *sparse) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= s.size {
		return 0, io.EOF
	}
	n := 0
	for n < len(p) && off < s.size {
		idx, within := off/sector, off%sector
		c := min(int64(len(p)-n), sector-within, s.size-off)
		if b, ok := s.sectors[idx]; ok {
			copy(p[n:n+int(c)], b[within:])
		} else {
			clear(p[n : n+int(c)])
		}
		n += int(c)
		off += c
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// Decode turns a fuzz input into an image. Any input decodes.
func Decode(data []byte) (io.ReaderAt, int64) {
	s := &sparse{sectors: map[int64][]byte{}}
	if len(data) >= 8 {
		s.size = int64(binary.LittleEndian.Uint64(data) % (1 << 40))
		data = data[8:]
	}
	for len(data) >= 4+sector {
		s.sectors[int64(binary.LittleEndian.Uint32(data))] = data[4 : 4+sector]
		data = data[4+sector:]
	}
	return s, s.size
}

// recorder notes which sectors a reader touches.
type recorder struct {
	r       io.ReaderAt
	mu      sync.Mutex
	touched map[int64]bool
}

func (r *recorder) ReadAt(p []byte, off int64) (int, error) {
	r.mu.Lock()
	for s := off / sector; s*sector < off+int64(len(p)); s++ {
		r.touched[s] = true
	}
	r.mu.Unlock()
	return r.r.ReadAt(p, off)
}

// Seed opens the image file at path with open, walks it with Exercise, and returns a fuzz
// input holding the non-zero sectors the walk read.
func Seed(t testing.TB, imgPath string, open func(io.ReaderAt, int64) (fsimage.FS, error)) []byte {
	t.Helper()
	f, size := openImage(t, imgPath)
	rec := &recorder{r: f, touched: map[int64]bool{}}
	fsys, err := open(rec, size)
	if err != nil {
		t.Fatalf("seed image %s: %v", imgPath, err)
	}
	Exercise(fsys)
	var idx []int64
	for s := range rec.touched {
		idx = append(idx, s)
	}
	sort.Slice(idx, func(i, j int) bool { return idx[i] < idx[j] })
	return encode(f, size, idx)
}

// openImage opens a file for the test's duration.
func openImage(t testing.TB, path string) (*os.File, int64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return f, fi.Size()
}

// CompareWithKernel opens the image file at path with open and compares the tree the
// reader shows with want (the kernel's view of the same image).
func CompareWithKernel(t testing.TB, path string, want testenv.Tree, open func(io.ReaderAt, int64) (fsimage.FS, error)) {
	t.Helper()
	f, size := openImage(t, path)
	fsys, err := open(f, size)
	if err != nil {
		t.Fatal(err)
	}
	testenv.CompareTrees(t, want, testenv.ScanFS(t, fsys))
}

// RawSeed encodes every non-zero sector of the (small) image file at path.
func RawSeed(t testing.TB, imgPath string) []byte {
	t.Helper()
	f, size := openImage(t, imgPath)
	var idx []int64
	for s := int64(0); s*sector < size; s++ {
		idx = append(idx, s)
	}
	return encode(f, size, idx)
}

func encode(f io.ReaderAt, size int64, idx []int64) []byte {
	out := binary.LittleEndian.AppendUint64(nil, uint64(size))
	buf := make([]byte, sector)
	for _, s := range idx {
		if n, _ := f.ReadAt(buf, s*sector); n < sector || isZero(buf) {
			continue
		}
		out = binary.LittleEndian.AppendUint32(out, uint32(s))
		out = append(out, buf...)
	}
	return out
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// Exercise walks a filesystem the way the FUSE view does, within fixed bounds, and reads
// its allocation map as capture does, ignoring errors: every call must return, and never
// panic.
func Exercise(fsys fsimage.FS) {
	budget := 500
	buf := make([]byte, 8192)
	var walk func(name string, ino uint64, depth int)
	walk = func(name string, ino uint64, depth int) {
		if budget--; budget < 0 || depth > 16 {
			return
		}
		n, err := fsys.Open(ino)
		if err != nil {
			return
		}
		a := n.Attr()
		n.Xattrs()
		switch a.Mode & fsimage.S_IFMT {
		case fsimage.S_IFREG:
			for _, off := range []int64{0, 4096, int64(a.Size) / 2, int64(a.Size) - 100} {
				if off >= 0 {
					n.ReadAt(buf, off)
				}
			}
			if m, ok := n.(fsimage.Mapper); ok { // the extent walk of diff and restore
				for off, steps := int64(0), 0; off < int64(a.Size) && steps < 64; steps++ {
					_, l, err := m.Map(off)
					if err != nil || l <= 0 {
						break
					}
					off += l
				}
			}
		case fsimage.S_IFLNK:
			n.Readlink()
		case fsimage.S_IFDIR:
			es, _ := n.ReadDir()
			for i, e := range es {
				if i > 64 {
					break
				}
				walk(path.Join(name, e.Name), e.Ino, depth+1)
			}
		}
	}
	walk("/", fsys.Root(), 0)
	if a, ok := fsys.(fsimage.Allocator); ok {
		a.Allocated()
	}
}

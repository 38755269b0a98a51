package fusemount

import (
	"bytes"
	"io"
	"log/slog"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/stasis-project/stasis/chain/fsimage"
	"github.com/stasis-project/stasis/chain/image"
	"github.com/stasis-project/stasis/test/testenv"
)

// TestPinnedReadsEqualReadAt: a file's reads answered straight from the chunk cache give
// the bytes the filesystem reader gives, holes and the end of the file included, for an
// ext4 that starts past the image's first byte (a partition); a file whose data is in its
// inode is left to ReadAt.
func TestPinnedReadsEqualReadAt(t *testing.T) {
	testenv.RequireTool(t, "mkfs.ext4")
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	os.Mkdir(src, 0o755)
	rng := rand.New(rand.NewSource(3))
	big := make([]byte, 3<<20+123)
	rng.Read(big)
	os.WriteFile(filepath.Join(src, "big.bin"), big, 0o644)
	sparse, err := os.Create(filepath.Join(src, "sparse.bin"))
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, 3 << 20, 8<<20 - 5000} { // data islands, holes between
		sparse.WriteAt(big[:200<<10], off)
	}
	sparse.Truncate(9 << 20) // and a hole at the end
	sparse.Close()
	os.WriteFile(filepath.Join(src, "tiny.txt"), []byte("inline data\n"), 0o644)
	fsImg := filepath.Join(dir, "fs.img")
	testenv.Run(t, "truncate", "-s", "32M", fsImg)
	testenv.Run(t, "mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-O", "inline_data", "-d", src, fsImg)

	const start = 1 << 20 // the filesystem sits after a megabyte of something else
	fsBytes, err := os.ReadFile(fsImg)
	if err != nil {
		t.Fatal(err)
	}
	whole := append(bytes.Repeat([]byte{0xEE}, start), fsBytes...)
	sr := testenv.MemorySnapshot(t, whole, 64<<10)
	v := &view{opts: Options{Log: slog.New(slog.NewTextHandler(io.Discard, nil))}}
	m := newVolumeFS(v, "v/s/part1", image.NewReader(sr, image.NewCache(1<<20), nil), start, int64(len(fsBytes)))
	fsys, err := m.open()
	if err != nil {
		t.Fatal(err)
	}
	files := map[string]fsimage.Inode{}
	entries, err := m.rootNode.ReadDir()
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if files[e.Name], err = fsys.Open(e.Ino); err != nil {
			t.Fatal(err)
		}
	}

	for _, name := range []string{"big.bin", "sparse.bin"} {
		node := files[name]
		size := int64(node.Attr().Size)
		for i := 0; i < 200; i++ {
			off := rng.Int63n(size + 10)
			n := 1 + rng.Int63n(1200<<10)
			r, ok, err := m.pin(node, off, n)
			if err != nil || !ok {
				t.Fatalf("%s: pin of %d bytes at %d: ok %v, %v", name, n, off, ok, err)
			}
			got, _ := r.Bytes(nil)
			want := make([]byte, n)
			k, _ := node.ReadAt(want, off)
			if r.Size() != k || !bytes.Equal(got, want[:k]) {
				t.Fatalf("%s: %d bytes at %d: pinned %d bytes, ReadAt %d, or they differ", name, n, off, r.Size(), k)
			}
			if s, ok := r.(interface {
				Slices() ([][]byte, fuse.Status)
			}); ok {
				vecs, _ := s.Slices()
				if !bytes.Equal(bytes.Join(vecs, nil), got) {
					t.Fatalf("%s: Slices and Bytes differ", name)
				}
			}
			r.Done()
		}
	}
	if _, ok, err := m.pin(files["tiny.txt"], 0, 4096); ok || err != nil {
		t.Fatalf("a file with inline data: ok %v, %v; want it left to ReadAt", ok, err)
	}
}

// fragmented is a regular file of size bytes mapped identically onto the image in
// extents of ext bytes.
type fragmented struct {
	fsimage.Inode
	size, ext int64
}

func (f fragmented) Attr() fsimage.Attr {
	return fsimage.Attr{Mode: fsimage.S_IFREG | 0o644, Size: uint64(f.size)}
}
func (f fragmented) Map(off int64) (int64, int64, error) {
	return off, f.ext - off%f.ext, nil
}

// TestPinnedReadsOfFragmentedFiles: a file in 4 KiB extents is still answered from the
// cache; one in 512-byte extents would need more pieces than one writev takes (and
// go-fuse could not send the reply at all), so it is left to ReadAt.
func TestPinnedReadsOfFragmentedFiles(t *testing.T) {
	data := make([]byte, 4<<20)
	rand.New(rand.NewSource(4)).Read(data)
	sr := testenv.MemorySnapshot(t, data, 64<<10)
	v := &view{opts: Options{Log: slog.New(slog.NewTextHandler(io.Discard, nil))}}
	m := newVolumeFS(v, "v/s", image.NewReader(sr, image.NewCache(1<<20), nil), 0, int64(len(data)))
	r, ok, err := m.pin(fragmented{size: int64(len(data)), ext: 4096}, 1<<20, 1<<20)
	if err != nil || !ok {
		t.Fatalf("4 KiB extents: ok %v, %v", ok, err)
	}
	if got, _ := r.Bytes(nil); !bytes.Equal(got, data[1<<20:2<<20]) {
		t.Fatal("4 KiB extents: the pinned bytes differ")
	}
	r.Done()
	if _, ok, err := m.pin(fragmented{size: int64(len(data)), ext: 512}, 0, 1<<20); ok || err != nil {
		t.Fatalf("512-byte extents: ok %v, %v; want it left to ReadAt", ok, err)
	}
}

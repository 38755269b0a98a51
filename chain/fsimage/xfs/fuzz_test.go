package xfs

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stasis-project/stasis/chain/fsimage"
	"github.com/stasis-project/stasis/chain/fsimage/fsimagetest"
	"github.com/stasis-project/stasis/test/testenv"
)

func open(dev io.ReaderAt, size int64) (fsimage.FS, error) { return Open(dev, size) }

// FuzzXFS walks mutated images: seeds are made by mkfs.xfs -p from a prototype file with
// short-form, block, leaf and node directories, local and remote symlinks, and files.
func FuzzXFS(f *testing.F) {
	if _, err := exec.LookPath("mkfs.xfs"); err == nil && fsimagetest.BuildSeeds() {
		dir := f.TempDir()
		content := filepath.Join(dir, "content")
		os.WriteFile(content, []byte(strings.Repeat("file content\n", 3000)), 0o644)
		var proto strings.Builder
		proto.WriteString("/dev/null\n0 0\nd--755 0 0\n")
		fmt.Fprintf(&proto, "small ---644 1000 1000 %s\n", content)
		fmt.Fprintf(&proto, "short-link l--777 0 0 small\n")
		fmt.Fprintf(&proto, "long-link l--777 0 0 %s\n", strings.Repeat("x/", 400))
		for _, n := range []int{3, 40, 400, 3000} { // short-form, block, leaf, node
			fmt.Fprintf(&proto, "dir%d d--755 0 0\n", n)
			for i := 0; i < n; i++ {
				fmt.Fprintf(&proto, "entry-with-a-longish-name-%05d ---600 0 0 /dev/null\n", i)
			}
			proto.WriteString("$\n")
		}
		proto.WriteString("$\n")
		pf := filepath.Join(dir, "proto")
		os.WriteFile(pf, []byte(proto.String()), 0o644)
		for _, args := range [][]string{nil, {"-b", "size=1024", "-n", "size=8192"}} {
			img := filepath.Join(f.TempDir(), "seed.img")
			testenv.Run(f, "truncate", "-s", "320M", img)
			testenv.Run(f, "mkfs.xfs", append(append([]string{"-q", "-f", "-p", pf}, args...), img)...)
			f.Add(fsimagetest.Seed(f, img, open))
		}
		// Must finish in well under a second (TestHostileBtreeFinishes).
		f.Add(fsimagetest.Seed(f, hostileBtreeImage(f), open))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		dev, size := fsimagetest.Decode(data)
		if fsys, err := Open(dev, size); err == nil {
			fsimagetest.Exercise(fsys)
		}
	})
}

// hostileBtreeImage makes an XFS image whose file "small" is mapped by a B+tree of the
// greatest depth in which every node's records all point at the same child: walked without
// remembering visited blocks it costs maxrecs^levels reads.
func hostileBtreeImage(t testing.TB) string {
	t.Helper()
	testenv.RequireTool(t, "mkfs.xfs")
	dir := t.TempDir()
	content := filepath.Join(dir, "content")
	os.WriteFile(content, []byte("some content\n"), 0o644)
	pf := filepath.Join(dir, "proto")
	os.WriteFile(pf, []byte(fmt.Sprintf("/dev/null\n0 0\nd--755 0 0\nsmall ---644 0 0 %s\n$\n", content)), 0o644)
	img := filepath.Join(dir, "hostile.img")
	testenv.Run(t, "truncate", "-s", "320M", img)
	testenv.Run(t, "mkfs.xfs", "-q", "-f", "-p", pf, img)
	fd, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	fsys, err := Open(fd, 320<<20)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := fsys.inode(fsys.Root())
	ents, err := root.ReadDir()
	if err != nil || len(ents) != 1 {
		t.Fatalf("root directory: %v %v", ents, err)
	}
	ino := ents[0].Ino
	agino := ino & (1<<(fsys.inopblog+fsys.agblklog) - 1)
	agb, idx := agino>>fsys.inopblog, agino&(1<<fsys.inopblog-1)
	inodeAt := int64(agb)*fsys.bs + int64(idx)*fsys.inodeSize // AG 0
	raw := make([]byte, fsys.inodeSize)
	fd.ReadAt(raw, inodeAt)
	// Root in the inode at the deepest level, its records all pointing at one node; that
	// node's records all at the next one, down to a leaf. The blocks are free ones at the
	// end of AG 0.
	raw[5] = fmtBtree
	raw[82] = 0 // no attribute fork: the data fork is the whole literal area
	fork := raw[coreSize:]
	clear(fork)
	rootMax := (len(fork) - 4) / 16
	be.PutUint16(fork, maxBtreeLvl)
	be.PutUint16(fork[2:], uint16(rootMax))
	first := fsys.agblocks - maxBtreeLvl - 1
	for i := 0; i < rootMax; i++ {
		be.PutUint64(fork[4+rootMax*8+i*8:], first)
	}
	fd.WriteAt(raw, inodeAt)
	const hdr = 72
	maxrecs := (int(fsys.bs) - hdr) / 16
	for level := maxBtreeLvl - 1; level >= 0; level-- {
		b := make([]byte, fsys.bs)
		be.PutUint32(b, bmbtMagic)
		be.PutUint16(b[4:], uint16(level))
		be.PutUint64(b[56:], ino)
		blk := first + uint64(maxBtreeLvl-1-level)
		if level == 0 {
			be.PutUint16(b[6:], 1)
			be.PutUint64(b[hdr+8:], 1<<21) // one extent of one block at block 0... a real block
		} else {
			be.PutUint16(b[6:], uint16(maxrecs))
			for i := 0; i < maxrecs; i++ {
				be.PutUint64(b[hdr+maxrecs*8+i*8:], blk+1)
			}
		}
		fd.WriteAt(b, int64(blk)*fsys.bs)
	}
	return img
}

// TestHostileBtreeFinishes: the B+tree above is refused at once, not walked for ever.
func TestHostileBtreeFinishes(t *testing.T) {
	img := hostileBtreeImage(t)
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fsys, err := Open(f, 320<<20)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	fsimagetest.Exercise(fsys)
	n, _ := fsys.inode(fsys.Root())
	ents, _ := n.ReadDir()
	small, _ := fsys.Open(ents[0].Ino)
	if _, err := small.ReadAt(make([]byte, 10), 0); !errors.Is(err, fsimage.ErrCorrupt) {
		t.Fatalf("reading the file: %v, want ErrCorrupt", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("took %s", d)
	}
}

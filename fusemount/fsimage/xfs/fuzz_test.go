package xfs

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stasis-project/stasis/fusemount/fsimage"
	"github.com/stasis-project/stasis/fusemount/fsimage/fsimagetest"
	"github.com/stasis-project/stasis/test/testenv"
)

func open(dev io.ReaderAt, size int64) (fsimage.FS, error) { return Open(dev, size) }

// FuzzXFS walks mutated images: seeds are made by mkfs.xfs -p from a prototype file with
// short-form, block, leaf and node directories, local and remote symlinks, and files.
func FuzzXFS(f *testing.F) {
	if _, err := exec.LookPath("mkfs.xfs"); err == nil {
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
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		dev, size := fsimagetest.Decode(data)
		if fsys, err := Open(dev, size); err == nil {
			fsimagetest.Exercise(fsys)
		}
	})
}

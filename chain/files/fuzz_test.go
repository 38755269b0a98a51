package files

import (
	"context"
	"errors"
	"io"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stasis-project/stasis/chain/fsimage"
	"github.com/stasis-project/stasis/chain/fsimage/filesystems"
	"github.com/stasis-project/stasis/chain/fsimage/fsimagetest"
	"github.com/stasis-project/stasis/test/testenv"
)

func openAny(dev io.ReaderAt, size int64) (fsimage.FS, error) { return filesystems.Open(dev, size) }

var errBudget = errors.New("budget spent")

// exercise does what the file commands do to an image, within fixed bounds: walk the tree
// (loops and hostile names must end in errors), map each small file's extents, compare it
// with itself, hash it, read links and xattrs.
func exercise(fsys fsimage.FS) {
	root, err := RootOf(fsys, "fuzz")
	if err != nil {
		return
	}
	ctx := context.Background()
	budget := 400
	Walk(ctx, root, func(e *Entry) error {
		if budget--; budget < 0 {
			return errBudget
		}
		e.Xattrs()
		switch e.Type() {
		case "symlink":
			e.Readlink()
		case "file":
			if e.Attr.Size <= 256<<10 {
				e.Segments()
				Compare(ctx, e, e)
				Hash(ctx, e)
			}
		}
		return nil
	})
}

// FuzzFiles runs the file commands' walk over mutated ext4 and XFS images.
func FuzzFiles(f *testing.F) {
	if fsimagetest.BuildSeeds() {
		src := f.TempDir()
		testenv.BuildTrickyTree(f, src, testenv.TrickyTree{DirEntries: 50})
		if _, err := exec.LookPath("mkfs.ext4"); err == nil {
			img := filepath.Join(f.TempDir(), "ext4.img")
			testenv.Run(f, "mkfs.ext4", "-q", "-F", "-d", src, img, "80M")
			f.Add(fsimagetest.Seed(f, img, openAny))
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		dev, size := fsimagetest.Decode(data)
		if fsys, err := filesystems.Open(dev, size); err == nil {
			exercise(fsys)
		}
	})
}

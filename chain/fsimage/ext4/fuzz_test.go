package ext4

import (
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stasis-project/stasis/chain/fsimage"
	"github.com/stasis-project/stasis/chain/fsimage/fsimagetest"
	"github.com/stasis-project/stasis/test/testenv"
)

func openFS(dev io.ReaderAt, size int64) (fsimage.FS, error) { return Open(dev, size) }

// FuzzExt4 walks mutated images: seeds are mkfs.ext4 -d images in several layouts.
func FuzzExt4(f *testing.F) {
	if _, err := exec.LookPath("mkfs.ext4"); err == nil && fsimagetest.BuildSeeds() {
		src := f.TempDir()
		testenv.BuildTrickyTree(f, src, testenv.TrickyTree{DirEntries: 200})
		for _, args := range [][]string{nil, {"-O", "inline_data"}, {"-t", "ext3", "-b", "1024"}, {"-O", "meta_bg,^resize_inode"}} {
			img := filepath.Join(f.TempDir(), "seed.img")
			testenv.Run(f, "mkfs.ext4", append(append([]string{"-q", "-F", "-d", src}, args...), img, "80M")...)
			f.Add(fsimagetest.Seed(f, img, openFS))
		}
		if os.Geteuid() == 0 { // a journal to replay
			f.Add(fsimagetest.Seed(f, crashImage(f, f.TempDir()), openFS))
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		dev, size := fsimagetest.Decode(data)
		if fsys, err := Open(dev, size); err == nil {
			fsimagetest.Exercise(fsys)
		}
	})
}

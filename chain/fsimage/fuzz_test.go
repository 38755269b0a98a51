package fsimage_test

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stasis-project/stasis/chain/fsimage"
	"github.com/stasis-project/stasis/chain/fsimage/fsimagetest"
	"github.com/stasis-project/stasis/test/testenv"
)

// FuzzPartitions reads mutated MBR and GPT tables; seeds are made by sfdisk.
func FuzzPartitions(f *testing.F) {
	if _, err := exec.LookPath("sfdisk"); err == nil {
		for _, layout := range []string{"label: gpt\nsize=1MiB\nsize=2MiB\n", "label: dos\nsize=1MiB\nsize=2MiB, type=83\n"} {
			img := filepath.Join(f.TempDir(), "disk.img")
			testenv.Run(f, "truncate", "-s", "8M", img)
			testenv.RunInput(f, strings.NewReader(layout), "sfdisk", "-q", img)
			f.Add(fsimagetest.RawSeed(f, img))
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		dev, size := fsimagetest.Decode(data)
		parts, err := fsimage.Partitions(dev, size)
		for _, p := range parts {
			if err != nil || p.Start < 0 || p.Size <= 0 || p.Start+p.Size > size {
				t.Fatalf("partition %+v outside the %d-byte image (err %v)", p, size, err)
			}
		}
	})
}

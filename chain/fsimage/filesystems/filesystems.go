// Package filesystems recognises the filesystems stasis reads (ext4, XFS) on an image or
// device, for the view (files), capture (allocation maps) and identity checks. Each
// filesystem has one parser, in its own package under chain/fsimage.
package filesystems

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io"

	"github.com/stasis-project/stasis/chain/fsimage"
	"github.com/stasis-project/stasis/chain/fsimage/ext4"
	"github.com/stasis-project/stasis/chain/fsimage/xfs"
)

// Open opens the filesystem on dev for reading files (ext4 with its journal replayed in
// memory when it needs recovery). It returns fsimage.ErrNoFilesystem for anything else.
func Open(dev io.ReaderAt, size int64) (fsimage.FS, error) {
	switch { // XFS first: its magic is at offset 0, where ext4 has none
	case xfs.Probe(dev):
		return xfs.Open(dev, size)
	case ext4.Probe(dev):
		return ext4.Open(dev, size)
	}
	return nil, fsimage.ErrNoFilesystem
}

// onDisk is a filesystem opened as written, for its metadata.
type onDisk interface {
	fsimage.FS
	fsimage.Allocator
	UUID() [16]byte
}

func openOnDisk(dev io.ReaderAt, size int64) (onDisk, error) {
	switch {
	case xfs.Probe(dev):
		return xfs.Open(dev, size)
	case ext4.Probe(dev):
		return ext4.OpenOnDisk(dev, size)
	}
	return nil, fsimage.ErrNoFilesystem
}

// Allocated returns the extents the filesystem on dev (a device of size bytes) has
// allocated, from its on-disk allocation metadata, and the filesystem's type. It returns
// an error wrapping fsimage.ErrNoFilesystem or fsimage.ErrUnsupported when there is no map
// to read: the caller must then read everything.
func Allocated(dev io.ReaderAt, size int64) ([]fsimage.Extent, string, error) {
	f, err := openOnDisk(dev, size)
	if err != nil {
		return nil, "", err
	}
	ext, err := f.Allocated()
	if err != nil {
		return nil, f.Type(), fmt.Errorf("%s allocation map: %w", f.Type(), err)
	}
	return ext, f.Type(), nil
}

// Identity names the filesystem on a device: its type and UUID.
type Identity struct {
	Type string `json:"type"`
	UUID string `json:"uuid"`
}

// Identify reads the filesystem's type and UUID. A device without a known filesystem has
// the zero Identity and no error; damage is an error.
func Identify(dev io.ReaderAt, size int64) (Identity, error) {
	f, err := openOnDisk(dev, size)
	if errors.Is(err, fsimage.ErrNoFilesystem) {
		return Identity{}, nil
	}
	if err != nil {
		return Identity{}, err
	}
	u := f.UUID()
	return Identity{Type: f.Type(), UUID: formatUUID(u)}, nil
}

func formatUUID(u [16]byte) string {
	h := hex.EncodeToString(u[:])
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

package fsimage

import (
	"fmt"
	"io"
	"io/fs"
	"time"

	"github.com/diskfs/go-diskfs/partition"
)

// Partition is one entry of an image's partition table.
type Partition struct {
	Index       int   // 1-based, as in the table (part1 is the kernel's p1)
	Start, Size int64 // bytes
}

// Partitions reads an MBR or GPT partition table (GPT checksums verified, the backup
// header used if the primary is damaged). It returns nil, nil when there is none. Entries
// outside the image are dropped. MBR extended partitions are not followed.
func Partitions(dev io.ReaderAt, size int64) (parts []Partition, err error) {
	var sig [2]byte
	if _, err := dev.ReadAt(sig[:], 510); err != nil || sig != [2]byte{0x55, 0xAA} {
		return nil, nil
	}
	defer func() {
		// The table decoder is a library's; hostile bytes must not take the mount down.
		if r := recover(); r != nil {
			parts, err = nil, Corruptf("partition table: %v", r)
		}
	}()
	table, err := partition.Read(&imageFile{io.NewSectionReader(dev, 0, size)}, 512, 512)
	if err != nil {
		return nil, nil // a boot sector without a table we understand: not partitioned
	}
	for _, p := range table.GetPartitions() {
		start, n := p.GetStart(), p.GetSize()
		if n <= 0 || start <= 0 || start >= size || n > size-start {
			continue
		}
		parts = append(parts, Partition{Index: p.GetIndex(), Start: start, Size: n})
	}
	return parts, nil
}

// imageFile adapts a section of the image to the file interface the table reader wants.
type imageFile struct{ *io.SectionReader }

func (f *imageFile) Stat() (fs.FileInfo, error) { return imageInfo{f.Size()}, nil }
func (f *imageFile) Close() error               { return nil }

type imageInfo struct{ size int64 }

func (i imageInfo) Name() string       { return "image" }
func (i imageInfo) Size() int64        { return i.size }
func (i imageInfo) Mode() fs.FileMode  { return 0o444 }
func (i imageInfo) ModTime() time.Time { return time.Time{} }
func (i imageInfo) IsDir() bool        { return false }
func (i imageInfo) Sys() any           { return nil }

// ErrNoFilesystem means no known filesystem starts the image.
var ErrNoFilesystem = fmt.Errorf("no ext4 or XFS filesystem found")

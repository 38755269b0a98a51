// Package capture reads a source volume (a block device or an image file) and feeds its
// chunks to a snapshot writer, reading only the ranges it is told to.
package capture

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// Source is an open volume to read.
type Source struct {
	Path     string
	Size     int64
	IsDevice bool
	f        *os.File
	direct   bool
}

// ErrBadSource is wrapped by errors about a source that cannot be snapshotted.
var ErrBadSource = errors.New("unusable source")

// OpenSource opens a block device (with O_DIRECT, so reads neither pollute nor come from the
// page cache) or a regular image file, read-only.
func OpenSource(path string) (*Source, error) {
	st, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("source %s does not exist: %w; give a block device (e.g. /dev/vdb) or an image file", path, ErrBadSource)
		}
		return nil, fmt.Errorf("source %s: %w", path, err)
	}
	s := &Source{Path: path}
	switch m := st.Mode(); {
	case m&os.ModeDevice != 0 && m&os.ModeCharDevice == 0:
		s.IsDevice = true
	case m.IsRegular():
	case m.IsDir():
		return nil, fmt.Errorf("source %s is a directory: %w; give the block device that holds it (see `findmnt %s`)", path, ErrBadSource, path)
	case m&os.ModeCharDevice != 0:
		return nil, fmt.Errorf("source %s is a character device: %w; give a block device or an image file", path, ErrBadSource)
	default:
		return nil, fmt.Errorf("source %s is not a block device or regular file (%s): %w", path, m.Type(), ErrBadSource)
	}
	flags := os.O_RDONLY
	if s.IsDevice {
		flags |= unix.O_DIRECT
	}
	f, err := os.OpenFile(path, flags, 0)
	if err != nil && s.IsDevice && errors.Is(err, unix.EINVAL) {
		f, err = os.OpenFile(path, os.O_RDONLY, 0) // a device without O_DIRECT support
	} else {
		s.direct = s.IsDevice
	}
	if err != nil {
		return nil, fmt.Errorf("open source %s: %w", path, err)
	}
	s.f = f
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("source %s: size: %w", path, err)
	}
	if size == 0 {
		f.Close()
		return nil, fmt.Errorf("source %s is empty: %w", path, ErrBadSource)
	}
	s.Size = size
	return s, nil
}

// Close closes the source.
func (s *Source) Close() error { return s.f.Close() }

// Range is a byte range [Start, End).
type Range struct{ Start, End int64 }

// DataRanges returns the parts of the source that may hold data: for an image file, its
// allocated extents (SEEK_DATA/SEEK_HOLE), so a sparse file's holes are never read; for a
// device, the whole device.
func (s *Source) DataRanges() ([]Range, error) {
	if s.IsDevice {
		return []Range{{0, s.Size}}, nil
	}
	var out []Range
	fd := int(s.f.Fd())
	for off := int64(0); off < s.Size; {
		start, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // no data after off
		}
		if err != nil {
			if errors.Is(err, unix.EINVAL) { // filesystem without SEEK_DATA
				return []Range{{0, s.Size}}, nil
			}
			return nil, fmt.Errorf("source %s: seek data: %w", s.Path, err)
		}
		end, err := unix.Seek(fd, start, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("source %s: seek hole: %w", s.Path, err)
		}
		out = append(out, Range{start, min(end, s.Size)})
		off = end
	}
	return out, nil
}

// readDirect reads len(buf) bytes at off straight from the device: buf must be page-aligned
// and off and len(buf) multiples of 4096, as O_DIRECT requires; a short read at the end of
// the device is fine.
func (s *Source) readDirect(buf []byte, off int64) error {
	n, err := s.f.ReadAt(buf, off)
	if int64(n) < min(int64(len(buf)), s.Size-off) {
		if err == nil || errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("read %s at %d: %w", s.Path, off, err)
	}
	return nil
}

// ReadAt reads at any offset and length; O_DIRECT's alignment is handled with a bounce
// buffer. For metadata reads (allocation maps), not the bulk copy.
func (s *Source) ReadAt(p []byte, off int64) (int, error) {
	if !s.direct {
		return s.f.ReadAt(p, off)
	}
	start := off &^ 4095
	end := alignUp(off+int64(len(p)), 4096)
	buf, err := alignedBuffer(int(end - start))
	if err != nil {
		return 0, err
	}
	defer unix.Munmap(buf)
	n, err := s.f.ReadAt(buf[:end-start], start)
	got := max(0, min(int64(n)-(off-start), int64(len(p))))
	copy(p, buf[off-start:off-start+got])
	if got < int64(len(p)) && err == nil {
		err = io.EOF
	}
	if got == int64(len(p)) {
		err = nil
	}
	return int(got), err
}

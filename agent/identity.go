package agent

import (
	"fmt"
	"io"

	"golang.org/x/sys/unix"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/capture"
	"github.com/stasis-project/stasis/chain/fsimage"
	"github.com/stasis-project/stasis/chain/fsimage/filesystems"
)

// sourceIdentity reads what names the source: its device number, where it starts on its
// disk, its size, and the UUIDs of its filesystems (the one at its start, or those of its
// partitions). A tracked chain is only continued on the same identity: a disk that was
// re-enumerated under another number, or replaced by one of the same size, gets a full scan.
// Damaged metadata does not stop a snapshot: it is recorded as unreadable.
func sourceIdentity(vol *capture.Volume, src *capture.Source) *chain.SourceIdentity {
	id := &chain.SourceIdentity{SizeBytes: src.Size}
	if !vol.IsFile {
		id.Device = fmt.Sprintf("%d:%d", unix.Major(vol.Dev), unix.Minor(vol.Dev))
		id.StartSector = vol.Start
	}
	fs, err := filesystems.Identify(src, src.Size)
	if err != nil {
		id.Filesystems = append(id.Filesystems, chain.FilesystemID{Type: "unreadable"})
		return id
	}
	if fs.Type != "" {
		id.Filesystems = append(id.Filesystems, chain.FilesystemID{Type: fs.Type, UUID: fs.UUID})
		return id
	}
	parts, _ := fsimage.Partitions(src, src.Size)
	for _, p := range parts {
		fs, err := filesystems.Identify(io.NewSectionReader(src, p.Start, p.Size), p.Size)
		switch {
		case err != nil:
			id.Filesystems = append(id.Filesystems, chain.FilesystemID{Partition: p.Index, Type: "unreadable"})
		case fs.Type != "":
			id.Filesystems = append(id.Filesystems, chain.FilesystemID{Partition: p.Index, Type: fs.Type, UUID: fs.UUID})
		}
	}
	return id
}

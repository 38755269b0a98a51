package agent

import (
	"fmt"
	"io"
	"strings"

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

// otherSource says how a source differs from the one a chain's newest snapshot was taken
// from, or "" if it may be the same: the same filesystems (type and UUID) and size, or, for
// a source without a filesystem stasis knows, the same size and path. A device number alone
// may change across reboots and does not count.
func otherSource(parent *chain.Snapshot, id *chain.SourceIdentity, source string) string {
	if parent == nil || parent.Identity == nil || id == nil {
		return ""
	}
	was := parent.Identity
	if was.SizeBytes != id.SizeBytes {
		return fmt.Sprintf("%s was %d bytes, this one is %d", parent.Source, was.SizeBytes, id.SizeBytes)
	}
	fs := func(x *chain.SourceIdentity) string {
		var parts []string
		for _, f := range x.Filesystems {
			parts = append(parts, fmt.Sprintf("%s %s", f.Type, f.UUID))
		}
		return strings.Join(parts, ", ")
	}
	switch a, b := fs(was), fs(id); {
	case a != b:
		return fmt.Sprintf("%s held %s, this one holds %s", parent.Source, orNone(a), orNone(b))
	case a == "" && parent.Source != "" && parent.Source != source:
		return fmt.Sprintf("it was %s, this is %s, and neither has a filesystem to tell them apart", parent.Source, source)
	}
	return ""
}

func orNone(s string) string {
	if s == "" {
		return "no filesystem stasis knows"
	}
	return s
}

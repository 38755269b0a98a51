package chain

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// Snapshot kinds and consistency levels, as shown by `stasis list`.
const (
	KindManual = "manual"
	KindAuto   = "auto"

	ConsistencyCrash    = "crash"     // read while the volume may have been changing
	ConsistencyFSFrozen = "fs-frozen" // every filesystem on the volume frozen for the final round
	ConsistencyApp      = "app"       // applications quiesced as well (hooks, database lock)
)

// Chunk size limits. The chunk size is fixed per volume by its first snapshot.
const (
	DefaultChunkSize = 64 << 10
	MinChunkSize     = 4 << 10
	MaxChunkSize     = 4 << 20
)

const manifestVersion = 1

// Snapshot is a committed snapshot's manifest, stored as JSON in snapshots/<id>.
// Its ID is derived from its content, so a manifest cannot change without changing its name.
type Snapshot struct {
	ID string `json:"-"`
	// Protected is not part of the manifest: Snapshots fills it in (see Protect).
	Protected bool `json:"-"`

	Format      int       `json:"format"`
	Volume      string    `json:"volume"`
	Name        string    `json:"name"`
	Kind        string    `json:"kind"`
	Consistency string    `json:"consistency"`
	Created     time.Time `json:"created"`
	SizeBytes   int64     `json:"size_bytes"`
	ChunkSize   int       `json:"chunk_size"`
	Fanout      int       `json:"fanout"`
	Root        ID        `json:"root"`
	Parent      string    `json:"parent,omitempty"`
	NewBytes    int64     `json:"new_bytes"`
	Source      string    `json:"source,omitempty"`
	Host        string    `json:"host,omitempty"`
	// Identity is what the source was when the snapshot was taken: a later snapshot of the
	// volume from another device or filesystem is not an incremental of this one.
	Identity *SourceIdentity `json:"identity,omitempty"`
	// Group names the consistency group the snapshot was taken in and GroupID that group
	// snapshot: its members were frozen in one window and share GroupID and Created.
	Group   string `json:"group,omitempty"`
	GroupID string `json:"group_id,omitempty"`
	// Tags and Note describe the snapshot for people (stasis snapshot --tag, --note).
	Tags []string `json:"tags,omitempty"`
	Note string   `json:"note,omitempty"`
	// Capture describes how the data was read (rounds, freeze time, bytes read...).
	Capture map[string]any `json:"capture,omitempty"`
	// App holds what application quiescing recorded (database flavour, binlog position...).
	App map[string]any `json:"app,omitempty"`
}

// SourceIdentity says which device and filesystems a snapshot was read from.
type SourceIdentity struct {
	Device      string         `json:"device,omitempty"` // "MAJOR:MINOR"; empty for an image file
	StartSector int64          `json:"start_sector,omitempty"`
	SizeBytes   int64          `json:"size_bytes"`
	Filesystems []FilesystemID `json:"filesystems,omitempty"`
}

// FilesystemID is one filesystem on a source: at its start (Partition 0) or in a partition.
type FilesystemID struct {
	Partition int    `json:"partition,omitempty"`
	Type      string `json:"type"`
	UUID      string `json:"uuid"`
}

// Differs says how b differs from a, or "" if they name the same source.
func (a *SourceIdentity) Differs(b *SourceIdentity) string {
	switch {
	case a == nil || b == nil:
		return "no identity was recorded"
	case a.Device != b.Device:
		return fmt.Sprintf("device %s is now %s", a.Device, b.Device)
	case a.StartSector != b.StartSector:
		return fmt.Sprintf("the partition started at sector %d, now at %d", a.StartSector, b.StartSector)
	case a.SizeBytes != b.SizeBytes:
		return fmt.Sprintf("the size was %d bytes, now %d", a.SizeBytes, b.SizeBytes)
	}
	fs := func(x *SourceIdentity) string {
		var parts []string
		for _, f := range x.Filesystems {
			parts = append(parts, fmt.Sprintf("%d:%s:%s", f.Partition, f.Type, f.UUID))
		}
		return strings.Join(parts, ",")
	}
	if fa, fb := fs(a), fs(b); fa != fb {
		return fmt.Sprintf("the filesystems were %s, now %s", orNone(fa), orNone(fb))
	}
	return ""
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

// Chunks is the number of chunks in the volume.
func (s *Snapshot) Chunks() int64 {
	return (s.SizeBytes + int64(s.ChunkSize) - 1) / int64(s.ChunkSize)
}

// MarshalText encodes an ID as hex, for JSON.
func (id ID) MarshalText() ([]byte, error) { return []byte(id.String()), nil }

// UnmarshalText decodes a hex ID.
func (id *ID) UnmarshalText(b []byte) error {
	v, err := ParseID(string(b))
	*id = v
	return err
}

// ValidName checks a volume, snapshot or host name: letters, digits and . _ @ + -, not
// starting with a punctuation character, at most 128 bytes. Names become folder names in the
// FUSE view.
func ValidName(what, name string) error {
	ok := len(name) >= 1 && len(name) <= 128
	for i := 0; ok && i < len(name); i++ {
		c := name[i]
		alnum := 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
		ok = alnum || i > 0 && strings.IndexByte("._@+-", c) >= 0
	}
	if !ok {
		return fmt.Errorf("invalid %s name %q: use 1-128 letters, digits, '.', '_', '@', '+' or '-', starting with a letter or digit", what, name)
	}
	return nil
}

// checkHost accepts what a snapshot may name its host. Another host's snapshots show as
// HOST:VOLUME folders in the view, so a '/' or a NUL in it would break the listing of
// every folder beside it. It is looser than ValidName, which a configured host: must pass:
// older snapshots name their machine's hostname as it was, "(none)" included, and must
// stay readable.
func checkHost(host string) error {
	if len(host) > 128 || strings.ContainsAny(host, "/\x00") {
		return fmt.Errorf("invalid host name %q: at most 128 bytes, without '/'", host)
	}
	return nil
}

// encodeManifest returns what to store for a manifest and its name: the hash of its JSON
// (keyed, in an encrypted repository, where the JSON is sealed and bound to that name).
func (r *Reader) encodeManifest(s *Snapshot) ([]byte, string, error) {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return nil, "", err
	}
	b = append(b, '\n')
	name := r.blobID(b).String()[:32]
	return r.sealObject(SnapshotFile, name, b), name, nil
}

// decodeManifest parses and checks a manifest read from a file named name.
func (r *Reader) decodeManifest(name string, stored []byte) (*Snapshot, error) {
	b, err := r.openObject(SnapshotFile, name, stored)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", name, err)
	}
	if r.blobID(b).String()[:32] != name {
		return nil, corruptf("snapshot %s: manifest content does not match its name", name)
	}
	var s Snapshot
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, corruptf("snapshot %s: %v", name, err)
	}
	s.ID = name
	if err := s.check(); err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", name, err)
	}
	return &s, nil
}

func (s *Snapshot) check() error {
	if s.Format != manifestVersion {
		return fmt.Errorf("manifest format %d is not supported by this stasis (it reads %d): upgrade stasis", s.Format, manifestVersion)
	}
	if err := ValidName("volume", s.Volume); err != nil {
		return corruptf("%v", err)
	}
	if err := ValidName("snapshot", s.Name); err != nil {
		return corruptf("%v", err)
	}
	if err := checkHost(s.Host); err != nil {
		return corruptf("%v", err)
	}
	if s.ChunkSize < MinChunkSize || s.ChunkSize > MaxChunkSize || s.ChunkSize&(s.ChunkSize-1) != 0 {
		return corruptf("chunk size %d invalid", s.ChunkSize)
	}
	if s.Fanout != Fanout {
		return corruptf("tree fanout %d, this stasis uses %d", s.Fanout, Fanout)
	}
	if s.SizeBytes < 0 || s.SizeBytes > 1<<60 {
		return corruptf("volume size %d out of range", s.SizeBytes)
	}
	switch s.Kind {
	case KindManual, KindAuto:
	default:
		return corruptf("unknown kind %q", s.Kind)
	}
	return nil
}

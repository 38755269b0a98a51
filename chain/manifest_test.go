package chain

import (
	"errors"
	"strings"
	"testing"
)

// TestValidName: the names that become folders in the view and keys in the repository.
func TestValidName(t *testing.T) {
	good := []string{"a", "Z", "0", "data", "db-1", "v1.2_x@host+y", strings.Repeat("a", 128)}
	bad := []string{"", ".hidden", "-x", "_x", "@x", "+x", "a/b", "a b", "a\n", "é", "a:b", "..", strings.Repeat("a", 129)}
	for _, n := range good {
		if err := ValidName("volume", n); err != nil {
			t.Errorf("%q refused: %v", n, err)
		}
	}
	for _, n := range bad {
		if err := ValidName("volume", n); err == nil {
			t.Errorf("%q accepted", n)
		}
	}
}

// TestManifestHostIsAName: a manifest naming its host with a '/' (which would break the
// view's folder listing) or with a tag that is no name is refused as damaged.
func TestManifestHostIsAName(t *testing.T) {
	plain, _ := fuzzReaders()
	for _, s := range []*Snapshot{
		{Host: "db1/../x"},
		{Host: "db1", Tags: []string{"a b"}},
	} {
		s.Format, s.Volume, s.Name, s.Kind = manifestVersion, "data", "s1", KindManual
		s.ChunkSize, s.Fanout, s.SizeBytes = DefaultChunkSize, Fanout, 1<<20
		b, name, err := plain.encodeManifest(s)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := plain.decodeManifest(name, b); !errors.Is(err, ErrCorrupt) {
			t.Errorf("manifest with host %q and tags %q: %v", s.Host, s.Tags, err)
		}
	}
}

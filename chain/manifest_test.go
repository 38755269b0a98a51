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

// TestManifestHost: a manifest naming its host with a '/' (which would break the view's
// folder listing) is refused as damaged; an odd hostname an older stasis recorded as it
// was ("(none)", the kernel's default) stays readable.
func TestManifestHost(t *testing.T) {
	plain, _ := fuzzReaders()
	for host, ok := range map[string]bool{"db1/../x": false, "a\x00b": false, "(none)": true, "": true, "db1.example.com": true} {
		s := &Snapshot{Host: host, Format: manifestVersion, Volume: "data", Name: "s1", Kind: KindManual,
			ChunkSize: DefaultChunkSize, Fanout: Fanout, SizeBytes: 1 << 20}
		b, name, err := plain.encodeManifest(s)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := plain.decodeManifest(name, b); ok != (err == nil) || !ok && !errors.Is(err, ErrCorrupt) {
			t.Errorf("manifest with host %q: %v", host, err)
		}
	}
}

package chain

import (
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

package local_test

import (
	"testing"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/backendtest"
	"github.com/stasis-project/stasis/chain/local"
)

func TestConformance(t *testing.T) {
	backendtest.Suite(t, func(t *testing.T) chain.Backend {
		b, err := local.Create(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { b.Close() })
		return b
	})
}

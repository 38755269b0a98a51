package memory_test

import (
	"testing"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/backendtest"
	"github.com/stasis-project/stasis/chain/memory"
)

func TestConformance(t *testing.T) {
	backendtest.Suite(t, func(*testing.T) chain.Backend { return memory.New() })
}

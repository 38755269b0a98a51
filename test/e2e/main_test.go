package e2e

import (
	"testing"

	"github.com/stasis-project/stasis/test/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

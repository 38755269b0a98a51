package chain

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/zeebo/blake3"
)

// TestHashIsBLAKE3 checks the pooled hasher against the one-shot function at the sizes
// around its switch-over and BLAKE3's chunk and block boundaries, with the pool reused.
func TestHashIsBLAKE3(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 1<<20+3)
	for i := range buf {
		buf[i] = byte(rng.Uint32())
	}
	for _, n := range []int{0, 1, 63, 64, 65, 1023, 1024, 1025, 2047, 2048, 4096, 8191, 8192, 8193, 65536, 1<<20 + 3} {
		for range 2 {
			if got, want := Hash(buf[:n]), ID(blake3.Sum256(buf[:n])); got != want {
				t.Fatalf("Hash of %d bytes = %s, want %s", n, got, want)
			}
		}
	}
}

func BenchmarkHash(b *testing.B) {
	for _, n := range []int{4 << 10, 64 << 10, 1 << 20} {
		buf := make([]byte, n)
		b.Run(fmt.Sprintf("%dKiB", n>>10), func(b *testing.B) {
			b.SetBytes(int64(n))
			for b.Loop() {
				Hash(buf)
			}
		})
		b.Run(fmt.Sprintf("%dKiB-Sum256", n>>10), func(b *testing.B) {
			b.SetBytes(int64(n))
			for b.Loop() {
				blake3.Sum256(buf)
			}
		})
	}
}

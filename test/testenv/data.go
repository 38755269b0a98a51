package testenv

import (
	"bytes"
	"math/rand"
	"os"
	"testing"
)

// FillMixed writes size bytes into f like a used disk: random regions, repetitive text and
// zeros in runs of 4 KiB to 256 KiB.
func FillMixed(t testing.TB, rng *rand.Rand, f *os.File, size int64) {
	t.Helper()
	text := bytes.Repeat([]byte("stasis keeps every snapshot restorable. "), 8192)
	buf := make([]byte, 256<<10)
	for off := int64(0); off < size; {
		n := min(int64(4096*(1+rng.Intn(64))), size-off)
		b := buf[:n]
		switch rng.Intn(3) {
		case 0:
			rng.Read(b)
		case 1:
			copy(b, text[rng.Intn(1000):])
		case 2:
			clear(b)
		}
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
		off += n
	}
}

// Scribble overwrites n random regions of up to 8 KiB with random bytes and returns the
// offsets written.
func Scribble(t testing.TB, rng *rand.Rand, f *os.File, size int64, n int) []int64 {
	t.Helper()
	var offs []int64
	buf := make([]byte, 8192)
	for i := 0; i < n; i++ {
		l := 1 + rng.Intn(len(buf))
		off := rng.Int63n(size - int64(l))
		rng.Read(buf[:l])
		if _, err := f.WriteAt(buf[:l], off); err != nil {
			t.Fatal(err)
		}
		offs = append(offs, off)
	}
	return offs
}

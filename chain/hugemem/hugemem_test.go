package hugemem

import (
	"testing"
	"unsafe"
)

func TestMap(t *testing.T) {
	for _, size := range []int{1, 4096, Page - 1, Page, 3*Page + 5, 40 << 20} {
		b, err := Map(size)
		if err != nil {
			t.Fatal(err)
		}
		if len(b) != size || cap(b)%Page != 0 || cap(b) < size {
			t.Fatalf("Map(%d): len %d cap %d", size, len(b), cap(b))
		}
		if p := uintptr(unsafe.Pointer(&b[0])); p%Page != 0 {
			t.Fatalf("Map(%d) at %#x, not aligned to a huge page", size, p)
		}
		full := b[:cap(b)]
		for i := range full {
			if full[i] != 0 {
				t.Fatalf("Map(%d): byte %d is %d, not zero", size, i, full[i])
			}
		}
		for i := range full {
			full[i] = byte(i)
		}
		Prefault(b, size)
		if err := Unmap(b[:0]); err != nil {
			t.Fatalf("Unmap after Map(%d): %v", size, err)
		}
	}
	if _, err := Map(0); err == nil {
		t.Fatal("Map(0) succeeded")
	}
}

// TestAdvise: advising Go heap buffers of any size and alignment is safe and leaves their
// contents alone.
func TestAdvise(t *testing.T) {
	for _, size := range []int{0, 1, 4096, Page - 1, Page, Page + 1, 3 * Page, 40 << 20} {
		for _, off := range []int{0, 1, 4095} {
			b := make([]byte, size+off)
			for i := range b {
				b[i] = byte(i)
			}
			Advise(b[off:])
			Advise(b[off:off]) // empty, with capacity
			for i := range b {
				if b[i] != byte(i) {
					t.Fatalf("size %d offset %d: byte %d changed", size, off, i)
				}
			}
		}
	}
}

// Package hugemem maps large buffers outside the Go heap, in transparent huge pages where
// the kernel allows them ("madvise" mode, a common default, or "always").
//
// A buffer's first touch costs one page fault per page. On some virtual machines a fault
// costs ~14 µs, so touching fresh memory in 4 KiB pages goes at ~290 MB/s, slower than the
// disks being read; in 2 MiB pages the same memory costs 512 times fewer faults. Read
// buffers and the final round's held chunks come from here: the frozen window then does
// not pay for faulting in the memory it reads into.
package hugemem

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Page is the size of a transparent huge page on x86-64 and arm64 with 4 KiB base pages.
const Page = 2 << 20

// Map returns size bytes of zeroed, private memory aligned to Page, advised to be backed
// by huge pages, with cap rounded up to a multiple of Page. Memory is committed as it is
// touched. Release it with Unmap, passing the slice Map returned.
func Map(size int) ([]byte, error) {
	if size <= 0 {
		return nil, fmt.Errorf("map %d bytes: size must be positive", size)
	}
	n := alignUp(uintptr(size), Page)
	// Reserve one page more than needed, then give back the unaligned head and tail.
	raw, err := unix.MmapPtr(-1, 0, nil, n+Page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("map %d bytes: %w", size, err)
	}
	start := uintptr(raw)
	aligned := alignUp(start, Page)
	if head := aligned - start; head > 0 {
		unix.MunmapPtr(raw, head)
	}
	if tail := start + n + Page - (aligned + n); tail > 0 {
		unix.MunmapPtr(unsafe.Add(raw, aligned-start+n), tail)
	}
	b := unsafe.Slice((*byte)(unsafe.Add(raw, aligned-start)), n)
	// Advice only: without transparent huge pages the memory works in small pages.
	unix.Madvise(b, unix.MADV_HUGEPAGE)
	return b[:size], nil
}

// Unmap releases a buffer from Map. b must be the slice Map returned (or a reslice of it
// starting at its first byte); no reference into it may be used afterwards.
func Unmap(b []byte) error {
	if cap(b) == 0 {
		return nil
	}
	b = b[:cap(b)]
	return unix.MunmapPtr(unsafe.Pointer(&b[0]), uintptr(len(b)))
}

// Advise asks for the huge-page-aligned part of b (Go heap memory, say) to be backed by
// huge pages when it is first touched; pages already touched stay as they are.
func Advise(b []byte) {
	if cap(b) == 0 {
		return
	}
	b = b[:cap(b)]
	start := uintptr(unsafe.Pointer(&b[0]))
	lo, hi := alignUp(start, Page), (start+uintptr(len(b)))/Page*Page
	if lo < hi {
		unix.Madvise(b[lo-start:hi-start], unix.MADV_HUGEPAGE)
	}
}

// Make returns an empty Go heap buffer of capacity n that starts on a Page boundary,
// advised to be backed by huge pages: all of it fills in huge pages, where Advise on a
// plain make([]byte) leaves the unaligned head and tail in small ones (half of a 4 MiB
// buffer, say). It reserves up to one Page more address space; the runtime does not
// touch memory fresh from the system, so the spare does not become resident.
func Make(n int) []byte {
	raw := make([]byte, n+Page)
	head := int(alignUp(uintptr(unsafe.Pointer(&raw[0])), Page) - uintptr(unsafe.Pointer(&raw[0])))
	b := raw[head : head : head+n]
	Advise(b)
	return b
}

// Prefault touches the first n bytes of b, so that later writes there fault no more.
func Prefault(b []byte, n int) {
	b = b[:min(n, cap(b))]
	for i := 0; i < len(b); i += 4096 {
		b[i] = 0
	}
}

func alignUp(n, a uintptr) uintptr { return (n + a - 1) / a * a }

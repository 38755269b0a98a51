package fsimage

import (
	"errors"
	"testing"
)

type mapFunc func(off int64) (int64, int64, error)

func (f mapFunc) Map(off int64) (int64, int64, error) { return f(off) }

// TestMapWithin: answers that stay on the device pass as they are; an empty one, or mapped
// bytes past the device's end, are corruption; the reader's own errors pass through.
func TestMapWithin(t *testing.T) {
	const size = 1 << 20
	for _, tc := range []struct {
		phys, n int64
		err     error
		corrupt bool
	}{
		{phys: 4096, n: 8192},
		{phys: size - 10, n: 10},
		{phys: -1, n: 1 << 62}, // a hole may run on past anything
		{phys: 0, n: 0, corrupt: true},
		{phys: size - 10, n: 11, corrupt: true},
		{phys: size + 1, n: 1, corrupt: true},
		{phys: 1, n: 1<<63 - 1, corrupt: true}, // no overflow into a pass
		{err: ErrNotMapped},
	} {
		phys, n, err := MapWithin(mapFunc(func(int64) (int64, int64, error) { return tc.phys, tc.n, tc.err }), 0, size)
		switch {
		case tc.err != nil:
			if !errors.Is(err, tc.err) {
				t.Errorf("%+v: %v, want the reader's error", tc, err)
			}
		case tc.corrupt:
			if !errors.Is(err, ErrCorrupt) {
				t.Errorf("%+v: %v, want corruption", tc, err)
			}
		case err != nil || phys != tc.phys || n != tc.n:
			t.Errorf("%+v: %d %d %v, want it as it is", tc, phys, n, err)
		}
	}
}

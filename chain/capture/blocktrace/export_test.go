package blocktrace

import (
	"os"
	"path/filepath"
	"testing"
)

// Pause switches the instance's completion events off, so writes meanwhile go unseen as
// they would on a device whose driver does not report them.
func (t *Tracker) Pause(tb testing.TB) { t.setEvents(tb, "0") }

// Resume switches them on again.
func (t *Tracker) Resume(tb testing.TB) { t.setEvents(tb, "1") }

func (t *Tracker) setEvents(tb testing.TB, v string) {
	for _, e := range t.events {
		if err := os.WriteFile(filepath.Join(t.dir, "events/block", e, "enable"), []byte(v), 0); err != nil {
			tb.Fatal(err)
		}
	}
}

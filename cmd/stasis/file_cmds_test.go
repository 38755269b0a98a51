package main

import (
	"testing"

	"github.com/stasis-project/stasis/chain"
)

func TestSplitFileRef(t *testing.T) {
	for _, c := range []struct{ ref, snap, path string }{
		{"data/daily:/etc/a:b", "data/daily", "/etc/a:b"},
		{"web1:data/daily:/etc", "web1:data/daily", "/etc"},
		{"web1:data/daily", "web1:data/daily", ""},
		{"data/daily", "data/daily", ""},
		{"3f2a9c:/etc", "3f2a9c", "/etc"},
		{"data/daily:", "data/daily", ""},
	} {
		snap, p, has := splitFileRef(c.ref)
		if snap != c.snap || p != c.path || has != (c.path != "" || c.ref[len(c.ref)-1] == ':' || c.ref == "3f2a9c:/etc") {
			t.Errorf("splitFileRef(%q) = %q, %q, %v", c.ref, snap, p, has)
		}
	}
	snaps := []*chain.Snapshot{{Host: "web1", Volume: "data"}, {Host: "db1", Volume: "mysql"}}
	for _, c := range []struct{ ref, host, volume, path string }{
		{"data:/etc/x", "me", "data", "/etc/x"},
		{"web1:data:/etc/x", "web1", "data", "/etc/x"},
		{"data:/odd:name", "me", "data", "/odd:name"},
		{"web1:mysql:/x", "me", "web1", "mysql:/x"}, // web1 has no volume mysql: a volume "web1"
	} {
		h, v, p, err := splitVolumePath(snaps, "me", c.ref)
		if err != nil || h != c.host || v != c.volume || p != c.path {
			t.Errorf("splitVolumePath(%q) = %q, %q, %q, %v", c.ref, h, v, p, err)
		}
	}
	if _, _, _, err := splitVolumePath(snaps, "me", "data"); err == nil {
		t.Error("a volume without a path was accepted")
	}
}

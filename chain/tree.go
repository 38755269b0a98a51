package chain

import (
	"context"
	"encoding/binary"
	"fmt"
)

// A snapshot's block map is a tree of pages. A leaf (level 0) page holds the chunk IDs of
// Fanout consecutive chunks; a page at level k holds the IDs of Fanout pages at level k-1.
// ZeroID stands for an all-zero chunk or subtree, so sparse volumes cost almost nothing.
// Pages are blobs like chunks: an incremental snapshot writes only the pages on the paths to
// changed chunks, and every unchanged subtree is shared with the parent by content.
//
// Page encoding (version 1):
//
//	"SP" | version u8 = 1 | level u8 | count u16 | count × ID
//
// count omits trailing zero entries.

// Fanout is the number of entries per tree page in format version 1.
const Fanout = 512

const pageHeader = 6

func encodePage(level int, entries []ID) []byte {
	n := len(entries)
	for n > 0 && entries[n-1].IsZero() {
		n--
	}
	b := make([]byte, pageHeader, pageHeader+n*32)
	copy(b, "SP")
	b[2] = 1
	b[3] = byte(level)
	binary.LittleEndian.PutUint16(b[4:], uint16(n))
	for _, e := range entries[:n] {
		b = append(b, e[:]...)
	}
	return b
}

// decodePage parses a page expected at level, returning Fanout entries.
func decodePage(b []byte, level int) ([]ID, error) {
	if len(b) < pageHeader || string(b[:2]) != "SP" {
		return nil, corruptf("tree page has no page header")
	}
	if b[2] != 1 {
		return nil, corruptf("tree page version %d is not supported", b[2])
	}
	if int(b[3]) != level {
		return nil, corruptf("tree page is at level %d, expected %d", b[3], level)
	}
	n := int(binary.LittleEndian.Uint16(b[4:]))
	if n > Fanout || len(b) != pageHeader+32*n {
		return nil, corruptf("tree page claims %d entries in %d bytes", n, len(b))
	}
	entries := make([]ID, Fanout)
	for i := 0; i < n; i++ {
		copy(entries[i][:], b[pageHeader+32*i:])
	}
	return entries, nil
}

// treeDepth is the number of levels needed to map n chunks (at least 1).
func treeDepth(n int64) int {
	d := 1
	for span := int64(Fanout); span < n; span *= Fanout {
		d++
	}
	return d
}

// pageLoader reads tree pages; the reader of committed trees needs only that.
type pageLoader interface {
	loadPage(ctx context.Context, id ID, level int) ([]ID, error)
}

// pageStore also stores pages, for the builder.
type pageStore interface {
	pageLoader
	storePage(ctx context.Context, level int, entries []ID) (ID, error)
}

// treeBuilder edits a block map, starting from a base tree, writing only the pages it changes.
// Not safe for concurrent use.
type treeBuilder struct {
	store    pageStore
	chunks   int64
	depth    int
	base     ID
	dirty    []map[int64][]ID // per level: pages being edited
	maxDirty int              // leaves kept in memory before flushing
}

func newTreeBuilder(store pageStore, chunks int64, base ID) *treeBuilder {
	t := &treeBuilder{store: store, chunks: chunks, depth: treeDepth(chunks), base: base, maxDirty: 256}
	t.dirty = make([]map[int64][]ID, t.depth)
	for i := range t.dirty {
		t.dirty[i] = map[int64][]ID{}
	}
	return t
}

// page returns the editable page at (level, idx), loading it and its ancestors from the base.
func (t *treeBuilder) page(ctx context.Context, level int, idx int64) ([]ID, error) {
	if p, ok := t.dirty[level][idx]; ok {
		return p, nil
	}
	var id ID
	if level == t.depth-1 {
		id = t.base
	} else {
		parent, err := t.page(ctx, level+1, idx/Fanout)
		if err != nil {
			return nil, err
		}
		id = parent[idx%Fanout]
	}
	var p []ID
	if id.IsZero() {
		p = make([]ID, Fanout)
	} else {
		var err error
		if p, err = t.store.loadPage(ctx, id, level); err != nil {
			return nil, err
		}
	}
	t.dirty[level][idx] = p
	return p, nil
}

// set records chunk i's ID.
func (t *treeBuilder) set(ctx context.Context, i int64, id ID) error {
	if i < 0 || i >= t.chunks {
		return fmt.Errorf("chunk %d outside the volume (%d chunks)", i, t.chunks)
	}
	leaf := i / Fanout
	p, err := t.page(ctx, 0, leaf)
	if err != nil {
		return err
	}
	p[i%Fanout] = id
	if len(t.dirty[0]) > t.maxDirty {
		return t.flush(ctx, 0, leaf)
	}
	return nil
}

// flush stores every dirty page at level except the one at keep (-1 for none) and records
// their IDs in their parents.
func (t *treeBuilder) flush(ctx context.Context, level int, keep int64) error {
	for idx, p := range t.dirty[level] {
		if idx == keep {
			continue
		}
		id, err := t.store.storePage(ctx, level, p)
		if err != nil {
			return err
		}
		parent, err := t.page(ctx, level+1, idx/Fanout)
		if err != nil {
			return err
		}
		parent[idx%Fanout] = id
		delete(t.dirty[level], idx)
	}
	return nil
}

// commit stores all remaining pages and returns the root ID.
func (t *treeBuilder) commit(ctx context.Context) (ID, error) {
	for level := 0; level < t.depth-1; level++ {
		if err := t.flush(ctx, level, -1); err != nil {
			return ID{}, err
		}
	}
	root, ok := t.dirty[t.depth-1][0]
	if !ok {
		return t.base, nil
	}
	return t.store.storePage(ctx, t.depth-1, root)
}

// treeReader looks up chunk IDs in a committed tree.
type treeReader struct {
	store  pageLoader
	root   ID
	chunks int64
	depth  int
}

func newTreeReader(store pageLoader, root ID, chunks int64) *treeReader {
	return &treeReader{store: store, root: root, chunks: chunks, depth: treeDepth(chunks)}
}

// lookup returns chunk i's ID.
func (r *treeReader) lookup(ctx context.Context, i int64) (ID, error) {
	if i < 0 || i >= r.chunks {
		return ID{}, fmt.Errorf("chunk %d outside the volume (%d chunks)", i, r.chunks)
	}
	id := r.root
	span := int64(1)
	for l := 1; l < r.depth; l++ {
		span *= Fanout
	}
	for level := r.depth - 1; level >= 0; level-- {
		if id.IsZero() {
			return ZeroID, nil
		}
		p, err := r.store.loadPage(ctx, id, level)
		if err != nil {
			return ID{}, err
		}
		id = p[(i/span)%Fanout]
		span /= Fanout
	}
	return id, nil
}

// walk calls fn in chunk order for every non-zero chunk, and page for every page visited
// (before its children). Zero subtrees are skipped without I/O. If page returns false the
// page's subtree is not descended.
func (r *treeReader) walk(ctx context.Context, page func(id ID, level int) bool, fn func(i int64, id ID) error) error {
	var rec func(id ID, level int, first int64) error
	rec = func(id ID, level int, first int64) error {
		if id.IsZero() || first >= r.chunks {
			return nil
		}
		if level < 0 {
			return fn(first, id)
		}
		if page != nil && !page(id, level) {
			return nil
		}
		entries, err := r.store.loadPage(ctx, id, level)
		if err != nil {
			return err
		}
		span := int64(1)
		for l := 0; l < level; l++ {
			span *= Fanout
		}
		for k, e := range entries {
			if err := rec(e, level-1, first+int64(k)*span); err != nil {
				return err
			}
		}
		return nil
	}
	return rec(r.root, r.depth-1, 0)
}

// diffTrees calls fn, in chunk order, for every chunk whose ID in b differs from a's (b's
// ID, ZeroID for an all-zero chunk). Both trees have the same number of chunks and live in
// one repository, so equal page IDs mean equal subtrees, which are skipped without I/O.
func diffTrees(ctx context.Context, a, b *treeReader, fn func(i int64, id ID) error) error {
	if a.chunks != b.chunks {
		return fmt.Errorf("diff of trees of %d and %d chunks", a.chunks, b.chunks)
	}
	zeroPage := make([]ID, Fanout)
	load := func(id ID, level int) ([]ID, error) {
		if id.IsZero() {
			return zeroPage, nil
		}
		return b.store.loadPage(ctx, id, level)
	}
	var rec func(ida, idb ID, level int, first int64) error
	rec = func(ida, idb ID, level int, first int64) error {
		if ida == idb || first >= b.chunks {
			return nil
		}
		if level < 0 {
			return fn(first, idb)
		}
		pa, err := load(ida, level)
		if err != nil {
			return err
		}
		pb, err := load(idb, level)
		if err != nil {
			return err
		}
		if len(pa) != len(pb) {
			return corruptf("block-map pages of %d and %d entries at level %d", len(pa), len(pb), level)
		}
		span := int64(1)
		for l := 0; l < level; l++ {
			span *= Fanout
		}
		for k := range pb {
			if err := rec(pa[k], pb[k], level-1, first+int64(k)*span); err != nil {
				return err
			}
		}
		return nil
	}
	return rec(a.root, b.root, b.depth-1, 0)
}

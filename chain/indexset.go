package chain

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"

	"github.com/bits-and-blooms/bloom/v3"
	lru "github.com/hashicorp/golang-lru/v2"
)

// indexSet finds blobs. Every index file is kept as a checked plaintext copy in a local
// cache directory (decrypted, and in version 2 layout), searched by binary search on disk,
// with a Bloom filter in memory (about 10 bits per blob) that says which files may hold a
// blob: memory grows with the filters only, not with the entries. Index files never change
// (their names are hashes), so copies and filters are made once and kept across runs.
// Safe for concurrent use.
type indexSet struct {
	r   *Reader
	dir string // this repository's cache directory
	tmp string // a private cache to remove at close, or ""

	mu       sync.Mutex
	loaded   bool
	files    map[string]*indexFile // by index file name
	listed   map[string]bool       // every index file name at the last refresh
	bad      map[string]error      // index files that could not be read
	found    *lru.Cache[ID, blobLoc]
	refreshM sync.Mutex // one refresh at a time
}

// indexFile is one index file's checked local copy.
type indexFile struct {
	name   string
	f      *os.File
	disk   *diskIndex
	filter *bloom.BloomFilter
}

// blobLoc is where one copy of a blob is stored.
type blobLoc struct {
	pack     ID
	packSize int64
	e        packEntry
}

// foundCacheSize bounds the answers the set remembers (about 100 bytes each).
const foundCacheSize = 16384

// filterFP is the filters' false-positive rate: a false positive costs one binary search.
const filterFP = 0.01

func newIndexSet(ctx context.Context, r *Reader, cacheDir string) (*indexSet, error) {
	x := &indexSet{r: r, files: map[string]*indexFile{}, bad: map[string]error{}}
	x.found, _ = lru.New[ID, blobLoc](foundCacheSize)
	if cacheDir == "" {
		d, err := os.MkdirTemp("", "stasis-cache-")
		if err != nil {
			return nil, fmt.Errorf("index cache: %w", err)
		}
		cacheDir, x.tmp = d, d
	}
	x.dir = filepath.Join(cacheDir, r.cfg.ID, "index")
	if err := os.MkdirAll(x.dir, 0o700); err != nil {
		return nil, fmt.Errorf("index cache %s: %w", x.dir, err)
	}
	return x, nil
}

func (x *indexSet) close() {
	x.mu.Lock()
	defer x.mu.Unlock()
	for _, f := range x.files {
		f.f.Close()
	}
	x.files = map[string]*indexFile{}
	x.loaded = false
	if x.tmp != "" {
		os.RemoveAll(x.tmp)
	}
}

// ensure loads the set on first use.
func (x *indexSet) ensure(ctx context.Context) error {
	x.mu.Lock()
	loaded := x.loaded
	x.mu.Unlock()
	if loaded {
		return nil
	}
	return x.refresh(ctx)
}

// refresh opens index files that appeared since the last call and forgets removed ones (a
// gc replaces them). Files that cannot be read are kept in bad, for verify and gc.
func (x *indexSet) refresh(ctx context.Context) error {
	x.refreshM.Lock()
	defer x.refreshM.Unlock()
	listed := map[string]int64{}
	if err := x.r.be.List(ctx, IndexFile, func(fi FileInfo) error {
		listed[fi.Name] = fi.Size
		return nil
	}); err != nil {
		return fmt.Errorf("list index files: %w", err)
	}
	x.mu.Lock()
	old := x.files
	x.mu.Unlock()
	next := map[string]*indexFile{}
	bad := map[string]error{}
	for name, size := range listed {
		if f, ok := old[name]; ok {
			next[name] = f
			continue
		}
		f, err := x.open(ctx, name, size)
		if errors.Is(err, ErrNotExist) {
			delete(listed, name) // removed by a concurrent gc after it wrote its replacement
			continue
		}
		if err != nil {
			bad[name] = err
			x.r.log.Warn("damaged index file skipped; run `stasis verify`", "file", name, "err", err)
			continue
		}
		next[name] = f
	}
	names := map[string]bool{}
	for name := range listed {
		names[name] = true
	}
	x.mu.Lock()
	for name, f := range old {
		if _, ok := next[name]; !ok {
			f.f.Close()
			os.Remove(filepath.Join(x.dir, name))
			os.Remove(filepath.Join(x.dir, name+".bloom"))
		}
	}
	x.files, x.listed, x.bad, x.loaded = next, names, bad, true
	x.mu.Unlock()
	x.found.Purge() // a gc may have moved blobs
	return nil
}

// open returns the index file's local copy, making it (download, check, decrypt, convert,
// filter) if it is not cached yet.
func (x *indexSet) open(ctx context.Context, name string, size int64) (*indexFile, error) {
	id, err := ParseID(name)
	if err != nil {
		return nil, corruptf("index file %q: bad name", name)
	}
	path := filepath.Join(x.dir, name)
	if f, err := x.openCached(path); err == nil {
		return f, nil
	}
	stored, err := x.r.be.ReadAll(ctx, Handle{Type: IndexFile, Name: name})
	if err != nil {
		return nil, err
	}
	if Hash(stored) != id {
		return nil, corruptf("index file %s: content does not match its name", id.Short())
	}
	plain, err := x.r.openIndexFile(stored)
	if err != nil {
		return nil, fmt.Errorf("index file %s: %w", id.Short(), err)
	}
	if err := x.writeCache(path, plain); err != nil {
		return nil, err
	}
	return x.openCached(path)
}

// openIndexFile decrypts an index file and converts a version 1 file to version 2.
func (r *Reader) openIndexFile(stored []byte) ([]byte, error) {
	plain := stored
	if r.keys != nil {
		var err error
		if plain, err = r.keys.open(nil, stored, indexAAD); err != nil {
			return nil, err
		}
	}
	if len(plain) >= 8 && string(plain[:8]) == indexMagicV1 {
		packs, err := decodeIndex(plain)
		if err != nil {
			return nil, err
		}
		return encodeIndex(packs), nil
	}
	if _, err := decodeIndexHeader(plain, int64(len(plain))); err != nil {
		return nil, err
	}
	return plain, nil
}

// indexAAD binds a sealed index file to its role (its name is the hash of what is stored).
var indexAAD = []byte("stasis index file v2")

// writeCache stores a checked plaintext copy and its filter, atomically.
func (x *indexSet) writeCache(path string, plain []byte) error {
	h, err := decodeIndexHeader(plain, int64(len(plain)))
	if err != nil {
		return err
	}
	filter := bloom.NewWithEstimates(uint(max(h.count, 1)), filterFP)
	for i := int64(0); i < int64(h.count); i++ {
		rec := plain[h.blobs+i*indexBlobSize:]
		filter.Add(rec[5 : 5+32])
	}
	var fb bytes.Buffer
	if _, err := filter.WriteTo(&fb); err != nil {
		return err
	}
	for _, w := range []struct {
		path string
		data []byte
	}{{path + ".bloom", fb.Bytes()}, {path, plain}} { // the filter first: a copy without one is not used
		tmp, err := os.CreateTemp(x.dir, ".tmp-")
		if err != nil {
			return fmt.Errorf("index cache: %w", err)
		}
		_, err = tmp.Write(w.data)
		if cerr := tmp.Close(); err == nil {
			err = cerr
		}
		if err == nil {
			err = os.Rename(tmp.Name(), w.path)
		}
		if err != nil {
			os.Remove(tmp.Name())
			return fmt.Errorf("index cache: %w", err)
		}
	}
	return nil
}

// openCached opens a cached copy, checking it against its own checksum.
func (x *indexSet) openCached(path string) (*indexFile, error) {
	fb, err := os.ReadFile(path + ".bloom")
	if err != nil {
		return nil, err
	}
	filter := &bloom.BloomFilter{}
	if _, err := filter.ReadFrom(bytes.NewReader(fb)); err != nil {
		return nil, err
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	read := func(_ context.Context, p []byte, off int64) (int, error) { return f.ReadAt(p, off) }
	d, err := openDiskIndex(context.Background(), st.Size(), read)
	if err != nil {
		f.Close()
		os.Remove(path)
		return nil, err
	}
	return &indexFile{name: filepath.Base(path), f: f, disk: d, filter: filter}, nil
}

// snapshot returns the open files, loading the set on first use.
func (x *indexSet) snapshot(ctx context.Context) ([]*indexFile, error) {
	if err := x.ensure(ctx); err != nil {
		return nil, err
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	out := make([]*indexFile, 0, len(x.files))
	for _, f := range x.files {
		out = append(out, f)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out, nil
}

// lookup finds one location of blob id.
func (x *indexSet) lookup(ctx context.Context, id ID) (blobLoc, bool, error) {
	if l, ok := x.found.Get(id); ok {
		return l, true, nil
	}
	files, err := x.snapshot(ctx)
	if err != nil {
		return blobLoc{}, false, err
	}
	for _, f := range files {
		if !f.filter.Test(id[:]) {
			continue
		}
		locs, err := f.disk.all(ctx, id)
		if err != nil {
			return blobLoc{}, false, err
		}
		if len(locs) > 0 {
			x.found.Add(id, locs[0])
			return locs[0], true, nil
		}
	}
	return blobLoc{}, false, nil
}

// locations finds every indexed copy of blob id.
func (x *indexSet) locations(ctx context.Context, id ID) ([]blobLoc, error) {
	files, err := x.snapshot(ctx)
	if err != nil {
		return nil, err
	}
	var out []blobLoc
	for _, f := range files {
		if !f.filter.Test(id[:]) {
			continue
		}
		locs, err := f.disk.all(ctx, id)
		if err != nil {
			return nil, err
		}
		out = append(out, locs...)
	}
	return out, nil
}

// changed reports whether the set of index files in the backend differs from the one
// loaded: only then is refreshing worth it (a damaged snapshot asks again and again).
func (x *indexSet) changed(ctx context.Context) bool {
	x.mu.Lock()
	listed := x.listed
	x.mu.Unlock()
	changed, n := false, 0
	err := x.r.be.List(ctx, IndexFile, func(fi FileInfo) error {
		n++
		if !listed[fi.Name] {
			changed = true
		}
		return nil
	})
	return err != nil || changed || n != len(listed)
}

// add makes an index file just written by this process known without a refresh.
func (x *indexSet) add(name string, plain []byte) error {
	path := filepath.Join(x.dir, name)
	if err := x.writeCache(path, plain); err != nil {
		return err
	}
	f, err := x.openCached(path)
	if err != nil {
		return err
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	if old, ok := x.files[name]; ok {
		old.f.Close()
	}
	x.files[name] = f
	if x.listed != nil {
		x.listed[name] = true
	}
	return nil
}

// badFiles returns the index files that could not be read at the last refresh.
func (x *indexSet) badFiles(ctx context.Context) (map[string]error, error) {
	if err := x.ensure(ctx); err != nil {
		return nil, err
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	out := make(map[string]error, len(x.bad))
	for k, v := range x.bad {
		out[k] = v
	}
	return out, nil
}

// packBytes sums the sizes of the packs the index names.
func (x *indexSet) packBytes() int64 {
	files, err := x.snapshot(context.Background())
	if err != nil {
		return 0
	}
	seen := map[ID]bool{}
	var n int64
	for _, f := range files {
		for i, p := range f.disk.hdr.packs {
			if !seen[p] {
				seen[p] = true
				n += f.disk.hdr.sizes[i]
			}
		}
	}
	return n
}

// eachEntry calls fn for every entry of every index file, a file at a time, without
// holding them in memory.
func (x *indexSet) eachEntry(ctx context.Context, fn func(file string, loc blobLoc) error) error {
	files, err := x.snapshot(ctx)
	if err != nil {
		return err
	}
	for _, f := range files {
		if err := f.disk.each(ctx, func(l blobLoc) error { return fn(f.name, l) }); err != nil {
			return err
		}
	}
	return nil
}

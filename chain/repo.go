// Package chain stores snapshots of block devices as incremental chains in a repository.
//
// A repository holds content-addressed blobs (volume chunks and block-map pages) packed into
// pack files, index files that say where each blob is, and one manifest per snapshot. Every
// snapshot has a complete block map, so deleting any snapshot never changes another; blobs
// nobody references any more are reclaimed by GC. Snapshots are written without any lock,
// by any number of hosts at once; only deletion takes one. A repository may be encrypted.
// See docs/FORMAT.md.
package chain

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
)

// RepoConfig is the repository's config file, kept in the clear (an encrypted repository's
// is authenticated by MAC under its master key).
type RepoConfig struct {
	Format      string    `json:"format"`
	Version     int       `json:"version"`
	ID          string    `json:"id"`
	Created     time.Time `json:"created"`
	Encryption  string    `json:"encryption,omitempty"`  // "" or Encryption
	Compression string    `json:"compression,omitempty"` // a codec name (codec.go); "" is zstd
	MAC         string    `json:"mac,omitempty"`
}

const (
	repoFormat  = "stasis-repository"
	repoVersion = 2 // version 1 repositories (unencrypted, zstd) are read and written as well
)

// Sentinel errors, tested with errors.Is.
var (
	ErrNotRepository = errors.New("not a stasis repository")
	ErrVersion       = errors.New("unsupported repository format version")
	ErrExists        = errors.New("repository already exists")
	ErrNotFound      = errors.New("snapshot not found")
	ErrNotLocked     = errors.New("repository deletion lock not held")
	ErrProtected     = errors.New("snapshot is protected")
	ErrInUse         = errors.New("a snapshot being taken builds on it")
)

// Options say how to open a repository.
type Options struct {
	Log *slog.Logger
	// Password returns the passphrase of an encrypted repository; it is called only for
	// one. nil: an encrypted repository cannot be opened (ErrNeedPassword).
	Password func() ([]byte, error)
	// CacheDir keeps decrypted, checked copies of index files and their filters between
	// runs (they never change). "": a private temporary directory, removed by Close.
	CacheDir string
	// Host names this machine in heartbeats and locks ("" for os.Hostname).
	Host string
}

// Reader reads a repository: its snapshots, their volumes, capacity figures and checks. Its
// memory does not grow with the repository: blobs are found through index files on disk
// and small filters. Safe for concurrent use.
type Reader struct {
	be    Backend
	log   *slog.Logger
	cfg   RepoConfig
	keys  *suite // nil: unencrypted
	keyID string // the key file that opened it
	host  string
	codec codec

	index *indexSet
	pages *lru.Cache[ID, []ID] // decoded tree pages, shared by every reader

	mu            sync.Mutex
	manifests     map[string]*Snapshot // decoded manifests by file name, from the last listing
	deletionLease *lease               // the deletion lock's lease, where there is one

	leaseIDs  sync.Map     // IDs of this process's leases
	clockSkew atomic.Int64 // this machine's clock minus the storage's, in ns (leases.go)
}

// Repository is a Reader that also writes: snapshots (without any lock) and, holding the
// deletion lock, deletes, gc and repair.
type Repository struct {
	*Reader
	mu     sync.Mutex
	locked bool
}

// InitOptions describe a new repository.
type InitOptions struct {
	// Password, if not nil, makes the repository encrypted, with one key for it.
	Password []byte
	KDF      KDF
	// Compression is the codec for new blobs ("" for the default).
	Compression string
	// SameKeysAs, if set, makes an encrypted repository with the same master secret (and so
	// the same blob IDs) as this one: copies between them stay incremental.
	SameKeysAs *Reader
}

// Init creates a new repository in be and returns its config.
func Init(ctx context.Context, be Backend, opts InitOptions) (RepoConfig, error) {
	if _, err := be.Stat(ctx, Handle{Type: ConfigFile}); err == nil {
		return RepoConfig{}, fmt.Errorf("%s: %w", be.Location(), ErrExists)
	}
	if _, err := codecByName(opts.Compression); err != nil {
		return RepoConfig{}, err
	}
	id := make([]byte, 16)
	rand.Read(id)
	cfg := RepoConfig{Format: repoFormat, Version: repoVersion, ID: hex.EncodeToString(id), Created: time.Now().UTC().Truncate(time.Second),
		Compression: opts.Compression}
	var master []byte
	if opts.SameKeysAs != nil {
		src := opts.SameKeysAs
		if src.keys == nil {
			return RepoConfig{}, fmt.Errorf("%s is not encrypted: there are no keys to copy", src.Location())
		}
		if opts.Password == nil {
			return RepoConfig{}, fmt.Errorf("a repository sharing keys is encrypted: give it a passphrase")
		}
		master = src.keys.master
	} else if opts.Password != nil {
		master = make([]byte, 32)
		rand.Read(master)
	}
	if master != nil {
		cfg.Encryption = Encryption
		s, err := newSuite(master)
		if err != nil {
			return RepoConfig{}, err
		}
		kf, err := newKeyFile(cfg.ID, master, opts.Password, opts.KDF)
		if err != nil {
			return RepoConfig{}, err
		}
		if err := saveKeyFile(ctx, be, kf); err != nil {
			return RepoConfig{}, err
		}
		cfg.MAC = hex.EncodeToString(s.mac(configMACInput(cfg)))
	}
	b, _ := json.MarshalIndent(cfg, "", "  ")
	return cfg, be.Save(ctx, Handle{Type: ConfigFile}, append(b, '\n'))
}

// configMACInput is what an encrypted repository's config MAC covers: every field but the
// MAC, so that nobody without the key can turn encryption off or swap the repository ID.
func configMACInput(c RepoConfig) []byte {
	c.MAC = ""
	b, _ := json.Marshal(c)
	return b
}

// OpenReader opens a repository for reading.
func OpenReader(ctx context.Context, be Backend, opts Options) (*Reader, error) {
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	b, err := be.ReadAll(ctx, Handle{Type: ConfigFile})
	if errors.Is(err, ErrNotExist) {
		return nil, fmt.Errorf("%s has no config file: %w; create one with `stasis init -r %s`", be.Location(), ErrNotRepository, be.Location())
	}
	if err != nil {
		return nil, fmt.Errorf("read repository config: %w", err)
	}
	cfg, err := decodeConfig(be.Location(), b)
	if err != nil {
		return nil, err
	}
	c, _ := codecByName(cfg.Compression) // checked by decodeConfig
	pages, _ := lru.New[ID, []ID](1024)
	r := &Reader{be: be, log: opts.Log, cfg: cfg, pages: pages, codec: c, host: opts.Host}
	if r.host == "" {
		r.host, _ = os.Hostname()
	}
	if err := r.unlock(ctx, opts.Password); err != nil {
		return nil, err
	}
	if r.index, err = newIndexSet(ctx, r, opts.CacheDir); err != nil {
		return nil, err
	}
	return r, nil
}

// decodeConfig parses a repository's config file. The repository ID names this host's cache
// directory for it, so it must be what Init writes (32 hex digits), never a path: a config
// altered to say "../../srv" would otherwise make stasis write and delete files there.
func decodeConfig(location string, b []byte) (RepoConfig, error) {
	var cfg RepoConfig
	if err := json.Unmarshal(b, &cfg); err != nil || cfg.Format != repoFormat {
		return RepoConfig{}, fmt.Errorf("%s: config file is not a stasis repository config: %w", location, ErrNotRepository)
	}
	if cfg.Version != 1 && cfg.Version != repoVersion {
		return RepoConfig{}, fmt.Errorf("%s: format version %d, this stasis reads versions 1 and %d: %w; use a stasis release that supports it", location, cfg.Version, repoVersion, ErrVersion)
	}
	if id, err := hex.DecodeString(cfg.ID); err != nil || len(id) != 16 || hex.EncodeToString(id) != cfg.ID {
		return RepoConfig{}, corruptf("%s: the config's repository ID %q is not 32 lowercase hex digits: the config was altered; restore it from a copy", location, cfg.ID)
	}
	if _, err := codecByName(cfg.Compression); err != nil {
		return RepoConfig{}, fmt.Errorf("%s: %w", location, err)
	}
	return cfg, nil
}

// Open opens a repository for reading and writing.
func Open(ctx context.Context, be Backend, opts Options) (*Repository, error) {
	r, err := OpenReader(ctx, be, opts)
	if err != nil {
		return nil, err
	}
	return &Repository{Reader: r}, nil
}

// unlock checks the config's encryption against the key files, and opens an encrypted
// repository with the passphrase.
func (r *Reader) unlock(ctx context.Context, password func() ([]byte, error)) error {
	keys, err := listKeyFiles(ctx, r.be)
	if err != nil {
		return err
	}
	switch {
	case r.cfg.Encryption == "" && len(keys) == 0:
		return nil
	case r.cfg.Encryption == "":
		return corruptf("%s has key files but its config says it is not encrypted: the config was altered; restore it from a copy", r.Location())
	case r.cfg.Encryption != Encryption:
		return fmt.Errorf("%s: encryption %q is not supported by this stasis: %w", r.Location(), r.cfg.Encryption, ErrVersion)
	case len(keys) == 0:
		return corruptf("%s is encrypted but has no key files", r.Location())
	case password == nil:
		return ErrNeedPassword
	}
	pw, err := password()
	if err != nil {
		return err
	}
	for _, kf := range keys {
		if master, ok := kf.unwrap(r.cfg.ID, pw); ok {
			s, err := newSuite(master)
			if err != nil {
				return err
			}
			if hex.EncodeToString(s.mac(configMACInput(r.cfg))) != r.cfg.MAC {
				return corruptf("%s: the config does not match its MAC: it was altered", r.Location())
			}
			r.keys, r.keyID = s, kf.ID
			return nil
		}
	}
	return ErrWrongPassword
}

// Close releases the backend's handles and a temporary cache.
func (r *Reader) Close() error {
	r.index.close()
	return r.be.Close()
}

// KeyID names the key file whose passphrase opened an encrypted repository.
func (r *Reader) KeyID() string { return r.keyID }

// Config returns the repository's config.
func (r *Reader) Config() RepoConfig { return r.cfg }

// Encrypted reports whether the repository is encrypted.
func (r *Reader) Encrypted() bool { return r.keys != nil }

// Backend returns the backend the repository is stored in.
func (r *Reader) Backend() Backend { return r.be }

// Location names the repository for messages.
func (r *Reader) Location() string { return r.be.Location() }

// Host is the name this repository handle writes into manifests, heartbeats and locks.
func (r *Reader) Host() string { return r.host }

// blobID is the ID of a blob's content: BLAKE3, keyed in an encrypted repository.
func (r *Reader) blobID(b []byte) ID {
	if r.keys != nil {
		return r.keys.keyedID(b)
	}
	return Hash(b)
}

// sealObject turns a metadata object's plaintext into what is stored, bound to its name.
func (r *Reader) sealObject(t FileType, name string, plain []byte) []byte {
	if r.keys == nil {
		return plain
	}
	return r.keys.seal(nil, plain, []byte(string(t)+"/"+name))
}

// openObject reverses sealObject.
func (r *Reader) openObject(t FileType, name string, stored []byte) ([]byte, error) {
	if r.keys == nil {
		return stored, nil
	}
	plain, err := r.keys.open(nil, stored, []byte(string(t)+"/"+name))
	if err != nil {
		return nil, fmt.Errorf("%s/%s: %w", t, name, err)
	}
	return plain, nil
}

// Lock takes the deletion lock (delete, prune, gc, repair). holder describes this process
// for a refused caller, for example "pid 123 (stasis gc) on host-a since 2026-11-23T10:00:00Z".
// Snapshots take no lock.
func (r *Repository) Lock(ctx context.Context, holder string) (unlock func(), err error) {
	// A backend's own lock (flock on a directory) first, then always the lease: on a
	// shared filesystem where flock does not work across machines (some NFS setups), the
	// lease still keeps two deleters apart.
	var release func() error
	if l, ok := r.be.(Locker); ok {
		flock, err := l.Lock(ctx, holder)
		if err != nil {
			return nil, err
		}
		lease, err := leaseLock(ctx, r.Reader, holder)
		if err != nil {
			flock()
			return nil, err
		}
		release = func() error { lease(); return flock() }
	} else if release, err = leaseLock(ctx, r.Reader, holder); err != nil {
		return nil, err
	}
	r.mu.Lock()
	r.locked = true
	r.mu.Unlock()
	return func() {
		r.mu.Lock()
		r.locked = false
		r.mu.Unlock()
		release()
	}, nil
}

func (r *Repository) checkLocked() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.locked {
		return ErrNotLocked
	}
	return nil
}

// Snapshots lists every readable snapshot, oldest first. Manifests that cannot be read are
// skipped and returned as errors in bad (verify reports them).
func (r *Reader) Snapshots(ctx context.Context) (snaps []*Snapshot, bad []error, err error) {
	// A manifest never changes (its name is its hash), so one read per repository
	// lifetime is enough: the agent and the mount list snapshots often.
	r.mu.Lock()
	known := r.manifests
	r.mu.Unlock()
	type protections struct {
		ids map[string]bool
		err error
	}
	protectedc := make(chan protections, 1) // listed meanwhile: one round trip less on S3
	go func() {
		ids, err := r.Protected(ctx)
		protectedc <- protections{ids, err}
	}()
	seen := make(map[string]*Snapshot, len(known))
	err = r.be.List(ctx, SnapshotFile, func(fi FileInfo) error {
		name := fi.Name
		s, ok := known[name]
		if !ok {
			s = r.cachedManifest(name)
		}
		if s == nil {
			b, err := r.be.ReadAll(ctx, Handle{Type: SnapshotFile, Name: name})
			if errors.Is(err, ErrNotExist) {
				return nil // deleted meanwhile
			}
			if err != nil {
				return err
			}
			if s, err = r.decodeManifest(name, b); err != nil {
				bad = append(bad, err)
				return nil
			}
			r.cacheManifest(name, b)
		}
		seen[name] = s
		c := *s // callers get their own copy to keep
		snaps = append(snaps, &c)
		return nil
	})
	p := <-protectedc
	if err != nil {
		return nil, nil, fmt.Errorf("list snapshots: %w", err)
	}
	if p.err != nil {
		return nil, nil, p.err
	}
	r.mu.Lock()
	r.manifests = seen
	r.mu.Unlock()
	for _, s := range snaps {
		s.Protected = p.ids[s.ID]
	}
	if entries, err := os.ReadDir(r.manifestCache()); err == nil { // deleted snapshots' copies
		for _, e := range entries {
			if _, ok := seen[e.Name()]; !ok {
				os.Remove(filepath.Join(r.manifestCache(), e.Name()))
			}
		}
	}
	SortSnapshots(snaps)
	return snaps, bad, nil
}

// manifestCache is where checked manifests are kept between runs (as stored: sealed in an
// encrypted repository), beside the index cache: a manifest never changes for its name.
func (r *Reader) manifestCache() string {
	return filepath.Join(filepath.Dir(r.index.dir), "snapshots")
}

// cachedManifest returns the cached manifest name, checked as if just downloaded, or nil.
func (r *Reader) cachedManifest(name string) *Snapshot {
	b, err := os.ReadFile(filepath.Join(r.manifestCache(), name))
	if err != nil {
		return nil
	}
	s, err := r.decodeManifest(name, b)
	if err != nil {
		os.Remove(filepath.Join(r.manifestCache(), name)) // damaged copy: fetch again
		return nil
	}
	return s
}

// cacheManifest keeps a downloaded manifest; failing to is harmless.
func (r *Reader) cacheManifest(name string, stored []byte) {
	dir := r.manifestCache()
	if os.MkdirAll(dir, 0o700) != nil {
		return
	}
	tmp, err := os.CreateTemp(dir, ".tmp-")
	if err != nil {
		return
	}
	_, err = tmp.Write(stored)
	if cerr := tmp.Close(); err == nil && cerr == nil {
		if os.Rename(tmp.Name(), filepath.Join(dir, name)) == nil {
			return
		}
	}
	os.Remove(tmp.Name())
}

// SortSnapshots orders snapshots oldest first (ties by ID, so the order is total).
func SortSnapshots(snaps []*Snapshot) {
	sort.Slice(snaps, func(i, j int) bool {
		if !snaps[i].Created.Equal(snaps[j].Created) {
			return snaps[i].Created.Before(snaps[j].Created)
		}
		return snaps[i].ID < snaps[j].ID
	})
}

// Find resolves a reference: a snapshot ID or unique ID prefix (at least 4 digits), or
// [HOST:]VOLUME/NAME; without HOST, host is meant (this machine, usually), or any host if
// only one has that volume.
func Find(snaps []*Snapshot, host, ref string) (*Snapshot, error) {
	if vol, name, ok := strings.Cut(ref, "/"); ok {
		h, v := SplitVolume(host, vol)
		var found []*Snapshot
		for _, s := range snaps {
			if s.Volume == v && s.Name == name && (s.Host == h || s.Host == "") {
				return s, nil
			}
			if s.Volume == v && s.Name == name && !strings.Contains(vol, ":") {
				found = append(found, s)
			}
		}
		if len(found) == 1 {
			return found[0], nil
		}
		if len(found) > 1 {
			return nil, fmt.Errorf("%w: %q exists on several hosts (%s and others): write HOST:%s", ErrNotFound, ref, found[0].Host, ref)
		}
		return nil, fmt.Errorf("%w: no snapshot named %q in volume %q (see `stasis list`)", ErrNotFound, name, vol)
	}
	if len(ref) < 4 {
		return nil, fmt.Errorf("%w: %q: give at least 4 digits of the ID, or VOLUME/NAME", ErrNotFound, ref)
	}
	var found *Snapshot
	for _, s := range snaps {
		if strings.HasPrefix(s.ID, ref) {
			if found != nil {
				return nil, fmt.Errorf("%w: ID prefix %q matches several snapshots; give more digits", ErrNotFound, ref)
			}
			found = s
		}
	}
	if found == nil {
		return nil, fmt.Errorf("%w: no snapshot has an ID starting with %q (see `stasis list`)", ErrNotFound, ref)
	}
	return found, nil
}

// SplitVolume splits "HOST:VOLUME"; a plain VOLUME belongs to defaultHost.
func SplitVolume(defaultHost, ref string) (host, volume string) {
	if h, v, ok := strings.Cut(ref, ":"); ok {
		return h, v
	}
	return defaultHost, ref
}

// Latest returns the newest snapshot of host's volume, or nil. Chains are per host and
// volume: two hosts may both have a volume "data".
func Latest(snaps []*Snapshot, host, volume string) *Snapshot {
	var last *Snapshot
	for _, s := range snaps {
		if s.Volume == volume && (s.Host == host || s.Host == "") {
			last = s
		}
	}
	return last
}

// OfHost returns host's snapshots (and those written before snapshots named their host),
// in the same order. Retention, parents and automatic names are per host: a fleet shares
// one repository.
func OfHost(snaps []*Snapshot, host string) []*Snapshot {
	var out []*Snapshot
	for _, s := range snaps {
		if s.Host == host || s.Host == "" {
			out = append(out, s)
		}
	}
	return out
}

// Protected returns the IDs of protected snapshots (see Protect).
func (r *Reader) Protected(ctx context.Context) (map[string]bool, error) {
	out := map[string]bool{}
	err := r.be.List(ctx, ProtectFile, func(fi FileInfo) error {
		out[fi.Name] = true
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list protected snapshots: %w", err)
	}
	return out, nil
}

// Protect keeps s from Delete (and so from retention) until it is unprotected. It takes
// no lock: a protection written while a deletion runs either is seen by it or comes after
// the snapshot is gone (and then protects nothing; gc removes it).
func (r *Repository) Protect(ctx context.Context, s *Snapshot, on bool) error {
	h := Handle{Type: ProtectFile, Name: s.ID}
	if _, err := r.be.Stat(ctx, h); err == nil && on {
		return nil
	}
	if !on {
		if err := r.be.Remove(ctx, h); err != nil && !errors.Is(err, ErrNotExist) {
			return err
		}
		return nil
	}
	b, _ := json.Marshal(map[string]any{"protected": time.Now().UTC()})
	return r.be.Save(ctx, h, r.sealObject(ProtectFile, s.ID, b))
}

// Delete removes snapshots' manifests, with the deletion lock held. Their blobs stay until
// GC; no other snapshot changes. A protected snapshot is refused (ErrProtected), and so is
// the parent of a snapshot being taken (ErrInUse: the writer references its chunks without
// storing them again, and gc cannot see an unfinished snapshot's references); then nothing
// is deleted. A writer that names one of them as its parent while Delete runs gets it
// back: its manifest is saved again, and Delete fails with ErrInUse.
func (r *Repository) Delete(ctx context.Context, snaps ...*Snapshot) error {
	if err := r.checkLocked(); err != nil {
		return err
	}
	protected, err := r.Protected(ctx)
	if err != nil {
		return err
	}
	for _, s := range snaps {
		if protected[s.ID] {
			return fmt.Errorf("%s/%s: %w; `stasis unprotect %s/%s` first", s.Volume, s.Name, ErrProtected, s.Volume, s.Name)
		}
	}
	inUse := func(s *Snapshot, who string) error {
		return fmt.Errorf("%s/%s: %w (%s); delete it when that snapshot has finished", s.Volume, s.Name, ErrInUse, who)
	}
	building, err := r.parentsInUse(ctx)
	if err != nil {
		return err
	}
	for _, s := range snaps {
		if who, ok := building[s.ID]; ok {
			return inUse(s, who)
		}
	}
	saved := map[string][]byte{}
	for _, s := range snaps {
		h := Handle{Type: SnapshotFile, Name: s.ID}
		b, err := r.be.ReadAll(ctx, h)
		if errors.Is(err, ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("delete snapshot %s/%s: %w", s.Volume, s.Name, err)
		}
		saved[s.ID] = b
		if err := r.be.Remove(ctx, h); err != nil && !errors.Is(err, ErrNotExist) {
			return fmt.Errorf("delete snapshot %s/%s: %w", s.Volume, s.Name, err)
		}
	}
	// A writer that started meanwhile chose its parent before the removal and names it
	// after the check above; it confirms the parent after naming it, so one of the two
	// sees the other. Put back what such a writer builds on (or everything, if unsure).
	building, err = r.parentsInUse(ctx)
	var refused error
	for _, s := range snaps {
		who, used := building[s.ID]
		if b := saved[s.ID]; b != nil && (used || err != nil) {
			if serr := r.be.Save(ctx, Handle{Type: SnapshotFile, Name: s.ID}, b); serr != nil {
				return fmt.Errorf("delete snapshot %s/%s: it may be in use by a snapshot being taken, and putting it back failed: %w", s.Volume, s.Name, serr)
			}
			if used && refused == nil {
				refused = inUse(s, who)
			}
		}
	}
	if err != nil {
		return fmt.Errorf("delete snapshots: list the snapshots being taken: %w; nothing was deleted", err)
	}
	return refused
}

// parentsInUse maps the ID of each snapshot a live writer builds on to that writer.
func (r *Reader) parentsInUse(ctx context.Context) (map[string]string, error) {
	writers, _, err := listHolders(ctx, r, WriterFile)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, w := range writers {
		if w.info.Parent != "" {
			out[w.info.Parent] = fmt.Sprintf("%s, pid %d on %s", w.info.Holder, w.info.PID, w.info.Host)
		}
	}
	return out, nil
}

// PackBytes is the total size of the pack files the index names: cheap, no tree walk.
func (r *Reader) PackBytes() int64 { return r.index.packBytes() }

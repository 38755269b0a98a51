package chain_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"strings"
	"testing"

	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/memory"
)

var testKDF = chain.TuneKDF(0) // cheap parameters: the tests open many times

func password(pw string) func() ([]byte, error) {
	return func() ([]byte, error) { return []byte(pw), nil }
}

func newEncryptedRepo(t *testing.T) (*chain.Repository, *memory.Backend) {
	t.Helper()
	be := memory.New()
	if _, err := chain.Init(context.Background(), be, chain.InitOptions{Password: []byte("correct horse"), KDF: testKDF}); err != nil {
		t.Fatal(err)
	}
	return openRepo(t, be, chain.Options{Password: password("correct horse")}), be
}

// markerVolume is a volume whose chunks carry a recognisable plaintext marker.
func markerVolume(rng *rand.Rand, marker string) *volume {
	v := newVolume(rng, 2<<20, 16<<10)
	for off := 0; off+len(marker) < len(v.data); off += 16 << 10 {
		copy(v.data[off+100:], marker)
	}
	return v
}

// TestEncryptedRoundTrip: an encrypted repository stores, reads, deletes and collects like
// a plain one; its files hold none of the volume's plaintext, nor its names.
func TestEncryptedRoundTrip(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewSource(21))
	r, be := newEncryptedRepo(t)
	if !r.Encrypted() {
		t.Fatal("the repository does not say it is encrypted")
	}
	const marker = "TOP-SECRET-MARKER-7f3a"
	v := markerVolume(rng, marker)
	a := v.snapshotOf(t, r, "payroll-db", "before-upgrade", false, nil)
	want := append([]byte(nil), v.data...)
	v.scribble(rng, 30)
	b := v.snapshotOf(t, r, "payroll-db", "after", false, nil)
	if !bytes.Equal(readAll(t, r.Reader, a), want) || !bytes.Equal(readAll(t, r.Reader, b), v.data) {
		t.Fatal("an encrypted snapshot reads back different bytes")
	}
	for h, data := range be.Files() {
		for _, secret := range []string{marker, "payroll-db", "before-upgrade", "the quick brown fox"} {
			if bytes.Contains(data, []byte(secret)) {
				t.Errorf("%s holds %q in the clear", h, secret)
			}
		}
	}
	unlock, _ := r.Lock(ctx, "t")
	r.Delete(ctx, a)
	unlock()
	gc(t, r)
	if rep, err := r.Verify(ctx, true, nil); err != nil || !rep.OK() {
		t.Fatalf("verify: %v %v", err, rep.Problems)
	}
	if !bytes.Equal(readAll(t, r.Reader, b), v.data) {
		t.Fatal("after gc the encrypted snapshot reads back different bytes")
	}
	// A second process opens it with the passphrase only.
	r2 := openRepo(t, be, chain.Options{Password: password("correct horse")})
	snaps, _, _ := r2.Snapshots(ctx)
	if len(snaps) != 1 || !bytes.Equal(readAll(t, r2.Reader, snaps[0]), v.data) {
		t.Fatalf("reopened: %d snapshots", len(snaps))
	}
}

// TestWrongOrMissingPassword: one clear error, never a decoding error from deep inside.
func TestWrongOrMissingPassword(t *testing.T) {
	ctx := context.Background()
	_, be := newEncryptedRepo(t)
	if _, err := chain.Open(ctx, be, chain.Options{Password: password("wrong"), CacheDir: t.TempDir()}); !errors.Is(err, chain.ErrWrongPassword) {
		t.Fatalf("wrong passphrase: %v", err)
	}
	if _, err := chain.Open(ctx, be, chain.Options{CacheDir: t.TempDir()}); !errors.Is(err, chain.ErrNeedPassword) {
		t.Fatalf("no passphrase: %v", err)
	}
}

// TestKeyedIDs: the same content gets different blob IDs in repositories with different
// keys (the storage's holder cannot confirm guesses), and the same IDs in one made with
// the same keys, so copies between them stay incremental.
func TestKeyedIDs(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewSource(22))
	v := newVolume(rng, 1<<20, 16<<10)
	roots := map[string]chain.ID{}
	r1, _ := newEncryptedRepo(t)
	roots["r1"] = v.snapshot(t, r1, "s", false, nil).Root
	r2, _ := newEncryptedRepo(t)
	roots["r2"] = v.snapshot(t, r2, "s", false, nil).Root
	plain, _ := newRepo(t)
	roots["plain"] = v.snapshot(t, plain, "s", false, nil).Root
	be3 := memory.New()
	if _, err := chain.Init(ctx, be3, chain.InitOptions{Password: []byte("another"), KDF: testKDF, SameKeysAs: r1.Reader}); err != nil {
		t.Fatal(err)
	}
	r3 := openRepo(t, be3, chain.Options{Password: password("another")})
	roots["r3"] = v.snapshot(t, r3, "s", false, nil).Root
	if roots["r1"] == roots["r2"] || roots["r1"] == roots["plain"] || roots["r2"] == roots["plain"] {
		t.Fatalf("block maps share IDs across keys: %v", roots)
	}
	if roots["r1"] != roots["r3"] {
		t.Fatal("a repository made with the same keys gives other IDs")
	}
}

// tamperable lists the objects of each kind in an encrypted repository.
func objectsOf(be *memory.Backend, t chain.FileType) []chain.Handle {
	var out []chain.Handle
	for h := range be.Files() {
		if h.Type == t {
			out = append(out, h)
		}
	}
	return out
}

// TestTamperDetected: a flipped bit in any object is reported as damage of that object —
// by opening, reading or verify — and never yields wrong bytes.
func TestTamperDetected(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewSource(23))
	for _, kind := range []chain.FileType{chain.PackFile, chain.IndexFile, chain.SnapshotFile, chain.KeyFileType, chain.ConfigFile} {
		t.Run(string(kind), func(t *testing.T) {
			r, be := newEncryptedRepo(t)
			v := newVolume(rng, 1<<20, 16<<10)
			s := v.snapshot(t, r, "s", false, nil)
			hs := objectsOf(be, kind)
			if len(hs) == 0 {
				t.Fatalf("no %s objects", kind)
			}
			h := hs[0]
			size, _ := be.Stat(ctx, h)
			for _, off := range []int64{size / 2, size - 1} {
				be.Corrupt(h, int(off))
				fresh, err := chain.Open(ctx, be, chain.Options{Password: password("correct horse"), CacheDir: t.TempDir()})
				be.Corrupt(h, int(off)) // undo for the next offset
				if kind == chain.KeyFileType || kind == chain.ConfigFile {
					if err == nil || strings.Contains(err.Error(), "panic") {
						t.Fatalf("opened with a damaged %s: %v", kind, err)
					}
					continue
				}
				if err != nil {
					t.Fatal(err)
				}
				be.Corrupt(h, int(off))
				got := make([]byte, s.SizeBytes)
				snaps, bad, _ := fresh.Snapshots(ctx)
				readErr := errors.New("not read")
				if len(snaps) == 1 {
					_, readErr = fresh.SnapshotReader(snaps[0]).ReadAt(ctx, got, 0)
				}
				rep, verr := fresh.Verify(ctx, true, nil)
				be.Corrupt(h, int(off))
				if readErr == nil && !bytes.Equal(got, v.data) {
					t.Fatalf("a damaged %s gave wrong bytes", kind)
				}
				if verr != nil || rep.OK() && len(bad) == 0 {
					t.Fatalf("damage to %s at %d not reported: verify %v, problems %v, bad manifests %v", kind, off, verr, rep.Problems, bad)
				}
			}
		})
	}
}

// TestSwappedObjectsDetected: a manifest copied under another valid name, or a blob moved
// to another ID, fails authentication: an attacker with write access cannot replay an old
// manifest as a new snapshot or substitute one chunk for another.
func TestSwappedObjectsDetected(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewSource(24))
	r, be := newEncryptedRepo(t)
	v := newVolume(rng, 1<<20, 16<<10)
	a := v.snapshot(t, r, "a", false, nil)
	v.scribble(rng, 50)
	b := v.snapshot(t, r, "b", false, nil)
	// Replay a's manifest under b's name.
	ma, _ := be.ReadAll(ctx, chain.Handle{Type: chain.SnapshotFile, Name: a.ID})
	be.Save(ctx, chain.Handle{Type: chain.SnapshotFile, Name: b.ID}, ma)
	fresh := openRepo(t, be, chain.Options{Password: password("correct horse")})
	snaps, bad, _ := fresh.Snapshots(ctx)
	if len(bad) != 1 || len(snaps) != 1 || snaps[0].ID != a.ID {
		t.Fatalf("a replayed manifest was accepted: %d good, bad %v", len(snaps), bad)
	}
	// Move one blob's sealed bytes over another's (same length) inside a pack.
	if !chain.SwapTwoBlobs(t, fresh, be) {
		t.Skip("no two blobs of equal stored length")
	}
	rep, err := fresh.Verify(ctx, true, nil)
	if err != nil || rep.OK() {
		t.Fatalf("swapped blobs not detected: %v %v", err, rep.Problems)
	}
}

// TestKeyManagement: keys can be added, a passphrase changed (re-wrapping the master key
// only) and a key removed, the last one never; every snapshot stays readable.
func TestKeyManagement(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewSource(25))
	r, be := newEncryptedRepo(t)
	v := newVolume(rng, 1<<20, 16<<10)
	s := v.snapshot(t, r, "s", false, nil)
	before := be.Files()
	k2, err := r.AddKey(ctx, []byte("second"), testKDF)
	if err != nil {
		t.Fatal(err)
	}
	for h := range before {
		if h.Type != chain.KeyFileType && !bytes.Equal(before[h], be.Files()[h]) {
			t.Fatalf("adding a key rewrote %s", h)
		}
	}
	keys, _ := r.Keys(ctx)
	if len(keys) != 2 {
		t.Fatalf("%d keys", len(keys))
	}
	r2 := openRepo(t, be, chain.Options{Password: password("second")})
	if got := readAll(t, r2.Reader, s); !bytes.Equal(got, v.data) {
		t.Fatal("the second key reads other bytes")
	}
	// Remove the first key: the old passphrase no longer opens it.
	first := keys[0]
	if first.ID == k2.ID {
		first = keys[1]
	}
	if err := r2.RemoveKey(ctx, first.ID[:8]); err != nil {
		t.Fatal(err)
	}
	if _, err := chain.Open(ctx, be, chain.Options{Password: password("correct horse"), CacheDir: t.TempDir()}); !errors.Is(err, chain.ErrWrongPassword) {
		t.Fatalf("removed key still opens: %v", err)
	}
	if err := r2.RemoveKey(ctx, k2.ID); err == nil || !strings.Contains(err.Error(), "only key") {
		t.Fatalf("removing the last key: %v", err)
	}
}

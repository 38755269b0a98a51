package chain

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/user"
	"runtime"
	"sync"
	"time"

	"github.com/zeebo/blake3"
	"golang.org/x/crypto/argon2"
)

// An encrypted repository has one master secret, generated at init. Every object that
// reveals content is sealed with AES-256-GCM under a key derived from it, with a fresh
// random 96-bit nonce, and bound to its name or ID by the associated data; blob IDs are
// BLAKE3 hashes keyed by another derived key, so they do not let the storage's holder
// confirm guesses about content. Each user key (a passphrase stretched with Argon2id)
// wraps the master secret in a key file; any one opens the repository. See FORMAT.md.

// Encryption names the one construction stasis uses.
const Encryption = "aes-256-gcm"

// sealOverhead is what sealing adds: the nonce and the tag.
const sealOverhead = 12 + 16

// ErrWrongPassword is returned when no key file opens with the given passphrase.
var ErrWrongPassword = errors.New("wrong passphrase: no key of the repository opens with it")

// ErrNeedPassword is returned for an encrypted repository opened without a passphrase.
var ErrNeedPassword = errors.New("the repository is encrypted: give its passphrase (--password-file, STASIS_PASSWORD_FILE, or type it)")

// suite is an unlocked repository's keys.
type suite struct {
	master []byte // for --copy-keys-from and new key files
	aead   cipher.AEAD
	idKey  [32]byte
	macKey [32]byte
	// ids keeps keyed hashers for keyedID: setting one up costs more than the 32 bytes
	// it hashes, once per chunk.
	ids sync.Pool
}

func newSuite(master []byte) (*suite, error) {
	if len(master) != 32 {
		return nil, fmt.Errorf("master key of %d bytes", len(master))
	}
	var enc [32]byte
	s := &suite{master: append([]byte(nil), master...)}
	blake3.DeriveKey("stasis 2026-12 data encryption", master, enc[:])
	blake3.DeriveKey("stasis 2026-12 blob ids", master, s.idKey[:])
	blake3.DeriveKey("stasis 2026-12 metadata mac", master, s.macKey[:])
	block, err := aes.NewCipher(enc[:])
	if err != nil {
		return nil, err
	}
	if s.aead, err = cipher.NewGCM(block); err != nil {
		return nil, err
	}
	return s, nil
}

// seal appends nonce, ciphertext and tag of plain to dst.
func (s *suite) seal(dst, plain, aad []byte) []byte {
	n := len(dst)
	dst = append(dst, make([]byte, 12)...)
	if _, err := rand.Read(dst[n:]); err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return s.aead.Seal(dst, dst[n:], plain, aad)
}

// open authenticates and decrypts sealed (as seal made it) into dst.
func (s *suite) open(dst, sealed, aad []byte) ([]byte, error) {
	if len(sealed) < sealOverhead {
		return nil, corruptf("sealed object of %d bytes is too short", len(sealed))
	}
	out, err := s.aead.Open(dst, sealed[:12], sealed[12:], aad)
	if err != nil {
		return nil, corruptf("authentication failed: the object was altered, damaged, or moved from another name")
	}
	return out, nil
}

// keyedID is a blob ID in an encrypted repository: keyed BLAKE3 of the content's BLAKE3
// hash. Without the key, nobody can compute the ID of content they guess; and it costs
// what the unkeyed hash costs (the whole-input hash runs at full SIMD speed, the keyed
// step hashes 32 bytes).
func (s *suite) keyedID(b []byte) ID {
	sum := Hash(b)
	h, _ := s.ids.Get().(*blake3.Hasher)
	if h == nil {
		h, _ = blake3.NewKeyed(s.idKey[:])
	}
	h.Reset() // keeps the key
	h.Write(sum[:])
	var id ID
	h.Sum(id[:0])
	s.ids.Put(h)
	return id
}

// mac authenticates metadata the repository keeps in the clear (its config).
func (s *suite) mac(b []byte) []byte {
	h, _ := blake3.NewKeyed(s.macKey[:])
	h.Write(b)
	return h.Sum(nil)
}

// KDF are a key file's Argon2id parameters.
type KDF struct {
	Time    uint32 `json:"time"`
	Memory  uint32 `json:"memory_kib"`
	Threads uint8  `json:"threads"`
}

// KeyFile is one user key: the master secret wrapped by a key derived from a passphrase.
type KeyFile struct {
	ID      string    `json:"-"`
	Created time.Time `json:"created"`
	Host    string    `json:"host,omitempty"`
	User    string    `json:"user,omitempty"`
	KDFName string    `json:"kdf"`
	KDF     KDF       `json:"kdf_params"`
	Salt    []byte    `json:"salt"`
	Data    []byte    `json:"data"` // nonce | AES-256-GCM(master secret) | tag
}

// wrapAAD binds a key file to its repository: a key file copied from another repository
// does not open this one.
func wrapAAD(repoID string) []byte { return []byte("stasis key file v1 " + repoID) }

func userKey(password []byte, salt []byte, p KDF) cipher.AEAD {
	k := argon2.IDKey(password, salt, p.Time, p.Memory, p.Threads, 32)
	block, _ := aes.NewCipher(k)
	aead, _ := cipher.NewGCM(block)
	return aead
}

// newKeyFile wraps master under password.
func newKeyFile(repoID string, master, password []byte, p KDF) (*KeyFile, error) {
	salt := make([]byte, 16)
	nonce := make([]byte, 12)
	if _, err := rand.Read(salt); err != nil {
		return nil, err
	}
	rand.Read(nonce)
	kf := &KeyFile{Created: time.Now().UTC().Truncate(time.Second), KDFName: "argon2id", KDF: p, Salt: salt}
	kf.Host, _ = os.Hostname()
	if u, err := user.Current(); err == nil {
		kf.User = u.Username
	}
	kf.Data = userKey(password, salt, p).Seal(nonce, nonce, master, wrapAAD(repoID))
	return kf, nil
}

// unwrap returns the master secret if password opens the key file.
func (kf *KeyFile) unwrap(repoID string, password []byte) ([]byte, bool) {
	if kf.KDFName != "argon2id" || len(kf.Data) < sealOverhead || len(kf.Salt) < 8 {
		return nil, false
	}
	master, err := userKey(password, kf.Salt, kf.KDF).Open(nil, kf.Data[:12], kf.Data[12:], wrapAAD(repoID))
	return master, err == nil
}

// decodeKeyFile parses a key file, bounding its parameters: a hostile key file must not
// make a client allocate gigabytes or spin for hours.
func decodeKeyFile(name string, b []byte) (*KeyFile, error) {
	var kf KeyFile
	if err := json.Unmarshal(b, &kf); err != nil {
		return nil, corruptf("key file %s: %v", name, err)
	}
	p := kf.KDF
	if p.Time < 1 || p.Time > 100 || p.Memory < 8 || p.Memory > 4<<20 || p.Threads < 1 || p.Threads > 64 {
		return nil, corruptf("key file %s: Argon2id parameters %+v out of range", name, p)
	}
	kf.ID = name
	return &kf, nil
}

// TuneKDF finds Argon2id parameters that take about target on this machine: 64 MiB of
// memory, every core, and as many passes as fit.
func TuneKDF(target time.Duration) KDF {
	p := KDF{Time: 1, Memory: 64 << 10, Threads: uint8(min(runtime.NumCPU(), 4))}
	if target < 50*time.Millisecond { // for tests: cheap, still Argon2id
		return KDF{Time: 1, Memory: 8 << 10, Threads: 1}
	}
	salt := make([]byte, 16)
	start := time.Now()
	argon2.IDKey([]byte("calibration"), salt, p.Time, p.Memory, p.Threads, 32)
	one := time.Since(start)
	if one > 0 {
		p.Time = uint32(max(1, min(100, int(target/one))))
	}
	return p
}

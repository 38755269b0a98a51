package chain

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
)

// Key files are stored in the clear: they hold only the Argon2id parameters, a salt and the
// wrapped master secret, which opens only with the passphrase and only for this repository.

func saveKeyFile(ctx context.Context, be Backend, kf *KeyFile) error {
	b, _ := json.MarshalIndent(kf, "", "  ")
	name := make([]byte, 16)
	rand.Read(name)
	kf.ID = hex.EncodeToString(name)
	return be.Save(ctx, Handle{Type: KeyFileType, Name: kf.ID}, append(b, '\n'))
}

func listKeyFiles(ctx context.Context, be Backend) ([]*KeyFile, error) {
	var out []*KeyFile
	err := be.List(ctx, KeyFileType, func(fi FileInfo) error {
		b, err := be.ReadAll(ctx, Handle{Type: KeyFileType, Name: fi.Name})
		if errors.Is(err, ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		kf, err := decodeKeyFile(fi.Name, b)
		if err != nil {
			return err
		}
		out = append(out, kf)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list key files: %w", err)
	}
	sort.Slice(out, func(i, j int) bool {
		return out[i].Created.Before(out[j].Created) || out[i].Created.Equal(out[j].Created) && out[i].ID < out[j].ID
	})
	return out, nil
}

// Keys lists the key files of an encrypted repository.
func (r *Reader) Keys(ctx context.Context) ([]*KeyFile, error) { return listKeyFiles(ctx, r.be) }

// AddKey adds a key opening the repository with password. Nothing else is rewritten.
func (r *Repository) AddKey(ctx context.Context, password []byte, p KDF) (*KeyFile, error) {
	if r.keys == nil {
		return nil, fmt.Errorf("%s is not encrypted: it has no keys", r.Location())
	}
	kf, err := newKeyFile(r.cfg.ID, r.keys.master, password, p)
	if err != nil {
		return nil, err
	}
	return kf, saveKeyFile(ctx, r.be, kf)
}

// RemoveKey removes key file id (a unique prefix will do); the last key cannot go.
func (r *Repository) RemoveKey(ctx context.Context, id string) error {
	keys, err := listKeyFiles(ctx, r.be)
	if err != nil {
		return err
	}
	var found *KeyFile
	for _, k := range keys {
		if len(id) >= 4 && k.ID[:min(len(k.ID), len(id))] == id {
			if found != nil {
				return fmt.Errorf("key ID prefix %q matches several keys; give more digits", id)
			}
			found = k
		}
	}
	if found == nil {
		return fmt.Errorf("no key has an ID starting with %q (see `stasis key list`)", id)
	}
	if len(keys) == 1 {
		return fmt.Errorf("key %s is the repository's only key: add another first, or nobody could open it", found.ID[:8])
	}
	return r.be.Remove(ctx, Handle{Type: KeyFileType, Name: found.ID})
}

package chain

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// The decoders of every repository file take untrusted bytes: they must return an error,
// never panic or allocate without bound, and what they accept must re-encode identically.

// fuzzReaders are a plain and an encrypted reader (a fixed test key), for decoding.
func fuzzReaders() (*Reader, *Reader) {
	plain := &Reader{log: slog.New(slog.DiscardHandler), codec: codecs["zstd"]}
	keys, _ := newSuite(bytes.Repeat([]byte{7}, 32))
	return plain, &Reader{log: plain.log, codec: plain.codec, keys: keys}
}

func seedPack(r *Reader) []byte {
	p := newPackBuilder()
	raw := bytes.Repeat([]byte("chunk data "), 500)
	id := r.blobID(raw)
	stored, c := r.encodeBlob(id, raw, nil)
	p.add(DataBlob, id, stored, c, len(raw))
	page := encodePage(0, []ID{id, {}, r.blobID([]byte("x"))})
	pid := r.blobID(page)
	stored, c = r.encodeBlob(pid, page, nil)
	p.add(TreeBlob, pid, stored, c, len(page))
	b, _ := p.finish(r.keys)
	return b
}

func FuzzDecodePack(f *testing.F) {
	plain, sealed := fuzzReaders()
	f.Add(seedPack(plain))
	f.Add(seedPack(sealed))
	f.Add([]byte(packMagic + "\x01\x00\x00\x00\x00\x00\x00\x00" + "\x00\x00\x00\x00\x00\x00\x00\x00" + packEndMagic))
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, r := range []*Reader{plain, sealed} {
			entries, err := decodePackTrailer(b, r.keys)
			if err != nil {
				continue
			}
			for _, e := range entries {
				end := int(e.Offset) + int(e.Length)
				if end > len(b) {
					t.Fatalf("accepted entry past the end: %+v", e)
				}
				// Reading an accepted entry must fail cleanly or return verified bytes.
				if raw, err := r.decodeBlob(b[e.Offset:end], e, nil); err == nil && (len(raw) != int(e.RawLen) || r.blobID(raw) != e.ID) {
					t.Fatalf("decoded %d bytes that do not match the entry %+v", len(raw), e)
				}
			}
		}
	})
}

func FuzzDecodeIndex(f *testing.F) {
	plain, _ := fuzzReaders()
	pack := seedPack(plain)
	entries, _ := decodePackTrailer(pack, nil)
	f.Add(encodeIndex([]indexedPack{{ID: Hash(pack), Size: int64(len(pack)), Entries: entries}}))
	f.Add(encodeIndex(nil))
	f.Add(encodeIndexV1([]indexedPack{{ID: Hash(pack), Size: int64(len(pack)), Entries: entries}}))
	f.Fuzz(func(t *testing.T, b []byte) {
		packs, err := decodeIndex(b)
		if err != nil {
			return
		}
		again := encodeIndex(packs)
		if string(b[:8]) == indexMagic && !bytes.Equal(again, b) {
			t.Fatalf("accepted index does not re-encode to itself")
		}
		// Whatever the version, what it says survives a round trip through version 2, and
		// the on-disk reader finds every blob in it.
		packs2, err := decodeIndex(again)
		if err != nil || len(packs2) != len(packs) {
			t.Fatalf("re-encoded index does not decode: %v", err)
		}
		d, err := openDiskIndexBytes(again)
		if err != nil {
			t.Fatalf("re-encoded index does not open on disk: %v", err)
		}
		for i, p := range packs {
			for _, e := range p.Entries {
				locs, err := d.all(context.Background(), e.ID)
				if err != nil || len(locs) == 0 || locs[0].e.ID != e.ID || !containsEntry(packs2, locs[0].pack, locs[0].e) {
					t.Fatalf("pack %d blob %s not found on disk (%v)", i, e.ID.Short(), err)
				}
			}
		}
	})
}

func FuzzDecodePage(f *testing.F) {
	f.Add(encodePage(0, []ID{Hash([]byte("a")), {}, Hash([]byte("b"))}), 0)
	f.Add(encodePage(2, make([]ID, Fanout)), 2)
	f.Fuzz(func(t *testing.T, b []byte, level int) {
		entries, err := decodePage(b, level)
		if err != nil {
			return
		}
		if len(entries) != Fanout {
			t.Fatalf("%d entries", len(entries))
		}
		again, err := decodePage(encodePage(level, entries), level)
		if err != nil || len(again) != len(entries) {
			t.Fatalf("accepted page does not survive re-encoding: %v", err)
		}
		for i := range entries {
			if again[i] != entries[i] {
				t.Fatalf("entry %d changed on re-encoding", i)
			}
		}
	})
}

func FuzzDecodeManifest(f *testing.F) {
	plain, sealed := fuzzReaders()
	s := &Snapshot{Format: manifestVersion, Volume: "data", Name: "before-upgrade", Kind: KindManual,
		Consistency: ConsistencyCrash, Created: time.Unix(1700000000, 0).UTC(), SizeBytes: 1 << 30,
		ChunkSize: DefaultChunkSize, Fanout: Fanout, Root: Hash([]byte("root")),
		Capture: map[string]any{"rounds": 1}, App: map[string]any{"binlog_file": "mysql-bin.000003"}}
	b, _, _ := plain.encodeManifest(s)
	f.Add(b)
	sb, name, _ := sealed.encodeManifest(s)
	f.Add(append([]byte(name), sb...))
	f.Add([]byte(`{"format":1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		// The name is the content hash: use the matching one to reach the parser.
		s, err := plain.decodeManifest(plain.blobID(b).String()[:32], b)
		if err == nil && (s.Chunks() < 0 || treeDepth(s.Chunks()) > 8) {
			t.Fatalf("accepted manifest with %d chunks", s.Chunks())
		}
		if err == nil && strings.ContainsAny(s.Host, "/\x00") {
			t.Fatalf("accepted host %q", s.Host)
		}
		// Sealed: the first 32 bytes name it.
		if len(b) > 32 {
			if s, err := sealed.decodeManifest(string(b[:32]), b[32:]); err == nil && s.Chunks() < 0 {
				t.Fatalf("accepted sealed manifest with %d chunks", s.Chunks())
			}
		}
	})
}

// FuzzOpenSealed: authentication under any key fails cleanly on any input, and what it
// accepts is what was sealed.
func FuzzOpenSealed(f *testing.F) {
	_, sealed := fuzzReaders()
	f.Add(bytes.Repeat([]byte{7}, 32), sealed.keys.seal(nil, []byte("secret"), []byte("aad")), []byte("aad"))
	f.Add(make([]byte, 32), []byte("short"), []byte(nil))
	f.Fuzz(func(t *testing.T, key, b, aad []byte) {
		if len(key) != 32 {
			return
		}
		s, err := newSuite(key)
		if err != nil {
			t.Fatal(err)
		}
		plain, err := s.open(nil, b, aad)
		if err == nil && len(plain) != len(b)-sealOverhead {
			t.Fatalf("authenticated %d bytes out of %d", len(plain), len(b))
		}
		decodeKeyFile("k", b)
	})
}

func FuzzReadBlobBounds(f *testing.F) {
	f.Add([]byte{0x81}, uint32(16), uint32(10), uint32(10))
	f.Fuzz(func(t *testing.T, flags []byte, off, length, raw uint32) {
		b := make([]byte, packEntrySize)
		if len(flags) > 0 {
			b[0] = flags[0]
		}
		e := packEntry{Offset: off, Length: length, RawLen: raw}
		copy(b[33:], e.append(nil)[33:])
		if got, err := decodePackEntry(b, 1<<20); err == nil {
			if int64(got.Offset)+int64(got.Length) > 1<<20 || got.RawLen > maxBlobSize {
				t.Fatalf("accepted out-of-range entry %+v", got)
			}
		}
	})
}

// FuzzDecodeConfig: whatever a config file says, what is accepted names no path (its ID
// names the local cache directory) and a codec this stasis has.
func FuzzDecodeConfig(f *testing.F) {
	f.Add([]byte(`{"format":"stasis-repository","version":2,"id":"0123456789abcdef0123456789abcdef","compression":"fast"}`))
	f.Add([]byte(`{"format":"stasis-repository","version":1,"id":"../../srv"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		cfg, err := decodeConfig("repo", b)
		if err != nil {
			return
		}
		if len(cfg.ID) != 32 || strings.Trim(cfg.ID, "0123456789abcdef") != "" {
			t.Fatalf("accepted repository ID %q", cfg.ID)
		}
		if _, err := codecByName(cfg.Compression); err != nil {
			t.Fatalf("accepted codec %q", cfg.Compression)
		}
	})
}

package chain

import (
	"fmt"
	"runtime"
	"sync"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
)

var (
	codecOnce sync.Once
	encoder   *zstd.Encoder
	decoder   *zstd.Decoder
)

func zstdCodecs() (*zstd.Encoder, *zstd.Decoder) {
	codecOnce.Do(func() {
		var err error
		// EncodeAll/DecodeAll are safe for concurrent use; concurrency bounds the pool.
		encoder, err = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest),
			zstd.WithEncoderConcurrency(2*runtime.GOMAXPROCS(0)), zstd.WithEncoderCRC(false),
			zstd.WithWindowSize(MaxChunkSize), zstd.WithLowerEncoderMem(true))
		if err != nil {
			panic(err) // only on invalid options, which are constants here
		}
		decoder, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(runtime.GOMAXPROCS(0)),
			zstd.WithDecoderMaxMemory(maxBlobSize))
		if err != nil {
			panic(err)
		}
	})
	return encoder, decoder
}

// compression is how a stored blob is encoded, recorded in its pack entry's flags.
type compression uint8

const (
	compNone compression = iota
	compZstd
	compS2
)

// codec compresses new blobs. A repository's codec is chosen at init (its config's
// "compression"); readers decode every kind, whatever the repository's choice.
type codec struct {
	name string
	kind compression
}

// Codec names, for `stasis init --compression`.
var codecs = map[string]codec{
	"":     {"zstd", compZstd},
	"zstd": {"zstd", compZstd},
	"fast": {"fast", compS2},
	"none": {"none", compNone},
}

func codecByName(name string) (codec, error) {
	c, ok := codecs[name]
	if !ok {
		return codec{}, fmt.Errorf("unknown compression %q: use zstd, fast or none", name)
	}
	return c, nil
}

// compress returns the bytes to store for raw and how they are encoded; dst is used for
// the output when large enough. Data that does not shrink by at least 1/16 is stored as it
// is, so reading it back costs no decompression. No sampling guess is needed first: zstd
// recognises random data by its entropy at several GB/s (measured: 7.4 GB/s per core on
// 64 KiB random chunks), while a sample test misjudged mixed binaries.
func (c codec) compress(raw, dst []byte) ([]byte, compression) {
	var out []byte
	switch c.kind {
	case compZstd:
		enc, _ := zstdCodecs()
		out = enc.EncodeAll(raw, dst[:0])
	case compS2:
		if cap(dst) >= s2.MaxEncodedLen(len(raw)) {
			dst = dst[:cap(dst)]
		}
		out = s2.Encode(dst, raw)
	default:
		return raw, compNone
	}
	if len(out) > len(raw)-len(raw)/16 {
		return raw, compNone
	}
	return out, c.kind
}

// decompress decodes a stored blob into dst (reused when large enough).
func decompress(stored []byte, how compression, rawLen int, dst []byte) ([]byte, error) {
	switch how {
	case compNone:
		if cap(dst) < len(stored) || len(stored) > 0 && &dst[:1][0] == &stored[0] {
			return stored, nil // already in the caller's buffer, or that is too small: no copy
		}
		return append(dst[:0], stored...), nil
	case compZstd:
		_, dec := zstdCodecs()
		if cap(dst) < rawLen {
			dst = make([]byte, 0, rawLen)
		}
		out, err := dec.DecodeAll(stored, dst[:0])
		if err != nil {
			return nil, corruptf("zstd: %v", err)
		}
		if len(out) != rawLen {
			return nil, corruptf("blob decompressed to %d bytes, want %d", len(out), rawLen)
		}
		return out, nil
	case compS2:
		n, err := s2.DecodedLen(stored)
		if err != nil || n != rawLen {
			return nil, corruptf("s2 blob of %d bytes (%v), want %d", n, err, rawLen)
		}
		if cap(dst) < rawLen {
			dst = make([]byte, rawLen)
		}
		out, err := s2.Decode(dst[:rawLen], stored)
		if err != nil {
			return nil, corruptf("s2: %v", err)
		}
		return out, nil
	}
	return nil, corruptf("unknown compression %d", how)
}

// AllZero reports whether b holds only zero bytes.
func AllZero(b []byte) bool {
	for len(b) >= len(zeroPage) {
		if string(b[:len(zeroPage)]) != string(zeroPage[:]) {
			return false
		}
		b = b[len(zeroPage):]
	}
	return string(b) == string(zeroPage[:len(b)])
}

var zeroPage [8192]byte

// compressBuffers holds scratch buffers for compressing, sealing and reading stored blobs.
// Each grows to the largest blob it has served (a 64 KiB chunk's, by default): when every
// one was sized for the largest possible blob (4 MiB), each buffer the GC took from the
// pool cost ~1,100 page faults to replace (70% of a full snapshot's faults).
var compressBuffers = sync.Pool{New: func() any { return new([]byte) }}

// scratch returns a pooled buffer with room for n bytes, to go back with
// compressBuffers.Put.
func scratch(n int) *[]byte {
	bp := compressBuffers.Get().(*[]byte)
	if cap(*bp) < n {
		*bp = make([]byte, 0, n)
	}
	return bp
}

// storedBound is the most bytes n bytes of content take stored: either codec's worst case
// (s2's is the larger), sealed.
func storedBound(n int) int { return n + n/6 + 64 + sealOverhead }

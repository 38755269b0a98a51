package chain

import (
	"runtime"
	"sync"

	"github.com/klauspost/compress/zstd"
)

var (
	codecOnce sync.Once
	encoder   *zstd.Encoder
	decoder   *zstd.Decoder
)

func codecs() (*zstd.Encoder, *zstd.Decoder) {
	codecOnce.Do(func() {
		var err error
		// EncodeAll/DecodeAll are safe for concurrent use; concurrency bounds the pool.
		encoder, err = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest),
			zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0)), zstd.WithEncoderCRC(false))
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

// compressBlob returns the bytes to store for raw and whether they are a zstd frame. Data
// that does not shrink by at least 1/16 is stored as it is: decompressing it would cost
// reads for nothing.
func compressBlob(raw []byte) ([]byte, bool) {
	if incompressible(raw) {
		return raw, false
	}
	enc, _ := codecs()
	out := enc.EncodeAll(raw, make([]byte, 0, len(raw)/2))
	if len(out) > len(raw)-len(raw)/16 {
		return raw, false
	}
	return out, true
}

// incompressible guesses from a sample whether raw is random-looking (encrypted, already
// compressed): compressing a 4 KiB sample is ~16× cheaper than compressing the chunk.
func incompressible(raw []byte) bool {
	const sample = 4096
	if len(raw) < 4*sample {
		return false
	}
	enc, _ := codecs()
	var buf [sample + 64]byte
	mid := len(raw)/2 - sample/2
	out := enc.EncodeAll(raw[mid:mid+sample], buf[:0])
	return len(out) > sample-sample/32
}

// decompressBlob decodes a stored blob into dst (reused when large enough).
func decompressBlob(stored []byte, zstd bool, rawLen int, dst []byte) ([]byte, error) {
	if !zstd {
		return append(dst[:0], stored...), nil
	}
	_, dec := codecs()
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

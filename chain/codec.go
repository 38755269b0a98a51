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

// compressBlob returns the bytes to store for raw and whether they are a zstd frame; dst is
// used for the output when large enough. Data that does not shrink by at least 1/16 is
// stored as it is, so reading it back costs no decompression. No sampling guess is needed
// first: zstd recognises random data by its entropy at several GB/s (measured: 7.4 GB/s
// per core on 64 KiB random chunks), while a sample test misjudged mixed binaries.
func compressBlob(raw, dst []byte) ([]byte, bool) {
	enc, _ := codecs()
	out := enc.EncodeAll(raw, dst[:0])
	if len(out) > len(raw)-len(raw)/16 {
		return raw, false
	}
	return out, true
}

// decompressBlob decodes a stored blob into dst (reused when large enough).
func decompressBlob(stored []byte, zstd bool, rawLen int, dst []byte) ([]byte, error) {
	if !zstd {
		if cap(dst) < len(stored) || len(stored) > 0 && &dst[:1][0] == &stored[0] {
			return stored, nil // already in the caller's buffer, or that is too small: no copy
		}
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

// compressBuffers holds output buffers for compressBlob, sized for the largest chunk.
var compressBuffers = sync.Pool{New: func() any {
	b := make([]byte, 0, MaxChunkSize+MaxChunkSize/8)
	return &b
}}

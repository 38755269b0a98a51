package testenv

import (
	"io"
	"math/rand"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// FaultProxy stands between a client and an HTTP server on loopback and, for a fraction
// of requests, misbehaves as networks and overloaded servers do: it drops the connection,
// answers 500 or 503, stalls, or cuts the response body short.
type FaultProxy struct {
	Addr string // host:port to send requests to
	// Rate is the fraction of requests that fail (0 to 1); change it with SetRate.
	rate   atomic.Value
	mu     sync.Mutex
	rng    *rand.Rand
	Faults atomic.Int64 // how many requests were made to fail
	Total  atomic.Int64
	// corrupt, when set, flips one byte in the middle of every upload's body (PUT) and
	// passes it on: what a faulty NIC or middlebox does that a checksum must catch.
	corrupt atomic.Bool
}

// CorruptUploads makes the proxy flip a byte in the middle of every PUT body it forwards.
func (p *FaultProxy) CorruptUploads(on bool) { p.corrupt.Store(on) }

// StartFaultProxy proxies to target (host:port) until the test ends.
func StartFaultProxy(t testing.TB, target string, rate float64, seed int64) *FaultProxy {
	t.Helper()
	u, _ := url.Parse("http://" + target)
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.ErrorLog = nil
	p := &FaultProxy{rng: rand.New(rand.NewSource(seed))}
	p.SetRate(rate)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.Addr = l.Addr().String()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.Total.Add(1)
		if p.corrupt.Load() && r.Method == http.MethodPut && r.ContentLength > 0 {
			p.Faults.Add(1)
			r.Body = &flipping{r: r.Body, at: r.ContentLength / 2}
			rp.ServeHTTP(w, r)
			return
		}
		p.mu.Lock()
		fail := p.rng.Float64() < p.rate.Load().(float64)
		kind := p.rng.Intn(5)
		stall := time.Duration(200+p.rng.Intn(800)) * time.Millisecond
		p.mu.Unlock()
		if !fail {
			rp.ServeHTTP(w, r)
			return
		}
		p.Faults.Add(1)
		switch kind {
		case 0: // the connection drops before any answer
			if hj, ok := w.(http.Hijacker); ok {
				if c, _, err := hj.Hijack(); err == nil {
					c.Close()
					return
				}
			}
			w.WriteHeader(http.StatusBadGateway)
		case 1:
			io.Copy(io.Discard, r.Body)
			w.WriteHeader(http.StatusInternalServerError)
		case 2:
			io.Copy(io.Discard, r.Body)
			w.Header().Set("Retry-After", "0")
			w.WriteHeader(http.StatusServiceUnavailable)
		case 3: // a stall, then the real answer
			time.Sleep(stall)
			rp.ServeHTTP(w, r)
		case 4: // the body is cut short: announced length, half of it, then a dropped connection
			rec := &truncating{ResponseWriter: w}
			rp.ServeHTTP(rec, r)
		}
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return p
}

// SetRate changes the fraction of requests that fail.
func (p *FaultProxy) SetRate(r float64) { p.rate.Store(r) }

// truncating passes headers through and only the first half of the body, then drops the
// connection.
type truncating struct {
	http.ResponseWriter
	written, limit int
	cut            bool
}

func (t *truncating) WriteHeader(code int) {
	if cl := t.Header().Get("Content-Length"); cl != "" {
		var n int
		for _, c := range cl {
			n = n*10 + int(c-'0')
		}
		t.limit = n / 2
	}
	t.ResponseWriter.WriteHeader(code)
}

func (t *truncating) Write(b []byte) (int, error) {
	if t.cut {
		return 0, io.ErrClosedPipe
	}
	if t.limit > 0 && t.written+len(b) > t.limit {
		n, _ := t.ResponseWriter.Write(b[:t.limit-t.written])
		t.written += n
		t.cut = true
		if f, ok := t.ResponseWriter.(http.Flusher); ok {
			f.Flush()
		}
		if hj, ok := t.ResponseWriter.(http.Hijacker); ok {
			if c, _, err := hj.Hijack(); err == nil {
				c.Close()
			}
		}
		return n, io.ErrClosedPipe
	}
	n, err := t.ResponseWriter.Write(b)
	t.written += n
	return n, err
}

// flipping passes a body through with the byte at offset at inverted.
type flipping struct {
	r   io.ReadCloser
	off int64
	at  int64
}

func (f *flipping) Read(b []byte) (int, error) {
	n, err := f.r.Read(b)
	if f.at >= f.off && f.at < f.off+int64(n) {
		b[f.at-f.off] ^= 0xff
	}
	f.off += int64(n)
	return n, err
}

func (f *flipping) Close() error { return f.r.Close() }

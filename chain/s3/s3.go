// Package s3 stores a stasis repository in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW,
// SeaweedFS, versitygw...), under a prefix, so many hosts can share one bucket.
//
// Every object is written with one PUT (multipart for large packs), which S3 makes visible
// whole or not at all; reads of pack entries are ranged GETs, never whole packs. Requests
// that fail with a server error, a dropped connection or a truncated body are retried with
// backoff; clear errors name wrong credentials, a wrong region and clock skew. There is no
// lock: the repository's deletion lock uses lease objects (see chain.LeaseLock).
package s3

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"path"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/stasis-project/stasis/chain"
)

// Config says where a repository is and how to reach it.
type Config struct {
	Endpoint  string // host[:port]
	Insecure  bool   // plain HTTP (a local test server)
	Bucket    string
	Prefix    string // "" or a path inside the bucket, without slashes at the ends
	Region    string
	AccessKey string
	SecretKey string
	// Transport, if set, carries the requests (tests put a fault injector here).
	Transport http.RoundTripper
	// PartSize is the multipart upload part size (default 64 MiB: packs go up in one PUT).
	PartSize uint64
}

// Backend is a repository in a bucket.
type Backend struct {
	cfg    Config
	client *minio.Client
	loc    string
}

var _ chain.Backend = (*Backend)(nil)

// ParseLocation reads "s3:https://host[:port]/bucket[/prefix]" (or http:// for a local
// server) into a Config without credentials.
func ParseLocation(loc string) (Config, error) {
	rest, ok := strings.CutPrefix(loc, "s3:")
	if !ok {
		return Config{}, fmt.Errorf("%q is not an s3: location", loc)
	}
	if path, ok := strings.CutPrefix(rest, "//"); ok {
		// s3://bucket/prefix: the endpoint comes from elsewhere (WithEndpoint).
		bucket, prefix, _ := strings.Cut(strings.Trim(path, "/"), "/")
		if bucket == "" {
			return Config{}, fmt.Errorf("s3 location %q names no bucket: write it like s3://bucket/prefix", loc)
		}
		return Config{Bucket: bucket, Prefix: strings.Trim(prefix, "/")}, nil
	}
	u, err := url.Parse(rest)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return Config{}, fmt.Errorf("s3 location %q: write it like s3:https://s3.example.net/bucket/prefix", loc)
	}
	bucket, prefix, _ := strings.Cut(strings.Trim(u.Path, "/"), "/")
	if bucket == "" {
		return Config{}, fmt.Errorf("s3 location %q names no bucket: write it like s3:https://s3.example.net/bucket/prefix", loc)
	}
	return Config{Endpoint: u.Host, Insecure: u.Scheme == "http", Bucket: bucket, Prefix: strings.Trim(prefix, "/")}, nil
}

// DefaultEndpoint serves s3://bucket/prefix locations when nothing names another endpoint.
const DefaultEndpoint = "https://s3.amazonaws.com"

// WithEndpoint fills in the endpoint of an s3://bucket/prefix location from a URL such as
// https://s3.example.net ("" for DefaultEndpoint); a location that names its host keeps it.
func (c Config) WithEndpoint(endpoint string) (Config, error) {
	if c.Endpoint != "" {
		return c, nil
	}
	if endpoint == "" {
		endpoint = DefaultEndpoint
	}
	u, err := url.Parse(endpoint)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || strings.Trim(u.Path, "/") != "" {
		return c, fmt.Errorf("s3 endpoint %q: write it like https://s3.example.net", endpoint)
	}
	c.Endpoint, c.Insecure = u.Host, u.Scheme == "http"
	return c, nil
}

// Open connects to the bucket and checks that it exists and the credentials work.
func Open(ctx context.Context, cfg Config) (*Backend, error) {
	if cfg.AccessKey == "" || cfg.SecretKey == "" {
		return nil, fmt.Errorf("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or credentials_file in the s3: section of the configuration")
	}
	if cfg.PartSize == 0 {
		cfg.PartSize = 64 << 20 // packs (32 MiB) go up in one PUT
	}
	opts := &minio.Options{Creds: credentials.NewStaticV4(cfg.AccessKey, cfg.SecretKey, ""), Secure: !cfg.Insecure,
		Region: cfg.Region, BucketLookup: minio.BucketLookupPath, MaxRetries: 6}
	if cfg.Transport != nil {
		opts.Transport = cfg.Transport
	}
	c, err := minio.New(cfg.Endpoint, opts)
	if err != nil {
		return nil, fmt.Errorf("s3 %s: %w", cfg.Endpoint, err)
	}
	scheme := "https"
	if cfg.Insecure {
		scheme = "http"
	}
	b := &Backend{cfg: cfg, client: c, loc: fmt.Sprintf("s3:%s://%s/%s", scheme, cfg.Endpoint, path.Join(cfg.Bucket, cfg.Prefix))}
	ok, err := c.BucketExists(ctx, cfg.Bucket)
	if err != nil {
		return nil, b.explain("open the bucket", err)
	}
	if !ok {
		return nil, fmt.Errorf("%s: bucket %q does not exist: create it (for example with the provider's console or `aws s3 mb`)", b.loc, cfg.Bucket)
	}
	return b, nil
}

// SaveConcurrency lets a snapshot writer upload three packs at once: one upload waits on
// round trips and the server's disk, several keep the link busy (chain.ParallelSaver).
func (b *Backend) SaveConcurrency() int { return 3 }

// Location is the s3: location.
func (b *Backend) Location() string { return b.loc }

func (b *Backend) key(h chain.Handle) string {
	var k string
	switch {
	case h.Type == chain.ConfigFile:
		k = "config"
	case h.Type == chain.PackFile && len(h.Name) > 2:
		k = string(h.Type) + "/" + h.Name[:2] + "/" + h.Name
	default:
		k = string(h.Type) + "/" + h.Name
	}
	if b.cfg.Prefix != "" {
		k = b.cfg.Prefix + "/" + k
	}
	return k
}

func (b *Backend) typePrefix(t chain.FileType) string {
	k := string(t) + "/"
	if b.cfg.Prefix != "" {
		k = b.cfg.Prefix + "/" + k
	}
	return k
}

func validName(h chain.Handle) error {
	if h.Type != chain.ConfigFile && (h.Name == "" || strings.ContainsAny(h.Name, "/\\") || strings.HasPrefix(h.Name, ".")) {
		return fmt.Errorf("invalid file name %q", h.Name)
	}
	return nil
}

// explain turns S3 errors into messages that say what to do.
func (b *Backend) explain(what string, err error) error {
	resp := minio.ToErrorResponse(err)
	switch resp.Code {
	case "NoSuchKey", "NotFound":
		return fmt.Errorf("%s: %w", what, chain.ErrNotExist)
	case "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch":
		return fmt.Errorf("%s: %s refused the credentials (%s): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or credentials_file) and the key's rights on bucket %s", what, b.loc, resp.Code, b.cfg.Bucket)
	case "AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "PermanentRedirect":
		return fmt.Errorf("%s: %s belongs to another region (%s, region %q): set the right region in the s3: section", what, b.loc, resp.Code, resp.Region)
	case "RequestTimeTooSkewed":
		return fmt.Errorf("%s: this machine's clock differs too much from %s's: synchronise it (NTP)", what, b.loc)
	case "NoSuchBucket":
		return fmt.Errorf("%s: bucket %q does not exist", what, b.cfg.Bucket)
	}
	if resp.StatusCode == http.StatusNotFound {
		return fmt.Errorf("%s: %w", what, chain.ErrNotExist)
	}
	return fmt.Errorf("%s on %s: %w", what, b.loc, err)
}

// retry runs op until it succeeds, fails for good, or five attempts have failed with
// errors worth retrying (connections dropped, truncated bodies, server errors: those the
// client library gave up on, and every one of an upload, which it does not retry).
func retry(ctx context.Context, op func() error) error {
	delay := 200 * time.Millisecond
	var err error
	for attempt := 0; attempt < 5; attempt++ {
		if err = op(); err == nil || !retryable(err) {
			return err
		}
		select {
		case <-time.After(delay):
		case <-ctx.Done():
			return ctx.Err()
		}
		delay *= 2
	}
	return err
}

func retryable(err error) bool {
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) || errors.Is(err, errShort) {
		return true
	}
	var ne net.Error
	if errors.As(err, &ne) {
		return true
	}
	resp := minio.ToErrorResponse(err)
	return resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests || resp.Code == "RequestTimeout" ||
		strings.Contains(err.Error(), "connection reset") || strings.Contains(err.Error(), "broken pipe")
}

// errShort is a body shorter than its Content-Length promised.
var errShort = errors.New("response body shorter than announced")

// Save uploads data as one object (multipart when large).
func (b *Backend) Save(ctx context.Context, h chain.Handle, data []byte) error {
	if err := validName(h); err != nil {
		return err
	}
	err := retry(ctx, func() error {
		// A body the client cannot seek, so it does not retry by itself: its retry rewinds
		// the body while the failed request's transport may still be reading it (a data
		// race, caught under -race when a server refuses an upload early). retry starts
		// each attempt with a fresh reader instead.
		body := struct{ io.Reader }{bytes.NewReader(data)}
		_, err := b.client.PutObject(ctx, b.cfg.Bucket, b.key(h), body, int64(len(data)),
			minio.PutObjectOptions{ContentType: "application/octet-stream", PartSize: b.cfg.PartSize})
		return err
	})
	if err != nil {
		return b.explain("save "+h.String(), err)
	}
	return nil
}

// ReadAt reads len(p) bytes at off with a ranged GET.
func (b *Backend) ReadAt(ctx context.Context, h chain.Handle, p []byte, off int64) (int, error) {
	if err := validName(h); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	var n int
	atEnd := false
	err := retry(ctx, func() error {
		opts := minio.GetObjectOptions{}
		if err := opts.SetRange(off, off+int64(len(p))-1); err != nil {
			return err
		}
		obj, err := b.client.GetObject(ctx, b.cfg.Bucket, b.key(h), opts)
		if err != nil {
			return err
		}
		defer obj.Close()
		n, err = io.ReadFull(obj, p)
		if err == nil {
			return nil
		}
		if resp := minio.ToErrorResponse(err); resp.Code != "" {
			if resp.Code == "InvalidRange" { // at or past the end
				n, atEnd = 0, true
				return nil
			}
			return err
		}
		// A short read: the object ends there, or the body was cut off. Ask for the size.
		st, serr := b.client.StatObject(ctx, b.cfg.Bucket, b.key(h), minio.StatObjectOptions{})
		if serr != nil {
			return serr
		}
		if off+int64(n) >= st.Size {
			atEnd = true
			return nil
		}
		return errShort
	})
	switch {
	case err != nil:
		return n, b.explain("read "+h.String(), err)
	case atEnd && n == 0:
		return 0, io.EOF
	case atEnd:
		return n, io.ErrUnexpectedEOF
	}
	return n, nil
}

// ReadAll reads a whole object, checking its length.
func (b *Backend) ReadAll(ctx context.Context, h chain.Handle) ([]byte, error) {
	if err := validName(h); err != nil {
		return nil, err
	}
	var data []byte
	err := retry(ctx, func() error {
		obj, err := b.client.GetObject(ctx, b.cfg.Bucket, b.key(h), minio.GetObjectOptions{})
		if err != nil {
			return err
		}
		defer obj.Close()
		st, err := obj.Stat()
		if err != nil {
			return err
		}
		buf := make([]byte, st.Size)
		if _, err := io.ReadFull(obj, buf); err != nil {
			if minio.ToErrorResponse(err).Code == "" {
				return errShort
			}
			return err
		}
		data = buf
		return nil
	})
	if err != nil {
		return nil, b.explain("read "+h.String(), err)
	}
	return data, nil
}

// Stat returns an object's size.
func (b *Backend) Stat(ctx context.Context, h chain.Handle) (int64, error) {
	if err := validName(h); err != nil {
		return 0, err
	}
	var size int64
	err := retry(ctx, func() error {
		st, err := b.client.StatObject(ctx, b.cfg.Bucket, b.key(h), minio.StatObjectOptions{})
		size = st.Size
		return err
	})
	if err != nil {
		return 0, b.explain("stat "+h.String(), err)
	}
	return size, nil
}

// Remove deletes an object; a missing one is an ErrNotExist error (S3 itself does not say,
// so it is asked first).
func (b *Backend) Remove(ctx context.Context, h chain.Handle) error {
	if err := validName(h); err != nil {
		return err
	}
	if _, err := b.Stat(ctx, h); err != nil {
		return err
	}
	err := retry(ctx, func() error {
		return b.client.RemoveObject(ctx, b.cfg.Bucket, b.key(h), minio.RemoveObjectOptions{})
	})
	if err != nil {
		return b.explain("remove "+h.String(), err)
	}
	return nil
}

// List calls fn for every object of type t.
func (b *Backend) List(ctx context.Context, t chain.FileType, fn func(chain.FileInfo) error) error {
	prefix := b.typePrefix(t)
	var infos []chain.FileInfo
	err := retry(ctx, func() error {
		infos = infos[:0]
		lctx, cancel := context.WithCancel(ctx)
		defer cancel()
		for o := range b.client.ListObjects(lctx, b.cfg.Bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
			if o.Err != nil {
				return o.Err
			}
			name := path.Base(o.Key)
			if strings.HasPrefix(name, ".") {
				continue
			}
			infos = append(infos, chain.FileInfo{Name: name, Size: o.Size, ModTime: o.LastModified})
		}
		return nil
	})
	if err != nil {
		return b.explain("list "+string(t), err)
	}
	for _, fi := range infos {
		if err := fn(fi); err != nil {
			return err
		}
	}
	return nil
}

// Close does nothing: the client keeps no state worth releasing.
func (b *Backend) Close() error { return nil }

// CleanIncomplete aborts multipart uploads begun before olderThan: what a writer killed
// mid-upload leaves (invisible as objects, but stored and billed).
func (b *Backend) CleanIncomplete(ctx context.Context, olderThan time.Time) (int, error) {
	n := 0
	for u := range b.client.ListIncompleteUploads(ctx, b.cfg.Bucket, b.cfg.Prefix, true) {
		if u.Err != nil {
			return n, b.explain("list incomplete uploads", u.Err)
		}
		if u.Initiated.Before(olderThan) {
			if err := b.client.RemoveIncompleteUpload(ctx, b.cfg.Bucket, u.Key); err != nil {
				return n, b.explain("abort an incomplete upload", err)
			}
			n++
		}
	}
	return n, nil
}

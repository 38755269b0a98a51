# The two commands of the README:
#   sudo make demo   snapshot a demo volume into the default repository and show it
#   sudo make test   run the whole test suite (what CI runs)
GO      ?= go
VERSION ?= 0.1.0+g$(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION)

.PHONY: build demo test bench bench-mysql bench-rss package deps clean

# Without cgo: a static binary that starts ~5 ms sooner (no dynamic loader) and runs on
# any Linux; groups only NSS knows are looked up with getent (config.LookupGroup).
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/stasis ./cmd/stasis

deps:
	packaging/scripts/install-deps.sh

demo: deps build
	packaging/scripts/demo.sh

test:
	test/run.sh

bench: build bench-mysql bench-rss
	packaging/scripts/install-deps.sh --bench
	$(GO) run ./test/bench -stasis bin/stasis

# Peak RSS of a snapshot writer in a repository indexing 50 million chunks (about 5 GB of
# scratch space under $TMPDIR).
bench-rss:
	$(GO) test -run '^$$' -bench WriterPeakRSS -benchtime 1x -timeout 30m ./chain

# Database lock hold and writer stall for tracked incrementals under a MariaDB workload.
bench-mysql: deps
	$(GO) test -run '^$$' -bench MariaDBTrackedLock -benchtime 1x ./test/e2e

# .deb and .rpm into dist/, with nfpm from the Go module proxy.
NFPM ?= github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.41.1
package: build
	rm -f dist/stasis_*.deb dist/stasis-*.rpm
	mkdir -p dist/completions
	bin/stasis completion bash > dist/completions/stasis.bash
	bin/stasis completion zsh > dist/completions/_stasis
	rm -rf dist/man && CGO_ENABLED=0 $(GO) run -tags man -trimpath -ldflags '$(LDFLAGS)' ./cmd/stasis man dist/man
	STASIS_VERSION=$(VERSION) $(GO) run $(NFPM) package --config packaging/nfpm.yaml --packager deb --target dist/
	STASIS_VERSION=$(VERSION) $(GO) run $(NFPM) package --config packaging/nfpm.yaml --packager rpm --target dist/

clean:
	rm -rf bin dist

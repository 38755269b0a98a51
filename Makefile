# The two commands of the README:
#   sudo make demo   snapshot a demo volume into the default repository and show it
#   sudo make test   run the whole test suite (what CI runs)
GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION)

.PHONY: build demo test bench bench-mysql deps clean

build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/stasis ./cmd/stasis

deps:
	packaging/scripts/install-deps.sh

demo: deps build
	packaging/scripts/demo.sh

test:
	test/run.sh

bench: build bench-mysql
	packaging/scripts/install-deps.sh --bench
	$(GO) run ./test/bench -stasis bin/stasis

# Database lock hold and writer stall for tracked incrementals under a MariaDB workload.
bench-mysql: deps
	$(GO) test -run '^$$' -bench MariaDBTrackedLock -benchtime 1x ./test/e2e

clean:
	rm -rf bin dist

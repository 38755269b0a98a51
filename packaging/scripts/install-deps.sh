#!/usr/bin/env bash
# Installs what building, testing and the demo need on Debian/Ubuntu: system tools from
# Debian's packages, Go modules from the module proxy. Safe to run again.
set -euo pipefail
need=(e2fsprogs xfsprogs util-linux fdisk fuse3 kmod time mariadb-server mariadb-client)
mode=${1:-}
[ "$mode" = "--bench" ] && need+=(restic borgbackup)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing Debian packages: ${missing[*]}; run as root (sudo)" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v go >/dev/null; then
  [ -x /usr/local/go/bin/go ] && export PATH=$PATH:/usr/local/go/bin
fi
if ! command -v go >/dev/null; then
  echo "install-deps: Go is not installed. Install Go 1.24 or newer (https://go.dev/doc/install) and run this again." >&2
  exit 1
fi
go mod download
if [ "$mode" = "--test" ] || [ "$mode" = "--bench" ]; then
  # The S3-compatible server the object-storage tests and benchmarks start (Apache-2.0).
  gobin=$(go env GOBIN)
  [ -n "$gobin" ] || gobin=$(go env GOPATH)/bin
  if [ ! -x "$gobin/versitygw" ] && ! command -v versitygw >/dev/null; then
    echo "install-deps: building versitygw (the tests' S3 server) into $gobin"
    go install github.com/versity/versitygw/cmd/versitygw@v1.8.0
  fi
fi

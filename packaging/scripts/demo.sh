#!/usr/bin/env bash
# The main job on a demo volume: a loop device with ext4 and some files is snapshotted into
# the default repository, changed, snapshotted again (an incremental), and the snapshots are
# shown as folders. Ctrl-C removes the demo volume, its snapshots and its mounts.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" -ne 0 ]; then echo "demo: run as root (sudo make demo): it attaches a loop device" >&2; exit 1; fi
STASIS=${STASIS:-$PWD/bin/stasis}
export STASIS_REPO=${STASIS_REPO:-/var/lib/stasis/repo}
work=$(mktemp -d /tmp/stasis-demo.XXXXXX)
dev="" created_repo=0 mountpid=""

cleanup() {
  set +e
  echo; echo "demo: cleaning up"
  # Inside out: the view, the live volume.
  if [ -n "${mountpid:-}" ]; then
    kill "$mountpid" 2>/dev/null; wait "$mountpid" 2>/dev/null
    fusermount3 -uz "$work/snapshots" 2>/dev/null
  fi
  umount "$work/live" 2>/dev/null
  [ -n "$dev" ] && losetup -d "$dev" 2>/dev/null
  ids=$("$STASIS" list --volume demo --json 2>/dev/null | sed -n 's/.*"id": "\([0-9a-f]*\)".*/\1/p')
  [ -n "$ids" ] && "$STASIS" delete $ids >/dev/null && "$STASIS" gc >/dev/null
  if [ "$created_repo" = 1 ] && [ -z "$("$STASIS" list --json 2>/dev/null | tr -d '[] \n')" ]; then
    id=$(sed -n 's/.*"id": *"\([0-9a-f]*\)".*/\1/p' "$STASIS_REPO/config")
    [ -n "$id" ] && rm -rf "/var/cache/stasis/$id"
    rm -rf "$STASIS_REPO"
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== creating a 256 MiB demo volume (loop device, ext4)"
truncate -s 256M "$work/volume.img"
dev=$(losetup -f --show "$work/volume.img")
mkfs.ext4 -q -L demo "$dev"
mkdir -p "$work/live"; mount "$dev" "$work/live"
mkdir -p "$work/live/docs" "$work/live/data"
for i in $(seq 1 20); do echo "report $i: all systems nominal" > "$work/live/docs/report-$i.txt"; done
head -c 32M /dev/urandom > "$work/live/data/blob.bin"
cp -r /usr/share/common-licenses "$work/live/licenses" 2>/dev/null || true
sync

if [ ! -e "$STASIS_REPO/config" ]; then
  "$STASIS" init; created_repo=1
fi
echo "== first snapshot (full; empty blocks are not stored)"
"$STASIS" snapshot --source "$dev" --volume demo --name first
echo "== changing files: editing a report, deleting one, adding 4 MiB"
echo "report 1: REVISED" > "$work/live/docs/report-1.txt"
rm "$work/live/docs/report-2.txt"
head -c 4M /dev/urandom > "$work/live/data/new.bin"
sync
echo "== second snapshot (incremental: only changed chunks are stored)"
"$STASIS" snapshot --source "$dev" --volume demo --name second
echo
"$STASIS" list --volume demo
echo
"$STASIS" stats | sed -n '/volume demo/,/^$/p'

# The read-only view of every snapshot (FUSE): each snapshot's files as folders.
view="$work/snapshots"
mkdir -p "$view"
"$STASIS" mount "$view" 2>/dev/null &
mountpid=$!
for i in $(seq 1 50); do [ -e "$view/demo/first.img" ] && break; sleep 0.1; done
cat <<MSG

Every snapshot of the demo volume, read-only, without restoring anything:
  ls -l $view/demo                  # first/, second/, their .img and .json, latest
  ls $view/demo/first/docs          # report-2.txt is still there
  cat $view/demo/first/docs/report-1.txt
  diff -r $view/demo/first/docs $view/demo/latest/docs
  cp $view/demo/first/docs/report-2.txt $work/live/docs/   # get a file back
  cat $view/demo/second.json        # consistency, sizes, how it was captured
  stasis list --volume demo         # repository: $STASIS_REPO
Press Ctrl-C to remove the demo volume, its snapshots and this mount.
MSG
# wait (a builtin) returns at once when a trapped signal arrives; a plain sleep would not.
while true; do sleep 3600 & wait $!; done

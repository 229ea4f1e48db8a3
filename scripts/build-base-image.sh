#!/usr/bin/env bash
# Build the local image sandboxd/base:latest from busybox-static, without any
# registry: a tiny rootfs imported with `docker import`.
#   scripts/build-base-image.sh [--force]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

IMAGE=sandboxd/base:latest
log() { printf 'base-image: %s\n' "$*"; }
die() { printf 'base-image: error: %s\n' "$*" >&2; exit 1; }

force=0
for arg in "$@"; do
    case "$arg" in
        --force|-f) force=1 ;;
        -h|--help) echo "usage: $0 [--force]"; exit 0 ;;
        *) die "unknown argument: $arg (usage: $0 [--force])" ;;
    esac
done

old_id=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
if [ -n "$old_id" ] && [ "$force" -eq 0 ]; then
    log "$IMAGE exists"
    exit 0
fi

busybox=/bin/busybox
[ -x "$busybox" ] || busybox=$(command -v busybox || true)
if [ -z "$busybox" ] || [ ! -x "$busybox" ]; then
    die "busybox not found: install busybox-static (scripts/setup.sh does)"
fi

log "building $IMAGE from $busybox"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
root=$tmp/rootfs
mkdir -p "$root"/{bin,workspace,tmp,etc,proc,sys,dev,root}
chmod 0755 "$root"   # mktemp makes 0700: / must be traversable by every user
chmod 1777 "$root/tmp"
chmod 0700 "$root/root"

cp "$busybox" "$root/bin/busybox"
chmod 0755 "$root/bin/busybox"
# One link per applet; never one named "busybox", which would replace the binary.
while IFS= read -r applet; do
    case "$applet" in
        ''|busybox|*/*) continue ;;
    esac
    ln -sf busybox "$root/bin/$applet"
done < <("$root/bin/busybox" --list)
[ -x "$root/bin/sh" ] || die "busybox has no sh applet"
# Common absolute paths (#!/usr/bin/env, /sbin/...) resolve to the same bin.
mkdir -p "$root/usr"
ln -s ../bin "$root/usr/bin"
ln -s ../bin "$root/usr/sbin"
ln -s bin "$root/sbin"

cat > "$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
sandbox:x:1000:1000:sandbox:/workspace:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat > "$root/etc/group" <<'GROUP'
root:x:0:
sandbox:x:1000:
nogroup:x:65534:
GROUP
chmod 0644 "$root/etc/passwd" "$root/etc/group"

# Sandboxes run with every capability dropped, so even root there cannot write
# into a directory it does not own: /workspace is writable by every user.
chmod 0777 "$root/workspace"
if [ "$(id -u)" -eq 0 ]; then
    chown 1000:1000 "$root/workspace"
    owner=()
else
    owner=(--owner=0 --group=0)   # cannot chown here: make everything root's
fi

tar -C "$root" --numeric-owner "${owner[@]}" -c . \
    | docker import -c 'ENV PATH=/bin' -c 'CMD ["/bin/sh"]' - "$IMAGE" >/dev/null

docker run --rm --network none "$IMAGE" true \
    || die "the new image does not run: docker run --rm --network none $IMAGE true failed"

new_id=$(docker image inspect -f '{{.Id}}' "$IMAGE")
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    docker image rm "$old_id" >/dev/null 2>&1 || true   # still in use: keep it
fi
log "built $IMAGE (${new_id#sha256:})"

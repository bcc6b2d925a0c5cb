#!/usr/bin/env bash
# Builds the project's OCI image without a container daemon: the release binaries `ldc`
# and `ldc-operator` on an empty base (`FROM scratch`) with exactly the shared libraries
# they load, the CA certificates, and a non-root user (65532), built with Debian's buildah
# on the vfs storage driver (no overlay mounts, no daemon, works as root here).
#
#   scripts/image.sh            -> target/image/ldc-<version>.tar, tagged ghcr.io/ldc/ldc:<version>
#
# The archive is an OCI archive with gzip-compressed layers, which `ctr -n k8s.io images
# import` and `podman load` take; its tag is the one the chart's defaults name
# (image.repository + the appVersion), so a node that imported it runs the chart as it is.
# Environment:
#   LDC_IMAGE_TAG   the tag (default: the workspace version)
#   LDC_IMAGE_REPO  the repository (default: ghcr.io/ldc/ldc)
# Safe to re-run: the working container and its image are removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[image.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
TAG=${LDC_IMAGE_TAG:-$VERSION}
REPO=${LDC_IMAGE_REPO:-ghcr.io/ldc/ldc}
REVISION=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then REVISION="$REVISION-dirty"; fi
TARGET=${CARGO_TARGET_DIR:-target}
OUT=$TARGET/image
ARCHIVE=$OUT/ldc-$TAG.tar

scripts/apt-install buildah ca-certificates binutils

log "building the release binaries (ldc, ldc-operator)"
cargo build --release --locked -p ldc -p ldc-operator --bin ldc --bin ldc-operator

ROOT=$(mktemp -d)
BUILDAH=(buildah --storage-driver vfs)
CTR=""
cleanup() {
    rm -rf "$ROOT"
    if [ -n "$CTR" ]; then "${BUILDAH[@]}" rm "$CTR" >/dev/null 2>&1 || true; fi
    "${BUILDAH[@]}" rmi -f "$REPO:$TAG" >/dev/null 2>&1 || true
}
trap cleanup EXIT

log "assembling the root filesystem"
mkdir -p "$ROOT/usr/local/bin" "$ROOT/etc/ssl/certs" "$ROOT/tmp" "$ROOT/var/lib/ldc"
chmod 1777 "$ROOT/tmp"
for b in ldc ldc-operator; do
    # Debug line tables stay in target/ for backtraces there; the image carries none.
    strip --strip-debug -o "$ROOT/usr/local/bin/$b" "$TARGET/release/$b"
done
# Exactly the shared libraries the binaries load (and the loader), at their own paths.
for lib in $(for b in "$ROOT"/usr/local/bin/*; do ldd "$b" | grep -o '/[^ ]*'; done | sort -u); do
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
done
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/"
printf 'root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/var/lib/ldc:/sbin/nologin\n' >"$ROOT/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$ROOT/etc/group"
chown 65532:65532 "$ROOT/var/lib/ldc"

log "building the image $REPO:$TAG"
CTR=$("${BUILDAH[@]}" from scratch)
"${BUILDAH[@]}" copy "$CTR" "$ROOT" / >/dev/null
"${BUILDAH[@]}" config \
    --user 65532:65532 \
    --workingdir /var/lib/ldc \
    --entrypoint '["/usr/local/bin/ldc"]' \
    --cmd '["--help"]' \
    --env PATH=/usr/local/bin \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --label "org.opencontainers.image.title=ldc" \
    --label "org.opencontainers.image.description=LDC: cell-based multi-region payments (ldc, ldc-operator)" \
    --label "org.opencontainers.image.version=$TAG" \
    --label "org.opencontainers.image.revision=$REVISION" \
    --label "org.opencontainers.image.licenses=Apache-2.0" \
    --label "org.opencontainers.image.source=https://github.com/ldc/ldc" \
    "$CTR"
"${BUILDAH[@]}" commit --quiet "$CTR" "$REPO:$TAG" >/dev/null
mkdir -p "$OUT"
rm -f "$ARCHIVE"
"${BUILDAH[@]}" push --quiet --compression-format gzip "$REPO:$TAG" "oci-archive:$ARCHIVE:$REPO:$TAG"

SIZE=$(du -m "$ARCHIVE" | cut -f1)
UNPACKED=$(du -sm "$ROOT" | cut -f1)
log "image $REPO:$TAG (revision $REVISION): $ARCHIVE, ${SIZE} MB (${UNPACKED} MB unpacked)"
echo "$ARCHIVE"

#!/usr/bin/env bash
# Fetches the arm64 Debian packages the bootable CM3 test image is built from (hil/image/bootable.py): the
# kernel that linux-image-arm64 depends on today, and busybox-static. apt-get downloads and checks them against
# Debian's signed package lists (arm64 lists kept apart from the host's, so nothing is installed or changed on
# the host). Run as root at setup time; run again to do nothing, or with --refresh to follow a newer kernel.
#
# Usage: scripts/fetch-guest.sh [--refresh]      cache: $HIL_GUEST_CACHE, default .cache/guest in the repo
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${HIL_GUEST_CACHE:-$PWD/.cache/guest}"
DEBS="$CACHE/debs"
have() { compgen -G "$DEBS/$1" >/dev/null; }

if [ "${1:-}" != "--refresh" ] && have 'linux-image-*-arm64_*_arm64.deb' && have 'busybox-static_*_arm64.deb'; then
  echo "fetch-guest: already cached in $DEBS"
  exit 0
fi

mkdir -p "$CACHE/apt/lists/partial" "$CACHE/apt/cache/archives/partial" "$DEBS"
APT=(-qq -o APT::Architecture=arm64 -o APT::Architectures=arm64 -o "Dir::State::Lists=$CACHE/apt/lists"
     -o "Dir::Cache=$CACHE/apt/cache" -o Dir::State::status=/dev/null)
apt-get "${APT[@]}" update
# Through the metapackage: an ABI-versioned kernel package (linux-image-6.1.0-NN-arm64) leaves the mirror later.
KERNEL=$(apt-cache "${APT[@]}" depends linux-image-arm64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
if [ -z "$KERNEL" ]; then
  echo "fetch-guest: linux-image-arm64 names no kernel package; check the host's apt sources" >&2
  exit 1
fi
staging=$(mktemp -d "$CACHE/.fetch.XXXXXX")
trap 'rm -rf "$staging"' EXIT
(cd "$staging" && apt-get "${APT[@]}" download "$KERNEL:arm64" busybox-static:arm64 2>&1 | grep -v unsandboxed || true)
for pattern in "${KERNEL}_*_arm64.deb" 'busybox-static_*_arm64.deb'; do
  compgen -G "$staging/$pattern" >/dev/null || { echo "fetch-guest: apt-get download did not fetch $pattern" >&2; exit 1; }
done
rm -f "$DEBS"/*.deb
mv "$staging"/*.deb "$DEBS/"
echo "fetch-guest: $(cd "$DEBS" && ls *.deb | tr '\n' ' ')in $DEBS"

#!/usr/bin/env bash
# Fetches the Debian packages the two QEMU guests are made from; nothing is installed or changed on the host.
# - arm64 (hil/image/bootable.py, the virtual CM3 that boots a flashed image): the kernel that linux-image-arm64
#   depends on today, and busybox-static.
# - amd64 (hil/virtual/guest, the kernel USB transport): the kernel that linux-image-amd64 depends on, its headers
#   and kbuild, Debian's kernel source (raw_gadget is built from it: Debian's kernel has no raw_gadget module) and
#   busybox-static.
# apt-get downloads them and checks them against Debian's signed package lists (each architecture's lists kept
# apart from the host's). Run as root at setup time; run again to do nothing, or with --refresh to follow a newer
# kernel.
#
# Usage: scripts/fetch-guest.sh [--refresh]      cache: $HIL_GUEST_CACHE, default .cache/guest in the repo
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${HIL_GUEST_CACHE:-$PWD/.cache/guest}"
DEBS="$CACHE/debs"
have() { compgen -G "$DEBS/$1" >/dev/null; }

fetch() {  # ARCH PACKAGE-PATTERNS...: the kernel named by linux-image-ARCH and the packages that go with it
  local arch=$1 lists="$CACHE/apt/$1"
  mkdir -p "$lists/lists/partial" "$lists/cache/archives/partial" "$DEBS"
  local apt=(-qq -o "APT::Architecture=$arch" -o "APT::Architectures=$arch" -o "Dir::State::Lists=$lists/lists"
             -o "Dir::Cache=$lists/cache" -o Dir::State::status=/dev/null)
  apt-get "${apt[@]}" update
  # Through the metapackage: an ABI-versioned kernel package (linux-image-6.1.0-NN-ARCH) leaves the mirror later.
  local kernel release
  kernel=$(apt-cache "${apt[@]}" depends "linux-image-$arch" | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
  if [ -z "$kernel" ]; then
    echo "fetch-guest: linux-image-$arch names no kernel package; check the host's apt sources" >&2
    exit 1
  fi
  release=${kernel#linux-image-}
  local wanted=("$kernel:$arch" "busybox-static:$arch")
  if [ "$arch" = amd64 ]; then
    local common=${release%-amd64}-common series
    series=$(echo "$release" | cut -d. -f1,2)
    wanted+=("linux-headers-$release:$arch" "linux-headers-$common" "linux-kbuild-$series:$arch" "linux-source-$series")
  fi
  local staging
  staging=$(mktemp -d "$CACHE/.fetch.XXXXXX")
  (cd "$staging" && apt-get "${apt[@]}" download "${wanted[@]}" 2>&1 | grep -v unsandboxed || true)
  local count
  count=$(find "$staging" -name '*.deb' | wc -l)
  if [ "$count" != "${#wanted[@]}" ]; then
    echo "fetch-guest: apt-get download fetched $count of ${wanted[*]}" >&2
    rm -rf "$staging"
    exit 1
  fi
  for deb in "$staging"/*.deb; do  # the older version of each package (of this architecture) goes
    name=$(basename "$deb" | cut -d_ -f1)
    rm -f "$DEBS/${name}"_*_"${deb##*_}"
  done
  rm -f "$DEBS"/linux-image-*-"$arch"_*.deb
  mv "$staging"/*.deb "$DEBS/"
  rmdir "$staging"
}

refresh=0 fetched=0
[ "${1:-}" = "--refresh" ] && refresh=1
if [ $refresh = 1 ] || ! have 'linux-image-*-arm64_*_arm64.deb' || ! have 'busybox-static_*_arm64.deb'; then
  fetch arm64
  fetched=1
fi
if [ $refresh = 1 ] || ! have 'linux-image-*-amd64_*_amd64.deb' || ! have 'busybox-static_*_amd64.deb' \
    || ! have 'linux-source-*_all.deb' || ! have 'linux-kbuild-*_amd64.deb' || ! have 'linux-headers-*-common_*_all.deb'; then
  fetch amd64
  fetched=1
fi
if [ $fetched = 0 ]; then
  echo "fetch-guest: already cached in $DEBS"
else
  echo "fetch-guest: $(cd "$DEBS" && ls *.deb | tr '\n' ' ')in $DEBS"
fi

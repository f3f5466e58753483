#!/usr/bin/env bash
# Sets up cm-hil on a fresh Debian 12, as root (or with sudo): system packages, then a virtual environment
# in .venv with the project and its tools. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(
  python3 python3-venv python3-gi                   # Debian's Python: PyGObject for umockdev comes from here
  umockdev gir1.2-umockdev-1.0 libusb-1.0-0         # the virtual rig's USB side behind the real libusb
  fuse3 util-linux                                  # the virtual eMMC: FUSE speed model (/dev/fuse) under a loop device
  mtools dosfstools e2fsprogs fdisk                 # test images without mounting
  xz-utils zstd bzip2 gzip bmap-tools               # image formats and the peer tools the benchmarks compare with
  usbutils                                          # lsusb: a non-Python program the tests run against the virtual rig
  chromium                                          # the browser that checks rendered reports (no download)
  qemu-system-arm cpio                              # the virtual CM3 that boots the flashed image with a real kernel
  qemu-system-x86 udev make gcc-12 libc6-dev        # the kernel USB transport's guest: QEMU, udev in the guest, and
                                                    # the raw_gadget module built from Debian's kernel source
)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# umockdev 0.17.16 (Debian 12) aborts the whole process when a uevent listener's socket queue is full, and the
# kernel's default queue is 10 datagrams: one mass-storage plug sends more than that to a listener that is
# busy for a moment. Give listeners room (fixed in umockdev 0.19.4, which retries instead).
UNIX_QLEN=4096
qlen_file=/proc/sys/net/unix/max_dgram_qlen
if [ "$(cat "$qlen_file")" -lt "$UNIX_QLEN" ]; then
  if echo "$UNIX_QLEN" | $SUDO tee "$qlen_file" >/dev/null 2>&1; then
    $SUDO mkdir -p /etc/sysctl.d  # kept across reboots where sysctl.d is applied
    echo "net.unix.max_dgram_qlen = $UNIX_QLEN" | $SUDO tee /etc/sysctl.d/60-cm-hil.conf >/dev/null
  else
    echo "setup: warning: cannot raise $qlen_file to $UNIX_QLEN (read-only here?); the virtual rig may abort" \
         "under load. Fix: sysctl -w net.unix.max_dgram_qlen=$UNIX_QLEN on the host" >&2
  fi
fi

# --system-site-packages: umockdev's Python bindings (gi) come from Debian's python3-gi; PyPI's PyGObject
# needs a newer GLib than Debian 12 has.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev,lab]'
# The arm64 kernel and busybox the bootable CM3 test image is built from (virtual CM3 under QEMU); cached.
$SUDO scripts/fetch-guest.sh

# Allure Report 3, pinned in report/package-lock.json; nothing is downloaded when a report is rendered.
if ! command -v npm >/dev/null; then
  echo "setup: Node.js with npm is needed for the Allure report generator (Debian: apt-get install nodejs npm)" >&2
  exit 1
fi
if [ ! -x report/node_modules/.bin/allure ]; then
  npm ci --prefix report --no-audit --no-fund --loglevel=error
fi
echo "setup: done. The hil command is .venv/bin/hil"

"""Flash performance against the issue's targets, with the peers measured in the same run.

Run as root under umockdev: ``umockdev-wrapper .venv/bin/python bench/flash.py [--size-mib 1024]
[--rates 35,0]``. It builds (once, kept in --work) a Raspberry-Pi-OS-Lite-shaped image: MBR, FAT32 boot
at 4 MiB, ext4 root holding real binaries from this host's /usr up to about half the image, compressed
with ``xz -T0 -6`` (threaded: independent blocks) and described by ``bmaptool create``. A virtual CM4
is flashed through the flash flow (hil/flows/flash.py, in a rig session: USB boot to mass storage each time, not
counted); then, per eMMC rate, one row per flow:

- hil flash of the .xz without a .bmap, write + verify, against the physical limit (mapped bytes /
  write rate + mapped bytes / read rate) and against ``xz -dc | dd bs=4M oflag=direct conv=fsync``
  followed by ``cmp`` of the whole image;
- hil flash alone (no verify, no .bmap, no cache) against ``bmaptool copy`` given the .bmap;
- a second hil flash of the same .xz, from the decompressed-image cache (no decoder runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hil.control.lifecycle import Lifecycle
from hil.flash.cache import ImageCache
from hil.flash.ranges import read_bmap
from hil.flash.sources import Image, open_image
from hil.flows.flash import flash_emmc
from hil.image import compress as packing
from hil.image.build import ImageSpec, build_image
from hil.image.tools import tool_env
from hil.rig import load_rig
from hil.session import RigSession
from hil.virtual.usb.payloads import make_payload

MiB = 1024**2
PROBE = 64 * MiB  # bytes dd writes and reads to measure the device itself
REPO = Path(__file__).resolve().parent.parent


def populate(image: Path, offset: int, want: int) -> int:
    """Copy real files from /usr into the ext4 root with debugfs until ``want`` bytes; the bytes copied."""
    commands, total, n = ["mkdir /opt/usr-copy"], 0, 0
    for folder in ("/usr/lib", "/usr/bin", "/usr/share"):
        for dirpath, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(dirpath, name)
                if os.path.islink(path) or not os.path.isfile(path) or any(c in path for c in ' "\n'):
                    continue
                size = os.path.getsize(path)
                if total + size > want:
                    continue
                commands.append(f'write "{path}" /opt/usr-copy/f{n}')
                total, n = total + size, n + 1
                if total >= want * 0.98:
                    break
    script = image.with_suffix(".debugfs")
    script.write_text("mkdir /opt\n" + "\n".join(commands) + "\n")
    subprocess.run(["debugfs", "-w", "-f", str(script), f"{image}?offset={offset}"], check=True,
                   capture_output=True, env=tool_env())
    script.unlink()
    return total


def bench_image(work: Path, size: int) -> tuple[Path, Path, Path]:
    raw = work / f"rpios-lite-{size // MiB}.img"
    xz, bmap = packing.output_path(raw, "xz"), packing.output_path(raw, "bmap")
    if not (xz.exists() and bmap.exists()):
        print(f"building {raw} (real binaries, xz -T0 -6, bmaptool create; done once) ...", file=sys.stderr)
        built = build_image(raw, ImageSpec(size=size, boot_size=min(512 * MiB, size // 4), fill=0))
        root = built.layout.partition(2)
        populate(raw, root.start, size // 2 - 40 * MiB)
        packing.compress(raw, ("xz",))
        packing.write_bmap(raw)
    return raw, xz, bmap


def timed(action: Callable[[], object]) -> float:
    start = time.monotonic()
    action()
    return time.monotonic() - start


def flash(lifecycle: Lifecycle, image: Image, verify: bool, cache: ImageCache | None) -> tuple[float, int]:
    """Seconds for one flash through the flash flow (write and read-back; USB boot not counted), and the bytes it
    wrote."""
    result = flash_emmc(lifecycle, image, verify=verify, cache=cache)
    assert result.write is not None
    return result.seconds, result.write.bytes_written


def shell(cmd: str) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, env=tool_env(), stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="image size (the issue asks for 2048)")
    parser.add_argument("--rates", default="35,0", help="eMMC MB/s to run at, 0 = unlimited (default 35,0)")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/cm-hil-bench"), help="keeps the built image")
    args = parser.parse_args()
    if os.geteuid() != 0 or "libumockdev-preload" not in os.environ.get("LD_PRELOAD", ""):
        sys.exit("run as root under umockdev-wrapper")
    args.work.mkdir(parents=True, exist_ok=True)
    raw, xz, bmap_path = bench_image(args.work, args.size_mib * MiB)
    image_size = raw.stat().st_size
    mapped = read_bmap(bmap_path).mapped_bytes
    bare = args.work / "no-bmap"  # the same .xz where no .bmap sits next to it
    bare.mkdir(exist_ok=True)
    if not (bare / xz.name).exists():
        os.link(xz, bare / xz.name)
    with tempfile.TemporaryDirectory(prefix="hil-bench-") as tmp:
        rig = load_rig(REPO / "rigs" / "virtual-cm4.toml")
        assert rig.virtual is not None
        rig = dataclasses.replace(rig, emmc_size=-(-image_size // (256 * MiB)) * 256 * MiB + 256 * MiB,
                                  payload=make_payload(Path(tmp), "mass-storage-gadget64", ("cm4",),
                                                       boot_img_size=MiB),
                                  virtual=dataclasses.replace(rig.virtual, state_dir=Path(tmp) / "state"))
        print(f"image {raw.name}: {image_size / MiB:.0f} MiB, {mapped / MiB:.0f} MiB mapped "
              f"({100 * mapped / image_size:.1f} %), .xz {xz.stat().st_size / MiB:.0f} MiB; virtual cm4 eMMC "
              f"{rig.emmc_size / MiB:.0f} MiB behind umockdev USB", flush=True)
        rows: list[tuple[str, ...]] = []
        with RigSession(rig) as session:
            virtual = session.body  # the rig's virtual module (hil.virtual.rig.VirtualRig): its eMMC's rates
            lifecycle = session.lifecycle
            loop = virtual.emmc.block_device
            cache = ImageCache(Path(tmp) / "cache")
            image = open_image(bare / xz.name, rig.emmc_size)
            for rate in (float(r) for r in args.rates.split(",")):
                virtual.emmc.set_rates(rate * 1e6, rate * 1e6)
                label = f"{rate:g} MB/s" if rate else "unlimited"
                shutil.rmtree(cache.root, ignore_errors=True)
                ours, written = flash(lifecycle, image, True, cache)
                alone, _ = flash(lifecycle, image, False, None)
                again, _ = flash(lifecycle, image, False, cache)
                dd_cmp = timed(lambda: shell(f"xz -dc {xz} | dd of={loop} bs=4M oflag=direct conv=fsync iflag=fullblock"
                                             f" status=none && xz -dc {xz} | cmp -n {image_size} - {loop}"))
                device = [timed(lambda: shell(f"dd if=/dev/zero of={loop} bs=4M count={PROBE // (4 * MiB)} "
                                              "oflag=direct status=none")),
                          timed(lambda: shell(f"dd if={loop} of=/dev/null bs=4M count={PROBE // (4 * MiB)} "
                                              "iflag=direct status=none"))]
                measured = mapped / (PROBE / device[0]) + mapped / (PROBE / device[1])
                bmaptool = timed(lambda: shell(f"bmaptool -q copy --bmap {bmap_path} {xz} {loop}"))
                limit = 2 * mapped / (rate * 1e6) if rate else 0.0
                rows += [
                    (label, "hil .xz, no .bmap: write + verify", f"{ours:.1f}",
                     (f"{ours / limit:.2f}x modelled limit ({limit:.1f} s; target <= 1.1); " if limit else "")
                     + f"{ours / measured:.2f}x measured limit ({measured:.1f} s)",
                     f"{ours / dd_cmp:.2f}x dd+cmp (target <= 0.5)"),
                    (label, "xz -dc | dd oflag=direct conv=fsync; cmp", f"{dd_cmp:.1f}", "", ""),
                    (label, "hil .xz, no .bmap: write only", f"{alone:.1f}",
                     f"{alone / bmaptool:.2f}x bmaptool copy (target <= 1.0)", ""),
                    (label, "bmaptool copy .xz with .bmap", f"{bmaptool:.1f}", "", ""),
                    (label, "hil .xz again (cache): write only", f"{again:.1f}",
                     f"{again / alone:.2f}x first write-only flash", "no decoder"),
                    (label, "device: dd direct 4M write / read", f"{PROBE / device[0] / 1e6:.1f} / "
                     f"{PROBE / device[1] / 1e6:.1f} MB/s", f"hil wrote {written / MiB:.0f} MiB "
                     f"(bmap maps {mapped / MiB:.0f} MiB)", ""),
                ]
                print(f"{label}: done", file=sys.stderr, flush=True)
    widths = [max(len(r[i]) for r in rows + [HEADER]) for i in range(len(HEADER))]
    for row in [HEADER, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return 0


HEADER = ("eMMC", "flow", "seconds", "ratio", "ratio")

if __name__ == "__main__":
    sys.exit(main())

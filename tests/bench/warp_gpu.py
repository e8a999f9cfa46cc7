#!/usr/bin/env python3
"""make bench, issue #3: registered/ through the mount with the CUDA warp.

Runnable alone (python3 tests/bench/warp_gpu.py): writes a Markdown section
to stdout and appends it to docs/benchmarks.md; prints one line and exits 0
when the build has no CUDA or the machine no device (tests/test_warp
--bench-gpu is the probe).  Uses tests/bench/warp.py's source (run.py's
generated SIZE x SIZE, 4-channel uint16 pyramid; $SCOPEFS_BENCH_SIZE sizes
it) and its transforms.

Measures, for the affine and the affine + field transforms: `cp
registered/moving.ome.tif` with a cold cache, gpu=auto against gpu=off,
in one run on one machine: wall time, the daemon's CPU seconds and peak
RSS.  The two copies must be byte-identical (the CUDA kernel's arithmetic
is the CPU kernel's), so the test also compares the whole files.
"""
import datetime
import filecmp
import os
import platform
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as core  # noqa: E402  (make_source, publish, WORK)
import warp  # noqa: E402  (make_raw, write_transforms, mount, cpu_seconds)

WORK = core.WORK


def has_gpu():
    exe = os.path.join(warp.BUILD, "tests", "test_warp")
    r = subprocess.run([exe, "--bench-gpu", "bilinear", "0"], capture_output=True, text=True)
    return r.returncode == 0


def cp_once(raw, tdir, gpu, out):
    m = warp.mount(raw, tdir, os.path.join(WORK, "warp-gpu-cache"), f"mem=128M,gpu={gpu}")
    t0 = time.perf_counter()
    shutil.copyfile(os.path.join(m.mnt, "registered", "moving.ome.tif"), out)
    secs = time.perf_counter() - t0
    cpu = warp.cpu_seconds(m.proc.pid)
    rss = m.close()
    return secs, cpu, rss


def section():
    os.makedirs(WORK, exist_ok=True)
    if not has_gpu():
        return None
    smi = shutil.which("nvidia-smi")
    gpu_name = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip() if smi else "?"

    src = os.path.join(WORK, "raw", "reference.ome.tif")
    os.makedirs(os.path.dirname(src), exist_ok=True)
    t0 = time.perf_counter()
    core.make_source(src)
    made = time.perf_counter() - t0
    raw = warp.make_raw(src)
    rows = []
    for field, label in ((False, "affine"), (True, "affine + field")):
        tdir = os.path.join(WORK, "tf-field" if field else "tf-affine")
        warp.write_transforms(tdir, field)
        outs = {}
        for gpu in ("auto", "off"):
            outs[gpu] = os.path.join(WORK, f"warp-gpu-{gpu}.ome.tif")
            secs, cpu, rss = cp_once(raw, tdir, gpu, outs[gpu])
            size = os.path.getsize(outs[gpu])
            rows.append((f"cp registered/moving.ome.tif, cold, {label}, gpu={gpu}",
                         f"{secs:.1f} s ({size / secs / 1e6:.0f} MB/s)", f"{cpu:.1f} s",
                         f"{rss / 1024:.0f} MB"))
            print(" | ".join(rows[-1]), flush=True)
        same = filecmp.cmp(outs["auto"], outs["off"], shallow=False)
        rows.append((f"{label}: gpu=auto and gpu=off files byte-identical", str(same), "", ""))
        for p in outs.values():
            os.unlink(p)
    lines = [
        f"## {datetime.date.today().isoformat()} — issue #3 warp through the mount, GPU "
        f"({gpu_name}; {platform.node()}, {os.cpu_count()} cores)",
        "",
        f"{warp.SIZE} x {warp.SIZE} x {warp.CHANNELS} uint16 source (made in {made:.0f} s), "
        "daemon mem=128M, default threads, cold cache each time.",
        "",
        "| measure | time | daemon CPU | daemon peak RSS |",
        "| --- | --- | --- | --- |",
    ] + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows] + [""]
    return "\n".join(lines)


def main():
    text = section()
    if text is None:
        print("warp_gpu: no CUDA device or no CUDA in this build; skipped")
        return 0
    core.publish(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

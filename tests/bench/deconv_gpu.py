#!/usr/bin/env python3
"""make bench, issue #4: the GPU (cuFFT) engine, when a CUDA device is there.

Runnable alone (python3 tests/bench/deconv_gpu.py): writes a Markdown
section to stdout and appends it to docs/benchmarks.md; prints one line and
exits 0 when the build has no CUDA or the machine no device.  Data lives in
$SCOPEFS_BENCH_DIR (default /tmp/scopefs-bench); $SCOPEFS_BUILD (default
build) names the build folder.  $SCOPEFS_GPU_STACK=Z,Y,X sizes the
end-to-end stack (default 512,2048,2048, issue #4's).

Measures, in voxel-iterations per second (voxels x RL iterations / wall):
  1. the engine alone (tests/test_deconv --rl, plain RL, the block on the
     device from upload to download, plan made outside the timing) on
     cuFFT at three block shapes, against the FFTW engine with every core
     on the first; the cuFFT and FFTW outputs are compared (relative L2,
     issue #4's bound 1e-4);
  2. `cp -r deconvolved/ out/` (twice) of a generated uint16 light-sheet stack,
     preset lightsheet-lsdeconv, gpu=auto, cold cache: time, daemon peak
     RSS, and which workers took the device (daemon log);
  3. parity through the mount: a 512 x 512 x 128 stack copied with gpu=auto
     and with gpu=off; the planes must agree within one grey level.
"""
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import tifffile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deconv as cpu_bench  # noqa: E402  (make_stack, cp_tree, REFERENCE PSF)
import run as core  # noqa: E402  (Mount, WORK)

ROOT = core.ROOT
BUILD = cpu_bench.BUILD
WORK = core.WORK
STACK = tuple(int(v) for v in os.environ.get("SCOPEFS_GPU_STACK", "512,2048,2048").split(","))
ENGINE_SHAPES = [(64, 256, 256), (256, 512, 512), (512, 512, 512)]
ENGINE_PSF = 15
ENGINE_IT = 10


def rl(exe, vol_path, shape, psf_path, out_path, *opts):
    nz, ny, nx = shape
    k = str(ENGINE_PSF)
    r = subprocess.run([exe, "--rl", vol_path, str(nx), str(ny), str(nz), psf_path, k, k, k,
                        out_path, f"numit={ENGINE_IT}", "init=0.5", *opts],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"test_deconv --rl {' '.join(opts)}: {r.stderr[-600:]}")
    return dict(kv.split("=") for kv in r.stdout.split())


def engine_rows(exe):
    rows = []
    psf = np.full((ENGINE_PSF,) * 3, 1.0 / ENGINE_PSF ** 3, np.float32)
    psf_path = os.path.join(WORK, "gpu-psf.raw")
    psf.tofile(psf_path)
    rel = None
    for i, shape in enumerate(ENGINE_SHAPES):
        rng = np.random.default_rng(7 + i)
        vol = rng.uniform(0.1, 1.0, size=shape).astype(np.float32)
        vin, vgpu, vcpu = (os.path.join(WORK, n) for n in ("gpu-in.raw", "gpu-out.raw",
                                                           "cpu-out.raw"))
        vol.tofile(vin)
        info = rl(exe, vin, shape, psf_path, vgpu, "engine=cufft", "repeat=5")
        secs = float(info["seconds"])
        rate = vol.size * ENGINE_IT / secs
        name = f"{shape[2]} x {shape[1]} x {shape[0]}"
        rows.append((f"cuFFT engine, {name}", f"{secs * 1e3:.1f} ms", f"{rate / 1e9:.2f} G",
                     f"fft {info['fft']}"))
        if i == 0:
            threads = os.cpu_count()
            c = rl(exe, vin, shape, psf_path, vcpu, "engine=fftw", f"threads={threads}",
                   "repeat=2")
            cs = float(c["seconds"])
            rows.append((f"FFTW engine, {name}, {threads} threads", f"{cs * 1e3:.1f} ms",
                         f"{vol.size * ENGINE_IT / cs / 1e9:.2f} G", ""))
            a = np.fromfile(vgpu, np.float32).astype(np.float64)
            b = np.fromfile(vcpu, np.float32).astype(np.float64)
            rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        for f in (vin, vgpu, vcpu):
            if os.path.exists(f):
                os.unlink(f)
    os.unlink(psf_path)
    return rows, rel


def make_big_stack(folder, shape):
    """A light-sheet-like stack: the CPU bench's 128 x 512 x 512 blurred,
    noisy volume (tests/bench/deconv.py) tiled to `shape`; made once."""
    done = os.path.join(folder, ".complete")
    if os.path.exists(done):
        return
    unit_dir = os.path.join(WORK, "deconv-raw", cpu_bench.STACK_NAME)
    cpu_bench.make_stack(unit_dir)
    unit = np.load(os.path.join(WORK, "deconv-stack.npy"))
    reps = [-(-s // u) for s, u in zip(shape, unit.shape)]
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    nz, ny, nx = shape
    plane_tile = np.tile(unit, (1, reps[1], reps[2]))[:, :ny, :nx]
    for z in range(nz):
        # mirror every other copy along z so no plane repeats its neighbour's block
        k = z % unit.shape[0] if (z // unit.shape[0]) % 2 == 0 else \
            unit.shape[0] - 1 - z % unit.shape[0]
        tifffile.imwrite(os.path.join(folder, "img_%06d.tif" % (z + 1)), plane_tile[k],
                         metadata=None)
    open(done, "w").close()


def daemon_log_lines(since):
    with open(os.path.join(WORK, "daemon.log"), errors="replace") as f:
        f.seek(since)
        text = f.read()
    keep = [ln for ln in text.splitlines() if re.search(r"CUDA|GPU|device|CPU|worker time", ln)]
    return keep[:8]


def log_size():
    p = os.path.join(WORK, "daemon.log")
    return os.path.getsize(p) if os.path.exists(p) else 0


def mount_cp(raw, opts, tag):
    cache = os.path.join(WORK, f"gpu-cache-{tag}")
    mnt = os.path.join(WORK, "gpu-mnt")
    out = os.path.join(WORK, f"gpu-out-{tag}")
    shutil.rmtree(cache, ignore_errors=True)
    core.drop_caches()
    since = log_size()
    m = core.Mount(raw, mnt, cache, "preset=lightsheet-lsdeconv," + opts)
    secs = cpu_bench.cp_tree(os.path.join(mnt, "deconvolved"), out)
    st = m.status()
    rss = m.close()
    shutil.rmtree(cache, ignore_errors=True)
    return secs, rss, st, daemon_log_lines(since), out


def parity():
    raw = os.path.join(WORK, "deconv-raw")
    cpu_bench.make_stack(os.path.join(raw, cpu_bench.STACK_NAME))
    g_secs, _, _, g_log, g_out = mount_cp(raw, "gpu=auto", "parity-gpu")
    c_secs, _, _, _, c_out = mount_cp(raw, "gpu=off", "parity-cpu")
    names = sorted(os.listdir(os.path.join(g_out, cpu_bench.STACK_NAME)))
    worst, differ, total = 0, 0, 0
    for n in names:
        a = tifffile.imread(os.path.join(g_out, cpu_bench.STACK_NAME, n)).astype(np.int64)
        b = tifffile.imread(os.path.join(c_out, cpu_bench.STACK_NAME, n)).astype(np.int64)
        worst = max(worst, int(np.abs(a - b).max()))
        differ += int((a != b).sum())
        total += a.size
    shutil.rmtree(g_out)
    shutil.rmtree(c_out)
    return worst, differ / total, g_secs, c_secs, g_log


def engine_lines(gpu, rows, rel):
    return [
        f"## {datetime.date.today().isoformat()} — issue #4 deconvolution, GPU "
        f"({gpu}; {platform.node()}, {os.cpu_count()} cores)",
        "",
        f"1. RL engine alone: float32 blocks, uniform {ENGINE_PSF}^3 PSF, {ENGINE_IT} "
        "iterations: mean seconds per block over the runs (upload, iterations, "
        "download; plan made before).",
        "",
        "| engine | per block | voxel-iterations/s | note |",
        "| --- | --- | --- | --- |",
    ] + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows] + [
        "",
        f"- cuFFT vs FFTW on the first shape: relative L2 {rel:.1e} (bound 1e-4).",
        "",
    ]


def section():
    os.makedirs(WORK, exist_ok=True)
    exe = os.path.join(BUILD, "tests", "test_deconv")
    probe = subprocess.run([exe], capture_output=True, text=True)
    if "GPU vs CPU" not in probe.stdout:
        return None
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    rows, rel = engine_rows(exe)
    print("\n".join(" | ".join(r) for r in rows), flush=True)
    try:
        worst, frac, g_secs, c_secs, g_log = parity()
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        print(f"parity through the mount failed: {err}", flush=True)
        return "\n".join(engine_lines(gpu, rows, rel))
    print(f"parity: max |gpu - cpu| {worst}, {frac:.2e} of voxels differ", flush=True)
    nz, ny, nx = STACK
    name = f"{nx}x{ny}x{nz}"
    raw = os.path.join(WORK, "gpu-raw")
    t0 = time.perf_counter()
    make_big_stack(os.path.join(raw, name), STACK)
    made = time.perf_counter() - t0
    e2e = []
    t_e2e = time.perf_counter()
    # twice: the spread between two cold runs is about 10 %
    for opts, tag in (("gpu=auto,mem=8G", "auto-8G"), ("gpu=auto,mem=8G", "auto-8G-again")):
        if time.perf_counter() - t_e2e > float(os.environ.get("SCOPEFS_GPU_E2E_S", "150")):
            break  # the lease is short: the second run only when the first was quick
        secs, rss, st, log, out = mount_cp(raw, opts, tag)
        shutil.rmtree(out)
        rate = nz * ny * nx * cpu_bench.STACK_IT / secs
        e2e.append((f"cp -r deconvolved/, cold, {opts} ({st['threads']} threads)",
                    f"{secs:.1f} s", f"{rate / 1e9:.2f} G", f"{rss / 1024:.0f} MB",
                    f"{st['tiles_computed']} units, disk cache writes "
                    f"{st.get('cache_write_s', 0):.1f} s of worker time; log: " +
                    " / ".join(ln for ln in log if "worker time" in ln)))
        print(" | ".join(e2e[-1]), flush=True)
    lines = engine_lines(gpu, rows, rel) + [
        f"2. Through the mount: {nx} x {ny} x {nz} uint16 planes (made in {made:.0f} s), "
        f"preset lightsheet-lsdeconv ({cpu_bench.STACK_IT} iterations, reference PSF).",
        "",
        "| measure | time | voxel-iterations/s | peak RSS | note |",
        "| --- | --- | --- | --- | --- |",
    ] + [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in e2e] + [
        "",
        f"3. Parity through the mount (512 x 512 x 128): gpu=auto {g_secs:.1f} s, gpu=off "
        f"{c_secs:.1f} s; max |GPU - CPU| = {worst} grey levels, {frac:.1e} of voxels "
        f"differ. GPU log: {' / '.join(g_log[:2])}",
        "",
    ]
    return "\n".join(lines)


def main():
    text = section()
    if text is None:
        print("deconv_gpu: no CUDA device or no CUDA in this build; skipped")
        return 0
    core.publish(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

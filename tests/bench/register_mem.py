#!/usr/bin/env python3
"""make bench: memory and time of scopefs's own registration (issue #5).

"Peak memory of the whole step stays under 1 GB for 8 slides of 30k x 30k."
Eight 30000 x 30000 OME-TIFF pyramids (levels 30000 ... 938, uint16, one
DAPI channel) are written to $SCOPEFS_BENCH_DIR/reg30k: a reference and
seven moving slides, each the reference's tissue turned by a known
similarity (any angle, some mirrored).  Registration reads only the level
whose side is just above reg_nonrigid_dim (3750 px here), so only that
level and those below it hold tissue; the three finest levels are zero
tiles (pre-compressed, so the files stay small).  Their sizes and tiling
are those of a real 30k slide, which is what the thumbnail reader sees.

The mount runs with reg_eager=1 and default options; the bench polls
.scopefs/status until every slide is served or rejected, then reads the
daemon's VmHWM (peak RSS).  The known similarity gives each slide's
landmark error at level 0.  A section goes to stdout and
docs/benchmarks.md.
"""
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import zlib

import numpy as np
import tifffile
from scipy import ndimage as ndi

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import gen  # noqa: E402

SCOPEFS = os.environ.get("SCOPEFS_BIN", os.path.join(ROOT, "build", "scopefs"))
WORK = os.path.join(os.environ.get("SCOPEFS_BENCH_DIR", "/tmp/scopefs-bench"), "reg30k")
SIZE = 30000
LEVELS = [30000, 15000, 7500, 3750, 1875, 938]
REAL_FROM = 3  # levels from this index on hold tissue
SLIDES = 8
TILE = 512


def similarity(rng, i):
    """Backward level-0 map (3x3) reference px -> slide i px: rotation about
    the centre, mirror for odd i, scale 0.95-1.05, shift up to 3% of the size."""
    theta = rng.uniform(-np.pi, np.pi)
    s = rng.uniform(0.95, 1.05)
    lin = s * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    if i % 2:
        lin = lin @ np.diag([-1.0, 1.0])
    c = np.array([(SIZE - 1) / 2.0] * 2)
    t = c + rng.uniform(-0.03, 0.03, 2) * SIZE - lin @ c
    m = np.eye(3)
    m[:2, :2], m[:2, 2] = lin, t
    return m


def level_map(m, f):
    """m between level-0 pixels as a map between pixels of a level with downsample f."""
    s = np.array([[f, 0, 0.5 * (f - 1)], [0, f, 0.5 * (f - 1)], [0, 0, 1.0]])
    return np.linalg.inv(s) @ m @ s


def zero_tiles(side):
    zero = zlib.compress(np.zeros((TILE, TILE), np.uint16).tobytes(), 6)
    n = -(-side // TILE)
    for _ in range(n * n):
        yield zero


def write_slide(path, real_level):
    """An OME-TIFF: zero tiles above REAL_FROM, real_level and its reductions below."""
    real = [real_level]
    while len(real) < len(LEVELS) - REAL_FROM:
        real.append(gen.box_reduce(real[-1][None, :, :, None], 2)[0, :, :, 0])
    meta = {"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "Channel": {"Name": ["DAPI"]}}
    kw = dict(tile=(TILE, TILE), compression="zlib", photometric="minisblack")
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(zero_tiles(SIZE), shape=(SIZE, SIZE), dtype=np.uint16, subifds=len(LEVELS) - 1,
                 metadata=meta, **kw)
        for side in LEVELS[1:REAL_FROM]:
            tw.write(zero_tiles(side), shape=(side, side), dtype=np.uint16, subfiletype=1, **kw)
        for lv in real:
            tw.write(lv, subfiletype=1, **kw)


def make_data():
    raw = os.path.join(WORK, "raw")
    truth_path = os.path.join(WORK, "truth.json")
    if os.path.exists(truth_path):
        return raw, json.load(open(truth_path))
    os.makedirs(raw, exist_ok=True)
    rng = np.random.default_rng(30000)
    side = LEVELS[REAL_FROM]
    f = SIZE / side
    ref = gen.tissue(side, side, channels=1, seed=7)[0].astype(np.float32)
    truth = {}
    write_slide(os.path.join(raw, "slide0.ome.tif"), ref.astype(np.uint16))
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
    for i in range(1, SLIDES):
        m = similarity(rng, i)
        # slide(m x) = ref(x): the slide at y samples ref at m^-1 y.
        inv = level_map(np.linalg.inv(m), f)
        sx = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
        sy = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
        mov = ndi.map_coordinates(ref, [sy, sx], order=1, cval=0)
        mov += rng.normal(0, 20, mov.shape)
        write_slide(os.path.join(raw, f"slide{i}.ome.tif"),
                    np.clip(mov, 0, 65535).astype(np.uint16))
        truth[f"slide{i}"] = m.tolist()
    json.dump(truth, open(truth_path, "w"))
    return raw, truth


def vm_hwm_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def landmark_error(json_path, m_true, rng):
    """Median and max TRE (level-0 px) of 200 points inside the tissue square."""
    t = json.load(open(json_path))
    a = np.array(t["matrix"], dtype=np.float64)
    pts = rng.uniform(0.25 * SIZE, 0.75 * SIZE, (200, 2))
    h = np.c_[pts, np.ones(len(pts))]
    got = (a @ h.T).T[:, :2]  # the field adds at most a few px; see the status
    want = (np.array(m_true) @ h.T).T[:, :2]
    err = np.hypot(*(got - want).T)
    return float(np.median(err)), float(err.max())


def main():
    raw, truth = make_data()
    mnt = os.path.join(WORK, "mnt")
    cache = os.path.join(WORK, "cache")
    subprocess.run(["rm", "-rf", cache])
    os.makedirs(mnt, exist_ok=True)
    t0 = time.time()
    proc = subprocess.Popen([SCOPEFS, "-f", "-o", f"cache={cache},reg_eager=1,reference=slide0",
                             raw, mnt], stderr=subprocess.PIPE)
    states = {}
    try:
        while time.time() - t0 < 1200:
            time.sleep(0.5)
            try:
                st = json.load(open(os.path.join(mnt, ".scopefs", "status")))
            except (OSError, ValueError):
                continue
            states = {s["name"]: s["state"] for s in st["slides"] if s["name"] != "slide0"}
            if states and all(not v.startswith("registering") for v in states.values()):
                break
        seconds = time.time() - t0
        hwm = vm_hwm_mb(proc.pid)
        rng = np.random.default_rng(1)
        rows = []
        for name in sorted(truth):
            served = states.get(name, "").startswith("served")
            med, worst = (landmark_error(os.path.join(mnt, "transforms", name + ".json"),
                                         truth[name], rng) if served else (float("nan"),) * 2)
            rows.append((name, served, med, worst))
    finally:
        subprocess.run(["fusermount3", "-u", mnt])
        proc.wait(timeout=60)
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    out = [f"\n## Issue #5: registration of 8 slides of 30k x 30k ({when}, "
           f"{platform.node()}, {os.cpu_count()} CPUs)\n",
           "`tests/bench/register_mem.py`: mount with `reg_eager=1`, default options "
           f"(reg_dim 1024, reg_nonrigid_dim 2000, threads {os.cpu_count()}); thumbnails from the "
           "3750 px level.\n",
           f"- whole step (8 slides, cold cache): {seconds:.1f} s; daemon peak RSS (VmHWM) "
           f"**{hwm:.0f} MB** (target < 1024 MB)",
           "\n| slide | served | median TRE, level-0 px (affine part) | max TRE |",
           "|---|---|---|---|"]
    for name, served, med, worst in rows:
        out.append(f"| {name} | {'yes' if served else 'no: ' + states.get(name, '?')} | "
                   f"{med:.2f} | {worst:.2f} |")
    text = "\n".join(out) + "\n"
    print(text)
    with open(os.path.join(ROOT, "docs", "benchmarks.md"), "a") as f:
        f.write(text)
    return 0 if hwm < 1024 and all(r[1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

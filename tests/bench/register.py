#!/usr/bin/env python3
"""make bench, issue #5: scopefs's built-in registration against elastix, side by side.

    /usr/bin/python3 tests/bench/register.py [--pairs N] [--quick] [--no-cog] [--no-append]

Synthetic pairs made by independent code (tests/integration/reg_pairs.py,
numpy/scipy only): a tissue section (nuclei, stroma, a patchy marker, holes,
an irregular outline) on a world grid; the reference slide is a crop of it,
the moving slide samples it through a known map -- a random similarity (any
angle, a mirror in half the pairs, scale 0.87-1.15, a shift), a small affine
part (shear, anisotropy) and a smooth deformation (Gaussian bumps, up to ~1%
of the slide) -- then both are rendered with their own intensities and
noise, and some moving slides lose a disc of tissue.  Four kinds, in turn:
fluorescence (DAPI + a marker; gain/gamma change) twice, brightfield H&E to
H&E (stain strength change), and H&E to IHC (hematoxylin + DAB: a different
stain).  Slides are 2000-2800 px at level 0 with 3 levels (OME-TIFF,
SubIFDs).  >= 60 landmarks per pair on tissue both slides share; the truth
is each landmark mapped through the known map (inverted exactly).

Methods, on the same pairs in one run:
  scopefs   a real mount of the pair (reference=ref, reg_eager=1, all
            else default: what a user gets); landmarks are mapped
            through transforms/mov.json by a numpy evaluation of the JSON
            format (docs/transforms.md: matrix + bilinear field), not by
            scopefs code.  Time: from starting the daemon until its status
            says the slide is registered.  Memory: the daemon's VmHWM.
  elastix   Debian's elastix 5.0.1: affine then B-spline, both
            AdvancedMattesMutualInformation, multi-resolution, adaptive
            stochastic gradient descent (parameter files written below), on
            level 0 of both slides (--elastix-level; the DAPI channel, or the
            mean optical density for RGB), with Spacing/Origin set so that
            physical coordinates are level-0 pixels.  Level 0, because on
            level 1 elastix was about 6x less accurate (median TRE 0.64 px
            against 0.10 px over 20 pairs) and hardly faster: its cost is
            set by the iterations and samples, not the image size.
            Landmarks go through `transformix -def`.  Two inits:
              "elastix (true similarity init)": given the TRUE similarity
                part of the map (rotation, mirror, scale, shift) as the
                initial transform -- information no real user has; elastix
                only has to find the shear and the deformation;
              "elastix (CenterOfGravity init)": truth-free, elastix's own
                AutomaticTransformInitialization (centres of gravity); it
                cannot find large rotations or mirrors.
            Time and peak memory from /usr/bin/time -v (the images' .mha
            files are written beforehand and not timed).

Measures (ANHIR/ACROBAT): TRE in level-0 moving pixels, rTRE = TRE / the
reference's level-0 diagonal; per pair the median and 90th percentile over the
landmarks; over pairs the median of those and the 90th percentile of the
per-pair medians.  A pair a method fails on (no transform) counts as TRE =
infinity.  Appends a dated section to docs/benchmarks.md.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import tifffile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import gen  # noqa: E402  (pyramids, OME writer)
import reg_pairs as rp  # noqa: E402

BUILD = os.environ.get("SCOPEFS_BUILD", os.path.join(ROOT, "build"))
SCOPEFS = os.environ.get("SCOPEFS_BIN", os.path.join(BUILD, "scopefs"))
WORK = os.environ.get("SCOPEFS_BENCH_DIR", "/tmp/scopefs-bench") + "/register"
KINDS = ["fluo", "fluo", "he-he", "he-ihc"]
N_LANDMARKS = 60
LEVELS = 3
ELASTIX_LEVEL = 0
REG_TIMEOUT_S = 300
IHC_METRIC = ""  # --ihc-metric: reg_metric for the H&E -> IHC pairs ("" = scopefs's default)

ELASTIX_COMMON = """\
(FixedInternalImagePixelType "float")
(MovingInternalImagePixelType "float")
(FixedImageDimension 2)
(MovingImageDimension 2)
(UseDirectionCosines "true")
(Registration "MultiResolutionRegistration")
(Interpolator "BSplineInterpolator")
(ResampleInterpolator "FinalBSplineInterpolator")
(Resampler "DefaultResampler")
(FixedImagePyramid "FixedSmoothingImagePyramid")
(MovingImagePyramid "MovingSmoothingImagePyramid")
(Optimizer "AdaptiveStochasticGradientDescent")
"""

AFFINE_PARAMS = """\
// affine stage: Mattes MI, 4 resolutions
""" + ELASTIX_COMMON + """\
(Transform "AffineTransform")
(Metric "AdvancedMattesMutualInformation")
(NumberOfHistogramBins 32)
(AutomaticScalesEstimation "true")
(AutomaticTransformInitialization "{auto_init}")
(AutomaticTransformInitializationMethod "CenterOfGravity")
(HowToCombineTransforms "Compose")
(NumberOfResolutions 4)
(MaximumNumberOfIterations 250)
(NumberOfSpatialSamples 2048)
(NewSamplesEveryIteration "true")
(ImageSampler "RandomCoordinate")
(BSplineInterpolationOrder 1)
(FinalBSplineInterpolationOrder 3)
(DefaultPixelValue 0)
(WriteResultImage "false")
(ResultImagePixelType "float")
(ResultImageFormat "mha")
"""

BSPLINE_PARAMS = """\
// B-spline stage: Mattes MI, 3 resolutions, final grid 128 level-0 px
""" + ELASTIX_COMMON + """\
(Transform "BSplineTransform")
(Metric "AdvancedMattesMutualInformation")
(NumberOfHistogramBins 32)
(FinalGridSpacingInPhysicalUnits 128)
(GridSpacingSchedule 4 2 1)
(HowToCombineTransforms "Compose")
(NumberOfResolutions 3)
(MaximumNumberOfIterations 250)
(NumberOfSpatialSamples 2048)
(NewSamplesEveryIteration "true")
(ImageSampler "RandomCoordinate")
(BSplineInterpolationOrder 1)
(FinalBSplineInterpolationOrder 3)
(DefaultPixelValue 0)
(WriteResultImage "false")
(ResultImagePixelType "float")
(ResultImageFormat "mha")
"""


# --- pairs ----------------------------------------------------------------------


class Pair:
    """One generated pair on disk, with its truth."""


def make_pair(i, seed, folder):
    """Pair i: writes folder/raw/{ref,mov}.ome.tif and returns a Pair."""
    rng = np.random.default_rng([seed, i])
    kind = KINDS[i % len(KINDS)]
    W, H = int(rng.uniform(2000, 2800)), int(rng.uniform(2000, 2800))
    world = rp.SlideWorld(rng, int(H * 1.35), int(W * 1.35), fill=0.4)
    origin = ((world.w - W) // 2, (world.h - H) // 2)
    mw, mh = int(W * rng.uniform(0.9, 1.1)), int(H * rng.uniform(0.9, 1.1))
    theta = rng.uniform(0, 2 * np.pi)
    scale = np.exp(rng.uniform(np.log(0.87), np.log(1.15)))
    mirror = bool(rng.random() < 0.5)
    shift = rng.uniform(-0.05, 0.05, 2) * (mw, mh)
    shear, aniso = rng.uniform(-0.05, 0.05), np.exp(rng.uniform(-0.04, 0.04))
    amp = rng.uniform(4, 0.01 * np.hypot(W, H))
    pair = rp.make_slide_pair(rng, world, (W, H), origin, (mw, mh), theta, scale, mirror, shift,
                              shear, aniso, amp)
    rs, ms = pair.reference_stains(), pair.moving_stains()
    avoid = rp.tear(ms, rng) if rng.random() < 0.4 else None
    marks = pair.landmarks(rng, N_LANDMARKS, avoid=avoid)
    raw = os.path.join(folder, "raw")
    os.makedirs(raw, exist_ok=True)
    if kind == "fluo":
        ref = rp.render_fluorescence(rs, rng)
        mov = rp.render_fluorescence(ms, rng, gain=rng.uniform(0.6, 1.4),
                                     gamma=rng.uniform(0.8, 1.25))
        names = ["DAPI", "CD45"]
        for name, a in (("ref", ref), ("mov", mov)):
            gen.write_ome(os.path.join(raw, name + ".ome.tif"), gen.pyramid(gen.norm(a), LEVELS),
                          names, 0.5)
    else:
        ref = rp.render_brightfield(rs, rng, "he")
        mov = rp.render_brightfield(ms, rng, "he" if kind == "he-he" else "ihc",
                                    strength=rng.uniform(0.7, 1.3))
        for name, a in (("ref", ref), ("mov", mov)):
            gen.write_ome(os.path.join(raw, name + ".ome.tif"),
                          gen.pyramid(gen.norm(a, rgb=True), LEVELS), None, 0.5)
    p = Pair()
    p.i, p.kind, p.folder, p.raw = i, kind, folder, raw
    p.truth_pair, p.marks, p.truth = pair, marks, pair.truth(marks)
    p.diag = float(np.hypot(W, H))
    with open(os.path.join(folder, "truth.json"), "w") as f:
        json.dump({"landmarks": marks.tolist(), "truth": p.truth.tolist(), "diag": p.diag}, f)
    p.ref_size, p.mov_size = (W, H), (mw, mh)
    p.theta, p.mirror, p.scale, p.amp, p.torn = np.degrees(theta), mirror, scale, amp, \
        avoid is not None
    return p


# --- scopefs ----------------------------------------------------------------------


def vm_hwm_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def slide_entry(status, stem):
    for s in status.get("slides", []):
        name = s.get("name", "")
        if name == stem or name.split(".")[0] == stem or os.path.basename(
                s.get("path", "")).split(".")[0] == stem:
            return s
    return None


def reg_state(entry):
    """'done', 'failed' or 'busy' from a slide's status entry: its state reads
    "registering: <stage>", "served, registered by scopefs ..." or "not served: <why>"
    (src/io/autoreg.c, sf_autoreg_describe)."""
    st = (entry or {}).get("state", "")
    if st.startswith("not served"):
        return "failed"
    if st.startswith("served"):
        return "done"
    return "busy"


def run_scopefs(p, threads=None):
    """Mount the pair, wait for the registration; returns dict(found, s, hwm_kb, state)."""
    mnt, cache = os.path.join(p.folder, "mnt"), os.path.join(p.folder, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    os.makedirs(mnt, exist_ok=True)
    opts = "cache=%s,reference=ref,reg_eager=1" % cache
    if p.kind == "he-ihc" and IHC_METRIC:
        opts += ",reg_metric=" + IHC_METRIC
    if threads:
        opts += ",threads=%d" % threads
    log = open(os.path.join(p.folder, "scopefs.log"), "ab")
    t0 = time.perf_counter()
    proc = subprocess.Popen([SCOPEFS, "-f", "-o", opts, p.raw, mnt], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log)
    out = {"found": None, "s": float("nan"), "hwm_kb": 0, "state": "?"}
    status_path = os.path.join(mnt, ".scopefs", "status")
    try:
        entry = None
        while time.perf_counter() - t0 < REG_TIMEOUT_S:
            if proc.poll() is not None:
                out["state"] = "daemon exited %d" % proc.returncode
                return out
            try:
                with open(status_path) as f:
                    entry = slide_entry(json.load(f), "mov")
            except (OSError, ValueError):
                entry = None
            st = reg_state(entry)
            if st != "busy":
                break
            time.sleep(0.02)
        out["s"] = time.perf_counter() - t0
        out["state"] = (entry or {}).get("state", "")
        m = re.search(r"([\d.]+) s$", out["state"])
        out["reg_s"] = float(m.group(1)) if m else float("nan")
        tf = os.path.join(mnt, "transforms", "mov.json")
        if st == "done" and os.path.exists(tf):
            with open(tf) as f:
                doc = json.load(f)
            field = None
            if doc.get("field"):
                field = tifffile.imread(os.path.join(mnt, "transforms", doc["field"]["file"]))
            out["found"] = rp.apply_transform_json(doc, p.marks, field)
        out["hwm_kb"] = vm_hwm_kb(proc.pid)
        return out
    finally:
        subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        log.close()


# --- elastix ----------------------------------------------------------------------


def write_mha(path, a, spacing, origin):
    """2-D float32 MetaImage (x fastest), spacing/origin (x, y) in level-0 px."""
    a = np.ascontiguousarray(a, np.float32)
    with open(path, "wb") as f:
        f.write(("ObjectType = Image\nNDims = 2\nBinaryData = True\nBinaryDataByteOrderMSB = "
                 "False\nCompressedData = False\nTransformMatrix = 1 0 0 1\nOffset = %r %r\n"
                 "ElementSpacing = %r %r\nDimSize = %d %d\nElementType = MET_FLOAT\n"
                 "ElementDataFile = LOCAL\n" % (origin[0], origin[1], spacing[0], spacing[1],
                                                a.shape[1], a.shape[0])).encode())
        f.write(a.tobytes())


def elastix_image(path, level, out):
    """Level `level` of a slide as elastix's grey input: the DAPI channel (fluorescence) or
    the mean optical density (RGB), with Spacing/Origin putting pixel centres at their
    level-0 coordinates (x0 = (xL + 0.5) f - 0.5)."""
    levels = gen.read_levels(path)
    lv = levels[level]
    if lv.shape[3] == 3:
        grey = (-np.log10((lv[0].astype(np.float32) + 1) / 256)).mean(axis=2)
    else:
        grey = lv[0, :, :, 0].astype(np.float32)
    h0, w0 = levels[0].shape[1:3]
    f = (w0 / lv.shape[2], h0 / lv.shape[1])
    write_mha(out, grey, f, ((f[0] - 1) / 2, (f[1] - 1) / 2))


def timed(cmd, log):
    """Run cmd under /usr/bin/time -v; returns (ok, seconds, peak RSS kB)."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    with open(log, "a") as f:
        f.write("$ %s\n%s\n%s\n" % (" ".join(cmd), r.stdout[-3000:], r.stderr[-3000:]))
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    return r.returncode == 0, dt, int(m.group(1)) if m else 0


def write_init(path, m):
    """An elastix AffineTransform file holding the 3x3 map m (level-0 px = physical)."""
    with open(path, "w") as f:
        f.write('(Transform "AffineTransform")\n(NumberOfParameters 6)\n'
                '(TransformParameters %r %r %r %r %r %r)\n(CenterOfRotationPoint 0 0)\n'
                '(InitialTransformParametersFileName "NoInitialTransform")\n'
                '(HowToCombineTransforms "Compose")\n(FixedImageDimension 2)\n'
                '(MovingImageDimension 2)\n(FixedInternalImagePixelType "float")\n'
                '(MovingInternalImagePixelType "float")\n'
                % (m[0, 0], m[0, 1], m[1, 0], m[1, 1], m[0, 2], m[1, 2]))


def transformix_points(tp, pts, folder):
    """Points (n, 2) through an elastix TransformParameters file with transformix -def."""
    os.makedirs(folder, exist_ok=True)
    pf = os.path.join(folder, "points.txt")
    with open(pf, "w") as f:
        f.write("point\n%d\n" % len(pts))
        for x, y in pts:
            f.write("%.6f %.6f\n" % (x, y))
    r = subprocess.run(["transformix", "-def", pf, "-tp", tp, "-out", folder],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("transformix: %s" % r.stdout[-1000:])
    out = []
    with open(os.path.join(folder, "outputpoints.txt")) as f:
        for line in f:
            m = re.search(r"OutputPoint = \[\s*([-\d.eE+]+)\s+([-\d.eE+]+)\s*\]", line)
            out.append((float(m.group(1)), float(m.group(2))))
    return np.array(out)


def run_elastix(p, init):
    """init 'truth' (the true similarity part) or 'cog'; dict(found, s, hwm_kb)."""
    d = os.path.join(p.folder, "elastix-" + init)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    fixed, moving = os.path.join(p.folder, "fixed.mha"), os.path.join(p.folder, "moving.mha")
    if not os.path.exists(fixed):
        elastix_image(os.path.join(p.raw, "ref.ome.tif"), ELASTIX_LEVEL, fixed)
        elastix_image(os.path.join(p.raw, "mov.ome.tif"), ELASTIX_LEVEL, moving)
    with open(os.path.join(d, "affine.txt"), "w") as f:
        f.write(AFFINE_PARAMS.replace("{auto_init}", "false" if init == "truth" else "true"))
    with open(os.path.join(d, "bspline.txt"), "w") as f:
        f.write(BSPLINE_PARAMS)
    cmd = ["elastix", "-f", fixed, "-m", moving, "-p", os.path.join(d, "affine.txt"), "-p",
           os.path.join(d, "bspline.txt"), "-out", d]
    if init == "truth":
        write_init(os.path.join(d, "init.txt"), p.truth_pair.sim)
        cmd += ["-t0", os.path.join(d, "init.txt")]
    ok, dt, kb = timed(cmd, os.path.join(d, "run.log"))
    out = {"found": None, "s": dt, "hwm_kb": kb}
    tp = os.path.join(d, "TransformParameters.1.txt")
    if ok and os.path.exists(tp):
        out["found"] = transformix_points(tp, p.marks, os.path.join(d, "points"))
    return out


KIND_NAMES = {"fluo": "fluorescence (DAPI)", "he-he": "H&E -> H&E", "he-ihc": "H&E -> IHC"}


def kinds(pairs):
    return [k for k in KIND_NAMES if any(p.kind == k for p in pairs)]


# --- report -----------------------------------------------------------------------


FAILED = 1e9  # the TRE of a pair a method failed on (inf would turn percentiles into NaN)


def stats(res, p):
    if res["found"] is None:
        return (FAILED,) * 4
    return rp.tre_stats(res["found"], p.truth, p.diag)


def fmt(v, spec):
    return "fail" if not np.isfinite(v) or v >= FAILED / 10 else format(v, spec)


def summary_rows(methods, pairs, results):
    rows = []
    for m in methods:
        st = np.array([stats(results[m][i], p) for i, p in enumerate(pairs)])
        times = np.array([results[m][i]["s"] for i in range(len(pairs))])
        mem = np.array([results[m][i]["hwm_kb"] for i in range(len(pairs))]) / 1024
        fails = int(np.sum(st[:, 2] > 0.01))
        rows.append((m, np.median(st[:, 2]), np.percentile(st[:, 2], 90), np.median(st[:, 3]),
                     np.median(st[:, 0]), np.median(st[:, 1]), fails, np.median(times),
                     np.max(times), np.median(mem), np.max(mem)))
    return rows


def report(args, pairs, results, methods, wall):
    now = datetime.datetime.now(datetime.timezone.utc)
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    lines = [
        "## %s — issue #5 registration: scopefs vs elastix (%s, %d cores, %.0f GiB)"
        % (now.strftime("%Y-%m-%d %H:%M UTC"), platform.node(), os.cpu_count(), mem_gib),
        "",
        "`tests/bench/register.py %s` (seed %d): %d synthetic pairs, slides %s px at "
        "level 0, %d levels; kinds %s; %d landmarks each; total run %.0f s. elastix 5.0.1 on "
        "level %d (affine + B-spline, Mattes MI); scopefs through a mount (reg_eager=1; "
        "reg_metric=%s for H&E -> IHC)." % (
            " ".join(sys.argv[1:]) or "(defaults)", args.seed, len(pairs),
            "%d-%d" % (min(min(p.ref_size) for p in pairs), max(max(p.ref_size) for p in pairs)),
            LEVELS, ", ".join(sorted(set(p.kind for p in pairs))), N_LANDMARKS, wall,
            ELASTIX_LEVEL, IHC_METRIC or "default"),
        "",
        "| method | median rTRE (median over pairs) | 90th pct over pairs of per-pair median "
        "rTRE | median of per-pair 90th pct rTRE | median TRE px | median of per-pair 90th pct "
        "TRE px | failed pairs (rTRE > 0.01) | time per pair median (max) | peak RSS MB median "
        "(max) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (m, mr, pr, m90, mt, m90t, fails, ts, tmax, mm, mmax) in summary_rows(methods, pairs,
                                                                               results):
        lines.append("| %s | %s | %s | %s | %s | %s | %d / %d | %.1f s (%.1f) | %.0f (%.0f) |" % (
            m, fmt(mr, ".5f"), fmt(pr, ".5f"), fmt(m90, ".5f"), fmt(mt, ".2f"), fmt(m90t, ".2f"),
            fails, len(pairs), ts, tmax, mm, mmax))
    lines += ["", "By kind (median over the kind's pairs of the per-pair median TRE, px; failed "
              "pairs):", "", "| method | " + " | ".join(KIND_NAMES[k] for k in kinds(pairs))
              + " |", "| --- " * (1 + len(kinds(pairs))) + "|"]
    for m in methods:
        cells = []
        for k in kinds(pairs):
            st = np.array([stats(results[m][i], p) for i, p in enumerate(pairs) if p.kind == k])
            cells.append("%s (%d / %d failed)" % (fmt(np.median(st[:, 0]), ".2f"),
                                                  int(np.sum(st[:, 2] > 0.01)), len(st)))
        lines.append("| %s | %s |" % (m, " | ".join(cells)))
    if "scopefs" in methods:
        reg = [r.get("reg_s", np.nan) for r in results["scopefs"]]
        lines += ["", "scopefs's own registration time (the seconds its status reports, without "
                  "mounting and waiting): median %.1f s." % np.nanmedian(reg) if np.any(
                      np.isfinite(reg)) else ""]
    lines += ["", "Per pair (median / 90th pct TRE in level-0 px; time s):", "",
              "| pair | kind | angle | mirror | scale | deformation px | torn | "
              + " | ".join(methods) + " |",
              "| --- " * (7 + len(methods)) + "|"]
    for i, p in enumerate(pairs):
        cells = []
        for m in methods:
            st = stats(results[m][i], p)
            cells.append("%s / %s; %.1f s" % (fmt(st[0], ".2f"), fmt(st[1], ".2f"),
                                             results[m][i]["s"]))
        lines.append("| %d | %s | %.0f | %s | %.2f | %.0f | %s | %s |" % (
            p.i, p.kind, p.theta, "yes" if p.mirror else "no", p.scale, p.amp,
            "yes" if p.torn else "no", " | ".join(cells)))
    lines.append("")
    return "\n".join(lines)


def main():
    global IHC_METRIC, ELASTIX_LEVEL
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="4 pairs, elastix with truth init only")
    ap.add_argument("--no-cog", action="store_true", help="skip elastix with CenterOfGravity init")
    ap.add_argument("--no-elastix", action="store_true")
    ap.add_argument("--no-scopefs", action="store_true")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--only", type=int, nargs="*", help="run only these pair indices")
    ap.add_argument("--elastix-level", type=int, default=ELASTIX_LEVEL,
                    help="pyramid level elastix registers (default 0)")
    ap.add_argument("--ihc-metric", default="", help="reg_metric for H&E -> IHC ('' = default)")
    ap.add_argument("--no-append", action="store_true", help="do not append to benchmarks.md")
    ap.add_argument("--keep", action="store_true", help="keep the pairs in " + WORK)
    args = ap.parse_args()
    IHC_METRIC, ELASTIX_LEVEL = args.ihc_metric, args.elastix_level
    if args.quick:
        args.pairs, args.no_cog = min(args.pairs, 4), True
    methods = []
    if not args.no_scopefs:
        if not os.path.exists(SCOPEFS):
            sys.exit("%s is not built" % SCOPEFS)
        methods.append("scopefs")
    if not args.no_elastix:
        methods.append("elastix (true similarity init)")
        if not args.no_cog:
            methods.append("elastix (CenterOfGravity init)")
    results = {m: [] for m in methods}
    pairs = []
    t0 = time.perf_counter()
    for i in (args.only if args.only else range(args.pairs)):
        folder = os.path.join(WORK, "pair%02d" % i)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        tg = time.perf_counter()
        p = make_pair(i, args.seed, folder)
        gen_s = time.perf_counter() - tg
        pairs.append(p)
        for m in methods:
            if m == "scopefs":
                r = run_scopefs(p)
            elif "similarity" in m:
                r = run_elastix(p, "truth")
            else:
                r = run_elastix(p, "cog")
            results[m].append(r)
        line = "pair %d %s (made in %.0f s):" % (i, p.kind, gen_s)
        for m in methods:
            st = stats(results[m][-1], p)
            line += "  %s TRE %s px %.1f s %.0f MB" % (m.split(" (")[0] + (
                "/" + m.split("(")[1].split()[0] if "(" in m else ""), fmt(st[0], ".2f"),
                results[m][-1]["s"], results[m][-1]["hwm_kb"] / 1024)
            if m == "scopefs" and results[m][-1]["found"] is None:
                line += " [%s]" % results[m][-1]["state"]
        print(line, flush=True)
        if not args.keep:
            for sub in ("raw", "cache"):
                shutil.rmtree(os.path.join(folder, sub), ignore_errors=True)
            for name in ("fixed.mha", "moving.mha"):  # ~50 MB each
                if os.path.exists(os.path.join(folder, name)):
                    os.unlink(os.path.join(folder, name))
    with open(os.path.join(WORK, "results.json"), "w") as f:
        json.dump({m: [{"i": p.i, "kind": p.kind, "tre": stats(r, p), "s": r["s"],
                        "hwm_kb": r["hwm_kb"], "state": r.get("state", "")}
                       for p, r in zip(pairs, results[m])] for m in methods}, f, indent=1)
    text = report(args, pairs, results, methods, time.perf_counter() - t0)
    print(text)
    if not args.no_append:
        with open(os.path.join(ROOT, "docs", "benchmarks.md"), "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""make bench, issue #3: warping (registered/) against libvips, side by side.

Runnable alone (/usr/bin/python3 tests/bench/warp.py): writes a Markdown
section to stdout and appends it to docs/benchmarks.md; run.py may call
section() and append the text itself.  Data lives in $SCOPEFS_BENCH_DIR
(default /tmp/scopefs-bench), shared with run.py: the 16k x 16k, 4-channel
uint16 source (run.make_source) is made once.  $SCOPEFS_BUILD (default
build) names the build folder whose scopefs and tests/test_warp are run;
$SCOPEFS_BIN, when set, names the scopefs binary itself.

The moving slide is the same pixels under another name (a hard link), with
a transform JSON: an affine (3 degree rotation about the centre + a shift)
and, in the second case, also a smooth displacement field (a 2-band float32
TIFF, JSON "field", node spacing 512 px, up to about 24 px).

Measures:
  1. `cp registered/moving.ome.tif` with a cold cache (fresh cache folder,
     page cache dropped): time and daemon peak RSS (VmHWM), for the affine
     and the affine + field transforms, against libvips doing the same warp
     of the 4 channels to a tiled (512) pyramidal BigTIFF: vips_affine for
     the affine, vips_mapim with a lazily computed index image (xyz + the
     field upsampled by vips_affine, through the matrix by vips_recomb and
     vips_linear) for the field.  libvips runs as a small C program against
     the installed libvips (compiled here), so the index image is never
     materialised.  Both outputs are also compared on a 512 x 512 crop of
     level 0 (mean and max |difference|), to show the work is the same.
     Each side runs $SCOPEFS_WARP_REPEATS times (default 3), alternating,
     and the medians are compared: on this VM the CPU time of the same copy
     varies by 20-30 % between runs.
  2. mount, then the first tile of the lowest level (tifffile opens the file
     and reads it), cold cache: target under 200 ms.
  3. the CPU warp kernel alone (tests/test_warp --bench), Mpx/s on one
     core, against this machine's single-core memory copy bandwidth
     (numpy copy of a 512 MiB array) turned into a px/s ceiling.
"""
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as core  # noqa: E402  (make_source, Mount, drop_caches, timed, vm_hwm_kb)

ROOT = core.ROOT
BUILD = os.path.join(ROOT, os.environ.get("SCOPEFS_BUILD", "build"))
WORK = core.WORK
SIZE = core.SIZE
CHANNELS = core.CHANNELS
ANGLE_DEG = 3.0
SHIFT = (180.0, -120.0)
FIELD_STEP = 512
FIELD_AMP = 24.0
core.SCOPEFS = os.environ.get("SCOPEFS_BIN", os.path.join(BUILD, "scopefs"))

VWARP_C = r"""
/* vwarp: libvips doing scopefs' warp, for the benchmark.
 *   vwarp IN OUT CHANNELS W H m0 m1 m2 m3 m4 m5 [FIELD STEP]
 * Pages 0..CHANNELS-1 of IN (level 0 of an OME-TIFF) are band-joined and
 * warped through the backward map src = M (X + F(X / STEP)) (F: 2-band
 * float TIFF in level-0 pixels, bilinear) onto a W x H grid, bilinear,
 * background 0, and saved as a tiled 512 pyramidal BigTIFF (SubIFDs).
 * "premultiplied" is set because libvips would otherwise take band 4 (or a
 * field's band 2) for alpha and premultiply by it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vips/vips.h>

static void die(void)
{
	vips_error_exit(NULL);
}

int main(int argc, char **argv)
{
	VipsImage *pages[64], *im, *out;
	VipsInterpolate *bil;
	VipsArrayInt *area;
	int channels, w, h;
	double m[6];

	if (VIPS_INIT(argv[0]))
		die();
	if (argc == 2 && !strcmp(argv[1], "--version")) {
		printf("vips-%s\n", vips_version_string());
		return 0;
	}
	if (argc != 12 && argc != 14) {
		fprintf(stderr, "usage: vwarp IN OUT CHANNELS W H m0..m5 [FIELD STEP]\n");
		return 2;
	}
	channels = atoi(argv[3]);
	w = atoi(argv[4]);
	h = atoi(argv[5]);
	for (int i = 0; i < 6; i++)
		m[i] = atof(argv[6 + i]);
	for (int c = 0; c < channels; c++)
		if (vips_tiffload(argv[1], &pages[c], "page", c, NULL))
			die();
	if (vips_bandjoin(pages, &im, channels, NULL))
		die();
	bil = vips_interpolate_new("bilinear");
	area = vips_array_int_newv(4, 0, 0, w, h);
	if (argc == 12) {
		/* vips_affine maps forward: out = A in + (odx, ody). */
		double det = m[0] * m[4] - m[1] * m[3];
		double a = m[4] / det, b = -m[1] / det, c = -m[3] / det, d = m[0] / det;
		double odx = -(a * m[2] + b * m[5]), ody = -(c * m[2] + d * m[5]);
		if (vips_affine(im, &out, a, b, c, d, "interpolate", bil, "oarea", area, "odx", odx,
		                "ody", ody, "premultiplied", TRUE, NULL))
			die();
	} else {
		VipsImage *xy, *xyf, *field, *up, *p, *q, *index, *mat;
		double step = atof(argv[13]), one[2] = {1, 1}, shift[2] = {m[2], m[5]};
		if (vips_xyz(&xy, w, h, NULL) || vips_cast(xy, &xyf, VIPS_FORMAT_FLOAT, NULL) ||
		    vips_tiffload(argv[12], &field, NULL) ||
		    vips_affine(field, &up, step, 0, 0, step, "interpolate", bil, "oarea", area,
		                "extend", VIPS_EXTEND_COPY, "premultiplied", TRUE, NULL) ||
		    vips_add(xyf, up, &p, NULL))
			die();
		mat = vips_image_new_matrixv(2, 2, m[0], m[1], m[3], m[4]);
		if (vips_recomb(p, &q, mat, NULL) || vips_linear(q, &index, one, shift, 2, NULL) ||
		    vips_mapim(im, &out, index, "interpolate", bil, "premultiplied", TRUE, NULL))
			die();
	}
	if (vips_tiffsave(out, argv[2], "tile", TRUE, "tile_width", 512, "tile_height", 512,
	                  "pyramid", TRUE, "subifd", TRUE, "bigtiff", TRUE, NULL))
		die();
	return 0;
}
"""


def build_vwarp(exe=None):
    """Compile vwarp against the installed libvips (to exe, default in WORK);
    $SCOPEFS_VWARP names a prebuilt one instead (tools/gpu-check carries one
    to a machine without libvips' headers)."""
    if exe is None and os.environ.get("SCOPEFS_VWARP"):
        return os.environ["SCOPEFS_VWARP"]
    os.makedirs(WORK, exist_ok=True)
    src = os.path.join(WORK, "vwarp.c")
    exe = exe or os.path.join(WORK, "vwarp")
    with open(src, "w") as f:
        f.write(VWARP_C)
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "vips"], check=True,
                           capture_output=True, text=True).stdout.split()
    subprocess.run(["cc", "-O2", "-Wall", "-Werror", src, "-o", exe] + flags, check=True)
    return exe


def backward_matrix():
    """src = R (X - c) + c + shift: reference level-0 px -> moving level-0 px."""
    th = np.deg2rad(ANGLE_DEG)
    r = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    c = np.array([(SIZE - 1) / 2.0, (SIZE - 1) / 2.0])
    t = c - r @ c + np.array(SHIFT)
    return np.array([[r[0, 0], r[0, 1], t[0]], [r[1, 0], r[1, 1], t[1]], [0.0, 0.0, 1.0]])


def smooth_field():
    """Displacement (dx, dy) in level-0 pixels at nodes X = (i, j) * FIELD_STEP."""
    n = SIZE // FIELD_STEP + 2
    u = np.arange(n, dtype=np.float64) * FIELD_STEP / SIZE
    uy, ux = np.meshgrid(u, u, indexing="ij")
    dx = FIELD_AMP * np.sin(2 * np.pi * uy) * np.cos(np.pi * ux)
    dy = FIELD_AMP * np.cos(2 * np.pi * ux) * np.sin(np.pi * uy)
    return np.stack([dx, dy], axis=-1).astype(np.float32)


def write_transforms(folder, with_field):
    os.makedirs(folder, exist_ok=True)
    doc = {"scopefs_transform": 1, "matrix": backward_matrix().tolist()}
    if with_field:
        tifffile.imwrite(os.path.join(folder, "moving.field.tif"), smooth_field(),
                         planarconfig="contig")
        doc["field"] = {"file": "moving.field.tif", "scale": FIELD_STEP, "offset": [0, 0],
                        "units": "pixels"}
    with open(os.path.join(folder, "moving.json"), "w") as f:
        json.dump(doc, f)


def make_raw(src):
    """RAW_DIR with the reference and the moving slide (a hard link, or a copy)."""
    raw = os.path.join(WORK, "warp-raw")
    os.makedirs(raw, exist_ok=True)
    for name in ("reference.ome.tif", "moving.ome.tif"):
        dst = os.path.join(raw, name)
        if os.path.exists(dst) and os.path.samefile(dst, src):
            continue
        if os.path.exists(dst):
            os.unlink(dst)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return raw


def mount(raw, tdir, cache, opts="mem=128M"):
    shutil.rmtree(cache, ignore_errors=True)
    core.drop_caches()
    return core.Mount(raw, os.path.join(WORK, "warp-mnt"), cache,
                      f"transforms={tdir},reference=reference,{opts}")


def centre_tile(path):
    """The 512 x 512 tile at (SIZE/1024, SIZE/1024) of channel 0 at level 0
    (page 0: scopefs' channel 0, or libvips' interleaved bands)."""
    with tifffile.TiffFile(path) as t:
        page = t.pages[0]
        across = -(-page.imagewidth // page.tilewidth)
        i = (SIZE // 1024) * across + SIZE // 1024
        t.filehandle.seek(page.dataoffsets[i])
        data = t.filehandle.read(page.databytecounts[i])
        tile = np.asarray(page.decode(data, i)[0])
    return tile.reshape(page.tilelength, page.tilewidth, -1)[..., 0].astype(np.float64)


def crop_diff(ours, theirs):
    """Mean and max |difference| of channel 0 on the centre tile of level 0."""
    d = np.abs(centre_tile(ours) - centre_tile(theirs))
    return d.mean(), d.max()


def cpu_seconds(pid):
    """User + system CPU time of a live process (its threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_bin():
    """GNU time: /usr/bin/time, or one on PATH (tools/gpu-check carries it)."""
    return "/usr/bin/time" if os.path.exists("/usr/bin/time") else shutil.which("time")


def timed_cpu(cmd):
    """Run cmd under /usr/bin/time -v: (wall s, user + sys s, peak RSS kB)."""
    t0 = time.perf_counter()
    r = subprocess.run([time_bin(), "-v"] + cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd}: {r.stderr[-500:]}")

    def num(label):
        m = re.search(label + r": ([0-9.]+)", r.stderr)
        return float(m.group(1)) if m else 0.0

    cpu = num(r"User time \(seconds\)") + num(r"System time \(seconds\)")
    return dt, cpu, int(num(r"Maximum resident set size \(kbytes\)"))


REPEATS = int(os.environ.get("SCOPEFS_WARP_REPEATS", "3"))


def ours_once(raw, tdir, out):
    """One cold `cp` (coreutils, as issue #3 states it: Python's copyfile
    would sendfile, a different read pattern) of the warped file: wall s,
    daemon CPU s, daemon peak RSS kB, status, size."""
    m = mount(raw, tdir, os.path.join(WORK, "warp-cache"))
    vfile = os.path.join(m.mnt, "registered", "moving.ome.tif")
    t0 = time.perf_counter()
    subprocess.run(["cp", vfile, out], check=True)
    wall = time.perf_counter() - t0
    st = m.status()
    cpu = cpu_seconds(m.proc.pid)
    rss = m.close()
    return wall, cpu, rss, st, os.path.getsize(out)


def median(values):
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def cp_case(raw, tdir, label, vwarp, src, field):
    """cp the warped file cold, then libvips' warp, REPEATS times
    alternating (this VM's CPU time for the same work varies 20-30 % from
    run to run); rows and notes from the medians."""
    out = os.path.join(WORK, "warp-out.ome.tif")
    vout = os.path.join(WORK, "warp-vips.tif")
    mat = backward_matrix()
    args = [vwarp, src, vout, str(CHANNELS), str(SIZE), str(SIZE)] + \
        [repr(float(v)) for v in mat[:2].ravel()]
    if field:
        args += [os.path.join(tdir, "moving.field.tif"), str(FIELD_STEP)]
    ours, theirs = [], []
    for i in range(REPEATS):
        ours.append(ours_once(raw, tdir, out))
        core.drop_caches()
        theirs.append(timed_cpu(args))
        if i + 1 < REPEATS:
            os.unlink(out)
            os.unlink(vout)
    mean_d, max_d = crop_diff(out, vout)
    os.unlink(vout)
    os.unlink(out)
    size, st = ours[-1][4], ours[-1][3]
    o_wall, o_cpu = median([r[0] for r in ours]), median([r[1] for r in ours])
    t_wall, t_cpu = median([r[0] for r in theirs]), median([r[1] for r in theirs])
    op = "vips_mapim (index: xyz + field, recomb, linear)" if field else "vips_affine"

    def runs(rs):
        return ", ".join(f"{r[0]:.1f}" for r in rs)

    rows = [
        (f"cp registered/moving.ome.tif, cold, {label} (median of {REPEATS}: {runs(ours)} s)",
         f"{o_wall:.1f} s ({size / o_wall / 1e6:.0f} MB/s)", f"{o_cpu:.1f} s",
         f"{max(r[2] for r in ours) / 1024:.0f} MB"),
        (f"libvips {op} + tiffsave tiled pyramid, {label} (median of {REPEATS}: "
         f"{runs(theirs)} s)",
         f"{t_wall:.1f} s ({size / t_wall / 1e6:.0f} MB/s)", f"{t_cpu:.1f} s",
         f"{max(r[2] for r in theirs) / 1024:.0f} MB"),
    ]
    note = (f"{label}: scopefs {t_wall / o_wall:.2f}x libvips' throughput (wall, medians; "
            f"pairs {', '.join(f'{t[0] / o[0]:.2f}' for o, t in zip(ours, theirs))}), "
            f"{t_cpu / o_cpu:.2f}x per CPU second; "
            f"{st['tiles_computed']} tiles computed; level-0 crop vs libvips: mean |diff| "
            f"{mean_d:.2f}, max {max_d:.0f} grey levels (uint16).")
    return rows, note, size


def first_tile(raw, tdir):
    """Mount, first tile of the lowest level, then the qc/ overlay's first
    stat (which renders it): (ready s, first tile s, qc s, qc bytes)."""
    m = mount(raw, tdir, os.path.join(WORK, "warp-cache"))
    vfile = os.path.join(m.mnt, "registered", "moving.ome.tif")
    t0 = time.perf_counter()
    with tifffile.TiffFile(vfile) as t:
        t.series[0].levels[-1].pages[0].asarray()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    qc_bytes = os.stat(os.path.join(m.mnt, "qc", "moving.png")).st_size
    qc = time.perf_counter() - t0
    ready = m.ready
    m.close()
    return ready, first, qc, qc_bytes


def kernel_bench():
    """Lines of tests/test_warp --bench (built with the Makefile's flags)."""
    exe = os.path.join(BUILD, "tests", "test_warp")
    subprocess.run(["make", "-s", "-C", ROOT, f"BUILD={os.path.relpath(BUILD, ROOT)}",
                    os.path.relpath(exe, ROOT)], check=True, capture_output=True)
    r = subprocess.run([exe, "--bench", "bilinear", "1"], check=True, capture_output=True,
                       text=True)
    r2 = subprocess.run([exe, "--bench", "nearest", "0"], check=True, capture_output=True,
                        text=True)
    r3 = subprocess.run([exe, "--bench", "bicubic", "0"], check=True, capture_output=True,
                        text=True)
    lines = [ln for ln in (r.stdout + r2.stdout + r3.stdout).splitlines() if "Mpx/s" in ln]
    return lines


def copy_bandwidth():
    """Single-core copy rate, GB/s of bytes read + written (best of 5)."""
    a = np.ones(256 << 20, np.uint16)  # 512 MiB
    b = np.empty_like(a)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        dt = time.perf_counter() - t0
        best = max(best, 2 * a.nbytes / dt / 1e9)
    return best


def section():
    os.makedirs(WORK, exist_ok=True)
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    src = os.path.join(WORK, "raw", "reference.ome.tif")
    os.makedirs(os.path.dirname(src), exist_ok=True)
    existed = os.path.exists(src)
    core.make_source(src)
    raw = make_raw(src)
    vwarp = build_vwarp()
    t_affine = os.path.join(WORK, "tf-affine")
    t_field = os.path.join(WORK, "tf-field")
    write_transforms(t_affine, False)
    write_transforms(t_field, True)

    rows, notes = [], []
    r, n, size = cp_case(raw, t_affine, "affine", vwarp, src, False)
    rows += r
    notes.append(n)
    r, n, _ = cp_case(raw, t_field, "affine + field", vwarp, src, True)
    rows += r
    notes.append(n)
    ready, first, qc, qc_bytes = first_tile(raw, t_field)
    rows.append(("mount until ready (2 slides, transform + field read)",
                 f"{ready * 1000:.0f} ms", "", ""))
    rows.append(("then first tile of the lowest level, cold cache (target < 200 ms)",
                 f"{first * 1000:.0f} ms", "", ""))
    rows.append((f"then stat qc/moving.png (renders the overlay: {qc_bytes / 1024:.0f} KiB PNG)",
                 f"{qc * 1000:.0f} ms", "", ""))
    kernel = kernel_bench()
    bw = copy_bandwidth()
    # A 4-sample uint16 output pixel: 8 bytes written, and about 8 bytes of
    # source read once (the footprint is cached while a row of taps is used).
    ceiling = bw * 1e9 / 16 / 1e6
    load1 = os.getloadavg()
    total = time.perf_counter() - t_start

    lines = [
        f"## {datetime.date.today().isoformat()} — issue #3 warp ({platform.node()}, "
        f"{os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB)",
        "",
        f"Moving slide: the {SIZE} x {SIZE} x {CHANNELS} uint16 source under another name,"
        f" warped {ANGLE_DEG:g} degrees about the centre + shift {SHIFT}; the field case adds"
        f" a smooth displacement (nodes every {FIELD_STEP} px, up to {FIELD_AMP:g} px)."
        f" Virtual file {size / 2**30:.2f} GiB; daemon `mem=128M`, default threads; libvips"
        f" {subprocess.run([vwarp, '--version'], capture_output=True, text=True).stdout.strip()}"
        f" with its default threads. Load average {load0[0]:.1f} before and {load1[0]:.1f}"
        f" after (other jobs share this machine's CPUs: times are indicative). Source "
        + ("made by an earlier run." if existed else "made by this run.")
        + f" Whole section: {total:.0f} s.",
        "",
        "| measure | time / rate | CPU (user + sys) | peak RSS |",
        "| --- | --- | --- | --- |",
    ] + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows] + [""] + [f"- {n}" for n in notes] + [
        "",
        "CPU warp kernel alone (`tests/test_warp --bench`, 2048 x 2048 uint16 x 4 source,"
        " 512 x 512 tiles, one thread):",
        "",
        "```",
    ] + kernel + [
        "```",
        "",
        f"Memory bandwidth, one core (numpy copy of 512 MiB): {bw:.1f} GB/s read + written;"
        f" at 16 bytes per 4-sample uint16 pixel (8 read, 8 written) that is a ceiling of"
        f" about {ceiling:.0f} Mpx/s per core for a memory-bound warp.",
        "",
    ]
    return "\n".join(lines)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--vwarp-to":
        build_vwarp(sys.argv[2])
        return 0
    if not time_bin():
        subprocess.run(["apt-get", "install", "-y", "-qq", "time"], check=True)
    core.publish(section())
    return 0


if __name__ == "__main__":
    sys.exit(main())

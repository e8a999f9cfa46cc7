"""The warp kernel and transform readers against independent oracles.

The C code (src/core/warp.c, src/core/transform.c, src/io/transform_file.c)
is built into a small shared object with a test shim (SHIM below) and driven
through ctypes.  Every output is warped tile by tile, each tile from only the
source rect that sf_warp_source_rect asks for, so every comparison also checks
that the rect suffices.  The expected pixels never come from scopefs:

- source coordinates are computed here with numpy from the transform's
  definition (docs/transforms.md), and sampled with
  scipy.ndimage.map_coordinates(mode='grid-constant'): nearest must match
  exactly (random transforms: no exact .5 ties), bilinear within 1 grey
  level (in fact within 0.5 + float rounding);
- bicubic (Keys a = -0.5, libvips' kernel) against a numpy implementation of
  that kernel, against libvips' own bicubic, and loosely against scipy's cubic
  B-spline (order 3), which is a different kernel;
- plain affine maps against `vips affine` (bilinear);
- elastix-registered pairs against `transformix` (skipped without elastix).
"""

import ctypes
import os
import shutil
import subprocess
import textwrap

import numpy as np
import pytest
import scipy.ndimage as ndi
import tifffile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHIM = r"""
#include <stdlib.h>
#include <string.h>
#include "scopefs/transform.h"
#include "scopefs/warp.h"

static char errbuf[512];
const char *shim_error(void) { return errbuf; }

void *shim_load(const char *path, double rx, double ry, double mx, double my)
{
	sf_tf_units u = {{rx, ry}, {mx, my}};
	sf_err e = {0};
	sf_transform *t = malloc(sizeof *t);
	if (!t)
		return NULL;
	if (sf_transform_load(path, &u, t, &e) != SF_OK) {
		memcpy(errbuf, e.msg, sizeof errbuf);
		free(t);
		return NULL;
	}
	return t;
}

void shim_free(void *t)
{
	sf_transform_release(t);
	free(t);
}

/* Warp the output rect (ox, oy, ow, oh) tile by tile from the whole source
 * level (sw x sh), handing each tile only the rect it asks for.  Returns the
 * error code; *reads counts the source pixels handed over. */
int shim_warp(void *tp, double ods, double sds, const void *src, long sw, long sh, int spp,
	      int dtype, int interp, double bg, long ox, long oy, long ow, long oh, void *dst,
	      long tile, long *reads)
{
	sf_transform *t = tp;
	sf_map m;
	double od[2] = {ods, ods}, sd[2] = {sds, sds};
	sf_transform_level_map(t, od, sd, &m);
	size_t px = sf_dtype_bytes(dtype) * spp;
	sf_warp_fmt f = {dtype, spp, interp, bg};
	*reads = 0;
	for (long ty = 0; ty < oh; ty += tile) {
		for (long tx = 0; tx < ow; tx += tile) {
			sf_wrect out = {ox + tx, oy + ty, tile < ow - tx ? tile : ow - tx,
					tile < oh - ty ? tile : oh - ty};
			sf_wrect need;
			sf_warp_source_rect(&m, out, interp, sw, sh, &need);
			sf_warp_src s = {(const char *)src + need.y * sw * px + need.x * px,
					 sw * px, need};
			sf_err e = {0};
			char *d = (char *)dst + (ty * ow + tx) * px;
			int rc = sf_warp_tile(&m, &s, &f, out, d, ow * px, &e);
			if (rc) {
				memcpy(errbuf, e.msg, sizeof errbuf);
				return rc;
			}
			*reads += need.w * need.h;
		}
	}
	return 0;
}
"""

DTYPES = {np.uint8: 1, np.uint16: 2, np.float32: 3}
INTERP = {"nearest": 0, "bilinear": 1, "bicubic": 2}


@pytest.fixture(scope="session")
def lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("warpshim")
    shim = d / "shim.c"
    shim.write_text(SHIM)
    so = d / "libwarpshim.so"
    srcs = ["src/core/warp.c", "src/core/transform.c", "src/io/transform_file.c",
            "src/io/metaimage.c"]
    srcs += ["src/util/err.c", "src/util/log.c", "src/util/pixel.c", "src/util/utf8.c"]
    tiff = subprocess.run(["pkg-config", "--cflags", "--libs", "libtiff-4"],
                          capture_output=True, text=True, check=True).stdout.split()
    cmd = ["cc", "-std=c11", "-D_GNU_SOURCE", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra",
           "-Werror", "-Iinclude", str(shim)] + srcs + tiff + ["-lm", "-o", str(so)]
    subprocess.run(cmd, cwd=ROOT, check=True)
    L = ctypes.CDLL(str(so))
    L.shim_load.restype = ctypes.c_void_p
    L.shim_load.argtypes = [ctypes.c_char_p] + [ctypes.c_double] * 4
    L.shim_free.argtypes = [ctypes.c_void_p]
    L.shim_error.restype = ctypes.c_char_p
    L.shim_warp.argtypes = [ctypes.c_void_p, ctypes.c_double, ctypes.c_double, ctypes.c_void_p,
                            ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_int,
                            ctypes.c_int, ctypes.c_double] + [ctypes.c_long] * 4 + [
                                ctypes.c_void_p, ctypes.c_long,
                                ctypes.POINTER(ctypes.c_long)]
    return L


class Transform:
    def __init__(self, lib, path, ref_px=(0, 0), mov_px=(0, 0)):
        self.lib = lib
        self.h = lib.shim_load(str(path).encode(), ref_px[0], ref_px[1], mov_px[0], mov_px[1])
        if not self.h:
            raise ValueError(lib.shim_error().decode())

    def warp(self, img, out_shape, interp="bilinear", bg=0.0, origin=(0, 0), tile=64,
             ods=1.0, sds=1.0):
        img = np.ascontiguousarray(img if img.ndim == 3 else img[..., None])
        oh, ow = out_shape
        out = np.zeros((oh, ow, img.shape[2]), img.dtype)
        reads = ctypes.c_long(0)
        rc = self.lib.shim_warp(self.h, ods, sds, img.ctypes.data, img.shape[1], img.shape[0],
                                img.shape[2], DTYPES[img.dtype.type], INTERP[interp], bg,
                                origin[0], origin[1], ow, oh, out.ctypes.data, tile,
                                ctypes.byref(reads))
        assert rc == 0, self.lib.shim_error().decode()
        self.reads = reads.value
        return out

    def close(self):
        if self.h:
            self.lib.shim_free(self.h)
            self.h = None


def write_json(path, matrix, field=None, scale=1.0, offset=(0.0, 0.0), units=None):
    m = np.asarray(matrix, float)
    rows = ",\n    ".join("[" + ", ".join(repr(float(v)) for v in r) + "]" for r in m)
    text = '{\n  "scopefs_transform": 1,\n  "matrix": [\n    ' + rows + "\n  ]"
    if field is not None:
        fpath = str(path) + ".field.tif"
        tifffile.imwrite(fpath, np.ascontiguousarray(field, np.float32), planarconfig="contig")
        text += (',\n  "field": {"file": "%s", "scale": %r, "offset": [%r, %r]'
                 % (os.path.basename(fpath), float(scale), float(offset[0]), float(offset[1])))
        if units:
            text += ', "units": "%s"' % units
        text += "}"
    text += "\n}\n"
    with open(path, "w") as f:
        f.write(text)
    return path


def make_image(rng, h, w, spp, dtype, smooth=1.0):
    """Textured test image: noise smoothed a little, so a half-pixel error
    changes pixels by many grey levels."""
    a = rng.random((h, w, spp))
    if smooth:
        a = ndi.gaussian_filter(a, (smooth, smooth, 0))
    a = (a - a.min()) / max(a.max() - a.min(), 1e-9)
    if dtype == np.float32:
        return (a * 1000 - 200).astype(np.float32)
    top = np.iinfo(dtype).max
    return np.clip(np.round(a * top), 0, top).astype(dtype)


def coords(matrix, shape, origin=(0, 0), field=None, scale=1.0, offset=(0, 0)):
    """Source coordinates (sx, sy) of every output pixel, from the definition:
    src = M (X + scale * D((X - offset) / scale)), D bilinear, clamped."""
    oh, ow = shape
    Y, X = np.mgrid[0:oh, 0:ow].astype(np.float64)
    X += origin[0]
    Y += origin[1]
    px, py = X.copy(), Y.copy()
    if field is not None:
        u = (X - offset[0]) / scale
        v = (Y - offset[1]) / scale
        dx = ndi.map_coordinates(field[..., 0].astype(np.float64), [v, u], order=1,
                                 mode="nearest")
        dy = ndi.map_coordinates(field[..., 1].astype(np.float64), [v, u], order=1,
                                 mode="nearest")
        px += scale * dx
        py += scale * dy
    m = np.asarray(matrix, float)
    if m.shape[0] == 2:
        m = np.vstack([m, [0, 0, 1]])
    sx = m[0, 0] * px + m[0, 1] * py + m[0, 2]
    sy = m[1, 0] * px + m[1, 1] * py + m[1, 2]
    w = m[2, 0] * px + m[2, 1] * py + m[2, 2]
    return sx / w, sy / w


def scipy_warp(img, sx, sy, order, bg):
    img = img if img.ndim == 3 else img[..., None]
    out = np.empty(sx.shape + (img.shape[2],), np.float64)
    for c in range(img.shape[2]):
        out[..., c] = ndi.map_coordinates(img[..., c].astype(np.float64), [sy, sx], order=order,
                                          mode="grid-constant", cval=bg, prefilter=order > 1,
                                          output=np.float64)
    return out


def keys_warp(img, sx, sy, bg):
    """Keys cubic convolution (a = -0.5) with grid-constant edges, in numpy."""
    img = (img if img.ndim == 3 else img[..., None]).astype(np.float64)
    h, w, s = img.shape
    pad = 4
    big = np.full((h + 2 * pad, w + 2 * pad, s), float(bg))
    big[pad:pad + h, pad:pad + w] = img

    def kern(t):
        t = np.abs(t)
        return np.where(t < 1, 1.5 * t**3 - 2.5 * t**2 + 1,
                        np.where(t < 2, -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2, 0.0))

    fx, fy = np.floor(sx), np.floor(sy)
    out = np.zeros(sx.shape + (s,))
    for j in range(-1, 3):
        for i in range(-1, 3):
            xi = np.clip(fx + i + pad, 0, w + 2 * pad - 1).astype(int)
            yi = np.clip(fy + j + pad, 0, h + 2 * pad - 1).astype(int)
            wgt = kern(sx - (fx + i)) * kern(sy - (fy + j))
            out += wgt[..., None] * big[yi, xi]
    return out


def random_affine(rng, angle_deg, scale=1.0, shift=(0, 0), shear=0.0, flip=False):
    t = np.deg2rad(angle_deg)
    a = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    a = a @ np.array([[1, shear], [0, 1]])
    if flip:
        a = a @ np.diag([-1, 1])
    m = np.eye(3)
    m[:2, :2] = a
    m[:2, 2] = shift
    return m


def smooth_field(rng, gh, gw, amp):
    f = rng.standard_normal((gh, gw, 2))
    f = ndi.gaussian_filter(f, (1.5, 1.5, 0))
    return (amp * f / np.abs(f).max()).astype(np.float32)


def check_close(ours, ref, tol, what, dtype):
    ours = ours.astype(np.float64)
    if dtype != np.float32:
        top = np.iinfo(dtype).max
        ref = np.clip(ref, 0, top)
    d = np.abs(ours - ref)
    assert d.max() <= tol, "%s: max diff %.4f > %.4f at %s" % (
        what, d.max(), tol, np.unravel_index(np.argmax(d), d.shape))
    return d


# --- scipy: random affine + smooth deformation ---------------------------------

CASES = [
    # (h, w, spp, dtype, angle, scale, flip, field amplitude, out (h, w))
    (97, 131, 1, np.uint8, 17.0, 1.0, False, 0.0, (101, 89)),
    (64, 80, 3, np.uint8, -33.0, 0.8, False, 1.5, (70, 77)),
    (77, 59, 4, np.uint16, 89.7, 1.0, False, 0.0, (61, 79)),
    (77, 59, 4, np.uint16, 90.3, 1.1, True, 2.0, (61, 79)),
    (50, 66, 2, np.float32, 180.0, 1.3, True, 1.0, (45, 71)),
    (33, 47, 1, np.uint16, 5.0, 2.5, False, 0.5, (40, 40)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("interp,order", [("nearest", 0), ("bilinear", 1)])
def test_scipy_oracle(lib, tmp_path, case, interp, order):
    h, w, spp, dtype, angle, scale, flip, amp, oshape = CASES[case]
    rng = np.random.default_rng(1000 + case)
    img = make_image(rng, h, w, spp, dtype)
    # centre the rotation so most of the output samples the image
    m = random_affine(rng, angle + rng.uniform(-0.01, 0.01), scale, flip=flip,
                      shear=rng.uniform(-0.05, 0.05))
    centre_out = np.array([oshape[1] / 2, oshape[0] / 2])
    centre_in = np.array([w / 2, h / 2]) + rng.uniform(-3, 3, 2)
    m[:2, 2] = centre_in - m[:2, :2] @ centre_out
    field, s, off = None, 1.0, (0.0, 0.0)
    if amp:
        s = 8.0
        off = tuple(rng.uniform(-2, 2, 2))
        field = smooth_field(rng, oshape[0] // 8 + 3, oshape[1] // 8 + 3, amp)
    path = write_json(tmp_path / "t.json", m, field, s, off)
    bg = 7.0
    t = Transform(lib, path)
    try:
        ours = t.warp(img, oshape, interp, bg, tile=32)
    finally:
        t.close()
    sx, sy = coords(m, oshape, field=field, scale=s, offset=off)
    ref = scipy_warp(img, sx, sy, order, bg)
    assert (sx < 0).any() or (sx > w - 1).any() or (sy < 0).any() or (sy > h - 1).any(), \
        "the case should reach outside the source (background)"
    if interp == "nearest":
        # ties (a coordinate exactly at .5) are excluded by the random transform
        frac = np.abs(np.concatenate([sx.ravel(), sy.ravel()]) % 1 - 0.5)
        assert frac.min() > 1e-9
        assert np.array_equal(ours.astype(np.float64), ref), \
            "nearest differs in %d pixels" % int((ours != ref).sum())
    else:
        tol = 1e-3 * np.abs(ref).max() if dtype == np.float32 else 0.5 + 1e-2
        d = check_close(ours, ref, tol, "bilinear case %d" % case, dtype)
        assert d.max() <= 1.0  # the requirement, stated for the record


def test_one_pixel_image(lib, tmp_path):
    img = np.array([[[200]]], np.uint8)
    m = np.array([[1, 0, -3.25], [0, 1, -2.75], [0, 0, 1]])  # out (3.25, 2.75) -> src (0, 0)
    t = Transform(lib, write_json(tmp_path / "one.json", m))
    try:
        for interp, order in (("nearest", 0), ("bilinear", 1)):
            ours = t.warp(img, (6, 7), interp, 10.0)
            sx, sy = coords(m, (6, 7))
            ref = scipy_warp(img, sx, sy, order, 10.0)
            check_close(ours, ref, 0 if order == 0 else 0.51, "1-pixel " + interp, np.uint8)
            assert (ours == 200).any() or interp == "bilinear"
        # a 1x1 output of a 1x1 image under the identity is the pixel itself
        t2 = Transform(lib, write_json(tmp_path / "id.json", np.eye(3)))
        assert t2.warp(img, (1, 1), "bicubic", 0.0)[0, 0, 0] == 200
        t2.close()
    finally:
        t.close()


def test_all_outside_is_background_and_reads_nothing(lib, tmp_path):
    rng = np.random.default_rng(5)
    img = make_image(rng, 40, 40, 1, np.uint16)
    m = np.array([[1, 0, 5000.0], [0, 1, -9000.0], [0, 0, 1]])
    t = Transform(lib, write_json(tmp_path / "out.json", m))
    try:
        for interp in INTERP:
            ours = t.warp(img, (30, 30), interp, 1234.0)
            assert (ours == 1234).all()
            assert t.reads == 0
    finally:
        t.close()


def test_source_rect_is_small(lib, tmp_path):
    """A tile reads about its footprint, not the image."""
    rng = np.random.default_rng(6)
    img = make_image(rng, 512, 512, 1, np.uint8)
    m = random_affine(rng, 30.0, 1.0, shift=(256, 0))
    t = Transform(lib, write_json(tmp_path / "r.json", m))
    try:
        t.warp(img, (256, 256), "bilinear", 0.0, tile=64)
        # 16 tiles of 64x64 rotated by 30 degrees: bbox ~ (64*1.37+2)^2 each
        assert t.reads < 16 * 92 * 92, t.reads
    finally:
        t.close()


# --- pyramid levels: the pixel-centre rule --------------------------------------


def box_reduce(img, k):
    h, w = img.shape[:2]
    hh, ww = h // k, w // k
    a = img[:hh * k, :ww * k].astype(np.float64)
    return a.reshape(hh, k, ww, k, -1).mean(axis=(1, 3))


@pytest.mark.parametrize("ods,sds", [(2, 1), (1, 2), (4, 2), (2, 4), (3, 3)])
def test_levels_pixel_centres(lib, tmp_path, ods, sds):
    """Output level with downsample ods from a source level with downsample
    sds: out pixel x maps to level-0 (x + 0.5) ods - 0.5, through the map, then
    to source level (x0 + 0.5) / sds - 0.5.  A half-pixel slip fails this."""
    rng = np.random.default_rng(ods * 10 + sds)
    base = make_image(rng, 240, 240, 1, np.float32, smooth=2.0)
    src = box_reduce(base, sds).astype(np.float32)
    m = random_affine(rng, 12.0, 1.05, shift=(20.5, -10.25))
    t = Transform(lib, write_json(tmp_path / "lv.json", m))
    try:
        oshape = (240 // ods - 20, 240 // ods - 10)
        ours = t.warp(src, oshape, "bilinear", 0.0, ods=ods, sds=sds)
    finally:
        t.close()
    Y, X = np.mgrid[0:oshape[0], 0:oshape[1]].astype(float)
    x0, y0 = (X + 0.5) * ods - 0.5, (Y + 0.5) * ods - 0.5
    s0x = m[0, 0] * x0 + m[0, 1] * y0 + m[0, 2]
    s0y = m[1, 0] * x0 + m[1, 1] * y0 + m[1, 2]
    sx, sy = (s0x + 0.5) / sds - 0.5, (s0y + 0.5) / sds - 0.5
    ref = scipy_warp(src, sx, sy, 1, 0.0)
    check_close(ours, ref, 1e-3 * np.abs(ref).max(), "levels %d/%d" % (ods, sds), np.float32)


# --- bicubic -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_bicubic(lib, tmp_path, dtype):
    rng = np.random.default_rng(77)
    img = make_image(rng, 71, 83, 3, dtype, smooth=1.5)
    m = random_affine(rng, 23.0, 0.9)
    m[:2, 2] = (10.3, -5.6)
    t = Transform(lib, write_json(tmp_path / "c.json", m))
    try:
        ours = t.warp(img, (75, 80), "bicubic", 3.0)
    finally:
        t.close()
    sx, sy = coords(m, (75, 80))
    keys = keys_warp(img, sx, sy, 3.0)
    tol = 1e-3 * np.abs(keys).max() if dtype == np.float32 else 0.5 + 1e-2
    check_close(ours, keys, tol, "bicubic vs numpy Keys", dtype)
    # scipy's order 3 is a prefiltered cubic B-spline, a different (smoother
    # at the edges, sharper inside) kernel: close on a smooth image, inside
    spline = scipy_warp(img, sx, sy, 3, 3.0)
    inside = (sx > 2) & (sx < img.shape[1] - 3) & (sy > 2) & (sy < img.shape[0] - 3)
    rng_v = float(np.ptp(img))
    d = np.abs(ours.astype(float) - spline)[inside]
    assert d.mean() < 0.01 * rng_v, d.mean() / rng_v


# --- libvips ---------------------------------------------------------------------


def vips_affine(img_path, fwd, oshape, interp, bg, tmp):
    """libvips warps forward: out = A in + (odx, ody); its pixel centres are at
    integer coordinates when idx = idy = odx = ody offsets only translate."""
    a = fwd[:2, :2]
    out_v = os.path.join(tmp, "vout.v")
    out_t = os.path.join(tmp, "vout.tif")
    subprocess.run(["vips", "affine", "--interpolate", interp,
                    "--odx=" + repr(float(fwd[0, 2])), "--ody=" + repr(float(fwd[1, 2])),
                    "--oarea", "0 0 %d %d" % (oshape[1], oshape[0]),
                    "--background", repr(float(bg)), "--", img_path, out_v,
                    " ".join(repr(float(v)) for v in a.ravel())], check=True)
    subprocess.run(["vips", "copy", out_v, out_t], check=True)
    return tifffile.imread(out_t)


@pytest.mark.skipif(not shutil.which("vips"), reason="libvips command line not installed")
@pytest.mark.parametrize("angle,scale,flip", [(0.0, 1.0, False), (31.0, 1.2, False),
                                              (89.9, 0.9, True), (-135.0, 1.0, False)])
def test_vips_affine(lib, tmp_path, angle, scale, flip):
    rng = np.random.default_rng(int(angle) + 500)
    img = make_image(rng, 91, 117, 1, np.uint8)[..., 0]
    m = random_affine(rng, angle, scale, flip=flip)
    m[:2, 2] = np.array([58.0, 45.0]) - m[:2, :2] @ np.array([50.0, 47.0]) + \
        rng.uniform(-0.5, 0.5, 2)
    fwd = np.linalg.inv(m)
    src_path = str(tmp_path / "in.tif")
    tifffile.imwrite(src_path, img)
    oshape = (95, 101)
    vout = vips_affine(src_path, fwd, oshape, "bilinear", 0, str(tmp_path)).astype(float)
    t = Transform(lib, write_json(tmp_path / "v.json", m))
    try:
        ours = t.warp(img, oshape, "bilinear", 0.0)[..., 0].astype(float)
        ours_cubic = t.warp(img, oshape, "bicubic", 0.0)[..., 0].astype(float)
    finally:
        t.close()
    sx, sy = coords(m, oshape)
    # libvips treats the outermost half pixel at the image edge its own way:
    # compare where every bilinear tap is inside the image
    inside = (sx >= 0) & (sx <= img.shape[1] - 1) & (sy >= 0) & (sy <= img.shape[0] - 1)
    assert inside.sum() > 0.3 * inside.size
    d = np.abs(ours - vout)[inside]
    assert d.max() <= 1.0, d.max()
    vcub = vips_affine(src_path, fwd, oshape, "bicubic", 0, str(tmp_path)).astype(float)
    inner = (sx >= 1) & (sx <= img.shape[1] - 3) & (sy >= 1) & (sy <= img.shape[0] - 3)
    dc = np.abs(ours_cubic - vcub)[inner]
    # libvips' uint8 bicubic uses fixed-point weights: allow 2 levels
    assert dc.max() <= 2.0, dc.max()


# --- elastix / transformix --------------------------------------------------------


def write_mhd(path, img, spacing=(1.0, 1.0)):
    raw = os.path.splitext(str(path))[0] + ".raw"
    img.astype(np.float32).tofile(raw)
    with open(path, "w") as f:
        f.write(textwrap.dedent("""\
            ObjectType = Image
            NDims = 2
            BinaryData = True
            BinaryDataByteOrderMSB = False
            CompressedData = False
            TransformMatrix = 1 0 0 1
            Offset = 0 0
            CenterOfRotation = 0 0
            ElementSpacing = %r %r
            DimSize = %d %d
            ElementType = MET_FLOAT
            ElementDataFile = %s
            """ % (spacing[0], spacing[1], img.shape[1], img.shape[0], os.path.basename(raw))))


def read_mhd(path):
    hdr = {}
    with open(path) as f:
        for line in f:
            k, _, v = line.partition("=")
            hdr[k.strip()] = v.strip()
    w, h = map(int, hdr["DimSize"].split())
    types = {"MET_FLOAT": np.float32, "MET_UCHAR": np.uint8, "MET_SHORT": np.int16,
             "MET_USHORT": np.uint16, "MET_DOUBLE": np.float64}
    raw = os.path.join(os.path.dirname(path), hdr["ElementDataFile"])
    return np.fromfile(raw, types[hdr["ElementType"]]).reshape(h, w)


ELASTIX_PARAMS = """\
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
(Transform "{transform}")
(Metric "AdvancedMeanSquares")
(AutomaticScalesEstimation "true")
(AutomaticTransformInitialization "false")
(HowToCombineTransforms "Compose")
(NumberOfResolutions 2)
(MaximumNumberOfIterations {iters})
(NumberOfSpatialSamples 2048)
(NewSamplesEveryIteration "true")
(ImageSampler "RandomCoordinate")
(BSplineInterpolationOrder 1)
(FinalBSplineInterpolationOrder 1)
(DefaultPixelValue 0)
(WriteResultImage "true")
(ResultImagePixelType "float")
(ResultImageFormat "mhd")
(FinalGridSpacingInPhysicalUnits {grid})
"""


def elastix_pair(rng, size=96):
    """A smooth fixed image and a moving image that is it rotated, shifted and
    gently deformed (so registration converges quickly)."""
    base = ndi.gaussian_filter(rng.random((size, size)), 3.0)
    base = (base - base.min()) / np.ptp(base) * 1000
    Y, X = np.mgrid[0:size, 0:size].astype(float)
    t = np.deg2rad(6.0)
    c = size / 2
    sx = np.cos(t) * (X - c) - np.sin(t) * (Y - c) + c + 3.2
    sy = np.sin(t) * (X - c) + np.cos(t) * (Y - c) + c - 2.1
    sx += 1.5 * np.sin(Y / 17.0)
    moving = ndi.map_coordinates(base, [sy, sx], order=1, mode="nearest")
    return base.astype(np.float32), moving.astype(np.float32)


def run_elastix(tmp, fixed, moving, transforms, spacing):
    write_mhd(os.path.join(tmp, "fixed.mhd"), fixed, spacing)
    write_mhd(os.path.join(tmp, "moving.mhd"), moving, spacing)
    cmd = ["elastix", "-f", "fixed.mhd", "-m", "moving.mhd", "-out", "."]
    for i, (name, iters) in enumerate(transforms):
        p = os.path.join(tmp, "p%d.txt" % i)
        with open(p, "w") as f:
            f.write(ELASTIX_PARAMS.format(transform=name, iters=iters, grid=16.0 * spacing[0]))
        cmd += ["-p", "p%d.txt" % i]
    subprocess.run(cmd, cwd=tmp, check=True, capture_output=True, timeout=300)


def transformix(tmp, tp_name):
    out = os.path.join(tmp, "tx_" + tp_name)
    os.makedirs(out, exist_ok=True)
    subprocess.run(["transformix", "-in", "moving.mhd", "-out", out, "-tp", tp_name], cwd=tmp,
                   check=True, capture_output=True, timeout=300)
    return read_mhd(os.path.join(out, "result.mhd"))


@pytest.mark.skipif(not shutil.which("elastix") or not shutil.which("transformix"),
                    reason="elastix/transformix not installed (Debian package elastix)")
@pytest.mark.parametrize("chain,spacing", [
    ([("AffineTransform", 150)], (1.0, 1.0)),
    ([("EulerTransform", 100)], (0.5, 0.5)),
    ([("EulerTransform", 100), ("BSplineTransform", 100)], (0.5, 0.5)),
    ([("AffineTransform", 100), ("BSplineTransform", 100), "Add"], (1.0, 1.0)),
])
def test_transformix(lib, tmp_path, chain, spacing):
    """Debian's elastix lacks SimilarityTransform (the C unit tests cover it).
    "Add": elastix always writes Compose; the last file is rewritten to Add and
    transformix, which applies it, stays the oracle."""
    rng = np.random.default_rng(11)
    fixed, moving = elastix_pair(rng)
    tmp = str(tmp_path)
    add = chain[-1] == "Add"
    chain = [c for c in chain if c != "Add"]
    run_elastix(tmp, fixed, moving, chain, spacing)
    tp = "TransformParameters.%d.txt" % (len(chain) - 1)
    if add:
        with open(os.path.join(tmp, tp)) as f:
            text = f.read()
        assert '(HowToCombineTransforms "Compose")' in text
        os.remove(os.path.join(tmp, tp))
        tp = "TransformParameters.%d.txt" % (len(chain) + 3)
        with open(os.path.join(tmp, tp), "w") as f:
            f.write(text.replace('"Compose"', '"Add"'))
    expect = transformix(tmp, tp)
    # the folder elastix wrote: the highest TransformParameters.N.txt and
    # its chain; pixel sizes left unknown (taken from the file)
    t = Transform(lib, tmp_path)
    try:
        ours = t.warp(moving, fixed.shape, "bilinear", 0.0)[..., 0]
        # the same with the pixel size given by the caller (same spacing)
        t2 = Transform(lib, tmp_path / tp, spacing, spacing)
        ours2 = t2.warp(moving, fixed.shape, "bilinear", 0.0)[..., 0]
        t2.close()
    finally:
        t.close()
    assert np.array_equal(ours, ours2)
    # ITK's resampler treats a point within half a pixel outside the image
    # as inside (clamped), ours blends with the background there: compare
    # pixels transformix mapped well inside the moving image
    inner = ndi.binary_erosion(expect != 0, iterations=2)
    assert inner.sum() > 0.5 * inner.size
    d = np.abs(ours.astype(np.float64) - expect)[inner]
    # both bilinear in float (values 0..1000): differences are float rounding
    assert d.max() < 0.05, (d.max(), d.mean())
    # and the registration did something (not an identity)
    assert np.abs(expect - moving)[inner].mean() > 5.0

"""The micro-registration pass (src/core/register_micro.c, sf_reg_micro) on synthetic pairs
with a known deformation that has a coarse and a fine part.

Made here with numpy/scipy, independently of the C code:

- Reference: a fluorescence-like tissue section (reg_pairs.SlideWorld: nuclei, stroma
  texture, an irregular outline with holes) at the micro resolution.
- Truth: the backward map ref micro px -> mov micro px is  y = A (x + Dt(x)),
  Dt(x) = b(x) + C(x + b(x)), with A a small affine map, C a smooth analytic deformation
  (Gaussian bumps of sigma 100-250 px, reg_pairs.Deformation) and b a fine one (Gaussian bumps
  of sigma 10-16 px, up to about 3 px) that a field on a 4x coarser grid cannot hold.
- Moving image: mov(y) = world(x) where A (x + Dt(x)) = y, x found by fixed-point iteration
  x = A^-1 y - Dt(x) on a tabulated Dt; then a gain change and noise.
- Coarse field handed to the C code: C sampled at the nodes of a grid on the 4x smaller
  thumbnail (node spacing 2 thumbnail px), in thumbnail px: Dc(x_c) = C(x_m) / 4 with
  x_m = (x_c + 0.5) * 4 - 0.5.  That is what sf_reg_nonrigid would give at best.

The C code runs through the --micro mode of tests/unit/test_register_micro.c (built here).
A landmark x (integer px in the tissue) truly maps to A (x + Dt(x)); the micro estimate is
A (x + D(x)) with D looked up here (bilinear between nodes, clamped, scipy map_coordinates),
the coarse-only estimate A (x + 4 Dc((x + 0.5) / 4 - 0.5)).  TRE in moving micro px.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.ndimage as ndi

import core_driver

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reg_pairs import Deformation, SlideWorld  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCALE = 4  # micro px per coarse thumbnail px
CSTEP = 2  # coarse field node spacing, thumbnail px
TILE, OVERLAP, STEP = 256, 32, 4


@pytest.fixture(scope="session")
def driver(tmp_path_factory):
    return core_driver.build(tmp_path_factory.mktemp("microdrv"), "test_register_micro")


def fine_bumps(rng, h, w, amp, n=400):
    """b: n Gaussian bumps (sigma 10-16 px) with random directions, peak |b| about amp."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    b = np.zeros((2, h, w))
    cx, cy = rng.uniform(0.1, 0.9, n) * w, rng.uniform(0.1, 0.9, n) * h
    s = rng.uniform(10, 16, n)
    ang = rng.uniform(0, 2 * np.pi, n)
    for k in range(n):
        x0, x1 = int(max(cx[k] - 4 * s[k], 0)), int(min(cx[k] + 4 * s[k] + 1, w))
        y0, y1 = int(max(cy[k] - 4 * s[k], 0)), int(min(cy[k] + 4 * s[k] + 1, h))
        g = np.exp(-((xx[y0:y1, x0:x1] - cx[k]) ** 2 + (yy[y0:y1, x0:x1] - cy[k]) ** 2)
                   / (2 * s[k] ** 2))
        b[0, y0:y1, x0:x1] += np.cos(ang[k]) * g
        b[1, y0:y1, x0:x1] += np.sin(ang[k]) * g
    peak = np.hypot(b[0], b[1]).max()
    return b * (amp / peak) if amp > 0 else b * 0


def lookup(arr, x, y):
    """Bilinear lookup of an (h, w) array at float points, clamped to the edge."""
    return ndi.map_coordinates(arr, [y, x], order=1, mode="nearest")


def make_case(rng, amp_fine, h=768, w=896):
    sw = SlideWorld(rng, h, w, fill=0.8, nucleus_px=1.8, nucleus_spacing=11.0)
    world = (0.05 + 0.8 * sw.nuc + 0.3 * sw.stroma).astype(np.float64)
    th = np.deg2rad(2.0)
    a = np.array([[1.01 * np.cos(th), -np.sin(th), 6.5], [np.sin(th), 0.99 * np.cos(th), -4.25],
                  [0, 0, 1]])
    coarse_def = Deformation(rng, h, w, amp=10.0, bumps=6)
    coarse_def.s = np.clip(coarse_def.s, 100, 250)
    b = fine_bumps(rng, h, w, amp_fine)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    # Dt(x) = b(x) + C(x + b(x)), tabulated on the micro grid
    cx, cy = coarse_def(xx + b[0], yy + b[1])
    dt = np.stack([b[0] + cx, b[1] + cy])
    # mov(y) = world(x), A (x + Dt(x)) = y
    ainv = np.linalg.inv(a)
    px = ainv[0, 0] * xx + ainv[0, 1] * yy + ainv[0, 2]
    py = ainv[1, 0] * xx + ainv[1, 1] * yy + ainv[1, 2]
    x, y = px.copy(), py.copy()
    for _ in range(25):
        x, y = px - lookup(dt[0], x, y), py - lookup(dt[1], x, y)
    mov = ndi.map_coordinates(world, [y, x], order=3, mode="constant", cval=0.05)
    mov = 0.75 * mov + 0.02 + rng.normal(0, 0.02, mov.shape)
    ref = world + rng.normal(0, 0.02, world.shape)
    # the coarse field on the thumbnail grid (thumbnail px), from C alone
    ch, cw = -(-h // (SCALE * CSTEP)), -(-w // (SCALE * CSTEP))
    nx = ((np.arange(cw) + 0.5) * CSTEP - 0.5 + 0.5) * SCALE - 0.5
    ny = ((np.arange(ch) + 0.5) * CSTEP - 0.5 + 0.5) * SCALE - 0.5
    gx, gy = np.meshgrid(nx, ny)
    cdx, cdy = coarse_def(gx, gy)
    coarse = (np.stack([cdx, cdy], -1) / SCALE).astype(np.float32)
    mask = sw.mask > 0.5
    inner = ndi.binary_erosion(sw.body, iterations=12)
    inner[:24], inner[-24:], inner[:, :24], inner[:, -24:] = 0, 0, 0, 0
    ty, tx = np.nonzero(inner)
    pick = rng.choice(len(tx), 600, replace=False)
    marks = np.stack([tx[pick], ty[pick]], 1).astype(np.float64)
    mi, mj = marks[:, 1].astype(int), marks[:, 0].astype(int)
    dtrue = np.stack([dt[0][mi, mj], dt[1][mi, mj]], 1)
    bsize = np.hypot(b[0][mi, mj], b[1][mi, mj])
    return dict(ref=ref.astype(np.float32), mov=mov.astype(np.float32), a=a, coarse=coarse,
                mask=mask, marks=marks, dtrue=dtrue, bsize=bsize)


def run_micro(driver, d, case, passes=1):
    ref, mov, a, coarse = case["ref"], case["mov"], case["a"], case["coarse"]
    d.mkdir(exist_ok=True)
    ref.tofile(d / "ref.f32")
    mov.tofile(d / "mov.f32")
    coarse.tofile(d / "coarse.f32")
    case["mask"].astype(np.uint8).tofile(d / "mask.u8")
    nums = ([ref.shape[1], ref.shape[0], mov.shape[1], mov.shape[0]] + list(a[:2].ravel())
            + [coarse.shape[1], coarse.shape[0], CSTEP, SCALE, TILE, OVERLAP, STEP, 1, passes])
    (d / "params.txt").write_text(" ".join(repr(float(v)) if isinstance(v, float) else str(v)
                                           for v in nums))
    subprocess.run([str(driver), "--micro", str(d)], check=True)
    fw, fh, step, jac_min, disp_max, ms = (d / "out.txt").read_text().split()
    field = np.fromfile(d / "out.f32", np.float32).reshape(int(fh), int(fw), 2)
    return field, int(step), float(jac_min), float(ms)


def field_at(field, step, pts):
    """D at micro points: node index (x + 0.5) / step - 0.5, bilinear, clamped."""
    gx = (pts[:, 0] + 0.5) / step - 0.5
    gy = (pts[:, 1] + 0.5) / step - 0.5
    return np.stack([lookup(field[..., k].astype(np.float64), gx, gy) for k in range(2)], 1)


def tre(case, disp):
    lin = case["a"][:2, :2]
    return np.hypot(*((disp - case["dtrue"]) @ lin.T).T)


def evaluate(driver, tmp_path, seed, amp_fine, passes=1):
    case = make_case(np.random.default_rng(seed), amp_fine)
    field, step, jac_min, ms = run_micro(driver, tmp_path / ("s%d" % seed), case, passes)
    marks = case["marks"]
    dc = SCALE * field_at(case["coarse"], CSTEP, (marks + 0.5) / SCALE - 0.5)
    coarse_tre, micro_tre = tre(case, dc), tre(case, field_at(field, step, marks))
    bumpy = case["bsize"] > 1.0
    print("seed %d fine %.1f px, %d pass(es): coarse-only TRE median %.3f mean %.3f p90 %.3f max %.3f, "
          "where |b| > 1: median %.3f (%d) | micro median %.3f mean %.3f p90 %.3f max %.3f, "
          "where |b| > 1: median %.3f | jac_min %.3f | %.0f ms"
          % (seed, amp_fine, passes, np.median(coarse_tre), coarse_tre.mean(),
             np.percentile(coarse_tre, 90), coarse_tre.max(),
             np.median(coarse_tre[bumpy]) if bumpy.any() else 0, bumpy.sum(),
             np.median(micro_tre), micro_tre.mean(), np.percentile(micro_tre, 90),
             micro_tre.max(), np.median(micro_tre[bumpy]) if bumpy.any() else 0, jac_min, ms))
    return case, coarse_tre, micro_tre, jac_min


def test_micro_recovers_fine_deformation(driver, tmp_path):
    case, coarse_tre, micro_tre, jac_min = evaluate(driver, tmp_path, 11, 3.0)
    bumpy = case["bsize"] > 1.0
    assert bumpy.sum() > 30
    assert jac_min > 0
    assert np.median(micro_tre) < 0.3
    assert micro_tre.mean() < 0.6 * coarse_tre.mean()
    assert np.median(micro_tre[bumpy]) < 0.5 * np.median(coarse_tre[bumpy])
    assert np.percentile(micro_tre, 90) < 0.6 * np.percentile(coarse_tre, 90)


def test_micro_two_passes(driver, tmp_path):
    """A second demons run per tile on what the first left recovers more of the bumps."""
    case, coarse_tre, micro_tre, jac_min = evaluate(driver, tmp_path, 11, 3.0, passes=2)
    bumpy = case["bsize"] > 1.0
    assert jac_min > 0
    assert np.median(micro_tre) < 0.25
    assert np.median(micro_tre[bumpy]) < 0.4 * np.median(coarse_tre[bumpy])
    assert np.percentile(micro_tre, 90) < 0.5 * np.percentile(coarse_tre, 90)


def test_micro_keeps_a_right_coarse_field(driver, tmp_path):
    """No fine part: the coarse field is already right (up to its node interpolation)."""
    _, coarse_tre, micro_tre, jac_min = evaluate(driver, tmp_path, 12, 0.0)
    assert jac_min > 0
    assert np.median(micro_tre) < np.median(coarse_tre) + 0.1
    assert np.percentile(micro_tre, 90) < np.percentile(coarse_tre, 90) + 0.2

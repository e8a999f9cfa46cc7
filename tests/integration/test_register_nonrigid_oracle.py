"""The non-rigid registration step (src/core/register_nonrigid.c) on synthetic pairs with a
known smooth deformation.

The pairs are made here with numpy/scipy, independently of the C code: a tissue-like
fluorescence image (irregular outline, nuclei, texture) is the reference; the moving image
samples the same world through a known backward map  phi(y) = A^-1 y + E(y)  (moving px ->
reference px) with scipy.ndimage.map_coordinates, where A is a small random affine map and E a
smooth random displacement (Gaussian-filtered noise scaled to a 3-8 px peak).  The moving image
then gets a gain change, a smooth local gain variation (+-20%), an offset, noise, and in some
pairs a torn-away tissue piece.

Truth: a reference landmark x sits in the moving image at the y solving phi(y) = x, found here
by the fixed-point iteration y = A (x - E(y)).  The C code runs through the --pair mode of
tests/unit/test_register_nonrigid.c (built here): normalise, sf_reg_register (affine), then
sf_reg_nonrigid; it writes the affine map m and the field D.  The landmark's estimate is
m (x + D(x)) with D interpolated here (bilinear between nodes, clamped), against m x for the
affine map alone.  TRE is in moving thumbnail px.
"""

import json
import os
import subprocess

import numpy as np
import pytest
import scipy.ndimage as ndi

import core_driver

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_PAIRS = 8


@pytest.fixture(scope="session")
def driver(tmp_path_factory):
    return core_driver.build(tmp_path_factory.mktemp("nrdrv"), "test_register_nonrigid")


def tissue_world(rng, h, w):
    """An h x w fluorescence-like image, background ~0.05, one tissue piece filling ~70%."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = np.hypot((xx - w / 2) / (0.36 * w), (yy - h / 2) / (0.36 * h))
    outline = ndi.gaussian_filter(rng.standard_normal((h, w)), w / 25)
    outline /= outline.std()
    tissue = ndi.binary_opening((1.0 - r + 0.2 * outline) > 0, iterations=2)
    nuclei = np.zeros((h, w))
    n = int(0.004 * h * w)
    nuclei[rng.integers(0, h, n), rng.integers(0, w, n)] = rng.uniform(0.5, 1.5, n)
    nuclei = ndi.gaussian_filter(nuclei, 1.6) * 2 * np.pi * 1.6 ** 2
    texture = ndi.gaussian_filter(rng.standard_normal((h, w)), 5)
    texture = 0.5 + 0.5 * texture / texture.std()
    img = 0.05 + tissue * (0.25 + 0.1 * np.clip(texture, 0, 2) + 0.6 * nuclei)
    return ndi.gaussian_filter(img, 0.7), tissue


def smooth_field(rng, h, w, sigma, amp):
    """Two smooth random displacement components (Gaussian-filtered noise), peak |E| = amp."""
    e = np.stack([ndi.gaussian_filter(rng.standard_normal((h, w)), sigma) for _ in range(2)])
    return e * (amp / np.hypot(e[0], e[1]).max())


def random_affine(rng, h, w):
    """A small backward-compatible affine A (ref px -> mov px) about the centre, 3x3 (x, y)."""
    th = np.deg2rad(rng.uniform(-6, 6))
    s = rng.uniform(0.95, 1.05)
    lin = s * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    lin = lin @ np.array([[1, rng.uniform(-0.04, 0.04)], [0, 1]])
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    a = np.eye(3)
    a[:2, :2] = lin
    a[:2, 2] = c + rng.uniform(-8, 8, 2) - lin @ c
    return a


def make_pair(rng, amp, h=320, w=384, damage=True):
    """(ref, mov, truth function x -> y, landmarks, excluded-landmark mask)."""
    world, tissue = tissue_world(rng, h, w)
    a = random_affine(rng, h, w)
    ainv = np.linalg.inv(a)
    e = smooth_field(rng, h, w, rng.uniform(20, 40), amp) if amp > 0 else np.zeros((2, h, w))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    px = ainv[0, 0] * xx + ainv[0, 1] * yy + ainv[0, 2] + e[0]  # phi(y) in ref px
    py = ainv[1, 0] * xx + ainv[1, 1] * yy + ainv[1, 2] + e[1]
    mov = ndi.map_coordinates(world, [py, px], order=3, mode="constant", cval=0.05)
    torn = np.zeros((h, w), bool)
    if damage and rng.random() < 0.5:
        cy, cx = rng.uniform(0.35, 0.65, 2) * (h, w)
        torn = np.hypot(xx - cx, yy - cy) < 0.1 * w
        mov = np.where(torn, 0.05, mov)
    if damage:
        local_gain = 1 + 0.2 * smooth_field(rng, h, w, 60, 1)[0]
        mov = mov * local_gain * rng.uniform(0.6, 1.4) + rng.uniform(-0.03, 0.03)
    ref = world + rng.normal(0, 0.03, world.shape)
    mov = mov + rng.normal(0, 0.03, mov.shape)

    def truth(pts):
        y = pts @ a[:2, :2].T + a[:2, 2]
        for _ in range(60):
            ex = ndi.map_coordinates(e[0], [y[:, 1], y[:, 0]], order=3, mode="nearest")
            ey = ndi.map_coordinates(e[1], [y[:, 1], y[:, 0]], order=3, mode="nearest")
            y = (pts - np.c_[ex, ey]) @ a[:2, :2].T + a[:2, 2]
        return y

    ty, tx = np.nonzero(ndi.binary_erosion(tissue, iterations=6))
    pick = rng.choice(len(tx), 200, replace=False)
    marks = np.stack([tx[pick], ty[pick]], 1).astype(np.float64)
    ytrue = truth(marks)
    # landmarks whose tissue is torn away in the moving image (with a margin) are not judged
    far = ndi.distance_transform_edt(~torn)
    keep = ndi.map_coordinates(far, [ytrue[:, 1], ytrue[:, 0]], order=1, mode="nearest") > 6
    return ref.astype(np.float32), mov.astype(np.float32), marks[keep], ytrue[keep]


def run_driver(driver, tmp_path, ref, mov, tag, mask):
    rp, mp, out = tmp_path / ("r%s.f32" % tag), tmp_path / ("m%s.f32" % tag), tmp_path / tag
    ref.tofile(rp)
    mov.tofile(mp)
    args = [str(driver), "--pair", str(rp), str(mp), str(ref.shape[1]), str(ref.shape[0]),
            str(mov.shape[1]), str(mov.shape[0]), str(out)] + (["mask"] if mask else [])
    subprocess.run(args, check=True)
    info = json.loads((tmp_path / (tag + ".json")).read_text())
    d = np.fromfile(tmp_path / (tag + ".f32"), np.float32).reshape(info["h"], info["w"], 2)
    return info, d


def field_at(d, step, pts):
    """D at reference thumbnail points: node index (x + 0.5) / step - 0.5, bilinear, clamped."""
    gx = (pts[:, 0] + 0.5) / step - 0.5
    gy = (pts[:, 1] + 0.5) / step - 0.5
    return np.stack([ndi.map_coordinates(d[:, :, k], [gy, gx], order=1, mode="nearest")
                     for k in range(2)], 1)


def tre_pair(driver, tmp_path, rng, amp, tag, mask, damage=True):
    ref, mov, marks, ytrue = make_pair(rng, amp, damage=damage)
    info, d = run_driver(driver, tmp_path, ref, mov, tag, mask)
    m = np.array(info["m"]).reshape(3, 3)
    aff = marks @ m[:2, :2].T + m[:2, 2]
    q = marks + field_at(d, info["step"], marks)
    nr = q @ m[:2, :2].T + m[:2, 2]
    t_aff = np.hypot(*(aff - ytrue).T)
    t_nr = np.hypot(*(nr - ytrue).T)
    return t_aff, t_nr, info


def test_deformed_pairs(driver, tmp_path):
    rng = np.random.default_rng(2024)
    rows = []
    for i in range(N_PAIRS):
        amp = rng.uniform(3, 8)
        t_aff, t_nr, info = tre_pair(driver, tmp_path, rng, amp, "p%d" % i, mask=i % 2 == 1)
        rows.append((amp, np.median(t_aff), np.median(t_nr), np.percentile(t_nr, 90),
                     info["jac_min"], info["ms_nonrigid"], info["cpu_ms_nonrigid"]))
        print("pair %d: amp %.1f px, median TRE affine %.2f -> non-rigid %.3f px (90th pct %.3f),"
              " jac_min %.2f, %.0f ms (%.0f ms CPU)" % ((i,) + rows[-1]))
    rows = np.array(rows)
    print("deformed: median over pairs of the median TRE: affine %.2f px, non-rigid %.3f px; "
          "worst pair %.3f px; 90th pct (median over pairs) %.3f px"
          % (np.median(rows[:, 1]), np.median(rows[:, 2]), rows[:, 2].max(),
             np.median(rows[:, 3])))
    assert np.median(rows[:, 2]) < 0.5
    assert np.median(rows[:, 2]) < np.median(rows[:, 1]) / 4
    assert (rows[:, 2] < rows[:, 1] / 2).all(), "a pair improved less than 2x"
    assert rows[:, 2].max() < 1.0
    assert (rows[:, 4] > 0).all(), "a folded field"


def test_undeformed_pairs_stay(driver, tmp_path):
    """An affine-only pair: the non-rigid step must not move landmarks off by more than 0.1 px."""
    rng = np.random.default_rng(7)
    for i in range(3):
        t_aff, t_nr, info = tre_pair(driver, tmp_path, rng, 0, "u%d" % i, mask=i == 1,
                                     damage=i != 2)
        print("undeformed %d: median TRE affine %.3f, non-rigid %.3f px, disp_max %.2f"
              % (i, np.median(t_aff), np.median(t_nr), info["disp_max"]))
        assert np.median(t_nr) < np.median(t_aff) + 0.1
        assert np.percentile(t_nr, 90) < np.percentile(t_aff, 90) + 0.2

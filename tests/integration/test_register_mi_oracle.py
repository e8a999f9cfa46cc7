"""Registration of slides of different stains by mutual information (metric MI of
src/core/register_mi.c) on synthetic pairs with known truth.

The pairs are made here with numpy/scipy, independently of the C code: a tissue of
three classes (two kinds of tissue region and nuclei) on background is drawn twice,
once per stain.  The second stain's brightness is a NON-MONOTONIC function of the
first's (background mid grey, the dimmer region bright, the brighter region dark,
nuclei darkest: bright nuclei in one stain are dark in the other), so no gain and
bias relate them; a third set uses a still more scrambled stain (nuclei as grey as
the background).  The moving image is the second stain warped with
scipy.ndimage.map_coordinates by a known random similarity (any angle, mirror in half
the pairs, scale 0.8-1.25, shift up to 25% of the size) or affine map, with
independent noise in both images.  Landmarks are tissue points of the reference,
mapped through the truth.

The C code runs through the --pair and --mi modes of tests/unit/test_register_mi.c
(built here).  The test checks that MI registers the pairs (median rTRE < 0.002,
median TRE < 0.5 px) and that NCC, on the same pairs, fails on some (so MI is what
makes them work); and it checks sf_reg_mi's value against the same Mattes estimator
written here in numpy, and against a plain np.histogram2d MI.
"""

import json
import os
import subprocess

import numpy as np
import pytest
import scipy.ndimage as ndi

import core_driver

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_SIMILARITY = 16
N_AFFINE = 8
N_SCRAMBLED = 8
SIZE = 320
# brightness per class (background, region A, region B, nuclei) in each stain
STAIN_REF = np.array([0.05, 0.30, 0.55, 1.00])
STAIN_MOV = np.array([0.45, 0.85, 0.20, 0.02])
# a more scrambled second stain: region A darkest, B brightest, nuclei as grey as background
STAIN_SCRAMBLED = np.array([0.50, 0.05, 0.90, 0.40])


@pytest.fixture(scope="session")
def driver(tmp_path_factory):
    return core_driver.build(tmp_path_factory.mktemp("midrv"), "test_register_mi")


def tissue_labels(rng, size):
    """size x size class labels: 0 background, 1 and 2 tissue regions, 3 nuclei; one
    irregular tissue piece in the middle about 0.3 size across."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    r = np.hypot(xx - size / 2, yy - size / 2) / (0.15 * size)
    outline = ndi.gaussian_filter(rng.standard_normal((size, size)), size / 25)
    tissue = (1.0 - r + 0.35 * outline / outline.std()) > 0
    tissue = ndi.binary_opening(tissue, iterations=2)
    regions = ndi.gaussian_filter(rng.standard_normal((size, size)), size / 40) > 0
    seeds = np.zeros((size, size))
    n = int(0.003 * size * size)
    seeds[rng.integers(0, size, n), rng.integers(0, size, n)] = 1
    nuclei = ndi.gaussian_filter(seeds, 1.5) > 0.02
    labels = np.where(tissue, np.where(regions, 2, 1), 0)
    labels = np.where(tissue & nuclei, 3, labels)
    return labels, tissue


def stain(rng, labels, lut):
    texture = ndi.gaussian_filter(rng.standard_normal(labels.shape), 3)
    img = lut[labels] * (1 + 0.15 * texture / texture.std() * (labels > 0))
    return ndi.gaussian_filter(img, 0.8)


def random_map(rng, kind, size):
    """A backward map (ref px -> mov px) about the image centre, as 3x3 (x, y)."""
    theta = rng.uniform(0, 2 * np.pi)
    s = np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
    lin = s * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    if kind == "affine":
        shear = rng.uniform(-0.12, 0.12)
        aniso = np.exp(rng.uniform(-0.1, 0.1))
        lin = lin @ np.array([[aniso, shear], [0, 1 / aniso]])
    if rng.random() < 0.5:
        lin = lin @ np.diag([-1.0, 1.0])
    c = (size - 1) / 2
    m = np.eye(3)
    m[:2, :2] = lin
    m[:2, 2] = c + rng.uniform(-0.25, 0.25, 2) * size - lin @ [c, c]
    return m


def make_pair(rng, kind, size=SIZE, lut=STAIN_MOV):
    """(ref, mov, truth map, landmarks): the two stains of one tissue, the second warped."""
    big = 2 * size
    labels, tissue = tissue_labels(rng, big)
    o = (big - size) // 2  # the reference is the middle of the world
    rh = int(0.85 * size)
    ref = stain(rng, labels, STAIN_REF)[o:o + rh, o:o + size]
    world = stain(rng, labels, lut)
    m = random_map(rng, kind, size)
    minv = np.linalg.inv(m)
    mh, mw = (rng.uniform(0.85, 1.15, 2) * size).astype(int)
    yy, xx = np.mgrid[0:mh, 0:mw].astype(np.float64)
    sx = minv[0, 0] * xx + minv[0, 1] * yy + minv[0, 2] + o
    sy = minv[1, 0] * xx + minv[1, 1] * yy + minv[1, 2] + o
    mov = ndi.map_coordinates(world, [sy, sx], order=3, mode="constant", cval=lut[0])
    ref = ref + rng.normal(0, 0.03, ref.shape)
    mov = mov + rng.normal(0, 0.03, mov.shape)
    ty, tx = np.nonzero(ndi.binary_erosion(tissue[o:o + rh, o:o + size], iterations=3))
    pick = rng.choice(len(tx), 60, replace=False)
    marks = np.stack([tx[pick], ty[pick]], 1).astype(np.float64)
    return ref.astype(np.float32), mov.astype(np.float32), m, marks


def save_pair(tmp_path, ref, mov, tag):
    rp, mp = tmp_path / ("r%s.f32" % tag), tmp_path / ("m%s.f32" % tag)
    ref.tofile(rp)
    mov.tofile(mp)
    return [str(rp), str(mp), str(ref.shape[1]), str(ref.shape[0]), str(mov.shape[1]),
            str(mov.shape[0])]


def register(driver, tmp_path, ref, mov, model, metric, tag):
    out = tmp_path / ("o%s%s.json" % (tag, metric))
    subprocess.run([str(driver), "--pair"] + save_pair(tmp_path, ref, mov, tag) +
                   [model, metric, str(out)], check=True)
    return json.loads(out.read_text())


def tre(m_est, m_true, marks):
    pts = np.c_[marks, np.ones(len(marks))]
    d = pts @ (np.asarray(m_est).reshape(3, 3) - m_true).T
    return np.hypot(d[:, 0], d[:, 1])


def run_set(driver, tmp_path, kind, n, seed, lut=STAIN_MOV):
    """Per pair and metric: median TRE, 90th pct TRE, median rTRE, 90th pct rTRE, ms."""
    rng = np.random.default_rng(seed)
    rows = {"ncc": [], "mi": []}
    for i in range(n):
        ref, mov, m, marks = make_pair(rng, kind, lut=lut)
        diag = np.hypot(*ref.shape)
        for metric in rows:
            r = register(driver, tmp_path, ref, mov, kind, metric, "%s%d" % (kind, i))
            t = tre(r["m"], m, marks)
            rows[metric].append((np.median(t), np.percentile(t, 90), np.median(t) / diag,
                                 np.percentile(t, 90) / diag, r["ms"]))
    return {k: np.array(v) for k, v in rows.items()}


def summary(name, rows):
    for metric, r in rows.items():
        print("\n%s %s: %d pairs, rTRE median of medians %.5f, 90th pct of medians %.5f; "
              "TRE px median %.3f, worst pair median %.2f; pairs over 2 px: %d; "
              "%.0f ms per pair (median)"
              % (name, metric, len(r), np.median(r[:, 2]), np.percentile(r[:, 2], 90),
                 np.median(r[:, 0]), r[:, 0].max(), int((r[:, 0] > 2).sum()),
                 np.median(r[:, 4])))


def check_set(rows):
    mi, ncc = rows["mi"], rows["ncc"]
    assert np.median(mi[:, 2]) < 0.002
    assert np.median(mi[:, 0]) < 0.5
    assert (mi[:, 0] > 2).sum() <= len(mi) // 8, "MI failed on %d pairs" % (mi[:, 0] > 2).sum()
    # the pairs need MI: NCC misregisters some of them outright
    assert (ncc[:, 0] > 2).sum() >= 2, "NCC registered (nearly) all pairs: the test is too easy"


def test_similarity_pairs(driver, tmp_path):
    rows = run_set(driver, tmp_path, "similarity", N_SIMILARITY, 4321)
    summary("similarity", rows)
    check_set(rows)
    assert np.percentile(rows["mi"][:, 2], 90) < 0.002


def test_affine_pairs(driver, tmp_path):
    rows = run_set(driver, tmp_path, "affine", N_AFFINE, 77)
    summary("affine", rows)
    check_set(rows)


def test_scrambled_stain_pairs(driver, tmp_path):
    rows = run_set(driver, tmp_path, "similarity", N_SCRAMBLED, 2024, STAIN_SCRAMBLED)
    summary("scrambled", rows)
    check_set(rows)


# --- the MI value ------------------------------------------------------------------------

def mattes_mi(ref, mov, m, bins):
    """Mattes' estimator as register.h states it, in numpy: reference values binned
    plainly, moving values (bilinear samples) spread by a cubic B-spline window centred
    at 2 + (b - bmin) / (bmax - bmin) * (bins - 5)."""
    h, w = ref.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = m[0, 0] * xx + m[0, 1] * yy + m[0, 2]
    sy = m[1, 0] * xx + m[1, 1] * yy + m[1, 2]
    inside = (sx >= 0) & (sy >= 0) & (sx <= mov.shape[1] - 1) & (sy <= mov.shape[0] - 1)
    a = ref[inside].astype(np.float64)
    b = ndi.map_coordinates(mov.astype(np.float64), [sy[inside], sx[inside]], order=1)
    amin, amax = float(ref.min()), float(ref.max())
    bmin, bmax = float(mov.min()), float(mov.max())
    ia = np.clip(np.floor((a - amin) / (amax - amin) * bins).astype(int), 0, bins - 1)
    k = np.clip(2 + (b - bmin) / (bmax - bmin) * (bins - 5), 2, bins - 3)
    joint = np.zeros((bins, bins))
    for j in range(-1, 3):
        kb = np.floor(k).astype(int) + j
        t = np.abs(kb - k)
        wgt = np.where(t < 1, 2 / 3 - t ** 2 + t ** 3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0))
        np.add.at(joint, (ia, kb), wgt)
    return mi_of_joint(joint), inside.mean()


def mi_of_joint(joint):
    p = joint / joint.sum()
    pa, pb = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / (pa @ pb)[nz])).sum())


def hist2d_mi(ref, mov, m, bins):
    """Plain MI from np.histogram2d of (reference, bilinear moving sample), no windows."""
    h, w = ref.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = m[0, 0] * xx + m[0, 1] * yy + m[0, 2]
    sy = m[1, 0] * xx + m[1, 1] * yy + m[1, 2]
    inside = (sx >= 0) & (sy >= 0) & (sx <= mov.shape[1] - 1) & (sy <= mov.shape[0] - 1)
    b = ndi.map_coordinates(mov.astype(np.float64), [sy[inside], sx[inside]], order=1)
    joint, _, _ = np.histogram2d(ref[inside], b, bins=bins,
                                 range=[[ref.min(), ref.max()], [mov.min(), mov.max()]])
    return mi_of_joint(joint)


def test_mi_value_matches_numpy(driver, tmp_path):
    rng = np.random.default_rng(5)
    ref, mov, m, _ = make_pair(rng, "affine", 200)
    args = save_pair(tmp_path, ref, mov, "v")
    wrong = m.copy()
    wrong[:2, 2] += [3.0, -2.0]
    values = []
    for bins in (16, 32, 48):
        for mm in (m, wrong):
            out = subprocess.run([str(driver), "--mi"] + args + [str(bins)] +
                                 ["%.17g" % v for v in mm[:2].ravel()],
                                 capture_output=True, text=True, check=True).stdout.split()
            mi_c, ov_c = float(out[0]), float(out[1])
            mi_np, ov_np = mattes_mi(ref, mov, mm, bins)
            assert abs(ov_c - ov_np) < 1e-9
            assert abs(mi_c - mi_np) < 1e-4 * max(1.0, mi_np), (bins, mi_c, mi_np)
            plain = hist2d_mi(ref, mov, mm, bins)
            # the B-spline window smooths the joint histogram: a little less MI than
            # hard bins, never more than a few per cent above
            assert 0.6 * plain < mi_c < 1.05 * plain, (bins, mi_c, plain)
            values.append(mi_c)
    # the truth carries more information than a map 3.6 px off
    assert all(values[i] > values[i + 1] + 0.05 for i in (0, 2, 4)), values

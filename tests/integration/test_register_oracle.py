"""The registration core (src/core/register_*.c) on synthetic pairs with known truth.

The pairs are made here with numpy/scipy, independently of the C code: a
tissue-like fluorescence image (an irregular tissue outline, nuclei, texture)
is warped with scipy.ndimage.map_coordinates by a known random similarity
(any angle, mirror in half the pairs, scale 0.8-1.25, shift up to 30% of the
size) or affine map, then both images get independent noise, the moving one
a gain/offset change, and some a torn-away tissue piece.  The two frames
have different, non-square sizes, and tissue may leave either frame.  Landmarks are
random tissue points of the reference; their true places in the moving image
come from the known map.  The C code is driven through the --register mode of
tests/unit/test_register.c (built here), which writes the map it found.

Measures (ANHIR / ACROBAT): TRE in moving-image pixels, rTRE = TRE / the
reference's diagonal; per pair the median and 90th percentile over the
landmarks, then the median and 90th percentile of those over the pairs.
"""

import json
import os
import subprocess

import numpy as np
import pytest
import scipy.ndimage as ndi

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SRCS = ["tests/unit/test_register.c", "src/core/register_prep.c", "src/core/register_rigid.c",
        "src/core/register_affine.c", "src/core/fft_fftw.c", "src/core/select.c", "src/core/transform.c", "src/util/err.c",
        "src/util/log.c", "src/util/pixel.c"]
N_SIMILARITY = 24
N_AFFINE = 8


@pytest.fixture(scope="session")
def driver(tmp_path_factory):
    d = tmp_path_factory.mktemp("regdrv")
    exe = d / "test_register"
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fftw3f"],
                           capture_output=True, text=True, check=True).stdout.split()
    cmd = ["cc", "-std=c11", "-D_GNU_SOURCE", "-O2", "-Wall", "-Wextra", "-Werror",
           "-Iinclude", "-pthread"] + SRCS + flags + ["-lfftw3f_threads", "-lm", "-o", str(exe)]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return exe


def tissue_world(rng, size):
    """A size x size fluorescence-like image, background ~0.05, with one tissue piece in the
    middle about 0.3 size across (60% of a reference frame of size / 2)."""
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = np.hypot(xx - w / 2, yy - h / 2) / (0.15 * size)
    outline = ndi.gaussian_filter(rng.standard_normal((h, w)), size / 25)
    outline /= outline.std()
    tissue = (1.0 - r + 0.35 * outline) > 0
    tissue = ndi.binary_opening(tissue, iterations=2)
    nuclei = np.zeros((h, w))
    n = int(0.004 * h * w)
    ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
    nuclei[ys, xs] = rng.uniform(0.5, 1.5, n)
    nuclei = ndi.gaussian_filter(nuclei, 1.6) * 2 * np.pi * 1.6 ** 2
    texture = ndi.gaussian_filter(rng.standard_normal((h, w)), 5)
    texture = 0.5 + 0.5 * texture / texture.std()
    img = 0.05 + tissue * (0.25 + 0.1 * np.clip(texture, 0, 2) + 0.6 * nuclei)
    return ndi.gaussian_filter(img, 0.7), tissue


def random_map(rng, kind, size):
    """A backward map (ref px -> mov px) about the image centre, as 3x3 (x, y)."""
    theta = rng.uniform(0, 2 * np.pi)
    s = np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
    lin = s * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    if kind == "affine":
        shear = rng.uniform(-0.12, 0.12)
        aniso = np.exp(rng.uniform(-0.1, 0.1))
        lin = lin @ np.array([[aniso, shear], [0, 1 / aniso]])
    mirrored = rng.random() < 0.5
    if mirrored:
        lin = lin @ np.diag([-1.0, 1.0])
    c = (size - 1) / 2
    shift = rng.uniform(-0.3, 0.3, 2) * size
    m = np.eye(3)
    m[:2, :2] = lin
    m[:2, 2] = c + shift - lin @ [c, c]
    return m, mirrored


def make_pair(rng, kind, size=320):
    """(ref, mov, truth map, landmarks) with noise, gain and maybe a torn piece."""
    big = 2 * size
    world, tissue = tissue_world(rng, big)
    o = (big - size) / 2  # the reference is the middle of the world
    rh = int(0.85 * size)  # frames of different, non-square sizes
    ref = world[int(o):int(o) + rh, int(o):int(o) + size]
    m, _ = random_map(rng, kind, size)
    minv = np.linalg.inv(m)
    mh, mw = (rng.uniform(0.85, 1.15, 2) * size).astype(int)
    yy, xx = np.mgrid[0:mh, 0:mw].astype(np.float64)
    sx = minv[0, 0] * xx + minv[0, 1] * yy + minv[0, 2] + o
    sy = minv[1, 0] * xx + minv[1, 1] * yy + minv[1, 2] + o
    mov = ndi.map_coordinates(world, [sy, sx], order=3, mode="constant", cval=0.05)
    if rng.random() < 0.33:  # a piece of tissue torn away in the moving slide
        cy, cx = rng.uniform(0.35, 0.65, 2) * size
        torn = np.hypot(xx - cx, yy - cy) < 0.12 * size
        mov = np.where(torn, 0.05, mov)
    mov = mov * rng.uniform(0.6, 1.4) + rng.uniform(-0.03, 0.03)
    ref = ref + rng.normal(0, 0.03, ref.shape)
    mov = mov + rng.normal(0, 0.03, mov.shape)
    ref_tissue = tissue[int(o):int(o) + rh, int(o):int(o) + size]
    ty, tx = np.nonzero(ndi.binary_erosion(ref_tissue, iterations=3))
    pick = rng.choice(len(tx), 60, replace=False)
    marks = np.stack([tx[pick], ty[pick]], 1).astype(np.float64)
    return ref.astype(np.float32), mov.astype(np.float32), m, marks


def register(driver, tmp_path, ref, mov, model, tag):
    rp, mp, out = tmp_path / ("r%s.f32" % tag), tmp_path / ("m%s.f32" % tag), tmp_path / (
        "o%s.json" % tag)
    ref.tofile(rp)
    mov.tofile(mp)
    subprocess.run([str(driver), "--register", str(rp), str(mp), str(ref.shape[1]),
                    str(ref.shape[0]), str(mov.shape[1]), str(mov.shape[0]), model, str(out)],
                   check=True)
    return json.loads(out.read_text())


def tre(m_est, m_true, marks):
    pts = np.c_[marks, np.ones(len(marks))]
    d = pts @ (np.asarray(m_est).reshape(3, 3) - m_true).T
    return np.hypot(d[:, 0], d[:, 1])


def run_set(driver, tmp_path, kind, n, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ref, mov, m, marks = make_pair(rng, kind)
        r = register(driver, tmp_path, ref, mov, "affine" if kind == "affine" else "similarity",
                     "%s%d" % (kind, i))
        t = tre(r["m"], m, marks)
        diag = np.hypot(*ref.shape)
        rows.append((np.median(t), np.percentile(t, 90), np.median(t) / diag,
                     np.percentile(t, 90) / diag, r["ms"], r["ncc"],
                     np.median(tre(r["init"], m, marks))))
    return np.array(rows)


def summary(name, rows):
    med_rtre = rows[:, 2]
    print("\n%s: %d pairs, rTRE median of medians %.5f, 90th pct of medians %.5f, "
          "median of per-pair 90th pct %.5f; TRE px median %.3f (init %.2f), worst pair "
          "median %.3f; %.1f ms per pair (median), NCC median %.3f"
          % (name, len(rows), np.median(med_rtre), np.percentile(med_rtre, 90),
             np.median(rows[:, 3]), np.median(rows[:, 0]), np.median(rows[:, 6]),
             rows[:, 0].max(), np.median(rows[:, 4]), np.median(rows[:, 5])))


def test_similarity_pairs(driver, tmp_path):
    rows = run_set(driver, tmp_path, "similarity", N_SIMILARITY, 1234)
    summary("similarity", rows)
    assert np.median(rows[:, 2]) < 0.002
    assert np.percentile(rows[:, 2], 90) < 0.002
    assert np.median(rows[:, 0]) < 0.2  # a half-pixel slip anywhere would show
    assert rows[:, 0].max() < 2.0, "a pair failed to register: median TRE %.2f px" % (
        rows[:, 0].max())


def test_affine_pairs(driver, tmp_path):
    rows = run_set(driver, tmp_path, "affine", N_AFFINE, 99)
    summary("affine", rows)
    assert np.median(rows[:, 2]) < 0.002
    assert np.median(rows[:, 0]) < 0.2
    assert rows[:, 0].max() < 3.0

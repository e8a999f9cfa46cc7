"""The registration core (src/core/register_*.c) on synthetic pairs with known truth.

The pairs are made with numpy/scipy (reg_pairs.make_pair), independently of the C code: a
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

from reg_pairs import make_pair  # the pair generator, shared with the mount tests

import core_driver

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_SIMILARITY = 24
N_AFFINE = 8


@pytest.fixture(scope="session")
def driver(tmp_path_factory):
    return core_driver.build(tmp_path_factory.mktemp("regdrv"), "test_register")


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

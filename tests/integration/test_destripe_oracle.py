"""z destriping (src/core/destripe.c) against a numpy + PyWavelets oracle.

The C code runs through the driver modes of tests/unit/test_destripe.c,
compiled here with cc from the core sources alone.  Arrays travel as raw
float32 files in C order (z, y, x).

The oracle is LsDeconv's filter_subband_3d_z.m written again with pywt in
float64: log1p; per XZ slice (fixed y) pywt.wavedec2(db9, mode='symmetric')
at the maximum level; each level's cV band (our slices are (z, x): cV is
low-pass along z, high-pass along x, i.e. MATLAB's H of its (x, z) slice)
FFT'd along z, multiplied by 1 - exp(-k^2 / (2 s^2)) with k = min(i, n - i),
s = (floor(n/2) + 1) * sigma / nx, inverse FFT; pywt.waverec2, cropped to the
slice; expm1.  The same oracle run on the transposed (x, z) slice with cH
filtered along axis 1, as MATLAB lays the slice out, must agree too.

Skipped when pywt (Debian python3-pywt) is missing.
"""
import os
import subprocess

import numpy as np
import pytest

pywt = pytest.importorskip("pywt")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CORE = ["src/core/destripe.c", "src/util/err.c", "src/util/log.c"]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("destripe_bin") / "test_destripe")
    subprocess.run(["cc", "-std=c11", "-D_GNU_SOURCE", "-O2", "-Wall", "-Wextra", "-Werror",
                    "-Iinclude", "-pthread", "tests/unit/test_destripe.c", *CORE, "-lm",
                    "-o", exe], cwd=ROOT, check=True)
    return exe


def run_destripe(driver, tmp_path, vol, sigma, repeat=1):
    nz, ny, nx = vol.shape
    src, dst = tmp_path / "in.raw", tmp_path / "out.raw"
    vol.astype(np.float32).tofile(src)
    out = subprocess.run([driver, "--destripe", str(src), str(nz), str(ny), str(nx),
                          repr(float(sigma)), str(dst), str(repeat)],
                         check=True, capture_output=True, text=True).stdout
    seconds = float(out.split("seconds=")[1].split()[0])
    return np.fromfile(dst, dtype=np.float32).reshape(vol.shape), seconds


def notch(n, sigma, nx):
    """LsDeconv's gaussian_notch_filter_1d, used with ifft(..., 'symmetric')."""
    s = (n // 2 + 1) * max(sigma / nx, np.finfo(np.float32).eps)
    i = np.arange(n)
    k = np.minimum(i, n - i).astype(np.float64)
    return 1.0 - np.exp(-k * k / (2 * s * s))


def destripe_slice(sl, sigma, nx, transposed=False):
    """One XZ slice (z, x) in log space; transposed runs it as MATLAB's (x, z)."""
    img = sl.T if transposed else sl
    coeffs = pywt.wavedec2(img, "db9", mode="symmetric")
    out = [coeffs[0]]
    for ch, cv, cd in coeffs[1:]:
        if transposed:  # MATLAB's H: high-pass along x (axis 0), low-pass along z (axis 1)
            g = notch(ch.shape[1], sigma, nx)
            ch = np.real(np.fft.ifft(np.fft.fft(ch, axis=1) * g[None, :], axis=1))
        else:  # cV of (z, x): low-pass along z (axis 0), high-pass along x (axis 1)
            g = notch(cv.shape[0], sigma, nx)
            cv = np.real(np.fft.ifft(np.fft.fft(cv, axis=0) * g[:, None], axis=0))
        out.append((ch, cv, cd))
    rec = pywt.waverec2(out, "db9", mode="symmetric")[: img.shape[0], : img.shape[1]]
    return rec.T if transposed else rec


def oracle(vol, sigma, transposed=False):
    nz, ny, nx = vol.shape
    if sigma <= 0 or pywt.dwt_max_level(min(nz, nx), 18) == 0:
        return vol.astype(np.float64)
    logv = np.log1p(vol.astype(np.float64))
    out = np.empty_like(logv)
    for y in range(ny):
        out[:, y, :] = destripe_slice(logv[:, y, :], sigma, nx, transposed)
    return np.expm1(out)


def rel_l2(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


def striped_volume(nz, ny, nx, seed):
    """Beads on a smooth background, times a z-constant gain per (y, x) column."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    v = 20 + 10 * np.sin(z * 0.05) * np.cos(x * 0.04)
    for _ in range(30):
        cz, cy, cx = rng.uniform(0, nz), rng.uniform(0, ny), rng.uniform(0, nx)
        v += 400 * np.exp(-((z - cz) ** 2 / 9 + (y - cy) ** 2 / 4 + (x - cx) ** 2 / 4) / 2)
    gain = np.where(rng.uniform(size=(ny, nx)) < 0.2, rng.uniform(0.6, 1.4, (ny, nx)), 1.0)
    striped = (1 + v) * gain[None] - 1
    noise = rng.poisson(np.maximum(striped, 0)).astype(np.float64) - striped
    return (striped + 0.1 * noise).astype(np.float32)


@pytest.mark.parametrize("shape", [(64, 3, 64), (75, 2, 53), (40, 4, 150), (150, 2, 37)])
@pytest.mark.parametrize("sigma", [3.0, 30.0, 1000.0])
def test_matches_pywt_oracle(driver, tmp_path, shape, sigma):
    vol = striped_volume(*shape, seed=sum(shape))
    ours, _ = run_destripe(driver, tmp_path, vol, sigma)
    ref = oracle(vol, sigma)
    err = rel_l2(ours, ref)
    change = rel_l2(vol, ref)
    print(f"shape={shape} sigma={sigma}: rel L2 to oracle {err:.2e}, filter changed {change:.3f}")
    assert change > 1e-3, "the oracle changed nothing: the comparison would prove little"
    assert err < 1e-5


def test_matlab_layout_agrees(driver, tmp_path):
    """MATLAB's slice is (x, z) with H filtered along its columns: same result."""
    vol = striped_volume(72, 2, 90, seed=1)
    ours, _ = run_destripe(driver, tmp_path, vol, 50.0)
    ref = oracle(vol, 50.0, transposed=True)
    assert rel_l2(ours, ref) < 1e-5
    # ... and filtering the other band (cH of (z, x)) would be a different filter.
    logv = np.log1p(vol.astype(np.float64))
    wrong = np.empty_like(logv)
    for y in range(vol.shape[1]):
        coeffs = pywt.wavedec2(logv[:, y, :], "db9", mode="symmetric")
        out = [coeffs[0]]
        for ch, cv, cd in coeffs[1:]:
            g = notch(ch.shape[0], 50.0, vol.shape[2])
            out.append((np.real(np.fft.ifft(np.fft.fft(ch, axis=0) * g[:, None], axis=0)), cv, cd))
        wrong[:, y, :] = pywt.waverec2(out, "db9", mode="symmetric")[: vol.shape[0], : vol.shape[2]]
    assert rel_l2(ours, np.expm1(wrong)) > 1e-3


@pytest.mark.parametrize("shape,levels", [((64, 64), 1), ((70, 53), 1), ((137, 91), 2),
                                          ((300, 140), 3)])
def test_wavedec2_matches_pywt(driver, tmp_path, shape, levels):
    img = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    src, dst = tmp_path / "img.raw", tmp_path / "coef.raw"
    img.tofile(src)
    subprocess.run([driver, "--wavedec2", str(src), str(shape[0]), str(shape[1]), str(levels),
                    str(dst)], check=True)
    got = np.fromfile(dst, dtype=np.float32)
    ref = pywt.wavedec2(img.astype(np.float64), "db9", mode="symmetric", level=levels)
    flat = np.concatenate([ref[0].ravel()] + [b.ravel() for lv in ref[1:] for b in lv])
    assert got.size == flat.size
    assert rel_l2(got, flat) < 1e-6


def test_noop_and_speed(driver, tmp_path):
    vol = striped_volume(128, 16, 128, seed=9)
    same, _ = run_destripe(driver, tmp_path, vol, 0.0)
    assert np.array_equal(same, vol)
    _, seconds = run_destripe(driver, tmp_path, vol, 1000.0, repeat=3)
    print(f"destripe 128 x 16 x 128: {vol.size / seconds / 1e6:.1f} Mvoxels/s")

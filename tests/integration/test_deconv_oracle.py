"""Deconvolution core against independent oracles (scipy, scikit-image, numpy).

The C code is driven through the unit-test binaries' driver modes
(tests/unit/test_psf.c `--psf`, tests/unit/test_deconv.c `--rl`), compiled
here with cc from the core sources only (no FUSE, libtiff or libvips).
Arrays travel as raw float32 files in C order (z, y, x).

Oracles:
- PSF: LsMakePSF's formula evaluated with scipy.integrate.quad and
  scipy.special.j0; FWHM with scipy.optimize.brentq; whole grids compared.
- RL: scikit-image's richardson_lucy (x0 = 0.5, 'same' zero-boundary
  convolution) against our engine with init=0.5 and every LsDeconv extra off;
  and a numpy/scipy.ndimage re-implementation of the documented LsDeconv
  pipeline (pre-filter, taper, padding, regularisation, damping) in float64.
- Quality: synthetic beads blurred by the PSF plus Poisson noise; PSNR gain.
- Speed: voxel-iterations/s of the CPU engine next to skimage on one volume.
"""
import math
import os
import subprocess
import time

import numpy as np
import pytest
from scipy import integrate, ndimage, optimize, signal, special
from skimage.metrics import structural_similarity
from skimage.restoration import richardson_lucy

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CORE = ["src/core/psf.c", "src/core/deconv.c", "src/core/fft_fftw.c",
        "src/util/err.c", "src/util/log.c"]

REFERENCE = dict(dxy=400, dz=1200, na=0.4, rf=1.42, lambda_ex=561, lambda_em=600,
                 fcyl=240, slitwidth=12)
OTHER = dict(dxy=150, dz=500, na=0.6, rf=1.33, lambda_ex=488, lambda_em=525,
             fcyl=100, slitwidth=8)


@pytest.fixture(scope="module")
def drivers(tmp_path_factory):
    out = tmp_path_factory.mktemp("deconv_bin")
    built = {}
    for name in ("test_psf", "test_deconv"):
        exe = str(out / name)
        subprocess.run(["cc", "-std=c11", "-D_GNU_SOURCE", "-O2", "-Wall", "-Wextra",
                        "-Werror", "-Iinclude", "-pthread", f"tests/unit/{name}.c", *CORE,
                        "-lfftw3f_threads", "-lfftw3f", "-lm", "-o", exe],
                       cwd=ROOT, check=True)
        built[name] = exe
    return built


# ---------------------------------------------------------------- PSF oracle

def widefield(x, y, z, na, n, lam):
    """4 |int_0^1 J0(2 pi na r rho/(lam n)) exp(-i pi rho^2 z na^2/(lam n^2)) rho drho|^2."""
    a = 2 * math.pi * na * math.hypot(x, y) / (lam * n)
    b = math.pi * z * na * na / (lam * n * n)
    kw = dict(epsabs=1e-14, epsrel=1e-12, limit=200)
    re = integrate.quad(lambda p: special.j0(a * p) * math.cos(b * p * p) * p, 0, 1, **kw)[0]
    im = integrate.quad(lambda p: -special.j0(a * p) * math.sin(b * p * p) * p, 0, 1, **kw)[0]
    return 4 * (re * re + im * im)


def lightsheet(x, y, z, o):
    na_ls = math.sin(math.atan(o["slitwidth"] / (2 * o["fcyl"])))
    return (widefield(z, 0, x, na_ls, o["rf"], o["lambda_ex"])
            * widefield(x, y, z, o["na"], o["rf"], o["lambda_em"]))


def oracle_psf(o):
    half = 0.5 * lightsheet(0, 0, 0, o)
    lat = o["lambda_em"] * o["rf"] / o["na"]
    hx = optimize.brentq(lambda t: lightsheet(t, 0, 0, o) - half, 1e-3, 1.5 * lat, xtol=1e-9)
    hz = optimize.brentq(lambda t: lightsheet(0, 0, t, o) - half, 1e-3,
                         3 * lat * o["rf"] / o["na"], xtol=1e-9)
    dxy = min(o["dxy"], 0.61 * o["lambda_em"] / o["na"] / 3)

    def odd(n):
        return n if n % 2 else n + 1
    nxy, nz = odd(math.ceil(4 * hx / dxy)), odd(math.ceil(4 * hz / o["dz"]))
    cxy, cz = nxy // 2, nz // 2
    octant = np.array([[[lightsheet(i * dxy, j * dxy, k * o["dz"], o) for i in range(cxy + 1)]
                        for j in range(cxy + 1)] for k in range(cz + 1)])
    zi = np.abs(np.arange(nz) - cz)
    yi = np.abs(np.arange(nxy) - cxy)
    full = octant[zi][:, yi][:, :, yi]
    return full / full.sum(), 2 * hx, 2 * hz


def run_psf(drivers, o, path):
    args = [str(o[k]) for k in ("dxy", "dz", "na", "rf", "lambda_ex", "lambda_em", "fcyl",
                                "slitwidth")]
    out = subprocess.run([drivers["test_psf"], "--psf", *args, str(path)], check=True,
                         capture_output=True, text=True).stdout.split()
    nx, ny, nz = map(int, out[:3])
    psf = np.fromfile(path, dtype=np.float32).reshape(nz, ny, nx)
    return psf, float(out[5]), float(out[6])


@pytest.mark.parametrize("optics", [REFERENCE, OTHER], ids=["reference", "other"])
def test_psf_matches_quad(drivers, tmp_path, optics):
    psf, fwhm_xy, fwhm_z = run_psf(drivers, optics, tmp_path / "psf.raw")
    want, want_xy, want_z = oracle_psf(optics)
    if optics is REFERENCE:
        assert psf.shape == (19, 9, 9)  # (z, y, x): LsDeconv's 9 x 9 x 19
    assert psf.shape == want.shape
    assert fwhm_xy == pytest.approx(want_xy, rel=1e-7)
    assert fwhm_z == pytest.approx(want_z, rel=1e-7)
    err = np.abs(psf - want).max() / want.max()
    print(f"PSF {psf.shape}: fwhm {fwhm_xy:.2f} / {fwhm_z:.2f} nm, max error/max {err:.2e}")
    assert err < 2e-6
    assert psf.sum() == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- RL oracles

def run_rl(drivers, tmp_path, y, psf, *opts):
    yin, kin, out = tmp_path / "y.raw", tmp_path / "k.raw", tmp_path / "out.raw"
    y.astype(np.float32).tofile(yin)
    psf.astype(np.float32).tofile(kin)
    nz, ny, nx = y.shape
    kz, ky, kx = psf.shape
    res = subprocess.run([drivers["test_deconv"], "--rl", str(yin), str(nx), str(ny), str(nz),
                          str(kin), str(kx), str(ky), str(kz), str(out), *opts],
                         check=True, capture_output=True, text=True).stdout
    info = dict(kv.split("=") for kv in res.split())
    return np.fromfile(out, dtype=np.float32).reshape(y.shape), info


@pytest.fixture(scope="module")
def ref_psf(drivers, tmp_path_factory):
    return run_psf(drivers, REFERENCE, tmp_path_factory.mktemp("psf") / "psf.raw")[0]


def test_rl_matches_skimage(drivers, tmp_path, ref_psf):
    rng = np.random.default_rng(1)
    y = rng.uniform(0.1, 1.0, size=(32, 48, 40)).astype(np.float32)
    ours, info = run_rl(drivers, tmp_path, y, ref_psf, "numit=10", "init=0.5")
    want = richardson_lucy(y, ref_psf, num_iter=10, clip=False)
    err = np.abs(ours - want).max() / np.abs(want).max()
    print(f"RL vs skimage (x0=0.5, 10 it, fft {info['fft']}): max error/max {err:.2e}")
    assert info["iterations"] == "10"
    assert err < 1e-5


def rl_same_float64(y, psf, numit):
    """skimage's formula in float64 with x0 = y (LsDeconv's start), eps floor 1.19e-7."""
    x = y.astype(np.float64)
    mirror = psf[::-1, ::-1, ::-1]
    for _ in range(numit):
        hx = signal.fftconvolve(x, psf, mode="same")
        x = np.abs(x * signal.fftconvolve(y / np.maximum(hx, 1.19e-7), mirror, mode="same"))
    return x


def test_rl_x0_equals_y_matches_numpy(drivers, tmp_path, ref_psf):
    rng = np.random.default_rng(2)
    y = rng.gamma(2.0, 50.0, size=(24, 30, 28)).astype(np.float32) + 1
    ours, _ = run_rl(drivers, tmp_path, y, ref_psf, "numit=8")
    want = rl_same_float64(y, ref_psf.astype(np.float64), 8)
    err = np.linalg.norm(ours - want) / np.linalg.norm(want)
    print(f"RL x0=y vs numpy float64: relative L2 {err:.2e}")
    assert err < 1e-5


def smooth7(n):
    """The smallest 7-smooth integer >= n (the FFT size LsDeconv pads to)."""
    while True:
        r = n
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return n
        n += 1


def gauss_taps(sigma, radius):
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-k * k / (2 * sigma * sigma))
    return w / w.sum()


def lsdeconv_pipeline(y, psf, sigma, size, dark, numit, reg, damp):
    """The documented per-block pipeline (docs/deconvolution.md), scipy.ndimage-based."""
    y = y.astype(np.float64)
    psf = psf.astype(np.float64)
    for axis, (s, n) in zip((2, 1, 0), zip(sigma, size)):  # x y z
        if s > 0:
            y = ndimage.correlate1d(y, gauss_taps(s, (n - 1) // 2), axis=axis, mode="nearest")
    y = np.maximum(y - dark, 0)
    # taper: ramps of width max(8, psf/2) (capped at n/2) against the replicate-edge blur
    blurred = ndimage.convolve(y, psf, mode="nearest")
    w = np.ones_like(y)
    for axis in range(3):
        n = y.shape[axis]
        r = min(max(8, psf.shape[axis] // 2), n // 2)
        i = np.arange(n)
        ramp = np.minimum(np.minimum(i, n - 1 - i) / r, 1.0)
        w = w * ramp.reshape([-1 if a == axis else 1 for a in range(3)])
    y = w * y + (1 - w) * blurred
    # zero padding to smooth7(n + psf - 1), block at floor((N - n) / 2)
    shape = [smooth7(n + k - 1) for n, k in zip(y.shape, psf.shape)]
    off = [(N - n) // 2 for N, n in zip(shape, y.shape)]
    sl = tuple(slice(o, o + n) for o, n in zip(off, y.shape))
    ypad = np.zeros(shape)
    ypad[sl] = y
    x = ypad.copy()
    r26 = np.full((3, 3, 3), 1 / 26)
    r26[1, 1, 1] = 0
    g = gauss_taps(0.5, 2)
    for i in range(1, numit + 1):
        regt = 0 < reg < numit and 1 < i < numit and i % reg == 0
        if regt:
            for axis in range(3):
                x = ndimage.correlate1d(x, g, axis=axis, mode="nearest")
        rx = ndimage.convolve(x, r26, mode="constant") if regt and damp > 0 else None
        hx = ndimage.convolve(x, psf, mode="wrap")
        c = ndimage.correlate(ypad / np.maximum(hx, 1.19e-7), psf, mode="wrap")
        x = np.abs((1 - damp) * x * c + damp * rx) if rx is not None else np.abs(x * c)
    return x[sl]


def test_full_pipeline_matches_numpy(drivers, tmp_path, ref_psf):
    rng = np.random.default_rng(3)
    y = (rng.gamma(2.0, 40.0, size=(16, 20, 24)) + 20).astype(np.float32)
    ours, _ = run_rl(drivers, tmp_path, y, ref_psf, "numit=7", "taper=1",
                     "sigma=0.5,0.5,2.5", "size=13,13,25", "dark=15", "reg=3", "damp=0.2")
    want = lsdeconv_pipeline(y, ref_psf, (0.5, 0.5, 2.5), (13, 13, 25), 15, 7, 3, 0.2)
    err = np.linalg.norm(ours - want) / np.linalg.norm(want)
    print(f"full LsDeconv pipeline vs scipy.ndimage float64: relative L2 {err:.2e}")
    assert err < 1e-5


# ---------------------------------------------------------------- quality

def psnr(a, ref):
    return 10 * np.log10(ref.max() ** 2 / np.mean((a - ref) ** 2))


def test_beads_psnr_gain(drivers, tmp_path, ref_psf):
    """Beads (Gaussian blobs, sigma 1 voxel) blurred by the reference PSF, plus a
    background of 10 and Poisson noise; 20 iterations with a light pre-filter."""
    rng = np.random.default_rng(4)
    shape = (48, 64, 64)
    truth = np.zeros(shape)
    pts = rng.integers([8, 4, 4], [40, 60, 60], size=(40, 3))
    truth[tuple(pts.T)] = rng.uniform(2500, 7500, size=40)
    truth = ndimage.gaussian_filter(truth, 1.0)
    background = 10.0
    blurred = signal.fftconvolve(truth, ref_psf.astype(np.float64), mode="same")
    observed = rng.poisson(np.maximum(blurred, 0) + background).astype(np.float32)
    before = psnr(observed - background, truth)
    ssim_before = structural_similarity(observed - background, truth,
                                        data_range=truth.max())
    ours, _ = run_rl(drivers, tmp_path, observed, ref_psf, "numit=20", "taper=1",
                     f"dark={background}", "reg=0", "sigma=0.5,0.5,0.5", "size=3,3,3")
    after = psnr(ours, truth)
    ssim_after = structural_similarity(ours, truth, data_range=truth.max())
    print(f"beads: PSNR {before:.2f} -> {after:.2f} dB (+{after - before:.2f}), "
          f"SSIM {ssim_before:.3f} -> {ssim_after:.3f}")
    assert after > before + 2.5
    assert ssim_after > ssim_before + 0.05


# ---------------------------------------------------------------- speed

def test_speed_vs_skimage(drivers, tmp_path):
    """Voxel-iterations/s on 64 x 256 x 256 with a 15^3 PSF, 10 iterations (facts.md)."""
    rng = np.random.default_rng(5)
    y = rng.uniform(0.1, 1.0, size=(64, 256, 256)).astype(np.float32)
    psf = np.ones((15, 15, 15), np.float32) / 15 ** 3
    vox_it = y.size * 10
    _, info = run_rl(drivers, tmp_path, y, psf, "numit=10", "init=0.5", "threads=2",
                     "measure=1", "repeat=2")
    ours = vox_it / float(info["seconds"])
    t0 = time.perf_counter()
    richardson_lucy(y, psf, num_iter=10, clip=False)
    theirs = vox_it / (time.perf_counter() - t0)
    print(f"speed: scopefs FFTW {ours / 1e6:.1f} M voxel-it/s (fft {info['fft']}), "
          f"skimage {theirs / 1e6:.1f} M voxel-it/s, ratio {ours / theirs:.2f}x")
    assert ours > theirs

"""Biggs-Andrews accelerated Richardson-Lucy (accelerate=1) against independent oracles.

The oracle is the formula of Biggs & Andrews (1997) as MATLAB's deconvlucy
writes it, re-implemented here in numpy float64 (docs/deconvolution.md §3):

    v_k     = max(x_k + a_k (x_k - x_{k-1}), 0)
    x_{k+1} = RL(v_k)                          (LsDeconv's update, from v_k)
    g_k     = x_{k+1} - v_k
    a_k     = <g_{k-1}, g_{k-2}> / <g_{k-2}, g_{k-2}> clamped to [0, 1]; 0 while
              fewer than two steps exist and on a regularisation iteration.

The C core runs through tests/unit/test_deconv.c's `--rl` driver, built by
test_deconv_oracle.py's fixture.  The last test shows the point of the
feature: k accelerated iterations land closer to the 3k-iteration result, at
a lower residual, than k plain ones.
"""
import numpy as np
import pytest
from scipy import ndimage, signal

from test_deconv_oracle import drivers, gauss_taps, psnr, ref_psf, run_rl  # noqa: F401


def ba_alpha(g1, g2):
    den = float(np.sum(g2 * g2))
    return min(max(float(np.sum(g1 * g2)) / den, 0.0), 1.0) if den > 0 else 0.0


def accelerated_rl_same(y, psf, numit, accelerate=True):
    """RL with x0 = y, 'same' zero-boundary convolution (the block without
    regularisation), accelerated as in the module docstring; float64."""
    y = y.astype(np.float64)
    mirror = psf[::-1, ::-1, ::-1]
    x, x_prev, steps = y.copy(), y.copy(), []
    for _ in range(numit):
        a = ba_alpha(steps[-1], steps[-2]) if accelerate and len(steps) >= 2 else 0.0
        v = np.maximum(x + a * (x - x_prev), 0)
        hx = signal.fftconvolve(v, psf, mode="same")
        x_prev = x
        x = np.abs(v * signal.fftconvolve(y / np.maximum(hx, 1.19e-7), mirror, mode="same"))
        steps.append(x - v)
    return x


def accelerated_rl_padded(y, psf, numit, reg, damp, shape):
    """The same on the padded grid `shape` (block centred, zero outside) with
    LsDeconv's regularisation: Gaussian sigma 0.5 (5 taps, replicate edges)
    and the R26 blend every reg-th iteration (not the first or last); such an
    iteration does not extrapolate, and the momentum after it starts from
    the regularised estimate."""
    y = y.astype(np.float64)
    psf = psf.astype(np.float64)
    off = [(N - n) // 2 for N, n in zip(shape, y.shape)]
    sl = tuple(slice(o, o + n) for o, n in zip(off, y.shape))
    ypad = np.zeros(shape)
    ypad[sl] = y
    r26 = np.full((3, 3, 3), 1 / 26)
    r26[1, 1, 1] = 0
    g = gauss_taps(0.5, 2)
    x, x_prev, steps = ypad.copy(), ypad.copy(), []
    for i in range(1, numit + 1):
        regt = 0 < reg < numit and 1 < i < numit and i % reg == 0
        if regt:
            for axis in range(3):
                x = ndimage.correlate1d(x, g, axis=axis, mode="nearest")
        rx = ndimage.convolve(x, r26, mode="constant") if regt and damp > 0 else None
        a = ba_alpha(steps[-1], steps[-2]) if len(steps) >= 2 and not regt else 0.0
        v = np.maximum(x + a * (x - x_prev), 0)
        x_prev = x
        hx = ndimage.convolve(v, psf, mode="wrap")
        c = ndimage.correlate(ypad / np.maximum(hx, 1.19e-7), psf, mode="wrap")
        x = np.abs((1 - damp) * v * c + damp * rx) if rx is not None else np.abs(v * c)
        steps.append(x - v)
    return x[sl]


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_accelerated_rl_matches_numpy(drivers, tmp_path, ref_psf):
    rng = np.random.default_rng(21)
    y = rng.gamma(2.0, 50.0, size=(24, 30, 28)).astype(np.float32) + 1
    psf = ref_psf.astype(np.float64)
    ours, info = run_rl(drivers, tmp_path, y, ref_psf, "numit=10", "accelerate=1")
    want = accelerated_rl_same(y, psf, 10)
    plain = accelerated_rl_same(y, psf, 10, accelerate=False)
    err = rel_l2(ours, want)
    print(f"accelerated RL (10 it) vs numpy float64: relative L2 {err:.2e}; "
          f"it differs from plain RL by {rel_l2(plain, want):.2e}")
    assert info["iterations"] == "10"
    assert err < 1e-5
    assert rel_l2(plain, want) > 1e3 * err  # the extrapolation is really on


def test_accelerated_rl_with_regularisation_matches_numpy(drivers, tmp_path, ref_psf):
    rng = np.random.default_rng(22)
    y = (rng.gamma(2.0, 40.0, size=(16, 20, 24)) + 20).astype(np.float32)
    shape = (40, 32, 48)  # (z, y, x); passed as fft=x,y,z so both use one grid
    ours, _ = run_rl(drivers, tmp_path, y, ref_psf, "numit=9", "reg=3", "damp=0.2",
                     "accelerate=1", f"fft={shape[2]},{shape[1]},{shape[0]}")
    want = accelerated_rl_padded(y, ref_psf, 9, 3, 0.2, shape)
    err = rel_l2(ours, want)
    print(f"accelerated RL + Gaussian/R26 every 3rd it (9 it) vs numpy float64: "
          f"relative L2 {err:.2e}")
    assert err < 1e-5


def beads(rng, ref_psf):
    shape = (48, 64, 64)
    truth = np.zeros(shape)
    pts = rng.integers([8, 4, 4], [40, 60, 60], size=(40, 3))
    truth[tuple(pts.T)] = rng.uniform(2500, 7500, size=40)
    truth = ndimage.gaussian_filter(truth, 1.0)
    blurred = signal.fftconvolve(truth, ref_psf.astype(np.float64), mode="same")
    observed = rng.poisson(np.maximum(blurred, 0) + 10.0).astype(np.float32)
    return truth, observed


def residual(x, y, psf):
    return rel_l2(signal.fftconvolve(x.astype(np.float64), psf, mode="same"), y)


def test_acceleration_reaches_more_iterations(drivers, tmp_path, ref_psf):
    """k accelerated iterations against k and 3k plain ones, on the bead volume
    of test_deconv_oracle.py (no pre-filter or regularisation)."""
    truth, observed = beads(np.random.default_rng(4), ref_psf)
    y = observed - 10.0  # the background, as dark=10 would remove it
    y = np.maximum(y, 0).astype(np.float32)
    psf = ref_psf.astype(np.float64)
    k = 6
    runs = {}
    for numit, accel in ((k, 0), (k, 1), (3 * k, 0)):
        runs[numit, accel] = run_rl(drivers, tmp_path, y, ref_psf, f"numit={numit}",
                                    f"accelerate={accel}")[0]
    target = runs[3 * k, 0]
    d_plain, d_accel = rel_l2(runs[k, 0], target), rel_l2(runs[k, 1], target)
    r = {key: residual(v, y, psf) for key, v in runs.items()}
    print(f"beads: distance to plain {3 * k} it: plain {k} it {d_plain:.3f}, accelerated "
          f"{k} it {d_accel:.3f}; residual |Hx - y|/|y| plain {r[k, 0]:.4f}, accelerated "
          f"{r[k, 1]:.4f}, plain {3 * k} it {r[3 * k, 0]:.4f}; PSNR plain "
          f"{psnr(runs[k, 0], truth):.2f}, accelerated {psnr(runs[k, 1], truth):.2f}, "
          f"plain {3 * k} it {psnr(target, truth):.2f} dB")
    assert d_accel < 0.6 * d_plain
    assert r[k, 1] < r[k, 0]


@pytest.mark.parametrize("accel", [0, 1])
def test_iterations_to_psnr(drivers, tmp_path, ref_psf, accel):
    """Reports PSNR against the ground truth per iteration count, and the
    iterations the stop criterion takes (docs table); asserts only that RL
    improves on the raw data."""
    truth, observed = beads(np.random.default_rng(4), ref_psf)
    y = np.maximum(observed - 10.0, 0).astype(np.float32)
    row = []
    for numit in (2, 4, 6, 8, 12, 16, 24, 32):
        out = run_rl(drivers, tmp_path, y, ref_psf, f"numit={numit}",
                     f"accelerate={accel}")[0]
        row.append(f"{numit}:{psnr(out, truth):.2f}")
        if numit == 6:
            assert psnr(out, truth) > psnr(y, truth)
    stops = []
    for stop in (1.0, 0.3):
        out, info = run_rl(drivers, tmp_path, y, ref_psf, "numit=200", f"stop={stop}",
                           f"accelerate={accel}")
        stops.append(f"stop={stop}%: {info['iterations']} it, {psnr(out, truth):.2f} dB")
    print(f"accelerate={accel}: PSNR (iterations:dB) raw {psnr(y, truth):.2f} | "
          + " ".join(row) + " | " + "; ".join(stops))


# ------------------------------------------------------------------ through the mount

def test_mount_accelerate_matches_oracle(scopefs):
    """-o accelerate=1 through a real mount: one block covering a small stack
    (float32 out) against the oracle above after LsDeconv's pre-filter and
    taper (test_mount_deconv.py's pipeline, cut before RL), on the volume
    mirrored by the halo; accelerate=0 on the same stack differs, and a bad
    value is an option error naming the option."""
    import gen
    from test_deconv_oracle import REFERENCE, oracle_psf, smooth7
    from test_mount_deconv import OPTICS, SIGMA, SIZE, read_stack, write_stack

    psf = oracle_psf(REFERENCE)[0]
    vol = gen.beads(24, 40, 48, seed=5)
    names = write_stack(scopefs.raw / 'beads', vol)
    opts = dict(OPTICS, dtype='float32', threads='2', deconv_block='128')
    fast = scopefs.mount(opts=dict(opts, accelerate='1'))
    got = read_stack(fast.path('deconvolved', 'beads'), names)
    fast.unmount()
    plain = scopefs.mount(opts=opts)
    slow = read_stack(plain.path('deconvolved', 'beads'), names)
    plain.unmount()

    halo = (25, 13, 13)
    y = np.pad(vol.astype(np.float64), [(h, h) for h in halo], mode='symmetric')
    for axis, s, n in zip((2, 1, 0), SIGMA, SIZE):
        y = ndimage.correlate1d(y, gauss_taps(s, (n - 1) // 2), axis=axis, mode='nearest')
    half = [k // 2 for k in psf.shape]
    blurred = signal.fftconvolve(np.pad(y, [(h, h) for h in half], mode='edge'), psf,
                                 mode='valid')
    w = np.ones_like(y)
    for axis in range(3):
        n = y.shape[axis]
        r = min(max(8, psf.shape[axis] // 2), n // 2)
        i = np.arange(n)
        w = w * np.minimum(np.minimum(i, n - 1 - i) / r, 1.0).reshape(
            [-1 if a == axis else 1 for a in range(3)])
    y = w * y + (1 - w) * blurred
    shape = [smooth7(n + k - 1) for n, k in zip(y.shape, psf.shape)]
    want = accelerated_rl_padded(y, psf, 6, 3, 0.0, shape)
    want = want[tuple(slice(h, h + n) for h, n in zip(halo, vol.shape))]
    err = rel_l2(got, want)
    print(f"\nmount accelerate=1 (6 it, Gaussian at 3) vs numpy oracle: relative L2 {err:.2e};"
          f" accelerate=0 differs by {rel_l2(slow, got):.2e}")
    assert err < 1e-4
    assert rel_l2(slow, got) > 100 * err

    r = scopefs.run(['-o', 'dxy=0.4,dz=1.2,accelerate=2', str(scopefs.raw),
                     str(scopefs.tmp / 'mnt_bad')])
    assert r.returncode == 2 and 'accelerate' in r.stderr.decode(), r.stderr

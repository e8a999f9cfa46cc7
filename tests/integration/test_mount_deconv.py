"""deconvolved/ through a real mount: LsDeconv computed block by block on read.

Oracles:
- a float64 numpy/scipy re-implementation of the documented per-block
  pipeline (docs/deconvolution.md section 3) run on the whole volume padded
  with numpy's 'symmetric' mode, with the PSF evaluated by scipy quad
  (test_deconv_oracle.oracle_psf): the one-block mount must match it;
- the same stack deconvolved block by block (small blocks) against one block
  covering the whole volume: the seam error at block faces is bounded;
- ground truth: beads blurred by the PSF plus Poisson noise; PSNR must rise;
- LsDeconv's output scaling recomputed in numpy (MATLAB prctile = numpy
  'hazen' percentiles) from the float32 planes;
- determinism across read orders, thread counts and cache states;
- ImageJ 1.x opening a deconvolved plane.
"""
import os
import time

import numpy as np
import pytest
import tifffile
from scipy import ndimage, signal

from conftest import REPO, read_all
from test_deconv_oracle import REFERENCE, gauss_taps, oracle_psf, smooth7
from test_mount_deconvolved import imagej_read
from test_mount_input import assert_refused

import gen

OPTICS = {'dxy': '0.4', 'dz': '1.2', 'lambda_ex': '561', 'lambda_em': '600'}
SIGMA = (0.5, 0.5, 2.5)  # x y z
SIZE = (13, 13, 25)


@pytest.fixture(scope='module')
def psf():
    return oracle_psf(REFERENCE)[0]  # (19, 9, 9), sum 1


def write_stack(folder, vol):
    """vol (z, y, x) as single-page planes img_000001.tif ... in folder."""
    os.makedirs(folder, exist_ok=True)
    for z in range(vol.shape[0]):
        tifffile.imwrite(os.path.join(folder, 'img_%06d.tif' % (z + 1)), vol[z], metadata=None)
    return ['img_%06d.tif' % (z + 1) for z in range(vol.shape[0])]


def read_stack(folder, names, order=None):
    planes = {}
    for i in (order if order is not None else range(len(names))):
        planes[i] = tifffile.imread(os.path.join(folder, names[i]))
    return np.stack([planes[i] for i in range(len(names))])


def read_bytes(folder, names, order):
    return {names[i]: read_all(os.path.join(folder, names[i])) for i in order}


# ------------------------------------------------------------------ the oracle

def pipeline(y, psf, sigma=SIGMA, size=SIZE, dark=0.0, numit=6, reg=3):
    """docs/deconvolution.md section 3 on one block, float64, FFTs by numpy."""
    y = y.astype(np.float64)
    psf = psf.astype(np.float64)
    for axis, s, n in zip((2, 1, 0), sigma, size):
        if s > 0:
            y = ndimage.correlate1d(y, gauss_taps(s, (n - 1) // 2), axis=axis, mode='nearest')
    y = np.maximum(y - dark, 0)
    half = [k // 2 for k in psf.shape]
    blurred = signal.fftconvolve(np.pad(y, [(h, h) for h in half], mode='edge'), psf,
                                 mode='valid')
    w = np.ones_like(y)
    for axis in range(3):
        n = y.shape[axis]
        r = min(max(8, psf.shape[axis] // 2), n // 2)
        i = np.arange(n)
        ramp = np.minimum(np.minimum(i, n - 1 - i) / r, 1.0)
        w = w * ramp.reshape([-1 if a == axis else 1 for a in range(3)])
    y = w * y + (1 - w) * blurred
    shape = [smooth7(n + k - 1) for n, k in zip(y.shape, psf.shape)]
    off = [(N - n) // 2 for N, n in zip(shape, y.shape)]
    sl = tuple(slice(o, o + n) for o, n in zip(off, y.shape))
    ypad = np.zeros(shape)
    ypad[sl] = y
    kpad = np.zeros(shape)
    kpad[tuple(slice(0, k) for k in psf.shape)] = psf
    kpad = np.roll(kpad, [-h for h in half], axis=(0, 1, 2))
    otf = np.fft.rfftn(kpad)
    x = ypad.copy()
    g = gauss_taps(0.5, 2)
    for i in range(1, numit + 1):
        if 0 < reg < numit and 1 < i < numit and i % reg == 0:
            for axis in range(3):
                x = ndimage.correlate1d(x, g, axis=axis, mode='nearest')
        hx = np.fft.irfftn(np.fft.rfftn(x) * otf, s=shape)
        ratio = ypad / np.maximum(hx, 1.19e-7)
        c = np.fft.irfftn(np.fft.rfftn(ratio) * np.conj(otf), s=shape)
        x = np.abs(x * c)
    return x[sl]


def whole_volume_oracle(vol, psf, halo=(25, 13, 13), **kw):
    """One block covering the volume: the volume mirrored ('symmetric') by the halo."""
    padded = np.pad(vol.astype(np.float64), [(h, h) for h in halo], mode='symmetric')
    out = pipeline(padded, psf, **kw)
    return out[tuple(slice(h, h + n) for h, n in zip(halo, vol.shape))]


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------ tests

def test_blocks_match_whole_volume_and_oracle(scopefs, psf):
    """Seams: small blocks (32^3 cores: 3 x 3 x 2 of them) against one block
    covering the volume, and that one against the numpy oracle."""
    vol = gen.beads(40, 72, 80, seed=11)
    names = write_stack(scopefs.raw / 'beads', vol)
    opts = dict(OPTICS, dtype='float32', threads='2')
    t0 = time.monotonic()
    small = scopefs.mount(opts=dict(opts, deconv_block='32'))
    got = read_stack(small.path('deconvolved', 'beads'), names)
    t_small = time.monotonic() - t0
    whole = scopefs.mount(opts=dict(opts, deconv_block='128'))
    ref = read_stack(whole.path('deconvolved', 'beads'), names)
    assert got.dtype == np.float32 and got.shape == vol.shape

    want = whole_volume_oracle(vol, psf)
    err_oracle = rel_l2(ref, want)

    diff = np.abs(got - ref) / np.abs(ref).max()
    # distance of each voxel to the nearest block face (cores of 32)
    steps = [np.minimum(np.arange(n) % 32, 31 - np.arange(n) % 32) for n in vol.shape]
    dist = np.minimum(np.minimum(steps[0][:, None, None], steps[1][None, :, None]),
                      steps[2][None, None, :])
    err_l2 = rel_l2(got, ref)
    at_face, centre = diff[dist == 0], diff[dist >= 12]
    print('\nseams: rel L2 %.2e; max |diff|/max %.2e on the face voxels (mean %.1e), %.2e '
          '12+ voxels from any face; whole vs numpy oracle rel L2 %.2e; small-block mount '
          'read in %.1f s (18 blocks)'
          % (err_l2, at_face.max(), at_face.mean(), centre.max(), err_oracle, t_small))
    assert err_oracle < 1e-4
    assert err_l2 < 5e-3
    assert at_face.max() < 5e-3 and at_face.mean() < 2e-4
    assert centre.max() < 1e-4
    st = small.status()
    assert st['errors'] == 0 and st['problems'] == []


@pytest.mark.parametrize('numit', [1, 6])
def test_negative_float32_input_is_clamped_at_zero(scopefs, psf, numit):
    """Background-subtracted float32 planes (half the voxels below 0) with
    the default dark=0: the filtered block is clamped at 0 before
    Richardson-Lucy, as the oracle does (docs section 3 step 2).  Without
    the clamp the ratio y / max(Hx, 1.19e-7) divides the negative voxels by
    the floor: numit=1 gave a maximum of 1.8e11 for an input maximum of
    5.2e4 (rel L2 1.5e7 against the oracle), numit=6 rel L2 1.06."""
    rng = np.random.default_rng(0)
    base = gen.beads(16, 40, 48, seed=4).astype(np.float32)
    vol = (base - np.median(base) + rng.normal(0, 2, base.shape)).astype(np.float32)
    assert (vol < 0).mean() > 0.4
    names = write_stack(scopefs.raw / 'neg', vol)
    m = scopefs.mount(opts=dict(OPTICS, dtype='float32', deconv_block='128',
                                numit=str(numit)))
    got = read_stack(m.path('deconvolved', 'neg'), names)
    want = whole_volume_oracle(vol, psf, numit=numit)
    err = rel_l2(got, want)
    print('\nnegative float32 input, numit=%d: max %.4g (oracle %.4g), min %.3g, rel L2 %.2e'
          % (numit, got.max(), want.max(), got.min(), err))
    assert got.min() >= 0
    assert err < 1e-4


def lsdeconv_dark(strength, sigma=SIGMA, size=SIZE):
    """LsDeconv's dark() (LsDeconv.m): a zero volume of the filter's size
    with `strength` at its centre, filtered by the normalised pre-filter
    Gaussian; its maximum."""
    a = np.zeros(size[::-1])  # z y x
    a[tuple(n // 2 for n in a.shape)] = strength
    for axis, s, n in zip((2, 1, 0), sigma, size):
        r = (n - 1) // 2
        k = np.exp(-np.arange(-r, r + 1) ** 2 / (2.0 * s * s))
        a = ndimage.correlate1d(a, k / k.sum(), axis=axis, mode='wrap')
    return float(a.max())


def test_lsdeconv_switches(scopefs, psf):
    """decwrap.py's denoise_strength, flip and convert_to_8bit: the first
    against the numpy oracle with LsDeconv's dark() recomputed here, flip
    against numpy's flip of the unflipped planes (blocks of 16 rows, so
    strips cross block faces), convert_to_8bit against dtype=uint8."""
    vol = gen.beads(24, 40, 48, seed=5)
    names = write_stack(scopefs.raw / 'beads', vol)
    opts = dict(OPTICS, dtype='float32', deconv_block='128')
    got = read_stack(scopefs.mount(opts=dict(opts, denoise_strength='300')).path(
        'deconvolved', 'beads'), names)
    dark = lsdeconv_dark(300)
    err = rel_l2(got, whole_volume_oracle(vol, psf, dark=dark))
    print('\ndenoise_strength=300: dark %.4f, vs oracle rel L2 %.2e' % (dark, err))
    assert dark > 25 and err < 1e-4

    small = dict(OPTICS, deconv_block='16')
    plain = read_stack(scopefs.mount(opts=small).path('deconvolved', 'beads'), names)
    flipped = read_stack(scopefs.mount(opts=dict(small, flip='1')).path(
        'deconvolved', 'beads'), names)
    assert plain.dtype == np.uint16 and np.array_equal(flipped, plain[:, ::-1, :])

    u8 = read_stack(scopefs.mount(opts=dict(small, dtype='uint8')).path(
        'deconvolved', 'beads'), names)
    c8 = read_stack(scopefs.mount(opts=dict(small, convert_to_8bit='1')).path(
        'deconvolved', 'beads'), names)
    assert c8.dtype == np.uint8 and np.array_equal(c8, u8)


def psnr(a, ref):
    return 10 * np.log10(ref.max() ** 2 / np.mean((a - ref) ** 2))


def test_ground_truth_psnr(scopefs, psf):
    """Beads blurred by the PSF plus background 10 and Poisson noise, as
    uint16 planes; deconvolved in 32^3 blocks (float32 out) must be closer
    to the truth."""
    rng = np.random.default_rng(4)
    shape = (48, 64, 64)
    truth = np.zeros(shape)
    pts = rng.integers([8, 4, 4], [40, 60, 60], size=(40, 3))
    truth[tuple(pts.T)] = rng.uniform(2500, 7500, size=40)
    truth = ndimage.gaussian_filter(truth, 1.0)
    background = 10.0
    blurred = signal.fftconvolve(truth, psf.astype(np.float64), mode='same')
    observed = rng.poisson(np.maximum(blurred, 0) + background).astype(np.uint16)
    names = write_stack(scopefs.raw / 'beads', observed)
    m = scopefs.mount(opts=dict(OPTICS, dtype='float32', deconv_block='32', numit='20',
                                regularize_interval='0', gaussian_sigma='0.5',
                                gaussian_filter_size='3', dark='10'))
    got = read_stack(m.path('deconvolved', 'beads'), names).astype(np.float64)
    before = psnr(observed - background, truth)
    after = psnr(got, truth)
    print('\nground truth: PSNR %.2f -> %.2f dB (+%.2f)' % (before, after, after - before))
    assert after > before + 2.5


def block_percentiles(vol, core, clip):
    """LsDeconv's per-block [100 - clip, clip] percentiles (MATLAB prctile =
    numpy 'hazen') over the cores of the grid."""
    lows, highs = [], []
    nz, ny, nx = vol.shape
    for z in range(0, nz, core):
        for y in range(0, ny, core):
            for x in range(0, nx, core):
                b = vol[z:z + core, y:y + core, x:x + core].ravel()
                lo, hi = np.percentile(b, [100 - clip, clip], method='hazen')
                lows.append(lo)
                highs.append(hi)
    return np.array(lows), np.array(highs)


def scale_record(cache):
    files = list(cache.glob('deconv-scale-*.txt'))
    assert len(files) == 1, files
    first = files[0].read_text().split('\n')[0].split()
    assert first[0] == 'dmin' and first[2] == 'dmax'
    return float.fromhex(first[1]), float.fromhex(first[3])


def test_auto_scale_formula_and_sample(scopefs):
    """uint16 output = LsDeconv's v' = (v - dmin) 65535 amp / (dmax - dmin) - amp
    with (dmin, dmax) from 16 sampled blocks of 60 (default), and from all 60
    (scale_sample=all: LsDeconv's own numbers)."""
    vol = gen.beads(40, 64, 80, seed=5)
    names = write_stack(scopefs.raw / 'beads', vol)
    opts = dict(OPTICS, deconv_block='16', threads='2')
    raw = scopefs.mount(opts=dict(opts, dtype='float32'))
    f = read_stack(raw.path('deconvolved', 'beads'), names).astype(np.float64)
    lows, highs = block_percentiles(f, 16, 99.99)
    assert len(lows) == 60
    found = {}
    for sample_opt in ('16', 'all'):
        m = scopefs.mount(opts=dict(opts, scale_sample=sample_opt))
        u = read_stack(m.path('deconvolved', 'beads'), names)
        assert u.dtype == np.uint16
        dmin, dmax = found[sample_opt] = scale_record(m.cache)
        want = np.clip(np.round((f - dmin) * 65535.0 / (dmax - dmin) - 1), 0, 65535)
        mismatch = np.abs(u.astype(np.float64) - want)
        assert mismatch.max() <= 1 and (mismatch > 0).mean() < 1e-3
    # the default sample: blocks floor((2i + 1) 60 / 32), i < 16
    sample = [(2 * i + 1) * 60 // 32 for i in range(16)]
    dmin, dmax = found['16']
    assert dmin == pytest.approx(lows[sample].min(), rel=1e-5)
    assert dmax == pytest.approx(highs[sample].max(), rel=1e-5)
    assert found['all'][0] == pytest.approx(lows.min(), rel=1e-5)
    assert found['all'][1] == pytest.approx(highs.max(), rel=1e-5)
    print('\nauto scale from 16 of 60 blocks: dmin %.3f dmax %.1f; all blocks: dmin %.3f '
          'dmax %.1f (sampled dmax %.1f%% low, dmin off by %.2f%% of the range)'
          % (dmin, dmax, lows.min(), highs.max(), 100 * (1 - dmax / highs.max()),
             100 * (dmin - lows.min()) / (highs.max() - lows.min())))
    assert dmax <= highs.max() and dmin >= lows.min()


def test_damaged_scale_record_not_trusted(scopefs):
    """The auto scale's record in the cache folder carries a check: a record
    whose numbers changed is sampled again (same bytes as the first mount),
    not used; an intact one is used as it is."""
    vol = gen.beads(24, 40, 52, seed=4)
    names = write_stack(scopefs.raw / 'beads', vol)
    opts = dict(OPTICS, deconv_block='16', threads='2')
    n = len(names)
    a = scopefs.mount(opts=opts)
    first = read_bytes(a.path('deconvolved', 'beads'), names, range(n))
    a.unmount()
    record = next(a.cache.glob('deconv-scale-*.txt'))
    dmin, dmax = scale_record(a.cache)
    lines = record.read_text().split('\n')
    words = lines[0].split()
    words[3] = float.hex(dmax * 2)  # same layout, same check field, other number
    for label, text, want in (('intact', record.read_text(), (dmin, dmax)),
                              ('damaged', '\n'.join([' '.join(words)] + lines[1:]),
                               (dmin, dmax))):
        cache = scopefs.tmp / ('scale-%s' % label)
        cache.mkdir()
        (cache / record.name).write_text(text)
        m = scopefs.mount(opts=opts, cache=cache)
        got = read_bytes(m.path('deconvolved', 'beads'), names, range(n))
        m.unmount()
        assert got == first, label
        assert scale_record(cache) == want, label


def test_same_bytes_any_order_threads_cache(scopefs):
    vol = gen.beads(24, 40, 52, seed=9)
    names = write_stack(scopefs.raw / 'beads', vol)
    opts = dict(OPTICS, deconv_block='16')
    n = len(names)
    a = scopefs.mount(opts=dict(opts, threads='2'))
    first = read_bytes(a.path('deconvolved', 'beads'), names, reversed(range(n)))
    cache_a = a.cache
    a.unmount()
    b = scopefs.mount(opts=dict(opts, threads='1'))
    second = read_bytes(b.path('deconvolved', 'beads'), names,
                        [n // 2] + list(range(n)))
    b.unmount()
    warm = scopefs.mount(opts=dict(opts, threads='2'), cache=cache_a)
    third = read_bytes(warm.path('deconvolved', 'beads'), names, range(n))
    st = warm.status()
    assert first == second
    assert first == third
    assert st['tiles_computed'] == 0 and st['disk_hits'] > 0  # all from the disk cache
    # the bytes are a deconvolution, not the raw planes
    assert tifffile.imread(warm.path('deconvolved', 'beads', names[3])).tolist() != \
        vol[3].tolist()


def test_missing_optics_and_bad_stack_settings(scopefs):
    write_stack(scopefs.raw / 'plain', gen.beads(4, 20, 24, seed=1))
    write_stack(scopefs.raw / 'conf_ok', gen.beads(4, 20, 24, seed=2))
    (scopefs.raw / 'conf_ok' / 'scopefs.conf').write_text(
        '# per-stack optics\ndxy=0.4\ndz=1.2\nlambda_ex=488\nlambda_em=525\n')
    write_stack(scopefs.raw / 'conf_bad', gen.beads(4, 20, 24, seed=3))
    (scopefs.raw / 'conf_bad.scopefs.conf').write_text(
        'dxy=0.4\ndz=1.2\nlambda_ex=488\nlambda_em=525\nna=1.6\n')
    write_stack(scopefs.raw / 'Ex_561_Em_600', gen.beads(4, 20, 24, seed=4))
    m = scopefs.mount(opts={'dxy': '0.4', 'dz': '1.2', 'threads': '2'})
    assert sorted(os.listdir(m.path('deconvolved'))) == ['Ex_561_Em_600', 'conf_ok']
    problems = {os.path.basename(p['path']): p['reason'] for p in m.status()['problems']}
    assert 'lambda_ex and lambda_em' in problems['plain']
    assert 'na=1.6' in problems['conf_bad'] and 'conf_bad.scopefs.conf' in problems['conf_bad']
    # the served ones read
    for name in ('Ex_561_Em_600', 'conf_ok'):
        a = tifffile.imread(m.path('deconvolved', name, 'img_000002.tif'))
        assert a.shape == (20, 24) and a.dtype == np.uint16
    m.unmount()
    bare = scopefs.mount()
    assert os.listdir(bare.path('deconvolved')) == ['conf_ok']  # its own file has optics
    reasons = [p['reason'] for p in bare.status()['problems']]
    assert any('deconvolution needs dxy and dz (-o dxy=0.4,dz=1.2 or a preset)' in r
               for r in reasons)


def test_conf_edited_after_mount_is_refused(scopefs):
    """The mount deconvolves with the scopefs.conf it read.  A pipeline that
    edits a stack's conf (or adds one) and copies deconvolved/ again must get
    an error naming the file, not the old deconvolution with exit status 0;
    the stacks whose files did not change still read."""
    conf = 'dxy=0.4\ndz=1.2\nlambda_ex=488\nlambda_em=525\n'
    for i, name in enumerate(('edited', 'added', 'untouched')):
        write_stack(scopefs.raw / name, gen.beads(4, 20, 24, seed=10 + i))
    (scopefs.raw / 'edited' / 'scopefs.conf').write_text(conf)
    m = scopefs.mount(opts=dict(OPTICS, threads='2'))
    before = {name: read_all(m.path('deconvolved', name, 'img_000002.tif'))
              for name in ('edited', 'added', 'untouched')}
    (scopefs.raw / 'edited' / 'scopefs.conf').write_text(conf.replace('488', '405'))
    (scopefs.raw / 'added.scopefs.conf').write_text(conf)
    for name in ('edited', 'added'):
        with pytest.raises(OSError) as err:
            read_all(m.path('deconvolved', name, 'img_000002.tif'))
        assert err.value.errno == 5, (name, err.value)  # EIO
    recent = [r['message'] for r in m.status()['recent_errors']]
    assert any(str(scopefs.raw / 'edited' / 'scopefs.conf') +
               ' changed since the mount read it: remount' in r for r in recent), recent
    assert any(str(scopefs.raw / 'added.scopefs.conf') + ' appeared since the mount' in r
               for r in recent), recent
    assert read_all(m.path('deconvolved', 'untouched', 'img_000002.tif')) == before['untouched']
    m.unmount()
    # a remount deconvolves with the new settings: other bytes for the edited stack
    again = scopefs.mount(opts=dict(OPTICS, threads='2'))
    assert read_all(again.path('deconvolved', 'edited', 'img_000002.tif')) != before['edited']
    assert read_all(again.path('deconvolved', 'untouched', 'img_000002.tif')) == \
        before['untouched']


@pytest.mark.parametrize('opt,named', [('na=1.5', "na=1.5"), ('dz=-1', "'dz'"),
                                       ('gaussian_sigma=0.5:0.5', 'gaussian_sigma'),
                                       ('dtype=int8', 'dtype'),
                                       ('gaussian_filter_size=12:13:25',
                                        'gaussian_filter_size')])
def test_nonsense_mount_option_exits_2(scopefs, opt, named):
    write_stack(scopefs.raw / 's', gen.beads(3, 16, 16, seed=1))
    r = scopefs.run(['-o', 'dxy=0.4,dz=1.2,' + opt, str(scopefs.raw),
                     str(scopefs.tmp / 'mnt_bad')])
    assert r.returncode == 2
    assert named in r.stderr.decode(), r.stderr


def test_preset_and_imagej(scopefs, tmp_path):
    vol = gen.beads(6, 50, 60, seed=7)
    names = write_stack(scopefs.raw / 'beads', vol)
    m = scopefs.mount(opts={'preset': str(REPO / 'mountopts' / 'lightsheet-lsdeconv'),
                            'deconv_block': '32'})
    path = m.path('deconvolved', 'beads', names[2])
    want = tifffile.imread(path)
    assert want.dtype == np.uint16 and want.shape == (50, 60)
    points = [(0, 0), (59, 49), (31, 33)]
    got = imagej_read(path, points, tmp_path)
    assert got[:5] == [60, 50, 16, 1, int(want.astype(np.int64).sum())]
    assert got[5:] == [int(want[y, x]) for x, y in points]


def test_destripe_sigma_removes_z_stripes(scopefs):
    """Stripes constant along z (a few bright x columns through every plane,
    as light-sheet shadows make) over smooth beads: with destripe_sigma the
    stripes' contrast in the deconvolved float32 output drops, the beads
    stay, and the option changes the cache key (a second mount on the same
    cache with the option off gives the undestriped bytes)."""
    rng = np.random.default_rng(9)
    shape = (48, 16, 64)
    truth = np.zeros(shape)
    pts = rng.integers([8, 2, 8], [40, 14, 56], size=(12, 3))
    truth[tuple(pts.T)] = 3000.0
    vol = ndimage.gaussian_filter(truth, (2.5, 1.0, 1.0)) + 200.0
    stripes = np.zeros(shape[2])
    stripes[[10, 11, 30, 47]] = 400.0
    vol = vol + stripes[None, None, :]
    names = write_stack(scopefs.raw / 'striped', vol.astype(np.uint16))
    opts = dict(OPTICS, dtype='float32', deconv_block='64', numit='3')
    cache = scopefs.tmp / 'destripe-cache'
    on = scopefs.mount(opts=dict(opts, destripe_sigma='8'), cache=cache)
    got_on = read_stack(on.path('deconvolved', 'striped'), names).astype(np.float64)
    on.unmount()
    off = scopefs.mount(opts=opts, cache=cache)
    got_off = read_stack(off.path('deconvolved', 'striped'), names).astype(np.float64)

    def stripe_contrast(v):
        profile = np.median(v, axis=(0, 1))  # per x column, over z and y
        return np.mean(profile[[10, 11, 30, 47]]) - np.median(profile)

    c_off, c_on = stripe_contrast(got_off), stripe_contrast(got_on)
    print('\nstripe contrast %.1f -> %.1f with destripe_sigma=8' % (c_off, c_on))
    assert np.all(np.isfinite(got_on))
    assert c_on < 0.5 * c_off
    assert not np.array_equal(got_on, got_off)
    # the beads survive: their signal above background, away from the stripe
    # columns, stays within a factor of two
    beads = (ndimage.gaussian_filter(truth, (2.5, 1.0, 1.0)) > 30.0)
    beads[:, :, [9, 10, 11, 12, 29, 30, 31, 46, 47, 48]] = False
    sig_on = np.sum(got_on[beads] - np.median(got_on))
    sig_off = np.sum(got_off[beads] - np.median(got_off))
    print('bead signal %.0f -> %.0f' % (sig_off, sig_on))
    assert 0.5 * sig_off < sig_on < 2.0 * sig_off


def wait_idle(m, timeout=20):
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = m.status()
        if st['in_flight'] == 0:
            return st
        time.sleep(0.05)
    raise AssertionError('units still in flight after %d s' % timeout)


def test_next_slab_prefetched_only_for_a_z_reader(scopefs):
    """Reading one plane computes only its own slab of blocks (4 of them here);
    reading planes z - 1 then z in a slab's second half, as cp or a z scroll
    does, also starts the next slab's blocks of those rows (all 8)."""
    vol = gen.beads(32, 32, 32, seed=3)
    names = write_stack(scopefs.raw / 'beads', vol)
    m = scopefs.mount(opts=dict(OPTICS, deconv_block='16', scale='1', threads='2'))
    folder = m.path('deconvolved', 'beads')
    with tifffile.TiffFile(os.path.join(folder, names[12])) as tf:
        strips = len(tf.pages[0].dataoffsets)
    read_all(os.path.join(folder, names[12]))  # z = 12: second half of slab 0
    st = wait_idle(m)
    assert st['tiles_computed'] == 4 + strips
    read_all(os.path.join(folder, names[13]))  # 12 then 13: a z reader
    st = wait_idle(m)
    assert st['tiles_computed'] == 8 + 2 * strips


def test_sigterm_cuts_a_long_block_short(scopefs):
    """A signal to stop does not wait for a deconvolution block in progress
    (here one that needs minutes: 20000 iterations on the CPU): the daemon
    exits within seconds, and the reader gets an error, not a hang."""
    import signal
    import subprocess
    vol = gen.beads(40, 48, 48, seed=4)
    names = write_stack(scopefs.raw / 'beads', vol)
    m = scopefs.mount(opts=dict(OPTICS, numit='20000', deconv_block='64', scale='1',
                                threads='2', gpu='off'))
    reader = subprocess.Popen(['cat', m.path('deconvolved', 'beads', names[0])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)  # the block starts (and would run for minutes)
    t0 = time.time()
    m.proc.send_signal(signal.SIGTERM)
    m.proc.wait(30)
    waited = time.time() - t0
    reader.wait(30)
    assert reader.returncode != 0
    assert waited < 15, 'the daemon took %.1f s to exit' % waited
    assert 'deconv: stopped at iteration' in m.log_text()


def test_clipval_at_or_below_50_is_refused(scopefs):
    """clipval is the upper percentile kept ([100 - clipval, clipval]); at 50
    or below that range is empty and the uint16 planes came out a two-level
    mask (clipval=10: only 0 and 65535) with exit 0 and no word.  clipval=0.01
    is how Python ports write "0.01 % clipped".  -o: exit 2 naming clipval;
    a stack's own file: that stack is a problem naming the file, the rest
    mounts.  Oracle: numpy's count of distinct values in the planes."""
    write_stack(scopefs.raw / 'good', gen.beads(8, 24, 32, seed=3))
    write_stack(scopefs.raw / 'bad', gen.beads(8, 24, 32, seed=4))
    cache = str(scopefs.tmp / 'c_refused')
    optics = ','.join('%s=%s' % kv for kv in OPTICS.items())
    for cv in ('10', '0.01', '50'):
        line = assert_refused(scopefs, '%s,cache=%s,clipval=%s' % (optics, cache, cv),
                              'clipval=%s' % cv)
        assert 'above 50' in line, line
    (scopefs.raw / 'bad' / 'scopefs.conf').write_text('clipval=10\n')
    m = scopefs.mount(opts=dict(OPTICS, numit='2', clipval='99.9'))
    assert os.listdir(m.path('deconvolved')) == ['good']
    problems = {os.path.basename(p['path']): p['reason'] for p in m.status()['problems']}
    assert 'clipval=10' in problems['bad'] and 'bad/scopefs.conf' in problems['bad'], problems
    good = tifffile.imread(m.path('deconvolved', 'good', 'img_000004.tif'))
    assert len(np.unique(good)) > 100


def test_convert_switch_zero_keeps_the_input_type(scopefs, tmp_path):
    """convert_to_8bit=0 is LsDeconv's "keep the input type", and later
    sources win (docs 7.3): a stack's scopefs.conf over -o convert_to_8bit=1,
    and -o over a preset's, give the uint16 source type back (it did nothing:
    the stack stayed uint8).  Oracle: the bytes of a mount with no switch."""
    vol = gen.beads(6, 24, 32, seed=3)
    names = write_stack(scopefs.raw / 'keep', vol)
    write_stack(scopefs.raw / 'eight', vol)
    (scopefs.raw / 'keep.scopefs.conf').write_text('convert_to_8bit=0\n')
    small = dict(OPTICS, numit='1', deconv_block='16')
    plain = read_stack(scopefs.mount(opts=small).path('deconvolved', 'eight'), names)
    m = scopefs.mount(opts=dict(small, convert_to_8bit='1'))
    keep = read_stack(m.path('deconvolved', 'keep'), names)
    assert read_stack(m.path('deconvolved', 'eight'), names).dtype == np.uint8
    assert keep.dtype == np.uint16 and np.array_equal(keep, plain)
    preset = tmp_path / 'preset8'
    preset.write_text('convert_to_8bit=1\n')
    over = scopefs.mount(opts=dict(small, preset=str(preset), convert_to_8bit='0'))
    got = read_stack(over.path('deconvolved', 'eight'), names)
    assert got.dtype == np.uint16 and np.array_equal(got, plain)


def test_spacing_typed_in_nm_is_a_problem(scopefs):
    """LsDeconv.m takes dxy and dz in nm, scopefs in um: -o dxy=400,dz=1200
    typed for it is 400 um and 1.2 mm, which gave a 9 x 9 x 1 PSF (no axial
    deconvolution) and only an info line.  A spacing over 20 FWHMs of its
    axis leaves the stack out as a problem naming the spacing in um (as one
    far below does); a stack whose own file gives um still mounts.
    Oracle: the reference axial FWHM 10.5 um (test_deconv_oracle)."""
    write_stack(scopefs.raw / 'nm', gen.beads(8, 24, 24, seed=9))
    write_stack(scopefs.raw / 'um', gen.beads(8, 24, 24, seed=8))
    (scopefs.raw / 'um' / 'scopefs.conf').write_text('dxy=0.4\ndz=1.2\n')
    m = scopefs.mount(opts=dict(OPTICS, dxy='400', dz='1200', numit='1'))
    assert os.listdir(m.path('deconvolved')) == ['um']
    problems = {os.path.basename(p['path']): p['reason'] for p in m.status()['problems']}
    want = 'dz=1200 um is far above the resolution (FWHM 10.'
    assert want in problems['nm'] and 'LsDeconv.m takes nm' in problems['nm'], problems
    assert want in m.log_text()
    assert tifffile.imread(m.path('deconvolved', 'um', 'img_000003.tif')).shape == (24, 24)

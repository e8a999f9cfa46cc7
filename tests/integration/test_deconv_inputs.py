"""deconvolved/: inputs and settings that used to give a silently wrong image
or a misleading message (docs/deconvolution.md 7.3, 7.4).

Oracles: numpy (the non-finite voxel's position and value are chosen here;
the denoise dark value is the documented formula computed with numpy);
messages are checked for the values the user typed.
"""
import errno
import os
import re

import numpy as np
import pytest
import tifffile

import gen

OPTICS = {'dxy': '0.4', 'dz': '1.2', 'lambda_ex': '561', 'lambda_em': '600'}


def write_stack(folder, vol):
    os.makedirs(folder, exist_ok=True)
    for z in range(vol.shape[0]):
        tifffile.imwrite(os.path.join(folder, 'img_%06d.tif' % (z + 1)), vol[z], metadata=None)
    return ['img_%06d.tif' % (z + 1) for z in range(vol.shape[0])]


def read_planes(folder, names):
    """{name: array} for the planes that read, and the errnos of those that fail."""
    got, failed = {}, {}
    for n in names:
        try:
            got[n] = tifffile.imread(os.path.join(folder, n))
        except OSError as e:
            failed[n] = e.errno
    return got, failed


# ------------------------------------------------------- non-finite float input

@pytest.mark.parametrize('value,word,dtype', [(np.nan, 'NaN', 'float32'),
                                              (np.inf, 'inf', 'uint16'),
                                              (-np.inf, '-inf', 'float32'),
                                              # finite, but a block's float32 sums overflow
                                              (3e38, '3e+38', 'float32'),
                                              (-2e30, '-2e+30', 'float32')])
def test_non_finite_float_voxel_is_an_error(scopefs, value, word, dtype):
    """One NaN/inf voxel in a float32 plane used to turn every block whose
    window holds it into NaN (float32 output) or 0 (uint16), silently.  Now
    the reads that need such a block fail with EIO, and recent_errors names
    the plane file, the pixel and the value; no plane that reads holds a
    non-finite value."""
    v = gen.beads(16, 32, 32, np.float32, seed=3)
    z, y, x = 3, 2, 5
    v[z, y, x] = value
    names = write_stack(scopefs.raw / 's', v)
    m = scopefs.mount(opts=dict(OPTICS, numit='1', threads='1', deconv_block='16', dtype=dtype))
    got, failed = read_planes(m.path('deconvolved', 's'), names)
    assert failed, 'a %s input voxel was deconvolved into an image without an error' % word
    assert set(failed.values()) == {errno.EIO}, failed
    for n, a in got.items():
        assert np.isfinite(a).all(), n
    msgs = [r['message'] if isinstance(r, dict) else str(r) for r in m.status()['recent_errors']]
    want = re.compile(r'img_%06d\.tif: pixel \(x %d, y %d\) is %s\b' % (z + 1, x, y,
                                                                       re.escape(word)))
    assert any(want.search(s) for s in msgs), msgs
    assert want.search(m.log_text())


def test_large_finite_values_below_the_bound_deconvolve(scopefs):
    """Values up to the bound (here 1e28 at most) are no error, and
    Richardson-Lucy is scale-equivariant (x0 = y, the ratio y / Hx does not
    change with the scale): the output is the unscaled stack's times 1e25."""
    v = gen.beads(16, 32, 32, np.float32, seed=3) + 1
    write_stack(scopefs.raw / 'a', v)
    write_stack(scopefs.raw / 'b', v * np.float32(1e25))
    m = scopefs.mount(opts=dict(OPTICS, numit='2', threads='1', deconv_block='16',
                                dtype='float32'))
    names = sorted(os.listdir(m.path('deconvolved', 'a')))
    for n in names:
        small = tifffile.imread(m.path('deconvolved', 'a', n)).astype(np.float64)
        big = tifffile.imread(m.path('deconvolved', 'b', n)).astype(np.float64)
        assert np.isfinite(big).all(), n
        assert np.abs(big / 1e25 - small).max() <= 1e-4 * np.abs(small).max(), n


def test_non_finite_voxel_in_a_multipage_file_names_the_page(scopefs):
    """The same for a multi-page stack file: the file and its page (1-based)
    are named."""
    v = gen.beads(8, 16, 16, np.float32, seed=6)
    v[4, 9, 3] = np.nan
    tifffile.imwrite(scopefs.raw / 'm.tif', v)
    m = scopefs.mount(opts=dict(OPTICS, numit='1', threads='1', dtype='float32'))
    names = sorted(os.listdir(m.path('deconvolved', 'm')))
    assert len(names) == 8
    got, failed = read_planes(m.path('deconvolved', 'm'), names)
    assert failed and set(failed.values()) == {errno.EIO}, failed
    msgs = [r['message'] for r in m.status()['recent_errors']]
    assert any(re.search(r'm\.tif: page 5, pixel \(x 3, y 9\) is NaN\b', s) for s in msgs), msgs


def test_finite_float_stack_still_reads(scopefs):
    """The check costs nothing visible on a clean float32 stack: every plane
    reads, all finite (a subnormal and a negative value are finite, not
    refused)."""
    v = gen.beads(8, 16, 16, np.float32, seed=4)
    v[2, 3, 4] = 1e-40
    v[5, 6, 7] = -3.0
    names = write_stack(scopefs.raw / 's', v)
    m = scopefs.mount(opts=dict(OPTICS, numit='1', threads='1', dtype='float32'))
    got, failed = read_planes(m.path('deconvolved', 's'), names)
    assert not failed and len(got) == len(names)
    assert all(np.isfinite(a).all() for a in got.values())
    assert m.status()['recent_errors'] == []


# ------------------------------------------------------------ denoise_strength

def test_denoise_with_prefilter_on_some_axes(scopefs):
    """gaussian_sigma=0.5:0.5:0 filters x and y only; denoise_strength=N must
    act as dark = N x the product of the x and y centre taps (7.3), not as
    dark 0 (it used to stop at the first sigma 0)."""
    v = gen.beads(8, 16, 16, seed=5)
    names = write_stack(scopefs.raw / 's', v)
    k = np.arange(-6, 7)  # 13 taps, the default size
    centre = 1 / np.exp(-k.astype(np.float64) ** 2 / (2 * 0.5 ** 2)).sum()
    dark = 3000 * centre ** 2  # numpy oracle: 1856.08
    o = dict(OPTICS, numit='1', threads='1', dtype='float32', gaussian_sigma='0.5:0.5:0')

    def read(extra):
        m = scopefs.mount(opts=dict(o, **extra))
        got, failed = read_planes(m.path('deconvolved', 's'), names)
        assert not failed
        m.unmount()
        return np.stack([got[n] for n in names])

    got = read({'denoise_strength': '3000'})
    assert np.array_equal(got, read({'dark': repr(dark)}))
    assert not np.array_equal(got, read({'dark': '0'}))


# ------------------------------------------------------------- option parsing

@pytest.mark.parametrize('opt', ['gaussian_sigma=:2.5', 'gaussian_sigma=0.5:0.5:2.5:',
                                 'gaussian_sigma=:0.5:0.5:2.5', 'gaussian_sigma=0.5::2.5',
                                 'gaussian_sigma=0.5:0.5:2.5:1',
                                 'gaussian_filter_size=13:13:25:::',
                                 'gaussian_filter_size=:13'])
def test_malformed_triple_exits_2(scopefs, opt):
    r = scopefs.run(['-o', 'cache=%s,%s,%s' % (scopefs.tmp / 'c',
                                               ','.join('%s=%s' % kv for kv in OPTICS.items()),
                                               opt),
                     str(scopefs.raw), str(scopefs.tmp / 'mnt')])
    assert r.returncode == 2, r
    assert ("'%s'" % opt.split('=')[0]).encode() in r.stderr, r.stderr


def test_single_value_triple_still_valid(scopefs):
    write_stack(scopefs.raw / 's', np.full((4, 16, 16), 100, np.uint16))
    m = scopefs.mount(opts=dict(OPTICS, gaussian_sigma='1.5', gaussian_filter_size='9'))
    assert [s['name'] for s in m.status()['stacks']] == ['s']


# --------------------------------------------------------- PSF size and units

@pytest.mark.parametrize('opt,shown', [('dxy=0.0004', 'dxy=0.0004 um'),
                                       ('dz=0.001', 'dz=0.001 um'),
                                       ('dxy=1e-300', 'dxy=1e-300 um')])
def test_psf_too_fine_named_in_micrometres(scopefs, opt, shown):
    """A spacing far below the resolution leaves the stack out with the value
    as typed (um), not in nm under the um option's name; dxy=1e-300 used to
    mount with a 1x1x19 PSF (an overflowing double -> size_t cast)."""
    write_stack(scopefs.raw / 's', np.full((4, 16, 16), 100, np.uint16))
    key, val = opt.split('=')
    m = scopefs.mount(opts=dict(OPTICS, **{key: val}))
    st = m.status()
    assert not m.path('deconvolved', 's').exists()
    reasons = [p['reason'] for p in st['problems']]
    assert any(shown in r and 'far below the resolution' in r for r in reasons), reasons


# ------------------------------------------------------------------ mem advice

def test_no_mem_advice_for_a_one_block_stack(scopefs):
    """A stack that is one block already cannot gain from a larger mem: no
    advice (it used to suggest mem=8G even with mem=8G)."""
    write_stack(scopefs.raw / 's', np.full((32, 64, 64), 100, np.uint16))
    m = scopefs.mount(opts=dict(OPTICS, mem='8G'))
    log = m.log_text()
    assert 'blocks 1x1x1' in log
    assert 'a larger mem' not in log and 'mem=' not in log.split('blocks 1x1x1')[1]


def test_mem_advice_when_it_helps(scopefs):
    """With a small mem the cores are small; the advice names a mem above the
    one given, and fewer window voxels."""
    write_stack(scopefs.raw / 's', np.full((32, 96, 96), 100, np.uint16))
    m = scopefs.mount(opts=dict(OPTICS, mem='64M'))
    log = m.log_text()
    grid = re.search(r'blocks (\d+)x(\d+)x(\d+) \(x y z\) of core (\d+)x(\d+)x(\d+)', log)
    assert grid and int(grid[1]) * int(grid[2]) * int(grid[3]) > 1, log
    adv = re.search(r'mem=(\d+)([MG]) \(cores (\d+)x(\d+)x(\d+), [\d.]+x\) or deconv_block=N '
                    r'computes ([\d.]+)x fewer voxels', log)
    assert adv, log
    mib = int(adv[1]) * (1024 if adv[2] == 'G' else 1)
    assert mib > 64 and float(adv[6]) > 1.0


# ------------------------------------------------- scaling options on float32

@pytest.mark.parametrize('opts,src,named', [
    ({'dtype': 'float32', 'scale': '2'}, np.uint16, ['scale=2']),
    ({'signal_amp': '3'}, np.float32, ['signal_amp=3']),  # dtype=same on float32 planes
    ({'dtype': 'float32', 'scale': '0.5', 'signal_amp': '2'}, np.uint16,
     ['scale=0.5', 'signal_amp=2']),
    ({'dtype': 'float32', 'scale': 'auto', 'signal_amp': '1'}, np.uint16, []),  # the defaults
    ({'scale': '2'}, np.uint16, []),  # uint16 output: the gain applies
])
def test_scaling_options_on_float32_output_are_reported(scopefs, opts, src, named):
    """float32 output holds the deconvolved values unscaled (section 7.4), so
    scale=GAIN and signal_amp have no effect there; they used to be dropped
    without a word.  Now one warning per stack names what was ignored, and
    only when it was given other than its default."""
    write_stack(scopefs.raw / 's', gen.beads(8, 24, 24, seed=1).astype(src))
    write_stack(scopefs.raw / 't', gen.beads(8, 24, 24, seed=2).astype(src))
    m = scopefs.mount(opts=dict(OPTICS, numit='1', **opts))
    lines = [ln for ln in m.log_text().splitlines() if 'ignored: float32 output' in ln]
    if not named:
        assert lines == [], lines
        return
    assert len(lines) == 2, lines  # one per stack
    for ln in lines:
        assert 'warn' in ln and all(n in ln for n in named), ln

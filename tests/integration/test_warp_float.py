"""registered/ of a float32 slide with extreme finite values, NaN and +-inf.

docs/transforms.md, "NaN and infinity": float32 samples are blended in double
(finite samples never overflow) and taps of weight exactly 0 are left out
(a NaN or infinite sample reaches only the outputs it weighs in).

One reference (uint16) and two float32 moving slides holding the same pixels:
tissue values with -3e38 next to +3e38, a patch of FLT_MAX, one NaN, one +inf
and one -inf:

  fid  identity JSON transform: level 0 must be the source itself, bit for
       bit (NaN only where the source is NaN), bilinear and bicubic
  fsh  JSON shift by (+0.5, +0.25): every output pixel weighs all 4 of its
       bilinear taps, so scipy.ndimage.map_coordinates(order=1,
       mode='grid-constant'), computed in double, is the oracle: NaN and
       +-inf exactly where scipy has them, finite values within float32
       rounding elsewhere.

The float blend a + t (b - a) gave NaN at -3e38 / +3e38 under the identity
(b - a overflows, 0 * inf), inf for the shift, and NaN in the finite
neighbours of the NaN and inf pixels.
"""


import numpy as np
import pytest
import scipy.ndimage as ndi
import tifffile

import gen
from test_mount_registered import write_json

HW = (300, 400)
FMAX = np.finfo(np.float32).max


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('warpfloat')
    raw, tfd = root / 'raw', root / 'transforms'
    raw.mkdir()
    tfd.mkdir()
    gen.write_ome(raw / 'ref.ome.tif', [gen.norm(gen.tissue(*HW, 1, seed=31))], ['R'], 0.5)
    f = gen.tissue(*HW, 1, dtype=np.float32, seed=33)[0]
    f[200, 300] = -3e38
    f[200, 301] = 3e38
    f[60:70, 100:130] = FMAX
    f[100, 200] = np.nan
    f[150, 50] = np.inf
    f[20, 30] = -np.inf
    for name in ('fid', 'fsh'):
        gen.write_ome(raw / ('%s.ome.tif' % name), [gen.norm(f)], ['F'], 0.5)
    write_json(tfd / 'fid.json', np.eye(3))
    write_json(tfd / 'fsh.json', np.array([[1, 0, 0.5], [0, 1, 0.25], [0, 0, 1]]))
    return {'raw': raw, 'tfd': tfd, 'f': f}


def level0(m, name):
    with tifffile.TiffFile(m.path('registered', '%s.ome.tif' % name)) as tf:
        a = tf.series[0].levels[0].asarray()
    assert a.dtype == np.float32 and a.shape == HW, (a.dtype, a.shape)
    return a


@pytest.mark.parametrize('interp', ['bilinear', 'bicubic'])
def test_identity_is_the_source(scopefs, data, interp):
    m = scopefs.mount(raw=data['raw'], opts={'reference': 'ref', 'transforms': str(data['tfd']),
                                             'reg': 'off', 'interp': interp})
    g, f = level0(m, 'fid'), data['f']
    # the same values (bits, NaN for NaN): no NaN or inf reaches a neighbour
    assert np.array_equal(np.isnan(g), np.isnan(f)), np.argwhere(np.isnan(g) != np.isnan(f))[:8]
    fin = ~np.isnan(f)
    bad = np.argwhere(fin & (g.view(np.uint32) != f.view(np.uint32)))
    assert len(bad) == 0, [(tuple(b), float(g[tuple(b)]), float(f[tuple(b)])) for b in bad[:8]]
    assert g[200, 300] == np.float32(-3e38) and g[200, 301] == np.float32(3e38)


def test_fractional_shift_matches_scipy(scopefs, data):
    m = scopefs.mount(raw=data['raw'], opts={'reference': 'ref', 'transforms': str(data['tfd']),
                                             'reg': 'off', 'interp': 'bilinear'})
    g, f = level0(m, 'fsh'), data['f']
    y, x = np.mgrid[0:HW[0], 0:HW[1]].astype(float)
    want = ndi.map_coordinates(f.astype(np.float64), [y + 0.25, x + 0.5], order=1,
                               mode='grid-constant', cval=0.0)
    # every output weighs all 4 taps: NaN exactly around the NaN pixel,
    # +-inf exactly around the inf ones, as scipy
    assert np.isnan(want).sum() == 4 and np.isinf(want).sum() == 8
    assert np.array_equal(np.isnan(g), np.isnan(want)), np.argwhere(np.isnan(g) != np.isnan(want))
    assert np.array_equal(np.isposinf(g), np.isposinf(want))
    assert np.array_equal(np.isneginf(g), np.isneginf(want))
    fin = np.isfinite(want)
    # -3e38 / 3e38 blend to finite values (float's b - a overflowed)
    assert np.isfinite(g[199:201, 299:302]).all(), g[199:201, 299:302]
    # the FLT_MAX patch stays FLT_MAX inside
    assert (g[61:69, 101:129] == FMAX).all()
    # by hand where -3e38 and 3e38 cancel: (0.5, 0.25) weighs rows y, y + 1
    # by 0.75, 0.25 and columns x, x + 1 by 0.5, 0.5; the pair's row blends
    # to 0 exactly
    f64 = f.astype(np.float64)
    assert abs(g[199, 300] - 0.75 * (f64[199, 300] + f64[199, 301]) / 2) < 1e-6
    assert abs(g[200, 300] - 0.25 * (f64[201, 300] + f64[201, 301]) / 2) < 1e-6
    # elsewhere scipy within float32 rounding of the largest tap (scipy sums
    # the 4 products in another order: where taps cancel, its rounding is
    # that of the taps, not of the result)
    a = np.pad(np.nan_to_num(np.abs(f64), nan=0.0, posinf=0.0, neginf=0.0), ((0, 1), (0, 1)))
    big = np.maximum(np.maximum(a[:-1, :-1], a[:-1, 1:]), np.maximum(a[1:, :-1], a[1:, 1:]))
    d = np.abs(g[fin].astype(np.float64) - want[fin])
    tol = 1e-6 * big[fin] + 1e-6
    assert (d <= tol).all(), (d.max(), np.argwhere(fin)[np.argmax(d - tol)])

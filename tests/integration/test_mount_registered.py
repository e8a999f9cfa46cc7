"""registered/ on real mounts: moving slides warped on read, against oracles.

One dataset (made once per module with tifffile): a uint16 4-channel OME
reference with SubIFD levels, and moving slides, each with its transform
file in transforms=DIR:

  aff    JSON affine (30 degrees, scale 1.05, shift)
  flip   JSON near 90 degrees with a mirror; the slide has ONE level, fewer
         than the reference, so reduced levels are box-prefiltered
  fld    JSON matrix + smooth displacement field TIFF (scale 64, offset)
  ex     elastix AffineTransform file, physical units, moving pixel 0.4 um
  itk    ITK .tfm AffineTransform_double_2_2 with a centre
  ws     wsireg's <project>-ws_to_ref_transformations.json (initial + edge)
  he     uint8 RGB (interleaved) slide, JSON affine
  bad    a malformed JSON transform (error on line 3)
  orphan no transform file at all

Oracles, all computed here from the transforms' definitions
(docs/transforms.md), never from scopefs output:
- level 0: scipy.ndimage.map_coordinates(mode='grid-constant') on the moving
  slide's level 0 -- bilinear within 1 grey level, nearest identical (with
  background= as cval);
- levels 1, 2: the same on the moving level the documented rule picks (box
  prefiltered where the slide lacks levels) through the pixel-centre level
  map S(fs)^-1 T S(fo), within 1 grey level, each level's downsample by the
  one rule (gen.level_downsample: exactly r for a floor/ceil r-fold level);
- an odd-sized reference and moving slide (ceil-halved pyramids) with an
  even-shift transform: every level of registered/<moving> equals the
  reference's, shifted;
- `vips affine` for the plain affine (integer pixel centres, the default
  offsets);
- transformix on the same elastix maps written as a chain of text files,
  for the wsireg reader (order of edges and maps, B-spline, physical units).
Plus: the malformed transform leaves only its slide out with FILE:LINE in
.scopefs/status, no transforms= leaves every moving slide out with a reason,
and a remount on the same cache serves the warped tiles with 0 computed.
"""

import json
import os
import shutil
import subprocess
import textwrap

import numpy as np
import pytest
import scipy.ndimage as ndi
import tifffile

import gen
from conftest import read_all

NAMES4 = ['DAPI', 'CD3', 'CD8', 'PanCK']
REF_HW = (1100, 1300)
MOV_HW = (1000, 1200)
REF_PX = 0.5
EX_PX = 0.4  # the elastix slide's pixel size: physical units matter


def rot(theta_deg, scale=1.0, flip=False):
    t = np.deg2rad(theta_deg)
    a = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    if flip:
        a = a @ np.diag([-1.0, 1.0])
    return a


def about(a, centre_from, centre_to):
    """3x3 homogeneous: x -> a (x - centre_from) + centre_to."""
    m = np.eye(3)
    m[:2, :2] = a
    m[:2, 2] = np.asarray(centre_to, float) - a @ np.asarray(centre_from, float)
    return m


def apply(m, x, y):
    return m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]


def write_json(path, matrix, field=None):
    doc = {'scopefs_transform': 1, 'matrix': [list(map(float, r)) for r in matrix[:2]]}
    if field is not None:
        doc['field'] = field
    with open(path, 'w') as f:
        json.dump(doc, f, indent=1)


REF_C = ((REF_HW[1] - 1) / 2, (REF_HW[0] - 1) / 2)
MOV_C = ((MOV_HW[1] - 1) / 2, (MOV_HW[0] - 1) / 2)


class Slide:
    """A moving slide: its levels (C, H, W, S), and its map T (reference
    level-0 px -> moving level-0 px) with the linear part of the transform's
    final matrix (what sf_transform_scale reads)."""

    def __init__(self, name, levels, T, lin):
        self.name, self.levels, self.T, self.lin = name, levels, T, lin


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('registered')
    raw, tfd = root / 'raw', root / 'transforms'
    raw.mkdir()
    tfd.mkdir()
    ref = gen.pyramid(gen.norm(gen.tissue(*REF_HW, 4, seed=41)), 3)
    gen.write_ome(raw / 'ref.ome.tif', ref, NAMES4, REF_PX)
    base = gen.norm(gen.tissue(*MOV_HW, 4, seed=42))
    slides = {}

    def add(name, levels, T, lin, px=REF_PX, rgb=False):
        gen.write_ome(raw / ('%s.ome.tif' % name), levels, None if rgb else NAMES4, px,
                      compression='zlib' if rgb else None)
        slides[name] = Slide(name, levels, T, lin)

    # aff: JSON affine
    m = about(rot(30.0, 1.05), REF_C, (MOV_C[0] + 7.3, MOV_C[1] - 4.1))
    write_json(tfd / 'aff.json', m)
    add('aff', gen.pyramid(base, 3), lambda x, y, m=m: apply(m, x, y), m[:2, :2])

    # flip: near 90 degrees with a mirror, on a one-level (transposed) slide
    flipped = np.ascontiguousarray(base.transpose(0, 2, 1, 3))
    fc = ((MOV_HW[0] - 1) / 2, (MOV_HW[1] - 1) / 2)
    m = about(rot(89.6, 0.97, flip=True), REF_C, (fc[0] + 3.0, fc[1] + 2.2))
    write_json(tfd / 'flip.json', m)
    add('flip', [flipped], lambda x, y, m=m: apply(m, x, y), m[:2, :2])

    # fld: matrix + displacement field (units "field": values times scale)
    rng = np.random.default_rng(43)
    s, off = 64.0, (-20.0, -12.0)
    gw, gh = int(np.ceil((REF_HW[1] - off[0]) / s)) + 2, int(np.ceil((REF_HW[0] - off[1]) / s)) + 2
    fgrid = np.stack([ndi.gaussian_filter(rng.standard_normal((gh, gw)), 2.5) for _ in range(2)],
                     -1)
    fgrid = (fgrid / np.abs(fgrid).max() * 0.2).astype(np.float32)
    tifffile.imwrite(tfd / 'fld.field.tif', fgrid, photometric='minisblack',
                     planarconfig='contig')
    m = about(rot(4.0, 1.0), REF_C, (MOV_C[0] - 5.0, MOV_C[1] + 6.0))
    write_json(tfd / 'fld.json', m, {'file': 'fld.field.tif', 'scale': s, 'offset': list(off)})

    def fld_map(x, y, m=m):
        u, v = (x - off[0]) / s, (y - off[1]) / s
        dx = ndi.map_coordinates(fgrid[..., 0].astype(float), [v, u], order=1, mode='nearest')
        dy = ndi.map_coordinates(fgrid[..., 1].astype(float), [v, u], order=1, mode='nearest')
        return apply(m, x + s * dx, y + s * dy)

    add('fld', gen.pyramid(base, 3), fld_map, m[:2, :2])

    # ex: elastix affine in um; reference 0.5 um/px, moving 0.4 um/px
    a = rot(-20.0, 0.9) + np.array([[0.0, 0.03], [0.0, 0.0]])
    c = np.array(REF_C) * REF_PX
    t = np.array(MOV_C) * EX_PX - c + np.array([1.7, -2.3])
    (tfd / 'ex.txt').write_text(textwrap.dedent('''\
        // elastix TransformParameters, written by the test
        (Transform "AffineTransform")
        (NumberOfParameters 6)
        (TransformParameters %r %r %r %r %r %r)
        (InitialTransformParametersFileName "NoInitialTransform")
        (HowToCombineTransforms "Compose")
        (FixedImageDimension 2)
        (MovingImageDimension 2)
        (Size %d %d)
        (Index 0 0)
        (Spacing %r %r)
        (Origin 0 0)
        (Direction 1 0 0 1)
        (CenterOfRotationPoint %r %r)
        ''' % (a[0, 0], a[0, 1], a[1, 0], a[1, 1], t[0], t[1], REF_HW[1], REF_HW[0], REF_PX,
               REF_PX, c[0], c[1])))

    def ex_map(x, y, a=a, c=c, t=t):
        px, py = x * REF_PX - c[0], y * REF_PX - c[1]
        return ((a[0, 0] * px + a[0, 1] * py + c[0] + t[0]) / EX_PX,
                (a[1, 0] * px + a[1, 1] * py + c[1] + t[1]) / EX_PX)

    add('ex', gen.pyramid(base, 2), ex_map, a * REF_PX / EX_PX, px=EX_PX)

    # itk: AffineTransform with a centre, physical units (0.5 um both)
    a = rot(15.0, 1.02)
    c = np.array(REF_C) * REF_PX
    t = np.array(MOV_C) * REF_PX - c + np.array([-3.1, 4.4])
    (tfd / 'itk.tfm').write_text(
        '#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_2_2\n'
        'Parameters: %r %r %r %r %r %r\nFixedParameters: %r %r\n'
        % (a[0, 0], a[0, 1], a[1, 0], a[1, 1], t[0], t[1], c[0], c[1]))

    def itk_map(x, y, a=a, c=c, t=t):
        px, py = x * REF_PX - c[0], y * REF_PX - c[1]
        return ((a[0, 0] * px + a[0, 1] * py + c[0] + t[0]) / REF_PX,
                (a[1, 0] * px + a[1, 1] * py + c[1] + t[1]) / REF_PX)

    add('itk', gen.pyramid(base, 3), itk_map, a)

    # ws: wsireg transformations: an initial transform of the moving image
    # (applied last) and one edge of an Euler then an Affine map
    mc = np.array(MOV_C) * REF_PX
    rc = np.array(REF_C) * REF_PX
    e_th, e_t = 0.15, mc - rc + np.array([2.0, -1.0])
    af = np.array([[1.03, 0.02], [-0.01, 0.98]])
    af_t = np.array([0.5, -0.75])
    i_th, i_t = -0.05, np.array([1.25, 0.5])

    def emap(kind, params, centre, size=REF_HW, spacing=REF_PX):
        return {'Transform': [kind], 'NumberOfParameters': [str(len(params))],
                'TransformParameters': [repr(float(p)) for p in params],
                'CenterOfRotationPoint': [repr(float(v)) for v in centre],
                'InitialTransformParametersFileName': ['NoInitialTransform'],
                'HowToCombineTransforms': ['Compose'], 'FixedImageDimension': ['2'],
                'MovingImageDimension': ['2'], 'Size': [str(size[1]), str(size[0])],
                'Spacing': [repr(spacing)] * 2, 'Origin': ['0', '0'],
                'Direction': ['1', '0', '0', '1'], 'ResampleInterpolator':
                ['FinalNearestNeighborInterpolator']}

    ws = {'initial-ws-00': emap('EulerTransform', [i_th, *i_t], mc),
          '000-to-ref': [emap('EulerTransform', [e_th, *e_t], rc),
                         emap('AffineTransform', [*af.ravel(), *af_t], mc)]}
    (tfd / 'proj-ws_to_ref_transformations.json').write_text(json.dumps(ws, indent=1))

    def ws_map(x, y):
        p = np.stack([x * REF_PX, y * REF_PX], -1)
        q = (p - rc) @ rot(np.rad2deg(e_th)).T + rc + e_t      # Euler (first map)
        q = (q - mc) @ af.T + mc + af_t                        # Affine (second map)
        q = (q - mc) @ rot(np.rad2deg(i_th)).T + mc + i_t      # initial (last)
        return q[..., 0] / REF_PX, q[..., 1] / REF_PX

    lin = rot(np.rad2deg(i_th)) @ af @ rot(np.rad2deg(e_th))
    add('ws', gen.pyramid(base, 3), ws_map, lin)

    # he: RGB, interleaved samples
    rgb = gen.norm(gen.rgb_tissue(*MOV_HW, seed=44), rgb=True)
    m = about(rot(-25.0, 0.95), REF_C, (MOV_C[0] + 2.5, MOV_C[1] + 1.5))
    write_json(tfd / 'he.json', m)
    add('he', gen.pyramid(rgb, 2), lambda x, y, m=m: apply(m, x, y), m[:2, :2], rgb=True)

    # bad (malformed transform) and orphan (none)
    small = gen.norm(gen.tissue(300, 300, 1, seed=45))
    gen.write_ome(raw / 'bad.ome.tif', [small], ['X'], REF_PX)
    gen.write_ome(raw / 'orphan.ome.tif', [small], ['X'], REF_PX)
    (tfd / 'bad.json').write_text('{\n  "scopefs_transform": 1,\n'
                                  '  "matrix": [[1, 0, 0], [0, 1 0], [0, 0, 1]]\n}\n')
    return {'raw': raw, 'tfd': tfd, 'ref': ref, 'slides': slides}


def mount(scopefs, data, **opts):
    o = {'reference': 'ref'}
    o.update(opts)
    return scopefs.mount(raw=data['raw'], opts=o)


def read_level(path, level):
    with tifffile.TiffFile(path) as tf:
        arr = tf.series[0].levels[level].asarray()
        rgb = tf.pages[0].samplesperpixel == 3
    return gen.norm(arr, rgb)


def level_source(sl, out_ds):
    """The documented source choice: (source image (C, H, W, S), its
    downsample per axis) for an output level of downsample out_ds."""
    w0, h0 = sl.levels[0].shape[2], sl.levels[0].shape[1]
    ds = [gen.level_downsample(w0, h0, lv.shape[2], lv.shape[1]) for lv in sl.levels]
    need = np.sqrt(out_ds[0] * out_ds[1]) * np.sqrt(abs(np.linalg.det(sl.lin)))
    best = 0
    for i in range(1, len(ds)):
        if max(ds[i]) <= need * 1.01 and max(ds[i]) >= max(ds[best]):
            best = i
    r = need / np.sqrt(ds[best][0] * ds[best][1])
    k = int(round(r)) if r > 1.5 else 1
    img = sl.levels[best] if k == 1 else gen.box_reduce(sl.levels[best], k)
    return img, (ds[best][0] * k, ds[best][1] * k)


def expected(sl, out_shape, out_ds=(1.0, 1.0), order=1, cval=0.0):
    """(C, H, W, S) float64: the slide warped onto an output level."""
    img, fs = level_source(sl, out_ds) if out_ds != (1.0, 1.0) else (sl.levels[0], (1.0, 1.0))
    h, w = out_shape
    y, x = np.mgrid[0:h, 0:w].astype(float)
    x0, y0 = (x + 0.5) * out_ds[0] - 0.5, (y + 0.5) * out_ds[1] - 0.5
    sx0, sy0 = sl.T(x0, y0)
    sx, sy = (sx0 + 0.5) / fs[0] - 0.5, (sy0 + 0.5) / fs[1] - 0.5
    out = np.empty(img.shape[:1] + out_shape + img.shape[3:])
    for c in range(img.shape[0]):
        for s in range(img.shape[3]):
            out[c, :, :, s] = ndi.map_coordinates(img[c, :, :, s].astype(float), [sy, sx],
                                                  order=order, mode='grid-constant', cval=cval)
    return out


WARPED = ['aff', 'flip', 'fld', 'ex', 'itk', 'ws', 'he']


@pytest.mark.parametrize('name', WARPED)
def test_warped_levels_match_scipy(scopefs, data, name):
    m = mount(scopefs, data, transforms=str(data['tfd']))
    sl = data['slides'][name]
    path = m.path('registered', name + '.ome.tif')
    with tifffile.TiffFile(path) as tf:
        assert len(tf.series[0].levels) == 3
    for level in range(3):
        ours = read_level(path, level).astype(float)
        ref_l = data['ref'][level]
        out_hw = ref_l.shape[1:3]
        assert ours.shape[1:3] == out_hw
        out_ds = (2.0 ** level, 2.0 ** level)  # the reference's level l is 2^l exactly
        want = expected(sl, out_hw, out_ds)
        d = np.abs(ours - want)
        assert d.max() <= 1.0, (name, level, d.max(), np.unravel_index(d.argmax(), d.shape))
        assert (ours > 0).mean() > 0.2, (name, level)  # the slide is there


def test_odd_sized_levels_line_up(scopefs, tmp_path):
    """A 2047x1501 reference (ceil-halved levels 1024x751, 512x376) and a
    moving slide holding the same pixels 8, 4 px further in an odd 2059x1511
    frame, with the matching translation: the box pyramid commutes with a
    shift by a multiple of 2^l, so registered/mov's level l is registered/
    ref's level l (edges aside).  With downsamples W0 / WL (2047/1024, ...)
    level 1 was 51 and level 2 11737 grey levels off (of ~50000)."""
    W, H, SX, SY = 2047, 1501, 8, 4
    raw, tfd = tmp_path / 'oddraw', tmp_path / 'oddtf'
    raw.mkdir()
    tfd.mkdir()
    ref = gen.norm(gen.tissue(H, W, 1, seed=47))
    mov = np.zeros((1, H + 10, W + 12, 1), ref.dtype)
    mov[:, SY:SY + H, SX:SX + W] = ref
    gen.write_ome(raw / 'ref.ome.tif', gen.pyramid(ref, 3), ['DAPI'], REF_PX)
    gen.write_ome(raw / 'mov.ome.tif', gen.pyramid(mov, 3), ['DAPI'], REF_PX)
    write_json(tfd / 'mov.json', np.array([[1, 0, SX], [0, 1, SY], [0, 0, 1]], float))
    m = scopefs.mount(raw=raw, opts={'reference': 'ref', 'transforms': str(tfd), 'reg': 'off'})
    want = [read_level(m.path('registered', 'ref.ome.tif'), lv).astype(int) for lv in range(3)]
    for lv in range(3):
        got = read_level(m.path('registered', 'mov.ome.tif'), lv).astype(int)
        assert got.shape == want[lv].shape, (lv, got.shape, want[lv].shape)
        d = np.abs(got - want[lv])[:, 2:-2, 2:-2]
        assert d.max() <= 1, (lv, d.max(), np.unravel_index(d.argmax(), d.shape))


def test_nearest_and_background(scopefs, data):
    m = mount(scopefs, data, transforms=str(data['tfd']), interp='nearest', background='1234')
    for name in ('aff', 'flip', 'fld'):
        sl = data['slides'][name]
        ours = read_level(m.path('registered', name + '.ome.tif'), 0)
        want = expected(sl, REF_HW, order=0, cval=1234.0)
        assert np.array_equal(ours, want.astype(np.uint16)), name
        assert (ours == 1234).mean() > 0.02, name  # background where the slide is not


@pytest.mark.skipif(not shutil.which('vips'), reason='libvips command line not installed')
def test_plain_affine_vs_vips(scopefs, data, tmp_path):
    m = mount(scopefs, data, transforms=str(data['tfd']))
    sl = data['slides']['aff']
    ours = read_level(m.path('registered', 'aff.ome.tif'), 0)[0, :, :, 0].astype(float)
    src = tmp_path / 'aff0.tif'
    # float32 input: libvips' integer paths use fixed-point weights
    tifffile.imwrite(src, sl.levels[0][0, :, :, 0].astype(np.float32))
    mat = np.linalg.inv(about(rot(30.0, 1.05), REF_C, (MOV_C[0] + 7.3, MOV_C[1] - 4.1)))
    out_v = tmp_path / 'v.v'
    # libvips maps forward, out = A in + (odx, ody), pixel centres at integers
    subprocess.run(['vips', 'affine', '--interpolate', 'bilinear', '--odx=%r' % mat[0, 2],
                    '--ody=%r' % mat[1, 2], '--oarea', '0 0 %d %d' % (REF_HW[1], REF_HW[0]),
                    '--', str(src), str(out_v), ' '.join(repr(v) for v in mat[:2, :2].ravel())],
                   check=True)
    subprocess.run(['vips', 'copy', str(out_v), str(tmp_path / 'v.tif')], check=True)
    vout = tifffile.imread(tmp_path / 'v.tif').astype(float)
    y, x = np.mgrid[0:REF_HW[0], 0:REF_HW[1]].astype(float)
    sx, sy = sl.T(x, y)
    h, w = sl.levels[0].shape[1:3]
    inside = (sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)
    assert inside.mean() > 0.4
    # ours rounds to uint16: within half a grey level plus float rounding
    assert np.abs(ours - vout)[inside].max() <= 0.6


def test_malformed_and_missing_transforms(scopefs, data):
    # reg=off: the orphan is not registered by scopefs (test_autoreg_files.py)
    m = mount(scopefs, data, transforms=str(data['tfd']), reg='off')
    names = sorted(os.listdir(m.path('registered')))
    assert names == sorted(['ref.ome.tif'] + ['%s.ome.tif' % n for n in WARPED])
    states = {s['name']: s['state'] for s in m.status()['slides']}
    bad = str(data['tfd'] / 'bad.json') + ':3:'
    assert states['bad'].startswith('not served') and bad in states['bad'], states['bad']
    assert states['orphan'].startswith('not served: no transform for it in'), states['orphan']
    assert states['orphan'].endswith('and reg=off'), states['orphan']
    assert str(data['tfd']) in states['orphan']
    assert states['ws'].endswith('proj-ws_to_ref_transformations.json'), states['ws']
    for n in WARPED:
        assert states[n].startswith('served'), (n, states[n])


def test_no_transforms_option(scopefs, data):
    m = mount(scopefs, data, reg='off')
    assert os.listdir(m.path('registered')) == ['ref.ome.tif']
    for s in m.status()['slides']:
        if s['name'] != 'ref':
            assert s['state'] == 'not served: no transforms=DIR given and reg=off', s
    # the reference itself is re-tiled, pixel for pixel
    assert np.array_equal(read_level(m.path('registered', 'ref.ome.tif'), 1), data['ref'][1])


def test_remount_serves_warped_tiles_from_cache(scopefs, data, tmp_path):
    cache = tmp_path / 'shared-cache'
    opts = {'reference': 'ref', 'transforms': str(data['tfd'])}
    m = scopefs.mount(raw=data['raw'], cache=cache, opts=opts)
    first = {n: read_all(m.path('registered', n + '.ome.tif')) for n in ('aff', 'fld', 'he')}
    assert m.status()['tiles_computed'] > 0
    m.unmount()
    m2 = scopefs.mount(raw=data['raw'], cache=cache, opts=opts)
    for n, b in first.items():
        assert read_all(m2.path('registered', n + '.ome.tif')) == b, n
    st = m2.status()
    assert st['tiles_computed'] == 0, st
    assert st['disk_hits'] > 0, st


# --- wsireg against transformix ----------------------------------------------------


def write_mhd(path, img, spacing):
    raw = os.path.splitext(str(path))[0] + '.raw'
    img.astype(np.float32).tofile(raw)
    with open(path, 'w') as f:
        f.write('ObjectType = Image\nNDims = 2\nBinaryData = True\n'
                'BinaryDataByteOrderMSB = False\nCompressedData = False\n'
                'TransformMatrix = 1 0 0 1\nOffset = 0 0\nCenterOfRotation = 0 0\n'
                'ElementSpacing = %r %r\nDimSize = %d %d\nElementType = MET_FLOAT\n'
                'ElementDataFile = %s\n' % (spacing, spacing, img.shape[1], img.shape[0],
                                            os.path.basename(raw)))


def read_mhd(path):
    hdr = dict(line.split(' = ', 1) for line in open(path).read().splitlines() if ' = ' in line)
    w, h = map(int, hdr['DimSize'].split())
    raw = os.path.join(os.path.dirname(path), hdr['ElementDataFile'])
    return np.fromfile(raw, np.float32).reshape(h, w)


def elastix_text(m, initial):
    """One elastix map ({key: [strings]}) as a TransformParameters file."""
    lines = []
    for k, vals in m.items():
        if k == 'InitialTransformParametersFileName':
            vals = [initial]
        out = []
        for v in vals:
            try:
                float(v)
                out.append(v)
            except ValueError:
                out.append('"%s"' % v)
        lines.append('(%s %s)' % (k, ' '.join(out)))
    return '\n'.join(lines) + '\n'


@pytest.mark.skipif(not shutil.which('transformix'), reason='elastix not installed')
def test_wsireg_vs_transformix(scopefs, tmp_path):
    """The same maps as a wsireg file (scopefs) and as a chain of elastix
    files (transformix), in wsireg's order: the last key's maps first (in list
    order), the first key's last; the chain's output grid and the moving
    image carry the slides' pixel sizes."""
    rng = np.random.default_rng(46)
    ref_hw, mov_hw, ref_px, mov_px = (300, 400), (320, 380), 0.5, 0.6
    ref = gen.norm(gen.tissue(*ref_hw, 1, seed=47))
    mov = ndi.gaussian_filter(gen.tissue(*mov_hw, 1, seed=48)[0].astype(float), 1.5)
    mov = gen.norm(np.round(mov).astype(np.uint16))
    gen.write_ome(scopefs.raw / 'wref.ome.tif', [ref], ['A'], ref_px)
    gen.write_ome(scopefs.raw / 'wmov.ome.tif', [mov], ['A'], mov_px)
    tfd = tmp_path / 'tf'
    tfd.mkdir()
    rc = np.array([(ref_hw[1] - 1) / 2, (ref_hw[0] - 1) / 2]) * ref_px
    mc = np.array([(mov_hw[1] - 1) / 2, (mov_hw[0] - 1) / 2]) * mov_px

    def emap(kind, params, centre=None, extra=None):
        m = {'Transform': [kind], 'NumberOfParameters': [str(len(params))],
             'TransformParameters': ['%.17g' % p for p in params],
             'InitialTransformParametersFileName': ['NoInitialTransform'],
             'HowToCombineTransforms': ['Compose'], 'FixedImageDimension': ['2'],
             'MovingImageDimension': ['2'], 'FixedInternalImagePixelType': ['float'],
             'MovingInternalImagePixelType': ['float'], 'Size': [str(ref_hw[1]),
                                                                 str(ref_hw[0])],
             'Index': ['0', '0'], 'Spacing': [repr(ref_px)] * 2, 'Origin': ['0', '0'],
             'Direction': ['1', '0', '0', '1'], 'UseDirectionCosines': ['true'],
             'ResampleInterpolator': ['FinalBSplineInterpolator'],
             'FinalBSplineInterpolationOrder': ['1'], 'Resampler': ['DefaultResampler'],
             'DefaultPixelValue': ['0'], 'ResultImageFormat': ['mhd'],
             'ResultImagePixelType': ['float']}
        if centre is not None:
            m['CenterOfRotationPoint'] = ['%.17g' % v for v in centre]
        m.update(extra or {})
        return m

    gs = (8, 7)
    coef = ndi.gaussian_filter(rng.standard_normal((2,) + gs[::-1]), 1.0)
    coef = coef / np.abs(coef).max() * 4.0  # um
    bspline = emap('BSplineTransform', list(coef.ravel()), None, {
        'GridSize': [str(gs[0]), str(gs[1])], 'GridIndex': ['0', '0'],
        'GridSpacing': ['40', '35'], 'GridOrigin': ['-30', '-25'],
        'GridDirection': ['1', '0', '0', '1'], 'BSplineTransformSplineOrder': ['3'],
        'UseCyclicTransform': ['false']})
    ws = {
        'initial-wmov-00': emap('EulerTransform', [0.04, 1.5, -0.5], mc),
        '000-to-mid': [emap('EulerTransform', [-0.1, *(mc - rc + [2.0, 1.0])], rc),
                       emap('AffineTransform', [1.02, 0.01, -0.02, 0.99, 0.3, -0.4], mc)],
        '001-to-wref': [emap('EulerTransform', [0.03, -1.0, 0.8], rc), bspline],
    }
    (tfd / 'p-wmov_to_wref_transformations.json').write_text(json.dumps(ws, indent=1))
    # naming: a later project's file for the same stem is not taken (it is
    # broken); <stem>_transformations.json is found for another slide
    (tfd / 'zz-wmov_to_wref_transformations.json').write_text('{"e": [1]}')
    (tfd / 'wmov2_transformations.json').write_text(json.dumps(
        {'000-to-wref': [emap('EulerTransform', [0.0, 3.0, 2.0], rc)]}))
    gen.write_ome(scopefs.raw / 'wmov2.ome.tif', [ref], ['A'], ref_px)
    # the elastix chain in application order: last key's maps (list order),
    # then the previous key's, the first key last; each names the one before
    order = ws['001-to-wref'] + ws['000-to-mid'] + [ws['initial-wmov-00']]
    prev = 'NoInitialTransform'
    for i, emp in enumerate(order):
        name = 'chain%d.txt' % i
        (tmp_path / name).write_text(elastix_text(emp, prev))
        prev = name
    write_mhd(tmp_path / 'moving.mhd', mov[0, :, :, 0], mov_px)
    out = tmp_path / 'tx'
    out.mkdir()
    subprocess.run(['transformix', '-in', 'moving.mhd', '-out', 'tx', '-tp', prev],
                   cwd=tmp_path, check=True, capture_output=True, timeout=120)
    expect = read_mhd(out / 'result.mhd').astype(float)
    assert expect.shape == ref_hw

    m = scopefs.mount(opts={'reference': 'wref', 'transforms': str(tfd)})
    st = {s['name']: s['state'] for s in m.status()['slides']}
    assert st['wmov'] == 'served, warped by %s' % (tfd / 'p-wmov_to_wref_transformations.json')
    assert st['wmov2'] == 'served, warped by %s' % (tfd / 'wmov2_transformations.json')
    ours = read_level(m.path('registered', 'wmov.ome.tif'), 0)[0, :, :, 0].astype(float)
    # ITK counts half a pixel outside the image as inside: compare where
    # transformix mapped well inside the moving image
    inner = ndi.binary_erosion(expect != 0, iterations=2)
    assert inner.mean() > 0.5
    d = np.abs(ours - expect)[inner]
    assert d.max() <= 1.0, (d.max(), d.mean())
    # and the transform did something
    assert np.abs(expect - ref[0, :, :, 0])[inner].mean() > 50


def test_gpu_unavailable_is_said_once(scopefs, tmp_path):
    # gpu=0 on a machine without a usable CUDA device: every worker falls
    # back to the CPU, and the log says so once, not once per worker.
    a = gen.norm(gen.tissue(600, 700, 1, seed=3))
    gen.write_ome(scopefs.raw / 'ref.ome.tif', [a], ['A'], REF_PX)
    gen.write_ome(scopefs.raw / 'mov.ome.tif', [a], ['A'], REF_PX)
    tfd = tmp_path / 'tfd'
    tfd.mkdir()
    write_json(tfd / 'mov.json', np.array([[1.0, 0, 3], [0, 1.0, -2], [0, 0, 1]]))
    m = scopefs.mount(opts={'reference': 'ref', 'transforms': str(tfd), 'gpu': '0',
                            'threads': '4'})
    with open(m.path('registered', 'mov.ome.tif'), 'rb') as f:
        assert len(f.read()) > 600 * 700
    lines = [ln for ln in m.log_text().splitlines() if 'warping on the CPU' in ln]
    if not lines:
        pytest.skip('a CUDA device warped the slide: nothing to say')
    assert len(lines) == 1, lines


def test_transform_edited_after_mount_is_refused(scopefs, tmp_path):
    """The mount warps with the transform it read.  A pipeline step that
    rewrites transforms=DIR/<stem>.json and then copies registered/ must get
    an error naming the file, not the old warp with exit status 0."""
    a = gen.norm(gen.tissue(300, 400, 1, seed=4))
    gen.write_ome(scopefs.raw / 'ref.ome.tif', [a], ['A'], REF_PX)
    gen.write_ome(scopefs.raw / 'mov.ome.tif', [a], ['A'], REF_PX)
    gen.write_ome(scopefs.raw / 'other.ome.tif', [a], ['A'], REF_PX)
    tfd = tmp_path / 'tfd'
    tfd.mkdir()
    write_json(tfd / 'mov.json', np.array([[1.0, 0, 5], [0, 1.0, -3], [0, 0, 1]]))
    write_json(tfd / 'other.json', np.array([[1.0, 0, 2], [0, 1.0, 2], [0, 0, 1]]))
    m = scopefs.mount(opts={'reference': 'ref', 'transforms': str(tfd), 'reg': 'off'})
    before = read_all(m.path('registered', 'mov.ome.tif'))
    write_json(tfd / 'mov.json', np.array([[1.0, 0, -4], [0, 1.0, 6], [0, 0, 1]]))
    with pytest.raises(OSError) as err:
        with open(m.path('registered', 'mov.ome.tif'), 'rb') as f:
            f.read()
    assert err.value.errno == 5, err.value  # EIO
    recent = [r['message'] for r in m.status()['recent_errors']]
    assert any(str(tfd / 'mov.json') + ' changed since the mount read it' in r
               for r in recent), recent
    assert len(read_all(m.path('registered', 'other.ome.tif'))) == len(before)


def test_files_a_transform_names_edited_after_mount_are_refused(scopefs, tmp_path):
    """The warp follows every file the transform file names, not only that
    file: a pipeline step that rewrites just a JSON transform's field TIFF,
    or the initial file of an elastix chain, and then copies registered/
    must get an error naming the rewritten file, not the old warp (they
    were not watched).  A slide whose files did not change still reads."""
    a = gen.norm(gen.tissue(300, 400, 1, seed=5))
    for stem in ('ref', 'fld', 'chain', 'other'):
        gen.write_ome(scopefs.raw / (stem + '.ome.tif'), [a], ['A'], REF_PX)
    tfd = tmp_path / 'tfd'
    tfd.mkdir()
    field = np.zeros((8, 10, 2), np.float32)
    tifffile.imwrite(tfd / 'fld.field.tif', field, photometric='minisblack',
                     planarconfig='contig')
    write_json(tfd / 'fld.json', np.eye(3), {'file': 'fld.field.tif', 'scale': 64})
    translation = '(Transform "TranslationTransform")\n(NumberOfParameters 2)\n'
    (tfd / 'chain0.txt').write_text(translation + '(TransformParameters 1.5 -2)\n')
    (tfd / 'chain.txt').write_text(translation + '(TransformParameters 3 4)\n'
                                   '(InitialTransformParametersFileName "chain0.txt")\n')
    write_json(tfd / 'other.json', np.array([[1.0, 0, 2], [0, 1.0, 2], [0, 0, 1]]))
    m = scopefs.mount(opts={'reference': 'ref', 'transforms': str(tfd), 'reg': 'off'})
    other = read_all(m.path('registered', 'other.ome.tif'))
    for stem in ('fld', 'chain'):
        assert len(read_all(m.path('registered', stem + '.ome.tif'))) == len(other)

    def refused(stem, changed):
        with pytest.raises(OSError) as err:
            with open(m.path('registered', stem + '.ome.tif'), 'rb') as f:
                f.read()
        assert err.value.errno == 5, err.value  # EIO
        recent = [r['message'] for r in m.status()['recent_errors']]
        assert any(str(changed) + ' changed since the mount read it: remount' in r
                   for r in recent), recent

    tifffile.imwrite(tfd / 'fld.field.tif', field + 0.5, photometric='minisblack',
                     planarconfig='contig')
    refused('fld', tfd / 'fld.field.tif')
    assert len(read_all(m.path('registered', 'chain.ome.tif'))) == len(other)
    (tfd / 'chain0.txt').write_text(translation + '(TransformParameters -7 9.25)\n')
    refused('chain', tfd / 'chain0.txt')
    assert read_all(m.path('registered', 'other.ome.tif')) == other

"""transforms/ files of scopefs's own registration, fed back to scopefs.

A slide registered by scopefs shows its transform in transforms/ as our JSON
(+ field TIFF) and as elastix files (affine chained to a
DeformationFieldTransform reading a MetaImage).  Each set, copied to a
folder and given back through transforms=DIR, must warp the slide to the
same pixels as the registration itself: the reader and the writer agree
(transformix checks the writer alone, test_transform_export_oracle.py).
Also: the field files follow the field, a user's file wins, reg=off.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

import gen

SIZE = 768


def turned(a, deg, t):
    """a turned by deg about its centre and shifted by t: returns (slide, M) with
    a(x) = slide(M x), M the backward 3x3 map reference px -> slide px."""
    th = np.deg2rad(deg)
    c, s = np.cos(th), np.sin(th)
    ctr = (SIZE - 1) / 2.0
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    dx, dy = xx - ctr - t[0], yy - ctr - t[1]
    px, py = c * dx + s * dy + ctr, -s * dx + c * dy + ctr
    out = np.stack([ndi.map_coordinates(a[i].astype(float), [py, px], order=1)
                    for i in range(a.shape[0])]).astype(np.uint16)
    lin = np.array([[c, -s], [s, c]])
    m = np.eye(3)
    m[:2, :2] = lin
    m[:2, 2] = np.array([ctr, ctr]) + np.array(t) - lin @ np.array([ctr, ctr])
    return out, m


@pytest.fixture
def pair(scopefs):
    """a_ref and b_mov (the same tissue turned by 11 degrees and shifted)."""
    a = gen.tissue(SIZE, SIZE, channels=2, seed=11)
    th = np.deg2rad(11.0)
    c, s = np.cos(th), np.sin(th)
    ctr = (SIZE - 1) / 2.0
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    # b(y) = a(R^-1 (y - ctr - t) + ctr), so a(x) = b(R (x - ctr) + ctr + t)
    dx, dy = xx - ctr - 20.0, yy - ctr + 12.0
    px, py = c * dx + s * dy + ctr, -s * dx + c * dy + ctr
    b = np.stack([ndi.map_coordinates(a[i].astype(float), [py, px], order=1)
                  for i in range(2)]).astype(np.uint16)
    gen.write_ome(scopefs.raw / 'a_ref.ome.tif', gen.pyramid(a[..., None], 2),
                  names=['DAPI', 'CD3'], tile=256)
    gen.write_ome(scopefs.raw / 'b_mov.ome.tif', gen.pyramid(b[..., None], 2),
                  names=['DAPI', 'CD3'], tile=256)
    return scopefs


def state(m, stem):
    return {s['name']: s['state'] for s in m.status()['slides']}[stem]


def copy_files(m, names, dest, rename=None):
    dest.mkdir(exist_ok=True)
    for n in names:
        shutil.copyfile(m.path('transforms', n), dest / ((rename or {}).get(n, n)))


def test_exported_files_warp_like_the_registration(pair, tmp_path):
    m = pair.mount(opts={'reg_nonrigid_dim': 384})
    files = sorted(p.name for p in m.path('transforms').iterdir())
    assert files == ['b_mov.elastix-field.txt', 'b_mov.elastix.txt', 'b_mov.field.mhd',
                     'b_mov.field.raw', 'b_mov.field.tif', 'b_mov.json'], files
    assert state(m, 'b_mov').startswith('served, registered by scopefs'), state(m, 'b_mov')
    ours = tifffile.imread(m.path('registered', 'b_mov.ome.tif'), level=0).astype(float)

    json_dir = tmp_path / 'tf_json'
    copy_files(m, ['b_mov.json', 'b_mov.field.tif'], json_dir)
    ex_dir = tmp_path / 'tf_elastix'
    copy_files(m, ['b_mov.elastix.txt', 'b_mov.elastix-field.txt', 'b_mov.field.mhd',
                   'b_mov.field.raw'], ex_dir, rename={'b_mov.elastix.txt': 'b_mov.txt'})
    m.unmount()
    for folder, kind in ((json_dir, 'b_mov.json'), (ex_dir, 'b_mov.txt')):
        m2 = pair.mount(opts={'transforms': folder})
        assert state(m2, 'b_mov') == 'served, warped by %s/%s' % (folder, kind)
        assert not m2.path('transforms').exists()  # nothing computed by scopefs
        back = tifffile.imread(m2.path('registered', 'b_mov.ome.tif'), level=0).astype(float)
        diff = np.abs(back - ours)
        # The same map up to float rounding: bilinear samples may differ by 1.
        assert diff.max() <= 1.0, (kind, diff.max())
        m2.unmount()


def test_affine_only_has_no_field_files(pair):
    m = pair.mount(opts={'reg_nonrigid_dim': 0})
    assert sorted(p.name for p in m.path('transforms').iterdir()) == \
        ['b_mov.elastix.txt', 'b_mov.json']
    text = m.path('transforms', 'b_mov.json').read_text()
    assert '"field"' not in text
    assert '(InitialTransformParametersFileName "NoInitialTransform")' in \
        m.path('transforms', 'b_mov.elastix.txt').read_text()


def test_a_user_file_wins_and_reg_off(pair, tmp_path):
    user = tmp_path / 'user'
    user.mkdir()
    (user / 'b_mov.json').write_text(
        '{"scopefs_transform": 1, "matrix": [[1, 0, 3], [0, 1, 0], [0, 0, 1]]}')
    m = pair.mount(opts={'transforms': user})
    assert state(m, 'b_mov') == 'served, warped by %s/b_mov.json' % user
    assert not m.path('transforms').exists()
    m.unmount()
    m = pair.mount(opts={'reg': 'off'})
    assert state(m, 'b_mov').startswith('not served: no transforms=DIR given and reg=off')
    assert sorted(p.name for p in m.path('registered').iterdir()) == ['a_ref.ome.tif']


@pytest.mark.parametrize('damage, words', [
    ('short_raw', 'field data is short'),
    ('3d', 'a 3D image'),
    ('no_raw', 'cannot open the data file'),
    ('nearest', 'DeformationFieldInterpolationOrder 0'),
])
def test_a_bad_deformation_field_names_the_file(pair, tmp_path, damage, words):
    m = pair.mount(opts={'reg_nonrigid_dim': 256})
    ex_dir = tmp_path / 'tf'
    copy_files(m, ['b_mov.elastix.txt', 'b_mov.elastix-field.txt', 'b_mov.field.mhd',
                   'b_mov.field.raw'], ex_dir, rename={'b_mov.elastix.txt': 'b_mov.txt'})
    m.unmount()
    mhd, raw, fld = ex_dir / 'b_mov.field.mhd', ex_dir / 'b_mov.field.raw', \
        ex_dir / 'b_mov.elastix-field.txt'
    if damage == 'short_raw':
        raw.write_bytes(raw.read_bytes()[:1000])
    elif damage == '3d':
        mhd.write_text(mhd.read_text().replace('NDims = 2', 'NDims = 3'))
    elif damage == 'no_raw':
        raw.unlink()
    else:
        fld.write_text(fld.read_text().replace('(DeformationFieldInterpolationOrder 1)',
                                               '(DeformationFieldInterpolationOrder 0)'))
    m2 = pair.mount(opts={'transforms': ex_dir})
    st = state(m2, 'b_mov')
    assert st.startswith('not served: %s/b_mov.txt' % ex_dir) and words in st, st
    assert sorted(p.name for p in m2.path('registered').iterdir()) == ['a_ref.ome.tif']


def test_serial_order_composes_the_chain(scopefs):
    """reg_order=serial: c registers to b, b to a_ref; c's map is the chain's."""
    a = gen.tissue(SIZE, SIZE, channels=1, seed=21)
    truth = {}
    gen.write_ome(scopefs.raw / 'a_ref.ome.tif', gen.pyramid(a[..., None], 2), names=['DAPI'])
    for stem, deg, t in (('b', 9.0, (15.0, -8.0)), ('c', -14.0, (-10.0, 22.0))):
        img, truth[stem] = turned(a, deg, t)
        gen.write_ome(scopefs.raw / ('%s.ome.tif' % stem), gen.pyramid(img[..., None], 2),
                      names=['DAPI'])
    m = scopefs.mount(opts={'reg_order': 'serial', 'reg_nonrigid_dim': 0})
    pts = np.random.default_rng(2).uniform(0.3 * SIZE, 0.7 * SIZE, (100, 2))
    h = np.c_[pts, np.ones(len(pts))]
    for stem in ('b', 'c'):
        got = np.array(json.loads(m.path('transforms', stem + '.json').read_text())['matrix'])
        assert 'registered by scopefs: serial,' in state(m, stem), state(m, stem)
        err = np.hypot(*((got @ h.T) - (truth[stem] @ h.T))[:2])
        assert np.median(err) < 0.5, (stem, np.median(err))


@pytest.mark.parametrize('preset', ['cyclic-if', 'serial-sections'])
def test_registration_presets_mount(pair, preset):
    """The shipped registration presets parse and register the pair."""
    repo = Path(__file__).resolve().parents[2]
    m = pair.mount(opts={'preset': str(repo / 'mountopts' / preset), 'reg_nonrigid_dim': 256})
    m.path('transforms', 'b_mov.json').read_text()
    assert state(m, 'b_mov').startswith('served, registered by scopefs'), state(m, 'b_mov')

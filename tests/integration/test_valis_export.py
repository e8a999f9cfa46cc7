"""tools/valis2scopefs.py on a registrar built by code, checked through a mount.

VALIS cannot be installed here (it is not on the Debian mirror and PyPI is not
reachable), so the test builds the object graph VALIS pickles: classes named
valis.registration.Valis and valis.registration.Slide (plus a slide reader
from valis.slide_io and an object of a package that is not installed, as real
pickles hold pyvips/pandas objects), with the attribute names and meanings
of valis/registration.py.  They are pickled in a subprocess that fakes those
modules in sys.modules; the exporter then runs in a clean interpreter where
no valis module exists.

The oracle re-implements VALIS's own level-0 warp (warp_tools.warp_img as
Slide.warp_slide calls it, crop="reference") with numpy, scipy and skimage:
the rigid matrix is scaled the way VALIS does it, by warping the image
corners forward with S(dst) M^-1 S(src)^-1 and fitting a projective transform
to them (skimage.transform.ProjectiveTransform); the frame is shifted by the
reference crop (-M_ref translation scaled to level 0); bk_dxdy is scaled and
upsampled bilinearly (VALIS's resize of the field, with its default bicubic
swapped for bilinear, as scopefs interpolates fields bilinearly); the moving
level 0 is sampled with scipy.ndimage.map_coordinates.  Pixels whose field
sample lies beyond the last field node are left out: there VALIS's libvips
upsampling fades to zero and scopefs clamps (documented)."""

import json
import os
import pickle
import subprocess
import textwrap

import numpy as np
import pytest
import scipy.ndimage as ndi
import tifffile
from skimage import transform as sktf

import gen

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, 'tools', 'valis2scopefs.py')
PYTHON = '/usr/bin/python3'

# Writes the pickle: the modules VALIS's classes live in, faked in sys.modules.
PICKLER = textwrap.dedent('''\
    import pickle, sys, types
    import numpy as np

    def module(name):
        m = types.ModuleType(name)
        sys.modules[name] = m
        return m

    valis = module('valis')
    registration = module('valis.registration')
    slide_io = module('valis.slide_io')
    module('notinstalled')
    other = module('notinstalled.things')

    def cls(mod, name):
        c = type(name, (object,), {'__module__': mod.__name__})
        setattr(mod, name, c)
        return c

    Valis = cls(registration, 'Valis')
    Slide = cls(registration, 'Slide')
    Reader = cls(slide_io, 'VipsSlideReader')
    Thing = cls(other, 'Thing')

    d = dict(np.load(sys.argv[1], allow_pickle=True))
    reg = Valis()
    reg.name = 'demo'
    reg.crop = 'reference'
    reg.reference_img_f = str(d['ref_f'])
    reg.name_dict = {str(d['ref_f']): 'ref', str(d['mov_f']): 'mov', str(d['st_f']): 'st'}
    reg.aligned_slide_shape_rc = d['aligned_rc']
    reg._full_displacement_shape_rc = d['full_rc']
    reg._non_rigid_bbox = list(d['bbox'])
    reg.summary_df = Thing()
    reg.slide_dict = {}
    for name, f in (('ref', 'ref_f'), ('mov', 'mov_f'), ('st', 'st_f')):
        s = Slide()
        s.name = name
        s.src_f = str(d[f])
        s.val_obj = reg
        s.reader = Reader()
        s.reader.metadata = {'n_channels': 2}
        s.M = d[name + '_M']
        s.processed_img_shape_rc = tuple(int(v) for v in d[name + '_proc'])
        s.reg_img_shape_rc = tuple(int(v) for v in d['reg_rc'])
        s.slide_dimensions_wh = d[name + '_dims']
        s.image = np.zeros((4, 4), np.uint8)
        s.stored_dxdy = False
        s._bk_dxdy_np = None
        s._bk_dxdy_f = None
        s.fwd_dxdy = None
        reg.slide_dict[name] = s
    reg.slide_dict['mov']._bk_dxdy_np = d['mov_dxdy']
    reg.slide_dict['st'].stored_dxdy = True
    reg.slide_dict['st']._bk_dxdy_f = str(d['st_dxdy_f'])
    with open(sys.argv[2], 'wb') as f:
        pickle.dump(reg, f)
''')


def rotation_about(theta_deg, scale, centre_from, centre_to):
    """3x3: x -> scale R (x - centre_from) + centre_to."""
    t = np.deg2rad(theta_deg)
    a = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    m = np.eye(3)
    m[:2, :2] = a
    m[:2, 2] = np.asarray(centre_to) - a @ np.asarray(centre_from)
    return m


def smooth_dxdy(rng, h, w, amp):
    """A smooth (2, h, w) float32 field of amplitude about amp."""
    out = []
    for _ in range(2):
        f = ndi.gaussian_filter(rng.standard_normal((h, w)), min(h, w) / 8.0, mode='nearest')
        out.append(f / np.abs(f).max() * amp)
    return np.array(out, np.float32)


def valis_level0_coords(d, name, dxdy, out_shape):
    """Source coordinates (sx, sy) of every reference level-0 pixel under
    VALIS's warp of slide `name` at level 0 with crop="reference"."""
    M = d[name + '_M']
    proc_rc = np.array(d[name + '_proc'], float)
    reg_rc = np.array(d['reg_rc'], float)
    mov_wh = np.array(d[name + '_dims'][0], float)
    aligned_rc = np.array(d['aligned_rc'], float)
    # warp_xy scaling: src_sxy = src/transformation_src, dst_sxy = out/transformation_dst
    src_sxy = mov_wh / proc_rc[::-1]
    dst_sxy = aligned_rc[::-1] / reg_rc[::-1]
    corners = np.array([[0, 0], [mov_wh[0], 0], [mov_wh[0], mov_wh[1]], [0, mov_wh[1]]], float)
    # forward: xy / src_sxy, then inv(M) (warp_xy_rigid), then * dst_sxy
    p = np.c_[corners / src_sxy, np.ones(4)] @ np.linalg.inv(M).T
    warped = p[:, :2] / p[:, 2:3] * dst_sxy
    fit = sktf.ProjectiveTransform()
    assert fit.estimate(warped, corners)
    # crop to the reference: bbox origin = -M_ref translation scaled to level 0
    ref_wh = np.array(d['ref_dims'][0], float)
    ref_proc_rc = np.array(d['ref_proc'], float)
    crop_xy = -d['ref_M'][:2, 2] * (ref_wh / ref_proc_rc[::-1])
    h, w = out_shape
    Y, X = np.mgrid[0:h, 0:w].astype(float)
    xa, ya = X + crop_xy[0], Y + crop_xy[1]
    inside = np.ones(out_shape, bool)
    if dxdy is not None:
        s = aligned_rc[::-1] / np.array([dxdy.shape[2], dxdy.shape[1]], float)
        u, v = xa / s[0], ya / s[1]
        dx = ndi.map_coordinates(dxdy[0].astype(float), [v, u], order=1, mode='nearest')
        dy = ndi.map_coordinates(dxdy[1].astype(float), [v, u], order=1, mode='nearest')
        inside = (u >= 0) & (u <= dxdy.shape[2] - 1) & (v >= 0) & (v <= dxdy.shape[1] - 1)
        xa, ya = xa + s[0] * dx, ya + s[1] * dy
    src = fit(np.c_[xa.ravel(), ya.ravel()])
    return src[:, 0].reshape(out_shape), src[:, 1].reshape(out_shape), inside


def test_valis_export_through_mount(scopefs, tmp_path):
    rng = np.random.default_rng(2024)
    raw = scopefs.raw
    ref = gen.norm(gen.tissue(500, 600, 2, seed=31))
    mov = gen.norm(gen.tissue(520, 560, 2, seed=32))
    st = gen.norm(gen.tissue(480, 610, 2, seed=33))
    files = {}
    for name, a in (('ref', ref), ('mov', mov), ('st', st)):
        files[name] = raw / ('%s.ome.tif' % name)
        gen.write_ome(files[name], gen.pyramid(a, 2), ['A', 'B'], 0.5)

    # VALIS's shapes: processed images of about 250 px, a padded registered
    # frame, the reference placed in it by a translation
    reg_rc = (290, 330)
    d = {'reg_rc': np.array(reg_rc)}
    procs = {'ref': (250, 300), 'mov': (240, 258), 'st': (236, 300)}
    for name, a in (('ref', ref), ('mov', mov), ('st', st)):
        h, w = a.shape[1:3]
        d[name + '_dims'] = np.array([[w, h], [(w + 1) // 2, (h + 1) // 2]])
        d[name + '_proc'] = np.array(procs[name])
        d[name + '_f'] = str(files[name])
    pad = ((reg_rc[1] - 300) / 2, (reg_rc[0] - 250) / 2)
    d['ref_M'] = np.array([[1, 0, -pad[0]], [0, 1, -pad[1]], [0, 0, 1]], float)
    centre = (reg_rc[1] / 2, reg_rc[0] / 2)
    d['mov_M'] = rotation_about(12.0, 0.93, centre, (129 + 3.5, 120 - 2.0))
    d['st_M'] = rotation_about(-7.0, 1.04, centre, (150 - 4.0, 118 + 1.5))
    aligned_rc = np.ceil(np.array(reg_rc) * np.array([500, 600]) / np.array(procs['ref']))
    d['aligned_rc'] = aligned_rc.astype(int)
    # non-rigid fields at a resolution that is not a whole fraction
    d['mov_dxdy'] = smooth_dxdy(rng, 170, 193, 3.0)
    full_rc = (230, 262)
    bbox = (21, 17, 200, 190)  # x, y, w, h of the stored crop
    st_full = np.zeros((2,) + full_rc, np.float32)
    st_full[:, bbox[1]:bbox[1] + bbox[3], bbox[0]:bbox[0] + bbox[2]] = \
        smooth_dxdy(rng, bbox[3], bbox[2], 4.0)
    d['full_rc'] = np.array(full_rc)
    d['bbox'] = np.array(bbox)
    d['st_dxdy_f'] = str(tmp_path / 'st_bk_dxdy.tiff')
    tifffile.imwrite(d['st_dxdy_f'], np.moveaxis(
        st_full[:, bbox[1]:bbox[1] + bbox[3], bbox[0]:bbox[0] + bbox[2]], 0, -1),
        tile=(64, 64), photometric='minisblack', planarconfig='contig')
    np.savez(tmp_path / 'valis.npz', **d)

    pickler = tmp_path / 'pickler.py'
    pickler.write_text(PICKLER)
    reg_pickle = tmp_path / 'demo_registrar.pickle'
    subprocess.run([PYTHON, str(pickler), str(tmp_path / 'valis.npz'), str(reg_pickle)],
                   check=True, cwd=str(tmp_path))
    with open(reg_pickle, 'rb') as f:
        assert b'valis.registration' in f.read()

    out = tmp_path / 'transforms'
    res = subprocess.run([PYTHON, TOOL, str(reg_pickle), str(out)], capture_output=True,
                         text=True, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert 'reference=ref' in res.stdout
    assert sorted(os.listdir(out)) == ['mov.field.tif', 'mov.json', 'st.field.tif', 'st.json']
    doc = json.loads((out / 'mov.json').read_text())
    assert doc['scopefs_transform'] == 1 and doc['field']['units'] == 'field'
    # the field file holds bk_dxdy itself (values in field pixels)
    fld = tifffile.imread(out / 'mov.field.tif')
    assert np.array_equal(np.moveaxis(fld, -1, 0), d['mov_dxdy'])
    fst = np.moveaxis(tifffile.imread(out / 'st.field.tif'), -1, 0)
    assert np.array_equal(fst, st_full), 'stored field padded back into the full shape'

    m = scopefs.mount(opts={'transforms': str(out), 'reference': 'ref'})
    states = {s['name']: s['state'] for s in m.status()['slides']}
    assert states['mov'].startswith('served'), states
    assert states['st'].startswith('served'), states
    for name, field in (('mov', d['mov_dxdy']), ('st', st_full)):
        with tifffile.TiffFile(m.path('registered', name + '.ome.tif')) as tf:
            ours = tf.series[0].levels[0].asarray().astype(float)
        assert ours.shape == (2, 500, 600)
        sx, sy, inside = valis_level0_coords(d, name, field, (500, 600))
        src = {'mov': mov, 'st': st}[name]
        for c in range(2):
            want = ndi.map_coordinates(src[c, :, :, 0].astype(float), [sy, sx], order=1,
                                       mode='grid-constant', cval=0.0)
            diff = np.abs(ours[c] - want)[inside]
            assert inside.mean() > 0.8
            assert diff.max() <= 1.0, (name, c, diff.max())
        # the moving slide is really moved (not an identity by accident)
        assert np.abs(ours[0] - ref[0, :, :, 0])[inside].mean() > 100
        # the non-rigid part matters: without it the oracle disagrees
        sx0, sy0, _ = valis_level0_coords(d, name, None, (500, 600))
        assert np.hypot(sx - sx0, sy - sy0)[inside].max() > 5.0


def test_valis_export_errors(tmp_path):
    bad = tmp_path / 'not_a.pickle'
    bad.write_bytes(b'not a pickle at all')
    res = subprocess.run([PYTHON, TOOL, str(bad), str(tmp_path / 'o')], capture_output=True,
                         text=True)
    assert res.returncode != 0 and 'valis2scopefs:' in res.stderr
    empty = tmp_path / 'empty.pickle'
    with open(empty, 'wb') as f:
        pickle.dump({'slide_dict': {}}, f)
    res = subprocess.run([PYTHON, TOOL, str(empty), str(tmp_path / 'o')], capture_output=True,
                         text=True)
    assert res.returncode == 1 and 'no slide_dict' in res.stderr
    res = subprocess.run([PYTHON, TOOL, str(empty), str(tmp_path / 'o'), '--level0-size',
                          'x=12'], capture_output=True, text=True)
    assert res.returncode == 1 and 'NAME=WIDTHxHEIGHT' in res.stderr


def test_no_valis_module_needed():
    """The exporter imports numpy and the standard library only."""
    res = subprocess.run([PYTHON, '-c', 'import importlib.util, sys; '
                          'sys.exit(importlib.util.find_spec("valis") is not None)'])
    if res.returncode != 0:
        pytest.skip('a valis package is installed here; the check below is moot')
    with open(TOOL) as f:
        text = f.read()
    assert 'import valis' not in text and 'from valis' not in text

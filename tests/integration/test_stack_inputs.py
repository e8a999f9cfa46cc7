"""Which stack files and plane folders deconvolved/ takes (docs/dataset.md
section 3), on a real mount: a time series (OME SizeT > 1, an ImageJ
hyperstack with frames > 1) and a stack file whose run of planes is broken
by an odd page are left out with a problem that names the file and says
why, instead of being served as one mixed or cut-short z-stack; a trailing
thumbnail page still is a stack; a folder of one-page OME-TIFF planes is a
plane stack.  Shapes and types are checked with tifffile, the independent
reader.  Planes are tiny (32x32) and numit=1, so the file runs in seconds."""

import os

import numpy as np
import tifffile

import gen

OPTS = {'dxy': '0.4', 'dz': '1.2', 'lambda_ex': '561', 'lambda_em': '600', 'numit': '1',
        'threads': '2'}


def problem_for(status, name):
    """The problem entry whose path is the file or folder name, or None."""
    for p in status['problems']:
        if os.path.basename(p['path']) == name:
            return p
    return None


def test_time_series_is_a_problem_not_a_stack(scopefs):
    vt = np.stack([gen.beads(5, 32, 32, seed=55), gen.beads(5, 32, 32, seed=56)])  # T=2, Z=5
    tifffile.imwrite(scopefs.raw / 'tz.ome.tif', vt, metadata={'axes': 'TZYX'})
    tifffile.imwrite(scopefs.raw / 'ij_tz.tif', vt, imagej=True, metadata={'axes': 'TZYX'})
    tifffile.imwrite(scopefs.raw / 'z.tif', vt[0], metadata=None)  # one z-stack: served
    with tifffile.TiffFile(scopefs.raw / 'tz.ome.tif') as t:
        assert 'SizeT="2"' in t.ome_metadata and 'SizeZ="5"' in t.ome_metadata
    with tifffile.TiffFile(scopefs.raw / 'ij_tz.tif') as t:
        assert t.imagej_metadata['frames'] == 2 and t.imagej_metadata['slices'] == 5
    m = scopefs.mount(opts=OPTS)
    st = m.status()
    assert sorted(os.listdir(m.path('deconvolved'))) == ['z']
    assert [s['name'] for s in st['stacks']] == ['z'] and st['stacks'][0]['planes'] == 5
    ome = problem_for(st, 'tz.ome.tif')
    assert ome and 'tz.ome.tif' in ome['reason'] and 'time series (SizeT=2)' in ome['reason']
    ij = problem_for(st, 'ij_tz.tif')
    assert ij and 'ij_tz.tif' in ij['reason'] and 'time series (frames=2)' in ij['reason']
    assert len(st['problems']) == 2


def test_odd_page_is_a_problem_not_a_short_stack(scopefs):
    v = gen.beads(10, 32, 32, seed=34)
    with tifffile.TiffWriter(scopefs.raw / 'odd.tif') as tw:
        for z in range(10):
            tw.write(v[z] if z != 6 else v[z][:30, :30], metadata=None)
    with tifffile.TiffWriter(scopefs.raw / 'odd_type.tif') as tw:
        for z in range(8):
            tw.write(v[z] if z != 4 else v[z].astype(np.uint8), metadata=None)
    with tifffile.TiffWriter(scopefs.raw / 'thumb.tif') as tw:  # a trailing thumbnail is fine
        for z in range(8):
            tw.write(v[z], metadata=None)
        tw.write(v[0][::4, ::4], metadata=None)
    with tifffile.TiffFile(scopefs.raw / 'odd.tif') as t:
        assert len(t.pages) == 10 and t.pages[6].shape == (30, 30)
    m = scopefs.mount(opts=OPTS)
    st = m.status()
    assert sorted(os.listdir(m.path('deconvolved'))) == ['thumb']
    assert st['stacks'][0]['planes'] == 8
    odd = problem_for(st, 'odd.tif')
    assert odd and 'odd.tif' in odd['reason']
    assert 'page 6 is 30x30 uint16, page 0 is 32x32 uint16' in odd['reason']
    odd_type = problem_for(st, 'odd_type.tif')
    assert odd_type and 'page 4 is 32x32 uint8, page 0 is 32x32 uint16' in odd_type['reason']
    assert len(st['problems']) == 2


def test_one_page_ome_planes_are_a_plane_folder(scopefs):
    v = gen.beads(6, 24, 32, seed=40)
    names = ['img_%04d.ome.tif' % z for z in range(6)]
    plain = ['img_%04d.tif' % z for z in range(6)]  # the same pixels as plain TIFF planes
    os.makedirs(scopefs.raw / 'ome')
    os.makedirs(scopefs.raw / 'plain')
    for z in range(6):
        tifffile.imwrite(scopefs.raw / 'ome' / names[z], v[z], metadata={'axes': 'YX'})
        tifffile.imwrite(scopefs.raw / 'plain' / plain[z], v[z], metadata=None)
    with tifffile.TiffFile(scopefs.raw / 'ome' / names[0]) as t:
        assert t.is_ome and len(t.pages) == 1 and not t.pages[0].is_tiled
    m = scopefs.mount(opts=OPTS)
    st = m.status()
    assert st['problems'] == []
    assert sorted(os.listdir(m.path('deconvolved', 'ome'))) == names
    for z, name in enumerate(names):
        got = tifffile.imread(m.path('deconvolved', 'ome', name))
        assert got.shape == (24, 32) and got.dtype == np.uint16
        assert not np.array_equal(got, v[z])  # deconvolved, not the raw plane
        # OME planes read as the plain TIFF planes of the same pixels do.
        assert np.array_equal(got, tifffile.imread(m.path('deconvolved', 'plain', plain[z])))

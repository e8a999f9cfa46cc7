"""Which stack files and plane folders deconvolved/ takes (docs/dataset.md
section 3), on a real mount: a time series (OME SizeT > 1, an ImageJ
hyperstack with frames > 1) and a stack file whose run of planes is broken
by an odd page are left out with a problem that names the file and says
why, instead of being served as one mixed or cut-short z-stack; a trailing
thumbnail page still is a stack; a folder of one-page OME-TIFF planes is a
plane stack; a stack file that states more planes than it has pages (or an
ImageJ stack stored after one IFD that is cut short or of several channels)
and a plane folder with a folder named like a plane are problems too.  ImageJ's
one-IFD layout for stacks over 4 GiB (tifffile imagej=True, truncate=True) is
a stack, read as the same voxels as the stack written one page per plane.
Shapes and types are checked with tifffile, the independent reader.  Planes
are tiny (32x32) and numit=1, so the file runs in seconds."""

import os

import numpy as np
import tifffile

import gen

OPTS = {'dxy': '0.4', 'dz': '1.2', 'lambda_ex': '561', 'lambda_em': '600', 'numit': '1',
        'threads': '2', 'gpu': 'off'}


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


def test_stated_plane_count_must_match_the_pages(scopefs):
    """A stack file that states 16 planes (OME SizeZ, ImageJ slices=) but
    holds 10 pages, or an ImageJ stack stored after one IFD (ImageJ's layout
    for stacks over 4 GiB) of two channels, is a problem that names the file:
    never a 10-plane stack or a 2D slide of plane 0."""
    v = gen.beads(16, 24, 32, seed=61)
    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/'
           'Schemas/OME/2016-06"><Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder='
           '"XYZCT" Type="uint16" SizeX="32" SizeY="24" SizeZ="16" SizeC="1" SizeT="1">'
           '<Channel ID="Channel:0:0" SamplesPerPixel="1"/>'
           + ''.join('<TiffData IFD="%d" PlaneCount="1" FirstZ="%d"/>' % (z, z)
                     for z in range(16))
           + '</Pixels></Image></OME>')
    ij = 'ImageJ=1.54f\nimages=16\nslices=16\nunit=micron\nspacing=1.2\nloop=false\n'
    for name, desc in (('short.ome.tif', xml), ('ij_short.tif', ij)):
        with tifffile.TiffWriter(scopefs.raw / name) as tw:
            for z in range(10):
                tw.write(v[z], description=desc if z == 0 else None, metadata=None,
                         contiguous=False)
    tifffile.imwrite(scopefs.raw / 'ij_big.tif', v.reshape(8, 2, 24, 32), imagej=True,
                     truncate=True, metadata={'axes': 'ZCYX', 'spacing': 1.2, 'unit': 'um'})
    tifffile.imwrite(scopefs.raw / 'ij_ok.tif', v, imagej=True,  # states what it holds
                     metadata={'axes': 'ZYX', 'spacing': 1.2, 'unit': 'um'})
    # tifffile's default for a 3D array without axes: images=16 channels=16, no
    # slices=; one page (truncate) used to be served as a 2D slide of plane 0
    tifffile.imwrite(scopefs.raw / 'ij_noaxes.tif', v, imagej=True, truncate=True)
    with tifffile.TiffFile(scopefs.raw / 'ij_big.tif') as t:
        assert len(t.pages) == 1 and t.series[0].shape == (8, 2, 24, 32)
    with tifffile.TiffFile(scopefs.raw / 'ij_noaxes.tif') as t:
        assert len(t.pages) == 1 and t.series[0].shape == (16, 24, 32)
        assert 'images=16' in t.pages[0].description
        assert 'slices=' not in t.pages[0].description
    m = scopefs.mount(opts=OPTS)
    st = m.status()
    assert os.listdir(m.path('deconvolved')) == ['ij_ok']
    assert len(os.listdir(m.path('deconvolved', 'ij_ok'))) == 16
    assert os.listdir(m.path('registered')) == []
    want = {'short.ome.tif': 'states 16 planes (OME SizeZ=16) but has 10 pages',
            'ij_short.tif': 'states 16 planes (ImageJ slices=16) but has 10 pages',
            'ij_big.tif': 'states 8 planes (ImageJ slices=8) but has 1 page, and it states '
                          'channels=2',
            'ij_noaxes.tif': 'states 16 images (ImageJ images=16) but has 1 page and no '
                             'slices='}
    for name, text in want.items():
        p = problem_for(st, name)
        assert p and name in p['reason'] and text in p['reason'], (name, st['problems'])
    assert len(st['problems']) == 4


def test_imagej_one_ifd_stack_is_read(scopefs):
    """ImageJ's layout for stacks over 4 GiB (one IFD, the planes stored one
    after another after its data; tifffile imagej=True, truncate=True) is a
    stack of its slices= planes, uint16 little-endian and float32 big-endian
    (ImageJ's own byte order).  Oracle: tifffile reads the source as the
    volume written, and scopefs's deconvolved planes equal those of the same
    volume written one page per plane, byte for byte (the same voxels read).
    A file cut short is a problem that says how many planes it holds."""
    meta = {'axes': 'ZYX', 'spacing': 1.2, 'unit': 'um'}
    u16 = gen.beads(16, 40, 48, seed=63)
    f32 = (gen.beads(16, 40, 48, seed=64).astype(np.float32) / 7.0).astype(np.float32)
    vols = {'u16': (u16, '<'), 'f32': (f32, '>')}
    for name, (vol, order) in vols.items():
        tifffile.imwrite(scopefs.raw / ('big_%s.tif' % name), vol, imagej=True,
                         truncate=True, byteorder=order, metadata=meta)
        tifffile.imwrite(scopefs.raw / ('pages_%s.tif' % name), vol, imagej=True,
                         byteorder=order, metadata=meta)
        with tifffile.TiffFile(scopefs.raw / ('big_%s.tif' % name)) as t:
            assert len(t.pages) == 1 and t.byteorder == order
            assert t.imagej_metadata['slices'] == 16
            assert np.array_equal(t.series[0].asarray(), vol)
        with tifffile.TiffFile(scopefs.raw / ('pages_%s.tif' % name)) as t:
            assert len(t.pages) == 16
    cut = scopefs.raw / 'big_cut.tif'
    tifffile.imwrite(cut, u16, imagej=True, truncate=True, metadata=meta)
    with tifffile.TiffFile(cut) as t:
        first = t.pages[0].dataoffsets[0]
    os.truncate(cut, first + 10 * 40 * 48 * 2 + 100)  # 10 whole planes and a piece
    m = scopefs.mount(opts=OPTS)
    st = m.status()
    assert sorted(os.listdir(m.path('deconvolved'))) == ['big_f32', 'big_u16', 'pages_f32',
                                                         'pages_u16']
    assert os.listdir(m.path('registered')) == []
    assert {s['name']: s['planes'] for s in st['stacks']} == {
        'big_f32': 16, 'big_u16': 16, 'pages_f32': 16, 'pages_u16': 16}
    p = problem_for(st, 'big_cut.tif')
    assert p and 'big_cut.tif holds 10 of 16 planes' in p['reason'], st['problems']
    assert len(st['problems']) == 1
    for name, (vol, _) in vols.items():
        planes = sorted(os.listdir(m.path('deconvolved', 'big_' + name)))
        assert planes == sorted(os.listdir(m.path('deconvolved', 'pages_' + name)))
        assert len(planes) == 16
        for z, plane in enumerate(planes):
            with open(m.path('deconvolved', 'big_' + name, plane), 'rb') as f:
                got = f.read()
            with open(m.path('deconvolved', 'pages_' + name, plane), 'rb') as f:
                assert got == f.read(), (name, plane)
            px = tifffile.imread(m.path('deconvolved', 'big_' + name, plane))
            assert px.shape == (40, 48) and px.dtype == vol.dtype
            assert not np.array_equal(px, vol[z])  # deconvolved, not the raw plane


def test_plane_named_folder_is_a_hole(scopefs):
    """A folder named like a plane (z03.tif/) in a plane folder stands where
    a plane would be: the folder is a problem, not a stack with a gap."""
    v = gen.beads(6, 24, 32, seed=62)
    for z in range(6):
        if z == 3:
            os.makedirs(scopefs.raw / 'st' / 'z03.tif')
        else:
            os.makedirs(scopefs.raw / 'st', exist_ok=True)
            tifffile.imwrite(scopefs.raw / 'st' / ('z%02d.tif' % z), v[z], metadata=None)
        os.makedirs(scopefs.raw / 'ok', exist_ok=True)
        tifffile.imwrite(scopefs.raw / 'ok' / ('z%02d.tif' % z), v[z], metadata=None)
    os.makedirs(scopefs.raw / 'ok' / 'notes')  # no image name: not a plane, ignored
    m = scopefs.mount(opts=OPTS)
    st = m.status()
    assert os.listdir(m.path('deconvolved')) == ['ok']
    hole = problem_for(st, 'z03.tif')
    assert hole and 'folder named like a plane' in hole['reason'], st['problems']
    folder = problem_for(st, 'st')
    assert folder and 'some planes are unusable' in folder['reason'], st['problems']
    assert len(st['problems']) == 2

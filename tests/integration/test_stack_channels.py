"""A multichannel OME-TIFF z-stack (SizeC > 1, SizeZ > 1) on a real mount
(docs/dataset.md section 3): each channel is a stack of its own,
deconvolved/<stem>_c<C>/img_000001.tif ..., its planes picked from the
pages by the OME DimensionOrder, and the file is not also a slide; and
the same for an ImageJ hyperstack (channels= and slices= > 1, as Fiji
saves a multichannel z-stack), whose pages are channel fastest.  The
oracle is independent of our page mapping: tifffile writes each channel's
planes as a plain single-channel stack file in another RAW_DIR, and its
deconvolved planes must equal the channel's byte for byte.  Planes are
tiny (2 x 6 x 32 x 32) and numit=1, so each test runs in seconds."""

import os

import numpy as np
import pytest
import tifffile

import gen

OPTS = {'dxy': '0.4', 'dz': '1.2', 'lambda_ex': '561', 'lambda_em': '600', 'numit': '1',
        'threads': '2'}
PLANES = ['img_%06d.tif' % (z + 1) for z in range(6)]


def channels():
    """Two channels of six 32x32 planes each, unlike each other."""
    return np.stack([gen.beads(6, 32, 32, seed=71), gen.beads(6, 32, 32, seed=72)])


def deconvolved(m, stack):
    return [tifffile.imread(m.path('deconvolved', stack, p)) for p in PLANES]


def assert_channel_stacks(scopefs, stem, vol):
    """RAW_DIR's <stem> file, holding vol (C, Z, Y, X), is served as the
    stacks <stem>_c0, <stem>_c1 and not as a slide, each channel deconvolved
    byte for byte as its planes written as a plain single-channel stack file
    in another RAW_DIR (the oracle)."""
    names = ['%s_c%d' % (stem, c) for c in range(len(vol))]
    ref = scopefs.tmp / 'ref'
    ref.mkdir()
    for name, planes in zip(names, vol):
        tifffile.imwrite(ref / (name + '.tif'), planes, metadata=None)
    m = scopefs.mount(opts=OPTS)
    st = m.status()
    assert st['problems'] == []
    assert sorted(os.listdir(m.path('deconvolved'))) == names
    assert sorted((s['name'], s['planes']) for s in st['stacks']) == [(n, 6) for n in names]
    assert not [n for n in os.listdir(m.path('registered')) if n.startswith(stem)]
    r = scopefs.mount(raw=ref, opts=OPTS)
    for c, name in enumerate(names):
        assert sorted(os.listdir(m.path('deconvolved', name))) == PLANES
        got, want = deconvolved(m, name), deconvolved(r, name)
        for z in range(6):
            assert got[z].shape == (32, 32) and got[z].dtype == np.uint16
            assert got[z].tobytes() == want[z].tobytes(), '%s plane %d' % (name, z)
        assert not np.array_equal(got[0], vol[c][0])  # deconvolved, not the raw plane
    # The channels were not mixed: channel 1 is not channel 0.
    assert not np.array_equal(deconvolved(m, names[0])[2], deconvolved(m, names[1])[2])


def assert_own_conf(scopefs, stem, vol):
    """RAW_DIR/<stem>_c1.scopefs.conf sets channel 1's wavelengths only."""
    conf = 'lambda_ex=488\nlambda_em=520\n'
    (scopefs.raw / ('%s_c1.scopefs.conf' % stem)).write_text(conf)
    ref = scopefs.tmp / 'ref'
    ref.mkdir()
    for c in range(2):
        tifffile.imwrite(ref / ('%s_c%d.tif' % (stem, c)), vol[c], metadata=None)
    tifffile.imwrite(ref / 'plain_c1.tif', vol[1], metadata=None)  # no conf: 561/600
    (ref / ('%s_c1.scopefs.conf' % stem)).write_text(conf)
    m = scopefs.mount(opts=OPTS)
    r = scopefs.mount(raw=ref, opts=OPTS)
    for name in ('%s_c0' % stem, '%s_c1' % stem):
        got, want = deconvolved(m, name), deconvolved(r, name)
        assert [g.tobytes() for g in got] == [w.tobytes() for w in want], name
    other = deconvolved(r, 'plain_c1')
    assert deconvolved(m, '%s_c1' % stem)[3].tobytes() != other[3].tobytes()


@pytest.mark.parametrize('axes,order', [('CZYX', 'XYZCT'), ('ZCYX', 'XYCZT')])
def test_each_channel_is_a_stack(scopefs, axes, order):
    vol = channels()  # (C, Z, Y, X)
    data = vol if axes == 'CZYX' else vol.transpose(1, 0, 2, 3)
    tifffile.imwrite(scopefs.raw / 'multi.ome.tif', data, metadata={'axes': axes})
    with tifffile.TiffFile(scopefs.raw / 'multi.ome.tif') as t:
        assert len(t.pages) == 12 and 'DimensionOrder="%s"' % order in t.ome_metadata
    assert_channel_stacks(scopefs, 'multi', vol)


def test_each_channel_takes_its_own_conf(scopefs):
    vol = channels()
    tifffile.imwrite(scopefs.raw / 'multi.ome.tif', vol, metadata={'axes': 'CZYX'})
    assert_own_conf(scopefs, 'multi', vol)


def write_imagej_hyperstack(path, vol):
    """vol (C, Z, Y, X) as Fiji saves a multichannel z-stack: ImageJ
    channels= and slices=, pages channel fastest (tifffile axes ZCYX)."""
    tifffile.imwrite(path, vol.transpose(1, 0, 2, 3), imagej=True, metadata={'axes': 'ZCYX'})
    with tifffile.TiffFile(path) as t:  # the oracle's reading of the file
        assert len(t.pages) == 12 and t.series[0].axes == 'ZCYX'
        assert t.imagej_metadata['channels'] == 2 and t.imagej_metadata['slices'] == 6
        assert np.array_equal(t.series[0].asarray(), vol.transpose(1, 0, 2, 3))


def test_imagej_hyperstack_each_channel_is_a_stack(scopefs):
    """An ImageJ hyperstack (channels=2 slices=6) is split like the OME file,
    not served as a 12-channel 2D slide (measured 2026-11-27)."""
    vol = channels()
    write_imagej_hyperstack(scopefs.raw / 'hyper.tif', vol)
    assert_channel_stacks(scopefs, 'hyper', vol)


def test_imagej_hyperstack_channel_takes_its_own_conf(scopefs):
    vol = channels()
    write_imagej_hyperstack(scopefs.raw / 'hyper.tif', vol)
    assert_own_conf(scopefs, 'hyper', vol)

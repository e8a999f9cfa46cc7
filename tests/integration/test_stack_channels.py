"""A multichannel OME-TIFF z-stack (SizeC > 1, SizeZ > 1) on a real mount
(docs/dataset.md section 3): each channel is a stack of its own,
deconvolved/<stem>_c<C>/img_000001.tif ..., its planes picked from the
pages by the OME DimensionOrder, and the file is not also a slide.  The
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


@pytest.mark.parametrize('axes,order', [('CZYX', 'XYZCT'), ('ZCYX', 'XYCZT')])
def test_each_channel_is_a_stack(scopefs, axes, order):
    vol = channels()  # (C, Z, Y, X)
    data = vol if axes == 'CZYX' else vol.transpose(1, 0, 2, 3)
    tifffile.imwrite(scopefs.raw / 'multi.ome.tif', data, metadata={'axes': axes})
    with tifffile.TiffFile(scopefs.raw / 'multi.ome.tif') as t:
        assert len(t.pages) == 12 and 'DimensionOrder="%s"' % order in t.ome_metadata
    ref = scopefs.tmp / 'ref'
    ref.mkdir()
    for c in range(2):  # the same planes, one plain stack file per channel
        tifffile.imwrite(ref / ('multi_c%d.tif' % c), vol[c], metadata=None)
    m = scopefs.mount(opts=OPTS)
    st = m.status()
    assert st['problems'] == []
    assert sorted(os.listdir(m.path('deconvolved'))) == ['multi_c0', 'multi_c1']
    assert sorted((s['name'], s['planes']) for s in st['stacks']) == [('multi_c0', 6),
                                                                     ('multi_c1', 6)]
    assert not [n for n in os.listdir(m.path('registered')) if n.startswith('multi')]
    r = scopefs.mount(raw=ref, opts=OPTS)
    for c in range(2):
        name = 'multi_c%d' % c
        assert sorted(os.listdir(m.path('deconvolved', name))) == PLANES
        got, want = deconvolved(m, name), deconvolved(r, name)
        for z in range(6):
            assert got[z].shape == (32, 32) and got[z].dtype == np.uint16
            assert got[z].tobytes() == want[z].tobytes(), '%s plane %d' % (name, z)
        assert not np.array_equal(got[0], vol[c][0])  # deconvolved, not the raw plane
    # The channels were not mixed: channel 1 is not channel 0.
    assert not np.array_equal(deconvolved(m, 'multi_c0')[2], deconvolved(m, 'multi_c1')[2])


def test_each_channel_takes_its_own_conf(scopefs):
    """RAW_DIR/<stem>_c1.scopefs.conf sets channel 1's wavelengths only."""
    vol = channels()
    tifffile.imwrite(scopefs.raw / 'multi.ome.tif', vol, metadata={'axes': 'CZYX'})
    conf = 'lambda_ex=488\nlambda_em=520\n'
    (scopefs.raw / 'multi_c1.scopefs.conf').write_text(conf)
    ref = scopefs.tmp / 'ref'
    ref.mkdir()
    tifffile.imwrite(ref / 'multi_c0.tif', vol[0], metadata=None)
    tifffile.imwrite(ref / 'multi_c1.tif', vol[1], metadata=None)
    tifffile.imwrite(ref / 'plain_c1.tif', vol[1], metadata=None)  # no conf: 561/600
    (ref / 'multi_c1.scopefs.conf').write_text(conf)
    m = scopefs.mount(opts=OPTS)
    r = scopefs.mount(raw=ref, opts=OPTS)
    for name in ('multi_c0', 'multi_c1'):
        got, want = deconvolved(m, name), deconvolved(r, name)
        assert [g.tobytes() for g in got] == [w.tobytes() for w in want], name
    other = deconvolved(r, 'plain_c1')
    assert deconvolved(m, 'multi_c1')[3].tobytes() != other[3].tobytes()

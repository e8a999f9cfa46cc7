"""OME-TIFFs whose pages are not all channels of one image, on a real mount
(docs/dataset.md section 2.1 and 3), with tifffile as the oracle:

- two RGB brightfield Images of one size in one file (tifffile: two series
  of (H, W, 3)): registered/ serves Image 0 alone, one RGB page, SizeC=3,
  not Image 1 as a second RGB channel;
- a time-lapse (tifffile axes TCYX, SizeT=3, SizeC=2) and an ImageJ
  hyperstack with frames=3 and channels=2 are problems naming the file and
  the time points, like a time-series stack file, not slides whose time
  points are extra channels; the same file with SizeT=1 is a slide of 2
  named channels.

Images are small (at most 300x400), so the file runs in seconds."""

import os
import re

import numpy as np
import tifffile

import gen
from test_stack_inputs import problem_for


def test_rgb_images_are_not_channels(scopefs):
    a, b = gen.rgb_tissue(300, 400, seed=1), gen.rgb_tissue(300, 400, seed=2)
    with tifffile.TiffWriter(scopefs.raw / 'he.ome.tif', ome=True) as tw:
        tw.write(a, photometric='rgb', tile=(128, 128), metadata={'axes': 'YXS'})
        tw.write(b, photometric='rgb', tile=(128, 128), metadata={'axes': 'YXS'})
    with tifffile.TiffFile(scopefs.raw / 'he.ome.tif') as tf:
        assert [s.shape for s in tf.series] == [(300, 400, 3)] * 2
        assert re.search(r'SizeC="3"', tf.ome_metadata)
    m = scopefs.mount(opts={'reg': 'off'})
    assert m.status()['problems'] == []
    with tifffile.TiffFile(m.path('registered', 'he.ome.tif')) as tf:
        assert len(tf.pages) == 1, 'Image 1 of the source was served as a second RGB channel'
        assert re.search(r'SizeC="(\d+)"', tf.ome_metadata).group(1) == '3'
        got = tf.series[0].asarray()
    assert got.shape == (300, 400, 3)
    assert np.array_equal(got, a)


def test_time_series_is_a_problem_not_a_slide(scopefs):
    t = gen.tissue(60, 80, channels=6, seed=1).reshape(3, 2, 60, 80)
    names = {'Channel': {'Name': ['DAPI', 'GFP']}}
    tifffile.imwrite(scopefs.raw / 'tl.ome.tif', t, tile=(32, 32),
                     metadata=dict(axes='TCYX', **names))
    tifffile.imwrite(scopefs.raw / 'ij_tl.tif', t, imagej=True, metadata={'axes': 'TCYX'})
    tifffile.imwrite(scopefs.raw / 'c2.ome.tif', t[0], tile=(32, 32),
                     metadata=dict(axes='CYX', **names))
    with tifffile.TiffFile(scopefs.raw / 'tl.ome.tif') as tf:
        assert tf.series[0].axes == 'TCYX' and tf.series[0].shape == (3, 2, 60, 80)
    with tifffile.TiffFile(scopefs.raw / 'ij_tl.tif') as tf:
        assert tf.imagej_metadata['frames'] == 3 and tf.imagej_metadata['channels'] == 2
    m = scopefs.mount(opts={'reg': 'off'})
    st = m.status()
    assert sorted(os.listdir(m.path('registered'))) == ['c2.ome.tif']
    ome = problem_for(st, 'tl.ome.tif')
    assert ome and 'tl.ome.tif is a time series (SizeT=3)' in ome['reason'], st['problems']
    assert 'registered/' in ome['reason']
    ij = problem_for(st, 'ij_tl.tif')
    assert ij and 'ij_tl.tif is a time series (frames=3)' in ij['reason'], st['problems']
    assert len(st['problems']) == 2
    assert 'time series' in m.log_text()
    with tifffile.TiffFile(m.path('registered', 'c2.ome.tif')) as tf:
        assert re.findall(r'<Channel [^>]*Name="([^"]*)"', tf.ome_metadata) == ['DAPI', 'GFP']
        assert np.array_equal(tf.series[0].asarray(), t[0])

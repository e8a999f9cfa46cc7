"""registered/ slides with many channels (cyclic immunofluorescence: 40+).

A unit of a registered file used to be one tile position with every
channel: 21 MB for 40 uint16 channels of 512 x 512.  A reader that goes
page by page (tifffile, libvips, Bio-Formats: channel after channel) touches
every tile position once per channel; with `mem` holding only a few such
units, each page read decoded every unit again from the disk cache (40
channels: 13-19 s against 1 s for `cp`).  Now a unit holds at most 4 MiB
of pages (docs/virtual-tiff.md, "Units and the engine"), so one channel's
pass keeps its units in RAM and the next seven channels find them there.

Oracles: tifffile's read of the source slides (the reference re-tiled
unchanged at level 0; the moving slide shifted by whole pixels, so bilinear
is exact), and counts from .scopefs/status (units computed and loaded from
disk), not times.
"""

import json

import numpy as np
import tifffile

import gen

C = 40
H, W = 1100, 1100
SHIFT_X, SHIFT_Y = 7, -5  # backward map: source = output + shift
TILE = 512


def write_slides(raw, tfd):
    rng = np.random.default_rng(40)
    ref = rng.integers(0, 65535, (C, H, W), dtype=np.uint16)
    mov = rng.integers(0, 65535, (C, H, W), dtype=np.uint16)
    names = ['marker%02d' % c for c in range(C)]
    gen.write_ome(raw / 'ref.ome.tif', [ref[..., None]], names=names, tile=256,
                  compression='zlib')
    gen.write_ome(raw / 'mov.ome.tif', [mov[..., None]], names=names, tile=256,
                  compression='zlib')
    doc = {'scopefs_transform': 1,
           'matrix': [[1.0, 0.0, float(SHIFT_X)], [0.0, 1.0, float(SHIFT_Y)]]}
    (tfd / 'mov.json').write_text(json.dumps(doc))
    return ref, mov


def shifted(mov):
    """Output pixel (y, x) = source (y + SHIFT_Y, x + SHIFT_X), 0 outside."""
    out = np.zeros_like(mov)
    ys = slice(max(0, -SHIFT_Y), min(H, H - SHIFT_Y))
    xs = slice(max(0, -SHIFT_X), min(W, W - SHIFT_X))
    out[:, ys, xs] = mov[:, ys.start + SHIFT_Y:ys.stop + SHIFT_Y,
                         xs.start + SHIFT_X:xs.stop + SHIFT_X]
    return out


def test_channel_by_channel_reads_load_each_unit_about_once(scopefs, tmp_path):
    tfd = tmp_path / 'tf'
    tfd.mkdir()
    ref, mov = write_slides(scopefs.raw, tfd)
    # mem=64M: 3 units of all 40 channels (21 MB each) fit, 9 positions do not.
    m = scopefs.mount(opts={'reg': 'off', 'reference': 'ref', 'transforms': str(tfd),
                            'mem': '64M', 'readahead': '0'})
    got_ref = tifffile.imread(m.path('registered', 'ref.ome.tif'))
    got_mov = tifffile.imread(m.path('registered', 'mov.ome.tif'))
    assert got_ref.shape == (C, H, W)
    assert np.array_equal(got_ref, ref)
    assert np.array_equal(got_mov, shifted(mov))

    st = m.status()
    # Level 0 of each file: 3 x 3 positions; 40 pages of 512 KiB in units of
    # at most 4 MiB are 5 units of 8 pages each: 45 units a file.
    units = 2 * 9 * 5
    loads = st['tiles_computed'] + st['disk_hits']
    # Before: a unit of all 40 channels, loaded again for every channel
    # (9 positions x 40 pages x 2 files: 720 loads).
    assert loads <= 2 * units, st


def test_cp_gives_the_same_bytes_as_page_reads(scopefs, tmp_path):
    tfd = tmp_path / 'tf'
    tfd.mkdir()
    ref, mov = write_slides(scopefs.raw, tfd)
    m = scopefs.mount(opts={'reg': 'off', 'reference': 'ref', 'transforms': str(tfd)})
    copy = tmp_path / 'copy.ome.tif'
    with open(m.path('registered', 'mov.ome.tif'), 'rb') as f:
        copy.write_bytes(f.read())
    with tifffile.TiffFile(copy) as tf:
        assert len(tf.series[0].levels[0].pages) == C
        assert np.array_equal(tf.series[0].levels[0].asarray(), shifted(mov))
        names = [c.get('Name') for c in
                 tifffile.xml2dict(tf.ome_metadata)['OME']['Image']['Pixels']['Channel']]
        assert names == ['marker%02d' % c for c in range(C)]

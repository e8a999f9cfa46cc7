"""Registering slides whose pixel sizes differ more than the thumbnails can absorb.

- A moving slide at 2x coarser pixels than the reference (20x IF rounds
  against a 40x H&E reference: 1.0 against 0.5 um, both in the metadata)
  was refused at the default options, 'no convincing match (NCC 0.04)':
  the moving thumbnail is made at the pixel size closest to the
  reference's, but cannot be finer than the slide itself, so the pair's
  thumbnails stayed 2x apart in scale, beyond the similarity search's
  1.6x.  Now the reference's thumbnail is remade for that pair at the
  moving slide's pixel size.  A 2x finer slide (which can always be shrunk
  to the reference's pixels) must keep working.
- A slide with no pixel size, whose fit scales it by 1.54, was refused with
  '(pixel sizes say 1.00)', as if its metadata said so; the message now
  says which slide's pixel size is unknown and how to state it.

The oracle is the known map: reg_pairs renders both scans from one
synthetic tissue (nuclei, stroma, holes) through it, resampling with
scipy, and the TRE is measured through the transform file (matrix and
field) at landmarks on the tissue.  (gen.tissue's smooth blobs register
even 2x apart: they carry too little fine structure to show the gap.)"""
import json

import numpy as np
import pytest
import tifffile

import gen
import reg_pairs as rp
from test_register_status import wait_registered

W, H = 1024, 896  # the reference, 0.5 um


def write_pair(raw, seed, scale, deg, shift, mov_pixel_size, mov_levels):
    """ref.ome.tif (0.5 um) and mov.ome.tif, a scan of the same tissue turned
    by deg whose pixels are 1/scale the reference's (scale: moving px per
    reference px).  Returns the pair (its truth) and landmarks on the tissue."""
    rng = np.random.default_rng(seed)
    world = rp.SlideWorld(rng, int(H * 1.6), int(W * 1.6), fill=0.42)
    origin = ((world.w - W) // 2, (world.h - H) // 2)
    gen.write_ome(raw / 'ref.ome.tif', gen.pyramid(gen.norm(rp.render_fluorescence(
        world.crop(*origin, W, H), rng)), 3), ['DAPI', 'CD45'], 0.5)
    pair = rp.make_slide_pair(rng, world, (W, H), origin, (int(W * scale), int(H * scale)),
                              np.radians(deg), scale, False, shift)
    gen.write_ome(raw / 'mov.ome.tif', gen.pyramid(gen.norm(rp.render_fluorescence(
        pair.moving_stains(), rng)), mov_levels), ['DAPI', 'CD45'], mov_pixel_size)
    return pair, pair.landmarks(rng, 60, margin=12)


def tre_moving_px(m, pair, marks):
    """TRE (moving px) of transforms/mov.json, matrix and field, at marks."""
    doc = json.loads((m.mnt / 'transforms' / 'mov.json').read_text())
    field = None
    if doc.get('field'):
        field = tifffile.imread(m.mnt / 'transforms' / doc['field']['file'])
    got = rp.apply_transform_json(doc, marks, field)
    return np.hypot(*(got - pair.truth(marks)).T)


# (seed, scale, turn, shift, moving pixel size, its levels; TRE bounds in moving px)
SCANS = {
    'coarser_2x': (5, 0.5, 25.0, (5.0, 10.0), 1.0, 2, 0.25, 1.0),
    # the fine scan's px are half the reference's: 1 moving px is 0.5 reference px
    'finer_2x': (6, 2.0, -15.0, (-20.0, 12.0), 0.25, 4, 0.5, 2.0),
}


@pytest.mark.parametrize('case', sorted(SCANS))
def test_scan_2x_apart_registers_at_default_options(scopefs, case):
    seed, scale, deg, shift, um, levels, median_max, tre_max = SCANS[case]
    pair, marks = write_pair(scopefs.raw, seed, scale, deg, shift, um, levels)
    m = scopefs.mount(opts={'reference': 'ref', 'reg_eager': '1'})
    state = wait_registered(m)['mov']
    assert state.startswith('served'), state
    assert 'scale %.3f' % scale in state, state
    tre = tre_moving_px(m, pair, marks)
    assert np.median(tre) < median_max and tre.max() < tre_max, (np.median(tre), tre.max())


def test_unknown_pixel_size_is_named_in_the_refusal(scopefs):
    scale = 0.5 / 0.325  # really 0.325 um, stated nowhere
    write_pair(scopefs.raw, 5, scale, 20.0, (15.0, 10.0), None, 4)
    m = scopefs.mount(opts={'reference': 'ref', 'reg_eager': '1'})
    state = wait_registered(m)['mov']
    assert state.startswith('not served: rejected: the transform scales the slide by 1.54'), \
        state
    assert 'pixel sizes say' not in state, state
    assert "mov.ome.tif's pixel size is unknown, so 1.00 was expected" in state, state
    assert 'PhysicalSizeX' in state and 'transform file' in state, state

"""qc/<stem>.png on a real mount: registration overlays (issue #3).

The PNGs are decoded with Pillow and compared with overlays computed here
from the source arrays (numpy only, no scopefs code): the registered level is
the box-reduced source level, the registration channel is the one named DAPI
(or the inverted luminance of an RGB slide), and each side is stretched from
its 1st to its 99th percentile (np.percentile) to 0..255.  The reference is
magenta (R and B), the warped slide green (G).
"""

import json
import os
import time

import numpy as np
import pytest
import tifffile
from PIL import Image

import gen
from conftest import read_all

NAMES = ['CD3', 'DAPI', 'CD8']
REG = 1  # index of DAPI


def write_transform(folder, stem, matrix):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, stem + '.json'), 'w') as f:
        json.dump({'scopefs_transform': 1, 'matrix': matrix}, f)


def stretch(plane):
    """The oracle's contrast stretch: 1st..99th percentile to 0..255."""
    v = plane.astype(np.float64)
    lo, hi = np.percentile(v, 1), np.percentile(v, 99)
    return np.clip(np.round((v - lo) * 255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def decode(path):
    data = read_all(path)
    assert os.stat(path).st_size == len(data)
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    img = Image.open(path)
    assert img.mode == 'RGB'
    return np.asarray(img)


def settled(m, timeout=10.0):
    """The status once no unit is queued or computing (read-ahead done)."""
    deadline = time.monotonic() + timeout
    while True:
        st = m.status()
        if st['in_flight'] == 0 or time.monotonic() > deadline:
            return st
        time.sleep(0.05)


def close(ours, want, what):
    """Within 1 grey level everywhere (percentiles come from a histogram)."""
    diff = np.abs(ours.astype(int) - want.astype(int))
    assert diff.max() <= 1, '%s: max diff %d at %s' % (
        what, diff.max(), np.unravel_index(diff.argmax(), diff.shape))


@pytest.fixture(scope='module')
def fluo(tmp_path_factory):
    """A 2200 x 1300, 3-channel uint16 slide with 3 pyramid levels."""
    a = gen.norm(gen.tissue(1300, 2200, channels=3, seed=5))
    return gen.pyramid(a, 3)


def test_identity_is_grey_and_shift_is_not(scopefs, tmp_path, fluo):
    raw = scopefs.raw
    for name in ('ref', 'same', 'shifted'):
        gen.write_ome(str(raw / (name + '.ome.tif')), fluo, names=NAMES)
    tdir = tmp_path / 'transforms'
    write_transform(tdir, 'same', [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    # src = X + (64, 32): at level 1 exactly (32, 16) pixels.
    write_transform(tdir, 'shifted', [[1, 0, 64], [0, 1, 32], [0, 0, 1]])
    m = scopefs.mount(opts={'transforms': str(tdir), 'reference': 'ref'})

    assert sorted(os.listdir(m.path('qc'))) == ['same.png', 'shifted.png']
    # 2200 x 1300 does not fit 2000: level 1 (1100 x 650) does.
    level1 = fluo[1][REG, :, :, 0]
    assert level1.shape == (650, 1100)
    want_ref = stretch(level1)

    same = decode(m.path('qc', 'same.png'))
    assert same.shape == (650, 1100, 3)
    assert np.array_equal(same[..., 0], same[..., 2])
    assert np.array_equal(same[..., 0], same[..., 1]), 'identity overlay is not grey'
    close(same[..., 0], want_ref, 'reference (magenta)')

    shifted = decode(m.path('qc', 'shifted.png'))
    assert np.array_equal(shifted[..., 0], same[..., 0])
    moved = np.zeros_like(level1)  # background 0 outside the moving slide
    moved[:650 - 16, :1100 - 32] = level1[16:, 32:]
    close(shifted[..., 1], stretch(moved), 'warped (green)')
    inside = np.s_[:600, :1050]
    mad = np.abs(shifted[..., 0].astype(int) - shifted[..., 1].astype(int))[inside].mean()
    assert mad > 10, 'misregistered overlay looks aligned (mean |R - G| = %.1f)' % mad


def test_overlay_shows_reg_channel(scopefs, tmp_path, fluo):
    """reg_channel=CD8 names the channel the registration and the overlay
    use, also for a slide warped through a transform file; a slide without
    that channel shows the default (DAPI).  The overlay used to show DAPI
    whatever reg_channel said, so a CyCIF round registered on DNA_1 looked
    misregistered in qc/."""
    raw = scopefs.raw
    cd8 = NAMES.index('CD8')
    for name in ('ref', 'same'):
        gen.write_ome(str(raw / (name + '.ome.tif')), fluo, names=NAMES)
    gen.write_ome(str(raw / 'other.ome.tif'), fluo, names=['CD3', 'DAPI', 'CD20'])
    tdir = tmp_path / 'transforms'
    for name in ('same', 'other'):
        write_transform(tdir, name, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    m = scopefs.mount(opts={'transforms': str(tdir), 'reference': 'ref',
                            'reg_channel': 'CD8'})
    same = decode(m.path('qc', 'same.png'))
    close(same[..., 0], stretch(fluo[1][cd8, :, :, 0]), 'reference CD8 (magenta)')
    close(same[..., 1], stretch(fluo[1][cd8, :, :, 0]), 'moving CD8 (green)')
    other = decode(m.path('qc', 'other.png'))
    close(other[..., 0], stretch(fluo[1][cd8, :, :, 0]), 'reference CD8 (magenta)')
    close(other[..., 1], stretch(fluo[1][REG, :, :, 0]), 'no CD8: DAPI (green)')


def test_tiles_shared_with_registered_and_size_stable(scopefs, tmp_path, fluo):
    raw = scopefs.raw
    for name in ('ref', 'mov'):
        gen.write_ome(str(raw / (name + '.ome.tif')), fluo, names=NAMES)
    tdir = tmp_path / 'transforms'
    write_transform(tdir, 'mov', [[1, 0, 10], [0, 1, -6], [0, 0, 1]])
    m = scopefs.mount(opts={'transforms': str(tdir), 'reference': 'ref'})

    # Level 1 of both registered files first: the overlay then computes nothing.
    for name in ('ref', 'mov'):
        with tifffile.TiffFile(m.path('registered', name + '.ome.tif')) as t:
            t.series[0].levels[1].asarray()
    computed = settled(m)['tiles_computed']
    assert computed >= 12  # 3 x 2 tiles of 1100 x 650, twice
    size = os.stat(m.path('qc', 'mov.png')).st_size
    first = read_all(m.path('qc', 'mov.png'))
    assert len(first) == size < 5 << 20
    assert m.status()['tiles_computed'] == computed
    assert read_all(m.path('qc', 'mov.png')) == first
    assert os.stat(m.path('qc', 'mov.png')).st_size == size


def test_rgb_small_slide_uses_level0_luminance(scopefs, tmp_path):
    rgb = gen.norm(gen.rgb_tissue(700, 900, seed=3), rgb=True)
    levels = gen.pyramid(rgb, 2)
    for name in ('he', 'he2'):
        gen.write_ome(str(scopefs.raw / (name + '.ome.tif')), levels)
    tdir = tmp_path / 'transforms'
    write_transform(tdir, 'he2', [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    m = scopefs.mount(opts={'transforms': str(tdir), 'reference': 'he'})

    img = decode(m.path('qc', 'he2.png'))
    assert img.shape == (700, 900, 3)
    assert np.array_equal(img[..., 0], img[..., 1])
    px = rgb[0].astype(np.float32)
    grey = -(0.299 * px[..., 0] + 0.587 * px[..., 1] + 0.114 * px[..., 2])
    close(img[..., 0], stretch(grey), 'RGB reference (inverted luminance)')


def test_no_qc_without_moving_slides(scopefs, fluo):
    gen.write_ome(str(scopefs.raw / 'ref.ome.tif'), fluo, names=NAMES)
    gen.write_ome(str(scopefs.raw / 'other.ome.tif'), fluo, names=NAMES)
    m = scopefs.mount(opts={'reg': 'off'})  # no transforms=, reg=off: only the reference
    assert len(os.listdir(m.path('registered'))) == 1
    assert not os.path.exists(m.path('qc'))

"""Reduced levels of registered/ made from source pyramids that are not a
clean chain of halvings, and interp=nearest on label masks.

The reference slide's output level l (a 2^l downsample) must come from a
source level that is exactly a 2^k downsample and covers the level; Aperio
/4 levels rounded down and /3 steps are not.  Oracles are numpy only
(gen.box_reduce: k x k means over in-image pixels, integers rounded half up,
the rounding docs/virtual-tiff.md states), exact for integers.  With
interp=nearest every reduced level must be a subsample of level 0: the
reference picks the sample nearest each box centre (index l*k + k/2, clamped
into the image), a moving slide the sample nearest each output pixel's
centre under the warp's level map (docs/transforms.md)."""

import json

import numpy as np
import pytest
import tifffile

import gen


def served_levels(m, stem):
    return gen.read_levels(m.path('registered', stem + '.ome.tif'))


def assert_same(got, want, what):
    assert got.shape == want.shape, '%s: shape %s, expected %s' % (what, got.shape, want.shape)
    bad = np.argwhere(got != want)
    assert bad.size == 0, '%s: %d pixels differ, first at (c,y,x,s)=%s: %s != %s' % (
        what, len(bad), tuple(bad[0]), got[tuple(bad[0])], want[tuple(bad[0])])


def floor_level(a, k):
    """A scanner-style level rounded DOWN: k x k means of whole boxes only
    (Aperio), so the last partial box column/row is dropped."""
    c, h, w, s = a.shape
    h, w = h // k, w // k
    full = a[:, :h * k, :w * k].reshape(c, h, k, w, k, s).astype(np.float64)
    return np.floor(full.mean(axis=(2, 4)) + 0.5).astype(a.dtype)


def test_svs_floor_4x_levels_have_no_black_edge(scopefs):
    # Aperio SVS 2003x1601 -> 500x400 -> 125x100: output level 2 is the /4
    # level as stored (500x400, as OpenSlide shows it), not 501x401 with a
    # last column and row read past its edge.
    img = gen.rgb_tissue(1601, 2003, seed=41)
    a = gen.norm(img, rgb=True)
    desc = ('Aperio Image Library v12.0.5\r\n2003x1601 (256x256) RGB|AppMag = 40|'
            'MPP = 0.2520')
    with tifffile.TiffWriter(scopefs.raw / 'a.svs') as t:
        kw = dict(photometric='rgb', compression='zlib')
        t.write(img, tile=(256, 256), description=desc, **kw)
        t.write(floor_level(a, 16)[0], description='thumb', **kw)
        t.write(floor_level(a, 4)[0], tile=(256, 256), **kw)
        t.write(floor_level(a, 16)[0], tile=(256, 256), **kw)
    m = scopefs.mount(opts={'reg': 'off'})
    got = served_levels(m, 'a')
    assert [g.shape[1:3] for g in got] == [(1601, 2003), (801, 1002), (400, 500)]
    assert_same(got[0], a, 'level 0')
    assert_same(got[1], gen.box_reduce(a, 2), 'level 1')
    assert_same(got[2], floor_level(a, 4), 'level 2 (the /4 level as stored)')


@pytest.mark.parametrize('h, w, sizes, copied', [
    # 2051 / 4 = 512 is one short of ceil(ceil(2051 / 2) / 2) = 513: output
    # level 2 takes the SubIFD's own size and is that SubIFD.
    (1031, 2051, [(1031, 2051), (516, 1026), (257, 512)], True),
    # 2050 / 4 = 512 halves output level 1 (1025): level 2 is that SubIFD.
    (1030, 2050, [(1030, 2050), (515, 1025), (257, 512)], True),
])
def test_subifd_floor_4x_levels(scopefs, h, w, sizes, copied):
    # OME SubIFDs at /4 rounded down, 2 uint16 channels.
    a = gen.norm(gen.tissue(h, w, 2, np.uint16, seed=42))
    sub = floor_level(a, 4) ^ 1  # marked: a copy is told apart from a recomputation
    gen.write_ome(scopefs.raw / 's.ome.tif', [a, sub], ['A', 'B'], 0.5)
    m = scopefs.mount(opts={'reg': 'off'})
    got = served_levels(m, 's')
    assert [g.shape[1:3] for g in got] == sizes
    for level in range(len(sizes)):
        want = sub if copied and level == 2 else gen.box_reduce(a, 2**level)
        assert_same(got[level], want, 'level %d' % level)


def test_ceil_4x_level_is_copied(scopefs):
    # The same /4 step rounded UP (501x401) is exactly output level 2: served
    # as stored.  The stored level is marked (low bit flipped) so a copy is
    # told apart from a recomputation.
    a = gen.norm(gen.tissue(1601, 2003, 1, np.uint8, seed=43))
    l2 = gen.box_reduce(a, 4) ^ 1
    with tifffile.TiffWriter(scopefs.raw / 'c.tif') as t:
        for lv in (a, l2):
            t.write(lv[0, :, :, 0], tile=(256, 256), metadata=None)
    m = scopefs.mount(opts={'reg': 'off'})
    got = served_levels(m, 'c')
    assert len(got) == 3
    assert_same(got[1], gen.box_reduce(a, 2), 'level 1')
    assert_same(got[2], l2, 'level 2 (copied)')


def write_pages(path, levels):
    with tifffile.TiffWriter(path) as t:
        for lv in levels:
            t.write(lv[0, :, :, 0], tile=(256, 256), metadata=None)


def test_power_of_three_steps(scopefs, tmp_path):
    # W, W/3, W/9 as main-chain pages (uint8) and as SubIFDs (uint16): never
    # read as 4x or 8x levels; every output level is a box mean of level 0.
    a8 = gen.norm(gen.tissue(1800, 2304, 1, np.uint8, seed=44))
    write_pages(scopefs.raw / 'p3.tif', [a8, floor_level(a8, 3), floor_level(a8, 9)])
    a16 = gen.norm(gen.tissue(1800, 2304, 1, np.uint16, seed=45))
    raw2 = tmp_path / 'raw2'
    raw2.mkdir()
    gen.write_ome(raw2 / 'q3.ome.tif', [a16, floor_level(a16, 3), floor_level(a16, 9)], ['Q'],
                  0.5)
    for raw, stem, a in ((None, 'p3', a8), (raw2, 'q3', a16)):
        got = served_levels(scopefs.mount(raw=raw, opts={'reg': 'off'}), stem)
        assert len(got) == 4
        for level in range(4):
            assert_same(got[level], gen.box_reduce(a, 2**level), '%s level %d' % (stem, level))


def pick_index(n_src, n_out, k):
    """Reference rule: the sample nearest box i's centre, clamped into the image."""
    return np.minimum(np.arange(n_out) * k + k // 2, n_src - 1)


def warp_nearest_index(n_out, k):
    """Moving slide, identity transform: output level l is exactly a k = 2^l
    downsample (docs/transforms.md, "Pyramid levels"), so output pixel i's
    centre in level-0 pixels is (i + 0.5) * k - 0.5, and nearest takes
    floor(c + 0.5) = i * k + k // 2.  Unclamped: a centre past the source's
    last pixel samples outside it (background)."""
    return np.arange(n_out) * k + k // 2


def test_nearest_keeps_labels(scopefs, tmp_path):
    # Per-pixel random labels (uint16), odd sizes: any averaging, or any
    # other index rule, shows up.  a_lab is the reference, b_lab moves by the
    # identity; both must serve subsamples of level 0 at every level.
    h, w = 1099, 1301
    labels = np.array([0, 3, 1000, 65535], np.uint16)
    rng = np.random.default_rng(46)
    lab_a = labels[rng.integers(0, 4, (h, w))]
    lab_b = labels[rng.integers(0, 4, (h, w))]
    tifffile.imwrite(scopefs.raw / 'a_lab.tif', lab_a, tile=(256, 256), metadata=None)
    tifffile.imwrite(scopefs.raw / 'b_lab.tif', lab_b, tile=(256, 256), metadata=None)
    tf = tmp_path / 'tf'
    tf.mkdir()
    (tf / 'b_lab.json').write_text(json.dumps(
        {'scopefs_transform': 1, 'matrix': [[1, 0, 0], [0, 1, 0]]}))
    m = scopefs.mount(opts={'reg': 'off', 'interp': 'nearest', 'reference': 'a_lab',
                            'transforms': str(tf)})
    ref, mov = served_levels(m, 'a_lab'), served_levels(m, 'b_lab')
    assert [g.shape[1:3] for g in ref] == [(1099, 1301), (550, 651), (275, 326)]
    for level, got in enumerate(ref):
        assert set(np.unique(got).tolist()) <= set(labels.tolist()), 'ref level %d' % level
        k = 2**level
        want = lab_a[np.ix_(pick_index(h, got.shape[1], k), pick_index(w, got.shape[2], k))]
        assert_same(got[0, :, :, 0], want, 'reference level %d' % level)
    for level, got in enumerate(mov):
        assert set(np.unique(got).tolist()) <= set(labels.tolist()), 'moving level %d' % level
        iy = warp_nearest_index(got.shape[1], 2**level)
        ix = warp_nearest_index(got.shape[2], 2**level)
        want = lab_b[np.ix_(np.minimum(iy, h - 1), np.minimum(ix, w - 1))]
        want[iy >= h, :] = 0
        want[:, ix >= w] = 0
        assert_same(got[0, :, :, 0], want, 'moving level %d' % level)


def test_bilinear_reference_keeps_box_means(scopefs):
    # The default interp (bilinear) still box-averages the reference's
    # reduced levels of the same label-like image: a value between labels.
    h, w = 1099, 1301
    lab = np.where((np.arange(h)[:, None] + np.arange(w)[None, :]) % 2 == 0, 0, 200)
    lab = lab.astype(np.uint8)
    tifffile.imwrite(scopefs.raw / 'a_lab.tif', lab, tile=(256, 256), metadata=None)
    m = scopefs.mount(opts={'reg': 'off'})
    got = served_levels(m, 'a_lab')
    for level in range(1, len(got)):
        assert_same(got[level], gen.box_reduce(gen.norm(lab), 2**level), 'level %d' % level)
    assert 100 in np.unique(got[1])

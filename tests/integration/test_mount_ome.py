"""registered/<stem>.ome.tif against independent readers.

For sources of several kinds (OME pyramids written by tifffile with all,
fewer or no reduced levels; uint8, uint16, float32, RGB; odd sizes; one
pixel; a libvips pyramid; a flat strip TIFF) the virtual file is read by
tifffile, libvips, tiffinfo and (for 8-bit RGB) OpenSlide, and every level of
every channel is compared with the source's own levels as tifffile reads them,
or with numpy box averages of them where the source has no such level."""

import os
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import tifffile

import gen

NAMES4 = ['DAPI', 'CD3', 'CD8', 'PanCK']


def src_ome4(raw, tmp):
    a = gen.norm(gen.tissue(2600, 2100, 4, seed=11))
    gen.write_ome(raw / 'ome4.ome.tif', gen.pyramid(a, 4), NAMES4, 0.5)
    return 'ome4', NAMES4, 0.5


def src_fewer_levels(raw, tmp):
    # The source stops at level 1; scopefs' levels 2 and 3 are box averages.
    a = gen.norm(gen.tissue(2000, 3000, 3, seed=12))
    gen.write_ome(raw / 'fewer.ome.tiff', gen.pyramid(a, 2), NAMES4[:3], 0.325, tile=512,
                  compression='zlib')
    return 'fewer', NAMES4[:3], 0.325


def src_uint8_odd(raw, tmp):
    a = gen.norm(gen.tissue(777, 1000, 1, np.uint8, seed=13))
    gen.write_ome(raw / 'odd8.ome.tif', gen.pyramid(a, 2), ['Gray'], 0.25, tile=128)
    return 'odd8', ['Gray'], 0.25


def src_float32(raw, tmp):
    a = gen.norm(gen.tissue(1100, 1301, 2, np.float32, seed=14))
    gen.write_ome(raw / 'flt.ome.tif', [a], ['Ch0', 'Ch1'], 1.0)
    return 'flt', ['Ch0', 'Ch1'], 1.0


def src_rgb(raw, tmp):
    a = gen.norm(gen.rgb_tissue(1500, 1100, seed=15), rgb=True)
    gen.write_ome(raw / 'he.ome.tif', gen.pyramid(a, 2), None, 0.5, compression='zlib')
    return 'he', None, 0.5


def src_one_pixel(raw, tmp):
    a = gen.norm(np.array([[4321]], np.uint16))
    gen.write_ome(raw / 'dot.ome.tif', [a], ['Only'], 0.5, tile=None)
    return 'dot', ['Only'], 0.5


def src_vips(raw, tmp):
    a = gen.norm(gen.tissue(1300, 1700, 1, np.uint16, seed=16))
    gen.write_vips_pyramid(str(raw / 'vipsp.tif'), a, str(tmp))
    return 'vipsp', None, None


def src_flat_strips(raw, tmp):
    a = gen.norm(gen.tissue(1500, 2000, 1, np.uint16, seed=17))
    gen.write_flat_strips(raw / 'flat.tiff', a)
    return 'flat', None, None


SOURCES = [src_ome4, src_fewer_levels, src_uint8_odd, src_float32, src_rgb, src_one_pixel,
           src_vips, src_flat_strips]

OME_TYPES = {'uint8': 'uint8', 'uint16': 'uint16', 'float32': 'float'}


def source_file(raw):
    (f,) = [p for p in raw.iterdir() if p.is_file()]
    return f


def assert_level_equal(got, want, what, src_has_level):
    assert got.shape == want.shape, '%s: shape %s, expected %s' % (what, got.shape, want.shape)
    assert got.dtype == want.dtype, '%s: dtype %s, expected %s' % (what, got.dtype, want.dtype)
    if got.dtype.kind == 'f' and not src_has_level:
        # A computed float mean: summation order may differ in the last bit.
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7, err_msg=what)
    else:
        bad = np.argwhere(got != want)
        assert bad.size == 0, '%s: %d pixels differ, first at (c,y,x,s)=%s: %s != %s' % (
            what, len(bad), tuple(bad[0]), got[tuple(bad[0])], want[tuple(bad[0])])


def check_tifffile(path, src_levels, expect, stem, names, pixel_size):
    rgb = expect[0].shape[3] == 3
    c = expect[0].shape[0]
    with tifffile.TiffFile(path) as tf:
        assert not tf.is_bigtiff
        assert tf.is_ome
        p0 = tf.pages[0]
        assert p0.is_tiled and p0.tilewidth == 512 and p0.tilelength == 512
        assert p0.compression == 1
        assert len(tf.pages) == c, 'one main-chain page per channel'
        for page in tf.pages:
            assert len(page.subifds or ()) == len(expect) - 1
        series = tf.series[0]
        assert len(series.levels) == len(expect), 'level count'
        for level, lv in enumerate(series.levels):
            got = gen.norm(lv.asarray(), rgb)
            assert_level_equal(got, expect[level], '%s level %d' % (stem, level),
                               level < len(src_levels))
        # The reduced levels are SubIFDs marked reduced-resolution.
        for level in range(1, len(expect)):
            sub = tf.pages[0].pages[level - 1] if hasattr(tf.pages[0], 'pages') else None
            if sub is not None:
                assert sub.subfiletype & 1
        ome = ET.fromstring(tf.ome_metadata)
    ns = {'o': ome.tag.split('}')[0].strip('{')}
    pixels = ome.find('.//o:Image/o:Pixels', ns)
    assert pixels is not None
    h, w = expect[0].shape[1:3]
    assert int(pixels.get('SizeX')) == w and int(pixels.get('SizeY')) == h
    assert int(pixels.get('SizeC')) == (3 if rgb else c)
    assert pixels.get('Type') == OME_TYPES[str(expect[0].dtype)]
    if pixel_size:
        assert float(pixels.get('PhysicalSizeX')) == pytest.approx(pixel_size, rel=1e-6)
        assert float(pixels.get('PhysicalSizeY')) == pytest.approx(pixel_size, rel=1e-6)
    channels = pixels.findall('o:Channel', ns)
    if names:
        assert [ch.get('Name') for ch in channels] == names


def check_vips(path, expect, tmp):
    """libvips reads each level (subifd) of the first and last channel (page)."""
    c = expect[0].shape[0]
    for level, want in enumerate(expect):
        for page in sorted({0, c - 1}):
            out = tmp / ('vips_l%d_p%d.tif' % (level, page))
            spec = '%s[subifd=%d,page=%d]' % (path, level - 1, page)
            r = subprocess.run(['vips', 'copy', spec, str(out)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            with tifffile.TiffFile(out) as tf:  # page 0 only: vips copies the OME-XML
                got = gen.norm(tf.pages[0].asarray(), rgb=want.shape[3] == 3)
            exp = want[page:page + 1]
            if got.dtype.kind == 'f':
                np.testing.assert_allclose(got, exp, rtol=2e-6, atol=1e-7)
            else:
                assert got.shape == exp.shape and np.array_equal(got, exp), spec
            out.unlink()
    # vips' own statistics on level 0 agree with numpy.
    r = subprocess.run(['vips', 'max', '%s[page=0]' % path], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) == pytest.approx(float(expect[0][0].max()), rel=1e-6)


def check_tiffinfo(path):
    r = subprocess.run(['tiffinfo', '-D', str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    bad = [ln for ln in r.stderr.splitlines() if 'error' in ln.lower() or 'warn' in ln.lower()]
    assert not bad, bad


def check_openslide(path, expect):
    openslide = pytest.importorskip('openslide')
    want = expect[0][0]  # (H, W, 3)
    h, w = want.shape[:2]
    with openslide.OpenSlide(str(path)) as s:
        assert s.level_dimensions[0] == (w, h)
        region = np.asarray(s.read_region((0, 0), 0, (w, h)))
    assert region.shape == (h, w, 4)
    assert (region[..., 3] == 255).all()
    assert np.array_equal(region[..., :3], want)


@pytest.mark.parametrize('make_source', SOURCES, ids=lambda f: f.__name__[4:])
def test_virtual_ome_tiff(scopefs, tmp_path, make_source):
    stem, names, pixel_size = make_source(scopefs.raw, tmp_path)
    src_levels = gen.read_levels(source_file(scopefs.raw))
    expect = gen.expected_virtual_levels(src_levels)
    m = scopefs.mount()
    assert os.listdir(m.path('registered')) == [stem + '.ome.tif']
    path = m.path('registered', stem + '.ome.tif')
    check_tifffile(path, src_levels, expect, stem, names, pixel_size)
    check_tiffinfo(path)
    check_vips(path, expect, tmp_path)
    if expect[0].shape[3] == 3 and expect[0].dtype == np.uint8:
        check_openslide(path, expect)
    st = m.status()
    assert st['errors'] == 0
    assert st['problems'] == []


def test_reference_option_picks_the_slide(scopefs):
    """Only the reference slide is served; reference= picks it by stem or file name."""
    for i, stem in enumerate(['alpha', 'beta']):
        a = gen.norm(gen.tissue(600, 700, 2, seed=30 + i))
        gen.write_ome(scopefs.raw / (stem + '.ome.tif'), [a], ['A', 'B'])
    m = scopefs.mount()
    assert os.listdir(m.path('registered')) == ['alpha.ome.tif']
    m.unmount()
    for ref in ('beta', 'beta.ome.tif'):
        m = scopefs.mount(opts={'reference': ref})
        assert os.listdir(m.path('registered')) == ['beta.ome.tif']
        got = gen.read_levels(m.path('registered', 'beta.ome.tif'))
        want = gen.read_levels(scopefs.raw / 'beta.ome.tif')
        assert np.array_equal(got[0], want[0])
        m.unmount()

"""src/io/slide.c against independent writers and readers.

Files are written by tifffile (OME-TIFF with SubIFD pyramids, flat strips,
big-endian, BigTIFF) and by libvips (`vips tiffsave --pyramid` and
`--subifd`).  Regions are read through the C driver in tests/unit/test_slide.c
(`--dump`, `--info`) and compared exactly with what tifffile decodes from the
same file (numpy), including odd offsets and rects reaching outside the level
(which must read as 0).
"""

import os
import shutil
import subprocess

import numpy as np
import pytest
import tifffile


@pytest.fixture(scope="session")
def driver(slide_driver):
    return slide_driver


def info(driver, path):
    res = subprocess.run([str(driver), "--info", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", "libtiff must not write to stderr: " + res.stderr
    return dict(line.split("=", 1) for line in res.stdout.splitlines())


def dump(driver, path, level, channel, x, y, w, h, dtype, samples, tmp_path):
    out = tmp_path / "region.raw"
    res = subprocess.run([str(driver), "--dump", str(path), str(level), str(channel), str(x),
                          str(y), str(w), str(h), str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    a = np.fromfile(out, dtype=np.dtype(dtype).newbyteorder("="))
    return a.reshape((h, w, samples) if samples > 1 else (h, w))


def expected_region(level_array, x, y, w, h):
    """The oracle: level pixels inside the rect, zeros outside."""
    H, W = level_array.shape[:2]
    out = np.zeros((h, w) + level_array.shape[2:], dtype=level_array.dtype)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x0 < x1 and y0 < y1:
        out[y0 - y:y1 - y, x0 - x:x1 - x] = level_array[y0:y1, x0:x1]
    return out


def rects(W, H):
    return [(0, 0, W, H), (37, 29, min(301, W - 37), min(203, H - 29)), (-17, -9, 100, 80),
            (W - 50, H - 30, 128, 128), (W + 10, 5, 16, 16), (-5, -5, W + 10, H + 10),
            (W // 3, H // 3, 1, 1)]


def check_levels(driver, path, levels, tmp_path, channel_axis=None):
    """levels: list of numpy arrays, level 0 first; channel_axis 0 for (C, Y, X)."""
    for lev, arr in enumerate(levels):
        planes = [arr[c] for c in range(arr.shape[0])] if channel_axis == 0 else [arr]
        for c, plane in enumerate(planes):
            samples = plane.shape[2] if plane.ndim == 3 else 1
            H, W = plane.shape[:2]
            for (x, y, w, h) in rects(W, H):
                got = dump(driver, path, lev, c, x, y, w, h, plane.dtype, samples, tmp_path)
                want = expected_region(plane, x, y, w, h)
                assert np.array_equal(got, want), (
                    f"{path.name} level {lev} channel {c} rect {(x, y, w, h)}: "
                    f"{np.count_nonzero(got != want)} samples differ")


def write_ome_pyramid(path, data, axes, tile, compression, bigtiff=False, names=None,
                      physical=None, photometric="minisblack"):
    """An OME-TIFF whose reduced levels are SubIFDs (tifffile's subifds API)."""
    yx = slice(-3, -1) if axes.endswith("S") else slice(-2, None)
    meta = {"axes": axes}
    if names:
        meta["Channel"] = {"Name": names}
    if physical:
        meta.update(physical)
    levels = [data]
    while min(levels[-1].shape[yx]) >= 2 * tile[0] and len(levels) < 3:
        prev = levels[-1]
        sl = [slice(None)] * prev.ndim
        ax = range(prev.ndim)[yx]
        for a in ax:
            sl[a] = slice(None, None, 2)
        levels.append(np.ascontiguousarray(prev[tuple(sl)]))
    with tifffile.TiffWriter(path, ome=True, bigtiff=bigtiff) as tif:
        opts = dict(tile=tile, compression=compression, photometric=photometric)
        tif.write(levels[0], subifds=len(levels) - 1, metadata=meta, **opts)
        for lev in levels[1:]:
            tif.write(lev, subfiletype=1, **opts)
    return levels


@pytest.mark.parametrize("compression", ["zlib", None])
def test_ome_multichannel_uint16(driver, tmp_path, compression):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 65536, size=(3, 700, 1000), dtype=np.uint16)
    path = tmp_path / "mc.ome.tif"
    write_ome_pyramid(path, data, "CYX", (128, 128), compression, names=["DAPI", "GFP", "Cy5"],
                      physical={"PhysicalSizeX": 325, "PhysicalSizeXUnit": "nm",
                                "PhysicalSizeY": 0.325})
    meta = info(driver, path)
    assert meta["kind"] == "ome" and meta["is_ome"] == "1"
    assert meta["channels"] == "3" and meta["dtype"] == "uint16"
    assert [meta[f"channel{c}"] for c in range(3)] == ["DAPI", "GFP", "Cy5"]
    px, py = (float(v) for v in meta["pixel_size"].split(","))
    assert px == pytest.approx(0.325) and py == pytest.approx(0.325)
    with tifffile.TiffFile(path) as tf:
        oracle = [lev.asarray() for lev in tf.series[0].levels]
    assert int(meta["levels"]) == len(oracle) == 3
    for i, lev in enumerate(oracle):
        assert meta[f"level{i}"] == f"{lev.shape[2]}x{lev.shape[1]}"
    check_levels(driver, path, oracle, tmp_path, channel_axis=0)


def test_ome_rgb_uint8_bigtiff(driver, tmp_path):
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, size=(600, 520, 3), dtype=np.uint8)
    path = tmp_path / "rgb.ome.tif"
    write_ome_pyramid(path, data, "YXS", (64, 64), "zlib", bigtiff=True, photometric="rgb")
    meta = info(driver, path)
    assert meta["samples"] == "3" and meta["channels"] == "1" and meta["dtype"] == "uint8"
    with tifffile.TiffFile(path) as tf:
        oracle = [lev.asarray() for lev in tf.series[0].levels]
    assert int(meta["levels"]) == len(oracle) == 3
    check_levels(driver, path, oracle, tmp_path)


def test_ome_float32(driver, tmp_path):
    rng = np.random.default_rng(3)
    data = rng.standard_normal((2, 300, 260)).astype(np.float32)
    path = tmp_path / "f.ome.tiff"
    write_ome_pyramid(path, data, "CYX", (64, 64), "zlib")
    meta = info(driver, path)
    assert meta["dtype"] == "float" and meta["channels"] == "2"
    with tifffile.TiffFile(path) as tf:
        oracle = [lev.asarray() for lev in tf.series[0].levels]
    check_levels(driver, path, oracle, tmp_path, channel_axis=0)


def test_flat_strips_bigendian(driver, tmp_path):
    rng = np.random.default_rng(4)
    data = rng.integers(0, 65536, size=(4, 211, 333), dtype=np.uint16)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, byteorder=">", rowsperstrip=13, photometric="minisblack",
                     metadata=None)
    meta = info(driver, path)
    assert meta["kind"] == "flat" and meta["channels"] == "4" and meta["tiled"] == "0"
    with tifffile.TiffFile(path) as tf:
        oracle = np.stack([p.asarray() for p in tf.pages])
    check_levels(driver, path, [oracle], tmp_path, channel_axis=0)


def vips_source(tmp_path, data):
    src = tmp_path / "src.tif"
    tifffile.imwrite(src, data, metadata=None,
                     photometric="rgb" if data.ndim == 3 else "minisblack")
    return src


@pytest.mark.skipif(shutil.which("vips") is None, reason="vips CLI not installed")
@pytest.mark.parametrize("layout", ["pyramid", "subifd"])
@pytest.mark.parametrize("kind", ["uint16", "rgb"])
def test_vips_pyramids(driver, tmp_path, layout, kind):
    rng = np.random.default_rng(5)
    if kind == "rgb":
        data = rng.integers(0, 256, size=(520, 700, 3), dtype=np.uint8)
    else:
        data = rng.integers(0, 65536, size=(520, 700), dtype=np.uint16)
    src = vips_source(tmp_path, data)
    path = tmp_path / f"vips_{layout}.tif"
    cmd = ["vips", "tiffsave", str(src), str(path), "--tile", "--pyramid", "--compression",
           "deflate", "--tile-width", "128", "--tile-height", "128"]
    if layout == "subifd":
        cmd.append("--subifd")
    subprocess.run(cmd, check=True)
    meta = info(driver, path)
    with tifffile.TiffFile(path) as tf:
        if layout == "subifd":
            oracle = [lev.asarray() for lev in tf.series[0].levels]
        else:
            oracle = [p.asarray() for p in tf.pages]
    assert meta["kind"] == ("ome" if layout == "subifd" else "pages")
    assert meta["is_ome"] == "0"
    assert int(meta["levels"]) == len(oracle) >= 3
    assert np.array_equal(oracle[0], data)
    check_levels(driver, path, oracle, tmp_path)


def test_truncated_tifffile(driver, tmp_path):
    """tifffile writes each IFD before its data: cutting the file keeps the
    IFD and loses tiles, which the probe must catch, silently."""
    rng = np.random.default_rng(6)
    data = rng.integers(0, 65536, size=(512, 512), dtype=np.uint16)
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, data, tile=(128, 128), compression="zlib")
    os.truncate(path, path.stat().st_size * 6 // 10)
    res = subprocess.run([str(driver), "--info", str(path)], capture_output=True, text=True)
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 1, "only our own message, nothing from libtiff: " + res.stderr
    assert lines[0].startswith("error=format") and "truncated" in lines[0]
    assert str(path) in lines[0]


@pytest.mark.parametrize("content,word", [(b"", "empty"), (b"hello, not a TIFF\n", "not a TIFF"),
                                          (b"II*\x00\xff\xff\xff\x7f" + bytes(100), "truncated")])
def test_bad_files_are_clear(driver, tmp_path, content, word):
    path = tmp_path / "bad.tif"
    path.write_bytes(content)
    res = subprocess.run([str(driver), "--info", str(path)], capture_output=True, text=True)
    assert res.returncode == 2
    assert len(res.stderr.splitlines()) == 1 and word in res.stderr and str(path) in res.stderr


@pytest.mark.skipif(shutil.which("vips") is None, reason="vips CLI not installed")
@pytest.mark.parametrize("quality", [80, 95])
def test_vips_jpeg_against_openslide(driver, tmp_path, quality):
    """JPEG tiles (YCbCr subsampled at Q 80, RGB at Q 95, as libvips chooses)
    against OpenSlide's decoder.  JPEG decoders may differ in rounding and
    chroma upsampling, so the check is a tight tolerance (both use
    libjpeg-turbo here and agree exactly)."""
    openslide = pytest.importorskip("openslide")
    yy, xx = np.mgrid[0:700, 0:900]
    data = np.stack([(xx / 4) % 256, (yy / 3) % 256, ((xx + yy) / 5) % 256], -1).astype(np.uint8)
    src = vips_source(tmp_path, data)
    path = tmp_path / f"jpeg{quality}.tif"
    subprocess.run(["vips", "tiffsave", str(src), str(path), "--tile", "--pyramid",
                    "--compression", "jpeg", "--Q", str(quality), "--tile-width", "128",
                    "--tile-height", "128"], check=True)
    meta = info(driver, path)
    assert meta["samples"] == "3" and meta["kind"] == "pages"
    slide = openslide.OpenSlide(str(path))
    assert int(meta["levels"]) == slide.level_count
    W0, H0 = slide.level_dimensions[0]
    for lev in range(slide.level_count):
        W, H = slide.level_dimensions[lev]
        ds = slide.level_downsamples[lev]
        if ds != int(ds) or W * ds != W0 or H * ds != H0:
            continue  # OpenSlide resamples at fractional offsets there
        for (x, y, w, h) in rects(W, H)[:3]:
            got = dump(driver, path, lev, 0, x, y, w, h, np.uint8, 3, tmp_path).astype(int)
            # OpenSlide takes level-0 coordinates; outside the level it gives
            # transparent black, i.e. RGB 0 as our reader.
            want = np.asarray(slide.read_region((int(x * ds), int(y * ds)), lev, (w, h)))
            want = want[..., :3].astype(int)
            diff = np.abs(got - want)
            assert diff.mean() < 0.5 and diff.max() <= 2, (lev, (x, y, w, h), diff.mean(),
                                                           diff.max())

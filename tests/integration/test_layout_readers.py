"""Virtual TIFF layouts (src/io/tiff_layout.c) read by independent readers.

The unit-test binary doubles as a writer: `test_tiff_layout --write PATH spec`
writes the layout's header and fills every unit with a pattern of
(page, level, x, y, sample).  Each file is then read by tifffile, libvips
(`vips rawsave`), libtiff's tiffinfo/tiffdump and, for 8-bit RGB, OpenSlide,
and every page of every level is compared with the pattern computed here in
numpy.  Strip files get the checks ImageJ 1.x needs (classic TIFF,
uncompressed, strips, not tiled), read from the raw IFD bytes.

The binary is $SCOPEFS_LAYOUT_TOOL if set, else built with tools/build-one.
All images are small: the module runs in a few seconds.
"""
import math
import os
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parents[2]
DTYPES = {"u8": np.uint8, "u16": np.uint16, "f32": np.float32}
OME_TYPES = {"u8": "uint8", "u16": "uint16", "f32": "float"}
OME_NS = "{http://www.openmicroscopy.org/Schemas/OME/2016-06}"


@dataclass
class Spec:
    width: int
    height: int
    dtype: str = "u16"
    pages: int = 1
    samples: int = 1
    tile: int = 256
    levels: int = 1
    bigtiff: int = -1
    ome: bool = False
    level_sizes: tuple = ()
    unit_bytes_max: int = 0

    def sizes(self):
        """(width, height) of each level: given, or ceil halving."""
        if self.level_sizes:
            return list(self.level_sizes)
        return [
            (math.ceil(self.width / 2**i), math.ceil(self.height / 2**i))
            for i in range(self.levels)
        ]

    def args(self):
        a = ["--width", self.width, "--height", self.height, "--dtype", self.dtype,
             "--pages", self.pages, "--samples", self.samples, "--tile", self.tile,
             "--levels", self.levels, "--bigtiff", self.bigtiff]
        if self.unit_bytes_max:
            a += ["--unit-bytes-max", self.unit_bytes_max]
        if self.level_sizes:
            a += ["--level-sizes", ",".join(f"{w}x{h}" for w, h in self.level_sizes)]
        return [str(x) for x in a]


def pattern(spec, page, level):
    """The samples the writer puts at (page, level): k = x + 3y + 1009 page +
    4099 level + 257 s, then uint8 k & 0xff, uint16 k & 0xffff, float
    (k & 0xffffff) * 0.5.  Shape (h, w) or (h, w, samples)."""
    w, h = spec.sizes()[level]
    y, x, s = np.meshgrid(np.arange(h, dtype=np.uint64), np.arange(w, dtype=np.uint64),
                          np.arange(spec.samples, dtype=np.uint64), indexing="ij")
    k = (x + 3 * y + 1009 * page + 4099 * level + 257 * s) & 0xFFFFFFFF
    if spec.dtype == "u8":
        a = (k & 0xFF).astype(np.uint8)
    elif spec.dtype == "u16":
        a = (k & 0xFFFF).astype(np.uint16)
    else:
        a = (k & 0xFFFFFF).astype(np.float32) * np.float32(0.5)
    return a[:, :, 0] if spec.samples == 1 else a


def ome_xml(spec):
    w, h = spec.width, spec.height
    if spec.samples == 3:
        channels = '<Channel ID="Channel:0:0" SamplesPerPixel="3"/>'
        size_c = 3
    else:
        channels = "".join(f'<Channel ID="Channel:0:{c}" SamplesPerPixel="1"/>'
                           for c in range(spec.pages))
        size_c = spec.pages
    return ('<?xml version="1.0" encoding="UTF-8"?>'
            '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
            '<Image ID="Image:0" Name="scopefs test"><Pixels ID="Pixels:0" '
            f'DimensionOrder="XYCZT" Type="{OME_TYPES[spec.dtype]}" SizeX="{w}" SizeY="{h}" '
            f'SizeC="{size_c}" SizeZ="1" SizeT="1" PhysicalSizeX="0.5" PhysicalSizeY="0.5">'
            f'{channels}<TiffData IFD="0" PlaneCount="{spec.pages}"/>'
            '</Pixels></Image></OME>')


@pytest.fixture(scope="module")
def tool():
    path = os.environ.get("SCOPEFS_LAYOUT_TOOL")
    if path:
        return path
    # build-one also runs the unit tests once; a failure there fails here.
    subprocess.run(["tools/build-one", "tests/unit/test_tiff_layout.c", "src/io/tiff_layout.c"],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    return str(REPO / "build-one" / "test_tiff_layout")


def write(tool, tmp_path, spec, name="layout.tif"):
    path = tmp_path / name
    args = [tool, "--write", str(path)] + spec.args()
    if spec.ome:
        xml = tmp_path / "ome.xml"
        xml.write_text(ome_xml(spec), encoding="utf-8")
        args += ["--description-file", str(xml)]
    out = subprocess.run(args, check=True, capture_output=True, text=True, timeout=60).stdout
    info = dict(kv.split("=") for kv in out.split())
    assert path.stat().st_size == int(info["file_size"])
    return path, info


def check_tifffile(path, spec):
    with tifffile.TiffFile(path) as tif:
        assert tif.byteorder == "<"
        assert tif.is_bigtiff == (spec.bigtiff == 1)
        assert len(tif.pages) == spec.pages
        for p in range(spec.pages):
            page = tif.pages[p]
            assert page.compression == 1 and page.planarconfig == 1
            assert page.is_tiled == (spec.tile > 0)
            np.testing.assert_array_equal(page.asarray(), pattern(spec, p, 0))
            subs = tifffile.TiffPages(page) if spec.levels > 1 else []
            assert len(subs) == spec.levels - 1
            for i, sub in enumerate(subs, start=1):
                assert sub.subfiletype == 1  # reduced image
                np.testing.assert_array_equal(sub.asarray(), pattern(spec, p, i))
        if spec.ome:
            assert tif.is_ome
            root = ET.fromstring(tif.ome_metadata)
            pixels = root.find(f"{OME_NS}Image/{OME_NS}Pixels")
            assert int(pixels.get("SizeX")) == spec.width
            series = tif.series[0]
            assert series.kind == "ome" and len(series.levels) == spec.levels
            for i, level in enumerate(series.levels):
                want = np.stack([pattern(spec, p, i) for p in range(spec.pages)])
                np.testing.assert_array_equal(level.asarray(), want.reshape(level.shape))
        else:
            assert not tif.is_ome


def check_vips(path, spec, tmp_path):
    """libvips reads every page of every level (subifd=-1 is the main IFD)."""
    raw = tmp_path / "vips.raw"
    for p in range(spec.pages):
        for i, (w, h) in enumerate(spec.sizes()):
            src = f"{path}[page={p},subifd={i - 1}]"
            subprocess.run(["vips", "rawsave", src, str(raw)], check=True, capture_output=True,
                           timeout=60)
            got = np.fromfile(raw, dtype=DTYPES[spec.dtype])
            want = pattern(spec, p, i)
            assert got.size == want.size, f"{src}: {got.size} samples"
            np.testing.assert_array_equal(got.reshape(want.shape), want, err_msg=src)


def check_libtiff_tools(path, spec):
    """tiffinfo -D reads every main-chain image; tiffdump walks the IFDs."""
    for cmd in (["tiffinfo", "-D", str(path)], ["tiffdump", str(path)]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "error" not in r.stderr.lower() and "warning" not in r.stderr.lower(), r.stderr
    dump = subprocess.run(["tiffdump", str(path)], capture_output=True, text=True).stdout
    assert dump.count("Directory") == spec.pages  # it does not follow SubIFDs


def read_classic_ifd0(path):
    """Tag -> (type, count, values) of the first IFD of a classic TIFF."""
    data = Path(path).read_bytes()
    assert data[:4] == b"II*\0", "not a little-endian classic TIFF"
    (ifd,) = struct.unpack_from("<I", data, 4)
    (n,) = struct.unpack_from("<H", data, ifd)
    sizes = {1: ("B", 1), 2: ("B", 1), 3: ("H", 2), 4: ("I", 4), 5: ("I", 4)}
    tags = {}
    for e in range(n):
        tag, typ, count, value = struct.unpack_from("<HHII", data, ifd + 2 + 12 * e)
        fmt, size = sizes[typ]
        count_fmt = count * 2 if typ == 5 else count
        where = ifd + 2 + 12 * e + 8 if count * size * (2 if typ == 5 else 1) <= 4 else value
        tags[tag] = (typ, count, struct.unpack_from(f"<{count_fmt}{fmt}", data, where))
    return tags


def check_imagej_strips(path, spec):
    """What ImageJ 1.x's TiffDecoder needs: classic TIFF, one IFD,
    uncompressed strips (no tile tags), byte counts covering the image."""
    tags = read_classic_ifd0(path)
    assert 322 not in tags and 323 not in tags and 324 not in tags  # no tiles
    assert tags[259][2] == (1,)  # Compression none
    assert tags[277][2] == (spec.samples,)
    assert tags[258][2] == (np.dtype(DTYPES[spec.dtype]).itemsize * 8,) * spec.samples
    rows = tags[278][2][0]
    offsets, counts = tags[273][2], tags[279][2]
    row_bytes = spec.width * spec.samples * np.dtype(DTYPES[spec.dtype]).itemsize
    assert len(offsets) == len(counts) == math.ceil(spec.height / rows)
    assert all(c == rows * row_bytes for c in counts[:-1])
    assert counts[-1] == (spec.height - rows * (len(counts) - 1)) * row_bytes
    assert all(a + c == b for a, c, b in zip(offsets, counts, offsets[1:]))  # contiguous
    assert offsets[-1] + counts[-1] == Path(path).stat().st_size
    if rows > 1 and rows < spec.height:  # a strip is about 64 KiB .. 1 MiB
        assert 64 * 1024 <= counts[0] <= 1024 * 1024
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 1 and not tif.pages[0].is_tiled


TILED = [
    Spec(1000, 777, "u16", pages=2, tile=256, levels=3, ome=True),
    Spec(1000, 777, "u8", samples=3, tile=256, levels=4, ome=True),
    Spec(300, 200, "f32", pages=3, tile=64, levels=2),
    Spec(513, 512, "u16", tile=512, levels=2),
    Spec(1, 1, "u8", tile=16, levels=1),
    Spec(1, 1, "u16", pages=2, tile=16, levels=4, ome=True),
    Spec(1000, 777, "u8", tile=64, levels=3, level_sizes=((1000, 777), (600, 500), (100, 90))),
    Spec(1000, 777, "u16", pages=2, tile=256, levels=3, bigtiff=1, ome=True),
    Spec(200, 100, "f32", samples=3, tile=32, levels=3, bigtiff=1),
    # many channels: units of page groups (8, 8, ..., 8 of 40; 3, 3, 1 of 7)
    Spec(300, 200, "u16", pages=40, tile=64, levels=3, ome=True, unit_bytes_max=8 * 64 * 64 * 2),
    Spec(100, 70, "u8", pages=7, tile=16, levels=2, unit_bytes_max=3 * 16 * 16),
]
STRIPS = [
    Spec(1000, 777, "u8", tile=0),
    Spec(300, 200, "u16", samples=3, tile=0),
    Spec(5000, 3, "f32", tile=0),
    Spec(1, 1, "u8", tile=0),
    Spec(2048, 300, "u16", tile=0),
    Spec(120, 90, "u16", tile=0, bigtiff=1),
]


def spec_id(s):
    kind = f"tile{s.tile}" if s.tile else "strips"
    big = "-bigtiff" if s.bigtiff == 1 else ""
    grouped = f"-units{s.unit_bytes_max}" if s.unit_bytes_max else ""
    return f"{s.width}x{s.height}x{s.pages}-{s.dtype}-s{s.samples}-{kind}-L{s.levels}{big}{grouped}"


@pytest.mark.parametrize("spec", TILED, ids=spec_id)
def test_tiled(tool, tmp_path, spec):
    path, info = write(tool, tmp_path, spec)
    assert int(info["bigtiff"]) == (spec.bigtiff == 1)
    assert int(info["header_size"]) % 4096 == 0
    check_tifffile(path, spec)
    check_vips(path, spec, tmp_path)
    check_libtiff_tools(path, spec)


@pytest.mark.parametrize("spec", STRIPS, ids=spec_id)
def test_strips(tool, tmp_path, spec):
    path, _ = write(tool, tmp_path, spec)
    check_tifffile(path, spec)
    check_vips(path, spec, tmp_path)
    check_libtiff_tools(path, spec)
    if spec.bigtiff != 1:
        check_imagej_strips(path, spec)


def test_openslide_rgb(tool, tmp_path):
    """OpenSlide's generic tiled TIFF reader: level 0 of an 8-bit RGB file
    (it does not see SubIFD levels)."""
    openslide = pytest.importorskip("openslide")
    spec = Spec(1000, 777, "u8", samples=3, tile=256, levels=3)
    path, _ = write(tool, tmp_path, spec)
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
    slide = openslide.OpenSlide(str(path))
    try:
        assert slide.dimensions == (1000, 777)
        want = pattern(spec, 0, 0)
        region = np.asarray(slide.read_region((0, 0), 0, (1000, 777)))
        np.testing.assert_array_equal(region[:, :, :3], want)
        assert (region[:, :, 3] == 255).all()
        part = np.asarray(slide.read_region((300, 500), 0, (250, 200)))
        np.testing.assert_array_equal(part[:, :, :3], want[500:700, 300:550])
    finally:
        slide.close()


@pytest.mark.parametrize("width", [1000, 1001])
def test_resolution(tool, tmp_path, width):
    """X/YResolution in pixels per centimetre, level 0's / 2^l at level l:
    also for a level whose size was rounded up (501 of 1001), whose pixels
    are still 2x level 0's (the size ratio gave 10009.99)."""
    spec = Spec(width, 777, "u8", tile=256, levels=2)
    path = tmp_path / "res.tif"
    subprocess.run([tool, "--write", str(path)] + spec.args() + ["--resolution", "20000,10000"],
                   check=True, capture_output=True, timeout=60)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.tags["ResolutionUnit"].value == 3  # centimetre
        x = page.tags["XResolution"].value
        y = page.tags["YResolution"].value
        assert x[0] / x[1] == pytest.approx(20000, rel=1e-6)
        assert y[0] / y[1] == pytest.approx(10000, rel=1e-6)
        sub = tifffile.TiffPages(page)[0]
        sx = sub.tags["XResolution"].value
        sy = sub.tags["YResolution"].value
        assert sx[0] / sx[1] == pytest.approx(10000, rel=1e-6)
        assert sy[0] / sy[1] == pytest.approx(5000, rel=1e-6)


def test_deterministic(tool, tmp_path):
    spec = Spec(700, 300, "u16", pages=2, tile=128, levels=3, ome=True)
    a, _ = write(tool, tmp_path, spec, "a.tif")
    b, _ = write(tool, tmp_path, spec, "b.tif")
    assert a.read_bytes() == b.read_bytes()


def test_bigtiff_refused(tool):
    """A strip file past 4 GiB is an error unless BigTIFF is forced (ImageJ
    cannot read BigTIFF); a tiled one switches to BigTIFF by itself."""
    strips = Spec(70000, 70000, "u8", tile=0)
    r = subprocess.run([tool, "--info"] + strips.args(), capture_output=True, text=True)
    assert r.returncode != 0 and "range" in r.stderr
    tiled = Spec(48000, 48000, "u16", pages=4, tile=512, levels=7)
    out = subprocess.run([tool, "--info"] + tiled.args(), check=True, capture_output=True,
                         text=True).stdout
    info = dict(kv.split("=") for kv in out.split())
    assert info["bigtiff"] == "1" and int(info["file_size"]) > 2**32
    tiled.bigtiff = 0
    r = subprocess.run([tool, "--info"] + tiled.args(), capture_output=True, text=True)
    assert r.returncode != 0 and "range" in r.stderr


if shutil.which("vips") is None or shutil.which("tiffinfo") is None:
    pytestmark = pytest.mark.skip(reason="needs the vips and tiffinfo command-line tools")

"""Which pages of a TIFF src/io/slide.c takes as pyramid levels, the pixel size
it reads from ImageJ (Fiji) files, and its note about TIFF Orientation.

The files are written by tifffile; the oracle is what tifffile itself reads
back from the same file (its SVS parser's levels, its tags and ImageJ
metadata) and the numpy arrays written.  Probing and region reads go through
the C driver in tests/unit/test_slide.c (`--info`, `--dump`); the
Orientation note and the ImageJ pixel size are also checked end to end on a
mount.
"""

import re
import subprocess

import numpy as np
import pytest
import tifffile


@pytest.fixture(scope="module")
def driver(slide_driver):
    return slide_driver


def probe(driver, path):
    """(key=value dict, stderr) of the driver's --info."""
    res = subprocess.run([str(driver), "--info", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return dict(line.split("=", 1) for line in res.stdout.splitlines()), res.stderr


def levels_of(info):
    return [tuple(int(v) for v in info["level%d" % i].split("x"))
            for i in range(int(info["levels"]))]


def dump_level(driver, path, level, w, h, samples, tmp_path):
    out = tmp_path / "level.raw"
    res = subprocess.run([str(driver), "--dump", str(path), str(level), "0", "0", "0", str(w),
                          str(h), str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    a = np.fromfile(out, dtype=np.uint8)
    return a.reshape((h, w, samples) if samples > 1 else (h, w))


def box_down(a, k):
    h, w = a.shape[0] // k, a.shape[1] // k
    return a[:h * k, :w * k].reshape(h, k, w, k, *a.shape[2:]).mean((1, 3)).astype(np.uint8)


# ---- pyramid levels --------------------------------------------------------

def put(t, a, **kw):
    """One page, without tifffile's own "shaped" description (which would make
    tifffile read the file as its own series rather than by the file's kind)."""
    t.write(a, metadata=None, **kw)


def slide_rgb(h, w):
    """A smooth RGB slide, so every level is told apart from a label."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 255 // w), (y * 255 // h), np.full_like(x, 200)], -1).astype(np.uint8)


def label_rgb(h, w):
    lab = np.zeros((h, w, 3), np.uint8)
    lab[h // 3:2 * h // 3, ::4] = 255  # a barcode
    return lab


APERIO = "Aperio Image Library v12.0.5\r\n%dx%d (256x256) JPEG/RGB Q=70|AppMag = 40|MPP = 0.2520"


def write_svs(path, label_kw, with_level=True):
    """Aperio's page order: baseline, stripped thumbnail, tiled levels, then the
    label and the macro (NewSubfileType 1 and 9, as Aperio writes them).  The
    label keeps the slide's 4:3 aspect, so only its marking tells it apart."""
    s = slide_rgb(1536, 2048)
    with tifffile.TiffWriter(path) as t:
        put(t, s, tile=(256, 256), photometric="rgb", compression="zlib",
                description=APERIO % (2048, 1536))
        put(t, box_down(s, 16), photometric="rgb",
                description="Aperio Image Library v12.0.5\r\n2048x1536 -> 128x96")
        if with_level:
            put(t, box_down(s, 4), tile=(256, 256), photometric="rgb", compression="zlib",
                    description="Aperio Image Library v12.0.5\r\n2048x1536 -> 512x384")
        put(t, label_rgb(300, 400), photometric="rgb", **label_kw)
        put(t, box_down(s, 8), photometric="rgb", subfiletype=9,
                description="Aperio Image Library v12.0.5\r\nmacro 256x192")
    return s


LABELS = {
    # the tester's file: a tiled label, NewSubfileType 1, "Aperio label"
    "tiled-marked-named": dict(tile=(256, 256), subfiletype=1, description="Aperio label"),
    # Aperio's own description of a label, tiled, NewSubfileType 1
    "tiled-marked": dict(tile=(256, 256), subfiletype=1,
                         description="Aperio Image Library v12.0.5\r\nlabel 400x300"),
    # tiled and not marked, but its description names it
    "tiled-named": dict(tile=(256, 256), description="Aperio Image Library\r\nlabel 400x300"),
    # what Aperio writes: stripped, NewSubfileType 1
    "stripped": dict(subfiletype=1, description="Aperio Image Library\r\nlabel 400x300"),
}


@pytest.mark.parametrize("kind", sorted(LABELS))
def test_svs_label_is_not_a_level(driver, tmp_path, kind):
    path = tmp_path / "a.svs"
    s = write_svs(path, LABELS[kind])
    with tifffile.TiffFile(path) as t:
        assert t.is_svs
        tf_levels = [lv.keyframe.shape[:2] for lv in t.series[0].levels]
        names = [sr.name for sr in t.series]
    written = [(1536, 2048), (384, 512)]
    if kind != "tiled-named":
        # tifffile's SVS reader agrees: levels end at the first reduced page.
        # (It takes an unmarked tiled page as a level whatever its description.)
        assert tf_levels == written
        assert "Label" in names and "Macro" in names
    info, _ = probe(driver, path)
    assert info["kind"] == "svs"
    assert [(h, w) for w, h in levels_of(info)] == written
    assert float(info["pixel_size"].split(",")[0]) == pytest.approx(0.252)
    got = dump_level(driver, path, 1, 512, 384, 3, tmp_path)
    assert np.array_equal(got, box_down(s, 4))


def test_svs_without_levels_keeps_only_the_baseline(driver, tmp_path):
    """Baseline, thumbnail, tiled label: the label fits in size and aspect and
    is the only later tiled page, yet it is not level 1."""
    path = tmp_path / "a.svs"
    write_svs(path, LABELS["tiled-marked"], with_level=False)
    with tifffile.TiffFile(path) as t:
        assert len(t.series[0].levels) == 1
    info, _ = probe(driver, path)
    assert levels_of(info) == [(2048, 1536)]


def write_pages(path, tail, marked=True):
    """A libvips-style page pyramid (levels marked NewSubfileType 1 when
    `marked`) followed by the pages in tail (array, write kwargs)."""
    s = np.full((1536, 2048), 220, np.uint8)
    s[::7, ::5] = 30
    levels = [s, box_down(s, 2), box_down(s, 4)]
    with tifffile.TiffWriter(path) as t:
        put(t, levels[0], tile=(256, 256), compression="zlib")
        for lv in levels[1:]:
            put(t, lv, tile=(256, 256), compression="zlib", subfiletype=1 if marked else 0)
        for a, kw in tail:
            put(t, a, **kw)
    return levels


def barcode(h, w):
    lab = np.zeros((h, w), np.uint8)
    lab[:, ::5] = 255
    return lab


PAGE_TAILS = {
    # the tester's file: a smaller stripped label of another aspect ratio
    "label-other-aspect": [(barcode(100, 400), dict(compression="zlib"))],
    # same aspect, unmarked, after marked levels (an appended overview)
    "unmarked-after-marked": [(barcode(96, 128), dict(tile=(64, 64)))],
    # same aspect and marked, but named a macro
    "named-macro": [(barcode(96, 128), dict(tile=(64, 64), subfiletype=1,
                                            description="macro"))],
    # reduced, but also "one page of a multi-page image" (NewSubfileType 3):
    # not a level of this image
    "page-bit": [(barcode(192, 256), dict(tile=(64, 64), subfiletype=3))],
}


@pytest.mark.parametrize("kind", sorted(PAGE_TAILS))
def test_pages_pyramid_stops_before_a_label(driver, tmp_path, kind):
    path = tmp_path / "a.tif"
    levels = write_pages(path, PAGE_TAILS[kind])
    info, _ = probe(driver, path)
    assert info["kind"] == "pages"
    assert levels_of(info) == [(lv.shape[1], lv.shape[0]) for lv in levels]
    with tifffile.TiffFile(path) as t:  # each level is the page tifffile decodes
        for i, lv in enumerate(levels):
            assert np.array_equal(t.pages[i].asarray(), lv)
    last = dump_level(driver, path, 2, 512, 384, 1, tmp_path)
    assert np.array_equal(last, levels[2])


def test_pages_levels_of_rounded_sizes_are_kept(driver, tmp_path):
    """Levels whose sizes were rounded up (1001x667 -> 501x334 -> 251x167) and
    unmarked levels (a writer that does not set NewSubfileType) still count."""
    s = np.arange(667 * 1001, dtype=np.uint32).reshape(667, 1001).astype(np.uint8)
    sizes = [(667, 1001), (334, 501), (167, 251), (84, 126), (42, 63)]
    with tifffile.TiffWriter(tmp_path / "r.tif") as t:
        put(t, s, tile=(64, 64))
        for h, w in sizes[1:]:
            put(t, np.resize(s, (h, w)), tile=(64, 64))
    info, _ = probe(driver, tmp_path / "r.tif")
    assert levels_of(info) == [(w, h) for h, w in sizes]


# ---- ImageJ pixel size -----------------------------------------------------

# unit as written in the description -> micrometres per unit (ImageJ's units)
IMAGEJ_UNITS = {
    b"micron": 1.0, b"um": 1.0, b"\xc2\xb5m": 1.0, b"\xce\xbcm": 1.0,
    b"\\u00B5m": 1.0, b"\\u00b5m": 1.0, b"\\u03BCm": 1.0,
    b"nm": 1e-3, b"mm": 1e3, b"cm": 1e4,
}


def write_imagej(path, unit, res, resolutionunit="NONE", extra=b""):
    desc = b"ImageJ=1.54f\nimages=1\nunit=" + unit + b"\n" + extra + b"min=0.0\nmax=0.0\n"
    tifffile.imwrite(path, np.zeros((70, 90), np.uint16), description=desc,
                     resolution=res, resolutionunit=resolutionunit, metadata=None)


@pytest.mark.parametrize("unit", sorted(IMAGEJ_UNITS))
def test_imagej_pixel_size(driver, tmp_path, unit):
    px_um = 0.325  # pixels per unit, y twice as coarse:
    res = (IMAGEJ_UNITS[unit] / px_um, IMAGEJ_UNITS[unit] / (2 * px_um))
    path = tmp_path / "ij.tif"
    write_imagej(path, unit, res)
    with tifffile.TiffFile(path) as t:  # the oracle: the tags and ImageJ unit tifffile reads
        p = t.pages[0]
        assert p.tags["ResolutionUnit"].value == 1
        xr, yr = (a / b for a, b in (p.tags["XResolution"].value, p.tags["YResolution"].value))
        assert t.imagej_metadata is not None
    info, _ = probe(driver, path)
    px, py = (float(v) for v in info["pixel_size"].split(","))
    assert px == pytest.approx(IMAGEJ_UNITS[unit] / xr, rel=1e-5)
    assert py == pytest.approx(IMAGEJ_UNITS[unit] / yr, rel=1e-5)
    assert px == pytest.approx(0.325, rel=1e-5) and py == pytest.approx(0.65, rel=1e-5)


def test_imagej_yunit(driver, tmp_path):
    path = tmp_path / "ij.tif"
    write_imagej(path, b"micron", (2.0, 0.002), extra=b"yunit=nm\n")
    info, _ = probe(driver, path)
    assert [float(v) for v in info["pixel_size"].split(",")] == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("unit,resunit", [(b"pixel", "NONE"), (b"inch", "NONE"),
                                          (b"furlong", "NONE"), (b"micron", "INCH")])
def test_imagej_unusable_unit_gives_no_pixel_size(driver, tmp_path, unit, resunit):
    """"pixel" (uncalibrated), units that are no length we know, and a file
    whose ResolutionUnit says inch (3.08 px/inch = 8255 um: implausible)."""
    path = tmp_path / "ij.tif"
    write_imagej(path, unit, (1 / 0.325, 1 / 0.325), resolutionunit=resunit)
    info, _ = probe(driver, path)
    assert info["pixel_size"] == "0.000000,0.000000"


def test_imagej_centimetre_tags_win(driver, tmp_path):
    """ImageJ writes unit=cm with ResolutionUnit CENTIMETER: the tags say it."""
    path = tmp_path / "ij.tif"
    write_imagej(path, b"cm", (1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    info, _ = probe(driver, path)
    assert [float(v) for v in info["pixel_size"].split(",")] == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("bigtiff", [False, True])
@pytest.mark.parametrize("resunit,per_unit,want", [("MILLIMETER", 1e3 / 0.25, 0.25),
                                                   ("MICROMETER", 1 / 0.5, 0.5),
                                                   (9, 1e3 / 0.25, 0.0)])
def test_resolution_unit_beyond_baseline(driver, tmp_path, resunit, per_unit, want, bigtiff):
    """tifffile writes ResolutionUnit 4 (mm) and 5 (um) when asked; libtiff
    drops such a value, and the TIFF default (inch) made 4000 px/mm 6.35 um.
    Now the stored value is read from the file; an unknown one (9, patched
    into the file) gives no pixel size, with a log line naming the file."""
    path = tmp_path / "r.tif"
    tifffile.imwrite(path, np.zeros((40, 60), np.uint16), metadata=None, bigtiff=bigtiff,
                     byteorder=">" if bigtiff else "<", resolution=(per_unit, per_unit),
                     resolutionunit=resunit if isinstance(resunit, str) else "MILLIMETER")
    if not isinstance(resunit, str):
        with tifffile.TiffFile(path) as tf:
            tag = tf.pages[0].tags["ResolutionUnit"]
            at, order = tag.valueoffset, tf.byteorder
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(int(resunit).to_bytes(2, "big" if order == ">" else "little"))
    with tifffile.TiffFile(path) as tf:  # the oracle reads what was written
        assert int(tf.pages[0].tags["ResolutionUnit"].value) == \
            (resunit if not isinstance(resunit, str) else {"MILLIMETER": 4, "MICROMETER": 5}[resunit])
    info, err = probe(driver, path)
    assert [float(v) for v in info["pixel_size"].split(",")] == pytest.approx([want, want])
    if not want:
        assert "ResolutionUnit 9" in err and str(path) in err, err


def test_description_unit_without_imagej_header_is_ignored(driver, tmp_path):
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, np.zeros((20, 30), np.uint8), description=b"unit=micron\n",
                     resolution=(3.0, 3.0), resolutionunit="NONE", metadata=None)
    info, _ = probe(driver, path)
    assert info["pixel_size"] == "0.000000,0.000000"


# ---- Orientation -----------------------------------------------------------

def write_oriented(path, a, orientation):
    tifffile.imwrite(path, a, tile=(128, 128), extratags=[(274, "H", 1, orientation, True)])


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_orientation_is_noted_and_stored_order_served(driver, tmp_path, orientation):
    a = np.random.default_rng(orientation).integers(0, 255, (300, 400), dtype=np.uint8)
    path = tmp_path / "o.tif"
    write_oriented(path, a, orientation)
    with tifffile.TiffFile(path) as t:
        assert t.pages[0].tags["Orientation"].value == orientation
        stored = t.pages[0].asarray()  # tifffile ignores Orientation: the stored order
    info, err = probe(driver, path)
    assert int(info["orientation"]) == orientation
    assert levels_of(info) == [(400, 300)]
    if orientation == 1:
        assert "Orientation" not in err
    else:
        assert re.search(r"o\.tif: TIFF Orientation %d \(.*\) is ignored" % orientation, err)
    assert np.array_equal(dump_level(driver, path, 0, 400, 300, 1, tmp_path), stored)


# ---- end to end on a mount -------------------------------------------------

def test_mount_notes_orientation_in_log_file(scopefs, tmp_path):
    """The scan's note goes to the daemon's stderr and, copied by main while
    the mount is built, to log=FILE, once.  The output keeps the stored order."""
    a = np.random.default_rng(0).integers(0, 255, (300, 400), dtype=np.uint8)
    write_oriented(scopefs.raw / "a.tif", a, 6)
    log = tmp_path / "daemon.log"
    m = scopefs.mount(opts={"reg": "off", "log": str(log)})
    assert re.search(r"a\.tif: TIFF Orientation 6 .* is ignored", m.log_text())
    with tifffile.TiffFile(m.path("registered", "a.ome.tif")) as t:
        out = t.series[0].levels[0].asarray()
    assert np.array_equal(np.squeeze(out), a)
    text = log.read_text(errors="replace")
    assert len(re.findall(r"a\.tif: TIFF Orientation 6 \(rotate 90 clockwise\) is ignored",
                          text)) == 1, text
    # ... and .scopefs/status says it of the slide, for those who read no log.
    assert [sl["orientation"] for sl in m.status()["slides"]] == [6]


def test_mount_reads_imagej_pixel_size(scopefs):
    tifffile.imwrite(scopefs.raw / "b.tif", np.zeros((3, 300, 400), np.uint16), imagej=True,
                     resolution=(1 / 0.325, 1 / 0.325), metadata={"axes": "CYX", "unit": "micron"})
    m = scopefs.mount(opts={"reg": "off"})
    with tifffile.TiffFile(m.path("registered", "b.ome.tif")) as t:
        xml = t.pages[0].description
    for axis in "XY":
        size = re.search(r'PhysicalSize%s="([^"]*)"' % axis, xml)
        assert size and float(size.group(1)) == pytest.approx(0.325, rel=1e-6)


@pytest.mark.parametrize("size,unit", [(1e-12, "µm"), (0.5, "pm"), (1e30, "µm")])
def test_implausible_ome_pixel_size_is_dropped(driver, scopefs, tmp_path, size, unit):
    """An OME PhysicalSizeX outside 0.0001 - 10000 um is a unit slip: the
    slide has no pixel size (logged, naming the file), and registered/ writes
    no overflowing resolution rational (1e4 / 1e-12 um was 4294967295/0)."""
    path = scopefs.raw / "s.ome.tif"
    md = {"axes": "YX", "PhysicalSizeX": size, "PhysicalSizeXUnit": unit,
          "PhysicalSizeY": size, "PhysicalSizeYUnit": unit}
    tifffile.imwrite(path, np.zeros((300, 400), np.uint16), ome=True, metadata=md)
    with tifffile.TiffFile(path) as t:  # the oracle: what the file says
        assert 'PhysicalSizeX="%s"' % size in t.pages[0].description or \
            'PhysicalSizeX="%r"' % size in t.pages[0].description
    info, _ = probe(driver, path)
    assert info["pixel_size"] == "0.000000,0.000000"
    m = scopefs.mount(opts={"reg": "off"})
    with tifffile.TiffFile(m.path("registered", "s.ome.tif")) as t:
        tags = t.pages[0].tags
        for name in ("XResolution", "YResolution"):
            assert name not in tags or (tags[name].value[1] != 0 and tags[name].value[0] != 0), \
                (name, tags[name].value)
        assert "PhysicalSizeX" not in t.pages[0].description
    assert re.search(r"s\.ome\.tif: pixel size .* is outside 0\.0001 - 10000 um", m.log_text())


@pytest.mark.parametrize("name", ["a" + "\u00fc" * 200, "a" + "\u00fc" * 600],
                         ids=["401B", "1201B"])
def test_long_channel_name_cut_at_a_whole_character(driver, tmp_path, name):
    """OME channel names were read into 256 bytes and cut mid-character:
    'a' + 200 'ü' (401 bytes) came out as 254 bytes ending in half a 'ü'
    (shown as U+FFFD).  Now up to about 1 KiB is kept, and a longer name is
    cut at a whole character."""
    path = tmp_path / "long.ome.tif"
    tifffile.imwrite(path, np.zeros((2, 20, 30), np.uint16), photometric="minisblack",
                     metadata={"axes": "CYX", "Channel": {"Name": [name, "DAPI"]}})
    with tifffile.TiffFile(path) as tf:  # the oracle reads the name back whole
        assert name in tf.ome_metadata
    info, _ = probe(driver, path)
    got = info["channel0"]
    assert "\ufffd" not in got and name.startswith(got), got[-8:]
    if len(name.encode()) < 1000:
        assert got == name
    else:
        assert len(got.encode()) >= 1000
    assert info["channel1"] == "DAPI"

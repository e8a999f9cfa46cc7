"""Byte-exact reads of a virtual OME-TIFF.

The oracle is a sequential full copy that is itself checked: it must be a
valid TIFF whose decoded pixels (tifffile) equal the source's levels, or
numpy box averages of them.  Random (offset, length) reads on a second, cold
mount (so they reach the daemon, not the page cache of the first) must equal
slices of that copy."""

import os
import random

import numpy as np
import tifffile

import gen
from conftest import read_all

NAMES = ['DAPI', 'CD3', 'CD8', 'PanCK']


def make_source(raw):
    """4-channel uint16 source with two levels: scopefs computes the rest."""
    a = gen.norm(gen.tissue(2100, 2600, 4, seed=21))
    gen.write_ome(raw / 'ref.ome.tif', gen.pyramid(a, 2), NAMES, 0.5, compression='zlib')
    return gen.expected_virtual_levels(gen.read_levels(raw / 'ref.ome.tif'))


def segment_bounds(path):
    """Sorted (offset, bytecount) of every tile of every page and level."""
    out = []
    with tifffile.TiffFile(path) as tf:
        for page in tf.pages:
            for p in [page] + list(page.pages if page.subifds else []):
                out += list(zip(p.dataoffsets, p.databytecounts))
    return sorted(out)


def interesting_reads(size, segs, n, rng):
    """n (offset, length) pairs around the header, tile starts and ends,
    spanning tiles, ending mid-tile and passing EOF."""
    header_end = segs[0][0]
    tile = segs[0][1]
    starts = [o for o, _ in segs]
    reads = []
    for i in range(n):
        kind = i % 6
        if kind == 0:  # inside or across the end of the header
            off = rng.randrange(0, header_end + 4096)
            length = rng.randrange(1, 3 * 4096)
        elif kind == 1:  # straddling a tile boundary
            b = rng.choice(starts)
            off = max(0, b - rng.randrange(1, 70000))
            length = rng.randrange(2, 140000)
        elif kind == 2:  # spanning several tiles
            off = rng.choice(starts) + rng.randrange(0, tile)
            length = rng.randrange(tile, 4 * tile)
        elif kind == 3:  # starting at a tile, ending mid-tile
            off = rng.choice(starts)
            length = rng.randrange(1, tile)
        elif kind == 4:  # near and past EOF
            off = rng.randrange(max(0, size - 3 * tile), size + 5000)
            length = rng.randrange(1, 2 * tile)
        else:  # anywhere, odd sizes
            off = rng.randrange(0, size)
            length = rng.randrange(1, 1 << 20)
        reads.append((off, length))
    return reads


def pread_all(fd, off, length):
    """pread until length bytes or EOF (FUSE may return short reads)."""
    out = bytearray()
    while len(out) < length:
        b = os.pread(fd, length - len(out), off + len(out))
        if not b:
            break
        out += b
    return bytes(out)


def check_copy_is_valid(copy_path, expect):
    with tifffile.TiffFile(copy_path) as tf:
        assert tf.is_ome and not tf.is_bigtiff
        levels = tf.series[0].levels
        assert len(levels) == len(expect)
        for level, lv in enumerate(levels):
            got = gen.norm(lv.asarray())
            assert np.array_equal(got, expect[level]), 'level %d pixels' % level


def test_random_reads_equal_full_copy(scopefs, tmp_path):
    expect = make_source(scopefs.raw)
    a = scopefs.mount()
    vpath = a.path('registered', 'ref.ome.tif')
    size = os.stat(vpath).st_size
    full = read_all(vpath)
    assert len(full) == size, 'st_size must equal the bytes a sequential read returns'
    copy = tmp_path / 'copy.ome.tif'
    copy.write_bytes(full)
    check_copy_is_valid(copy, expect)
    segs = segment_bounds(copy)
    assert segs[-1][0] + segs[-1][1] <= size

    b = scopefs.mount()
    rng = random.Random(1234)
    reads = interesting_reads(size, segs, 300, rng)
    fd = os.open(b.path('registered', 'ref.ome.tif'), os.O_RDONLY)
    try:
        for off, length in reads:
            got = pread_all(fd, off, length)
            want = full[off:off + length]
            assert got == want, 'pread(off=%d, len=%d): %d bytes, first diff at %s' % (
                off, length, len(got),
                next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), 'length'))
    finally:
        os.close(fd)
    st = b.status()
    assert st['errors'] == 0
    assert st['tiles_computed'] > 0

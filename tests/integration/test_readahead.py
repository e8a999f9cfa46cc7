"""Read-ahead only for sequential readers, and never past what mem holds.

The kernel splits every read into 128 KiB requests.  Read-ahead used to
start at any request near where the last one ended, so the second piece of
a viewer's tile read, or of a header parse, queued `readahead` units (2 x
threads): opening a file computed 32 tiles at threads=16.  And 32 units of
4 MiB filled the default mem, so a cold `cp` evicted its own read-ahead
and loaded it again from disk.  Counts from .scopefs/status, not times.
"""

import random

import numpy as np
import tifffile

import gen
from conftest import read_all


def write_slide(raw, channels, size):
    a = gen.norm(gen.tissue(size, size, channels, seed=7))
    gen.write_ome(raw / 's.ome.tif', [a], ['c%d' % c for c in range(channels)], 0.5,
                  compression='zlib')
    return a


def test_opening_a_file_reads_nothing_ahead(scopefs):
    write_slide(scopefs.raw, 4, 2048)
    m = scopefs.mount(opts={'reg': 'off', 'threads': '16'})
    with open(m.path('registered', 's.ome.tif'), 'rb') as f:
        f.read(4096)
    st = m.status()
    # The kernel's first request (128 KiB) reaches unit 0; nothing more.
    assert st['prefetched'] == 0, st
    assert st['tiles_computed'] <= 1, st


def test_random_tile_reads_read_nothing_ahead(scopefs):
    write_slide(scopefs.raw, 4, 2048)
    m = scopefs.mount(opts={'reg': 'off', 'threads': '16'})
    path = m.path('registered', 's.ome.tif')
    with tifffile.TiffFile(path) as tf:
        pages = tf.series[0].levels[0].pages
        tiles = [(i, p.dataoffsets[i], p.databytecounts[i]) for p in pages
                 for i in range(len(p.dataoffsets))]
    rng = random.Random(3)
    picked = rng.sample(tiles, 20)
    with open(path, 'rb', buffering=0) as f:
        for _, off, n in picked:
            f.seek(off)
            assert len(f.read(n)) == n
    st = m.status()
    positions = len({i for i, _, _ in picked})  # tile positions (all channels: 1 unit)
    assert st['prefetched'] == 0, st
    # The kernel's own read-ahead past a tile may reach a neighbouring unit.
    assert st['tiles_computed'] <= positions + 4, (positions, st)


def test_cold_cp_does_not_evict_its_read_ahead(scopefs):
    # 8 uint16 channels of 512 x 512: 4 MiB units; 32 of them read ahead
    # (threads=16) were all of mem=128M, here 4x more than mem=32M.
    a = write_slide(scopefs.raw, 8, 2048)
    m = scopefs.mount(opts={'reg': 'off', 'threads': '16', 'mem': '32M'})
    data = read_all(m.path('registered', 's.ome.tif'), bs=128 << 10)
    st = m.status()
    assert st['disk_hits'] == 0, st
    copy = scopefs.tmp / 'copy.ome.tif'
    copy.write_bytes(data)
    got = gen.read_levels(copy)[0]
    assert np.array_equal(got, a)

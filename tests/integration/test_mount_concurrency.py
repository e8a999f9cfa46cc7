"""Concurrency and determinism: the bytes of a virtual file do not depend on
how many readers, how many workers, the order of reads or the cache state.

The reference is a sequential copy whose pixels are checked against the
source with tifffile (see test_mount_bytes.check_copy_is_valid)."""

import os
import random
import threading

import pytest

from conftest import read_all
from test_mount_bytes import check_copy_is_valid, make_source, pread_all, segment_bounds


@pytest.mark.slow
def test_concurrent_readers_and_determinism(scopefs, tmp_path):
    expect = make_source(scopefs.raw)
    name = 'ref.ome.tif'

    # 16 threads read random tiles at once from a cold mount.
    a = scopefs.mount()
    vpath = a.path('registered', name)
    # Tile offsets come from the virtual header (tifffile reads only the IFDs).
    tiles = segment_bounds(vpath)
    results = {}
    errors = []
    barrier = threading.Barrier(16)

    def reader(seed):
        rng = random.Random(seed)
        picks = [rng.choice(tiles) for _ in range(24)]
        fd = os.open(vpath, os.O_RDONLY)
        try:
            barrier.wait()
            for off, n in picks:
                results[(seed, off)] = (off, pread_all(fd, off, n))
        except Exception as ex:  # reported below, with the thread's seed
            errors.append((seed, repr(ex)))
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert a.status()['errors'] == 0

    # The sequential read of a fresh mount is the reference.
    b = scopefs.mount()
    full = read_all(b.path('registered', name))
    copy = tmp_path / 'copy.ome.tif'
    copy.write_bytes(full)
    check_copy_is_valid(copy, expect)
    assert segment_bounds(copy) == tiles
    for (seed, _), (off, data) in results.items():
        assert data == full[off:off + len(data)], 'thread %d tile at %d' % (seed, off)
        assert len(data) > 0

    # One worker, cold cache: the same bytes.
    c = scopefs.mount(opts={'threads': 1})
    assert c.status().get('threads', 1) == 1
    assert read_all(c.path('registered', name), bs=65536) == full

    # Reverse order, odd chunk size, cold cache: the same bytes.
    d = scopefs.mount()
    size = os.stat(d.path('registered', name)).st_size
    assert size == len(full)
    chunk = 777777
    parts = []
    fd = os.open(d.path('registered', name), os.O_RDONLY)
    try:
        end = size
        while end > 0:
            start = max(0, end - chunk)
            parts.append(pread_all(fd, start, end - start))
            end = start
    finally:
        os.close(fd)
    assert b''.join(reversed(parts)) == full
    for m in (a, b, c, d):
        assert m.status()['errors'] == 0

"""The disk cache seen from outside: it persists across mounts, never serves
a corrupted entry, respects cache_size, is invalidated when the source
changes, and survives kill -9 of the daemon.

Correctness is always judged by decoding the full copy with tifffile and
comparing with the source's levels (gen.expected_virtual_levels), or by byte
equality with such a checked copy."""

import os
import subprocess
import time

import numpy as np
import pytest
import tifffile

import gen
from conftest import is_mounted, read_all

NAME = 'slide.ome.tif'


def make_source(raw, seed=41, h=1500, w=1800, channels=2):
    """Uncompressed 2-level source: rewriting it with another seed keeps its size."""
    raw.mkdir(parents=True, exist_ok=True)
    a = gen.norm(gen.tissue(h, w, channels, seed=seed))
    gen.write_ome(raw / NAME, gen.pyramid(a, 2), ['A', 'B', 'C', 'D'][:channels], 0.5)
    return gen.expected_virtual_levels(gen.read_levels(raw / NAME))


def assert_pixels(data, expect, tmp_path):
    path = tmp_path / 'check.ome.tif'
    path.write_bytes(data)
    with tifffile.TiffFile(path) as tf:
        levels = tf.series[0].levels
        assert len(levels) == len(expect)
        for level, lv in enumerate(levels):
            assert np.array_equal(gen.norm(lv.asarray()), expect[level]), 'level %d' % level
    path.unlink()


def cache_entries(cache):
    return sorted(p for p in cache.rglob('*.sfc') if p.is_file())


def cache_bytes(cache):
    return sum(p.stat().st_size for p in cache.rglob('*') if p.is_file())


def test_cache_persists_across_remount(scopefs, tmp_path):
    expect = make_source(scopefs.raw)
    cache = tmp_path / 'cache'
    a = scopefs.mount(cache=cache)
    first = read_all(a.path('registered', NAME))
    assert_pixels(first, expect, tmp_path)
    st = a.status()
    assert st['tiles_computed'] > 0 and st['errors'] == 0
    a.unmount()
    assert cache_entries(cache), 'no cache entries written'

    b = scopefs.mount(cache=cache)
    second = read_all(b.path('registered', NAME))
    st = b.status()
    assert second == first
    assert st['tiles_computed'] == 0, st
    assert st['disk_hits'] > 0, st
    assert st['errors'] == 0


def test_readahead_zero_schedules_nothing(scopefs, tmp_path):
    """A sequential read schedules the next tiles by default; readahead=0
    turns that off, and the bytes are the same."""
    expect = make_source(scopefs.raw)
    got = {}
    for label, opts in (('default', {}), ('off', {'readahead': '0'})):
        m = scopefs.mount(cache=tmp_path / ('cache-' + label), opts=opts)
        got[label] = read_all(m.path('registered', NAME))
        got[label + ' status'] = m.status()
        m.unmount()
    assert_pixels(got['off'], expect, tmp_path)
    assert got['off'] == got['default']
    assert got['default status']['prefetched'] > 0, got['default status']
    assert got['off status']['prefetched'] == 0, got['off status']


def test_corrupted_entries_are_recomputed(scopefs, tmp_path):
    expect = make_source(scopefs.raw)
    cache = tmp_path / 'cache'
    a = scopefs.mount(cache=cache)
    first = read_all(a.path('registered', NAME))
    assert_pixels(first, expect, tmp_path)
    a.unmount()

    entries = cache_entries(cache)
    assert len(entries) >= 4
    for i, p in enumerate(entries[:4]):
        data = bytearray(p.read_bytes())
        if i == 3:
            data = data[:len(data) // 2]  # a torn entry
        else:
            for k in range(8):
                pos = (len(data) * (k + 2)) // 11
                data[pos] ^= 0x5A
        p.write_bytes(bytes(data))

    b = scopefs.mount(cache=cache)
    second = read_all(b.path('registered', NAME))
    st = b.status()
    assert second == first
    assert st['tiles_computed'] >= 4, st
    assert st['errors'] == 0
    log = b.log_text()
    assert 'dropped bad entry' in log, log


@pytest.mark.slow
def test_cache_size_is_respected(scopefs, tmp_path):
    expect = make_source(scopefs.raw, h=2000, w=2100, channels=1)
    cache = tmp_path / 'cache'
    unit = 512 * 512 * 2  # one raw tile of this 1-channel uint16 file
    bound = 2 * 1024 * 1024
    m = scopefs.mount(cache=cache, opts={'cache_size': '2M'})
    data = read_all(m.path('registered', NAME))
    assert_pixels(data, expect, tmp_path)
    # Eviction may finish just after the read: allow a moment.
    deadline = time.monotonic() + 5
    while cache_bytes(cache) > bound + unit and time.monotonic() < deadline:
        time.sleep(0.1)
    used = cache_bytes(cache)
    du = int(subprocess.run(['du', '-sb', str(cache)], capture_output=True,
                            text=True).stdout.split()[0])
    assert used <= bound + unit, 'cache holds %d bytes, bound 2M + one entry' % used
    assert du <= bound + unit + 64 * 1024, du
    st = m.status()
    assert st['cache_bytes'] <= bound + unit, st
    assert st.get('cache_evicted', 1) > 0, st
    assert st['errors'] == 0


def test_changed_source_invalidates(scopefs, tmp_path):
    expect = make_source(scopefs.raw, seed=41)
    src = scopefs.raw / NAME
    cache = tmp_path / 'cache'
    a = scopefs.mount(cache=cache)
    first = read_all(a.path('registered', NAME))
    assert_pixels(first, expect, tmp_path)
    a.unmount()

    # Same bytes, new mtime: entries are keyed by the source's identity.
    st0 = os.stat(src)
    os.utime(src, ns=(st0.st_atime_ns, st0.st_mtime_ns + 10**9))
    b = scopefs.mount(cache=cache)
    assert read_all(b.path('registered', NAME)) == first
    assert b.status()['tiles_computed'] > 0
    b.unmount()

    # New pixels, same file size: the new content is served.
    size0 = os.stat(src).st_size
    expect2 = make_source(scopefs.raw, seed=42)
    assert os.stat(src).st_size == size0, 'the rewrite should keep the size'
    c = scopefs.mount(cache=cache)
    third = read_all(c.path('registered', NAME))
    assert third != first
    assert_pixels(third, expect2, tmp_path)
    assert c.status()['errors'] == 0


@pytest.mark.slow
def test_kill9_mid_read_then_remount(scopefs, tmp_path):
    expect = make_source(scopefs.raw, h=2600, w=2600, channels=3)
    cache = tmp_path / 'cache'
    mnt = tmp_path / 'mnt_kill'
    a = scopefs.mount(cache=cache, mnt=mnt)
    vpath = a.path('registered', NAME)
    size = os.stat(vpath).st_size
    got = 0
    failed = None
    fd = os.open(vpath, os.O_RDONLY)
    while True:
        if got > size * 2 // 5 and a.proc.poll() is None:
            a.kill9()
        try:
            b = os.read(fd, 256 * 1024)
        except OSError as ex:
            failed = ex
            break
        if not b:
            break
        got += len(b)
    try:
        os.close(fd)  # flush on a dead connection fails with ENOTCONN
    except OSError:
        pass
    print("killed after %d of %d bytes: %r" % (got, size, failed))
    assert failed is not None or got == size
    assert a.proc is None or a.proc.poll() is not None
    subprocess.run(['fusermount3', '-u', '-z', str(mnt)], capture_output=True)
    assert not is_mounted(mnt)

    b = scopefs.mount(cache=cache, mnt=mnt)
    data = read_all(b.path('registered', NAME))
    assert len(data) == size
    assert_pixels(data, expect, tmp_path)
    assert b.status()['errors'] == 0

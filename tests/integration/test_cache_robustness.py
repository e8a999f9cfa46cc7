"""The disk cache under hostile conditions, seen through a mount: a FIFO at an
entry's name, the cache folder removed and made again while mounted, a full
file system (a small tmpfs), and entries the mount cannot delete.

Pixels are judged by decoding the whole virtual file with tifffile and
comparing with the source's levels (gen.expected_virtual_levels); cache
behaviour by walking the cache folder and by .scopefs/status.  The tmpfs and
immutable-file cases need root and are skipped otherwise."""

import os
import subprocess
import threading

import pytest

from conftest import read_all
from test_mount_cache import NAME, assert_pixels, make_source


def entries(cache):
    return sorted(p for p in cache.glob('[0-9a-f][0-9a-f]/*.sfc'))


@pytest.fixture
def tmpfs(tmp_path, request):
    """A small tmpfs (2 MiB, or the size given by indirect parametrization):
    a full disk on demand; skipped when mount is not allowed."""
    if os.geteuid() != 0:
        pytest.skip('mounting a tmpfs needs root')
    size = getattr(request, 'param', '2m')
    small = tmp_path / 'small'
    small.mkdir()
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=' + size, 'tmpfs', str(small)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip('cannot mount a tmpfs: %s' % r.stderr.decode(errors='replace'))
    yield small
    subprocess.run(['umount', '-l', str(small)], capture_output=True)


def test_fifo_entry_is_dropped_not_waited_on(scopefs, tmp_path):
    expect = make_source(scopefs.raw, h=1000, w=1200, channels=1)
    cache = tmp_path / 'cache'
    a = scopefs.mount(cache=cache)
    good = read_all(a.path('registered', NAME))
    a.unmount()
    fifo = entries(cache)[0]
    fifo.unlink()
    os.mkfifo(fifo)
    b = scopefs.mount(cache=cache)
    got = {}
    t = threading.Thread(target=lambda: got.update(d=read_all(b.path('registered', NAME))),
                         daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():
        b.kill9()
        pytest.fail('a read hangs on the FIFO at %s' % fifo)
    assert got['d'] == good
    assert_pixels(got['d'], expect, tmp_path)
    assert 'not a regular file' in b.log_text()
    assert b.status()['cache_corrupt'] >= 1


def test_cache_folder_removed_and_made_again(scopefs, tmp_path):
    expect = make_source(scopefs.raw, h=1500, w=1500, channels=1)
    cache = tmp_path / 'cache'
    a = scopefs.mount(cache=cache)
    subprocess.run(['rm', '-rf', str(cache)], check=True)
    cache.mkdir()
    data = read_all(a.path('registered', NAME))
    assert_pixels(data, expect, tmp_path)
    st = a.status()
    log = a.log_text()
    assert len(entries(cache)) == st['cache_written'] > 0, 'entries land in the new folder'
    assert (cache / 'SCOPEFS_CACHE').read_bytes() == b'scopefs cache format 1\n'
    assert log.count('was removed during the mount') == 1
    assert 'cannot create cache folder' not in log
    a.unmount()
    b = scopefs.mount(cache=cache)
    assert read_all(b.path('registered', NAME)) == data
    assert b.status()['disk_hits'] > 0


def test_full_disk_one_error_and_one_log_line(scopefs, tmp_path, tmpfs):
    # 2 MiB file system, default cache_size (20G): puts hit ENOSPC.
    expect = make_source(scopefs.raw, seed=5, h=3000, w=3000, channels=2)
    a = scopefs.mount(cache=tmpfs / 'c')
    assert_pixels(read_all(a.path('registered', NAME)), expect, tmp_path)
    st = a.status()
    log = a.log_text()
    a.unmount()
    lines = [ln for ln in log.splitlines() if 'No space left' in ln]
    full = [r for r in st['recent_errors'] if 'No space left' in r['message']]
    assert len(lines) <= 1, 'the log is not flooded: %d lines' % len(lines)
    assert len(full) <= 1, 'repeats are one recent_errors entry: %r' % full
    for r in full:
        assert str(tmpfs / 'c') + ': disk cache full' in r['message']
        assert '.sfc' not in r['message']
    assert st['cache_evicted'] > 0, 'a full disk evicts'


@pytest.mark.parametrize('tmpfs', ['4m'], indirect=True)
def test_full_disk_evicts_old_entries(scopefs, tmp_path, tmpfs):
    # Slide A fills the tmpfs; slide B (which fits) must then be cached.
    raw_a, raw_b = tmp_path / 'rawA', tmp_path / 'rawB'
    make_source(raw_a, seed=5, h=3000, w=3000, channels=2)
    expect_b = make_source(raw_b, seed=6, h=1200, w=1200, channels=1)
    cache = tmpfs / 'c'
    a = scopefs.mount(raw=raw_a, cache=cache)
    read_all(a.path('registered', NAME))
    a.unmount()
    # Four workers: a put that finds the disk full while another worker is
    # evicting waits for that eviction and writes again (it used to leave
    # its tile uncached, so B's second read computed tiles again).
    b = scopefs.mount(raw=raw_b, cache=cache, opts={'threads': '4'})
    first = read_all(b.path('registered', NAME))
    assert_pixels(first, expect_b, tmp_path)
    st1 = b.status()
    b.unmount()
    c = scopefs.mount(raw=raw_b, cache=cache, opts={'threads': '4'})
    assert read_all(c.path('registered', NAME)) == first
    st2 = c.status()
    print('B first read', {k: st1[k] for k in ('tiles_computed', 'disk_hits', 'cache_written',
                                                'cache_evicted')})
    print('B again', {k: st2[k] for k in ('tiles_computed', 'disk_hits', 'cache_written',
                                          'cache_evicted')})
    assert st1['cache_evicted'] > 0
    # Every unit B computed was cached: none is computed again.
    assert st2['tiles_computed'] == 0 and st2['disk_hits'] == st1['tiles_computed'], st2


def test_unremovable_entries_logged_and_skipped(scopefs, tmp_path):
    raw_a, raw_b = tmp_path / 'rawA', tmp_path / 'rawB'
    make_source(raw_a, seed=5, h=3000, w=3000, channels=2)
    expect_b = make_source(raw_b, seed=6, h=3000, w=3000, channels=2)
    cache = tmp_path / 'cache'
    a = scopefs.mount(raw=raw_a, cache=cache)
    read_all(a.path('registered', NAME))
    a.unmount()
    old = [str(p) for p in entries(cache)]
    if subprocess.run(['chattr', '+i'] + old, capture_output=True).returncode != 0:
        pytest.skip('chattr +i not possible here (not root, or the file system lacks it)')
    try:
        b = scopefs.mount(raw=raw_b, cache=cache, opts={'cache_size': '8M'})
        assert_pixels(read_all(b.path('registered', NAME)), expect_b, tmp_path)
        st = b.status()
        log = b.log_text()
        b.unmount()
    finally:
        subprocess.run(['chattr', '-i'] + old, capture_output=True)
    lines = [ln for ln in log.splitlines() if 'cannot remove' in ln]
    assert len(lines) == 1 and str(cache) in lines[0] and 'not permitted' in lines[0], lines
    assert st['cache_written'] - st['cache_evicted'] > 0, 'some fresh entries kept: %r' % st
    own = sum(p.stat().st_size for p in entries(cache) if str(p) not in set(old))
    assert 0 < own <= 8 << 20

"""Lookups while scopefs registers slides itself (reg=auto).

The kernel sends one lookup at a time into a folder.  A lookup of a moving
slide in registered/ used to wait there for its registration, so every other
name in registered/ waited behind it: a stat of the reference, which needs no
registration, took 1.9-3.5 s, and a listing of registered/ (readdir waited
too) held up opening a reference tile for 4.5 s.  Now the moving slide's
lookup is answered at once (its size is the reference layout's), and
getattr, open and opendir, which hold no folder lock, wait to say whether it
exists: a slide the guard rejects still never shows.

Also: opening transforms/<stem>.field.mhd (a 300-byte header) built the whole
field (MBs) at each open; now the small text files are made once per mount.
"""
import errno
import os
import threading
import time

import numpy as np
import pytest

import gen

SIZE = 1024
MOVING = ['m%d' % i for i in range(1, 8)]  # 7 slides: seconds of registration on 2 cores
FAST_S = 0.5  # generous: these answer in milliseconds when nothing waits


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """a_ref, the moving slides (the same tissue: the registration still runs
    every step), u_user with a transform file, z_blank (rejected)."""
    root = tmp_path_factory.mktemp('lookup')
    raw, user = root / 'raw', root / 'user'
    raw.mkdir()
    user.mkdir()
    levels = gen.pyramid(gen.norm(gen.tissue(SIZE, SIZE, channels=2, seed=5)), 2)
    for stem in ['a_ref', 'u_user'] + MOVING:
        gen.write_ome(raw / (stem + '.ome.tif'), levels, names=['DAPI', 'CD3'], tile=256)
    gen.write_ome(raw / 'z_blank.ome.tif',
                  [gen.norm(np.zeros((2, SIZE, SIZE, 1), np.uint16))], names=['DAPI', 'CD3'])
    (user / 'u_user.json').write_text(
        '{"scopefs_transform": 1, "matrix": [[1, 0, 2], [0, 1, 0], [0, 0, 1]]}')
    return {'raw': raw, 'user': user}


def mount(scopefs, data):
    # threads=1: the job registers one slide at a time, so it lasts seconds
    # on any machine and the probes below land while it runs
    return scopefs.mount(raw=data['raw'],
                         opts={'reference': 'a_ref', 'transforms': data['user'], 'threads': 1})


def registering(m):
    return [s['name'] for s in m.status()['slides'] if s['state'].startswith('registering')]


def timed(fn):
    t0 = time.monotonic()
    try:
        out = fn()
    except OSError as ex:
        out = ex.errno
    return time.monotonic() - t0, out


def in_thread(results, key, fn):
    t = threading.Thread(target=lambda: results.__setitem__(key, timed(fn)))
    t.start()
    return t


def test_lookups_in_registered_do_not_wait_for_a_registration(scopefs, data):
    m = mount(scopefs, data)
    reg = m.path('registered')
    os.stat(reg)
    got = {}
    waiter = in_thread(got, 'm5', lambda: os.stat(reg / 'm5.ome.tif').st_size)
    time.sleep(0.3)  # its lookup is in, the job has started
    probes = {name: timed(lambda: os.path.exists(reg / name))
              for name in ('a_ref.ome.tif', 'u_user.ome.tif', 'nothere.ome.tif', 'a_ref')}
    running = registering(m)
    waiter.join()
    slow = {k: '%.2f s' % v[0] for k, v in probes.items() if v[0] > FAST_S}
    assert not slow, 'lookups waited for the registration: %s' % slow
    assert running, 'the registration ended before the probes: they prove nothing'
    assert [v[1] for v in probes.values()] == [True, True, False, False], probes
    # the moving slide's own stat did wait, and saw the served file's size
    assert got['m5'][1] == os.stat(reg / 'm5.ome.tif').st_size > 0, got


def test_a_listing_does_not_hold_up_the_reference_and_stays_true(scopefs, data):
    m = mount(scopefs, data)
    reg = m.path('registered')
    os.stat(reg)
    got = {}
    threads = [in_thread(got, 'ls', lambda: sorted(os.listdir(reg))),
               in_thread(got, 'stat', lambda: os.stat(reg / 'z_blank.ome.tif')),
               in_thread(got, 'open', lambda: open(reg / 'z_blank.ome.tif', 'rb').close())]
    time.sleep(0.3)

    def read_reference():
        with open(reg / 'a_ref.ome.tif', 'rb') as f:
            return len(f.read(65536))

    ref = timed(read_reference)
    running = registering(m)
    for t in threads:
        t.join()
    assert ref[0] < FAST_S, 'opening the reference waited %.2f s behind a listing' % ref[0]
    assert ref[1] == 65536, ref
    assert running, 'the registration ended before the probe: it proves nothing'
    # the listing waited for the job and shows no rejected slide; the rejected
    # slide's stat and open said it does not exist
    want = sorted(s + '.ome.tif' for s in ['a_ref', 'u_user'] + MOVING)
    assert got['ls'][1] == want, got['ls']
    assert got['stat'][1] == errno.ENOENT, got['stat']
    assert got['open'][1] == errno.ENOENT, got['open']
    assert not os.path.exists(reg / 'z_blank.ome.tif')
    assert 'rejected' in {s['name']: s['state'] for s in m.status()['slides']}['z_blank']


def test_the_field_header_does_not_build_the_field_at_each_open(scopefs, data):
    m = mount(scopefs, data)
    tdir = m.path('transforms')
    os.listdir(tdir)  # waits for the job
    raw_size = os.stat(tdir / 'm1.field.raw').st_size
    assert raw_size > 4 << 20, raw_size  # else the old cost would not show
    cost = {}
    for name in ('m1.json', 'm1.field.mhd'):
        head = (tdir / name).read_bytes()
        t0 = time.monotonic()
        for _ in range(100):
            with open(tdir / name, 'rb') as f:
                assert f.read() == head
        cost[name] = time.monotonic() - t0
    assert b'ElementDataFile = m1.field.raw' in (tdir / 'm1.field.mhd').read_bytes()
    # each open used to build the whole field (2.5 ms here, 25x the .json)
    assert cost['m1.field.mhd'] < 3 * cost['m1.json'] + 0.03, cost

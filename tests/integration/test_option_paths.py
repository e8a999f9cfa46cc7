"""Path options through the real binary, and the deconv-scale record.

- cache= and log= are resolved as the kernel will resolve them once their
  folders exist (".." after a folder that does not exist yet, ".", "//"),
  and refused inside RAW_DIR or MOUNTPOINT (exit 2, nothing written there);
  status shows the normalised cache folder.
- A comma inside a value is written "\\," on the command line and in a
  preset, as in libfuse's -o lists.
- CACHE/deconv-scale-<key>.txt names its stack's key inside its XXH64: a
  record swapped with another stack's, or of the older form without a key,
  is sampled again and rewritten (same bytes as a first mount); a FIFO at
  its name does not hang reads; stale temporary records are removed.

Oracles: paths spelled out by hand, the file tree of RAW_DIR, the bytes of
a first mount with an empty cache, and the record's check recomputed here
(libxxhash through ctypes over bytes laid out by struct).
"""
import ctypes
import ctypes.util
import os
import struct
import threading
import time

import numpy as np
import tifffile

from conftest import read_all, tree

import gen

OPTICS = {'dxy': '0.4', 'dz': '1.2', 'lambda_ex': '561', 'lambda_em': '600',
          'deconv_block': '16', 'threads': '2'}

_xx = ctypes.CDLL(ctypes.util.find_library('xxhash'))
_xx.XXH64.restype = ctypes.c_uint64
_xx.XXH64.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64]


def xxh64(b):
    return _xx.XXH64(bytes(b), len(b), 0)


def refused(scopefs, opts, mnt=None):
    mnt = mnt or scopefs.tmp / 'mnt'
    mnt.mkdir(exist_ok=True)
    r = scopefs.run(['-o', opts, str(scopefs.raw), str(mnt)])
    return r.returncode, r.stderr.decode(errors='replace')


def test_dotdot_into_raw_refused(scopefs):
    tifffile.imwrite(scopefs.raw / 'a.tif', np.zeros((64, 64), np.uint8))
    before = tree(scopefs.raw)
    t = scopefs.tmp
    for opts, key in (('cache=%s/nothere/../raw/cache' % t, 'cache'),
                      ('cache=%s/a/b/../../raw/./c' % t, 'cache'),
                      ('cache=%s/c,log=%s/nothere/../raw/scopefs.log' % (t, t), 'log')):
        rc, err = refused(scopefs, opts)
        assert rc == 2, (opts, err)
        assert "option '%s'" % key in err and 'inside RAW_DIR' in err, err
        assert str(t / 'raw') in err, err
    assert tree(scopefs.raw) == before


def test_inside_mountpoint_refused(scopefs):
    t = scopefs.tmp
    mnt = t / 'mnt'
    for opts, key in (('cache=%s/cache' % mnt, 'cache'),
                      ('cache=%s' % mnt, 'cache'),
                      ('cache=%s/nothere/../mnt/c' % t, 'cache'),
                      ('cache=%s/c,log=%s/scopefs.log' % (t, mnt), 'log')):
        rc, err = refused(scopefs, opts, mnt)
        assert rc == 2, (opts, err)
        assert "option '%s'" % key in err and "inside MOUNTPOINT '%s'" % mnt in err, err
    assert os.listdir(mnt) == []


def test_status_shows_normalised_paths(scopefs):
    tifffile.imwrite(scopefs.raw / 'a.tif', np.zeros((64, 64), np.uint8))
    t = scopefs.tmp
    (t / 'logs').mkdir()
    m = scopefs.mount(cache=t / 'x' / '..' / 'new' / '.' / 'cache',
                      opts={'reg': 'off', 'log': '%s//logs/./a/../s.log' % t})
    assert m.status()['cache_dir'] == str(t / 'new' / 'cache')
    m.unmount()
    assert (t / 'new' / 'cache').is_dir() and not (t / 'x').exists()
    assert 'scopefs' in (t / 'logs' / 's.log').read_text()


def test_comma_in_reference(scopefs):
    for n in ('A.tif', 'HE, case 1.svs'):
        tifffile.imwrite(scopefs.raw / n, np.zeros((300, 400), np.uint8), tile=(128, 128))
    m = scopefs.mount(opts={'reg': 'off', 'reference': 'HE\\, case 1.svs'})
    assert m.status()['reference'] == 'HE, case 1'
    m.unmount()
    preset = scopefs.tmp / 'preset'
    preset.write_text('reference = HE\\, case 1.svs\n')
    m = scopefs.mount(opts={'reg': 'off', 'preset': str(preset)})
    assert m.status()['reference'] == 'HE, case 1'
    m.unmount()
    rc, err = refused(scopefs, 'reference=HE, case 1.svs')
    assert rc == 2 and "unknown option ' case 1.svs'" in err, err


# ------------------------------------------------------------ scale records

def record_fields(path):
    w = path.read_text().split('\n')[0].split()
    assert w[0::2] == ['dmin', 'dmax', 'key', 'xxh64'], w
    return float.fromhex(w[1]), float.fromhex(w[3]), w[5], int(w[7], 16)


def check_record(path):
    """The record names its own file's key, and its check is the XXH64 of
    the two doubles and that key (docs/cache-format.md)."""
    lo, hi, key, check = record_fields(path)
    assert path.name == 'deconv-scale-%s.txt' % key
    assert check == xxh64(struct.pack('<dd', lo, hi) + key.encode())
    return lo, hi


def planes_of(m, stack, names):
    return [read_all(m.path('deconvolved', stack, n)) for n in names]


def two_stacks(scopefs):
    names = {}
    for stack, seed in (('sa', 3), ('sb', 9)):
        vol = gen.beads(12, 40, 52, seed=seed)
        os.makedirs(scopefs.raw / stack)
        names[stack] = []
        for z in range(vol.shape[0]):
            n = 'img_%06d.tif' % (z + 1)
            tifffile.imwrite(scopefs.raw / stack / n, vol[z], metadata=None)
            names[stack].append(n)
    first = scopefs.mount(opts=OPTICS)
    want = {s: planes_of(first, s, names[s]) for s in names}
    first.unmount()
    records = sorted(first.cache.glob('deconv-scale-*.txt'))
    assert len(records) == 2
    return names, want, records


def dmin_dmax(path):
    w = path.read_text().split()
    return float.fromhex(w[1]), float.fromhex(w[3])


def test_swapped_scale_records_resampled(scopefs):
    names, want, records = two_stacks(scopefs)
    ranges = [dmin_dmax(r) for r in records]
    assert ranges[0] != ranges[1]
    cache = scopefs.tmp / 'swapped'
    cache.mkdir()
    (cache / records[0].name).write_text(records[1].read_text())
    (cache / records[1].name).write_text(records[0].read_text())
    m = scopefs.mount(opts=OPTICS, cache=cache)
    got = {s: planes_of(m, s, names[s]) for s in names}
    m.unmount()
    assert got == want
    log = m.log_text()
    assert log.count('scale record of another stack') == 2, log
    assert [check_record(cache / r.name) for r in records] == ranges


def test_old_form_and_fifo_records_resampled(scopefs):
    names, want, records = two_stacks(scopefs)
    ranges = [dmin_dmax(r) for r in records]
    cache = scopefs.tmp / 'odd'
    cache.mkdir()
    lo, hi = ranges[0]
    # the form before the key was added: check of the two doubles alone,
    # with a doubled dmax it would have been trusted
    old = 'dmin %s dmax %s xxh64 %016x\n' % (lo.hex(), (2 * hi).hex(),
                                             xxh64(struct.pack('<dd', lo, 2 * hi)))
    (cache / records[0].name).write_text(old)
    os.mkfifo(cache / records[1].name)
    stale = cache / (records[1].name + '.tmp.999999')
    fresh = cache / (records[0].name + '.tmp.999998')
    for p, age in ((stale, 1000), (fresh, 10)):
        p.write_text('dmin 0x0p+0')
        os.utime(p, (time.time() - age, time.time() - age))
    m = scopefs.mount(opts=OPTICS, cache=cache)
    got = {}

    def read():
        got.update({s: planes_of(m, s, names[s]) for s in names})
    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(60)
    if t.is_alive():
        m.kill9()
        raise AssertionError('reading deconvolved/ hangs on a FIFO scale record')
    m.unmount()
    assert got == want
    log = m.log_text()
    assert 'older form' in log and 'not a regular file' in log, log
    assert [check_record(cache / r.name) for r in records] == ranges
    assert not stale.exists() and fresh.exists()


def test_log_file_has_the_mount_build_warnings(scopefs, tmp_path):
    # A stack without optics is left out with a warning while the mount is
    # built, before stderr becomes log=FILE: a batch job that keeps only
    # FILE must still learn why (it went to the terminal only).
    gen.write_planes(scopefs.raw / 'stack', 4, 32, 32)
    log = tmp_path / 'daemon.log'
    m = scopefs.mount(opts={'log': str(log)})
    text = log.read_text()
    assert 'stack stack left out: deconvolution needs dxy and dz' in text, text
    assert text.count('left out') == 1, text
    assert m.status()['stacks'][0]['state'].startswith('not served')

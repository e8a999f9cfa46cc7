"""The mounted tree: raw/ is a byte-exact read-only passthrough of RAW_DIR,
links leaving RAW_DIR are hidden, every write fails with EROFS, and RAW_DIR
is left exactly as it was."""

import errno
import hashlib
import os
import subprocess

import numpy as np
import pytest

import gen
from conftest import tree


def hash_tree(root):
    """{relative path: sha256} of every regular file, plus the set of all entries."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = 'link:' + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = 'dir'
            else:
                with open(p, 'rb') as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def make_dataset(raw, outside):
    a = gen.norm(gen.tissue(1200, 1000, 3, seed=1))
    gen.write_ome(raw / 'slide_a.ome.tif', gen.pyramid(a, 2), ['DAPI', 'CD3', 'CD8'])
    b = gen.norm(gen.tissue(800, 900, 1, np.uint8, seed=2))
    gen.write_ome(raw / 'slide_b.ome.tif', [b], ['Gray'])
    (raw / 'notes.txt').write_text('scan notes\n')
    (raw / 'sub' / 'deeper').mkdir(parents=True)
    (raw / 'sub' / 'meta.json').write_text('{"x": 1}\n')
    (raw / 'sub' / 'deeper' / 'blob.bin').write_bytes(os.urandom(300001))
    (raw / 'empty.dat').write_bytes(b'')
    secret = outside / 'secret.txt'
    secret.write_text('outside RAW_DIR\n')
    os.symlink(secret, raw / 'escape.txt')
    os.symlink(outside, raw / 'escape_dir')


def expect_erofs(fn, *args):
    with pytest.raises(OSError) as ei:
        fn(*args)
    assert ei.value.errno == errno.EROFS, '%s%r: %s' % (fn.__name__, args, ei.value)


def test_tree_and_raw_passthrough(scopefs, tmp_path):
    outside = tmp_path / 'outside'
    outside.mkdir()
    make_dataset(scopefs.raw, outside)
    before = hash_tree(scopefs.raw)
    m = scopefs.mount()

    top = set(os.listdir(m.mnt))
    assert {'raw', 'registered', '.scopefs'} <= top, top

    # raw/: same names, kinds, sizes and bytes, links out of RAW_DIR hidden.
    want = {k: v for k, v in tree(scopefs.raw).items() if not k.startswith('escape')}
    got = tree(m.path('raw'))
    assert got == want
    assert not os.path.lexists(m.path('raw', 'escape.txt'))
    assert not os.path.lexists(m.path('raw', 'escape_dir'))
    for rel, (kind, size) in want.items():
        if kind != 'file':
            continue
        with open(scopefs.raw / rel, 'rb') as f:
            orig = f.read()
        with open(m.path('raw', rel), 'rb') as f:
            served = f.read()
        assert len(served) == size and served == orig, rel
        assert os.stat(m.path('raw', rel)).st_size == size, rel

    # Writes of every kind fail with EROFS, in raw/, registered/ and the root.
    raw_file = m.path('raw', 'notes.txt')
    reg_file = m.path('registered', 'slide_a.ome.tif')
    assert reg_file.exists()
    for target in (raw_file, reg_file):
        expect_erofs(os.open, target, os.O_WRONLY)
        expect_erofs(os.open, target, os.O_RDWR)
        expect_erofs(os.open, target, os.O_WRONLY | os.O_TRUNC)
        expect_erofs(os.truncate, target, 0)
        expect_erofs(os.chmod, target, 0o777)
        expect_erofs(os.unlink, target)
        expect_erofs(os.rename, target, str(target) + '.moved')
        expect_erofs(os.utime, target, (0, 0))
    for folder in (m.path('raw'), m.path('raw', 'sub'), m.path('registered'), m.mnt):
        expect_erofs(os.open, folder / 'new.tif', os.O_WRONLY | os.O_CREAT, 0o644)
        expect_erofs(os.mkdir, folder / 'newdir')
        expect_erofs(os.symlink, '/etc/passwd', folder / 'link')
    expect_erofs(os.rmdir, m.path('raw', 'sub', 'deeper'))
    expect_erofs(os.link, raw_file, m.path('raw', 'hard'))
    # The shell tools say so too.
    for cmd in (['touch', str(m.path('raw', 'touched'))], ['rm', '-f', str(raw_file)],
                ['mkdir', str(m.path('raw', 'd'))], ['mv', str(raw_file), str(raw_file) + '.x'],
                ['chmod', '000', str(raw_file)]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode != 0 and 'Read-only file system' in r.stderr, (cmd, r.stderr)

    # Reads still work after all that, and RAW_DIR is unchanged.
    assert m.path('raw', 'notes.txt').read_text() == 'scan notes\n'
    m.unmount()
    assert m.returncode == 0
    assert hash_tree(scopefs.raw) == before


def test_raw_left_out_entries_are_problems(scopefs, tmp_path):
    # raw/ leaves out what it cannot mirror; each such entry is in
    # `problems` (docs/architecture.md), at any depth, so a `cp -r raw/`
    # user can see what is missing.  These used to be logged (or not) only.
    deep = scopefs.raw
    for i in range(1, 71):
        deep = deep / ('d%d' % i)
    deep.mkdir(parents=True)
    (deep / 'f.txt').write_text('deep')
    nested = scopefs.raw / 'a' / 'b'
    nested.mkdir(parents=True)
    (tmp_path / 'outside.txt').write_text('outside')
    os.symlink(tmp_path / 'outside.txt', nested / 'out.txt')
    os.mkfifo(nested / 'pipe')
    (nested / 'kept.txt').write_text('kept')
    m = scopefs.mount(opts={'reg': 'off'})
    problems = {p['path']: p['reason'] for p in m.status()['problems']}
    too_deep = str(scopefs.raw) + ''.join('/d%d' % i for i in range(1, 66))
    assert 'more than 64 levels deep' in problems.get(too_deep, ''), problems
    assert 'symbolic link left out' in problems.get(str(nested / 'out.txt'), ''), problems
    assert problems.get(str(nested / 'pipe')) == 'not a regular file (fifo)', problems
    with open(m.path('raw', 'a', 'b', 'kept.txt')) as f:
        assert f.read() == 'kept'

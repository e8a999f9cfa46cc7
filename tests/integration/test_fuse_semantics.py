"""File-system semantics that tools other than image readers rely on.

- The daemon raises its open-file soft limit to the hard one: started with
  a soft limit of 256, it still holds 400 raw/ files open for a client
  (one daemon descriptor per open raw/ file; EMFILE reached readers as EIO).
- .scopefs/status has st_blocks for its size: `tar -S` and `du` read a
  file with st_size > 0 and no blocks as all hole (tar archived zeros).
- A mountpoint whose path holds '"' cannot be written into elastix
  parameter files: those files are left out of transforms/ with a problem,
  and every listed entry can be stat'ed (`ls -l`, `rsync -a`).
- A fifo, socket or device in RAW_DIR is left out with a problem naming
  it, and a plane folder with such a member is not served with a plane
  missing.
- allow_other implies default_permissions, and files derived from a source
  are no more readable than it: user nobody reads neither a 0600 file in
  raw/ nor the registered/ file of a 0600 slide.
- SIGTERM ends scopefs's own registration: sent during the micro pass while
  a lookup waits for registration, the daemon exits within seconds, and
  nothing half-done is cached.
"""
import json
import os
import pwd
import resource
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
import tempfile
import threading
import time

import numpy as np
import pytest

from conftest import is_mounted
from gen import norm, pyramid, tissue, write_ome, write_planes


def test_open_file_limit_raised(scopefs):
    for i in range(400):
        (scopefs.raw / ('f%d.txt' % i)).write_text('%d\n' % i)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1000:
        pytest.skip('hard open-file limit %d is too low to test' % hard)
    # The daemon inherits a low soft limit (the usual 1024, smaller here).
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        m = scopefs.mount()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with open('/proc/%d/limits' % m.pid) as f:
        line = next(ln for ln in f if ln.startswith('Max open files'))
    assert line.split()[3:5] == [str(hard), str(hard)], line
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1000), hard))
    fds = []
    try:
        for i in range(400):
            fds.append(os.open(m.path('raw', 'f%d.txt' % i), os.O_RDONLY))
        assert os.pread(fds[399], 16, 0) == b'399\n'
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_status_has_blocks_for_tar_sparse(scopefs, tmp_path):
    (scopefs.raw / 'a.txt').write_text('hi\n')
    m = scopefs.mount()
    st = os.stat(m.path('.scopefs', 'status'))
    assert st.st_size > 0 and st.st_blocks * 512 >= st.st_size
    archive = tmp_path / 's.tar'
    subprocess.run(['tar', '-S', '-cf', str(archive), '-C', str(m.mnt), '.scopefs/status'],
                   check=True)
    with tarfile.open(archive) as t:
        data = t.extractfile('.scopefs/status').read()
    assert json.loads(data)['problems'] == []


def registration_pair(raw, size=(600, 700)):
    a = tissue(size[0], size[1], 1, seed=7)
    write_ome(raw / 'aref.ome.tif', pyramid(norm(a), 1), ['DAPI'])
    b = np.roll(a, (0, 9, -13), axis=(0, 1, 2))
    write_ome(raw / 'bmov.ome.tif', pyramid(norm(b), 1), ['DAPI'])


def test_quote_in_mountpoint_leaves_elastix_files_out(scopefs, tmp_path):
    registration_pair(scopefs.raw)
    m = scopefs.mount(mnt=tmp_path / 'mnt"q')
    names = os.listdir(m.path('transforms'))
    assert 'bmov.json' in names
    assert not [n for n in names if 'elastix' in n], names
    for n in names:  # what readdir lists, lookup finds (rsync -a, ls -l)
        assert os.stat(m.path('transforms', n)).st_size > 0
    problems = m.status()['problems']
    assert [p for p in problems if p['path'].endswith('transforms/bmov.elastix*.txt')
            and 'double quote' in p['reason']], problems


def test_special_files_are_problems(scopefs):
    write_planes(scopefs.raw / 'stk', 5, 64, 48, seed=1)
    os.mkfifo(scopefs.raw / 'stk' / 'img_000006.tif')
    os.mkfifo(scopefs.raw / 'pipe.ome.tif')
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(scopefs.raw / 'sock.tif'))
    try:
        m = scopefs.mount(opts={'dxy': 0.4, 'dz': 1.2, 'lambda_ex': 561, 'lambda_em': 600})
        d = m.status()
    finally:
        sock.close()
    reasons = {p['path']: p['reason'] for p in d['problems']}
    raw = str(scopefs.raw)
    assert reasons.get(raw + '/pipe.ome.tif') == 'not a regular file (fifo)', reasons
    assert reasons.get(raw + '/sock.tif') == 'not a regular file (socket)', reasons
    assert reasons.get(raw + '/stk/img_000006.tif') == 'not a regular file (fifo)', reasons
    # The stack would silently lose its sixth plane: it is not served.
    assert 'some planes are unusable' in reasons.get(raw + '/stk', ''), reasons
    assert not [s for s in d['stacks'] if s['name'] == 'stk'], d['stacks']
    assert not os.path.exists(m.path('deconvolved', 'stk'))


def as_nobody(uid, gid):
    def drop():
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    return drop


def test_allow_other_enforces_source_modes(scopefs, tmp_path):
    if os.geteuid() != 0:
        pytest.skip('needs root (allow_other, and reading as another user)')
    try:
        nobody = pwd.getpwnam('nobody')
    except KeyError:
        pytest.skip('no user nobody')
    # pytest's tmp_path is private (0700): user nobody needs a way in.
    top = tempfile.mkdtemp(prefix='scopefs-perm-')
    os.chmod(top, 0o755)
    try:
        raw, tf = os.path.join(top, 'raw'), os.path.join(top, 'tf')
        os.mkdir(raw)
        os.mkdir(tf)
        for name, seed in (('private.ome.tif', 1), ('public.ome.tif', 2)):
            write_ome(os.path.join(raw, name), [norm(tissue(300, 350, 1, seed=seed))], ['DAPI'])
        with open(os.path.join(tf, 'public.json'), 'w') as f:
            json.dump({'scopefs_transform': 1, 'matrix': [[1, 0, 3], [0, 1, 2]]}, f)
        with open(os.path.join(raw, 'secret.txt'), 'w') as f:
            f.write('secret\n')
        with open(os.path.join(raw, 'open.txt'), 'w') as f:
            f.write('open\n')
        for name, mode in (('private.ome.tif', 0o600), ('secret.txt', 0o600),
                           ('public.ome.tif', 0o644), ('open.txt', 0o644)):
            os.chmod(os.path.join(raw, name), mode)
        m = scopefs.mount(raw=raw, mnt=os.path.join(top, 'mnt'),
                          opts={'allow_other': None, 'reference': 'private', 'transforms': tf})
        try:
            assert 'default_permissions' in open('/proc/mounts').read().split(
                str(m.mnt))[1].split('\n')[0]
            st = os.stat(m.path('registered', 'private.ome.tif'))
            assert stat.S_IMODE(st.st_mode) == 0o400 and st.st_uid == 0
            assert stat.S_IMODE(os.stat(m.path('registered', 'public.ome.tif')).st_mode) == 0o444

            def read(rel):
                return subprocess.run(['head', '-c', '4096', str(m.path(*rel.split('/')))],
                                      preexec_fn=as_nobody(nobody.pw_uid, nobody.pw_gid),
                                      capture_output=True)
            # The controls: nobody reaches the mount and reads what is public.
            assert read('raw/open.txt').stdout == b'open\n'
            assert len(read('registered/public.ome.tif').stdout) == 4096
            for rel in ('raw/secret.txt', 'raw/private.ome.tif', 'registered/private.ome.tif'):
                r = read(rel)
                assert r.returncode != 0 and b'Permission denied' in r.stderr, (rel, r)
        finally:
            m.unmount()
    finally:
        if not is_mounted(os.path.join(top, 'mnt')):
            shutil.rmtree(top, ignore_errors=True)


@pytest.mark.slow
def test_sigterm_stops_registration(scopefs):
    raw = scopefs.raw
    a = norm(tissue(4000, 4000, 2, seed=1))
    write_ome(raw / 'aref.ome.tif', pyramid(a, 3), ['DAPI', 'CD3'])
    write_ome(raw / 'mov1.ome.tif', pyramid(a[:, ::-1].copy(), 3), ['DAPI', 'CD3'])
    for i in (2, 3, 4):
        os.link(raw / 'mov1.ome.tif', raw / ('mov%d.ome.tif' % i))
    cache = scopefs.tmp / 'regcache'
    m = scopefs.mount(cache=cache, opts={'reg_micro': 1})
    waiter = threading.Thread(target=lambda: subprocess.run(
        ['ls', '-l', str(m.path('registered'))], capture_output=True, timeout=120))
    waiter.start()
    # The lookup waits for registration; stop it inside the longest step
    # (the micro pass: demons on tile after tile).
    end = time.monotonic() + 60
    while time.monotonic() < end and not [
            s for s in m.status()['slides'] if 'micro-registration' in s['state']]:
        time.sleep(0.05)
    t0 = time.monotonic()
    m.proc.send_signal(signal.SIGTERM)
    m.proc.wait(120)
    exit_s = time.monotonic() - t0
    waiter.join(30)
    print('daemon exited %.2f s after SIGTERM' % exit_s)
    assert m.proc.returncode == 0
    assert exit_s < 4, 'SIGTERM waited %.1f s for registration' % exit_s
    assert not waiter.is_alive()
    assert not is_mounted(m.mnt)
    # Nothing half-done was cached: started again (eagerly, so cached
    # results load at once), no slide comes from the cache.
    m2 = scopefs.mount(cache=cache, opts={'reg_micro': 1, 'reg_eager': 1})
    states = [s['state'] for s in m2.status()['slides'] if s['name'].startswith('mov')]
    assert len(states) == 4 and not [s for s in states if 'from the cache' in s], states
    t0 = time.monotonic()
    m2.proc.send_signal(signal.SIGTERM)
    m2.proc.wait(120)
    assert time.monotonic() - t0 < 4

"""How a scheduler starts and stops scopefs (SLURM's scancel sends SIGTERM).

- A daemon mounted on a relative MOUNTPOINT must unmount on SIGTERM: libfuse
  unmounts by the path it was given after the daemon moved to /, so a
  relative one named another folder and the dead mount stayed behind.
- A second daemon on a mountpoint scopefs already serves must fail clearly
  (it stacked over the first and hid it).
- A shutdown signal is not a failure: exit status 0.
- A shutdown signal the daemon inherited as ignored (nohup) stays ignored."""
import io
import os
import signal
import subprocess
import time

from conftest import SCOPEFS, is_mounted
from gen import pyramid, tissue, write_ome


def wait_for(cond, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def daemon_pid(mnt):
    """The pid of the scopefs serving mnt (it daemonized: not our child)."""
    out = subprocess.run(['pgrep', '-f', f'{SCOPEFS}.*{mnt.name}'], capture_output=True,
                         text=True).stdout.split()
    return [int(p) for p in out]


def make_raw(tmp_path):
    raw = tmp_path / 'raw'
    raw.mkdir()
    write_ome(raw / 'a.ome.tif', pyramid(tissue(300, 300, channels=1, seed=1)[..., None], 1),
              tile=256)
    return raw


def test_relative_mountpoint_unmounts_on_sigterm(tmp_path):
    raw = make_raw(tmp_path)
    mnt = tmp_path / 'relmnt'
    mnt.mkdir()
    res = subprocess.run([str(SCOPEFS), '-o', 'cache=c', 'raw', 'relmnt'], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    try:
        assert wait_for(lambda: (mnt / '.scopefs' / 'status').exists())
        assert (mnt / 'raw' / 'a.ome.tif').read_bytes() == (raw / 'a.ome.tif').read_bytes()
        pids = daemon_pid(mnt)
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGTERM)
        assert wait_for(lambda: not is_mounted(mnt)), 'the mount stayed after SIGTERM'
        assert os.listdir(mnt) == []
    finally:
        if is_mounted(mnt):
            subprocess.run(['fusermount3', '-u', str(mnt)], check=False)


def test_second_daemon_refused_and_sigterm_exits_0(tmp_path):
    raw = make_raw(tmp_path)
    mnt = tmp_path / 'mnt'
    mnt.mkdir()
    first = subprocess.Popen([str(SCOPEFS), '-f', '-o', f'cache={tmp_path / "c1"}', str(raw),
                              str(mnt)], stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: (mnt / '.scopefs' / 'status').exists())
        second = subprocess.run([str(SCOPEFS), '-f', '-o', f'cache={tmp_path / "c2"}',
                                 str(raw), str(mnt)], capture_output=True, text=True,
                                timeout=30)
        assert second.returncode == 2, second.stderr
        assert 'already a FUSE mount' in second.stderr and str(mnt) in second.stderr
        with open('/proc/mounts') as f:
            assert sum(line.split()[1] == str(mnt) for line in f) == 1
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0, first.stderr.read()
        assert not is_mounted(mnt)
    finally:
        if first.poll() is None:
            first.kill()
        subprocess.run(['fusermount3', '-u', str(mnt)], capture_output=True)


def test_inherited_ignored_signal_stays_ignored(tmp_path):
    """nohup starts the daemon with SIGHUP ignored, and a non-interactive
    script's `scopefs -f ... &` with SIGINT ignored.  Such a signal used to
    stop the engine while the mount stayed up: every deconvolved/ read then
    failed at once (EINTR, which dd retried for ever).  Now it is ignored,
    the mount keeps serving the same bytes, and SIGTERM still exits 0."""
    import numpy as np
    import tifffile
    from gen import beads
    raw = tmp_path / 'raw'
    (raw / 'st').mkdir(parents=True)
    for z, plane in enumerate(beads(6, 24, 28, seed=2)):
        tifffile.imwrite(raw / 'st' / ('p%02d.tif' % z), plane, metadata=None)
    mnt = tmp_path / 'mnt'
    mnt.mkdir()
    opts = 'dxy=0.4,dz=1.2,lambda_ex=561,lambda_em=600,threads=2'
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGHUP, signal.SIGINT)}
    try:
        d = subprocess.Popen([str(SCOPEFS), '-f', '-o', f'{opts},cache={tmp_path / "c"}',
                              str(raw), str(mnt)], stderr=subprocess.PIPE, text=True)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    try:
        assert wait_for(lambda: (mnt / '.scopefs' / 'status').exists())
        d.send_signal(signal.SIGHUP)
        d.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert d.poll() is None, d.stderr.read()
        # In a child with a timeout: the old daemon's read never ended.
        cat = subprocess.run(['cat', str(mnt / 'deconvolved' / 'st' / 'p02.tif')],
                             capture_output=True, timeout=60)
        assert cat.returncode == 0, cat.stderr
        got = tifffile.imread(io.BytesIO(cat.stdout))
        assert got.shape == (24, 28) and not np.array_equal(got, beads(6, 24, 28, seed=2)[2])
        d.send_signal(signal.SIGTERM)
        assert d.wait(timeout=30) == 0, d.stderr.read()
        assert not is_mounted(mnt)
        assert 'stopped at iteration' not in d.stderr.read()
    finally:
        if d.poll() is None:
            d.kill()
        subprocess.run(['fusermount3', '-u', str(mnt)], capture_output=True)

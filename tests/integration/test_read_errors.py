"""A daemonized mount's read errors reach the user.

Once scopefs daemonizes, its stderr is /dev/null, so a read that fails
(EIO) used to leave no trace of why.  Two ways now carry the reason, both
checked here on a real, daemonized mount whose raw slide is replaced
after the mount scanned it:
- `.scopefs/status` lists the latest failures ("recent_errors"), each
  naming the virtual file's product and the raw file at fault;
- `log=FILE` appends the daemon's log lines to FILE.
Also: `log=` inside RAW_DIR is refused (the raw dataset is never written).
"""
import errno
import json
import os
import subprocess
import time

import pytest

from conftest import SCOPEFS, is_mounted
from gen import pyramid, tissue, write_ome


def wait_mounted(mnt, proc_or_none=None, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        if is_mounted(mnt) and (mnt / '.scopefs' / 'status').exists():
            return
        time.sleep(0.05)
    raise AssertionError(f'{mnt} did not mount')


def test_daemon_read_error_in_status_and_log(tmp_path):
    raw, mnt, cache = tmp_path / 'raw', tmp_path / 'mnt', tmp_path / 'cache'
    raw.mkdir()
    mnt.mkdir()
    slide = raw / 'ref.ome.tif'
    write_ome(slide, pyramid(tissue(600, 700, channels=2, seed=3)[..., None], 2), tile=256)
    log = tmp_path / 'daemon.log'
    # no -f: scopefs daemonizes once the mount is ready
    res = subprocess.run([str(SCOPEFS), '-o', f'cache={cache},log={log}', str(raw), str(mnt)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    try:
        wait_mounted(mnt)
        assert 'mounted' in log.read_text(), 'the log file gets the daemon\'s lines'
        # The slide changes under the mount (another scan written over it).
        write_ome(slide, pyramid(tissue(600, 700, channels=2, seed=4)[..., None], 2), tile=128)
        with pytest.raises(OSError) as info:
            with open(mnt / 'registered' / 'ref.ome.tif', 'rb') as f:
                f.seek(200_000)
                f.read(1 << 20)
        assert info.value.errno == errno.EIO
        status = json.loads((mnt / '.scopefs' / 'status').read_text())
        recent = status['recent_errors']
        assert recent, status
        msg = recent[0]['message']
        assert str(slide) in msg and 'changed since it was scanned' in msg, recent
        assert recent[0]['count'] >= 1 and recent[0]['time'].endswith('Z')
        # one cause over many tiles is one entry, not one per tile
        assert len({r['message'] for r in recent}) == len(recent)
        text = log.read_text()
        assert str(slide) in text and 'changed since it was scanned' in text
    finally:
        subprocess.run(['fusermount3', '-u', str(mnt)], check=False)
        end = time.time() + 20
        while is_mounted(mnt) and time.time() < end:
            time.sleep(0.1)
    assert not is_mounted(mnt)
    assert not any(p.name == 'daemon.log' for p in raw.iterdir())


def test_log_inside_raw_dir_refused(tmp_path):
    raw, mnt = tmp_path / 'raw', tmp_path / 'mnt'
    raw.mkdir()
    mnt.mkdir()
    write_ome(raw / 'a.ome.tif', pyramid(tissue(300, 300, channels=1, seed=1)[..., None], 1), tile=256)
    before = sorted(os.listdir(raw))
    res = subprocess.run([str(SCOPEFS), '-f', '-o', f'cache={tmp_path / "c"},log={raw}/x.log',
                          str(raw), str(mnt)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "option 'log'" in res.stderr and 'inside RAW_DIR' in res.stderr, res.stderr
    assert sorted(os.listdir(raw)) == before
    assert not is_mounted(mnt)


def test_log_unwritable_refused(tmp_path):
    raw, mnt = tmp_path / 'raw', tmp_path / 'mnt'
    raw.mkdir()
    mnt.mkdir()
    write_ome(raw / 'a.ome.tif', pyramid(tissue(300, 300, channels=1, seed=1)[..., None], 1), tile=256)
    bad = tmp_path / 'no' / 'such' / 'dir' / 'x.log'
    res = subprocess.run([str(SCOPEFS), '-f', '-o', f'cache={tmp_path / "c"},log={bad}',
                          str(raw), str(mnt)], capture_output=True, text=True, timeout=30)
    assert res.returncode != 0
    assert str(bad) in res.stderr and "option 'log'" in res.stderr, res.stderr
    assert not is_mounted(mnt)


def test_raw_file_moved_away_reads_eio(scopefs):
    """A raw file moved away under the mount: reading the virtual file that
    needs it fails with EIO, not ENOENT (the virtual file is there: `ls`
    lists it), and the status names the missing raw file.  Once the file is
    back, the same read works: failures are not cached."""
    slide = scopefs.raw / 'ref.ome.tif'
    write_ome(slide, pyramid(tissue(600, 700, channels=2, seed=3)[..., None], 2), tile=256)
    m = scopefs.mount()
    away = scopefs.tmp / 'away.ome.tif'
    os.rename(slide, away)
    virtual = m.mnt / 'registered' / 'ref.ome.tif'
    assert virtual.exists()
    with pytest.raises(OSError) as info:
        with open(virtual, 'rb') as f:
            f.seek(200_000)
            f.read(1 << 20)
    assert info.value.errno == errno.EIO, info.value
    recent = m.status()['recent_errors']
    assert recent and str(slide) in recent[0]['message'], recent
    os.rename(away, slide)
    with open(virtual, 'rb') as f:
        f.seek(200_000)
        assert len(f.read(1 << 20)) == 1 << 20


def test_raw_file_changed_under_the_mount_is_not_served_cut(scopefs):
    """raw/ serves the size the mount scanned: a raw file rewritten since
    must fail with EIO (and say why in the status), never come back as the
    new file's bytes cut at the old size."""
    slide = scopefs.raw / 'ref.ome.tif'
    write_ome(slide, pyramid(tissue(600, 700, channels=1, seed=1)[..., None], 1), tile=256)
    m = scopefs.mount()
    assert (m.mnt / 'raw' / 'ref.ome.tif').read_bytes() == slide.read_bytes()
    write_ome(slide, pyramid(tissue(650, 700, channels=1, seed=9)[..., None], 1), tile=256,
              compression='zlib')
    with pytest.raises(OSError) as info:
        (m.mnt / 'raw' / 'ref.ome.tif').read_bytes()
    assert info.value.errno == errno.EIO, info.value
    recent = m.status()['recent_errors']
    assert recent and str(slide) in recent[0]['message'] and \
        'changed since it was scanned' in recent[0]['message'], recent

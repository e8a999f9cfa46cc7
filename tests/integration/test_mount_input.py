"""Bad input and bad options.

A dataset with broken files still mounts: the good slide is served, each bad
file is named in .scopefs/status "problems" and is not served under
registered/, and everything stays visible in raw/.  A bad command line is
refused with exit status 2, one line on stderr naming the option, and
nothing mounted.  Presets are read from a file and lose to the command line."""

import os

import numpy as np

import gen
from conftest import is_mounted, read_all


def write_slide(path, seed, h=700, w=600):
    a = gen.norm(gen.tissue(h, w, 2, seed=seed))
    gen.write_ome(path, [a], ['A', 'B'], 0.5)
    return a


def problem_for(status, name):
    return [p for p in status['problems'] if os.path.basename(p['path'].rstrip('/')) == name]


def test_bad_files_do_not_stop_the_mount(scopefs):
    raw = scopefs.raw
    good = write_slide(raw / 'a_good.ome.tif', 1)
    # A TIFF cut inside its first IFD, and one cut inside its pixel data.
    write_slide(raw / 'b_cut_header.tif', 2)
    full = (raw / 'b_cut_header.tif').read_bytes()
    (raw / 'b_cut_header.tif').write_bytes(full[:60])
    write_slide(raw / 'c_cut_data.ome.tif', 3)
    full = (raw / 'c_cut_data.ome.tif').read_bytes()
    (raw / 'c_cut_data.ome.tif').write_bytes(full[:len(full) // 2])
    (raw / 'd_text.tif').write_text('this is not a TIFF file\n' * 20)
    (raw / 'e_empty.tiff').write_bytes(b'')
    write_slide(raw / 'f_locked.tif', 4)
    os.chmod(raw / 'f_locked.tif', 0)
    (raw / 'empty_sub').mkdir()

    m = scopefs.mount()
    assert sorted(os.listdir(m.path('registered'))) == ['a_good.ome.tif']
    served = gen.read_levels(m.path('registered', 'a_good.ome.tif'))
    assert np.array_equal(served[0], good)
    st = m.status()
    for bad in ('b_cut_header.tif', 'c_cut_data.ome.tif', 'd_text.tif', 'e_empty.tiff'):
        found = problem_for(st, bad)
        assert found, '%s not in problems: %s' % (bad, st['problems'])
        assert found[0]['reason'].strip(), found
    if os.geteuid() != 0:  # root reads a mode-000 file anyway
        assert problem_for(st, 'f_locked.tif'), st['problems']
    assert not problem_for(st, 'a_good.ome.tif')
    # All files, good or bad, are still in raw/.
    assert sorted(os.listdir(m.path('raw'))) == sorted(os.listdir(raw))
    assert os.listdir(m.path('raw', 'empty_sub')) == []
    assert (m.path('raw', 'd_text.tif').read_bytes() == (raw / 'd_text.tif').read_bytes())
    os.chmod(raw / 'f_locked.tif', 0o644)


def test_empty_raw_dir_mounts(scopefs):
    m = scopefs.mount()
    assert os.listdir(m.path('raw')) == []
    assert os.listdir(m.path('registered')) == []
    st = m.status()
    assert st['slides'] == [] and st['problems'] == []


def assert_refused(scopefs, opts, word, raw=None, mnt=None):
    raw = raw or scopefs.raw
    mnt = mnt or (scopefs.tmp / 'mnt_refused')
    mnt.mkdir(exist_ok=True)
    r = scopefs.run(['-o', opts, str(raw), str(mnt)])
    err = r.stderr.decode(errors='replace')
    assert r.returncode == 2, (opts, r.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, (opts, err)
    assert word in lines[0], (opts, err)
    assert not is_mounted(mnt)
    return lines[0]


def test_bad_options_are_refused(scopefs, tmp_path):
    write_slide(scopefs.raw / 'a.ome.tif', 5)
    cache = str(tmp_path / 'c')
    assert_refused(scopefs, 'cache=%s,bogus=1' % cache, 'bogus')
    assert_refused(scopefs, 'cache=%s,frobnicate' % cache, 'frobnicate')
    assert_refused(scopefs, 'cache=%s,mem=12Q' % cache, 'mem')
    assert_refused(scopefs, 'cache=%s,mem=' % cache, 'mem')
    assert_refused(scopefs, 'cache=%s,cache_size=lots' % cache, 'cache_size')
    assert_refused(scopefs, 'cache=%s,threads=many' % cache, 'threads')
    assert_refused(scopefs, 'cache=%s' % (scopefs.raw / 'cachedir'), 'cache')
    assert_refused(scopefs, 'cache=%s' % scopefs.raw, 'cache')
    assert_refused(scopefs, 'cache=%s,preset=/nonexistent/preset' % cache, 'preset')
    assert not (scopefs.raw / 'cachedir').exists()
    assert sorted(os.listdir(scopefs.raw)) == ['a.ome.tif']


def test_preset_file_and_command_line_precedence(scopefs, tmp_path):
    write_slide(scopefs.raw / 'alpha.ome.tif', 6)
    write_slide(scopefs.raw / 'beta.ome.tif', 7)
    preset = tmp_path / 'mypreset'
    preset.write_text('# test preset\nreference=beta\nmem=64M\n\nthreads=1\n')

    m = scopefs.mount(opts={'preset': str(preset)})
    assert os.listdir(m.path('registered')) == ['beta.ome.tif']
    st = m.status()
    assert st['mem'] == 64 * 2**20 and st['threads'] == 1, st
    m.unmount()

    # The command line wins, before or after the preset.
    for opts in ({'preset': str(preset), 'reference': 'alpha', 'mem': '48M'},
                 {'reference': 'alpha', 'mem': '48M', 'preset': str(preset)}):
        m = scopefs.mount(opts=opts)
        assert os.listdir(m.path('registered')) == ['alpha.ome.tif']
        st = m.status()
        assert st['mem'] == 48 * 2**20 and st['threads'] == 1, st
        m.unmount()

    bad = tmp_path / 'badpreset'
    bad.write_text('mem=64M\nwhatever=3\n')
    assert_refused(scopefs, 'cache=%s,preset=%s' % (tmp_path / 'c', bad), 'whatever')


def test_mem_below_one_unit_warns(scopefs):
    """README: a mem= bound below one unit keeps one decoded unit, with a
    warning.  The warning was only ever given for deconvolution blocks, so
    a slides-only mount with mem=1 was silent."""
    write_slide(scopefs.raw / 'alpha.ome.tif', 6)
    write_slide(scopefs.raw / 'beta.ome.tif', 7)
    m = scopefs.mount(opts={'reference': 'alpha'})
    want = read_all(m.path('registered', 'alpha.ome.tif'))
    assert 'below one decoded unit' not in m.log_text()
    m.unmount()
    for mem in ('0', '1'):
        m = scopefs.mount(opts={'reference': 'alpha', 'mem': mem})
        assert read_all(m.path('registered', 'alpha.ome.tif')) == want
        assert 'mem=%s bytes is below one decoded unit' % mem in m.log_text(), m.log_text()
        m.unmount()

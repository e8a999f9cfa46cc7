"""deconvolved/ memory across stacks (docs/deconvolution.md 7.6): the daemon
holds ONE FFTW block working set beside `mem`, whatever the number of stacks
read.  Before, each stack read kept its own context (up to mem/2) and its
window pool until unmount, so one plane of each of N stacks left N working
sets resident."""
import glob
import os

import numpy as np
import tifffile

import gen

OPTS = {'dxy': '0.4', 'dz': '1.2', 'lambda_ex': '561', 'lambda_em': '600',
        'dtype': 'float32', 'mem': '128M', 'threads': '2'}

# (name, width, seed): widths differ, so each stack's window differs and a
# block of the next stack remakes the context; a2 has a1's shape and
# settings, so it reuses a1's context as is.
STACKS = [('a1', 96, 1), ('a2', 96, 2), ('b', 104, 3), ('c', 112, 4), ('d', 120, 5)]
PLANES, HEIGHT, PLANE = 24, 96, 12


def vm_hwm_mib(pid):
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmHWM'):
                return int(line.split()[1]) / 1024.0
    raise AssertionError('no VmHWM for pid %d' % pid)


def under_asan(pid):
    """ASan's quarantine keeps freed memory resident: no RSS bound there."""
    with open('/proc/%d/maps' % pid) as f:
        return 'libasan' in f.read()


def plane_path(m, stack):
    files = sorted(glob.glob(os.path.join(m.path('deconvolved', stack), '*.tif')))
    assert len(files) == PLANES, files
    return files[PLANE]


def write_stacks(raw):
    for name, width, seed in STACKS:
        gen.write_planes(raw / name, PLANES, HEIGHT, width, seed=seed)


def test_one_working_set_whatever_the_stack_count(scopefs):
    write_stacks(scopefs.raw)
    m = scopefs.mount(opts=OPTS)
    base = vm_hwm_mib(m.pid)
    hwm, got = [], {}
    for name, _, _ in STACKS:
        with open(plane_path(m, name), 'rb') as f:
            got[name] = f.read()
        hwm.append(vm_hwm_mib(m.pid))
    first = hwm[0] - base  # one working set, its windows and its units
    growth = [b - a for a, b in zip(hwm, hwm[1:])]
    msg = 'VmHWM %.0f MiB before, %s after each stack' % (
        base, ' '.join('%.0f' % h for h in hwm))
    # A stack read first costs one working set (about 40 MiB here); each
    # further stack adds only its few MiB of cached units.  Kept per stack,
    # contexts added a working set each (+40-50 MiB).
    if not under_asan(m.pid):
        assert first > 20, msg
        for g in growth:
            assert g < 0.5 * first, msg

    # The bytes do not depend on which stack's context came before (a2
    # reused a1's, d remade c's): a mount that reads only that stack.
    for name in ('a2', 'd'):
        alone = scopefs.mount(opts=OPTS)
        with open(plane_path(alone, name), 'rb') as f:
            assert f.read() == got[name], name
        alone.unmount()

    # And they are a deconvolution of that stack's plane, not another's:
    # closer to its own raw plane than to another stack's (same shape).
    own = tifffile.imread(scopefs.raw / 'a2' / ('img_%06d.tif' % (PLANE + 1)))
    other = tifffile.imread(scopefs.raw / 'a1' / ('img_%06d.tif' % (PLANE + 1)))
    dec = tifffile.imread(plane_path(m, 'a2')).astype(np.float64)
    c_own = np.corrcoef(dec.ravel(), own.astype(np.float64).ravel())[0, 1]
    c_other = np.corrcoef(dec.ravel(), other.astype(np.float64).ravel())[0, 1]
    assert c_own > 0.5 and c_own > c_other + 0.3, (c_own, c_other)

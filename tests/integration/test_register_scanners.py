"""Two scans of one tissue at pixel sizes 1.2x apart (two scanners) must
register.  Each slide's registration thumbnail used to shrink by an
integer factor of its own pyramid level, so here the reference came out at
1700 px and the finer scan at 1020 px: 1.7x apart in scale, beyond the
similarity search (1.6x), and the slide was rejected as sheared.  Now the
moving thumbnail is made at the physical pixel size closest to the
reference's.  The oracle is the known map: scipy made the moving scan."""
import json
import time

import numpy as np
import scipy.ndimage as ndi

import gen


def wait_registered(m, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        states = {s['name']: s['state'] for s in m.status()['slides']}
        if not any(v.startswith('registering') for v in states.values()):
            return states
        time.sleep(0.2)
    raise AssertionError(states)


def test_scans_at_pixel_sizes_1_2x_apart_register(scopefs):
    h, w, ratio, deg = 1500, 1700, 1.2, 5.0
    ref = gen.tissue(h, w, channels=1, seed=1)[0].astype(np.float64)
    t = np.deg2rad(deg)
    # T: reference (x, y) -> moving (x, y), a turn about the centre scaled by ratio
    lin = ratio * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    centre = np.array([w / 2, h / 2])
    shift = centre * ratio - lin @ centre
    inv = np.linalg.inv(lin)
    # moving[y, x] = ref at T^-1(x, y); scipy works in (row, col)
    mov = ndi.affine_transform(ref, inv[::-1, ::-1], offset=(-inv @ shift)[::-1],
                               output_shape=(int(h * ratio), int(w * ratio)), order=1)
    gen.write_ome(scopefs.raw / 'ref.ome.tif', gen.pyramid(gen.norm(ref.astype(np.uint16)), 3),
                  ['DAPI'], pixel_size=0.5)
    gen.write_ome(scopefs.raw / 'scan2.ome.tif', gen.pyramid(gen.norm(mov.astype(np.uint16)), 4),
                  ['DAPI'], pixel_size=0.5 / ratio)
    m = scopefs.mount(opts={'reference': 'ref', 'reg_eager': '1'})
    state = wait_registered(m)['scan2']
    assert state.startswith('served'), state
    got = np.array(json.loads((m.mnt / 'transforms' / 'scan2.json').read_text())['matrix'])
    for x, y in ((w / 2, h / 2), (300, 250), (1400, 1200)):
        want = lin @ (x, y) + shift
        mapped = got[:2, :2] @ (x, y) + got[:2, 2]
        assert np.hypot(*(mapped - want)) < 2.0, ((x, y), mapped, want)

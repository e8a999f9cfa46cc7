"""What the status says of slides scopefs registers itself.

- reg_order=serial chains each section to its neighbour.  A blank section
  in the middle is rejected; the section after it was then refused too
  (its fit against the blank: 0 % overlap).  Now it is fitted to the next
  section past the blank, and says so.
- The scale quoted for a served slide is its level-0 scale, the one its
  transform file holds, not the scale between the registration thumbnails
  (which are shrunk by different factors when the slides differ in size).
- Two scans of one tissue at pixel sizes 1.2x apart (two scanners) must
  register: each thumbnail used to shrink by an integer factor of its own
  pyramid level, here 1700 against 1020 px, 1.7x apart in scale, beyond the
  similarity search (1.6x), and the slide was rejected as sheared.  Now the
  moving thumbnail is made at the physical pixel size closest to the
  reference's.  The oracle is the known map: scipy made the moving scan."""
import json
import re
import time

import numpy as np
import scipy.ndimage as ndi

import gen


def rotated(image, deg, shift):
    """The moving section: image sampled at R(x) + shift (about the centre)."""
    t = np.deg2rad(deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    centre = np.array(image.shape) / 2.0
    offset = centre - rot @ centre + np.asarray(shift)
    return ndi.affine_transform(image.astype(np.float64), rot, offset=offset, order=1)


def wait_registered(m, timeout=90):
    end = time.time() + timeout
    while time.time() < end:
        states = {s['name']: s['state'] for s in m.status()['slides']}
        if not any(v.startswith('registering') for v in states.values()):
            return states
        time.sleep(0.2)
    raise AssertionError(states)


def test_serial_chain_skips_a_rejected_neighbour(scopefs):
    ref = gen.tissue(600, 700, channels=1, seed=1)[0]
    s2 = rotated(ref, 6, (12, -8))
    s3 = rotated(s2, 6, (10, -6))
    for name, image in (('s1', ref), ('s2', s2), ('s3', s3)):
        gen.write_ome(scopefs.raw / f'{name}.ome.tif',
                      gen.pyramid(gen.norm(image.astype(np.uint16)), 2), ['DAPI'])
    gen.write_ome(scopefs.raw / 's2b.ome.tif',  # blank: sorts between s2 and s3
                  [gen.norm(np.zeros((600, 700), np.uint16))], ['DAPI'])
    direct_mount = scopefs.mount(opts={'reference': 's1', 'reg_eager': '1'})
    direct = wait_registered(direct_mount)
    assert direct['s3'].startswith('served'), direct
    want = np.array(json.loads((direct_mount.mnt / 'transforms' / 's3.json').read_text())
                    ['matrix'])
    m = scopefs.mount(opts={'reference': 's1', 'reg_eager': '1', 'reg_order': 'serial'})
    serial = wait_registered(m)
    assert serial['s2'].startswith('served'), serial
    assert serial['s2b'].startswith('not served: rejected'), serial
    # s3 is fitted to s2, past the blank s2b, and lands where the direct fit does
    assert serial['s3'].startswith('served') and 'past the rejected section s2b' in \
        serial['s3'], serial
    got = np.array(json.loads((m.mnt / 'transforms' / 's3.json').read_text())['matrix'])
    for x, y in ((350, 300), (100, 80), (600, 500)):
        a = got[:2, :2] @ (x, y) + got[:2, 2]
        b = want[:2, :2] @ (x, y) + want[:2, 2]
        assert np.hypot(*(a - b)) < 1.0, ((x, y), a, b)


def test_served_state_quotes_the_level0_scale(scopefs):
    ref = gen.tissue(900, 1000, channels=1, seed=4)[0]
    finer = ndi.zoom(ref.astype(np.float64), 1.3, order=1)  # 1.3x finer pixels
    gen.write_ome(scopefs.raw / 'ref.ome.tif', gen.pyramid(gen.norm(ref.astype(np.uint16)), 3),
                  ['DAPI'], pixel_size=0.5)
    gen.write_ome(scopefs.raw / 'fine.ome.tif',
                  gen.pyramid(gen.norm(finer.astype(np.uint16)), 4), ['DAPI'],
                  pixel_size=0.5 / 1.3)
    # thumbnails of at most 500 px come from different levels: the
    # reference's level 1 (500 px), the finer slide's level 2 (325 px)
    m = scopefs.mount(opts={'reference': 'ref', 'reg_eager': '1', 'reg_dim': '500',
                            'reg_nonrigid_dim': '500'})
    state = wait_registered(m)['fine']
    assert state.startswith('served'), state
    matrix = np.array(json.loads((m.mnt / 'transforms' / 'fine.json').read_text())['matrix'])
    level0 = np.sqrt(abs(np.linalg.det(matrix[:2, :2])))
    assert abs(level0 - 1.3) < 0.02, matrix
    shown = float(re.search(r'scale ([0-9.]+)', state).group(1))
    assert abs(shown - level0) < 0.005, (state, level0)


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

"""reg_micro=1 through a real mount (issue #5: "optionally a micro-registration
pass at a higher level in tiles, as VALIS does").

The dataset is made here by independent code (reg_pairs.py: numpy/scipy).
One fluorescence section; the moving slide sees it through a small rotation
and a FINE deformation: hundreds of Gaussian bumps 10-16 px wide, up to
about 3 px, finer than the non-rigid grid of a small reg_nonrigid_dim can
follow.  The same raw folder is mounted twice, with reg_micro=0 and with
reg_micro=1 (micro level = level 0), each on its own cache.

Checks, against the known map (never scopefs output): landmarks mapped
through transforms/mov.json, evaluated in numpy, have a clearly lower TRE
with reg_micro=1, and the status shows the slide served.
"""

import numpy as np
import scipy.ndimage as ndi

import gen
import reg_pairs as rp
from conftest import Scopefs
from test_mount_register import LEVELS, PX, load_json_transform, wait_registered


class FineDeformation:
    """D(z) in world px: n Gaussian bumps (sigma 10-16 px, random directions),
    rasterised on the world grid and read back bilinearly; peak |D| = amp."""

    def __init__(self, rng, h, w, amp, n):
        d = np.zeros((2, h, w))
        cx, cy = rng.uniform(0, w, n), rng.uniform(0, h, n)
        s = rng.uniform(10, 16, n)
        ang = rng.uniform(0, 2 * np.pi, n)
        for k in range(n):
            x0, x1 = int(max(cx[k] - 4 * s[k], 0)), int(min(cx[k] + 4 * s[k] + 1, w))
            y0, y1 = int(max(cy[k] - 4 * s[k], 0)), int(min(cy[k] + 4 * s[k] + 1, h))
            yy, xx = np.mgrid[y0:y1, x0:x1]
            g = np.exp(-((xx - cx[k]) ** 2 + (yy - cy[k]) ** 2) / (2 * s[k] ** 2))
            d[0, y0:y1, x0:x1] += np.cos(ang[k]) * g
            d[1, y0:y1, x0:x1] += np.sin(ang[k]) * g
        self.d = d * (amp / np.hypot(d[0], d[1]).max())

    def __call__(self, zx, zy):
        c = [np.asarray(zy, np.float64), np.asarray(zx, np.float64)]
        return (ndi.map_coordinates(self.d[0], c, order=1, mode="nearest"),
                ndi.map_coordinates(self.d[1], c, order=1, mode="nearest"))


def tre_through(m, marks, truth, diag):
    doc, field = load_json_transform(m.mnt, "mov")
    found = rp.apply_transform_json(doc, marks, field)
    return rp.tre_stats(found, truth, diag)[:2]


def test_micro_refines_fine_deformation(tmp_path):
    rng = np.random.default_rng(31)
    W, H = 2048, 1792
    world = rp.SlideWorld(rng, int(H * 1.3), int(W * 1.3), fill=0.6)
    origin = ((world.w - W) // 2, (world.h - H) // 2)
    pair = rp.make_slide_pair(rng, world, (W, H), origin, (W, H), np.radians(4.0), 1.0, False,
                              (12.0, -7.0))
    pair.deform = FineDeformation(rng, world.h, world.w, 3.0, 900)
    fx = Scopefs(tmp_path)
    ok = False
    try:
        for stem, st in (("ref", world.crop(*origin, W, H)), ("mov", pair.moving_stains())):
            img = rp.render_fluorescence(st, rng, channels=2)
            gen.write_ome(fx.raw / ("%s.ome.tif" % stem), gen.pyramid(gen.norm(img), LEVELS),
                          ["DAPI", "CD3"], PX)
        marks = pair.landmarks(rng, 120)
        truth = pair.truth(marks)
        diag = np.hypot(W, H)
        opts = {"reference": "ref", "reg_eager": 1, "reg_dim": 256, "reg_nonrigid_dim": 256}
        res = {}
        for micro in (0, 1):
            m = fx.mount(opts=dict(opts, reg_micro=micro, reg_micro_dim=W))
            state = wait_registered(m, ["mov"], timeout=240)["mov"]["state"]
            assert state.startswith("served, registered by scopefs"), state
            res[micro] = tre_through(m, marks, truth, diag)
            print("\nreg_micro=%d: TRE median %.3f px, 90th pct %.3f px; %s"
                  % (micro, res[micro][0], res[micro][1], state))
        assert res[1][0] < 0.7 * res[0][0] and res[1][0] < 0.6, res
        assert res[1][1] < res[0][1], res
        ok = True
    finally:
        fx.teardown(failed=not ok)

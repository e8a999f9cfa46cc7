"""Registration across modalities through a real mount (issue #5: MI between
brightfield and fluorescence, reg_metric=auto).

The dataset is made here by independent code (reg_pairs.py: numpy/scipy).
One tissue section is imaged twice: a brightfield reference (RGB; H&E, or
IHC: hematoxylin + DAB), and the same section as fluorescence (DAPI = the nuclei, a marker channel;
uint16), turned, scaled and slightly deformed.  A third slide is
fluorescence of a DIFFERENT section: there is nothing to find, and the guard
must refuse it (its reason in .scopefs/status) rather than serve a wrong
alignment.

Checks, against truths from the known maps (never scopefs output):
  - transforms/dapi.json, evaluated in numpy, maps 60 tissue landmarks to
    within 2 px median TRE at level 0 (the affine fit: no non-rigid field is
    fitted between modalities);
  - the status says the fit was judged by mutual information;
  - the unrelated section is "not served" and absent from registered/.
"""

import os

import numpy as np
import pytest

import gen
import reg_pairs as rp
from conftest import Scopefs
from test_mount_register import LEVELS, PX, load_json_transform, wait_registered


@pytest.mark.parametrize("stain,seed,theta", [("he", 4242, -33.0), ("ihc", 1, 141.0)])
def test_brightfield_to_fluorescence(tmp_path, stain, seed, theta):
    rng = np.random.default_rng(seed)
    W, H = 1024, 896
    world = rp.SlideWorld(rng, int(H * 1.4), int(W * 1.4), fill=0.45)
    other = rp.SlideWorld(np.random.default_rng(seed + 777), int(H * 1.4), int(W * 1.4),
                          fill=0.45)
    origin = ((world.w - W) // 2, (world.h - H) // 2)
    fx = Scopefs(tmp_path)
    ok = False
    try:
        bright = gen.pyramid(gen.norm(rp.render_brightfield(world.crop(*origin, W, H), rng, stain),
                                      rgb=True), LEVELS)
        gen.write_ome(fx.raw / "ref.ome.tif", bright, None, PX)
        pair = rp.make_slide_pair(rng, world, (W, H), origin, (W + 40, H - 20), np.radians(theta),
                                  1.06, False, (18.0, -11.0), deform_amp=1.0)
        fluo = rp.render_fluorescence(pair.moving_stains(), rng, gain=0.9, gamma=1.1,
                                      channels=2)
        gen.write_ome(fx.raw / "dapi.ome.tif", gen.pyramid(gen.norm(fluo), LEVELS),
                      ["DAPI", "CD3"], PX)
        marks = pair.landmarks(rng, 60)
        truth = pair.truth(marks)
        stranger = rp.render_fluorescence(other.crop(*origin, W, H), rng, channels=2)
        gen.write_ome(fx.raw / "stranger.ome.tif", gen.pyramid(gen.norm(stranger), LEVELS),
                      ["DAPI", "CD3"], PX)

        m = fx.mount(opts={"reference": "ref", "reg_eager": 1})
        st = wait_registered(m, ["dapi", "stranger"])
        state = st["dapi"]["state"]
        print("\ndapi: %s\nstranger: %s" % (state, st["stranger"]["state"]))
        assert state.startswith("served, registered by scopefs"), state
        assert "mutual information" in state, state
        doc, field = load_json_transform(m.mnt, "dapi")
        found = rp.apply_transform_json(doc, marks, field)
        med, p90, _, _ = rp.tre_stats(found, truth, np.hypot(W, H))
        print("dapi: TRE median %.3f px, 90th pct %.3f px" % (med, p90))
        assert med < 2.0 and p90 < 4.0

        refused = st["stranger"]["state"]
        assert refused.startswith("not served: "), refused
        assert "stranger.ome.tif" not in os.listdir(m.path("registered"))
        ok = True
    finally:
        fx.teardown(failed=not ok)

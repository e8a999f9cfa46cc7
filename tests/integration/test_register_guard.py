"""The registration guard refuses sections of another tissue (docs/registration.md, "Guard").

The dataset is made here by independent code (reg_pairs.py: numpy/scipy).  Per
modality (H&E, fluorescence) one mount holds a reference, a true second section
of the same tissue (turned 30 degrees, slightly deformed) and eight sections of
DIFFERENT tissues (other random worlds), all at the same pixel size.  The affine
fit can stretch, turn and mirror an unrelated section until the tissue outlines
meet (NCC 0.2-0.28, above GUARD_MIN_NCC 0.10, within the scale and shear
bounds): the guard that used to check only those served 2 of 8 here per
modality with a wrong warp.  The structure test (the fit against the same map
with the slide turned or mirrored) must refuse every one of them, and still
serve the true pair.

Checks (truths from the known maps, never scopefs output):
  - each unrelated section is "not served: rejected: ..." naming the outline
    test, and absent from registered/;
  - the true section is served, and its transform maps 60 tissue landmarks to
    within 1.5 px median TRE at level 0.
"""

import os

import numpy as np
import pytest

import gen
import reg_pairs as rp
from conftest import Scopefs
from test_mount_register import LEVELS, PX, load_json_transform, wait_registered

W, H = 1024, 896
# With these worlds and renders the old guard served 79 and 83 (H&E), 78 and 84
# (fluorescence).
UNRELATED = [77, 78, 79, 80, 81, 82, 83, 84]
OUTLINE_REASON = ("not served: rejected: no convincing match, the tissue's structure does not "
                  "line up")


def section(seed):
    """Stain amounts of a W x H section of the world of this seed."""
    return rp.SlideWorld(np.random.default_rng(seed), H, W, fill=0.45).crop(0, 0, W, H)


def write(fx, stem, stains, rng, modality):
    path = fx.raw / (stem + ".ome.tif")
    if modality == "he":
        img = rp.render_brightfield(stains, rng, "he")
        gen.write_ome(path, gen.pyramid(gen.norm(img, rgb=True), LEVELS), None, PX)
    else:
        img = rp.render_fluorescence(stains, rng, channels=3)
        gen.write_ome(path, gen.pyramid(gen.norm(img), LEVELS), ["DAPI", "CD45", "SMA"], PX)


@pytest.mark.parametrize("modality", ["he", "fluo"])
def test_unrelated_sections_are_refused(tmp_path, modality):
    world = rp.SlideWorld(np.random.default_rng(21), H, W, fill=0.45)
    rng = np.random.default_rng(0)
    fx = Scopefs(tmp_path)
    ok = False
    try:
        write(fx, "ref", world.crop(0, 0, W, H), rng, modality)
        for seed in UNRELATED:
            write(fx, "unrelated%d" % seed, section(seed), rng, modality)
        pair = rp.make_slide_pair(rng, world, (W, H), (0, 0), (W, H), np.radians(30.0), 1.0,
                                  False, (12.0, -7.0), deform_amp=1.0)
        write(fx, "true", pair.moving_stains(), rng, modality)
        marks = pair.landmarks(rng, 60)
        truth = pair.truth(marks)

        m = fx.mount(opts={"reference": "ref", "reg_eager": 1})
        stems = ["true"] + ["unrelated%d" % s for s in UNRELATED]
        st = wait_registered(m, stems)
        for stem in stems:
            print("%s: %s" % (stem, st[stem]["state"]))
        listed = os.listdir(m.path("registered"))
        served = [s for s in stems[1:] if not st[s]["state"].startswith("not served: rejected")]
        assert not served, {s: st[s]["state"] for s in served}
        other = [s for s in stems[1:] if not st[s]["state"].startswith(OUTLINE_REASON)]
        assert not other, {s: st[s]["state"] for s in other}
        assert not [s for s in stems[1:] if s + ".ome.tif" in listed], listed

        state = st["true"]["state"]
        assert state.startswith("served, registered by scopefs"), state
        assert "true.ome.tif" in listed
        doc, field = load_json_transform(m.mnt, "true")
        found = rp.apply_transform_json(doc, marks, field)
        med, p90, _, _ = rp.tre_stats(found, truth, np.hypot(W, H))
        print("true: TRE median %.3f px, 90th pct %.3f px" % (med, p90))
        assert med < 1.5
        ok = True
    finally:
        fx.teardown(failed=not ok)


def test_mirror_symmetric_section_is_served(tmp_path):
    """A section whose tissue is nearly mirror-symmetric (a coronal brain or
    spinal cord section) correlates with itself mirrored: that pose is one of
    its symmetries, not a null pose, and must not refuse a true fit (it
    scored structure ~0.08 against the bound 0.25 when it counted)."""
    world = rp.SlideWorld(np.random.default_rng(5), H, W, fill=0.45)
    for k in ("mask", "nuc", "stroma", "marker"):
        a = getattr(world, k)
        sym = 0.5 * (a + a[:, ::-1])
        setattr(world, k, (sym if k == "mask" else 0.95 * sym + 0.05 * a).astype(np.float32))
    rng = np.random.default_rng(1)
    fx = Scopefs(tmp_path)
    ok = False
    try:
        write(fx, "ref", world.crop(0, 0, W, H), rng, "fluo")
        pair = rp.make_slide_pair(rng, world, (W, H), (0, 0), (W, H), np.radians(12.0), 1.0,
                                  False, (10.0, -6.0), deform_amp=1.0)
        img = rp.render_fluorescence(pair.moving_stains(), rng, channels=3, noise=0.25)
        gen.write_ome(fx.raw / "sym.ome.tif", gen.pyramid(gen.norm(img), LEVELS),
                      ["DAPI", "CD45", "SMA"], PX)
        marks = pair.landmarks(rng, 60)
        m = fx.mount(opts={"reference": "ref", "reg_eager": 1})
        state = wait_registered(m, ["sym"])["sym"]["state"]
        print("sym: %s" % state)
        assert state.startswith("served, registered by scopefs"), state
        doc, field = load_json_transform(m.mnt, "sym")
        med, _, _, _ = rp.tre_stats(rp.apply_transform_json(doc, marks, field),
                                    pair.truth(marks), np.hypot(W, H))
        assert med < 1.5, med
        ok = True
    finally:
        fx.teardown(failed=not ok)

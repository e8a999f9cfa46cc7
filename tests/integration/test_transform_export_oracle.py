"""Exported transforms against independent oracles.

The driver modes of tests/unit/test_transform_export.c write the files of a
fixed transform (`--write DIR NAME`) and map points with scopefs's own
evaluator (`--points NAME`, reference level-0 px -> moving level-0 px).

- elastix files: real `transformix -def points.txt -tp NAME.txt` maps the
  same points in physical units (reference 0.5 um, moving 0.4 x 0.45 um:
  the driver's fixed units).  It follows the main file's chain to the
  DeformationFieldTransform and its MetaImage field.
- our JSON: a numpy evaluation of the format as docs/transforms.md states
  it (matrix, bilinear field read from the TIFF with tifffile, clamped).

Both must agree with scopefs to 1e-3 px.
"""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import tifffile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REF_PX = np.array([0.5, 0.5])
MOV_PX = np.array([0.4, 0.45])
REF_W, REF_H = 300, 200
TOL_PX = 1e-3


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """The test program, built here from its sources (not the shared build)."""
    out = tmp_path_factory.mktemp("txbin") / "test_transform_export"
    tiff = subprocess.run(["pkg-config", "--cflags", "--libs", "libtiff-4"], check=True,
                          capture_output=True, text=True).stdout.split()
    srcs = ["tests/unit/test_transform_export.c", "src/io/transform_export.c",
            "src/io/transform_file.c", "src/io/metaimage.c", "src/core/transform.c", "src/util/err.c",
            "src/util/utf8.c"]
    subprocess.run(["cc", "-std=c11", "-D_GNU_SOURCE", "-O1", "-Iinclude", "-pthread", *srcs,
                    *tiff, "-lm", "-o", str(out)], cwd=ROOT, check=True)
    return str(out)


def sample_points():
    """Points over the reference, its corners and edges, and a few past them."""
    rng = np.random.default_rng(5)
    inner = rng.uniform([-0.5, -0.5], [REF_W - 0.5, REF_H - 0.5], size=(300, 2))
    edges = np.array([[-0.5, -0.5], [REF_W - 0.5, REF_H - 0.5], [0, REF_H - 1],
                      [REF_W - 1, 0], [150, 199.4], [299.4, 100], [-3, 50], [310, 210]])
    return np.vstack([inner, edges])


def ours(driver, name, pts):
    text = "".join("%.9f %.9f\n" % tuple(p) for p in pts)
    res = subprocess.run([driver, "--points", name], input=text, capture_output=True,
                         text=True, check=True)
    return np.array([[float(v) for v in line.split()] for line in res.stdout.splitlines()])


def write(driver, tmp_path, name):
    subprocess.run([driver, "--write", str(tmp_path), name], check=True)


def transformix_points(tmp_path, name, pts):
    """transformix's moving points (level-0 px) for reference points pts."""
    phys = pts * REF_PX
    inp = tmp_path / "inputpoints.txt"
    inp.write_text("point\n%d\n" % len(phys) + "".join("%.9f %.9f\n" % tuple(p) for p in phys))
    out = tmp_path / ("out_" + name)
    out.mkdir()
    res = subprocess.run(["transformix", "-def", str(inp), "-tp", str(tmp_path / (name + ".txt")),
                          "-out", str(out)], capture_output=True, text=True)
    log = (out / "transformix.log").read_text() if (out / "transformix.log").exists() else ""
    assert res.returncode == 0, res.stdout[-3000:] + log[-3000:]
    got = []
    for line in (out / "outputpoints.txt").read_text().splitlines():
        field = line.split("OutputPoint = [")[1].split("]")[0]
        got.append([float(v) for v in field.split()])
    return np.array(got) / MOV_PX


@pytest.mark.skipif(not shutil.which("transformix"),
                    reason="transformix not installed (Debian package elastix)")
@pytest.mark.parametrize("name", ["affine", "field", "fieldv", "rotfield"])
def test_elastix_files_vs_transformix(driver, tmp_path, name):
    write(driver, tmp_path, name)
    pts = sample_points()
    want = ours(driver, name, pts)
    got = transformix_points(tmp_path, name, pts)
    err = np.hypot(*(got - want).T)
    assert err.max() < TOL_PX, (name, err.max(), pts[err.argmax()])
    if name != "affine":
        # the field matters: the main file without its initial transform
        # is far off, so the test sees whether transformix followed the chain
        main = (tmp_path / (name + ".txt")).read_text()
        cut = main.replace(str(tmp_path / (name + ".field.txt")), "NoInitialTransform")
        assert cut != main
        (tmp_path / "cut.txt").write_text(cut)
        affine_only = transformix_points(tmp_path, "cut", pts)
        assert np.hypot(*(affine_only - want).T).max() > 1.0


def json_oracle(doc_path, pts):
    """docs/transforms.md: u = (X - offset) / scale, D bilinear clamped,
    src = matrix (X + scale * D(u)) for units "field", (X + D(u)) for "pixels"."""
    doc = json.loads(doc_path.read_text())
    assert doc["scopefs_transform"] == 1
    m = np.array(doc["matrix"], dtype=float)
    if m.shape == (2, 3):
        m = np.vstack([m, [0, 0, 1]])
    x = pts.astype(float).copy()
    if "field" in doc:
        f = doc["field"]
        d = tifffile.imread(doc_path.parent / f["file"])
        assert d.dtype == np.float32 and d.ndim == 3 and d.shape[2] == 2
        h, w = d.shape[:2]
        scale = np.broadcast_to(np.asarray(f.get("scale", 1), dtype=float), (2,))
        offset = np.asarray(f.get("offset", [0, 0]), dtype=float)
        u = (x - offset) / scale
        gx = np.clip(u[:, 0], 0, w - 1)
        gy = np.clip(u[:, 1], 0, h - 1)
        ix = np.minimum(np.floor(gx).astype(int), max(w - 2, 0))
        iy = np.minimum(np.floor(gy).astype(int), max(h - 2, 0))
        tx, ty = gx - ix, gy - iy
        ix1, iy1 = np.minimum(ix + 1, w - 1), np.minimum(iy + 1, h - 1)
        dd = ((1 - tx) * (1 - ty))[:, None] * d[iy, ix] + (tx * (1 - ty))[:, None] * d[iy, ix1] \
            + ((1 - tx) * ty)[:, None] * d[iy1, ix] + (tx * ty)[:, None] * d[iy1, ix1]
        x = x + (dd * scale if f.get("units", "field") == "field" else dd)
    hom = np.c_[x, np.ones(len(x))] @ m.T
    return hom[:, :2] / hom[:, 2:]


@pytest.mark.parametrize("name", ["affine", "field", "fieldv", "proj"])
def test_json_vs_numpy(driver, tmp_path, name):
    write(driver, tmp_path, name)
    pts = np.vstack([sample_points(), [[-40, -30], [350, 260]]])  # clamping past the grid
    want = ours(driver, name, pts)
    got = json_oracle(tmp_path / (name + ".json"), pts)
    err = np.hypot(*(got - want).T)
    assert err.max() < TOL_PX, (name, err.max(), pts[err.argmax()])


def test_rotated_grid_has_no_json(driver, tmp_path):
    """A grid rotated against the pixel axes cannot be said in our JSON:
    no .json is written for it, while the elastix files are."""
    write(driver, tmp_path, "rotfield")
    assert not (tmp_path / "rotfield.json").exists()
    assert (tmp_path / "rotfield.txt").exists() and (tmp_path / "rotfield.field.mhd").exists()


@pytest.mark.skipif(not shutil.which("transformix"),
                    reason="transformix not installed (Debian package elastix)")
@pytest.mark.parametrize("name", ["field", "rotfield"])
def test_elastix_whole_field_vs_transformix(driver, tmp_path, name):
    """`transformix -def all`: the displacement at every reference pixel
    centre (ITK puts pixel i's centre at Origin + Spacing * i)."""
    write(driver, tmp_path, name)
    out = tmp_path / "all"
    out.mkdir()
    subprocess.run(["transformix", "-def", "all", "-tp", str(tmp_path / (name + ".txt")),
                    "-out", str(out)], capture_output=True, check=True)
    header = (out / "deformationField.mhd").read_text()
    assert "DimSize = %d %d" % (REF_W, REF_H) in header and "MET_FLOAT" in header
    disp = np.fromfile(out / "deformationField.raw", dtype="<f4").reshape(REF_H, REF_W, 2)
    yy, xx = np.mgrid[0:REF_H, 0:REF_W]
    pts = np.c_[xx.ravel(), yy.ravel()].astype(float)
    got = (pts * REF_PX + disp.reshape(-1, 2)) / MOV_PX
    want = ours(driver, name, pts)
    err = np.hypot(*(got - want).T)
    # float32 displacements of up to ~60 um: 1e-3 px still holds
    assert err.max() < TOL_PX, (name, err.max(), pts[err.argmax()])

#!/usr/bin/python3
"""Make the scopefs demo dataset in DIR (numpy, scipy and tifffile only).

    tools/demo-data.py DIR

Writes
  DIR/reference.ome.tif  4-channel uint16 synthetic tissue (DAPI, CD3, CD8,
                         PanCK), 4096 x 4096, 0.5 um pixels, OME-TIFF pyramid
                         with reduced levels as SubIFDs (tiled 512, zlib)
  DIR/moving.ome.tif     the same tissue seen by a second scan: rotated by
                         ROTATE_DEG about the centre and shifted by SHIFT_XY
                         pixels, same layout
  DIR/round2.ome.tif     a copy of moving.ome.tif that has no transform
                         file: scopefs registers it itself on first use, and
                         transforms/round2.json should match moving.json
  DIR/lightsheet/        a z-stack of 32 single-page uint16 planes
                         img_000001.tif ... (512 x 512, fluorescent beads)
Takes well under 30 s on two cores.  The tissue is drawn in slide
coordinates, so the moving scan samples the very same continuous pattern
(up to bilinear interpolation): registering moving onto reference must
recover the transform printed at the end.
"""

import json
import os
import shutil
import sys
import time

import numpy as np
import scipy.ndimage as ndi
import tifffile

SIZE = 4096
CHANNELS = ['DAPI', 'CD3', 'CD8', 'PanCK']
PIXEL_UM = 0.5
ROTATE_DEG = 1.5
SHIFT_XY = (37.0, -23.0)  # moving image content moves by this, in pixels (x, y)
PLANES, PLANE_SIZE = 32, 512


def smooth_field(rng, h, w, cell):
    """Smooth random field in [0, 1): coarse noise upsampled bilinearly."""
    coarse = rng.random((h // cell + 3, w // cell + 3), dtype=np.float32)
    return ndi.zoom(coarse, cell, order=1, prefilter=False)[:h, :w]


def tissue(rng):
    """(channels, SIZE, SIZE) float32 in about [0, 1]: a tissue mask with
    nuclei (DAPI), scattered T cells (CD3, a subset also CD8) and epithelial
    islands (PanCK)."""
    h = w = SIZE
    mask = np.clip(smooth_field(rng, h, w, 512) * 2.2 - 0.7, 0, 1)
    mask = ndi.gaussian_filter(mask, 8)
    n = h * w // 350
    ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
    nuclei = np.zeros((h, w), np.float32)
    nuclei[ys, xs] = rng.uniform(0.6, 1.0, n).astype(np.float32)
    t = rng.random(n) < 0.15  # T cells among the nuclei
    cd3 = np.zeros_like(nuclei)
    cd3[ys[t], xs[t]] = 1.0
    cd8 = np.zeros_like(nuclei)
    sub = t & (rng.random(n) < 0.4)
    cd8[ys[sub], xs[sub]] = 1.0
    out = np.empty((4, h, w), np.float32)
    out[0] = ndi.gaussian_filter(nuclei, 2.5) * 40
    out[1] = ndi.gaussian_filter(cd3, 4.0) * 70  # membrane: wider than the nucleus
    out[2] = ndi.gaussian_filter(cd8, 4.0) * 70
    out[3] = np.clip(smooth_field(rng, h, w, 160) * 2.0 - 1.0, 0, 1) * 0.8
    out *= mask
    out += 0.02 + rng.random(out.shape, dtype=np.float32) * 0.03
    return np.clip(out, 0, 1)


def to_uint16(a):
    return (a * 60000).astype(np.uint16)


def moved(a):
    """The moving scan: output pixel p shows reference content at
    R^-1 (p - c - shift) + c, i.e. content rotated by ROTATE_DEG and shifted
    by SHIFT_XY (bilinear)."""
    th = np.deg2rad(ROTATE_DEG)
    # ndimage works in (y, x): input = M @ output + offset.
    rot_inv = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    c = np.array([(SIZE - 1) / 2.0, (SIZE - 1) / 2.0])
    shift = np.array([SHIFT_XY[1], SHIFT_XY[0]])
    offset = c - rot_inv @ (c + shift)
    out = np.empty_like(a)
    for i in range(a.shape[0]):
        out[i] = ndi.affine_transform(a[i], rot_inv, offset=offset, order=1, mode='constant',
                                      cval=0.02)
    return out


def moving_transform():
    """The backward map of moved(): reference pixel X -> moving pixel
    p = R (X - c) + c + shift, as a 3x3 matrix in (x, y) pixels."""
    th = np.deg2rad(ROTATE_DEG)
    rot_inv_yx = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    swap = np.array([[0.0, 1.0], [1.0, 0.0]])
    r_xy = swap @ np.linalg.inv(rot_inv_yx) @ swap
    c = np.array([(SIZE - 1) / 2.0, (SIZE - 1) / 2.0])
    t = c + np.array(SHIFT_XY, dtype=float) - r_xy @ c
    return [[r_xy[0, 0], r_xy[0, 1], t[0]], [r_xy[1, 0], r_xy[1, 1], t[1]], [0.0, 0.0, 1.0]]


def pyramid(a):
    """Levels down to one 512 tile, each the 2x2 mean (rounded) of the last."""
    levels = [a]
    while max(levels[-1].shape[1:]) > 512:
        x = levels[-1].astype(np.uint32)
        h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
        s = x[:, 0:h:2, 0:w:2] + x[:, 1:h:2, 0:w:2] + x[:, 0:h:2, 1:w:2] + x[:, 1:h:2, 1:w:2]
        levels.append(((s + 2) // 4).astype(np.uint16))
    return levels


def write_ome(path, levels):
    opts = dict(photometric='minisblack', tile=(512, 512), compression='zlib',
                compressionargs={'level': 1})
    md = {'axes': 'CYX', 'Channel': {'Name': CHANNELS}, 'PhysicalSizeX': PIXEL_UM,
          'PhysicalSizeXUnit': 'µm', 'PhysicalSizeY': PIXEL_UM, 'PhysicalSizeYUnit': 'µm'}
    res = (1e4 / PIXEL_UM, 1e4 / PIXEL_UM)
    tmp = path + '.part'
    with tifffile.TiffWriter(tmp, ome=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, metadata=md, resolution=res,
                 resolutionunit='CENTIMETER', **opts)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, metadata=None, **opts)
    os.replace(tmp, path)


def lightsheet(rng, folder):
    os.makedirs(folder, exist_ok=True)
    vol = np.zeros((PLANES, PLANE_SIZE, PLANE_SIZE), np.float32)
    n = 600
    vol[rng.integers(0, PLANES, n), rng.integers(0, PLANE_SIZE, n),
        rng.integers(0, PLANE_SIZE, n)] = rng.uniform(0.4, 1.0, n).astype(np.float32)
    # A light-sheet PSF is longer in z than in x and y.
    vol = ndi.gaussian_filter(vol, (2.5, 1.2, 1.2))
    vol /= vol.max()
    vol = vol * 50000 + 800 + rng.poisson(60, vol.shape)
    vol = np.clip(vol, 0, 65535).astype(np.uint16)
    for z in range(PLANES):
        tifffile.imwrite(os.path.join(folder, 'img_%06d.tif' % (z + 1)), vol[z], metadata=None)


def main(argv):
    if len(argv) not in (2, 3) or argv[1].startswith('-'):
        sys.stderr.write('usage: %s DIR [TRANSFORMS_DIR]\n' % argv[0])
        return 2
    if len(argv) == 3:
        os.makedirs(argv[2], exist_ok=True)
        with open(os.path.join(argv[2], 'moving.json'), 'w') as f:
            json.dump({'scopefs_transform': 1, 'matrix': moving_transform()}, f, indent=1)
    out = argv[1]
    os.makedirs(out, exist_ok=True)
    t0 = time.monotonic()
    rng = np.random.default_rng(20240601)
    ref = tissue(rng)
    write_ome(os.path.join(out, 'reference.ome.tif'), pyramid(to_uint16(ref)))
    write_ome(os.path.join(out, 'moving.ome.tif'), pyramid(to_uint16(moved(ref))))
    shutil.copyfile(os.path.join(out, 'moving.ome.tif'), os.path.join(out, 'round2.ome.tif'))
    del ref
    lightsheet(rng, os.path.join(out, 'lightsheet'))
    print('demo data in %s (%.1f s): reference.ome.tif, moving.ome.tif and its copy '
          'round2.ome.tif (content rotated %.1f deg about the centre and shifted by (%+.0f, %+.0f) px), '
          'lightsheet/ (%d planes)' % (out, time.monotonic() - t0, ROTATE_DEG, SHIFT_XY[0],
                                       SHIFT_XY[1], PLANES))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))

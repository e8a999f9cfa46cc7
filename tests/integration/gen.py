"""Test data for the scopefs integration tests, made independently of scopefs.

Everything here uses numpy, scipy, tifffile and the libvips command line only:
the images, their pyramids and the expected pixels of the virtual files are
computed without any scopefs code, so a test comparing scopefs output with
these arrays compares against an independent oracle.

Array convention used by the helpers (``norm`` makes it): every image is a
4-D array (C, H, W, S) -- C planar channels (TIFF pages), S interleaved
samples per pixel (1, or 3 for RGB).
"""

import os
import subprocess
import zlib

import numpy as np
import scipy.ndimage as ndi
import tifffile

VIRTUAL_TILE = 512  # tile edge of scopefs' virtual OME-TIFFs (the contract)


# --- synthetic images -------------------------------------------------------


def _smooth_field(rng, h, w, cell):
    """Smooth random field in [0, 1): coarse noise upsampled bilinearly."""
    gh, gw = h // cell + 3, w // cell + 3
    coarse = rng.random((gh, gw), dtype=np.float32)
    fine = ndi.zoom(coarse, cell, order=1, prefilter=False)
    return fine[:h, :w]


def _spots(rng, h, w, density, sigma):
    """Nuclei-like spots: random points blurred by a Gaussian, peak about 1."""
    img = np.zeros((h, w), np.float32)
    n = max(1, int(h * w * density))
    ys = rng.integers(0, h, n)
    xs = rng.integers(0, w, n)
    img[ys, xs] = rng.uniform(0.5, 1.0, n).astype(np.float32)
    img = ndi.gaussian_filter(img, sigma, truncate=3.0)
    peak = 1.0 / (2 * np.pi * sigma * sigma)
    return img / peak


def tissue(h, w, channels=4, dtype=np.uint16, seed=0):
    """Synthetic fluorescence tissue, shape (channels, h, w).

    Per channel: a smooth tissue-density field (blobs), nuclei-like spots
    modulated by it, and pixel noise.  Integer types span most of their
    range; float32 holds values in about [0, 1.5]."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    out = np.empty((channels, h, w), dtype)
    mask = _smooth_field(rng, h, w, max(8, min(h, w) // 6 or 1))
    for c in range(channels):
        blobs = _smooth_field(rng, h, w, max(4, min(h, w) // 20 or 1))
        spots = _spots(rng, h, w, 1.0 / 900, 2.5 + c % 3)
        val = mask * (0.3 * blobs + 0.8 * spots)
        val += rng.random((h, w), dtype=np.float32) * 0.08
        if dtype.kind == 'f':
            out[c] = val.astype(dtype)
        else:
            top = np.iinfo(dtype).max
            out[c] = np.clip(val * (0.7 * top), 0, top).astype(dtype)
    return out


def rgb_tissue(h, w, seed=0):
    """Synthetic H&E-like brightfield image, shape (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    mask = _smooth_field(rng, h, w, max(8, min(h, w) // 6))
    nuclei = _spots(rng, h, w, 1.0 / 700, 3.0)
    eosin = mask * (0.5 + 0.5 * _smooth_field(rng, h, w, max(4, min(h, w) // 25)))
    hema = np.clip(mask * nuclei * 1.5, 0, 1)
    r = 245 - 60 * eosin - 150 * hema
    g = 245 - 150 * eosin - 170 * hema
    b = 245 - 70 * eosin - 60 * hema
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 3, (h, w, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def norm(a, rgb=False):
    """Bring an array to (C, H, W, S): (H, W) -> (1, H, W, 1);
    (C, H, W) -> (C, H, W, 1); (H, W, 3) with rgb -> (1, H, W, 3)."""
    a = np.asarray(a)
    if rgb:
        if a.ndim == 3:
            return a[np.newaxis]
        return a
    if a.ndim == 2:
        return a[np.newaxis, :, :, np.newaxis]
    if a.ndim == 3:
        return a[:, :, :, np.newaxis]
    return a


def box_reduce(a, k):
    """Average k x k boxes of a (C, H, W, S) array over in-image pixels only.

    Output size ceil(H/k) x ceil(W/k).  Integers are rounded half up,
    (sum + n/2) // n with n the in-image pixel count of the box (for odd n
    this equals (sum + n // 2) // n); float32 is the plain mean."""
    c, h, w, s = a.shape
    oh, ow = -(-h // k), -(-w // k)
    float_type = a.dtype.kind == 'f'
    acc = np.zeros((c, oh * k, ow * k, s), np.float64 if float_type else np.int64)
    acc[:, :h, :w, :] = a
    sums = acc.reshape(c, oh, k, ow, k, s).sum(axis=(2, 4))
    ones = np.zeros((oh * k, ow * k), np.int64)
    ones[:h, :w] = 1
    n = ones.reshape(oh, k, ow, k).sum(axis=(1, 3))[np.newaxis, :, :, np.newaxis]
    if float_type:
        return (sums / n).astype(a.dtype)
    return ((2 * sums + n) // (2 * n)).astype(a.dtype)


def pyramid(a, levels):
    """Levels 0..levels-1 of a (C, H, W, S) array, each a 2x2 mean of the last."""
    out = [a]
    for _ in range(levels - 1):
        out.append(box_reduce(out[-1], 2))
    return out


def level_downsample(w0, h0, w, h):
    """Level-0 pixels per pixel of a (w, h) level of a (w0, h0) slide, per
    axis (docs/virtual-tiff.md, "Pyramid levels: one downsample rule"): r in
    both axes when w and h are each floor or ceil of w0 / r and h0 / r for
    one integer r -- a power of two before any other, the one nearest the
    longer side's ratio where several fit -- else (w0 / w, h0 / h)."""
    if (w, h) == (w0, h0):
        return 1.0, 1.0
    fits = [r for r in range(1, 2 * max(w0 // max(w, 1), h0 // max(h, 1)) + 3)
            if w in (w0 // r, -(-w0 // r)) and h in (h0 // r, -(-h0 // r))]
    if not fits:
        return w0 / w, h0 / h
    ratio = w0 / w if w >= h else h0 / h
    pow2 = [r for r in fits if r & (r - 1) == 0]
    best = min(pow2 or fits, key=lambda r: abs(np.log(r / ratio)) if pow2 else abs(r - ratio))
    return float(best), float(best)


def virtual_level_count(w, h, tile=VIRTUAL_TILE):
    """Levels of the virtual file by the ceil-halving rule: level l exists
    while level l-1 does not fit one tile."""
    n = 1
    while w > tile or h > tile:
        w, h = -(-w // 2), -(-h // 2)
        n += 1
    return n


def expected_virtual_levels(src_levels, tile=VIRTUAL_TILE):
    """The pixels scopefs must serve for a source with the given levels
    (list of (C, H, W, S) arrays read from the source file).

    Level l is the source's level l when the source has one; otherwise the
    box average of the source's coarsest level s (the nearest finer one) with
    k = 2^(l - s).  Levels continue while the previous one exceeds one tile."""
    out = []
    w0, h0 = src_levels[0].shape[2], src_levels[0].shape[1]
    level = 0
    while True:
        if level < len(src_levels):
            arr = src_levels[level]
        else:
            s = len(src_levels) - 1
            arr = box_reduce(src_levels[s], 2 ** (level - s))
            want = (-(-h0 // 2**level), -(-w0 // 2**level))
            assert arr.shape[1:3] == want, (arr.shape, want)
        out.append(arr)
        h, w = arr.shape[1:3]
        if w <= tile and h <= tile:
            return out
        level += 1


# --- writers ----------------------------------------------------------------


def _ome_metadata(c, s, names, pixel_size):
    md = {}
    if s == 3:
        md['axes'] = 'YXS'
    elif c == 1:
        md['axes'] = 'YX'
    else:
        md['axes'] = 'CYX'
    if names is not None:
        md['Channel'] = {'Name': list(names)}
    if pixel_size:
        md['PhysicalSizeX'] = pixel_size
        md['PhysicalSizeXUnit'] = 'µm'
        md['PhysicalSizeY'] = pixel_size
        md['PhysicalSizeYUnit'] = 'µm'
    return md


def _squeeze(a):
    """(C, H, W, S) -> what tifffile writes: (H, W, 3), (H, W) or (C, H, W)."""
    c, _, _, s = a.shape
    if s == 3:
        return a[0]
    if c == 1:
        return a[0, :, :, 0]
    return a[..., 0]


def write_ome(path, levels, names=None, pixel_size=0.5, tile=256, compression=None,
              bigtiff=False):
    """Write an OME-TIFF pyramid: level 0 pages in the main chain (one per
    channel, or one RGB page), reduced levels as SubIFDs.  levels: list of
    (C, H, W, S) arrays.  tile=None writes strips."""
    c, _, _, s = levels[0].shape
    photometric = 'rgb' if s == 3 else 'minisblack'
    kw = dict(photometric=photometric, compression=compression)
    if tile:
        kw['tile'] = (tile, tile)
    res = None
    if pixel_size:
        res = (1e4 / pixel_size, 1e4 / pixel_size)
    with tifffile.TiffWriter(path, bigtiff=bigtiff, ome=True) as tw:
        tw.write(_squeeze(levels[0]), subifds=len(levels) - 1,
                 metadata=_ome_metadata(c, s, names, pixel_size),
                 resolution=res, resolutionunit='CENTIMETER' if res else None, **kw)
        for lv in levels[1:]:
            tw.write(_squeeze(lv), subfiletype=1, metadata=None, **kw)


def write_flat_strips(path, a):
    """A plain (non-OME) single-level TIFF in strips; a is (C, H, W, S)."""
    c, _, _, s = a.shape
    tifffile.imwrite(path, _squeeze(a), photometric='rgb' if s == 3 else 'minisblack',
                     metadata=None, rowsperstrip=64)


def write_vips_pyramid(path, a, tmpdir):
    """A libvips pyramid (levels as main-chain pages): libvips computes the
    reduced levels itself.  a is one channel or RGB, (1, H, W, S)."""
    flat = os.path.join(tmpdir, 'vips-src-%d.tif' % os.getpid())
    tifffile.imwrite(flat, _squeeze(a), metadata=None,
                     photometric='rgb' if a.shape[3] == 3 else 'minisblack')
    subprocess.run(['vips', 'tiffsave', flat, path, '--tile', '--pyramid', '--tile-width',
                    '256', '--tile-height', '256'], check=True)
    os.unlink(flat)


def write_planes(folder, n, h, w, dtype=np.uint16, seed=0, prefix='img_'):
    """A z-stack as n single-page 2-D TIFFs img_000001.tif...; returns
    [(name, array)]."""
    os.makedirs(folder, exist_ok=True)
    vol = beads(n, h, w, dtype, seed)
    out = []
    for z in range(n):
        name = '%s%06d.tif' % (prefix, z + 1)
        tifffile.imwrite(os.path.join(folder, name), vol[z], metadata=None)
        out.append((name, vol[z]))
    return out


def beads(n, h, w, dtype=np.uint16, seed=0, count=None):
    """Synthetic light-sheet volume (n, h, w): Gaussian beads, background, noise."""
    rng = np.random.default_rng(seed)
    vol = np.zeros((n, h, w), np.float32)
    count = count or max(4, h * w * n // 40000)
    zs = rng.integers(0, n, count)
    ys = rng.integers(0, h, count)
    xs = rng.integers(0, w, count)
    vol[zs, ys, xs] = rng.uniform(0.5, 1.0, count).astype(np.float32)
    vol = ndi.gaussian_filter(vol, (2.0, 1.2, 1.2), truncate=3.0)
    vol /= max(float(vol.max()), 1e-6)
    vol += 0.02 + rng.random(vol.shape, dtype=np.float32) * 0.02
    top = np.iinfo(dtype).max if np.dtype(dtype).kind in 'ui' else 1.0
    return np.clip(vol * 0.8 * top, 0, top).astype(dtype)


def write_sparse_big(path, size, squares, tile=512):
    """A size x size uint16 flat tiled zlib TIFF, zero except bright squares.

    squares: [(y, x, side, value)].  Written tile by tile from pre-compressed
    bytes, so memory stays one tile and the file stays small.  Returns a
    function tile_pixels(ty, tx) -> (tile, tile) array, the expected tile."""
    zero = zlib.compress(np.zeros((tile, tile), np.uint16).tobytes(), 6)
    n = -(-size // tile)

    def tile_pixels(ty, tx):
        t = np.zeros((tile, tile), np.uint16)
        y0, x0 = ty * tile, tx * tile
        for (y, x, side, value) in squares:
            ya, yb = max(y, y0), min(y + side, y0 + tile, size)
            xa, xb = max(x, x0), min(x + side, x0 + tile, size)
            if ya < yb and xa < xb:
                t[ya - y0:yb - y0, xa - x0:xb - x0] = value
        return t

    def touched(ty, tx):
        y0, x0 = ty * tile, tx * tile
        return any(y < y0 + tile and y + side > y0 and x < x0 + tile and x + side > x0
                   for (y, x, side, _) in squares)

    def tiles():
        for ty in range(n):
            for tx in range(n):
                if touched(ty, tx):
                    yield zlib.compress(tile_pixels(ty, tx).tobytes(), 6)
                else:
                    yield zero

    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        tw.write(tiles(), shape=(size, size), dtype=np.uint16, tile=(tile, tile),
                 compression='zlib', photometric='minisblack', metadata=None)
    return tile_pixels


# --- readers ----------------------------------------------------------------


def read_levels(path):
    """All pyramid levels of a TIFF as (C, H, W, S) arrays, read by tifffile.

    tifffile groups both OME/SubIFD pyramids and main-chain (libvips)
    pyramids into series[0].levels."""
    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        rgb = tf.pages[0].samplesperpixel == 3
        return [norm(lv.asarray(), rgb) for lv in series.levels]

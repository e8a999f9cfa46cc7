"""Large files: the RAM bound holds while a file much larger than it is
copied, and a virtual file past 4 GiB is a valid BigTIFF whose far tiles
equal the source's (read by tifffile and libvips)."""

import os
import subprocess

import numpy as np
import pytest
import tifffile

import gen

# Peak RSS allowed above mem=: the binary, libtiff/libvips/glibc arenas, FUSE
# request buffers (up to 1 MiB per FUSE thread), one source tile and one unit
# of scratch per worker, and the prefetch queue.  Measured well below this;
# a daemon that keeps every decoded tile (about 400 MB here) fails it.
RSS_SLACK_MB = 150


def vm_hwm_mb(pid):
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024.0
    raise AssertionError('no VmHWM for pid %d' % pid)


@pytest.mark.slow
def test_mem_bound_holds_during_full_copy(scopefs, tmp_path):
    # 6144 x 6144 x 4 channels uint16 = 302 MB of level 0 (about 400 MB with
    # the pyramid), made by tiling one 1536 px patch: its pyramid tiles the
    # patch's pyramid exactly, so the source has all five levels.
    patch = gen.norm(gen.tissue(1536, 1536, 4, seed=61))
    levels = [np.tile(lv, (1, 4, 4, 1)) for lv in gen.pyramid(patch, 5)]
    gen.write_ome(scopefs.raw / 'big.ome.tif', levels, ['DAPI', 'CD3', 'CD8', 'PanCK'], 0.5,
                  tile=512)
    del levels
    mem_mb = 32
    m = scopefs.mount(opts={'mem': '%dM' % mem_mb})
    vpath = m.path('registered', 'big.ome.tif')
    size = os.stat(vpath).st_size
    assert size > 10 * mem_mb * 2**20
    # Stream it (do not keep it): check level 0 of channel 3, tile (2, 5).
    with tifffile.TiffFile(vpath) as tf:
        page = tf.pages[3]
        assert len(page.dataoffsets) == 12 * 12
        off, n = page.dataoffsets[2 * 12 + 5], page.databytecounts[2 * 12 + 5]
    total = 0
    tile_bytes = None
    with open(vpath, 'rb') as f:
        while True:
            pos = f.tell()
            b = f.read(1 << 20)
            if not b:
                break
            if pos <= off < pos + len(b):
                tile_bytes = bytearray(b[off - pos:])
            elif tile_bytes is not None and len(tile_bytes) < n:
                tile_bytes += b[:n - len(tile_bytes)]
            total += len(b)
    assert total == size
    hwm = vm_hwm_mb(m.pid)
    st = m.status()
    assert st['errors'] == 0
    assert st['ram_bytes'] <= mem_mb * 2**20 + 4 * 512 * 512 * 2, st
    want = levels_tile(patch, 2, 5)
    got = np.frombuffer(bytes(tile_bytes[:n]), np.uint16).reshape(512, 512)
    assert np.array_equal(got, want)
    print("peak RSS %.1f MB, file %d bytes" % (hwm, size))
    if os.environ.get('SCOPEFS_SANITIZED'):
        return  # ASan's shadow memory and quarantine are not the daemon's
    assert hwm < mem_mb + RSS_SLACK_MB, 'daemon peak RSS %.0f MB with mem=%dM' % (hwm, mem_mb)


def levels_tile(patch, ty, tx):
    """Level-0 tile (ty, tx) of channel 3 of the 4x4 tiling of patch."""
    full_y = np.arange(ty * 512, ty * 512 + 512) % patch.shape[1]
    full_x = np.arange(tx * 512, tx * 512 + 512) % patch.shape[2]
    return patch[3][np.ix_(full_y, full_x)][..., 0]


@pytest.mark.slow
def test_bigtiff_past_4gib(scopefs, tmp_path):
    size = 48000
    # Bright squares in tiles whose virtual offsets pass 4 GiB (rows 88..93),
    # one across a tile corner and one in the partial edge tile.
    squares = [(45100, 5200, 300, 1000), (46592 - 100, 25600 - 100, 200, 2222),
               (47800, 47700, 200, 3333), (47990, 47990, 10, 4444), (1000, 1000, 64, 555)]
    src = scopefs.raw / 'huge.tif'
    tile_pixels = gen.write_sparse_big(str(src), size, squares)
    assert os.path.getsize(src) < 64 * 2**20
    m = scopefs.mount()
    vpath = m.path('registered', 'huge.ome.tif')
    vsize = os.stat(vpath).st_size
    assert vsize > 4 * 2**30
    with open(vpath, 'rb') as f:
        head = f.read(16)
    assert head[:4] in (b'II+\x00', b'MM\x00+'), head[:4]

    n = -(-size // 512)
    with tifffile.TiffFile(vpath) as tf, tifffile.TiffFile(src) as sf:
        assert tf.is_bigtiff
        page = tf.pages[0]
        assert (page.imagelength, page.imagewidth) == (size, size)
        assert page.tilewidth == 512 and page.compression == 1
        assert len(page.dataoffsets) == n * n
        spage = sf.pages[0]
        checked = 0
        fd = os.open(vpath, os.O_RDONLY)
        try:
            for (y, x, side, _) in squares + [(45000, 40000, 1, 0)]:
                for ty, tx in {(y // 512, x // 512), ((y + side - 1) // 512,
                                                      (x + side - 1) // 512)}:
                    i = ty * n + tx
                    off = page.dataoffsets[i]
                    if y > 40000:
                        assert off > 4 * 2**30, 'tile (%d,%d) at %d' % (ty, tx, off)
                    data = os.pread(fd, page.databytecounts[i], off)
                    got = np.frombuffer(data, np.uint16).reshape(512, 512)
                    sf.filehandle.seek(spage.dataoffsets[i])
                    raw = sf.filehandle.read(spage.databytecounts[i])
                    want = spage.decode(raw, i)[0].reshape(512, 512)
                    h = min(512, size - ty * 512)
                    w = min(512, size - tx * 512)
                    assert np.array_equal(got[:h, :w], want[:h, :w]), (ty, tx)
                    assert np.array_equal(got[:h, :w], tile_pixels(ty, tx)[:h, :w]), (ty, tx)
                    checked += 1
        finally:
            os.close(fd)
    assert checked >= 8

    # libvips reads a region past 4 GiB from the virtual BigTIFF.
    out = tmp_path / 'crop.tif'
    r = subprocess.run(['vips', 'crop', str(vpath), str(out), '47600', '47500', '400', '500'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with tifffile.TiffFile(out) as tf:
        crop = tf.pages[0].asarray()
    want = np.zeros((500, 400), np.uint16)
    for (y, x, side, value) in squares:
        ya, yb = max(y, 47500), min(y + side, 48000)
        xa, xb = max(x, 47600), min(x + side, 48000)
        if ya < yb and xa < xb:
            want[ya - 47500:yb - 47500, xa - 47600:xb - 47600] = value
    assert np.array_equal(crop, want)
    assert m.status()['errors'] == 0

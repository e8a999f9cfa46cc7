"""Block codec and cache entry format, checked from outside with numpy and python-lz4.

The C codec and cache are built into a small shared library (-O2, the release
flags) and driven through ctypes.  Independent oracles:
  - tiles are made with numpy/scipy (smooth tissue-like field, Gaussian or
    Poisson noise of about 20 grey levels around 1000-3000);
  - encoded payloads are decoded with python-lz4 and un-shuffled with numpy
    reshapes, which is the format docs/cache-format.md describes;
  - entry files are parsed with struct following that spec, and their
    checksums recomputed with the xxHash library's XXH64.
It also measures and prints the compression ratio with and without the
shuffle and the encode/decode speed (run with -s to see the numbers).
"""

import ctypes
import ctypes.util
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import lz4.block
import numpy as np
import pytest
from scipy import ndimage

REPO = Path(__file__).resolve().parents[2]
SOURCES = ["src/core/blockcodec.c", "src/io/cache.c", "src/util/err.c", "src/util/log.c",
           "src/util/key.c"]


class SfErr(ctypes.Structure):
    _fields_ = [("code", ctypes.c_int), ("msg", ctypes.c_char * 512)]


class SfKey(ctypes.Structure):
    _fields_ = [("hi", ctypes.c_uint64), ("lo", ctypes.c_uint64)]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if not shutil.which("cc") or not shutil.which("pkg-config"):
        pytest.skip("needs cc and pkg-config")
    out = tmp_path_factory.mktemp("codec") / "libsfcodec.so"
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "liblz4", "libxxhash"],
                           check=True, capture_output=True, text=True).stdout.split()
    subprocess.run(["cc", "-std=c11", "-D_GNU_SOURCE", "-O2", "-shared", "-fPIC", "-pthread",
                    "-Wall", "-Wextra", "-Werror", "-Iinclude", *SOURCES, *flags, "-o",
                    str(out)], check=True, cwd=REPO)
    so = ctypes.CDLL(str(out))
    u8p, size_t = ctypes.c_void_p, ctypes.c_size_t
    so.sf_block_bound.restype = size_t
    so.sf_block_bound.argtypes = [size_t]
    so.sf_block_encode.argtypes = [u8p, size_t, ctypes.c_uint, u8p, u8p, size_t,
                                   ctypes.POINTER(size_t), ctypes.POINTER(SfErr)]
    so.sf_block_decode.argtypes = [u8p, size_t, size_t, ctypes.c_uint, u8p, u8p,
                                   ctypes.POINTER(SfErr)]
    so.sf_key_of.restype = SfKey
    so.sf_key_of.argtypes = [ctypes.c_char_p, size_t]
    so.sf_cache_open.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.POINTER(ctypes.c_void_p),
                                 ctypes.POINTER(SfErr)]
    so.sf_cache_close.argtypes = [ctypes.c_void_p]
    so.sf_cache_put.argtypes = [ctypes.c_void_p, SfKey, u8p, size_t, ctypes.c_uint,
                                ctypes.POINTER(SfErr)]
    so.sf_cache_get.argtypes = [ctypes.c_void_p, SfKey, u8p, size_t, ctypes.POINTER(SfErr)]
    return so


@pytest.fixture(scope="module")
def xxh64():
    name = ctypes.util.find_library("xxhash")
    if not name:
        pytest.skip("libxxhash not found")
    xx = ctypes.CDLL(name)
    xx.XXH64.restype = ctypes.c_uint64
    xx.XXH64.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64]
    return lambda data: xx.XXH64(bytes(data), len(data), 0)


def tissue(noise, seed=1, shape=(512, 512)):
    """Smooth tissue-like uint16 image in 1000-3000 plus noise of ~20 grey levels."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 24)
    field = (field - field.min()) / (field.max() - field.min())
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    nuclei = sum(np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 12.0 ** 2))
                 for cx, cy in rng.uniform(0, shape[0], size=(40, 2)))
    smooth = 1000 + 1500 * field + 500 * np.clip(nuclei, 0, 1)
    if noise == "gauss":
        img = smooth + rng.normal(0, 20, shape)
    else:  # Poisson with a gain that gives sigma ~20 at 2000
        gain = 0.2
        img = gain * rng.poisson(smooth / gain)
    return np.clip(np.rint(img), 0, 65535).astype("<u2")


def buf(arr):
    return arr.ctypes.data_as(ctypes.c_void_p)


def encode(lib, data, elem):
    src = np.frombuffer(data, np.uint8)
    n = src.size
    cap = lib.sf_block_bound(n)
    dst = np.empty(cap, np.uint8)
    scratch = np.empty(max(n, 1), np.uint8)
    out_n = ctypes.c_size_t()
    err = SfErr()
    rc = lib.sf_block_encode(buf(src), n, elem, buf(scratch), buf(dst), cap,
                             ctypes.byref(out_n), ctypes.byref(err))
    assert rc == 0, err.msg
    return dst[:out_n.value].tobytes()


def decode(lib, enc, n, elem):
    src = np.frombuffer(enc, np.uint8)
    dst = np.empty(max(n, 1), np.uint8)
    scratch = np.empty(max(n, 1), np.uint8)
    err = SfErr()
    rc = lib.sf_block_decode(buf(src), len(enc), n, elem, buf(scratch), buf(dst),
                             ctypes.byref(err))
    return rc, dst[:n].tobytes()


def unshuffle_numpy(planes, elem):
    """The spec's layout: plane b holds byte b of every sample."""
    arr = np.frombuffer(planes, np.uint8)
    return arr.reshape(elem, -1).T.copy().tobytes()


@pytest.mark.parametrize("noise", ["gauss", "poisson"])
def test_ratio_and_speed(lib, noise):
    tile = tissue(noise)
    raw = tile.tobytes()
    n = len(raw)
    ratios = {}
    for elem in (1, 2):
        enc = encode(lib, raw, elem)
        ratios[elem] = n / len(enc)
        # python-lz4 decodes the block; numpy undoes the planes.
        plain = lz4.block.decompress(enc, uncompressed_size=n)
        assert unshuffle_numpy(plain, elem) == raw
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            encode(lib, raw, elem)
        t1 = time.perf_counter()
        for _ in range(reps):
            rc, back = decode(lib, enc, n, elem)
        t2 = time.perf_counter()
        assert rc == 0 and back == raw
        print(f"\n{noise} uint16 512x512 (std of noise {np.std(tile - ndimage.gaussian_filter(tile.astype(float), 3)):.1f}),"
              f" elem {elem}: ratio {ratios[elem]:.3f}, encode {reps * n / 1e6 / (t1 - t0):.0f} MB/s,"
              f" decode {reps * n / 1e6 / (t2 - t1):.0f} MB/s")
    assert ratios[1] < 1.15, "plain LZ4 should barely compress noisy uint16"
    assert ratios[2] >= 1.4 and ratios[2] > 1.3 * ratios[1]


def test_float32_planes(lib):
    rng = np.random.default_rng(3)
    block = (ndimage.gaussian_filter(rng.normal(size=(8, 64, 64)), 4) +
             0.01 * rng.normal(size=(8, 64, 64))).astype("<f4")
    raw = block.tobytes()
    enc = encode(lib, raw, 4)
    planes = lz4.block.decompress(enc, uncompressed_size=len(raw))
    u32 = block.view("<u4").ravel()
    for b in range(4):
        expect = ((u32 >> (8 * b)) & 0xFF).astype(np.uint8)
        assert planes[b * u32.size:(b + 1) * u32.size] == expect.tobytes()
    assert decode(lib, enc, len(raw), 4) == (0, raw)


def test_decode_rejects_wrong_size(lib):
    raw = tissue("gauss", shape=(64, 64)).tobytes()
    enc = encode(lib, raw, 2)
    assert decode(lib, enc, len(raw) + 2, 2)[0] == 7  # SF_ECORRUPT
    assert decode(lib, enc[:-1], len(raw), 2)[0] == 7


def test_entry_file_matches_spec(lib, xxh64, tmp_path):
    cache_dir = tmp_path / "cache"
    handle = ctypes.c_void_p()
    err = SfErr()
    assert lib.sf_cache_open(str(cache_dir).encode(), 0, ctypes.byref(handle),
                             ctypes.byref(err)) == 0, err.msg
    tile = tissue("poisson", seed=5)
    raw = tile.tobytes()
    key = lib.sf_key_of(b"some tile", 9)
    assert lib.sf_cache_put(handle, key, buf(tile), len(raw), 2, ctypes.byref(err)) == 0
    back = np.empty_like(tile)
    assert lib.sf_cache_get(handle, key, buf(back), len(raw), ctypes.byref(err)) == 0
    lib.sf_cache_close(handle)
    assert np.array_equal(back, tile)

    assert (cache_dir / "SCOPEFS_CACHE").read_text() == "scopefs cache format 1\n"
    hexname = f"{key.hi:016x}{key.lo:016x}"
    entry = cache_dir / hexname[:2] / f"{hexname}.sfc"
    data = entry.read_bytes()
    (magic, version, elem, key_hi, key_lo, raw_size, enc_size, raw_hash,
     head_hash) = struct.unpack("<8sIIQQQQQQ", data[:64])
    assert magic == b"SFCENTRY" and version == 1 and elem == 2
    assert (key_hi, key_lo) == (key.hi, key.lo)
    assert raw_size == len(raw) and enc_size == len(data) - 64
    assert head_hash == xxh64(data[:56])
    assert raw_hash == xxh64(raw)
    planes = lz4.block.decompress(data[64:], uncompressed_size=raw_size)
    assert unshuffle_numpy(planes, 2) == raw
    assert os.listdir(entry.parent) == [entry.name], "no temp file left behind"

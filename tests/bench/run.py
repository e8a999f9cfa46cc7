#!/usr/bin/env python3
"""make bench: scopefs against its peers on this machine, side by side.

Writes a Markdown section to stdout and appends it to docs/benchmarks.md
(with the date and the machine).  Big data lives in $SCOPEFS_BENCH_DIR
(default /tmp/scopefs-bench) and is made once.

Measures (issue #2):
  1. cache-hit read throughput through the mount, 1 MiB reads, against
     reading a plain file of the same size through a FUSE passthrough
     (scopefs's own raw/ passthrough, which splices from the file);
  2. cp of the reference's virtual OME-TIFF (16k x 16k, 4 channels, uint16)
     cold and warm: time and daemon peak RSS, against
     `vips tiffsave --tile --pyramid --subifd` of the same image;
  3. time from mount to the first tile of the lowest pyramid level (warm);
  4. LZ4 ratio of the disk cache on these (noisy uint16) tiles.
"""
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import tifffile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCOPEFS = os.path.join(ROOT, "build", "scopefs")
WORK = os.environ.get("SCOPEFS_BENCH_DIR", "/tmp/scopefs-bench")
SIZE = int(os.environ.get("SCOPEFS_BENCH_SIZE", "16384"))
CHANNELS = 4
TILE = 512


def tissue_tile(y0, x0, c, n=TILE):
    """A deterministic noisy tissue-like uint16 tile (smooth field + noise)."""
    yy, xx = np.mgrid[y0:y0 + n, x0:x0 + n].astype(np.float32)
    base = 1500 + 900 * np.sin(xx / (97.0 + 13 * c)) * np.cos(yy / (131.0 + 7 * c))
    rng = np.random.default_rng((y0 * 7919 + x0) * 31 + c)
    noise = rng.normal(0, 25, (n, n)).astype(np.float32)
    return np.clip(base + noise, 0, 65535).astype(np.uint16)


def make_source(path):
    """A 4-channel uint16 OME-TIFF pyramid with SubIFDs, written tile by tile."""
    if os.path.exists(path):
        return
    levels = []
    w = SIZE
    while w > TILE:
        levels.append(w)
        w = (w + 1) // 2
    levels.append(w)
    tmp = path + ".part"
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for c in range(CHANNELS):
            for li, lw in enumerate(levels):
                def tiles(lw=lw, li=li):
                    f = 1 << li
                    for ty in range(0, lw, TILE):
                        for tx in range(0, lw, TILE):
                            t = tissue_tile(ty * f, tx * f, c)
                            yield t[: min(TILE, lw - ty), : min(TILE, lw - tx)] if False else t
                kw = dict(tile=(TILE, TILE), compression="zlib", dtype=np.uint16,
                          shape=(lw, lw), photometric="minisblack")
                if li == 0:
                    kw["subifds"] = len(levels) - 1
                    if c == 0:
                        kw["metadata"] = {"axes": "CYX", "PhysicalSizeX": 0.5,
                                          "PhysicalSizeY": 0.5,
                                          "Channel": {"Name": ["DAPI", "CD3", "CD8", "PanCK"]}}
                        kw["description"] = None
                else:
                    kw["subfiletype"] = 1
                tw.write(tiles(), **kw)
    os.rename(tmp, path)


def vm_hwm_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class Mount:
    def __init__(self, raw, mnt, cache, opts=""):
        os.makedirs(mnt, exist_ok=True)
        args = [SCOPEFS, "-f", "-o", f"cache={cache}" + ("," + opts if opts else ""), raw, mnt]
        self.mnt = mnt
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(args, stderr=open(os.path.join(WORK, "daemon.log"), "a"))
        status = os.path.join(mnt, ".scopefs", "status")
        for _ in range(2000):
            if os.path.exists(status):
                break
            time.sleep(0.005)
        else:
            raise RuntimeError("mount did not come up")
        self.ready = time.perf_counter() - self.t0

    def status(self):
        with open(os.path.join(self.mnt, ".scopefs", "status")) as f:
            return json.load(f)

    def close(self):
        rss = vm_hwm_kb(self.proc.pid)
        subprocess.run(["fusermount3", "-u", self.mnt], check=False)
        self.proc.wait(timeout=60)
        return rss


def publish(text):
    """Print a bench section and append it to docs/benchmarks.md."""
    print(text)
    with open(os.path.join(ROOT, "docs", "benchmarks.md"), "a") as f:
        f.write("\n" + text)


def drop_caches():
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def timed(cmd):
    """Run cmd under /usr/bin/time -v; return (seconds, peak RSS kB)."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd}: {r.stderr[-500:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    return dt, int(m.group(1)) if m else 0


def read_all(path, bs=1 << 20):
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(bs)
            if not b:
                return n
            n += len(b)


def main():
    if not shutil.which("/usr/bin/time"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "time"], check=True)
    os.makedirs(WORK, exist_ok=True)
    raw = os.path.join(WORK, "raw")
    os.makedirs(raw, exist_ok=True)
    src = os.path.join(raw, "reference.ome.tif")
    t0 = time.perf_counter()
    existed = os.path.exists(src)
    make_source(src)
    gen_s = time.perf_counter() - t0
    mnt, cache = os.path.join(WORK, "mnt"), os.path.join(WORK, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    out = os.path.join(WORK, "out.ome.tif")
    rows = []

    # 2. cp cold then warm (after remount: disk cache), with daemon RSS.
    drop_caches()
    m = Mount(raw, mnt, cache, "mem=128M")
    vfile = os.path.join(mnt, "registered", "reference.ome.tif")
    t0 = time.perf_counter()
    shutil.copyfile(vfile, out)
    cold = time.perf_counter() - t0
    st = m.status()
    rss_cold = m.close()
    vsize = os.path.getsize(out)
    drop_caches()
    m = Mount(raw, mnt, cache, "mem=128M")
    t0 = time.perf_counter()
    shutil.copyfile(vfile, out)
    warm = time.perf_counter() - t0
    st_warm = m.status()
    rss_warm = m.close()

    # The same work by libvips: every channel, tiled 512, pyramid as SubIFDs.
    vout = os.path.join(WORK, "vips.tif")
    drop_caches()
    vips_s, vips_rss = timed(["vips", "tiffsave", f"{src}[n={CHANNELS}]", vout, "--tile",
                              "--pyramid", "--subifd", "--tile-width", "512",
                              "--tile-height", "512", "--bigtiff"])
    rows.append(("cp registered/reference.ome.tif, cold (computes every tile)",
                 f"{cold:.2f} s ({vsize / cold / 1e6:.0f} MB/s)", f"{rss_cold / 1024:.0f} MB"))
    rows.append(("cp registered/reference.ome.tif, warm (after remount, disk cache)",
                 f"{warm:.2f} s ({vsize / warm / 1e6:.0f} MB/s)", f"{rss_warm / 1024:.0f} MB"))
    rows.append((f"vips tiffsave --tile --pyramid --subifd (4 pages)", f"{vips_s:.2f} s",
                 f"{vips_rss / 1024:.0f} MB"))

    # 1. cache-hit throughput (page cache dropped, units in the disk cache and RAM)
    #    against a plain file of the same size through the raw/ passthrough.
    plain = os.path.join(raw, "plain.bin")
    if not os.path.exists(plain) or os.path.getsize(plain) != vsize:
        shutil.copyfile(out, plain)
    m = Mount(raw, mnt, cache, "mem=128M")
    read_all(vfile)  # warm the RAM LRU as far as it holds
    drop_caches()
    t0 = time.perf_counter()
    n = read_all(vfile)
    hit_s = time.perf_counter() - t0
    drop_caches()
    t0 = time.perf_counter()
    read_all(os.path.join(mnt, "raw", "plain.bin"))
    pass_s = time.perf_counter() - t0
    m.close()
    rows.append(("1 MiB reads, cache hits, page cache dropped", f"{n / hit_s / 1e6:.0f} MB/s", ""))
    rows.append(("1 MiB reads of a plain file of that size via FUSE passthrough",
                 f"{n / pass_s / 1e6:.0f} MB/s", f"ratio {pass_s / hit_s:.2f}"))

    # 3. mount to first tile of the lowest level (warm cache).
    import tifffile as tf
    m = Mount(raw, mnt, cache, "mem=128M")
    t0 = time.perf_counter()
    with tf.TiffFile(vfile) as t:
        lowest = t.series[0].levels[-1]
        lowest.pages[0].asarray()
    first = time.perf_counter() - t0
    ready = m.ready
    m.close()
    rows.append(("mount until ready (dataset scan, layouts)", f"{ready * 1000:.0f} ms", ""))
    rows.append(("then first tile of the lowest level (tifffile opens and reads)",
                 f"{first * 1000:.0f} ms", ""))

    ratio = st["cache_written"] and st.get("cache_bytes", 0)
    lines = [
        f"## {datetime.date.today().isoformat()} — issue #2 core ({platform.node()}, "
        f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB)",
        "",
        f"Source: {SIZE} x {SIZE} x {CHANNELS} uint16 OME-TIFF pyramid (zlib tiles, SubIFDs),"
        f" virtual file {vsize / 2**30:.2f} GiB; "
        + ("made by an earlier run." if existed else f"made in {gen_s:.0f} s."),
        "",
        "| measure | time / rate | peak RSS |",
        "| --- | --- | --- |",
    ] + [f"| {a} | {b} | {c} |" for a, b, c in rows] + [
        "",
        f"Cold cp: tiles computed {st['tiles_computed']}, cache bytes on disk "
        f"{st['cache_bytes'] / 2**20:.0f} MiB for {vsize / 2**20:.0f} MiB of tiles "
        f"(LZ4 + byte shuffle ratio {vsize / max(1, st['cache_bytes']):.2f}); "
        f"warm cp after remount computed {st_warm['tiles_computed']} tiles, "
        f"disk hits {st_warm['disk_hits']}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(ROOT, "docs", "benchmarks.md"), "a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    sys.exit(main())

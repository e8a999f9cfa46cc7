"""Synthetic registration pairs with known truth, made independently of scopefs.

Shared by tests/integration/test_register_oracle.py (thumbnail-sized grey
pairs for the compute core), tests/integration/test_mount_register.py and
tests/bench/register.py (slide-sized pyramidal pairs for real mounts).  Only
numpy and scipy are used: no scopefs code, so a comparison with these truths
is a comparison with an independent oracle.

Two generators:

- ``tissue_world``/``random_map``/``make_pair``: grey float32 thumbnails
  (about 320 px) for the core test.  Their random draws are fixed by the
  core test's seeds; do not reorder them.
- ``SlideWorld``/``make_slide_pair``: a tissue section on a "world" grid of
  stain amounts (nuclei, stroma, a marker, a tissue mask).  The reference
  slide is a crop of the world; a moving slide samples the world through

      F(y) = z + D(z),   z = G y            (moving level-0 px -> world px)

  with G affine (any rotation, a mirror, scale, shear, shift) and D a smooth
  analytic displacement (a sum of Gaussian bumps, |grad D| well under 1, so
  the map is invertible).  The truth for a reference point x (level-0 px) is
  the moving point y with F(y) = x + origin: z solves z + D(z) = w by fixed
  point iteration (a contraction), then y = G^-1 z.  Slides are rendered
  from the sampled stain amounts: fluorescence (DAPI = nuclei, a second
  marker channel, uint16) or brightfield RGB (H&E or hematoxylin + DAB,
  uint8), with per-slide intensity changes, noise and, optionally, a piece
  of tissue torn away.

Coordinates: (x, y), pixel centres at integers, as in docs/transforms.md.
"""

import numpy as np
import scipy.ndimage as ndi

# --- thumbnail pairs (the core test) ------------------------------------------


def tissue_world(rng, size):
    """A size x size fluorescence-like image, background ~0.05, with one tissue piece in the
    middle about 0.3 size across (60% of a reference frame of size / 2)."""
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = np.hypot(xx - w / 2, yy - h / 2) / (0.15 * size)
    outline = ndi.gaussian_filter(rng.standard_normal((h, w)), size / 25)
    outline /= outline.std()
    tissue = (1.0 - r + 0.35 * outline) > 0
    tissue = ndi.binary_opening(tissue, iterations=2)
    nuclei = np.zeros((h, w))
    n = int(0.004 * h * w)
    ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
    nuclei[ys, xs] = rng.uniform(0.5, 1.5, n)
    nuclei = ndi.gaussian_filter(nuclei, 1.6) * 2 * np.pi * 1.6 ** 2
    texture = ndi.gaussian_filter(rng.standard_normal((h, w)), 5)
    texture = 0.5 + 0.5 * texture / texture.std()
    img = 0.05 + tissue * (0.25 + 0.1 * np.clip(texture, 0, 2) + 0.6 * nuclei)
    return ndi.gaussian_filter(img, 0.7), tissue


def random_map(rng, kind, size):
    """A backward map (ref px -> mov px) about the image centre, as 3x3 (x, y)."""
    theta = rng.uniform(0, 2 * np.pi)
    s = np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
    lin = s * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    if kind == "affine":
        shear = rng.uniform(-0.12, 0.12)
        aniso = np.exp(rng.uniform(-0.1, 0.1))
        lin = lin @ np.array([[aniso, shear], [0, 1 / aniso]])
    mirrored = rng.random() < 0.5
    if mirrored:
        lin = lin @ np.diag([-1.0, 1.0])
    c = (size - 1) / 2
    shift = rng.uniform(-0.3, 0.3, 2) * size
    m = np.eye(3)
    m[:2, :2] = lin
    m[:2, 2] = c + shift - lin @ [c, c]
    return m, mirrored


def make_pair(rng, kind, size=320):
    """(ref, mov, truth map, landmarks) with noise, gain and maybe a torn piece."""
    big = 2 * size
    world, tissue = tissue_world(rng, big)
    o = (big - size) / 2  # the reference is the middle of the world
    rh = int(0.85 * size)  # frames of different, non-square sizes
    ref = world[int(o):int(o) + rh, int(o):int(o) + size]
    m, _ = random_map(rng, kind, size)
    minv = np.linalg.inv(m)
    mh, mw = (rng.uniform(0.85, 1.15, 2) * size).astype(int)
    yy, xx = np.mgrid[0:mh, 0:mw].astype(np.float64)
    sx = minv[0, 0] * xx + minv[0, 1] * yy + minv[0, 2] + o
    sy = minv[1, 0] * xx + minv[1, 1] * yy + minv[1, 2] + o
    mov = ndi.map_coordinates(world, [sy, sx], order=3, mode="constant", cval=0.05)
    if rng.random() < 0.33:  # a piece of tissue torn away in the moving slide
        cy, cx = rng.uniform(0.35, 0.65, 2) * size
        torn = np.hypot(xx - cx, yy - cy) < 0.12 * size
        mov = np.where(torn, 0.05, mov)
    mov = mov * rng.uniform(0.6, 1.4) + rng.uniform(-0.03, 0.03)
    ref = ref + rng.normal(0, 0.03, ref.shape)
    mov = mov + rng.normal(0, 0.03, mov.shape)
    ref_tissue = tissue[int(o):int(o) + rh, int(o):int(o) + size]
    ty, tx = np.nonzero(ndi.binary_erosion(ref_tissue, iterations=3))
    pick = rng.choice(len(tx), 60, replace=False)
    marks = np.stack([tx[pick], ty[pick]], 1).astype(np.float64)
    return ref.astype(np.float32), mov.astype(np.float32), m, marks


# --- slide pairs (mount test, benchmark) --------------------------------------


def smooth_noise(rng, h, w, cell):
    """Unit-variance noise smooth over about `cell` px: a coarse Gaussian-filtered
    grid upsampled by cubic splines (cheap at any size)."""
    gh, gw = h // cell + 6, w // cell + 6
    coarse = ndi.gaussian_filter(rng.standard_normal((gh, gw)), 1.0).astype(np.float32)
    if cell >= 8:  # cubic to a grid 4x coarser than the output, then linear (fast, smooth)
        mid = ndi.zoom(coarse, cell / 4.0, order=3)
        zy, zx = (h + 2 * cell) / mid.shape[0], (w + 2 * cell) / mid.shape[1]
        fine = ndi.zoom(mid, (zy * 1.0001, zx * 1.0001), order=1)
    else:
        zy, zx = (h + 2 * cell) / gh, (w + 2 * cell) / gw
        fine = ndi.zoom(coarse, (zy * 1.0001, zx * 1.0001), order=3)
    fine = fine[cell:cell + h, cell:cell + w]
    fine -= fine.mean()
    fine /= fine.std() + 1e-12
    return fine


class SlideWorld:
    """Stain amounts of one tissue section on an h x w world grid (float32).

    mask   tissue (1) or glass (0), softened over a few px
    nuc    nuclei (Gaussian spots, peak about 1), denser in some regions
    stroma smooth multi-scale texture in [0, 1]
    marker a second, patchy stain (CD marker / DAB-like), in [0, 1]
    The tissue is an irregular blob filling about `fill` of the world's middle,
    with a few holes (vessels / lumens), so its outline and interior carry
    structure at every scale."""

    def __init__(self, rng, h, w, fill=0.42, nucleus_px=2.5, nucleus_spacing=16.0):
        self.h, self.w = h, w
        yy, xx = np.ogrid[0:h, 0:w]
        ry, rx = fill * h / 2, fill * w / 2
        r = np.hypot((xx - w / 2) / rx, (yy - h / 2) / ry)
        outline = smooth_noise(rng, h, w, max(8, min(h, w) // 10))
        body = (1.0 - r + 0.3 * outline) > 0
        holes = smooth_noise(rng, h, w, max(8, min(h, w) // 40)) > 2.0
        body &= ~holes
        self.mask = ndi.gaussian_filter(body.astype(np.float32), 1.5)
        lobes = smooth_noise(rng, h, w, max(8, min(h, w) // 16))
        density = np.clip(0.6 + 0.5 * lobes, 0.05, 1.5)
        n = int(h * w / nucleus_spacing ** 2)
        ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
        keep = rng.random(n) < density[ys, xs] / 1.5
        spots = np.zeros((h, w), np.float32)
        spots[ys[keep], xs[keep]] = rng.uniform(0.5, 1.0, int(keep.sum()))
        spots = ndi.gaussian_filter(spots, nucleus_px, truncate=3.0)
        self.nuc = np.clip(spots * (2 * np.pi * nucleus_px ** 2), 0, 1.5) * self.mask
        fine = smooth_noise(rng, h, w, 6)
        mid = smooth_noise(rng, h, w, 30)
        self.stroma = np.clip(0.55 + 0.15 * fine + 0.2 * mid, 0, 1) * self.mask
        patches = smooth_noise(rng, h, w, max(8, min(h, w) // 25))
        self.marker = np.clip(patches - 0.3, 0, 1.5) * (0.5 + 0.5 * np.clip(fine, -1, 1)) \
            * self.mask
        self.body = body

    def sample(self, wx, wy):
        """The stain amounts at world points (arrays of x, y): bilinear, glass outside."""
        out = {}
        for k in ("mask", "nuc", "stroma", "marker"):
            out[k] = ndi.map_coordinates(getattr(self, k), [wy, wx], order=1, mode="constant",
                                         cval=0.0).astype(np.float32)
        return out

    def crop(self, x0, y0, w, h):
        return {k: getattr(self, k)[y0:y0 + h, x0:x0 + w].copy()
                for k in ("mask", "nuc", "stroma", "marker")}


class Deformation:
    """D(z) = sum_k a_k exp(-|z - c_k|^2 / (2 s_k^2)) in world px: smooth and
    analytic.  Amplitudes are scaled so that max |D| is about `amp` px and
    |grad D| stays under 0.25 (the map z + D(z) is then invertible)."""

    def __init__(self, rng, h, w, amp, bumps=6):
        self.c = np.c_[rng.uniform(0.2, 0.8, bumps) * w, rng.uniform(0.2, 0.8, bumps) * h]
        self.s = rng.uniform(0.12, 0.3, bumps) * min(h, w)
        ang = rng.uniform(0, 2 * np.pi, bumps)
        self.a = np.c_[np.cos(ang), np.sin(ang)] * rng.uniform(0.5, 1.0, (bumps, 1)) * amp
        # |grad| of one bump is at most |a| / (s sqrt(e)); keep the sum small
        grad = np.sum(np.hypot(*self.a.T) / (self.s * np.sqrt(np.e)))
        if grad > 0.25:
            self.a *= 0.25 / grad

    def __call__(self, zx, zy):
        dx = np.zeros_like(zx, dtype=np.float64)
        dy = np.zeros_like(zy, dtype=np.float64)
        for (cx, cy), s, (ax, ay) in zip(self.c, self.s, self.a):
            g = np.exp(-((zx - cx) ** 2 + (zy - cy) ** 2) / (2 * s * s))
            dx += ax * g
            dy += ay * g
        return dx, dy


def apply3(m, x, y):
    return m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]


class SlidePair:
    """A reference crop and one moving frame of a SlideWorld, with the truth.

    origin   world position of reference pixel (0, 0)
    G        3x3, moving level-0 px -> world px before the deformation
    sim      3x3, the similarity part of the truth (reference level-0 px ->
             moving level-0 px, no shear, no deformation): what an
             initialisation may be given
    deform   Deformation (None: none)
    ref_size, mov_size  (w, h) of level 0"""

    def __init__(self, world, origin, ref_size, mov_size, G, sim, deform):
        self.world, self.origin = world, np.asarray(origin, float)
        self.ref_size, self.mov_size = ref_size, mov_size
        self.G, self.sim, self.deform = G, sim, deform

    def moving_to_world(self, x, y):
        zx, zy = apply3(self.G, x, y)
        if self.deform is None:
            return zx, zy
        dx, dy = self.deform(zx, zy)
        return zx + dx, zy + dy

    def truth(self, pts):
        """Reference level-0 points (n, 2) -> their true moving level-0 points (n, 2)."""
        wx, wy = pts[:, 0] + self.origin[0], pts[:, 1] + self.origin[1]
        zx, zy = wx.copy(), wy.copy()
        if self.deform is not None:
            for _ in range(100):  # a contraction: |grad D| < 0.25
                dx, dy = self.deform(zx, zy)
                nx, ny = wx - dx, wy - dy
                done = np.max(np.hypot(nx - zx, ny - zy)) < 1e-9
                zx, zy = nx, ny
                if done:
                    break
        gi = np.linalg.inv(self.G)
        return np.stack(apply3(gi, zx, zy), 1)

    def moving_stains(self, rows=256):
        """The world's stain amounts seen through the moving frame (level 0), row blocks
        at a time to bound memory."""
        w, h = self.mov_size
        out = {k: np.empty((h, w), np.float32) for k in ("mask", "nuc", "stroma", "marker")}
        xs = np.arange(w, dtype=np.float64)
        for y0 in range(0, h, rows):
            yy, xx = np.meshgrid(np.arange(y0, min(h, y0 + rows), dtype=np.float64), xs,
                                 indexing="ij")
            wx, wy = self.moving_to_world(xx, yy)
            s = self.world.sample(wx, wy)
            for k in out:
                out[k][y0:y0 + yy.shape[0]] = s[k]
        return out

    def reference_stains(self):
        return self.world.crop(int(self.origin[0]), int(self.origin[1]), *self.ref_size)

    def landmarks(self, rng, n, margin=24, avoid=None):
        """n random reference points on tissue (eroded mask), whose true moving points
        lie inside the moving frame (margin px) and on tissue there, away from
        `avoid` (a function (x, y) -> bool array on moving points, e.g. a torn piece)."""
        rs = self.reference_stains()
        body = ndi.binary_erosion(rs["mask"] > 0.5, iterations=margin // 2)
        ty, tx = np.nonzero(body)
        pick = rng.choice(len(tx), min(len(tx), max(20 * n, 2000)), replace=False)
        pts = np.stack([tx[pick], ty[pick]], 1).astype(np.float64)
        pts += rng.uniform(-0.5, 0.5, pts.shape)  # sub-pixel landmarks
        mv = self.truth(pts)
        w, h = self.mov_size
        ok = (mv[:, 0] > margin) & (mv[:, 0] < w - 1 - margin) & (mv[:, 1] > margin) & (
            mv[:, 1] < h - 1 - margin)
        if avoid is not None:
            ok &= ~avoid(mv[:, 0], mv[:, 1])
        pts = pts[ok][:n]
        if len(pts) < n:
            raise ValueError("only %d landmarks on shared tissue" % len(pts))
        return pts


def about(lin, centre_from, centre_to):
    """3x3: x -> lin (x - centre_from) + centre_to."""
    m = np.eye(3)
    m[:2, :2] = lin
    m[:2, 2] = np.asarray(centre_to, float) - lin @ np.asarray(centre_from, float)
    return m


def rotation(theta, scale=1.0, mirror=False):
    lin = scale * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    if mirror:
        lin = lin @ np.diag([-1.0, 1.0])
    return lin


def make_slide_pair(rng, world, ref_size, origin, mov_size, theta, scale, mirror, shift,
                    shear=0.0, aniso=1.0, deform_amp=0.0):
    """A SlidePair whose backward map (reference -> moving, level-0 px) is about the
    frame centres: sim = rotation(theta, scale, mirror) plus `shift` px, then the
    affine part (shear, anisotropy) before it and the deformation in the world."""
    rc = (np.asarray(ref_size, float) - 1) / 2
    mc = (np.asarray(mov_size, float) - 1) / 2
    sim_lin = rotation(theta, scale, mirror)
    lin = sim_lin @ np.array([[aniso, shear], [0.0, 1.0 / aniso]])
    sim = about(sim_lin, rc, mc + np.asarray(shift, float))
    full = about(lin, rc, mc + np.asarray(shift, float))  # ref px -> mov px, affine part
    to_world = np.eye(3)
    to_world[:2, 2] = origin
    G = to_world @ np.linalg.inv(full)  # mov px -> ref px -> world px
    deform = None
    if deform_amp > 0:
        deform = Deformation(rng, world.h, world.w, deform_amp)
    return SlidePair(world, origin, tuple(ref_size), tuple(mov_size), G, sim, deform)


# --- rendering ------------------------------------------------------------------


def render_fluorescence(st, rng, gain=1.0, gamma=1.0, noise=0.01, bg=0.03, channels=2):
    """(channels, h, w) uint16: DAPI (nuclei + faint cytoplasm), a marker channel and
    (channels 3) a stroma channel, with a gain/gamma change, background and Gaussian
    noise."""
    dapi = bg + st["mask"] * 0.06 + 0.8 * st["nuc"] + 0.05 * st["stroma"]
    mark = bg + 0.5 * st["marker"] + 0.15 * st["stroma"]
    planes = [dapi, mark]
    if channels == 3:
        planes.append(bg + 0.4 * st["stroma"] * np.clip(1 - st["marker"], 0, 1))
    out = []
    for v in planes:
        v = gain * np.power(np.clip(v, 0, None), gamma)
        v = v + rng.normal(0, noise, v.shape).astype(np.float32)
        out.append(np.clip(v * 40000, 0, 65535).astype(np.uint16))
    return np.stack(out)


# Optical densities per unit stain (R, G, B), as in Ruifrok & Johnston's H&E / DAB.
HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
EOSIN = np.array([0.07, 0.99, 0.11])
DAB = np.array([0.27, 0.57, 0.78])


def render_brightfield(st, rng, stain="he", strength=1.0, noise=3.0):
    """(h, w, 3) uint8 brightfield: H&E (hematoxylin on nuclei, eosin on stroma) or an
    IHC look (hematoxylin counterstain, DAB on the marker), by Beer-Lambert."""
    hema = strength * (0.9 * st["nuc"] + 0.08 * st["stroma"])
    if stain == "he":
        other, vec = strength * 0.55 * st["stroma"], EOSIN
    else:
        hema = 0.6 * hema
        other, vec = strength * (0.9 * st["marker"] + 0.05 * st["stroma"]), DAB
    od = hema[..., None] * HEMATOXYLIN + other[..., None] * vec + 0.02
    img = 250.0 * np.power(10.0, -od) + rng.normal(0, noise, od.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def tear(st, rng, frac=0.12):
    """Remove a disc of tissue (radius frac of the smaller side) from stain amounts
    (in place); returns avoid(x, y) for landmarks."""
    h, w = st["mask"].shape
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
    rad = frac * min(h, w)
    yy, xx = np.ogrid[0:h, 0:w]
    gone = np.hypot(xx - cx, yy - cy) < rad
    for k in st:
        st[k][gone] = 0
    return lambda x, y: np.hypot(x - cx, y - cy) < rad + 8


# --- measures ---------------------------------------------------------------------


def apply_transform_json(doc, pts, field=None):
    """Our transform JSON (docs/transforms.md), evaluated in numpy: reference level-0
    points (n, 2) -> moving level-0 points.  field: the (gh, gw, 2) float array of
    doc["field"]["file"] (read by the caller), bilinear with nodes at integer u and
    clamped at the edge nodes; units "field" (values times the scale) or "pixels"."""
    m = np.asarray(doc["matrix"], float)
    if m.shape == (2, 3):
        m = np.vstack([m, [0, 0, 1]])
    x, y = pts[:, 0].astype(float), pts[:, 1].astype(float)
    if "field" in doc and doc["field"] is not None:
        fd = doc["field"]
        sc = fd.get("scale", 1.0)
        sx, sy = (sc, sc) if np.isscalar(sc) else sc
        ox, oy = fd.get("offset", [0.0, 0.0])
        u, v = (x - ox) / sx, (y - oy) / sy
        gh, gw = field.shape[:2]
        u, v = np.clip(u, 0, gw - 1), np.clip(v, 0, gh - 1)
        dx = ndi.map_coordinates(field[..., 0].astype(float), [v, u], order=1, mode="nearest")
        dy = ndi.map_coordinates(field[..., 1].astype(float), [v, u], order=1, mode="nearest")
        if fd.get("units", "field") == "field":
            dx, dy = dx * sx, dy * sy
        x, y = x + dx, y + dy
    px = m[0, 0] * x + m[0, 1] * y + m[0, 2]
    py = m[1, 0] * x + m[1, 1] * y + m[1, 2]
    pw = m[2, 0] * x + m[2, 1] * y + m[2, 2]
    return np.stack([px / pw, py / pw], 1)


def tre_stats(found, truth, diag):
    """Per pair: (median TRE, 90th pct TRE, median rTRE, 90th pct rTRE), TRE in px."""
    t = np.hypot(*(np.asarray(found) - np.asarray(truth)).T)
    return (float(np.median(t)), float(np.percentile(t, 90)), float(np.median(t) / diag),
            float(np.percentile(t, 90) / diag))

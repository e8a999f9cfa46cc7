#!/usr/bin/env python3
"""Export a VALIS registration as scopefs transform files.

    valis2scopefs.py REGISTRAR.pickle OUTDIR [--level0-size NAME=WxH ...]
                     [--reference NAME] [--rigid-only]

VALIS (MathOnco/valis) keeps its transforms only inside the registrar pickle
that Valis.register() writes (<name>_registrar.pickle).  This script reads
that pickle and writes, for every moving slide, OUTDIR/<stem>.json in the
scopefs transform format (docs/transforms.md) and, when the slide has a
non-rigid displacement, OUTDIR/<stem>.field.tif (2-sample float32).  Mount
with `transforms=OUTDIR,reference=<reference stem>` and registered/ serves
every slide warped on read, as VALIS's warp_and_save_slides(crop="reference")
would write it, without warping to disk.

No VALIS needed: the pickle is read by an Unpickler that turns every class of
the valis package (and of any other package that is not installed, e.g.
pyvips or pandas) into a plain attribute holder; only numpy must be present.

What is read (attribute names of valis/registration.py, VALIS 1.x):
  Valis.slide_dict            {name: Slide}
  Valis.reference_img_f       the reference slide's file (get_ref_slide)
  Valis.name_dict             {file: name}
  Valis.aligned_slide_shape_rc, Valis._full_displacement_shape_rc,
  Valis._non_rigid_bbox       (stored displacement fields only)
  Slide.M                     3x3 backward map: registered frame -> processed image
  Slide.processed_img_shape_rc, Slide.reg_img_shape_rc
  Slide.slide_dimensions_wh   (width, height) of every pyramid level
  Slide._bk_dxdy_np (or bk_dxdy in old versions), or Slide.stored_dxdy with
  Slide._bk_dxdy_f            backward displacement (2, H, W) in the
                              registered frame, values in field pixels

The level-0 map, as VALIS's warp_tools.warp_img applies it to level 0 (M scaled
per axis, corner-aligned; the field upsampled by scale s and its values
multiplied by s; the crop to the reference shifts the frame):
    X_al = X + o,           o = -M_ref[:2, 2] * ref_dims0 / ref_processed  (x, y)
    Y    = X_al + s * D(X_al / s),   s = aligned0 / field shape  (x, y)
    src  = S(src) M S(dst)^-1 Y,     src = mov_dims0 / processed,
                                     dst = aligned0 / reg_img_shape
so the JSON gets matrix = S(src) M S(dst)^-1 T(o), field scale s, offset -o,
units "field".  Differences from VALIS's own warp (docs/transforms.md): VALIS
upsamples the field with its image interpolator (bicubic by default) and
extends it with zeros past the last node; scopefs interpolates it bilinearly
and clamps at the edge nodes.
"""

import argparse
import io
import json
import os
import pickle
import struct
import sys

import numpy as np

# scopefs' slide stem: the file name without its image extension (the list of
# src/io/dataset.c, longest first), so OUTDIR/<stem>.json is found on mount.
IMAGE_EXTS = ('.ome.tiff', '.ome.tif', '.ome.btf', '.ome.tf2', '.ome.tf8', '.qptiff',
              '.tiff', '.tif', '.svs', '.btf', '.tf2', '.tf8')


def scopefs_stem(path):
    base = os.path.basename(path)
    low = base.lower()
    for ext in IMAGE_EXTS:
        if len(low) > len(ext) and low.endswith(ext):
            return base[:-len(ext)]
    return base


# --- reading the pickle without VALIS -------------------------------------------


class Holder:
    """Stands in for any class the pickle names that is not importable here:
    keeps constructor arguments and state as plain attributes."""

    def __init__(self, *args, **kwargs):
        self._args = args
        self._kwargs = kwargs

    def __setstate__(self, state):
        slots = None
        if isinstance(state, tuple) and len(state) == 2 and \
                (state[0] is None or isinstance(state[0], dict)):
            state, slots = state
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif state is not None:
            self._state = state
        if isinstance(slots, dict):
            self.__dict__.update(slots)

    def __setitem__(self, key, value):  # dict subclasses are filled item by item
        self.__dict__.setdefault('_items', {})[key] = value

    def append(self, value):  # and list subclasses by append/extend
        self.__dict__.setdefault('_list', []).append(value)

    def extend(self, values):
        self.__dict__.setdefault('_list', []).extend(values)


class HolderUnpickler(pickle.Unpickler):
    """Maps valis.* (always) and any class whose module cannot be imported
    to a Holder subclass of the same name; numpy and the standard library
    load for real."""

    def find_class(self, module, name):
        if module == 'valis' or module.startswith('valis.'):
            return self._holder(module, name)
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return self._holder(module, name)

    @staticmethod
    def _holder(module, name):
        return type(name, (Holder, ), {'__module__': 'valis2scopefs.stub.' + module})


def load_registrar(path):
    with open(path, 'rb') as f:
        return HolderUnpickler(f).load()


# --- the transform --------------------------------------------------------------


class ExportError(Exception):
    pass


def attr(obj, name, what):
    value = getattr(obj, name, None)
    if value is None:
        raise ExportError('%s has no %s' % (what, name))
    return value


def level0_wh(slide, sizes, what):
    """(width, height) of the slide's level 0: --level0-size, else the pickle's."""
    name = getattr(slide, 'name', None)
    if name in sizes:
        return np.array(sizes[name], float)
    dims = np.asarray(attr(slide, 'slide_dimensions_wh', what), float)
    return dims.reshape(-1, 2)[0]


def reference_name(reg, slides, wanted):
    if wanted:
        if wanted not in slides:
            raise ExportError('--reference %s: no such slide (have %s)'
                              % (wanted, ', '.join(sorted(slides))))
        return wanted
    ref_f = getattr(reg, 'reference_img_f', None)
    if ref_f is not None:
        names = getattr(reg, 'name_dict', None) or {}
        for key in (names.get(ref_f), scopefs_stem(ref_f), os.path.basename(ref_f)):
            if key in slides:
                return key
        for name, s in slides.items():
            if getattr(s, 'src_f', None) == ref_f:
                return name
    raise ExportError('cannot tell the reference slide (no usable reference_img_f); '
                      'give --reference NAME')


def backward_field(reg, slide, what):
    """The slide's bk_dxdy as a (2, H, W) float32 array, or None."""
    if getattr(slide, 'stored_dxdy', False):
        return stored_field(reg, slide, what)
    for name in ('_bk_dxdy_np', 'bk_dxdy'):
        d = getattr(slide, name, None)
        if isinstance(d, (np.ndarray, list, tuple)):
            d = np.asarray(d, np.float32)
            if d.ndim != 3 or d.shape[0] != 2:
                raise ExportError('%s: %s has shape %s, expected (2, H, W)'
                                  % (what, name, d.shape))
            return d
    return None


def stored_field(reg, slide, what):
    """A field VALIS saved as a cropped 2-band TIFF, padded back into the full
    displacement shape with zeros (Valis.pad_displacement)."""
    path = attr(slide, '_bk_dxdy_f', what)
    full = np.asarray(attr(reg, '_full_displacement_shape_rc', 'the registrar'), int)
    bbox = getattr(reg, '_non_rigid_bbox', None)
    try:
        import tifffile
        img = tifffile.imread(path)
    except ImportError:
        raise ExportError('%s: reading %s needs the tifffile package' % (what, path))
    img = np.asarray(img, np.float32)
    if img.ndim != 3 or 2 not in (img.shape[0], img.shape[-1]):
        raise ExportError('%s: %s is not a 2-band field' % (what, path))
    if img.shape[-1] == 2:
        img = np.moveaxis(img, -1, 0)
    out = np.zeros((2, full[0], full[1]), np.float32)
    x0, y0 = (int(round(v)) for v in (bbox[:2] if bbox is not None else (0, 0)))
    h, w = img.shape[1:]
    out[:, y0:y0 + h, x0:x0 + w] = img[:, :full[0] - y0, :full[1] - x0]
    return out


def scale_matrix(sx, sy):
    return np.array([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], float)


def slide_transform(reg, ref, slide, sizes, rigid_only):
    """(matrix 3x3, field (2, H, W) or None, scale (sx, sy), offset (x, y)) of
    slide in scopefs' convention: reference level-0 px -> slide level-0 px."""
    what = 'slide %s' % getattr(slide, 'name', '?')
    M = np.asarray(attr(slide, 'M', what), float)
    if M.shape != (3, 3):
        raise ExportError('%s: M has shape %s, expected (3, 3)' % (what, M.shape))
    proc_rc = np.asarray(attr(slide, 'processed_img_shape_rc', what), float)
    reg_rc = np.asarray(attr(slide, 'reg_img_shape_rc', what), float)
    ref_proc_rc = np.asarray(attr(ref, 'processed_img_shape_rc', 'the reference'), float)
    ref_reg_rc = np.asarray(attr(ref, 'reg_img_shape_rc', 'the reference'), float)
    ref_M = np.asarray(attr(ref, 'M', 'the reference'), float)
    ref_wh = level0_wh(ref, sizes, 'the reference')
    mov_wh = level0_wh(slide, sizes, what)

    # VALIS's aligned (registered, uncropped) level-0 shape
    aligned_rc = getattr(reg, 'aligned_slide_shape_rc', None)
    if aligned_rc is None or getattr(ref, 'name', None) in sizes:
        aligned_rc = np.ceil(ref_reg_rc * ref_wh[::-1] / ref_proc_rc)
    aligned_wh = np.asarray(aligned_rc, float)[::-1]

    src = mov_wh / proc_rc[::-1]
    dst = aligned_wh / reg_rc[::-1]
    offset = -ref_M[:2, 2] * (ref_wh / ref_proc_rc[::-1])
    shift = np.array([[1, 0, offset[0]], [0, 1, offset[1]], [0, 0, 1]], float)
    matrix = scale_matrix(*src) @ M @ np.linalg.inv(scale_matrix(*dst)) @ shift

    field = None if rigid_only else backward_field(reg, slide, what)
    scale = None
    if field is not None:
        scale = aligned_wh / np.array([field.shape[2], field.shape[1]], float)
    return matrix, field, scale, offset


# --- writing --------------------------------------------------------------------


def write_field_tiff(path, field):
    """A 2-sample float32 TIFF, one strip, little-endian, uncompressed: the
    dx plane and the dy plane interleaved (contig).  Written by hand so the
    export needs numpy only."""
    _, h, w = field.shape
    data = np.ascontiguousarray(np.stack([field[0], field[1]], axis=-1), '<f4').tobytes()
    entries = [  # tag, type (3 SHORT, 4 LONG), count, value or payload
        (256, 4, 1, w), (257, 4, 1, h), (258, 3, 2, [32, 32]), (259, 3, 1, 1),
        (262, 3, 1, 1), (273, 4, 1, None), (277, 3, 1, 2), (278, 4, 1, h),
        (279, 4, 1, len(data)), (284, 3, 1, 1), (338, 3, 1, 0), (339, 3, 2, [3, 3]),
    ]
    ifd_at = 8
    ifd_len = 2 + 12 * len(entries) + 4
    data_at = ifd_at + ifd_len
    out = io.BytesIO()
    out.write(b'II*\0' + struct.pack('<I', ifd_at))
    out.write(struct.pack('<H', len(entries)))
    for tag, typ, count, value in entries:
        if value is None:
            value = data_at
        if isinstance(value, list):  # two SHORTs fit in the 4-byte field
            field_bytes = struct.pack('<HH', *value)
        elif typ == 3:
            field_bytes = struct.pack('<HH', value, 0)
        else:
            field_bytes = struct.pack('<I', value)
        out.write(struct.pack('<HHI', tag, typ, count) + field_bytes)
    out.write(struct.pack('<I', 0))
    out.write(data)
    with open(path, 'wb') as f:
        f.write(out.getvalue())


def write_transform(outdir, stem, matrix, field, scale, offset, source):
    doc = {
        'scopefs_transform': 1,
        'matrix': [[float(v) for v in row] for row in matrix],
        'source': source,
    }
    if field is not None:
        name = stem + '.field.tif'
        write_field_tiff(os.path.join(outdir, name), field)
        doc['field'] = {'file': name, 'scale': [float(scale[0]), float(scale[1])],
                        'offset': [float(-offset[0]), float(-offset[1])], 'units': 'field'}
    with open(os.path.join(outdir, stem + '.json'), 'w') as f:
        json.dump(doc, f, indent=2)
        f.write('\n')


def parse_sizes(items):
    sizes = {}
    for item in items or []:
        name, sep, wh = item.rpartition('=')
        try:
            w, h = (int(v) for v in wh.lower().split('x'))
        except ValueError:
            w = h = 0
        if not sep or not name or w <= 0 or h <= 0:
            raise ExportError('--level0-size %s: expected NAME=WIDTHxHEIGHT' % item)
        sizes[name] = (w, h)
    return sizes


def main(argv=None):
    ap = argparse.ArgumentParser(
        description='Write scopefs transform files (OUTDIR/<stem>.json) from a VALIS '
        'registrar pickle.')
    ap.add_argument('registrar', help='the <name>_registrar.pickle VALIS wrote')
    ap.add_argument('outdir', help='folder for the transform files (transforms=OUTDIR)')
    ap.add_argument('--level0-size', action='append', metavar='NAME=WxH',
                    help='level-0 size of a slide as scopefs will read it, when it differs '
                    'from the pickle\'s slide_dimensions_wh (e.g. a converted copy)')
    ap.add_argument('--reference', metavar='NAME', help='the reference slide\'s VALIS name '
                    '(default: from reference_img_f)')
    ap.add_argument('--rigid-only', action='store_true', help='leave out the non-rigid field')
    args = ap.parse_args(argv)
    try:
        sizes = parse_sizes(args.level0_size)
        reg = load_registrar(args.registrar)
        slides = getattr(reg, 'slide_dict', None)
        if not isinstance(slides, dict) or not slides:
            raise ExportError('%s: no slide_dict (not a VALIS registrar pickle?)'
                              % args.registrar)
        ref_name = reference_name(reg, slides, args.reference)
        ref = slides[ref_name]
        os.makedirs(args.outdir, exist_ok=True)
        for name, slide in sorted(slides.items()):
            if name == ref_name:
                continue
            stem = scopefs_stem(getattr(slide, 'src_f', None) or name)
            matrix, field, scale, offset = slide_transform(reg, ref, slide, sizes,
                                                           args.rigid_only)
            write_transform(args.outdir, stem, matrix, field, scale, offset,
                            'VALIS %s (reference %s) via valis2scopefs.py' % (name, ref_name))
            print('%s: %s.json%s' % (name, stem, ' + field' if field is not None else ''))
        ref_stem = scopefs_stem(getattr(ref, 'src_f', None) or ref_name)
        print('mount with -o transforms=%s,reference=%s' % (os.path.abspath(args.outdir),
                                                            ref_stem))
    except (ExportError, OSError, pickle.UnpicklingError) as exc:
        print('valis2scopefs: %s' % exc, file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())

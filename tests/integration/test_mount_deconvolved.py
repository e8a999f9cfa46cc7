"""deconvolved/: one virtual plane per raw z-plane, as ImageJ-readable
classic strip TIFFs with the raw plane's size and type and ImageJ's voxel
calibration (dxy, dz), checked by tifffile, tiffinfo, libvips and ImageJ 1.x
itself (skipped when ImageJ is not installed).  The
planes are deconvolved (they need the optics: OPTICS below); their pixel
values are checked against oracles in test_mount_deconv.py."""

import os
import shutil
import subprocess

import numpy as np
import pytest
import tifffile

import gen

IJ_JAR = '/usr/share/java/ij.jar'
OPTICS = {'dxy': '0.4', 'dz': '1.2', 'lambda_ex': '561', 'lambda_em': '600'}

# ImageJ's macro open() needs a display even with -batch (it builds menus),
# so ImageJ is driven through its own API, IJ.openImage -> Opener ->
# TiffDecoder, the path File > Open takes for a TIFF.
IJ_CHECK = r'''
public class IjCheck {
	public static void main(String[] args) {
		ij.ImagePlus imp = ij.IJ.openImage(args[0]);
		if (imp == null) {
			System.out.println("cannot open");
			System.exit(3);
		}
		ij.process.ImageProcessor ip = imp.getProcessor();
		long sum = 0;
		for (int y = 0; y < imp.getHeight(); y++)
			for (int x = 0; x < imp.getWidth(); x++)
				sum += ip.getPixel(x, y);
		StringBuilder sb = new StringBuilder();
		sb.append(imp.getWidth()).append(' ').append(imp.getHeight()).append(' ')
		  .append(imp.getBitDepth()).append(' ').append(imp.getStackSize()).append(' ').append(sum);
		for (int i = 1; i + 1 < args.length; i += 2)
			sb.append(' ').append(ip.getPixel(Integer.parseInt(args[i]), Integer.parseInt(args[i + 1])));
		System.out.println(sb);
	}
}
'''


def check_plane_file(path, raw):
    """A one-page strip TIFF of raw's shape and type; returns its pixels."""
    with tifffile.TiffFile(path) as tf:
        assert not tf.is_bigtiff
        assert len(tf.pages) == 1
        page = tf.pages[0]
        assert not page.is_tiled
        assert page.compression == 1
        assert page.planarconfig == 1 and page.samplesperpixel == 1
        got = page.asarray()
    assert got.dtype == raw.dtype and got.shape == raw.shape
    assert not np.array_equal(got, raw)  # deconvolved, not the raw plane
    r = subprocess.run(['tiffinfo', '-D', str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and 'rror' not in r.stderr, r.stderr
    return got


def imagej_read(path, points, tmp_path):
    java = shutil.which('java')
    if not java or not os.path.exists(IJ_JAR):
        pytest.skip('ImageJ (Debian package imagej) is not installed')
    src = tmp_path / 'IjCheck.java'
    src.write_text(IJ_CHECK)
    args = [str(path)] + [str(v) for p in points for v in p]
    r = subprocess.run([java, '-Djava.awt.headless=true', '-cp', IJ_JAR, str(src)] + args,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return [int(v) for v in r.stdout.split()]


def test_stack_folder_planes(scopefs, tmp_path):
    planes = gen.write_planes(scopefs.raw / 'beads', 5, 260, 301, seed=3)
    m = scopefs.mount(opts=OPTICS)
    folder = m.path('deconvolved', 'beads')
    assert sorted(os.listdir(m.path('deconvolved'))) == ['beads']
    assert sorted(os.listdir(folder)) == [name for name, _ in planes]
    served = {}
    for name, raw in planes:
        size = os.stat(folder / name).st_size
        with open(folder / name, 'rb') as f:
            assert len(f.read()) == size
        served[name] = check_plane_file(folder / name, raw)
    st = m.status()
    assert st['errors'] == 0 and st['problems'] == []
    # ImageJ 1.x opens a plane and sees the pixels tifffile sees.
    name = planes[2][0]
    want = served[name]
    points = [(0, 0), (7, 3), (300, 259), (150, 100)]
    got = imagej_read(folder / name, points, tmp_path)
    assert got[:5] == [301, 260, 16, 1, int(want.astype(np.int64).sum())]
    assert got[5:] == [int(want[y, x]) for x, y in points]


def test_raw_dir_is_the_stack(scopefs):
    planes = gen.write_planes(scopefs.raw, 3, 200, 150, dtype=np.uint8, seed=4, prefix='z')
    m = scopefs.mount(opts=OPTICS)
    assert sorted(os.listdir(m.path('deconvolved'))) == [name for name, _ in planes]
    for name, raw in planes:
        check_plane_file(m.path('deconvolved', name), raw)
    assert os.listdir(m.path('registered')) == []


def test_planes_carry_imagej_calibration(scopefs, tmp_path):
    """Each plane states the voxel size the stack was deconvolved with, in
    ImageJ 1.x's own form (pixels per micron with ResolutionUnit none, the
    unit and z spacing in the description), so Fiji's Image Sequence import
    shows microns; the extra tags leave the pixels as tifffile and libvips
    read them alike."""
    planes = gen.write_planes(scopefs.raw / 'beads', 3, 40, 52, seed=8)
    m = scopefs.mount(opts=dict(OPTICS, dxy='0.1625', dz='1.2'))
    path = m.path('deconvolved', 'beads', planes[0][0])
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        assert tf.imagej_metadata == {'ImageJ': '1.11a', 'unit': 'micron', 'spacing': 1.2}
        xres, yres = page.tags['XResolution'].value, page.tags['YResolution'].value
        assert abs(xres[0] / xres[1] - 1 / 0.1625) < 1e-6 and xres == yres
        assert page.tags['ResolutionUnit'].value == 1  # none: the unit is in the description
        got = page.asarray()
    out = tmp_path / 'plane.v'
    r = subprocess.run(['vips', 'copy', str(path), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    raw = tmp_path / 'plane.raw'
    subprocess.run(['vips', 'rawsave', str(out), str(raw)], check=True, capture_output=True)
    assert np.array_equal(np.fromfile(raw, dtype=got.dtype).reshape(got.shape), got)
    check_plane_file(path, planes[0][1])

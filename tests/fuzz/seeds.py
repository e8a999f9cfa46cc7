#!/usr/bin/python3
"""Write the seed corpora of the fuzz harnesses (tests/fuzz/) under OUT/<target>/.

    /usr/bin/python3 tests/fuzz/seeds.py OUT

Seeds are the valid examples the unit tests and docs/transforms.md use, plus
small TIFFs written with tifffile (tiled, stripped, deflate, a 2-level OME
pyramid)."""
import os
import sys

OUT = sys.argv[1] if len(sys.argv) > 1 else "fuzz-seeds"


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


# --- our JSON -----------------------------------------------------------------
put("transform_json", "matrix", '{"scopefs_transform": 1, "note": "x\\u00e9",\n'
    ' "matrix": [[0.5, 0, 10], [0, 2, -1]]}\n')
put("transform_json", "field", '{"scopefs_transform": 1,\n'
    ' "matrix": [[1, 0.1, 2], [-0.1, 1, 3], [0, 0, 1]],\n'
    ' "field": {"file": "field.tif", "scale": 8, "offset": [3.5, 3.5]}\n}\n')
put("transform_json", "field_px", '{"scopefs_transform": 1, "matrix": [[1, 0, 0], [0, 1, 0]],'
    ' "field": {"file": "field.tif", "scale": 2, "offset": [0, 0], "units": "pixels"}}')
put("transform_json", "proj", '{"scopefs_transform": 1, "matrix": [[1, 0, 0], [0, 1, 0],'
    ' [0.001, 0, 1]]}')

# --- elastix ------------------------------------------------------------------
EULER = ('// written by hand\n(Transform "EulerTransform")\n(NumberOfParameters 3)\n'
         '(TransformParameters 0.3 4.5 -2.25)\n'
         '(InitialTransformParametersFileName "NoInitialTransform")\n'
         '(HowToCombineTransforms "Compose")\n(FixedImageDimension 2)\n'
         '(MovingImageDimension 2)\n(Size 100 80)\n(Index 0 0)\n(Spacing 0.5 0.5)\n'
         '(Origin 0 0)\n(Direction 1 0 0 1)\n(CenterOfRotationPoint 20 15)\n')
put("transform_elastix", "euler", EULER)
put("transform_elastix", "sim", '(Transform "SimilarityTransform")\n(NumberOfParameters 4)\n'
    '(TransformParameters 1.2 -0.4 1 2)\n(CenterOfRotationPoint 5 6)\n'
    '(Origin 10 -20)\n(Spacing 2 2)\n(Index 1 0)\n')
put("transform_elastix", "chain", '(Transform "TranslationTransform")\n(NumberOfParameters 2)\n'
    '(TransformParameters 0.5 0.25)\n(InitialTransformParametersFileName "c0.txt")\n'
    '(HowToCombineTransforms "Add")\n')
put("transform_elastix", "bspline", '(Transform "BSplineTransform")\n(NumberOfParameters 72)\n'
    '(GridSize 6 6)\n(GridIndex 0 0)\n(GridSpacing 10 10)\n(GridOrigin -10 -10)\n'
    '(GridDirection 1 0 0 1)\n(BSplineTransformSplineOrder 3)\n(TransformParameters'
    + "".join(" 1.5" if i < 36 else " -2" for i in range(72)) + ')\n')
put("transform_elastix", "deform", '(Transform "DeformationFieldTransform")\n'
    '(DeformationFieldFileName "def.mhd")\n(DeformationFieldInterpolationOrder 1)\n'
    '(NumberOfParameters 0)\n(Spacing 1 1)\n')

# --- ITK ----------------------------------------------------------------------
put("transform_itk", "affine", "#Insight Transform File V1.0\n#Transform 0\n"
    "Transform: AffineTransform_double_2_2\nParameters: 1.1 0.2 -0.1 0.9 3 4\n"
    "FixedParameters: 10 10\n")
put("transform_itk", "composite", "#Insight Transform File V1.0\n#Transform 0\n"
    "Transform: CompositeTransform_double_2_2\n#Transform 1\n"
    "Transform: Rigid2DTransform_double_2_2\nParameters: 1.5707963267948966 0 0\n"
    "FixedParameters: 0 0\n#Transform 2\nTransform: TranslationTransform_double_2_2\n"
    "Parameters: 5 0\nFixedParameters: \n")
put("transform_itk", "similarity", "#Insight Transform File V1.0\n#Transform 0\n"
    "Transform: Similarity2DTransform_double_2_2\nParameters: 2 0 1 1\nFixedParameters: 0 0\n")
put("transform_itk", "field", "#Insight Transform File V1.0\n#Transform 0\n"
    "Transform: CompositeTransform_double_2_2\n#Transform 1\n"
    "Transform: DisplacementFieldTransform_double_2_2\n"
    "Parameters: 0 0 1 0 2 0 0 2 1 2 2 2\nFixedParameters: 3 2 10 20 4 5 1 0 0 1\n"
    "#Transform 2\nTransform: TranslationTransform_double_2_2\n"
    "Parameters: 1 0\nFixedParameters: \n")
put("transform_itk", "euler", "#Insight Transform File V1.0\n#Transform 0\n"
    "Transform: CompositeTransform_double_2_2\n#Transform 1\n"
    "Transform: Euler2DTransform_double_2_2\nParameters: 0.1 2 3\nFixedParameters: 1 1\n"
    "#Transform 2\nTransform: IdentityTransform_double_2_2\nParameters: \nFixedParameters: \n"
    "#Transform 3\nTransform: MatrixOffsetTransformBase_double_2_2\n"
    "Parameters: 1 0 0 1 2 2\nFixedParameters: 0 0\n")

# --- wsireg -------------------------------------------------------------------
put("transform_wsireg", "proj", '{\n "initial-mov-00": {"Transform": ["TranslationTransform"],\n'
    '   "NumberOfParameters": ["2"], "TransformParameters": ["3", "-1"],\n'
    '   "Spacing": ["2", "2"]},\n "000-to-mid": [\n'
    '  {"Transform": ["EulerTransform"], "TransformParameters": ["0.3", "4.5", "-2.25"],\n'
    '   "CenterOfRotationPoint": ["20", "15"], "Spacing": ["1", "1"]},\n'
    '  {"Transform": ["AffineTransform"],\n'
    '   "TransformParameters": ["1.1", "0.2", "-0.1", "0.9", "3", "4"],\n'
    '   "CenterOfRotationPoint": ["10", "10"],\n'
    '   "InitialTransformParametersFileName": ["0"]}\n ],\n'
    ' "skipped": null, "empty": [],\n "001-to-ref": [\n'
    '  {"Transform": ["SimilarityTransform"], "NumberOfParameters": [4],\n'
    '   "TransformParameters": ["1.2", "-0.4", "1", "2"],\n'
    '   "CenterOfRotationPoint": ["5", "6"], "Spacing": ["0.5", "0.5"],\n'
    '   "Origin": ["0", "0"], "Size": ["100", "80"]}\n ]\n}\n')
put("transform_wsireg", "initial", '{"initial": [\n {"Transform": ["TranslationTransform"],'
    ' "TransformParameters": ["1", "0"]},\n {"Transform": ["EulerTransform"],\n'
    '  "TransformParameters": ["1.5707963267948966", "0", "0"]}]}\n')
put("transform_wsireg", "bspline", '{"e": [{"Transform": ["BSplineTransform"], '
    '"GridSize": ["3", "3"], "GridSpacing": ["10", "10"], "GridOrigin": ["-10", "-10"],'
    ' "GridDirection": ["1", "0", "0", "1"], "TransformParameters": ['
    + ", ".join('"%g"' % (0.1 * i) for i in range(18)) + ']}]}\n')

# --- MetaImage (the harness writes in.raw: 64 x 64 x 2 doubles) -----------------
put("metaimage", "float", "ObjectType = Image\nNDims = 2\nBinaryData = True\n"
    "BinaryDataByteOrderMSB = False\nCompressedData = False\n"
    "TransformMatrix = 1 0 0 1\nOffset = 10 20\nCenterOfRotation = 0 0\n"
    "ElementSpacing = 4 5\nDimSize = 3 2\nElementNumberOfChannels = 2\n"
    "ElementType = MET_FLOAT\nElementDataFile = in.raw\n")
put("metaimage", "double", "NDims = 2\nDimSize = 64 64\nElementNumberOfChannels = 2\n"
    "ElementType = MET_DOUBLE\nElementSpacing = 0.5 0.25\nOrigin = -3 4\n"
    "Orientation = 0 1 -1 0\nElementDataFile = in.raw\n")
put("metaimage", "local", b"ObjectType = Image\nNDims = 2\nDimSize = 2 2\n"
    b"ElementNumberOfChannels = 2\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
    + bytes(range(32)))

# --- slides: tiny TIFFs (tifffile) ----------------------------------------------
import io  # noqa: E402

import numpy as np  # noqa: E402
import tifffile  # noqa: E402


def tiff(name, write):
    buf = io.BytesIO()
    write(buf)
    put("slide", name, buf.getvalue())


rng = np.random.default_rng(0)
img = (rng.random((40, 48)) * 4000).astype(np.uint16)
tiff("strips", lambda b: tifffile.imwrite(b, img, rowsperstrip=7, metadata=None))
tiff("tiled_deflate", lambda b: tifffile.imwrite(b, img, tile=(16, 16), compression="zlib",
                                                 metadata=None))
rgb = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
tiff("rgb_tiled", lambda b: tifffile.imwrite(b, rgb, tile=(16, 16), photometric="rgb",
                                             metadata=None))
f32 = rng.random((2, 20, 18)).astype(np.float32)
tiff("pages_f32", lambda b: tifffile.imwrite(b, f32, metadata=None))


def ome_pyramid(b):
    a = (rng.random((2, 32, 32)) * 255).astype(np.uint8)
    with tifffile.TiffWriter(b, ome=True) as tw:
        tw.write(a, subifds=1, tile=(16, 16), photometric="minisblack",
                 metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5,
                           "Channel": {"Name": ["DAPI", "CD3 &amp; x"]}})
        tw.write(a[:, ::2, ::2], subfiletype=1, tile=(16, 16), photometric="minisblack")


tiff("ome_pyramid", ome_pyramid)


def vips_pages(b):
    with tifffile.TiffWriter(b) as tw:
        tw.write(img, tile=(16, 16), metadata=None)
        tw.write(img[::2, ::2], tile=(16, 16), subfiletype=1, metadata=None)


tiff("pages_pyramid", vips_pages)
tiff("imagej", lambda b: tifffile.imwrite(b, f32[:, None], imagej=True,
                                          metadata={"axes": "ZCYX"}))
tiff("svs_desc", lambda b: tifffile.imwrite(b, rgb, tile=(16, 16), photometric="rgb",
                                            description="Aperio Image Library v12\n"
                                            "32x24 -> 32x24 [0,0 32x24] |AppMag = 20|MPP = 0.4990"))

# --- deconvolution settings (a scopefs.conf; also read as an -o list) ----------
put("deconv_conf", "full", "# per-stack settings\ndxy=0.406\ndz=1.2\nlambda_ex=561\n"
    "lambda_em=600\nna=0.5\nrf=1.333\nfcyl=80\nslitwidth=6.5\nnumit=20\n"
    "lambda_damping=0.02\nregularize_interval=3\nclipval=99.9\nstop_criterion=2\n"
    "accelerate=1\ngaussian_sigma=1.5:1.5:0.5\ngaussian_filter_size=5:5:3\n"
    "denoise_strength=2\nsignal_amp=1\ndestripe_sigma=3\nflip=1\n")
put("deconv_conf", "specials", "scale=auto\nscale_sample=all\ndtype=uint8\ngpu=off\n"
    "deconv_block=64\nconvert_to_16bit=1\ndark=100\n")
put("deconv_conf", "list", "dxy=0.4,dz=1.2,gaussian_sigma=2,gaussian_filter_size=7,scale=2.5,"
    "dtype=float32,gpu=0")

# --- mount options (a preset file; also read as an -o list) ---------------------
HERE = os.path.dirname(os.path.abspath(__file__))
for name in sorted(os.listdir(os.path.join(HERE, "..", "..", "mountopts"))):
    with open(os.path.join(HERE, "..", "..", "mountopts", name), "rb") as f:
        put("options", name, f.read())
put("options", "general", "cache_size=50G\nthreads=8\ninterp=bicubic\nbackground=-1.5\n"
    "gpu=off\nreference=a.svs\ntransforms=/tmp/t\nlog=/tmp/scopefs.log\ncache=/tmp/c\n"
    "allow_other\nfsname=scopefs\nsubtype=x\nmem=1G\nreadahead=0\n")
put("options", "reg", "reg=auto\nreg_channel=2\nreg_metric=mi\nreg_dim=512\n"
    "reg_nonrigid_dim=0\nreg_order=direct\nreg_eager=0\nreg_micro=1\n")

# --- slide descriptions (fuzz_slide_desc writes them into its own TIFF) ---------
OME_NS = 'xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"'
put("slide_desc", "ome", '<?xml version="1.0" encoding="UTF-8"?>\n<!-- c -->\n'
    '<OME %s><Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" '
    'Type="uint8" SizeX="64" SizeY="48" SizeC="3" SizeZ="1" SizeT="1" '
    'PhysicalSizeX="0.5" PhysicalSizeXUnit="&#181;m" PhysicalSizeY="500" '
    'PhysicalSizeYUnit="nm"><Channel ID="Channel:0:0" Name="DAPI"/>'
    '<Channel ID="Channel:0:1" Name="CD3 &amp; &#x3bc;"/><Channel ID="Channel:0:2"/>'
    '<TiffData/></Pixels></Image></OME>' % OME_NS)
put("slide_desc", "ome_prefix", '<ome:OME xmlns:ome="x"><ome:Image><ome:Pixels SizeX=\'64\' '
    'SizeY=\'48\' SizeC=\'1\' SizeZ=\'3\' PhysicalSizeX=\'1\' PhysicalSizeXUnit=\'mm\'>'
    '<![CDATA[<Pixels SizeC="9">]]><ome:Channel Name="a>b"/></ome:Pixels></ome:Image></ome:OME>')
put("slide_desc", "imagej", "ImageJ=1.53t\nimages=3\nchannels=3\nslices=1\nhyperstack=true\n"
    "mode=composite\nunit=micron\nspacing=2.5\n")
put("slide_desc", "aperio", "Aperio Image Library v12.0.15\n64x48 [0,0 64x48] (32x32) "
    "JPEG/RGB Q=70|AppMag = 20|MPP = 0.4990|Filename = x")

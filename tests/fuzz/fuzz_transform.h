/* fuzz_transform.h — the body shared by the transform file harnesses
 * (fuzz_transform_json.c, _elastix.c, _itk.c, _wsireg.c), which differ in
 * the file name the input is written to (sf_transform_load dispatches on it).
 *
 * After a successful load the map must be finite and one small tile is
 * warped through it (bicubic, 16 x 16 from a 64 x 64 source).
 *
 * Side files the formats may name, written once: field.tif (a valid 2-band
 * float32 field for our JSON), c0.txt (an elastix map to chain to) and
 * def.mhd + def.raw (a MetaImage deformation field). */
#ifndef SCOPEFS_FUZZ_TRANSFORM_H
#define SCOPEFS_FUZZ_TRANSFORM_H

#include <math.h>
#include <string.h>
#include <tiffio.h>

#include "fuzz_common.h"
#include "scopefs/transform.h"
#include "scopefs/warp.h"

static void fuzz_transform_side_files(void)
{
	char p[128];
	const char c0[] = "(Transform \"AffineTransform\")\n(NumberOfParameters 6)\n"
	                  "(TransformParameters 1.1 0.2 -0.1 0.9 3 4)\n"
	                  "(CenterOfRotationPoint 10 10)\n";
	fuzz_write(fuzz_path("c0.txt", p, sizeof p), c0, sizeof c0 - 1);
	const char mhd[] = "ObjectType = Image\nNDims = 2\nDimSize = 3 2\n"
	                   "ElementNumberOfChannels = 2\nElementType = MET_FLOAT\n"
	                   "ElementSpacing = 4 5\nOffset = 10 20\nElementDataFile = def.raw\n";
	fuzz_write(fuzz_path("def.mhd", p, sizeof p), mhd, sizeof mhd - 1);
	float raw[12] = {0, 0, 1, 0, 2, 0, 0, 2, 1, 2, 2, 2};
	fuzz_write(fuzz_path("def.raw", p, sizeof p), raw, sizeof raw);

	/* 4 x 3 nodes, 2 samples per pixel, float32, in strips */
	TIFF *tif = TIFFOpen(fuzz_path("field.tif", p, sizeof p), "w");
	if (!tif)
		abort();
	TIFFSetField(tif, TIFFTAG_IMAGEWIDTH, 4);
	TIFFSetField(tif, TIFFTAG_IMAGELENGTH, 3);
	TIFFSetField(tif, TIFFTAG_SAMPLESPERPIXEL, 2);
	TIFFSetField(tif, TIFFTAG_BITSPERSAMPLE, 32);
	TIFFSetField(tif, TIFFTAG_SAMPLEFORMAT, SAMPLEFORMAT_IEEEFP);
	TIFFSetField(tif, TIFFTAG_PLANARCONFIG, PLANARCONFIG_CONTIG);
	TIFFSetField(tif, TIFFTAG_PHOTOMETRIC, PHOTOMETRIC_MINISBLACK);
	TIFFSetField(tif, TIFFTAG_ROWSPERSTRIP, 3);
	float row[8];
	for (uint32_t y = 0; y < 3; y++) {
		for (int i = 0; i < 8; i++)
			row[i] = 0.25f * (float)(i + (int)y);
		TIFFWriteScanline(tif, row, y, 0);
	}
	TIFFClose(tif);
}

/* A loaded map must be usable: every coefficient finite (an inf or NaN
 * would warp to a silently wrong image). */
static void fuzz_check_map(const sf_map *m)
{
	for (int i = 0; i < 9; i++)
		if (!isfinite(m->m[i]))
			abort();
	for (unsigned k = 0; k < m->nfields; k++) {
		for (int i = 0; i < 6; i++)
			if (!isfinite(m->field[k].g[i]))
				abort();
		for (int i = 0; i < 4; i++)
			if (!isfinite(m->field[k].vm[i]))
				abort();
	}
}

/* Warp one small tile through the loaded transform, as the engine would. */
static void fuzz_warp_some(const sf_transform *t)
{
	static uint8_t src[64 * 64], dst[16 * 16];
	sf_map lm;
	sf_transform_level_map(t, (double[]){4, 4}, (double[]){2, 2}, &lm);
	fuzz_check_map(&lm);
	sf_wrect out = {3, -2, 16, 16}, need;
	sf_warp_source_rect(&lm, out, SF_INTERP_BICUBIC, 64, 64, &need);
	if (need.w < 0 || need.h < 0 || need.x < 0 || need.y < 0 || need.x + need.w > 64 ||
	    need.y + need.h > 64)
		abort();
	sf_warp_src ws = {src, 64, {0, 0, 64, 64}};
	sf_warp_fmt fmt = {SF_U8, 1, SF_INTERP_BICUBIC, 0};
	sf_err e;
	sf_warp_tile(&lm, &ws, &fmt, out, dst, 16, &e);
}

static void fuzz_transform_one(const char *name, const uint8_t *data, size_t size)
{
	static int ready;
	if (!ready) {
		fuzz_transform_side_files();
		ready = 1;
	}
	char p[128];
	fuzz_path(name, p, sizeof p);
	fuzz_write(p, data, size);
	sf_transform t;
	sf_err e;
	const sf_tf_units *units[2] = {NULL, &(sf_tf_units){{0.5, 0.5}, {2, 0.25}}};
	for (int u = 0; u < 2; u++) {
		if (sf_transform_load(p, units[u], &t, &e) != SF_OK) {
			/* every error must carry a message naming something */
			if (!e.msg[0])
				abort();
			if (getenv("FUZZ_VERBOSE"))
				fprintf(stderr, "rejected: %s\n", e.msg);
			continue;
		}
		fuzz_check_map(&t.map);
		fuzz_warp_some(&t);
		sf_transform_release(&t);
	}
}

#endif

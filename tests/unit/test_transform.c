/* test_transform.c — the transform model and the transform file readers.
 *
 * Expected values come from the definitions, evaluated here by hand: fields
 * whose node values are affine in the node index (so bilinear and B-spline
 * interpolation reproduce that affine function exactly inside the grid),
 * centred rotations written out with sin/cos, and the pixel-centre rule
 * x0 = (x + 0.5) f - 0.5.  wsireg files are checked against the same maps
 * composed by hand in the order wsireg documents (last key first).  Fixture
 * files are written to a temporary folder. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tiffio.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "scopefs/metaimage.h"
#include "scopefs/transform.h"
#include "scopefs/warp.h"

static char dir[64];
static char made[64][192];
static int nmade;

static const char *fixture_bytes(const char *name, const void *bytes, size_t n)
{
	char *p = made[nmade < 63 ? nmade++ : 63];
	snprintf(p, sizeof made[0], "%s/%s", dir, name);
	FILE *f = fopen(p, "wb");
	if (f) {
		if (n)
			fwrite(bytes, 1, n, f);
		fclose(f);
	}
	return p;
}

static const char *fixture(const char *name, const char *text)
{
	return fixture_bytes(name, text, strlen(text));
}

static int near(double a, double b, double tol)
{
	return fabs(a - b) <= tol;
}

/* Check t maps (x, y) to (ex, ey). */
#define CHECK_MAP(map, x, y, ex, ey, tol, what)                                                    \
	do {                                                                                       \
		double sx_, sy_;                                                                   \
		sf_map_point((map), (x), (y), &sx_, &sy_);                                         \
		CHECK(near(sx_, (ex), (tol)) && near(sy_, (ey), (tol)),                            \
		      "%s: (%g, %g) -> (%.9g, %.9g), expected (%.9g, %.9g)", (what), (double)(x),  \
		      (double)(y), sx_, sy_, (double)(ex), (double)(ey));                          \
	} while (0)

/* A linear field grid: value at node (i, j) = (a0 + a1 i + a2 j, b0 + b1 i + b2 j). */
static sf_field_grid *affine_grid(sf_field_kind kind, uint32_t w, uint32_t h, const double a[3],
                                  const double b[3])
{
	sf_err e;
	sf_field_grid *g = sf_field_grid_create(kind, w, h, &e);
	for (uint32_t j = 0; g && j < h; j++)
		for (uint32_t i = 0; i < w; i++) {
			g->v[2 * (j * w + i)] = (float)(a[0] + a[1] * i + a[2] * j);
			g->v[2 * (j * w + i) + 1] = (float)(b[0] + b[1] * i + b[2] * j);
		}
	if (g && sf_field_grid_finish(g, &e) != SF_OK) {
		sf_field_grid_free(g);
		g = NULL;
	}
	return g;
}

static void test_matrices(void)
{
	double a[9] = {2, 1, 3, -1, 4, 5, 0, 0, 1}, inv[9], r[9];
	CHECK(sf_mat3_inverse(a, inv) == SF_OK, "invertible");
	sf_mat3_mul(a, inv, r);
	for (int i = 0; i < 9; i++)
		CHECK(near(r[i], i % 4 == 0, 1e-12), "a * a^-1 entry %d = %g", i, r[i]);
	double sing[9] = {1, 2, 0, 2, 4, 0, 0, 0, 1};
	CHECK(sf_mat3_inverse(sing, inv) == SF_EINVAL, "singular is refused");
	/* tiny but regular (physical pixel sizes of 1e-4) still inverts */
	double tiny[9] = {1e-4, 0, 0, 0, 1e-4, 0, 0, 0, 1};
	CHECK(sf_mat3_inverse(tiny, inv) == SF_OK && near(inv[0], 1e4, 1e-6), "tiny inverts");
	/* a 180-degree turn of a 60000 x 20000 slide: det 1, translation large */
	double turn[9] = {-1, 0, 59999, 0, -1, 19999, 0, 0, 1};
	CHECK(sf_mat3_inverse(turn, inv) == SF_OK && near(inv[2], 59999, 1e-9) &&
	          near(inv[5], 19999, 1e-9),
	      "a large translation does not make a matrix singular");
	double far_sing[9] = {1, 2, 1e6, 2, 4, 3e5, 0, 0, 1};
	CHECK(sf_mat3_inverse(far_sing, inv) == SF_EINVAL, "singular with a translation refused");
	/* projective: invertible with a large translation, singular rows refused */
	double proj[9] = {1, 0, 5e4, 0, 1, -3e4, 1e-6, 2e-6, 1};
	CHECK(sf_mat3_inverse(proj, inv) == SF_OK, "projective with a large translation inverts");
	sf_mat3_mul(proj, inv, r);
	for (int i = 0; i < 9; i++)
		CHECK(near(r[i], i % 4 == 0, 1e-9), "proj * proj^-1 entry %d = %g", i, r[i]);
	double proj_sing[9] = {1, 2, 3, 2, 4, 6, 1e-6, 0, 1};
	CHECK(sf_mat3_inverse(proj_sing, inv) == SF_EINVAL, "projective singular refused");
}

static void test_composition(void)
{
	sf_err e;
	sf_transform t;
	sf_transform_init(&t);
	/* then: first A (scale 2, shift 1), then B (shift 10, -3) */
	double A[9] = {2, 0, 1, 0, 2, 0, 0, 0, 1}, B[9] = {1, 0, 10, 0, 1, -3, 0, 0, 1};
	CHECK(sf_transform_then_matrix(&t, A, &e) == SF_OK, "then A");
	CHECK(sf_transform_then_matrix(&t, B, &e) == SF_OK, "then B");
	CHECK_MAP(&t.map, 3, 4, 2 * 3 + 1 + 10, 2 * 4 - 3, 1e-12, "B(A(x))");
	/* first: C applied before everything */
	double C[9] = {0, -1, 0, 1, 0, 0, 0, 0, 1}; /* (x, y) -> (-y, x) */
	CHECK(sf_transform_first_matrix(&t, C, &e) == SF_OK, "first C");
	CHECK_MAP(&t.map, 3, 4, 2 * -4 + 1 + 10, 2 * 3 - 3, 1e-12, "B(A(C(x)))");
	double S[9] = {1, 2, 0, 2, 4, 0, 0, 0, 1};
	CHECK(sf_transform_then_matrix(&t, S, &e) == SF_EINVAL, "singular then is refused");
	CHECK_MAP(&t.map, 3, 4, 2 * -4 + 1 + 10, 2 * 3 - 3, 1e-12, "unchanged after a failure");
	sf_transform_release(&t);

	/* field after a matrix: p = M x; p += F(G p); then N.  F linear in the
	 * grid index, grid index = p / 4 (node spacing 4 px). */
	double fa[3] = {0.5, 0.25, -0.1}, fb[3] = {-1, 0.05, 0.2};
	sf_field_grid *g = affine_grid(SF_FIELD_LINEAR, 40, 40, fa, fb);
	double M[9] = {0.9, -0.2, 7, 0.3, 1.1, -2, 0, 0, 1}, N[9] = {1, 0.1, 3, 0, 1, 4, 0, 0, 1};
	double gmap[6] = {0.25, 0, 0, 0, 0.25, 0}, vm[4] = {1, 0, 0, 1};
	sf_transform_init(&t);
	CHECK(sf_transform_then_matrix(&t, M, &e) == SF_OK, "M");
	CHECK(sf_transform_then_field(&t, g, gmap, vm, &e) == SF_OK, "field: %s", e.msg);
	CHECK(sf_transform_then_matrix(&t, N, &e) == SF_OK, "N");
	CHECK(t.map.nfields == 1 && t.ngrids == 1, "one field");
	for (int k = 0; k < 5; k++) {
		double x = 10 + 13.7 * k, y = 20 - 3.3 * k;
		double px = M[0] * x + M[1] * y + M[2], py = M[3] * x + M[4] * y + M[5];
		double gi = px / 4, gj = py / 4;
		px += fa[0] + fa[1] * gi + fa[2] * gj;
		py += fb[0] + fb[1] * gi + fb[2] * gj;
		CHECK_MAP(&t.map, x, y, N[0] * px + N[1] * py + N[2], N[3] * px + N[4] * py + N[5],
		          1e-5, "N(F(M x))");
	}
	/* then(t, u): u = another field after a rotation */
	sf_transform u;
	sf_transform_init(&u);
	double R[9] = {0, 1, 5, -1, 0, 60, 0, 0, 1};
	double ga[3] = {1, 0, 0.01}, gb[3] = {0.3, -0.02, 0};
	sf_field_grid *g2 = affine_grid(SF_FIELD_LINEAR, 30, 30, ga, gb);
	double gmap2[6] = {0.5, 0, 1, 0, 0.5, 1}, vm2[4] = {2, 0, 0, 2};
	CHECK(sf_transform_then_matrix(&u, R, &e) == SF_OK, "R");
	CHECK(sf_transform_then_field(&u, g2, gmap2, vm2, &e) == SF_OK, "field 2");
	sf_map before = t.map;
	CHECK(sf_transform_then(&t, &u, &e) == SF_OK, "then u: %s", e.msg);
	CHECK(t.map.nfields == 2 && u.ngrids == 0 && u.map.nfields == 0, "u's grid moved");
	for (int k = 0; k < 5; k++) {
		double x = 12 + 9.1 * k, y = 30 - 2.1 * k, px, py;
		sf_map_point(&before, x, y, &px, &py);
		double qx = R[0] * px + R[1] * py + R[2], qy = R[3] * px + R[4] * py + R[5];
		double gi = 0.5 * qx + 1, gj = 0.5 * qy + 1;
		qx += 2 * (ga[0] + ga[1] * gi + ga[2] * gj);
		qy += 2 * (gb[0] + gb[1] * gi + gb[2] * gj);
		CHECK_MAP(&t.map, x, y, qx, qy, 1e-4, "u(t(x))");
	}
	sf_transform_release(&t);
	sf_transform_release(&u);
}

static void test_add(void)
{
	sf_err e;
	sf_transform t, u;
	/* affine + field: x -> A x + (x + F(x)) - x = A x + F(x) */
	double A[9] = {1.1, 0.2, 3, -0.1, 0.9, -4, 0, 0, 1};
	double fa[3] = {0.5, 0.02, 0.01}, fb[3] = {-0.3, 0.0, 0.03};
	sf_transform_init(&t);
	sf_transform_init(&u);
	sf_transform_then_matrix(&t, A, &e);
	double gmap[6] = {0.1, 0, 0, 0, 0.1, 0}, vm[4] = {1, 0, 0, 1};
	sf_transform_then_field(&u, affine_grid(SF_FIELD_LINEAR, 20, 20, fa, fb), gmap, vm, &e);
	CHECK(sf_transform_add(&t, &u, &e) == SF_OK, "add: %s", e.msg);
	for (int k = 0; k < 4; k++) {
		double x = 17 + 31 * k, y = 50 + 7 * k, gi = 0.1 * x, gj = 0.1 * y;
		double ex = A[0] * x + A[1] * y + A[2] + fa[0] + fa[1] * gi + fa[2] * gj;
		double ey = A[3] * x + A[4] * y + A[5] + fb[0] + fb[1] * gi + fb[2] * gj;
		CHECK_MAP(&t.map, x, y, ex, ey, 1e-5, "A x + F(x)");
	}
	/* two fields: refused, and u is released (ASan checks the leak) */
	sf_transform_init(&u);
	sf_transform_then_field(&u, affine_grid(SF_FIELD_LINEAR, 4, 4, fa, fb), gmap, vm, &e);
	CHECK(sf_transform_add(&t, &u, &e) == SF_EUNSUPPORTED, "two fields in Add");
	sf_transform_release(&t);
}

static void test_levels(void)
{
	sf_err e;
	sf_transform t;
	sf_transform_init(&t);
	sf_map m;
	/* identity, output level with downsample 2, source level 0: output
	 * pixel 0 covers level-0 pixels 0 and 1, so its centre is 0.5 */
	sf_transform_level_map(&t, (double[]){2, 2}, (double[]){1, 1}, &m);
	CHECK_MAP(&m, 0, 0, 0.5, 0.5, 1e-12, "level 1 -> level 0");
	CHECK_MAP(&m, 3, 1, 6.5, 2.5, 1e-12, "level 1 -> level 0");
	/* output level 0 from source level 2 (downsample 4): level-0 pixel 1.5
	 * is the centre of source pixel 0 ((0 + 0.5) * 4 - 0.5) */
	sf_transform_level_map(&t, (double[]){1, 1}, (double[]){4, 4}, &m);
	CHECK_MAP(&m, 1.5, 5.5, 0, 1, 1e-12, "level 0 -> level 2");
	/* equal levels under the identity: identity */
	sf_transform_level_map(&t, (double[]){8, 8}, (double[]){8, 8}, &m);
	CHECK_MAP(&m, 17, 3, 17, 3, 1e-12, "level 3 -> level 3");
	/* per-axis downsample (odd level sizes: 1001 -> 501) */
	double f = 1001.0 / 501.0;
	sf_transform_level_map(&t, (double[]){f, 2}, (double[]){1, 1}, &m);
	CHECK_MAP(&m, 500, 0, 500.5 * f - 0.5, 0.5, 1e-9, "per-axis downsample");
	/* a transform with a field: level map = S_src^-1 o t o S_out */
	double fa[3] = {1, 0.1, 0}, fb[3] = {0, 0, -0.1};
	double A[9] = {0.8, 0.3, 12, -0.3, 0.8, 40, 0, 0, 1};
	double gmap[6] = {1.0 / 16, 0, 0, 0, 1.0 / 16, 0}, vm[4] = {16, 0, 0, 16};
	sf_transform_then_field(&t, affine_grid(SF_FIELD_LINEAR, 64, 64, fa, fb), gmap, vm, &e);
	sf_transform_then_matrix(&t, A, &e);
	sf_transform_level_map(&t, (double[]){4, 4}, (double[]){2, 2}, &m);
	for (int k = 0; k < 4; k++) {
		double x = 3 + 11 * k, y = 40 - 5 * k;
		double x0 = (x + 0.5) * 4 - 0.5, y0 = (y + 0.5) * 4 - 0.5, sx, sy;
		sf_map_point(&t.map, x0, y0, &sx, &sy);
		CHECK_MAP(&m, x, y, (sx + 0.5) / 2 - 0.5, (sy + 0.5) / 2 - 0.5, 1e-9,
		          "field level map");
	}
	CHECK(near(sf_transform_scale(&t), sqrt(0.8 * 0.8 + 0.3 * 0.3), 1e-12),
	      "scale = sqrt(det) = %g", sf_transform_scale(&t));
	sf_transform_release(&t);
}

/* --- files ---------------------------------------------------------------- */

static int write_field_tiff(const char *path, uint32_t w, uint32_t h, int tiled, int separate,
                            const double a[3], const double b[3])
{
	TIFF *tif = TIFFOpen(path, "w");
	if (!tif)
		return -1;
	TIFFSetField(tif, TIFFTAG_IMAGEWIDTH, w);
	TIFFSetField(tif, TIFFTAG_IMAGELENGTH, h);
	TIFFSetField(tif, TIFFTAG_SAMPLESPERPIXEL, 2);
	TIFFSetField(tif, TIFFTAG_BITSPERSAMPLE, 32);
	TIFFSetField(tif, TIFFTAG_SAMPLEFORMAT, SAMPLEFORMAT_IEEEFP);
	TIFFSetField(tif, TIFFTAG_PHOTOMETRIC, PHOTOMETRIC_MINISBLACK);
	uint16_t extra = EXTRASAMPLE_UNSPECIFIED;
	TIFFSetField(tif, TIFFTAG_EXTRASAMPLES, 1, &extra);
	TIFFSetField(tif, TIFFTAG_PLANARCONFIG,
	             separate ? PLANARCONFIG_SEPARATE : PLANARCONFIG_CONTIG);
	int rc = 0;
	if (tiled) {
		TIFFSetField(tif, TIFFTAG_TILEWIDTH, 16);
		TIFFSetField(tif, TIFFTAG_TILELENGTH, 16);
		float tile[16 * 16 * 2];
		for (unsigned s = 0; s < (separate ? 2u : 1u); s++)
			for (uint32_t ty = 0; ty < h; ty += 16)
				for (uint32_t tx = 0; tx < w; tx += 16) {
					memset(tile, 0, sizeof tile);
					for (uint32_t y = 0; y < 16; y++)
						for (uint32_t x = 0; x < 16; x++) {
							double i = tx + x, j = ty + y;
							float vx =
							    (float)(a[0] + a[1] * i + a[2] * j);
							float vy =
							    (float)(b[0] + b[1] * i + b[2] * j);
							if (separate)
								tile[y * 16 + x] = s ? vy : vx;
							else {
								tile[2 * (y * 16 + x)] = vx;
								tile[2 * (y * 16 + x) + 1] = vy;
							}
						}
					if (TIFFWriteTile(tif, tile, tx, ty, 0, (uint16_t)s) < 0)
						rc = -1;
				}
	} else {
		TIFFSetField(tif, TIFFTAG_ROWSPERSTRIP, 3);
		float *row = calloc(2 * (size_t)w, sizeof *row);
		for (unsigned s = 0; row && s < (separate ? 2u : 1u); s++)
			for (uint32_t j = 0; j < h; j++) {
				for (uint32_t i = 0; i < w; i++) {
					float vx = (float)(a[0] + a[1] * i + a[2] * j);
					float vy = (float)(b[0] + b[1] * i + b[2] * j);
					if (separate)
						row[i] = s ? vy : vx;
					else {
						row[2 * i] = vx;
						row[2 * i + 1] = vy;
					}
				}
				if (TIFFWriteScanline(tif, row, j, (uint16_t)s) < 0)
					rc = -1;
			}
		if (!row)
			rc = -1;
		free(row);
	}
	TIFFClose(tif);
	return rc;
}

static void test_json(void)
{
	sf_err e;
	sf_transform t;
	const char *p = fixture("m.json", "{\"scopefs_transform\": 1, \"note\": \"x\\u00e9\",\n"
	                                  " \"matrix\": [[0.5, 0, 10], [0, 2, -1]]}\n");
	CHECK(sf_transform_load(p, NULL, &t, &e) == SF_OK, "json matrix: %s", e.msg);
	CHECK_MAP(&t.map, 4, 5, 12, 9, 1e-12, "json matrix");
	sf_transform_release(&t);

	/* with a field, 4 layouts of the TIFF; offset and scale */
	double fa[3] = {0.25, 0.01, 0.02}, fb[3] = {-0.5, 0.03, 0.0};
	for (int layout = 0; layout < 4; layout++) {
		char tif[160], json[400];
		snprintf(tif, sizeof tif, "%s/field%d.tif", dir, layout);
		snprintf(made[nmade++], sizeof made[0], "%s", tif);
		CHECK(write_field_tiff(tif, 40, 21, layout & 1, layout >> 1, fa, fb) == 0,
		      "write %s", tif);
		snprintf(json, sizeof json,
		         "{\"scopefs_transform\": 1,\n"
		         " \"matrix\": [[1, 0.1, 2], [-0.1, 1, 3], [0, 0, 1]],\n"
		         " \"field\": {\"file\": \"field%d.tif\", \"scale\": 8, \"offset\": [3.5, "
		         "3.5]}\n"
		         "}\n",
		         layout);
		p = fixture("f.json", json);
		nmade--; /* same name each round */
		CHECK(sf_transform_load(p, NULL, &t, &e) == SF_OK, "json field: %s", e.msg);
		for (int k = 0; k < 3; k++) {
			double x = 20 + 37 * k, y = 15 + 29 * k;
			double u = (x - 3.5) / 8, v = (y - 3.5) / 8;
			double px = x + 8 * (fa[0] + fa[1] * u + fa[2] * v);
			double py = y + 8 * (fb[0] + fb[1] * u + fb[2] * v);
			CHECK_MAP(&t.map, x, y, px + 0.1 * py + 2, -0.1 * px + py + 3, 1e-5,
			          "json field layout");
		}
		/* beyond the last node the field is clamped (constant) */
		double ex = 39, ey = 20; /* last node */
		double vx = fa[0] + fa[1] * ex + fa[2] * ey, vy = fb[0] + fb[1] * ex + fb[2] * ey;
		double x = 3.5 + 8 * 45, y = 3.5 + 8 * 30, px = x + 8 * vx, py = y + 8 * vy;
		CHECK_MAP(&t.map, x, y, px + 0.1 * py + 2, -0.1 * px + py + 3, 1e-4, "clamped");
		sf_transform_release(&t);
	}
	nmade++;

	struct {
		const char *text, *want;
		int code;
	} bad[] = {
	    {"{\"scopefs_transform\": 1,\n \"matrix\": [[1, 0, 0], [0, 1, 0]\n}",
	     "bad.json:3:", SF_EFORMAT},
	    {"{\"scopefs_transform\": 1,\n\n \"matrix\": [[1, 0], [0, 1, 0]]}",
	     "bad.json:3:", SF_EFORMAT},
	    {"{\"scopefs_transform\": 2, \"matrix\": []}", "version 2", SF_EUNSUPPORTED},
	    {"{\"matrix\": [[1, 0, 0], [0, 1, 0]]}", "scopefs_transform", SF_EFORMAT},
	    {"{\"scopefs_transform\": 1,\n \"matrix\": [[1, 0, 0], [2, 0, 0]]}", "singular",
	     SF_EFORMAT},
	    {"{\"scopefs_transform\": 1, \"matrix\": [[1, 0, 0], [0, 1, 0]],\n"
	     " \"field\": {\"file\": \"nope.tif\"}}",
	     "nope.tif", SF_ENOTFOUND},
	    {"{\"scopefs_transform\": 1, \"matrix\": [[1, 0, 0], [0, 1, 0]],\n"
	     " \"field\": {\"file\": \"m.json\"}}",
	     "m.json", SF_EFORMAT},
	    {"{\"scopefs_transform\": 1,\n \"matrix\": [[1, 0, 0], [0, 1, 0]]} x",
	     "bad.json:2:", SF_EFORMAT},
	    {"{\"scopefs_transform\": 1, \"matrix\": [[1e999, 0, 0], [0, 1, 0]]}",
	     "bad.json:1:", SF_EFORMAT},
	    /* found in the fuzzing pass: a NUL cut the file name short */
	    {"{\"scopefs_transform\": 1, \"matrix\": [[1, 0, 0], [0, 1, 0]],\n"
	     " \"field\": {\"file\": \"field0.tif\\u0000.x\"}}",
	     "bad.json:2: \\u0000 (NUL) in a string", SF_EFORMAT},
	    /* two values for one key: which one wins depends on the reader */
	    {"{\"scopefs_transform\": 1, \"matrix\": [[1, 0, 0], [0, 1, 0]],\n"
	     " \"matrix\": [[2, 0, 0], [0, 2, 0]]}",
	     "bad.json:2: key \"matrix\" given twice", SF_EFORMAT},
	    /* a surrogate pair is one character (U+1F600, UTF-8 F0 9F 98 80) */
	    {"{\"scopefs_transform\": 1, \"matrix\": [[1, 0, 0], [0, 1, 0]],\n"
	     " \"field\": {\"file\": \"f\\uD83D\\uDE00.tif\"}}",
	     "f\xF0\x9F\x98\x80.tif", SF_ENOTFOUND},
	    /* half a pair is no character: refused, not written as invalid UTF-8 */
	    {"{\"scopefs_transform\": 1, \"matrix\": [[1, 0, 0], [0, 1, 0]],\n"
	     " \"field\": {\"file\": \"f\\uD83D.tif\"}}",
	     "bad.json:2: \\u escape: a high surrogate without its low half", SF_EFORMAT},
	    {"{\"scopefs_transform\": 1, \"matrix\": [[1, 0, 0], [0, 1, 0]],\n"
	     " \"field\": {\"file\": \"f\\uDE00.tif\"}}",
	     "bad.json:2: \\u escape: a low surrogate without its high half", SF_EFORMAT},
	    /* found in the fuzzing pass: -offset / scale overflows to -inf */
	    {"{\"scopefs_transform\": 1, \"matrix\": [[1, 0, 0], [0, 1, 0]],\n"
	     " \"field\": {\"file\": \"field0.tif\", \"scale\": 1e-300, \"offset\": [1e300, 0]}}",
	     "bad.json: the transform's values overflow", SF_EFORMAT},
	};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		p = fixture("bad.json", bad[i].text);
		nmade--;
		memset(&e, 0, sizeof e);
		int rc = sf_transform_load(p, NULL, &t, &e);
		CHECK(rc != SF_OK && strstr(e.msg, bad[i].want) &&
		          (bad[i].code == SF_EFORMAT ? rc == SF_EFORMAT || rc == SF_EINVAL
		                                     : rc == bad[i].code),
		      "bad json %zu: rc %d, message '%s' (want '%s')", i, rc, e.msg, bad[i].want);
		CHECK(t.map.nfields == 0 && t.ngrids == 0, "released after failure");
	}
	nmade++;
}

static const char elastix_euler[] = "// written by hand\n"
                                    "(Transform \"EulerTransform\")\n"
                                    "(NumberOfParameters 3)\n"
                                    "(TransformParameters 0.3 4.5 -2.25)\n"
                                    "(InitialTransformParametersFileName \"NoInitialTransform\")\n"
                                    "(HowToCombineTransforms \"Compose\")\n"
                                    "(FixedImageDimension 2)\n"
                                    "(MovingImageDimension 2)\n"
                                    "(Size 100 80)\n"
                                    "(Index 0 0)\n"
                                    "(Spacing 0.5 0.5)\n"
                                    "(Origin 0 0)\n"
                                    "(Direction 1 0 0 1)\n"
                                    "(CenterOfRotationPoint 20 15)\n";

/* The centred rotation T(p) = R (p - c) + c + t in physical units. */
static void euler(double th, double s, const double t[2], const double c[2], double px, double py,
                  double *qx, double *qy)
{
	*qx = s * (cos(th) * (px - c[0]) - sin(th) * (py - c[1])) + c[0] + t[0];
	*qy = s * (sin(th) * (px - c[0]) + cos(th) * (py - c[1])) + c[1] + t[1];
}

static void test_elastix(void)
{
	sf_err e;
	sf_transform t;
	const char *p = fixture("euler.txt", elastix_euler);
	CHECK(sf_transform_load(p, NULL, &t, &e) == SF_OK, "euler: %s", e.msg);
	double c[2] = {20, 15}, tr[2] = {4.5, -2.25}, qx, qy;
	for (int k = 0; k < 3; k++) {
		double x = 10 + 17 * k, y = 5 + 23 * k;
		euler(0.3, 1, tr, c, 0.5 * x, 0.5 * y, &qx, &qy);
		CHECK_MAP(&t.map, x, y, qx / 0.5, qy / 0.5, 1e-9, "euler, spacing 0.5");
	}
	sf_transform_release(&t);
	/* caller's pixel sizes: ref 0.25, moving 1.0 */
	sf_tf_units u = {{0.25, 0.25}, {1.0, 1.0}};
	CHECK(sf_transform_load(p, &u, &t, &e) == SF_OK, "euler units: %s", e.msg);
	euler(0.3, 1, tr, c, 0.25 * 40, 0.25 * 60, &qx, &qy);
	CHECK_MAP(&t.map, 40, 60, qx, qy, 1e-9, "euler with caller pixel sizes");
	sf_transform_release(&t);

	/* similarity, affine and translation with origin and index */
	const char *sim = fixture("sim.txt", "(Transform \"SimilarityTransform\")\n"
	                                     "(NumberOfParameters 4)\n"
	                                     "(TransformParameters 1.2 -0.4 1 2)\n"
	                                     "(CenterOfRotationPoint 5 6)\n"
	                                     "(Origin 10 -20)\n(Spacing 2 2)\n(Index 1 0)\n");
	CHECK(sf_transform_load(sim, NULL, &t, &e) == SF_OK, "similarity: %s", e.msg);
	{
		double x = 7, y = 9, px = 10 + 2 * (x + 1), py = -20 + 2 * y;
		euler(-0.4, 1.2, (double[]){1, 2}, (double[]){5, 6}, px, py, &qx, &qy);
		/* moving geometry = the fixed one: pixel = (q - origin) / spacing - index */
		CHECK_MAP(&t.map, x, y, (qx - 10) / 2 - 1, (qy + 20) / 2, 1e-9, "similarity");
	}
	sf_transform_release(&t);

	/* chain: affine (0) <- translation (1, Compose) <- translation (2, Add) */
	fixture("c0.txt", "(Transform \"AffineTransform\")\n(NumberOfParameters 6)\n"
	                  "(TransformParameters 1.1 0.2 -0.1 0.9 3 4)\n"
	                  "(CenterOfRotationPoint 10 10)\n");
	fixture("c1.txt", "(Transform \"TranslationTransform\")\n(NumberOfParameters 2)\n"
	                  "(TransformParameters 5 -7)\n"
	                  "(InitialTransformParametersFileName \"/elsewhere/c0.txt\")\n");
	const char *c2 =
	    fixture("c2.txt", "(Transform \"TranslationTransform\")\n"
	                      "(NumberOfParameters 2)\n(TransformParameters 0.5 0.25)\n"
	                      "(InitialTransformParametersFileName \"c1.txt\")\n"
	                      "(HowToCombineTransforms \"Add\")\n");
	CHECK(sf_transform_load(c2, NULL, &t, &e) == SF_OK, "chain: %s", e.msg);
	{
		double x = 30, y = -12;
		double ax = 1.1 * (x - 10) + 0.2 * (y - 10) + 10 + 3;
		double ay = -0.1 * (x - 10) + 0.9 * (y - 10) + 10 + 4;
		double t1x = ax + 5, t1y = ay - 7; /* Compose: c1(c0(x)) */
		/* Add: c2(x) + chain1(x) - x = (x + 0.5) + t1 - x */
		CHECK_MAP(&t.map, x, y, t1x + 0.5, t1y + 0.25, 1e-9, "Compose then Add chain");
	}
	sf_transform_release(&t);

	/* B-spline: constant coefficients c give displacement c inside the
	 * valid region [1, size-2) of the grid, and zero outside (ITK) */
	char bs[4096];
	int n = snprintf(bs, sizeof bs,
	                 "(Transform \"BSplineTransform\")\n(NumberOfParameters 72)\n"
	                 "(GridSize 6 6)\n(GridIndex 0 0)\n(GridSpacing 10 10)\n"
	                 "(GridOrigin -10 -10)\n(GridDirection 1 0 0 1)\n"
	                 "(BSplineTransformSplineOrder 3)\n(TransformParameters");
	for (int i = 0; i < 72; i++)
		n += snprintf(bs + n, sizeof bs - n, " %s", i < 36 ? "1.5" : "-2");
	snprintf(bs + n, sizeof bs - n, ")\n");
	const char *bsp = fixture("bs.txt", bs);
	CHECK(sf_transform_load(bsp, NULL, &t, &e) == SF_OK, "bspline: %s", e.msg);
	/* grid index g = (p + 10) / 10: valid for 1 <= g < 4, p in [0, 30) */
	CHECK_MAP(&t.map, 5, 25, 6.5, 23, 1e-6, "bspline inside");
	CHECK_MAP(&t.map, 0, 29.9, 1.5, 27.9, 1e-6, "bspline inside edge");
	CHECK_MAP(&t.map, 30, 5, 30, 5, 1e-12, "bspline outside (g = 4)");
	CHECK_MAP(&t.map, -0.1, 5, -0.1, 5, 1e-12, "bspline outside (g < 1)");
	sf_transform_release(&t);

	/* folder: the highest TransformParameters.N.txt wins */
	char sub[128];
	snprintf(sub, sizeof sub, "%s/out", dir);
	CHECK(mkdir(sub, 0700) == 0, "mkdir");
	fixture("out/TransformParameters.0.txt", "(Transform \"TranslationTransform\")\n"
	                                         "(TransformParameters 1 1)\n");
	fixture("out/TransformParameters.10.txt", "(Transform \"TranslationTransform\")\n"
	                                          "(TransformParameters 10 10)\n");
	fixture("out/TransformParameters.2.txt", "(Transform \"TranslationTransform\")\n"
	                                         "(TransformParameters 2 2)\n");
	CHECK(sf_transform_load(sub, NULL, &t, &e) == SF_OK, "folder: %s", e.msg);
	CHECK_MAP(&t.map, 0, 0, 10, 10, 1e-12, "folder picks .10");
	sf_transform_release(&t);

	struct {
		const char *text, *want;
	} bad[] = {
	    {"(Transform \"EulerTransform\")\n(TransformParameters 0.1 1\n", "bad.txt:2:"},
	    {"(Transform \"EulerTransform\")\n\n(TransformParameters 0.1 x 2)\n", "bad.txt:3:"},
	    {"(Transform \"EulerTransform\")\n(TransformParameters 0.1 1 2 3)\n", "bad.txt:2:"},
	    {"(Transform \"EulerTransform\")\n(NumberOfParameters 4)\n"
	     "(TransformParameters 0.1 1 2)\n",
	     "bad.txt:3:"},
	    {"(Transform \"SplineKernelTransform\")\n(TransformParameters 1)\n", "bad.txt:1:"},
	    {"(Transform \"TranslationTransform\")\n(TransformParameters 1 1)\n"
	     "(InitialTransformParametersFileName \"missing.txt\")\n",
	     "bad.txt:3:"},
	    {"(Transform \"TranslationTransform\")\n(TransformParameters 1 1)\n"
	     "(FixedImageDimension 3)\n",
	     "bad.txt:3:"},
	    {"(Transform \"TranslationTransform\")\n junk\n", "bad.txt:2:"},
	    {"(Transform \"TranslationTransform\")\n(TransformParameters 1 1)\n"
	     "(Spacing 1 1 1)\n",
	     "bad.txt:3:"},
	    {"(Transform \"TranslationTransform\")\n(TransformParameters 1 1)\n"
	     "(InitialTransformParametersFileName \"bad.txt\")\n",
	     "deeper than"},
	    {"(Transform \"BSplineTransform\")\n(GridSize 4 4)\n(GridSpacing 1 1)\n"
	     "(GridOrigin 0 0)\n(TransformParameters 1 2 3)\n",
	     "bad.txt:5:"},
	};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		p = fixture("bad.txt", bad[i].text);
		nmade--;
		memset(&e, 0, sizeof e);
		int rc = sf_transform_load(p, NULL, &t, &e);
		CHECK(rc != SF_OK && strstr(e.msg, bad[i].want), "bad elastix %zu: rc %d, '%s'", i,
		      rc, e.msg);
		CHECK(t.ngrids == 0, "released");
	}
	nmade++;
}

/* wsireg's *_transformations.json: each key an elastix map or a list of them
 * (an edge's list applies in list order, as elastix chains them), the LAST
 * key applied first; the key "initial" holds separate steps, last first. */
static const char wsireg_file[] =
    "{\n"
    " \"initial-mov-00\": {\"Transform\": [\"TranslationTransform\"],\n"
    "   \"NumberOfParameters\": [\"2\"], \"TransformParameters\": [\"3\", \"-1\"],\n"
    "   \"Spacing\": [\"2\", \"2\"]},\n"
    " \"000-to-mid\": [\n"
    "  {\"Transform\": [\"EulerTransform\"], \"TransformParameters\": [\"0.3\", \"4.5\", "
    "\"-2.25\"],\n"
    "   \"CenterOfRotationPoint\": [\"20\", \"15\"], \"Spacing\": [\"1\", \"1\"]},\n"
    "  {\"Transform\": [\"AffineTransform\"],\n"
    "   \"TransformParameters\": [\"1.1\", \"0.2\", \"-0.1\", \"0.9\", \"3\", \"4\"],\n"
    "   \"CenterOfRotationPoint\": [\"10\", \"10\"],\n"
    "   \"InitialTransformParametersFileName\": [\"0\"]}\n"
    " ],\n"
    " \"skipped\": null, \"empty\": [],\n"
    " \"001-to-ref\": [\n"
    "  {\"Transform\": [\"SimilarityTransform\"], \"NumberOfParameters\": [4],\n"
    "   \"TransformParameters\": [\"1.2\", \"-0.4\", \"1\", \"2\"],\n"
    "   \"CenterOfRotationPoint\": [\"5\", \"6\"], \"Spacing\": [\"0.5\", \"0.5\"],\n"
    "   \"Origin\": [\"0\", \"0\"], \"Size\": [\"100\", \"80\"]}\n"
    " ]\n"
    "}\n";

static void test_wsireg(void)
{
	sf_err e;
	sf_transform t;
	const char *p = fixture("proj-mov_to_ref_transformations.json", wsireg_file);
	CHECK(sf_transform_load(p, NULL, &t, &e) == SF_OK, "wsireg: %s", e.msg);
	for (int k = 0; k < 3; k++) {
		double x = 10 + 17 * k, y = 5 + 23 * k, qx, qy, rx, ry;
		/* the file's last map gives the output geometry: spacing 0.5 */
		euler(-0.4, 1.2, (double[]){1, 2}, (double[]){5, 6}, 0.5 * x, 0.5 * y, &qx, &qy);
		euler(0.3, 1, (double[]){4.5, -2.25}, (double[]){20, 15}, qx, qy, &rx, &ry);
		qx = 1.1 * (rx - 10) + 0.2 * (ry - 10) + 10 + 3;
		qy = -0.1 * (rx - 10) + 0.9 * (ry - 10) + 10 + 4;
		qx += 3;
		qy -= 1;
		/* the moving slide takes the reference's geometry */
		CHECK_MAP(&t.map, x, y, qx / 0.5, qy / 0.5, 1e-9, "wsireg order and units");
	}
	sf_transform_release(&t);
	sf_tf_units u = {{0.25, 0.25}, {2, 2}};
	CHECK(sf_transform_load(p, &u, &t, &e) == SF_OK, "wsireg units: %s", e.msg);
	{
		double qx, qy, rx, ry;
		euler(-0.4, 1.2, (double[]){1, 2}, (double[]){5, 6}, 0.25 * 8, 0.25 * 12, &qx, &qy);
		euler(0.3, 1, (double[]){4.5, -2.25}, (double[]){20, 15}, qx, qy, &rx, &ry);
		qx = 1.1 * (rx - 10) + 0.2 * (ry - 10) + 10 + 3 + 3;
		qy = -0.1 * (rx - 10) + 0.9 * (ry - 10) + 10 + 4 - 1;
		CHECK_MAP(&t.map, 8, 12, qx / 2, qy / 2, 1e-9, "wsireg with caller pixel sizes");
	}
	sf_transform_release(&t);

	/* "initial" as a list: separate steps, the last applied first */
	p = fixture("init_transformations.json",
	            "{\"initial\": [\n"
	            " {\"Transform\": [\"TranslationTransform\"], \"TransformParameters\": [\"1\", "
	            "\"0\"]},\n"
	            " {\"Transform\": [\"EulerTransform\"],\n"
	            "  \"TransformParameters\": [\"1.5707963267948966\", \"0\", \"0\"]}]}\n");
	CHECK(sf_transform_load(p, NULL, &t, &e) == SF_OK, "wsireg initial: %s", e.msg);
	/* rotate (1, 2) by 90 degrees -> (-2, 1), then translate -> (-1, 1) */
	CHECK_MAP(&t.map, 1, 2, -1, 1, 1e-9, "wsireg initial list order");
	sf_transform_release(&t);

	struct {
		const char *text, *want;
	} bad[] = {
	    {"{\"e\": [\n {\"Transform\": [\"EulerTransform\"]}\n]}\n",
	     "bad_transformations.json:2: the elastix map has no \"TransformParameters\""},
	    {"{\"e\": [{\"Transform\": [\"EulerTransform\"],\n"
	     " \"TransformParameters\": [\"0.1\", \"x\", \"2\"]}]}\n",
	     "bad_transformations.json:2:"},
	    {"{\"e\": [{\"Transform\": [\"EulerTransform\"],\n"
	     " \"TransformParameters\": [[\"0.1\"]]}]}\n",
	     "bad_transformations.json:2: elastix map values must be strings"},
	    {"{\"a\": {\"Transform\": [\"TranslationTransform\"], \"TransformParameters\": "
	     "[\"1\", \"2\"]},\n \"e\": [1, 2]}\n",
	     "bad_transformations.json:2: \"e\" must hold elastix maps"},
	    {"{\"a\": null,\n \"b\": []}\n", "bad_transformations.json:1: no elastix maps"},
	    {"{\"e\": [{\"Transform\": [\"EulerTransform\"], \"TransformParameters\": "
	     "[\"0.1\", \"1\", \"2\"],\n \"FixedImageDimension\": [\"3\"]}]}\n",
	     "bad_transformations.json:2: 3D"},
	    {"{}\n", "no \"scopefs_transform\""},
	};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		p = fixture("bad_transformations.json", bad[i].text);
		nmade--;
		memset(&e, 0, sizeof e);
		int rc = sf_transform_load(p, NULL, &t, &e);
		CHECK(rc != SF_OK && strstr(e.msg, bad[i].want), "bad wsireg %zu: rc %d, '%s'", i,
		      rc, e.msg);
		CHECK(t.ngrids == 0 && t.map.nfields == 0, "released");
	}
	nmade++;
}

/* MetaImage fields (metaimage.h), the data of elastix's
 * DeformationFieldTransform: values and grid map of a small field; a header
 * whose DimSize claims more nodes than its data file holds is refused
 * before allocating (found in the fuzzing pass, tests/fuzz/fuzz_metaimage.c: 2^20 x
 * 2^20 nodes asked for an 8 TiB allocation). */
static void test_metaimage(void)
{
	sf_err e;
	sf_field_grid *g = NULL;
	double gmap[6];
	const float raw[12] = {0, 0, 1, 0, 2, 0, 0, 2, 1, 2, 2, 2};
	char *rawp = made[nmade++];
	snprintf(rawp, sizeof made[0], "%s/d.raw", dir);
	FILE *f = fopen(rawp, "wb");
	CHECK(f && fwrite(raw, sizeof raw, 1, f) == 1 && fclose(f) == 0, "write %s", rawp);
	const char *p = fixture("d.mhd", "NDims = 2\nDimSize = 3 2\nElementNumberOfChannels = 2\n"
	                                 "ElementType = MET_FLOAT\nElementSpacing = 4 5\n"
	                                 "Offset = 10 20\nElementDataFile = d.raw\n");
	CHECK(sf_metaimage_read_field(p, &g, gmap, &e) == SF_OK, "mhd: %s", e.msg);
	if (g) {
		CHECK(g->w == 3 && g->h == 2 && g->v[2] == 1 && g->v[11] == 2, "mhd values");
		CHECK(near(gmap[0], 0.25, 1e-15) && near(gmap[2], -2.5, 1e-12) &&
		          near(gmap[4], 0.2, 1e-15) && near(gmap[5], -4, 1e-12),
		      "mhd grid map");
		sf_field_grid_free(g);
	}
	p = fixture("d.mhd", "NDims = 2\nDimSize = 1048576 1048576\n"
	                     "ElementNumberOfChannels = 2\nElementType = MET_FLOAT\n"
	                     "ElementDataFile = d.raw\n");
	nmade--;
	memset(&e, 0, sizeof e);
	int rc = sf_metaimage_read_field(p, &g, gmap, &e);
	CHECK(rc == SF_EFORMAT && !g && strstr(e.msg, "d.raw: field data is short"),
	      "DimSize beyond the data: rc %d, '%s'", rc, e.msg);
}

/* Whether files lists exactly dir/names[0..n), in that order. */
static int files_are(const sf_tf_files *files, const char *const *names, size_t n)
{
	char p[192];
	if (files->count != n)
		return 0;
	for (size_t i = 0; i < n; i++) {
		snprintf(p, sizeof p, "%s/%s", dir, names[i]);
		if (strcmp(files->paths[i], p) != 0)
			return 0;
	}
	return 1;
}

static void print_files(const char *what, const sf_tf_files *files)
{
	printf("%s lists %zu files:\n", what, files->count);
	for (size_t i = 0; i < files->count; i++)
		printf("  %s\n", files->paths[i]);
}

/* Check that loading name lists the files want (in read order), and free. */
#define CHECK_FILES(name, ...)                                                                     \
	do {                                                                                       \
		static const char *const want_[] = {__VA_ARGS__};                                  \
		size_t n_ = sizeof want_ / sizeof want_[0];                                        \
		char p_[192];                                                                      \
		sf_transform t_;                                                                   \
		sf_tf_files f_;                                                                    \
		sf_err e_;                                                                         \
		snprintf(p_, sizeof p_, "%s/%s", dir, (name));                                     \
		int rc_ = sf_transform_load_files(p_, NULL, &t_, &f_, &e_);                        \
		CHECK(rc_ == SF_OK, "%s: %s", (name), e_.msg);                                     \
		int ok_ = rc_ == SF_OK && files_are(&f_, want_, n_);                               \
		CHECK(ok_, "%s: not the %zu files expected", (name), n_);                          \
		if (!ok_)                                                                          \
			print_files((name), &f_);                                                  \
		sf_tf_files_free(&f_);                                                             \
		sf_transform_release(&t_);                                                         \
	} while (0)

/* sf_transform_load_files lists every file a load reads, for the mount to
 * watch: rewriting a chained elastix file, a field TIFF or a deformation
 * field's .mhd or .raw changes the warp as much as rewriting the transform
 * file (they used to be left out, so a pipeline rewriting only them got
 * the old warp with no error).  Each file once; none after a failure. */
static void test_files(void)
{
	const float raw[8] = {0};
	char sub[128];

	fixture_bytes("lf.raw", raw, sizeof raw);
	fixture("lf.mhd", "NDims = 2\nDimSize = 2 2\nElementNumberOfChannels = 2\n"
	                  "ElementType = MET_FLOAT\nElementDataFile = lf.raw\n");
	fixture("li.txt", "(Transform \"TranslationTransform\")\n(NumberOfParameters 2)\n"
	                  "(TransformParameters 1 2)\n");
	fixture("lt.txt", "(Transform \"DeformationFieldTransform\")\n"
	                  "(DeformationFieldFileName \"lf.mhd\")\n"
	                  "(DeformationFieldInterpolationOrder 1)\n"
	                  "(InitialTransformParametersFileName \"li.txt\")\n");
	CHECK_FILES("lt.txt", "lt.txt", "lf.mhd", "lf.raw", "li.txt");

	snprintf(made[nmade++], sizeof made[0], "%s/lj.tif", dir);
	CHECK(write_field_tiff(made[nmade - 1], 4, 4, 0, 0, (double[]){0, 0, 0},
	                       (double[]){0, 0, 0}) == 0,
	      "write lj.tif");
	fixture("lj.json", "{\"scopefs_transform\": 1, \"matrix\": [[1, 0, 0], [0, 1, 0]],\n"
	                   " \"field\": {\"file\": \"lj.tif\"}}\n");
	CHECK_FILES("lj.json", "lj.json", "lj.tif");

	/* wsireg: two maps name one field, listed once */
	fixture("lw_transformations.json",
	        "{\"a\": [{\"Transform\": [\"DeformationFieldTransform\"],\n"
	        "  \"DeformationFieldFileName\": [\"lf.mhd\"],\n"
	        "  \"DeformationFieldInterpolationOrder\": [\"1\"]},\n"
	        " {\"Transform\": [\"DeformationFieldTransform\"],\n"
	        "  \"DeformationFieldFileName\": [\"lf.mhd\"],\n"
	        "  \"DeformationFieldInterpolationOrder\": [\"1\"]}]}\n");
	CHECK_FILES("lw_transformations.json", "lw_transformations.json", "lf.mhd", "lf.raw");

	/* an elastix folder: the folder, then the file chosen in it (watching
	 * the folder alone misses an in-place rewrite of that file) */
	snprintf(sub, sizeof sub, "%s/ld", dir);
	CHECK(mkdir(sub, 0700) == 0, "mkdir %s", sub);
	fixture("ld/TransformParameters.0.txt",
	        "(Transform \"TranslationTransform\")\n"
	        "(NumberOfParameters 2)\n(TransformParameters 1 2)\n");
	fixture("ld/TransformParameters.1.txt",
	        "(Transform \"TranslationTransform\")\n(NumberOfParameters 2)\n"
	        "(TransformParameters 3 4)\n"
	        "(InitialTransformParametersFileName \"TransformParameters.0.txt\")\n");
	CHECK_FILES("ld", "ld", "ld/TransformParameters.1.txt", "ld/TransformParameters.0.txt");

	/* a failed load lists nothing */
	sf_transform t;
	sf_tf_files f;
	sf_err e;
	const char *bad = fixture("lb.txt", "(Transform \"TranslationTransform\")\n"
	                                    "(NumberOfParameters 2)\n(TransformParameters 1 2)\n"
	                                    "(InitialTransformParametersFileName \"none.txt\")\n");
	CHECK(sf_transform_load_files(bad, NULL, &t, &f, &e) == SF_ENOTFOUND && f.count == 0 &&
	          !f.paths,
	      "a failed load: %zu files, '%s'", f.count, e.msg);
}

/* A FIFO where a transform file, a field TIFF or a MetaImage data file is
 * expected is refused at once: opening it used to block forever (found in
 * the fuzzing pass, tests/fuzz/, reviewing what the formats may name). */
static void test_special_files(void)
{
	sf_err e;
	sf_transform t;
	sf_field_grid *g = NULL;
	double gmap[6];
	char *fifo = made[nmade++];
	snprintf(fifo, sizeof made[0], "%s/fifo.json", dir);
	CHECK(mkfifo(fifo, 0600) == 0, "mkfifo %s", fifo);
	int rc = sf_transform_load(fifo, NULL, &t, &e);
	CHECK(rc == SF_EFORMAT && strstr(e.msg, "fifo.json: not a regular file"),
	      "a FIFO as the transform file: rc %d, '%s'", rc, e.msg);
	const char *p = fixture("ff.json", "{\"scopefs_transform\": 1, \"matrix\": [[1, 0, 0], "
	                                   "[0, 1, 0]],\n \"field\": {\"file\": \"fifo.json\"}}");
	rc = sf_transform_load(p, NULL, &t, &e);
	CHECK(rc == SF_ENOTFOUND && strstr(e.msg, "fifo.json: no such regular file"),
	      "a FIFO as the field TIFF: rc %d, '%s'", rc, e.msg);
	p = fixture("ff.mhd", "NDims = 2\nDimSize = 3 2\nElementNumberOfChannels = 2\n"
	                      "ElementType = MET_FLOAT\nElementDataFile = fifo.json\n");
	rc = sf_metaimage_read_field(p, &g, gmap, &e);
	CHECK(rc == SF_EIO && !g && strstr(e.msg, "ff.mhd:5: cannot open the data file fifo.json"),
	      "a FIFO as the MetaImage data: rc %d, '%s'", rc, e.msg);
}

static void test_itk(void)
{
	sf_err e;
	sf_transform t;
	const char *p = fixture("a.tfm", "#Insight Transform File V1.0\n"
	                                 "#Transform 0\n"
	                                 "Transform: AffineTransform_double_2_2\n"
	                                 "Parameters: 1.1 0.2 -0.1 0.9 3 4\n"
	                                 "FixedParameters: 10 10\n");
	CHECK(sf_transform_load(p, NULL, &t, &e) == SF_OK, "itk affine: %s", e.msg);
	double x = 30, y = -12;
	double ax = 1.1 * (x - 10) + 0.2 * (y - 10) + 10 + 3;
	double ay = -0.1 * (x - 10) + 0.9 * (y - 10) + 10 + 4;
	CHECK_MAP(&t.map, x, y, ax, ay, 1e-9, "itk affine about centre");
	sf_transform_release(&t);
	/* composite: T0(T1(x)), the last listed applied first */
	p = fixture("c.tfm", "#Insight Transform File V1.0\n"
	                     "#Transform 0\nTransform: CompositeTransform_double_2_2\n"
	                     "#Transform 1\nTransform: Rigid2DTransform_double_2_2\n"
	                     "Parameters: 1.5707963267948966 0 0\nFixedParameters: 0 0\n"
	                     "#Transform 2\nTransform: TranslationTransform_double_2_2\n"
	                     "Parameters: 5 0\nFixedParameters: \n");
	CHECK(sf_transform_load(p, NULL, &t, &e) == SF_OK, "itk composite: %s", e.msg);
	/* translate (1, 2) -> (6, 2), then rotate 90 degrees -> (-2, 6) */
	CHECK_MAP(&t.map, 1, 2, -2, 6, 1e-9, "composite order");
	sf_transform_release(&t);
	sf_tf_units u = {{2, 2}, {4, 4}};
	p = fixture("s.tfm", "#Insight Transform File V1.0\n#Transform 0\n"
	                     "Transform: Similarity2DTransform_double_2_2\n"
	                     "Parameters: 2 0 1 1\nFixedParameters: 0 0\n");
	CHECK(sf_transform_load(p, &u, &t, &e) == SF_OK, "itk similarity: %s", e.msg);
	/* pixel 3 -> physical 6 -> 2 * 6 + 1 = 13 -> moving pixel 13 / 4 */
	CHECK_MAP(&t.map, 3, 3, 13.0 / 4, 13.0 / 4, 1e-12, "itk physical units");
	sf_transform_release(&t);
	/* A displacement field as ITK's text writer stores it: 3 x 2 nodes,
	 * origin (10, 20), spacing (4, 5); node (i, j) displaces by (i, 2 j). */
	p = fixture("f.tfm", "#Insight Transform File V1.0\n"
	                     "#Transform 0\nTransform: CompositeTransform_double_2_2\n"
	                     "#Transform 1\nTransform: DisplacementFieldTransform_double_2_2\n"
	                     "Parameters: 0 0 1 0 2 0 0 2 1 2 2 2\n"
	                     "FixedParameters: 3 2 10 20 4 5 1 0 0 1\n"
	                     "#Transform 2\nTransform: TranslationTransform_double_2_2\n"
	                     "Parameters: 1 0\nFixedParameters: \n");
	CHECK(sf_transform_load(p, NULL, &t, &e) == SF_OK, "itk field: %s", e.msg);
	/* (15, 22.5) -> translate -> (16, 22.5) = node (1.5, 0.5): + (1.5, 1) */
	CHECK_MAP(&t.map, 15, 22.5, 17.5, 23.5, 1e-6, "itk field, bilinear between nodes");
	/* (17, 25) -> translate -> (18, 25) = node (2, 1) exactly: + (2, 2) */
	CHECK_MAP(&t.map, 17, 25, 20, 27, 1e-6, "itk field at a node");
	sf_transform_release(&t);
	struct {
		const char *text, *want;
	} bad[] = {
	    {"#Insight Transform File V1.0\nTransform: AffineTransform_double_2_2\n"
	     "Parameters: 1 0 0 1 0\nFixedParameters: 0 0\n",
	     "bad.tfm:2:"},
	    {"#Insight Transform File V1.0\nTransform: DisplacementFieldTransform_double_2_2\n"
	     "Parameters: 0 0 1 0\nFixedParameters: 3 2 0 0 1 1 1 0 0 1\n",
	     "bad.tfm:2:"},
	    {"#Insight Transform File V1.0\nTransform: DisplacementFieldTransform_double_2_2\n"
	     "Parameters: 0 0\nFixedParameters: 1 1 0 0 1 1\n",
	     "bad.tfm:2:"},
	    {"#Insight Transform File V1.0\nTransform: AffineTransform_double_2_2\n"
	     "Parameters: 1 0 0 1 0 zz\n",
	     "bad.tfm:3:"},
	    {"#Insight Transform File V1.0\nTransform: AffineTransform_double_3_3\n"
	     "Parameters: 1 0 0 0 1 0 0 0 1 0 0 0\n",
	     "bad.tfm:2:"},
	    {"#Insight Transform File V1.0\nTransform: BSplineTransform_double_2_2\n",
	     "bad.tfm:2:"},
	    {"#Insight Transform File V1.0\n\nParameters: 1 2\n", "bad.tfm:3:"},
	    {"#Insight Transform File V1.0\nTransform: TranslationTransform_double_2_2\n"
	     "Parameters: 1 2\nWhat: 3\n",
	     "bad.tfm:4:"},
	    /* found in the fuzzing pass (tests/fuzz/): finite values whose grid map
	     * overflows (origin / spacing = inf) were loaded */
	    {"#Insight Transform File V1.0\nTransform: DisplacementFieldTransform_double_2_2\n"
	     "Parameters: 0 0\nFixedParameters: 1 1 1e300 0 1e-300 1 1 0 0 1\n",
	     "bad.tfm: the transform's values overflow"},
	};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		p = fixture("bad.tfm", bad[i].text);
		nmade--;
		memset(&e, 0, sizeof e);
		int rc = sf_transform_load(p, NULL, &t, &e);
		CHECK(rc != SF_OK && strstr(e.msg, bad[i].want), "bad itk %zu: rc %d, '%s'", i, rc,
		      e.msg);
	}
	nmade++;
	CHECK(sf_transform_load("/nonexistent/x.json", NULL, &t, &e) == SF_ENOTFOUND &&
	          strstr(e.msg, "/nonexistent/x.json"),
	      "missing file: %s", e.msg);
}

/* Files written on Windows: a byte order mark before any format, and an
 * elastix chain naming its initial transform by a Windows path. */
static void test_windows_files(void)
{
	sf_err e;
	sf_transform t;
	double x = 30, y = -12;
	double ax = 1.1 * (x - 10) + 0.2 * (y - 10) + 10 + 3;
	double ay = -0.1 * (x - 10) + 0.9 * (y - 10) + 10 + 4;
	const char *files[][2] = {
	    {"bom.json", "\xEF\xBB\xBF{\"scopefs_transform\": 1,\n"
	                 " \"matrix\": [[1.1, 0.2, 0], [-0.1, 0.9, 6], [0, 0, 1]]}\n"},
	    {"bom.tfm", "\xEF\xBB\xBF#Insight Transform File V1.0\n#Transform 0\n"
	                "Transform: AffineTransform_double_2_2\n"
	                "Parameters: 1.1 0.2 -0.1 0.9 3 4\nFixedParameters: 10 10\n"},
	    {"bom.txt", "\xEF\xBB\xBF(Transform \"AffineTransform\")\n(NumberOfParameters 6)\n"
	                "(TransformParameters 1.1 0.2 -0.1 0.9 3 4)\n"
	                "(CenterOfRotationPoint 10 10)\n"},
	};
	for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
		const char *p = fixture(files[i][0], files[i][1]);
		CHECK(sf_transform_load(p, NULL, &t, &e) == SF_OK, "%s with a BOM: %s", files[i][0],
		      e.msg);
		CHECK_MAP(&t.map, x, y, ax, ay, 1e-9, "a BOM changes nothing");
		sf_transform_release(&t);
	}
	fixture("w0.txt", "(Transform \"AffineTransform\")\n(NumberOfParameters 6)\n"
	                  "(TransformParameters 1.1 0.2 -0.1 0.9 3 4)\n"
	                  "(CenterOfRotationPoint 10 10)\n");
	const char *w1 = fixture("w1.txt", "(Transform \"TranslationTransform\")\n"
	                                   "(NumberOfParameters 2)\n(TransformParameters 5 -7)\n"
	                                   "(InitialTransformParametersFileName "
	                                   "\"C:\\Users\\me\\elastix_out\\w0.txt\")\n");
	CHECK(sf_transform_load(w1, NULL, &t, &e) == SF_OK, "windows path in a chain: %s", e.msg);
	CHECK_MAP(&t.map, x, y, ax + 5, ay - 7, 1e-9, "chain through a windows path");
	sf_transform_release(&t);
}

/* Files the detection would hand to the elastix reader get a message their
 * writer understands: UTF-16 (with or without a BOM), empty, a JSON array,
 * a .json file that is no JSON object. */
static void test_misfit_files(void)
{
	static const char utf16[] = "\xFF\xFE{\0\n\0}\0";
	static const char utf16_nobom[] = "(\0T\0r\0a\0n\0s\0";
	struct {
		const char *name, *bytes;
		size_t n;
		const char *want;
	} cases[] = {
	    {"u16.json", utf16, sizeof utf16 - 1,
	     "u16.json: UTF-16 text, not a transform: save it "
	     "as UTF-8"},
	    {"u16.txt", utf16_nobom, sizeof utf16_nobom - 1, "u16.txt: UTF-16 text"},
	    {"empty.json", "", 0, "empty.json: empty file, not a transform"},
	    {"blank.txt", " \n\n", 3, "blank.txt: empty file, not a transform"},
	    {"arr.json", "[[1, 0, 0], [0, 1, 0]]\n", 22, "arr.json:1: not a JSON object"},
	    {"arr.txt", " [1]", 4, "arr.txt:1: not a JSON object"},
	    {"word.json", "matrix 1 0 0\n", 13, "word.json:1: not a JSON object"},
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		sf_err e = {0};
		sf_transform t;
		const char *p = fixture_bytes(cases[i].name, cases[i].bytes, cases[i].n);
		int rc = sf_transform_load(p, NULL, &t, &e);
		CHECK(rc == SF_EFORMAT && strstr(e.msg, cases[i].want), "%s: rc %d, '%s'",
		      cases[i].name, rc, e.msg);
	}
}

int main(void)
{
	snprintf(dir, sizeof dir, "/tmp/sf_transform_XXXXXX");
	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		return 1;
	}
	test_matrices();
	test_composition();
	test_add();
	test_levels();
	test_json();
	test_elastix();
	test_itk();
	test_metaimage();
	test_special_files();
	test_files();
	test_wsireg();
	test_windows_files();
	test_misfit_files();
	for (int i = nmade - 1; i >= 0; i--)
		unlink(made[i]);
	char sub[128];
	snprintf(sub, sizeof sub, "%s/out", dir);
	rmdir(sub);
	snprintf(sub, sizeof sub, "%s/ld", dir);
	rmdir(sub);
	rmdir(dir);
	return CHECK_DONE("test_transform");
}

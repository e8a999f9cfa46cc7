/* test_register_mi.c — unit tests of the mutual-information metric and
 * refinement (sf_reg_mi, metric SF_REG_METRIC_MI of register.h), and a
 * driver for tests/integration/test_register_mi_oracle.py.
 *
 * Without arguments: MI values worked out by hand (two-valued images, where
 * the B-spline windows of the two moving values do not overlap, give
 * exactly log 2, and independent halves give 0), and registration of pairs
 * whose truth needs no interpolation (90-degree rotations, mirrors and
 * whole-pixel shifts by index permutation) where the moving intensities
 * are a non-monotonic function of the reference's.
 *
 * Drivers (images are raw little-endian float32, RW x RH and MW x MH):
 *   --pair REF MOV RW RH MW MH MODEL METRIC OUT.json
 *       sf_reg_normalise (1st to 99.5th percentile) on both, then
 *       sf_reg_init_similarity and sf_reg_refine with MODEL ("similarity" or
 *       "affine") and METRIC ("ncc" or "mi"); writes the map, the init's map,
 *       NCC, MI, overlap and times as JSON.
 *   --mi REF MOV RW RH MW MH BINS M0 M1 M2 M3 M4 M5
 *       prints "mi overlap" of sf_reg_mi at the map [M0 M1 M2; M3 M4 M5],
 *       on the images as given, no mask. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "reg_fixture.h"
#include "scopefs/register.h"

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static double rnd(void) /* xorshift64*, uniform in [0, 1) */
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return (double)((rng_state * 2685821657736338717ull) >> 11) / 9007199254740992.0;
}

/* --- MI values ---------------------------------------------------------------- */

static void test_mi_values(void)
{
	sf_err e = {0};
	sf_reg_image a, b, c;
	uint32_t w = 32, h = 24;
	CHECK(!sf_reg_image_alloc(&a, w, h, &e) && !sf_reg_image_alloc(&b, w, h, &e) &&
	          !sf_reg_image_alloc(&c, w, h, &e),
	      "alloc: %s", e.msg);
	for (uint32_t y = 0; y < h; y++)
		for (uint32_t x = 0; x < w; x++) {
			a.px[y * w + x] = x < w / 2 ? 0.0f : 1.0f;
			b.px[y * w + x] = x < w / 2 ? 3.0f : -2.0f; /* a's halves, order swapped */
			c.px[y * w + x] = y < h / 2 ? 0.0f : 1.0f;  /* independent of a */
		}
	double id[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1}, ov = 0;
	for (int bins = 8; bins <= 64; bins *= 2) {
		/* The moving values sit at window centres 2 and bins - 3: their
		 * windows share no bin, so p(a, b) = p(b) and MI = H(a) = log 2. */
		double mi = sf_reg_mi(&a, NULL, &b, id, bins, &ov);
		CHECK(fabs(mi - log(2.0)) < 1e-9, "bins %d: MI %.12f, want log 2", bins, mi);
		CHECK(ov == 1, "overlap %g", ov);
		mi = sf_reg_mi(&a, NULL, &c, id, bins, NULL);
		CHECK(fabs(mi) < 1e-12, "bins %d: independent MI %g", bins, mi);
	}
	/* Shifted by 8 px: the source of the last 8 columns is outside. */
	double sh[9] = {1, 0, 8, 0, 1, 0, 0, 0, 1};
	double mi = sf_reg_mi(&a, NULL, &b, sh, 32, &ov);
	CHECK(fabs(ov - 24.0 / 32) < 1e-12, "shifted overlap %g (0.75)", ov);
	/* used a: 16 columns of 0, 8 of 1; b: 8 + 8 columns of 3 then 8 of -2:
	 * a = 0 -> b = 3 or -2 (half each), a = 1 -> b = -2. */
	/* p(0,3) = 1/3, p(0,-2) = 1/3, p(1,-2) = 1/3; pa = (2/3, 1/3), pb(3) = 1/3, pb(-2) = 2/3 */
	double exact = 1.0 / 3 * log((1.0 / 3) / (2.0 / 3 * 1.0 / 3)) +
	               1.0 / 3 * log((1.0 / 3) / (2.0 / 3 * 2.0 / 3)) +
	               1.0 / 3 * log((1.0 / 3) / (1.0 / 3 * 2.0 / 3));
	CHECK(fabs(mi - exact) < 1e-9, "shifted MI %.12f, want %.12f", mi, exact);
	uint8_t *mask = calloc((size_t)w * h, 1);
	CHECK(mask != NULL, "mask");
	if (mask) {
		mi = sf_reg_mi(&a, mask, &b, id, 32, &ov);
		CHECK(mi == 0 && ov == 0, "empty mask: MI %g overlap %g", mi, ov);
		free(mask);
	}
	for (size_t i = 0; i < (size_t)w * h; i++)
		c.px[i] = 5;
	CHECK(sf_reg_mi(&a, NULL, &c, id, 32, NULL) == 0, "flat moving image: MI 0");
	CHECK(sf_reg_mi(&a, NULL, &b, id, 4, NULL) == 0, "4 bins refused");
	sf_reg_image_free(&a);
	sf_reg_image_free(&b);
	sf_reg_image_free(&c);
}

/* --- registration with exact truth, non-monotonic stain ---------------------- */

/* Three tissue classes: large blobs of "stroma" (0.4), "nuclei" (1.0) on
 * them, background 0, then blurred a little. */
static int make_tissue(uint32_t w, uint32_t h, sf_reg_image *im, sf_err *e)
{
	int rc = sf_reg_image_alloc(im, w, h, e);
	if (rc)
		return rc;
	for (int b = 0; b < 170; b++) {
		double cx = w * (0.15 + 0.7 * rnd()), cy = h * (0.15 + 0.7 * rnd());
		double s = (b < 12 ? 0.1 : 0.012) * w * (0.6 + rnd());
		float level = b < 12 ? 0.4f : 1.0f;
		int r = (int)(2 * s) + 1;
		for (int y = (int)cy - r; y <= (int)cy + r; y++)
			for (int x = (int)cx - r; x <= (int)cx + r; x++) {
				if (x < 0 || y < 0 || x >= (int)w || y >= (int)h)
					continue;
				double d2 = (x - cx) * (x - cx) + (y - cy) * (y - cy);
				float *p = &im->px[(size_t)y * w + x];
				if (d2 < s * s && *p < level && (b < 12 || *p > 0))
					*p = level;
			}
	}
	return sf_reg_gauss(im, 1.0, e);
}

/* The other stain: background mid grey, stroma bright, nuclei dark. */
static float other_stain(float v)
{
	return (float)(0.5 + 1.6 * v - 2.1 * v * v);
}

static void test_register_mi_exact(void)
{
	sf_err e = {0};
	sf_reg_image ref, stain;
	if (make_tissue(200, 160, &ref, &e) || sf_reg_image_alloc(&stain, 200, 160, &e)) {
		CHECK(0, "tissue: %s", e.msg);
		sf_reg_image_free(&ref);
		return;
	}
	for (size_t i = 0; i < (size_t)ref.w * ref.h; i++)
		stain.px[i] = other_stain(ref.px[i]);
	sf_reg_opts o;
	sf_reg_opts_default(&o);
	CHECK(o.metric == SF_REG_METRIC_NCC, "default metric NCC");
	o.metric = SF_REG_METRIC_MI;
	static const int cases[][4] = {{0, 0, 17, -23}, {1, 0, -30, 12}, {2, 1, 5, 40},
	                               {3, 1, -44, -9}, {1, 1, 0, 0},    {2, 0, 33, 3}};
	for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
		sf_reg_image mov;
		double truth[9];
		if (permuted(&stain, cases[k][0], cases[k][1], cases[k][2], cases[k][3],
		             other_stain(0), &mov, truth, &e)) {
			CHECK(0, "permute: %s", e.msg);
			continue;
		}
		o.model = k % 2 ? SF_REG_AFFINE : SF_REG_SIMILARITY;
		sf_reg_result r = {0};
		CHECK(sf_reg_register(&ref, NULL, &mov, &o, &r, &e) == SF_OK, "register: %s",
		      e.msg);
		double err = corner_error(r.m, truth, ref.w, ref.h);
		CHECK(err < 0.15, "case %zu (rot %d mirror %d): corner error %.4f px, mi %.4f", k,
		      cases[k][0] * 90, cases[k][1], err, r.mi);
		CHECK(r.mirrored == cases[k][1], "case %zu mirrored %d", k, r.mirrored);
		double mi_true = sf_reg_mi(&ref, NULL, &mov, truth, 32, NULL);
		CHECK(r.mi > 0.5 && fabs(r.mi - mi_true) < 0.02, "case %zu: mi %.4f, at truth %.4f",
		      k, r.mi, mi_true);
		sf_reg_image_free(&mov);
	}
	o.metric = 7;
	sf_reg_result r = {0};
	CHECK(sf_reg_register(&ref, NULL, &stain, &o, &r, &e) == SF_EINVAL, "metric 7 rejected");
	sf_reg_image_free(&ref);
	sf_reg_image_free(&stain);
}

/* The refinement alone, from a start several pixels and degrees off, with
 * and without a tissue mask: the analytic gradient must lead it back. */
static void test_refine_from_offset(void)
{
	sf_err e = {0};
	sf_reg_image ref, stain, mov;
	if (make_tissue(240, 200, &ref, &e) || sf_reg_image_alloc(&stain, 240, 200, &e)) {
		CHECK(0, "tissue: %s", e.msg);
		sf_reg_image_free(&ref);
		return;
	}
	for (size_t i = 0; i < (size_t)ref.w * ref.h; i++)
		stain.px[i] = other_stain(ref.px[i]);
	double truth[9];
	uint8_t *mask = malloc((size_t)ref.w * ref.h);
	if (!mask || permuted(&stain, 1, 1, 12, -7, other_stain(0), &mov, truth, &e) ||
	    sf_reg_tissue_mask(&ref, 1.0, mask, NULL, &e)) {
		CHECK(0, "setup: %s", e.msg);
		free(mask);
		sf_reg_image_free(&ref);
		sf_reg_image_free(&stain);
		return;
	}
	sf_reg_opts o;
	sf_reg_opts_default(&o);
	o.metric = SF_REG_METRIC_MI;
	double a = 3 * M_PI / 180, c = cos(a), s = sin(a);
	for (int k = 0; k < 4; k++) {
		o.model = k & 1 ? SF_REG_AFFINE : SF_REG_SIMILARITY;
		/* start = truth o (rotation by 3 degrees about the centre, 4 px off) */
		double cx = (ref.w - 1) / 2.0, cy = (ref.h - 1) / 2.0;
		double off[9] = {c, -s, cx - c * cx + s * cy + 4, s, c, cy - s * cx - c * cy - 3, 0,
		                 0, 1};
		sf_reg_result r = {0};
		sf_mat3_mul(truth, off, r.m);
		double err0 = corner_error(r.m, truth, ref.w, ref.h);
		CHECK(sf_reg_refine(&ref, k & 2 ? mask : NULL, &mov, &o, &r, &e) == SF_OK,
		      "refine: %s", e.msg);
		double err = corner_error(r.m, truth, ref.w, ref.h);
		CHECK(err < 0.15, "case %d (mask %d): corner error %.4f px from %.1f px", k, k >> 1,
		      err, err0);
		CHECK(r.mi > 0 && r.overlap > 0.5, "case %d: mi %g overlap %g", k, r.mi, r.overlap);
	}
	free(mask);
	sf_reg_image_free(&mov);
	sf_reg_image_free(&ref);
	sf_reg_image_free(&stain);
}

static int read_pair(char **argv, sf_reg_image *ref, sf_reg_image *mov, sf_err *e)
{
	int rc = read_raw(argv[2], (uint32_t)atoi(argv[4]), (uint32_t)atoi(argv[5]), ref, e);
	if (!rc)
		rc = read_raw(argv[3], (uint32_t)atoi(argv[6]), (uint32_t)atoi(argv[7]), mov, e);
	return rc;
}

static void write_map(FILE *f, const double m[9])
{
	for (int i = 0; i < 9; i++)
		fprintf(f, "%.17g%s", m[i], i < 8 ? ", " : "");
}

static int drive_pair(int argc, char **argv)
{
	if (argc < 11) {
		fprintf(stderr, "usage: %s --pair REF MOV RW RH MW MH MODEL METRIC OUT.json\n",
		        argv[0]);
		return 2;
	}
	sf_err e = {0};
	sf_reg_image ref = {0}, mov = {0};
	sf_reg_opts o;
	sf_reg_opts_default(&o);
	o.model = strcmp(argv[8], "affine") ? SF_REG_SIMILARITY : SF_REG_AFFINE;
	o.metric = strcmp(argv[9], "mi") ? SF_REG_METRIC_NCC : SF_REG_METRIC_MI;
	int rc = read_pair(argv, &ref, &mov, &e);
	if (!rc)
		rc = sf_reg_normalise(&ref, 1, 99.5, &e);
	if (!rc)
		rc = sf_reg_normalise(&mov, 1, 99.5, &e);
	sf_reg_result r = {0}, init = {0};
	double ms_init = 0, ms_all = 0;
	if (!rc)
		rc = fit_timed(&ref, NULL, &mov, &o, &init, &r, &ms_init, &ms_all, &e);
	FILE *f = rc ? NULL : fopen(argv[10], "w");
	if (!rc && !f)
		rc = sf_fail(&e, SF_EIO, "%s: cannot write", argv[10]);
	if (f) {
		fprintf(f, "{\"m\": [");
		write_map(f, r.m);
		fprintf(f, "], \"init\": [");
		write_map(f, init.m);
		fprintf(f,
		        "], \"ncc\": %.6f, \"mi\": %.6f, \"overlap\": %.6f, \"mirrored\": %d, "
		        "\"ms_init\": %.3f, \"ms\": %.3f}\n",
		        r.ncc, r.mi, r.overlap, r.mirrored, ms_init, ms_all);
		fclose(f);
	}
	sf_reg_image_free(&ref);
	sf_reg_image_free(&mov);
	if (rc)
		fprintf(stderr, "test_register_mi: %s\n", e.msg);
	return rc ? 1 : 0;
}

static int drive_mi(int argc, char **argv)
{
	if (argc < 15) {
		fprintf(stderr, "usage: %s --mi REF MOV RW RH MW MH BINS M0 .. M5\n", argv[0]);
		return 2;
	}
	sf_err e = {0};
	sf_reg_image ref = {0}, mov = {0};
	int rc = read_pair(argv, &ref, &mov, &e);
	if (!rc) {
		double m[9] = {0, 0, 0, 0, 0, 0, 0, 0, 1}, ov;
		for (int i = 0; i < 6; i++)
			m[i] = atof(argv[9 + i]);
		double mi = sf_reg_mi(&ref, NULL, &mov, m, atoi(argv[8]), &ov);
		printf("%.12f %.12f\n", mi, ov);
	} else
		fprintf(stderr, "test_register_mi: %s\n", e.msg);
	sf_reg_image_free(&ref);
	sf_reg_image_free(&mov);
	return rc ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc > 1 && !strcmp(argv[1], "--pair"))
		return drive_pair(argc, argv);
	if (argc > 1 && !strcmp(argv[1], "--mi"))
		return drive_mi(argc, argv);
	test_mi_values();
	test_register_mi_exact();
	test_refine_from_offset();
	return CHECK_DONE("test_register_mi");
}

/* test_register.c — unit tests of the registration core (register.h), and a
 * driver for tests/integration/test_register_oracle.py.
 *
 * Without arguments: preprocessing against hand-computed values, the
 * level-0 transform against the pixel-centre rule written out, and
 * registration of pairs whose truth needs no interpolation (90-degree
 * rotations, mirrors and whole-pixel shifts done by index permutation).
 *
 * Driver: test_register --register REF MOV RW RH MW MH MODEL OUT.json [MASK]
 * reads REF (RW x RH) and MOV (MW x MH) as raw little-endian float32, runs
 * sf_reg_normalise (1st to 99.5th percentile) on both, then
 * sf_reg_register with MODEL ("similarity" or "affine"), and writes the map,
 * NCC, overlap and the time taken as JSON.  With MASK (any word) the
 * reference's Otsu tissue mask restricts the fit. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "reg_fixture.h"
#include "scopefs/register.h"

/* --- deterministic synthetic tissue ---------------------------------------- */

static uint64_t rng_state = 88172645463325252ull;
static double rnd(void) /* xorshift64*, uniform in [0, 1) */
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return (double)((rng_state * 2685821657736338717ull) >> 11) / 9007199254740992.0;
}

/* Blobs of several sizes inside an irregular tissue outline, background 0. */
static int make_tissue(uint32_t w, uint32_t h, sf_reg_image *im, sf_err *e)
{
	int rc = sf_reg_image_alloc(im, w, h, e);
	if (rc)
		return rc;
	for (int b = 0; b < 160; b++) {
		double cx = w * (0.2 + 0.6 * rnd()), cy = h * (0.2 + 0.6 * rnd());
		double s = (b < 10 ? 0.08 : 0.015) * w * (0.5 + rnd()), a = 0.3 + rnd();
		int r = (int)(3 * s);
		for (int y = (int)cy - r; y <= (int)cy + r; y++)
			for (int x = (int)cx - r; x <= (int)cx + r; x++) {
				if (x < 0 || y < 0 || x >= (int)w || y >= (int)h)
					continue;
				double d2 = (x - cx) * (x - cx) + (y - cy) * (y - cy);
				im->px[(size_t)y * w + x] += (float)(a * exp(-0.5 * d2 / (s * s)));
			}
	}
	return SF_OK;
}

/* --- preprocessing ----------------------------------------------------------- */

static void test_normalise(void)
{
	sf_err e = {0};
	sf_reg_image im;
	CHECK(sf_reg_image_alloc(&im, 101, 1, &e) == SF_OK, "alloc: %s", e.msg);
	for (int i = 0; i <= 100; i++)
		im.px[i] = (float)(i * 2 + 10); /* 10 .. 210, percentile p at 10 + 2p */
	CHECK(sf_reg_normalise(&im, 10, 90, &e) == SF_OK, "normalise: %s", e.msg);
	/* lo = 30, hi = 190: value v -> (v - 30) / 160 */
	CHECK(im.px[0] == 0 && im.px[100] == 1, "clamped ends %g %g", im.px[0], im.px[100]);
	CHECK(fabsf(im.px[50] - 0.5f) < 1e-6f, "middle %g", im.px[50]);
	CHECK(fabsf(im.px[20] - 20.0f / 160) < 1e-6f, "p20 %g", im.px[20]);
	CHECK(sf_reg_normalise(&im, 50, 40, &e) == SF_EINVAL, "bad percentiles rejected");
	for (int i = 0; i <= 100; i++)
		im.px[i] = 7;
	CHECK(sf_reg_normalise(&im, 1, 99, &e) == SF_OK && im.px[3] == 0, "flat -> 0");
	sf_reg_image_free(&im);
	CHECK(sf_reg_image_alloc(&im, 0, 5, &e) == SF_EINVAL, "empty image rejected");
}

/* sf_reg_gauss against the 2D sum written out in doubles: taps to
 * ceil(3 sigma), weights exp(-t^2 / (2 sigma^2)) normalised, the edge
 * pixels repeated.  Sizes include a side narrower than the kernel. */
static double gauss_ref(const float *px, long w, long h, long x, long y, double sigma)
{
	int r = (int)ceil(3 * sigma);
	double ksum = 0, acc = 0;
	for (int t = -r; t <= r; t++)
		ksum += exp(-0.5 * t * t / (sigma * sigma));
	for (int v = -r; v <= r; v++)
		for (int u = -r; u <= r; u++) {
			long xx = x + u < 0 ? 0 : x + u >= w ? w - 1 : x + u;
			long yy = y + v < 0 ? 0 : y + v >= h ? h - 1 : y + v;
			double kk = exp(-0.5 * (u * u + v * v) / (sigma * sigma)) / (ksum * ksum);
			acc += kk * px[yy * w + xx];
		}
	return acc;
}

static void test_gauss(void)
{
	static const long sizes[][2] = {{37, 23}, {5, 40}, {64, 3}};
	static const double sigmas[] = {0.7, 2.0, 4.0};
	sf_err e = {0};
	for (size_t c = 0; c < 3; c++) {
		long w = sizes[c][0], h = sizes[c][1];
		sf_reg_image im = {0};
		CHECK(sf_reg_image_alloc(&im, (uint32_t)w, (uint32_t)h, &e) == SF_OK, "alloc");
		if (!im.px)
			continue;
		for (long i = 0; i < w * h; i++)
			im.px[i] = (float)((i * 7919) % 101) / 100.0f;
		float *orig = malloc((size_t)(w * h) * sizeof *orig);
		CHECK(orig != NULL, "alloc copy");
		if (orig) {
			memcpy(orig, im.px, (size_t)(w * h) * sizeof *orig);
			CHECK(sf_reg_gauss(&im, sigmas[c], &e) == SF_OK, "gauss: %s", e.msg);
			double worst = 0;
			for (long y = 0; y < h; y++)
				for (long x = 0; x < w; x++) {
					double d = fabs(im.px[y * w + x] -
					                gauss_ref(orig, w, h, x, y, sigmas[c]));
					worst = d > worst ? d : worst;
				}
			CHECK(worst < 1e-5, "gauss %ldx%ld sigma %g: off by %g", w, h, sigmas[c],
			      worst);
		}
		free(orig);
		sf_reg_image_free(&im);
	}
}

static void test_od(void)
{
	sf_err e = {0};
	/* white glass, mid grey, pure hematoxylin of amount 0.5 (OD = 0.5 * h / |h|) */
	static const double h[3] = {0.650, 0.704, 0.286};
	double hn = sqrt(h[0] * h[0] + h[1] * h[1] + h[2] * h[2]);
	uint8_t px[3 * 4] = {255, 255, 255, 127, 127, 127};
	for (int c = 0; c < 3; c++) {
		double od = 0.5 * h[c] / hn;
		px[6 + c] = (uint8_t)lround(256 * pow(10, -od) - 1);
	}
	px[9] = px[10] = px[11] = 0; /* black */
	sf_reg_image t, hx;
	CHECK(sf_reg_od_grey(px, sizeof px, 4, 1, 3, SF_REG_OD_TOTAL, &t, &e) == SF_OK, "od: %s",
	      e.msg);
	CHECK(t.px[0] == 0, "glass OD %g", t.px[0]);
	CHECK(fabs(t.px[1] - -log10(128 / 256.0)) < 1e-6, "grey OD %g", t.px[1]);
	CHECK(fabs(t.px[3] - log10(256.0)) < 1e-5, "black OD %g", t.px[3]);
	CHECK(sf_reg_od_grey(px, sizeof px, 4, 1, 3, SF_REG_OD_HEMATOXYLIN, &hx, &e) == SF_OK,
	      "od h: %s", e.msg);
	CHECK(fabs(hx.px[2] - 0.5) < 0.02, "hematoxylin amount %g (0.5)", hx.px[2]);
	CHECK(hx.px[0] == 0, "glass hematoxylin %g", hx.px[0]);
	CHECK(sf_reg_od_grey(px, sizeof px, 4, 1, 2, SF_REG_OD_TOTAL, &t, &e) == SF_EINVAL,
	      "2 samples rejected");
	sf_reg_image_free(&t);
	sf_reg_image_free(&hx);
}

static void test_mask(void)
{
	sf_err e = {0};
	sf_reg_image im;
	uint32_t w = 64, h = 48;
	CHECK(sf_reg_image_alloc(&im, w, h, &e) == SF_OK, "alloc");
	for (uint32_t y = 0; y < h; y++)
		for (uint32_t x = 0; x < w; x++) {
			int in = (x - 32.0) * (x - 32.0) + (y - 24.0) * (y - 24.0) < 15 * 15;
			im.px[y * w + x] = (float)((in ? 0.8 : 0.1) + 0.1 * (rnd() - 0.5));
		}
	uint8_t *mask = malloc(w * h);
	double thr = 0;
	CHECK(mask && sf_reg_tissue_mask(&im, 1.0, mask, &thr, &e) == SF_OK, "mask: %s", e.msg);
	int wrong = 0;
	for (uint32_t y = 0; y < h; y++)
		for (uint32_t x = 0; x < w; x++) {
			double d = sqrt((x - 32.0) * (x - 32.0) + (y - 24.0) * (y - 24.0));
			if (fabs(d - 15) > 2 && mask[y * w + x] != (d < 15))
				wrong++;
		}
	CHECK(wrong == 0, "mask wrong at %d pixels away from the edge", wrong);
	CHECK(thr > 0.2 && thr < 0.7, "threshold %g between the levels", thr);
	free(mask);
	sf_reg_image_free(&im);
}

/* --- level-0 transform ----------------------------------------------------- */

static void test_to_transform(void)
{
	sf_err e = {0};
	double m[9] = {0.9, -0.2, 5.5, 0.3, 1.1, -7.25, 0, 0, 1};
	double rds[2] = {8, 6}, mds[2] = {4, 5};
	sf_transform t;
	CHECK(sf_reg_to_transform(m, rds, mds, &t, &e) == SF_OK, "to_transform: %s", e.msg);
	for (int k = 0; k < 4; k++) {
		double X = 13.7 * k - 4, Y = 100 - 31.3 * k;
		/* reference level-0 -> thumbnail: x = (X + 0.5) / f - 0.5 */
		double xt = (X + 0.5) / rds[0] - 0.5, yt = (Y + 0.5) / rds[1] - 0.5;
		double sx = m[0] * xt + m[1] * yt + m[2], sy = m[3] * xt + m[4] * yt + m[5];
		double ex = (sx + 0.5) * mds[0] - 0.5, ey = (sy + 0.5) * mds[1] - 0.5, gx, gy;
		sf_map_point(&t.map, X, Y, &gx, &gy);
		CHECK(fabs(gx - ex) < 1e-9 && fabs(gy - ey) < 1e-9, "point %d: (%g %g) vs (%g %g)",
		      k, gx, gy, ex, ey);
	}
	sf_transform_release(&t);
	double bad[2] = {0, 1};
	CHECK(sf_reg_to_transform(m, bad, mds, &t, &e) == SF_EINVAL, "zero downsample rejected");
}

/* --- registration with exact truth ---------------------------------------- */

/* mov(P x + c) = ref(x) for P a signed permutation (rotation by rot * 90
 * degrees, then optionally mirrored) and c integer: mov is ref moved
 * exactly, 0 elsewhere.  m = [P c] is then the true backward map
 * (ref(x) = mov(m x)). */
static void test_register_exact(void)
{
	sf_err e = {0};
	sf_reg_image ref;
	if (make_tissue(200, 160, &ref, &e)) {
		CHECK(0, "tissue: %s", e.msg);
		return;
	}
	sf_reg_opts o;
	sf_reg_opts_default(&o);
	static const int cases[][4] = {{0, 0, 17, -23}, {1, 0, -30, 12}, {2, 1, 5, 40},
	                               {3, 1, -44, -9}, {1, 1, 0, 0},    {2, 0, 33, 3}};
	for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
		sf_reg_image mov;
		double truth[9];
		if (permuted(&ref, cases[k][0], cases[k][1], cases[k][2], cases[k][3], 0.0f, &mov,
		             truth, &e)) {
			CHECK(0, "permute: %s", e.msg);
			continue;
		}
		sf_reg_result r;
		CHECK(sf_reg_init_similarity(&ref, &mov, &o, &r, &e) == SF_OK, "init: %s", e.msg);
		double err0 = corner_error(r.m, truth, ref.w, ref.h);
		CHECK(err0 < 3, "case %zu init: corner error %.3f px", k, err0);
		CHECK(sf_reg_refine(&ref, NULL, &mov, &o, &r, &e) == SF_OK, "refine: %s", e.msg);
		double err = corner_error(r.m, truth, ref.w, ref.h);
		CHECK(err < 0.1, "case %zu (rot %d mirror %d): corner error %.4f px, ncc %.4f", k,
		      cases[k][0] * 90, cases[k][1], err, r.ncc);
		CHECK(r.mirrored == cases[k][1], "case %zu mirrored %d", k, r.mirrored);
		CHECK(fabs(r.scale - 1) < 1e-3, "case %zu scale %g", k, r.scale);
		o.model = k % 2 ? SF_REG_AFFINE : SF_REG_SIMILARITY;
		sf_reg_image_free(&mov);
	}
	sf_reg_image_free(&ref);
}

/* One registration (search, candidates, affine refinement; NCC and MI) on
 * 1, 2 and 3 threads must give the same map bit for bit: the pool splits
 * work into blocks that do not depend on the thread count (register.h). */
static void test_threads_same(void)
{
	sf_err e = {0};
	sf_reg_image ref, mov;
	double truth[9];
	if (make_tissue(320, 256, &ref, &e)) {
		CHECK(0, "tissue: %s", e.msg);
		return;
	}
	if (permuted(&ref, 1, 1, 21, -13, 0.0f, &mov, truth, &e)) {
		CHECK(0, "permute: %s", e.msg);
		sf_reg_image_free(&ref);
		return;
	}
	for (int metric = SF_REG_METRIC_NCC; metric <= SF_REG_METRIC_MI; metric++) {
		sf_reg_opts o;
		sf_reg_result one, r;
		sf_reg_opts_default(&o);
		o.model = SF_REG_AFFINE;
		o.metric = metric;
		CHECK(sf_reg_register(&ref, NULL, &mov, &o, &one, &e) == SF_OK, "register: %s",
		      e.msg);
		CHECK(corner_error(one.m, truth, ref.w, ref.h) < 0.2,
		      "metric %d: corner error %.3f", metric,
		      corner_error(one.m, truth, ref.w, ref.h));
		for (unsigned th = 2; th <= 3; th++) {
			o.threads = th;
			CHECK(sf_reg_register(&ref, NULL, &mov, &o, &r, &e) == SF_OK,
			      "register on %u threads: %s", th, e.msg);
			CHECK(!memcmp(r.m, one.m, sizeof r.m) && r.ncc == one.ncc && r.mi == one.mi,
			      "metric %d, %u threads: the same map as on one thread", metric, th);
		}
	}
	sf_reg_image_free(&mov);
	sf_reg_image_free(&ref);
}

static void test_bad_input(void)
{
	sf_err e = {0};
	sf_reg_image a, b;
	sf_reg_opts o;
	sf_reg_result r;
	sf_reg_opts_default(&o);
	CHECK(sf_reg_image_alloc(&a, 4, 4, &e) == SF_OK, "alloc");
	CHECK(sf_reg_image_alloc(&b, 64, 64, &e) == SF_OK, "alloc");
	CHECK(sf_reg_register(&a, NULL, &b, &o, &r, &e) == SF_EINVAL, "tiny image rejected");
	o.max_scale = 0.5;
	CHECK(sf_reg_register(&b, NULL, &b, &o, &r, &e) == SF_EINVAL, "bad max_scale rejected");
	sf_reg_image_free(&a);
	sf_reg_image_free(&b);
}

static int drive(int argc, char **argv)
{
	if (argc < 10) {
		fprintf(stderr, "usage: %s --register REF MOV RW RH MW MH MODEL OUT.json [MASK]\n",
		        argv[0]);
		return 2;
	}
	sf_err e = {0};
	sf_reg_image ref = {0}, mov = {0};
	uint8_t *mask = NULL;
	sf_reg_opts o;
	sf_reg_opts_default(&o);
	o.model = strcmp(argv[8], "affine") ? SF_REG_SIMILARITY : SF_REG_AFFINE;
	int rc = read_raw(argv[2], (uint32_t)atoi(argv[4]), (uint32_t)atoi(argv[5]), &ref, &e);
	if (!rc)
		rc = read_raw(argv[3], (uint32_t)atoi(argv[6]), (uint32_t)atoi(argv[7]), &mov, &e);
	/* as the mount will: background to 0, bright tissue to 1 */
	if (!rc)
		rc = sf_reg_normalise(&ref, 1, 99.5, &e);
	if (!rc)
		rc = sf_reg_normalise(&mov, 1, 99.5, &e);
	if (!rc && argc > 10) {
		mask = malloc((size_t)ref.w * ref.h);
		rc = mask ? sf_reg_tissue_mask(&ref, 2.0, mask, NULL, &e)
		          : sf_fail(&e, SF_ENOMEM, "mask");
	}
	sf_reg_result r = {0}, init = {0};
	double ms_init = 0, ms_all = 0;
	if (!rc)
		rc = fit_timed(&ref, mask, &mov, &o, &init, &r, &ms_init, &ms_all, &e);
	if (!rc) {
		FILE *f = fopen(argv[9], "w");
		if (!f)
			rc = sf_fail(&e, SF_EIO, "%s: cannot write", argv[9]);
		else {
			fprintf(f, "{\"m\": [");
			for (int i = 0; i < 9; i++)
				fprintf(f, "%.17g%s", r.m[i], i < 8 ? ", " : "");
			fprintf(f, "], \"init\": [");
			for (int i = 0; i < 9; i++)
				fprintf(f, "%.17g%s", init.m[i], i < 8 ? ", " : "");
			fprintf(f,
			        "], \"ncc\": %.6f, \"init_ncc\": %.6f, \"overlap\": %.6f, "
			        "\"mirrored\": %d, \"ms_init\": %.3f, \"ms\": %.3f}\n",
			        r.ncc, init.ncc, r.overlap, r.mirrored, ms_init, ms_all);
			fclose(f);
		}
	}
	free(mask);
	sf_reg_image_free(&ref);
	sf_reg_image_free(&mov);
	if (rc)
		fprintf(stderr, "test_register: %s\n", e.msg);
	return rc ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc > 1 && !strcmp(argv[1], "--register"))
		return drive(argc, argv);
	test_normalise();
	test_od();
	test_gauss();
	test_mask();
	test_to_transform();
	test_register_exact();
	test_threads_same();
	test_bad_input();
	return CHECK_DONE("test_register");
}

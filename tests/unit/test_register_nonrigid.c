/* test_register_nonrigid.c — unit tests of the non-rigid registration step
 * (sf_reg_nonrigid, register.h), and a driver for
 * tests/integration/test_register_nonrigid_oracle.py.
 *
 * Without arguments: an analytic image (a sum of Gaussian blobs, so it can
 * be evaluated at any point with no interpolation) seen through a known
 * smooth displacement, a gain change and a shift; the field must recover the
 * displacement.  An undeformed pair must stay near zero.  The level-0
 * transform is checked point by point against the formula written out here,
 * and bad inputs must give errors.
 *
 * Driver: test_register_nonrigid --pair REF MOV RW RH MW MH OUT [MASK]
 * reads REF (RW x RH) and MOV (MW x MH) as raw little-endian float32, runs
 * sf_reg_normalise (1st to 99.5th percentile) on both, sf_reg_register
 * (affine), then sf_reg_nonrigid with the default options, and writes
 * OUT.json (the affine map, the field's size, step, jac_min, disp_max and
 * the times) and OUT.f32 (the field's nodes).  With MASK (any word) the
 * reference's Otsu tissue mask is used by both steps. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "reg_fixture.h"
#include "scopefs/register.h"

/* --- an analytic tissue image -------------------------------------------------- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static double rnd(void) /* xorshift64*, uniform in [0, 1) */
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return (double)((rng_state * 2685821657736338717ull) >> 11) / 9007199254740992.0;
}

#define NBLOBS 400
typedef struct blobs {
	double x[NBLOBS], y[NBLOBS], s[NBLOBS], a[NBLOBS];
} blobs;

/* Blobs of several sizes (nuclei and coarser texture) over the middle of a
 * w x h frame. */
static void blobs_make(blobs *b, double w, double h)
{
	for (int i = 0; i < NBLOBS; i++) {
		b->x[i] = w * (0.15 + 0.7 * rnd());
		b->y[i] = h * (0.15 + 0.7 * rnd());
		b->s[i] = i < 40 ? 6 + 6 * rnd() : 1.5 + 1.5 * rnd();
		b->a[i] = 0.3 + 0.7 * rnd();
	}
}

static double blobs_at(const blobs *b, double x, double y)
{
	double v = 0;
	for (int i = 0; i < NBLOBS; i++) {
		double dx = x - b->x[i], dy = y - b->y[i], s2 = b->s[i] * b->s[i];
		double d2 = dx * dx + dy * dy;
		if (d2 < 16 * s2)
			v += b->a[i] * exp(-0.5 * d2 / s2);
	}
	return v;
}

/* The true displacement (thumbnail px): smooth waves of about 2.5 px. */
static void truth(double x, double y, double *dx, double *dy)
{
	*dx = 2.0 * sin(2 * M_PI * x / 150 + 0.3) * cos(2 * M_PI * y / 190) + 0.8;
	*dy = 1.8 * cos(2 * M_PI * x / 170) * sin(2 * M_PI * y / 140 + 1.0) - 0.5;
}

static double noise(void) /* about N(0, 1): a sum of 4 uniforms */
{
	return (rnd() + rnd() + rnd() + rnd() - 2) * 1.732;
}

/* --- recovery ---------------------------------------------------------------------- */

#define W 232
#define H 200

/* ref(x) = B(x + Dt(x)); mov(y) = 0.6 B(y - t) + 0.02 + noise, so with
 * m x = x + t:  mov(m (x + Dt(x))) = 0.6 ref(x) + 0.02. */
/* f (computed on one thread) again on 2 and 3 threads: bit for bit. */
static void same_on_more_threads(const sf_reg_image *ref, const uint8_t *mask,
                                 const sf_reg_image *mov, const double m[9],
                                 const sf_reg_nonrigid_opts *o1, const sf_reg_field *f,
                                 const char *what)
{
	for (unsigned th = 2; th <= 3; th++) {
		sf_reg_nonrigid_opts o = *o1;
		sf_reg_field g = {0};
		sf_err e = {0};

		o.threads = th;
		CHECK(sf_reg_nonrigid(ref, mask, mov, m, &o, &g, &e) == SF_OK, "%s, threads %u: %s",
		      what, th, e.msg);
		CHECK(g.d && g.w == f->w && g.h == f->h &&
		          !memcmp(g.d, f->d, 2 * (size_t)f->w * f->h * sizeof *f->d),
		      "%s, threads %u: the same field as on one thread", what, th);
		sf_reg_field_free(&g);
	}
}

static void test_recover(void)
{
	sf_err e = {0};
	blobs *b = malloc(sizeof *b);
	sf_reg_image ref = {0}, mov = {0};
	CHECK(b && sf_reg_image_alloc(&ref, W, H, &e) == SF_OK &&
	          sf_reg_image_alloc(&mov, W, H, &e) == SF_OK,
	      "alloc");
	if (!b || !ref.px || !mov.px)
		goto out;
	blobs_make(b, W, H);
	const double t[2] = {4.0, -3.0};
	for (int y = 0; y < H; y++)
		for (int x = 0; x < W; x++) {
			double dx, dy;
			truth(x, y, &dx, &dy);
			ref.px[y * W + x] = (float)(blobs_at(b, x + dx, y + dy) + 0.01 * noise());
			mov.px[y * W + x] =
			    (float)(0.6 * blobs_at(b, x - t[0], y - t[1]) + 0.02 + 0.01 * noise());
		}
	double m[9] = {1, 0, t[0], 0, 1, t[1], 0, 0, 1};
	sf_reg_nonrigid_opts o;
	sf_reg_nonrigid_opts_default(&o);
	sf_reg_field f = {0};
	CHECK(sf_reg_nonrigid(&ref, NULL, &mov, m, &o, &f, &e) == SF_OK, "nonrigid: %s", e.msg);
	if (!f.d)
		goto out;
	CHECK(f.w == W && f.h == H && f.step == 1, "field %ux%u step %u", f.w, f.h, f.step);
	/* endpoint error over the tissue, and the same for no field at all */
	double epe = 0, epe0 = 0, worst = 0;
	long n = 0;
	for (int y = 8; y < H - 8; y++)
		for (int x = 8; x < W - 8; x++) {
			double dx, dy, gx, gy;
			truth(x, y, &dx, &dy);
			if (blobs_at(b, x + dx, y + dy) < 0.15)
				continue;
			sf_reg_field_at(&f, x, y, &gx, &gy);
			double err = hypot(gx - dx, gy - dy);
			epe += err;
			epe0 += hypot(dx, dy);
			worst = err > worst ? err : worst;
			n++;
		}
	epe /= n;
	epe0 /= n;
	printf("recover: %ld tissue px, mean endpoint error %.3f px (%.3f px without the "
	       "field), worst %.2f, jac_min %.3f, disp_max %.2f\n",
	       n, epe, epe0, worst, f.jac_min, f.disp_max);
	CHECK(n > W * H / 8, "enough tissue pixels (%ld)", n);
	CHECK(epe < 0.25, "mean endpoint error %.3f px", epe);
	CHECK(epe0 > 1.2, "the test deformation is there (%.2f px)", epe0);
	CHECK(f.jac_min > 0.5, "no fold: jac_min %.3f", f.jac_min);
	CHECK(f.disp_max > 2 && f.disp_max < 6, "disp_max %.2f", f.disp_max);

	/* The same field, bit for bit, on 2 and 3 threads (register.h: the
	 * result does not depend on them, so cached results stay reproducible). */
	same_on_more_threads(&ref, NULL, &mov, m, &o, &f, "unmasked");
	sf_reg_field_free(&f);

	/* step 4: nodes every 4 px, the field the same where sampled */
	o.step = 4;
	CHECK(sf_reg_nonrigid(&ref, NULL, &mov, m, &o, &f, &e) == SF_OK, "step 4: %s", e.msg);
	CHECK(f.w == (W + 3) / 4 && f.h == (H + 3) / 4 && f.step == 4, "step 4 grid %ux%u", f.w,
	      f.h);
	if (f.d) {
		double dx, dy, gx, gy;
		truth(101.5, 81.5, &dx, &dy);
		sf_reg_field_at(&f, 101.5, 81.5, &gx, &gy);
		CHECK(hypot(gx - dx, gy - dy) < 0.5, "step 4 at a node: %.2f %.2f vs %.2f %.2f", gx,
		      gy, dx, dy);
	}
	sf_reg_field_free(&f);
out:
	sf_reg_image_free(&ref);
	sf_reg_image_free(&mov);
	free(b);
}

/* With a tissue mask, only the tissue drives the field, and the demons
 * skip what cannot change off it (the warp and forces off the used pixels,
 * the fluid blur where the update is zero, the composition where there is
 * no update).  Odd sizes (not a multiple of the 8-pixel vector steps) and
 * a mask touching the left and bottom edges exercise every edge path.  The
 * field must still recover the known deformation on the tissue and be the
 * same, bit for bit, on 1, 2 and 3 threads. */
#define WM 233
#define HM 201

static void test_recover_masked(void)
{
	sf_err e = {0};
	blobs *b = malloc(sizeof *b);
	uint8_t *mask = malloc(WM * HM);
	sf_reg_image ref = {0}, mov = {0};
	sf_reg_field f = {0};
	CHECK(b && mask && sf_reg_image_alloc(&ref, WM, HM, &e) == SF_OK &&
	          sf_reg_image_alloc(&mov, WM, HM, &e) == SF_OK,
	      "alloc");
	if (!b || !mask || !ref.px || !mov.px)
		goto out;
	blobs_make(b, WM, HM);
	const double t[2] = {-2.5, 3.0};
	long used = 0;
	for (int y = 0; y < HM; y++)
		for (int x = 0; x < WM; x++) {
			double dx, dy;
			truth(x, y, &dx, &dy);
			double v = blobs_at(b, x + dx, y + dy);
			ref.px[y * WM + x] = (float)(v + 0.01 * noise());
			mov.px[y * WM + x] =
			    (float)(1.3 * blobs_at(b, x - t[0], y - t[1]) + 0.01 * noise());
			mask[y * WM + x] = v > 0.1 || x < 5 || y >= HM - 3;
			used += mask[y * WM + x];
		}
	double m[9] = {1, 0, t[0], 0, 1, t[1], 0, 0, 1};
	sf_reg_nonrigid_opts o;
	sf_reg_nonrigid_opts_default(&o);
	CHECK(sf_reg_nonrigid(&ref, mask, &mov, m, &o, &f, &e) == SF_OK, "masked: %s", e.msg);
	if (!f.d)
		goto out;
	double epe = 0, epe0 = 0;
	long n = 0;
	for (int y = 8; y < HM - 8; y++)
		for (int x = 8; x < WM - 8; x++) {
			double dx, dy, gx, gy;
			truth(x, y, &dx, &dy);
			if (blobs_at(b, x + dx, y + dy) < 0.15)
				continue;
			sf_reg_field_at(&f, x, y, &gx, &gy);
			epe += hypot(gx - dx, gy - dy);
			epe0 += hypot(dx, dy);
			n++;
		}
	epe /= n;
	epe0 /= n;
	printf("recover, masked (%ld of %d px used): mean endpoint error %.3f px (%.3f px "
	       "without the field), jac_min %.3f\n",
	       used, WM * HM, epe, epe0, f.jac_min);
	CHECK(used < WM * HM * 3 / 4, "the mask leaves pixels out (%ld)", used);
	CHECK(epe < 0.3 && epe0 > 1.2, "masked endpoint error %.3f px (%.2f without)", epe, epe0);
	CHECK(f.jac_min > 0.5, "masked: no fold (jac_min %.3f)", f.jac_min);
	same_on_more_threads(&ref, mask, &mov, m, &o, &f, "masked");
out:
	sf_reg_field_free(&f);
	sf_reg_image_free(&ref);
	sf_reg_image_free(&mov);
	free(mask);
	free(b);
}

/* An undeformed pair (gain change, independent noise) must stay still. */
static void test_identity(void)
{
	sf_err e = {0};
	blobs *b = malloc(sizeof *b);
	sf_reg_image ref = {0}, mov = {0};
	CHECK(b && sf_reg_image_alloc(&ref, W, H, &e) == SF_OK &&
	          sf_reg_image_alloc(&mov, W, H, &e) == SF_OK,
	      "alloc");
	if (!b || !ref.px || !mov.px)
		goto out;
	blobs_make(b, W, H);
	for (int i = 0; i < W * H; i++) {
		double v = blobs_at(b, i % W, i / W);
		ref.px[i] = (float)(v + 0.01 * noise());
		mov.px[i] = (float)(1.5 * v + 0.01 * noise());
	}
	static const double id[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1};
	sf_reg_nonrigid_opts o;
	sf_reg_nonrigid_opts_default(&o);
	sf_reg_field f = {0};
	CHECK(sf_reg_nonrigid(&ref, NULL, &mov, id, &o, &f, &e) == SF_OK, "nonrigid: %s", e.msg);
	if (f.d) {
		double mean = 0, worst = 0;
		long n = 0;
		for (int i = 0; i < W * H; i++) {
			if (blobs_at(b, i % W, i / W) < 0.15)
				continue;
			double len = hypot(f.d[2 * i], f.d[2 * i + 1]);
			mean += len;
			worst = len > worst ? len : worst;
			n++;
		}
		mean /= n;
		printf("identity: mean |D| %.4f px, worst %.4f px over tissue, disp_max %.4f\n",
		       mean, worst, f.disp_max);
		CHECK(mean < 0.05 && worst < 0.15, "identity moved: mean %.3f worst %.3f", mean,
		      worst);
		CHECK(f.jac_min > 0.9, "identity jac_min %.3f", f.jac_min);
	}
	sf_reg_field_free(&f);
out:
	sf_reg_image_free(&ref);
	sf_reg_image_free(&mov);
	free(b);
}

/* --- the level-0 transform -------------------------------------------------------- */

/* The field at thumbnail point (x, y), written out independently: node
 * index (x + 0.5) / step - 0.5, clamped, bilinear. */
static void field_direct(const sf_reg_field *f, double x, double y, double out[2])
{
	double gx = fmin(fmax((x + 0.5) / f->step - 0.5, 0), f->w - 1);
	double gy = fmin(fmax((y + 0.5) / f->step - 0.5, 0), f->h - 1);
	int i0 = (int)floor(gx), j0 = (int)floor(gy);
	int i1 = i0 + 1 < (int)f->w ? i0 + 1 : i0, j1 = j0 + 1 < (int)f->h ? j0 + 1 : j0;
	double ax = gx - i0, ay = gy - j0;
	for (int k = 0; k < 2; k++) {
		double v00 = f->d[2 * (j0 * f->w + i0) + k], v01 = f->d[2 * (j0 * f->w + i1) + k];
		double v10 = f->d[2 * (j1 * f->w + i0) + k], v11 = f->d[2 * (j1 * f->w + i1) + k];
		out[k] = (1 - ay) * ((1 - ax) * v00 + ax * v01) + ay * ((1 - ax) * v10 + ax * v11);
	}
}

static void test_to_transform(void)
{
	sf_err e = {0};
	sf_reg_field f = {.w = 7, .h = 5, .step = 3};
	f.d = malloc(2 * 7 * 5 * sizeof *f.d);
	CHECK(f.d != NULL, "alloc");
	if (!f.d)
		return;
	for (int i = 0; i < 2 * 7 * 5; i++)
		f.d[i] = (float)(6 * rnd() - 3);
	const double m[9] = {0.9, -0.2, 12.5, 0.15, 1.1, -4.0, 0, 0, 1};
	const double rds[2] = {4, 2.5}, mds[2] = {2, 3};
	sf_transform t;
	CHECK(sf_reg_to_transform_field(m, &f, rds, mds, &t, &e) == SF_OK, "to_transform: %s",
	      e.msg);
	CHECK(t.map.nfields == 1 && t.map.field[0].kind == SF_FIELD_LINEAR, "one linear field");
	double worst = 0;
	for (int k = 0; k < 400; k++) {
		/* level-0 reference points over the thumbnail and beyond it */
		double p[2] = {-20 + 130 * rnd(), -15 + 70 * rnd()};
		double x = (p[0] + 0.5) / rds[0] - 0.5, y = (p[1] + 0.5) / rds[1] - 0.5, d[2];
		field_direct(&f, x, y, d);
		double qx = x + d[0], qy = y + d[1];
		double mx = m[0] * qx + m[1] * qy + m[2], my = m[3] * qx + m[4] * qy + m[5];
		double want[2] = {(mx + 0.5) * mds[0] - 0.5, (my + 0.5) * mds[1] - 0.5}, got[2];
		sf_map_point(&t.map, p[0], p[1], &got[0], &got[1]);
		double err = hypot(got[0] - want[0], got[1] - want[1]);
		worst = err > worst ? err : worst;
	}
	CHECK(worst < 1e-4, "level-0 transform off by %.3g px", worst);
	sf_transform_release(&t);

	/* bad inputs */
	const double ds0[2] = {0, 1};
	CHECK(sf_reg_to_transform_field(m, &f, ds0, mds, &t, &e) == SF_EINVAL, "ds 0");
	const double proj[9] = {1, 0, 0, 0, 1, 0, 0.001, 0, 1};
	CHECK(sf_reg_to_transform_field(proj, &f, rds, mds, &t, &e) == SF_EINVAL, "projective m");
	f.d[3] = NAN;
	CHECK(sf_reg_to_transform_field(m, &f, rds, mds, &t, &e) != SF_OK, "NaN node");
	CHECK(t.map.nfields == 0, "t left the identity after failing");
	free(f.d);
	sf_reg_field empty = {0};
	CHECK(sf_reg_to_transform_field(m, &empty, rds, mds, &t, &e) == SF_EINVAL, "empty field");
}

static void test_bad_input(void)
{
	sf_err e = {0};
	sf_reg_image im = {0}, empty = {0};
	CHECK(sf_reg_image_alloc(&im, 16, 16, &e) == SF_OK, "alloc");
	static const double id[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1};
	sf_reg_nonrigid_opts o;
	sf_reg_nonrigid_opts_default(&o);
	sf_reg_field f = {0};
	CHECK(sf_reg_nonrigid(&empty, NULL, &im, id, &o, &f, &e) == SF_EINVAL && !f.d,
	      "empty reference");
	CHECK(sf_reg_nonrigid(&im, NULL, &empty, id, &o, &f, &e) == SF_EINVAL && !f.d,
	      "empty moving");
	o.step = 0;
	CHECK(sf_reg_nonrigid(&im, NULL, &im, id, &o, &f, &e) == SF_EINVAL && !f.d, "step 0");
	sf_reg_nonrigid_opts_default(&o);
	o.sigma_diff = -1;
	CHECK(sf_reg_nonrigid(&im, NULL, &im, id, &o, &f, &e) == SF_EINVAL, "negative sigma");
	sf_reg_nonrigid_opts_default(&o);
	o.max_step = NAN;
	CHECK(sf_reg_nonrigid(&im, NULL, &im, id, &o, &f, &e) == SF_EINVAL, "NaN max_step");
	sf_reg_nonrigid_opts_default(&o);
	const double nan_m[9] = {1, 0, NAN, 0, 1, 0, 0, 0, 1};
	CHECK(sf_reg_nonrigid(&im, NULL, &im, nan_m, &o, &f, &e) == SF_EINVAL, "NaN map");
	/* a flat (all zero) pair and an all-zero mask: a zero field, no error */
	uint8_t mask[16 * 16] = {0};
	CHECK(sf_reg_nonrigid(&im, mask, &im, id, &o, &f, &e) == SF_OK && f.d && f.disp_max == 0,
	      "flat pair: %s", e.msg);
	sf_reg_field_free(&f);
	sf_reg_field_free(&f); /* twice is fine */
	sf_reg_image_free(&im);
}

static int write_out(const char *base, const sf_reg_result *r, const sf_reg_field *f, double ms_aff,
                     double ms_nr, double cpu_ms_nr, sf_err *e)
{
	char path[4096];
	snprintf(path, sizeof path, "%s.f32", base);
	FILE *fp = fopen(path, "wb");
	size_t n = 2 * (size_t)f->w * f->h;
	int ok = fp && fwrite(f->d, sizeof *f->d, n, fp) == n;
	if (fp && fclose(fp))
		ok = 0;
	if (!ok)
		return sf_fail(e, SF_EIO, "%s: cannot write", path);
	snprintf(path, sizeof path, "%s.json", base);
	if (!(fp = fopen(path, "w")))
		return sf_fail(e, SF_EIO, "%s: cannot write", path);
	fprintf(fp, "{\"m\": [");
	for (int i = 0; i < 9; i++)
		fprintf(fp, "%.17g%s", r->m[i], i < 8 ? ", " : "");
	fprintf(fp,
	        "], \"w\": %u, \"h\": %u, \"step\": %u, \"jac_min\": %.6f, \"disp_max\": %.6f, "
	        "\"ms_affine\": %.3f, \"ms_nonrigid\": %.3f, \"cpu_ms_nonrigid\": %.3f}\n",
	        f->w, f->h, f->step, f->jac_min, f->disp_max, ms_aff, ms_nr, cpu_ms_nr);
	return fclose(fp) ? sf_fail(e, SF_EIO, "%s: cannot write", path) : SF_OK;
}

static int drive(int argc, char **argv)
{
	if (argc < 9) {
		fprintf(stderr, "usage: %s --pair REF MOV RW RH MW MH OUT [MASK]\n", argv[0]);
		return 2;
	}
	sf_err e = {0};
	sf_reg_image ref = {0}, mov = {0};
	uint8_t *mask = NULL;
	sf_reg_opts o;
	sf_reg_opts_default(&o);
	o.model = SF_REG_AFFINE;
	int rc = read_raw(argv[2], (uint32_t)atoi(argv[4]), (uint32_t)atoi(argv[5]), &ref, &e);
	if (!rc)
		rc = read_raw(argv[3], (uint32_t)atoi(argv[6]), (uint32_t)atoi(argv[7]), &mov, &e);
	if (!rc)
		rc = sf_reg_normalise(&ref, 1, 99.5, &e);
	if (!rc)
		rc = sf_reg_normalise(&mov, 1, 99.5, &e);
	if (!rc && argc > 9) {
		mask = malloc((size_t)ref.w * ref.h);
		rc = mask ? sf_reg_tissue_mask(&ref, 2.0, mask, NULL, &e)
		          : sf_fail(&e, SF_ENOMEM, "mask");
	}
	struct timespec t0, t1, t2, c1, c2; /* wall clock; CPU time of this process */
	sf_reg_result r = {0};
	sf_reg_field f = {0};
	sf_reg_nonrigid_opts no;
	sf_reg_nonrigid_opts_default(&no);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (!rc)
		rc = sf_reg_register(&ref, mask, &mov, &o, &r, &e);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
	if (!rc)
		rc = sf_reg_nonrigid(&ref, mask, &mov, r.m, &no, &f, &e);
	clock_gettime(CLOCK_MONOTONIC, &t2);
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c2);
	if (!rc)
		rc = write_out(argv[8], &r, &f, ms_between(&t0, &t1), ms_between(&t1, &t2),
		               ms_between(&c1, &c2), &e);
	sf_reg_field_free(&f);
	free(mask);
	sf_reg_image_free(&ref);
	sf_reg_image_free(&mov);
	if (rc)
		fprintf(stderr, "test_register_nonrigid: %s\n", e.msg);
	return rc ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc > 1 && !strcmp(argv[1], "--pair"))
		return drive(argc, argv);
	test_bad_input();
	test_to_transform();
	test_identity();
	test_recover();
	test_recover_masked();
	return CHECK_DONE("test_register_nonrigid");
}

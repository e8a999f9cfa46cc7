/* test_register_micro.c — unit tests of the micro-registration pass
 * (sf_reg_micro, register_micro.h), and a driver for
 * tests/integration/test_register_micro_oracle.py.
 *
 * Without arguments: an analytic tissue image (Gaussian nuclei and texture
 * blobs on jittered grids, evaluated at any point with no interpolation)
 * is the reference; the moving image is the same world seen through a known
 * backward map y = m (x + Dt(x)) with Dt(x) = b(x) + Dc(x + b(x)), Dc the
 * given coarse field (on a 4x coarser grid) and b small bumps (sigma 12 px)
 * that the coarse grid cannot hold.  The composed field must match Dt far
 * better than Dc alone; with b = 0 it must stay at Dc.  Bad arguments give
 * SF_EINVAL.
 *
 * Driver: test_register_micro --micro DIR reads DIR/params.txt
 *   "RW RH MW MH m0 m1 m2 m3 m4 m5 CW CH CSTEP CSCALE TILE OVERLAP STEP MASK
 *   PASSES"
 * (MASK 1: DIR/mask.u8 holds RW*RH bytes), DIR/ref.f32, DIR/mov.f32 and
 * DIR/coarse.f32 (CW*CH*2 floats, dx dy per node) as raw float32, runs
 * sf_reg_micro with the default options but TILE, OVERLAP, STEP and PASSES, and
 * writes DIR/out.f32 (the nodes) and DIR/out.txt "W H STEP JAC_MIN DISP_MAX MS". */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "reg_fixture.h"
#include "scopefs/register.h"
#include "scopefs/register_micro.h"

/* --- an analytic tissue image ---------------------------------------------------- */

static double hash01(long a, long b, unsigned salt) /* deterministic uniform [0, 1) */
{
	uint64_t h = (uint64_t)a * 0x9E3779B97F4A7C15ull ^ (uint64_t)b * 0xC2B2AE3D27D4EB4Full ^
	             (uint64_t)salt * 0x165667B19E3779F9ull;
	h ^= h >> 31;
	h *= 0xBF58476D1CE4E5B9ull;
	h ^= h >> 29;
	return (double)(h >> 11) / 9007199254740992.0;
}

/* One blob per cell of a grid of spacing sp, jittered, of size s, sum of
 * the 5x5 cells around (x, y). */
static double blob_layer(double x, double y, double sp, double s, unsigned salt)
{
	long cx = (long)floor(x / sp), cy = (long)floor(y / sp);
	double v = 0;
	for (long j = cy - 2; j <= cy + 2; j++)
		for (long i = cx - 2; i <= cx + 2; i++) {
			double bx = (i + 0.2 + 0.6 * hash01(i, j, salt)) * sp;
			double by = (j + 0.2 + 0.6 * hash01(i, j, salt + 1)) * sp;
			double sg = s * (0.7 + 0.6 * hash01(i, j, salt + 2));
			double d2 = (x - bx) * (x - bx) + (y - by) * (y - by);
			if (d2 < 16 * sg * sg)
				v += (0.4 + 0.6 * hash01(i, j, salt + 3)) *
				     exp(-0.5 * d2 / (sg * sg));
		}
	return v;
}

static uint32_t W = 448, H = 384; /* micro image */

/* Tissue: an ellipse (soft edge) filled with nuclei and texture. */
static double envelope(double x, double y)
{
	double r = hypot((x - W / 2.0) / (0.42 * W), (y - H / 2.0) / (0.42 * H));
	double t = (1.0 - r) * 12;
	return t > 1 ? 1 : (t < 0 ? 0 : t);
}

static double world(double x, double y)
{
	return envelope(x, y) *
	       (0.2 + 0.8 * blob_layer(x, y, 9, 2.0, 10) + 0.3 * blob_layer(x, y, 36, 8.0, 20));
}

/* --- the maps -------------------------------------------------------------------- */

static const double SCALE = 4; /* micro px per coarse px */
static const double M[9] = {1.01, 0.02, 3.25, -0.015, 0.995, -2.5, 0, 0, 1};

/* The coarse field: smooth waves on the coarse grid (step 2), thumbnail px. */
static int coarse_make(sf_reg_field *c, sf_err *e)
{
	c->step = 2;
	c->w = (uint32_t)ceil(W / SCALE / c->step);
	c->h = (uint32_t)ceil(H / SCALE / c->step);
	c->d = calloc(2 * (size_t)c->w * c->h, sizeof *c->d);
	if (!c->d)
		return sf_fail(e, SF_ENOMEM, "test: coarse field");
	for (uint32_t j = 0; j < c->h; j++)
		for (uint32_t i = 0; i < c->w; i++) {
			double x = (i + 0.5) * c->step - 0.5, y = (j + 0.5) * c->step - 0.5;
			c->d[2 * (j * c->w + i)] =
			    (float)(1.2 * sin(2 * M_PI * x / 70 + 0.4) * cos(2 * M_PI * y / 60));
			c->d[2 * (j * c->w + i) + 1] = (float)(0.9 * cos(2 * M_PI * x / 55 + 1.0));
		}
	return SF_OK;
}

static void coarse_micro(const sf_reg_field *c, double x, double y, double *dx, double *dy)
{
	sf_reg_field_at(c, (x + 0.5) / SCALE - 0.5, (y + 0.5) / SCALE - 0.5, dx, dy);
	*dx *= SCALE;
	*dy *= SCALE;
}

#define NBUMPS 24
static double bump_x[NBUMPS], bump_y[NBUMPS], bump_ax[NBUMPS], bump_ay[NBUMPS];

static void bumps_make(double amp)
{
	for (int k = 0; k < NBUMPS; k++) {
		bump_x[k] = W * (0.15 + 0.7 * hash01(k, 1, 99));
		bump_y[k] = H * (0.15 + 0.7 * hash01(k, 2, 99));
		double th = 2 * M_PI * hash01(k, 3, 99);
		bump_ax[k] = amp * cos(th);
		bump_ay[k] = amp * sin(th);
	}
}

/* The fine part b: bumps of sigma 12 micro px. */
static void fine(double x, double y, double *bx, double *by)
{
	*bx = *by = 0;
	for (int k = 0; k < NBUMPS; k++) {
		double d2 = (x - bump_x[k]) * (x - bump_x[k]) + (y - bump_y[k]) * (y - bump_y[k]);
		double g = exp(-0.5 * d2 / (12.0 * 12.0));
		*bx += bump_ax[k] * g;
		*by += bump_ay[k] * g;
	}
}

/* Dt(x) = b(x) + Dc(x + b(x)). */
static void truth(const sf_reg_field *c, double x, double y, double *dx, double *dy)
{
	double bx, by, cx, cy;
	fine(x, y, &bx, &by);
	coarse_micro(c, x + bx, y + by, &cx, &cy);
	*dx = bx + cx;
	*dy = by + cy;
}

/* mov(y) = world(x) where m (x + Dt(x)) = y: x = m^-1 y - Dt(x), fixed point. */
static int moving_make(const sf_reg_field *c, double gain, sf_reg_image *mov, sf_err *e)
{
	int rc = sf_reg_image_alloc(mov, W, H, e);
	if (rc)
		return rc;
	double det = M[0] * M[4] - M[1] * M[3];
	for (uint32_t v = 0; v < H; v++)
		for (uint32_t u = 0; u < W; u++) {
			double qx = u - M[2], qy = v - M[5];
			double px = (M[4] * qx - M[1] * qy) / det,
			       py = (-M[3] * qx + M[0] * qy) / det;
			double x = px, y = py, dx, dy;
			for (int it = 0; it < 30; it++) {
				truth(c, x, y, &dx, &dy);
				x = px - dx;
				y = py - dy;
			}
			mov->px[(size_t)v * W + u] = (float)(gain * world(x, y));
		}
	return SF_OK;
}

static int reference_make(sf_reg_image *ref, uint8_t **mask, sf_err *e)
{
	int rc = sf_reg_image_alloc(ref, W, H, e);
	if (rc)
		return rc;
	*mask = malloc((size_t)W * H);
	if (!*mask)
		return sf_fail(e, SF_ENOMEM, "test: mask");
	for (uint32_t y = 0; y < H; y++)
		for (uint32_t x = 0; x < W; x++) {
			ref->px[(size_t)y * W + x] = (float)world(x, y);
			(*mask)[(size_t)y * W + x] = envelope(x, y) > 0.5;
		}
	return SF_OK;
}

/* Mean and worst |D - Dt| (or |Dc - Dt| with coarse_only) in mov px over
 * the field's nodes inside the tissue, 16 px from its edge. */
static void field_error(const sf_reg_field *f, const sf_reg_field *c, int coarse_only, double *mean,
                        double *worst)
{
	double sum = 0, big = 0;
	long n = 0;
	for (uint32_t j = 0; j < f->h; j++)
		for (uint32_t i = 0; i < f->w; i++) {
			double x = (i + 0.5) * f->step - 0.5, y = (j + 0.5) * f->step - 0.5;
			if (hypot((x - W / 2.0) / (0.42 * W - 16),
			          (y - H / 2.0) / (0.42 * H - 16)) > 1)
				continue;
			double tx, ty, dx, dy;
			truth(c, x, y, &tx, &ty);
			if (coarse_only)
				coarse_micro(c, x, y, &dx, &dy);
			else
				sf_reg_field_at(f, x, y, &dx, &dy);
			double ex = M[0] * (dx - tx) + M[1] * (dy - ty);
			double ey = M[3] * (dx - tx) + M[4] * (dy - ty);
			double d = hypot(ex, ey);
			sum += d;
			big = d > big ? d : big;
			n++;
		}
	*mean = n ? sum / n : 0;
	*worst = big;
}

static void test_case(double amp, uint32_t passes, const char *name)
{
	sf_err e = {0};
	sf_reg_image ref = {0}, mov = {0};
	sf_reg_field c = {0}, f = {0};
	uint8_t *mask = NULL;
	bumps_make(amp);
	int rc = coarse_make(&c, &e);
	if (!rc)
		rc = reference_make(&ref, &mask, &e);
	if (!rc)
		rc = moving_make(&c, 0.8, &mov, &e);
	CHECK(rc == SF_OK, "%s: fixture: %s", name, e.msg);
	sf_reg_micro_opts o;
	sf_reg_micro_opts_default(&o);
	o.tile = 128;
	o.overlap = 24;
	o.passes = passes;
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (!rc)
		rc = sf_reg_micro(&ref, mask, &mov, M, &c, SCALE, &o, &f, &e);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	CHECK(rc == SF_OK, "%s: sf_reg_micro: %s", name, e.msg);
	if (!rc) {
		double cm, cw, fm, fw;
		field_error(&f, &c, 1, &cm, &cw);
		field_error(&f, &c, 0, &fm, &fw);
		printf("%s: coarse-only error mean %.3f worst %.3f px; micro mean %.3f worst %.3f "
		       "px; jac_min %.3f disp_max %.2f; %.0f ms\n",
		       name, cm, cw, fm, fw, f.jac_min, f.disp_max, ms_between(&t0, &t1));
		CHECK(f.w == (W + 3) / 4 && f.h == (H + 3) / 4 && f.step == 4, "%s: size %ux%u",
		      name, f.w, f.h);
		CHECK(f.jac_min > 0.3, "%s: jac_min %.3f", name, f.jac_min);
		if (amp == 0) {
			CHECK(fm < 0.1, "%s: mean drift from the coarse field %.3f px", name, fm);
			CHECK(fw < 0.6, "%s: worst drift from the coarse field %.3f px", name, fw);
		} else if (passes > 1) {
			CHECK(fm < 0.1 * cm, "%s: mean error %.3f px not under a tenth of %.3f",
			      name, fm, cm);
			CHECK(fw < 0.3 * cw, "%s: worst error %.3f px not under 0.3 of %.3f", name,
			      fw, cw);
		} else {
			CHECK(fm < 0.25 * cm, "%s: mean error %.3f px not under a quarter of %.3f",
			      name, fm, cm);
			CHECK(fw < 0.6 * cw, "%s: worst error %.3f px not under 0.6 of %.3f", name,
			      fw, cw);
		}
	}
	sf_reg_field_free(&f);
	sf_reg_field_free(&c);
	sf_reg_image_free(&ref);
	sf_reg_image_free(&mov);
	free(mask);
}

/* With every tile skipped (no tissue in the mask) D is the coarse field
 * brought to micro px, node by node: x_c = (x_m + 0.5) / 4 - 0.5, times 4. */
static void test_coarse_only(void)
{
	sf_err e = {0};
	sf_reg_image ref = {0};
	sf_reg_field c = {0}, f = {0};
	uint8_t *mask = NULL;
	int rc = coarse_make(&c, &e);
	if (!rc)
		rc = reference_make(&ref, &mask, &e);
	if (!rc)
		memset(mask, 0, (size_t)W * H);
	sf_reg_micro_opts o;
	sf_reg_micro_opts_default(&o);
	o.tile = 128;
	o.step = 3;
	if (!rc)
		rc = sf_reg_micro(&ref, mask, &ref, M, &c, SCALE, &o, &f, &e);
	CHECK(rc == SF_OK, "coarse only: %s", e.msg);
	double worst = 0;
	for (uint32_t j = 0; j < f.h && !rc; j++)
		for (uint32_t i = 0; i < f.w; i++) {
			double x = i * 3.0 + 1, y = j * 3.0 + 1, xc = (x + 0.5) / 4 - 0.5;
			double yc = (y + 0.5) / 4 - 0.5, dx, dy;
			sf_reg_field_at(&c, xc, yc, &dx, &dy);
			const float *d = f.d + 2 * ((size_t)j * f.w + i);
			double err = hypot(d[0] - 4 * dx, d[1] - 4 * dy);
			worst = err > worst ? err : worst;
		}
	CHECK(!rc && worst < 1e-4 && f.w == (W + 2) / 3 && f.h == (H + 2) / 3,
	      "coarse only: worst |D - Dc| %.2g px", worst);
	sf_reg_field_free(&f);
	sf_reg_field_free(&c);
	sf_reg_image_free(&ref);
	free(mask);
}

static void test_bad_args(void)
{
	sf_err e = {0};
	sf_reg_image a = {0}, tiny = {0};
	sf_reg_field c = {0}, f = {0};
	int rc = sf_reg_image_alloc(&a, 64, 64, &e);
	if (!rc)
		rc = sf_reg_image_alloc(&tiny, 8, 8, &e);
	if (!rc)
		rc = coarse_make(&c, &e);
	CHECK(rc == SF_OK, "bad args fixture: %s", e.msg);
	if (rc)
		goto out;
	static const double id[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1};
	static const double proj[9] = {1, 0, 0, 0, 1, 0, 1e-3, 0, 1};
	sf_reg_micro_opts o;
	sf_reg_micro_opts_default(&o);
	CHECK(sf_reg_micro(NULL, NULL, &a, id, &c, 4, &o, &f, &e) == SF_EINVAL, "NULL ref");
	CHECK(sf_reg_micro(&tiny, NULL, &a, id, &c, 4, &o, &f, &e) == SF_EINVAL, "8x8 ref");
	CHECK(sf_reg_micro(&a, NULL, &tiny, id, &c, 4, &o, &f, &e) == SF_EINVAL, "8x8 mov");
	CHECK(sf_reg_micro(&a, NULL, &a, proj, &c, 4, &o, &f, &e) == SF_EINVAL, "projective m");
	CHECK(sf_reg_micro(&a, NULL, &a, id, &c, 0.5, &o, &f, &e) == SF_EINVAL, "scale 0.5");
	CHECK(sf_reg_micro(&a, NULL, &a, id, &c, NAN, &o, &f, &e) == SF_EINVAL, "scale NaN");
	CHECK(sf_reg_micro(&a, NULL, &a, id, &c, 4, NULL, &f, &e) == SF_EINVAL, "no options");
	CHECK(sf_reg_micro(&a, NULL, &a, id, &c, 4, &o, NULL, &e) == SF_EINVAL, "no output");
	sf_reg_micro_opts bad = o;
	bad.tile = 16;
	CHECK(sf_reg_micro(&a, NULL, &a, id, &c, 4, &bad, &f, &e) == SF_EINVAL, "tile 16");
	bad = o;
	bad.overlap = bad.tile / 2 + 1;
	CHECK(sf_reg_micro(&a, NULL, &a, id, &c, 4, &bad, &f, &e) == SF_EINVAL, "overlap");
	bad = o;
	bad.step = 0;
	CHECK(sf_reg_micro(&a, NULL, &a, id, &c, 4, &bad, &f, &e) == SF_EINVAL, "step 0");
	bad = o;
	bad.min_tissue = 1.5;
	CHECK(sf_reg_micro(&a, NULL, &a, id, &c, 4, &bad, &f, &e) == SF_EINVAL, "min_tissue");
	bad = o;
	bad.demons.iter_fine = -1;
	CHECK(sf_reg_micro(&a, NULL, &a, id, &c, 4, &bad, &f, &e) == SF_EINVAL, "demons opts");
	sf_reg_field empty = {0};
	CHECK(sf_reg_micro(&a, NULL, &a, id, &empty, 4, &o, &f, &e) == SF_EINVAL, "empty coarse");
	CHECK(f.d == NULL && f.w == 0, "output empty after errors");
	/* no coarse field and a flat image: every tile skipped or unchanged, D = 0 */
	rc = sf_reg_micro(&a, NULL, &a, id, NULL, 0, &o, &f, &e);
	CHECK(rc == SF_OK && f.w == 16 && f.h == 16 && f.disp_max == 0 && f.jac_min == 1,
	      "flat image without coarse field: rc %d (%s) disp_max %g", rc, e.msg, f.disp_max);
out:
	sf_reg_field_free(&f);
	sf_reg_field_free(&c);
	sf_reg_image_free(&a);
	sf_reg_image_free(&tiny);
}

/* --- driver ---------------------------------------------------------------------- */

static int read_bytes(const char *path, void *buf, size_t n, sf_err *e)
{
	FILE *fp = fopen(path, "rb");
	size_t got = fp ? fread(buf, 1, n, fp) : 0;
	if (fp)
		fclose(fp);
	return got == n ? SF_OK : sf_fail(e, SF_EIO, "%s: cannot read %zu bytes", path, n);
}

typedef struct driver_params {
	unsigned rw, rh, mw, mh, cw, ch, cstep, tile, overlap, step, use_mask, passes;
	double m[9], cscale;
} driver_params;

static int read_params(const char *dir, driver_params *p, sf_err *e)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/params.txt", dir);
	FILE *fp = fopen(path, "r");
	int n = fp ? fscanf(fp, "%u %u %u %u %lf %lf %lf %lf %lf %lf %u %u %u %lf %u %u %u %u %u",
	                    &p->rw, &p->rh, &p->mw, &p->mh, &p->m[0], &p->m[1], &p->m[2], &p->m[3],
	                    &p->m[4], &p->m[5], &p->cw, &p->ch, &p->cstep, &p->cscale, &p->tile,
	                    &p->overlap, &p->step, &p->use_mask, &p->passes)
	           : 0;
	if (fp)
		fclose(fp);
	p->m[6] = p->m[7] = 0;
	p->m[8] = 1;
	return n == 19 ? SF_OK : sf_fail(e, SF_EIO, "%s: expected 19 numbers", path);
}

static int driver_run(const char *dir, const driver_params *p, sf_err *e)
{
	char path[4096];
	sf_reg_image ref = {0}, mov = {0};
	sf_reg_field c = {.w = p->cw, .h = p->ch, .step = p->cstep}, f = {0};
	uint8_t *mask = p->use_mask ? malloc((size_t)p->rw * p->rh) : NULL;
	c.d = malloc(2 * (size_t)p->cw * p->ch * sizeof *c.d);
	int rc = (p->use_mask && !mask) || !c.d ? sf_fail(e, SF_ENOMEM, "driver buffers") : 0;
	snprintf(path, sizeof path, "%s/ref.f32", dir);
	if (!rc)
		rc = read_raw(path, p->rw, p->rh, &ref, e);
	snprintf(path, sizeof path, "%s/mov.f32", dir);
	if (!rc)
		rc = read_raw(path, p->mw, p->mh, &mov, e);
	snprintf(path, sizeof path, "%s/coarse.f32", dir);
	if (!rc)
		rc = read_bytes(path, c.d, 2 * (size_t)p->cw * p->ch * sizeof *c.d, e);
	snprintf(path, sizeof path, "%s/mask.u8", dir);
	if (!rc && mask)
		rc = read_bytes(path, mask, (size_t)p->rw * p->rh, e);
	sf_reg_micro_opts o;
	sf_reg_micro_opts_default(&o);
	o.tile = p->tile;
	o.overlap = p->overlap;
	o.step = p->step;
	o.passes = p->passes;
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (!rc)
		rc = sf_reg_micro(&ref, mask, &mov, p->m, &c, p->cscale, &o, &f, e);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	FILE *fp = NULL;
	snprintf(path, sizeof path, "%s/out.f32", dir);
	if (!rc && (!(fp = fopen(path, "wb")) ||
	            fwrite(f.d, sizeof *f.d, 2 * (size_t)f.w * f.h, fp) != 2 * (size_t)f.w * f.h))
		rc = sf_fail(e, SF_EIO, "%s: cannot write", path);
	if (fp)
		fclose(fp);
	snprintf(path, sizeof path, "%s/out.txt", dir);
	if (!rc && (fp = fopen(path, "w"))) {
		fprintf(fp, "%u %u %u %.6f %.6f %.1f\n", f.w, f.h, f.step, f.jac_min, f.disp_max,
		        ms_between(&t0, &t1));
		fclose(fp);
	}
	sf_reg_field_free(&f);
	free(c.d);
	free(mask);
	sf_reg_image_free(&ref);
	sf_reg_image_free(&mov);
	return rc;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "--micro")) {
		sf_err e = {0};
		driver_params p;
		int rc = read_params(argv[2], &p, &e);
		if (!rc)
			rc = driver_run(argv[2], &p, &e);
		if (rc)
			fprintf(stderr, "test_register_micro: %s\n", e.msg);
		return rc ? 1 : 0;
	}
	test_bad_args();
	test_coarse_only();
	test_case(0, 1, "undeformed");
	test_case(3.0, 1, "bumps 3 px");
	test_case(3.0, 2, "bumps 3 px, 2 passes");
	return CHECK_DONE("test_register_micro");
}

/* reg_fixture.h — helpers shared by the registration unit tests and their
 * driver modes (test_register.c, test_register_mi.c, test_register_nonrigid.c):
 * an exactly known test map (a quarter turn, a mirror, an integer shift),
 * the corner error between two maps, raw float32 images, milliseconds. */
#ifndef SCOPEFS_TEST_REG_FIXTURE_H
#define SCOPEFS_TEST_REG_FIXTURE_H

#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "scopefs/register.h"

/* mov(P x + c) = ref(x) for P a signed permutation (rot * 90 degrees, then
 * optionally mirrored), c integer; elsewhere mov is `fill`.  m = [P c]. */
static inline int permuted(const sf_reg_image *ref, int rot, int mirror, int sx, int sy, float fill,
                           sf_reg_image *mov, double m[9], sf_err *e)
{
	int w = (int)ref->w, h = (int)ref->h, mw = rot % 2 ? h : w, mh = rot % 2 ? w : h;
	int rc = sf_reg_image_alloc(mov, (uint32_t)mw, (uint32_t)mh, e);
	if (rc)
		return rc;
	double p[4], c[2];
	switch (rot) {
	case 0: p[0] = 1, p[1] = 0, p[2] = 0, p[3] = 1, c[0] = 0, c[1] = 0; break;
	case 1: p[0] = 0, p[1] = -1, p[2] = 1, p[3] = 0, c[0] = h - 1, c[1] = 0; break;
	case 2: p[0] = -1, p[1] = 0, p[2] = 0, p[3] = -1, c[0] = w - 1, c[1] = h - 1; break;
	default: p[0] = 0, p[1] = 1, p[2] = -1, p[3] = 0, c[0] = 0, c[1] = w - 1; break;
	}
	if (mirror)
		p[0] = -p[0], p[1] = -p[1], c[0] = mw - 1 - c[0];
	c[0] += sx;
	c[1] += sy;
	for (size_t i = 0; i < (size_t)mw * mh; i++)
		mov->px[i] = fill;
	for (int y = 0; y < h; y++)
		for (int x = 0; x < w; x++) {
			int u = (int)lround(p[0] * x + p[1] * y + c[0]);
			int v = (int)lround(p[2] * x + p[3] * y + c[1]);
			if (u >= 0 && v >= 0 && u < mw && v < mh)
				mov->px[(size_t)v * mw + u] = ref->px[(size_t)y * w + x];
		}
	double fm[9] = {p[0], p[1], c[0], p[2], p[3], c[1], 0, 0, 1};
	memcpy(m, fm, sizeof fm);
	return SF_OK;
}

/* Largest distance between the two maps over the reference's corners. */
static inline double corner_error(const double a[9], const double b[9], uint32_t w, uint32_t h)
{
	double worst = 0;
	for (int k = 0; k < 4; k++) {
		double x = (k & 1) ? w - 1.0 : 0, y = (k & 2) ? h - 1.0 : 0;
		double dx = (a[0] - b[0]) * x + (a[1] - b[1]) * y + a[2] - b[2];
		double dy = (a[3] - b[3]) * x + (a[4] - b[4]) * y + a[5] - b[5];
		double d = sqrt(dx * dx + dy * dy);
		worst = d > worst ? d : worst;
	}
	return worst;
}

/* w x h float32 values from the file at path (a driver mode's input). */
static inline int read_raw(const char *path, uint32_t w, uint32_t h, sf_reg_image *im, sf_err *e)
{
	int rc = sf_reg_image_alloc(im, w, h, e);
	if (rc)
		return rc;
	FILE *f = fopen(path, "rb");
	size_t n = (size_t)w * h;
	if (!f || fread(im->px, sizeof *im->px, n, f) != n) {
		if (f)
			fclose(f);
		sf_reg_image_free(im);
		return sf_fail(e, SF_EIO, "%s: cannot read %zu floats", path, n);
	}
	fclose(f);
	return SF_OK;
}

static inline double ms_between(const struct timespec *a, const struct timespec *b)
{
	return (b->tv_sec - a->tv_sec) * 1e3 + (b->tv_nsec - a->tv_nsec) / 1e6;
}

/* The drivers' fit: the similarity search (its result in *init), then the
 * refinement (*r); *ms_init and *ms_all are milliseconds from the start. */
static inline int fit_timed(const sf_reg_image *ref, const uint8_t *mask, const sf_reg_image *mov,
                            const sf_reg_opts *o, sf_reg_result *init, sf_reg_result *r,
                            double *ms_init, double *ms_all, sf_err *e)
{
	struct timespec t0, t1, t2;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	int rc = sf_reg_init_similarity(ref, mov, o, r, e);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	*init = *r;
	if (!rc)
		rc = sf_reg_refine(ref, mask, mov, o, r, e);
	clock_gettime(CLOCK_MONOTONIC, &t2);
	*ms_init = ms_between(&t0, &t1);
	*ms_all = ms_between(&t0, &t2);
	return rc;
}

#endif

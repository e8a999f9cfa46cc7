/* test_destripe.c — z destriping and the db9 transform (src/core/destripe.c).
 *
 * Without arguments: unit checks.  sigma <= 0 leaves a block bit-exact; bad
 * arguments are refused; the db9 filter satisfies the identities any
 * Daubechies filter must (unit norm, sum sqrt 2, nine vanishing moments: a
 * cubic's high-pass band is zero away from the edges); wavedec2 then
 * waverec2 gives the image back to 1e-5 for even, odd and skewed shapes; on
 * a synthetic volume with z-constant stripes the stripes shrink while beads
 * keep their peaks; two threads destriping at once give the serial result.
 *
 * Driver modes for tests/integration/test_destripe_oracle.py (raw float32,
 * C order):
 *   --destripe IN nz ny nx sigma OUT [repeat]   destripe; prints seconds=S per run
 *   --wavedec2 IN rows cols levels OUT          pywt.wavedec2 order: cA_L, then
 *                                               cH, cV, cD from level L down to 1 */
#include "check.h"
#include "scopefs/destripe.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* A deterministic generator, so failures reproduce (xorshift64*). */
static double uniform(unsigned long long *s)
{
	*s ^= *s >> 12, *s ^= *s << 25, *s ^= *s >> 27;
	return (double)((*s * 2685821657736338717ull) >> 11) / 9007199254740992.0;
}

static float *random_floats(size_t n, unsigned long long seed)
{
	float *v = malloc(n * sizeof *v);
	for (size_t i = 0; v && i < n; i++)
		v[i] = (float)uniform(&seed) * 100.0f;
	return v;
}

/* ||a - b|| / ||b|| over n values. */
static double rel_l2(const float *a, const float *b, size_t n)
{
	double num = 0, den = 0;
	for (size_t i = 0; i < n; i++) {
		double d = (double)a[i] - b[i];
		num += d * d, den += (double)b[i] * b[i];
	}
	return sqrt(num / (den > 0 ? den : 1));
}

static void test_noop_and_errors(void)
{
	const uint32_t nz = 40, ny = 3, nx = 36;
	size_t n = (size_t)nz * ny * nx;
	float *v = random_floats(n, 7), *keep = malloc(n * sizeof *keep);
	memcpy(keep, v, n * sizeof *v);
	sf_err e = {0};
	CHECK(sf_destripe_z(v, nz, ny, nx, 0, &e) == SF_OK, "sigma 0: %s", e.msg);
	CHECK(sf_destripe_z(v, nz, ny, nx, -5, &e) == SF_OK, "sigma -5: %s", e.msg);
	CHECK(memcmp(v, keep, n * sizeof *v) == 0, "sigma <= 0 changed the block");
	/* 16 planes: no db9 level fits, so nothing to do. */
	CHECK(sf_destripe_z(v, 16, ny, nx, 1000, &e) == SF_OK, "nz 16: %s", e.msg);
	CHECK(memcmp(v, keep, n * sizeof *v) == 0, "a block too thin for db9 changed");
	CHECK(sf_destripe_z(v, nz, ny, nx, NAN, &e) == SF_EINVAL, "NaN sigma accepted");
	CHECK(strstr(e.msg, "destripe_sigma") != NULL, "message does not name the option: %s",
	      e.msg);
	CHECK(sf_destripe_z(v, nz, ny, nx, INFINITY, &e) == SF_EINVAL, "infinite sigma accepted");
	CHECK(sf_destripe_z(NULL, nz, ny, nx, 10, &e) == SF_EINVAL, "NULL block accepted");
	CHECK(sf_destripe_z(v, nz, ny, nx, 1000, &e) == SF_OK, "sigma 1000: %s", e.msg);
	CHECK(memcmp(v, keep, n * sizeof *v) != 0, "sigma 1000 changed nothing");
	sf_wavedec2 w;
	CHECK(sf_db9_wavedec2(keep, nz, nx, 2, &w, &e) == SF_EINVAL,
	      "2 levels of 40 x 36 accepted");
	CHECK(sf_db9_wavedec2(keep, nz, nx, 0, &w, &e) == SF_EINVAL, "0 levels accepted");
	free(v);
	free(keep);
}

static void test_levels_and_gain(void)
{
	/* pywt.dwt_max_level(n, 18) = floor(log2(n / 17)). */
	CHECK(sf_db9_max_level(16, 100) == 0, "16: %u", sf_db9_max_level(16, 100));
	CHECK(sf_db9_max_level(33, 100) == 0, "33: %u", sf_db9_max_level(33, 100));
	CHECK(sf_db9_max_level(34, 100) == 1, "34: %u", sf_db9_max_level(34, 100));
	CHECK(sf_db9_max_level(512, 300) == 4, "300: %u", sf_db9_max_level(512, 300));
	CHECK(sf_db9_max_level(1088, 4096) == 6, "1088: %u", sf_db9_max_level(1088, 4096));
	/* s = (floor(n/2) + 1) * sigma / nx: n = 40, nx = 100, sigma = 50 -> s = 10.5. */
	double s = 10.5, g = sf_destripe_gain(50, 40, 100, 7);
	CHECK(sf_destripe_gain(50, 40, 100, 0) == 0, "gain at k = 0 is not 0");
	CHECK(fabs(g - (1 - exp(-49 / (2 * s * s)))) < 1e-15, "gain(7) = %.17g", g);
	CHECK(sf_destripe_gain(1e-30, 40, 100, 1) > 0.999999, "tiny sigma must pass k >= 1");
}

/* Daubechies identities, checked through the transform: a level-1 split of
 * an image that is constant along x puts nothing in the x high-pass bands;
 * a cubic along x (any cubic: db9 has 9 vanishing moments) neither, away
 * from the edges; and the energy of the interior coefficients of white noise
 * is close to the image's (orthonormal filters). */
static void test_filter_identities(void)
{
	const size_t rows = 40, cols = 120;
	float *img = malloc(rows * cols * sizeof *img);
	for (size_t r = 0; r < rows; r++)
		for (size_t c = 0; c < cols; c++) {
			double t = ((double)c - 60) / 30.0;
			img[r * cols + c] =
			    (float)(5 + 2 * t - 1.5 * t * t + 0.7 * t * t * t) + (float)r * 0.25f;
		}
	sf_wavedec2 w;
	sf_err e = {0};
	CHECK(sf_db9_wavedec2(img, rows, cols, 1, &w, &e) == SF_OK, "wavedec2: %s", e.msg);
	if (w.levels == 1) {
		double worst = 0, scale = 0;
		for (size_t r = 0; r < w.rows[1]; r++)
			for (size_t c = 9; c + 9 < w.cols[1]; c++) {
				worst = fmax(worst, fabs(w.detail[1][1][r * w.cols[1] + c]));
				scale = fmax(scale, fabs(w.approx[r * w.cols[1] + c]));
			}
		CHECK(worst < 1e-5 * scale, "cubic along x leaks into cV: %g of %g", worst, scale);
		/* The approximation of a smooth image is sqrt(2)^2 = 2 times it, shifted. */
		CHECK(scale > 1.5 * 5 && scale < 2.5 * 40, "approx scale %g", scale);
	}
	sf_wavedec2_free(&w);
	free(img);
}

static void test_roundtrip(void)
{
	static const size_t shapes[][2] = {{64, 64}, {70, 53}, {35, 200}, {137, 91}, {300, 34}};
	for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
		size_t rows = shapes[s][0], cols = shapes[s][1], n = rows * cols;
		float *img = random_floats(n, 100 + s), *back = malloc(n * sizeof *back);
		unsigned max = sf_db9_max_level(rows, cols);
		for (unsigned levels = 1; levels <= max; levels++) {
			sf_wavedec2 w;
			sf_err e = {0};
			int rc = sf_db9_wavedec2(img, rows, cols, levels, &w, &e);
			CHECK(rc == SF_OK, "wavedec2 %zux%zu L%u: %s", rows, cols, levels, e.msg);
			if (rc != SF_OK)
				continue;
			memset(back, 0, n * sizeof *back);
			rc = sf_db9_waverec2(&w, back, &e);
			double err = rel_l2(back, img, n);
			CHECK(rc == SF_OK && err < 1e-5, "round trip %zux%zu L%u: rel L2 %g", rows,
			      cols, levels, err);
			sf_wavedec2_free(&w);
		}
		free(img);
		free(back);
	}
}

/* Sparse Gaussian beads (sigma 2 in x and y, 3 in z) on a smooth background. */
static void make_beads(float *v, uint32_t nz, uint32_t ny, uint32_t nx)
{
	enum { BEADS = 12 };
	unsigned long long seed = 99;
	double bz[BEADS], by[BEADS], bx[BEADS];
	for (int i = 0; i < BEADS; i++) {
		bz[i] = 16 + uniform(&seed) * (nz - 32);
		by[i] = uniform(&seed) * (ny - 1);
		bx[i] = 16 + uniform(&seed) * (nx - 32);
	}
	for (uint32_t z = 0; z < nz; z++)
		for (uint32_t y = 0; y < ny; y++)
			for (uint32_t x = 0; x < nx; x++) {
				double s = 20 + 10 * sin(z * 0.05) * cos(x * 0.04);
				for (int i = 0; i < BEADS; i++) {
					double d2 = (z - bz[i]) * (z - bz[i]) / 9.0 +
					            (y - by[i]) * (y - by[i]) / 4.0 +
					            (x - bx[i]) * (x - bx[i]) / 4.0;
					s += 400 * exp(-d2 / 2);
				}
				v[((size_t)z * ny + y) * nx + x] = (float)s;
			}
}

/* A stripe gain per (y, x) column, constant along z: 1 in 5 columns is off
 * by up to 40%, as a shadow or a bright line through the whole stack. */
static void make_gain(double *gain, uint32_t ny, uint32_t nx)
{
	unsigned long long seed = 5;
	for (size_t i = 0; i < (size_t)ny * nx; i++)
		gain[i] = uniform(&seed) < 0.2 ? 0.6 + 0.8 * uniform(&seed) : 1.0;
}

/* rms over voxels of log((1 + a) / (1 + b)): error in the log domain the
 * filter works in, where a stripe is an additive term. */
static double log_rms(const float *a, const float *b, size_t n)
{
	double sum = 0;
	for (size_t i = 0; i < n; i++) {
		double d = log1p((double)a[i]) - log1p((double)b[i]);
		sum += d * d;
	}
	return sqrt(sum / (double)n);
}

/* After log1p the filter is linear, so a striped volume's error splits into
 * what is left of the stripes (the filter applied to the stripe field on a
 * flat background) and what the filter does to the structure (the filter
 * applied to the stripe-free volume); each is checked, then the sum. */
static void test_stripes_removed(void)
{
	const uint32_t nz = 256, ny = 2, nx = 256;
	const double sigma = 10; /* 4% of the slice width: see docs */
	size_t n = (size_t)nz * ny * nx;
	float *truth = malloc(n * sizeof *truth), *v = malloc(n * sizeof *v);
	float *flat = malloc(n * sizeof *flat);
	double *gain = malloc((size_t)ny * nx * sizeof *gain);
	make_beads(truth, nz, ny, nx);
	make_gain(gain, ny, nx);
	sf_err e = {0};

	/* 1. Stripes alone, on a flat background of 50. */
	for (size_t i = 0; i < n; i++)
		flat[i] = 50.0f;
	for (size_t i = 0; i < n; i++)
		v[i] = (float)(51.0 * gain[i % ((size_t)ny * nx)] - 1.0);
	double stripes_before = log_rms(v, flat, n);
	CHECK(sf_destripe_z(v, nz, ny, nx, sigma, &e) == SF_OK, "destripe: %s", e.msg);
	double stripes_after = log_rms(v, flat, n);
	printf("test_destripe: stripes alone %.4f -> %.4f (log rms)\n", stripes_before,
	       stripes_after);
	CHECK(stripes_after < 0.45 * stripes_before, "stripes only %.4f -> %.4f", stripes_before,
	      stripes_after);

	/* 2. Structure alone: beads keep their peaks, the volume barely moves. */
	memcpy(v, truth, n * sizeof *v);
	CHECK(sf_destripe_z(v, nz, ny, nx, sigma, &e) == SF_OK, "destripe: %s", e.msg);
	double moved = log_rms(v, truth, n), peak = 0;
	for (size_t i = 0; i < n; i++)
		if (truth[i] > 200)
			peak = fmax(peak, fabs(v[i] / truth[i] - 1));
	printf("test_destripe: stripe-free volume moved %.4f (log rms), bead peaks by <= %.1f%%\n",
	       moved, 100 * peak);
	CHECK(moved < 0.3 * stripes_before, "stripe-free volume moved %.4f", moved);
	CHECK(peak < 0.12, "bead peaks moved by up to %.1f%%", 100 * peak);

	/* 3. Striped beads: closer to the truth than before. */
	for (size_t i = 0; i < n; i++)
		v[i] = (float)((1.0 + truth[i]) * gain[i % ((size_t)ny * nx)] - 1.0);
	double before = log_rms(v, truth, n);
	CHECK(sf_destripe_z(v, nz, ny, nx, sigma, &e) == SF_OK, "destripe: %s", e.msg);
	double after = log_rms(v, truth, n);
	printf("test_destripe: striped beads %.4f -> %.4f (log rms to the truth)\n", before, after);
	CHECK(after < 0.6 * before, "striped beads only %.4f -> %.4f", before, after);
	free(truth);
	free(v);
	free(flat);
	free(gain);
}

typedef struct job {
	float *v;
	uint32_t nz, ny, nx;
	int rc;
} job;

static void *run_job(void *arg)
{
	job *j = arg;
	sf_err e = {0};
	j->rc = sf_destripe_z(j->v, j->nz, j->ny, j->nx, 300, &e);
	return NULL;
}

static void test_threads(void)
{
	job jobs[2] = {{NULL, 70, 4, 45, -1}, {NULL, 40, 5, 81, -1}};
	float *serial[2];
	for (int i = 0; i < 2; i++) {
		size_t n = (size_t)jobs[i].nz * jobs[i].ny * jobs[i].nx;
		jobs[i].v = random_floats(n, 40 + i);
		serial[i] = malloc(n * sizeof(float));
		memcpy(serial[i], jobs[i].v, n * sizeof(float));
		sf_err e = {0};
		sf_destripe_z(serial[i], jobs[i].nz, jobs[i].ny, jobs[i].nx, 300, &e);
	}
	pthread_t t[2];
	for (int i = 0; i < 2; i++)
		pthread_create(&t[i], NULL, run_job, &jobs[i]);
	for (int i = 0; i < 2; i++) {
		pthread_join(t[i], NULL);
		size_t n = (size_t)jobs[i].nz * jobs[i].ny * jobs[i].nx;
		CHECK(jobs[i].rc == SF_OK && memcmp(jobs[i].v, serial[i], n * sizeof(float)) == 0,
		      "thread %d differs from the serial result", i);
		free(jobs[i].v);
		free(serial[i]);
	}
}

static float *read_raw(const char *path, size_t n)
{
	FILE *f = fopen(path, "rb");
	float *v = f ? malloc(n * sizeof *v) : NULL;
	if (v && fread(v, sizeof *v, n, f) != n) {
		free(v);
		v = NULL;
	}
	if (f)
		fclose(f);
	if (!v)
		fprintf(stderr, "%s: cannot read %zu floats\n", path, n);
	return v;
}

static int write_raw(const char *path, const float *v, size_t n)
{
	FILE *f = fopen(path, "wb");
	int ok = f && fwrite(v, sizeof *v, n, f) == n;
	if (f && fclose(f) != 0)
		ok = 0;
	if (!ok)
		fprintf(stderr, "%s: cannot write\n", path);
	return ok ? 0 : 1;
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int drive_destripe(char **argv, int argc)
{
	uint32_t nz = (uint32_t)strtoul(argv[3], NULL, 10),
	         ny = (uint32_t)strtoul(argv[4], NULL, 10),
	         nx = (uint32_t)strtoul(argv[5], NULL, 10);
	double sigma = strtod(argv[6], NULL);
	int repeat = argc > 8 ? atoi(argv[8]) : 1;
	size_t n = (size_t)nz * ny * nx;
	float *in = read_raw(argv[2], n), *v = in ? malloc(n * sizeof *v) : NULL;
	if (!v) {
		free(in);
		return 1;
	}
	double best = 1e30;
	sf_err e = {0};
	int rc = SF_OK;
	for (int i = 0; i < (repeat > 0 ? repeat : 1) && rc == SF_OK; i++) {
		memcpy(v, in, n * sizeof *v);
		double t0 = now();
		rc = sf_destripe_z(v, nz, ny, nx, sigma, &e);
		best = fmin(best, now() - t0);
	}
	if (rc != SF_OK)
		fprintf(stderr, "destripe: %s\n", e.msg);
	else
		printf("seconds=%.6f\n", best);
	int out = rc == SF_OK ? write_raw(argv[7], v, n) : 1;
	free(in);
	free(v);
	return out;
}

static int drive_wavedec2(char **argv)
{
	size_t rows = strtoul(argv[3], NULL, 10), cols = strtoul(argv[4], NULL, 10);
	unsigned levels = (unsigned)strtoul(argv[5], NULL, 10);
	float *img = read_raw(argv[2], rows * cols);
	if (!img)
		return 1;
	sf_wavedec2 w;
	sf_err e = {0};
	int rc = sf_db9_wavedec2(img, rows, cols, levels, &w, &e);
	free(img);
	if (rc != SF_OK) {
		fprintf(stderr, "wavedec2: %s\n", e.msg);
		return 1;
	}
	FILE *f = fopen(argv[6], "wb");
	int ok = f != NULL;
	size_t top = w.rows[levels] * w.cols[levels];
	ok = ok && fwrite(w.approx, sizeof(float), top, f) == top;
	for (unsigned l = levels; ok && l >= 1; l--)
		for (int k = 0; k < 3 && ok; k++) {
			size_t n = w.rows[l] * w.cols[l];
			ok = fwrite(w.detail[l][k], sizeof(float), n, f) == n;
		}
	if (f && fclose(f) != 0)
		ok = 0;
	sf_wavedec2_free(&w);
	if (!ok)
		fprintf(stderr, "%s: cannot write\n", argv[6]);
	return ok ? 0 : 1;
}

int main(int argc, char **argv)
{
	if (argc >= 8 && strcmp(argv[1], "--destripe") == 0)
		return drive_destripe(argv, argc);
	if (argc == 7 && strcmp(argv[1], "--wavedec2") == 0)
		return drive_wavedec2(argv);
	if (argc > 1) {
		fprintf(stderr,
		        "usage: %s [--destripe IN nz ny nx sigma OUT [repeat] | --wavedec2 "
		        "IN rows cols levels OUT]\n",
		        argv[0]);
		return 2;
	}
	test_noop_and_errors();
	test_levels_and_gain();
	test_filter_identities();
	test_roundtrip();
	test_stripes_removed();
	test_threads();
	return CHECK_DONE("test_destripe");
}

/* fft_fftw.c — the host engine of fft.h: FFTW single precision plus plain C
 * loops for the Richardson-Lucy steps.
 *
 * Plans: FFTW's planner is not thread-safe, but executing one plan on new
 * arrays from several threads is (fftwf_execute_dft_r2c/c2r).  So one pair
 * of plans per (shape, threads, effort) is made once under plan_lock and kept
 * in a process-wide list that every worker shares; sf_fft_fftw_cleanup frees
 * it.  Every buffer comes from fftwf_malloc, so it has the alignment the
 * plans were made for, and the complex buffer of an out-of-place transform is
 * always a different array from the real one, as the plans assume.
 * Wisdom import/export also goes through plan_lock. */
#include "scopefs/fft.h"

#include <fftw3.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct cached_plans {
	size_t nz, ny, nx;
	int nthreads, measure;
	fftwf_plan fwd, inv;
	struct cached_plans *next;
};

/* The shared plan list and FFTW's planner state; both only under plan_lock. */
static pthread_mutex_t plan_lock = PTHREAD_MUTEX_INITIALIZER;
static struct cached_plans *plan_list; /* protected by plan_lock */
static int threads_ready;              /* fftwf_init_threads done; plan_lock */

struct sf_fft_plan {
	size_t nz, ny, nx;          /* real shape */
	size_t nreal;               /* nz*ny*nx */
	size_t ncplx;               /* nz*ny*(nx/2+1) */
	struct cached_plans *plans; /* shared, owned by plan_list */
};

static int fftw_make_plans(const sf_fft_config *cfg, size_t nz, size_t ny, size_t nx,
                           struct cached_plans **out, sf_err *e)
{
	int measure = cfg->measure ? 1 : 0, nthreads = cfg->nthreads > 0 ? cfg->nthreads : 1;
	for (struct cached_plans *c = plan_list; c; c = c->next)
		if (c->nz == nz && c->ny == ny && c->nx == nx && c->nthreads == nthreads &&
		    c->measure == measure) {
			*out = c;
			return SF_OK;
		}
	if (!threads_ready) {
		if (!fftwf_init_threads())
			return sf_fail(e, SF_ENOMEM, "fftw: cannot start threads");
		threads_ready = 1;
	}
	struct cached_plans *c = calloc(1, sizeof *c);
	size_t nreal = nz * ny * nx, ncplx = nz * ny * (nx / 2 + 1);
	float *r = fftwf_malloc(nreal * sizeof *r);
	fftwf_complex *z = fftwf_malloc(ncplx * sizeof *z);
	if (!c || !r || !z) {
		free(c);
		fftwf_free(r);
		fftwf_free(z);
		return sf_fail(e, SF_ENOMEM, "fftw: plan buffers for %zu x %zu x %zu", nz, ny, nx);
	}
	/* FFTW_MEASURE scribbles on the arrays: these are planning-only ones. */
	memset(r, 0, nreal * sizeof *r);
	unsigned flags = measure ? FFTW_MEASURE : FFTW_ESTIMATE;
	fftwf_plan_with_nthreads(nthreads);
	c->fwd = fftwf_plan_dft_r2c_3d((int)nz, (int)ny, (int)nx, r, z, flags);
	c->inv = fftwf_plan_dft_c2r_3d((int)nz, (int)ny, (int)nx, z, r, flags);
	fftwf_free(r);
	fftwf_free(z);
	if (!c->fwd || !c->inv) {
		if (c->fwd)
			fftwf_destroy_plan(c->fwd);
		if (c->inv)
			fftwf_destroy_plan(c->inv);
		free(c);
		return sf_fail(e, SF_EUNSUPPORTED, "fftw: no plan for %zu x %zu x %zu", nz, ny, nx);
	}
	c->nz = nz, c->ny = ny, c->nx = nx, c->nthreads = nthreads, c->measure = measure;
	c->next = plan_list;
	plan_list = c;
	*out = c;
	return SF_OK;
}

static int fftw_plan_create(const sf_fft_config *cfg, size_t nz, size_t ny, size_t nx,
                            sf_fft_plan **out, sf_err *e)
{
	*out = NULL;
	if (!nz || !ny || !nx || nz > 1u << 20 || ny > 1u << 20 || nx > 1u << 20 ||
	    nz * ny > ((size_t)1 << 40) / nx)
		return sf_fail(e, SF_ERANGE, "fftw: shape %zu x %zu x %zu", nz, ny, nx);
	sf_fft_plan *p = calloc(1, sizeof *p);
	if (!p)
		return sf_fail(e, SF_ENOMEM, "fftw: plan");
	pthread_mutex_lock(&plan_lock);
	int rc = fftw_make_plans(cfg, nz, ny, nx, &p->plans, e);
	pthread_mutex_unlock(&plan_lock);
	if (rc) {
		free(p);
		return rc;
	}
	p->nz = nz, p->ny = ny, p->nx = nx;
	p->nreal = nz * ny * nx;
	p->ncplx = nz * ny * (nx / 2 + 1);
	*out = p;
	return SF_OK;
}

static void fftw_plan_destroy(sf_fft_plan *p)
{
	free(p); /* the FFTW plans stay cached for the next block of this shape */
}

static int fftw_buf_alloc(sf_fft_plan *p, int is_complex, void **out, sf_err *e)
{
	size_t bytes = is_complex ? p->ncplx * sizeof(fftwf_complex) : p->nreal * sizeof(float);
	*out = fftwf_malloc(bytes);
	if (!*out)
		return sf_fail(e, SF_ENOMEM, "fftw: %zu-byte buffer", bytes);
	return SF_OK;
}

static void fftw_buf_free(sf_fft_plan *p, void *buf)
{
	(void)p;
	fftwf_free(buf);
}

static int fftw_upload(sf_fft_plan *p, void *dst, const float *src, sf_err *e)
{
	(void)e;
	memcpy(dst, src, p->nreal * sizeof(float));
	return SF_OK;
}

static int fftw_download(sf_fft_plan *p, float *dst, const void *src, sf_err *e)
{
	(void)e;
	memcpy(dst, src, p->nreal * sizeof(float));
	return SF_OK;
}

static int fftw_forward(sf_fft_plan *p, const void *real_in, void *cplx_out, sf_err *e)
{
	(void)e;
	/* r2c plans keep their input (FFTW_PRESERVE_INPUT is r2c's default). */
	fftwf_execute_dft_r2c(p->plans->fwd, (float *)real_in, cplx_out);
	return SF_OK;
}

static int fftw_inverse(sf_fft_plan *p, void *cplx_in, void *real_out, sf_err *e)
{
	(void)e;
	fftwf_execute_dft_c2r(p->plans->inv, cplx_in, real_out);
	return SF_OK;
}

static int fftw_cmul(sf_fft_plan *p, void *x, const void *h, int conj, sf_err *e)
{
	(void)e;
	float *restrict a = x;
	const float *restrict b = h;
	float s = conj ? -1.0f : 1.0f;
	for (size_t k = 0; k < p->ncplx; k++) {
		float ar = a[2 * k], ai = a[2 * k + 1], br = b[2 * k], bi = s * b[2 * k + 1];
		a[2 * k] = ar * br - ai * bi;
		a[2 * k + 1] = ar * bi + ai * br;
	}
	return SF_OK;
}

static int fftw_rl_ratio(sf_fft_plan *p, void *hx, const void *y, float eps, sf_err *e)
{
	(void)e;
	float *restrict t = hx;
	const float *restrict obs = y;
	/* A plain compare (not fmaxf) lets the compiler vectorise the loop;
	 * a NaN in t still becomes eps. */
	for (size_t k = 0; k < p->nreal; k++) {
		float d = t[k] > eps ? t[k] : eps;
		t[k] = obs[k] / d;
	}
	return SF_OK;
}

static int fftw_rl_update(sf_fft_plan *p, void *x, const void *c, const void *reg, float lambda,
                          sf_err *e)
{
	(void)e;
	float *restrict v = x;
	const float *restrict corr = c, *restrict r = reg;
	if (!r) {
		for (size_t k = 0; k < p->nreal; k++)
			v[k] = fabsf(v[k] * corr[k]);
		return SF_OK;
	}
	for (size_t k = 0; k < p->nreal; k++)
		v[k] = fabsf((1.0f - lambda) * v[k] * corr[k] + lambda * r[k]);
	return SF_OK;
}

static int fftw_r26(sf_fft_plan *p, const void *x, void *out, sf_err *e)
{
	(void)e;
	const float *restrict v = x;
	float *restrict o = out;
	size_t nz = p->nz, ny = p->ny, nx = p->nx;
	for (size_t z = 0; z < nz; z++)
		for (size_t y = 0; y < ny; y++)
			for (size_t xi = 0; xi < nx; xi++) {
				double s = 0.0;
				size_t z0 = z ? z - 1 : 0, z1 = z + 1 < nz ? z + 1 : z;
				size_t y0 = y ? y - 1 : 0, y1 = y + 1 < ny ? y + 1 : y;
				size_t x0 = xi ? xi - 1 : 0, x1 = xi + 1 < nx ? xi + 1 : xi;
				for (size_t a = z0; a <= z1; a++)
					for (size_t b = y0; b <= y1; b++)
						for (size_t c = x0; c <= x1; c++)
							s += v[(a * ny + b) * nx + c];
				size_t k = (z * ny + y) * nx + xi;
				o[k] = (float)((s - v[k]) / 26.0);
			}
	return SF_OK;
}

/* One 1D pass of a normalised kernel along the axis with the given length and
 * stride (replicate edges): dst = w * src. */
static void gauss_axis(const float *src, float *dst, const sf_fft_plan *p, int axis, const float *w,
                       int radius)
{
	size_t len = axis == 0 ? p->nx : axis == 1 ? p->ny : p->nz;
	size_t stride = axis == 0 ? 1 : axis == 1 ? p->nx : p->nx * p->ny;
	size_t lines = p->nreal / len;
	for (size_t l = 0; l < lines; l++) {
		/* Line l starts at: for x, l*nx; for y, (l / nx) * nx*ny + l % nx;
		 * for z, l (the lines are the nx*ny columns). */
		size_t base = axis == 0   ? l * p->nx
		              : axis == 1 ? (l / p->nx) * p->nx * p->ny + l % p->nx
		                          : l;
		for (size_t i = 0; i < len; i++) {
			float s = 0.0f;
			for (int k = -radius; k <= radius; k++) {
				long j = (long)i + k;
				j = j < 0 ? 0 : j >= (long)len ? (long)len - 1 : j;
				s += w[k + radius] * src[base + (size_t)j * stride];
			}
			dst[base + i * stride] = s;
		}
	}
}

static int fftw_gauss(sf_fft_plan *p, void *x, void *tmp, float sigma, int radius, sf_err *e)
{
	if (radius < 0 || radius > 512 || !(sigma > 0.0f))
		return sf_fail(e, SF_EINVAL, "gauss: sigma=%g radius=%d", sigma, radius);
	float w[1025];
	double sum = 0.0;
	for (int k = -radius; k <= radius; k++)
		sum += exp(-(double)k * k / (2.0 * sigma * sigma));
	for (int k = -radius; k <= radius; k++)
		w[k + radius] = (float)(exp(-(double)k * k / (2.0 * sigma * sigma)) / sum);
	gauss_axis(x, tmp, p, 0, w, radius);
	gauss_axis(tmp, x, p, 1, w, radius);
	gauss_axis(x, tmp, p, 2, w, radius);
	memcpy(x, tmp, p->nreal * sizeof(float));
	return SF_OK;
}

static int fftw_norm2(sf_fft_plan *p, const void *x, double *out, sf_err *e)
{
	(void)e;
	const float *v = x;
	double s = 0.0;
	for (size_t k = 0; k < p->nreal; k++)
		s += (double)v[k] * v[k];
	*out = sqrt(s);
	return SF_OK;
}

static const sf_fft_ops fftw_ops = {
    .name = "fftw",
    .plan_create = fftw_plan_create,
    .plan_destroy = fftw_plan_destroy,
    .buf_alloc = fftw_buf_alloc,
    .buf_free = fftw_buf_free,
    .upload = fftw_upload,
    .download = fftw_download,
    .forward = fftw_forward,
    .inverse = fftw_inverse,
    .cmul = fftw_cmul,
    .rl_ratio = fftw_rl_ratio,
    .rl_update = fftw_rl_update,
    .r26 = fftw_r26,
    .gauss = fftw_gauss,
    .norm2 = fftw_norm2,
};

const sf_fft_ops *sf_fft_fftw_ops(void)
{
	return &fftw_ops;
}

int sf_fft_fftw_wisdom_import(const char *path, sf_err *e)
{
	FILE *f = fopen(path, "r");
	if (!f)
		return sf_fail(e, SF_ENOTFOUND, "%s: no FFTW wisdom file", path);
	pthread_mutex_lock(&plan_lock);
	int ok = fftwf_import_wisdom_from_file(f);
	pthread_mutex_unlock(&plan_lock);
	fclose(f);
	return ok ? SF_OK : sf_fail(e, SF_EFORMAT, "%s: not FFTW wisdom", path);
}

int sf_fft_fftw_wisdom_export(const char *path, sf_err *e)
{
	char tmp[4096];
	if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
		return sf_fail(e, SF_EINVAL, "%s: path too long", path);
	FILE *f = fopen(tmp, "w");
	if (!f)
		return sf_fail(e, SF_EIO, "%s: cannot write FFTW wisdom", tmp);
	pthread_mutex_lock(&plan_lock);
	fftwf_export_wisdom_to_file(f);
	pthread_mutex_unlock(&plan_lock);
	int bad = ferror(f);
	bad |= fclose(f) != 0;
	if (bad || rename(tmp, path) != 0) {
		remove(tmp);
		return sf_fail(e, SF_EIO, "%s: cannot write FFTW wisdom", path);
	}
	return SF_OK;
}

void sf_fft_fftw_cleanup(void)
{
	pthread_mutex_lock(&plan_lock);
	while (plan_list) {
		struct cached_plans *c = plan_list;
		plan_list = c->next;
		fftwf_destroy_plan(c->fwd);
		fftwf_destroy_plan(c->inv);
		free(c);
	}
	pthread_mutex_unlock(&plan_lock);
}

/* fft_fftw.c — the host engine of fft.h: FFTW single precision plus plain C
 * loops for the Richardson-Lucy steps.
 *
 * Plans: FFTW's planner is not thread-safe, but executing one plan on new
 * arrays from several threads is (fftwf_execute_dft_r2c/c2r/dft).  So the
 * plans of a (shape, threads, effort) are made once under plan_lock and kept
 * in a process-wide list that every worker shares; sf_fft_fftw_cleanup frees
 * it.  Every buffer comes from fftwf_malloc, so it has the alignment the
 * plans were made for, and the complex buffer of an out-of-place transform is
 * always a different array from the real one, as the plans assume.
 * Wisdom import/export also goes through plan_lock.
 *
 * The fused path (make_transfer, convolve, rl_step; even nx) does not use
 * FFTW's 3D plans.  FFTW_ESTIMATE picks poor 3D plans for many 7-smooth
 * shapes (unbuffered strided loops, scalar codelets: 1.5-2.4x slower than
 * FFTW_MEASURE here), and MEASURE picks by timing, so its bits change from
 * run to run.  Instead the 3D transform is done as passes that each read and
 * write memory once, all with small ESTIMATE plans of contiguous batches,
 * which FFTW does well:
 *   x: each real row of nx is an nx/2-point complex FFT of its (even, odd)
 *      pairs, then a twiddle step gives the nx/2+1 half spectrum (and back);
 *      spectrum rows are padded to an even pitch, so row chunks stay 16-byte
 *      aligned as FFTW's new-array execute requires;
 *   y: per plane, right after its x rows (while it is in cache), COL_CHUNK
 *      columns are gathered into a contiguous scratch buffer A, transformed
 *      out of place into B and scattered back;
 *   z: the same over all planes; a convolution does forward FFT, transfer
 *      multiply and inverse FFT in A and B, with the transfer function
 *      stored in that gathered order.
 * rl_step also does the ratio between the inverse and forward x passes, and
 * the update after the last one, while the rows are in cache: one RL
 * iteration is 5 passes over the spectrum, 4 when the update pass also does
 * the next step's forward x and y (SF_FFT_KEEP_SPECTRUM).  With supports
 * (x_box, y_box) the x and y passes skip the planes and rows where the
 * input is zero or the output unwanted, and the z pass reads and writes
 * only those planes (on a padded grid that is ~20 % of the work).  A
 * point-symmetric kernel has a real transfer function: only its real parts
 * are kept and multiplied, and of a kernel also even in z only half of each
 * z column.  Every pass is a loop over fixed items (planes,
 * column chunks) that do not depend on the thread count; threads take
 * ranges of items, so the bytes are the same whatever cfg->nthreads is. */
#include "scopefs/fft.h"

#include "filter1d.h"

#include <fftw3.h>
#include <math.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_AVX_TWIDDLES 1 /* r2c_pairs_avx, c2r_pairs_avx: chosen at run time */
#endif
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Rows per x-pass plan run and columns per y/z gather (32 complex = 4
 * cache lines per row read). */
enum { ROW_CHUNK = 16, COL_CHUNK = 32 };

struct cached_plans {
	size_t nz, ny, nx;
	int nthreads, measure;
	fftwf_plan fwd, inv; /* whole 3D r2c / c2r (forward, inverse ops; odd nx) */
	/* Fused path, when nx is even; y and z: [0] for a full chunk, [1] for
	 * the remainder (NULL when there is none); x: [n] for n rows (runs of
	 * rows start anywhere: deconv.c's supports).  All FFTW_ESTIMATE, one
	 * thread. */
	int fused;
	fftwf_plan xf[ROW_CHUNK + 1], xb[ROW_CHUNK + 1]; /* nx/2-point c2c over n rows */
	fftwf_plan yf[2], yb[2]; /* ny-point c2c over COL_CHUNK gathered columns, A to B */
	fftwf_plan zf[2], zb[2]; /* nz-point c2c, zf A to B, zb B to A */
	fftwf_complex *twiddle;  /* exp(-2 pi i k / nx), k = 0 .. nx/2 */
	int avx;                 /* the CPU has AVX: the twiddle steps take 4 pairs at once */
	size_t pitch;            /* complex values per spectrum row: nx/2+1, made even */
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
	int nthreads;               /* threads of the fused passes */
	size_t scratch_len;         /* complex values per thread's scratch */
	fftwf_complex *scratch;     /* nthreads * scratch_len; fused path only */
	void *hx;                   /* real buffer of rl_step without the fused path */
};

static void destroy_plan_set(struct cached_plans *c)
{
	fftwf_plan all[] = {c->fwd,   c->inv,   c->yf[0], c->yf[1], c->yb[0],
	                    c->yb[1], c->zf[0], c->zf[1], c->zb[0], c->zb[1]};
	for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
		if (all[i])
			fftwf_destroy_plan(all[i]);
	for (size_t n = 0; n <= ROW_CHUNK; n++) {
		if (c->xf[n])
			fftwf_destroy_plan(c->xf[n]);
		if (c->xb[n])
			fftwf_destroy_plan(c->xb[n]);
	}
	fftwf_free(c->twiddle);
	free(c);
}

/* A batch of `count` n-point c2c transforms, dist apart in and out
 * (idist/odist), planned on the given arrays.  count 0 is no plan (and ok). */
static int plan_batch(size_t n, size_t count, fftwf_complex *in, size_t idist, fftwf_complex *out,
                      size_t odist, int sign, unsigned flags, fftwf_plan *plan)
{
	int len = (int)n;
	*plan = NULL;
	if (!count)
		return 1;
	*plan = fftwf_plan_many_dft(1, &len, (int)count, in, NULL, 1, (int)idist, out, NULL, 1,
	                            (int)odist, sign, flags);
	return *plan != NULL;
}

/* Complex values of one gather buffer: COL_CHUNK columns of the longer of y, z. */
static size_t gather_len(size_t ny, size_t nz)
{
	return COL_CHUNK * (ny > nz ? ny : nz);
}

/* The plans and twiddles of the fused path (caller holds plan_lock). */
static int fused_plans(struct cached_plans *c, fftwf_complex *r, fftwf_complex *z)
{
	size_t M = c->nx / 2, h = M + 1, pitch = h + h % 2;
	size_t rem[2] = {c->ny * pitch % COL_CHUNK, h % COL_CHUNK};
	/* FFTW runs a plan on new arrays only at the SIMD alignment it was
	 * planned for.  Runs of rows start at any row: they are aligned as the
	 * (aligned) buffer starts when every row is, which the even spectrum
	 * pitch and deconv.c's sizes (nx a multiple of 4) make so.  Otherwise
	 * the x plans take any alignment (slower codelets).  The y and z plans
	 * run between a thread's two gather buffers A and B, which start
	 * aligned (out of place: ESTIMATE then copies nothing, 5-35 % faster). */
	int aligned =
	    !fftwf_alignment_of((float *)r + c->nx) && !fftwf_alignment_of((float *)(z + pitch));
	unsigned any = aligned ? 0 : FFTW_UNALIGNED;
	unsigned keep = FFTW_ESTIMATE | FFTW_PRESERVE_INPUT | any;
	unsigned spend = FFTW_ESTIMATE | FFTW_DESTROY_INPUT;
	fftwf_complex *b = z + gather_len(c->ny, c->nz);
	int ok = 1;

	fftwf_plan_with_nthreads(1);
	for (size_t n = 1; n <= ROW_CHUNK && n <= c->ny; n++) {
		ok &= plan_batch(M, n, r, M, z, pitch, FFTW_FORWARD, keep, &c->xf[n]);
		ok &= plan_batch(M, n, z, pitch, r, M, FFTW_BACKWARD, spend | any, &c->xb[n]);
	}
	for (int i = 0; i < 2; i++) {
		/* The y pass runs per plane over h columns, the z pass over ny*h. */
		size_t yc = i ? rem[1] : (h >= COL_CHUNK ? COL_CHUNK : 0);
		size_t zc = i ? rem[0] : (c->ny * pitch >= COL_CHUNK ? COL_CHUNK : 0);
		ok &= plan_batch(c->ny, yc, z, c->ny, b, c->ny, FFTW_FORWARD, spend, &c->yf[i]);
		ok &= plan_batch(c->ny, yc, z, c->ny, b, c->ny, FFTW_BACKWARD, spend, &c->yb[i]);
		ok &= plan_batch(c->nz, zc, z, c->nz, b, c->nz, FFTW_FORWARD, spend, &c->zf[i]);
		ok &= plan_batch(c->nz, zc, b, c->nz, z, c->nz, FFTW_BACKWARD, spend, &c->zb[i]);
	}
	c->twiddle = fftwf_malloc(h * sizeof *c->twiddle);
	if (!ok || !c->twiddle)
		return 0;
	for (size_t k = 0; k <= M; k++) {
		double a = -2.0 * M_PI * (double)k / (double)c->nx;
		c->twiddle[k][0] = (float)cos(a);
		c->twiddle[k][1] = (float)sin(a);
	}
	c->pitch = pitch;
#ifdef HAVE_AVX_TWIDDLES
	c->avx = __builtin_cpu_supports("avx");
#endif
	c->fused = 1;
	return 1;
}

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
	size_t nreal = nz * ny * nx, ncplx = nz * ny * (nx / 2 + 2); /* room for pitch */
	/* The planning arrays also serve the fused plans' chunks and gathers. */
	size_t gather = 2 * gather_len(ny, nz);
	float *r = fftwf_malloc((nreal > 2 * gather ? nreal : 2 * gather) * sizeof *r);
	fftwf_complex *z = fftwf_malloc((ncplx > gather ? ncplx : gather) * sizeof *z);
	if (!c || !r || !z) {
		free(c);
		fftwf_free(r);
		fftwf_free(z);
		return sf_fail(e, SF_ENOMEM, "fftw: plan buffers for %zu x %zu x %zu", nz, ny, nx);
	}
	/* FFTW_MEASURE scribbles on the arrays: these are planning-only ones. */
	memset(r, 0, nreal * sizeof *r);
	unsigned flags = measure ? FFTW_MEASURE : FFTW_ESTIMATE;
	c->nz = nz, c->ny = ny, c->nx = nx, c->nthreads = nthreads, c->measure = measure;
	fftwf_plan_with_nthreads(nthreads);
	c->fwd = fftwf_plan_dft_r2c_3d((int)nz, (int)ny, (int)nx, r, z, flags);
	c->inv = fftwf_plan_dft_c2r_3d((int)nz, (int)ny, (int)nx, z, r, flags);
	int ok = c->fwd && c->inv && (nx % 2 || fused_plans(c, (fftwf_complex *)(void *)r, z));
	fftwf_free(r);
	fftwf_free(z);
	if (!ok) {
		destroy_plan_set(c);
		return sf_fail(e, SF_EUNSUPPORTED, "fftw: no plan for %zu x %zu x %zu", nz, ny, nx);
	}
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
	p->nthreads = cfg->nthreads > 0 ? cfg->nthreads : 1;
	if (p->plans->fused) {
		size_t col = 2 * gather_len(ny, nz), row = ROW_CHUNK * (nx / 2);
		p->scratch_len = col > row ? col : row;
		p->scratch =
		    fftwf_malloc((size_t)p->nthreads * p->scratch_len * sizeof *p->scratch);
		if (!p->scratch) {
			free(p);
			return sf_fail(e, SF_ENOMEM, "fftw: scratch for %d threads", cfg->nthreads);
		}
		memset(p->scratch, 0, (size_t)p->nthreads * p->scratch_len * sizeof *p->scratch);
	}
	*out = p;
	return SF_OK;
}

static void fftw_plan_destroy(sf_fft_plan *p)
{
	if (p) {
		fftwf_free(p->scratch);
		fftwf_free(p->hx);
	}
	free(p); /* the FFTW plans stay cached for the next block of this shape */
}

/* Complex values of a spectrum buffer: nz*ny*(nx/2+1), or rows of the fused
 * path's even pitch. */
static size_t spectrum_len(const sf_fft_plan *p)
{
	return p->plans->fused ? p->nz * p->ny * p->plans->pitch : p->ncplx;
}

/* A complex buffer has one more value after the spectrum: a transfer
 * function's kind there (make_transfer). */
static int fftw_buf_alloc(sf_fft_plan *p, int is_complex, void **out, sf_err *e)
{
	size_t bytes =
	    is_complex ? (spectrum_len(p) + 1) * sizeof(fftwf_complex) : p->nreal * sizeof(float);
	*out = fftwf_malloc(bytes);
	if (!*out)
		return sf_fail(e, SF_ENOMEM, "fftw: %zu-byte buffer", bytes);
	/* Touch every page now, while the context is made, rather than in the
	 * first block's passes (page faults were 8 % of a first block). */
	memset(*out, 0, bytes);
	return SF_OK;
}

static void fftw_buf_free(sf_fft_plan *p, void *buf)
{
	(void)p;
	fftwf_free(buf);
}

static void threaded_copy(sf_fft_plan *p, float *dst, const float *src);

static int fftw_upload(sf_fft_plan *p, void *dst, const float *src, sf_err *e)
{
	(void)e;
	threaded_copy(p, dst, src);
	return SF_OK;
}

static int fftw_download(sf_fft_plan *p, float *dst, const void *src, sf_err *e)
{
	(void)e;
	threaded_copy(p, dst, src);
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

/* One complex value, for copies (aggregates of float may alias float data). */
typedef struct cpx {
	float re, im;
} cpx;

/* The element-wise loops run to a multiple of 8, then a tail: gcc -O2's
 * "very cheap" vectoriser only takes loops whose count it knows to be a
 * multiple of the vector length.  Same values as one plain loop. */

/* a[k] *= b[k], or a[k] *= conj(b[k]) when s is -1.  The SSE2 form does
 * the same operations in the same order (re = ar br - ai bi as ar br +
 * (-ai bi), im = ai br + ar bi), so the same bits. */
static void cmul_run(cpx *restrict a, const cpx *restrict b, size_t n, float s)
{
	size_t k = 0, n8 = n / 8 * 8;
#ifdef __SSE2__
	__m128 sign = _mm_set_ps(s, -s, s, -s); /* lanes: re0 im0 re1 im1, low first */
	for (; k + 2 <= n; k += 2) {
		__m128 va = _mm_loadu_ps(&a[k].re), vb = _mm_loadu_ps(&b[k].re);
		__m128 br = _mm_shuffle_ps(vb, vb, _MM_SHUFFLE(2, 2, 0, 0));
		__m128 bi = _mm_mul_ps(_mm_shuffle_ps(vb, vb, _MM_SHUFFLE(3, 3, 1, 1)), sign);
		__m128 swapped = _mm_shuffle_ps(va, va, _MM_SHUFFLE(2, 3, 0, 1));
		_mm_storeu_ps(&a[k].re, _mm_add_ps(_mm_mul_ps(va, br), _mm_mul_ps(swapped, bi)));
	}
#endif
	for (; k < n8; k++) {
		float ar = a[k].re, ai = a[k].im, br = b[k].re, bi = s * b[k].im;
		a[k] = (cpx){ar * br - ai * bi, ar * bi + ai * br};
	}
	for (; k < n; k++) {
		float ar = a[k].re, ai = a[k].im, br = b[k].re, bi = s * b[k].im;
		a[k] = (cpx){ar * br - ai * bi, ar * bi + ai * br};
	}
}

/* a[k] *= h[k] (real), both parts: the product with a real transfer
 * function.  SSE2 or not, one float multiply per part, so the same bits. */
static void rmul_run(cpx *restrict a, const float *restrict h, size_t n)
{
	size_t k = 0;
#ifdef __SSE2__
	for (; k + 2 <= n; k += 2) {
		__m128 hv =
		    _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(const void *)(h + k)));
		hv = _mm_unpacklo_ps(hv, hv); /* h0 h0 h1 h1 */
		_mm_storeu_ps(&a[k].re, _mm_mul_ps(_mm_loadu_ps(&a[k].re), hv));
	}
#endif
	for (; k < n; k++)
		a[k] = (cpx){a[k].re * h[k], a[k].im * h[k]};
}

/* rmul_run over m gathered columns of nz values, h holding only the first
 * nz/2 + 1 of each column (a z-even transfer function: H[nz - k] = H[k]). */
static void rmul_half_run(cpx *restrict a, const float *restrict h, size_t m, size_t nz)
{
	size_t hz = nz / 2 + 1;
	for (size_t j = 0; j < m; j++) {
		cpx *col = a + j * nz;
		const float *hc = h + j * hz;
		rmul_run(col, hc, hz);
		for (size_t k = hz; k < nz; k++)
			col[k] = (cpx){col[k].re * hc[nz - k], col[k].im * hc[nz - k]};
	}
}

/* t[k] = obs[k] / max(t[k], eps); a plain compare (not fmaxf) vectorises,
 * and a NaN in t still becomes eps. */
static void ratio_run(float *restrict t, const float *restrict obs, size_t n, float eps)
{
	size_t k = 0, n8 = n / 8 * 8;
	for (; k < n8; k++)
		t[k] = obs[k] / (t[k] > eps ? t[k] : eps);
	for (; k < n; k++)
		t[k] = obs[k] / (t[k] > eps ? t[k] : eps);
}

/* v[k] = |(1 - lambda) v[k] c[k] + lambda r[k]|, or |v[k] c[k]| without r. */
static void update_run(float *restrict v, const float *restrict c, const float *restrict r,
                       size_t n, float lambda)
{
	size_t k = 0, n8 = n / 8 * 8;
	float keep = 1.0f - lambda;
	if (!r) {
		for (; k < n8; k++)
			v[k] = fabsf(v[k] * c[k]);
		for (; k < n; k++)
			v[k] = fabsf(v[k] * c[k]);
		return;
	}
	for (; k < n8; k++)
		v[k] = fabsf(keep * v[k] * c[k] + lambda * r[k]);
	for (; k < n; k++)
		v[k] = fabsf(keep * v[k] * c[k] + lambda * r[k]);
}

static int fftw_cmul(sf_fft_plan *p, void *x, const void *h, int conj, sf_err *e)
{
	(void)e;
	cmul_run(x, h, p->ncplx, conj ? -1.0f : 1.0f);
	return SF_OK;
}

static int fftw_rl_ratio(sf_fft_plan *p, void *hx, const void *y, float eps, sf_err *e)
{
	(void)e;
	ratio_run(hx, y, p->nreal, eps);
	return SF_OK;
}

static int fftw_rl_update(sf_fft_plan *p, void *x, const void *c, const void *reg, float lambda,
                          sf_err *e)
{
	(void)e;
	update_run(x, c, reg, p->nreal, lambda);
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
	float *ext = malloc((size_t)p->nthreads * (p->nx + 2 * (size_t)radius) * sizeof *ext);
	if (!ext)
		return sf_fail(e, SF_ENOMEM, "gauss: row buffers");
	filter1d_axis_mt(x, tmp, p->nx, p->ny, p->nz, 0, w, radius, ext, p->nthreads);
	filter1d_axis_mt(tmp, x, p->nx, p->ny, p->nz, 1, w, radius, ext, p->nthreads);
	filter1d_axis_mt(x, tmp, p->nx, p->ny, p->nz, 2, w, radius, ext, p->nthreads);
	memcpy(x, tmp, p->nreal * sizeof(float));
	free(ext);
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

/* Biggs-Andrews predict: v = max(x + alpha (x - prev), 0); prev = x;
 * x = origin = v.  A plain compare, as in ratio_run, so it vectorises. */
static int fftw_ba_predict(sf_fft_plan *p, void *x, void *prev, void *origin, float alpha,
                           sf_err *e)
{
	(void)e;
	float *restrict v = x, *restrict old = prev, *restrict o = origin;
	size_t k = 0, n = p->nreal, n8 = n / 8 * 8;
	if (alpha == 0.0f) { /* prev may be unset (first iteration): not read */
		for (; k < n; k++) {
			float y = v[k] > 0.0f ? v[k] : 0.0f;
			old[k] = v[k], v[k] = y, o[k] = y;
		}
		return SF_OK;
	}
	for (; k < n8; k++) {
		float cur = v[k], y = cur + alpha * (cur - old[k]);
		y = y > 0.0f ? y : 0.0f;
		old[k] = cur, v[k] = y, o[k] = y;
	}
	for (; k < n; k++) {
		float cur = v[k], y = cur + alpha * (cur - old[k]);
		y = y > 0.0f ? y : 0.0f;
		old[k] = cur, v[k] = y, o[k] = y;
	}
	return SF_OK;
}

/* Biggs-Andrews step g = x - origin (in place of origin) and the two dot
 * products.  Four partial sums by k mod 4, added in a fixed order: the
 * result depends only on the shape, never on the thread count. */
static int fftw_ba_step(sf_fft_plan *p, const void *x, void *g, const void *g_old, double dots[2],
                        sf_err *e)
{
	(void)e;
	const float *restrict v = x, *restrict old = g_old;
	float *restrict d = g;
	double gg[4] = {0, 0, 0, 0}, oo[4] = {0, 0, 0, 0};
	size_t k = 0, n = p->nreal, n4 = n / 4 * 4;
	if (!old) {
		for (k = 0; k < n; k++)
			d[k] = v[k] - d[k];
		dots[0] = dots[1] = 0.0;
		return SF_OK;
	}
	for (; k < n4; k += 4)
		for (size_t j = 0; j < 4; j++) {
			float step = v[k + j] - d[k + j];
			d[k + j] = step;
			gg[j] += (double)step * old[k + j];
			oo[j] += (double)old[k + j] * old[k + j];
		}
	for (; k < n; k++) {
		float step = v[k] - d[k];
		d[k] = step;
		gg[0] += (double)step * old[k];
		oo[0] += (double)old[k] * old[k];
	}
	dots[0] = (gg[0] + gg[1]) + (gg[2] + gg[3]);
	dots[1] = (oo[0] + oo[1]) + (oo[2] + oo[3]);
	return SF_OK;
}

/* --- fused path -------------------------------------------------------- */

/* Planes [z0, z1) and rows [y0, y1) of each: where a real array of the
 * fused path may be nonzero (a forward input), or is wanted (an inverse
 * output).  Planes and rows outside are never transformed: the spectrum
 * planes that an input support leaves out are taken as zero and not read. */
typedef struct span {
	size_t y0, y1, z0, z1;
} span;

/* The arguments of one fused pass; items are planes (x and y passes) or
 * column chunks (z pass). */
typedef struct pass_job pass_job;
typedef void (*pass_item_fn)(const pass_job *job, size_t item, fftwf_complex *scratch);
struct pass_job {
	const sf_fft_plan *p;
	pass_item_fn item;
	size_t first, items;  /* items first .. first + items - 1 */
	span in, out;         /* forward input support, inverse output wanted */
	fftwf_complex *spec;  /* the half spectrum being transformed */
	const float *real_in; /* forward input */
	float *real_out;      /* inverse output, or the RL estimate */
	const cpx *tf;        /* transfer function, gathered order */
	const float *tf_real; /* or its real parts alone, when it is real (else NULL) */
	int tf_half;          /* tf_real holds only kz = 0 .. nz/2 of each column */
	int conj;             /* multiply by conj(tf) */
	const float *obs;     /* RL: observed y */
	const float *reg;     /* RL: regulariser or NULL */
	int keep;             /* RL: the update pass also does the next forward x and y */
	float eps, lambda;    /* RL */
};

/* Items [first, end) of the job (counted from job->first), with part's
 * scratch. */
static void pass_part(void *arg, size_t part, size_t first, size_t end)
{
	const pass_job *job = arg;
	fftwf_complex *scratch = job->p->scratch + part * job->p->scratch_len;
	for (size_t i = first; i < end; i++)
		job->item(job, job->first + i, scratch);
}

/* Run every item of job, the threads taking contiguous ranges (ranges.h).
 * Items do not depend on the split, so neither do the bytes. */
static void pass_run(const pass_job *job)
{
	ranges_run(job->items, job->p->nthreads, pass_part, (void *)job);
}

/* Copy plane z of job->real_in to job->real_out. */
static void item_copy(const pass_job *job, size_t z, fftwf_complex *scratch)
{
	size_t plane = job->p->ny * job->p->nx;
	(void)scratch;
	memcpy(job->real_out + z * plane, job->real_in + z * plane, plane * sizeof(float));
}

/* A whole real buffer copied, planes split over the threads of the fused
 * passes (upload/download: one core alone copies at about half the speed).
 * Without the fused path (no per-thread scratch) one memcpy. */
static void threaded_copy(sf_fft_plan *p, float *dst, const float *src)
{
	if (!p->plans->fused || p->nthreads < 2) {
		memcpy(dst, src, p->nreal * sizeof(float));
		return;
	}
	pass_job job = {.p = p, .item = item_copy, .items = p->nz, .real_in = src, .real_out = dst};
	pass_run(&job);
}

#ifdef HAVE_AVX_TWIDDLES
/* The 4 complex values at v in reverse order. */
__attribute__((target("avx"))) static inline __m256 reverse4(__m256 v)
{
	v = _mm256_permute2f128_ps(v, v, 1);
	return _mm256_shuffle_ps(v, v, _MM_SHUFFLE(1, 0, 3, 2));
}

/* d times the twiddles w, lane pair by lane pair: re*wr + sign*(swapped)*wi,
 * where sign (alt or conj) picks r2c's or c2r's direction. */
__attribute__((target("avx"))) static inline __m256 twiddle_avx(__m256 d, __m256 w, __m256 sign)
{
	__m256 wr = _mm256_shuffle_ps(w, w, _MM_SHUFFLE(2, 2, 0, 0));
	__m256 wi = _mm256_shuffle_ps(w, w, _MM_SHUFFLE(3, 3, 1, 1));
	__m256 dswap = _mm256_shuffle_ps(d, d, _MM_SHUFFLE(2, 3, 0, 1));

	return _mm256_add_ps(_mm256_mul_ps(d, wr), _mm256_mul_ps(_mm256_mul_ps(dswap, wi), sign));
}

/* r2c_finish's pairs k = 1, 5, 9, ... four at a time while they do not
 * meet their partners M-k; returns the first k left.  Lane by lane the
 * same operations as the SSE2 and scalar loops, so the same bits. */
__attribute__((target("avx"))) static size_t r2c_pairs_avx(cpx *s, size_t M,
                                                           const fftwf_complex *tw)
{
	const __m256 half = _mm256_set1_ps(0.5f), conj = _mm256_set_ps(-1, 1, -1, 1, -1, 1, -1, 1);
	const __m256 alt = _mm256_set_ps(1, -1, 1, -1, 1, -1, 1, -1);
	size_t k = 1;
	for (; 2 * k + 6 < M; k += 4) {
		__m256 a = _mm256_loadu_ps(&s[k].re), b = _mm256_loadu_ps(&s[M - k - 3].re);
		__m256 w = _mm256_loadu_ps(tw[k]);
		b = _mm256_mul_ps(reverse4(b), conj); /* conj Z[M-k] */
		__m256 e = _mm256_mul_ps(half, _mm256_add_ps(a, b));
		__m256 d = _mm256_mul_ps(half, _mm256_sub_ps(a, b));
		__m256 pw = twiddle_avx(d, w, alt);
		__m256 pswap = _mm256_shuffle_ps(pw, pw, _MM_SHUFFLE(2, 3, 0, 1));
		__m256 xk = _mm256_add_ps(e, _mm256_mul_ps(pswap, conj));
		__m256 xj = _mm256_sub_ps(_mm256_mul_ps(e, conj), pswap);
		_mm256_storeu_ps(&s[k].re, xk);
		_mm256_storeu_ps(&s[M - k - 3].re, reverse4(xj));
	}
	return k;
}

/* c2r_start's pairs, four at a time, as r2c_pairs_avx. */
__attribute__((target("avx"))) static size_t c2r_pairs_avx(cpx *s, size_t M,
                                                           const fftwf_complex *tw)
{
	const __m256 conj = _mm256_set_ps(-1, 1, -1, 1, -1, 1, -1, 1);
	const __m256 alt = _mm256_set_ps(1, -1, 1, -1, 1, -1, 1, -1);
	size_t k = 1;
	for (; 2 * k + 6 < M; k += 4) {
		__m256 x = _mm256_loadu_ps(&s[k].re), y = _mm256_loadu_ps(&s[M - k - 3].re);
		__m256 w = _mm256_loadu_ps(tw[k]);
		y = _mm256_mul_ps(reverse4(y), conj); /* conj X[M-k] */
		__m256 sum = _mm256_add_ps(x, y), d = _mm256_sub_ps(x, y);
		__m256 q = twiddle_avx(d, w, conj);
		__m256 qswap = _mm256_shuffle_ps(q, q, _MM_SHUFFLE(2, 3, 0, 1));
		__m256 zk = _mm256_add_ps(sum, _mm256_mul_ps(qswap, alt));
		__m256 zj = _mm256_add_ps(_mm256_mul_ps(sum, conj), qswap);
		_mm256_storeu_ps(&s[k].re, zk);
		_mm256_storeu_ps(&s[M - k - 3].re, reverse4(zj));
	}
	return k;
}
#endif

/* Half spectrum of a real row from the nx/2-point FFT Z of its (even, odd)
 * pairs, in place (row holds nx/2+1 values):
 * X[k] = (Z[k] + conj Z[M-k]) / 2 - i W^k (Z[k] - conj Z[M-k]) / 2. */
static void r2c_finish(cpx *s, size_t M, const fftwf_complex *tw, int avx)
{
	float z0r = s[0].re, z0i = s[0].im;
	size_t k = 1;
	s[0] = (cpx){z0r + z0i, 0.0f};
	s[M] = (cpx){z0r - z0i, 0.0f};
#ifdef HAVE_AVX_TWIDDLES
	if (avx)
		k = r2c_pairs_avx(s, M, tw);
#else
	(void)avx;
#endif
#ifdef __SSE2__
	/* k and k+1 with their partners M-k and M-k-1, while those differ; the
	 * same operations as the loop below, lane by lane. */
	const __m128 half = _mm_set1_ps(0.5f), conj = _mm_set_ps(-1, 1, -1, 1);
	const __m128 alt = _mm_set_ps(1, -1, 1, -1);
	for (; 2 * k + 2 < M; k += 2) {
		__m128 a = _mm_loadu_ps(&s[k].re), b = _mm_loadu_ps(&s[M - k - 1].re);
		__m128 w = _mm_loadu_ps(tw[k]);
		b = _mm_mul_ps(_mm_shuffle_ps(b, b, _MM_SHUFFLE(1, 0, 3, 2)),
		               conj); /* conj Z[M-k] */
		__m128 e = _mm_mul_ps(half, _mm_add_ps(a, b)),
		       d = _mm_mul_ps(half, _mm_sub_ps(a, b));
		__m128 wr = _mm_shuffle_ps(w, w, _MM_SHUFFLE(2, 2, 0, 0));
		__m128 wi = _mm_shuffle_ps(w, w, _MM_SHUFFLE(3, 3, 1, 1));
		__m128 dswap = _mm_shuffle_ps(d, d, _MM_SHUFFLE(2, 3, 0, 1));
		__m128 pw = _mm_add_ps(_mm_mul_ps(d, wr), _mm_mul_ps(_mm_mul_ps(dswap, wi), alt));
		__m128 pswap = _mm_shuffle_ps(pw, pw, _MM_SHUFFLE(2, 3, 0, 1)); /* pi pr */
		__m128 xk = _mm_add_ps(e, _mm_mul_ps(pswap, conj));
		__m128 xj = _mm_sub_ps(_mm_mul_ps(e, conj), pswap);
		_mm_storeu_ps(&s[k].re, xk);
		_mm_storeu_ps(&s[M - k - 1].re, _mm_shuffle_ps(xj, xj, _MM_SHUFFLE(1, 0, 3, 2)));
	}
#endif
	for (; k <= M / 2; k++) {
		size_t j = M - k;
		float ar = s[k].re, ai = s[k].im, br = s[j].re, bi = s[j].im;
		float er = 0.5f * (ar + br), ei = 0.5f * (ai - bi);
		float dr = 0.5f * (ar - br), di = 0.5f * (ai + bi);
		float wr = tw[k][0], wi = tw[k][1];
		float pr = wr * dr - wi * di, pi = wr * di + wi * dr; /* W^k D */
		s[k] = (cpx){er + pi, ei - pr};
		s[j] = (cpx){er - pi, -ei - pr}; /* W^(M-k) = -conj W^k */
	}
}

/* The inverse of r2c_finish, times 2 (so the backward nx/2-point FFT gives
 * nx times the pairs, as an unnormalised c2r does).  The imaginary parts of
 * X[0] and X[M] are ignored, as FFTW's c2r ignores them. */
static void c2r_start(cpx *s, size_t M, const fftwf_complex *tw, int avx)
{
	float a = s[0].re, b = s[M].re;
	size_t k = 1;
	s[0] = (cpx){a + b, a - b};
#ifdef HAVE_AVX_TWIDDLES
	if (avx)
		k = c2r_pairs_avx(s, M, tw);
#else
	(void)avx;
#endif
#ifdef __SSE2__
	const __m128 conj = _mm_set_ps(-1, 1, -1, 1), alt = _mm_set_ps(1, -1, 1, -1);
	for (; 2 * k + 2 < M; k += 2) {
		__m128 x = _mm_loadu_ps(&s[k].re), y = _mm_loadu_ps(&s[M - k - 1].re);
		__m128 w = _mm_loadu_ps(tw[k]);
		y = _mm_mul_ps(_mm_shuffle_ps(y, y, _MM_SHUFFLE(1, 0, 3, 2)),
		               conj); /* conj X[M-k] */
		__m128 sum = _mm_add_ps(x, y), d = _mm_sub_ps(x, y);
		__m128 wr = _mm_shuffle_ps(w, w, _MM_SHUFFLE(2, 2, 0, 0));
		__m128 wi = _mm_shuffle_ps(w, w, _MM_SHUFFLE(3, 3, 1, 1));
		__m128 dswap = _mm_shuffle_ps(d, d, _MM_SHUFFLE(2, 3, 0, 1));
		__m128 q = _mm_add_ps(_mm_mul_ps(d, wr), _mm_mul_ps(_mm_mul_ps(dswap, wi), conj));
		__m128 qswap = _mm_shuffle_ps(q, q, _MM_SHUFFLE(2, 3, 0, 1)); /* qi qr */
		__m128 zk = _mm_add_ps(sum, _mm_mul_ps(qswap, alt));
		__m128 zj = _mm_add_ps(_mm_mul_ps(sum, conj), qswap);
		_mm_storeu_ps(&s[k].re, zk);
		_mm_storeu_ps(&s[M - k - 1].re, _mm_shuffle_ps(zj, zj, _MM_SHUFFLE(1, 0, 3, 2)));
	}
#endif
	for (; k <= M / 2; k++) {
		size_t j = M - k;
		float ar = s[k].re, ai = s[k].im, br = s[j].re, bi = s[j].im;
		float sr = ar + br, si = ai - bi, dr = ar - br, di = ai + bi;
		float wr = tw[k][0], wi = tw[k][1];
		float qr = wr * dr + wi * di, qi = wr * di - wi * dr; /* conj(W^k) D */
		s[k] = (cpx){sr - qi, si + qr};
		s[j] = (cpx){sr + qi, -si + qr};
	}
}

/* Forward x pass of n rows (1 to ROW_CHUNK): real rows `in` (nx floats
 * apart) to half spectra `out` (pitch apart). */
static void rows_forward(const sf_fft_plan *p, const float *in, size_t n, fftwf_complex *out)
{
	const struct cached_plans *c = p->plans;
	size_t M = p->nx / 2;
	fftwf_execute_dft(c->xf[n], (fftwf_complex *)(void *)in, out);
	for (size_t r = 0; r < n; r++) {
		r2c_finish((cpx *)(void *)(out + r * c->pitch), M, c->twiddle, c->avx);
		if (c->pitch > M + 1) /* the pad column, so z passes see no garbage */
			out[r * c->pitch + M + 1][0] = out[r * c->pitch + M + 1][1] = 0.0f;
	}
}

/* Inverse x pass of n half spectra `in` (destroyed) into real rows `out`. */
static void rows_inverse(const sf_fft_plan *p, fftwf_complex *in, size_t n, float *out)
{
	const struct cached_plans *c = p->plans;
	size_t M = p->nx / 2;
	for (size_t r = 0; r < n; r++)
		c2r_start((cpx *)(void *)(in + r * c->pitch), M, c->twiddle, c->avx);
	fftwf_execute_dft(c->xb[n], in, (fftwf_complex *)(void *)out);
}

/* Rows in a run of rows from r0 to end: ROW_CHUNK, or what is left. */
static size_t row_run(size_t r0, size_t end)
{
	return end - r0 < ROW_CHUNK ? end - r0 : ROW_CHUNK;
}

/* Copy m columns of rows [k0, k1) of n rows, stride apart, into
 * buf[j * n + k], zeros for the other k; and back (rows [k0, k1) only).
 * With SSE2 (every x86-64), 2 x 2 blocks of complex values move as two
 * 16-byte loads and stores: 7-28 % faster than one value at a time. */
static void gather(cpx *restrict buf, const cpx *restrict src, size_t n, size_t stride, size_t m,
                   size_t k0, size_t k1)
{
	size_t j = 0;
	if (k0 || k1 < n)
		for (size_t jj = 0; jj < m; jj++) {
			memset(buf + jj * n, 0, k0 * sizeof *buf);
			memset(buf + jj * n + k1, 0, (n - k1) * sizeof *buf);
		}
#ifdef __SSE2__
	for (; j + 2 <= m; j += 2) {
		size_t k = k0;
		for (; k + 2 <= k1; k += 2) {
			__m128 a = _mm_loadu_ps(&src[k * stride + j].re);
			__m128 b = _mm_loadu_ps(&src[(k + 1) * stride + j].re);
			_mm_storeu_ps(&buf[j * n + k].re, _mm_movelh_ps(a, b));
			_mm_storeu_ps(&buf[(j + 1) * n + k].re, _mm_movehl_ps(b, a));
		}
		for (; k < k1; k++) {
			buf[j * n + k] = src[k * stride + j];
			buf[(j + 1) * n + k] = src[k * stride + j + 1];
		}
	}
#endif
	for (; j < m; j++)
		for (size_t k = k0; k < k1; k++)
			buf[j * n + k] = src[k * stride + j];
}

static void scatter(cpx *restrict dst, const cpx *restrict buf, size_t n, size_t stride, size_t m,
                    size_t k0, size_t k1)
{
	size_t j = 0;
#ifdef __SSE2__
	for (; j + 2 <= m; j += 2) {
		size_t k = k0;
		for (; k + 2 <= k1; k += 2) {
			__m128 a = _mm_loadu_ps(&buf[j * n + k].re);
			__m128 b = _mm_loadu_ps(&buf[(j + 1) * n + k].re);
			_mm_storeu_ps(&dst[k * stride + j].re, _mm_movelh_ps(a, b));
			_mm_storeu_ps(&dst[(k + 1) * stride + j].re, _mm_movehl_ps(b, a));
		}
		for (; k < k1; k++) {
			dst[k * stride + j] = buf[j * n + k];
			dst[k * stride + j + 1] = buf[(j + 1) * n + k];
		}
	}
#endif
	for (; j < m; j++)
		for (size_t k = k0; k < k1; k++)
			dst[k * stride + j] = buf[j * n + k];
}

/* Read bytes [0, n) of a in order, one float per cache line, so that they
 * come into cache as one sequential stream, which the hardware prefetchers
 * follow (the column gathers read a plane across its rows, which they do
 * not: a plane the z pass left in memory came in much slower that way;
 * 3-5 % of a whole block, more than __builtin_prefetch gave).  The sum
 * goes to a volatile local only so that the reads are kept. */
static void touch(const void *a, size_t n)
{
	const float *f = a;
	float acc[4] = {0, 0, 0, 0};
	size_t b = 0, len = n / sizeof *f;
	for (; b + 64 <= len; b += 64)
		acc[0] += f[b], acc[1] += f[b + 16], acc[2] += f[b + 32], acc[3] += f[b + 48];
	for (; b < len; b += 16)
		acc[0] += f[b];
	volatile float sink = acc[0] + acc[1] + acc[2] + acc[3];
	(void)sink;
}

/* The y transform of one plane of the spectrum, COL_CHUNK columns at a
 * time: input rows [in0, in1) (the others taken as zero), output rows
 * [out0, out1) written back.  A backward transform is a pass's first look
 * at the plane: it is read in first. */
static void plane_y(const sf_fft_plan *p, fftwf_complex *plane, fftwf_complex *scratch,
                    int backward, size_t in0, size_t in1, size_t out0, size_t out1)
{
	const struct cached_plans *c = p->plans;
	size_t h = p->nx / 2 + 1;
	cpx *buf = (cpx *)(void *)scratch;
	fftwf_complex *second = scratch + gather_len(p->ny, p->nz);
	if (backward)
		touch(plane + in0 * c->pitch, (in1 - in0) * c->pitch * sizeof *plane);
	for (size_t c0 = 0; c0 < h; c0 += COL_CHUNK) {
		size_t m = h - c0 < COL_CHUNK ? h - c0 : COL_CHUNK;
		int which = m == COL_CHUNK ? 0 : 1;
		cpx *col = (cpx *)(void *)(plane + c0);
		gather(buf, col, p->ny, c->pitch, m, in0, in1);
		fftwf_execute_dft(backward ? c->yb[which] : c->yf[which], scratch, second);
		scatter(col, (cpx *)(void *)second, p->ny, c->pitch, m, out0, out1);
	}
}

/* Plane z forward: x pass of its input rows, then its y transform (in
 * cache). */
static void item_xy_forward(const pass_job *job, size_t z, fftwf_complex *scratch)
{
	const sf_fft_plan *p = job->p;
	size_t h = p->plans->pitch, n, y0 = job->in.y0, y1 = job->in.y1;
	fftwf_complex *plane = job->spec + z * p->ny * h;
	for (size_t r0 = y0; r0 < y1; r0 += n) {
		n = row_run(r0, y1);
		rows_forward(p, job->real_in + (z * p->ny + r0) * p->nx, n, plane + r0 * h);
	}
	plane_y(p, plane, scratch, 0, y0, y1, 0, p->ny);
}

/* Plane z inverse into the wanted rows of job->real_out. */
static void item_xy_inverse(const pass_job *job, size_t z, fftwf_complex *scratch)
{
	const sf_fft_plan *p = job->p;
	size_t h = p->plans->pitch, n, y0 = job->out.y0, y1 = job->out.y1;
	fftwf_complex *plane = job->spec + z * p->ny * h;
	plane_y(p, plane, scratch, 1, 0, p->ny, y0, y1);
	for (size_t r0 = y0; r0 < y1; r0 += n) {
		n = row_run(r0, y1);
		rows_inverse(p, plane + r0 * h, n, job->real_out + (z * p->ny + r0) * p->nx);
	}
}

/* Plane z of Hx: inverse, t = y / max(Hx, eps), forward again, all while
 * the plane is in cache (rows through scratch).  Only the rows where y may
 * be nonzero (job->out): the ratio is 0 elsewhere. */
static void item_xy_ratio(const pass_job *job, size_t z, fftwf_complex *scratch)
{
	const sf_fft_plan *p = job->p;
	size_t h = p->plans->pitch, n, y0 = job->out.y0, y1 = job->out.y1;
	fftwf_complex *plane = job->spec + z * p->ny * h;
	float *t = (float *)(void *)scratch;
	plane_y(p, plane, scratch, 1, 0, p->ny, y0, y1);
	for (size_t r0 = y0; r0 < y1; r0 += n) {
		n = row_run(r0, y1);
		rows_inverse(p, plane + r0 * h, n, t);
		ratio_run(t, job->obs + (z * p->ny + r0) * p->nx, n * p->nx, job->eps);
		rows_forward(p, t, n, plane + r0 * h);
	}
	plane_y(p, plane, scratch, 0, y0, y1, 0, p->ny);
}

/* Plane z of the correction c: inverse into scratch rows, then the RL
 * update of the estimate's rows that may be nonzero (job->out). */
static void item_xy_update(const pass_job *job, size_t z, fftwf_complex *scratch)
{
	const sf_fft_plan *p = job->p;
	size_t h = p->plans->pitch, n, y0 = job->out.y0, y1 = job->out.y1;
	fftwf_complex *plane = job->spec + z * p->ny * h;
	float *corr = (float *)(void *)scratch;
	plane_y(p, plane, scratch, 1, 0, p->ny, y0, y1);
	for (size_t r0 = y0; r0 < y1; r0 += n) {
		n = row_run(r0, y1);
		size_t at = (z * p->ny + r0) * p->nx;
		rows_inverse(p, plane + r0 * h, n, corr);
		update_run(job->real_out + at, corr, job->reg ? job->reg + at : NULL, n * p->nx,
		           job->lambda);
		if (job->keep) /* the next step's forward x pass, while the rows are in cache */
			rows_forward(p, job->real_out + at, n, plane + r0 * h);
	}
	if (job->keep)
		plane_y(p, plane, scratch, 0, y0, y1, 0, p->ny);
}

/* z pass item: columns from item * COL_CHUNK of the ny*h columns: forward
 * (input planes job->in, the others zero), transfer multiply, inverse
 * (planes job->out written back), in scratch. */
static void item_z_convolve(const pass_job *job, size_t item, fftwf_complex *scratch)
{
	const sf_fft_plan *p = job->p;
	const struct cached_plans *c = p->plans;
	size_t cols = p->ny * p->plans->pitch, nz = p->nz, c0 = item * COL_CHUNK;
	size_t m = cols - c0 < COL_CHUNK ? cols - c0 : COL_CHUNK;
	int which = m == COL_CHUNK ? 0 : 1;
	cpx *col = (cpx *)(void *)(job->spec + c0), *buf = (cpx *)(void *)scratch;
	fftwf_complex *second = scratch + gather_len(p->ny, nz);
	gather(buf, col, nz, cols, m, job->in.z0, job->in.z1);
	fftwf_execute_dft(c->zf[which], scratch, second);
	if (job->tf_half)
		rmul_half_run((cpx *)(void *)second, job->tf_real + c0 * (nz / 2 + 1), m, nz);
	else if (job->tf_real) /* conj does nothing to a real H */
		rmul_run((cpx *)(void *)second, job->tf_real + c0 * nz, m * nz);
	else
		cmul_run((cpx *)(void *)second, job->tf + c0 * nz, m * nz,
		         job->conj ? -1.0f : 1.0f);
	fftwf_execute_dft(c->zb[which], second, scratch);
	scatter(col, buf, nz, cols, m, job->out.z0, job->out.z1);
}

/* z pass item of make_transfer: forward only, stored in gathered order. */
static void item_z_transfer(const pass_job *job, size_t item, fftwf_complex *scratch)
{
	const sf_fft_plan *p = job->p;
	size_t cols = p->ny * p->plans->pitch, nz = p->nz, c0 = item * COL_CHUNK;
	size_t m = cols - c0 < COL_CHUNK ? cols - c0 : COL_CHUNK;
	cpx *col = (cpx *)(void *)(job->spec + c0);
	fftwf_complex *second = scratch + gather_len(p->ny, nz);
	gather((cpx *)(void *)scratch, col, nz, cols, m, 0, nz);
	fftwf_execute_dft(p->plans->zf[m == COL_CHUNK ? 0 : 1], scratch, second);
	memcpy((cpx *)(void *)job->real_out + c0 * nz, second, m * nz * sizeof(cpx));
}

/* Run job once per step, over column chunks (z steps) or the planes that
 * the step transforms: forward input planes for item_xy_forward, wanted
 * output planes for the others. */
static void run_passes(pass_job job, const pass_item_fn *steps, size_t nsteps)
{
	size_t cols = job.p->ny * job.p->plans->pitch;
	for (size_t i = 0; i < nsteps; i++) {
		int z_step = steps[i] == item_z_convolve || steps[i] == item_z_transfer;
		const span *planes = steps[i] == item_xy_forward ? &job.in : &job.out;
		job.item = steps[i];
		job.first = z_step ? 0 : planes->z0;
		job.items = z_step ? (cols + COL_CHUNK - 1) / COL_CHUNK : planes->z1 - planes->z0;
		pass_run(&job);
	}
}

/* The whole shape as a span. */
static span span_all(const sf_fft_plan *p)
{
	return (span){0, p->ny, 0, p->nz};
}

/* A caller's box as a span: its y and z extent clipped to the shape (an
 * empty box gives an empty span); NULL is the whole shape. */
static span span_of(const sf_fft_plan *p, const sf_fft_box *b)
{
	if (!b)
		return span_all(p);
	span s = {b->lo[1], b->hi[1] < p->ny ? b->hi[1] : p->ny, b->lo[2],
	          b->hi[2] < p->nz ? b->hi[2] : p->nz};
	if (s.y0 >= s.y1 || s.z0 >= s.z1 || b->lo[0] >= b->hi[0] || b->lo[0] >= p->nx)
		s = (span){0, 0, 0, 0};
	return s;
}

/* Whether k[x, y, -z] = k[x, y, z] for every voxel (z mod nz), exactly. */
static int z_even(const sf_fft_plan *p, const float *k)
{
	size_t plane = p->ny * p->nx;
	for (size_t z = 1; z < p->nz; z++)
		if (memcmp(k + z * plane, k + (p->nz - z) * plane, plane * sizeof *k))
			return 0;
	return 1;
}

/* Whether k[-i] = k[i] for every voxel i (indices mod the shape), exactly. */
static int point_symmetric(const sf_fft_plan *p, const float *k)
{
	size_t nx = p->nx, ny = p->ny, nz = p->nz;
	for (size_t z = 0; z < nz; z++)
		for (size_t y = 0; y < ny; y++) {
			const float *row = k + (z * ny + y) * nx;
			const float *mirror = k + (((nz - z) % nz) * ny + (ny - y) % ny) * nx;
			if (row[0] != mirror[0])
				return 0;
			for (size_t x = 1; x < nx; x++)
				if (row[x] != mirror[nx - x])
					return 0;
		}
	return 1;
}

static int fftw_make_transfer(sf_fft_plan *p, const void *kernel, void *tf, sf_err *e)
{
	if (!p->plans->fused)
		return fftw_forward(p, kernel, tf, e);
	/* The x and y passes go to a scratch spectrum: tf's gathered order
	 * would overwrite columns that later z chunks still have to read. */
	fftwf_complex *spec = fftwf_malloc(spectrum_len(p) * sizeof *spec);
	if (!spec)
		return sf_fail(e, SF_ENOMEM, "fftw: transfer function scratch");
	pass_job job = {.p = p, .spec = spec, .real_in = kernel, .real_out = tf};
	job.in = job.out = span_all(p);
	static const pass_item_fn steps[] = {item_xy_forward, item_z_transfer};
	run_passes(job, steps, 2);
	fftwf_free(spec);
	/* The spectrum of a point-symmetric kernel is real; its imaginary
	 * parts here are rounding.  Keep the real parts alone (in place, front
	 * to back): the z passes then read half the bytes and multiply by a
	 * real.  When the kernel is also even in z, so is H (up to rounding):
	 * each gathered column keeps only kz = 0 .. nz/2, and the z passes
	 * read a quarter of the complex bytes.  The kind goes after the
	 * spectrum: 0 complex, 1 real, 2 real and z-even (tf_real_of). */
	size_t len = spectrum_len(p), nz = p->nz, hz = nz / 2 + 1;
	cpx *v = tf;
	float *h = tf;
	int real = point_symmetric(p, kernel), half = real && z_even(p, kernel);
	for (size_t k = 0; real && k < len; k++)
		h[k] = v[k].re;
	for (size_t col = 0; half && col < len / nz; col++) /* front to back, in place */
		memmove(h + col * hz, h + col * nz, hz * sizeof *h);
	v[len] = (cpx){half ? 2.0f : real ? 1.0f : 0.0f, 0.0f};
	return SF_OK;
}

/* The real parts of a transfer function made by make_transfer when they
 * are all it kept, else NULL; *half tells whether only kz <= nz/2 of each
 * column are there. */
static const float *tf_real_of(const sf_fft_plan *p, const void *tf, int *half)
{
	float kind = ((const cpx *)tf)[spectrum_len(p)].re;
	*half = kind == 2.0f;
	return kind >= 1.0f ? tf : NULL;
}

static int fftw_convolve(sf_fft_plan *p, void *x, void *spec, const void *tf, int conj, sf_err *e)
{
	if (!p->plans->fused) {
		int rc = fftw_forward(p, x, spec, e);
		if (!rc)
			rc = fftw_cmul(p, spec, tf, conj, e);
		return rc ? rc : fftw_inverse(p, spec, x, e);
	}
	pass_job job = {.p = p, .spec = spec, .real_in = x, .real_out = x, .tf = tf, .conj = conj};
	job.tf_real = tf_real_of(p, tf, &job.tf_half);
	job.in = job.out = span_all(p);
	static const pass_item_fn steps[] = {item_xy_forward, item_z_convolve, item_xy_inverse};
	run_passes(job, steps, 3);
	return SF_OK;
}

/* rl_step from the plain ops (odd nx), through the plan's own real buffer. */
static int rl_step_composed(sf_fft_plan *p, void *x, const void *y, void *spec, const void *tf,
                            const void *reg, float lambda, float eps, sf_err *e)
{
	if (!p->hx && fftw_buf_alloc(p, 0, &p->hx, e))
		return SF_ENOMEM;
	int rc = fftw_convolve(p, memcpy(p->hx, x, p->nreal * sizeof(float)), spec, tf, 0, e);
	if (!rc)
		rc = fftw_rl_ratio(p, p->hx, y, eps, e);
	if (!rc)
		rc = fftw_convolve(p, p->hx, spec, tf, 1, e);
	return rc ? rc : fftw_rl_update(p, x, p->hx, reg, lambda, e);
}

/* Hx transforms x's support only and is wanted where y may be nonzero;
 * H^T of the ratio the other way round.  Rows and planes outside x's
 * support keep their zeros. */
static int fftw_rl_step(sf_fft_plan *p, void *x, const void *y, void *spec, const void *tf,
                        const void *reg, float lambda, float eps, const sf_fft_box *x_box,
                        const sf_fft_box *y_box, unsigned flags, sf_err *e)
{
	if (!p->plans->fused)
		return rl_step_composed(p, x, y, spec, tf, reg, lambda, eps, e);
	pass_job job = {.p = p,
	                .spec = spec,
	                .real_in = x,
	                .real_out = x,
	                .tf = tf,
	                .obs = y,
	                .reg = reg,
	                .eps = eps,
	                .lambda = lambda,
	                .keep = (flags & SF_FFT_KEEP_SPECTRUM) != 0};
	job.tf_real = tf_real_of(p, tf, &job.tf_half);
	span xs = span_of(p, x_box), ys = span_of(p, y_box);
	static const pass_item_fn hx[] = {item_xy_forward, item_z_convolve, item_xy_ratio};
	static const pass_item_fn back[] = {item_z_convolve, item_xy_update};
	int ready = (flags & SF_FFT_SPECTRUM_READY) != 0; /* hx[0] done by the last step */
	job.in = xs, job.out = ys;
	run_passes(job, hx + ready, 3 - (size_t)ready);
	job.in = ys, job.out = xs, job.conj = 1;
	run_passes(job, back, 2);
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
    .ba_predict = fftw_ba_predict,
    .ba_step = fftw_ba_step,
    .make_transfer = fftw_make_transfer,
    .convolve = fftw_convolve,
    .rl_step = fftw_rl_step,
};

int sf_fft_host_buffers(const sf_fft_ops *ops)
{
	return ops && ops->upload == fftw_upload;
}

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
		destroy_plan_set(c);
	}
	pthread_mutex_unlock(&plan_lock);
}

void sf_fft_fftw_planner_lock(void)
{
	pthread_mutex_lock(&plan_lock);
}

void sf_fft_fftw_planner_unlock(void)
{
	pthread_mutex_unlock(&plan_lock);
}

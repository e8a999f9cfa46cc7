/* destripe.c — LsDeconv's wavelet-FFT destriping along z (filter_subband_3d_z.m)
 * and the db9 2D wavelet transform under it.
 *
 * The transform is pywt's (and MATLAB's) for an orthogonal filter of F = 18
 * taps in half-point symmetric extension ('symmetric' / 'sym'):
 *   analysis   o[m] = sum_j f[j] x[2m + 1 - j],  m < floor((N + 17) / 2),
 *              x mirrored past both ends (x[-1] = x[0], x[N] = x[N-1]);
 *   synthesis  y[2p]     = sum_{q<9} a[p+q] rec_lo[16-2q] + d[p+q] rec_hi[16-2q],
 *              y[2p + 1] = sum_{q<9} a[p+q] rec_lo[17-2q] + d[p+q] rec_hi[17-2q],
 *              keeping the first N' samples (N' = the finer level's length).
 * Invariant: every synthesis index p + q stays inside the band because
 * N' <= 2n - 16 for a band of n coefficients, so no bounds tests are needed.
 *
 * Destriping is linear after log1p, so it is computed as a correction: only
 * the approximation and the filtered band (cV of a (z, x) slice) are taken
 * down the pyramid, the band's change dV = (g - 1) * V along z is taken back
 * up with every other band zero, and the result is added to the slice.  By
 * perfect reconstruction this equals waverec2 of the filtered coefficients,
 * at about half the work, and a slice with nothing to remove stays bit-exact.
 *
 * The notch along z is applied as a circular convolution with the real,
 * even kernel c = ifft(1 - g): the bands are short (n ~ nz / 2^l), the
 * kernel is built once per level, and this keeps the file free of FFTW and
 * of its planner lock.  docs/deconvolution.md has the measurements. */
#include "scopefs/destripe.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define TAPS SF_DB9_TAPS

/* Daubechies' db9 scaling filter (decomposition low-pass, as pywt and MATLAB
 * list it); sum sqrt(2), unit norm.  The other three filters follow from it. */
static const double db9_dec_lo[TAPS] = {
    3.9347320316271603e-05, -0.00025196318894271012, 0.00023038576352319597, 0.0018476468830562265,
    -0.0042815036824634303, -0.0047232047577513972,  0.022361662123679096,   0.00025094711483145197,
    -0.067632829061329974,  0.03072568147933338,     0.14854074933810638,    -0.096840783222976456,
    -0.29327378327917492,   0.13319738582500756,     0.65728807805130052,    0.60482312369011115,
    0.24383467461259034,    0.038077947363878345,
};

typedef struct db9_bank {
	float dec_lo[TAPS], dec_hi[TAPS]; /* analysis */
	float rec_lo[TAPS], rec_hi[TAPS]; /* synthesis */
} db9_bank;

/* The quadrature-mirror relations pywt's Wavelet('db9') satisfies. */
static void db9_bank_make(db9_bank *b)
{
	for (int j = 0; j < TAPS; j++) {
		double sign = (j & 1) ? -1.0 : 1.0;
		b->dec_lo[j] = (float)db9_dec_lo[j];
		b->rec_lo[j] = (float)db9_dec_lo[TAPS - 1 - j];
		b->rec_hi[j] = (float)(sign * db9_dec_lo[j]);
		b->dec_hi[j] = (float)(-sign * db9_dec_lo[TAPS - 1 - j]);
	}
}

/* Half-point symmetric index into [0, n): ... 1 0 | 0 1 ... n-1 | n-1 n-2 ... */
static size_t mirror(long i, size_t n)
{
	long period = 2 * (long)n;
	i %= period;
	if (i < 0)
		i += period;
	return (size_t)i >= n ? (size_t)(period - 1 - i) : (size_t)i;
}

static size_t band_len(size_t n)
{
	return (n + TAPS - 1) / 2;
}

/* Analysis along axis 0 of src (n_in x cols): lo (and hi unless NULL) get
 * band_len(n_in) rows each. */
static void dwt_axis0(const float *src, size_t n_in, size_t cols, const db9_bank *b, float *lo,
                      float *hi)
{
	size_t n_out = band_len(n_in);
	for (size_t m = 0; m < n_out; m++) {
		float *ol = lo + m * cols, *oh = hi ? hi + m * cols : NULL;
		memset(ol, 0, cols * sizeof *ol);
		if (oh)
			memset(oh, 0, cols * sizeof *oh);
		for (int j = 0; j < TAPS; j++) {
			const float *r = src + mirror((long)(2 * m + 1) - j, n_in) * cols;
			float cl = b->dec_lo[j], ch = b->dec_hi[j];
			for (size_t x = 0; x < cols; x++)
				ol[x] += cl * r[x];
			if (oh)
				for (size_t x = 0; x < cols; x++)
					oh[x] += ch * r[x];
		}
	}
}

/* Analysis along axis 1 of src (rows x n_in): lo and hi (either may be NULL)
 * get band_len(n_in) columns.  pad holds n_in + 2 (TAPS - 2) + 1 floats. */
static void dwt_axis1(const float *src, size_t rows, size_t n_in, const db9_bank *b, float *lo,
                      float *hi, float *pad)
{
	const long edge = TAPS - 2; /* 2m + 1 - j reaches -16 and n_in + 16 */
	size_t n_out = band_len(n_in);
	for (size_t r = 0; r < rows; r++) {
		const float *x = src + r * n_in;
		for (long t = 0; t <= (long)n_in + 2 * edge; t++)
			pad[t] = x[mirror(t - edge, n_in)];
		for (size_t m = 0; m < n_out; m++) {
			const float *p = pad + 2 * m + 1 + edge; /* p[-j] = x[2m + 1 - j] */
			float sl = 0, sh = 0;
			for (int j = 0; j < TAPS; j++) {
				sl += b->dec_lo[j] * p[-j];
				sh += b->dec_hi[j] * p[-j];
			}
			if (lo)
				lo[r * n_out + m] = sl;
			if (hi)
				hi[r * n_out + m] = sh;
		}
	}
}

/* Synthesis along axis 0: dst (keep x cols) from bands lo and hi (n x cols,
 * either may be NULL for a zero band), keep <= 2n - 16.  With add set the
 * result is added to dst instead of stored. */
static void idwt_axis0(const float *lo, const float *hi, size_t cols, const db9_bank *b,
                       size_t keep, float *dst, int add)
{
	for (size_t k = 0; k < keep; k++) {
		float *o = dst + k * cols;
		size_t p = k / 2;
		int phase = (int)(k & 1); /* taps 16 - 2q (even k) or 17 - 2q (odd k) */
		if (!add)
			memset(o, 0, cols * sizeof *o);
		for (int q = 0; q < 9; q++) {
			int j = 16 + phase - 2 * q;
			if (lo) {
				const float *r = lo + (p + q) * cols;
				float c = b->rec_lo[j];
				for (size_t x = 0; x < cols; x++)
					o[x] += c * r[x];
			}
			if (hi) {
				const float *r = hi + (p + q) * cols;
				float c = b->rec_hi[j];
				for (size_t x = 0; x < cols; x++)
					o[x] += c * r[x];
			}
		}
	}
}

/* Synthesis along axis 1: dst (rows x keep) from bands lo and hi (rows x n,
 * either may be NULL), keep <= 2n - 16. */
static void idwt_axis1(const float *lo, const float *hi, size_t rows, size_t n, const db9_bank *b,
                       size_t keep, float *dst)
{
	for (size_t r = 0; r < rows; r++) {
		const float *a = lo ? lo + r * n : NULL, *d = hi ? hi + r * n : NULL;
		float *o = dst + r * keep;
		for (size_t k = 0; k < keep; k++) {
			size_t p = k / 2;
			int phase = (int)(k & 1);
			float s = 0;
			for (int q = 0; q < 9; q++) {
				int j = 16 + phase - 2 * q;
				if (a)
					s += a[p + q] * b->rec_lo[j];
				if (d)
					s += d[p + q] * b->rec_hi[j];
			}
			o[k] = s;
		}
	}
}

unsigned sf_db9_max_level(size_t rows, size_t cols)
{
	size_t n = rows < cols ? rows : cols;
	unsigned level = 0;
	while (level < SF_DB9_MAX_LEVELS && n / (TAPS - 1) >= ((size_t)2 << level))
		level++;
	return level;
}

/* a * b + c floats, or 0 when that overflows. */
static size_t floats(size_t a, size_t b, size_t c)
{
	size_t n;
	if (__builtin_mul_overflow(a, b, &n) || __builtin_add_overflow(n, c, &n) ||
	    n > SIZE_MAX / sizeof(float))
		return 0;
	return n;
}

static void level_shapes(size_t rows, size_t cols, unsigned levels, size_t *r, size_t *c)
{
	r[0] = rows, c[0] = cols;
	for (unsigned l = 1; l <= levels; l++)
		r[l] = band_len(r[l - 1]), c[l] = band_len(c[l - 1]);
}

void sf_wavedec2_free(sf_wavedec2 *w)
{
	if (!w)
		return;
	free(w->approx);
	w->approx = NULL;
	for (unsigned l = 0; l <= SF_DB9_MAX_LEVELS; l++)
		for (int k = 0; k < 3; k++) {
			free(w->detail[l][k]);
			w->detail[l][k] = NULL;
		}
	w->levels = 0;
}

int sf_db9_wavedec2(const float *img, size_t rows, size_t cols, unsigned levels, sf_wavedec2 *w,
                    sf_err *e)
{
	memset(w, 0, sizeof *w);
	unsigned max = sf_db9_max_level(rows, cols);
	if (!img || levels < 1 || levels > max)
		return sf_fail(
		    e, SF_EINVAL,
		    "db9 wavedec2: %u levels asked of a %zu x %zu image (1 to %u possible)", levels,
		    rows, cols, max);
	w->levels = levels;
	level_shapes(rows, cols, levels, w->rows, w->cols);
	size_t half = floats(w->rows[1], cols, 0), band = floats(w->rows[1], w->cols[1], 0);
	float *t_lo = NULL, *t_hi = NULL, *cur = NULL, *pad = NULL;
	if (half && band) {
		t_lo = malloc(half * sizeof *t_lo);
		t_hi = malloc(half * sizeof *t_hi);
		cur = malloc(band * sizeof *cur);
		pad = malloc((cols + 2 * TAPS) * sizeof *pad);
	}
	int rc = SF_OK;
	for (unsigned l = 1; l <= levels && t_lo && t_hi && cur && pad; l++) {
		size_t n = w->rows[l] * w->cols[l];
		for (int k = 0; k < 3 && rc == SF_OK; k++)
			if (!(w->detail[l][k] = malloc(n * sizeof(float))))
				rc = SF_ENOMEM;
		if (rc != SF_OK)
			break;
		db9_bank b;
		db9_bank_make(&b);
		const float *src = l == 1 ? img : cur;
		dwt_axis0(src, w->rows[l - 1], w->cols[l - 1], &b, t_lo, t_hi);
		dwt_axis1(t_hi, w->rows[l], w->cols[l - 1], &b, w->detail[l][0], w->detail[l][2],
		          pad);
		dwt_axis1(t_lo, w->rows[l], w->cols[l - 1], &b, cur, w->detail[l][1], pad);
	}
	if (rc == SF_OK && t_lo && t_hi && cur && pad) {
		w->approx = cur; /* the last level's approximation */
		cur = NULL;
	} else {
		rc = SF_ENOMEM;
	}
	free(t_lo);
	free(t_hi);
	free(cur);
	free(pad);
	if (rc != SF_OK) {
		sf_wavedec2_free(w);
		return sf_fail(e, rc, "db9 wavedec2: out of memory for a %zu x %zu image", rows,
		               cols);
	}
	return SF_OK;
}

int sf_db9_waverec2(const sf_wavedec2 *w, float *img, sf_err *e)
{
	if (!w || !img || w->levels < 1 || w->levels > SF_DB9_MAX_LEVELS || !w->approx)
		return sf_fail(e, SF_EINVAL, "db9 waverec2: no decomposition to rebuild");
	size_t half = floats(w->rows[1], w->cols[0], 0), band = floats(w->rows[1], w->cols[1], 0);
	float *u_lo = half ? malloc(half * sizeof *u_lo) : NULL;
	float *u_hi = half ? malloc(half * sizeof *u_hi) : NULL;
	float *a = band ? malloc(band * sizeof *a) : NULL;
	if (!u_lo || !u_hi || !a) {
		free(u_lo);
		free(u_hi);
		free(a);
		return sf_fail(e, SF_ENOMEM, "db9 waverec2: out of memory for a %zu x %zu image",
		               w->rows[0], w->cols[0]);
	}
	db9_bank b;
	db9_bank_make(&b);
	unsigned top = w->levels;
	memcpy(a, w->approx, w->rows[top] * w->cols[top] * sizeof *a);
	for (unsigned l = top; l >= 1; l--) {
		size_t r = w->rows[l], c = w->cols[l], keep = w->cols[l - 1];
		idwt_axis1(a, w->detail[l][1], r, c, &b, keep, u_lo);
		idwt_axis1(w->detail[l][0], w->detail[l][2], r, c, &b, keep, u_hi);
		idwt_axis0(u_lo, u_hi, keep, &b, w->rows[l - 1], l == 1 ? img : a, 0);
	}
	free(u_lo);
	free(u_hi);
	free(a);
	return SF_OK;
}

double sf_destripe_gain(double sigma, size_t n, uint32_t nx, size_t k)
{
	double unitless = fmax(sigma / (double)nx, (double)FLT_EPSILON);
	double s = (double)(n / 2 + 1) * unitless;
	return 1.0 - exp(-((double)k * (double)k) / (2.0 * s * s));
}

/* c = ifft(1 - g) for a band n long: the kernel whose circular convolution
 * along z gives V - g * V.  g is even in k, so c is real and even. */
static void notch_kernel(double sigma, size_t n, uint32_t nx, float *c)
{
	for (size_t d = 0; d < n; d++) {
		double s = 0;
		for (size_t i = 0; i < n; i++) {
			size_t k = i < n - i ? i : n - i;
			size_t phase = (i * d) % n; /* exact angle reduction */
			s += (1.0 - sf_destripe_gain(sigma, n, nx, k)) *
			     cos(2.0 * M_PI * (double)phase / (double)n);
		}
		c[d] = (float)(s / (double)n);
	}
}

/* dv = -(c circularly convolved with v along axis 0); v, dv are n x cols.
 * c is even (c[d] = c[n - d]), so rows j - d and j + d share one multiply. */
static void notch_delta(const float *v, size_t n, size_t cols, const float *c, float *dv)
{
	for (size_t j = 0; j < n; j++) {
		float *o = dv + j * cols;
		const float *mid = v + j * cols;
		float w0 = -c[0];
		for (size_t x = 0; x < cols; x++)
			o[x] = w0 * mid[x];
		for (size_t d = 1; 2 * d < n; d++) {
			const float *lo = v + ((j + n - d) % n) * cols,
			            *hi = v + ((j + d) % n) * cols;
			float w = -c[d];
			for (size_t x = 0; x < cols; x++)
				o[x] += w * (lo[x] + hi[x]);
		}
		if (n % 2 == 0) {
			const float *far = v + ((j + n / 2) % n) * cols;
			float w = -c[n / 2];
			for (size_t x = 0; x < cols; x++)
				o[x] += w * far[x];
		}
	}
}

/* Per-call scratch of sf_destripe_z, sized for one slice. */
typedef struct destripe_work {
	unsigned levels;
	size_t r[SF_DB9_MAX_LEVELS + 1], c[SF_DB9_MAX_LEVELS + 1]; /* band shapes */
	size_t v_at[SF_DB9_MAX_LEVELS + 1]; /* offset of level l's band in v */
	size_t k_at[SF_DB9_MAX_LEVELS + 1]; /* offset of level l's kernel in kern */
	float *slice;                       /* r0 x c0: log1p of the slice, then the result */
	float *half;  /* r1 x c0: low-pass along z; later the axis-1 synthesis */
	float *a, *b; /* r1 x c1 each: approximation / dV scratch / delta ping-pong */
	float *v;     /* every level's band, then its change dV */
	float *kern;  /* every level's notch kernel */
	float *pad;   /* c0 + 2 TAPS */
} destripe_work;

static void work_free(destripe_work *w)
{
	free(w->slice);
	free(w->half);
	free(w->a);
	free(w->b);
	free(w->v);
	free(w->kern);
	free(w->pad);
}

static int work_alloc(destripe_work *w, uint32_t nz, uint32_t nx, double sigma)
{
	memset(w, 0, sizeof *w);
	w->levels = sf_db9_max_level(nz, nx);
	level_shapes(nz, nx, w->levels, w->r, w->c);
	size_t v_total = 0, k_total = 0;
	for (unsigned l = 1; l <= w->levels; l++) {
		w->v_at[l] = v_total, w->k_at[l] = k_total;
		v_total += w->r[l] * w->c[l];
		k_total += w->r[l];
	}
	size_t band = w->r[1] * w->c[1];
	w->slice = malloc(floats(nz, nx, 0) * sizeof(float));
	w->half = malloc(floats(w->r[1], nx, 0) * sizeof(float));
	w->a = malloc(band * sizeof(float));
	w->b = malloc(band * sizeof(float));
	w->v = malloc(v_total * sizeof(float));
	w->kern = malloc(k_total * sizeof(float));
	w->pad = malloc(floats(nx, 1, 2 * TAPS) * sizeof(float));
	if (!w->slice || !w->half || !w->a || !w->b || !w->v || !w->kern || !w->pad) {
		work_free(w);
		return SF_ENOMEM;
	}
	for (unsigned l = 1; l <= w->levels; l++)
		notch_kernel(sigma, w->r[l], nx, w->kern + w->k_at[l]);
	return SF_OK;
}

/* w->slice (log domain) += the change that notching cV along z makes. */
static void destripe_slice(destripe_work *w, const db9_bank *b)
{
	/* Down: the approximation and cV = low-pass z, high-pass x, notched. */
	const float *cur = w->slice;
	for (unsigned l = 1; l <= w->levels; l++) {
		float *v = w->v + w->v_at[l];
		dwt_axis0(cur, w->r[l - 1], w->c[l - 1], b, w->half, NULL);
		dwt_axis1(w->half, w->r[l], w->c[l - 1], b, l < w->levels ? w->a : NULL, v, w->pad);
		notch_delta(v, w->r[l], w->c[l], w->kern + w->k_at[l], w->b);
		memcpy(v, w->b, w->r[l] * w->c[l] * sizeof *v);
		cur = w->a;
	}
	/* Up: the change alone, every other band zero. */
	float *delta = NULL, *next = w->a;
	for (unsigned l = w->levels; l >= 1; l--) {
		size_t keep = w->c[l - 1];
		idwt_axis1(delta, w->v + w->v_at[l], w->r[l], w->c[l], b, keep, w->half);
		if (l == 1) {
			idwt_axis0(w->half, NULL, keep, b, w->r[0], w->slice, 1);
		} else {
			idwt_axis0(w->half, NULL, keep, b, w->r[l - 1], next, 0);
			delta = next;
			next = next == w->a ? w->b : w->a;
		}
	}
}

int sf_destripe_z(float *block, uint32_t nz, uint32_t ny, uint32_t nx, double sigma, sf_err *e)
{
	if (isnan(sigma) || isinf(sigma))
		return sf_fail(e, SF_EINVAL, "destripe_sigma=%g: must be a finite number", sigma);
	if (sigma <= 0 || ny == 0 || sf_db9_max_level(nz, nx) == 0)
		return SF_OK;
	if (!block)
		return sf_fail(e, SF_EINVAL, "destripe: no block (%u x %u x %u)", nx, ny, nz);
	if (!floats(floats(nz, ny, 0), nx, 0))
		return sf_fail(e, SF_ERANGE, "destripe: block %u x %u x %u is too large", nx, ny,
		               nz);
	destripe_work w;
	if (work_alloc(&w, nz, nx, sigma) != SF_OK)
		return sf_fail(e, SF_ENOMEM, "destripe: out of memory for %u x %u slices", nx, nz);
	db9_bank b;
	db9_bank_make(&b);
	size_t plane = (size_t)ny * nx;
	for (uint32_t y = 0; y < ny; y++) {
		for (uint32_t z = 0; z < nz; z++) {
			const float *src = block + z * plane + (size_t)y * nx;
			float *dst = w.slice + (size_t)z * nx;
			for (uint32_t x = 0; x < nx; x++)
				dst[x] = log1pf(src[x]);
		}
		destripe_slice(&w, &b);
		for (uint32_t z = 0; z < nz; z++) {
			const float *src = w.slice + (size_t)z * nx;
			float *dst = block + z * plane + (size_t)y * nx;
			for (uint32_t x = 0; x < nx; x++)
				dst[x] = expm1f(src[x]);
		}
	}
	work_free(&w);
	return SF_OK;
}

/* register_nonrigid.c — non-rigid refinement after the affine map
 * (sf_reg_nonrigid): multi-resolution diffeomorphic demons with symmetric
 * forces on locally normalised images.
 *
 * The moving thumbnail is first resampled onto the reference grid through
 * the affine map m (movA(x) = mov(m x)), so the field D is found between
 * two images of one geometry: ref(x) ~ movA(x + D(x)) = mov(m (x + D(x))).
 *
 * Intensity: stains and rounds differ in gain, and tissue differs locally,
 * so both images are replaced at each level by their local contrast
 *     N(I) = (I - G*I) / sqrt(G*(I - G*I)^2 + eps^2),  G a Gaussian of sigma_norm,
 * eps^2 the mean local variance over the used pixels (so flat background
 * is not blown up into noise).
 *
 * Each demons iteration at a level (Vercauteren et al. 2009):
 *   1. W = Nmov(x + u)                                  (bilinear)
 *   2. du = -wt (W - Nref) J / (|J|^2 + (W - Nref)^2 / (2 max_step)^2 + c),
 *      J = (grad Nref + grad W) / 2 (symmetric / ESM force), |du| <= max_step;
 *      wt = the reference mask times "m x inside mov" (0 ignores a pixel);
 *      c = grad_floor * mean |grad Nref|^2 damps the update where the
 *      reference is flat (plain demons moves by max_step there, fitting noise)
 *   3. du := G_fluid * du
 *   4. u := u o (id + du), i.e. u(x) := du(x) + u(x + du(x))  (composing
 *      small smoothed updates, each the first-order exp of the update, keeps
 *      the map invertible in practice; jac_min reports it)
 *   5. u := G_diff * u
 * coarse to fine over box-halved pyramids, the field doubled and resampled
 * between levels, until the mean squared mismatch stops falling.
 *
 * Memory at the finest level of n pixels: 7 n floats (two normalised
 * images, the field, the update, one scratch), plus movA and the weights at
 * the thumbnail size with their pyramids. */
#include "scopefs/register.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "register_math.h"

#define MAX_SIGMA  20.0  /* px: taps to 3 sigma stay on a small stack kernel */
#define MAX_RADIUS 60    /* ceil(3 * MAX_SIGMA) */
#define EPS_FRAC   1.0   /* eps^2 of the local normalisation, in mean local variances */
#define STALL_WIN  5     /* window of the convergence test (iterations) */
#define STALL_TOL  0.002 /* stop a level when the mismatch falls less (relative) */

/* The float planes of one pyramid level (all w * h). */
typedef struct nr_level {
	long w, h;
	float *ref, *mov; /* locally normalised images */
	const float *wt;  /* force weight in [0, 1] (borrowed from the weight pyramid) */
	float *ux, *uy;   /* the field, level px */
	float *dx, *dy;   /* the update, then the composed field */
	float *scratch;   /* warped moving image; blur scratch */
	float floor_g2;   /* added to |J|^2: grad_floor * mean |grad Nref|^2 */
	double *part;     /* per row block: the mismatch sums of forces() */
	reg_pool *pool;   /* borrowed: NULL on small levels (serial) */
} nr_level;

void sf_reg_nonrigid_opts_default(sf_reg_nonrigid_opts *o)
{
	o->step = 1;
	o->min_dim = 32;
	o->max_dim = 1024;
	o->iter_coarse = 60;
	o->iter_fine = 30;
	o->sigma_fluid = 1.0;
	o->sigma_diff = 2.0;
	o->sigma_norm = 4.0;
	o->max_step = 0.5;
	o->grad_floor = 2.0;
	o->threads = 1;
}

void sf_reg_field_free(sf_reg_field *f)
{
	free(f->d);
	memset(f, 0, sizeof *f);
}

/* --- small image kernels ---------------------------------------------------- */

static inline long clampl(long v, long lo, long hi)
{
	return v < lo ? lo : v > hi ? hi : v;
}

/* Bilinear sample of plane p (w x h) at (x, y), coordinates clamped to the
 * edge pixel centres (the field and images continue flat outside). */
static inline float sample_clamp(const float *p, long w, long h, double x, double y)
{
	x = x > 0 ? (x < (double)(w - 1) ? x : (double)(w - 1)) : 0;
	y = y > 0 ? (y < (double)(h - 1) ? y : (double)(h - 1)) : 0;
	long ix = (long)x, iy = (long)y;
	long ix1 = ix + (ix + 1 < w), iy1 = iy + (iy + 1 < h);
	float ax = (float)(x - (double)ix), ay = (float)(y - (double)iy);
	const float *r0 = p + iy * w, *r1 = p + iy1 * w;
	float top = r0[ix] + ax * (r0[ix1] - r0[ix]), bot = r1[ix] + ax * (r1[ix1] - r1[ix]);
	return top + ay * (bot - top);
}

/* d[x] = sum over t of k[t] rows[t][x] (t = 0 .. 2 r), x < n, for a
 * symmetric kernel (k[t] = k[2 r - t], as blur() makes it): the mirrored
 * taps are added first and multiplied once.  Sixteen lanes at a time
 * through GCC/Clang vector types, the accumulators in registers: one read
 * of each row and one write of d.  Built twice, for AVX2 and for the
 * baseline, picked at load time: the same operations in the same order (no
 * fused multiply-add), so the same result on either. */
__attribute__((target_clones("avx2", "default"))) static void
taps_sum(float *restrict d, const float *const *rows, const float *k, int r, long n)
{
	typedef float v8f __attribute__((vector_size(32)));
	long x = 0;
	for (; x + 16 <= n; x += 16) {
		v8f kc = {k[r], k[r], k[r], k[r], k[r], k[r], k[r], k[r]}, a0, a1, b0, b1;
		memcpy(&b0, rows[r] + x, sizeof b0);
		memcpy(&b1, rows[r] + x + 8, sizeof b1);
		a0 = kc * b0;
		a1 = kc * b1;
		for (int t = 0; t < r; t++) {
			v8f kv = {k[t], k[t], k[t], k[t], k[t], k[t], k[t], k[t]}, c0, c1;
			memcpy(&b0, rows[t] + x, sizeof b0);
			memcpy(&b1, rows[t] + x + 8, sizeof b1);
			memcpy(&c0, rows[2 * r - t] + x, sizeof c0);
			memcpy(&c1, rows[2 * r - t] + x + 8, sizeof c1);
			a0 += kv * (b0 + c0);
			a1 += kv * (b1 + c1);
		}
		memcpy(d + x, &a0, sizeof a0);
		memcpy(d + x + 8, &a1, sizeof a1);
	}
	for (; x < n; x++) {
		float acc = k[r] * rows[r][x];
		for (int t = 0; t < r; t++)
			acc += k[t] * (rows[t][x] + rows[2 * r - t][x]);
		d[x] = acc;
	}
}

static void blur_rows(const float *src, float *dst, long w, long y0, long y1, const float *k, int r)
{
	const float *rows[2 * MAX_RADIUS + 1];
	for (long y = y0; y < y1; y++) {
		const float *restrict s = src + y * w;
		float *restrict d = dst + y * w;
		long lo = r < w ? r : w, hi = w - r > lo ? w - r : lo; /* interior [lo, hi) */
		for (long x = 0; x < lo; x++) {
			float acc = 0;
			for (int t = -r; t <= r; t++)
				acc += k[t + r] * s[clampl(x + t, 0, w - 1)];
			d[x] = acc;
		}
		for (long x = hi; x < w; x++) {
			float acc = 0;
			for (int t = -r; t <= r; t++)
				acc += k[t + r] * s[clampl(x + t, 0, w - 1)];
			d[x] = acc;
		}
		for (int t = -r; t <= r; t++)
			rows[t + r] = s + lo + t;
		taps_sum(d + lo, rows, k, r, hi - lo);
	}
}

/* Row by row, so the inner loop runs along x over whole rows (vectorises). */
static void blur_cols(const float *src, float *dst, long w, long h, long y0, long y1,
                      const float *k, int r)
{
	const float *rows[2 * MAX_RADIUS + 1];
	for (long y = y0; y < y1; y++) {
		for (int t = -r; t <= r; t++)
			rows[t + r] = src + clampl(y + t, 0, h - 1) * w;
		taps_sum(dst + y * w, rows, k, r, w);
	}
}

/* One pass of a blur over row blocks (blur_block). */
typedef struct blur_job {
	const float *src;
	float *dst;
	long w, h;
	const float *k;
	int r, cols; /* cols: the vertical pass */
} blur_job;

static void blur_block(void *ctx, long b)
{
	const blur_job *j = ctx;
	long y0 = b * REG_BLOCK_ROWS, y1 = y0 + REG_BLOCK_ROWS < j->h ? y0 + REG_BLOCK_ROWS : j->h;
	if (j->cols)
		blur_cols(j->src, j->dst, j->w, j->h, y0, y1, j->k, j->r);
	else
		blur_rows(j->src, j->dst, j->w, y0, y1, j->k, j->r);
}

/* In-place Gaussian blur of p (edges replicated, taps to 3 sigma) through
 * tmp (w * h floats), rows split over the pool (may be NULL).  sigma <= 0
 * does nothing; sigma <= MAX_SIGMA.  Every output pixel is computed the
 * same way whatever the split. */
static void blur(reg_pool *pool, float *p, float *tmp, long w, long h, double sigma)
{
	if (!(sigma > 0))
		return;
	float k[2 * MAX_RADIUS + 1];
	int r = (int)ceil(3 * sigma);
	r = r > MAX_RADIUS ? MAX_RADIUS : r;
	double sum = 0;
	for (int t = -r; t <= r; t++)
		sum += k[t + r] = (float)exp(-0.5 * t * t / (sigma * sigma));
	for (int t = 0; t <= 2 * r; t++)
		k[t] = (float)(k[t] / sum);
	blur_job rows = {p, tmp, w, h, k, r, 0}, cols = {tmp, p, w, h, k, r, 1};
	reg_pool_run(pool, reg_row_blocks(h), blur_block, &rows);
	reg_pool_run(pool, reg_row_blocks(h), blur_block, &cols);
}

/* out := N(in) (see the top of the file), using a and tmp as scratch. */
static void normalise_local(reg_pool *pool, const float *in, const float *wt, long w, long h,
                            double sigma, float *out, float *a, float *tmp)
{
	size_t n = (size_t)w * h;
	memcpy(a, in, n * sizeof *a);
	blur(pool, a, tmp, w, h, sigma);
	for (size_t i = 0; i < n; i++) {
		out[i] = in[i] - a[i];
		a[i] = out[i] * out[i];
	}
	blur(pool, a, tmp, w, h, sigma);
	double sum = 0, cnt = 0;
	for (size_t i = 0; i < n; i++) {
		sum += (double)wt[i] * a[i];
		cnt += wt[i];
	}
	if (!(cnt > 0)) { /* nothing used: any eps will do, keep the images finite */
		for (size_t i = 0; i < n; i++)
			sum += a[i];
		cnt = (double)n;
	}
	double eps2 = EPS_FRAC * sum / cnt + 1e-12;
	for (size_t i = 0; i < n; i++)
		out[i] = (float)(out[i] / sqrt(a[i] + eps2));
}

/* --- one level --------------------------------------------------------------- */

/* Central difference of plane p along x at (x, y) (one-sided at the edges). */
static inline float diff_x(const float *row, long x, long w)
{
	long x0 = x > 0 ? x - 1 : x, x1 = x + 1 < w ? x + 1 : x;
	return x1 > x0 ? (row[x1] - row[x0]) / (float)(x1 - x0) : 0.0f;
}

static inline float diff_y(const float *p, long x, long y, long w, long h)
{
	long y0 = y > 0 ? y - 1 : y, y1 = y + 1 < h ? y + 1 : y;
	return y1 > y0 ? (p[y1 * w + x] - p[y0 * w + x]) / (float)(y1 - y0) : 0.0f;
}

/* Rows [*y0, *y1) of row block b of level L. */
static void block_rows(const nr_level *L, long b, long *y0, long *y1)
{
	*y0 = b * REG_BLOCK_ROWS;
	*y1 = *y0 + REG_BLOCK_ROWS < L->h ? *y0 + REG_BLOCK_ROWS : L->h;
}

/* set_floor() on row block b: its sums into part[2 b], part[2 b + 1]. */
static void floor_block(void *ctx, long b)
{
	nr_level *L = ctx;
	long y0, y1;
	double sum = 0, cnt = 0;
	block_rows(L, b, &y0, &y1);
	for (long y = y0; y < y1; y++)
		for (long x = 0; x < L->w; x++) {
			float wt = L->wt[y * L->w + x];
			float gx = diff_x(L->ref + y * L->w, x, L->w),
			      gy = diff_y(L->ref, x, y, L->w, L->h);
			sum += wt * (gx * gx + gy * gy);
			cnt += wt;
		}
	L->part[2 * b] = sum;
	L->part[2 * b + 1] = cnt;
}

/* floor_g2 from the reference's gradient over the used pixels (the
 * blocks' sums added in block order, as in forces()). */
static void set_floor(nr_level *L, double grad_floor)
{
	long nb = reg_row_blocks(L->h);
	reg_pool_run(L->pool, nb, floor_block, L);
	double sum = 0, cnt = 0;
	for (long b = 0; b < nb; b++) {
		sum += L->part[2 * b];
		cnt += L->part[2 * b + 1];
	}
	L->floor_g2 = cnt > 0 ? (float)(grad_floor * sum / cnt) : 0.0f;
}

/* scratch := Nmov(x + u), on row block b.  Single precision: at the
 * thumbnail's size (under 2^12 px) a float coordinate is exact to 2^-12 px. */
static void warp_block(void *ctx, long b)
{
	nr_level *L = ctx;
	long y0, y1;
	block_rows(L, b, &y0, &y1);
	long w = L->w, h = L->h;
	float xmax = (float)(w - 1), ymax = (float)(h - 1);
	for (long y = y0; y < y1; y++) {
		const float *ux = L->ux + y * w, *uy = L->uy + y * w;
		float *out = L->scratch + y * w;
		for (long x = 0; x < w; x++) {
			float px = (float)x + ux[x], py = (float)y + uy[x];
			/* Inside the last pixel centres the clamps of sample_clamp do
			 * nothing: fewer tests. */
			if (px >= 0 && py >= 0 && px < xmax && py < ymax) {
				int ix = (int)px, iy = (int)py;
				float ax = px - (float)ix, ay = py - (float)iy;
				const float *r0 = L->mov + (long)iy * w + ix, *r1 = r0 + w;
				float top = r0[0] + ax * (r0[1] - r0[0]),
				      bot = r1[0] + ax * (r1[1] - r1[0]);
				out[x] = top + ay * (bot - top);
			} else
				out[x] = sample_clamp(L->mov, w, h, px, py);
		}
	}
}

static void warp_moving(nr_level *L)
{
	reg_pool_run(L->pool, reg_row_blocks(L->h), warp_block, L);
}

/* forces() on one row block: the force into (dx, dy), the block's
 * weighted squared mismatch and weight into part[2 b], part[2 b + 1]. */
typedef struct force_job {
	nr_level *L;
	float inv_sx2;
} force_job;

static void force_block(void *ctx, long b)
{
	const force_job *j = ctx;
	nr_level *L = j->L;
	long w = L->w, h = L->h, y0, y1;
	float inv_sx2 = j->inv_sx2;
	double e = 0, wsum = 0;
	block_rows(L, b, &y0, &y1);
	for (long y = y0; y < y1; y++)
		for (long x = 0; x < w; x++) {
			long i = y * w + x;
			float wt = L->wt[i];
			L->dx[i] = L->dy[i] = 0;
			if (!(wt > 0))
				continue;
			float d = L->scratch[i] - L->ref[i];
			float jx = 0.5f * (diff_x(L->ref + y * w, x, w) +
			                   diff_x(L->scratch + y * w, x, w));
			float jy =
			    0.5f * (diff_y(L->ref, x, y, w, h) + diff_y(L->scratch, x, y, w, h));
			float den = jx * jx + jy * jy + d * d * inv_sx2 + L->floor_g2;
			e += (double)wt * d * d;
			wsum += wt;
			if (den < 1e-9f)
				continue;
			L->dx[i] = -wt * d * jx / den;
			L->dy[i] = -wt * d * jy / den;
		}
	L->part[2 * b] = e;
	L->part[2 * b + 1] = wsum;
}

/* The demons force of step 2 into (dx, dy); returns the weighted mean
 * squared mismatch of the warped moving image (scratch) against ref.  The
 * row blocks' sums are added in block order (the same for any thread count). */
static double forces(nr_level *L, double max_step)
{
	force_job j = {L, (float)(1.0 / (4.0 * max_step * max_step))};
	long nb = reg_row_blocks(L->h);
	reg_pool_run(L->pool, nb, force_block, &j);
	double e = 0, wsum = 0;
	for (long b = 0; b < nb; b++) {
		e += L->part[2 * b];
		wsum += L->part[2 * b + 1];
	}
	return wsum > 0 ? e / wsum : 0;
}

/* Bilinear samples of planes a and b (w x h) at one point, as sample_clamp
 * of each (the same operations, the weights computed once). */
static inline void sample_clamp2(const float *a, const float *b, long w, long h, double x, double y,
                                 float *va, float *vb)
{
	x = x > 0 ? (x < (double)(w - 1) ? x : (double)(w - 1)) : 0;
	y = y > 0 ? (y < (double)(h - 1) ? y : (double)(h - 1)) : 0;
	long ix = (long)x, iy = (long)y;
	long ix1 = ix + (ix + 1 < w), iy1 = iy + (iy + 1 < h);
	float ax = (float)(x - (double)ix), ay = (float)(y - (double)iy);
	long i00 = iy * w + ix, i01 = iy * w + ix1, i10 = iy1 * w + ix, i11 = iy1 * w + ix1;
	float top = a[i00] + ax * (a[i01] - a[i00]), bot = a[i10] + ax * (a[i11] - a[i10]);
	*va = top + ay * (bot - top);
	top = b[i00] + ax * (b[i01] - b[i00]), bot = b[i10] + ax * (b[i11] - b[i10]);
	*vb = top + ay * (bot - top);
}

/* Step 4 on one row block: (dx, dy) := du + u(x + du), in single
 * precision as warp_block. */
static void compose_block(void *ctx, long b)
{
	nr_level *L = ctx;
	long y0, y1;
	block_rows(L, b, &y0, &y1);
	long w = L->w, h = L->h;
	float xmax = (float)(w - 1), ymax = (float)(h - 1);
	const float *a = L->ux, *c = L->uy;
	for (long y = y0; y < y1; y++) {
		float *dx = L->dx + y * w, *dy = L->dy + y * w;
		for (long x = 0; x < w; x++) {
			float px = (float)x + dx[x], py = (float)y + dy[x];
			float vx, vy;
			if (px >= 0 && py >= 0 && px < xmax && py < ymax) { /* as in warp_block */
				int ix = (int)px, iy = (int)py;
				long k = (long)iy * w + ix;
				float ax = px - (float)ix, ay = py - (float)iy;
				float top = a[k] + ax * (a[k + 1] - a[k]);
				float bot = a[k + w] + ax * (a[k + w + 1] - a[k + w]);
				vx = top + ay * (bot - top);
				top = c[k] + ax * (c[k + 1] - c[k]);
				bot = c[k + w] + ax * (c[k + w + 1] - c[k + w]);
				vy = top + ay * (bot - top);
			} else
				sample_clamp2(a, c, w, h, px, py, &vx, &vy);
			dx[x] += vx;
			dy[x] += vy;
		}
	}
}

/* Step 4 over the level, then swap so u holds the result. */
static void compose(nr_level *L)
{
	reg_pool_run(L->pool, reg_row_blocks(L->h), compose_block, L);
	float *t = L->ux;
	L->ux = L->dx;
	L->dx = t;
	t = L->uy;
	L->uy = L->dy;
	L->dy = t;
}

/* Up to iters demons iterations at one level. */
static void run_level(nr_level *L, const sf_reg_nonrigid_opts *o, int iters)
{
	double hist[STALL_WIN]; /* the mismatch of the last STALL_WIN iterations */
	for (int k = 0; k < iters; k++) {
		warp_moving(L);
		double e = forces(L, o->max_step);
		if (k >= STALL_WIN && hist[k % STALL_WIN] - e < STALL_TOL * hist[k % STALL_WIN])
			break; /* fell by less than STALL_TOL over STALL_WIN iterations */
		hist[k % STALL_WIN] = e;
		blur(L->pool, L->dx, L->scratch, L->w, L->h, o->sigma_fluid);
		blur(L->pool, L->dy, L->scratch, L->w, L->h, o->sigma_fluid);
		compose(L);
		blur(L->pool, L->ux, L->scratch, L->w, L->h, o->sigma_diff);
		blur(L->pool, L->uy, L->scratch, L->w, L->h, o->sigma_diff);
	}
}

/* --- levels ------------------------------------------------------------------- */

static void level_free(nr_level *L)
{
	free(L->ref);
	free(L->mov);
	free(L->ux);
	free(L->uy);
	free(L->dx);
	free(L->dy);
	free(L->scratch);
	free(L->part);
	memset(L, 0, sizeof *L);
}

static int level_alloc(nr_level *L, long w, long h, sf_err *e)
{
	memset(L, 0, sizeof *L);
	L->w = w;
	L->h = h;
	float **planes[] = {&L->ref, &L->mov, &L->ux, &L->uy, &L->dx, &L->dy, &L->scratch};
	for (size_t k = 0; k < sizeof planes / sizeof *planes; k++)
		if (!(*planes[k] = calloc((size_t)w * h, sizeof(float)))) {
			level_free(L);
			return sf_fail(e, SF_ENOMEM,
			               "register: non-rigid level %ldx%ld: out of memory", w, h);
		}
	if (!(L->part = calloc(2 * (size_t)reg_row_blocks(h), sizeof *L->part))) {
		level_free(L);
		return sf_fail(e, SF_ENOMEM, "register: non-rigid level %ldx%ld: out of memory", w,
		               h);
	}
	return SF_OK;
}

/* L's field from the coarser level C's: u_L(x) = 2 u_C((x + 0.5) / 2 - 0.5). */
typedef struct upsample_job {
	const nr_level *C;
	nr_level *L;
} upsample_job;

static void upsample_block(void *ctx, long b)
{
	const upsample_job *j = ctx;
	const nr_level *C = j->C;
	nr_level *L = j->L;
	long y0, y1;
	block_rows(L, b, &y0, &y1);
	for (long y = y0; y < y1; y++)
		for (long x = 0; x < L->w; x++) {
			double cx = (x + 0.5) / 2 - 0.5, cy = (y + 0.5) / 2 - 0.5;
			L->ux[y * L->w + x] = 2 * sample_clamp(C->ux, C->w, C->h, cx, cy);
			L->uy[y * L->w + x] = 2 * sample_clamp(C->uy, C->w, C->h, cx, cy);
		}
}

static void upsample_field(const nr_level *C, nr_level *L)
{
	upsample_job j = {C, L};
	reg_pool_run(L->pool, reg_row_blocks(L->h), upsample_block, &j);
}

/* The weighted mean squared mismatch with the field (use_field) or without. */
static double mismatch(nr_level *L, int use_field, double max_step)
{
	if (use_field)
		warp_moving(L);
	else
		memcpy(L->scratch, L->mov, (size_t)L->w * L->h * sizeof *L->scratch);
	return forces(L, max_step);
}

/* --- inputs -------------------------------------------------------------------- */

static int is_affine_finite(const double m[9])
{
	for (int i = 0; i < 9; i++)
		if (!isfinite(m[i]))
			return 0;
	return m[6] == 0 && m[7] == 0 && m[8] == 1;
}

static int check_image(const sf_reg_image *im, const char *what, sf_err *e)
{
	if (!im || !im->px || im->w < 4 || im->h < 4)
		return sf_fail(e, SF_EINVAL, "register: non-rigid %s image is empty or under 4x4",
		               what);
	return SF_OK;
}

static int check_sigma(double s, int zero_ok, const char *name, sf_err *e)
{
	if (!(s <= MAX_SIGMA) || !(zero_ok ? s >= 0 : s > 0))
		return sf_fail(e, SF_EINVAL, "register: non-rigid option %s = %g out of range",
		               name, s);
	return SF_OK;
}

static int check_args(const sf_reg_image *ref, const sf_reg_image *mov, const double m[9],
                      const sf_reg_nonrigid_opts *o, sf_err *e)
{
	int rc = check_image(ref, "reference", e);
	if (!rc)
		rc = check_image(mov, "moving", e);
	if (!rc && !is_affine_finite(m))
		rc = sf_fail(e, SF_EINVAL, "register: non-rigid needs a finite affine map");
	if (!rc && (o->step < 1 || o->min_dim < 8))
		rc =
		    sf_fail(e, SF_EINVAL, "register: non-rigid step %u (>= 1) or min_dim %u (>= 8)",
		            o->step, o->min_dim);
	if (!rc && (o->iter_coarse < 0 || o->iter_fine < 0 || o->iter_coarse > 100000 ||
	            o->iter_fine > 100000))
		rc = sf_fail(e, SF_EINVAL, "register: non-rigid iterations %d/%d out of range",
		             o->iter_coarse, o->iter_fine);
	if (!rc)
		rc = check_sigma(o->sigma_fluid, 1, "sigma_fluid", e);
	if (!rc)
		rc = check_sigma(o->sigma_diff, 1, "sigma_diff", e);
	if (!rc)
		rc = check_sigma(o->sigma_norm, 0, "sigma_norm", e);
	if (!rc && !(o->grad_floor >= 0 && o->grad_floor <= 1e6))
		rc = sf_fail(e, SF_EINVAL, "register: non-rigid grad_floor %g out of range",
		             o->grad_floor);
	if (!rc && !(o->max_step > 0 && o->max_step <= 10))
		rc = sf_fail(e, SF_EINVAL, "register: non-rigid max_step %g not in (0, 10]",
		             o->max_step);
	return rc;
}

/* movA(x) = mov(m x) on the reference grid, and the force weight: 1 where
 * the mask (if any) is set and m x lies between mov's edge pixel centres. */
typedef struct resample_job {
	const sf_reg_image *mov;
	const uint8_t *mask;
	const double *m;
	sf_reg_image *mova, *wt;
} resample_job;

static void resample_block(void *ctx, long b)
{
	const resample_job *j = ctx;
	const double *m = j->m;
	uint32_t w = j->mova->w, h = j->mova->h;
	uint32_t y0 = (uint32_t)b * REG_BLOCK_ROWS;
	uint32_t y1 = h - y0 > REG_BLOCK_ROWS ? y0 + REG_BLOCK_ROWS : h;
	double mw = j->mov->w - 1.0, mh = j->mov->h - 1.0;
	for (uint32_t y = y0; y < y1; y++)
		for (uint32_t x = 0; x < w; x++) {
			size_t i = (size_t)y * w + x;
			double sx = m[0] * x + m[1] * y + m[2], sy = m[3] * x + m[4] * y + m[5];
			j->mova->px[i] = reg_sample_zero(j->mov, sx, sy);
			int inside = sx >= 0 && sy >= 0 && sx <= mw && sy <= mh;
			j->wt->px[i] = inside && (!j->mask || j->mask[i]) ? 1.0f : 0.0f;
		}
}

static int resample_moving(reg_pool *pool, const sf_reg_image *ref, const uint8_t *mask,
                           const sf_reg_image *mov, const double m[9], sf_reg_image *mova,
                           sf_reg_image *wt, sf_err *e)
{
	int rc = sf_reg_image_alloc(mova, ref->w, ref->h, e);
	if (!rc)
		rc = sf_reg_image_alloc(wt, ref->w, ref->h, e);
	if (rc)
		return rc;
	resample_job j = {mov, mask, m, mova, wt};
	reg_pool_run(pool, reg_row_blocks(ref->h), resample_block, &j);
	return SF_OK;
}

/* --- the field ----------------------------------------------------------------- */

void sf_reg_field_at(const sf_reg_field *f, double x, double y, double *dx, double *dy)
{
	double gx = (x + 0.5) / f->step - 0.5, gy = (y + 0.5) / f->step - 0.5;
	long w = f->w, h = f->h;
	gx = gx > 0 ? (gx < (double)(w - 1) ? gx : (double)(w - 1)) : 0;
	gy = gy > 0 ? (gy < (double)(h - 1) ? gy : (double)(h - 1)) : 0;
	long ix = (long)gx, iy = (long)gy;
	long ix1 = ix + (ix + 1 < w), iy1 = iy + (iy + 1 < h);
	double ax = gx - (double)ix, ay = gy - (double)iy;
	const float *a = f->d + 2 * (iy * w + ix), *b = f->d + 2 * (iy * w + ix1);
	const float *c = f->d + 2 * (iy1 * w + ix), *d = f->d + 2 * (iy1 * w + ix1);
	double out[2];
	for (int k = 0; k < 2; k++) {
		double top = a[k] + ax * (b[k] - a[k]), bot = c[k] + ax * (d[k] - c[k]);
		out[k] = top + ay * (bot - top);
	}
	*dx = out[0];
	*dy = out[1];
}

void sf_reg_field_stats(sf_reg_field *f)
{
	long w = f->w, h = f->h;
	double jmin = INFINITY, dmax = 0;
	for (long j = 0; j < h; j++)
		for (long i = 0; i < w; i++) {
			long i0 = i > 0 ? i - 1 : i, i1 = i + 1 < w ? i + 1 : i;
			long j0 = j > 0 ? j - 1 : j, j1 = j + 1 < h ? j + 1 : j;
			const float *p = f->d + 2 * (j * w + i);
			double g[4] = {0, 0, 0, 0}; /* dDx/dx dDx/dy dDy/dx dDy/dy */
			for (int k = 0; k < 2 && i1 > i0; k++)
				g[2 * k] =
				    (f->d[2 * (j * w + i1) + k] - f->d[2 * (j * w + i0) + k]) /
				    ((double)(i1 - i0) * f->step);
			for (int k = 0; k < 2 && j1 > j0; k++)
				g[2 * k + 1] =
				    (f->d[2 * (j1 * w + i) + k] - f->d[2 * (j0 * w + i) + k]) /
				    ((double)(j1 - j0) * f->step);
			double det = (1 + g[0]) * (1 + g[3]) - g[1] * g[2];
			jmin = det < jmin ? det : jmin;
			double len = sqrt((double)p[0] * p[0] + (double)p[1] * p[1]);
			dmax = len > dmax ? len : dmax;
		}
	f->jac_min = jmin;
	f->disp_max = dmax;
}

/* f's nodes from the field of level lf, on row blocks of nodes. */
typedef struct field_job {
	const nr_level *L;
	unsigned lf;
	sf_reg_field *f;
} field_job;

static void field_block(void *ctx, long b)
{
	const field_job *j = ctx;
	const nr_level *L = j->L;
	sf_reg_field *f = j->f;
	double scale = (double)(1u << j->lf);
	uint32_t j0 = (uint32_t)b * REG_BLOCK_ROWS;
	uint32_t j1 = f->h - j0 > REG_BLOCK_ROWS ? j0 + REG_BLOCK_ROWS : f->h;
	for (uint32_t jy = j0; jy < j1; jy++)
		for (uint32_t i = 0; i < f->w; i++) {
			double x = (i + 0.5) * f->step - 0.5, y = (jy + 0.5) * f->step - 0.5;
			double lx = (x + 0.5) / scale - 0.5, ly = (y + 0.5) / scale - 0.5;
			float *d = f->d + 2 * ((size_t)jy * f->w + i);
			d[0] = (float)(scale * sample_clamp(L->ux, L->w, L->h, lx, ly));
			d[1] = (float)(scale * sample_clamp(L->uy, L->w, L->h, lx, ly));
		}
}

/* f's nodes from the field of level lf (zero when L is NULL). */
static int field_out(reg_pool *pool, const nr_level *L, unsigned lf, const sf_reg_image *ref,
                     uint32_t step, sf_reg_field *f, sf_err *e)
{
	f->step = step;
	f->w = (uint32_t)(((uint64_t)ref->w + step - 1) / step);
	f->h = (uint32_t)(((uint64_t)ref->h + step - 1) / step);
	f->d = calloc(2 * (size_t)f->w * f->h, sizeof *f->d);
	if (!f->d) {
		memset(f, 0, sizeof *f);
		return sf_fail(e, SF_ENOMEM, "register: non-rigid field of %ux%u nodes", ref->w,
		               ref->h);
	}
	field_job j = {L, lf, f};
	if (L)
		reg_pool_run(pool, reg_row_blocks(f->h), field_block, &j);
	sf_reg_field_stats(f);
	return SF_OK;
}

/* The finest level: the first whose longest side is <= max_dim. */
static unsigned finest_level(const reg_pyramid *p, uint32_t max_dim)
{
	if (max_dim == 0)
		return 0;
	for (unsigned l = 0; l < p->n; l++) {
		uint32_t longest = p->lv[l].w > p->lv[l].h ? p->lv[l].w : p->lv[l].h;
		if (longest <= max_dim)
			return l;
	}
	return p->n - 1;
}

/* Demons from the coarsest level to lf; cur ends holding level lf. */
static int solve(const reg_pyramid *pr, const reg_pyramid *pm, const reg_pyramid *pw, unsigned lf,
                 const sf_reg_nonrigid_opts *o, reg_pool *pool, nr_level *cur, sf_err *e)
{
	nr_level prev = {0};
	for (unsigned l = pr->n; l-- > lf;) {
		const sf_reg_image *r = &pr->lv[l];
		int rc = level_alloc(cur, r->w, r->h, e);
		if (rc) {
			level_free(&prev);
			return rc;
		}
		cur->wt = pw->lv[l].px;
		cur->pool = (uint64_t)cur->w * cur->h >= REG_PARALLEL_MIN_PX ? pool : NULL;
		normalise_local(cur->pool, r->px, cur->wt, cur->w, cur->h, o->sigma_norm, cur->ref,
		                cur->dx, cur->scratch);
		normalise_local(cur->pool, pm->lv[l].px, cur->wt, cur->w, cur->h, o->sigma_norm,
		                cur->mov, cur->dx, cur->scratch);
		set_floor(cur, o->grad_floor);
		if (prev.ux)
			upsample_field(&prev, cur);
		level_free(&prev);
		run_level(cur, o, l == lf ? o->iter_fine : o->iter_coarse);
		if (l > lf) {
			prev = *cur;
			memset(cur, 0, sizeof *cur);
		}
	}
	return SF_OK;
}

int sf_reg_nonrigid(const sf_reg_image *ref, const uint8_t *mask, const sf_reg_image *mov,
                    const double m[9], const sf_reg_nonrigid_opts *o, sf_reg_field *f, sf_err *e)
{
	memset(f, 0, sizeof *f);
	int rc = check_args(ref, mov, m, o, e);
	if (rc)
		return rc;
	sf_reg_image mova = {0}, wt = {0};
	reg_pyramid pr = {0}, pm = {0}, pw = {0};
	nr_level fine = {0};
	reg_pool *pool = NULL;
	rc = reg_pool_start(&pool, o->threads, e);
	if (!rc)
		rc = resample_moving(pool, ref, mask, mov, m, &mova, &wt, e);
	if (!rc)
		rc = reg_pyramid_build(ref, o->min_dim, &pr, e);
	if (!rc)
		rc = reg_pyramid_build(&mova, o->min_dim, &pm, e);
	if (!rc)
		rc = reg_pyramid_build(&wt, o->min_dim, &pw, e);
	unsigned lf = 0;
	if (!rc) {
		lf = finest_level(&pr, o->max_dim);
		rc = solve(&pr, &pm, &pw, lf, o, pool, &fine, e);
	}
	if (!rc) {
		/* Never worse than no deformation at all (e.g. nothing to match). */
		double with = mismatch(&fine, 1, o->max_step),
		       without = mismatch(&fine, 0, o->max_step);
		rc = field_out(pool, with < without ? &fine : NULL, lf, ref, o->step, f, e);
	}
	level_free(&fine);
	reg_pool_stop(pool);
	if (pr.n)
		reg_pyramid_free(&pr);
	if (pm.n)
		reg_pyramid_free(&pm);
	if (pw.n)
		reg_pyramid_free(&pw);
	sf_reg_image_free(&mova);
	sf_reg_image_free(&wt);
	return rc;
}

/* --- the level-0 transform ------------------------------------------------- */

/* With S(f) = diag(f) x + (f - 1) / 2 and x = S(ref_ds)^-1 p:
 *     T0(p) = S(mov_ds) m S(ref_ds)^-1 (p + diag(ref_ds) D(x)),
 * so the step is V = diag(ref_ds) and G takes p to the node index
 * (x + 0.5) / step - 0.5 = (p + 0.5) / (ref_ds step) - 0.5. */
int sf_reg_to_transform_field(const double m[9], const sf_reg_field *f, const double ref_ds[2],
                              const double mov_ds[2], sf_transform *t, sf_err *e)
{
	sf_transform_init(t);
	if (!f || !f->d || f->w < 1 || f->h < 1 || f->step < 1)
		return sf_fail(e, SF_EINVAL, "register: empty non-rigid field");
	if (!is_affine_finite(m))
		return sf_fail(e, SF_EINVAL, "register: non-rigid needs a finite affine map");
	sf_transform aff;
	int rc = sf_reg_to_transform(m, ref_ds, mov_ds, &aff, e);
	if (rc)
		return rc;
	sf_field_grid *g = sf_field_grid_create(SF_FIELD_LINEAR, f->w, f->h, e);
	if (!g)
		return e ? e->code : SF_ENOMEM;
	memcpy(g->v, f->d, 2 * (size_t)f->w * f->h * sizeof *g->v);
	rc = sf_field_grid_finish(g, e);
	if (rc) {
		sf_field_grid_free(g);
		return rc;
	}
	double sx = ref_ds[0] * f->step, sy = ref_ds[1] * f->step;
	double gmap[6] = {1 / sx, 0, 0.5 / sx - 0.5, 0, 1 / sy, 0.5 / sy - 0.5};
	double vm[4] = {ref_ds[0], 0, 0, ref_ds[1]};
	rc = sf_transform_then_field(t, g, gmap, vm, e);
	if (!rc)
		rc = sf_transform_then_matrix(t, aff.map.m, e);
	sf_transform_release(&aff);
	if (rc)
		sf_transform_release(t);
	return rc;
}

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
 * Only the pixels with weight > 0 (the tissue, about a quarter of a
 * slide's thumbnail) have a force, so each level lists them as runs per
 * row: the warp is made only where forces() reads it, the fluid blur skips
 * rows and columns the update cannot reach, and the composition does not
 * resample where the update is zero.  None of this changes a bit of the
 * result: the skipped sums would all be exactly 0 or give u itself.
 *
 * Memory at the finest level of n pixels: 7 n floats (two normalised
 * images, the field, the update, one scratch) and the runs (at most 2 n
 * floats' worth, for a checkerboard mask; a few KB for tissue), plus movA
 * and the weights at the thumbnail size with their pyramids. */
#include "scopefs/register.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "register_math.h"

/* AVX2 and baseline builds of a hot loop, picked at load time.  Not under
 * ThreadSanitizer: the pick (an ifunc resolver) runs while the loader
 * relocates, before TSan's runtime starts, and the instrumented resolver
 * crashed every TSan build at startup. */
#if defined(__SANITIZE_THREAD__)
#define AVX2_CLONES
#else
#define AVX2_CLONES __attribute__((target_clones("avx2", "default")))
#endif

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
	/* Runs [x0, x1) of pixels, row by row (row y's runs are run[row[y]]
	 * .. run[row[y + 1]], two int32 each): `used` where wt > 0 (the only
	 * pixels with a force), `need` those and their 4-neighbours (the
	 * only pixels whose warped value forces() reads).  About a quarter
	 * of a slide's thumbnail is tissue, so the warp skips most of it. */
	int32_t *used, *need;
	long *used_row, *need_row;
	long *fluid_ext; /* blur_extents() of the used runs for sigma_fluid */
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
	o->stop = NULL;
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
AVX2_CLONES static void taps_sum(float *restrict d, const float *const *rows, const float *k, int r,
                                 long n)
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

/* The radius of blur()'s kernel for sigma. */
static int blur_radius(double sigma)
{
	int r = (int)ceil(3 * sigma);
	return r > MAX_RADIUS ? MAX_RADIUS : r;
}

/* The horizontal pass at pixel x of row s, the taps clamped to the row. */
static inline float blur_edge_px(const float *s, long w, long x, const float *k, int r)
{
	float acc = 0;
	for (int t = -r; t <= r; t++)
		acc += k[t + r] * s[clampl(x + t, 0, w - 1)];
	return acc;
}

/* The horizontal pass of row s into d at x in [x0, x1): the edge pixels
 * (x < r or x >= w - r) one by one, the rest through taps_sum. */
static void blur_row_span(const float *s, float *d, long w, long x0, long x1, const float *k, int r)
{
	const float *rows[2 * MAX_RADIUS + 1];
	long lo = r < w ? r : w, hi = w - r > lo ? w - r : lo; /* interior [lo, hi) */
	for (long x = x0; x < x1 && x < lo; x++)
		d[x] = blur_edge_px(s, w, x, k, r);
	for (long x = x0 > hi ? x0 : hi; x < x1; x++)
		d[x] = blur_edge_px(s, w, x, k, r);
	long a = x0 > lo ? x0 : lo, b = x1 < hi ? x1 : hi;
	if (a < b) {
		for (int t = -r; t <= r; t++)
			rows[t + r] = s + a + t;
		taps_sum(d + a, rows, k, r, b - a);
	}
}

/* The extents of a blur of radius r of an image that is zero outside the
 * runs (run, row) (nr_level's form), 4 longs per row: [0, 1) the columns
 * where the horizontal pass can be nonzero, [2, 3) those of the vertical
 * pass (the union over the rows it reads); empty where lo >= hi. */
static void blur_extents(const int32_t *run, const long *row, long w, long h, int r, long *ext)
{
	for (long y = 0; y < h; y++) {
		long lo = 0, hi = 0;
		if (row[y + 1] > row[y]) {
			lo = run[2 * row[y]] - r;
			hi = run[2 * (row[y + 1] - 1) + 1] + r;
			lo = lo > 0 ? lo : 0;
			hi = hi < w ? hi : w;
		}
		ext[4 * y] = lo;
		ext[4 * y + 1] = hi;
	}
	for (long y = 0; y < h; y++) {
		long lo = w, hi = 0;
		for (int t = -r; t <= r; t++) {
			const long *e = ext + 4 * clampl(y + t, 0, h - 1);
			if (e[0] < e[1]) {
				lo = e[0] < lo ? e[0] : lo;
				hi = e[1] > hi ? e[1] : hi;
			}
		}
		ext[4 * y + 2] = lo < hi ? lo : 0;
		ext[4 * y + 3] = lo < hi ? hi : 0;
	}
}

/* Zero row d outside [x0, x1). */
static void zero_outside(float *d, long w, long x0, long x1)
{
	if (x0 >= x1) {
		memset(d, 0, (size_t)w * sizeof *d);
		return;
	}
	memset(d, 0, (size_t)x0 * sizeof *d);
	memset(d + x1, 0, (size_t)(w - x1) * sizeof *d);
}

static void blur_rows(const float *src, float *dst, long w, long y0, long y1, const float *k, int r,
                      const long *ext)
{
	for (long y = y0; y < y1; y++) {
		long x0 = ext ? ext[4 * y] : 0, x1 = ext ? ext[4 * y + 1] : w;
		if (ext)
			zero_outside(dst + y * w, w, x0, x1);
		if (x0 < x1)
			blur_row_span(src + y * w, dst + y * w, w, x0, x1, k, r);
	}
}

/* Row by row, so the inner loop runs along x over whole rows (vectorises). */
static void blur_cols(const float *src, float *dst, long w, long h, long y0, long y1,
                      const float *k, int r, const long *ext)
{
	const float *rows[2 * MAX_RADIUS + 1];
	for (long y = y0; y < y1; y++) {
		long x0 = ext ? ext[4 * y + 2] : 0, x1 = ext ? ext[4 * y + 3] : w;
		if (ext)
			zero_outside(dst + y * w, w, x0, x1);
		if (x0 >= x1)
			continue;
		for (int t = -r; t <= r; t++)
			rows[t + r] = src + clampl(y + t, 0, h - 1) * w + x0;
		taps_sum(dst + y * w + x0, rows, k, r, x1 - x0);
	}
}

/* One pass of a blur over row blocks (blur_block). */
typedef struct blur_job {
	const float *src;
	float *dst;
	long w, h;
	const float *k;
	int r, cols;     /* cols: the vertical pass */
	const long *ext; /* blur_extents(), or NULL */
} blur_job;

static void blur_block(void *ctx, long b)
{
	const blur_job *j = ctx;
	long y0 = b * REG_BLOCK_ROWS, y1 = y0 + REG_BLOCK_ROWS < j->h ? y0 + REG_BLOCK_ROWS : j->h;
	if (j->cols)
		blur_cols(j->src, j->dst, j->w, j->h, y0, y1, j->k, j->r, j->ext);
	else
		blur_rows(j->src, j->dst, j->w, y0, y1, j->k, j->r, j->ext);
}

/* In-place Gaussian blur of p (edges replicated, taps to 3 sigma) through
 * tmp (w * h floats), rows split over the pool (may be NULL).  sigma <= 0
 * does nothing; sigma <= MAX_SIGMA.  Every output pixel is computed the
 * same way whatever the split.  ext (may be NULL): where p is zero, as
 * blur_extents() made it for this sigma; pixels that can only get zeros
 * are set to 0 without the sums (which would give exactly 0). */
static void blur_ext(reg_pool *pool, float *p, float *tmp, long w, long h, double sigma,
                     const long *ext)
{
	if (!(sigma > 0))
		return;
	float k[2 * MAX_RADIUS + 1];
	int r = blur_radius(sigma);
	double sum = 0;
	for (int t = -r; t <= r; t++)
		sum += k[t + r] = (float)exp(-0.5 * t * t / (sigma * sigma));
	for (int t = 0; t <= 2 * r; t++)
		k[t] = (float)(k[t] / sum);
	blur_job rows = {p, tmp, w, h, k, r, 0, ext}, cols = {tmp, p, w, h, k, r, 1, ext};
	reg_pool_run(pool, reg_row_blocks(h), blur_block, &rows);
	reg_pool_run(pool, reg_row_blocks(h), blur_block, &cols);
}

static void blur(reg_pool *pool, float *p, float *tmp, long w, long h, double sigma)
{
	blur_ext(pool, p, tmp, w, h, sigma, NULL);
}

/* The per-pixel steps of normalise_local() on row blocks. */
typedef struct norm_job {
	const float *in;
	float *out, *a;
	long w, h;
	double eps2;
	int step; /* 0: out := in - a, a := out^2; 1: out := out / sqrt(a + eps2) */
} norm_job;

static void norm_block(void *ctx, long b)
{
	const norm_job *j = ctx;
	long y0 = b * REG_BLOCK_ROWS, y1 = y0 + REG_BLOCK_ROWS < j->h ? y0 + REG_BLOCK_ROWS : j->h;
	for (long i = y0 * j->w; i < y1 * j->w; i++) {
		if (j->step == 0) {
			j->out[i] = j->in[i] - j->a[i];
			j->a[i] = j->out[i] * j->out[i];
		} else
			j->out[i] = (float)(j->out[i] / sqrt(j->a[i] + j->eps2));
	}
}

/* out := N(in) (see the top of the file), using a and tmp as scratch.
 * The per-pixel steps run over the pool; eps^2's sums stay serial, in
 * pixel order. */
static void normalise_local(reg_pool *pool, const float *in, const float *wt, long w, long h,
                            double sigma, float *out, float *a, float *tmp)
{
	size_t n = (size_t)w * h;
	norm_job j = {in, out, a, w, h, 0, 0};
	memcpy(a, in, n * sizeof *a);
	blur(pool, a, tmp, w, h, sigma);
	reg_pool_run(pool, reg_row_blocks(h), norm_block, &j);
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
	j.eps2 = EPS_FRAC * sum / cnt + 1e-12;
	j.step = 1;
	reg_pool_run(pool, reg_row_blocks(h), norm_block, &j);
}

/* --- one level --------------------------------------------------------------- */

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

/* Vectors go by pointer between these helpers: passing them by value
 * would depend on the target's ABI (-Wpsabi). */
static inline __attribute__((always_inline)) void v8_load(v8f *v, const float *p)
{
	memcpy(v, p, sizeof *v);
}

/* *out := lanes of a where m is set (all bits), else of b. */
static inline __attribute__((always_inline)) void v8_select(v8f *out, const v8i *m, const v8f *a,
                                                            const v8f *b)
{
	*out = (v8f)(((v8i)*a & *m) | ((v8i)*b & ~*m));
}

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

/* Whether pixel (x, y) is set in mask wt (dilate 0) or has a set
 * 4-neighbour or is set itself (dilate 1). */
static inline int run_pixel(const float *wt, long w, long h, long x, long y, int dilate)
{
	const float *r = wt + y * w;
	if (r[x] > 0 || !dilate)
		return r[x] > 0;
	return (x > 0 && r[x - 1] > 0) || (x + 1 < w && r[x + 1] > 0) || (y > 0 && r[x - w] > 0) ||
	       (y + 1 < h && r[x + w] > 0);
}

/* The runs of L->wt (dilate 0) or of its 4-neighbour dilation (dilate 1)
 * into *runs / *rows (see nr_level); counted first, then filled. */
static int make_runs(const nr_level *L, int dilate, int32_t **runs, long **rows, sf_err *e)
{
	long w = L->w, h = L->h, n = 0;
	for (int fill = 0; fill < 2; fill++) {
		n = 0;
		for (long y = 0; y < h; y++) {
			if (fill)
				(*rows)[y] = n;
			for (long x = 0; x < w;) {
				if (!run_pixel(L->wt, w, h, x, y, dilate)) {
					x++;
					continue;
				}
				long x0 = x;
				while (x < w && run_pixel(L->wt, w, h, x, y, dilate))
					x++;
				if (fill) {
					(*runs)[2 * n] = (int32_t)x0;
					(*runs)[2 * n + 1] = (int32_t)x;
				}
				n++;
			}
		}
		if (fill)
			(*rows)[h] = n;
		else {
			*runs = malloc((2 * (size_t)n + 1) * sizeof **runs);
			*rows = malloc(((size_t)h + 1) * sizeof **rows);
			if (!*runs || !*rows)
				return sf_fail(e, SF_ENOMEM,
				               "register: non-rigid level %ldx%ld: out of memory",
				               w, h);
		}
	}
	return SF_OK;
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

/* scratch := Nmov(x + u) on row block b, where forces() reads it (the
 * `need` runs; elsewhere scratch keeps what it held).  Single precision:
 * at the thumbnail's size (under 2^12 px) a float coordinate is exact to
 * 2^-12 px. */
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
		for (long r = L->need_row[y]; r < L->need_row[y + 1]; r++)
			for (long x = L->need[2 * r]; x < L->need[2 * r + 1]; x++) {
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

/* forces() at pixel (x, y), a used one (wt > 0): the update into dx, dy
 * (left at 0 where the denominator vanishes), the mismatch sums into *e,
 * *wsum. */
static inline __attribute__((always_inline)) void force_px(const nr_level *L, float inv_sx2, long x,
                                                           long y, double *e, double *wsum)
{
	long w = L->w, h = L->h, i = y * w + x;
	float wt = L->wt[i];
	float d = L->scratch[i] - L->ref[i];
	float jx = 0.5f * (diff_x(L->ref + y * w, x, w) + diff_x(L->scratch + y * w, x, w));
	float jy = 0.5f * (diff_y(L->ref, x, y, w, h) + diff_y(L->scratch, x, y, w, h));
	float den = jx * jx + jy * jy + d * d * inv_sx2 + L->floor_g2;
	*e += (double)wt * d * d;
	*wsum += wt;
	if (den < 1e-9f)
		return;
	L->dx[i] = -wt * d * jx / den;
	L->dy[i] = -wt * d * jy / den;
}

/* force_px on the 8 used pixels x .. x + 7 of row y at once, away from
 * the edges (1 <= y < h - 1, 1 <= x, x + 9 <= w: the central differences
 * of diff_x and diff_y): the same operations on each lane, the sums added
 * lane by lane in pixel order, so the same result. */
static inline __attribute__((always_inline)) void
force_chunk(const nr_level *L, float inv_sx2, long x, long y, double *e, double *wsum)
{
	long w = L->w, i = y * w + x;
	const float *rf = L->ref + i, *sc = L->scratch + i;
	v8f wt, r0, s0, rl, rr, sl, sr, ru, rd, su, sd, fx, fy, zero = {0};
	v8_load(&wt, L->wt + i);
	v8_load(&r0, rf);
	v8_load(&s0, sc);
	v8_load(&rl, rf - 1);
	v8_load(&rr, rf + 1);
	v8_load(&sl, sc - 1);
	v8_load(&sr, sc + 1);
	v8_load(&ru, rf - w);
	v8_load(&rd, rf + w);
	v8_load(&su, sc - w);
	v8_load(&sd, sc + w);
	v8f d = s0 - r0;
	v8f jx = 0.5f * ((rr - rl) / 2.0f + (sr - sl) / 2.0f);
	v8f jy = 0.5f * ((rd - ru) / 2.0f + (sd - su) / 2.0f);
	v8f den = jx * jx + jy * jy + d * d * inv_sx2 + L->floor_g2;
	v8i keep = ~(den < 1e-9f);
	fx = -wt * d * jx / den;
	fy = -wt * d * jy / den;
	v8_select(&fx, &keep, &fx, &zero);
	v8_select(&fy, &keep, &fy, &zero);
	memcpy(L->dx + i, &fx, sizeof fx);
	memcpy(L->dy + i, &fy, sizeof fy);
	float dl[8], wl[8];
	memcpy(dl, &d, sizeof dl);
	memcpy(wl, &wt, sizeof wl);
	for (int l = 0; l < 8; l++) {
		*e += (double)wl[l] * dl[l] * dl[l];
		*wsum += wl[l];
	}
}

/* forces() on the used runs of row y, 8 pixels at a time where
 * force_chunk can.  Built for AVX2 and the baseline, as taps_sum. */
AVX2_CLONES static void force_row(const nr_level *L, float inv_sx2, long y, double *e, double *wsum)
{
	int inner = y >= 1 && y + 1 < L->h;
	for (long r = L->used_row[y]; r < L->used_row[y + 1]; r++) {
		long x = L->used[2 * r], x1 = L->used[2 * r + 1];
		if (x == 0)
			force_px(L, inv_sx2, x++, y, e, wsum);
		for (; inner && x + 8 <= x1 && x + 9 <= L->w; x += 8)
			force_chunk(L, inv_sx2, x, y, e, wsum);
		for (; x < x1; x++)
			force_px(L, inv_sx2, x, y, e, wsum);
	}
}

static void force_block(void *ctx, long b)
{
	const force_job *j = ctx;
	nr_level *L = j->L;
	long w = L->w, y0, y1;
	double e = 0, wsum = 0;
	block_rows(L, b, &y0, &y1);
	memset(L->dx + y0 * w, 0, (size_t)(y1 - y0) * w * sizeof *L->dx);
	memset(L->dy + y0 * w, 0, (size_t)(y1 - y0) * w * sizeof *L->dy);
	for (long y = y0; y < y1; y++)
		force_row(L, j->inv_sx2, y, &e, &wsum);
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

/* Step 4 at pixel x of row y (dx, dy: that row's update, turned into the
 * composed field), in single precision as warp_block. */
static inline __attribute__((always_inline)) void
compose_px(const float *a, const float *c, long w, long h, long y, long x, float *dx, float *dy)
{
	float xmax = (float)(w - 1), ymax = (float)(h - 1);
	/* No update (off the tissue, beyond the fluid blur's reach): u is
	 * sampled at the pixel itself, which gives u there. */
	if (dx[x] == 0 && dy[x] == 0) {
		dx[x] += a[y * w + x];
		dy[x] += c[y * w + x];
		return;
	}
	float px = (float)x + dx[x], py = (float)y + dy[x];
	float vx, vy;
	if (px >= 0 && py >= 0 && px < xmax && py < ymax) { /* as in warp_block */
		int ix = (int)px, iy = (int)py;
		long k = (long)iy * w + ix;
		float ax = px - (float)ix, ay = py - (float)iy;
		vx = reg_bilerp(a, k, w, ax, ay);
		vy = reg_bilerp(c, k, w, ax, ay);
	} else
		sample_clamp2(a, c, w, h, px, py, &vx, &vy);
	dx[x] += vx;
	dy[x] += vy;
}

/* Bilinear samples of plane p at the 8 points (x + lane + dx, y + dy) of
 * compose_chunk, from rows y - 1 .. y + 1 and columns x - 1 .. x + 8:
 * lx / ly set where the point's cell starts one column / row up. */
static inline __attribute__((always_inline)) void sample_near(const float *p, long w, long y,
                                                              long x, const v8i *lx, const v8i *ly,
                                                              const v8f *ax, const v8f *ay,
                                                              v8f *out)
{
	v8f row[3], lm, l0, lp, v0, v1, top, bot;
	for (int r = 0; r < 3; r++) {
		const float *q = p + (y - 1 + r) * w + x;
		v8_load(&lm, q - 1);
		v8_load(&l0, q);
		v8_load(&lp, q + 1);
		v8_select(&v0, lx, &lm, &l0);
		v8_select(&v1, lx, &l0, &lp);
		row[r] = v0 + *ax * (v1 - v0); /* compose_px's `top` of that row */
	}
	v8_select(&top, ly, &row[0], &row[1]);
	v8_select(&bot, ly, &row[1], &row[2]);
	*out = top + *ay * (bot - top);
}

/* compose_px on the 8 pixels x .. x + 7 of row y (1 <= y < h - 1,
 * 1 <= x, x + 9 <= w) at once, when every point lies in a cell touching
 * its pixel (the update moves by under a pixel: |du| <= max_step <= 0.5
 * almost everywhere) and inside the last pixel centres.  The same
 * operations as compose_px on each lane, so the same result.  Returns 0
 * (nothing written) when a lane does not qualify. */
static inline __attribute__((always_inline)) int
compose_chunk(const float *a, const float *c, long w, long h, long y, long x, float *dx, float *dy)
{
	/* Built from a constant and broadcasts (lane by lane stores would
	 * stall the vector load that follows them). */
	const v8f lane = {0, 1, 2, 3, 4, 5, 6, 7};
	v8f ddx, ddy, vx, vy, zero = {0};
	v8f xf = lane + (float)x, yf = zero + (float)y;
	v8f xmax = zero + (float)(w - 1), ymax = zero + (float)(h - 1);
	v8_load(&ddx, dx + x);
	v8_load(&ddy, dy + x);
	v8f px = xf + ddx, py = yf + ddy;
	v8i ix = __builtin_convertvector(px, v8i), iy = __builtin_convertvector(py, v8i);
	v8f ixf = __builtin_convertvector(ix, v8f), iyf = __builtin_convertvector(iy, v8f);
	v8i ok = (px >= 0) & (py >= 0) & (px < xmax) & (py < ymax) & (ixf >= xf - 1) & (ixf <= xf) &
	         (iyf >= yf - 1) & (iyf <= yf);
	int all = -1;
	for (int l = 0; l < 8; l++)
		all &= ok[l];
	if (!all)
		return 0;
	v8i lx = ixf < xf, ly = iyf < yf;
	v8f ax = px - ixf, ay = py - iyf;
	sample_near(a, w, y, x, &lx, &ly, &ax, &ay, &vx);
	sample_near(c, w, y, x, &lx, &ly, &ax, &ay, &vy);
	ddx += vx;
	ddy += vy;
	memcpy(dx + x, &ddx, sizeof ddx);
	memcpy(dy + x, &ddy, sizeof ddy);
	return 1;
}

/* Step 4 on row y, 8 pixels at a time where compose_chunk can, else one
 * by one.  Built for AVX2 and the baseline, as taps_sum (no fused
 * multiply-add either way, so the same result). */
AVX2_CLONES static void compose_row(const float *a, const float *c, long w, long h, long y,
                                    float *dx, float *dy)
{
	long x = 0;
	if (y >= 1 && y + 1 < h) {
		compose_px(a, c, w, h, y, 0, dx, dy);
		for (x = 1; x + 9 <= w; x += 8)
			if (!compose_chunk(a, c, w, h, y, x, dx, dy))
				for (long k = x; k < x + 8; k++)
					compose_px(a, c, w, h, y, k, dx, dy);
	}
	for (; x < w; x++)
		compose_px(a, c, w, h, y, x, dx, dy);
}

/* Step 4 on one row block: (dx, dy) := du + u(x + du). */
static void compose_block(void *ctx, long b)
{
	nr_level *L = ctx;
	long y0, y1;
	block_rows(L, b, &y0, &y1);
	for (long y = y0; y < y1; y++)
		compose_row(L->ux, L->uy, L->w, L->h, y, L->dx + y * L->w, L->dy + y * L->w);
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

/* Whether the caller asked the call to end (o->stop, a shutdown). */
static int stop_asked(const sf_reg_nonrigid_opts *o)
{
	return o->stop && atomic_load(o->stop);
}

/* Up to iters demons iterations at one level (fewer once a stop is asked). */
static void run_level(nr_level *L, const sf_reg_nonrigid_opts *o, int iters)
{
	double hist[STALL_WIN]; /* the mismatch of the last STALL_WIN iterations */
	for (int k = 0; k < iters && !stop_asked(o); k++) {
		warp_moving(L);
		double e = forces(L, o->max_step);
		if (k >= STALL_WIN && hist[k % STALL_WIN] - e < STALL_TOL * hist[k % STALL_WIN])
			break; /* fell by less than STALL_TOL over STALL_WIN iterations */
		hist[k % STALL_WIN] = e;
		/* The update is zero off the used pixels: the fluid blur skips
		 * what can only stay zero. */
		blur_ext(L->pool, L->dx, L->scratch, L->w, L->h, o->sigma_fluid, L->fluid_ext);
		blur_ext(L->pool, L->dy, L->scratch, L->w, L->h, o->sigma_fluid, L->fluid_ext);
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
	free(L->used);
	free(L->need);
	free(L->used_row);
	free(L->need_row);
	free(L->fluid_ext);
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
			float vx, vy;
			sample_clamp2(C->ux, C->uy, C->w, C->h, cx, cy, &vx, &vy);
			L->ux[y * L->w + x] = 2 * vx;
			L->uy[y * L->w + x] = 2 * vy;
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
			float *d = f->d + 2 * ((size_t)jy * f->w + i), vx, vy;
			sample_clamp2(L->ux, L->uy, L->w, L->h, lx, ly, &vx, &vy);
			d[0] = (float)(scale * vx);
			d[1] = (float)(scale * vy);
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

/* L's runs (from L->wt) and the fluid blur's extents. */
static int level_runs(nr_level *L, const sf_reg_nonrigid_opts *o, sf_err *e)
{
	int rc = make_runs(L, 0, &L->used, &L->used_row, e);
	if (!rc)
		rc = make_runs(L, 1, &L->need, &L->need_row, e);
	if (!rc && !(L->fluid_ext = malloc(4 * (size_t)L->h * sizeof *L->fluid_ext)))
		rc = sf_fail(e, SF_ENOMEM, "register: non-rigid level %ldx%ld: out of memory", L->w,
		             L->h);
	if (!rc)
		blur_extents(L->used, L->used_row, L->w, L->h, blur_radius(o->sigma_fluid),
		             L->fluid_ext);
	return rc;
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
		rc = level_runs(cur, o, e);
		if (rc) {
			level_free(cur);
			level_free(&prev);
			return rc;
		}
		normalise_local(cur->pool, r->px, cur->wt, cur->w, cur->h, o->sigma_norm, cur->ref,
		                cur->dx, cur->scratch);
		normalise_local(cur->pool, pm->lv[l].px, cur->wt, cur->w, cur->h, o->sigma_norm,
		                cur->mov, cur->dx, cur->scratch);
		set_floor(cur, o->grad_floor);
		if (prev.ux)
			upsample_field(&prev, cur);
		level_free(&prev);
		run_level(cur, o, l == lf ? o->iter_fine : o->iter_coarse);
		if (stop_asked(o)) { /* a field cut short is no result */
			level_free(cur);
			return sf_fail(e, SF_EINTR, "register: stopped");
		}
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

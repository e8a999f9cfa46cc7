/* register_math.h — small helpers shared by the register_*.c files (private).
 *
 * Bilinear sampling with pixel centres at integers (transform.h), the NCC of
 * a reference image against a mapped moving image, box-halved pyramids, and
 * the 3x3 map between pyramid levels. */
#ifndef SCOPEFS_REGISTER_MATH_H
#define SCOPEFS_REGISTER_MATH_H

#include <math.h>
#include <stdint.h>

#include "scopefs/register.h"

/* Bilinear sample of im at (x, y); pixels outside the image count as 0, so
 * the value fades to 0 over the half pixel beyond the edge centres. */
/* Bilinear value of plane p at pixel k (its right and lower neighbours
 * inside) with weights ax, ay: the one float evaluation order the fast
 * interior paths share, so they match their edge-testing fallbacks. */
static inline float reg_bilerp(const float *p, long k, long w, float ax, float ay)
{
	float top = p[k] + ax * (p[k + 1] - p[k]);
	float bot = p[k + w] + ax * (p[k + w + 1] - p[k + w]);
	return top + ay * (bot - top);
}

static inline float reg_sample_zero(const sf_reg_image *im, double x, double y)
{
	double fx = floor(x), fy = floor(y);
	long ix = (long)fx, iy = (long)fy;
	float ax = (float)(x - fx), ay = (float)(y - fy);
	long w = im->w, h = im->h;
	if (ix < -1 || iy < -1 || ix >= w || iy >= h)
		return 0.0f;
	float v00 = 0, v01 = 0, v10 = 0, v11 = 0;
	const float *p = im->px;
	if (iy >= 0) {
		if (ix >= 0)
			v00 = p[iy * w + ix];
		if (ix + 1 < w)
			v01 = p[iy * w + ix + 1];
	}
	if (iy + 1 < h) {
		if (ix >= 0)
			v10 = p[(iy + 1) * w + ix];
		if (ix + 1 < w)
			v11 = p[(iy + 1) * w + ix + 1];
	}
	float top = v00 + ax * (v01 - v00), bot = v10 + ax * (v11 - v10);
	return top + ay * (bot - top);
}

/* A box-halved pyramid: level 0 is the image itself (borrowed), level l has
 * downsample 2^l under the pixel-centre rule (sf_box_reduce with k = 2). */
#define REG_MAX_LEVELS 16
typedef struct reg_pyramid {
	unsigned n;                      /* levels */
	sf_reg_image lv[REG_MAX_LEVELS]; /* lv[0] borrows; the others are owned */
} reg_pyramid;

/* Halve until the longest side is <= min_dim (or a side would reach 1). */
int reg_pyramid_build(const sf_reg_image *im, uint32_t min_dim, reg_pyramid *p, sf_err *e);
/* Halve exactly l times (fewer only where a side would drop below 4). */
int reg_pyramid_to(const sf_reg_image *im, unsigned l, reg_pyramid *p, sf_err *e);
void reg_pyramid_free(reg_pyramid *p);

/* The map m between thumbnails (level 0) as a map between level-l pixels of
 * both pyramids: S(2^l)^-1 o m o S(2^l), S(f): x -> (x + 0.5) f - 0.5; and back. */
void reg_map_to_level(const double m[9], unsigned l, double out[9]);
void reg_map_from_level(const double ml[9], unsigned l, double out[9]);

/* NCC of ref against mov(m x) over the reference pixels (mask nonzero, NULL
 * = all); with inside_only, only where m x falls inside mov (between its
 * edge pixel centres), else mov is 0 outside.  *frac (may be NULL) receives
 * the fraction of the considered pixels used.  0 when either side is flat. */
double reg_ncc(const sf_reg_image *ref, const uint8_t *mask, const sf_reg_image *mov,
               const double m[9], int inside_only, double *frac);

/* The mirror image of src about its vertical centre line, x -> w - 1 - x. */
int reg_mirror_x(const sf_reg_image *src, sf_reg_image *out, sf_err *e);

/* One pyramid level ready for an intensity fit (register_level.c): both
 * images blurred with sigma 1 px, the moving image's gradient (central
 * differences, one-sided at the borders) and the reference mask at that
 * level.  The NCC and MI refinements share it. */
typedef struct reg_fit_level {
	sf_reg_image ref, mov, gx, gy; /* blurred copies; gradient of mov */
	uint8_t *mask;                 /* ref mask at this level, NULL = all */
} reg_fit_level;

/* The w x h 0/1 mask at pyramid level l: halved as floats l times, kept
 * where >= 0.5; *out (like's size) is NULL when mask is.  e may be NULL. */
int reg_level_mask(const uint8_t *mask, uint32_t w, uint32_t h, unsigned l,
                   const sf_reg_image *like, uint8_t **out, sf_err *e);
/* Level l of ref and mov (the pyramids' level-l images), the mask being
 * the full-size mw x mh one.  lv is freed on failure. */
int reg_fit_level_make(const sf_reg_image *ref, const sf_reg_image *mov, const uint8_t *mask,
                       uint32_t mw, uint32_t mh, unsigned l, reg_fit_level *lv, sf_err *e);
void reg_fit_level_free(reg_fit_level *lv);

/* The geometric model of a refinement at one level: p holds ng
 * parameters, similarity (ng 4: p q b1 b2, L = [p -q; q p] F0 with F0 =
 * diag(f0, 1) the mirror found by the search) or affine (ng 6: a0 a1 b1
 * a3 a4 b2, L = [a0 a1; a3 a4]), with T(x) = L (x - c) + b about the
 * level's reference centre c, so the parameters are well conditioned. */
typedef struct reg_geom {
	int ng;        /* 4 (similarity) or 6 (affine) */
	double f0;     /* similarity: -1 mirrored, 1 not */
	double cx, cy; /* reference centre at this level */
} reg_geom;

/* The 3x3 map of p; the p closest to map m (similarity: the projection of
 * L F0 on [p -q; q p]); and d(T(x, y))/dp dotted with the moving image's
 * gradient (dx, dy), into j[0 .. ng). */
void reg_geom_to_map(const reg_geom *g, const double *p, double m[9]);
void reg_geom_from_map(const reg_geom *g, const double m[9], double *p);
/* Inline: the fits call it once per pixel and pass. */
static inline void reg_geom_jacobian(const reg_geom *g, double x, double y, double dx, double dy,
                                     double *j)
{
	double u1 = x - g->cx, u2 = y - g->cy;
	if (g->ng == 4) {
		u1 *= g->f0;
		j[0] = dx * u1 + dy * u2;
		j[1] = -dx * u2 + dy * u1;
		j[2] = dx;
		j[3] = dy;
	} else {
		j[0] = dx * u1;
		j[1] = dx * u2;
		j[2] = dx;
		j[3] = dy * u1;
		j[4] = dy * u2;
		j[5] = dy;
	}
}

/* What a refinement (NCC or MI) works on: both pyramids and the levels it
 * runs, from lc (coarsest: the reference's longest side at most min_dim)
 * to lf (finest: at most max_dim, 0 = the thumbnails), clamped to both
 * pyramids.  reg_refine_begin checks the model and the sizes first. */
typedef struct reg_pool reg_pool;
typedef struct reg_refine_pyramids {
	reg_pyramid rp, mp;
	unsigned lc, lf;
	reg_pool *pool; /* borrowed; NULL: one thread */
} reg_refine_pyramids;

/* Builds both pyramids (owned: free rp and mp); pool NULL. */
int reg_refine_begin(const sf_reg_image *ref, const sf_reg_image *mov, const sf_reg_opts *o,
                     reg_refine_pyramids *p, sf_err *e);
/* The coarsest level a refinement with o starts at (before clamping to
 * the pyramids), so a caller can build pyramids deep enough once. */
unsigned reg_refine_coarsest(const sf_reg_image *ref, const sf_reg_opts *o);
/* p borrows the already built rp and mp (not to be freed through p), the
 * levels picked for o and clamped to both; pool as given. */
void reg_refine_view(const reg_pyramid *rp, const reg_pyramid *mp, const sf_reg_opts *o,
                     reg_pool *pool, reg_refine_pyramids *p);

/* The refinements on pyramids p (register_affine.c, register_mi.c): as
 * sf_reg_refine and sf_reg_refine_mi, without building anything twice. */
int reg_refine_ncc(const reg_refine_pyramids *p, const uint8_t *ref_mask, const sf_reg_opts *o,
                   sf_reg_result *r, sf_err *e);
int reg_refine_mi(const reg_refine_pyramids *p, const uint8_t *ref_mask, const sf_reg_opts *o,
                  sf_reg_result *r, sf_err *e);

/* A small fixed pool of threads owned by one registration call
 * (register_pool.c).  Work is split into numbered blocks whose bounds do
 * not depend on the thread count, each block writing only its own outputs,
 * so results are identical for any number of threads.  A NULL pool (from
 * threads <= 1) runs the blocks in order on the caller's thread. */
typedef void (*reg_pool_fn)(void *ctx, long block);

/* threads - 1 workers (the caller is the last); *p NULL when threads <= 1. */
int reg_pool_start(reg_pool **p, unsigned threads, sf_err *e);
void reg_pool_stop(reg_pool *p); /* NULL is fine */
/* fn(ctx, b) for every b < blocks, on the workers and the caller; returns
 * when all are done.  Not re-entrant: one job per pool at a time. */
void reg_pool_run(reg_pool *p, long blocks, reg_pool_fn fn, void *ctx);
unsigned reg_pool_threads(const reg_pool *p);

/* Rows per block of a row-split image loop: a fixed height, so the
 * blocks (and the order in which their sums are added) do not depend on
 * the thread count. */
#define REG_BLOCK_ROWS 32
/* Images with fewer pixels than this run on one thread: waking the pool
 * costs more than it saves. */
#define REG_PARALLEL_MIN_PX 16384
static inline long reg_row_blocks(long h)
{
	return (h + REG_BLOCK_ROWS - 1) / REG_BLOCK_ROWS;
}

#endif

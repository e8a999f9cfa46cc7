/* register_affine.c — intensity-based refinement of a similarity or affine
 * map, coarse to fine (sf_reg_refine).
 *
 * Model at each pyramid level: ref(x) ~ g * mov(T(x)) + o with
 * T(x) = L (x - c) + b, c the reference level's centre (so the parameters
 * are well conditioned), and g, o a gain and bias solved along with the
 * geometry, which makes the least-squares fit equivalent to maximising NCC.
 * Similarity: L = [p -q; q p] F0 with F0 the mirror found by the
 * initialisation (diag(-1, 1) or the identity), 4 geometric parameters;
 * affine: the 4 entries of L, 6 in all.
 *
 * Each level runs Levenberg-Marquardt on the Gauss-Newton normal equations
 * (Jacobi-scaled, so pixel and matrix parameters mix safely), accepting a
 * step only when the mean robust cost drops.  Residuals are weighted by
 * Geman-McClure with a scale fixed per level from the residuals' median
 * absolute deviation, so tissue present in one image only weighs little.
 * Only reference pixels (in the mask) whose source lies between the moving
 * image's edge pixel centres count: no artificial edge at the frame.
 *
 * Levels: box-halved pyramids of both images (level l has downsample 2^l
 * in both), each blurred with sigma 1 px, from the level whose reference
 * is at most min_dim px to the one at most max_dim (0: the thumbnails).
 * The result is kept only if its NCC at the finest level beats the start's. */
#include "scopefs/register.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "register_math.h"
#include "scopefs/select.h"

#define MAXP          8     /* 6 geometric + gain + bias */
#define STEP_TOL      0.005 /* stop when no reference corner moves more (level px) */
#define GM_SCALE_MADS 3.0   /* Geman-McClure scale, in robust standard deviations */
#define EXTRAP_COS    0.9   /* extrapolate when two steps point this much the same way */
#define EXTRAP_RMIN   0.5   /* ... and the second is at least this fraction of the first */
#define EXTRAP_MAX    10.0  /* the longest jump, in steps */

/* Parameters: geom[0..ng), then gain, bias. */
typedef struct fit_params {
	reg_geom g;     /* the geometric model (register_math.h) */
	double p[MAXP]; /* similarity p q b1 b2 | affine a0 a1 b1 a3 a4 b2; then g, o */
} fit_params;

/* Sums of one pass over the reference pixels at parameters fp. */
typedef struct pass_sums {
	double h[MAXP][MAXP], g[MAXP]; /* J^T W J, J^T W r */
	double cost;                   /* mean robust cost */
	size_t n;                      /* pixels used */
} pass_sums;

/* Bilinear samples of the moving image and its gradient at (x, y), as
 * reg_sample_zero of each (the same operations, the weights found once). */
static inline void sample3(const reg_fit_level *lv, double x, double y, double *mv, double *gx,
                           double *gy)
{
	double fx = floor(x), fy = floor(y);
	long ix = (long)fx, iy = (long)fy, w = lv->mov.w, h = lv->mov.h;
	float ax = (float)(x - fx), ay = (float)(y - fy);
	if (ix < -1 || iy < -1 || ix >= w || iy >= h) {
		*mv = *gx = *gy = 0;
		return;
	}
	const float *planes[3] = {lv->mov.px, lv->gx.px, lv->gy.px};
	double *out[3] = {mv, gx, gy};
	int has00 = iy >= 0 && ix >= 0, has01 = iy >= 0 && ix + 1 < w;
	int has10 = iy + 1 < h && ix >= 0, has11 = iy + 1 < h && ix + 1 < w;
	long i00 = iy * w + ix;
	for (int k = 0; k < 3; k++) {
		const float *p = planes[k];
		float v00 = has00 ? p[i00] : 0, v01 = has01 ? p[i00 + 1] : 0;
		float v10 = has10 ? p[i00 + w] : 0, v11 = has11 ? p[i00 + w + 1] : 0;
		float top = v00 + ax * (v01 - v00), bot = v10 + ax * (v11 - v10);
		*out[k] = top + ay * (bot - top);
	}
}

/* One fit_pass over a block of reference rows (fit_pass splits the rows
 * into fixed blocks over the pool and adds their sums in block order). */
typedef struct pass_job {
	const reg_fit_level *lv;
	const fit_params *fp;
	double m[9], sigma;
	pass_sums *part; /* one per block */
	float *resid;    /* per reference pixel, -1 where unused; may be NULL */
} pass_job;

/* The normal equations' sums of one used pixel: g += w j r, h += w j j^T
 * (upper triangle).  np is a constant at each call (6 or 8). */
static inline __attribute__((always_inline)) void
accumulate(int np, const double *j, double w, double r, double h[MAXP][MAXP], double *g)
{
	for (int a = 0; a < np; a++) {
		double wj = w * j[a];
		g[a] += wj * r;
		for (int c = a; c < np; c++)
			h[a][c] += wj * j[c];
	}
}

/* Rows [y0, y1) of a pass at map m (pass_job), the sums into s.  np: the
 * parameters (a constant where it is called).  The sums live in locals
 * (no aliasing with the images) and are added in pixel order, as before. */
static inline __attribute__((always_inline)) void
pass_rows(const pass_job *jb, const double *m, int np, uint32_t y0, uint32_t y1, pass_sums *s)
{
	const reg_fit_level *lv = jb->lv;
	const fit_params *fp = jb->fp;
	const reg_geom geom = fp->g;
	double h[MAXP][MAXP] = {{0}}, gs[MAXP] = {0};
	double g = fp->p[geom.ng], o = fp->p[geom.ng + 1], cost = 0, sigma = jb->sigma;
	double xmax = lv->mov.w - 1.0, ymax = lv->mov.h - 1.0, s2 = sigma * sigma;
	const float *ref = lv->ref.px, *mp = lv->mov.px, *gxp = lv->gx.px, *gyp = lv->gy.px;
	const uint8_t *mask = lv->mask;
	float *resid = jb->resid;
	long rw = lv->ref.w, w = lv->mov.w, hh = lv->mov.h;
	size_t n = 0;
	for (uint32_t y = y0; y < y1; y++) {
		for (uint32_t x = 0; x < (uint32_t)rw; x++) {
			size_t i = (size_t)y * rw + x;
			if (resid)
				resid[i] = -1;
			if (mask && !mask[i])
				continue;
			double sx = m[0] * x + m[1] * y + m[2], sy = m[3] * x + m[4] * y + m[5];
			if (sx < 0 || sy < 0 || sx > xmax || sy > ymax)
				continue;
			double mv, dx, dy;
			/* sample3's arithmetic; inside the last pixel centres (the
			 * common case) without its edge tests.  sx, sy >= 0 here, so
			 * the truncation is the floor. */
			long ix = (long)sx, iy = (long)sy;
			if (ix + 1 < w && iy + 1 < hh) {
				float ax = (float)(sx - (double)ix), ay = (float)(sy - (double)iy);
				long k = iy * w + ix;
				mv = reg_bilerp(mp, k, w, ax, ay);
				dx = reg_bilerp(gxp, k, w, ax, ay);
				dy = reg_bilerp(gyp, k, w, ax, ay);
			} else
				sample3(lv, sx, sy, &mv, &dx, &dy);
			dx *= g;
			dy *= g;
			double r = ref[i] - (g * mv + o), wgt = 1;
			if (resid)
				resid[i] = (float)fabs(r);
			if (sigma > 0) {
				double d = s2 + r * r;
				wgt = s2 * s2 / (d * d);
				cost += r * r / d;
			} else
				cost += r * r;
			double j[MAXP];
			reg_geom_jacobian(&geom, x, y, dx, dy, j);
			j[geom.ng] = mv;
			j[geom.ng + 1] = 1;
			accumulate(np, j, wgt, r, h, gs);
			n++;
		}
	}
	memcpy(s->h, h, sizeof h);
	memcpy(s->g, gs, sizeof gs);
	s->cost = cost; /* the block's sum; fit_pass makes the mean */
	s->n = n;
}

static void pass_block(void *ctx, long b)
{
	const pass_job *jb = ctx;
	uint32_t y0 = (uint32_t)b * REG_BLOCK_ROWS, h = jb->lv->ref.h;
	uint32_t y1 = y0 + REG_BLOCK_ROWS < h ? y0 + REG_BLOCK_ROWS : h;
	pass_sums *s = &jb->part[b];
	if (jb->fp->g.ng == 6)
		pass_rows(jb, jb->m, 8, y0, y1, s);
	else
		pass_rows(jb, jb->m, 6, y0, y1, s);
}

/* One pass: residuals, robust weights (sigma > 0) and the normal equations,
 * the reference rows split into fixed blocks (part: one pass_sums per
 * block) whose sums are added in block order, so the result does not
 * depend on the pool's threads.  resid (may be NULL; as many floats as
 * reference pixels) receives |r| of each used pixel, in pixel order; the
 * count is s->n. */
static void fit_pass(const reg_fit_level *lv, const fit_params *fp, double sigma, reg_pool *pool,
                     pass_sums *part, pass_sums *s, float *resid)
{
	int np = fp->g.ng + 2;
	pass_job jb = {lv, fp, {0}, sigma, part, resid};
	reg_geom_to_map(&fp->g, fp->p, jb.m);
	long nb = reg_row_blocks(lv->ref.h);
	reg_pool_run(pool, nb, pass_block, &jb);
	memset(s, 0, sizeof *s);
	double cost = 0;
	for (long b = 0; b < nb; b++) {
		for (int a = 0; a < np; a++) {
			s->g[a] += part[b].g[a];
			for (int c = a; c < np; c++)
				s->h[a][c] += part[b].h[a][c];
		}
		cost += part[b].cost;
		s->n += part[b].n;
	}
	for (int a = 0; a < np; a++)
		for (int b = 0; b < a; b++)
			s->h[a][b] = s->h[b][a];
	s->cost = s->n ? cost / (double)s->n : INFINITY;
	if (resid) { /* compact the used pixels' residuals, in pixel order */
		size_t k = 0, n = (size_t)lv->ref.w * lv->ref.h;
		for (size_t i = 0; i < n; i++)
			if (resid[i] >= 0)
				resid[k++] = resid[i];
	}
}

/* Solve (D^-1 H D^-1 + lambda I) z = D^-1 g, delta = D^-1 z, D = sqrt diag H,
 * by Gaussian elimination with partial pivoting.  0 on success. */
static int lm_solve(const pass_sums *s, int np, double lambda, double *delta)
{
	double a[MAXP][MAXP + 1], d[MAXP];
	for (int i = 0; i < np; i++) {
		if (!(s->h[i][i] > 0))
			return -1;
		d[i] = sqrt(s->h[i][i]);
	}
	for (int i = 0; i < np; i++) {
		for (int j = 0; j < np; j++)
			a[i][j] = s->h[i][j] / (d[i] * d[j]) + (i == j ? lambda : 0);
		a[i][np] = s->g[i] / d[i];
	}
	for (int c = 0; c < np; c++) {
		int piv = c;
		for (int r = c + 1; r < np; r++)
			if (fabs(a[r][c]) > fabs(a[piv][c]))
				piv = r;
		if (fabs(a[piv][c]) < 1e-12)
			return -1;
		for (int k = 0; k <= np; k++) {
			double t = a[c][k];
			a[c][k] = a[piv][k];
			a[piv][k] = t;
		}
		for (int r = c + 1; r < np; r++) {
			double f = a[r][c] / a[c][c];
			for (int k = c; k <= np; k++)
				a[r][k] -= f * a[c][k];
		}
	}
	for (int c = np - 1; c >= 0; c--) {
		double v = a[c][np];
		for (int k = c + 1; k < np; k++)
			v -= a[c][k] * delta[k];
		delta[c] = v / a[c][c];
	}
	for (int i = 0; i < np; i++)
		delta[i] /= d[i];
	return 0;
}

/* The moves of the four reference corners from parameters a to b into
 * d[8] (dx, dy per corner); returns the largest move. */
static double corner_disp(const fit_params *a, const fit_params *b, const sf_reg_image *ref,
                          double d[8])
{
	double ma[9], mb[9], worst = 0;
	reg_geom_to_map(&a->g, a->p, ma);
	reg_geom_to_map(&b->g, b->p, mb);
	for (int k = 0; k < 4; k++) {
		double x = (k & 1) ? ref->w - 1.0 : 0, y = (k & 2) ? ref->h - 1.0 : 0;
		double dx = (mb[0] - ma[0]) * x + (mb[1] - ma[1]) * y + mb[2] - ma[2];
		double dy = (mb[3] - ma[3]) * x + (mb[4] - ma[4]) * y + mb[5] - ma[5];
		d[2 * k] = dx;
		d[2 * k + 1] = dy;
		double len = sqrt(dx * dx + dy * dy);
		worst = len > worst ? len : worst;
	}
	return worst;
}

/* Where the robust cost's valley is long and flat (tissue that also
 * deforms non-rigidly), Gauss-Newton creeps along it: each step points the
 * same way as the last and is a fixed fraction r of it (0.93 on the
 * benchmark pairs, so 40 iterations did not reach STEP_TOL).  Then the
 * steps still to come add up to about step * r / (1 - r) (Aitken); try
 * that jump (at most EXTRAP_MAX steps) and keep it when the cost does not
 * rise.  d and prev_d: the corner moves (corner_disp) of the step just
 * taken (before -> fp) and of the one before it. */
static int extrapolate(const reg_fit_level *lv, const fit_params *before, fit_params *fp,
                       const double d[8], const double prev_d[8], double sigma, reg_pool *pool,
                       pass_sums *part, pass_sums *cur)
{
	double dd = 0, nn = 0, pp = 0;
	for (int k = 0; k < 8; k++) {
		dd += d[k] * prev_d[k];
		nn += d[k] * d[k];
		pp += prev_d[k] * prev_d[k];
	}
	if (!(nn > 0 && pp > 0))
		return 0;
	double r = sqrt(nn / pp), cosv = dd / sqrt(nn * pp);
	if (!(cosv > EXTRAP_COS && r > EXTRAP_RMIN && r < 1))
		return 0;
	double f = r / (1 - r);
	f = f < EXTRAP_MAX ? f : EXTRAP_MAX;
	fit_params jump = *fp;
	for (int k = 0; k < fp->g.ng + 2; k++)
		jump.p[k] += f * (fp->p[k] - before->p[k]);
	pass_sums next;
	fit_pass(lv, &jump, sigma, pool, part, &next, NULL);
	if (next.n < 16 || !(next.cost <= cur->cost))
		return 0;
	*fp = jump;
	*cur = next;
	return 1;
}

/* Least-squares gain and bias of ref against mov(m x) over the used pixels. */
static void fit_gain_bias(const reg_fit_level *lv, fit_params *fp)
{
	double m[9], sa = 0, sb = 0, sbb = 0, sab = 0;
	size_t n = 0;
	reg_geom_to_map(&fp->g, fp->p, m);
	double xmax = lv->mov.w - 1.0, ymax = lv->mov.h - 1.0;
	for (uint32_t y = 0; y < lv->ref.h; y++)
		for (uint32_t x = 0; x < lv->ref.w; x++) {
			size_t i = (size_t)y * lv->ref.w + x;
			double sx = m[0] * x + m[1] * y + m[2], sy = m[3] * x + m[4] * y + m[5];
			if ((lv->mask && !lv->mask[i]) || sx < 0 || sy < 0 || sx > xmax ||
			    sy > ymax)
				continue;
			double a = lv->ref.px[i], b = reg_sample_zero(&lv->mov, sx, sy);
			sa += a;
			sb += b;
			sbb += b * b;
			sab += a * b;
			n++;
		}
	double vb = n ? sbb - sb * sb / n : 0;
	double g = vb > 1e-12 * (double)n && n ? (sab - sa * sb / n) / vb : 1;
	fp->p[fp->g.ng] = g > 0.05 ? g : 0.05; /* an anti-correlated start is no start */
	fp->p[fp->g.ng + 1] = n ? (sa - fp->p[fp->g.ng] * sb) / n : 0;
}

/* Levenberg-Marquardt at one level, from and into fp. */
static int fit_level_run(const reg_fit_level *lv, fit_params *fp, int max_iter, reg_pool *pool,
                         sf_err *e)
{
	size_t n = (size_t)lv->ref.w * lv->ref.h;
	float *resid = malloc(n * sizeof *resid);
	pass_sums *part = malloc((size_t)reg_row_blocks(lv->ref.h) * sizeof *part);
	if (!resid || !part) {
		free(resid);
		free(part);
		return sf_fail(e, SF_ENOMEM, "register: residual buffer of %zu floats", n);
	}
	int np = fp->g.ng + 2;
	fit_gain_bias(lv, fp);
	pass_sums cur, next;
	fit_pass(lv, fp, 0, pool, part, &cur, resid);
	double sigma = 0;
	if (cur.n > 16) {
		/* The median by selection: the value a full sort puts there. */
		sigma = GM_SCALE_MADS * 1.4826 * sf_select_kth(resid, cur.n, cur.n / 2);
	}
	free(resid);
	if (!(sigma > 1e-6) || cur.n < 16) {
		free(part);
		return SF_OK; /* a perfect or empty overlap: nothing to refine */
	}
	fit_pass(lv, fp, sigma, pool, part, &cur, NULL);
	double lambda = 1e-3, prev_d[8];
	int have_prev = 0;
	for (int it = 0; it < max_iter; it++) {
		double delta[MAXP];
		if (lm_solve(&cur, np, lambda, delta))
			break;
		fit_params trial = *fp;
		for (int k = 0; k < np; k++)
			trial.p[k] += delta[k];
		fit_pass(lv, &trial, sigma, pool, part, &next, NULL);
		if (next.n >= 16 && next.cost <= cur.cost) {
			double d[8], moved = corner_disp(fp, &trial, &lv->ref, d);
			fit_params before = *fp;
			*fp = trial;
			cur = next;
			lambda = lambda / 10 > 1e-7 ? lambda / 10 : 1e-7;
			if (moved < STEP_TOL)
				break;
			if (have_prev && it + 1 < max_iter &&
			    extrapolate(lv, &before, fp, d, prev_d, sigma, pool, part, &cur)) {
				it++; /* the extra pass counts as an iteration */
				have_prev = 0;
				continue;
			}
			memcpy(prev_d, d, sizeof prev_d);
			have_prev = 1;
		} else {
			have_prev = 0;
			lambda *= 10;
			if (lambda > 1e4)
				break;
		}
	}
	free(part);
	return SF_OK;
}

/* Refinement over levels lc (coarsest) .. lf (finest), m in and out. */
static int refine_levels(const reg_pyramid *rp, const reg_pyramid *mp, const uint8_t *mask,
                         const sf_reg_opts *o, unsigned lc, unsigned lf, reg_pool *pool,
                         double m[9], sf_err *e)
{
	fit_params fp = {0};
	fp.g.ng = o->model == SF_REG_AFFINE ? 6 : 4;
	fp.g.f0 = m[0] * m[4] - m[1] * m[3] < 0 ? -1 : 1;
	fp.p[fp.g.ng] = 1;
	for (unsigned l = lc + 1; l-- > lf;) {
		reg_fit_level lv;
		int rc = reg_fit_level_make(&rp->lv[l], &mp->lv[l], mask, rp->lv[0].w, rp->lv[0].h,
		                            l, &lv, e);
		if (rc)
			return rc;
		double ml[9];
		reg_map_to_level(m, l, ml);
		fp.g.cx = (lv.ref.w - 1) / 2.0;
		fp.g.cy = (lv.ref.h - 1) / 2.0;
		reg_geom_from_map(&fp.g, ml, fp.p);
		/* Small levels run on one thread: waking the pool costs more. */
		rc = fit_level_run(
		    &lv, &fp, o->max_iter,
		    (uint64_t)lv.ref.w * lv.ref.h >= REG_PARALLEL_MIN_PX ? pool : NULL, e);
		reg_fit_level_free(&lv);
		if (rc)
			return rc;
		reg_geom_to_map(&fp.g, fp.p, ml);
		reg_map_from_level(ml, l, m);
	}
	return SF_OK;
}

/* The NCC and overlap of m at the finest level, into r. */
static void score(const reg_pyramid *rp, const reg_pyramid *mp, const uint8_t *mask, unsigned lf,
                  const double m[9], double *ncc, double *overlap, sf_err *e)
{
	double ml[9];
	reg_map_to_level(m, lf, ml);
	uint8_t *lm = NULL;
	if (lf && mask && reg_level_mask(mask, rp->lv[0].w, rp->lv[0].h, lf, &rp->lv[lf], &lm, e))
		lm = NULL; /* out of memory: score over all pixels */
	*ncc = reg_ncc(&rp->lv[lf], lf ? lm : mask, &mp->lv[lf], ml, 1, overlap);
	free(lm);
}

int reg_refine_ncc(const reg_refine_pyramids *pp, const uint8_t *ref_mask, const sf_reg_opts *o,
                   sf_reg_result *r, sf_err *e)
{
	const reg_pyramid *rp = &pp->rp, *mp = &pp->mp;
	unsigned lc = pp->lc, lf = pp->lf;
	double start_ncc, start_overlap, m[9];
	r->mi = 0;
	memcpy(m, r->m, sizeof m);
	score(rp, mp, ref_mask, lf, m, &start_ncc, &start_overlap, e);
	int rc = refine_levels(rp, mp, ref_mask, o, lc, lf, pp->pool, m, e);
	if (!rc) {
		double ncc, overlap;
		score(rp, mp, ref_mask, lf, m, &ncc, &overlap, e);
		if (ncc >= start_ncc) {
			memcpy(r->m, m, sizeof m);
			r->ncc = ncc;
			r->overlap = overlap;
		} else {
			r->ncc = start_ncc;
			r->overlap = start_overlap;
		}
		sf_reg_describe(r);
	}
	return rc;
}

int sf_reg_refine(const sf_reg_image *ref, const uint8_t *ref_mask, const sf_reg_image *mov,
                  const sf_reg_opts *o, sf_reg_result *r, sf_err *e)
{
	if (o->metric != SF_REG_METRIC_NCC && o->metric != SF_REG_METRIC_MI)
		return sf_fail(e, SF_EINVAL, "register: metric %d", o->metric);
	reg_refine_pyramids pp;
	int rc = reg_refine_begin(ref, mov, o, &pp, e);
	if (rc)
		return rc;
	rc = reg_pool_start(&pp.pool, o->threads, e);
	if (!rc)
		rc = o->metric == SF_REG_METRIC_MI ? reg_refine_mi(&pp, ref_mask, o, r, e)
		                                   : reg_refine_ncc(&pp, ref_mask, o, r, e);
	reg_pool_stop(pp.pool);
	reg_pyramid_free(&pp.rp);
	reg_pyramid_free(&pp.mp);
	return rc;
}

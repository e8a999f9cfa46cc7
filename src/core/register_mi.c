/* register_mi.c — mutual information (Mattes et al. 2003) between a
 * reference and a mapped moving image, and the refinement that maximises it
 * (sf_reg_mi, sf_reg_refine_mi), for slides of different stains.
 *
 * Estimator: the joint histogram of (reference value, moving value) over
 * the reference pixels in the mask whose source lies inside the moving
 * image.  The reference side is binned plainly (a zero-order window); the
 * moving side is spread over four bins by a cubic B-spline window, so the
 * histogram, and with it MI, is differentiable in the map's parameters.
 * The value ranges are fixed per image (not per map), so moving the map
 * changes only which bins the samples fall in:
 *   dMI/dmu = sum_{a,b} dp(a,b)/dmu * log(p(a,b) / pb(b))
 * (the reference marginal does not move), with
 *   dp(a,b)/dmu = 1/N sum_x [a_x = a] dB3(b - k_x)/dk * dk_x/dmu,
 *   dk_x/dmu = bscale * grad mov(T x) . dT(x)/dmu.
 * Pixels entering or leaving the overlap are not differentiated (N is held).
 *
 * Optimiser: BFGS on -MI with a backtracking (Armijo) line search, in
 * parameters scaled so that a unit step moves the reference's border by
 * about a pixel; the first step and every restart go 1 px along the
 * gradient, since MI's gradient has no natural length.  A level ends when
 * a step moves less than STEP_TOL px or no step along the gradient helps.
 * Parametrisation, pyramid levels, blur and pixels are those of the NCC
 * refinement (register_affine.c): T(x) = L (x - c) + b with c the
 * reference level's centre; similarity L = [p -q; q p] F0 with the mirror
 * F0 kept, affine any L. */
#include "scopefs/register.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "register_math.h"

#define MAXG          6     /* geometric parameters at most (affine) */
#define BINS_FINE     32    /* bins per axis when the mask has many pixels ... */
#define BINS_COARSE   16    /* ... and at the coarse levels, whose few samples spread thin */
#define FINE_PIXELS   16384 /* mask pixels from which a level uses BINS_FINE */
#define MIN_SAMPLES   16    /* fewer overlapping pixels: MI is 0 and no step is taken */
#define STEP_TOL      0.002 /* level px: a step that moves the border less ends the level */
#define MAX_STEP      2.0   /* level px: the longest quasi-Newton step tried */
#define MAX_BACKTRACK 12    /* halvings of a step before it counts as failed */
#define ARMIJO        1e-4  /* sufficient-decrease constant */

/* Binning of one level's images: the reference value a goes to bin
 * floor((a - amin) * ascale) (clamped), the moving value b to the window
 * centre 2 + (b - bmin) * bscale in [2, bins - 3]. */
typedef struct mi_bins {
	int bins;
	double amin, ascale;
	double bmin, bscale;
} mi_bins;

/* The images one evaluation reads (all borrowed). */
typedef struct mi_view {
	const sf_reg_image *ref, *mov;
	const sf_reg_image *gx, *gy; /* gradient of mov; NULL for the value only */
	const uint8_t *mask;         /* of ref; NULL = all */
} mi_view;

/* The joint histogram and its derivative in the parameters.  A pass
 * fills one partial histogram per band of reference rows (MI_BANDS bands,
 * fixed, so the sums do not depend on the threads) and adds them in band
 * order. */
#define MI_BANDS 8
typedef struct mi_acc {
	int bins, np;
	double *joint;            /* bins * bins, [a][b] */
	double *djoint;           /* bins * bins * np, [a][b][mu]; NULL for the value only */
	size_t n;                 /* samples */
	double *bjoint, *bdjoint; /* MI_BANDS partial joint / djoint, each as above */
	size_t bn[MI_BANDS];
	reg_pool *pool; /* borrowed; NULL: one thread */
} mi_acc;

/* Parameters at one level (as fit_params of register_affine.c, no gain). */
typedef struct mi_params {
	reg_geom g;     /* the geometric model (register_math.h) */
	double p[MAXG]; /* similarity p q b1 b2 | affine a0 a1 b1 a3 a4 b2 */
} mi_params;

/* Cubic B-spline window of the four bins k0 .. k0 + 3 around centre k
 * (k0 = floor(k) - 1): w[j] = B3(k0 + j - k), dw[j] = its derivative in k. */
static void bspline3(double k, int *k0, double w[4], double dw[4])
{
	double f = floor(k);
	*k0 = (int)f - 1;
	double t = k - f; /* in [0, 1) */
	double t2 = t * t, t3 = t2 * t, s = 1 - t;
	w[0] = s * s * s / 6;
	w[1] = (3 * t3 - 6 * t2 + 4) / 6;
	w[2] = (-3 * t3 + 3 * t2 + 3 * t + 1) / 6;
	w[3] = t3 / 6;
	dw[0] = -s * s / 2;
	dw[1] = (9 * t2 - 12 * t) / 6;
	dw[2] = (-9 * t2 + 6 * t + 3) / 6;
	dw[3] = t2 / 2;
}

static void minmax(const sf_reg_image *im, const uint8_t *mask, double *lo, double *hi)
{
	double a = INFINITY, b = -INFINITY;
	for (size_t i = 0; i < (size_t)im->w * im->h; i++) {
		if (mask && !mask[i])
			continue;
		a = im->px[i] < a ? im->px[i] : a;
		b = im->px[i] > b ? im->px[i] : b;
	}
	*lo = a;
	*hi = b;
}

/* The binning of (ref over its mask, mov); 0 when either is flat. */
static int bins_make(const sf_reg_image *ref, const uint8_t *mask, const sf_reg_image *mov,
                     int bins, mi_bins *b)
{
	double ahi, bhi;
	minmax(ref, mask, &b->amin, &ahi);
	minmax(mov, NULL, &b->bmin, &bhi);
	if (!(ahi > b->amin) || !(bhi > b->bmin))
		return 0;
	b->bins = bins;
	b->ascale = bins / (ahi - b->amin);
	b->bscale = (bins - 5) / (bhi - b->bmin);
	return 1;
}

static void acc_free(mi_acc *a)
{
	free(a->joint);
	free(a->djoint);
	free(a->bjoint);
	free(a->bdjoint);
	a->joint = a->djoint = a->bjoint = a->bdjoint = NULL;
}

static int acc_make(mi_acc *a, int bins, int np, sf_err *e)
{
	size_t nb = (size_t)bins * bins;
	a->bins = bins;
	a->np = np;
	a->pool = NULL;
	a->joint = malloc(nb * sizeof *a->joint);
	a->djoint = np ? malloc(nb * np * sizeof *a->djoint) : NULL;
	a->bjoint = malloc(MI_BANDS * nb * sizeof *a->bjoint);
	a->bdjoint = np ? malloc(MI_BANDS * nb * np * sizeof *a->bdjoint) : NULL;
	if (!a->joint || (np && !a->djoint) || !a->bjoint || (np && !a->bdjoint)) {
		acc_free(a);
		return sf_fail(e, SF_ENOMEM, "register: MI histograms of %d bins", bins);
	}
	return SF_OK;
}

/* Bilinear weights at (sx, sy), which lies between im's edge pixel
 * centres: the index of the top-left pixel and the steps to its right and
 * lower neighbours (0 on the last column or row, whose weight is then 0). */
typedef struct bilin {
	size_t at, dx, dy;
	float ax, ay;
} bilin;

static inline bilin bilin_at(const sf_reg_image *im, double sx, double sy)
{
	bilin b;
	uint32_t ix = (uint32_t)sx, iy = (uint32_t)sy;
	b.ax = (float)(sx - ix);
	b.ay = (float)(sy - iy);
	b.dx = ix + 1 < im->w ? 1 : 0;
	b.dy = iy + 1 < im->h ? im->w : 0;
	b.at = (size_t)iy * im->w + ix;
	return b;
}

static inline float bilin_get(const float *p, const bilin *b)
{
	const float *q = p + b->at;
	float top = q[0] + b->ax * (q[b->dx] - q[0]);
	float bot = q[b->dy] + b->ax * (q[b->dy + b->dx] - q[b->dy]);
	return top + b->ay * (bot - top);
}

/* What one pass reads (mi_band). */
typedef struct mi_job {
	const mi_view *v;
	const mi_bins *b;
	const double *m;
	const mi_params *fp;
	mi_acc *a;
	int np;
} mi_job;

/* Band `band` of the reference rows into its partial histograms. */
static void mi_band(void *ctx, long band)
{
	const mi_job *jb = ctx;
	const mi_view *v = jb->v;
	const mi_bins *b = jb->b;
	const double *m = jb->m;
	mi_acc *a = jb->a;
	int nb = b->bins, np = jb->np;
	double *joint = a->bjoint + (size_t)band * nb * nb;
	double *djoint = np ? a->bdjoint + (size_t)band * nb * nb * np : NULL;
	memset(joint, 0, (size_t)nb * nb * sizeof *joint);
	if (np)
		memset(djoint, 0, (size_t)nb * nb * np * sizeof *djoint);
	size_t n = 0;
	const sf_reg_image *ref = v->ref;
	double xmax = v->mov->w - 1.0, ymax = v->mov->h - 1.0;
	uint32_t y0 = (uint32_t)((uint64_t)ref->h * band / MI_BANDS);
	uint32_t y1 = (uint32_t)((uint64_t)ref->h * (band + 1) / MI_BANDS);
	for (uint32_t y = y0; y < y1; y++)
		for (uint32_t x = 0; x < ref->w; x++) {
			size_t i = (size_t)y * ref->w + x;
			if (v->mask && !v->mask[i])
				continue;
			double sx = m[0] * x + m[1] * y + m[2], sy = m[3] * x + m[4] * y + m[5];
			if (sx < 0 || sy < 0 || sx > xmax || sy > ymax)
				continue;
			int ia = (int)((ref->px[i] - b->amin) * b->ascale);
			ia = ia < 0 ? 0 : ia >= nb ? nb - 1 : ia;
			bilin bw = bilin_at(v->mov, sx, sy);
			double k = 2 + (bilin_get(v->mov->px, &bw) - b->bmin) * b->bscale;
			k = k < 2 ? 2 : k > nb - 3 ? nb - 3 : k;
			int k0;
			double w[4], dw[4], j[MAXG];
			bspline3(k, &k0, w, dw);
			double *row = joint + (size_t)ia * nb + k0;
			for (int q = 0; q < 4; q++)
				row[q] += w[q];
			n++;
			if (!np)
				continue;
			double dx = bilin_get(v->gx->px, &bw) * b->bscale;
			double dy = bilin_get(v->gy->px, &bw) * b->bscale;
			reg_geom_jacobian(&jb->fp->g, x, y, dx, dy, j);
			double *d = djoint + ((size_t)ia * nb + k0) * np;
			for (int q = 0; q < 4; q++, d += np)
				for (int u = 0; u < np; u++)
					d[u] += dw[q] * j[u];
		}
	a->bn[band] = n;
}

/* One pass over the reference pixels at map m: the joint histogram and,
 * with fp and a gradient in v, its derivative in fp's parameters.  The
 * bands run over a's pool and are added in band order. */
static void mi_pass(const mi_view *v, const mi_bins *b, const double m[9], const mi_params *fp,
                    mi_acc *a)
{
	int nb = b->bins, np = fp && v->gx ? fp->g.ng : 0;
	mi_job jb = {v, b, m, fp, a, np};
	reg_pool_run(a->pool, MI_BANDS, mi_band, &jb);
	size_t nj = (size_t)nb * nb, nd = nj * np;
	memcpy(a->joint, a->bjoint, nj * sizeof *a->joint);
	if (np)
		memcpy(a->djoint, a->bdjoint, nd * sizeof *a->djoint);
	a->n = a->bn[0];
	for (int band = 1; band < MI_BANDS; band++) {
		const double *bj = a->bjoint + (size_t)band * nj;
		for (size_t i = 0; i < nj; i++)
			a->joint[i] += bj[i];
		const double *bd = np ? a->bdjoint + (size_t)band * nd : NULL;
		for (size_t i = 0; i < nd; i++)
			a->djoint[i] += bd[i];
		a->n += a->bn[band];
	}
}

/* MI of the histogram in a and (grad, may be NULL) its gradient. */
static double mi_of(const mi_acc *a, double *grad)
{
	int nb = a->bins, np = grad ? a->np : 0;
	double pa[64], pb[64], mi = 0, inv = a->n ? 1.0 / (double)a->n : 0;
	for (int u = 0; u < np; u++)
		grad[u] = 0;
	if (a->n < MIN_SAMPLES || nb > 64)
		return 0;
	memset(pa, 0, sizeof pa);
	memset(pb, 0, sizeof pb);
	for (int ia = 0; ia < nb; ia++)
		for (int ib = 0; ib < nb; ib++) {
			double p = a->joint[ia * nb + ib] * inv;
			pa[ia] += p;
			pb[ib] += p;
		}
	for (int ia = 0; ia < nb; ia++)
		for (int ib = 0; ib < nb; ib++) {
			double p = a->joint[ia * nb + ib] * inv;
			if (!(p > 0))
				continue;
			double lg = log(p / pb[ib]);
			mi += p * (lg - log(pa[ia]));
			const double *d =
			    a->djoint ? a->djoint + ((size_t)ia * nb + ib) * np : NULL;
			for (int u = 0; u < np; u++)
				grad[u] += d[u] * inv * lg;
		}
	return mi;
}

double sf_reg_mi(const sf_reg_image *ref, const uint8_t *ref_mask, const sf_reg_image *mov,
                 const double m[9], int bins, double *overlap)
{
	mi_view v = {ref, mov, NULL, NULL, ref_mask};
	mi_bins b;
	mi_acc a = {0};
	size_t considered = 0;
	for (size_t i = 0; i < (size_t)ref->w * ref->h; i++)
		considered += !ref_mask || ref_mask[i];
	if (overlap)
		*overlap = 0;
	if (bins < 8 || bins > 64 || !considered || !bins_make(ref, ref_mask, mov, bins, &b))
		return 0;
	if (acc_make(&a, bins, 0, NULL))
		return 0;
	mi_pass(&v, &b, m, NULL, &a);
	double mi = mi_of(&a, NULL);
	if (overlap)
		*overlap = (double)a.n / (double)considered;
	acc_free(&a);
	return mi;
}

/* --- the optimiser ----------------------------------------------------------- */

/* One pyramid level ready for the fit (owned copies) and its bins. */
typedef struct mi_level {
	reg_fit_level f;
	mi_bins b;
	int usable; /* 0: an image is flat at this level */
} mi_level;

static int level_make(const reg_pyramid *rp, const reg_pyramid *mp, const uint8_t *mask, unsigned l,
                      mi_level *lv, sf_err *e)
{
	memset(lv, 0, sizeof *lv);
	int rc = reg_fit_level_make(&rp->lv[l], &mp->lv[l], mask, rp->lv[0].w, rp->lv[0].h, l,
	                            &lv->f, e);
	if (rc)
		return rc;
	size_t used = 0;
	for (size_t i = 0; i < (size_t)lv->f.ref.w * lv->f.ref.h; i++)
		used += !lv->f.mask || lv->f.mask[i];
	int bins = used >= FINE_PIXELS ? BINS_FINE : BINS_COARSE;
	lv->usable = bins_make(&lv->f.ref, lv->f.mask, &lv->f.mov, bins, &lv->b);
	return SF_OK;
}

/* -MI at fp and its gradient in the scaled parameters z = p * sc. */
static double cost_at(const mi_level *lv, const mi_params *fp, const double *sc, mi_acc *a,
                      double *gz)
{
	mi_view v = {&lv->f.ref, &lv->f.mov, &lv->f.gx, &lv->f.gy, lv->f.mask};
	double m[9];
	reg_geom_to_map(&fp->g, fp->p, m);
	mi_pass(&v, &lv->b, m, fp, a);
	if (a->n < MIN_SAMPLES)
		return INFINITY;
	double mi = mi_of(a, gz);
	for (int u = 0; u < fp->g.ng; u++)
		gz[u] = -gz[u] / sc[u];
	return -mi;
}

/* BFGS update of the inverse Hessian h with step s and gradient change y;
 * `fresh` h is first scaled to (s.y) / (y.y) as usual. */
static void bfgs_update(double h[MAXG][MAXG], int n, const double *s, const double *y, int fresh)
{
	double sy = 0, yy = 0, hy[MAXG], yhy = 0;
	for (int i = 0; i < n; i++) {
		sy += s[i] * y[i];
		yy += y[i] * y[i];
	}
	if (fresh)
		for (int i = 0; i < n; i++)
			for (int j = 0; j < n; j++)
				h[i][j] = i == j ? sy / yy : 0;
	for (int i = 0; i < n; i++) {
		hy[i] = 0;
		for (int j = 0; j < n; j++)
			hy[i] += h[i][j] * y[j];
		yhy += y[i] * hy[i];
	}
	/* H+ = H + (sy + yHy) ss^T / sy^2 - (Hy s^T + s y^T H) / sy */
	for (int i = 0; i < n; i++)
		for (int j = 0; j < n; j++)
			h[i][j] += (sy + yhy) * s[i] * s[j] / (sy * sy) -
			           (hy[i] * s[j] + s[i] * hy[j]) / sy;
}

/* Backtracking from step alpha along d (scaled); on success fp, *f and gz
 * hold the new point and *alpha the step taken.  0 on success. */
static int line_search(const mi_level *lv, mi_params *fp, const double *sc, mi_acc *a,
                       const double *d, double slope, double *alpha, double *f, double *gz)
{
	for (int t = 0; t < MAX_BACKTRACK; t++, *alpha *= 0.5) {
		mi_params trial = *fp;
		double gt[MAXG];
		for (int u = 0; u < fp->g.ng; u++)
			trial.p[u] += *alpha * d[u] / sc[u];
		double ft = cost_at(lv, &trial, sc, a, gt);
		if (ft <= *f + ARMIJO * *alpha * slope) {
			*fp = trial;
			*f = ft;
			memcpy(gz, gt, fp->g.ng * sizeof *gz);
			return 0;
		}
	}
	return -1;
}

static void identity(double h[MAXG][MAXG])
{
	for (int i = 0; i < MAXG; i++)
		for (int j = 0; j < MAXG; j++)
			h[i][j] = i == j;
}

/* The quasi-Newton direction d = -h g and its slope g.d. */
static double direction(double h[MAXG][MAXG], const double *g, int n, double *d)
{
	double slope = 0;
	for (int i = 0; i < n; i++) {
		d[i] = 0;
		for (int j = 0; j < n; j++)
			d[i] -= h[i][j] * g[j];
		slope += d[i] * g[i];
	}
	return slope;
}

/* Maximise MI at one level from and into fp. */
static void fit_level_run(const mi_level *lv, mi_params *fp, int max_iter, mi_acc *a)
{
	int n = fp->g.ng;
	double radius = (lv->f.ref.w + lv->f.ref.h) / 4.0, sc[MAXG], h[MAXG][MAXG], gz[MAXG];
	for (int u = 0; u < n; u++) /* translations are in px; matrix entries move the border */
		sc[u] = (n == 4 ? u < 2 : u % 3 != 2) ? radius : 1;
	double f = cost_at(lv, fp, sc, a, gz);
	if (!isfinite(f))
		return;
	identity(h);
	int fresh = 1;
	for (int it = 0; it < max_iter; it++) {
		double d[MAXG], dmax = 0, slope = direction(h, gz, n, d);
		if (!(slope < 0) && !fresh) { /* not a descent direction: restart */
			identity(h);
			fresh = 1;
			slope = direction(h, gz, n, d);
		}
		for (int i = 0; i < n; i++)
			dmax = fabs(d[i]) > dmax ? fabs(d[i]) : dmax;
		if (!(dmax > 0))
			break;
		double alpha = fresh ? 1.0 / dmax : dmax > MAX_STEP ? MAX_STEP / dmax : 1.0;
		double g0[MAXG];
		memcpy(g0, gz, n * sizeof *g0);
		if (line_search(lv, fp, sc, a, d, slope, &alpha, &f, gz)) {
			if (fresh)
				break;
			identity(h); /* the curvature model misled: start over from the gradient */
			fresh = 1;
			continue;
		}
		double s[MAXG], y[MAXG], sy = 0, step = 0;
		for (int i = 0; i < n; i++) {
			s[i] = alpha * d[i];
			y[i] = gz[i] - g0[i];
			sy += s[i] * y[i];
			step = fabs(s[i]) > step ? fabs(s[i]) : step;
		}
		if (sy > 1e-12) {
			bfgs_update(h, n, s, y, fresh);
			fresh = 0;
		}
		if (step < STEP_TOL)
			break;
	}
}

static int refine_levels(const reg_pyramid *rp, const reg_pyramid *mp, const uint8_t *mask,
                         const sf_reg_opts *o, unsigned lc, unsigned lf, reg_pool *pool,
                         double m[9], sf_err *e)
{
	mi_params fp = {0};
	fp.g.ng = o->model == SF_REG_AFFINE ? 6 : 4;
	fp.g.f0 = m[0] * m[4] - m[1] * m[3] < 0 ? -1 : 1;
	mi_acc a = {0};
	int rc = acc_make(&a, BINS_FINE, fp.g.ng, e);
	for (unsigned l = lc + 1; !rc && l-- > lf;) {
		mi_level lv;
		rc = level_make(rp, mp, mask, l, &lv, e);
		if (rc)
			break;
		if (lv.usable) {
			double ml[9];
			reg_map_to_level(m, l, ml);
			fp.g.cx = (lv.f.ref.w - 1) / 2.0;
			fp.g.cy = (lv.f.ref.h - 1) / 2.0;
			reg_geom_from_map(&fp.g, ml, fp.p);
			a.bins = lv.b.bins; /* a holds BINS_FINE; a level may use fewer */
			/* Small levels run on one thread: waking the pool costs more. */
			a.pool =
			    (uint64_t)lv.f.ref.w * lv.f.ref.h >= REG_PARALLEL_MIN_PX ? pool : NULL;
			fit_level_run(&lv, &fp, o->max_iter, &a);
			reg_geom_to_map(&fp.g, fp.p, ml);
			reg_map_from_level(ml, l, m);
		}
		reg_fit_level_free(&lv.f);
	}
	acc_free(&a);
	return rc;
}

/* MI (BINS_FINE), NCC and overlap of m at the finest level. */
static void score(const reg_pyramid *rp, const reg_pyramid *mp, const uint8_t *mask, unsigned lf,
                  const double m[9], sf_reg_result *r)
{
	double ml[9];
	reg_map_to_level(m, lf, ml);
	uint8_t *lm = NULL;
	if (lf && mask &&
	    reg_level_mask(mask, rp->lv[0].w, rp->lv[0].h, lf, &rp->lv[lf], &lm, NULL))
		lm = NULL; /* out of memory: score over all pixels */
	const uint8_t *use = lf ? lm : mask;
	r->mi = sf_reg_mi(&rp->lv[lf], use, &mp->lv[lf], ml, BINS_FINE, &r->overlap);
	r->ncc = reg_ncc(&rp->lv[lf], use, &mp->lv[lf], ml, 1, NULL);
	free(lm);
}

int reg_refine_mi(const reg_refine_pyramids *pp, const uint8_t *ref_mask, const sf_reg_opts *o,
                  sf_reg_result *r, sf_err *e)
{
	const reg_pyramid *rp = &pp->rp, *mp = &pp->mp;
	sf_reg_result start = *r, end = *r;
	score(rp, mp, ref_mask, pp->lf, start.m, &start);
	int rc = refine_levels(rp, mp, ref_mask, o, pp->lc, pp->lf, pp->pool, end.m, e);
	if (!rc) {
		score(rp, mp, ref_mask, pp->lf, end.m, &end);
		*r = end.mi >= start.mi ? end : start;
		sf_reg_describe(r);
	}
	return rc;
}

int sf_reg_refine_mi(const sf_reg_image *ref, const uint8_t *ref_mask, const sf_reg_image *mov,
                     const sf_reg_opts *o, sf_reg_result *r, sf_err *e)
{
	sf_reg_opts mi = *o;
	mi.metric = SF_REG_METRIC_MI;
	return sf_reg_refine(ref, ref_mask, mov, &mi, r, e);
}

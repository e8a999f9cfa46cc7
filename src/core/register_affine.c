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

#define MAXP          8     /* 6 geometric + gain + bias */
#define STEP_TOL      0.005 /* stop when no reference corner moves more (level px) */
#define GM_SCALE_MADS 3.0   /* Geman-McClure scale, in robust standard deviations */

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

/* One pass: residuals, robust weights (sigma > 0) and the normal equations.
 * resid (may be NULL) receives |r| of each used pixel, in order. */
static void fit_pass(const reg_fit_level *lv, const fit_params *fp, double sigma, pass_sums *s,
                     float *resid)
{
	int np = fp->g.ng + 2;
	double m[9];
	reg_geom_to_map(&fp->g, fp->p, m);
	memset(s, 0, sizeof *s);
	double g = fp->p[fp->g.ng], o = fp->p[fp->g.ng + 1], cost = 0;
	double xmax = lv->mov.w - 1.0, ymax = lv->mov.h - 1.0, s2 = sigma * sigma;
	const sf_reg_image *ref = &lv->ref;
	for (uint32_t y = 0; y < ref->h; y++) {
		for (uint32_t x = 0; x < ref->w; x++) {
			size_t i = (size_t)y * ref->w + x;
			if (lv->mask && !lv->mask[i])
				continue;
			double sx = m[0] * x + m[1] * y + m[2], sy = m[3] * x + m[4] * y + m[5];
			if (sx < 0 || sy < 0 || sx > xmax || sy > ymax)
				continue;
			double mv = reg_sample_zero(&lv->mov, sx, sy);
			double dx = g * reg_sample_zero(&lv->gx, sx, sy);
			double dy = g * reg_sample_zero(&lv->gy, sx, sy);
			double r = ref->px[i] - (g * mv + o), w = 1;
			if (resid)
				resid[s->n] = (float)fabs(r);
			if (sigma > 0) {
				double d = s2 + r * r;
				w = s2 * s2 / (d * d);
				cost += r * r / d;
			} else
				cost += r * r;
			double j[MAXP];
			reg_geom_jacobian(&fp->g, x, y, dx, dy, j);
			j[fp->g.ng] = mv;
			j[fp->g.ng + 1] = 1;
			for (int a = 0; a < np; a++) {
				double wj = w * j[a];
				s->g[a] += wj * r;
				for (int b = a; b < np; b++)
					s->h[a][b] += wj * j[b];
			}
			s->n++;
		}
	}
	for (int a = 0; a < np; a++)
		for (int b = 0; b < a; b++)
			s->h[a][b] = s->h[b][a];
	s->cost = s->n ? cost / (double)s->n : INFINITY;
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

/* Largest move of a reference corner between two parameter sets. */
static double corner_move(const fit_params *a, const fit_params *b, const sf_reg_image *ref)
{
	double ma[9], mb[9], worst = 0;
	reg_geom_to_map(&a->g, a->p, ma);
	reg_geom_to_map(&b->g, b->p, mb);
	for (int k = 0; k < 4; k++) {
		double x = (k & 1) ? ref->w - 1.0 : 0, y = (k & 2) ? ref->h - 1.0 : 0;
		double dx = (ma[0] - mb[0]) * x + (ma[1] - mb[1]) * y + ma[2] - mb[2];
		double dy = (ma[3] - mb[3]) * x + (ma[4] - mb[4]) * y + ma[5] - mb[5];
		double d = sqrt(dx * dx + dy * dy);
		worst = d > worst ? d : worst;
	}
	return worst;
}

static int cmp_float(const void *a, const void *b)
{
	float x = *(const float *)a, y = *(const float *)b;
	return (x > y) - (x < y);
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
static int fit_level_run(const reg_fit_level *lv, fit_params *fp, int max_iter, sf_err *e)
{
	size_t n = (size_t)lv->ref.w * lv->ref.h;
	float *resid = malloc(n * sizeof *resid);
	if (!resid)
		return sf_fail(e, SF_ENOMEM, "register: residual buffer of %zu floats", n);
	int np = fp->g.ng + 2;
	fit_gain_bias(lv, fp);
	pass_sums cur, next;
	fit_pass(lv, fp, 0, &cur, resid);
	double sigma = 0;
	if (cur.n > 16) {
		qsort(resid, cur.n, sizeof *resid, cmp_float);
		sigma = GM_SCALE_MADS * 1.4826 * resid[cur.n / 2];
	}
	free(resid);
	if (!(sigma > 1e-6) || cur.n < 16)
		return SF_OK; /* a perfect or empty overlap: nothing to refine */
	fit_pass(lv, fp, sigma, &cur, NULL);
	double lambda = 1e-3;
	for (int it = 0; it < max_iter; it++) {
		double delta[MAXP];
		if (lm_solve(&cur, np, lambda, delta))
			break;
		fit_params trial = *fp;
		for (int k = 0; k < np; k++)
			trial.p[k] += delta[k];
		fit_pass(lv, &trial, sigma, &next, NULL);
		if (next.n >= 16 && next.cost <= cur.cost) {
			double moved = corner_move(fp, &trial, &lv->ref);
			*fp = trial;
			cur = next;
			lambda = lambda / 10 > 1e-7 ? lambda / 10 : 1e-7;
			if (moved < STEP_TOL)
				break;
		} else {
			lambda *= 10;
			if (lambda > 1e4)
				break;
		}
	}
	return SF_OK;
}

/* Refinement over levels lc (coarsest) .. lf (finest), m in and out. */
static int refine_levels(const reg_pyramid *rp, const reg_pyramid *mp, const uint8_t *mask,
                         const sf_reg_opts *o, unsigned lc, unsigned lf, double m[9], sf_err *e)
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
		rc = fit_level_run(&lv, &fp, o->max_iter, e);
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

int sf_reg_refine(const sf_reg_image *ref, const uint8_t *ref_mask, const sf_reg_image *mov,
                  const sf_reg_opts *o, sf_reg_result *r, sf_err *e)
{
	if (o->metric == SF_REG_METRIC_MI)
		return sf_reg_refine_mi(ref, ref_mask, mov, o, r, e); /* register_mi.c */
	if (o->metric != SF_REG_METRIC_NCC)
		return sf_fail(e, SF_EINVAL, "register: metric %d", o->metric);
	r->mi = 0;
	reg_refine_pyramids pp;
	int rc = reg_refine_begin(ref, mov, o, &pp, e);
	if (rc)
		return rc;
	reg_pyramid rp = pp.rp, mp = pp.mp;
	unsigned lc = pp.lc, lf = pp.lf;
	double start_ncc, start_overlap, m[9];
	memcpy(m, r->m, sizeof m);
	score(&rp, &mp, ref_mask, lf, m, &start_ncc, &start_overlap, e);
	rc = refine_levels(&rp, &mp, ref_mask, o, lc, lf, m, e);
	if (!rc) {
		double ncc, overlap;
		score(&rp, &mp, ref_mask, lf, m, &ncc, &overlap, e);
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
	reg_pyramid_free(&rp);
	reg_pyramid_free(&mp);
	return rc;
}

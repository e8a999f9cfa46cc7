/* register_level.c — what the NCC refinement (register_affine.c) and the
 * MI refinement (register_mi.c) share (register_math.h): one pyramid level
 * ready for a fit (blurred copies, the moving image's gradient, the
 * reference mask at that level), the choice of levels and pyramids, and
 * the similarity/affine parameterisation. */
#include <stdlib.h>
#include <string.h>

#include "register_math.h"

#define BLUR_SIGMA 1.0 /* px at every level, on both images */

void reg_fit_level_free(reg_fit_level *lv)
{
	sf_reg_image_free(&lv->ref);
	sf_reg_image_free(&lv->mov);
	sf_reg_image_free(&lv->gx);
	sf_reg_image_free(&lv->gy);
	free(lv->mask);
	lv->mask = NULL;
}

static int copy_blurred(const sf_reg_image *src, sf_reg_image *dst, sf_err *e)
{
	int rc = sf_reg_image_alloc(dst, src->w, src->h, e);
	if (rc)
		return rc;
	memcpy(dst->px, src->px, (size_t)src->w * src->h * sizeof *dst->px);
	return sf_reg_gauss(dst, BLUR_SIGMA, e);
}

/* Central differences (one-sided at the borders). */
static void gradient(const sf_reg_image *im, sf_reg_image *gx, sf_reg_image *gy)
{
	long w = im->w, h = im->h;
	for (long y = 0; y < h; y++) {
		long y0 = y > 0 ? y - 1 : y, y1 = y + 1 < h ? y + 1 : y;
		for (long x = 0; x < w; x++) {
			long x0 = x > 0 ? x - 1 : x, x1 = x + 1 < w ? x + 1 : x;
			const float *p = im->px;
			gx->px[y * w + x] =
			    (p[y * w + x1] - p[y * w + x0]) / (float)(x1 - x0 ? x1 - x0 : 1);
			gy->px[y * w + x] =
			    (p[y1 * w + x] - p[y0 * w + x]) / (float)(y1 - y0 ? y1 - y0 : 1);
		}
	}
}

int reg_level_mask(const uint8_t *mask, uint32_t w, uint32_t h, unsigned l,
                   const sf_reg_image *like, uint8_t **out, sf_err *e)
{
	*out = NULL;
	if (!mask)
		return SF_OK;
	sf_reg_image mf;
	int rc = sf_reg_image_alloc(&mf, w, h, e);
	if (rc)
		return rc;
	for (size_t i = 0; i < (size_t)w * h; i++)
		mf.px[i] = mask[i] ? 1.0f : 0.0f;
	reg_pyramid p;
	rc = reg_pyramid_to(&mf, l, &p, e);
	if (!rc) {
		const sf_reg_image *top = &p.lv[p.n - 1];
		size_t n = (size_t)like->w * like->h;
		if (top->w != like->w || top->h != like->h)
			rc = sf_fail(e, SF_EINVAL,
			             "register: mask pyramid does not match the image");
		else if (!(*out = malloc(n)))
			rc = sf_fail(e, SF_ENOMEM, "register: level mask");
		else
			for (size_t i = 0; i < n; i++)
				(*out)[i] = top->px[i] >= 0.5f;
		reg_pyramid_free(&p);
	}
	sf_reg_image_free(&mf);
	return rc;
}

int reg_fit_level_make(const sf_reg_image *ref, const sf_reg_image *mov, const uint8_t *mask,
                       uint32_t mw, uint32_t mh, unsigned l, reg_fit_level *lv, sf_err *e)
{
	memset(lv, 0, sizeof *lv);
	int rc = copy_blurred(ref, &lv->ref, e);
	if (!rc)
		rc = copy_blurred(mov, &lv->mov, e);
	if (!rc)
		rc = sf_reg_image_alloc(&lv->gx, mov->w, mov->h, e);
	if (!rc)
		rc = sf_reg_image_alloc(&lv->gy, mov->w, mov->h, e);
	if (!rc)
		rc = reg_level_mask(mask, mw, mh, l, ref, &lv->mask, e);
	if (rc) {
		reg_fit_level_free(lv);
		return rc;
	}
	gradient(&lv->mov, &lv->gx, &lv->gy);
	return SF_OK;
}

/* Levels: the finest whose reference fits max_dim, the coarsest whose
 * reference fits min_dim (never finer than the finest). */
static void pick_levels(const sf_reg_image *ref, const sf_reg_opts *o, unsigned *lc, unsigned *lf)
{
	uint32_t longest = ref->w > ref->h ? ref->w : ref->h;
	unsigned f = 0, c = 0;
	while (o->max_dim && ((uint64_t)longest + (1ull << f) - 1) >> f > o->max_dim && f < 15)
		f++;
	uint32_t lo = o->min_dim > 8 ? o->min_dim : 8;
	while (((uint64_t)longest + (1ull << c) - 1) >> c > lo && c < 15)
		c++;
	*lf = f;
	*lc = c > f ? c : f;
}

int reg_refine_begin(const sf_reg_image *ref, const sf_reg_image *mov, const sf_reg_opts *o,
                     reg_refine_pyramids *p, sf_err *e)
{
	if (o->model != SF_REG_SIMILARITY && o->model != SF_REG_AFFINE)
		return sf_fail(e, SF_EINVAL, "register: model %d", (int)o->model);
	if (!ref->px || !mov->px || ref->w < 8 || ref->h < 8 || mov->w < 8 || mov->h < 8)
		return sf_fail(e, SF_EINVAL, "register: images %u x %u and %u x %u (need >= 8 px)",
		               ref->w, ref->h, mov->w, mov->h);
	pick_levels(ref, o, &p->lc, &p->lf);
	p->pool = NULL;
	int rc = reg_pyramid_to(ref, p->lc, &p->rp, e);
	if (rc)
		return rc;
	rc = reg_pyramid_to(mov, p->lc, &p->mp, e);
	if (rc) {
		reg_pyramid_free(&p->rp);
		return rc;
	}
	unsigned top = p->rp.n < p->mp.n ? p->rp.n - 1 : p->mp.n - 1;
	p->lc = p->lc < top ? p->lc : top;
	p->lf = p->lf < p->lc ? p->lf : p->lc;
	return SF_OK;
}

unsigned reg_refine_coarsest(const sf_reg_image *ref, const sf_reg_opts *o)
{
	unsigned lc, lf;
	pick_levels(ref, o, &lc, &lf);
	return lc;
}

void reg_refine_view(const reg_pyramid *rp, const reg_pyramid *mp, const sf_reg_opts *o,
                     reg_pool *pool, reg_refine_pyramids *p)
{
	p->rp = *rp;
	p->mp = *mp;
	p->pool = pool;
	pick_levels(&rp->lv[0], o, &p->lc, &p->lf);
	unsigned top = rp->n < mp->n ? rp->n - 1 : mp->n - 1;
	p->lc = p->lc < top ? p->lc : top;
	p->lf = p->lf < p->lc ? p->lf : p->lc;
}

void reg_geom_to_map(const reg_geom *g, const double *p, double m[9])
{
	double l00, l01, l10, l11, b1, b2;
	if (g->ng == 4) {
		l00 = p[0] * g->f0, l01 = -p[1], l10 = p[1] * g->f0, l11 = p[0];
		b1 = p[2], b2 = p[3];
	} else {
		l00 = p[0], l01 = p[1], b1 = p[2], l10 = p[3], l11 = p[4], b2 = p[5];
	}
	m[0] = l00;
	m[1] = l01;
	m[2] = b1 - l00 * g->cx - l01 * g->cy;
	m[3] = l10;
	m[4] = l11;
	m[5] = b2 - l10 * g->cx - l11 * g->cy;
	m[6] = m[7] = 0;
	m[8] = 1;
}

void reg_geom_from_map(const reg_geom *g, const double m[9], double *p)
{
	double b1 = m[0] * g->cx + m[1] * g->cy + m[2];
	double b2 = m[3] * g->cx + m[4] * g->cy + m[5];
	if (g->ng == 4) { /* L F0 with F0 its own inverse, projected */
		p[0] = (m[0] * g->f0 + m[4]) / 2;
		p[1] = (m[3] * g->f0 - m[1]) / 2;
		p[2] = b1;
		p[3] = b2;
	} else {
		p[0] = m[0], p[1] = m[1], p[2] = b1;
		p[3] = m[3], p[4] = m[4], p[5] = b2;
	}
}

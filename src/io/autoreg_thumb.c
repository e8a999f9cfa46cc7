/* autoreg_thumb.c — the registration image of a slide (autoreg_thumb.h).
 *
 * Reading goes band by band: BAND_ROWS thumbnail rows need k * BAND_ROWS
 * rows of the chosen level, which are read, box-reduced into the raw
 * thumbnail and dropped, so a 30k slide costs a few MB beyond its
 * thumbnail.  Grey conversion and the percentile stretch then run on the
 * whole raw thumbnail (percentiles need all of it). */
#include "autoreg_thumb.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "scopefs/products.h"
#include "scopefs/qc.h"
#include "scopefs/resample.h"

#define BAND_ROWS  32
#define STRETCH_LO 1.0  /* percentile mapped to 0: background */
#define STRETCH_HI 99.5 /* percentile mapped to 1: bright tissue, below saturated specks */
#define MASK_SIGMA 2.0  /* px, smoothing before Otsu */

int autoreg_is_brightfield(const sf_slide_info *s)
{
	return s->samples >= 3 && s->dtype == SF_U8;
}

/* The smallest level whose longest side is still >= dim (level 0 if none). */
static uint32_t pick_level(const sf_slide_info *s, uint32_t dim)
{
	uint32_t best = 0;

	for (uint32_t l = 0; l < s->level_count; l++) {
		uint32_t w = s->levels[l].width, h = s->levels[l].height;
		if ((w > h ? w : h) >= dim)
			best = l;
	}
	return best;
}

/* Read level `level` of channel c reduced by k into raw (tw x th pixels). */
static int read_reduced(const sf_slide_info *s, uint32_t level, uint32_t c, uint32_t k,
                        uint8_t *raw, uint32_t tw, uint32_t th, sf_err *e)
{
	const sf_slide_level *lv = &s->levels[level];
	size_t px = sf_dtype_bytes(s->dtype) * s->samples;
	size_t band_stride = (size_t)lv->width * px;
	uint8_t *band = malloc(band_stride * k * BAND_ROWS);
	sf_slide_reader *r = NULL;
	int rc;

	if (!band)
		return sf_fail(e, SF_ENOMEM, "%s: out of memory for a thumbnail band", s->path);
	rc = sf_slide_reader_open(s, &r, e);
	for (uint32_t y = 0; rc == SF_OK && y < th; y += BAND_ROWS) {
		uint32_t rows = th - y < BAND_ROWS ? th - y : BAND_ROWS;
		uint64_t y0 = (uint64_t)y * k;
		uint32_t src_rows =
		    (uint32_t)(lv->height - y0 < (uint64_t)rows * k ? lv->height - y0
		                                                    : (uint64_t)rows * k);
		rc =
		    sf_slide_read_region(r, level, c, 0, (int64_t)y0, lv->width, src_rows, band, e);
		if (rc == SF_OK)
			sf_box_reduce(band, band_stride, lv->width, src_rows, k, s->dtype,
			              s->samples, raw + (size_t)y * tw * px, (size_t)tw * px, tw,
			              rows);
	}
	sf_slide_reader_close(r);
	free(band);
	return rc;
}

/* Which level of a slide, reduced by which integer factor, makes its thumbnail. */
typedef struct thumb_plan {
	uint32_t level, k;
} thumb_plan;

static uint32_t level_side(const sf_slide_info *s, uint32_t level)
{
	const sf_slide_level *lv = &s->levels[level];
	return lv->width > lv->height ? lv->width : lv->height;
}

/* The thumbnail of longest side at most dim, from the smallest level at least that large. */
static thumb_plan plan_for_dim(const sf_slide_info *s, uint32_t dim)
{
	thumb_plan p = {pick_level(s, dim), 1};
	p.k = (level_side(s, p.level) + dim - 1) / dim;
	p.k = p.k ? p.k : 1;
	return p;
}

/* Micrometres per thumbnail pixel along x (0 when the pixel size is unknown). */
static double plan_pixel_um(const sf_slide_info *s, thumb_plan p)
{
	double ds[2];

	sf_level_downsample(s, p.level, ds);
	return s->pixel_size_x * ds[0] * p.k;
}

/* The plan whose pixels come closest to target_um, its longest side at most
 * MATCH_MAX_SIDE times dim.  Each slide's own plan shrinks by an integer
 * factor of a pyramid level, so two scans of one tissue at pixel sizes 1.2x
 * apart got thumbnails 1.7x apart in scale (1700 against 1020 px), beyond
 * what the similarity search tries (1.6x), and the pair was rejected. */
#define MATCH_MAX_SIDE 1.5
static thumb_plan plan_like(const sf_slide_info *s, uint32_t dim, double target_um)
{
	thumb_plan best = plan_for_dim(s, dim);
	double best_err = fabs(log(plan_pixel_um(s, best) / target_um));

	for (uint32_t l = 0; l < s->level_count; l++)
		for (uint32_t k = 1; k <= 64; k++) {
			thumb_plan p = {l, k};
			double side = ceil((double)level_side(s, l) / k);
			double err = fabs(log(plan_pixel_um(s, p) / target_um));
			if (side > MATCH_MAX_SIDE * dim)
				continue;
			if (side < 16)
				break;
			if (err < best_err - 1e-9) /* ties keep the slide's own plan */
				best = p, best_err = err;
		}
	return best;
}

double autoreg_thumb_um(const sf_slide_info *s, uint32_t dim)
{
	return s->pixel_size_x > 0 ? plan_pixel_um(s, plan_for_dim(s, dim)) : 0;
}

int autoreg_thumb_make(const sf_slide_info *s, double like_um, const char *channel, uint32_t dim,
                       autoreg_thumb *t, sf_err *e)
{
	thumb_plan plan = plan_for_dim(s, dim);
	if (like_um > 0 && s->pixel_size_x > 0)
		plan = plan_like(s, dim, like_um);
	uint32_t level = plan.level, k = plan.k, tw, th;
	const sf_slide_level *lv = &s->levels[level];
	size_t px = sf_dtype_bytes(s->dtype) * s->samples;
	uint8_t *raw;
	int rc;

	memset(t, 0, sizeof *t);
	t->brightfield = autoreg_is_brightfield(s);
	if (!t->brightfield && s->samples != 1)
		return sf_fail(e, SF_EUNSUPPORTED,
		               "%s: %u samples per pixel of this type cannot be registered",
		               s->path, s->samples);
	if (!t->brightfield && (rc = sf_qc_channel(s, channel, &t->channel, e)) != SF_OK)
		return rc;
	tw = (lv->width + k - 1) / k;
	th = (lv->height + k - 1) / k;
	/* The level's exact downsample (an odd-sized halving is 2^L, not
	 * W0 / WL: that drifted up to a thumbnail pixel by the far edge). */
	sf_level_downsample(s, level, t->ds);
	t->ds[0] *= k;
	t->ds[1] *= k;
	if (!(raw = malloc((size_t)tw * th * px)))
		return sf_fail(e, SF_ENOMEM, "%s: out of memory for a %ux%u thumbnail", s->path, tw,
		               th);
	rc = read_reduced(s, level, t->brightfield ? 0 : t->channel, k, raw, tw, th, e);
	if (rc == SF_OK && t->brightfield) {
		rc = sf_reg_od_grey(raw, (size_t)tw * px, tw, th, s->samples, SF_REG_OD_TOTAL,
		                    &t->im, e);
		if (rc == SF_OK)
			rc = sf_reg_od_grey(raw, (size_t)tw * px, tw, th, s->samples,
			                    SF_REG_OD_HEMATOXYLIN, &t->hema, e);
	} else if (rc == SF_OK)
		rc = sf_reg_image_from_channel(raw, (size_t)tw * px, tw, th, s->dtype, 1, 0, &t->im,
		                               e);
	free(raw);
	if (rc == SF_OK)
		rc = sf_reg_normalise(&t->im, STRETCH_LO, STRETCH_HI, e);
	if (rc == SF_OK && t->hema.px)
		rc = sf_reg_normalise(&t->hema, STRETCH_LO, STRETCH_HI, e);
	if (rc == SF_OK && !(t->mask = malloc((size_t)tw * th)))
		rc = sf_fail(e, SF_ENOMEM, "%s: out of memory for a tissue mask", s->path);
	if (rc == SF_OK)
		rc = sf_reg_tissue_mask(&t->im, MASK_SIGMA, t->mask, NULL, e);
	if (rc != SF_OK)
		autoreg_thumb_free(t);
	return rc;
}

void autoreg_thumb_free(autoreg_thumb *t)
{
	sf_reg_image_free(&t->im);
	sf_reg_image_free(&t->hema);
	free(t->mask);
	t->mask = NULL;
}

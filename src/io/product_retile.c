/* product_retile.c — a slide in its own frame, as tiles of a pyramid.
 *
 * Unit (level, tx, ty) holds the tile of every channel (the layout's unit
 * format).  A level copied from a source level of its exact size reads the
 * tile's rect straight into the output (the reader zero-fills outside the
 * level, which is exactly TIFF's edge padding).  Any other level reads the
 * source in bands of output rows, so a worker holds at most BAND_BYTES of
 * source pixels whatever k is, and reduces each k x k box to one pixel with
 * the rule interp= names (resample.h: mean, or pick for nearest), over the
 * box's in-level pixels only (means are sf_box_reduce, the moving slides'
 * prefilter in product_warp.c). */
#include "scopefs/products.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "scopefs/pixel.h"
#include "scopefs/resample.h"
#include "scopefs/warp.h"

#define BAND_BYTES (8u << 20)

typedef struct retile {
	const sf_slide_info *slide; /* owned by the dataset */
	sf_pyramid_plan plan;
	uint32_t tile;
	sf_reduce_rule rule;     /* how a k x k box becomes a pixel */
	const sf_layout *layout; /* owned by the virtual file */
} retile;

typedef struct retile_worker {
	sf_slide_reader *reader;
	uint8_t *band;   /* source pixels of one band, grown on demand */
	size_t band_cap; /* bytes allocated at band */
} retile_worker;

static int retile_worker_start(sf_product *p, void **state, sf_err *e)
{
	retile *r = p->impl;
	retile_worker *w = calloc(1, sizeof *w);
	int rc;

	if (!w)
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", p->name);
	rc = sf_slide_reader_open(r->slide, &w->reader, e);
	if (rc != SF_OK) {
		free(w);
		return rc;
	}
	*state = w;
	return SF_OK;
}

static void retile_worker_stop(sf_product *p, void *state)
{
	retile_worker *w = state;
	(void)p;
	if (!w)
		return;
	sf_slide_reader_close(w->reader);
	free(w->band);
	free(w);
}

static size_t retile_unit_bytes(const sf_product *p, uint64_t unit)
{
	const retile *r = p->impl;
	return sf_layout_unit_bytes(r->layout, unit);
}

/* The w x h output pixels at (x0, y0) of channel c, each its k x k source
 * box reduced by r->rule, into dst. */
static int retile_box(retile *r, retile_worker *w, uint32_t level, uint32_t c, uint32_t x0,
                      uint32_t y0, uint32_t out_w, uint32_t out_h, uint8_t *dst, size_t dst_stride,
                      sf_err *e)
{
	const sf_slide_info *s = r->slide;
	uint32_t k = r->plan.box[level], src_level = r->plan.source_level[level];
	uint32_t sw = s->levels[src_level].width, sh = s->levels[src_level].height;
	size_t px = sf_dtype_bytes(s->dtype) * s->samples;
	size_t src_row_bytes = (size_t)out_w * k * px;
	uint32_t band_rows = (uint32_t)(BAND_BYTES / (src_row_bytes * k));

	size_t need;

	if (band_rows == 0)
		band_rows = 1;
	need = src_row_bytes * k * band_rows;
	if (w->band_cap < need) {
		free(w->band);
		w->band_cap = 0;
		if (!(w->band = malloc(need)))
			return sf_fail(e, SF_ENOMEM, "%s: out of memory for a source band",
			               s->path);
		w->band_cap = need;
	}
	for (uint32_t row = 0; row < out_h; row += band_rows) {
		uint32_t rows = out_h - row < band_rows ? out_h - row : band_rows;
		uint64_t sx = (uint64_t)x0 * k, sy = (uint64_t)(y0 + row) * k;
		uint32_t valid_w =
		    sx >= sw
		        ? 0
		        : (uint32_t)(sw - sx < (uint64_t)out_w * k ? sw - sx : (uint64_t)out_w * k);
		uint32_t valid_h =
		    sy >= sh
		        ? 0
		        : (uint32_t)(sh - sy < (uint64_t)rows * k ? sh - sy : (uint64_t)rows * k);
		int rc = sf_slide_read_region(w->reader, src_level, c, (int64_t)sx, (int64_t)sy,
		                              out_w * k, rows * k, w->band, e);
		if (rc != SF_OK)
			return rc;
		sf_reduce(r->rule, w->band, src_row_bytes, valid_w, valid_h, k, s->dtype,
		          s->samples, dst + (size_t)row * dst_stride, dst_stride, out_w, rows);
	}
	return SF_OK;
}

/* Whether output level `level` is its source level, pixel for pixel. */
static int is_copy(const retile *r, uint32_t level)
{
	const sf_slide_level *src = &r->slide->levels[r->plan.source_level[level]];
	return r->plan.box[level] == 1 && src->width == r->plan.width[level] &&
	       src->height == r->plan.height[level];
}

static int retile_compute(sf_product *p, void *state, uint64_t unit, uint8_t *out, sf_err *e)
{
	retile *r = p->impl;
	retile_worker *w = state;
	const sf_slide_info *s = r->slide;
	uint32_t level, tx, ty;
	size_t page_bytes = sf_layout_page_bytes(r->layout, unit);
	size_t row_bytes = (size_t)r->tile * s->samples * sf_dtype_bytes(s->dtype);

	sf_layout_unit_pos(r->layout, unit, &level, &tx, &ty);
	uint32_t x0 = tx * r->tile, y0 = ty * r->tile;
	uint32_t out_w = r->plan.width[level] - x0, out_h = r->plan.height[level] - y0;
	if (out_w > r->tile)
		out_w = r->tile;
	if (out_h > r->tile)
		out_h = r->tile;

	uint32_t first, count;
	sf_layout_unit_pages(r->layout, unit, &first, &count);
	for (uint32_t c = first; c < first + count; c++) {
		uint8_t *page = out + (size_t)(c - first) * page_bytes;
		int rc;
		if (is_copy(r, level)) {
			rc = sf_slide_read_region(w->reader, r->plan.source_level[level], c, x0, y0,
			                          r->tile, r->tile, page, e);
		} else {
			memset(page, 0, page_bytes);
			rc = retile_box(r, w, level, c, x0, y0, out_w, out_h, page, row_bytes, e);
		}
		if (rc != SF_OK)
			return rc;
	}
	return SF_OK;
}

static void retile_destroy(sf_product *p)
{
	free(p->impl);
	free(p);
}

static const sf_product_ops retile_ops = {
    .worker_start = retile_worker_start,
    .worker_stop = retile_worker_stop,
    .compute = retile_compute,
    .unit_bytes = retile_unit_bytes,
    .destroy = retile_destroy,
};

/* Everything the output depends on: the source file's identity, this
 * product's version, the output geometry and the reduction rule.  v2: the
 * plan reads only exactly-2^k source levels that cover the output level,
 * and nearest picks samples. */
static sf_key retile_key(const sf_slide_info *s, const sf_pyramid_plan *plan, uint32_t tile,
                         sf_reduce_rule rule)
{
	sf_key k = sf_key_of("scopefs retile v2", 17);
	k = sf_key_mix_str(k, s->path);
	k = sf_key_mix_u64(k, s->file_size);
	k = sf_key_mix_u64(k, (uint64_t)s->mtime_ns);
	k = sf_key_mix_u64(k, tile);
	for (uint32_t l = 0; l < plan->levels; l++) {
		k = sf_key_mix_u64(k, ((uint64_t)plan->width[l] << 32) | plan->height[l]);
		k = sf_key_mix_u64(k, ((uint64_t)plan->source_level[l] << 32) | plan->box[l]);
	}
	return sf_key_mix_u64(k, (uint64_t)rule);
}

int sf_product_retile_create(const sf_slide_info *s, const sf_pyramid_plan *plan,
                             const sf_warp_options *wo, const sf_layout *l, sf_product **out,
                             sf_err *e)
{
	sf_product *p = calloc(1, sizeof *p);
	retile *r = calloc(1, sizeof *r);

	if (!p || !r) {
		free(p);
		free(r);
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", s->path);
	}
	r->slide = s;
	r->plan = *plan;
	r->tile = sf_layout_unit_rows(l);
	r->layout = l;
	r->rule = wo->interp == SF_INTERP_NEAREST ? SF_REDUCE_PICK : SF_REDUCE_MEAN;
	p->ops = &retile_ops;
	p->key = sf_layout_key_units(retile_key(s, plan, r->tile, r->rule), l);
	p->elem_bytes = (unsigned)sf_dtype_bytes(s->dtype);
	p->unit_count = sf_layout_unit_count(l);
	p->impl = r;
	snprintf(p->name, sizeof p->name, "retile:%s", s->path);
	*out = p;
	return SF_OK;
}

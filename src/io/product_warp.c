/* product_warp.c — a moving slide warped onto the reference's pixel grid.
 *
 * Unit (level, tx, ty) of the reference pyramid: for each channel of the
 * moving slide, the warp kernel fills the tile through the level map
 * (transform.h's pixel-centre rule), sampling only the source rect the
 * tile's footprint needs, from the source level sf_warp_choose_source picks.
 * When that level is coarser than needed by more than 1.5x (the slide has
 * fewer levels than the reference), the rect is box-averaged first
 * (sf_box_reduce over k-aligned boxes), which is exactly a level of
 * downsample k x level_ds, so the map stays exact.  Pixels of an edge tile
 * outside the output level are 0, as in every other tile we serve.
 *
 * The GPU path (gpu=auto or N, when CUDA is built in and a device answers)
 * runs the same kernel arithmetic on the device; a worker whose device
 * fails falls back to the CPU for good, with one log line. */
#include "scopefs/products.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "scopefs/log.h"
#include "scopefs/resample.h"
#include "scopefs/warp.h"

typedef struct warp_product {
	const sf_slide_info *slide; /* the moving slide, owned by the dataset */
	const sf_transform *transform;
	sf_pyramid_plan plan; /* the reference's output pyramid */
	sf_warp_options opts;
	const sf_layout *layout;
	uint32_t tile;
	double (*level_ds)[2]; /* per source level: level-0 pixels per level pixel */
} warp_product;

typedef struct warp_worker {
	sf_slide_reader *reader;
	uint8_t *src; /* source rect pixels */
	size_t src_cap;
	uint8_t *raw; /* level pixels before box prefiltering */
	size_t raw_cap;
	uint8_t *mixed; /* all channels' source rect, samples interleaved */
	size_t mixed_cap;
	uint8_t *mixed_out; /* the warped tile, samples interleaved */
	size_t mixed_out_cap;
	sf_warp_cuda *gpu; /* NULL: CPU */
} warp_worker;

static int ensure(uint8_t **buf, size_t *cap, size_t need, const char *path, sf_err *e)
{
	if (*cap >= need)
		return SF_OK;
	free(*buf);
	*cap = 0;
	if (!(*buf = malloc(need ? need : 1)))
		return sf_fail(e, SF_ENOMEM, "%s: out of memory for a source rect (%zu bytes)",
		               path, need);
	*cap = need;
	return SF_OK;
}

static int warp_worker_start(sf_product *p, void **state, sf_err *e)
{
	warp_product *w = p->impl;
	warp_worker *ww = calloc(1, sizeof *ww);
	int rc;

	if (!ww)
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", p->name);
	rc = sf_slide_reader_open(w->slide, &ww->reader, e);
	if (rc != SF_OK) {
		free(ww);
		return rc;
	}
	if (w->opts.gpu != -2) {
		sf_err ge = {0};
		if (sf_warp_cuda_create(w->opts.gpu < 0 ? 0 : w->opts.gpu, &ww->gpu, &ge) !=
		    SF_OK) {
			ww->gpu = NULL;
			if (w->opts.gpu >= 0)
				sf_log(SF_LOG_WARN,
				       "%s: GPU %d unavailable, warping on the CPU: %s", p->name,
				       w->opts.gpu, ge.msg);
		}
	}
	*state = ww;
	return SF_OK;
}

static void warp_worker_stop(sf_product *p, void *state)
{
	warp_worker *ww = state;
	(void)p;
	if (!ww)
		return;
	sf_slide_reader_close(ww->reader);
	if (ww->gpu)
		sf_warp_cuda_destroy(ww->gpu);
	free(ww->src);
	free(ww->raw);
	free(ww->mixed);
	free(ww->mixed_out);
	free(ww);
}

static size_t warp_unit_bytes(const sf_product *p, uint64_t unit)
{
	const warp_product *w = p->impl;
	return sf_layout_unit_bytes(w->layout, unit);
}

/* Read the rect `need` of the (possibly prefiltered) source level for
 * channel c into ww->src (need.w x need.h pixels, rows px*need.w apart). */
static int read_source(const warp_product *w, warp_worker *ww, const sf_source_choice *ch,
                       uint32_t c, sf_wrect need, sf_err *e)
{
	const sf_slide_info *s = w->slide;
	size_t px = sf_dtype_bytes(s->dtype) * s->samples;
	size_t out_bytes = (size_t)need.w * (size_t)need.h * px;
	int rc = ensure(&ww->src, &ww->src_cap, out_bytes, s->path, e);
	uint32_t lw = s->levels[ch->level].width, lh = s->levels[ch->level].height;

	if (rc != SF_OK)
		return rc;
	if (ch->prefilter == 1)
		return sf_slide_read_region(ww->reader, ch->level, c, need.x, need.y,
		                            (uint32_t)need.w, (uint32_t)need.h, ww->src, e);
	sf_wrect raw = sf_warp_prefilter_read_rect(ch, need, lw, lh);
	int64_t k = ch->prefilter;
	/* Read the whole k-aligned box span so boxes start at multiples of k. */
	int64_t rx = need.x * k, ry = need.y * k;
	int64_t rw = need.w * k, rh = need.h * k;
	int64_t valid_w = raw.x + raw.w - rx, valid_h = raw.y + raw.h - ry;
	rc = ensure(&ww->raw, &ww->raw_cap, (size_t)rw * (size_t)rh * px, s->path, e);
	if (rc != SF_OK)
		return rc;
	rc = sf_slide_read_region(ww->reader, ch->level, c, rx, ry, (uint32_t)rw, (uint32_t)rh,
	                          ww->raw, e);
	if (rc != SF_OK)
		return rc;
	sf_box_reduce(ww->raw, (size_t)rw * px, (uint32_t)(valid_w < 0 ? 0 : valid_w),
	              (uint32_t)(valid_h < 0 ? 0 : valid_h), (uint32_t)k, s->dtype, s->samples,
	              ww->src, (size_t)need.w * px, (uint32_t)need.w, (uint32_t)need.h);
	return SF_OK;
}

static int warp_channel(const warp_product *w, warp_worker *ww, const sf_map *map,
                        const sf_source_choice *ch, uint32_t c, sf_wrect out, uint8_t *dst,
                        size_t dst_stride, sf_err *e)
{
	const sf_slide_info *s = w->slide;
	sf_warp_fmt fmt = {s->dtype, s->samples, (sf_interp)w->opts.interp, w->opts.background};
	uint32_t lw = s->levels[ch->level].width, lh = s->levels[ch->level].height;
	/* The prefiltered level's size: ceil(level / k). */
	int64_t vw = (lw + ch->prefilter - 1) / ch->prefilter;
	int64_t vh = (lh + ch->prefilter - 1) / ch->prefilter;
	sf_wrect need;
	sf_warp_src src;
	int rc;

	sf_warp_source_rect(map, out, fmt.interp, vw, vh, &need);
	if (need.w > 0 && need.h > 0) {
		rc = read_source(w, ww, ch, c, need, e);
		if (rc != SF_OK)
			return rc;
	}
	src.pixels = ww->src;
	src.stride = (size_t)need.w * sf_dtype_bytes(s->dtype) * s->samples;
	src.rect = need;
	if (ww->gpu) {
		sf_err ge = {0};
		if (sf_warp_tile_cuda(ww->gpu, map, &src, &fmt, out, dst, dst_stride, &ge) == SF_OK)
			return SF_OK;
		sf_log(SF_LOG_WARN, "%s: GPU warp failed, this worker goes on on the CPU: %s",
		       s->path, ge.msg);
		sf_warp_cuda_destroy(ww->gpu);
		ww->gpu = NULL;
	}
	return sf_warp_tile(map, &src, &fmt, out, dst, dst_stride, e);
}

/* Copy n samples of b bytes from plane into every `stride`-th slot of dst,
 * or back (to_planes). */
static void interleave(uint8_t *mixed, uint8_t *plane, size_t n, size_t b, uint32_t channels,
                       uint32_t c, int to_planes)
{
#define SF_INTERLEAVE(T)                                                                           \
	do {                                                                                       \
		T *m = (T *)(void *)mixed + c, *pl = (T *)(void *)plane;                           \
		for (size_t i = 0; i < n; i++, m += channels) {                                    \
			if (to_planes)                                                             \
				pl[i] = *m;                                                        \
			else                                                                       \
				*m = pl[i];                                                        \
		}                                                                                  \
	} while (0)
	if (b == 1)
		SF_INTERLEAVE(uint8_t);
	else if (b == 2)
		SF_INTERLEAVE(uint16_t);
	else
		SF_INTERLEAVE(uint32_t);
#undef SF_INTERLEAVE
}

/* All planar channels in one warp: the map (the expensive part: coordinates,
 * field lookups, weights) is computed once per output pixel instead of once
 * per channel.  Same pixels as channel by channel: the kernel's arithmetic
 * per sample does not depend on how many samples a pixel has. */
static int warp_channels_together(const warp_product *w, warp_worker *ww, const sf_map *map,
                                  const sf_source_choice *ch, sf_wrect out, uint8_t *tile,
                                  size_t page_bytes, sf_err *e)
{
	const sf_slide_info *s = w->slide;
	uint32_t nc = s->channels;
	size_t b = sf_dtype_bytes(s->dtype);
	sf_warp_fmt fmt = {s->dtype, nc, (sf_interp)w->opts.interp, w->opts.background};
	uint32_t lw = s->levels[ch->level].width, lh = s->levels[ch->level].height;
	int64_t vw = (lw + ch->prefilter - 1) / ch->prefilter;
	int64_t vh = (lh + ch->prefilter - 1) / ch->prefilter;
	size_t out_px = (size_t)out.w * (size_t)out.h;
	sf_wrect need;
	sf_warp_src src;
	int rc;

	sf_warp_source_rect(map, out, fmt.interp, vw, vh, &need);
	size_t need_px = (size_t)need.w * (size_t)need.h;
	if ((rc = ensure(&ww->mixed, &ww->mixed_cap, need_px * nc * b, s->path, e)) != SF_OK ||
	    (rc = ensure(&ww->mixed_out, &ww->mixed_out_cap, out_px * nc * b, s->path, e)) != SF_OK)
		return rc;
	for (uint32_t c = 0; c < nc && need_px; c++) {
		if ((rc = read_source(w, ww, ch, c, need, e)) != SF_OK)
			return rc;
		interleave(ww->mixed, ww->src, need_px, b, nc, c, 0);
	}
	src.pixels = ww->mixed;
	src.stride = (size_t)need.w * nc * b;
	src.rect = need;
	rc = SF_EDEVICE;
	if (ww->gpu) {
		sf_err ge = {0};
		rc = sf_warp_tile_cuda(ww->gpu, map, &src, &fmt, out, ww->mixed_out,
		                       (size_t)out.w * nc * b, &ge);
		if (rc != SF_OK) {
			sf_log(SF_LOG_WARN,
			       "%s: GPU warp failed, this worker goes on on the CPU: %s", s->path,
			       ge.msg);
			sf_warp_cuda_destroy(ww->gpu);
			ww->gpu = NULL;
		}
	}
	if (rc != SF_OK && (rc = sf_warp_tile(map, &src, &fmt, out, ww->mixed_out,
	                                      (size_t)out.w * nc * b, e)) != SF_OK)
		return rc;
	/* Back to one page per channel, rows of the full tile width. */
	size_t row = (size_t)w->tile * b;
	for (uint32_t c = 0; c < nc; c++)
		for (int64_t y = 0; y < out.h; y++)
			interleave(ww->mixed_out + (size_t)y * out.w * nc * b,
			           tile + (size_t)c * page_bytes + (size_t)y * row, (size_t)out.w,
			           b, nc, c, 1);
	return SF_OK;
}

static int warp_compute(sf_product *p, void *state, uint64_t unit, uint8_t *out, sf_err *e)
{
	warp_product *w = p->impl;
	warp_worker *ww = state;
	const sf_slide_info *s = w->slide;
	uint32_t level, tx, ty;
	size_t page_bytes = sf_layout_page_bytes(w->layout, unit);
	size_t row_bytes = (size_t)w->tile * s->samples * sf_dtype_bytes(s->dtype);
	double out_ds[2];
	sf_source_choice ch;
	sf_map map;
	sf_wrect rect;

	sf_layout_unit_pos(w->layout, unit, &level, &tx, &ty);
	out_ds[0] = (double)w->plan.width[0] / w->plan.width[level];
	out_ds[1] = (double)w->plan.height[0] / w->plan.height[level];
	sf_warp_choose_source(w->transform, out_ds, s->level_count, (const double(*)[2])w->level_ds,
	                      &ch);
	sf_transform_level_map(w->transform, out_ds, ch.ds, &map);
	rect.x = (int64_t)tx * w->tile;
	rect.y = (int64_t)ty * w->tile;
	rect.w = w->plan.width[level] - rect.x < w->tile ? w->plan.width[level] - rect.x : w->tile;
	rect.h =
	    w->plan.height[level] - rect.y < w->tile ? w->plan.height[level] - rect.y : w->tile;
	memset(out, 0, page_bytes * s->channels);
	if (s->samples == 1 && s->channels > 1 && s->channels <= 64)
		return warp_channels_together(w, ww, &map, &ch, rect, out, page_bytes, e);
	for (uint32_t c = 0; c < s->channels; c++) {
		int rc = warp_channel(w, ww, &map, &ch, c, rect, out + (size_t)c * page_bytes,
		                      row_bytes, e);
		if (rc != SF_OK)
			return rc;
	}
	return SF_OK;
}

static void warp_destroy(sf_product *p)
{
	warp_product *w = p->impl;
	free(w->level_ds);
	free(w);
	free(p);
}

static const sf_product_ops warp_ops = {
    .worker_start = warp_worker_start,
    .worker_stop = warp_worker_stop,
    .compute = warp_compute,
    .unit_bytes = warp_unit_bytes,
    .destroy = warp_destroy,
};

static sf_key mix_doubles(sf_key k, const double *v, size_t n)
{
	return sf_key_mix_u64(k, sf_key_of(v, n * sizeof *v).lo ^ sf_key_of(v, n * sizeof *v).hi);
}

/* Everything the pixels depend on: the moving file, the transform (matrix,
 * every field step and its grid values), the warp options, the grid. */
static sf_key warp_key(const warp_product *w)
{
	const sf_map *m = &w->transform->map;
	sf_key k = sf_key_of("scopefs warp v1", 15);

	k = sf_key_mix_str(k, w->slide->path);
	k = sf_key_mix_u64(k, w->slide->file_size);
	k = sf_key_mix_u64(k, (uint64_t)w->slide->mtime_ns);
	k = mix_doubles(k, m->m, 9);
	for (unsigned i = 0; i < m->nfields; i++) {
		const sf_field_step *f = &m->field[i];
		k = sf_key_mix_u64(k, ((uint64_t)f->kind << 48) ^ ((uint64_t)f->w << 24) ^ f->h);
		k = mix_doubles(k, f->g, 6);
		k = mix_doubles(k, f->vm, 4);
		sf_key values = sf_key_of(f->v, (size_t)f->w * f->h * 2 * sizeof(float));
		k = sf_key_mix_u64(sf_key_mix_u64(k, values.hi), values.lo);
	}
	k = sf_key_mix_u64(k, (uint64_t)w->opts.interp);
	k = mix_doubles(k, &w->opts.background, 1);
	k = sf_key_mix_u64(k, w->tile);
	for (uint32_t l = 0; l < w->plan.levels; l++)
		k = sf_key_mix_u64(k, ((uint64_t)w->plan.width[l] << 32) | w->plan.height[l]);
	return k;
}

int sf_product_warp_create(const sf_slide_info *s, const sf_transform *t,
                           const sf_pyramid_plan *plan, const sf_warp_options *wo,
                           const sf_layout *l, sf_product **out, sf_err *e)
{
	sf_product *p = calloc(1, sizeof *p);
	warp_product *w = calloc(1, sizeof *w);
	double(*level_ds)[2] = calloc(s->level_count, sizeof *level_ds);

	if (!p || !w || !level_ds) {
		free(p);
		free(w);
		free(level_ds);
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", s->path);
	}
	for (uint32_t i = 0; i < s->level_count; i++) {
		level_ds[i][0] = (double)s->width / s->levels[i].width;
		level_ds[i][1] = (double)s->height / s->levels[i].height;
	}
	w->slide = s;
	w->transform = t;
	w->plan = *plan;
	w->opts = *wo;
	w->layout = l;
	w->tile = sf_layout_unit_rows(l);
	w->level_ds = level_ds;
	p->ops = &warp_ops;
	p->impl = w;
	p->key = warp_key(w);
	p->elem_bytes = (unsigned)sf_dtype_bytes(s->dtype);
	p->unit_count = sf_layout_unit_count(l);
	snprintf(p->name, sizeof p->name, "warp:%s", s->path);
	*out = p;
	return SF_OK;
}

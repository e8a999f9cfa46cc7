/* product_warp.c — a moving slide warped onto the reference's pixel grid.
 *
 * Unit (level, tx, ty) of the reference pyramid: for each channel of the
 * moving slide, the warp kernel fills the tile through the level map
 * (transform.h's pixel-centre rule), sampling only the source rect the
 * tile's footprint needs, from the source level sf_warp_choose_source picks.
 * When that level is coarser than needed by more than 1.5x (the slide has
 * fewer levels than the reference), the rect is box-averaged first
 * (sf_box_reduce over k-aligned boxes, as the reference's retile reduces),
 * which is exactly a level of downsample k x level_ds, so the map stays
 * exact.  interp=nearest never prefilters: it samples the chosen level
 * directly, so each output pixel is the one source sample nearest its
 * centre (the rule of level 0) and a label mask's reduced levels hold only
 * its labels.  Pixels of an edge tile outside the output level are 0, as in
 * every other tile we serve.
 *
 * The GPU path (gpu=auto or N, when CUDA is built in and a device answers)
 * runs the same kernel arithmetic on the device; a worker whose device
 * fails falls back to the CPU for good, with one log line. */
#include "scopefs/products.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "scopefs/log.h"
#include "scopefs/resample.h"
#include "scopefs/warp.h"

/* Which output units read each source tile (of one source level): the
 * units' indices, ascending, tile by tile (CSR).  Lets the slide's share of
 * decoded tiles evict the tile whose next reader comes last (reuse_next):
 * in the order a `cp` computes units, a tile is read by the output tiles
 * of two neighbouring rows, so the share must keep about a row of source
 * tiles, and least-recently-used keeps the wrong ones. */
typedef struct tile_users {
	uint32_t tiles;  /* in the source level's tile grid */
	uint32_t *first; /* tiles + 1 entries: users of tile t are */
	uint64_t *unit;  /* unit[first[t] .. first[t + 1]) */
} tile_users;

#define INFLIGHT_SLOTS 64

typedef struct warp_product {
	const sf_slide_info *slide; /* the moving slide, owned by the dataset */
	const sf_transform *transform;
	sf_pyramid_plan plan; /* the reference's output pyramid */
	sf_warp_options opts;
	const sf_layout *layout;
	uint32_t tile;
	double (*level_ds)[2];      /* per source level: level-0 pixels per level pixel */
	pthread_mutex_t users_lock; /* guards the one-time build of users */
	int users_built;            /* set (atomic, release) under users_lock once built */
	tile_users *users;          /* slide->level_count entries once built; NULL: no hint */
	/* The unit each worker computes now (UINT64_MAX: none), atomic: the
	 * earliest is "now" for the reuse hint.  Workers beyond INFLIGHT_SLOTS
	 * share slots, which only blurs the hint. */
	uint64_t inflight[INFLIGHT_SLOTS];
	unsigned workers; /* atomic: slots handed out */
	int told_no_gpu;  /* atomic: the "GPU unavailable" line was logged (once, not per worker) */
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
	unsigned slot;     /* in warp_product.inflight */
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
	ww->slot = __atomic_fetch_add(&w->workers, 1, __ATOMIC_RELAXED) % INFLIGHT_SLOTS;
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
			if (w->opts.gpu >= 0 &&
			    !__atomic_exchange_n(&w->told_no_gpu, 1, __ATOMIC_RELAXED))
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
 * channel c into dst (need.w x need.h pixels, rows px*need.w apart). */
static int read_source(const warp_product *w, warp_worker *ww, const sf_source_choice *ch,
                       uint32_t c, sf_wrect need, uint8_t *dst, sf_err *e)
{
	const sf_slide_info *s = w->slide;
	size_t px = sf_dtype_bytes(s->dtype) * s->samples;
	uint32_t lw = s->levels[ch->level].width, lh = s->levels[ch->level].height;
	int rc;

	if (ch->prefilter == 1)
		return sf_slide_read_region(ww->reader, ch->level, c, need.x, need.y,
		                            (uint32_t)need.w, (uint32_t)need.h, dst, e);
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
	              (uint32_t)(valid_h < 0 ? 0 : valid_h), (uint32_t)k, s->dtype, s->samples, dst,
	              (size_t)need.w * px, (uint32_t)need.w, (uint32_t)need.h);
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
		size_t bytes =
		    (size_t)need.w * (size_t)need.h * sf_dtype_bytes(s->dtype) * s->samples;
		if ((rc = ensure(&ww->src, &ww->src_cap, bytes, s->path, e)) != SF_OK ||
		    (rc = read_source(w, ww, ch, c, need, ww->src, e)) != SF_OK)
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

#if defined(__SSE2__)
#include <emmintrin.h>

/* The 4-plane uint16 case (4-channel fluorescence), 4 pixels at a time: a
 * 4 x 4 transpose of 16-bit samples in unpacks.  Returns the pixels done. */
static size_t interleave_u16x4(uint16_t *m, uint16_t *const *pl, size_t n, int to_planes)
{
	size_t i = 0;
	for (; i + 4 <= n; i += 4, m += 16) {
		if (to_planes) {
			__m128i a = _mm_loadu_si128((const __m128i *)(const void *)m);
			__m128i b = _mm_loadu_si128((const __m128i *)(const void *)(m + 8));
			__m128i t0 = _mm_unpacklo_epi16(a, b), t1 = _mm_unpackhi_epi16(a, b);
			__m128i c01 = _mm_unpacklo_epi16(t0, t1), c23 = _mm_unpackhi_epi16(t0, t1);
			_mm_storel_epi64((__m128i *)(void *)(pl[0] + i), c01);
			_mm_storel_epi64((__m128i *)(void *)(pl[1] + i),
			                 _mm_unpackhi_epi64(c01, c01));
			_mm_storel_epi64((__m128i *)(void *)(pl[2] + i), c23);
			_mm_storel_epi64((__m128i *)(void *)(pl[3] + i),
			                 _mm_unpackhi_epi64(c23, c23));
		} else {
			__m128i c0 = _mm_loadl_epi64((const __m128i *)(const void *)(pl[0] + i));
			__m128i c1 = _mm_loadl_epi64((const __m128i *)(const void *)(pl[1] + i));
			__m128i c2 = _mm_loadl_epi64((const __m128i *)(const void *)(pl[2] + i));
			__m128i c3 = _mm_loadl_epi64((const __m128i *)(const void *)(pl[3] + i));
			__m128i x0 = _mm_unpacklo_epi16(c0, c1), x1 = _mm_unpacklo_epi16(c2, c3);
			_mm_storeu_si128((__m128i *)(void *)m, _mm_unpacklo_epi32(x0, x1));
			_mm_storeu_si128((__m128i *)(void *)(m + 8), _mm_unpackhi_epi32(x0, x1));
		}
	}
	return i;
}
#else
static size_t interleave_u16x4(uint16_t *m, uint16_t *const *pl, size_t n, int to_planes)
{
	(void)m;
	(void)pl;
	(void)n;
	(void)to_planes;
	return 0;
}
#endif

/* Interleave n samples of b bytes from nc planes into mixed (pixel i is
 * plane[0][i], plane[1][i], ...), or back (to_planes).  Plane by plane,
 * each pass reading (or writing) one plane in order. */
static void interleave(uint8_t *mixed, uint8_t *const *plane, size_t n, size_t b, uint32_t nc,
                       int to_planes)
{
	size_t done = 0;
	if (b == 2 && nc == 4) {
		uint16_t *pl[4];
		for (int c = 0; c < 4; c++)
			pl[c] = (uint16_t *)(void *)plane[c];
		done = interleave_u16x4((uint16_t *)(void *)mixed, pl, n, to_planes);
	}
#define SF_INTERLEAVE(T)                                                                           \
	for (uint32_t c = 0; c < nc; c++) {                                                        \
		T *m = (T *)(void *)mixed + done * nc + c, *pl = (T *)(void *)plane[c];            \
		for (size_t i = done; i < n; i++, m += nc) {                                       \
			if (to_planes)                                                             \
				pl[i] = *m;                                                        \
			else                                                                       \
				*m = pl[i];                                                        \
		}                                                                                  \
	}
	if (b == 1)
		SF_INTERLEAVE(uint8_t)
	else if (b == 2)
		SF_INTERLEAVE(uint16_t)
	else
		SF_INTERLEAVE(uint32_t)
#undef SF_INTERLEAVE
}

/* All planar channels in one warp: the map (the expensive part: coordinates,
 * field lookups, weights) is computed once per output pixel instead of once
 * per channel.  Same pixels as channel by channel: the kernel's arithmetic
 * per sample does not depend on how many samples a pixel has. */
static int warp_channels_together(const warp_product *w, warp_worker *ww, const sf_map *map,
                                  const sf_source_choice *ch, sf_wrect out, uint32_t first,
                                  uint32_t nc, uint8_t *tile, size_t page_bytes, sf_err *e)
{
	const sf_slide_info *s = w->slide;
	size_t b = sf_dtype_bytes(s->dtype);
	sf_warp_fmt fmt = {s->dtype, nc, (sf_interp)w->opts.interp, w->opts.background};
	uint32_t lw = s->levels[ch->level].width, lh = s->levels[ch->level].height;
	int64_t vw = (lw + ch->prefilter - 1) / ch->prefilter;
	int64_t vh = (lh + ch->prefilter - 1) / ch->prefilter;
	size_t out_px = (size_t)out.w * (size_t)out.h;
	sf_wrect need;
	sf_warp_src src;
	int rc;

	uint8_t *planes[64];
	sf_warp_source_rect(map, out, fmt.interp, vw, vh, &need);
	size_t need_px = (size_t)need.w * (size_t)need.h;
	if ((rc = ensure(&ww->mixed, &ww->mixed_cap, need_px * nc * b, s->path, e)) != SF_OK ||
	    (rc = ensure(&ww->src, &ww->src_cap, need_px * nc * b, s->path, e)) != SF_OK ||
	    (rc = ensure(&ww->mixed_out, &ww->mixed_out_cap, out_px * nc * b, s->path, e)) != SF_OK)
		return rc;
	for (uint32_t c = 0; c < nc; c++) {
		planes[c] = ww->src + (size_t)c * need_px * b;
		if (need_px &&
		    (rc = read_source(w, ww, ch, first + c, need, planes[c], e)) != SF_OK)
			return rc;
	}
	interleave(ww->mixed, planes, need_px, b, nc, 0);
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
	for (int64_t y = 0; y < out.h; y++) {
		for (uint32_t c = 0; c < nc; c++)
			planes[c] = tile + (size_t)c * page_bytes + (size_t)y * row;
		interleave(ww->mixed_out + (size_t)y * out.w * nc * b, planes, (size_t)out.w, b, nc,
		           1);
	}
	return SF_OK;
}

/* The output level's map, source choice and the out rect of tile (tx, ty). */
static void unit_setup(const warp_product *w, uint32_t level, uint32_t tx, uint32_t ty,
                       sf_source_choice *ch, sf_map *map, sf_wrect *rect)
{
	const sf_slide_info *s = w->slide;
	/* Exactly 2^level, as the reference's retile makes that level (an
	 * odd-sized level's W0 / WL would drift up to a pixel by its edge). */
	double out_ds[2] = {(double)(1u << level), (double)(1u << level)};
	sf_warp_choose_source(w->transform, out_ds, s->level_count, (const double(*)[2])w->level_ds,
	                      ch);
	if (w->opts.interp == SF_INTERP_NEAREST && ch->prefilter > 1) {
		/* A box mean would invent labels; nearest on the finer level
		 * picks the real sample nearest each output pixel's centre. */
		ch->prefilter = 1;
		ch->ds[0] = w->level_ds[ch->level][0];
		ch->ds[1] = w->level_ds[ch->level][1];
	}
	sf_transform_level_map(w->transform, out_ds, ch->ds, map);
	rect->x = (int64_t)tx * w->tile;
	rect->y = (int64_t)ty * w->tile;
	rect->w =
	    w->plan.width[level] - rect->x < w->tile ? w->plan.width[level] - rect->x : w->tile;
	rect->h =
	    w->plan.height[level] - rect->y < w->tile ? w->plan.height[level] - rect->y : w->tile;
}

/* The source-level rect a unit with this choice, map and out rect reads
 * (w = 0: none). */
static sf_wrect unit_read_rect(const warp_product *w, const sf_source_choice *ch, const sf_map *map,
                               sf_wrect rect)
{
	const sf_slide_info *s = w->slide;
	uint32_t lw = s->levels[ch->level].width, lh = s->levels[ch->level].height;
	int64_t vw = (lw + ch->prefilter - 1) / ch->prefilter;
	int64_t vh = (lh + ch->prefilter - 1) / ch->prefilter;
	sf_wrect need;
	sf_warp_source_rect(map, rect, (sf_interp)w->opts.interp, vw, vh, &need);
	if (need.w > 0 && ch->prefilter > 1)
		need = sf_warp_prefilter_read_rect(ch, need, lw, lh);
	return need;
}

/* Call fn(ctx, source level, tile, u) for every source tile unit u reads. */
static void for_unit_tiles(const warp_product *w, uint64_t u,
                           void (*fn)(void *ctx, uint32_t sl, uint32_t t, uint64_t u), void *ctx)
{
	const sf_slide_info *s = w->slide;
	uint32_t level, tx, ty;
	sf_source_choice ch;
	sf_map map;
	sf_wrect rect;
	sf_layout_unit_pos(w->layout, u, &level, &tx, &ty);
	unit_setup(w, level, tx, ty, &ch, &map, &rect);
	sf_wrect r = unit_read_rect(w, &ch, &map, rect);
	const sf_slide_level *sl = &s->levels[ch.level];
	if (r.w <= 0 || r.h <= 0 || !sl->tile_w || !sl->tile_h)
		return;
	uint32_t across = (sl->width + sl->tile_w - 1) / sl->tile_w;
	for (int64_t y = r.y / sl->tile_h; y * sl->tile_h < r.y + r.h; y++)
		for (int64_t x = r.x / sl->tile_w; x * sl->tile_w < r.x + r.w; x++)
			fn(ctx, ch.level, (uint32_t)(y * across + x), u);
}

static void count_user(void *ctx, uint32_t sl, uint32_t t, uint64_t u)
{
	tile_users *tu = (tile_users *)ctx + sl;
	(void)u;
	if (t < tu->tiles)
		tu->first[t + 1]++;
}

static void add_user(void *ctx, uint32_t sl, uint32_t t, uint64_t u)
{
	tile_users *tu = (tile_users *)ctx + sl;
	if (t < tu->tiles)
		tu->unit[tu->first[t]++] = u; /* first[] runs ahead; shifted back after */
}

static void users_free(tile_users *tu, uint32_t n)
{
	for (uint32_t i = 0; tu && i < n; i++) {
		free(tu[i].first);
		free(tu[i].unit);
	}
	free(tu);
}

/* Build w->users: two passes over the units (count, then fill).  NULL on
 * out of memory (the share then falls back to LRU). */
static tile_users *users_build(const warp_product *w)
{
	const sf_slide_info *s = w->slide;
	uint64_t units = sf_layout_unit_count(w->layout);
	tile_users *tu = calloc(s->level_count, sizeof *tu);
	if (!tu)
		return NULL;
	for (uint32_t l = 0; l < s->level_count; l++) {
		const sf_slide_level *sl = &s->levels[l];
		if (!sl->tile_w || !sl->tile_h)
			continue;
		tu[l].tiles = ((sl->width + sl->tile_w - 1) / sl->tile_w) *
		              ((sl->height + sl->tile_h - 1) / sl->tile_h);
		if (!(tu[l].first = calloc((size_t)tu[l].tiles + 1, sizeof *tu[l].first)))
			goto fail;
	}
	for (uint64_t u = 0; u < units; u++)
		for_unit_tiles(w, u, count_user, tu);
	for (uint32_t l = 0; l < s->level_count; l++) {
		for (uint32_t t = 0; t < tu[l].tiles; t++)
			tu[l].first[t + 1] += tu[l].first[t];
		if (tu[l].tiles && !(tu[l].unit = malloc(((size_t)tu[l].first[tu[l].tiles] + 1) *
		                                         sizeof(uint64_t))))
			goto fail;
	}
	for (uint64_t u = 0; u < units; u++)
		for_unit_tiles(w, u, add_user, tu);
	for (uint32_t l = 0; l < s->level_count; l++) {
		for (uint32_t t = tu[l].tiles; t > 0; t--)
			tu[l].first[t] = tu[l].first[t - 1];
		if (tu[l].first)
			tu[l].first[0] = 0;
	}
	return tu;
fail:
	users_free(tu, s->level_count);
	return NULL;
}

/* sf_slide_reuse_fn: units from now (the earliest unit being computed)
 * until tile t's next user; UINT64_MAX when no unit to come reads it. */
static uint64_t reuse_next(void *ctx, uint32_t level, uint32_t t)
{
	const warp_product *w = ctx;
	uint64_t from = UINT64_MAX;
	for (unsigned i = 0; i < INFLIGHT_SLOTS; i++) {
		uint64_t u = __atomic_load_n(&w->inflight[i], __ATOMIC_RELAXED);
		from = u < from ? u : from;
	}
	if (from == UINT64_MAX)
		from = 0; /* nothing running: every user is to come */
	if (level >= w->slide->level_count || t >= w->users[level].tiles)
		return UINT64_MAX;
	const tile_users *tu = &w->users[level];
	uint32_t lo = tu->first[t], hi = tu->first[t + 1];
	while (lo < hi) { /* first user >= from */
		uint32_t mid = lo + (hi - lo) / 2;
		if (tu->unit[mid] < from)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < tu->first[t + 1] ? tu->unit[lo] - from : UINT64_MAX;
}

/* Once, at the first unit (the transform is final by then): the users
 * tables and the slide's reuse hint. */
static void users_once(warp_product *w)
{
	if (__atomic_load_n(&w->users_built, __ATOMIC_ACQUIRE))
		return;
	pthread_mutex_lock(&w->users_lock);
	if (!w->users_built) {
		w->users = users_build(w);
		if (w->users)
			sf_slide_set_reuse_hint(w->slide, w, reuse_next, w);
		__atomic_store_n(&w->users_built, 1, __ATOMIC_RELEASE);
	}
	pthread_mutex_unlock(&w->users_lock);
}

static int warp_compute_unit(warp_product *w, warp_worker *ww, uint64_t unit, uint8_t *out,
                             sf_err *e);

static int warp_compute(sf_product *p, void *state, uint64_t unit, uint8_t *out, sf_err *e)
{
	warp_product *w = p->impl;
	warp_worker *ww = state;
	users_once(w);
	__atomic_store_n(&w->inflight[ww->slot], unit, __ATOMIC_RELAXED);
	int rc = warp_compute_unit(w, ww, unit, out, e);
	__atomic_store_n(&w->inflight[ww->slot], UINT64_MAX, __ATOMIC_RELAXED);
	return rc;
}

static int warp_compute_unit(warp_product *w, warp_worker *ww, uint64_t unit, uint8_t *out,
                             sf_err *e)
{
	const sf_slide_info *s = w->slide;
	uint32_t level, tx, ty;
	size_t page_bytes = sf_layout_page_bytes(w->layout, unit);
	size_t row_bytes = (size_t)w->tile * s->samples * sf_dtype_bytes(s->dtype);
	sf_source_choice ch;
	sf_map map;
	sf_wrect rect;

	uint32_t first, count;
	sf_layout_unit_pos(w->layout, unit, &level, &tx, &ty);
	sf_layout_unit_pages(w->layout, unit, &first, &count);
	unit_setup(w, level, tx, ty, &ch, &map, &rect);
	/* Edge tiles: the part of the page outside the level is 0.  A full tile
	 * is written whole by the warp. */
	if (rect.w != w->tile || rect.h != w->tile || (size_t)rect.h * row_bytes != page_bytes)
		memset(out, 0, page_bytes * count);
	if (s->samples == 1 && count > 1 && count <= 64)
		return warp_channels_together(w, ww, &map, &ch, rect, first, count, out, page_bytes,
		                              e);
	for (uint32_t c = first; c < first + count; c++) {
		int rc = warp_channel(w, ww, &map, &ch, c, rect,
		                      out + (size_t)(c - first) * page_bytes, row_bytes, e);
		if (rc != SF_OK)
			return rc;
	}
	return SF_OK;
}

static void warp_destroy(sf_product *p)
{
	warp_product *w = p->impl;
	sf_slide_set_reuse_hint(w->slide, w, NULL, NULL);
	users_free(w->users, w->slide->level_count);
	pthread_mutex_destroy(&w->users_lock);
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
 * every field step and its grid values), the warp options, the grid.  v2:
 * interp=nearest samples finer levels directly instead of box means.  v3:
 * levels' downsamples follow sf_level_downsample (exact r, not W0 / WL). */
static sf_key warp_key(const warp_product *w)
{
	const sf_map *m = &w->transform->map;
	sf_key k = sf_key_of("scopefs warp v3", 15);

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
	for (uint32_t i = 0; i < s->level_count; i++)
		sf_level_downsample(s, i, level_ds[i]);
	w->slide = s;
	w->transform = t;
	w->plan = *plan;
	w->opts = *wo;
	w->layout = l;
	w->tile = sf_layout_unit_rows(l);
	w->level_ds = level_ds;
	for (unsigned i = 0; i < INFLIGHT_SLOTS; i++)
		w->inflight[i] = UINT64_MAX;
	if (pthread_mutex_init(&w->users_lock, NULL) != 0) {
		free(p);
		free(w);
		free(level_ds);
		return sf_fail(e, SF_ENOMEM, "%s: cannot make a mutex", s->path);
	}
	p->ops = &warp_ops;
	p->impl = w;
	p->key = sf_layout_key_units(warp_key(w), l);
	p->elem_bytes = (unsigned)sf_dtype_bytes(s->dtype);
	p->unit_count = sf_layout_unit_count(l);
	snprintf(p->name, sizeof p->name, "warp:%s", s->path);
	*out = p;
	return SF_OK;
}

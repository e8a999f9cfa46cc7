/* qc_png.c — registration QC overlays as PNG bytes in memory (qc.h).
 *
 * Render: read one page of every tile of the chosen level of each registered/
 * file through the engine (all tiles are prefetched first so the workers
 * compute them in parallel), turn it into one float grey plane per side,
 * stretch each plane to 8 bits on its own percentiles, then let libpng
 * encode R = ref, G = mov, B = ref row by row into a growing buffer.
 *
 * Memory: one float plane (4 bytes per pixel, at most SF_QC_MAX_SIDE^2) at a
 * time plus two 8-bit planes and one tile page; all freed before returning,
 * only the PNG bytes are kept.
 *
 * libpng reports errors by longjmp: the function that calls setjmp changes
 * no local variable after it (the rows are written by another function), so
 * nothing it frees can be clobbered. */
#include "scopefs/qc.h"

#include <ctype.h>
#include <math.h>
#include <png.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define HIST_BINS    65536
#define LOW_PCT      0.01
#define HIGH_PCT     0.99
#define PNG_ZLEVEL   6
#define PNG_MSG_SIZE 200

struct sf_qc {
	pthread_mutex_t lock; /* held while rendering; guards png, len, ready */
	sf_qc_side ref, mov;
	char name[256];
	uint8_t *png; /* the PNG once ready (immutable afterwards) */
	size_t len;
	int ready;
};

/* The default: a nuclear stain, which every round of a cyclic assay has. */
static uint32_t nuclear_channel(const sf_slide_info *s)
{
	for (uint32_t c = 0; c < s->channels; c++)
		if (s->channel_names && s->channel_names[c] &&
		    (strcasestr(s->channel_names[c], "dapi") ||
		     strcasestr(s->channel_names[c], "hoechst")))
			return c;
	return 0;
}

/* The containing-name match last, so "DAPI" finds "DAPI R2" of a cyclic
 * round as the default does, while a whole name or an index is exact. */
int sf_qc_channel(const sf_slide_info *s, const char *want, uint32_t *out, sf_err *e)
{
	char *end;
	unsigned long idx;

	if (!want || !*want) {
		*out = nuclear_channel(s);
		return SF_OK;
	}
	for (uint32_t c = 0; c < s->channels; c++)
		if (s->channel_names && s->channel_names[c] &&
		    !strcasecmp(s->channel_names[c], want)) {
			*out = c;
			return SF_OK;
		}
	idx = strtoul(want, &end, 10);
	if (isdigit((unsigned char)want[0]) && !*end && idx < s->channels) {
		*out = (uint32_t)idx;
		return SF_OK;
	}
	for (uint32_t c = 0; c < s->channels; c++)
		if (s->channel_names && s->channel_names[c] &&
		    strcasestr(s->channel_names[c], want)) {
			*out = c;
			return SF_OK;
		}
	return sf_fail(e, SF_EINVAL, "%s: option 'reg_channel': no channel '%s' (it has %u)",
	               s->path, want, s->channels);
}

uint32_t sf_qc_level(const sf_layout *l)
{
	uint32_t levels = sf_layout_levels(l);

	for (uint32_t lv = 0; lv < levels; lv++) {
		uint32_t w = sf_layout_level_width(l, lv), h = sf_layout_level_height(l, lv);
		if ((w > h ? w : h) <= SF_QC_MAX_SIDE)
			return lv;
	}
	return levels ? levels - 1 : 0;
}

/* Grey value of pixel i of a tile page (samples 1: the sample; 3: inverted luminance). */
static float grey_at(const uint8_t *page, size_t i, sf_dtype dt, uint32_t samples)
{
	float v[3] = {0, 0, 0};

	for (uint32_t s = 0; s < samples && s < 3; s++) {
		size_t k = i * samples + s;
		if (dt == SF_U8)
			v[s] = page[k];
		else if (dt == SF_U16) {
			uint16_t u;
			memcpy(&u, page + 2 * k, 2);
			v[s] = u;
		} else
			memcpy(&v[s], page + 4 * k, 4);
	}
	if (samples == 3)
		return -(0.299f * v[0] + 0.587f * v[1] + 0.114f * v[2]);
	return v[0];
}

/* Read the registration page of every tile of `level` of side into plane
 * (w x h floats). */
static int read_plane(sf_engine *g, const sf_qc_side *side, uint32_t level, float *plane, sf_err *e)
{
	const sf_vfile *v = side->vfile;
	const sf_layout_spec *spec = sf_layout_get_spec(v->layout);
	uint32_t tile = sf_layout_unit_rows(v->layout);
	uint32_t w = sf_layout_level_width(v->layout, level);
	uint32_t h = sf_layout_level_height(v->layout, level);
	uint32_t across = sf_layout_tiles_across(v->layout, level);
	uint32_t down = sf_layout_tiles_down(v->layout, level);
	uint64_t within,
	    first = sf_layout_page_unit(v->layout, level, 0, 0, side->channel, &within);
	size_t page = sf_layout_page_bytes(v->layout, first);
	uint8_t *buf = malloc(page);
	int rc = SF_OK;

	if (!buf)
		return sf_fail(e, SF_ENOMEM, "%s: out of memory for a QC tile", v->product->name);
	for (uint32_t ty = 0; ty < down; ty++)
		for (uint32_t tx = 0; tx < across; tx++)
			sf_engine_prefetch(g, v->product,
			                   v->unit_base + sf_layout_page_unit(v->layout, level, tx,
			                                                      ty, side->channel,
			                                                      NULL));
	for (uint32_t ty = 0; ty < down && rc == SF_OK; ty++) {
		for (uint32_t tx = 0; tx < across && rc == SF_OK; tx++) {
			uint64_t u =
			    sf_layout_page_unit(v->layout, level, tx, ty, side->channel, &within);
			uint32_t x0 = tx * tile, y0 = ty * tile;
			uint32_t tw = w - x0 < tile ? w - x0 : tile,
			         th = h - y0 < tile ? h - y0 : tile;
			rc = sf_engine_read(g, v->product, v->unit_base + u, (size_t)within, page,
			                    buf, e);
			for (uint32_t y = 0; rc == SF_OK && y < th; y++)
				for (uint32_t x = 0; x < tw; x++)
					plane[(size_t)(y0 + y) * w + x0 + x] = grey_at(
					    buf, (size_t)y * tile + x, spec->dtype, spec->samples);
		}
	}
	free(buf);
	return rc;
}

/* The value at fraction pct of the finite values (bin edge: lower for the
 * low end, upper for the high end). */
static float hist_value(const uint32_t *hist, size_t count, double pct, float lo, double scale,
                        int upper)
{
	double want = pct * (double)count;
	uint64_t cum = 0;
	uint32_t b = 0;

	for (; b < HIST_BINS - 1; b++) {
		cum += hist[b];
		if ((double)cum >= want && cum > 0)
			break;
	}
	return (float)(lo + (b + (upper ? 1 : 0)) / scale);
}

/* Stretch plane (n floats) from its LOW_PCT to its HIGH_PCT percentile to
 * 0..255 in out; non-finite values become 0. */
static int stretch(const float *plane, size_t n, uint8_t *out, sf_err *e)
{
	float lo = INFINITY, hi = -INFINITY, p_lo, p_hi;
	size_t count = 0;
	uint32_t *hist;
	double scale;

	for (size_t i = 0; i < n; i++)
		if (isfinite(plane[i])) {
			lo = plane[i] < lo ? plane[i] : lo;
			hi = plane[i] > hi ? plane[i] : hi;
			count++;
		}
	if (!count || hi <= lo) { /* empty or flat: nothing to show */
		memset(out, 0, n);
		return SF_OK;
	}
	if (!(hist = calloc(HIST_BINS, sizeof *hist)))
		return sf_fail(e, SF_ENOMEM, "out of memory for a QC histogram");
	scale = (HIST_BINS - 1) / ((double)hi - lo);
	for (size_t i = 0; i < n; i++)
		if (isfinite(plane[i]))
			hist[(size_t)((plane[i] - lo) * scale)]++;
	p_lo = hist_value(hist, count, LOW_PCT, lo, scale, 0);
	p_hi = hist_value(hist, count, HIGH_PCT, lo, scale, 1);
	free(hist);
	for (size_t i = 0; i < n; i++) {
		float v = isfinite(plane[i]) ? (plane[i] - p_lo) * 255.0f / (p_hi - p_lo) : 0.0f;
		out[i] = v <= 0.0f ? 0 : v >= 255.0f ? 255 : (uint8_t)(v + 0.5f);
	}
	return SF_OK;
}

/* One side at level as a stretched 8-bit plane (malloc'd, w x h). */
static int side_plane(sf_engine *g, const sf_qc_side *side, uint32_t level, uint8_t **out,
                      sf_err *e)
{
	uint32_t w = sf_layout_level_width(side->vfile->layout, level);
	uint32_t h = sf_layout_level_height(side->vfile->layout, level);
	size_t n = (size_t)w * h;
	float *plane = malloc(n * sizeof *plane);
	int rc;

	*out = malloc(n ? n : 1);
	if (!plane || !*out) {
		free(plane);
		free(*out);
		*out = NULL;
		return sf_fail(e, SF_ENOMEM, "out of memory for a %ux%u QC plane", w, h);
	}
	rc = read_plane(g, side, level, plane, e);
	if (rc == SF_OK)
		rc = stretch(plane, n, *out, e);
	free(plane);
	if (rc != SF_OK) {
		free(*out);
		*out = NULL;
	}
	return rc;
}

/* --- PNG encoding ------------------------------------------------------- */

typedef struct png_sink {
	uint8_t *buf;
	size_t len, cap;
	char msg[PNG_MSG_SIZE]; /* libpng's error message */
} png_sink;

static void sink_write(png_structp png, png_bytep data, png_size_t n)
{
	png_sink *s = png_get_io_ptr(png);

	if (s->len + n > s->cap) {
		size_t want = s->cap ? s->cap : 1 << 16;
		while (want < s->len + n)
			want *= 2;
		uint8_t *bigger = realloc(s->buf, want);
		if (!bigger)
			png_error(png, "out of memory for the PNG");
		s->buf = bigger;
		s->cap = want;
	}
	memcpy(s->buf + s->len, data, n);
	s->len += n;
}

static void sink_flush(png_structp png)
{
	(void)png;
}

static void on_png_error(png_structp png, png_const_charp msg)
{
	png_sink *s = png_get_error_ptr(png);
	snprintf(s->msg, sizeof s->msg, "%s", msg);
	png_longjmp(png, 1);
}

static void on_png_warning(png_structp png, png_const_charp msg)
{
	(void)png, (void)msg;
}

/* Header, rows (R = ref, G = mov, B = ref) and end, after setjmp. */
static void write_png_rows(png_structp png, png_infop info, const uint8_t *ref, const uint8_t *mov,
                           uint32_t w, uint32_t h, uint8_t *row)
{
	png_set_IHDR(png, info, w, h, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
	             PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
	png_set_compression_level(png, PNG_ZLEVEL);
	png_write_info(png, info);
	for (uint32_t y = 0; y < h; y++) {
		const uint8_t *r = ref + (size_t)y * w, *gr = mov + (size_t)y * w;
		for (uint32_t x = 0; x < w; x++) {
			row[3 * x] = r[x];
			row[3 * x + 1] = gr[x];
			row[3 * x + 2] = r[x];
		}
		png_write_row(png, row);
	}
	png_write_end(png, NULL);
}

static int encode_png(const uint8_t *ref, const uint8_t *mov, uint32_t w, uint32_t h,
                      png_sink *sink, sf_err *e)
{
	png_structp png =
	    png_create_write_struct(PNG_LIBPNG_VER_STRING, sink, on_png_error, on_png_warning);
	png_infop info = png ? png_create_info_struct(png) : NULL;
	uint8_t *row = malloc((size_t)w * 3);

	if (!png || !info || !row) {
		png_destroy_write_struct(png ? &png : NULL, info ? &info : NULL);
		free(row);
		return sf_fail(e, SF_ENOMEM, "out of memory for the PNG encoder");
	}
	if (setjmp(png_jmpbuf(png))) {
		png_destroy_write_struct(&png, &info);
		free(row);
		return sf_fail(e, SF_EFORMAT, "libpng: %s", sink->msg);
	}
	png_set_write_fn(png, sink, sink_write, sink_flush);
	write_png_rows(png, info, ref, mov, w, h, row);
	png_destroy_write_struct(&png, &info);
	free(row);
	return SF_OK;
}

int sf_qc_render(sf_engine *g, const sf_qc_side *ref, const sf_qc_side *mov, uint8_t **png,
                 size_t *len, sf_err *e)
{
	const sf_layout *rl = ref->vfile->layout, *ml = mov->vfile->layout;
	uint32_t level = sf_qc_level(rl);
	uint32_t w = sf_layout_level_width(rl, level), h = sf_layout_level_height(rl, level);
	uint8_t *ref_plane = NULL, *mov_plane = NULL;
	png_sink sink = {0};
	int rc;

	*png = NULL;
	*len = 0;
	if (!sf_layout_unit_rows(rl) || sf_layout_get_spec(rl)->tile == 0 ||
	    sf_layout_get_spec(ml)->tile == 0 || sf_layout_levels(ml) <= level ||
	    sf_layout_level_width(ml, level) != w || sf_layout_level_height(ml, level) != h)
		return sf_fail(e, SF_EINVAL, "%s: QC overlay needs two tiled files on one grid",
		               mov->vfile->product->name);
	if (ref->channel >= sf_layout_get_spec(rl)->pages ||
	    mov->channel >= sf_layout_get_spec(ml)->pages)
		return sf_fail(e, SF_EINVAL, "%s: QC channel out of range",
		               mov->vfile->product->name);
	rc = side_plane(g, ref, level, &ref_plane, e);
	if (rc == SF_OK)
		rc = side_plane(g, mov, level, &mov_plane, e);
	if (rc == SF_OK)
		rc = encode_png(ref_plane, mov_plane, w, h, &sink, e);
	free(ref_plane);
	free(mov_plane);
	if (rc != SF_OK) {
		free(sink.buf);
		return rc;
	}
	*png = sink.buf;
	*len = sink.len;
	return SF_OK;
}

/* --- the lazily rendered overlay ---------------------------------------- */

int sf_qc_create(const sf_qc_side *ref, const sf_qc_side *mov, const char *name, sf_qc **out,
                 sf_err *e)
{
	sf_qc *q = calloc(1, sizeof *q);

	if (!q)
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", name);
	if (pthread_mutex_init(&q->lock, NULL) != 0) {
		free(q);
		return sf_fail(e, SF_ENOMEM, "%s: cannot make a mutex", name);
	}
	q->ref = *ref;
	q->mov = *mov;
	snprintf(q->name, sizeof q->name, "%s", name);
	*out = q;
	return SF_OK;
}

void sf_qc_free(sf_qc *q)
{
	if (!q)
		return;
	pthread_mutex_destroy(&q->lock);
	free(q->png);
	free(q);
}

int sf_qc_get(sf_qc *q, sf_engine *g, const uint8_t **png, size_t *len, sf_err *e)
{
	int rc = SF_OK;

	pthread_mutex_lock(&q->lock);
	if (!q->ready) {
		rc = sf_qc_render(g, &q->ref, &q->mov, &q->png, &q->len, e);
		q->ready = rc == SF_OK;
		if (rc != SF_OK) {
			char why[sizeof e->msg];
			snprintf(why, sizeof why, "%s", e->msg);
			sf_fail(e, rc, "%s: %s", q->name, why);
		}
	}
	*png = q->png;
	*len = q->len;
	pthread_mutex_unlock(&q->lock);
	return rc;
}

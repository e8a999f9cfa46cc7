/* tiff_layout.c — the header bytes and unit arithmetic of a virtual TIFF
 * file (see tiff_layout.h for the layout itself).
 *
 * How the header is made: libtiff writes it, into memory.
 *  1. TIFFClientOpenExt opens a growable buffer (struct memfile) through our
 *     own read/write/seek procs, "wl" or "w8l" (classic or BigTIFF,
 *     little-endian), with per-handle error/warning handlers.
 *  2. Every IFD is set up (tags, TIFFWriteCheck) and written with
 *     TIFFWriteDirectory in file order: page 0, its SubIFDs, page 1, ...
 *     No pixel is ever written, so each IFD's Tile/Strip Offsets and
 *     ByteCounts arrays go out as zeros, and the buffer ends up holding the
 *     TIFF header, the IFDs, their tag values and arrays, and nothing else.
 *     libtiff picks LONG offsets for classic TIFF, LONG8 for BigTIFF, and
 *     LONG byte counts.
 *  3. After TIFFClose, header_size is the buffer length rounded up to 4096.
 *     We walk the IFDs in the buffer (main chain by next-IFD links, levels
 *     by each page's SubIFDs tag), find each IFD's two arrays and patch the
 *     values: pixel offsets by arithmetic, byte counts exact.  The walk also
 *     checks that libtiff wrote the structure, types and counts we expect.
 * Why not TIFFDeferStrileArrayWriting + TIFFForceStrileArrayWriting (GDAL's
 * COG sequence): they exist to put arrays before pixel data that libtiff
 * itself writes; we write none, so plain TIFFWriteDirectory already puts
 * everything first.  And forcing needs each IFD revisited with
 * TIFFSetSubDirectory, which in libtiff 4.5 rescans the whole main chain for
 * every SubIFD: quadratic in pages (2000 pages x 3 levels took 0.3 s).
 *
 * Invariants:
 *  - tile position (or strip) q starts at header_size + q * position_stride;
 *    every position is position_stride bytes except a strip file's last
 *    strip; file_size = header_size + data_bytes.  No gaps, no overlaps.
 *  - in a tiled file, page p's tile of position q is at its start +
 *    p * page_stride, and the TIFF tile index inside a level is
 *    ty * across + tx (contig planar config), so q = level_first + index.
 *  - unit u is page group u % groups of position u / groups: pages
 *    [g * group_pages, min(pages, (g + 1) * group_pages)), which lie one
 *    after another, so a unit is one contiguous run of bytes too.
 *  - the header is a pure function of the spec (libtiff adds no time stamps
 *    and every byte not written by libtiff is zero), so builds repeat.
 *  - classic TIFF only when file_size <= UINT32_MAX, so every offset fits in
 *    a LONG.
 * Cost: linear in tiles (one array entry each) and in IFDs (pages x levels). */
#include "scopefs/tiff_layout.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tiffio.h>

#include "scopefs/log.h"

#define HEADER_ALIGN       4096u
#define STRIP_TARGET_BYTES (256u * 1024u)
/* Offset arrays live in the header: bound them so a header stays < 1 GiB. */
#define MAX_TILES_PER_IFD ((uint64_t)1 << 24)
#define MAX_TILE_ENTRIES  ((uint64_t)1 << 26)

struct sf_layout {
	sf_layout_spec spec;                    /* as built; see sf_layout_get_spec */
	uint32_t level_w[SF_LAYOUT_MAX_LEVELS]; /* pixels across each level */
	uint32_t level_h[SF_LAYOUT_MAX_LEVELS]; /* pixels down each level */
	uint32_t across[SF_LAYOUT_MAX_LEVELS];  /* tiles across (strip files: 1) */
	uint32_t down[SF_LAYOUT_MAX_LEVELS];    /* tiles or strips down */
	uint64_t
	    level_first[SF_LAYOUT_MAX_LEVELS + 1]; /* first position of a level; [levels]: count */
	uint32_t unit_rows;                        /* tile edge or rows per strip */
	uint64_t row_bytes;                        /* strip files: one image row */
	uint64_t page_stride;                      /* one page's full tile, or a full strip */
	uint64_t position_stride;                  /* a full position: pages * page_stride */
	uint32_t group_pages;                      /* pages in a unit (the last group: fewer) */
	uint32_t groups;                           /* units per position */
	uint64_t data_bytes;                       /* every unit together */
	uint64_t header_size;                      /* multiple of HEADER_ALIGN */
	uint8_t *header;                           /* header_size bytes, owned */
	int bigtiff;                               /* 1: BigTIFF, 0: classic */
};

/* ---- the in-memory file libtiff writes into ---- */

struct memfile {
	uint8_t *buf;  /* cap bytes; bytes past size are zero */
	uint64_t size; /* bytes written (highest end) */
	uint64_t cap;  /* bytes allocated */
	uint64_t pos;  /* current position, may pass size */
	int nomem;     /* an allocation failed */
	char err[256]; /* first libtiff error, "" if none */
};

static int memfile_reserve(struct memfile *mf, uint64_t need)
{
	if (need <= mf->cap)
		return 0;
	uint64_t cap = mf->cap ? mf->cap : 64 * 1024;
	while (cap < need)
		cap *= 2;
	uint8_t *buf = realloc(mf->buf, cap);
	if (!buf) {
		mf->nomem = 1;
		return -1;
	}
	memset(buf + mf->cap, 0, cap - mf->cap);
	mf->buf = buf;
	mf->cap = cap;
	return 0;
}

static tmsize_t memfile_read(thandle_t h, void *dst, tmsize_t n)
{
	struct memfile *mf = h;
	if (n < 0 || mf->pos >= mf->size)
		return 0;
	uint64_t avail = mf->size - mf->pos;
	uint64_t take = (uint64_t)n < avail ? (uint64_t)n : avail;
	memcpy(dst, mf->buf + mf->pos, take);
	mf->pos += take;
	return (tmsize_t)take;
}

static tmsize_t memfile_write(thandle_t h, void *src, tmsize_t n)
{
	struct memfile *mf = h;
	if (n < 0 || memfile_reserve(mf, mf->pos + (uint64_t)n) != 0)
		return -1;
	memcpy(mf->buf + mf->pos, src, (size_t)n);
	mf->pos += (uint64_t)n;
	if (mf->pos > mf->size)
		mf->size = mf->pos;
	return n;
}

static toff_t memfile_seek(thandle_t h, toff_t off, int whence)
{
	struct memfile *mf = h;
	uint64_t base = whence == SEEK_CUR ? mf->pos : whence == SEEK_END ? mf->size : 0;
	/* libtiff passes negative SEEK_CUR/SEEK_END offsets as wrapped toff_t. */
	mf->pos = base + off;
	return mf->pos;
}

static int memfile_close(thandle_t h)
{
	(void)h;
	return 0;
}

static toff_t memfile_size(thandle_t h)
{
	return ((struct memfile *)h)->size;
}

static int memfile_map(thandle_t h, void **base, toff_t *size)
{
	(void)h, (void)base, (void)size;
	return 0; /* not mappable: libtiff falls back to read */
}

static void memfile_unmap(thandle_t h, void *base, toff_t size)
{
	(void)h, (void)base, (void)size;
}

static int on_tiff_error(TIFF *tif, void *user, const char *module, const char *fmt, va_list ap)
{
	struct memfile *mf = user;
	(void)tif;
	if (mf->err[0] == '\0') {
		int n = snprintf(mf->err, sizeof mf->err, "%s: ", module ? module : "libtiff");
		if (n > 0 && (size_t)n < sizeof mf->err)
			vsnprintf(mf->err + n, sizeof mf->err - (size_t)n, fmt, ap);
	}
	return 1; /* handled: keep libtiff's default handler off stderr */
}

static int on_tiff_warning(TIFF *tif, void *user, const char *module, const char *fmt, va_list ap)
{
	char msg[256];
	(void)tif, (void)user;
	vsnprintf(msg, sizeof msg, fmt, ap);
	sf_log(SF_LOG_WARN, "tiff layout: libtiff %s: %s", module ? module : "", msg);
	return 1;
}

/* ---- checking the spec and planning the units ---- */

/* The ImageJ calibration fields of s (see tiff_layout.h). */
static int check_imagej_calibration(const sf_layout_spec *s, sf_err *e)
{
	double px = s->imagej_pixel_um, dz = s->imagej_spacing_um;
	if (!isfinite(px) || !isfinite(dz) || px < 0 || dz < 0)
		return sf_fail(e, SF_EINVAL, "tiff layout: bad ImageJ voxel size %g x %g um", px,
		               dz);
	if (px == 0 && dz == 0)
		return SF_OK;
	if (px == 0)
		return sf_fail(e, SF_EINVAL,
		               "tiff layout: an ImageJ plane spacing needs a pixel size");
	if (s->tile != 0)
		return sf_fail(e, SF_EINVAL,
		               "tiff layout: the ImageJ calibration is for strip files only");
	if (s->description || s->resolution_x > 0 || s->resolution_y > 0)
		return sf_fail(e, SF_EINVAL,
		               "tiff layout: the ImageJ calibration replaces the description and "
		               "resolution, give one or the other");
	return SF_OK;
}

static int check_spec(const sf_layout_spec *s, sf_err *e)
{
	if (s->width == 0 || s->height == 0)
		return sf_fail(e, SF_EINVAL, "tiff layout: empty image %ux%u", s->width, s->height);
	if (s->pages == 0 || s->pages > SF_LAYOUT_MAX_PAGES)
		return sf_fail(e, SF_EINVAL, "tiff layout: pages %u not in 1..%u", s->pages,
		               SF_LAYOUT_MAX_PAGES);
	if (s->samples != 1 && s->samples != 3)
		return sf_fail(e, SF_EINVAL, "tiff layout: samples per pixel %u is not 1 or 3",
		               s->samples);
	if (sf_dtype_bytes(s->dtype) == 0)
		return sf_fail(e, SF_EINVAL, "tiff layout: unknown sample type %d", (int)s->dtype);
	if (s->tile != 0 && (s->tile % 16 != 0 || s->tile > SF_LAYOUT_MAX_TILE))
		return sf_fail(e, SF_EINVAL,
		               "tiff layout: tile %u is not a multiple of 16 in 16..%u", s->tile,
		               SF_LAYOUT_MAX_TILE);
	if (s->levels == 0 || s->levels > SF_LAYOUT_MAX_LEVELS)
		return sf_fail(e, SF_EINVAL, "tiff layout: levels %u not in 1..%u", s->levels,
		               SF_LAYOUT_MAX_LEVELS);
	if (s->tile == 0 && (s->pages != 1 || s->levels != 1))
		return sf_fail(
		    e, SF_EINVAL,
		    "tiff layout: a strip file has one page and one level, not %u and %u", s->pages,
		    s->levels);
	if (!s->level_width != !s->level_height)
		return sf_fail(e, SF_EINVAL,
		               "tiff layout: level widths and heights must be given together");
	if (s->bigtiff < -1 || s->bigtiff > 1)
		return sf_fail(e, SF_EINVAL, "tiff layout: bigtiff %d is not -1, 0 or 1",
		               s->bigtiff);
	if (!isfinite(s->resolution_x) || !isfinite(s->resolution_y) || s->resolution_x < 0 ||
	    s->resolution_y < 0)
		return sf_fail(e, SF_EINVAL, "tiff layout: bad resolution %g x %g pixels/cm",
		               s->resolution_x, s->resolution_y);
	return check_imagej_calibration(s, e);
}

/* ImageJ 1.x's calibration description (as ImageJ and tifffile write it)
 * into buf; ImageJ takes the unit and the z spacing from it, and x/y from
 * the resolution tags.  %.12g keeps 1.2 as "1.2" while any spec gives the
 * same bytes. */
static const char *imagej_description(const sf_layout_spec *s, char *buf, size_t cap)
{
	int n = snprintf(buf, cap, "ImageJ=1.11a\nunit=micron\n");
	if (sf_pixel_um_plausible(s->imagej_spacing_um) && n > 0 && (size_t)n < cap)
		snprintf(buf + n, cap - (size_t)n, "spacing=%.12g\n", s->imagej_spacing_um);
	return buf;
}

static int plan_level_sizes(sf_layout *l, sf_err *e)
{
	const sf_layout_spec *s = &l->spec;
	for (uint32_t i = 0; i < s->levels; i++) {
		if (!s->level_width) {
			/* ceil(size / 2^i); 64-bit so that 2^i never overflows */
			uint64_t div = (uint64_t)1 << i;
			l->level_w[i] = (uint32_t)(((uint64_t)s->width + div - 1) / div);
			l->level_h[i] = (uint32_t)(((uint64_t)s->height + div - 1) / div);
			continue;
		}
		uint32_t w = s->level_width[i], h = s->level_height[i];
		if (i == 0 && (w != s->width || h != s->height))
			return sf_fail(e, SF_EINVAL,
			               "tiff layout: level 0 is %ux%u but the image is %ux%u", w, h,
			               s->width, s->height);
		if (w == 0 || h == 0 || (i > 0 && (w > l->level_w[i - 1] || h > l->level_h[i - 1])))
			return sf_fail(
			    e, SF_EINVAL,
			    "tiff layout: level %u size %ux%u is empty or larger than the "
			    "level above",
			    i, w, h);
		l->level_w[i] = w;
		l->level_h[i] = h;
	}
	return SF_OK;
}

static int plan_strips(sf_layout *l, sf_err *e)
{
	const sf_layout_spec *s = &l->spec;
	l->row_bytes = (uint64_t)s->width * s->samples * sf_dtype_bytes(s->dtype);
	if (l->row_bytes > UINT32_MAX)
		return sf_fail(e, SF_ERANGE, "tiff layout: a %u-pixel row is too long for a strip",
		               s->width);
	uint64_t rows = STRIP_TARGET_BYTES / l->row_bytes;
	if (rows == 0)
		rows = 1;
	if (rows > s->height)
		rows = s->height;
	l->unit_rows = (uint32_t)rows;
	l->page_stride = rows * l->row_bytes;
	l->position_stride = l->page_stride;
	l->group_pages = 1;
	l->groups = 1;
	l->across[0] = 1;
	l->down[0] = (uint32_t)((s->height + rows - 1) / rows);
	l->level_first[0] = 0;
	l->level_first[1] = l->down[0];
	l->data_bytes = (uint64_t)s->height * l->row_bytes;
	return SF_OK;
}

/* Pages per unit: all of them, unless that passes spec.unit_bytes_max; then
 * as few groups as keep each under it (at least one page each), evened out
 * so that 40 pages in 4 MiB units of 512 KiB pages are 5 groups of 8. */
static void plan_groups(sf_layout *l)
{
	uint32_t pages = l->spec.pages;
	uint64_t max = l->spec.unit_bytes_max;
	uint64_t fit = max ? max / l->page_stride : pages;
	if (fit == 0)
		fit = 1;
	if (fit > pages)
		fit = pages;
	l->groups = (uint32_t)((pages + fit - 1) / fit);
	l->group_pages = (pages + l->groups - 1) / l->groups;
}

static int plan_tiles(sf_layout *l, sf_err *e)
{
	const sf_layout_spec *s = &l->spec;
	uint64_t t = s->tile;
	l->unit_rows = s->tile;
	l->page_stride = t * t * s->samples * sf_dtype_bytes(s->dtype);
	l->position_stride = l->page_stride * s->pages;
	plan_groups(l);
	l->level_first[0] = 0;
	for (uint32_t i = 0; i < s->levels; i++) {
		l->across[i] = (uint32_t)((l->level_w[i] + t - 1) / t);
		l->down[i] = (uint32_t)((l->level_h[i] + t - 1) / t);
		uint64_t n = (uint64_t)l->across[i] * l->down[i];
		if (n > MAX_TILES_PER_IFD)
			return sf_fail(e, SF_ERANGE,
			               "tiff layout: level %u has %llu tiles of %u, more than %llu",
			               i, (unsigned long long)n, s->tile,
			               (unsigned long long)MAX_TILES_PER_IFD);
		l->level_first[i + 1] = l->level_first[i] + n;
	}
	uint64_t units = l->level_first[s->levels];
	if (units * s->pages > MAX_TILE_ENTRIES)
		return sf_fail(e, SF_ERANGE, "tiff layout: %llu tiles in all, more than %llu",
		               (unsigned long long)(units * s->pages),
		               (unsigned long long)MAX_TILE_ENTRIES);
	/* <= 2^26 entries of <= 2^30 bytes: no overflow */
	l->data_bytes = units * l->position_stride;
	return SF_OK;
}

/* ---- writing the IFDs with libtiff ---- */

static int set_ifd_tags(TIFF *t, const sf_layout *l, uint32_t page, uint32_t level,
                        const char *description)
{
	const sf_layout_spec *s = &l->spec;
	static const uint64_t no_subifds[SF_LAYOUT_MAX_LEVELS]; /* libtiff fills them in */
	int bits = (int)sf_dtype_bytes(s->dtype) * 8;
	int format = s->dtype == SF_F32 ? SAMPLEFORMAT_IEEEFP : SAMPLEFORMAT_UINT;
	int photometric = s->samples == 3 ? PHOTOMETRIC_RGB : PHOTOMETRIC_MINISBLACK;
	int ok = TIFFSetField(t, TIFFTAG_IMAGEWIDTH, l->level_w[level]) &&
	         TIFFSetField(t, TIFFTAG_IMAGELENGTH, l->level_h[level]) &&
	         TIFFSetField(t, TIFFTAG_BITSPERSAMPLE, bits) &&
	         TIFFSetField(t, TIFFTAG_SAMPLESPERPIXEL, (int)s->samples) &&
	         TIFFSetField(t, TIFFTAG_SAMPLEFORMAT, format) &&
	         TIFFSetField(t, TIFFTAG_COMPRESSION, COMPRESSION_NONE) &&
	         TIFFSetField(t, TIFFTAG_PHOTOMETRIC, photometric) &&
	         TIFFSetField(t, TIFFTAG_PLANARCONFIG, PLANARCONFIG_CONTIG);
	if (ok && s->tile)
		ok = TIFFSetField(t, TIFFTAG_TILEWIDTH, s->tile) &&
		     TIFFSetField(t, TIFFTAG_TILELENGTH, s->tile);
	else if (ok)
		ok = TIFFSetField(t, TIFFTAG_ROWSPERSTRIP, l->unit_rows);
	if (ok && level > 0)
		ok = TIFFSetField(t, TIFFTAG_SUBFILETYPE, FILETYPE_REDUCEDIMAGE);
	if (ok && level == 0 && s->levels > 1)
		ok = TIFFSetField(t, TIFFTAG_SUBIFD, (int)(s->levels - 1), no_subifds);
	if (ok && level == 0 && page == 0) {
		ok = TIFFSetField(t, TIFFTAG_SOFTWARE, "scopefs");
		if (ok && description)
			ok = TIFFSetField(t, TIFFTAG_IMAGEDESCRIPTION, description);
	}
	if (ok && sf_pixel_um_plausible(s->imagej_pixel_um)) {
		/* pixels per micron; the unit is in the description, as ImageJ does.
		 * An implausible size is left out, not refused: the deconvolution
		 * refuses such optics with its own message, which a layout error
		 * would hide. */
		ok = TIFFSetField(t, TIFFTAG_XRESOLUTION, 1.0 / s->imagej_pixel_um) &&
		     TIFFSetField(t, TIFFTAG_YRESOLUTION, 1.0 / s->imagej_pixel_um) &&
		     TIFFSetField(t, TIFFTAG_RESOLUTIONUNIT, RESUNIT_NONE);
	} else if (ok && s->resolution_x > 0 && s->resolution_y > 0) {
		/* Level l is a 2^l downsample of level 0 (the plan's rule and
		 * sf_level_downsample's), also where its size was rounded up:
		 * its pixels are 2^l times level 0's.  Scaling by the size ratio
		 * gave a ceil-halved level slightly smaller pixels. */
		double f = ldexp(1.0, -(int)level);
		ok = TIFFSetField(t, TIFFTAG_XRESOLUTION, s->resolution_x * f) &&
		     TIFFSetField(t, TIFFTAG_YRESOLUTION, s->resolution_y * f) &&
		     TIFFSetField(t, TIFFTAG_RESOLUTIONUNIT, RESUNIT_CENTIMETER);
	}
	return ok;
}

/* Step 2: every IFD in file order; their offset arrays go out as zeros. */
static int write_directories(TIFF *t, const sf_layout *l, const char *description)
{
	for (uint32_t p = 0; p < l->spec.pages; p++)
		for (uint32_t i = 0; i < l->spec.levels; i++)
			if (!set_ifd_tags(t, l, p, i, description) ||
			    !TIFFWriteCheck(t, l->spec.tile != 0, "sf_layout") ||
			    !TIFFWriteDirectory(t))
				return 0;
	return 1;
}

/* ---- step 3: finding and patching the offset arrays in the buffer ---- */

struct ifd_array {
	uint16_t type;  /* TIFF_SHORT, TIFF_LONG or TIFF_LONG8 */
	uint64_t count; /* values */
	uint64_t pos;   /* buffer position of value 0 */
};

static uint64_t get_le(const uint8_t *p, unsigned bytes)
{
	uint64_t v = 0;
	for (unsigned i = 0; i < bytes; i++)
		v |= (uint64_t)p[i] << (8 * i);
	return v;
}

static void put_le(uint8_t *p, unsigned bytes, uint64_t v)
{
	for (unsigned i = 0; i < bytes; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static unsigned type_bytes(uint16_t type)
{
	switch (type) {
	case TIFF_SHORT: return 2;
	case TIFF_LONG: return 4;
	case TIFF_LONG8: return 8;
	case TIFF_IFD: return 4;
	case TIFF_IFD8: return 8;
	}
	return 0;
}

/* Find tag's array in the IFD at ifd: 0 on success, -1 if absent or odd. */
static int find_array(const struct memfile *mf, int big, uint64_t ifd, uint16_t tag,
                      struct ifd_array *a)
{
	unsigned count_bytes = big ? 8 : 2, entry_bytes = big ? 20 : 12, word = big ? 8 : 4;
	if (ifd > mf->size || mf->size - ifd < count_bytes)
		return -1;
	uint64_t entries = get_le(mf->buf + ifd, count_bytes);
	if (entries > (mf->size - ifd - count_bytes) / entry_bytes)
		return -1;
	for (uint64_t i = 0; i < entries; i++) {
		const uint8_t *ent = mf->buf + ifd + count_bytes + i * entry_bytes;
		if (get_le(ent, 2) != tag)
			continue;
		a->type = (uint16_t)get_le(ent + 2, 2);
		a->count = get_le(ent + 4, big ? 8 : 4);
		unsigned size = type_bytes(a->type);
		if (size == 0 || a->count > mf->size / size)
			return -1;
		const uint8_t *value = ent + 4 + (big ? 8 : 4);
		if (a->count * size <= word)
			a->pos = (uint64_t)(value - mf->buf);
		else
			a->pos = get_le(value, word);
		return a->pos <= mf->size && a->count * size <= mf->size - a->pos ? 0 : -1;
	}
	return -1;
}

static int put_array_value(struct memfile *mf, const struct ifd_array *a, uint64_t i, uint64_t v)
{
	unsigned size = type_bytes(a->type);
	if (size < 8 && v >> (8 * size))
		return -1;
	put_le(mf->buf + a->pos + i * size, size, v);
	return 0;
}

static int patch_ifd(struct memfile *mf, const sf_layout *l, uint32_t page, uint32_t level,
                     uint64_t ifd, sf_err *e)
{
	int tiled = l->spec.tile != 0;
	uint16_t off_tag = tiled ? TIFFTAG_TILEOFFSETS : TIFFTAG_STRIPOFFSETS;
	uint16_t len_tag = tiled ? TIFFTAG_TILEBYTECOUNTS : TIFFTAG_STRIPBYTECOUNTS;
	uint64_t n = (uint64_t)l->across[level] * l->down[level];
	struct ifd_array offs, lens;
	if (find_array(mf, l->bigtiff, ifd, off_tag, &offs) != 0 ||
	    find_array(mf, l->bigtiff, ifd, len_tag, &lens) != 0 || offs.count != n ||
	    lens.count != n)
		return sf_fail(
		    e, SF_EFORMAT,
		    "tiff layout: libtiff wrote no usable offset arrays for page %u level "
		    "%u (%llu tiles expected)",
		    page, level, (unsigned long long)n);
	for (uint64_t i = 0; i < n; i++) {
		uint64_t position = l->level_first[level] + i;
		uint64_t bytes = l->page_stride;
		uint64_t off = l->header_size + position * l->position_stride + page * bytes;
		if (!tiled) /* one page; the last strip is short */
			bytes = sf_layout_unit_bytes(l, position);
		if (put_array_value(mf, &offs, i, off) != 0 ||
		    put_array_value(mf, &lens, i, bytes) != 0)
			return sf_fail(e, SF_ERANGE,
			               "tiff layout: offset %llu does not fit libtiff's array type",
			               (unsigned long long)off);
	}
	return SF_OK;
}

/* The next-IFD link of the IFD at ifd: 0 on success, -1 if out of bounds. */
static int next_ifd(const struct memfile *mf, int big, uint64_t ifd, uint64_t *next)
{
	unsigned count_bytes = big ? 8 : 2, entry_bytes = big ? 20 : 12, word = big ? 8 : 4;
	if (ifd > mf->size || mf->size - ifd < count_bytes + word)
		return -1;
	uint64_t entries = get_le(mf->buf + ifd, count_bytes);
	if (entries > (mf->size - ifd - count_bytes - word) / entry_bytes)
		return -1;
	*next = get_le(mf->buf + ifd + count_bytes + entries * entry_bytes, word);
	return 0;
}

static int fail_structure(uint32_t page, sf_err *e)
{
	return sf_fail(e, SF_EFORMAT,
	               "tiff layout: libtiff wrote an unexpected IFD structure at page %u", page);
}

/* Step 3: walk the IFDs libtiff wrote (pages by next-IFD links, levels by
 * each page's SubIFDs) and patch each one's arrays. */
static int patch_all(struct memfile *mf, const sf_layout *l, sf_err *e)
{
	int big = l->bigtiff;
	uint32_t levels = l->spec.levels;
	if (mf->size < 16)
		return fail_structure(0, e);
	uint64_t ifd = get_le(mf->buf + (big ? 8 : 4), big ? 8 : 4);
	for (uint32_t p = 0; p < l->spec.pages; p++) {
		if (ifd == 0)
			return fail_structure(p, e);
		int rc = patch_ifd(mf, l, p, 0, ifd, e);
		struct ifd_array subs = {0};
		if (rc == SF_OK && levels > 1 &&
		    (find_array(mf, big, ifd, TIFFTAG_SUBIFD, &subs) != 0 ||
		     subs.count != levels - 1))
			return fail_structure(p, e);
		unsigned size = type_bytes(subs.type);
		for (uint32_t i = 1; rc == SF_OK && i < levels; i++)
			rc = patch_ifd(mf, l, p, i,
			               get_le(mf->buf + subs.pos + (i - 1) * size, size), e);
		if (rc != SF_OK)
			return rc;
		if (next_ifd(mf, big, ifd, &ifd) != 0)
			return fail_structure(p, e);
	}
	return ifd == 0 ? SF_OK : fail_structure(l->spec.pages, e);
}

/* Run steps 1-2 into mf; 0 on success. */
static int run_libtiff(struct memfile *mf, const sf_layout *l, const char *description)
{
	TIFFOpenOptions *opts = TIFFOpenOptionsAlloc();
	if (!opts) {
		mf->nomem = 1;
		return -1;
	}
	TIFFOpenOptionsSetErrorHandlerExtR(opts, on_tiff_error, mf);
	TIFFOpenOptionsSetWarningHandlerExtR(opts, on_tiff_warning, mf);
	TIFF *t = TIFFClientOpenExt("scopefs-layout", l->bigtiff ? "w8l" : "wl", mf, memfile_read,
	                            memfile_write, memfile_seek, memfile_close, memfile_size,
	                            memfile_map, memfile_unmap, opts);
	TIFFOpenOptionsFree(opts);
	if (!t)
		return -1;
	int ok = write_directories(t, l, description);
	TIFFClose(t);
	return ok && !mf->nomem && mf->err[0] == '\0' ? 0 : -1;
}

/* Build l->header for l->bigtiff and set l->header_size.  SF_ERANGE without
 * a message: classic TIFF was asked for but the file passes 4 GiB. */
static int build_header(sf_layout *l, const char *description, sf_err *e)
{
	struct memfile mf = {0};
	int rc = SF_OK;
	if (run_libtiff(&mf, l, description) != 0) {
		if (mf.nomem)
			rc = sf_fail(e, SF_ENOMEM, "tiff layout: no memory for a %llu-byte header",
			             (unsigned long long)mf.size);
		else
			rc = sf_fail(e, SF_EFORMAT, "tiff layout: libtiff failed: %s",
			             mf.err[0] ? mf.err : "no message");
		goto out;
	}
	l->header_size = (mf.size + HEADER_ALIGN - 1) / HEADER_ALIGN * HEADER_ALIGN;
	if (!l->bigtiff && sf_layout_file_size(l) > UINT32_MAX) {
		rc = SF_ERANGE; /* offsets would not fit: the caller decides, no message */
		goto out;
	}
	if (memfile_reserve(&mf, l->header_size) != 0) {
		rc = sf_fail(e, SF_ENOMEM, "tiff layout: no memory for a %llu-byte header",
		             (unsigned long long)l->header_size);
		goto out;
	}
	rc = patch_all(&mf, l, e);
	if (rc == SF_OK) {
		l->header = mf.buf;
		mf.buf = NULL;
	}
out:
	free(mf.buf);
	return rc;
}

static int fail_needs_bigtiff(const sf_layout *l, sf_err *e)
{
	const sf_layout_spec *s = &l->spec;
	return sf_fail(
	    e, SF_ERANGE,
	    "tiff layout: %ux%u needs BigTIFF (%llu bytes of pixels) and bigtiff is %d%s", s->width,
	    s->height, (unsigned long long)l->data_bytes, s->bigtiff,
	    s->tile ? "" : " (strip files are classic unless bigtiff is 1)");
}

/* The bigtiff choice: classic when the whole file fits in 32 bits, unless
 * forced.  Classic is tried first whenever the pixels alone fit; if its
 * header pushes the file over, the header is built again as BigTIFF. */
static int build_for_size(sf_layout *l, const char *description, sf_err *e)
{
	const sf_layout_spec *s = &l->spec;
	int may_grow = s->bigtiff == -1 && s->tile != 0; /* strip files stay classic */
	l->bigtiff = s->bigtiff == 1 || (may_grow && l->data_bytes > UINT32_MAX);
	if (!l->bigtiff && l->data_bytes > UINT32_MAX)
		return fail_needs_bigtiff(l, e);
	int rc = build_header(l, description, e);
	if (rc != SF_ERANGE || l->bigtiff)
		return rc;
	if (!may_grow)
		return fail_needs_bigtiff(l, e);
	free(l->header);
	l->header = NULL;
	l->bigtiff = 1;
	return build_header(l, description, e);
}

int sf_layout_create(const sf_layout_spec *spec, sf_layout **out, sf_err *e)
{
	if (out)
		*out = NULL;
	if (!spec || !out)
		return sf_fail(e, SF_EINVAL, "tiff layout: no spec or no result pointer");
	int rc = check_spec(spec, e);
	if (rc != SF_OK)
		return rc;
	sf_layout *l = calloc(1, sizeof *l);
	if (!l)
		return sf_fail(e, SF_ENOMEM, "tiff layout: no memory");
	l->spec = *spec;
	l->spec.description = NULL;
	rc = plan_level_sizes(l, e);
	if (rc == SF_OK)
		rc = spec->tile ? plan_tiles(l, e) : plan_strips(l, e);
	l->spec.level_width = l->level_w;
	l->spec.level_height = l->level_h;
	char imagej[128];
	const char *description = sf_pixel_um_plausible(spec->imagej_pixel_um)
	                              ? imagej_description(spec, imagej, sizeof imagej)
	                              : spec->description;
	if (rc == SF_OK)
		rc = build_for_size(l, description, e);
	if (rc != SF_OK) {
		sf_layout_free(l);
		return rc;
	}
	*out = l;
	return SF_OK;
}

void sf_layout_free(sf_layout *l)
{
	if (!l)
		return;
	free(l->header);
	free(l);
}

/* ---- queries ---- */

uint64_t sf_layout_file_size(const sf_layout *l)
{
	return l->header_size + l->data_bytes;
}

uint64_t sf_layout_header_size(const sf_layout *l)
{
	return l->header_size;
}

const uint8_t *sf_layout_header(const sf_layout *l)
{
	return l->header;
}

int sf_layout_is_bigtiff(const sf_layout *l)
{
	return l->bigtiff;
}

const sf_layout_spec *sf_layout_get_spec(const sf_layout *l)
{
	return &l->spec;
}

uint32_t sf_layout_levels(const sf_layout *l)
{
	return l->spec.levels;
}

uint32_t sf_layout_level_width(const sf_layout *l, uint32_t level)
{
	return level < l->spec.levels ? l->level_w[level] : 0;
}

uint32_t sf_layout_level_height(const sf_layout *l, uint32_t level)
{
	return level < l->spec.levels ? l->level_h[level] : 0;
}

uint32_t sf_layout_tiles_across(const sf_layout *l, uint32_t level)
{
	return level < l->spec.levels ? l->across[level] : 0;
}

uint32_t sf_layout_tiles_down(const sf_layout *l, uint32_t level)
{
	return level < l->spec.levels ? l->down[level] : 0;
}

uint32_t sf_layout_unit_rows(const sf_layout *l)
{
	return l->unit_rows;
}

uint64_t sf_layout_unit_count(const sf_layout *l)
{
	return l->level_first[l->spec.levels] * l->groups;
}

uint64_t sf_layout_unit_index(const sf_layout *l, uint32_t level, uint32_t tx, uint32_t ty)
{
	return sf_layout_page_unit(l, level, tx, ty, 0, NULL);
}

uint64_t sf_layout_page_unit(const sf_layout *l, uint32_t level, uint32_t tx, uint32_t ty,
                             uint32_t page, uint64_t *within)
{
	if (within)
		*within = 0;
	if (level >= l->spec.levels || tx >= l->across[level] || ty >= l->down[level] ||
	    page >= l->spec.pages)
		return 0;
	uint64_t position = l->level_first[level] + (uint64_t)ty * l->across[level] + tx;
	if (within)
		*within = (uint64_t)(page % l->group_pages) * l->page_stride;
	return position * l->groups + page / l->group_pages;
}

void sf_layout_unit_pages(const sf_layout *l, uint64_t unit, uint32_t *first, uint32_t *count)
{
	uint32_t f = 0, n = 0;
	if (unit < sf_layout_unit_count(l)) {
		f = (uint32_t)(unit % l->groups) * l->group_pages;
		n = l->spec.pages - f < l->group_pages ? l->spec.pages - f : l->group_pages;
	}
	if (first)
		*first = f;
	if (count)
		*count = n;
}

uint32_t sf_layout_unit_pages_max(const sf_layout *l)
{
	return l->group_pages;
}

sf_key sf_layout_key_units(sf_key k, const sf_layout *l)
{
	if (l->groups == 1)
		return k;
	return sf_key_mix_u64(sf_key_mix_str(k, "unit page groups"), l->group_pages);
}

void sf_layout_unit_pos(const sf_layout *l, uint64_t unit, uint32_t *level, uint32_t *tx,
                        uint32_t *ty)
{
	uint32_t i = 0;
	uint64_t in_level = 0;
	if (unit >= sf_layout_unit_count(l)) {
		i = l->spec.levels;
	} else {
		uint64_t position = unit / l->groups;
		while (position >= l->level_first[i + 1])
			i++;
		in_level = position - l->level_first[i];
	}
	if (level)
		*level = i;
	if (tx)
		*tx = i < l->spec.levels ? (uint32_t)(in_level % l->across[i]) : 0;
	if (ty)
		*ty = i < l->spec.levels ? (uint32_t)(in_level / l->across[i]) : 0;
}

uint64_t sf_layout_unit_offset(const sf_layout *l, uint64_t unit)
{
	if (unit >= sf_layout_unit_count(l))
		return sf_layout_file_size(l);
	return l->header_size + unit / l->groups * l->position_stride +
	       (uint64_t)(unit % l->groups) * l->group_pages * l->page_stride;
}

size_t sf_layout_unit_bytes(const sf_layout *l, uint64_t unit)
{
	uint64_t count = sf_layout_unit_count(l);
	uint32_t pages;
	if (unit >= count)
		return 0;
	if (l->spec.tile == 0) /* one page, one group; the last strip is short */
		return (size_t)(unit == count - 1 ? l->data_bytes - unit * l->position_stride
		                                  : l->position_stride);
	sf_layout_unit_pages(l, unit, NULL, &pages);
	return (size_t)(pages * l->page_stride);
}

size_t sf_layout_page_bytes(const sf_layout *l, uint64_t unit)
{
	if (l->spec.tile == 0)
		return sf_layout_unit_bytes(l, unit);
	return unit < sf_layout_unit_count(l) ? (size_t)l->page_stride : 0;
}

uint64_t sf_layout_unit_at(const sf_layout *l, uint64_t off, uint64_t *within)
{
	if (off < l->header_size || off >= sf_layout_file_size(l)) {
		if (within)
			*within = 0;
		return sf_layout_unit_count(l);
	}
	uint64_t rel = off - l->header_size;
	uint64_t in_position = rel % l->position_stride;
	uint64_t group_stride = (uint64_t)l->group_pages * l->page_stride;
	if (within)
		*within = in_position % group_stride;
	return rel / l->position_stride * l->groups + in_position / group_stride;
}

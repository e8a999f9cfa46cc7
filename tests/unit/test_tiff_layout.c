/* test_tiff_layout.c — unit tests of the virtual TIFF layout (tiff_layout.h).
 *
 * With no arguments: checks unit arithmetic (indices, positions, contiguous
 * non-overlapping units ending at file_size), the BigTIFF switch-over,
 * rejection of bad specs, deterministic headers, and reads each header back
 * with libtiff (an independent TIFF reader) to compare every directory and
 * every tile/strip offset and byte count with the layout's arithmetic; and
 * the ImageJ calibration of strip files (deconvolved/ planes).
 *
 * As a tool for the integration tests (tests/integration/test_layout_readers.py):
 *   test_tiff_layout --write PATH [spec options]   write a real file
 *   test_tiff_layout --info [spec options]         print sizes and build time
 * spec options: --width N --height N --pages N --samples 1|3 --dtype u8|u16|f32
 *   --tile N (0: strips) --levels N --bigtiff -1|0|1 --description-file PATH
 *   --resolution X,Y (pixels/cm) --level-sizes W0xH0,W1xH1,...
 *   --imagej PIXEL_UM,SPACING_UM (ImageJ calibration of a strip file)
 * Every sample of the written file is pattern(page, level, x, y, s):
 *   k = x + 3*y + 1009*page + 4099*level + 257*s  (unsigned 32-bit)
 *   uint8: k & 0xff, uint16: k & 0xffff, float32: (k & 0xffffff) * 0.5
 * including the padding of edge tiles (x or y past the level's size). */
#include "scopefs/tiff_layout.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tiffio.h>
#include <time.h>
#include <unistd.h>

static int passed, failed;

static void check(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void check(int ok, const char *fmt, ...)
{
	if (ok) {
		passed++;
		return;
	}
	failed++;
	va_list ap;
	va_start(ap, fmt);
	printf("FAIL: ");
	vprintf(fmt, ap);
	printf("\n");
	va_end(ap);
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static sf_layout_spec tiled_spec(uint32_t w, uint32_t h, uint32_t pages, sf_dtype t, uint32_t tile,
                                 uint32_t levels)
{
	sf_layout_spec s = {.width = w,
	                    .height = h,
	                    .pages = pages,
	                    .samples = 1,
	                    .dtype = t,
	                    .tile = tile,
	                    .levels = levels,
	                    .bigtiff = -1};
	return s;
}

/* ---- unit arithmetic ---- */

static void check_arithmetic(const char *name, const sf_layout *l)
{
	const sf_layout_spec *s = sf_layout_get_spec(l);
	uint64_t count = sf_layout_unit_count(l), expect_count = 0;
	uint32_t group = sf_layout_unit_pages_max(l);
	uint64_t groups = (s->pages + group - 1) / group;
	for (uint32_t i = 0; i < sf_layout_levels(l); i++)
		expect_count += (uint64_t)sf_layout_tiles_across(l, i) * sf_layout_tiles_down(l, i);
	expect_count *= groups;
	check(count == expect_count && count > 0, "%s: %llu units, tiles add up to %llu", name,
	      (unsigned long long)count, (unsigned long long)expect_count);
	check(sf_layout_header_size(l) % 4096 == 0 && sf_layout_header_size(l) >= 4096,
	      "%s: header size %llu not a positive multiple of 4096", name,
	      (unsigned long long)sf_layout_header_size(l));
	check(sf_layout_unit_offset(l, 0) == sf_layout_header_size(l),
	      "%s: unit 0 does not start at the header end", name);

	int bad_pos = 0, bad_gap = 0, bad_at = 0, bad_pages = 0;
	uint64_t end = sf_layout_header_size(l), pixels = 0;
	for (uint64_t u = 0; u < count; u++) {
		uint32_t lv, tx, ty, first, pages;
		uint64_t w;
		sf_layout_unit_pos(l, u, &lv, &tx, &ty);
		sf_layout_unit_pages(l, u, &first, &pages);
		if (lv >= sf_layout_levels(l) ||
		    sf_layout_page_unit(l, lv, tx, ty, first, &w) != u || w != 0 ||
		    first != (u % groups) * group || pages == 0 || pages > group ||
		    (u % groups == 0) != (sf_layout_unit_index(l, lv, tx, ty) == u))
			bad_pos++;
		uint64_t off = sf_layout_unit_offset(l, u), bytes = sf_layout_unit_bytes(l, u);
		if (off != end || bytes == 0)
			bad_gap++;
		end = off + bytes;
		if (sf_layout_unit_at(l, off, &w) != u || w != 0 ||
		    sf_layout_unit_at(l, off + bytes - 1, &w) != u || w != bytes - 1)
			bad_at++;
		if (sf_layout_page_bytes(l, u) * pages != bytes)
			bad_pages++;
		if (s->tile)
			pixels += u % groups ? 0 : (uint64_t)s->tile * s->tile;
		else
			pixels +=
			    bytes / (sf_dtype_bytes(s->dtype) * s->samples * s->width) * s->width;
	}
	check(!bad_pos, "%s: %d units whose position does not map back", name, bad_pos);
	check(!bad_gap, "%s: %d units not contiguous", name, bad_gap);
	check(!bad_at, "%s: unit_at wrong for %d units", name, bad_at);
	check(!bad_pages, "%s: page bytes * pages != unit bytes for %d units", name, bad_pages);
	check(end == sf_layout_file_size(l), "%s: last unit ends at %llu, file size %llu", name,
	      (unsigned long long)end, (unsigned long long)sf_layout_file_size(l));
	if (s->tile == 0)
		check(pixels == (uint64_t)s->width * s->height, "%s: strips hold %llu pixels", name,
		      (unsigned long long)pixels);
	uint64_t w = 1;
	check(sf_layout_unit_at(l, sf_layout_file_size(l), &w) == count && w == 0 &&
	          sf_layout_unit_at(l, sf_layout_header_size(l) - 1, NULL) == count,
	      "%s: unit_at outside the pixel data is not unit_count", name);
	uint32_t lv = 0, tx = 1, ty = 1;
	sf_layout_unit_pos(l, count, &lv, &tx, &ty);
	check(lv == sf_layout_levels(l) && tx == 0 && ty == 0 &&
	          sf_layout_unit_bytes(l, count) == 0 &&
	          sf_layout_unit_offset(l, count) == sf_layout_file_size(l) &&
	          sf_layout_level_width(l, sf_layout_levels(l)) == 0,
	      "%s: out-of-range queries", name);
}

/* ---- libtiff as an independent reader of the header ---- */

struct virtual_file {
	const sf_layout *l;
	uint64_t pos;
};

static tmsize_t vf_read(thandle_t h, void *dst, tmsize_t n)
{
	struct virtual_file *vf = h;
	uint64_t size = sf_layout_file_size(vf->l), hs = sf_layout_header_size(vf->l);
	if (vf->pos >= size)
		return 0;
	uint64_t take = (uint64_t)n < size - vf->pos ? (uint64_t)n : size - vf->pos;
	for (uint64_t i = 0; i < take; i++) /* pixels read as zeros */
		((uint8_t *)dst)[i] = vf->pos + i < hs ? sf_layout_header(vf->l)[vf->pos + i] : 0;
	vf->pos += take;
	return (tmsize_t)take;
}

static tmsize_t vf_write(thandle_t h, void *src, tmsize_t n)
{
	(void)h, (void)src, (void)n;
	return -1;
}

static toff_t vf_seek(thandle_t h, toff_t off, int whence)
{
	struct virtual_file *vf = h;
	uint64_t base = whence == SEEK_CUR   ? vf->pos
	                : whence == SEEK_END ? sf_layout_file_size(vf->l)
	                                     : 0;
	vf->pos = base + off;
	return vf->pos;
}

static int vf_close(thandle_t h)
{
	(void)h;
	return 0;
}

static toff_t vf_size(thandle_t h)
{
	return sf_layout_file_size(((struct virtual_file *)h)->l);
}

static int vf_map(thandle_t h, void **base, toff_t *size)
{
	(void)h, (void)base, (void)size;
	return 0;
}

static void vf_unmap(thandle_t h, void *base, toff_t size)
{
	(void)h, (void)base, (void)size;
}

static int dir_matches(const char *name, TIFF *t, const sf_layout *l, uint32_t page, uint32_t level)
{
	const sf_layout_spec *s = sf_layout_get_spec(l);
	uint32_t w = 0, h = 0, tw = 0, th = 0, rps = 0, subtype = 0;
	uint16_t bits = 0, spp = 0, comp = 0, photo = 0, planar = 0, fmt = 0;
	TIFFGetField(t, TIFFTAG_IMAGEWIDTH, &w);
	TIFFGetField(t, TIFFTAG_IMAGELENGTH, &h);
	TIFFGetFieldDefaulted(t, TIFFTAG_BITSPERSAMPLE, &bits);
	TIFFGetFieldDefaulted(t, TIFFTAG_SAMPLESPERPIXEL, &spp);
	TIFFGetFieldDefaulted(t, TIFFTAG_COMPRESSION, &comp);
	TIFFGetField(t, TIFFTAG_PHOTOMETRIC, &photo);
	TIFFGetFieldDefaulted(t, TIFFTAG_PLANARCONFIG, &planar);
	TIFFGetFieldDefaulted(t, TIFFTAG_SAMPLEFORMAT, &fmt);
	TIFFGetFieldDefaulted(t, TIFFTAG_SUBFILETYPE, &subtype);
	int ok = w == sf_layout_level_width(l, level) && h == sf_layout_level_height(l, level) &&
	         bits == sf_dtype_bytes(s->dtype) * 8 && spp == s->samples &&
	         comp == COMPRESSION_NONE && planar == PLANARCONFIG_CONTIG &&
	         photo == (s->samples == 3 ? PHOTOMETRIC_RGB : PHOTOMETRIC_MINISBLACK) &&
	         fmt == (s->dtype == SF_F32 ? SAMPLEFORMAT_IEEEFP : SAMPLEFORMAT_UINT) &&
	         subtype == (level ? FILETYPE_REDUCEDIMAGE : 0u);
	if (s->tile)
		ok = ok && TIFFIsTiled(t) && TIFFGetField(t, TIFFTAG_TILEWIDTH, &tw) &&
		     TIFFGetField(t, TIFFTAG_TILELENGTH, &th) && tw == s->tile && th == s->tile;
	else
		ok = ok && !TIFFIsTiled(t) && TIFFGetField(t, TIFFTAG_ROWSPERSTRIP, &rps) &&
		     rps == sf_layout_unit_rows(l);
	uint32_t across = sf_layout_tiles_across(l, level), down = sf_layout_tiles_down(l, level);
	ok = ok && (TIFFIsTiled(t) ? TIFFNumberOfTiles(t) : TIFFNumberOfStrips(t)) == across * down;
	int bad_strile = 0;
	for (uint32_t i = 0; ok && i < across * down; i++) {
		uint64_t within;
		uint64_t u = sf_layout_page_unit(l, level, i % across, i / across, page, &within);
		uint64_t bytes = sf_layout_page_bytes(l, u);
		if (TIFFGetStrileOffset(t, i) != sf_layout_unit_offset(l, u) + within ||
		    TIFFGetStrileByteCount(t, i) != bytes)
			bad_strile++;
	}
	check(ok && !bad_strile,
	      "%s: libtiff sees page %u level %u wrong: %ux%u tile %ux%u rows %u bits %u spp %u "
	      "compression %u photometric %u planar %u format %u subfile %u, %u wrong offsets",
	      name, page, level, w, h, tw, th, rps, bits, spp, comp, photo, planar, fmt, subtype,
	      bad_strile);
	return ok && !bad_strile;
}

/* Walk the header with libtiff: pages in the main chain, levels as SubIFDs. */
static void check_with_libtiff(const char *name, const sf_layout *l, const char *description)
{
	const sf_layout_spec *s = sf_layout_get_spec(l);
	struct virtual_file vf = {l, 0};
	TIFF *t = TIFFClientOpen(name, "rmc", &vf, vf_read, vf_write, vf_seek, vf_close, vf_size,
	                         vf_map, vf_unmap);
	check(t != NULL, "%s: libtiff cannot open the header", name);
	if (!t)
		return;
	check(TIFFIsBigEndian(t) == 0 && (TIFFIsBigTIFF(t) != 0) == (sf_layout_is_bigtiff(l) != 0),
	      "%s: byte order or BigTIFF flag differs", name);
	check(TIFFNumberOfDirectories(t) == s->pages, "%s: %u main-chain IFDs, expected %u", name,
	      (unsigned)TIFFNumberOfDirectories(t), s->pages);
	char *text = NULL;
	int has_text = TIFFGetField(t, TIFFTAG_IMAGEDESCRIPTION, &text);
	check(description ? has_text && strcmp(text, description) == 0 : !has_text,
	      "%s: page 0 description differs", name);
	for (uint32_t p = 0; p < s->pages; p++) {
		if (!TIFFSetDirectory(t, (tdir_t)p) || !dir_matches(name, t, l, p, 0))
			break;
		uint16_t n = 0;
		uint64_t *subs = NULL, sub_off[SF_LAYOUT_MAX_LEVELS];
		int has_subs = TIFFGetField(t, TIFFTAG_SUBIFD, &n, &subs);
		check(s->levels > 1 ? has_subs && n == s->levels - 1 : !has_subs,
		      "%s: page %u has %u SubIFDs, expected %u", name, p, n, s->levels - 1);
		if (has_subs)
			memcpy(sub_off, subs, n * sizeof *subs);
		for (uint32_t i = 0; has_subs && i < n && i + 1 < s->levels; i++) {
			int ok = TIFFSetSubDirectory(t, sub_off[i]);
			check(ok, "%s: page %u SubIFD %u unreadable", name, p, i);
			if (!ok || !dir_matches(name, t, l, p, i + 1))
				break;
		}
	}
	TIFFClose(t);
}

/* ---- the test cases ---- */

static sf_layout *build_ok(const char *name, const sf_layout_spec *s)
{
	sf_layout *l = NULL;
	sf_err e = {0};
	int rc = sf_layout_create(s, &l, &e);
	check(rc == SF_OK && l, "%s: create failed: %s", name, e.msg);
	return rc == SF_OK ? l : NULL;
}

static void test_layouts(void)
{
	static const uint32_t lw[] = {1000, 600, 100}, lh[] = {777, 500, 90};
	static const char ome[] = "<?xml version=\"1.0\"?><OME>a description</OME>";
	struct {
		const char *name;
		sf_layout_spec spec;
		const char *description;
	} cases[] = {
	    {"1000x777 u16 x2 tile 256 3 levels", tiled_spec(1000, 777, 2, SF_U16, 256, 3), ome},
	    {"1x1 u8 tile 16", tiled_spec(1, 1, 1, SF_U8, 16, 1), NULL},
	    {"1x1 f32 tile 16 4 levels", tiled_spec(1, 1, 3, SF_F32, 16, 4), NULL},
	    {"512x512 u8 tile 512", tiled_spec(512, 512, 1, SF_U8, 512, 2), NULL},
	    {"1000x777 given level sizes", tiled_spec(1000, 777, 1, SF_U8, 64, 3), NULL},
	    {"RGB 300x200 tile 64", tiled_spec(300, 200, 1, SF_U8, 64, 3), ome},
	    {"strips 1000x777 u8 RGB", tiled_spec(1000, 777, 1, SF_U8, 0, 1), NULL},
	    {"strips 5000x3 f32", tiled_spec(5000, 3, 1, SF_F32, 0, 1), NULL},
	    {"strips 1x1 u16", tiled_spec(1, 1, 1, SF_U16, 0, 1), ome},
	    {"strips 300000x2 f32 (one row > target)", tiled_spec(300000, 2, 1, SF_F32, 0, 1),
	     NULL},
	    {"forced BigTIFF 1000x777 u16 x2", tiled_spec(1000, 777, 2, SF_U16, 256, 3), NULL},
	    {"forced BigTIFF strips", tiled_spec(100, 70, 1, SF_U8, 0, 1), NULL},
	    {"40 pages in groups of 8", tiled_spec(300, 200, 40, SF_U16, 64, 3), ome},
	    {"7 pages in groups of 3, 3, 1", tiled_spec(100, 70, 7, SF_U8, 16, 2), NULL},
	    {"pages bigger than the unit bound", tiled_spec(100, 70, 3, SF_F32, 32, 1), NULL},
	    {"a bound above all pages", tiled_spec(100, 70, 3, SF_U8, 32, 2), NULL},
	};
	cases[4].spec.level_width = lw;
	cases[4].spec.level_height = lh;
	cases[5].spec.samples = 3;
	cases[6].spec.samples = 3;
	cases[6].spec.resolution_x = cases[6].spec.resolution_y = 20000;
	cases[0].spec.resolution_x = 40000;
	cases[0].spec.resolution_y = 30000;
	cases[10].spec.bigtiff = 1;
	cases[11].spec.bigtiff = 1;
	cases[12].spec.unit_bytes_max = 8 * 64 * 64 * 2 + 100; /* 8 pages fit: 5 groups */
	cases[13].spec.unit_bytes_max = 3 * 16 * 16;           /* 3 fit: 3 groups, 3 3 1 */
	cases[14].spec.unit_bytes_max = 100;                   /* 1 page per unit */
	cases[15].spec.unit_bytes_max = 1 << 20;
	static const uint32_t group_pages[] = {8, 3, 1, 3}; /* pages per unit of cases 12.. */
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		cases[i].spec.description = cases[i].description;
		sf_layout *l = build_ok(cases[i].name, &cases[i].spec);
		if (!l)
			continue;
		check(sf_layout_is_bigtiff(l) == (cases[i].spec.bigtiff == 1), "%s: BigTIFF is %d",
		      cases[i].name, sf_layout_is_bigtiff(l));
		uint32_t group = i >= 12 ? group_pages[i - 12] : cases[i].spec.pages;
		check(sf_layout_unit_pages_max(l) == group, "%s: %u pages per unit, expected %u",
		      cases[i].name, sf_layout_unit_pages_max(l), group);
		check_arithmetic(cases[i].name, l);
		check_with_libtiff(cases[i].name, l, cases[i].description);
		sf_layout_free(l);
	}
}

static void test_level_sizes(void)
{
	sf_layout_spec s = tiled_spec(1000, 777, 1, SF_U16, 256, 4);
	sf_layout *l = build_ok("ceil halving", &s);
	if (!l)
		return;
	static const uint32_t w[] = {1000, 500, 250, 125}, h[] = {777, 389, 195, 98};
	static const uint32_t across[] = {4, 2, 1, 1}, down[] = {4, 2, 1, 1};
	int ok = 1;
	for (uint32_t i = 0; i < 4; i++)
		ok = ok && sf_layout_level_width(l, i) == w[i] &&
		     sf_layout_level_height(l, i) == h[i] &&
		     sf_layout_tiles_across(l, i) == across[i] &&
		     sf_layout_tiles_down(l, i) == down[i];
	check(ok, "ceil halving: level sizes or tile counts wrong");
	check(sf_layout_unit_count(l) == 22, "ceil halving: %llu units, expected 22",
	      (unsigned long long)sf_layout_unit_count(l));
	check(sf_layout_unit_index(l, 1, 1, 0) == 17 && sf_layout_unit_index(l, 3, 0, 0) == 21,
	      "ceil halving: unit index order is not level, ty, tx");
	check(sf_layout_page_bytes(l, 0) == 256 * 256 * 2, "ceil halving: page bytes");
	sf_layout_free(l);

	s = tiled_spec(100000, 3, 1, SF_U8, 0, 1);
	l = build_ok("strips 100000x3", &s);
	if (l) {
		check(sf_layout_unit_rows(l) == 2 && sf_layout_unit_count(l) == 2 &&
		          sf_layout_unit_bytes(l, 0) == 200000 &&
		          sf_layout_unit_bytes(l, 1) == 100000,
		      "strips 100000x3: rows per strip %u, last strip %zu bytes",
		      sf_layout_unit_rows(l), sf_layout_unit_bytes(l, 1));
		sf_layout_free(l);
	}
	s = tiled_spec(2048, 4096, 1, SF_U16, 0, 1);
	l = build_ok("strips 2048x4096 u16", &s);
	if (l) {
		size_t strip = sf_layout_unit_bytes(l, 0);
		check(strip >= 64 * 1024 && strip <= 1024 * 1024,
		      "strips 2048x4096 u16: %zu-byte strips, not 64 KiB..1 MiB", strip);
		sf_layout_free(l);
	}
}

static void expect_fail(const char *name, const sf_layout_spec *s, int code)
{
	sf_layout *l = (sf_layout *)&l; /* must be reset to NULL on failure */
	sf_err e = {0};
	int rc = sf_layout_create(s, &l, &e);
	check(rc == code && e.code == code && l == NULL && e.msg[0] != '\0',
	      "%s: got %d (%s), expected %d", name, rc, e.msg, code);
	if (rc == SF_OK)
		sf_layout_free(l);
}

static void test_invalid(void)
{
	static const uint32_t grow_w[] = {1000, 1200}, grow_h[] = {777, 400};
	static const uint32_t off_w[] = {999, 500}, off_h[] = {777, 400};
	static const uint32_t zero_w[] = {1000, 0}, zero_h[] = {777, 1};
	sf_layout_spec good = tiled_spec(1000, 777, 2, SF_U16, 256, 2), s;
#define BAD(label, field, value)                                                                   \
	do {                                                                                       \
		s = good;                                                                          \
		s.field = value;                                                                   \
		expect_fail(label, &s, SF_EINVAL);                                                 \
	} while (0)
	BAD("width 0", width, 0);
	BAD("height 0", height, 0);
	BAD("pages 0", pages, 0);
	BAD("pages 70000", pages, 70000);
	BAD("samples 2", samples, 2);
	BAD("samples 4", samples, 4);
	BAD("dtype 0", dtype, (sf_dtype)0);
	BAD("dtype 9", dtype, (sf_dtype)9);
	BAD("tile 20", tile, 20);
	BAD("tile 8", tile, 8);
	BAD("tile 16384", tile, 16384);
	BAD("levels 0", levels, 0);
	BAD("levels 25", levels, 25);
	BAD("bigtiff 2", bigtiff, 2);
	BAD("resolution NaN", resolution_x, NAN);
	BAD("resolution -1", resolution_y, -1);
	BAD("resolution inf", resolution_y, INFINITY);
	BAD("only level widths", level_width, grow_w);
	BAD("strip file with 2 pages", tile, 0);
	s = good;
	s.pages = 1;
	s.tile = 0;
	expect_fail("strip file with 2 levels", &s, SF_EINVAL);
	s = good;
	s.level_width = grow_w;
	s.level_height = grow_h;
	expect_fail("growing level size", &s, SF_EINVAL);
	s.level_width = off_w;
	s.level_height = off_h;
	expect_fail("level 0 not the image size", &s, SF_EINVAL);
	s.level_width = zero_w;
	s.level_height = zero_h;
	expect_fail("empty level", &s, SF_EINVAL);
	expect_fail("no spec", NULL, SF_EINVAL);
	sf_err e = {0};
	check(sf_layout_create(&good, NULL, &e) == SF_EINVAL, "no result pointer accepted");
	s = tiled_spec(4000000000u, 4000000000u, 1, SF_U8, 16, 1);
	expect_fail("2^55 tiles", &s, SF_ERANGE);
#undef BAD
}

/* A strip file with ImageJ's calibration: tags and description as ImageJ
 * writes them, read back by libtiff; the header still holds every tag and
 * the units start after it; bad calibrations are refused. */
static void test_imagej_calibration(void)
{
	sf_layout_spec s = tiled_spec(301, 260, 1, SF_U16, 0, 1);
	s.imagej_pixel_um = 0.4;
	s.imagej_spacing_um = 1.2;
	sf_layout *l = build_ok("imagej calibration", &s);
	if (l) {
		static const char want[] = "ImageJ=1.11a\nunit=micron\nspacing=1.2\n";
		check_arithmetic("imagej calibration", l);
		check_with_libtiff("imagej calibration", l, want);
		struct virtual_file vf = {l, 0};
		TIFF *t = TIFFClientOpen("imagej", "rmc", &vf, vf_read, vf_write, vf_seek, vf_close,
		                         vf_size, vf_map, vf_unmap);
		float xres = 0, yres = 0;
		uint16_t unit = 0;
		int ok = t && TIFFGetField(t, TIFFTAG_XRESOLUTION, &xres) &&
		         TIFFGetField(t, TIFFTAG_YRESOLUTION, &yres) &&
		         TIFFGetField(t, TIFFTAG_RESOLUTIONUNIT, &unit);
		check(ok && fabsf(xres - 2.5f) < 1e-6f && fabsf(yres - 2.5f) < 1e-6f &&
		          unit == RESUNIT_NONE,
		      "imagej calibration: resolution %g x %g unit %u, want 2.5 x 2.5 unit none",
		      xres, yres, unit);
		if (t)
			TIFFClose(t);
		check(sf_layout_get_spec(l)->description == NULL,
		      "imagej calibration: the built spec keeps no description pointer");
	}
	sf_layout_free(l);
	s.imagej_spacing_um = 0; /* a single plane: pixel size and unit only */
	l = build_ok("imagej pixel only", &s);
	if (l)
		check_with_libtiff("imagej pixel only", l, "ImageJ=1.11a\nunit=micron\n");
	sf_layout_free(l);
	/* Implausible sizes (the deconvolution's own check names them) are left out. */
	s.imagej_pixel_um = 1e-300;
	s.imagej_spacing_um = 1.2;
	l = build_ok("imagej pixel 1e-300", &s);
	if (l)
		check_with_libtiff("imagej pixel 1e-300", l, NULL);
	sf_layout_free(l);
	s.imagej_pixel_um = 0.4;
	s.imagej_spacing_um = 1e300;
	l = build_ok("imagej spacing 1e300", &s);
	if (l)
		check_with_libtiff("imagej spacing 1e300", l, "ImageJ=1.11a\nunit=micron\n");
	sf_layout_free(l);
	sf_layout_spec good = tiled_spec(301, 260, 1, SF_U16, 0, 1), bad;
	good.imagej_pixel_um = 0.4;
	good.imagej_spacing_um = 1.2;
#define BAD(label, field, value)                                                                   \
	do {                                                                                       \
		bad = good;                                                                        \
		bad.field = value;                                                                 \
		expect_fail(label, &bad, SF_EINVAL);                                               \
	} while (0)
	BAD("imagej pixel NaN", imagej_pixel_um, NAN);
	BAD("imagej pixel -1", imagej_pixel_um, -1);
	BAD("imagej spacing inf", imagej_spacing_um, INFINITY);
	BAD("imagej spacing without pixel", imagej_pixel_um, 0);
	BAD("imagej with description", description, "<OME/>");
	BAD("imagej with resolution", resolution_x, 25000);
#undef BAD
	bad = tiled_spec(1000, 777, 1, SF_U16, 256, 1);
	bad.imagej_pixel_um = 0.4;
	expect_fail("imagej on a tiled file", &bad, SF_EINVAL);
}

static void test_bigtiff(void)
{
	const uint64_t four_gib = (uint64_t)1 << 32;
	sf_layout_spec s = tiled_spec(48000, 48000, 4, SF_U16, 512, 7);
	double t0 = now_s();
	sf_layout *l = build_ok("48000x48000x4 u16", &s);
	double dt = now_s() - t0;
	if (l) {
		check(sf_layout_is_bigtiff(l) && sf_layout_file_size(l) > four_gib,
		      "48000x48000x4 u16: BigTIFF %d, size %llu", sf_layout_is_bigtiff(l),
		      (unsigned long long)sf_layout_file_size(l));
		check(dt < 1.0, "48000x48000x4 u16: build took %.3f s", dt);
		check_arithmetic("48000x48000x4 u16", l);
		check_with_libtiff("48000x48000x4 u16", l, NULL);
		sf_layout_free(l);
	}
	s.bigtiff = 0;
	expect_fail("48000x48000x4 u16 bigtiff=0", &s, SF_ERANGE);

	s = tiled_spec(4000, 3000, 3, SF_U16, 512, 4);
	l = build_ok("4000x3000x3 u16", &s);
	if (l) {
		check(!sf_layout_is_bigtiff(l), "4000x3000x3 u16: BigTIFF for a small file");
		sf_layout_free(l);
	}

	/* 65535 tiles of 64 KiB: pixels 2^32 - 2^16 bytes fit, but the classic
	 * header pushes the file past 4 GiB, so the header is rebuilt. */
	s = tiled_spec(255 * 256, 257 * 256, 1, SF_U8, 256, 1);
	l = build_ok("just under 4 GiB of pixels", &s);
	if (l) {
		check(sf_layout_is_bigtiff(l) && sf_layout_file_size(l) > four_gib,
		      "just under 4 GiB of pixels: BigTIFF %d, size %llu", sf_layout_is_bigtiff(l),
		      (unsigned long long)sf_layout_file_size(l));
		check_arithmetic("just under 4 GiB of pixels", l);
		sf_layout_free(l);
	}
	s.bigtiff = 0;
	expect_fail("just under 4 GiB of pixels, bigtiff=0", &s, SF_ERANGE);
	s = tiled_spec(255 * 256, 255 * 256, 1, SF_U8, 256, 1);
	l = build_ok("classic near 4 GiB", &s);
	if (l) {
		check(!sf_layout_is_bigtiff(l) && sf_layout_file_size(l) <= UINT32_MAX,
		      "classic near 4 GiB: BigTIFF %d, size %llu", sf_layout_is_bigtiff(l),
		      (unsigned long long)sf_layout_file_size(l));
		check_with_libtiff("classic near 4 GiB", l, NULL);
		sf_layout_free(l);
	}

	/* strip files (ImageJ) stay classic unless forced */
	s = tiled_spec(65535, 65537, 1, SF_U8, 0, 1); /* 2^32 - 1 bytes of pixels */
	expect_fail("strips 65535x65537 bigtiff=-1", &s, SF_ERANGE);
	s.bigtiff = 0;
	expect_fail("strips 65535x65537 bigtiff=0", &s, SF_ERANGE);
	s.bigtiff = 1;
	l = build_ok("strips 65535x65537 forced", &s);
	if (l) {
		check(sf_layout_is_bigtiff(l), "strips 65535x65537 forced: not BigTIFF");
		check_arithmetic("strips 65535x65537 forced", l);
		check_with_libtiff("strips 65535x65537 forced", l, NULL);
		sf_layout_free(l);
	}
	s = tiled_spec(70000, 70000, 1, SF_U8, 0, 1);
	expect_fail("strips 70000x70000", &s, SF_ERANGE);
}

static double best_build_s(const sf_layout_spec *s)
{
	double best = 1e9;
	for (int i = 0; i < 3; i++) {
		sf_layout *l = NULL;
		double t0 = now_s();
		int rc = sf_layout_create(s, &l, NULL);
		double dt = now_s() - t0;
		sf_layout_free(l);
		if (rc != SF_OK)
			return -1;
		best = dt < best ? dt : best;
	}
	return best;
}

/* Header building must be linear in pages (libtiff's TIFFSetSubDirectory
 * rescans the main chain: using it per SubIFD made this quadratic). */
static void test_linear_in_pages(void)
{
	sf_layout_spec s = tiled_spec(1024, 1024, 500, SF_U16, 512, 3);
	double small = best_build_s(&s);
	s.pages = 4000;
	double large = best_build_s(&s);
	/* linear: 8x; the quadratic version measured 38x */
	check(small > 0 && large > 0 && large < 20 * small + 0.005,
	      "500 pages: %.1f ms, 4000 pages: %.1f ms (linear would be 8x)", small * 1e3,
	      large * 1e3);
}

static void test_deterministic(void)
{
	static const char ome[] = "<OME>same</OME>";
	sf_layout_spec s = tiled_spec(3000, 2000, 3, SF_F32, 256, 4);
	s.description = ome;
	s.resolution_x = s.resolution_y = 12345.5;
	sf_layout *a = build_ok("deterministic a", &s);
	sf_layout *b = build_ok("deterministic b", &s);
	if (a && b)
		check(sf_layout_header_size(a) == sf_layout_header_size(b) &&
		          memcmp(sf_layout_header(a), sf_layout_header(b),
		                 sf_layout_header_size(a)) == 0,
		      "deterministic: two builds differ");
	sf_layout_free(a);
	sf_layout_free(b);
}

static int run_tests(void)
{
	test_layouts();
	test_level_sizes();
	test_invalid();
	test_imagej_calibration();
	test_bigtiff();
	test_linear_in_pages();
	test_deterministic();
	printf("test_tiff_layout: %d passed, %d failed\n", passed, failed);
	return failed != 0;
}

/* ---- --write / --info: the tool the integration tests drive ---- */

static uint32_t pattern_key(uint32_t page, uint32_t level, uint32_t x, uint32_t y, uint32_t s)
{
	return x + 3u * y + 1009u * page + 4099u * level + 257u * s;
}

static void put_sample(uint8_t *dst, sf_dtype t, uint32_t k)
{
	if (t == SF_U8) {
		*dst = (uint8_t)k;
	} else if (t == SF_U16) {
		uint16_t v = (uint16_t)k;
		memcpy(dst, &v, 2);
	} else {
		float v = (float)(k & 0xffffffu) * 0.5f;
		memcpy(dst, &v, 4);
	}
}

/* Fill rows x cols pixels of (page, level) starting at (x0, y0). */
static void fill_block(uint8_t *dst, const sf_layout_spec *s, uint32_t page, uint32_t level,
                       uint32_t x0, uint32_t y0, uint32_t cols, uint32_t rows)
{
	size_t bytes = sf_dtype_bytes(s->dtype);
	for (uint32_t y = 0; y < rows; y++)
		for (uint32_t x = 0; x < cols; x++)
			for (uint32_t c = 0; c < s->samples; c++, dst += bytes)
				put_sample(dst, s->dtype,
				           pattern_key(page, level, x0 + x, y0 + y, c));
}

static int write_file(const char *path, const sf_layout *l)
{
	const sf_layout_spec *s = sf_layout_get_spec(l);
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0) {
		fprintf(stderr, "%s: %s\n", path, strerror(errno));
		return 1;
	}
	int rc = ftruncate(fd, (off_t)sf_layout_file_size(l)) != 0 ||
	         pwrite(fd, sf_layout_header(l), sf_layout_header_size(l), 0) !=
	             (ssize_t)sf_layout_header_size(l);
	size_t row_bytes = (size_t)s->width * s->samples * sf_dtype_bytes(s->dtype);
	uint8_t *buf = malloc(sf_layout_unit_bytes(l, 0));
	rc = rc || !buf;
	for (uint64_t u = 0; !rc && u < sf_layout_unit_count(l); u++) {
		uint32_t lv, tx, ty, first, pages, rows = sf_layout_unit_rows(l);
		sf_layout_unit_pos(l, u, &lv, &tx, &ty);
		sf_layout_unit_pages(l, u, &first, &pages);
		size_t page_bytes = sf_layout_page_bytes(l, u), bytes = sf_layout_unit_bytes(l, u);
		for (uint32_t p = first; p < first + pages; p++) {
			if (s->tile)
				fill_block(buf + (p - first) * page_bytes, s, p, lv, tx * s->tile,
				           ty * s->tile, s->tile, s->tile);
			else /* a strip: the last one holds fewer rows */
				fill_block(buf, s, 0, 0, 0, ty * rows, s->width,
				           (uint32_t)(bytes / row_bytes));
		}
		rc = pwrite(fd, buf, bytes, (off_t)sf_layout_unit_offset(l, u)) != (ssize_t)bytes;
	}
	free(buf);
	if (close(fd) != 0 || rc) {
		fprintf(stderr, "%s: write failed\n", path);
		return 1;
	}
	return 0;
}

static char *read_text(const char *path)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return NULL;
	char *text = NULL;
	size_t len = 0;
	FILE *mem = open_memstream(&text, &len);
	int ch;
	while (mem && (ch = fgetc(f)) != EOF)
		fputc(ch, mem);
	fclose(f);
	if (mem)
		fclose(mem);
	return text;
}

static int parse_sizes(const char *arg, uint32_t *w, uint32_t *h, uint32_t *n)
{
	*n = 0;
	while (*arg && *n < SF_LAYOUT_MAX_LEVELS) {
		char *end;
		w[*n] = (uint32_t)strtoul(arg, &end, 10);
		if (*end != 'x')
			return -1;
		h[*n] = (uint32_t)strtoul(end + 1, &end, 10);
		(*n)++;
		if (*end == ',')
			end++;
		else if (*end)
			return -1;
		arg = end;
	}
	return 0;
}

static int run_tool(int argc, char **argv)
{
	sf_layout_spec s = tiled_spec(0, 0, 1, SF_U8, 512, 1);
	uint32_t lw[SF_LAYOUT_MAX_LEVELS], lh[SF_LAYOUT_MAX_LEVELS];
	uint32_t nsizes = 0;
	char *description = NULL;
	const char *path = NULL;
	int info = strcmp(argv[1], "--info") == 0, i = 2;
	if (!info)
		path = argc > 2 ? argv[i++] : NULL;
	for (; i + 1 < argc; i += 2) {
		const char *k = argv[i], *v = argv[i + 1];
		if (!strcmp(k, "--width"))
			s.width = (uint32_t)strtoul(v, NULL, 10);
		else if (!strcmp(k, "--height"))
			s.height = (uint32_t)strtoul(v, NULL, 10);
		else if (!strcmp(k, "--pages"))
			s.pages = (uint32_t)strtoul(v, NULL, 10);
		else if (!strcmp(k, "--samples"))
			s.samples = (uint32_t)strtoul(v, NULL, 10);
		else if (!strcmp(k, "--tile"))
			s.tile = (uint32_t)strtoul(v, NULL, 10);
		else if (!strcmp(k, "--levels"))
			s.levels = (uint32_t)strtoul(v, NULL, 10);
		else if (!strcmp(k, "--bigtiff"))
			s.bigtiff = atoi(v);
		else if (!strcmp(k, "--unit-bytes-max"))
			s.unit_bytes_max = strtoull(v, NULL, 10);
		else if (!strcmp(k, "--dtype"))
			s.dtype = !strcmp(v, "u8")    ? SF_U8
			          : !strcmp(v, "u16") ? SF_U16
			          : !strcmp(v, "f32") ? SF_F32
			                              : (sf_dtype)0;
		else if (!strcmp(k, "--resolution"))
			sscanf(v, "%lf,%lf", &s.resolution_x, &s.resolution_y);
		else if (!strcmp(k, "--imagej"))
			sscanf(v, "%lf,%lf", &s.imagej_pixel_um, &s.imagej_spacing_um);
		else if (!strcmp(k, "--level-sizes") && parse_sizes(v, lw, lh, &nsizes) == 0)
			s.level_width = lw, s.level_height = lh;
		else if (!strcmp(k, "--description-file") && !description &&
		         (description = read_text(v)) != NULL)
			s.description = description;
		else
			break;
	}
	if (i != argc || (!info && !path)) {
		fprintf(stderr,
		        "usage: %s --write PATH|--info [--width N --height N --pages N "
		        "--samples 1|3 --dtype u8|u16|f32 --tile N --levels N --bigtiff "
		        "-1|0|1 --description-file PATH --resolution X,Y --level-sizes "
		        "WxH,... --unit-bytes-max N --imagej PIXEL_UM,SPACING_UM]\n",
		        argv[0]);
		free(description);
		return 2;
	}
	sf_layout *l = NULL;
	sf_err e = {0};
	double t0 = now_s();
	int rc = sf_layout_create(&s, &l, &e);
	double dt = now_s() - t0;
	free(description);
	if (rc != SF_OK) {
		fprintf(stderr, "error %s: %s\n", sf_code_name(rc), e.msg);
		return 3;
	}
	printf("header_size=%llu file_size=%llu bigtiff=%d units=%llu unit_rows=%u build_ms=%.3f\n",
	       (unsigned long long)sf_layout_header_size(l),
	       (unsigned long long)sf_layout_file_size(l), sf_layout_is_bigtiff(l),
	       (unsigned long long)sf_layout_unit_count(l), sf_layout_unit_rows(l), dt * 1e3);
	rc = info ? 0 : write_file(path, l);
	sf_layout_free(l);
	return rc;
}

int main(int argc, char **argv)
{
	if (argc > 1 && (!strcmp(argv[1], "--write") || !strcmp(argv[1], "--info")))
		return run_tool(argc, argv);
	if (argc > 1) {
		fprintf(stderr, "usage: %s [--write PATH|--info spec options]\n", argv[0]);
		return 2;
	}
	return run_tests();
}

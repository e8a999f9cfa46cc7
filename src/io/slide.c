/* slide.c — probe TIFF-family slides and read regions from them with libtiff.
 *
 * Probing opens the file once, walks the main IFD chain, describes every page
 * (size, sample type, tiling, NewSubfileType, SubIFDs) and then picks one
 * layout (see slide.h and docs/dataset.md):
 *   OME / SubIFD  channels are the leading main-chain pages of page 0's size
 *                 and type; level l > 0 of channel c is SubIFD l-1 of page c;
 *   SVS           level 0 is page 0, further levels are the later tiled pages
 *                 (stripped pages and labels and macros, also tiled ones, are
 *                 skipped);
 *   PAGES         one channel; later main-chain pages of the same type that
 *                 keep shrinking are the levels (libvips / OpenSlide layout),
 *                 up to the first that is not one (e.g. a label);
 *   FLAT          one level; the leading pages of page 0's size and type are
 *                 the channels (or z-planes).
 * An SVS or PAGES level keeps level 0's aspect ratio and is no associated
 * image (label, macro, thumbnail: see is_associated).
 * Invariants the reader relies on:
 *  - every IFD a level names (each channel's, not only the first's) has
 *    level 0's sample type, samples per pixel and photometric class, a codec
 *    this libtiff has and compressed units of at most MAX_UNIT, and every
 *    channel of a level has that level's size;
 *  - levels shrink: each is no larger than the one before in both axes;
 *  - every tile or strip of every IFD used lies inside the file, so a
 *    truncated file is refused at probe time rather than in the middle of a
 *    read.
 *
 * A reader owns one TIFF handle (libtiff handles are not thread-safe) and
 * remembers the current IFD by its offset, so a directory is re-read only
 * when the level or channel changes.  Uncompressed tiles and strips are read
 * straight from the file with pread, only the bytes the rect needs.
 * Compressed ones are decoded whole into the slide's share of decoded units
 * (below), used by every reader of the slide, since neighbouring output
 * tiles of a resampled level touch the same source tiles; a reader falls
 * back to its own small LRU when the share cannot take a unit.
 *
 * libtiff's messages go to a per-handle buffer (TIFFOpenOptions, libtiff
 * 4.5), never to stderr, and end up in our sf_err message. */
#include "scopefs/slide.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <tiffio.h>

#include "scopefs/log.h"
#include "scopefs/utf8.h"

#define MAX_PAGES     (1u << 20)  /* more main-chain pages than this: refuse */
#define MAX_ALLOC     (1ll << 30) /* libtiff's cap on one allocation (corrupt headers) */
#define LRU_SLOTS     16          /* decoded tiles or strips kept per reader */
#define LRU_BUDGET    (48u << 20) /* bytes of decoded data kept per reader */
#define SPAN_READ_MAX (1u << 20)  /* uncompressed rows read in one pread up to this size */
/* ... or up to SPAN_READ_CAP when each row skips at most SPAN_SKIP_MAX bytes:
 * one pread of a 306-row span of 4 KiB rows (a deconvolution window of a
 * 2048-wide uint16 plane) took 65 us against 147 us for 306 row preads of
 * 612 bytes; at 8 KiB rows the two were even, at 16 KiB the rows won 2:1. */
#define SPAN_SKIP_MAX 4096u
#define SPAN_READ_CAP (16u << 20)
#define MAX_UNIT      (256u << 20) /* largest compressed tile or strip we decode whole */
#define SHARE_SLOTS   256          /* decoded units kept per slide for all its readers */
#define SHARE_BUDGET  (64u << 20)  /* bytes of them, all slides together */
#define ASPECT_SLACK  0.01         /* relative slack of a level's aspect ratio (keeps_aspect) */

/* ---- libtiff diagnostics ------------------------------------------------ */

/* Where libtiff reports for one handle.  Keeps the first error since the
 * last clear: it is the specific one ("Invalid tile byte count"), later ones
 * are generic ("Failed to read directory"). */
typedef struct tiff_diag {
	const char *path; /* dropped from the front of libtiff's messages */
	char msg[256];
} tiff_diag;

static int diag_on_error(TIFF *tif, void *user, const char *module, const char *fmt, va_list ap)
{
	tiff_diag *d = user;
	(void)tif;
	(void)module;
	if (!d || d->msg[0] != '\0')
		return 1;
	char text[sizeof d->msg];
	vsnprintf(text, sizeof text, fmt, ap);
	size_t n = d->path ? strlen(d->path) : 0;
	const char *t = text;
	if (n && strncmp(t, d->path, n) == 0 && t[n] == ':')
		t += n + 1 + (t[n + 1] == ' ');
	snprintf(d->msg, sizeof d->msg, "%s", t);
	return 1; /* handled: keep libtiff's global stderr handler out of it */
}

static int diag_on_warning(TIFF *tif, void *user, const char *module, const char *fmt, va_list ap)
{
	(void)tif;
	(void)user;
	(void)module;
	(void)fmt;
	(void)ap;
	return 1; /* unknown tags and the like: not worth a line per file */
}

static const char *diag_text(const tiff_diag *d)
{
	return d->msg[0] ? d->msg : "no detail from libtiff";
}

/* ---- opening ------------------------------------------------------------- */

static int check_signature(int fd, const char *path, off_t size, sf_err *e)
{
	unsigned char sig[4];
	if (size == 0)
		return sf_fail(e, SF_EFORMAT, "%s: empty file (0 bytes), not a TIFF", path);
	if (size < 8)
		return sf_fail(e, SF_EFORMAT, "%s: %lld bytes, too short for a TIFF header", path,
		               (long long)size);
	ssize_t n = pread(fd, sig, sizeof sig, 0);
	if (n < 0)
		return sf_fail(e, SF_EIO, "%s: cannot read: %s", path, strerror(errno));
	if (n != (ssize_t)sizeof sig)
		return sf_fail(e, SF_EFORMAT, "%s: truncated TIFF header", path);
	int le = sig[0] == 'I' && sig[1] == 'I' && (sig[2] == 42 || sig[2] == 43) && sig[3] == 0;
	int be = sig[0] == 'M' && sig[1] == 'M' && sig[2] == 0 && (sig[3] == 42 || sig[3] == 43);
	if (!le && !be)
		return sf_fail(e, SF_EFORMAT, "%s: not a TIFF (no II*/MM* signature)", path);
	/* The first IFD must start inside the file: the usual symptom of a
	 * copy cut short, since most writers put IFDs after the pixel data. */
	unsigned char raw[8];
	int big = (le ? sig[2] : sig[3]) == 43;
	if (big && size < 16)
		return sf_fail(e, SF_EFORMAT, "%s: truncated BigTIFF header", path);
	if (pread(fd, raw, big ? 8 : 4, big ? 8 : 4) != (big ? 8 : 4))
		return sf_fail(e, SF_EIO, "%s: cannot read the TIFF header", path);
	uint64_t first = 0;
	for (int i = 0, n = big ? 8 : 4; i < n; i++)
		first |= (uint64_t)raw[le ? i : n - 1 - i] << (8 * i);
	if (first >= (uint64_t)size)
		return sf_fail(e, SF_EFORMAT,
		               "%s: truncated: the first IFD is at byte %llu, the file has %lld",
		               path, (unsigned long long)first, (long long)size);
	return SF_OK;
}

/* Open path read-only as a TIFF whose messages go to diag (which must
 * outlive the handle).  Fills st from fstat. */
static int open_tiff(const char *path, tiff_diag *diag, TIFF **out, struct stat *st, sf_err *e)
{
	*out = NULL;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return sf_fail(e, errno == ENOENT ? SF_ENOTFOUND : SF_EIO, "%s: cannot open: %s",
		               path, strerror(errno));
	int rc = SF_OK;
	if (fstat(fd, st) != 0)
		rc = sf_fail(e, SF_EIO, "%s: cannot stat: %s", path, strerror(errno));
	else if (!S_ISREG(st->st_mode))
		rc = sf_fail(e, SF_EFORMAT, "%s: not a regular file", path);
	else
		rc = check_signature(fd, path, st->st_size, e);
	if (rc) {
		close(fd);
		return rc;
	}
	TIFFOpenOptions *opts = TIFFOpenOptionsAlloc();
	if (!opts) {
		close(fd);
		return sf_fail(e, SF_ENOMEM, "%s: out of memory opening TIFF", path);
	}
	TIFFOpenOptionsSetErrorHandlerExtR(opts, diag_on_error, diag);
	TIFFOpenOptionsSetWarningHandlerExtR(opts, diag_on_warning, diag);
	TIFFOpenOptionsSetMaxSingleMemAlloc(opts, MAX_ALLOC);
	diag->msg[0] = '\0';
	diag->path = path;
	/* "m": no mmap, so a file cut short under us gives a read error, not
	 * SIGBUS.  "O": load tile offsets on demand, not whole arrays per
	 * directory switch (a WSI level can have 10^5 tiles). */
	TIFF *tif = TIFFFdOpenExt(fd, path, "rmO", opts);
	TIFFOpenOptionsFree(opts);
	if (!tif) {
		close(fd); /* TIFFFdOpen leaves the descriptor open when it fails */
		return sf_fail(e, SF_EFORMAT, "%s: not a readable TIFF (truncated or corrupt): %s",
		               path, diag_text(diag));
	}
	*out = tif;
	return SF_OK;
}

/* ---- page descriptions --------------------------------------------------- */

typedef struct page_desc {
	uint64_t offset; /* IFD offset */
	uint32_t width, height;
	int tiled;
	uint32_t tile_w, tile_h, rows_per_strip;
	uint16_t bps, spp, sample_format, photometric, planar, compression, fill_order;
	uint32_t subfile_type;
	uint16_t subifd_count;
	uint64_t *subifds; /* subifd_count offsets, owned */
	float xres, yres;
	uint16_t res_unit;    /* RESUNIT_INCH when absent (the TIFF default) */
	int has_res_unit;     /* the ResolutionUnit tag is present */
	uint16_t orientation; /* TIFF Orientation; 1 when absent */
	int named_associated; /* its description calls it a label, macro or thumbnail */
} page_desc;

/* The word w (case ignored) occurs in the first two lines of desc, bounded
 * by non-letters. */
static int has_word_early(const char *desc, const char *w)
{
	size_t n = strlen(w);
	int lines = 0;
	for (const char *p = desc; *p && lines < 2; p++) {
		if (*p == '\n')
			lines++;
		int starts = p == desc || !isalpha((unsigned char)p[-1]);
		if (starts && strncasecmp(p, w, n) == 0 && !isalpha((unsigned char)p[n]))
			return 1;
	}
	return 0;
}

/* A page whose description names it an associated image, not a level:
 * Aperio writes "Aperio Image Library v10.0.51\r\nlabel 387x463" (OpenSlide
 * names associated images by that first word), other writers "label". */
static int names_associated(const char *desc)
{
	return has_word_early(desc, "label") || has_word_early(desc, "macro") ||
	       has_word_early(desc, "thumbnail");
}

/* An unsigned integer of n bytes (2 or 8) in the file's byte order. */
static uint64_t file_uint(const uint8_t *b, int n, int big_endian)
{
	uint64_t v = 0;

	for (int i = 0; i < n; i++)
		v |= (uint64_t)b[big_endian ? i : n - 1 - i] << (8 * (n - 1 - i));
	return v;
}

/* The ResolutionUnit value stored in the current directory, read from the
 * file itself; 0 when it has none.  For when TIFFGetField says there is no
 * such tag: libtiff drops a value other than 1-3 (with an error in its
 * log), and the TIFF default, inch, would then apply to the resolution.
 * tifffile writes 4 (millimetre) and 5 (micrometre) when asked: read as
 * inch, 4000 px/mm became 6.35 um, plausible and 25x wrong. */
static uint16_t stored_res_unit(TIFF *tif)
{
	int big = TIFFIsBigTIFF(tif), be = TIFFIsBigEndian(tif);
	size_t head = big ? 8 : 2, entry = big ? 20 : 12;
	uint64_t off = TIFFCurrentDirOffset(tif), count;
	uint8_t b[20];

	if (pread(TIFFFileno(tif), b, head, (off_t)off) != (ssize_t)head)
		return 0;
	count = file_uint(b, (int)head, be);
	for (uint64_t i = 0; i < count && i < 4096; i++) {
		if (pread(TIFFFileno(tif), b, entry, (off_t)(off + head + i * entry)) !=
		    (ssize_t)entry)
			return 0;
		if (file_uint(b, 2, be) == TIFFTAG_RESOLUTIONUNIT &&
		    file_uint(b + 2, 2, be) == TIFF_SHORT)
			return (uint16_t)file_uint(b + (big ? 12 : 8), 2, be);
	}
	return 0;
}

/* Describe the current directory.  Never fails on absent optional tags. */
static int describe_page(TIFF *tif, const char *path, const char *where, page_desc *p, sf_err *e)
{
	memset(p, 0, sizeof *p);
	p->offset = TIFFCurrentDirOffset(tif);
	if (!TIFFGetField(tif, TIFFTAG_IMAGEWIDTH, &p->width) ||
	    !TIFFGetField(tif, TIFFTAG_IMAGELENGTH, &p->height) || !p->width || !p->height)
		return sf_fail(e, SF_EFORMAT, "%s: %s: no image size", path, where);
	p->tiled = TIFFIsTiled(tif);
	if (p->tiled) {
		if (!TIFFGetField(tif, TIFFTAG_TILEWIDTH, &p->tile_w) ||
		    !TIFFGetField(tif, TIFFTAG_TILELENGTH, &p->tile_h) || !p->tile_w || !p->tile_h)
			return sf_fail(e, SF_EFORMAT, "%s: %s: tiled without a tile size", path,
			               where);
	} else {
		TIFFGetFieldDefaulted(tif, TIFFTAG_ROWSPERSTRIP, &p->rows_per_strip);
		if (p->rows_per_strip == 0 || p->rows_per_strip > p->height)
			p->rows_per_strip = p->height;
	}
	TIFFGetFieldDefaulted(tif, TIFFTAG_BITSPERSAMPLE, &p->bps);
	TIFFGetFieldDefaulted(tif, TIFFTAG_SAMPLESPERPIXEL, &p->spp);
	TIFFGetFieldDefaulted(tif, TIFFTAG_SAMPLEFORMAT, &p->sample_format);
	TIFFGetFieldDefaulted(tif, TIFFTAG_PLANARCONFIG, &p->planar);
	TIFFGetFieldDefaulted(tif, TIFFTAG_COMPRESSION, &p->compression);
	TIFFGetFieldDefaulted(tif, TIFFTAG_FILLORDER, &p->fill_order);
	TIFFGetFieldDefaulted(tif, TIFFTAG_SUBFILETYPE, &p->subfile_type);
	if (!TIFFGetField(tif, TIFFTAG_PHOTOMETRIC, &p->photometric))
		p->photometric = p->spp >= 3 ? PHOTOMETRIC_RGB : PHOTOMETRIC_MINISBLACK;
	if (!TIFFGetField(tif, TIFFTAG_XRESOLUTION, &p->xres))
		p->xres = 0;
	if (!TIFFGetField(tif, TIFFTAG_YRESOLUTION, &p->yres))
		p->yres = 0;
	p->has_res_unit = TIFFGetField(tif, TIFFTAG_RESOLUTIONUNIT, &p->res_unit);
	if (!p->has_res_unit && p->xres > 0 && (p->res_unit = stored_res_unit(tif)) != 0)
		p->has_res_unit = 1;
	if (!p->has_res_unit)
		p->res_unit = RESUNIT_INCH;
	if (!TIFFGetField(tif, TIFFTAG_ORIENTATION, &p->orientation) || p->orientation == 0)
		p->orientation = ORIENTATION_TOPLEFT;
	char *desc = NULL;
	p->named_associated =
	    TIFFGetField(tif, TIFFTAG_IMAGEDESCRIPTION, &desc) && desc && names_associated(desc);
	uint16_t n = 0;
	uint64_t *offs = NULL;
	if (TIFFGetField(tif, TIFFTAG_SUBIFD, &n, &offs) && n > 0 && offs) {
		p->subifds = malloc(n * sizeof *p->subifds);
		if (!p->subifds)
			return sf_fail(e, SF_ENOMEM, "%s: out of memory", path);
		memcpy(p->subifds, offs, n * sizeof *offs);
		p->subifd_count = n;
	}
	return SF_OK;
}

/* Every tile or strip of the current directory must lie inside the file. */
static int check_striles(TIFF *tif, const char *path, const char *where, uint64_t file_size,
                         sf_err *e)
{
	/* TIFFNumberOfStrips counts by RowsPerStrip even for tiled IFDs. */
	uint32_t n = TIFFIsTiled(tif) ? TIFFNumberOfTiles(tif) : TIFFNumberOfStrips(tif);
	const char *unit = TIFFIsTiled(tif) ? "tile" : "strip";
	if (n == 0)
		return sf_fail(e, SF_EFORMAT, "%s: %s: no %ss", path, where, unit);
	for (uint32_t i = 0; i < n; i++) {
		int err = 0;
		uint64_t off = TIFFGetStrileOffsetWithErr(tif, i, &err);
		uint64_t len = err ? 0 : TIFFGetStrileByteCountWithErr(tif, i, &err);
		if (err)
			return sf_fail(e, SF_EFORMAT, "%s: %s: cannot read the offset of %s %u",
			               path, where, unit, i);
		if (len == 0)
			continue; /* sparse: no data, reads as zeros */
		if (off > file_size || len > file_size - off)
			return sf_fail(
			    e, SF_EFORMAT,
			    "%s: truncated: %s %s %u ends at byte %llu, the file has %llu", path,
			    where, unit, i, (unsigned long long)(off + len),
			    (unsigned long long)file_size);
	}
	return SF_OK;
}

static void pages_free(page_desc *pages, uint32_t n)
{
	for (uint32_t i = 0; pages && i < n; i++)
		free(pages[i].subifds);
	free(pages);
}

/* Walk the main chain from the current (first) directory to its end. */
static int read_main_chain(TIFF *tif, const char *path, tiff_diag *diag, uint64_t file_size,
                           page_desc **out, uint32_t *count, sf_err *e)
{
	page_desc *pages = NULL;
	uint32_t n = 0, cap = 0;
	int rc = SF_OK;
	for (;;) {
		char where[32];
		snprintf(where, sizeof where, "page %u", n);
		if (n == cap) {
			uint32_t ncap = cap ? cap * 2 : 8;
			page_desc *np = realloc(pages, ncap * sizeof *np);
			if (!np) {
				rc = sf_fail(e, SF_ENOMEM, "%s: out of memory", path);
				break;
			}
			pages = np;
			cap = ncap;
		}
		rc = describe_page(tif, path, where, &pages[n], e);
		if (rc)
			break;
		n++;
		rc = check_striles(tif, path, where, file_size, e);
		if (rc || TIFFLastDirectory(tif))
			break;
		if (n >= MAX_PAGES) {
			rc = sf_fail(e, SF_EUNSUPPORTED, "%s: more than %u pages", path, MAX_PAGES);
			break;
		}
		diag->msg[0] = '\0';
		if (!TIFFReadDirectory(tif)) {
			rc = sf_fail(e, SF_EFORMAT, "%s: cannot read IFD %u (truncated?): %s", path,
			             n, diag_text(diag));
			break;
		}
	}
	if (rc) {
		pages_free(pages, n);
		return rc;
	}
	*out = pages;
	*count = n;
	return SF_OK;
}

/* ---- sample types -------------------------------------------------------- */

static int is_ycbcr_jpeg(const page_desc *p)
{
	return p->photometric == PHOTOMETRIC_YCBCR && p->compression == COMPRESSION_JPEG;
}

/* The dtype and samples per pixel the reader delivers for page p, or
 * SF_EUNSUPPORTED naming what is wrong. */
static int pixel_type(const char *path, const char *where, const page_desc *p, sf_dtype *dtype,
                      uint32_t *samples, sf_err *e)
{
	if (p->compression != COMPRESSION_NONE && !TIFFIsCODECConfigured(p->compression))
		return sf_fail(e, SF_EUNSUPPORTED,
		               "%s: %s: compression %u cannot be decoded by this libtiff", path,
		               where, p->compression);
	if (p->bps == 1)
		return sf_fail(e, SF_EUNSUPPORTED,
		               "%s: %s: bilevel (1-bit) images are not supported", path, where);
	if (p->photometric == PHOTOMETRIC_PALETTE)
		return sf_fail(e, SF_EUNSUPPORTED, "%s: %s: palette images are not supported", path,
		               where);
	if (p->spp == 1) {
		if (p->photometric == PHOTOMETRIC_MINISWHITE)
			return sf_fail(e, SF_EUNSUPPORTED,
			               "%s: %s: min-is-white images are not supported", path,
			               where);
		if (p->photometric != PHOTOMETRIC_MINISBLACK)
			return sf_fail(e, SF_EUNSUPPORTED,
			               "%s: %s: photometric %u with one sample is not supported",
			               path, where, p->photometric);
	} else if (p->spp == 3) {
		if (p->photometric == PHOTOMETRIC_YCBCR && !is_ycbcr_jpeg(p))
			return sf_fail(e, SF_EUNSUPPORTED,
			               "%s: %s: YCbCr outside JPEG compression is not supported",
			               path, where);
		if (p->photometric != PHOTOMETRIC_RGB && !is_ycbcr_jpeg(p))
			return sf_fail(e, SF_EUNSUPPORTED,
			               "%s: %s: photometric %u with 3 samples is not supported",
			               path, where, p->photometric);
		if (p->planar != PLANARCONFIG_CONTIG)
			return sf_fail(e, SF_EUNSUPPORTED,
			               "%s: %s: planar (separate) RGB is not supported", path,
			               where);
	} else {
		return sf_fail(e, SF_EUNSUPPORTED,
		               "%s: %s: %u samples per pixel are not supported (1 or 3)", path,
		               where, p->spp);
	}
	int is_uint =
	    p->sample_format == SAMPLEFORMAT_UINT || p->sample_format == SAMPLEFORMAT_VOID;
	if (p->bps == 8 && is_uint)
		*dtype = SF_U8;
	else if (p->bps == 16 && is_uint)
		*dtype = SF_U16;
	else if (p->bps == 32 && p->sample_format == SAMPLEFORMAT_IEEEFP)
		*dtype = SF_F32;
	else {
		const char *kind = p->sample_format == SAMPLEFORMAT_INT      ? "signed integer"
		                   : p->sample_format == SAMPLEFORMAT_IEEEFP ? "float"
		                   : is_uint                                 ? "unsigned integer"
		                                                             : "complex";
		return sf_fail(
		    e, SF_EUNSUPPORTED,
		    "%s: %s: %u-bit %s samples are not supported (uint8, uint16, float32)", path,
		    where, p->bps, kind);
	}
	*samples = p->spp;
	return SF_OK;
}

/* A compressed tile or strip is decoded whole into reader memory: refuse
 * units over MAX_UNIT (e.g. a whole-image deflate strip of a big plane).
 * Uncompressed units are read piecewise and have no limit. */
static int check_unit_size(const char *path, const char *where, const page_desc *p, sf_err *e)
{
	uint64_t w = p->tiled ? p->tile_w : p->width;
	uint64_t h = p->tiled ? p->tile_h : p->rows_per_strip;
	uint64_t bytes = w * h * p->spp * (p->bps / 8u);
	if (p->compression == COMPRESSION_NONE || bytes <= MAX_UNIT)
		return SF_OK;
	return sf_fail(e, SF_EUNSUPPORTED,
	               "%s: %s: compressed %s of %llu MiB is too large to decode (limit %u MiB); "
	               "save it tiled or with smaller strips",
	               path, where, p->tiled ? "tile" : "strip", (unsigned long long)(bytes >> 20),
	               MAX_UNIT >> 20);
}

/* The IFD p decodes to a type we serve, with a codec this libtiff has, in
 * units a reader can hold.  Every IFD a level names is checked, not only
 * channel 0's: the reader takes each IFD's own tiling and codec. */
static int check_decodable(const char *path, const char *where, const page_desc *p, sf_err *e)
{
	sf_dtype dt;
	uint32_t spp;
	int rc = pixel_type(path, where, p, &dt, &spp, e);
	return rc ? rc : check_unit_size(path, where, p, e);
}

/* Same decoded layout: a reader may switch between a and b freely. */
static int same_type(const page_desc *a, const page_desc *b)
{
	int a_rgb = a->spp == 3, b_rgb = b->spp == 3;
	int a_fmt = a->sample_format == SAMPLEFORMAT_VOID ? SAMPLEFORMAT_UINT : a->sample_format;
	int b_fmt = b->sample_format == SAMPLEFORMAT_VOID ? SAMPLEFORMAT_UINT : b->sample_format;
	return a->bps == b->bps && a->spp == b->spp && a_fmt == b_fmt && a_rgb == b_rgb &&
	       a->planar == b->planar;
}

static int same_shape(const page_desc *a, const page_desc *b)
{
	return a->width == b->width && a->height == b->height && same_type(a, b);
}

/* b may follow a as the next, smaller, level. */
static int shrinks(const page_desc *a, const page_desc *b)
{
	return b->width <= a->width && b->height <= a->height &&
	       (b->width < a->width || b->height < a->height);
}

/* ---- a small XML scanner for OME-XML ------------------------------------ */

/* One tag of an XML text: its local name (namespace prefix dropped) and the
 * raw text of its attributes.  Comments, CDATA, processing instructions and
 * declarations are skipped; a '>' inside a quoted value does not end a tag. */
typedef struct xml_tag {
	const char *name;
	size_t name_len;
	const char *attrs; /* from after the name to before '>' or '/>' */
	size_t attrs_len;
	int is_end;
	int self_closing;
} xml_tag;

static const char *skip_past(const char *p, const char *end, const char *marker)
{
	size_t m = strlen(marker);
	for (; p + m <= end; p++)
		if (memcmp(p, marker, m) == 0)
			return p + m;
	return end;
}

static int is_xml_space(char c)
{
	return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* Find the next element tag at or after *pos; 0 at the end of the text. */
static int xml_next_tag(const char **pos, const char *end, xml_tag *t)
{
	const char *p = *pos;
	for (;;) {
		p = memchr(p, '<', (size_t)(end - p));
		if (!p) {
			*pos = end;
			return 0;
		}
		if (end - p >= 4 && memcmp(p, "<!--", 4) == 0)
			p = skip_past(p + 4, end, "-->");
		else if (end - p >= 9 && memcmp(p, "<![CDATA[", 9) == 0)
			p = skip_past(p + 9, end, "]]>");
		else if (end - p >= 2 && p[1] == '?')
			p = skip_past(p + 2, end, "?>");
		else if (end - p >= 2 && p[1] == '!')
			p = skip_past(p + 2, end, ">");
		else
			break;
	}
	memset(t, 0, sizeof *t);
	p++;
	if (p < end && *p == '/') {
		t->is_end = 1;
		p++;
	}
	const char *name = p;
	while (p < end && !is_xml_space(*p) && *p != '>' && *p != '/')
		p++;
	const char *colon = memchr(name, ':', (size_t)(p - name));
	t->name = colon ? colon + 1 : name;
	t->name_len = (size_t)(p - t->name);
	t->attrs = p;
	char quote = 0;
	while (p < end && (quote || *p != '>')) {
		if (quote && *p == quote)
			quote = 0;
		else if (!quote && (*p == '"' || *p == '\''))
			quote = *p;
		p++;
	}
	t->attrs_len = (size_t)(p - t->attrs);
	if (t->attrs_len > 0 && t->attrs[t->attrs_len - 1] == '/') {
		t->self_closing = 1;
		t->attrs_len--;
	}
	*pos = p < end ? p + 1 : end;
	return 1;
}

static int xml_name_is(const xml_tag *t, const char *name)
{
	return t->name_len == strlen(name) && memcmp(t->name, name, t->name_len) == 0;
}

/* n, less a UTF-8 sequence that a cut at n left incomplete: a value
 * shortened to its buffer ended in half a "ü", which the OME writer then
 * showed as U+FFFD. */
static size_t utf8_whole(const char *s, size_t n)
{
	size_t lead = n, want;
	unsigned char c;

	while (lead > 0 && ((unsigned char)s[lead - 1] & 0xC0) == 0x80)
		lead--;
	if (lead == 0 || (c = (unsigned char)s[lead - 1]) < 0xC0)
		return n;
	want = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
	return n - (lead - 1) < want ? lead - 1 : n;
}

/* Decode the XML entities of value[0..len) into out (NUL-terminated,
 * truncated to cap at a whole UTF-8 character). */
static void xml_unescape(const char *v, size_t len, char *out, size_t cap)
{
	static const struct {
		const char *ent;
		char c;
	} named[] = {
	    {"&amp;", '&'}, {"&lt;", '<'}, {"&gt;", '>'}, {"&quot;", '"'}, {"&apos;", '\''}};
	size_t o = 0;
	for (size_t i = 0; i < len && o + 4 < cap;) {
		if (v[i] != '&') {
			out[o++] = v[i++];
			continue;
		}
		size_t k;
		for (k = 0; k < sizeof named / sizeof named[0]; k++) {
			size_t n = strlen(named[k].ent);
			if (len - i >= n && memcmp(v + i, named[k].ent, n) == 0) {
				out[o++] = named[k].c;
				i += n;
				break;
			}
		}
		if (k < sizeof named / sizeof named[0])
			continue;
		const char *semi = memchr(v + i, ';', len - i);
		if (semi && len - i > 2 && v[i + 1] == '#') {
			int hex = v[i + 2] == 'x' || v[i + 2] == 'X';
			unsigned long cp = strtoul(v + i + (hex ? 3 : 2), NULL, hex ? 16 : 10);
			/* UTF-8 encode the code point (a channel name may hold "µ",
			 * or "&#128512;" past U+FFFF); one that is no character
			 * becomes U+FFFD rather than vanish. */
			size_t n = sf_utf8_encode(cp, out + o);
			if (!n) {
				memcpy(out + o, SF_UTF8_REPLACEMENT, 3);
				n = 3;
			}
			o += n;
			i = (size_t)(semi - v) + 1;
			continue;
		}
		out[o++] = v[i++];
	}
	out[utf8_whole(out, o)] = '\0';
}

/* The value of attribute name in tag t, unescaped into out; 0 if absent. */
static int xml_attr(const xml_tag *t, const char *name, char *out, size_t cap)
{
	const char *p = t->attrs, *end = t->attrs + t->attrs_len;
	size_t want = strlen(name);
	while (p < end) {
		while (p < end && is_xml_space(*p))
			p++;
		const char *an = p;
		while (p < end && *p != '=' && !is_xml_space(*p))
			p++;
		size_t an_len = (size_t)(p - an);
		while (p < end && is_xml_space(*p))
			p++;
		if (p >= end || *p != '=')
			return 0;
		p++;
		while (p < end && is_xml_space(*p))
			p++;
		if (p >= end || (*p != '"' && *p != '\''))
			return 0;
		char quote = *p++;
		const char *val = p;
		while (p < end && *p != quote)
			p++;
		if (an_len == want && memcmp(an, name, want) == 0) {
			xml_unescape(val, (size_t)(p - val), out, cap);
			return 1;
		}
		p++;
	}
	return 0;
}

/* ---- OME-XML ------------------------------------------------------------- */

typedef struct ome_meta {
	uint32_t size_x, size_y, size_c, size_z, size_t_; /* 0 when absent */
	double phys_x, phys_y;                            /* micrometres; 0 when absent */
	char **names;                                     /* Channel Name of the first Pixels */
	uint32_t name_count;
	int has_pixels;
	char dimension_order[16]; /* DimensionOrder, e.g. "XYZCT"; "" when absent */
} ome_meta;

static void ome_meta_free(ome_meta *m)
{
	for (uint32_t i = 0; i < m->name_count; i++)
		free(m->names[i]);
	free(m->names);
}

static uint32_t attr_u32(const xml_tag *t, const char *name)
{
	char buf[32];
	if (!xml_attr(t, name, buf, sizeof buf))
		return 0;
	char *end;
	unsigned long v = strtoul(buf, &end, 10);
	return end != buf && v <= UINT32_MAX ? (uint32_t)v : 0;
}

/* Micrometres per unit for an OME UnitsLength symbol; 0 if not a length we know. */
static double um_per_unit(const char *u)
{
	static const struct {
		const char *sym;
		double um;
	} units[] = {
	    {"µm", 1},   {"μm", 1},   {"um", 1},   {"nm", 1e-3}, {"pm", 1e-6},
	    {"Å", 1e-4}, {"mm", 1e3}, {"cm", 1e4}, {"m", 1e6},
	};
	for (size_t i = 0; i < sizeof units / sizeof units[0]; i++)
		if (strcmp(u, units[i].sym) == 0)
			return units[i].um;
	return 0;
}

static double attr_length_um(const xml_tag *t, const char *size_attr, const char *unit_attr)
{
	char buf[64], unit[32];
	if (!xml_attr(t, size_attr, buf, sizeof buf))
		return 0;
	char *end;
	double v = strtod(buf, &end);
	if (end == buf || !isfinite(v) || v <= 0)
		return 0;
	double scale = xml_attr(t, unit_attr, unit, sizeof unit) ? um_per_unit(unit) : 1.0;
	double um = v * scale;
	return isfinite(um) ? um : 0; /* "1e305" metres: unknown, not infinite */
}

static int ome_add_name(ome_meta *m, const char *name)
{
	char **nn = realloc(m->names, (m->name_count + 1) * sizeof *nn);
	if (!nn)
		return SF_ENOMEM;
	m->names = nn;
	m->names[m->name_count] = name ? strdup(name) : NULL;
	if (name && !m->names[m->name_count])
		return SF_ENOMEM;
	m->name_count++;
	return SF_OK;
}

/* Read the first Pixels element of an OME-XML text and its Channel names. */
static int ome_parse(const char *xml, ome_meta *m)
{
	memset(m, 0, sizeof *m);
	const char *pos = xml, *end = xml + strlen(xml);
	xml_tag t;
	int inside = 0;
	while (xml_next_tag(&pos, end, &t)) {
		if (!inside && !t.is_end && xml_name_is(&t, "Pixels")) {
			m->has_pixels = 1;
			m->size_x = attr_u32(&t, "SizeX");
			m->size_y = attr_u32(&t, "SizeY");
			m->size_c = attr_u32(&t, "SizeC");
			m->size_z = attr_u32(&t, "SizeZ");
			m->size_t_ = attr_u32(&t, "SizeT");
			if (!xml_attr(&t, "DimensionOrder", m->dimension_order,
			              sizeof m->dimension_order))
				m->dimension_order[0] = '\0';
			m->phys_x = attr_length_um(&t, "PhysicalSizeX", "PhysicalSizeXUnit");
			m->phys_y = attr_length_um(&t, "PhysicalSizeY", "PhysicalSizeYUnit");
			if (t.self_closing)
				break;
			inside = 1;
		} else if (inside && t.is_end && xml_name_is(&t, "Pixels")) {
			break;
		} else if (inside && !t.is_end && xml_name_is(&t, "Channel")) {
			char name[1024]; /* longer names are cut at a whole character */
			int has = xml_attr(&t, "Name", name, sizeof name) && name[0];
			if (ome_add_name(m, has ? name : NULL))
				return SF_ENOMEM;
		}
	}
	return SF_OK;
}

/* The description is OME-XML: its root element is OME (any namespace
 * prefix, so "<OME " and "<ome:OME " both count). */
static int is_ome_xml(const char *desc)
{
	if (!strstr(desc, "OME"))
		return 0;
	const char *pos = desc, *end = desc + strlen(desc);
	xml_tag t;
	return xml_next_tag(&pos, end, &t) && !t.is_end && xml_name_is(&t, "OME");
}

/* ---- other descriptions -------------------------------------------------- */

/* "key=value" on its own line of an ImageJ description; 0 if absent. */
static uint32_t imagej_value(const char *desc, const char *key)
{
	size_t k = strlen(key);
	for (const char *p = desc; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
		if (strncmp(p, key, k) == 0 && p[k] == '=') {
			unsigned long v = strtoul(p + k + 1, NULL, 10);
			return v <= UINT32_MAX ? (uint32_t)v : 0;
		}
	}
	return 0;
}

static int hex_value(char c)
{
	return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10;
}

/* The text of "key=value" on its own line of an ImageJ description into
 * out (cap bytes), with ImageJ's escapes of non-ASCII characters decoded:
 * ImageJ 1.52+ writes "unit=\\u00B5m" (java.util.Properties style), older
 * versions "unit=um" or "unit=micron".  0 if absent. */
static int imagej_text(const char *desc, const char *key, char *out, size_t cap)
{
	size_t k = strlen(key), o = 0;
	for (const char *p = desc; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
		if (strncmp(p, key, k) != 0 || p[k] != '=')
			continue;
		for (const char *v = p + k + 1; *v && *v != '\n' && *v != '\r' && o + 5 < cap;) {
			unsigned long cp = 0;
			int digits = 0;
			while (v[0] == '\\' && v[1] == 'u' && digits < 4 &&
			       isxdigit((unsigned char)v[2 + digits]))
				cp = cp * 16 + (unsigned long)hex_value(v[2 + digits++]);
			if (digits == 4) {
				o += sf_utf8_encode(cp, out + o); /* 0 bytes for no character */
				v += 6;
			} else
				out[o++] = *v++;
		}
		out[o] = '\0';
		return 1;
	}
	return 0;
}

/* Micrometres per unit for an ImageJ length unit (its Calibration names
 * and OME's symbols); 0 for "pixel", "inch" or a unit we do not know. */
static double imagej_um_per_unit(const char *u)
{
	static const struct {
		const char *name;
		double um;
	} names[] = {
	    {"micron", 1},       {"microns", 1},      {"micrometer", 1}, {"nanometer", 1e-3},
	    {"millimeter", 1e3}, {"centimeter", 1e4}, {"meter", 1e6},
	};
	for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
		if (strcmp(u, names[i].name) == 0)
			return names[i].um;
	return um_per_unit(u);
}

/* Micrometres per pixel from an ImageJ 1.x file: ImageJ stores the
 * calibration as XResolution = pixels per unit with ResolutionUnit NONE
 * (1), and the unit as "unit=" in its description ("yunit=" when the y
 * unit differs).  Used only when ResolutionUnit is NONE or absent (ImageJ
 * writes INCH or CENTIMETER for those units, which the tags then say).
 * 0 when absent, "pixel", unknown, or outside 1e-4 - 1e4 um. */
static double imagej_um(const char *desc, const char *unit_key, float res, const page_desc *p0)
{
	char unit[64];
	if (strncmp(desc, "ImageJ=", 7) != 0 || (p0->has_res_unit && p0->res_unit != RESUNIT_NONE))
		return 0;
	if (strcmp(unit_key, "yunit") == 0 && !imagej_text(desc, "yunit", unit, sizeof unit))
		unit_key = "unit";
	if (!imagej_text(desc, unit_key, unit, sizeof unit) || !(res > 0) || !isfinite(res))
		return 0;
	double um = imagej_um_per_unit(unit) / res;
	return sf_pixel_um_plausible(um) ? um : 0;
}

/* "MPP = 0.4990" in an Aperio description; 0 if absent. */
static double aperio_mpp(const char *desc)
{
	const char *p = strstr(desc, "MPP");
	while (p) {
		const char *q = p + 3;
		while (*q == ' ')
			q++;
		if (*q == '=') {
			char *end;
			double v = strtod(q + 1, &end);
			if (end != q + 1 && isfinite(v) && v > 0)
				return v;
		}
		p = strstr(p + 3, "MPP");
	}
	return 0;
}

/* tifffile's RESUNIT values past baseline TIFF's 1-3 (stored_res_unit). */
#define RESUNIT_MILLIMETER 4
#define RESUNIT_MICROMETER 5

/* Micrometres per pixel from XResolution / ResolutionUnit, or 0 when the
 * value is absent or not plausible for a microscope (0.01 - 100 µm): many
 * writers store a default of 72 dpi (353 µm) or 1 pixel/mm (1000 µm). */
static double resolution_um(float res, uint16_t unit)
{
	double um_per_unit = unit == RESUNIT_CENTIMETER   ? 1e4
	                     : unit == RESUNIT_INCH       ? 25400
	                     : unit == RESUNIT_MILLIMETER ? 1e3
	                     : unit == RESUNIT_MICROMETER ? 1
	                                                  : 0;
	if (um_per_unit == 0 || !(res > 0) || !isfinite(res))
		return 0;
	double um = um_per_unit / res;
	return um >= 0.01 && um <= 100 ? um : 0;
}

/* ---- layout -------------------------------------------------------------- */

/* The IFDs chosen for one level: per channel its offset and main index. */
typedef struct level_pick {
	page_desc desc; /* channel 0's IFD (size, tiling); desc.subifds not owned */
	uint64_t *offsets;
	uint32_t *dirs;
	int32_t subifd;
} level_pick;

typedef struct probe {
	const char *path;
	TIFF *tif;
	tiff_diag *diag;
	uint64_t file_size;
	page_desc *pages;
	uint32_t page_count;
	uint32_t channels;
	int contiguous; /* the channels are ImageJ's planes after page 0's data (one IFD) */
	level_pick *levels;
	uint32_t level_count;
} probe;

static int add_level(probe *pr, const page_desc *desc, int32_t subifd)
{
	level_pick *nl = realloc(pr->levels, (pr->level_count + 1) * sizeof *nl);
	if (!nl)
		return SF_ENOMEM;
	pr->levels = nl;
	level_pick *l = &pr->levels[pr->level_count];
	memset(l, 0, sizeof *l);
	l->desc = *desc;
	l->desc.subifds = NULL;
	l->desc.subifd_count = 0;
	l->subifd = subifd;
	l->offsets = calloc(pr->channels, sizeof *l->offsets);
	l->dirs = calloc(pr->channels, sizeof *l->dirs);
	pr->level_count++; /* counted now so a failed calloc is still freed */
	return l->offsets && l->dirs ? SF_OK : SF_ENOMEM;
}

/* Channels: the leading main-chain pages with page 0's size and type,
 * capped at limit (0: no cap). */
static uint32_t leading_channels(const probe *pr, uint32_t limit)
{
	uint32_t n = 1;
	while (n < pr->page_count && (!limit || n < limit) &&
	       same_shape(&pr->pages[0], &pr->pages[n]) &&
	       !(pr->pages[n].subfile_type & FILETYPE_REDUCEDIMAGE))
		n++;
	return n;
}

/* "30x30 uint16" for page p; several samples as "3x uint8". */
static void page_shape_text(const page_desc *p, char *buf, size_t cap)
{
	const char *kind = p->sample_format == SAMPLEFORMAT_INT      ? "int"
	                   : p->sample_format == SAMPLEFORMAT_IEEEFP ? "float"
	                                                             : "uint";
	if (p->spp == 1)
		snprintf(buf, cap, "%ux%u %s%u", p->width, p->height, kind, p->bps);
	else
		snprintf(buf, cap, "%ux%u %ux %s%u", p->width, p->height, p->spp, kind, p->bps);
}

/* Page p may follow the planes without being one of them: a page marked
 * reduced-resolution, or a thumbnail (at most half of page 0 in both axes). */
static int is_extra_page(const page_desc *p0, const page_desc *p)
{
	return (p->subfile_type & FILETYPE_REDUCEDIMAGE) ||
	       ((uint64_t)p->width * 2 <= p0->width && (uint64_t)p->height * 2 <= p0->height);
}

/* FLAT layout: the first page after the channels that breaks the run of
 * planes, or 0.  With one channel, an odd page counts only when pages of
 * page 0's shape follow it (a plane followed by a label is a plain image). */
static uint32_t flat_odd_page(const probe *pr)
{
	const page_desc *p0 = &pr->pages[0];
	for (uint32_t i = pr->channels; i < pr->page_count; i++) {
		if (is_extra_page(p0, &pr->pages[i]))
			continue;
		if (pr->channels >= 2)
			return i;
		for (uint32_t j = i + 1; j < pr->page_count; j++)
			if (same_shape(p0, &pr->pages[j]) && !is_extra_page(p0, &pr->pages[j]))
				return i;
		return 0;
	}
	return 0;
}

static void note_odd_page(sf_slide_info *s, const probe *pr, uint32_t i)
{
	char odd[48], first[48]; /* at most "4294967295x4294967295 65535x float65535" */
	s->odd_page = i;
	page_shape_text(&pr->pages[i], odd, sizeof odd);
	page_shape_text(&pr->pages[0], first, sizeof first);
	if (strcmp(odd, first) == 0) /* same size and sample type, other layout */
		snprintf(s->odd_page_text, sizeof s->odd_page_text,
		         "page %u is stored unlike page 0 (%s, other photometric or planar layout)",
		         i, odd);
	else
		snprintf(s->odd_page_text, sizeof s->odd_page_text, "page %u is %s, page 0 is %s",
		         i, odd, first);
}

/* Level 0 made of main pages 0..channels-1 (or of page 0 for every channel
 * when they are contiguous planes: the reader shifts each by its plane). */
static int level0_from_pages(probe *pr)
{
	if (add_level(pr, &pr->pages[0], -1))
		return SF_ENOMEM;
	for (uint32_t c = 0; c < pr->channels; c++) {
		uint32_t page = pr->contiguous ? 0 : c;
		pr->levels[0].offsets[c] = pr->pages[page].offset;
		pr->levels[0].dirs[c] = page;
	}
	return SF_OK;
}

/* Page 0's strips hold one plane in one piece: contiguous, each exactly its
 * rows' bytes, the first at *first.  0 and why in buf if not.  The current
 * directory is page 0 (the probe's only page). */
static int plane_in_one_piece(const probe *pr, uint64_t plane_bytes, uint64_t *first, char *buf,
                              size_t cap)
{
	const page_desc *p0 = &pr->pages[0];
	uint32_t n = TIFFNumberOfStrips(pr->tif);
	uint64_t row_bytes = plane_bytes / p0->height, end = 0;
	if (TIFFCurrentDirOffset(pr->tif) != p0->offset || n == 0) {
		snprintf(buf, cap, "its strips cannot be read");
		return 0;
	}
	for (uint32_t i = 0; i < n; i++) {
		int err = 0;
		uint64_t off = TIFFGetStrileOffsetWithErr(pr->tif, i, &err);
		uint64_t len = err ? 0 : TIFFGetStrileByteCountWithErr(pr->tif, i, &err);
		uint64_t rows = p0->height - (uint64_t)i * p0->rows_per_strip;
		rows = rows < p0->rows_per_strip ? rows : p0->rows_per_strip;
		if (err) {
			snprintf(buf, cap, "its strip %u cannot be read", i);
			return 0;
		}
		if (len != rows * row_bytes) {
			snprintf(buf, cap, "its strip %u holds %llu bytes, not %llu", i,
			         (unsigned long long)len, (unsigned long long)(rows * row_bytes));
			return 0;
		}
		if (i > 0 && off != end) {
			snprintf(buf, cap, "its strip %u does not start where strip %u ends", i,
			         i - 1);
			return 0;
		}
		if (i == 0)
			*first = off;
		end = off + len;
	}
	return 1;
}

/* ImageJ's layout for stacks over 4 GiB (sf_slide_info.contig_planes): fill
 * s->contig_* when the file's one IFD states slices > 1 in an ImageJ
 * description.  Past 4 GiB a classic TIFF has no room for an IFD per plane,
 * so ImageJ writes one and stores the planes after its data; ImageJ and
 * tifffile read plane z at the first strip's offset + z * plane bytes. */
static void note_contiguous_planes(const probe *pr, sf_slide_info *s)
{
	const page_desc *p0 = &pr->pages[0];
	char *why = s->contig_fault;
	size_t cap = sizeof s->contig_fault;
	uint64_t plane_bytes = (uint64_t)p0->width * p0->height * sf_dtype_bytes(s->dtype);
	uint64_t first = 0;
	if (s->is_ome || pr->channels != 1 || s->stated_z <= 1)
		return;
	if (pr->page_count != 1)
		snprintf(why, cap, "its other %u pages are not planes", pr->page_count - 1);
	else if (s->stated_c > 1)
		snprintf(why, cap, "it states channels=%u (only one channel is read)", s->stated_c);
	else if (s->stated_t > 1)
		snprintf(why, cap, "it states frames=%u (only one time point is read)",
		         s->stated_t);
	else if (s->stated_images && s->stated_images != s->stated_z)
		snprintf(why, cap, "it states images=%u, not slices=%u", s->stated_images,
		         s->stated_z);
	else if (p0->tiled)
		snprintf(why, cap, "its page is tiled");
	else if (s->samples != 1)
		snprintf(why, cap, "its page has %u samples per pixel", s->samples);
	else if (p0->compression != COMPRESSION_NONE)
		snprintf(why, cap, "its page is compressed (Compression %u)", p0->compression);
	else if (p0->fill_order != FILLORDER_MSB2LSB)
		snprintf(why, cap, "its page has FillOrder %u", p0->fill_order);
	else if (!plane_in_one_piece(pr, plane_bytes, &first, why, cap))
		return;
	if (why[0])
		return;
	uint64_t room = pr->file_size > first ? pr->file_size - first : 0;
	s->contig_planes = s->stated_z;
	s->contig_held =
	    room / plane_bytes < s->stated_z ? (uint32_t)(room / plane_bytes) : s->stated_z;
	s->contig_offset = first;
	s->contig_stride = plane_bytes;
}

/* Reduced levels from the SubIFDs of each channel page (OME layout).  A
 * SubIFD that does not fit (other type, size differing between channels,
 * growing) ends the pyramid there with a warning: level 0 stays usable. */
static int levels_from_subifds(probe *pr, sf_err *e)
{
	uint32_t count = pr->pages[0].subifd_count;
	for (uint32_t c = 1; c < pr->channels; c++)
		if (pr->pages[c].subifd_count < count)
			count = pr->pages[c].subifd_count;
	for (uint32_t l = 1; l <= count; l++) {
		page_desc first = {0};
		int fits = 1;
		uint64_t *offs = calloc(pr->channels, sizeof *offs);
		if (!offs)
			return sf_fail(e, SF_ENOMEM, "%s: out of memory", pr->path);
		for (uint32_t c = 0; c < pr->channels && fits; c++) {
			char where[64];
			snprintf(where, sizeof where, "page %u SubIFD %u", c, l - 1);
			page_desc d;
			offs[c] = pr->pages[c].subifds[l - 1];
			pr->diag->msg[0] = '\0';
			if (!TIFFSetSubDirectory(pr->tif, offs[c])) {
				free(offs);
				return sf_fail(e, SF_EFORMAT, "%s: %s: cannot read it: %s",
				               pr->path, where, diag_text(pr->diag));
			}
			int rc = describe_page(pr->tif, pr->path, where, &d, e);
			free(d.subifds);
			if (!rc)
				rc = check_striles(pr->tif, pr->path, where, pr->file_size, e);
			if (rc) {
				free(offs);
				return rc;
			}
			if (c == 0)
				first = d;
			fits = same_type(&pr->pages[0], &d) &&
			       shrinks(&pr->levels[l - 1].desc, &d) && d.width == first.width &&
			       d.height == first.height;
			if (!fits)
				sf_log(SF_LOG_WARN,
				       "%s: %s does not fit the pyramid; %u levels used", pr->path,
				       where, l);
			else if ((rc = check_decodable(pr->path, where, &d, e)) != SF_OK) {
				free(offs);
				return rc;
			}
		}
		if (!fits) {
			free(offs);
			break;
		}
		int rc = add_level(pr, &first, (int32_t)(l - 1));
		if (rc) {
			free(offs);
			return sf_fail(e, SF_ENOMEM, "%s: out of memory", pr->path);
		}
		level_pick *lp = &pr->levels[pr->level_count - 1];
		for (uint32_t c = 0; c < pr->channels; c++) {
			lp->offsets[c] = offs[c];
			lp->dirs[c] = c;
		}
		free(offs);
	}
	return SF_OK;
}

/* Page p keeps page 0's aspect ratio, so it can be a downsampled copy of it.
 * A writer rounds each axis of a level down, up or to nearest, so the true
 * w0/d lies within one pixel of w: the downsample d of the x axis is in
 * (w0/(w+1), w0/(w-1)), and likewise for y.  The page fits when the two
 * ranges meet, give or take ASPECT_SLACK for writers that round the
 * downsample itself.  A 600x200 label after a 4096x3072 slide (6.8x against
 * 15.4x) does not fit; an 11500x8228 level of a 46000x32914 slide does. */
static int keeps_aspect(const page_desc *p0, const page_desc *p)
{
	double x_lo = p0->width / (p->width + 1.0), y_lo = p0->height / (p->height + 1.0);
	double x_hi = p->width > 1 ? p0->width / (p->width - 1.0) : INFINITY;
	double y_hi = p->height > 1 ? p0->height / (p->height - 1.0) : INFINITY;
	return x_lo <= y_hi * (1 + ASPECT_SLACK) && y_lo <= x_hi * (1 + ASPECT_SLACK);
}

/* Page p (after page 0) is an associated image, never a level: its
 * NewSubfileType has a bit besides "reduced" (transparency mask, page of a
 * document, Aperio's macro 9), or its description names it (label, macro,
 * thumbnail), or, in an SVS, it is marked reduced at all: Aperio leaves its
 * pyramid levels at NewSubfileType 0 and marks the label 1 and the macro 9
 * (tifffile's SVS reader ends the levels at the first reduced page too). */
static int is_associated(const page_desc *p, int svs)
{
	if ((p->subfile_type & ~(uint32_t)FILETYPE_REDUCEDIMAGE) || p->named_associated)
		return 1;
	return svs && (p->subfile_type & FILETYPE_REDUCEDIMAGE);
}

/* Reduced levels from later main-chain pages (one channel): pages of the
 * same type that keep shrinking and keep level 0's aspect ratio, and are
 * not associated images.  svs: stripped pages and associated images are
 * skipped (Aperio puts its stripped thumbnail between the levels); the
 * first tiled page that does not fit ends the list.  Otherwise (PAGES) the
 * first page that does not fit ends it, and once level 1 is marked reduced
 * (NewSubfileType bit 0, as libvips and OpenSlide's generic TIFF mark
 * levels) a later page not so marked is not a level. */
static int levels_from_pages(probe *pr, int svs)
{
	const page_desc *p0 = &pr->pages[0];
	for (uint32_t i = 1; i < pr->page_count; i++) {
		const page_desc *p = &pr->pages[i];
		if (svs && (!p->tiled || is_associated(p, 1)))
			continue;
		int marked = (p->subfile_type & FILETYPE_REDUCEDIMAGE) != 0;
		if (!svs && (is_associated(p, 0) ||
		             (pr->level_count > 1 &&
		              pr->levels[1].desc.subfile_type & FILETYPE_REDUCEDIMAGE && !marked)))
			break;
		if (!same_type(p0, p) || !shrinks(&pr->levels[pr->level_count - 1].desc, p) ||
		    !keeps_aspect(p0, p))
			break;
		if (add_level(pr, p, -1))
			return SF_ENOMEM;
		pr->levels[pr->level_count - 1].offsets[0] = p->offset;
		pr->levels[pr->level_count - 1].dirs[0] = i;
	}
	return SF_OK;
}

static void probe_free(probe *pr)
{
	for (uint32_t l = 0; l < pr->level_count; l++) {
		free(pr->levels[l].offsets);
		free(pr->levels[l].dirs);
	}
	free(pr->levels);
	pages_free(pr->pages, pr->page_count);
}

/* ---- the info ------------------------------------------------------------ */

/* ---- decoded units shared by a slide's readers ---------------------------
 *
 * Workers compute neighbouring output tiles at once, and neighbours need the
 * same source tiles: without sharing each worker's reader decodes them again
 * (zlib decoding is most of a warp's CPU).  A unit is keyed by its IFD
 * offset and index.  Entry life cycle, all under the lock:
 *
 *   (absent) --reader misses--> DECODING (pinned by its decoder, others wait
 *   on `changed`) --decoded--> READY --last pin gone, chosen as victim-->
 *   (absent);  DECODING --decode failed--> (absent), waiters retry.
 *
 * Readers copy straight out of a READY entry while they pin it (pins > 0),
 * so one decoded copy serves every worker, and a unit two workers want at
 * once is decoded once.  Only unpinned READY entries are evicted: by the
 * reuse hint when one is set (the unit read again last goes first), else
 * least recently used.  An evicted buffer of the right size is reused for
 * the next unit, which spares a malloc and its page faults.
 *
 * SHARE_BUDGET bounds the decoded bytes of all slides' shares together, so
 * memory does not grow with the number of slides read: a share that needs
 * room beyond it first empties other slides' shares (their unpinned READY
 * entries), which are idle when one slide is copied at a time.  Lock order:
 * a share's lock, then share_registry_lock, then other shares' locks only
 * through trylock (a busy share is skipped), so no cycle can wait. */
typedef struct share_entry {
	uint64_t ifd;   /* IFD offset; 0 = empty */
	uint32_t unit;  /* tile or strip index */
	uint32_t level; /* of the slide, for the reuse hint */
	uint64_t used;  /* share clock at last use */
	size_t bytes;
	uint8_t *data;
	unsigned pins; /* readers using data now */
	int ready;     /* 0: its decoder is still writing data */
} share_entry;

struct sf_tile_share {
	struct sf_tile_share *next_share; /* protected by share_registry_lock */
	pthread_mutex_t lock;
	pthread_cond_t changed;     /* an entry became READY or was dropped */
	share_entry e[SHARE_SLOTS]; /* protected by lock */
	uint64_t clock;             /* protected by lock */
	size_t bytes;               /* protected by lock: sum of e[].bytes */
	sf_slide_reuse_fn hint;     /* protected by lock; NULL: LRU */
	void *hint_ctx;             /* protected by lock */
	const void *hint_owner;     /* protected by lock */
};

/* Every live share, and their decoded bytes together: process-wide state
 * by design (one budget for all slides), behind its own lock. */
static pthread_mutex_t share_registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sf_tile_share *share_registry; /* protected by share_registry_lock */
static size_t share_total_bytes;             /* protected by share_registry_lock */

static void share_account(long long delta)
{
	pthread_mutex_lock(&share_registry_lock);
	share_total_bytes = (size_t)((long long)share_total_bytes + delta);
	pthread_mutex_unlock(&share_registry_lock);
}

static struct sf_tile_share *share_new(void)
{
	struct sf_tile_share *sh = calloc(1, sizeof *sh);
	if (!sh)
		return NULL; /* NULL just means no sharing */
	if (pthread_mutex_init(&sh->lock, NULL) != 0) {
		free(sh);
		return NULL;
	}
	if (pthread_cond_init(&sh->changed, NULL) != 0) {
		pthread_mutex_destroy(&sh->lock);
		free(sh);
		return NULL;
	}
	pthread_mutex_lock(&share_registry_lock);
	sh->next_share = share_registry;
	share_registry = sh;
	pthread_mutex_unlock(&share_registry_lock);
	return sh;
}

static void share_free(struct sf_tile_share *sh)
{
	if (!sh)
		return;
	pthread_mutex_lock(&share_registry_lock);
	for (struct sf_tile_share **pp = &share_registry; *pp; pp = &(*pp)->next_share) {
		if (*pp == sh) {
			*pp = sh->next_share;
			break;
		}
	}
	share_total_bytes -= sh->bytes;
	pthread_mutex_unlock(&share_registry_lock);
	for (int i = 0; i < SHARE_SLOTS; i++)
		free(sh->e[i].data);
	pthread_cond_destroy(&sh->changed);
	pthread_mutex_destroy(&sh->lock);
	free(sh);
}

void sf_slide_set_reuse_hint(const sf_slide_info *s, const void *owner, sf_slide_reuse_fn fn,
                             void *ctx)
{
	struct sf_tile_share *sh = s->share;
	if (!sh)
		return;
	pthread_mutex_lock(&sh->lock);
	if (fn || sh->hint_owner == owner) {
		sh->hint = fn;
		sh->hint_ctx = fn ? ctx : NULL;
		sh->hint_owner = fn ? owner : NULL;
	}
	pthread_mutex_unlock(&sh->lock);
}

static share_entry *share_find(struct sf_tile_share *sh, uint64_t ifd, uint32_t unit)
{
	for (int i = 0; i < SHARE_SLOTS; i++)
		if (sh->e[i].ifd == ifd && sh->e[i].unit == unit)
			return &sh->e[i];
	return NULL;
}

/* The evictable entry to go first (NULL: every entry is pinned or being
 * decoded).  Lock held. */
static share_entry *share_victim(struct sf_tile_share *sh)
{
	share_entry *best = NULL;
	uint64_t best_next = 0;
	for (int i = 0; i < SHARE_SLOTS; i++) {
		share_entry *se = &sh->e[i];
		if (!se->data || se->pins || !se->ready)
			continue;
		uint64_t next = sh->hint ? sh->hint(sh->hint_ctx, se->level, se->unit) : 0;
		if (!best || next > best_next || (next == best_next && se->used < best->used)) {
			best = se;
			best_next = next;
		}
	}
	return best;
}

/* Lock held; the caller accounts the bytes to share_total_bytes. */
static void share_drop(struct sf_tile_share *sh, share_entry *se)
{
	sh->bytes -= se->bytes;
	free(se->data);
	memset(se, 0, sizeof *se);
}

/* Free the unpinned READY entries of every other share that is not busy,
 * until `need` more bytes fit the budget.  sh's lock held. */
static void share_trim_others(struct sf_tile_share *sh, size_t need)
{
	pthread_mutex_lock(&share_registry_lock);
	for (struct sf_tile_share *o = share_registry; o && share_total_bytes + need > SHARE_BUDGET;
	     o = o->next_share) {
		if (o == sh || pthread_mutex_trylock(&o->lock) != 0)
			continue;
		for (int i = 0; i < SHARE_SLOTS; i++) {
			share_entry *se = &o->e[i];
			if (se->data && !se->pins && se->ready) {
				share_total_bytes -= se->bytes;
				share_drop(o, se);
			}
		}
		pthread_mutex_unlock(&o->lock);
	}
	pthread_mutex_unlock(&share_registry_lock);
}

/* Whether `need` more bytes fit the budget of all shares together. */
static int share_total_fits(size_t need)
{
	pthread_mutex_lock(&share_registry_lock);
	int fits = share_total_bytes + need <= SHARE_BUDGET;
	pthread_mutex_unlock(&share_registry_lock);
	return fits;
}

/* A DECODING entry for (ifd, unit) with a buffer of bytes bytes, pinned by
 * the caller; NULL when the share cannot hold it (every slot busy, or out of
 * memory): the caller then decodes privately.  Lock held. */
static share_entry *share_claim(struct sf_tile_share *sh, uint64_t ifd, uint32_t unit,
                                uint32_t level, size_t bytes)
{
	share_entry *slot = NULL;
	uint8_t *buf = NULL;
	if (bytes > SHARE_BUDGET / 4)
		return NULL;
	for (int i = 0; i < SHARE_SLOTS && !slot; i++)
		if (!sh->e[i].data)
			slot = &sh->e[i];
	size_t kept = 0; /* bytes of buf, still counted in share_total_bytes */
	if (!share_total_fits(bytes))
		share_trim_others(sh, bytes);
	while (!slot || sh->bytes + bytes > SHARE_BUDGET || !share_total_fits(bytes - kept)) {
		share_entry *v = share_victim(sh);
		if (!v)
			break;
		size_t freed = v->bytes;
		if (!buf && v->bytes == bytes) { /* keep its buffer for the newcomer */
			buf = v->data;
			v->data = NULL;
			kept = bytes;
			freed = 0;
		}
		share_drop(sh, v);
		share_account(-(long long)freed);
		if (!slot)
			slot = v;
	}
	if (!slot || sh->bytes + bytes > SHARE_BUDGET || !share_total_fits(bytes - kept) ||
	    (!buf && !(buf = malloc(bytes)))) {
		share_account(-(long long)kept);
		free(buf);
		return NULL;
	}
	*slot = (share_entry){ifd, unit, level, ++sh->clock, bytes, buf, 1, 0};
	sh->bytes += bytes;
	share_account((long long)(bytes - kept));
	return slot;
}

static void share_unpin(struct sf_tile_share *sh, share_entry *se)
{
	pthread_mutex_lock(&sh->lock);
	se->pins--;
	pthread_mutex_unlock(&sh->lock);
}

void sf_slide_info_free(sf_slide_info *s)
{
	if (!s)
		return;
	for (uint32_t l = 0; s->levels && l < s->level_count; l++) {
		free(s->levels[l].dir);
		free(s->levels[l].ifd_offset);
	}
	free(s->levels);
	for (uint32_t c = 0; s->channel_names && c < s->channels; c++)
		free(s->channel_names[c]);
	free(s->channel_names);
	share_free(s->share);
	free(s->path);
	free(s);
}

/* Move the picked levels into s (the probe keeps nothing). */
static int fill_levels(sf_slide_info *s, probe *pr)
{
	s->levels = calloc(pr->level_count, sizeof *s->levels);
	if (!s->levels)
		return SF_ENOMEM;
	s->level_count = pr->level_count;
	for (uint32_t l = 0; l < pr->level_count; l++) {
		level_pick *lp = &pr->levels[l];
		sf_slide_level *sl = &s->levels[l];
		sl->width = lp->desc.width;
		sl->height = lp->desc.height;
		sl->tiled = lp->desc.tiled;
		sl->tile_w = lp->desc.tiled ? lp->desc.tile_w : lp->desc.width;
		sl->tile_h = lp->desc.tiled ? lp->desc.tile_h : lp->desc.rows_per_strip;
		sl->subifd = lp->subifd;
		sl->dir = lp->dirs;
		sl->ifd_offset = lp->offsets;
		lp->dirs = NULL;
		lp->offsets = NULL;
	}
	return SF_OK;
}

static int fill_channel_names(sf_slide_info *s, const ome_meta *ome)
{
	s->channel_names = calloc(s->channels, sizeof *s->channel_names);
	if (!s->channel_names)
		return SF_ENOMEM;
	/* OME names belong to channels only when the pages are exactly the channels. */
	int named = ome && ome->name_count == s->channels && s->stated_z <= 1 && ome->size_t_ <= 1;
	for (uint32_t c = 0; c < s->channels; c++) {
		if (named && ome->names[c])
			s->channel_names[c] = strdup(ome->names[c]);
		else if (asprintf(&s->channel_names[c], "Channel %u", c) < 0)
			s->channel_names[c] = NULL;
		if (!s->channel_names[c])
			return SF_ENOMEM;
	}
	return SF_OK;
}

/* Copy IFD 0's ImageDescription (current directory right after open). */
static int read_description(TIFF *tif, char **out)
{
	char *d = NULL;
	*out = NULL;
	if (TIFFGetField(tif, TIFFTAG_IMAGEDESCRIPTION, &d) && d) {
		*out = strdup(d);
		if (!*out)
			return SF_ENOMEM;
	}
	return SF_OK;
}

/* What Orientation o asks a viewer to do with the stored rows and columns. */
static const char *orientation_text(uint16_t o)
{
	switch (o) {
	case ORIENTATION_TOPRIGHT: return "mirror left-right";
	case ORIENTATION_BOTRIGHT: return "rotate 180";
	case ORIENTATION_BOTLEFT: return "mirror top-bottom";
	case ORIENTATION_LEFTTOP: return "transpose";
	case ORIENTATION_RIGHTTOP: return "rotate 90 clockwise";
	case ORIENTATION_RIGHTBOT: return "transverse";
	case ORIENTATION_LEFTBOT: return "rotate 90 counter-clockwise";
	default: return "not a valid Orientation";
	}
}

/* Say that Orientation o of path is not applied.  Logged when the file is
 * probed (the scan; main copies those lines to log=FILE as well). */
static void log_orientation(const char *path, uint16_t o)
{
	sf_log(SF_LOG_WARN,
	       "%s: TIFF Orientation %u (%s) is ignored: pixels are served in stored order, as "
	       "tifffile and OpenSlide read them; a viewer that applies Orientation "
	       "shows the source %s",
	       path, o, orientation_text(o),
	       o > 8    ? "as stored"
	       : o >= 5 ? "rotated or transposed"
	                : "flipped");
}

/* A pixel size outside 0.0001 - 10000 um (the ImageJ reader's range) is a
 * unit slip, not a calibration ("0.5" with unit "pm"): it is logged and
 * dropped, as if absent, rather than served as a resolution tag that
 * overflows (1e4 / 1e-12 um as a TIFF rational is 4294967295/0). */
static void drop_implausible_pixel_size(sf_slide_info *s)
{
	double x = s->pixel_size_x, y = s->pixel_size_y;

	if (x == 0 && y == 0)
		return;
	if (sf_pixel_um_plausible(x) && sf_pixel_um_plausible(y))
		return;
	sf_log(SF_LOG_WARN,
	       "%s: pixel size %g x %g um is outside 0.0001 - 10000 um: ignored (no physical "
	       "size)",
	       s->path, x, y);
	s->pixel_size_x = s->pixel_size_y = 0;
}

uint64_t sf_slide_time_point_pages(const sf_slide_info *s)
{
	uint32_t c = s->stated_c ? s->stated_c : 1, z = s->stated_z ? s->stated_z : 1;
	/* tifffile and Bio-Formats write an RGB image as SizeC=3 with one Channel
	 * of SamplesPerPixel=3 and one page per Z and T. */
	if (s->samples > 1 && c % s->samples == 0)
		c /= s->samples;
	return (uint64_t)c * z;
}

/* Choose the layout and fill s from the probe's pages and description. */
static int choose_layout(probe *pr, sf_slide_info *s, const char *desc, sf_err *e)
{
	const page_desc *p0 = &pr->pages[0];
	ome_meta ome;
	int has_ome = desc && is_ome_xml(desc);
	int rc = SF_OK;
	memset(&ome, 0, sizeof ome);
	if (has_ome && ome_parse(desc, &ome)) {
		ome_meta_free(&ome);
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", pr->path);
	}
	rc = pixel_type(pr->path, "page 0", p0, &s->dtype, &s->samples, e);
	if (rc)
		goto out;
	s->is_ome = has_ome;
	s->ome_size_z = has_ome && ome.size_z ? ome.size_z : 1;
	if (has_ome) {
		s->stated_c = ome.size_c;
		s->stated_z = ome.size_z;
		s->stated_t = ome.size_t_;
		snprintf(s->dimension_order, sizeof s->dimension_order, "%s", ome.dimension_order);
	} else if (desc && strncmp(desc, "ImageJ=", 7) == 0) {
		s->stated_c = imagej_value(desc, "channels");
		s->stated_z = imagej_value(desc, "slices");
		s->stated_t = imagej_value(desc, "frames");
		s->stated_images = imagej_value(desc, "images");
	}
	int is_svs = !has_ome && desc && strncmp(desc, "Aperio", 6) == 0;
	if (is_svs) {
		pr->channels = 1;
		s->kind = SF_SLIDE_SVS;
		rc = level0_from_pages(pr);
		if (!rc)
			rc = levels_from_pages(pr, 1);
	} else if (has_ome || p0->subifd_count > 0) {
		/* The pages of the first Image; counting SizeC pages where a page
		 * holds 3 of them (RGB) took the next Image's pages as channels. */
		uint64_t planes = has_ome && ome.size_c && ome.size_z && ome.size_t_
		                      ? sf_slide_time_point_pages(s) * ome.size_t_
		                      : 0;
		pr->channels = leading_channels(pr, planes > UINT32_MAX ? 0 : (uint32_t)planes);
		if (planes && pr->channels < planes && pr->channels < pr->page_count)
			note_odd_page(s, pr, pr->channels);
		s->kind = SF_SLIDE_OME;
		rc = level0_from_pages(pr);
		if (rc)
			goto out_nomem;
		rc = levels_from_subifds(pr, e);
		if (rc)
			goto out;
	} else {
		pr->channels = leading_channels(pr, 0);
		/* Pages that come back to page 0's shape after an odd one are a
		 * broken run of planes, not a pyramid (levels never grow back). */
		uint32_t odd = flat_odd_page(pr);
		note_contiguous_planes(pr, s);
		/* A file cut short keeps one channel: the scan reports what it holds. */
		if (s->contig_planes && s->contig_held == s->contig_planes) {
			pr->channels = s->contig_planes;
			pr->contiguous = 1;
		}
		rc = level0_from_pages(pr);
		if (!rc && pr->channels == 1 && !odd)
			rc = levels_from_pages(pr, 0);
		s->kind = pr->level_count > 1 ? SF_SLIDE_PAGES : SF_SLIDE_FLAT;
		if (odd)
			note_odd_page(s, pr, odd);
	}
	if (rc)
		goto out_nomem;
	s->channels = pr->channels;
	s->width = p0->width;
	s->height = p0->height;
	s->tiled = p0->tiled;
	s->orientation = p0->orientation;
	if (p0->orientation != ORIENTATION_TOPLEFT)
		log_orientation(pr->path, p0->orientation);
	if (has_ome && ome.phys_x > 0) {
		s->pixel_size_x = ome.phys_x;
		s->pixel_size_y = ome.phys_y > 0 ? ome.phys_y : ome.phys_x;
	} else if (is_svs && aperio_mpp(desc) > 0) {
		s->pixel_size_x = s->pixel_size_y = aperio_mpp(desc);
	} else if (desc && imagej_um(desc, "unit", p0->xres, p0) > 0 &&
	           imagej_um(desc, "yunit", p0->yres, p0) > 0) {
		s->pixel_size_x = imagej_um(desc, "unit", p0->xres, p0);
		s->pixel_size_y = imagej_um(desc, "yunit", p0->yres, p0);
	} else {
		s->pixel_size_x = resolution_um(p0->xres, p0->res_unit);
		s->pixel_size_y = resolution_um(p0->yres, p0->res_unit);
		if (s->pixel_size_x == 0 || s->pixel_size_y == 0)
			s->pixel_size_x = s->pixel_size_y = 0;
		if (p0->xres > 0 && p0->res_unit > RESUNIT_MICROMETER)
			sf_log(SF_LOG_WARN,
			       "%s: ResolutionUnit %u is no unit TIFF or tifffile knows: "
			       "pixel size unknown",
			       pr->path, (unsigned)p0->res_unit);
	}
	drop_implausible_pixel_size(s);
	if (fill_levels(s, pr) || fill_channel_names(s, has_ome ? &ome : NULL))
		goto out_nomem;
	goto out;
out_nomem:
	rc = sf_fail(e, SF_ENOMEM, "%s: out of memory", pr->path);
out:
	ome_meta_free(&ome);
	return rc;
}

int sf_slide_probe(const char *path, sf_slide_info **out, sf_err *e)
{
	*out = NULL;
	tiff_diag diag = {.path = path};
	struct stat st;
	TIFF *tif;
	int rc = open_tiff(path, &diag, &tif, &st, e);
	if (rc)
		return rc;
	char *desc = NULL;
	probe pr = {.path = path, .tif = tif, .diag = &diag, .file_size = (uint64_t)st.st_size};
	sf_slide_info *s = calloc(1, sizeof *s);
	if (!s || !(s->path = strdup(path)) || read_description(tif, &desc)) {
		rc = sf_fail(e, SF_ENOMEM, "%s: out of memory", path);
		goto out;
	}
	s->file_size = (uint64_t)st.st_size;
	s->mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
	rc = read_main_chain(tif, path, &diag, pr.file_size, &pr.pages, &pr.page_count, e);
	if (!rc)
		rc = choose_layout(&pr, s, desc, e);
	/* Every level must decode to level 0's layout (checked per page above
	 * for type; here for the codec of each IFD of each level), in units a
	 * reader can hold.  A SubIFD level's channels were checked as they were
	 * read (levels_from_subifds); a main-chain level's are pages. */
	for (uint32_t l = 0; !rc && l < pr.level_count; l++) {
		uint32_t n = s->levels[l].subifd >= 0 ? 1 : s->channels;
		for (uint32_t c = 0; !rc && c < n; c++) {
			char where[48];
			snprintf(where, sizeof where, "level %u channel %u", l, c);
			rc = check_decodable(
			    path, where,
			    c == 0 ? &pr.levels[l].desc : &pr.pages[s->levels[l].dir[c]], e);
		}
	}
out:
	probe_free(&pr);
	free(desc);
	TIFFClose(tif);
	if (rc) {
		sf_slide_info_free(s);
		return rc;
	}
	s->share = share_new();
	*out = s;
	return SF_OK;
}

/* ---- reading ------------------------------------------------------------- */

/* One decoded tile or strip. */
typedef struct lru_entry {
	uint64_t ifd;  /* IFD offset; 0 = empty slot */
	uint32_t unit; /* tile or strip index */
	uint64_t used; /* reader clock at last use */
	size_t bytes, cap;
	uint8_t *data;
} lru_entry;

/* Geometry of the current directory, as the reader needs it. */
typedef struct dir_geom {
	uint32_t width, height;
	int tiled;
	uint32_t unit_w, unit_h; /* tile size, or width x rows per strip */
	uint32_t units_across;
	uint32_t sample_bytes, pixel_bytes;
	int raw;  /* uncompressed, MSB-first fill order: read bytes with pread */
	int swab; /* file byte order differs from ours */
} dir_geom;

struct sf_slide_reader {
	const sf_slide_info *s; /* borrowed, outlives the reader */
	TIFF *tif;
	int fd;         /* libtiff's descriptor, for pread of uncompressed data */
	tiff_diag diag; /* libtiff's messages for tif */
	uint64_t cur;   /* offset of the current directory; 0 before the first switch */
	uint32_t cur_level, cur_channel;
	/* Added to every strip offset: the channel's plane past page 0's data
	 * in ImageJ's one-IFD layout (sf_slide_info.contig_planes), else 0. */
	uint64_t plane_shift;
	dir_geom g;
	uint8_t *span; /* rows of uncompressed data read in one go */
	size_t span_cap;
	lru_entry lru[LRU_SLOTS];
	size_t lru_bytes;
	uint64_t clock;
	uint64_t decodes;
};

int sf_slide_reader_open(const sf_slide_info *s, sf_slide_reader **out, sf_err *e)
{
	*out = NULL;
	sf_slide_reader *r = calloc(1, sizeof *r);
	if (!r)
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", s->path);
	struct stat st;
	int rc = open_tiff(s->path, &r->diag, &r->tif, &st, e);
	if (rc) {
		free(r);
		return rc;
	}
	int64_t mtime = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
	if ((uint64_t)st.st_size != s->file_size || mtime != s->mtime_ns) {
		sf_slide_reader_close(r);
		return sf_fail(e, SF_EFORMAT, "%s: changed since it was scanned (size or mtime)",
		               s->path);
	}
	r->s = s;
	r->fd = TIFFFileno(r->tif);
	*out = r;
	return SF_OK;
}

void sf_slide_reader_close(sf_slide_reader *r)
{
	if (!r)
		return;
	for (int i = 0; i < LRU_SLOTS; i++)
		free(r->lru[i].data);
	free(r->span);
	if (r->tif)
		TIFFClose(r->tif);
	free(r);
}

uint64_t sf_slide_reader_decodes(const sf_slide_reader *r)
{
	return r->decodes;
}

/* Make the IFD of (level, channel) current and note its geometry. */
static int select_dir(sf_slide_reader *r, uint32_t level, uint32_t channel, sf_err *e)
{
	const sf_slide_info *s = r->s;
	uint64_t off = s->levels[level].ifd_offset[channel];
	if (off == r->cur)
		return SF_OK;
	r->cur = 0;
	r->diag.msg[0] = '\0';
	if (!TIFFSetSubDirectory(r->tif, off))
		return sf_fail(e, SF_EFORMAT, "%s: level %u channel %u: cannot read its IFD: %s",
		               s->path, level, channel, diag_text(&r->diag));
	dir_geom *g = &r->g;
	uint16_t photometric = 0, compression = 0, fill = 0;
	memset(g, 0, sizeof *g);
	TIFFGetField(r->tif, TIFFTAG_IMAGEWIDTH, &g->width);
	TIFFGetField(r->tif, TIFFTAG_IMAGELENGTH, &g->height);
	TIFFGetFieldDefaulted(r->tif, TIFFTAG_COMPRESSION, &compression);
	TIFFGetFieldDefaulted(r->tif, TIFFTAG_FILLORDER, &fill);
	if (!TIFFGetField(r->tif, TIFFTAG_PHOTOMETRIC, &photometric))
		photometric = 0;
	if (compression == COMPRESSION_JPEG && photometric == PHOTOMETRIC_YCBCR)
		TIFFSetField(r->tif, TIFFTAG_JPEGCOLORMODE, JPEGCOLORMODE_RGB);
	g->tiled = TIFFIsTiled(r->tif);
	if (g->tiled) {
		TIFFGetField(r->tif, TIFFTAG_TILEWIDTH, &g->unit_w);
		TIFFGetField(r->tif, TIFFTAG_TILELENGTH, &g->unit_h);
	} else {
		g->unit_w = g->width;
		TIFFGetFieldDefaulted(r->tif, TIFFTAG_ROWSPERSTRIP, &g->unit_h);
		if (g->unit_h == 0 || g->unit_h > g->height)
			g->unit_h = g->height;
	}
	if (g->width != s->levels[level].width || g->height != s->levels[level].height ||
	    !g->unit_w || !g->unit_h)
		return sf_fail(e, SF_EFORMAT, "%s: level %u channel %u: IFD differs from the probe",
		               s->path, level, channel);
	g->units_across = (g->width + g->unit_w - 1) / g->unit_w;
	g->sample_bytes = (uint32_t)sf_dtype_bytes(s->dtype);
	g->pixel_bytes = g->sample_bytes * s->samples;
	g->raw = compression == COMPRESSION_NONE && fill == FILLORDER_MSB2LSB;
	g->swab = TIFFIsByteSwapped(r->tif) && g->sample_bytes > 1;
	r->cur = off;
	r->cur_level = level;
	r->cur_channel = channel;
	return SF_OK;
}

/* The part of a unit the rect needs, in level pixels. */
typedef struct unit_part {
	uint32_t index;          /* tile or strip number */
	uint32_t ux, uy;         /* unit origin */
	uint32_t x0, y0, x1, y1; /* intersection with the rect, half-open */
} unit_part;

/* The caller's rect and buffer. */
typedef struct region {
	int64_t x, y;
	uint32_t w, h;
	uint8_t *dst;
	size_t dst_stride;
} region;

static uint8_t *region_at(const region *rg, const dir_geom *g, uint32_t col, uint32_t row)
{
	return rg->dst + (size_t)((int64_t)row - rg->y) * rg->dst_stride +
	       (size_t)((int64_t)col - rg->x) * g->pixel_bytes;
}

static void swab_row(const dir_geom *g, uint8_t *p, size_t samples)
{
	if (!g->swab)
		return;
	if (g->sample_bytes == 2)
		TIFFSwabArrayOfShort((uint16_t *)(void *)p, (tmsize_t)samples);
	else
		TIFFSwabArrayOfLong((uint32_t *)(void *)p, (tmsize_t)samples);
}

static void zero_part(const region *rg, const dir_geom *g, const unit_part *u)
{
	size_t row_bytes = (size_t)(u->x1 - u->x0) * g->pixel_bytes;
	for (uint32_t row = u->y0; row < u->y1; row++)
		memset(region_at(rg, g, u->x0, row), 0, row_bytes);
}

static int pread_full(sf_slide_reader *r, void *buf, size_t n, uint64_t off, sf_err *e)
{
	uint8_t *p = buf;
	while (n > 0) {
		ssize_t got = pread(r->fd, p, n, (off_t)off);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0)
			return sf_fail(e, SF_EIO, "%s: read failed: %s", r->s->path,
			               strerror(errno));
		if (got == 0)
			return sf_fail(e, SF_EFORMAT, "%s: truncated: no data at byte %llu",
			               r->s->path, (unsigned long long)off);
		p += got;
		n -= (size_t)got;
		off += (uint64_t)got;
	}
	return SF_OK;
}

/* Uncompressed unit: read only the bytes of the part, straight from the file. */
static int copy_raw(sf_slide_reader *r, const region *rg, const unit_part *u, sf_err *e)
{
	const dir_geom *g = &r->g;
	const char *unit = g->tiled ? "tile" : "strip";
	int err = 0;
	uint64_t off = TIFFGetStrileOffsetWithErr(r->tif, u->index, &err) + r->plane_shift;
	uint64_t len = err ? 0 : TIFFGetStrileByteCountWithErr(r->tif, u->index, &err);
	if (err)
		return sf_fail(e, SF_EFORMAT, "%s: level %u: no offset for %s %u", r->s->path,
		               r->cur_level, unit, u->index);
	if (len == 0) {
		zero_part(rg, g, u);
		return SF_OK;
	}
	size_t stride = (size_t)g->unit_w * g->pixel_bytes;
	size_t row_bytes = (size_t)(u->x1 - u->x0) * g->pixel_bytes;
	size_t skip = (size_t)(u->x0 - u->ux) * g->pixel_bytes;
	uint32_t rows = u->y1 - u->y0;
	uint64_t first = (uint64_t)(u->y0 - u->uy) * stride;
	uint64_t need = first + (uint64_t)(rows - 1) * stride + skip + row_bytes;
	if (need > len)
		return sf_fail(e, SF_EFORMAT, "%s: level %u: %s %u holds %llu bytes, needs %llu",
		               r->s->path, r->cur_level, unit, u->index, (unsigned long long)len,
		               (unsigned long long)need);
	size_t span = (size_t)(need - first);
	int rc = SF_OK;
	if (row_bytes == stride && rg->dst_stride == stride) {
		/* Whole rows of the unit land contiguously in dst. */
		uint8_t *d = region_at(rg, g, u->x0, u->y0);
		rc = pread_full(r, d, span, off + first, e);
		if (!rc)
			swab_row(g, d, span / g->sample_bytes);
		return rc;
	}
	if (span <= SPAN_READ_MAX || span <= 4 * (size_t)rows * row_bytes ||
	    (stride - row_bytes <= SPAN_SKIP_MAX && span <= SPAN_READ_CAP)) {
		/* One read of the rows, then copy the columns out. */
		if (span > r->span_cap) {
			uint8_t *ns = realloc(r->span, span);
			if (!ns)
				return sf_fail(e, SF_ENOMEM, "%s: out of memory", r->s->path);
			r->span = ns;
			r->span_cap = span;
		}
		rc = pread_full(r, r->span, span, off + first, e);
		for (uint32_t i = 0; !rc && i < rows; i++) {
			uint8_t *d = region_at(rg, g, u->x0, u->y0 + i);
			memcpy(d, r->span + (size_t)i * stride + skip, row_bytes);
			swab_row(g, d, row_bytes / g->sample_bytes);
		}
		return rc;
	}
	/* Wide unit, narrow rect: a read per row beats reading it all. */
	for (uint32_t i = 0; !rc && i < rows; i++) {
		uint8_t *d = region_at(rg, g, u->x0, u->y0 + i);
		rc = pread_full(r, d, row_bytes, off + first + (uint64_t)i * stride + skip, e);
		if (!rc)
			swab_row(g, d, row_bytes / g->sample_bytes);
	}
	return rc;
}

static void lru_drop(sf_slide_reader *r, lru_entry *le)
{
	r->lru_bytes -= le->cap;
	free(le->data);
	memset(le, 0, sizeof *le);
}

/* A slot for a decoded unit of bytes bytes: reuse the least recently used
 * one, and drop others while the reader holds more than LRU_BUDGET. */
static lru_entry *lru_slot(sf_slide_reader *r, size_t bytes)
{
	lru_entry *victim = NULL;
	for (int i = 0; i < LRU_SLOTS; i++) {
		lru_entry *le = &r->lru[i];
		if (!le->data) {
			victim = le;
			break;
		}
		if (!victim || le->used < victim->used)
			victim = le;
	}
	victim->ifd = 0; /* invalid until decoded */
	for (int i = 0; i < LRU_SLOTS && r->lru_bytes - victim->cap + bytes > LRU_BUDGET; i++) {
		lru_entry *le = &r->lru[i];
		if (le != victim && le->data)
			lru_drop(r, le);
	}
	if (victim->cap < bytes) {
		uint8_t *nd = realloc(victim->data, bytes);
		if (!nd)
			return NULL;
		r->lru_bytes += bytes - victim->cap;
		victim->data = nd;
		victim->cap = bytes;
	}
	return victim;
}

/* Decode unit u of the current directory into buf (bytes bytes). */
static int decode_into(sf_slide_reader *r, const unit_part *u, uint8_t *buf, size_t bytes,
                       sf_err *e)
{
	const dir_geom *g = &r->g;
	const char *unit = g->tiled ? "tile" : "strip";
	int err = 0;
	uint64_t len = TIFFGetStrileByteCountWithErr(r->tif, u->index, &err);
	r->diag.msg[0] = '\0';
	r->decodes++;
	if (!err && len == 0) {
		memset(buf, 0, bytes); /* sparse unit */
		return SF_OK;
	}
	tmsize_t got = g->tiled ? TIFFReadEncodedTile(r->tif, u->index, buf, (tmsize_t)bytes)
	                        : TIFFReadEncodedStrip(r->tif, u->index, buf, (tmsize_t)bytes);
	if (err || got < 0 || (size_t)got < bytes)
		return sf_fail(e, SF_EFORMAT, "%s: level %u channel %u: cannot decode %s %u: %s",
		               r->s->path, r->cur_level, r->cur_channel, unit, u->index,
		               err       ? "no offset"
		               : got < 0 ? diag_text(&r->diag)
		                         : "short data");
	return SF_OK;
}

/* The unit from the slide's share, decoding it there if no reader has:
 * SF_OK with *pin set (the caller unpins it after use), SF_OK with *pin
 * NULL when the share cannot take it (decode privately), or a decode error. */
static int shared_unit(sf_slide_reader *r, const unit_part *u, size_t bytes, share_entry **pin,
                       sf_err *e)
{
	struct sf_tile_share *sh = r->s->share;
	share_entry *se;
	*pin = NULL;
	pthread_mutex_lock(&sh->lock);
	while ((se = share_find(sh, r->cur, u->index)) && !se->ready && se->bytes == bytes)
		pthread_cond_wait(&sh->changed, &sh->lock); /* another reader decodes it */
	if (se && se->bytes != bytes) {
		pthread_mutex_unlock(&sh->lock); /* cannot happen for one IFD; be safe */
		return SF_OK;
	}
	if (se) {
		se->pins++;
		se->used = ++sh->clock;
		pthread_mutex_unlock(&sh->lock);
		*pin = se;
		return SF_OK;
	}
	se = share_claim(sh, r->cur, u->index, r->cur_level, bytes);
	pthread_mutex_unlock(&sh->lock);
	if (!se)
		return SF_OK;
	int rc = decode_into(r, u, se->data, bytes, e);
	pthread_mutex_lock(&sh->lock);
	if (rc != SF_OK) {
		share_account(-(long long)se->bytes);
		share_drop(sh, se); /* waiters retry, and fail or succeed themselves */
	} else
		se->ready = 1;
	pthread_cond_broadcast(&sh->changed);
	pthread_mutex_unlock(&sh->lock);
	if (rc == SF_OK)
		*pin = se;
	return rc;
}

/* Point *out at the decoded unit u->index of the current directory: in the
 * slide's share (*pin set: unpin it after use), else in this reader's LRU
 * (*pin NULL), decoding it when neither has it. */
static int decoded_unit(sf_slide_reader *r, const unit_part *u, const uint8_t **out,
                        share_entry **pin, sf_err *e)
{
	const dir_geom *g = &r->g;
	uint32_t rows =
	    g->tiled ? g->unit_h : (g->height - u->uy < g->unit_h ? g->height - u->uy : g->unit_h);
	size_t bytes = (size_t)g->unit_w * rows * g->pixel_bytes;
	*pin = NULL;
	if (r->s->share) {
		int rc = shared_unit(r, u, bytes, pin, e);
		if (rc != SF_OK || *pin) {
			*out = *pin ? (*pin)->data : NULL;
			return rc;
		}
	}
	r->clock++;
	for (int i = 0; i < LRU_SLOTS; i++) {
		lru_entry *le = &r->lru[i];
		if (le->ifd == r->cur && le->unit == u->index) {
			le->used = r->clock;
			*out = le->data;
			return SF_OK;
		}
	}
	lru_entry *le = lru_slot(r, bytes);
	if (!le)
		return sf_fail(e, SF_ENOMEM, "%s: out of memory for a decoded %s", r->s->path,
		               g->tiled ? "tile" : "strip");
	int rc = decode_into(r, u, le->data, bytes, e);
	if (rc != SF_OK)
		return rc;
	le->ifd = r->cur;
	le->unit = u->index;
	le->bytes = bytes;
	le->used = r->clock;
	*out = le->data;
	return SF_OK;
}

static int copy_decoded(sf_slide_reader *r, const region *rg, const unit_part *u, sf_err *e)
{
	const dir_geom *g = &r->g;
	const uint8_t *src = NULL;
	share_entry *pin = NULL;
	int rc = decoded_unit(r, u, &src, &pin, e);
	if (rc)
		return rc;
	size_t stride = (size_t)g->unit_w * g->pixel_bytes;
	size_t row_bytes = (size_t)(u->x1 - u->x0) * g->pixel_bytes;
	size_t skip = (size_t)(u->x0 - u->ux) * g->pixel_bytes;
	for (uint32_t row = u->y0; row < u->y1; row++)
		memcpy(region_at(rg, g, u->x0, row), src + (size_t)(row - u->uy) * stride + skip,
		       row_bytes);
	if (pin)
		share_unpin(r->s->share, pin);
	return SF_OK;
}

int sf_slide_read_region(sf_slide_reader *r, uint32_t level, uint32_t channel, int64_t x, int64_t y,
                         uint32_t w, uint32_t h, void *dst, sf_err *e)
{
	const sf_slide_info *s = r->s;
	if (level >= s->level_count || channel >= s->channels)
		return sf_fail(e, SF_EINVAL, "%s: no level %u channel %u (%u levels, %u channels)",
		               s->path, level, channel, s->level_count, s->channels);
	if (w == 0 || h == 0)
		return SF_OK;
	size_t pixel_bytes = sf_dtype_bytes(s->dtype) * s->samples;
	if ((uint64_t)w * h > SIZE_MAX / pixel_bytes || x > INT64_MAX - w || y > INT64_MAX - h)
		return sf_fail(e, SF_ERANGE, "%s: region %ux%u at (%lld, %lld) overflows", s->path,
		               w, h, (long long)x, (long long)y);
	const sf_slide_level *lv = &s->levels[level];
	region rg = {x, y, w, h, dst, (size_t)w * pixel_bytes};
	int64_t x0 = x > 0 ? x : 0, y0 = y > 0 ? y : 0;
	int64_t x1 = x + w < (int64_t)lv->width ? x + w : (int64_t)lv->width;
	int64_t y1 = y + h < (int64_t)lv->height ? y + h : (int64_t)lv->height;
	if (x0 != x || y0 != y || x1 != x + w || y1 != y + h)
		memset(dst, 0, (size_t)w * h * pixel_bytes); /* pixels outside the level */
	if (x0 >= x1 || y0 >= y1)
		return SF_OK;
	int rc = select_dir(r, level, channel, e);
	if (rc)
		return rc;
	const dir_geom *g = &r->g;
	r->plane_shift = 0;
	if (s->contig_planes > 1 && s->channels == s->contig_planes) {
		/* The probe saw the one IFD uncompressed and the file long enough for
		 * every plane; a decoder would serve plane 0 for each. */
		if (!g->raw)
			return sf_fail(e, SF_EFORMAT, "%s: plane %u: its IFD is not uncompressed",
			               s->path, channel);
		r->plane_shift = (uint64_t)channel * s->contig_stride;
		r->cur_channel = channel;
	}
	for (uint32_t ty = (uint32_t)y0 / g->unit_h; !rc && (int64_t)ty * g->unit_h < y1; ty++) {
		for (uint32_t tx = (uint32_t)x0 / g->unit_w; !rc && (int64_t)tx * g->unit_w < x1;
		     tx++) {
			unit_part u;
			u.ux = tx * g->unit_w;
			u.uy = ty * g->unit_h;
			u.index = g->tiled ? ty * g->units_across + tx : ty;
			u.x0 = (uint32_t)(x0 > u.ux ? x0 : u.ux);
			u.y0 = (uint32_t)(y0 > u.uy ? y0 : u.uy);
			u.x1 = (uint32_t)(x1 < (int64_t)u.ux + g->unit_w ? x1 : u.ux + g->unit_w);
			u.y1 = (uint32_t)(y1 < (int64_t)u.uy + g->unit_h ? y1 : u.uy + g->unit_h);
			rc = g->raw ? copy_raw(r, &rg, &u, e) : copy_decoded(r, &rg, &u, e);
		}
	}
	return rc;
}

/* tiff_layout.h — the byte layout of a virtual TIFF file.
 *
 * A layout is the complete description of a TIFF file whose header (every
 * IFD, tag value and offset array) sits in bytes [0, header_size) and whose
 * pixel data follows, uncompressed, at offsets known by arithmetic.  So the
 * exact file size is known before any pixel is computed, and a reader that
 * parses the header touches no pixels.  header_size is a multiple of 4096
 * (zero padded); the bytes are little-endian ("II") and the same spec always
 * gives the same bytes.
 *
 * Pixel data is grouped in units, the thing the tile engine computes:
 *  - tiled files (spec.tile > 0): a tile position (level, tx, ty) holds that
 *    tile of every page, page after page; each page's tile is
 *    tile*tile*samples*bytes, row-major, samples interleaved, edge tiles
 *    padded to full size (TIFF requires it).  Positions are ordered by
 *    level, then ty, then tx, so sequential reads walk the image in raster
 *    order.  A unit is one position's tiles of every page, or, when that
 *    would pass spec.unit_bytes_max, of a group of consecutive pages
 *    (sf_layout_unit_pages); a position's groups are consecutive units.
 *    Page first + i's tile of unit u starts at unit_offset(u) +
 *    i * page_bytes(u).
 *  - strip files (spec.tile == 0, one page, one level; for ImageJ): a unit is
 *    one strip of rows_per_strip rows (the last one shorter), width*samples*bytes
 *    per row; unit_index(0, 0, strip).  rows_per_strip makes a strip about
 *    256 KiB (at least one row).
 * Units are contiguous: unit u + 1 starts where unit u ends, unit 0 at
 * header_size, and the last unit ends at file_size.
 * Page 0's IFD carries the ImageDescription (OME-XML) when given, or
 * ImageJ's calibration (imagej_pixel_um, for strip files).  Reduced
 * levels are SubIFDs of each page (NewSubfileType 1, largest first), level l
 * being ceil(width / 2^l) x ceil(height / 2^l) unless level sizes are given.
 * Photometric is MinIsBlack (samples 1) or RGB (samples 3), Compression none,
 * PlanarConfig contig; X/YResolution (ResolutionUnit centimetre) are level
 * 0's divided by 2^l at level l (its pixels are 2^l times level 0's, also
 * where its size was rounded).  The header, whatever its tags, is built before the
 * layout exists, so header_size and every offset account for it.
 *
 * BigTIFF: a file whose size would not fit in 32 bits is BigTIFF when
 * bigtiff == -1 and fails with SF_ERANGE when bigtiff == 0; bigtiff == 1
 * always gives BigTIFF.  Strip files are for ImageJ, which cannot read
 * BigTIFF, so for them -1 behaves like 0 (only 1 forces BigTIFF).
 *
 * A layout is immutable after sf_layout_create, so any number of threads may
 * query it at once.  Queries with a level or unit out of range return 0
 * (sf_layout_unit_offset of unit >= unit_count returns file_size;
 * sf_layout_unit_pos sets *level = levels and *tx = *ty = 0). */
#ifndef SCOPEFS_TIFF_LAYOUT_H
#define SCOPEFS_TIFF_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

#include "scopefs/err.h"
#include "scopefs/key.h"
#include "scopefs/pixel.h"

#define SF_LAYOUT_MAX_LEVELS 24
#define SF_LAYOUT_MAX_PAGES  65535
#define SF_LAYOUT_MAX_TILE   8192 /* tile edge limit: a page's tile stays under 1 GiB */

typedef struct sf_layout_spec {
	uint32_t width, height; /* level 0, pixels */
	uint32_t pages;         /* main-chain IFDs: channels, 1..SF_LAYOUT_MAX_PAGES */
	uint32_t samples;       /* samples per pixel: 1, or 3 for interleaved RGB */
	sf_dtype dtype;
	uint32_t tile; /* tile edge (multiple of 16, 16..SF_LAYOUT_MAX_TILE), 0 for a strip file */
	uint32_t levels; /* 1 + number of reduced levels (SubIFDs), 1..SF_LAYOUT_MAX_LEVELS */
	/* Optional level sizes (levels entries each, both or neither); NULL:
	 * ceil halving.  Entry 0 must equal width/height and sizes must not
	 * grow from one level to the next. */
	const uint32_t *level_width, *level_height;
	const char *description; /* page 0 ImageDescription (UTF-8), or NULL */
	int bigtiff;             /* -1: when needed, 0: never (fail if needed), 1: always */
	double resolution_x, resolution_y; /* pixels per centimetre, 0: omit */
	/* Strip files (ImageJ planes): the voxel size in micrometres, 0: unknown.
	 * imagej_pixel_um > 0 writes ImageJ 1.x's own calibration, which Fiji's
	 * File > Import > Image Sequence gives the whole stack: X/YResolution
	 * 1 / imagej_pixel_um (pixels per micron) with ResolutionUnit none, and
	 * page 0's ImageDescription "ImageJ=1.11a\nunit=micron\n", plus
	 * "spacing=<imagej_spacing_um>\n" when that is > 0.  Not together with
	 * description or resolution_x/y (they would contradict it); a spacing
	 * needs a pixel size.  A size outside 0.0001-10000 um (no plausible
	 * voxel) is not written: no calibration, or no spacing. */
	double imagej_pixel_um, imagej_spacing_um;
	/* Tiled files: split a position into page groups when all its pages
	 * together pass this many bytes, so a unit stays small however many
	 * channels there are (at least one page per unit).  0: no limit. */
	uint64_t unit_bytes_max;
} sf_layout_spec;

typedef struct sf_layout sf_layout;

/* Build the layout and its header bytes.  Fails with SF_EINVAL for a spec
 * that cannot be a TIFF, SF_ERANGE when it needs BigTIFF and may not have it
 * (or sizes overflow), SF_ENOMEM, or SF_EFORMAT if libtiff misbehaves.
 * The spec's pointers are not kept.  On success *out is owned by the caller
 * (sf_layout_free); on failure *out is NULL. */
int sf_layout_create(const sf_layout_spec *spec, sf_layout **out, sf_err *e);
void sf_layout_free(sf_layout *l);

uint64_t sf_layout_file_size(const sf_layout *l);
uint64_t sf_layout_header_size(const sf_layout *l);
const uint8_t *sf_layout_header(const sf_layout *l);
int sf_layout_is_bigtiff(const sf_layout *l);
/* The spec as built: description NULL, level_width/level_height point to
 * the layout's own level sizes (valid until sf_layout_free). */
const sf_layout_spec *sf_layout_get_spec(const sf_layout *l);

uint32_t sf_layout_levels(const sf_layout *l);
uint32_t sf_layout_level_width(const sf_layout *l, uint32_t level);
uint32_t sf_layout_level_height(const sf_layout *l, uint32_t level);
/* Tiles across and down at level (strip files: 1 across, strips down). */
uint32_t sf_layout_tiles_across(const sf_layout *l, uint32_t level);
uint32_t sf_layout_tiles_down(const sf_layout *l, uint32_t level);
/* Rows in one strip (strip files) or the tile edge (tiled files). */
uint32_t sf_layout_unit_rows(const sf_layout *l);

uint64_t sf_layout_unit_count(const sf_layout *l);
/* The unit holding page 0 of tile position (level, tx, ty). */
uint64_t sf_layout_unit_index(const sf_layout *l, uint32_t level, uint32_t tx, uint32_t ty);
/* The unit holding page `page` of that position, and where its tile starts
 * inside the unit (*within may be NULL). */
uint64_t sf_layout_page_unit(const sf_layout *l, uint32_t level, uint32_t tx, uint32_t ty,
                             uint32_t page, uint64_t *within);
/* The pages unit u holds: first, first + 1, ..., first + count - 1 (strip
 * files: page 0 only).  Out of range: 0 and 0. */
void sf_layout_unit_pages(const sf_layout *l, uint64_t unit, uint32_t *first, uint32_t *count);
/* Pages in the largest unit: every page unless split by unit_bytes_max. */
uint32_t sf_layout_unit_pages_max(const sf_layout *l);
/* A product key with the layout's page groups mixed in when a position is
 * split (unit u then holds other bytes); k itself when it is not, so the
 * keys, and disk caches, of ungrouped files do not change. */
sf_key sf_layout_key_units(sf_key k, const sf_layout *l);
void sf_layout_unit_pos(const sf_layout *l, uint64_t unit, uint32_t *level, uint32_t *tx,
                        uint32_t *ty);
uint64_t sf_layout_unit_offset(const sf_layout *l, uint64_t unit); /* first byte in the file */
size_t sf_layout_unit_bytes(const sf_layout *l, uint64_t unit);
/* Bytes of one page's tile inside a unit (tiled: tile*tile*samples*bytes;
 * strip files: the strip, which is the whole unit). */
size_t sf_layout_page_bytes(const sf_layout *l, uint64_t unit);

/* The unit holding file byte off (header_size <= off < file_size) and the
 * offset of that byte inside the unit.  Outside that range: returns
 * sf_layout_unit_count(l) and sets *within to 0. */
uint64_t sf_layout_unit_at(const sf_layout *l, uint64_t off, uint64_t *within);

#endif

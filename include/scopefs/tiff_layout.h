/* tiff_layout.h — the byte layout of a virtual TIFF file.
 *
 * A layout is the complete description of a TIFF file whose header (every
 * IFD, tag value and offset array) sits in bytes [0, header_size) and whose
 * pixel data follows, uncompressed, at offsets known by arithmetic.  So the
 * exact file size is known before any pixel is computed, and a reader that
 * parses the header touches no pixels.
 *
 * Pixel data is grouped in units, the thing the tile engine computes:
 *  - tiled files (spec.tile > 0): a unit is one tile position (level, tx, ty)
 *    holding that tile of every page, page after page; each page's tile is
 *    tile*tile*samples*bytes, row-major, samples interleaved, edge tiles
 *    padded to full size (TIFF requires it).  Units are ordered by level,
 *    then ty, then tx, so sequential reads walk the image in raster order.
 *  - strip files (spec.tile == 0, one page, one level; for ImageJ): a unit is
 *    one strip of rows_per_strip rows (the last one shorter), width*samples*bytes
 *    per row.
 * Page 0's IFD carries the ImageDescription (OME-XML) when given.  Reduced
 * levels are SubIFDs of each page (NewSubfileType 1), level l being
 * ceil(width / 2^l) x ceil(height / 2^l) unless level sizes are given.
 * The file is BigTIFF when it would pass 4 GiB (or when forced). */
#ifndef SCOPEFS_TIFF_LAYOUT_H
#define SCOPEFS_TIFF_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

#include "scopefs/err.h"
#include "scopefs/pixel.h"

#define SF_LAYOUT_MAX_LEVELS 24

typedef struct sf_layout_spec {
	uint32_t width, height; /* level 0, pixels */
	uint32_t pages;         /* main-chain IFDs: channels, >= 1 */
	uint32_t samples;       /* samples per pixel: 1, or 3 for interleaved RGB */
	sf_dtype dtype;
	uint32_t tile;   /* tile edge (multiple of 16), 0 for a strip file */
	uint32_t levels; /* 1 + number of reduced levels (SubIFDs) */
	/* Optional level sizes (levels entries each); NULL: ceil halving. */
	const uint32_t *level_width, *level_height;
	const char *description; /* page 0 ImageDescription (UTF-8), or NULL */
	int bigtiff;             /* -1: when needed, 0: never (fail if needed), 1: always */
	double resolution_x, resolution_y; /* pixels per centimetre, 0: omit */
} sf_layout_spec;

typedef struct sf_layout sf_layout;

/* Build the layout and its header bytes.  Fails with SF_EINVAL for a spec
 * that cannot be a TIFF, SF_ERANGE when it needs BigTIFF and bigtiff == 0. */
int sf_layout_create(const sf_layout_spec *spec, sf_layout **out, sf_err *e);
void sf_layout_free(sf_layout *l);

uint64_t sf_layout_file_size(const sf_layout *l);
uint64_t sf_layout_header_size(const sf_layout *l);
const uint8_t *sf_layout_header(const sf_layout *l);
int sf_layout_is_bigtiff(const sf_layout *l);
const sf_layout_spec *sf_layout_get_spec(const sf_layout *l); /* strings not kept */

uint32_t sf_layout_levels(const sf_layout *l);
uint32_t sf_layout_level_width(const sf_layout *l, uint32_t level);
uint32_t sf_layout_level_height(const sf_layout *l, uint32_t level);
/* Tiles across and down at level (strip files: 1 across, strips down). */
uint32_t sf_layout_tiles_across(const sf_layout *l, uint32_t level);
uint32_t sf_layout_tiles_down(const sf_layout *l, uint32_t level);
/* Rows in one strip (strip files) or the tile edge (tiled files). */
uint32_t sf_layout_unit_rows(const sf_layout *l);

uint64_t sf_layout_unit_count(const sf_layout *l);
uint64_t sf_layout_unit_index(const sf_layout *l, uint32_t level, uint32_t tx, uint32_t ty);
void sf_layout_unit_pos(const sf_layout *l, uint64_t unit, uint32_t *level, uint32_t *tx,
                        uint32_t *ty);
uint64_t sf_layout_unit_offset(const sf_layout *l, uint64_t unit); /* first byte in the file */
size_t sf_layout_unit_bytes(const sf_layout *l, uint64_t unit);
/* Bytes of one page's tile inside a unit (tiled: tile*tile*samples*bytes). */
size_t sf_layout_page_bytes(const sf_layout *l, uint64_t unit);

/* The unit holding file byte off (header_size <= off < file_size) and the
 * offset of that byte inside the unit. */
uint64_t sf_layout_unit_at(const sf_layout *l, uint64_t off, uint64_t *within);

#endif

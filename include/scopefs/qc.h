/* qc.h — registration QC overlays: qc/<stem>.png for each moving slide.
 *
 * The overlay shows the reference's registration channel in magenta (R and
 * B) and the warped moving slide's in green (G), so structure that lines up
 * is grey-to-white and misregistration shows as magenta/green fringes.
 *
 *  - Pixels come from the two registered/ virtual files at one output level,
 *    read through the tile engine (sf_engine_read), so the tiles are computed
 *    once, cached, and shared with readers of registered/.
 *  - Level: the finest level whose longest side is at most SF_QC_MAX_SIDE
 *    (for a halving pyramid that side is in (SF_QC_MAX_SIDE / 2,
 *    SF_QC_MAX_SIDE]); level 0 when it already fits.
 *  - Registration channel: the one reg_channel names (sf_qc_channel), as
 *    scopefs's own registration uses; by default the first channel whose
 *    name contains "DAPI" or "Hoechst" (any case), else channel 0.  A slide
 *    warped through a transform file that lacks the named channel shows
 *    the default one.  An RGB (3-sample) slide shows
 *    its inverted luminance -(0.299 R + 0.587 G + 0.114 B), so stained
 *    tissue on a bright background is bright in the overlay.
 *  - Contrast: each side is stretched on its own from its 1st to its 99th
 *    percentile to 0..255 (percentiles of a 65536-bin histogram between the
 *    side's finite minimum and maximum).  Equal inputs give equal bytes, so
 *    an identity registration gives R == G == B exactly.
 *  - Output: an 8-bit RGB PNG (libpng, zlib level 6), made in memory.
 *
 * A PNG's size is known only after encoding, and getattr must give the
 * exact size, so a sf_qc renders once, on first use (sf_qc_get, under its
 * own mutex), and keeps the bytes for the mount's life.  A failed render
 * is not kept: the next sf_qc_get tries again. */
#ifndef SCOPEFS_QC_H
#define SCOPEFS_QC_H

#include <stddef.h>
#include <stdint.h>

#include "scopefs/engine.h"
#include "scopefs/err.h"
#include "scopefs/slide.h"
#include "scopefs/vfile.h"

#define SF_QC_MAX_SIDE 2000

/* One side of an overlay: a tiled virtual file and the page shown. */
typedef struct sf_qc_side {
	const sf_vfile *vfile; /* borrowed; its layout and product outlive the sf_qc */
	uint32_t channel;      /* page (planar channel) of the layout */
} sf_qc_side;

/* The registration channel of s into *out: the one want (reg_channel) names,
 * by whole name (any case), else by index, else the first name that
 * contains it (so "DAPI" finds a cyclic round's "DAPI R2"); SF_EINVAL naming
 * the file and the option when none does.  want NULL or "": the first
 * channel whose name contains "DAPI" or "Hoechst" (any case), else 0. */
int sf_qc_channel(const sf_slide_info *s, const char *want, uint32_t *out, sf_err *e);

/* The level of l an overlay is made from (see above). */
uint32_t sf_qc_level(const sf_layout *l);

/* Render the overlay of ref (magenta) and mov (green) into a malloc'd PNG
 * (*png, *len; the caller frees).  Both files must be tiled with the same
 * level sizes; SF_EINVAL otherwise.  A failed tile read gives its code and
 * message; SF_ENOMEM or SF_EFORMAT (libpng) otherwise. */
int sf_qc_render(sf_engine *g, const sf_qc_side *ref, const sf_qc_side *mov, uint8_t **png,
                 size_t *len, sf_err *e);

typedef struct sf_qc sf_qc;

/* A lazily rendered overlay named name (for messages). */
int sf_qc_create(const sf_qc_side *ref, const sf_qc_side *mov, const char *name, sf_qc **out,
                 sf_err *e);
void sf_qc_free(sf_qc *q);

/* The overlay's PNG bytes, rendered on the first call (concurrent callers
 * wait for that one render).  The bytes stay valid and unchanged until
 * sf_qc_free.  Thread-safe. */
int sf_qc_get(sf_qc *q, sf_engine *g, const uint8_t **png, size_t *len, sf_err *e);

#endif

/* products.h — the products scopefs serves, and the pyramid plan they share.
 *
 * retile: a slide in its own frame, re-tiled as a pyramidal OME-TIFF
 *   (registered/<reference>.ome.tif).  Level l of the output is the source's
 *   level of the same size when there is one (copied), else the mean of
 *   k x k boxes (interp=nearest: one picked sample) of the coarsest source
 *   level whose downsample is exactly 2^j, j <= l, that covers the level
 *   (k = 2^(l-j); pyramid_plan.c), read in bands so memory stays bounded.
 * warp: a moving slide resampled onto the reference's grid (registered/).
 * The deconvolution products of deconvolved/ are in product_deconv.h. */
#ifndef SCOPEFS_PRODUCTS_H
#define SCOPEFS_PRODUCTS_H

#include <stdint.h>

#include "scopefs/dataset.h"
#include "scopefs/product.h"
#include "scopefs/slide.h"
#include "scopefs/tiff_layout.h"
#include "scopefs/transform.h"

/* How each output level is made from the source. */
typedef struct sf_pyramid_plan {
	uint32_t levels;
	uint32_t width[SF_LAYOUT_MAX_LEVELS], height[SF_LAYOUT_MAX_LEVELS];
	uint32_t source_level[SF_LAYOUT_MAX_LEVELS]; /* the source level read */
	uint32_t box[SF_LAYOUT_MAX_LEVELS];          /* k: 1 = copy */
} sf_pyramid_plan;

/* Plan the output pyramid of s for tiles of edge `tile`: halve until the
 * level fits in one tile, taking the source's own level sizes where they
 * are a halving of the previous level and exactly a 2^l downsample; each
 * level's source is the coarsest exactly-2^j level (j <= l) that covers it,
 * so no output pixel reads beyond a source level's edge. */
void sf_pyramid_plan_make(const sf_slide_info *s, uint32_t tile, sf_pyramid_plan *plan);

/* Level-0 pixels per pixel of level `level` of s, per axis: exactly r in
 * both axes when both sides are floor or ceil of level 0's / r for one
 * integer r (2^k for a pyramid of halvings however they rounded, 4 for an
 * Aperio step; a power of two first where a tiny level fits several),
 * else W0 / WL and H0 / HL.  Output level l of a plan is exactly 2^l. */
void sf_level_downsample(const sf_slide_info *s, uint32_t level, double ds[2]);

/* How a moving slide is warped onto the reference grid. */
typedef struct sf_warp_options {
	int interp;        /* an sf_interp (warp.h) */
	double background; /* value outside the moving slide */
	int gpu;           /* -1 auto, -2 off, else a device index */
} sf_warp_options;

/* The retile product of s on the layout l (which must follow plan).  Of wo
 * only interp counts: nearest makes reduced levels by picking one real
 * sample per pixel (label masks stay labels), anything else by box means. */
int sf_product_retile_create(const sf_slide_info *s, const sf_pyramid_plan *plan,
                             const sf_warp_options *wo, const sf_layout *l, sf_product **out,
                             sf_err *e);

/* The warp product: moving slide s resampled through t (a backward map
 * from reference level-0 pixels to s's level-0 pixels; owned by the caller,
 * read-only, outliving the product) onto the reference pyramid `plan`
 * (the reference's level sizes) laid out as l.  Each output level L is
 * warped from s's nearest adequate level (box-prefiltered when s lacks
 * one), reading only the source rect the tile's footprint needs. */
int sf_product_warp_create(const sf_slide_info *s, const sf_transform *t,
                           const sf_pyramid_plan *plan, const sf_warp_options *wo,
                           const sf_layout *l, sf_product **out, sf_err *e);

/* The warp product of a moving slide that scopefs registers itself
 * (autoreg.h): the same pixels as sf_product_warp_create with the slide's
 * computed transform, which it waits for on the first tile a worker makes
 * (a failed registration fails the tile).  The key comes from the
 * registration's inputs (sf_autoreg_key), so it exists before the transform
 * does.  The job must outlive the product. */
struct sf_autoreg;
int sf_product_autoreg_create(const sf_slide_info *s, struct sf_autoreg *a, uint32_t slide,
                              const sf_pyramid_plan *plan, const sf_warp_options *wo,
                              const sf_layout *l, sf_product **out, sf_err *e);

#endif

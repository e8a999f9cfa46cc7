/* register_micro.h — micro-registration: the non-rigid field refined at a
 * finer pyramid level, tile by tile (issue #5, `reg_micro=1`; compute core,
 * no I/O).  docs/registration.md, "Micro-registration (reg_micro)".
 *
 * Input: the reference and moving slide at the MICRO resolution (for example
 * longest side 4096), the affine backward map m between them (ref micro px
 * -> mov micro px) and the coarse non-rigid field found by sf_reg_nonrigid on
 * the coarse thumbnails.  The current model is ref(x) ~ mov(m (x + Dc(x))),
 * Dc the coarse field brought to micro px (see sf_reg_micro).  Each tile
 * finds a small residual field r on top of it, the tiles' residuals are
 * blended, and the result is the composed field D(x) = r(x) + Dc(x + r(x)),
 * so that ref(x) ~ mov(m (x + D(x))) on the micro grid.
 *
 * Memory beside the inputs and the output field: O((tile + 2 overlap)^2).
 * Pure and re-entrant; the result depends only on the inputs (tiles run in
 * a fixed order). */
#ifndef SCOPEFS_REGISTER_MICRO_H
#define SCOPEFS_REGISTER_MICRO_H

#include <stdint.h>

#include "scopefs/err.h"
#include "scopefs/register.h"

typedef struct sf_reg_micro_opts {
	uint32_t tile;               /* core tile side in micro px (32..4096) */
	uint32_t overlap;            /* margin added on each side of a tile, micro px
	                                (<= tile / 2); the tiles' residuals blend
	                                smoothly over 2 * overlap across each seam */
	uint32_t step;               /* node spacing of the output field, micro px (1..64) */
	double min_tissue;           /* a tile is skipped (r = 0) when fewer than this
	                                fraction of its pixels are tissue (mask) with a
	                                source inside the moving image (0..1) */
	uint32_t passes;             /* demons runs per tile (1..8), each on what the
	                                previous ones left (see register_micro.c) */
	sf_reg_nonrigid_opts demons; /* the demons run on each tile (with the identity
	                                map); max_dim 0 = the tile at full resolution */
} sf_reg_micro_opts;

/* tile 512, overlap 64, step 4, min_tissue 0.1, passes 1; demons: the defaults of
 * sf_reg_nonrigid_opts_default with max_dim 0 (full resolution),
 * min_dim 64, iter_coarse 20, iter_fine 20 (docs/registration.md). */
void sf_reg_micro_opts_default(sf_reg_micro_opts *o);

/* The micro field.
 *   ref, mov     grey images at the micro resolution (sizes may differ);
 *   mask         ref->w * ref->h bytes, nonzero = tissue, or NULL (all);
 *   m            affine backward map, ref micro px -> mov micro px;
 *   coarse       the coarse field (sf_reg_field on the coarse reference
 *                thumbnail, thumbnail px), or NULL for none (Dc = 0);
 *   coarse_scale micro px per coarse thumbnail px (1..1024; ignored without
 *                coarse).  A micro point x_m is the coarse point
 *                x_c = (x_m + 0.5) / coarse_scale - 0.5 and
 *                Dc(x_m) = coarse_scale * D_coarse(x_c) (sf_reg_field_at, so
 *                clamped to the coarse field's edge nodes).
 * out (allocated here, free with sf_reg_field_free) gets D on the micro grid:
 * node (i, j) at micro px ((i + 0.5) * o->step - 0.5, (j + 0.5) * o->step - 0.5),
 * ceil(ref->w / step) x ceil(ref->h / step) nodes, dx/dy in micro px, with
 * jac_min and disp_max as sf_reg_nonrigid fills them.  Tiles with too little
 * tissue, where the demons do not lower the mismatch, or whose residual
 * folds (jac_min <= 0.1), keep r = 0, so D = Dc there.
 * SF_EINVAL for a missing image or one under 16x16, a non-affine m, an empty
 * coarse field, a bad scale, or options out of range (the demons options
 * as sf_reg_nonrigid checks them); SF_ENOMEM; SF_EINTR when o->demons.stop
 * was set.  On error out is empty. */
int sf_reg_micro(const sf_reg_image *ref, const uint8_t *mask, const sf_reg_image *mov,
                 const double m[9], const sf_reg_field *coarse, double coarse_scale,
                 const sf_reg_micro_opts *o, sf_reg_field *out, sf_err *e);

#endif

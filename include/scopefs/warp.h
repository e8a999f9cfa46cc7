/* warp.h — resample a source tile through a backward map (compute core, no I/O).
 *
 * The warp fills an output rect of one level of the reference frame from a
 * buffer of the moving slide that the caller has read.  It is a pure function
 * of (map, source buffer, format, output rect): one tile per call, any number
 * of calls at once on different threads (the caller's tile engine threads it).
 *
 * Sampling (pixel centres at integers, see transform.h): the source is the
 * buffer's pixels extended by the background value in every direction, so a
 * sample near the edge of the source blends with the background exactly as
 * scipy.ndimage.map_coordinates(mode='grid-constant', cval=background) does:
 *  - nearest: the pixel floor(x + 0.5), floor(y + 0.5) (ties round up);
 *  - bilinear (the default): two horizontal lerps, then one vertical;
 *  - bicubic: Keys' cubic convolution with a = -0.5 (Catmull-Rom), the
 *    kernel of libvips' bicubic interpolator; 4 x 4 taps; interpolating, so
 *    it can overshoot, and integer results are clamped.
 * Coordinates are computed in double, interpolation weights and sums in
 * float; integer samples round half up ((int)(v + 0.5)) and clamp to the
 * type's range; float32 is stored as computed.  The CUDA kernel uses the very
 * same arithmetic (no fused multiply-adds), so its pixels are identical.
 *
 * A caller that passes the buffer for sf_warp_source_rect's rect (clipped to
 * the source level) gets the same pixels as if the whole level were given:
 * what lies outside the buffer is then outside the level, i.e. background. */
#ifndef SCOPEFS_WARP_H
#define SCOPEFS_WARP_H

#include <stddef.h>
#include <stdint.h>

#include "scopefs/err.h"
#include "scopefs/pixel.h"
#include "scopefs/transform.h"

typedef enum sf_interp {
	SF_INTERP_NEAREST = 0,
	SF_INTERP_BILINEAR = 1,
	SF_INTERP_BICUBIC = 2,
} sf_interp;

/* A pixel rect [x, x + w) x [y, y + h) of one level. */
typedef struct sf_wrect {
	int64_t x, y;
	int64_t w, h;
} sf_wrect;

typedef struct sf_warp_src {
	const void *pixels; /* rect.h rows of rect.w pixels, samples interleaved */
	size_t stride;      /* bytes from one row to the next */
	sf_wrect rect;      /* where the buffer lies in the source level */
} sf_warp_src;

typedef struct sf_warp_fmt {
	sf_dtype dtype; /* of source and output alike */
	uint32_t
	    samples; /* interleaved samples per pixel, 1..64 (planar channels: one call each) */
	sf_interp interp;
	double
	    background; /* value of every sample outside the source (rounded, clamped to dtype) */
} sf_warp_fmt;

/* Fill the out rect (out.w x out.h pixels at dst, rows dst_stride bytes apart)
 * of the output level through map m from src.  SF_EINVAL for a bad format or
 * rect, SF_ENOMEM when the row scratch cannot be allocated. */
int sf_warp_tile(const sf_map *m, const sf_warp_src *src, const sf_warp_fmt *fmt, sf_wrect out,
                 void *dst, size_t dst_stride, sf_err *e);

/* The rect of the source level (src_w x src_h pixels) that warping the out
 * rect through m reads: the bounding box of the mapped rect, widened by the
 * extremes of each field over the grid nodes the rect can reach (interpolated
 * values never leave the range of the nodes that weigh in) and by the
 * kernel's radius, then clipped to the level.  A rect that maps wholly
 * outside the level gives w = h = 0 (the tile is all background).  Every
 * coordinate sf_warp_tile samples lies inside the result, so the result is
 * safe to read and sufficient. */
void sf_warp_source_rect(const sf_map *m, sf_wrect out, sf_interp interp, int64_t src_w,
                         int64_t src_h, sf_wrect *need);

/* Which source pyramid level to warp output level L from.  need = out_ds *
 * sf_transform_scale(t) is the number of source level-0 pixels per output
 * pixel (geometric mean over the axes).  The choice is the coarsest level
 * whose downsample is <= need * 1.01 (level 0 when none is), so the output is
 * never sampled from a coarser grid than it needs.  When the remaining ratio
 * r = need / level_ds exceeds 1.5 (the slide has fewer levels than the
 * reference, or a large scale change), sampling that level would alias: the
 * caller should box-average k x k source pixels first, k = round(r), with
 * sf_box_reduce (resample.h) over a k-aligned region, and warp from that
 * buffer as a level of downsample level_ds * k (`ds`, below) — a box-reduced
 * level whose boxes start at multiples of k IS a level of that downsample
 * under the pixel-centre rule, so the map stays exact. */
typedef struct sf_source_choice {
	unsigned level;     /* source pyramid level to read */
	uint32_t prefilter; /* k: box-average k x k before warping (1 = none) */
	double ds[2];       /* downsample to pass to sf_transform_level_map: level's * k */
} sf_source_choice;

void sf_warp_choose_source(const sf_transform *t, const double out_ds[2], unsigned nlevels,
                           const double (*level_ds)[2], sf_source_choice *c);

/* The level-`c->level` rect to read for a rect `need` of the prefiltered
 * virtual level (need scaled by k, clipped to the level's lw x lh pixels). */
sf_wrect sf_warp_prefilter_read_rect(const sf_source_choice *c, sf_wrect need, int64_t lw,
                                     int64_t lh);

/* "nearest", "bilinear", "bicubic" <-> sf_interp; parse returns SF_EINVAL
 * for anything else. */
const char *sf_interp_name(sf_interp i);
int sf_interp_parse(const char *s, sf_interp *out);

/* --- CUDA (src/core/warp_cuda.cu; built when nvcc is found) ---------------
 * Per-worker device context: scratch buffers and the field grids uploaded
 * once per grid id.  Without CUDA support compiled in, or without a device,
 * create fails with SF_EDEVICE and the message says which. */
typedef struct sf_warp_cuda sf_warp_cuda;

int sf_warp_cuda_create(int device, sf_warp_cuda **out, sf_err *e);
void sf_warp_cuda_destroy(sf_warp_cuda *c);
/* As sf_warp_tile, on the GPU; same pixels. */
int sf_warp_tile_cuda(sf_warp_cuda *c, const sf_map *m, const sf_warp_src *src,
                      const sf_warp_fmt *fmt, sf_wrect out, void *dst, size_t dst_stride,
                      sf_err *e);

#endif

/* resample.h — k x k reduction of pixel buffers (compute core, no I/O).
 *
 * Used to make a reduced pyramid level from a finer source level when the
 * source has no level of that size.  Two rules, one box geometry: dst pixel
 * (x, y) stands for the src box [x*k, x*k+k) x [y*k, y*k+k) clipped to the
 * part inside the source image, so an edge pixel of an odd-sized image uses
 * only real pixels (never the padding beyond it).
 * - mean (sf_box_reduce): the mean of the box's pixels.  Integers round half
 *   up: (sum + n/2) / n; float32 is the plain mean.  For intensity images.
 * - pick (sf_pick_reduce): the one sample nearest the box centre, under
 *   interp=nearest's rule floor(c + 0.5) (ties up): src (x*k + k/2,
 *   y*k + k/2), clamped into the clipped box.  Every dst value exists in src,
 *   so label masks stay labels. */
#ifndef SCOPEFS_RESAMPLE_H
#define SCOPEFS_RESAMPLE_H

#include <stddef.h>
#include <stdint.h>

#include "scopefs/pixel.h"

/* src: rows of src_w pixels (samples interleaved), src_stride bytes apart,
 * of which only the first valid_w columns and valid_h rows are inside the
 * image.  dst: dst_w x dst_h pixels, dst_stride bytes apart; dst pixel (x, y)
 * averages src [x*k, x*k+k) x [y*k, y*k+k) clipped to the valid part.  A dst
 * pixel whose box holds no valid pixel becomes 0. */
void sf_box_reduce(const void *src, size_t src_stride, uint32_t valid_w, uint32_t valid_h,
                   uint32_t k, sf_dtype dtype, uint32_t samples, void *dst, size_t dst_stride,
                   uint32_t dst_w, uint32_t dst_h);

/* As sf_box_reduce, but each dst pixel is the src sample at
 * (min(x*k + k/2, valid_w - 1), min(y*k + k/2, valid_h - 1)), copied
 * bytewise (exact for every type).  A box with no valid pixel becomes 0. */
void sf_pick_reduce(const void *src, size_t src_stride, uint32_t valid_w, uint32_t valid_h,
                    uint32_t k, sf_dtype dtype, uint32_t samples, void *dst, size_t dst_stride,
                    uint32_t dst_w, uint32_t dst_h);

/* Which rule a reduced level is made with. */
typedef enum sf_reduce_rule {
	SF_REDUCE_MEAN, /* sf_box_reduce: intensities (bilinear, bicubic) */
	SF_REDUCE_PICK  /* sf_pick_reduce: labels (interp=nearest) */
} sf_reduce_rule;

/* sf_box_reduce or sf_pick_reduce, by rule; same arguments. */
void sf_reduce(sf_reduce_rule rule, const void *src, size_t src_stride, uint32_t valid_w,
               uint32_t valid_h, uint32_t k, sf_dtype dtype, uint32_t samples, void *dst,
               size_t dst_stride, uint32_t dst_w, uint32_t dst_h);

#endif

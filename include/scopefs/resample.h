/* resample.h — box reduction of pixel buffers (compute core, no I/O).
 *
 * Used to make a reduced pyramid level from a finer source level when the
 * source has no level of that size: each output pixel is the mean of a k x k
 * box of source pixels, counting only pixels inside the source image, so
 * edge pixels of odd-sized images are not darkened.  Integers round half up:
 * (sum + n/2) / n; float32 is the plain mean. */
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

#endif

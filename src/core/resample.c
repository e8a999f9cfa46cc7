/* resample.c — k x k box means (or nearest picks) over the in-image part of
 * a buffer.
 *
 * The sums run in 64-bit integers for integer samples (k up to 2^16 keeps
 * k*k*65535 far below 2^63) and in double for float32, so the result does
 * not depend on summation order. */
#include "scopefs/resample.h"

#include <string.h>

static double sample_at(const uint8_t *row, uint32_t i, sf_dtype dtype)
{
	switch (dtype) {
	case SF_U8: return row[i];
	case SF_U16: {
		uint16_t v;
		memcpy(&v, row + 2 * (size_t)i, 2);
		return v;
	}
	case SF_F32: {
		float v;
		memcpy(&v, row + 4 * (size_t)i, 4);
		return v;
	}
	}
	return 0;
}

static void store_mean(uint8_t *row, uint32_t i, sf_dtype dtype, double sum, uint64_t n)
{
	if (dtype == SF_F32) {
		float v = n ? (float)(sum / (double)n) : 0.0f;
		memcpy(row + 4 * (size_t)i, &v, 4);
		return;
	}
	/* Integer sums are exact in double up to 2^53, far above k*k*65535. */
	uint64_t mean = n ? ((uint64_t)sum + n / 2) / n : 0;
	if (dtype == SF_U8)
		row[i] = (uint8_t)mean;
	else {
		uint16_t v = (uint16_t)mean;
		memcpy(row + 2 * (size_t)i, &v, 2);
	}
}

void sf_box_reduce(const void *src, size_t src_stride, uint32_t valid_w, uint32_t valid_h,
                   uint32_t k, sf_dtype dtype, uint32_t samples, void *dst, size_t dst_stride,
                   uint32_t dst_w, uint32_t dst_h)
{
	const uint8_t *s = src;
	uint8_t *d = dst;

	for (uint32_t y = 0; y < dst_h; y++) {
		uint64_t y0 = (uint64_t)y * k, y1 = y0 + k;
		if (y1 > valid_h)
			y1 = valid_h;
		for (uint32_t x = 0; x < dst_w; x++) {
			uint64_t x0 = (uint64_t)x * k, x1 = x0 + k;
			if (x1 > valid_w)
				x1 = valid_w;
			for (uint32_t c = 0; c < samples; c++) {
				double sum = 0;
				uint64_t n = 0;
				for (uint64_t sy = y0; sy < y1; sy++) {
					const uint8_t *row = s + sy * src_stride;
					for (uint64_t sx = x0; sx < x1; sx++)
						sum += sample_at(row, (uint32_t)(sx * samples + c),
						                 dtype);
					n += x1 > x0 ? x1 - x0 : 0;
				}
				store_mean(d + (size_t)y * dst_stride, x * samples + c, dtype, sum,
				           n);
			}
		}
	}
}

void sf_pick_reduce(const void *src, size_t src_stride, uint32_t valid_w, uint32_t valid_h,
                    uint32_t k, sf_dtype dtype, uint32_t samples, void *dst, size_t dst_stride,
                    uint32_t dst_w, uint32_t dst_h)
{
	const uint8_t *s = src;
	uint8_t *d = dst;
	size_t px = sf_dtype_bytes(dtype) * samples;

	for (uint32_t y = 0; y < dst_h; y++) {
		uint64_t y0 = (uint64_t)y * k, sy = y0 + k / 2;
		uint8_t *out = d + (size_t)y * dst_stride;
		if (sy >= valid_h)
			sy = valid_h ? valid_h - 1 : 0;
		for (uint32_t x = 0; x < dst_w; x++) {
			uint64_t x0 = (uint64_t)x * k, sx = x0 + k / 2;
			if (sx >= valid_w)
				sx = valid_w ? valid_w - 1 : 0;
			/* Clamping into the clipped box keeps the pick inside it; a
			 * box wholly outside the image has nothing to pick. */
			if (x0 >= valid_w || y0 >= valid_h)
				memset(out + x * px, 0, px);
			else
				memcpy(out + x * px, s + sy * src_stride + sx * px, px);
		}
	}
}

void sf_reduce(sf_reduce_rule rule, const void *src, size_t src_stride, uint32_t valid_w,
               uint32_t valid_h, uint32_t k, sf_dtype dtype, uint32_t samples, void *dst,
               size_t dst_stride, uint32_t dst_w, uint32_t dst_h)
{
	if (rule == SF_REDUCE_PICK)
		sf_pick_reduce(src, src_stride, valid_w, valid_h, k, dtype, samples, dst,
		               dst_stride, dst_w, dst_h);
	else
		sf_box_reduce(src, src_stride, valid_w, valid_h, k, dtype, samples, dst, dst_stride,
		              dst_w, dst_h);
}

/* filter1d.h — correlation of a 3D float array v[z][y][x] with a 1D kernel
 * along one axis, replicate (nearest) edges: the separable Gaussians of
 * deconv.c's pre-filter and of the FFTW engine's regularisation.
 *
 * dst[i] = sum over k = -r..r of w[k + r] * src[clamp(i + k)], summed in
 * that order from 0.0f, so the values do not depend on how the loops run.
 * The loops run along x (contiguous) with the taps outside, so they
 * vectorise: along y and z each tap adds a whole row; along x a row is first
 * extended by r replicated values at each end (ext, nx + 2r floats), so the
 * inner loop needs no clamping.  The earlier form, one output voxel at a time
 * with a clamp per tap and strided reads along y and z, took 28 % of a
 * deconvolved/ cp. */
#ifndef SCOPEFS_CORE_FILTER1D_H
#define SCOPEFS_CORE_FILTER1D_H

#include <stddef.h>

#include "ranges.h"

/* d[x] += wk * s[x] for x < n; to a multiple of 8 first, which gcc -O2's
 * "very cheap" vectoriser needs.  Not inlined: inlined, gcc drops the
 * restrict promises and would need an alias check it will not add at -O2. */
__attribute__((noinline)) static void filter1d_axpy(float *restrict d, const float *restrict s,
                                                    size_t n, float wk)
{
	size_t x = 0, n8 = n / 8 * 8;
	for (; x < n8; x++)
		d[x] += wk * s[x];
	for (; x < n; x++)
		d[x] += wk * s[x];
}

static inline size_t filter1d_clamp(long i, size_t n)
{
	return i < 0 ? 0 : i >= (long)n ? n - 1 : (size_t)i;
}

/* dst = w (correlated along axis 0 = x, 1 = y, 2 = z) src; src != dst; ext
 * holds nx + 2 * radius floats. */
static inline void filter1d_axis(const float *restrict src, float *restrict dst, size_t nx,
                                 size_t ny, size_t nz, int axis, const float *w, int radius,
                                 float *restrict ext)
{
	size_t plane = nx * ny, r = (size_t)radius, taps = 2 * r + 1;
	if (axis == 0) {
		for (size_t row = 0; row < ny * nz; row++) {
			const float *s = src + row * nx;
			float *d = dst + row * nx;
			for (size_t i = 0; i < nx + 2 * r; i++)
				ext[i] = s[filter1d_clamp((long)i - (long)r, nx)];
			for (size_t i = 0; i < nx; i++)
				d[i] = 0.0f;
			for (size_t k = 0; k < taps; k++)
				filter1d_axpy(d, ext + k, nx, w[k]);
		}
		return;
	}
	size_t len = axis == 1 ? ny : nz, outer = axis == 1 ? nz : 1;
	size_t stride = axis == 1 ? nx : plane; /* between neighbours along the axis */
	size_t run = axis == 1 ? nx : plane;    /* contiguous floats per step */
	for (size_t o = 0; o < outer; o++) {
		const float *s0 = src + o * plane;
		float *d0 = dst + o * plane;
		for (size_t i = 0; i < len; i++) {
			float *d = d0 + i * stride;
			for (size_t x = 0; x < run; x++)
				d[x] = 0.0f;
			for (size_t k = 0; k < taps; k++) {
				size_t j = filter1d_clamp((long)i + (long)k - (long)r, len);
				filter1d_axpy(d, s0 + j * stride, run, w[k]);
			}
		}
	}
}

/* The arguments of filter1d_axis_mt's parts. */
typedef struct filter1d_job {
	const float *src;
	float *dst;
	size_t nx, ny, nz;
	int axis, radius;
	const float *w;
	float *ext; /* nx + 2 radius floats per part */
} filter1d_job;

/* Part `part` of filter1d_axis_mt: planes [first, end) along x or y, rows
 * [first, end) of every plane along z. */
static inline void filter1d_part(void *arg, size_t part, size_t first, size_t end)
{
	const filter1d_job *r = arg;
	size_t plane = r->nx * r->ny, taps = 2 * (size_t)r->radius + 1;
	float *ext = r->ext + part * (r->nx + 2 * (size_t)r->radius);
	if (r->axis < 2) {
		filter1d_axis(r->src + first * plane, r->dst + first * plane, r->nx, r->ny,
		              end - first, r->axis, r->w, r->radius, ext);
		return;
	}
	size_t run = (end - first) * r->nx, off = first * r->nx;
	for (size_t i = 0; i < r->nz; i++) {
		float *d = r->dst + i * plane + off;
		for (size_t x = 0; x < run; x++)
			d[x] = 0.0f;
		for (size_t k = 0; k < taps; k++) {
			size_t j = filter1d_clamp((long)i + (long)k - r->radius, r->nz);
			filter1d_axpy(d, r->src + j * plane + off, run, r->w[k]);
		}
	}
}

/* filter1d_axis on up to `threads` threads (at most 64, ranges.h): along x
 * and y each takes a range of planes, along z a range of rows of every
 * plane.  Every output voxel gets the same sum in the same order as
 * filter1d_axis, so the bytes do not depend on the thread count.  ext holds
 * threads * (nx + 2 radius) floats. */
static inline void filter1d_axis_mt(const float *src, float *dst, size_t nx, size_t ny, size_t nz,
                                    int axis, const float *w, int radius, float *ext, int threads)
{
	filter1d_job job = {src, dst, nx, ny, nz, axis, radius, w, ext};
	ranges_run(axis < 2 ? nz : ny, threads, filter1d_part, &job);
}

#endif

/* warp_math.h — the per-pixel arithmetic of the warp, shared by the CPU
 * kernel (warp.c) and the CUDA kernel (warp_cuda.cu) so both give the same
 * pixels.
 *
 * Invariant: every floating-point operation that decides a pixel value is
 * written through WM_DMUL/WM_DADD/WM_FMUL/WM_FADD.  On the host they are the
 * plain operators (C11 with -std=c11 does not contract a*b+c into an FMA); on
 * the device they are the round-to-nearest intrinsics, which nvcc never fuses.
 * So coordinates, weights and sums are bit-identical on both sides. */
#ifndef SCOPEFS_WARP_MATH_H
#define SCOPEFS_WARP_MATH_H

#include <math.h>
#include <stdint.h>

#include "scopefs/transform.h"

#if defined(__CUDACC__)
#define WM_FN static __host__ __device__ inline
#else
#define WM_FN static inline
#endif

#if defined(__CUDA_ARCH__)
#define WM_DMUL(a, b) __dmul_rn((a), (b))
#define WM_DADD(a, b) __dadd_rn((a), (b))
#define WM_FMUL(a, b) __fmul_rn((a), (b))
#define WM_FADD(a, b) __fadd_rn((a), (b))
#else
#define WM_DMUL(a, b) ((a) * (b))
#define WM_DADD(a, b) ((a) + (b))
#define WM_FMUL(a, b) ((a) * (b))
#define WM_FADD(a, b) ((a) + (b))
#endif

/* a*x + (b*y + c): the one way every affine row is evaluated. */
WM_FN double wm_affine_row(const double *r, double x, double y)
{
	return WM_DADD(WM_DMUL(r[0], x), WM_DADD(WM_DMUL(r[1], y), r[2]));
}

/* Cubic B-spline weights of the 4 nodes floor(t)-1 .. floor(t)+2 for
 * fractional part u of t. */
WM_FN void wm_bspline3_weights(double u, double w[4])
{
	double v = WM_DADD(1.0, -u);
	double u2 = WM_DMUL(u, u), u3 = WM_DMUL(u2, u);
	w[0] = WM_DMUL(WM_DMUL(WM_DMUL(v, v), v), 1.0 / 6.0);
	w[1] = WM_DMUL(WM_DADD(WM_DADD(WM_DMUL(3.0, u3), WM_DMUL(-6.0, u2)), 4.0), 1.0 / 6.0);
	w[2] = WM_DMUL(
	    WM_DADD(WM_DADD(WM_DADD(WM_DMUL(-3.0, u3), WM_DMUL(3.0, u2)), WM_DMUL(3.0, u)), 1.0),
	    1.0 / 6.0);
	w[3] = WM_DMUL(u3, 1.0 / 6.0);
}

/* Field value at grid index (gx, gy). */
WM_FN void wm_field_eval(const sf_field_step *f, double gx, double gy, double *vx, double *vy)
{
	const float *v = f->v;
	int64_t w = f->w, h = f->h;
	*vx = 0.0;
	*vy = 0.0;
	if (f->kind == SF_FIELD_LINEAR) {
		/* clamp to the edge nodes; NaN ends at node 0 */
		gx = gx > 0.0 ? (gx < (double)(w - 1) ? gx : (double)(w - 1)) : 0.0;
		gy = gy > 0.0 ? (gy < (double)(h - 1) ? gy : (double)(h - 1)) : 0.0;
		int64_t ix = (int64_t)gx, iy = (int64_t)gy;
		double tx = WM_DADD(gx, -(double)ix), ty = WM_DADD(gy, -(double)iy);
		int64_t ix1 = ix + (ix + 1 < w), iy1 = iy + (iy + 1 < h);
		const float *a = v + 2 * (iy * w + ix), *b = v + 2 * (iy * w + ix1);
		const float *c = v + 2 * (iy1 * w + ix), *d = v + 2 * (iy1 * w + ix1);
		for (int k = 0; k < 2; k++) {
			double top = WM_DADD((double)a[k],
			                     WM_DMUL(tx, WM_DADD((double)b[k], -(double)a[k])));
			double bot = WM_DADD((double)c[k],
			                     WM_DMUL(tx, WM_DADD((double)d[k], -(double)c[k])));
			double r = WM_DADD(top, WM_DMUL(ty, WM_DADD(bot, -top)));
			if (k == 0)
				*vx = r;
			else
				*vy = r;
		}
		return;
	}
	/* ITK's B-spline: zero displacement unless the 4x4 support lies inside
	 * the grid, i.e. 1 <= g < size - 2 (NaN fails the test). */
	if (!(gx >= 1.0 && gx < (double)(w - 2) && gy >= 1.0 && gy < (double)(h - 2)))
		return;
	double fx = floor(gx), fy = floor(gy);
	double wx[4], wy[4];
	wm_bspline3_weights(WM_DADD(gx, -fx), wx);
	wm_bspline3_weights(WM_DADD(gy, -fy), wy);
	int64_t x0 = (int64_t)fx - 1, y0 = (int64_t)fy - 1;
	double sx = 0.0, sy = 0.0;
	for (int j = 0; j < 4; j++) {
		const float *row = v + 2 * ((y0 + j) * w + x0);
		for (int i = 0; i < 4; i++) {
			double wij = WM_DMUL(wy[j], wx[i]);
			sx = WM_DADD(sx, WM_DMUL(wij, (double)row[2 * i]));
			sy = WM_DADD(sy, WM_DMUL(wij, (double)row[2 * i + 1]));
		}
	}
	*vx = sx;
	*vy = sy;
}

/* Apply the field steps of m to (x, y) in place. */
WM_FN void wm_apply_fields(const sf_map *m, double *x, double *y)
{
	for (unsigned k = 0; k < m->nfields; k++) {
		const sf_field_step *f = &m->field[k];
		double vx, vy;
		wm_field_eval(f, wm_affine_row(f->g, *x, *y), wm_affine_row(f->g + 3, *x, *y), &vx,
		              &vy);
		double dx = WM_DADD(WM_DMUL(f->vm[0], vx), WM_DMUL(f->vm[1], vy));
		double dy = WM_DADD(WM_DMUL(f->vm[2], vx), WM_DMUL(f->vm[3], vy));
		*x = WM_DADD(*x, dx);
		*y = WM_DADD(*y, dy);
	}
}

/* The source point of output point (x, y). */
WM_FN void wm_map_point(const sf_map *m, double x, double y, double *sx, double *sy)
{
	wm_apply_fields(m, &x, &y);
	double px = wm_affine_row(m->m, x, y), py = wm_affine_row(m->m + 3, x, y);
	if (m->projective) {
		double w = wm_affine_row(m->m + 6, x, y);
		px = px / w;
		py = py / w;
	}
	*sx = px;
	*sy = py;
}

/* Linear interpolation a + t (b - a) in float: the integer types' blend.
 * Their samples are small and finite, so b - a cannot overflow and no tap
 * is NaN; kept as it is so their bytes never change. */
WM_FN float wm_lerp(float a, float b, float t)
{
	return WM_FADD(a, WM_FMUL(t, WM_FADD(b, -a)));
}

/* Bilinear blend of the integer types: rows a, b and c, d, then columns. */
WM_FN float wm_bilinear(float a, float b, float c, float d, float tx, float ty)
{
	return wm_lerp(wm_lerp(a, b, tx), wm_lerp(c, d, tx), ty);
}

/* float32 samples blend differently (docs/transforms.md, "NaN and
 * infinity"):
 *  - in double, as (1 - t) a + t b: float32 values are far inside double's
 *    range, so finite taps never overflow (float's b - a overflows for
 *    -3e38 and 3e38, and 0 * inf is NaN), and both weights are at most 1,
 *    so the result stays within [a, b] up to rounding and converts to a
 *    finite float;
 *  - a tap of weight exactly 0 is left out, not multiplied by 0: an
 *    identity or integer-shift sample then returns the source sample
 *    itself, and a NaN or infinite sample reaches only the outputs it
 *    weighs in (0 * NaN would be NaN in its neighbours too).
 * t is the float weight the integer types use (t = 1 happens when x -
 * floor(x) rounds up to 1.0f), so all types share the coordinates. */
WM_FN double wm_lerp_d(double a, double b, float t)
{
	if (t == 0.0f)
		return a;
	if (t == 1.0f)
		return b;
	double dt = (double)t;
	return WM_DADD(WM_DMUL(WM_DADD(1.0, -dt), a), WM_DMUL(dt, b));
}

/* float32 bilinear blend: rows a, b and c, d, then columns, in double; one
 * rounding to float at the end. */
WM_FN float wm_bilinear_f32(float a, float b, float c, float d, float tx, float ty)
{
	return (float)wm_lerp_d(wm_lerp_d((double)a, (double)b, tx),
	                        wm_lerp_d((double)c, (double)d, tx), ty);
}

/* Keys cubic convolution weights (a = -0.5) of taps floor-1 .. floor+2 for
 * fractional part t. */
WM_FN void wm_cubic_weights(float t, float w[4])
{
	float t2 = WM_FMUL(t, t), t3 = WM_FMUL(t2, t);
	w[0] = WM_FADD(WM_FADD(WM_FMUL(-0.5f, t3), t2), WM_FMUL(-0.5f, t));
	w[1] = WM_FADD(WM_FADD(WM_FMUL(1.5f, t3), WM_FMUL(-2.5f, t2)), 1.0f);
	w[2] = WM_FADD(WM_FADD(WM_FMUL(-1.5f, t3), WM_FMUL(2.0f, t2)), WM_FMUL(0.5f, t));
	w[3] = WM_FADD(WM_FMUL(0.5f, t3), WM_FMUL(-0.5f, t2));
}

/* Sum of 4 taps with 4 weights, in a fixed order. */
WM_FN float wm_dot4(const float w[4], float a, float b, float c, float d)
{
	return WM_FADD(WM_FADD(WM_FADD(WM_FMUL(w[0], a), WM_FMUL(w[1], b)), WM_FMUL(w[2], c)),
	               WM_FMUL(w[3], d));
}

/* wm_dot4 for float32 samples: weights (the float Keys weights, converted)
 * and sum in double, taps of weight exactly 0 left out (see wm_lerp_d).  A
 * left-out tap adds -0.0, the identity of IEEE addition (x + -0.0 is x,
 * -0.0 and +0.0 included), so the sum is that of the weighed taps alone,
 * in order, and a sample of weight 1 comes back with its bits. */
WM_FN double wm_dot4_d(const double w[4], double a, double b, double c, double d)
{
	double pa = w[0] == 0.0 ? -0.0 : WM_DMUL(w[0], a);
	double pb = w[1] == 0.0 ? -0.0 : WM_DMUL(w[1], b);
	double pc = w[2] == 0.0 ? -0.0 : WM_DMUL(w[2], c);
	double pd = w[3] == 0.0 ? -0.0 : WM_DMUL(w[3], d);
	return WM_DADD(WM_DADD(WM_DADD(pa, pb), pc), pd);
}

/* wm_dot4_d where no weight is 0 (every sample off the grid lines): the
 * same operations without the selects, so the same value. */
WM_FN double wm_dot4_d_nz(const double w[4], double a, double b, double c, double d)
{
	return WM_DADD(WM_DADD(WM_DADD(WM_DMUL(w[0], a), WM_DMUL(w[1], b)), WM_DMUL(w[2], c)),
	               WM_DMUL(w[3], d));
}

/* Whether no tap of a bilinear (resp. bicubic) sample at buffer coordinates
 * (x, y) lies inside a sw x sh buffer: the pixel is then the background
 * itself (not a weighted sum of it, which float rounding could change).
 * NaN counts as outside. */
WM_FN int wm_bilinear_outside(double x, double y, int64_t sw, int64_t sh)
{
	return !(x > -1.0 && x < (double)sw && y > -1.0 && y < (double)sh);
}

WM_FN int wm_bicubic_outside(double x, double y, int64_t sw, int64_t sh)
{
	return !(x >= -2.0 && x < (double)sw + 1.0 && y >= -2.0 && y < (double)sh + 1.0);
}

/* Round half up and clamp to [0, maxv] (integer types). */
WM_FN uint32_t wm_round_clamp(float v, float maxv)
{
	if (!(v > 0.0f)) /* also NaN */
		return 0;
	if (v >= maxv)
		return (uint32_t)maxv;
	return (uint32_t)WM_FADD(v, 0.5f);
}

#endif

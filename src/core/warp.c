/* warp.c — the CPU warp kernel, the source-rect bound and the level choice.
 *
 * A tile is warped row by row in two passes: the source coordinates of the
 * row (relative to the source buffer) into a scratch array, then the sampling.
 * The first pass is a multiply and an add per coordinate when the map is
 * affine (four coordinates per AVX2 operation where the CPU has it); the
 * second is specialised per sample type, interpolation and the common sample
 * counts (1, 3, 4) so the channel loop unrolls, and for 4-sample bilinear
 * takes four pixels at a time with AVX2.  A row's coordinates are computed
 * PREFETCH_ROWS rows before it is sampled, so its taps can be prefetched.
 * All value arithmetic goes through warp_math.h, shared with the CUDA
 * kernel, so both give identical pixels.
 *
 * Invariants: the kernel never reads outside the caller's buffer (taps
 * outside it are the background value); source_rect's result contains every
 * tap the kernel reads inside the level, with a 1e-3 pixel margin for the
 * rounding differences between its box arithmetic and the per-pixel maps. */
#include "scopefs/warp.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "warp_math.h"

/* AVX2 paths, chosen at run time (see the 4-sample bilinear kernel below);
 * -DSF_WARP_NO_AVX2 leaves them out, to test or time the portable code. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(SF_WARP_NO_AVX2)
#define SF_WARP_AVX2 1
#include <immintrin.h>
#endif

#define MAX_SAMPLES  64
#define MAX_TILE_DIM (1 << 20)

/* Row coordinates for the common field map: one bilinear field whose grid
 * row does not depend on x (g3 == 0: g3 * x + c is c exactly for finite x,
 * or a zero that clamps to the same node row), then an affine matrix.  The
 * same operations as wm_map_point, in the same order, so the same bits; but
 * what a row shares (the grid row, its weight, the first field's y terms)
 * is computed once, and what a grid cell shares (its corner values and
 * their differences) once per cell: nodes are hundreds of pixels apart. */
static void row_coords_linear_field(const sf_map *m, sf_wrect out, double yy, double ox, double oy,
                                    double *restrict lx, double *restrict ly)
{
	const sf_field_step *f = &m->field[0];
	const int64_t w = f->w, h = f->h;
	const double cgx = WM_DADD(WM_DMUL(f->g[1], yy), f->g[2]);
	double gy =
	    WM_DADD(WM_DMUL(f->g[3], (double)out.x), WM_DADD(WM_DMUL(f->g[4], yy), f->g[5]));
	gy = gy > 0.0 ? (gy < (double)(h - 1) ? gy : (double)(h - 1)) : 0.0;
	const int64_t iy = (int64_t)gy, iy1 = iy + (iy + 1 < h);
	const double ty = WM_DADD(gy, -(double)iy);
	const float *row0 = f->v + 2 * iy * w, *row1 = f->v + 2 * iy1 * w;
	int64_t cell = -1;
	double a[2] = {0, 0}, ab[2] = {0, 0}, c[2] = {0, 0}, cd[2] = {0, 0};
	for (int64_t i = 0; i < out.w; i++) {
		double x = (double)(out.x + i), y = yy;
		double gx = WM_DADD(WM_DMUL(f->g[0], x), cgx);
		gx = gx > 0.0 ? (gx < (double)(w - 1) ? gx : (double)(w - 1)) : 0.0;
		int64_t ix = (int64_t)gx;
		double tx = WM_DADD(gx, -(double)ix);
		if (ix != cell) {
			int64_t ix1 = ix + (ix + 1 < w);
			for (int k = 0; k < 2; k++) {
				a[k] = (double)row0[2 * ix + k];
				ab[k] = WM_DADD((double)row0[2 * ix1 + k], -a[k]);
				c[k] = (double)row1[2 * ix + k];
				cd[k] = WM_DADD((double)row1[2 * ix1 + k], -c[k]);
			}
			cell = ix;
		}
		double r[2];
		for (int k = 0; k < 2; k++) {
			double top = WM_DADD(a[k], WM_DMUL(tx, ab[k]));
			double bot = WM_DADD(c[k], WM_DMUL(tx, cd[k]));
			r[k] = WM_DADD(top, WM_DMUL(ty, WM_DADD(bot, -top)));
		}
		x = WM_DADD(x, WM_DADD(WM_DMUL(f->vm[0], r[0]), WM_DMUL(f->vm[1], r[1])));
		y = WM_DADD(y, WM_DADD(WM_DMUL(f->vm[2], r[0]), WM_DMUL(f->vm[3], r[1])));
		lx[i] = WM_DADD(wm_affine_row(m->m, x, y), ox);
		ly[i] = WM_DADD(wm_affine_row(m->m + 3, x, y), oy);
	}
}

#if defined(SF_WARP_AVX2)
/* row_coords' affine loop four pixels at a time: the same multiply and
 * adds per coordinate (no FMA: AVX2 only), so the same bits.  x steps by
 * adding 4.0, exact while |x| < 2^52, which the caller checks.  As a
 * plain loop GCC 12 -O2 does not vectorise it; this is +15% on the
 * affine benchmark. */
static __attribute__((target("avx2"))) void affine_coords_avx2(const double *m, double yy,
                                                               double ox, double oy, int64_t x0,
                                                               int64_t n, double *restrict lx,
                                                               double *restrict ly)
{
	const double cx = WM_DADD(WM_DMUL(m[1], yy), m[2]);
	const double cy = WM_DADD(WM_DMUL(m[4], yy), m[5]);
	const __m256d a = _mm256_set1_pd(m[0]), d = _mm256_set1_pd(m[3]);
	const __m256d vcx = _mm256_set1_pd(cx), vcy = _mm256_set1_pd(cy);
	const __m256d vox = _mm256_set1_pd(ox), voy = _mm256_set1_pd(oy);
	__m256d x =
	    _mm256_setr_pd((double)x0, (double)(x0 + 1), (double)(x0 + 2), (double)(x0 + 3));
	int64_t i = 0;
	for (; i + 4 <= n; i += 4) {
		_mm256_storeu_pd(lx + i,
		                 _mm256_add_pd(_mm256_add_pd(_mm256_mul_pd(a, x), vcx), vox));
		_mm256_storeu_pd(ly + i,
		                 _mm256_add_pd(_mm256_add_pd(_mm256_mul_pd(d, x), vcy), voy));
		x = _mm256_add_pd(x, _mm256_set1_pd(4.0));
	}
	for (; i < n; i++) {
		double xx = (double)(x0 + i);
		lx[i] = WM_DADD(WM_DADD(WM_DMUL(m[0], xx), cx), ox);
		ly[i] = WM_DADD(WM_DADD(WM_DMUL(m[3], xx), cy), oy);
	}
}
#endif

/* Coordinates of row y of the out rect, relative to the source buffer. */
static void row_coords(const sf_map *m, sf_wrect out, int64_t y, sf_wrect srect,
                       double *restrict lx, double *restrict ly)
{
	const double yy = (double)(out.y + y);
	const double ox = -(double)srect.x, oy = -(double)srect.y;
	if (m->nfields == 0 && !m->projective) {
#if defined(SF_WARP_AVX2)
		const int64_t exact = (int64_t)1 << 52;
		if (out.x > -exact && out.x < exact - out.w && __builtin_cpu_supports("avx2")) {
			affine_coords_avx2(m->m, yy, ox, oy, out.x, out.w, lx, ly);
			return;
		}
#endif
		/* wm_affine_row with its row constant hoisted: same operations */
		const double a = m->m[0], d = m->m[3];
		const double cx = WM_DADD(WM_DMUL(m->m[1], yy), m->m[2]);
		const double cy = WM_DADD(WM_DMUL(m->m[4], yy), m->m[5]);
		for (int64_t i = 0; i < out.w; i++) {
			double xx = (double)(out.x + i);
			lx[i] = WM_DADD(WM_DADD(WM_DMUL(a, xx), cx), ox);
			ly[i] = WM_DADD(WM_DADD(WM_DMUL(d, xx), cy), oy);
		}
		return;
	}
	if (m->nfields == 1 && m->field[0].kind == SF_FIELD_LINEAR && !m->projective &&
	    m->field[0].g[3] == 0.0 && m->field[0].w > 0 && m->field[0].h > 0) {
		row_coords_linear_field(m, out, yy, ox, oy, lx, ly);
		return;
	}
	for (int64_t i = 0; i < out.w; i++) {
		double sx, sy;
		wm_map_point(m, (double)(out.x + i), yy, &sx, &sy);
		lx[i] = WM_DADD(sx, ox);
		ly[i] = WM_DADD(sy, oy);
	}
}

/* Four samples at once (RGBA, 4-channel fluorescence) with GCC/clang vector
 * types: element-wise IEEE float operations in the same order as
 * wm_lerp/wm_round_clamp, so the results are the scalar ones, bit for bit. */
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

static inline v4f lerp4(v4f a, v4f b, float t)
{
	v4f tv = {t, t, t, t};
	return a + tv * (b - a);
}

/* The bilinear blend of one pixel's taps p (a, b) and q (c, d) per type:
 * the integer types as wm_bilinear, lane by lane; float32 through
 * wm_bilinear_f32 (double, zero-weight taps left out), one lane at a time:
 * the per-channel loop's values, so the 4-sample path stays the planar
 * one. */
#define BLEND4_u8(pa, pb, qa, qb, tx, ty)  lerp4(lerp4(pa, pb, tx), lerp4(qa, qb, tx), ty)
#define BLEND4_u16(pa, pb, qa, qb, tx, ty) lerp4(lerp4(pa, pb, tx), lerp4(qa, qb, tx), ty)
#define BLEND4_f32(pa, pb, qa, qb, tx, ty) blend4_f32(pa, pb, qa, qb, tx, ty)

static inline v4f blend4_f32(v4f pa, v4f pb, v4f qa, v4f qb, float tx, float ty)
{
	v4f r = {wm_bilinear_f32(pa[0], pb[0], qa[0], qb[0], tx, ty),
	         wm_bilinear_f32(pa[1], pb[1], qa[1], qb[1], tx, ty),
	         wm_bilinear_f32(pa[2], pb[2], qa[2], qb[2], tx, ty),
	         wm_bilinear_f32(pa[3], pb[3], qa[3], qb[3], tx, ty)};
	return r;
}

/* Two neighbouring pixels of four samples (a, the one at p, and b, the one
 * at p + 4) as floats.  With SSE2 (every x86-64) one unaligned load and a
 * widening unpack per pixel pair; GCC scalarises __builtin_convertvector of
 * integers without SSE4.1, so the generic path is the fallback only.  Every
 * u8, u16 and f32 value converts exactly, so both give the same floats. */
#if defined(__SSE2__)
#include <emmintrin.h>

static inline void load4x2_u8(const uint8_t *p, v4f *a, v4f *b)
{
	__m128i z = _mm_setzero_si128();
	__m128i w = _mm_unpacklo_epi8(_mm_loadl_epi64((const __m128i *)(const void *)p), z);
	*a = (v4f)_mm_cvtepi32_ps(_mm_unpacklo_epi16(w, z));
	*b = (v4f)_mm_cvtepi32_ps(_mm_unpackhi_epi16(w, z));
}

static inline void load4x2_u16(const uint16_t *p, v4f *a, v4f *b)
{
	__m128i z = _mm_setzero_si128();
	__m128i v = _mm_loadu_si128((const __m128i *)(const void *)p);
	*a = (v4f)_mm_cvtepi32_ps(_mm_unpacklo_epi16(v, z));
	*b = (v4f)_mm_cvtepi32_ps(_mm_unpackhi_epi16(v, z));
}
#else
static inline void load4x2_u8(const uint8_t *p, v4f *a, v4f *b)
{
	*a = (v4f){p[0], p[1], p[2], p[3]};
	*b = (v4f){p[4], p[5], p[6], p[7]};
}

static inline void load4x2_u16(const uint16_t *p, v4f *a, v4f *b)
{
	*a = (v4f){p[0], p[1], p[2], p[3]};
	*b = (v4f){p[4], p[5], p[6], p[7]};
}
#endif

static inline void load4x2_f32(const float *p, v4f *a, v4f *b)
{
	memcpy(a, p, sizeof *a);
	memcpy(b, p + 4, sizeof *b);
}

/* floor(x) as an integer for -2^62 < x < 2^62 (not NaN): truncate, then
 * step down when truncation went up.  Cheaper than floor() without
 * SSE4.1's roundsd; the same integer, so the same pixels. */
static inline int64_t floor_i64(double x)
{
	int64_t i = (int64_t)x;
	return i - ((double)i > x);
}

/* Store four blended lanes.  Precondition: every lane is a bilinear blend
 * (lerps with weights in [0, 1]) of samples of the type, so it lies within
 * [0, max] exactly (a float lerp never leaves the interval of its ends) and
 * is not NaN; then wm_round_clamp is just (int)(v + 0.5): v + 0.5 <= max +
 * 0.5 truncates to at most max.  So these give wm_round_clamp's bytes. */
#if defined(__SSE2__)
static inline void store4_u8(uint8_t *o, v4f v)
{
	__m128i r = _mm_cvttps_epi32(_mm_add_ps((__m128)v, _mm_set1_ps(0.5f)));
	r = _mm_packs_epi32(r, r); /* <= 255: no saturation */
	int32_t four = _mm_cvtsi128_si32(_mm_packus_epi16(r, r));
	memcpy(o, &four, 4);
}

static inline void store4_u16(uint16_t *o, v4f v)
{
	__m128i r = _mm_cvttps_epi32(_mm_add_ps((__m128)v, _mm_set1_ps(0.5f)));
	/* no unsigned 32 -> 16 pack before SSE4.1: shift into the signed range,
	 * pack, shift back */
	__m128i bias = _mm_set1_epi32(32768);
	r = _mm_packs_epi32(_mm_sub_epi32(r, bias), _mm_sub_epi32(r, bias));
	r = _mm_xor_si128(r, _mm_set1_epi16((short)0x8000));
	_mm_storel_epi64((__m128i *)(void *)o, r);
}
#else
static inline void store4_u8(uint8_t *o, v4f v)
{
	for (int i = 0; i < 4; i++)
		o[i] = (uint8_t)(int32_t)(v[i] + 0.5f);
}

static inline void store4_u16(uint16_t *o, v4f v)
{
	for (int i = 0; i < 4; i++)
		o[i] = (uint16_t)(int32_t)(v[i] + 0.5f);
}
#endif

static inline void store4_f32(float *o, v4f v)
{
	memcpy(o, &v, sizeof v);
}

/* A rotated map walks the source across rows, where the hardware
 * prefetcher cannot follow: a cache miss every few pixels.  So the kernel
 * asks for the two rows of taps of the pixel at the same place
 * PREFETCH_ROWS output rows below (a hint only: no pixel depends on it):
 * the source rows the next output rows will start on, a row's time ahead.
 * With the AVX2 path, test_warp --bench affine: 2 rows below 197-212
 * Mpx/s (1 or 3 no better); 16, 64 or 256 pixels ahead in the same row
 * (the old scheme) 114-164 Mpx/s.
 *
 * always_inline: GCC 12 kept this out of line once the AVX2 functions
 * below inlined its callers, and then emitted no prefetch at all. */
#define PREFETCH_ROWS 2

static inline __attribute__((always_inline)) void prefetch_taps(const uint8_t *base, size_t stride,
                                                                int64_t sw, int64_t sh, double x,
                                                                double y, size_t px)
{
	if (x >= 0.0 && x < (double)sw && y >= 0.0 && y < (double)(sh - 1)) {
		const uint8_t *p = base + (size_t)y * stride + (size_t)x * px;
		__builtin_prefetch(p);
		__builtin_prefetch(p + stride);
	}
}

/* The per-type sampling loops.  T: sample type; NAME: suffix; MAXV: the
 * largest value of an integer type (0 for float, which is stored as is). */
#define STORE_u8(v)  ((uint8_t)wm_round_clamp((v), 255.0f))
#define STORE_u16(v) ((uint16_t)wm_round_clamp((v), 65535.0f))
#define STORE_f32(v) (v)

/* Per-type bilinear blends (warp_math.h): the integer types in float as
 * they always were; float32 in double with zero-weight taps left out. */
#define BLEND_u8(a, b, c, d, tx, ty)  wm_bilinear(a, b, c, d, tx, ty)
#define BLEND_u16(a, b, c, d, tx, ty) wm_bilinear(a, b, c, d, tx, ty)
#define BLEND_f32(a, b, c, d, tx, ty) wm_bilinear_f32(a, b, c, d, tx, ty)

#define DEFINE_SAMPLERS(T, NAME)                                                                   \
	static inline __attribute__((always_inline)) void nearest_##NAME(                          \
	    const uint8_t *base, size_t stride, int64_t sw, int64_t sh, const double *restrict lx, \
	    const double *restrict ly, int64_t n, unsigned spp, T bg, T *restrict out)             \
	{                                                                                          \
		for (int64_t i = 0; i < n; i++) {                                                  \
			/* floor(v) lies in [0, n) exactly when v does (n an integer;              \
			 * NaN fails), and truncation is floor for v >= 0 */                       \
			double vx = WM_DADD(lx[i], 0.5), vy = WM_DADD(ly[i], 0.5);                 \
			T *o = out + (size_t)i * spp;                                              \
			if (vx >= 0.0 && vx < (double)sw && vy >= 0.0 && vy < (double)sh) {        \
				const T *p =                                                       \
				    (const T *)(const void *)(base + (size_t)vy * stride) +        \
				    (size_t)vx * spp;                                              \
				for (unsigned c = 0; c < spp; c++)                                 \
					o[c] = p[c];                                               \
			} else {                                                                   \
				for (unsigned c = 0; c < spp; c++)                                 \
					o[c] = bg;                                                 \
			}                                                                          \
		}                                                                                  \
	}                                                                                          \
                                                                                                   \
	/* Tap (x, y) channel c, or the background outside the buffer. */                          \
	static inline float tap_##NAME(const uint8_t *base, size_t stride, int64_t sw, int64_t sh, \
	                               int64_t x, int64_t y, unsigned spp, unsigned c, float bgf)  \
	{                                                                                          \
		if (x < 0 || x >= sw || y < 0 || y >= sh)                                          \
			return bgf;                                                                \
		return (float)((const T *)(const void *)(base + (size_t)y *                        \
		                                                    stride))[(size_t)x * spp + c]; \
	}                                                                                          \
                                                                                                   \
	static inline __attribute__((always_inline)) void bilinear_##NAME(                         \
	    const uint8_t *base, size_t stride, int64_t sw, int64_t sh, const double *restrict lx, \
	    const double *restrict ly, const double *plx, const double *ply, int64_t n,            \
	    unsigned spp, T bg, float bgf, T *restrict out)                                        \
	{                                                                                          \
		for (int64_t i = 0; i < n; i++) {                                                  \
			double x = lx[i], y = ly[i];                                               \
			T *o = out + (size_t)i * spp;                                              \
			if (plx)                                                                   \
				prefetch_taps(base, stride, sw, sh, plx[i], ply[i],                \
				              spp * sizeof(T));                                    \
			if (wm_bilinear_outside(x, y, sw, sh)) {                                   \
				for (unsigned c = 0; c < spp; c++)                                 \
					o[c] = bg;                                                 \
				continue;                                                          \
			}                                                                          \
			int64_t x0 = floor_i64(x), y0 = floor_i64(y);                              \
			float tx = (float)WM_DADD(x, -(double)x0);                                 \
			float ty = (float)WM_DADD(y, -(double)y0);                                 \
			if (x0 >= 0 && x0 + 1 < sw && y0 >= 0 && y0 + 1 < sh) {                    \
				const T *p =                                                       \
				    (const T *)(const void *)(base + (size_t)y0 * stride) +        \
				    (size_t)x0 * spp;                                              \
				const T *q =                                                       \
				    (const T *)(const void *)((const uint8_t *)p + stride);        \
				if (spp == 4) {                                                    \
					v4f pa, pb, qa, qb;                                        \
					load4x2_##NAME(p, &pa, &pb);                               \
					load4x2_##NAME(q, &qa, &qb);                               \
					store4_##NAME(o, BLEND4_##NAME(pa, pb, qa, qb, tx, ty));   \
					continue;                                                  \
				}                                                                  \
				for (unsigned c = 0; c < spp; c++) {                               \
					o[c] = STORE_##NAME(                                       \
					    BLEND_##NAME((float)p[c], (float)p[spp + c],           \
					                 (float)q[c], (float)q[spp + c], tx, ty)); \
				}                                                                  \
				continue;                                                          \
			}                                                                          \
			for (unsigned c = 0; c < spp; c++) {                                       \
				float a = tap_##NAME(base, stride, sw, sh, x0, y0, spp, c, bgf);   \
				float b =                                                          \
				    tap_##NAME(base, stride, sw, sh, x0 + 1, y0, spp, c, bgf);     \
				float d =                                                          \
				    tap_##NAME(base, stride, sw, sh, x0, y0 + 1, spp, c, bgf);     \
				float f =                                                          \
				    tap_##NAME(base, stride, sw, sh, x0 + 1, y0 + 1, spp, c, bgf); \
				o[c] = STORE_##NAME(BLEND_##NAME(a, b, d, f, tx, ty));             \
			}                                                                          \
		}                                                                                  \
	}

/* Bicubic for the integer types: weights and sums in float, as always.
 * float32 has its own (bicubic_f32, below). */
#define DEFINE_BICUBIC(T, NAME)                                                                    \
	static inline __attribute__((always_inline)) void bicubic_##NAME(                          \
	    const uint8_t *base, size_t stride, int64_t sw, int64_t sh, const double *restrict lx, \
	    const double *restrict ly, int64_t n, unsigned spp, T bg, float bgf, T *restrict out)  \
	{                                                                                          \
		for (int64_t i = 0; i < n; i++) {                                                  \
			double x = lx[i], y = ly[i];                                               \
			T *o = out + (size_t)i * spp;                                              \
			if (wm_bicubic_outside(x, y, sw, sh)) {                                    \
				for (unsigned c = 0; c < spp; c++)                                 \
					o[c] = bg;                                                 \
				continue;                                                          \
			}                                                                          \
			int64_t fx = floor_i64(x), fy = floor_i64(y);                              \
			float wx[4], wy[4];                                                        \
			wm_cubic_weights((float)WM_DADD(x, -(double)fx), wx);                      \
			wm_cubic_weights((float)WM_DADD(y, -(double)fy), wy);                      \
			int64_t x0 = fx - 1, y0 = fy - 1;                                          \
			int inside = x0 >= 0 && x0 + 3 < sw && y0 >= 0 && y0 + 3 < sh;             \
			for (unsigned c = 0; c < spp; c++) {                                       \
				float r[4];                                                        \
				for (int j = 0; j < 4; j++) {                                      \
					float t[4];                                                \
					if (inside) {                                              \
						const T *p =                                       \
						    (const T *)(const void *)(base +               \
						                              (size_t)(y0 + j) *   \
						                                  stride) +        \
						    (size_t)x0 * spp + c;                          \
						for (int k = 0; k < 4; k++)                        \
							t[k] = (float)p[(size_t)k * spp];          \
					} else {                                                   \
						for (int k = 0; k < 4; k++)                        \
							t[k] = tap_##NAME(base, stride, sw, sh,    \
							                  x0 + k, y0 + j, spp, c,  \
							                  bgf);                    \
					}                                                          \
					r[j] = wm_dot4(wx, t[0], t[1], t[2], t[3]);                \
				}                                                                  \
				o[c] = STORE_##NAME(wm_dot4(wy, r[0], r[1], r[2], r[3]));          \
			}                                                                          \
		}                                                                                  \
	}

DEFINE_SAMPLERS(uint8_t, u8)
DEFINE_SAMPLERS(uint16_t, u16)
DEFINE_SAMPLERS(float, f32)
DEFINE_BICUBIC(uint8_t, u8)
DEFINE_BICUBIC(uint16_t, u16)

/* Bicubic for float32 (wm_dot4_d: double, zero-weight taps left out).  The
 * weights are converted to double once per pixel, and a pixel with no weight
 * exactly 0 (any sample off the grid lines) sums without the selects, which
 * give the same value there: float32 bicubic ran at 40% of its old speed
 * with the selects on every tap. */
static inline double dot4_f32(int zero, const double w[4], double a, double b, double c, double d)
{
	return zero ? wm_dot4_d(w, a, b, c, d) : wm_dot4_d_nz(w, a, b, c, d);
}

static inline __attribute__((always_inline)) void
bicubic_f32(const uint8_t *base, size_t stride, int64_t sw, int64_t sh, const double *restrict lx,
            const double *restrict ly, int64_t n, unsigned spp, float bg, float bgf,
            float *restrict out)
{
	for (int64_t i = 0; i < n; i++) {
		double x = lx[i], y = ly[i];
		float *o = out + (size_t)i * spp;
		if (wm_bicubic_outside(x, y, sw, sh)) {
			for (unsigned c = 0; c < spp; c++)
				o[c] = bg;
			continue;
		}
		int64_t fx = floor_i64(x), fy = floor_i64(y);
		float wxf[4], wyf[4];
		wm_cubic_weights((float)WM_DADD(x, -(double)fx), wxf);
		wm_cubic_weights((float)WM_DADD(y, -(double)fy), wyf);
		double wx[4], wy[4];
		int zero = 0;
		for (int k = 0; k < 4; k++) {
			wx[k] = (double)wxf[k];
			wy[k] = (double)wyf[k];
			zero |= (wxf[k] == 0.0f) | (wyf[k] == 0.0f);
		}
		int64_t x0 = fx - 1, y0 = fy - 1;
		int inside = x0 >= 0 && x0 + 3 < sw && y0 >= 0 && y0 + 3 < sh;
		for (unsigned c = 0; c < spp; c++) {
			double r[4];
			for (int j = 0; j < 4; j++) {
				double t[4];
				if (inside) {
					const float *p =
					    (const float *)(const void *)(base + (size_t)(y0 + j) *
					                                             stride) +
					    (size_t)x0 * spp + c;
					for (int k = 0; k < 4; k++)
						t[k] = (double)p[(size_t)k * spp];
				} else {
					for (int k = 0; k < 4; k++)
						t[k] = (double)tap_f32(base, stride, sw, sh, x0 + k,
						                       y0 + j, spp, c, bgf);
				}
				r[j] = dot4_f32(zero, wx, t[0], t[1], t[2], t[3]);
			}
			o[c] = (float)dot4_f32(zero, wy, r[0], r[1], r[2], r[3]);
		}
	}
}

/* Wider vectors for the 4-sample bilinear path.  The per-pixel loop above
 * spends most of its time on one pixel's bookkeeping (bounds, floor, two
 * float conversions, addressing) around 128-bit arithmetic; with AVX2 a
 * group of four pixels shares it: one 4-double bounds test, floor and
 * conversion to the float weights, then two pixels per 256-bit lerp.  The
 * values are the per-pixel path's, bit for bit: floor(x) is exact and
 * equals (double)floor_i64(x), so x - floor(x) and its conversion to float
 * (vcvtpd2ps, round to nearest like the scalar cast) give the same tx; the
 * lerps are the same element-wise multiplies, adds and subtracts in the
 * same order (no FMA: the functions enable AVX2 only, and C11 mode does not
 * contract), and float32 blends as wm_bilinear_f32 does, in double, one
 * pixel per 256-bit vector; the store rounds and packs as store4_* does.  A
 * group with a tap outside the buffer, or a NaN coordinate, goes through the
 * per-pixel path, as do the last n % 4 pixels.  Selected at run time (__builtin_cpu_supports) so
 * the binary still runs on any x86-64. */
#if defined(SF_WARP_AVX2)

#define AVX2_FN static inline __attribute__((target("avx2"), always_inline))

/* Taps of pixels i and j: *a = the 4 samples at pi (lanes 0-3) and at pj
 * (lanes 4-7), *b = the 4 samples after each. */
AVX2_FN void load8x2_u8(const uint8_t *pi, const uint8_t *pj, __m256 *a, __m256 *b)
{
	__m128i w = _mm_unpacklo_epi32(_mm_loadl_epi64((const __m128i *)(const void *)pi),
	                               _mm_loadl_epi64((const __m128i *)(const void *)pj));
	*a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(w));
	*b = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(w, 8)));
}

AVX2_FN void load8x2_u16(const uint16_t *pi, const uint16_t *pj, __m256 *a, __m256 *b)
{
	__m128i vi = _mm_loadu_si128((const __m128i *)(const void *)pi);
	__m128i vj = _mm_loadu_si128((const __m128i *)(const void *)pj);
	*a = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_unpacklo_epi64(vi, vj)));
	*b = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_unpackhi_epi64(vi, vj)));
}

AVX2_FN void load8x2_f32(const float *pi, const float *pj, __m256 *a, __m256 *b)
{
	__m256 vi = _mm256_loadu_ps(pi), vj = _mm256_loadu_ps(pj);
	*a = _mm256_permute2f128_ps(vi, vj, 0x20);
	*b = _mm256_permute2f128_ps(vi, vj, 0x31);
}

/* Store pixels 0, 1 (v01) and 2, 3 (v23); see store4_* for why the
 * rounding is (int)(v + 0.5) and the packs never saturate. */
AVX2_FN void store16_u8(uint8_t *o, __m256 v01, __m256 v23)
{
	__m256 half = _mm256_set1_ps(0.5f);
	__m256i r = _mm256_packus_epi32(_mm256_cvttps_epi32(_mm256_add_ps(v01, half)),
	                                _mm256_cvttps_epi32(_mm256_add_ps(v23, half)));
	/* per 128-bit lane: pixels 0, 2 | 1, 3; bytes in dwords 0, 1 | 4, 5 */
	r = _mm256_packus_epi16(r, r);
	r = _mm256_permutevar8x32_epi32(r, _mm256_setr_epi32(0, 4, 1, 5, 0, 4, 1, 5));
	_mm_storeu_si128((__m128i *)(void *)o, _mm256_castsi256_si128(r));
}

AVX2_FN void store16_u16(uint16_t *o, __m256 v01, __m256 v23)
{
	__m256 half = _mm256_set1_ps(0.5f);
	__m256i r = _mm256_packus_epi32(_mm256_cvttps_epi32(_mm256_add_ps(v01, half)),
	                                _mm256_cvttps_epi32(_mm256_add_ps(v23, half)));
	/* pixels 0, 2 | 1, 3 -> 0, 1, 2, 3 */
	r = _mm256_permute4x64_epi64(r, _MM_SHUFFLE(3, 1, 2, 0));
	_mm256_storeu_si256((__m256i *)(void *)o, r);
}

AVX2_FN void store16_f32(float *o, __m256 v01, __m256 v23)
{
	_mm256_storeu_ps(o, v01);
	_mm256_storeu_ps(o + 8, v23);
}

/* a + t (b - a), lane by lane: wm_lerp's operations. */
AVX2_FN __m256 lerp8(__m256 a, __m256 b, __m256 t)
{
	return _mm256_add_ps(a, _mm256_mul_ps(t, _mm256_sub_ps(b, a)));
}

/* wm_lerp_d lane by lane: (1 - t) a + t b in double, then, with edge, a
 * where t is 0 and b where t is 1 (selects: a NaN or infinite tap of weight
 * 0 is computed with and then dropped).  Without edge (no t of the group
 * is 0 or 1) the selects would change nothing and are left out. */
AVX2_FN __m256d lerp4d(__m256d a, __m256d b, __m256d t, int edge)
{
	const __m256d one = _mm256_set1_pd(1.0);
	__m256d r = _mm256_add_pd(_mm256_mul_pd(_mm256_sub_pd(one, t), a), _mm256_mul_pd(t, b));
	if (!edge)
		return r;
	r = _mm256_blendv_pd(r, a, _mm256_cmp_pd(t, _mm256_setzero_pd(), _CMP_EQ_OQ));
	return _mm256_blendv_pd(r, b, _mm256_cmp_pd(t, one, _CMP_EQ_OQ));
}

/* wm_bilinear_f32 on 4 lanes (float to double converts exactly; the
 * double to float conversion rounds to nearest, as the scalar cast). */
AVX2_FN __m128 bilinear4_f32(__m128 a, __m128 b, __m128 c, __m128 d, __m128 tx, __m128 ty, int edge)
{
	__m256d x = _mm256_cvtps_pd(tx);
	__m256d top = lerp4d(_mm256_cvtps_pd(a), _mm256_cvtps_pd(b), x, edge);
	__m256d bot = lerp4d(_mm256_cvtps_pd(c), _mm256_cvtps_pd(d), x, edge);
	return _mm256_cvtpd_ps(lerp4d(top, bot, _mm256_cvtps_pd(ty), edge));
}

/* The float32 blend of two pixels' taps, a pixel (128-bit half) at a time;
 * edge as in lerp4d, tested once per group, not per tap. */
AVX2_FN __m256 blend8_f32(__m256 pa, __m256 pb, __m256 qa, __m256 qb, __m256 tx, __m256 ty,
                          int edge)
{
#define LO    _mm256_castps256_ps128
#define HI(v) _mm256_extractf128_ps(v, 1)
	return _mm256_set_m128(bilinear4_f32(HI(pa), HI(pb), HI(qa), HI(qb), HI(tx), HI(ty), edge),
	                       bilinear4_f32(LO(pa), LO(pb), LO(qa), LO(qb), LO(tx), LO(ty), edge));
#undef LO
#undef HI
}

/* Whether a weight of the group (tx4, ty4: its 4 pixels) is 0 or 1: float32
 * only; the integer types' blend never selects. */
AVX2_FN int group_edge(__m128 tx4, __m128 ty4)
{
	const __m128 zero = _mm_setzero_ps(), one = _mm_set1_ps(1.0f);
	__m128 e = _mm_or_ps(_mm_or_ps(_mm_cmpeq_ps(tx4, zero), _mm_cmpeq_ps(tx4, one)),
	                     _mm_or_ps(_mm_cmpeq_ps(ty4, zero), _mm_cmpeq_ps(ty4, one)));
	return _mm_movemask_ps(e);
}

/* The blend of two pixels' taps per type: the integer types as
 * wm_bilinear, float32 as wm_bilinear_f32. */
#define BLEND8_u8(pa, pb, qa, qb, tx, ty, edge)  lerp8(lerp8(pa, pb, tx), lerp8(qa, qb, tx), ty)
#define BLEND8_u16(pa, pb, qa, qb, tx, ty, edge) lerp8(lerp8(pa, pb, tx), lerp8(qa, qb, tx), ty)
#define BLEND8_f32(pa, pb, qa, qb, tx, ty, edge) blend8_f32(pa, pb, qa, qb, tx, ty, edge)
#define EDGE_u8(tx4, ty4)                        0
#define EDGE_u16(tx4, ty4)                       0
#define EDGE_f32(tx4, ty4)                       group_edge(tx4, ty4)

/* The tap of the next row. */
#define BELOW(T, p, stride) ((const T *)(const void *)((const uint8_t *)(p) + (stride)))

/* Pixels k and k + 1 of a group: their taps (p[k] and the tap below it,
 * and the same for k + 1) blended with the group's weights tx, ty
 * broadcast over each pixel's four lanes. */

#define BLEND_PAIR(T, NAME, k, tx, ty, p, stride)                                                  \
	__extension__({                                                                            \
		const __m256i sel = _mm256_setr_epi32(k, k, k, k, k + 1, k + 1, k + 1, k + 1);     \
		__m256 tx8 = _mm256_permutevar8x32_ps(tx, sel);                                    \
		__m256 ty8 = _mm256_permutevar8x32_ps(ty, sel);                                    \
		__m256 pa, pb, qa, qb;                                                             \
		load8x2_##NAME(p[k], p[k + 1], &pa, &pb);                                          \
		load8x2_##NAME(BELOW(T, p[k], stride), BELOW(T, p[k + 1], stride), &qa, &qb);      \
		BLEND8_##NAME(pa, pb, qa, qb, tx8, ty8, edge);                                     \
	})

/* The top-left tap of pixel k of a group, from its floored coordinates
 * (ixv, iyv: int32 lanes).  Lane extracts, not a store to an array and
 * loads of its elements: those miss store forwarding and cost more than
 * the whole blend. */
#define TAP_ROW(T, k)                                                                              \
	((const T *)(const void *)(base + (size_t)_mm_extract_epi32(iyv, k) * stride) +            \
	 (size_t)_mm_extract_epi32(ixv, k) * 4)

/* Prefetch the taps of the ends of a group of four pixels of a row below
 * (prefetch_taps' purpose, without its branches): coordinates clamped
 * into the buffer, so a pixel outside it (or NaN, which max_pd turns into
 * 0) asks for an edge line, which is harmless. */
AVX2_FN void prefetch_group_avx2(const uint8_t *base, size_t stride, int64_t sw, int64_t sh,
                                 const double *x, const double *y, size_t px)
{
	if (sw < 1 || sh < 2)
		return;
	const __m256d zero = _mm256_setzero_pd();
	__m256d cx = _mm256_min_pd(_mm256_max_pd(_mm256_loadu_pd(x), zero),
	                           _mm256_set1_pd((double)(sw - 1)));
	__m256d cy = _mm256_min_pd(_mm256_max_pd(_mm256_loadu_pd(y), zero),
	                           _mm256_set1_pd((double)(sh - 2)));
	__m128i ixv = _mm256_cvttpd_epi32(cx), iyv = _mm256_cvttpd_epi32(cy);
	const uint8_t *p0 = base + (size_t)_mm_extract_epi32(iyv, 0) * stride +
	                    (size_t)_mm_extract_epi32(ixv, 0) * px;
	const uint8_t *p3 = base + (size_t)_mm_extract_epi32(iyv, 3) * stride +
	                    (size_t)_mm_extract_epi32(ixv, 3) * px;
	__builtin_prefetch(p0);
	__builtin_prefetch(p0 + stride);
	__builtin_prefetch(p3);
	__builtin_prefetch(p3 + stride);
}

#define DEFINE_BILINEAR4_AVX2(T, NAME)                                                             \
	static __attribute__((target("avx2"))) void bilinear4_avx2_##NAME(                         \
	    const uint8_t *base, size_t stride, int64_t sw, int64_t sh, const double *restrict lx, \
	    const double *restrict ly, const double *plx, const double *ply, int64_t n, T bg,      \
	    float bgf, T *restrict out)                                                            \
	{                                                                                          \
		const __m256d zero = _mm256_setzero_pd();                                          \
		const __m256d xmax = _mm256_set1_pd((double)(sw - 1));                             \
		const __m256d ymax = _mm256_set1_pd((double)(sh - 1));                             \
		int64_t i = 0;                                                                     \
		for (; i + 4 <= n; i += 4) {                                                       \
			if (plx)                                                                   \
				prefetch_group_avx2(base, stride, sw, sh, plx + i, ply + i,        \
				                    4 * sizeof(T));                                \
			__m256d x = _mm256_loadu_pd(lx + i), y = _mm256_loadu_pd(ly + i);          \
			/* all taps inside: 0 <= x < sw - 1, 0 <= y < sh - 1 (NaN fails) */        \
			__m256d in =                                                               \
			    _mm256_and_pd(_mm256_and_pd(_mm256_cmp_pd(x, zero, _CMP_GE_OQ),        \
			                                _mm256_cmp_pd(x, xmax, _CMP_LT_OQ)),       \
			                  _mm256_and_pd(_mm256_cmp_pd(y, zero, _CMP_GE_OQ),        \
			                                _mm256_cmp_pd(y, ymax, _CMP_LT_OQ)));      \
			if (_mm256_movemask_pd(in) != 0xF) {                                       \
				bilinear_##NAME(base, stride, sw, sh, lx + i, ly + i, NULL, NULL,  \
				                4, 4, bg, bgf, out + 4 * i);                       \
				continue;                                                          \
			}                                                                          \
			__m256d fx = _mm256_floor_pd(x), fy = _mm256_floor_pd(y);                  \
			__m128 tx4 = _mm256_cvtpd_ps(_mm256_sub_pd(x, fx));                        \
			__m128 ty4 = _mm256_cvtpd_ps(_mm256_sub_pd(y, fy));                        \
			__m256 tx = _mm256_set_m128(tx4, tx4), ty = _mm256_set_m128(ty4, ty4);     \
			const int edge = EDGE_##NAME(tx4, ty4);                                    \
			(void)edge;                                                                \
			/* 0 <= floor < 2^31: exact in int32 */                                    \
			__m128i ixv = _mm256_cvttpd_epi32(fx), iyv = _mm256_cvttpd_epi32(fy);      \
			const T *p[4] = {TAP_ROW(T, 0), TAP_ROW(T, 1), TAP_ROW(T, 2),              \
			                 TAP_ROW(T, 3)};                                           \
			__m256 v01 = BLEND_PAIR(T, NAME, 0, tx, ty, p, stride);                    \
			__m256 v23 = BLEND_PAIR(T, NAME, 2, tx, ty, p, stride);                    \
			store16_##NAME(out + 4 * i, v01, v23);                                     \
		}                                                                                  \
		bilinear_##NAME(base, stride, sw, sh, lx + i, ly + i, plx ? plx + i : NULL,        \
		                ply ? ply + i : NULL, n - i, 4, bg, bgf, out + 4 * i);             \
	}

DEFINE_BILINEAR4_AVX2(uint8_t, u8)
DEFINE_BILINEAR4_AVX2(uint16_t, u16)
DEFINE_BILINEAR4_AVX2(float, f32)
#endif

/* Whether to take the AVX2 4-sample path: a CPU feature read (a load and
 * a test of libgcc's table, filled before main), per row; and a buffer
 * whose floored coordinates fit the int32 lanes the path addresses with. */
#if defined(SF_WARP_AVX2)
#define BILINEAR4_AVX2(NAME) (sw < INT32_MAX && sh < INT32_MAX && __builtin_cpu_supports("avx2"))
#else
#define BILINEAR4_AVX2(NAME)    0
#define bilinear4_avx2_u8(...)  ((void)0)
#define bilinear4_avx2_u16(...) ((void)0)
#define bilinear4_avx2_f32(...) ((void)0)
#endif

#define DEFINE_SAMPLE_ROW(T, NAME)                                                                 \
	/* One row; spp constant-folds in the switch so the channel loop unrolls. */               \
	static void sample_row_##NAME(const uint8_t *base, size_t stride, int64_t sw, int64_t sh,  \
	                              const double *lx, const double *ly, const double *plx,       \
	                              const double *ply, int64_t n, unsigned spp,                  \
	                              sf_interp interp, T bg, float bgf, T *out)                   \
	{                                                                                          \
		switch (interp) {                                                                  \
		case SF_INTERP_NEAREST:                                                            \
			if (spp == 1)                                                              \
				nearest_##NAME(base, stride, sw, sh, lx, ly, n, 1, bg, out);       \
			else if (spp == 3)                                                         \
				nearest_##NAME(base, stride, sw, sh, lx, ly, n, 3, bg, out);       \
			else if (spp == 4)                                                         \
				nearest_##NAME(base, stride, sw, sh, lx, ly, n, 4, bg, out);       \
			else                                                                       \
				nearest_##NAME(base, stride, sw, sh, lx, ly, n, spp, bg, out);     \
			break;                                                                     \
		case SF_INTERP_BILINEAR:                                                           \
			if (spp == 1)                                                              \
				bilinear_##NAME(base, stride, sw, sh, lx, ly, plx, ply, n, 1, bg,  \
				                bgf, out);                                         \
			else if (spp == 3)                                                         \
				bilinear_##NAME(base, stride, sw, sh, lx, ly, plx, ply, n, 3, bg,  \
				                bgf, out);                                         \
			else if (spp == 4 && BILINEAR4_AVX2(NAME))                                 \
				bilinear4_avx2_##NAME(base, stride, sw, sh, lx, ly, plx, ply, n,   \
				                      bg, bgf, out);                               \
			else if (spp == 4)                                                         \
				bilinear_##NAME(base, stride, sw, sh, lx, ly, plx, ply, n, 4, bg,  \
				                bgf, out);                                         \
			else                                                                       \
				bilinear_##NAME(base, stride, sw, sh, lx, ly, plx, ply, n, spp,    \
				                bg, bgf, out);                                     \
			break;                                                                     \
		case SF_INTERP_BICUBIC:                                                            \
			if (spp == 1)                                                              \
				bicubic_##NAME(base, stride, sw, sh, lx, ly, n, 1, bg, bgf, out);  \
			else if (spp == 4)                                                         \
				bicubic_##NAME(base, stride, sw, sh, lx, ly, n, 4, bg, bgf, out);  \
			else                                                                       \
				bicubic_##NAME(base, stride, sw, sh, lx, ly, n, spp, bg, bgf,      \
				               out);                                               \
			break;                                                                     \
		}                                                                                  \
	}

DEFINE_SAMPLE_ROW(uint8_t, u8)
DEFINE_SAMPLE_ROW(uint16_t, u16)
DEFINE_SAMPLE_ROW(float, f32)

static int check_args(const sf_warp_src *src, const sf_warp_fmt *fmt, sf_wrect out, const void *dst,
                      size_t dst_stride, sf_err *e)
{
	size_t bytes = sf_dtype_bytes(fmt->dtype);
	if (bytes == 0)
		return sf_fail(e, SF_EINVAL, "warp: unknown sample type %d", (int)fmt->dtype);
	if (fmt->samples < 1 || fmt->samples > MAX_SAMPLES)
		return sf_fail(e, SF_EINVAL, "warp: %u samples per pixel (1..%d)", fmt->samples,
		               MAX_SAMPLES);
	if ((unsigned)fmt->interp > SF_INTERP_BICUBIC)
		return sf_fail(e, SF_EINVAL, "warp: unknown interpolation %d", (int)fmt->interp);
	if (out.w < 0 || out.h < 0 || out.w > MAX_TILE_DIM || out.h > MAX_TILE_DIM)
		return sf_fail(e, SF_EINVAL, "warp: output rect %lldx%lld", (long long)out.w,
		               (long long)out.h);
	if (src->rect.w < 0 || src->rect.h < 0 || src->rect.w > ((int64_t)1 << 31) ||
	    src->rect.h > ((int64_t)1 << 31))
		return sf_fail(e, SF_EINVAL, "warp: source rect %lldx%lld", (long long)src->rect.w,
		               (long long)src->rect.h);
	size_t pix = bytes * fmt->samples;
	if ((src->rect.w > 0 && src->rect.h > 0) &&
	    (!src->pixels || src->stride < pix * (size_t)src->rect.w || src->stride % bytes ||
	     (uintptr_t)src->pixels % bytes))
		return sf_fail(e, SF_EINVAL, "warp: source buffer stride or alignment");
	if (out.w > 0 && out.h > 0 &&
	    (!dst || dst_stride < pix * (size_t)out.w || dst_stride % bytes ||
	     (uintptr_t)dst % bytes))
		return sf_fail(e, SF_EINVAL, "warp: output buffer stride or alignment");
	return SF_OK;
}

/* The background in the sample type (integers rounded half up, clamped). */
static float background_value(const sf_warp_fmt *fmt)
{
	double b = isfinite(fmt->background) ? fmt->background : 0.0;
	switch (fmt->dtype) {
	case SF_U8: return (float)wm_round_clamp((float)fmax(fmin(b, 1e6), -1.0), 255.0f);
	case SF_U16: return (float)wm_round_clamp((float)fmax(fmin(b, 1e6), -1.0), 65535.0f);
	case SF_F32: return (float)b;
	}
	return 0.0f;
}

/* Row y's x coordinates in the ring of PREFETCH_ROWS + 1 rows of w x and
 * w y coordinates (the y ones follow the x ones). */
static double *coord_row(double *xy, int64_t w, int64_t y)
{
	return xy + (size_t)(y % (PREFETCH_ROWS + 1)) * 2 * (size_t)w;
}

int sf_warp_tile(const sf_map *m, const sf_warp_src *src, const sf_warp_fmt *fmt, sf_wrect out,
                 void *dst, size_t dst_stride, sf_err *e)
{
	int rc = check_args(src, fmt, out, dst, dst_stride, e);
	if (rc != SF_OK || out.w == 0 || out.h == 0)
		return rc;
	/* coordinates of the row being sampled and of the PREFETCH_ROWS below */
	const int64_t nrows = PREFETCH_ROWS + 1;
	double *xy = malloc((size_t)nrows * 2 * (size_t)out.w * sizeof *xy);
	if (!xy)
		return sf_fail(e, SF_ENOMEM, "warp: row scratch of %lld pixels", (long long)out.w);
	for (int64_t y = 0; y < PREFETCH_ROWS && y < out.h; y++)
		row_coords(m, out, y, src->rect, coord_row(xy, out.w, y),
		           coord_row(xy, out.w, y) + out.w);
	const uint8_t *base = src->pixels;
	int64_t sw = src->rect.w, sh = src->rect.h;
	if (sw == 0 || sh == 0)
		sw = sh = 0; /* an empty buffer: every tap is background */
	float bgf = background_value(fmt);
	unsigned spp = fmt->samples;
	for (int64_t y = 0; y < out.h; y++) {
		uint8_t *row = (uint8_t *)dst + (size_t)y * dst_stride;
		const double *lx = coord_row(xy, out.w, y), *ly = lx + out.w;
		const double *plx = NULL, *ply = NULL;
		if (y + PREFETCH_ROWS < out.h) {
			double *ahead = coord_row(xy, out.w, y + PREFETCH_ROWS);
			row_coords(m, out, y + PREFETCH_ROWS, src->rect, ahead, ahead + out.w);
			plx = ahead;
			ply = ahead + out.w;
		}
		switch (fmt->dtype) {
		case SF_U8:
			sample_row_u8(base, src->stride, sw, sh, lx, ly, plx, ply, out.w, spp,
			              fmt->interp, (uint8_t)bgf, bgf, (uint8_t *)row);
			break;
		case SF_U16:
			sample_row_u16(base, src->stride, sw, sh, lx, ly, plx, ply, out.w, spp,
			               fmt->interp, (uint16_t)bgf, bgf, (uint16_t *)(void *)row);
			break;
		case SF_F32:
			sample_row_f32(base, src->stride, sw, sh, lx, ly, plx, ply, out.w, spp,
			               fmt->interp, bgf, bgf, (float *)(void *)row);
			break;
		}
	}
	free(xy);
	return SF_OK;
}

/* --- the source rect ------------------------------------------------------ */

typedef struct box {
	double x0, x1, y0, y1;
} box;

static void box_add_point(box *b, double x, double y)
{
	b->x0 = fmin(b->x0, x);
	b->x1 = fmax(b->x1, x);
	b->y0 = fmin(b->y0, y);
	b->y1 = fmax(b->y1, y);
}

static int box_finite(const box *b)
{
	return isfinite(b->x0) && isfinite(b->x1) && isfinite(b->y0) && isfinite(b->y1);
}

/* Bounding box of the affine rows r (2x3) applied to box b. */
static box box_affine(const double r[6], const box *b)
{
	box o = {INFINITY, -INFINITY, INFINITY, -INFINITY};
	double xs[2] = {b->x0, b->x1}, ys[2] = {b->y0, b->y1};
	for (int i = 0; i < 2; i++)
		for (int j = 0; j < 2; j++)
			box_add_point(&o, wm_affine_row(r, xs[i], ys[j]),
			              wm_affine_row(r + 3, xs[i], ys[j]));
	return o;
}

/* Extremes of the field values the grid-index box gb can interpolate:
 * bilinear and B-spline weights are >= 0 and sum to 1, so values stay within
 * the range of the nodes that weigh in. */
static void field_bounds(const sf_field_step *f, const box *gb, double lo[2], double hi[2])
{
	double w = f->w, h = f->h;
	lo[0] = lo[1] = INFINITY;
	hi[0] = hi[1] = -INFINITY;
	if (!box_finite(gb)) {
		for (int k = 0; k < 2; k++) {
			lo[k] = fmin(f->vmin[k], 0.0);
			hi[k] = fmax(f->vmax[k], 0.0);
		}
		return;
	}
	double nx0, nx1, ny0, ny1; /* node range, inclusive */
	if (f->kind == SF_FIELD_LINEAR) {
		nx0 = floor(fmin(fmax(gb->x0, 0), w - 1));
		nx1 = ceil(fmin(fmax(gb->x1, 0), w - 1));
		ny0 = floor(fmin(fmax(gb->y0, 0), h - 1));
		ny1 = ceil(fmin(fmax(gb->y1, 0), h - 1));
	} else {
		/* zero displacement anywhere outside [1, size - 2) */
		if (gb->x0 < 1 || gb->x1 >= w - 2 || gb->y0 < 1 || gb->y1 >= h - 2)
			lo[0] = lo[1] = hi[0] = hi[1] = 0.0;
		nx0 = fmax(floor(fmax(gb->x0, 1)) - 1, 0);
		nx1 = fmin(floor(fmin(gb->x1, w - 3)) + 2, w - 1);
		ny0 = fmax(floor(fmax(gb->y0, 1)) - 1, 0);
		ny1 = fmin(floor(fmin(gb->y1, h - 3)) + 2, h - 1);
		if (gb->x1 < 1 || gb->x0 >= w - 2 || gb->y1 < 1 || gb->y0 >= h - 2 || w < 4 ||
		    h < 4)
			return; /* wholly outside: only the zero */
	}
	for (int64_t y = (int64_t)ny0; y <= (int64_t)ny1; y++) {
		const float *row = f->v + 2 * (size_t)(y * (int64_t)f->w);
		for (int64_t x = (int64_t)nx0; x <= (int64_t)nx1; x++) {
			for (int k = 0; k < 2; k++) {
				lo[k] = fmin(lo[k], row[2 * x + k]);
				hi[k] = fmax(hi[k], row[2 * x + k]);
			}
		}
	}
}

/* Clip [lo, hi] (inclusive, doubles) to [0, n) as integers; 0 when empty. */
static int clip_span(double lo, double hi, int64_t n, int64_t *a, int64_t *b)
{
	if (!(hi >= 0) || !(lo <= (double)(n - 1)) || n <= 0)
		return 0;
	*a = lo <= 0 ? 0 : (int64_t)lo;
	*b = hi >= (double)(n - 1) ? n - 1 : (int64_t)hi;
	return *a <= *b;
}

void sf_warp_source_rect(const sf_map *m, sf_wrect out, sf_interp interp, int64_t src_w,
                         int64_t src_h, sf_wrect *need)
{
	const sf_wrect none = {0, 0, 0, 0};
	*need = none;
	if (out.w <= 0 || out.h <= 0 || src_w <= 0 || src_h <= 0)
		return;
	box b = {(double)out.x, (double)(out.x + out.w - 1), (double)out.y,
	         (double)(out.y + out.h - 1)};
	/* the fields, as boxes: p + vm * [lo, hi] */
	for (unsigned k = 0; k < m->nfields && box_finite(&b); k++) {
		const sf_field_step *f = &m->field[k];
		box gb = box_affine(f->g, &b);
		double lo[2], hi[2];
		field_bounds(f, &gb, lo, hi);
		for (int r = 0; r < 2; r++) {
			double dlo = 0, dhi = 0;
			for (int j = 0; j < 2; j++) {
				double a = f->vm[2 * r + j] * lo[j], c = f->vm[2 * r + j] * hi[j];
				dlo += fmin(a, c);
				dhi += fmax(a, c);
			}
			if (r == 0) {
				b.x0 += dlo;
				b.x1 += dhi;
			} else {
				b.y0 += dlo;
				b.y1 += dhi;
			}
		}
	}
	box s = {INFINITY, -INFINITY, INFINITY, -INFINITY};
	int whole = !box_finite(&b);
	double xs[2] = {b.x0, b.x1}, ys[2] = {b.y0, b.y1};
	for (int i = 0; i < 2 && !whole; i++) {
		for (int j = 0; j < 2; j++) {
			double px = wm_affine_row(m->m, xs[i], ys[j]);
			double py = wm_affine_row(m->m + 3, xs[i], ys[j]);
			if (m->projective) {
				/* the image of a box is the hull of its corners only
				 * while w keeps one sign; else read everything */
				double w = wm_affine_row(m->m + 6, xs[i], ys[j]);
				if (!(w > 0)) {
					whole = 1;
					break;
				}
				px /= w;
				py /= w;
			}
			box_add_point(&s, px, py);
		}
	}
	if (whole || !box_finite(&s)) {
		*need = (sf_wrect){0, 0, src_w, src_h};
		return;
	}
	const double eps = 1e-3, big = 1e15;
	double lo_shift = 0, hi_shift = 0;
	switch (interp) {
	case SF_INTERP_NEAREST: lo_shift = hi_shift = 0.5; break;
	case SF_INTERP_BILINEAR: hi_shift = 1; break;
	case SF_INTERP_BICUBIC:
		lo_shift = -1;
		hi_shift = 2;
		break;
	}
	/* nearest reads floor(x + 0.5); bilinear floor(x) .. floor(x) + 1;
	 * bicubic floor(x) - 1 .. floor(x) + 2 */
	double x0 = floor(fmax(s.x0 - eps, -big) + (interp == SF_INTERP_NEAREST ? 0.5 : lo_shift));
	double x1 = floor(fmin(s.x1 + eps, big) + (interp == SF_INTERP_NEAREST ? 0.5 : 0)) +
	            (interp == SF_INTERP_NEAREST ? 0 : hi_shift);
	double y0 = floor(fmax(s.y0 - eps, -big) + (interp == SF_INTERP_NEAREST ? 0.5 : lo_shift));
	double y1 = floor(fmin(s.y1 + eps, big) + (interp == SF_INTERP_NEAREST ? 0.5 : 0)) +
	            (interp == SF_INTERP_NEAREST ? 0 : hi_shift);
	int64_t ax, bx, ay, by;
	if (!clip_span(x0, x1, src_w, &ax, &bx) || !clip_span(y0, y1, src_h, &ay, &by))
		return;
	*need = (sf_wrect){ax, ay, bx - ax + 1, by - ay + 1};
}

/* --- level choice --------------------------------------------------------- */

void sf_warp_choose_source(const sf_transform *t, const double out_ds[2], unsigned nlevels,
                           const double (*level_ds)[2], sf_source_choice *c)
{
	double need = sqrt(out_ds[0] * out_ds[1]) * sf_transform_scale(t);
	unsigned best = 0;
	for (unsigned l = 1; l < nlevels; l++) {
		double ds = fmax(level_ds[l][0], level_ds[l][1]);
		if (ds <= need * 1.01 && ds >= fmax(level_ds[best][0], level_ds[best][1]))
			best = l;
	}
	c->level = best;
	c->prefilter = 1;
	double have = nlevels ? sqrt(level_ds[best][0] * level_ds[best][1]) : 1.0;
	double r = need / have;
	if (isfinite(r) && r > 1.5)
		c->prefilter = r > 65536 ? 65536 : (uint32_t)lround(r);
	for (int k = 0; k < 2; k++)
		c->ds[k] = (nlevels ? level_ds[best][k] : 1.0) * c->prefilter;
}

sf_wrect sf_warp_prefilter_read_rect(const sf_source_choice *c, sf_wrect need, int64_t lw,
                                     int64_t lh)
{
	int64_t k = c->prefilter;
	int64_t x0 = need.x * k, y0 = need.y * k;
	int64_t x1 = (need.x + need.w) * k, y1 = (need.y + need.h) * k;
	x0 = x0 < 0 ? 0 : x0;
	y0 = y0 < 0 ? 0 : y0;
	x1 = x1 > lw ? lw : x1;
	y1 = y1 > lh ? lh : y1;
	if (x1 <= x0 || y1 <= y0)
		return (sf_wrect){0, 0, 0, 0};
	return (sf_wrect){x0, y0, x1 - x0, y1 - y0};
}

const char *sf_interp_name(sf_interp i)
{
	switch (i) {
	case SF_INTERP_NEAREST: return "nearest";
	case SF_INTERP_BILINEAR: return "bilinear";
	case SF_INTERP_BICUBIC: return "bicubic";
	}
	return "?";
}

int sf_interp_parse(const char *s, sf_interp *out)
{
	static const sf_interp all[] = {SF_INTERP_NEAREST, SF_INTERP_BILINEAR, SF_INTERP_BICUBIC};
	for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
		if (s && strcmp(s, sf_interp_name(all[i])) == 0) {
			*out = all[i];
			return SF_OK;
		}
	}
	return SF_EINVAL;
}

#ifndef SF_HAVE_CUDA
/* Built without CUDA: the GPU path reports itself absent. */
struct sf_warp_cuda {
	int unused;
};

int sf_warp_cuda_create(int device, sf_warp_cuda **out, sf_err *e)
{
	*out = NULL;
	return sf_fail(e, SF_EDEVICE, "gpu %d: scopefs was built without CUDA", device);
}

void sf_warp_cuda_destroy(sf_warp_cuda *c)
{
	(void)c;
}

int sf_warp_tile_cuda(sf_warp_cuda *c, const sf_map *m, const sf_warp_src *src,
                      const sf_warp_fmt *fmt, sf_wrect out, void *dst, size_t dst_stride, sf_err *e)
{
	(void)c;
	(void)m;
	(void)src;
	(void)fmt;
	(void)out;
	(void)dst;
	(void)dst_stride;
	return sf_fail(e, SF_EDEVICE, "warp: scopefs was built without CUDA");
}
#endif

/* test_warp.c — the warp kernel, its source rect and the level choice.
 *
 *   test_warp            the checks
 *   test_warp --bench [nearest|bilinear|bicubic [0|1|2]]
 *                        CPU kernel speed: bilinear uint16, 4 samples, one
 *                        thread, Mpx/s; the optional number stops after
 *                        affine (0), + bilinear field (1), + B-spline (2)
 *   test_warp --bench-gpu [same]
 *                        the same tiles on the GPU (source rect upload,
 *                        kernel, download per tile), each first compared
 *                        with the CPU kernel's bytes
 *
 * Expected values come from first principles (identity and integer shifts
 * reproduce the source exactly; half-way blends round half up; Catmull-Rom
 * overshoot clamps).  The scipy/libvips/transformix oracles are in
 * tests/integration/test_warp_oracle.py.  When a GPU and CUDA support are
 * present, the GPU kernel must give the same bytes as the CPU one; otherwise
 * that check says why it is skipped. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "scopefs/transform.h"
#include "scopefs/warp.h"

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static double urand(void) /* [0, 1) */
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return (double)(rng_state >> 11) / 9007199254740992.0;
}

/* An image of w x h pixels, spp samples, of dtype, filled with a pattern. */
static void *make_image(int64_t w, int64_t h, unsigned spp, sf_dtype dt)
{
	size_t n = (size_t)(w * h) * spp;
	void *p = malloc(n * sf_dtype_bytes(dt) + 1);
	for (size_t i = 0; p && i < n; i++) {
		double v = urand();
		if (dt == SF_U8)
			((uint8_t *)p)[i] = (uint8_t)(v * 255);
		else if (dt == SF_U16)
			((uint16_t *)p)[i] = (uint16_t)(v * 65535);
		else
			((float *)p)[i] = (float)(v * 1000 - 300);
	}
	return p;
}

static void affine(sf_transform *t, const double m[9])
{
	sf_err e;
	sf_transform_init(t);
	sf_transform_then_matrix(t, m, &e);
}

/* A random similarity-ish map with a random smooth B-spline or bilinear field. */
static void random_transform(sf_transform *t, int field)
{
	sf_err e;
	double th = (urand() - 0.5) * 6.3, s = 0.6 + urand();
	double m[9] = {s * cos(th),
	               -s * sin(th),
	               urand() * 60 - 10,
	               s * sin(th),
	               s * cos(th),
	               urand() * 60 - 10,
	               0,
	               0,
	               1};
	if (urand() < 0.3)
		m[0] = -m[0], m[3] = -m[3]; /* a flip */
	sf_transform_init(t);
	if (field) {
		sf_field_kind kind = field == 1 ? SF_FIELD_LINEAR : SF_FIELD_BSPLINE3;
		sf_field_grid *g = sf_field_grid_create(kind, 9, 7, &e);
		for (int i = 0; g && i < 9 * 7 * 2; i++)
			g->v[i] = (float)((urand() - 0.5) * 6);
		if (g)
			sf_field_grid_finish(g, &e);
		double gmap[6] = {1.0 / 8, 0, 0.5, 0, 1.0 / 8, 0.5}, vm[4] = {1, 0.2, 0, 1};
		sf_transform_then_field(t, g, gmap, vm, &e);
	}
	sf_transform_then_matrix(t, m, &e);
}

static void test_identity_and_shift(void)
{
	sf_dtype types[] = {SF_U8, SF_U16, SF_F32};
	for (int ti = 0; ti < 3; ti++) {
		for (int interp = 0; interp < 3; interp++) {
			sf_dtype dt = types[ti];
			size_t b = sf_dtype_bytes(dt);
			int64_t w = 37, h = 23;
			unsigned spp = 3;
			void *img = make_image(w, h, spp, dt);
			void *out = calloc((size_t)(w * h) * spp, b);
			sf_transform t;
			/* shift by (+2, -3): out(x, y) = src(x + 2, y - 3) */
			double m[9] = {1, 0, 2, 0, 1, -3, 0, 0, 1};
			affine(&t, m);
			sf_warp_src src = {img, (size_t)w * spp * b, {0, 0, w, h}};
			sf_warp_fmt fmt = {dt, spp, (sf_interp)interp, 9};
			sf_err e;
			int rc = sf_warp_tile(&t.map, &src, &fmt, (sf_wrect){0, 0, w, h}, out,
			                      (size_t)w * spp * b, &e);
			CHECK(rc == SF_OK, "warp: %s", e.msg);
			int bad = 0;
			for (int64_t y = 0; y < h; y++)
				for (int64_t x = 0; x < w; x++)
					for (unsigned c = 0; c < spp; c++) {
						int64_t sx = x + 2, sy = y - 3;
						size_t o = ((size_t)(y * w + x) * spp + c) * b;
						int in = sx < w && sy >= 0;
						double want, got;
						const uint8_t *q =
						    (const uint8_t *)img +
						    ((size_t)(sy * w + sx) * spp + c) * b;
						if (dt == SF_U8)
							want = in ? *q : 9,
							got = ((uint8_t *)out)[o];
						else if (dt == SF_U16)
							want =
							    in ? *(const uint16_t *)(const void *)q
							       : 9,
							got = *(uint16_t *)(void *)((uint8_t *)out +
							                            o);
						else
							want = in ? *(const float *)(const void *)q
							          : 9,
							got =
							    *(float *)(void *)((uint8_t *)out + o);
						bad += want != got;
					}
			CHECK(bad == 0, "integer shift, dtype %d, %s: %d samples differ", dt,
			      sf_interp_name(interp), bad);
			sf_transform_release(&t);
			free(img);
			free(out);
		}
	}
}

static void test_rounding_and_clamping(void)
{
	sf_err e;
	sf_transform t;
	/* x -> x / 2: output pixel 1 samples 0.5, half way between 0 and 1 */
	double half[9] = {0.5, 0, 0, 0, 1, 0, 0, 0, 1};
	affine(&t, half);
	uint16_t src16[4] = {0, 1, 2, 3}, out16[6];
	sf_warp_src s = {src16, sizeof src16, {0, 0, 4, 1}};
	sf_warp_fmt f = {SF_U16, 1, SF_INTERP_BILINEAR, 0};
	sf_warp_tile(&t.map, &s, &f, (sf_wrect){0, 0, 6, 1}, out16, sizeof out16, &e);
	CHECK(out16[1] == 1 && out16[3] == 2 && out16[5] == 3,
	      "round half up: 0.5 -> %u, 1.5 -> %u, 2.5 -> %u", out16[1], out16[3], out16[5]);
	sf_transform_release(&t);
	/* bicubic overshoot at a step clamps to the type's range */
	double shift[9] = {1, 0, 0.5, 0, 1, 0, 0, 0, 1};
	affine(&t, shift);
	uint8_t step[8] = {0, 0, 0, 0, 255, 255, 255, 255}, o8[8];
	sf_warp_src s8 = {step, 8, {0, 0, 8, 1}};
	sf_warp_fmt f8 = {SF_U8, 1, SF_INTERP_BICUBIC, 0};
	sf_warp_tile(&t.map, &s8, &f8, (sf_wrect){0, 0, 7, 1}, o8, 8, &e);
	/* at 2.5: taps 0, 0, 0, 255 with weights w3 = -1/16: negative -> 0;
	 * at 4.5: 255, 255, 255, 255 -> 255; at 3.5: 0, 0, 255, 255 -> 127.5 -> 128 */
	CHECK(o8[2] == 0 && o8[4] == 255 && o8[3] == 128, "clamp: %u %u %u", o8[2], o8[3], o8[4]);
	/* the same in float shows the overshoot itself: -255/16 */
	float stepf[8] = {0, 0, 0, 0, 255, 255, 255, 255}, of[8];
	sf_warp_src sf = {stepf, sizeof stepf, {0, 0, 8, 1}};
	sf_warp_fmt ff = {SF_F32, 1, SF_INTERP_BICUBIC, 0};
	sf_warp_tile(&t.map, &sf, &ff, (sf_wrect){0, 0, 7, 1}, of, sizeof of, &e);
	CHECK(fabsf(of[2] + 255.0f / 16) < 1e-4f, "Catmull-Rom overshoot %g", of[2]);
	sf_transform_release(&t);
	/* background converts to the type: rounded and clamped */
	double far[9] = {1, 0, 1000, 0, 1, 0, 0, 0, 1};
	affine(&t, far);
	double bgs[] = {300, -5, 2.5, NAN};
	uint8_t want[] = {255, 0, 3, 0};
	for (int i = 0; i < 4; i++) {
		f8.background = bgs[i];
		f8.interp = SF_INTERP_BILINEAR;
		sf_warp_tile(&t.map, &s8, &f8, (sf_wrect){0, 0, 2, 1}, o8, 8, &e);
		CHECK(o8[0] == want[i] && o8[1] == want[i], "background %g -> %u", bgs[i], o8[0]);
	}
	sf_transform_release(&t);
}

/* The 4-sample vector path at the type's extremes and at coordinates in
 * (-1, 0), where floor is -1 (truncation alone would give 0): values from
 * first principles. */
static void test_four_lane_edges(void)
{
	sf_err e;
	sf_transform t;
	/* src = x - 0.25: output pixel 0 samples -0.25: 0.75 of pixel 0, 0.25
	 * of the background; pixel 1 samples 0.75 */
	double shift[9] = {1, 0, -0.25, 0, 1, 0, 0, 0, 1};
	affine(&t, shift);
	uint16_t src16[2 * 2 * 4], out16[2 * 4];
	uint8_t src8[2 * 2 * 4], out8[2 * 4];
	for (int i = 0; i < 16; i++) {
		src16[i] = i % 4 == 3 ? 0 : 65535;
		src8[i] = i % 4 == 3 ? 0 : 255;
	}
	src16[1] = src16[5] = src16[9] = src16[13] = 40000; /* channel 1: flat 40000 */
	sf_warp_src s16 = {src16, 2 * 4 * 2, {0, 0, 2, 2}};
	sf_warp_fmt f16 = {SF_U16, 4, SF_INTERP_BILINEAR, 1000};
	sf_warp_tile(&t.map, &s16, &f16, (sf_wrect){0, 0, 2, 1}, out16, sizeof out16, &e);
	/* pixel 0: 1000 + 0.75 (v - 1000): 65535 -> 49401.25 -> 49401;
	 * 40000 -> 30250; 0 -> 250; pixel 1: all inside, flat -> v */
	CHECK(out16[0] == 49401 && out16[1] == 30250 && out16[3] == 250,
	      "u16 x4 at -0.25: %u %u %u", out16[0], out16[1], out16[3]);
	CHECK(out16[4] == 65535 && out16[5] == 40000 && out16[7] == 0,
	      "u16 x4 at the top of the range: %u %u %u", out16[4], out16[5], out16[7]);
	sf_warp_src s8 = {src8, 2 * 4, {0, 0, 2, 2}};
	sf_warp_fmt f8 = {SF_U8, 4, SF_INTERP_BILINEAR, 0};
	sf_warp_tile(&t.map, &s8, &f8, (sf_wrect){0, 0, 2, 1}, out8, sizeof out8, &e);
	/* 0.75 * 255 = 191.25 -> 191 */
	CHECK(out8[0] == 191 && out8[3] == 0 && out8[4] == 255 && out8[7] == 0,
	      "u8 x4: %u %u %u %u", out8[0], out8[3], out8[4], out8[7]);
	sf_transform_release(&t);
}

/* The 4-sample fast path (vector lanes) equals four 1-sample warps. */
static void test_four_lanes(void)
{
	sf_dtype types[] = {SF_U8, SF_U16, SF_F32};
	int64_t sw = 61, sh = 47, ow = 50, oh = 40;
	for (int ti = 0; ti < 3; ti++) {
		sf_dtype dt = types[ti];
		size_t b = sf_dtype_bytes(dt);
		uint8_t *img = make_image(sw, sh, 4, dt);
		uint8_t *plane = malloc((size_t)(sw * sh) * b),
		        *o4 = malloc((size_t)(ow * oh) * 4 * b);
		uint8_t *o1 = malloc((size_t)(ow * oh) * b);
		sf_transform t;
		random_transform(&t, 0);
		int bad = 0;
		sf_err e;
		sf_warp_src s4 = {img, (size_t)sw * 4 * b, {0, 0, sw, sh}};
		sf_warp_fmt f4 = {dt, 4, SF_INTERP_BILINEAR, 3};
		sf_warp_tile(&t.map, &s4, &f4, (sf_wrect){-5, -5, ow, oh}, o4, (size_t)ow * 4 * b,
		             &e);
		for (int c = 0; c < 4; c++) {
			for (int64_t i = 0; i < sw * sh; i++)
				memcpy(plane + i * b, img + (i * 4 + c) * b, b);
			sf_warp_src s1 = {plane, (size_t)sw * b, {0, 0, sw, sh}};
			sf_warp_fmt f1 = {dt, 1, SF_INTERP_BILINEAR, 3};
			sf_warp_tile(&t.map, &s1, &f1, (sf_wrect){-5, -5, ow, oh}, o1,
			             (size_t)ow * b, &e);
			for (int64_t i = 0; i < ow * oh; i++)
				bad += memcmp(o1 + i * b, o4 + (i * 4 + c) * b, b) != 0;
		}
		CHECK(bad == 0, "dtype %d: 4-lane path differs from planar in %d samples", dt, bad);
		sf_transform_release(&t);
		free(img);
		free(plane);
		free(o4);
		free(o1);
	}
}

/* Pixels of (x, y) .. (x + w - 1, y) warped one at a time: 1-pixel tiles
 * take the per-pixel path, never the AVX2 one, which needs 4 in a row. */
static int warp_singly(const sf_map *m, const sf_warp_src *s, const sf_warp_fmt *f, int64_t x,
                       int64_t y, int64_t w, uint8_t *out)
{
	size_t px = sf_dtype_bytes(f->dtype) * f->samples;
	sf_err e;
	for (int64_t i = 0; i < w; i++)
		if (sf_warp_tile(m, s, f, (sf_wrect){x + i, y, 1, 1}, out + (size_t)i * px, px,
		                 &e) != SF_OK)
			return -1;
	return 0;
}

/* The 4-sample bilinear path in groups of four pixels (AVX2 where the CPU
 * has it, with the AVX2 affine coordinates) gives the per-pixel path's
 * bytes.  Maps chosen so tiles hold pixels outside the buffer, on its last
 * row and column, on exactly integer coordinates, in (-1, 0), and NaN or
 * infinite ones (a projective map whose w crosses 0). */
static void test_groups_equal_pixels(void)
{
	sf_dtype types[] = {SF_U8, SF_U16, SF_F32};
	const int64_t sw = 37, sh = 29;
	const sf_wrect o = {-6, -4, 55, 41}; /* 55 = 13 groups of 4 and 3 */
	double fixed[][9] = {
	    {1, 0, 3, 0, 1, -2, 0, 0, 1},             /* integer shift */
	    {1, 0, 0.5, 0, 1, 0.25, 0, 0, 1},         /* halves, quarters */
	    {1, 0, -0.25, 0, 1, -0.75, 0, 0, 1},      /* into (-1, 0) */
	    {0, -1, 30, 1, 0, 0, 0, 0, 1},            /* 90 degrees, integers */
	    {2, 0, 1, 0, 2, 1, 0, 0, 1},              /* even integers */
	    {1, 0, 0, 0, 1, 0, 0.05, 0, -1},          /* w = 0 at x = 20 */
	    {0.999999, 0, 1e-7, 0, 1, 1e-9, 0, 0, 1}, /* near integers */
	};
	int nfixed = (int)(sizeof fixed / sizeof fixed[0]);
	for (int ti = 0; ti < 3; ti++) {
		sf_dtype dt = types[ti];
		size_t px = sf_dtype_bytes(dt) * 4;
		uint8_t *img = make_image(sw, sh, 4, dt);
		uint8_t *wide = malloc((size_t)(o.w * o.h) * px), *one = malloc((size_t)o.w * px);
		int bad = 0, maps = 0;
		for (int k = 0; k < nfixed + 12 && img && wide && one; k++) {
			sf_transform t;
			sf_err e;
			if (k < nfixed)
				affine(&t, fixed[k]);
			else
				random_transform(&t, k % 3 == 0); /* some with a field */
			/* odd maps: the buffer is a window at (1237, 913) of the
			 * level, as the engine passes its source rects, and the map
			 * moves with it (coordinates then round differently) */
			int64_t wx = k % 2 ? 1237 : 0, wy = k % 2 ? 913 : 0;
			double to_window[9] = {1, 0, (double)wx, 0, 1, (double)wy, 0, 0, 1};
			sf_transform_then_matrix(&t, to_window, &e);
			sf_warp_src s = {img, (size_t)sw * px, {wx, wy, sw, sh}};
			sf_warp_fmt f = {dt, 4, SF_INTERP_BILINEAR, 7};
			int rc = sf_warp_tile(&t.map, &s, &f, o, wide, (size_t)o.w * px, &e);
			CHECK(rc == SF_OK, "warp: %s", e.msg);
			int64_t y = 0;
			for (; y < o.h && rc == SF_OK; y++) {
				if (warp_singly(&t.map, &s, &f, o.x, o.y + y, o.w, one) != 0)
					break;
				for (int64_t x = 0; x < o.w; x++)
					bad += memcmp(one + x * px,
					              wide + ((size_t)(y * o.w + x)) * px, px) != 0;
			}
			maps += rc == SF_OK && y == o.h;
			sf_transform_release(&t);
		}
		CHECK(
		    maps == nfixed + 12 && bad == 0,
		    "dtype %d: groups of 4 differ from single pixels in %d pixels (%d of %d maps)",
		    dt, bad, maps, nfixed + 12);
		free(img);
		free(wide);
		free(one);
	}
}

/* Whether got is want: the same bits for finite and infinite values (-0.0
 * included), NaN for NaN. */
static int same_f32(float got, float want)
{
	if (isnan(want))
		return isnan(got);
	return got == want && signbit(got) == signbit(want);
}

/* float32 slides with extreme finite values, NaN and infinities
 * (docs/transforms.md, "NaN and infinity"): blends are computed in double
 * and taps of weight exactly 0 are left out.  Expected values by hand:
 *  - identity and integer shifts return every source sample itself (a NaN
 *    or infinite sample does not spread to its neighbours through weight-0
 *    taps, and -3e38 next to 3e38 stays finite);
 *  - half way between -A and A (A = 3e38f) is 0, a quarter of the way is
 *    -A/2 (0.75 (-A) + 0.25 A, exact in double); float's a + t (b - a)
 *    overflowed b - a to inf;
 *  - bicubic half way along a row of FLT_MAX is FLT_MAX (Keys weights
 *    -1/16, 9/16, 9/16, -1/16: exact in double; float's partial sum
 *    17/16 FLT_MAX overflowed);
 *  - a (0.5, 0.5) shift averages 2x2 taps: NaN exactly where a NaN tap is
 *    among them, +inf where +inf is, the mean elsewhere.
 * Each with 1 sample and with 4 (the vector and AVX2 group paths). */
static void test_float_nonfinite(void)
{
	const int64_t w = 12, h = 6;
	const float A = 3e38f, M = 3.40282347e38f;
	float base[6 * 12];
	for (int64_t y = 0; y < h; y++)
		for (int64_t x = 0; x < w; x++)
			base[y * w + x] = (float)(x + 10 * y) - 20.0f;
	base[2 * w + 4] = -A;
	base[2 * w + 5] = A;
	base[4 * w + 8] = NAN;
	base[1 * w + 9] = INFINITY;
	base[0 * w + 2] = -INFINITY;
	base[5 * w + 1] = -0.0f;
	for (int64_t x = 0; x < w; x++)
		base[3 * w + x] = M;
	const unsigned spps[2] = {1, 4};
	for (int si = 0; si < 2; si++) {
		unsigned spp = spps[si];
		float *img = malloc(sizeof(float) * (size_t)(w * h) * spp);
		float *out = malloc(sizeof(float) * (size_t)(w * h) * spp);
		for (int64_t i = 0; i < w * h; i++)
			for (unsigned c = 0; c < spp; c++)
				img[i * spp + c] = base[i];
		sf_warp_src src = {img, (size_t)w * spp * sizeof(float), {0, 0, w, h}};
		const size_t ostride = (size_t)w * spp * sizeof(float);
		/* identity and an integer shift (+1, -1), both interpolations */
		for (int k = 0; k < 4; k++) {
			int dx = k < 2 ? 0 : 1, dy = k < 2 ? 0 : -1;
			sf_interp interp = k % 2 ? SF_INTERP_BICUBIC : SF_INTERP_BILINEAR;
			double m[9] = {1, 0, dx, 0, 1, dy, 0, 0, 1};
			sf_transform t;
			sf_err e;
			affine(&t, m);
			sf_warp_fmt f = {SF_F32, spp, interp, 9};
			int rc = sf_warp_tile(&t.map, &src, &f, (sf_wrect){0, 0, w, h}, out,
			                      ostride, &e);
			int bad = 0;
			for (int64_t y = 0; y < h; y++)
				for (int64_t x = 0; x < w; x++) {
					int64_t sx = x + dx, sy = y + dy;
					float want = sx >= 0 && sx < w && sy >= 0 && sy < h
					                 ? base[sy * w + sx]
					                 : 9.0f;
					for (unsigned c = 0; c < spp; c++)
						bad += !same_f32(out[(y * w + x) * spp + c], want);
				}
			CHECK(rc == SF_OK && bad == 0,
			      "float32 %s shift (%d, %d), %u samples: %d samples not the source's",
			      sf_interp_name(interp), dx, dy, spp, bad);
			sf_transform_release(&t);
		}
		/* x + 0.5 and x + 0.25 along the rows */
		double quarters[2] = {0.5, 0.25};
		float want_mid[2] = {0.0f, -A / 2};
		for (int q = 0; q < 2; q++) {
			double m[9] = {1, 0, quarters[q], 0, 1, 0, 0, 0, 1};
			sf_transform t;
			sf_err e;
			affine(&t, m);
			sf_warp_fmt f = {SF_F32, spp, SF_INTERP_BILINEAR, 9};
			sf_warp_tile(&t.map, &src, &f, (sf_wrect){0, 0, w, h}, out, ostride, &e);
			int bad = 0;
			for (unsigned c = 0; c < spp; c++)
				bad += !same_f32(out[(2 * w + 4) * spp + c], want_mid[q]);
			CHECK(bad == 0,
			      "float32 bilinear at 4 + %g between -3e38 and 3e38: %g, want %g",
			      quarters[q], out[(2 * w + 4) * spp], want_mid[q]);
			if (q == 0) {
				f.interp = SF_INTERP_BICUBIC;
				sf_warp_tile(&t.map, &src, &f, (sf_wrect){0, 0, w, h}, out, ostride,
				             &e);
				bad = 0;
				for (int64_t x = 1; x < w - 2; x++)
					for (unsigned c = 0; c < spp; c++)
						bad += !same_f32(out[(3 * w + x) * spp + c], M);
				CHECK(bad == 0,
				      "float32 bicubic half way along a row of FLT_MAX: %d samples "
				      "not FLT_MAX (x 1: %g)",
				      bad, out[(3 * w + 1) * spp]);
			}
			sf_transform_release(&t);
		}
		/* (0.5, 0.5): the mean of 2x2 taps, NaN and inf where they weigh in */
		{
			double m[9] = {1, 0, 0.5, 0, 1, 0.5, 0, 0, 1};
			sf_transform t;
			sf_err e;
			affine(&t, m);
			sf_warp_fmt f = {SF_F32, spp, SF_INTERP_BILINEAR, 9};
			sf_warp_tile(&t.map, &src, &f, (sf_wrect){0, 0, w - 1, h - 1}, out, ostride,
			             &e);
			int bad = 0, nans = 0, infs = 0;
			for (int64_t y = 0; y < h - 1; y++)
				for (int64_t x = 0; x < w - 1; x++) {
					const float *p = base + y * w + x;
					double top = ((double)p[0] + p[1]) / 2;
					double bot = ((double)p[w] + p[w + 1]) / 2;
					float want = (float)((top + bot) / 2);
					nans += isnan(want) != 0;
					infs += isinf(want) != 0; /* -1 for -inf in glibc */
					for (unsigned c = 0; c < spp; c++) {
						float got = out[(y * w + x) * spp + c];
						bad += isnan(want) || isinf(want)
						           ? !same_f32(got, want)
						           : !(fabs(got - want) <=
						               1e-6 * fabs(want) + 1e-5);
					}
				}
			/* NaN at (8, 4) reaches outputs (7..8, 3..4); +inf at (9, 1)
			 * (8..9, 0..1); -inf at (2, 0) (1..2, 0) */
			CHECK(
			    bad == 0 && nans == 4 && infs == 6,
			    "float32 (0.5, 0.5) shift, %u samples: %d samples differ from the 2x2 "
			    "mean (%d NaN, %d inf expected)",
			    spp, bad, nans, infs);
			sf_transform_release(&t);
		}
		free(img);
		free(out);
	}
}

static void test_bad_arguments(void)
{
	sf_err e;
	sf_transform t;
	sf_transform_init(&t);
	uint16_t buf[16];
	sf_warp_src s = {buf, 8, {0, 0, 4, 4}};
	sf_warp_fmt f = {SF_U16, 1, SF_INTERP_BILINEAR, 0};
	f.samples = 0;
	CHECK(sf_warp_tile(&t.map, &s, &f, (sf_wrect){0, 0, 4, 4}, buf, 8, &e) == SF_EINVAL,
	      "0 samples");
	f.samples = 1;
	f.interp = (sf_interp)7;
	CHECK(sf_warp_tile(&t.map, &s, &f, (sf_wrect){0, 0, 4, 4}, buf, 8, &e) == SF_EINVAL,
	      "bad interp");
	f.interp = SF_INTERP_NEAREST;
	CHECK(sf_warp_tile(&t.map, &s, &f, (sf_wrect){0, 0, 4, 4}, buf, 7, &e) == SF_EINVAL,
	      "short dst stride");
	s.stride = 6;
	CHECK(sf_warp_tile(&t.map, &s, &f, (sf_wrect){0, 0, 4, 4}, buf, 8, &e) == SF_EINVAL,
	      "short src stride");
	s.stride = 8;
	s.pixels = (const uint8_t *)buf + 1;
	CHECK(sf_warp_tile(&t.map, &s, &f, (sf_wrect){0, 0, 4, 4}, buf, 8, &e) == SF_EINVAL,
	      "misaligned source");
	CHECK(sf_warp_tile(&t.map, &s, &f, (sf_wrect){0, 0, -1, 4}, buf, 8, &e) == SF_EINVAL,
	      "negative rect");
	sf_interp ip;
	CHECK(sf_interp_parse("bicubic", &ip) == SF_OK && ip == SF_INTERP_BICUBIC, "parse");
	CHECK(sf_interp_parse("lanczos", &ip) == SF_EINVAL, "parse unknown");
}

/* Every tap the kernel reads for the out rect lies in need (or outside the
 * level), and warping from just need equals warping from the whole level. */
static void test_source_rect(void)
{
	int64_t sw = 150, sh = 110;
	unsigned spp = 2;
	uint16_t *img = make_image(sw, sh, spp, SF_U16);
	uint16_t *a = malloc(64 * 64 * spp * 2), *b = malloc(64 * 64 * spp * 2);
	int cases = 0, tap_fail = 0, pix_fail = 0, empty = 0;
	for (int k = 0; k < 300; k++) {
		sf_transform t;
		random_transform(&t, k % 3);
		sf_wrect out = {(int64_t)(urand() * 200) - 60, (int64_t)(urand() * 200) - 60,
		                1 + (int64_t)(urand() * 63), 1 + (int64_t)(urand() * 63)};
		sf_interp interp = (sf_interp)(k % 3);
		sf_map m;
		double ods[2] = {1, 1}, sds[2] = {1, 1};
		if (k % 5 == 4)
			ods[0] = ods[1] = 2, sds[0] = sds[1] = 2;
		sf_transform_level_map(&t, ods, sds, &m);
		sf_wrect need;
		sf_warp_source_rect(&m, out, interp, sw, sh, &need);
		empty += need.w == 0;
		for (int64_t y = out.y; y < out.y + out.h; y++)
			for (int64_t x = out.x; x < out.x + out.w; x++) {
				double sx, sy;
				sf_map_point(&m, (double)x, (double)y, &sx, &sy);
				double lo = interp == SF_INTERP_BICUBIC ? -1 : 0;
				double hi = interp == SF_INTERP_NEAREST    ? 0
				            : interp == SF_INTERP_BILINEAR ? 1
				                                           : 2;
				double bx =
				    interp == SF_INTERP_NEAREST ? floor(sx + 0.5) : floor(sx);
				double by =
				    interp == SF_INTERP_NEAREST ? floor(sy + 0.5) : floor(sy);
				for (double ty = by + lo; ty <= by + hi; ty++)
					for (double tx = bx + lo; tx <= bx + hi; tx++) {
						if (tx < 0 || ty < 0 || tx >= sw || ty >= sh)
							continue;
						if (tx < need.x || ty < need.y ||
						    tx >= need.x + need.w || ty >= need.y + need.h)
							tap_fail++;
					}
			}
		sf_warp_fmt f = {SF_U16, spp, interp, 77};
		sf_warp_src whole = {img, (size_t)sw * spp * 2, {0, 0, sw, sh}};
		sf_warp_src part = {img + (need.y * sw + need.x) * spp, (size_t)sw * spp * 2, need};
		sf_err e;
		size_t stride = (size_t)out.w * spp * 2;
		sf_warp_tile(&m, &whole, &f, out, a, stride, &e);
		sf_warp_tile(&m, &part, &f, out, b, stride, &e);
		pix_fail += memcmp(a, b, stride * (size_t)out.h) != 0;
		cases++;
		sf_transform_release(&t);
	}
	CHECK(tap_fail == 0, "source rect: %d taps outside the rect (%d cases)", tap_fail, cases);
	CHECK(pix_fail == 0, "source rect: %d of %d tiles differ from whole-level warps", pix_fail,
	      cases);
	CHECK(empty > 0 && empty < cases, "some tiles fall wholly outside (%d), not all", empty);
	/* tight for the identity: a 10x10 tile needs 11x11 (bilinear's +1);
	 * the rounding margin may add one pixel on a side, no more */
	sf_transform t;
	sf_transform_init(&t);
	sf_wrect need;
	sf_warp_source_rect(&t.map, (sf_wrect){20, 30, 10, 10}, SF_INTERP_BILINEAR, sw, sh, &need);
	CHECK(need.x >= 19 && need.x <= 20 && need.y >= 29 && need.y <= 30 &&
	          need.x + need.w >= 31 && need.x + need.w <= 32 && need.y + need.h >= 41 &&
	          need.y + need.h <= 42,
	      "identity bilinear rect %lld,%lld %lldx%lld", (long long)need.x, (long long)need.y,
	      (long long)need.w, (long long)need.h);
	sf_warp_source_rect(&t.map, (sf_wrect){20.0, 30, 10, 10}, SF_INTERP_NEAREST, sw, sh, &need);
	CHECK(need.x == 20 && need.w == 10 && need.h == 10, "identity nearest rect %lldx%lld",
	      (long long)need.w, (long long)need.h);
	free(img);
	free(a);
	free(b);
}

static void test_choose_source(void)
{
	sf_transform t;
	sf_transform_init(&t);
	double lv[4][2] = {{1, 1}, {2, 2}, {4, 4}, {8, 8}};
	sf_source_choice c;
	sf_warp_choose_source(&t, (double[]){4, 4}, 4, lv, &c);
	CHECK(c.level == 2 && c.prefilter == 1 && c.ds[0] == 4, "out level 2 <- source level 2");
	sf_warp_choose_source(&t, (double[]){4, 4}, 1, lv, &c);
	CHECK(c.level == 0 && c.prefilter == 4 && c.ds[0] == 4,
	      "one-level source: prefilter 4 (got level %u k %u)", c.level, c.prefilter);
	sf_warp_choose_source(&t, (double[]){16, 16}, 2, lv, &c);
	CHECK(c.level == 1 && c.prefilter == 8 && c.ds[0] == 16, "fewer levels: level 1, k 8");
	/* the moving slide at twice the resolution (scale 2) */
	double m[9] = {2, 0, 0, 0, 2, 0, 0, 0, 1};
	affine(&t, m);
	sf_warp_choose_source(&t, (double[]){1, 1}, 4, lv, &c);
	CHECK(c.level == 1 && c.prefilter == 1, "scale 2: level 1 for output level 0");
	sf_warp_choose_source(&t, (double[]){2.0 / 2.5, 2.0 / 2.5}, 4, lv, &c); /* need 1.6 */
	CHECK(c.level == 0 && c.prefilter == 2, "residual 1.6 > 1.5 prefilters by 2");
	sf_wrect r = sf_warp_prefilter_read_rect(&c, (sf_wrect){3, 4, 10, 10}, 25, 100);
	CHECK(r.x == 6 && r.y == 8 && r.w == 19 && r.h == 20, "prefilter read rect clipped");
	sf_transform_release(&t);
}

static void test_cuda(void)
{
	sf_err e = {0};
	sf_warp_cuda *gpu = NULL;
	if (sf_warp_cuda_create(0, &gpu, &e) != SF_OK) {
		printf("test_warp: GPU comparison skipped: %s\n", e.msg);
		return;
	}
	int64_t sw = 300, sh = 200;
	int differ = 0, runs = 0;
	sf_dtype types[] = {SF_U8, SF_U16, SF_F32};
	for (int k = 0; k < 27; k++) {
		sf_dtype dt = types[k % 3];
		unsigned spp = 1 + (unsigned)(k % 4);
		sf_interp interp = (sf_interp)((k / 3) % 3);
		size_t px = sf_dtype_bytes(dt) * spp;
		void *img = make_image(sw, sh, spp, dt);
		sf_transform t;
		random_transform(&t, k % 3);
		sf_wrect out = {-20 + k, 10 - k, 200 + k, 150};
		size_t stride = (size_t)out.w * px;
		void *a = malloc(stride * (size_t)out.h), *b = malloc(stride * (size_t)out.h);
		sf_warp_src s = {img, (size_t)sw * px, {0, 0, sw, sh}};
		sf_warp_fmt f = {dt, spp, interp, 5};
		int rc1 = sf_warp_tile(&t.map, &s, &f, out, a, stride, &e);
		int rc2 = sf_warp_tile_cuda(gpu, &t.map, &s, &f, out, b, stride, &e);
		CHECK(rc1 == SF_OK && rc2 == SF_OK, "gpu warp: %s", e.msg);
		differ += memcmp(a, b, stride * (size_t)out.h) != 0;
		runs++;
		free(a);
		free(b);
		free(img);
		sf_transform_release(&t);
	}
	CHECK(differ == 0, "GPU and CPU differ in %d of %d tiles", differ, runs);
	sf_warp_cuda_destroy(gpu);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* One output tile on the GPU as the tile engine does it: upload only the
 * source rect the tile needs (sf_warp_source_rect), warp, download.  The
 * CPU kernel's bytes for the same tile are compared; a difference counts. */
static int gpu_tile(sf_warp_cuda *gpu, const sf_map *m, const sf_warp_src *whole,
                    const sf_warp_fmt *f, sf_wrect o, void *out, void *ref, int *differ, sf_err *e)
{
	size_t px = sf_dtype_bytes(f->dtype) * f->samples, stride = (size_t)o.w * px;
	sf_wrect need;
	sf_warp_source_rect(m, o, f->interp, whole->rect.w, whole->rect.h, &need);
	sf_warp_src s = {(const char *)whole->pixels + (size_t)need.y * whole->stride +
	                     (size_t)need.x * px,
	                 whole->stride, need};
	if (sf_warp_tile_cuda(gpu, m, &s, f, o, out, stride, e) != SF_OK)
		return -1;
	if (ref) {
		if (sf_warp_tile(m, whole, f, o, ref, stride, e) != SF_OK)
			return -1;
		*differ += memcmp(out, ref, stride * (size_t)o.h) != 0;
	}
	return 0;
}

/* only: run just this interpolation (NULL: all); field_max: last field kind;
 * gpu: time the CUDA kernel instead (per tile, transfers included), after
 * one untimed pass that compares every tile with the CPU kernel. */
static int bench(const char *only, int field_max, sf_warp_cuda *gpu)
{
	const int64_t sw = 2048, sh = 2048, tile = 512;
	const unsigned spp = 4;
	uint16_t *img = make_image(sw, sh, spp, SF_U16);
	uint16_t *out = malloc((size_t)(tile * tile) * spp * 2);
	uint16_t *ref = malloc((size_t)(tile * tile) * spp * 2);
	if (!img || !out || !ref)
		return 1;
	for (int field = 0; field <= field_max; field++) {
		for (int interp = 0; interp < 3; interp++) {
			if (only && strcmp(only, sf_interp_name(interp)) != 0)
				continue;
			sf_transform t;
			sf_err e;
			double th = 0.1;
			double m[9] = {cos(th), -sin(th), 300, sin(th), cos(th), 100, 0, 0, 1};
			sf_transform_init(&t);
			if (field) {
				sf_field_kind kind =
				    field == 1 ? SF_FIELD_LINEAR : SF_FIELD_BSPLINE3;
				sf_field_grid *g = sf_field_grid_create(kind, 40, 40, &e);
				for (int i = 0; g && i < 40 * 40 * 2; i++)
					g->v[i] = (float)((urand() - 0.5) * 4);
				sf_field_grid_finish(g, &e);
				double gmap[6] = {1.0 / 48, 0, 0, 0, 1.0 / 48, 0},
				       vm[4] = {1, 0, 0, 1};
				sf_transform_then_field(&t, g, gmap, vm, &e);
			}
			sf_transform_then_matrix(&t, m, &e);
			sf_warp_src s = {img, (size_t)sw * spp * 2, {0, 0, sw, sh}};
			sf_warp_fmt f = {SF_U16, spp, (sf_interp)interp, 0};
			int differ = 0, failed = 0;
			for (int64_t ty = 0; gpu && ty < 1536; ty += tile)
				for (int64_t tx = 0; tx < 1536; tx += tile)
					failed |= gpu_tile(gpu, &t.map, &s, &f,
					                   (sf_wrect){tx, ty, tile, tile}, out, ref,
					                   &differ, &e);
			double t0 = now(), px = 0;
			int reps = 0;
			while (!failed && now() - t0 < 1.0) {
				for (int64_t ty = 0; ty < 1536; ty += tile)
					for (int64_t tx = 0; tx < 1536; tx += tile) {
						sf_wrect o = {tx, ty, tile, tile};
						if (gpu)
							failed |= gpu_tile(gpu, &t.map, &s, &f, o,
							                   out, NULL, NULL, &e);
						else
							sf_warp_tile(&t.map, &s, &f, o, out,
							             (size_t)tile * spp * 2, &e);
						px += (double)(tile * tile);
					}
				reps++;
			}
			double dt = now() - t0;
			if (failed) {
				fprintf(stderr, "test_warp: GPU bench: %s\n", e.msg);
				return 1;
			}
			printf("warp uint16 x4 %-8s %-16s %7.1f Mpx/s %s (%.0f MB/s out)",
			       sf_interp_name(interp),
			       field == 0   ? "affine"
			       : field == 1 ? "affine+bilinear"
			                    : "affine+bspline",
			       px / dt / 1e6, gpu ? "on the GPU" : "per core",
			       px * spp * 2 / dt / 1e6);
			if (gpu)
				printf(", %d of 9 tiles differ from the CPU", differ);
			printf("\n");
			sf_transform_release(&t);
		}
	}
	free(img);
	free(out);
	free(ref);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "--bench") == 0)
		return bench(argc > 2 ? argv[2] : NULL, argc > 3 ? atoi(argv[3]) : 2, NULL);
	if (argc > 1 && strcmp(argv[1], "--bench-gpu") == 0) {
		sf_err e = {0};
		sf_warp_cuda *gpu = NULL;
		if (sf_warp_cuda_create(0, &gpu, &e) != SF_OK) {
			fprintf(stderr, "test_warp: no GPU: %s\n", e.msg);
			return 1;
		}
		int rc = bench(argc > 2 ? argv[2] : NULL, argc > 3 ? atoi(argv[3]) : 2, gpu);
		sf_warp_cuda_destroy(gpu);
		return rc;
	}
	test_identity_and_shift();
	test_rounding_and_clamping();
	test_four_lanes();
	test_four_lane_edges();
	test_groups_equal_pixels();
	test_float_nonfinite();
	test_bad_arguments();
	test_source_rect();
	test_choose_source();
	test_cuda();
	return CHECK_DONE("test_warp");
}

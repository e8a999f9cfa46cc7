/* test_pyramid.c — the output pyramid plan and the box and pick reductions. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "scopefs/products.h"
#include "scopefs/resample.h"

static sf_slide_info slide_with_levels(uint32_t n, const uint32_t *w, const uint32_t *h,
                                       sf_slide_level *storage)
{
	sf_slide_info s;
	memset(&s, 0, sizeof s);
	s.width = w[0];
	s.height = h[0];
	s.level_count = n;
	s.levels = storage;
	for (uint32_t i = 0; i < n; i++) {
		storage[i].width = w[i];
		storage[i].height = h[i];
	}
	return s;
}

static void test_plan_flat(void)
{
	sf_slide_level lv[1];
	uint32_t w[] = {5000}, h[] = {3001};
	sf_slide_info s = slide_with_levels(1, w, h, lv);
	sf_pyramid_plan p;

	sf_pyramid_plan_make(&s, 512, &p);
	CHECK(p.levels == 5, "flat 5000x3001: 5 levels (5000..313), got %u", p.levels);
	CHECK(p.width[1] == 2500 && p.height[1] == 1501, "ceil halving level 1: %ux%u", p.width[1],
	      p.height[1]);
	CHECK(p.width[4] == 313 && p.height[4] == 188, "level 4 = ceil(5000/16) x ceil(3001/16)");
	CHECK(p.source_level[3] == 0 && p.box[3] == 8, "level 3 from level 0 with 8x8 boxes");
}

static void test_plan_follows_source(void)
{
	/* A libvips-style pyramid with floor sizes: copied, not recomputed. */
	sf_slide_level lv[3];
	uint32_t w[] = {3001, 1500, 750}, h[] = {2001, 1000, 500};
	sf_slide_info s = slide_with_levels(3, w, h, lv);
	sf_pyramid_plan p;

	sf_pyramid_plan_make(&s, 512, &p);
	CHECK(p.levels == 4, "levels 3001, 1500, 750, 375: got %u", p.levels);
	CHECK(p.box[1] == 1 && p.source_level[1] == 1 && p.width[1] == 1500, "level 1 copied");
	CHECK(p.box[2] == 1 && p.source_level[2] == 2, "level 2 copied");
	CHECK(p.box[3] == 2 && p.source_level[3] == 2 && p.width[3] == 375 && p.height[3] == 250,
	      "level 3 from source level 2 by 2x2: %ux%u", p.width[3], p.height[3]);
}

static void test_plan_svs_4x(void)
{
	/* Aperio: levels at 4x steps; 2x levels in between come from the finer one. */
	sf_slide_level lv[3];
	uint32_t w[] = {50001, 12500, 3125}, h[] = {40000, 10000, 2500};
	sf_slide_info s = slide_with_levels(3, w, h, lv);
	sf_pyramid_plan p;

	sf_pyramid_plan_make(&s, 512, &p);
	CHECK(p.box[1] == 2 && p.source_level[1] == 0, "level 1 (2x) from level 0");
	CHECK(p.box[2] == 1 && p.source_level[2] == 1, "level 2 (4x) is source level 1");
	CHECK(p.box[3] == 2 && p.source_level[3] == 1, "level 3 (8x) from source level 1");
	CHECK(p.box[4] == 1 && p.source_level[4] == 2, "level 4 (16x) is source level 2");
}

static void test_plan_svs_4x_floor_short(void)
{
	/* Aperio sizes rounded down: 2003 / 4 = 500, one pixel short of the
	 * ceil halvings (1002, 501).  The /4 level is served as stored (500 x
	 * 400, as OpenSlide shows it): output level 2 takes its size and is a
	 * copy, so no box reads past its edge. */
	sf_slide_level lv[3];
	uint32_t w[] = {2003, 500, 125}, h[] = {1601, 400, 100};
	sf_slide_info s = slide_with_levels(3, w, h, lv);
	sf_pyramid_plan p;

	sf_pyramid_plan_make(&s, 512, &p);
	CHECK(p.levels == 3, "2003, 1002, 500: got %u levels", p.levels);
	CHECK(p.width[2] == 500 && p.height[2] == 400, "level 2 is 500x400: %ux%u", p.width[2],
	      p.height[2]);
	CHECK(p.source_level[1] == 0 && p.box[1] == 2, "level 1 from level 0 by 2x2");
	CHECK(p.source_level[2] == 1 && p.box[2] == 1, "level 2 copied from the /4 level: %u/%u",
	      p.source_level[2], p.box[2]);
	for (uint32_t l = 0; l < p.levels; l++) {
		const sf_slide_level *src = &lv[p.source_level[l]];
		CHECK((src->width + p.box[l] - 1) / p.box[l] >= p.width[l] &&
		          (src->height + p.box[l] - 1) / p.box[l] >= p.height[l],
		      "level %u: every box holds a real pixel", l);
	}
}

static void test_plan_svs_4x_ceil_copied(void)
{
	/* The same slide with sizes rounded up: the /4 level is output level 2. */
	sf_slide_level lv[2];
	uint32_t w[] = {2003, 501}, h[] = {1601, 401};
	sf_slide_info s = slide_with_levels(2, w, h, lv);
	sf_pyramid_plan p;

	sf_pyramid_plan_make(&s, 512, &p);
	CHECK(p.source_level[2] == 1 && p.box[2] == 1, "level 2 copied from the /4 level: %u/%u",
	      p.source_level[2], p.box[2]);
}

static void test_plan_not_power_of_two(void)
{
	/* Steps of 3 (W, W/3, W/9), then 5 and 6: never read as 4x or 8x. */
	sf_slide_level lv[3];
	uint32_t w3[] = {2304, 768, 256}, h3[] = {1800, 600, 200};
	sf_slide_info s = slide_with_levels(3, w3, h3, lv);
	sf_pyramid_plan p;

	sf_pyramid_plan_make(&s, 512, &p);
	CHECK(p.levels == 4, "2304, 1152, 576, 288: got %u", p.levels);
	for (uint32_t l = 1; l < p.levels; l++)
		CHECK(p.source_level[l] == 0 && p.box[l] == 1u << l,
		      "x3 pyramid: level %u from level 0 by %u, got %u/%u", l, 1u << l,
		      p.source_level[l], p.box[l]);
	CHECK(p.width[2] == 576 && p.height[2] == 450, "level 2 keeps 2^2 sizes: %ux%u", p.width[2],
	      p.height[2]);

	uint32_t w5[] = {4000, 800, 500}, h5[] = {3200, 640, 400};
	s = slide_with_levels(3, w5, h5, lv);
	sf_pyramid_plan_make(&s, 512, &p);
	CHECK(p.source_level[2] == 0 && p.box[2] == 4, "a /5 level is not 4x: %u/%u",
	      p.source_level[2], p.box[2]);
	CHECK(p.source_level[3] == 2 && p.box[3] == 1, "the /8 level is level 3: %u/%u",
	      p.source_level[3], p.box[3]);

	uint32_t w6[] = {2400, 400}, h6[] = {1800, 300};
	s = slide_with_levels(2, w6, h6, lv);
	sf_pyramid_plan_make(&s, 512, &p);
	CHECK(p.source_level[3] == 0 && p.box[3] == 8, "a /6 level is not 8x: %u/%u",
	      p.source_level[3], p.box[3]);
}

static void test_plan_anisotropic_level_refused(void)
{
	/* Width halved twice, height once: not a 2^k level in both axes. */
	sf_slide_level lv[2];
	uint32_t w[] = {4096, 1024}, h[] = {4096, 2048};
	sf_slide_info s = slide_with_levels(2, w, h, lv);
	sf_pyramid_plan p;

	sf_pyramid_plan_make(&s, 512, &p);
	for (uint32_t l = 1; l < p.levels; l++)
		CHECK(p.source_level[l] == 0, "level %u not from the 4x2 level", l);
}

static void check_ds(const sf_slide_info *s, uint32_t level, double x, double y)
{
	double ds[2] = {0, 0};
	sf_level_downsample(s, level, ds);
	CHECK(ds[0] == x && ds[1] == y, "%ux%u level %u (%ux%u): %g x %g, want %g x %g", s->width,
	      s->height, level, s->levels[level].width, s->levels[level].height, ds[0], ds[1], x,
	      y);
}

static void test_level_downsample(void)
{
	/* Ceil halvings of an odd slide (tifffile, vips) are exactly 2^L, not
	 * W0 / WL (1023 / 256 = 3.996). */
	sf_slide_level lv[3];
	uint32_t wc[] = {1023, 512, 256}, hc[] = {901, 451, 226};
	sf_slide_info s = slide_with_levels(3, wc, hc, lv);
	check_ds(&s, 0, 1, 1);
	check_ds(&s, 1, 2, 2);
	check_ds(&s, 2, 4, 4);

	uint32_t wf[] = {1023, 511, 255}, hf[] = {901, 450, 225}; /* floor halvings */
	s = slide_with_levels(3, wf, hf, lv);
	check_ds(&s, 1, 2, 2);
	check_ds(&s, 2, 4, 4);

	uint32_t wa[] = {2003, 500, 125}, ha[] = {1601, 400, 100}; /* Aperio /4, floor */
	s = slide_with_levels(3, wa, ha, lv);
	check_ds(&s, 1, 4, 4);
	check_ds(&s, 2, 16, 16);

	uint32_t w3[] = {2305, 768}, h3[] = {1801, 601}; /* an x3 step */
	s = slide_with_levels(2, w3, h3, lv);
	check_ds(&s, 1, 3, 3);

	/* No one integer step: the side ratios, as before. */
	uint32_t wn[] = {1000, 300}, hn[] = {800, 240};
	s = slide_with_levels(2, wn, hn, lv);
	check_ds(&s, 1, 1000.0 / 300, 800.0 / 240);
	uint32_t wx[] = {4096, 1024}, hx[] = {4096, 2048}; /* 4x by 2x */
	s = slide_with_levels(2, wx, hx, lv);
	check_ds(&s, 1, 4, 2);

	/* A level smaller than its downsample fits several r: powers of two
	 * first (5 -> 2 is 2x or 3x), the longer side deciding (3 x 1000 ->
	 * 1 x 500: the width alone says 4x or 3x, the height 2x). */
	uint32_t wt[] = {5, 2}, ht[] = {5, 2};
	s = slide_with_levels(2, wt, ht, lv);
	check_ds(&s, 1, 2, 2);
	uint32_t wl[] = {3, 1}, hl[] = {1000, 500};
	s = slide_with_levels(2, wl, hl, lv);
	check_ds(&s, 1, 2, 2);
}

static void test_pick_reduce(void)
{
	/* 5x3 uint16, k = 2: the sample at (2x + 1, 2y + 1), clamped into the
	 * image at the last partial column and row. */
	uint16_t src[3][6] = {
	    {1, 2, 3, 4, 5, 999}, {5, 6, 7, 8, 9, 999}, {10, 20, 30, 40, 51, 999}};
	uint16_t dst[2][4];

	sf_pick_reduce(src, sizeof src[0], 5, 3, 2, SF_U16, 1, dst, sizeof dst[0], 4, 2);
	CHECK(dst[0][0] == 6 && dst[0][1] == 8, "picks (1,1), (3,1): %u %u", dst[0][0], dst[0][1]);
	CHECK(dst[0][2] == 9, "edge column picks real column 4, got %u", dst[0][2]);
	CHECK(dst[1][0] == 20 && dst[1][2] == 51, "edge row picks real row 2: %u %u", dst[1][0],
	      dst[1][2]);
	CHECK(dst[0][3] == 0 && dst[1][3] == 0, "a box wholly outside is 0: %u %u", dst[0][3],
	      dst[1][3]);

	/* k = 3 (odd): the exact centre. */
	uint8_t c[3][3] = {{1, 2, 3}, {4, 5, 6}, {7, 8, 9}}, one;
	sf_pick_reduce(c, 3, 3, 3, 3, SF_U8, 1, &one, 1, 1, 1);
	CHECK(one == 5, "3x3 centre, got %u", one);

	/* Interleaved samples move together; floats are copied bit for bit. */
	uint8_t rgb[2][6] = {{10, 20, 30, 11, 21, 31}, {12, 22, 32, 13, 23, 33}}, out[3];
	sf_reduce(SF_REDUCE_PICK, rgb, 6, 2, 2, 2, SF_U8, 3, out, 3, 1, 1);
	CHECK(out[0] == 13 && out[1] == 23 && out[2] == 33, "RGB pixel (1,1): %u %u %u", out[0],
	      out[1], out[2]);
	float f[2][2] = {{1.0f, 2.0f}, {3.0f, 4.5f}}, g = 0;
	sf_reduce(SF_REDUCE_PICK, f, sizeof f[0], 2, 2, 2, SF_F32, 1, &g, sizeof g, 1, 1);
	CHECK(g == 4.5f, "float pick 4.5, got %g", g);
	sf_reduce(SF_REDUCE_MEAN, f, sizeof f[0], 2, 2, 2, SF_F32, 1, &g, sizeof g, 1, 1);
	CHECK(g == 2.625f, "sf_reduce mean is sf_box_reduce: 2.625, got %g", g);
}

static void test_pick_reduce_labels(void)
{
	/* Labels {0, 7, 200} in a 37x29 checker, every k in 1..9: the output
	 * holds only labels and equals the index rule. */
	enum { W = 37, H = 29 };
	uint8_t lab[H][W], dst[H][W];
	const uint8_t labels[3] = {0, 7, 200};
	for (uint32_t y = 0; y < H; y++)
		for (uint32_t x = 0; x < W; x++)
			lab[y][x] = labels[(x / 2 + y / 3 + x * y) % 3];
	for (uint32_t k = 1; k <= 9; k++) {
		uint32_t dw = (W + k - 1) / k, dh = (H + k - 1) / k, bad = 0;
		sf_pick_reduce(lab, W, W, H, k, SF_U8, 1, dst, W, dw, dh);
		for (uint32_t y = 0; y < dh; y++)
			for (uint32_t x = 0; x < dw; x++) {
				uint32_t sx = x * k + k / 2, sy = y * k + k / 2;
				sx = sx < W ? sx : W - 1;
				sy = sy < H ? sy : H - 1;
				bad += dst[y][x] != lab[sy][sx];
			}
		CHECK(bad == 0, "k = %u: %u pixels differ from the index rule", k, bad);
	}
}

static void test_box_reduce(void)
{
	/* 5x3 uint16 image, k = 2: edge boxes average only in-image pixels. */
	uint16_t src[3][6] = {
	    {1, 2, 3, 4, 5, 999}, {5, 6, 7, 8, 9, 999}, {10, 20, 30, 40, 51, 999}};
	uint16_t dst[2][3];

	sf_box_reduce(src, sizeof src[0], 5, 3, 2, SF_U16, 1, dst, sizeof dst[0], 3, 2);
	CHECK(dst[0][0] == 4, "(1+2+5+6+2)/4 = 4, got %u", dst[0][0]); /* 14/4=3.5 -> 4 */
	CHECK(dst[0][2] == 7, "(5+9)/2 = 7, got %u", dst[0][2]);
	CHECK(dst[1][0] == 15, "(10+20+1)/2 = 15, got %u", dst[1][0]);
	CHECK(dst[1][2] == 51, "corner single pixel, got %u", dst[1][2]);

	float f[2][2] = {{1.0f, 2.0f}, {3.0f, 4.5f}}, g;
	sf_box_reduce(f, sizeof f[0], 2, 2, 2, SF_F32, 1, &g, sizeof g, 1, 1);
	CHECK(g == 2.625f, "float mean 2.625, got %g", g);

	uint8_t rgb[2][6] = {{10, 20, 30, 11, 21, 31}, {12, 22, 32, 13, 23, 33}}, out[3];
	sf_box_reduce(rgb, 6, 2, 2, 2, SF_U8, 3, out, 3, 1, 1);
	CHECK(out[0] == 12 && out[1] == 22 && out[2] == 32, "RGB per sample: %u %u %u", out[0],
	      out[1], out[2]);
}

int main(void)
{
	test_plan_flat();
	test_plan_follows_source();
	test_plan_svs_4x();
	test_plan_svs_4x_floor_short();
	test_plan_svs_4x_ceil_copied();
	test_plan_not_power_of_two();
	test_plan_anisotropic_level_refused();
	test_level_downsample();
	test_box_reduce();
	test_pick_reduce();
	test_pick_reduce_labels();
	return CHECK_DONE("test_pyramid");
}

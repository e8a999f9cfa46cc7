/* test_pyramid.c — the output pyramid plan and the box reduction. */
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
	test_box_reduce();
	return CHECK_DONE("test_pyramid");
}

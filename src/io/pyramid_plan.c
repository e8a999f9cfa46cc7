/* pyramid_plan.c — which source level makes each output pyramid level.
 *
 * Output level l stands for a 2^l downsample of level 0.  Its size is that
 * of the source's own level of downsample exactly 2^l when there is one
 * (floor or ceil of level 0 / 2^l, so an Aperio /4 level rounded down is
 * served as stored, as OpenSlide and QuPath show it), else
 * ceil(previous / 2).
 *
 * It is made from a source level that is exactly usable: one whose
 * downsample is exactly 2^k in both axes (its size is floor or ceil of the
 * level-0 size / 2^k: every rounding of repeated halvings lands there), with
 * k <= l, and that covers the output level (each output pixel's box of
 * 2^(l-k) source pixels holds at least one real pixel).  Of those, the
 * coarsest is read; level 0 always qualifies.  Levels of any other
 * downsample (x3, x5, or an Aperio /4 level rounded down one pixel short of
 * the output level) are never read, so no output pixel reads past a source
 * level's edge: edge pixels average (or pick) real pixels only. */
#include "scopefs/products.h"

#include <math.h>

static uint32_t ceil_half(uint32_t v)
{
	return v / 2 + (v & 1);
}

/* Whether v is floor or ceil of full / 2^k. */
static int is_rounded_shift(uint32_t v, uint32_t full, uint32_t k)
{
	uint64_t floor_v = (uint64_t)full >> k;
	uint64_t ceil_v = ((uint64_t)full + ((1ull << k) - 1)) >> k;
	return v == floor_v || v == ceil_v;
}

/* k when source level `level` is exactly a 2^k downsample of level 0 in
 * both axes, else -1.  A tiny level can fit two k (W = 3, width 1 is 2x and
 * 4x); the nearest to the width ratio is taken. */
static int exact_log2_downsample(const sf_slide_info *s, uint32_t level)
{
	const sf_slide_level *lv = &s->levels[level];
	if (level == 0)
		return 0;
	if (!lv->width || !lv->height || lv->width > s->width || lv->height > s->height)
		return -1;
	long k = lround(log2((double)s->width / (double)lv->width));
	if (k < 0 || k > 31)
		return -1;
	if (!is_rounded_shift(lv->width, s->width, (uint32_t)k) ||
	    !is_rounded_shift(lv->height, s->height, (uint32_t)k))
		return -1;
	return (int)k;
}

/* The source level, after source level `after`, whose downsample is exactly
 * 2^l and which is no larger than the previous output level (pw, ph); -1
 * if none. */
static int source_level_exact(const sf_slide_info *s, uint32_t after, uint32_t l, uint32_t pw,
                              uint32_t ph)
{
	for (uint32_t i = after + 1; i < s->level_count; i++)
		if (s->levels[i].width <= pw && s->levels[i].height <= ph &&
		    exact_log2_downsample(s, i) == (int)l)
			return (int)i;
	return -1;
}

static uint64_t ceil_div(uint64_t a, uint64_t b)
{
	return (a + b - 1) / b;
}

/* The coarsest exactly usable source level for output level l (sizes
 * already set): its index and box. */
static void choose_source(const sf_slide_info *s, sf_pyramid_plan *plan, uint32_t l)
{
	int best_k = 0;
	plan->source_level[l] = 0;
	for (uint32_t i = 1; i < s->level_count; i++) {
		int k = exact_log2_downsample(s, i);
		if (k <= best_k || k > (int)l)
			continue;
		uint64_t box = 1ull << (l - (uint32_t)k);
		if (ceil_div(s->levels[i].width, box) < plan->width[l] ||
		    ceil_div(s->levels[i].height, box) < plan->height[l])
			continue; /* its last box column/row would hold no real pixel */
		best_k = k;
		plan->source_level[l] = i;
	}
	plan->box[l] = 1u << (l - (uint32_t)best_k);
}

void sf_pyramid_plan_make(const sf_slide_info *s, uint32_t tile, sf_pyramid_plan *plan)
{
	uint32_t last_copied = 0;

	plan->levels = 1;
	plan->width[0] = s->width;
	plan->height[0] = s->height;
	plan->source_level[0] = 0;
	plan->box[0] = 1;
	while (plan->levels < SF_LAYOUT_MAX_LEVELS) {
		uint32_t l = plan->levels, pw = plan->width[l - 1], ph = plan->height[l - 1];
		int same;

		if (pw <= tile && ph <= tile)
			break;
		same = source_level_exact(s, last_copied, l, pw, ph);
		if (same >= 0) {
			plan->width[l] = s->levels[same].width;
			plan->height[l] = s->levels[same].height;
			last_copied = (uint32_t)same;
		} else {
			plan->width[l] = ceil_half(pw);
			plan->height[l] = ceil_half(ph);
		}
		choose_source(s, plan, l);
		plan->levels++;
	}
}

/* pyramid_plan.c — which source level makes each output pyramid level.
 *
 * Downsamples are nominal powers of two: a source level whose width is
 * W/3.98 counts as 4x.  Output level l (nominal 2^l) is made from the
 * source level with the largest nominal downsample <= 2^l, averaging boxes
 * of k = 2^l / that downsample; when that level has exactly the output
 * level's size it is copied (k = 1). */
#include "scopefs/products.h"

#include <math.h>

static uint32_t ceil_half(uint32_t v)
{
	return v / 2 + (v & 1);
}

static int is_half_of(uint32_t v, uint32_t prev)
{
	return v == prev / 2 || v == ceil_half(prev);
}

static uint32_t nominal_log2_downsample(const sf_slide_info *s, uint32_t level)
{
	double ratio = (double)s->width / (double)s->levels[level].width;
	return ratio <= 1.0 ? 0 : (uint32_t)lround(log2(ratio));
}

/* The source level whose size is a halving of (pw, ph), after source level `after`. */
static int source_level_halving(const sf_slide_info *s, uint32_t after, uint32_t pw, uint32_t ph)
{
	for (uint32_t i = after + 1; i < s->level_count; i++)
		if (is_half_of(s->levels[i].width, pw) && is_half_of(s->levels[i].height, ph))
			return (int)i;
	return -1;
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
		int same = source_level_halving(s, last_copied, pw, ph);
		uint32_t best = 0;

		if (pw <= tile && ph <= tile)
			break;
		if (same >= 0 && nominal_log2_downsample(s, (uint32_t)same) == l) {
			plan->width[l] = s->levels[same].width;
			plan->height[l] = s->levels[same].height;
			plan->source_level[l] = (uint32_t)same;
			plan->box[l] = 1;
			last_copied = (uint32_t)same;
		} else {
			plan->width[l] = ceil_half(pw);
			plan->height[l] = ceil_half(ph);
			for (uint32_t i = 0; i < s->level_count; i++)
				if (nominal_log2_downsample(s, i) <= l &&
				    nominal_log2_downsample(s, i) >=
				        nominal_log2_downsample(s, best))
					best = i;
			plan->source_level[l] = best;
			plan->box[l] = 1u << (l - nominal_log2_downsample(s, best));
		}
		plan->levels++;
	}
}

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
 * level's edge: edge pixels average (or pick) real pixels only.
 *
 * The one downsample rule (sf_level_downsample), used wherever scopefs maps
 * a level's pixels to level 0 (the warp's source and output levels, the
 * registration thumbnails): a level whose sides are floor or ceil of level
 * 0's / r, for one integer r, has downsample exactly r in both axes (its
 * pixels are r x r boxes of level 0, however the halvings rounded);
 * otherwise the side ratios W0 / WL, H0 / HL.  Output level l is then
 * exactly 2^l, as made here. */
#include "scopefs/products.h"

#include <math.h>

static uint32_t ceil_half(uint32_t v)
{
	return v / 2 + (v & 1);
}

/* Whether v is floor or ceil of full / r: every rounding of repeated
 * divisions by r's factors lands there. */
static int is_rounded_div(uint64_t v, uint64_t full, uint64_t r)
{
	return v == full / r || v == (full + r - 1) / r;
}

/* r when source level `level` is exactly an r-fold downsample of level 0:
 * both its sides floor or ceil of level 0's / r; else 0.  A level smaller
 * than its own downsample can fit several r (W = 5, width 2 is 2x and 3x),
 * so the candidates go in order and the first that fits wins: the powers
 * of two nearest the side ratios (a pyramid of halvings; the longer side
 * first, as it pins r down closer), then the integers nearest them (an
 * Aperio /4 step, an x3 pyramid). */
static uint64_t integer_downsample(const sf_slide_info *s, uint32_t level)
{
	const sf_slide_level *lv = &s->levels[level];
	if (level == 0)
		return 1;
	if (!lv->width || !lv->height || lv->width > s->width || lv->height > s->height)
		return 0;
	double ratio[2] = {(double)s->width / lv->width, (double)s->height / lv->height};
	int first = lv->width >= lv->height ? 0 : 1;
	uint64_t cand[4];
	for (int i = 0; i < 2; i++) {
		long k = lround(log2(ratio[first ^ i]));
		cand[i] = k >= 0 && k <= 31 ? 1ull << k : 0;
		cand[2 + i] = (uint64_t)llround(ratio[first ^ i]);
	}
	for (int i = 0; i < 4; i++)
		if (cand[i] && is_rounded_div(lv->width, s->width, cand[i]) &&
		    is_rounded_div(lv->height, s->height, cand[i]))
			return cand[i];
	return 0;
}

/* k when source level `level` is exactly a 2^k downsample of level 0 in
 * both axes, else -1. */
static int exact_log2_downsample(const sf_slide_info *s, uint32_t level)
{
	uint64_t r = integer_downsample(s, level);
	int k = 0;
	if (!r || (r & (r - 1)))
		return -1;
	while (r >> k > 1)
		k++;
	return k;
}

void sf_level_downsample(const sf_slide_info *s, uint32_t level, double ds[2])
{
	uint64_t r = integer_downsample(s, level);
	if (r) {
		ds[0] = ds[1] = (double)r;
		return;
	}
	/* Not one integer step: the side ratios are all we know. */
	ds[0] = (double)s->width / s->levels[level].width;
	ds[1] = (double)s->height / s->levels[level].height;
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

/* fuzz_slide.c — libFuzzer harness: sf_slide_probe on a TIFF (the input),
 * then a few sf_slide_read_region calls on every level and on the first and
 * last channel: the corner, one straddling the right/bottom edge, one
 * beyond it.  This covers the OME-XML, ImageJ and Aperio description
 * parsing inside the probe when the seeds carry such descriptions.
 *   make fuzz && build/fuzz/fuzz_slide -timeout=5 -rss_limit_mb=2048 CORPUS_DIR
 * Seeds: tests/fuzz/seeds.py (tiny TIFFs written with tifffile). */
#include <math.h>
#include <string.h>

#include "fuzz_common.h"
#include "scopefs/log.h"
#include "scopefs/slide.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void read_some(const sf_slide_info *s)
{
	sf_slide_reader *r;
	sf_err e;
	if (sf_slide_reader_open(s, &r, &e) != SF_OK)
		return;
	enum { SIDE = 48 };
	size_t px = sf_dtype_bytes(s->dtype) * s->samples;
	uint8_t *dst = malloc(SIDE * SIDE * (px ? px : 1));
	if (!dst)
		abort();
	for (uint32_t l = 0; l < s->level_count && l < 6; l++) {
		const sf_slide_level *lv = &s->levels[l];
		int64_t at[3][2] = {{0, 0},
		                    {(int64_t)lv->width - SIDE / 2, (int64_t)lv->height - SIDE / 3},
		                    {(int64_t)lv->width + 3, -5}};
		uint32_t chans[2] = {0, s->channels - 1};
		for (int c = 0; c < 2; c++)
			for (int k = 0; k < 3; k++)
				if (sf_slide_read_region(r, l, chans[c], at[k][0], at[k][1], SIDE,
				                         SIDE, dst, &e) != SF_OK &&
				    !e.msg[0])
					abort();
	}
	free(dst);
	sf_slide_reader_close(r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char p[128];
	sf_log_set_level(SF_LOG_ERROR); /* the probe's warnings are expected here */
	fuzz_write(fuzz_path("in.tif", p, sizeof p), data, size);
	sf_slide_info *s = fuzz_probe(p);
	if (!s)
		return 0;
	read_some(s);
	sf_slide_info_free(s);
	return 0;
}

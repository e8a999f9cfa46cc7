/* fuzz_metaimage.c — libFuzzer harness: sf_metaimage_read_field on a .mhd
 * header (the input) with a fixed valid in.raw beside it (64 x 64 nodes of
 * 2 doubles, 64 KiB, so mutated DimSize/ElementType still find data).
 *   make fuzz && build/fuzz/fuzz_metaimage -timeout=5 -rss_limit_mb=2048 CORPUS_DIR
 * Seeds: tests/fuzz/seeds.py. */
#include "fuzz_common.h"
#include "scopefs/metaimage.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int ready;
	char p[128];
	if (!ready) {
		static double raw[64 * 64 * 2];
		for (size_t i = 0; i < sizeof raw / sizeof raw[0]; i++)
			raw[i] = 0.125 * (double)(i % 37);
		fuzz_write(fuzz_path("in.raw", p, sizeof p), raw, sizeof raw);
		ready = 1;
	}
	fuzz_write(fuzz_path("in.mhd", p, sizeof p), data, size);
	sf_field_grid *g = NULL;
	double gmap[6];
	sf_err e;
	if (sf_metaimage_read_field(p, &g, gmap, &e) != SF_OK) {
		if (!e.msg[0] || g)
			abort(); /* an error must say what, and leave no grid */
		if (getenv("FUZZ_VERBOSE"))
			fprintf(stderr, "rejected: %s\n", e.msg);
		return 0;
	}
	sf_field_grid_free(g);
	return 0;
}

/* fuzz_transform_wsireg.c — libFuzzer harness: sf_transform_load on a file named
 * in_transformations.json (see fuzz_transform.h).
 *   make fuzz && build/fuzz/fuzz_transform_wsireg -timeout=5 -rss_limit_mb=2048 CORPUS_DIR
 * Seeds: tests/fuzz/seeds.py. */
#include "fuzz_transform.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	fuzz_transform_one("in_transformations.json", data, size);
	return 0;
}

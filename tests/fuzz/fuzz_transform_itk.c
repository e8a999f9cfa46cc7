/* fuzz_transform_itk.c — libFuzzer harness: sf_transform_load on a file named
 * in.tfm (see fuzz_transform.h).
 *   make fuzz && build/fuzz/fuzz_transform_itk -timeout=5 -rss_limit_mb=2048 CORPUS_DIR
 * Seeds: tests/fuzz/seeds.py. */
#include "fuzz_transform.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	fuzz_transform_one("in.tfm", data, size);
	return 0;
}

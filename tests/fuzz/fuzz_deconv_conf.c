/* fuzz_deconv_conf.c — libFuzzer harness: the deconvolution settings parsers.
 * The input is used twice: as a per-stack file RAW_DIR/s.scopefs.conf read by
 * sf_deconv_settings_for_stack (with a mount list giving the required dxy,
 * dz and wavelengths), and, NUL-terminated, as a mount-wide -o list for
 * sf_deconv_settings_apply_list + check.
 *   make fuzz && build/fuzz/fuzz_deconv_conf -timeout=5 -rss_limit_mb=2048 CORPUS_DIR
 * Seeds: tests/fuzz/seeds.py. */
#include <string.h>

#include "fuzz_common.h"
#include "scopefs/product_deconv.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char p[128];
	fuzz_write(fuzz_path("s.scopefs.conf", p, sizeof p), data, size);
	sf_stack st = {.name = "s", .multipage = 1, .dtype = SF_U16};
	sf_deconv_settings s;
	sf_err e;
	if (sf_deconv_settings_for_stack(fuzz_dir(), &st,
	                                 "dxy=0.4,dz=1.2,lambda_ex=561,lambda_em=600",
	                                 SF_DECONV_GPU_OFF, &s, &e) != SF_OK) {
		if (!e.msg[0])
			abort();
		if (getenv("FUZZ_VERBOSE"))
			fprintf(stderr, "rejected file: %s\n", e.msg);
	}
	char *list = malloc(size + 1);
	if (!list)
		abort();
	memcpy(list, data, size);
	list[size] = '\0';
	sf_deconv_settings_default(&s);
	if (sf_deconv_settings_apply_list(&s, list, "-o: ", &e) == SF_OK)
		sf_deconv_settings_check(&s, "-o: ", &e);
	sf_deconv_settings_resolve(&s);
	free(list);
	return 0;
}

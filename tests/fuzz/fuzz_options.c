/* fuzz_options.c — libFuzzer harness: the mount option parser.  The input
 * is parsed twice by sf_options_parse: as a preset file (-o preset=FILE)
 * and, NUL-terminated with newlines turned into commas, as an -o list.
 * RAW_DIR is the per-process folder; nothing is mounted or created.
 *   make fuzz && build/fuzz/fuzz_options -timeout=5 -rss_limit_mb=2048 CORPUS_DIR
 * Seeds: tests/fuzz/seeds.py. */
#include <string.h>

#include "fuzz_common.h"
#include "scopefs/options.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void parse(char *opt_list)
{
	char raw[64], mnt[128];
	snprintf(raw, sizeof raw, "%s", fuzz_dir());
	fuzz_path("mnt", mnt, sizeof mnt);
	char *argv[] = {"scopefs", "-o", opt_list, raw, mnt, NULL};
	sf_options o;
	sf_err e;
	memset(&o, 0, sizeof o);
	if (sf_options_parse(5, argv, &o, &e) != SF_OK) {
		if (!e.msg[0])
			abort();
		if (getenv("FUZZ_VERBOSE"))
			fprintf(stderr, "rejected: %s\n", e.msg);
	}
	sf_options_free(&o);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char p[128], preset[160];
	fuzz_write(fuzz_path("preset", p, sizeof p), data, size);
	snprintf(preset, sizeof preset, "preset=%s", p);
	parse(preset);
	char *list = malloc(size + 1);
	if (!list)
		abort();
	memcpy(list, data, size);
	list[size] = '\0';
	for (size_t i = 0; i < size; i++)
		if (list[i] == '\n')
			list[i] = ',';
	parse(list);
	free(list);
	return 0;
}

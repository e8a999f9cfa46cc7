/* fuzz_common.h — shared by the libFuzzer harnesses in tests/fuzz/.
 *
 * The parsers under test take a path, so each harness writes the fuzz input
 * to a fixed file in a per-process folder /tmp/fuzz-<pid>/ (created once,
 * with any side files the format may name) and calls the parser on it.
 * Build: `make fuzz` (clang, ASan/UBSan, into $(BUILD)/fuzz/); how to run:
 * docs/architecture.md, "Fuzzing". */
#ifndef SCOPEFS_FUZZ_COMMON_H
#define SCOPEFS_FUZZ_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "scopefs/slide.h"

/* The per-process folder, made on first use (one fuzzing process, one
 * thread: libFuzzer calls the target serially). */
static inline const char *fuzz_dir(void)
{
	static char dir[64];
	if (!dir[0]) {
		snprintf(dir, sizeof dir, "/tmp/fuzz-%d", (int)getpid());
		if (mkdir(dir, 0700) != 0 && access(dir, W_OK) != 0) {
			perror(dir);
			abort();
		}
	}
	return dir;
}

/* dir/name, in a static buffer per call site's caller (copy it if kept). */
static inline const char *fuzz_path(const char *name, char *buf, size_t cap)
{
	snprintf(buf, cap, "%s/%s", fuzz_dir(), name);
	return buf;
}

/* Write n bytes to path, whole; abort on failure (a harness bug, not a find). */
static inline void fuzz_write(const char *path, const void *data, size_t n)
{
	FILE *f = fopen(path, "wb");
	if (!f || fwrite(data, 1, n, f) != n || fclose(f) != 0) {
		perror(path);
		abort();
	}
}

/* Probe the slide at path: NULL when refused (with a message, else abort);
 * a slide's pixel size is known (finite, > 0) or 0, else abort. */
static inline sf_slide_info *fuzz_probe(const char *path)
{
	sf_slide_info *s = NULL;
	sf_err e;
	if (sf_slide_probe(path, &s, &e) != SF_OK) {
		if (!e.msg[0])
			abort();
		if (getenv("FUZZ_VERBOSE"))
			fprintf(stderr, "rejected: %s\n", e.msg);
		return NULL;
	}
	if (!isfinite(s->pixel_size_x) || !isfinite(s->pixel_size_y) || s->pixel_size_x < 0 ||
	    s->pixel_size_y < 0)
		abort();
	return s;
}

#endif

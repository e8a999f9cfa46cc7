/* check.h — the tiny assertion kit of the C unit tests.
 *
 * CHECK(cond, fmt, ...) counts a pass or prints the failure and counts it;
 * CHECK_DONE(name) prints "name: N passed, M failed" and yields the exit code. */
#ifndef SCOPEFS_TEST_CHECK_H
#define SCOPEFS_TEST_CHECK_H

#include <stdio.h>

static int passed, failed; /* this test file's counts */

#define CHECK(cond, ...)                                                                           \
	do {                                                                                       \
		if (cond)                                                                          \
			passed++;                                                                  \
		else {                                                                             \
			failed++;                                                                  \
			printf("FAIL %s:%d: ", __FILE__, __LINE__);                                \
			printf(__VA_ARGS__);                                                       \
			printf("\n");                                                              \
		}                                                                                  \
	} while (0)

#define CHECK_DONE(name)                                                                           \
	(printf("%s: %d passed, %d failed\n", name, passed, failed), failed ? 1 : 0)

#endif

/* log.c — timestamped one-line log records on stderr. */
#include "scopefs/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <time.h>

/* Written once by main() before threads start; read-only afterwards. */
static int log_level = SF_LOG_INFO;

void sf_log_set_level(int level)
{
	log_level = level;
}

void sf_log(int level, const char *fmt, ...)
{
	static const char *const tags[] = {"error", "warn", "info", "debug"};
	char line[1024];
	struct timespec now;
	struct tm tm;
	va_list ap;
	int n;

	if (level > log_level)
		return;
	clock_gettime(CLOCK_REALTIME, &now);
	gmtime_r(&now.tv_sec, &tm);
	n = snprintf(line, sizeof line, "scopefs %02d:%02d:%02d.%03ld %s: ", tm.tm_hour, tm.tm_min,
	             tm.tm_sec, now.tv_nsec / 1000000, tags[level & 3]);
	va_start(ap, fmt);
	vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
	va_end(ap);
	/* One fputs per record: stdio locks the stream, so lines never interleave. */
	fprintf(stderr, "%s\n", line);
}

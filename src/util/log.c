/* log.c — timestamped one-line log records on stderr. */
#include "scopefs/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Written by main() before threads start; read-only afterwards. */
static int log_level = SF_LOG_INFO;
static int log_copy_fd = -1;

void sf_log_set_level(int level)
{
	log_level = level;
}

void sf_log_copy_to(int fd)
{
	log_copy_fd = fd;
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
	if (log_copy_fd >= 0) {
		size_t len = strlen(line);
		if (len == sizeof line - 1)
			len--;
		line[len] = '\n';
		/* A lost copy is not worth failing for: the record went to stderr. */
		if (write(log_copy_fd, line, len + 1) < 0)
			n = 0;
	}
}

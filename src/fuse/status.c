/* status.c — the .scopefs/status JSON document.
 *
 * Cheap to make (counters under the engine's lock, a walk of the slide
 * list), so it is rebuilt on every open and getattr; a cp running beside it
 * is not slowed. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "scopefs/autoreg.h"
#include "scopefs/mount.h"
#include "scopefs/utf8.h"

typedef struct json {
	char *buf;
	size_t len, cap;
	int failed;
} json;

static void json_add(json *j, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void json_add(json *j, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (j->failed)
		return;
	va_start(ap, fmt);
	n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0) {
		j->failed = 1;
		return;
	}
	if (j->len + (size_t)n + 1 > j->cap) {
		size_t cap = j->cap ? j->cap : 4096;
		char *grown;
		while (cap < j->len + (size_t)n + 1)
			cap *= 2;
		if (!(grown = realloc(j->buf, cap))) {
			j->failed = 1;
			return;
		}
		j->buf = grown;
		j->cap = cap;
	}
	va_start(ap, fmt);
	vsnprintf(j->buf + j->len, j->cap - j->len, fmt, ap);
	va_end(ap);
	j->len += (size_t)n;
}

/* File names are bytes: one that is not UTF-8 (a Latin-1 name copied from
 * an old share) would make the whole status unreadable to a JSON parser, so
 * each byte of a malformed sequence becomes U+FFFD. */
static void json_string(json *j, const char *s)
{
	json_add(j, "\"");
	while (s && *s) {
		unsigned char c = (unsigned char)*s;
		size_t n = sf_utf8_length(s);
		if (c == '"' || c == '\\')
			json_add(j, "\\%c", c);
		else if (c < 0x20)
			json_add(j, "\\u%04x", c);
		else if (!n)
			json_add(j, "\\ufffd");
		else
			json_add(j, "%.*s", (int)n, s);
		s += n ? n : 1;
	}
	json_add(j, "\"");
}

/* "recent_errors": the engine's latest failures, newest first (a daemon's
 * log lines are lost without log=FILE). */
static void json_recent_errors(json *j, const sf_mount *m)
{
	sf_engine_error r[SF_ENGINE_RECENT_ERRORS];
	unsigned n = m->engine ? sf_engine_recent_errors(m->engine, r, SF_ENGINE_RECENT_ERRORS) : 0;

	json_add(j, "  \"recent_errors\": [");
	for (unsigned i = 0; i < n; i++) {
		time_t t = (time_t)r[i].time_s;
		struct tm tm;
		char when[32];

		gmtime_r(&t, &tm);
		strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
		json_add(j,
		         "%s\n    {\"time\": \"%s\", \"count\": %llu, \"message\": ", i ? "," : "",
		         when, (unsigned long long)r[i].count);
		json_string(j, r[i].msg);
		json_add(j, "}");
	}
	json_add(j, "%s],\n", n ? "\n  " : "");
}

static void json_counters(json *j, const sf_mount *m)
{
	sf_engine_stats es = {0};
	sf_cache_stats cs = {0};
	struct timespec now;

	if (m->engine)
		sf_engine_stats_get(m->engine, &es);
	if (m->cache)
		sf_cache_stats_get(m->cache, &cs);
	clock_gettime(CLOCK_REALTIME, &now);
	json_add(j, "{\n  \"version\": ");
	json_string(j, sf_version());
	json_add(j, ",\n  \"raw_dir\": ");
	json_string(j, m->opts->raw_dir);
	json_add(j, ",\n  \"cache_dir\": ");
	json_string(j, m->opts->cache_dir);
	json_add(j,
	         ",\n  \"uptime_s\": %ld,\n  \"threads\": %u,\n  \"mem\": %llu,\n"
	         "  \"cache_size\": %llu,\n",
	         (long)(now.tv_sec - m->mounted_at.tv_sec),
	         m->engine ? sf_engine_threads(m->engine) : 0, (unsigned long long)m->opts->mem,
	         (unsigned long long)m->opts->cache_size);
	json_add(j,
	         "  \"tiles_served\": %llu,\n  \"tiles_computed\": %llu,\n"
	         "  \"ram_hits\": %llu,\n  \"ram_misses\": %llu,\n  \"disk_hits\": %llu,\n"
	         "  \"disk_misses\": %llu,\n  \"in_flight\": %llu,\n  \"errors\": %llu,\n"
	         "  \"ram_bytes\": %llu,\n  \"prefetched\": %llu,\n  \"cache_write_s\": %.3f,\n",
	         (unsigned long long)es.served, (unsigned long long)es.computed,
	         (unsigned long long)es.ram_hits, (unsigned long long)es.ram_misses,
	         (unsigned long long)es.disk_hits, (unsigned long long)es.disk_misses,
	         (unsigned long long)es.in_flight, (unsigned long long)es.errors,
	         (unsigned long long)es.ram_bytes, (unsigned long long)es.prefetched,
	         (double)es.cache_write_ns * 1e-9);
	json_add(j,
	         "  \"cache_bytes\": %llu,\n  \"cache_entries\": %llu,\n"
	         "  \"cache_corrupt\": %llu,\n  \"cache_evicted\": %llu,\n"
	         "  \"cache_written\": %llu,\n",
	         (unsigned long long)cs.bytes, (unsigned long long)cs.entries,
	         (unsigned long long)cs.corrupt, (unsigned long long)cs.evicted,
	         (unsigned long long)cs.written);
	json_recent_errors(j, m);
}

static void json_dataset(json *j, const sf_mount *m)
{
	const sf_dataset *d = m->dataset;

	json_add(j, "  \"reference\": ");
	if (m->reference >= 0)
		json_string(j, d->slide_stems[m->reference]);
	else
		json_add(j, "null");
	json_add(j, ",\n  \"slides\": [");
	for (uint32_t i = 0; i < d->slide_count; i++) {
		const sf_slide_info *s = d->slides[i];
		json_add(j, "%s\n    {\"name\": ", i ? "," : "");
		json_string(j, d->slide_stems[i]);
		json_add(j, ", \"path\": ");
		json_string(j, s->path);
		/* orientation: the source's TIFF Orientation (1 when absent), which
		 * scopefs does not apply (docs/dataset.md): a viewer that applies
		 * it shows the source turned against registered/. */
		json_add(j,
		         ", \"width\": %u, \"height\": %u, \"channels\": %u, \"levels\": %u, "
		         "\"orientation\": %u, \"state\": ",
		         s->width, s->height, s->channels, s->level_count,
		         (unsigned)s->orientation);
		if (sf_autoreg_has(m->autoreg, i)) {
			char state[1024];
			sf_autoreg_describe(m->autoreg, i, state, sizeof state);
			json_string(j, state);
		} else
			json_string(j, m->slide_state ? m->slide_state[i].state : "");
		json_add(j, "}");
	}
	json_add(j, "%s],\n  \"stacks\": [", d->slide_count ? "\n  " : "");
	for (uint32_t i = 0; i < d->stack_count; i++) {
		json_add(j, "%s\n    {\"name\": ", i ? "," : "");
		json_string(j, d->stacks[i]->name);
		json_add(j, ", \"planes\": %u, \"width\": %u, \"height\": %u, \"state\": ",
		         d->stacks[i]->planes, d->stacks[i]->width, d->stacks[i]->height);
		json_string(j, m->stack_state && m->stack_state[i] ? m->stack_state[i] : "");
		json_add(j, "}");
	}
	json_add(j, "%s],\n  \"problems\": [", d->stack_count ? "\n  " : "");
	for (uint32_t i = 0; i < d->problem_count; i++) {
		json_add(j, "%s\n    {\"path\": ", i ? "," : "");
		json_string(j, d->problems[i].path);
		json_add(j, ", \"reason\": ");
		json_string(j, d->problems[i].reason);
		json_add(j, "}");
	}
	json_add(j, "%s]\n}\n", d->problem_count ? "\n  " : "");
}

char *sf_status_json(const sf_mount *m, size_t *len)
{
	json j = {0};

	json_counters(&j, m);
	json_dataset(&j, m);
	if (j.failed) {
		free(j.buf);
		return NULL;
	}
	*len = j.len;
	return j.buf;
}

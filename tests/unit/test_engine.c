/* test_engine.c — the tile engine against a test product with known bytes.
 *
 * The product below is a test double of the product callback interface: unit
 * u has test_unit_size(u) bytes, byte i of it is expected_byte(u, i) (an
 * independent formula the test checks every copied byte against), and each
 * compute is counted per unit with atomics, so "computed once" is observed
 * directly rather than through the engine's own statistics.  Compute may
 * sleep, fail on request, or hold until the engine shows N waiting readers.
 *
 * The disk cache checks use the real sf_cache (src/io/cache.c) in a fresh
 * temporary folder. */
#include "check.h"
#include "scopefs/engine.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "scopefs/log.h"

/* ---- the test product --------------------------------------------------- */

enum { MAX_UNITS = 256, STATE_MAGIC = 0x5eed };

struct test_product {
	sf_product base;
	size_t unit_size;                /* nominal; see test_unit_size */
	unsigned sleep_us;               /* per compute */
	atomic_uint calls[MAX_UNITS];    /* computes per unit */
	atomic_int fail_left[MAX_UNITS]; /* computes of this unit still to fail */
	atomic_uint hold_unit_plus1;     /* unit+1 whose compute waits for hold_misses */
	uint64_t hold_misses;            /* ram_misses the held compute waits for */
	sf_engine *engine;               /* for the hold */
	atomic_uint starts, stops, bad_state;
	atomic_uint warms;          /* warm op calls */
	atomic_int start_fail_left; /* worker_start calls still to fail */
	atomic_uint live_computes, max_live_computes;
	pthread_t main_thread;
	atomic_uint start_on_main;
};

static size_t test_unit_size(const struct test_product *t, uint64_t unit)
{
	/* sizes differ per unit so a mixed-up buffer shows */
	return t->unit_size + (size_t)(unit % 7) * 12; /* even: whole 2-byte samples */
}

static uint8_t expected_byte(uint64_t unit, size_t i)
{
	uint64_t x = (unit + 1) * 0x9e3779b97f4a7c15ull ^ (i * 0xbf58476d1ce4e5b9ull);

	x ^= x >> 29;
	return (uint8_t)(x ^ (x >> 17));
}

static size_t tp_unit_bytes(const sf_product *p, uint64_t unit)
{
	return test_unit_size(p->impl, unit);
}

static int tp_worker_start(sf_product *p, void **state, sf_err *e)
{
	struct test_product *t = p->impl;
	int *s;

	if (atomic_fetch_sub(&t->start_fail_left, 1) > 0)
		return sf_fail(e, SF_EIO, "%s: injected worker_start failure", p->name);
	s = malloc(sizeof *s);
	if (!s)
		return sf_fail(e, SF_ENOMEM, "%s: no memory for state", p->name);
	*s = STATE_MAGIC;
	*state = s;
	atomic_fetch_add(&t->starts, 1);
	if (pthread_equal(pthread_self(), t->main_thread))
		atomic_fetch_add(&t->start_on_main, 1);
	return SF_OK;
}

static void tp_worker_stop(sf_product *p, void *state)
{
	struct test_product *t = p->impl;

	atomic_fetch_add(&t->stops, 1);
	free(state);
}

static void wait_for_misses(struct test_product *t)
{
	sf_engine_stats st;

	for (int i = 0; i < 5000; i++) { /* 5 s at most */
		sf_engine_stats_get(t->engine, &st);
		if (st.ram_misses >= t->hold_misses)
			return;
		usleep(1000);
	}
}

static int tp_compute(sf_product *p, void *state, uint64_t unit, uint8_t *out, sf_err *e)
{
	struct test_product *t = p->impl;
	size_t n = test_unit_size(t, unit);
	unsigned live = atomic_fetch_add(&t->live_computes, 1) + 1;
	unsigned seen = atomic_load(&t->max_live_computes);

	while (live > seen && !atomic_compare_exchange_weak(&t->max_live_computes, &seen, live))
		;
	if (!state || *(int *)state != STATE_MAGIC)
		atomic_fetch_add(&t->bad_state, 1);
	atomic_fetch_add(&t->calls[unit], 1);
	if (atomic_load(&t->hold_unit_plus1) == unit + 1)
		wait_for_misses(t);
	if (t->sleep_us)
		usleep(t->sleep_us);
	for (size_t i = 0; i < n; i++)
		out[i] = expected_byte(unit, i);
	atomic_fetch_sub(&t->live_computes, 1);
	if (atomic_fetch_sub(&t->fail_left[unit], 1) > 0)
		return sf_fail(e, SF_EIO, "%s: unit %" PRIu64 ": injected failure", p->name, unit);
	return SF_OK;
}

static void tp_destroy(sf_product *p)
{
	(void)p;
}

static void tp_warm(sf_product *p)
{
	struct test_product *t = p->impl;

	atomic_fetch_add(&t->warms, 1);
}

static const sf_product_ops tp_ops = {
    .worker_start = tp_worker_start,
    .worker_stop = tp_worker_stop,
    .compute = tp_compute,
    .unit_bytes = tp_unit_bytes,
    .destroy = tp_destroy,
    .warm = tp_warm,
};

static struct test_product *tp_new(const char *name, uint64_t units, size_t unit_size,
                                   unsigned sleep_us)
{
	struct test_product *t = calloc(1, sizeof *t);

	if (!t) {
		perror("calloc");
		exit(2);
	}
	t->base.ops = &tp_ops;
	t->base.key = sf_key_mix_str(sf_key_of("test_engine", 11), name);
	t->base.elem_bytes = 2;
	t->base.unit_count = units;
	t->base.impl = t;
	snprintf(t->base.name, sizeof t->base.name, "%s", name);
	t->unit_size = unit_size;
	t->sleep_us = sleep_us;
	t->main_thread = pthread_self();
	return t;
}

static unsigned total_calls(struct test_product *t)
{
	unsigned n = 0;

	for (uint64_t u = 0; u < t->base.unit_count; u++)
		n += atomic_load(&t->calls[u]);
	return n;
}

static sf_engine *engine_new(unsigned threads, uint64_t mem, sf_cache *cache)
{
	sf_engine_config cfg = {
	    .threads = threads, .mem_bytes = mem, .cache = cache, .max_products = 4};
	sf_engine *g;
	sf_err e = {0};

	if (sf_engine_create(&cfg, &g, &e) != SF_OK) {
		printf("engine_create: %s\n", e.msg);
		exit(2);
	}
	return g;
}

static void add_product(sf_engine *g, struct test_product *t)
{
	sf_err e = {0};

	t->engine = g;
	if (sf_engine_add_product(g, &t->base, &e) != SF_OK) {
		printf("add_product: %s\n", e.msg);
		exit(2);
	}
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Read [off, off+len) of unit and compare with the formula; 1 if all match. */
static int read_and_verify(sf_engine *g, struct test_product *t, uint64_t unit, size_t off,
                           size_t len, sf_err *e)
{
	uint8_t *dst = malloc(len ? len : 1);
	int ok = 1;

	if (!dst)
		return 0;
	if (sf_engine_read(g, &t->base, unit, off, len, dst, e) != SF_OK)
		ok = 0;
	for (size_t i = 0; ok && i < len; i++)
		if (dst[i] != expected_byte(unit, off + i))
			ok = 0;
	free(dst);
	return ok;
}

static uint64_t rng_next(uint64_t *s)
{
	uint64_t x = (*s += 0x9e3779b97f4a7c15ull);

	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

/* ---- reader threads --------------------------------------------------- */

struct reader_job {
	sf_engine *g;
	struct test_product *t;
	uint64_t seed;
	unsigned reads;
	uint64_t units; /* read units [0, units) */
	atomic_uint *bad;
	int rc_seen; /* for failure checks: the code this reader got */
	sf_err err;
	uint64_t unit; /* for single-unit readers */
};

static void *random_reader(void *arg)
{
	struct reader_job *j = arg;
	uint64_t s = j->seed;

	for (unsigned r = 0; r < j->reads; r++) {
		uint64_t unit = rng_next(&s) % j->units;
		size_t size = test_unit_size(j->t, unit);
		size_t off = rng_next(&s) % size;
		size_t len = rng_next(&s) % (size - off + 1);
		sf_err e = {0};

		if (!read_and_verify(j->g, j->t, unit, off, len, &e))
			atomic_fetch_add(j->bad, 1);
	}
	return NULL;
}

static void run_readers(struct reader_job *jobs, unsigned n, void *(*fn)(void *))
{
	pthread_t th[64];

	for (unsigned i = 0; i < n; i++)
		if (pthread_create(&th[i], NULL, fn, &jobs[i]) != 0) {
			perror("pthread_create");
			exit(2);
		}
	for (unsigned i = 0; i < n; i++)
		pthread_join(th[i], NULL);
}

/* ---- tests -------------------------------------------------------------- */

/* 16 readers hammer 48 overlapping units: each is computed exactly once,
 * every byte is right, worker states are made on workers and all stopped. */
static void test_computed_once(void)
{
	enum { UNITS = 48, READERS = 16 };
	struct test_product *t = tp_new("once.tif", UNITS, 3000, 2000);
	sf_engine *g = engine_new(3, 64u << 20, NULL);
	struct reader_job jobs[READERS];
	atomic_uint bad = 0;
	sf_engine_stats st;
	unsigned more_than_once = 0, starts;

	add_product(g, t);
	for (unsigned i = 0; i < READERS; i++)
		jobs[i] = (struct reader_job){
		    .g = g, .t = t, .seed = 1000 + i, .reads = 150, .units = UNITS, .bad = &bad};
	run_readers(jobs, READERS, random_reader);
	for (uint64_t u = 0; u < UNITS; u++)
		if (atomic_load(&t->calls[u]) > 1)
			more_than_once++;
	sf_engine_stats_get(g, &st);
	CHECK(atomic_load(&bad) == 0, "%u of %u reads had wrong bytes or failed", atomic_load(&bad),
	      READERS * 150);
	CHECK(more_than_once == 0, "%u units computed more than once", more_than_once);
	CHECK(total_calls(t) == st.computed, "computes %u, engine says %" PRIu64, total_calls(t),
	      st.computed);
	CHECK(st.ram_hits + st.ram_misses == st.served && st.ram_misses >= UNITS,
	      "hits %" PRIu64 " + misses %" PRIu64 " != served %" PRIu64, st.ram_hits,
	      st.ram_misses, st.served);
	CHECK(st.in_flight == 0, "in_flight %" PRIu64 " after all reads", st.in_flight);
	CHECK(st.errors == 0, "errors %" PRIu64, st.errors);
	CHECK(atomic_load(&t->max_live_computes) <= 3, "%u computes at once with 3 workers",
	      atomic_load(&t->max_live_computes));
	starts = atomic_load(&t->starts);
	CHECK(starts >= 1 && starts <= 3, "worker_start ran %u times for 3 workers", starts);
	CHECK(atomic_load(&t->start_on_main) == 0, "worker_start ran on the reading thread");
	CHECK(atomic_load(&t->bad_state) == 0, "compute got a wrong state %u times",
	      atomic_load(&t->bad_state));
	sf_engine_destroy(g);
	CHECK(atomic_load(&t->stops) == starts, "worker_stop %u times for %u starts",
	      atomic_load(&t->stops), starts);
	free(t);
}

/* Random (unit, off, len) reads on one thread, including the empty read and
 * whole units, against the formula; bad ranges are refused. */
static void test_random_reads_and_ranges(void)
{
	struct test_product *t = tp_new("random.tif", 100, 1024, 0);
	sf_engine *g = engine_new(2, 1u << 20, NULL);
	uint64_t s = 42;
	unsigned bad = 0;
	uint8_t byte;
	sf_err e = {0};
	int rc;

	add_product(g, t);
	for (int r = 0; r < 3000; r++) {
		uint64_t unit = rng_next(&s) % 100;
		size_t size = test_unit_size(t, unit);
		size_t off = r % 10 == 0 ? 0 : rng_next(&s) % size;
		size_t len = r % 10 == 0 ? size : rng_next(&s) % (size - off + 1);

		if (!read_and_verify(g, t, unit, off, len, &e))
			bad++;
	}
	CHECK(bad == 0, "%u of 3000 random reads wrong", bad);

	rc = sf_engine_read(g, &t->base, 100, 0, 1, &byte, &e);
	CHECK(rc == SF_ERANGE && strstr(e.msg, "random.tif"), "unit past the end: rc %d, '%s'", rc,
	      e.msg);
	rc = sf_engine_read(g, &t->base, 3, test_unit_size(t, 3), 1, &byte, &e);
	CHECK(rc == SF_ERANGE, "byte past the unit: rc %d", rc);
	rc = sf_engine_read(g, &t->base, 3, 1, SIZE_MAX, &byte, &e);
	CHECK(rc == SF_ERANGE, "overflowing length: rc %d", rc);
	rc = sf_engine_read(g, &t->base, 3, test_unit_size(t, 3), 0, &byte, &e);
	CHECK(rc == SF_OK, "empty read at the end: rc %d", rc);

	{
		struct test_product *stranger = tp_new("stranger.tif", 4, 64, 0);

		stranger->base.slot = 0; /* looks like a slot, but is not registered */
		rc = sf_engine_read(g, &stranger->base, 0, 0, 1, &byte, &e);
		CHECK(rc == SF_EINVAL, "unregistered product: rc %d", rc);
		sf_engine_prefetch(g, &stranger->base, 0);
		CHECK(atomic_load(&stranger->calls[0]) == 0, "unregistered product prefetched");
		free(stranger);
	}
	sf_engine_destroy(g);
	free(t);
}

/* max_products is enforced and slots are distinct. */
static void test_add_products(void)
{
	sf_engine_config cfg = {.threads = 1, .mem_bytes = 1 << 20, .max_products = 2};
	struct test_product *a = tp_new("a.tif", 4, 64, 0), *b = tp_new("b.tif", 4, 64, 0),
	                    *c = tp_new("c.tif", 4, 64, 0);
	sf_engine *g;
	sf_err e = {0};
	int rc;

	CHECK(sf_engine_create(&cfg, &g, &e) == SF_OK, "create: %s", e.msg);
	CHECK(sf_engine_threads(g) == 1, "threads %u", sf_engine_threads(g));
	CHECK(sf_engine_add_product(g, &a->base, &e) == SF_OK, "add a: %s", e.msg);
	CHECK(sf_engine_add_product(g, &b->base, &e) == SF_OK, "add b: %s", e.msg);
	CHECK(a->base.slot != b->base.slot, "same slot %u", a->base.slot);
	rc = sf_engine_add_product(g, &c->base, &e);
	CHECK(rc != SF_OK && strstr(e.msg, "c.tif"), "third product accepted: rc %d '%s'", rc,
	      e.msg);
	/* warm: once per product the engine took, never for the one it refused */
	CHECK(atomic_load(&a->warms) == 1 && atomic_load(&b->warms) == 1 &&
	          atomic_load(&c->warms) == 0,
	      "warm calls a %u b %u c %u", atomic_load(&a->warms), atomic_load(&b->warms),
	      atomic_load(&c->warms));
	/* the same unit index of two products is two entries: each is computed */
	CHECK(read_and_verify(g, a, 1, 0, 64, &e) && read_and_verify(g, b, 1, 0, 64, &e),
	      "reads of a and b");
	CHECK(atomic_load(&a->calls[1]) == 1 && atomic_load(&b->calls[1]) == 1,
	      "unit 1 computed %u times for a, %u for b", atomic_load(&a->calls[1]),
	      atomic_load(&b->calls[1]));
	sf_engine_destroy(g);

	cfg.threads = 0;
	CHECK(sf_engine_create(&cfg, &g, &e) == SF_OK, "create: %s", e.msg);
	CHECK(sf_engine_threads(g) == (unsigned)sysconf(_SC_NPROCESSORS_ONLN),
	      "threads 0 gave %u workers, %ld CPUs", sf_engine_threads(g),
	      sysconf(_SC_NPROCESSORS_ONLN));
	sf_engine_destroy(g);
	free(a);
	free(b);
	free(c);
}

struct sampler {
	sf_engine *g;
	atomic_bool done;
	uint64_t max_ram;
};

static void *sample_ram(void *arg)
{
	struct sampler *s = arg;
	sf_engine_stats st;

	while (!atomic_load(&s->done)) {
		sf_engine_stats_get(s->g, &st);
		if (st.ram_bytes > s->max_ram)
			s->max_ram = st.ram_bytes;
		usleep(200);
	}
	return NULL;
}

/* RAM stays within mem + one unit per worker and reader; the LRU evicts, and
 * an evicted unit is computed again (no disk cache). */
static void test_memory_bound(void)
{
	enum { UNITS = 200, READERS = 4, THREADS = 2, USIZE = 4096 };
	const uint64_t unit_max = USIZE + 6 * 12;
	const uint64_t mem = 8 * USIZE;
	struct test_product *t = tp_new("mem.tif", UNITS, USIZE, 100);
	sf_engine *g = engine_new(THREADS, mem, NULL);
	struct reader_job jobs[READERS];
	struct sampler smp = {.g = g};
	pthread_t th;
	atomic_uint bad = 0;
	sf_engine_stats st;
	sf_err e = {0};
	unsigned before;

	add_product(g, t);
	pthread_create(&th, NULL, sample_ram, &smp);
	for (unsigned i = 0; i < READERS; i++)
		jobs[i] = (struct reader_job){
		    .g = g, .t = t, .seed = 7 + i, .reads = 400, .units = UNITS, .bad = &bad};
	run_readers(jobs, READERS, random_reader);
	for (uint64_t u = 0; u < UNITS; u++) /* sequential prefetch + read */
		if (!read_and_verify(g, t, u, 0, test_unit_size(t, u), &e))
			atomic_fetch_add(&bad, 1);
		else if (u + 2 < UNITS)
			sf_engine_prefetch(g, &t->base, u + 2);
	atomic_store(&smp.done, true);
	pthread_join(th, NULL);
	sf_engine_stats_get(g, &st);
	CHECK(atomic_load(&bad) == 0, "%u reads wrong", atomic_load(&bad));
	CHECK(smp.max_ram <= mem + (THREADS + READERS) * unit_max,
	      "ram_bytes peaked at %" PRIu64 ", bound %" PRIu64 " + %u units", smp.max_ram, mem,
	      THREADS + READERS);
	/* settle, then the bound holds exactly */
	for (int i = 0; i < 2000 && st.in_flight; i++) {
		usleep(1000);
		sf_engine_stats_get(g, &st);
	}
	CHECK(st.ram_bytes <= mem, "ram_bytes %" PRIu64 " at rest > mem %" PRIu64, st.ram_bytes,
	      mem);
	CHECK(st.ram_bytes >= mem - 2 * unit_max, "ram_bytes %" PRIu64 " at rest: LRU underfilled",
	      st.ram_bytes);
	/* unit 0 was read long ago: evicted, so read again is a recompute */
	before = atomic_load(&t->calls[0]);
	CHECK(read_and_verify(g, t, 0, 0, 100, &e), "re-read of unit 0");
	CHECK(atomic_load(&t->calls[0]) == before + 1, "unit 0 computes %u -> %u, want +1", before,
	      atomic_load(&t->calls[0]));
	/* the newest unit is still there: a RAM hit */
	sf_engine_stats_get(g, &st);
	before = atomic_load(&t->calls[0]);
	CHECK(read_and_verify(g, t, 0, 5, 10, &e), "second re-read of unit 0");
	{
		sf_engine_stats st2;

		sf_engine_stats_get(g, &st2);
		CHECK(st2.ram_hits == st.ram_hits + 1 && atomic_load(&t->calls[0]) == before,
		      "recent unit not served from RAM");
	}
	sf_engine_destroy(g);
	free(t);
}

/* With mem smaller than one unit, one unit is still kept and reads work. */
static void test_tiny_memory(void)
{
	struct test_product *t = tp_new("tiny.tif", 10, 5000, 0);
	sf_engine *g = engine_new(2, 100, NULL);
	sf_engine_stats st;
	sf_err e = {0};
	int ok = 1;

	add_product(g, t);
	for (int pass = 0; pass < 2; pass++)
		for (uint64_t u = 0; u < 10; u++)
			ok &= read_and_verify(g, t, u, 0, test_unit_size(t, u), &e);
	CHECK(ok, "reads with mem < one unit");
	sf_engine_stats_get(g, &st);
	CHECK(st.ram_bytes <= test_unit_size(t, 9), "ram_bytes %" PRIu64 " > one unit",
	      st.ram_bytes);
	CHECK(read_and_verify(g, t, 9, 0, 10, &e), "last unit");
	CHECK(atomic_load(&t->calls[9]) == 2, "last unit computed %u times, want 2 (kept once)",
	      atomic_load(&t->calls[9]));
	sf_engine_destroy(g);
	free(t);
}

static void *single_unit_reader(void *arg)
{
	struct reader_job *j = arg;
	uint8_t buf[64];

	j->err = (sf_err){0};
	j->rc_seen = sf_engine_read(j->g, &j->t->base, j->unit, 0, sizeof buf, buf, &j->err);
	return NULL;
}

/* A failing compute gives its error to every waiter, once; the next read
 * computes again and succeeds. */
static void test_failure(void)
{
	enum { READERS = 8 };
	struct test_product *t = tp_new("fail.tif", 10, 1000, 0);
	sf_engine *g = engine_new(2, 1u << 20, NULL);
	struct reader_job jobs[READERS];
	sf_engine_stats st;
	sf_err e = {0};
	unsigned got_error = 0, named = 0;

	add_product(g, t);
	atomic_store(&t->fail_left[5], 1);
	t->hold_misses = READERS; /* compute of unit 5 waits until all 8 wait */
	atomic_store(&t->hold_unit_plus1, 6);
	for (unsigned i = 0; i < READERS; i++)
		jobs[i] = (struct reader_job){.g = g, .t = t, .unit = 5};
	fprintf(stderr, "test_engine: one 'injected failure' warning is expected below\n");
	run_readers(jobs, READERS, single_unit_reader);
	for (unsigned i = 0; i < READERS; i++) {
		got_error += jobs[i].rc_seen == SF_EIO && jobs[i].err.code == SF_EIO;
		named += strstr(jobs[i].err.msg, "fail.tif: unit 5: injected failure") != NULL;
	}
	CHECK(got_error == READERS, "%u of %u waiters got SF_EIO", got_error, READERS);
	CHECK(named == READERS, "%u of %u waiters got the product's message", named, READERS);
	CHECK(atomic_load(&t->calls[5]) == 1, "failing unit computed %u times",
	      atomic_load(&t->calls[5]));
	sf_engine_stats_get(g, &st);
	CHECK(st.errors == 1 && st.in_flight == 0 && st.ram_bytes == 0,
	      "errors %" PRIu64 " in_flight %" PRIu64 " ram_bytes %" PRIu64, st.errors,
	      st.in_flight, st.ram_bytes);
	atomic_store(&t->hold_unit_plus1, 0);
	CHECK(read_and_verify(g, t, 5, 0, 1000, &e), "retry after failure: %s", e.msg);
	CHECK(atomic_load(&t->calls[5]) == 2, "retry computed %u times in all, want 2",
	      atomic_load(&t->calls[5]));
	CHECK(read_and_verify(g, t, 5, 10, 10, &e) && atomic_load(&t->calls[5]) == 2,
	      "third read not from RAM");
	sf_engine_destroy(g);
	free(t);
}

/* The recent errors: newest first, one entry per message (a repeat bumps
 * its count and makes it the newest), the least recently seen evicted. */
static void test_recent_errors(void)
{
	struct test_product *t = tp_new("recent.tif", 12, 100, 0);
	sf_engine *g = engine_new(1, 1u << 20, NULL);
	sf_engine_error r[SF_ENGINE_RECENT_ERRORS + 2];
	uint8_t buf[100];
	sf_err e = {0};
	char want[64];
	unsigned n, in_order = 0;

	add_product(g, t);
	CHECK(sf_engine_recent_errors(g, r, 4) == 0, "errors before any failure");
	for (uint64_t u = 0; u < 10; u++) {
		atomic_store(&t->fail_left[u], 1);
		CHECK(sf_engine_read(g, &t->base, u, 0, 10, buf, &e) == SF_EIO, "unit %" PRIu64, u);
	}
	n = sf_engine_recent_errors(g, r, SF_ENGINE_RECENT_ERRORS + 2);
	for (unsigned i = 0; i < n; i++) {
		snprintf(want, sizeof want, "recent.tif: unit %u: injected failure", 9 - i);
		in_order += !strcmp(r[i].msg, want) && r[i].count == 1 && r[i].time_s > 0;
	}
	CHECK(n == SF_ENGINE_RECENT_ERRORS && in_order == n,
	      "%u entries, %u as expected (units 9 down to 2); first '%s'", n, in_order,
	      n ? r[0].msg : "");
	atomic_store(&t->fail_left[3], 1);
	CHECK(sf_engine_read(g, &t->base, 3, 0, 10, buf, &e) == SF_EIO, "unit 3 again");
	n = sf_engine_recent_errors(g, r, 2);
	CHECK(n == 2 && strstr(r[0].msg, "unit 3:") && r[0].count == 2 &&
	          strstr(r[1].msg, "unit 9:"),
	      "a repeat is bumped to the front: %u, '%s' x%" PRIu64, n, n ? r[0].msg : "",
	      n ? r[0].count : 0);
	sf_engine_destroy(g);
	free(t);
}

/* A failing worker_start fails the read with its message and is tried again
 * by the next compute on that worker. */
static void test_worker_start_failure(void)
{
	struct test_product *t = tp_new("start.tif", 10, 100, 0);
	sf_engine *g = engine_new(1, 1u << 20, NULL);
	sf_err e = {0};
	uint8_t buf[100];
	int rc;

	add_product(g, t);
	atomic_store(&t->start_fail_left, 1);
	fprintf(stderr, "test_engine: one 'injected worker_start failure' warning is expected\n");
	rc = sf_engine_read(g, &t->base, 2, 0, sizeof buf, buf, &e);
	CHECK(rc == SF_EIO && strstr(e.msg, "start.tif: injected worker_start failure"),
	      "read with failing worker_start: rc %d '%s'", rc, e.msg);
	CHECK(atomic_load(&t->calls[2]) == 0, "compute ran without its state");
	CHECK(read_and_verify(g, t, 2, 0, 100, &e), "read after worker_start recovered: %s", e.msg);
	CHECK(atomic_load(&t->starts) == 1 && atomic_load(&t->bad_state) == 0,
	      "starts %u bad states %u", atomic_load(&t->starts), atomic_load(&t->bad_state));
	sf_engine_destroy(g);
	CHECK(atomic_load(&t->stops) == 1, "stops %u", atomic_load(&t->stops));
	free(t);
}

/* A worker keeps at most 8 product states (each an open source reader in
 * scopefs): reading 12 products retires the least recently used, with
 * worker_stop, and a product read again gets a fresh state. */
static void test_worker_states_bounded(void)
{
	enum { N = 12 };
	struct test_product *t[N];
	sf_engine_config cfg = {.threads = 1, .mem_bytes = 1u << 20, .max_products = N};
	sf_engine *g;
	sf_err e = {0};
	unsigned starts = 0, stops = 0;

	CHECK(sf_engine_create(&cfg, &g, &e) == SF_OK, "create: %s", e.msg);
	for (int i = 0; i < N; i++) {
		char name[32];
		snprintf(name, sizeof name, "states%d.tif", i);
		t[i] = tp_new(name, 4, 100, 0);
		add_product(g, t[i]);
	}
	for (int i = 0; i < N; i++)
		CHECK(read_and_verify(g, t[i], 0, 0, 100, &e), "read product %d: %s", i, e.msg);
	for (int i = 0; i < N; i++) {
		starts += atomic_load(&t[i]->starts);
		stops += atomic_load(&t[i]->stops);
	}
	CHECK(starts == N && stops == N - 8, "12 products: %u starts, %u stops (8 kept)", starts,
	      stops);
	CHECK(atomic_load(&t[0]->stops) == 1 && atomic_load(&t[N - 1]->stops) == 0,
	      "the least recently used state went first");
	CHECK(read_and_verify(g, t[0], 1, 0, 100, &e), "read product 0 again: %s", e.msg);
	CHECK(atomic_load(&t[0]->starts) == 2 && atomic_load(&t[0]->bad_state) == 0,
	      "product 0 restarted: %u starts, %u bad states", atomic_load(&t[0]->starts),
	      atomic_load(&t[0]->bad_state));
	sf_engine_destroy(g);
	starts = stops = 0;
	for (int i = 0; i < N; i++) {
		starts += atomic_load(&t[i]->starts);
		stops += atomic_load(&t[i]->stops);
		free(t[i]);
	}
	CHECK(starts == stops, "every state stopped: %u starts, %u stops", starts, stops);
}

static void wait_idle(sf_engine *g)
{
	sf_engine_stats st;

	for (int i = 0; i < 5000; i++) {
		sf_engine_stats_get(g, &st);
		if (st.in_flight == 0)
			return;
		usleep(1000);
	}
}

/* A prefetched unit is later a RAM hit; prefetching a present unit or a
 * unit past the end does nothing; a full queue drops requests. */
static void test_prefetch(void)
{
	struct test_product *t = tp_new("pre.tif", 200, 512, 0);
	sf_engine *g = engine_new(1, 1u << 20, NULL);
	sf_engine_stats st0, st1;
	sf_err e = {0};

	add_product(g, t);
	sf_engine_prefetch(g, &t->base, 3);
	wait_idle(g);
	sf_engine_stats_get(g, &st0);
	CHECK(st0.prefetched == 1 && atomic_load(&t->calls[3]) == 1,
	      "prefetch: prefetched %" PRIu64 ", computes %u", st0.prefetched,
	      atomic_load(&t->calls[3]));
	CHECK(read_and_verify(g, t, 3, 0, 512, &e), "read of prefetched unit");
	sf_engine_stats_get(g, &st1);
	CHECK(st1.ram_hits == st0.ram_hits + 1 && st1.ram_misses == st0.ram_misses,
	      "read after prefetch: hits %" PRIu64 "->%" PRIu64 " misses %" PRIu64 "->%" PRIu64,
	      st0.ram_hits, st1.ram_hits, st0.ram_misses, st1.ram_misses);
	sf_engine_prefetch(g, &t->base, 3);
	sf_engine_prefetch(g, &t->base, 200);
	wait_idle(g);
	sf_engine_stats_get(g, &st1);
	CHECK(st1.prefetched == 1 && atomic_load(&t->calls[3]) == 1,
	      "prefetch of a ready unit or past the end was accepted");

	/* one slow worker, 100 requests: the queue (4 per worker) drops most */
	t->sleep_us = 20000;
	for (uint64_t u = 10; u < 110; u++)
		sf_engine_prefetch(g, &t->base, u);
	sf_engine_prefetch(g, &t->base, 10); /* duplicate of a queued unit */
	wait_idle(g);
	sf_engine_stats_get(g, &st1);
	CHECK(st1.prefetched - 1 <= 6 && st1.prefetched - 1 >= 4,
	      "%" PRIu64 " of 100 prefetches accepted with a queue of 4", st1.prefetched - 1);
	CHECK(total_calls(t) == st1.prefetched, "computes %u for %" PRIu64 " prefetches",
	      total_calls(t), st1.prefetched);
	sf_engine_destroy(g);
	free(t);
}

/* Reads go before queued prefetches: with the queue full of slow read-ahead,
 * a read waits about one compute, not the whole queue. */
static void test_prefetch_does_not_starve_reads(void)
{
	enum { SLEEP_MS = 100 };
	struct test_product *t = tp_new("starve.tif", 100, 256, SLEEP_MS * 1000);
	sf_engine *g = engine_new(2, 1u << 20, NULL);
	sf_engine_stats st;
	sf_err e = {0};
	double t0, waited;

	add_product(g, t);
	for (uint64_t u = 0; u < 8; u++)
		sf_engine_prefetch(g, &t->base, u);
	usleep(10000); /* let workers take prefetches */
	t0 = now_s();
	CHECK(read_and_verify(g, t, 50, 0, 256, &e), "read during prefetch");
	waited = now_s() - t0;
	sf_engine_stats_get(g, &st);
	/* in order, the read would wait for 8 prefetches on 2 workers: >= 400 ms */
	CHECK(waited < 2.5 * SLEEP_MS / 1000.0, "read waited %.0f ms behind prefetches",
	      waited * 1000);
	CHECK(st.in_flight >= 4, "only %" PRIu64 " prefetches still pending: test proves nothing",
	      st.in_flight);

	/* a read of a unit that is queued for prefetch jumps the queue too */
	t0 = now_s();
	CHECK(read_and_verify(g, t, 7, 0, 256, &e), "read of a queued prefetch");
	waited = now_s() - t0;
	CHECK(waited < 2.5 * SLEEP_MS / 1000.0, "read of queued unit 7 waited %.0f ms",
	      waited * 1000);
	CHECK(atomic_load(&t->calls[7]) == 1, "unit 7 computed %u times",
	      atomic_load(&t->calls[7]));
	sf_engine_destroy(g);
	free(t);
}

/* Destroy right after queuing slow prefetches: quick (queued ones dropped),
 * no leak (ASan), every worker state stopped. */
static void test_destroy_with_pending(void)
{
	struct test_product *t = tp_new("pending.tif", 100, 4096, 50000);
	sf_engine *g = engine_new(2, 1u << 20, NULL);
	double t0;

	add_product(g, t);
	for (uint64_t u = 0; u < 8; u++)
		sf_engine_prefetch(g, &t->base, u);
	usleep(5000);
	t0 = now_s();
	sf_engine_destroy(g);
	CHECK(now_s() - t0 < 0.3, "destroy took %.0f ms with 8 x 50 ms queued",
	      (now_s() - t0) * 1000);
	CHECK(total_calls(t) <= 3, "%u prefetches computed after destroy began", total_calls(t));
	CHECK(atomic_load(&t->stops) == atomic_load(&t->starts), "stops %u starts %u",
	      atomic_load(&t->stops), atomic_load(&t->starts));

	/* and an engine that never computed anything */
	g = engine_new(4, 0, NULL);
	sf_engine_destroy(g);
	passed++;
	free(t);
}

/* A second engine on the same cache folder computes nothing: disk hits. */
static void test_disk_cache(void)
{
	enum { UNITS = 40 };
	char dir[] = "/tmp/test_engine_cache.XXXXXX";
	struct test_product *t = tp_new("disk.tif", UNITS, 6000, 0);
	sf_engine_stats st;
	sf_cache *c;
	sf_engine *g;
	sf_err e = {0};
	int ok = 1;
	char cmd[128];

	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		exit(2);
	}
	CHECK(sf_cache_open(dir, 0, &c, &e) == SF_OK, "cache open: %s", e.msg);
	g = engine_new(2, 1u << 20, c);
	add_product(g, t);
	for (uint64_t u = 0; u < UNITS; u++)
		ok &= read_and_verify(g, t, u, 0, test_unit_size(t, u), &e);
	sf_engine_stats_get(g, &st);
	CHECK(ok, "first engine reads");
	CHECK(st.computed == UNITS && st.disk_misses == UNITS && st.disk_hits == 0,
	      "first engine: computed %" PRIu64 " disk misses %" PRIu64 " hits %" PRIu64,
	      st.computed, st.disk_misses, st.disk_hits);
	sf_engine_destroy(g);
	sf_cache_close(c);

	for (uint64_t u = 0; u < UNITS; u++)
		atomic_store(&t->calls[u], 0);
	atomic_store(&t->starts, 0);
	atomic_store(&t->stops, 0);
	CHECK(sf_cache_open(dir, 0, &c, &e) == SF_OK, "cache reopen: %s", e.msg);
	g = engine_new(3, 1u << 20, c);
	add_product(g, t);
	for (uint64_t u = 0; u < UNITS; u++)
		ok &= read_and_verify(g, t, u, 0, test_unit_size(t, u), &e);
	sf_engine_stats_get(g, &st);
	CHECK(ok, "second engine reads");
	CHECK(st.computed == 0 && total_calls(t) == 0 && st.disk_hits == UNITS,
	      "second engine: computed %" PRIu64 " (calls %u), disk hits %" PRIu64, st.computed,
	      total_calls(t), st.disk_hits);
	CHECK(atomic_load(&t->starts) == 0, "worker_start ran %u times though nothing computed",
	      atomic_load(&t->starts));
	sf_engine_destroy(g);
	sf_cache_close(c);
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
	if (system(cmd) != 0)
		printf("could not remove %s\n", dir);
	free(t);
}

int main(void)
{
	sf_log_set_level(SF_LOG_WARN);
	test_computed_once();
	test_random_reads_and_ranges();
	test_add_products();
	test_memory_bound();
	test_tiny_memory();
	test_failure();
	fprintf(stderr, "test_engine: 11 'injected failure' warnings are expected below\n");
	test_recent_errors();
	test_worker_start_failure();
	test_worker_states_bounded();
	test_prefetch();
	test_prefetch_does_not_starve_reads();
	test_destroy_with_pending();
	test_disk_cache();
	printf("test_engine: %d passed, %d failed\n", passed, failed);
	return failed != 0;
}

/* engine.c — the tile engine: turns unit reads into computations, once each.
 *
 * Every unit the engine knows of has one struct unit_entry, found through a
 * hash table keyed by (product slot, unit).  Its state moves
 *
 *     QUEUED   on the read queue or the prefetch queue, no buffer yet
 *     COMPUTING   a worker owns it: disk cache lookup, then product compute
 *     READY    buf holds the unit's bytes; on the LRU list
 *     FAILED   out of the table; err says why; freed by its last pin
 *
 * Invariants, all under g->lock:
 *  1. At most one entry per (slot, unit) is in the table, so a unit is being
 *     made by at most one worker: later readers find the entry and wait on
 *     g->unit_done (one shared condition, broadcast when any unit settles).
 *  2. An entry is on exactly one list, chosen by its state: the read queue or
 *     the prefetch queue (QUEUED, which one says on_prefetch_queue), none
 *     (COMPUTING, FAILED) or the LRU list (READY, least recent at the head).
 *  3. pins counts the threads that hold a pointer to the entry outside the
 *     lock: waiting or copying readers, and the worker from claim until its
 *     disk write ends.  A pinned entry is never evicted nor freed.
 *  4. ram_bytes is the sum of the sizes of COMPUTING and READY entries
 *     (a buffer is counted from the moment a worker claims the unit).  After
 *     each claim and each unpin, unpinned READY entries are evicted from the
 *     LRU head while ram_bytes > mem_bytes and more than one unit is held.
 *     Pinned entries may hold it above the bound: by at most one unit per
 *     worker and per reader, never a deadlock.
 *  5. No lock is held while a product computes, while the disk cache is read
 *     or written, or while bytes are copied out to a reader.
 *
 * Reads beat prefetches: workers take the read queue first, and at most
 * threads - threads/4 workers (all of them up to 3 threads) compute
 * prefetches at once, so on a big pool a read never waits behind read-ahead,
 * and on a small one (2 cores) cp still uses every core; a read then waits
 * at most one unit's computation.  A prefetch slot is held until the unit
 * is made, not through its disk write.  The prefetch
 * queue holds at most 4*threads units and drops requests beyond that.
 *
 * Nested reads: a product's compute may read units of another product (the
 * deconvolved strips read deconvolved blocks).  A read issued on a worker
 * thread of this engine (the thread-local current_worker) does not queue an
 * absent or queued unit, which could deadlock a pool whose every worker
 * waits: it claims the unit and makes it inline on its own thread, with its
 * own per-worker state; it waits only for a unit another worker is already
 * computing.  Products must not read themselves, and nested reads must not
 * form a cycle (blocks never read strips), so such a wait always ends.
 *
 * Per-worker product state (product->ops->worker_start) is made lazily on the
 * worker thread, in worker->states[product->slot]; it is only touched by that
 * worker while it runs, and by sf_engine_destroy after every worker has been
 * joined, which is where worker_stop runs (on the destroying thread).
 *
 * The cache key of unit u of product p is sf_key_mix_u64(p->key, u). */
#include "scopefs/engine.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "scopefs/cpus.h"
#include "scopefs/log.h"

enum unit_state { UNIT_QUEUED, UNIT_COMPUTING, UNIT_READY, UNIT_FAILED };

enum {
	DEFAULT_MAX_PRODUCTS = 256, /* when the config says 0 */
	MAX_THREADS = 1024,         /* a sanity cap on cfg.threads */
	PREFETCH_QUEUE_PER_THREAD = 4,
	MIN_BUCKETS = 64,
};

struct unit_entry {
	sf_product *product;            /* owner; product->slot is part of the key */
	uint64_t unit;                  /* unit index within the product */
	enum unit_state state;          /* see the file comment */
	bool on_prefetch_queue;         /* QUEUED only: which queue holds it */
	unsigned pins;                  /* holders outside the lock (invariant 3) */
	size_t bytes;                   /* unit_bytes(), counted in ram_bytes once claimed */
	uint8_t *buf;                   /* the unit's bytes when READY */
	sf_err err;                     /* FAILED only: what the waiters get */
	struct unit_entry *hash_next;   /* chain in the bucket */
	struct unit_entry *prev, *next; /* the one list the state puts it on */
};

struct entry_list {
	struct unit_entry *head, *tail;
	size_t len;
};

struct worker {
	sf_engine *engine;
	pthread_t thread;
	void **states;      /* [max_products]: worker_start results */
	bool *started;      /* [max_products]: worker_start succeeded */
	uint64_t *last_use; /* [max_products]: tick of the state's last use */
	unsigned *busy;     /* [max_products]: computations using it (nested reads) */
	unsigned live;      /* states started and not retired */
	uint64_t tick;
};

/* States a worker keeps at once.  A state holds an open source reader (a
 * file descriptor, libtiff's directory, a few decoded tiles: about 1 MB),
 * so without a bound RSS and descriptors grew with slides x threads: 80
 * slides read once at threads=16 kept 1.3 GB and 400 descriptors.  The
 * least recently used idle state goes when a worker needs another; a
 * reader that works through the slides one after another reopens none. */
#define WORKER_STATES_MAX 8

/* The worker the calling thread is, NULL on any other thread (FUSE threads,
 * tests).  Thread-local: each worker sets its own once at start. */
static _Thread_local struct worker *current_worker;

struct sf_engine {
	pthread_mutex_t lock;      /* guards everything below but the read-only fields */
	pthread_cond_t work_ready; /* signalled when a queue gains work or a slot frees */
	pthread_cond_t unit_done;  /* broadcast when any unit becomes READY or FAILED */

	/* read-only after create */
	unsigned threads;
	unsigned max_products;
	unsigned prefetch_cap;     /* bound on the prefetch queue length */
	unsigned prefetch_workers; /* bound on workers computing prefetches at once */
	uint64_t mem_bytes;
	sf_cache *cache;
	struct worker *workers;

	/* under lock */
	bool stop;
	sf_product **products; /* [max_products], by slot */
	unsigned product_count;
	struct unit_entry **buckets;
	size_t bucket_count; /* a power of two */
	size_t entry_count;  /* entries in the table */
	struct entry_list read_queue, prefetch_queue, lru;
	unsigned prefetch_running; /* workers computing a unit claimed from the prefetch queue */
	uint64_t ram_units;        /* COMPUTING + READY entries */
	sf_engine_stats stats;
	struct recent_error {
		sf_engine_error err;
		uint64_t seq; /* recent_seq at its last occurrence */
	} recent[SF_ENGINE_RECENT_ERRORS];
	unsigned recent_count; /* entries of recent[] in use */
	uint64_t recent_seq;
};

/* ---- lists ------------------------------------------------------------- */

static void list_push_tail(struct entry_list *l, struct unit_entry *u)
{
	u->next = NULL;
	u->prev = l->tail;
	if (l->tail)
		l->tail->next = u;
	else
		l->head = u;
	l->tail = u;
	l->len++;
}

static void list_remove(struct entry_list *l, struct unit_entry *u)
{
	if (u->prev)
		u->prev->next = u->next;
	else
		l->head = u->next;
	if (u->next)
		u->next->prev = u->prev;
	else
		l->tail = u->prev;
	u->prev = u->next = NULL;
	l->len--;
}

static struct unit_entry *list_pop_head(struct entry_list *l)
{
	struct unit_entry *u = l->head;

	if (u)
		list_remove(l, u);
	return u;
}

/* ---- hash table ---------------------------------------------------------- */

static uint64_t unit_hash(unsigned slot, uint64_t unit)
{
	/* splitmix64 finaliser over the pair: spreads consecutive units. */
	uint64_t x = unit * 0x9e3779b97f4a7c15ull + slot;

	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static struct unit_entry **bucket_of(sf_engine *g, unsigned slot, uint64_t unit)
{
	return &g->buckets[unit_hash(slot, unit) & (g->bucket_count - 1)];
}

static struct unit_entry *table_find(sf_engine *g, const sf_product *p, uint64_t unit)
{
	struct unit_entry *u = *bucket_of(g, p->slot, unit);

	while (u && !(u->product == p && u->unit == unit))
		u = u->hash_next;
	return u;
}

/* Double the buckets when the table gets dense; on allocation failure keep
 * the old size (chains get longer, nothing breaks). */
static void table_grow_if_dense(sf_engine *g)
{
	size_t n = g->bucket_count * 2;
	struct unit_entry **fresh;

	if (g->entry_count < g->bucket_count * 2)
		return;
	fresh = calloc(n, sizeof *fresh);
	if (!fresh)
		return;
	for (size_t b = 0; b < g->bucket_count; b++) {
		struct unit_entry *u = g->buckets[b], *next;

		for (; u; u = next) {
			size_t nb = unit_hash(u->product->slot, u->unit) & (n - 1);

			next = u->hash_next;
			u->hash_next = fresh[nb];
			fresh[nb] = u;
		}
	}
	free(g->buckets);
	g->buckets = fresh;
	g->bucket_count = n;
}

static void table_insert(sf_engine *g, struct unit_entry *u)
{
	struct unit_entry **b;

	table_grow_if_dense(g);
	b = bucket_of(g, u->product->slot, u->unit);
	u->hash_next = *b;
	*b = u;
	g->entry_count++;
}

static void table_remove(sf_engine *g, struct unit_entry *u)
{
	struct unit_entry **link = bucket_of(g, u->product->slot, u->unit);

	while (*link != u)
		link = &(*link)->hash_next;
	*link = u->hash_next;
	u->hash_next = NULL;
	g->entry_count--;
}

/* ---- memory bound ------------------------------------------------------- */

static void entry_free(struct unit_entry *u)
{
	free(u->buf);
	free(u);
}

/* Evict unpinned READY units, least recent first, while over the bound and
 * more than one unit is held (invariant 4).  Evicted entries are chained on
 * *graveyard (through hash_next) so the caller frees them after unlocking. */
static void evict_over_bound(sf_engine *g, struct unit_entry **graveyard)
{
	struct unit_entry *u = g->lru.head, *next;

	while (u && g->stats.ram_bytes > g->mem_bytes && g->ram_units > 1) {
		next = u->next;
		if (u->pins == 0) {
			list_remove(&g->lru, u);
			table_remove(g, u);
			g->stats.ram_bytes -= u->bytes;
			g->ram_units--;
			u->hash_next = *graveyard;
			*graveyard = u;
		}
		u = next;
	}
}

static void graveyard_free(struct unit_entry *u)
{
	struct unit_entry *next;

	for (; u; u = next) {
		next = u->hash_next;
		entry_free(u);
	}
}

/* Drop one pin (under the lock); a FAILED entry goes with its last pin, a
 * READY one may now be evicted. */
static void entry_unpin(sf_engine *g, struct unit_entry *u, struct unit_entry **graveyard)
{
	u->pins--;
	if (u->state == UNIT_FAILED) {
		if (u->pins == 0) {
			u->hash_next = *graveyard;
			*graveyard = u;
		}
		return;
	}
	evict_over_bound(g, graveyard);
}

/* ---- workers ------------------------------------------------------------ */

static sf_key unit_key(const sf_product *p, uint64_t unit)
{
	return sf_key_mix_u64(p->key, unit);
}

/* Stop the least recently used state of w that no computation on this
 * thread is using (an outer unit's, during a nested read, is in use). */
static void retire_idle_state(struct worker *w)
{
	sf_engine *g = w->engine;
	unsigned oldest = g->max_products;

	for (unsigned s = 0; s < g->max_products; s++)
		if (w->started[s] && !w->busy[s] &&
		    (oldest == g->max_products || w->last_use[s] < w->last_use[oldest]))
			oldest = s;
	if (oldest == g->max_products)
		return;
	/* products[] entries of started slots were set before this worker saw
	 * the product, and never change. */
	sf_product *p = g->products[oldest];
	if (p->ops->worker_stop)
		p->ops->worker_stop(p, w->states[oldest]);
	w->states[oldest] = NULL;
	w->started[oldest] = false;
	w->live--;
}

/* The worker's state for p, made on first use on this thread (retiring an
 * idle one past WORKER_STATES_MAX). */
static int worker_state(struct worker *w, sf_product *p, void **state, sf_err *e)
{
	if (!w->started[p->slot]) {
		if (w->live >= WORKER_STATES_MAX)
			retire_idle_state(w);
		if (p->ops->worker_start) {
			int rc = p->ops->worker_start(p, &w->states[p->slot], e);
			if (rc != SF_OK)
				return rc;
		}
		w->started[p->slot] = true;
		w->live++;
	}
	w->last_use[p->slot] = ++w->tick;
	*state = w->states[p->slot];
	return SF_OK;
}

/* Fill buf with unit u's bytes: from the disk cache if it has them, else by
 * computing.  Runs without the lock.  *from_disk says which. */
static int make_unit(struct worker *w, struct unit_entry *u, uint8_t *buf, bool *from_disk,
                     sf_err *e)
{
	sf_engine *g = w->engine;
	sf_product *p = u->product;
	void *state;
	int rc;

	*from_disk = false;
	if (g->cache) {
		sf_err ce = {0};

		rc = sf_cache_get(g->cache, unit_key(p, u->unit), buf, u->bytes, &ce);
		if (rc == SF_OK) {
			*from_disk = true;
			return SF_OK;
		}
		if (rc != SF_ENOTFOUND)
			sf_log(SF_LOG_WARN,
			       "%s: unit %" PRIu64 ": disk cache read failed, computing: %s",
			       p->name, u->unit, ce.msg);
	}
	rc = worker_state(w, p, &state, e);
	if (rc != SF_OK)
		return rc;
	w->busy[p->slot]++;
	rc = p->ops->compute(p, state, u->unit, buf, e);
	w->busy[p->slot]--;
	return rc;
}

/* Next unit to make, or NULL when stopping.  Called and returns with the lock. */
static struct unit_entry *claim_next(sf_engine *g, bool *is_prefetch)
{
	for (;;) {
		if (g->stop)
			return NULL;
		if (g->read_queue.head) {
			*is_prefetch = false;
			return list_pop_head(&g->read_queue);
		}
		if (g->prefetch_queue.head && g->prefetch_running < g->prefetch_workers) {
			struct unit_entry *u = list_pop_head(&g->prefetch_queue);

			u->on_prefetch_queue = false;
			g->prefetch_running++;
			*is_prefetch = true;
			return u;
		}
		pthread_cond_wait(&g->work_ready, &g->lock);
	}
}

/* Settle u after make_unit (with the lock): publish it or fail it, and wake
 * its waiters.  The worker's pin stays.  A failed unit's buffer is returned in
 * *dead_buf for the caller to free after unlocking. */
static void settle_unit(sf_engine *g, struct unit_entry *u, int rc, sf_err *err, uint8_t *buf,
                        bool from_disk, uint8_t **dead_buf)
{
	*dead_buf = NULL;
	g->stats.in_flight--;
	/* the disk cache was asked whenever there is one and a buffer was had */
	if (g->cache && buf && !from_disk)
		g->stats.disk_misses++;
	if (rc == SF_OK) {
		u->buf = buf;
		u->state = UNIT_READY;
		list_push_tail(&g->lru, u);
		if (from_disk)
			g->stats.disk_hits++;
		else
			g->stats.computed++;
	} else {
		u->state = UNIT_FAILED;
		u->err = *err;
		u->err.code = rc;
		table_remove(g, u);
		g->stats.ram_bytes -= u->bytes;
		g->ram_units--;
		g->stats.errors++;
		*dead_buf = buf;
	}
	pthread_cond_broadcast(&g->unit_done);
}

/* With g->lock: remember "product: msg" among the recent errors (without
 * the unit, so one cause over many units stays one entry).  A message
 * already there is bumped; else it takes the least recently seen entry. */
static void note_error(sf_engine *g, const char *source, const char *why)
{
	char msg[sizeof g->recent[0].err.msg];
	size_t n = strlen(source);
	struct recent_error *r = NULL;

	if (!strncmp(why, source, n) && why[n] == ':')
		snprintf(msg, sizeof msg, "%s", why);
	else
		snprintf(msg, sizeof msg, "%s: %s", source, why);
	for (unsigned i = 0; i < g->recent_count && !r; i++)
		if (!strcmp(g->recent[i].err.msg, msg))
			r = &g->recent[i];
	if (!r) {
		if (g->recent_count < SF_ENGINE_RECENT_ERRORS)
			r = &g->recent[g->recent_count++];
		else
			for (unsigned i = 0; i < SF_ENGINE_RECENT_ERRORS; i++)
				if (!r || g->recent[i].seq < r->seq)
					r = &g->recent[i];
		snprintf(r->err.msg, sizeof r->err.msg, "%s", msg);
		r->err.count = 0;
	}
	r->err.count++;
	r->err.time_s = (int64_t)time(NULL);
	r->seq = ++g->recent_seq;
}

void sf_engine_note_error(sf_engine *g, const char *source, const char *msg)
{
	pthread_mutex_lock(&g->lock);
	note_error(g, source, msg);
	pthread_mutex_unlock(&g->lock);
}

/* Make one claimed unit, without the lock except around bookkeeping. */
static void work_on(struct worker *w, struct unit_entry *u, bool is_prefetch)
{
	sf_engine *g = w->engine;
	sf_product *p = u->product;
	struct unit_entry *graveyard = NULL;
	sf_err err = {0};
	bool from_disk = false;
	uint8_t *buf, *dead_buf;
	int rc;

	buf = malloc(u->bytes ? u->bytes : 1);
	if (buf)
		rc = make_unit(w, u, buf, &from_disk, &err);
	else
		rc = sf_fail(&err, SF_ENOMEM, "%s: unit %" PRIu64 ": out of memory for %zu bytes",
		             p->name, u->unit, u->bytes);
	if (rc != SF_OK) {
		if (err.msg[0] == '\0')
			sf_fail(&err, rc, "%s: unit %" PRIu64 ": computation failed (%s)", p->name,
			        u->unit, sf_code_name(rc));
		sf_log(SF_LOG_WARN, "%s: unit %" PRIu64 " failed: %s", p->name, u->unit, err.msg);
	}

	pthread_mutex_lock(&g->lock);
	if (rc != SF_OK)
		note_error(g, p->name, err.msg);
	settle_unit(g, u, rc, &err, buf, from_disk, &dead_buf);
	if (is_prefetch) {
		/* The unit is made: its disk write below need not hold a prefetch
		 * slot (a 64 MB deconvolved block takes ~0.2 s to compress). */
		g->prefetch_running--;
		pthread_cond_signal(&g->work_ready);
	}
	pthread_mutex_unlock(&g->lock);
	free(dead_buf);

	/* Readers are already served from RAM; the disk write only needs the
	 * worker's pin to keep buf alive. */
	if (rc == SF_OK && !from_disk && g->cache) {
		sf_err ce = {0};
		struct timespec t0, t1;

		clock_gettime(CLOCK_MONOTONIC, &t0);
		int put =
		    sf_cache_put(g->cache, unit_key(p, u->unit), buf, u->bytes, p->elem_bytes, &ce);

		/* A full disk is logged by the cache itself, throttled. */
		if (put != SF_OK && !sf_cache_failure_logged(g->cache, &ce))
			sf_log(SF_LOG_WARN, "%s: unit %" PRIu64 ": disk cache write failed: %s",
			       p->name, u->unit, ce.msg);
		clock_gettime(CLOCK_MONOTONIC, &t1);
		pthread_mutex_lock(&g->lock);
		if (put != SF_OK)
			note_error(g, p->name, ce.msg);
		g->stats.cache_write_ns +=
		    (uint64_t)((t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec));
		pthread_mutex_unlock(&g->lock);
	}

	pthread_mutex_lock(&g->lock);
	entry_unpin(g, u, &graveyard);
	pthread_mutex_unlock(&g->lock);
	graveyard_free(graveyard);
}

/* A worker takes u for computing (with the lock): its pin, its buffer's
 * share of the memory bound. */
static void claim_unit(sf_engine *g, struct unit_entry *u, struct unit_entry **graveyard)
{
	u->state = UNIT_COMPUTING;
	u->pins++;
	g->stats.ram_bytes += u->bytes;
	g->ram_units++;
	evict_over_bound(g, graveyard);
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	sf_engine *g = w->engine;

	current_worker = w;
	pthread_mutex_lock(&g->lock);
	for (;;) {
		struct unit_entry *graveyard = NULL;
		struct unit_entry *u;
		bool is_prefetch;

		u = claim_next(g, &is_prefetch);
		if (!u)
			break;
		claim_unit(g, u, &graveyard);
		pthread_mutex_unlock(&g->lock);

		graveyard_free(graveyard);
		work_on(w, u, is_prefetch); /* frees a prefetch slot once the unit is made */

		pthread_mutex_lock(&g->lock);
	}
	pthread_mutex_unlock(&g->lock);
	return NULL;
}

/* ---- create / destroy ------------------------------------------------- */

static unsigned thread_count(unsigned wanted)
{
	unsigned n = wanted ? wanted : sf_cpus_usable();

	return n < MAX_THREADS ? n : MAX_THREADS;
}

/* Free what create made; workers [0, running) are joined first. */
static void engine_free(sf_engine *g, unsigned running)
{
	pthread_mutex_lock(&g->lock);
	g->stop = true;
	pthread_cond_broadcast(&g->work_ready);
	pthread_mutex_unlock(&g->lock);
	/* A unit being computed would otherwise run to its end (a CPU block
	 * of deconvolution: minutes): ask the products to cut it short. */
	sf_engine_stop_products(g);
	for (unsigned i = 0; i < running; i++)
		pthread_join(g->workers[i].thread, NULL);

	/* Workers are gone: their states are ours now (this thread runs worker_stop). */
	for (unsigned i = 0; g->workers && i < g->threads; i++) {
		struct worker *w = &g->workers[i];

		for (unsigned s = 0; w->started && s < g->product_count; s++) {
			sf_product *p = g->products[s];

			if (w->started[s] && p->ops->worker_stop)
				p->ops->worker_stop(p, w->states[s]);
		}
		free(w->states);
		free(w->started);
		free(w->last_use);
		free(w->busy);
	}
	free(g->workers);

	/* Every entry left is in the table: queued prefetches, ready units.
	 * (FAILED ones left the table and were freed by their last pin.) */
	for (size_t b = 0; g->buckets && b < g->bucket_count; b++)
		graveyard_free(g->buckets[b]);
	free(g->buckets);
	free(g->products);
	pthread_cond_destroy(&g->unit_done);
	pthread_cond_destroy(&g->work_ready);
	pthread_mutex_destroy(&g->lock);
	free(g);
}

static int engine_alloc(const sf_engine_config *cfg, sf_engine *g, sf_err *e)
{
	g->threads = thread_count(cfg->threads);
	g->max_products = cfg->max_products ? cfg->max_products : DEFAULT_MAX_PRODUCTS;
	g->prefetch_cap = PREFETCH_QUEUE_PER_THREAD * g->threads;
	g->prefetch_workers = g->threads - g->threads / 4;
	g->mem_bytes = cfg->mem_bytes;
	g->cache = cfg->cache;
	g->bucket_count = MIN_BUCKETS;
	g->buckets = calloc(g->bucket_count, sizeof *g->buckets);
	g->products = calloc(g->max_products, sizeof *g->products);
	g->workers = calloc(g->threads, sizeof *g->workers);
	if (!g->buckets || !g->products || !g->workers)
		return sf_fail(e, SF_ENOMEM, "engine: out of memory for %u workers", g->threads);
	for (unsigned i = 0; i < g->threads; i++) {
		struct worker *w = &g->workers[i];

		w->engine = g;
		w->states = calloc(g->max_products, sizeof *w->states);
		w->started = calloc(g->max_products, sizeof *w->started);
		w->last_use = calloc(g->max_products, sizeof *w->last_use);
		w->busy = calloc(g->max_products, sizeof *w->busy);
		if (!w->states || !w->started || !w->last_use || !w->busy)
			return sf_fail(e, SF_ENOMEM, "engine: out of memory for worker %u", i);
	}
	return SF_OK;
}

int sf_engine_create(const sf_engine_config *cfg, sf_engine **out, sf_err *e)
{
	sf_engine *g;
	unsigned running = 0;
	int rc;

	*out = NULL;
	g = calloc(1, sizeof *g);
	if (!g)
		return sf_fail(e, SF_ENOMEM, "engine: out of memory");
	pthread_mutex_init(&g->lock, NULL);
	pthread_cond_init(&g->work_ready, NULL);
	pthread_cond_init(&g->unit_done, NULL);
	rc = engine_alloc(cfg, g, e);
	while (rc == SF_OK && running < g->threads) {
		int err = pthread_create(&g->workers[running].thread, NULL, worker_main,
		                         &g->workers[running]);
		if (err)
			rc = sf_fail(e, SF_ENOMEM, "engine: cannot start worker %u of %u: %s",
			             running + 1, g->threads, strerror(err));
		else
			running++;
	}
	if (rc != SF_OK) {
		engine_free(g, running);
		return rc;
	}
	*out = g;
	return SF_OK;
}

/* No lock: the product list is fixed once workers run (sf_engine_add_product
 * is called only at mount), and this may run in a signal handler. */
void sf_engine_stop_products(sf_engine *g)
{
	for (unsigned s = 0; s < g->product_count; s++)
		if (g->products[s]->ops->stop)
			g->products[s]->ops->stop(g->products[s]);
}

void sf_engine_destroy(sf_engine *g)
{
	if (g)
		engine_free(g, g->threads);
}

unsigned sf_engine_threads(const sf_engine *g)
{
	return g->threads;
}

int sf_engine_add_product(sf_engine *g, sf_product *p, sf_err *e)
{
	int rc = SF_OK;

	pthread_mutex_lock(&g->lock);
	if (g->product_count == g->max_products)
		rc = sf_fail(e, SF_ERANGE, "%s: engine holds at most %u products", p->name,
		             g->max_products);
	else {
		p->slot = g->product_count;
		g->products[g->product_count++] = p;
	}
	pthread_mutex_unlock(&g->lock);
	if (rc == SF_OK && p->ops->warm)
		p->ops->warm(p);
	return rc;
}

/* ---- reads and prefetches ---------------------------------------------- */

static bool product_known(sf_engine *g, const sf_product *p)
{
	return p->slot < g->product_count && g->products[p->slot] == p;
}

/* A new QUEUED entry for (p, unit), in the table and on the read or the
 * prefetch queue; NULL when out of memory. */
static struct unit_entry *enqueue_unit(sf_engine *g, sf_product *p, uint64_t unit, size_t bytes,
                                       bool prefetch)
{
	struct unit_entry *u = calloc(1, sizeof *u);

	if (!u)
		return NULL;
	u->product = p;
	u->unit = unit;
	u->bytes = bytes;
	u->state = UNIT_QUEUED;
	u->on_prefetch_queue = prefetch;
	table_insert(g, u);
	list_push_tail(prefetch ? &g->prefetch_queue : &g->read_queue, u);
	g->stats.in_flight++;
	pthread_cond_signal(&g->work_ready);
	return u;
}

/* A nested read on a worker thread: take the queued unit u off its queue and
 * make it here, now (see "Nested reads" above).  Called and returns with the
 * lock; u is pinned by the caller and READY or FAILED on return. */
static void make_inline(sf_engine *g, struct unit_entry *u)
{
	struct unit_entry *graveyard = NULL;

	if (u->on_prefetch_queue) {
		list_remove(&g->prefetch_queue, u);
		u->on_prefetch_queue = false;
	} else
		list_remove(&g->read_queue, u);
	claim_unit(g, u, &graveyard);
	pthread_mutex_unlock(&g->lock);
	graveyard_free(graveyard);
	work_on(current_worker, u, false);
	pthread_mutex_lock(&g->lock);
}

/* The entry for a read of (p, unit), pinned, READY or FAILED.  With the lock. */
static int await_unit(sf_engine *g, sf_product *p, uint64_t unit, size_t bytes,
                      struct unit_entry **out, sf_err *e)
{
	struct unit_entry *u = table_find(g, p, unit);

	if (u && u->state == UNIT_READY) {
		g->stats.ram_hits++;
		list_remove(&g->lru, u);
		list_push_tail(&g->lru, u);
	} else {
		g->stats.ram_misses++;
		if (!u) {
			u = enqueue_unit(g, p, unit, bytes, false);
			if (!u)
				return sf_fail(e, SF_ENOMEM, "%s: unit %" PRIu64 ": out of memory",
				               p->name, unit);
		} else if (u->state == UNIT_QUEUED && u->on_prefetch_queue) {
			/* a reader waits now: it jumps the read-ahead */
			list_remove(&g->prefetch_queue, u);
			u->on_prefetch_queue = false;
			list_push_tail(&g->read_queue, u);
			pthread_cond_signal(&g->work_ready);
		}
	}
	u->pins++;
	if (u->state == UNIT_QUEUED && current_worker && current_worker->engine == g)
		make_inline(g, u);
	while (u->state == UNIT_QUEUED || u->state == UNIT_COMPUTING)
		pthread_cond_wait(&g->unit_done, &g->lock);
	*out = u;
	return SF_OK;
}

static int check_read(sf_engine *g, const sf_product *p, uint64_t unit, size_t off, size_t len,
                      size_t *bytes, sf_err *e)
{
	bool known;

	pthread_mutex_lock(&g->lock);
	known = product_known(g, p);
	pthread_mutex_unlock(&g->lock);
	if (!known)
		return sf_fail(e, SF_EINVAL, "%s: product not registered with the engine", p->name);
	if (unit >= p->unit_count)
		return sf_fail(e, SF_ERANGE, "%s: unit %" PRIu64 " past the last (%" PRIu64 ")",
		               p->name, unit, p->unit_count);
	*bytes = p->ops->unit_bytes(p, unit);
	if (off > *bytes || len > *bytes - off)
		return sf_fail(e, SF_ERANGE,
		               "%s: unit %" PRIu64 ": bytes [%zu, +%zu) past its size %zu", p->name,
		               unit, off, len, *bytes);
	return SF_OK;
}

int sf_engine_read(sf_engine *g, sf_product *p, uint64_t unit, size_t off, size_t len, uint8_t *dst,
                   sf_err *e)
{
	struct unit_entry *u = NULL, *graveyard = NULL;
	size_t bytes = 0;
	int rc;

	rc = check_read(g, p, unit, off, len, &bytes, e);
	if (rc != SF_OK || len == 0)
		return rc;

	pthread_mutex_lock(&g->lock);
	rc = await_unit(g, p, unit, bytes, &u, e);
	if (rc != SF_OK) {
		pthread_mutex_unlock(&g->lock);
		return rc;
	}
	if (u->state == UNIT_FAILED) {
		if (e)
			*e = u->err;
		rc = u->err.code;
	} else {
		/* pinned: the bytes stay while we copy without the lock */
		pthread_mutex_unlock(&g->lock);
		memcpy(dst, u->buf + off, len);
		pthread_mutex_lock(&g->lock);
		g->stats.served++;
	}
	entry_unpin(g, u, &graveyard);
	pthread_mutex_unlock(&g->lock);
	graveyard_free(graveyard);
	return rc;
}

void sf_engine_prefetch(sf_engine *g, sf_product *p, uint64_t unit)
{
	size_t bytes;

	if (unit >= p->unit_count)
		return;
	bytes = p->ops->unit_bytes(p, unit);
	pthread_mutex_lock(&g->lock);
	if (!g->stop && product_known(g, p) && !table_find(g, p, unit) &&
	    g->prefetch_queue.len < g->prefetch_cap && enqueue_unit(g, p, unit, bytes, true))
		g->stats.prefetched++;
	pthread_mutex_unlock(&g->lock);
}

void sf_engine_stats_get(sf_engine *g, sf_engine_stats *out)
{
	pthread_mutex_lock(&g->lock);
	*out = g->stats;
	pthread_mutex_unlock(&g->lock);
}

unsigned sf_engine_recent_errors(sf_engine *g, sf_engine_error *out, unsigned cap)
{
	struct recent_error sorted[SF_ENGINE_RECENT_ERRORS];
	unsigned n;

	pthread_mutex_lock(&g->lock);
	n = g->recent_count;
	memcpy(sorted, g->recent, n * sizeof *sorted);
	pthread_mutex_unlock(&g->lock);
	/* newest (largest seq) first: insertion sort of at most 8 */
	for (unsigned i = 1; i < n; i++) {
		struct recent_error r = sorted[i];
		unsigned j = i;

		for (; j > 0 && sorted[j - 1].seq < r.seq; j--)
			sorted[j] = sorted[j - 1];
		sorted[j] = r;
	}
	if (n > cap)
		n = cap;
	for (unsigned i = 0; i < n; i++)
		out[i] = sorted[i].err;
	return n;
}

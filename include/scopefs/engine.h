/* engine.h — the tile engine: units computed once, on a fixed pool, cached.
 *
 * Reading unit u of product p returns its bytes from, in order: the RAM LRU
 * (decoded units, bounded by mem_bytes), the disk cache, or a computation on
 * a worker.  The lifecycle of a unit in RAM is
 *
 *     absent --request--> queued --worker--> computing --> ready --evict--> absent
 *                                                     \--> failed (waiters get the error;
 *                                                          the slot is dropped so a
 *                                                          later read retries)
 *
 * under one mutex; concurrent readers of a queued/computing unit wait on its
 * condition variable, so every unit is computed once.  Reads are served first;
 * prefetches (read-ahead of sequential readers) run only when no read waits.
 * The bytes are the same whatever the access order, thread count or cache
 * state, because products are pure functions of (key, unit).
 *
 * Memory: decoded units being computed or held count against mem_bytes;
 * least-recently-used units nobody is copying from are evicted past it.  Units
 * being computed, written to disk or copied out may hold it above the bound by
 * at most one unit per worker and per concurrent reader.
 * Disk: unit u of product p is stored under sf_key_mix_u64(p->key, u); it is
 * written after waiters are woken, so readers never wait on the disk write.
 * A failed disk cache read or write is logged and otherwise ignored.
 * Prefetches: at most 4 per worker wait in their queue (more are dropped),
 * and at most threads - threads/4 workers compute them at once.
 * Nested reads: a product's compute may call sf_engine_read for units of
 * another product of the same engine (deconvolved strips read deconvolved
 * blocks).  Such a read, issued on a worker thread, makes an absent or
 * queued unit inline on that thread (with that worker's state for the other
 * product) instead of queueing it, and waits only when another worker is
 * already computing it; so a pool whose every worker reads nested units never
 * deadlocks.  A product must not read its own units, and nested reads must
 * not form a cycle. */
#ifndef SCOPEFS_ENGINE_H
#define SCOPEFS_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "scopefs/cache.h"
#include "scopefs/err.h"
#include "scopefs/product.h"

typedef struct sf_engine sf_engine;

typedef struct sf_engine_config {
	unsigned threads;   /* workers; 0: one per online CPU */
	uint64_t mem_bytes; /* bound on decoded units held in RAM (>= one unit is always allowed) */
	sf_cache *cache;    /* disk cache, or NULL for none */
	unsigned max_products; /* how many products may be added; 0: 256 */
} sf_engine_config;

typedef struct sf_engine_stats {
	uint64_t served;   /* unit reads answered with bytes (empty reads not counted) */
	uint64_t computed; /* units computed by a product (successfully) */
	uint64_t ram_hits, ram_misses;   /* per non-empty read: ready in RAM or not */
	uint64_t disk_hits, disk_misses; /* per unit made, when there is a cache */
	uint64_t in_flight;              /* units queued or computing now */
	uint64_t errors;                 /* failed computations */
	uint64_t ram_bytes;              /* bytes of units held in RAM now */
	uint64_t prefetched;             /* prefetch requests accepted */
	uint64_t cache_write_ns;         /* worker time in disk cache writes (compress + write) */
} sf_engine_stats;

int sf_engine_create(const sf_engine_config *cfg, sf_engine **out, sf_err *e);
/* Stops the workers (pending prefetches are dropped; a unit being computed is
 * asked to end early, sf_engine_stop_products, and awaited), runs worker_stop for every state made
 * (on the calling thread, after the workers are joined), frees the RAM cache.  No read may be in
 * progress.  Products are not destroyed. */
void sf_engine_destroy(sf_engine *g);

/* Ask every product's computations in progress to end early (product.h's
 * stop), as sf_engine_destroy does before it waits for the workers.  For a
 * shutdown signal: it only calls the stop functions, which only store to
 * lock-free atomics, so it is async-signal-safe. */
void sf_engine_stop_products(sf_engine *g);

/* Register p (sets p->slot) and call its warm op.  Thread-safe; p must
 * outlive the engine. */
int sf_engine_add_product(sf_engine *g, sf_product *p, sf_err *e);

/* Copy bytes [off, off+len) of unit `unit` of p into dst, computing the unit
 * if needed; blocks until then.  SF_ERANGE if unit >= unit_count or off+len
 * passes the unit's size, SF_EINVAL if p was not added; otherwise the code
 * and message of the failed computation (every reader waiting for that
 * computation gets them; the next read of the unit computes it again). */
int sf_engine_read(sf_engine *g, sf_product *p, uint64_t unit, size_t off, size_t len, uint8_t *dst,
                   sf_err *e);

/* Schedule unit to be made ready (RAM and disk) without waiting; ignored if
 * it is already there, queued, or the prefetch queue is full. */
void sf_engine_prefetch(sf_engine *g, sf_product *p, uint64_t unit);

void sf_engine_stats_get(sf_engine *g, sf_engine_stats *out);

/* The latest failures (computations, disk cache writes), newest first: a
 * daemon's stderr is /dev/null, so .scopefs/status shows them.  The same
 * message again bumps count and time instead of taking another entry. */
#define SF_ENGINE_RECENT_ERRORS 8
typedef struct sf_engine_error {
	int64_t time_s; /* wall clock (time()) of the last occurrence */
	uint64_t count; /* occurrences since the first, in a row or not */
	char msg[sizeof(((sf_err *)0)->msg)];
} sf_engine_error;
unsigned sf_engine_recent_errors(sf_engine *g, sf_engine_error *out, unsigned cap);
/* Add "source: msg" to them, for a failure outside the engine (a raw file
 * that changed under the mount). */
void sf_engine_note_error(sf_engine *g, const char *source, const char *msg);

/* Number of workers actually running. */
unsigned sf_engine_threads(const sf_engine *g);

#endif

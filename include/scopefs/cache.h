/* cache.h — the disk cache: LZ4 entries keyed by sf_key, bounded, shared.
 *
 * Contract:
 *  - An entry is one file DIR/ab/<32 hex>.sfc holding a header (magic,
 *    version, key, raw size, encoded size, elem_bytes, XXH64 of the raw bytes)
 *    and the sf_block_encode()d payload.  docs/cache-format.md is the spec.
 *  - put writes a uniquely named temporary file in the same folder and renames
 *    it into place: a reader sees a whole entry or none, even after kill -9,
 *    and two mounts (or machines on a shared filesystem) may use one DIR at
 *    once.  There is no fsync: after a power loss the checksum catches a torn
 *    entry, which is then recomputed.
 *  - get verifies magic, key, sizes and checksum; a bad entry is deleted,
 *    logged, counted and reported as a miss (SF_ENOTFOUND): never served.
 *  - Total bytes are bounded by max_bytes: least-recently-used entries
 *    (mtime, bumped on every hit) are evicted when a put passes the bound.
 *    Entries unlink refuses (EPERM, EACCES) are logged once and no longer
 *    count against the bound in this cache's lifetime.
 *  - A put failing with ENOSPC/EDQUOT evicts least-recently-used entries to
 *    make room and retries once; a put whose folder was removed (st_nlink 0)
 *    opens DIR again by its path, as open does, and retries once.
 *  - Entry and version files are opened O_NONBLOCK and must be regular
 *    files: a FIFO or device there is refused, never waited on.
 *  - All functions are safe to call from many threads at once. */
#ifndef SCOPEFS_CACHE_H
#define SCOPEFS_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "scopefs/err.h"
#include "scopefs/key.h"

typedef struct sf_cache sf_cache;

typedef struct sf_cache_stats {
	uint64_t bytes;                 /* bytes of entries on disk (this mount's view) */
	uint64_t entries;               /* entries on disk (this mount's view) */
	uint64_t hits;                  /* gets that returned data */
	uint64_t misses;                /* gets that found nothing usable */
	uint64_t corrupt;               /* entries found bad and dropped */
	uint64_t evicted;               /* entries removed to respect max_bytes */
	uint64_t written;               /* entries written */
	uint64_t raw_bytes_written;     /* uncompressed bytes of those entries */
	uint64_t encoded_bytes_written; /* their encoded size (ratio = raw/encoded) */
} sf_cache_stats;

/* Open (creating if needed) the cache folder dir, bounded by max_bytes
 * (0: unbounded).  Scans existing entries to learn the current size. */
int sf_cache_open(const char *dir, uint64_t max_bytes, sf_cache **out, sf_err *e);
void sf_cache_close(sf_cache *c);

/* Copy the entry for k, which must decode to exactly n bytes, into dst.
 * SF_OK on a hit, SF_ENOTFOUND on a miss or a dropped bad entry, another
 * code only for a failure that is not the entry's fault. */
int sf_cache_get(sf_cache *c, sf_key k, uint8_t *dst, size_t n, sf_err *e);

/* Store n bytes of src under k (elem_bytes: shuffle width, 1, 2 or 4). */
int sf_cache_put(sf_cache *c, sf_key k, const uint8_t *src, size_t n, unsigned elem_bytes,
                 sf_err *e);

/* After a failed put: nonzero when the failure has a cause every later put
 * shares: the file system full even after making room, a folder that
 * refuses writes (EROFS, EACCES, EPERM), an entry larger than the bound
 * (SF_ERANGE).  Its message then names DIR and the cause (not the entry),
 * so repeats are one message; the cache logs these itself, first and then
 * at most once a minute, so the caller should record, not log, it. */
int sf_cache_failure_logged(const sf_cache *c, const sf_err *e);

void sf_cache_stats_get(sf_cache *c, sf_cache_stats *out);

/* The folder of the cache (for status and for files such as FFTW wisdom). */
const char *sf_cache_dir(const sf_cache *c);

#endif

/* cache.c — the disk cache: one LZ4 entry file per sf_key under DIR/ab/, LRU-bounded.
 *
 * docs/cache-format.md is the byte-level spec.  Invariants:
 *  1. An entry DIR/ab/<32 hex>.sfc appears only by rename() of a temporary
 *     DIR/ab/.tmp.* that was completely written and closed: readers (this
 *     process or another mount) see a whole entry or none, even after kill -9.
 *  2. Entry files are never modified in place, only replaced (rename) or removed
 *     (unlink); a reader holding an fd keeps reading one consistent version
 *     even while another thread or mount evicts it.  Only the mtime changes: it
 *     is the LRU clock.
 *  3. get hands out bytes only after magic, version, header checksum, key,
 *     sizes and the XXH64 of the decoded bytes all match; any other entry is
 *     unlinked (if the file is still the one read), logged and counted.
 *  4. This module removes only names it makes: <32 hex>.sfc and .tmp.* inside
 *     two-hex-digit folders of DIR, and .SCOPEFS_CACHE.tmp.* in DIR.  It
 *     creates nothing outside DIR (DIR itself only if its parent exists).
 *  5. bytes/entries in the stats are this mount's view: the last scan of DIR
 *     (at open and at every eviction, which also sees other mounts' entries)
 *     plus this mount's puts since, minus what it removed.  A put that
 *     replaces an entry still adds its full size, so the view errs high
 *     (triggering an early rescan) rather than low; other mounts' writes since
 *     the last scan are the one thing it cannot see.  Entries unlink refused
 *     (c->stuck) stay in bytes but not in what the bound is applied to.
 *  6. Nothing here blocks on a file that is not regular: entry and version
 *     files are opened O_NONBLOCK and checked with fstat before reading.
 *
 * Locking: c->lock guards the counters, the evicting flag, the stuck list and
 * the full-disk log state, and is never held across I/O.  One thread at a
 * time evicts (the evicting flag); the others carry on writing and reading
 * meanwhile, except a put the file system refused for room, which waits for
 * that eviction (c->evicted) and writes again.  c->reopen_lock serialises dir_reopen and is held
 * across its I/O (it only runs after DIR was removed).  sf_cache_close must not race any other call
 * on the same cache. */
#include "scopefs/cache.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <xxhash.h>

#include "scopefs/blockcodec.h"
#include "scopefs/log.h"

#define FORMAT_VERSION   1u
#define ENTRY_MAGIC      "SFCENTRY"
#define HEADER_BYTES     64
#define VERSION_FILE     "SCOPEFS_CACHE"
#define VERSION_TMP      ".SCOPEFS_CACHE.tmp."
#define VERSION_FMT      "scopefs cache format %u\n"
#define TMP_PREFIX       ".tmp."
#define ENTRY_SUFFIX     ".sfc"
#define STALE_TMP_S      300        /* a temp file this old belongs to a dead writer */
#define BUMP_MIN_AGE_S   10         /* hits on an entry younger than this skip the mtime write */
#define EVICT_TARGET_PCT 90         /* eviction stops at this share of max_bytes */
#define EVICT_ROUNDS     4          /* scans one put may run while still over the bound */
#define REL_MAX          128        /* "ab/<name>" relative paths; our names are shorter */
#define SCRATCH_SLOTS    8          /* encode/decode buffers kept for reuse (see scratch_take) */
#define SCRATCH_MAX      (5u << 20) /* larger buffers are freed, not kept */
#define FULL_LOG_S       60         /* a full file system is logged at most once per this */
#define ROOM_RETRY_S     10         /* after an eviction for room freed nothing, wait this long */
#define ROOM_PCT         10         /* an eviction for room frees at least this share of DIR */
#define ROOM_TRIES       4          /* writes again after making room, at most */
#define STUCK_MAX        (1u << 20) /* unremovable entries remembered (40 bytes each) */
/* Failures the cache reports itself, throttled (refusal_report): every
 * message is "DIR" REFUSAL_MSG "<what>: ...", naming no entry. */
#define REFUSAL_MSG ": disk cache "

/* A buffer lent by the cache's scratch pool. */
struct scratch {
	uint8_t *p;
	size_t cap;
};

struct sf_cache {
	char *dir;                   /* the folder as given, for messages */
	int dirfd;                   /* the folder itself: immune to chdir and renames above it;
	                              * a removed DIR made again is dup3()ed onto this number */
	pthread_mutex_t reopen_lock; /* serialises dir_reopen (held across its I/O) and
	                              * guards reopen_failed_at */
	time_t reopen_failed_at;     /* last failed dir_reopen (monotonic s), 0: none */
	uint64_t max_bytes;          /* 0: unbounded */
	uint64_t nonce;              /* random per open: temp names unique across hosts */
	pthread_mutex_t lock;        /* guards everything below */
	uint64_t tmp_seq;            /* temp-name counter */
	uint64_t put_total;          /* file bytes this mount has ever written */
	uint64_t put_count;          /* entries this mount has ever written */
	int evicting;                /* one evictor at a time */
	pthread_cond_t evicted;      /* broadcast when an eviction ends (evicting back to 0) */
	sf_cache_stats st;           /* counters; bytes/entries are the view of invariant 5 */
	struct scratch spare[SCRATCH_SLOTS]; /* idle buffers of the scratch pool */
	unsigned nspare;
	char (*stuck)[40]; /* sorted rels of entries unlink refused: never evicted again */
	size_t nstuck, stuck_cap;
	uint64_t stuck_bytes;  /* their size, as of the last scan plus later failures */
	int stuck_logged;      /* the one "cannot remove" line was written */
	int full_logged;       /* a full file system was logged at full_logged_at */
	time_t full_logged_at; /* CLOCK_MONOTONIC seconds */
	uint64_t full_since;   /* failed puts since that line */
	time_t room_futile_at; /* last eviction for room that freed nothing (monotonic s) */
	int room_futile;       /* that eviction freed nothing: skip make_room for ROOM_RETRY_S */
};

/* One entry seen by a scan, for eviction ordering. */
struct scanned_entry {
	struct timespec mtime;
	uint64_t size;
	char rel[40]; /* "ab/<32 hex>.sfc" */
};

struct scan_result {
	uint64_t bytes, entries;
	struct scanned_entry *list; /* NULL unless asked for */
	size_t n, cap;
};

/* ---- little-endian header fields ---- */

static void put_le32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static void put_le64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_le32(const uint8_t *p)
{
	uint32_t v = 0;
	for (int i = 3; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

static uint64_t get_le64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

/* The header as stored: offsets are the spec's (docs/cache-format.md). */
struct entry_header {
	uint32_t version, elem_bytes;
	sf_key key;
	uint64_t raw_size, enc_size, raw_hash;
};

static void header_write(uint8_t *h, const struct entry_header *eh)
{
	memcpy(h, ENTRY_MAGIC, 8);
	put_le32(h + 8, eh->version);
	put_le32(h + 12, eh->elem_bytes);
	put_le64(h + 16, eh->key.hi);
	put_le64(h + 24, eh->key.lo);
	put_le64(h + 32, eh->raw_size);
	put_le64(h + 40, eh->enc_size);
	put_le64(h + 48, eh->raw_hash);
	put_le64(h + 56, XXH64(h, 56, 0));
}

/* NULL if the header is sound, else why not. */
static const char *header_read(const uint8_t *h, struct entry_header *eh)
{
	if (memcmp(h, ENTRY_MAGIC, 8) != 0)
		return "bad magic";
	if (get_le64(h + 56) != XXH64(h, 56, 0))
		return "header checksum mismatch";
	eh->version = get_le32(h + 8);
	eh->elem_bytes = get_le32(h + 12);
	eh->key.hi = get_le64(h + 16);
	eh->key.lo = get_le64(h + 24);
	eh->raw_size = get_le64(h + 32);
	eh->enc_size = get_le64(h + 40);
	eh->raw_hash = get_le64(h + 48);
	if (eh->version != FORMAT_VERSION)
		return "unknown entry format version";
	if (eh->elem_bytes != 1 && eh->elem_bytes != 2 && eh->elem_bytes != 4)
		return "bad elem_bytes";
	return NULL;
}

/* ---- names ---- */

static int is_hex_lower(char ch)
{
	return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f');
}

static int is_fanout_name(const char *s)
{
	return is_hex_lower(s[0]) && is_hex_lower(s[1]) && s[2] == '\0';
}

static int is_entry_name(const char *s)
{
	for (int i = 0; i < 32; i++)
		if (!is_hex_lower(s[i]))
			return 0;
	return strcmp(s + 32, ENTRY_SUFFIX) == 0;
}

static void entry_rel(sf_key k, char rel[40])
{
	char hex[33];

	sf_key_hex(k, hex);
	snprintf(rel, 40, "%.2s/%s" ENTRY_SUFFIX, hex, hex);
}

/* ---- small I/O helpers ---- */

static int read_all(int fd, uint8_t *buf, size_t n)
{
	size_t done = 0;

	while (done < n) {
		ssize_t got = read(fd, buf + done, n - done);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0)
			return -1;
		if (got == 0)
			break;
		done += (size_t)got;
	}
	return done == n ? 0 : 1;
}

static int write_all(int fd, const uint8_t *buf, size_t n)
{
	size_t done = 0;

	while (done < n) {
		ssize_t put = write(fd, buf + done, n - done);
		if (put < 0 && errno == EINTR)
			continue;
		if (put <= 0)
			return -1;
		done += (size_t)put;
	}
	return 0;
}

static int older_than(const struct timespec *t, time_t age_s)
{
	struct timespec now;

	clock_gettime(CLOCK_REALTIME, &now);
	return now.tv_sec - t->tv_sec >= age_s;
}

static int timespec_cmp(const struct timespec *a, const struct timespec *b)
{
	if (a->tv_sec != b->tv_sec)
		return a->tv_sec < b->tv_sec ? -1 : 1;
	if (a->tv_nsec != b->tv_nsec)
		return a->tv_nsec < b->tv_nsec ? -1 : 1;
	return 0;
}

static uint64_t sub_floor0(uint64_t a, uint64_t b)
{
	return a > b ? a - b : 0;
}

/* ---- the version file ---- */

/* Publish DIR/SCOPEFS_CACHE without ever showing a partial one: write a
 * private temp file and link() it into place, which (unlike rename) never
 * replaces a version file another scopefs wrote first. */
static void version_file_create(sf_cache *c)
{
	char tmp[96], text[64];
	int fd, len;

	snprintf(tmp, sizeof tmp, VERSION_TMP "%ld.%016llx", (long)getpid(),
	         (unsigned long long)c->nonce);
	len = snprintf(text, sizeof text, VERSION_FMT, FORMAT_VERSION);
	fd = openat(c->dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (fd < 0)
		return; /* the read that follows reports the problem */
	if (write_all(fd, (const uint8_t *)text, (size_t)len) == 0 && close(fd) == 0) {
		/* Filesystems without hard links get rename, which may clobber. */
		if (linkat(c->dirfd, tmp, c->dirfd, VERSION_FILE, 0) != 0 && errno != EEXIST)
			if (renameat(c->dirfd, tmp, c->dirfd, VERSION_FILE) == 0)
				return;
	} else {
		close(fd);
	}
	unlinkat(c->dirfd, tmp, 0);
}

/* The format number if text is exactly "scopefs cache format <n>\n" with n
 * a plain decimal (no sign, leading zero, fraction or trailing bytes), else -1. */
static long version_parse(const char *text, size_t len)
{
	const char *prefix = "scopefs cache format ";
	size_t plen = strlen(prefix), i = plen;
	long v = 0;

	if (len < plen + 2 || memcmp(text, prefix, plen) != 0 || text[len - 1] != '\n')
		return -1;
	if (text[i] == '0' && i + 2 != len)
		return -1;
	for (; i < len - 1; i++) {
		if (text[i] < '0' || text[i] > '9' || i - plen >= 9)
			return -1;
		v = v * 10 + (text[i] - '0');
	}
	return v;
}

/* Read DIR/SCOPEFS_CACHE into text (at most cap - 1 bytes, NUL-ended).  O_NONBLOCK
 * so that a FIFO there cannot hang the mount; only a regular file is read.
 * The byte count, or -1 with errno set (EINVAL: not a regular file). */
static ssize_t version_file_read(sf_cache *c, char *text, size_t cap)
{
	struct stat st;
	size_t got = 0;
	int fd;

	fd = openat(c->dirfd, VERSION_FILE, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
	if (fd < 0 && errno == ENOENT) {
		version_file_create(c);
		fd = openat(c->dirfd, VERSION_FILE, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
	}
	if (fd < 0)
		return -1;
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
		close(fd);
		errno = EINVAL;
		return -1;
	}
	/* Read up to cap - 1 bytes: more than a valid file holds, to see junk. */
	while (got < cap - 1) {
		ssize_t n = read(fd, text + got, cap - 1 - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			int err = errno;
			close(fd);
			errno = err;
			return -1;
		}
		if (n == 0)
			break;
		got += (size_t)n;
	}
	close(fd);
	text[got] = '\0';
	return (ssize_t)got;
}

/* The version file must hold exactly the line this scopefs writes. */
static int version_file_check(sf_cache *c, sf_err *e)
{
	char text[64], want[64];
	ssize_t got;
	long version;
	int wlen;

	got = version_file_read(c, text, sizeof text);
	if (got < 0 && errno == EINVAL)
		return sf_fail(e, SF_EFORMAT,
		               "%s/" VERSION_FILE ": not a regular file; "
		               "point the cache at another folder",
		               c->dir);
	if (got < 0)
		return sf_fail(e, SF_EIO, "%s/" VERSION_FILE ": cannot read cache version file: %s",
		               c->dir, strerror(errno));
	wlen = snprintf(want, sizeof want, VERSION_FMT, FORMAT_VERSION);
	if (got == wlen && memcmp(text, want, (size_t)wlen) == 0)
		return SF_OK;
	version = version_parse(text, (size_t)got);
	if (version < 0 || version == FORMAT_VERSION)
		return sf_fail(e, SF_EFORMAT,
		               "%s/" VERSION_FILE ": not a scopefs cache version file; "
		               "point the cache at another folder",
		               c->dir);
	return sf_fail(e, SF_EFORMAT,
	               "%s: cache format %ld, but this scopefs uses format %u; "
	               "point the cache at another folder or empty this one",
	               c->dir, version, FORMAT_VERSION);
}

/* ---- scanning ---- */

static int scan_append(struct scan_result *r, const char *fanout, const char *name,
                       const struct stat *st)
{
	struct scanned_entry *se;

	if (r->n == r->cap) {
		size_t cap = r->cap ? 2 * r->cap : 1024;
		struct scanned_entry *grown = realloc(r->list, cap * sizeof *grown);
		if (!grown)
			return -1;
		r->list = grown;
		r->cap = cap;
	}
	se = &r->list[r->n++];
	se->mtime = st->st_mtim;
	se->size = (uint64_t)st->st_size;
	snprintf(se->rel, sizeof se->rel, "%.2s/%.36s", fanout, name);
	return 0;
}

/* Sum the entries of one fan-out folder, remove stale temp files, and list
 * the entries when r->list is wanted (want_list). */
static int scan_fanout(sf_cache *c, const char *fanout, struct scan_result *r, int want_list)
{
	struct dirent *de;
	struct stat st;
	DIR *d;
	int fd;

	fd = openat(c->dirfd, fanout, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? 0 : -1;
	d = fdopendir(fd);
	if (!d) {
		close(fd);
		return -1;
	}
	while ((de = readdir(d)) != NULL) {
		int is_entry = is_entry_name(de->d_name);
		int is_tmp = strncmp(de->d_name, TMP_PREFIX, strlen(TMP_PREFIX)) == 0;

		if (!is_entry && !is_tmp)
			continue;
		if (fstatat(fd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode))
			continue; /* gone meanwhile (evicted by another mount), or not ours */
		if (is_tmp) {
			if (older_than(&st.st_mtim, STALE_TMP_S))
				unlinkat(fd, de->d_name, 0);
			continue;
		}
		r->bytes += (uint64_t)st.st_size;
		r->entries++;
		if (want_list && scan_append(r, fanout, de->d_name, &st) != 0) {
			closedir(d);
			return -1;
		}
	}
	closedir(d);
	return 0;
}

/* Walk DIR: entry totals, stale temp removal, optionally the entry list. */
static int scan_dir(sf_cache *c, struct scan_result *r, int want_list, sf_err *e)
{
	struct dirent *de;
	struct stat st;
	DIR *d;
	int fd;

	memset(r, 0, sizeof *r);
	fd = openat(c->dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0 || !(d = fdopendir(fd))) {
		if (fd >= 0)
			close(fd);
		return sf_fail(e, SF_EIO, "%s: cannot list cache folder: %s", c->dir,
		               strerror(errno));
	}
	while ((de = readdir(d)) != NULL) {
		if (strncmp(de->d_name, VERSION_TMP, strlen(VERSION_TMP)) == 0) {
			if (fstatat(fd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
			    older_than(&st.st_mtim, STALE_TMP_S))
				unlinkat(fd, de->d_name, 0);
			continue;
		}
		if (!is_fanout_name(de->d_name))
			continue;
		if (scan_fanout(c, de->d_name, r, want_list) != 0) {
			int err = errno;
			closedir(d);
			free(r->list);
			r->list = NULL;
			return sf_fail(e, err == ENOMEM ? SF_ENOMEM : SF_EIO,
			               "%s/%s: cannot scan cache folder: %s", c->dir, de->d_name,
			               strerror(err));
		}
	}
	closedir(d);
	return SF_OK;
}

/* ---- eviction ---- */

static int by_mtime(const void *a, const void *b)
{
	const struct scanned_entry *x = a, *y = b;
	return timespec_cmp(&x->mtime, &y->mtime);
}

static int by_rel(const void *a, const void *b)
{
	return strcmp(a, b);
}

static time_t now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec;
}

/* With c->lock: whether unlink already refused rel in this mount. */
static int stuck_has(const sf_cache *c, const char *rel)
{
	return c->nstuck && bsearch(rel, c->stuck, c->nstuck, sizeof *c->stuck, by_rel) != NULL;
}

/* With c->lock: remember rel as unremovable (kept sorted; past STUCK_MAX or
 * out of memory it is simply tried again at a later eviction). */
static void stuck_add(sf_cache *c, const char *rel)
{
	size_t at = 0;

	if (stuck_has(c, rel) || c->nstuck >= STUCK_MAX)
		return;
	if (c->nstuck == c->stuck_cap) {
		size_t cap = c->stuck_cap ? 2 * c->stuck_cap : 64;
		char(*grown)[40] = realloc(c->stuck, cap * sizeof *grown);
		if (!grown)
			return;
		c->stuck = grown;
		c->stuck_cap = cap;
	}
	while (at < c->nstuck && strcmp(c->stuck[at], rel) < 0)
		at++;
	memmove(c->stuck + at + 1, c->stuck + at, (c->nstuck - at) * sizeof *c->stuck);
	snprintf(c->stuck[at], sizeof c->stuck[at], "%s", rel);
	c->nstuck++;
}

/* With c->lock: bytes the LRU can act on (the view minus unremovable entries). */
static uint64_t evictable_locked(const sf_cache *c)
{
	return sub_floor0(c->st.bytes, c->stuck_bytes);
}

static uint64_t evictable_bytes(sf_cache *c)
{
	uint64_t b;

	pthread_mutex_lock(&c->lock);
	b = evictable_locked(c);
	pthread_mutex_unlock(&c->lock);
	return b;
}

/* Remove one scanned entry unless it was used or replaced since the scan.
 * The errno when unlink refused it (it is then remembered as stuck), else 0. */
static int evict_one(sf_cache *c, const struct scanned_entry *se)
{
	struct stat st;
	int gone, err = 0;

	if (fstatat(c->dirfd, se->rel, &st, AT_SYMLINK_NOFOLLOW) == 0) {
		if (timespec_cmp(&st.st_mtim, &se->mtime) != 0)
			return 0; /* hit or rewritten after the scan: no longer the oldest */
		gone = unlinkat(c->dirfd, se->rel, 0) == 0 || errno == ENOENT;
		if (!gone)
			err = errno; /* EPERM/EACCES: another user's file, immutable, ... */
	} else {
		gone = errno == ENOENT; /* another mount evicted it first */
	}
	pthread_mutex_lock(&c->lock);
	if (gone) {
		c->st.bytes = sub_floor0(c->st.bytes, se->size);
		c->st.entries = sub_floor0(c->st.entries, 1);
		c->st.evicted++;
	} else if (err) {
		stuck_add(c, se->rel);
		c->stuck_bytes += se->size;
	}
	pthread_mutex_unlock(&c->lock);
	return err;
}

/* Drop the entries unlink refused before (their bytes become stuck_bytes)
 * and reset the view from scan r (invariant 5). */
static void scan_settle(sf_cache *c, struct scan_result *r, uint64_t total_at_start,
                        uint64_t count_at_start)
{
	size_t kept = 0;

	pthread_mutex_lock(&c->lock);
	c->stuck_bytes = 0;
	for (size_t i = 0; i < r->n; i++) {
		if (stuck_has(c, r->list[i].rel))
			c->stuck_bytes += r->list[i].size;
		else
			r->list[kept++] = r->list[i];
	}
	r->n = kept;
	/* Puts during the scan may or may not be in it: count them again, so the
	 * view errs high. */
	c->st.bytes = r->bytes + (c->put_total - total_at_start);
	c->st.entries = r->entries + (c->put_count - count_at_start);
	pthread_mutex_unlock(&c->lock);
}

/* Rescan DIR (which also counts other mounts' entries), then unlink entries
 * from the least recently used until the evictable bytes are at most the
 * target: EVICT_TARGET_PCT of the bound, or (room > 0, after a write failed
 * for lack of space) room bytes or ROOM_PCT of DIR fewer than the scan found,
 * whichever is more.  Entries unlink refuses are logged once per mount and
 * left out of later evictions.  The count evicted.  Called by at most one
 * thread at a time, with no lock held. */
static uint64_t evict(sf_cache *c, uint64_t room)
{
	uint64_t target, total_at_start, count_at_start, evicted0, freed, stuck_n = 0;
	struct scan_result r;
	int refused = 0, log_stuck;
	sf_err e;

	pthread_mutex_lock(&c->lock);
	total_at_start = c->put_total;
	count_at_start = c->put_count;
	evicted0 = c->st.evicted;
	pthread_mutex_unlock(&c->lock);
	if (scan_dir(c, &r, 1, &e) != SF_OK) {
		sf_log(SF_LOG_WARN, "cache: eviction skipped: %s", e.msg);
		return 0;
	}
	scan_settle(c, &r, total_at_start, count_at_start);
	if (room) {
		uint64_t have = evictable_bytes(c), want = have / 100 * ROOM_PCT;
		target = sub_floor0(have, want > room ? want : room);
	} else {
		target = c->max_bytes / 100 * EVICT_TARGET_PCT;
	}
	if (r.n)
		qsort(r.list, r.n, sizeof *r.list, by_mtime);
	for (size_t i = 0; i < r.n && evictable_bytes(c) > target; i++) {
		int err = evict_one(c, &r.list[i]);
		if (err) {
			refused = refused ? refused : err;
			stuck_n++;
		}
	}
	free(r.list);
	pthread_mutex_lock(&c->lock);
	log_stuck = refused && !c->stuck_logged;
	c->stuck_logged |= refused != 0;
	freed = c->st.evicted - evicted0;
	pthread_mutex_unlock(&c->lock);
	if (log_stuck)
		sf_log(SF_LOG_WARN,
		       "cache: %s: cannot remove %llu cache entries: %s; they stay, and no longer "
		       "count against the size bound in this mount (logged once)",
		       c->dir, (unsigned long long)stuck_n, strerror(refused));
	return freed;
}

/* After a put: evict if the evictable bytes passed the bound and nobody else
 * is evicting.  Eviction ends at 90% of the bound, so this scans once per
 * 10% of the bound written, also when some entries cannot be removed.
 * The evictor looks again before it hands the flag back, in the same
 * critical section: a put that found the flag taken (and so left eviction to
 * it) counted its bytes before, so it is seen; and entries read since the scan
 * are skipped by evict_one, which can leave the view over the bound.  Both
 * used to leave the cache over its bound until the next put.  At most
 * EVICT_ROUNDS scans per put, so that a put never evicts for ever while
 * others write. */
static void maybe_evict(sf_cache *c)
{
	int mine;

	if (!c->max_bytes)
		return;
	pthread_mutex_lock(&c->lock);
	mine = evictable_locked(c) > c->max_bytes && !c->evicting;
	if (mine)
		c->evicting = 1;
	pthread_mutex_unlock(&c->lock);
	for (int round = 0; mine; round++) {
		evict(c, 0);
		pthread_mutex_lock(&c->lock);
		mine = round + 1 < EVICT_ROUNDS && evictable_locked(c) > c->max_bytes;
		if (!mine) {
			c->evicting = 0;
			pthread_cond_broadcast(&c->evicted);
		}
		pthread_mutex_unlock(&c->lock);
	}
}

/* After a write failed with ENOSPC/EDQUOT: evict least recently used entries
 * to free at least size bytes (and ROOM_PCT of DIR, so that a full disk costs
 * one scan per 10% of the folder, like the bound).  1 if something was freed:
 * the caller writes again.  If another thread is evicting, wait for it and
 * say 1 unless it was a futile eviction for room: the unit it was computing
 * used to go uncached whenever two workers hit the full disk together.  0 at
 * once when an eviction for room freed nothing less than ROOM_RETRY_S ago
 * (the disk is full of other files). */
static int make_room(sf_cache *c, uint64_t size)
{
	uint64_t freed;
	int waited = 0;

	pthread_mutex_lock(&c->lock);
	while (c->evicting) {
		waited = 1;
		pthread_cond_wait(&c->evicted, &c->lock);
	}
	if (c->room_futile && now_s() - c->room_futile_at < ROOM_RETRY_S) {
		pthread_mutex_unlock(&c->lock);
		return 0;
	}
	if (waited) {
		pthread_mutex_unlock(&c->lock);
		return 1;
	}
	c->evicting = 1;
	pthread_mutex_unlock(&c->lock);
	freed = evict(c, size ? size : 1);
	pthread_mutex_lock(&c->lock);
	c->evicting = 0;
	c->room_futile = freed == 0;
	c->room_futile_at = now_s();
	pthread_cond_broadcast(&c->evicted);
	pthread_mutex_unlock(&c->lock);
	return freed != 0;
}

/* ---- open / close ---- */

static uint64_t make_nonce(void)
{
	uint64_t v = 0;
	struct timespec now;

	if (getrandom(&v, sizeof v, GRND_NONBLOCK) == (ssize_t)sizeof v)
		return v;
	clock_gettime(CLOCK_REALTIME, &now);
	return (uint64_t)now.tv_nsec * 0x9E3779B97F4A7C15ull ^ (uint64_t)now.tv_sec ^
	       (uint64_t)getpid() << 32;
}

static int open_dir(const char *dir, int *fd_out, sf_err *e)
{
	int fd;

	if (mkdir(dir, 0755) != 0 && errno != EEXIST)
		return sf_fail(e, SF_EIO, "%s: cannot create cache folder: %s", dir,
		               strerror(errno));
	fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return sf_fail(e, SF_EIO, "%s: cannot open cache folder: %s", dir, strerror(errno));
	if (faccessat(fd, ".", W_OK | X_OK, AT_EACCESS) != 0) {
		close(fd);
		return sf_fail(e, SF_EIO, "%s: cache folder is not writable", dir);
	}
	*fd_out = fd;
	return SF_OK;
}

int sf_cache_open(const char *dir, uint64_t max_bytes, sf_cache **out, sf_err *e)
{
	struct scan_result r;
	sf_cache *c;
	int rc;

	*out = NULL;
	if (!dir || !*dir)
		return sf_fail(e, SF_EINVAL, "cache: empty cache folder name");
	c = calloc(1, sizeof *c);
	if (!c)
		return sf_fail(e, SF_ENOMEM, "%s: out of memory opening the cache", dir);
	c->dir = strdup(dir);
	if (!c->dir) {
		free(c);
		return sf_fail(e, SF_ENOMEM, "%s: out of memory opening the cache", dir);
	}
	c->max_bytes = max_bytes;
	c->nonce = make_nonce();
	rc = open_dir(dir, &c->dirfd, e);
	if (rc)
		goto err_free;
	rc = version_file_check(c, e);
	if (rc)
		goto err_close;
	rc = scan_dir(c, &r, 0, e);
	if (rc)
		goto err_close;
	c->st.bytes = r.bytes;
	c->st.entries = r.entries;
	if (pthread_mutex_init(&c->lock, NULL) != 0) {
		rc = sf_fail(e, SF_ENOMEM, "%s: cannot create the cache lock", dir);
		goto err_close;
	}
	if (pthread_mutex_init(&c->reopen_lock, NULL) != 0) {
		rc = sf_fail(e, SF_ENOMEM, "%s: cannot create the cache lock", dir);
		goto err_lock;
	}
	if (pthread_cond_init(&c->evicted, NULL) != 0) {
		pthread_mutex_destroy(&c->reopen_lock);
		rc = sf_fail(e, SF_ENOMEM, "%s: cannot create the cache lock", dir);
		goto err_lock;
	}
	maybe_evict(c); /* the bound may have shrunk since the last mount */
	*out = c;
	return SF_OK;

err_lock:
	pthread_mutex_destroy(&c->lock);
err_close:
	close(c->dirfd);
err_free:
	free(c->dir);
	free(c);
	return rc;
}

void sf_cache_close(sf_cache *c)
{
	if (!c)
		return;
	pthread_mutex_destroy(&c->lock);
	pthread_mutex_destroy(&c->reopen_lock);
	pthread_cond_destroy(&c->evicted);
	for (unsigned i = 0; i < c->nspare; i++)
		free(c->spare[i].p);
	free(c->stuck);
	close(c->dirfd);
	free(c->dir);
	free(c);
}

/* ---- a removed folder ---- */

/* After a write in DIR failed with ENOENT: if the folder c->dirfd holds was
 * removed (st_nlink 0: `rm -rf DIR`, a scratch purge), open DIR by its path
 * again as sf_cache_open does (creating it and its version file), move it
 * onto the same descriptor number with dup3 (so calls in flight in other
 * threads see either folder, never a closed or reused descriptor), rescan it
 * and log one line.  1 if the folder is usable (again), else 0 with e set. */
static int dir_reopen(sf_cache *c, sf_err *e)
{
	struct scan_result r;
	struct stat st;
	int fd, rc;

	pthread_mutex_lock(&c->reopen_lock);
	if (fstat(c->dirfd, &st) == 0 && st.st_nlink > 0) {
		pthread_mutex_unlock(&c->reopen_lock);
		return 1; /* not removed, or another thread made it again already */
	}
	if (c->reopen_failed_at && now_s() - c->reopen_failed_at < ROOM_RETRY_S) {
		pthread_mutex_unlock(&c->reopen_lock);
		sf_fail(e, SF_EIO, "%s: the cache folder was removed during the mount", c->dir);
		return 0; /* tried less than ROOM_RETRY_S ago: no log line per put */
	}
	rc = open_dir(c->dir, &fd, e);
	if (rc == SF_OK) {
		if (dup3(fd, c->dirfd, O_CLOEXEC) < 0)
			rc = sf_fail(e, SF_EIO, "%s: cannot reopen cache folder: %s", c->dir,
			             strerror(errno));
		close(fd);
	}
	if (rc == SF_OK)
		rc = version_file_check(c, e);
	if (rc == SF_OK)
		rc = scan_dir(c, &r, 0, e);
	c->reopen_failed_at = rc == SF_OK ? 0 : now_s();
	pthread_mutex_unlock(&c->reopen_lock);
	if (rc != SF_OK) {
		sf_log(SF_LOG_WARN, "cache: %s: the cache folder was removed during the mount: %s",
		       c->dir, e->msg);
		return 0;
	}
	pthread_mutex_lock(&c->lock);
	c->st.bytes = r.bytes;
	c->st.entries = r.entries;
	c->nstuck = 0; /* another folder now */
	c->stuck_bytes = 0;
	pthread_mutex_unlock(&c->lock);
	sf_log(SF_LOG_WARN,
	       "cache: %s: the cache folder was removed during the mount; "
	       "made it again (%llu entries there) and caching goes on in it",
	       c->dir, (unsigned long long)r.entries);
	return 1;
}

/* ---- scratch pool ---- */

/* A buffer of at least n bytes.  Every put and get needs two buffers of
 * about a unit's size; fresh multi-megabyte mallocs are mmapped, and the
 * kernel faults and zeroes each of their pages on first touch, which was
 * 5% of a cold warp cp's CPU.  So up to SCRATCH_SLOTS buffers of at most
 * SCRATCH_MAX bytes are kept between calls (deconvolution blocks are
 * larger and are not kept).  SF_ENOMEM when out of memory. */
static int scratch_take(sf_cache *c, size_t n, struct scratch *out)
{
	if (!n)
		n = 1;
	pthread_mutex_lock(&c->lock);
	for (unsigned i = c->nspare; i-- > 0;)
		if (c->spare[i].cap >= n) {
			*out = c->spare[i];
			c->spare[i] = c->spare[--c->nspare];
			pthread_mutex_unlock(&c->lock);
			return SF_OK;
		}
	pthread_mutex_unlock(&c->lock);
	out->cap = n;
	out->p = malloc(n);
	return out->p ? SF_OK : SF_ENOMEM;
}

/* Give a buffer back: kept when small enough and a slot is free (else the
 * smallest kept one makes room when this one is larger), freed otherwise. */
static void scratch_give(sf_cache *c, struct scratch *b)
{
	uint8_t *drop = b->p;

	if (!b->p)
		return;
	if (b->cap <= SCRATCH_MAX) {
		pthread_mutex_lock(&c->lock);
		if (c->nspare < SCRATCH_SLOTS) {
			c->spare[c->nspare++] = *b;
			drop = NULL;
		} else {
			unsigned small = 0;
			for (unsigned i = 1; i < c->nspare; i++)
				if (c->spare[i].cap < c->spare[small].cap)
					small = i;
			if (c->spare[small].cap < b->cap) {
				drop = c->spare[small].p;
				c->spare[small] = *b;
			}
		}
		pthread_mutex_unlock(&c->lock);
	}
	free(drop);
	b->p = NULL;
}

/* ---- get ---- */

static void count_miss(sf_cache *c)
{
	pthread_mutex_lock(&c->lock);
	c->st.misses++;
	pthread_mutex_unlock(&c->lock);
}

/* Unlink a bad entry if the name still holds the file that was read (a good
 * replacement may have been renamed over it meanwhile), log, count, miss. */
static int drop_bad(sf_cache *c, const char *rel, const struct stat *seen, const char *reason,
                    sf_err *e)
{
	struct stat now;
	int removed = 0;

	if (fstatat(c->dirfd, rel, &now, AT_SYMLINK_NOFOLLOW) == 0 && now.st_dev == seen->st_dev &&
	    now.st_ino == seen->st_ino)
		removed = unlinkat(c->dirfd, rel, 0) == 0;
	sf_log(SF_LOG_WARN, "cache: dropped bad entry %s/%s: %s", c->dir, rel, reason);
	pthread_mutex_lock(&c->lock);
	if (removed) {
		c->st.bytes = sub_floor0(c->st.bytes, (uint64_t)seen->st_size);
		c->st.entries = sub_floor0(c->st.entries, 1);
	}
	c->st.corrupt++;
	c->st.misses++;
	pthread_mutex_unlock(&c->lock);
	return sf_fail(e, SF_ENOTFOUND, "%s/%s: bad cache entry dropped (%s)", c->dir, rel, reason);
}

/* Check and decode a whole entry file (buf, size bytes) into dst[n].
 * NULL on success, else the reason the entry is bad. */
static const char *entry_decode(const uint8_t *buf, size_t size, sf_key k, uint8_t *dst, size_t n,
                                uint8_t *scratch)
{
	struct entry_header eh;
	const char *why;

	why = header_read(buf, &eh);
	if (why)
		return why;
	if (!sf_key_equal(eh.key, k))
		return "key mismatch";
	if (eh.raw_size != n)
		return "raw size differs from the size asked for";
	if (eh.enc_size != size - HEADER_BYTES)
		return "file size does not match the header (truncated?)";
	if (n % eh.elem_bytes)
		return "raw size is not a whole number of samples";
	if (sf_block_decode(buf + HEADER_BYTES, size - HEADER_BYTES, n, eh.elem_bytes, scratch, dst,
	                    NULL) != SF_OK)
		return "payload does not decode";
	if (XXH64(dst, n, 0) != eh.raw_hash)
		return "data checksum mismatch";
	return NULL;
}

int sf_cache_get(sf_cache *c, sf_key k, uint8_t *dst, size_t n, sf_err *e)
{
	struct scratch buf = {NULL, 0}, scratch = {NULL, 0};
	char rel[40];
	const char *why;
	struct stat st;
	size_t size;
	int fd, rc;

	entry_rel(k, rel);
	if (sf_block_bound(n) == 0)
		return sf_fail(e, SF_ERANGE, "%s/%s: %zu bytes are too many for one cache entry",
		               c->dir, rel, n);
	/* O_NONBLOCK: a FIFO or device at the name must not block; fstat below
	 * then refuses anything but a regular file. */
	fd = openat(c->dirfd, rel, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
	if (fd < 0) {
		int err = errno;
		count_miss(c);
		if (err == ENOENT)
			return sf_fail(e, SF_ENOTFOUND, "%s/%s: not cached", c->dir, rel);
		return sf_fail(e, SF_EIO, "%s/%s: %s", c->dir, rel, strerror(err));
	}
	if (fstat(fd, &st) != 0) {
		rc = sf_fail(e, SF_EIO, "%s/%s: %s", c->dir, rel, strerror(errno));
		count_miss(c);
		goto out;
	}
	size = (size_t)st.st_size;
	if (!S_ISREG(st.st_mode) || size < HEADER_BYTES) {
		rc = drop_bad(c, rel, &st,
		              S_ISREG(st.st_mode) ? "shorter than a header" : "not a regular file",
		              e);
		goto out;
	}
	if (size - HEADER_BYTES > sf_block_bound(n)) {
		rc = drop_bad(c, rel, &st, "larger than any encoding of the size asked for", e);
		goto out;
	}
	if (scratch_take(c, size, &buf) != SF_OK || scratch_take(c, n, &scratch) != SF_OK) {
		rc = sf_fail(e, SF_ENOMEM, "%s/%s: out of memory reading a cache entry", c->dir,
		             rel);
		count_miss(c);
		goto out;
	}
	rc = read_all(fd, buf.p, size);
	if (rc < 0) {
		rc = sf_fail(e, SF_EIO, "%s/%s: %s", c->dir, rel, strerror(errno));
		count_miss(c);
		goto out;
	}
	why = rc ? "shorter than its size (truncated while read?)"
	         : entry_decode(buf.p, size, k, dst, n, scratch.p);
	if (why) {
		rc = drop_bad(c, rel, &st, why, e);
		goto out;
	}
	/* LRU clock: an entry used recently enough keeps its mtime, saving a
	 * metadata write per hit; the eviction order is unchanged at that scale. */
	if (older_than(&st.st_mtim, BUMP_MIN_AGE_S))
		futimens(fd, NULL);
	pthread_mutex_lock(&c->lock);
	c->st.hits++;
	pthread_mutex_unlock(&c->lock);
	rc = SF_OK;
out:
	scratch_give(c, &buf);
	scratch_give(c, &scratch);
	close(fd);
	return rc;
}

/* ---- put ---- */

/* Write buf into a private temp file next to the entry and rename it over
 * rel (replacing any entry there: same key, same bytes).  On failure *err_no
 * is the errno that stopped it. */
static int entry_publish(sf_cache *c, const char *rel, const uint8_t *buf, size_t size, int *err_no,
                         sf_err *e)
{
	char tmp[REL_MAX], fanout[3] = {rel[0], rel[1], '\0'};
	uint64_t seq;
	int fd, err;

	pthread_mutex_lock(&c->lock);
	seq = c->tmp_seq++;
	pthread_mutex_unlock(&c->lock);
	snprintf(tmp, sizeof tmp, "%s/" TMP_PREFIX "%.32s.%ld.%016llx.%llu", fanout, rel + 3,
	         (long)getpid(), (unsigned long long)c->nonce, (unsigned long long)seq);
	fd = openat(c->dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (fd < 0 && errno == ENOENT) {
		if (mkdirat(c->dirfd, fanout, 0755) != 0 && errno != EEXIST) {
			*err_no = errno;
			return sf_fail(e, SF_EIO, "%s/%s: cannot create cache folder: %s", c->dir,
			               fanout, strerror(errno));
		}
		fd = openat(c->dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	}
	if (fd < 0) {
		*err_no = errno;
		return sf_fail(e, SF_EIO, "%s/%s: cannot create: %s", c->dir, tmp, strerror(errno));
	}
	if (write_all(fd, buf, size) != 0) {
		err = errno;
		close(fd);
		goto fail;
	}
	if (close(fd) != 0) {
		err = errno;
		goto fail;
	}
	if (renameat(c->dirfd, tmp, c->dirfd, rel) != 0) {
		err = errno;
		goto fail;
	}
	return SF_OK;
fail:
	unlinkat(c->dirfd, tmp, 0);
	*err_no = err;
	return sf_fail(e, SF_EIO, "%s/%s: cannot write cache entry: %s", c->dir, rel,
	               strerror(err));
}

static int is_full(int err)
{
	return err == ENOSPC || err == EDQUOT;
}

/* The folder (or its file system) refuses writes: a read-only remount, a
 * chmod, another user's folder. */
static int is_refused(int err)
{
	return err == EROFS || err == EACCES || err == EPERM;
}

/* A put failed for a cause every later put shares: no room even after
 * make_room, a folder that refuses writes, an entry larger than the bound.
 * The message names the folder and the cause (what), not the entry, so that
 * callers recording errors (the engine's recent_errors) see one repeated
 * message; the log gets the first failure, then at most one line per
 * FULL_LOG_S with the count since.  Each entry's name made the three causes
 * fill recent_errors with one item per tile and the log with a line each. */
static int refusal_report(sf_cache *c, int code, const char *what, sf_err *e)
{
	uint64_t since = 0;
	time_t now = now_s();
	int log;

	pthread_mutex_lock(&c->lock);
	c->full_since++;
	log = !c->full_logged || now - c->full_logged_at >= FULL_LOG_S;
	if (log) {
		since = c->full_since;
		c->full_since = 0;
		c->full_logged = 1;
		c->full_logged_at = now;
	}
	pthread_mutex_unlock(&c->lock);
	if (log)
		sf_log(SF_LOG_WARN,
		       "cache: %s: %s: %llu write(s) failed since the last such line (logged at "
		       "most once a minute); the tiles are computed and served, not cached",
		       c->dir, what, (unsigned long long)since);
	return sf_fail(e, code, "%s" REFUSAL_MSG "%s", c->dir, what);
}

static int store_report(sf_cache *c, int err, sf_err *e)
{
	char what[160];

	if (is_full(err))
		snprintf(what, sizeof what,
		         "full: %s (even after evicting the least recently used entries)",
		         strerror(err));
	else
		snprintf(what, sizeof what, "not writable: %s", strerror(err));
	return refusal_report(c, SF_EIO, what, e);
}

/* Write the entry; when DIR was removed meanwhile, make it again and retry
 * once; when the file system is full, make room and retry, up to ROOM_TRIES
 * times: workers that wait for one eviction all write again, and the room it
 * made may go to the others first. */
static int entry_store(sf_cache *c, const char *rel, const uint8_t *buf, size_t size, sf_err *e)
{
	int err = 0, rc;

	rc = entry_publish(c, rel, buf, size, &err, e);
	if (rc && err == ENOENT) {
		if (!dir_reopen(c, e))
			return SF_EIO;
		rc = entry_publish(c, rel, buf, size, &err, e);
	}
	for (int tries = 0; rc && is_full(err) && tries < ROOM_TRIES && make_room(c, size); tries++)
		rc = entry_publish(c, rel, buf, size, &err, e);
	if (rc && (is_full(err) || is_refused(err)))
		rc = store_report(c, err, e);
	return rc;
}

int sf_cache_put(sf_cache *c, sf_key k, const uint8_t *src, size_t n, unsigned elem_bytes,
                 sf_err *e)
{
	struct entry_header eh = {.version = FORMAT_VERSION, .elem_bytes = elem_bytes, .key = k};
	struct scratch buf = {NULL, 0}, scratch = {NULL, 0};
	size_t bound, enc_n, size;
	char rel[40];
	int rc;

	entry_rel(k, rel);
	bound = sf_block_bound(n);
	if (bound == 0)
		return sf_fail(e, SF_ERANGE, "%s/%s: %zu bytes are too many for one cache entry",
		               c->dir, rel, n);
	if (scratch_take(c, HEADER_BYTES + bound, &buf) != SF_OK ||
	    scratch_take(c, n, &scratch) != SF_OK) {
		rc = sf_fail(e, SF_ENOMEM, "%s/%s: out of memory encoding a cache entry", c->dir,
		             rel);
		goto out;
	}
	rc = sf_block_encode(src, n, elem_bytes, scratch.p, buf.p + HEADER_BYTES, bound, &enc_n, e);
	if (rc)
		goto out;
	size = HEADER_BYTES + enc_n;
	if (c->max_bytes && size > c->max_bytes) {
		char what[160];
		snprintf(what, sizeof what,
		         "too small: an entry of %zu bytes exceeds the bound of %llu (cache_size)",
		         size, (unsigned long long)c->max_bytes);
		rc = refusal_report(c, SF_ERANGE, what, e);
		goto out;
	}
	eh.raw_size = n;
	eh.enc_size = enc_n;
	eh.raw_hash = XXH64(src, n, 0);
	header_write(buf.p, &eh);
	rc = entry_store(c, rel, buf.p, size, e);
	if (rc)
		goto out;
	pthread_mutex_lock(&c->lock);
	/* Counted as new even when it replaced an entry: that file may be
	 * another mount's, which this view never counted (invariant 5). */
	c->st.bytes += size;
	c->st.entries++;
	c->st.written++;
	c->st.raw_bytes_written += n;
	c->st.encoded_bytes_written += enc_n;
	c->put_total += size;
	c->put_count++;
	pthread_mutex_unlock(&c->lock);
	maybe_evict(c);
out:
	scratch_give(c, &buf);
	scratch_give(c, &scratch);
	return rc;
}

int sf_cache_failure_logged(const sf_cache *c, const sf_err *e)
{
	size_t n = strlen(c->dir);

	return strncmp(e->msg, c->dir, n) == 0 &&
	       strncmp(e->msg + n, REFUSAL_MSG, strlen(REFUSAL_MSG)) == 0;
}

void sf_cache_stats_get(sf_cache *c, sf_cache_stats *out)
{
	pthread_mutex_lock(&c->lock);
	*out = c->st;
	pthread_mutex_unlock(&c->lock);
}

const char *sf_cache_dir(const sf_cache *c)
{
	return c->dir;
}

/* ranges.h — one loop over [0, items) split across threads, for the compute
 * core's host passes (FFTW passes, separable filters, block copies).
 *
 * The items go in up to `threads` (at most RANGES_MAX) contiguous ranges,
 * part k holding [items k / t, items (k + 1) / t); part 0 runs on the
 * calling thread, the others on threads made for the call and joined
 * before it returns.  A part whose thread cannot start runs on the caller
 * afterwards.  Callers keep the bytes independent of the split: each item's
 * result must not depend on which part runs it (part only picks per-thread
 * scratch). */
#ifndef SCOPEFS_CORE_RANGES_H
#define SCOPEFS_CORE_RANGES_H

#include <pthread.h>
#include <stddef.h>

#define RANGES_MAX 64

typedef void (*ranges_fn)(void *arg, size_t part, size_t first, size_t end);

typedef struct ranges_part {
	ranges_fn fn;
	void *arg;
	size_t part, first, end;
} ranges_part;

static inline void *ranges_part_run(void *p)
{
	const ranges_part *r = p;
	r->fn(r->arg, r->part, r->first, r->end);
	return NULL;
}

static inline void ranges_run(size_t items, int threads, ranges_fn fn, void *arg)
{
	ranges_part r[RANGES_MAX];
	pthread_t tid[RANGES_MAX];
	int started[RANGES_MAX] = {0};
	size_t t = threads < 1 ? 1 : threads > RANGES_MAX ? RANGES_MAX : (size_t)threads;
	if (!items)
		return;
	t = t < items ? t : items;
	for (size_t i = 0; i < t; i++)
		r[i] = (ranges_part){fn, arg, i, items * i / t, items * (i + 1) / t};
	for (size_t i = 1; i < t; i++)
		started[i] = pthread_create(&tid[i], NULL, ranges_part_run, &r[i]) == 0;
	ranges_part_run(&r[0]);
	for (size_t i = 1; i < t; i++) {
		if (started[i])
			pthread_join(tid[i], NULL);
		else
			ranges_part_run(&r[i]);
	}
}

#endif

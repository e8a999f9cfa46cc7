/* register_pool.c — a small fixed pool of threads that one registration
 * call owns (register_math.h, "reg_pool").
 *
 * The caller splits its work into numbered blocks whose bounds do not
 * depend on the thread count; any thread may run any block, and each block
 * writes only its own outputs (pixels, or its own partial sums, which the
 * caller then adds in block order).  So a result is bit-identical whatever
 * the number of threads, and cached registrations stay reproducible.
 *
 * One job runs at a time: reg_pool_run publishes it under the lock, bumps
 * the generation, runs blocks itself, and waits until every block is done.
 * Workers take blocks from a shared counter under the same lock (a job has
 * tens of blocks, so the lock is cheap next to the work). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "register_math.h"

#define POOL_MAX_THREADS 16

struct reg_pool {
	pthread_mutex_t lock; /* guards everything below */
	pthread_cond_t work;  /* a new job, or stop */
	pthread_cond_t idle;  /* the last block of a job finished */
	unsigned long gen;    /* job generation; workers wait for it to change */
	int stop;
	reg_pool_fn fn; /* the current job */
	void *ctx;
	long blocks, next, done;
	unsigned nworkers;
	pthread_t tid[POOL_MAX_THREADS];
};

/* Run blocks of the current job until none is left; called with the lock
 * held, returns with it held. */
static void drain(reg_pool *p)
{
	while (p->next < p->blocks) {
		long b = p->next++;
		reg_pool_fn fn = p->fn;
		void *ctx = p->ctx;
		pthread_mutex_unlock(&p->lock);
		fn(ctx, b);
		pthread_mutex_lock(&p->lock);
		if (++p->done == p->blocks)
			pthread_cond_broadcast(&p->idle);
	}
}

static void *worker(void *arg)
{
	reg_pool *p = arg;
	unsigned long seen = 0;
	pthread_mutex_lock(&p->lock);
	for (;;) {
		while (!p->stop && p->gen == seen)
			pthread_cond_wait(&p->work, &p->lock);
		if (p->stop)
			break;
		seen = p->gen;
		drain(p);
	}
	pthread_mutex_unlock(&p->lock);
	return NULL;
}

int reg_pool_start(reg_pool **out, unsigned threads, sf_err *e)
{
	*out = NULL;
	if (threads <= 1)
		return SF_OK; /* serial: reg_pool_run runs the blocks in order */
	if (threads > POOL_MAX_THREADS)
		threads = POOL_MAX_THREADS;
	reg_pool *p = calloc(1, sizeof *p);
	if (!p)
		return sf_fail(e, SF_ENOMEM, "register: thread pool");
	if (pthread_mutex_init(&p->lock, NULL)) {
		free(p);
		return sf_fail(e, SF_ENOMEM, "register: thread pool lock");
	}
	if (pthread_cond_init(&p->work, NULL) || pthread_cond_init(&p->idle, NULL)) {
		pthread_mutex_destroy(&p->lock);
		free(p);
		return sf_fail(e, SF_ENOMEM, "register: thread pool condition");
	}
	for (unsigned k = 0; k + 1 < threads; k++) {
		if (pthread_create(&p->tid[k], NULL, worker, p))
			break; /* fewer workers only slow the work down */
		p->nworkers++;
	}
	*out = p;
	return SF_OK;
}

void reg_pool_stop(reg_pool *p)
{
	if (!p)
		return;
	pthread_mutex_lock(&p->lock);
	p->stop = 1;
	pthread_cond_broadcast(&p->work);
	pthread_mutex_unlock(&p->lock);
	for (unsigned k = 0; k < p->nworkers; k++)
		pthread_join(p->tid[k], NULL);
	pthread_cond_destroy(&p->work);
	pthread_cond_destroy(&p->idle);
	pthread_mutex_destroy(&p->lock);
	free(p);
}

void reg_pool_run(reg_pool *p, long blocks, reg_pool_fn fn, void *ctx)
{
	if (!p || !p->nworkers || blocks <= 1) {
		for (long b = 0; b < blocks; b++)
			fn(ctx, b);
		return;
	}
	pthread_mutex_lock(&p->lock);
	p->fn = fn;
	p->ctx = ctx;
	p->blocks = blocks;
	p->next = p->done = 0;
	p->gen++;
	pthread_cond_broadcast(&p->work);
	drain(p);
	while (p->done < p->blocks)
		pthread_cond_wait(&p->idle, &p->lock);
	p->blocks = p->next = p->done = 0;
	pthread_mutex_unlock(&p->lock);
}

unsigned reg_pool_threads(const reg_pool *p)
{
	return p ? p->nworkers + 1 : 1;
}

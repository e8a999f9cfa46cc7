/* product.h — a product: a pure function from unit index to bytes.
 *
 * A virtual file's pixels are a product of its sources: the reference slide
 * re-tiled, a moving slide warped, a stack deconvolved.  The tile engine knows
 * nothing of pixels; it asks a product to compute unit u into a buffer of
 * unit_bytes(u) bytes.  A product does no caching and no FUSE work, and its
 * output depends only on (key, unit): the engine relies on that to cache. */
#ifndef SCOPEFS_PRODUCT_H
#define SCOPEFS_PRODUCT_H

#include <stddef.h>
#include <stdint.h>

#include "scopefs/err.h"
#include "scopefs/key.h"

typedef struct sf_product sf_product;

typedef struct sf_product_ops {
	/* Per-worker state (source readers, scratch), made on the worker thread
	 * the first time it computes for this product and kept until the engine
	 * is destroyed.  May be NULL when the product needs none. */
	int (*worker_start)(sf_product *p, void **state, sf_err *e);
	void (*worker_stop)(sf_product *p, void *state);
	/* Fill out (unit_bytes(p, unit) bytes) with the unit's bytes. */
	int (*compute)(sf_product *p, void *state, uint64_t unit, uint8_t *out, sf_err *e);
	size_t (*unit_bytes)(const sf_product *p, uint64_t unit);
	void (*destroy)(sf_product *p); /* frees p and what it owns */
	/* Optional: the engine is stopping (unmount); computations in progress
	 * should end early and may fail (SF_EINTR).  Called once, from the
	 * thread that destroys the engine, before it waits for the workers. */
	void (*stop)(sf_product *p);
	/* Optional: the product joined a running engine (after the daemon
	 * forked).  Returns at once; slow one-off preparation that the first
	 * read would otherwise wait for (a GPU's runtime start-up) goes on a
	 * thread the product joins in destroy.  Never computes a unit. */
	void (*warm)(sf_product *p);
} sf_product_ops;

struct sf_product {
	const sf_product_ops *ops;
	sf_key key;          /* hash of all the output depends on (sources, kind, parameters) */
	unsigned elem_bytes; /* sample size: the cache's byte-shuffle width */
	uint64_t unit_count;
	unsigned slot;  /* set by sf_engine_add_product */
	char name[256]; /* the virtual path, for logs */
	void *impl;     /* the product's own data */
};

#endif

/* product_planes.c — the planes of a z-stack, strip by strip.
 *
 * One product serves every plane file of a stack: unit = plane * strips +
 * strip, so the engine's per-worker state is one small set of open plane
 * readers, not one reader per plane per worker.  A worker keeps the last
 * READERS_KEPT planes it read open (planes are read in order by cp and by
 * ImageJ's virtual stacks, so this hits). */
#include "scopefs/products.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define READERS_KEPT 4

typedef struct planes {
	const sf_stack *stack; /* owned by the dataset */
	const sf_layout *layout;
	uint64_t strips; /* units per plane */
	uint32_t rows;   /* rows per strip */
} planes;

typedef struct planes_worker {
	sf_slide_reader *reader[READERS_KEPT];
	uint32_t plane[READERS_KEPT];
	unsigned next; /* slot replaced next (round robin) */
} planes_worker;

static int planes_worker_start(sf_product *p, void **state, sf_err *e)
{
	planes_worker *w = calloc(1, sizeof *w);
	if (!w)
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", p->name);
	*state = w;
	return SF_OK;
}

static void planes_worker_stop(sf_product *p, void *state)
{
	planes_worker *w = state;
	(void)p;
	if (!w)
		return;
	for (unsigned i = 0; i < READERS_KEPT; i++)
		sf_slide_reader_close(w->reader[i]);
	free(w);
}

/* The reader of plane z, opened into a slot if not held.  A multi-page
 * stack has one file: every plane uses the reader of plane_info[0]. */
static int planes_reader(const planes *pl, planes_worker *w, uint32_t z, sf_slide_reader **out,
                         sf_err *e)
{
	uint32_t file = pl->stack->multipage ? 0 : z;
	unsigned slot;
	int rc;

	for (unsigned i = 0; i < READERS_KEPT; i++)
		if (w->reader[i] && w->plane[i] == file) {
			*out = w->reader[i];
			return SF_OK;
		}
	slot = w->next;
	w->next = (w->next + 1) % READERS_KEPT;
	sf_slide_reader_close(w->reader[slot]);
	w->reader[slot] = NULL;
	rc = sf_slide_reader_open(pl->stack->plane_info[file], &w->reader[slot], e);
	if (rc != SF_OK)
		return rc;
	w->plane[slot] = file;
	*out = w->reader[slot];
	return SF_OK;
}

static size_t planes_unit_bytes(const sf_product *p, uint64_t unit)
{
	const planes *pl = p->impl;
	return sf_layout_unit_bytes(pl->layout, unit % pl->strips);
}

static int planes_compute(sf_product *p, void *state, uint64_t unit, uint8_t *out, sf_err *e)
{
	const planes *pl = p->impl;
	uint32_t z = (uint32_t)(unit / pl->strips);
	uint64_t strip = unit % pl->strips;
	uint32_t y0 = (uint32_t)(strip * pl->rows);
	uint32_t h = pl->stack->height - y0 < pl->rows ? pl->stack->height - y0 : pl->rows;
	sf_slide_reader *reader;
	int rc = planes_reader(pl, state, z, &reader, e);

	if (rc != SF_OK)
		return rc;
	return sf_slide_read_region(reader, 0, pl->stack->multipage ? z : 0, 0, y0,
	                            pl->stack->width, h, out, e);
}

static void planes_destroy(sf_product *p)
{
	free(p->impl);
	free(p);
}

static const sf_product_ops planes_ops = {
    .worker_start = planes_worker_start,
    .worker_stop = planes_worker_stop,
    .compute = planes_compute,
    .unit_bytes = planes_unit_bytes,
    .destroy = planes_destroy,
};

static sf_key planes_key(const sf_stack *st, uint32_t rows)
{
	sf_key k = sf_key_of("scopefs planes v1", 17);
	uint32_t files = st->multipage ? 1 : st->planes;

	k = sf_key_mix_u64(k, rows);
	for (uint32_t z = 0; z < files; z++) {
		k = sf_key_mix_str(k, st->plane_info[z]->path);
		k = sf_key_mix_u64(k, st->plane_info[z]->file_size);
		k = sf_key_mix_u64(k, (uint64_t)st->plane_info[z]->mtime_ns);
	}
	return k;
}

int sf_product_planes_create(const sf_stack *st, const sf_layout *plane_layout, sf_product **out,
                             sf_err *e)
{
	sf_product *p = calloc(1, sizeof *p);
	planes *pl = calloc(1, sizeof *pl);

	if (!p || !pl) {
		free(p);
		free(pl);
		return sf_fail(e, SF_ENOMEM, "stack %s: out of memory", st->name);
	}
	pl->stack = st;
	pl->layout = plane_layout;
	pl->strips = sf_layout_unit_count(plane_layout);
	pl->rows = sf_layout_unit_rows(plane_layout);
	p->ops = &planes_ops;
	p->key = planes_key(st, pl->rows);
	p->elem_bytes = (unsigned)sf_dtype_bytes(st->dtype);
	p->unit_count = pl->strips * st->planes;
	p->impl = pl;
	snprintf(p->name, sizeof p->name, "planes:%s", st->name[0] ? st->name : "(root)");
	*out = p;
	return SF_OK;
}

/* vfile.h — a virtual file: a TIFF layout whose pixel units come from a product.
 *
 * This is the one place that turns "bytes [off, off+len) of virtual file F"
 * into unit requests: header bytes are copied from the layout, pixel bytes
 * are read unit by unit through the tile engine.  Layout unit u is product
 * unit unit_base + u, so one product can serve many files (the planes of a
 * stack share one product). */
#ifndef SCOPEFS_VFILE_H
#define SCOPEFS_VFILE_H

#include <stddef.h>
#include <stdint.h>

#include "scopefs/engine.h"
#include "scopefs/tiff_layout.h"

typedef struct sf_vfile {
	sf_layout *layout;   /* not owned: the mount keeps layouts (planes share one) */
	sf_product *product; /* not owned: products outlive their files */
	uint64_t unit_base;  /* product unit of layout unit 0 */
} sf_vfile;

/* Copy bytes [off, off+len) into dst; *got is len clipped at end of file. */
int sf_vfile_read(sf_engine *g, const sf_vfile *v, uint64_t off, size_t len, uint8_t *dst,
                  size_t *got, sf_err *e);

/* Read-ahead for a reader whose run of near-consecutive reads began at
 * run_start and now ends at off: schedules up to count units after off.
 * Only once the run spans two units (at least 1 MiB): a viewer's tile
 * read or a header parse is a short run, and the kernel splits each read
 * into 128 KiB requests, so a rule on single requests prefetched for them
 * too.  And never more units than fill a quarter of budget (mem), so the
 * units read ahead are not evicted before the reader gets to them. */
void sf_vfile_readahead(sf_engine *g, const sf_vfile *v, uint64_t run_start, uint64_t off,
                        unsigned count, uint64_t budget);

uint64_t sf_vfile_size(const sf_vfile *v);

#endif

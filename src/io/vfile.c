/* vfile.c — byte ranges of a virtual file to header copies and unit reads. */
#include "scopefs/vfile.h"

#include <string.h>

/* The shortest run of reads that counts as a sequential reader. */
#define READAHEAD_MIN_RUN ((uint64_t)1 << 20)

uint64_t sf_vfile_size(const sf_vfile *v)
{
	return sf_layout_file_size(v->layout);
}

int sf_vfile_read(sf_engine *g, const sf_vfile *v, uint64_t off, size_t len, uint8_t *dst,
                  size_t *got, sf_err *e)
{
	uint64_t size = sf_layout_file_size(v->layout);
	uint64_t header = sf_layout_header_size(v->layout);
	size_t done = 0;

	*got = 0;
	if (off >= size)
		return SF_OK;
	if (len > size - off)
		len = (size_t)(size - off);
	if (off < header) {
		size_t n = (size_t)(header - off < len ? header - off : len);
		memcpy(dst, sf_layout_header(v->layout) + off, n);
		done = n;
	}
	while (done < len) {
		uint64_t within;
		uint64_t unit = sf_layout_unit_at(v->layout, off + done, &within);
		size_t unit_bytes = sf_layout_unit_bytes(v->layout, unit);
		size_t n = unit_bytes - (size_t)within;
		int rc;

		if (n > len - done)
			n = len - done;
		rc = sf_engine_read(g, v->product, v->unit_base + unit, (size_t)within, n,
		                    dst + done, e);
		if (rc != SF_OK)
			return rc;
		done += n;
	}
	*got = done;
	return SF_OK;
}

void sf_vfile_readahead(sf_engine *g, const sf_vfile *v, uint64_t run_start, uint64_t off,
                        unsigned count, uint64_t budget)
{
	uint64_t header = sf_layout_header_size(v->layout);
	uint64_t units = sf_layout_unit_count(v->layout);
	uint64_t within, unit, fit, min_run;
	size_t unit_bytes;

	if (off < header)
		off = header;
	if (off >= sf_layout_file_size(v->layout))
		return;
	unit = sf_layout_unit_at(v->layout, off, &within);
	unit_bytes = sf_layout_unit_bytes(v->layout, unit);
	min_run = 2 * (uint64_t)unit_bytes > READAHEAD_MIN_RUN ? 2 * (uint64_t)unit_bytes
	                                                       : READAHEAD_MIN_RUN;
	if (off < run_start || off - run_start < min_run)
		return;
	fit = budget / 4 / (unit_bytes ? unit_bytes : 1);
	if (fit == 0)
		fit = 1;
	if (count > fit)
		count = (unsigned)fit;
	for (unsigned i = 0; i < count && unit + i < units; i++)
		sf_engine_prefetch(g, v->product, v->unit_base + unit + i);
}

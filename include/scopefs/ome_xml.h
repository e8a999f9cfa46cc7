/* ome_xml.h — the OME-XML description of a virtual OME-TIFF.
 *
 * One Image with one Pixels element: DimensionOrder XYCZT, SizeC channels,
 * SizeZ = SizeT = 1, Type from the sample type, PhysicalSizeX/Y in µm when
 * known, one Channel per page (Name from the source, SamplesPerPixel 3 for
 * RGB) and one TiffData per page mapping IFD c to C = c.  Reduced levels
 * are SubIFDs and are not listed (OME-TIFF 6 pyramids). */
#ifndef SCOPEFS_OME_XML_H
#define SCOPEFS_OME_XML_H

#include <stdint.h>

#include "scopefs/err.h"
#include "scopefs/pixel.h"

typedef struct sf_ome_image {
	const char *name;       /* Image Name (the virtual file's stem) */
	uint32_t width, height; /* level 0 */
	uint32_t channels;      /* pages */
	uint32_t samples;       /* 1, or 3 for interleaved RGB */
	sf_dtype dtype;
	double pixel_size_x, pixel_size_y; /* µm; 0 omits the attribute */
	char *const *channel_names;        /* channels entries, or NULL */
} sf_ome_image;

/* A malloc'd NUL-terminated UTF-8 document, or NULL with e filled. */
char *sf_ome_xml(const sf_ome_image *img, sf_err *e);

#endif

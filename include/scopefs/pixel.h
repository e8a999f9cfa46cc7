/* pixel.h — the sample types scopefs serves. */
#ifndef SCOPEFS_PIXEL_H
#define SCOPEFS_PIXEL_H

#include <stddef.h>

typedef enum sf_dtype {
	SF_U8 = 1,  /* unsigned 8-bit */
	SF_U16 = 2, /* unsigned 16-bit, native (little-endian) byte order */
	SF_F32 = 3, /* IEEE float32 */
} sf_dtype;

/* Bytes per sample of t (1, 2 or 4); 0 for an unknown value. */
size_t sf_dtype_bytes(sf_dtype t);

/* "uint8", "uint16", "float" — the OME-XML Pixels Type names. */
const char *sf_dtype_ome_name(sf_dtype t);

/* Whether um is a plausible pixel or voxel size, 0.0001 - 10000 um: outside
 * it a stated size is a unit slip, and 1e4 / um would not fit a TIFF
 * resolution rational (1e-12 um gave 4294967295/0). */
int sf_pixel_um_plausible(double um);

#endif

/* metaimage.h — read a 2D displacement field stored as a MetaImage.
 *
 * elastix's DeformationFieldTransform (DeformationFieldFileName) and ITK
 * write displacement fields as MetaImage: a text header (.mhd) naming a raw
 * data file, or one .mha file with the data after its header
 * (ElementDataFile = LOCAL).  Supported: NDims 2, 2 channels, MET_FLOAT or
 * MET_DOUBLE, little-endian, uncompressed; TransformMatrix (direction,
 * column by column as ITK writes it), Offset/Origin/Position and
 * ElementSpacing.  The values are physical displacements (dx, dy). */
#ifndef SCOPEFS_METAIMAGE_H
#define SCOPEFS_METAIMAGE_H

#include "scopefs/err.h"
#include "scopefs/transform.h"

/* The field at path as a linear grid (*grid, caller frees) and the map from
 * a physical point to its grid index, gmap (2x3): index =
 * diag(1 / spacing) direction^-1 (p - origin).  Errors name the file and
 * the header line: SF_EFORMAT for a malformed file, SF_EUNSUPPORTED for a
 * valid one we do not read (3D, compressed, big-endian, other types). */
int sf_metaimage_read_field(const char *path, sf_field_grid **grid, double gmap[6], sf_err *e);
/* The same, and the path of the file the values were read from into
 * data_file (PATH_MAX bytes): the file ElementDataFile names, or path itself
 * for LOCAL.  A caller watching the field for edits needs both files. */
int sf_metaimage_read_field_data(const char *path, sf_field_grid **grid, double gmap[6],
                                 char *data_file, sf_err *e);

#endif

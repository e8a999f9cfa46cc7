/* transform_export.h — write an sf_transform as files other tools read.
 *
 * Supported: transforms with at most one SF_FIELD_LINEAR field step and an
 * affine final matrix (what scopefs's registration computes); our JSON also
 * takes a projective matrix.  Others give SF_EUNSUPPORTED.  Every function
 * returns bytes in memory (malloc'd, the caller frees; outputs are NULL/0 on
 * failure): the mount serves them as files.  docs/transforms.md, "Writing
 * transforms", states the formats and what each file holds.
 *
 * Units (sf_tf_units, as the readers use them): the reference's physical
 * point of level-0 pixel p is ref_px * p (1 when ref_px is 0); the moving
 * slide's is mov_px * p (the reference's rule when mov_px is 0).  So
 * sf_transform_load_elastix with the same units reads back the same map. */
#ifndef SCOPEFS_TRANSFORM_EXPORT_H
#define SCOPEFS_TRANSFORM_EXPORT_H

#include <stddef.h>
#include <stdint.h>

#include "scopefs/err.h"
#include "scopefs/transform.h"

/* Our JSON (docs/transforms.md): the backward matrix in level-0 pixels and,
 * when t has a field, "field": {"file": field_file, "scale", "offset",
 * "units"} describing the grid, so that sf_transform_load_json reads back the
 * same map.  field_file (relative to the JSON's folder, or absolute) is only
 * read when t has a field.  A field whose grid is rotated or sheared against
 * the pixel axes has no JSON form (SF_EUNSUPPORTED). */
int sf_transform_export_json(const sf_transform *t, const char *field_file, char **out, size_t *len,
                             sf_err *e);

/* The field of t as the 2-sample float32 TIFF that the JSON refers to
 * (uncompressed, one strip, little-endian); SF_ENOTFOUND when t has no
 * field. */
int sf_transform_export_field_tiff(const sf_transform *t, uint8_t **out, size_t *len, sf_err *e);

/* elastix TransformParameters text (elastix 5: transformix reads it).
 * ref_size: the reference's level-0 width and height (the Size lines, and
 * the extent the field image must cover).  Without a field: one
 * AffineTransform file (*field_txt = NULL, *field_len = 0; initial_path and
 * field_image_path unused).  With a field: the main file, an AffineTransform
 * whose InitialTransformParametersFileName is initial_path (where the field
 * file is served; elastix resolves a relative path against its working
 * folder, so give an absolute one), and the field file, a
 * DeformationFieldTransform (linear interpolation) whose
 * DeformationFieldFileName is field_image_path (the MetaImage header that
 * sf_transform_export_field_mhd writes; absolute, for the same reason). */
int sf_transform_export_elastix(const sf_transform *t, const sf_tf_units *units,
                                const uint32_t ref_size[2], const char *initial_path,
                                const char *field_image_path, char **main_txt, size_t *main_len,
                                char **field_txt, size_t *field_len, sf_err *e);

/* The displacement image of the field for elastix's DeformationFieldTransform:
 * a MetaImage header (.mhd: MET_FLOAT, 2 components, physical spacing, origin
 * and direction) whose ElementDataFile is field_raw_name (a name beside the
 * .mhd), and that raw data.  The values are physical displacements.  The
 * grid is t's, padded with copies of its edge nodes to cover the reference
 * (ref_size) and one node more: ITK gives zero displacement outside the
 * image, scopefs clamps to the edge nodes, and this makes the two agree.
 * Pass the same units and ref_size as to sf_transform_export_elastix. */
int sf_transform_export_field_mhd(const sf_transform *t, const sf_tf_units *units,
                                  const uint32_t ref_size[2], const char *field_raw_name,
                                  char **mhd, size_t *mhd_len, uint8_t **raw, size_t *raw_len,
                                  sf_err *e);

#endif

/* transform.h — the backward map from a reference pixel to a moving pixel.
 *
 * One convention for every transform scopefs reads (docs/transforms.md):
 *  - a map goes BACKWARD, from an output (reference, fixed) pixel X to the
 *    source (moving) pixel it samples: the warp computes out(X) = src(T(X));
 *  - pixel centres sit at integer coordinates (pixel (0, 0) covers
 *    [-0.5, 0.5)^2), as in elastix/ITK and scipy.ndimage.map_coordinates;
 *  - a pyramid level with downsample f (per axis) has its pixel centres at
 *    level-0 coordinates x0 = (xL + 0.5) * f - 0.5 (pixel edges line up).
 *
 * A map is kept in one normal form: up to SF_MAP_MAX_FIELDS displacement
 * steps, applied in order, then one 3x3 homogeneous matrix:
 *     p = X;  p += V_k * F_k(G_k * p)  (k = 0 .. nfields-1);  src = M * p
 * where G_k takes the point to the field's grid index (affine, 2x3), F_k is
 * the field interpolated there (bilinear on a displacement grid, or a cubic
 * B-spline with ITK's rule of zero displacement where the support leaves the
 * grid) and V_k (2x2) turns field values into displacements of p.  The
 * issue's src = A_L * (X + s * D(X / s)) is the case nfields = 1.  Every
 * composition used by the readers (matrix after or before, map after map,
 * elastix Add) is rewritten into this form by pushing affine matrices to the
 * end: M p + V F(G M p) = M (p + Mlin^-1 V F(G M p)), so only the final
 * matrix may be projective.
 *
 * Ownership: an sf_transform owns its field grids; an sf_map (what the warp
 * kernel reads) borrows the grid values of the transform it came from and is
 * valid while that transform lives.  Transforms are built on one thread and
 * are read-only afterwards, so any number of workers may read one. */
#ifndef SCOPEFS_TRANSFORM_H
#define SCOPEFS_TRANSFORM_H

#include <stddef.h>
#include <stdint.h>

#include "scopefs/err.h"

#define SF_MAP_MAX_FIELDS 4

typedef enum sf_field_kind {
	SF_FIELD_LINEAR = 1,  /* displacement samples, bilinear, clamped to the edge nodes */
	SF_FIELD_BSPLINE3 = 2 /* cubic B-spline coefficients (elastix/ITK) */
} sf_field_kind;

/* A grid of 2-vectors.  Values are (vx, vy) pairs, row-major, x fastest. */
typedef struct sf_field_grid {
	sf_field_kind kind;
	uint32_t w, h;          /* nodes per row, rows */
	float *v;               /* 2 * w * h floats, owned */
	float vmin[2], vmax[2]; /* extremes of each component (set by sf_field_grid_finish) */
	uint64_t id;            /* unique per grid made in this process (GPU upload cache key) */
} sf_field_grid;

/* One displacement step p += V * F(G * p), self-contained so a copy can be
 * sent to a GPU with only `v` replaced. */
typedef struct sf_field_step {
	sf_field_kind kind;
	uint32_t w, h;
	const float *v;         /* the grid's values (borrowed) */
	float vmin[2], vmax[2]; /* the grid's value extremes */
	uint64_t grid_id;
	double g[6];  /* grid index = [g0 g1 g2; g3 g4 g5] * (px, py, 1) */
	double vm[4]; /* displacement = [vm0 vm1; vm2 vm3] * value */
} sf_field_step;

typedef struct sf_map {
	unsigned nfields;
	sf_field_step field[SF_MAP_MAX_FIELDS];
	double m[9];    /* final homogeneous matrix, row-major */
	int projective; /* m[6], m[7] != 0 or m[8] != 1 */
} sf_map;

typedef struct sf_transform {
	sf_map map;                              /* level-0 reference px -> level-0 moving px */
	unsigned ngrids;                         /* grids owned (== map.nfields) */
	sf_field_grid *grids[SF_MAP_MAX_FIELDS]; /* owned; map.field[i] reads grids[i] */
} sf_transform;

/* --- field grids ---------------------------------------------------------- */

/* A w x h grid of zero vectors; NULL (and e filled) when out of memory or
 * when w or h is 0 or above 1 << 20. */
sf_field_grid *sf_field_grid_create(sf_field_kind kind, uint32_t w, uint32_t h, sf_err *e);
/* Record the value extremes; call after filling v.  Returns SF_EFORMAT when a
 * value is not finite. */
int sf_field_grid_finish(sf_field_grid *g, sf_err *e);
void sf_field_grid_free(sf_field_grid *g);

/* --- building transforms (all leave t unchanged on failure) ---------------- */

void sf_transform_init(sf_transform *t);    /* the identity */
void sf_transform_release(sf_transform *t); /* frees the grids; t becomes the identity */

/* t := M o t (M applied after t).  Any M except one with m[8] == 0 and no
 * projective row; returns SF_EINVAL for a singular M. */
int sf_transform_then_matrix(sf_transform *t, const double m[9], sf_err *e);
/* t := t o M (M applied first).  M must be affine and invertible when t has
 * fields; otherwise any invertible M. */
int sf_transform_first_matrix(sf_transform *t, const double m[9], sf_err *e);
/* t := (p -> p + V F(G p)) o t.  Takes g in every case (freed on failure).
 * t's matrix must be affine and invertible. */
int sf_transform_then_field(sf_transform *t, sf_field_grid *g, const double gmap[6],
                            const double vm[4], sf_err *e);
/* t := u o t (u applied after t); u's grids move into t and u becomes the
 * identity (on failure u is released). */
int sf_transform_then(sf_transform *t, sf_transform *u, sf_err *e);
/* elastix "Add": t := t + u - identity, i.e. x -> t(x) + u(x) - x.  Only
 * representable (and so supported) when t and u hold at most one field
 * between them and both matrices are affine; else SF_EUNSUPPORTED.  u's
 * grids move into t; u is released either way. */
int sf_transform_add(sf_transform *t, sf_transform *u, sf_err *e);

/* --- evaluating ----------------------------------------------------------- */

/* The source point of output point (x, y) under m. */
void sf_map_point(const sf_map *m, double x, double y, double *sx, double *sy);

/* The map from output level pixels (downsample out_ds per axis of the
 * reference's level 0) to source level pixels (downsample src_ds of the
 * moving slide's level 0), with the pixel-centre rule above:
 *     out = S(src_ds)^-1 o t o S(out_ds),  S(f): x0 = (x + 0.5) f - 0.5. */
void sf_transform_level_map(const sf_transform *t, const double out_ds[2], const double src_ds[2],
                            sf_map *out);

/* Source level-0 pixels per output level-0 pixel: sqrt(|det|) of the final
 * matrix's linear part (fields, being displacements, are left out). */
double sf_transform_scale(const sf_transform *t);

/* 3x3 helpers (row-major): out = a * b (out may alias), inverse (SF_EINVAL
 * when |det| is tiny relative to the entries). */
void sf_mat3_mul(const double a[9], const double b[9], double out[9]);
int sf_mat3_inverse(const double a[9], double out[9]);

/* --- reading transform files (src/io/transform_file.c) -------------------- */

/* Physical units for elastix and ITK files, which map fixed physical points
 * to moving physical points.  A pixel size of 0 means "unknown": the
 * reference then takes the elastix file's fixed-image Spacing/Origin/
 * Direction (1 for ITK files) and the moving slide takes the reference's
 * geometry.  A known pixel size means origin 0, identity direction, that
 * spacing. */
typedef struct sf_tf_units {
	double ref_px[2]; /* reference level-0 pixel size (x, y) */
	double mov_px[2]; /* moving level-0 pixel size (x, y) */
} sf_tf_units;

/* Read the transform at path into t (initialised here; release it after).
 * path may be a JSON file (ours, with "scopefs_transform"/"matrix", or
 * wsireg's *_transformations.json: {edge: [elastix maps as {key: [strings]}]}),
 * an elastix TransformParameters file, an ITK transform file (.tfm, or .txt
 * starting "#Insight Transform File"), or a folder as elastix writes it (its
 * highest-numbered TransformParameters.N.txt).
 * units may be NULL (all unknown).  A malformed file fails with SF_EFORMAT
 * and a message "FILE:LINE: what is wrong"; a valid file we cannot represent
 * fails with SF_EUNSUPPORTED; a map whose composed coefficients pass 1e15 in
 * magnitude (each value finite, their product not) fails with SF_EFORMAT.
 * The file, a field TIFF it names, and a MetaImage's data file must be
 * regular files (a FIFO would block). */
int sf_transform_load(const char *path, const sf_tf_units *units, sf_transform *t, sf_err *e);

/* The files a load read, in the order read, each once: path itself first
 * (a folder for elastix output), then the TransformParameters.N.txt chosen
 * in that folder, chained elastix files, a field TIFF, a MetaImage header
 * and its data file.  A caller that keeps the transform watches them all:
 * rewriting any of them changes the warp (mount.c). */
typedef struct sf_tf_files {
	char **paths; /* owned, as the loader opened them */
	size_t count;
} sf_tf_files;

/* sf_transform_load that also lists the files it read into *files (filled
 * here from empty: what it held is not freed).  On failure the list is
 * empty.  files may be NULL: that is sf_transform_load. */
int sf_transform_load_files(const char *path, const sf_tf_units *units, sf_transform *t,
                            sf_tf_files *files, sf_err *e);
/* Frees the paths; files becomes empty. */
void sf_tf_files_free(sf_tf_files *files);
int sf_transform_load_json(const char *path, sf_transform *t, sf_err *e);
int sf_transform_load_elastix(const char *path, const sf_tf_units *units, sf_transform *t,
                              sf_err *e);
int sf_transform_load_itk(const char *path, const sf_tf_units *units, sf_transform *t, sf_err *e);

#endif

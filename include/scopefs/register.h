/* register.h — registration compute core: preprocessing, a similarity search
 * robust to any rotation, mirroring and large shifts, and intensity-based
 * refinement, on grey float32 images in memory (no I/O).  docs/registration.md.
 *
 * Images are thumbnails (low pyramid levels, ~250-2000 px) of one grey
 * channel each, prepared so that background is near 0 and tissue is
 * positive (sf_reg_normalise for fluorescence, sf_reg_od_grey for RGB
 * brightfield).  Coordinates follow transform.h: pixel centres at integers.
 *
 * Every result is a BACKWARD map m (3x3, row-major, affine) from reference
 * thumbnail pixels to moving thumbnail pixels: ref(x) ~ mov(m x).
 * sf_reg_to_transform turns it into an sf_transform between level-0 pixels.
 *
 * All functions are pure and re-entrant: any number may run at once on
 * different threads (FFTW's planner is made thread-safe once per process). */
#ifndef SCOPEFS_REGISTER_H
#define SCOPEFS_REGISTER_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "scopefs/err.h"
#include "scopefs/pixel.h"
#include "scopefs/transform.h"

/* A grey image: w * h floats, row-major, x fastest. */
typedef struct sf_reg_image {
	uint32_t w, h;
	float *px; /* owned when made by sf_reg_image_alloc */
} sf_reg_image;

/* w x h zeros; SF_EINVAL for an empty or huge (> 2^15 per side) size. */
int sf_reg_image_alloc(sf_reg_image *im, uint32_t w, uint32_t h, sf_err *e);
void sf_reg_image_free(sf_reg_image *im); /* im becomes empty; NULL px is fine */

/* --- preprocessing -------------------------------------------------------- */

/* One sample (channel `channel` of `samples` interleaved) of a w x h buffer
 * (rows `stride` bytes apart) as float, into im (allocated here). */
int sf_reg_image_from_channel(const void *px, size_t stride, uint32_t w, uint32_t h, sf_dtype dtype,
                              uint32_t samples, uint32_t channel, sf_reg_image *im, sf_err *e);

/* Percentile stretch in place: the lo_pct and hi_pct percentiles (0..100) of
 * the image map to 0 and 1, values outside are clamped.  Fluorescence: lo is
 * the background level (a low percentile, e.g. 1), hi a bright level below
 * the saturated specks (e.g. 99.5).  A flat image becomes all 0. */
int sf_reg_normalise(sf_reg_image *im, double lo_pct, double hi_pct, sf_err *e);

typedef enum sf_reg_od_mode {
	SF_REG_OD_TOTAL = 0,       /* mean optical density of R, G, B */
	SF_REG_OD_HEMATOXYLIN = 1, /* hematoxylin amount by Ruifrok-Johnston colour deconvolution */
} sf_reg_od_mode;

/* RGB brightfield (uint8, `samples` >= 3 interleaved, the first three R, G,
 * B) to a grey image where tissue is bright and glass is 0: the optical
 * density OD_c = -log10((I_c + 1) / 256) per channel, then either their mean
 * or the hematoxylin component (stain vectors of Ruifrok & Johnston 2001,
 * H&E-DAB), clamped at 0.  im is allocated here. */
int sf_reg_od_grey(const uint8_t *rgb, size_t stride, uint32_t w, uint32_t h, uint32_t samples,
                   sf_reg_od_mode mode, sf_reg_image *im, sf_err *e);

/* In-place separable Gaussian blur (sigma in pixels, taps to 3 sigma,
 * edges replicated).  sigma <= 0 does nothing. */
int sf_reg_gauss(sf_reg_image *im, double sigma, sf_err *e);

/* Tissue mask: Otsu's threshold (256-bin histogram between the image's
 * extremes) on a Gaussian-smoothed copy (sigma px); mask[i] = 1 where the
 * smoothed value is above it, else 0.  mask holds w * h bytes.  *threshold
 * (may be NULL) receives the threshold in image units. */
int sf_reg_tissue_mask(const sf_reg_image *im, double sigma, uint8_t *mask, double *threshold,
                       sf_err *e);

/* --- registration ---------------------------------------------------------- */

typedef enum sf_reg_model {
	SF_REG_SIMILARITY = 1, /* rotation, uniform scale, translation (and the mirror found) */
	SF_REG_AFFINE = 2,     /* any affine map (the mirror found first is kept) */
} sf_reg_model;

typedef struct sf_reg_opts {
	sf_reg_model model; /* degrees of freedom of the refinement */
	int try_mirror;     /* also search the mirrored moving image (1) */
	double max_scale;   /* scales outside [1/max_scale, max_scale] are not searched */
	uint32_t init_dim;  /* longest side of the images for the Fourier-Mellin search */
	uint32_t min_dim;   /* longest side of the coarsest refinement level */
	uint32_t max_dim;   /* finest refinement level: the first whose longest side <= this
	                       (0: the thumbnails themselves) */
	int max_iter;       /* Gauss-Newton (metric MI: BFGS) iterations per level */
	int candidates;     /* rotation/scale peaks tried, each at angle and angle + 180 */
	int metric;         /* SF_REG_METRIC_NCC (0, the default) or SF_REG_METRIC_MI */
	unsigned threads;   /* threads of one call (its own small pool; 0 or 1: the
	                       caller's only); the result does not depend on it */
} sf_reg_opts;

/* The similarity measure that the refinement maximises.  NCC suits the
 * same stain (intensities related by a gain and bias); MI (Mattes mutual
 * information) suits different stains, where the relation between the two
 * images' intensities may be any function, even a non-monotonic one.  With
 * MI the initialisation searches both the moving intensities and their
 * negation, ranks all candidates by MI and refines the best 10 (instead
 * of 5) by MI. */
typedef enum sf_reg_metric {
	SF_REG_METRIC_NCC = 0,
	SF_REG_METRIC_MI = 1,
} sf_reg_metric;

/* model SIMILARITY, try_mirror 1, max_scale 1.6, init_dim 256, min_dim 64,
 * max_dim 0, max_iter 40, candidates 8, metric NCC, threads 1. */
void sf_reg_opts_default(sf_reg_opts *o);

typedef struct sf_reg_result {
	double m[9];      /* backward map, reference thumbnail px -> moving thumbnail px */
	double ncc;       /* normalised cross-correlation at the finest level, over the
	                     reference pixels (in the mask) whose source is inside the moving image */
	double mi;        /* metric MI: Mattes mutual information (nats, sf_reg_mi) at the
	                     finest level over the same pixels; metric NCC: 0 */
	double overlap;   /* fraction of those reference pixels */
	double scale;     /* sqrt |det| of m's linear part */
	double angle_deg; /* rotation of m's linear part after taking out the mirror */
	int mirrored;     /* det < 0: the moving slide is the reference's mirror image */
} sf_reg_result;

/* Similarity initialisation (Fourier-Mellin): rotation and scale from the
 * phase correlation of the log-polar magnitude spectra, translation from the
 * phase correlation of the images, for each of the best `candidates`
 * rotation/scale peaks at angle and angle + 180 degrees, on the moving image
 * and (try_mirror) its mirror.  The five best distinct candidates by NCC
 * are each refined (similarity, up to the init_dim level) and the one with
 * the best NCC over the overlap wins (discounted when the overlap is under
 * a fifth of the reference).  Metric MI: see sf_reg_metric; the candidates
 * are refined up to half the init_dim level and judged by MI.
 * Any angle, shifts up to about the image size.  r->ncc and r->overlap are
 * those of the refinement at that level. */
int sf_reg_init_similarity(const sf_reg_image *ref, const sf_reg_image *mov, const sf_reg_opts *o,
                           sf_reg_result *r, sf_err *e);

/* Refine r->m (the start) in place: Gauss-Newton on the sum of squared
 * differences between ref and gain * mov(m x) + bias (gain and bias solved
 * along, so it maximises NCC), coarse to fine over box-halved pyramids, with
 * robust (Geman-McClure) weights so missing tissue pieces do not pull.
 * ref_mask (w * h bytes of ref, nonzero = use; NULL = all pixels) restricts
 * the pixels compared.  Fills every field of r.  Metric MI: sf_reg_refine_mi. */
int sf_reg_refine(const sf_reg_image *ref, const uint8_t *ref_mask, const sf_reg_image *mov,
                  const sf_reg_opts *o, sf_reg_result *r, sf_err *e);

/* Mutual information of ref against mov(m x) (m as in sf_reg_result) over
 * the reference pixels in the mask (NULL = all) whose source lies between
 * mov's edge pixel centres, mov sampled bilinearly, no blur.  Mattes'
 * estimator with `bins` bins per axis (8..64): reference value a falls in bin
 * floor((a - amin) / (amax - amin) * bins) (the last bin takes amax), amin
 * and amax its extremes over the mask; the moving value b spreads over bins
 * by a cubic B-spline window centred at 2 + (b - bmin) / (bmax - bmin) *
 * (bins - 5), bmin and bmax mov's extremes.  MI = sum p log(p / (pa pb)),
 * natural log.  *overlap (may be NULL) receives the fraction of the mask
 * pixels used.  0 when either image is flat or fewer than 16 pixels count. */
double sf_reg_mi(const sf_reg_image *ref, const uint8_t *ref_mask, const sf_reg_image *mov,
                 const double m[9], int bins, double *overlap);

/* sf_reg_refine for metric MI (sf_reg_refine calls it): maximises sf_reg_mi
 * (32 bins at the finer levels, 16 at the coarse ones) by BFGS with a
 * backtracking line search on its analytic gradient, coarse to fine over
 * the same pyramid levels, blur and pixels as the NCC refinement.  Keeps
 * the result only if its MI at the finest level is at least the start's. */
int sf_reg_refine_mi(const sf_reg_image *ref, const uint8_t *ref_mask, const sf_reg_image *mov,
                     const sf_reg_opts *o, sf_reg_result *r, sf_err *e);

/* sf_reg_init_similarity then sf_reg_refine. */
int sf_reg_register(const sf_reg_image *ref, const uint8_t *ref_mask, const sf_reg_image *mov,
                    const sf_reg_opts *o, sf_reg_result *r, sf_err *e);

/* The level-0 transform of a thumbnail map m: ref_ds and mov_ds are the
 * thumbnails' downsample factors (level-0 pixels per thumbnail pixel, per
 * axis), so T0 = S(mov_ds) o m o S(ref_ds)^-1 with S(f): x -> (x + 0.5) f - 0.5.
 * t is initialised here. */
int sf_reg_to_transform(const double m[9], const double ref_ds[2], const double mov_ds[2],
                        sf_transform *t, sf_err *e);

/* Fill r's scale, angle_deg and mirrored from r->m. */
void sf_reg_describe(sf_reg_result *r);

/* --- non-rigid ------------------------------------------------------------- */

/* A displacement field on the reference thumbnail's grid reduced by `step`:
 * node (i, j) sits at reference thumbnail pixel ((i + 0.5) * step - 0.5,
 * (j + 0.5) * step - 0.5) (pixel-centre rule of transform.h); d holds
 * 2 * w * h floats (dx, dy per node, x fastest) in reference THUMBNAIL
 * pixels.  The non-rigid model is  ref(x) ~ mov(m (x + D(x))), D bilinear
 * between nodes, clamped to the edge nodes outside. */
typedef struct sf_reg_field {
	uint32_t w, h;
	uint32_t step;
	float *d;        /* owned */
	double jac_min;  /* minimum Jacobian determinant of x -> x + D(x) over the nodes
	                    (1 = no deformation; <= 0 = folded) */
	double disp_max; /* largest |D| in thumbnail px */
} sf_reg_field;

/* Multi-resolution diffeomorphic demons with symmetric forces on locally
 * normalised images (docs/registration.md, "Non-rigid").  Sigmas and steps
 * are in pixels of the pyramid level being worked on. */
typedef struct sf_reg_nonrigid_opts {
	uint32_t step;      /* node spacing in thumbnail px (>= 1); default 1 */
	uint32_t min_dim;   /* longest side of the coarsest level (>= 8) */
	uint32_t max_dim;   /* finest level: first with longest side <= this (0: the thumbnail) */
	int iter_coarse;    /* demons iterations at each level coarser than the finest (>= 0) */
	int iter_fine;      /* demons iterations at the finest level (>= 0) */
	double sigma_fluid; /* Gaussian smoothing of each update (0..20) */
	double sigma_diff;  /* Gaussian smoothing of the field after each update (0..20) */
	double sigma_norm;  /* window of the local mean/contrast normalisation (> 0, <= 20) */
	double max_step;    /* largest update per iteration (> 0, <= 10) */
	double grad_floor;  /* damping added to |J|^2, in mean |grad Nref|^2 (>= 0) */
	unsigned threads;   /* threads of this call (its own small pool; 0 or 1: the
	                       caller's only); the result does not depend on it */
	const atomic_int *stop; /* once nonzero, the call ends before its next iteration
	                           with SF_EINTR and no field (NULL: never) */
} sf_reg_nonrigid_opts;

/* step 1, min_dim 32, max_dim 1024, iter_coarse 60, iter_fine 30,
 * sigma_fluid 1, sigma_diff 2, sigma_norm 4, max_step 0.5, grad_floor 2,
 * threads 1, no stop flag. */
void sf_reg_nonrigid_opts_default(sf_reg_nonrigid_opts *o);

/* Given ref (with optional mask, w*h bytes, nonzero = tissue) and mov already
 * aligned by the affine backward map m (ref thumb px -> mov thumb px, from
 * sf_reg_register), find D.  f is filled (allocated here; free with
 * sf_reg_field_free).  Pure and re-entrant.  The zero field is returned
 * when the deformation does not lower the mismatch of the normalised images
 * at the finest level.  SF_EINVAL for empty images, a non-affine m or bad
 * options; SF_ENOMEM; SF_EINTR when o->stop was set (out is then empty). */
int sf_reg_nonrigid(const sf_reg_image *ref, const uint8_t *mask, const sf_reg_image *mov,
                    const double m[9], const sf_reg_nonrigid_opts *o, sf_reg_field *f, sf_err *e);
void sf_reg_field_free(sf_reg_field *f); /* f becomes empty; an empty f is fine */

/* Fill f->jac_min and f->disp_max from f's nodes (the Jacobian by central
 * differences, one-sided at the edges; lengths in f's px). */
void sf_reg_field_stats(sf_reg_field *f);

/* D at reference thumbnail point (x, y) (bilinear between nodes, clamped to
 * the edge nodes), in thumbnail px. */
void sf_reg_field_at(const sf_reg_field *f, double x, double y, double *dx, double *dy);

/* Level-0 transform T0 = S(mov_ds) o m o (id + D) o S(ref_ds)^-1, S(f): x -> (x + 0.5) f - 0.5,
 * built with sf_transform_then_field / sf_transform_then_matrix (transform.h) as ONE linear
 * (SF_FIELD_LINEAR) field step followed by the matrix. t initialised here. */
int sf_reg_to_transform_field(const double m[9], const sf_reg_field *f, const double ref_ds[2],
                              const double mov_ds[2], sf_transform *t, sf_err *e);

#endif

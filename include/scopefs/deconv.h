/* deconv.h — LsDeconv-style Richardson-Lucy deconvolution of one 3D block.
 *
 * Pure compute: no files, no FUSE, no TIFF.  The caller cuts a block (core
 * plus halo) out of the stack, hands it here as float32 v[z][y][x], and gets
 * the deconvolved block of the same shape back.  The engine (FFTW on the
 * host, cuFFT on a GPU) is an sf_fft_ops table chosen by the caller.
 *
 * Lifecycle: sf_deconv_params_default, set fields, sf_deconv_params_validate;
 * sf_psf_make (psf.h) once per stack; then per worker sf_deconv_ctx_create
 * for a block shape, sf_deconv_block for each block of that shape,
 * sf_deconv_ctx_destroy.  A context holds the plan, the OTF and every
 * working buffer (the "scratch"), so blocks after the first allocate nothing.
 * One context is used by one thread at a time. */
#ifndef SCOPEFS_DECONV_H
#define SCOPEFS_DECONV_H

#include <stdatomic.h>
#include <stddef.h>

#include "scopefs/err.h"
#include "scopefs/fft.h"
#include "scopefs/psf.h"

/* Parameters, named as decwrap.py names them; units as LsDeconv takes them. */
typedef struct sf_deconv_params {
	/* Optics (the PSF): */
	double dxy;       /* lateral voxel size, nm */
	double dz;        /* plane spacing, nm */
	double lambda_ex; /* excitation wavelength, nm */
	double lambda_em; /* emission wavelength, nm */
	double na;        /* detection NA; default 0.40 */
	double rf;        /* refractive index; default 1.42 */
	double fcyl;      /* cylinder lens focal length, mm; default 240 */
	double slitwidth; /* slit width, mm; default 12 */

	/* Richardson-Lucy: */
	int numit;               /* iterations; default 6 */
	double lambda_damping;   /* blend weight of R26*x in [0, 1); default 0 */
	int regularize_interval; /* Gaussian (sigma 0.5) every n-th iteration; 0 off; default 3 */
	double stop_criterion;   /* stop when ||x|| changes by <= this many percent; 0 off */
	int accelerate; /* Biggs-Andrews extrapolation (beyond LsDeconv): 1 on, 0 off (default) */

	/* Block pre-processing: */
	double gaussian_sigma[3];    /* x y z, voxels; 0 on an axis skips it; default .5 .5 2.5 */
	int gaussian_filter_size[3]; /* x y z taps, odd; default 13 13 25 */
	double dark; /* default 0; subtracted after the filter, then clamped at 0 (always) */
	int taper;   /* blend edges into the PSF-blurred block; default 1 */

	/* Output scaling, used by the caller's scaler; validated here: */
	double clipval; /* percentile for the upper clip, (50, 100]; default 99.99 */

	/* Beyond LsDeconv, for testing and tuning: */
	size_t fft_shape[3]; /* x y z padded size; 0 = smallest 7-smooth >= n + psf - 1 */
	double init_value;   /* x0: 0 = the observed block (LsDeconv); > 0 = this constant */
	float eps;           /* floor of Hx in the ratio; default 1.19e-7 (FLT_EPSILON) */
} sf_deconv_params;

typedef struct sf_dims3 {
	size_t nx, ny, nz; /* x fastest */
} sf_dims3;

/* Per-block report. */
typedef struct sf_deconv_stats {
	int iterations;     /* iterations run (< numit when the stop criterion hit) */
	double last_change; /* relative change of ||x|| in the last iteration, percent */
} sf_deconv_stats;

typedef struct sf_deconv_ctx sf_deconv_ctx;

/* decwrap.py's defaults; wavelengths and spacings are 0 (the caller must set them). */
void sf_deconv_params_default(sf_deconv_params *p);

/* Reject nonsense with a message naming the option: non-positive spacings or
 * wavelengths, na >= rf, numit < 1, lambda_damping outside [0, 1), negative
 * sigma, an even or non-positive filter size, clipval outside (50, 100], ... */
int sf_deconv_params_validate(const sf_deconv_params *p, sf_err *e);

/* The optics part of p, for sf_psf_make. */
void sf_deconv_params_optics(const sf_deconv_params *p, sf_psf_optics *o);

/* The smallest 2,3,5,7-smooth integer >= n. */
size_t sf_deconv_smooth7(size_t n);

/* The padded FFT shape of a context for blocks of shape n and a PSF of shape
 * psf: given[a] where nonzero (NULL: none), else the 7-smooth size from
 * n + psf - 1 up to 4/3 of it (a multiple of 4 along x) that a fixed cost
 * model of the FFTW engine finds fastest.  A pure function of its inputs. */
sf_dims3 sf_deconv_fft_dims(sf_dims3 n, sf_dims3 psf, const size_t given[3]);

/* Make a context for blocks of shape dims with the given PSF (copied) on the
 * engine ops (cfg chooses threads or device).  SF_EDEVICE when a GPU engine
 * cannot get its memory: the caller may retry with the FFTW engine. */
int sf_deconv_ctx_create(const sf_deconv_params *p, const sf_psf *psf, sf_dims3 dims,
                         const sf_fft_ops *ops, const sf_fft_config *cfg, sf_deconv_ctx **out,
                         sf_err *e);
void sf_deconv_ctx_destroy(sf_deconv_ctx *ctx);

/* The padded FFT shape the context works on. */
sf_dims3 sf_deconv_ctx_fft_shape(const sf_deconv_ctx *ctx);

/* Set a flag that, once nonzero, stops sf_deconv_block between iterations
 * with SF_EINTR (FUSE interrupt, unmount).  NULL clears it. */
void sf_deconv_ctx_set_stop(sf_deconv_ctx *ctx, const atomic_int *stop);

/* Deconvolve one block: in and out are dims.nx*dims.ny*dims.nz floats (they
 * may be the same array).  stats may be NULL. */
int sf_deconv_block(sf_deconv_ctx *ctx, const float *in, float *out, sf_deconv_stats *stats,
                    sf_err *e);

/* One-shot form: context, block, destroy. */
int sf_deconv_block_once(const sf_deconv_params *p, const sf_psf *psf, sf_dims3 dims,
                         const float *in, float *out, const sf_fft_ops *ops,
                         const sf_fft_config *cfg, sf_err *e);

#endif

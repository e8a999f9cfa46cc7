/* fft.h — the compute engines behind Richardson-Lucy, as an ops table.
 *
 * Like SQLite's VFS or Redis's ae_*.c, one function set has two
 * implementations picked at run time: FFTW single precision on the host
 * (fft_fftw.c, always built) and cuFFT on a GPU (fft_cufft.cu, built when
 * nvcc is found; SF_HAVE_CUDA).  deconv.c drives the iterations only through
 * this table, so CPU and GPU run the same algorithm step for step and every
 * iteration stays in the engine's memory (device memory for cuFFT).
 *
 * A plan is made for one real 3D shape (nz, ny, nx), x fastest; its complex
 * spectrum has nz * ny * (nx/2 + 1) values (R2C half spectrum).  Buffers are
 * engine memory (opaque to the caller: host for FFTW, device for cuFFT) and
 * move to and from the host only through upload/download.  A plan and its
 * buffers belong to one worker thread at a time.  The forward transform keeps
 * its input; the inverse one is unnormalised (a round trip scales by
 * nx*ny*nz) and may overwrite its complex input. */
#ifndef SCOPEFS_FFT_H
#define SCOPEFS_FFT_H

#include <stddef.h>

#include "scopefs/err.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct sf_fft_plan sf_fft_plan; /* engine-specific; opaque */

/* Voxels lo[a] <= i < hi[a] on each axis a (x y z) of a plan's real shape. */
typedef struct sf_fft_box {
	size_t lo[3], hi[3];
} sf_fft_box;

/* rl_step flags. */
enum { SF_FFT_KEEP_SPECTRUM = 1, SF_FFT_SPECTRUM_READY = 2 };

typedef struct sf_fft_config {
	int nthreads; /* FFTW: threads per transform (>= 1); ignored by cuFFT */
	int measure;  /* FFTW: plan with FFTW_MEASURE (slow first plan, faster runs) */
	int device;   /* cuFFT: CUDA device ordinal; ignored by FFTW */
} sf_fft_config;

typedef struct sf_fft_ops {
	const char *name; /* "fftw" or "cufft" */

	/* Make a plan for a real nz x ny x nx shape.  SF_EDEVICE when the GPU
	 * cannot (out of memory, no device), SF_ENOMEM on the host. */
	int (*plan_create)(const sf_fft_config *cfg, size_t nz, size_t ny, size_t nx,
	                   sf_fft_plan **out, sf_err *e);
	void (*plan_destroy)(sf_fft_plan *p);

	/* A real (nz*ny*nx floats) or complex (nz*ny*(nx/2+1) pairs) buffer. */
	int (*buf_alloc)(sf_fft_plan *p, int is_complex, void **out, sf_err *e);
	void (*buf_free)(sf_fft_plan *p, void *buf);

	/* Copy a whole real buffer between host and engine memory. */
	int (*upload)(sf_fft_plan *p, void *dst, const float *src, sf_err *e);
	int (*download)(sf_fft_plan *p, float *dst, const void *src, sf_err *e);

	/* Real-to-complex forward; complex-to-real inverse (unnormalised). */
	int (*forward)(sf_fft_plan *p, const void *real_in, void *cplx_out, sf_err *e);
	int (*inverse)(sf_fft_plan *p, void *cplx_in, void *real_out, sf_err *e);

	/* x[k] *= h[k], or x[k] *= conj(h[k]) when conj is nonzero. */
	int (*cmul)(sf_fft_plan *p, void *x, const void *h, int conj, sf_err *e);

	/* Richardson-Lucy steps on real buffers. */
	/* hx[k] = y[k] / max(hx[k], eps). */
	int (*rl_ratio)(sf_fft_plan *p, void *hx, const void *y, float eps, sf_err *e);
	/* x[k] = |(1 - lambda) x[k] c[k] + lambda reg[k]|, or |x[k] c[k]| when reg is NULL. */
	int (*rl_update)(sf_fft_plan *p, void *x, const void *c, const void *reg, float lambda,
	                 sf_err *e);
	/* out = R26 * x: the mean of the 26 neighbours, zero outside the shape. */
	int (*r26)(sf_fft_plan *p, const void *x, void *out, sf_err *e);
	/* x = G * x: separable Gaussian of the given sigma (voxels) truncated to
	 * 2*radius+1 taps, normalised, replicate edges; tmp is a real scratch buffer. */
	int (*gauss)(sf_fft_plan *p, void *x, void *tmp, float sigma, int radius, sf_err *e);
	/* The Euclidean norm of x, accumulated in double. */
	int (*norm2)(sf_fft_plan *p, const void *x, double *out, sf_err *e);

	/* Biggs-Andrews acceleration (deconv.h `accelerate`; every engine has
	 * them).  Predict: for every k, v = max(x[k] + alpha (x[k] - prev[k]), 0),
	 * then prev[k] = x[k] and x[k] = origin[k] = v. */
	int (*ba_predict)(sf_fft_plan *p, void *x, void *prev, void *origin, float alpha,
	                  sf_err *e);
	/* Step: g[k] = x[k] - g[k] (g holds the predict's origin on entry), and
	 * dots[0] = sum g[k] g_old[k], dots[1] = sum g_old[k]^2, accumulated in
	 * double in an order that depends only on the shape (both 0 when g_old
	 * is NULL). */
	int (*ba_step)(sf_fft_plan *p, const void *x, void *g, const void *g_old, double dots[2],
	               sf_err *e);

	/* Optional fused forms (NULL where an engine lacks them: deconv.c then
	 * composes the same steps from the ops above).  They use a transfer
	 * function in the engine's own layout, made by make_transfer, and give
	 * the same values as the composed steps to float32 rounding; their
	 * bytes do not depend on the plan's thread count. */
	/* tf = the spectrum of real buffer kernel (kernel kept), laid out for
	 * convolve and rl_step (not for cmul). */
	int (*make_transfer)(sf_fft_plan *p, const void *kernel, void *tf, sf_err *e);
	/* x = H x, or H^T x when conj is nonzero (H: multiplication by tf);
	 * spec is a complex scratch buffer. */
	int (*convolve)(sf_fft_plan *p, void *x, void *spec, const void *tf, int conj, sf_err *e);
	/* One Richardson-Lucy update: c = H^T(y / max(Hx, eps)), then
	 * x = |(1 - lambda) x c + lambda reg|, or |x c| when reg is NULL.
	 * x_box: x and reg are 0 outside it; y_box: y is 0 outside it (NULL:
	 * anywhere).  The engine may skip work on those zeros (the FFTW
	 * engine skips planes and rows outside the boxes), taking c as finite
	 * there: x stays 0 outside x_box.  flags (SF_FFT_*, 0 for none):
	 * KEEP_SPECTRUM leaves in spec what the next step needs of the new x,
	 * and SPECTRUM_READY then tells that next step so (its x and x_box
	 * unchanged in between); an engine may ignore both. */
	int (*rl_step)(sf_fft_plan *p, void *x, const void *y, void *spec, const void *tf,
	               const void *reg, float lambda, float eps, const sf_fft_box *x_box,
	               const sf_fft_box *y_box, unsigned flags, sf_err *e);

	/* Optional block handling in engine memory (NULL where an engine lacks
	 * it: deconv.c then pads, filters and tapers on the host and moves whole
	 * padded buffers).  A GPU engine has them so that only the block itself
	 * crosses the bus, once each way.  "Compact" buffers hold a block of
	 * blk[0] x blk[1] x blk[2] floats (x y z, x fastest) at their start;
	 * padded ones have the plan's shape, the block at offset off[3] (x y z). */
	/* Copy count floats between the host and the start of an engine buffer. */
	int (*upload_n)(sf_fft_plan *p, void *dst, const float *src, size_t count, sf_err *e);
	int (*download_n)(sf_fft_plan *p, float *dst, const void *src, size_t count, sf_err *e);
	/* Padded dst = compact src at off; elsewhere 0, or with replicate the
	 * nearest block voxel. */
	int (*pad)(sf_fft_plan *p, void *dst, const void *src, const size_t blk[3],
	           const size_t off[3], int replicate, sf_err *e);
	/* Compact dst = the block of padded src at off. */
	int (*crop)(sf_fft_plan *p, void *dst, const void *src, const size_t blk[3],
	            const size_t off[3], sf_err *e);
	/* Compact dst = taps (2 radius + 1 of them, host memory) correlated
	 * with compact src along axis (0 x, 1 y, 2 z), replicate edges; the
	 * same sum as filter1d.h's. */
	int (*filter_axis)(sf_fft_plan *p, void *dst, const void *src, const size_t blk[3],
	                   int axis, const float *taps, int radius, sf_err *e);
	/* The first count floats of v: v = max(v - dark, 0). */
	int (*subtract)(sf_fft_plan *p, void *v, size_t count, float dark, sf_err *e);
	/* Compact v = w v + (1 - w) blurred[off + .], blurred padded, w =
	 * ramp_z ramp_y ramp_x, each d / width for the distance d < width to
	 * the nearer face, else 1 (deconv.c's taper; width[3] x y z). */
	int (*taper)(sf_fft_plan *p, void *v, const void *blurred, const size_t blk[3],
	             const size_t off[3], const size_t width[3], sf_err *e);
	/* The first count floats of v = value. */
	int (*fill)(sf_fft_plan *p, void *v, size_t count, float value, sf_err *e);
} sf_fft_ops;

/* The FFTW engine (always present). */
const sf_fft_ops *sf_fft_fftw_ops(void);

/* Whether the real buffers of ops are plain host floats in the plan's
 * shape that the caller may read and write in place: true for an ops
 * table whose upload is the FFTW engine's (its buffers are fftwf_malloc'd
 * host memory), false for cuFFT.  deconv.c then pads into and crops out of
 * them without the copies of upload and download. */
int sf_fft_host_buffers(const sf_fft_ops *ops);

/* FFTW wisdom: import merges the file at path into the process's wisdom,
 * export writes it (atomically: temp file + rename).  A missing file on
 * import is SF_ENOTFOUND. */
int sf_fft_fftw_wisdom_import(const char *path, sf_err *e);

/* FFTW's planner (plan creation and destruction) is not thread-safe: every
 * caller in the process that plans with fftwf directly takes this lock, the
 * one fft_fftw.c plans under. */
void sf_fft_fftw_planner_lock(void);
void sf_fft_fftw_planner_unlock(void);
int sf_fft_fftw_wisdom_export(const char *path, sf_err *e);

/* Drop the process-wide FFTW plan cache (plans are shared per shape by all
 * workers).  Call only when no plan made by sf_fft_fftw_ops() is alive. */
void sf_fft_fftw_cleanup(void);

#ifdef SF_HAVE_CUDA
/* The cuFFT engine.  All buffers live on cfg->device. */
const sf_fft_ops *sf_fft_cufft_ops(void);

/* Number of usable CUDA devices; 0 when there is no driver or device. */
int sf_fft_cuda_device_count(void);

/* Free and total memory of a device in bytes (cudaMemGetInfo); SF_EDEVICE
 * when it cannot be asked.  Initialises CUDA in the calling process: not
 * before a fork whose child uses the device. */
int sf_fft_cuda_mem_info(int device, size_t *free_bytes, size_t *total_bytes, sf_err *e);
#endif

#ifdef __cplusplus
}
#endif

#endif

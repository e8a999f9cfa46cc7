/* destripe.h — LsDeconv's destriping along z (filter_subband_3d_z.m) of one block.
 *
 * Pure compute: libc and libm only (no FFTW, no files), so it builds on the
 * lent GPU machine with the rest of the core.  A block is float32 v[z][y][x]
 * (x fastest), as deconv.h hands it back.
 *
 * For every XZ slice (fixed y): log1p, a db9 2D wavelet decomposition at the
 * maximum level in half-point symmetric extension (MATLAB dwtmode 'sym',
 * pywt mode 'symmetric'), each level's detail band that is smooth along z and
 * sharp along x (MATLAB's H of the slice laid out (x, z); pywt's cV of our
 * (z, x) layout) multiplied along z in Fourier space by the notch
 * 1 - exp(-k^2 / (2 s^2)), the inverse transform, expm1.  docs/deconvolution.md
 * ("Destriping along z") gives s, k and the sources.
 *
 * The db9 transform is exposed too (sf_db9_wavedec2 / sf_db9_waverec2), with
 * coefficient shapes and band names exactly as pywt.wavedec2/waverec2 give
 * them for a row-major array, so tests can hold it against pywt directly.
 *
 * Every function here is reentrant: no globals, all scratch is allocated per
 * call and freed before it returns. */
#ifndef SCOPEFS_DESTRIPE_H
#define SCOPEFS_DESTRIPE_H

#include <stddef.h>
#include <stdint.h>

#include "scopefs/err.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Destripe one block in place.  sigma is LsDeconv's destripe_sigma
 * (decwrap.py recommends about 1000 for old cameras); sigma <= 0 returns at
 * once with the block untouched, as does a slice too small for one db9 level
 * (nz or nx below 17).  Values must be > -1 (log1p); deconvolved blocks are
 * >= 0.  SF_EINVAL for a NULL block or a NaN/infinite sigma, SF_ENOMEM when
 * scratch (about 4 slices of floats) cannot be had. */
int sf_destripe_z(float *block, uint32_t nz, uint32_t ny, uint32_t nx, double sigma, sf_err *e);

/* The notch gain at frequency index k (0 <= k <= n/2) for a level whose
 * band is n coefficients long along z, in a slice nx wide. */
double sf_destripe_gain(double sigma, size_t n, uint32_t nx, size_t k);

#define SF_DB9_TAPS       18
#define SF_DB9_MAX_LEVELS 32

/* pywt.dwt_max_level(min(rows, cols), 18): the largest L with 17 * 2^L <= min
 * (0 when the smaller side is under 17). */
unsigned sf_db9_max_level(size_t rows, size_t cols);

/* A 2D db9 decomposition of a rows x cols row-major image.  Level 1 is the
 * finest.  rows[0], cols[0] are the image's; rows[l], cols[l] the shape of
 * every band of level l, floor((rows[l-1] + 17) / 2) and likewise for cols.
 * Band names follow pywt for axis 0 = rows: detail[l][0] = cH (high-pass
 * along axis 0, low-pass along axis 1), detail[l][1] = cV (low-pass along
 * axis 0, high-pass along axis 1), detail[l][2] = cD. */
typedef struct sf_wavedec2 {
	unsigned levels;                         /* L */
	size_t rows[SF_DB9_MAX_LEVELS + 1];      /* per level, 0 = the image */
	size_t cols[SF_DB9_MAX_LEVELS + 1];      /* per level, 0 = the image */
	float *approx;                           /* rows[L] x cols[L]; owned */
	float *detail[SF_DB9_MAX_LEVELS + 1][3]; /* [1..L][cH, cV, cD]; owned */
} sf_wavedec2;

/* Decompose img (rows x cols floats) into levels levels (1 to
 * sf_db9_max_level).  On success w owns its arrays (sf_wavedec2_free); on
 * failure w holds nothing.  SF_EINVAL for a bad level count, SF_ENOMEM. */
int sf_db9_wavedec2(const float *img, size_t rows, size_t cols, unsigned levels, sf_wavedec2 *w,
                    sf_err *e);

/* Rebuild the rows[0] x cols[0] image from w into img (w is not changed). */
int sf_db9_waverec2(const sf_wavedec2 *w, float *img, sf_err *e);

void sf_wavedec2_free(sf_wavedec2 *w);

#ifdef __cplusplus
}
#endif

#endif

/* psf.h — LsDeconv's light-sheet point spread function (LsMakePSF.m).
 *
 * Lengths are nanometres, fcyl and slitwidth millimetres (as LsDeconv and
 * decwrap.py take them).  A PSF is a dense float array v[z][y][x] (x fastest),
 * odd in every axis, centred, summing to 1.  See docs/deconvolution.md for the
 * formulas and how they were checked. */
#ifndef SCOPEFS_PSF_H
#define SCOPEFS_PSF_H

#include <stddef.h>

#include "scopefs/err.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct sf_psf_optics {
	double dxy;       /* lateral voxel size, nm */
	double dz;        /* axial voxel size (plane spacing), nm */
	double na;        /* detection objective numerical aperture */
	double rf;        /* refractive index of the medium */
	double lambda_ex; /* excitation wavelength, nm */
	double lambda_em; /* emission wavelength, nm */
	double fcyl;      /* focal length of the sheet's cylinder lens, mm */
	double slitwidth; /* width of the slit aperture, mm */
} sf_psf_optics;

typedef struct sf_psf {
	size_t nx, ny, nz; /* samples per axis, each odd */
	double dxy;        /* lateral sampling actually used: dxy_corr, nm */
	double dz;         /* axial sampling, nm */
	double fwhm_xy;    /* lateral FWHM of the light-sheet PSF, nm */
	double fwhm_z;     /* axial FWHM of the light-sheet PSF, nm */
	float *v;          /* nx*ny*nz values, v[(z*ny + y)*nx + x], sum 1; owned */
} sf_psf;

/* Check that o describes a possible microscope (positive spacings and
 * wavelengths, 0 < na < rf, positive fcyl and slitwidth).  SF_EINVAL names
 * the first bad option. */
int sf_psf_optics_validate(const sf_psf_optics *o, sf_err *e);

/* The wide-field paraxial PSF of LsMakePSF: 4 |int_0^1 J0(2 pi na r rho /
 * (lambda n)) exp(-i pi rho^2 z na^2 / (lambda n^2)) rho drho|^2 with
 * r = sqrt(x^2 + y^2); value 1 at the origin. */
double sf_psf_widefield(double x, double y, double z, double na, double n, double lambda);

/* The sheet NA, sin(atan(slitwidth / (2 fcyl))). */
double sf_psf_sheet_na(const sf_psf_optics *o);

/* LsPSFeq: PSF(z, 0, x; NA_ls, rf, lambda_ex) * PSF(x, y, z; na, rf, lambda_em).
 * x is the sheet's propagation axis (its defocus), z the detection axis. */
double sf_psf_lightsheet(double x, double y, double z, const sf_psf_optics *o);

/* The lateral sampling LsDeconv uses: min(dxy, 0.61 lambda_em / na / 3). */
double sf_psf_dxy_corr(const sf_psf_optics *o);

/* Full widths at half maximum of sf_psf_lightsheet along x and along z, found
 * numerically (first half-maximum crossing from the centre). */
int sf_psf_fwhm(const sf_psf_optics *o, double *fwhm_xy, double *fwhm_z, sf_err *e);

/* Build the sampled PSF: spacing dxy_corr and dz, ceil(2 FWHM / step) samples
 * per axis made odd, first octant evaluated and mirrored, normalised to sum 1.
 * More than 4097 samples on an axis (a spacing far below the resolution) is
 * SF_EINVAL, and so is dz over 20 axial or dxy over 20 lateral FWHMs (far
 * above it: LsDeconv.m's nm typed as um); dxy and dz are printed in
 * micrometres (the options' unit).
 * On success *out owns v (free with sf_psf_free); on error *out is zeroed. */
int sf_psf_make(const sf_psf_optics *o, sf_psf *out, sf_err *e);

void sf_psf_free(sf_psf *p);

#ifdef __cplusplus
}
#endif

#endif

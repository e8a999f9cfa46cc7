/* psf.c — LsDeconv's light-sheet PSF model (LsMakePSF.m), sampled on a grid.
 *
 * The Bessel integral is evaluated by composite Gauss-Legendre quadrature;
 * the number of panels grows with the integrand's oscillation (the J0 argument
 * and the defocus phase), so every panel holds well under one period and the
 * 32-point rule is exact to double rounding for these smooth integrands.
 *
 * Invariants: sizes are odd; the grid is built from the first octant and
 * mirrored, so the result is exactly symmetric in x, y and z; it sums to 1. */
#include "scopefs/psf.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define GL_POINTS 32

/* Gauss-Legendre nodes and weights on [-1, 1], computed once by gl_init under
 * pthread_once and read-only afterwards, so readers need no lock. */
static double gl_node[GL_POINTS], gl_weight[GL_POINTS];
static pthread_once_t gl_once = PTHREAD_ONCE_INIT;

/* Newton's method on P_n from the Chebyshev guess (Numerical Recipes' gauleg idea). */
static void gl_init(void)
{
	const int n = GL_POINTS;
	for (int i = 0; i < (n + 1) / 2; i++) {
		double x = cos(M_PI * (i + 0.75) / (n + 0.5)), dp = 1.0;
		for (int it = 0; it < 100; it++) {
			double p0 = 1.0, p1 = 0.0;
			for (int k = 1; k <= n; k++) {
				double p2 = p1;
				p1 = p0;
				p0 = ((2.0 * k - 1.0) * x * p1 - (k - 1.0) * p2) / k;
			}
			dp = n * (x * p0 - p1) / (x * x - 1.0);
			double step = p0 / dp;
			x -= step;
			if (fabs(step) < 1e-16)
				break;
		}
		gl_node[i] = -x;
		gl_node[n - 1 - i] = x;
		gl_weight[i] = gl_weight[n - 1 - i] = 2.0 / ((1.0 - x * x) * dp * dp);
	}
}

/* 4 |int_0^1 J0(a rho) exp(-i b rho^2) rho drho|^2. */
static double bessel_defocus_intensity(double a, double b)
{
	pthread_once(&gl_once, gl_init);
	int panels = 1 + (int)((fabs(a) + 2.0 * fabs(b)) / 3.0);
	double re = 0.0, im = 0.0, h = 1.0 / panels;
	for (int p = 0; p < panels; p++) {
		double mid = (p + 0.5) * h;
		for (int k = 0; k < GL_POINTS; k++) {
			double rho = mid + 0.5 * h * gl_node[k];
			double w = 0.5 * h * gl_weight[k] * j0(a * rho) * rho;
			double phase = b * rho * rho;
			re += w * cos(phase);
			im -= w * sin(phase);
		}
	}
	return 4.0 * (re * re + im * im);
}

double sf_psf_widefield(double x, double y, double z, double na, double n, double lambda)
{
	double r = sqrt(x * x + y * y);
	double a = 2.0 * M_PI * na * r / (lambda * n);
	double b = M_PI * z * na * na / (lambda * n * n);
	return bessel_defocus_intensity(a, b);
}

double sf_psf_sheet_na(const sf_psf_optics *o)
{
	return sin(atan(o->slitwidth / (2.0 * o->fcyl)));
}

double sf_psf_lightsheet(double x, double y, double z, const sf_psf_optics *o)
{
	double sheet = sf_psf_widefield(z, 0.0, x, sf_psf_sheet_na(o), o->rf, o->lambda_ex);
	return sheet * sf_psf_widefield(x, y, z, o->na, o->rf, o->lambda_em);
}

double sf_psf_dxy_corr(const sf_psf_optics *o)
{
	return fmin(o->dxy, 0.61 * o->lambda_em / o->na / 3.0);
}

int sf_psf_optics_validate(const sf_psf_optics *o, sf_err *e)
{
	const struct {
		const char *name;
		double v;
	} positive[] = {
	    {"dxy", o->dxy},
	    {"dz", o->dz},
	    {"lambda_ex", o->lambda_ex},
	    {"lambda_em", o->lambda_em},
	    {"na", o->na},
	    {"rf", o->rf},
	    {"fcyl", o->fcyl},
	    {"slitwidth", o->slitwidth},
	};
	for (size_t i = 0; i < sizeof positive / sizeof positive[0]; i++)
		if (!(positive[i].v > 0.0) || !isfinite(positive[i].v))
			return sf_fail(e, SF_EINVAL, "%s=%g: must be a positive number",
			               positive[i].name, positive[i].v);
	if (o->na >= o->rf)
		return sf_fail(e, SF_EINVAL,
		               "na=%g: must be below the refractive index rf=%g (sin of the "
		               "half-angle cannot exceed 1)",
		               o->na, o->rf);
	return SF_OK;
}

/* Distance from 0 along an axis where f falls to half of f(0): march outward
 * in steps of `step` to bracket the crossing, then bisect. */
static int half_max_crossing(const sf_psf_optics *o, int axial, double step, double *out, sf_err *e)
{
	double half = 0.5 * sf_psf_lightsheet(0, 0, 0, o);
	double lo = 0.0, hi = step;
	int steps = 0;
	for (;;) {
		double v = axial ? sf_psf_lightsheet(0, 0, hi, o) : sf_psf_lightsheet(hi, 0, 0, o);
		if (v < half)
			break;
		lo = hi;
		hi += step;
		if (++steps > 100000)
			return sf_fail(e, SF_EINVAL, "psf: no half-maximum found along %s",
			               axial ? "z" : "x");
	}
	for (int it = 0; it < 80; it++) {
		double mid = 0.5 * (lo + hi);
		double v =
		    axial ? sf_psf_lightsheet(0, 0, mid, o) : sf_psf_lightsheet(mid, 0, 0, o);
		if (v < half)
			hi = mid;
		else
			lo = mid;
	}
	*out = 0.5 * (lo + hi);
	return SF_OK;
}

int sf_psf_fwhm(const sf_psf_optics *o, double *fwhm_xy, double *fwhm_z, sf_err *e)
{
	int rc = sf_psf_optics_validate(o, e);
	if (rc)
		return rc;
	/* Steps of a fiftieth of the lateral and axial diffraction scales. */
	double lat_step = o->lambda_em * o->rf / o->na / 50.0;
	double ax_step = o->lambda_em * o->rf * o->rf / (o->na * o->na) / 50.0;
	double hx = 0.0, hz = 0.0;
	rc = half_max_crossing(o, 0, lat_step, &hx, e);
	if (!rc)
		rc = half_max_crossing(o, 1, ax_step, &hz, e);
	if (rc)
		return rc;
	*fwhm_xy = 2.0 * hx;
	*fwhm_z = 2.0 * hz;
	return SF_OK;
}

/* Largest samples per axis a PSF may have; more means a spacing far below
 * the resolution (a unit mix-up), not a PSF anyone can deconvolve with. */
#define PSF_MAX_SAMPLES 4097

/* Largest spacing, in FWHMs of its axis; more means a spacing far above the
 * resolution (20 FWHM: the reference dz 1.2 um is 0.11 of the axial one). */
#define SPACING_MAX_FWHM 20

/* ceil(2 fwhm / step) made odd, as a double: a tiny step (dxy=1e-300) gives
 * a count far beyond size_t, so it is bounded (PSF_MAX_SAMPLES) before any
 * cast; 0 when it exceeds the bound. */
static size_t odd_grid_size(double fwhm, double step, double *want)
{
	double n = ceil(2.0 * fwhm / step);

	if (fmod(n, 2.0) == 0.0)
		n += 1.0;
	*want = n;
	if (!(n <= PSF_MAX_SAMPLES))
		return 0;
	return (size_t)n;
}

/* Sample counts per axis (*nxy, *nz), or SF_EINVAL for a spacing far from
 * the resolution fxy, fz: a unit mix-up, not a sampling anyone deconvolves
 * with.  Far below (more than PSF_MAX_SAMPLES samples) is dxy typed in mm;
 * far above (over SPACING_MAX_FWHM FWHMs, a PSF of one plane or pixel and
 * so no deconvolution on that axis) is LsDeconv.m's nm typed as um.
 * Spacings are printed in micrometres: the unit of the dxy and dz options
 * users type (the struct holds nm). */
static int check_spacing(const sf_psf_optics *o, double fxy, double fz, size_t *nxy, size_t *nz,
                         sf_err *e)
{
	double want_xy, want_z, um = 1000.0; /* nm per um */
	int far_z = o->dz > SPACING_MAX_FWHM * fz, far_xy = o->dxy > SPACING_MAX_FWHM * fxy;

	*nxy = odd_grid_size(fxy, sf_psf_dxy_corr(o), &want_xy);
	*nz = odd_grid_size(fz, o->dz, &want_z);
	if (!*nxy || !*nz)
		return sf_fail(e, SF_EINVAL,
		               "psf: %.6g x %.6g x %.6g samples (at most %d per axis): dxy=%g um "
		               "or dz=%g um is far below the resolution (FWHM %.3g um lateral, "
		               "%.3g um axial)",
		               want_xy, want_xy, want_z, PSF_MAX_SAMPLES, o->dxy / um, o->dz / um,
		               fxy / um, fz / um);
	if (far_z || far_xy)
		return sf_fail(
		    e, SF_EINVAL,
		    "psf: %s=%g um is far above the resolution (FWHM %.3g um %s, at most "
		    "%dx that): LsDeconv.m takes nm, scopefs takes um",
		    far_z ? "dz" : "dxy", (far_z ? o->dz : o->dxy) / um, (far_z ? fz : fxy) / um,
		    far_z ? "axial" : "lateral", SPACING_MAX_FWHM);
	return SF_OK;
}

void sf_psf_free(sf_psf *p)
{
	if (!p)
		return;
	free(p->v);
	p->v = NULL;
}

int sf_psf_make(const sf_psf_optics *o, sf_psf *out, sf_err *e)
{
	memset(out, 0, sizeof *out);
	double fxy, fz;
	int rc = sf_psf_fwhm(o, &fxy, &fz, e);
	if (rc)
		return rc;
	double dxy = sf_psf_dxy_corr(o);
	size_t nxy, nz;
	rc = check_spacing(o, fxy, fz, &nxy, &nz, e);
	if (rc)
		return rc;
	float *v = malloc(nxy * nxy * nz * sizeof *v);
	if (!v)
		return sf_fail(e, SF_ENOMEM, "psf: %zu x %zu x %zu values", nxy, nxy, nz);

	size_t cxy = nxy / 2, cz = nz / 2;
	double sum = 0.0;
	for (size_t k = 0; k <= cz; k++)
		for (size_t j = 0; j <= cxy; j++)
			for (size_t i = 0; i <= cxy; i++) {
				float s = (float)sf_psf_lightsheet(i * dxy, j * dxy, k * o->dz, o);
				/* Mirror into the 8 octants (the same voxel may repeat on an axis).
				 */
				size_t xs[2] = {cxy + i, cxy - i}, ys[2] = {cxy + j, cxy - j},
				       zs[2] = {cz + k, cz - k};
				for (int a = 0; a < 2; a++)
					for (int b = 0; b < 2; b++)
						for (int c = 0; c < 2; c++)
							v[(zs[c] * nxy + ys[b]) * nxy + xs[a]] = s;
			}
	for (size_t idx = 0; idx < nxy * nxy * nz; idx++)
		sum += v[idx];
	for (size_t idx = 0; idx < nxy * nxy * nz; idx++)
		v[idx] = (float)(v[idx] / sum);

	out->nx = out->ny = nxy;
	out->nz = nz;
	out->dxy = dxy;
	out->dz = o->dz;
	out->fwhm_xy = fxy;
	out->fwhm_z = fz;
	out->v = v;
	return SF_OK;
}

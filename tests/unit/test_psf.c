/* test_psf.c — the light-sheet PSF (src/core/psf.c).
 *
 * Without arguments: unit checks against closed forms (the in-focus Airy
 * pattern (2 J1(a)/a)^2 and the on-axis defocus sinc^2(b/2)), the grid size
 * LsDeconv gives for its reference optics (9 x 9 x 19), symmetry, the sum,
 * and option validation.
 * With `--psf dxy dz na rf lambda_ex lambda_em fcyl slitwidth OUT.raw`: write
 * the PSF as float32 v[z][y][x] to OUT.raw and print
 * "nx ny nz dxy_corr dz fwhm_xy fwhm_z" (the scipy oracle in
 * tests/integration/test_deconv_oracle.py uses this). */
#include "check.h"
#include "scopefs/psf.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static sf_psf_optics reference_optics(void)
{
	return (sf_psf_optics){.dxy = 400,
	                       .dz = 1200,
	                       .na = 0.4,
	                       .rf = 1.42,
	                       .lambda_ex = 561,
	                       .lambda_em = 600,
	                       .fcyl = 240,
	                       .slitwidth = 12};
}

static void test_closed_forms(void)
{
	double na = 0.4, n = 1.42, lam = 600;
	CHECK(fabs(sf_psf_widefield(0, 0, 0, na, n, lam) - 1.0) < 1e-12, "PSF(0) = 1");
	for (double r = 50; r < 3000; r += 237) {
		double a = 2 * M_PI * na * r / (lam * n);
		double airy = pow(2 * j1(a) / a, 2);
		double got = sf_psf_widefield(r * 0.6, r * 0.8, 0, na, n, lam);
		CHECK(fabs(got - airy) < 1e-10, "Airy at r=%g: %.12g vs %.12g", r, got, airy);
	}
	for (double z = 100; z < 40000; z += 1733) {
		double b = M_PI * z * na * na / (lam * n * n);
		double sinc2 = pow(sin(b / 2) / (b / 2), 2);
		double got = sf_psf_widefield(0, 0, z, na, n, lam);
		CHECK(fabs(got - sinc2) < 1e-10, "defocus sinc^2 at z=%g: %.12g vs %.12g", z, got,
		      sinc2);
	}
}

static void test_reference_grid(void)
{
	sf_psf_optics o = reference_optics();
	sf_psf p;
	sf_err e = {0};
	int rc = sf_psf_make(&o, &p, &e);
	CHECK(rc == SF_OK, "sf_psf_make: %s", e.msg);
	if (rc)
		return;
	CHECK(p.nx == 9 && p.ny == 9 && p.nz == 19, "size %zu x %zu x %zu, want 9 x 9 x 19", p.nx,
	      p.ny, p.nz);
	CHECK(fabs(p.dxy - 0.61 * 600 / 0.4 / 3) < 1e-9, "dxy_corr %g", p.dxy);
	double sum = 0, max = 0;
	size_t argmax = 0, n = p.nx * p.ny * p.nz;
	for (size_t k = 0; k < n; k++) {
		sum += p.v[k];
		if (p.v[k] > max)
			max = p.v[k], argmax = k;
	}
	CHECK(fabs(sum - 1) < 1e-5, "sum %g", sum);
	CHECK(argmax == n / 2, "maximum at %zu, want the centre %zu", argmax, n / 2);
	int asym = 0;
	for (size_t z = 0; z < p.nz; z++)
		for (size_t y = 0; y < p.ny; y++)
			for (size_t x = 0; x < p.nx; x++) {
				float v = p.v[(z * p.ny + y) * p.nx + x];
				float m = p.v[((p.nz - 1 - z) * p.ny + p.ny - 1 - y) * p.nx + p.nx -
				              1 - x];
				asym += v != m;
			}
	CHECK(asym == 0, "%d voxels differ from their point mirror", asym);
	/* Half maximum really is at fwhm/2 on both axes. */
	double c = sf_psf_lightsheet(0, 0, 0, &o);
	CHECK(fabs(sf_psf_lightsheet(p.fwhm_xy / 2, 0, 0, &o) / c - 0.5) < 1e-9, "fwhm_xy %g",
	      p.fwhm_xy);
	CHECK(fabs(sf_psf_lightsheet(0, 0, p.fwhm_z / 2, &o) / c - 0.5) < 1e-9, "fwhm_z %g",
	      p.fwhm_z);
	CHECK(p.fwhm_xy > 1000 && p.fwhm_xy < 1200, "fwhm_xy %g nm", p.fwhm_xy);
	sf_psf_free(&p);
	sf_psf_free(&p); /* idempotent */
}

static void test_validation(void)
{
	struct {
		const char *what, *want;
		sf_psf_optics o;
	} cases[] = {
	    {"na above rf", "na=", reference_optics()},
	    {"negative dxy", "dxy=", reference_optics()},
	    {"zero dz", "dz=", reference_optics()},
	    {"NaN lambda_em", "lambda_em=", reference_optics()},
	    {"zero slit", "slitwidth=", reference_optics()},
	};
	cases[0].o.na = 1.5;
	cases[1].o.dxy = -400;
	cases[2].o.dz = 0;
	cases[3].o.lambda_em = NAN;
	cases[4].o.slitwidth = 0;
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		sf_err e = {0};
		sf_psf p;
		int rc = sf_psf_make(&cases[i].o, &p, &e);
		CHECK(rc == SF_EINVAL && strstr(e.msg, cases[i].want) && !p.v, "%s: rc=%d msg '%s'",
		      cases[i].what, rc, e.msg);
	}
}

typedef struct spacing_case {
	const char *what, *want; /* want: in the message */
	double dxy, dz;          /* nm, the other optics the reference */
} spacing_case;

/* Each case's PSF is refused (SF_EINVAL, no values) with want in e.msg. */
static void check_spacing_refused(const spacing_case *cases, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		sf_psf_optics o = reference_optics();
		sf_err e = {0};
		sf_psf p;
		int rc;

		o.dxy = cases[i].dxy;
		o.dz = cases[i].dz;
		rc = sf_psf_make(&o, &p, &e);
		CHECK(rc == SF_EINVAL && strstr(e.msg, cases[i].want) && !p.v, "%s: rc=%d msg '%s'",
		      cases[i].what, rc, e.msg);
		if (rc == SF_OK)
			sf_psf_free(&p);
	}
}

/* A spacing far below the resolution is refused, and the message gives the
 * spacings in micrometres (the dxy and dz options' unit; the struct holds
 * nm): dxy 0.4 nm is "dxy=0.0004 um", not "dxy=0.4".  dxy 1e-297 nm used to
 * overflow the size_t cast of ceil(2 FWHM / step) (undefined behaviour) and
 * give a 1 x 1 x 19 PSF. */
static void test_spacing_far_below_resolution(void)
{
	const spacing_case cases[] = {
	    {"dxy 0.4 nm", "dxy=0.0004 um", 0.4, 1200},
	    {"dz 1 nm", "dz=0.001 um", 400, 1},
	    {"dxy 1e-297 nm (count beyond size_t)", "dxy=1e-300 um", 1e-297, 1200},
	    {"dz subnormal (count infinite)", "far below the resolution", 400, 1e-320},
	};
	check_spacing_refused(cases, sizeof cases / sizeof cases[0]);
}

/* A spacing far above the resolution (over 20 FWHMs of its axis) is
 * refused: LsDeconv.m takes nm, so dxy=400,dz=1200 typed for it is 400 um
 * and 1.2 mm here, which gave a 9 x 9 x 1 PSF (no axial deconvolution) and
 * no word.  The message names the spacing in um and the FWHM; 20 FWHMs
 * exactly still builds.  Oracle: the reference FWHMs from sf_psf_fwhm
 * (checked against scipy quad in tests/integration/test_deconv_oracle.py). */
static void test_spacing_far_above_resolution(void)
{
	sf_psf_optics o = reference_optics();
	double fxy, fz;
	sf_err e = {0};
	sf_psf p;

	CHECK(sf_psf_fwhm(&o, &fxy, &fz, &e) == SF_OK, "fwhm: %s", e.msg);
	const spacing_case cases[] = {
	    {"dz 1200 um (nm typed)", "dz=1200 um is far above the resolution (FWHM 10.", 400,
	     1.2e6},
	    {"dxy 400 um (nm typed)", "dxy=400 um is far above the resolution (FWHM 1.", 4e5, 1200},
	    {"both typed in nm", "dz=1200 um", 4e5, 1.2e6},
	    {"dz just over 20 FWHM", "LsDeconv.m takes nm, scopefs takes um", 400, 20.001 * fz},
	    {"dxy just over 20 FWHM", "lateral", 20.001 * fxy, 1200},
	};
	check_spacing_refused(cases, sizeof cases / sizeof cases[0]);
	o.dxy = 20 * fxy;
	o.dz = 20 * fz;
	CHECK(sf_psf_make(&o, &p, &e) == SF_OK && p.nz == 1, "20 FWHM builds: %s", e.msg);
	sf_psf_free(&p);
}

static int write_psf(char **argv)
{
	sf_psf_optics o = {0}; /* every field is set from argv below */
	double *f[] = {&o.dxy,       &o.dz,        &o.na,   &o.rf,
	               &o.lambda_ex, &o.lambda_em, &o.fcyl, &o.slitwidth};
	for (int i = 0; i < 8; i++)
		*f[i] = strtod(argv[i], NULL);
	sf_psf p;
	sf_err e = {0};
	if (sf_psf_make(&o, &p, &e)) {
		fprintf(stderr, "%s\n", e.msg);
		return 2;
	}
	FILE *out = fopen(argv[8], "wb");
	size_t n = p.nx * p.ny * p.nz;
	int bad = !out || fwrite(p.v, sizeof(float), n, out) != n;
	if (out)
		bad |= fclose(out) != 0;
	if (!bad)
		printf("%zu %zu %zu %.17g %.17g %.17g %.17g\n", p.nx, p.ny, p.nz, p.dxy, p.dz,
		       p.fwhm_xy, p.fwhm_z);
	sf_psf_free(&p);
	return bad ? 2 : 0;
}

int main(int argc, char **argv)
{
	if (argc == 11 && !strcmp(argv[1], "--psf"))
		return write_psf(argv + 2);
	test_closed_forms();
	test_reference_grid();
	test_validation();
	test_spacing_far_below_resolution();
	test_spacing_far_above_resolution();
	printf("test_psf: %d passed, %d failed\n", passed, failed);
	return failed != 0;
}

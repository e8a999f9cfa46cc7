/* test_deconv.c — Richardson-Lucy blocks (src/core/deconv.c, fft_fftw.c,
 * fft_cufft.cu).
 *
 * Without arguments: unit checks.  The RL engine is compared with a direct
 * (no FFT) double-precision Richardson-Lucy written here from the textbook
 * formula; a delta PSF must leave the data unchanged; the stop criterion,
 * the interrupt flag, option validation, the 7-smooth and padded sizes are
 * checked; the FFTW engine's fused forms (convolve, rl_step) are compared
 * with FFTW's own 3D r2c/c2r plans and must give the same bytes for 1, 2
 * and 3 threads, and so must a whole block (pre-filter, regularisation,
 * Biggs-Andrews acceleration); rl_step's shortcuts (supports, a kept
 * spectrum, a real transfer function) must change nothing beyond rounding;
 * with CUDA built in and a device present, the same block on cuFFT and FFTW
 * must agree to relative L2 < 1e-4 (skipped with a message otherwise); a
 * block with voxels below 0 is clamped at 0 with dark 0 too.
 *
 * With `--rl IN.raw nx ny nz PSF.raw px py pz OUT.raw [key=value ...]`: run
 * one block (float32 v[z][y][x] files) for the Python oracles in
 * tests/integration/test_deconv_oracle.py.  Keys: numit, taper, init, reg,
 * damp, stop, accelerate, dark, sigma=X,Y,Z, size=X,Y,Z, fft=X,Y,Z, threads, measure,
 * engine=fftw|cufft, repeat (run the block this many times and print the
 * seconds per block).  Prints "iterations=N seconds=S fft=X,Y,Z". */
#include "check.h"
#include "scopefs/deconv.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* A deterministic generator, so failures reproduce (xorshift64*). */
static double uniform(unsigned long long *s)
{
	*s ^= *s >> 12, *s ^= *s << 25, *s ^= *s >> 27;
	return (double)((*s * 2685821657736338717ull) >> 11) / 9007199254740992.0;
}

/* Parameters with every LsDeconv pre/post step off: plain RL. */
static sf_deconv_params plain_params(int numit)
{
	sf_deconv_params p;
	sf_deconv_params_default(&p);
	p.dxy = 400, p.dz = 1200, p.lambda_ex = 561, p.lambda_em = 600;
	p.numit = numit;
	p.regularize_interval = 0;
	p.gaussian_sigma[0] = p.gaussian_sigma[1] = p.gaussian_sigma[2] = 0;
	p.taper = 0;
	return p;
}

/* out = 'same' convolution (flip=0) or correlation (flip=1) of v with k,
 * zero outside v; all shapes odd-centred like scipy's mode='same'. */
static void direct_conv(const double *v, sf_dims3 n, const float *k, sf_dims3 kn, int flip,
                        double *out)
{
	long cx = (long)kn.nx / 2, cy = (long)kn.ny / 2, cz = (long)kn.nz / 2;
	for (long z = 0; z < (long)n.nz; z++)
		for (long y = 0; y < (long)n.ny; y++)
			for (long x = 0; x < (long)n.nx; x++) {
				double s = 0;
				for (long c = 0; c < (long)kn.nz; c++)
					for (long b = 0; b < (long)kn.ny; b++)
						for (long a = 0; a < (long)kn.nx; a++) {
							long sz = flip ? z + c - cz : z - c + cz;
							long sy = flip ? y + b - cy : y - b + cy;
							long sx = flip ? x + a - cx : x - a + cx;
							if (sz < 0 || sy < 0 || sx < 0 ||
							    sz >= (long)n.nz || sy >= (long)n.ny ||
							    sx >= (long)n.nx)
								continue;
							s += k[(c * kn.ny + b) * kn.nx + a] *
							     v[(sz * n.ny + sy) * n.nx + sx];
						}
				out[(z * n.ny + y) * n.nx + x] = s;
			}
}

/* Textbook RL, x0 = y: x <- x * H^T(y / Hx), in double with direct sums.
 * With accel, Biggs-Andrews as MATLAB's deconvlucy writes it: the RL step
 * is taken from v = max(x + a (x - x_prev), 0), a = <g1, g2> / <g2, g2>
 * clamped to [0, 1] from the last two steps g = RL(v) - v (0 before). */
static void direct_rl(const float *y, sf_dims3 n, const float *k, sf_dims3 kn, int numit, int accel,
                      double *x)
{
	size_t N = n.nx * n.ny * n.nz;
	double *hx = malloc(N * sizeof *hx), *c = malloc(N * sizeof *c);
	double *xp = malloc(N * sizeof *xp), *v = malloc(N * sizeof *v);
	double *g1 = calloc(N, sizeof *g1), *g2 = calloc(N, sizeof *g2);
	if (!hx || !c || !xp || !v || !g1 || !g2)
		abort(); /* test harness only: no way to report without an oracle */
	for (size_t i = 0; i < N; i++)
		x[i] = xp[i] = y[i];
	for (int it = 0; it < numit; it++) {
		double a = 0, num = 0, den = 0;
		for (size_t i = 0; accel && it >= 2 && i < N; i++)
			num += g1[i] * g2[i], den += g2[i] * g2[i];
		if (den > 0)
			a = fmin(fmax(num / den, 0), 1);
		for (size_t i = 0; i < N; i++)
			v[i] = fmax(x[i] + a * (x[i] - xp[i]), 0), xp[i] = x[i];
		direct_conv(v, n, k, kn, 0, hx);
		for (size_t i = 0; i < N; i++)
			hx[i] = y[i] / fmax(hx[i], 1.19e-7);
		direct_conv(hx, n, k, kn, 1, c);
		for (size_t i = 0; i < N; i++) {
			x[i] = fabs(v[i] * c[i]);
			g2[i] = g1[i], g1[i] = x[i] - v[i];
		}
	}
	free(hx), free(c), free(xp), free(v), free(g1), free(g2);
}

static void test_matches_direct_rl(void)
{
	sf_dims3 n = {11, 9, 10}, kn = {5, 3, 7};
	size_t N = n.nx * n.ny * n.nz, K = kn.nx * kn.ny * kn.nz;
	float *y = malloc(N * sizeof *y), *out = malloc(N * sizeof *out);
	float *k = malloc(K * sizeof *k);
	double *ref = malloc(N * sizeof *ref);
	if (!y || !out || !k || !ref)
		abort();
	unsigned long long s = 42;
	double ksum = 0;
	for (size_t i = 0; i < K; i++)
		ksum += k[i] = (float)(0.1 + uniform(&s)); /* asymmetric on purpose */
	for (size_t i = 0; i < K; i++)
		k[i] = (float)(k[i] / ksum);
	for (size_t i = 0; i < N; i++)
		y[i] = (float)(0.2 + uniform(&s));
	sf_psf psf = {.nx = kn.nx, .ny = kn.ny, .nz = kn.nz, .v = k};
	for (int accel = 0; accel <= 1; accel++) {
		sf_deconv_params p = plain_params(accel ? 8 : 5);
		p.accelerate = accel;
		sf_fft_config cfg = {.nthreads = 1};
		sf_err e = {0};
		int rc = sf_deconv_block_once(&p, &psf, n, y, out, sf_fft_fftw_ops(), &cfg, &e);
		CHECK(rc == SF_OK, "deconv: %s", e.msg);
		direct_rl(y, n, k, kn, p.numit, accel, ref);
		double err = 0, norm = 0;
		for (size_t i = 0; i < N; i++)
			err += (out[i] - ref[i]) * (out[i] - ref[i]), norm += ref[i] * ref[i];
		CHECK(sqrt(err / norm) < 2e-6, "RL (accelerate=%d) vs direct: relative L2 %g",
		      accel, sqrt(err / norm));
	}
	free(y), free(out), free(k), free(ref);
}

static void test_delta_psf_is_identity(void)
{
	sf_dims3 n = {16, 7, 12};
	size_t N = n.nx * n.ny * n.nz;
	float one = 1.0f, *y = malloc(N * sizeof *y), *out = malloc(N * sizeof *out);
	if (!y || !out)
		abort();
	unsigned long long s = 7;
	for (size_t i = 0; i < N; i++)
		y[i] = (float)(1 + 100 * uniform(&s));
	sf_psf psf = {.nx = 1, .ny = 1, .nz = 1, .v = &one};
	sf_deconv_params p = plain_params(4);
	p.taper = 1; /* the blur of a delta changes nothing either */
	sf_fft_config cfg = {.nthreads = 2};
	sf_err e = {0};
	int rc = sf_deconv_block_once(&p, &psf, n, y, out, sf_fft_fftw_ops(), &cfg, &e);
	CHECK(rc == SF_OK, "deconv: %s", e.msg);
	/* FFT rounding is relative to the block's largest values (101 here). */
	double worst = 0;
	for (size_t i = 0; i < N; i++)
		worst = fmax(worst, fabs(out[i] - y[i]) / 101.0);
	CHECK(worst < 2e-6, "delta PSF: worst change / max %g", worst);
	free(y), free(out);
}

static sf_psf reference_psf(void)
{
	sf_psf_optics o = {.dxy = 400,
	                   .dz = 1200,
	                   .na = 0.4,
	                   .rf = 1.42,
	                   .lambda_ex = 561,
	                   .lambda_em = 600,
	                   .fcyl = 240,
	                   .slitwidth = 12};
	sf_psf p;
	sf_err e = {0};
	if (sf_psf_make(&o, &p, &e)) {
		printf("FAIL psf: %s\n", e.msg);
		exit(1);
	}
	return p;
}

static void test_stop_and_interrupt(void)
{
	sf_psf psf = reference_psf();
	sf_dims3 n = {20, 18, 24};
	size_t N = n.nx * n.ny * n.nz;
	float *y = malloc(N * sizeof *y), *out = malloc(N * sizeof *out);
	if (!y || !out)
		abort();
	unsigned long long s = 3;
	for (size_t i = 0; i < N; i++)
		y[i] = (float)(10 + uniform(&s));
	sf_deconv_params p;
	sf_deconv_params_default(&p);
	p.dxy = 400, p.dz = 1200, p.lambda_ex = 561, p.lambda_em = 600;
	p.numit = 20;
	p.stop_criterion = 50; /* any change below 50 % stops at iteration 2 */
	p.lambda_damping = 0.1;
	sf_fft_config cfg = {.nthreads = 2};
	sf_deconv_ctx *ctx;
	sf_err e = {0};
	int rc = sf_deconv_ctx_create(&p, &psf, n, sf_fft_fftw_ops(), &cfg, &ctx, &e);
	CHECK(rc == SF_OK, "ctx: %s", e.msg);
	if (rc)
		goto out;
	sf_dims3 f = sf_deconv_ctx_fft_shape(ctx),
	         want = sf_deconv_fft_dims(n, (sf_dims3){9, 9, 19}, NULL);
	CHECK(f.nx == want.nx && f.ny == want.ny && f.nz == want.nz, "fft shape %zu %zu %zu", f.nx,
	      f.ny, f.nz);
	sf_deconv_stats st;
	rc = sf_deconv_block(ctx, y, out, &st, &e);
	CHECK(rc == SF_OK && st.iterations == 2, "stop criterion: rc=%d after %d iterations (%s)",
	      rc, st.iterations, e.msg);
	int finite = 1;
	for (size_t i = 0; i < N; i++)
		finite &= isfinite(out[i]) && out[i] >= 0;
	CHECK(finite, "output finite and non-negative");
	atomic_int stop = 1;
	sf_deconv_ctx_set_stop(ctx, &stop);
	rc = sf_deconv_block(ctx, y, out, &st, &e);
	CHECK(rc == SF_EINTR, "interrupt: rc=%d", rc);
	sf_deconv_ctx_destroy(ctx);
out:
	sf_psf_free(&psf);
	free(y), free(out);
}

/* N values in 50..550, skewed low (a product of two uniforms), from seed. */
static float *skewed_volume(size_t N, unsigned long long seed)
{
	float *v = malloc(N * sizeof *v);

	if (!v)
		abort();
	for (size_t i = 0; i < N; i++)
		v[i] = (float)(50 + 500 * uniform(&seed) * uniform(&seed));
	return v;
}

/* The whole block (pre-filter, taper, Gaussian and R26 regularisation,
 * acceleration) gives the same bytes on 1, 2 and 3 threads: the product
 * layer shares one context whose thread count is the engine's. */
static void test_threads_same_bytes(void)
{
	sf_psf psf = reference_psf();
	sf_dims3 n = {30, 22, 41};
	size_t N = n.nx * n.ny * n.nz;
	float *y = skewed_volume(N, 17), *one = malloc(N * sizeof *one);
	float *out = malloc(N * sizeof *out);
	if (!one || !out)
		abort();
	sf_deconv_params p;
	sf_deconv_params_default(&p);
	p.dxy = 400, p.dz = 1200, p.lambda_ex = 561, p.lambda_em = 600;
	p.numit = 7, p.lambda_damping = 0.1, p.dark = 20, p.accelerate = 1;
	for (int t = 1; t <= 3; t++) {
		sf_fft_config cfg = {.nthreads = t};
		sf_err e = {0};
		int rc = sf_deconv_block_once(&p, &psf, n, y, t == 1 ? one : out, sf_fft_fftw_ops(),
		                              &cfg, &e);
		CHECK(rc == SF_OK, "threads=%d: %s", t, e.msg);
		if (t > 1)
			CHECK(!memcmp(one, out, N * sizeof *out), "threads=%d: bytes differ from 1",
			      t);
	}
	sf_psf_free(&psf);
	free(y), free(one), free(out);
}

static void test_validation(void)
{
	struct {
		const char *want;
		void (*set)(sf_deconv_params *);
	} cases[] = {
	    {"na=", NULL},
	    {"dxy=", NULL},
	    {"numit=", NULL},
	    {"lambda_damping=", NULL},
	    {"gaussian_filter_size y=", NULL},
	    {"clipval=", NULL},
	    {"gaussian_sigma z=", NULL},
	    {"dz=", NULL},
	    {"regularize_interval=", NULL},
	    {"accelerate=", NULL},
	    {"clipval=50: the upper percentile kept", NULL},
	    {"clipval=0.01: the upper percentile kept", NULL},
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		sf_deconv_params p;
		sf_deconv_params_default(&p);
		p.dxy = 400, p.dz = 1200, p.lambda_ex = 561, p.lambda_em = 600;
		switch (i) {
		case 0: p.na = 1.6; break;
		case 1: p.dxy = -1; break;
		case 2: p.numit = 0; break;
		case 3: p.lambda_damping = 1; break;
		case 4: p.gaussian_filter_size[1] = 12; break;
		case 5: p.clipval = 0; break;
		case 6: p.gaussian_sigma[2] = -1; break;
		case 7: p.dz = 0; break;
		case 8: p.regularize_interval = -2; break;
		case 9: p.accelerate = 2; break;
		/* [100 - clipval, clipval] is empty: a two-level mask */
		case 10: p.clipval = 50; break;
		case 11: p.clipval = 0.01; break;
		}
		sf_err e = {0};
		int rc = sf_deconv_params_validate(&p, &e);
		CHECK(rc == SF_EINVAL && strstr(e.msg, cases[i].want), "case %zu: rc=%d '%s'", i,
		      rc, e.msg);
	}
	sf_deconv_params p;
	sf_deconv_params_default(&p);
	sf_err e = {0};
	CHECK(sf_deconv_params_validate(&p, &e) == SF_EINVAL, "defaults lack spacings");
	p.dxy = 400, p.dz = 1200, p.lambda_ex = 561, p.lambda_em = 600;
	CHECK(sf_deconv_params_validate(&p, &e) == SF_OK, "defaults + optics valid: %s", e.msg);
	/* An FFT shape below the block is refused. */
	float one = 1;
	sf_psf psf = {.nx = 1, .ny = 1, .nz = 1, .v = &one};
	p.fft_shape[0] = 4;
	sf_deconv_ctx *ctx;
	sf_fft_config cfg = {.nthreads = 1};
	int rc =
	    sf_deconv_ctx_create(&p, &psf, (sf_dims3){8, 8, 8}, sf_fft_fftw_ops(), &cfg, &ctx, &e);
	CHECK(rc == SF_EINVAL && strstr(e.msg, "fft_shape x="), "small fft: %d '%s'", rc, e.msg);
}

static void test_smooth7(void)
{
	size_t in[] = {1, 7, 11, 13, 17, 19, 97, 121, 1023, 1031};
	size_t want[] = {1, 7, 12, 14, 18, 20, 98, 125, 1024, 1050};
	for (size_t i = 0; i < sizeof in / sizeof in[0]; i++)
		CHECK(sf_deconv_smooth7(in[i]) == want[i], "smooth7(%zu) = %zu, want %zu", in[i],
		      sf_deconv_smooth7(in[i]), want[i]);
}

/* The padded sizes: at least n + psf - 1, at most 4/3 of it, 7-smooth, x a
 * multiple of 4; given sizes kept.  The 256 x 256 x 64 block with a 15^3
 * PSF (the speed test's) pins the cost table: ESTIMATE does 288 and 320
 * faster than the minimal 270 (docs/deconvolution.md section 4). */
static void test_fft_dims(void)
{
	sf_dims3 blocks[] = {{20, 18, 24}, {90, 90, 178}, {256, 256, 64}, {7, 300, 33}, {1, 1, 1}};
	sf_dims3 psf = {9, 9, 19};
	for (size_t i = 0; i < sizeof blocks / sizeof blocks[0]; i++) {
		sf_dims3 n = blocks[i], f = sf_deconv_fft_dims(n, psf, NULL);
		size_t got[3] = {f.nx, f.ny, f.nz};
		size_t min[3] = {n.nx + psf.nx - 1, n.ny + psf.ny - 1, n.nz + psf.nz - 1};
		for (int a = 0; a < 3; a++)
			CHECK(got[a] >= min[a] && 3 * got[a] <= 4 * min[a] + 12 &&
			          sf_deconv_smooth7(got[a]) == got[a] && (a || got[a] % 4 == 0),
			      "block %zu axis %d: padded %zu for %zu", i, a, got[a], min[a]);
	}
	sf_dims3 f = sf_deconv_fft_dims((sf_dims3){256, 256, 64}, (sf_dims3){15, 15, 15}, NULL);
	CHECK(f.nx == 288 && f.ny == 320 && f.nz == 80, "speed case: %zu %zu %zu", f.nx, f.ny,
	      f.nz);
	size_t given[3] = {0, 31, 0};
	f = sf_deconv_fft_dims((sf_dims3){20, 18, 24}, psf, given);
	CHECK(f.ny == 31, "given y kept: %zu", f.ny);
}

/* A random buffer of n floats in [lo, hi). */
static float *random_buffer(size_t n, float lo, float hi, unsigned long long seed)
{
	float *v = malloc(n * sizeof *v);
	if (!v)
		abort();
	for (size_t i = 0; i < n; i++)
		v[i] = lo + (hi - lo) * (float)uniform(&seed);
	return v;
}

static double rel_l2(const float *a, const float *b, size_t n)
{
	double d = 0, s = 0;
	for (size_t i = 0; i < n; i++)
		d += ((double)a[i] - b[i]) * ((double)a[i] - b[i]), s += (double)b[i] * b[i];
	return sqrt(d / (s > 0 ? s : 1));
}

/* One engine, both ways: the fused convolve and rl_step against FFTW's own
 * 3D r2c/c2r plans with cmul, rl_ratio, rl_update (forward, cmul, inverse);
 * and the fused bytes the same for 1, 2 and 3 threads.  Shapes cover rows
 * and columns that fill no chunk, odd ny, nx = 2 mod 4 (unaligned x plans)
 * and odd nx (no fused path: the composed steps). */
/* The kernel's spectrum (otf, for the 3D reference) and its transfer
 * function (tf, for the engine's fused steps), from kernel k. */
static void make_kernels(const sf_fft_ops *ops, sf_fft_plan *p, void *ker, const float *k,
                         void *otf, void *tf, sf_err *e)
{
	ops->upload(p, ker, k, e);
	ops->forward(p, ker, otf, e);
	ops->make_transfer(p, ker, tf, e);
}

/* Reference convolution on FFTW's 3D plans: tb = x convolved with otf
 * (conj: its adjoint), through spec. */
static void reference_convolve(const sf_fft_ops *ops, sf_fft_plan *p, void *tb, const float *x,
                               void *spec, const void *otf, int conj, sf_err *e)
{
	if (x)
		ops->upload(p, tb, x, e);
	ops->forward(p, tb, spec, e);
	ops->cmul(p, spec, otf, conj, e);
	ops->inverse(p, spec, tb, e);
}

static void test_fused_engine(void)
{
	size_t shapes[][3] = {{40, 36, 30}, {22, 21, 17}, {64, 50, 9}, {30, 33, 12}, {27, 20, 10}};
	const sf_fft_ops *ops = sf_fft_fftw_ops();
	for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
		size_t nx = shapes[si][0], ny = shapes[si][1], nz = shapes[si][2], N = nx * ny * nz;
		sf_fft_plan *plan[3] = {NULL, NULL, NULL};
		void *ker = NULL, *tf = NULL, *otf = NULL, *spec = NULL,
		     *xb[3] = {NULL, NULL, NULL};
		void *yb = NULL, *tb = NULL, *rb = NULL;
		float *k = random_buffer(N, 0, 1, 11 + si), *x = random_buffer(N, 0.5f, 2, 23 + si);
		float *y = random_buffer(N, 0.5f, 2, 37 + si),
		      *reg = random_buffer(N, 0, 1, 41 + si);
		float *want = malloc(N * sizeof *want), *got = malloc(N * sizeof *got);
		float *got2 = malloc(N * sizeof *got2);
		sf_err e = {0};
		int rc = SF_OK;
		if (!want || !got || !got2)
			abort();
		for (int t = 0; t < 3 && !rc; t++)
			rc = ops->plan_create(&(sf_fft_config){.nthreads = t + 1}, nz, ny, nx,
			                      &plan[t], &e);
		void **bufs[] = {&ker, &yb, &tb, &rb, &xb[0], &xb[1], &xb[2]};
		for (size_t b = 0; b < sizeof bufs / sizeof bufs[0] && !rc; b++)
			rc = ops->buf_alloc(plan[0], 0, bufs[b], &e);
		if (!rc)
			rc = ops->buf_alloc(plan[0], 1, &tf, &e);
		if (!rc)
			rc = ops->buf_alloc(plan[0], 1, &otf, &e);
		if (!rc)
			rc = ops->buf_alloc(plan[0], 1, &spec, &e);
		CHECK(rc == SF_OK, "shape %zu: buffers: %s", si, e.msg);
		if (rc)
			goto next;
		/* Reference: 3D plans, cmul, ratio, update (conj transfer = H^T). */
		make_kernels(ops, plan[0], ker, k, otf, tf, &e);
		reference_convolve(ops, plan[0], tb, x, spec, otf, 0, &e);
		ops->download(plan[0], want, tb, &e);
		ops->upload(plan[0], xb[0], x, &e);
		ops->convolve(plan[0], xb[0], spec, tf, 0, &e);
		ops->download(plan[0], got, xb[0], &e);
		double err = rel_l2(got, want, N);
		CHECK(err < 2e-6, "shape %zu: convolve vs r2c/cmul/c2r: rel L2 %.2e", si, err);

		ops->upload(plan[0], yb, y, &e);
		ops->upload(plan[0], rb, reg, &e);
		reference_convolve(ops, plan[0], tb, x, spec, otf, 0, &e);
		ops->rl_ratio(plan[0], tb, yb, 1e-3f, &e);
		reference_convolve(ops, plan[0], tb, NULL, spec, otf, 1, &e);
		ops->upload(plan[0], xb[0], x, &e);
		ops->rl_update(plan[0], xb[0], tb, rb, 0.25f, &e);
		ops->download(plan[0], want, xb[0], &e);
		for (int t = 0; t < 3; t++) {
			ops->upload(plan[t], xb[t], x, &e);
			rc = ops->rl_step(plan[t], xb[t], yb, spec, tf, rb, 0.25f, 1e-3f, NULL,
			                  NULL, 0, &e);
			CHECK(rc == SF_OK, "shape %zu: rl_step: %s", si, e.msg);
		}
		ops->download(plan[0], got, xb[0], &e);
		err = rel_l2(got, want, N);
		CHECK(err < 2e-6, "shape %zu: rl_step vs composed steps: rel L2 %.2e", si, err);
		for (int t = 1; t < 3 && nx % 2 == 0; t++) { /* the fused path's promise */
			ops->download(plan[0], got2, xb[t], &e);
			CHECK(!memcmp(got, got2, N * sizeof *got), "shape %zu: %d threads differ",
			      si, t + 1);
		}
	next:
		for (size_t b = 0; b < sizeof bufs / sizeof bufs[0]; b++)
			if (*bufs[b])
				ops->buf_free(plan[0], *bufs[b]);
		void *cb[] = {tf, otf, spec};
		for (size_t b = 0; b < 3; b++)
			if (cb[b])
				ops->buf_free(plan[0], cb[b]);
		for (int t = 0; t < 3; t++)
			if (plan[t])
				ops->plan_destroy(plan[t]);
		free(k), free(x), free(y), free(reg), free(want), free(got), free(got2);
	}
}

/* Zero v (nx x ny x nz) outside box b. */
static void zero_outside(float *v, size_t nx, size_t ny, size_t nz, const sf_fft_box *b)
{
	for (size_t z = 0; z < nz; z++)
		for (size_t y = 0; y < ny; y++)
			for (size_t x = 0; x < nx; x++)
				if (x < b->lo[0] || x >= b->hi[0] || y < b->lo[1] ||
				    y >= b->hi[1] || z < b->lo[2] || z >= b->hi[2])
					v[(z * ny + y) * nx + x] = 0.0f;
}

/* k[i] = k[-i] (indices mod the shape): a point-symmetric kernel. */
static void symmetrize(float *k, size_t nx, size_t ny, size_t nz)
{
	for (size_t z = 0; z < nz; z++)
		for (size_t y = 0; y < ny; y++)
			for (size_t x = 0; x < nx; x++) {
				size_t i = (z * ny + y) * nx + x;
				size_t j =
				    (((nz - z) % nz) * ny + (ny - y) % ny) * nx + (nx - x) % nx;
				if (j < i)
					k[i] = k[j];
			}
}

/* k even along each axis on its own (k[x, y, z] = k[-x, y, z] = k[x, -y, z]
 * = k[x, y, -z], indices mod the shape), as a PSF mirrored from an octant is. */
static void mirror_octant(float *k, size_t nx, size_t ny, size_t nz)
{
	for (size_t z = 0; z < nz; z++)
		for (size_t y = 0; y < ny; y++)
			for (size_t x = 0; x < nx; x++) {
				size_t fz = z < nz - z ? z : nz - z, fy = y < ny - y ? y : ny - y;
				size_t fx = x < nx - x ? x : nx - x;
				k[(z * ny + y) * nx + x] = k[(fz * ny + fy) * nx + fx];
			}
}

/* The fused rl_step's shortcuts against its plain form (the composed
 * r2c/cmul/c2r steps for the symmetric kernel): supports (x_box, y_box)
 * skip only zeros, x stays 0 outside x_box, the bytes do not depend on the
 * thread count; KEEP_SPECTRUM + SPECTRUM_READY give the same bytes as two
 * plain steps; a point-symmetric kernel (real transfer function) matches
 * the complex multiply.  With z_even the kernel is even along each axis, as
 * a PSF mirrored from an octant is, and the engine keeps only half of each
 * z column of the transfer function. */
static void test_fused_shortcuts(int z_even)
{
	/* x = 2 mod 4 in the last: unaligned x plans, runs of rows from odd rows */
	size_t shapes[][3] = {{40, 36, 30}, {28, 33, 17}, {30, 21, 14}};
	sf_fft_box xbox[] = {
	    {{3, 4, 5}, {31, 29, 22}}, {{0, 2, 1}, {28, 31, 9}}, {{1, 3, 2}, {29, 20, 13}}};
	sf_fft_box ybox[] = {
	    {{6, 8, 7}, {28, 26, 20}}, {{2, 0, 3}, {26, 33, 11}}, {{4, 5, 3}, {25, 17, 12}}};
	const sf_fft_ops *ops = sf_fft_fftw_ops();
	for (size_t si = 0; si < 3; si++) {
		size_t nx = shapes[si][0], ny = shapes[si][1], nz = shapes[si][2], N = nx * ny * nz;
		sf_fft_plan *plan[2] = {NULL, NULL};
		void *ker = NULL, *yb = NULL, *tb = NULL, *rb = NULL, *xb = NULL, *tf = NULL,
		     *otf = NULL, *spec = NULL;
		float *k = random_buffer(N, 0, 1, 51 + si), *x = random_buffer(N, 0.5f, 2, 53 + si);
		float *y = random_buffer(N, 0.5f, 2, 57 + si),
		      *reg = random_buffer(N, 0, 1, 59 + si);
		float *want = malloc(N * sizeof *want), *got = malloc(N * sizeof *got);
		float *got2 = malloc(N * sizeof *got2);
		sf_err e = {0};
		int rc = SF_OK;
		if (!want || !got || !got2)
			abort();
		symmetrize(k, nx, ny, nz);
		if (z_even)
			mirror_octant(k, nx, ny, nz);
		zero_outside(x, nx, ny, nz, &xbox[si]);
		zero_outside(reg, nx, ny, nz, &xbox[si]);
		zero_outside(y, nx, ny, nz, &ybox[si]);
		for (int t = 0; t < 2 && !rc; t++)
			rc = ops->plan_create(&(sf_fft_config){.nthreads = t + 1}, nz, ny, nx,
			                      &plan[t], &e);
		void **bufs[] = {&ker, &yb, &tb, &rb, &xb};
		for (size_t b = 0; b < sizeof bufs / sizeof bufs[0] && !rc; b++)
			rc = ops->buf_alloc(plan[0], 0, bufs[b], &e);
		void **cbufs[] = {&tf, &otf, &spec};
		for (size_t b = 0; b < 3 && !rc; b++)
			rc = ops->buf_alloc(plan[0], 1, cbufs[b], &e);
		CHECK(rc == SF_OK, "shape %zu%s: buffers: %s", si, z_even ? " z-even" : "", e.msg);
		if (rc)
			goto next;
		make_kernels(ops, plan[0], ker, k, otf, tf, &e);
		ops->upload(plan[0], yb, y, &e);
		ops->upload(plan[0], rb, reg, &e);
		/* Reference: 3D plans, complex multiply, ratio, update. */
		reference_convolve(ops, plan[0], tb, x, spec, otf, 0, &e);
		ops->rl_ratio(plan[0], tb, yb, 1e-3f, &e);
		reference_convolve(ops, plan[0], tb, NULL, spec, otf, 1, &e);
		ops->upload(plan[0], xb, x, &e);
		ops->rl_update(plan[0], xb, tb, rb, 0.25f, &e);
		ops->download(plan[0], want, xb, &e);
		/* Fused, whole shape, then with the supports on 1 and 2 threads. */
		ops->upload(plan[0], xb, x, &e);
		rc = ops->rl_step(plan[0], xb, yb, spec, tf, rb, 0.25f, 1e-3f, NULL, NULL, 0, &e);
		CHECK(rc == SF_OK, "shape %zu%s: rl_step: %s", si, z_even ? " z-even" : "", e.msg);
		ops->download(plan[0], got, xb, &e);
		double err = rel_l2(got, want, N);
		CHECK(err < 2e-6, "shape %zu%s: real transfer function vs cmul: rel L2 %.2e", si,
		      z_even ? " z-even" : "", err);
		for (int t = 0; t < 2; t++) {
			ops->upload(plan[t], xb, x, &e);
			ops->rl_step(plan[t], xb, yb, spec, tf, rb, 0.25f, 1e-3f, &xbox[si],
			             &ybox[si], 0, &e);
			ops->download(plan[t], t ? got2 : got, xb, &e);
		}
		err = rel_l2(got, want, N);
		CHECK(err < 2e-6, "shape %zu%s: rl_step with supports: rel L2 %.2e", si,
		      z_even ? " z-even" : "", err);
		CHECK(!memcmp(got, got2, N * sizeof *got),
		      "shape %zu%s: supports: 2 threads differ", si, z_even ? " z-even" : "");
		memcpy(got2, got, N * sizeof *got);
		zero_outside(got2, nx, ny, nz, &xbox[si]);
		CHECK(!memcmp(got, got2, N * sizeof *got), "shape %zu%s: x nonzero outside x_box",
		      si, z_even ? " z-even" : "");
		/* Two steps: plain, then with the spectrum kept and reused. */
		for (int way = 0; way < 2; way++) {
			ops->upload(plan[0], xb, x, &e);
			for (int step = 0; step < 2; step++) {
				unsigned flags = !way   ? 0
				                 : step ? SF_FFT_SPECTRUM_READY
				                        : SF_FFT_KEEP_SPECTRUM;
				ops->rl_step(plan[0], xb, yb, spec, tf, NULL, 0, 1e-3f, &xbox[si],
				             &ybox[si], flags, &e);
			}
			ops->download(plan[0], way ? got2 : got, xb, &e);
		}
		CHECK(!memcmp(got, got2, N * sizeof *got), "shape %zu%s: kept spectrum differs", si,
		      z_even ? " z-even" : "");
	next:
		for (size_t b = 0; b < sizeof bufs / sizeof bufs[0]; b++)
			if (*bufs[b])
				ops->buf_free(plan[0], *bufs[b]);
		for (size_t b = 0; b < 3; b++)
			if (*cbufs[b])
				ops->buf_free(plan[0], *cbufs[b]);
		for (int t = 0; t < 2; t++)
			if (plan[t])
				ops->plan_destroy(plan[t]);
		free(k), free(x), free(y), free(reg), free(want), free(got), free(got2);
	}
}

/* The FFTW engine with rl_step's shortcuts off: every step over the whole
 * grid (no supports) and no kept spectrum. */
static int rl_step_plain(sf_fft_plan *p, void *x, const void *y, void *spec, const void *tf,
                         const void *reg, float lambda, float eps, const sf_fft_box *x_box,
                         const sf_fft_box *y_box, unsigned flags, sf_err *e)
{
	(void)x_box, (void)y_box, (void)flags;
	return sf_fft_fftw_ops()->rl_step(p, x, y, spec, tf, reg, lambda, eps, NULL, NULL, 0, e);
}

/* deconv.c's supports (x_box grown by each regularisation) and kept
 * spectra change no byte of a whole block: Gaussian every 2nd iteration,
 * R26 damping, plain and accelerated. */
static void test_block_shortcuts(void)
{
	sf_psf psf = reference_psf();
	sf_dims3 n = {34, 28, 30};
	size_t N = n.nx * n.ny * n.nz;
	float *y = skewed_volume(N, 19), *want = malloc(N * sizeof *want);
	float *got = malloc(N * sizeof *got);
	if (!want || !got)
		abort();
	sf_fft_ops plain = *sf_fft_fftw_ops();
	plain.rl_step = rl_step_plain;
	for (int accel = 0; accel <= 1; accel++) {
		sf_deconv_params p;
		sf_deconv_params_default(&p);
		p.dxy = 400, p.dz = 1200, p.lambda_ex = 561, p.lambda_em = 600;
		p.numit = 8, p.regularize_interval = 2, p.lambda_damping = 0.2,
		p.accelerate = accel;
		sf_fft_config cfg = {.nthreads = 2};
		sf_err e = {0};
		int rc = sf_deconv_block_once(&p, &psf, n, y, want, &plain, &cfg, &e);
		if (!rc)
			rc = sf_deconv_block_once(&p, &psf, n, y, got, sf_fft_fftw_ops(), &cfg, &e);
		CHECK(rc == SF_OK, "accelerate=%d: %s", accel, e.msg);
		CHECK(!memcmp(want, got, N * sizeof *got),
		      "accelerate=%d: supports change the block (rel L2 %.2e)", accel,
		      rel_l2(got, want, N));
	}
	sf_psf_free(&psf);
	free(y), free(want), free(got);
}

/* Background-subtracted float32 data has voxels below 0.  They are clamped
 * at 0 before Richardson-Lucy with dark 0 too: y < 0 over the eps floor of
 * Hx made the ratio step explode.  With no pre-filter, no taper and dark 0
 * the block used to be padded straight from the caller's buffer, so the
 * negative block must give the same bytes as the block clamped here. */
static void test_negative_input_clamped(void)
{
	sf_psf psf = reference_psf();
	sf_dims3 n = {20, 18, 16};
	size_t N = n.nx * n.ny * n.nz, below = 0;
	float *y = malloc(N * sizeof *y), *clamped = malloc(N * sizeof *clamped);
	float *got = malloc(N * sizeof *got), *want = malloc(N * sizeof *want);
	if (!y || !clamped || !got || !want)
		abort();
	unsigned long long s = 23;
	for (size_t i = 0; i < N; i++) {
		y[i] = (float)(1000 * uniform(&s) * uniform(&s) - 200);
		clamped[i] = fmaxf(y[i], 0.0f);
		below += y[i] < 0;
	}
	CHECK(below > N / 4, "only %zu of %zu voxels below 0", below, N);
	sf_deconv_params p = plain_params(3);
	sf_fft_config cfg = {.nthreads = 2};
	sf_err e = {0};
	int rc = sf_deconv_block_once(&p, &psf, n, y, got, sf_fft_fftw_ops(), &cfg, &e);
	if (!rc)
		rc = sf_deconv_block_once(&p, &psf, n, clamped, want, sf_fft_fftw_ops(), &cfg, &e);
	CHECK(rc == SF_OK, "deconv: %s", e.msg);
	float top = 0;
	for (size_t i = 0; i < N; i++)
		top = fmaxf(top, got[i]);
	CHECK(!memcmp(got, want, N * sizeof *got),
	      "negative input: not the clamped block's bytes (max %g, rel L2 %.2e)", top,
	      rel_l2(got, want, N));
	sf_psf_free(&psf);
	free(y), free(clamped), free(got), free(want);
}

#ifdef SF_HAVE_CUDA
static void test_gpu_matches_cpu(void)
{
	if (sf_fft_cuda_device_count() < 1) {
		printf("test_deconv: no CUDA device, GPU comparison skipped\n");
		return;
	}
	sf_psf psf = reference_psf();
	sf_dims3 n = {60, 50, 40};
	size_t N = n.nx * n.ny * n.nz;
	float *y = malloc(N * sizeof *y), *cpu = malloc(N * sizeof *cpu);
	float *gpu = malloc(N * sizeof *gpu);
	if (!y || !cpu || !gpu)
		abort();
	unsigned long long s = 11;
	for (size_t i = 0; i < N; i++)
		y[i] = (float)(100 + 1000 * uniform(&s) * uniform(&s));
	/* variant 2: x0 a constant, no taper, no x pre-filter (the other
	 * branches of the engine's block preparation); variant 3: dark 0 on
	 * a block with negative voxels (both clamp them at 0) */
	for (int variant = 0; variant <= 3; variant++) {
		int accel = variant == 1;
		sf_deconv_params p;
		sf_deconv_params_default(&p);
		p.dxy = 400, p.dz = 1200, p.lambda_ex = 561, p.lambda_em = 600;
		p.numit = 10, p.lambda_damping = 0.2, p.dark = 50, p.accelerate = accel;
		if (variant == 2)
			p.init_value = 0.5, p.taper = 0, p.gaussian_sigma[0] = 0;
		if (variant == 3) {
			p.dark = 0;
			for (size_t i = 0; i < N; i++)
				y[i] -= 300;
		}
		for (size_t i = 0; i < N; i++) /* poison: every voxel must be written */
			gpu[i] = NAN;
		sf_fft_config cfg = {.nthreads = 2, .device = 0};
		sf_err e = {0};
		int rc = sf_deconv_block_once(&p, &psf, n, y, cpu, sf_fft_fftw_ops(), &cfg, &e);
		CHECK(rc == SF_OK, "cpu: %s", e.msg);
		rc = sf_deconv_block_once(&p, &psf, n, y, gpu, sf_fft_cufft_ops(), &cfg, &e);
		CHECK(rc == SF_OK, "gpu: %s", e.msg);
		double err = 0, norm = 0;
		for (size_t i = 0; i < N; i++)
			err += (double)(gpu[i] - cpu[i]) * (gpu[i] - cpu[i]),
			    norm += (double)cpu[i] * cpu[i];
		CHECK(sqrt(err / norm) < 1e-4, "GPU vs CPU (variant %d) relative L2 %g", variant,
		      sqrt(err / norm));
		printf("test_deconv: GPU vs CPU (variant %d) relative L2 %.3g\n", variant,
		       sqrt(err / norm));
	}
	sf_psf_free(&psf);
	free(y), free(cpu), free(gpu);
}
#endif

/* --- driver mode ---------------------------------------------------------- */

static float *read_raw(const char *path, size_t n)
{
	FILE *f = fopen(path, "rb");
	float *v = malloc(n * sizeof *v);
	int ok = f && v && fread(v, sizeof *v, n, f) == n && fgetc(f) == EOF;
	if (f)
		fclose(f);
	if (!ok) {
		fprintf(stderr, "%s: cannot read %zu floats\n", path, n);
		free(v);
		return NULL;
	}
	return v;
}

static void parse_triple(const char *s, double v[3])
{
	sscanf(s, "%lf,%lf,%lf", &v[0], &v[1], &v[2]);
}

static int apply_option(sf_deconv_params *p, sf_fft_config *cfg, const sf_fft_ops **ops,
                        int *repeat, const char *kv)
{
	const char *eq = strchr(kv, '=');
	if (!eq)
		return -1;
	const char *v = eq + 1;
	size_t klen = (size_t)(eq - kv);
	double t[3] = {0, 0, 0};
#define KEY(name) (klen == strlen(name) && !strncmp(kv, name, klen))
	if (KEY("numit"))
		p->numit = atoi(v);
	else if (KEY("taper"))
		p->taper = atoi(v);
	else if (KEY("init"))
		p->init_value = atof(v);
	else if (KEY("reg"))
		p->regularize_interval = atoi(v);
	else if (KEY("damp"))
		p->lambda_damping = atof(v);
	else if (KEY("stop"))
		p->stop_criterion = atof(v);
	else if (KEY("accelerate"))
		p->accelerate = atoi(v);
	else if (KEY("dark"))
		p->dark = atof(v);
	else if (KEY("threads"))
		cfg->nthreads = atoi(v);
	else if (KEY("measure"))
		cfg->measure = atoi(v);
	else if (KEY("repeat"))
		*repeat = atoi(v);
	else if (KEY("sigma")) {
		parse_triple(v, t);
		memcpy(p->gaussian_sigma, t, sizeof t);
	} else if (KEY("size")) {
		parse_triple(v, t);
		for (int a = 0; a < 3; a++)
			p->gaussian_filter_size[a] = (int)t[a];
	} else if (KEY("fft")) {
		parse_triple(v, t);
		for (int a = 0; a < 3; a++)
			p->fft_shape[a] = (size_t)t[a];
	} else if (KEY("engine") && !strcmp(v, "fftw"))
		*ops = sf_fft_fftw_ops();
#ifdef SF_HAVE_CUDA
	else if (KEY("engine") && !strcmp(v, "cufft"))
		*ops = sf_fft_cufft_ops();
#endif
	else
		return -1;
#undef KEY
	return 0;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int run_block(int argc, char **argv)
{
	sf_dims3 n = {strtoul(argv[1], NULL, 10), strtoul(argv[2], NULL, 10),
	              strtoul(argv[3], NULL, 10)};
	sf_dims3 kn = {strtoul(argv[5], NULL, 10), strtoul(argv[6], NULL, 10),
	               strtoul(argv[7], NULL, 10)};
	sf_deconv_params p = plain_params(10);
	sf_fft_config cfg = {.nthreads = 2};
	const sf_fft_ops *ops = sf_fft_fftw_ops();
	int repeat = 1;
	for (int i = 9; i < argc; i++)
		if (apply_option(&p, &cfg, &ops, &repeat, argv[i])) {
			fprintf(stderr, "%s: unknown option\n", argv[i]);
			return 2;
		}
	size_t N = n.nx * n.ny * n.nz;
	float *y = read_raw(argv[0], N), *k = read_raw(argv[4], kn.nx * kn.ny * kn.nz);
	float *out = malloc(N * sizeof *out);
	int rc = 2;
	sf_deconv_ctx *ctx = NULL;
	sf_err e = {0};
	if (!y || !k || !out)
		goto done;
	sf_psf psf = {.nx = kn.nx, .ny = kn.ny, .nz = kn.nz, .v = k};
	if (sf_deconv_ctx_create(&p, &psf, n, ops, &cfg, &ctx, &e)) {
		fprintf(stderr, "%s\n", e.msg);
		goto done;
	}
	sf_deconv_stats st = {0, 0};
	double t0 = now();
	for (int r = 0; r < repeat; r++)
		if (sf_deconv_block(ctx, y, out, &st, &e)) {
			fprintf(stderr, "%s\n", e.msg);
			goto done;
		}
	double secs = (now() - t0) / repeat;
	FILE *f = fopen(argv[8], "wb");
	if (!f || fwrite(out, sizeof *out, N, f) != N) {
		fprintf(stderr, "%s: cannot write\n", argv[8]);
		if (f)
			fclose(f);
		goto done;
	}
	rc = fclose(f) ? 2 : 0;
	sf_dims3 fs = sf_deconv_ctx_fft_shape(ctx);
	printf("iterations=%d seconds=%.6f fft=%zu,%zu,%zu\n", st.iterations, secs, fs.nx, fs.ny,
	       fs.nz);
done:
	sf_deconv_ctx_destroy(ctx);
	free(y), free(k), free(out);
	sf_fft_fftw_cleanup();
	return rc;
}

int main(int argc, char **argv)
{
	if (argc >= 11 && !strcmp(argv[1], "--rl"))
		return run_block(argc - 2, argv + 2);
	test_smooth7();
	test_fft_dims();
	test_fused_engine();
	test_fused_shortcuts(0);
	test_fused_shortcuts(1);
	test_block_shortcuts();
	test_validation();
	test_matches_direct_rl();
	test_delta_psf_is_identity();
	test_stop_and_interrupt();
	test_threads_same_bytes();
	test_negative_input_clamped();
#ifdef SF_HAVE_CUDA
	test_gpu_matches_cpu();
#endif
	sf_fft_fftw_cleanup();
	printf("test_deconv: %d passed, %d failed\n", passed, failed);
	return failed != 0;
}

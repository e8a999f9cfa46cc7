/* deconv.c — Richardson-Lucy deconvolution of one block, as LsDeconv does it.
 *
 * Per block (docs/deconvolution.md has the formulas):
 *   1. optional separable Gaussian pre-filter (replicate edges), dark subtraction
 *      and a clamp at 0 (always: negative float32 voxels would blow up step 4);
 *   2. optional edge taper: the block blended into its PSF-blurred self by
 *      per-axis linear ramps of width max(8, psf/2);
 *   3. zero padding to the context's FFT shape (by default the 7-smooth size
 *      >= n + psf - 1 that a fixed FFT cost model finds fastest, so circular
 *      convolution equals 'same' convolution with a zero boundary), block
 *      centred at floor((N - n) / 2);
 *   4. RL: x <- |x * H^T(y / max(Hx, eps))|, x0 = y, with the Gaussian and
 *      R26-damping regularisation every regularize_interval-th iteration, and
 *      the stop criterion on the relative change of ||x||; optionally
 *      (accelerate) each RL step taken from the Biggs-Andrews extrapolation
 *      of the last two estimates;
 *   5. the block is cropped back out.
 * Steps 1-3 and 5 run on the host; step 2's blur and all of step 4 run through
 * the engine's ops table, so a GPU engine keeps every iteration on the device.
 * When the engine's buffers are host memory (FFTW) steps 3 and 5 write and
 * read them in place, a range of planes per thread.
 * When the engine has the fused forms (make_transfer, convolve, rl_step) they
 * are used, and the OTF is in the engine's own layout; otherwise forward,
 * cmul and inverse.
 *
 * Invariants: the OTF is the FFT of the PSF centred at index 0 and scaled by
 * 1/(Nx Ny Nz), so forward, cmul and the unnormalised inverse (or convolve)
 * give exactly one convolution; outside the block y is 0, hence the ratio is
 * 0 there and x stays 0 there unless a regularisation step spreads it;
 * x_box bounds where it may have spread (rl_step skips work outside it). */
#include "scopefs/deconv.h"

#include "filter1d.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

struct sf_deconv_ctx {
	sf_deconv_params p;     /* validated copy */
	sf_dims3 n;             /* block shape */
	sf_dims3 fft;           /* padded shape */
	sf_dims3 off;           /* block origin inside the padded shape */
	sf_dims3 psf_n;         /* PSF shape */
	const sf_fft_ops *ops;  /* engine */
	sf_fft_plan *plan;      /* engine plan for fft */
	void *y, *x, *t, *r;    /* engine real buffers: observed, estimate, work, regulariser */
	void *spec, *otf;       /* engine complex buffers */
	void *prev, *g, *g_old; /* engine real buffers of the acceleration (else NULL):
	                         * x_{k-1}, the newest RL step (first the predicted
	                         * point it starts from), the step before it */
	float *pad;             /* host, fft-shaped */
	float *blk, *blk_tmp;   /* host, block-shaped */
	float *ext;             /* host, per thread one x row plus the pre-filter's widest edges */
	int nthreads;     /* host threads of the pre-filter and copies (cfg->nthreads, >= 1) */
	sf_fft_box y_box; /* the block inside the padded shape: y is 0 outside */
	sf_fft_box x_box; /* where x may be nonzero: y_box grown by regularisation */
	int spec_ready;   /* spec holds what rl_step needs of x (SF_FFT_KEEP_SPECTRUM) */
	const atomic_int *stop; /* optional interrupt flag; not owned */
};

void sf_deconv_params_default(sf_deconv_params *p)
{
	memset(p, 0, sizeof *p);
	p->na = 0.40;
	p->rf = 1.42;
	p->fcyl = 240;
	p->slitwidth = 12;
	p->numit = 6;
	p->lambda_damping = 0;
	p->regularize_interval = 3;
	p->stop_criterion = 0;
	p->gaussian_sigma[0] = 0.5, p->gaussian_sigma[1] = 0.5, p->gaussian_sigma[2] = 2.5;
	p->gaussian_filter_size[0] = 13, p->gaussian_filter_size[1] = 13;
	p->gaussian_filter_size[2] = 25;
	p->dark = 0;
	p->taper = 1;
	p->clipval = 99.99;
	p->init_value = 0;
	p->eps = FLT_EPSILON;
}

void sf_deconv_params_optics(const sf_deconv_params *p, sf_psf_optics *o)
{
	o->dxy = p->dxy;
	o->dz = p->dz;
	o->na = p->na;
	o->rf = p->rf;
	o->lambda_ex = p->lambda_ex;
	o->lambda_em = p->lambda_em;
	o->fcyl = p->fcyl;
	o->slitwidth = p->slitwidth;
}

int sf_deconv_params_validate(const sf_deconv_params *p, sf_err *e)
{
	static const char axis[3] = {'x', 'y', 'z'};
	sf_psf_optics o;
	sf_deconv_params_optics(p, &o);
	int rc = sf_psf_optics_validate(&o, e);
	if (rc)
		return rc;
	if (p->numit < 1 || p->numit > 100000)
		return sf_fail(e, SF_EINVAL, "numit=%d: must be 1 to 100000", p->numit);
	if (!(p->lambda_damping >= 0 && p->lambda_damping < 1))
		return sf_fail(e, SF_EINVAL, "lambda_damping=%g: must be in [0, 1)",
		               p->lambda_damping);
	if (p->regularize_interval < 0)
		return sf_fail(e, SF_EINVAL, "regularize_interval=%d: must be >= 0 (0 = off)",
		               p->regularize_interval);
	if (p->accelerate != 0 && p->accelerate != 1)
		return sf_fail(e, SF_EINVAL, "accelerate=%d: must be 0 or 1", p->accelerate);
	if (!(p->stop_criterion >= 0 && isfinite(p->stop_criterion)))
		return sf_fail(e, SF_EINVAL, "stop_criterion=%g: must be >= 0 percent (0 = off)",
		               p->stop_criterion);
	for (int a = 0; a < 3; a++) {
		double s = p->gaussian_sigma[a];
		int size = p->gaussian_filter_size[a];
		if (!(s >= 0 && s <= 100))
			return sf_fail(e, SF_EINVAL,
			               "gaussian_sigma %c=%g: must be 0 to 100 voxels", axis[a], s);
		if (s > 0 && (size < 1 || size % 2 == 0 || size > 1025))
			return sf_fail(e, SF_EINVAL,
			               "gaussian_filter_size %c=%d: must be odd, 1 to 1025",
			               axis[a], size);
	}
	if (!(p->dark >= 0 && isfinite(p->dark)))
		return sf_fail(e, SF_EINVAL, "dark=%g: must be >= 0", p->dark);
	/* The scaler keeps [100 - clipval, clipval]: at 50 or below that range
	 * is empty and the output a two-level mask (clipval=0.01 is how Python
	 * ports write "0.01 % clipped"). */
	if (!(p->clipval > 50 && p->clipval <= 100))
		return sf_fail(e, SF_EINVAL,
		               "clipval=%g: the upper percentile kept (99.99 clips 0.01 %%), "
		               "must be above 50 and at most 100",
		               p->clipval);
	if (!(p->init_value >= 0 && isfinite(p->init_value)))
		return sf_fail(e, SF_EINVAL, "init_value=%g: must be >= 0 (0 = the block)",
		               p->init_value);
	if (!(p->eps > 0 && isfinite(p->eps)))
		return sf_fail(e, SF_EINVAL, "eps=%g: must be > 0", (double)p->eps);
	return SF_OK;
}

size_t sf_deconv_smooth7(size_t n)
{
	for (size_t m = n > 1 ? n : 1;; m++) {
		size_t r = m;
		static const size_t primes[] = {2, 3, 5, 7};
		for (int i = 0; i < 4; i++)
			while (r % primes[i] == 0)
				r /= primes[i];
		if (r == 1)
			return m;
	}
}

/* --- host-side helpers ------------------------------------------------- */

/* The LsDeconv pre-filter's taps for axis a: a normalised Gaussian of
 * gaussian_filter_size taps; returns the radius, or -1 when the axis is off. */
static int prefilter_taps(const sf_deconv_params *p, int a, float w[1025])
{
	double s = p->gaussian_sigma[a];
	if (!(s > 0))
		return -1;
	int radius = (p->gaussian_filter_size[a] - 1) / 2;
	double sum = 0;
	for (int k = -radius; k <= radius; k++)
		sum += exp(-(double)k * k / (2 * s * s));
	for (int k = -radius; k <= radius; k++)
		w[k + radius] = (float)(exp(-(double)k * k / (2 * s * s)) / sum);
	return radius;
}

/* The pre-filter on the host, in place on ctx->blk. */
static void prefilter(sf_deconv_ctx *ctx)
{
	float w[1025];
	for (int a = 0; a < 3; a++) {
		int radius = prefilter_taps(&ctx->p, a, w);
		if (radius < 0)
			continue;
		filter1d_axis_mt(ctx->blk, ctx->blk_tmp, ctx->n.nx, ctx->n.ny, ctx->n.nz, a, w,
		                 radius, ctx->ext, ctx->nthreads);
		float *swap = ctx->blk;
		ctx->blk = ctx->blk_tmp;
		ctx->blk_tmp = swap;
	}
}

static size_t clamp_index(long i, size_t n)
{
	return i < 0 ? 0 : i >= (long)n ? n - 1 : (size_t)i;
}

/* Fill ctx->pad with the block at ctx->off and, outside it, the nearest
 * block voxel (replicate edges; pad_plane does the zero padding). */
static void replicate_block(sf_deconv_ctx *ctx, const float *blk)
{
	sf_dims3 N = ctx->fft, n = ctx->n, o = ctx->off;
	for (size_t z = 0; z < N.nz; z++) {
		long bz = (long)z - (long)o.nz;
		for (size_t y = 0; y < N.ny; y++) {
			long by = (long)y - (long)o.ny;
			const float *src =
			    blk + (clamp_index(bz, n.nz) * n.ny + clamp_index(by, n.ny)) * n.nx;
			float *dst = ctx->pad + (z * N.ny + y) * N.nx;
			for (size_t x = 0; x < N.nx; x++)
				dst[x] = src[clamp_index((long)x - (long)o.nx, n.nx)];
		}
	}
}

/* Whether the engine has the fused forms (then ctx->otf is in its own layout). */
static int fused(const sf_deconv_ctx *ctx)
{
	return ctx->ops->make_transfer && ctx->ops->convolve && ctx->ops->rl_step;
}

/* Whether the engine has fft.h's optional block ops. */
static int engine_blocks(const sf_deconv_ctx *ctx)
{
	const sf_fft_ops *o = ctx->ops;
	return o->upload_n && o->download_n && o->pad && o->crop && o->filter_axis && o->subtract &&
	       o->taper && o->fill;
}

/* x = H * x on engine buffer x (through ctx->spec). */
static int engine_blur(sf_deconv_ctx *ctx, void *x, int conj, sf_err *e)
{
	const sf_fft_ops *ops = ctx->ops;
	if (fused(ctx))
		return ops->convolve(ctx->plan, x, ctx->spec, ctx->otf, conj, e);
	int rc = ops->forward(ctx->plan, x, ctx->spec, e);
	if (!rc)
		rc = ops->cmul(ctx->plan, ctx->spec, ctx->otf, conj, e);
	if (!rc)
		rc = ops->inverse(ctx->plan, ctx->spec, x, e);
	return rc;
}

/* Linear ramp weight in [0, 1] at index i of n for a ramp of width r. */
static float ramp(size_t i, size_t n, size_t r)
{
	if (r == 0)
		return 1.0f;
	size_t d = i < n - 1 - i ? i : n - 1 - i;
	return d >= r ? 1.0f : (float)d / (float)r;
}

static size_t taper_width(size_t psf_n, size_t n)
{
	size_t r = psf_n / 2 > 8 ? psf_n / 2 : 8;
	return r < n / 2 ? r : n / 2;
}

/* LsDeconv's edge taper: blk = w blk + (1 - w) (H * blk), w the product of
 * per-axis ramps; the blur sees replicate-extended data so edges stay bright. */
static int taper(sf_deconv_ctx *ctx, sf_err *e)
{
	sf_dims3 n = ctx->n, N = ctx->fft, o = ctx->off;
	replicate_block(ctx, ctx->blk);
	int rc = ctx->ops->upload(ctx->plan, ctx->t, ctx->pad, e);
	if (!rc)
		rc = engine_blur(ctx, ctx->t, 0, e);
	if (!rc)
		rc = ctx->ops->download(ctx->plan, ctx->pad, ctx->t, e);
	if (rc)
		return rc;
	size_t rx = taper_width(ctx->psf_n.nx, n.nx), ry = taper_width(ctx->psf_n.ny, n.ny),
	       rz = taper_width(ctx->psf_n.nz, n.nz);
	for (size_t z = 0; z < n.nz; z++)
		for (size_t y = 0; y < n.ny; y++) {
			float wzy = ramp(z, n.nz, rz) * ramp(y, n.ny, ry);
			const float *blur = ctx->pad + ((z + o.nz) * N.ny + y + o.ny) * N.nx + o.nx;
			float *v = ctx->blk + (z * n.ny + y) * n.nx;
			for (size_t x = 0; x < n.nx; x++) {
				float w = wzy * ramp(x, n.nx, rx);
				v[x] = w * v[x] + (1.0f - w) * blur[x];
			}
		}
	return SF_OK;
}

/* --- context ------------------------------------------------------------ */

sf_dims3 sf_deconv_ctx_fft_shape(const sf_deconv_ctx *ctx)
{
	return ctx->fft;
}

void sf_deconv_ctx_set_stop(sf_deconv_ctx *ctx, const atomic_int *stop)
{
	ctx->stop = stop;
}

void sf_deconv_ctx_destroy(sf_deconv_ctx *ctx)
{
	if (!ctx)
		return;
	void *bufs[] = {ctx->y,   ctx->x,    ctx->t, ctx->r,    ctx->spec,
	                ctx->otf, ctx->prev, ctx->g, ctx->g_old};
	for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
		if (bufs[i])
			ctx->ops->buf_free(ctx->plan, bufs[i]);
	if (ctx->plan)
		ctx->ops->plan_destroy(ctx->plan);
	free(ctx->pad);
	free(ctx->blk);
	free(ctx->blk_tmp);
	free(ctx->ext);
	free(ctx);
}

/* Nanoseconds x 100 per point of the n-point complex FFT, for 7-smooth n,
 * as the FFTW engine runs it: 32 contiguous transforms out of place,
 * FFTW_ESTIMATE plans, forward + backward, best of 3 (FFTW 3.3.10, gcc 12,
 * AMD EPYC, 2026-11-25).
 * ESTIMATE does lengths with a large power of 2 in them 2-4x faster per
 * point than others (270: 3.4 ns, 288: 1.8, 320: 0.87), so a slightly larger
 * padded grid is often the faster one.  A fixed table, not a timing at run
 * time, so the chosen size (and the bytes) never vary. */
static const struct {
	unsigned short n, cost;
} fft_cost[] = {
    {2, 33},     {3, 33},     {4, 30},     {5, 38},     {6, 37},     {7, 42},     {8, 36},
    {9, 47},     {10, 39},    {12, 39},    {14, 45},    {15, 46},    {16, 42},    {18, 196},
    {20, 43},    {21, 236},   {24, 151},   {25, 68},    {27, 249},   {28, 110},   {30, 149},
    {32, 47},    {35, 195},   {36, 119},   {40, 117},   {42, 165},   {45, 206},   {48, 64},
    {49, 190},   {50, 142},   {54, 266},   {56, 111},   {60, 111},   {63, 201},   {64, 58},
    {70, 157},   {72, 152},   {75, 205},   {80, 66},    {81, 222},   {84, 108},   {90, 272},
    {96, 66},    {98, 159},   {100, 118},  {105, 195},  {108, 111},  {112, 138},  {120, 88},
    {125, 243},  {126, 169},  {128, 72},   {135, 209},  {140, 149},  {144, 66},   {147, 341},
    {150, 218},  {160, 66},   {162, 290},  {168, 194},  {175, 229},  {180, 157},  {189, 349},
    {192, 67},   {196, 152},  {200, 96},   {210, 226},  {216, 196},  {224, 147},  {225, 240},
    {240, 68},   {243, 364},  {245, 291},  {250, 207},  {252, 157},  {256, 69},   {270, 326},
    {280, 153},  {288, 159},  {294, 237},  {300, 143},  {315, 307},  {320, 71},   {324, 161},
    {336, 148},  {343, 284},  {350, 218},  {360, 165},  {375, 304},  {378, 246},  {384, 70},
    {392, 165},  {400, 75},   {405, 315},  {420, 139},  {432, 153},  {441, 299},  {448, 153},
    {450, 328},  {480, 178},  {486, 342},  {490, 220},  {500, 149},  {504, 170},  {512, 72},
    {525, 299},  {540, 140},  {560, 155},  {567, 310},  {576, 162},  {588, 142},  {600, 149},
    {625, 341},  {630, 229},  {640, 75},   {648, 182},  {672, 140},  {675, 314},  {686, 231},
    {700, 178},  {720, 163},  {729, 329},  {735, 287},  {750, 283},  {756, 149},  {768, 125},
    {784, 170},  {800, 139},  {810, 346},  {840, 148},  {864, 143},  {875, 335},  {882, 243},
    {896, 158},  {900, 185},  {945, 304},  {960, 128},  {972, 152},  {980, 185},  {1000, 175},
    {1008, 141}, {1024, 79},  {1029, 421}, {1050, 296}, {1080, 148}, {1120, 153}, {1125, 352},
    {1134, 252}, {1152, 166}, {1176, 218}, {1200, 153}, {1215, 315}, {1225, 323}, {1250, 277},
    {1260, 191}, {1280, 82},  {1296, 189}, {1323, 437}, {1344, 148}, {1350, 390}, {1372, 191},
    {1400, 177}, {1440, 191}, {1458, 368}, {1470, 303}, {1500, 180}, {1512, 216}, {1536, 135},
    {1568, 187}, {1575, 340}, {1600, 158}, {1620, 201}, {1680, 153}, {1701, 452}, {1715, 389},
    {1728, 151}, {1750, 295}, {1764, 207}, {1792, 158}, {1800, 217}, {1875, 412}, {1890, 317},
    {1920, 131}, {1944, 231}, {1960, 199}, {2000, 156}, {2016, 207}, {2025, 352}, {2048, 88},
};

static unsigned fft_point_cost(size_t n)
{
	size_t lo = 0, hi = sizeof fft_cost / sizeof fft_cost[0];
	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		if (fft_cost[mid].n == n)
			return fft_cost[mid].cost;
		if (fft_cost[mid].n < n)
			lo = mid + 1;
		else
			hi = mid;
	}
	return n % 64 ? 250 : 100; /* beyond the table: the typical costs above */
}

/* Up to FFT_CANDIDATES sizes per axis: 7-smooth, from the minimum to 4/3
 * of it (multiples of 4 along x). */
enum { FFT_CANDIDATES = 24 };

static size_t fft_candidates(size_t given, size_t min, int is_x, size_t out[FFT_CANDIDATES])
{
	size_t k = 0;
	if (given) {
		out[0] = given;
		return 1;
	}
	for (size_t m = sf_deconv_smooth7(min); k < FFT_CANDIDATES; m = sf_deconv_smooth7(m + 1)) {
		if (k && m * 3 > min * 4)
			break;
		if (!is_x || m % 4 == 0)
			out[k++] = m;
	}
	return k;
}

sf_dims3 sf_deconv_fft_dims(sf_dims3 n, sf_dims3 psf, const size_t given[3])
{
	/* Per padded voxel and iteration: 4 transforms of 3 passes, each pass
	 * half a complex point per voxel (x: nx/2-point transforms), plus the
	 * memory passes and element-wise work, 6.5 ns per voxel (fitted
	 * alongside the table).  It was 7.5 before the engine skipped the zero
	 * planes and rows of the padding (2026-11-26); 6.5 makes the model pick
	 * the measured best of 288/320 x 280/320 x 80 again: 288 x 320 x 80,
	 * 0.277-0.296 s against 0.297-0.309 s for 288 x 280 x 80 (10 iterations,
	 * 2 threads, alternating runs).  Typical mount blocks (90-306 voxels a
	 * side with the reference PSF) pick the same sizes with 6.5 as with 7.5. */
	static const size_t zero[3] = {0, 0, 0};
	size_t cand[3][FFT_CANDIDATES], count[3];
	sf_dims3 best = {0, 0, 0};
	double best_cost = 0;
	if (!given)
		given = zero;
	count[0] = fft_candidates(given[0], n.nx + psf.nx - 1, 1, cand[0]);
	count[1] = fft_candidates(given[1], n.ny + psf.ny - 1, 0, cand[1]);
	count[2] = fft_candidates(given[2], n.nz + psf.nz - 1, 0, cand[2]);
	for (size_t i = 0; i < count[0]; i++)
		for (size_t j = 0; j < count[1]; j++)
			for (size_t k = 0; k < count[2]; k++) {
				size_t x = cand[0][i], y = cand[1][j], z = cand[2][k];
				unsigned cx = x % 2 ? 2 * fft_point_cost(x) : fft_point_cost(x / 2);
				double c =
				    (double)x * y * z *
				    (2.0 * (cx + fft_point_cost(y) + fft_point_cost(z)) + 650);
				if (!best.nx || c < best_cost)
					best = (sf_dims3){x, y, z}, best_cost = c;
			}
	return best;
}

/* Check an explicit padded size of one axis (0: chosen by the cost model). */
static int check_fft_size(size_t given, size_t n, size_t psf, char axis, sf_err *e)
{
	if (!given)
		return SF_OK;
	if (given < n || given < psf)
		return sf_fail(e, SF_EINVAL,
		               "fft_shape %c=%zu: below the block (%zu) or the PSF (%zu)", axis,
		               given, n, psf);
	return SF_OK;
}

/* OTF = FFT of the PSF with its centre moved to index 0, scaled by 1/(Nx Ny Nz). */
static int make_otf(sf_deconv_ctx *ctx, const sf_psf *psf, sf_err *e)
{
	sf_dims3 N = ctx->fft;
	double scale = 1.0 / ((double)N.nx * N.ny * N.nz);
	memset(ctx->pad, 0, N.nx * N.ny * N.nz * sizeof(float));
	long cx = (long)psf->nx / 2, cy = (long)psf->ny / 2, cz = (long)psf->nz / 2;
	for (size_t z = 0; z < psf->nz; z++)
		for (size_t y = 0; y < psf->ny; y++)
			for (size_t x = 0; x < psf->nx; x++) {
				size_t pz = (size_t)(((long)z - cz + (long)N.nz) % (long)N.nz);
				size_t py = (size_t)(((long)y - cy + (long)N.ny) % (long)N.ny);
				size_t px = (size_t)(((long)x - cx + (long)N.nx) % (long)N.nx);
				ctx->pad[(pz * N.ny + py) * N.nx + px] =
				    (float)(psf->v[(z * psf->ny + y) * psf->nx + x] * scale);
			}
	int rc = ctx->ops->upload(ctx->plan, ctx->t, ctx->pad, e);
	if (!rc && fused(ctx))
		rc = ctx->ops->make_transfer(ctx->plan, ctx->t, ctx->otf, e);
	else if (!rc)
		rc = ctx->ops->forward(ctx->plan, ctx->t, ctx->otf, e);
	return rc;
}

static int alloc_buffers(sf_deconv_ctx *ctx, sf_err *e)
{
	size_t nfft = ctx->fft.nx * ctx->fft.ny * ctx->fft.nz;
	size_t nblk = ctx->n.nx * ctx->n.ny * ctx->n.nz;
	ctx->pad = malloc(nfft * sizeof(float));
	if (!ctx->pad)
		return sf_fail(e, SF_ENOMEM, "deconv: host buffers for %zu voxels", nfft);
	if (!engine_blocks(ctx)) { /* the host prepares blocks */
		ctx->blk = malloc(nblk * sizeof(float));
		ctx->blk_tmp = malloc(nblk * sizeof(float));
		/* radius <= 512 (size <= 1025) */
		ctx->ext = malloc((size_t)ctx->nthreads * (ctx->n.nx + 2 * 512) * sizeof(float));
		if (!ctx->blk || !ctx->blk_tmp || !ctx->ext)
			return sf_fail(e, SF_ENOMEM, "deconv: host buffers for %zu voxels", nblk);
	}
	void **real[] = {&ctx->y, &ctx->x, &ctx->t, &ctx->r, &ctx->prev, &ctx->g, &ctx->g_old};
	size_t nreal = ctx->p.accelerate ? 7 : 4; /* the last 3 only to accelerate */
	for (size_t i = 0; i < nreal; i++) {
		int rc = ctx->ops->buf_alloc(ctx->plan, 0, real[i], e);
		if (rc)
			return rc;
	}
	int rc = ctx->ops->buf_alloc(ctx->plan, 1, &ctx->spec, e);
	if (!rc)
		rc = ctx->ops->buf_alloc(ctx->plan, 1, &ctx->otf, e);
	return rc;
}

int sf_deconv_ctx_create(const sf_deconv_params *p, const sf_psf *psf, sf_dims3 dims,
                         const sf_fft_ops *ops, const sf_fft_config *cfg, sf_deconv_ctx **out,
                         sf_err *e)
{
	*out = NULL;
	int rc = sf_deconv_params_validate(p, e);
	if (rc)
		return rc;
	if (!dims.nx || !dims.ny || !dims.nz)
		return sf_fail(e, SF_EINVAL, "deconv: empty block %zu x %zu x %zu", dims.nx,
		               dims.ny, dims.nz);
	if (!psf || !psf->v || !(psf->nx % 2) || !(psf->ny % 2) || !(psf->nz % 2))
		return sf_fail(e, SF_EINVAL, "deconv: the PSF must have odd sizes");
	sf_deconv_ctx *ctx = calloc(1, sizeof *ctx);
	if (!ctx)
		return sf_fail(e, SF_ENOMEM, "deconv: context");
	ctx->p = *p;
	ctx->n = dims;
	ctx->psf_n = (sf_dims3){psf->nx, psf->ny, psf->nz};
	ctx->ops = ops;
	ctx->nthreads = cfg->nthreads < 1 ? 1 : cfg->nthreads > 64 ? 64 : cfg->nthreads;
	rc = check_fft_size(p->fft_shape[0], dims.nx, psf->nx, 'x', e);
	if (!rc)
		rc = check_fft_size(p->fft_shape[1], dims.ny, psf->ny, 'y', e);
	if (!rc)
		rc = check_fft_size(p->fft_shape[2], dims.nz, psf->nz, 'z', e);
	if (rc) {
		free(ctx);
		return rc;
	}
	ctx->fft = sf_deconv_fft_dims(dims, ctx->psf_n, p->fft_shape);
	ctx->off = (sf_dims3){(ctx->fft.nx - dims.nx) / 2, (ctx->fft.ny - dims.ny) / 2,
	                      (ctx->fft.nz - dims.nz) / 2};
	ctx->y_box =
	    (sf_fft_box){{ctx->off.nx, ctx->off.ny, ctx->off.nz},
	                 {ctx->off.nx + dims.nx, ctx->off.ny + dims.ny, ctx->off.nz + dims.nz}};
	rc = ops->plan_create(cfg, ctx->fft.nz, ctx->fft.ny, ctx->fft.nx, &ctx->plan, e);
	if (!rc)
		rc = alloc_buffers(ctx, e);
	if (!rc)
		rc = make_otf(ctx, psf, e);
	if (!rc && engine_blocks(ctx)) { /* pad was only for the OTF */
		free(ctx->pad);
		ctx->pad = NULL;
	}
	if (rc) {
		sf_deconv_ctx_destroy(ctx);
		return rc;
	}
	*out = ctx;
	return SF_OK;
}

/* --- the iterations ----------------------------------------------------- */

/* LsDeconv regularises at iteration i (1-based) when regularize_interval is
 * on and below numit, i is a multiple of it, and i is neither first nor last. */
static int is_regularization_time(const sf_deconv_params *p, int i)
{
	int k = p->regularize_interval;
	return k > 0 && k < p->numit && i > 1 && i < p->numit && i % k == 0;
}

/* One RL update from the engine's plain ops:
 * x = |(1 - lambda) x H^T(y / max(Hx, eps)) + lambda r|. */
static int rl_correct(sf_deconv_ctx *ctx, int damp, sf_err *e)
{
	const sf_fft_ops *ops = ctx->ops;
	const sf_deconv_params *p = &ctx->p;
	int rc = ops->forward(ctx->plan, ctx->x, ctx->spec, e); /* t = Hx */
	if (!rc)
		rc = ops->cmul(ctx->plan, ctx->spec, ctx->otf, 0, e);
	if (!rc)
		rc = ops->inverse(ctx->plan, ctx->spec, ctx->t, e);
	if (!rc) /* t = y / max(Hx, eps) */
		rc = ops->rl_ratio(ctx->plan, ctx->t, ctx->y, p->eps, e);
	if (!rc) /* t = H^T t */
		rc = engine_blur(ctx, ctx->t, 1, e);
	if (!rc)
		rc = ops->rl_update(ctx->plan, ctx->x, ctx->t, damp ? ctx->r : NULL,
		                    (float)p->lambda_damping, e);
	return rc;
}

/* Biggs-Andrews (1997) extrapolation, as MATLAB's deconvlucy computes it:
 * alpha = sum(g_{k-1} g_{k-2}) / sum(g_{k-2}^2) clamped to [0, 1], from the
 * last two RL steps g = RL(v) - v, v the extrapolated point each started
 * from; 0 until two steps exist (the first two iterations are plain).  A
 * regularisation iteration does not extrapolate (alpha 0), so the Gaussian
 * and R26 act on x itself as in LsDeconv, and the next momentum x - prev
 * starts from the regularised x. */
static float ba_alpha(const double dots[2], int steps, int reg)
{
	if (reg || steps < 2 || !(dots[1] > 0))
		return 0.0f;
	double a = dots[0] / dots[1];
	return (float)(a > 1.0 ? 1.0 : a > 0.0 ? a : 0.0);
}

/* x_box grown by r voxels on every side, within the padded shape: where x
 * may be nonzero after a filter of radius r (the Gaussian's 2, R26's 1;
 * replicate edges at the shape's faces spread nothing beyond it). */
static void grow_box(sf_deconv_ctx *ctx, size_t r)
{
	size_t N[3] = {ctx->fft.nx, ctx->fft.ny, ctx->fft.nz};
	for (int a = 0; a < 3; a++) {
		ctx->x_box.lo[a] = ctx->x_box.lo[a] > r ? ctx->x_box.lo[a] - r : 0;
		ctx->x_box.hi[a] = ctx->x_box.hi[a] + r < N[a] ? ctx->x_box.hi[a] + r : N[a];
	}
}

/* rl_step's flags at iteration i: keep the spectrum for the next step when
 * nothing will change x between the two (no regularisation next, no
 * extrapolation), and use it when the last step kept it. */
static unsigned step_flags(const sf_deconv_ctx *ctx, int i, int reg)
{
	const sf_deconv_params *p = &ctx->p;
	unsigned flags = ctx->spec_ready && !reg && !p->accelerate ? SF_FFT_SPECTRUM_READY : 0;
	if (!p->accelerate && i < p->numit && !is_regularization_time(p, i + 1))
		flags |= SF_FFT_KEEP_SPECTRUM;
	return flags;
}

/* One iteration's regularisation, prediction and RL update on ctx->x. */
static int rl_one(sf_deconv_ctx *ctx, int i, const double dots[2], int steps, sf_err *e)
{
	const sf_fft_ops *ops = ctx->ops;
	const sf_deconv_params *p = &ctx->p;
	int reg = is_regularization_time(p, i);
	int damp = reg && p->lambda_damping > 0;
	int rc = SF_OK;
	if (reg) {
		rc = ops->gauss(ctx->plan, ctx->x, ctx->t, 0.5f, 2, e);
		grow_box(ctx, 2);
	}
	if (!rc && damp) {
		rc = ops->r26(ctx->plan, ctx->x, ctx->r, e);
		grow_box(ctx, 1); /* R's support, and so the updated x's */
	}
	if (!rc && p->accelerate)
		rc = ops->ba_predict(ctx->plan, ctx->x, ctx->prev, ctx->g,
		                     ba_alpha(dots, steps, reg), e);
	if (!rc && fused(ctx)) {
		unsigned flags = step_flags(ctx, i, reg);
		rc = ops->rl_step(ctx->plan, ctx->x, ctx->y, ctx->spec, ctx->otf,
		                  damp ? ctx->r : NULL, (float)p->lambda_damping, p->eps,
		                  &ctx->x_box, &ctx->y_box, flags, e);
		ctx->spec_ready = !rc && (flags & SF_FFT_KEEP_SPECTRUM);
	} else if (!rc)
		rc = rl_correct(ctx, damp, e);
	return rc;
}

static int rl_iterate(sf_deconv_ctx *ctx, sf_deconv_stats *st, sf_err *e)
{
	const sf_fft_ops *ops = ctx->ops;
	const sf_deconv_params *p = &ctx->p;
	double prev = 0, dots[2] = {0.0, 0.0};
	int rc = SF_OK, steps = 0; /* RL steps g recorded for the acceleration */
	ctx->x_box = ctx->y_box;   /* x0 is y, or a constant, in the block only */
	ctx->spec_ready = 0;
	if (p->stop_criterion > 0)
		rc = ops->norm2(ctx->plan, ctx->x, &prev, e);
	for (int i = 1; !rc && i <= p->numit; i++) {
		if (ctx->stop && atomic_load(ctx->stop))
			return sf_fail(e, SF_EINTR, "deconv: stopped at iteration %d", i);
		rc = rl_one(ctx, i, dots, steps, e);
		if (!rc && p->accelerate) {
			rc = ops->ba_step(ctx->plan, ctx->x, ctx->g, steps ? ctx->g_old : NULL,
			                  dots, e);
			void *swap = ctx->g; /* the newest step becomes g_old */
			ctx->g = ctx->g_old;
			ctx->g_old = swap;
			steps++;
		}
		if (rc)
			break;
		st->iterations = i;
		if (p->stop_criterion > 0) {
			double cur;
			rc = ops->norm2(ctx->plan, ctx->x, &cur, e);
			if (rc)
				break;
			st->last_change = prev > 0 ? fabs(prev - cur) / prev * 100.0 : 0.0;
			prev = cur;
			if (i > 1 && st->last_change <= p->stop_criterion)
				break;
		}
	}
	return rc;
}

/* The host's block copies, a range of planes per thread (they would
 * otherwise run on one core while the engine's passes use all of them).
 * Each plane's bytes do not depend on the split. */
typedef void (*plane_fn)(const sf_deconv_ctx *ctx, const float *src, float *dst, size_t z);

typedef struct plane_job {
	const sf_deconv_ctx *ctx;
	plane_fn fn;
	const float *src;
	float *dst;
} plane_job;

static void plane_part(void *arg, size_t part, size_t first, size_t end)
{
	const plane_job *job = arg;
	(void)part;
	for (size_t z = first; z < end; z++)
		job->fn(job->ctx, job->src, job->dst, z);
}

/* fn for planes [0, nz) on ctx->nthreads threads (ranges.h). */
static void for_planes(const sf_deconv_ctx *ctx, plane_fn fn, const float *src, float *dst,
                       size_t nz)
{
	plane_job job = {ctx, fn, src, dst};
	ranges_run(nz, ctx->nthreads, plane_part, &job);
}

/* Plane z of the padded shape: the block's plane at ctx->off, or
 * init_value there when blk is NULL (x0); zeros around it.  Each float is
 * written once. */
static void pad_plane(const sf_deconv_ctx *ctx, const float *blk, float *pad, size_t z)
{
	sf_dims3 N = ctx->fft, n = ctx->n, o = ctx->off;
	float *plane = pad + z * N.ny * N.nx, v = (float)ctx->p.init_value;
	if (z < o.nz || z >= o.nz + n.nz) {
		memset(plane, 0, N.ny * N.nx * sizeof(float));
		return;
	}
	const float *src = blk ? blk + (z - o.nz) * n.ny * n.nx : NULL;
	memset(plane, 0, o.ny * N.nx * sizeof(float));
	for (size_t y = 0; y < n.ny; y++) {
		float *row = plane + (o.ny + y) * N.nx;
		memset(row, 0, o.nx * sizeof(float));
		if (src)
			memcpy(row + o.nx, src + y * n.nx, n.nx * sizeof(float));
		else
			for (size_t x = 0; x < n.nx; x++)
				row[o.nx + x] = v;
		memset(row + o.nx + n.nx, 0, (N.nx - o.nx - n.nx) * sizeof(float));
	}
	memset(plane + (o.ny + n.ny) * N.nx, 0, (N.ny - o.ny - n.ny) * N.nx * sizeof(float));
}

/* Block plane z cropped out of the padded buffer. */
static void crop_plane(const sf_deconv_ctx *ctx, const float *pad, float *out, size_t z)
{
	sf_dims3 N = ctx->fft, n = ctx->n, o = ctx->off;
	for (size_t y = 0; y < n.ny; y++)
		memcpy(out + (z * n.ny + y) * n.nx,
		       pad + ((z + o.nz) * N.ny + y + o.ny) * N.nx + o.nx, n.nx * sizeof(float));
}

/* Whether any of the n voxels is below 0 (or NaN, which the clamp of step 1
 * also maps to 0). */
static int any_negative(const float *v, size_t n)
{
	int neg = 0;
	for (size_t k = 0; k < n; k++)
		neg |= !(v[k] >= 0.0f);
	return neg;
}

/* Whether steps 1-2 change the block (else it is padded straight from the
 * caller's buffer): the clamp at 0 changes it only when a voxel is below 0,
 * as in background-subtracted float32 data. */
static int host_changes_block(const sf_deconv_ctx *ctx, const float *in, size_t nblk)
{
	float w[1025];
	int filtered = 0;
	for (int a = 0; a < 3; a++)
		filtered |= prefilter_taps(&ctx->p, a, w) >= 0;
	return filtered || ctx->p.dark > 0 || ctx->p.taper || any_negative(in, nblk);
}

/* Engine buffer buf as host floats, when the engine's memory is the
 * host's (FFTW), else NULL. */
static float *host_view(const sf_deconv_ctx *ctx, void *buf)
{
	return sf_fft_host_buffers(ctx->ops) ? buf : NULL;
}

/* Engine buffer buf = blk (or x0 when blk is NULL) zero-padded: written in
 * place when the engine lends its buffers to the host, else through
 * ctx->pad and upload. */
static int pad_into(sf_deconv_ctx *ctx, void *buf, const float *blk, sf_err *e)
{
	float *host = host_view(ctx, buf);
	for_planes(ctx, pad_plane, blk, host ? host : ctx->pad, ctx->fft.nz);
	return host ? SF_OK : ctx->ops->upload(ctx->plan, buf, ctx->pad, e);
}

/* Steps 1-3 on the host; the padded y and x0 into the engine. */
static int prepare_on_host(sf_deconv_ctx *ctx, const float *in, sf_err *e)
{
	size_t nblk = ctx->n.nx * ctx->n.ny * ctx->n.nz;
	const float *blk = in;
	if (host_changes_block(ctx, in, nblk)) {
		memcpy(ctx->blk, in, nblk * sizeof(float));
		prefilter(ctx);
		/* Always clamped, dark or not: y < 0 over the floor eps of Hx
		 * makes the ratio step explode (-500 / 1.19e-7), and RL's
		 * multiplicative update assumes y >= 0. */
		for (size_t k = 0; k < nblk; k++)
			ctx->blk[k] = fmaxf(ctx->blk[k] - (float)ctx->p.dark, 0.0f);
		int rc = ctx->p.taper ? taper(ctx, e) : SF_OK;
		if (rc)
			return rc;
		blk = ctx->blk;
	}
	int rc = pad_into(ctx, ctx->y, blk, e);
	return rc ? rc : pad_into(ctx, ctx->x, ctx->p.init_value > 0 ? NULL : blk, e);
}

/* Step 5 on the host. */
static int finish_on_host(sf_deconv_ctx *ctx, float *out, sf_err *e)
{
	const float *x = host_view(ctx, ctx->x);
	int rc = x ? SF_OK : ctx->ops->download(ctx->plan, ctx->pad, ctx->x, e);
	if (!rc)
		for_planes(ctx, crop_plane, x ? x : ctx->pad, out, ctx->n.nz);
	return rc;
}

/* Steps 1-3 in engine memory, the same operations as prepare_on_host: the
 * block is uploaded compact into r, filtered between r and t, tapered
 * against its replicate-padded blur in y, then padded into y and x. */
static int prepare_on_engine(sf_deconv_ctx *ctx, const float *in, sf_err *e)
{
	const sf_fft_ops *ops = ctx->ops;
	size_t blk[3] = {ctx->n.nx, ctx->n.ny, ctx->n.nz},
	       off[3] = {ctx->off.nx, ctx->off.ny, ctx->off.nz};
	size_t nblk = blk[0] * blk[1] * blk[2];
	void *cur = ctx->r, *other = ctx->t;
	float w[1025];
	int rc = ops->upload_n(ctx->plan, cur, in, nblk, e);
	for (int a = 0; a < 3 && !rc; a++) {
		int radius = prefilter_taps(&ctx->p, a, w);
		if (radius < 0)
			continue;
		rc = ops->filter_axis(ctx->plan, other, cur, blk, a, w, radius, e);
		void *swap = cur;
		cur = other;
		other = swap;
	}
	if (!rc) /* clamps at 0 with dark 0 too, as prepare_on_host */
		rc = ops->subtract(ctx->plan, cur, nblk, (float)ctx->p.dark, e);
	if (!rc && ctx->p.taper) {
		size_t width[3] = {taper_width(ctx->psf_n.nx, blk[0]),
		                   taper_width(ctx->psf_n.ny, blk[1]),
		                   taper_width(ctx->psf_n.nz, blk[2])};
		rc = ops->pad(ctx->plan, ctx->y, cur, blk, off, 1, e);
		if (!rc)
			rc = engine_blur(ctx, ctx->y, 0, e);
		if (!rc)
			rc = ops->taper(ctx->plan, cur, ctx->y, blk, off, width, e);
	}
	if (!rc)
		rc = ops->pad(ctx->plan, ctx->y, cur, blk, off, 0, e);
	if (!rc && ctx->p.init_value > 0)
		rc = ops->fill(ctx->plan, cur, nblk, (float)ctx->p.init_value, e);
	return rc ? rc : ops->pad(ctx->plan, ctx->x, cur, blk, off, 0, e);
}

/* Step 5 in engine memory: crop x into t, download the block alone. */
static int finish_on_engine(sf_deconv_ctx *ctx, float *out, sf_err *e)
{
	size_t blk[3] = {ctx->n.nx, ctx->n.ny, ctx->n.nz},
	       off[3] = {ctx->off.nx, ctx->off.ny, ctx->off.nz};
	int rc = ctx->ops->crop(ctx->plan, ctx->t, ctx->x, blk, off, e);
	return rc ? rc : ctx->ops->download_n(ctx->plan, out, ctx->t, blk[0] * blk[1] * blk[2], e);
}

int sf_deconv_block(sf_deconv_ctx *ctx, const float *in, float *out, sf_deconv_stats *stats,
                    sf_err *e)
{
	sf_deconv_stats st = {0, 0.0};
	int on_engine = engine_blocks(ctx);
	int rc = on_engine ? prepare_on_engine(ctx, in, e) : prepare_on_host(ctx, in, e);
	if (!rc)
		rc = rl_iterate(ctx, &st, e);
	if (!rc)
		rc = on_engine ? finish_on_engine(ctx, out, e) : finish_on_host(ctx, out, e);
	if (!rc && stats)
		*stats = st;
	return rc;
}

int sf_deconv_block_once(const sf_deconv_params *p, const sf_psf *psf, sf_dims3 dims,
                         const float *in, float *out, const sf_fft_ops *ops,
                         const sf_fft_config *cfg, sf_err *e)
{
	sf_deconv_ctx *ctx;
	int rc = sf_deconv_ctx_create(p, psf, dims, ops, cfg, &ctx, e);
	if (rc)
		return rc;
	rc = sf_deconv_block(ctx, in, out, NULL, e);
	sf_deconv_ctx_destroy(ctx);
	return rc;
}

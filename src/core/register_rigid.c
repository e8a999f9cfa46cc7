/* register_rigid.c — similarity initialisation by Fourier-Mellin phase
 * correlation (Reddy & Chatterji 1996), for any rotation, mirroring and
 * shifts up to about the image size.
 *
 * If ref(x) = mov(A x + t) with A = s Rot(theta), the magnitude spectra obey
 * |F_ref|(k) ~ |F_mov|(A^-T k) = |F_mov|(Rot(theta) k / s): translation
 * drops out, and in log-polar coordinates (phi, rho = log |k|) rotation and
 * scale become the shift (-theta, log s).  Magnitude spectra are symmetric,
 * so phi covers [0, pi) and theta is known modulo 180 degrees: both are
 * tried.  For each candidate A the moving image is warped by A about the
 * image centres and the translation comes from a second phase correlation;
 * the candidate whose map gives the best NCC over the reference wins.  The
 * mirrored moving image goes through the same search (try_mirror).
 *
 * The search runs on box-halved copies whose longest side is at most
 * init_dim, on zero-padded square canvases twice that size (so shifts up to
 * the image size are unambiguous and nothing wraps).  Images are tapered
 * to 0 over a few pixels at their borders so the frame edges leave no cross
 * in the spectrum.
 *
 * FFTW: plans are made per call with FFTW_ESTIMATE (fast, no scribbling).
 * The planner is not thread-safe, so plans are made and destroyed under the
 * process-wide planner lock of fft_fftw.c (sf_fft_fftw_planner_lock).
 *
 * Metric MI (different stains): the search also runs on the negated moving
 * image and candidates are ranked and settled by mutual information
 * (search_mi, register_mi.c). */
#include "scopefs/register.h"

#include <fftw3.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "register_math.h"
#include "scopefs/fft.h"

#define LP_ANGLES      360 /* log-polar rows over [0, pi): 0.5 degree steps */
#define LP_RADII       256 /* log-polar columns */
#define LP_RMIN        3.0 /* lowest frequency sampled (cycles per canvas) */
#define TAPER_PX       8   /* border ramp of the images before their FFT */
#define MAX_CANDIDATES 16

/* A 2D real FFT of rows x cols with its buffers. */
typedef struct fft2 {
	int rows, cols, ccols; /* ccols = cols / 2 + 1 */
	float *re;
	fftwf_complex *c;
	fftwf_plan fwd, inv;
} fft2;

static void fft2_free(fft2 *f)
{
	sf_fft_fftw_planner_lock();
	if (f->fwd)
		fftwf_destroy_plan(f->fwd);
	if (f->inv)
		fftwf_destroy_plan(f->inv);
	sf_fft_fftw_planner_unlock();
	fftwf_free(f->re);
	fftwf_free(f->c);
	memset(f, 0, sizeof *f);
}

static int fft2_make(fft2 *f, int rows, int cols, sf_err *e)
{
	memset(f, 0, sizeof *f);
	f->rows = rows;
	f->cols = cols;
	f->ccols = cols / 2 + 1;
	f->re = fftwf_malloc((size_t)rows * cols * sizeof *f->re);
	f->c = fftwf_malloc((size_t)rows * f->ccols * sizeof *f->c);
	if (!f->re || !f->c) {
		fft2_free(f);
		return sf_fail(e, SF_ENOMEM, "register: FFT buffers %d x %d", rows, cols);
	}
	sf_fft_fftw_planner_lock();
	f->fwd = fftwf_plan_dft_r2c_2d(rows, cols, f->re, f->c, FFTW_ESTIMATE);
	f->inv = fftwf_plan_dft_c2r_2d(rows, cols, f->c, f->re, FFTW_ESTIMATE);
	sf_fft_fftw_planner_unlock();
	if (!f->fwd || !f->inv) {
		fft2_free(f);
		return sf_fail(e, SF_EUNSUPPORTED, "register: no FFT plan for %d x %d", rows, cols);
	}
	return SF_OK;
}

static size_t fft2_ncplx(const fft2 *f)
{
	return (size_t)f->rows * f->ccols;
}

/* f->re -> spec (ncplx values). */
static void fft2_forward(fft2 *f, fftwf_complex *spec)
{
	fftwf_execute_dft_r2c(f->fwd, f->re, spec);
}

/* out := the normalised cross-power correlation of a against b, through c
 * (f's shapes and plans; other buffers than f's are fine, FFTW's new-array
 * execution): its peak sits at d where a(p) = b(p - d) (circularly). */
static void fft2_phase_correlate_into(const fft2 *f, const fftwf_complex *a, const fftwf_complex *b,
                                      fftwf_complex *c, float *out)
{
	size_t n = fft2_ncplx(f);
	for (size_t i = 0; i < n; i++) {
		float re = a[i][0] * b[i][0] + a[i][1] * b[i][1];
		float im = a[i][1] * b[i][0] - a[i][0] * b[i][1];
		float mag = sqrtf(re * re + im * im) + 1e-20f;
		c[i][0] = re / mag;
		c[i][1] = im / mag;
	}
	fftwf_execute_dft_c2r(f->inv, c, out);
}

/* f->re := the correlation of a against b (fft2_phase_correlate_into). */
static void fft2_phase_correlate(fft2 *f, const fftwf_complex *a, const fftwf_complex *b)
{
	fft2_phase_correlate_into(f, a, b, f->c, f->re);
}

/* The smallest 2^a 3^b 5^c >= n. */
static int nice_size(int n)
{
	for (int m = n;; m++) {
		int r = m;
		while (r % 2 == 0)
			r /= 2;
		while (r % 3 == 0)
			r /= 3;
		while (r % 5 == 0)
			r /= 5;
		if (r == 1)
			return m;
	}
}

/* Weight that ramps from 0 to 1 over TAPER_PX pixels inside each border. */
static float taper(long i, long n)
{
	long d = i < n - 1 - i ? i : n - 1 - i;
	if (d >= TAPER_PX)
		return 1.0f;
	double s = sin(M_PI / 2 * (d + 0.5) / TAPER_PX);
	return (float)(s * s);
}

/* The tapered image at offset (ox, oy) of the zeroed N x N canvas. */
static void put_canvas(const sf_reg_image *im, int n, int ox, int oy, float *canvas)
{
	memset(canvas, 0, (size_t)n * n * sizeof *canvas);
	for (uint32_t y = 0; y < im->h; y++) {
		float ty = taper(y, im->h);
		for (uint32_t x = 0; x < im->w; x++)
			canvas[(size_t)(y + oy) * n + x + ox] =
			    im->px[(size_t)y * im->w + x] * ty * taper(x, im->w);
	}
}

/* |spec| at integer frequency (kx, ky), from the half spectrum of an n x n
 * real FFT by conjugate symmetry. */
static float mag_at(const float *mag, int n, int kx, int ky)
{
	if (kx < 0) {
		kx = -kx;
		ky = -ky;
	}
	ky = ((ky % n) + n) % n;
	return mag[(size_t)ky * (n / 2 + 1) + kx];
}

/* Log-polar resampling of the log magnitude spectrum into lp
 * (LP_ANGLES x LP_RADII), zero-mean, Hann-windowed along the radius (the
 * non-periodic axis). */
static void log_polar(const fftwf_complex *spec, int n, float *mag, float *lp, double *rho_step)
{
	size_t nc = (size_t)n * (n / 2 + 1);
	for (size_t i = 0; i < nc; i++)
		mag[i] = logf(1e-6f + sqrtf(spec[i][0] * spec[i][0] + spec[i][1] * spec[i][1]));
	double rmax = 0.45 * n, step = log(rmax / LP_RMIN) / (LP_RADII - 1);
	*rho_step = step;
	double sum = 0;
	for (int a = 0; a < LP_ANGLES; a++) {
		double phi = M_PI * a / LP_ANGLES, c = cos(phi), s = sin(phi);
		for (int j = 0; j < LP_RADII; j++) {
			double r = LP_RMIN * exp(j * step), kx = r * c, ky = r * s;
			int ix = (int)floor(kx), iy = (int)floor(ky);
			float fx = (float)(kx - ix), fy = (float)(ky - iy);
			float v00 = mag_at(mag, n, ix, iy), v01 = mag_at(mag, n, ix + 1, iy);
			float v10 = mag_at(mag, n, ix, iy + 1),
			      v11 = mag_at(mag, n, ix + 1, iy + 1);
			float top = v00 + fx * (v01 - v00), bot = v10 + fx * (v11 - v10);
			float v = top + fy * (bot - top);
			lp[a * LP_RADII + j] = v;
			sum += v;
		}
	}
	float mean = (float)(sum / ((double)LP_ANGLES * LP_RADII));
	for (int a = 0; a < LP_ANGLES; a++)
		for (int j = 0; j < LP_RADII; j++) {
			float hann = (float)(0.5 - 0.5 * cos(2 * M_PI * (j + 0.5) / LP_RADII));
			lp[a * LP_RADII + j] = (lp[a * LP_RADII + j] - mean) * hann;
		}
}

/* Sub-sample offset of a peak from its two neighbours (parabola vertex). */
static double parabola(float left, float mid, float right)
{
	double den = left - 2.0 * mid + right;
	if (den >= 0)
		return 0;
	double d = 0.5 * (left - right) / den;
	return d < -0.5 ? -0.5 : d > 0.5 ? 0.5 : d;
}

typedef struct peak {
	double v;      /* correlation value */
	double dr, dc; /* shift in rows, columns (wrapped to [-n/2, n/2)) */
} peak;

/* The best `want` local maxima of the rows x cols correlation c, at least
 * `sep` samples apart (circular), whose column shift is within col_limit;
 * returns how many were found. */
static int find_peaks(const float *c, int rows, int cols, double col_limit, int sep, int want,
                      peak *out)
{
	int found = 0;
	for (int k = 0; k < want; k++) {
		double best = -INFINITY;
		int br = -1, bc = -1;
		for (int r = 0; r < rows; r++) {
			for (int q = 0; q < cols; q++) {
				double dq = q < cols / 2 ? q : q - cols;
				if (fabs(dq) > col_limit)
					continue;
				float v = c[(size_t)r * cols + q];
				if (v <= best)
					continue;
				int near = 0;
				for (int j = 0; j < found && !near; j++) {
					double ddr = fabs(remainder(out[j].dr - r, rows));
					double ddc = fabs(remainder(out[j].dc - q, cols));
					near = ddr < sep && ddc < sep;
				}
				if (!near) {
					best = v;
					br = r;
					bc = q;
				}
			}
		}
		if (br < 0)
			break;
		const float *row = c + (size_t)br * cols;
		int up = (br + rows - 1) % rows, dn = (br + 1) % rows;
		double sr = parabola(c[(size_t)up * cols + bc], row[bc], c[(size_t)dn * cols + bc]);
		double sc = parabola(row[(bc + cols - 1) % cols], row[bc], row[(bc + 1) % cols]);
		double dr = br + sr, dc = bc + sc;
		out[found].v = best;
		out[found].dr = dr >= rows / 2.0 ? dr - rows : dr;
		out[found].dc = dc >= cols / 2.0 ? dc - cols : dc;
		found++;
	}
	return found;
}

/* The buffers of one translation (fm_translation): the canvas, its
 * spectrum and the cross-power spectrum, shaped as fm_search's img. */
typedef struct tr_scratch {
	float *re;
	fftwf_complex *spec, *c;
} tr_scratch;

static void tr_scratch_free(tr_scratch *t)
{
	fftwf_free(t->re);
	fftwf_free(t->spec);
	fftwf_free(t->c);
	memset(t, 0, sizeof *t);
}

/* Search state for one (reference, moving) pair of work images. */
typedef struct fm_search {
	const sf_reg_image *ref;
	const sf_reg_image *mi_ref, *mi_mov; /* metric MI: the intensity images the candidates
	                                        are ranked on (MI); NULL: by NCC of the searched */
	int n;                               /* canvas side */
	int rox, roy;                        /* the reference's offset in its canvas */
	fft2 img;                            /* n x n */
	fft2 lpf;                            /* LP_ANGLES x LP_RADII */
	fftwf_complex *ref_spec, *ref_lp_spec, *spec, *lp_spec;
	float *mag; /* log magnitude of the half spectrum */
	double rho_step;
	reg_pool *pool;   /* borrowed; NULL: one thread */
	tr_scratch extra; /* a second thread's translation buffers (re NULL: none) */
} fm_search;

static void fm_free(fm_search *s)
{
	fft2_free(&s->img);
	fft2_free(&s->lpf);
	fftwf_free(s->ref_spec);
	fftwf_free(s->ref_lp_spec);
	fftwf_free(s->spec);
	fftwf_free(s->lp_spec);
	free(s->mag);
	tr_scratch_free(&s->extra);
}

/* The log-polar spectrum of im (on the canvas at its centre) into lp_out. */
static void fm_lp_spectrum(fm_search *s, const sf_reg_image *im, fftwf_complex *lp_out)
{
	put_canvas(im, s->n, (s->n - (int)im->w) / 2, (s->n - (int)im->h) / 2, s->img.re);
	fft2_forward(&s->img, s->spec);
	log_polar(s->spec, s->n, s->mag, s->lpf.re, &s->rho_step);
	fft2_forward(&s->lpf, lp_out);
}

static int fm_init(fm_search *s, const sf_reg_image *ref, int n, reg_pool *pool, sf_err *e)
{
	memset(s, 0, sizeof *s);
	s->ref = ref;
	s->n = n;
	s->pool = pool;
	s->rox = (n - (int)ref->w) / 2;
	s->roy = (n - (int)ref->h) / 2;
	int rc = fft2_make(&s->img, n, n, e);
	if (!rc)
		rc = fft2_make(&s->lpf, LP_ANGLES, LP_RADII, e);
	if (rc) {
		fm_free(s);
		return rc;
	}
	size_t nc = fft2_ncplx(&s->img), nlc = fft2_ncplx(&s->lpf);
	s->ref_spec = fftwf_malloc(nc * sizeof *s->ref_spec);
	s->spec = fftwf_malloc(nc * sizeof *s->spec);
	s->ref_lp_spec = fftwf_malloc(nlc * sizeof *s->ref_lp_spec);
	s->lp_spec = fftwf_malloc(nlc * sizeof *s->lp_spec);
	s->mag = malloc(nc * sizeof *s->mag);
	if (!s->ref_spec || !s->spec || !s->ref_lp_spec || !s->lp_spec || !s->mag) {
		fm_free(s);
		return sf_fail(e, SF_ENOMEM, "register: Fourier-Mellin buffers (%d px canvas)", n);
	}
	fm_lp_spectrum(s, ref, s->ref_lp_spec);
	put_canvas(ref, n, s->rox, s->roy, s->img.re);
	fft2_forward(&s->img, s->ref_spec);
	if (reg_pool_threads(pool) > 1) { /* without them, one thread does all */
		tr_scratch *t = &s->extra;
		t->re = fftwf_malloc((size_t)n * n * sizeof *t->re);
		t->spec = fftwf_malloc(nc * sizeof *t->spec);
		t->c = fftwf_malloc(nc * sizeof *t->c);
		if (!t->re || !t->spec || !t->c)
			tr_scratch_free(t);
	}
	return SF_OK;
}

/* The translation completing linear part a (2x2) for mov: warp mov by a
 * about the centres into the canvas, phase-correlate with the reference.
 * Fills m (3x3). */
static void fm_translation(const fm_search *s, const tr_scratch *t, const sf_reg_image *mov,
                           const double a[4], double m[9])
{
	int n = s->n;
	double crx = (s->ref->w - 1) / 2.0, cry = (s->ref->h - 1) / 2.0;
	double cmx = (mov->w - 1) / 2.0, cmy = (mov->h - 1) / 2.0;
	for (int py = 0; py < n; py++) {
		double ux = -s->rox - crx, uy = py - s->roy - cry;
		float *row = t->re + (size_t)py * n;
		for (int px = 0; px < n; px++, ux += 1) {
			double x = a[0] * ux + a[1] * uy + cmx, y = a[2] * ux + a[3] * uy + cmy;
			float v = reg_sample_zero(mov, x, y);
			if (v != 0.0f)
				v *= taper((long)floor(x + 0.5), mov->w) *
				     taper((long)floor(y + 0.5), mov->h);
			row[px] = v;
		}
	}
	fftwf_execute_dft_r2c(s->img.fwd, t->re, t->spec);
	fft2_phase_correlate_into(&s->img, s->ref_spec, t->spec, t->c, t->re);
	peak p;
	find_peaks(t->re, n, n, n, 1, 1, &p);
	/* ref_canvas(p) = warped(p + delta) with delta = -peak. */
	double dx = -p.dc - crx, dy = -p.dr - cry;
	m[0] = a[0];
	m[1] = a[1];
	m[2] = cmx + a[0] * dx + a[1] * dy;
	m[3] = a[2];
	m[4] = a[3];
	m[5] = cmy + a[2] * dx + a[3] * dy;
	m[6] = m[7] = 0;
	m[8] = 1;
}

/* The search keeps the best few distinct candidates by NCC; the
 * initialisation then refines each at the search level and keeps the best
 * refined one, since a coarse NCC alone can favour a wrong angle when the
 * moving slide shows only part of the tissue.  Metric MI ranks by MI and
 * refines more of them: an unrefined MI separates candidates less well
 * (the top KEEP of a list of KEEP_MI are those a list of KEEP would hold). */
#define KEEP        5
#define KEEP_MI     10
#define DISTINCT_PX 4.0 /* candidates closer than this at every corner are one */
#define MIN_OVERLAP 0.2 /* overlap fraction below which a candidate's NCC is discounted */

typedef struct candidate {
	double m[9]; /* work-level map, into the unmirrored moving image */
	double ncc;
} candidate;

typedef struct cand_list {
	int n;
	candidate c[KEEP_MI];
} cand_list;

static double corner_distance(const double *a, const double *b, const sf_reg_image *ref)
{
	double worst = 0;
	for (int k = 0; k < 4; k++) {
		double x = (k & 1) ? ref->w - 1.0 : 0, y = (k & 2) ? ref->h - 1.0 : 0;
		double dx = (a[0] - b[0]) * x + (a[1] - b[1]) * y + a[2] - b[2];
		double dy = (a[3] - b[3]) * x + (a[4] - b[4]) * y + a[5] - b[5];
		double d = sqrt(dx * dx + dy * dy);
		worst = d > worst ? d : worst;
	}
	return worst;
}

/* Insert (m, ncc) keeping the list sorted by NCC and its maps distinct. */
static void cand_add(cand_list *l, const double m[9], double ncc, const sf_reg_image *ref)
{
	for (int i = 0; i < l->n; i++)
		if (corner_distance(l->c[i].m, m, ref) < DISTINCT_PX) {
			if (ncc <= l->c[i].ncc)
				return;
			for (int j = i; j + 1 < l->n; j++) /* drop the weaker twin */
				l->c[j] = l->c[j + 1];
			l->n--;
			break;
		}
	int at = l->n;
	while (at > 0 && l->c[at - 1].ncc < ncc)
		at--;
	if (at >= KEEP_MI)
		return;
	int last = l->n < KEEP_MI ? l->n : KEEP_MI - 1;
	for (int j = last; j > at; j--)
		l->c[j] = l->c[j - 1];
	memcpy(l->c[at].m, m, 9 * sizeof *m);
	l->c[at].ncc = ncc;
	if (l->n < KEEP_MI)
		l->n++;
}

/* Metric MI: a candidate's MI between the intensity work images, with
 * the overlap discount of the final choice. */
#define RANK_BINS 32

static double candidate_mi(const fm_search *s, const double m[9])
{
	double overlap;
	double mi = sf_reg_mi(s->mi_ref, NULL, s->mi_mov, m, RANK_BINS, &overlap);
	return mi * (overlap < MIN_OVERLAP ? overlap / MIN_OVERLAP : 1);
}

/* The candidate maps of one search (fm_search_one), made in parallel:
 * try i is peak i / 2 with 180 degrees added when i is odd. */
typedef struct tr_job {
	const fm_search *s;
	const sf_reg_image *mov;
	uint32_t mirror_w;
	const double (*a)[4]; /* the linear part of each try */
	double (*m)[9];       /* its map, into the unmirrored moving image */
	double *fit;          /* its NCC (metric MI: its MI) */
	int tries, blocks;
} tr_job;

/* Block b makes tries b, b + blocks, ... with its own buffers (block 0:
 * the search's own).  A try's map and fit depend only on the try, so the
 * outcome is the same on any number of threads. */
static void tr_block(void *ctx, long b)
{
	const tr_job *j = ctx;
	const fm_search *s = j->s;
	tr_scratch own = {s->img.re, s->spec, s->img.c};
	const tr_scratch *t = b ? &s->extra : &own;
	/* mirror(y) = (w - 1 - y_x, y_y) */
	double f[9] = {-1, 0, j->mirror_w - 1.0, 0, 1, 0, 0, 0, 1};
	for (int i = (int)b; i < j->tries; i += j->blocks) {
		double *m = j->m[i];
		fm_translation(s, t, j->mov, j->a[i], m);
		double fit = s->mi_ref ? 0 : reg_ncc(s->ref, NULL, j->mov, m, 0, NULL);
		if (j->mirror_w)
			sf_mat3_mul(f, m, m);
		j->fit[i] = s->mi_ref ? candidate_mi(s, m) : fit;
	}
}

/* Search mov (the moving work image, or its mirror when mirror_w > 0: then
 * maps are turned back into the unmirrored image, whose width is mirror_w)
 * and add the candidates to l, in the order of the peaks. */
static void fm_search_one(fm_search *s, const sf_reg_image *mov, const sf_reg_opts *o,
                          uint32_t mirror_w, cand_list *l)
{
	fm_lp_spectrum(s, mov, s->lp_spec);
	fft2_phase_correlate(&s->lpf, s->ref_lp_spec, s->lp_spec);
	peak pk[MAX_CANDIDATES];
	int want = o->candidates < MAX_CANDIDATES ? o->candidates : MAX_CANDIDATES;
	double rho_limit = log(o->max_scale) / s->rho_step + 0.5;
	int np = find_peaks(s->lpf.re, LP_ANGLES, LP_RADII, rho_limit, 4, want, pk);
	double a[2 * MAX_CANDIDATES][4], m[2 * MAX_CANDIDATES][9], fit[2 * MAX_CANDIDATES];
	for (int i = 0; i < np; i++) {
		/* lp_ref(phi, rho) = lp_mov(phi - dphi, rho - drho): theta = -dphi. */
		double theta = -pk[i].dr * M_PI / LP_ANGLES, scale = exp(pk[i].dc * s->rho_step);
		for (int flip = 0; flip < 2; flip++) {
			double th = theta + flip * M_PI, c = scale * cos(th), sn = scale * sin(th);
			double *ai = a[2 * i + flip];
			ai[0] = c, ai[1] = -sn, ai[2] = sn, ai[3] = c;
		}
	}
	tr_job j = {s, mov, mirror_w, a, m, fit, 2 * np, s->extra.re ? 2 : 1};
	reg_pool_run(s->pool, j.blocks, tr_block, &j);
	for (int i = 0; i < 2 * np; i++)
		cand_add(l, m[i], fit[i], s->ref);
}

void sf_reg_opts_default(sf_reg_opts *o)
{
	o->model = SF_REG_SIMILARITY;
	o->try_mirror = 1;
	o->max_scale = 1.6;
	o->init_dim = 256;
	o->min_dim = 64;
	o->max_dim = 0;
	o->max_iter = 40;
	o->candidates = 8;
	o->metric = SF_REG_METRIC_NCC;
	o->threads = 1;
}

static int check_opts(const sf_reg_opts *o, sf_err *e)
{
	if (o->model != SF_REG_SIMILARITY && o->model != SF_REG_AFFINE)
		return sf_fail(e, SF_EINVAL, "register: model %d", (int)o->model);
	if (!(o->max_scale >= 1 && o->max_scale <= 16))
		return sf_fail(e, SF_EINVAL, "register: max_scale %g (1..16)", o->max_scale);
	if (o->init_dim < 32 || o->init_dim > 4096)
		return sf_fail(e, SF_EINVAL, "register: init_dim %u (32..4096)", o->init_dim);
	if (o->candidates < 1 || o->max_iter < 0)
		return sf_fail(e, SF_EINVAL, "register: candidates %d, max_iter %d", o->candidates,
		               o->max_iter);
	if (o->metric != SF_REG_METRIC_NCC && o->metric != SF_REG_METRIC_MI)
		return sf_fail(e, SF_EINVAL, "register: metric %d", o->metric);
	return SF_OK;
}

/* Search rmov against rref (and, with try_mirror, rmov's mirror) on an
 * n x n canvas, adding to l the candidates ranked by MI of rank_ref and
 * rank_mov (NULL: by NCC of the searched images). */
static int search_pair(const sf_reg_image *rref, const sf_reg_image *rmov, int n,
                       const sf_reg_image *rank_ref, const sf_reg_image *rank_mov,
                       const sf_reg_opts *o, reg_pool *pool, cand_list *l, sf_err *e)
{
	fm_search s;
	int rc = fm_init(&s, rref, n, pool, e);
	if (rc)
		return rc;
	s.mi_ref = rank_ref;
	s.mi_mov = rank_mov;
	fm_search_one(&s, rmov, o, 0, l);
	if (o->try_mirror) {
		sf_reg_image mirrored;
		rc = reg_mirror_x(rmov, &mirrored, e);
		if (!rc) {
			fm_search_one(&s, &mirrored, o, rmov->w, l);
			sf_reg_image_free(&mirrored);
		}
	}
	fm_free(&s);
	return rc;
}

/* Metric MI.  The log-polar magnitude spectra do not care about the sign
 * of a stain's contrast, but the translation's phase correlation does:
 * where the moving stain is mostly the reference's inverted (nuclei bright
 * in one, dark in the other), its peak points downwards and is missed.  So
 * the search runs twice, on the moving intensities and on their negation,
 * and all candidates are ranked by the MI of the intensities.  (A third
 * search on gradient magnitudes was tried: over 56 test pairs it failed as
 * often as refining 10 candidates instead of 8 did, at a fifth more time.) */
static int search_mi(const sf_reg_image *rw, const sf_reg_image *mw, int n, const sf_reg_opts *o,
                     reg_pool *pool, cand_list *l, sf_err *e)
{
	sf_reg_image neg;
	int rc = search_pair(rw, mw, n, rw, mw, o, pool, l, e);
	if (!rc)
		rc = sf_reg_image_alloc(&neg, mw->w, mw->h, e);
	if (!rc) {
		for (size_t i = 0; i < (size_t)mw->w * mw->h; i++)
			neg.px[i] = -mw->px[i];
		rc = search_pair(rw, &neg, n, rw, mw, o, pool, l, e);
		sf_reg_image_free(&neg);
	}
	return rc;
}

/* Number of halvings that bring the longest side of both images to init_dim. */
static unsigned search_level(const sf_reg_image *a, const sf_reg_image *b, uint32_t dim)
{
	uint32_t longest = a->w;
	longest = a->h > longest ? a->h : longest;
	longest = b->w > longest ? b->w : longest;
	longest = b->h > longest ? b->h : longest;
	unsigned l = 0;
	while ((longest + (1u << l) - 1) >> l > dim)
		l++;
	return l;
}

/* The refinement of one candidate (cand_block), each on its own thread
 * with no pool of its own: candidates are independent, so the outcome does
 * not depend on which thread ran which. */
typedef struct cand_job {
	const reg_refine_pyramids *pp; /* pool NULL */
	const sf_reg_opts *quick;
	const cand_list *cands;
	unsigned lv; /* the search level */
	sf_reg_result *res;
	int *rc;
	sf_err *err;
} cand_job;

static void cand_block(void *ctx, long i)
{
	const cand_job *j = ctx;
	memset(&j->res[i], 0, sizeof j->res[i]);
	reg_map_from_level(j->cands->c[i].m, j->lv, j->res[i].m);
	j->rc[i] = j->quick->metric == SF_REG_METRIC_MI
	               ? reg_refine_mi(j->pp, NULL, j->quick, &j->res[i], &j->err[i])
	               : reg_refine_ncc(j->pp, NULL, j->quick, &j->res[i], &j->err[i]);
}

/* Settle between the candidates by refining each at the search level
 * (in parallel over the pool); the best one, into r. */
static int settle(const reg_pyramid *rp, const reg_pyramid *mp, unsigned lv, const cand_list *cands,
                  const sf_reg_opts *o, reg_pool *pool, sf_reg_result *r, sf_err *e)
{
	sf_reg_opts quick = *o; /* same metric: MI candidates are judged by MI */
	quick.model = SF_REG_SIMILARITY;
	/* MI refinements cost more than NCC ones: settling a level coarser
	 * more than halved the MI initialisation's time on the test pairs
	 * and changed none of their outcomes. */
	quick.max_dim = o->metric == SF_REG_METRIC_MI ? o->init_dim / 2 : o->init_dim;
	reg_refine_pyramids pp;
	reg_refine_view(rp, mp, &quick, NULL, &pp);
	int tries = o->metric == SF_REG_METRIC_MI ? KEEP_MI : KEEP;
	tries = tries < cands->n ? tries : cands->n;
	sf_reg_result res[KEEP_MI];
	int rcs[KEEP_MI];
	sf_err errs[KEEP_MI];
	cand_job job = {&pp, &quick, cands, lv, res, rcs, errs};
	reg_pool_run(pool, tries, cand_block, &job);
	double best_fit = -2;
	for (int i = 0; i < tries; i++) {
		if (rcs[i]) {
			if (e)
				*e = errs[i];
			return rcs[i];
		}
		/* Judge by the NCC (metric MI: the MI) over the overlap, which
		 * stays high for the right map when the moving slide shows only
		 * part of the tissue; a small overlap (under MIN_OVERLAP of the
		 * reference) that happens to fit is discounted in proportion. */
		double fit = o->metric == SF_REG_METRIC_MI ? res[i].mi : res[i].ncc;
		fit *= res[i].overlap < MIN_OVERLAP ? res[i].overlap / MIN_OVERLAP : 1;
		if (fit > best_fit) {
			best_fit = fit;
			*r = res[i];
		}
	}
	return SF_OK;
}

/* The initialisation on pyramids built to at least the search level l. */
static int init_on(const reg_pyramid *rp, const reg_pyramid *mp, unsigned l, const sf_reg_opts *o,
                   reg_pool *pool, sf_reg_result *r, sf_err *e)
{
	/* Both pyramids reach level l unless an image is tiny; use the level
	 * both have, the scale between them stays that of the thumbnails. */
	unsigned lv = rp->n - 1 < mp->n - 1 ? rp->n - 1 : mp->n - 1;
	lv = lv < l ? lv : l;
	const sf_reg_image *rw = &rp->lv[lv], *mw = &mp->lv[lv];
	uint32_t longest = rw->w > rw->h ? rw->w : rw->h;
	longest = mw->w > longest ? mw->w : longest;
	longest = mw->h > longest ? mw->h : longest;
	int n = nice_size(2 * (int)longest);
	cand_list cands = {0};
	int rc = o->metric == SF_REG_METRIC_MI
	             ? search_mi(rw, mw, n, o, pool, &cands, e)
	             : search_pair(rw, mw, n, NULL, NULL, o, pool, &cands, e);
	if (!rc)
		rc = settle(rp, mp, lv, &cands, o, pool, r, e);
	return rc;
}

static int check_images(const sf_reg_image *ref, const sf_reg_image *mov, sf_err *e)
{
	if (!ref->px || !mov->px || ref->w < 8 || ref->h < 8 || mov->w < 8 || mov->h < 8)
		return sf_fail(e, SF_EINVAL, "register: images %u x %u and %u x %u (need >= 8 px)",
		               ref->w, ref->h, mov->w, mov->h);
	return SF_OK;
}

/* Both pyramids to depth `depth` and the pool of o->threads. */
static int begin(const sf_reg_image *ref, const sf_reg_image *mov, unsigned depth,
                 const sf_reg_opts *o, reg_pyramid *rp, reg_pyramid *mp, reg_pool **pool, sf_err *e)
{
	int rc = reg_pyramid_to(ref, depth, rp, e);
	if (rc)
		return rc;
	rc = reg_pyramid_to(mov, depth, mp, e);
	if (!rc)
		rc = reg_pool_start(pool, o->threads, e);
	if (rc) {
		if (mp->n)
			reg_pyramid_free(mp);
		reg_pyramid_free(rp);
	}
	return rc;
}

static void end(reg_pyramid *rp, reg_pyramid *mp, reg_pool *pool)
{
	reg_pool_stop(pool);
	reg_pyramid_free(rp);
	reg_pyramid_free(mp);
}

/* Checks, then begin with pyramids deep enough for the search (level *l)
 * and for the refinements. */
static int prepare(const sf_reg_image *ref, const sf_reg_image *mov, const sf_reg_opts *o,
                   unsigned *l, reg_pyramid *rp, reg_pyramid *mp, reg_pool **pool, sf_err *e)
{
	int rc = check_opts(o, e);
	if (!rc)
		rc = check_images(ref, mov, e);
	if (rc)
		return rc;
	unsigned lc = reg_refine_coarsest(ref, o);
	*l = search_level(ref, mov, o->init_dim);
	return begin(ref, mov, *l > lc ? *l : lc, o, rp, mp, pool, e);
}

int sf_reg_init_similarity(const sf_reg_image *ref, const sf_reg_image *mov, const sf_reg_opts *o,
                           sf_reg_result *r, sf_err *e)
{
	reg_pyramid rp = {0}, mp = {0};
	reg_pool *pool = NULL;
	unsigned l;
	int rc = prepare(ref, mov, o, &l, &rp, &mp, &pool, e);
	if (rc)
		return rc;
	rc = init_on(&rp, &mp, l, o, pool, r, e);
	end(&rp, &mp, pool);
	return rc;
}

void sf_reg_describe(sf_reg_result *r)
{
	double a = r->m[0], b = r->m[1], c = r->m[3], d = r->m[4];
	double det = a * d - b * c;
	r->scale = sqrt(fabs(det));
	r->mirrored = det < 0;
	/* Take the mirror out on the source side: L = Rot * diag(-1, 1) ... so
	 * the rotation is that of L * diag(-1, 1) (first column negated). */
	if (r->mirrored) {
		a = -a;
		c = -c;
	}
	r->angle_deg = atan2(c - b, a + d) * 180 / M_PI;
}

int sf_reg_to_transform(const double m[9], const double ref_ds[2], const double mov_ds[2],
                        sf_transform *t, sf_err *e)
{
	if (!(ref_ds[0] > 0 && ref_ds[1] > 0 && mov_ds[0] > 0 && mov_ds[1] > 0))
		return sf_fail(e, SF_EINVAL, "register: downsample factors must be > 0");
	/* S(f) = [f 0 (f-1)/2; 0 f (f-1)/2; 0 0 1]; S^-1 its inverse. */
	double sm[9] = {mov_ds[0], 0, (mov_ds[0] - 1) / 2, 0, mov_ds[1], (mov_ds[1] - 1) / 2, 0,
	                0,         1};
	double sri[9] = {1 / ref_ds[0],
	                 0,
	                 -(ref_ds[0] - 1) / (2 * ref_ds[0]),
	                 0,
	                 1 / ref_ds[1],
	                 -(ref_ds[1] - 1) / (2 * ref_ds[1]),
	                 0,
	                 0,
	                 1};
	double tmp[9], t0[9];
	sf_mat3_mul(m, sri, tmp);
	sf_mat3_mul(sm, tmp, t0);
	sf_transform_init(t);
	return sf_transform_then_matrix(t, t0, e);
}

/* One set of pyramids (deep enough for the search, the candidates'
 * refinements and the final one) and one pool serve the whole call. */
int sf_reg_register(const sf_reg_image *ref, const uint8_t *ref_mask, const sf_reg_image *mov,
                    const sf_reg_opts *o, sf_reg_result *r, sf_err *e)
{
	reg_pyramid rp = {0}, mp = {0};
	reg_pool *pool = NULL;
	unsigned l;
	int rc = prepare(ref, mov, o, &l, &rp, &mp, &pool, e);
	if (rc)
		return rc;
	rc = init_on(&rp, &mp, l, o, pool, r, e);
	if (!rc) {
		reg_refine_pyramids pp;
		reg_refine_view(&rp, &mp, o, pool, &pp);
		rc = o->metric == SF_REG_METRIC_MI ? reg_refine_mi(&pp, ref_mask, o, r, e)
		                                   : reg_refine_ncc(&pp, ref_mask, o, r, e);
	}
	end(&rp, &mp, pool);
	return rc;
}

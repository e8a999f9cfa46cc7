/* register_prep.c — grey images for registration: allocation, channel
 * extraction, percentile stretch, optical density, Gaussian blur, Otsu
 * tissue mask; plus the private pyramid, NCC and mirror helpers of
 * register_math.h.
 *
 * Invariants: an sf_reg_image made here owns w * h floats (w, h >= 1, at
 * most 2^15 each, so w * h and its byte size fit in size_t and int64 maths);
 * every function leaves its output untouched (or freed) on failure. */
#include "scopefs/register.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "register_math.h"
#include "scopefs/select.h"

#define REG_MAX_SIDE (1u << 15)

int sf_reg_image_alloc(sf_reg_image *im, uint32_t w, uint32_t h, sf_err *e)
{
	if (w == 0 || h == 0 || w > REG_MAX_SIDE || h > REG_MAX_SIDE)
		return sf_fail(e, SF_EINVAL, "register: image size %u x %u out of range", w, h);
	float *px = calloc((size_t)w * h, sizeof *px);
	if (!px)
		return sf_fail(e, SF_ENOMEM, "register: %u x %u image", w, h);
	im->w = w;
	im->h = h;
	im->px = px;
	return SF_OK;
}

void sf_reg_image_free(sf_reg_image *im)
{
	free(im->px);
	im->px = NULL;
	im->w = im->h = 0;
}

int sf_reg_image_from_channel(const void *px, size_t stride, uint32_t w, uint32_t h, sf_dtype dtype,
                              uint32_t samples, uint32_t channel, sf_reg_image *im, sf_err *e)
{
	size_t bytes = sf_dtype_bytes(dtype);
	if (!bytes || samples == 0 || channel >= samples)
		return sf_fail(e, SF_EINVAL, "register: channel %u of %u samples, dtype %d",
		               channel, samples, (int)dtype);
	int rc = sf_reg_image_alloc(im, w, h, e);
	if (rc)
		return rc;
	for (uint32_t y = 0; y < h; y++) {
		const uint8_t *row = (const uint8_t *)px + y * stride;
		float *out = im->px + (size_t)y * w;
		for (uint32_t x = 0; x < w; x++) {
			const uint8_t *s = row + ((size_t)x * samples + channel) * bytes;
			if (dtype == SF_U8)
				out[x] = s[0];
			else if (dtype == SF_U16) {
				uint16_t v;
				memcpy(&v, s, 2);
				out[x] = v;
			} else {
				/* NaN and inf (masked or failed pixels, as pipelines
				 * write them) are no signal: 0, so that the percentiles,
				 * the tissue mask and the metrics see finite values. */
				memcpy(&out[x], s, 4);
				if (!isfinite(out[x]))
					out[x] = 0;
			}
		}
	}
	return SF_OK;
}

int sf_reg_normalise(sf_reg_image *im, double lo_pct, double hi_pct, sf_err *e)
{
	if (!(lo_pct >= 0 && lo_pct < hi_pct && hi_pct <= 100))
		return sf_fail(e, SF_EINVAL,
		               "register: percentiles %g, %g (need 0 <= lo < hi <= 100)", lo_pct,
		               hi_pct);
	size_t n = (size_t)im->w * im->h;
	float *copy = malloc(n * sizeof *copy);
	if (!copy)
		return sf_fail(e, SF_ENOMEM, "register: percentile buffer of %zu floats", n);
	memcpy(copy, im->px, n * sizeof *copy);
	float lo = sf_select_kth(copy, n, (size_t)floor(lo_pct / 100.0 * (double)(n - 1) + 0.5));
	float hi = sf_select_kth(copy, n, (size_t)floor(hi_pct / 100.0 * (double)(n - 1) + 0.5));
	free(copy);
	float scale = hi > lo ? 1.0f / (hi - lo) : 0.0f;
	for (size_t i = 0; i < n; i++) {
		float v = (im->px[i] - lo) * scale;
		im->px[i] = !(v > 0) ? 0 : v > 1 ? 1 : v; /* NaN: 0 */
	}
	return SF_OK;
}

/* Ruifrok & Johnston (2001) H&E-DAB stain OD vectors (rows, unit length)
 * and the hematoxylin row of their inverse, worked out here once so the
 * numbers stay traceable. */
static const double stain_h[3] = {0.650, 0.704, 0.286};
static const double stain_e[3] = {0.072, 0.990, 0.105};
static const double stain_d[3] = {0.268, 0.570, 0.776};

static void hematoxylin_row(double out[3])
{
	const double *a = stain_h, *b = stain_e, *c = stain_d;
	double n[3][3];
	for (int i = 0; i < 3; i++) {
		n[0][i] = a[i];
		n[1][i] = b[i];
		n[2][i] = c[i];
	}
	for (int r = 0; r < 3; r++) {
		double l = sqrt(n[r][0] * n[r][0] + n[r][1] * n[r][1] + n[r][2] * n[r][2]);
		for (int i = 0; i < 3; i++)
			n[r][i] /= l;
	}
	/* OD = amounts * n, so amounts = OD * n^-1; the hematoxylin amount is OD
	 * dotted with column 0 of n^-1 = (row1 x row2) / det. */
	double cx = n[1][1] * n[2][2] - n[1][2] * n[2][1];
	double cy = n[1][2] * n[2][0] - n[1][0] * n[2][2];
	double cz = n[1][0] * n[2][1] - n[1][1] * n[2][0];
	double det = n[0][0] * cx + n[0][1] * cy + n[0][2] * cz;
	out[0] = cx / det;
	out[1] = cy / det;
	out[2] = cz / det;
}

int sf_reg_od_grey(const uint8_t *rgb, size_t stride, uint32_t w, uint32_t h, uint32_t samples,
                   sf_reg_od_mode mode, sf_reg_image *im, sf_err *e)
{
	if (samples < 3)
		return sf_fail(e, SF_EINVAL, "register: optical density needs RGB, got %u samples",
		               samples);
	if (mode != SF_REG_OD_TOTAL && mode != SF_REG_OD_HEMATOXYLIN)
		return sf_fail(e, SF_EINVAL, "register: optical density mode %d", (int)mode);
	float od_of[256];
	for (int i = 0; i < 256; i++)
		od_of[i] = (float)-log10((i + 1) / 256.0);
	double hrow[3] = {1 / 3.0, 1 / 3.0, 1 / 3.0};
	if (mode == SF_REG_OD_HEMATOXYLIN)
		hematoxylin_row(hrow);
	int rc = sf_reg_image_alloc(im, w, h, e);
	if (rc)
		return rc;
	for (uint32_t y = 0; y < h; y++) {
		const uint8_t *row = rgb + y * stride;
		float *out = im->px + (size_t)y * w;
		for (uint32_t x = 0; x < w; x++) {
			const uint8_t *p = row + (size_t)x * samples;
			double v =
			    hrow[0] * od_of[p[0]] + hrow[1] * od_of[p[1]] + hrow[2] * od_of[p[2]];
			out[x] = v > 0 ? (float)v : 0.0f;
		}
	}
	return SF_OK;
}

/* One output of the blur along a line of n samples, taps -r .. r in that
 * order, the edge samples repeated. */
static float gauss_clamped(const float *s, long n, long i, const float *k, int r)
{
	float acc = 0;
	for (int t = -r; t <= r; t++)
		acc += k[t + r] * s[i + t < 0 ? 0 : i + t >= n ? n - 1 : i + t];
	return acc;
}

/* The blur along rows; inside [lo, hi) no tap needs the clamps. */
static void gauss_rows(const float *src, float *dst, uint32_t w, uint32_t h, const float *k, int r)
{
	long n = w, lo = r < n ? r : n, hi = n - r > lo ? n - r : lo;
	for (uint32_t y = 0; y < h; y++) {
		const float *s = src + (size_t)y * w;
		float *d = dst + (size_t)y * w;
		for (long i = 0; i < lo; i++)
			d[i] = gauss_clamped(s, n, i, k, r);
		for (long i = hi; i < n; i++)
			d[i] = gauss_clamped(s, n, i, k, r);
		for (long i = lo; i < hi; i++) {
			float acc = 0;
			for (int t = -r; t <= r; t++)
				acc += k[t + r] * s[i + t];
			d[i] = acc;
		}
	}
}

/* The blur along columns, one output row at a time so the inner loop runs
 * along x over whole rows (vectorises); each pixel adds its taps in the
 * same order as gauss_rows. */
static void gauss_cols(const float *src, float *dst, uint32_t w, uint32_t h, const float *k, int r)
{
	for (long y = 0; y < (long)h; y++) {
		float *restrict d = dst + (size_t)y * w;
		for (uint32_t x = 0; x < w; x++)
			d[x] = 0;
		for (int t = -r; t <= r; t++) {
			long j = y + t;
			j = j < 0 ? 0 : j >= (long)h ? (long)h - 1 : j;
			const float *restrict s = src + (size_t)j * w;
			float kt = k[t + r];
			for (uint32_t x = 0; x < w; x++)
				d[x] += kt * s[x];
		}
	}
}

int sf_reg_gauss(sf_reg_image *im, double sigma, sf_err *e)
{
	if (!(sigma > 0))
		return SF_OK;
	int r = (int)ceil(3 * sigma);
	if (r > 1000)
		return sf_fail(e, SF_EINVAL, "register: blur sigma %g too large", sigma);
	size_t n = (size_t)im->w * im->h;
	float *k = malloc((size_t)(2 * r + 1) * sizeof *k), *tmp = malloc(n * sizeof *tmp);
	if (!k || !tmp) {
		free(k);
		free(tmp);
		return sf_fail(e, SF_ENOMEM, "register: blur scratch");
	}
	double sum = 0;
	for (int t = -r; t <= r; t++)
		sum += k[t + r] = (float)exp(-0.5 * t * t / (sigma * sigma));
	for (int t = 0; t <= 2 * r; t++)
		k[t] = (float)(k[t] / sum);
	gauss_rows(im->px, tmp, im->w, im->h, k, r);
	gauss_cols(tmp, im->px, im->w, im->h, k, r);
	free(k);
	free(tmp);
	return SF_OK;
}

int sf_reg_tissue_mask(const sf_reg_image *im, double sigma, uint8_t *mask, double *threshold,
                       sf_err *e)
{
	size_t n = (size_t)im->w * im->h;
	sf_reg_image s;
	int rc = sf_reg_image_alloc(&s, im->w, im->h, e);
	if (rc)
		return rc;
	memcpy(s.px, im->px, n * sizeof *s.px);
	rc = sf_reg_gauss(&s, sigma, e);
	if (rc) {
		sf_reg_image_free(&s);
		return rc;
	}
	float lo = s.px[0], hi = s.px[0];
	for (size_t i = 1; i < n; i++) {
		lo = s.px[i] < lo ? s.px[i] : lo;
		hi = s.px[i] > hi ? s.px[i] : hi;
	}
	double hist[256] = {0};
	double binw = hi > lo ? (hi - lo) / 256.0 : 1.0;
	for (size_t i = 0; i < n; i++) {
		double f = (s.px[i] - lo) / binw;
		hist[!(f > 0)   ? 0
		     : f >= 255 ? 255
		                : (int)f]++; /* NaN in bin 0, never out of range */
	}
	/* Otsu: the split maximising the between-class variance. */
	double total = 0;
	for (int b = 0; b < 256; b++)
		total += b * hist[b];
	double w0 = 0, sum0 = 0, best = -1;
	int split = 0;
	for (int b = 0; b < 255; b++) {
		w0 += hist[b];
		sum0 += b * hist[b];
		double w1 = (double)n - w0;
		if (w0 == 0 || w1 == 0)
			continue;
		double m0 = sum0 / w0, m1 = (total - sum0) / w1;
		double between = w0 * w1 * (m0 - m1) * (m0 - m1);
		if (between > best) {
			best = between;
			split = b;
		}
	}
	double t = lo + (split + 1) * binw;
	for (size_t i = 0; i < n; i++)
		mask[i] = s.px[i] >= t && hi > lo;
	if (threshold)
		*threshold = t;
	sf_reg_image_free(&s);
	return SF_OK;
}

/* --- private helpers (register_math.h) ------------------------------------ */

static int halve(const sf_reg_image *src, sf_reg_image *dst, sf_err *e)
{
	uint32_t w = (src->w + 1) / 2, h = (src->h + 1) / 2;
	int rc = sf_reg_image_alloc(dst, w, h, e);
	if (rc)
		return rc;
	for (uint32_t y = 0; y < h; y++) {
		uint32_t y0 = 2 * y, y1 = y0 + 1 < src->h ? y0 + 1 : y0;
		const float *r0 = src->px + (size_t)y0 * src->w,
		            *r1 = src->px + (size_t)y1 * src->w;
		for (uint32_t x = 0; x < w; x++) {
			uint32_t x0 = 2 * x;
			if (x0 + 1 < src->w) {
				float a = r0[x0] + r0[x0 + 1], b = r1[x0] + r1[x0 + 1];
				dst->px[(size_t)y * w + x] = (y1 != y0 ? a + b : a + a) * 0.25f;
			} else {
				dst->px[(size_t)y * w + x] = (r0[x0] + r1[x0]) * 0.5f;
			}
		}
	}
	return SF_OK;
}

int reg_pyramid_build(const sf_reg_image *im, uint32_t min_dim, reg_pyramid *p, sf_err *e)
{
	memset(p, 0, sizeof *p);
	p->lv[0] = *im;
	p->n = 1;
	while (p->n < REG_MAX_LEVELS) {
		const sf_reg_image *top = &p->lv[p->n - 1];
		uint32_t longest = top->w > top->h ? top->w : top->h;
		if (longest <= min_dim || top->w < 4 || top->h < 4)
			break;
		int rc = halve(top, &p->lv[p->n], e);
		if (rc) {
			reg_pyramid_free(p);
			return rc;
		}
		p->n++;
	}
	return SF_OK;
}

int reg_pyramid_to(const sf_reg_image *im, unsigned l, reg_pyramid *p, sf_err *e)
{
	/* Halving with rounding up l times gives ceil(longest / 2^l). */
	uint32_t longest = im->w > im->h ? im->w : im->h;
	return reg_pyramid_build(im, (uint32_t)(((uint64_t)longest + (1ull << l) - 1) >> l), p, e);
}

void reg_pyramid_free(reg_pyramid *p)
{
	for (unsigned l = 1; l < p->n; l++)
		sf_reg_image_free(&p->lv[l]);
	p->n = 0;
}

/* S(f) as a matrix: x -> f x + (f - 1) / 2. */
static void scale_matrix(double f, double out[9])
{
	double c = (f - 1) / 2;
	double s[9] = {f, 0, c, 0, f, c, 0, 0, 1};
	memcpy(out, s, sizeof s);
}

void reg_map_to_level(const double m[9], unsigned l, double out[9])
{
	double f = ldexp(1.0, (int)l), s[9], si[9], t[9];
	scale_matrix(f, s);
	scale_matrix(1 / f, si);
	sf_mat3_mul(m, s, t);
	sf_mat3_mul(si, t, out);
}

void reg_map_from_level(const double ml[9], unsigned l, double out[9])
{
	double f = ldexp(1.0, (int)l), s[9], si[9], t[9];
	scale_matrix(f, s);
	scale_matrix(1 / f, si);
	sf_mat3_mul(ml, si, t);
	sf_mat3_mul(s, t, out);
}

double reg_ncc(const sf_reg_image *ref, const uint8_t *mask, const sf_reg_image *mov,
               const double m[9], int inside_only, double *frac)
{
	double sa = 0, sb = 0, saa = 0, sbb = 0, sab = 0;
	size_t n = 0, considered = 0;
	double xmax = mov->w - 1.0, ymax = mov->h - 1.0;
	for (uint32_t y = 0; y < ref->h; y++) {
		for (uint32_t x = 0; x < ref->w; x++) {
			size_t i = (size_t)y * ref->w + x;
			if (mask && !mask[i])
				continue;
			considered++;
			double sx = m[0] * x + m[1] * y + m[2], sy = m[3] * x + m[4] * y + m[5];
			if (inside_only && (sx < 0 || sy < 0 || sx > xmax || sy > ymax))
				continue;
			double a = ref->px[i], b = reg_sample_zero(mov, sx, sy);
			sa += a;
			sb += b;
			saa += a * a;
			sbb += b * b;
			sab += a * b;
			n++;
		}
	}
	if (frac)
		*frac = considered ? (double)n / (double)considered : 0;
	if (n < 2)
		return 0;
	double va = saa - sa * sa / n, vb = sbb - sb * sb / n, cab = sab - sa * sb / n;
	if (va <= 1e-12 * n || vb <= 1e-12 * n)
		return 0;
	return cab / sqrt(va * vb);
}

int reg_mirror_x(const sf_reg_image *src, sf_reg_image *out, sf_err *e)
{
	int rc = sf_reg_image_alloc(out, src->w, src->h, e);
	if (rc)
		return rc;
	for (uint32_t y = 0; y < src->h; y++) {
		const float *s = src->px + (size_t)y * src->w;
		float *d = out->px + (size_t)y * src->w;
		for (uint32_t x = 0; x < src->w; x++)
			d[x] = s[src->w - 1 - x];
	}
	return SF_OK;
}

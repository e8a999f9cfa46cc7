/* transform_export.c — write transforms as our JSON + field TIFF, and as
 * elastix TransformParameters + a MetaImage displacement field.
 *
 * The supported map (transform_export.h) is, in level-0 pixels,
 *     src = M (p + V F(G p))          F bilinear, clamped to the edge nodes
 * and in physical units (x = Pr p, y = Pm src, Pr/Pm the pixel sizes):
 *     y = A (x + d(x)),  A = Pm M Pr^-1,  d(x) = Pr V F(G Pr^-1 x),
 * which elastix writes as an AffineTransform A composed after a
 * DeformationFieldTransform x + d(x) (T(x) = T_main(T_initial(x))).  The
 * field image has node i at x = Pr Glin^-1 (i - g), ITK's geometry
 * origin + Direction * Spacing * i, and holds Pr V v at each node (bilinear
 * interpolation commutes with a linear map of the values).
 *
 * Output is built in growable buffers; every failure frees what was made. */
#include "scopefs/transform_export.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Padded field images above this many nodes (512 MiB of raw) are refused. */
#define MAX_EXPORT_NODES ((size_t)1 << 26)

/* --- a growable text buffer ---------------------------------------------- */

typedef struct tbuf {
	char *s;    /* NUL-terminated text */
	size_t n;   /* bytes used, without the NUL */
	size_t cap; /* bytes allocated */
	int oom;    /* an append failed: the text is incomplete */
} tbuf;

static void tb_printf(tbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void tb_printf(tbuf *b, const char *fmt, ...)
{
	if (b->oom)
		return;
	for (;;) {
		va_list ap;
		va_start(ap, fmt);
		int k = vsnprintf(b->s ? b->s + b->n : NULL, b->s ? b->cap - b->n : 0, fmt, ap);
		va_end(ap);
		if (k < 0) {
			b->oom = 1;
			return;
		}
		if (b->s && (size_t)k < b->cap - b->n) {
			b->n += (size_t)k;
			return;
		}
		size_t cap = (b->cap ? 2 * b->cap : 1024) + (size_t)k;
		char *s = realloc(b->s, cap);
		if (!s) {
			b->oom = 1;
			return;
		}
		b->s = s;
		b->cap = cap;
	}
}

/* Hand b's text to the caller, or fail with SF_ENOMEM. */
static int tb_finish(tbuf *b, const char *what, char **out, size_t *len, sf_err *e)
{
	if (b->oom || !b->s) {
		free(b->s);
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", what);
	}
	*out = b->s;
	*len = b->n;
	return SF_OK;
}

/* --- little-endian bytes ------------------------------------------------- */

static void put16(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}

static void put32(uint8_t *p, uint32_t v)
{
	put16(p, v & 0xffff);
	put16(p + 2, v >> 16);
}

static void put_float(uint8_t *p, float f)
{
	uint32_t u;
	memcpy(&u, &f, sizeof u);
	put32(p, u);
}

/* v with -0 made +0, so files do not show "-0" */
static double nz(double v)
{
	return v + 0.0;
}

/* --- what can be exported ------------------------------------------------ */

static int is_affine(const double m[9])
{
	return m[6] == 0 && m[7] == 0 && m[8] == 1;
}

/* SF_OK when t has at most one bilinear field; need_affine also asks for an
 * affine final matrix. */
static int check_supported(const sf_transform *t, int need_affine, const char *what, sf_err *e)
{
	const sf_map *m = &t->map;
	if (m->nfields > 1)
		return sf_fail(e, SF_EUNSUPPORTED, "%s: a transform with %u displacement fields",
		               what, m->nfields);
	if (m->nfields == 1 && m->field[0].kind != SF_FIELD_LINEAR)
		return sf_fail(e, SF_EUNSUPPORTED, "%s: a B-spline displacement field", what);
	if (need_affine && !is_affine(m->m))
		return sf_fail(e, SF_EUNSUPPORTED, "%s: a projective matrix", what);
	return SF_OK;
}

/* The 2x2 inverse of [a b; c d] into inv; SF_EINVAL when singular. */
static int inverse2(const double a[4], double inv[4])
{
	double det = a[0] * a[3] - a[1] * a[2];
	if (!isfinite(det) || det == 0)
		return SF_EINVAL;
	inv[0] = a[3] / det;
	inv[1] = -a[1] / det;
	inv[2] = -a[2] / det;
	inv[3] = a[0] / det;
	return SF_OK;
}

/* --- our JSON ------------------------------------------------------------ */

/* s as a JSON string literal. */
static void json_quoted(tbuf *b, const char *s)
{
	tb_printf(b, "\"");
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (*p == '"' || *p == '\\')
			tb_printf(b, "\\%c", *p);
		else if (*p < 0x20)
			tb_printf(b, "\\u%04x", *p);
		else
			tb_printf(b, "%c", *p);
	}
	tb_printf(b, "\"");
}

/* Whether V is diag(s) to the last bits: the values then stay in field
 * units and are written unchanged. */
static int same_scale(const double vm[4], const double s[2])
{
	return vm[1] == 0 && vm[2] == 0 && fabs(vm[0] - s[0]) <= 1e-12 * s[0] &&
	       fabs(vm[3] - s[1]) <= 1e-12 * s[1];
}

/* The "field" object of f: an axis-aligned grid u = (X - offset) / scale. */
static int json_field(tbuf *b, const sf_field_step *f, const char *field_file, sf_err *e)
{
	if (f->g[1] != 0 || f->g[3] != 0 || !(f->g[0] > 0) || !(f->g[4] > 0))
		return sf_fail(e, SF_EUNSUPPORTED,
		               "JSON export: the field grid is rotated, sheared or flipped against "
		               "the pixel axes (use the elastix export)");
	if (!field_file)
		return sf_fail(e, SF_EINVAL, "JSON export: the transform has a field but no file");
	double s[2] = {1 / f->g[0], 1 / f->g[4]};
	double o[2] = {-f->g[2] * s[0], -f->g[5] * s[1]};
	/* otherwise the TIFF holds V v, in level-0 pixels (json_node_value) */
	int units_field = same_scale(f->vm, s);
	tb_printf(b, ",\n  \"field\": {\"file\": ");
	json_quoted(b, field_file);
	tb_printf(b, ", \"scale\": [%.17g, %.17g], \"offset\": [%.17g, %.17g], \"units\": \"%s\"}",
	          s[0], s[1], nz(o[0]), nz(o[1]), units_field ? "field" : "pixels");
	return SF_OK;
}

int sf_transform_export_json(const sf_transform *t, const char *field_file, char **out, size_t *len,
                             sf_err *e)
{
	*out = NULL;
	*len = 0;
	int rc = check_supported(t, 0, "JSON export", e);
	if (rc != SF_OK)
		return rc;
	const double *m = t->map.m;
	tbuf b = {0};
	tb_printf(&b, "{\n  \"scopefs_transform\": 1,\n  \"matrix\": [");
	for (int r = 0; r < 3; r++)
		tb_printf(&b, "%s[%.17g, %.17g, %.17g]", r ? ",\n             " : "", nz(m[3 * r]),
		          nz(m[3 * r + 1]), nz(m[3 * r + 2]));
	tb_printf(&b, "]");
	if (t->map.nfields)
		rc = json_field(&b, &t->map.field[0], field_file, e);
	tb_printf(&b, "\n}\n");
	if (rc != SF_OK) {
		free(b.s);
		return rc;
	}
	return tb_finish(&b, "JSON export", out, len, e);
}

/* --- the field TIFF ------------------------------------------------------ */

/* The values our JSON stores for f: v itself when V = diag(scale) (units
 * "field"), else V v (units "pixels"); json_field makes the same choice. */
static void json_node_value(const sf_field_step *f, size_t i, float out[2])
{
	double s[2] = {1 / f->g[0], 1 / f->g[4]};
	const float *v = f->v + 2 * i;
	if (same_scale(f->vm, s)) {
		out[0] = v[0];
		out[1] = v[1];
	} else {
		out[0] = (float)(f->vm[0] * v[0] + f->vm[1] * v[1]);
		out[1] = (float)(f->vm[2] * v[0] + f->vm[3] * v[1]);
	}
}

enum { TIFF_SHORT = 3, TIFF_LONG = 4 };

/* One 12-byte IFD entry with its value inline (count * size <= 4). */
static uint8_t *tiff_entry(uint8_t *p, uint16_t tag, uint16_t type, uint32_t count, uint32_t v0,
                           uint32_t v1)
{
	put16(p, tag);
	put16(p + 2, type);
	put32(p + 4, count);
	put32(p + 8, 0);
	if (type == TIFF_SHORT) {
		put16(p + 8, v0);
		if (count > 1)
			put16(p + 10, v1);
	} else {
		put32(p + 8, v0);
	}
	return p + 12;
}

/* Where the pixel data starts: header 8 + IFD 2 + 12 tags * 12 + 4 = 158,
 * rounded up. */
#define TIFF_TAGS    12
#define TIFF_DATA_AT 160

/* The header and the one IFD of a w x h 2-sample float32 image whose data
 * (bytes long, one strip) follows at TIFF_DATA_AT. */
static void tiff_header(uint8_t *buf, uint32_t w, uint32_t h, uint32_t bytes)
{
	buf[0] = buf[1] = 'I';
	put16(buf + 2, 42);
	put32(buf + 4, 8);
	put16(buf + 8, TIFF_TAGS);
	uint8_t *p = buf + 10;                      /* tags in ascending order, as TIFF requires */
	p = tiff_entry(p, 256, TIFF_LONG, 1, w, 0); /* ImageWidth */
	p = tiff_entry(p, 257, TIFF_LONG, 1, h, 0); /* ImageLength */
	p = tiff_entry(p, 258, TIFF_SHORT, 2, 32, 32);         /* BitsPerSample */
	p = tiff_entry(p, 259, TIFF_SHORT, 1, 1, 0);           /* Compression: none */
	p = tiff_entry(p, 262, TIFF_SHORT, 1, 1, 0);           /* Photometric: min-is-black */
	p = tiff_entry(p, 273, TIFF_LONG, 1, TIFF_DATA_AT, 0); /* StripOffsets */
	p = tiff_entry(p, 277, TIFF_SHORT, 1, 2, 0);           /* SamplesPerPixel */
	p = tiff_entry(p, 278, TIFF_LONG, 1, h, 0);            /* RowsPerStrip: one strip */
	p = tiff_entry(p, 279, TIFF_LONG, 1, bytes, 0);        /* StripByteCounts */
	p = tiff_entry(p, 284, TIFF_SHORT, 1, 1, 0);           /* PlanarConfig: contig */
	p = tiff_entry(p, 338, TIFF_SHORT, 1, 0, 0);           /* ExtraSamples: unspecified */
	p = tiff_entry(p, 339, TIFF_SHORT, 2, 3, 3);           /* SampleFormat: IEEE float */
	put32(p, 0);                                           /* no next IFD */
}

int sf_transform_export_field_tiff(const sf_transform *t, uint8_t **out, size_t *len, sf_err *e)
{
	*out = NULL;
	*len = 0;
	int rc = check_supported(t, 0, "field TIFF export", e);
	if (rc != SF_OK)
		return rc;
	if (t->map.nfields == 0)
		return sf_fail(e, SF_ENOTFOUND, "field TIFF export: the transform has no field");
	const sf_field_step *f = &t->map.field[0];
	size_t nodes = (size_t)f->w * f->h, bytes = nodes * 8;
	if (bytes > UINT32_MAX - TIFF_DATA_AT)
		return sf_fail(e, SF_ERANGE, "field TIFF export: %ux%u nodes exceed a classic TIFF",
		               f->w, f->h);
	uint8_t *buf = calloc(1, TIFF_DATA_AT + bytes);
	if (!buf)
		return sf_fail(e, SF_ENOMEM, "field TIFF export: out of memory");
	tiff_header(buf, f->w, f->h, (uint32_t)bytes);
	for (size_t i = 0; i < nodes; i++) {
		float v[2];
		json_node_value(f, i, v);
		put_float(buf + TIFF_DATA_AT + 8 * i, v[0]);
		put_float(buf + TIFF_DATA_AT + 8 * i + 4, v[1]);
	}
	*out = buf;
	*len = TIFF_DATA_AT + bytes;
	return SF_OK;
}

/* --- elastix ------------------------------------------------------------- */

/* The physical pixel sizes: ref_px, or 1 when unknown; mov_px, or the
 * reference's when unknown (the readers' rule). */
static void physical_sizes(const sf_tf_units *u, double pr[2], double pm[2])
{
	for (int k = 0; k < 2; k++) {
		pr[k] = u && u->ref_px[0] > 0 && u->ref_px[1] > 0 ? u->ref_px[k] : 1;
		pm[k] = u && u->mov_px[0] > 0 && u->mov_px[1] > 0 ? u->mov_px[k] : pr[k];
	}
}

/* Whether s can stand inside an elastix "quoted value". */
static int elastix_safe(const char *s)
{
	return s && s[0] && !strpbrk(s, "\"\n\r");
}

/* The fixed-image lines and settings every file of ours carries. */
static void elastix_common(tbuf *b, const double pr[2], const uint32_t ref_size[2])
{
	tb_printf(b,
	          "(HowToCombineTransforms \"Compose\")\n"
	          "(FixedImageDimension 2)\n(MovingImageDimension 2)\n"
	          "(FixedInternalImagePixelType \"float\")\n"
	          "(MovingInternalImagePixelType \"float\")\n"
	          "(Size %u %u)\n(Index 0 0)\n(Spacing %.17g %.17g)\n(Origin 0 0)\n"
	          "(Direction 1 0 0 1)\n(UseDirectionCosines \"true\")\n"
	          "(ResampleInterpolator \"FinalBSplineInterpolator\")\n"
	          "(FinalBSplineInterpolationOrder 1)\n(Resampler \"DefaultResampler\")\n"
	          "(DefaultPixelValue 0)\n(ResultImageFormat \"mhd\")\n"
	          "(ResultImagePixelType \"float\")\n(CompressResultImage \"false\")\n",
	          ref_size[0], ref_size[1], pr[0], pr[1]);
}

/* The main file: A = Pm M Pr^-1 as an AffineTransform about (0, 0). */
static int elastix_main(const sf_transform *t, const double pr[2], const double pm[2],
                        const uint32_t ref_size[2], const char *initial, char **out, size_t *len,
                        sf_err *e)
{
	const double *m = t->map.m;
	double a[6];
	for (int r = 0; r < 2; r++) {
		a[3 * r + 0] = pm[r] * m[3 * r + 0] / pr[0];
		a[3 * r + 1] = pm[r] * m[3 * r + 1] / pr[1];
		a[3 * r + 2] = pm[r] * m[3 * r + 2];
	}
	tbuf b = {0};
	tb_printf(&b,
	          "// scopefs: reference -> moving, physical units (elastix's fixed -> moving)\n"
	          "(Transform \"AffineTransform\")\n(NumberOfParameters 6)\n"
	          "(TransformParameters %.17g %.17g %.17g %.17g %.17g %.17g)\n"
	          "(CenterOfRotationPoint 0 0)\n(InitialTransformParametersFileName \"%s\")\n",
	          nz(a[0]), nz(a[1]), nz(a[3]), nz(a[4]), nz(a[2]), nz(a[5]), initial);
	elastix_common(&b, pr, ref_size);
	return tb_finish(&b, "elastix export", out, len, e);
}

static int elastix_field(const double pr[2], const uint32_t ref_size[2], const char *image,
                         char **out, size_t *len, sf_err *e)
{
	tbuf b = {0};
	tb_printf(&b,
	          "// scopefs: the displacement field, applied before the main file's affine\n"
	          "(Transform \"DeformationFieldTransform\")\n(NumberOfParameters 0)\n"
	          "(InitialTransformParametersFileName \"NoInitialTransform\")\n"
	          "(DeformationFieldFileName \"%s\")\n(DeformationFieldInterpolationOrder 1)\n",
	          image);
	elastix_common(&b, pr, ref_size);
	return tb_finish(&b, "elastix export", out, len, e);
}

int sf_transform_export_elastix(const sf_transform *t, const sf_tf_units *units,
                                const uint32_t ref_size[2], const char *initial_path,
                                const char *field_image_path, char **main_txt, size_t *main_len,
                                char **field_txt, size_t *field_len, sf_err *e)
{
	*main_txt = *field_txt = NULL;
	*main_len = *field_len = 0;
	if (!ref_size)
		return sf_fail(e, SF_EINVAL, "elastix export: no reference size");
	int rc = check_supported(t, 1, "elastix export", e);
	if (rc != SF_OK)
		return rc;
	int has_field = t->map.nfields == 1;
	if (has_field && (!elastix_safe(initial_path) || !elastix_safe(field_image_path)))
		return sf_fail(e, SF_EINVAL,
		               "elastix export: the initial and field image paths must be "
		               "non-empty and free of quotes and line breaks");
	double pr[2], pm[2];
	physical_sizes(units, pr, pm);
	rc = elastix_main(t, pr, pm, ref_size, has_field ? initial_path : "NoInitialTransform",
	                  main_txt, main_len, e);
	if (rc == SF_OK && has_field)
		rc = elastix_field(pr, ref_size, field_image_path, field_txt, field_len, e);
	if (rc != SF_OK) {
		free(*main_txt);
		*main_txt = NULL;
		*main_len = 0;
	}
	return rc;
}

/* --- the MetaImage displacement field ------------------------------------ */

/* The field image's geometry: nodes (w, h) with pad (lo) nodes before t's
 * node 0, and physical x = origin + dir * diag(spacing) * i. */
typedef struct field_image {
	uint32_t w, h;     /* padded size */
	uint32_t lo[2];    /* padding before node 0, per axis */
	double dir[4];     /* direction, row-major, unit columns */
	double spacing[2]; /* node spacing (physical) */
	double origin[2];  /* physical point of node 0 of the padded grid */
} field_image;

/* Nodes to add before (lo) and after (hi) a grid of n nodes so that grid
 * indices lo_i .. hi_i, and one node more, fall inside it. */
static int pad_axis(double lo_i, double hi_i, uint32_t n, uint32_t *lo, uint32_t *hi)
{
	double a = fmax(0, ceil(-lo_i)) + 1, b = fmax(0, ceil(hi_i - (n - 1.0))) + 1;
	if (!(a + b + n <= (1u << 20)))
		return SF_EUNSUPPORTED;
	*lo = (uint32_t)a;
	*hi = (uint32_t)b;
	return SF_OK;
}

static int field_geometry(const sf_field_step *f, const double pr[2], const uint32_t ref_size[2],
                          field_image *im, sf_err *e)
{
	const double *g = f->g;
	double glin[4] = {g[0], g[1], g[3], g[4]}, gi[4];
	if (inverse2(glin, gi) != SF_OK)
		return sf_fail(e, SF_EUNSUPPORTED, "field export: the field grid map is singular");
	/* grid index range over the reference's corners (pixel edges) */
	double lo_i[2] = {INFINITY, INFINITY}, hi_i[2] = {-INFINITY, -INFINITY};
	for (int c = 0; c < 4; c++) {
		double px = (c & 1) ? ref_size[0] - 0.5 : -0.5,
		       py = (c & 2) ? ref_size[1] - 0.5 : -0.5;
		for (int k = 0; k < 2; k++) {
			double i = g[3 * k] * px + g[3 * k + 1] * py + g[3 * k + 2];
			lo_i[k] = fmin(lo_i[k], i);
			hi_i[k] = fmax(hi_i[k], i);
		}
	}
	uint32_t hi[2];
	if (pad_axis(lo_i[0], hi_i[0], f->w, &im->lo[0], &hi[0]) != SF_OK ||
	    pad_axis(lo_i[1], hi_i[1], f->h, &im->lo[1], &hi[1]) != SF_OK)
		return sf_fail(e, SF_EUNSUPPORTED,
		               "field export: the field grid is too small for the %ux%u reference",
		               ref_size[0], ref_size[1]);
	im->w = f->w + im->lo[0] + hi[0];
	im->h = f->h + im->lo[1] + hi[1];
	if ((size_t)im->w * im->h > MAX_EXPORT_NODES)
		return sf_fail(e, SF_EUNSUPPORTED, "field export: a %ux%u field image is too big",
		               im->w, im->h);
	/* B = Pr Glin^-1 = dir * diag(spacing); x = B (i' - lo - (g2, g5)) */
	double bm[4] = {pr[0] * gi[0], pr[0] * gi[1], pr[1] * gi[2], pr[1] * gi[3]};
	for (int j = 0; j < 2; j++) {
		im->spacing[j] = hypot(bm[j], bm[2 + j]);
		im->dir[j] = bm[j] / im->spacing[j];
		im->dir[2 + j] = bm[2 + j] / im->spacing[j];
	}
	double i0[2] = {-(double)im->lo[0] - g[2], -(double)im->lo[1] - g[5]};
	im->origin[0] = bm[0] * i0[0] + bm[1] * i0[1];
	im->origin[1] = bm[2] * i0[0] + bm[3] * i0[1];
	return SF_OK;
}

static int mhd_header(const field_image *im, const char *raw_name, char **out, size_t *len,
                      sf_err *e)
{
	tbuf b = {0};
	/* MetaImage lists the direction column by column, as elastix does */
	tb_printf(&b,
	          "ObjectType = Image\nNDims = 2\nBinaryData = True\n"
	          "BinaryDataByteOrderMSB = False\nCompressedData = False\n"
	          "TransformMatrix = %.17g %.17g %.17g %.17g\nOffset = %.17g %.17g\n"
	          "CenterOfRotation = 0 0\nElementSpacing = %.17g %.17g\nDimSize = %u %u\n"
	          "ElementNumberOfChannels = 2\nElementType = MET_FLOAT\nElementDataFile = %s\n",
	          nz(im->dir[0]), nz(im->dir[2]), nz(im->dir[1]), nz(im->dir[3]), nz(im->origin[0]),
	          nz(im->origin[1]), im->spacing[0], im->spacing[1], im->w, im->h, raw_name);
	return tb_finish(&b, "field export", out, len, e);
}

/* The padded grid's values, d = Pr V v (physical), little-endian float32. */
static int mhd_raw(const sf_field_step *f, const double pr[2], const field_image *im, uint8_t **out,
                   size_t *len, sf_err *e)
{
	size_t bytes = (size_t)im->w * im->h * 8;
	uint8_t *buf = malloc(bytes);
	if (!buf)
		return sf_fail(e, SF_ENOMEM, "field export: out of memory for %ux%u nodes", im->w,
		               im->h);
	const double *vm = f->vm;
	for (uint32_t y = 0; y < im->h; y++) {
		/* a padded node copies the nearest node of t's grid */
		int64_t sy = (int64_t)y - im->lo[1];
		sy = sy < 0 ? 0 : (sy >= f->h ? f->h - 1 : sy);
		for (uint32_t x = 0; x < im->w; x++) {
			int64_t sx = (int64_t)x - im->lo[0];
			sx = sx < 0 ? 0 : (sx >= f->w ? f->w - 1 : sx);
			const float *v = f->v + 2 * ((size_t)sy * f->w + (size_t)sx);
			uint8_t *p = buf + 8 * ((size_t)y * im->w + x);
			put_float(p, (float)(pr[0] * (vm[0] * v[0] + vm[1] * v[1])));
			put_float(p + 4, (float)(pr[1] * (vm[2] * v[0] + vm[3] * v[1])));
		}
	}
	*out = buf;
	*len = bytes;
	return SF_OK;
}

int sf_transform_export_field_mhd(const sf_transform *t, const sf_tf_units *units,
                                  const uint32_t ref_size[2], const char *field_raw_name,
                                  char **mhd, size_t *mhd_len, uint8_t **raw, size_t *raw_len,
                                  sf_err *e)
{
	*mhd = NULL;
	*raw = NULL;
	*mhd_len = *raw_len = 0;
	if (!ref_size)
		return sf_fail(e, SF_EINVAL, "field export: no reference size");
	int rc = check_supported(t, 0, "field export", e);
	if (rc != SF_OK)
		return rc;
	if (t->map.nfields == 0)
		return sf_fail(e, SF_ENOTFOUND, "field export: the transform has no field");
	/* MetaIO reads the name to the end of the line; LOCAL, LIST and
	 * patterns with '%' mean something else to it */
	if (!field_raw_name || !field_raw_name[0] || strpbrk(field_raw_name, "\n\r%") ||
	    !strcmp(field_raw_name, "LOCAL") || !strcmp(field_raw_name, "LIST"))
		return sf_fail(e, SF_EINVAL, "field export: bad raw data file name");
	double pr[2], pm[2];
	physical_sizes(units, pr, pm);
	field_image im = {0};
	const sf_field_step *f = &t->map.field[0];
	rc = field_geometry(f, pr, ref_size, &im, e);
	if (rc == SF_OK)
		rc = mhd_header(&im, field_raw_name, mhd, mhd_len, e);
	if (rc == SF_OK)
		rc = mhd_raw(f, pr, &im, raw, raw_len, e);
	if (rc != SF_OK) {
		free(*mhd);
		*mhd = NULL;
		*mhd_len = 0;
	}
	return rc;
}

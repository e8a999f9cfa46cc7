/* test_transform_export.c — transforms written by transform_export.c read
 * back as the same map.
 *
 * Without arguments: unit checks.  JSON + field TIFF go through
 * sf_transform_load_json; elastix files without a field through
 * sf_transform_load_elastix; a field's MetaImage through a small reader here
 * that follows ITK's rules (index = (Direction Spacing)^-1 (x - Offset),
 * zero displacement outside [-0.5, n - 0.5), clamped bilinear), composed
 * with the main file's affine as read by sf_transform_load_elastix.  Each
 * compares sf_map_point at many points (< 1e-4 px).
 *
 * Driver modes for tests/integration/test_transform_export_oracle.py:
 *   --write DIR NAME   write DIR/NAME.json (+ NAME.field.tif), DIR/NAME.txt
 *                      (+ NAME.field.txt, NAME.field.mhd, NAME.field.raw)
 *                      for the fixed transform NAME (DIR absolute)
 *   --points NAME      map "x y" lines (reference level-0 px) from stdin,
 *                      print "sx sy" (moving level-0 px)
 * The fixed units are REF_PX and MOV_PX below, the reference REF_W x REF_H. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "scopefs/transform.h"
#include "scopefs/transform_export.h"

#define REF_W 300
#define REF_H 200
static const sf_tf_units fixed_units = {{0.5, 0.5}, {0.4, 0.45}};
static const uint32_t ref_size[2] = {REF_W, REF_H};

/* --- the fixed transforms ------------------------------------------------ */

/* An affine with rotation, scale, shear and translation. */
static void some_affine(double m[9], double angle, double shift)
{
	double c = cos(angle), s = sin(angle);
	double a[9] = {1.1 * c, -0.9 * s + 0.05, 12.5 + shift, 1.05 * s, 0.95 * c, -7.25, 0, 0, 1};
	memcpy(m, a, sizeof a);
}

/* A w x h linear grid with smooth values. */
static sf_field_grid *smooth_grid(uint32_t w, uint32_t h, double amp, sf_err *e)
{
	sf_field_grid *g = sf_field_grid_create(SF_FIELD_LINEAR, w, h, e);
	if (!g)
		return NULL;
	for (uint32_t j = 0; j < h; j++)
		for (uint32_t i = 0; i < w; i++) {
			g->v[2 * (j * w + i)] = (float)(amp * sin(0.7 * i + 0.3 * j));
			g->v[2 * (j * w + i) + 1] = (float)(amp * 0.8 * cos(0.5 * i - 0.4 * j));
		}
	if (sf_field_grid_finish(g, e) != SF_OK) {
		sf_field_grid_free(g);
		return NULL;
	}
	return g;
}

/* The transforms by name:
 *  affine    matrix only;
 *  field     src = M (p + s D((p - o) / s)), values in field units, grid
 *            short of the reference's bottom rows (the export pads it);
 *  fieldv    an axis-aligned grid with a full 2x2 V (values in pixels);
 *  rotfield  a field after a rotation: G rotated, V = R^-1 s;
 *  proj      a projective matrix (JSON only). */
static int make_transform(const char *name, sf_transform *t, sf_err *e)
{
	double m[9];
	sf_transform_init(t);
	int rc = SF_OK;
	if (strcmp(name, "affine") == 0) {
		some_affine(m, 0.3, 0);
		return sf_transform_then_matrix(t, m, e);
	}
	if (strcmp(name, "proj") == 0) {
		some_affine(m, -0.2, 3);
		m[6] = 1e-4;
		m[7] = -2e-4;
		return sf_transform_then_matrix(t, m, e);
	}
	if (strcmp(name, "field") == 0) {
		double s[2] = {37, 29}, o[2] = {5, -3};
		double gmap[6] = {1 / s[0], 0, -o[0] / s[0], 0, 1 / s[1], -o[1] / s[1]};
		double vm[4] = {s[0], 0, 0, s[1]};
		rc = sf_transform_then_field(t, smooth_grid(9, 7, 0.2, e), gmap, vm, e);
		some_affine(m, 0.1, 0);
	} else if (strcmp(name, "fieldv") == 0) {
		double gmap[6] = {1 / 50.0, 0, 0.3, 0, 1 / 45.0, -0.2};
		double vm[4] = {3, 0.5, -0.2, 2};
		rc = sf_transform_then_field(t, smooth_grid(6, 5, 1.5, e), gmap, vm, e);
		some_affine(m, -0.4, 20);
	} else if (strcmp(name, "rotfield") == 0) {
		double gmap[6] = {1 / 40.0, 0, 0.25, 0, 1 / 40.0, 0.5};
		double vm[4] = {40, 0, 0, 40};
		double c = cos(0.35), s = sin(0.35);
		double rot[9] = {c, -s, 60, s, c, -40, 0, 0, 1};
		rc = sf_transform_then_field(t, smooth_grid(11, 9, 0.1, e), gmap, vm, e);
		if (rc == SF_OK)
			rc = sf_transform_first_matrix(t, rot, e);
		some_affine(m, 0.6, -10);
	} else {
		return sf_fail(e, SF_EINVAL, "no transform named %s", name);
	}
	if (rc == SF_OK)
		rc = sf_transform_then_matrix(t, m, e);
	if (rc != SF_OK)
		sf_transform_release(t);
	return rc;
}

/* --- files --------------------------------------------------------------- */

static int write_file(const char *dir, const char *name, const char *ext, const void *p, size_t n)
{
	char path[1024];
	snprintf(path, sizeof path, "%s/%s%s", dir, name, ext);
	FILE *f = fopen(path, "wb");
	if (!f)
		return -1;
	size_t got = fwrite(p, 1, n, f);
	return (fclose(f) == 0 && got == n) ? 0 : -1;
}

/* Every file of NAME into dir; the elastix files name each other by
 * absolute path (dir must be absolute). */
static int write_all(const char *dir, const char *name, const sf_transform *t, const sf_tf_units *u,
                     const char *initial_override, sf_err *e)
{
	char field_tif[300], initial[1024], image[1024], raw_name[300];
	snprintf(field_tif, sizeof field_tif, "%s.field.tif", name);
	snprintf(initial, sizeof initial, "%s/%s.field.txt", dir, name);
	snprintf(image, sizeof image, "%s/%s.field.mhd", dir, name);
	snprintf(raw_name, sizeof raw_name, "%s.field.raw", name);
	char *txt = NULL, *ftxt = NULL, *mhd = NULL;
	uint8_t *bin = NULL;
	size_t n = 0, fn = 0, mn = 0;
	int rc = sf_transform_export_json(t, field_tif, &txt, &n, e);
	if (rc == SF_OK && write_file(dir, name, ".json", txt, n))
		rc = sf_fail(e, SF_EIO, "cannot write %s.json", name);
	free(txt);
	if ((rc == SF_OK || rc == SF_EUNSUPPORTED) && t->map.nfields) {
		int r2 = sf_transform_export_field_tiff(t, &bin, &n, e);
		if (r2 == SF_OK && write_file(dir, name, ".field.tif", bin, n))
			r2 = sf_fail(e, SF_EIO, "cannot write the TIFF");
		free(bin);
		rc = rc == SF_OK ? r2 : rc;
	}
	int json_rc = rc;
	rc = sf_transform_export_elastix(t, u, ref_size,
	                                 initial_override ? initial_override : initial, image, &txt,
	                                 &n, &ftxt, &fn, e);
	if (rc == SF_OK && write_file(dir, name, ".txt", txt, n))
		rc = SF_EIO;
	if (rc == SF_OK && ftxt && write_file(dir, name, ".field.txt", ftxt, fn))
		rc = SF_EIO;
	free(txt);
	free(ftxt);
	if (rc == SF_OK && t->map.nfields) {
		rc =
		    sf_transform_export_field_mhd(t, u, ref_size, raw_name, &mhd, &mn, &bin, &n, e);
		if (rc == SF_OK && (write_file(dir, name, ".field.mhd", mhd, mn) ||
		                    write_file(dir, name, ".field.raw", bin, n)))
			rc = SF_EIO;
		free(mhd);
		free(bin);
	}
	/* a JSON refusal (rotated grid, projective) is reported after elastix ran */
	return rc != SF_OK ? rc : json_rc;
}

/* --- the MetaImage field, read with ITK's rules ----------------------------- */

typedef struct mhd_field {
	double dir[4], spacing[2], offset[2]; /* dir row-major */
	unsigned w, h;
	float *v;
} mhd_field;

static int mhd_load(const char *dir, const char *name, mhd_field *f)
{
	char path[1024], line[1200], rawname[512] = "";
	double tm[4] = {1, 0, 0, 1};
	snprintf(path, sizeof path, "%s/%s.field.mhd", dir, name);
	FILE *fp = fopen(path, "r");
	if (!fp)
		return -1;
	while (fgets(line, sizeof line, fp)) {
		sscanf(line, "TransformMatrix = %lf %lf %lf %lf", tm, tm + 1, tm + 2, tm + 3);
		sscanf(line, "Offset = %lf %lf", f->offset, f->offset + 1);
		sscanf(line, "ElementSpacing = %lf %lf", f->spacing, f->spacing + 1);
		sscanf(line, "DimSize = %u %u", &f->w, &f->h);
		sscanf(line, "ElementDataFile = %511s", rawname);
	}
	fclose(fp);
	/* TransformMatrix lists the direction's columns */
	f->dir[0] = tm[0];
	f->dir[2] = tm[1];
	f->dir[1] = tm[2];
	f->dir[3] = tm[3];
	snprintf(path, sizeof path, "%s/%s", dir, rawname);
	size_t n = 2 * (size_t)f->w * f->h;
	f->v = malloc(n * sizeof *f->v);
	fp = fopen(path, "rb");
	size_t got = fp && f->v ? fread(f->v, sizeof *f->v, n, fp) : 0;
	if (fp)
		fclose(fp);
	return got == n ? 0 : -1;
}

/* x + d(x) as ITK's DeformationFieldInterpolatingTransform computes it. */
static void mhd_apply(const mhd_field *f, const double x[2], double y[2])
{
	double b[4] = {f->dir[0] * f->spacing[0], f->dir[1] * f->spacing[1],
	               f->dir[2] * f->spacing[0], f->dir[3] * f->spacing[1]};
	double det = b[0] * b[3] - b[1] * b[2], r[2] = {x[0] - f->offset[0], x[1] - f->offset[1]};
	double ci[2] = {(b[3] * r[0] - b[1] * r[1]) / det, (-b[2] * r[0] + b[0] * r[1]) / det};
	y[0] = x[0];
	y[1] = x[1];
	if (!(ci[0] >= -0.5 && ci[0] < f->w - 0.5 && ci[1] >= -0.5 && ci[1] < f->h - 0.5))
		return;
	double fx = floor(ci[0]), fy = floor(ci[1]), tx = ci[0] - fx, ty = ci[1] - fy;
	for (int k = 0; k < 2; k++) {
		double acc = 0;
		for (int j = 0; j < 2; j++)
			for (int i = 0; i < 2; i++) {
				long xi = (long)fx + i, yj = (long)fy + j;
				xi = xi < 0 ? 0 : (xi >= (long)f->w ? (long)f->w - 1 : xi);
				yj = yj < 0 ? 0 : (yj >= (long)f->h ? (long)f->h - 1 : yj);
				double wgt = (i ? tx : 1 - tx) * (j ? ty : 1 - ty);
				acc += wgt * f->v[2 * ((size_t)yj * f->w + xi) + k];
			}
		y[k] += acc;
	}
}

/* --- comparisons ----------------------------------------------------------- */

/* Largest distance between a and b over a grid of points from -20 px to
 * 20 px past the reference. */
static double max_diff(const sf_map *a, const sf_map *b)
{
	double worst = 0;
	for (double y = -20; y <= REF_H + 20; y += 3.7)
		for (double x = -20; x <= REF_W + 20; x += 4.3) {
			double ax, ay, bx, by;
			sf_map_point(a, x, y, &ax, &ay);
			sf_map_point(b, x, y, &bx, &by);
			worst = fmax(worst, hypot(ax - bx, ay - by));
		}
	return worst;
}

static void check_json(const char *dir, const char *name, const sf_transform *t)
{
	char path[1024];
	sf_err e = {0};
	sf_transform back;
	snprintf(path, sizeof path, "%s/%s.json", dir, name);
	int rc = sf_transform_load_json(path, &back, &e);
	CHECK(rc == SF_OK, "%s: JSON read back: %s", name, e.msg);
	if (rc != SF_OK)
		return;
	double d = max_diff(&t->map, &back.map);
	CHECK(d < 1e-4, "%s: JSON round trip differs by %g px", name, d);
	CHECK(back.map.nfields == t->map.nfields, "%s: %u fields read back", name,
	      back.map.nfields);
	sf_transform_release(&back);
}

/* elastix without a field: our elastix reader, with and without units. */
static void check_elastix_matrix(const char *dir, const char *name, const sf_transform *t,
                                 const sf_tf_units *u)
{
	char path[1024];
	sf_err e = {0};
	sf_transform back;
	snprintf(path, sizeof path, "%s/%s.txt", dir, name);
	int rc = sf_transform_load_elastix(path, u, &back, &e);
	CHECK(rc == SF_OK, "%s: elastix read back: %s", name, e.msg);
	if (rc != SF_OK)
		return;
	double d = max_diff(&t->map, &back.map);
	CHECK(d < 1e-4, "%s: elastix round trip differs by %g px", name, d);
	sf_transform_release(&back);
}

/* elastix with a field: the main file alone (exported with no initial
 * transform) through our reader, the field image through mhd_apply. */
static void check_elastix_field(const char *dir, const char *name, const sf_transform *t,
                                const sf_tf_units *u)
{
	char path[1024];
	sf_err e = {0};
	sf_transform affine;
	mhd_field f = {0};
	snprintf(path, sizeof path, "%s/%s.txt", dir, name);
	int rc = sf_transform_load_elastix(path, u, &affine, &e);
	CHECK(rc == SF_OK, "%s: elastix main read back: %s", name, e.msg);
	CHECK(mhd_load(dir, name, &f) == 0, "%s: cannot read the MetaImage field", name);
	double pr[2] = {u->ref_px[0] > 0 ? u->ref_px[0] : 1, u->ref_px[1] > 0 ? u->ref_px[1] : 1};
	double worst = 0;
	for (double y = -0.5; rc == SF_OK && f.v && y <= REF_H - 0.5; y += 2.9)
		for (double x = -0.5; x <= REF_W - 0.5; x += 3.1) {
			double want[2], got[2], phys[2] = {pr[0] * x, pr[1] * y}, moved[2];
			sf_map_point(&t->map, x, y, want, want + 1);
			mhd_apply(&f, phys, moved);
			sf_map_point(&affine.map, moved[0] / pr[0], moved[1] / pr[1], got, got + 1);
			worst = fmax(worst, hypot(want[0] - got[0], want[1] - got[1]));
		}
	CHECK(worst < 1e-4, "%s: elastix field differs by %g px", name, worst);
	free(f.v);
	if (rc == SF_OK)
		sf_transform_release(&affine);
}

static void test_round_trips(const char *dir, const char *name, const sf_tf_units *u)
{
	sf_err e = {0};
	sf_transform t;
	int rc = make_transform(name, &t, &e);
	CHECK(rc == SF_OK, "%s: build: %s", name, e.msg);
	if (rc != SF_OK)
		return;
	int has_field = t.map.nfields > 0;
	int json_ok = strcmp(name, "rotfield") != 0;
	int elastix_ok = strcmp(name, "proj") != 0;
	/* with a field, the main file stands alone so our reader takes it */
	rc = write_all(dir, name, &t, u, has_field ? "NoInitialTransform" : NULL, &e);
	if (json_ok && elastix_ok)
		CHECK(rc == SF_OK, "%s: write: %s", name, e.msg);
	else
		CHECK(rc == SF_EUNSUPPORTED, "%s: %d, not unsupported (%s)", name, rc, e.msg);
	if (json_ok)
		check_json(dir, name, &t);
	if (elastix_ok && !has_field)
		check_elastix_matrix(dir, name, &t, u);
	if (elastix_ok && has_field)
		check_elastix_field(dir, name, &t, u);
	sf_transform_release(&t);
}

/* What the files say, and refusals. */
static void test_contents_and_refusals(void)
{
	sf_err e = {0};
	sf_transform t;
	char *main_txt, *field_txt, *json;
	size_t n, fn;
	CHECK(make_transform("field", &t, &e) == SF_OK, "build: %s", e.msg);
	int rc = sf_transform_export_elastix(&t, &fixed_units, ref_size, "/m/a (1).field.txt",
	                                     "/m/a.field.mhd", &main_txt, &n, &field_txt, &fn, &e);
	CHECK(rc == SF_OK, "export: %s", e.msg);
	if (rc == SF_OK) {
		CHECK(
		    strstr(main_txt, "(InitialTransformParametersFileName \"/m/a (1).field.txt\")"),
		    "main file names its initial transform:\n%s", main_txt);
		CHECK(strstr(main_txt, "(Transform \"AffineTransform\")"), "main is affine");
		CHECK(strstr(field_txt, "(DeformationFieldFileName \"/m/a.field.mhd\")"),
		      "field file names its image:\n%s", field_txt);
		CHECK(strstr(field_txt, "(DeformationFieldInterpolationOrder 1)"), "linear");
		CHECK(strlen(main_txt) == n && strlen(field_txt) == fn, "lengths");
		free(main_txt);
		free(field_txt);
	}
	rc = sf_transform_export_elastix(&t, &fixed_units, ref_size, "a\"b", "x.mhd", &main_txt, &n,
	                                 &field_txt, &fn, &e);
	CHECK(rc == SF_EINVAL && !main_txt && !field_txt, "a quote in a path: %d", rc);
	rc = sf_transform_export_json(&t, NULL, &json, &n, &e);
	CHECK(rc == SF_EINVAL && !json, "a field without a file name: %d", rc);
	rc = sf_transform_export_json(&t, "q\"\\.tif", &json, &n, &e);
	CHECK(rc == SF_OK && strstr(json, "\"q\\\"\\\\.tif\""), "escaped file name: %s",
	      rc == SF_OK ? json : e.msg);
	free(rc == SF_OK ? json : NULL);
	/* two fields */
	double gm[6] = {0.1, 0, 0, 0, 0.1, 0}, vm[4] = {1, 0, 0, 1};
	rc = sf_transform_then_field(&t, smooth_grid(3, 3, 1, &e), gm, vm, &e);
	CHECK(rc == SF_OK, "second field: %s", e.msg);
	rc = sf_transform_export_json(&t, "f.tif", &json, &n, &e);
	CHECK(rc == SF_EUNSUPPORTED, "two fields in JSON: %d", rc);
	uint8_t *raw;
	char *mhd;
	size_t mn, rn;
	rc = sf_transform_export_field_mhd(&t, NULL, ref_size, "f.raw", &mhd, &mn, &raw, &rn, &e);
	CHECK(rc == SF_EUNSUPPORTED && !mhd && !raw, "two fields as MetaImage: %d", rc);
	sf_transform_release(&t);
	/* no field */
	CHECK(make_transform("affine", &t, &e) == SF_OK, "build: %s", e.msg);
	rc = sf_transform_export_field_tiff(&t, &raw, &n, &e);
	CHECK(rc == SF_ENOTFOUND && !raw, "TIFF of no field: %d", rc);
	rc = sf_transform_export_field_mhd(&t, NULL, ref_size, "f.raw", &mhd, &mn, &raw, &rn, &e);
	CHECK(rc == SF_ENOTFOUND, "MetaImage of no field: %d", rc);
	rc = sf_transform_export_elastix(&t, NULL, ref_size, NULL, NULL, &main_txt, &n, &field_txt,
	                                 &fn, &e);
	CHECK(rc == SF_OK && !field_txt && fn == 0 &&
	          strstr(main_txt, "(InitialTransformParametersFileName \"NoInitialTransform\")"),
	      "affine alone: %s", e.msg);
	free(rc == SF_OK ? main_txt : NULL);
	sf_transform_release(&t);
	/* a B-spline field */
	sf_transform_init(&t);
	sf_field_grid *g = sf_field_grid_create(SF_FIELD_BSPLINE3, 5, 5, &e);
	CHECK(g && sf_transform_then_field(&t, g, gm, vm, &e) == SF_OK, "bspline: %s", e.msg);
	rc = sf_transform_export_json(&t, "f.tif", &json, &n, &e);
	CHECK(rc == SF_EUNSUPPORTED, "B-spline in JSON: %d", rc);
	sf_transform_release(&t);
}

static int run_unit_tests(void)
{
	char dir[] = "/tmp/sf_txexport_XXXXXX";
	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		return 1;
	}
	static const char *names[] = {"affine", "field", "fieldv", "rotfield", "proj"};
	static const sf_tf_units unit1 = {{0, 0}, {0, 0}}, mov_only = {{0, 0}, {0.7, 0.7}};
	const sf_tf_units *units[] = {&fixed_units, &unit1, &mov_only};
	for (size_t u = 0; u < 3; u++)
		for (size_t i = 0; i < sizeof names / sizeof *names; i++)
			test_round_trips(dir, names[i], units[u]);
	test_contents_and_refusals();
	char cmd[128];
	snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
	if (system(cmd) != 0)
		printf("could not remove %s\n", dir);
	return CHECK_DONE("test_transform_export");
}

/* --- driver modes ---------------------------------------------------------- */

static int driver_write(const char *dir, const char *name)
{
	sf_err e = {0};
	sf_transform t;
	int rc = make_transform(name, &t, &e);
	if (rc == SF_OK) {
		rc = write_all(dir, name, &t, &fixed_units, NULL, &e);
		sf_transform_release(&t);
	}
	if (rc != SF_OK && rc != SF_EUNSUPPORTED)
		fprintf(stderr, "%s: %s\n", name, e.msg);
	return rc == SF_OK || rc == SF_EUNSUPPORTED ? 0 : 1;
}

static int driver_points(const char *name)
{
	sf_err e = {0};
	sf_transform t;
	if (make_transform(name, &t, &e) != SF_OK) {
		fprintf(stderr, "%s: %s\n", name, e.msg);
		return 1;
	}
	double x, y, sx, sy;
	while (scanf("%lf %lf", &x, &y) == 2) {
		sf_map_point(&t.map, x, y, &sx, &sy);
		printf("%.9f %.9f\n", sx, sy);
	}
	sf_transform_release(&t);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && strcmp(argv[1], "--write") == 0)
		return driver_write(argv[2], argv[3]);
	if (argc == 3 && strcmp(argv[1], "--points") == 0)
		return driver_points(argv[2]);
	if (argc != 1) {
		fprintf(stderr, "usage: %s [--write DIR NAME | --points NAME]\n", argv[0]);
		return 2;
	}
	return run_unit_tests();
}

/* transform.c — backward maps in normal form: build, compose, scale per level.
 *
 * Invariants (see transform.h): a map is fields-then-matrix; t->grids[i] is
 * the grid map.field[i] reads, so ngrids == map.nfields; every function that
 * builds leaves t unchanged when it fails.  Composition pushes an affine
 * matrix M that precedes a field step (G, V) to the right:
 *     M p + V F(G M p) = M (p + Mlin^-1 V F(G M p)),
 * so the step becomes (G M, Mlin^-1 V) and M joins the final matrix. */
#include "scopefs/transform.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "warp_math.h"

static const double identity3[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1};

/* Grid ids only need to differ; an atomic counter keeps them unique across
 * threads without a lock. */
static atomic_uint_fast64_t next_grid_id = 1;

sf_field_grid *sf_field_grid_create(sf_field_kind kind, uint32_t w, uint32_t h, sf_err *e)
{
	if (w == 0 || h == 0 || w > (1u << 20) || h > (1u << 20)) {
		sf_fail(e, SF_EINVAL, "field grid of %ux%u nodes", w, h);
		return NULL;
	}
	sf_field_grid *g = calloc(1, sizeof *g);
	if (g)
		g->v = calloc(2 * (size_t)w * h, sizeof(float));
	if (!g || !g->v) {
		free(g);
		sf_fail(e, SF_ENOMEM, "field grid of %ux%u nodes: out of memory", w, h);
		return NULL;
	}
	g->kind = kind;
	g->w = w;
	g->h = h;
	g->id = atomic_fetch_add(&next_grid_id, 1);
	return g;
}

int sf_field_grid_finish(sf_field_grid *g, sf_err *e)
{
	size_t n = (size_t)g->w * g->h;
	float lo[2] = {INFINITY, INFINITY}, hi[2] = {-INFINITY, -INFINITY};
	for (size_t i = 0; i < n; i++) {
		for (int k = 0; k < 2; k++) {
			float v = g->v[2 * i + k];
			if (!isfinite(v))
				return sf_fail(e, SF_EFORMAT, "field value %zu is not finite", i);
			lo[k] = v < lo[k] ? v : lo[k];
			hi[k] = v > hi[k] ? v : hi[k];
		}
	}
	for (int k = 0; k < 2; k++) {
		g->vmin[k] = lo[k];
		g->vmax[k] = hi[k];
	}
	return SF_OK;
}

void sf_field_grid_free(sf_field_grid *g)
{
	if (g) {
		free(g->v);
		free(g);
	}
}

void sf_mat3_mul(const double a[9], const double b[9], double out[9])
{
	double r[9];
	for (int i = 0; i < 3; i++)
		for (int j = 0; j < 3; j++)
			r[3 * i + j] =
			    a[3 * i] * b[j] + a[3 * i + 1] * b[3 + j] + a[3 * i + 2] * b[6 + j];
	memcpy(out, r, sizeof r);
}

/* Whether det is far enough from 0 for a's own scale.  The test is
 * relative, so a matrix of pixel sizes (1e-4) still inverts.  An affine
 * map is invertible when its 2x2 linear part is, whatever its translation:
 * counting the translation in the scale refused a 180-degree turn of a
 * 60,000-pixel slide (translation 59,999) as singular.  A projective one is
 * measured against the product of its row lengths, the largest |det| can
 * be for those rows (Hadamard's inequality). */
static int matrix_invertible(const double a[9], double det)
{
	if (a[6] == 0 && a[7] == 0) {
		double lin = fmax(fmax(fabs(a[0]), fabs(a[1])), fmax(fabs(a[3]), fabs(a[4])));
		double det2 = a[0] * a[4] - a[1] * a[3];
		return a[8] != 0 && fabs(det2) > 1e-14 * lin * lin;
	}
	double rows = 1;
	for (int r = 0; r < 3; r++)
		rows *= sqrt(a[3 * r] * a[3 * r] + a[3 * r + 1] * a[3 * r + 1] +
		             a[3 * r + 2] * a[3 * r + 2]);
	return fabs(det) > 1e-14 * rows;
}

int sf_mat3_inverse(const double a[9], double out[9])
{
	double c[9] = {
	    a[4] * a[8] - a[5] * a[7], a[2] * a[7] - a[1] * a[8], a[1] * a[5] - a[2] * a[4],
	    a[5] * a[6] - a[3] * a[8], a[0] * a[8] - a[2] * a[6], a[2] * a[3] - a[0] * a[5],
	    a[3] * a[7] - a[4] * a[6], a[1] * a[6] - a[0] * a[7], a[0] * a[4] - a[1] * a[3],
	};
	double det = a[0] * c[0] + a[1] * c[3] + a[2] * c[6];
	if (!isfinite(det) || !matrix_invertible(a, det))
		return SF_EINVAL;
	for (int i = 0; i < 9; i++)
		out[i] = c[i] / det;
	return SF_OK;
}

static int is_affine(const double m[9])
{
	return m[6] == 0 && m[7] == 0 && m[8] == 1;
}

static void set_matrix(sf_map *map, const double m[9])
{
	memcpy(map->m, m, sizeof map->m);
	map->projective = !is_affine(m);
}

/* Inverse of the 2x2 linear part of affine m into inv[4]. */
static int linear_inverse(const double m[9], double inv[4])
{
	double det = m[0] * m[4] - m[1] * m[3];
	double scale = fmax(fmax(fabs(m[0]), fabs(m[1])), fmax(fabs(m[3]), fabs(m[4])));
	if (!isfinite(det) || fabs(det) <= 1e-14 * scale * scale)
		return SF_EINVAL;
	inv[0] = m[4] / det;
	inv[1] = -m[1] / det;
	inv[2] = -m[3] / det;
	inv[3] = m[0] / det;
	return SF_OK;
}

/* Rewrite field step f, which follows affine m, to precede it. */
static void push_matrix_through(sf_field_step *f, const double m[9], const double minv[4])
{
	double g[6], vm[4];
	for (int r = 0; r < 2; r++) {
		const double *gr = f->g + 3 * r;
		g[3 * r + 0] = gr[0] * m[0] + gr[1] * m[3];
		g[3 * r + 1] = gr[0] * m[1] + gr[1] * m[4];
		g[3 * r + 2] = gr[0] * m[2] + gr[1] * m[5] + gr[2];
	}
	vm[0] = minv[0] * f->vm[0] + minv[1] * f->vm[2];
	vm[1] = minv[0] * f->vm[1] + minv[1] * f->vm[3];
	vm[2] = minv[2] * f->vm[0] + minv[3] * f->vm[2];
	vm[3] = minv[2] * f->vm[1] + minv[3] * f->vm[3];
	memcpy(f->g, g, sizeof g);
	memcpy(f->vm, vm, sizeof vm);
}

void sf_transform_init(sf_transform *t)
{
	memset(t, 0, sizeof *t);
	set_matrix(&t->map, identity3);
}

void sf_transform_release(sf_transform *t)
{
	for (unsigned i = 0; i < t->ngrids; i++)
		sf_field_grid_free(t->grids[i]);
	sf_transform_init(t);
}

int sf_transform_then_matrix(sf_transform *t, const double m[9], sf_err *e)
{
	double r[9];
	sf_mat3_mul(m, t->map.m, r);
	double inv[9];
	if (sf_mat3_inverse(r, inv) != SF_OK)
		return sf_fail(e, SF_EINVAL, "transform matrix is singular");
	set_matrix(&t->map, r);
	return SF_OK;
}

int sf_transform_first_matrix(sf_transform *t, const double m[9], sf_err *e)
{
	double inv[9], lin[4];
	if (sf_mat3_inverse(m, inv) != SF_OK)
		return sf_fail(e, SF_EINVAL, "transform matrix is singular");
	if (t->map.nfields) {
		if (!is_affine(m) || linear_inverse(m, lin) != SF_OK)
			return sf_fail(e, SF_EUNSUPPORTED,
			               "a projective matrix before a displacement field");
		for (unsigned k = 0; k < t->map.nfields; k++)
			push_matrix_through(&t->map.field[k], m, lin);
	}
	double r[9];
	sf_mat3_mul(t->map.m, m, r);
	set_matrix(&t->map, r);
	return SF_OK;
}

static void step_from_grid(sf_field_step *f, const sf_field_grid *g, const double gmap[6],
                           const double vm[4])
{
	memset(f, 0, sizeof *f);
	f->kind = g->kind;
	f->w = g->w;
	f->h = g->h;
	f->v = g->v;
	memcpy(f->vmin, g->vmin, sizeof f->vmin);
	memcpy(f->vmax, g->vmax, sizeof f->vmax);
	f->grid_id = g->id;
	memcpy(f->g, gmap, sizeof f->g);
	memcpy(f->vm, vm, sizeof f->vm);
}

int sf_transform_then_field(sf_transform *t, sf_field_grid *g, const double gmap[6],
                            const double vm[4], sf_err *e)
{
	double lin[4];
	int rc = SF_OK;
	if (t->map.nfields >= SF_MAP_MAX_FIELDS)
		rc = sf_fail(e, SF_EUNSUPPORTED, "more than %d displacement fields in a chain",
		             SF_MAP_MAX_FIELDS);
	else if (t->map.projective || linear_inverse(t->map.m, lin) != SF_OK)
		rc = sf_fail(e, SF_EUNSUPPORTED,
		             "a displacement field after a singular or projective matrix");
	if (rc != SF_OK) {
		sf_field_grid_free(g);
		return rc;
	}
	sf_field_step *f = &t->map.field[t->map.nfields];
	step_from_grid(f, g, gmap, vm);
	push_matrix_through(f, t->map.m, lin);
	t->grids[t->ngrids++] = g;
	t->map.nfields++;
	return SF_OK;
}

int sf_transform_then(sf_transform *t, sf_transform *u, sf_err *e)
{
	double lin[4];
	int rc = SF_OK;
	if (t->map.nfields + u->map.nfields > SF_MAP_MAX_FIELDS)
		rc = sf_fail(e, SF_EUNSUPPORTED, "more than %d displacement fields in a chain",
		             SF_MAP_MAX_FIELDS);
	else if (u->map.nfields && (t->map.projective || linear_inverse(t->map.m, lin) != SF_OK))
		rc = sf_fail(e, SF_EUNSUPPORTED,
		             "a displacement field after a singular or projective matrix");
	if (rc != SF_OK) {
		sf_transform_release(u);
		return rc;
	}
	for (unsigned k = 0; k < u->map.nfields; k++) {
		sf_field_step f = u->map.field[k];
		push_matrix_through(&f, t->map.m, lin);
		t->map.field[t->map.nfields++] = f;
		t->grids[t->ngrids++] = u->grids[k];
	}
	double r[9];
	sf_mat3_mul(u->map.m, t->map.m, r);
	set_matrix(&t->map, r);
	u->ngrids = 0; /* the grids now belong to t */
	sf_transform_init(u);
	return SF_OK;
}

/* t(x) + u(x) - x with at most one field F (G, V) between them, on side s
 * with final matrix Ms, and A = Mt + Mu - I:
 *     Ms (x + V F) + Mo x - x = A x + Mslin V F = A (x + Alin^-1 Mslin V F(G x)). */
int sf_transform_add(sf_transform *t, sf_transform *u, sf_err *e)
{
	int rc = SF_OK;
	double a[9], lin[4];
	for (int i = 0; i < 9; i++)
		a[i] = t->map.m[i] + u->map.m[i] - identity3[i];
	if (t->map.nfields + u->map.nfields > 1)
		rc = sf_fail(e, SF_EUNSUPPORTED,
		             "Add of two transforms holding more than one displacement field");
	else if (t->map.projective || u->map.projective)
		rc = sf_fail(e, SF_EUNSUPPORTED, "Add of a projective transform");
	else if (linear_inverse(a, lin) != SF_OK)
		rc = sf_fail(e, SF_EINVAL, "Add gives a singular transform");
	if (rc != SF_OK) {
		sf_transform_release(u);
		return rc;
	}
	const sf_transform *side = t->map.nfields ? t : u;
	if (side->map.nfields) {
		sf_field_step f = side->map.field[0];
		const double *ms = side->map.m;
		/* f's step is in side's input frame, which is x itself (one field,
		 * first): only its V changes, to Alin^-1 Mslin V. */
		double w[4] = {ms[0] * f.vm[0] + ms[1] * f.vm[2], ms[0] * f.vm[1] + ms[1] * f.vm[3],
		               ms[3] * f.vm[0] + ms[4] * f.vm[2],
		               ms[3] * f.vm[1] + ms[4] * f.vm[3]};
		f.vm[0] = lin[0] * w[0] + lin[1] * w[2];
		f.vm[1] = lin[0] * w[1] + lin[1] * w[3];
		f.vm[2] = lin[2] * w[0] + lin[3] * w[2];
		f.vm[3] = lin[2] * w[1] + lin[3] * w[3];
		t->map.field[0] = f;
		t->map.nfields = 1;
		if (side == u) {
			t->grids[0] = u->grids[0];
			t->ngrids = 1;
			u->ngrids = 0;
		}
	}
	set_matrix(&t->map, a);
	sf_transform_release(u);
	return SF_OK;
}

void sf_map_point(const sf_map *m, double x, double y, double *sx, double *sy)
{
	wm_map_point(m, x, y, sx, sy);
}

/* S(f): level pixel -> level-0 pixel, x0 = (x + 0.5) f - 0.5. */
static void level_to_level0(const double ds[2], double s[9])
{
	double m[9] = {ds[0], 0, (ds[0] - 1) / 2, 0, ds[1], (ds[1] - 1) / 2, 0, 0, 1};
	memcpy(s, m, sizeof m);
}

/* S(f)^-1: level-0 pixel -> level pixel, x = (x0 + 0.5) / f - 0.5. */
static void level0_to_level(const double ds[2], double s[9])
{
	double m[9] = {1 / ds[0], 0, (1 / ds[0] - 1) / 2, 0, 1 / ds[1], (1 / ds[1] - 1) / 2, 0,
	               0,         1};
	memcpy(s, m, sizeof m);
}

void sf_transform_level_map(const sf_transform *t, const double out_ds[2], const double src_ds[2],
                            sf_map *out)
{
	double so[9], ss[9], lin[4], r[9];
	level_to_level0(out_ds, so);
	level0_to_level(src_ds, ss);
	*out = t->map;
	lin[0] = 1 / out_ds[0];
	lin[1] = lin[2] = 0;
	lin[3] = 1 / out_ds[1];
	for (unsigned k = 0; k < out->nfields; k++)
		push_matrix_through(&out->field[k], so, lin);
	sf_mat3_mul(t->map.m, so, r);
	sf_mat3_mul(ss, r, r);
	set_matrix(out, r);
}

double sf_transform_scale(const sf_transform *t)
{
	const double *m = t->map.m;
	double det = m[0] * m[4] - m[1] * m[3];
	if (t->map.projective && m[8] != 0)
		det /= m[8] * m[8];
	return sqrt(fabs(det));
}

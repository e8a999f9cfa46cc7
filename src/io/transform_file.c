/* transform_file.c — read transform files into the backward-map model.
 *
 * Formats (docs/transforms.md): our JSON (a backward 3x3 matrix in level-0
 * pixels and an optional displacement field stored as a 2-band float32 TIFF),
 * elastix TransformParameters files (Translation, Euler, Similarity, Affine,
 * BSpline 2D; chains through InitialTransformParametersFileName with Compose
 * or Add), a folder elastix wrote (its highest TransformParameters.N.txt),
 * and ITK text transform files (.tfm: Affine, MatrixOffsetTransformBase,
 * Euler2D/Rigid2D, Similarity2D, Translation, Identity, CompositeTransform),
 * and wsireg's *_transformations.json (elastix maps stored as JSON objects of
 * {key: [strings]}; they go through the same elastix code as text files, via
 * ex_from_json, and compose last key first as wsireg does).
 *
 * elastix and ITK transforms map fixed physical points to moving physical
 * points; the reader brackets them with pixel->physical matrices (sf_tf_units)
 * so the result maps reference level-0 pixels to moving level-0 pixels.
 *
 * Every error names the file, and the line when the fault has one
 * ("a.txt:12: ..."); the reader never exits on bad input, frees everything it
 * made on every path, and reads at most MAX_FILE_BYTES of a file.  Every
 * file a load opens goes through files_add, so sf_transform_load_files
 * can list them for a caller watching them for edits. */
#include "scopefs/transform.h"
#include "scopefs/utf8.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>
#include <string.h>
#include <sys/stat.h>
#include <tiffio.h>

#include "scopefs/metaimage.h"

#define MAX_FILE_BYTES  ((size_t)1 << 30)
#define MAX_CHAIN_DEPTH 16
#define MAX_JSON_DEPTH  32

/* --- small helpers -------------------------------------------------------- */

/* 3 when text starts with a UTF-8 byte order mark, else 0.  Windows
 * editors (Notepad, PowerShell 5's Out-File) write one; it is not part of
 * any format here, so every reader skips it. */
static size_t utf8_bom(const char *text)
{
	return strncmp(text, "\xEF\xBB\xBF", 3) ? 0 : 3;
}

/* The whole file as a NUL-terminated string, without a leading BOM (the
 * caller frees *out). */
static int read_text(const char *path, char **out, sf_err *e)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return sf_fail(e, errno == ENOENT ? SF_ENOTFOUND : SF_EIO, "%s: %s", path,
		               strerror(errno));
	size_t cap = 4096, n = 0;
	char *buf = malloc(cap);
	int rc = buf ? SF_OK : sf_fail(e, SF_ENOMEM, "%s: out of memory", path);
	while (rc == SF_OK) {
		if (n + 1 >= cap) {
			char *nb = cap < MAX_FILE_BYTES ? realloc(buf, cap * 2) : NULL;
			if (!nb) {
				rc = sf_fail(e, cap < MAX_FILE_BYTES ? SF_ENOMEM : SF_EFORMAT,
				             "%s: file too large or out of memory", path);
				break;
			}
			buf = nb;
			cap *= 2;
		}
		size_t got = fread(buf + n, 1, cap - 1 - n, f);
		n += got;
		if (got == 0) {
			if (ferror(f))
				rc = sf_fail(e, SF_EIO, "%s: read error", path);
			break;
		}
	}
	fclose(f);
	if (rc != SF_OK) {
		free(buf);
		return rc;
	}
	buf[n] = '\0';
	if (strlen(buf) != n) {
		free(buf);
		return sf_fail(e, SF_EFORMAT, "%s: binary file (NUL byte), not a transform", path);
	}
	size_t bom = utf8_bom(buf);
	memmove(buf, buf + bom, n - bom + 1);
	*out = buf;
	return SF_OK;
}

/* dir of path (without the slash) into out; "." when path has none. */
static void dir_of(const char *path, char *out, size_t cap)
{
	const char *slash = strrchr(path, '/');
	if (!slash)
		snprintf(out, cap, ".");
	else if (slash == path)
		snprintf(out, cap, "/");
	else
		snprintf(out, cap, "%.*s", (int)(slash - path), path);
}

static int file_exists(const char *p)
{
	struct stat st;
	return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

/* List path among the files a load read (files NULL: nobody asked); once,
 * however many maps name it. */
static int files_add(sf_tf_files *files, const char *path, sf_err *e)
{
	if (!files)
		return SF_OK;
	for (size_t i = 0; i < files->count; i++)
		if (strcmp(files->paths[i], path) == 0)
			return SF_OK;
	char **grown = realloc(files->paths, (files->count + 1) * sizeof *grown);
	if (!grown)
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", path);
	files->paths = grown;
	if (!(grown[files->count] = strdup(path)))
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", path);
	files->count++;
	return SF_OK;
}

void sf_tf_files_free(sf_tf_files *files)
{
	for (size_t i = 0; files && i < files->count; i++)
		free(files->paths[i]);
	if (files) {
		free(files->paths);
		files->paths = NULL;
		files->count = 0;
	}
}

/* Resolve a file named inside `from`: absolute and present as written, else
 * relative to from's folder, else its base name in from's folder (a folder
 * of chained elastix files that was moved).  0 when none exists. */
static int resolve_near(const char *from, const char *name, char *out, size_t cap)
{
	char dir[PATH_MAX];
	dir_of(from, dir, sizeof dir);
	if (name[0] == '/' && file_exists(name)) {
		snprintf(out, cap, "%s", name);
		return 1;
	}
	if (name[0] != '/') {
		if ((size_t)snprintf(out, cap, "%s/%s", dir, name) < cap && file_exists(out))
			return 1;
	}
	/* The base name after the last '/' or '\\': elastix run on Windows
	 * writes C:\\...\\TransformParameters.0.txt into the chain. */
	const char *base = name;
	for (const char *c = name; *c; c++)
		if (*c == '/' || *c == '\\')
			base = c + 1;
	return (size_t)snprintf(out, cap, "%s/%s", dir, base) < cap && file_exists(out);
}

/* Parse all of s as a finite double. */
static int parse_double(const char *s, double *v)
{
	char *end;
	errno = 0;
	*v = strtod(s, &end);
	return end != s && *end == '\0' && errno != ERANGE && isfinite(*v);
}

/* Put "path:line: " (line 0: "path: ") before e's message, keeping code rc. */
static int prefix_error(sf_err *e, int rc, const char *path, int line)
{
	if (!e)
		return rc;
	char m[sizeof e->msg];
	snprintf(m, sizeof m, "%s", e->msg);
	if (line > 0)
		return sf_fail(e, rc, "%s:%d: %s", path, line, m);
	return sf_fail(e, rc, "%s: %s", path, m);
}

/* The largest magnitude a map coefficient may have.  Real maps stay far
 * below it (a scale of 1e15 between two pixel grids means nothing), and
 * below it evaluating a map cannot overflow: level-0 coordinates under 2^40,
 * field values under FLT_MAX, a few products of such coefficients. */
#define MAX_COEFFICIENT 1e15

static int coefficient_ok(double v)
{
	return fabs(v) <= MAX_COEFFICIENT; /* false for NaN and inf as well */
}

/* rc, or, when a load that succeeded made a map with a coefficient out of
 * range (each value of a file can be finite while their composition
 * overflows: a 1e-300 spacing and a 1e10 origin), SF_EFORMAT with t
 * released: such a map would warp to a silently wrong image. */
static int check_loaded(const char *path, sf_transform *t, int rc, sf_err *e)
{
	const sf_map *m = &t->map;
	int ok = 1;
	if (rc != SF_OK)
		return rc;
	for (int i = 0; i < 9; i++)
		ok &= coefficient_ok(m->m[i]);
	for (unsigned k = 0; k < m->nfields; k++) {
		for (int i = 0; i < 6; i++)
			ok &= coefficient_ok(m->field[k].g[i]);
		for (int i = 0; i < 4; i++)
			ok &= coefficient_ok(m->field[k].vm[i]);
	}
	if (ok)
		return SF_OK;
	sf_transform_release(t);
	return sf_fail(e, SF_EFORMAT,
	               "%s: the transform's values overflow (a coefficient beyond %g once "
	               "composed: check sizes, spacings and origins)",
	               path, MAX_COEFFICIENT);
}

/* Affine [A | t] about centre c: x -> A (x - c) + c + t, as a 3x3 matrix. */
static void centred_affine(const double a[4], const double t[2], const double c[2], double m[9])
{
	m[0] = a[0];
	m[1] = a[1];
	m[2] = t[0] + c[0] - a[0] * c[0] - a[1] * c[1];
	m[3] = a[2];
	m[4] = a[3];
	m[5] = t[1] + c[1] - a[2] * c[0] - a[3] * c[1];
	m[6] = m[7] = 0;
	m[8] = 1;
}

static void rotation(double scale, double theta, double a[4])
{
	a[0] = scale * cos(theta);
	a[1] = -scale * sin(theta);
	a[2] = scale * sin(theta);
	a[3] = scale * cos(theta);
}

/* index -> physical: p = origin + dir * diag(spacing) * (x + index). */
static void pixel_to_physical(const double origin[2], const double dir[4], const double sp[2],
                              const double index[2], double m[9])
{
	m[0] = dir[0] * sp[0];
	m[1] = dir[1] * sp[1];
	m[3] = dir[2] * sp[0];
	m[4] = dir[3] * sp[1];
	m[2] = origin[0] + m[0] * index[0] + m[1] * index[1];
	m[5] = origin[1] + m[3] * index[0] + m[4] * index[1];
	m[6] = m[7] = 0;
	m[8] = 1;
}

/* Wrap physical->physical t into reference pixels -> moving pixels. */
static int physical_to_pixels(sf_transform *t, const double ref[9], const double mov[9],
                              const char *path, sf_err *e)
{
	double inv[9];
	if (sf_mat3_inverse(mov, inv) != SF_OK)
		return sf_fail(e, SF_EINVAL, "%s: moving pixel size or direction is singular",
		               path);
	int rc = sf_transform_first_matrix(t, ref, e);
	if (rc == SF_OK)
		rc = sf_transform_then_matrix(t, inv, e);
	return rc == SF_OK ? SF_OK : prefix_error(e, rc, path, 0);
}

/* The moving geometry: the caller's pixel size if known, else ref's. */
static void moving_geometry(const sf_tf_units *u, const double ref[9], double mov[9])
{
	if (u && u->mov_px[0] > 0 && u->mov_px[1] > 0) {
		double m[9] = {u->mov_px[0], 0, 0, 0, u->mov_px[1], 0, 0, 0, 1};
		memcpy(mov, m, sizeof m);
	} else {
		memcpy(mov, ref, 9 * sizeof *mov);
	}
}

/* --- JSON: a small DOM of what our format needs --------------------------- */

typedef enum { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ } jtype;

typedef struct jval {
	jtype type;
	int line;
	double num;         /* J_NUM, J_BOOL (0/1) */
	char *str;          /* J_STR */
	size_t n;           /* J_ARR / J_OBJ: items */
	struct jval *items; /* values */
	char **keys;        /* J_OBJ: keys, parallel to items */
} jval;

typedef struct jparser {
	const char *path;
	const char *s;
	int line;
	sf_err *e;
} jparser;

static void json_free(jval *v)
{
	if (!v)
		return;
	for (size_t i = 0; i < v->n; i++) {
		json_free(&v->items[i]);
		if (v->keys)
			free(v->keys[i]);
	}
	free(v->items);
	free(v->keys);
	free(v->str);
	memset(v, 0, sizeof *v);
}

static void json_ws(jparser *p)
{
	while (*p->s == ' ' || *p->s == '\t' || *p->s == '\n' || *p->s == '\r') {
		if (*p->s == '\n')
			p->line++;
		p->s++;
	}
}

static int json_err(jparser *p, const char *what)
{
	return sf_fail(p->e, SF_EFORMAT, "%s:%d: %s", p->path, p->line, what);
}

/* The four hex digits after "\u" at q[i] (i on the 'u'), or -1. */
static long json_hex4(const char *q, size_t i, size_t len)
{
	long cp = 0;
	for (size_t d = 1; d <= 4; d++) {
		char h = i + d < len ? q[i + d] : 0;
		if (!isxdigit((unsigned char)h))
			return -1;
		cp = cp * 16 +
		     (isdigit((unsigned char)h) ? h - '0' : tolower((unsigned char)h) - 'a' + 10);
	}
	return cp;
}

/* The code point of the \u escape whose 'u' is at q[*i]; *i moves to its
 * last digit.  A UTF-16 surrogate pair (\uD83D\uDE00) is one code point, as
 * JSON writers such as Python's json.dumps emit them; a lone half is not a
 * character, so it is refused rather than written out as invalid UTF-8. */
static int json_escape_u(jparser *p, const char *q, size_t *i, size_t len, unsigned *out)
{
	long hi = json_hex4(q, *i, len);
	if (hi < 0)
		return json_err(p, "bad \\u escape");
	*i += 4;
	if (hi == 0) /* would cut the string short: "a.tif\u0000x" read as a.tif */
		return json_err(p, "\\u0000 (NUL) in a string");
	if (hi >= 0xDC00 && hi <= 0xDFFF)
		return json_err(p, "\\u escape: a low surrogate without its high half");
	if (hi >= 0xD800 && hi <= 0xDBFF) {
		long lo = *i + 2 < len && q[*i + 1] == '\\' && q[*i + 2] == 'u'
		              ? json_hex4(q, *i + 2, len)
		              : -1;
		if (lo < 0xDC00 || lo > 0xDFFF)
			return json_err(p, "\\u escape: a high surrogate without its low half");
		*i += 6;
		*out = 0x10000u + (((unsigned)hi - 0xD800u) << 10) + ((unsigned)lo - 0xDC00u);
		return SF_OK;
	}
	*out = (unsigned)hi;
	return SF_OK;
}

/* A string at p->s (on the opening quote) into *out. */
static int json_string(jparser *p, char **out)
{
	const char *q = ++p->s;
	size_t len = 0;
	while (q[len] && q[len] != '"') {
		if (q[len] == '\\' && q[len + 1])
			len++;
		if (q[len] == '\n')
			return json_err(p, "newline inside a string");
		len++;
	}
	if (!q[len])
		return json_err(p, "unterminated string");
	char *o = malloc(3 * len + 1); /* \uXXXX (6 bytes) gives at most 3 */
	if (!o)
		return sf_fail(p->e, SF_ENOMEM, "%s: out of memory", p->path);
	size_t k = 0;
	for (size_t i = 0; i < len; i++) {
		if (q[i] != '\\') {
			o[k++] = q[i];
			continue;
		}
		char c = q[++i];
		switch (c) {
		case '"': o[k++] = '"'; break;
		case '\\': o[k++] = '\\'; break;
		case '/': o[k++] = '/'; break;
		case 'b': o[k++] = '\b'; break;
		case 'f': o[k++] = '\f'; break;
		case 'n': o[k++] = '\n'; break;
		case 'r': o[k++] = '\r'; break;
		case 't': o[k++] = '\t'; break;
		case 'u': {
			unsigned cp = 0;
			int rc = json_escape_u(p, q, &i, len, &cp);
			if (rc != SF_OK) {
				free(o);
				return rc;
			}
			k += sf_utf8_encode(cp, o + k); /* a character: json_escape_u checked */
			break;
		}
		default: free(o); return json_err(p, "bad escape in string");
		}
	}
	o[k] = '\0';
	p->s = q + len + 1;
	*out = o;
	return SF_OK;
}

static int json_value(jparser *p, jval *v, int depth);

/* Append a zeroed item to an array/object value. */
static jval *json_push(jparser *p, jval *v, char *key)
{
	jval *items = realloc(v->items, (v->n + 1) * sizeof *items);
	if (items)
		v->items = items;
	char **keys = NULL;
	if (items && v->type == J_OBJ) {
		keys = realloc(v->keys, (v->n + 1) * sizeof *keys);
		if (keys)
			v->keys = keys;
	}
	if (!items || (v->type == J_OBJ && !keys)) {
		sf_fail(p->e, SF_ENOMEM, "%s: out of memory", p->path);
		return NULL;
	}
	if (v->type == J_OBJ)
		v->keys[v->n] = key;
	memset(&v->items[v->n], 0, sizeof v->items[0]);
	return &v->items[v->n++];
}

static int json_container(jparser *p, jval *v, int depth)
{
	char close = *p->s == '[' ? ']' : '}';
	v->type = close == ']' ? J_ARR : J_OBJ;
	p->s++;
	json_ws(p);
	if (*p->s == close) {
		p->s++;
		return SF_OK;
	}
	for (;;) {
		char *key = NULL;
		json_ws(p);
		if (v->type == J_OBJ) {
			if (*p->s != '"')
				return json_err(p, "expected a \"key\"");
			int rc = json_string(p, &key);
			if (rc != SF_OK)
				return rc;
			json_ws(p);
			if (*p->s != ':') {
				free(key);
				return json_err(p, "expected ':' after a key");
			}
			/* Readers differ on which of two equal keys wins (the
			 * first here, the last in Python), so a file with both
			 * is ambiguous: refuse it rather than pick one. */
			for (size_t k = 0; k < v->n; k++) {
				if (strcmp(v->keys[k], key) == 0) {
					rc = sf_fail(p->e, SF_EFORMAT,
					             "%s:%d: key \"%s\" given twice", p->path,
					             p->line, key);
					free(key);
					return rc;
				}
			}
			p->s++;
		}
		jval *item = json_push(p, v, key);
		if (!item) {
			free(key);
			return SF_ENOMEM;
		}
		int rc = json_value(p, item, depth + 1);
		if (rc != SF_OK)
			return rc;
		json_ws(p);
		if (*p->s == ',') {
			p->s++;
			continue;
		}
		if (*p->s == close) {
			p->s++;
			return SF_OK;
		}
		return json_err(p, close == ']' ? "expected ',' or ']'" : "expected ',' or '}'");
	}
}

static int json_value(jparser *p, jval *v, int depth)
{
	if (depth > MAX_JSON_DEPTH)
		return json_err(p, "nested too deeply");
	json_ws(p);
	v->line = p->line;
	char c = *p->s;
	if (c == '{' || c == '[')
		return json_container(p, v, depth);
	if (c == '"') {
		v->type = J_STR;
		return json_string(p, &v->str);
	}
	static const struct {
		const char *word;
		jtype type;
		double num;
	} words[] = {{"true", J_BOOL, 1}, {"false", J_BOOL, 0}, {"null", J_NULL, 0}};
	for (size_t i = 0; i < 3; i++) {
		size_t n = strlen(words[i].word);
		if (strncmp(p->s, words[i].word, n) == 0) {
			v->type = words[i].type;
			v->num = words[i].num;
			p->s += n;
			return SF_OK;
		}
	}
	if (c == '-' || isdigit((unsigned char)c)) {
		/* JSON's number grammar, checked before strtod (which takes more) */
		const char *q = p->s;
		if (*q == '-')
			q++;
		if (!isdigit((unsigned char)*q))
			return json_err(p, "bad number");
		while (isdigit((unsigned char)*q))
			q++;
		if (*q == '.') {
			q++;
			if (!isdigit((unsigned char)*q))
				return json_err(p, "bad number");
			while (isdigit((unsigned char)*q))
				q++;
		}
		if (*q == 'e' || *q == 'E') {
			q++;
			if (*q == '+' || *q == '-')
				q++;
			if (!isdigit((unsigned char)*q))
				return json_err(p, "bad number");
			while (isdigit((unsigned char)*q))
				q++;
		}
		char tmp[64];
		if ((size_t)(q - p->s) >= sizeof tmp ||
		    !(snprintf(tmp, sizeof tmp, "%.*s", (int)(q - p->s), p->s) > 0) ||
		    !parse_double(tmp, &v->num))
			return json_err(p, "number out of range");
		v->type = J_NUM;
		p->s = q;
		return SF_OK;
	}
	return json_err(p, c ? "unexpected character" : "unexpected end of file");
}

static int json_parse(const char *path, const char *text, jval *root, sf_err *e)
{
	jparser p = {path, text, 1, e};
	memset(root, 0, sizeof *root);
	int rc = json_value(&p, root, 0);
	if (rc == SF_OK) {
		json_ws(&p);
		if (*p.s)
			rc = json_err(&p, "text after the JSON value");
	}
	if (rc != SF_OK)
		json_free(root);
	return rc;
}

static const jval *json_get(const jval *obj, const char *key)
{
	for (size_t i = 0; obj->type == J_OBJ && i < obj->n; i++)
		if (strcmp(obj->keys[i], key) == 0)
			return &obj->items[i];
	return NULL;
}

/* n numbers from array v into out. */
static int json_numbers(const char *path, const jval *v, const char *what, size_t n, double *out,
                        sf_err *e)
{
	if (v->type != J_ARR || v->n != n)
		return sf_fail(e, SF_EFORMAT, "%s:%d: %s must be an array of %zu numbers", path,
		               v->line, what, n);
	for (size_t i = 0; i < n; i++) {
		if (v->items[i].type != J_NUM)
			return sf_fail(e, SF_EFORMAT, "%s:%d: %s must hold numbers", path,
			               v->items[i].line, what);
		out[i] = v->items[i].num;
	}
	return SF_OK;
}

/* --- the displacement field TIFF ------------------------------------------ */

/* libtiff's messages for one open file: the first error is kept for our own
 * message, warnings are dropped (returning 1 stops libtiff's printing). */
static int tiff_error(TIFF *tif, void *user, const char *module, const char *fmt, va_list ap)
{
	(void)tif;
	(void)module;
	char *msg = user;
	if (!msg[0])
		vsnprintf(msg, 200, fmt, ap);
	return 1;
}

static int tiff_warning(TIFF *tif, void *user, const char *module, const char *fmt, va_list ap)
{
	(void)tif;
	(void)user;
	(void)module;
	(void)fmt;
	(void)ap;
	return 1;
}

/* Read a 2-sample float32 TIFF (strips or tiles, contig or separate). */
static int read_field_tiff(const char *path, sf_field_grid **out, sf_err *e)
{
	char tiffmsg[200] = "";
	if (!file_exists(path)) /* absent, or a FIFO or device that open could block on */
		return sf_fail(e, SF_ENOTFOUND, "%s: no such regular file", path);
	TIFFOpenOptions *opts = TIFFOpenOptionsAlloc();
	if (!opts)
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", path);
	TIFFOpenOptionsSetErrorHandlerExtR(opts, tiff_error, tiffmsg);
	TIFFOpenOptionsSetWarningHandlerExtR(opts, tiff_warning, NULL);
	TIFF *tif = TIFFOpenExt(path, "r", opts);
	TIFFOpenOptionsFree(opts);
	if (!tif)
		return sf_fail(e, file_exists(path) ? SF_EFORMAT : SF_ENOTFOUND,
		               "%s: cannot open as a TIFF (%s)", path, tiffmsg);
	uint32_t w = 0, h = 0;
	uint16_t spp = 1, bps = 1, fmt = SAMPLEFORMAT_UINT, planar = PLANARCONFIG_CONTIG;
	TIFFGetField(tif, TIFFTAG_IMAGEWIDTH, &w);
	TIFFGetField(tif, TIFFTAG_IMAGELENGTH, &h);
	TIFFGetFieldDefaulted(tif, TIFFTAG_SAMPLESPERPIXEL, &spp);
	TIFFGetFieldDefaulted(tif, TIFFTAG_BITSPERSAMPLE, &bps);
	TIFFGetFieldDefaulted(tif, TIFFTAG_SAMPLEFORMAT, &fmt);
	TIFFGetFieldDefaulted(tif, TIFFTAG_PLANARCONFIG, &planar);
	int rc = SF_OK;
	sf_field_grid *g = NULL;
	void *buf = NULL;
	if (spp != 2 || bps != 32 || fmt != SAMPLEFORMAT_IEEEFP)
		rc = sf_fail(e, SF_EFORMAT,
		             "%s: a displacement field must be 2-sample float32 (has %u x %u-bit, "
		             "format %u)",
		             path, spp, bps, fmt);
	if (rc == SF_OK && !(g = sf_field_grid_create(SF_FIELD_LINEAR, w, h, e)))
		rc = e ? e->code : SF_ENOMEM;
	int tiled = TIFFIsTiled(tif);
	uint32_t tw = w, th = 1;
	if (rc == SF_OK && tiled) {
		TIFFGetField(tif, TIFFTAG_TILEWIDTH, &tw);
		TIFFGetField(tif, TIFFTAG_TILELENGTH, &th);
		if (tw == 0 || th == 0)
			rc = sf_fail(e, SF_EFORMAT, "%s: tile size 0", path);
	}
	tmsize_t chunk = tiled ? TIFFTileSize(tif) : TIFFScanlineSize(tif);
	if (rc == SF_OK && (chunk <= 0 || !(buf = malloc((size_t)chunk))))
		rc = sf_fail(e, chunk <= 0 ? SF_EFORMAT : SF_ENOMEM, "%s: bad strip/tile size",
		             path);
	unsigned planes = planar == PLANARCONFIG_SEPARATE ? 2 : 1;
	unsigned per = planes == 2 ? 1 : 2; /* samples per pixel in one chunk */
	for (uint32_t y0 = 0; rc == SF_OK && y0 < h; y0 += th) {
		for (uint32_t x0 = 0; rc == SF_OK && x0 < w; x0 += tw) {
			for (unsigned s = 0; rc == SF_OK && s < planes; s++) {
				tmsize_t got =
				    tiled
				        ? TIFFReadTile(tif, buf, x0, y0, 0, (uint16_t)s)
				        : (TIFFReadScanline(tif, buf, y0, (uint16_t)s) == 1 ? chunk
				                                                            : -1);
				if (got < 0) {
					rc = sf_fail(e, SF_EIO,
					             "%s: cannot read row/tile at (%u, %u): %s",
					             path, x0, y0, tiffmsg);
					break;
				}
				const float *src = buf;
				for (uint32_t y = y0; y < y0 + th && y < h; y++) {
					for (uint32_t x = x0; x < x0 + tw && x < w; x++) {
						const float *p =
						    src + ((size_t)(y - y0) * tw + (x - x0)) * per;
						float *d = g->v + 2 * ((size_t)y * w + x);
						if (planes == 2)
							d[s] = p[0];
						else {
							d[0] = p[0];
							d[1] = p[1];
						}
					}
				}
			}
		}
	}
	free(buf);
	TIFFClose(tif);
	if (rc == SF_OK)
		rc = sf_field_grid_finish(g, e);
	if (rc != SF_OK) {
		if (e && rc == SF_EFORMAT && strncmp(e->msg, path, strlen(path)) != 0)
			prefix_error(e, rc, path, 0);
		sf_field_grid_free(g);
		return rc;
	}
	*out = g;
	return SF_OK;
}

/* --- our JSON format ------------------------------------------------------ */

static int json_field(const char *path, const jval *field, sf_transform *t, sf_tf_files *files,
                      sf_err *e)
{
	const jval *file = json_get(field, "file"), *scale = json_get(field, "scale");
	const jval *offset = json_get(field, "offset"), *units = json_get(field, "units");
	if (field->type != J_OBJ || !file || file->type != J_STR)
		return sf_fail(e, SF_EFORMAT, "%s:%d: \"field\" needs a \"file\" string", path,
		               field->line);
	double s[2] = {1, 1}, o[2] = {0, 0};
	int rc = SF_OK;
	if (scale && scale->type == J_NUM)
		s[0] = s[1] = scale->num;
	else if (scale)
		rc = json_numbers(path, scale, "\"scale\"", 2, s, e);
	if (rc == SF_OK && offset)
		rc = json_numbers(path, offset, "\"offset\"", 2, o, e);
	if (rc != SF_OK)
		return rc;
	if (!(s[0] > 0) || !(s[1] > 0))
		return sf_fail(e, SF_EFORMAT, "%s:%d: \"scale\" must be positive", path,
		               scale ? scale->line : field->line);
	int in_pixels = 0;
	if (units) {
		if (units->type != J_STR ||
		    (strcmp(units->str, "field") && strcmp(units->str, "pixels")))
			return sf_fail(e, SF_EFORMAT,
			               "%s:%d: \"units\" must be \"field\" or \"pixels\"", path,
			               units->line);
		in_pixels = strcmp(units->str, "pixels") == 0;
	}
	char full[PATH_MAX], dir[PATH_MAX];
	dir_of(path, dir, sizeof dir);
	if (file->str[0] == '/')
		snprintf(full, sizeof full, "%s", file->str);
	else if ((size_t)snprintf(full, sizeof full, "%s/%s", dir, file->str) >= sizeof full)
		return sf_fail(e, SF_EFORMAT, "%s:%d: field path too long", path, file->line);
	sf_field_grid *g = NULL;
	if ((rc = files_add(files, full, e)) != SF_OK)
		return rc;
	rc = read_field_tiff(full, &g, e);
	if (rc != SF_OK)
		return rc;
	/* node (i, j) sits at level-0 pixel offset + scale * (i, j) */
	double gmap[6] = {1 / s[0], 0, -o[0] / s[0], 0, 1 / s[1], -o[1] / s[1]};
	double vm[4] = {in_pixels ? 1 : s[0], 0, 0, in_pixels ? 1 : s[1]};
	rc = sf_transform_then_field(t, g, gmap, vm, e);
	return rc == SF_OK ? SF_OK : prefix_error(e, rc, path, field->line);
}

/* Our format from its parsed document root into t (initialised by the
 * caller); the field TIFF it names goes into files. */
static int json_ours(const char *path, const jval *root, sf_transform *t, sf_tf_files *files,
                     sf_err *e)
{
	const jval *ver = json_get(root, "scopefs_transform");
	const jval *mat = json_get(root, "matrix"), *field = json_get(root, "field");
	double m[9] = {0, 0, 0, 0, 0, 0, 0, 0, 1};
	int rc = SF_OK;
	if (root->type != J_OBJ)
		rc = sf_fail(e, SF_EFORMAT, "%s:%d: not a JSON object", path, root->line);
	else if (!ver || ver->type != J_NUM)
		rc = sf_fail(e, SF_EFORMAT, "%s:%d: no \"scopefs_transform\": 1", path, root->line);
	else if (ver->num != 1)
		rc = sf_fail(e, SF_EUNSUPPORTED, "%s:%d: scopefs_transform version %g (knows 1)",
		             path, ver->line, ver->num);
	else if (!mat || mat->type != J_ARR || (mat->n != 2 && mat->n != 3))
		rc = sf_fail(e, SF_EFORMAT, "%s:%d: \"matrix\" must be 2 or 3 rows of 3 numbers",
		             path, mat ? mat->line : root->line);
	for (size_t r = 0; rc == SF_OK && r < mat->n; r++)
		rc = json_numbers(path, &mat->items[r], "a \"matrix\" row", 3, m + 3 * r, e);
	if (rc == SF_OK && field)
		rc = json_field(path, field, t, files, e);
	if (rc == SF_OK) {
		rc = sf_transform_then_matrix(t, m, e);
		if (rc != SF_OK)
			rc = sf_fail(e, rc, "%s:%d: \"matrix\" is singular", path, mat->line);
	}
	return rc;
}

/* The parsed JSON document of path into *root (free it with json_free). */
static int json_load(const char *path, jval *root, sf_err *e)
{
	char *text = NULL;
	int rc = read_text(path, &text, e);
	if (rc != SF_OK)
		return rc;
	rc = json_parse(path, text, root, e);
	free(text);
	return rc;
}

int sf_transform_load_json(const char *path, sf_transform *t, sf_err *e)
{
	jval root;
	sf_transform_init(t);
	int rc = json_load(path, &root, e);
	if (rc != SF_OK)
		return rc;
	rc = json_ours(path, &root, t, NULL, e);
	json_free(&root);
	if (rc != SF_OK)
		sf_transform_release(t);
	return check_loaded(path, t, rc, e);
}

/* --- elastix TransformParameters ------------------------------------------ */

typedef struct ex_entry {
	char *key;
	int line;
	size_t n;
	char **vals;
} ex_entry;

/* One elastix parameter map: from a text file (ex_parse) or from a JSON
 * object of {key: [strings]} as wsireg stores them (ex_from_json). */
typedef struct ex_file {
	const char *path;
	int line; /* a JSON map: the line of its '{'; a text file: 0 */
	size_t n;
	ex_entry *ent;
	sf_tf_files *files; /* where the side files it names are listed, or NULL */
} ex_file;

static void ex_free(ex_file *f)
{
	for (size_t i = 0; i < f->n; i++) {
		for (size_t j = 0; j < f->ent[i].n; j++)
			free(f->ent[i].vals[j]);
		free(f->ent[i].vals);
		free(f->ent[i].key);
	}
	free(f->ent);
	f->ent = NULL;
	f->n = 0;
}

/* One token at *s: a "quoted string" or a bare word up to space or ')'. */
static int ex_token(ex_file *f, const char **s, int line, char **out, sf_err *e)
{
	const char *q = *s, *start;
	size_t len;
	if (*q == '"') {
		start = ++q;
		while (*q && *q != '"' && *q != '\n')
			q++;
		if (*q != '"')
			return sf_fail(e, SF_EFORMAT, "%s:%d: unterminated string", f->path, line);
		len = (size_t)(q - start);
		q++;
	} else {
		start = q;
		while (*q && !isspace((unsigned char)*q) && *q != ')' && *q != '(')
			q++;
		len = (size_t)(q - start);
	}
	*out = strndup(start, len);
	if (!*out)
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", f->path);
	*s = q;
	return SF_OK;
}

static int ex_add_value(ex_file *f, ex_entry *en, char *v, sf_err *e)
{
	char **vals = realloc(en->vals, (en->n + 1) * sizeof *vals);
	if (!vals) {
		free(v);
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", f->path);
	}
	en->vals = vals;
	en->vals[en->n++] = v;
	return SF_OK;
}

/* Parse "(Key value ...)" entries; // comments; entries may span lines. */
static int ex_parse(const char *path, const char *text, ex_file *f, sf_err *e)
{
	memset(f, 0, sizeof *f);
	f->path = path;
	const char *s = text;
	int line = 1, rc = SF_OK;
	while (rc == SF_OK && *s) {
		if (*s == '\n') {
			line++;
			s++;
		} else if (isspace((unsigned char)*s)) {
			s++;
		} else if (s[0] == '/' && s[1] == '/') {
			while (*s && *s != '\n')
				s++;
		} else if (*s == '(') {
			ex_entry *ents = realloc(f->ent, (f->n + 1) * sizeof *ents);
			if (!ents) {
				rc = sf_fail(e, SF_ENOMEM, "%s: out of memory", path);
				break;
			}
			f->ent = ents;
			ex_entry *en = &f->ent[f->n++];
			memset(en, 0, sizeof *en);
			en->line = line;
			s++;
			while (*s == ' ' || *s == '\t')
				s++;
			if (!isalpha((unsigned char)*s)) {
				rc = sf_fail(e, SF_EFORMAT,
				             "%s:%d: expected a parameter name after '('", path,
				             line);
				break;
			}
			rc = ex_token(f, &s, line, &en->key, e);
			while (rc == SF_OK) {
				while (*s && isspace((unsigned char)*s)) {
					line += *s == '\n';
					s++;
				}
				if (*s == ')') {
					s++;
					break;
				}
				if (!*s || *s == '(') {
					rc = sf_fail(e, SF_EFORMAT, "%s:%d: (%s ... has no ')'",
					             path, en->line, en->key);
					break;
				}
				char *v = NULL;
				rc = ex_token(f, &s, line, &v, e);
				if (rc == SF_OK)
					rc = ex_add_value(f, en, v, e);
			}
		} else {
			rc = sf_fail(e, SF_EFORMAT, "%s:%d: expected '(' or '//', found '%c'", path,
			             line, *s);
		}
	}
	if (rc != SF_OK)
		ex_free(f);
	return rc;
}

static const ex_entry *ex_find(const ex_file *f, const char *key)
{
	const ex_entry *found = NULL;
	for (size_t i = 0; i < f->n; i++)
		if (strcmp(f->ent[i].key, key) == 0)
			found = &f->ent[i]; /* the last one wins, as in elastix */
	return found;
}

/* The error for a required key that f lacks. */
static int ex_missing(const ex_file *f, const char *key, sf_err *e)
{
	if (f->line > 0)
		return sf_fail(e, SF_EFORMAT, "%s:%d: the elastix map has no \"%s\"", f->path,
		               f->line, key);
	return sf_fail(e, SF_EFORMAT, "%s: no (%s ...) line", f->path, key);
}

/* Exactly n numbers of key into out; a missing key takes def (if given). */
static int ex_numbers(const ex_file *f, const char *key, size_t n, const double *def, double *out,
                      sf_err *e)
{
	const ex_entry *en = ex_find(f, key);
	if (!en) {
		if (!def)
			return ex_missing(f, key, e);
		memcpy(out, def, n * sizeof *out);
		return SF_OK;
	}
	if (en->n != n)
		return sf_fail(e, SF_EFORMAT, "%s:%d: %s has %zu values, expected %zu", f->path,
		               en->line, key, en->n, n);
	for (size_t i = 0; i < n; i++)
		if (!parse_double(en->vals[i], &out[i]))
			return sf_fail(e, SF_EFORMAT, "%s:%d: %s value '%s' is not a number",
			               f->path, en->line, key, en->vals[i]);
	return SF_OK;
}

static const char *ex_string(const ex_file *f, const char *key, const char *def)
{
	const ex_entry *en = ex_find(f, key);
	return en && en->n >= 1 ? en->vals[0] : def;
}

/* The line of key's entry; for a key f lacks, the line of the map itself
 * (a JSON map) or 0 (a text file). */
static int ex_line(const ex_file *f, const char *key)
{
	const ex_entry *en = ex_find(f, key);
	return en ? en->line : f->line;
}

/* elastix writes direction matrices column by column: D(j, i) = v[i*2 + j]. */
static void ex_direction(const double v[4], double d[4])
{
	d[0] = v[0];
	d[2] = v[1];
	d[1] = v[2];
	d[3] = v[3];
}

/* The B-spline transform of f (physical -> physical) into t. */
static int ex_bspline(const ex_file *f, const double *par, size_t npar, sf_transform *t, sf_err *e)
{
	static const double zero2[2] = {0, 0}, ident4[4] = {1, 0, 0, 1};
	double size[2], index[2], sp[2], origin[2], dirv[4], order;
	static const double three = 3;
	int rc = ex_numbers(f, "GridSize", 2, NULL, size, e);
	if (rc == SF_OK)
		rc = ex_numbers(f, "GridIndex", 2, zero2, index, e);
	if (rc == SF_OK)
		rc = ex_numbers(f, "GridSpacing", 2, NULL, sp, e);
	if (rc == SF_OK)
		rc = ex_numbers(f, "GridOrigin", 2, NULL, origin, e);
	if (rc == SF_OK)
		rc = ex_numbers(f, "GridDirection", 4, ident4, dirv, e);
	if (rc == SF_OK)
		rc = ex_numbers(f, "BSplineTransformSplineOrder", 1, &three, &order, e);
	if (rc != SF_OK)
		return rc;
	if (order != 3)
		return sf_fail(e, SF_EUNSUPPORTED, "%s:%d: B-spline order %g (only 3 is supported)",
		               f->path, ex_line(f, "BSplineTransformSplineOrder"), order);
	if (strcmp(ex_string(f, "UseCyclicTransform", "false"), "false") != 0)
		return sf_fail(e, SF_EUNSUPPORTED, "%s:%d: cyclic B-spline transforms", f->path,
		               ex_line(f, "UseCyclicTransform"));
	if (!(size[0] >= 1 && size[1] >= 1 && size[0] <= (1 << 20) && size[1] <= (1 << 20) &&
	      size[0] == floor(size[0]) && size[1] == floor(size[1])))
		return sf_fail(e, SF_EFORMAT, "%s:%d: bad GridSize", f->path,
		               ex_line(f, "GridSize"));
	size_t nodes = (size_t)size[0] * (size_t)size[1];
	if (npar != 2 * nodes)
		return sf_fail(
		    e, SF_EFORMAT,
		    "%s:%d: %zu TransformParameters for a %gx%g B-spline grid (needs %zu)", f->path,
		    ex_line(f, "TransformParameters"), npar, size[0], size[1], 2 * nodes);
	/* grid index of physical p: (Dg diag(sp))^-1 (p - origin) - GridIndex */
	double d[4], gm[9], ginv[9];
	ex_direction(dirv, d);
	pixel_to_physical(origin, d, sp, zero2, gm);
	if (sf_mat3_inverse(gm, ginv) != SF_OK)
		return sf_fail(e, SF_EFORMAT, "%s:%d: singular GridSpacing/GridDirection", f->path,
		               ex_line(f, "GridSpacing"));
	double gmap[6] = {ginv[0], ginv[1], ginv[2] - index[0],
	                  ginv[3], ginv[4], ginv[5] - index[1]};
	sf_field_grid *g =
	    sf_field_grid_create(SF_FIELD_BSPLINE3, (uint32_t)size[0], (uint32_t)size[1], e);
	if (!g)
		return e ? e->code : SF_ENOMEM;
	for (size_t i = 0; i < nodes; i++) {
		g->v[2 * i] = (float)par[i];
		g->v[2 * i + 1] = (float)par[nodes + i];
	}
	rc = sf_field_grid_finish(g, e);
	if (rc != SF_OK) {
		sf_field_grid_free(g);
		return sf_fail(e, rc, "%s:%d: B-spline coefficient is not finite", f->path,
		               ex_line(f, "TransformParameters"));
	}
	static const double vm[4] = {1, 0, 0, 1};
	rc = sf_transform_then_field(t, g, gmap, vm, e);
	return rc == SF_OK ? SF_OK : prefix_error(e, rc, f->path, ex_line(f, "Transform"));
}

/* elastix's DeformationFieldTransform: T(p) = p + D(p), D a physical
 * displacement image (MetaImage) read bilinearly.  elastix's default
 * interpolation order is 0 (nearest), which we do not reproduce. */
static int ex_deformation_field(const ex_file *f, sf_transform *t, sf_err *e)
{
	static const double vm[4] = {1, 0, 0, 1};
	const char *name = ex_string(f, "DeformationFieldFileName", NULL);
	char path[PATH_MAX], data[PATH_MAX];
	double order, gmap[6];
	sf_field_grid *g;
	int rc = ex_numbers(f, "DeformationFieldInterpolationOrder", 1, (double[]){0}, &order, e);

	if (rc != SF_OK)
		return rc;
	if (!name)
		return ex_missing(f, "DeformationFieldFileName", e);
	if (order != 1)
		return sf_fail(
		    e, SF_EUNSUPPORTED,
		    "%s:%d: DeformationFieldInterpolationOrder %g (only 1, linear, is read)",
		    f->path, ex_line(f, "DeformationFieldInterpolationOrder"), order);
	if (!resolve_near(f->path, name, path, sizeof path))
		return sf_fail(e, SF_ENOTFOUND, "%s:%d: deformation field %s not found", f->path,
		               ex_line(f, "DeformationFieldFileName"), name);
	if ((rc = sf_metaimage_read_field_data(path, &g, gmap, data, e)) != SF_OK)
		return prefix_error(e, rc, f->path, ex_line(f, "DeformationFieldFileName"));
	if ((rc = files_add(f->files, path, e)) != SF_OK ||
	    (rc = files_add(f->files, data, e)) != SF_OK) {
		sf_field_grid_free(g);
		return rc;
	}
	rc = sf_transform_then_field(t, g, gmap, vm, e);
	return rc == SF_OK ? SF_OK : prefix_error(e, rc, f->path, ex_line(f, "Transform"));
}

/* The transform f itself (without its initial transform), physical units. */
static int ex_own_transform(const ex_file *f, sf_transform *t, sf_err *e)
{
	static const double zero2[2] = {0, 0};
	const char *name = ex_string(f, "Transform", NULL);
	const ex_entry *pe = ex_find(f, "TransformParameters");
	if (!name)
		return ex_missing(f, "Transform", e);
	if (strcmp(name, "DeformationFieldTransform") == 0)
		return ex_deformation_field(f, t, e); /* no parameters: the field is an image */
	if (!pe)
		return ex_missing(f, "TransformParameters", e);
	size_t np = pe->n;
	double nexpect;
	int rc = ex_numbers(f, "NumberOfParameters", 1, (double[]){(double)np}, &nexpect, e);
	if (rc != SF_OK)
		return rc;
	if (nexpect != (double)np)
		return sf_fail(e, SF_EFORMAT,
		               "%s:%d: %zu TransformParameters, NumberOfParameters says %g",
		               f->path, pe->line, np, nexpect);
	double *par = malloc((np ? np : 1) * sizeof *par);
	if (!par)
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", f->path);
	rc = ex_numbers(f, "TransformParameters", np, NULL, par, e);
	double c[2], a[4], m[9];
	if (rc == SF_OK)
		rc = ex_numbers(f, "CenterOfRotationPoint", 2, zero2, c, e);
	struct {
		const char *name;
		size_t n;
	} known[] = {{"TranslationTransform", 2},
	             {"EulerTransform", 3},
	             {"SimilarityTransform", 4},
	             {"AffineTransform", 6}};
	int kind = -1;
	for (int k = 0; k < 4; k++)
		if (strcmp(name, known[k].name) == 0)
			kind = k;
	if (rc == SF_OK && kind >= 0 && np != known[kind].n)
		rc = sf_fail(e, SF_EFORMAT, "%s:%d: %s takes %zu parameters in 2D, has %zu",
		             f->path, pe->line, name, known[kind].n, np);
	if (rc == SF_OK && kind >= 0) {
		const double *tr = par + np - 2; /* translation is last in all four */
		switch (kind) {
		case 0: rotation(1, 0, a); break;
		case 1: rotation(1, par[0], a); break;
		case 2: rotation(par[0], par[1], a); break;
		default: memcpy(a, par, sizeof a); break;
		}
		centred_affine(a, tr, c, m);
		rc = sf_transform_then_matrix(t, m, e);
		if (rc != SF_OK)
			rc = sf_fail(e, rc, "%s:%d: singular %s", f->path, pe->line, name);
	} else if (rc == SF_OK && (strcmp(name, "BSplineTransform") == 0 ||
	                           strcmp(name, "RecursiveBSplineTransform") == 0)) {
		rc = ex_bspline(f, par, np, t, e);

	} else if (rc == SF_OK) {
		rc = sf_fail(e, SF_EUNSUPPORTED, "%s:%d: transform %s is not supported", f->path,
		             ex_line(f, "Transform"), name);
	}
	free(par);
	return rc;
}

/* The transform of one 2D map f alone (no initial transform), physical ->
 * physical, into own (initialised here; released on failure). */
static int ex_map_transform(const ex_file *f, sf_transform *own, sf_err *e)
{
	double dim[2];
	sf_transform_init(own);
	int rc = ex_numbers(f, "FixedImageDimension", 1, (double[]){2}, dim, e);
	if (rc == SF_OK)
		rc = ex_numbers(f, "MovingImageDimension", 1, (double[]){2}, dim + 1, e);
	if (rc == SF_OK && (dim[0] != 2 || dim[1] != 2))
		rc = sf_fail(e, SF_EUNSUPPORTED, "%s:%d: %gD images (only 2D)", f->path,
		             ex_line(f, "FixedImageDimension"), dim[0] != 2 ? dim[0] : dim[1]);
	if (rc == SF_OK)
		rc = ex_own_transform(f, own, e);
	if (rc != SF_OK)
		sf_transform_release(own);
	return rc;
}

/* f and its chain of initial transforms, physical -> physical, into t;
 * every file of the chain, and those they name, go into files. */
static int ex_chain(const char *path, int depth, sf_transform *t, ex_file *top, sf_tf_files *files,
                    sf_err *e)
{
	sf_transform_init(t);
	if (depth > MAX_CHAIN_DEPTH)
		return sf_fail(e, SF_EFORMAT, "%s: chain of initial transforms deeper than %d",
		               path, MAX_CHAIN_DEPTH);
	char *text = NULL;
	ex_file f;
	int rc = files_add(files, path, e);
	if (rc == SF_OK)
		rc = read_text(path, &text, e);
	if (rc != SF_OK)
		return rc;
	rc = ex_parse(path, text, &f, e);
	free(text);
	if (rc != SF_OK)
		return rc;
	f.files = files;
	sf_transform own;
	rc = ex_map_transform(&f, &own, e);
	const char *init = ex_string(&f, "InitialTransformParametersFileName", NULL);
	if (!init)
		init = ex_string(&f, "InitialTransformParameterFileName", "NoInitialTransform");
	if (rc == SF_OK && strcmp(init, "NoInitialTransform") != 0) {
		char next[PATH_MAX];
		int line = ex_line(&f, "InitialTransformParametersFileName");
		if (!line)
			line = ex_line(&f, "InitialTransformParameterFileName");
		const char *how = ex_string(&f, "HowToCombineTransforms", "Compose");
		if (strcmp(how, "Compose") && strcmp(how, "Add"))
			rc = sf_fail(e, SF_EFORMAT,
			             "%s:%d: HowToCombineTransforms %s (Compose or Add)", f.path,
			             ex_line(&f, "HowToCombineTransforms"), how);
		else if (!resolve_near(path, init, next, sizeof next))
			rc = sf_fail(e, SF_ENOTFOUND, "%s:%d: initial transform %s not found",
			             f.path, line, init);
		if (rc == SF_OK)
			rc = ex_chain(next, depth + 1, t, NULL, files, e);
		/* Compose: T(x) = own(initial(x)); Add: own(x) + initial(x) - x */
		if (rc == SF_OK)
			rc = strcmp(how, "Add") == 0 ? sf_transform_add(t, &own, e)
			                             : sf_transform_then(t, &own, e);
		if (rc != SF_OK && e && strstr(e->msg, path) == NULL)
			prefix_error(e, rc, path, line);
	} else if (rc == SF_OK) {
		*t = own;
		sf_transform_init(&own);
	}
	sf_transform_release(&own);
	if (rc != SF_OK)
		sf_transform_release(t);
	if (top && rc == SF_OK)
		*top = f;
	else
		ex_free(&f);
	return rc;
}

static int list_elastix_dir(const char *dir, char *out, size_t cap, sf_err *e)
{
	DIR *d = opendir(dir);
	if (!d)
		return sf_fail(e, SF_EIO, "%s: %s", dir, strerror(errno));
	long best = -1;
	struct dirent *de;
	while ((de = readdir(d))) {
		long n;
		char tail[8];
		if (sscanf(de->d_name, "TransformParameters.%ld.%7s", &n, tail) == 2 &&
		    strcmp(tail, "txt") == 0 && n > best)
			best = n;
	}
	closedir(d);
	if (best < 0)
		return sf_fail(e, SF_ENOTFOUND, "%s: no TransformParameters.N.txt in the folder",
		               dir);
	if ((size_t)snprintf(out, cap, "%s/TransformParameters.%ld.txt", dir, best) >= cap)
		return sf_fail(e, SF_EINVAL, "%s: path too long", dir);
	return SF_OK;
}

/* The pixel -> physical matrices of the reference (ref) and the moving slide
 * (mov): the caller's pixel sizes where known, else the output geometry of
 * map f (Spacing, Origin, Direction, Index), which is what transformix and
 * wsireg resample onto; the moving slide then takes the reference's. */
static int ex_geometry(const ex_file *f, const sf_tf_units *units, double ref[9], double mov[9],
                       sf_err *e)
{
	static const double zero2[2] = {0, 0}, one2[2] = {1, 1}, ident4[4] = {1, 0, 0, 1};
	double sp[2], origin[2], dirv[4], index[2], d[4];
	int rc = ex_numbers(f, "Spacing", 2, one2, sp, e);
	if (rc == SF_OK)
		rc = ex_numbers(f, "Origin", 2, zero2, origin, e);
	if (rc == SF_OK)
		rc = ex_numbers(f, "Direction", 4, ident4, dirv, e);
	if (rc == SF_OK)
		rc = ex_numbers(f, "Index", 2, zero2, index, e);
	if (rc != SF_OK)
		return rc;
	if (units && units->ref_px[0] > 0 && units->ref_px[1] > 0) {
		double m[9] = {units->ref_px[0], 0, 0, 0, units->ref_px[1], 0, 0, 0, 1};
		memcpy(ref, m, sizeof m);
	} else {
		ex_direction(dirv, d);
		pixel_to_physical(origin, d, sp, index, ref);
	}
	moving_geometry(units, ref, mov);
	return SF_OK;
}

/* sf_transform_load_elastix, listing the files read into files. */
static int load_elastix(const char *path, const sf_tf_units *units, sf_transform *t,
                        sf_tf_files *files, sf_err *e)
{
	char file[PATH_MAX];
	struct stat st;
	sf_transform_init(t);
	if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
		int rc = list_elastix_dir(path, file, sizeof file, e);
		if (rc != SF_OK)
			return rc;
		path = file;
	}
	ex_file top;
	double ref[9], mov[9];
	int rc = ex_chain(path, 0, t, &top, files, e);
	if (rc != SF_OK)
		return rc;
	rc = ex_geometry(&top, units, ref, mov, e);
	if (rc == SF_OK)
		rc = physical_to_pixels(t, ref, mov, path, e);
	ex_free(&top);
	if (rc != SF_OK)
		sf_transform_release(t);
	return check_loaded(path, t, rc, e);
}

int sf_transform_load_elastix(const char *path, const sf_tf_units *units, sf_transform *t,
                              sf_err *e)
{
	return load_elastix(path, units, t, NULL, e);
}

/* --- wsireg: elastix maps in a JSON file --------------------------------- */

/* One JSON value of a map entry as elastix text: strings as they are,
 * numbers in full precision (wsireg writes strings; numbers are accepted). */
static int ex_json_value(const char *path, const jval *v, char **out, sf_err *e)
{
	char num[32];
	if (v->type == J_STR) {
		*out = strdup(v->str);
	} else if (v->type == J_NUM) {
		snprintf(num, sizeof num, "%.17g", v->num);
		*out = strdup(num);
	} else {
		return sf_fail(e, SF_EFORMAT, "%s:%d: elastix map values must be strings", path,
		               v->line);
	}
	return *out ? SF_OK : sf_fail(e, SF_ENOMEM, "%s: out of memory", path);
}

/* An elastix map from a JSON object {key: [values]} (a bare value counts as
 * a list of one), so the text reader's code reads it.  Lines are the JSON's. */
static int ex_from_json(const char *path, const jval *obj, ex_file *f, sf_err *e)
{
	memset(f, 0, sizeof *f);
	f->path = path;
	f->line = obj->line;
	if (obj->type != J_OBJ)
		return sf_fail(e, SF_EFORMAT, "%s:%d: an elastix map must be a JSON object", path,
		               obj->line);
	if (obj->n && !(f->ent = calloc(obj->n, sizeof *f->ent)))
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", path);
	int rc = SF_OK;
	for (size_t i = 0; rc == SF_OK && i < obj->n; i++) {
		const jval *v = &obj->items[i];
		ex_entry *en = &f->ent[f->n++];
		en->line = v->line;
		if (!(en->key = strdup(obj->keys[i]))) {
			rc = sf_fail(e, SF_ENOMEM, "%s: out of memory", path);
			break;
		}
		size_t count = v->type == J_ARR ? v->n : 1;
		const jval *items = v->type == J_ARR ? v->items : v;
		for (size_t j = 0; rc == SF_OK && j < count; j++) {
			char *text = NULL;
			rc = ex_json_value(path, &items[j], &text, e);
			if (rc == SF_OK)
				rc = ex_add_value(f, en, text, e);
		}
	}
	if (rc != SF_OK)
		ex_free(f);
	return rc;
}

/* Whether a JSON value is an elastix map: an object with a "Transform" key. */
static int is_elastix_map(const jval *v)
{
	return v->type == J_OBJ && json_get(v, "Transform") != NULL;
}

/* Whether root is meant as a wsireg transformations file rather than ours:
 * an object without our keys whose values are all objects, lists or null.
 * (wsireg_load then checks that they hold elastix maps.) */
static int is_wsireg(const jval *root)
{
	if (root->type != J_OBJ || root->n == 0 || json_get(root, "scopefs_transform") ||
	    json_get(root, "matrix"))
		return 0;
	for (size_t i = 0; i < root->n; i++) {
		jtype type = root->items[i].type;
		if (type != J_OBJ && type != J_ARR && type != J_NULL)
			return 0;
	}
	return 1;
}

/* A wsireg entry (the value of one key) as maps in the order they apply to a
 * point: a single map; an edge's list in list order (elastix's chain: its
 * first map applies first); but the list under the key "initial", whose maps
 * wsireg composes as separate steps, last first.  wsireg_count: how many
 * maps; wsireg_at(key, v, i): the i-th to apply. */
static size_t wsireg_count(const jval *v)
{
	return v->type == J_OBJ ? 1 : v->type == J_ARR ? v->n : 0;
}

static const jval *wsireg_at(const char *key, const jval *v, size_t i)
{
	if (v->type == J_OBJ)
		return v;
	return strcmp(key, "initial") == 0 ? &v->items[v->n - 1 - i] : &v->items[i];
}

/* The whole wsireg transform of root into t (initialised by the caller):
 * the maps of the LAST key apply first, those of the first key last (see
 * docs/transforms.md).  Physical units as for elastix files, with the output
 * geometry of the file's last map, as wsireg resamples onto it. */
static int wsireg_load(const char *path, const jval *root, const sf_tf_units *units,
                       sf_transform *t, sf_tf_files *files, sf_err *e)
{
	const jval *last = NULL;
	double ref[9], mov[9];
	int rc = SF_OK;
	for (size_t k = 0; rc == SF_OK && k < root->n; k++) {
		const jval *v = &root->items[k];
		if (wsireg_count(v))
			last = v->type == J_OBJ ? v : &v->items[v->n - 1];
		for (size_t i = 0; i < wsireg_count(v) && rc == SF_OK; i++)
			if (!is_elastix_map(wsireg_at(root->keys[k], v, i)))
				rc = sf_fail(e, SF_EFORMAT,
				             "%s:%d: \"%s\" must hold elastix maps (objects with a "
				             "\"Transform\")",
				             path, v->line, root->keys[k]);
	}
	if (rc == SF_OK && !last)
		rc = sf_fail(e, SF_EFORMAT,
		             "%s:%d: no elastix maps (not a wsireg transformations file)", path,
		             root->line);
	for (size_t k = root->n; rc == SF_OK && k > 0; k--) {
		const jval *v = &root->items[k - 1];
		for (size_t i = 0; rc == SF_OK && i < wsireg_count(v); i++) {
			ex_file f;
			sf_transform step;
			const jval *map = wsireg_at(root->keys[k - 1], v, i);
			rc = ex_from_json(path, map, &f, e);
			if (rc != SF_OK)
				break;
			f.files = files;
			rc = ex_map_transform(&f, &step, e);
			ex_free(&f);
			if (rc == SF_OK && (rc = sf_transform_then(t, &step, e)) != SF_OK && e &&
			    !strstr(e->msg, path))
				prefix_error(e, rc, path, map->line);
		}
	}
	if (rc == SF_OK) {
		ex_file geo;
		rc = ex_from_json(path, last, &geo, e);
		if (rc == SF_OK) {
			rc = ex_geometry(&geo, units, ref, mov, e);
			ex_free(&geo);
		}
	}
	if (rc == SF_OK)
		rc = physical_to_pixels(t, ref, mov, path, e);
	return rc;
}

/* A JSON transform file: ours, or wsireg's transformations file. */
static int load_json_any(const char *path, const sf_tf_units *units, sf_transform *t,
                         sf_tf_files *files, sf_err *e)
{
	jval root;
	sf_transform_init(t);
	int rc = json_load(path, &root, e);
	if (rc != SF_OK)
		return rc;
	rc = is_wsireg(&root) ? wsireg_load(path, &root, units, t, files, e)
	                      : json_ours(path, &root, t, files, e);
	json_free(&root);
	if (rc != SF_OK)
		sf_transform_release(t);
	return check_loaded(path, t, rc, e);
}

/* --- ITK transform files -------------------------------------------------- */

/* A field of 4096 x 4096 nodes: bounds what a malformed file can allocate. */
#define ITK_MAX_PARAMETERS ((size_t)2 << 24)

typedef struct itk_part {
	char name[128];
	int line;
	size_t np, nf;
	double *par; /* np values, malloc'd (a displacement field has 2 per node) */
	double fixed[16];
	int has_par, has_fixed;
} itk_part;

static void itk_parts_free(itk_part *parts, size_t n)
{
	for (size_t i = 0; parts && i < n; i++)
		free(parts[i].par);
	free(parts);
}

/* Every number of s into *out (grown as needed, at most cap values);
 * SF_EFORMAT on a non-number or too many. */
static int itk_numbers(const char *path, int line, const char *s, double **out, size_t cap,
                       size_t *n, sf_err *e)
{
	size_t room = 0;
	*n = 0;
	for (;;) {
		while (isspace((unsigned char)*s))
			s++;
		if (!*s)
			return SF_OK;
		char *end;
		errno = 0;
		double v = strtod(s, &end);
		if (end == s || !isfinite(v) || errno == ERANGE)
			return sf_fail(e, SF_EFORMAT, "%s:%d: '%.20s' is not a number", path, line,
			               s);
		if (*n == cap)
			return sf_fail(e, SF_EFORMAT, "%s:%d: more than %zu values", path, line,
			               cap);
		if (*n == room) {
			size_t want = room ? room * 2 : 16;
			double *grown = realloc(*out, want * sizeof *grown);
			if (!grown)
				return sf_fail(e, SF_ENOMEM, "%s:%d: out of memory", path, line);
			*out = grown;
			room = want;
		}
		(*out)[(*n)++] = v;
		s = end;
	}
}

/* One ITK transform as a 3x3 physical matrix. */
static int itk_matrix(const char *path, const itk_part *p, double m[9], sf_err *e)
{
	static const double zero2[2] = {0, 0};
	char base[128];
	snprintf(base, sizeof base, "%s", p->name);
	char *suffix = strstr(base, "_double_");
	if (!suffix)
		suffix = strstr(base, "_float_");
	if (!suffix)
		return sf_fail(e, SF_EFORMAT,
		               "%s:%d: transform type %s has no _double_/_float_ suffix", path,
		               p->line, p->name);
	const char *dims = strchr(suffix + 1, '_');
	if (!dims || strcmp(dims, "_2_2") != 0)
		return sf_fail(e, SF_EUNSUPPORTED, "%s:%d: %s is not 2D", path, p->line, p->name);
	*suffix = '\0';
	const double *c = p->nf >= 2 ? p->fixed : zero2;
	double a[4];
	size_t want_p, want_f = 2;
	int kind;
	if (!strcmp(base, "AffineTransform") || !strcmp(base, "MatrixOffsetTransformBase"))
		kind = 0, want_p = 6;
	else if (!strcmp(base, "Euler2DTransform") || !strcmp(base, "Rigid2DTransform"))
		kind = 1, want_p = 3;
	else if (!strcmp(base, "Similarity2DTransform"))
		kind = 2, want_p = 4;
	else if (!strcmp(base, "TranslationTransform"))
		kind = 3, want_p = 2, want_f = 0;
	else if (!strcmp(base, "IdentityTransform"))
		kind = 4, want_p = 0, want_f = 0;
	else
		return sf_fail(e, SF_EUNSUPPORTED, "%s:%d: transform type %s is not supported",
		               path, p->line, p->name);
	if (p->np != want_p || (want_f && p->nf != want_f && p->nf != 0))
		return sf_fail(e, SF_EFORMAT,
		               "%s:%d: %s takes %zu Parameters and %zu FixedParameters", path,
		               p->line, p->name, want_p, want_f);
	switch (kind) {
	case 0: memcpy(a, p->par, sizeof a); break;
	case 1: rotation(1, p->par[0], a); break;
	case 2: rotation(p->par[0], p->par[1], a); break;
	default: rotation(1, 0, a); break;
	}
	const double *tr = want_p >= 2 ? p->par + want_p - 2 : zero2;
	centred_affine(a, tr, want_f ? c : zero2, m);
	return SF_OK;
}

static int itk_parse(const char *path, char *text, itk_part **parts, size_t *nparts, sf_err *e)
{
	*parts = NULL;
	*nparts = 0;
	int line = 0, rc = SF_OK, header = 0;
	char *save = NULL;
	for (char *l = text; l && rc == SF_OK; l = save) {
		save = strchr(l, '\n');
		if (save)
			*save++ = '\0';
		line++;
		size_t len = strlen(l);
		while (len && isspace((unsigned char)l[len - 1]))
			l[--len] = '\0';
		while (isspace((unsigned char)*l))
			l++;
		if (!*l)
			continue;
		if (!header) {
			if (strncmp(l, "#Insight Transform File", 23) != 0)
				return sf_fail(e, SF_EFORMAT,
				               "%s:%d: not an ITK transform file (no "
				               "\"#Insight Transform File\" header)",
				               path, line);
			header = 1;
			continue;
		}
		if (l[0] == '#')
			continue;
		char *colon = strchr(l, ':');
		if (!colon) {
			rc = sf_fail(e, SF_EFORMAT, "%s:%d: expected 'Key: value'", path, line);
			break;
		}
		*colon = '\0';
		const char *val = colon + 1;
		while (isspace((unsigned char)*val))
			val++;
		itk_part *cur = *nparts ? &(*parts)[*nparts - 1] : NULL;
		if (!strcmp(l, "Transform")) {
			itk_part *np = realloc(*parts, (*nparts + 1) * sizeof *np);
			if (!np) {
				rc = sf_fail(e, SF_ENOMEM, "%s: out of memory", path);
				break;
			}
			*parts = np;
			cur = &np[(*nparts)++];
			memset(cur, 0, sizeof *cur);
			cur->line = line;
			snprintf(cur->name, sizeof cur->name, "%s", val);
		} else if (!strcmp(l, "Parameters") || !strcmp(l, "FixedParameters")) {
			int fixed = l[0] == 'F';
			if (!cur || (fixed ? cur->has_fixed : cur->has_par)) {
				rc = sf_fail(e, SF_EFORMAT,
				             "%s:%d: %s without its own Transform line", path, line,
				             l);
				break;
			}
			double *fixed_buf = NULL;
			rc = itk_numbers(path, line, val, fixed ? &fixed_buf : &cur->par,
			                 fixed ? 16 : ITK_MAX_PARAMETERS,
			                 fixed ? &cur->nf : &cur->np, e);
			if (fixed && cur->nf)
				memcpy(cur->fixed, fixed_buf, cur->nf * sizeof *fixed_buf);
			free(fixed_buf);
			*(fixed ? &cur->has_fixed : &cur->has_par) = 1;
		} else {
			rc = sf_fail(e, SF_EFORMAT, "%s:%d: unknown key '%s'", path, line, l);
		}
	}
	if (rc == SF_OK && !header)
		rc = sf_fail(e, SF_EFORMAT, "%s:1: empty file", path);
	if (rc == SF_OK && *nparts == 0)
		rc = sf_fail(e, SF_EFORMAT, "%s:%d: no Transform line", path, line);
	if (rc != SF_OK) {
		itk_parts_free(*parts, *nparts);
		*parts = NULL;
	}
	return rc;
}

/* ITK's DisplacementFieldTransform as its text writer stores it: Parameters
 * are the field's (dx, dy) per node, x fastest, in physical units;
 * FixedParameters are size (2), origin (2), spacing (2) and direction (4,
 * row-major) of the field image.  T(p) = p + D(p), D bilinear between nodes.
 * (ITK gives zero displacement outside the field; we clamp to the edge
 * nodes, which differs only where the field does not cover the slide.) */
static int itk_field(const char *path, const itk_part *p, sf_transform *t, sf_err *e)
{
	const double *f = p->fixed;
	double det, inv[4], gmap[6];
	static const double vm[4] = {1, 0, 0, 1};
	sf_field_grid *g;

	if (p->nf != 10)
		return sf_fail(e, SF_EFORMAT,
		               "%s:%d: %s takes 10 FixedParameters (size, origin, spacing, "
		               "direction)",
		               path, p->line, p->name);
	if (f[0] < 1 || f[1] < 1 || f[0] != floor(f[0]) || f[1] != floor(f[1]) ||
	    f[0] > (1 << 20) || f[1] > (1 << 20) || f[4] <= 0 || f[5] <= 0)
		return sf_fail(e, SF_EFORMAT, "%s:%d: bad field size or spacing", path, p->line);
	uint32_t w = (uint32_t)f[0], h = (uint32_t)f[1];
	if (p->np != 2 * (size_t)w * h)
		return sf_fail(e, SF_EFORMAT, "%s:%d: a %ux%u field needs %zu Parameters, not %zu",
		               path, p->line, w, h, 2 * (size_t)w * h, p->np);
	det = f[6] * f[9] - f[7] * f[8];
	if (fabs(det) < 1e-12)
		return sf_fail(e, SF_EFORMAT, "%s:%d: singular field direction", path, p->line);
	inv[0] = f[9] / det;
	inv[1] = -f[7] / det;
	inv[2] = -f[8] / det;
	inv[3] = f[6] / det;
	/* grid index = diag(1 / spacing) * direction^-1 * (p - origin) */
	gmap[0] = inv[0] / f[4];
	gmap[1] = inv[1] / f[4];
	gmap[2] = -(gmap[0] * f[2] + gmap[1] * f[3]);
	gmap[3] = inv[2] / f[5];
	gmap[4] = inv[3] / f[5];
	gmap[5] = -(gmap[3] * f[2] + gmap[4] * f[3]);
	if (!(g = sf_field_grid_create(SF_FIELD_LINEAR, w, h, e)))
		return e->code;
	for (size_t i = 0; i < p->np; i++)
		g->v[i] = (float)p->par[i];
	int rc = sf_field_grid_finish(g, e);
	if (rc != SF_OK) {
		sf_field_grid_free(g);
		return prefix_error(e, rc, path, p->line);
	}
	rc = sf_transform_then_field(t, g, gmap, vm, e);
	return rc == SF_OK ? SF_OK : prefix_error(e, rc, path, p->line);
}

int sf_transform_load_itk(const char *path, const sf_tf_units *units, sf_transform *t, sf_err *e)
{
	sf_transform_init(t);
	char *text = NULL;
	itk_part *parts = NULL;
	size_t n = 0;
	int rc = read_text(path, &text, e);
	if (rc != SF_OK)
		return rc;
	rc = itk_parse(path, text, &parts, &n, e);
	free(text);
	if (rc != SF_OK)
		return rc;
	size_t first = 0;
	if (!strncmp(parts[0].name, "CompositeTransform_", 19)) {
		first = 1;
		if (n == 1)
			rc = sf_fail(e, SF_EFORMAT, "%s:%d: empty CompositeTransform", path,
			             parts[0].line);
	} else if (n > 1) {
		rc = sf_fail(e, SF_EFORMAT, "%s:%d: %zu transforms without a CompositeTransform",
		             path, parts[1].line, n);
	}
	/* a composite applies its LAST transform first: T0(T1(...Tn(x))) */
	for (size_t i = n; rc == SF_OK && i > first; i--) {
		double m[9];
		if (!strncmp(parts[i - 1].name, "DisplacementFieldTransform_", 27)) {
			rc = itk_field(path, &parts[i - 1], t, e);
			continue;
		}
		rc = itk_matrix(path, &parts[i - 1], m, e);
		if (rc == SF_OK && sf_transform_then_matrix(t, m, e) != SF_OK)
			rc = sf_fail(e, SF_EFORMAT, "%s:%d: singular transform", path,
			             parts[i - 1].line);
	}
	itk_parts_free(parts, n);
	if (rc == SF_OK) {
		double ref[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1}, mov[9];
		if (units && units->ref_px[0] > 0 && units->ref_px[1] > 0) {
			ref[0] = units->ref_px[0];
			ref[4] = units->ref_px[1];
		}
		moving_geometry(units, ref, mov);
		rc = physical_to_pixels(t, ref, mov, path, e);
	}
	if (rc != SF_OK)
		sf_transform_release(t);
	return check_loaded(path, t, rc, e);
}

/* --- dispatch ------------------------------------------------------------- */

static int ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), k = strlen(suffix);
	return n >= k && strcasecmp(s + n - k, suffix) == 0;
}

/* Files the format detection would otherwise hand to the elastix reader,
 * whose message ("expected '('") would confuse their writer: UTF-16 text
 * (PowerShell 5's `>` writes it), an empty file, and a .json file or a JSON
 * array that is not the object every JSON transform is. */
static int sniff_refusal(const char *path, const char *head, size_t n, off_t size, sf_err *e)
{
	const unsigned char *u = (const unsigned char *)head;
	const char *s = head + utf8_bom(head);

	int ascii_le =
	    n >= 4 && isprint(u[0]) && !u[1] && (isprint(u[2]) || isspace(u[2])) && !u[3];
	int ascii_be =
	    n >= 4 && !u[0] && isprint(u[1]) && !u[2] && (isprint(u[3]) || isspace(u[3]));

	if (n >= 2 && ((u[0] == 0xFF && u[1] == 0xFE) || (u[0] == 0xFE && u[1] == 0xFF) ||
	               ascii_le || ascii_be))
		return sf_fail(e, SF_EFORMAT, "%s: UTF-16 text, not a transform: save it as UTF-8",
		               path);
	while (isspace((unsigned char)*s))
		s++;
	if ((size_t)(s - head) == n && (off_t)n == size)
		return sf_fail(e, SF_EFORMAT, "%s: empty file, not a transform", path);
	if (*s == '[' || (*s != '{' && ends_with(path, ".json")))
		return sf_fail(e, SF_EFORMAT,
		               "%s:1: not a JSON object: a JSON transform is an object such as "
		               "{\"scopefs_transform\": 1, \"matrix\": [[a, b, tx], [c, d, ty]]} "
		               "or a wsireg transformations file (docs/transforms.md)",
		               path);
	return SF_OK;
}

/* sf_transform_load_files with files filled from empty. */
static int load_any(const char *path, const sf_tf_units *units, sf_transform *t, sf_tf_files *files,
                    sf_err *e)
{
	struct stat st;
	sf_transform_init(t);
	if (stat(path, &st) != 0)
		return sf_fail(e, errno == ENOENT ? SF_ENOTFOUND : SF_EIO, "%s: %s", path,
		               strerror(errno));
	int rc = files_add(files, path, e); /* first, whatever the format */
	if (rc != SF_OK)
		return rc;
	if (S_ISDIR(st.st_mode))
		return load_elastix(path, units, t, files, e);
	if (!S_ISREG(st.st_mode)) /* a FIFO or a device: opening it could block forever */
		return sf_fail(e, SF_EFORMAT, "%s: not a regular file or a folder", path);
	FILE *f = fopen(path, "rb");
	if (!f)
		return sf_fail(e, SF_EIO, "%s: %s", path, strerror(errno));
	char head[64] = {0};
	size_t n = fread(head, 1, sizeof head - 1, f);
	fclose(f);
	head[n] = '\0';
	rc = sniff_refusal(path, head, n, st.st_size, e);
	if (rc != SF_OK)
		return rc;
	const char *s = head + utf8_bom(head);
	while (isspace((unsigned char)*s))
		s++;
	if (*s == '{')
		return load_json_any(path, units, t, files, e);
	if (!strncmp(s, "#Insight Transform File", 23))
		return sf_transform_load_itk(path, units, t, e); /* names no other file */
	return load_elastix(path, units, t, files, e);
}

int sf_transform_load_files(const char *path, const sf_tf_units *units, sf_transform *t,
                            sf_tf_files *files, sf_err *e)
{
	if (files)
		memset(files, 0, sizeof *files);
	int rc = load_any(path, units, t, files, e);
	if (rc != SF_OK)
		sf_tf_files_free(files);
	return rc;
}

int sf_transform_load(const char *path, const sf_tf_units *units, sf_transform *t, sf_err *e)
{
	return sf_transform_load_files(path, units, t, NULL, e);
}

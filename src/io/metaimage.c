/* metaimage.c — 2D displacement fields in MetaImage form (metaimage.h).
 *
 * The header is "Key = values" lines; only the keys a 2D vector image needs
 * are read, and an unknown key is ignored as ITK does.  ElementDataFile is
 * the last header line: LOCAL means the data follows it in the same file,
 * otherwise it names a regular file beside the header.  The data is read
 * whole; before allocating, a field is at most 2^20 nodes a side and its
 * data file must hold the bytes DimSize says. */
#include "scopefs/metaimage.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#define HEADER_MAX_LINES 256
#define MAX_SIDE         (1u << 20)

typedef struct mha_header {
	double ndims, dimsize[2], spacing[2], origin[2], dir[4], channels;
	char type[32], data_file[PATH_MAX];
	int msb, compressed;
	long data_offset; /* LOCAL: where the data starts in the file */
	int line_of_type, line_of_data;
} mha_header;

/* Up to n numbers of the value text into out; how many were read. */
static int numbers(const char *s, double *out, int n)
{
	int got = 0;
	char *end;

	while (got < n) {
		errno = 0;
		double v = strtod(s, &end);
		if (end == s || errno == ERANGE || !isfinite(v))
			break;
		out[got++] = v;
		s = end;
	}
	while (isspace((unsigned char)*s))
		s++;
	return *s ? -1 : got; /* trailing text: malformed */
}

static int truthy(const char *v)
{
	return !strcasecmp(v, "true") || !strcmp(v, "1");
}

/* One "Key = value" line into h; SF_OK, or an error naming path:line. */
static int header_line(const char *path, int line, const char *key, const char *val, mha_header *h,
                       sf_err *e)
{
	struct {
		const char *key;
		double *out;
		int n;
	} num[] = {{"NDims", &h->ndims, 1},           {"DimSize", h->dimsize, 2},
	           {"ElementSpacing", h->spacing, 2}, {"Offset", h->origin, 2},
	           {"Origin", h->origin, 2},          {"Position", h->origin, 2},
	           {"TransformMatrix", h->dir, 4},    {"Orientation", h->dir, 4},
	           {"Rotation", h->dir, 4},           {"ElementNumberOfChannels", &h->channels, 1}};

	for (size_t i = 0; i < sizeof num / sizeof num[0]; i++)
		if (!strcmp(key, num[i].key)) {
			if (numbers(val, num[i].out, num[i].n) != num[i].n)
				return sf_fail(e, SF_EFORMAT,
				               "%s:%d: %s needs %d number%s for a 2D image", path,
				               line, key, num[i].n, num[i].n > 1 ? "s" : "");
			return SF_OK;
		}
	if (!strcmp(key, "ElementType")) {
		snprintf(h->type, sizeof h->type, "%s", val);
		h->line_of_type = line;
	} else if (!strcmp(key, "BinaryDataByteOrderMSB") || !strcmp(key, "ElementByteOrderMSB"))
		h->msb = truthy(val);
	else if (!strcmp(key, "CompressedData"))
		h->compressed = truthy(val);
	else if (!strcmp(key, "ElementDataFile")) {
		snprintf(h->data_file, sizeof h->data_file, "%s", val);
		h->line_of_data = line;
	}
	return SF_OK;
}

/* Parse the header of f (path for messages); stops after ElementDataFile. */
static int read_header(FILE *f, const char *path, mha_header *h, sf_err *e)
{
	char buf[PATH_MAX + 128];
	int line = 0;

	memset(h, 0, sizeof *h);
	h->dir[0] = h->dir[3] = 1;
	h->spacing[0] = h->spacing[1] = 1;
	h->channels = 1;
	while (!h->line_of_data && fgets(buf, sizeof buf, f)) {
		char *eq = strchr(buf, '='), *key = buf, *val, *end;
		if (++line > HEADER_MAX_LINES)
			return sf_fail(e, SF_EFORMAT, "%s: no ElementDataFile in %d header lines",
			               path, HEADER_MAX_LINES);
		if (!eq)
			continue; /* blank or comment */
		*eq = '\0';
		val = eq + 1;
		for (end = eq; end > key && isspace((unsigned char)end[-1]);)
			*--end = '\0';
		while (isspace((unsigned char)*val))
			val++;
		for (end = val + strlen(val); end > val && isspace((unsigned char)end[-1]);)
			*--end = '\0';
		int rc = header_line(path, line, key, val, h, e);
		if (rc != SF_OK)
			return rc;
	}
	if (!h->line_of_data)
		return sf_fail(e, SF_EFORMAT, "%s: not a MetaImage header (no ElementDataFile)",
		               path);
	h->data_offset = ftell(f);
	return SF_OK;
}

/* Why h is not a field we read, or SF_OK. */
static int check_header(const char *path, const mha_header *h, sf_err *e)
{
	if (h->ndims != 2)
		return sf_fail(e, SF_EUNSUPPORTED, "%s: a %gD image (a 2D field is needed)", path,
		               h->ndims);
	if (h->channels != 2)
		return sf_fail(e, SF_EFORMAT, "%s: %g channels (a 2D displacement has 2)", path,
		               h->channels);
	if (strcmp(h->type, "MET_FLOAT") && strcmp(h->type, "MET_DOUBLE"))
		return sf_fail(e, SF_EUNSUPPORTED,
		               "%s:%d: ElementType '%s' (MET_FLOAT or MET_DOUBLE)", path,
		               h->line_of_type, h->type);
	if (h->msb || h->compressed)
		return sf_fail(e, SF_EUNSUPPORTED, "%s: %s data is not read", path,
		               h->msb ? "big-endian" : "compressed");
	for (int i = 0; i < 2; i++)
		if (h->dimsize[i] < 1 || h->dimsize[i] > MAX_SIDE ||
		    h->dimsize[i] != floor(h->dimsize[i]))
			return sf_fail(e, SF_EFORMAT, "%s: bad DimSize", path);
	if (!(h->spacing[0] > 0 && h->spacing[1] > 0))
		return sf_fail(e, SF_EFORMAT, "%s: ElementSpacing must be positive", path);
	if (fabs(h->dir[0] * h->dir[3] - h->dir[1] * h->dir[2]) < 1e-12)
		return sf_fail(e, SF_EFORMAT, "%s: singular TransformMatrix", path);
	return SF_OK;
}

/* Open the data of h: the header file itself past its header (LOCAL), or
 * the named file beside the header, which must be a regular file (a FIFO
 * or a device named there would block or never end). */
static FILE *open_data(const char *path, FILE *hf, const mha_header *h, char *where, size_t n)
{
	const char *slash = strrchr(path, '/');
	struct stat st;

	if (!strcmp(h->data_file, "LOCAL")) {
		snprintf(where, n, "%s", path);
		return fseek(hf, h->data_offset, SEEK_SET) == 0 ? hf : NULL;
	}
	if (h->data_file[0] == '/' || !slash)
		snprintf(where, n, "%s", h->data_file);
	else
		snprintf(where, n, "%.*s/%s", (int)(slash - path), path, h->data_file);
	if (stat(where, &st) != 0 || !S_ISREG(st.st_mode))
		return NULL;
	return fopen(where, "rb");
}

/* Whether the data file df (from offset on) holds the bytes h's DimSize
 * needs; checked before allocating, so a header claiming 2^20 x 2^20
 * nodes beside a small file is refused rather than allocated. */
static int check_data_size(FILE *df, long offset, const char *where, const mha_header *h, sf_err *e)
{
	struct stat st;
	size_t value = strcmp(h->type, "MET_DOUBLE") ? sizeof(float) : sizeof(double);
	double need = h->dimsize[0] * h->dimsize[1] * 2 * (double)value;

	if (fstat(fileno(df), &st) != 0)
		return sf_fail(e, SF_EIO, "%s: %s", where, strerror(errno));
	if ((double)st.st_size - (double)offset < need)
		return sf_fail(e, SF_EFORMAT,
		               "%s: field data is short (DimSize %g %g needs %.0f bytes, the file "
		               "has %lld)",
		               where, h->dimsize[0], h->dimsize[1], need,
		               (long long)st.st_size - offset);
	return SF_OK;
}

/* Read w * h * 2 values of type h->type from f into g->v. */
static int read_values(FILE *f, const char *where, const mha_header *h, sf_field_grid *g, sf_err *e)
{
	size_t n = (size_t)g->w * g->h * 2;
	int dbl = !strcmp(h->type, "MET_DOUBLE");

	if (!dbl) {
		if (fread(g->v, sizeof(float), n, f) != n)
			return sf_fail(e, SF_EFORMAT, "%s: field data is short (%zu floats needed)",
			               where, n);
		return SF_OK;
	}
	for (size_t i = 0; i < n; i++) {
		double v;
		if (fread(&v, sizeof v, 1, f) != 1)
			return sf_fail(e, SF_EFORMAT,
			               "%s: field data is short (%zu doubles needed)", where, n);
		g->v[i] = (float)v;
	}
	return SF_OK;
}

int sf_metaimage_read_field(const char *path, sf_field_grid **grid, double gmap[6], sf_err *e)
{
	return sf_metaimage_read_field_data(path, grid, gmap, NULL, e);
}

int sf_metaimage_read_field_data(const char *path, sf_field_grid **grid, double gmap[6],
                                 char *data_file, sf_err *e)
{
	FILE *hf = fopen(path, "rb"), *df = NULL;
	char where[PATH_MAX + 8];
	sf_field_grid *g = NULL;
	mha_header h;
	int rc;

	*grid = NULL;
	if (!hf)
		return sf_fail(e, SF_EIO, "%s: %s", path, strerror(errno));
	rc = read_header(hf, path, &h, e);
	if (rc == SF_OK)
		rc = check_header(path, &h, e);
	if (rc == SF_OK && !(df = open_data(path, hf, &h, where, sizeof where)))
		rc = sf_fail(e, SF_EIO, "%s:%d: cannot open the data file %s (not a readable file)",
		             path, h.line_of_data, h.data_file);
	if (rc == SF_OK)
		rc = check_data_size(df, df == hf ? h.data_offset : 0, where, &h, e);
	if (rc == SF_OK && data_file &&
	    (size_t)snprintf(data_file, PATH_MAX, "%s", where) >= PATH_MAX) /* opened: cannot be */
		rc = sf_fail(e, SF_EINVAL, "%s: data file path too long", path);
	if (rc == SF_OK && !(g = sf_field_grid_create(SF_FIELD_LINEAR, (uint32_t)h.dimsize[0],
	                                              (uint32_t)h.dimsize[1], e)))
		rc = e->code;
	if (rc == SF_OK)
		rc = read_values(df, where, &h, g, e);
	if (rc == SF_OK)
		rc = sf_field_grid_finish(g, e);
	if (df && df != hf)
		fclose(df);
	fclose(hf);
	if (rc != SF_OK) {
		sf_field_grid_free(g);
		return rc;
	}
	/* Direction from TransformMatrix, column by column: D = [m0 m2; m1 m3]. */
	double d00 = h.dir[0], d10 = h.dir[1], d01 = h.dir[2], d11 = h.dir[3];
	double det = d00 * d11 - d01 * d10;
	double inv[4] = {d11 / det, -d01 / det, -d10 / det, d00 / det};
	gmap[0] = inv[0] / h.spacing[0];
	gmap[1] = inv[1] / h.spacing[0];
	gmap[2] = -(gmap[0] * h.origin[0] + gmap[1] * h.origin[1]);
	gmap[3] = inv[2] / h.spacing[1];
	gmap[4] = inv[3] / h.spacing[1];
	gmap[5] = -(gmap[3] * h.origin[0] + gmap[4] * h.origin[1]);
	*grid = g;
	return SF_OK;
}

/* product_deconv.c — deconvolved/ planes: LsDeconv block by block, on read.
 *
 * Two products per stack (product_deconv.h):
 *  - blocks: unit = (bz * count_y + by) * count_x + bx, the block's core
 *    deconvolved, float32 [z][y][x].  Input window per axis: length
 *    in = core + 2 halo, starting at origin - halo - (core - c) where c is
 *    this block's (possibly shorter, last) core, so every window has one
 *    shape; coordinates outside the volume read the symmetric mirror.
 *  - planes: unit = plane * strips + strip; the strip's rows come from the
 *    blocks of its block row at its z (nested engine reads of just those
 *    rows), then are scaled to the output type.
 * Invariants:
 *  1. A block's bytes depend only on the source files, the settings and the
 *     grid, all mixed into the blocks key; the grid is fixed at mount from
 *     the settings, the stack size and mem (never from thread count or read
 *     order).  FFTW plans are FFTW_ESTIMATE and the fused FFTW passes give
 *     the same bits for any thread count, so repeated computations do too.
 *  2. The output scale is one pair (dmin, dmax) per stack: scale=auto takes
 *     it from a fixed sample of blocks (the same blocks whatever is read
 *     first), once, and records it in the cache folder
 *     (deconv-scale-<planes key>.txt) so later mounts reuse the same numbers.
 *     Every worker that needs it computes the samples nobody has started.
 *  3. scale_lock is never held while reading blocks through the engine, and
 *     a block computation takes only cpu_lock, around sf_deconv_block alone
 *     (no engine read, no other lock inside), so nested reads, the scale and
 *     the shared CPU context cannot deadlock each other.  windows_lock (one
 *     per process) is taken before a stack's window_lock, never inside it.
 *  4. GPU: with gpu=auto (or a device), each device has up to
 *     GPU_CONTEXTS_PER_DEVICE cuFFT contexts, made on first use and lent to
 *     whichever worker has a block (gpu_borrow); a worker waits for one
 *     rather than take the CPU while any is usable.  A context that fails
 *     is dropped (log line) and its block read again for another context or
 *     the CPU.  Without a device (or CUDA in the build) everything runs on
 *     FFTW, logged once per stack.  A context is made only when the block
 *     fits in the device's free memory.  The CUDA runtime and the devices'
 *     primary contexts start when the engine starts (blocks_warm, on a
 *     thread of the stack's own), not at the first block.
 *  5. Memory: CPU blocks of every stack share ONE FFTW context per process
 *     (cpu_lock, cpu_ctx), run one at a time with every engine thread inside
 *     its FFT passes, so the host holds one block working set beside mem,
 *     whatever the worker count and however many stacks were read; a stack
 *     whose block finds the context made for another stack remakes it.
 *     Input windows are lent per block, at most 2 (CPU only) or 2 + 4 per
 *     GPU context (window_borrow), and a stack's idle windows are freed
 *     when another stack borrows one (windows_owner), so only the stacks
 *     being read hold windows; a GPU context adds its small host buffers
 *     (staging, taps). */
#include "scopefs/product_deconv.h"
#include "scopefs/conf.h"
#include "scopefs/destripe.h"
#include "scopefs/select.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>
#ifdef __GLIBC__
#include <malloc.h> /* malloc_trim */
#endif

#include "scopefs/log.h"
#include "scopefs/slide.h"

#define SCALE_SAMPLE_DEFAULT 16
#define BLOCK_EDGE_MAX       256
#define BLOCK_EDGE_MIN       16

/* ---- settings ------------------------------------------------------------ */

enum key_kind { K_POS, K_NONNEG, K_INT, K_TRIPLE_D, K_TRIPLE_I, K_SPECIAL };

typedef struct key_def {
	const char *key;
	enum key_kind kind;
} key_def;

/* Every key a settings list may hold (gpu is a general mount option too). */
static const key_def key_table[] = {
    {"dxy", K_POS},
    {"dz", K_POS},
    {"lambda_ex", K_POS},
    {"lambda_em", K_POS},
    {"na", K_POS},
    {"rf", K_POS},
    {"fcyl", K_POS},
    {"slitwidth", K_POS},
    {"numit", K_INT},
    {"lambda_damping", K_NONNEG},
    {"regularize_interval", K_INT},
    {"clipval", K_POS},
    {"stop_criterion", K_NONNEG},
    {"accelerate", K_INT},
    {"gaussian_sigma", K_TRIPLE_D},
    {"gaussian_filter_size", K_TRIPLE_I},
    {"dark", K_NONNEG},
    {"signal_amp", K_POS},
    {"destripe_sigma", K_NONNEG},
    {"denoise_strength", K_NONNEG},
    {"flip", K_INT},
    {"convert_to_8bit", K_INT},
    {"convert_to_16bit", K_INT},
    {"scale", K_SPECIAL},
    {"dtype", K_SPECIAL},
    {"deconv_block", K_INT},
    {"scale_sample", K_SPECIAL},
    {"gpu", K_SPECIAL},
};
#define KEY_COUNT (sizeof key_table / sizeof key_table[0])

void sf_deconv_settings_default(sf_deconv_settings *s)
{
	memset(s, 0, sizeof *s);
	sf_deconv_params_default(&s->params);
	s->scale = SF_DECONV_SCALE_AUTO;
	s->signal_amp = 1;
	s->dtype = SF_DECONV_DTYPE_SAME;
	s->gpu = SF_DECONV_GPU_AUTO;
	s->scale_sample = SCALE_SAMPLE_DEFAULT;
}

int sf_deconv_settings_is_key(const char *key)
{
	for (size_t i = 0; i < KEY_COUNT; i++)
		if (!strcmp(key_table[i].key, key) && strcmp(key, "gpu"))
			return 1;
	return 0;
}

static int parse_double(const char *text, double *out)
{
	char *end;

	errno = 0;
	*out = strtod(text, &end);
	return !*text || *end || errno || !isfinite(*out) ? SF_EINVAL : SF_OK;
}

static int parse_long(const char *text, long *out)
{
	char *end;

	errno = 0;
	*out = strtol(text, &end, 10);
	return !*text || *end || errno ? SF_EINVAL : SF_OK;
}

/* "a:b:c" (or one value for all three axes) into v[3]; ints when as_int,
 * each 0 to 1000000 like any count (a larger one would not fit the int it
 * is stored in).  Every field must hold a number: an empty one (":2.5",
 * "1::2", "1:2:3:") is an error, not skipped, so a typo never silently
 * becomes one value for all three axes. */
static int parse_triple(const char *text, double v[3], int as_int)
{
	char buf[128];
	char *field = buf;
	int n = 0;

	if (strlen(text) >= sizeof buf)
		return SF_EINVAL;
	strcpy(buf, text);
	for (;;) {
		char *colon = strchr(field, ':');
		long l;

		if (colon)
			*colon = '\0';
		if (n == 3)
			return SF_EINVAL;
		if (as_int) {
			if (parse_long(field, &l) != SF_OK || l < 0 || l > 1000000)
				return SF_EINVAL;
			v[n++] = (double)l;
		} else if (parse_double(field, &v[n++]) != SF_OK)
			return SF_EINVAL;
		if (!colon)
			break;
		field = colon + 1;
	}
	if (n == 1)
		v[1] = v[2] = v[0];
	return n == 1 || n == 3 ? SF_OK : SF_EINVAL;
}

static int apply_special(sf_deconv_settings *s, const char *key, const char *value,
                         const char *origin, sf_err *e)
{
	double d;
	long l;

	if (!strcmp(key, "scale")) {
		if (!strcmp(value, "auto"))
			s->scale = SF_DECONV_SCALE_AUTO;
		else if (parse_double(value, &d) == SF_OK && d > 0)
			s->scale = d;
		else
			return sf_fail(e, SF_EINVAL,
			               "%soption 'scale': '%s' is not auto or a positive gain",
			               origin, value);
		return SF_OK;
	}
	if (!strcmp(key, "scale_sample")) {
		if (!strcmp(value, "all"))
			s->scale_sample = 0;
		else if (parse_long(value, &l) == SF_OK && l >= 1 && l <= 1000000)
			s->scale_sample = (uint32_t)l;
		else
			return sf_fail(e, SF_EINVAL,
			               "%soption 'scale_sample': '%s' is not all or a count >= 1",
			               origin, value);
		return SF_OK;
	}
	if (!strcmp(key, "dtype")) {
		s->dtype_by_switch = 0; /* convert_to_*bit=0 leaves it alone */
		if (!strcmp(value, "same"))
			s->dtype = SF_DECONV_DTYPE_SAME;
		else if (!strcmp(value, "uint8"))
			s->dtype = SF_U8;
		else if (!strcmp(value, "uint16"))
			s->dtype = SF_U16;
		else if (!strcmp(value, "float32"))
			s->dtype = SF_F32;
		else
			return sf_fail(
			    e, SF_EINVAL,
			    "%soption 'dtype': '%s' is not same, uint8, uint16 or float32", origin,
			    value);
		return SF_OK;
	}
	/* gpu */
	if (!strcmp(value, "auto"))
		s->gpu = SF_DECONV_GPU_AUTO;
	else if (!strcmp(value, "off"))
		s->gpu = SF_DECONV_GPU_OFF;
	else if (parse_long(value, &l) == SF_OK && l >= 0 && l < 64)
		s->gpu = (int)l;
	else
		return sf_fail(e, SF_EINVAL,
		               "%soption 'gpu': '%s' is not auto, off or a device number", origin,
		               value);
	return SF_OK;
}

/* LsDeconv's convert_to_8bit / convert_to_16bit (type: SF_U8 / SF_U16).
 * 1 sets dtype; 0 is LsDeconv's "keep the input type", so it undoes the
 * same switch's 1 from an earlier source (later sources win).  It leaves a
 * dtype given by dtype= or by the other switch alone: convert_to_16bit=0
 * does not undo convert_to_8bit=1. */
static void store_switch(sf_deconv_settings *s, sf_dtype type, int on)
{
	if (on) {
		s->dtype = type;
		s->dtype_by_switch = 1;
	} else if (s->dtype_by_switch && s->dtype == (int)type) {
		s->dtype = SF_DECONV_DTYPE_SAME;
		s->dtype_by_switch = 0;
	}
}

/* Store a checked number into the field key names. */
static int store_number(sf_deconv_settings *s, const char *key, double v, const char *origin,
                        sf_err *e)
{
	sf_deconv_params *p = &s->params;

	if (!strcmp(key, "dxy"))
		p->dxy = v * 1000.0, s->have_dxy = 1; /* um -> nm */
	else if (!strcmp(key, "dz"))
		p->dz = v * 1000.0, s->have_dz = 1;
	else if (!strcmp(key, "lambda_ex"))
		p->lambda_ex = v, s->have_ex = 1;
	else if (!strcmp(key, "lambda_em"))
		p->lambda_em = v, s->have_em = 1;
	else if (!strcmp(key, "na"))
		p->na = v;
	else if (!strcmp(key, "rf"))
		p->rf = v;
	else if (!strcmp(key, "fcyl"))
		p->fcyl = v;
	else if (!strcmp(key, "slitwidth"))
		p->slitwidth = v;
	else if (!strcmp(key, "lambda_damping"))
		p->lambda_damping = v;
	else if (!strcmp(key, "clipval"))
		p->clipval = v;
	else if (!strcmp(key, "stop_criterion"))
		p->stop_criterion = v;
	else if (!strcmp(key, "dark"))
		p->dark = v, s->have_denoise = 0; /* the last of the two wins */
	else if (!strcmp(key, "denoise_strength"))
		s->denoise_strength = v, s->have_denoise = 1;
	else if (!strcmp(key, "flip") || !strcmp(key, "convert_to_8bit") ||
	         !strcmp(key, "convert_to_16bit")) {
		if (v > 1)
			return sf_fail(e, SF_EINVAL, "%soption '%s': %g is not 0 or 1", origin, key,
			               v);
		if (key[0] == 'f')
			s->flip = (int)v;
		else
			store_switch(s, strstr(key, "16") ? SF_U16 : SF_U8, (int)v);
	} else if (!strcmp(key, "signal_amp"))
		s->signal_amp = v;
	else if (!strcmp(key, "destripe_sigma"))
		s->destripe_sigma = v;
	else if (!strcmp(key, "numit"))
		p->numit = (int)v;
	else if (!strcmp(key, "accelerate")) {
		if (v > 1)
			return sf_fail(e, SF_EINVAL, "%soption 'accelerate': %g is not 0 or 1",
			               origin, v);
		p->accelerate = (int)v;
	} else if (!strcmp(key, "regularize_interval"))
		p->regularize_interval = (int)v;
	else if (!strcmp(key, "deconv_block")) {
		if (v < BLOCK_EDGE_MIN || v > 4096)
			return sf_fail(e, SF_EINVAL,
			               "%soption 'deconv_block': %g is not %d to 4096", origin, v,
			               BLOCK_EDGE_MIN);
		s->block = (uint32_t)v;
	}
	return SF_OK;
}

int sf_deconv_settings_apply(sf_deconv_settings *s, const char *key, const char *value,
                             const char *origin, sf_err *e)
{
	const key_def *d = NULL;
	double v, t[3];
	long l;

	for (size_t i = 0; i < KEY_COUNT; i++)
		if (!strcmp(key_table[i].key, key))
			d = &key_table[i];
	if (!d)
		return sf_fail(e, SF_EINVAL, "%sunknown deconvolution option '%s'", origin, key);
	if (!value || !*value)
		return sf_fail(e, SF_EINVAL, "%soption '%s' needs a value", origin, key);
	switch (d->kind) {
	case K_SPECIAL: return apply_special(s, key, value, origin, e);
	case K_POS:
	case K_NONNEG:
		if (parse_double(value, &v) != SF_OK || v < 0 || (d->kind == K_POS && v == 0))
			return sf_fail(e, SF_EINVAL, "%soption '%s': '%s' is not a %s number",
			               origin, key, value,
			               d->kind == K_POS ? "positive" : "non-negative");
		return store_number(s, key, v, origin, e);
	case K_INT:
		if (parse_long(value, &l) != SF_OK || l < 0 || l > 1000000)
			return sf_fail(e, SF_EINVAL, "%soption '%s': '%s' is not a count", origin,
			               key, value);
		return store_number(s, key, (double)l, origin, e);
	case K_TRIPLE_D:
	case K_TRIPLE_I:
		if (parse_triple(value, t, d->kind == K_TRIPLE_I) != SF_OK)
			return sf_fail(e, SF_EINVAL,
			               "%soption '%s': '%s' is not one or three %s x:y:z (':' "
			               "separates them, since ',' separates -o options)",
			               origin, key, value,
			               d->kind == K_TRIPLE_I ? "counts (0 to 1000000)" : "numbers");
		for (int a = 0; a < 3; a++) {
			if (d->kind == K_TRIPLE_D)
				s->params.gaussian_sigma[a] = t[a];
			else
				s->params.gaussian_filter_size[a] = (int)t[a];
		}
		return SF_OK;
	}
	return SF_OK;
}

/* Apply "key=value" items separated by sep. */
static int apply_items(sf_deconv_settings *s, const char *list, const char *sep, const char *origin,
                       sf_err *e)
{
	char *copy, *save = NULL;
	int rc = SF_OK;

	if (!list || !*list)
		return SF_OK;
	if (!(copy = strdup(list)))
		return sf_fail(e, SF_ENOMEM, "out of memory");
	for (char *item = strtok_r(copy, sep, &save); item && rc == SF_OK;
	     item = strtok_r(NULL, sep, &save)) {
		char *eq = strchr(item, '=');

		if (!eq)
			rc = sf_fail(e, SF_EINVAL, "%soption '%s' needs a value", origin, item);
		else {
			*eq = '\0';
			rc = sf_deconv_settings_apply(s, item, eq + 1, origin, e);
		}
	}
	free(copy);
	return rc;
}

int sf_deconv_settings_apply_list(sf_deconv_settings *s, const char *list, const char *origin,
                                  sf_err *e)
{
	return apply_items(s, list, ",", origin, e);
}

void sf_deconv_settings_resolve(sf_deconv_settings *s)
{
	sf_deconv_params *p = &s->params;
	double centre = 1.0;
	int filtered = 0;

	if (!s->have_denoise)
		return;
	/* The centre of a unit impulse through the separable pre-filter: the
	 * product of each filtered axis's centre tap.  An axis with sigma 0 is
	 * not filtered (sf_deconv_block skips it), so it contributes 1. */
	for (int a = 0; a < 3; a++) {
		double sigma = p->gaussian_sigma[a], sum = 0.0;
		int radius = (p->gaussian_filter_size[a] - 1) / 2;

		if (!(sigma > 0))
			continue;
		filtered = 1;
		for (int k = -radius; k <= radius; k++)
			sum += exp(-(double)k * k / (2.0 * sigma * sigma));
		centre /= sum;
	}
	/* No pre-filter at all: LsDeconv subtracts nothing. */
	p->dark = filtered ? s->denoise_strength * centre : 0.0;
}

int sf_deconv_settings_check(const sf_deconv_settings *s, const char *origin, sf_err *e)
{
	sf_deconv_params p = s->params;
	sf_err inner = {0};

	/* Stand-ins for what each stack may still set: only combinations of
	 * the values given are judged here. */
	if (!s->have_dxy)
		p.dxy = 400;
	if (!s->have_dz)
		p.dz = 1200;
	if (!s->have_ex)
		p.lambda_ex = 561;
	if (!s->have_em)
		p.lambda_em = 600;
	if (sf_deconv_params_validate(&p, &inner) != SF_OK)
		return sf_fail(e, SF_EINVAL, "%soption %s", origin, inner.msg);
	return SF_OK;
}

/* The number after "ex"/"em" at a word start in name (Ex_561, em-600, EX488). */
static int wavelength_in(const char *name, const char *tag, double *out)
{
	for (const char *p = name; *p; p++) {
		const char *q = p + 2;
		char *end;
		long v;

		if (p != name && isalnum((unsigned char)p[-1]))
			continue;
		if (tolower((unsigned char)p[0]) != tag[0] ||
		    tolower((unsigned char)p[1]) != tag[1])
			continue;
		if (*q == '_' || *q == '-')
			q++;
		if (!isdigit((unsigned char)*q))
			continue;
		v = strtol(q, &end, 10);
		if (v >= 200 && v <= 2000 && !isdigit((unsigned char)*end)) {
			*out = (double)v;
			return 1;
		}
	}
	return 0;
}

void sf_deconv_settings_infer_wavelengths(sf_deconv_settings *s, const char *name)
{
	if (!name)
		return;
	if (wavelength_in(name, "ex", &s->params.lambda_ex))
		s->have_ex = 1;
	if (wavelength_in(name, "em", &s->params.lambda_em))
		s->have_em = 1;
}

/* key=value lines of a per-stack file (# comments); SF_ENOTFOUND if absent. */
static int apply_file(sf_deconv_settings *s, const char *path, sf_err *e)
{
	char line[1024], origin[PATH_MAX + 32], *p;
	unsigned lineno = 0;
	FILE *f = fopen(path, "r");
	int rc;

	if (!f)
		return errno == ENOENT ? SF_ENOTFOUND
		                       : sf_fail(e, SF_EIO, "%s: %s", path, strerror(errno));
	while ((rc = sf_conf_next(f, path, line, sizeof line, &lineno, &p, e)) == SF_OK) {
		snprintf(origin, sizeof origin, "%.*s:%u: ", PATH_MAX - 1, path, lineno);
		if ((rc = apply_items(s, p, "\n", origin, e)) != SF_OK)
			break;
	}
	if (rc == SF_ENOTFOUND)
		rc = SF_OK;
	fclose(f);
	if (rc == SF_OK) {
		snprintf(origin, sizeof origin, "%.*s: ", PATH_MAX - 1, path);
		rc = sf_deconv_settings_check(s, origin, e);
	}
	return rc;
}

/* RAW_DIR/<stack>.scopefs.conf, then <stack folder>/scopefs.conf (the more
 * specific one last, so that it wins). */
uint32_t sf_deconv_conf_paths(const char *raw_dir, const sf_stack *st, char paths[2][PATH_MAX])
{
	const char *name = st->name;
	uint32_t n = 0;

	if (name[0])
		snprintf(paths[n++], PATH_MAX, "%s/%s.scopefs.conf", raw_dir, name);
	if (!st->multipage)
		snprintf(paths[n++], PATH_MAX, "%s%s%s/scopefs.conf", raw_dir, name[0] ? "/" : "",
		         name);
	return n;
}

int sf_deconv_settings_for_stack(const char *raw_dir, const sf_stack *st, const char *mount_list,
                                 int gpu, sf_deconv_settings *s, sf_err *e)
{
	char conf[2][PATH_MAX];
	const char *name = st->name;
	uint32_t paths;
	int rc;

	sf_deconv_settings_default(s);
	s->gpu = gpu;
	rc = sf_deconv_settings_apply_list(s, mount_list, "", e);
	if (rc != SF_OK)
		return rc;
	if (!name[0]) {
		const char *slash = strrchr(raw_dir, '/');
		sf_deconv_settings_infer_wavelengths(s, slash ? slash + 1 : raw_dir);
	} else
		sf_deconv_settings_infer_wavelengths(s, name);
	paths = sf_deconv_conf_paths(raw_dir, st, conf);
	for (uint32_t i = 0; i < paths; i++) {
		rc = apply_file(s, conf[i], e);
		if (rc != SF_OK && rc != SF_ENOTFOUND)
			return rc;
	}
	if (!s->have_dxy || !s->have_dz)
		return sf_fail(e, SF_EINVAL,
		               "deconvolution needs dxy and dz (-o dxy=0.4,dz=1.2 or a preset)");
	if (!s->have_ex || !s->have_em)
		return sf_fail(e, SF_EINVAL,
		               "deconvolution needs lambda_ex and lambda_em (-o "
		               "lambda_ex=561,lambda_em=600, a preset, or a folder named like "
		               "Ex_561_Em_600)");
	sf_deconv_settings_resolve(s);
	return sf_deconv_settings_check(s, "", e);
}

sf_dtype sf_deconv_output_dtype(const sf_deconv_settings *s, const sf_stack *st)
{
	return s->dtype == SF_DECONV_DTYPE_SAME ? st->dtype : (sf_dtype)s->dtype;
}

/* ---- the grid -------------------------------------------------------------- */

typedef struct grid {
	uint32_t dim[3];   /* volume x y z */
	uint32_t core[3];  /* core edge per axis (the last block may be shorter) */
	uint32_t halo[3];  /* voxels each side */
	uint32_t count[3]; /* blocks per axis */
	uint32_t in[3];    /* input window: core + 2 halo */
} grid;

/* Bytes one worker's context and buffers take for input window `in`. */
static uint64_t working_set(const uint32_t in[3], const sf_psf *psf, int accelerate)
{
	uint64_t nin = (uint64_t)in[0] * in[1] * in[2];
	sf_dims3 f = sf_deconv_fft_dims((sf_dims3){in[0], in[1], in[2]},
	                                (sf_dims3){psf->nx, psf->ny, psf->nz}, NULL);

	/* 4 real engine buffers + host pad (+ 3 more to accelerate), 2
	 * half-spectrum complex (rows padded to an even length), 3 window-sized */
	return (uint64_t)f.nx * f.ny * f.nz * 4 * (accelerate ? 8 : 5) +
	       (uint64_t)(f.nx / 2 + 2) * f.ny * f.nz * 8 * 2 + nin * 4 * 3;
}

/* Core edge from deconv_block, else the largest multiple of 16 up to 256
 * whose working set fits in half of mem (the other half keeps blocks),
 * then evened out so the blocks of an axis have (nearly) equal cores. */
static void grid_make(grid *g, const sf_stack *st, const sf_deconv_settings *s, const sf_psf *psf,
                      uint64_t mem)
{
	size_t pn[3] = {psf->nx, psf->ny, psf->nz};
	uint32_t edge = s->block;

	g->dim[0] = st->width;
	g->dim[1] = st->height;
	g->dim[2] = st->planes;
	for (int a = 0; a < 3; a++) {
		uint32_t f = (uint32_t)s->params.gaussian_filter_size[a];
		g->halo[a] = (uint32_t)pn[a] > f ? (uint32_t)pn[a] : f;
	}
	if (!edge) {
		for (edge = BLOCK_EDGE_MAX; edge > BLOCK_EDGE_MIN; edge -= 16) {
			uint32_t in[3];

			for (int a = 0; a < 3; a++)
				in[a] = (edge < g->dim[a] ? edge : g->dim[a]) + 2 * g->halo[a];
			if (working_set(in, psf, s->params.accelerate) <= mem / 2)
				break;
		}
	}
	for (int a = 0; a < 3; a++) {
		g->core[a] = edge < g->dim[a] ? edge : g->dim[a];
		g->count[a] = (g->dim[a] + g->core[a] - 1) / g->core[a];
		/* From mem: the same block count with balanced cores (256 in
		 * cores of 176 would leave a last core of 80 in a full window). */
		if (!s->block)
			g->core[a] = (g->dim[a] + g->count[a] - 1) / g->count[a];
		g->in[a] = g->core[a] + 2 * g->halo[a];
	}
}

/* Symmetric mirror of i into [0, n): ... 1 0 | 0 1 ... n-1 | n-1 n-2 ... */
static uint32_t mirror(int64_t i, uint32_t n)
{
	int64_t period = 2 * (int64_t)n, m = i % period;

	if (m < 0)
		m += period;
	return (uint32_t)(m < n ? m : period - 1 - m);
}

/* ---- where the time goes ---------------------------------------------------- */

/* Per-stack worker time by phase, summed over workers (relaxed atomics: two
 * clock reads and two adds per phase and block), logged once when the blocks
 * product is destroyed, so a daemon log shows where a copy's time went. */
enum phase {
	PH_READ,     /* read_window: plane files -> float window */
	PH_GPU,      /* sf_deconv_block on a worker's CUDA context */
	PH_CPU,      /* sf_deconv_block on the shared FFTW context */
	PH_CPU_WAIT, /* waiting for cpu_lock */
	PH_DESTRIPE, /* sf_destripe_z */
	PH_CROP,     /* window core -> the engine's unit buffer */
	PH_FETCH,    /* planes: sf_engine_read of block rows (a block computed inline,
	              * a wait for another worker's, a disk cache load) */
	PH_PUT,      /* planes: block rows -> output type (put_values) */
	PH_COUNT
};

typedef struct phase_clock {
	atomic_uint_fast64_t ns[PH_COUNT];    /* nanoseconds */
	atomic_uint_fast64_t count[PH_COUNT]; /* blocks (rows of blocks for PH_PUT) */
} phase_clock;

static uint64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* Add the time since t0 to phase ph; returns now, the next phase's t0. */
static uint64_t phase_add(phase_clock *c, enum phase ph, uint64_t t0)
{
	uint64_t t1 = now_ns();

	atomic_fetch_add_explicit(&c->ns[ph], t1 - t0, memory_order_relaxed);
	atomic_fetch_add_explicit(&c->count[ph], 1, memory_order_relaxed);
	return t1;
}

static double phase_s(const phase_clock *c, enum phase ph)
{
	return (double)atomic_load_explicit(&c->ns[ph], memory_order_relaxed) * 1e-9;
}

static uint64_t phase_n(const phase_clock *c, enum phase ph)
{
	return atomic_load_explicit(&c->count[ph], memory_order_relaxed);
}

/* One INFO line (nothing when no block was computed). */
static void phase_log(const char *name, const phase_clock *c)
{
	uint64_t blocks = phase_n(c, PH_READ), reads = blocks ? blocks : 1;

	if (!blocks && !phase_n(c, PH_PUT))
		return;
	sf_log(SF_LOG_INFO,
	       "%s: %" PRIu64 " blocks, worker time: read %.2f s (%.1f ms/block), deconv gpu "
	       "%.2f s (%" PRIu64 ") cpu %.2f s (%" PRIu64 ", lock wait %.2f s), destripe "
	       "%.2f s, crop %.2f s; planes: block rows read %.2f s, put %.2f s (%" PRIu64
	       " block rows)",
	       name, blocks, phase_s(c, PH_READ), phase_s(c, PH_READ) * 1e3 / (double)reads,
	       phase_s(c, PH_GPU), phase_n(c, PH_GPU), phase_s(c, PH_CPU), phase_n(c, PH_CPU),
	       phase_s(c, PH_CPU_WAIT), phase_s(c, PH_DESTRIPE), phase_s(c, PH_CROP),
	       phase_s(c, PH_FETCH), phase_s(c, PH_PUT), phase_n(c, PH_PUT));
}

/* ---- the blocks product ---------------------------------------------------- */

/* GPU contexts per device.  One block's host-side steps (reading the window
 * from the planes, the cache write) take about as long as its device work,
 * so a few contexts per device keep it busy; device_fits bounds them by its
 * free memory. */
#define GPU_CONTEXTS_PER_DEVICE 4
#define GPU_SLOTS_MAX           64
#define WINDOWS_MAX             (4 * GPU_SLOTS_MAX + 2)

typedef struct gpu_slot {
	sf_deconv_ctx *ctx; /* made by the first borrower; NULL before */
	int device;         /* CUDA ordinal */
	int busy;           /* lent to a worker */
	int dead;           /* its context could not be made or failed: never lent */
} gpu_slot;

typedef struct blocks {
	const sf_stack *stack; /* owned by the dataset */
	sf_deconv_settings s;
	sf_psf psf;
	grid g;
	sf_engine *const *engine; /* the mount's engine pointer (its thread count) */
	atomic_int told_cpu;      /* the "computing on the CPU" line was logged */
	atomic_int stopping;      /* the engine is stopping: contexts end their blocks */
	/* The GPU contexts of the stack, lent to whichever worker has a block
	 * to compute (gpu_borrow), so every worker's blocks go to a device while
	 * one works; blocks go to the CPU only when no context is usable. */
	pthread_mutex_t gpu_lock; /* guards gpu[], gpu_slots, why_cpu */
	pthread_cond_t gpu_freed; /* a context was returned or died */
	gpu_slot gpu[GPU_SLOTS_MAX];
	int gpu_slots;       /* slots in use; -1 until the devices were counted */
	const char *why_cpu; /* why blocks go to the CPU when no slot is usable */
	/* Input windows, lent to a worker for one block (window_borrow): at
	 * most window_count() exist, so the host holds that many windows however
	 * many workers there are (2 without a GPU: one read while another is
	 * deconvolved). */
	pthread_mutex_t window_lock; /* guards window[], window_busy[] */
	pthread_cond_t window_freed;
	float *window[WINDOWS_MAX];
	int window_busy[WINDOWS_MAX];
	sf_key ctx_key;        /* what an FFTW context for this stack is made from (ctx_key) */
	phase_clock clock;     /* worker time by phase (atomics) */
	pthread_t warm_thread; /* blocks_warm's, joined in blocks_destroy */
	int warm_running;      /* warm_thread was started and not joined */
} blocks;

/* The process's one FFTW context, shared by the CPU blocks of every stack
 * of every mount.  CPU blocks run one at a time on it, each with every
 * engine thread inside the FFT passes (as LsDeconv runs one block at a
 * time), so the host holds one block working set however many workers and
 * stacks there are; the bytes do not depend on the thread count.  Before,
 * each stack kept its own context (up to mem/2) from its first block until
 * unmount: one plane of each of 6 stacks of 256x256x64 at mem=512M left RSS
 * at 1.1 GB.  The context is a pure cache (plans, OTF, buffers), so a block
 * of another stack destroys it and makes its own; it is destroyed only
 * under cpu_lock, so never while a block runs on it.  Global state: guarded
 * by cpu_lock. */
static pthread_mutex_t cpu_lock = PTHREAD_MUTEX_INITIALIZER;
static sf_deconv_ctx *cpu_ctx;    /* made for cpu_owner; cpu_lock */
static const blocks *cpu_owner;   /* the stack cpu_ctx was made for; cpu_lock */
static atomic_ulong cpu_ctx_made; /* contexts made so far (tests) */

/* The stack that borrowed a window last (process-wide, like cpu_ctx): when
 * another stack borrows one, the previous stack's idle windows are freed,
 * so windows are held by the stacks being read only.  windows_lock is taken
 * before a stack's window_lock, never inside it.  Global state: guarded by
 * windows_lock. */
static pthread_mutex_t windows_lock = PTHREAD_MUTEX_INITIALIZER;
static blocks *windows_owner; /* windows_lock */

/* Window columns [at, at + len) read source columns [src, src + len) of the
 * rect: the interior of a window is one run, its mirrored edges short ones. */
typedef struct x_run {
	uint32_t at, src, len;
} x_run;

typedef struct blocks_worker {
	float *in;        /* the input window, in[0]*in[1]*in[2]: lent for one block */
	uint8_t *rect;    /* one plane's source rect, source type */
	size_t rect_cap;  /* bytes of rect */
	uint32_t *map[3]; /* window index -> volume index per axis */
	x_run *runs;      /* map[0] as runs, in[0] at most */
	uint32_t run_count;
	sf_slide_reader *reader; /* last plane file opened */
	uint32_t reader_file;
} blocks_worker;

static int blocks_worker_start(sf_product *p, void **state, sf_err *e)
{
	const blocks *b = p->impl;
	blocks_worker *w = calloc(1, sizeof *w);
	size_t n = (size_t)b->g.in[0] * b->g.in[1] * b->g.in[2];

	if (!w)
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", p->name);
	*state = w;
	for (int a = 0; a < 3; a++)
		w->map[a] = malloc(b->g.in[a] * sizeof(uint32_t));
	w->runs = malloc(b->g.in[0] * sizeof *w->runs);
	if (!w->map[0] || !w->map[1] || !w->map[2] || !w->runs)
		return sf_fail(e, SF_ENOMEM, "%s: out of memory for a %zu-voxel block", p->name, n);
	return SF_OK;
}

static void blocks_worker_stop(sf_product *p, void *state)
{
	blocks_worker *w = state;

	(void)p;
	if (!w)
		return;
	sf_slide_reader_close(w->reader);
	free(w->rect);
	free(w->runs);
	for (int a = 0; a < 3; a++)
		free(w->map[a]);
	free(w);
}

/* Unit index -> block position. */
static void block_pos(const grid *g, uint64_t unit, uint32_t pos[3])
{
	pos[0] = (uint32_t)(unit % g->count[0]);
	pos[1] = (uint32_t)(unit / g->count[0] % g->count[1]);
	pos[2] = (uint32_t)(unit / ((uint64_t)g->count[0] * g->count[1]));
}

/* Core size of the block at pos along axis a. */
static uint32_t block_core(const grid *g, const uint32_t pos[3], int a)
{
	uint32_t o = pos[a] * g->core[a];

	return g->dim[a] - o < g->core[a] ? g->dim[a] - o : g->core[a];
}

static size_t blocks_unit_bytes(const sf_product *p, uint64_t unit)
{
	const blocks *b = p->impl;
	uint32_t pos[3];

	block_pos(&b->g, unit, pos);
	return (size_t)block_core(&b->g, pos, 0) * block_core(&b->g, pos, 1) *
	       block_core(&b->g, pos, 2) * sizeof(float);
}

#ifdef SF_HAVE_CUDA
/* Device bytes of a cuFFT context for window `in`: its real buffers (4, or
 * 7 to accelerate), 2 half spectra, and cuFFT's R2C and C2R work areas,
 * counted as one half spectrum each. */
static uint64_t device_working_set(const uint32_t in[3], const sf_psf *psf, int accelerate)
{
	sf_dims3 f = sf_deconv_fft_dims((sf_dims3){in[0], in[1], in[2]},
	                                (sf_dims3){psf->nx, psf->ny, psf->nz}, NULL);

	return (uint64_t)f.nx * f.ny * f.nz * 4 * (accelerate ? 7 : 4) +
	       (uint64_t)(f.nx / 2 + 1) * f.ny * f.nz * 8 * 4;
}

/* SF_OK when a block's context fits in the free memory of device (from
 * cudaMemGetInfo, asked by the worker: CUDA must not start before the
 * daemon forks); else SF_EDEVICE naming both sizes, so the worker stays on
 * the CPU with a clear line instead of failing inside cudaMalloc.  The grid
 * itself comes from mem (grid_make), the same on every machine. */
static int device_fits(const sf_product *p, const blocks *b, int device, sf_err *e)
{
	size_t free_bytes = 0, total_bytes = 0;
	uint64_t need = device_working_set(b->g.in, &b->psf, b->s.params.accelerate);
	int rc = sf_fft_cuda_mem_info(device, &free_bytes, &total_bytes, e);

	if (rc != SF_OK)
		return rc;
	if (need > free_bytes)
		return sf_fail(e, SF_EDEVICE,
		               "%s: a block needs about %" PRIu64 " MiB on device %d, %zu MiB of "
		               "%zu MiB are free (lower deconv_block or mem)",
		               p->name, need >> 20, device, free_bytes >> 20, total_bytes >> 20);
	return SF_OK;
}
#endif

/* The engine's worker count (1 before it starts). */
static unsigned engine_threads(const blocks *b)
{
	return b->engine && *b->engine ? sf_engine_threads(*b->engine) : 1;
}

/* Count the devices once (under gpu_lock): the slots, or why there are none. */
static void gpu_slots_init(blocks *b)
{
	b->gpu_slots = 0;
	b->why_cpu = "gpu=off";
#ifdef SF_HAVE_CUDA
	if (b->s.gpu == SF_DECONV_GPU_OFF)
		return;
	int devices = sf_fft_cuda_device_count();

	b->why_cpu = "no CUDA device (cudaGetDeviceCount found none)";
	if (devices <= 0)
		return;
	if (b->s.gpu >= devices) {
		b->why_cpu = "the gpu option names a device this machine lacks";
		return;
	}
	int used = b->s.gpu >= 0 ? 1 : devices;

	b->gpu_slots = used * GPU_CONTEXTS_PER_DEVICE;
	if (b->gpu_slots > GPU_SLOTS_MAX)
		b->gpu_slots = GPU_SLOTS_MAX;
	for (int i = 0; i < b->gpu_slots; i++)
		b->gpu[i].device = b->s.gpu >= 0 ? b->s.gpu : i % devices;
	b->why_cpu = "every CUDA context failed";
#else
	if (b->s.gpu != SF_DECONV_GPU_OFF)
		b->why_cpu = "built without CUDA";
#endif
}

/* Make slot's context (the slot is lent to the caller, not under gpu_lock). */
static int gpu_slot_make(sf_product *p, blocks *b, gpu_slot *slot)
{
#ifdef SF_HAVE_CUDA
	sf_dims3 dims = {b->g.in[0], b->g.in[1], b->g.in[2]};
	sf_fft_config cfg = {.nthreads = 1, .measure = 0, .device = slot->device};
	sf_err ge = {0};

	if (device_fits(p, b, slot->device, &ge) == SF_OK &&
	    sf_deconv_ctx_create(&b->s.params, &b->psf, dims, sf_fft_cufft_ops(), &cfg, &slot->ctx,
	                         &ge) == SF_OK) {
		sf_log(SF_LOG_INFO, "%s: a CUDA context on device %d", p->name, slot->device);
		sf_deconv_ctx_set_stop(slot->ctx, &b->stopping);
		return SF_OK;
	}
	sf_log(SF_LOG_WARN, "%s: CUDA device %d: no context, its blocks go elsewhere: %s", p->name,
	       slot->device, ge.msg);
#else
	(void)p, (void)b, (void)slot;
#endif
	return SF_EDEVICE;
}

/* A GPU context for one block, waiting while every usable one is lent; NULL
 * when none is usable (the block goes to the CPU).  A worker holds at most
 * one slot and never waits for anything else while it holds it, so the
 * wait cannot deadlock. */
static gpu_slot *gpu_borrow(sf_product *p, blocks *b)
{
	pthread_mutex_lock(&b->gpu_lock);
	if (b->gpu_slots < 0)
		gpu_slots_init(b);
	for (;;) {
		gpu_slot *free_slot = NULL;
		int live = 0;

		for (int i = 0; i < b->gpu_slots; i++) {
			gpu_slot *g = &b->gpu[i];

			live += !g->dead;
			if (!g->dead && !g->busy && (!free_slot || (g->ctx && !free_slot->ctx)))
				free_slot = g; /* prefer a context already made */
		}
		if (!live) {
			pthread_mutex_unlock(&b->gpu_lock);
			return NULL;
		}
		if (free_slot) {
			free_slot->busy = 1;
			pthread_mutex_unlock(&b->gpu_lock);
			if (free_slot->ctx || gpu_slot_make(p, b, free_slot) == SF_OK)
				return free_slot;
			pthread_mutex_lock(&b->gpu_lock);
			free_slot->busy = 0;
			free_slot->dead = 1;
			pthread_cond_broadcast(&b->gpu_freed);
			continue;
		}
		pthread_cond_wait(&b->gpu_freed, &b->gpu_lock);
	}
}

/* Give slot back; a failed one is destroyed and never lent again. */
static void gpu_return(blocks *b, gpu_slot *slot, int failed)
{
	pthread_mutex_lock(&b->gpu_lock);
	if (failed) {
		sf_deconv_ctx_destroy(slot->ctx);
		slot->ctx = NULL;
		slot->dead = 1;
	}
	slot->busy = 0;
	pthread_cond_broadcast(&b->gpu_freed);
	pthread_mutex_unlock(&b->gpu_lock);
}

/* Give freed heap pages back to the system.  glibc keeps freed chunks under
 * its (dynamic, up to 32 MiB) mmap threshold in the freeing thread's arena,
 * where the next context or window, made by another worker, does not reuse
 * them: without this, test_deconv_memory.py saw VmHWM grow by up to 31 MiB
 * per stack switch, as if contexts were still kept.  Called per switch of
 * stacks only, not per block. */
static void give_back_free_pages(void)
{
#ifdef __GLIBC__
	malloc_trim(0);
#endif
}

/* Drop the process's FFTW context (cpu_lock held) and give its pages back. */
static void cpu_ctx_drop(void)
{
	if (!cpu_ctx)
		return;
	sf_deconv_ctx_destroy(cpu_ctx);
	cpu_ctx = NULL;
	cpu_owner = NULL;
	give_back_free_pages();
}

/* Make the process's FFTW context for stack b (cpu_lock held), with as many
 * FFT threads as the engine has workers, after dropping another stack's. */
static int cpu_ctx_make(const sf_product *p, blocks *b, sf_err *e)
{
	sf_dims3 dims = {b->g.in[0], b->g.in[1], b->g.in[2]};
	unsigned threads = engine_threads(b);
	sf_fft_config cfg = {.nthreads = 1, .measure = 0, .device = 0};
	int rc;

	if (threads > 1) /* the FFTW engine runs at most 64 */
		cfg.nthreads = threads < 64 ? (int)threads : 64;
	if (!atomic_exchange(&b->told_cpu, 1))
		sf_log(SF_LOG_INFO, "%s: deconvolving on the CPU (FFTW, %d threads): %s", p->name,
		       cfg.nthreads, b->why_cpu ? b->why_cpu : "gpu=off");
	cpu_ctx_drop();
	rc =
	    sf_deconv_ctx_create(&b->s.params, &b->psf, dims, sf_fft_fftw_ops(), &cfg, &cpu_ctx, e);
	if (rc != SF_OK)
		return rc;
	sf_deconv_ctx_set_stop(cpu_ctx, &b->stopping);
	cpu_owner = b;
	atomic_fetch_add(&cpu_ctx_made, 1);
	return SF_OK;
}

/* Whether the process's context, made for another stack, is the one b's
 * would be (cpu_lock held): the same ctx_key and PSF, and as many threads.
 * The owner is alive: blocks_destroy drops the context of its stack. */
static int cpu_ctx_fits(const blocks *b)
{
	const sf_psf *a = cpu_owner ? &cpu_owner->psf : NULL;

	return a && sf_key_equal(cpu_owner->ctx_key, b->ctx_key) &&
	       engine_threads(cpu_owner) == engine_threads(b) && a->nx == b->psf.nx &&
	       a->ny == b->psf.ny && a->nz == b->psf.nz &&
	       !memcmp(a->v, b->psf.v, a->nx * a->ny * a->nz * sizeof *a->v);
}

/* Deconvolve w->in in place on the process's FFTW context, (re)made for
 * this stack when it was made for another one or not yet. */
static int cpu_block(sf_product *p, blocks *b, blocks_worker *w, sf_deconv_stats *st, sf_err *e)
{
	uint64_t t0 = now_ns();
	int rc = SF_OK;

	pthread_mutex_lock(&cpu_lock);
	t0 = phase_add(&b->clock, PH_CPU_WAIT, t0);
	if (cpu_owner != b && cpu_ctx_fits(b)) {
		sf_deconv_ctx_set_stop(cpu_ctx, &b->stopping);
		cpu_owner = b;
		if (!atomic_exchange(&b->told_cpu, 1))
			sf_log(SF_LOG_INFO, "%s: deconvolving on the CPU (FFTW): %s", p->name,
			       b->why_cpu ? b->why_cpu : "gpu=off");
	} else if (cpu_owner != b) {
		rc = cpu_ctx_make(p, b, e);
	}
	if (rc == SF_OK)
		rc = sf_deconv_block(cpu_ctx, w->in, w->in, st, e);
	phase_add(&b->clock, PH_CPU, t0);
	pthread_mutex_unlock(&cpu_lock);
	return rc;
}

/* The number of FFTW contexts made by this process so far (tests: a switch
 * between stacks remakes the one context). */
unsigned long sf_deconv_cpu_contexts_made(void)
{
	return atomic_load(&cpu_ctx_made);
}

/* The reader of plane file `file`, reopened only when it changes. */
static int plane_reader(const blocks *b, blocks_worker *w, uint32_t file, sf_err *e)
{
	if (w->reader && w->reader_file == file)
		return SF_OK;
	sf_slide_reader_close(w->reader);
	w->reader = NULL;
	w->reader_file = file;
	return sf_slide_reader_open(b->stack->plane_info[file], &w->reader, e);
}

/* The largest float32 magnitude a block may hold: 2^100, about 1.3e30.  The
 * FFTs sum a whole padded block (up to 1.6e8 voxels for 512^3 cores), and
 * such a sum of larger values overflows float32 to inf, so the output
 * would be NaN or 0 with no word. */
#define SAMPLE_EXPONENT_MAX (127u + 100u)

/* A NaN, an infinity or a magnitude of 2^100 or more: its biased exponent. */
static int sample_unusable(uint32_t bits)
{
	return ((bits >> 23) & 0xffu) >= SAMPLE_EXPONENT_MAX;
}

/* Whether any of the n float32 samples at src is unusable.  Fixed chunks of
 * 8 let the compiler vectorise the test at -O2: 0.2 ns a sample on this
 * VM's EPYC, after a 0.07 ns copy, against 0.56 for one loop that copies
 * and tests (0.4-0.6 for the uint16 conversion). */
static int any_unusable(const uint8_t *src, size_t n)
{
	uint32_t bad = 0;
	size_t i = 0;

	for (; i + 8 <= n; i += 8) {
		uint32_t bits[8];

		memcpy(bits, src + i * sizeof bits[0], sizeof bits);
		for (int k = 0; k < 8; k++)
			bad |= (uint32_t)sample_unusable(bits[k]);
	}
	for (; i < n; i++) {
		uint32_t bits;

		memcpy(&bits, src + i * sizeof bits, sizeof bits);
		bad |= (uint32_t)sample_unusable(bits);
	}
	return bad != 0;
}

/* Source samples [0, n) of type t at src, as float, into dst: one loop per
 * type over consecutive samples, no switch or index map per sample.  Returns
 * the index of the first unusable float32 sample (sample_unusable), n when
 * all are usable (integer samples always are, and are not tested). */
static size_t convert_run(const uint8_t *src, sf_dtype t, size_t n, float *dst)
{
	if (t == SF_U8)
		for (size_t i = 0; i < n; i++)
			dst[i] = src[i];
	else if (t == SF_U16) {
		const uint16_t *s16 = (const uint16_t *)(const void *)src;

		for (size_t i = 0; i < n; i++)
			dst[i] = s16[i];
	} else {
		memcpy(dst, src, n * sizeof(float));
		if (any_unusable(src, n))
			for (size_t i = 0; i < n; i++) {
				uint32_t bits;

				memcpy(&bits, &dst[i], sizeof bits);
				if (sample_unusable(bits))
					return i;
			}
	}
	return n;
}

/* w->map[0] as runs of consecutive source columns, relative to lo. */
static void make_runs(blocks_worker *w, uint32_t n, uint32_t lo)
{
	const uint32_t *m = w->map[0];

	w->run_count = 0;
	for (uint32_t i = 0; i < n;) {
		x_run *r = &w->runs[w->run_count++];

		r->at = i;
		r->src = m[i] - lo;
		r->len = 1;
		while (i + r->len < n && m[i + r->len] == m[i] + r->len)
			r->len++;
		i += r->len;
	}
}

/* An unusable sample in a float32 plane: deconvolution would spread it over
 * every block whose window holds it (NaN, or 0 once converted to integers),
 * so the block fails with the plane and the pixel named. */
static int non_finite_error(const sf_stack *st, uint32_t z, uint32_t x, uint32_t y, float v,
                            sf_err *e)
{
	char huge[32], page[32] = "";
	const char *what = isnan(v) ? "NaN" : isinf(v) ? (v > 0 ? "inf" : "-inf") : huge;

	snprintf(huge, sizeof huge, "%g", v);
	if (st->multipage)
		snprintf(page, sizeof page, " page %u,", st->page_first + z * st->page_step + 1);
	return sf_fail(e, SF_EFORMAT,
	               "%s:%s pixel (x %u, y %u) is %s; deconvolution needs finite values under "
	               "1.3e30 (float32 sums of a block overflow beyond)",
	               st->plane_info[st->multipage ? 0 : z]->path, page, x, y, what);
}

/* Fill w->in with the block's input window from the planes: per plane, the
 * rect [lo, hi) the window's (mirrored) rows and columns need, converted to
 * float row by row, run by run. */
static int read_window(const blocks *b, blocks_worker *w, const int64_t start[3], sf_err *e)
{
	const grid *g = &b->g;
	const sf_stack *st = b->stack;
	size_t sb = sf_dtype_bytes(st->dtype);
	uint32_t lo[2] = {UINT32_MAX, UINT32_MAX}, hi[2] = {0, 0};
	size_t rw, rh;

	for (int a = 0; a < 3; a++)
		for (uint32_t i = 0; i < g->in[a]; i++) {
			uint32_t v = mirror(start[a] + i, g->dim[a]);

			w->map[a][i] = v;
			if (a < 2) {
				lo[a] = v < lo[a] ? v : lo[a];
				hi[a] = v + 1 > hi[a] ? v + 1 : hi[a];
			}
		}
	make_runs(w, g->in[0], lo[0]);
	rw = hi[0] - lo[0];
	rh = hi[1] - lo[1];
	if (rw * rh * sb > w->rect_cap) {
		free(w->rect);
		w->rect_cap = rw * rh * sb;
		if (!(w->rect = malloc(w->rect_cap))) {
			w->rect_cap = 0;
			return sf_fail(e, SF_ENOMEM, "%s: out of memory", st->name);
		}
	}
	for (uint32_t k = 0; k < g->in[2]; k++) {
		uint32_t z = w->map[2][k];
		float *dst = w->in + (size_t)k * g->in[1] * g->in[0];
		int rc = plane_reader(b, w, st->multipage ? 0 : z, e);
		uint32_t page = st->multipage ? st->page_first + z * st->page_step : 0;

		if (rc == SF_OK)
			rc = sf_slide_read_region(w->reader, 0, page, lo[0], lo[1], (uint32_t)rw,
			                          (uint32_t)rh, w->rect, e);
		if (rc != SF_OK)
			return rc;
		for (uint32_t j = 0; j < g->in[1]; j++) {
			const uint8_t *row = w->rect + (size_t)(w->map[1][j] - lo[1]) * rw * sb;
			float *out = dst + (size_t)j * g->in[0];

			for (uint32_t r = 0; r < w->run_count; r++) {
				const x_run *x = &w->runs[r];
				size_t at = convert_run(row + (size_t)x->src * sb, st->dtype,
				                        x->len, out + x->at);

				if (at < x->len)
					return non_finite_error(st, z, w->map[0][x->at + at],
					                        w->map[1][j], out[x->at + at], e);
			}
		}
	}
	return SF_OK;
}

/* Deconvolve w->in in place: on a borrowed GPU context when one is usable,
 * else on the CPU.  SF_EDEVICE when the GPU failed part way (w->in may be
 * partly overwritten: the caller reads the window again and retries; the
 * failed context is never lent again). */
static int run_block(sf_product *p, blocks *b, blocks_worker *w, sf_err *e)
{
	sf_deconv_stats stats = {0};
	gpu_slot *slot = gpu_borrow(p, b);
	uint64_t t0;
	int rc;

	if (!slot)
		return cpu_block(p, b, w, &stats, e);
	t0 = now_ns();
	rc = sf_deconv_block(slot->ctx, w->in, w->in, &stats, e);
	phase_add(&b->clock, PH_GPU, t0);
	if (rc == SF_EDEVICE)
		sf_log(SF_LOG_WARN, "%s: GPU failed, its context is dropped: %s", p->name, e->msg);
	gpu_return(b, slot, rc == SF_EDEVICE);
	return rc;
}

/* Windows a stack may hold: 2 for the CPU, 4 per GPU context (being read,
 * on the device, cropped, and one spare: 18 for one device, more than the
 * 16 workers of the H200 runs, which had a window each). */
static int window_count(blocks *b)
{
	int slots;

	pthread_mutex_lock(&b->gpu_lock);
	if (b->gpu_slots < 0)
		gpu_slots_init(b);
	slots = b->gpu_slots;
	pthread_mutex_unlock(&b->gpu_lock);
	return 2 + 4 * slots;
}

/* Free b's windows nobody borrowed (window_lock held); how many. */
static int windows_free_idle(blocks *b)
{
	int freed = 0;

	for (int i = 0; i < WINDOWS_MAX; i++)
		if (!b->window_busy[i] && b->window[i]) {
			free(b->window[i]);
			b->window[i] = NULL;
			freed++;
		}
	return freed;
}

/* Stack b is about to borrow a window: free the idle windows of the stack
 * that borrowed last, when it is another one, so at most the stacks being
 * read hold windows (their busy ones stay theirs until returned). */
static void windows_claim(blocks *b)
{
	int freed = 0;

	pthread_mutex_lock(&windows_lock);
	if (windows_owner && windows_owner != b) {
		pthread_mutex_lock(&windows_owner->window_lock);
		freed = windows_free_idle(windows_owner);
		pthread_mutex_unlock(&windows_owner->window_lock);
	}
	windows_owner = b;
	pthread_mutex_unlock(&windows_lock);
	if (freed)
		give_back_free_pages();
}

/* An input window for one block, waiting while window_count() are lent.
 * A worker holds one window at most, and waits for nothing while it holds
 * it but a GPU context (whose holders never wait for a window). */
static int window_borrow(const sf_product *p, blocks *b, float **out, sf_err *e)
{
	size_t n = (size_t)b->g.in[0] * b->g.in[1] * b->g.in[2];
	int limit = window_count(b), i;

	windows_claim(b);
	pthread_mutex_lock(&b->window_lock);
	for (;;) {
		for (i = 0; i < limit && b->window_busy[i]; i++)
			;
		if (i < limit)
			break;
		pthread_cond_wait(&b->window_freed, &b->window_lock);
	}
	b->window_busy[i] = 1;
	if (!b->window[i] && !(b->window[i] = malloc(n * sizeof(float)))) {
		b->window_busy[i] = 0;
		pthread_mutex_unlock(&b->window_lock);
		return sf_fail(e, SF_ENOMEM, "%s: out of memory for a %zu-voxel window", p->name,
		               n);
	}
	*out = b->window[i];
	pthread_mutex_unlock(&b->window_lock);
	return SF_OK;
}

static void window_return(blocks *b, float *window)
{
	pthread_mutex_lock(&b->window_lock);
	for (int i = 0; i < WINDOWS_MAX; i++)
		if (b->window[i] == window)
			b->window_busy[i] = 0;
	pthread_cond_signal(&b->window_freed);
	pthread_mutex_unlock(&b->window_lock);
}

/* Block `unit` into out, in the window w->in. */
static int compute_in_window(sf_product *p, blocks *b, blocks_worker *w, uint64_t unit,
                             uint8_t *out, sf_err *e)
{
	const grid *g = &b->g;
	uint32_t pos[3], c[3], off[3];
	int64_t start[3];
	float *dst = (float *)(void *)out;
	uint64_t t0 = now_ns();
	int rc;

	block_pos(g, unit, pos);
	for (int a = 0; a < 3; a++) {
		c[a] = block_core(g, pos, a);
		off[a] = g->halo[a] + (g->core[a] - c[a]);
		start[a] = (int64_t)pos[a] * g->core[a] - off[a];
	}
	rc = read_window(b, w, start, e);
	phase_add(&b->clock, PH_READ, t0);
	if (rc == SF_OK)
		rc = run_block(p, b, w, e);
	/* A GPU failure drops its context; the block is read again and goes to
	 * another context or the CPU (at most every slot fails once). */
	for (int tries = 0; rc == SF_EDEVICE && tries < GPU_SLOTS_MAX; tries++) {
		rc = read_window(b, w, start, e);
		if (rc == SF_OK)
			rc = run_block(p, b, w, e);
	}
	/* LsDeconv destripes the whole window (halo included) before cropping,
	 * so every block is filtered at the same width (the notch depends on it). */
	if (rc == SF_OK && b->s.destripe_sigma > 0) {
		t0 = now_ns();
		rc = sf_destripe_z(w->in, g->in[2], g->in[1], g->in[0], b->s.destripe_sigma, e);
		phase_add(&b->clock, PH_DESTRIPE, t0);
	}
	if (rc != SF_OK)
		return rc;
	t0 = now_ns();
	for (uint32_t z = 0; z < c[2]; z++)
		for (uint32_t y = 0; y < c[1]; y++)
			memcpy(dst + ((size_t)z * c[1] + y) * c[0],
			       w->in + ((size_t)(z + off[2]) * g->in[1] + y + off[1]) * g->in[0] +
			           off[0],
			       c[0] * sizeof(float));
	phase_add(&b->clock, PH_CROP, t0);
	return SF_OK;
}

static int blocks_compute(sf_product *p, void *state, uint64_t unit, uint8_t *out, sf_err *e)
{
	blocks *b = p->impl;
	blocks_worker *w = state;
	int rc = window_borrow(p, b, &w->in, e);

	if (rc != SF_OK)
		return rc;
	rc = compute_in_window(p, b, w, unit, out, e);
	window_return(b, w->in);
	w->in = NULL;
	return rc;
}

#ifdef SF_HAVE_CUDA
/* The CUDA runtime start-up and each used device's primary context (about
 * 0.9 s on the H200 at the first block before), made here rather than by
 * the first block's worker, so a copy or a viewer's first plane does not
 * wait for them.  Shared by every stack of the process (the runtime starts
 * once); no cuFFT context is made and no block is computed, so a stack
 * nobody reads holds no device memory of its own. */
static void *gpu_warm_main(void *arg)
{
	blocks *b = arg;
	int devices[GPU_SLOTS_MAX], count = 0;

	pthread_mutex_lock(&b->gpu_lock);
	if (b->gpu_slots < 0)
		gpu_slots_init(b);
	for (int i = 0; i < b->gpu_slots; i++) {
		int seen = 0;

		for (int k = 0; k < count; k++)
			seen |= devices[k] == b->gpu[i].device;
		if (!seen)
			devices[count++] = b->gpu[i].device;
	}
	pthread_mutex_unlock(&b->gpu_lock);
	for (int i = 0; i < count; i++) {
		size_t free_bytes, total_bytes;
		sf_err e = {0};

		if (sf_fft_cuda_mem_info(devices[i], &free_bytes, &total_bytes, &e) != SF_OK)
			sf_log(SF_LOG_DEBUG, "deconvolution: CUDA device %d: %s", devices[i],
			       e.msg);
	}
	return NULL;
}
#endif

/* With gpu=auto or a device, start the device off the read path (a CUDA
 * build only: elsewhere blocks go to the CPU and there is nothing to warm). */
static void blocks_warm(sf_product *p)
{
#ifdef SF_HAVE_CUDA
	blocks *b = p->impl;

	if (b->s.gpu != SF_DECONV_GPU_OFF && !b->warm_running)
		b->warm_running = pthread_create(&b->warm_thread, NULL, gpu_warm_main, b) == 0;
#else
	(void)p;
#endif
}

static void blocks_destroy(sf_product *p)
{
	blocks *b = p->impl;

	if (b->warm_running)
		pthread_join(b->warm_thread, NULL);
	phase_log(p->name, &b->clock);
	pthread_mutex_lock(&cpu_lock);
	if (cpu_owner == b)
		cpu_ctx_drop();
	pthread_mutex_unlock(&cpu_lock);
	pthread_mutex_lock(&windows_lock);
	if (windows_owner == b)
		windows_owner = NULL;
	pthread_mutex_unlock(&windows_lock);
	for (int i = 0; i < b->gpu_slots; i++)
		sf_deconv_ctx_destroy(b->gpu[i].ctx);
	pthread_cond_destroy(&b->gpu_freed);
	pthread_mutex_destroy(&b->gpu_lock);
	for (int i = 0; i < WINDOWS_MAX; i++)
		free(b->window[i]);
	pthread_cond_destroy(&b->window_freed);
	pthread_mutex_destroy(&b->window_lock);
	sf_psf_free(&b->psf);
	free(b);
	free(p);
}

static void blocks_stop(sf_product *p)
{
	blocks *b = p->impl;

	atomic_store(&b->stopping, 1);
}

static const sf_product_ops blocks_ops = {
    .worker_start = blocks_worker_start,
    .worker_stop = blocks_worker_stop,
    .compute = blocks_compute,
    .unit_bytes = blocks_unit_bytes,
    .destroy = blocks_destroy,
    .stop = blocks_stop,
    .warm = blocks_warm,
};

static sf_key mix_double(sf_key k, double v)
{
	uint64_t bits;

	memcpy(&bits, &v, sizeof bits);
	return sf_key_mix_u64(k, bits);
}

/* The optics and iteration parameters mixed into k (blocks_key, ctx_key). */
static sf_key mix_params(sf_key k, const sf_deconv_params *p)
{
	const double optics[] = {p->dxy,
	                         p->dz,
	                         p->lambda_ex,
	                         p->lambda_em,
	                         p->na,
	                         p->rf,
	                         p->fcyl,
	                         p->slitwidth,
	                         p->numit,
	                         p->lambda_damping,
	                         p->regularize_interval,
	                         p->stop_criterion,
	                         p->dark,
	                         p->taper,
	                         p->init_value,
	                         (double)p->eps};

	for (size_t i = 0; i < sizeof optics / sizeof optics[0]; i++)
		k = mix_double(k, optics[i]);
	if (p->accelerate) /* only when on: caches made before the option stay valid */
		k = sf_key_mix_str(k, "accelerate=1");
	return k;
}

/* Everything an FFTW context is made from: the parameters (the PSF is made
 * from the optics), the pre-filter and the window shape.  Stacks with the
 * same ctx_key (channels of one setup, tiles of one acquisition) share the
 * process's context without remaking it (cpu_block). */
static sf_key ctx_key(const sf_deconv_params *p, const grid *g)
{
	sf_key k = mix_params(sf_key_of("scopefs deconv context", 22), p);

	for (int a = 0; a < 3; a++) {
		k = mix_double(k, p->gaussian_sigma[a]);
		k = sf_key_mix_u64(k, (uint64_t)p->gaussian_filter_size[a]);
		k = sf_key_mix_u64(k, p->fft_shape[a]);
		k = sf_key_mix_u64(k, g->in[a]);
	}
	return k;
}

/* Everything a block's bytes depend on. */
static sf_key blocks_key(const sf_stack *st, const sf_deconv_settings *s, const grid *g)
{
	const sf_deconv_params *p = &s->params;
	/* v2: padded sizes from the FFT cost model, fused FFTW passes; v3: the
	 * FFTW engine keeps only the real part of a symmetric PSF's spectrum;
	 * v4: and only half of it along z for a z-even PSF (each step moves
	 * blocks by ~3e-7 relative: caches of different steps are not mixed) */
	sf_key k = sf_key_of("scopefs deconv blocks v4", 24);
	k = mix_double(k, s->destripe_sigma);
	uint32_t files = st->multipage ? 1 : st->planes;

	k = sf_key_mix_u64(k, st->dtype);
	k = sf_key_mix_u64(k, st->multipage);
	for (uint32_t z = 0; z < files; z++) {
		k = sf_key_mix_str(k, st->plane_info[z]->path);
		k = sf_key_mix_u64(k, st->plane_info[z]->file_size);
		k = sf_key_mix_u64(k, (uint64_t)st->plane_info[z]->mtime_ns);
	}
	/* Only for a channel of a multichannel file (fewer planes than pages, or
	 * not pages 0..planes-1): the keys of every other stack stay as they were. */
	if (st->multipage && (st->planes != st->plane_info[0]->channels || st->page_first != 0 ||
	                      st->page_step != 1)) {
		k = sf_key_mix_str(k, "pages");
		k = sf_key_mix_u64(k, st->page_first);
		k = sf_key_mix_u64(k, st->page_step);
	}
	k = mix_params(k, p);
	/* The filtered block is clamped at 0 with dark 0 too (it was only with
	 * dark > 0): blocks of float32 sources with negative voxels changed.
	 * Integer sources cannot be negative, so only float32 keys with dark 0
	 * move and every other cache stays valid. */
	if (st->dtype == SF_F32 && !(p->dark > 0))
		k = sf_key_mix_str(k, "clamp0");
	for (int a = 0; a < 3; a++) {
		k = mix_double(k, p->gaussian_sigma[a]);
		k = sf_key_mix_u64(k, (uint64_t)p->gaussian_filter_size[a]);
		k = sf_key_mix_u64(k, p->fft_shape[a]);
		k = sf_key_mix_u64(k, g->dim[a]);
		k = sf_key_mix_u64(k, g->core[a]);
		k = sf_key_mix_u64(k, g->halo[a]);
	}
	return k;
}

static int blocks_create(const sf_stack *st, const sf_deconv_settings *s, uint64_t mem,
                         sf_engine *const *engine, sf_product **out, sf_err *e)
{
	sf_product *p = calloc(1, sizeof *p);
	blocks *b = calloc(1, sizeof *b);
	sf_psf_optics o;
	int rc;

	*out = NULL;
	if (!p || !b) {
		free(p);
		free(b);
		return sf_fail(e, SF_ENOMEM, "stack %s: out of memory", st->name);
	}
	b->stack = st;
	b->s = *s;
	b->engine = engine;
	sf_deconv_params_optics(&s->params, &o);
	rc = sf_psf_make(&o, &b->psf, e);
	if (rc != SF_OK) {
		free(p);
		free(b);
		return rc;
	}
	grid_make(&b->g, st, s, &b->psf, mem);
	pthread_mutex_init(&b->gpu_lock, NULL);
	pthread_cond_init(&b->gpu_freed, NULL);
	pthread_mutex_init(&b->window_lock, NULL);
	pthread_cond_init(&b->window_freed, NULL);
	b->gpu_slots = -1;
	p->ops = &blocks_ops;
	p->key = blocks_key(st, s, &b->g);
	b->ctx_key = ctx_key(&s->params, &b->g);
	p->elem_bytes = 4;
	p->unit_count = (uint64_t)b->g.count[0] * b->g.count[1] * b->g.count[2];
	p->impl = b;
	snprintf(p->name, sizeof p->name, "deconv blocks:%s", st->name[0] ? st->name : "(root)");
	*out = p;
	return SF_OK;
}

/* ---- output scaling -------------------------------------------------------- */

/* MATLAB prctile(v, pct): sorted x_1..x_n sit at percentiles 100 (i - 0.5)/n,
 * linear in between, clamped to x_1 / x_n outside.  v is reordered. */
/* Order statistics a = v[k], b = v[k + 1] of the sorted v (k + 1 < n).
 * Near an end (clipval's 99.99 % is 1,678 values from it in a 256^3 block)
 * a heap pass over v finds them far faster than quickselect; same values. */
#define TAIL_MAX 65536

static void order_pair(float *v, size_t n, size_t k, double *a, double *b)
{
	size_t m = k + 2 <= TAIL_MAX ? k + 2 : n - k; /* the tail that holds both */
	float *t = m <= TAIL_MAX ? malloc(m * sizeof *t) : NULL;

	if (t && m == k + 2) {
		sf_select_tail(v, n, m, 0, t);
		*a = t[k], *b = t[k + 1];
	} else if (t) { /* the n - k largest, descending: v[k] is the last */
		sf_select_tail(v, n, m, 1, t);
		*a = t[m - 1], *b = t[m - 2];
	} else { /* mid-range percentiles, or no memory for the tail */
		float next;

		sf_select_kth(v, n, k);
		next = v[k + 1];
		for (size_t i = k + 2; i < n; i++)
			next = v[i] < next ? v[i] : next;
		*a = v[k], *b = next;
	}
	free(t);
}

static double percentile(float *v, size_t n, double pct)
{
	double pos = (double)n * pct / 100.0 - 0.5, a, b;
	size_t k;

	if (pos <= 0) {
		sf_select_kth(v, n, 0);
		return v[0];
	}
	if (pos >= (double)(n - 1)) {
		sf_select_kth(v, n, n - 1);
		return v[n - 1];
	}
	k = (size_t)pos;
	order_pair(v, n, k, &a, &b);
	return a + (pos - (double)k) * (b - a);
}

struct scale_sample;

typedef struct planes {
	sf_product *blocks_product; /* not owned */
	blocks *b;                  /* its impl (put_values adds to its clock) */
	sf_engine *const *engine;   /* the mount's engine pointer */
	const sf_layout *layout;
	uint64_t strips; /* units per plane */
	uint32_t rows;   /* rows per strip */
	sf_dtype out;
	double gain; /* scale > 0 */
	char *scale_path;
	char scale_key[33];         /* planes key (hex) named by scale_path and its record */
	pthread_mutex_t scale_lock; /* guards the fields below */
	pthread_cond_t scale_done;  /* broadcast when a sample settles */
	int have_scale;
	double dmin, dmax;
	struct scale_sample *samples; /* sample_count entries (scale=auto) */
	uint64_t sample_count;
	int samples_prefetched; /* the sample blocks were handed to the engine (scale_lock) */
	int scale_file_read;    /* the record was looked at once (scale_lock) */
	/* One bit per plane, set when a strip of it is computed (atomic or):
	 * a reader going through z has read plane z - 1 before plane z. */
	atomic_uint_fast64_t *plane_seen;
} planes;

/* The scale record, CACHE/deconv-scale-<key>.txt, one line:
 *   dmin <hex float> dmax <hex float> key <32 hex> xxh64 <16 hex>
 * then a comment line.  The check is the XXH64 (seed 0) of the two doubles'
 * bytes followed by the key's 32 hex digits, so a damaged record is never
 * trusted (a changed digit would rescale every plane of the stack,
 * silently), nor one that belongs to another stack (a record copied or
 * renamed to this stack's name): the key in the record must be the one in
 * its name.  Records of the older form (no key) are sampled again. */
#define SCALE_TMP_INFIX   ".txt.tmp."
#define SCALE_STALE_TMP_S 300 /* a temp record this old belongs to a dead daemon */

static unsigned long long scale_check(double lo, double hi, const char *key_hex)
{
	unsigned char buf[2 * sizeof(double) + 32];

	memcpy(buf, &lo, sizeof lo);
	memcpy(buf + sizeof lo, &hi, sizeof hi);
	memcpy(buf + 2 * sizeof(double), key_hex, 32);
	return (unsigned long long)XXH64(buf, sizeof buf, 0);
}

/* The record's file, opened without blocking (a FIFO put at its name would
 * hang every reader of deconvolved/), or NULL when it is not a regular file
 * (*why says so) or cannot be opened (*why NULL: none there). */
static FILE *open_scale_file(const char *path, const char **why)
{
	int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
	struct stat st;
	FILE *f;

	*why = NULL;
	if (fd < 0) {
		if (errno != ENOENT)
			*why = strerror(errno);
		return NULL;
	}
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
		*why = "not a regular file";
		close(fd);
		return NULL;
	}
	if (!(f = fdopen(fd, "r"))) {
		*why = strerror(errno);
		close(fd);
	}
	return f;
}

/* Read the record into pl->dmin/dmax; 0 (with one log line, unless there is
 * none) when it is missing or not to be trusted. */
static int read_scale_file(planes *pl)
{
	const char *why;
	FILE *f = open_scale_file(pl->scale_path, &why);
	double lo, hi;
	unsigned long long check;
	char key[33] = "";
	int fields;

	if (!f) {
		if (why)
			sf_log(SF_LOG_WARN,
			       "%s: not a valid scale record (%s); sampling the blocks "
			       "again",
			       pl->scale_path, why);
		return 0;
	}
	fields = fscanf(f, "dmin %la dmax %la key %32[0-9a-f] xxh64 %llx", &lo, &hi, key, &check);
	fclose(f);
	if (fields == 4 && strlen(key) == 32 && strcmp(key, pl->scale_key) != 0) {
		sf_log(SF_LOG_WARN,
		       "%s: scale record of another stack (key %s); sampling the blocks again",
		       pl->scale_path, key);
		return 0;
	}
	if (fields != 4 || strlen(key) != 32 || !isfinite(lo) || !isfinite(hi) || lo > hi ||
	    check != scale_check(lo, hi, key)) {
		sf_log(SF_LOG_WARN,
		       "%s: not a valid scale record (damaged or of an older form); sampling the "
		       "blocks again",
		       pl->scale_path);
		return 0;
	}
	pl->dmin = lo;
	pl->dmax = hi;
	return 1;
}

/* Remove deconv-scale-*.txt.tmp.* in dir older than SCALE_STALE_TMP_S: a
 * daemon killed between writing and renaming left them, and no later one
 * writes under that pid's name.  A younger one may be another live mount's. */
static void remove_stale_scale_tmps(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *ent;
	time_t now = time(NULL);

	if (!d)
		return;
	while ((ent = readdir(d))) {
		struct stat st;

		if (strncmp(ent->d_name, "deconv-scale-", 13) ||
		    !strstr(ent->d_name, SCALE_TMP_INFIX))
			continue;
		if (fstatat(dirfd(d), ent->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
		    !S_ISDIR(st.st_mode) && now - st.st_mtime > SCALE_STALE_TMP_S &&
		    unlinkat(dirfd(d), ent->d_name, 0) == 0)
			sf_log(SF_LOG_INFO, "%s/%s: removed a stale temporary scale record", dir,
			       ent->d_name);
	}
	closedir(d);
}

/* Record (dmin, dmax) for later mounts: temp file + rename.  The temp name
 * is made afresh (O_EXCL after unlink), so nothing found there, such as a
 * FIFO, is opened. */
static void write_scale_file(const planes *pl, uint64_t sampled, uint64_t total)
{
	char tmp[PATH_MAX + 32], dir[PATH_MAX];
	const char *slash = strrchr(pl->scale_path, '/');
	FILE *f = NULL;
	int fd;

	snprintf(dir, sizeof dir, "%.*s", slash ? (int)(slash - pl->scale_path) : 1,
	         slash ? pl->scale_path : ".");
	remove_stale_scale_tmps(dir);
	snprintf(tmp, sizeof tmp, "%s" SCALE_TMP_INFIX "%d", pl->scale_path, (int)getpid());
	unlink(tmp);
	fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
	if (fd < 0 || !(f = fdopen(fd, "w"))) {
		sf_log(SF_LOG_WARN, "%s: cannot record the scale: %s", pl->scale_path,
		       strerror(errno));
		if (fd >= 0) {
			close(fd);
			unlink(tmp);
		}
		return;
	}
	fprintf(f,
	        "dmin %a dmax %a key %s xxh64 %016llx\n# dmin %.9g dmax %.9g from %" PRIu64
	        " of %" PRIu64 " blocks\n",
	        pl->dmin, pl->dmax, pl->scale_key, scale_check(pl->dmin, pl->dmax, pl->scale_key),
	        pl->dmin, pl->dmax, sampled, total);
	if (fclose(f) != 0 || rename(tmp, pl->scale_path) != 0) {
		sf_log(SF_LOG_WARN, "%s: cannot record the scale: %s", pl->scale_path,
		       strerror(errno));
		unlink(tmp);
	}
}

/* Percentiles of sample i, one state per sampled block (under scale_lock). */
enum { SAMPLE_PENDING, SAMPLE_BUSY, SAMPLE_DONE };

typedef struct scale_sample {
	double lo, hi; /* [100 - clipval, clipval] percentiles of the block's core */
	int state;
} scale_sample;

/* Block i of the n sampled: floor((2i + 1) total / (2n)), spread evenly. */
static uint64_t sample_unit(uint64_t i, uint64_t n, uint64_t total)
{
	return (2 * i + 1) * total / (2 * n);
}

/* The two percentiles of one sampled block, read through the engine (made
 * inline when absent: the caller is a worker).  Runs without scale_lock. */
static int sample_percentiles(planes *pl, uint64_t unit, double *lo, double *hi, sf_err *e)
{
	sf_product *bp = pl->blocks_product;
	double clip = pl->b->s.params.clipval;
	size_t bytes = bp->ops->unit_bytes(bp, unit);
	float *v = malloc(bytes);
	int rc;

	if (!v)
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", bp->name);
	rc = sf_engine_read(*pl->engine, bp, unit, 0, bytes, (uint8_t *)v, e);
	if (rc == SF_OK) {
		*lo = percentile(v, bytes / 4, 100.0 - clip);
		*hi = percentile(v, bytes / 4, clip);
	}
	free(v);
	return rc;
}

/* With scale_lock: the smallest low and largest high over the samples. */
static void finish_scale(planes *pl)
{
	uint64_t total = pl->blocks_product->unit_count;
	double lo = INFINITY, hi = -INFINITY;

	for (uint64_t i = 0; i < pl->sample_count; i++) {
		lo = pl->samples[i].lo < lo ? pl->samples[i].lo : lo;
		hi = pl->samples[i].hi > hi ? pl->samples[i].hi : hi;
	}
	pl->dmin = lo;
	pl->dmax = hi;
	pl->have_scale = 1;
	sf_log(SF_LOG_INFO, "%s: scale from %" PRIu64 " of %" PRIu64 " blocks: dmin %g dmax %g",
	       pl->blocks_product->name, pl->sample_count, total, lo, hi);
	write_scale_file(pl, pl->sample_count, total);
}

/* LsDeconv's (dmin, dmax), from the record in the cache folder or from the
 * sampled blocks.  Every worker that needs the scale helps: it takes the next
 * sample nobody has started (beginning at `start`, so workers spread out),
 * and waits only when every remaining sample is being computed by another.
 * Each sample is a pure function of its block, so the result does not depend
 * on who computed what. */
static int ensure_scale(planes *pl, uint64_t start, sf_err *e)
{
	int rc = SF_OK;

	pthread_mutex_lock(&pl->scale_lock);
	if (!pl->have_scale && !pl->scale_file_read) {
		pl->scale_file_read = 1;
		pl->have_scale = read_scale_file(pl);
	}
	if (!pl->have_scale && !pl->samples_prefetched) {
		/* Every sample block to the engine at once, so idle workers (and
		 * every GPU context) compute them side by side, not only the few
		 * workers whose strips wait for the scale. */
		pl->samples_prefetched = 1;
		pthread_mutex_unlock(&pl->scale_lock);
		for (uint64_t k = 0; k < pl->sample_count; k++)
			sf_engine_prefetch(
			    *pl->engine, pl->blocks_product,
			    sample_unit(k, pl->sample_count, pl->blocks_product->unit_count));
		pthread_mutex_lock(&pl->scale_lock);
	}
	while (!pl->have_scale && rc == SF_OK) {
		uint64_t n = pl->sample_count, pending = n, done = 0;

		for (uint64_t k = 0; k < n; k++) {
			uint64_t i = (start + k) % n;

			done += pl->samples[i].state == SAMPLE_DONE;
			if (pending == n && pl->samples[i].state == SAMPLE_PENDING)
				pending = i;
		}
		if (done == n) {
			finish_scale(pl);
			break;
		}
		if (pending == n) {
			pthread_cond_wait(&pl->scale_done, &pl->scale_lock);
			continue;
		}
		pl->samples[pending].state = SAMPLE_BUSY;
		pthread_mutex_unlock(&pl->scale_lock);
		double lo = 0, hi = 0;
		rc = sample_percentiles(pl, sample_unit(pending, n, pl->blocks_product->unit_count),
		                        &lo, &hi, e);
		pthread_mutex_lock(&pl->scale_lock);
		pl->samples[pending].state = rc == SF_OK ? SAMPLE_DONE : SAMPLE_PENDING;
		pl->samples[pending].lo = lo;
		pl->samples[pending].hi = hi;
		pthread_cond_broadcast(&pl->scale_done);
	}
	pthread_mutex_unlock(&pl->scale_lock);
	return rc;
}

/* ---- the planes product ---------------------------------------------------- */

static size_t planes_unit_bytes(const sf_product *p, uint64_t unit)
{
	const planes *pl = p->impl;

	return sf_layout_unit_bytes(pl->layout, unit % pl->strips);
}

static int planes_worker_start(sf_product *p, void **state, sf_err *e)
{
	const planes *pl = p->impl;
	float *buf = malloc((size_t)pl->rows * pl->b->g.core[0] * sizeof(float));

	if (!buf)
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", p->name);
	*state = buf;
	return SF_OK;
}

static void planes_worker_stop(sf_product *p, void *state)
{
	(void)p;
	free(state);
}

/* round(x) clamped to [0, top], as the integer it is: the bytes of
 * v = round(x); v = v < 0 ? 0 : v > top ? top : v; (uint16_t)v, without the
 * libm call.  Below 0.5 (NaN too, which x86's conversion made 0) round gives
 * at most 0; from top up at least top; in between x - trunc(x) is exact, so
 * comparing it with 0.5 rounds halves away from zero as round does. */
static inline uint32_t round_clamp(double x, double top)
{
	uint32_t t;

	if (!(x >= 0.5))
		return 0;
	if (x >= top)
		return (uint32_t)top;
	t = (uint32_t)x;
	return t + (x - (double)t >= 0.5);
}

/* Convert n values of src into the strip at dst (element index at). */
static void put_values(const planes *pl, const float *src, size_t n, uint8_t *dst, size_t at)
{
	double amp = pl->b->s.signal_amp;
	double top = pl->out == SF_U8 ? 255.0 : 65535.0;
	double range = pl->dmax > pl->dmin ? pl->dmax - pl->dmin : 1.0;
	double mul = pl->gain > 0 ? pl->gain : top * amp / range;
	double sub = pl->gain > 0 ? 0.0 : pl->dmin;
	double shift = pl->gain > 0 ? 0.0 : amp;

	if (pl->out == SF_F32)
		memcpy(dst + at * 4, src, n * sizeof(float));
	else if (pl->out == SF_U8)
		for (size_t i = 0; i < n; i++)
			dst[at + i] =
			    (uint8_t)round_clamp(((double)src[i] - sub) * mul - shift, top);
	else {
		uint16_t *d16 = (uint16_t *)(void *)dst + at;

		for (size_t i = 0; i < n; i++)
			d16[i] = (uint16_t)round_clamp(((double)src[i] - sub) * mul - shift, top);
	}
}

/* Hand the engine the blocks of units [first, end) of the blocks product
 * (known ones are ignored). */
static void prefetch_units(const planes *pl, uint64_t first, uint64_t end)
{
	if (end > pl->blocks_product->unit_count)
		end = pl->blocks_product->unit_count;
	for (uint64_t u = first; u < end; u++)
		sf_engine_prefetch(*pl->engine, pl->blocks_product, u);
}

/* Mark plane z read; whether plane z - 1 was read before (a reader going
 * through z: cp, a z scroll in Fiji). */
static int plane_in_sequence(const planes *pl, uint32_t z)
{
	atomic_fetch_or_explicit(&pl->plane_seen[z / 64], (uint_fast64_t)1 << (z % 64),
	                         memory_order_relaxed);
	return z > 0 &&
	       (atomic_load_explicit(&pl->plane_seen[(z - 1) / 64], memory_order_relaxed) >>
	            ((z - 1) % 64) &
	        1);
}

/* Before a strip of plane z reads block rows [by0, by1]: every block of
 * those rows and of the next row of the slab, so all workers and GPU contexts make
 * them side by side (the strip's own worker would make them one after
 * another).  When the reader goes through z and plane z lies in the second
 * half of its slab of blocks, also the same rows of the next slab, so
 * the devices keep busy instead of waiting at every slab; a single plane
 * viewed alone never pays for its neighbours' slab. */
static void prefetch_block_rows(const planes *pl, uint32_t z, uint32_t by0, uint32_t by1)
{
	const grid *g = &pl->b->g;
	uint32_t bz = z / g->core[2];
	uint64_t row = g->count[0], slab = (uint64_t)g->count[1] * row;
	int in_sequence = plane_in_sequence(pl, z);

	uint32_t next_row = by1 + 1 < g->count[1] ? by1 + 1 : by1; /* within the slab */

	prefetch_units(pl, bz * slab + by0 * row, bz * slab + (next_row + 1) * row);
	if (in_sequence && z - bz * g->core[2] >= g->core[2] / 2 && bz + 1 < g->count[2])
		prefetch_units(pl, (bz + 1) * slab + by0 * row, (bz + 1) * slab + (by1 + 1) * row);
}

static int planes_compute(sf_product *p, void *state, uint64_t unit, uint8_t *out, sf_err *e)
{
	planes *pl = p->impl;
	const grid *g = &pl->b->g;
	sf_engine *eng = *pl->engine;
	float *buf = state;
	uint32_t z = (uint32_t)(unit / pl->strips), bz = z / g->core[2];
	uint32_t y0 = (uint32_t)(unit % pl->strips * pl->rows);
	uint32_t h = g->dim[1] - y0 < pl->rows ? g->dim[1] - y0 : pl->rows;
	/* flip: output rows [y0, y0 + h) are volume rows [vy0, vy0 + h) reversed */
	uint32_t vy0 = pl->b->s.flip ? g->dim[1] - y0 - h : y0;
	int rc = SF_OK;

	if (!eng)
		return sf_fail(e, SF_EINVAL, "%s: engine not started", p->name);
	if (pl->out != SF_F32 && pl->gain <= 0 && (rc = ensure_scale(pl, unit, e)) != SF_OK)
		return rc;
	prefetch_block_rows(pl, z, vy0 / g->core[1], (vy0 + h - 1) / g->core[1]);
	for (uint32_t by = vy0 / g->core[1]; by <= (vy0 + h - 1) / g->core[1] && rc == SF_OK;
	     by++) {
		uint32_t pos[3] = {0, by, bz};
		uint32_t cy = block_core(g, pos, 1), cz_off = z - bz * g->core[2];
		uint32_t ya = vy0 > by * g->core[1] ? vy0 : by * g->core[1];
		uint32_t yb = vy0 + h < by * g->core[1] + cy ? vy0 + h : by * g->core[1] + cy;

		/* Start at a column that depends on the strip, so workers on
		 * neighbouring strips compute different blocks at once. */
		for (uint32_t i = 0; i < g->count[0] && rc == SF_OK; i++) {
			uint32_t bx = (uint32_t)((unit + i) % g->count[0]);
			uint64_t bunit = ((uint64_t)bz * g->count[1] + by) * g->count[0] + bx;
			uint32_t cx;
			uint64_t t0;
			size_t off;

			pos[0] = bx;
			cx = block_core(g, pos, 0);
			off = (((size_t)cz_off * cy) + (ya - by * g->core[1])) * cx * sizeof(float);
			t0 = now_ns();
			rc = sf_engine_read(eng, pl->blocks_product, bunit, off,
			                    (size_t)(yb - ya) * cx * sizeof(float), (uint8_t *)buf,
			                    e);
			t0 = phase_add(&pl->b->clock, PH_FETCH, t0);
			for (uint32_t r = 0; rc == SF_OK && r < yb - ya; r++) {
				uint32_t row = ya + r - vy0; /* in the strip */

				if (pl->b->s.flip)
					row = h - 1 - row;
				put_values(pl, buf + (size_t)r * cx, cx, out,
				           (size_t)row * g->dim[0] + (size_t)bx * g->core[0]);
			}
			if (rc == SF_OK)
				phase_add(&pl->b->clock, PH_PUT, t0);
		}
	}
	return rc;
}

static void planes_destroy(sf_product *p)
{
	planes *pl = p->impl;

	pthread_cond_destroy(&pl->scale_done);
	pthread_mutex_destroy(&pl->scale_lock);
	free(pl->samples);
	free(pl->plane_seen);
	free(pl->scale_path);
	free(pl);
	free(p);
}

static const sf_product_ops planes_ops = {
    .worker_start = planes_worker_start,
    .worker_stop = planes_worker_stop,
    .compute = planes_compute,
    .unit_bytes = planes_unit_bytes,
    .destroy = planes_destroy,
};

static sf_key planes_key(const sf_product *bp, const planes *pl)
{
	const sf_deconv_settings *s = &pl->b->s;
	sf_key k = sf_key_mix_str(bp->key, "scopefs deconv planes v1");

	k = sf_key_mix_u64(k, pl->rows);
	k = sf_key_mix_u64(k, pl->out);
	k = mix_double(k, s->scale);
	k = mix_double(k, s->signal_amp);
	k = mix_double(k, s->params.clipval);
	k = sf_key_mix_u64(k, (uint64_t)s->flip);
	return sf_key_mix_u64(k, s->scale > 0 ? 0 : s->scale_sample);
}

/* Voxels all the blocks' input windows hold: the work a grid costs. */
static double grid_window_voxels(const grid *g)
{
	return (double)g->count[0] * g->count[1] * g->count[2] * g->in[0] * g->in[1] * g->in[2];
}

/* Small cores come from a small mem (the default 128M gives 64^3 for the
 * default PSF and filter): say which mem gives the largest cores, but only
 * when those cores need fewer window voxels than now (a stack that is one
 * block already, or whose mem already allows them, gets no advice). */
static void warn_small_cores(const char *name, const sf_stack *st, const sf_deconv_settings *s,
                             const blocks *b, double windows)
{
	grid best;
	uint32_t in[3];
	uint64_t need, unit;
	const char *suffix;

	grid_make(&best, st, s, &b->psf, UINT64_MAX);
	if (!(grid_window_voxels(&best) < grid_window_voxels(&b->g)))
		return;
	/* The mem grid_make needs to pick BLOCK_EDGE_MAX: twice its working set. */
	for (int a = 0; a < 3; a++)
		in[a] = (BLOCK_EDGE_MAX < best.dim[a] ? BLOCK_EDGE_MAX : best.dim[a]) +
		        2 * best.halo[a];
	need = 2 * working_set(in, &b->psf, s->params.accelerate);
	unit = need >= (1ull << 30) ? 1ull << 30 : 1ull << 20;
	suffix = unit == 1ull << 30 ? "G" : "M";
	sf_log(SF_LOG_WARN,
	       "%s: the halo makes every block %.1fx its voxels; mem=%llu%s (cores %ux%ux%u, "
	       "%.2fx) or deconv_block=N computes %.1fx fewer voxels",
	       name, windows, (unsigned long long)((need + unit - 1) / unit), suffix, best.core[0],
	       best.core[1], best.core[2],
	       (double)best.in[0] * best.in[1] * best.in[2] /
	           ((double)best.core[0] * best.core[1] * best.core[2]),
	       grid_window_voxels(&b->g) / grid_window_voxels(&best));
}

/* float32 output holds the deconvolved values as they are: scale=GAIN and
 * signal_amp only map them into uint8/uint16.  Say so once per stack when
 * either was set to anything but its default (only a source that names it
 * can do that), rather than serve the same bytes as without it silently. */
static void warn_unused_scaling(const char *name, const sf_deconv_settings *s, sf_dtype out)
{
	char gain[64] = "", amp[64] = "";

	if (out != SF_F32 || (!(s->scale > 0) && s->signal_amp == 1))
		return;
	if (s->scale > 0)
		snprintf(gain, sizeof gain, "scale=%g", s->scale);
	if (s->signal_amp != 1)
		snprintf(amp, sizeof amp, "signal_amp=%g", s->signal_amp);
	sf_log(SF_LOG_WARN,
	       "%s: option%s %s%s%s ignored: float32 output holds the deconvolved values "
	       "unscaled (scale and signal_amp apply to uint8 and uint16 output only)",
	       name, gain[0] && amp[0] ? "s" : "", gain, gain[0] && amp[0] ? " and " : "", amp);
}

int sf_product_deconv_create(const sf_stack *st, const sf_deconv_settings *s,
                             const sf_layout *plane_layout, sf_engine *const *engine,
                             const char *cache_dir, uint64_t mem_bytes, sf_product **blocks_out,
                             sf_product **planes_out, sf_err *e)
{
	sf_product *bp, *p;
	planes *pl;
	char hex[33], path[PATH_MAX];
	int rc;

	*blocks_out = *planes_out = NULL;
	if (st->plane_info[0]->samples != 1)
		return sf_fail(e, SF_EUNSUPPORTED,
		               "stack %s: %u samples per pixel; deconvolution takes one", st->name,
		               st->plane_info[0]->samples);
	rc = blocks_create(st, s, mem_bytes, engine, &bp, e);
	if (rc != SF_OK)
		return rc;
	p = calloc(1, sizeof *p);
	pl = calloc(1, sizeof *pl);
	if (!p || !pl) {
		free(p);
		free(pl);
		bp->ops->destroy(bp);
		return sf_fail(e, SF_ENOMEM, "stack %s: out of memory", st->name);
	}
	pl->blocks_product = bp;
	pl->b = bp->impl;
	pl->engine = engine;
	pl->layout = plane_layout;
	pl->strips = sf_layout_unit_count(plane_layout);
	pl->rows = sf_layout_unit_rows(plane_layout);
	pl->out = sf_deconv_output_dtype(s, st);
	pl->gain = s->scale;
	pthread_mutex_init(&pl->scale_lock, NULL);
	pthread_cond_init(&pl->scale_done, NULL);
	pl->sample_count =
	    s->scale_sample && s->scale_sample < bp->unit_count ? s->scale_sample : bp->unit_count;
	p->ops = &planes_ops;
	p->key = planes_key(bp, pl);
	p->elem_bytes = (unsigned)sf_dtype_bytes(pl->out);
	p->unit_count = pl->strips * st->planes;
	p->impl = pl;
	snprintf(p->name, sizeof p->name, "deconvolved:%s", st->name[0] ? st->name : "(root)");
	sf_key_hex(p->key, hex);
	memcpy(pl->scale_key, hex, sizeof pl->scale_key);
	snprintf(path, sizeof path, "%s/deconv-scale-%s.txt", cache_dir ? cache_dir : ".", hex);
	pl->samples = calloc(pl->sample_count, sizeof *pl->samples);
	pl->plane_seen = calloc(st->planes / 64 + 1, sizeof *pl->plane_seen);
	if (!(pl->scale_path = strdup(path)) || !pl->samples || !pl->plane_seen) {
		planes_destroy(p);
		bp->ops->destroy(bp);
		return sf_fail(e, SF_ENOMEM, "stack %s: out of memory", st->name);
	}
	{
		const grid *g = &pl->b->g;

		double windows = (double)g->in[0] * g->in[1] * g->in[2] /
		                 ((double)g->core[0] * g->core[1] * g->core[2]);

		sf_log(SF_LOG_INFO,
		       "%s: blocks %ux%ux%u (x y z) of core %ux%ux%u, halo %u %u %u, PSF "
		       "%zux%zux%zu; each block computes %.1fx its voxels",
		       p->name, g->count[0], g->count[1], g->count[2], g->core[0], g->core[1],
		       g->core[2], g->halo[0], g->halo[1], g->halo[2], pl->b->psf.nx, pl->b->psf.ny,
		       pl->b->psf.nz, windows);
		if (windows > 2.0 && !s->block)
			warn_small_cores(p->name, st, s, pl->b, windows);
	}
	warn_unused_scaling(p->name, s, pl->out);
	*blocks_out = bp;
	*planes_out = p;
	return SF_OK;
}

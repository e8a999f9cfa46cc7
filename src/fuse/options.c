/* options.c — command line and preset parsing into one sf_options.
 *
 * One table (option_table) lists every key; the parser, the preset reader
 * and the help text all walk it.  A key is marked with the source that gave
 * it (the command line, or one of the presets), and a preset only fills keys
 * that the command line and later presets left. */
#include "scopefs/options.h"
#include "scopefs/conf.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <linux/magic.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "scopefs/log.h"
#include "scopefs/product_deconv.h"
#include "scopefs/warp.h"

#ifndef SCOPEFS_VERSION
#define SCOPEFS_VERSION "0.1.0"
#endif

/* OPT_DECONV: a deconvolution setting, checked by product_deconv.c and kept
 * as text in o->deconv (each stack applies it, then its own settings). */
/* OPT_REG: a registration setting, checked by autoreg.c into o->reg. */
enum opt_kind {
	OPT_STRING,
	OPT_SIZE,
	OPT_COUNT,
	OPT_FUSE_FLAG,
	OPT_FUSE_VALUE,
	OPT_DECONV,
	OPT_REG
};

typedef struct option_def {
	const char *key;
	enum opt_kind kind;
	const char *help;
} option_def;

static const option_def option_table[] = {
    {"cache", OPT_STRING,
     "cache=DIR        disk cache folder (default $XDG_CACHE_HOME/scopefs, else ~/.cache/scopefs)"},
    {"cache_size", OPT_SIZE,
     "cache_size=SIZE  disk cache bound, e.g. 50G (default 20G; 0: unbounded)"},
    {"mem", OPT_SIZE, "mem=SIZE         RAM bound for decoded tiles (default 128M)"},
    {"threads", OPT_COUNT,
     "threads=N        worker threads, up to 4096 (default: one per usable CPU, as nproc counts)"},
    {"readahead", OPT_COUNT,
     "readahead=N      tiles scheduled ahead of a sequential reader (default 2 x threads; 0: "
     "none)"},
    {"reference", OPT_STRING,
     "reference=NAME   reference slide, file name or stem (default: first by name)"},
    {"preset", OPT_STRING, "preset=NAME      read options from mountopts/NAME"},
    {"transforms", OPT_STRING, "transforms=DIR   transform files of the moving slides"},
    {"log", OPT_STRING, "log=FILE         append log lines to FILE (daemonized: else lost)"},
    {"interp", OPT_STRING, "interp=NAME      warp interpolation: bilinear, bicubic, nearest"},
    {"background", OPT_STRING, "background=V     value outside a warped slide (default 0)"},
    {"gpu", OPT_STRING, "gpu=auto|off|N   GPU for warps and deconvolution (default auto)"},
    {"reg", OPT_REG, "reg=auto|off     register slides that have no transform file (auto)"},
    {"reg_channel", OPT_REG,
     "reg_channel=C    registration channel, name or index (default: DAPI or Hoechst, else 0)"},
    {"reg_metric", OPT_REG, "reg_metric=M     auto|ncc|mi (auto: mi brightfield vs fluorescence)"},
    {"reg_dim", OPT_REG, "reg_dim=N        longest side of the affine fit (default 1024)"},
    {"reg_nonrigid_dim", OPT_REG, "reg_nonrigid_dim=N  non-rigid grid side (2000; 0: none)"},
    {"reg_order", OPT_REG, "reg_order=O      direct|serial (default direct)"},
    {"reg_eager", OPT_REG, "reg_eager=0|1    register at mount, not on first use"},
    {"reg_micro", OPT_REG, "reg_micro=0|1    refine the field at reg_micro_dim, in tiles (0)"},
    {"reg_micro_dim", OPT_REG, "reg_micro_dim=N  longest side of the micro level (4096)"},
    {"dxy", OPT_DECONV,
     "dxy=UM           deconvolution: voxel size in x/y, micrometres (required)"},
    {"dz", OPT_DECONV, "dz=UM            deconvolution: plane spacing, micrometres (required)"},
    {"lambda_ex", OPT_DECONV, "lambda_ex=NM     excitation wavelength (or a folder Ex_561_Em_600)"},
    {"lambda_em", OPT_DECONV, "lambda_em=NM     emission wavelength"},
    {"na", OPT_DECONV, "na=V             detection NA (default 0.40)"},
    {"rf", OPT_DECONV, "rf=V             refractive index (default 1.42)"},
    {"fcyl", OPT_DECONV, "fcyl=MM          cylinder lens focal length (default 240)"},
    {"slitwidth", OPT_DECONV, "slitwidth=MM     slit width (default 12)"},
    {"numit", OPT_DECONV, "numit=N          Richardson-Lucy iterations (default 6)"},
    {"lambda_damping", OPT_DECONV, "lambda_damping=V R26 blend weight in [0, 1) (default 0)"},
    {"regularize_interval", OPT_DECONV, "regularize_interval=N  Gaussian every N-th iteration (3)"},
    {"clipval", OPT_DECONV, "clipval=P        percentile of the output range (default 99.99)"},
    {"stop_criterion", OPT_DECONV, "stop_criterion=P stop when ||x|| changes <= P% (0: off)"},
    {"accelerate", OPT_DECONV, "accelerate=0|1   Biggs-Andrews accelerated RL (default 0)"},
    {"gaussian_sigma", OPT_DECONV, "gaussian_sigma=X:Y:Z  pre-filter sigma, voxels (0.5:0.5:2.5)"},
    {"gaussian_filter_size", OPT_DECONV, "gaussian_filter_size=X:Y:Z  taps (13:13:25)"},
    {"dark", OPT_DECONV, "dark=V           subtracted after the pre-filter (default 0)"},
    {"signal_amp", OPT_DECONV, "signal_amp=V     LsDeconv's amplification (default 1)"},
    {"destripe_sigma", OPT_DECONV,
     "destripe_sigma=S z destriping after deconvolution (default 0: off)"},
    {"denoise_strength", OPT_DECONV,
     "denoise_strength=N  LsDeconv's dark: N x the pre-filter's centre weight"},
    {"flip", OPT_DECONV, "flip=0|1         planes upside down (LsDeconv flip_upside_down)"},
    {"convert_to_8bit", OPT_DECONV, "convert_to_8bit=1  same as dtype=uint8"},
    {"convert_to_16bit", OPT_DECONV, "convert_to_16bit=1 same as dtype=uint16"},
    {"scale", OPT_DECONV, "scale=auto|GAIN  output scaling (default auto: clipval range)"},
    {"dtype", OPT_DECONV, "dtype=T          same|uint8|uint16|float32 (default same)"},
    {"deconv_block", OPT_DECONV, "deconv_block=N   block core edge, voxels (default: from mem)"},
    {"scale_sample", OPT_DECONV, "scale_sample=N|all  blocks sampled by scale=auto (default 16)"},
    {"allow_other", OPT_FUSE_FLAG, "allow_other      let other users see the mount"},
    {"allow_root", OPT_FUSE_FLAG, "allow_root       let root see the mount"},
    {"default_permissions", OPT_FUSE_FLAG, "default_permissions  kernel permission checks"},
    {"auto_unmount", OPT_FUSE_FLAG, "auto_unmount     unmount when the daemon dies"},
    {"ro", OPT_FUSE_FLAG, "ro               read-only (always on)"},
    {"fsname", OPT_FUSE_VALUE, "fsname=NAME      file system name in mtab"},
    {"subtype", OPT_FUSE_VALUE, "subtype=NAME     file system subtype in mtab"},
};
#define OPTION_COUNT (sizeof option_table / sizeof option_table[0])

enum { SOURCE_CLI = 1, SOURCE_PRESET = 2 };

typedef struct parse_state {
	sf_options *o;
	/* Which source gave each key: 0 none, SOURCE_CLI, or SOURCE_PRESET + k
	 * for the k-th preset.  Sources are applied from the strongest (the
	 * command line, then the last preset) to the weakest, and a key that a
	 * stronger source gave is skipped; a source may repeat its own key. */
	int set[OPTION_COUNT];
	int source;           /* the source being applied */
	char fuse_opts[1024]; /* accumulated libfuse mount options */
} parse_state;

int sf_parse_size(const char *text, uint64_t *out)
{
	char *end;
	unsigned long long v;
	uint64_t mult = 1;

	if (!text || !isdigit((unsigned char)text[0]))
		return SF_EINVAL;
	errno = 0;
	v = strtoull(text, &end, 10);
	if (errno)
		return SF_EINVAL;
	switch (toupper((unsigned char)*end)) {
	case 'K':
		mult = 1ull << 10;
		end++;
		break;
	case 'M':
		mult = 1ull << 20;
		end++;
		break;
	case 'G':
		mult = 1ull << 30;
		end++;
		break;
	case 'T':
		mult = 1ull << 40;
		end++;
		break;
	default: break;
	}
	if (toupper((unsigned char)*end) == 'B')
		end++;
	if (*end || (v && mult > UINT64_MAX / v))
		return SF_EINVAL;
	*out = v * mult;
	return SF_OK;
}

/* Counts (threads, readahead) stop at 4096: more threads than that is a
 * typo, not a machine. */
#define COUNT_MAX 4096

/* SF_EINVAL when text is not a whole number, SF_ERANGE past COUNT_MAX. */
static int parse_count(const char *text, unsigned *out)
{
	char *end;
	unsigned long v;

	if (!text || !isdigit((unsigned char)text[0]))
		return SF_EINVAL;
	errno = 0;
	v = strtoul(text, &end, 10);
	if (*end)
		return SF_EINVAL;
	if (errno || v > COUNT_MAX)
		return SF_ERANGE;
	*out = (unsigned)v;
	return SF_OK;
}

static int parse_interp(const char *value, sf_options *o, const char *origin, sf_err *e)
{
	sf_interp i;
	if (sf_interp_parse(value, &i) != SF_OK)
		return sf_fail(e, SF_EINVAL,
		               "%soption 'interp': '%s' is not bilinear, bicubic or nearest",
		               origin, value);
	o->interp = (int)i;
	return SF_OK;
}

static int parse_background(const char *value, sf_options *o, const char *origin, sf_err *e)
{
	char *end;
	double v = strtod(value, &end);
	if (*end || !isfinite(v))
		return sf_fail(e, SF_EINVAL, "%soption 'background': '%s' is not a number", origin,
		               value);
	o->background = v;
	return SF_OK;
}

/* gpu=auto (-1: the first device if any), off (-2), or a device index. */
static int parse_gpu(const char *value, sf_options *o, const char *origin, sf_err *e)
{
	unsigned n;
	if (!strcmp(value, "auto"))
		o->gpu = -1;
	else if (!strcmp(value, "off"))
		o->gpu = -2;
	else if (parse_count(value, &n) == SF_OK && n < 64)
		o->gpu = (int)n;
	else
		return sf_fail(e, SF_EINVAL,
		               "%soption 'gpu': '%s' is not auto, off or a device number", origin,
		               value);
	return SF_OK;
}

static int set_string(char **field, const char *value, sf_err *e, const char *key)
{
	char *copy = strdup(value);
	if (!copy)
		return sf_fail(e, SF_ENOMEM, "option %s: out of memory", key);
	free(*field);
	*field = copy;
	return SF_OK;
}

/* Append opt (unescaped) to the libfuse -o list, escaping its commas and
 * backslashes again: libfuse splits that list on unescaped commas too. */
static int add_fuse_opt(parse_state *ps, const char *opt, sf_err *e)
{
	size_t len = strlen(ps->fuse_opts), cap = sizeof ps->fuse_opts;

	if (len && len + 1 < cap)
		ps->fuse_opts[len++] = ',';
	for (const char *c = opt; *c; c++) {
		if (len + 3 >= cap)
			return sf_fail(e, SF_EINVAL, "option %s: too many mount options", opt);
		if (*c == ',' || *c == '\\')
			ps->fuse_opts[len++] = '\\';
		ps->fuse_opts[len++] = *c;
	}
	if (len + 1 >= cap)
		return sf_fail(e, SF_EINVAL, "option %s: too many mount options", opt);
	ps->fuse_opts[len] = '\0';
	return SF_OK;
}

/* Check one deconvolution setting alone and append "key=value" to
 * o->deconv (later items win when a stack applies the list). */
static int add_deconv_opt(sf_options *o, const char *key, const char *value, const char *origin,
                          sf_err *e)
{
	sf_deconv_settings scratch;
	size_t len = o->deconv ? strlen(o->deconv) : 0;
	char *grown;
	int rc;

	/* o->deconv is itself a comma list: an escaped comma cannot live in it */
	if (strchr(value, ','))
		return sf_fail(e, SF_EINVAL, "%soption '%s': '%s' holds a comma", origin, key,
		               value);
	sf_deconv_settings_default(&scratch);
	rc = sf_deconv_settings_apply(&scratch, key, value, origin, e);
	if (rc != SF_OK)
		return rc;
	grown = realloc(o->deconv, len + strlen(key) + strlen(value) + 3);
	if (!grown)
		return sf_fail(e, SF_ENOMEM, "option %s: out of memory", key);
	sprintf(grown + len, "%s%s=%s", len ? "," : "", key, value);
	o->deconv = grown;
	return SF_OK;
}

/* The mount-wide deconvolution settings together (na < rf, odd filter
 * sizes): a nonsense combination is an option error. */
static int check_deconv_opts(const sf_options *o, sf_err *e)
{
	sf_deconv_settings s;
	int rc;

	sf_deconv_settings_default(&s);
	rc = sf_deconv_settings_apply_list(&s, o->deconv, "", e);
	return rc == SF_OK ? sf_deconv_settings_check(&s, "", e) : rc;
}

/* preset= may be given more than once: the names are kept in order, one a
 * line (a name cannot hold a newline: it came from a -o list or argv). */
static int add_preset_name(sf_options *o, const char *name, sf_err *e)
{
	size_t n = o->preset ? strlen(o->preset) : 0, m = strlen(name);
	char *joined = realloc(o->preset, n + m + 2);
	if (!joined)
		return sf_fail(e, SF_ENOMEM, "option preset: out of memory");
	if (n)
		joined[n++] = '\n';
	memcpy(joined + n, name, m + 1);
	o->preset = joined;
	return SF_OK;
}

/* Apply "key" or "key=value" (from -o or a preset line `origin`) for the
 * source ps->source. */
static int apply_option(parse_state *ps, const char *item, const char *origin, sf_err *e);

/* Parse item into scratch options and drop them: a value the command line
 * overrides is still checked, or a shared preset's malformed line
 * ("threads=2x") would fail only for the users who do not override it. */
static int check_only(const parse_state *ps, const char *item, const char *origin, sf_err *e)
{
	sf_options scratch = {0};
	parse_state sp = {.o = &scratch, .source = ps->source};
	int rc;

	sf_reg_settings_default(&scratch.reg);
	rc = apply_option(&sp, item, origin, e);
	sf_options_free(&scratch);
	return rc;
}

static int apply_option(parse_state *ps, const char *item, const char *origin, sf_err *e)
{
	const char *eq = strchr(item, '=');
	size_t klen = eq ? (size_t)(eq - item) : strlen(item);
	const char *value = eq ? eq + 1 : NULL;
	sf_options *o = ps->o;
	size_t i;

	for (i = 0; i < OPTION_COUNT; i++)
		if (strlen(option_table[i].key) == klen &&
		    !strncmp(option_table[i].key, item, klen))
			break;
	if (i == OPTION_COUNT)
		return sf_fail(e, SF_EINVAL, "%sunknown option '%.*s'", origin, (int)klen, item);
	if (ps->set[i] && ps->set[i] != ps->source)
		return check_only(ps, item, origin, e); /* a stronger source gave it */
	ps->set[i] = ps->source;
	const option_def *d = &option_table[i];
	if ((d->kind == OPT_FUSE_FLAG) != (value == NULL))
		return sf_fail(e, SF_EINVAL, "%soption '%s' %s", origin, d->key,
		               value ? "takes no value" : "needs a value");
	if (value && !*value)
		return sf_fail(e, SF_EINVAL, "%soption '%s' has an empty value", origin, d->key);
	switch (d->kind) {
	case OPT_FUSE_FLAG: return strcmp(d->key, "ro") ? add_fuse_opt(ps, d->key, e) : SF_OK;
	case OPT_FUSE_VALUE: return add_fuse_opt(ps, item, e);
	case OPT_SIZE: {
		uint64_t v;
		if (sf_parse_size(value, &v) != SF_OK)
			return sf_fail(e, SF_EINVAL,
			               "%soption '%s': malformed size '%s' (e.g. 512M, 50G)",
			               origin, d->key, value);
		if (!strcmp(d->key, "mem"))
			o->mem = v;
		else
			o->cache_size = v;
		return SF_OK;
	}
	case OPT_COUNT: {
		unsigned v;
		int rc = parse_count(value, &v);
		if (rc == SF_ERANGE)
			return sf_fail(e, SF_EINVAL, "%soption '%s': %s is over the limit of %d",
			               origin, d->key, value, COUNT_MAX);
		if (rc != SF_OK)
			return sf_fail(e, SF_EINVAL, "%soption '%s': malformed count '%s'", origin,
			               d->key, value);
		if (!strcmp(d->key, "threads"))
			o->threads = v;
		else
			o->readahead = v;
		return SF_OK;
	}
	case OPT_DECONV: return add_deconv_opt(o, d->key, value, origin, e);
	case OPT_REG: return sf_reg_settings_apply(&o->reg, d->key, value, origin, e);
	case OPT_STRING:
		if (!strcmp(d->key, "cache"))
			return set_string(&o->cache_dir, value, e, d->key);
		if (!strcmp(d->key, "reference"))
			return set_string(&o->reference, value, e, d->key);
		if (!strcmp(d->key, "transforms"))
			return set_string(&o->transforms, value, e, d->key);
		if (!strcmp(d->key, "log"))
			return set_string(&o->log_path, value, e, d->key);
		if (!strcmp(d->key, "interp"))
			return parse_interp(value, o, origin, e);
		if (!strcmp(d->key, "background"))
			return parse_background(value, o, origin, e);
		if (!strcmp(d->key, "gpu"))
			return parse_gpu(value, o, origin, e);
		return add_preset_name(o, value, e);
	}
	return SF_OK;
}

/* Cut the item that starts at s at its first unescaped comma and unescape
 * it in place.  A backslash makes the next character plain, as in libfuse's
 * -o lists (fuse_opt.c): "\," is a comma inside a value, "\\" a
 * backslash.  (libfuse's "\NNN" octal form is not read: it could make a
 * newline, which preset names and log lines keep out.)  Returns where the
 * next item starts, or NULL when this item ended the text. */
static char *take_item(char *s)
{
	char *d = s, *next;

	while (*s && *s != ',') {
		if (*s == '\\' && s[1])
			s++;
		*d++ = *s++;
	}
	next = *s ? s + 1 : NULL;
	*d = '\0';
	return next;
}

/* Split a -o list on unescaped commas and apply each item (empty items,
 * as in "a,,b", are skipped). */
static int apply_option_list(parse_state *ps, const char *list, sf_err *e)
{
	char *copy = strdup(list);
	int rc = SF_OK;

	if (!copy)
		return sf_fail(e, SF_ENOMEM, "out of memory");
	for (char *item = copy, *next; item && rc == SF_OK; item = next) {
		next = take_item(item);
		if (*item)
			rc = apply_option(ps, item, "", e);
	}
	free(copy);
	return rc;
}

/* mountopts/ beside the tree the binary was built in (build/scopefs ->
 * ../mountopts), else the installed copy.  tried receives the places
 * looked in before path, for the message when path is missing too. */
static void preset_path(const char *name, char *path, size_t cap, char *tried, size_t tcap)
{
	char exe[PATH_MAX];
	const char *env = getenv("SCOPEFS_PRESETS");
	ssize_t n;

	tried[0] = '\0';
	if (strchr(name, '/')) {
		snprintf(path, cap, "%s", name);
		return;
	}
	if (env && *env) {
		snprintf(path, cap, "%s/%s", env, name);
		return;
	}
	n = readlink("/proc/self/exe", exe, sizeof exe - 1);
	if (n > 0) {
		exe[n] = '\0';
		char *slash = strrchr(exe, '/');
		if (slash)
			*slash = '\0';
		snprintf(path, cap, "%s/../mountopts/%s", exe, name);
		if (access(path, R_OK) == 0)
			return;
		snprintf(tried, tcap, "%s, ", path);
	}
	snprintf(path, cap, "/usr/share/scopefs/mountopts/%s", name);
}

/* The preset file at path, opened for reading: a regular file (a folder
 * opens, then reads as an empty preset, and the mount went ahead without
 * the options the user meant; a FIFO would block the open: O_NONBLOCK). */
static FILE *preset_open(const char *name, const char *path, const char *tried, sf_err *e)
{
	struct stat st;
	int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
	FILE *f = fd >= 0 ? fdopen(fd, "r") : NULL;

	if (!f) {
		int err = errno;
		if (fd >= 0)
			close(fd);
		sf_fail(
		    e, SF_EINVAL, "option 'preset': cannot read preset '%s' (looked in %s%s): %s%s",
		    name, tried, path, strerror(err),
		    strchr(name, '/') ? "" : "; set SCOPEFS_PRESETS=DIR or give the file's path");
		return NULL;
	}
	if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
		sf_fail(e, SF_EINVAL, "option 'preset': preset '%s' (%s) is not a file", name,
		        path);
		fclose(f);
		return NULL;
	}
	return f;
}

static int apply_preset(parse_state *ps, const char *name, sf_err *e)
{
	char path[PATH_MAX + 64], tried[PATH_MAX + 80], line[1024], origin[PATH_MAX + 96];
	unsigned lineno = 0;
	FILE *f;
	char *s;
	int rc;

	preset_path(name, path, sizeof path, tried, sizeof tried);
	if (!(f = preset_open(name, path, tried, e)))
		return SF_EINVAL;
	while ((rc = sf_conf_next(f, path, line, sizeof line, &lineno, &s, e)) == SF_OK) {
		if (!strncmp(s, "preset=", 7)) {
			rc = sf_fail(e, SF_EINVAL, "%s:%u: a preset cannot name another preset",
			             path, lineno);
			break;
		}
		/* One option a line, unescaped as in -o: a bare comma would hand
		 * the rest of the line to FUSE unchecked (fsname=x,allow_other). */
		if (take_item(s)) {
			rc = sf_fail(e, SF_EINVAL,
			             "%s:%u: one option per line (write a comma inside a value "
			             "as \\,)",
			             path, lineno);
			break;
		}
		snprintf(origin, sizeof origin, "%s:%u: ", path, lineno);
		if ((rc = apply_option(ps, s, origin, e)) != SF_OK)
			break;
	}
	fclose(f);
	return rc == SF_ENOTFOUND ? SF_OK : rc;
}

/* The preset's deconvolution items go before the command line's in
 * o->deconv, so the command line also wins where one key overrides another
 * (dark and denoise_strength, dtype and convert_to_8bit): a stack applies
 * the list in order. */
static int apply_preset_before_cli(parse_state *ps, const char *name, sf_err *e)
{
	sf_options *o = ps->o;
	char *cli = o->deconv;
	int rc;

	o->deconv = NULL;
	rc = apply_preset(ps, name, e);
	if (rc == SF_OK && cli && o->deconv) {
		size_t n = strlen(o->deconv), m = strlen(cli);
		char *joined = realloc(o->deconv, n + m + 2);
		if (!joined) {
			rc = sf_fail(e, SF_ENOMEM, "option 'preset': out of memory");
		} else {
			joined[n] = ',';
			memcpy(joined + n + 1, cli, m + 1);
			o->deconv = joined;
		}
	} else if (rc == SF_OK && cli) {
		o->deconv = cli;
		cli = NULL;
	}
	free(cli);
	return rc;
}

/* Whether every preset in names ('\n'-separated) opens, in the order given:
 * apply_presets runs last first, so of two missing presets the message
 * named the second, and the user learnt of the first only after fixing it. */
static int presets_readable(const char *names, sf_err *e)
{
	char name[PATH_MAX], path[PATH_MAX + 64], tried[PATH_MAX + 80];

	for (const char *at = names; *at;) {
		size_t len = strcspn(at, "\n");
		FILE *f;

		snprintf(name, sizeof name, "%.*s", (int)len, at);
		preset_path(name, path, sizeof path, tried, sizeof tried);
		if (!(f = preset_open(name, path, tried, e)))
			return SF_EINVAL;
		fclose(f);
		at += len + (at[len] == '\n');
	}
	return SF_OK;
}

/* Every preset, the last given first: each one only fills keys that the
 * command line and later presets left, and puts its deconvolution items
 * before theirs, so o->deconv ends up in command-line order of sources
 * (first preset, ..., last preset, command line) and the later one wins. */
static int apply_presets(parse_state *ps, sf_err *e)
{
	if (presets_readable(ps->o->preset, e) != SF_OK)
		return SF_EINVAL;
	char *names = strdup(ps->o->preset);
	if (!names)
		return sf_fail(e, SF_ENOMEM, "option preset: out of memory");
	int count = 1, rc = SF_OK;
	for (const char *c = names; *c; c++)
		count += *c == '\n';
	for (int k = count - 1; k >= 0 && rc == SF_OK; k--) {
		char *name = names;
		for (int j = 0; j < k; j++)
			name = strchr(name, '\n') + 1;
		char *end = strchr(name, '\n');
		if (end)
			*end = '\0';
		ps->source = SOURCE_PRESET + k;
		rc = apply_preset_before_cli(ps, name, e);
	}
	free(names);
	return rc;
}

/* $XDG_CACHE_HOME/scopefs, else ~/.cache/scopefs.  A relative
 * XDG_CACHE_HOME is ignored, as the XDG Base Directory spec says: it would
 * put the cache wherever the daemon happened to start. */
static char *default_cache_dir(void)
{
	const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
	char buf[PATH_MAX];

	if (xdg && xdg[0] == '/')
		snprintf(buf, sizeof buf, "%s/scopefs", xdg);
	else
		snprintf(buf, sizeof buf, "%s/.cache/scopefs", home && *home ? home : "/tmp");
	return strdup(buf);
}

/* The real path of path's longest existing ancestor, plus the rest of path
 * as given (which may hold "." and ".."). */
static int resolve_existing_prefix(const char *path, char *out, size_t cap)
{
	char probe[PATH_MAX], resolved[PATH_MAX];
	char *cut;

	if ((size_t)snprintf(probe, sizeof probe, "%s", path) >= sizeof probe)
		return SF_ERANGE;
	for (;;) {
		if (realpath(probe, resolved))
			return (size_t)snprintf(out, cap, "%s%s", resolved, path + strlen(probe)) <
			               cap
			           ? SF_OK
			           : SF_ERANGE;
		cut = strrchr(probe, '/');
		if (!cut)
			break;
		if (cut == probe) {
			probe[1] = '\0';
			continue;
		}
		*cut = '\0';
	}
	if (!getcwd(resolved, sizeof resolved))
		return SF_EIO;
	return (size_t)snprintf(out, cap, "%s/%s", resolved, path) < cap ? SF_OK : SF_ERANGE;
}

/* Absolute path, in place, without empty, "." or ".." components: ".."
 * drops the component before it ("/.." is "/").  Purely textual. */
static void normalise_lexically(char *path)
{
	char *src = path, *dst = path;

	while (*src) {
		while (*src == '/')
			src++;
		size_t n = strcspn(src, "/");
		int dot = n == 1 && src[0] == '.', dotdot = n == 2 && !strncmp(src, "..", 2);

		if (dotdot) {
			while (dst > path && *--dst != '/')
				;
		} else if (n && !dot) {
			*dst++ = '/';
			memmove(dst, src, n);
			dst += n;
		}
		src += n;
	}
	if (dst == path)
		*dst++ = '/';
	*dst = '\0';
}

/* The absolute form of a path that may not exist yet, as the kernel would
 * resolve it once its folders are made.  The part after the longest
 * existing ancestor is normalised as text (W/nothere/../raw is W/raw: the
 * kernel resolves ".." of a folder made later the same way), then resolved
 * again, since that text may lead back into existing folders or links.
 * The second pass leaves no "..": the normalised text has none. */
static int absolute_future_path(const char *path, char *out, size_t cap)
{
	char once[PATH_MAX];
	int rc = resolve_existing_prefix(path, once, sizeof once);

	if (rc != SF_OK)
		return rc;
	normalise_lexically(once);
	if ((rc = resolve_existing_prefix(once, out, cap)) != SF_OK)
		return rc;
	normalise_lexically(out); /* drops a trailing '/' */
	return SF_OK;
}

/* path (absolute by now) is dir or below it. */
static int inside_dir(const char *path, const char *dir)
{
	size_t n = strlen(dir);

	if (n == 1 && dir[0] == '/')
		return 1;
	return !strncmp(path, dir, n) && (path[n] == '/' || path[n] == '\0');
}

/* A path option `key` (given as `given`, absolute `abs`) is kept out of
 * RAW_DIR (never written to) and out of MOUNTPOINT: the mount hides what
 * is there, and once mounted the path leads into scopefs's own read-only
 * tree, so the cache's scale records and the like fail half-way. */
static int check_outside(const char *key, const char *given, const char *abs, const char *raw,
                         const char *mnt, sf_err *e)
{
	int in_raw = inside_dir(abs, raw), in_mnt = inside_dir(abs, mnt);
	const char *resolved = strcmp(given, abs) ? abs : NULL; /* shown when it differs */

	if (!in_raw && !in_mnt)
		return SF_OK;
	return sf_fail(e, SF_EINVAL, "option '%s': '%s'%s%s%s is inside %s '%s'; %s", key, given,
	               resolved ? " (" : "", resolved ? resolved : "", resolved ? ")" : "",
	               in_raw ? "RAW_DIR" : "MOUNTPOINT", in_raw ? raw : mnt,
	               in_raw ? "the raw dataset is never written to"
	                      : "the mount would hide it and lead it into scopefs's own tree");
}

/* cache= (or the default) and log=FILE made absolute (the daemon changes
 * to /), normalised, and kept out of RAW_DIR and MOUNTPOINT. */
static int check_written_path(const char *key, char **field, const char *raw, const char *mnt,
                              sf_err *e)
{
	char abs[PATH_MAX];
	int rc;

	if (!*field)
		return SF_OK;
	if (absolute_future_path(*field, abs, sizeof abs) != SF_OK)
		return sf_fail(e, SF_EINVAL, "option '%s': cannot resolve '%s'", key, *field);
	if ((rc = check_outside(key, *field, abs, raw, mnt, e)) != SF_OK)
		return rc;
	return set_string(field, abs, e, key);
}

/* transforms= must name a folder.  A typo would otherwise mount without a
 * word, and with reg=auto scopefs would register every slide itself instead
 * of using the user's transforms.  Kept absolute: the daemon leaves the
 * working folder when it detaches, and files are looked up after that. */
static int check_transforms_dir(sf_options *o, const char *mnt, sf_err *e)
{
	char dir[PATH_MAX];
	struct stat st;

	if (!o->transforms)
		return SF_OK;
	if (!realpath(o->transforms, dir) || stat(dir, &st) != 0)
		return sf_fail(e, SF_EINVAL, "option 'transforms': '%s': %s", o->transforms,
		               strerror(errno));
	if (!S_ISDIR(st.st_mode))
		return sf_fail(e, SF_EINVAL, "option 'transforms': '%s' is not a folder",
		               o->transforms);
	if (inside_dir(dir, mnt))
		return sf_fail(e, SF_EINVAL,
		               "option 'transforms': '%s' is inside MOUNTPOINT '%s'; the mount "
		               "would hide it",
		               o->transforms, mnt);
	return set_string(&o->transforms, dir, e, "transforms");
}

/* Whether folder path is the root of a FUSE mount (another scopefs, most
 * likely): a FUSE file system whose device differs from its parent's. */
static int is_fuse_mount_root(const char *path, const struct stat *st)
{
	char parent[PATH_MAX + 4];
	struct statfs fs;
	struct stat up;

	snprintf(parent, sizeof parent, "%s/..", path);
	return statfs(path, &fs) == 0 && fs.f_type == FUSE_SUPER_MAGIC &&
	       (stat(parent, &up) != 0 || up.st_dev != st->st_dev || !strcmp(path, "/"));
}

/* MOUNTPOINT: an existing folder, neither in RAW_DIR nor holding it (the
 * mount would hide the raw files the daemon reads), not a FUSE mount
 * already (a second daemon would stack on the first and hide it), and kept
 * absolute: libfuse unmounts by this path after the daemon has moved to /,
 * where a relative one names another folder, so a signal left a dead mount. */
static int check_mountpoint(sf_options *o, const char *raw, sf_err *e)
{
	char mnt[PATH_MAX];
	struct stat st;

	if (!realpath(o->mountpoint, mnt) || stat(mnt, &st) != 0)
		return sf_fail(
		    e, SF_EINVAL, "MOUNTPOINT '%s': %s%s", o->mountpoint, strerror(errno),
		    errno == ENOTCONN ? " (a mount whose daemon died: fusermount3 -u it)" : "");
	if (!S_ISDIR(st.st_mode))
		return sf_fail(e, SF_EINVAL, "MOUNTPOINT '%s' is not a folder", o->mountpoint);
	if (inside_dir(mnt, raw) || inside_dir(raw, mnt))
		return sf_fail(e, SF_EINVAL,
		               "MOUNTPOINT '%s' and RAW_DIR '%s' overlap: the mount would hide the "
		               "raw files it serves",
		               o->mountpoint, raw);
	if (is_fuse_mount_root(mnt, &st))
		return sf_fail(
		    e, SF_EINVAL,
		    "MOUNTPOINT '%s' is already a FUSE mount (a scopefs still running?): "
		    "unmount it first (fusermount3 -u)",
		    o->mountpoint);
	return set_string(&o->mountpoint, mnt, e, "MOUNTPOINT");
}

/* MOUNTPOINT first: cache=, log= and transforms= are checked against its
 * absolute form. */
static int check_paths(sf_options *o, sf_err *e)
{
	char raw[PATH_MAX];
	int rc;

	if (!realpath(o->raw_dir, raw))
		return sf_fail(e, SF_EINVAL, "RAW_DIR '%s': %s", o->raw_dir, strerror(errno));
	if (!o->cache_dir && !(o->cache_dir = default_cache_dir()))
		return sf_fail(e, SF_ENOMEM, "out of memory");
	rc = check_mountpoint(o, raw, e);
	if (rc == SF_OK)
		rc = check_written_path("cache", &o->cache_dir, raw, o->mountpoint, e);
	if (rc == SF_OK)
		rc = check_written_path("log", &o->log_path, raw, o->mountpoint, e);
	if (rc == SF_OK)
		rc = check_transforms_dir(o, o->mountpoint, e);
	if (rc != SF_OK)
		return rc;
	return set_string(&o->raw_dir, raw, e, "RAW_DIR");
}

/* The SF_FUSE_* options given, from any source: main() reads these bits
 * rather than parse the escaped list again. */
static unsigned fuse_given(const parse_state *ps)
{
	static const struct {
		const char *key;
		unsigned bit;
	} bits[] = {{"fsname", SF_FUSE_FSNAME},
	            {"subtype", SF_FUSE_SUBTYPE},
	            {"allow_other", SF_FUSE_ALLOW_OTHER},
	            {"default_permissions", SF_FUSE_DEFAULT_PERMISSIONS}};
	unsigned given = 0;

	for (size_t i = 0; i < OPTION_COUNT; i++)
		for (size_t b = 0; b < sizeof bits / sizeof bits[0]; b++)
			if (ps->set[i] && !strcmp(option_table[i].key, bits[b].key))
				given |= bits[b].bit;
	return given;
}

int sf_options_parse(int argc, char **argv, sf_options *o, sf_err *e)
{
	parse_state ps = {.o = o, .source = SOURCE_CLI};
	int positional = 0, rc;

	o->mem = 128ull << 20;
	o->cache_size = 20ull << 30;
	o->readahead = SF_READAHEAD_AUTO;
	o->interp = SF_INTERP_BILINEAR;
	o->gpu = -1;
	sf_reg_settings_default(&o->reg);
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "-h") || !strcmp(a, "--help"))
			o->show_help = 1;
		else if (!strcmp(a, "-V") || !strcmp(a, "--version"))
			o->show_version = 1;
		else if (!strcmp(a, "-f"))
			o->foreground = 1;
		else if (!strcmp(a, "-d")) {
			o->debug = 1;
			o->foreground = 1;
		} else if (!strcmp(a, "-s"))
			o->single_thread = 1;
		else if (!strcmp(a, "-o") || !strncmp(a, "-o", 2)) {
			const char *list = a[2] ? a + 2 : (i + 1 < argc ? argv[++i] : NULL);
			if (!list)
				return sf_fail(e, SF_EINVAL, "option '-o' needs a value");
			if ((rc = apply_option_list(&ps, list, e)) != SF_OK)
				return rc;
		} else if (a[0] == '-' && a[1])
			return sf_fail(e, SF_EINVAL, "unknown option '%s'", a);
		else if (positional < 2) {
			rc = set_string(positional ? &o->mountpoint : &o->raw_dir, a, e,
			                positional ? "MOUNTPOINT" : "RAW_DIR");
			if (rc != SF_OK)
				return rc;
			positional++;
		} else
			return sf_fail(e, SF_EINVAL, "unexpected argument '%s'", a);
	}
	if (o->show_help || o->show_version)
		return SF_OK;
	if (positional != 2)
		return sf_fail(e, SF_EINVAL, "usage: scopefs [options] RAW_DIR MOUNTPOINT");
	if (o->preset && (rc = apply_presets(&ps, e)) != SF_OK)
		return rc;
	if ((rc = check_deconv_opts(o, e)) != SF_OK)
		return rc;
	if (!(o->fuse_mount_opts = strdup(ps.fuse_opts)))
		return sf_fail(e, SF_ENOMEM, "out of memory");
	o->fuse_given = fuse_given(&ps);
	return check_paths(o, e);
}

void sf_options_free(sf_options *o)
{
	free(o->raw_dir);
	free(o->mountpoint);
	free(o->cache_dir);
	free(o->log_path);
	free(o->reference);
	free(o->preset);
	free(o->transforms);
	free(o->fuse_mount_opts);
	free(o->deconv);
}

void sf_options_usage(const char *argv0)
{
	printf("usage: %s [options] RAW_DIR MOUNTPOINT\n\n"
	       "Serves RAW_DIR read-only at MOUNTPOINT with virtual processed images:\n"
	       "  raw/          the raw dataset, unchanged\n"
	       "  registered/   whole-slide images as pyramidal OME-TIFF (computed on read)\n"
	       "  qc/           registration overlays, one PNG per moving slide\n"
	       "  transforms/   transforms scopefs computed itself (ours and elastix's)\n"
	       "  deconvolved/  light-sheet planes after 3D deconvolution (computed on read)\n"
	       "  .scopefs/status  JSON counters\n\n"
	       "general options:\n"
	       "  -f               stay in the foreground\n"
	       "  -d               debug output (implies -f)\n"
	       "  -s               single-threaded FUSE loop\n"
	       "  -o opt[=val],... mount options (below)\n"
	       "  -h, --help       this text\n"
	       "  -V, --version    the version\n\n"
	       "mount options:\n",
	       argv0);
	for (size_t i = 0; i < OPTION_COUNT; i++)
		printf("  -o %s\n", option_table[i].help);
	printf("\nUnmount with: fusermount3 -u MOUNTPOINT\n");
}

const char *sf_version(void)
{
	return SCOPEFS_VERSION;
}

/* test_options.c — option parsing: sizes, presets, errors that name the option. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "scopefs/options.h"
#include "scopefs/product_deconv.h"
#include "scopefs/register.h"

static int parse(sf_options *o, sf_err *e, int argc, const char **argv)
{
	memset(o, 0, sizeof *o);
	memset(e, 0, sizeof *e);
	return sf_options_parse(argc, (char **)argv, o, e);
}

static void test_sizes(void)
{
	uint64_t v = 0;
	CHECK(sf_parse_size("50G", &v) == SF_OK && v == 50ull << 30, "50G -> %llu",
	      (unsigned long long)v);
	CHECK(sf_parse_size("512m", &v) == SF_OK && v == 512ull << 20, "512m");
	CHECK(sf_parse_size("64MB", &v) == SF_OK && v == 64ull << 20, "64MB");
	CHECK(sf_parse_size("1234", &v) == SF_OK && v == 1234, "plain bytes");
	CHECK(sf_parse_size("12Q", &v) != SF_OK, "12Q rejected");
	CHECK(sf_parse_size("", &v) != SF_OK, "empty rejected");
	CHECK(sf_parse_size("-5M", &v) != SF_OK, "negative rejected");
	CHECK(sf_parse_size("99999999999T", &v) != SF_OK, "overflow rejected");
}

static void test_cli(const char *raw, const char *cache)
{
	sf_options o;
	sf_err e;
	char opt[1024];
	snprintf(opt, sizeof opt, "cache=%s,mem=64M,threads=3,reference=b", cache);
	const char *ok[] = {"scopefs", "-f", "-o", opt, raw, "/mnt"};
	CHECK(parse(&o, &e, 6, ok) == SF_OK, "valid command line: %s", e.msg);
	CHECK(o.mem == 64ull << 20 && o.threads == 3 && o.foreground, "values applied");
	CHECK(o.readahead == SF_READAHEAD_AUTO, "readahead unset until main picks it");
	CHECK(o.reference && !strcmp(o.reference, "b"), "reference kept");
	sf_options_free(&o);

	/* transforms= must be a folder (a typo mounted silently and let reg=auto
	 * register every slide instead), and is kept absolute */
	snprintf(opt, sizeof opt, "cache=%s,transforms=%s/no-such-dir", cache, raw);
	const char *tf_missing[] = {"scopefs", "-o", opt, raw, "/mnt"};
	CHECK(parse(&o, &e, 5, tf_missing) == SF_EINVAL && strstr(e.msg, "'transforms'") &&
	          strstr(e.msg, "no-such-dir"),
	      "missing transforms folder refused: %s", e.msg);
	sf_options_free(&o);
	char cwd[512], rel[600];
	snprintf(rel, sizeof rel, "%s/x.txt", raw);
	FILE *f = fopen(rel, "w");
	if (f)
		fclose(f);
	snprintf(opt, sizeof opt, "cache=%s,transforms=%s", cache, rel);
	const char *tf_file[] = {"scopefs", "-o", opt, raw, "/mnt"};
	CHECK(parse(&o, &e, 5, tf_file) == SF_EINVAL && strstr(e.msg, "not a folder"),
	      "a file as transforms refused: %s", e.msg);
	sf_options_free(&o);
	unlink(rel);
	CHECK(getcwd(cwd, sizeof cwd) != NULL && chdir(raw) == 0, "chdir");
	snprintf(opt, sizeof opt, "cache=%s,transforms=.", cache);
	const char *tf_rel[] = {"scopefs", "-o", opt, raw, "/mnt"};
	CHECK(parse(&o, &e, 5, tf_rel) == SF_OK && o.transforms && o.transforms[0] == '/',
	      "transforms kept absolute: %s", o.transforms ? o.transforms : e.msg);
	sf_options_free(&o);
	CHECK(chdir(cwd) == 0, "chdir back");

	/* MOUNTPOINT: a folder, apart from RAW_DIR, kept absolute (libfuse
	 * unmounts by it after the daemon moved to /) */
	snprintf(rel, sizeof rel, "%s/file", raw);
	f = fopen(rel, "w");
	if (f)
		fclose(f);
	snprintf(opt, sizeof opt, "cache=%s", cache);
	const char *mnt_file[] = {"scopefs", "-o", opt, raw, rel};
	CHECK(parse(&o, &e, 5, mnt_file) == SF_EINVAL && strstr(e.msg, "not a folder"),
	      "a file as MOUNTPOINT refused: %s", e.msg);
	sf_options_free(&o);
	unlink(rel);
	const char *mnt_raw[] = {"scopefs", "-o", opt, raw, raw};
	CHECK(parse(&o, &e, 5, mnt_raw) == SF_EINVAL && strstr(e.msg, "overlap"),
	      "RAW_DIR as MOUNTPOINT refused: %s", e.msg);
	sf_options_free(&o);
	char parent[600];
	snprintf(parent, sizeof parent, "%s/..", raw);
	const char *mnt_above[] = {"scopefs", "-o", opt, raw, parent};
	CHECK(parse(&o, &e, 5, mnt_above) == SF_EINVAL && strstr(e.msg, "overlap"),
	      "a MOUNTPOINT holding RAW_DIR refused: %s", e.msg);
	sf_options_free(&o);
	CHECK(chdir(raw) == 0, "chdir");
	const char *mnt_rel[] = {"scopefs", "-o", opt, raw, ".."};
	CHECK(parse(&o, &e, 5, mnt_rel) == SF_EINVAL, "relative parent still overlaps");
	sf_options_free(&o);
	CHECK(chdir(cwd) == 0, "chdir back");
	char sub[600];
	snprintf(sub, sizeof sub, "%s/../mnt", raw);
	CHECK(mkdir(sub, 0755) == 0 || errno == EEXIST, "mkdir");
	CHECK(chdir(sub) == 0, "chdir");
	const char *mnt_rel2[] = {"scopefs", "-o", opt, raw, "."};
	CHECK(parse(&o, &e, 5, mnt_rel2) == SF_OK && o.mountpoint && o.mountpoint[0] == '/',
	      "MOUNTPOINT kept absolute: %s", o.mountpoint ? o.mountpoint : e.msg);
	sf_options_free(&o);
	CHECK(chdir(cwd) == 0, "chdir back");

	const char *unknown[] = {"scopefs", "-o", "bogus=1", raw, "/mnt"};
	CHECK(parse(&o, &e, 5, unknown) == SF_EINVAL && strstr(e.msg, "bogus"),
	      "unknown option named: %s", e.msg);
	sf_options_free(&o);

	const char *bad_size[] = {"scopefs", "-o", "mem=12Q", raw, "/mnt"};
	CHECK(parse(&o, &e, 5, bad_size) == SF_EINVAL && strstr(e.msg, "mem"),
	      "malformed size named: %s", e.msg);
	sf_options_free(&o);

	char inside[1024];
	snprintf(inside, sizeof inside, "cache=%s/sub/cache", raw);
	const char *in_raw[] = {"scopefs", "-o", inside, raw, "/mnt"};
	CHECK(parse(&o, &e, 5, in_raw) == SF_EINVAL && strstr(e.msg, "inside RAW_DIR"),
	      "cache inside RAW_DIR refused: %s", e.msg);
	sf_options_free(&o);

	const char *missing[] = {"scopefs", raw};
	CHECK(parse(&o, &e, 2, missing) == SF_EINVAL, "missing mountpoint refused");
	sf_options_free(&o);

	const char *flag_value[] = {"scopefs", "-o", "allow_other=3", raw, "/mnt"};
	CHECK(parse(&o, &e, 5, flag_value) == SF_EINVAL && strstr(e.msg, "allow_other"),
	      "flag with value refused: %s", e.msg);
	sf_options_free(&o);

	snprintf(opt, sizeof opt, "cache=%s,readahead=0", cache);
	const char *no_ahead[] = {"scopefs", "-o", opt, raw, "/mnt"};
	CHECK(parse(&o, &e, 5, no_ahead) == SF_OK && o.readahead == 0, "readahead=0 is none");
	sf_options_free(&o);

	/* A number past the limit says so (it was "malformed count '5000'"). */
	snprintf(opt, sizeof opt, "cache=%s,threads=5000", cache);
	const char *many[] = {"scopefs", "-o", opt, raw, "/mnt"};
	CHECK(parse(&o, &e, 5, many) == SF_EINVAL &&
	          strstr(e.msg, "option 'threads': 5000 is over the limit of 4096"),
	      "threads=5000: %s", e.msg);
	sf_options_free(&o);
	snprintf(opt, sizeof opt, "cache=%s,readahead=4x", cache);
	const char *typo[] = {"scopefs", "-o", opt, raw, "/mnt"};
	CHECK(parse(&o, &e, 5, typo) == SF_EINVAL && strstr(e.msg, "malformed count '4x'"),
	      "readahead=4x: %s", e.msg);
	sf_options_free(&o);

	const char *help[] = {"scopefs", "--help"};
	CHECK(parse(&o, &e, 2, help) == SF_OK && o.show_help, "--help alone is fine");
	sf_options_free(&o);
}

/* Write `text` (unless NULL) as the preset at path, then parse
 * `-o <cli_before>preset=path,cache=...`. */
static int parse_with_preset(sf_options *o, sf_err *e, const char *raw, const char *dir,
                             const char *path, const char *text, const char *cli_before)
{
	char opt[1400];
	FILE *f = text ? fopen(path, "w") : NULL;

	if (f) {
		fputs(text, f);
		fclose(f);
	}
	snprintf(opt, sizeof opt, "%spreset=%s,cache=%s/c", cli_before, path, dir);
	const char *argv[] = {"scopefs", "-o", opt, raw, "/mnt"};
	return parse(o, e, 5, argv);
}

/* Preset files as users hand them over: a UTF-8 byte order mark (Notepad),
 * a folder or a FIFO instead of a file, a malformed line the command line
 * overrides (still an error: it fails for whoever does not override it),
 * a name found nowhere (the message says where it looked). */
static void test_preset_files(const char *raw, const char *dir, const char *path)
{
	char fifo[600], cli[700];
	sf_options o;
	sf_err e;

	CHECK(parse_with_preset(&o, &e, raw, dir, path, "\xEF\xBB\xBFmem=64M\n", "") == SF_OK &&
	          o.mem == 64ull << 20,
	      "a preset with a BOM read: %s", e.msg);
	sf_options_free(&o);
	CHECK(parse_with_preset(&o, &e, raw, dir, path, "\xEF\xBB\xBF# optics\nthreads=3\n", "") ==
	              SF_OK &&
	          o.threads == 3,
	      "a BOM before a comment: %s", e.msg);
	sf_options_free(&o);
	CHECK(parse_with_preset(&o, &e, raw, dir, dir, NULL, "") == SF_EINVAL &&
	          strstr(e.msg, "is not a file"),
	      "a folder as the preset refused: %s", e.msg);
	sf_options_free(&o);
	snprintf(fifo, sizeof fifo, "%s/fifo", dir);
	CHECK(mkfifo(fifo, 0600) == 0, "mkfifo");
	CHECK(parse_with_preset(&o, &e, raw, dir, fifo, NULL, "") == SF_EINVAL &&
	          strstr(e.msg, "is not a file"),
	      "a FIFO as the preset refused, not waited on: %s", e.msg);
	sf_options_free(&o);
	unlink(fifo);
	CHECK(parse_with_preset(&o, &e, raw, dir, path, "threads=2x\n", "threads=1,") ==
	              SF_EINVAL &&
	          strstr(e.msg, ":1:") && strstr(e.msg, "2x"),
	      "an overridden malformed preset line still refused: %s", e.msg);
	sf_options_free(&o);
	snprintf(cli, sizeof cli, "preset=no-such-preset-here,cache=%s/c", dir);
	const char *argv[] = {"scopefs", "-o", cli, raw, "/mnt"};
	unsetenv("SCOPEFS_PRESETS");
	CHECK(parse(&o, &e, 5, argv) == SF_EINVAL && strstr(e.msg, "/../mountopts/no-such") &&
	          strstr(e.msg, "/usr/share/scopefs/mountopts/no-such") &&
	          strstr(e.msg, "SCOPEFS_PRESETS"),
	      "a preset found nowhere names every place looked in: %s", e.msg);
	sf_options_free(&o);
	/* Presets apply last first; of two missing ones the first given is named. */
	snprintf(cli, sizeof cli, "preset=first-missing,preset=second-missing,cache=%s/c", dir);
	CHECK(parse(&o, &e, 5, argv) == SF_EINVAL && strstr(e.msg, "'first-missing'"),
	      "of two missing presets the first is named: %s", e.msg);
	sf_options_free(&o);
}

static void test_preset(const char *raw, const char *dir)
{
	char path[512], missing[600];
	sf_options o;
	sf_err e;

	snprintf(path, sizeof path, "%s/preset", dir);
	CHECK(parse_with_preset(&o, &e, raw, dir, path,
	                        "# comment\n\nmem=1G\n threads = 7 \ncache_size =3G\n",
	                        "mem=32M,") == SF_OK,
	      "preset read: %s", e.msg);
	CHECK(o.mem == 32ull << 20, "command line wins over preset");
	CHECK(o.threads == 7 && o.cache_size == 3ull << 30, "preset values applied");
	sf_options_free(&o);

	CHECK(parse_with_preset(&o, &e, raw, dir, path, "mem=1G\nwhat=2\n", "") == SF_EINVAL &&
	          strstr(e.msg, ":2:") && strstr(e.msg, "what"),
	      "preset error names file, line and key: %s", e.msg);
	sf_options_free(&o);

	/* One key overriding another: the command line's dark and 8-bit
	 * output win over the preset's denoise_strength and dtype, whichever
	 * order the stack applies them in. */
	CHECK(parse_with_preset(&o, &e, raw, dir, path, "denoise_strength=1\ndtype=same\nnumit=9\n",
	                        "dark=5,convert_to_8bit=1,") == SF_OK,
	      "deconv preset read: %s", e.msg);
	sf_deconv_settings ds;
	sf_deconv_settings_default(&ds);
	CHECK(sf_deconv_settings_apply_list(&ds, o.deconv, "", &e) == SF_OK, "list: %s", e.msg);
	CHECK(ds.params.dark == 5 && !ds.have_denoise && ds.dtype == SF_U8 && ds.params.numit == 9,
	      "command line wins over a preset key it overrides (list '%s')", o.deconv);
	sf_options_free(&o);

	CHECK(parse_with_preset(&o, &e, raw, dir, path, "fsname=x,allow_other\n", "") ==
	              SF_EINVAL &&
	          strstr(e.msg, ":1:"),
	      "a preset line with a comma refused: %s", e.msg);
	sf_options_free(&o);

	/* found in the fuzzing pass (tests/fuzz/fuzz_options.c): the part of a line past
	 * the line buffer was read as a line of its own, so a long comment
	 * ending in "readahead=7" set readahead */
	char longline[1100];
	memset(longline, 'x', sizeof longline);
	longline[0] = '#';
	snprintf(longline + 1023, sizeof longline - 1023, "readahead=7\n");
	CHECK(parse_with_preset(&o, &e, raw, dir, path, longline, "") == SF_EINVAL &&
	          strstr(e.msg, ":1: line longer than") && o.readahead != 7,
	      "a preset line too long refused: %s", e.msg);
	sf_options_free(&o);
	CHECK(parse_with_preset(&o, &e, raw, dir, path, "background=1e999\n", "") == SF_EINVAL &&
	          strstr(e.msg, "background"),
	      "an infinite background refused: %s", e.msg);
	sf_options_free(&o);

	/* Two presets: both apply; where both give a key the later one wins,
	 * and the command line beats both (the first was dropped before). */
	char first[512], cli[1100];
	snprintf(first, sizeof first, "%s/first", dir);
	FILE *f = fopen(first, "w");
	CHECK(f != NULL, "write %s", first);
	if (f) {
		fputs("dxy=0.4\ndz=1.2\nthreads=3\nmem=1G\ndenoise_strength=1\n", f);
		fclose(f);
	}
	snprintf(cli, sizeof cli, "preset=%s,threads=5,", first);
	CHECK(parse_with_preset(&o, &e, raw, dir, path, "mem=256M\ndark=7\nreadahead=9\n", cli) ==
	          SF_OK,
	      "two presets: %s", e.msg);
	sf_deconv_settings_default(&ds);
	CHECK(sf_deconv_settings_apply_list(&ds, o.deconv, "", &e) == SF_OK, "list: %s", e.msg);
	CHECK(o.mem == 256ull << 20 && o.readahead == 9 && o.threads == 5,
	      "the later preset wins, the command line beats both (mem %llu, threads %u)",
	      (unsigned long long)o.mem, o.threads);
	CHECK(ds.have_dxy && fabs(ds.params.dxy - 400) < 1e-9 && fabs(ds.params.dz - 1200) < 1e-9 &&
	          ds.params.dark == 7 && !ds.have_denoise,
	      "the first preset's optics kept, the later one's dark wins (list '%s')", o.deconv);
	sf_options_free(&o);

	snprintf(missing, sizeof missing, "%s/none", dir);
	CHECK(parse_with_preset(&o, &e, raw, dir, missing, NULL, "") == SF_EINVAL &&
	          strstr(e.msg, "preset"),
	      "missing preset refused: %s", e.msg);
	sf_options_free(&o);
	test_preset_files(raw, dir, path);
}

/* Parse "-o <opts>" with RAW_DIR raw and MOUNTPOINT mnt. */
static int parse_opts(sf_options *o, sf_err *e, const char *opts, const char *raw, const char *mnt)
{
	const char *argv[] = {"scopefs", "-o", opts, raw, mnt};
	return parse(o, e, 5, argv);
}

/* cache= and log= inside RAW_DIR or MOUNTPOINT are refused however the path
 * is spelled: ".." after a folder that does not exist yet, "." and "//",
 * a link to RAW_DIR.  Accepted paths are kept normalised.  The oracle for
 * "inside" is the path the kernel reaches, spelled out by hand here. */
static void test_path_spellings(const char *dir, const char *raw)
{
	char real[PATH_MAX], mnt[600], opt[2 * PATH_MAX + 64], want[PATH_MAX + 32], link[600];
	sf_options o;
	sf_err e;

	CHECK(realpath(dir, real) != NULL, "realpath %s", dir);
	snprintf(mnt, sizeof mnt, "%s/mnt", dir);
	CHECK(mkdir(mnt, 0755) == 0 || errno == EEXIST, "mkdir mnt");
	snprintf(link, sizeof link, "%s/rawlink", dir);
	CHECK(symlink(raw, link) == 0 || errno == EEXIST, "symlink");

	static const char *const in_raw[] = {"cache=%s/nothere/../raw/cache",
	                                     "cache=%s/a/b/../../raw",
	                                     "cache=%s//raw/./x",
	                                     "cache=%s/nothere/../rawlink/c",
	                                     "log=%s/nothere/../raw/l.log",
	                                     "log=%s/x/../raw/y/../l"};
	for (size_t i = 0; i < sizeof in_raw / sizeof in_raw[0]; i++) {
		snprintf(want, sizeof want, in_raw[i], dir);
		snprintf(opt, sizeof opt, "cache=%s/c,%s", dir, want);
		CHECK(parse_opts(&o, &e, opt, raw, mnt) == SF_EINVAL &&
		          strstr(e.msg, "inside RAW_DIR") && strstr(e.msg, strchr(want, '=') + 1),
		      "%s refused: %s", want, e.msg);
		sf_options_free(&o);
	}
	static const char *const in_mnt[] = {"cache=%s/mnt", "cache=%s/mnt/cache",
	                                     "cache=%s/nothere/../mnt/c", "log=%s/mnt/scopefs.log",
	                                     "log=%s/mnt/./x/../l"};
	for (size_t i = 0; i < sizeof in_mnt / sizeof in_mnt[0]; i++) {
		snprintf(want, sizeof want, in_mnt[i], dir);
		snprintf(opt, sizeof opt, "cache=%s/c,%s", dir, want);
		CHECK(parse_opts(&o, &e, opt, raw, mnt) == SF_EINVAL &&
		          strstr(e.msg, "inside MOUNTPOINT") &&
		          strstr(e.msg, strchr(want, '=') + 1) && strstr(e.msg, "/mnt'"),
		      "%s refused naming both paths: %s", want, e.msg);
		sf_options_free(&o);
	}
	snprintf(opt, sizeof opt, "cache=%s/c,transforms=%s", dir, mnt);
	CHECK(parse_opts(&o, &e, opt, raw, mnt) == SF_EINVAL && strstr(e.msg, "MOUNTPOINT"),
	      "transforms inside MOUNTPOINT refused: %s", e.msg);
	sf_options_free(&o);

	/* accepted, and kept in the form the kernel resolves */
	snprintf(opt, sizeof opt, "cache=%s//new/./a/../cache/,log=%s/mnt2/../logs//s.log", dir,
	         dir);
	CHECK(parse_opts(&o, &e, opt, raw, mnt) == SF_OK, "normalised paths accepted: %s", e.msg);
	snprintf(want, sizeof want, "%s/new/cache", real);
	CHECK(o.cache_dir && !strcmp(o.cache_dir, want), "cache kept as %s: %s", want,
	      o.cache_dir ? o.cache_dir : "(null)");
	snprintf(want, sizeof want, "%s/logs/s.log", real);
	CHECK(o.log_path && !strcmp(o.log_path, want), "log kept as %s: %s", want,
	      o.log_path ? o.log_path : "(null)");
	sf_options_free(&o);
	/* a sibling whose name starts with the mountpoint's is not inside it */
	snprintf(opt, sizeof opt, "cache=%s/mnt2,log=%s/mntlog", dir, dir);
	CHECK(parse_opts(&o, &e, opt, raw, mnt) == SF_OK, "mnt2 is not inside mnt: %s", e.msg);
	sf_options_free(&o);
	/* ".." above the root stays at the root */
	snprintf(opt, sizeof opt, "cache=/../../%s/c2", real);
	snprintf(want, sizeof want, "%s/c2", real);
	CHECK(parse_opts(&o, &e, opt, raw, mnt) == SF_OK && !strcmp(o.cache_dir, want),
	      "/.. is /: %s", o.cache_dir ? o.cache_dir : e.msg);
	sf_options_free(&o);
	unlink(link);
}

/* No cache= option: $XDG_CACHE_HOME/scopefs when that is absolute, else
 * ~/.cache/scopefs (a relative XDG_CACHE_HOME is invalid per the XDG Base
 * Directory spec, and would follow the daemon's working directory). */
static void test_default_cache_dir(const char *dir, const char *raw)
{
	char real[PATH_MAX], mnt[600], want[PATH_MAX + 32];
	const char *old_xdg = getenv("XDG_CACHE_HOME"), *old_home = getenv("HOME");
	char *saved_xdg = old_xdg ? strdup(old_xdg) : NULL,
	     *saved_home = old_home ? strdup(old_home) : NULL;
	sf_options o;
	sf_err e;

	CHECK(realpath(dir, real) != NULL, "realpath %s", dir);
	snprintf(mnt, sizeof mnt, "%s/mnt", dir);
	CHECK(mkdir(mnt, 0755) == 0 || errno == EEXIST, "mkdir mnt");
	setenv("HOME", real, 1);
	setenv("XDG_CACHE_HOME", real, 1);
	snprintf(want, sizeof want, "%s/scopefs", real);
	CHECK(parse_opts(&o, &e, "threads=2", raw, mnt) == SF_OK && !strcmp(o.cache_dir, want),
	      "absolute XDG_CACHE_HOME used: %s", o.cache_dir ? o.cache_dir : e.msg);
	sf_options_free(&o);
	setenv("XDG_CACHE_HOME", "relative/cache", 1);
	snprintf(want, sizeof want, "%s/.cache/scopefs", real);
	CHECK(parse_opts(&o, &e, "threads=2", raw, mnt) == SF_OK && !strcmp(o.cache_dir, want),
	      "relative XDG_CACHE_HOME ignored: %s", o.cache_dir ? o.cache_dir : e.msg);
	sf_options_free(&o);
	if (saved_xdg)
		setenv("XDG_CACHE_HOME", saved_xdg, 1);
	else
		unsetenv("XDG_CACHE_HOME");
	if (saved_home)
		setenv("HOME", saved_home, 1);
	else
		unsetenv("HOME");
	free(saved_xdg);
	free(saved_home);
}

/* A comma inside a value is written "\," as in libfuse's -o lists
 * (fuse_opt.c), "\\" is a backslash; bare commas still split. */
static void test_escaped_commas(const char *dir, const char *raw)
{
	char opt[1200], mnt[600], path[600];
	sf_options o;
	sf_err e;

	snprintf(mnt, sizeof mnt, "%s/mnt", dir);
	snprintf(opt, sizeof opt, "cache=%s/c,reference=HE\\, case 1.svs,mem=64M", dir);
	CHECK(parse_opts(&o, &e, opt, raw, mnt) == SF_OK, "escaped comma: %s", e.msg);
	CHECK(o.reference && !strcmp(o.reference, "HE, case 1.svs") && o.mem == 64ull << 20,
	      "reference 'HE, case 1.svs' and the next item: '%s'", o.reference);
	sf_options_free(&o);

	snprintf(opt, sizeof opt, "cache=%s/c,reference=a\\\\b\\\\,,fsname=x\\,y\\\\z", dir);
	CHECK(parse_opts(&o, &e, opt, raw, mnt) == SF_OK, "escaped backslash: %s", e.msg);
	CHECK(o.reference && !strcmp(o.reference, "a\\b\\"), "a\\\\b\\\\ is 'a\\b\\': '%s'",
	      o.reference);
	CHECK(o.fuse_mount_opts && !strcmp(o.fuse_mount_opts, "fsname=x\\,y\\\\z"),
	      "handed to libfuse escaped again: '%s'", o.fuse_mount_opts);
	sf_options_free(&o);

	snprintf(opt, sizeof opt, "cache=%s/c,reference=HE, case 1.svs", dir);
	CHECK(parse_opts(&o, &e, opt, raw, mnt) == SF_EINVAL && strstr(e.msg, "' case 1.svs'"),
	      "a bare comma still splits: %s", e.msg);
	sf_options_free(&o);

	snprintf(opt, sizeof opt, "cache=%s/c\\,d,,threads=2,", dir);
	CHECK(parse_opts(&o, &e, opt, raw, mnt) == SF_OK && o.threads == 2 &&
	          !strcmp(o.cache_dir + strlen(o.cache_dir) - 4, "/c,d"),
	      "escaped comma in a path, empty items skipped: %s",
	      o.cache_dir ? o.cache_dir : e.msg);
	sf_options_free(&o);

	snprintf(opt, sizeof opt, "cache=%s/c,dxy=0\\,4", dir);
	CHECK(parse_opts(&o, &e, opt, raw, mnt) == SF_EINVAL && strstr(e.msg, "dxy"),
	      "a comma in a deconvolution value refused: %s", e.msg);
	sf_options_free(&o);

	/* a preset line: the same escape */
	snprintf(path, sizeof path, "%s/comma-preset", dir);
	FILE *f = fopen(path, "w");
	CHECK(f != NULL, "write %s", path);
	if (f) {
		fputs("reference = HE\\, case 1.svs\n", f);
		fclose(f);
	}
	snprintf(opt, sizeof opt, "cache=%s/c,preset=%s", dir, path);
	CHECK(parse_opts(&o, &e, opt, raw, mnt) == SF_OK && o.reference &&
	          !strcmp(o.reference, "HE, case 1.svs"),
	      "escaped comma in a preset: '%s' %s", o.reference, e.msg);
	sf_options_free(&o);
	f = fopen(path, "w");
	if (f) {
		fputs("reference=HE, case 1.svs\n", f);
		fclose(f);
	}
	CHECK(parse_opts(&o, &e, opt, raw, mnt) == SF_EINVAL && strstr(e.msg, ":1:") &&
	          strstr(e.msg, "\\,"),
	      "a bare comma in a preset refused, naming \\,: %s", e.msg);
	sf_options_free(&o);
}

/* The reg_* keys: defaults, values, and a refusal naming the key. */
static void test_registration(const char *raw, const char *cache)
{
	sf_options o = {0};
	sf_err e = {0};
	char opt[600];

	snprintf(opt, sizeof opt,
	         "cache=%s,reg_channel=CD3,reg_metric=mi,reg_dim=512,reg_nonrigid_dim=0,"
	         "reg_order=serial,reg_eager=1",
	         cache);
	const char *ok[] = {"scopefs", "-o", opt, raw, "/mnt"};
	CHECK(parse(&o, &e, 5, ok) == SF_OK, "reg options: %s", e.msg);
	CHECK(o.reg.enabled && !strcmp(o.reg.channel, "CD3") && o.reg.metric == SF_REG_METRIC_MI &&
	          o.reg.dim == 512 && o.reg.nonrigid_dim == 0 && o.reg.serial && o.reg.eager,
	      "reg values applied");
	sf_options_free(&o);

	memset(&o, 0, sizeof o);
	snprintf(opt, sizeof opt, "cache=%s", cache);
	const char *plain[] = {"scopefs", "-o", opt, raw, "/mnt"};
	CHECK(parse(&o, &e, 5, plain) == SF_OK && o.reg.enabled && o.reg.metric == -1 &&
	          o.reg.dim == 1024 && o.reg.nonrigid_dim == 2000 && !o.reg.serial && !o.reg.eager,
	      "reg defaults");
	sf_options_free(&o);

	static const char *const bad[] = {
	    "reg=maybe",        "reg_metric=ssd", "reg_dim=10", "reg_nonrigid_dim=9999",
	    "reg_order=random", "reg_eager=2",    "reg_dim=abc"};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		char key[32];
		memset(&o, 0, sizeof o);
		snprintf(opt, sizeof opt, "cache=%s,%s", cache, bad[i]);
		snprintf(key, sizeof key, "%.*s", (int)strcspn(bad[i], "="), bad[i]);
		const char *argv[] = {"scopefs", "-o", opt, raw, "/mnt"};
		CHECK(parse(&o, &e, 5, argv) == SF_EINVAL && strstr(e.msg, key),
		      "%s refused naming %s: %s", bad[i], key, e.msg);
		sf_options_free(&o);
	}
}

int main(void)
{
	char dir[] = "/tmp/scopefs-test-options-XXXXXX";
	char raw[256], cache[256];

	if (!mkdtemp(dir))
		return 1;
	snprintf(raw, sizeof raw, "%s/raw", dir);
	snprintf(cache, sizeof cache, "%s/cache", dir);
	mkdir(raw, 0755);
	test_sizes();
	test_cli(raw, cache);
	test_preset(raw, dir);
	test_registration(raw, cache);
	test_path_spellings(dir, raw);
	test_escaped_commas(dir, raw);
	test_default_cache_dir(dir, raw);
	char cmd[700];
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
	if (system(cmd) != 0)
		printf("cleanup of %s failed\n", dir);
	return CHECK_DONE("test_options");
}

/* test_product_deconv.c — deconvolution settings, the block grid, the
 * engine's nested reads that the deconvolved strips rely on, and the one
 * FFTW context the blocks of all stacks share.
 *
 * Pixel correctness of the products (seams, ground truth, determinism) is
 * checked end to end through a mount in tests/integration/test_mount_deconv.py
 * against numpy/scipy oracles. */
#include <ftw.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <tiffio.h>
#include <unistd.h>

#include "check.h"
#include "scopefs/dataset.h"
#include "scopefs/engine.h"
#include "scopefs/fft.h"
#include "scopefs/product_deconv.h"
#include "scopefs/tiff_layout.h"

static void test_defaults_and_apply(void)
{
	sf_deconv_settings s;
	sf_err e = {0};

	sf_deconv_settings_default(&s);
	CHECK(s.params.numit == 6 && s.params.na == 0.40 && s.params.rf == 1.42,
	      "decwrap defaults: numit %d na %g rf %g", s.params.numit, s.params.na, s.params.rf);
	CHECK(!s.have_dxy && !s.have_dz && s.scale == 0 && s.dtype == SF_DECONV_DTYPE_SAME,
	      "dxy/dz unset, scale auto, dtype same");
	CHECK(sf_deconv_settings_apply_list(&s, "dxy=0.4,dz=1.2,numit=9,gaussian_sigma=1:2:3", "",
	                                    &e) == SF_OK,
	      "a list applies: %s", e.msg);
	CHECK(s.params.dxy == 400 && s.params.dz == 1200 && s.have_dxy && s.have_dz,
	      "dxy/dz in um become nm: %g %g", s.params.dxy, s.params.dz);
	CHECK(s.params.numit == 9, "numit=9");
	CHECK(s.params.gaussian_sigma[0] == 1 && s.params.gaussian_sigma[1] == 2 &&
	          s.params.gaussian_sigma[2] == 3,
	      "gaussian_sigma x:y:z");
	CHECK(sf_deconv_settings_apply(&s, "gaussian_filter_size", "7", "", &e) == SF_OK &&
	          s.params.gaussian_filter_size[2] == 7,
	      "one filter size for all axes");
	CHECK(sf_deconv_settings_apply(&s, "scale", "2.5", "", &e) == SF_OK && s.scale == 2.5,
	      "scale=GAIN");
	CHECK(sf_deconv_settings_apply(&s, "dtype", "float32", "", &e) == SF_OK &&
	          s.dtype == SF_F32,
	      "dtype=float32");
	CHECK(sf_deconv_settings_apply(&s, "deconv_block", "48", "", &e) == SF_OK && s.block == 48,
	      "deconv_block=48");
	CHECK(sf_deconv_settings_is_key("numit") && sf_deconv_settings_is_key("dxy") &&
	          !sf_deconv_settings_is_key("gpu") && !sf_deconv_settings_is_key("mem"),
	      "is_key: deconvolution keys only (gpu is a general option)");
}

static void test_errors_name_the_option(void)
{
	sf_deconv_settings s;
	sf_err e = {0};

	sf_deconv_settings_default(&s);
	CHECK(sf_deconv_settings_apply(&s, "dxy", "-0.4", "", &e) == SF_EINVAL &&
	          strstr(e.msg, "'dxy'"),
	      "negative dxy names dxy: %s", e.msg);
	CHECK(sf_deconv_settings_apply(&s, "gaussian_sigma", "1:2", "", &e) == SF_EINVAL &&
	          strstr(e.msg, "gaussian_sigma"),
	      "two sigmas rejected: %s", e.msg);
	CHECK(sf_deconv_settings_apply(&s, "dtype", "int8", "", &e) == SF_EINVAL &&
	          strstr(e.msg, "dtype"),
	      "dtype int8 rejected: %s", e.msg);
	CHECK(sf_deconv_settings_apply(&s, "bogus", "1", "f:3: ", &e) == SF_EINVAL &&
	          strstr(e.msg, "f:3: ") && strstr(e.msg, "bogus"),
	      "unknown key with origin: %s", e.msg);
	CHECK(sf_deconv_settings_apply_list(&s, "na=1.5,rf=1.42", "", &e) == SF_OK,
	      "na and rf alone are numbers");
	CHECK(sf_deconv_settings_check(&s, "", &e) == SF_EINVAL && strstr(e.msg, "na=1.5"),
	      "na >= rf is refused naming na: %s", e.msg);
	sf_deconv_settings_default(&s);
	CHECK(sf_deconv_settings_apply(&s, "gaussian_filter_size", "12:13:25", "", &e) == SF_OK,
	      "even size parses");
	CHECK(sf_deconv_settings_check(&s, "", &e) == SF_EINVAL &&
	          strstr(e.msg, "gaussian_filter_size"),
	      "even filter size refused: %s", e.msg);
	/* found in the fuzzing pass (tests/fuzz/fuzz_deconv_conf.c): a size beyond int
	 * was converted to int (undefined behaviour) and accepted */
	CHECK(sf_deconv_settings_apply(&s, "gaussian_filter_size", "99999999999", "", &e) ==
	              SF_EINVAL &&
	          strstr(e.msg, "gaussian_filter_size"),
	      "filter size beyond int refused: %s", e.msg);
	CHECK(sf_deconv_settings_apply(&s, "gaussian_filter_size", "7:-3:5", "", &e) == SF_EINVAL &&
	          strstr(e.msg, "'7:-3:5'"),
	      "negative filter size refused: %s", e.msg);
}

/* decwrap.py's switches.  The expected dark is LsDeconv's dark() for
 * denoise_strength 1 with decwrap's pre-filter (sigma 0.5 0.5 2.5, sizes
 * 13 13 25): the maximum of a centred unit impulse filtered by the
 * normalised Gaussian, 0.0987292424 (computed with numpy/scipy). */
static void test_lsdeconv_switches(void)
{
	sf_deconv_settings s;
	sf_err e = {0};

	sf_deconv_settings_default(&s);
	CHECK(sf_deconv_settings_apply(&s, "denoise_strength", "1", "", &e) == SF_OK,
	      "denoise_strength parses: %s", e.msg);
	sf_deconv_settings_resolve(&s);
	CHECK(fabs(s.params.dark - 0.0987292424) < 1e-9, "denoise_strength 1 -> dark %.10f",
	      s.params.dark);
	CHECK(sf_deconv_settings_apply_list(&s, "denoise_strength=200,dark=7", "", &e) == SF_OK,
	      "both parse");
	sf_deconv_settings_resolve(&s);
	CHECK(s.params.dark == 7, "dark given last wins: %g", s.params.dark);
	CHECK(sf_deconv_settings_apply_list(&s, "denoise_strength=200,gaussian_sigma=0", "", &e) ==
	          SF_OK,
	      "no pre-filter parses");
	sf_deconv_settings_resolve(&s);
	CHECK(s.params.dark == 0, "no pre-filter: LsDeconv subtracts nothing (%g)", s.params.dark);
	CHECK(sf_deconv_settings_apply(&s, "flip", "1", "", &e) == SF_OK && s.flip == 1, "flip=1");
	CHECK(sf_deconv_settings_apply(&s, "flip", "2", "", &e) == SF_EINVAL &&
	          strstr(e.msg, "'flip'"),
	      "flip=2 refused: %s", e.msg);
	CHECK(sf_deconv_settings_apply(&s, "convert_to_8bit", "1", "", &e) == SF_OK &&
	          s.dtype == SF_U8,
	      "convert_to_8bit=1 is dtype uint8");
	CHECK(sf_deconv_settings_apply(&s, "convert_to_16bit", "0", "", &e) == SF_OK &&
	          s.dtype == SF_U8,
	      "convert_to_16bit=0 keeps the dtype");
	CHECK(sf_deconv_settings_apply(&s, "convert_to_16bit", "1", "", &e) == SF_OK &&
	          s.dtype == SF_U16,
	      "convert_to_16bit=1 is dtype uint16");
}

/* convert_to_8bit=0 / convert_to_16bit=0 is LsDeconv's "keep the input
 * type": in a later source it undoes the same switch's 1 from an earlier
 * one (a stack's file over -o, -o over a preset).  It used to do nothing,
 * so the stack stayed uint8.  It leaves a type that dtype= or the other
 * switch set (test_lsdeconv_switches: convert_to_16bit=0 keeps uint8). */
static void test_switch_zero_undoes_its_one(void)
{
	static const struct {
		const char *list;
		int want;
	} cases[] = {
	    {"convert_to_8bit=1,convert_to_8bit=0", SF_DECONV_DTYPE_SAME},
	    {"convert_to_16bit=1,convert_to_16bit=0", SF_DECONV_DTYPE_SAME},
	    {"convert_to_8bit=0", SF_DECONV_DTYPE_SAME},
	    {"convert_to_8bit=1,convert_to_16bit=0", SF_U8},
	    {"dtype=uint8,convert_to_8bit=0", SF_U8},
	    {"convert_to_8bit=1,dtype=uint8,convert_to_8bit=0", SF_U8},
	    {"dtype=float32,convert_to_16bit=0", SF_F32},
	    {"convert_to_8bit=1,convert_to_16bit=1,convert_to_8bit=0", SF_U16},
	    {"convert_to_8bit=1,convert_to_16bit=1,convert_to_16bit=0", SF_DECONV_DTYPE_SAME},
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		sf_deconv_settings s;
		sf_err e = {0};

		sf_deconv_settings_default(&s);
		CHECK(sf_deconv_settings_apply_list(&s, cases[i].list, "", &e) == SF_OK &&
		          s.dtype == cases[i].want,
		      "%s: dtype %d, want %d (%s)", cases[i].list, s.dtype, cases[i].want, e.msg);
	}
}

/* denoise_strength with a pre-filter on some axes only: an axis with sigma 0
 * is not filtered and contributes no factor, so dark = N x the product of
 * the filtered axes' centre taps (docs/deconvolution.md 7.3).  It used to
 * give dark 0 as soon as one sigma was 0.  Oracle: the centre tap of a
 * normalised 13-tap Gaussian of sigma 0.5, 1 / sum_k exp(-k^2 / 0.5) =
 * 0.78657 (numpy), squared for x and y. */
static void test_denoise_partial_prefilter(void)
{
	const double centre_xy = 0.7865707070419481; /* numpy, see above */
	sf_deconv_settings s;
	sf_err e = {0};

	sf_deconv_settings_default(&s);
	CHECK(sf_deconv_settings_apply_list(&s, "gaussian_sigma=0.5:0.5:0,denoise_strength=3000",
	                                    "", &e) == SF_OK,
	      "parses: %s", e.msg);
	sf_deconv_settings_resolve(&s);
	CHECK(fabs(s.params.dark - 3000 * centre_xy * centre_xy) < 1e-9,
	      "sigma 0.5:0.5:0, N 3000 -> dark %.10f, want %.10f", s.params.dark,
	      3000 * centre_xy * centre_xy);
	CHECK(sf_deconv_settings_apply_list(
	          &s, "gaussian_sigma=0:0:0.5,gaussian_filter_size=1:1:13", "", &e) == SF_OK,
	      "z only parses: %s", e.msg);
	sf_deconv_settings_resolve(&s);
	CHECK(fabs(s.params.dark - 3000 * centre_xy) < 1e-9, "sigma 0:0:0.5 -> dark %.10f",
	      s.params.dark);
}

/* gaussian_sigma and gaussian_filter_size take one value or exactly three,
 * every field a number: empty fields used to be skipped (strtok), so ":2.5"
 * was 2.5 on all axes and "0.5:0.5:2.5:" was accepted. */
static void test_triples_malformed(void)
{
	static const char *bad[] = {
	    ":2.5", "0.5:0.5:2.5:", ":0.5:0.5:2.5", "0.5::2.5", "0.5:0.5:2.5:1", ":", "::",
	    "",     "0.5:0.5",      "1:2:3:::"};
	sf_deconv_settings s;
	sf_err e = {0};

	sf_deconv_settings_default(&s);
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		CHECK(sf_deconv_settings_apply(&s, "gaussian_sigma", bad[i], "", &e) == SF_EINVAL &&
		          strstr(e.msg, "'gaussian_sigma'"),
		      "gaussian_sigma='%s' refused: %s", bad[i], e.msg);
		CHECK(sf_deconv_settings_apply(&s, "gaussian_filter_size", bad[i], "", &e) ==
		              SF_EINVAL &&
		          strstr(e.msg, "'gaussian_filter_size'"),
		      "gaussian_filter_size='%s' refused: %s", bad[i], e.msg);
	}
	CHECK(sf_deconv_settings_apply(&s, "gaussian_sigma", "1.5", "", &e) == SF_OK &&
	          s.params.gaussian_sigma[0] == 1.5 && s.params.gaussian_sigma[2] == 1.5,
	      "one value sets all three: %s", e.msg);
	CHECK(sf_deconv_settings_apply(&s, "gaussian_filter_size", "7:9:11", "", &e) == SF_OK &&
	          s.params.gaussian_filter_size[0] == 7 && s.params.gaussian_filter_size[1] == 9 &&
	          s.params.gaussian_filter_size[2] == 11,
	      "x:y:z sizes: %s", e.msg);
}

/* A per-stack file (RAW_DIR/<stack>.scopefs.conf) with a line longer than
 * the reader's buffer is refused: its tail used to be read as a line of
 * its own, so a long comment ending in "dxy=7" set dxy (found in the
 * fuzzing pass, tests/fuzz/fuzz_deconv_conf.c). */
static void test_conf_long_line(void)
{
	char dir[] = "/tmp/sf_deconv_conf_XXXXXX", path[64], text[1100];
	sf_stack st = {.name = "s", .multipage = 1, .dtype = SF_U16};
	sf_deconv_settings s;
	sf_err e = {0};

	if (!mkdtemp(dir)) {
		CHECK(0, "mkdtemp");
		return;
	}
	snprintf(path, sizeof path, "%s/s.scopefs.conf", dir);
	memset(text, 'x', sizeof text);
	text[0] = '#';
	snprintf(text + 1023, sizeof text - 1023, "dxy=7\n");
	FILE *f = fopen(path, "w");
	CHECK(f && fputs(text, f) >= 0 && fclose(f) == 0, "write %s", path);
	int rc = sf_deconv_settings_for_stack(
	    dir, &st, "dxy=0.4,dz=1.2,lambda_ex=561,lambda_em=600", SF_DECONV_GPU_OFF, &s, &e);
	CHECK(rc == SF_EINVAL && strstr(e.msg, "s.scopefs.conf:1: line longer than"),
	      "a conf line too long refused: rc %d, '%s' (dxy %g)", rc, e.msg, s.params.dxy);
	unlink(path);
	rmdir(dir);
}

/* Write text to dir/name (for the per-stack file tests). */
static void write_conf(const char *dir, const char *name, const char *text)
{
	char path[256];

	snprintf(path, sizeof path, "%s/%s", dir, name);
	FILE *f = fopen(path, "w");
	CHECK(f && fputs(text, f) >= 0 && fclose(f) == 0, "write %s", path);
}

/* The stack's own file overrides -o both ways: its convert_to_8bit=0 gives
 * the source type back (it was ignored), and its clipval=10 (the low
 * percentile 90 above the high one 10: a two-level mask) leaves the stack
 * out with a message naming the file and clipval (it was accepted). */
static void test_conf_switch_zero_and_clipval(void)
{
	char dir[] = "/tmp/sf_deconv_conf_XXXXXX", path[64];
	sf_stack st = {.name = "s", .multipage = 1, .dtype = SF_U16};
	const char *optics = "dxy=0.4,dz=1.2,lambda_ex=561,lambda_em=600,convert_to_8bit=1";
	sf_deconv_settings s;
	sf_err e = {0};
	int rc;

	if (!mkdtemp(dir)) {
		CHECK(0, "mkdtemp");
		return;
	}
	write_conf(dir, "s.scopefs.conf", "convert_to_8bit=0\n");
	rc = sf_deconv_settings_for_stack(dir, &st, optics, SF_DECONV_GPU_OFF, &s, &e);
	CHECK(rc == SF_OK && sf_deconv_output_dtype(&s, &st) == SF_U16,
	      "conf convert_to_8bit=0 over -o convert_to_8bit=1: rc %d, dtype %d (%s)", rc,
	      (int)sf_deconv_output_dtype(&s, &st), e.msg);
	write_conf(dir, "s.scopefs.conf", "clipval=10\n");
	rc = sf_deconv_settings_for_stack(dir, &st, optics, SF_DECONV_GPU_OFF, &s, &e);
	CHECK(rc == SF_EINVAL && strstr(e.msg, "s.scopefs.conf") && strstr(e.msg, "clipval=10") &&
	          strstr(e.msg, "above 50"),
	      "conf clipval=10 refused naming the file: rc %d, '%s'", rc, e.msg);
	snprintf(path, sizeof path, "%s/s.scopefs.conf", dir);
	unlink(path);
	rmdir(dir);
}

/* clipval is the upper percentile kept, so 50 or below (low >= high) is an
 * option error naming clipval; just above 50 and 100 are accepted. */
static void test_clipval_range(void)
{
	static const char *bad[] = {"clipval=50", "clipval=10", "clipval=0.01"};
	static const char *good[] = {"clipval=50.5", "clipval=100", "clipval=99.99"};
	sf_deconv_settings s;
	sf_err e = {0};

	for (size_t i = 0; i < 3; i++) {
		sf_deconv_settings_default(&s);
		CHECK(sf_deconv_settings_apply_list(&s, bad[i], "", &e) == SF_OK &&
		          sf_deconv_settings_check(&s, "", &e) == SF_EINVAL &&
		          strstr(e.msg, bad[i]) && strstr(e.msg, "above 50"),
		      "%s refused: '%s'", bad[i], e.msg);
		sf_deconv_settings_default(&s);
		CHECK(sf_deconv_settings_apply_list(&s, good[i], "", &e) == SF_OK &&
		          sf_deconv_settings_check(&s, "", &e) == SF_OK,
		      "%s accepted: '%s'", good[i], e.msg);
	}
}

static void test_infer_wavelengths(void)
{
	sf_deconv_settings s;

	sf_deconv_settings_default(&s);
	sf_deconv_settings_infer_wavelengths(&s, "sample1_Ex_561_Em_600_stitched");
	CHECK(s.have_ex && s.have_em && s.params.lambda_ex == 561 && s.params.lambda_em == 600,
	      "Ex_561_Em_600: %g %g", s.params.lambda_ex, s.params.lambda_em);
	sf_deconv_settings_default(&s);
	sf_deconv_settings_infer_wavelengths(&s, "ex488-em525");
	CHECK(s.params.lambda_ex == 488 && s.params.lambda_em == 525, "ex488-em525");
	sf_deconv_settings_default(&s);
	sf_deconv_settings_infer_wavelengths(&s, "next_5610_item_600");
	CHECK(!s.have_ex && !s.have_em, "no word-start tag: nothing inferred");
}

/* ---- nested reads (engine) -------------------------------------------------
 * A "leaf" product whose unit u is 4096 bytes of (u + i) & 0xff, and a
 * "root" product whose unit u sums leaf units u and u+1 read through the
 * engine from inside compute.  With one worker a queued nested read would
 * deadlock; the inline rule must make it. */

static sf_engine *nested_engine;
static atomic_int leaf_computes;

static int leaf_compute(sf_product *p, void *state, uint64_t unit, uint8_t *out, sf_err *e)
{
	(void)p, (void)state, (void)e;
	atomic_fetch_add(&leaf_computes, 1);
	usleep(2000);
	for (int i = 0; i < 4096; i++)
		out[i] = (uint8_t)(unit + (uint64_t)i);
	return SF_OK;
}

static size_t unit_4k(const sf_product *p, uint64_t unit)
{
	(void)p, (void)unit;
	return 4096;
}

static sf_product leaf_product;

static int root_compute(sf_product *p, void *state, uint64_t unit, uint8_t *out, sf_err *e)
{
	uint8_t a[4096], b[4096];
	int rc;

	(void)p, (void)state;
	rc = sf_engine_read(nested_engine, &leaf_product, unit, 0, 4096, a, e);
	if (rc == SF_OK)
		rc = sf_engine_read(nested_engine, &leaf_product, unit + 1, 0, 4096, b, e);
	for (int i = 0; rc == SF_OK && i < 4096; i++)
		out[i] = (uint8_t)(a[i] + b[i]);
	return rc;
}

static void no_destroy(sf_product *p)
{
	(void)p;
}

static const sf_product_ops leaf_ops = {
    .compute = leaf_compute, .unit_bytes = unit_4k, .destroy = no_destroy};
static const sf_product_ops root_ops = {
    .compute = root_compute, .unit_bytes = unit_4k, .destroy = no_destroy};

static void test_nested_reads(unsigned threads)
{
	sf_engine_config cfg = {.threads = threads, .mem_bytes = 1 << 20};
	sf_product root = {.ops = &root_ops, .elem_bytes = 1, .unit_count = 32};
	sf_err e = {0};
	int bad = 0, rc;

	memset(&leaf_product, 0, sizeof leaf_product);
	leaf_product.ops = &leaf_ops;
	leaf_product.elem_bytes = 1;
	leaf_product.unit_count = 33;
	leaf_product.key = sf_key_of("leaf", 4);
	root.key = sf_key_of("root", 4);
	snprintf(leaf_product.name, sizeof leaf_product.name, "leaf");
	snprintf(root.name, sizeof root.name, "root");
	atomic_store(&leaf_computes, 0);
	rc = sf_engine_create(&cfg, &nested_engine, &e);
	if (rc == SF_OK)
		rc = sf_engine_add_product(nested_engine, &leaf_product, &e);
	if (rc == SF_OK)
		rc = sf_engine_add_product(nested_engine, &root, &e);
	CHECK(rc == SF_OK, "engine with two products: %s", e.msg);
	if (rc != SF_OK) {
		sf_engine_destroy(nested_engine);
		return;
	}
	/* Prefetch everything so every worker is busy with root units that
	 * read leaf units, then read them all. */
	for (uint64_t u = 0; u < 32; u++)
		sf_engine_prefetch(nested_engine, &root, u);
	for (uint64_t u = 0; u < 32; u++) {
		uint8_t got[4096];

		rc = sf_engine_read(nested_engine, &root, u, 0, 4096, got, &e);
		for (int i = 0; rc == SF_OK && i < 4096; i++)
			bad += got[i] != (uint8_t)(2 * (u + (uint64_t)i) + 1);
		if (rc != SF_OK)
			bad++;
	}
	CHECK(bad == 0, "threads=%u: every root unit is leaf u + leaf u+1 (%d bad)", threads, bad);
	CHECK(atomic_load(&leaf_computes) == 33,
	      "threads=%u: each leaf unit computed once (%d computations)", threads,
	      atomic_load(&leaf_computes));
	sf_engine_destroy(nested_engine);
}

/* ---- one FFTW context for all stacks ------------------------------------- */

#define CTX_HEIGHT 16

/* Stack folder base/name: `planes` uint16 planes of width x CTX_HEIGHT,
 * a few bright voxels on a background that depend on seed. */
static int write_stack(const char *base, const char *name, uint32_t width, uint32_t planes,
                       unsigned seed)
{
	char path[600];
	uint16_t row[64];
	int ok = width <= 64;

	snprintf(path, sizeof path, "%s/%s", base, name);
	ok = ok && mkdir(path, 0755) == 0;
	for (uint32_t z = 0; ok && z < planes; z++) {
		TIFF *tif;

		snprintf(path, sizeof path, "%s/%s/img_%06u.tif", base, name, z + 1);
		tif = TIFFOpen(path, "w");
		ok = tif != NULL;
		if (ok) {
			TIFFSetField(tif, TIFFTAG_IMAGEWIDTH, width);
			TIFFSetField(tif, TIFFTAG_IMAGELENGTH, (uint32_t)CTX_HEIGHT);
			TIFFSetField(tif, TIFFTAG_BITSPERSAMPLE, 16);
			TIFFSetField(tif, TIFFTAG_SAMPLESPERPIXEL, 1);
			TIFFSetField(tif, TIFFTAG_PHOTOMETRIC, PHOTOMETRIC_MINISBLACK);
			TIFFSetField(tif, TIFFTAG_ROWSPERSTRIP, 1);
		}
		for (uint32_t y = 0; ok && y < CTX_HEIGHT; y++) {
			for (uint32_t x = 0; x < width; x++)
				row[x] =
				    (uint16_t)(100 + ((x * 7 + y * 13 + z * 5 + seed * 31) % 97 == 0
				                          ? 3000
				                          : (x + y + seed) % 11));
			ok = TIFFWriteScanline(tif, row, y, 0) >= 0;
		}
		if (tif)
			TIFFClose(tif);
	}
	return ok;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	return remove(path);
}

static const sf_stack *stack_named(const sf_dataset *d, const char *name)
{
	for (uint32_t i = 0; i < d->stack_count; i++)
		if (!strcmp(d->stacks[i]->name, name))
			return d->stacks[i];
	return NULL;
}

/* The blocks product of st (its planes product and layout are not needed). */
static int blocks_of(const char *base, const sf_stack *st, sf_engine *const *engine,
                     sf_product **blocks, sf_err *e)
{
	sf_deconv_settings ds;
	sf_layout_spec spec = {0};
	sf_layout *layout = NULL;
	sf_product *planes = NULL;
	int rc = sf_deconv_settings_for_stack(
	    base, st, "dxy=0.4,dz=1.2,lambda_ex=561,lambda_em=600,deconv_block=16,gpu=off", 0, &ds,
	    e);

	spec.width = st->width;
	spec.height = st->height;
	spec.pages = 1;
	spec.samples = 1;
	spec.dtype = sf_deconv_output_dtype(&ds, st);
	spec.levels = 1;
	spec.bigtiff = -1;
	if (rc == SF_OK)
		rc = sf_layout_create(&spec, &layout, e);
	if (rc == SF_OK)
		rc = sf_product_deconv_create(st, &ds, layout, engine, base, 64u << 20, blocks,
		                              &planes, e);
	if (planes)
		planes->ops->destroy(planes);
	sf_layout_free(layout);
	return rc;
}

/* Block `unit` of p read through engine g into out (float32, 16^3 at most). */
static int read_block(sf_engine *g, sf_product *p, uint64_t unit, float *out, size_t bytes,
                      sf_err *e)
{
	return sf_engine_read(g, p, unit, 0, bytes, (uint8_t *)out, e);
}

/* Stacks a1 and a2 (same shape and settings), b (wider, fewer planes: its
 * window is shorter in z).  After a block of b, one engine reads a block
 * of a1, of a2, of b, then another block of a1: the context is remade for
 * a1, reused as is for a2, remade for b and remade for a1.  That last
 * block's bytes equal those a second engine computed first, on a context
 * made for it. */
static void test_one_context_for_all_stacks(void)
{
	char base[] = "/tmp/test_product_deconv_XXXXXX";
	sf_dataset *d = NULL;
	sf_engine *g = NULL, *alone = NULL;
	sf_engine_config cfg = {.threads = 2, .mem_bytes = 64u << 20};
	sf_product *a1 = NULL, *a2 = NULL, *b = NULL, *a1_alone = NULL;
	size_t bytes = 16 * 16 * 12 * sizeof(float);
	float *got = malloc(bytes), *want = malloc(bytes);
	sf_err e = {0};
	unsigned long made[4];
	int made_dir = mkdtemp(base) != NULL;
	int rc = got && want && made_dir ? SF_OK : SF_ENOMEM;

	if (rc == SF_OK)
		rc = write_stack(base, "a1", 32, 12, 1) && write_stack(base, "a2", 32, 12, 2) &&
		             write_stack(base, "b", 40, 10, 3)
		         ? SF_OK
		         : SF_EIO;
	if (rc == SF_OK)
		rc = sf_dataset_scan(base, &d, &e);
	if (rc == SF_OK && (!stack_named(d, "a1") || !stack_named(d, "a2") || !stack_named(d, "b")))
		rc = sf_fail(&e, SF_EINVAL, "stacks a1 a2 b not found");
	if (rc == SF_OK)
		rc = sf_engine_create(&cfg, &g, &e);
	if (rc == SF_OK)
		rc = sf_engine_create(&cfg, &alone, &e);
	if (rc == SF_OK)
		rc = blocks_of(base, stack_named(d, "a1"), &g, &a1, &e);
	if (rc == SF_OK)
		rc = blocks_of(base, stack_named(d, "a2"), &g, &a2, &e);
	if (rc == SF_OK)
		rc = blocks_of(base, stack_named(d, "b"), &g, &b, &e);
	if (rc == SF_OK)
		rc = blocks_of(base, stack_named(d, "a1"), &alone, &a1_alone, &e);
	CHECK(rc == SF_OK, "three stacks and their blocks products: %s", e.msg);
	if (rc == SF_OK)
		rc = sf_engine_add_product(g, a1, &e);
	if (rc == SF_OK)
		rc = sf_engine_add_product(g, a2, &e);
	if (rc == SF_OK)
		rc = sf_engine_add_product(g, b, &e);
	if (rc == SF_OK)
		rc = sf_engine_add_product(alone, a1_alone, &e);
	CHECK(rc == SF_OK && a1->unit_count == 2 && b->unit_count == 3,
	      "blocks of 16: a1 has 2, b has 3 (%llu, %llu): %s",
	      a1 ? (unsigned long long)a1->unit_count : 0ull,
	      b ? (unsigned long long)b->unit_count : 0ull, e.msg);
	if (rc == SF_OK && a1->unit_count == 2 && b->unit_count == 3) {
		/* The reference first, on a context made for it, then b's. */
		rc = read_block(alone, a1_alone, 1, want, bytes, &e);
		if (rc == SF_OK)
			rc = read_block(g, b, 0, got, bytes / 12 * 10, &e); /* 10 planes */
		made[0] = sf_deconv_cpu_contexts_made();
		if (rc == SF_OK)
			rc = read_block(g, a1, 0, got, bytes, &e);
		made[1] = sf_deconv_cpu_contexts_made();
		if (rc == SF_OK)
			rc = read_block(g, a2, 0, got, bytes, &e);
		made[2] = sf_deconv_cpu_contexts_made();
		if (rc == SF_OK)
			rc = read_block(g, b, 1, got, bytes / 12 * 10, &e);
		if (rc == SF_OK)
			rc = read_block(g, a1, 1, got, bytes, &e);
		made[3] = sf_deconv_cpu_contexts_made();
		CHECK(rc == SF_OK, "blocks read: %s", e.msg);
		CHECK(made[1] - made[0] == 1 && made[2] == made[1] && made[3] - made[2] == 2,
		      "contexts made: 1 for a1, 0 for a2 (same shape), 1 for b, 1 for a1 again "
		      "(%lu %lu %lu %lu)",
		      made[0], made[1], made[2], made[3]);
		CHECK(rc == SF_OK && !memcmp(got, want, bytes),
		      "a1's block 1 after b's context equals it read first, alone");
	}
	sf_engine_destroy(g);
	sf_engine_destroy(alone);
	for (sf_product **p = (sf_product *[]){a1, a2, b, a1_alone, NULL}; *p; p++)
		(*p)->ops->destroy(*p);
	sf_dataset_free(d);
	free(got);
	free(want);
	if (made_dir)
		nftw(base, remove_entry, 8, FTW_DEPTH | FTW_PHYS);
}

int main(void)
{
	test_defaults_and_apply();
	test_errors_name_the_option();
	test_lsdeconv_switches();
	test_switch_zero_undoes_its_one();
	test_clipval_range();
	test_conf_switch_zero_and_clipval();
	test_denoise_partial_prefilter();
	test_triples_malformed();
	test_infer_wavelengths();
	test_conf_long_line();
	test_nested_reads(1);
	test_nested_reads(2);
	test_nested_reads(4);
	test_one_context_for_all_stacks();
	sf_fft_fftw_cleanup();
	return CHECK_DONE("test_product_deconv");
}

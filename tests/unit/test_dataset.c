/* test_dataset.c — sf_dataset_scan on folders built here with libtiff:
 * slides, plane folders, multi-page stacks, bad files, ignored files, the
 * root-is-a-plane-folder case and mismatched planes; time series and stack
 * files with an odd page; one-page OME planes; multichannel OME z-stacks and
 * ImageJ hyperstacks split into one stack per channel; and sf_file_stem. */
#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <tiffio.h>

#include "check.h"
#include "scopefs/dataset.h"
#include "scopefs/log.h"

static char base[64];

static char *path_of(const char *fmt, const char *a, const char *b)
{
	static char buf[8][512];
	static int next;
	char *p = buf[next++ % 8];
	char rel[256];
	/* fmt uses up to two %s; the unused arguments are ignored. */
	/* cppcheck-suppress wrongPrintfScanfArgNum */
	snprintf(rel, sizeof rel, fmt, a, b);
	snprintf(p, 512, "%s/%s", base, rel);
	return p;
}

/* ---- fixtures ------------------------------------------------------------ */

typedef struct page {
	uint32_t w, h;
	uint16_t bps;  /* 8 or 16 */
	uint32_t tile; /* 0: strips */
	int nsub;      /* SubIFD levels that follow (halving) */
	const char *desc;
	int raw; /* uncompressed (else deflate) */
} page;

static int write_page(TIFF *tif, const page *p, uint32_t subfile)
{
	TIFFSetField(tif, TIFFTAG_IMAGEWIDTH, p->w);
	TIFFSetField(tif, TIFFTAG_IMAGELENGTH, p->h);
	TIFFSetField(tif, TIFFTAG_BITSPERSAMPLE, p->bps);
	TIFFSetField(tif, TIFFTAG_SAMPLESPERPIXEL, 1);
	TIFFSetField(tif, TIFFTAG_PHOTOMETRIC, PHOTOMETRIC_MINISBLACK);
	TIFFSetField(tif, TIFFTAG_COMPRESSION,
	             p->raw ? COMPRESSION_NONE : COMPRESSION_ADOBE_DEFLATE);
	if (subfile)
		TIFFSetField(tif, TIFFTAG_SUBFILETYPE, subfile);
	if (p->desc)
		TIFFSetField(tif, TIFFTAG_IMAGEDESCRIPTION, p->desc);
	if (p->nsub) {
		uint64_t zeros[4] = {0};
		TIFFSetField(tif, TIFFTAG_SUBIFD, (uint16_t)p->nsub, zeros);
	}
	size_t px = p->bps / 8;
	int ok = 1;
	if (p->tile) {
		TIFFSetField(tif, TIFFTAG_TILEWIDTH, p->tile);
		TIFFSetField(tif, TIFFTAG_TILELENGTH, p->tile);
		void *buf = calloc((size_t)p->tile * p->tile, px);
		for (uint32_t i = 0; ok && i < TIFFNumberOfTiles(tif); i++)
			ok = TIFFWriteEncodedTile(tif, i, buf,
			                          (tmsize_t)((size_t)p->tile * p->tile * px)) >= 0;
		free(buf);
	} else {
		TIFFSetField(tif, TIFFTAG_ROWSPERSTRIP, p->h);
		void *buf = calloc((size_t)p->w * p->h, px);
		ok = TIFFWriteEncodedStrip(tif, 0, buf, (tmsize_t)((size_t)p->w * p->h * px)) >= 0;
		free(buf);
	}
	return ok && TIFFWriteDirectory(tif);
}

/* pages pages of p; with p->nsub, each followed by its halved SubIFDs. */
static void write_file(const char *path, const page *p, int pages)
{
	TIFF *tif = TIFFOpen(path, "w");
	int ok = tif != NULL;
	for (int i = 0; ok && i < pages; i++) {
		ok = write_page(tif, p, 0);
		page sub = *p;
		sub.nsub = 0;
		sub.desc = NULL;
		for (int l = 0; ok && l < p->nsub; l++) {
			sub.w /= 2;
			sub.h /= 2;
			ok = write_page(tif, &sub, FILETYPE_REDUCEDIMAGE);
		}
	}
	if (tif)
		TIFFClose(tif);
	CHECK(ok, "write %s", path);
}

/* n pages of p, except page odd_at (if < n), which is *odd written with
 * NewSubfileType odd_subfile; p->desc goes on page 0 only. */
static void write_run(const char *path, const page *p, int n, int odd_at, const page *odd,
                      uint32_t odd_subfile)
{
	TIFF *tif = TIFFOpen(path, "w");
	int ok = tif != NULL;
	page rest = *p;
	rest.desc = NULL;
	for (int i = 0; ok && i < n; i++)
		ok = i == odd_at ? write_page(tif, odd, odd_subfile)
		                 : write_page(tif, i == 0 ? p : &rest, 0);
	if (tif)
		TIFFClose(tif);
	CHECK(ok, "write %s", path);
}

static void write_text(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");
	if (f) {
		fputs(text, f);
		fclose(f);
	}
}

static void make_dir(const char *path)
{
	CHECK(mkdir(path, 0755) == 0, "mkdir %s", path);
}

static const page pyramid = {.w = 512, .h = 384, .bps = 16, .tile = 128, .nsub = 2};
static const page tiled = {.w = 300, .h = 200, .bps = 8, .tile = 64};
static const page plane = {.w = 64, .h = 48, .bps = 16};
static const page plane_tall = {.w = 64, .h = 50, .bps = 16};
static const page plane_u8 = {.w = 64, .h = 48, .bps = 8};

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	return remove(path);
}

static void reset_base(void)
{
	nftw(base, remove_entry, 8, FTW_DEPTH | FTW_PHYS);
	make_dir(base);
}

static const sf_problem *find_problem(const sf_dataset *d, const char *path_end)
{
	for (uint32_t i = 0; i < d->problem_count; i++) {
		size_t n = strlen(d->problems[i].path), k = strlen(path_end);
		if (n >= k && strcmp(d->problems[i].path + n - k, path_end) == 0)
			return &d->problems[i];
	}
	return NULL;
}

static const sf_stack *find_stack(const sf_dataset *d, const char *name)
{
	for (uint32_t i = 0; i < d->stack_count; i++)
		if (strcmp(d->stacks[i]->name, name) == 0)
			return d->stacks[i];
	return NULL;
}

static int count_entries(const char *dir)
{
	DIR *dh = opendir(dir);
	int n = 0;
	if (!dh)
		return -1;
	while (readdir(dh))
		n++;
	closedir(dh);
	return n;
}

/* ---- cases --------------------------------------------------------------- */

static void test_mixed_root(void)
{
	reset_base();
	write_file(path_of("a.ome.tif", 0, 0), &pyramid, 1);
	write_file(path_of("b.svs", 0, 0), &tiled, 1);
	write_file(path_of("c.tif", 0, 0), &tiled, 1);
	write_file(path_of("c.tiff", 0, 0), &tiled, 1); /* same stem as c.tif */
	page imagej = plane;
	imagej.desc = "ImageJ=1.53t\nimages=3\nchannels=3\n";
	write_file(path_of("channels.tif", 0, 0), &imagej, 3); /* declared channels: a slide */
	write_file(path_of("zstack.tif", 0, 0), &plane, 5);    /* multi-page planes: a stack */
	page omez = {.w = 96,
	             .h = 64,
	             .bps = 16,
	             .tile = 32,
	             .desc = "<?xml version=\"1.0\"?><OME><Image><Pixels SizeX=\"96\" SizeY=\"64\" "
	                     "SizeC=\"1\" SizeZ=\"4\" SizeT=\"1\" Type=\"uint16\"/></Image></OME>"};
	write_file(path_of("omez.ome.tif", 0, 0), &omez, 4); /* OME z-series: a stack, tiled too */
	page omec = {.w = 96,
	             .h = 64,
	             .bps = 16,
	             .desc =
	                 "<OME><Image><Pixels SizeX=\"96\" SizeY=\"64\" SizeC=\"3\" SizeZ=\"1\" "
	                 "SizeT=\"1\" Type=\"uint16\"/></Image></OME>"};
	write_file(path_of("omec.ome.tif", 0, 0), &omec,
	           3); /* OME channels: a slide, untiled too */
	write_text(path_of("bad.tif", 0, 0), "not an image\n");
	write_text(path_of("notes.txt", 0, 0), "ignored\n");
	write_text(path_of("meta.json", 0, 0), "{}\n");
	write_text(path_of(".hidden.tif", 0, 0), "ignored too\n");
	make_dir(path_of("planes", 0, 0));
	for (int i = 3; i >= 1; i--) {
		char name[32];
		snprintf(name, sizeof name, "img_%06d.tif", i);
		write_file(path_of("planes/%s", name, 0), &plane, 1);
	}
	write_text(path_of("planes/readme.txt", 0, 0), "ignored\n");
	make_dir(path_of("empty", 0, 0));
	make_dir(path_of("mixed", 0, 0));
	write_file(path_of("mixed/z1.tif", 0, 0), &plane, 1);
	write_file(path_of("mixed/z2.tif", 0, 0), &plane_tall, 1);
	write_file(path_of("mixed/z3.tif", 0, 0), &plane, 1);
	make_dir(path_of("mixed_type", 0, 0));
	write_file(path_of("mixed_type/z1.tif", 0, 0), &plane_u8, 1);
	write_file(path_of("mixed_type/z2.tif", 0, 0), &plane, 1);
	write_file(path_of("mixed_type/z3.tif", 0, 0), &plane, 1);
	make_dir(path_of("one", 0, 0));
	write_file(path_of("one/z1.tif", 0, 0), &plane, 1);
	make_dir(path_of("badplane", 0, 0));
	write_file(path_of("badplane/z1.tif", 0, 0), &plane, 1);
	write_file(path_of("badplane/z2.tif", 0, 0), &plane, 1);
	write_file(path_of("badplane/z3.tif", 0, 0), &plane, 1);
	struct stat st;
	CHECK(stat(path_of("badplane/z2.tif", 0, 0), &st) == 0 &&
	          truncate(path_of("badplane/z2.tif", 0, 0), st.st_size / 2) == 0,
	      "truncate");
	make_dir(path_of("linkplanes", 0, 0));
	write_file(path_of("linkplanes/z1.tif", 0, 0), &plane, 1);
	write_file(path_of("linkplanes/z3.tif", 0, 0), &plane, 1);
	make_dir(path_of("tiledplanes", 0, 0));
	write_file(path_of("tiledplanes/z1.tif", 0, 0), &tiled, 1);
	write_file(path_of("tiledplanes/z2.tif", 0, 0), &tiled, 1);
	/* A link out of RAW_DIR is not followed; one inside is. */
	char outside[128];
	snprintf(outside, sizeof outside, "%s.outside.tif", base);
	write_file(outside, &tiled, 1);
	CHECK(symlink(outside, path_of("outside.tif", 0, 0)) == 0, "symlink");
	CHECK(symlink("b.svs", path_of("inside.tif", 0, 0)) == 0, "symlink");
	CHECK(symlink(outside, path_of("linkplanes/z2.tif", 0, 0)) == 0, "symlink");
	int entries_before = count_entries(base);

	sf_dataset *d = NULL;
	sf_err e = {0};
	int rc = sf_dataset_scan(base, &d, &e);
	CHECK(rc == SF_OK, "mixed: scan: %s", e.msg);
	unlink(outside);
	if (rc)
		return;
	CHECK(count_entries(base) == entries_before, "mixed: the scan must not write");
	const char *want_stems[] = {"a", "b", "c", "channels", "inside", "omec"};
	CHECK(d->slide_count == 6, "mixed: %u slides, want 6", d->slide_count);
	for (uint32_t i = 0; i < d->slide_count && i < 6; i++)
		CHECK(strcmp(d->slide_stems[i], want_stems[i]) == 0,
		      "mixed: slide %u is %s, want %s", i, d->slide_stems[i], want_stems[i]);
	if (d->slide_count >= 1)
		CHECK(d->slides[0]->level_count == 3, "mixed: a.ome.tif has %u levels",
		      d->slides[0]->level_count);
	CHECK(d->root[0] == '/', "mixed: root %s is absolute", d->root);

	CHECK(d->stack_count == 3, "mixed: %u stacks, want 3", d->stack_count);
	const sf_stack *oz = find_stack(d, "omez");
	CHECK(oz && oz->multipage && oz->planes == 4 && oz->width == 96 && oz->page_first == 0 &&
	          oz->page_step == 1,
	      "mixed: OME z-stack");
	const sf_stack *z = find_stack(d, "zstack");
	CHECK(z && z->multipage && z->planes == 5 && z->width == 64 && z->height == 48 &&
	          z->dtype == SF_U16 && z->plane_info[0] && !z->plane_info[1] &&
	          z->page_first == 0 && z->page_step == 1,
	      "mixed: zstack stack");
	if (z)
		CHECK(strcmp(z->plane_names[0], "img_000001.tif") == 0 &&
		          strcmp(z->plane_names[4], "img_000005.tif") == 0,
		      "mixed: zstack plane names %s", z->plane_names[0]);
	const sf_stack *p = find_stack(d, "planes");
	CHECK(p && !p->multipage && p->planes == 3 && p->width == 64 && p->dtype == SF_U16,
	      "mixed: planes stack");
	if (p && p->planes == 3) {
		CHECK(strcmp(p->plane_names[0], "img_000001.tif") == 0 &&
		          strcmp(p->plane_names[2], "img_000003.tif") == 0,
		      "mixed: plane order %s %s", p->plane_names[0], p->plane_names[2]);
		CHECK(p->plane_info[2] && strstr(p->plane_info[2]->path, "planes/img_000003.tif"),
		      "mixed: plane info path");
	}

	const sf_problem *pr;
	CHECK((pr = find_problem(d, "/bad.tif")) && strstr(pr->reason, "not a TIFF"),
	      "mixed: bad.tif problem %s", pr ? pr->reason : "(none)");
	CHECK((pr = find_problem(d, "/c.tiff")) && strstr(pr->reason, "c.tif"),
	      "mixed: c.tiff stem clash %s", pr ? pr->reason : "(none)");
	CHECK((pr = find_problem(d, "/outside.tif")) && strstr(pr->reason, "outside"),
	      "mixed: outside link %s", pr ? pr->reason : "(none)");
	CHECK((pr = find_problem(d, "/mixed")) && strstr(pr->reason, "z2.tif") &&
	          strstr(pr->reason, "64x50"),
	      "mixed: odd plane %s", pr ? pr->reason : "(none)");
	CHECK((pr = find_problem(d, "/mixed_type")) && strstr(pr->reason, "z1.tif") &&
	          strstr(pr->reason, "uint8"),
	      "mixed: odd type %s", pr ? pr->reason : "(none)");
	CHECK((pr = find_problem(d, "/one")) && strstr(pr->reason, "only one"),
	      "mixed: one plane %s", pr ? pr->reason : "(none)");
	CHECK((pr = find_problem(d, "/badplane")) && strstr(pr->reason, "z2.tif") &&
	          strstr(pr->reason, "truncated"),
	      "mixed: truncated plane %s", pr ? pr->reason : "(none)");
	CHECK((pr = find_problem(d, "/tiledplanes")) && strstr(pr->reason, "tiled"),
	      "mixed: tiled planes %s", pr ? pr->reason : "(none)");
	CHECK((pr = find_problem(d, "/linkplanes/z2.tif")) && strstr(pr->reason, "outside"),
	      "mixed: plane link outside %s", pr ? pr->reason : "(none)");
	CHECK((pr = find_problem(d, "/linkplanes")) && strstr(pr->reason, "symbolic link"),
	      "mixed: folder with an outside link %s", pr ? pr->reason : "(none)");
	CHECK(d->problem_count == 10, "mixed: %u problems, want 10", d->problem_count);
	for (uint32_t i = 0; i < d->problem_count; i++)
		CHECK(!strstr(d->problems[i].path, ".txt") &&
		          !strstr(d->problems[i].path, "json") &&
		          !strstr(d->problems[i].path, "hidden") &&
		          !strstr(d->problems[i].path, "empty"),
		      "mixed: unexpected problem %s", d->problems[i].path);
	sf_dataset_free(d);
}

static void test_root_is_plane_folder(void)
{
	reset_base();
	const char *names[] = {"img_10.tif", "img_2.tif", "img_1.tif", "img_3.tif"};
	for (int i = 0; i < 4; i++)
		write_file(path_of("%s", names[i], 0), &plane, 1);
	write_text(path_of("log.txt", 0, 0), "ignored\n");
	sf_dataset *d = NULL;
	sf_err e = {0};
	int rc = sf_dataset_scan(base, &d, &e);
	CHECK(rc == SF_OK, "root planes: scan: %s", e.msg);
	if (rc)
		return;
	CHECK(d->slide_count == 0 && d->stack_count == 1 && d->problem_count == 0,
	      "root planes: %u slides %u stacks %u problems", d->slide_count, d->stack_count,
	      d->problem_count);
	const sf_stack *s = find_stack(d, "");
	CHECK(s && s->planes == 4, "root planes: stack named \"\" with 4 planes");
	const char *order[] = {"img_1.tif", "img_2.tif", "img_3.tif", "img_10.tif"};
	for (uint32_t i = 0; s && i < s->planes && i < 4; i++)
		CHECK(strcmp(s->plane_names[i], order[i]) == 0, "root planes: plane %u is %s", i,
		      s->plane_names[i]);
	sf_dataset_free(d);

	/* One plane of another size: no longer a plane folder; each file is a
	 * (flat) slide. */
	write_file(path_of("img_4.tif", 0, 0), &plane_tall, 1);
	rc = sf_dataset_scan(base, &d, &e);
	CHECK(rc == SF_OK && d->stack_count == 0 && d->slide_count == 5,
	      "root mismatched: %u stacks %u slides", d ? d->stack_count : 0,
	      d ? d->slide_count : 0);
	sf_dataset_free(d);

	/* A broken plane among good ones: the root stack is one problem. */
	unlink(path_of("img_4.tif", 0, 0));
	write_text(path_of("img_5.tif", 0, 0), "");
	d = NULL;
	rc = sf_dataset_scan(base, &d, &e);
	CHECK(rc == SF_OK && d && d->stack_count == 0 && d->slide_count == 0 &&
	          d->problem_count == 1 && strstr(d->problems[0].reason, "img_5.tif"),
	      "root broken plane: %u problems: %s", d ? d->problem_count : 0,
	      d && d->problem_count ? d->problems[0].reason : "");
	sf_dataset_free(d);

	/* One-page untiled OME files directly in RAW_DIR (as Fiji's Bio-Formats
	 * export writes small images) stay slides: their OME-XML says each is
	 * one image.  In a subfolder they are planes (test_stack_inputs). */
	reset_base();
	page ome_image = plane;
	char desc[256];
	snprintf(desc, sizeof desc,
	         "<OME><Image><Pixels SizeX=\"%u\" SizeY=\"%u\" SizeC=\"1\" SizeZ=\"1\" "
	         "SizeT=\"1\" Type=\"uint16\"/></Image></OME>",
	         plane.w, plane.h);
	ome_image.desc = desc;
	write_file(path_of("a.ome.tif", 0, 0), &ome_image, 1);
	write_file(path_of("b.ome.tif", 0, 0), &ome_image, 1);
	d = NULL;
	rc = sf_dataset_scan(base, &d, &e);
	CHECK(rc == SF_OK && d && d->stack_count == 0 && d->slide_count == 2,
	      "root one-page OME files: %u stacks %u slides", d ? d->stack_count : 0,
	      d ? d->slide_count : 0);
	sf_dataset_free(d);
}

/* Files that look like z-stacks but are not one: time series (OME SizeT,
 * ImageJ frames) and files whose run of planes is broken by an odd page are
 * problems naming the file and the reason; trailing thumbnails and reduced
 * pages are fine; a folder of one-page OME-TIFFs is a plane folder. */
static void test_stack_inputs(void)
{
	reset_base();
	page small = {.w = 32, .h = 32, .bps = 16};
	page ij_tz = small;
	ij_tz.desc = "ImageJ=1.11a\nimages=10\nslices=5\nframes=2\nhyperstack=true\n";
	write_file(path_of("ij_tz.tif", 0, 0), &ij_tz, 10);
	page ome_tz = small;
	ome_tz.desc = "<OME><Image><Pixels SizeX=\"32\" SizeY=\"32\" SizeC=\"1\" SizeZ=\"5\" "
	              "SizeT=\"2\" Type=\"uint16\"/></Image></OME>";
	write_file(path_of("ome_tz.ome.tif", 0, 0), &ome_tz, 10);
	page ome_cz = small;
	ome_cz.desc = "<OME><Image><Pixels SizeX=\"32\" SizeY=\"32\" SizeC=\"2\" SizeZ=\"3\" "
	              "SizeT=\"1\" Type=\"uint16\"/></Image></OME>";
	/* channels, but no DimensionOrder: which page is which is unknown */
	write_file(path_of("ome_cz.ome.tif", 0, 0), &ome_cz, 6);
	page odd_size = {.w = 30, .h = 30, .bps = 16};
	page odd_type = {.w = 32, .h = 32, .bps = 8};
	page thumb = {.w = 8, .h = 8, .bps = 8};
	page reduced = {.w = 24, .h = 20, .bps = 16};
	page label = {.w = 40, .h = 40, .bps = 8};
	write_run(path_of("mid_size.tif", 0, 0), &small, 10, 6, &odd_size, 0);
	write_run(path_of("mid_type.tif", 0, 0), &small, 8, 4, &odd_type, 0);
	write_run(path_of("second.tif", 0, 0), &small, 5, 1, &odd_size, 0);
	write_run(path_of("last.tif", 0, 0), &small, 6, 5, &odd_size, 0);
	write_run(path_of("thumb.tif", 0, 0), &small, 9, 8, &thumb, 0);
	write_run(path_of("reduced.tif", 0, 0), &small, 7, 6, &reduced, FILETYPE_REDUCEDIMAGE);
	write_run(path_of("labelled.tif", 0, 0), &small, 2, 1, &label, 0);
	page ome_z = small;
	ome_z.desc = "<OME><Image><Pixels SizeX=\"32\" SizeY=\"32\" SizeC=\"1\" SizeZ=\"5\" "
	             "SizeT=\"1\" Type=\"uint16\"/></Image></OME>";
	write_run(path_of("ome_odd.ome.tif", 0, 0), &ome_z, 5, 3, &odd_type, 0);
	make_dir(path_of("omeplanes", 0, 0));
	page ome_plane = small;
	ome_plane.desc = "<OME><Image><Pixels SizeX=\"32\" SizeY=\"32\" SizeC=\"1\" SizeZ=\"1\" "
	                 "SizeT=\"1\" Type=\"uint16\"/></Image></OME>";
	for (int i = 2; i >= 0; i--) {
		char name[32];
		snprintf(name, sizeof name, "img_%04d.ome.tif", i);
		write_file(path_of("omeplanes/%s", name, 0), &ome_plane, 1);
	}
	make_dir(path_of("twopage", 0, 0));
	write_file(path_of("twopage/z1.tif", 0, 0), &small, 1);
	write_file(path_of("twopage/z2.tif", 0, 0), &small, 2);
	make_dir(path_of("svsplanes", 0, 0));
	page svs = small;
	svs.desc = "Aperio Image Library v12\n32x32 |MPP = 0.5";
	write_file(path_of("svsplanes/z1.tif", 0, 0), &small, 1);
	write_file(path_of("svsplanes/z2.svs", 0, 0), &svs, 1);

	sf_slide_info *s = NULL;
	sf_err e = {0};
	CHECK(sf_slide_probe(path_of("ij_tz.tif", 0, 0), &s, &e) == SF_OK && s->stated_t == 2 &&
	          s->stated_z == 5 && s->odd_page == 0,
	      "probe ij_tz: %s", e.msg);
	sf_slide_info_free(s);
	CHECK(sf_slide_probe(path_of("ome_tz.ome.tif", 0, 0), &s, &e) == SF_OK &&
	          s->stated_t == 2 && s->stated_z == 5 && s->channels == 10,
	      "probe ome_tz: %s", e.msg);
	sf_slide_info_free(s);
	CHECK(sf_slide_probe(path_of("mid_size.tif", 0, 0), &s, &e) == SF_OK && s->channels == 6 &&
	          s->odd_page == 6 &&
	          strcmp(s->odd_page_text, "page 6 is 30x30 uint16, page 0 is 32x32 uint16") == 0,
	      "probe mid_size: %s / %s", e.msg, s ? s->odd_page_text : "");
	sf_slide_info_free(s);
	CHECK(sf_slide_probe(path_of("thumb.tif", 0, 0), &s, &e) == SF_OK && s->channels == 8 &&
	          s->odd_page == 0,
	      "probe thumb: %s odd %u", e.msg, s ? s->odd_page : 0);
	sf_slide_info_free(s);

	sf_dataset *d = NULL;
	int rc = sf_dataset_scan(base, &d, &e);
	CHECK(rc == SF_OK, "stack inputs: scan: %s", e.msg);
	if (rc)
		return;
	const sf_problem *pr;
	CHECK((pr = find_problem(d, "/ij_tz.tif")) && strstr(pr->reason, "ij_tz.tif") &&
	          strstr(pr->reason, "time series (frames=2)"),
	      "ImageJ frames=2: %s", pr ? pr->reason : "(none)");
	CHECK((pr = find_problem(d, "/ome_tz.ome.tif")) && strstr(pr->reason, "ome_tz.ome.tif") &&
	          strstr(pr->reason, "time series (SizeT=2)"),
	      "OME SizeT=2: %s", pr ? pr->reason : "(none)");
	CHECK((pr = find_problem(d, "/mid_size.tif")) && strstr(pr->reason, "mid_size.tif") &&
	          strstr(pr->reason, "page 6 is 30x30 uint16, page 0 is 32x32 uint16"),
	      "odd size page: %s", pr ? pr->reason : "(none)");
	CHECK((pr = find_problem(d, "/mid_type.tif")) &&
	          strstr(pr->reason, "page 4 is 32x32 uint8, page 0 is 32x32 uint16"),
	      "odd type page: %s", pr ? pr->reason : "(none)");
	CHECK((pr = find_problem(d, "/second.tif")) && strstr(pr->reason, "page 1 is 30x30"),
	      "odd page 1: %s", pr ? pr->reason : "(none)");
	CHECK((pr = find_problem(d, "/last.tif")) && strstr(pr->reason, "page 5 is 30x30"),
	      "odd last page: %s", pr ? pr->reason : "(none)");
	CHECK((pr = find_problem(d, "/ome_odd.ome.tif")) &&
	          strstr(pr->reason, "page 3 is 32x32 uint8"),
	      "OME odd page: %s", pr ? pr->reason : "(none)");
	const char *gone[] = {"ij_tz",  "ome_tz", "mid_size", "mid_type",
	                      "second", "last",   "ome_odd",  "ome_cz"};
	for (size_t i = 0; i < sizeof gone / sizeof gone[0]; i++) {
		CHECK(!find_stack(d, gone[i]), "%s must not be a stack", gone[i]);
		for (uint32_t k = 0; k < d->slide_count; k++)
			CHECK(strcmp(d->slide_stems[k], gone[i]) != 0, "%s must not be a slide",
			      gone[i]);
	}
	const sf_stack *st = find_stack(d, "thumb");
	CHECK(st && st->planes == 8, "trailing thumbnail: %u planes, want 8", st ? st->planes : 0);
	st = find_stack(d, "reduced");
	CHECK(st && st->planes == 6, "trailing reduced page: %u planes, want 6",
	      st ? st->planes : 0);
	CHECK(!find_stack(d, "ome_cz_c0") && (pr = find_problem(d, "/ome_cz.ome.tif")) &&
	          strstr(pr->reason, "DimensionOrder ''"),
	      "OME SizeC=2 SizeZ=3 without DimensionOrder: %s", pr ? pr->reason : "(none)");
	CHECK(!find_stack(d, "labelled") && !find_problem(d, "/labelled.tif"),
	      "one plane and a label page: a slide");
	st = find_stack(d, "omeplanes");
	CHECK(st && st->planes == 3 && !st->multipage && st->width == 32 && st->dtype == SF_U16,
	      "one-page OME planes: a plane folder");
	if (st && st->planes == 3)
		CHECK(strcmp(st->plane_names[0], "img_0000.ome.tif") == 0 &&
		          strcmp(st->plane_names[2], "img_0002.ome.tif") == 0,
		      "OME plane names %s %s", st->plane_names[0], st->plane_names[2]);
	CHECK((pr = find_problem(d, "/twopage")) && strstr(pr->reason, "z2.tif has several pages"),
	      "two-page plane: %s", pr ? pr->reason : "(none)");
	CHECK((pr = find_problem(d, "/svsplanes")) && strstr(pr->reason, "z2.svs") &&
	          !strstr(pr->reason, "several pages"),
	      "SVS plane: %s", pr ? pr->reason : "(none)");
	CHECK(d->problem_count == 10, "stack inputs: %u problems, want 10", d->problem_count);
	sf_dataset_free(d);
}

/* The pages of a z-stack of nc channels, nz planes and nt time points, z
 * varying faster than c if z_first, cut to its first pages pages; desc on
 * page 0.  Every pixel of channel c's plane z is 100 * c + z + 1, so a page
 * read back tells which plane it is. */
static void write_cz_pages(const char *path, const char *desc, uint32_t nc, uint32_t nz,
                           uint32_t nt, int z_first, uint32_t pages)
{
	uint16_t px[32 * 32];
	TIFF *tif = TIFFOpen(path, "w");
	int ok = tif != NULL;
	uint32_t written = 0, inner = z_first ? nz : nc, outer = z_first ? nc : nz;
	for (uint32_t t = 0; t < nt; t++)
		for (uint32_t o = 0; o < outer; o++)
			for (uint32_t i = 0; ok && i < inner && written < pages; i++, written++) {
				uint32_t c = z_first ? o : i, z = z_first ? i : o;
				for (size_t k = 0; k < 32 * 32; k++)
					px[k] = (uint16_t)(100 * c + z + 1);
				TIFFSetField(tif, TIFFTAG_IMAGEWIDTH, 32);
				TIFFSetField(tif, TIFFTAG_IMAGELENGTH, 32);
				TIFFSetField(tif, TIFFTAG_BITSPERSAMPLE, 16);
				TIFFSetField(tif, TIFFTAG_SAMPLESPERPIXEL, 1);
				TIFFSetField(tif, TIFFTAG_PHOTOMETRIC, PHOTOMETRIC_MINISBLACK);
				TIFFSetField(tif, TIFFTAG_ROWSPERSTRIP, 32);
				if (written == 0)
					TIFFSetField(tif, TIFFTAG_IMAGEDESCRIPTION, desc);
				ok = TIFFWriteEncodedStrip(tif, 0, px, sizeof px) >= 0 &&
				     TIFFWriteDirectory(tif);
			}
	if (tif)
		TIFFClose(tif);
	CHECK(ok && written == pages, "write %s", path);
}

/* An OME z-stack (write_cz_pages) whose pages follow order (e.g. "XYZCT";
 * "" writes no DimensionOrder). */
static void write_ome_cz(const char *path, uint32_t nc, uint32_t nz, uint32_t nt, const char *order,
                         uint32_t pages)
{
	char desc[512];
	char dim[40] = "";
	if (order[0])
		snprintf(dim, sizeof dim, "DimensionOrder=\"%s\" ", order);
	snprintf(desc, sizeof desc,
	         "<OME><Image><Pixels %sSizeX=\"32\" SizeY=\"32\" SizeC=\"%u\" SizeZ=\"%u\" "
	         "SizeT=\"%u\" Type=\"uint16\"/></Image></OME>",
	         dim, nc, nz, nt);
	const char *zc = strchr(order, 'Z'), *cc = strchr(order, 'C');
	write_cz_pages(path, desc, nc, nz, nt, !order[0] || zc < cc, pages);
}

/* An ImageJ hyperstack (write_cz_pages) as Fiji saves a multichannel
 * z-stack: channels= and slices= (slices= left out when nz is 0), pages
 * in ImageJ's order, channel fastest. */
static void write_imagej_cz(const char *path, uint32_t nc, uint32_t nz, uint32_t pages)
{
	char desc[256], slices[32] = "";
	if (nz)
		snprintf(slices, sizeof slices, "slices=%u\n", nz);
	snprintf(desc, sizeof desc,
	         "ImageJ=1.54f\nimages=%u\nchannels=%u\n%shyperstack=true\nmode=composite\n",
	         nc * (nz ? nz : 1), nc, slices);
	write_cz_pages(path, desc, nc, nz ? nz : 1, 1, 0, pages);
}

/* Channel c of stack st (a channel stack of a write_ome_cz file): each plane
 * reads back as the plane the file's writer put there. */
static void check_channel_planes(const sf_stack *st, uint32_t c, const char *what)
{
	sf_slide_reader *r = NULL;
	sf_err e = {0};
	int rc = sf_slide_reader_open(st->plane_info[0], &r, &e);
	CHECK(rc == SF_OK, "%s: open: %s", what, e.msg);
	for (uint32_t z = 0; rc == SF_OK && z < st->planes; z++) {
		uint16_t v = 0;
		rc = sf_slide_read_region(r, 0, st->page_first + z * st->page_step, 7, 9, 1, 1, &v,
		                          &e);
		CHECK(rc == SF_OK && v == 100 * c + z + 1, "%s: plane %u reads %u, want %u (%s)",
		      what, z, v, 100 * c + z + 1, e.msg);
	}
	sf_slide_reader_close(r);
}

static const sf_slide_info *find_slide(const sf_dataset *d, const char *stem)
{
	for (uint32_t i = 0; i < d->slide_count; i++)
		if (strcmp(d->slide_stems[i], stem) == 0)
			return d->slides[i];
	return NULL;
}

/* A time series that would be a slide (OME SizeT or ImageJ frames > 1,
 * channels but no z-planes) is a problem, like a time-series stack file,
 * rather than a slide whose time points are extra channels; a file holding
 * one time point of a multi-file series (here: SizeC pages) stays a slide. */
static void test_time_series_slides(void)
{
	reset_base();
	write_ome_cz(path_of("tl.ome.tif", 0, 0), 2, 1, 3, "XYCZT", 6);
	write_ome_cz(path_of("one_t.ome.tif", 0, 0), 2, 1, 3, "XYCZT", 2);
	write_ome_cz(path_of("plane_t.ome.tif", 0, 0), 1, 1, 3, "XYCZT", 1);
	write_ome_cz(path_of("c2.ome.tif", 0, 0), 2, 1, 1, "XYCZT", 2);
	page ij = plane;
	ij.desc = "ImageJ=1.54f\nimages=6\nchannels=2\nframes=3\nhyperstack=true\n";
	write_file(path_of("ij_ct.tif", 0, 0), &ij, 6);
	sf_dataset *d = NULL;
	sf_err e = {0};
	int rc = sf_dataset_scan(base, &d, &e);
	CHECK(rc == SF_OK, "time series slides: scan: %s", e.msg);
	if (rc)
		return;
	const sf_problem *pr = find_problem(d, "/tl.ome.tif");
	CHECK(!find_slide(d, "tl") && pr &&
	          strstr(pr->reason, "tl.ome.tif is a time series (SizeT=3)") &&
	          strstr(pr->reason, "registered/"),
	      "OME SizeC=2 SizeT=3: want a problem, not a slide: %s", pr ? pr->reason : "(none)");
	pr = find_problem(d, "/ij_ct.tif");
	CHECK(!find_slide(d, "ij_ct") && pr &&
	          strstr(pr->reason, "ij_ct.tif is a time series (frames=3)"),
	      "ImageJ channels=2 frames=3: want a problem, not a slide: %s",
	      pr ? pr->reason : "(none)");
	const sf_slide_info *s = find_slide(d, "one_t");
	CHECK(s && s->channels == 2 && !find_problem(d, "/one_t.ome.tif"),
	      "one time point of SizeT=3 (2 pages): slide of %u channels", s ? s->channels : 0);
	s = find_slide(d, "plane_t");
	CHECK(s && s->channels == 1, "one page of SizeT=3: slide of %u channels",
	      s ? s->channels : 0);
	s = find_slide(d, "c2");
	CHECK(s && s->channels == 2, "SizeC=2 SizeT=1: slide of %u channels", s ? s->channels : 0);
	CHECK(d->slide_count == 3 && d->problem_count == 2 && d->stack_count == 0,
	      "time series slides: %u slides %u problems %u stacks", d->slide_count,
	      d->problem_count, d->stack_count);
	sf_dataset_free(d);
}

/* Multichannel OME z-stacks: one stack per channel, <stem>_c<C>, its planes
 * the pages the DimensionOrder says; a short or ambiguous file is a problem. */
static void test_channel_stacks(void)
{
	reset_base();
	write_ome_cz(path_of("zc.ome.tif", 0, 0), 2, 3, 1, "XYZCT", 6);
	write_ome_cz(path_of("cz.ome.tif", 0, 0), 3, 4, 1, "XYCZT", 12);
	write_ome_cz(path_of("tcz.ome.tif", 0, 0), 2, 3, 1, "XYTCZ", 6);
	write_ome_cz(path_of("ztc.ome.tif", 0, 0), 2, 3, 1, "XYZTC", 6);
	write_ome_cz(path_of("short.ome.tif", 0, 0), 2, 6, 1, "XYZCT", 11);
	write_ome_cz(path_of("bad_order.ome.tif", 0, 0), 2, 3, 1, "XYZZT", 6);
	write_ome_cz(path_of("czt.ome.tif", 0, 0), 2, 3, 2, "XYZCT", 12);
	write_ome_cz(path_of("single.ome.tif", 0, 0), 1, 5, 1, "XYZCT", 5);
	write_ome_cz(path_of("zc.ome.tiff", 0, 0), 2, 3, 1, "XYZCT", 6); /* zc_c0 again */

	sf_dataset *d = NULL;
	sf_err e = {0};
	int rc = sf_dataset_scan(base, &d, &e);
	CHECK(rc == SF_OK, "channel stacks: scan: %s", e.msg);
	if (rc)
		return;
	static const struct {
		const char *stem;
		uint32_t channels, planes, step; /* step: 1 when z varies fastest, else SizeC */
	} want[] = {{"zc", 2, 3, 1}, {"cz", 3, 4, 3}, {"tcz", 2, 3, 2}, {"ztc", 2, 3, 1}};
	for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
		for (uint32_t c = 0; c < want[i].channels; c++) {
			char name[32];
			snprintf(name, sizeof name, "%s_c%u", want[i].stem, c);
			const sf_stack *st = find_stack(d, name);
			uint32_t first = want[i].step == 1 ? c * want[i].planes : c;
			CHECK(st && st->multipage && st->planes == want[i].planes &&
			          st->page_first == first && st->page_step == want[i].step &&
			          st->width == 32 && st->dtype == SF_U16 && st->plane_info[0],
			      "%s: a stack of %u planes, pages %u + %u z", name, want[i].planes,
			      first, want[i].step);
			if (!st || st->planes != want[i].planes)
				continue;
			CHECK(strcmp(st->plane_names[0], "img_000001.tif") == 0 &&
			          strcmp(st->plane_names[st->planes - 1], "img_000003.tif") >= 0,
			      "%s: plane names %s", name, st->plane_names[0]);
			check_channel_planes(st, c, name);
		}
		char extra[32];
		snprintf(extra, sizeof extra, "%s_c%u", want[i].stem, want[i].channels);
		CHECK(!find_stack(d, extra) && !find_stack(d, want[i].stem), "%s: no other stacks",
		      want[i].stem);
	}
	const sf_stack *one = find_stack(d, "single");
	CHECK(one && one->planes == 5 && one->page_first == 0 && one->page_step == 1 &&
	          !find_stack(d, "single_c0"),
	      "SizeC=1: one stack as before");
	CHECK(d->slide_count == 0, "channel stacks: %u slides, want none (first %s)",
	      d->slide_count, d->slide_count ? d->slide_stems[0] : "");
	CHECK(d->stack_count == 2 + 3 + 2 + 2 + 1, "channel stacks: %u stacks, want 10",
	      d->stack_count);
	const sf_problem *pr;
	CHECK((pr = find_problem(d, "/short.ome.tif")) && strstr(pr->reason, "short.ome.tif") &&
	          strstr(pr->reason, "11 pages") && strstr(pr->reason, "needs 12"),
	      "a missing page: %s", pr ? pr->reason : "(none)");
	CHECK((pr = find_problem(d, "/bad_order.ome.tif")) &&
	          strstr(pr->reason, "DimensionOrder 'XYZZT'"),
	      "bad DimensionOrder: %s", pr ? pr->reason : "(none)");
	CHECK((pr = find_problem(d, "/czt.ome.tif")) && strstr(pr->reason, "time series (SizeT=2)"),
	      "channels and time points: %s", pr ? pr->reason : "(none)");
	CHECK(!find_stack(d, "short_c0") && !find_stack(d, "bad_order_c0") &&
	          !find_stack(d, "czt_c0"),
	      "problems are not stacks");
	CHECK((pr = find_problem(d, "/zc.ome.tiff")) &&
	          strstr(pr->reason, "stack name 'zc_c0' is already used"),
	      "channel stack names clash: %s", pr ? pr->reason : "(none)");
	CHECK(d->problem_count == 4, "channel stacks: %u problems, want 4", d->problem_count);
	sf_dataset_free(d);
}

/* An ImageJ hyperstack of several channels and slices (Fiji's multichannel
 * z-stack) is one stack per channel like the OME one, its planes every
 * channels-th page; one that is short of pages is a problem; channels
 * without slices= stay a slide. */
static void test_imagej_channel_stacks(void)
{
	reset_base();
	write_imagej_cz(path_of("ij_cz.tif", 0, 0), 3, 4, 12);
	write_imagej_cz(path_of("ij_short.tif", 0, 0), 2, 6, 11);
	write_imagej_cz(path_of("ij_c.tif", 0, 0), 2, 0, 2);
	sf_dataset *d = NULL;
	sf_err e = {0};
	int rc = sf_dataset_scan(base, &d, &e);
	CHECK(rc == SF_OK, "ImageJ channel stacks: scan: %s", e.msg);
	if (rc)
		return;
	for (uint32_t c = 0; c < 3; c++) {
		char name[32];
		snprintf(name, sizeof name, "ij_cz_c%u", c);
		const sf_stack *st = find_stack(d, name);
		CHECK(st && st->multipage && st->planes == 4 && st->page_first == c &&
		          st->page_step == 3 && st->width == 32 && st->dtype == SF_U16,
		      "%s: a stack of 4 planes, pages %u + 3 z", name, c);
		if (st && st->planes == 4)
			check_channel_planes(st, c, name);
	}
	CHECK(!find_stack(d, "ij_cz") && !find_stack(d, "ij_cz_c3") && !find_slide(d, "ij_cz"),
	      "ij_cz: its channels' stacks only, no slide");
	const sf_problem *pr = find_problem(d, "/ij_short.tif");
	CHECK(pr && strstr(pr->reason, "ij_short.tif has 11 pages") &&
	          strstr(pr->reason, "channels=2 x slices=6 needs 12"),
	      "ImageJ hyperstack short of a page: %s", pr ? pr->reason : "(none)");
	CHECK(!find_stack(d, "ij_short_c0") && !find_slide(d, "ij_short"),
	      "ij_short: neither stacks nor slide");
	const sf_slide_info *s = find_slide(d, "ij_c");
	CHECK(s && s->channels == 2 && !find_stack(d, "ij_c_c0"),
	      "ImageJ channels=2 without slices=: a slide of %u channels", s ? s->channels : 0);
	CHECK(d->stack_count == 3 && d->slide_count == 1 && d->problem_count == 1,
	      "ImageJ channel stacks: %u stacks %u slides %u problems", d->stack_count,
	      d->slide_count, d->problem_count);
	sf_dataset_free(d);
}

/* A stack file that states more (or fewer) planes than it has pages, or an
 * ImageJ stack stored after one IFD that is cut short or of several
 * channels, is a problem, never a short stack or a 2D slide of its first
 * plane; a folder named like a plane leaves a hole that keeps the plane
 * folder from being served.  (A whole one-IFD stack is read: test_slide.) */
static void test_stated_planes(void)
{
	reset_base();
	page ij = plane;
	ij.desc = "ImageJ=1.11a\nimages=16\nslices=16\nunit=micron\nspacing=1.2\nloop=false\n";
	write_file(path_of("ij_short.tif", 0, 0), &ij, 10);
	write_file(path_of("ij_one.tif", 0, 0), &ij, 1); /* compressed: not ImageJ's layout */
	page ij_raw = ij;
	ij_raw.raw = 1;
	write_file(path_of("ij_cut.tif", 0, 0), &ij_raw, 1); /* ImageJ's layout over 4 GiB, cut */
	page ij_chans = plane;
	ij_chans.desc = "ImageJ=1.11a\nimages=16\nchannels=2\nslices=8\nhyperstack=true\n";
	write_file(path_of("ij_chans.tif", 0, 0), &ij_chans, 1);
	page ome = plane;
	ome.desc = "<OME><Image><Pixels SizeX=\"64\" SizeY=\"48\" SizeC=\"1\" SizeZ=\"16\" "
	           "SizeT=\"1\" DimensionOrder=\"XYZCT\" Type=\"uint16\"/></Image></OME>";
	write_file(path_of("ome_short.ome.tif", 0, 0), &ome, 10);
	page ij_ok = plane;
	ij_ok.desc = "ImageJ=1.11a\nimages=6\nslices=6\nunit=micron\n";
	write_file(path_of("ij_ok.tif", 0, 0), &ij_ok, 6);
	page ij_2d = plane;
	ij_2d.desc = "ImageJ=1.11a\nunit=micron\n";
	write_file(path_of("ij_2d.tif", 0, 0), &ij_2d, 1);
	make_dir(path_of("hole", 0, 0));
	make_dir(path_of("kept", 0, 0));
	make_dir(path_of("kept/notes", 0, 0)); /* not image-named: ignored */
	make_dir(path_of("ijplanes", 0, 0));
	for (int i = 0; i < 4; i++) {
		char name[32];
		snprintf(name, sizeof name, "z%d.tif", i);
		if (i == 2)
			make_dir(path_of("hole/%s", name, 0));
		else
			write_file(path_of("hole/%s", name, 0), &plane, 1);
		write_file(path_of("kept/%s", name, 0), &plane, 1);
		if (i < 2)
			write_file(path_of("ijplanes/%s", name, 0), &ij, 1);
	}
	sf_dataset *d = NULL;
	sf_err e = {0};
	CHECK(sf_dataset_scan(base, &d, &e) == SF_OK && d, "stated planes: %s", e.msg);
	if (!d)
		return;
	static const char *const want[][2] = {
	    {"/ij_short.tif",
	     "ij_short.tif states 16 planes (ImageJ slices=16) but has 10 pages of 64x48 uint16"},
	    {"/ome_short.ome.tif", "states 16 planes (OME SizeZ=16) but has 10 pages"},
	    {"/ij_one.tif", "ij_one.tif states 16 planes (ImageJ slices=16) but has 1 page, and "
	                    "its page is compressed (Compression 8)"},
	    {"/ij_cut.tif", "ij_cut.tif holds 1 of 16 planes"},
	    {"/ij_chans.tif", "ij_chans.tif states 8 planes (ImageJ slices=8) but has 1 page, and "
	                      "it states channels=2"},
	    {"/hole/z2.tif", "a folder named like a plane"},
	    {"/hole", "some planes are unusable"},
	    {"/ijplanes", "plane z0.tif states several z-planes"},
	};
	for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
		const sf_problem *p = find_problem(d, want[i][0]);
		CHECK(p && strstr(p->reason, want[i][1]), "%s: %s", want[i][0],
		      p ? p->reason : "no problem");
	}
	CHECK(d->problem_count == 8, "stated planes: %u problems, want 8", d->problem_count);
	const sf_stack *ok = find_stack(d, "ij_ok");
	CHECK(ok && ok->planes == 6 && ok->multipage, "ij_ok is a 6-plane stack");
	const sf_stack *kept = find_stack(d, "kept");
	CHECK(kept && kept->planes == 4, "kept is a 4-plane stack");
	CHECK(d->stack_count == 2, "stated planes: %u stacks, want 2", d->stack_count);
	CHECK(d->slide_count == 1 && strcmp(d->slide_stems[0], "ij_2d") == 0,
	      "stated planes: only ij_2d is a slide (%u slides)", d->slide_count);
	sf_dataset_free(d);

	/* RAW_DIR as a plane folder: an image-named subfolder stands where a
	 * plane would be. */
	reset_base();
	write_file(path_of("z0.tif", 0, 0), &plane, 1);
	write_file(path_of("z1.tif", 0, 0), &plane, 1);
	make_dir(path_of("z2.tif", 0, 0));
	write_file(path_of("z3.tif", 0, 0), &plane, 1);
	d = NULL;
	CHECK(sf_dataset_scan(base, &d, &e) == SF_OK && d, "root hole: %s", e.msg);
	if (!d)
		return;
	const sf_problem *p = d->problem_count ? &d->problems[0] : NULL;
	CHECK(p && strcmp(p->path, d->root) == 0 &&
	          strstr(p->reason, "folder z2.tif is named like a plane"),
	      "root hole: %s", p ? p->reason : "no problem");
	CHECK(d->stack_count == 0, "root hole: %u stacks, want 0", d->stack_count);
	sf_dataset_free(d);
}

static void test_edges(void)
{
	reset_base();
	sf_dataset *d = NULL;
	sf_err e = {0};
	int rc = sf_dataset_scan(base, &d, &e);
	CHECK(rc == SF_OK && d && d->slide_count == 0 && d->stack_count == 0 &&
	          d->problem_count == 0,
	      "empty root: %s", e.msg);
	sf_dataset_free(d);
	d = NULL;
	rc = sf_dataset_scan(path_of("nope", 0, 0), &d, &e);
	CHECK(rc == SF_ENOTFOUND && !d && strstr(e.msg, "nope"), "missing root: %d %s", rc, e.msg);
	write_text(path_of("file", 0, 0), "x");
	rc = sf_dataset_scan(path_of("file", 0, 0), &d, &e);
	CHECK(rc == SF_EINVAL && !d && strstr(e.msg, "not a folder"), "file root: %d %s", rc,
	      e.msg);
}

static void test_stems(void)
{
	const char *cases[][2] = {
	    {"a.ome.tiff", "a"}, {"a.OME.TIF", "a"}, {"b.svs", "b"},     {"c.tif", "c"},
	    {"d.tiff", "d"},     {"e.btf", "e"},     {"f.tf8", "f"},     {"g.tf2", "g"},
	    {"h.ome.btf", "h"},  {"x.y.tif", "x.y"}, {"plain", "plain"}, {"n.txt", "n.txt"},
	    {"ome.tif", "ome"},  {"s.qptiff", "s"},
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		char *s = sf_file_stem(cases[i][0]);
		CHECK(s && strcmp(s, cases[i][1]) == 0, "stem(%s) = %s, want %s", cases[i][0],
		      s ? s : "(null)", cases[i][1]);
		free(s);
	}
}

int main(void)
{
	sf_log_set_level(SF_LOG_ERROR); /* each problem is logged at WARN: expected here */
	snprintf(base, sizeof base, "/tmp/test_dataset.XXXXXX");
	if (!mkdtemp(base)) {
		perror("mkdtemp");
		return 1;
	}
	test_stems();
	test_mixed_root();
	test_root_is_plane_folder();
	test_stack_inputs();
	test_channel_stacks();
	test_imagej_channel_stacks();
	test_time_series_slides();
	test_stated_planes();
	test_edges();
	nftw(base, remove_entry, 8, FTW_DEPTH | FTW_PHYS);
	printf("test_dataset: %d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}

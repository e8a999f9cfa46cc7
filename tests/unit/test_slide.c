/* test_slide.c — sf_slide_probe and sf_slide_read_region against files
 * written here with libtiff (the oracle is the pixel pattern the writer put
 * in each IFD), plus bad and unsupported files.
 *
 * Also a driver for tests/integration/test_slide_oracle.py:
 *   test_slide --info PATH                          probe, print key=value lines
 *   test_slide --dump PATH LEVEL CHANNEL X Y W H OUT  write the region's raw samples */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include <tiffio.h>

#include "check.h"
#include "scopefs/slide.h"

static char tmpdir[64];

static char *tmp_path(const char *name)
{
	static char buf[8][256];
	static int next;
	char *p = buf[next++ % 8];
	snprintf(p, 256, "%s/%s", tmpdir, name);
	return p;
}

/* ---- fixtures: a libtiff writer with a known pixel pattern --------------- */

typedef struct ifd_spec {
	uint32_t w, h;
	sf_dtype dt;
	uint16_t spp;
	uint32_t tile; /* tile edge; 0 = strips */
	uint32_t rps;  /* rows per strip */
	uint16_t compression;
	uint32_t subfile;
	int id;     /* pattern seed: which IFD the data came from */
	int nsub;   /* the next nsub specs are SubIFDs of this one */
	int jpeg;   /* JPEG, YCbCr, written from RGB */
	int smooth; /* smooth pattern (for lossy JPEG) */
	const char *desc;
	float xres;
	uint16_t resunit;
	uint16_t bps_override, format_override, photometric_override; /* unsupported kinds */
} ifd_spec;

static double pattern(const ifd_spec *s, uint32_t x, uint32_t y, uint32_t c)
{
	if (s->smooth)
		return 40 + x / 4 + y / 8 + c * 20;
	switch (s->dt) {
	case SF_U8: return (x * 3 + y * 5 + c * 50 + (uint32_t)s->id * 17) & 0xff;
	case SF_U16: return (x * 7 + y * 131 + c * 1000 + (uint32_t)s->id * 4099) & 0xffff;
	default: return s->id * 1000.0 + x * 0.5 + y * 0.25 - c;
	}
}

static void put_sample(void *buf, size_t i, sf_dtype dt, double v)
{
	switch (dt) {
	case SF_U8: ((uint8_t *)buf)[i] = (uint8_t)v; break;
	case SF_U16: ((uint16_t *)buf)[i] = (uint16_t)v; break;
	default: ((float *)buf)[i] = (float)v; break;
	}
}

/* Fill a w x h unit whose origin is (x0, y0); pixels past the image are 0. */
static void fill_unit(const ifd_spec *s, void *buf, uint32_t x0, uint32_t y0, uint32_t w,
                      uint32_t h)
{
	for (uint32_t y = 0; y < h; y++)
		for (uint32_t x = 0; x < w; x++)
			for (uint32_t c = 0; c < s->spp; c++) {
				int in = x0 + x < s->w && y0 + y < s->h;
				double v = in ? pattern(s, x0 + x, y0 + y, c) : 0;
				put_sample(buf, ((size_t)y * w + x) * s->spp + c, s->dt, v);
			}
}

static int write_ifd(TIFF *tif, const ifd_spec *s)
{
	uint16_t bps = s->bps_override ? s->bps_override : (uint16_t)(8 * sf_dtype_bytes(s->dt));
	uint16_t fmt = s->format_override ? s->format_override
	               : s->dt == SF_F32  ? SAMPLEFORMAT_IEEEFP
	                                  : SAMPLEFORMAT_UINT;
	uint16_t photometric = s->photometric_override ? s->photometric_override
	                       : s->jpeg               ? PHOTOMETRIC_YCBCR
	                       : s->spp == 3           ? PHOTOMETRIC_RGB
	                                               : PHOTOMETRIC_MINISBLACK;
	TIFFSetField(tif, TIFFTAG_IMAGEWIDTH, s->w);
	TIFFSetField(tif, TIFFTAG_IMAGELENGTH, s->h);
	TIFFSetField(tif, TIFFTAG_BITSPERSAMPLE, bps);
	TIFFSetField(tif, TIFFTAG_SAMPLESPERPIXEL, s->spp);
	TIFFSetField(tif, TIFFTAG_SAMPLEFORMAT, fmt);
	TIFFSetField(tif, TIFFTAG_PHOTOMETRIC, photometric);
	TIFFSetField(tif, TIFFTAG_PLANARCONFIG, PLANARCONFIG_CONTIG);
	TIFFSetField(tif, TIFFTAG_COMPRESSION,
	             s->jpeg          ? COMPRESSION_JPEG
	             : s->compression ? s->compression
	                              : COMPRESSION_NONE);
	if (s->jpeg) {
		TIFFSetField(tif, TIFFTAG_JPEGQUALITY, 95);
		TIFFSetField(tif, TIFFTAG_JPEGCOLORMODE, JPEGCOLORMODE_RGB);
	}
	if (s->photometric_override == PHOTOMETRIC_PALETTE) {
		static uint16_t map[256];
		TIFFSetField(tif, TIFFTAG_COLORMAP, map, map, map);
	}
	if (s->subfile)
		TIFFSetField(tif, TIFFTAG_SUBFILETYPE, s->subfile);
	if (s->desc)
		TIFFSetField(tif, TIFFTAG_IMAGEDESCRIPTION, s->desc);
	if (s->xres > 0) {
		TIFFSetField(tif, TIFFTAG_XRESOLUTION, s->xres);
		TIFFSetField(tif, TIFFTAG_YRESOLUTION, s->xres);
		TIFFSetField(tif, TIFFTAG_RESOLUTIONUNIT, s->resunit);
	}
	if (s->nsub > 0) {
		uint64_t zeros[8] = {0};
		TIFFSetField(tif, TIFFTAG_SUBIFD, (uint16_t)s->nsub, zeros);
	}
	if (s->bps_override == 1 || s->bps_override == 64) {
		/* Unsupported kinds only need a valid header and some data. */
		TIFFSetField(tif, TIFFTAG_ROWSPERSTRIP, s->h);
		size_t n = (size_t)TIFFStripSize(tif);
		void *buf = calloc(1, n);
		int ok = buf && TIFFWriteEncodedStrip(tif, 0, buf, (tmsize_t)n) >= 0;
		free(buf);
		return ok && TIFFWriteDirectory(tif);
	}
	size_t px = sf_dtype_bytes(s->dt) * s->spp;
	int ok = 1;
	if (s->tile) {
		TIFFSetField(tif, TIFFTAG_TILEWIDTH, s->tile);
		TIFFSetField(tif, TIFFTAG_TILELENGTH, s->tile);
		void *buf = malloc((size_t)s->tile * s->tile * px);
		for (uint32_t y = 0; ok && y < s->h; y += s->tile)
			for (uint32_t x = 0; ok && x < s->w; x += s->tile) {
				fill_unit(s, buf, x, y, s->tile, s->tile);
				ok = TIFFWriteTile(tif, buf, x, y, 0, 0) >= 0;
			}
		free(buf);
	} else {
		uint32_t rps = s->rps ? s->rps : s->h;
		TIFFSetField(tif, TIFFTAG_ROWSPERSTRIP, rps);
		void *buf = malloc((size_t)s->w * rps * px);
		for (uint32_t y = 0, i = 0; ok && y < s->h; y += rps, i++) {
			uint32_t rows = s->h - y < rps ? s->h - y : rps;
			fill_unit(s, buf, 0, y, s->w, rows);
			ok = TIFFWriteEncodedStrip(tif, i, buf,
			                           (tmsize_t)((size_t)s->w * rows * px)) >= 0;
		}
		free(buf);
	}
	return ok && TIFFWriteDirectory(tif);
}

static int write_tiff(const char *path, const char *mode, const ifd_spec *specs, int n)
{
	TIFF *tif = TIFFOpen(path, mode);
	if (!tif)
		return 0;
	int ok = 1;
	for (int i = 0; ok && i < n; i++)
		ok = write_ifd(tif, &specs[i]);
	TIFFClose(tif);
	return ok;
}

/* ---- checks -------------------------------------------------------------- */

/* Compare a read region with the writer's pattern (0 outside the level);
 * tolerance 0 means exact.  Returns the number of differing samples. */
static size_t region_diff(const ifd_spec *s, int64_t x, int64_t y, uint32_t w, uint32_t h,
                          const void *got, double tol)
{
	size_t bad = 0;
	for (uint32_t j = 0; j < h; j++)
		for (uint32_t i = 0; i < w; i++)
			for (uint32_t c = 0; c < s->spp; c++) {
				int64_t px = x + i, py = y + j;
				int in = px >= 0 && py >= 0 && px < s->w && py < s->h;
				double want = in ? pattern(s, (uint32_t)px, (uint32_t)py, c) : 0;
				size_t k = ((size_t)j * w + i) * s->spp + c;
				double v = s->dt == SF_U8    ? ((const uint8_t *)got)[k]
				           : s->dt == SF_U16 ? ((const uint16_t *)got)[k]
				                             : ((const float *)got)[k];
				double d = v > want ? v - want : want - v;
				if (d > tol || (!in && v != 0))
					bad++;
			}
	return bad;
}

static void check_region(sf_slide_reader *r, const ifd_spec *s, uint32_t level, uint32_t channel,
                         int64_t x, int64_t y, uint32_t w, uint32_t h, double tol, const char *what)
{
	size_t n = (size_t)w * h * s->spp * sf_dtype_bytes(s->dt);
	void *buf = malloc(n ? n : 1);
	memset(buf, 0xAB, n);
	sf_err e = {0};
	int rc = sf_slide_read_region(r, level, channel, x, y, w, h, buf, &e);
	CHECK(rc == SF_OK, "%s: read L%u C%u (%lld,%lld %ux%u): %s", what, level, channel,
	      (long long)x, (long long)y, w, h, e.msg);
	if (rc == SF_OK) {
		size_t bad = region_diff(s, x, y, w, h, buf, tol);
		CHECK(bad == 0, "%s: L%u C%u (%lld,%lld %ux%u): %zu samples differ", what, level,
		      channel, (long long)x, (long long)y, w, h, bad);
	}
	free(buf);
}

/* Rects that cover tile seams, edges, odd offsets and out-of-bounds parts. */
static void check_rects(sf_slide_reader *r, const ifd_spec *s, uint32_t level, uint32_t channel,
                        double tol, const char *what)
{
	int64_t W = s->w, H = s->h;
	check_region(r, s, level, channel, 0, 0, s->w, s->h, tol, what);
	check_region(r, s, level, channel, 3, 5, 17, 9, tol, what);
	check_region(r, s, level, channel, W / 2 - 37, H / 2 - 41, 101, 77, tol, what);
	check_region(r, s, level, channel, -13, -7, 40, 30, tol, what);
	check_region(r, s, level, channel, W - 20, H - 11, 64, 64, tol, what);
	check_region(r, s, level, channel, W + 5, 0, 8, 8, tol, what);
	check_region(r, s, level, channel, -50, -50, s->w + 100, s->h + 100, tol, what);
}

static sf_slide_info *probe_ok(const char *path, const char *what)
{
	sf_slide_info *s = NULL;
	sf_err e = {0};
	int rc = sf_slide_probe(path, &s, &e);
	CHECK(rc == SF_OK, "%s: probe: %s", what, e.msg);
	return rc == SF_OK ? s : NULL;
}

static sf_slide_reader *reader_ok(const sf_slide_info *s, const char *what)
{
	sf_slide_reader *r = NULL;
	sf_err e = {0};
	int rc = sf_slide_reader_open(s, &r, &e);
	CHECK(rc == SF_OK, "%s: reader: %s", what, e.msg);
	return rc == SF_OK ? r : NULL;
}

static void check_probe_fails(const char *path, int code, const char *word, const char *what)
{
	sf_slide_info *s = NULL;
	sf_err e = {0};
	int rc = sf_slide_probe(path, &s, &e);
	CHECK(rc == code, "%s: probe gave %d (%s), want %d", what, rc, e.msg, code);
	CHECK(s == NULL, "%s: info returned on failure", what);
	CHECK(strstr(e.msg, path) != NULL, "%s: message does not name the file: %s", what, e.msg);
	CHECK(!word || strstr(e.msg, word) != NULL, "%s: message lacks '%s': %s", what, word,
	      e.msg);
	sf_slide_info_free(s);
}

/* ---- cases --------------------------------------------------------------- */

/* Readers on one info in parallel threads (one reader per thread). */
typedef struct thread_job {
	const sf_slide_info *s;
	const ifd_spec *specs; /* channel-major, 3 levels each */
	int seed;
	size_t bad; /* samples that differed, or (size_t)-1 on an error */
} thread_job;

static void *thread_reads(void *arg)
{
	thread_job *job = arg;
	sf_slide_reader *r = NULL;
	sf_err e = {0};
	uint16_t *buf = malloc(97 * 89 * sizeof *buf);
	if (!buf || sf_slide_reader_open(job->s, &r, &e)) {
		job->bad = (size_t)-1;
		free(buf);
		return NULL;
	}
	for (int i = 0; i < 60 && job->bad != (size_t)-1; i++) {
		uint32_t c = (uint32_t)(i + job->seed) % 3, l = (uint32_t)(i / 3 + job->seed) % 3;
		const ifd_spec *sp = &job->specs[c * 3 + l];
		int64_t x = (i * 131 + job->seed * 17) % (int64_t)sp->w - 20;
		int64_t y = (i * 71 + job->seed * 29) % (int64_t)sp->h - 20;
		if (sf_slide_read_region(r, l, c, x, y, 97, 89, buf, &e))
			job->bad = (size_t)-1;
		else
			job->bad += region_diff(sp, x, y, 97, 89, buf, 0);
	}
	sf_slide_reader_close(r);
	free(buf);
	return NULL;
}

static void check_threads(const sf_slide_info *s, const ifd_spec *specs)
{
	pthread_t th[4];
	thread_job jobs[4];
	for (int i = 0; i < 4; i++) {
		jobs[i] = (thread_job){.s = s, .specs = specs, .seed = i};
		CHECK(pthread_create(&th[i], NULL, thread_reads, &jobs[i]) == 0, "pthread_create");
	}
	for (int i = 0; i < 4; i++) {
		pthread_join(th[i], NULL);
		CHECK(jobs[i].bad == 0, "threads: reader %d: %zd bad samples (-1: error)", i,
		      (ssize_t)jobs[i].bad);
	}
}

static const char *ome_xml =
    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
    "<!-- a comment with <Pixels SizeX=\"1\"> inside -->\n"
    "<ome:OME xmlns:ome=\"http://www.openmicroscopy.org/Schemas/OME/2016-06\">"
    "<ome:Image ID=\"Image:0\" Name=\"a &gt; b\"><ome:Pixels ID=\"Pixels:0\" "
    "DimensionOrder=\"XYCZT\" Type=\"uint16\" SizeX=\"1000\" SizeY=\"700\" SizeC=\"3\" "
    "SizeZ=\"1\" SizeT=\"1\" PhysicalSizeX='325' PhysicalSizeXUnit=\"nm\" "
    "PhysicalSizeY=\"0.326\">"
    "<ome:Channel ID=\"Channel:0:0\" Name=\"DAPI\" SamplesPerPixel=\"1\"/>"
    "<ome:Channel ID=\"Channel:0:1\" Name=\"F&amp;ITC\"/>"
    "<ome:Channel ID=\"Channel:0:2\"><ome:LightPath/></ome:Channel>"
    "<ome:TiffData IFD=\"0\" PlaneCount=\"3\"/></ome:Pixels></ome:Image>"
    "<ome:Image ID=\"Image:1\"><ome:Pixels SizeX=\"5\"><ome:Channel Name=\"label\"/>"
    "</ome:Pixels></ome:Image></ome:OME>";

/* An OME PhysicalSize that overflows once converted to micrometres is
 * unknown (0), not infinite (found in the fuzzing pass,
 * tests/fuzz/fuzz_slide_desc.c: 1e305 m became an infinite pixel size). */
static void test_ome_pixel_size_overflow(void)
{
	const char *path = tmp_path("huge_px.ome.tif");
	ifd_spec spec = {.w = 64,
	                 .h = 48,
	                 .dt = SF_U8,
	                 .spp = 1,
	                 .desc = "<OME><Image><Pixels SizeX=\"64\" SizeY=\"48\" SizeC=\"1\" "
	                         "PhysicalSizeX=\"1e305\" PhysicalSizeXUnit=\"m\" "
	                         "PhysicalSizeY=\"1e305\" PhysicalSizeYUnit=\"m\"/></Image></OME>"};
	CHECK(write_tiff(path, "w", &spec, 1), "write %s", path);
	sf_slide_info *s = probe_ok(path, "huge pixel size");
	if (!s)
		return;
	CHECK(s->is_ome && s->pixel_size_x == 0 && s->pixel_size_y == 0,
	      "huge pixel size: %g x %g um (want 0: unknown)", s->pixel_size_x, s->pixel_size_y);
	sf_slide_info_free(s);
}

/* Two RGB brightfield Images of one size in one OME-TIFF (tifffile writes
 * them so: SizeC=3, one Channel of SamplesPerPixel=3, one page each).  The
 * first Image is one RGB page: the second is not an extra channel (it was,
 * when the page count was capped at SizeC*SizeZ*SizeT = 3 pages). */
static void test_ome_rgb_images(void)
{
	const char *path = tmp_path("he.ome.tif");
	static const char *desc =
	    "<OME><Image ID=\"Image:0\"><Pixels DimensionOrder=\"XYCZT\" Type=\"uint8\" "
	    "SizeX=\"96\" SizeY=\"64\" SizeC=\"3\" SizeZ=\"1\" SizeT=\"1\" "
	    "Interleaved=\"true\"><Channel ID=\"Channel:0:0\" SamplesPerPixel=\"3\"/>"
	    "</Pixels></Image><Image ID=\"Image:1\"><Pixels DimensionOrder=\"XYCZT\" "
	    "Type=\"uint8\" SizeX=\"96\" SizeY=\"64\" SizeC=\"3\" SizeZ=\"1\" "
	    "SizeT=\"1\" Interleaved=\"true\"><Channel ID=\"Channel:1:0\" "
	    "SamplesPerPixel=\"3\"/></Pixels></Image></OME>";
	ifd_spec specs[2] = {
	    {.w = 96, .h = 64, .dt = SF_U8, .spp = 3, .tile = 32, .id = 1, .desc = desc},
	    {.w = 96, .h = 64, .dt = SF_U8, .spp = 3, .tile = 32, .id = 2},
	};
	CHECK(write_tiff(path, "w", specs, 2), "write %s", path);
	sf_slide_info *s = probe_ok(path, "rgb images");
	if (!s)
		return;
	CHECK(s->kind == SF_SLIDE_OME && s->channels == 1 && s->samples == 3 && s->odd_page == 0,
	      "rgb images: kind %d, %u channels of %u samples, odd page %u (want 1 channel of 3: "
	      "Image 1 is no channel)",
	      s->kind, s->channels, s->samples, s->odd_page);
	sf_slide_reader *r = reader_ok(s, "rgb images");
	if (r)
		check_rects(r, &specs[0], 0, 0, 0, "rgb images");
	sf_slide_reader_close(r);
	sf_slide_info_free(s);
}

/* OME-TIFF: 3 uint16 channels of 1000x700, tiles 256, deflate, 2 SubIFD levels each. */
static void test_ome_subifds(void)
{
	const char *path = tmp_path("ome.ome.tif");
	ifd_spec specs[9];
	int n = 0;
	for (int c = 0; c < 3; c++) {
		specs[n++] = (ifd_spec){.w = 1000,
		                        .h = 700,
		                        .dt = SF_U16,
		                        .spp = 1,
		                        .tile = 256,
		                        .compression = COMPRESSION_ADOBE_DEFLATE,
		                        .id = c * 10,
		                        .nsub = 2,
		                        .desc = c == 0 ? ome_xml : NULL};
		specs[n++] = (ifd_spec){.w = 500,
		                        .h = 350,
		                        .dt = SF_U16,
		                        .spp = 1,
		                        .tile = 128,
		                        .compression = COMPRESSION_ADOBE_DEFLATE,
		                        .id = c * 10 + 1,
		                        .subfile = FILETYPE_REDUCEDIMAGE};
		specs[n++] = (ifd_spec){.w = 250,
		                        .h = 175,
		                        .dt = SF_U16,
		                        .spp = 1,
		                        .tile = 128,
		                        .compression = COMPRESSION_NONE,
		                        .id = c * 10 + 2,
		                        .subfile = FILETYPE_REDUCEDIMAGE};
	}
	CHECK(write_tiff(path, "w", specs, n), "write %s", path);
	sf_slide_info *s = probe_ok(path, "ome");
	if (!s)
		return;
	CHECK(s->kind == SF_SLIDE_OME && s->is_ome, "ome: kind %d is_ome %d", s->kind, s->is_ome);
	CHECK(s->channels == 3 && s->samples == 1 && s->dtype == SF_U16, "ome: %u ch %u spp dt %d",
	      s->channels, s->samples, s->dtype);
	CHECK(s->level_count == 3, "ome: %u levels", s->level_count);
	CHECK(s->width == 1000 && s->height == 700 && s->tiled, "ome: %ux%u", s->width, s->height);
	if (s->level_count == 3) {
		CHECK(s->levels[1].width == 500 && s->levels[2].height == 175, "ome: level sizes");
		CHECK(s->levels[1].subifd == 0 && s->levels[2].subifd == 1, "ome: subifd index");
		CHECK(s->levels[2].dir[2] == 2 && s->levels[0].dir[1] == 1, "ome: dirs");
		CHECK(s->levels[1].tile_w == 128 && s->levels[0].tile_h == 256, "ome: tile sizes");
	}
	CHECK(s->pixel_size_x > 0.3249 && s->pixel_size_x < 0.3251, "ome: px %g (325 nm)",
	      s->pixel_size_x);
	CHECK(s->pixel_size_y > 0.3259 && s->pixel_size_y < 0.3261, "ome: py %g", s->pixel_size_y);
	CHECK(strcmp(s->channel_names[0], "DAPI") == 0 &&
	          strcmp(s->channel_names[1], "F&ITC") == 0 &&
	          strcmp(s->channel_names[2], "Channel 2") == 0,
	      "ome: names %s %s %s", s->channel_names[0], s->channel_names[1], s->channel_names[2]);
	CHECK(s->stated_c == 3 && s->ome_size_z == 1, "ome: stated_c %u z %u", s->stated_c,
	      s->ome_size_z);
	struct stat st;
	stat(path, &st);
	CHECK(s->file_size == (uint64_t)st.st_size && s->mtime_ns != 0, "ome: file identity");
	sf_slide_reader *r = reader_ok(s, "ome");
	if (r && s->level_count == 3) {
		/* Interleave levels and channels: directory switches in any order. */
		for (int pass = 0; pass < 2; pass++)
			for (uint32_t c = 0; c < 3; c++)
				for (uint32_t l = 0; l < 3; l++)
					check_rects(r, &specs[c * 3 + l], l, c, 0, "ome");
		uint64_t before = sf_slide_reader_decodes(r);
		check_region(r, &specs[0], 0, 0, 300, 300, 100, 100, 0, "ome lru");
		check_region(r, &specs[0], 0, 0, 310, 310, 100, 100, 0, "ome lru");
		uint64_t mid = sf_slide_reader_decodes(r);
		check_region(r, &specs[0], 0, 0, 305, 290, 100, 100, 0, "ome lru");
		CHECK(sf_slide_reader_decodes(r) == mid && mid - before <= 4,
		      "ome: LRU reuse: %llu then %llu decodes", (unsigned long long)(mid - before),
		      (unsigned long long)(sf_slide_reader_decodes(r) - mid));
		sf_err e = {0};
		uint16_t px;
		CHECK(sf_slide_read_region(r, 3, 0, 0, 0, 1, 1, &px, &e) == SF_EINVAL,
		      "ome: level 3 must be refused");
		CHECK(sf_slide_read_region(r, 0, 3, 0, 0, 1, 1, &px, &e) == SF_EINVAL,
		      "ome: channel 3 must be refused");
	}
	sf_slide_reader_close(r);
	if (s->level_count == 3)
		check_threads(s, specs);
	sf_slide_info_free(s);
}

/* libvips --pyramid layout: RGB uint8 tiled levels as main-chain pages,
 * written big-endian, plus a trailing stripped label page. */
static void test_pages_pyramid(void)
{
	const char *path = tmp_path("pyr.tif");
	ifd_spec specs[] = {
	    {.w = 600,
	     .h = 410,
	     .dt = SF_U8,
	     .spp = 3,
	     .tile = 64,
	     .compression = COMPRESSION_LZW,
	     .id = 1,
	     .xres = 20000,
	     .resunit = RESUNIT_CENTIMETER},
	    {.w = 300,
	     .h = 205,
	     .dt = SF_U8,
	     .spp = 3,
	     .tile = 64,
	     .compression = COMPRESSION_ADOBE_DEFLATE,
	     .id = 2,
	     .subfile = FILETYPE_REDUCEDIMAGE},
	    {.w = 150,
	     .h = 102,
	     .dt = SF_U8,
	     .spp = 3,
	     .tile = 64,
	     .id = 3,
	     .compression = COMPRESSION_NONE,
	     .subfile = FILETYPE_REDUCEDIMAGE},
	    {.w = 400, .h = 100, .dt = SF_U8, .spp = 3, .id = 4, .compression = COMPRESSION_NONE},
	};
	CHECK(write_tiff(path, "wb", specs, 4), "write %s", path);
	sf_slide_info *s = probe_ok(path, "pages");
	if (!s)
		return;
	CHECK(s->kind == SF_SLIDE_PAGES && !s->is_ome, "pages: kind %d", s->kind);
	CHECK(s->level_count == 3 && s->channels == 1 && s->samples == 3 && s->dtype == SF_U8,
	      "pages: %u levels %u ch %u spp", s->level_count, s->channels, s->samples);
	CHECK(s->pixel_size_x > 0.4999 && s->pixel_size_x < 0.5001, "pages: px %g (0.5 from cm)",
	      s->pixel_size_x);
	CHECK(strcmp(s->channel_names[0], "Channel 0") == 0, "pages: name %s", s->channel_names[0]);
	sf_slide_reader *r = reader_ok(s, "pages");
	for (uint32_t l = 0; r && l < s->level_count && l < 3; l++) {
		CHECK(s->levels[l].dir[0] == l && s->levels[l].subifd == -1, "pages: level %u dir",
		      l);
		check_rects(r, &specs[l], l, 0, 0, "pages");
	}
	sf_slide_reader_close(r);
	sf_slide_info_free(s);
}

/* An uncompressed one-strip file of spec, its rects (x, y, w, h) read
 * against the pattern. */
static void check_one_strip(const char *name, const ifd_spec *spec, const int64_t (*rects)[4],
                            size_t n)
{
	char file[64];
	snprintf(file, sizeof file, "%s.tif", name);
	const char *path = tmp_path(file);
	CHECK(write_tiff(path, "w", spec, 1), "write %s", path);
	sf_slide_info *s = probe_ok(path, name);
	if (!s)
		return;
	sf_slide_reader *r = reader_ok(s, name);
	for (size_t i = 0; r && i < n; i++)
		check_region(r, spec, 0, 0, rects[i][0], rects[i][1], (uint32_t)rects[i][2],
		             (uint32_t)rects[i][3], 0, name);
	sf_slide_reader_close(r);
	sf_slide_info_free(s);
}

/* Flat files: uint16 strips (big-endian, uncompressed, odd rows per strip),
 * LZW strips, and a 2-page float32 tiled file whose pages are channels. */
static void test_flat(void)
{
	const char *p16 = tmp_path("strips16.tif");
	ifd_spec s16 = {.w = 333,
	                .h = 201,
	                .dt = SF_U16,
	                .spp = 1,
	                .rps = 7,
	                .compression = COMPRESSION_NONE,
	                .id = 5,
	                .xres = 72,
	                .resunit = RESUNIT_INCH};
	CHECK(write_tiff(p16, "wb", &s16, 1), "write %s", p16);
	sf_slide_info *s = probe_ok(p16, "strips16");
	if (s) {
		CHECK(s->kind == SF_SLIDE_FLAT && s->level_count == 1 && s->channels == 1 &&
		          !s->tiled && s->dtype == SF_U16,
		      "strips16: kind %d levels %u", s->kind, s->level_count);
		CHECK(s->pixel_size_x == 0, "strips16: 72 dpi is no pixel size, got %g",
		      s->pixel_size_x);
		CHECK(s->levels[0].tile_w == 333 && s->levels[0].tile_h == 7,
		      "strips16: unit %ux%u", s->levels[0].tile_w, s->levels[0].tile_h);
		sf_slide_reader *r = reader_ok(s, "strips16");
		if (r)
			check_rects(r, &s16, 0, 0, 0, "strips16");
		sf_slide_reader_close(r);
		sf_slide_info_free(s);
	}
	/* One big strip, narrow reads.  2048 columns: the rows skip at most 4 KiB,
	 * so one pread of the span (slide.c's SPAN_SKIP_MAX); 8192 columns: one
	 * pread per row.  Both against the pattern. */
	static const int64_t wider_rects[][4] = {{4000, 2, 50, 95}};
	static const int64_t wide_rects[][4] = {{1000, 3, 5, 290}, {2040, 280, 64, 64}};
	ifd_spec swider = {
	    .w = 8192, .h = 100, .dt = SF_U16, .spp = 1, .id = 10, .compression = COMPRESSION_NONE};
	ifd_spec swide = {
	    .w = 2048, .h = 300, .dt = SF_U16, .spp = 1, .id = 9, .compression = COMPRESSION_NONE};
	check_one_strip("wider", &swider, wider_rects, 1);
	check_one_strip("wide", &swide, wide_rects, 2);
	const char *plzw = tmp_path("lzw.tiff");
	ifd_spec slzw = {.w = 257,
	                 .h = 129,
	                 .dt = SF_U8,
	                 .spp = 1,
	                 .rps = 16,
	                 .compression = COMPRESSION_LZW,
	                 .id = 6};
	CHECK(write_tiff(plzw, "w", &slzw, 1), "write %s", plzw);
	s = probe_ok(plzw, "lzw");
	if (s) {
		sf_slide_reader *r = reader_ok(s, "lzw");
		if (r)
			check_rects(r, &slzw, 0, 0, 0, "lzw");
		sf_slide_reader_close(r);
		sf_slide_info_free(s);
	}
	const char *pf = tmp_path("float.tif");
	ifd_spec sf[] = {
	    {.w = 200,
	     .h = 150,
	     .dt = SF_F32,
	     .spp = 1,
	     .tile = 32,
	     .id = 7,
	     .compression = COMPRESSION_ADOBE_DEFLATE,
	     .desc = "ImageJ=1.53t\nimages=2\nchannels=2\nmode=composite\n"},
	    {.w = 200,
	     .h = 150,
	     .dt = SF_F32,
	     .spp = 1,
	     .tile = 32,
	     .id = 8,
	     .compression = COMPRESSION_NONE},
	};
	CHECK(write_tiff(pf, "w", sf, 2), "write %s", pf);
	s = probe_ok(pf, "float");
	if (s) {
		CHECK(s->kind == SF_SLIDE_FLAT && s->channels == 2 && s->dtype == SF_F32 &&
		          s->level_count == 1,
		      "float: kind %d ch %u", s->kind, s->channels);
		CHECK(s->stated_c == 2 && s->stated_z == 0, "float: ImageJ channels %u slices %u",
		      s->stated_c, s->stated_z);
		sf_slide_reader *r = reader_ok(s, "float");
		for (uint32_t c = 0; r && c < 2; c++)
			check_rects(r, &sf[c], 0, c, 0, "float");
		sf_slide_reader_close(r);
		sf_slide_info_free(s);
	}
}

/* SubIFD pyramid without OME-XML (libvips --subifd). */
static void test_plain_subifds(void)
{
	const char *path = tmp_path("subifd.tif");
	ifd_spec specs[] = {
	    {.w = 512,
	     .h = 384,
	     .dt = SF_U8,
	     .spp = 1,
	     .tile = 128,
	     .id = 11,
	     .nsub = 2,
	     .compression = COMPRESSION_ADOBE_DEFLATE},
	    {.w = 256,
	     .h = 192,
	     .dt = SF_U8,
	     .spp = 1,
	     .tile = 128,
	     .id = 12,
	     .compression = COMPRESSION_ADOBE_DEFLATE,
	     .subfile = FILETYPE_REDUCEDIMAGE},
	    {.w = 128,
	     .h = 96,
	     .dt = SF_U8,
	     .spp = 1,
	     .tile = 128,
	     .id = 13,
	     .compression = COMPRESSION_ADOBE_DEFLATE,
	     .subfile = FILETYPE_REDUCEDIMAGE},
	};
	CHECK(write_tiff(path, "w", specs, 3), "write %s", path);
	sf_slide_info *s = probe_ok(path, "subifd");
	if (!s)
		return;
	CHECK(s->kind == SF_SLIDE_OME && !s->is_ome && s->level_count == 3 && s->channels == 1,
	      "subifd: kind %d ome %d levels %u", s->kind, s->is_ome, s->level_count);
	sf_slide_reader *r = reader_ok(s, "subifd");
	for (uint32_t l = 0; r && l < s->level_count && l < 3; l++)
		check_rects(r, &specs[l], l, 0, 0, "subifd");
	sf_slide_reader_close(r);
	sf_slide_info_free(s);
}

/* Aperio SVS: JPEG YCbCr tiles read as RGB; thumbnail, label, macro skipped. */
static void test_svs(void)
{
	const char *path = tmp_path("slide.svs");
	const char *desc =
	    "Aperio Image Library v12.0.15\r\n256x256 [0,0 256x256] (64x64) JPEG/RGB "
	    "Q=95|AppMag = 20|MPP = 0.4990|Filename = x";
	ifd_spec specs[] = {
	    {.w = 256,
	     .h = 256,
	     .dt = SF_U8,
	     .spp = 3,
	     .tile = 64,
	     .jpeg = 1,
	     .smooth = 1,
	     .id = 1,
	     .desc = desc},
	    {.w = 64,
	     .h = 64,
	     .dt = SF_U8,
	     .spp = 3,
	     .rps = 64,
	     .compression = COMPRESSION_LZW,
	     .smooth = 1,
	     .id = 2},
	    {.w = 128,
	     .h = 128,
	     .dt = SF_U8,
	     .spp = 3,
	     .tile = 64,
	     .jpeg = 1,
	     .smooth = 1,
	     .id = 3},
	    {.w = 100,
	     .h = 60,
	     .dt = SF_U8,
	     .spp = 3,
	     .compression = COMPRESSION_LZW,
	     .subfile = FILETYPE_REDUCEDIMAGE,
	     .id = 4},
	    {.w = 300,
	     .h = 100,
	     .dt = SF_U8,
	     .spp = 3,
	     .compression = COMPRESSION_LZW,
	     .subfile = 9,
	     .id = 5},
	};
	CHECK(write_tiff(path, "w", specs, 5), "write %s", path);
	sf_slide_info *s = probe_ok(path, "svs");
	if (!s)
		return;
	CHECK(s->kind == SF_SLIDE_SVS && s->level_count == 2 && s->samples == 3,
	      "svs: kind %d levels %u spp %u", s->kind, s->level_count, s->samples);
	CHECK(s->pixel_size_x > 0.4989 && s->pixel_size_x < 0.4991, "svs: mpp %g", s->pixel_size_x);
	if (s->level_count == 2)
		CHECK(s->levels[1].dir[0] == 2 && s->levels[1].width == 128,
		      "svs: level 1 is page %u", s->levels[1].dir[0]);
	sf_slide_reader *r = reader_ok(s, "svs");
	if (r) {
		/* JPEG is lossy: within a few levels of the smooth pattern. */
		check_region(r, &specs[0], 0, 0, 0, 0, 256, 256, 6, "svs");
		check_region(r, &specs[0], 0, 0, 50, 70, 100, 90, 6, "svs");
		check_region(r, &specs[2], 1, 0, -5, 60, 100, 100, 6, "svs");
	}
	sf_slide_reader_close(r);
	sf_slide_info_free(s);
}

/* Pages that are no pyramid level: a tiled SVS label (NewSubfileType 1, as
 * Aperio marks labels), and a smaller page of another aspect ratio after a
 * page pyramid.  tests/integration/test_slide_pages.py has more cases. */
static void test_associated_pages(void)
{
	const char *svs = tmp_path("label.svs");
	ifd_spec sv[] = {
	    {.w = 256, .h = 192, .dt = SF_U8, .spp = 3, .tile = 64, .id = 1, .desc = "Aperio x"},
	    {.w = 64, .h = 48, .dt = SF_U8, .spp = 3, .id = 2},
	    {.w = 128, .h = 96, .dt = SF_U8, .spp = 3, .tile = 64, .id = 3},
	    {.w = 100,
	     .h = 75,
	     .dt = SF_U8,
	     .spp = 3,
	     .tile = 64,
	     .id = 4,
	     .subfile = FILETYPE_REDUCEDIMAGE,
	     .desc = "Aperio label"},
	    {.w = 64, .h = 48, .dt = SF_U8, .spp = 3, .tile = 64, .id = 5, .subfile = 9},
	};
	CHECK(write_tiff(svs, "w", sv, 5), "write %s", svs);
	sf_slide_info *s = probe_ok(svs, "svs label");
	if (s) {
		CHECK(s->kind == SF_SLIDE_SVS && s->level_count == 2 && s->levels[1].dir[0] == 2,
		      "svs label: kind %d, %u levels (the tiled label is none)", s->kind,
		      s->level_count);
		sf_slide_info_free(s);
	}
	const char *pages = tmp_path("label.tif");
	ifd_spec pg[] = {
	    {.w = 256, .h = 192, .dt = SF_U16, .spp = 1, .tile = 64, .id = 1},
	    {.w = 128,
	     .h = 96,
	     .dt = SF_U16,
	     .spp = 1,
	     .tile = 64,
	     .id = 2,
	     .subfile = FILETYPE_REDUCEDIMAGE},
	    {.w = 63, .h = 48, .dt = SF_U16, .spp = 1, .tile = 64, .id = 3, .subfile = 1},
	    {.w = 60, .h = 20, .dt = SF_U16, .spp = 1, .id = 4, .subfile = 1},
	};
	CHECK(write_tiff(pages, "w", pg, 4), "write %s", pages);
	s = probe_ok(pages, "pages label");
	if (s) {
		CHECK(s->kind == SF_SLIDE_PAGES && s->level_count == 3,
		      "pages label: %u levels (63x48 is one, rounded; 60x20 is none)",
		      s->level_count);
		sf_slide_info_free(s);
	}
}

/* Fiji / ImageJ 1.x calibration: XResolution pixels per unit, ResolutionUnit
 * NONE, "unit=" in the description (escaped by ImageJ 1.52+). */
static void test_imagej_pixel_size(void)
{
	const char *path = tmp_path("ij.tif");
	ifd_spec ij = {.w = 40,
	               .h = 30,
	               .dt = SF_U16,
	               .spp = 1,
	               .id = 1,
	               .desc = "ImageJ=1.54f\nimages=1\nunit=\\u00B5m\nmin=0.0\n",
	               .xres = 4,
	               .resunit = RESUNIT_NONE};
	CHECK(write_tiff(path, "w", &ij, 1), "write %s", path);
	sf_slide_info *s = probe_ok(path, "imagej");
	if (s) {
		CHECK(s->pixel_size_x > 0.2499 && s->pixel_size_x < 0.2501 &&
		          s->pixel_size_y == s->pixel_size_x,
		      "imagej: pixel size %g x %g, want 0.25 um", s->pixel_size_x, s->pixel_size_y);
		sf_slide_info_free(s);
	}
	ij.desc = "ImageJ=1.54f\nunit=pixel\n";
	CHECK(write_tiff(path, "w", &ij, 1), "write %s", path);
	s = probe_ok(path, "imagej pixel");
	if (s) {
		CHECK(s->pixel_size_x == 0, "imagej pixel: pixel size %g, want unknown",
		      s->pixel_size_x);
		sf_slide_info_free(s);
	}
}

static void test_unsupported(void)
{
	struct {
		const char *name;
		ifd_spec spec;
		const char *word;
	} cases[] = {
	    {"int16.tif",
	     {.w = 16, .h = 16, .dt = SF_U16, .spp = 1, .format_override = SAMPLEFORMAT_INT},
	     "signed"},
	    {"bilevel.tif",
	     {.w = 16, .h = 16, .dt = SF_U8, .spp = 1, .bps_override = 1},
	     "bilevel"},
	    {"double.tif",
	     {.w = 16,
	      .h = 16,
	      .dt = SF_F32,
	      .spp = 1,
	      .bps_override = 64,
	      .format_override = SAMPLEFORMAT_IEEEFP},
	     "64-bit"},
	    {"palette.tif",
	     {.w = 16, .h = 16, .dt = SF_U8, .spp = 1, .photometric_override = PHOTOMETRIC_PALETTE},
	     "palette"},
	    {"rgba.tif", {.w = 16, .h = 16, .dt = SF_U8, .spp = 4}, "4 samples"},
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		const char *path = tmp_path(cases[i].name);
		CHECK(write_tiff(path, "w", &cases[i].spec, 1), "write %s", path);
		check_probe_fails(path, SF_EUNSUPPORTED, cases[i].word, cases[i].name);
	}
}

static void write_bytes(const char *path, const void *data, size_t n)
{
	FILE *f = fopen(path, "wb");
	if (f) {
		fwrite(data, 1, n, f);
		fclose(f);
	}
}

/* Set the TileLength of the n-th main-chain IFD (0-based) of a little-endian
 * classic TIFF to rows (as a LONG).  0 on success. */
static int patch_tile_length(const char *path, int n, uint32_t rows)
{
	FILE *f = fopen(path, "r+b");
	uint8_t b[12];
	uint32_t ifd = 0;
	int rc = -1;
	if (!f)
		return -1;
	if (fseek(f, 4, SEEK_SET) || fread(&ifd, 4, 1, f) != 1)
		goto out;
	for (int i = 0; i < n; i++) { /* next IFD offset: after the entries */
		uint16_t count = 0;
		if (fseek(f, ifd, SEEK_SET) || fread(&count, 2, 1, f) != 1 ||
		    fseek(f, ifd + 2 + 12 * (long)count, SEEK_SET) || fread(&ifd, 4, 1, f) != 1)
			goto out;
	}
	uint16_t count = 0;
	if (fseek(f, ifd, SEEK_SET) || fread(&count, 2, 1, f) != 1)
		goto out;
	for (uint16_t i = 0; i < count; i++) {
		long at = ifd + 2 + 12 * (long)i;
		if (fseek(f, at, SEEK_SET) || fread(b, 12, 1, f) != 1)
			goto out;
		if (b[0] != (TIFFTAG_TILELENGTH & 0xff) || b[1] != TIFFTAG_TILELENGTH >> 8)
			continue;
		uint16_t type = TIFF_LONG;
		uint32_t one = 1;
		memcpy(b + 2, &type, 2);
		memcpy(b + 4, &one, 4);
		memcpy(b + 8, &rows, 4);
		rc = fseek(f, at, SEEK_SET) || fwrite(b, 12, 1, f) != 1 ? -1 : 0;
		break;
	}
out:
	return fclose(f) || rc ? -1 : 0;
}

/* Every channel's IFD is checked at probe time, not only channel 0's: a
 * second page of the same size whose compressed tiles are 16 x 2^28 pixels
 * (4 GiB) was accepted and its first read asked for a 4 GiB buffer (found
 * in the fuzzing pass, tests/fuzz/fuzz_slide.c; the fuzzer's file had
 * 16 x 4261412880 tiles and an unknown codec in page 1). */
static void test_channel_ifds_checked(void)
{
	const char *path = tmp_path("huge_tile_ch1.tif");
	ifd_spec specs[2];
	for (int c = 0; c < 2; c++)
		specs[c] = (ifd_spec){.w = 32,
		                      .h = 32,
		                      .dt = SF_U8,
		                      .spp = 1,
		                      .tile = 16,
		                      .compression = COMPRESSION_ADOBE_DEFLATE,
		                      .id = c};
	CHECK(write_tiff(path, "w", specs, 2), "write %s", path);
	CHECK(patch_tile_length(path, 1, 1u << 28) == 0, "patch %s", path);
	check_probe_fails(path, SF_EUNSUPPORTED, "level 0 channel 1: compressed tile of 4096 MiB",
	                  "huge tile in channel 1");
}

static void test_bad_files(void)
{
	write_bytes(tmp_path("empty.tif"), "", 0);
	check_probe_fails(tmp_path("empty.tif"), SF_EFORMAT, "empty", "empty");
	const char *text = "this is a text file, not an image\n";
	write_bytes(tmp_path("text.tif"), text, strlen(text));
	check_probe_fails(tmp_path("text.tif"), SF_EFORMAT, "not a TIFF", "text");
	unsigned char junk[4096];
	for (size_t i = 0; i < sizeof junk; i++)
		junk[i] = (unsigned char)(i * 2654435761u >> 13);
	junk[0] = 'I', junk[1] = 'I', junk[2] = 42, junk[3] = 0; /* a signature, then garbage */
	write_bytes(tmp_path("garbage.tif"), junk, sizeof junk);
	check_probe_fails(tmp_path("garbage.tif"), SF_EFORMAT, NULL, "garbage");
	write_bytes(tmp_path("short.tif"), "II*\0", 4);
	check_probe_fails(tmp_path("short.tif"), SF_EFORMAT, "too short", "short");
	check_probe_fails(tmp_path("missing.tif"), SF_ENOTFOUND, "cannot open", "missing");
	check_probe_fails(tmpdir, SF_EFORMAT, "regular", "directory");

	/* Truncated: libtiff writes the IFD after the data, so cutting the
	 * tail loses the IFD; cutting a file whose IFD comes first (written
	 * here by hand) loses tile data only. */
	ifd_spec spec = {.w = 300,
	                 .h = 300,
	                 .dt = SF_U16,
	                 .spp = 1,
	                 .tile = 64,
	                 .id = 1,
	                 .compression = COMPRESSION_ADOBE_DEFLATE};
	const char *cut = tmp_path("cut.tif");
	CHECK(write_tiff(cut, "w", &spec, 1), "write %s", cut);
	struct stat st;
	stat(cut, &st);
	CHECK(truncate(cut, st.st_size / 2) == 0, "truncate");
	check_probe_fails(cut, SF_EFORMAT, NULL, "truncated tail");

	/* Tile data cut off while the IFD stays: move the IFD to the front
	 * by writing it, then copying the IFD region is fiddly; instead keep
	 * the first IFD of a 2-page file and cut inside page 1's data. */
	ifd_spec two[] = {spec, spec};
	two[1].id = 2;
	const char *cut2 = tmp_path("cut2.tif");
	CHECK(write_tiff(cut2, "w", two, 2), "write %s", cut2);
	TIFF *tif = TIFFOpen(cut2, "r");
	uint64_t ifd1 = 0;
	if (tif) {
		TIFFReadDirectory(tif);
		ifd1 = TIFFCurrentDirOffset(tif);
		TIFFClose(tif);
	}
	stat(cut2, &st);
	/* page 1's data sits between IFD 0 and IFD 1: cut just past IFD 1's
	 * start so page 1's IFD is unreadable. */
	CHECK(ifd1 > 0 && truncate(cut2, (off_t)ifd1 + 4) == 0, "truncate 2");
	check_probe_fails(cut2, SF_EFORMAT, NULL, "truncated second page");

	/* Corrupt deflate data inside one tile: the probe passes, the read
	 * of that tile fails naming it; other tiles still read. */
	const char *bad = tmp_path("corrupt.tif");
	CHECK(write_tiff(bad, "w", &spec, 1), "write %s", bad);
	tif = TIFFOpen(bad, "r");
	uint64_t off = 0, len = 0;
	if (tif) {
		off = TIFFGetStrileOffset(tif, 5);
		len = TIFFGetStrileByteCount(tif, 5);
		TIFFClose(tif);
	}
	int fd = open(bad, O_WRONLY);
	if (fd >= 0 && len > 8) {
		unsigned char noise[64];
		memset(noise, 0x5A, sizeof noise);
		CHECK(pwrite(fd, noise, len < 64 ? len : 64, (off_t)off) > 0, "corrupt write");
	}
	if (fd >= 0)
		close(fd);
	sf_slide_info *s = probe_ok(bad, "corrupt");
	sf_slide_reader *r = s ? reader_ok(s, "corrupt") : NULL;
	if (r) {
		uint16_t buf[64 * 64];
		sf_err e = {0};
		int rc = sf_slide_read_region(r, 0, 0, 0, 64, 64, 64, buf, &e); /* tile 5 */
		CHECK(rc == SF_EFORMAT, "corrupt: read gave %d: %s", rc, e.msg);
		CHECK(strstr(e.msg, "tile 5") && strstr(e.msg, bad) && strstr(e.msg, "level 0"),
		      "corrupt: message should name file, level, tile: %s", e.msg);
		check_region(r, &spec, 0, 0, 0, 0, 64, 64, 0, "corrupt, good tile");
	}
	sf_slide_reader_close(r);
	/* A file that changed after the probe is refused by the reader. */
	if (s) {
		struct timeval tv[2] = {{1000000, 0}, {1000000, 0}};
		utimes(bad, tv);
		sf_err e = {0};
		r = NULL;
		CHECK(sf_slide_reader_open(s, &r, &e) == SF_EFORMAT && !r, "changed file: %s",
		      e.msg);
	}
	sf_slide_info_free(s);

	/* Unreadable: only meaningful when not root (root reads anything). */
	const char *locked = tmp_path("locked.tif");
	CHECK(write_tiff(locked, "w", &spec, 1), "write %s", locked);
	chmod(locked, 0);
	if (geteuid() != 0)
		check_probe_fails(locked, SF_EIO, "Permission denied", "chmod 000");
	chmod(locked, 0644);
}

/* ---- ImageJ's one-IFD layout for stacks over 4 GiB ---------------------- */

/* How write_imagej_big lays out the file. */
typedef struct big_spec {
	ifd_spec plane; /* size and type; plane z's pattern uses id z + 1 */
	int big_endian;
	uint32_t slices; /* stated slices= */
	uint32_t planes; /* planes actually stored after the IFD */
	uint32_t rps;    /* rows per strip; 0: one strip */
	uint32_t gap;    /* bytes between strips (0: contiguous, as ImageJ writes) */
	uint16_t compression;
	const char *extra; /* more description lines, e.g. "channels=2\n" */
} big_spec;

static void put_u16(uint8_t *p, uint16_t v, int be)
{
	p[be ? 0 : 1] = (uint8_t)(v >> 8);
	p[be ? 1 : 0] = (uint8_t)v;
}

static void put_u32(uint8_t *p, uint32_t v, int be)
{
	for (int i = 0; i < 4; i++)
		p[be ? 3 - i : i] = (uint8_t)(v >> (8 * i));
}

/* One IFD entry: SHORT or LONG, count 1 with the value inline, or count n
 * pointing at off. */
static void put_entry(uint8_t *p, uint16_t tag, uint16_t type, uint32_t n, uint32_t v, int be)
{
	put_u16(p, tag, be);
	put_u16(p + 2, type, be);
	put_u32(p + 4, n, be);
	memset(p + 8, 0, 4);
	if (type == TIFF_SHORT && n == 1)
		put_u16(p + 8, (uint16_t)v, be);
	else
		put_u32(p + 8, v, be);
}

/* A classic TIFF as ImageJ writes a stack over 4 GiB: header, one IFD, its
 * description and strip arrays, then plane 0's strips and the other planes
 * right after them, in the file's byte order.  0 on failure. */
static int write_imagej_big(const char *path, const big_spec *b)
{
	const ifd_spec *ps = &b->plane;
	int be = b->big_endian;
	size_t sb = sf_dtype_bytes(ps->dt), plane_bytes = (size_t)ps->w * ps->h * sb;
	uint32_t rps = b->rps ? b->rps : ps->h, nstrips = (ps->h + rps - 1) / rps;
	char desc[256];
	snprintf(desc, sizeof desc, "ImageJ=1.54f\nimages=%u\nslices=%u\n%sunit=micron\n",
	         b->slices, b->slices, b->extra ? b->extra : "");
	const uint16_t nent = 11;
	size_t ifd_end = 8 + 2 + 12u * nent + 4, desc_off = ifd_end, desc_len = strlen(desc) + 1;
	size_t arrays = (desc_off + desc_len + 3) & ~(size_t)3;
	size_t data = arrays + (nstrips > 1 ? 8u * nstrips : 0);
	size_t total = data + (size_t)b->planes * plane_bytes + (size_t)b->gap * nstrips;
	uint8_t *f = calloc(1, total), *plane = malloc(plane_bytes);
	if (!f || !plane) {
		free(f);
		free(plane);
		return 0;
	}
	memcpy(f, be ? "MM" : "II", 2);
	put_u16(f + 2, 42, be);
	put_u32(f + 4, 8, be);
	put_u16(f + 8, nent, be);
	uint8_t *e = f + 10;
	uint32_t off0 = (uint32_t)data, row_bytes = (uint32_t)(ps->w * sb);
	uint16_t format = ps->dt == SF_F32 ? SAMPLEFORMAT_IEEEFP : SAMPLEFORMAT_UINT;
	put_entry(e, TIFFTAG_IMAGEWIDTH, TIFF_LONG, 1, ps->w, be), e += 12;
	put_entry(e, TIFFTAG_IMAGELENGTH, TIFF_LONG, 1, ps->h, be), e += 12;
	put_entry(e, TIFFTAG_BITSPERSAMPLE, TIFF_SHORT, 1, (uint32_t)(8 * sb), be), e += 12;
	put_entry(e, TIFFTAG_COMPRESSION, TIFF_SHORT, 1,
	          b->compression ? b->compression : COMPRESSION_NONE, be),
	    e += 12;
	put_entry(e, TIFFTAG_PHOTOMETRIC, TIFF_SHORT, 1, PHOTOMETRIC_MINISBLACK, be), e += 12;
	put_entry(e, TIFFTAG_IMAGEDESCRIPTION, TIFF_ASCII, (uint32_t)desc_len, (uint32_t)desc_off,
	          be),
	    e += 12;
	put_entry(e, TIFFTAG_STRIPOFFSETS, TIFF_LONG, nstrips,
	          nstrips > 1 ? (uint32_t)arrays : off0, be),
	    e += 12;
	put_entry(e, TIFFTAG_SAMPLESPERPIXEL, TIFF_SHORT, 1, 1, be), e += 12;
	put_entry(e, TIFFTAG_ROWSPERSTRIP, TIFF_LONG, 1, rps, be), e += 12;
	put_entry(e, TIFFTAG_STRIPBYTECOUNTS, TIFF_LONG, nstrips,
	          nstrips > 1 ? (uint32_t)(arrays + 4 * nstrips) : (uint32_t)plane_bytes, be),
	    e += 12;
	put_entry(e, TIFFTAG_SAMPLEFORMAT, TIFF_SHORT, 1, format, be), e += 12;
	memcpy(f + desc_off, desc, desc_len);
	for (uint32_t i = 0; nstrips > 1 && i < nstrips; i++) {
		uint32_t rows = ps->h - i * rps < rps ? ps->h - i * rps : rps;
		put_u32(f + arrays + 4 * i, off0 + i * (rps * row_bytes + b->gap), be);
		put_u32(f + arrays + 4 * (nstrips + i), rows * row_bytes, be);
	}
	for (uint32_t z = 0; z < b->planes; z++) {
		ifd_spec pz = *ps;
		pz.id = (int)z + 1;
		fill_unit(&pz, plane, 0, 0, ps->w, ps->h);
		for (size_t i = 0; be && sb > 1 && i < plane_bytes; i += sb)
			for (size_t k = 0; k < sb / 2; k++) {
				uint8_t t = plane[i + k];
				plane[i + k] = plane[i + sb - 1 - k];
				plane[i + sb - 1 - k] = t;
			}
		memcpy(f + data + (size_t)z * plane_bytes, plane, plane_bytes);
	}
	FILE *fp = fopen(path, "wb");
	int ok = fp && fwrite(f, 1, total, fp) == total;
	if (fp)
		ok = fclose(fp) == 0 && ok;
	free(f);
	free(plane);
	return ok;
}

/* Every plane of a one-IFD ImageJ stack reads as written: the planes are
 * the channels, plane z from the first strip + z * plane bytes, in the
 * file's byte order. */
static void check_imagej_big(const big_spec *b, const char *name)
{
	const char *path = tmp_path(name);
	CHECK(write_imagej_big(path, b), "write %s", path);
	sf_slide_info *s = probe_ok(path, name);
	if (!s)
		return;
	uint64_t plane_bytes = (uint64_t)b->plane.w * b->plane.h * sf_dtype_bytes(b->plane.dt);
	CHECK(s->kind == SF_SLIDE_FLAT && s->channels == b->slices && s->stated_z == b->slices &&
	          s->contig_planes == b->slices && s->contig_held == b->slices &&
	          s->contig_stride == plane_bytes && s->dtype == b->plane.dt && !s->contig_fault[0],
	      "%s: kind %d, %u channels, contig %u/%u stride %llu, want %u planes of %llu bytes",
	      name, (int)s->kind, s->channels, s->contig_held, s->contig_planes,
	      (unsigned long long)s->contig_stride, b->slices, (unsigned long long)plane_bytes);
	sf_slide_reader *r = s->channels == b->slices ? reader_ok(s, name) : NULL;
	for (uint32_t z = 0; r && z < b->slices; z++) {
		ifd_spec pz = b->plane;
		pz.id = (int)z + 1;
		check_rects(r, &pz, 0, z, 0, name);
	}
	if (r) { /* back to an earlier plane: the shift is per read, not sticky */
		ifd_spec p1 = b->plane;
		p1.id = 2;
		check_region(r, &p1, 0, 1, 5, 3, 20, 17, 0, name);
		uint16_t buf[4];
		sf_err e = {0};
		CHECK(sf_slide_read_region(r, 0, b->slices, 0, 0, 1, 1, buf, &e) == SF_EINVAL &&
		          strstr(e.msg, path),
		      "%s: a plane past the stack: %s", name, e.msg);
	}
	sf_slide_reader_close(r);
	sf_slide_info_free(s);
}

/* The probe of a one-IFD ImageJ file that states slices= it does not hold
 * as ImageJ's layout: one channel, and why (contig_fault) or how many
 * planes it holds (contig_held). */
static void check_imagej_not_big(const big_spec *b, const char *name, const char *fault,
                                 uint32_t held)
{
	const char *path = tmp_path(name);
	CHECK(write_imagej_big(path, b), "write %s", path);
	sf_slide_info *s = probe_ok(path, name);
	if (!s)
		return;
	CHECK(s->channels == 1 && s->stated_z == b->slices, "%s: %u channels, want 1", name,
	      s->channels);
	if (fault)
		CHECK(!s->contig_planes && strstr(s->contig_fault, fault),
		      "%s: fault '%s', want '%s'", name, s->contig_fault, fault);
	else
		CHECK(s->contig_planes == b->slices && s->contig_held == held &&
		          !s->contig_fault[0],
		      "%s: holds %u of %u planes, want %u", name, s->contig_held, s->contig_planes,
		      held);
	sf_slide_info_free(s);
}

static void test_imagej_big(void)
{
	big_spec u16 = {
	    .plane = {.w = 48, .h = 40, .dt = SF_U16, .spp = 1}, .slices = 16, .planes = 16};
	check_imagej_big(&u16, "ij_big_u16.tif");
	big_spec u16be = u16;
	u16be.big_endian = 1; /* ImageJ's own byte order */
	u16be.rps = 7;        /* strips of 7 rows, one after another */
	check_imagej_big(&u16be, "ij_big_u16_be.tif");
	big_spec f32be = {.plane = {.w = 33, .h = 21, .dt = SF_F32, .spp = 1},
	                  .big_endian = 1,
	                  .slices = 5,
	                  .planes = 5};
	check_imagej_big(&f32be, "ij_big_f32_be.tif");
	big_spec u8 = {
	    .plane = {.w = 31, .h = 17, .dt = SF_U8, .spp = 1}, .slices = 3, .planes = 3, .rps = 4};
	check_imagej_big(&u8, "ij_big_u8.tif");

	big_spec cut = u16;
	cut.planes = 11; /* cut short: 11 whole planes */
	check_imagej_not_big(&cut, "ij_cut.tif", NULL, 11);
	big_spec gap = u16;
	gap.rps = 8;
	gap.gap = 16;
	check_imagej_not_big(&gap, "ij_gap.tif", "strip 1 does not start where strip 0 ends", 0);
	big_spec packed = u16;
	packed.compression = COMPRESSION_PACKBITS;
	check_imagej_not_big(&packed, "ij_packed.tif", "compressed (Compression 32773)", 0);
	big_spec chans = u16;
	chans.extra = "channels=2\n";
	check_imagej_not_big(&chans, "ij_chans.tif", "channels=2", 0);
}

/* ---- driver for the integration test ------------------------------------ */

static const char *kind_name(sf_slide_kind k)
{
	switch (k) {
	case SF_SLIDE_OME: return "ome";
	case SF_SLIDE_PAGES: return "pages";
	case SF_SLIDE_SVS: return "svs";
	default: return "flat";
	}
}

static int cmd_info(const char *path)
{
	sf_slide_info *s = NULL;
	sf_err e = {0};
	if (sf_slide_probe(path, &s, &e)) {
		fprintf(stderr, "error=%s %s\n", sf_code_name(e.code), e.msg);
		return 2;
	}
	printf("kind=%s\nis_ome=%d\nchannels=%u\nsamples=%u\ndtype=%s\nlevels=%u\n",
	       kind_name(s->kind), s->is_ome, s->channels, s->samples, sf_dtype_ome_name(s->dtype),
	       s->level_count);
	for (uint32_t l = 0; l < s->level_count; l++)
		printf("level%u=%ux%u\n", l, s->levels[l].width, s->levels[l].height);
	printf("pixel_size=%.6f,%.6f\ntiled=%d\nstated_c=%u\nstated_z=%u\norientation=%u\n",
	       s->pixel_size_x, s->pixel_size_y, s->tiled, s->stated_c, s->stated_z,
	       s->orientation);
	for (uint32_t c = 0; c < s->channels; c++)
		printf("channel%u=%s\n", c, s->channel_names[c]);
	sf_slide_info_free(s);
	return 0;
}

static int cmd_dump(char **argv)
{
	sf_slide_info *s = NULL;
	sf_slide_reader *r = NULL;
	sf_err e = {0};
	uint32_t level = (uint32_t)atoi(argv[1]), channel = (uint32_t)atoi(argv[2]);
	long long x = atoll(argv[3]), y = atoll(argv[4]);
	uint32_t w = (uint32_t)atoi(argv[5]), h = (uint32_t)atoi(argv[6]);
	int rc = sf_slide_probe(argv[0], &s, &e);
	if (!rc)
		rc = sf_slide_reader_open(s, &r, &e);
	void *buf = NULL;
	size_t n = 0;
	if (!rc) {
		n = (size_t)w * h * s->samples * sf_dtype_bytes(s->dtype);
		buf = malloc(n ? n : 1);
		rc = buf ? sf_slide_read_region(r, level, channel, x, y, w, h, buf, &e) : SF_ENOMEM;
	}
	if (!rc) {
		FILE *f = fopen(argv[7], "wb");
		if (!f || fwrite(buf, 1, n, f) != n)
			rc = SF_EIO;
		if (f)
			fclose(f);
	}
	if (rc)
		fprintf(stderr, "error=%s %s\n", sf_code_name(rc), e.msg);
	free(buf);
	sf_slide_reader_close(r);
	sf_slide_info_free(s);
	return rc ? 2 : 0;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	return remove(path);
}

int main(int argc, char **argv)
{
	if (argc == 3 && strcmp(argv[1], "--info") == 0)
		return cmd_info(argv[2]);
	if (argc == 10 && strcmp(argv[1], "--dump") == 0)
		return cmd_dump(argv + 2);
	if (argc != 1) {
		fprintf(stderr, "usage: %s [--info PATH | --dump PATH LEVEL CHANNEL X Y W H OUT]\n",
		        argv[0]);
		return 2;
	}
	snprintf(tmpdir, sizeof tmpdir, "/tmp/test_slide.XXXXXX");
	if (!mkdtemp(tmpdir)) {
		perror("mkdtemp");
		return 1;
	}
	test_ome_subifds();
	test_ome_pixel_size_overflow();
	test_ome_rgb_images();
	test_pages_pyramid();
	test_flat();
	test_plain_subifds();
	test_svs();
	test_associated_pages();
	test_imagej_pixel_size();
	test_imagej_big();
	test_unsupported();
	test_bad_files();
	test_channel_ifds_checked();
	nftw(tmpdir, remove_entry, 8, FTW_DEPTH | FTW_PHYS);
	printf("test_slide: %d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}

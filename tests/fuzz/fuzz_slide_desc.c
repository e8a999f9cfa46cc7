/* fuzz_slide_desc.c — libFuzzer harness: the ImageDescription parsers of
 * sf_slide_probe (OME-XML, ImageJ, Aperio).  The input (up to its first NUL)
 * becomes the description of page 0 of a small valid TIFF written here with
 * libtiff: 3 pages of 64 x 48 uint8 in 32 x 32 tiles, each with one SubIFD
 * of 32 x 24, so OME channel/level layouts can be chosen.  Mutating
 * the description inside a whole TIFF (fuzz_slide.c) mostly breaks the
 * TIFF instead; this reaches the text parsers directly.
 *   make fuzz && build/fuzz/fuzz_slide_desc -timeout=5 -rss_limit_mb=2048 CORPUS_DIR
 * Seeds: tests/fuzz/seeds.py (OME-XML, ImageJ and Aperio descriptions). */
#include <math.h>
#include <string.h>
#include <tiffio.h>

#include "fuzz_common.h"
#include "scopefs/log.h"
#include "scopefs/slide.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void write_page(TIFF *tif, uint32_t w, uint32_t h, const char *desc, int subifds)
{
	static uint8_t tile[32 * 32];
	TIFFSetField(tif, TIFFTAG_IMAGEWIDTH, w);
	TIFFSetField(tif, TIFFTAG_IMAGELENGTH, h);
	TIFFSetField(tif, TIFFTAG_BITSPERSAMPLE, 8);
	TIFFSetField(tif, TIFFTAG_SAMPLESPERPIXEL, 1);
	TIFFSetField(tif, TIFFTAG_PHOTOMETRIC, PHOTOMETRIC_MINISBLACK);
	TIFFSetField(tif, TIFFTAG_PLANARCONFIG, PLANARCONFIG_CONTIG);
	TIFFSetField(tif, TIFFTAG_TILEWIDTH, 32);
	TIFFSetField(tif, TIFFTAG_TILELENGTH, 32);
	if (subifds < 0)
		TIFFSetField(tif, TIFFTAG_SUBFILETYPE, FILETYPE_REDUCEDIMAGE);
	if (desc)
		TIFFSetField(tif, TIFFTAG_IMAGEDESCRIPTION, desc);
	if (subifds > 0) {
		uint64_t offs[1] = {0};
		TIFFSetField(tif, TIFFTAG_SUBIFD, (uint16_t)subifds, offs);
	}
	for (uint32_t y = 0; y < h; y += 32)
		for (uint32_t x = 0; x < w; x += 32) {
			memset(tile, (int)(x + y), sizeof tile);
			TIFFWriteTile(tif, tile, x, y, 0, 0);
		}
	TIFFWriteDirectory(tif);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char p[128];
	sf_log_set_level(SF_LOG_ERROR); /* the probe's warnings are expected here */
	char *desc = malloc(size + 1);
	if (!desc)
		abort();
	memcpy(desc, data, size);
	desc[size] = '\0';
	TIFF *tif = TIFFOpen(fuzz_path("desc.tif", p, sizeof p), "w");
	if (!tif)
		abort();
	for (int page = 0; page < 3; page++) {
		write_page(tif, 64, 48, page == 0 && desc[0] ? desc : NULL, 1);
		write_page(tif, 32, 24, NULL, -1); /* the page's SubIFD */
	}
	TIFFClose(tif);
	free(desc);

	sf_slide_info *s = fuzz_probe(p);
	if (!s)
		return 0;
	for (uint32_t c = 0; c < s->channels; c++)
		if (!s->channel_names[c] || strlen(s->channel_names[c]) > 4096)
			abort(); /* never NULL, bounded */
	if (getenv("FUZZ_VERBOSE"))
		fprintf(stderr, "kind %d, %u channels, %u levels, %g um\n", (int)s->kind,
		        s->channels, s->level_count, s->pixel_size_x);
	sf_err e;
	sf_slide_reader *r;
	if (sf_slide_reader_open(s, &r, &e) == SF_OK) {
		static uint8_t dst[40 * 40];
		for (uint32_t l = 0; l < s->level_count; l++)
			sf_slide_read_region(r, l, s->channels - 1, 20, 10, 40, 40, dst, &e);
		sf_slide_reader_close(r);
	}
	sf_slide_info_free(s);
	return 0;
}

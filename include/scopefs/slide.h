/* slide.h — source images in the raw dataset: probe the header, read regions.
 *
 * A slide is a TIFF-family image: OME-TIFF (channels as main-chain pages,
 * reduced levels as SubIFDs), a pyramidal tiled TIFF whose reduced levels are
 * main-chain pages (libvips/OpenSlide layout), an Aperio SVS, or a flat
 * (single-level) TIFF, tiled or in strips.  The same type also describes the
 * planes of a z-stack (a flat TIFF of one page, or a multi-page TIFF whose
 * pages are z-planes and are then reported as channels, or ImageJ's one-IFD
 * layout of a stack over 4 GiB, whose planes follow the first one and are
 * reported as channels too).  The probe also
 * notes a page that breaks such a run of pages (odd_page), so a z-stack
 * is not cut short without a word.
 *
 * Probing reads the header only.  Reading uses libtiff, one sf_slide_reader
 * per worker thread (libtiff handles are not shared between threads), and
 * reads only the source tiles or strips the requested rect touches. */
#ifndef SCOPEFS_SLIDE_H
#define SCOPEFS_SLIDE_H

#include <stdint.h>

#include "scopefs/err.h"
#include "scopefs/pixel.h"

typedef enum sf_slide_kind {
	SF_SLIDE_OME,   /* OME-TIFF: channels are pages, levels are SubIFDs */
	SF_SLIDE_PAGES, /* levels are main-chain pages (libvips pyramid, OpenSlide generic) */
	SF_SLIDE_SVS,   /* Aperio SVS: levels are pages, plus thumbnail/label/macro pages */
	SF_SLIDE_FLAT,  /* one level; several pages are channels (or z-planes) */
} sf_slide_kind;

typedef struct sf_slide_level {
	uint32_t width, height;
	/* Where the level of channel c lives: main IFD index dir[c]; when
	 * subifd >= 0, the subifd-th SubIFD of that IFD. */
	uint32_t *dir;           /* channels entries */
	int32_t subifd;          /* -1: the main IFD itself */
	uint64_t *ifd_offset;    /* channels entries: file offset of that IFD (reader seeks it) */
	uint32_t tile_w, tile_h; /* source unit: the tile, or width x rows-per-strip for strips */
	int tiled;               /* this level is tiled (channel 0's IFD) */
} sf_slide_level;

typedef struct sf_slide_info {
	char *path; /* as given to sf_slide_probe */
	sf_slide_kind kind;
	uint32_t width, height; /* level 0 */
	uint32_t channels;      /* planar channels (pages); 1 for RGB brightfield */
	uint32_t samples;       /* samples per pixel: 1, or 3 for interleaved RGB */
	sf_dtype dtype;
	uint32_t level_count;
	sf_slide_level *levels;            /* level_count entries, level 0 first, shrinking */
	double pixel_size_x, pixel_size_y; /* micrometres per pixel; 0 if unknown */
	char **channel_names; /* channels entries, never NULL ("Channel 0" if unnamed) */
	int is_ome;           /* the first IFD carries OME-XML */
	uint32_t ome_size_z;  /* SizeZ from OME-XML (1 when absent) */
	int tiled;            /* level 0 is tiled */
	/* TIFF Orientation of page 0 (1-8; 1 when absent).  Pixels are always
	 * served in stored order, as tifffile and OpenSlide read them; the probe
	 * logs a warning naming the file when this is not 1. */
	uint16_t orientation;
	uint64_t file_size; /* identity of the file, for cache keys */
	int64_t mtime_ns;
	/* Decoded tiles shared by all readers of this slide (one worker decodes a
	 * source tile, the others copy from it in place); mutable behind its own
	 * lock, so a const sf_slide_info may still be shared between threads.
	 * NULL: none. */
	struct sf_tile_share *share;
	/* SizeC, SizeZ and SizeT as the file's own metadata states them (OME-XML Pixels, or an
	 * ImageJ description's channels= / slices= / frames=); 0 when the file does not say. */
	uint32_t stated_c, stated_z, stated_t;
	/* An ImageJ description's images= (all planes, whatever their axes); 0 when absent.
	 * tifffile writes a 3D array without axes as images=N channels=N, no slices=. */
	uint32_t stated_images;
	/* OME-XML Pixels DimensionOrder ("XYZCT": z varies fastest after the plane, then
	 * c, then t; the order of the pages); "" when absent or not OME. */
	char dimension_order[16];
	/* A main-chain page that breaks the run of channel pages (FLAT and OME layouts; 0:
	 * none): the first page after the channels that is neither marked reduced
	 * (NewSubfileType bit 0) nor a thumbnail (at most half of page 0 in both axes),
	 * when more pages of page 0's size and type follow it or there are two or more
	 * channels; for OME-XML, the page where the run ends short of the first Image's
	 * pages (sf_slide_time_point_pages x SizeT).
	 * odd_page_text says how it differs, e.g. "page 6 is 30x30 uint16, page 0 is
	 * 32x32 uint16".  The pages after it are not channels. */
	uint32_t odd_page;
	char odd_page_text[128];
	/* ImageJ's layout for stacks over 4 GiB (Fiji; tifffile's imagej=True, truncate=True):
	 * one IFD whose ImageJ description states slices=N > 1 (channels= and frames= absent
	 * or 1, images= absent or N), uncompressed and untiled with one sample per pixel, its
	 * strips contiguous, and the N planes stored one after another from its first strip:
	 * plane z at contig_offset + z * contig_stride (the bytes of one plane).  Past the
	 * 4 GiB of classic TIFF offsets there is no room for an IFD per plane.
	 * contig_planes: N when the IFD is laid out so, else 0.  contig_held: the whole
	 * planes the file holds from contig_offset (at most N).  When it holds all N, the
	 * planes are the channels (channels == N, every entry of levels[0] the one IFD);
	 * otherwise channels stays 1.  contig_fault: why a one-IFD ImageJ file stating
	 * slices > 1 is not that layout ("" otherwise), e.g. "its page is compressed
	 * (Compression 5)". */
	uint32_t contig_planes, contig_held;
	uint64_t contig_offset, contig_stride;
	char contig_fault[96];
} sf_slide_info;

/* Read the header of path and describe it.  Fails with SF_EFORMAT and a
 * message naming path and the problem for a truncated file, not-a-TIFF, an
 * unsupported sample format, inconsistent channels; SF_EIO if unreadable. */
int sf_slide_probe(const char *path, sf_slide_info **out, sf_err *e);
void sf_slide_info_free(sf_slide_info *s);

/* The pages one time point of s fills, as its metadata states it: SizeC x
 * SizeZ (ImageJ channels= x slices=), a size it does not state counting 1,
 * where a page of several interleaved samples holds that many of the SizeC
 * channels (an RGB OME image states SizeC=3 and has one page per Z and T).
 * Needs only stated_c, stated_z and samples filled in. */
uint64_t sf_slide_time_point_pages(const sf_slide_info *s);

typedef struct sf_slide_reader sf_slide_reader;

/* Open a reader on the file s describes.  s is borrowed and must outlive the
 * reader.  Fails with SF_EFORMAT if the file's size or mtime changed since
 * the probe (its layout may no longer be s). */
int sf_slide_reader_open(const sf_slide_info *s, sf_slide_reader **out, sf_err *e);
void sf_slide_reader_close(sf_slide_reader *r);

/* How many tiles or strips this reader has decoded itself (units neither
 * the slide's share nor its own small LRU held); for tests and benchmarks. */
uint64_t sf_slide_reader_decodes(const sf_slide_reader *r);

/* Copy the rect [x, x+w) x [y, y+h) of channel c at level into dst
 * (w*h*samples samples, row-major, samples interleaved, native byte order).
 * Pixels outside the level are 0.  A decode failure names the file, the
 * level and the tile. */
int sf_slide_read_region(sf_slide_reader *r, uint32_t level, uint32_t channel, int64_t x, int64_t y,
                         uint32_t w, uint32_t h, void *dst, sf_err *e);

/* Eviction hint for the slide's shared decoded tiles: fn(ctx, level, tile)
 * says how soon tile `tile` (row-major index in the level's tile grid, any
 * channel) of `level` will be read again, smaller = sooner, UINT64_MAX =
 * not at all; the share evicts the tile read again last first.  fn runs
 * under the share's lock: it must be quick, thread-safe and must not call
 * into the slide.  One hint per slide: setting one replaces any other;
 * fn = NULL removes the hint only if `owner` set it (LRU again).  The
 * owner must remove its hint before ctx goes away. */
typedef uint64_t (*sf_slide_reuse_fn)(void *ctx, uint32_t level, uint32_t tile);
void sf_slide_set_reuse_hint(const sf_slide_info *s, const void *owner, sf_slide_reuse_fn fn,
                             void *ctx);

#endif

/* product_deconv.h — deconvolved/ planes: LsDeconv computed block by block on read.
 *
 * A stack is cut into a fixed 3D grid of blocks at mount.  Two products
 * share one engine:
 *  - "deconv blocks": unit = block index (bz, by, bx in raster order); its
 *    bytes are the block's core, deconvolved, float32 v[z][y][x].  The input
 *    is the core plus a halo per axis of max(PSF size, Gaussian filter size)
 *    voxels: real neighbour data inside the volume, a symmetric mirror
 *    (numpy "symmetric") outside it.  Every block's input has the same shape
 *    (edge blocks take a wider halo on their inner side), so one
 *    deconvolution context serves them all (one per process on the CPU,
 *    remade for another stack's window).  A NaN or infinite float32 source voxel
 *    fails every block whose input holds it (SF_EFORMAT naming the plane
 *    file, the pixel and the value), never a silently blank block.
 *  - "deconv planes": unit = plane * strips + strip of the plane files'
 *    strip TIFF layout; it reads the strip's rows out of the covering blocks
 *    (nested engine reads) and scales them to the output type.
 * Both keys mix the source files' identities, every parameter and the grid,
 * so the bytes never depend on read order, thread count or cache state.
 *
 * Settings come from decwrap.py-named `key=value` items: mount-wide (-o, a
 * preset) then per stack (the folder name Ex_561_Em_600, then the file
 * <stack folder>/scopefs.conf or RAW_DIR/<stack>.scopefs.conf).  Lengths as
 * decwrap.py takes them: dxy and dz in micrometres, wavelengths in nm, fcyl
 * and slitwidth in mm.  docs/deconvolution.md lists them and the formulas. */
#ifndef SCOPEFS_PRODUCT_DECONV_H
#define SCOPEFS_PRODUCT_DECONV_H

#include <limits.h>
#include <stdint.h>

#include "scopefs/dataset.h"
#include "scopefs/deconv.h"
#include "scopefs/engine.h"
#include "scopefs/product.h"
#include "scopefs/tiff_layout.h"

enum {
	SF_DECONV_DTYPE_SAME = 0, /* output type = the stack's type */
	SF_DECONV_SCALE_AUTO = 0, /* scale == 0: percentiles from a sample of blocks */
	SF_DECONV_GPU_AUTO = -1,
	SF_DECONV_GPU_OFF = -2,
};

typedef struct sf_deconv_settings {
	sf_deconv_params params; /* core parameters, lengths in nm (dxy, dz converted) */
	int have_dxy, have_dz;   /* given by some source (required) */
	int have_ex, have_em;    /* given or inferred (required) */
	double scale;            /* 0: auto; > 0: out = round(v * scale), clamped */
	double signal_amp;       /* LsDeconv's amplification (auto scale); default 1 */
	double destripe_sigma;   /* z destriping after deconvolution (destripe.h); 0: off */
	int dtype;               /* SF_DECONV_DTYPE_SAME or an sf_dtype */
	int gpu;                 /* SF_DECONV_GPU_AUTO, _OFF, or a device index */
	uint32_t block;          /* deconv_block: core edge in voxels; 0 = from mem */
	uint32_t scale_sample;   /* blocks sampled by scale=auto; 0 = all; default 16 */
	/* decwrap.py's denoise_strength: when the last of dark and
	 * denoise_strength given is denoise_strength (have_denoise), dark is
	 * LsDeconv's value for it, as sf_deconv_settings_resolve sets it. */
	double denoise_strength;
	int have_denoise;
	int flip; /* LsDeconv's flip_upside_down: planes flipped along y */
	/* dtype was set by convert_to_8bit=1 or convert_to_16bit=1 (not by
	 * dtype=), so that switch's 0 in a later source undoes it. */
	int dtype_by_switch;
} sf_deconv_settings;

/* decwrap.py's defaults; dxy, dz and the wavelengths unset. */
void sf_deconv_settings_default(sf_deconv_settings *s);

/* Whether key is a deconvolution option (for the option table). */
int sf_deconv_settings_is_key(const char *key);

/* Apply one key=value; SF_EINVAL names origin (e.g. "file:3: ") and the key.
 * Values are checked alone here (a number, in range); combinations (na < rf)
 * by sf_deconv_settings_check. */
int sf_deconv_settings_apply(sf_deconv_settings *s, const char *key, const char *value,
                             const char *origin, sf_err *e);

/* Apply a comma-separated key=value list (NULL or "" is nothing). */
int sf_deconv_settings_apply_list(sf_deconv_settings *s, const char *list, const char *origin,
                                  sf_err *e);

/* Derived values, once every source is applied: with denoise_strength N,
 * dark = N times the centre weight of the pre-filter's normalised 3D
 * Gaussian (LsDeconv's dark(): a centred impulse of height N filtered by
 * the pre-filter, its maximum), or 0 when the pre-filter is off (LsDeconv
 * subtracts it only after the filter). */
void sf_deconv_settings_resolve(sf_deconv_settings *s);

/* Check the combination of what is set (na < rf, ...) without requiring the
 * per-stack values (dxy, dz, wavelengths).  Mount-wide options use this. */
int sf_deconv_settings_check(const sf_deconv_settings *s, const char *origin, sf_err *e);

/* The per-stack files the settings of stack st are read from, least
 * specific first: RAW_DIR/<stack>.scopefs.conf (a named stack) and
 * <stack folder>/scopefs.conf (a folder of planes).  Either may be absent.
 * Returns how many paths (0..2) went into paths. */
uint32_t sf_deconv_conf_paths(const char *raw_dir, const sf_stack *st, char paths[2][PATH_MAX]);

/* The settings of one stack: defaults, the mount-wide list, wavelengths from
 * the stack's name (or RAW_DIR's for the root stack), the per-stack file;
 * then everything required and valid.  On error *e says why the stack
 * cannot be deconvolved (one line for status problems). */
int sf_deconv_settings_for_stack(const char *raw_dir, const sf_stack *st, const char *mount_list,
                                 int gpu, sf_deconv_settings *s, sf_err *e);

/* Infer lambda_ex / lambda_em from a name holding "Ex_561" / "Em_600"
 * (case-insensitive, '_' or '-' separated); sets have_ex/have_em. */
void sf_deconv_settings_infer_wavelengths(sf_deconv_settings *s, const char *name);

/* The output sample type of st under s. */
sf_dtype sf_deconv_output_dtype(const sf_deconv_settings *s, const sf_stack *st);

/* Make the two products of stack st.  plane_layout is the layout of one
 * plane file (type sf_deconv_output_dtype).  engine points at the mount's
 * engine pointer, set before the first read (the engine is started after
 * the tree is built); cache_dir holds the scale=auto record.  mem_bytes
 * bounds the block working set when s->block is 0.  On success the caller
 * owns both products (planes reads blocks: register both, destroy planes
 * first or both together after the engine). */
int sf_product_deconv_create(const sf_stack *st, const sf_deconv_settings *s,
                             const sf_layout *plane_layout, sf_engine *const *engine,
                             const char *cache_dir, uint64_t mem_bytes, sf_product **blocks,
                             sf_product **planes, sf_err *e);

/* FFTW contexts made so far by this process.  CPU blocks of all stacks
 * share one context, remade when a block of another stack needs it (the
 * bytes do not change), so a stack read once holds no context afterwards. */
unsigned long sf_deconv_cpu_contexts_made(void);

#endif

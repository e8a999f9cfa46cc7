/* autoreg_thumb.h — the registration image of a slide (private to autoreg.c).
 *
 * A grey float thumbnail whose longest side is at most `dim`, read from the
 * slide's smallest pyramid level that is at least that large (box-reduced
 * by an integer factor, in bands, so memory stays near the thumbnail's
 * size), prepared so background is ~0 and tissue positive:
 *  - fluorescence: the registration channel (sf_qc_channel), stretched
 *    from its 1st to its 99.5th percentile;
 *  - RGB brightfield (uint8, 3+ samples): mean optical density, stretched
 *    the same way, and a second image of the hematoxylin amount (colour
 *    deconvolution), which H&E and an IHC counterstain share.
 * ds[] is the thumbnail's downsample (level-0 px per thumbnail px, per
 * axis) under the pixel-centre rule of transform.h. */
#ifndef SCOPEFS_AUTOREG_THUMB_H
#define SCOPEFS_AUTOREG_THUMB_H

#include <stdint.h>

#include "scopefs/err.h"
#include "scopefs/register.h"
#include "scopefs/slide.h"

typedef struct autoreg_thumb {
	sf_reg_image im;
	sf_reg_image hema; /* brightfield: the hematoxylin image; else empty */
	uint8_t *mask;     /* tissue mask (Otsu), im.w * im.h bytes */
	double ds[2];
	int brightfield; /* made from optical density */
	uint32_t channel;
} autoreg_thumb;

/* channel: reg_channel as given ("" for the default).  like_um: the
 * micrometres per pixel of the thumbnail s is to be compared with (of the
 * slide it is registered to: autoreg_thumb_um), or 0.  When it and s's
 * pixel size are known, s's thumbnail is made at the physical pixel size
 * closest to like_um (its longest side up to 1.5 dim), so the pair's
 * thumbnails differ in scale by no more than their integer steps allow;
 * else it is s's own thumbnail at dim. */
int autoreg_thumb_make(const sf_slide_info *s, double like_um, const char *channel, uint32_t dim,
                       autoreg_thumb *t, sf_err *e);

/* Micrometres per pixel (along x) of s's own thumbnail at dim, 0 when s's
 * pixel size is unknown. */
double autoreg_thumb_um(const sf_slide_info *s, uint32_t dim);
void autoreg_thumb_free(autoreg_thumb *t);

/* Whether s is an RGB brightfield slide (registered through optical density). */
int autoreg_is_brightfield(const sf_slide_info *s);

#endif

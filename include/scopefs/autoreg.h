/* autoreg.h — scopefs registers the moving slides itself (issue #5).
 *
 * A moving slide without a transform file is registered to the reference
 * from low pyramid levels: a thumbnail of its registration channel (or the
 * optical density of an RGB slide), a similarity search robust to any
 * rotation and mirror, an affine refinement (NCC, or mutual information
 * across stains), then a non-rigid field on a grid whose longest side is
 * reg_nonrigid_dim (register.h).  docs/registration.md.
 *
 *  - Lazy: nothing runs until something needs a transform (a lookup in
 *    registered/, qc/ or transforms/, a tile of a registered slide), or at
 *    mount start with reg_eager=1.  Then every slide of the job is queued
 *    and runs on up to `threads` threads of the job's own (never on tile
 *    engine workers, which may be the ones waiting).
 *  - Deterministic: a slide's result depends only on the two slides'
 *    identities and the settings (sf_autoreg_key), so products may key
 *    their tiles on that before the transform exists.
 *  - Cached: results go to the disk cache under that key (checked like
 *    every entry); a remount reads them back instead of registering.
 *  - Guarded: a result that blows the slide up, shears it, folds it or
 *    matches nothing is rejected with its reason, and the slide is not served.
 *  - reg_order=serial registers each slide to its neighbour by name (towards
 *    the reference) and composes the affine maps; the non-rigid field is
 *    then fitted directly against the reference.
 *
 * Thread-safe: any thread may wait on any slide; results never change once
 * made.  sf_autoreg_stop (a shutdown signal) ends the job early: waiters get
 * an error within 0.1 s, the non-rigid and micro fits end between demons
 * iterations, and a thumbnail read or affine fit under way finishes; the
 * slide is then failed, not cached.  sf_autoreg_destroy stops and joins the
 * threads. */
#ifndef SCOPEFS_AUTOREG_H
#define SCOPEFS_AUTOREG_H

#include <stddef.h>
#include <stdint.h>

#include "scopefs/cache.h"
#include "scopefs/dataset.h"
#include "scopefs/err.h"
#include "scopefs/key.h"
#include "scopefs/transform.h"

/* The reg_* mount options. */
typedef struct sf_reg_settings {
	int enabled;           /* reg=auto (1) or off (0) */
	char channel[64];      /* reg_channel: a name or an index; "" = DAPI/Hoechst, else 0 */
	int metric;            /* reg_metric: -1 auto (MI across modalities), else sf_reg_metric */
	uint32_t dim;          /* reg_dim: longest side of the affine fit's finest level */
	uint32_t nonrigid_dim; /* reg_nonrigid_dim: longest side of the field grid; 0 = none */
	int serial;            /* reg_order=serial (1) or direct (0) */
	int eager;             /* reg_eager=1: start at mount */
	int micro;             /* reg_micro=1: refine the field at a finer level, in tiles */
	uint32_t micro_dim;    /* reg_micro_dim: longest side of that level */
} sf_reg_settings;

/* enabled 1, channel "", metric auto, dim 1024, nonrigid_dim 2000, direct,
 * lazy, micro off at 4096. */
void sf_reg_settings_default(sf_reg_settings *s);

/* Apply one reg_* option (key without "reg_" is not accepted); origin
 * prefixes messages ("" or "FILE:LINE: " of a preset).  SF_EINVAL names the key. */
int sf_reg_settings_apply(sf_reg_settings *s, const char *key, const char *value,
                          const char *origin, sf_err *e);

typedef struct sf_autoreg sf_autoreg;

/* The files a registered slide shows in transforms/ (sf_autoreg_file). */
typedef enum sf_autoreg_file_kind {
	SF_AUTOREG_JSON,          /* <stem>.json: our transform format */
	SF_AUTOREG_FIELD_TIFF,    /* <stem>.field.tif: its displacement field */
	SF_AUTOREG_ELASTIX,       /* <stem>.elastix.txt: elastix TransformParameters */
	SF_AUTOREG_ELASTIX_FIELD, /* <stem>.elastix-field.txt: its DeformationFieldTransform */
	SF_AUTOREG_FIELD_MHD,     /* <stem>.field.mhd: the field as a MetaImage header */
	SF_AUTOREG_FIELD_RAW,     /* <stem>.field.raw: the MetaImage's data */
	SF_AUTOREG_FILE_KINDS
} sf_autoreg_file_kind;

/* The file name of kind k for stem (into buf); the name elastix files use
 * to find each other is transforms_dir/name. */
void sf_autoreg_file_name(sf_autoreg_file_kind k, const char *stem, char *buf, size_t n);
/* Whether kind k exists for a slide registered with these settings (the
 * field files only when nonrigid_dim > 0). */
int sf_autoreg_file_exists(const sf_reg_settings *s, sf_autoreg_file_kind k);

/* A job over dataset d: to_register[i] != 0 for each slide to register to slide
 * `reference`.  transforms_dir: the absolute folder the transforms/ files
 * are served at (elastix files refer to each other by path).  d, s, cache
 * are borrowed and must outlive the job. */
int sf_autoreg_create(const sf_dataset *d, uint32_t reference, const uint8_t *to_register,
                      const sf_reg_settings *s, unsigned threads, sf_cache *cache,
                      const char *transforms_dir, sf_autoreg **out, sf_err *e);
void sf_autoreg_destroy(sf_autoreg *a);

/* Ask the job to end (see above).  Only stores to a lock-free atomic, so
 * it is async-signal-safe: waiters notice it within 0.1 s. */
void sf_autoreg_stop(sf_autoreg *a);

/* Start the threads (idempotent; call after daemonizing). */
int sf_autoreg_start(sf_autoreg *a, sf_err *e);

/* Wait for slide i (starting the job when needed).  SF_OK with *t the
 * level-0 transform (reference px -> slide px; owned by the job), or the
 * failure: SF_EFORMAT for a rejected result, its reason in e. */
int sf_autoreg_wait(sf_autoreg *a, uint32_t i, const sf_transform **t, sf_err *e);

/* Slide i's registration now, never waiting (it starts the job when
 * needed, as sf_autoreg_wait does): running, served (*t the transform, as
 * sf_autoreg_wait gives it) or rejected (failed, or the job stopped).  For
 * callers that must not block, e.g. a FUSE lookup, which holds up every
 * other lookup in its folder. */
typedef enum sf_autoreg_state {
	SF_AUTOREG_RUNNING,
	SF_AUTOREG_SERVED,
	SF_AUTOREG_REJECTED
} sf_autoreg_state;
sf_autoreg_state sf_autoreg_poll(sf_autoreg *a, uint32_t i, const sf_transform **t);

/* Whether slide i is in the job. */
int sf_autoreg_has(const sf_autoreg *a, uint32_t i);

/* The key of everything slide i's result depends on. */
sf_key sf_autoreg_key(const sf_autoreg *a, uint32_t i);

/* Slide i's state for .scopefs/status, e.g. "registered (similarity, NCC
 * 0.93, ...)", "registering: non-rigid", "rejected: ...".  Never blocks. */
void sf_autoreg_describe(sf_autoreg *a, uint32_t i, char *buf, size_t n);

/* The bytes of file kind k of slide i (waits for the slide), malloc'd for
 * the caller, who frees them.  The field files (.field.tif, .field.raw) are
 * tens of MB and made at each call; the small text files (.json, the
 * elastix files, the .field.mhd header) are made once and copied, so that
 * opening the 300-byte header does not build the whole field each time.
 * SF_ENOTFOUND for a field file of a slide without a field. */
int sf_autoreg_file_make(sf_autoreg *a, uint32_t i, sf_autoreg_file_kind k, uint8_t **bytes,
                         size_t *len, sf_err *e);
/* Its size (made once and remembered). */
int sf_autoreg_file_size(sf_autoreg *a, uint32_t i, sf_autoreg_file_kind k, uint64_t *size,
                         sf_err *e);

#endif

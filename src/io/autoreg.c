/* autoreg.c — the registration job of a mount (autoreg.h).
 *
 * The job runs in three phases over its slides, each phase a shared queue
 * that every job thread drains before waiting for the phase to finish:
 *   0. thumbnails: the registration image and tissue mask of every slide
 *      that is needed (the reference, the slides to register, and in serial
 *      order their neighbours);
 *   1. affine: each slide to its target (the reference, or in serial order
 *      its neighbour towards the reference): similarity search, then affine
 *      refinement (register.h), as a level-0 matrix;
 *   2. finish: compose the chain to the reference (serial), fit the
 *      non-rigid field against the reference, apply the guard, build the
 *      transform and store it in the disk cache.
 * Slides found in the cache skip all three.  Thumbnails are freed when the
 * job ends.  One lock guards the queues and every slide's state; the
 * registration itself runs outside it. */
#include "scopefs/autoreg.h"

#include <ctype.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "autoreg_thumb.h"
#include "scopefs/log.h"
#include "scopefs/register.h"
#include "scopefs/register_micro.h"
#include "scopefs/transform_export.h"

/* The phases every job thread goes through together (job_thread). */
enum { PHASE_THUMB, PHASE_AFFINE, PHASE_RELINK, PHASE_FINISH, PHASES };

/* The guard: a result outside these bounds is not served. */
#define GUARD_MIN_OVERLAP 0.25 /* of the reference's tissue */
#define GUARD_MIN_NCC     0.10 /* NCC metric: below it nothing really matched */
/* NCC judged: of what the slide leaves uncorrelated when turned or mirrored
 * (1 - null), the share the fit's pose explains, on pixels that are tissue in
 * both (guard_structure).  48 synthetic sections of other tissues, H&E and
 * fluorescence, scored -0.10 to 0.10, while their affine fits reached NCC
 * 0.15-0.28 by stretching them over the reference's outline.  The 20
 * benchmark pairs scored 0.43-0.99 (fluorescence) and 0.67-0.94 (H&E ->
 * H&E), but H&E -> IHC, fitted on hematoxylin, only 0.24-0.68: that fit
 * gets the lower bound. */
#define GUARD_MIN_STRUCTURE      0.25
#define GUARD_MIN_STRUCTURE_HEMA 0.15
/* A pose under which the reference's tissue correlates with itself this
 * well is one of its symmetries, not a null pose (outline_ncc). */
#define GUARD_SELF_SYMMETRY 0.5
#define GUARD_RESCUE_NCC    0.30 /* an MI rescue of one modality must correlate this well */
/* MI between modalities, nats.  Eight synthetic H&E or IHC references
 * against fluorescence of the same section fitted at 0.44-1.14, against
 * fluorescence of another section at 0.015-0.055; the first bound (0.02)
 * served 5 of those 8 (test_mount_register_modality.py, docs). */
#define GUARD_MIN_MI       0.15
#define GUARD_MAX_SCALE    1.5 /* level-0 scale against the pixel-size ratio */
#define GUARD_MAX_SHEAR    1.5 /* ratio of the linear part's singular values */
#define GUARD_MIN_JACOBIAN 0.1 /* of x -> x + D(x): below it the field (nearly) folds */
#define GUARD_MAX_DISP     0.1 /* largest field displacement, of the thumbnail diagonal */

/* How often a wait looks at the stop flag: a signal handler cannot
 * broadcast a condition variable, so waits time out this often (ns). */
#define STOP_POLL_NS 100000000L
#define STOPPED_WHY  "stopped (unmount)"
/* sf_autoreg_stop runs in signal handlers: the flag must be lock-free. */
_Static_assert(ATOMIC_INT_LOCK_FREE == 2, "atomic_int must be lock-free");

enum slide_stage {
	ST_IDLE,
	ST_QUEUED,
	ST_THUMB,
	ST_AFFINE,
	ST_NONRIGID,
	ST_MICRO,
	ST_DONE,
	ST_FAILED
};

static const char *const stage_text[] = {"waiting for registered/ to be used",
                                         "queued",
                                         "reading its thumbnail",
                                         "affine registration",
                                         "non-rigid registration",
                                         "micro-registration"};

typedef struct slide_job {
	int in_job;      /* registered by this job (else a target only) */
	uint32_t target; /* registered to this slide (the reference, or a neighbour) */
	enum slide_stage stage;
	sf_key key;
	double affine0[9]; /* phase 1: level-0 backward map target px -> this slide px */
	sf_reg_result r;   /* phase 1's fit */
	int metric;        /* the metric that fit used (an NCC miss is retried with MI) */
	int use_hema;      /* brightfield: fitted on the hematoxylin images (autoreg_thumb.h) */
	/* The target's thumbnail remade at this slide's pixel size, when the
	 * shared one is too far from it (make_target_like), else empty.  Only
	 * this slide's own phases touch it, one at a time (phase barriers). */
	autoreg_thumb target_like;
	int affine_ok;
	/* guard_structure's NCCs of r, measured once per fit by phase_affine
	 * (the guard runs for every link of every chain: N^2 / 2 times in
	 * serial order, and one measure costs a few NCCs of the thumbnails). */
	double structure_ncc, structure_null;
	uint32_t skipped; /* serial: the rejected neighbour passed over (UINT32_MAX: none) */
	sf_transform t;   /* the result */
	double jac_min, disp_max;
	double seconds;           /* affine + non-rigid, this slide's own work */
	double t_affine, t_field; /* the two parts (not cached) */
	int has_field, cached;
	char why[512];                             /* ST_FAILED: the reason */
	uint64_t file_size[SF_AUTOREG_FILE_KINDS]; /* + 1: 0 = not known yet */
	/* The small text files once made (kept_kind), NULL before: they never
	 * change, and the .field.mhd header costs the whole field to make. */
	uint8_t *kept[SF_AUTOREG_FILE_KINDS];
	size_t kept_len[SF_AUTOREG_FILE_KINDS];
} slide_job;

struct sf_autoreg {
	const sf_dataset *d;
	uint32_t ref;
	sf_reg_settings s;
	unsigned threads;
	sf_cache *cache;
	char *tdir;
	slide_job *jobs;       /* d->slide_count */
	autoreg_thumb *thumbs; /* d->slide_count; made in phase 0 */

	/* reg_micro: the reference at the micro level, made by the first slide
	 * that needs it (micro_tried) and kept until the job ends. */
	pthread_mutex_t micro_lock; /* guards the two fields below */
	int micro_tried;
	autoreg_thumb micro_ref;

	/* Set by sf_autoreg_stop (maybe in a signal handler) or destroy, never
	 * cleared: read without the lock, so the job's steps and waits see it. */
	atomic_int stopping;

	pthread_mutex_t lock;   /* guards everything below and every jobs[] field after create */
	pthread_cond_t changed; /* on CLOCK_MONOTONIC (wait_changed) */
	int started;
	pthread_t *tids;
	unsigned nthreads;
	uint32_t *queue[PHASES]; /* slide indices per phase */
	uint32_t count[PHASES], next[PHASES], done[PHASES];
};

/* --- settings ------------------------------------------------------------- */

void sf_reg_settings_default(sf_reg_settings *s)
{
	memset(s, 0, sizeof *s);
	s->enabled = 1;
	s->metric = -1;
	s->dim = 1024;
	s->nonrigid_dim = 2000;
	s->micro_dim = 4096;
}

static int parse_dim(const char *value, int zero_ok, uint32_t *out)
{
	char *end;
	unsigned long v;

	if (!isdigit((unsigned char)value[0]))
		return SF_EINVAL;
	v = strtoul(value, &end, 10);
	if (*end || (v == 0 && !zero_ok) || (v != 0 && (v < 64 || v > 8192)))
		return SF_EINVAL;
	*out = (uint32_t)v;
	return SF_OK;
}

static int pick(const char *value, const char *a, const char *b, int *out)
{
	if (!strcmp(value, a))
		*out = 0;
	else if (!strcmp(value, b))
		*out = 1;
	else
		return SF_EINVAL;
	return SF_OK;
}

int sf_reg_settings_apply(sf_reg_settings *s, const char *key, const char *value,
                          const char *origin, sf_err *e)
{
	int v, rc = SF_EINVAL;
	const char *want = "";

	if (!strcmp(key, "reg")) {
		want = "auto or off";
		if ((rc = pick(value, "off", "auto", &v)) == SF_OK)
			s->enabled = v;
	} else if (!strcmp(key, "reg_channel")) {
		want = "a channel name or index (at most 63 characters)";
		if (strlen(value) < sizeof s->channel) {
			snprintf(s->channel, sizeof s->channel, "%s", value);
			rc = SF_OK;
		}
	} else if (!strcmp(key, "reg_metric")) {
		want = "auto, ncc or mi";
		if (!strcmp(value, "auto"))
			s->metric = -1, rc = SF_OK;
		else if ((rc = pick(value, "ncc", "mi", &v)) == SF_OK)
			s->metric = v ? SF_REG_METRIC_MI : SF_REG_METRIC_NCC;
	} else if (!strcmp(key, "reg_dim")) {
		want = "a side length from 64 to 8192";
		rc = parse_dim(value, 0, &s->dim);
	} else if (!strcmp(key, "reg_nonrigid_dim")) {
		want = "0 (no non-rigid step) or a side length from 64 to 8192";
		rc = parse_dim(value, 1, &s->nonrigid_dim);
	} else if (!strcmp(key, "reg_order")) {
		want = "direct or serial";
		if ((rc = pick(value, "direct", "serial", &v)) == SF_OK)
			s->serial = v;
	} else if (!strcmp(key, "reg_eager")) {
		want = "0 or 1";
		if ((rc = pick(value, "0", "1", &v)) == SF_OK)
			s->eager = v;
	} else if (!strcmp(key, "reg_micro")) {
		want = "0 or 1";
		if ((rc = pick(value, "0", "1", &v)) == SF_OK)
			s->micro = v;
	} else if (!strcmp(key, "reg_micro_dim")) {
		want = "a side length from 64 to 8192";
		rc = parse_dim(value, 0, &s->micro_dim);
	} else
		return sf_fail(e, SF_EINVAL, "%sunknown option '%s'", origin, key);
	if (rc != SF_OK)
		return sf_fail(e, SF_EINVAL, "%soption '%s': '%s' is not %s", origin, key, value,
		               want);
	return SF_OK;
}

/* --- file names ------------------------------------------------------------ */

static const char *const file_suffix[SF_AUTOREG_FILE_KINDS] = {
    ".json", ".field.tif", ".elastix.txt", ".elastix-field.txt", ".field.mhd", ".field.raw"};

void sf_autoreg_file_name(sf_autoreg_file_kind k, const char *stem, char *buf, size_t n)
{
	snprintf(buf, n, "%s%s", stem, file_suffix[k]);
}

int sf_autoreg_file_exists(const sf_reg_settings *s, sf_autoreg_file_kind k)
{
	return k == SF_AUTOREG_JSON || k == SF_AUTOREG_ELASTIX || s->nonrigid_dim > 0;
}

/* --- keys and the disk cache ---------------------------------------------- */

static sf_key mix_slide(sf_key k, const sf_slide_info *s)
{
	k = sf_key_mix_str(k, s->path);
	k = sf_key_mix_u64(k, s->file_size);
	return sf_key_mix_u64(k, (uint64_t)s->mtime_ns);
}

/* Everything slide i's result depends on: both slides (every slide of the
 * chain in serial order), the settings that shape it, the code's version. */
static sf_key slide_key(const sf_autoreg *a, uint32_t i)
{
	/* v2: the affine fit stops at reg_dim / 2 when the field follows, and
	 * the refinement extrapolates (docs/registration.md, "Speed-up").
	 * v3: the demons warp and compose in single precision.
	 * v5: a slide whose thumbnail cannot come near the reference's pixel
	 * size is fitted to the reference's thumbnail remade at its own
	 * (make_target_like). */
	sf_key k = sf_key_of("scopefs autoreg v5", 18);
	const sf_reg_settings *s = &a->s;

	k = mix_slide(k, a->d->slides[a->ref]);
	for (uint32_t j = i; j != a->ref; j = a->jobs[j].target)
		k = mix_slide(k, a->d->slides[j]);
	k = sf_key_mix_str(k, s->channel);
	k = sf_key_mix_u64(k, (uint64_t)(s->metric + 1));
	k = sf_key_mix_u64(k, ((uint64_t)s->dim << 32) | s->nonrigid_dim);
	if (s->micro) /* only then: results cached without it stay valid */
		k = sf_key_mix_u64(k, 0x4d4943524full << 24 | s->micro_dim);
	return sf_key_mix_u64(k, (uint64_t)s->serial);
}

/* A result in the cache: this header under mix(key, 1), the field's
 * 2 * fw * fh floats under mix(key, 2). */
typedef struct cached_result {
	uint64_t magic; /* CACHE_MAGIC: layout version */
	double m[9], g[6], vm[4];
	double ncc, mi, overlap, scale, angle, jac_min, disp_max, seconds;
	uint32_t fw, fh, has_field, mirrored;
} cached_result;

/* "SFSAREG2": scale is the level-0 scale since 2026-11-26 (version 1 held
 * the thumbnails' scale, which the status then quoted). */
#define CACHE_MAGIC 0x3247455241534653ull

static int cache_store(sf_autoreg *a, slide_job *j, sf_err *e)
{
	cached_result c = {0};
	const sf_map *mp = &j->t.map;
	int rc;

	c.magic = CACHE_MAGIC;
	memcpy(c.m, mp->m, sizeof c.m);
	c.ncc = j->r.ncc, c.mi = j->r.mi, c.overlap = j->r.overlap, c.scale = j->r.scale;
	c.angle = j->r.angle_deg, c.mirrored = (uint32_t)j->r.mirrored;
	c.jac_min = j->jac_min, c.disp_max = j->disp_max, c.seconds = j->seconds;
	if ((c.has_field = j->has_field)) {
		memcpy(c.g, mp->field[0].g, sizeof c.g);
		memcpy(c.vm, mp->field[0].vm, sizeof c.vm);
		c.fw = mp->field[0].w, c.fh = mp->field[0].h;
		rc = sf_cache_put(a->cache, sf_key_mix_u64(j->key, 2),
		                  (const uint8_t *)mp->field[0].v,
		                  (size_t)c.fw * c.fh * 2 * sizeof(float), 4, e);
		if (rc != SF_OK)
			return rc;
	}
	return sf_cache_put(a->cache, sf_key_mix_u64(j->key, 1), (const uint8_t *)&c, sizeof c, 4,
	                    e);
}

/* SF_OK when slide j's result was in the cache (j->t set), else SF_ENOTFOUND. */
static int cache_load(sf_autoreg *a, slide_job *j, sf_err *e)
{
	cached_result c;
	sf_field_grid *g;
	sf_transform t;
	int rc = sf_cache_get(a->cache, sf_key_mix_u64(j->key, 1), (uint8_t *)&c, sizeof c, e);

	if (rc != SF_OK)
		return rc;
	if (c.magic != CACHE_MAGIC ||
	    (c.has_field && (!c.fw || !c.fh || c.fw > 8192 || c.fh > 8192)))
		return SF_ENOTFOUND;
	sf_transform_init(&t);
	if (c.has_field) {
		if (!(g = sf_field_grid_create(SF_FIELD_LINEAR, c.fw, c.fh, e)))
			return SF_ENOMEM;
		rc = sf_cache_get(a->cache, sf_key_mix_u64(j->key, 2), (uint8_t *)g->v,
		                  (size_t)c.fw * c.fh * 2 * sizeof(float), e);
		if (rc == SF_OK)
			rc = sf_field_grid_finish(g, e);
		if (rc != SF_OK) {
			sf_field_grid_free(g);
			return rc == SF_ENOMEM ? rc : SF_ENOTFOUND;
		}
		if ((rc = sf_transform_then_field(&t, g, c.g, c.vm, e)) != SF_OK)
			return rc;
	}
	if ((rc = sf_transform_then_matrix(&t, c.m, e)) != SF_OK) {
		sf_transform_release(&t);
		return rc;
	}
	j->t = t;
	j->r.ncc = c.ncc, j->r.mi = c.mi, j->r.overlap = c.overlap, j->r.scale = c.scale;
	j->r.angle_deg = c.angle, j->r.mirrored = (int)c.mirrored;
	j->jac_min = c.jac_min, j->disp_max = c.disp_max, j->seconds = c.seconds;
	j->has_field = (int)c.has_field;
	j->cached = 1;
	return SF_OK;
}

/* The scale of a level-0 matrix (moving pixels per reference pixel), as the
 * guard's messages quote it.  The fit's own scale is between thumbnails,
 * whose pixels differ from level 0's whenever the two slides are shrunk by
 * different factors, so the status quoted 0.65 for a 1.30 fit. */
static double level0_scale(const double m0[9])
{
	return sqrt(fabs(m0[0] * m0[4] - m0[1] * m0[3]));
}

/* --- the phases ------------------------------------------------------------- */

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int stopped(sf_autoreg *a)
{
	return atomic_load(&a->stopping);
}

/* Wait on a->changed (lock held) for at most STOP_POLL_NS, so that a stop
 * from a signal handler, which cannot broadcast, is seen soon. */
static void wait_changed(sf_autoreg *a)
{
	struct timespec until;

	clock_gettime(CLOCK_MONOTONIC, &until);
	until.tv_nsec += STOP_POLL_NS;
	if (until.tv_nsec >= 1000000000L) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000L;
	}
	pthread_cond_timedwait(&a->changed, &a->lock, &until);
}

/* S(f): a grid's px -> px of a grid f times finer (thumbnail -> level 0,
 * thumbnail -> micro level), x -> (x + 0.5) f - 0.5 per axis; and its inverse. */
static void ds_matrix(const double ds[2], int inverse, double out[9])
{
	double fx = inverse ? 1.0 / ds[0] : ds[0], fy = inverse ? 1.0 / ds[1] : ds[1];
	double m[9] = {fx, 0, 0.5 * (fx - 1), 0, fy, 0.5 * (fy - 1), 0, 0, 1};
	memcpy(out, m, sizeof m);
}

static int slide_metric(const sf_autoreg *a, uint32_t i)
{
	if (a->s.metric >= 0)
		return a->s.metric;
	return a->thumbs[i].brightfield != a->thumbs[a->jobs[i].target].brightfield
	           ? SF_REG_METRIC_MI
	           : SF_REG_METRIC_NCC;
}

static void set_stage(sf_autoreg *a, uint32_t i, enum slide_stage st)
{
	pthread_mutex_lock(&a->lock);
	a->jobs[i].stage = st;
	pthread_cond_broadcast(&a->changed);
	pthread_mutex_unlock(&a->lock);
}

/* Threads for one slide's registration in phase ph: the job's threads
 * shared by the slides of that phase not yet done, so a lone pair uses all
 * of them and eight slides one each.  The result does not depend on it
 * (register.h). */
static unsigned inner_threads(sf_autoreg *a, int ph)
{
	pthread_mutex_lock(&a->lock);
	uint32_t left = a->count[ph] - a->done[ph];
	uint32_t busy = left < a->threads ? left : a->threads;
	pthread_mutex_unlock(&a->lock);
	unsigned t = busy ? a->threads / busy : 1;
	return t ? t : 1;
}

/* Slide i failed: keep the reason (the first one) for status and waiters. */
static void fail_slide(sf_autoreg *a, uint32_t i, const char *why)
{
	pthread_mutex_lock(&a->lock);
	if (a->jobs[i].stage != ST_FAILED) {
		a->jobs[i].stage = ST_FAILED;
		snprintf(a->jobs[i].why, sizeof a->jobs[i].why, "%s", why);
		sf_log(SF_LOG_WARN, "registration of %s: %s", a->d->slides[i]->path, why);
	}
	pthread_cond_broadcast(&a->changed);
	pthread_mutex_unlock(&a->lock);
}

/* The longest side of the registration thumbnails (the two fits' larger). */
static uint32_t thumb_dim(const sf_autoreg *a)
{
	return a->s.dim > a->s.nonrigid_dim ? a->s.dim : a->s.nonrigid_dim;
}

static void phase_thumb(sf_autoreg *a, uint32_t i)
{
	uint32_t dim = thumb_dim(a);
	const sf_slide_info *ref = a->d->slides[a->ref];
	double like_um = i == a->ref ? 0 : autoreg_thumb_um(ref, dim);
	double t0 = now_s();
	sf_err e = {0};

	if (stopped(a)) {
		fail_slide(a, i, STOPPED_WHY);
		return;
	}
	if (a->jobs[i].in_job)
		set_stage(a, i, ST_THUMB);
	if (autoreg_thumb_make(a->d->slides[i], like_um, a->s.channel, dim, &a->thumbs[i], &e) !=
	    SF_OK)
		fail_slide(a, i, e.msg);
	else
		sf_log(SF_LOG_INFO, "registration thumbnail of %s: %ux%u in %.2f s",
		       a->d->slides[i]->path, a->thumbs[i].im.w, a->thumbs[i].im.h, now_s() - t0);
}

/* Micrometres per pixel of thumbnail t of slide s (0 when unknown). */
static double thumb_um(const sf_slide_info *s, const autoreg_thumb *t)
{
	return s->pixel_size_x > 0 ? s->pixel_size_x * t->ds[0] : 0;
}

/* The thumbnail slide i is fitted to: its target's, remade at slide i's
 * pixel size when needed (make_target_like). */
static const autoreg_thumb *pair_target(const sf_autoreg *a, uint32_t i)
{
	const slide_job *j = &a->jobs[i];
	return j->target_like.im.px ? &j->target_like : &a->thumbs[j->target];
}

/* The reference's thumbnail slide i's field and transform are made on: the
 * fit's own when that was against the reference (its map holds for no
 * other), else the shared one, which a serial chain's product reaches. */
static const autoreg_thumb *finish_ref(const sf_autoreg *a, uint32_t i)
{
	return a->jobs[i].target == a->ref ? pair_target(a, i) : &a->thumbs[a->ref];
}

/* Slide i's thumbnail is made at the pixel size closest to the
 * reference's, but it cannot be finer than the slide's finest level: a
 * moving slide at 1.0 um against a 0.5 um reference kept a 2x scale gap,
 * beyond the similarity search's 1.6x, and was refused (NCC 0.04).  When
 * the two thumbnails end up more than LIKE_MAX_GAP apart, the target's is
 * remade for this pair at slide i's pixel size (the target can always be
 * shrunk further).  A failure to make it keeps the shared thumbnail. */
#define LIKE_MAX_GAP 1.3
static void make_target_like(sf_autoreg *a, uint32_t i)
{
	slide_job *j = &a->jobs[i];
	const sf_slide_info *ts = a->d->slides[j->target];
	double tu = thumb_um(ts, &a->thumbs[j->target]);
	double mu = thumb_um(a->d->slides[i], &a->thumbs[i]);
	sf_err e = {0};

	autoreg_thumb_free(&j->target_like); /* a refit (relink_slide) has a new target */
	if (tu <= 0 || mu <= 0 || fabs(log(mu / tu)) <= log(LIKE_MAX_GAP))
		return;
	if (autoreg_thumb_make(ts, mu, a->s.channel, thumb_dim(a), &j->target_like, &e) != SF_OK) {
		sf_log(
		    SF_LOG_WARN,
		    "registration of %s: %s; fitted to the shared thumbnail, %.2fx apart in scale",
		    a->d->slides[i]->path, e.msg, mu / tu);
		return;
	}
	double lu = thumb_um(ts, &j->target_like);
	if (fabs(log(mu / lu)) >= fabs(log(mu / tu)) - 1e-9) { /* no nearer: keep the shared one */
		autoreg_thumb_free(&j->target_like);
		return;
	}
	sf_log(SF_LOG_INFO,
	       "registration of %s: its thumbnail is %.3g um/px, %s's %.3g: fitted to a %ux%u "
	       "thumbnail of %s at %.3g um/px",
	       a->d->slides[i]->path, mu, a->d->slide_stems[j->target], tu, j->target_like.im.w,
	       j->target_like.im.h, a->d->slide_stems[j->target], lu);
}

/* The finest level of slide i's affine fit: reg_dim, or half of it when
 * the non-rigid field follows (same modality, reg_nonrigid_dim > 0).  The
 * demons start coarse and take up what the affine fit leaves: on the
 * benchmark pairs stopping one level coarser kept the median TRE (0.106
 * against 0.107 px), lowered the per-pair 90th percentile (median 0.39
 * against 0.50 px) and cut the affine fit's CPU time by 40%. */
static uint32_t affine_dim(const sf_autoreg *a, uint32_t i)
{
	int field = a->s.nonrigid_dim > 0 && /* as phase_finish decides */
	            a->thumbs[i].brightfield == a->thumbs[a->ref].brightfield;
	uint32_t dim = field ? a->s.dim / 2 : a->s.dim;
	return dim >= 64 ? dim : 64;
}

/* Whether slide i's match is judged by NCC: always between slides of one
 * modality (an MI fit of one stain must still correlate: unrelated tissue
 * reaches MI 0.012 but NCC 0.01), and whenever NCC is the metric. */
static int judged_by_ncc(const sf_autoreg *a, uint32_t i, int metric)
{
	return metric == SF_REG_METRIC_NCC ||
	       a->thumbs[i].brightfield == a->thumbs[a->jobs[i].target].brightfield;
}

/* Whether fit r matched too little to be served (the guard's first tests). */
static int weak_match(const sf_reg_result *r, int by_ncc)
{
	return r->overlap < GUARD_MIN_OVERLAP ||
	       (by_ncc ? r->ncc < GUARD_MIN_NCC : r->mi < GUARD_MIN_MI);
}

/* One fit of mov to ref on a pair of grey images (fit_run).  The first
 * fit uses the slide's metric.  When that is NCC, the metric was not
 * forced, and it matched too little, a rescue fit follows with MI: an NCC
 * search can rank a wrong candidate first (a torn piece, tissue cut by the
 * frame); MI's search tries more of them.  The rescue is kept only when it
 * matches: between slides of one modality with NCC at least
 * GUARD_RESCUE_NCC (the MI search, free to shear, lifted two unrelated
 * synthetic tissues to NCC 0.125; a true rescue reaches 0.9). */
typedef struct fit_job {
	const sf_autoreg *a;
	uint32_t i;
	const sf_reg_image *ref, *mov;
	const uint8_t *mask;
	unsigned threads;
	int rescue;      /* run the MI rescue (else the first fit) */
	sf_reg_result r; /* the fit (a rescue replaces it only when it matches) */
	int metric, rc;  /* r's metric; rc of the first fit */
	sf_err e;
} fit_job;

/* Whether the first fit of job j asks for the MI rescue. */
static int wants_rescue(const fit_job *j)
{
	return j->rc == SF_OK && j->a->s.metric < 0 && j->metric == SF_REG_METRIC_NCC &&
	       weak_match(&j->r, judged_by_ncc(j->a, j->i, j->metric));
}

/* Whether job j holds an NCC fit that matched: an MI rescue of the other
 * image of a brightfield pair can then never win (phase_affine's rule). */
static int strong_ncc(const fit_job *j)
{
	return j->rc == SF_OK && j->metric == SF_REG_METRIC_NCC &&
	       !weak_match(&j->r, judged_by_ncc(j->a, j->i, j->metric));
}

static void *fit_run(void *arg)
{
	fit_job *j = arg;
	const sf_autoreg *a = j->a;
	uint32_t side = j->ref->w > j->ref->h ? j->ref->w : j->ref->h;
	uint32_t dim = affine_dim(a, j->i);
	sf_reg_opts o;

	sf_reg_opts_default(&o);
	o.model = SF_REG_AFFINE;
	o.metric = j->rescue ? SF_REG_METRIC_MI : slide_metric(a, j->i);
	o.max_dim = side > dim ? dim : 0;
	o.threads = j->threads;
	if (!j->rescue) {
		j->metric = o.metric;
		j->rc = sf_reg_register(j->ref, j->mask, j->mov, &o, &j->r, &j->e);
		return NULL;
	}
	sf_reg_result mi;
	sf_err e;
	int by_ncc = judged_by_ncc(a, j->i, o.metric);
	if (sf_reg_register(j->ref, j->mask, j->mov, &o, &mi, &e) == SF_OK &&
	    !weak_match(&mi, by_ncc) && (!by_ncc || mi.ncc >= GUARD_RESCUE_NCC)) {
		j->r = mi;
		j->metric = o.metric;
	}
	return NULL;
}

/* Jobs x and (may be NULL) y side by side, sharing `threads`: y on a thread
 * of its own, x on the caller's (one after the other when that thread
 * cannot start). */
static void fit_both(fit_job *x, fit_job *y, unsigned threads)
{
	pthread_t tid;
	int apart = 0;
	x->threads = threads;
	if (y && threads >= 2) {
		y->threads = threads / 2;
		x->threads = threads - y->threads;
		apart = !pthread_create(&tid, NULL, fit_run, y);
	}
	fit_run(x);
	if (apart)
		pthread_join(tid, NULL);
	else if (y) {
		y->threads = threads;
		fit_run(y);
	}
}

static void structure_measure(sf_autoreg *a, uint32_t i);

/* Slide i to its target: the fit on thumbnails, then the level-0 matrix.
 * Two brightfield slides are fitted on total optical density and on the
 * hematoxylin channel, and the better NCC wins: total density carries
 * more structure between sections of one stain, hematoxylin is what H&E
 * and an IHC counterstain share. */
static void phase_affine(sf_autoreg *a, uint32_t i)
{
	slide_job *j = &a->jobs[i];
	const autoreg_thumb *ref = &a->thumbs[j->target], *mov = &a->thumbs[i];
	double t0 = now_s();
	sf_transform t;
	sf_err e = {0};
	char why[600];
	int rc;

	if (stopped(a)) {
		fail_slide(a, i, STOPPED_WHY);
		return;
	}
	if (!ref->im.px || !mov->im.px) {
		snprintf(why, sizeof why, "no thumbnail of %s",
		         a->d->slides[ref->im.px ? i : j->target]->path);
		fail_slide(a, i, why);
		return;
	}
	set_stage(a, i, ST_AFFINE);
	make_target_like(a, i);
	ref = pair_target(a, i);
	/* The fits of a brightfield pair's two images are independent: they
	 * run side by side, sharing the threads.  A rescue is run only where
	 * it can change the outcome: never when the other image's NCC fit
	 * matched, since an NCC fit beats an MI rescue (the rule below). */
	unsigned threads = inner_threads(a, PHASE_AFFINE);
	/* The second pair of images: hematoxylin on every brightfield side.
	 * Against fluorescence that is the brightfield slide's nuclei stain
	 * against DAPI: IHC's total density, DAB included, matched DAPI in one
	 * synthetic pair of four, its hematoxylin in all four. */
	int two = ref->hema.px || mov->hema.px;
	int cross = ref->brightfield != mov->brightfield;
	fit_job fi, fh;
	memset(&fi, 0, sizeof fi);
	fi.a = a, fi.i = i, fi.ref = &ref->im, fi.mov = &mov->im, fi.mask = ref->mask;
	fh = fi;
	fh.ref = ref->hema.px ? &ref->hema : &ref->im;
	fh.mov = mov->hema.px ? &mov->hema : &mov->im;
	fit_both(&fi, two ? &fh : NULL, threads);
	if (stopped(a)) { /* before the rescue fits */
		fail_slide(a, i, STOPPED_WHY);
		return;
	}
	fi.rescue = wants_rescue(&fi) && !(two && strong_ncc(&fh));
	fh.rescue = two && wants_rescue(&fh) && !strong_ncc(&fi);
	if (fi.rescue || fh.rescue)
		fit_both(fi.rescue ? &fi : &fh, fi.rescue && fh.rescue ? &fh : NULL, threads);
	rc = fi.rc;
	e = fi.e;
	j->r = fi.r, j->metric = fi.metric;
	j->use_hema = 0; /* a refit (relink_slide) may go the other way */
	if (rc == SF_OK && two) {
		const sf_reg_result rh = fh.r;
		int mh = fh.metric;
		/* An NCC fit beats an MI rescue; between NCC fits the higher NCC
		 * wins; across modalities (both MI, judged by MI) the higher MI. */
		if (fh.rc == SF_OK && !weak_match(&rh, judged_by_ncc(a, i, mh)) &&
		    (weak_match(&j->r, judged_by_ncc(a, i, j->metric)) ||
		     (mh == SF_REG_METRIC_NCC && j->metric == SF_REG_METRIC_MI) ||
		     (mh == j->metric && (cross ? rh.mi > j->r.mi : rh.ncc > j->r.ncc)))) {
			j->r = rh, j->metric = mh;
			j->use_hema = 1;
		}
	}
	if (rc != SF_OK || sf_reg_to_transform(j->r.m, ref->ds, mov->ds, &t, &e) != SF_OK) {
		fail_slide(a, i, e.msg);
		return;
	}
	memcpy(j->affine0, t.map.m, sizeof j->affine0);
	j->r.scale = level0_scale(j->affine0); /* the status quotes this one */
	sf_transform_release(&t);
	structure_measure(a, i);
	j->t_affine = now_s() - t0;
	j->seconds = j->t_affine;
	j->affine_ok = 1;
}

/* Singular values of the 2x2 linear part of m (row-major 3x3). */
static void singular_values(const double m[9], double *smax, double *smin)
{
	double a = m[0], b = m[1], c = m[3], d = m[4];
	double s1 = a * a + b * b + c * c + d * d, det = fabs(a * d - b * c);
	double disc = sqrt(fmax(s1 * s1 - 4 * det * det, 0));

	*smax = sqrt((s1 + disc) / 2);
	*smin = sqrt(fmax((s1 - disc) / 2, 0));
}

/* NCC of ref against mov(m x) (bilinear) over the pixels of a grid about
 * 512 samples across that are tissue in both slides (mask; mov_mask at the
 * nearest pixel of the source, which lies inside mov): tissue missing from
 * one section (torn, cut by the frame) does not count.  *overlap receives
 * their share of the grid's mask pixels.  0 when fewer than 16 count or
 * either side is flat. */
static double ncc_sampled(const sf_reg_image *ref, const uint8_t *mask, const sf_reg_image *mov,
                          const uint8_t *mov_mask, const double m[9], double *overlap)
{
	uint32_t side = ref->w > ref->h ? ref->w : ref->h, st = side / 512 ? side / 512 : 1;
	double sa = 0, sb = 0, saa = 0, sbb = 0, sab = 0, n = 0, in_mask = 0;

	for (uint32_t y = 0; y < ref->h; y += st)
		for (uint32_t x = 0; x < ref->w; x += st) {
			if (mask && !mask[(size_t)y * ref->w + x])
				continue;
			in_mask++;
			double u = m[0] * x + m[1] * y + m[2], v = m[3] * x + m[4] * y + m[5];
			if (!(u >= 0 && v >= 0 && u <= mov->w - 1.0 && v <= mov->h - 1.0) ||
			    !mov_mask[(size_t)(v + 0.5) * mov->w + (size_t)(u + 0.5)])
				continue;
			uint32_t x0 = (uint32_t)u < mov->w - 1 ? (uint32_t)u : mov->w - 2;
			uint32_t y0 = (uint32_t)v < mov->h - 1 ? (uint32_t)v : mov->h - 2;
			double fx = u - x0, fy = v - y0, ra = ref->px[(size_t)y * ref->w + x];
			const float *p = mov->px + (size_t)y0 * mov->w + x0;
			double b = (1 - fy) * ((1 - fx) * p[0] + fx * p[1]) +
			           fy * ((1 - fx) * p[mov->w] + fx * p[mov->w + 1]);
			sa += ra, sb += b, saa += ra * ra, sbb += b * b, sab += ra * b, n++;
		}
	*overlap = in_mask > 0 ? n / in_mask : 0;
	if (n < 16)
		return 0;
	double va = saa - sa * sa / n, vb = sbb - sb * sb / n;
	return va > 0 && vb > 0 ? (sab - sa * sb / n) / sqrt(va * vb) : 0;
}

/* The best NCC of map m with the reference turned by 90, 180 or 270
 * degrees or mirrored (any of the 7) about its tissue's centroid: what the
 * tissue outline and the stain's bulk give any pose, since turned the
 * slide's structure no longer lines up.  Poses that leave under
 * GUARD_MIN_OVERLAP of the tissue inside the slide do not count (too few
 * pixels to say anything), nor do the reference's own symmetries: a pose
 * under which the reference correlates with itself at GUARD_SELF_SYMMETRY
 * or more (a coronal section mirrored) lines a true fit's structure up as
 * well as the fit does, and would refuse it.  0 when none is left. */
static double outline_ncc(const sf_reg_image *ref, const uint8_t *mask, const sf_reg_image *mov,
                          const uint8_t *mov_mask, const double m[9])
{
	static const double turn[4][2] = {{1, 0}, {0, 1}, {-1, 0}, {0, -1}}; /* cos, sin */
	double cx = 0, cy = 0, cn = 0, best = 0;

	for (uint32_t y = 0; y < ref->h; y++)
		for (uint32_t x = 0; x < ref->w; x++)
			if (mask[(size_t)y * ref->w + x])
				cx += x, cy += y, cn++;
	if (cn == 0)
		return 0;
	cx /= cn, cy /= cn;
	for (int k = 1; k < 8; k++) {
		double c = turn[k & 3][0], s = turn[k & 3][1], f = k >= 4 ? -1 : 1;
		/* P: x -> R (F (x - c)) + c, F the mirror x -> -x when f < 0 */
		double p[9] = {c * f, -s, 0, s * f, c, 0, 0, 0, 1}, mp[9], overlap;
		p[2] = cx - p[0] * cx - p[1] * cy, p[5] = cy - p[3] * cx - p[4] * cy;
		if (ncc_sampled(ref, mask, ref, mask, p, &overlap) >= GUARD_SELF_SYMMETRY)
			continue;
		sf_mat3_mul(m, p, mp);
		double ncc = ncc_sampled(ref, mask, mov, mov_mask, mp, &overlap);
		if (overlap >= GUARD_MIN_OVERLAP && ncc > best)
			best = ncc;
	}
	return best;
}

/* The share of what the null pose leaves (1 - null) that the fit explains. */
static double structure(double ncc, double null)
{
	return null < 1 ? (ncc - null) / (1 - null) : 0;
}

/* The least structure a fit must show: lower on the hematoxylin images,
 * which an IHC slide shares with H&E only in part. */
static double structure_bound(int use_hema)
{
	return use_hema ? GUARD_MIN_STRUCTURE_HEMA : GUARD_MIN_STRUCTURE;
}

/* Measure, once per fit, whether slide i's fit lines up the tissue's
 * structure, not just its outline: an affine fit can stretch and turn a
 * section of another tissue until the outlines meet (NCC 0.2-0.28), about
 * what the same images give turned or mirrored (outline_ncc).  A true fit
 * explains most of what that leaves.  The two NCCs, on the images the fit
 * used, go to the job (structure_ncc, structure_null); with nothing to
 * judge by (never after a finished phase 1) the fit passes. */
static void structure_measure(sf_autoreg *a, uint32_t i)
{
	slide_job *j = &a->jobs[i];
	const autoreg_thumb *rt = pair_target(a, i), *mt = &a->thumbs[i];
	const sf_reg_image *ref = j->use_hema && rt->hema.px ? &rt->hema : &rt->im;
	const sf_reg_image *mov = j->use_hema && mt->hema.px ? &mt->hema : &mt->im;
	double overlap;

	j->structure_ncc = 1, j->structure_null = 0;
	if (!ref->px || !mov->px || !rt->mask || !mt->mask)
		return;
	j->structure_ncc = ncc_sampled(ref, rt->mask, mov, mt->mask, j->r.m, &overlap);
	j->structure_null = outline_ncc(ref, rt->mask, mov, mt->mask, j->r.m);
	sf_log(SF_LOG_DEBUG, "guard of %s: NCC %.3f, turned or mirrored %.3f, structure %.3f",
	       a->d->slides[i]->path, j->structure_ncc, j->structure_null,
	       structure(j->structure_ncc, j->structure_null));
}

/* Whether slide i's fit passed structure_measure; *ncc and *null receive
 * its two NCCs. */
static int guard_structure(const sf_autoreg *a, uint32_t i, double *ncc, double *null)
{
	const slide_job *j = &a->jobs[i];

	*ncc = j->structure_ncc, *null = j->structure_null;
	return structure(*ncc, *null) >= structure_bound(j->use_hema);
}

static const char *file_name(const sf_slide_info *s)
{
	const char *slash = strrchr(s->path, '/');
	return slash ? slash + 1 : s->path;
}

/* The guard's words for a transform that scales slide i by `scale` where
 * `expect` was expected.  With a pixel size unknown, expect is 1 only for
 * want of one, and stating it is the fix: a slide at 0.325 um with no size
 * against a 0.5 um reference was refused as if its metadata said 1.00. */
static void scale_why(const sf_autoreg *a, uint32_t i, double scale, double expect, char *why,
                      size_t n)
{
	const sf_slide_info *ref = a->d->slides[a->ref], *mov = a->d->slides[i];
	const char *head = "rejected: the transform scales the slide by";
	const char *fix = "(OME PhysicalSizeX) or give a transform file";

	if (ref->pixel_size_x > 0 && mov->pixel_size_x > 0)
		snprintf(why, n, "%s %.2f (pixel sizes say %.2f)", head, scale, expect);
	else if (ref->pixel_size_x > 0 || mov->pixel_size_x > 0)
		snprintf(why, n,
		         "%s %.2f; %s's pixel size is unknown, so %.2f was expected: state its "
		         "pixel size %s",
		         head, scale, file_name(mov->pixel_size_x > 0 ? ref : mov), expect, fix);
	else
		snprintf(why, n,
		         "%s %.2f; the pixel sizes of %s and %s are unknown, so %.2f was expected: "
		         "state them %s",
		         head, scale, file_name(mov), file_name(ref), expect, fix);
}

/* Why the affine part of slide i (level-0 matrix m0) is not served, or NULL. */
static const char *guard_affine(const sf_autoreg *a, uint32_t i, const sf_reg_result *r, int metric,
                                const double m0[9], char *why, size_t n)
{
	const sf_slide_info *ref = a->d->slides[a->ref], *mov = a->d->slides[i];
	double expect = 1, smax, smin, scale, ncc, null;

	if (ref->pixel_size_x > 0 && mov->pixel_size_x > 0)
		expect = ref->pixel_size_x / mov->pixel_size_x;
	singular_values(m0, &smax, &smin);
	scale = sqrt(smax * smin) / expect;
	if (r->overlap < GUARD_MIN_OVERLAP)
		snprintf(why, n, "rejected: the slides overlap on only %.0f%% of the tissue",
		         100 * r->overlap);
	else if (judged_by_ncc(a, i, metric) && r->ncc < GUARD_MIN_NCC)
		snprintf(why, n, "rejected: no convincing match (NCC %.3f < %.2f)", r->ncc,
		         GUARD_MIN_NCC);
	else if (!judged_by_ncc(a, i, metric) && r->mi < GUARD_MIN_MI)
		snprintf(why, n, "rejected: no convincing match (mutual information %.4f < %.3f)",
		         r->mi, GUARD_MIN_MI);
	else if (judged_by_ncc(a, i, metric) && !guard_structure(a, i, &ncc, &null))
		snprintf(why, n,
		         "rejected: no convincing match, the tissue's structure does not line up "
		         "(NCC %.3f where both are tissue, %.3f with the slide turned or mirrored: "
		         "structure %.2f < %.2f)",
		         ncc, null, structure(ncc, null), structure_bound(a->jobs[i].use_hema));
	else if (scale > GUARD_MAX_SCALE || scale < 1 / GUARD_MAX_SCALE)
		scale_why(a, i, scale * expect, expect, why, n);
	else if (smin <= 0 || smax / smin > GUARD_MAX_SHEAR)
		snprintf(why, n, "rejected: the transform shears the slide (axis ratio %.2f)",
		         smin > 0 ? smax / smin : INFINITY);
	else
		return NULL;
	return why;
}

/* The level-0 matrix from the reference to slide i: its own fit, then
 * (serial) each link of the chain towards the reference.  NULL when a link
 * failed, with the reason in why. */
/* The level-0 matrix from the reference to slide k along its chain, links unchecked. */
static void chain_product(const sf_autoreg *a, uint32_t k, double m0[9])
{
	memcpy(m0, a->jobs[k].affine0, 9 * sizeof *m0);
	for (uint32_t j = a->jobs[k].target; j != a->ref; j = a->jobs[j].target)
		sf_mat3_mul(m0, a->jobs[j].affine0, m0);
}

static const char *chain_matrix(sf_autoreg *a, uint32_t i, double m0[9], char *why, size_t n)
{
	for (uint32_t j = a->jobs[i].target; j != a->ref; j = a->jobs[j].target) {
		char link_why[400];
		double link_m0[9];
		/* A link whose own fit the guard rejects (a blank or damaged
		 * section) fails its followers too: say so, rather than report
		 * their fit against it (0 % overlap) as if it were theirs.  Every
		 * later link is one of i's too, so each is checked once here with
		 * its own product, not through a chain of its own. */
		const char *bad = !a->jobs[j].affine_ok ? "it failed" : NULL;
		if (!bad) {
			chain_product(a, j, link_m0);
			if (guard_affine(a, j, &a->jobs[j].r, a->jobs[j].metric, link_m0, link_why,
			                 sizeof link_why))
				bad = link_why;
		}
		if (bad) {
			snprintf(why, n,
			         "rejected: registered in serial order through its neighbour %s, "
			         "which was not registered (%s)",
			         a->d->slide_stems[j], bad);
			return why;
		}
	}
	chain_product(a, i, m0);
	return NULL;
}

/* The reference at the micro level, made once (micro_lock). */
static const autoreg_thumb *micro_reference(sf_autoreg *a, sf_err *e)
{
	const autoreg_thumb *t = NULL;

	pthread_mutex_lock(&a->micro_lock);
	if (!a->micro_tried) {
		a->micro_tried = 1;
		if (autoreg_thumb_make(a->d->slides[a->ref], 0, a->s.channel, a->s.micro_dim,
		                       &a->micro_ref, e) != SF_OK)
			autoreg_thumb_free(&a->micro_ref);
	}
	if (a->micro_ref.im.px)
		t = &a->micro_ref;
	else if (!e->msg[0])
		sf_fail(e, SF_EIO, "%s: no micro-level image", a->d->slides[a->ref]->path);
	pthread_mutex_unlock(&a->micro_lock);
	return t;
}

/* reg_micro: refine coarse field f (on the thumbnails, map m) at the micro
 * level, tile by tile (register_micro.h), and build t from the result.
 * SF_OK with t built; otherwise t is untouched and e says why (the caller
 * keeps the coarse field: the micro pass only refines). */
static int fit_micro(sf_autoreg *a, uint32_t i, const double m[9], const sf_reg_field *f,
                     sf_transform *t, sf_err *e)
{
	const autoreg_thumb *ref = finish_ref(a, i), *mov = &a->thumbs[i], *mref;
	autoreg_thumb mm = {0};
	sf_reg_micro_opts mo;
	sf_reg_field fm = {0};
	sf_transform tm;
	double fr[2], fv[2], sr_inv[9], sv[9], mmic[9];
	int hema = a->jobs[i].use_hema, rc;

	if (stopped(a))
		return sf_fail(e, SF_EINTR, STOPPED_WHY); /* phase_finish then caches nothing */
	set_stage(a, i, ST_MICRO);
	if (!(mref = micro_reference(a, e)))
		return SF_EIO;
	if (stopped(a))
		return sf_fail(e, SF_EINTR, STOPPED_WHY);
	rc = autoreg_thumb_make(a->d->slides[i],
	                        autoreg_thumb_um(a->d->slides[a->ref], a->s.micro_dim),
	                        a->s.channel, a->s.micro_dim, &mm, e);
	if (rc != SF_OK)
		return rc;
	for (int k = 0; k < 2; k++)
		fr[k] = ref->ds[k] / mref->ds[k], fv[k] = mov->ds[k] / mm.ds[k];
	ds_matrix(fr, 1, sr_inv); /* S(f) between a grid and one f times finer */
	ds_matrix(fv, 0, sv);
	sf_mat3_mul(m, sr_inv, mmic);
	sf_mat3_mul(sv, mmic, mmic);
	sf_reg_micro_opts_default(&mo);
	mo.demons.threads = inner_threads(a, PHASE_FINISH);
	mo.demons.stop = &a->stopping; /* ends the tile now under way: SF_EINTR */
	rc = sf_reg_micro(hema && mref->hema.px ? &mref->hema : &mref->im, mref->mask,
	                  hema && mm.hema.px ? &mm.hema : &mm.im, mmic, f, sqrt(fr[0] * fr[1]), &mo,
	                  &fm, e);
	if (rc == SF_OK && (fm.jac_min < GUARD_MIN_JACOBIAN ||
	                    fm.disp_max > GUARD_MAX_DISP * hypot(mref->im.w, mref->im.h)))
		rc = sf_fail(e, SF_ERANGE, "the micro field folds or moves too far (Jacobian %.3f)",
		             fm.jac_min);
	if (rc == SF_OK &&
	    (rc = sf_reg_to_transform_field(mmic, &fm, mref->ds, mm.ds, &tm, e)) == SF_OK) {
		sf_transform_release(t);
		*t = tm;
		a->jobs[i].jac_min = fm.jac_min;
		a->jobs[i].disp_max = fm.disp_max * mref->ds[0];
	}
	sf_reg_field_free(&fm);
	autoreg_thumb_free(&mm);
	return rc;
}

/* The non-rigid step and the transform for thumbnail map m (reference
 * thumbnail px -> slide i thumbnail px).  NULL on success, else why. */
static const char *fit_field(sf_autoreg *a, uint32_t i, const double m[9], sf_transform *t,
                             char *why, size_t n)
{
	const autoreg_thumb *ref = finish_ref(a, i), *mov = &a->thumbs[i];
	uint32_t side = ref->im.w > ref->im.h ? ref->im.w : ref->im.h;
	double diag = hypot(ref->im.w, ref->im.h);
	sf_reg_nonrigid_opts no;
	sf_reg_field f = {0};
	sf_err e = {0};
	int rc;

	sf_reg_nonrigid_opts_default(&no);
	no.step = (side + a->s.nonrigid_dim - 1) / a->s.nonrigid_dim;
	no.step = no.step ? no.step : 1;
	/* The field's finest level is the thumbnail itself (the core's default
	 * stops at 1024 px): on the benchmark pairs this brings the median TRE
	 * from 0.13 to 0.11 px, and 10 iterations there do what 30 did. */
	no.max_dim = 0;
	no.iter_fine = 10;
	no.threads = inner_threads(a, PHASE_FINISH);
	no.stop = &a->stopping; /* a shutdown ends the demons between iterations */
	set_stage(a, i, ST_NONRIGID);
	rc = a->jobs[i].use_hema
	         ? sf_reg_nonrigid(&ref->hema, ref->mask, &mov->hema, m, &no, &f, &e)
	         : sf_reg_nonrigid(&ref->im, ref->mask, &mov->im, m, &no, &f, &e);
	if (rc == SF_OK && f.jac_min < GUARD_MIN_JACOBIAN)
		snprintf(why, n, "rejected: the non-rigid field folds the tissue (Jacobian %.3f)",
		         f.jac_min);
	else if (rc == SF_OK && f.disp_max > GUARD_MAX_DISP * diag)
		snprintf(why, n,
		         "rejected: the non-rigid field moves tissue %.0f thumbnail px "
		         "(over %.0f%% of the diagonal)",
		         f.disp_max, 100 * GUARD_MAX_DISP);
	else if (rc == SF_OK && a->s.micro && fit_micro(a, i, m, &f, t, &e) == SF_OK) {
		a->jobs[i].has_field = 1;
		sf_reg_field_free(&f);
		return NULL;
	} else if (rc == SF_OK &&
	           (rc = sf_reg_to_transform_field(m, &f, ref->ds, mov->ds, t, &e)) == SF_OK) {
		if (a->s.micro)
			sf_log(SF_LOG_WARN, "%s: micro-registration skipped, the field is kept: %s",
			       a->d->slides[i]->path, e.msg);
		a->jobs[i].jac_min = f.jac_min;
		a->jobs[i].disp_max = f.disp_max * ref->ds[0];
		a->jobs[i].has_field = 1;
		sf_reg_field_free(&f);
		return NULL;
	}
	if (rc != SF_OK)
		snprintf(why, n, "%s", e.msg);
	sf_reg_field_free(&f);
	return why;
}

/* Slide i's transform to the reference: compose, guard, field, cache. */
static void finish_slide(sf_autoreg *a, uint32_t i)
{
	slide_job *j = &a->jobs[i];
	const autoreg_thumb *ref = finish_ref(a, i), *mov = &a->thumbs[i];
	int metric = j->metric, same_modality = ref->brightfield == mov->brightfield;
	double t0 = now_s(), m0[9], m[9], sref[9], smov_inv[9];
	char why[512];
	sf_transform t;
	sf_err e = {0};

	if (!j->affine_ok)
		return; /* failed in phase 1, reason kept */
	if (stopped(a)) {
		fail_slide(a, i, STOPPED_WHY);
		return;
	}
	if (chain_matrix(a, i, m0, why, sizeof why) ||
	    guard_affine(a, i, &j->r, metric, m0, why, sizeof why)) {
		fail_slide(a, i, why);
		return;
	}
	/* The thumbnail map against the reference (direct: the fit itself). */
	ds_matrix(ref->ds, 0, sref);
	ds_matrix(mov->ds, 1, smov_inv);
	if (j->target == a->ref)
		memcpy(m, j->r.m, sizeof m);
	else {
		sf_mat3_mul(m0, sref, m);
		sf_mat3_mul(smov_inv, m, m);
	}
	sf_transform_init(&t);
	if (a->s.nonrigid_dim > 0 && same_modality) {
		if (fit_field(a, i, m, &t, why, sizeof why)) {
			fail_slide(a, i, why);
			return;
		}
	} else if (sf_reg_to_transform(m, ref->ds, mov->ds, &t, &e) != SF_OK) {
		fail_slide(a, i, e.msg);
		return;
	}
	/* A stop during the field may have cut a step short (the micro pass
	 * then keeps the coarse field): such a result is neither served nor
	 * cached, since the cache key promises the full one. */
	if (stopped(a)) {
		sf_transform_release(&t);
		fail_slide(a, i, STOPPED_WHY);
		return;
	}
	j->t_field = now_s() - t0;
	j->seconds += j->t_field;
	sf_log(SF_LOG_INFO, "registered %s: affine %.2f s, non-rigid %.2f s", a->d->slides[i]->path,
	       j->t_affine, j->t_field);
	pthread_mutex_lock(&a->lock);
	j->t = t;
	j->stage = ST_DONE;
	pthread_cond_broadcast(&a->changed);
	pthread_mutex_unlock(&a->lock);
	if (cache_store(a, j, &e) != SF_OK)
		sf_log(SF_LOG_WARN, "registration of %s: not cached: %s", a->d->slides[i]->path,
		       e.msg);
}

/* The last phase of slide i, after which its pair thumbnail is not read. */
static void phase_finish(sf_autoreg *a, uint32_t i)
{
	finish_slide(a, i);
	autoreg_thumb_free(&a->jobs[i].target_like);
}

/* Whether slide k cannot be a link of a chain: its own fit failed or the
 * guard rejects it (a blank or damaged section). */
static int link_rejected(sf_autoreg *a, uint32_t k)
{
	double m0[9];
	char why[512];

	return !a->jobs[k].affine_ok || chain_matrix(a, k, m0, why, sizeof why) ||
	       guard_affine(a, k, &a->jobs[k].r, a->jobs[k].metric, m0, why, sizeof why);
}

/* Serial order: slide i, fitted this run, whose neighbour is rejected is
 * fitted again to the next section towards the reference, as if the
 * rejected one were not there. */
static void relink_slide(sf_autoreg *a, uint32_t i, const uint8_t *fitted)
{
	slide_job *j = &a->jobs[i];
	uint32_t skipped = UINT32_MAX;

	if (!fitted[i] || !j->affine_ok)
		return;
	while (j->target != a->ref && link_rejected(a, j->target)) {
		skipped = j->target;
		j->target = a->jobs[skipped].target;
	}
	if (skipped == UINT32_MAX)
		return;
	j->skipped = skipped;
	j->affine_ok = 0; /* until the new fit succeeds: phase_finish then passes it by */
	sf_log(SF_LOG_INFO,
	       "registration of %s: its neighbour %s is rejected, so it is fitted to %s",
	       a->d->slides[i]->path, a->d->slide_stems[skipped], a->d->slide_stems[j->target]);
	phase_affine(a, i);
}

/* Between the affine fits and the rest (serial order only, one job): walk
 * each chain from the reference outwards, so a slide is checked after the
 * links nearer the reference are settled.  Every other job thread waits at
 * the phase barrier meanwhile, so targets change with no reader. */
static void phase_relink(sf_autoreg *a, uint32_t unused)
{
	uint32_t n = a->d->slide_count;
	uint8_t *fitted = calloc(n, 1);

	(void)unused;
	if (!fitted) {
		sf_log(SF_LOG_WARN,
		       "registration: out of memory; rejected neighbours are not skipped");
		return;
	}
	for (uint32_t q = 0; q < a->count[PHASE_AFFINE]; q++)
		fitted[a->queue[PHASE_AFFINE][q]] = 1;
	for (uint32_t i = a->ref + 1; i < n; i++)
		relink_slide(a, i, fitted);
	for (uint32_t i = a->ref; i-- > 0;)
		relink_slide(a, i, fitted);
	free(fitted);
}

/* --- threads ---------------------------------------------------------------- */

typedef void (*phase_fn)(sf_autoreg *a, uint32_t i);
static const phase_fn phase_run[PHASES] = {phase_thumb, phase_affine, phase_relink, phase_finish};

/* Every job thread drains each phase's queue, then waits for the phase's
 * last slide before the next phase (phase 1 reads phase 0's thumbnails;
 * phase 2 reads every link of a chain). */
static void *job_thread(void *arg)
{
	sf_autoreg *a = arg;

	pthread_mutex_lock(&a->lock);
	for (int ph = 0; ph < PHASES && !stopped(a); ph++) {
		while (a->next[ph] < a->count[ph] && !stopped(a)) {
			uint32_t i = a->queue[ph][a->next[ph]++];
			pthread_mutex_unlock(&a->lock);
			phase_run[ph](a, i);
			pthread_mutex_lock(&a->lock);
			a->done[ph]++;
			pthread_cond_broadcast(&a->changed);
		}
		while (a->done[ph] < a->count[ph] && !stopped(a))
			wait_changed(a);
	}
	/* Every phase is done: nothing reads the thumbnails any more.
	 * (micro_lock is only ever taken inside lock, never the other way.) */
	if (a->done[PHASES - 1] == a->count[PHASES - 1]) {
		for (uint32_t i = 0; i < a->d->slide_count; i++)
			autoreg_thumb_free(&a->thumbs[i]);
		pthread_mutex_lock(&a->micro_lock);
		autoreg_thumb_free(&a->micro_ref);
		pthread_mutex_unlock(&a->micro_lock);
	}
	pthread_mutex_unlock(&a->lock);
	return NULL;
}

/* Queue the phases: slides whose result is not cached, and what they need. */
static int plan_phases(sf_autoreg *a, sf_err *e)
{
	uint32_t n = a->d->slide_count;
	uint8_t *thumb = calloc(n, 1);

	if (!thumb)
		return sf_fail(e, SF_ENOMEM, "out of memory");
	for (int ph = 0; ph < PHASES; ph++)
		if (!(a->queue[ph] = calloc(n, sizeof *a->queue[ph]))) {
			free(thumb);
			return sf_fail(e, SF_ENOMEM, "out of memory");
		}
	for (uint32_t i = 0; i < n; i++) {
		slide_job *j = &a->jobs[i];
		if (!j->in_job)
			continue;
		if (cache_load(a, j, e) == SF_OK) {
			j->stage = ST_DONE;
			continue;
		}
		j->stage = ST_QUEUED;
		a->queue[PHASE_AFFINE][a->count[PHASE_AFFINE]++] = i;
		a->queue[PHASE_FINISH][a->count[PHASE_FINISH]++] = i;
		thumb[i] = thumb[a->ref] = 1;
		for (uint32_t k = j->target; k != a->ref; k = a->jobs[k].target)
			thumb[k] = 1; /* serial: the chain is refitted with it */
	}
	for (uint32_t i = 0; i < n; i++)
		if (thumb[i])
			a->queue[PHASE_THUMB][a->count[PHASE_THUMB]++] = i;
	/* A chain member that is cached still needs its affine link refitted. */
	for (uint32_t i = 0; i < n; i++)
		if (thumb[i] && a->jobs[i].in_job && a->jobs[i].stage == ST_DONE) {
			a->jobs[i].stage = ST_QUEUED;
			a->jobs[i].cached = 0;
			sf_transform_release(&a->jobs[i].t);
			a->queue[PHASE_AFFINE][a->count[PHASE_AFFINE]++] = i;
			a->queue[PHASE_FINISH][a->count[PHASE_FINISH]++] = i;
		}
	if (a->s.serial && a->count[PHASE_AFFINE]) /* one job walks every chain */
		a->queue[PHASE_RELINK][a->count[PHASE_RELINK]++] = a->ref;
	free(thumb);
	return SF_OK;
}

int sf_autoreg_start(sf_autoreg *a, sf_err *e)
{
	int rc = SF_OK;

	pthread_mutex_lock(&a->lock);
	if (a->started || stopped(a)) { /* stopped: waiters fail at once */
		pthread_mutex_unlock(&a->lock);
		return SF_OK;
	}
	a->started = 1;
	if ((rc = plan_phases(a, e)) == SF_OK) {
		unsigned want = a->count[PHASE_THUMB] ? a->threads : 0;
		if (want > a->count[PHASE_THUMB])
			want = a->count[PHASE_THUMB];
		if (want && !(a->tids = calloc(want, sizeof *a->tids)))
			rc = sf_fail(e, SF_ENOMEM, "out of memory");
		for (unsigned k = 0; rc == SF_OK && k < want; k++) {
			if (pthread_create(&a->tids[k], NULL, job_thread, a)) {
				rc = sf_fail(e, SF_ENOMEM, "cannot start a registration thread");
				break;
			}
			a->nthreads++;
		}
	}
	if (rc != SF_OK && !a->nthreads) /* nothing will run: fail every waiting slide */
		for (uint32_t i = 0; i < a->d->slide_count; i++)
			if (a->jobs[i].in_job && a->jobs[i].stage != ST_DONE) {
				a->jobs[i].stage = ST_FAILED;
				snprintf(a->jobs[i].why, sizeof a->jobs[i].why, "%s", e->msg);
			}
	pthread_cond_broadcast(&a->changed);
	pthread_mutex_unlock(&a->lock);
	return rc;
}

/* --- the public side ---------------------------------------------------------- */

int sf_autoreg_create(const sf_dataset *d, uint32_t reference, const uint8_t *to_register,
                      const sf_reg_settings *s, unsigned threads, sf_cache *cache,
                      const char *transforms_dir, sf_autoreg **out, sf_err *e)
{
	sf_autoreg *a = calloc(1, sizeof *a);
	uint32_t n = d->slide_count;

	if (!a || !(a->jobs = calloc(n, sizeof *a->jobs)) ||
	    !(a->thumbs = calloc(n, sizeof *a->thumbs)) || !(a->tdir = strdup(transforms_dir))) {
		if (a) {
			free(a->jobs);
			free(a->thumbs);
		}
		free(a);
		return sf_fail(e, SF_ENOMEM, "out of memory");
	}
	a->d = d, a->ref = reference, a->s = *s, a->cache = cache;
	a->threads = threads ? threads : 1;
	pthread_mutex_init(&a->lock, NULL);
	pthread_mutex_init(&a->micro_lock, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* wait_changed's deadlines */
	pthread_cond_init(&a->changed, &ca);
	pthread_condattr_destroy(&ca);
	atomic_init(&a->stopping, 0);
	for (uint32_t i = 0; i < n; i++) {
		slide_job *j = &a->jobs[i];
		sf_transform_init(&j->t);
		j->in_job = i != reference && to_register[i];
		j->target = reference;
		j->skipped = UINT32_MAX;
	}
	/* Serial order: each slide's neighbour towards the reference among the
	 * slides of the job (slides with their own transform files are skipped). */
	for (uint32_t i = 0; s->serial && i < n; i++) {
		if (!a->jobs[i].in_job)
			continue;
		if (i < reference) {
			uint32_t k = i + 1;
			while (k < reference && !a->jobs[k].in_job)
				k++;
			a->jobs[i].target = k;
		} else {
			uint32_t k = i - 1;
			while (k > reference && !a->jobs[k].in_job)
				k--;
			a->jobs[i].target = k;
		}
	}
	for (uint32_t i = 0; i < n; i++)
		a->jobs[i].key = slide_key(a, i);
	*out = a;
	return SF_OK;
}

void sf_autoreg_destroy(sf_autoreg *a)
{
	if (!a)
		return;
	pthread_mutex_lock(&a->lock);
	atomic_store(&a->stopping, 1);
	pthread_cond_broadcast(&a->changed);
	pthread_mutex_unlock(&a->lock);
	for (unsigned k = 0; k < a->nthreads; k++)
		pthread_join(a->tids[k], NULL);
	for (uint32_t i = 0; i < a->d->slide_count; i++) {
		sf_transform_release(&a->jobs[i].t);
		autoreg_thumb_free(&a->thumbs[i]);
		autoreg_thumb_free(&a->jobs[i].target_like);
		for (int k = 0; k < SF_AUTOREG_FILE_KINDS; k++)
			free(a->jobs[i].kept[k]);
	}
	for (int ph = 0; ph < PHASES; ph++)
		free(a->queue[ph]);
	autoreg_thumb_free(&a->micro_ref);
	pthread_mutex_destroy(&a->micro_lock);
	pthread_mutex_destroy(&a->lock);
	pthread_cond_destroy(&a->changed);
	free(a->tids);
	free(a->jobs);
	free(a->thumbs);
	free(a->tdir);
	free(a);
}

void sf_autoreg_stop(sf_autoreg *a)
{
	atomic_store(&a->stopping, 1);
}

int sf_autoreg_has(const sf_autoreg *a, uint32_t i)
{
	return a && i < a->d->slide_count && a->jobs[i].in_job;
}

sf_key sf_autoreg_key(const sf_autoreg *a, uint32_t i)
{
	return a->jobs[i].key;
}

int sf_autoreg_wait(sf_autoreg *a, uint32_t i, const sf_transform **t, sf_err *e)
{
	slide_job *j = &a->jobs[i];
	int rc = SF_OK;

	if (!j->in_job)
		return sf_fail(e, SF_EINVAL, "%s is not registered by scopefs",
		               a->d->slides[i]->path);
	sf_autoreg_start(a, e); /* a failure marks the slides failed */
	pthread_mutex_lock(&a->lock);
	while (j->stage != ST_DONE && j->stage != ST_FAILED && !stopped(a))
		wait_changed(a);
	if (j->stage == ST_DONE)
		*t = &j->t;
	else
		rc = sf_fail(e, SF_EFORMAT, "registration of %s: %s", a->d->slides[i]->path,
		             j->stage == ST_FAILED ? j->why : STOPPED_WHY);
	pthread_mutex_unlock(&a->lock);
	return rc;
}

sf_autoreg_state sf_autoreg_poll(sf_autoreg *a, uint32_t i, const sf_transform **t)
{
	slide_job *j = &a->jobs[i];
	sf_autoreg_state state;
	sf_err e = {0};

	if (!j->in_job)
		return SF_AUTOREG_REJECTED;
	sf_autoreg_start(a, &e); /* a failure marks the slides failed */
	pthread_mutex_lock(&a->lock);
	if (j->stage == ST_DONE) {
		state = SF_AUTOREG_SERVED;
		*t = &j->t;
	} else if (j->stage == ST_FAILED || stopped(a))
		state = SF_AUTOREG_REJECTED;
	else
		state = SF_AUTOREG_RUNNING;
	pthread_mutex_unlock(&a->lock);
	return state;
}

void sf_autoreg_describe(sf_autoreg *a, uint32_t i, char *buf, size_t n)
{
	const slide_job *j = &a->jobs[i];
	char field[160] = "", mi[48] = "";

	pthread_mutex_lock(&a->lock);
	if (j->stage == ST_FAILED)
		snprintf(buf, n, "not served: %s", j->why);
	else if (j->stage != ST_DONE)
		snprintf(buf, n, "registering: %s", stage_text[j->stage]);
	else {
		if (j->r.mi > 0)
			snprintf(mi, sizeof mi, ", mutual information %.3f", j->r.mi);
		if (j->has_field)
			snprintf(field, sizeof field,
			         ", non-rigid field up to %.1f px (min Jacobian %.2f)", j->disp_max,
			         j->jac_min);
		snprintf(buf, n,
		         "served, registered by scopefs%s: %s%s%s, NCC %.3f%s over %.0f%% of the "
		         "tissue, "
		         "scale %.3f, rotation %.1f deg%s%s, %.2f s",
		         j->cached ? " (from the cache)" : "", a->s.serial ? "serial" : "direct",
		         j->skipped != UINT32_MAX ? " past the rejected section " : "",
		         j->skipped != UINT32_MAX ? a->d->slide_stems[j->skipped] : "", j->r.ncc,
		         mi, 100 * j->r.overlap, j->r.scale, j->r.angle_deg,
		         j->r.mirrored ? ", mirrored" : "", field, j->seconds);
	}
	pthread_mutex_unlock(&a->lock);
}

/* Make the bytes of file kind k of slide i from its transform t. */
static int make_file(sf_autoreg *a, uint32_t i, const sf_transform *t, sf_autoreg_file_kind k,
                     uint8_t **bytes, size_t *len, sf_err *e)
{
	const sf_slide_info *ref = a->d->slides[a->ref], *mov = a->d->slides[i];
	const char *stem = a->d->slide_stems[i];
	sf_tf_units units = {{ref->pixel_size_x, ref->pixel_size_y},
	                     {mov->pixel_size_x, mov->pixel_size_y}};
	uint32_t ref_size[2] = {ref->width, ref->height};
	char name[2][300], path[2][4200], *txt[2] = {NULL, NULL}, *mhd = NULL;
	size_t tlen[2] = {0, 0}, mlen = 0;
	uint8_t *raw = NULL;
	int rc;

	if (t->map.nfields == 0 && k != SF_AUTOREG_JSON && k != SF_AUTOREG_ELASTIX)
		return sf_fail(e, SF_ENOTFOUND, "%s has no non-rigid field", stem);
	switch (k) {
	case SF_AUTOREG_JSON:
		sf_autoreg_file_name(SF_AUTOREG_FIELD_TIFF, stem, name[0], sizeof name[0]);
		return sf_transform_export_json(t, name[0], (char **)bytes, len, e);
	case SF_AUTOREG_FIELD_TIFF: return sf_transform_export_field_tiff(t, bytes, len, e);
	case SF_AUTOREG_FIELD_MHD:
	case SF_AUTOREG_FIELD_RAW:
		sf_autoreg_file_name(SF_AUTOREG_FIELD_RAW, stem, name[0], sizeof name[0]);
		rc = sf_transform_export_field_mhd(t, &units, ref_size, name[0], &mhd, &mlen, &raw,
		                                   len, e);
		if (rc == SF_OK && k == SF_AUTOREG_FIELD_MHD) {
			free(raw);
			*bytes = (uint8_t *)mhd, *len = mlen;
		} else if (rc == SF_OK) {
			free(mhd);
			*bytes = raw;
		}
		return rc;
	default:
		sf_autoreg_file_name(SF_AUTOREG_ELASTIX_FIELD, stem, name[0], sizeof name[0]);
		sf_autoreg_file_name(SF_AUTOREG_FIELD_MHD, stem, name[1], sizeof name[1]);
		snprintf(path[0], sizeof path[0], "%s/%s", a->tdir, name[0]);
		snprintf(path[1], sizeof path[1], "%s/%s", a->tdir, name[1]);
		rc = sf_transform_export_elastix(t, &units, ref_size, path[0], path[1], &txt[0],
		                                 &tlen[0], &txt[1], &tlen[1], e);
		if (rc != SF_OK)
			return rc;
		int want = k == SF_AUTOREG_ELASTIX_FIELD;
		free(txt[!want]);
		*bytes = (uint8_t *)txt[want], *len = tlen[want];
		return SF_OK;
	}
}

/* Whether file kind k is small enough to keep once made: not the field's data. */
static int kept_kind(sf_autoreg_file_kind k)
{
	return k != SF_AUTOREG_FIELD_TIFF && k != SF_AUTOREG_FIELD_RAW;
}

/* A malloc'd copy of file kind k kept for j (a->lock held; j->kept[k] set). */
static int copy_kept(const slide_job *j, sf_autoreg_file_kind k, uint8_t **bytes, size_t *len,
                     sf_err *e)
{
	if (!(*bytes = malloc(j->kept_len[k] ? j->kept_len[k] : 1)))
		return sf_fail(e, SF_ENOMEM, "out of memory");
	memcpy(*bytes, j->kept[k], j->kept_len[k]);
	*len = j->kept_len[k];
	return SF_OK;
}

int sf_autoreg_file_make(sf_autoreg *a, uint32_t i, sf_autoreg_file_kind k, uint8_t **bytes,
                         size_t *len, sf_err *e)
{
	slide_job *j = &a->jobs[i];
	const sf_transform *t;
	uint8_t *made = NULL;
	size_t made_len = 0;
	int rc = sf_autoreg_wait(a, i, &t, e);

	*bytes = NULL, *len = 0;
	if (rc != SF_OK || !kept_kind(k))
		return rc == SF_OK ? make_file(a, i, t, k, bytes, len, e) : rc;
	pthread_mutex_lock(&a->lock);
	if (j->kept[k])
		rc = copy_kept(j, k, bytes, len, e);
	pthread_mutex_unlock(&a->lock);
	if (*bytes || rc != SF_OK)
		return rc;
	/* Made outside the lock (the header builds the field: milliseconds);
	 * two first opens may both make it, and the second copy is dropped. */
	if ((rc = make_file(a, i, t, k, &made, &made_len, e)) != SF_OK)
		return rc;
	pthread_mutex_lock(&a->lock);
	if (!j->kept[k]) {
		j->kept[k] = made, j->kept_len[k] = made_len;
		made = NULL;
	}
	rc = copy_kept(j, k, bytes, len, e);
	pthread_mutex_unlock(&a->lock);
	free(made);
	return rc;
}

int sf_autoreg_file_size(sf_autoreg *a, uint32_t i, sf_autoreg_file_kind k, uint64_t *size,
                         sf_err *e)
{
	slide_job *j = &a->jobs[i];
	uint8_t *bytes;
	size_t len;
	int rc;

	pthread_mutex_lock(&a->lock);
	*size = j->file_size[k] ? j->file_size[k] - 1 : 0;
	rc = j->file_size[k] ? SF_OK : SF_ENOTFOUND;
	pthread_mutex_unlock(&a->lock);
	if (rc == SF_OK)
		return rc;
	if ((rc = sf_autoreg_file_make(a, i, k, &bytes, &len, e)) != SF_OK)
		return rc;
	free(bytes);
	pthread_mutex_lock(&a->lock);
	j->file_size[k] = (uint64_t)len + 1;
	pthread_mutex_unlock(&a->lock);
	*size = len;
	return SF_OK;
}

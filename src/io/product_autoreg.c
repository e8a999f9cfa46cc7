/* product_autoreg.c — the warp of a slide registered by scopefs (products.h).
 *
 * The engine needs a product's key, unit count and unit sizes at mount, long
 * before the registration has run.  None of them depends on the transform,
 * so a template warp product made with the identity gives the sizes, and the
 * key is the registration's input key mixed with the template's.  The real
 * warp product is made once, by the first worker that needs it, when the
 * transform is there; every call then goes to it. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "scopefs/autoreg.h"
#include "scopefs/products.h"

typedef struct autoreg_product {
	const sf_slide_info *slide;
	struct sf_autoreg *job;
	uint32_t index; /* the slide's index in the dataset */
	sf_pyramid_plan plan;
	sf_warp_options opts;
	const sf_layout *layout;
	sf_transform identity; /* the template's transform */
	sf_product *template;  /* sizes only */
	pthread_mutex_t lock;  /* guards warp */
	sf_product *warp;      /* the real warp, once the transform exists */
} autoreg_product;

/* The real warp product, made on first use (waits for the registration). */
static int real_warp(autoreg_product *ap, sf_product **out, sf_err *e)
{
	const sf_transform *t;
	int rc = SF_OK;

	pthread_mutex_lock(&ap->lock);
	if (!ap->warp) {
		pthread_mutex_unlock(&ap->lock);
		/* Wait outside the lock: the registration may take seconds. */
		if ((rc = sf_autoreg_wait(ap->job, ap->index, &t, e)) != SF_OK)
			return rc;
		pthread_mutex_lock(&ap->lock);
		if (!ap->warp)
			rc = sf_product_warp_create(ap->slide, t, &ap->plan, &ap->opts, ap->layout,
			                            &ap->warp, e);
	}
	*out = ap->warp;
	pthread_mutex_unlock(&ap->lock);
	return rc;
}

/* Per-worker state: the real warp's own. */
static int autoreg_worker_start(sf_product *p, void **state, sf_err *e)
{
	sf_product *w;
	int rc = real_warp(p->impl, &w, e);

	*state = NULL;
	if (rc != SF_OK || !w->ops->worker_start)
		return rc;
	return w->ops->worker_start(w, state, e);
}

static void autoreg_worker_stop(sf_product *p, void *state)
{
	autoreg_product *ap = p->impl;

	if (ap->warp && ap->warp->ops->worker_stop)
		ap->warp->ops->worker_stop(ap->warp, state);
}

static int autoreg_compute(sf_product *p, void *state, uint64_t unit, uint8_t *out, sf_err *e)
{
	sf_product *w;
	int rc = real_warp(p->impl, &w, e);

	return rc == SF_OK ? w->ops->compute(w, state, unit, out, e) : rc;
}

static size_t autoreg_unit_bytes(const sf_product *p, uint64_t unit)
{
	const autoreg_product *ap = p->impl;
	return ap->template->ops->unit_bytes(ap->template, unit);
}

static void autoreg_destroy(sf_product *p)
{
	autoreg_product *ap = p->impl;

	if (ap->warp)
		ap->warp->ops->destroy(ap->warp);
	ap->template->ops->destroy(ap->template);
	pthread_mutex_destroy(&ap->lock);
	free(ap);
	free(p);
}

static const sf_product_ops autoreg_ops = {
    .worker_start = autoreg_worker_start,
    .worker_stop = autoreg_worker_stop,
    .compute = autoreg_compute,
    .unit_bytes = autoreg_unit_bytes,
    .destroy = autoreg_destroy,
};

int sf_product_autoreg_create(const sf_slide_info *s, struct sf_autoreg *a, uint32_t slide,
                              const sf_pyramid_plan *plan, const sf_warp_options *wo,
                              const sf_layout *l, sf_product **out, sf_err *e)
{
	sf_product *p = calloc(1, sizeof *p);
	autoreg_product *ap = calloc(1, sizeof *ap);
	int rc;

	if (!p || !ap) {
		free(p);
		free(ap);
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", s->path);
	}
	sf_transform_init(&ap->identity);
	rc = sf_product_warp_create(s, &ap->identity, plan, wo, l, &ap->template, e);
	if (rc != SF_OK) {
		free(p);
		free(ap);
		return rc;
	}
	ap->slide = s, ap->job = a, ap->index = slide, ap->plan = *plan, ap->opts = *wo;
	ap->layout = l;
	pthread_mutex_init(&ap->lock, NULL);
	p->ops = &autoreg_ops;
	p->impl = ap;
	p->key = sf_key_mix_u64(ap->template->key, sf_autoreg_key(a, slide).lo);
	p->key = sf_key_mix_u64(p->key, sf_autoreg_key(a, slide).hi);
	p->elem_bytes = ap->template->elem_bytes;
	p->unit_count = ap->template->unit_count;
	snprintf(p->name, sizeof p->name, "autoreg:%s", s->path);
	*out = p;
	return SF_OK;
}

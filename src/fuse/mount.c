/* mount.c — build the mounted tree from one scan of RAW_DIR.
 *
 * Invariants once sf_mount_build returns:
 *  1. nodes[] never moves or changes; children are sorted by name (bsearch).
 *  2. Every SF_NODE_RAW path is the real path of a regular file inside
 *     RAW_DIR: symlinks are resolved here, and those leaving RAW_DIR (or
 *     naming folders, which could loop) are left out.
 *  3. Every virtual file's size is exact: it is its layout's size. */
#include "scopefs/mount.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "scopefs/cpus.h"
#include "scopefs/autoreg.h"
#include "scopefs/log.h"
#include "scopefs/ome_xml.h"
#include "scopefs/product_deconv.h"
#include "scopefs/products.h"
#include "scopefs/qc.h"

#define SF_TILE       512
#define RAW_MAX_DEPTH 64

/* Grow *arr (of *cap elements of size elem) to hold one more. */
static int grow(void **arr, uint32_t count, uint32_t *cap, size_t elem)
{
	void *bigger;
	uint32_t want;

	if (count < *cap)
		return SF_OK;
	want = *cap ? *cap * 2 : 16;
	bigger = realloc(*arr, (size_t)want * elem);
	if (!bigger)
		return SF_ENOMEM;
	*arr = bigger;
	*cap = want;
	return SF_OK;
}

static void stat_virtual(const sf_mount *m, struct stat *st, mode_t mode, uint64_t size)
{
	memset(st, 0, sizeof *st);
	st->st_mode = mode;
	st->st_nlink = S_ISDIR(mode) ? 2 : 1;
	st->st_uid = getuid();
	st->st_gid = getgid();
	st->st_size = (off_t)size;
	st->st_blksize = 1 << 20;
	st->st_blocks = (blkcnt_t)((size + 511) / 512);
	st->st_mtim = st->st_ctim = st->st_atim = m->mounted_at;
}

/* The owner, group and read permission (0444 & each mode) shared by the
 * source files src[0..n) of a virtual file, into src_attr; the first
 * file's owner and group.  A source that cannot be stat'ed leaves no
 * read permission (root still reads). */
static void source_attr(const char *const *src, uint32_t n, struct stat *src_attr)
{
	memset(src_attr, 0, sizeof *src_attr);
	src_attr->st_mode = 0444;
	src_attr->st_uid = getuid();
	src_attr->st_gid = getgid();
	for (uint32_t i = 0; i < n; i++) {
		struct stat s;
		if (stat(src[i], &s) != 0) {
			src_attr->st_mode = 0;
			continue;
		}
		src_attr->st_mode &= s.st_mode;
		if (i == 0)
			src_attr->st_uid = s.st_uid, src_attr->st_gid = s.st_gid;
	}
}

/* A virtual file made from sources with attributes src_attr (source_attr):
 * no wider read permission than they have, and their owner, so that with
 * default_permissions (implied by allow_other) a product of a private
 * source is as private as the source is in raw/. */
static void stat_derived(const sf_mount *m, struct stat *st, const struct stat *src_attr,
                         uint64_t size)
{
	stat_virtual(m, st, S_IFREG | (src_attr->st_mode & 0444), size);
	st->st_uid = src_attr->st_uid;
	st->st_gid = src_attr->st_gid;
}

/* Add a node named name under parent (UINT32_MAX for the root); its index in *idx. */
static int node_add(sf_mount *m, uint32_t parent, const char *name, sf_node_kind kind,
                    uint32_t *idx, sf_err *e)
{
	sf_node *n;

	if (grow((void **)&m->nodes, m->node_count, &m->node_cap, sizeof *m->nodes) != SF_OK)
		return sf_fail(e, SF_ENOMEM, "out of memory building the tree");
	if (parent != UINT32_MAX) {
		sf_node *p = &m->nodes[parent];
		if (grow((void **)&p->children, p->child_count, &p->child_cap,
		         sizeof *p->children) != SF_OK)
			return sf_fail(e, SF_ENOMEM, "out of memory building the tree");
	}
	n = &m->nodes[m->node_count];
	memset(n, 0, sizeof *n);
	if (!(n->name = strdup(name)))
		return sf_fail(e, SF_ENOMEM, "out of memory building the tree");
	n->kind = kind;
	n->autoreg_slide = -1;
	n->parent = parent == UINT32_MAX ? m->node_count : parent;
	if (kind == SF_NODE_DIR)
		stat_virtual(m, &n->st, S_IFDIR | 0555, 0);
	if (parent != UINT32_MAX) {
		sf_node *p = &m->nodes[parent];
		p->children[p->child_count++] = m->node_count;
	}
	*idx = m->node_count++;
	return SF_OK;
}

/* Keep arrays of owned objects so sf_mount_free can release them. */
#define KEEP(m, field, count, cap, obj)                                                            \
	(grow((void **)&(m)->field, (m)->count, &(m)->cap, sizeof *(m)->field) == SF_OK            \
	     ? ((m)->field[(m)->count++] = (obj), SF_OK)                                           \
	     : SF_ENOMEM)

static int is_inside(const char *root, const char *path)
{
	size_t n = strlen(root);
	return !strncmp(path, root, n) && (path[n] == '/' || path[n] == '\0');
}

/* Something raw/ leaves out gets a problem entry (unless the dataset scan
 * gave it one): `cp -r raw/` would otherwise lose it silently. */
static int raw_left_out(sf_mount *m, const char *path, const char *why, sf_err *e)
{
	if (sf_dataset_add_problem(m->dataset, path, why) != SF_OK)
		return sf_fail(e, SF_ENOMEM, "out of memory building raw/");
	return SF_OK;
}

/* Mirror folder abs (inside RAW_DIR) under node dir, recursively. */
static int raw_walk(sf_mount *m, const char *abs, uint32_t dir, int depth, sf_err *e)
{
	struct dirent **list = NULL;
	int count = scandir(abs, &list, NULL, alphasort), rc = SF_OK;

	if (count < 0) {
		char why[300];
		snprintf(why, sizeof why, "folder cannot be listed: %s", strerror(errno));
		return raw_left_out(m, abs, why, e);
	}
	for (int i = 0; i < count; i++) {
		const char *name = list[i]->d_name;
		char path[PATH_MAX], real[PATH_MAX];
		struct stat st;
		uint32_t idx;

		if (rc != SF_OK || !strcmp(name, ".") || !strcmp(name, ".."))
			goto next;
		snprintf(path, sizeof path, "%s/%s", abs, name);
		if (lstat(path, &st) != 0)
			goto next;
		if (S_ISLNK(st.st_mode)) {
			if (!realpath(path, real) || !is_inside(m->dataset->root, real) ||
			    stat(real, &st) != 0 || !S_ISREG(st.st_mode)) {
				rc = raw_left_out(m, path,
				                  "symbolic link left out of raw/ (it leaves "
				                  "RAW_DIR, is broken, or names a folder)",
				                  e);
				goto next;
			}
		} else
			snprintf(real, sizeof real, "%s", path);
		if (S_ISDIR(st.st_mode) && depth < RAW_MAX_DEPTH) {
			rc = node_add(m, dir, name, SF_NODE_DIR, &idx, e);
			if (rc == SF_OK) {
				m->nodes[idx].st.st_mtim = st.st_mtim;
				rc = raw_walk(m, path, idx, depth + 1, e);
			}
		} else if (S_ISDIR(st.st_mode)) {
			char why[80];
			snprintf(why, sizeof why,
			         "folder more than %d levels deep: left out of raw/",
			         RAW_MAX_DEPTH);
			rc = raw_left_out(m, path, why, e);
		} else if (!S_ISREG(st.st_mode)) {
			char why[64];
			snprintf(why, sizeof why, "not a regular file (%s)",
			         sf_special_kind(st.st_mode));
			rc = raw_left_out(m, path, why, e);
		} else {
			rc = node_add(m, dir, name, SF_NODE_RAW, &idx, e);
			if (rc == SF_OK && !(m->nodes[idx].raw_path = strdup(real)))
				rc = sf_fail(e, SF_ENOMEM, "out of memory building raw/");
			if (rc == SF_OK) {
				st.st_mode = S_IFREG | (st.st_mode & 0444);
				st.st_nlink = 1;
				m->nodes[idx].st = st;
			}
		}
	next:
		free(list[i]);
	}
	free(list);
	return rc;
}

/* Register a virtual file node for layout l and product p. */
static int add_vfile(sf_mount *m, uint32_t dir, const char *name, sf_layout *l, sf_product *p,
                     uint64_t unit_base, const struct stat *src_attr, sf_err *e)
{
	uint32_t idx;
	int rc;

	if (grow((void **)&m->vfiles, m->vfile_count, &m->vfile_cap, sizeof *m->vfiles) != SF_OK)
		return sf_fail(e, SF_ENOMEM, "out of memory");
	if (!(m->vfiles[m->vfile_count] = calloc(1, sizeof(sf_vfile))))
		return sf_fail(e, SF_ENOMEM, "out of memory");
	sf_vfile *v = m->vfiles[m->vfile_count++];
	v->layout = l;
	v->product = p;
	v->unit_base = unit_base;
	rc = node_add(m, dir, name, SF_NODE_VFILE, &idx, e);
	if (rc != SF_OK)
		return rc;
	m->nodes[idx].vfile = v;
	stat_derived(m, &m->nodes[idx].st, src_attr, sf_layout_file_size(l));
	return SF_OK;
}

static int keep_product(sf_mount *m, sf_product *p, sf_err *e)
{
	if (KEEP(m, products, product_count, product_cap, p) != SF_OK) {
		p->ops->destroy(p);
		return sf_fail(e, SF_ENOMEM, "out of memory");
	}
	return SF_OK;
}

static int keep_layout(sf_mount *m, sf_layout *l, sf_err *e)
{
	if (KEEP(m, layouts, layout_count, layout_cap, l) != SF_OK) {
		sf_layout_free(l);
		return sf_fail(e, SF_ENOMEM, "out of memory");
	}
	return SF_OK;
}

/* The layout of a registered/ file: the reference's grid (size, levels,
 * pixel size) with the channels, samples and type of slide s. */
static int registered_layout(sf_mount *m, const sf_slide_info *ref, const sf_slide_info *s,
                             const char *stem, const sf_pyramid_plan *plan, sf_layout **out,
                             sf_err *e)
{
	sf_layout_spec spec = {0};
	sf_ome_image ome = {0};
	int rc;

	ome.name = stem;
	ome.width = ref->width;
	ome.height = ref->height;
	ome.channels = s->channels;
	ome.samples = s->samples;
	ome.dtype = s->dtype;
	ome.pixel_size_x = ref->pixel_size_x;
	ome.pixel_size_y = ref->pixel_size_y;
	ome.channel_names = s->channel_names;
	char *xml = sf_ome_xml(&ome, e);
	if (!xml)
		return e->code;
	spec.width = ref->width;
	spec.height = ref->height;
	spec.pages = s->channels;
	spec.samples = s->samples;
	spec.dtype = s->dtype;
	spec.tile = SF_TILE;
	/* Page groups of at most 4 MiB per unit: a reader going channel by
	 * channel (tifffile, libvips, Bio-Formats) then finds the next pages of
	 * a unit in RAM, and a unit's RAM does not grow with the channel count.
	 * 8 uint16 or 4 float32 channels of 512 x 512 still make one unit. */
	spec.unit_bytes_max = (uint64_t)4 << 20;
	spec.levels = plan->levels;
	spec.level_width = plan->width;
	spec.level_height = plan->height;
	spec.description = xml;
	spec.bigtiff = -1;
	if (ref->pixel_size_x > 0 && ref->pixel_size_y > 0) {
		spec.resolution_x = 1e4 / ref->pixel_size_x;
		spec.resolution_y = 1e4 / ref->pixel_size_y;
	}
	rc = sf_layout_create(&spec, out, e);
	free(xml);
	return rc == SF_OK ? keep_layout(m, *out, e) : rc;
}

/* Whether name is wsireg's name for stem's transformations,
 * <project>-<stem>_to_<target>_transformations.json (wsireg2d.py,
 * save_transformations), with non-empty project and target. */
static int is_wsireg_name(const char *name, const char *stem)
{
	static const char suffix[] = "_transformations.json";
	size_t n = strlen(name), ns = strlen(stem), nx = sizeof suffix - 1;

	if (n <= nx || strcmp(name + n - nx, suffix))
		return 0;
	for (const char *at = strchr(name + 1, '-'); at; at = strchr(at + 1, '-')) {
		const char *to = at + 1 + ns;
		if (!strncmp(at + 1, stem, ns) && !strncmp(to, "_to_", 4) && to + 4 < name + n - nx)
			return 1;
	}
	return 0;
}

/* The transform file of a moving slide in DIR: <stem>.json, .txt (elastix),
 * .tfm (ITK), the folder <stem>/ as elastix writes it, then wsireg's
 * <stem>_transformations.json or <project>-<stem>_to_<target>_transformations.json
 * (the first by name if several projects match).  NULL if none. */
static char *find_transform(const char *dir, const char *stem)
{
	static const char *const suffixes[] = {".json", ".txt", ".tfm", "",
	                                       "_transformations.json"};
	char path[PATH_MAX], best[NAME_MAX + 1] = "";
	struct stat st;
	struct dirent *de;
	DIR *d;

	for (size_t i = 0; i < sizeof suffixes / sizeof suffixes[0]; i++) {
		if ((size_t)snprintf(path, sizeof path, "%s/%s%s", dir, stem, suffixes[i]) >=
		    sizeof path)
			return NULL;
		if (stat(path, &st) == 0 &&
		    (S_ISREG(st.st_mode) || (!*suffixes[i] && S_ISDIR(st.st_mode))))
			return strdup(path);
	}
	if (!(d = opendir(dir)))
		return NULL;
	while ((de = readdir(d)))
		if (is_wsireg_name(de->d_name, stem) && (!best[0] || strcmp(de->d_name, best) < 0))
			snprintf(best, sizeof best, "%s", de->d_name);
	closedir(d);
	if (!best[0] || (size_t)snprintf(path, sizeof path, "%s/%s", dir, best) >= sizeof path)
		return NULL;
	return strdup(path);
}

static int set_state(sf_slide_entry *se, const char *fmt, const char *detail)
{
	char text[768];
	free(se->state);
	snprintf(text, sizeof text, fmt, detail);
	se->state = strdup(text);
	return se->state ? SF_OK : SF_ENOMEM;
}

/* The transform of moving slide i from transforms=DIR, and the files it was
 * read from (*files, for watch_transform).  Sets *to_register when scopefs
 * is to register the slide itself (no file for it, reg=auto).  A slide that
 * cannot be served gets its reason in slide_state; only SF_ENOMEM is
 * returned as a failure. */
static int load_transform(sf_mount *m, uint32_t i, uint8_t *to_register, sf_tf_files *files,
                          sf_err *e)
{
	const sf_dataset *d = m->dataset;
	const sf_slide_info *ref = d->slides[m->reference], *s = d->slides[i];
	sf_slide_entry *se = &m->slide_state[i];
	sf_tf_units units = {{ref->pixel_size_x, ref->pixel_size_y},
	                     {s->pixel_size_x, s->pixel_size_y}};
	int rc;

	if (m->opts->transforms)
		se->transform_path = find_transform(m->opts->transforms, d->slide_stems[i]);
	if (!se->transform_path) {
		if (m->opts->reg.enabled) {
			*to_register = 1;
			return SF_OK;
		}
		if (!m->opts->transforms)
			return set_state(se, "%s",
			                 "not served: no transforms=DIR given and reg=off");
		return set_state(se, "not served: no transform for it in %s and reg=off",
		                 m->opts->transforms);
	}
	rc = sf_transform_load_files(se->transform_path, &units, &se->transform, files, e);
	if (rc != SF_OK)
		return rc == SF_ENOMEM ? rc : set_state(se, "not served: %s", e->msg);
	return SF_OK;
}

/* Watch path (sf_watch) for the virtual files of folder, from now on.  A
 * path that cannot be stat'ed is watched for its creation. */
static int watch_add(sf_mount *m, const char *path, const char *folder, const char *remedy,
                     sf_err *e)
{
	sf_watch *w;

	if (grow((void **)&m->watches, m->watch_count, &m->watch_cap, sizeof *m->watches) != SF_OK)
		return sf_fail(e, SF_ENOMEM, "out of memory");
	w = &m->watches[m->watch_count];
	memset(w, 0, sizeof *w);
	if (!(w->path = strdup(path)))
		return sf_fail(e, SF_ENOMEM, "out of memory");
	w->existed = stat(path, &w->st) == 0;
	w->folder = folder;
	w->remedy = remedy;
	m->watch_count++;
	return SF_OK;
}

/* Watch the files a slide's transform was loaded from (files: the
 * transform file first, then those it names, as a field TIFF or a chained
 * elastix file: rewriting any of them changes the warp), for node idx. */
static int watch_transform(sf_mount *m, uint32_t idx, const sf_tf_files *files, sf_err *e)
{
	int rc = SF_OK;

	m->nodes[idx].watch_first = m->watch_count;
	for (size_t k = 0; k < files->count && rc == SF_OK; k++)
		rc = watch_add(m, files->paths[k], "registered",
		               "remount to warp with the new transform", e);
	m->nodes[idx].watch_count = m->watch_count - m->nodes[idx].watch_first;
	return rc;
}

/* registered/<stem>.ome.tif for slide i: the reference re-tiled, a moving
 * slide warped through its transform file or through scopefs's own
 * registration.  A slide that cannot be served gets its reason in
 * slide_state and the mount goes on; only SF_ENOMEM stops it. */
static int add_registered_slide(sf_mount *m, uint32_t dir, uint32_t i, const sf_pyramid_plan *plan,
                                const sf_tf_files *files, sf_err *e)
{
	const sf_dataset *d = m->dataset;
	const sf_slide_info *ref = d->slides[m->reference], *s = d->slides[i];
	sf_slide_entry *se = &m->slide_state[i];
	const char *stem = d->slide_stems[i];
	int autoreg = sf_autoreg_has(m->autoreg, i);
	sf_warp_options wo = {m->opts->interp, m->opts->background, m->opts->gpu};
	char name[NAME_MAX + 1];
	sf_layout *layout;
	sf_product *product;
	int rc;

	if ((int)i != m->reference && !autoreg && !se->transform_path)
		return SF_OK; /* its reason is in slide_state */
	if ((int)i != m->reference && se->state)
		return SF_OK; /* its transform file failed to load */
	rc = registered_layout(m, ref, s, stem, plan, &layout, e);
	if (rc == SF_OK && (int)i == m->reference)
		rc = sf_product_retile_create(s, plan, &wo, layout, &product, e);
	else if (rc == SF_OK && autoreg)
		rc = sf_product_autoreg_create(s, m->autoreg, i, plan, &wo, layout, &product, e);
	else if (rc == SF_OK)
		rc = sf_product_warp_create(s, &se->transform, plan, &wo, layout, &product, e);
	if (rc == SF_OK && (rc = keep_product(m, product, e)) == SF_OK) {
		const char *src = s->path;
		struct stat src_attr;
		source_attr(&src, 1, &src_attr);
		snprintf(name, sizeof name, "%s.ome.tif", stem);
		rc = add_vfile(m, dir, name, layout, product, 0, &src_attr, e);
	}
	if (rc == SF_OK && autoreg) /* add_vfile's node is the last one */
		m->nodes[m->node_count - 1].autoreg_slide = (int32_t)i;
	else if (rc == SF_OK && (int)i != m->reference)
		rc = watch_transform(m, m->node_count - 1, files, e);
	if (rc == SF_ENOMEM)
		return rc;
	if (rc != SF_OK)
		return set_state(se, "not served: %s", e->msg);
	if (autoreg)
		return set_state(se, "%s", "registered by scopefs"); /* status asks the job */
	return (int)i == m->reference ? set_state(se, "%s", "served (reference, re-tiled)")
	                              : set_state(se, "served, warped by %s", se->transform_path);
}

static int find_reference(sf_mount *m, sf_err *e)
{
	const sf_dataset *d = m->dataset;
	const char *want = m->opts->reference;

	m->reference = d->slide_count ? 0 : -1;
	if (!want)
		return SF_OK;
	for (uint32_t i = 0; i < d->slide_count; i++) {
		const char *base = strrchr(d->slides[i]->path, '/');
		base = base ? base + 1 : d->slides[i]->path;
		if (!strcmp(base, want) || !strcmp(d->slide_stems[i], want)) {
			m->reference = (int)i;
			return SF_OK;
		}
	}
	return sf_fail(e, SF_EINVAL, "option 'reference': no whole-slide image named '%s' in %s",
	               want, d->root);
}

/* The absolute folder transforms/ is served at: elastix files refer to each
 * other by absolute path. */
static int transforms_path(sf_mount *m, sf_err *e)
{
	char real[PATH_MAX], path[PATH_MAX + 16];

	if (!realpath(m->opts->mountpoint, real))
		snprintf(real, sizeof real, "%s", m->opts->mountpoint);
	snprintf(path, sizeof path, "%s/transforms", real);
	if (!(m->transforms_dir = strdup(path)))
		return sf_fail(e, SF_ENOMEM, "out of memory");
	return SF_OK;
}

/* The registration job of the slides that have no transform file. */
static int make_autoreg(sf_mount *m, const uint8_t *to_register, sf_err *e)
{
	const sf_dataset *d = m->dataset;
	unsigned threads = m->opts->threads ? m->opts->threads : sf_cpus_usable();
	int any = 0, rc;

	for (uint32_t i = 0; i < d->slide_count; i++)
		any |= to_register[i];
	if (!any)
		return SF_OK;
	if ((rc = transforms_path(m, e)) != SF_OK)
		return rc;
	return sf_autoreg_create(d, (uint32_t)m->reference, to_register, &m->opts->reg, threads,
	                         m->cache, m->transforms_dir, &m->autoreg, e);
}

/* The transforms of the moving slides (files[i]: the files slide i's was
 * read from) and the registration job of those without one. */
static int load_transforms(sf_mount *m, sf_tf_files *files, sf_err *e)
{
	const sf_dataset *d = m->dataset;
	uint8_t *to_register = calloc(d->slide_count, 1);
	int rc = to_register ? SF_OK : sf_fail(e, SF_ENOMEM, "out of memory");

	for (uint32_t i = 0; i < d->slide_count && rc == SF_OK; i++)
		if ((int)i != m->reference)
			rc = load_transform(m, i, &to_register[i], &files[i], e);
	if (rc == SF_OK)
		rc = make_autoreg(m, to_register, e);
	free(to_register);
	return rc;
}

static int build_registered(sf_mount *m, uint32_t root, sf_err *e)
{
	const sf_dataset *d = m->dataset;
	sf_pyramid_plan plan;
	sf_tf_files *files; /* per slide, until watch_transform has them */
	uint32_t dir;
	int rc = node_add(m, root, "registered", SF_NODE_DIR, &dir, e);

	if (rc != SF_OK || (rc = find_reference(m, e)) != SF_OK || m->reference < 0)
		return rc;
	if (!(m->slide_state = calloc(d->slide_count, sizeof *m->slide_state)) ||
	    !(files = calloc(d->slide_count, sizeof *files)))
		return sf_fail(e, SF_ENOMEM, "out of memory");
	for (uint32_t i = 0; i < d->slide_count; i++)
		sf_transform_init(&m->slide_state[i].transform);
	rc = load_transforms(m, files, e);
	sf_pyramid_plan_make(d->slides[m->reference], SF_TILE, &plan);
	for (uint32_t i = 0; i < d->slide_count && rc == SF_OK; i++) {
		rc = add_registered_slide(m, dir, i, &plan, &files[i], e);
		if (rc == SF_OK && strncmp(m->slide_state[i].state, "served", 6) &&
		    !sf_autoreg_has(m->autoreg, i))
			sf_log(SF_LOG_WARN, "registered: %s: %s", d->slides[i]->path,
			       m->slide_state[i].state);
	}
	for (uint32_t i = 0; i < d->slide_count; i++)
		sf_tf_files_free(&files[i]);
	free(files);
	return rc;
}

/* Record a file or folder left out of the mount, for .scopefs/status
 * "problems" (the caller logs it). */
static int mount_problem(sf_dataset *d, const char *path, const char *reason, sf_err *e)
{
	sf_problem *grown = realloc(d->problems, (d->problem_count + 1) * sizeof *grown);

	if (!grown)
		return sf_fail(e, SF_ENOMEM, "out of memory");
	d->problems = grown;
	grown[d->problem_count].path = strdup(path);
	grown[d->problem_count].reason = strdup(reason);
	if (!grown[d->problem_count].path || !grown[d->problem_count].reason) {
		free(grown[d->problem_count].path);
		free(grown[d->problem_count].reason);
		return sf_fail(e, SF_ENOMEM, "out of memory");
	}
	d->problem_count++;
	return SF_OK;
}

/* Whether the elastix files of slide i can be made: they name each other
 * by absolute path inside "quoted values", which cannot hold '"' or a line
 * break (transform_export.h).  If not, they are left out of transforms/
 * with a problem saying why, so every listed file can be stat'ed. */
static int elastix_servable(sf_mount *m, uint32_t i, int *ok, sf_err *e)
{
	const char *stem = m->dataset->slide_stems[i];
	char path[PATH_MAX + 64];

	*ok = !strpbrk(m->transforms_dir, "\"\n\r") && !strpbrk(stem, "\"\n\r");
	if (*ok)
		return SF_OK;
	static const char why[] = "elastix files not served: their path holds a double quote or "
	                          "a line break, which elastix parameter files cannot quote";
	snprintf(path, sizeof path, "%s/%s.elastix*.txt", m->transforms_dir, stem);
	sf_log(SF_LOG_WARN, "%s: %s", path, why);
	return mount_problem(m->dataset, path, why, e);
}

/* transforms/<stem>.json, .elastix.txt (and the field files) for each slide
 * scopefs registers: made from the job's result on first use. */
static int build_transforms(sf_mount *m, uint32_t root, sf_err *e)
{
	const sf_dataset *d = m->dataset;
	uint32_t dir = UINT32_MAX, idx;
	int rc = SF_OK;

	for (uint32_t i = 0; m->autoreg && i < d->slide_count && rc == SF_OK; i++) {
		const char *src = d->slides[i]->path;
		struct stat src_attr;
		int elastix_ok;

		if (!sf_autoreg_has(m->autoreg, i))
			continue;
		if (dir == UINT32_MAX &&
		    (rc = node_add(m, root, "transforms", SF_NODE_DIR, &dir, e)))
			return rc;
		if ((rc = elastix_servable(m, i, &elastix_ok, e)) != SF_OK)
			return rc;
		source_attr(&src, 1, &src_attr);
		for (int k = 0; k < SF_AUTOREG_FILE_KINDS && rc == SF_OK; k++) {
			char name[NAME_MAX + 1];
			if (!sf_autoreg_file_exists(&m->opts->reg, (sf_autoreg_file_kind)k) ||
			    (!elastix_ok &&
			     (k == SF_AUTOREG_ELASTIX || k == SF_AUTOREG_ELASTIX_FIELD)))
				continue;
			sf_autoreg_file_name((sf_autoreg_file_kind)k, d->slide_stems[i], name,
			                     sizeof name);
			if ((rc = node_add(m, dir, name, SF_NODE_TRANSFORM, &idx, e)) != SF_OK)
				break;
			m->nodes[idx].autoreg_slide = (int32_t)i;
			m->nodes[idx].transform_file = k;
			stat_derived(m, &m->nodes[idx].st, &src_attr, 0);
		}
	}
	return rc;
}

/* The virtual file named name among the children of dir (children are not
 * sorted yet while building, so a linear scan), or NULL. */
static const sf_vfile *child_vfile(const sf_mount *m, uint32_t dir, const char *name)
{
	const sf_node *d = &m->nodes[dir];

	for (uint32_t i = 0; i < d->child_count; i++) {
		const sf_node *n = &m->nodes[d->children[i]];
		if (n->kind == SF_NODE_VFILE && !strcmp(n->name, name))
			return n->vfile;
	}
	return NULL;
}

static uint32_t child_dir(const sf_mount *m, uint32_t dir, const char *name)
{
	const sf_node *d = &m->nodes[dir];

	for (uint32_t i = 0; i < d->child_count; i++)
		if (m->nodes[d->children[i]].kind == SF_NODE_DIR &&
		    !strcmp(m->nodes[d->children[i]].name, name))
			return d->children[i];
	return UINT32_MAX;
}

/* registered/<stem>.ome.tif of slide i, or NULL when it is not served. */
static const sf_vfile *registered_vfile(const sf_mount *m, uint32_t reg, uint32_t i)
{
	char name[NAME_MAX + 1];

	snprintf(name, sizeof name, "%s.ome.tif", m->dataset->slide_stems[i]);
	return child_vfile(m, reg, name);
}

/* The channel an overlay shows of slide s: the one reg_channel names, as the
 * registration used; the default one for a slide that lacks it (a slide
 * warped through a transform file was never registered on it). */
static uint32_t qc_channel(const sf_mount *m, const sf_slide_info *s)
{
	uint32_t c;
	sf_err e;

	if (sf_qc_channel(s, m->opts->reg.channel, &c, &e) != SF_OK)
		sf_qc_channel(s, NULL, &c, &e);
	return c;
}

/* qc/<stem>.png for each moving slide served in registered/: the overlay of
 * the reference's and the warped slide's registration channels (qc.h),
 * rendered on first use.  No qc/ folder when no moving slide is served. */
static int build_qc(sf_mount *m, uint32_t root, sf_err *e)
{
	const sf_dataset *d = m->dataset;
	uint32_t reg = child_dir(m, root, "registered"), dir = UINT32_MAX, idx;
	const sf_vfile *ref_file;
	int rc = SF_OK;

	if (m->reference < 0 || !m->slide_state || reg == UINT32_MAX ||
	    !(ref_file = registered_vfile(m, reg, (uint32_t)m->reference)))
		return SF_OK;
	sf_qc_side ref = {ref_file, qc_channel(m, d->slides[m->reference])};
	for (uint32_t i = 0; i < d->slide_count && rc == SF_OK; i++) {
		const sf_vfile *mov_file = registered_vfile(m, reg, i);
		char name[NAME_MAX + 1];

		if ((int)i == m->reference || !mov_file)
			continue;
		sf_qc_side mov = {mov_file, qc_channel(m, d->slides[i])};
		snprintf(name, sizeof name, "%s.png", d->slide_stems[i]);
		if (dir == UINT32_MAX)
			rc = node_add(m, root, "qc", SF_NODE_DIR, &dir, e);
		if (rc == SF_OK)
			rc = node_add(m, dir, name, SF_NODE_QC, &idx, e);
		if (rc == SF_OK && sf_autoreg_has(m->autoreg, i))
			m->nodes[idx].autoreg_slide = (int32_t)i;
		if (rc == SF_OK)
			rc = sf_qc_create(&ref, &mov, name, &m->nodes[idx].qc, e);
		if (rc == SF_OK) { /* the overlay shows both slides' pixels */
			const char *src[2] = {d->slides[i]->path, d->slides[m->reference]->path};
			struct stat src_attr;
			source_attr(src, 2, &src_attr);
			stat_derived(m, &m->nodes[idx].st, &src_attr, 0);
		}
	}
	return rc;
}

/* The attributes every deconvolved plane of st gets: a plane mixes its
 * neighbours, so the read permission all plane files share (source_attr). */
static int stack_attr(const sf_stack *st, struct stat *src_attr, sf_err *e)
{
	uint32_t n = st->multipage ? 1 : st->planes;
	const char **src = calloc(n, sizeof *src);

	if (!src)
		return sf_fail(e, SF_ENOMEM, "out of memory");
	for (uint32_t z = 0; z < n; z++)
		src[z] = st->plane_info[z]->path;
	source_attr(src, n, src_attr);
	free(src);
	return SF_OK;
}

/* deconvolved/<stack>/<plane> for each stack (planes at the top for RAW_DIR itself). */
static int add_stack(sf_mount *m, uint32_t top, const sf_stack *st, sf_err *e)
{
	const sf_slide_info *first = st->plane_info[0];
	sf_layout_spec spec = {0};
	sf_deconv_settings ds;
	sf_layout *layout;
	sf_product *blocks, *product;
	uint32_t dir = top;
	int rc;

	/* Settings first: a stack that cannot be deconvolved gets no folder. */
	rc = sf_deconv_settings_for_stack(m->dataset->root, st, m->opts->deconv, m->opts->gpu, &ds,
	                                  e);
	if (rc != SF_OK)
		return rc;
	spec.width = st->width;
	spec.height = st->height;
	spec.pages = 1;
	spec.samples = first->samples;
	spec.dtype = sf_deconv_output_dtype(&ds, st);
	spec.tile = 0;
	spec.levels = 1;
	spec.bigtiff = -1;
	/* ImageJ's own calibration (the settings hold nm), so that Fiji's Image
	 * Sequence import shows the stack in microns, not pixels. */
	spec.imagej_pixel_um = ds.params.dxy / 1000.0;
	spec.imagej_spacing_um = ds.params.dz / 1000.0;
	rc = sf_layout_create(&spec, &layout, e);
	if (rc != SF_OK || (rc = keep_layout(m, layout, e)) != SF_OK)
		return rc;
	/* The planes product reads blocks through m->engine, started later. */
	rc = sf_product_deconv_create(st, &ds, layout, &m->engine, m->opts->cache_dir, m->opts->mem,
	                              &blocks, &product, e);
	if (rc != SF_OK)
		return rc;
	if ((rc = keep_product(m, blocks, e)) != SF_OK) {
		product->ops->destroy(product);
		return rc;
	}
	if ((rc = keep_product(m, product, e)) != SF_OK)
		return rc;
	if (st->name[0] && (rc = node_add(m, top, st->name, SF_NODE_DIR, &dir, e)) != SF_OK)
		return rc;
	struct stat src_attr;
	if ((rc = stack_attr(st, &src_attr, e)) != SF_OK)
		return rc;
	char conf[2][PATH_MAX];
	uint32_t watch_first = m->watch_count, conf_count;
	conf_count = sf_deconv_conf_paths(m->dataset->root, st, conf);
	for (uint32_t i = 0; i < conf_count && rc == SF_OK; i++)
		rc = watch_add(m, conf[i], "deconvolved",
		               "remount to deconvolve with the new settings", e);
	for (uint32_t z = 0; z < st->planes && rc == SF_OK; z++) {
		rc = add_vfile(m, dir, st->plane_names[z], layout, product,
		               (uint64_t)z * sf_layout_unit_count(layout), &src_attr, e);
		if (rc == SF_OK) {
			m->nodes[m->node_count - 1].watch_first = watch_first;
			m->nodes[m->node_count - 1].watch_count = conf_count;
		}
	}
	return rc;
}

/* Record why stack st is not served, for .scopefs/status "problems". */
static int stack_problem(sf_dataset *d, const sf_stack *st, const char *reason, sf_err *e)
{
	char path[PATH_MAX];

	if (st->multipage)
		snprintf(path, sizeof path, "%s", st->plane_info[0]->path);
	else
		snprintf(path, sizeof path, "%s%s%s", d->root, st->name[0] ? "/" : "", st->name);
	return mount_problem(d, path, reason, e);
}

static int build_deconvolved(sf_mount *m, uint32_t root, sf_err *e)
{
	uint32_t dir;
	int rc;

	if (!m->dataset->stack_count)
		return SF_OK;
	m->stack_state = calloc(m->dataset->stack_count, sizeof *m->stack_state);
	if (!m->stack_state)
		return sf_fail(e, SF_ENOMEM, "out of memory");
	rc = node_add(m, root, "deconvolved", SF_NODE_DIR, &dir, e);
	for (uint32_t i = 0; i < m->dataset->stack_count && rc == SF_OK; i++) {
		const sf_stack *st = m->dataset->stacks[i];
		char state[sizeof e->msg + 16];

		rc = add_stack(m, dir, st, e);
		snprintf(state, sizeof state, "served");
		if (rc != SF_OK && rc != SF_ENOMEM) {
			sf_log(SF_LOG_WARN, "deconvolved: stack %s left out: %s", st->name, e->msg);
			snprintf(state, sizeof state, "not served: %s", e->msg);
			rc = stack_problem(m->dataset, st, e->msg, e);
		}
		if (rc == SF_OK && !(m->stack_state[i] = strdup(state)))
			rc = sf_fail(e, SF_ENOMEM, "out of memory");
	}
	return rc;
}

/* mkdir -p of the cache folder's parents (the cache makes the folder itself). */
static int make_parents(const char *dir, sf_err *e)
{
	char path[PATH_MAX];

	if ((size_t)snprintf(path, sizeof path, "%s", dir) >= sizeof path)
		return sf_fail(e, SF_EINVAL, "option 'cache': path too long");
	for (char *p = path + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(path, 0755) != 0 && errno != EEXIST)
			return sf_fail(e, SF_EIO, "option 'cache': cannot create %s: %s", path,
			               strerror(errno));
		*p = '/';
	}
	return SF_OK;
}

static int by_name(const void *a, const void *b, void *nodes)
{
	const sf_node *n = nodes;
	return strcmp(n[*(const uint32_t *)a].name, n[*(const uint32_t *)b].name);
}

int sf_mount_build(const sf_options *o, sf_mount **out, sf_err *e)
{
	sf_mount *m = calloc(1, sizeof *m);
	uint32_t root, raw, meta, status;
	int rc;

	if (!m)
		return sf_fail(e, SF_ENOMEM, "out of memory");
	if (pthread_mutex_init(&m->handles_lock, NULL) != 0) {
		free(m);
		return sf_fail(e, SF_ENOMEM, "cannot make a mutex");
	}
	m->opts = o;
	clock_gettime(CLOCK_REALTIME, &m->mounted_at);
	rc = sf_dataset_scan(o->raw_dir, &m->dataset, e);
	if (rc == SF_OK)
		rc = make_parents(o->cache_dir, e);
	if (rc == SF_OK)
		rc = sf_cache_open(o->cache_dir, o->cache_size, &m->cache, e);
	if (rc == SF_OK)
		rc = node_add(m, UINT32_MAX, "", SF_NODE_DIR, &root, e);
	if (rc == SF_OK)
		rc = node_add(m, root, "raw", SF_NODE_DIR, &raw, e);
	if (rc == SF_OK)
		rc = raw_walk(m, m->dataset->root, raw, 0, e);
	if (rc == SF_OK)
		rc = build_registered(m, root, e);
	if (rc == SF_OK)
		rc = build_qc(m, root, e);
	if (rc == SF_OK)
		rc = build_transforms(m, root, e);
	if (rc == SF_OK)
		rc = build_deconvolved(m, root, e);
	if (rc == SF_OK)
		rc = node_add(m, root, ".scopefs", SF_NODE_DIR, &meta, e);
	if (rc == SF_OK &&
	    (rc = node_add(m, meta, "status", SF_NODE_STATUS, &status, e)) == SF_OK) {
		stat_virtual(m, &m->nodes[status].st, S_IFREG | 0444, 0);
	}
	if (rc != SF_OK) {
		sf_mount_free(m);
		return rc;
	}
	for (uint32_t i = 0; i < m->node_count; i++)
		if (m->nodes[i].child_count)
			qsort_r(m->nodes[i].children, m->nodes[i].child_count, sizeof(uint32_t),
			        by_name, m->nodes);
	*out = m;
	return SF_OK;
}

/* mem= below one decoded unit still keeps one unit in RAM (engine.c): say so,
 * naming the product with the largest unit, rather than seem to obey it. */
static void warn_mem_below_unit(const sf_mount *m)
{
	const sf_product *big = NULL;
	size_t most = 0;

	for (uint32_t i = 0; i < m->product_count; i++) {
		const sf_product *p = m->products[i];
		size_t bytes = p->unit_count ? p->ops->unit_bytes(p, 0) : 0;
		if (bytes > most) {
			most = bytes;
			big = p;
		}
	}
	if (big && m->opts->mem < most)
		sf_log(SF_LOG_WARN,
		       "mem=%llu bytes is below one decoded unit (%zu bytes, %s): RAM keeps one "
		       "unit at a time, and reads re-decode from the disk cache",
		       (unsigned long long)m->opts->mem, most, big->name);
}

int sf_mount_start(sf_mount *m, sf_err *e)
{
	sf_engine_config cfg = {
	    .threads = m->opts->threads,
	    .mem_bytes = m->opts->mem,
	    .cache = m->cache,
	    .max_products = m->product_count,
	};
	int rc = sf_engine_create(&cfg, &m->engine, e);

	warn_mem_below_unit(m);
	for (uint32_t i = 0; rc == SF_OK && i < m->product_count; i++)
		rc = sf_engine_add_product(m->engine, m->products[i], e);
	if (rc == SF_OK && m->autoreg && m->opts->reg.eager)
		rc = sf_autoreg_start(m->autoreg, e);
	return rc;
}

void sf_mount_stop(const sf_mount *m)
{
	if (m->engine)
		sf_engine_stop_products(m->engine);
	if (m->autoreg)
		sf_autoreg_stop(m->autoreg);
}

/* Whether n, tied to a registration that gave t, shows: a field file only
 * when t has a field. */
static int shows_with(const sf_node *n, const sf_transform *t)
{
	return n->kind != SF_NODE_TRANSFORM || t->map.nfields > 0 ||
	       n->transform_file == SF_AUTOREG_JSON || n->transform_file == SF_AUTOREG_ELASTIX;
}

int sf_mount_node_visible(const sf_mount *m, const sf_node *n)
{
	const sf_transform *t;
	sf_err e = {0};

	if (n->autoreg_slide < 0)
		return 1;
	if (sf_autoreg_wait(m->autoreg, (uint32_t)n->autoreg_slide, &t, &e) != SF_OK)
		return 0;
	return shows_with(n, t);
}

sf_node_shown sf_mount_node_poll(const sf_mount *m, const sf_node *n)
{
	const sf_transform *t = NULL;

	if (n->autoreg_slide < 0)
		return SF_SHOWN;
	switch (sf_autoreg_poll(m->autoreg, (uint32_t)n->autoreg_slide, &t)) {
	case SF_AUTOREG_SERVED: return shows_with(n, t) ? SF_SHOWN : SF_HIDDEN;
	case SF_AUTOREG_REJECTED: return SF_HIDDEN;
	default: return SF_PENDING;
	}
}

void sf_mount_dir_settle(const sf_mount *m, const sf_node *dir)
{
	for (uint32_t i = 0; dir->kind == SF_NODE_DIR && i < dir->child_count; i++)
		(void)sf_mount_node_visible(m, &m->nodes[dir->children[i]]);
}

void sf_mount_free(sf_mount *m)
{
	if (!m)
		return;
	if (m->engine)
		sf_engine_destroy(m->engine);
	for (uint32_t i = 0; i < m->product_count; i++)
		m->products[i]->ops->destroy(m->products[i]);
	sf_autoreg_destroy(m->autoreg); /* after the products that borrow its transforms */
	free(m->transforms_dir);
	for (uint32_t i = 0; i < m->vfile_count; i++)
		free(m->vfiles[i]);
	for (uint32_t i = 0; i < m->layout_count; i++)
		sf_layout_free(m->layouts[i]);
	for (uint32_t i = 0; i < m->node_count; i++) {
		free(m->nodes[i].name);
		free(m->nodes[i].children);
		free(m->nodes[i].raw_path);
		sf_qc_free(m->nodes[i].qc);
	}
	if (m->cache)
		sf_cache_close(m->cache);
	free(m->products);
	free(m->vfiles);
	free(m->layouts);
	free(m->nodes);
	for (uint32_t i = 0; i < m->watch_count; i++)
		free(m->watches[i].path);
	free(m->watches);
	for (uint32_t i = 0; m->slide_state && i < m->dataset->slide_count; i++) {
		free(m->slide_state[i].state);
		free(m->slide_state[i].transform_path);
		sf_transform_release(&m->slide_state[i].transform);
	}
	free(m->slide_state);
	for (uint32_t i = 0; m->stack_state && i < m->dataset->stack_count; i++)
		free(m->stack_state[i]);
	free(m->stack_state);
	sf_dataset_free(m->dataset);
	pthread_mutex_destroy(&m->handles_lock);
	free(m);
}

const sf_node *sf_mount_node(const sf_mount *m, uint64_t ino)
{
	return ino >= 1 && ino <= m->node_count ? &m->nodes[ino - 1] : NULL;
}

const sf_node *sf_mount_lookup(const sf_mount *m, uint64_t parent, const char *name)
{
	const sf_node *p = sf_mount_node(m, parent);
	uint32_t lo = 0, hi;

	if (!p || p->kind != SF_NODE_DIR)
		return NULL;
	hi = p->child_count;
	while (lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2;
		int cmp = strcmp(name, m->nodes[p->children[mid]].name);
		if (!cmp)
			return &m->nodes[p->children[mid]];
		if (cmp < 0)
			hi = mid;
		else
			lo = mid + 1;
	}
	return NULL;
}

/* dataset.c — scan RAW_DIR: which files are whole-slide images and which
 * files or folders are z-stacks.  The rules are written out in
 * docs/dataset.md; in short:
 *   - names starting with '.' are ignored, and so is every file without a
 *     TIFF-family extension (sf_file_stem's list);
 *   - a folder (RAW_DIR or a direct subfolder) whose TIFF files are all
 *     plane-like (one page, one level, untiled, one sample; plain or OME) and of one size
 *     and type, two or more of them, is a stack of planes;
 *   - a TIFF directly in RAW_DIR that is a multi-page stack file (or ImageJ's
 *     one-IFD layout of a stack over 4 GiB) is a stack, unless it is a time
 *     series, a page breaks its run of planes or it states planes it does
 *     not hold (then it is a problem);
 *   - a z-stack of several channels directly in RAW_DIR (OME SizeC and
 *     SizeZ > 1, or ImageJ channels= and slices= > 1) is one stack per
 *     channel, <stem>_c<C>, or a problem on the same terms;
 *   - any other TIFF directly in RAW_DIR is a whole-slide image, unless it
 *     is a time series whose pages hold more than one time point (then it
 *     is a problem, like a time-series stack file).
 * Invariants:
 *  - nothing is ever written, and no symbolic link is followed to a target
 *    outside RAW_DIR;
 *  - every name list is in natural order (strverscmp: img_2 < img_10, and
 *    plain byte order for zero-padded names);
 *  - a file or folder that cannot be used becomes one sf_problem and the
 *    scan goes on; only an unusable RAW_DIR fails the scan;
 *  - slide stems are unique among slides and stack names among stacks. */
#include "scopefs/dataset.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "scopefs/log.h"

/* Image extensions, longest first so ".ome.tif" wins over ".tif". */
static const char *const image_exts[] = {
    ".ome.tiff", ".ome.tif", ".ome.btf", ".ome.tf2", ".ome.tf8", ".qptiff",
    ".tiff",     ".tif",     ".svs",     ".btf",     ".tf2",     ".tf8",
};

/* Length of name's image extension, 0 if it has none (case-insensitive). */
static size_t image_ext_len(const char *name)
{
	size_t n = strlen(name);
	for (size_t i = 0; i < sizeof image_exts / sizeof image_exts[0]; i++) {
		size_t k = strlen(image_exts[i]);
		if (n > k && strcasecmp(name + n - k, image_exts[i]) == 0)
			return k;
	}
	return 0;
}

char *sf_file_stem(const char *name)
{
	return strndup(name, strlen(name) - image_ext_len(name));
}

/* ---- the dataset under construction -------------------------------------- */

static int add_problem(sf_dataset *d, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int add_problem(sf_dataset *d, const char *path, const char *fmt, ...)
{
	sf_problem *np = realloc(d->problems, (d->problem_count + 1) * sizeof *np);
	if (!np)
		return SF_ENOMEM;
	d->problems = np;
	sf_problem *p = &d->problems[d->problem_count];
	va_list ap;
	va_start(ap, fmt);
	int n = vasprintf(&p->reason, fmt, ap);
	va_end(ap);
	p->path = strdup(path);
	if (n < 0 || !p->path) {
		free(p->path);
		if (n >= 0)
			free(p->reason);
		return SF_ENOMEM;
	}
	d->problem_count++;
	sf_log(SF_LOG_WARN, "%s: left out: %s", path, p->reason);
	return SF_OK;
}

int sf_dataset_add_problem(sf_dataset *d, const char *path, const char *reason)
{
	for (uint32_t i = 0; i < d->problem_count; i++)
		if (!strcmp(d->problems[i].path, path))
			return SF_OK;
	return add_problem(d, path, "%s", reason);
}

static void stack_free(sf_stack *st)
{
	if (!st)
		return;
	for (uint32_t i = 0; i < st->planes; i++) {
		if (st->plane_names)
			free(st->plane_names[i]);
		if (st->plane_info)
			sf_slide_info_free(st->plane_info[i]);
	}
	free(st->plane_names);
	free(st->plane_info);
	free(st->name);
	free(st);
}

void sf_dataset_free(sf_dataset *d)
{
	if (!d)
		return;
	for (uint32_t i = 0; i < d->slide_count; i++) {
		sf_slide_info_free(d->slides[i]);
		free(d->slide_stems[i]);
	}
	free(d->slides);
	free(d->slide_stems);
	for (uint32_t i = 0; i < d->stack_count; i++)
		stack_free(d->stacks[i]);
	free(d->stacks);
	for (uint32_t i = 0; i < d->problem_count; i++) {
		free(d->problems[i].path);
		free(d->problems[i].reason);
	}
	free(d->problems);
	free(d->root);
	free(d);
}

/* ---- listing a folder ---------------------------------------------------- */

typedef struct dir_entry {
	char *name;
	char *path; /* folder path + "/" + name */
	int is_dir;
} dir_entry;

typedef struct listing {
	dir_entry *items;
	uint32_t count;
} listing;

static void listing_free(listing *ls)
{
	for (uint32_t i = 0; i < ls->count; i++) {
		free(ls->items[i].name);
		free(ls->items[i].path);
	}
	free(ls->items);
	memset(ls, 0, sizeof *ls);
}

static int by_name(const void *a, const void *b)
{
	return strverscmp(((const dir_entry *)a)->name, ((const dir_entry *)b)->name);
}

/* path lies inside root_real (an absolute path without a trailing '/'). */
static int inside_root(const char *path, const char *root_real)
{
	size_t n = strlen(root_real);
	return strncmp(path, root_real, n) == 0 && (path[n] == '/' || path[n] == '\0');
}

const char *sf_special_kind(mode_t mode)
{
	return S_ISFIFO(mode)   ? "fifo"
	       : S_ISSOCK(mode) ? "socket"
	       : S_ISCHR(mode)  ? "character device"
	       : S_ISBLK(mode)  ? "block device"
	                        : "unknown type";
}

/* The type of entry name in folder fd: 'f' regular file, 'd' folder, 0 for
 * anything else.  A symbolic link counts as its target only if the target
 * resolves inside RAW_DIR; otherwise it is left out (a problem if it looks
 * like an image or is a folder link).  Anything else that is not a regular
 * file or folder (a fifo, socket or device: reading it would block or
 * never end) is left out with a problem.  *holes counts the image-named
 * entries left out: each would be a missing plane of a plane folder. */
static int entry_type(sf_dataset *d, int fd, const char *name, const char *path, uint32_t *holes,
                      int *rc)
{
	struct stat st;
	int relevant = image_ext_len(name) > 0;
	*rc = SF_OK;
	if (fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) != 0)
		return 0;
	if (S_ISLNK(st.st_mode)) {
		char *target = realpath(path, NULL);
		if (!target) {
			if (relevant) {
				*rc = add_problem(d, path, "broken symbolic link");
				++*holes;
			}
			return 0;
		}
		int ok = inside_root(target, d->root) && stat(target, &st) == 0;
		if (!ok && (relevant || (stat(target, &st) == 0 && S_ISDIR(st.st_mode)))) {
			*rc = add_problem(d, path, "symbolic link leads outside RAW_DIR (to %s)",
			                  target);
			*holes += relevant;
		}
		free(target);
		if (!ok)
			return 0;
	}
	if (S_ISREG(st.st_mode) || S_ISDIR(st.st_mode))
		return S_ISREG(st.st_mode) ? 'f' : 'd';
	*rc = add_problem(d, path, "not a regular file (%s)", sf_special_kind(st.st_mode));
	*holes += relevant;
	return 0;
}

/* Why a folder with an image name inside a plane folder is left out. */
#define PLANE_FOLDER_REASON "a folder named like a plane; the planes of a plane folder are files"

/* List folder dir: subfolders (if want_dirs) and files with an image
 * extension, in natural name order.  Hidden names are skipped.  *holes:
 * the image-named entries left out (entry_type), and without want_dirs the
 * image-named folders (each also a problem). */
static int list_folder(sf_dataset *d, const char *dir, int want_dirs, listing *out, uint32_t *holes,
                       sf_err *e)
{
	memset(out, 0, sizeof *out);
	*holes = 0;
	DIR *dh = opendir(dir);
	if (!dh)
		return sf_fail(e, errno == ENOENT ? SF_ENOTFOUND : SF_EIO, "%s: cannot list: %s",
		               dir, strerror(errno));
	uint32_t cap = 0;
	int rc = SF_OK;
	struct dirent *de;
	while (rc == SF_OK && (errno = 0, de = readdir(dh)) != NULL) {
		if (de->d_name[0] == '.')
			continue;
		char *path = NULL;
		if (asprintf(&path, "%s/%s", dir, de->d_name) < 0) {
			rc = sf_fail(e, SF_ENOMEM, "%s: out of memory", dir);
			break;
		}
		int type = entry_type(d, dirfd(dh), de->d_name, path, holes, &rc);
		int keep = (type == 'd' && want_dirs) || (type == 'f' && image_ext_len(de->d_name));
		if (!rc && type == 'd' && !want_dirs && image_ext_len(de->d_name)) {
			/* Left out like a fifo: it stands where a plane would be, so
			 * serving the folder without it would shift every later plane. */
			rc = add_problem(d, path, "%s", PLANE_FOLDER_REASON);
			++*holes;
		}
		if (rc || !keep) {
			free(path);
			if (rc)
				rc = sf_fail(e, SF_ENOMEM, "%s: out of memory", dir);
			continue;
		}
		if (out->count == cap) {
			cap = cap ? cap * 2 : 16;
			dir_entry *ni = realloc(out->items, cap * sizeof *ni);
			if (!ni) {
				free(path);
				rc = sf_fail(e, SF_ENOMEM, "%s: out of memory", dir);
				break;
			}
			out->items = ni;
		}
		dir_entry *it = &out->items[out->count];
		it->name = strdup(de->d_name);
		it->path = path;
		it->is_dir = type == 'd';
		out->count++;
		if (!it->name)
			rc = sf_fail(e, SF_ENOMEM, "%s: out of memory", dir);
	}
	if (rc == SF_OK && errno != 0)
		rc = sf_fail(e, SF_EIO, "%s: cannot list: %s", dir, strerror(errno));
	closedir(dh);
	if (rc) {
		listing_free(out);
		return rc;
	}
	if (out->count > 1)
		qsort(out->items, out->count, sizeof *out->items, by_name);
	return SF_OK;
}

/* ---- classifying probed files -------------------------------------------- */

/* The TIFF files of one folder, probed. */
typedef struct probed {
	const dir_entry *entry;
	sf_slide_info *info; /* NULL if the probe failed */
	sf_err err;
} probed;

/* An ImageJ file that states several z-planes in one page and is not read
 * as ImageJ's layout for stacks over 4 GiB (the probe reports those planes as
 * channels, sf_slide_info.contig_planes): another layout, or a file cut
 * short.  Either way its one page is not the whole image.  (One-page OME
 * files state the SizeZ of a multi-file series, so they do not count.) */
static int one_page_states_planes(const sf_slide_info *s)
{
	return !s->is_ome && s->channels == 1 && (s->stated_z > 1 || s->stated_images > 1);
}

/* One page, one level, untiled, one sample: a plain TIFF or a one-page
 * OME-TIFF (Micro-Manager and others write a folder of those). */
static int plane_like(const sf_slide_info *s)
{
	return (s->kind == SF_SLIDE_FLAT || s->kind == SF_SLIDE_OME) && s->channels == 1 &&
	       s->level_count == 1 && !s->tiled && s->samples == 1 && !one_page_states_planes(s);
}

static int same_plane_shape(const sf_slide_info *a, const sf_slide_info *b)
{
	return a->width == b->width && a->height == b->height && a->dtype == b->dtype;
}

/* A file whose pages would be z-planes (docs/dataset.md, rule 2): one
 * sample, and OME-XML with SizeZ > 1 and SizeC <= 1, or no OME-XML, FLAT,
 * untiled and not stating channels; with two or more planes, a page that
 * breaks their run or an ImageJ slices= > 1 in one page (then, unless the
 * probe read its planes, it is a stack that cannot be served, not a 2D slide
 * of its first plane, whatever else it states). */
static int stack_candidate(const sf_slide_info *s)
{
	if (one_page_states_planes(s))
		return 1;
	if (s->samples != 1 || (s->channels < 2 && !s->odd_page))
		return 0;
	if (s->is_ome)
		return s->stated_z > 1 && s->stated_c <= 1;
	return s->kind == SF_SLIDE_FLAT && s->level_count == 1 && !s->tiled && s->stated_c <= 1;
}

/* Why s, a time series (OME SizeT or ImageJ frames > 1), is not served:
 * "<name> is a time series (SizeT=3): <what>"; NULL if it is none.  Served
 * as one image, its time points would be mixed into one z-stack or folded
 * into the channels of one slide.  Writes into buf. */
static const char *time_series_fault(const sf_slide_info *s, const char *name, const char *what,
                                     char *buf, size_t cap)
{
	if (s->stated_t <= 1)
		return NULL;
	snprintf(buf, cap, "%s is a time series (%s=%u): %s", name, s->is_ome ? "SizeT" : "frames",
	         s->stated_t, what);
	return buf;
}

/* Why a stack candidate cannot be served as one z-stack; NULL if it can.
 * name is the file name; writes into buf. */
static const char *stack_file_fault(const sf_slide_info *s, const char *name, char *buf, size_t cap)
{
	if (time_series_fault(s, name,
	                      "deconvolved/ takes one z-stack per file; split the time points "
	                      "into files or folders",
	                      buf, cap))
		return buf;
	if (s->odd_page) {
		snprintf(buf, cap,
		         "%s: %s; the pages of a stack file must all have one size and type "
		         "(only reduced-resolution pages and thumbnails may follow them)",
		         name, s->odd_page_text);
		return buf;
	}
	return NULL;
}

/* Why a single-channel stack file does not hold the planes it states
 * (OME SizeZ, ImageJ slices=); NULL if it does or states nothing.  Served
 * as its pages, it would silently lose or shift planes (tifffile calls such
 * a file corrupted).  name is the file name; writes into buf. */
static const char *stated_planes_fault(const sf_slide_info *s, const char *name, char *buf,
                                       size_t cap)
{
	const char *key = s->is_ome ? "SizeZ" : "slices";
	if (one_page_states_planes(s) && s->stated_z <= 1) {
		/* images=N with no slices=: which axis the N planes run along is
		 * unknown, and serving the one page would show plane 0 alone. */
		snprintf(buf, cap,
		         "%s states %u images (ImageJ images=%u) but has 1 page and no slices=: "
		         "scopefs reads ImageJ's layout for stacks over 4 GiB (all planes after "
		         "one page) only for a z-stack that states slices=; save the stack as one "
		         "page per plane, as a folder of planes, or with axes ZYX",
		         name, s->stated_images, s->stated_images);
		return buf;
	}
	if (s->stated_z == 0 || s->stated_z == s->channels)
		return NULL;
	if (one_page_states_planes(s) && s->contig_planes) {
		snprintf(buf, cap,
		         "%s holds %u of %u planes: it is ImageJ's layout for stacks over 4 GiB "
		         "(ImageJ %s=%u, the planes one after another after its one page), cut "
		         "short at %llu bytes (plane %u would end at byte %llu)",
		         name, s->contig_held, s->contig_planes, key, s->stated_z,
		         (unsigned long long)s->file_size, s->contig_held + 1,
		         (unsigned long long)(s->contig_offset +
		                              (s->contig_held + 1ull) * s->contig_stride));
		return buf;
	}
	if (one_page_states_planes(s)) {
		snprintf(buf, cap,
		         "%s states %u planes (ImageJ %s=%u) but has 1 page, and %s; scopefs "
		         "reads ImageJ's layout for stacks over 4 GiB (all planes after one "
		         "page) only for one uncompressed, untiled channel of one sample per "
		         "pixel: save the stack as one page per plane or as a folder of planes",
		         name, s->stated_z, key, s->stated_z,
		         s->contig_fault[0] ? s->contig_fault : "its layout is not read");
		return buf;
	}
	snprintf(buf, cap,
	         "%s states %u planes (%s %s=%u) but has %u pages of %ux%u %s; a stack file must "
	         "hold every plane it states%s",
	         name, s->stated_z, s->is_ome ? "OME" : "ImageJ", key, s->stated_z, s->channels,
	         s->width, s->height, sf_dtype_ome_name(s->dtype),
	         s->is_ome ? " (planes in other files of a multi-file OME-TIFF are not joined)"
	                   : "");
	return buf;
}

/* A z-stack of several channels (docs/dataset.md, section 3): OME-XML with
 * SizeC > 1 and SizeZ > 1, or an ImageJ hyperstack with channels= > 1 and
 * slices= > 1 (what Fiji saves for a multichannel z-stack; as a slide its
 * z-planes would become channels).  Each channel becomes a stack of its
 * own, or the file a problem.  An ImageJ time series (frames= > 1) is left
 * to slide_fault's refusal. */
static int multichannel_candidate(const sf_slide_info *s)
{
	if (s->samples != 1 || s->stated_c <= 1 || s->stated_z <= 1)
		return 0;
	/* One page stating planes: stated_planes_fault says why its layout is
	 * not read, which says more than a page count. */
	if (one_page_states_planes(s))
		return 0;
	return s->is_ome || s->stated_t <= 1;
}

/* The order of s's pages: the OME DimensionOrder, or for an ImageJ file
 * (which states no order) ImageJ's own, channel fastest, then slice, then
 * frame: XYCZT. */
static const char *page_order(const sf_slide_info *s)
{
	return s->is_ome ? s->dimension_order : "XYCZT";
}

/* Where channel c's planes lie among s's pages: page first + z * step.  With
 * SizeT <= 1 only the order of Z and C in page_order matters: Z first
 * (XYZCT, XYZTC, XYTZC), a channel's planes are consecutive; C first (XYCZT,
 * XYCTZ, XYTCZ), they are SizeC pages apart.  0 if the order is not one of
 * OME's six. */
static int channel_pages(const sf_slide_info *s, uint32_t c, uint32_t *first, uint32_t *step)
{
	const char *o = page_order(s);
	const char *z = strchr(o, 'Z'), *ch = strchr(o, 'C');
	if (strlen(o) != 5 || strncmp(o, "XY", 2) != 0 || !z || !ch || !strchr(o, 'T'))
		return 0;
	if (z < ch) {
		*first = c * s->stated_z;
		*step = 1;
	} else {
		*first = c;
		*step = s->stated_c;
	}
	return 1;
}

/* Why a multichannel candidate cannot be split into its channels' stacks;
 * NULL if it can.  name is the file name; writes into buf. */
static const char *multichannel_fault(const sf_slide_info *s, const char *name, char *buf,
                                      size_t cap)
{
	const char *fault = stack_file_fault(s, name, buf, cap);
	uint64_t want = (uint64_t)s->stated_c * s->stated_z;
	uint32_t first, step;
	if (fault)
		return fault;
	if (!channel_pages(s, 0, &first, &step)) {
		snprintf(buf, cap,
		         "%s: OME DimensionOrder '%s' is not one of XYZCT, XYZTC, XYTZC, XYCZT, "
		         "XYCTZ, XYTCZ, so its channels' pages cannot be told apart",
		         name, s->dimension_order);
		return buf;
	}
	if (s->channels != want) {
		snprintf(buf, cap,
		         "%s has %u pages of %ux%u %s, but %s=%u x %s=%u needs %llu; "
		         "the channels cannot be told apart",
		         name, s->channels, s->width, s->height, sf_dtype_ome_name(s->dtype),
		         s->is_ome ? "SizeC" : "channels", s->stated_c,
		         s->is_ome ? "SizeZ" : "slices", s->stated_z, (unsigned long long)want);
		return buf;
	}
	return NULL;
}

static const char *shape_text(const sf_slide_info *s, char *buf, size_t cap)
{
	snprintf(buf, cap, "%ux%u %s", s->width, s->height, sf_dtype_ome_name(s->dtype));
	return buf;
}

/* Why a good file cannot be a plane of a stack folder (not plane_like). */
static const char *not_plane_reason(const sf_slide_info *s)
{
	if (s->tiled)
		return "is tiled";
	if (s->samples != 1)
		return "has 3 samples per pixel (RGB)";
	if (s->level_count > 1)
		return "is a pyramid";
	if (s->contig_planes > 1 && s->channels > 1)
		return "holds several z-planes (ImageJ's one-page layout over 4 GiB)";
	if (s->channels > 1)
		return "has several pages";
	if (one_page_states_planes(s))
		return "states several z-planes (ImageJ slices= or images=) in one page";
	if (s->kind == SF_SLIDE_SVS)
		return "is an Aperio SVS slide";
	return "is not a plain 2D image";
}

/* The index of a plane whose shape most planes share (Boyer-Moore vote),
 * so the odd plane is the one reported. */
static uint32_t majority_plane(const probed *files, uint32_t n)
{
	uint32_t cand = 0, votes = 0;
	for (uint32_t i = 0; i < n; i++) {
		if (votes == 0) {
			cand = i;
			votes = 1;
		} else {
			if (same_plane_shape(files[cand].info, files[i].info))
				votes++;
			else
				votes--;
		}
	}
	return cand;
}

/* Why files (a folder's TIFFs) are not a stack of planes; NULL if they
 * are.  Writes into buf. */
static const char *stack_fault(const probed *files, uint32_t n, char *buf, size_t cap)
{
	char a[64], b[64];
	if (n < 2) {
		snprintf(buf, cap, "only one TIFF file (%s); a plane folder needs two or more",
		         n ? files[0].entry->name : "");
		return buf;
	}
	for (uint32_t i = 0; i < n; i++) {
		if (!files[i].info) {
			snprintf(buf, cap, "plane %s: %s", files[i].entry->name, files[i].err.msg);
			return buf;
		}
	}
	for (uint32_t i = 0; i < n; i++) {
		if (!plane_like(files[i].info)) {
			snprintf(buf, cap,
			         "plane %s %s; planes must be single-page untiled 2D TIFFs",
			         files[i].entry->name, not_plane_reason(files[i].info));
			return buf;
		}
	}
	uint32_t m = majority_plane(files, n);
	for (uint32_t i = 0; i < n; i++) {
		if (!same_plane_shape(files[m].info, files[i].info)) {
			snprintf(buf, cap, "plane %s is %s, plane %s (like most) is %s",
			         files[i].entry->name, shape_text(files[i].info, a, sizeof a),
			         files[m].entry->name, shape_text(files[m].info, b, sizeof b));
			return buf;
		}
	}
	return NULL;
}

static int push_stack(sf_dataset *d, sf_stack *st)
{
	sf_stack **ns = realloc(d->stacks, (d->stack_count + 1) * sizeof *ns);
	if (!ns)
		return SF_ENOMEM;
	d->stacks = ns;
	d->stacks[d->stack_count++] = st;
	return SF_OK;
}

static int stack_name_taken(const sf_dataset *d, const char *name)
{
	for (uint32_t i = 0; i < d->stack_count; i++)
		if (strcmp(d->stacks[i]->name, name) == 0)
			return 1;
	return 0;
}

/* A stack from a plane folder; takes the infos out of files. */
static int add_plane_stack(sf_dataset *d, const char *name, probed *files, uint32_t n)
{
	sf_stack *st = calloc(1, sizeof *st);
	if (!st)
		return SF_ENOMEM;
	st->name = strdup(name);
	st->plane_names = calloc(n, sizeof *st->plane_names);
	st->plane_info = calloc(n, sizeof *st->plane_info);
	if (!st->name || !st->plane_names || !st->plane_info) {
		stack_free(st);
		return SF_ENOMEM;
	}
	st->planes = n;
	st->width = files[0].info->width;
	st->height = files[0].info->height;
	st->dtype = files[0].info->dtype;
	for (uint32_t i = 0; i < n; i++) {
		st->plane_names[i] = strdup(files[i].entry->name);
		st->plane_info[i] = files[i].info;
		files[i].info = NULL;
		if (!st->plane_names[i]) {
			stack_free(st);
			return SF_ENOMEM;
		}
	}
	if (push_stack(d, st)) {
		stack_free(st);
		return SF_ENOMEM;
	}
	return SF_OK;
}

/* A multi-page stack of planes pages of s's file, served as img_000001.tif,
 * img_000002.tif, ... (LsDeconvolve's naming); plane z is page z until the
 * caller says otherwise.  plane_info[0] is left for push_file_stack. */
static sf_stack *file_stack_new(const char *name, uint32_t planes, const sf_slide_info *s)
{
	sf_stack *st = calloc(1, sizeof *st);
	if (!st)
		return NULL;
	st->name = strdup(name);
	st->plane_names = calloc(planes, sizeof *st->plane_names);
	st->plane_info = calloc(planes, sizeof *st->plane_info);
	if (!st->name || !st->plane_names || !st->plane_info) {
		stack_free(st);
		return NULL;
	}
	st->planes = planes;
	st->multipage = 1;
	st->page_first = 0;
	st->page_step = 1;
	st->width = s->width;
	st->height = s->height;
	st->dtype = s->dtype;
	for (uint32_t i = 0; i < st->planes; i++) {
		if (asprintf(&st->plane_names[i], "img_%06u.tif", i + 1) < 0) {
			st->plane_names[i] = NULL;
			stack_free(st);
			return NULL;
		}
	}
	return st;
}

/* Add st with *info as its file; takes *info.  On failure st is freed and
 * *info stays the caller's. */
static int push_file_stack(sf_dataset *d, sf_stack *st, sf_slide_info **info)
{
	st->plane_info[0] = *info;
	if (push_stack(d, st)) {
		st->plane_info[0] = NULL;
		stack_free(st);
		return SF_ENOMEM;
	}
	*info = NULL;
	return SF_OK;
}

/* A stack from a multi-page file, one plane per page; takes *info. */
static int add_file_stack(sf_dataset *d, const char *stem, sf_slide_info **info)
{
	sf_stack *st = file_stack_new(stem, (*info)->channels, *info);
	return st ? push_file_stack(d, st, info) : SF_ENOMEM;
}

/* Why a file that is neither stack nor stacks cannot be a slide; NULL if it
 * can.  A time series whose pages hold more than one time point would be
 * served with its time points as extra channels (6 "channels" for SizeC=2,
 * SizeT=3, the names lost); one time point of a multi-file series is fine.
 * name is the file name; writes into buf. */
static const char *slide_fault(const sf_slide_info *s, const char *name, char *buf, size_t cap)
{
	if (s->channels <= sf_slide_time_point_pages(s))
		return NULL;
	return time_series_fault(s, name,
	                         "registered/ takes one time point per slide; save each time "
	                         "point as a file of its own",
	                         buf, cap);
}

static int add_slide(sf_dataset *d, const dir_entry *it, sf_slide_info **info)
{
	char why[600];
	if (slide_fault(*info, it->name, why, sizeof why))
		return add_problem(d, it->path, "%s", why);

	char *stem = sf_file_stem(it->name);
	if (!stem)
		return SF_ENOMEM;
	for (uint32_t i = 0; i < d->slide_count; i++) {
		if (strcmp(d->slide_stems[i], stem) == 0) {
			int rc = add_problem(d, it->path, "its name '%s' is already used by %s",
			                     stem, d->slides[i]->path);
			free(stem);
			return rc;
		}
	}
	sf_slide_info **ns = realloc(d->slides, (d->slide_count + 1) * sizeof *ns);
	if (ns)
		d->slides = ns;
	char **nst = ns ? realloc(d->slide_stems, (d->slide_count + 1) * sizeof *nst) : NULL;
	if (!nst) {
		free(stem);
		return SF_ENOMEM;
	}
	d->slide_stems = nst;
	d->slides[d->slide_count] = *info;
	d->slide_stems[d->slide_count] = stem;
	d->slide_count++;
	*info = NULL;
	return SF_OK;
}

/* Probe every TIFF file of ls (folders skipped).  files gets ls->count
 * slots; *n the number used. */
static int probe_files(const listing *ls, probed **out, uint32_t *n)
{
	probed *files = calloc(ls->count ? ls->count : 1, sizeof *files);
	if (!files)
		return SF_ENOMEM;
	uint32_t k = 0;
	for (uint32_t i = 0; i < ls->count; i++) {
		if (ls->items[i].is_dir)
			continue;
		/* A failed probe leaves info NULL and its reason in err. */
		files[k].entry = &ls->items[i];
		sf_slide_probe(ls->items[i].path, &files[k].info, &files[k].err);
		k++;
	}
	*out = files;
	*n = k;
	return SF_OK;
}

static void probed_free(probed *files, uint32_t n)
{
	for (uint32_t i = 0; files && i < n; i++)
		sf_slide_info_free(files[i].info);
	free(files);
}

/* RAW_DIR is a plane folder: its good files are all plain (not OME)
 * plane-like TIFFs of one shape, at least two of them.  One-page OME files
 * are planes in a subfolder only: directly in RAW_DIR they are more likely
 * small slides (Fiji's Bio-Formats export writes them untiled), and their
 * OME-XML says each is one image (SizeZ 1). */
static int root_is_plane_folder(const probed *files, uint32_t n)
{
	const sf_slide_info *first = NULL;
	uint32_t good = 0;
	for (uint32_t i = 0; i < n; i++) {
		const sf_slide_info *s = files[i].info;
		if (!s)
			continue;
		if (!plane_like(s) || s->is_ome || (first && !same_plane_shape(first, s)))
			return 0;
		first = first ? first : s;
		good++;
	}
	return good >= 2;
}

/* A stack candidate directly in RAW_DIR: a stack, or a problem saying why
 * not.  Takes *info when it becomes a stack. */
static int add_stack_file(sf_dataset *d, const dir_entry *it, sf_slide_info **info)
{
	char why[600];
	const char *fault = stack_file_fault(*info, it->name, why, sizeof why);
	if (!fault)
		fault = stated_planes_fault(*info, it->name, why, sizeof why);
	if (fault)
		return add_problem(d, it->path, "%s", fault);
	char *stem = sf_file_stem(it->name);
	if (!stem)
		return SF_ENOMEM;
	int rc;
	if (stack_name_taken(d, stem))
		rc = add_problem(d, it->path, "stack name '%s' is already used", stem);
	else
		rc = add_file_stack(d, stem, info);
	free(stem);
	return rc;
}

/* The file of s probed again for channels 1.. (each channel's stack owns a
 * probe of its own); 0 and a reason in why if it fails or the file changed
 * since s was probed. */
static int probe_again(const sf_slide_info *s, sf_slide_info **out, char *why, size_t cap)
{
	sf_err e = {0};
	*out = NULL;
	if (sf_slide_probe(s->path, out, &e) != SF_OK) {
		snprintf(why, cap, "probed again for its channels: %s", e.msg);
		return 0;
	}
	const sf_slide_info *t = *out;
	if (t->file_size != s->file_size || t->mtime_ns != s->mtime_ns ||
	    t->channels != s->channels || !same_plane_shape(s, t) || t->stated_c != s->stated_c ||
	    t->stated_z != s->stated_z || strcmp(t->dimension_order, s->dimension_order) != 0) {
		snprintf(why, cap, "changed while it was scanned");
		sf_slide_info_free(*out);
		*out = NULL;
		return 0;
	}
	return 1;
}

/* The stacks <stem>_c0, <stem>_c1, ... of a multichannel file; takes *info
 * and probes[1..] (probes[0] is unused). */
static int push_channel_stacks(sf_dataset *d, char **names, sf_slide_info **info,
                               sf_slide_info **probes)
{
	const sf_slide_info *s = *info;
	uint32_t nc = s->stated_c, nz = s->stated_z;
	for (uint32_t c = 0; c < nc; c++) {
		sf_stack *st = file_stack_new(names[c], nz, s);
		if (!st)
			return SF_ENOMEM;
		channel_pages(s, c, &st->page_first, &st->page_step);
		if (push_file_stack(d, st, c == 0 ? info : &probes[c]))
			return SF_ENOMEM;
	}
	return SF_OK;
}

/* A multichannel z-stack directly in RAW_DIR: one stack per channel, or
 * a problem saying why not.  Takes *info when it becomes stacks. */
static int add_channel_stacks(sf_dataset *d, const dir_entry *it, sf_slide_info **info)
{
	char why[600]; /* room for a probe's sf_err message */
	const char *fault = multichannel_fault(*info, it->name, why, sizeof why);
	if (fault)
		return add_problem(d, it->path, "%s", fault);
	uint32_t nc = (*info)->stated_c;
	char *stem = sf_file_stem(it->name);
	char **names = calloc(nc, sizeof *names);
	sf_slide_info **probes = calloc(nc, sizeof *probes);
	int rc = stem && names && probes ? SF_OK : SF_ENOMEM;
	const char *taken = NULL;
	for (uint32_t c = 0; rc == SF_OK && c < nc; c++) {
		if (asprintf(&names[c], "%s_c%u", stem, c) < 0) {
			names[c] = NULL;
			rc = SF_ENOMEM;
		} else if (!taken && stack_name_taken(d, names[c])) {
			taken = names[c];
		}
	}
	int usable = rc == SF_OK && !taken;
	for (uint32_t c = 1; usable && c < nc; c++)
		usable = probe_again(*info, &probes[c], why, sizeof why);
	if (rc == SF_OK && taken)
		rc = add_problem(d, it->path, "stack name '%s' is already used", taken);
	else if (rc == SF_OK && !usable)
		rc = add_problem(d, it->path, "%s", why);
	else if (rc == SF_OK)
		rc = push_channel_stacks(d, names, info, probes);
	for (uint32_t c = 0; c < nc; c++) {
		if (names)
			free(names[c]);
		if (probes)
			sf_slide_info_free(probes[c]);
	}
	free(names);
	free(probes);
	free(stem);
	return rc;
}

/* Why a plane folder with holes (list_folder) is not served: a plane
 * left out would silently shorten the stack. */
#define PLANE_HOLES_FAULT                                                                          \
	"some planes are unusable (image-named broken or outside symbolic links, folders, or not " \
	"regular files: see their own problems)"

/* holes: image-named entries the listing left out (already problems);
 * plane_named_dir: a subfolder of RAW_DIR with an image name, or NULL.
 * A plane folder with either is not served: the entry stands where a plane
 * would be. */
static int scan_root_files(sf_dataset *d, probed *files, uint32_t n, uint32_t holes,
                           const char *plane_named_dir)
{
	char why[600];
	if (root_is_plane_folder(files, n)) {
		const char *fault = stack_fault(files, n, why, sizeof why);
		if (!fault && holes)
			fault = PLANE_HOLES_FAULT;
		if (!fault && plane_named_dir) {
			snprintf(why, sizeof why,
			         "folder %s is named like a plane; the planes of a "
			         "plane folder are files",
			         plane_named_dir);
			fault = why;
		}
		if (fault)
			return add_problem(d, d->root, "RAW_DIR as a plane folder: %s", fault);
		return add_plane_stack(d, "", files, n);
	}
	for (uint32_t i = 0; i < n; i++) {
		const dir_entry *it = files[i].entry;
		int rc;
		if (!files[i].info) {
			rc = add_problem(d, it->path, "%s", files[i].err.msg);
		} else if (multichannel_candidate(files[i].info)) {
			rc = add_channel_stacks(d, it, &files[i].info);
		} else if (stack_candidate(files[i].info)) {
			rc = add_stack_file(d, it, &files[i].info);
		} else {
			rc = add_slide(d, it, &files[i].info);
		}
		if (rc)
			return rc;
	}
	return SF_OK;
}

/* A direct subfolder: a stack of planes, a problem, or nothing (no TIFFs). */
static int scan_subfolder(sf_dataset *d, const dir_entry *dir, sf_err *e)
{
	listing ls;
	sf_err le = {0};
	uint32_t holes = 0;
	int rc = list_folder(d, dir->path, 0, &ls, &holes, &le);
	if (rc == SF_ENOMEM)
		return sf_fail(e, rc, "%s", le.msg);
	if (rc)
		return add_problem(d, dir->path, "%s", le.msg);
	probed *files = NULL;
	uint32_t n = 0;
	rc = probe_files(&ls, &files, &n);
	if (!rc && n > 0) {
		char why[600];
		const char *fault = stack_fault(files, n, why, sizeof why);
		if (!fault && holes)
			fault = PLANE_HOLES_FAULT;
		if (fault)
			rc = add_problem(d, dir->path, "%s", fault);
		else if (stack_name_taken(d, dir->name))
			rc =
			    add_problem(d, dir->path, "stack name '%s' is already used", dir->name);
		else
			rc = add_plane_stack(d, dir->name, files, n);
	}
	probed_free(files, n);
	listing_free(&ls);
	if (rc)
		return sf_fail(e, rc, "%s: out of memory", dir->path);
	return SF_OK;
}

int sf_dataset_scan(const char *root, sf_dataset **out, sf_err *e)
{
	*out = NULL;
	struct stat st;
	if (stat(root, &st) != 0)
		return sf_fail(e, errno == ENOENT ? SF_ENOTFOUND : SF_EIO, "%s: %s", root,
		               strerror(errno));
	if (!S_ISDIR(st.st_mode))
		return sf_fail(e, SF_EINVAL, "%s: not a folder", root);
	sf_dataset *d = calloc(1, sizeof *d);
	if (!d)
		return sf_fail(e, SF_ENOMEM, "%s: out of memory", root);
	d->root = realpath(root, NULL);
	if (!d->root) {
		int err = errno;
		sf_dataset_free(d);
		return sf_fail(e, err == ENOMEM ? SF_ENOMEM : SF_EIO, "%s: %s", root,
		               strerror(err));
	}
	listing ls;
	uint32_t holes = 0;
	int rc = list_folder(d, d->root, 1, &ls, &holes, e);
	if (rc) {
		sf_dataset_free(d);
		return rc;
	}
	probed *files = NULL;
	uint32_t n = 0;
	rc = probe_files(&ls, &files, &n);
	const char *plane_named_dir = NULL;
	for (uint32_t i = 0; i < ls.count && !plane_named_dir; i++)
		if (ls.items[i].is_dir && image_ext_len(ls.items[i].name))
			plane_named_dir = ls.items[i].name;
	if (!rc)
		rc = scan_root_files(d, files, n, holes, plane_named_dir);
	probed_free(files, n);
	if (rc)
		rc = sf_fail(e, SF_ENOMEM, "%s: out of memory", d->root);
	for (uint32_t i = 0; !rc && i < ls.count; i++)
		if (ls.items[i].is_dir)
			rc = scan_subfolder(d, &ls.items[i], e);
	listing_free(&ls);
	if (rc) {
		sf_dataset_free(d);
		return rc;
	}
	*out = d;
	return SF_OK;
}

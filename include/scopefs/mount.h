/* mount.h — the mounted tree: built once at mount, read-only afterwards.
 *
 * The whole tree (raw/ passthrough, registered/, qc/, deconvolved/,
 * .scopefs/) is built before the file system is mounted, from one scan of
 * RAW_DIR.  Files never change during a mount, so the tree needs no lock:
 * FUSE threads only read it.  (A qc/ node's PNG is rendered on first use
 * inside its sf_qc, which has its own lock; the node itself never changes.
 * Nodes of slides that scopefs registers itself are in the tree from the
 * start and show once their registration succeeded: sf_mount_node_visible
 * and sf_mount_node_poll ask the job, which has its own lock and never
 * changes a result.)
 * Inode numbers are node indices + 1 (the root is FUSE_ROOT_ID = 1); nodes
 * live until unmount, so forget has nothing to do. */
#ifndef SCOPEFS_MOUNT_H
#define SCOPEFS_MOUNT_H

#include <pthread.h>
#include <stdint.h>
#include <sys/stat.h>

#include "scopefs/cache.h"
#include "scopefs/dataset.h"
#include "scopefs/engine.h"
#include "scopefs/options.h"
#include "scopefs/transform.h"
#include "scopefs/vfile.h"

typedef enum sf_node_kind {
	SF_NODE_DIR,
	SF_NODE_RAW,       /* a file of RAW_DIR, read with pread */
	SF_NODE_VFILE,     /* a virtual TIFF */
	SF_NODE_STATUS,    /* .scopefs/status */
	SF_NODE_QC,        /* qc/<stem>.png: PNG bytes in memory, rendered on first use */
	SF_NODE_TRANSFORM, /* transforms/<stem>.*: a computed transform as a file (autoreg.h) */
} sf_node_kind;

typedef struct sf_node {
	char *name;
	sf_node_kind kind;
	uint32_t parent;    /* node index */
	uint32_t *children; /* node indices, sorted by name (directories) */
	uint32_t child_count, child_cap;
	char *raw_path;   /* SF_NODE_RAW: absolute path inside RAW_DIR, no symlink */
	struct stat st;   /* attributes served by getattr */
	sf_vfile *vfile;  /* SF_NODE_VFILE */
	struct sf_qc *qc; /* SF_NODE_QC (owned; mutable inside, under its own lock) */
	/* A node that shows only when scopefs's registration of slide
	 * autoreg_slide succeeds (-1: always shown); SF_NODE_TRANSFORM: which file. */
	int32_t autoreg_slide;
	int transform_file; /* an sf_autoreg_file_kind */
	/* SF_NODE_VFILE: the files its pixels follow besides the raw ones
	 * (sf_mount.watches[watch_first..+watch_count)): a transform file, a
	 * stack's scopefs.conf files. */
	uint32_t watch_first, watch_count;
} sf_node;

/* A file the mount read settings from, and what it was then.  An edit since,
 * or the creation of a file that was absent, makes opens of the virtual
 * files computed from it fail (fuse_ops.c): the mount keeps computing with
 * what it read, and a pipeline that changed the file and copies the result
 * would get the old pixels with no error. */
typedef struct sf_watch {
	char *path;         /* owned */
	int existed;        /* 0: absent at mount; st is then unset */
	struct stat st;     /* size and mtime checked */
	const char *folder; /* "registered", "deconvolved": recent_errors' label */
	const char *remedy; /* the end of the message: "remount to ..." */
} sf_watch;

typedef struct sf_slide_entry {
	char *state;            /* "served ...", or why it is not (owned) */
	char *transform_path;   /* the transform file used, or NULL (owned) */
	sf_transform transform; /* moving slides: reference px -> this slide's px */
} sf_slide_entry;

typedef struct sf_mount {
	const sf_options *opts;
	sf_dataset *dataset;
	sf_cache *cache;
	sf_engine *engine; /* made by sf_mount_start, after daemonizing */
	sf_node *nodes;
	uint32_t node_count, node_cap;
	sf_product **products;
	uint32_t product_count, product_cap;
	sf_layout **layouts;
	uint32_t layout_count, layout_cap;
	sf_vfile **vfiles;
	uint32_t vfile_count, vfile_cap;
	sf_watch *watches; /* sf_node.watch_first indexes it */
	uint32_t watch_count, watch_cap;
	sf_slide_entry *slide_state; /* dataset->slide_count entries */
	/* dataset->stack_count entries: "served", or "not served: why" (owned);
	 * NULL when the dataset has no stacks. */
	char **stack_state;
	int reference;              /* index of the reference slide, -1 if none */
	struct sf_autoreg *autoreg; /* scopefs's own registration, NULL if no slide needs it */
	char *transforms_dir;       /* absolute path of transforms/ in the mount (elastix files) */
	struct timespec mounted_at;
	/* fuse_ops.c's handles of open files, linked so that the ones still
	 * open when the session ends (a reader was attached: no release comes)
	 * are freed then; handles_lock guards the list while FUSE runs */
	pthread_mutex_t handles_lock;
	struct sf_open_handle *open_handles;
} sf_mount;

/* Scan RAW_DIR, open the cache, build every layout, product and node. */
int sf_mount_build(const sf_options *o, sf_mount **out, sf_err *e);

/* Start the tile engine (threads: call after fuse_daemonize forks). */
int sf_mount_start(sf_mount *m, sf_err *e);

void sf_mount_free(sf_mount *m);

/* Ask what runs for the mount to end now: the engine's computations and
 * scopefs's own registration (waiters then get an error, nothing half-done
 * is cached).  For a shutdown signal: it only stores to lock-free atomics,
 * so it is async-signal-safe. */
void sf_mount_stop(const sf_mount *m);

/* Whether n shows (getattr, open, readdir; a qc/ or transforms/ lookup): a
 * node tied to a registration shows once it succeeded (waits for it; seconds
 * on first use, known at once after). */
int sf_mount_node_visible(const sf_mount *m, const sf_node *n);

/* Whether n shows, never waiting (starts the registration when needed):
 * SF_PENDING while the registration n depends on runs. */
typedef enum sf_node_shown { SF_SHOWN, SF_HIDDEN, SF_PENDING } sf_node_shown;
sf_node_shown sf_mount_node_poll(const sf_mount *m, const sf_node *n);

/* Wait until every child of directory dir is known to show or not (for
 * opendir: the kernel holds no lock on dir there, unlike in readdir and
 * lookup, so other lookups in dir go on meanwhile). */
void sf_mount_dir_settle(const sf_mount *m, const sf_node *dir);

/* Node of inode ino, or NULL. */
const sf_node *sf_mount_node(const sf_mount *m, uint64_t ino);

/* Child of directory parent named name, or NULL. */
const sf_node *sf_mount_lookup(const sf_mount *m, uint64_t parent, const char *name);

static inline uint64_t sf_node_ino(const sf_mount *m, const sf_node *n)
{
	return (uint64_t)(n - m->nodes) + 1;
}

/* The .scopefs/status document (malloc'd JSON); NULL without memory. */
char *sf_status_json(const sf_mount *m, size_t *len);

#endif

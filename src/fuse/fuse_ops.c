/* fuse_ops.c — the FUSE low-level handlers: translate, call below, reply.
 *
 * Handlers are a few lines each: find the node, call the layer below
 * (pread for raw/, sf_vfile_read for virtual files, sf_status_json), and
 * map an error code to errno in one place (sf_errno).  Files never change
 * during a mount, so entries and attributes are cached by the kernel for a
 * day and virtual files are opened with keep_cache (OpenSlide and ImageJ
 * re-open the file for every tile).  .scopefs/status is the exception: no
 * caching, direct_io, a fresh snapshot at each open.  A qc/ PNG is rendered
 * at its first lookup/getattr/open (its exact size is known only then) and
 * served from memory afterwards, like any stable file.  A transforms/ file
 * is copied at each open into that open's handle (a field file, tens of MB,
 * is made there each time), its size once at first lookup.  readdir gives
 * only inode and type, so listing a folder renders nothing, but a node tied
 * to scopefs's own registration (registered/, qc/, transforms/ of such a
 * slide) shows only once it succeeded: opendir waits for the folder's
 * (sf_mount_dir_settle), getattr and open for the node's.  The kernel lets
 * one lookup at a time into a folder, so a lookup never waits for a
 * registered/ TIFF (op_lookup). */
#define FUSE_USE_VERSION 312
#include "scopefs/fuse_ops.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "scopefs/log.h"
#include "scopefs/mount.h"
#include "scopefs/autoreg.h"
#include "scopefs/qc.h"

#define TIMEOUT_FOREVER 86400.0

/* The head of every handle op_open allocates: its place in the mount's
 * list of open handles (sf_mount.open_handles), and which kind it is. */
typedef struct sf_open_handle {
	struct sf_open_handle *prev, *next;
	int kind; /* SF_NODE_VFILE, or _STATUS / _TRANSFORM (a status_handle) */
} sf_open_handle;

/* An open virtual file: where the last read ended and where the run of
 * near-consecutive reads it ended began, to spot sequential readers.  The
 * two are read and written together under run_lock: the kernel sends a
 * file's requests on several threads at once, and a read-ahead request of
 * the last tile checked against the next tile's run start saw a run tens of
 * MiB long and scheduled read-ahead for a random reader. */
typedef struct vfile_handle {
	sf_open_handle link;
	const sf_node *node;
	pthread_mutex_t run_lock;
	uint64_t next_off;
	uint64_t run_start;
} vfile_handle;

/* An open file's own snapshot of bytes: .scopefs/status, a transforms/ file. */
typedef struct status_handle {
	sf_open_handle link;
	char *text;
	size_t len;
} status_handle;

static sf_mount *mount_of(fuse_req_t req)
{
	return fuse_req_userdata(req);
}

static double node_timeout(const sf_node *n)
{
	return n->kind == SF_NODE_STATUS ? 0.0 : TIMEOUT_FOREVER;
}

/* The PNG of a qc/ node, rendered on first use; 0 or an errno. */
static int qc_bytes(const sf_mount *m, const sf_node *n, const uint8_t **bytes, size_t *len)
{
	sf_err e = {0};
	int rc = sf_qc_get(n->qc, m->engine, bytes, len, &e);

	if (rc != SF_OK) {
		sf_log(SF_LOG_ERROR, "%s: %s", n->name, e.msg);
		return sf_errno(rc);
	}
	return 0;
}

/* Attributes of n with its exact size; 0 or an errno (a qc/ PNG that
 * cannot be rendered). */
static int node_stat(const sf_mount *m, const sf_node *n, struct stat *st)
{
	*st = n->st;
	st->st_ino = sf_node_ino(m, n);
	if (n->kind == SF_NODE_STATUS) {
		size_t len = 0;
		char *text = sf_status_json(m, &len);
		free(text);
		/* st_blocks too: tar -S and du read st_size > 0 with no blocks
		 * as a file that is all hole, and archive zeros. */
		st->st_size = (off_t)len;
		st->st_blocks = (blkcnt_t)((len + 511) / 512);
	} else if (n->kind == SF_NODE_TRANSFORM) {
		sf_err e = {0};
		uint64_t len;
		int rc = sf_autoreg_file_size(m->autoreg, (uint32_t)n->autoreg_slide,
		                              (sf_autoreg_file_kind)n->transform_file, &len, &e);
		if (rc != SF_OK) {
			sf_log(SF_LOG_ERROR, "transforms/%s: %s", n->name, e.msg);
			return sf_errno(rc);
		}
		st->st_size = (off_t)len;
		st->st_blocks = (blkcnt_t)((len + 511) / 512);
	} else if (n->kind == SF_NODE_QC) {
		const uint8_t *png;
		size_t len;
		int err = qc_bytes(m, n, &png, &len);
		if (err)
			return err;
		st->st_size = (off_t)len;
		st->st_blocks = (blkcnt_t)((len + 511) / 512);
	}
	return 0;
}

/* The kernel sends one lookup at a time per folder (measured: the reference's
 * lookup in registered/ waited 1.9 s behind a moving slide's), so a lookup
 * that waited for a registration would hold up every name there.  A
 * registered/ TIFF has the reference's layout, so its size is known before
 * the result: while its registration runs it is answered at once, cached for
 * 0 s, and getattr and open, which hold no folder lock, wait to say whether
 * it exists.  A qc/ or transforms/ file's size is the result: that lookup
 * waits. */
static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	sf_mount *m = mount_of(req);
	const sf_node *n = sf_mount_lookup(m, parent, name);
	sf_node_shown shown = n ? sf_mount_node_poll(m, n) : SF_HIDDEN;
	struct fuse_entry_param ep;
	int err;

	if (shown == SF_PENDING && n->kind != SF_NODE_VFILE)
		shown = sf_mount_node_visible(m, n) ? SF_SHOWN : SF_HIDDEN;
	if (shown == SF_HIDDEN) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	memset(&ep, 0, sizeof ep);
	ep.ino = sf_node_ino(m, n);
	ep.generation = 1;
	if ((err = node_stat(m, n, &ep.attr))) {
		fuse_reply_err(req, err);
		return;
	}
	ep.attr_timeout = ep.entry_timeout = shown == SF_PENDING ? 0.0 : node_timeout(n);
	fuse_reply_entry(req, &ep);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	sf_mount *m = mount_of(req);
	const sf_node *n = sf_mount_node(m, ino);
	struct stat st;
	int err;

	(void)fi;
	/* A registered/ TIFF looked up while its registration ran: exists? */
	if (!n || !sf_mount_node_visible(m, n)) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	if ((err = node_stat(m, n, &st))) {
		fuse_reply_err(req, err);
		return;
	}
	fuse_reply_attr(req, &st, node_timeout(n));
}

/* Wait here for the registrations the folder's entries depend on: readdir
 * runs under the kernel's folder lock, which would hold up every lookup
 * there meanwhile (the reference's too); opendir does not. */
static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	sf_mount *m = mount_of(req);
	const sf_node *dir = sf_mount_node(m, ino);

	if (!dir || dir->kind != SF_NODE_DIR) {
		fuse_reply_err(req, dir ? ENOTDIR : ENOENT);
		return;
	}
	sf_mount_dir_settle(m, dir);
	fuse_reply_open(req, fi);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
	sf_mount *m = mount_of(req);
	const sf_node *dir = sf_mount_node(m, ino);
	char *buf;
	size_t used = 0;

	(void)fi;
	if (!dir || dir->kind != SF_NODE_DIR) {
		fuse_reply_err(req, ENOTDIR);
		return;
	}
	if (!(buf = malloc(size))) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	/* Offsets: 0 ".", 1 "..", 2 + i the i-th child. */
	for (off_t i = off; i < (off_t)dir->child_count + 2; i++) {
		const sf_node *n = i == 0   ? dir
		                   : i == 1 ? &m->nodes[dir->parent]
		                            : &m->nodes[dir->children[i - 2]];
		const char *name = i == 0 ? "." : i == 1 ? ".." : n->name;
		struct stat st = {0};
		size_t need;

		/* Known at once after op_opendir (results never change). */
		if (i >= 2 && !sf_mount_node_visible(m, n))
			continue; /* offsets stay those of the full child list */
		/* fuse_add_direntry uses only the inode and the type. */
		st.st_ino = sf_node_ino(m, n);
		st.st_mode = n->st.st_mode;
		need = fuse_add_direntry(req, buf + used, size - used, name, &st, i + 1);
		if (need > size - used)
			break;
		used += need;
	}
	fuse_reply_buf(req, buf, used);
	free(buf);
}

static void handle_track(sf_mount *m, sf_open_handle *h, int kind)
{
	h->kind = kind;
	h->prev = NULL;
	pthread_mutex_lock(&m->handles_lock);
	h->next = m->open_handles;
	if (h->next)
		h->next->prev = h;
	m->open_handles = h;
	pthread_mutex_unlock(&m->handles_lock);
}

static void handle_free(sf_open_handle *h)
{
	if (h->kind != SF_NODE_VFILE)
		free(((status_handle *)h)->text);
	else
		pthread_mutex_destroy(&((vfile_handle *)h)->run_lock);
	free(h);
}

/* What op_open made for the handle: closed, or untracked and freed. */
static void release_handle(sf_mount *m, const sf_node *n, struct fuse_file_info *fi)
{
	if (n && n->kind == SF_NODE_RAW)
		close((int)fi->fh);
	else if (n && (n->kind == SF_NODE_VFILE || n->kind == SF_NODE_STATUS ||
	               n->kind == SF_NODE_TRANSFORM)) {
		sf_open_handle *h = (sf_open_handle *)(uintptr_t)fi->fh;
		pthread_mutex_lock(&m->handles_lock);
		if (h->prev)
			h->prev->next = h->next;
		else
			m->open_handles = h->next;
		if (h->next)
			h->next->prev = h->prev;
		pthread_mutex_unlock(&m->handles_lock);
		handle_free(h);
	}
}

/* The session ended and no handler runs any more.  Handles
 * still open (the daemon stopped while a reader held a file) get no
 * release: free them here. */
static void op_destroy(void *userdata)
{
	sf_mount *m = userdata;

	while (m->open_handles) {
		sf_open_handle *h = m->open_handles;
		m->open_handles = h->next;
		handle_free(h);
	}
}

/* 0 when the raw file open on fd is still the one the mount scanned, else
 * EIO, logged and in the status.  The mount serves the size it scanned
 * (getattr, cached by the kernel), so a file replaced or rewritten since
 * would be served as the new bytes cut at the old size: a silently broken
 * copy.  registered/ refuses a changed slide the same way. */
static int raw_changed(sf_mount *m, const sf_node *n, int fd)
{
	struct stat now;
	char msg[PATH_MAX + 160];

	if (fstat(fd, &now) != 0)
		snprintf(msg, sizeof msg, "%s: cannot stat: %s", n->raw_path, strerror(errno));
	else if (now.st_size != n->st.st_size || now.st_mtim.tv_sec != n->st.st_mtim.tv_sec ||
	         now.st_mtim.tv_nsec != n->st.st_mtim.tv_nsec)
		snprintf(msg, sizeof msg,
		         "%s changed since it was scanned (%lld bytes then, %lld now): "
		         "remount to serve the new file",
		         n->raw_path, (long long)n->st.st_size, (long long)now.st_size);
	else
		return 0;
	sf_log(SF_LOG_ERROR, "raw/%s: %s", n->name, msg);
	sf_engine_note_error(m->engine, "raw", msg);
	return EIO;
}

/* Why watch w (sf_watch) no longer matches the file, into msg; 0 if it does. */
static int watch_stale(const sf_watch *w, char *msg, size_t cap)
{
	struct stat now;
	int exists = stat(w->path, &now) == 0;

	if (!exists && w->existed)
		snprintf(msg, cap, "%s: cannot stat: %s", w->path, strerror(errno));
	else if (exists && !w->existed)
		snprintf(msg, cap, "%s appeared since the mount: %s", w->path, w->remedy);
	else if (exists &&
	         (now.st_size != w->st.st_size || now.st_mtim.tv_sec != w->st.st_mtim.tv_sec ||
	          now.st_mtim.tv_nsec != w->st.st_mtim.tv_nsec))
		snprintf(msg, cap, "%s changed since the mount read it: %s", w->path, w->remedy);
	else
		return 0;
	return 1;
}

/* EIO when a file the pixels of virtual file n follow besides the raw ones
 * (its transform file, its stack's scopefs.conf) changed since the mount
 * read it: the mount still computes with the old one. */
static int watch_changed(sf_mount *m, const sf_node *n)
{
	char msg[PATH_MAX + 200];

	for (uint32_t i = 0; i < n->watch_count; i++) {
		const sf_watch *w = &m->watches[n->watch_first + i];
		if (!watch_stale(w, msg, sizeof msg))
			continue;
		sf_log(SF_LOG_ERROR, "%s/%s: %s", w->folder, n->name, msg);
		sf_engine_note_error(m->engine, w->folder, msg);
		return EIO;
	}
	return 0;
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	sf_mount *m = mount_of(req);
	const sf_node *n = sf_mount_node(m, ino);

	/* A registered/ TIFF looked up while its registration ran (op_lookup). */
	if (!n || !sf_mount_node_visible(m, n)) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	if ((fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC)) {
		fuse_reply_err(req, EROFS);
		return;
	}
	switch (n->kind) {
	case SF_NODE_RAW: {
		int fd = open(n->raw_path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
		if (fd < 0) {
			fuse_reply_err(req, errno);
			return;
		}
		int err = raw_changed(m, n, fd);
		if (err) {
			close(fd);
			fuse_reply_err(req, err);
			return;
		}
		fi->fh = (uint64_t)fd;
		fi->keep_cache = 1;
		break;
	}
	case SF_NODE_VFILE: {
		int err = watch_changed(m, n);
		if (err) {
			fuse_reply_err(req, err);
			return;
		}
		vfile_handle *h = calloc(1, sizeof *h);
		if (!h) {
			fuse_reply_err(req, ENOMEM);
			return;
		}
		h->node = n;
		pthread_mutex_init(&h->run_lock, NULL);
		handle_track(m, &h->link, SF_NODE_VFILE);
		fi->fh = (uint64_t)(uintptr_t)h;
		fi->keep_cache = 1;
		break;
	}
	case SF_NODE_STATUS: {
		status_handle *h = calloc(1, sizeof *h);
		if (!h || !(h->text = sf_status_json(m, &h->len))) {
			free(h);
			fuse_reply_err(req, ENOMEM);
			return;
		}
		handle_track(m, &h->link, SF_NODE_STATUS);
		fi->fh = (uint64_t)(uintptr_t)h;
		fi->direct_io = 1;
		break;
	}
	case SF_NODE_TRANSFORM: {
		status_handle *h = calloc(1, sizeof *h);
		sf_err e = {0};
		int rc = h ? sf_autoreg_file_make(m->autoreg, (uint32_t)n->autoreg_slide,
		                                  (sf_autoreg_file_kind)n->transform_file,
		                                  (uint8_t **)&h->text, &h->len, &e)
		           : sf_fail(&e, SF_ENOMEM, "out of memory");
		if (rc != SF_OK) {
			sf_log(SF_LOG_ERROR, "transforms/%s: %s", n->name, e.msg);
			free(h);
			fuse_reply_err(req, sf_errno(rc));
			return;
		}
		handle_track(m, &h->link, SF_NODE_TRANSFORM);
		fi->fh = (uint64_t)(uintptr_t)h;
		fi->keep_cache = 1;
		break;
	}
	case SF_NODE_QC: {
		const uint8_t *png;
		size_t len;
		int err = qc_bytes(m, n, &png, &len);
		if (err) {
			fuse_reply_err(req, err);
			return;
		}
		fi->keep_cache = 1;
		break;
	}
	case SF_NODE_DIR: fuse_reply_err(req, EISDIR); return;
	}
	/* An interrupted open is never released by the kernel: undo it here. */
	if (fuse_reply_open(req, fi) == -ENOENT)
		release_handle(m, n, fi);
}

static void read_raw(fuse_req_t req, size_t size, off_t off, struct fuse_file_info *fi)
{
	struct fuse_bufvec buf = FUSE_BUFVEC_INIT(size);

	/* Let libfuse splice straight from the raw file where it can. */
	buf.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
	buf.buf[0].fd = (int)fi->fh;
	buf.buf[0].pos = off;
	fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
}

/* The errno a failed read of an open virtual file gives.  Its inputs may
 * have gone (a raw plane moved away: SF_ENOTFOUND) or be bad, but the file
 * the reader opened is there: ENOENT or EINVAL from read(2) would send them
 * looking for the wrong fault, so everything but memory is EIO, with the
 * cause in the log and in .scopefs/status.  SF_EINTR only comes from a
 * mount that is stopping: EINTR would tell cp and dd to read again, which
 * they did in a loop. */
static int read_errno(int rc)
{
	return rc == SF_ENOMEM ? sf_errno(rc) : EIO;
}

static void read_vfile(fuse_req_t req, size_t size, off_t off, struct fuse_file_info *fi)
{
	sf_mount *m = mount_of(req);
	vfile_handle *h = (vfile_handle *)(uintptr_t)fi->fh;
	const sf_vfile *v = h->node->vfile;
	uint64_t run;
	uint8_t *buf = malloc(size ? size : 1);
	size_t got = 0;
	sf_err e = {0};
	int rc;

	if (!buf) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	/* A reader continuing near where it stopped goes on with its run (the
	 * kernel may issue its read-ahead requests slightly out of order, and a
	 * reader of one channel skips the others); any other read starts one.
	 * sf_vfile_readahead decides whether the run is long enough. */
	pthread_mutex_lock(&h->run_lock);
	uint64_t last = h->next_off;
	if (!last || (uint64_t)off + (4u << 20) < last || (uint64_t)off > last + (4u << 20) ||
	    h->run_start > (uint64_t)off)
		h->run_start = (uint64_t)off;
	run = h->run_start;
	h->next_off = (uint64_t)off + size;
	pthread_mutex_unlock(&h->run_lock);
	if (m->opts->readahead)
		sf_vfile_readahead(m->engine, v, run, (uint64_t)off + size, m->opts->readahead,
		                   m->opts->mem);
	rc = sf_vfile_read(m->engine, v, (uint64_t)off, size, buf, &got, &e);
	if (rc != SF_OK) {
		sf_log(SF_LOG_ERROR, "read %s at %lld: %s", h->node->name, (long long)off, e.msg);
		fuse_reply_err(req, read_errno(rc));
	} else
		fuse_reply_buf(req, (const char *)buf, got);
	free(buf);
}

/* Bytes of a qc/ PNG (rendered at open; sf_qc_get then just returns them). */
static void read_qc(fuse_req_t req, const sf_node *n, size_t size, off_t off)
{
	const uint8_t *png;
	size_t len, start, count;
	int err = qc_bytes(mount_of(req), n, &png, &len);

	if (err) {
		fuse_reply_err(req, err);
		return;
	}
	start = (uint64_t)off < len ? (size_t)off : len;
	count = len - start < size ? len - start : size;
	fuse_reply_buf(req, (const char *)png + start, count);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
	const sf_node *n = sf_mount_node(mount_of(req), ino);

	if (!n) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	if (n->kind == SF_NODE_RAW) {
		/* rewritten in place while open: the same check as at open */
		int err = raw_changed(mount_of(req), n, (int)fi->fh);
		if (err)
			fuse_reply_err(req, err);
		else
			read_raw(req, size, off, fi);
	} else if (n->kind == SF_NODE_VFILE)
		read_vfile(req, size, off, fi);
	else if (n->kind == SF_NODE_QC)
		read_qc(req, n, size, off);
	else if (n->kind == SF_NODE_STATUS || n->kind == SF_NODE_TRANSFORM) {
		status_handle *h = (status_handle *)(uintptr_t)fi->fh;
		size_t start = (size_t)off < h->len ? (size_t)off : h->len;
		size_t len = h->len - start < size ? h->len - start : size;
		/* Reply from a copy: the reader may close (and release free the
		 * snapshot) as soon as the kernel has the reply, before writev
		 * returns here. */
		char *copy = malloc(len ? len : 1);
		if (!copy) {
			fuse_reply_err(req, ENOMEM);
			return;
		}
		memcpy(copy, h->text + start, len);
		fuse_reply_buf(req, copy, len);
		free(copy);
	} else
		fuse_reply_err(req, EISDIR);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	sf_mount *m = mount_of(req);

	release_handle(m, sf_mount_node(m, ino), fi);
	fuse_reply_err(req, 0);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
	struct statvfs sv;

	(void)ino;
	memset(&sv, 0, sizeof sv);
	sv.f_bsize = sv.f_frsize = 4096;
	sv.f_namemax = 255;
	sv.f_flag = ST_RDONLY;
	fuse_reply_statfs(req, &sv);
}

/* Anything that would change the tree: the file system is read-only. */
static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi)
{
	(void)ino, (void)attr, (void)to_set, (void)fi;
	fuse_reply_err(req, EROFS);
}

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
	(void)userdata;
	/* Splice raw/ reads from the source file descriptor. */
	if (conn->capable & FUSE_CAP_SPLICE_WRITE)
		conn->want |= FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE;
	/* Kernel read-ahead lets cp stream; nothing is written back. */
	conn->want &= ~(unsigned)FUSE_CAP_WRITEBACK_CACHE;
}

const struct fuse_lowlevel_ops sf_fuse_ops = {
    .init = op_init,
    .lookup = op_lookup,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .opendir = op_opendir,
    .readdir = op_readdir,
    .open = op_open,
    .read = op_read,
    .release = op_release,
    .destroy = op_destroy,
    .statfs = op_statfs,
};

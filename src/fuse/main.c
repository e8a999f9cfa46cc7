/* main.c — scopefs: parse options, build the tree, mount, serve, clean up.
 *
 * Exit status: 0 after a clean unmount or a shutdown signal (SIGTERM,
 * SIGINT, SIGHUP: a scheduler ending the job is not a failure), 2 for a
 * usage or option error (nothing mounted), 1 when the dataset, cache or
 * mount fails. */
#define FUSE_USE_VERSION 312
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "scopefs/fuse_ops.h"
#include "scopefs/log.h"
#include "scopefs/mount.h"
#include "scopefs/options.h"

#define FUSE_MAX_THREADS 64

/* The argv libfuse sees: read-only, our fsname unless given, user options. */
static int fuse_argv(const sf_options *o, const char *argv0, struct fuse_args *args)
{
	char opts[1200];
	int has_fsname = strstr(o->fuse_mount_opts, "fsname=") != NULL;
	int has_subtype = strstr(o->fuse_mount_opts, "subtype=") != NULL;

	snprintf(opts, sizeof opts, "ro%s%s%s%s", has_fsname ? "" : ",fsname=scopefs",
	         has_subtype ? "" : ",subtype=scopefs", o->fuse_mount_opts[0] ? "," : "",
	         o->fuse_mount_opts);
	if (fuse_opt_add_arg(args, argv0) || fuse_opt_add_arg(args, "-o") ||
	    fuse_opt_add_arg(args, opts) || (o->debug && fuse_opt_add_arg(args, "-d")))
		return SF_ENOMEM;
	return SF_OK;
}

/* The shutdown signals libfuse handles (it exits the session loop).  That
 * loop first waits for the requests in progress, and a read may be waiting
 * for a deconvolution block that takes minutes on the CPU: so a signal also
 * asks the engine's products to end their computations.  Set once in main
 * before the handlers are installed and cleared after they are removed;
 * read only by the handler (the one global here, for the handler's sake). */
static const int shutdown_signals[] = {SIGHUP, SIGINT, SIGTERM};
static sf_engine *volatile shutdown_engine;
static struct sigaction fuse_actions[3]; /* libfuse's, chained to */

static void on_shutdown_signal(int sig)
{
	if (shutdown_engine)
		sf_engine_stop_products(shutdown_engine);
	for (int i = 0; i < 3; i++)
		if (shutdown_signals[i] == sig && fuse_actions[i].sa_handler != SIG_DFL &&
		    fuse_actions[i].sa_handler != SIG_IGN)
			fuse_actions[i].sa_handler(sig);
}

/* Put on_shutdown_signal in front of libfuse's handlers (install = 1), or
 * put libfuse's back (install = 0). */
static void chain_shutdown_signals(sf_engine *engine, int install)
{
	for (int i = 0; i < 3; i++) {
		if (install) {
			struct sigaction sa;

			memset(&sa, 0, sizeof sa);
			sa.sa_handler = on_shutdown_signal;
			sigemptyset(&sa.sa_mask);
			shutdown_engine = engine;
			sigaction(shutdown_signals[i], &sa, &fuse_actions[i]);
		} else
			sigaction(shutdown_signals[i], &fuse_actions[i], NULL);
	}
	if (!install)
		shutdown_engine = NULL;
}

static int serve(struct fuse_session *se, const sf_options *o)
{
	struct fuse_loop_config *cfg;
	int rc;

	if (o->single_thread)
		return fuse_session_loop(se);
	if (!(cfg = fuse_loop_cfg_create()))
		return -1;
	fuse_loop_cfg_set_max_threads(cfg, FUSE_MAX_THREADS);
	fuse_loop_cfg_set_clone_fd(cfg, 0);
	rc = fuse_session_loop_mt(se, cfg);
	fuse_loop_cfg_destroy(cfg);
	return rc;
}

/* The exit status for what the session loop returned: libfuse's signal
 * handler leaves the signal's number there. */
static int serve_status(int rc)
{
	for (int i = 0; i < 3; i++)
		if (rc == shutdown_signals[i])
			return 0;
	return rc == 0 ? 0 : 1;
}

/* log=FILE, opened before daemonizing so a bad path is reported to the
 * user; -1 (and a message) when it cannot be opened for appending. */
static int open_log(const char *path)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);

	if (fd < 0)
		fprintf(stderr, "scopefs: option 'log': cannot open '%s' for appending: %s\n", path,
		        strerror(errno));
	return fd;
}

/* Log lines go to stderr (log.c); a daemon's stderr is /dev/null, so with
 * log=FILE it becomes the file: read errors then name their files there. */
static void log_to_file(int fd)
{
	if (fd >= 0 && dup2(fd, STDERR_FILENO) < 0)
		sf_log(SF_LOG_WARN, "option 'log': %s", strerror(errno));
}

int main(int argc, char **argv)
{
	sf_options o = {0};
	sf_err e = {0};
	sf_mount *m = NULL;
	struct fuse_args args = FUSE_ARGS_INIT(0, NULL);
	struct fuse_session *se = NULL;
	int status = 1, log_fd = -1;

	if (sf_options_parse(argc, argv, &o, &e) != SF_OK) {
		fprintf(stderr, "scopefs: %s\n", e.msg);
		sf_options_free(&o);
		return 2;
	}
	if (o.show_help || o.show_version) {
		if (o.show_help)
			sf_options_usage(argv[0]);
		else
			printf("scopefs %s (libfuse %s)\n", sf_version(), fuse_pkgversion());
		sf_options_free(&o);
		return 0;
	}
	sf_log_set_level(o.debug ? SF_LOG_DEBUG : SF_LOG_INFO);
	/* Units are megabytes each and come and go all the time.  glibc's
	 * dynamic mmap threshold and one arena per thread let freed units pile
	 * up in many heaps, so RSS drifted far above mem (482 MB at mem=256M
	 * in make bench).  A fixed threshold above the unit size keeps units in
	 * the heap, where the next unit reuses them (no page faults), and two
	 * arenas keep the free memory in few places (217 MB at mem=128M). */
	mallopt(M_MMAP_THRESHOLD, 16 << 20);
	mallopt(M_ARENA_MAX, 2);
	if (!o.threads) {
		long n = sysconf(_SC_NPROCESSORS_ONLN);
		o.threads = n > 0 ? (unsigned)n : 1;
	}
	if (o.readahead == SF_READAHEAD_AUTO)
		o.readahead = 2 * o.threads;
	if (sf_mount_build(&o, &m, &e) != SF_OK) {
		fprintf(stderr, "scopefs: %s\n", e.msg);
		status = e.code == SF_EINVAL ? 2 : 1;
		goto out_options;
	}
	if (o.log_path && (log_fd = open_log(o.log_path)) < 0)
		goto out_mount;
	if (fuse_argv(&o, argv[0], &args) != SF_OK)
		goto out_mount;
	se = fuse_session_new(&args, &sf_fuse_ops, sizeof sf_fuse_ops, m);
	if (!se)
		goto out_args;
	if (fuse_set_signal_handlers(se) != 0)
		goto out_session;
	if (fuse_session_mount(se, o.mountpoint) != 0) {
		fprintf(stderr, "scopefs: cannot mount on %s\n", o.mountpoint);
		goto out_signals;
	}
	/* Threads do not survive fork: start the engine after daemonizing. */
	if (fuse_daemonize(o.foreground) != 0)
		goto out_unmount;
	log_to_file(log_fd);
	if (sf_mount_start(m, &e) != SF_OK) {
		sf_log(SF_LOG_ERROR, "%s", e.msg);
		goto out_unmount;
	}
	sf_log(SF_LOG_INFO, "mounted %s on %s (%u slides, %u stacks, %u problems; cache %s)",
	       o.raw_dir, o.mountpoint, m->dataset->slide_count, m->dataset->stack_count,
	       m->dataset->problem_count, o.cache_dir);
	chain_shutdown_signals(m->engine, 1);
	status = serve_status(serve(se, &o));
	chain_shutdown_signals(NULL, 0);
out_unmount:
	fuse_session_unmount(se);
out_signals:
	fuse_remove_signal_handlers(se);
out_session:
	fuse_session_destroy(se);
out_args:
	fuse_opt_free_args(&args);
out_mount:
	sf_mount_free(m);
	if (log_fd >= 0)
		close(log_fd);
out_options:
	sf_options_free(&o);
	return status;
}

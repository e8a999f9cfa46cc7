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
#include <sys/resource.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "scopefs/cpus.h"
#include "scopefs/fuse_ops.h"
#include "scopefs/log.h"
#include "scopefs/mount.h"
#include "scopefs/options.h"

#define FUSE_MAX_THREADS 64

/* The argv libfuse sees: read-only, our fsname unless given, user options.
 * allow_other implies default_permissions: without it the kernel leaves
 * permission checks to the daemon, which makes none, so any user could
 * read a file the served mode (its source's) says is private. */
static int fuse_argv(const sf_options *o, const char *argv0, struct fuse_args *args)
{
	char opts[1200];
	int has_fsname = o->fuse_given & SF_FUSE_FSNAME;
	int has_subtype = o->fuse_given & SF_FUSE_SUBTYPE;
	int add_perms =
	    (o->fuse_given & SF_FUSE_ALLOW_OTHER) && !(o->fuse_given & SF_FUSE_DEFAULT_PERMISSIONS);

	if (add_perms)
		sf_log(SF_LOG_INFO, "allow_other given: default_permissions added (the kernel "
		                    "checks each file's mode)");
	snprintf(opts, sizeof opts, "ro%s%s%s%s%s", has_fsname ? "" : ",fsname=scopefs",
	         has_subtype ? "" : ",subtype=scopefs", add_perms ? ",default_permissions" : "",
	         o->fuse_mount_opts[0] ? "," : "", o->fuse_mount_opts);
	if (fuse_opt_add_arg(args, argv0) || fuse_opt_add_arg(args, "-o") ||
	    fuse_opt_add_arg(args, opts) || (o->debug && fuse_opt_add_arg(args, "-d")))
		return SF_ENOMEM;
	return SF_OK;
}

/* Raise the open-file soft limit to the hard one.  The daemon holds one
 * descriptor per open raw/ file and a source reader per product per
 * worker, so the usual soft limit (1024) made opens fail with EMFILE (EIO
 * to readers) long before the hard limit.  The new soft limit, or 0 when
 * it could not be read or raised (then the old one stays). */
static rlim_t raise_nofile_limit(void)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
		return 0;
	if (rl.rlim_cur < rl.rlim_max) {
		rlim_t old = rl.rlim_cur;
		rl.rlim_cur = rl.rlim_max;
		if (setrlimit(RLIMIT_NOFILE, &rl) != 0) {
			sf_log(SF_LOG_WARN,
			       "cannot raise the open-file limit from %llu to %llu: %s",
			       (unsigned long long)old, (unsigned long long)rl.rlim_max,
			       strerror(errno));
			return 0;
		}
	}
	return rl.rlim_cur;
}

/* The shutdown signals libfuse handles (it exits the session loop).  That
 * loop first waits for the requests in progress, and a read may be waiting
 * for a deconvolution block that takes minutes on the CPU, or a lookup for
 * scopefs's own registration: so a signal also asks the engine's products
 * and the registration job to end (sf_mount_stop).  These globals are set
 * in main before the handlers are installed and cleared after they are
 * removed, by the main thread only; the handler only reads them (they are
 * here for the handler's sake). */
static const int shutdown_signals[] = {SIGHUP, SIGINT, SIGTERM};
static sf_mount *volatile shutdown_mount;
static struct sigaction fuse_actions[3]; /* libfuse's, chained to */
static int chained[3];                   /* on_shutdown_signal installed for it */

static void on_shutdown_signal(int sig)
{
	if (shutdown_mount)
		sf_mount_stop(shutdown_mount);
	for (int i = 0; i < 3; i++)
		if (shutdown_signals[i] == sig && fuse_actions[i].sa_handler != SIG_DFL &&
		    fuse_actions[i].sa_handler != SIG_IGN)
			fuse_actions[i].sa_handler(sig);
}

/* Put on_shutdown_signal in front of libfuse's handlers (install = 1), or
 * put libfuse's back (install = 0).  A signal the daemon inherited as
 * ignored (SIGHUP under nohup, SIGINT for `scopefs -f &` in a script or a
 * SLURM job) stays ignored, as libfuse leaves it: stopping the engine on it,
 * with no session exit to follow, left a mount whose every deconvolved/
 * read failed at once, for ever. */
static void chain_shutdown_signals(sf_mount *m, int install)
{
	for (int i = 0; i < 3; i++) {
		if (install) {
			struct sigaction sa, now;

			chained[i] = sigaction(shutdown_signals[i], NULL, &now) == 0 &&
			             now.sa_handler != SIG_IGN;
			if (!chained[i])
				continue;
			memset(&sa, 0, sizeof sa);
			sa.sa_handler = on_shutdown_signal;
			sigemptyset(&sa.sa_mask);
			shutdown_mount = m;
			sigaction(shutdown_signals[i], &sa, &fuse_actions[i]);
		} else if (chained[i]) {
			sigaction(shutdown_signals[i], &fuse_actions[i], NULL);
			chained[i] = 0;
		}
	}
	if (!install)
		shutdown_mount = NULL;
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
	rlim_t nofile;

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
	nofile = raise_nofile_limit();
	/* Units are megabytes each and come and go all the time.  glibc's
	 * dynamic mmap threshold and one arena per thread let freed units pile
	 * up in many heaps, so RSS drifted far above mem (482 MB at mem=256M
	 * in make bench).  A fixed threshold above the unit size keeps units in
	 * the heap, where the next unit reuses them (no page faults), and two
	 * arenas keep the free memory in few places (217 MB at mem=128M). */
	mallopt(M_MMAP_THRESHOLD, 16 << 20);
	mallopt(M_ARENA_MAX, 2);
	if (!o.threads)
		o.threads = sf_cpus_usable();
	if (o.readahead == SF_READAHEAD_AUTO)
		o.readahead = 2 * o.threads;
	if (o.log_path && (log_fd = open_log(o.log_path)) < 0)
		goto out_options;
	sf_log_copy_to(log_fd); /* the build's warnings go to the file too */
	if (sf_mount_build(&o, &m, &e) != SF_OK) {
		sf_log_copy_to(-1);
		fprintf(stderr, "scopefs: %s\n", e.msg);
		if (log_fd >= 0)
			dprintf(log_fd, "scopefs: %s\n", e.msg);
		status = e.code == SF_EINVAL ? 2 : 1;
		goto out_mount;
	}
	sf_log_copy_to(-1);
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
	if (nofile)
		sf_log(SF_LOG_INFO, "open files: up to %llu (RLIMIT_NOFILE soft limit)",
		       (unsigned long long)nofile);
	chain_shutdown_signals(m, 1);
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

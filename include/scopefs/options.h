/* options.h — the mount options: one table, one struct, checked once.
 *
 * Options come from -o on the command line and from preset files
 * (preset=NAME reads mountopts/NAME, or the file NAME when it holds a '/'),
 * whose `key=value` lines are the same options; the command line wins, and
 * of two presets that give one key, the one named later.
 * In a -o list, and in a preset line, a backslash makes the next character
 * plain (libfuse's convention): "\," is a comma inside a value.
 * Every option is validated here: an unknown key or a malformed value is a
 * one-line error naming it (main exits with status 2, nothing mounted). */
#ifndef SCOPEFS_OPTIONS_H
#define SCOPEFS_OPTIONS_H

#include <stdint.h>

#include "scopefs/autoreg.h"
#include "scopefs/err.h"

#define SF_READAHEAD_AUTO 0xffffffffu /* readahead= not given */

/* libfuse options main() adds a default for, or derives another from. */
enum {
	SF_FUSE_FSNAME = 1,
	SF_FUSE_SUBTYPE = 2,
	SF_FUSE_ALLOW_OTHER = 4,
	SF_FUSE_DEFAULT_PERMISSIONS = 8
};

typedef struct sf_options {
	char *raw_dir;       /* absolute, resolved RAW_DIR */
	char *mountpoint;    /* absolute, resolved MOUNTPOINT */
	char *cache_dir;     /* cache=, default $XDG_CACHE_HOME/scopefs or ~/.cache/scopefs;
	                      * absolute, without "." or "..", outside RAW_DIR and MOUNTPOINT */
	uint64_t cache_size; /* cache_size=, bytes; 0: unbounded */
	uint64_t mem;        /* mem=, bytes of decoded tiles in RAM */
	unsigned threads;    /* threads=, workers; 0: one per CPU */
	unsigned readahead;  /* readahead=, units scheduled ahead of a sequential reader;
	                      * 0: none; SF_READAHEAD_AUTO until main makes it 2 x threads */
	char *reference;     /* reference=, file name or stem; NULL: first slide by name */
	char *preset;        /* preset= values as given, in order, one a line */
	char *transforms;    /* transforms=DIR: transform files of moving slides, or NULL */
	char *log_path;      /* log=FILE: log lines appended there (absolute, as cache_dir),
	                      * or NULL: stderr */
	int interp;          /* interp=: an sf_interp (warp.h), default bilinear */
	double background;   /* background=: value outside a warped slide */
	int gpu;             /* gpu=: -1 auto, -2 off, else a device index */
	int foreground, debug, single_thread;
	int show_help, show_version;
	/* Options handed to libfuse's mount (allow_other, fsname=...): "-o" list. */
	char *fuse_mount_opts;
	unsigned fuse_given; /* SF_FUSE_* bits: those of them the user gave */
	/* Deconvolution settings (dxy=0.4,dz=1.2,...) from -o and the preset,
	 * each checked alone (a preset adds only keys the command line lacks);
	 * every stack applies them, then its own (product_deconv.h).  NULL: none. */
	char *deconv;
	sf_reg_settings reg; /* reg_*: scopefs's own registration of slides without transforms */
} sf_options;

/* Parse argv into o (zeroed by the caller).  For --help/--version it sets
 * the flag and returns SF_OK without requiring RAW_DIR/MOUNTPOINT. */
int sf_options_parse(int argc, char **argv, sf_options *o, sf_err *e);
void sf_options_free(sf_options *o);

/* "50G" -> 53687091200; K, M, G, T suffixes (powers of 1024), optional B. */
int sf_parse_size(const char *text, uint64_t *out);

/* The --help text.  Presets are looked up in $SCOPEFS_PRESETS, then in
 * mountopts/ beside the tree the binary was built in, then in
 * /usr/share/scopefs/mountopts. */
void sf_options_usage(const char *argv0);

const char *sf_version(void);

#endif

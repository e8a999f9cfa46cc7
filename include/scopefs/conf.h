/* conf.h — line files of options (presets, scopefs.conf): their next item.
 *
 * One item per line; blank lines and lines starting with '#' (after leading
 * space) are skipped, and space is trimmed at both ends and around the
 * first '=' ("reg = off" is "reg=off").  A line that does
 * not fit the caller's buffer is an error, never two lines: its tail would
 * otherwise be read as a line of its own (a long comment ending in "dxy=7"
 * would set dxy). */
#ifndef SCOPEFS_CONF_H
#define SCOPEFS_CONF_H

#include <stdio.h>

#include "scopefs/err.h"

/* The next item of f into line (cap bytes), *item pointing into it;
 * *lineno counts the lines read; a UTF-8 byte order mark opening line 1 is
 * skipped.  SF_OK, SF_ENOTFOUND at the end of f, SF_EINVAL "PATH:LINE: line
 * longer than N characters", or SF_EIO "PATH: cannot read: ..." (a folder,
 * a failing disk: never taken for the end). */
int sf_conf_next(FILE *f, const char *path, char *line, size_t cap, unsigned *lineno, char **item,
                 sf_err *e);

#endif

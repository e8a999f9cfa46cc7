/* fuse_ops.h — the FUSE low-level operation table; userdata is an sf_mount. */
#ifndef SCOPEFS_FUSE_OPS_H
#define SCOPEFS_FUSE_OPS_H

#ifndef FUSE_USE_VERSION
#define FUSE_USE_VERSION 312
#endif
#include <fuse_lowlevel.h>

extern const struct fuse_lowlevel_ops sf_fuse_ops;

#endif

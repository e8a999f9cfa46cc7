/* err.h — errors are values.
 *
 * Every fallible function returns an int code (SF_OK = 0) and, on failure,
 * fills a caller-owned sf_err with the code and a one-line message that names
 * the file or option at fault.  Nothing below main() exits or aborts on bad
 * input.  The FUSE layer maps codes to errno in one place (sf_errno). */
#ifndef SCOPEFS_ERR_H
#define SCOPEFS_ERR_H

enum sf_code {
	SF_OK = 0,
	SF_ENOMEM,       /* an allocation failed */
	SF_EIO,          /* a read or write of a file failed */
	SF_EFORMAT,      /* input is not what it claims (bad TIFF, bad transform) */
	SF_EINVAL,       /* bad argument or option value */
	SF_ENOTFOUND,    /* absent: no such file, cache miss */
	SF_EUNSUPPORTED, /* valid input we do not handle */
	SF_ECORRUPT,     /* a checksum or size check failed */
	SF_EINTR,        /* stopped on request (FUSE interrupt, unmount) */
	SF_ERANGE,       /* a size or offset overflows */
	SF_EDEVICE,      /* the GPU failed or ran out of memory */
};

typedef struct sf_err {
	int code;      /* one of enum sf_code */
	char msg[512]; /* NUL-terminated, one line, names the file at fault */
} sf_err;

/* Fill e (if not NULL) and return code, so callers can write
 * `return sf_fail(e, SF_EFORMAT, "%s: not a TIFF", path);`. */
int sf_fail(sf_err *e, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* The errno a FUSE reply should carry for code. */
int sf_errno(int code);

/* A short stable name for code ("format", "io", ...), for logs and status. */
const char *sf_code_name(int code);

#endif

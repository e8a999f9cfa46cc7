/* err.c — error values: fill a caller's sf_err, map codes to errno. */
#include "scopefs/err.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>

int sf_fail(sf_err *e, int code, const char *fmt, ...)
{
	if (e) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(e->msg, sizeof e->msg, fmt, ap);
		va_end(ap);
		e->code = code;
	}
	return code;
}

int sf_errno(int code)
{
	switch (code) {
	case SF_OK: return 0;
	case SF_ENOMEM: return ENOMEM;
	case SF_EINVAL: return EINVAL;
	case SF_ENOTFOUND: return ENOENT;
	case SF_EUNSUPPORTED: return ENOTSUP;
	case SF_EINTR: return EINTR;
	case SF_ERANGE: return EFBIG;
	default: return EIO; /* format, io, corrupt, device: the reader sees EIO */
	}
}

const char *sf_code_name(int code)
{
	static const char *const names[] = {
	    "ok",          "nomem",   "io",          "format", "invalid", "notfound",
	    "unsupported", "corrupt", "interrupted", "range",  "device",
	};
	if (code < 0 || code >= (int)(sizeof names / sizeof names[0]))
		return "unknown";
	return names[code];
}

/* utf8.h — is this byte string UTF-8?  File names are bytes, but JSON
 * (.scopefs/status) and OME-XML (declared UTF-8) must be valid UTF-8, so
 * the writers of both check each character and replace a malformed byte
 * with U+FFFD rather than make the whole document unreadable. */
#ifndef SCOPEFS_UTF8_H
#define SCOPEFS_UTF8_H

#include <stddef.h>

/* U+FFFD, the replacement character, in UTF-8. */
#define SF_UTF8_REPLACEMENT "\xEF\xBF\xBD"

/* The length (1-4) of the well-formed UTF-8 character that starts at s
 * (RFC 3629: no overlong forms, no surrogates, nothing past U+10FFFF), or 0
 * when s starts a malformed sequence.  Reads no byte past a NUL. */
size_t sf_utf8_length(const char *s);

/* Code point cp as UTF-8 into out (room for 4 bytes, no NUL added); the
 * number of bytes, or 0 when cp is no character (0, a UTF-16 surrogate,
 * past U+10FFFF), which the caller refuses or replaces. */
size_t sf_utf8_encode(unsigned long cp, char *out);

#endif

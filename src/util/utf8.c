/* utf8.c — the one check of UTF-8 well-formedness, and the one encoder (utf8.h). */
#include "scopefs/utf8.h"

size_t sf_utf8_length(const char *text)
{
	const unsigned char *s = (const unsigned char *)text;
	size_t n = s[0] < 0x80                    ? 1
	           : s[0] >= 0xC2 && s[0] <= 0xDF ? 2
	           : s[0] >= 0xE0 && s[0] <= 0xEF ? 3
	           : s[0] >= 0xF0 && s[0] <= 0xF4 ? 4
	                                          : 0;
	/* The second byte's range excludes overlong forms (E0, F0), UTF-16
	 * surrogates (ED) and code points past U+10FFFF (F4). */
	unsigned lo = s[0] == 0xE0 ? 0xA0 : s[0] == 0xF0 ? 0x90 : 0x80;
	unsigned hi = s[0] == 0xED ? 0x9F : s[0] == 0xF4 ? 0x8F : 0xBF;
	for (size_t i = 1; i < n; i++) {
		unsigned min = i == 1 ? lo : 0x80, max = i == 1 ? hi : 0xBF;
		if (s[i] < min || s[i] > max) /* a NUL ends the check here */
			return 0;
	}
	return n;
}

size_t sf_utf8_encode(unsigned long cp, char *out)
{
	if (cp == 0 || (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF)
		return 0;
	if (cp < 0x80) {
		out[0] = (char)cp;
		return 1;
	}
	if (cp < 0x800) {
		out[0] = (char)(0xC0 | (cp >> 6));
		out[1] = (char)(0x80 | (cp & 0x3F));
		return 2;
	}
	if (cp < 0x10000) {
		out[0] = (char)(0xE0 | (cp >> 12));
		out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
		out[2] = (char)(0x80 | (cp & 0x3F));
		return 3;
	}
	out[0] = (char)(0xF0 | (cp >> 18));
	out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
	out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
	out[3] = (char)(0x80 | (cp & 0x3F));
	return 4;
}

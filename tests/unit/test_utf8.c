/* test_utf8.c — sf_utf8_length against the well-formed byte sequences of
 * RFC 3629 (its table 3-7 in the Unicode standard) and Python's decoder. */
#include <string.h>

#include "check.h"
#include "scopefs/utf8.h"

static void test_utf8(void)
{
	struct {
		const char *s;
		size_t want;
	} cases[] = {
	    {"a", 1},
	    {"\x7F", 1},
	    {"\xC3\xA9", 2},         /* é */
	    {"\xC2\x80", 2},         /* U+0080, the first two-byte character */
	    {"\xC0\xAF", 0},         /* overlong '/' */
	    {"\xC1\xBF", 0},         /* overlong */
	    {"\xE9", 0},             /* Latin-1 é alone */
	    {"\xE9t", 0},            /* Latin-1 é then ASCII */
	    {"\xE2\x82\xAC", 3},     /* € */
	    {"\xE0\x9F\xBF", 0},     /* overlong three-byte */
	    {"\xE0\xA0\x80", 3},     /* U+0800 */
	    {"\xED\x9F\xBF", 3},     /* U+D7FF */
	    {"\xED\xA0\x80", 0},     /* U+D800, a surrogate */
	    {"\xEF\xBF\xBD", 3},     /* U+FFFD */
	    {"\xEF\xBB\xBF", 3},     /* the BOM is a character */
	    {"\xF0\x9F\x98\x80", 4}, /* U+1F600 */
	    {"\xF0\x8F\xBF\xBF", 0}, /* overlong four-byte */
	    {"\xF4\x8F\xBF\xBF", 4}, /* U+10FFFF */
	    {"\xF4\x90\x80\x80", 0}, /* past U+10FFFF */
	    {"\xF5\x80\x80\x80", 0},
	    {"\xFF", 0},
	    {"\x80", 0},     /* a continuation byte alone */
	    {"\xE2\x82", 0}, /* cut short by the NUL */
	    {"\xF0\x9F\x98", 0},
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		size_t got = sf_utf8_length(cases[i].s);
		CHECK(got == cases[i].want, "case %zu: %zu, want %zu", i, got, cases[i].want);
	}
}

/* The encoder against byte sequences written out by hand (RFC 3629 table),
 * and every one it makes read back by sf_utf8_length at its own length. */
static void test_encode(void)
{
	struct {
		unsigned long cp;
		const char *want;
	} cases[] = {
	    {0x41, "A"},
	    {0xE9, "\xC3\xA9"},
	    {0x7FF, "\xDF\xBF"},
	    {0x800, "\xE0\xA0\x80"},
	    {0x20AC, "\xE2\x82\xAC"},
	    {0xFFFD, "\xEF\xBF\xBD"},
	    {0x1F600, "\xF0\x9F\x98\x80"},
	    {0x10FFFF, "\xF4\x8F\xBF\xBF"},
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		char out[5] = {0};
		size_t n = sf_utf8_encode(cases[i].cp, out);
		CHECK(n == strlen(cases[i].want) && !memcmp(out, cases[i].want, n) &&
		          sf_utf8_length(out) == n,
		      "U+%lX: %zu bytes", cases[i].cp, n);
	}
	unsigned long none[] = {0, 0xD800, 0xDFFF, 0x110000, 0xFFFFFFFFul};
	for (size_t i = 0; i < sizeof none / sizeof none[0]; i++) {
		char out[5];
		CHECK(sf_utf8_encode(none[i], out) == 0, "U+%lX is no character", none[i]);
	}
}

int main(void)
{
	test_utf8();
	test_encode();
	return CHECK_DONE("test_utf8");
}

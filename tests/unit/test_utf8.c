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

int main(void)
{
	test_utf8();
	return CHECK_DONE("test_utf8");
}

/* conf.c — the next item of a line file of options (conf.h). */
#include "scopefs/conf.h"

#include <ctype.h>
#include <errno.h>
#include <string.h>

/* fgets filled line (cap bytes) without reaching the end of a line or of f. */
static int line_too_long(FILE *f, const char *line, size_t cap)
{
	size_t len = strlen(line);
	int c;

	if (len < cap - 1 || line[len - 1] == '\n' || (c = getc(f)) == EOF)
		return 0;
	ungetc(c, f);
	return 1;
}

/* "key = value" to "key=value": space around the first '=' is layout, as
 * in most config files, not part of the key or the value. */
static void squeeze_equals(char *s)
{
	char *eq = strchr(s, '='), *key_end, *value;

	if (!eq)
		return;
	for (key_end = eq; key_end > s && isspace((unsigned char)key_end[-1]); key_end--)
		;
	for (value = eq + 1; isspace((unsigned char)*value); value++)
		;
	*key_end = '=';
	memmove(key_end + 1, value, strlen(value) + 1);
}

int sf_conf_next(FILE *f, const char *path, char *line, size_t cap, unsigned *lineno, char **item,
                 sf_err *e)
{
	while (fgets(line, (int)cap, f)) {
		char *s = line, *end;

		++*lineno;
		if (line_too_long(f, line, cap))
			return sf_fail(e, SF_EINVAL, "%s:%u: line longer than %zu characters", path,
			               *lineno, cap - 2);
		/* A UTF-8 byte order mark (Windows Notepad writes one) is no text:
		 * kept, it made "mem=64M" an unknown option with an invisible name. */
		if (*lineno == 1 && !strncmp(s, "\xEF\xBB\xBF", 3))
			s += 3;
		while (isspace((unsigned char)*s))
			s++;
		end = s + strlen(s);
		while (end > s && isspace((unsigned char)end[-1]))
			*--end = '\0';
		if (*s && *s != '#') {
			squeeze_equals(s);
			*item = s;
			return SF_OK;
		}
	}
	/* fgets says NULL at the end and on a read error alike (EISDIR for a
	 * folder, EIO): only the end is the end of the options. */
	if (ferror(f))
		return sf_fail(e, SF_EIO, "%s: cannot read: %s", path, strerror(errno));
	return SF_ENOTFOUND;
}

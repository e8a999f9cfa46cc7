/* ome_xml.c — write the OME-XML document of a virtual OME-TIFF.
 *
 * Names come from source files and may hold any character: every attribute
 * value is escaped, so the document always parses. */
#include "scopefs/ome_xml.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "scopefs/utf8.h"

/* A growable string; `failed` latches the first allocation failure. */
typedef struct text {
	char *buf;
	size_t len, cap;
	int failed;
} text;

static void text_add(text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void text_add(text *t, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (t->failed)
		return;
	va_start(ap, fmt);
	n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0) {
		t->failed = 1;
		return;
	}
	if (t->len + (size_t)n + 1 > t->cap) {
		size_t cap = t->cap ? t->cap : 1024;
		char *grown;
		while (cap < t->len + (size_t)n + 1)
			cap *= 2;
		grown = realloc(t->buf, cap);
		if (!grown) {
			t->failed = 1;
			return;
		}
		t->buf = grown;
		t->cap = cap;
	}
	va_start(ap, fmt);
	vsnprintf(t->buf + t->len, t->cap - t->len, fmt, ap);
	va_end(ap);
	t->len += (size_t)n;
}

/* U+FFFE and U+FFFF: well-formed UTF-8, but not characters XML 1.0 allows. */
static int xml_noncharacter(const char *s, size_t n)
{
	return n == 3 && !memcmp(s, "\xEF\xBF", 2) && ((unsigned char)s[2] & 0xFE) == 0xBE;
}

/* Names come from file names and TIFF tags, which are bytes: a Latin-1
 * name would make the document (declared UTF-8) unreadable to an XML
 * parser, so each byte of a malformed sequence becomes U+FFFD. */
static void text_add_escaped(text *t, const char *s)
{
	while (*s) {
		size_t n = sf_utf8_length(s);
		switch (*s) {
		case '&': text_add(t, "&amp;"); break;
		case '<': text_add(t, "&lt;"); break;
		case '>': text_add(t, "&gt;"); break;
		case '"': text_add(t, "&quot;"); break;
		default:
			/* Control characters are not allowed in XML 1.0 attributes. */
			if ((unsigned char)*s < 0x20)
				text_add(t, " ");
			else if (!n || xml_noncharacter(s, n))
				text_add(t, SF_UTF8_REPLACEMENT);
			else
				text_add(t, "%.*s", (int)n, s);
		}
		s += n ? n : 1;
	}
}

char *sf_ome_xml(const sf_ome_image *img, sf_err *e)
{
	text t = {0};

	text_add(&t, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
	             "<OME xmlns=\"http://www.openmicroscopy.org/Schemas/OME/2016-06\" "
	             "xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" "
	             "xsi:schemaLocation=\"http://www.openmicroscopy.org/Schemas/OME/2016-06 "
	             "http://www.openmicroscopy.org/Schemas/OME/2016-06/ome.xsd\" "
	             "Creator=\"scopefs\">");
	text_add(&t, "<Image ID=\"Image:0\" Name=\"");
	text_add_escaped(&t, img->name ? img->name : "image");
	text_add(&t,
	         "\"><Pixels ID=\"Pixels:0\" DimensionOrder=\"XYCZT\" Type=\"%s\" "
	         "SizeX=\"%u\" SizeY=\"%u\" SizeC=\"%u\" SizeZ=\"1\" SizeT=\"1\"",
	         sf_dtype_ome_name(img->dtype), img->width, img->height,
	         img->channels * img->samples);
	if (img->pixel_size_x > 0 && img->pixel_size_y > 0)
		text_add(&t,
		         " PhysicalSizeX=\"%.10g\" PhysicalSizeXUnit=\"\xC2\xB5m\" "
		         "PhysicalSizeY=\"%.10g\" PhysicalSizeYUnit=\"\xC2\xB5m\"",
		         img->pixel_size_x, img->pixel_size_y);
	if (img->samples == 3)
		text_add(&t, " Interleaved=\"true\"");
	text_add(&t, ">");
	for (uint32_t c = 0; c < img->channels; c++) {
		text_add(&t, "<Channel ID=\"Channel:0:%u\" SamplesPerPixel=\"%u\"", c,
		         img->samples);
		if (img->channel_names && img->channel_names[c]) {
			text_add(&t, " Name=\"");
			text_add_escaped(&t, img->channel_names[c]);
			text_add(&t, "\"");
		}
		text_add(&t, "><LightPath/></Channel>");
	}
	for (uint32_t c = 0; c < img->channels; c++)
		text_add(&t,
		         "<TiffData IFD=\"%u\" FirstC=\"%u\" FirstZ=\"0\" FirstT=\"0\" "
		         "PlaneCount=\"1\"/>",
		         c, c);
	text_add(&t, "</Pixels></Image></OME>");
	if (t.failed) {
		free(t.buf);
		sf_fail(e, SF_ENOMEM, "OME-XML for %s: out of memory", img->name ? img->name : "?");
		return NULL;
	}
	return t.buf;
}

/* test_autoreg_thumb.c — which channel reg_channel names (sf_qc_channel). */
#include <string.h>

#include "scopefs/qc.h"
#include "check.h"

static uint32_t pick(char **names, uint32_t n, const char *want, int *rc, sf_err *e)
{
	sf_slide_info s;
	uint32_t c = 99;

	memset(&s, 0, sizeof s);
	s.path = "/raw/round2.ome.tif";
	s.channels = n;
	s.samples = 1;
	s.channel_names = names;
	memset(e, 0, sizeof *e);
	*rc = sf_qc_channel(&s, want, &c, e);
	return c;
}

int main(void)
{
	char *names[] = {"CD3 R2", "Hoechst 33342", "DAPI R2", "dapi"};
	char *plain[] = {"Channel 0", "Channel 1"};
	sf_err e;
	int rc;

	CHECK(pick(names, 4, "DAPI", &rc, &e) == 3 && rc == SF_OK, "whole name (any case) first");
	CHECK(pick(names, 3, "DAPI", &rc, &e) == 2 && rc == SF_OK,
	      "a name containing it when no whole name matches");
	CHECK(pick(names, 4, "r2", &rc, &e) == 0 && rc == SF_OK, "the first that contains it");
	CHECK(pick(names, 4, "2", &rc, &e) == 2 && rc == SF_OK, "a number is an index first");
	CHECK(pick(names, 4, "", &rc, &e) == 1 && rc == SF_OK, "default: first DAPI/Hoechst");
	CHECK(pick(plain, 2, NULL, &rc, &e) == 0 && rc == SF_OK, "default without one: 0");
	pick(names, 4, "CD8", &rc, &e);
	CHECK(rc == SF_EINVAL && strstr(e.msg, "round2.ome.tif") && strstr(e.msg, "reg_channel") &&
	          strstr(e.msg, "CD8"),
	      "no match names the slide, the option and the value: %s", e.msg);
	pick(plain, 2, "7", &rc, &e);
	CHECK(rc == SF_EINVAL, "an index past the channels refused");
	return CHECK_DONE("test_autoreg_thumb");
}

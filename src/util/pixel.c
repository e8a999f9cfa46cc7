/* pixel.c — sample type sizes and names. */
#include "scopefs/pixel.h"

size_t sf_dtype_bytes(sf_dtype t)
{
	switch (t) {
	case SF_U8: return 1;
	case SF_U16: return 2;
	case SF_F32: return 4;
	}
	return 0;
}

const char *sf_dtype_ome_name(sf_dtype t)
{
	switch (t) {
	case SF_U8: return "uint8";
	case SF_U16: return "uint16";
	case SF_F32: return "float";
	}
	return "unknown";
}

int sf_pixel_um_plausible(double um)
{
	return um >= 1e-4 && um <= 1e4;
}

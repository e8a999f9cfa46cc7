/* key.c — 128-bit keys from XXH3-128. */
#include "scopefs/key.h"

#include <stdio.h>
#include <string.h>
#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

static sf_key key_of_canonical(XXH128_hash_t h)
{
	sf_key k = {h.high64, h.low64};
	return k;
}

sf_key sf_key_of(const void *data, size_t n)
{
	return key_of_canonical(XXH3_128bits(data, n));
}

/* Mixing hashes the 16 key bytes followed by the value's bytes, so the
 * result depends on both and on their order.  The state lives on the stack
 * (XXH_STATIC_LINKING_ONLY exposes its size), so mixing cannot fail. */
static sf_key key_mix_bytes(sf_key k, const void *v, size_t n)
{
	XXH3_state_t st;

	XXH3_INITSTATE(&st);
	XXH3_128bits_reset(&st);
	XXH3_128bits_update(&st, &k.hi, 8);
	XXH3_128bits_update(&st, &k.lo, 8);
	XXH3_128bits_update(&st, v, n);
	return key_of_canonical(XXH3_128bits_digest(&st));
}

sf_key sf_key_mix_u64(sf_key k, uint64_t v)
{
	return key_mix_bytes(k, &v, sizeof v);
}

sf_key sf_key_mix_str(sf_key k, const char *s)
{
	return key_mix_bytes(k, s, strlen(s) + 1);
}

void sf_key_hex(sf_key k, char hex[33])
{
	snprintf(hex, 33, "%016llx%016llx", (unsigned long long)k.hi, (unsigned long long)k.lo);
}

int sf_key_equal(sf_key a, sf_key b)
{
	return a.hi == b.hi && a.lo == b.lo;
}

/* key.h — 128-bit content keys (XXH3-128) for cache entries and products.
 *
 * A key names everything a result depends on: the source file's identity
 * (path, size, mtime), the product and a hash of its parameters, the level
 * and the unit index.  Keys are built by mixing those parts in a fixed order. */
#ifndef SCOPEFS_KEY_H
#define SCOPEFS_KEY_H

#include <stddef.h>
#include <stdint.h>

typedef struct sf_key {
	uint64_t hi, lo;
} sf_key;

/* Hash of n bytes. */
sf_key sf_key_of(const void *data, size_t n);

/* A new key from k and v (order matters: mix(mix(k,a),b) != mix(mix(k,b),a)). */
sf_key sf_key_mix_u64(sf_key k, uint64_t v);
sf_key sf_key_mix_str(sf_key k, const char *s);

/* 32 lowercase hex digits and a NUL into hex[33]. */
void sf_key_hex(sf_key k, char hex[33]);

int sf_key_equal(sf_key a, sf_key b);

#endif

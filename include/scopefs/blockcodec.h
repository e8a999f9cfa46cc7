/* blockcodec.h — LZ4 with byte shuffling for pixel blocks (compute core, no I/O).
 *
 * Encoding splits each elem_bytes-wide sample into byte planes (all low bytes,
 * then all high bytes for uint16) before LZ4: the high bytes of noisy uint16
 * data are nearly constant and compress well once they sit together.
 * elem_bytes 1 means no shuffle.  The output is a plain LZ4 block; framing,
 * checksums and sizes belong to the caller (the disk cache). */
#ifndef SCOPEFS_BLOCKCODEC_H
#define SCOPEFS_BLOCKCODEC_H

#include <stddef.h>
#include <stdint.h>

#include "scopefs/err.h"

/* Worst-case encoded size for n input bytes. */
size_t sf_block_bound(size_t n);

/* Encode n bytes of src into dst (capacity cap >= sf_block_bound(n)).
 * scratch must hold n bytes (the shuffled copy).  On success *out_n is the
 * encoded length.  n must be a multiple of elem_bytes (1, 2 or 4). */
int sf_block_encode(const uint8_t *src, size_t n, unsigned elem_bytes, uint8_t *scratch,
                    uint8_t *dst, size_t cap, size_t *out_n, sf_err *e);

/* Decode enc_n bytes into exactly n bytes of dst (scratch: n bytes).
 * Fails with SF_ECORRUPT if the data does not decode to exactly n bytes. */
int sf_block_decode(const uint8_t *enc, size_t enc_n, size_t n, unsigned elem_bytes,
                    uint8_t *scratch, uint8_t *dst, sf_err *e);

/* The byte-plane transforms on their own (exposed for tests and for the GPU path). */
void sf_shuffle(const uint8_t *src, size_t n, unsigned elem_bytes, uint8_t *dst);
void sf_unshuffle(const uint8_t *src, size_t n, unsigned elem_bytes, uint8_t *dst);

#endif

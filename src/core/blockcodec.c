/* blockcodec.c — byte-plane shuffle plus one LZ4 block, for pixel tiles and blocks.
 *
 * Layout: for elem_bytes w and n bytes (m = n / w samples), the shuffled
 * buffer holds plane 0 (byte 0 of every sample, in sample order), then plane 1,
 * ... plane w-1.  Byte b is byte b in memory, so on a little-endian host plane
 * 0 of uint16 data is the low bytes.  The encoded form is exactly one LZ4 block
 * (LZ4_compress_fast, acceleration LZ4_ACCELERATION) of the shuffled buffer,
 * no frame and no size prefix:
 * the caller stores n, and decoding must produce exactly n bytes.
 *
 * Invariants:
 *  - decode(encode(x)) == x for every x with n a multiple of w, n included 0
 *    (0 bytes encode to the 1-byte empty LZ4 block).
 *  - decode never writes past dst[n] or scratch[n], whatever enc holds:
 *    LZ4_decompress_safe is bounded, and a result other than n is SF_ECORRUPT.
 *    A flipped literal byte can still decode to n wrong bytes: integrity is the
 *    caller's checksum (the disk cache keeps an XXH64 of the raw bytes).
 *  - No state, no allocation: callers own every buffer, so any thread may call. */
#include "scopefs/blockcodec.h"

#include <limits.h>
#include <string.h>

#include <lz4.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

/* LZ4's acceleration trades ratio for speed; decoding is the same.  On a
 * deconvolved float32 block (32 MiB, 2026-11-26, this VM) 1 -> 4 took the
 * encode from 930 to 2700 MB/s for a ratio of 1.326 instead of 1.348; on
 * uint16 pixels from 930 to 1220 MB/s, ratio 1.381 instead of 1.383.
 * Encoding was most of the disk cache's cost of a cold copy. */
#define LZ4_ACCELERATION 4

size_t sf_block_bound(size_t n)
{
	if (n > LZ4_MAX_INPUT_SIZE)
		return 0;
	return (size_t)LZ4_compressBound((int)n);
}

/* uint16 tiles and float32 blocks are the hot cases: with SSE2 (every
 * x86-64) 16 samples go per step.  The 2-byte split roughly doubles the
 * scalar loop's speed at -O2; the 4-byte one (float32 deconvolution blocks,
 * 64 MiB each) went from 3.6 to about 13 GB/s.  Each returns how many
 * samples it did; the scalar loops do the rest. */
#ifdef __SSE2__
/* Low and high bytes of the 16 uint16 in a, b: to dst[0..16) and hi[0..16). */
static void split16_sse2(__m128i a, __m128i b, uint8_t *lo, uint8_t *hi)
{
	const __m128i low_byte = _mm_set1_epi16(0x00ff);

	_mm_storeu_si128((__m128i *)lo,
	                 _mm_packus_epi16(_mm_and_si128(a, low_byte), _mm_and_si128(b, low_byte)));
	_mm_storeu_si128((__m128i *)hi,
	                 _mm_packus_epi16(_mm_srli_epi16(a, 8), _mm_srli_epi16(b, 8)));
}

static size_t shuffle2_sse2(const uint8_t *src, size_t m, uint8_t *dst)
{
	size_t i;

	for (i = 0; i + 16 <= m; i += 16)
		split16_sse2(_mm_loadu_si128((const __m128i *)(src + 2 * i)),
		             _mm_loadu_si128((const __m128i *)(src + 2 * i + 16)), dst + i,
		             dst + m + i);
	return i;
}

/* The low (high) 16 bits of the 32-bit lanes of a and b as 8 uint16.  SSE2
 * packs only with signed saturation, so each half is first sign-extended:
 * it then fits an int16 and packs unchanged. */
static __m128i low_halves(__m128i a, __m128i b)
{
	return _mm_packs_epi32(_mm_srai_epi32(_mm_slli_epi32(a, 16), 16),
	                       _mm_srai_epi32(_mm_slli_epi32(b, 16), 16));
}

static __m128i high_halves(__m128i a, __m128i b)
{
	return _mm_packs_epi32(_mm_srai_epi32(a, 16), _mm_srai_epi32(b, 16));
}

static size_t shuffle4_sse2(const uint8_t *src, size_t m, uint8_t *dst)
{
	size_t i;

	for (i = 0; i + 16 <= m; i += 16) {
		const __m128i *s = (const __m128i *)(src + 4 * i);
		__m128i a = _mm_loadu_si128(s), b = _mm_loadu_si128(s + 1);
		__m128i c = _mm_loadu_si128(s + 2), d = _mm_loadu_si128(s + 3);

		split16_sse2(low_halves(a, b), low_halves(c, d), dst + i, dst + m + i);
		split16_sse2(high_halves(a, b), high_halves(c, d), dst + 2 * m + i,
		             dst + 3 * m + i);
	}
	return i;
}

static size_t unshuffle2_sse2(const uint8_t *src, size_t m, uint8_t *dst)
{
	size_t i;

	for (i = 0; i + 16 <= m; i += 16) {
		__m128i lo = _mm_loadu_si128((const __m128i *)(src + i));
		__m128i hi = _mm_loadu_si128((const __m128i *)(src + m + i));
		_mm_storeu_si128((__m128i *)(dst + 2 * i), _mm_unpacklo_epi8(lo, hi));
		_mm_storeu_si128((__m128i *)(dst + 2 * i + 16), _mm_unpackhi_epi8(lo, hi));
	}
	return i;
}

static size_t unshuffle4_sse2(const uint8_t *src, size_t m, uint8_t *dst)
{
	size_t i;

	for (i = 0; i + 16 <= m; i += 16) {
		__m128i p0 = _mm_loadu_si128((const __m128i *)(src + i));
		__m128i p1 = _mm_loadu_si128((const __m128i *)(src + m + i));
		__m128i p2 = _mm_loadu_si128((const __m128i *)(src + 2 * m + i));
		__m128i p3 = _mm_loadu_si128((const __m128i *)(src + 3 * m + i));
		/* low and high uint16 halves of samples 0-7 and 8-15 */
		__m128i l0 = _mm_unpacklo_epi8(p0, p1), l1 = _mm_unpackhi_epi8(p0, p1);
		__m128i h0 = _mm_unpacklo_epi8(p2, p3), h1 = _mm_unpackhi_epi8(p2, p3);
		__m128i *d = (__m128i *)(dst + 4 * i);

		_mm_storeu_si128(d, _mm_unpacklo_epi16(l0, h0));
		_mm_storeu_si128(d + 1, _mm_unpackhi_epi16(l0, h0));
		_mm_storeu_si128(d + 2, _mm_unpacklo_epi16(l1, h1));
		_mm_storeu_si128(d + 3, _mm_unpackhi_epi16(l1, h1));
	}
	return i;
}
#else
static size_t shuffle2_sse2(const uint8_t *src, size_t m, uint8_t *dst)
{
	(void)src, (void)m, (void)dst;
	return 0;
}

static size_t shuffle4_sse2(const uint8_t *src, size_t m, uint8_t *dst)
{
	(void)src, (void)m, (void)dst;
	return 0;
}

static size_t unshuffle2_sse2(const uint8_t *src, size_t m, uint8_t *dst)
{
	(void)src, (void)m, (void)dst;
	return 0;
}

static size_t unshuffle4_sse2(const uint8_t *src, size_t m, uint8_t *dst)
{
	(void)src, (void)m, (void)dst;
	return 0;
}
#endif

/* Generic plane split; the 2- and 4-byte cases get their own loops because
 * they are the hot ones (uint16 tiles, float32 blocks) and fixed strides let
 * the compiler keep everything in registers. */
static void shuffle_planes(const uint8_t *src, size_t m, unsigned w, uint8_t *dst)
{
	size_t i;
	unsigned b;

	if (w == 2) {
		for (i = shuffle2_sse2(src, m, dst); i < m; i++) {
			dst[i] = src[2 * i];
			dst[m + i] = src[2 * i + 1];
		}
		return;
	}
	if (w == 4) {
		for (i = shuffle4_sse2(src, m, dst); i < m; i++) {
			dst[i] = src[4 * i];
			dst[m + i] = src[4 * i + 1];
			dst[2 * m + i] = src[4 * i + 2];
			dst[3 * m + i] = src[4 * i + 3];
		}
		return;
	}
	for (b = 0; b < w; b++)
		for (i = 0; i < m; i++)
			dst[b * m + i] = src[i * w + b];
}

static void unshuffle_planes(const uint8_t *src, size_t m, unsigned w, uint8_t *dst)
{
	size_t i;
	unsigned b;

	if (w == 2) {
		for (i = unshuffle2_sse2(src, m, dst); i < m; i++) {
			dst[2 * i] = src[i];
			dst[2 * i + 1] = src[m + i];
		}
		return;
	}
	if (w == 4) {
		for (i = unshuffle4_sse2(src, m, dst); i < m; i++) {
			dst[4 * i] = src[i];
			dst[4 * i + 1] = src[m + i];
			dst[4 * i + 2] = src[2 * m + i];
			dst[4 * i + 3] = src[3 * m + i];
		}
		return;
	}
	for (b = 0; b < w; b++)
		for (i = 0; i < m; i++)
			dst[i * w + b] = src[b * m + i];
}

/* A tail shorter than one sample (n not a multiple of w) is copied as is, so
 * the transforms are total functions; the codec itself rejects such n. */
void sf_shuffle(const uint8_t *src, size_t n, unsigned elem_bytes, uint8_t *dst)
{
	size_t m, body;

	if (elem_bytes <= 1) {
		if (n)
			memcpy(dst, src, n);
		return;
	}
	m = n / elem_bytes;
	body = m * elem_bytes;
	shuffle_planes(src, m, elem_bytes, dst);
	if (n > body)
		memcpy(dst + body, src + body, n - body);
}

void sf_unshuffle(const uint8_t *src, size_t n, unsigned elem_bytes, uint8_t *dst)
{
	size_t m, body;

	if (elem_bytes <= 1) {
		if (n)
			memcpy(dst, src, n);
		return;
	}
	m = n / elem_bytes;
	body = m * elem_bytes;
	unshuffle_planes(src, m, elem_bytes, dst);
	if (n > body)
		memcpy(dst + body, src + body, n - body);
}

static int check_shape(size_t n, unsigned elem_bytes, sf_err *e)
{
	if (elem_bytes != 1 && elem_bytes != 2 && elem_bytes != 4)
		return sf_fail(e, SF_EINVAL, "block codec: elem_bytes %u is not 1, 2 or 4",
		               elem_bytes);
	if (n % elem_bytes)
		return sf_fail(e, SF_EINVAL,
		               "block codec: %zu bytes is not a whole number of %u-byte samples", n,
		               elem_bytes);
	if (n > LZ4_MAX_INPUT_SIZE)
		return sf_fail(e, SF_ERANGE, "block codec: %zu bytes exceed one LZ4 block (%d)", n,
		               LZ4_MAX_INPUT_SIZE);
	return SF_OK;
}

int sf_block_encode(const uint8_t *src, size_t n, unsigned elem_bytes, uint8_t *scratch,
                    uint8_t *dst, size_t cap, size_t *out_n, sf_err *e)
{
	const uint8_t *plain = src;
	int rc, got;

	*out_n = 0;
	rc = check_shape(n, elem_bytes, e);
	if (rc)
		return rc;
	if (elem_bytes > 1 && n > 0) {
		sf_shuffle(src, n, elem_bytes, scratch);
		plain = scratch;
	}
	/* LZ4 takes int capacities; a larger buffer is simply not fully used. */
	if (cap > INT_MAX)
		cap = INT_MAX;
	got =
	    LZ4_compress_fast((const char *)plain, (char *)dst, (int)n, (int)cap, LZ4_ACCELERATION);
	if (got <= 0)
		return sf_fail(
		    e, SF_ERANGE,
		    "block codec: %zu-byte output buffer too small for %zu bytes (need %zu)", cap,
		    n, sf_block_bound(n));
	*out_n = (size_t)got;
	return SF_OK;
}

int sf_block_decode(const uint8_t *enc, size_t enc_n, size_t n, unsigned elem_bytes,
                    uint8_t *scratch, uint8_t *dst, sf_err *e)
{
	uint8_t *plain = elem_bytes > 1 ? scratch : dst;
	int rc, got;

	rc = check_shape(n, elem_bytes, e);
	if (rc)
		return rc;
	if (enc_n == 0 || enc_n > INT_MAX)
		return sf_fail(e, SF_ECORRUPT, "block codec: %zu encoded bytes is not an LZ4 block",
		               enc_n);
	got = LZ4_decompress_safe((const char *)enc, (char *)plain, (int)enc_n, (int)n);
	if (got < 0 || (size_t)got != n)
		return sf_fail(e, SF_ECORRUPT,
		               "block codec: %zu encoded bytes do not decode to %zu bytes", enc_n,
		               n);
	if (elem_bytes > 1)
		sf_unshuffle(scratch, n, elem_bytes, dst);
	return SF_OK;
}

/* test_blockcodec.c — byte-plane shuffle and LZ4 block codec.
 *
 * Oracles: the shuffle is checked against planes computed arithmetically from
 * the sample values (v & 0xff, v >> 8, ...), not by byte indexing like the
 * code under test; round trips compare with the original bytes; corrupted
 * input must fail cleanly (ASan catches any overrun).  It also measures the
 * compression ratio of a noisy tissue-like uint16 tile with and without the
 * shuffle, and encode/decode speed.  tests/integration/test_cache_ratio.py
 * repeats the measurement on numpy data and decodes with python-lz4. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "scopefs/blockcodec.h"

/* splitmix64: a fixed-seed generator so failures reproduce. */
static uint64_t rng_state = 0x5C0BEF5u;

static uint64_t rng_next(void)
{
	uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

static double rng_gauss(void)
{
	double u1 = ((double)(rng_next() >> 11) + 1.0) / 9007199254740993.0;
	double u2 = (double)(rng_next() >> 11) / 9007199254740992.0;
	return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

static void fill_random(uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (uint8_t)rng_next();
}

/* Smooth tissue-like intensities (1000-3000: a slow gradient, a few bright
 * nuclei-sized blobs) plus Gaussian noise of sigma 20 grey levels. */
static double tissue_value(int x, int y)
{
	static const double blobs[][3] = {
	    {120, 140, 35}, {380, 90, 50}, {260, 300, 70}, {90, 420, 40}, {430, 410, 30}};
	double v = 1700 + 500 * sin(x / 61.0) * cos(y / 47.0) + y * 0.6;

	for (size_t b = 0; b < sizeof blobs / sizeof blobs[0]; b++) {
		double dx = x - blobs[b][0], dy = y - blobs[b][1], s = blobs[b][2];
		v += 900 * exp(-(dx * dx + dy * dy) / (2 * s * s));
	}
	return v;
}

static void fill_tissue_u16(uint16_t *p, int w, int h)
{
	for (int y = 0; y < h; y++)
		for (int x = 0; x < w; x++) {
			double v = tissue_value(x, y) + 20 * rng_gauss();
			p[(size_t)y * w + x] = (uint16_t)(v < 0 ? 0 : v > 65535 ? 65535 : v + 0.5);
		}
}

static void fill_tissue_f32(float *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (float)(tissue_value((int)(i % 512), (int)(i / 512 % 512)) / 3000.0 +
		               0.01 * rng_gauss());
}

static double now_s(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

/* ---- shuffle against arithmetic planes ---- */

static void test_shuffle_u16(size_t m)
{
	uint16_t *v = malloc(m * 2 + 1);
	uint8_t *sh = malloc(m * 2 + 1), *back = malloc(m * 2 + 1);
	int bad = 0;

	fill_random((uint8_t *)v, m * 2);
	sf_shuffle((const uint8_t *)v, m * 2, 2, sh);
	for (size_t i = 0; i < m; i++)
		bad += sh[i] != (v[i] & 0xff) || sh[m + i] != (v[i] >> 8);
	CHECK(bad == 0, "uint16 shuffle of %zu samples: %d samples not in low/high planes", m, bad);
	sf_unshuffle(sh, m * 2, 2, back);
	CHECK(m == 0 || memcmp(back, v, m * 2) == 0, "uint16 unshuffle of %zu samples", m);
	free(v);
	free(sh);
	free(back);
}

static void test_shuffle_u32(size_t m)
{
	uint32_t *v = malloc(m * 4 + 1);
	uint8_t *sh = malloc(m * 4 + 1), *back = malloc(m * 4 + 1);
	int bad = 0;

	fill_random((uint8_t *)v, m * 4);
	sf_shuffle((const uint8_t *)v, m * 4, 4, sh);
	for (size_t i = 0; i < m; i++)
		for (unsigned b = 0; b < 4; b++)
			bad += sh[b * m + i] != ((v[i] >> (8 * b)) & 0xff);
	CHECK(bad == 0, "uint32 shuffle of %zu samples: %d bytes misplaced", m, bad);
	sf_unshuffle(sh, m * 4, 4, back);
	CHECK(m == 0 || memcmp(back, v, m * 4) == 0, "uint32 unshuffle of %zu samples", m);
	free(v);
	free(sh);
	free(back);
}

static void test_shuffle(void)
{
	static const size_t counts[] = {0, 1, 2, 7, 1000, 65537};
	uint8_t in[11], out[11], back[11];

	if (__BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__) {
		printf("skip: plane checks assume a little-endian host\n");
		return;
	}
	for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++) {
		test_shuffle_u16(counts[i]);
		test_shuffle_u32(counts[i]);
	}
	/* elem 1 is the identity; a partial last sample is copied through. */
	fill_random(in, sizeof in);
	sf_shuffle(in, sizeof in, 1, out);
	CHECK(memcmp(in, out, sizeof in) == 0, "elem 1 shuffle is not the identity");
	sf_shuffle(in, 11, 4, out);
	CHECK(out[0] == in[0] && out[1] == in[4] && out[2] == in[1] && out[8] == in[8] &&
	          out[10] == in[10],
	      "11 bytes, elem 4: planes of 2 samples then the 3-byte tail as is");
	sf_unshuffle(out, 11, 4, back);
	CHECK(memcmp(in, back, sizeof in) == 0, "11 bytes, elem 4: unshuffle restores");
}

/* ---- round trips ---- */

/* Encode and decode src into exactly sized heap buffers; 0 if identical. */
static int roundtrip(const uint8_t *src, size_t n, unsigned w, size_t *enc_n)
{
	size_t cap = sf_block_bound(n);
	uint8_t *enc = malloc(cap), *scratch = malloc(n ? n : 1), *dst = malloc(n ? n : 1);
	sf_err e = {0};
	int rc;

	rc = sf_block_encode(src, n, w, scratch, enc, cap, enc_n, &e);
	if (rc == SF_OK)
		rc = sf_block_decode(enc, *enc_n, n, w, scratch, dst, &e);
	if (rc == SF_OK && n && memcmp(src, dst, n) != 0)
		rc = -1;
	if (rc != SF_OK)
		printf("  roundtrip n=%zu w=%u: rc %d %s\n", n, w, rc, e.msg);
	free(enc);
	free(scratch);
	free(dst);
	return rc;
}

static void test_roundtrips(void)
{
	static const size_t sizes[] = {0, 4, 8, 12, 1000, 4096 + 4, 512 * 512 * 2, 3 * 64 * 64 * 4};
	static const unsigned widths[] = {1, 2, 4};
	size_t big = 512 * 512 * 2 * 2, enc_n;
	uint8_t *rnd = malloc(big), *noisy = malloc(big), *zeros = calloc(1, big);

	fill_random(rnd, big);
	fill_tissue_u16((uint16_t *)noisy, 512, 1024);
	for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
		for (size_t w = 0; w < 3; w++) {
			CHECK(roundtrip(rnd, sizes[s], widths[w], &enc_n) == 0,
			      "random %zu bytes, elem %u", sizes[s], widths[w]);
			CHECK(roundtrip(noisy, sizes[s], widths[w], &enc_n) == 0,
			      "noisy %zu bytes, elem %u", sizes[s], widths[w]);
			CHECK(roundtrip(zeros, sizes[s], widths[w], &enc_n) == 0,
			      "zeros %zu bytes, elem %u", sizes[s], widths[w]);
		}
	CHECK(roundtrip(rnd, 1, 1, &enc_n) == 0 && roundtrip(rnd, 3, 1, &enc_n) == 0 &&
	          roundtrip(rnd, 6, 2, &enc_n) == 0,
	      "odd sizes 1, 3 (elem 1) and 6 (elem 2)");
	CHECK(roundtrip(rnd, 0, 2, &enc_n) == 0 && enc_n == 1, "0 bytes encode to 1 byte, got %zu",
	      enc_n);
	free(rnd);
	free(noisy);
	free(zeros);
}

/* ---- bad arguments and corrupt input ---- */

static void test_bad_args(void)
{
	uint8_t src[64] = {1, 2, 3}, scratch[64], enc[128], dst[64];
	size_t enc_n = 99;
	sf_err e = {0};

	CHECK(sf_block_encode(src, 12, 3, scratch, enc, sizeof enc, &enc_n, &e) == SF_EINVAL &&
	          strstr(e.msg, "elem_bytes 3"),
	      "elem 3 rejected: %s", e.msg);
	CHECK(enc_n == 0, "out_n zeroed on failure");
	CHECK(sf_block_encode(src, 7, 2, scratch, enc, sizeof enc, &enc_n, &e) == SF_EINVAL,
	      "7 bytes of elem 2 rejected");
	CHECK(sf_block_encode(src, 6, 4, scratch, enc, sizeof enc, &enc_n, &e) == SF_EINVAL,
	      "6 bytes of elem 4 rejected");
	fill_random(src, sizeof src);
	CHECK(sf_block_encode(src, 64, 1, scratch, enc, 8, &enc_n, &e) == SF_ERANGE,
	      "random data into an 8-byte buffer: SF_ERANGE");
	CHECK(sf_block_decode(enc, 4, 12, 3, scratch, dst, &e) == SF_EINVAL, "decode elem 3");
	CHECK(sf_block_bound(100) >= 100 && sf_block_bound((size_t)1 << 40) == 0,
	      "bound: >= n, 0 when too big");
}

static void test_corrupt(void)
{
	size_t n = 512 * 512 * 2, cap = sf_block_bound(n), enc_n, caught = 0, flips = 0;
	uint8_t *src = malloc(n), *enc = malloc(cap), *bad = malloc(cap);
	uint8_t *scratch = malloc(n), *dst = malloc(n);
	sf_err e = {0};

	fill_tissue_u16((uint16_t *)src, 512, 512);
	sf_block_encode(src, n, 2, scratch, enc, cap, &enc_n, &e);
	CHECK(sf_block_decode(enc, enc_n - 1, n, 2, scratch, dst, &e) == SF_ECORRUPT,
	      "truncated payload -> SF_ECORRUPT");
	CHECK(sf_block_decode(enc, enc_n / 2, n, 2, scratch, dst, &e) == SF_ECORRUPT,
	      "half payload -> SF_ECORRUPT");
	CHECK(sf_block_decode(enc, enc_n, n - 2, 2, scratch, dst, &e) == SF_ECORRUPT,
	      "decoding to 2 bytes less than encoded -> SF_ECORRUPT");
	CHECK(sf_block_decode(enc, enc_n, n + 2, 2, scratch, dst, &e) == SF_ECORRUPT,
	      "decoding to 2 bytes more than encoded -> SF_ECORRUPT (no overrun: %s)", e.msg);
	CHECK(sf_block_decode(enc, 0, n, 2, scratch, dst, &e) == SF_ECORRUPT, "empty payload");
	memset(bad, 0xff, 4096);
	CHECK(sf_block_decode(bad, 4096, n, 2, scratch, dst, &e) == SF_ECORRUPT,
	      "4096 bytes of 0xff -> SF_ECORRUPT");
	/* Flip one byte at a time over the whole payload: every outcome must be a
	 * clean SF_ECORRUPT or a same-size decode (a literal changed), never a
	 * crash or an overrun. */
	for (size_t pos = 0; pos < enc_n; pos += 97, flips++) {
		int rc;
		memcpy(bad, enc, enc_n);
		bad[pos] ^= 0x5a;
		rc = sf_block_decode(bad, enc_n, n, 2, scratch, dst, &e);
		CHECK(rc == SF_OK || rc == SF_ECORRUPT, "flip at %zu: rc %d", pos, rc);
		caught += rc == SF_ECORRUPT;
	}
	printf("test_blockcodec: %zu of %zu single-byte flips detected by LZ4 itself "
	       "(the rest need the cache checksum)\n",
	       caught, flips);
	CHECK(caught > 0, "some flips are structural");
	free(src);
	free(enc);
	free(bad);
	free(scratch);
	free(dst);
}

/* ---- ratio and speed ---- */

static void measure(const char *what, const uint8_t *src, size_t n, unsigned w, double *ratio)
{
	size_t cap = sf_block_bound(n), enc_n = 0;
	uint8_t *enc = malloc(cap), *scratch = malloc(n), *dst = malloc(n);
	int reps = 20;
	double t0, t1, t2;
	sf_err e = {0};

	t0 = now_s();
	for (int r = 0; r < reps; r++)
		sf_block_encode(src, n, w, scratch, enc, cap, &enc_n, &e);
	t1 = now_s();
	for (int r = 0; r < reps; r++)
		sf_block_decode(enc, enc_n, n, w, scratch, dst, &e);
	t2 = now_s();
	*ratio = (double)n / (double)enc_n;
	printf("test_blockcodec: %s, elem %u: ratio %.3f, encode %.0f MB/s, decode %.0f MB/s\n",
	       what, w, *ratio, reps * n / 1e6 / (t1 - t0), reps * n / 1e6 / (t2 - t1));
	CHECK(memcmp(src, dst, n) == 0, "%s elem %u decodes", what, w);
	free(enc);
	free(scratch);
	free(dst);
}

static void test_ratio(void)
{
	size_t n = 512 * 512 * 2;
	uint16_t *tile = malloc(n);
	float *block = malloc(n * 2);
	double plain, shuffled, fplain, fshuffled;

	fill_tissue_u16(tile, 512, 512);
	measure("noisy uint16 512x512 (sigma 20)", (uint8_t *)tile, n, 1, &plain);
	measure("noisy uint16 512x512 (sigma 20)", (uint8_t *)tile, n, 2, &shuffled);
	CHECK(shuffled >= 1.4, "shuffled ratio %.3f >= 1.4", shuffled);
	CHECK(shuffled > 1.3 * plain, "shuffle gains > 30%% (%.3f vs %.3f)", shuffled, plain);
	fill_tissue_f32(block, 512 * 512);
	measure("noisy float32 512x512", (uint8_t *)block, n * 2, 1, &fplain);
	measure("noisy float32 512x512", (uint8_t *)block, n * 2, 4, &fshuffled);
	CHECK(fshuffled > fplain, "float32 shuffle helps (%.3f vs %.3f)", fshuffled, fplain);
	free(tile);
	free(block);
}

int main(void)
{
	test_shuffle();
	test_roundtrips();
	test_bad_args();
	test_corrupt();
	test_ratio();
	printf("test_blockcodec: %d passed, %d failed\n", passed, failed);
	return failed != 0;
}

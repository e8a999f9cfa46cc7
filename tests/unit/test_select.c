/* test_select.c — quickselect and the tail selection against qsort on random,
 * sorted and tied data. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "scopefs/select.h"

static int by_value(const void *a, const void *b)
{
	float x = *(const float *)a, y = *(const float *)b;
	return (x > y) - (x < y);
}

int main(void)
{
	static float v[1000], sorted[1000];
	unsigned seed = 12345;

	for (int round = 0; round < 60; round++) {
		size_t n = 1 + (size_t)(round * 16 % 1000);
		for (size_t i = 0; i < n; i++) {
			seed = seed * 1103515245u + 12345u;
			/* rounds 20..39 have many ties; 40.. are already sorted */
			v[i] = round < 20   ? (float)(seed >> 8)
			       : round < 40 ? (float)(seed >> 28)
			                    : (float)i;
		}
		memcpy(sorted, v, n * sizeof *v);
		qsort(sorted, n, sizeof *sorted, by_value);
		size_t k = (size_t)round * 7919 % n;
		float got = sf_select_kth(v, n, k);
		int ordered = 1;
		for (size_t i = 0; i < n; i++)
			if ((i < k && v[i] > got) || (i > k && v[i] < got))
				ordered = 0;
		CHECK(got == sorted[k] && ordered, "round %d: n %zu k %zu: %g vs %g", round, n, k,
		      got, sorted[k]);

		/* the tails: the m smallest ascending, the m largest descending */
		static float tail[1000], before[1000];
		size_t m = 1 + (size_t)round * 31 % n;
		memcpy(before, v, n * sizeof *v);
		sf_select_tail(v, n, m, 0, tail);
		int same = !memcmp(before, v, n * sizeof *v);
		for (size_t j = 0; j < m; j++)
			same &= tail[j] == sorted[j];
		sf_select_tail(v, n, m, 1, tail);
		for (size_t j = 0; j < m; j++)
			same &= tail[j] == sorted[n - 1 - j];
		CHECK(same, "round %d: n %zu: tails of %zu differ from qsort's", round, n, m);
	}
	return CHECK_DONE("test_select");
}

/* select.c — quickselect (see select.h). */
#include "scopefs/select.h"

#include <stdlib.h>

static void swap_f(float *a, float *b)
{
	float t = *a;
	*a = *b;
	*b = t;
}

float sf_select_kth(float *v, size_t n, size_t k)
{
	size_t lo = 0, hi = n - 1;

	while (hi > lo) {
		size_t mid = lo + (hi - lo) / 2, i = lo, j = hi;
		float pivot;

		if (v[mid] < v[lo])
			swap_f(&v[mid], &v[lo]);
		if (v[hi] < v[lo])
			swap_f(&v[hi], &v[lo]);
		if (v[hi] < v[mid])
			swap_f(&v[hi], &v[mid]);
		pivot = v[mid];
		while (i <= j) {
			while (v[i] < pivot)
				i++;
			while (pivot < v[j])
				j--;
			if (i <= j) {
				swap_f(&v[i], &v[j]);
				i++;
				if (j == 0)
					break;
				j--;
			}
		}
		if (k <= j)
			hi = j;
		else if (k >= i)
			lo = i;
		else
			break;
	}
	return v[k];
}

/* Max-heap (largest = 0) or min-heap (largest = 1) sift-down: the heap keeps
 * the m values nearest its end of the order, its root the one to evict. */
static int heap_before(float a, float b, int largest)
{
	return largest ? a < b : a > b;
}

static void sift_down(float *h, size_t m, size_t i, int largest)
{
	for (;;) {
		size_t c = 2 * i + 1;
		if (c >= m)
			return;
		if (c + 1 < m && heap_before(h[c + 1], h[c], largest))
			c++;
		if (!heap_before(h[c], h[i], largest))
			return;
		swap_f(&h[c], &h[i]);
		i = c;
	}
}

static int cmp_up(const void *a, const void *b)
{
	float x = *(const float *)a, y = *(const float *)b;
	return (x > y) - (x < y);
}

static int cmp_down(const void *a, const void *b)
{
	return cmp_up(b, a);
}

void sf_select_tail(const float *v, size_t n, size_t m, int largest, float *out)
{
	for (size_t i = 0; i < m; i++)
		out[i] = v[i];
	for (size_t i = m / 2; i-- > 0;)
		sift_down(out, m, i, largest);
	/* One pass; the root is replaced only by a value nearer the end, which
	 * on data in no particular order is rare after the first few m. */
	for (size_t i = m; i < n; i++)
		if (heap_before(out[0], v[i], largest)) {
			out[0] = v[i];
			sift_down(out, m, 0, largest);
		}
	qsort(out, m, sizeof *out, largest ? cmp_down : cmp_up);
}

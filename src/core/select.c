/* select.c — quickselect (see select.h). */
#include "scopefs/select.h"

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

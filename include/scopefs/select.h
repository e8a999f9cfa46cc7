/* select.h — order statistics of float arrays (compute core, no I/O). */
#ifndef SCOPEFS_SELECT_H
#define SCOPEFS_SELECT_H

#include <stddef.h>

/* Reorder v[0..n) (n >= 1, k < n) so that v[k] is the k-th smallest (0-based),
 * everything before it <= it and everything after it >= it; returns v[k].
 * Hoare's quickselect with a median-of-3 pivot: O(n) on average, in place.
 * NaNs are not allowed. */
float sf_select_kth(float *v, size_t n, size_t k);

/* The m smallest values of v[0..n) in ascending order (largest = 0), or the
 * m largest in descending order (largest = 1), into out[0..m), 1 <= m <= n;
 * v is not changed.  One pass with a heap of m: for order statistics near
 * an end (extreme percentiles) much faster than sf_select_kth, with the
 * same values (out[j] is the j-th smallest, or largest, of v).  NaNs are not
 * allowed. */
void sf_select_tail(const float *v, size_t n, size_t m, int largest, float *out);

#endif

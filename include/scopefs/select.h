/* select.h — order statistics of float arrays (compute core, no I/O). */
#ifndef SCOPEFS_SELECT_H
#define SCOPEFS_SELECT_H

#include <stddef.h>

/* Reorder v[0..n) (n >= 1, k < n) so that v[k] is the k-th smallest (0-based),
 * everything before it <= it and everything after it >= it; returns v[k].
 * Hoare's quickselect with a median-of-3 pivot: O(n) on average, in place.
 * NaNs are not allowed. */
float sf_select_kth(float *v, size_t n, size_t k);

#endif

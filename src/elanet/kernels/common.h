/* Helpers shared by the kernel files: static row shares, per-thread sums and their ordered merge.
 *
 * Reductions sum in float over at most FLUSH_ROWS rows, then in double; they are deterministic for a
 * given thread count: each thread sums its static share of rows into its own slot and the slots are
 * added in thread order.
 */
#ifndef ELANET_KERNELS_COMMON_H
#define ELANET_KERNELS_COMMON_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>


#define FLUSH_ROWS 32  /* float partial sums over at most this many rows, then added into double */

static inline void flush(double* restrict dst, float* restrict src, int64_t n) {
    for (int64_t i = 0; i < n; i++) { dst[i] += src[i]; src[i] = 0.0f; }
}

/* out[i] = sum over threads t < used of part[t * per + i], i < n: the per-thread sums in thread order */
static inline void add_parts(double* restrict out, const double* restrict part, int used, size_t per, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = 0.0;
    for (int t = 0; t < used; t++)
        for (int64_t i = 0; i < n; i++) out[i] += part[(size_t)t * per + i];
}

static inline void share(int64_t n, int64_t* lo, int64_t* hi) {
    int nt = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t chunk = (n + nt - 1) / nt;
    *lo = t * chunk < n ? t * chunk : n;
    *hi = *lo + chunk < n ? *lo + chunk : n;
}

/* share() for a thread whose scratch may have failed to allocate (ok == 0): it then takes no rows and
 * sets *failed, so the call returns an error instead of writing half a result */
static inline void share_or_fail(int64_t n, int ok, int* failed, int64_t* lo, int64_t* hi) {
    share(n, lo, hi);
    if (!ok) {
        #pragma omp atomic write
        *failed = 1;
        *lo = *hi;
    }
}

/* 8-float vectors (GCC vector extensions: AVX with -mavx2, two SSE registers without), unaligned
 * loads and stores, and a fused multiply-add where the CPU has one (-mfma) */
#define VL 8
typedef float vf __attribute__((vector_size(32)));
typedef float vf_u __attribute__((vector_size(32), aligned(4)));
typedef int32_t vi __attribute__((vector_size(32)));  /* comparison results: all ones where true */

static inline vf ld(const float* p) { return *(const vf_u*)p; }
static inline void st(float* p, vf v) { *(vf_u*)p = v; }

#if defined(__FMA__) && defined(__AVX__)
#include <immintrin.h>
static inline vf fmadd(vf a, vf b, vf c) { return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
#else
static inline vf fmadd(vf a, vf b, vf c) { return a * b + c; }
#endif

#endif

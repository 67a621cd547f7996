/* The value convolution of the attention branch (a depthwise 3x3, stride 1, zero padding 1, no bias)
 * on channels-last float32 tensors, with the block's global pooling in the same pass.
 *
 * MRLA-B / ELA and MRLA-L read the block output x twice for their attention: once for the value
 * v = DWConv(x) and once for the query/key descriptor y = GAP(x) (paper eq. 4). Forward here reads x
 * once and writes v and the per-row sums of x. Backward reads the value's gradient and x once and
 * writes x's gradient, with the descriptor's gradient (a per-sample, per-channel constant) already
 * added, and the weight's gradient; oneDNN's depthwise backward takes ~3x the traffic floor on the
 * small channel counts of a CIFAR ResNet, and the descriptor's broadcast gradient costs autograd a
 * further read-modify-write of the whole tensor.
 *
 * Layout: x, v and the gradients are [B, H, W, C] contiguous (channels-last), C a multiple of 8.
 * The weight is given tap-major, w9[t * C + c] = weight[c, 0, i, j] with t = 3 i + j. Work is split
 * by image rows (b, h); each row is done in 8-channel vectors that stay in registers along the row.
 */
#include "common.h"

/* row h of image b of t ([B, H, W*C]), or the zero row outside [0, H): the convolution's padding */
static inline const float* row_or_zeros(const float* t, int64_t b, int64_t h, int64_t H, int64_t WC,
                                        const float* zeros) {
    return (h < 0 || h >= H) ? zeros : t + (b * H + h) * WC;
}

/* sum over the taps t = 3 i + j of a[t] * r_i[o + (j - 1) C]; the left (j = 0) and right (j = 2)
 * columns only where they exist (the zero padding) */
static inline vf taps(const vf* a, const float* r0, const float* r1, const float* r2, int64_t o, int64_t C,
                      int left, int right) {
    vf acc = a[1] * ld(r0 + o);
    acc = fmadd(a[4], ld(r1 + o), acc);
    acc = fmadd(a[7], ld(r2 + o), acc);
    if (left) {
        acc = fmadd(a[0], ld(r0 + o - C), acc);
        acc = fmadd(a[3], ld(r1 + o - C), acc);
        acc = fmadd(a[6], ld(r2 + o - C), acc);
    }
    if (right) {
        acc = fmadd(a[2], ld(r0 + o + C), acc);
        acc = fmadd(a[5], ld(r1 + o + C), acc);
        acc = fmadd(a[8], ld(r2 + o + C), acc);
    }
    return acc;
}

/* s[t] += g * r_i[o + (j - 1) C] for the taps that exist: the weight gradient's products */
static inline void tap_products(vf* s, vf g, const float* r0, const float* r1, const float* r2, int64_t o,
                                int64_t C, int left, int right) {
    s[1] = fmadd(g, ld(r0 + o), s[1]);
    s[4] = fmadd(g, ld(r1 + o), s[4]);
    s[7] = fmadd(g, ld(r2 + o), s[7]);
    if (left) {
        s[0] = fmadd(g, ld(r0 + o - C), s[0]);
        s[3] = fmadd(g, ld(r1 + o - C), s[3]);
        s[6] = fmadd(g, ld(r2 + o - C), s[6]);
    }
    if (right) {
        s[2] = fmadd(g, ld(r0 + o + C), s[2]);
        s[5] = fmadd(g, ld(r1 + o + C), s[5]);
        s[8] = fmadd(g, ld(r2 + o + C), s[8]);
    }
}

/* PX(w, left, right) along a row of W pixels: the edge columns apart, so the interior has no branches */
#define ALONG_ROW(W, PX)                                        \
    do {                                                        \
        if ((W) == 1) { PX(0, 0, 0); }                          \
        else {                                                  \
            PX(0, 0, 1);                                        \
            for (int64_t w_ = 1; w_ + 1 < (W); w_++) PX(w_, 1, 1); \
            PX((W) - 1, 1, 0);                                  \
        }                                                       \
    } while (0)

/* v = DWConv3x3(x) + bias (bias may be NULL: none); rowsum[(b*H + h)*C + c] = sum_w x[b, h, w, c] when
 * rowsum is not NULL. With lone != 0, v = x + max(DWConv3x3(x) + bias, 0) instead (rowsum unused): a
 * stage's only active MRLA-B / ELA block in inference, its BN folded into w9 and bias (export.LoneValue,
 * paper eq. 5 with one layer), in one read of x and one write. */
int elanet_dw_forward(const float* restrict x, int64_t B, int64_t H, int64_t W, int64_t C,
                      const float* restrict w9, const float* restrict bias, int lone, float* restrict v,
                      double* restrict rowsum) {
    const int64_t WC = W * C;
    int failed = 0;
    #pragma omp parallel
    {
        float* zeros = calloc(WC, sizeof(float));
        int64_t lo, hi;
        share_or_fail(B * H, zeros != NULL, &failed, &lo, &hi);
        for (int64_t row = lo; row < hi; row++) {
            const int64_t b = row / H, h = row % H;
            const float* r0 = row_or_zeros(x, b, h - 1, H, WC, zeros);
            const float* r1 = x + row * WC;
            const float* r2 = row_or_zeros(x, b, h + 1, H, WC, zeros);
            float* out = v + row * WC;
            for (int64_t k = 0; k < C; k += VL) {
                vf a[9];
                for (int t = 0; t < 9; t++) a[t] = ld(w9 + t * C + k);
                const vf bk = bias ? ld(bias + k) : (vf){0}, zero = {0};
                if (lone) {
#define PX(w, left, right) do { const int64_t o = (w) * C + k; const vf y = taps(a, r0, r1, r2, o, C, left, right) + bk; \
                                st(out + o, ld(r1 + o) + (vf)((vi)y & (y > zero))); } while (0)
                    ALONG_ROW(W, PX);
#undef PX
                    continue;
                }
                vf sum = {0};
#define PX(w, left, right) do { const int64_t o = (w) * C + k; st(out + o, taps(a, r0, r1, r2, o, C, left, right) + bk); \
                                sum += ld(r1 + o); } while (0)
                ALONG_ROW(W, PX);
#undef PX
                if (rowsum)
                    for (int l = 0; l < VL; l++) rowsum[row * C + k + l] = sum[l];
            }
        }
        free(zeros);
    }
    return failed;
}

/* Backward of v = DWConv3x3(x) (with y = GAP(x) when gy is given, and x's other uses when gres is):
 *   grad_x[b, h, w, c] = sum_{i,j} w[i, j, c] g[b, h+1-i, w+1-j, c] + gy[b, c] + gres[b, h, w, c]
 *                                                                                   (grad_x may be NULL);
 *   grad_w[t * C + c] = sum_{b,h,w} g[b, h, w, c] x[b, h+i-1, w+j-1, c]          (grad_w may be NULL).
 * grad_x is the forward convolution of g with the flipped kernel. gy [B, C] is the gradient of the
 * pooled sums sum_{h,w} x (or NULL); gres [B, H, W, C] the gradient that reached x by its other uses,
 * the residual add after the branch (or NULL): adding it here saves autograd a whole-tensor sum. */
int elanet_dw_backward(const float* restrict x, const float* restrict g, int64_t B, int64_t H, int64_t W,
                       int64_t C, const float* restrict w9, const float* restrict gy, const float* restrict gres,
                       float* restrict grad_x, double* restrict grad_w) {
    const int64_t WC = W * C;
    const int nt = omp_get_max_threads();
    const size_t per = (size_t)9 * C;
    double* part = grad_w ? calloc((size_t)nt * per, sizeof(double)) : NULL;
    if (grad_w && !part) return 1;
    int used = 1, failed = 0;
    #pragma omp parallel num_threads(nt)
    {
        #pragma omp single
        used = omp_get_num_threads();
        float* zeros = calloc(WC, sizeof(float));
        double* mine = part ? part + (size_t)omp_get_thread_num() * per : NULL;
        float* fsum = mine ? calloc(per, sizeof(float)) : NULL;  /* float sums over <= FLUSH_ROWS rows */
        int64_t lo, hi;
        share_or_fail(B * H, zeros && (!mine || fsum), &failed, &lo, &hi);
        int count = 0;
        for (int64_t row = lo; row < hi; row++) {
            const int64_t b = row / H, h = row % H;
            const float* g1 = g + row * WC;
            if (grad_x) {
                const float* g0 = row_or_zeros(g, b, h - 1, H, WC, zeros);
                const float* g2 = row_or_zeros(g, b, h + 1, H, WC, zeros);
                float* out = grad_x + row * WC;
                const float* res = gres ? gres + row * WC : NULL;
                for (int64_t k = 0; k < C; k += VL) {
                    vf a[9];  /* flipped: tap t of the transposed convolution is the forward's 8 - t */
                    for (int t = 0; t < 9; t++) a[t] = ld(w9 + (8 - t) * C + k);
                    const vf extra = gy ? ld(gy + b * C + k) : (vf){0};
                    if (res) {
#define PX(w, left, right) do { const int64_t o = (w) * C + k; \
                                st(out + o, (extra + ld(res + o)) + taps(a, g0, g1, g2, o, C, left, right)); } while (0)
                        ALONG_ROW(W, PX);
#undef PX
                    } else {
#define PX(w, left, right) do { const int64_t o = (w) * C + k; \
                                st(out + o, extra + taps(a, g0, g1, g2, o, C, left, right)); } while (0)
                        ALONG_ROW(W, PX);
#undef PX
                    }
                }
            }
            if (fsum) {
                const float* x0 = row_or_zeros(x, b, h - 1, H, WC, zeros);
                const float* x1 = x + row * WC;
                const float* x2 = row_or_zeros(x, b, h + 1, H, WC, zeros);
                for (int64_t k = 0; k < C; k += VL) {
                    vf s[9] = {{0}};
#define PX(w, left, right) do { const int64_t o = (w) * C + k; \
                                tap_products(s, ld(g1 + o), x0, x1, x2, o, C, left, right); } while (0)
                    ALONG_ROW(W, PX);
#undef PX
                    for (int t = 0; t < 9; t++) st(fsum + t * C + k, ld(fsum + t * C + k) + s[t]);
                }
                if (++count == FLUSH_ROWS) { flush(mine, fsum, (int64_t)per); count = 0; }
            }
        }
        if (fsum) {
            flush(mine, fsum, (int64_t)per);
            free(fsum);
        }
        free(zeros);
    }
    if (part) {
        add_parts(grad_w, part, used, per, (int64_t)per);
        free(part);
    }
    return failed;
}

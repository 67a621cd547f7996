/* The attention branch's epilogue in one pass each way: out = x + keep[b] * act(BN(a)).
 *
 * BN uses the batch statistics (training). act is ReLU (MRLA-B / ELA) or the identity (MRLA-L),
 * keep[b] is DropPath's per-sample scale (0 or 1/(1-p)). Eager PyTorch spends ~9 value-sized
 * passes forward and ~10 backward on these three operators; here forward is one read (statistics)
 * plus one read of a and x and one write, backward one read of grad and a (reductions) plus one
 * read of both and one write. See src/elanet/attention/epilogue.py for the autograd wrapper.
 *
 * Geometry: element (b, g, r, j) of the branch input a is at a[b*sb + g*sg + r*sr + j], with
 * channel c = g*d + j (j < d contiguous) and r = h*W + w. x, out and grad are channels-last
 * [B, R, C] contiguous. The Python side passes channels-last [B, C, H, W] tensors (G = 1, d = C).
 *
 * Threads are OpenMP's, from the libgomp torch itself runs on, so torch.set_num_threads applies.
 * Reductions sum in float over at most FLUSH_ROWS rows, then in double; they are deterministic for a
 * given thread count: each thread sums its static share of rows into its own slot and the slots are
 * added in thread order.
 */
#include "common.h"

/* per-channel sums of a and a^2 over (b, r): the batch statistics */
int elanet_epi_stats(const float* restrict a, int64_t B, int64_t G, int64_t R, int64_t d, int64_t sb, int64_t sg,
                     int64_t sr, double* restrict sum, double* restrict sumsq) {
    const int64_t C = G * d;
    const int nt = omp_get_max_threads();
    double* part = calloc((size_t)nt * 2 * C, sizeof(double));
    if (!part) return 1;
    int used = 1;
    #pragma omp parallel num_threads(nt)
    {
        #pragma omp single
        used = omp_get_num_threads();
        int64_t lo_row, hi_row;
        share(B * R, &lo_row, &hi_row);
        double* mine = part + (size_t)omp_get_thread_num() * 2 * C;
        float* s = calloc(2 * C, sizeof(float));
        float* q = s + C;
        int count = 0;
        for (int64_t row = lo_row; row < hi_row; row++) {
            const int64_t b = row / R, r = row % R;
            for (int64_t g = 0; g < G; g++) {
                const float* p = a + b * sb + g * sg + r * sr;
                float* sgp = s + g * d; float* qgp = q + g * d;
                #pragma omp simd
                for (int64_t j = 0; j < d; j++) { const float v = p[j]; sgp[j] += v; qgp[j] += v * v; }
            }
            if (++count == FLUSH_ROWS) { flush(mine, s, 2 * C); count = 0; }
        }
        flush(mine, s, 2 * C);
        free(s);
    }
    add_parts(sum, part, used, 2 * C, C);
    add_parts(sumsq, part + C, used, 2 * C, C);
    free(part);
    return 0;
}

/* out = x + keep[b] * act(a * scale + shift) */
void elanet_epi_forward(const float* restrict a, int64_t B, int64_t G, int64_t R, int64_t d, int64_t sb, int64_t sg,
                        int64_t sr, const float* restrict x, const float* restrict scale, const float* restrict shift,
                        const float* restrict keep, int relu, float* restrict out) {
    const int64_t C = G * d;
    const float floor_ = relu ? 0.0f : -INFINITY;
    #pragma omp parallel
    {
        int64_t lo_row, hi_row;
        share(B * R, &lo_row, &hi_row);
        for (int64_t row = lo_row; row < hi_row; row++) {
            const int64_t b = row / R, r = row % R;
            const float k = keep ? keep[b] : 1.0f;
            for (int64_t g = 0; g < G; g++) {
                const float* p = a + b * sb + g * sg + r * sr;
                const float* sc = scale + g * d; const float* sh = shift + g * d;
                const float* xx = x + row * C + g * d; float* o = out + row * C + g * d;
                #pragma omp simd
                for (int64_t j = 0; j < d; j++) {
                    const float y = p[j] * sc[j] + sh[j];
                    o[j] = xx[j] + k * (y > floor_ ? y : 0.0f);
                }
            }
        }
    }
}

/* sums over (b, r) of gy and gy * (a - mean), gy = grad * keep[b] * act'(a * scale + shift) */
int elanet_epi_backward_sums(const float* restrict a, int64_t B, int64_t G, int64_t R, int64_t d, int64_t sb,
                             int64_t sg, int64_t sr, const float* restrict grad, const float* restrict scale,
                             const float* restrict shift, const float* restrict mean, const float* restrict keep,
                             int relu, double* restrict sum_gy, double* restrict sum_gy_xc) {
    const int64_t C = G * d;
    const float floor_ = relu ? 0.0f : -INFINITY;
    const int nt = omp_get_max_threads();
    double* part = calloc((size_t)nt * 2 * C, sizeof(double));
    if (!part) return 1;
    int used = 1;
    #pragma omp parallel num_threads(nt)
    {
        #pragma omp single
        used = omp_get_num_threads();
        int64_t lo_row, hi_row;
        share(B * R, &lo_row, &hi_row);
        double* mine = part + (size_t)omp_get_thread_num() * 2 * C;
        float* s = calloc(2 * C, sizeof(float));
        float* q = s + C;
        int count = 0;
        for (int64_t row = lo_row; row < hi_row; row++) {
            const int64_t b = row / R, r = row % R;
            const float k = keep ? keep[b] : 1.0f;
            for (int64_t g = 0; g < G; g++) {
                const float* p = a + b * sb + g * sg + r * sr;
                const float* sc = scale + g * d; const float* sh = shift + g * d; const float* mu = mean + g * d;
                const float* gr = grad + row * C + g * d;
                float* sgp = s + g * d; float* qgp = q + g * d;
                #pragma omp simd
                for (int64_t j = 0; j < d; j++) {
                    const float v = p[j], g0 = gr[j] * k;
                    const float gy = v * sc[j] + sh[j] > floor_ ? g0 : 0.0f;
                    sgp[j] += gy; qgp[j] += gy * (v - mu[j]);
                }
            }
            if (++count == FLUSH_ROWS) { flush(mine, s, 2 * C); count = 0; }
        }
        flush(mine, s, 2 * C);
        free(s);
    }
    add_parts(sum_gy, part, used, 2 * C, C);
    add_parts(sum_gy_xc, part + C, used, 2 * C, C);
    free(part);
    return 0;
}

/* grad_a = c1 * gy + c2 * (a - mean) + c3 per channel, written with a's strides */
void elanet_epi_backward(const float* restrict a, int64_t B, int64_t G, int64_t R, int64_t d, int64_t sb, int64_t sg,
                         int64_t sr, const float* restrict grad, const float* restrict scale, const float* restrict shift,
                         const float* restrict mean, const float* restrict keep, int relu, const float* restrict c1,
                         const float* restrict c2, const float* restrict c3, float* restrict grad_a) {
    const int64_t C = G * d;
    const float floor_ = relu ? 0.0f : -INFINITY;
    #pragma omp parallel
    {
        int64_t lo_row, hi_row;
        share(B * R, &lo_row, &hi_row);
        for (int64_t row = lo_row; row < hi_row; row++) {
            const int64_t b = row / R, r = row % R;
            const float k = keep ? keep[b] : 1.0f;
            for (int64_t g = 0; g < G; g++) {
                const int64_t off = b * sb + g * sg + r * sr;
                const float* p = a + off; float* ga = grad_a + off;
                const float* sc = scale + g * d; const float* sh = shift + g * d; const float* mu = mean + g * d;
                const float* k1 = c1 + g * d; const float* k2 = c2 + g * d; const float* k3 = c3 + g * d;
                const float* gr = grad + row * C + g * d;
                #pragma omp simd
                for (int64_t j = 0; j < d; j++) {
                    const float v = p[j], g0 = gr[j] * k;
                    const float gy = v * sc[j] + sh[j] > floor_ ? g0 : 0.0f;
                    ga[j] = k1[j] * gy + k2[j] * (v - mu[j]) + k3[j];
                }
            }
        }
    }
}

/* ---- MRLA-L (paper eq. 7): the same epilogue on a = gate[b, c] * v + lam[c] * id, never written out ----
 * v, id, x, out and grad are channels-last [B, R, C] contiguous; gate is [B, C]. */

int elanet_mix_stats(const float* restrict v, const float* restrict id, const float* restrict gate,
                     const float* restrict lam, int64_t B, int64_t R, int64_t C, double* restrict sum, double* restrict sumsq) {
    const int nt = omp_get_max_threads();
    double* part = calloc((size_t)nt * 2 * C, sizeof(double));
    if (!part) return 1;
    int used = 1;
    #pragma omp parallel num_threads(nt)
    {
        #pragma omp single
        used = omp_get_num_threads();
        int64_t lo_row, hi_row;
        share(B * R, &lo_row, &hi_row);
        double* mine = part + (size_t)omp_get_thread_num() * 2 * C;
        float* s = calloc(2 * C, sizeof(float));
        float* q = s + C;
        int count = 0;
        for (int64_t row = lo_row; row < hi_row; row++) {
            const float* gt = gate + (row / R) * C;
            const float* vp = v + row * C; const float* ip = id + row * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) { const float a = gt[c] * vp[c] + lam[c] * ip[c]; s[c] += a; q[c] += a * a; }
            if (++count == FLUSH_ROWS) { flush(mine, s, 2 * C); count = 0; }
        }
        flush(mine, s, 2 * C);
        free(s);
    }
    add_parts(sum, part, used, 2 * C, C);
    add_parts(sumsq, part + C, used, 2 * C, C);
    free(part);
    return 0;
}

/* out = x + keep[b] * (a * scale + shift) */
void elanet_mix_forward(const float* restrict v, const float* restrict id, const float* restrict gate,
                        const float* restrict lam, int64_t B, int64_t R, int64_t C, const float* restrict x,
                        const float* restrict scale, const float* restrict shift, const float* restrict keep, float* restrict out) {
    #pragma omp parallel
    {
        int64_t lo_row, hi_row;
        share(B * R, &lo_row, &hi_row);
        for (int64_t row = lo_row; row < hi_row; row++) {
            const int64_t b = row / R;
            const float* gt = gate + b * C;
            const float k = keep ? keep[b] : 1.0f;
            const float* vp = v + row * C; const float* ip = id + row * C; const float* xp = x + row * C; float* o = out + row * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) { const float a = gt[c] * vp[c] + lam[c] * ip[c]; o[c] = xp[c] + k * (a * scale[c] + shift[c]); }
        }
    }
}

/* sums over (b, r) of gy = grad * keep[b] and of gy * (a - mean) */
int elanet_mix_backward_sums(const float* restrict v, const float* restrict id, const float* restrict gate,
                             const float* restrict lam, int64_t B, int64_t R, int64_t C, const float* restrict grad,
                             const float* restrict mean, const float* restrict keep, double* restrict sum_gy, double* restrict sum_gy_xc) {
    const int nt = omp_get_max_threads();
    double* part = calloc((size_t)nt * 2 * C, sizeof(double));
    if (!part) return 1;
    int used = 1;
    #pragma omp parallel num_threads(nt)
    {
        #pragma omp single
        used = omp_get_num_threads();
        int64_t lo_row, hi_row;
        share(B * R, &lo_row, &hi_row);
        double* mine = part + (size_t)omp_get_thread_num() * 2 * C;
        float* s = calloc(2 * C, sizeof(float));
        float* q = s + C;
        int count = 0;
        for (int64_t row = lo_row; row < hi_row; row++) {
            const int64_t b = row / R;
            const float* gt = gate + b * C;
            const float k = keep ? keep[b] : 1.0f;
            const float* vp = v + row * C; const float* ip = id + row * C; const float* gr = grad + row * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                const float a = gt[c] * vp[c] + lam[c] * ip[c], gy = gr[c] * k;
                s[c] += gy; q[c] += gy * (a - mean[c]);
            }
            if (++count == FLUSH_ROWS) { flush(mine, s, 2 * C); count = 0; }
        }
        flush(mine, s, 2 * C);
        free(s);
    }
    add_parts(sum_gy, part, used, 2 * C, C);
    add_parts(sum_gy_xc, part + C, used, 2 * C, C);
    free(part);
    return 0;
}

/* ga = c1 * gy + c2 * (a - mean) + c3; grad_v = ga * gate, grad_id = ga * lam,
 * grad_gate[b, c] = sum_r ga * v, grad_lam[c] = sum_{b, r} ga * id */
int elanet_mix_backward(const float* restrict v, const float* restrict id, const float* restrict gate,
                        const float* restrict lam, int64_t B, int64_t R, int64_t C, const float* restrict grad,
                        const float* restrict mean, const float* restrict keep, const float* restrict c1,
                        const float* restrict c2, const float* restrict c3, float* restrict grad_v, float* restrict grad_id,
                        double* restrict grad_gate, double* restrict grad_lam) {
    const int nt = omp_get_max_threads();
    const size_t per = (size_t)B * C + C;  /* each thread: [B, C] gate sums, then [C] lam sums */
    double* part = calloc((size_t)nt * per, sizeof(double));
    if (!part) return 1;
    int used = 1;
    #pragma omp parallel num_threads(nt)
    {
        #pragma omp single
        used = omp_get_num_threads();
        int64_t lo_row, hi_row;
        share(B * R, &lo_row, &hi_row);
        double* pg = part + (size_t)omp_get_thread_num() * per;
        double* pl = pg + (size_t)B * C;
        float* fg = calloc(2 * C, sizeof(float));  /* this sample's gate sums, and lambda's */
        float* fl = fg + C;
        int count = 0;
        int64_t cur = lo_row < hi_row ? lo_row / R : 0;
        for (int64_t row = lo_row; row < hi_row; row++) {
            const int64_t b = row / R;
            if (b != cur || count == FLUSH_ROWS) { flush(pg + cur * C, fg, C); flush(pl, fl, C); cur = b; count = 0; }
            count++;
            const float* gt = gate + b * C;
            const float k = keep ? keep[b] : 1.0f;
            const float* vp = v + row * C; const float* ip = id + row * C; const float* gr = grad + row * C;
            float* gvp = grad_v + row * C; float* gip = grad_id + row * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                const float a = gt[c] * vp[c] + lam[c] * ip[c], gy = gr[c] * k;
                const float ga = c1[c] * gy + c2[c] * (a - mean[c]) + c3[c];
                gvp[c] = ga * gt[c];
                gip[c] = ga * lam[c];
                fg[c] += ga * vp[c]; fl[c] += ga * ip[c];
            }
        }
        if (lo_row < hi_row) { flush(pg + cur * C, fg, C); flush(pl, fl, C); }
        free(fg);
    }
    add_parts(grad_gate, part, used, per, B * C);
    add_parts(grad_lam, part + (size_t)B * C, used, per, C);
    free(part);
    return 0;
}

/* ---- MRLA-B / ELA retrieval (paper eq. 5) on channels-last values, kept where the value convolution wrote them ----
 * values[s] is [B, R, C] contiguous (s < n), C a multiple of 8; A is alpha expanded per channel, [B, n, C] (A[b, s, c] = alpha[b, c / d, s]).
 * out[b, r, c] = sum_s A[b, s, c] * values[s][b, r, c] */
/* With sums not NULL, also the per-channel sum and sum of squares of out over (b, r), for the BatchNorm
 * that follows (sums[0..C) and sums[C..2C)): the epilogue then needs no statistics pass of its own. */
int elanet_ret_forward(const float* const* values, int64_t n, int64_t B, int64_t R, int64_t C, const float* restrict A,
                       float* restrict out, double* restrict sums) {
    const int nt = omp_get_max_threads();
    double* part = sums ? calloc((size_t)nt * 2 * C, sizeof(double)) : NULL;
    if (sums && !part) return 1;
    int used = 1, failed = 0;
    #pragma omp parallel num_threads(nt)
    {
        #pragma omp single
        used = omp_get_num_threads();
        double* mine = part ? part + (size_t)omp_get_thread_num() * 2 * C : NULL;
        float* fs = mine ? calloc(2 * C, sizeof(float)) : NULL;  /* float sums over <= FLUSH_ROWS rows */
        int64_t lo_row, hi_row;
        share_or_fail(B * R, !mine || fs, &failed, &lo_row, &hi_row);
        int count = 0;
        for (int64_t row = lo_row; row < hi_row; row++) {
            const float* Ab = A + (row / R) * n * C;
            for (int64_t k = 0; k < C; k += VL) {  /* the sum stays in a register across the n values */
                vf acc = ld(Ab + k) * ld(values[0] + row * C + k);
                for (int64_t s = 1; s < n; s++) acc = fmadd(ld(Ab + s * C + k), ld(values[s] + row * C + k), acc);
                st(out + row * C + k, acc);
                if (fs) {
                    st(fs + k, ld(fs + k) + acc);
                    st(fs + C + k, fmadd(acc, acc, ld(fs + C + k)));
                }
            }
            if (fs && ++count == FLUSH_ROWS) { flush(mine, fs, 2 * C); count = 0; }
        }
        if (fs) {
            flush(mine, fs, 2 * C);
            free(fs);
        }
    }
    if (part) {
        add_parts(sums, part, used, 2 * C, C);
        add_parts(sums + C, part + C, used, 2 * C, C);
        free(part);
    }
    return failed;
}

/* Backward of block n's retrieval in the "pull" form, one pass over the rows. Value s's gradient is
 * sum_{t >= s} A_t[:, s] * g_t over the blocks t that read it; block n forms its own value's, reading
 * the gradients of the L later blocks that the stage keeps (later[l], with their weights for this
 * value at later_A[l] + b * later_stride[l]), instead of every block adding its share into
 * read-modify-written partial sums of all earlier values:
 *   grad_v = A[:, n - 1] * g + sum_l later_A[l] * later[l];
 *   slot = g (kept for the earlier blocks; zeros when g is NULL; slot may be NULL: nobody reads it);
 *   GA[b, s, c] = sum_r g * values[s] (the caller sums each head's channels into d alpha[b, head, s]).
 * A is this block's [B, n, C]; g, slot, later[l] and grad_v are [B, R, C].
 * With ep not NULL the retrieval is followed by the epilogue out = x + keep[b] * ReLU(BN(o)) and g is
 * formed here from the block's output gradient ep->grad and o, as elanet_epi_backward would write it,
 * so the epilogue's gradient is never written out. */
typedef struct {
    const float *grad, *o, *scale, *shift, *mean, *keep, *c1, *c2, *c3;  /* keep may be NULL (no DropPath) */
} ret_epilogue;

int elanet_ret_backward(const float* const* values, int64_t n, int64_t B, int64_t R, int64_t C, const float* restrict A,
                        const float* restrict g, const ret_epilogue* ep, float* restrict slot, const float* const* later,
                        const float* const* later_A, const int64_t* later_stride, int64_t L,
                        float* restrict grad_v, double* restrict GA) {
    const int nt = omp_get_max_threads();
    const size_t per = (size_t)B * n * C;
    double* part = GA ? calloc((size_t)nt * per, sizeof(double)) : NULL;
    if (GA && !part) return 1;
    int used = 1;
    #pragma omp parallel num_threads(nt)
    {
        #pragma omp single
        used = omp_get_num_threads();
        int64_t lo_row, hi_row;
        share(B * R, &lo_row, &hi_row);
        double* mine = part ? part + (size_t)omp_get_thread_num() * per : NULL;
        float* fa = mine ? calloc(n * C, sizeof(float)) : NULL;  /* this sample's products, flushed into mine */
        int count = 0;
        int64_t cur = lo_row < hi_row ? lo_row / R : 0;
        for (int64_t row = lo_row; row < hi_row; row++) {
            const int64_t b = row / R;
            if (fa && (b != cur || count == FLUSH_ROWS)) { flush(mine + cur * n * C, fa, n * C); cur = b; count = 0; }
            count++;
            const float* gr = g ? g + row * C : ep ? ep->grad + row * C : NULL;
            float* sl = slot ? slot + row * C : NULL;
            const float* Al = A + b * n * C + (n - 1) * C;
            const float kb = ep && ep->keep ? ep->keep[b] : 1.0f;
            const vf keep = {kb, kb, kb, kb, kb, kb, kb, kb};
            for (int64_t k = 0; k < C; k += VL) {  /* per 8 channels: the value's gradient stays in a register */
                vf gk = gr ? ld(gr + k) : (vf){0};
                if (ep) {  /* BN's backward through ReLU and DropPath: c1 * gy + c2 * (o - mean) + c3 */
                    const vf o = ld(ep->o + row * C + k);
                    const vf y = o * ld(ep->scale + k) + ld(ep->shift + k);  /* as the forward rounds it: same ReLU mask */
                    const vf gy = (vf)((vi)(gk * keep) & (y > (vf){0}));
                    gk = fmadd(ld(ep->c1 + k), gy, fmadd(ld(ep->c2 + k), o - ld(ep->mean + k), ld(ep->c3 + k)));
                }
                vf acc = ld(Al + k) * gk;
                if (sl) st(sl + k, gk);
                for (int64_t l = 0; l < L; l++)
                    acc = fmadd(ld(later_A[l] + b * later_stride[l] + k), ld(later[l] + row * C + k), acc);
                st(grad_v + row * C + k, acc);
                if (fa && gr)
                    for (int64_t s = 0; s < n; s++)
                        st(fa + s * C + k, fmadd(gk, ld(values[s] + row * C + k), ld(fa + s * C + k)));
            }
        }
        if (fa) {
            if (lo_row < hi_row) flush(mine + cur * n * C, fa, n * C);
            free(fa);
        }
    }
    if (GA) {
        add_parts(GA, part, used, per, (int64_t)per);
        free(part);
    }
    return 0;
}

/* The row passes of fused cross entropy over (m, V) logits on the CPU, with one exponential
 * per logit. xentkit/kernels/native.py compiles this file on first use and calls it.
 *
 * A row is walked in blocks of BLOCK classes small enough for the L1 cache: each block's
 * maximum b, then e_j = exp(x_j - b), stored (in the gradient's place for float32, else in a
 * row of float32 scratch), and summed. With the row's maximum s, the sum of exponentials is
 * S = sum over blocks of exp(b - s) * (sum of the block's e), and the gradient of
 * xentkit.kernels.chunked._fused_rows,
 *
 *     g_j = exp(x_j - s) / S * (P + Z lse) - T [j = t] - E w_j,      lse = s + log S,
 *
 * is each stored e_j times its block's exp(b - s) (P + Z lse) / S, less the target and
 * smoothing terms: one exponential per logit instead of two, each row read from memory once.
 * An infinite maximum (all -inf) shifts by 0, and NaN propagates, as in _fused_rows.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define BLOCK 1024

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));
typedef uint16_t vh __attribute__((vector_size(LANES * 2)));

static const vi LANE = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

static inline vf splat(float a) { return a - (vf){0}; }
static inline vf pick(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
/* NaN-propagating maximum, as torch.amax. */
static inline float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }
static inline vf vmax(vf a, vf b) { return pick((a > b) | (a != a), a, b); }

/* exp(x) for x <= 0, -inf and NaN: 2^n p(r) with r = x - n ln 2 in [-ln2/2, ln2/2] and p the
 * Cephes expf polynomial (within 2 ulp of expf); below -87 (under 2^-125) it is 0. */
static inline vf vexp(vf x) {
    const vf round = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vi normal = x >= splat(-87.0f);
    vf xc = pick(normal, x, splat(-87.0f));
    vf t = xc * splat(1.44269504088896341f) + round;
    vf n = t - round;
    vf r = xc - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    vf p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
    vf y = p * (vf)(((vi)t - 0x4B400000 + 127) << 23); /* p * 2^n */
    return pick(normal, y, pick(x != x, x, splat(0.0f)));
}

static inline float hsum(vf v) {
    float s = 0.0f;
    for (int k = 0; k < LANES; k++) s += v[k];
    return s;
}

static inline float hmax(vf v) {
    float m = v[0];
    for (int k = 1; k < LANES; k++) m = max_nan(m, v[k]);
    return m;
}

/* LANES values from p[j] on, float32 or bfloat16; the lanes from n on read as pad. */
static inline vf load(const void *p, int bf16, int64_t j, int64_t n, float pad) {
    vf v = splat(pad);
    if (bf16) {
        uint16_t tmp[LANES] = {0};
        vh h;
        if (n == LANES) {
            memcpy(&h, (const uint16_t *)p + j, sizeof h);
        } else {
            memcpy(tmp, (const uint16_t *)p + j, n * sizeof(uint16_t));
            memcpy(&h, tmp, sizeof h);
        }
        return pick(LANE < (int32_t)n, (vf)(__builtin_convertvector(h, vi) << 16), v);
    }
    if (n == LANES) {
        memcpy(&v, (const float *)p + j, sizeof v);
        return v;
    }
    memcpy(&v, (const float *)p + j, n * sizeof(float));
    return pick(LANE < (int32_t)n, v, splat(pad));
}

/* The first n lanes of v into p[j...], as float32 or bfloat16 (nearest even; NaN stays NaN). */
static inline void store(void *p, int bf16, int64_t j, int64_t n, vf v) {
    if (bf16) {
        vi bits = (vi)v, nan = v != v;
        vi rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 & ~nan) | ((bits >> 16 | 0x40) & nan);
        vh h = __builtin_convertvector(rounded, vh);
        if (n == LANES)
            memcpy((uint16_t *)p + j, &h, sizeof h);
        else
            memcpy((uint16_t *)p + j, &h, n * sizeof(uint16_t));
    } else if (n == LANES) {
        memcpy((float *)p + j, &v, sizeof v);
    } else {
        memcpy((float *)p + j, &v, n * sizeof(float));
    }
}

/* x and out: (m, v) float32 (bf16 = 0) or bfloat16; out NULL for the statistics alone, or x
 * itself to write over it. target: (m,) valid class ids. weight: (v,) float32 or NULL, used by
 * the smoothing terms only. p, t, and (or NULL) e and z: per-row coefficients. Writes
 * row_max = s, sum_exp = S and, when smooth, smooth_sum = sum_j w_j (x_j - shift). */
void xentkit_rows(const void *x, void *out, int bf16, int64_t m, int64_t v,
                  const int64_t *target, const float *weight, int smooth, const float *p_coef,
                  const float *t_coef, const float *e_coef, const float *z_coef,
                  float *row_max, float *sum_exp, float *smooth_sum, int threads) {
    const int64_t blocks = (v + BLOCK - 1) / BLOCK, width = bf16 ? 2 : 4;
#pragma omp parallel num_threads(threads)
    {
        /* per block: shift, then exp(shift - s); sum of e; sum of w (x - shift); sum of w */
        float *shifts = malloc(4 * sizeof(float) * blocks);
        float *sums = shifts + blocks, *wsums = sums + blocks, *wtotals = wsums + blocks;
        float *scratch = out != NULL && bf16 ? malloc(sizeof(float) * v) : NULL;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) {
            const char *row = (const char *)x + i * v * width;
            char *grad = out == NULL ? NULL : (char *)out + i * v * width;
            float *exps = bf16 ? scratch : (float *)grad;
            float s = -INFINITY;
            for (int64_t b = 0; b < blocks; b++) {
                const int64_t lo = b * BLOCK, hi = lo + BLOCK < v ? lo + BLOCK : v;
                vf top = splat(-INFINITY);
                for (int64_t j = lo; j < hi; j += LANES)
                    top = vmax(top, load(row, bf16, j, hi - j < LANES ? hi - j : LANES, -INFINITY));
                const float block_max = hmax(top), shift = block_max == -INFINITY ? 0.0f : block_max;
                vf esum = splat(0.0f), wsum = esum, wtotal = esum;
                for (int64_t j = lo; j < hi; j += LANES) {
                    const int64_t n = hi - j < LANES ? hi - j : LANES;
                    const vf shifted = load(row, bf16, j, n, -INFINITY) - splat(shift);
                    const vf e = vexp(shifted);
                    esum += e;
                    if (exps != NULL) store(exps, 0, j, n, e);
                    if (smooth) {
                        const vf w = weight == NULL ? splat(1.0f) : load(weight, 0, j, n, 0.0f);
                        const vi real = LANE < (int32_t)n;
                        wsum += pick(real, w * shifted, splat(0.0f));
                        wtotal += pick(real, w, splat(0.0f));
                    }
                }
                shifts[b] = shift;
                sums[b] = hsum(esum);
                wsums[b] = hsum(wsum);
                wtotals[b] = hsum(wtotal);
                s = max_nan(s, block_max);
            }
            const float shift = s == -INFINITY ? 0.0f : s;
            float total = 0.0f, smoothed = 0.0f;
            for (int64_t b = 0; b < blocks; b++) {
                smoothed += wsums[b] + (shifts[b] - shift) * wtotals[b];
                shifts[b] = vexp(splat(shifts[b] - shift))[0];
                total += sums[b] * shifts[b];
            }
            row_max[i] = s;
            sum_exp[i] = total;
            if (smooth) smooth_sum[i] = smoothed;
            if (grad == NULL) continue;
            float coef = p_coef[i];
            if (z_coef != NULL) coef += z_coef[i] * (shift + logf(total));
            coef /= total;
            const float e = e_coef == NULL ? 0.0f : e_coef[i];
            const int64_t t = target[i];
            for (int64_t b = 0; b < blocks; b++) {
                const int64_t lo = b * BLOCK, hi = lo + BLOCK < v ? lo + BLOCK : v;
                const vf k = splat(shifts[b] * coef);
                for (int64_t j = lo; j < hi; j += LANES) {
                    const int64_t n = hi - j < LANES ? hi - j : LANES;
                    vf g = load(exps, 0, j, n, 0.0f) * k;
                    if (e_coef != NULL)
                        g -= weight == NULL ? splat(e) : splat(e) * load(weight, 0, j, n, 0.0f);
                    if (t >= j && t < j + n) g[t - j] -= t_coef[i];
                    store(grad, bf16, j, n, g);
                }
            }
        }
        free(shifts);
        free(scratch);
    }
}

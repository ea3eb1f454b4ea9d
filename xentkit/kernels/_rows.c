/* The row passes of fused cross entropy over (m, V) logits on the CPU, with one exponential
 * per logit. xentkit/kernels/native.py compiles this file on first use and calls it.
 *
 * A row is walked in blocks of BLOCK classes small enough for the L1 cache: each block gets a
 * shift b, the row's maximum so far (see one_row), and in one pass e_j = exp(x_j - b) is
 * stored (in the gradient's place for float32, else in a row of float32 scratch) and summed
 * while the block's maximum is found. With the row's maximum s, the sum of exponentials is
 * S = sum over blocks of exp(b - s) * (sum of the block's e), and the gradient of
 * xentkit.kernels.chunked._fused_rows,
 *
 *     g_j = exp(x_j - s) / S * (P + Z lse) - T [j = t] - E w_j,      lse = s + log S,
 *
 * is each stored e_j times its block's exp(b - s) (P + Z lse) / S, less the target and
 * smoothing terms: one exponential per logit instead of two, each row read from memory once.
 * An infinite maximum (all -inf) shifts by 0, and NaN propagates, as in _fused_rows: a block's
 * maximum may skip a NaN, whose exponential reads as 0, so the exponential pass also sums the
 * x_j - b, NaN exactly when some x_j is (for a finite b), and such a block's maximum becomes
 * NaN.
 *
 * Written in GCC's generic vectors; where the compiler targets AVX-512, three steps that it
 * would otherwise split into many instructions use one or two of the CPU's own: widening
 * bfloat16 to float32, the maximum, and (with AVX512-BF16) rounding float32 to bfloat16, which
 * flushes results under 2^-126 to zero where the generic rounding keeps them subnormal.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define AVX512 1
#endif

#define LANES 16
#define BLOCK 1024
/* How far a block's maximum may lie over its shift: its exponentials stay under e^32 and the
 * factor exp(shift - s) that later scales them above e^-32, far from overflow and underflow. */
#define AHEAD 32.0f

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));
typedef uint16_t vh __attribute__((vector_size(LANES * 2)));

static const vi LANE = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

static inline vf splat(float a) { return a - (vf){0}; }
static inline vf pick(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
/* NaN-propagating maximum, as torch.amax. */
static inline float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }
/* The maximum of two vectors, either one where a lane holds NaN. */
static inline vf vmax(vf a, vf b) {
#ifdef AVX512
    return (vf)_mm512_max_ps((__m512)a, (__m512)b);
#else
    return pick(a > b, a, b);
#endif
}

/* exp(d) for d <= 0 or -inf (d = x - shift; NaN and +inf rows are set to NaN by the caller):
 * 2^n p(r) with n = round(d / ln 2), r = d - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in two
 * for an exact r) and p a degree-6 polynomial fitted to exp on that interval (within 1e-7
 * relative, under 2 ulp); 2^n is added to p's exponent bits. Below -86 (exp < 2^-124) it is 0,
 * so -inf gives exactly 0. */
static inline vf vexp(vf d) {
    const vf round = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    const vf t = d * splat(1.44269504088896341f) + round;
    const vf n = t - round;
    const vf r = d - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    vf p = splat(1.3836845755577087e-3f);
    p = p * r + splat(8.374815806746483e-3f);
    p = p * r + splat(4.166822507977486e-2f);
    p = p * r + splat(1.6666419804096222e-1f);
    p = p * r + splat(4.9999991059303284e-1f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    /* the low bits of t hold n; shifted into the exponent field they multiply p by 2^n */
    const vi bits = (vi)p + ((vi)t << 23);
    return (vf)(bits & (d >= splat(-86.0f)));
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
#ifdef AVX512
            const __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + j));
            return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16);
#else
            memcpy(&h, (const uint16_t *)p + j, sizeof h);
#endif
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
        vh h;
#ifdef __AVX512BF16__
        const __m256bh rounded = _mm512_cvtneps_pbh((__m512)v);
        memcpy(&h, &rounded, sizeof h);
#else
        vi bits = (vi)v, nan = v != v;
        vi rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 & ~nan) | ((bits >> 16 | 0x40) & nan);
        h = __builtin_convertvector(rounded, vh);
#endif
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

#define INLINE static inline __attribute__((always_inline))

/* The steps below take n = LANES in a pass's loop over whole vectors, where inlining folds
 * every test of n away, and n < LANES once for the block's tail. */

/* Four running maxima: one would wait on the previous compare at every vector. */
INLINE void max_step(const int bf16, const char *row, int64_t j, int64_t n, vf *top) {
    *top = vmax(*top, load(row, bf16, j, n, -INFINITY));
}

/* The maximum of the block [lo, hi) of a row, or of some of its lanes where one holds NaN. */
INLINE float max_pass(const int bf16, const char *row, int64_t lo, int64_t hi) {
    vf top[4] = {splat(-INFINITY), splat(-INFINITY), splat(-INFINITY), splat(-INFINITY)};
    int64_t j = lo;
    for (; j + 4 * LANES <= hi; j += 4 * LANES)
        for (int q = 0; q < 4; q++) max_step(bf16, row, j + q * LANES, LANES, &top[q]);
    for (; j + LANES <= hi; j += LANES) max_step(bf16, row, j, LANES, &top[0]);
    if (j < hi) max_step(bf16, row, j, hi - j, &top[0]);
    return hmax(vmax(vmax(top[0], top[1]), vmax(top[2], top[3])));
}

/* e = exp(x - shift) into exps (when has_out), its sum, the running maximum of x and the sum
 * of x - shift (NaN exactly when an x is NaN, for a finite shift); with smooth, the sums of
 * w (x - shift) and of w over the real lanes. */
INLINE void exp_step(const int bf16, const int smooth, const int has_out, const char *row,
                     float *exps, const float *weight, int64_t j, int64_t n, float shift,
                     vf *top, vf *esum, vf *dsum, vf *wsum, vf *wtotal) {
    const vf x = load(row, bf16, j, n, -INFINITY), d = x - splat(shift), e = vexp(d);
    /* the next block streams in from memory while this one is computed */
    __builtin_prefetch(row + (j + BLOCK) * (bf16 ? 2 : 4));
    *top = vmax(*top, x);
    *esum += e;
    *dsum += d;
    if (has_out) store(exps, 0, j, n, e);
    if (smooth) {
        const vi real = LANE < (int32_t)n;
        const vf w = weight == NULL ? splat(1.0f) : load(weight, 0, j, n, 0.0f);
        *wsum += pick(real, w * d, splat(0.0f));
        *wtotal += pick(real, w, splat(0.0f));
    }
}

/* Block b = [lo, hi) of a row shifted by shift: its exponentials (exp_step) and, at b in sums,
 * wsums and wtotals, their sums. Returns the block's maximum, NaN where a logit is NaN. */
INLINE float exp_pass(const int bf16, const int smooth, const int has_out, const char *row,
                      float *exps, const float *weight, int64_t lo, int64_t hi, float shift,
                      int64_t b, float *sums, float *wsums, float *wtotals) {
    vf top = splat(-INFINITY), esum = splat(0.0f), dsum = esum, wsum = esum, wtotal = esum;
    int64_t j = lo;
    for (; j + LANES <= hi; j += LANES)
        exp_step(bf16, smooth, has_out, row, exps, weight, j, LANES, shift, &top, &esum, &dsum,
                 &wsum, &wtotal);
    if (j < hi)
        exp_step(bf16, smooth, has_out, row, exps, weight, j, hi - j, shift, &top, &esum,
                 &dsum, &wsum, &wtotal);
    sums[b] = hsum(esum);
    wsums[b] = hsum(wsum);
    wtotals[b] = hsum(wtotal);
    const float block_max = hmax(top), dtotal = hsum(dsum);
    return dtotal != dtotal && shift < INFINITY && block_max < INFINITY ? NAN : block_max;
}

/* g = e k - E w_j - T [j = t], rounded once into the gradient's dtype. */
INLINE void grad_step(const int bf16, const int smooth, const float *exps, char *grad,
                      const float *weight, int64_t j, int64_t n, vf k, vf e, int64_t t,
                      float t_coef) {
    vf g = load(exps, 0, j, n, 0.0f) * k;
    if (smooth) g -= weight == NULL ? e : e * load(weight, 0, j, n, 0.0f);
    if (t >= j && t < j + n) g[t - j] -= t_coef;
    store(grad, bf16, j, n, g);
}

/* Row i, inlined once per storage type, smoothing flag and output flag so that none of them
 * is tested inside its loops. shifts: 4 * blocks floats of per-block workspace (shift, then
 * exp(shift - s); sum of e; sum of w (x - shift); sum of w); scratch: v floats for bfloat16. */
INLINE void one_row(const int bf16, const int smooth, const int has_out, int64_t i,
                    const void *x, void *out, int64_t v, const int64_t *target,
                    const float *weight, const float *p_coef, const float *t_coef,
                    const float *e_coef, const float *z_coef, float *row_max, float *sum_exp,
                    float *smooth_sum, float *shifts, float *scratch) {
    const int64_t blocks = (v + BLOCK - 1) / BLOCK;
    const char *row = (const char *)x + i * v * (bf16 ? 2 : 4);
    char *grad = has_out ? (char *)out + i * v * (bf16 ? 2 : 4) : NULL;
    float *exps = bf16 ? scratch : (float *)grad;
    float *sums = shifts + blocks, *wsums = sums + blocks, *wtotals = wsums + blocks;
    float s = -INFINITY;
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t lo = b * BLOCK, hi = lo + BLOCK < v ? lo + BLOCK : v;
        /* A block is shifted by the row's maximum so far, a logit of the row: exponentials of
         * the block's logits far below it are negligible in the row's sum, and one over it by
         * more than AHEAD has the block computed again, shifted by the block's maximum. Until
         * a finite maximum is known (the first block, or one after blocks all -inf), and where
         * the exponentials overwrite the logits (float32 in place: the block could not be
         * computed again), a pass of its own finds the block's maximum first. */
        float shift = s;
        if (s == -INFINITY || (const char *)exps == row) {
            shift = max_pass(bf16, row, lo, hi);
            if (shift == -INFINITY) shift = 0.0f;
        }
        float block_max = exp_pass(bf16, smooth, has_out, row, exps, weight, lo, hi, shift, b,
                                   sums, wsums, wtotals);
        if (block_max > shift + AHEAD && block_max < INFINITY) {
            shift = block_max;
            block_max = exp_pass(bf16, smooth, has_out, row, exps, weight, lo, hi, shift, b,
                                 sums, wsums, wtotals);
        }
        shifts[b] = shift;
        s = max_nan(s, block_max);
    }
    const float shift = s == -INFINITY ? 0.0f : s;
    float total = 0.0f, smoothed = 0.0f;
    for (int64_t b = 0; b < blocks; b++) {
        smoothed += wsums[b] + (shifts[b] - shift) * wtotals[b];
        shifts[b] = vexp(splat(shifts[b] - shift))[0];
        total += sums[b] * shifts[b];
    }
    /* a NaN or +inf logit makes the whole row NaN, as softmax does */
    if (!(s < INFINITY)) total = smoothed = NAN;
    row_max[i] = s;
    sum_exp[i] = total;
    if (smooth) smooth_sum[i] = smoothed;
    if (!has_out) return;
    float coef = p_coef[i];
    if (z_coef != NULL) coef += z_coef[i] * (shift + logf(total));
    coef /= total;
    const vf e = splat(e_coef == NULL ? 0.0f : e_coef[i]);
    const int64_t t = target[i];
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t lo = b * BLOCK, hi = lo + BLOCK < v ? lo + BLOCK : v;
        const vf k = splat(shifts[b] * coef);
        int64_t j = lo;
        for (; j + LANES <= hi; j += LANES)
            grad_step(bf16, smooth, exps, grad, weight, j, LANES, k, e, t, t_coef[i]);
        if (j < hi) grad_step(bf16, smooth, exps, grad, weight, j, hi - j, k, e, t, t_coef[i]);
    }
}

/* x and out: (m, v) float32 (bf16 = 0) or bfloat16; out NULL for the statistics alone, or x
 * itself to write over it. target: (m,) valid class ids. weight: (v,) float32 or NULL, used by
 * the smoothing terms only. p, t, and (or NULL) e and z: per-row coefficients (e only used
 * with smooth). Writes row_max = s, sum_exp = S and, when smooth, smooth_sum =
 * sum_j w_j (x_j - shift). */
void xentkit_rows(const void *x, void *out, int bf16, int64_t m, int64_t v,
                  const int64_t *target, const float *weight, int smooth, const float *p_coef,
                  const float *t_coef, const float *e_coef, const float *z_coef,
                  float *row_max, float *sum_exp, float *smooth_sum, int threads) {
    const int64_t blocks = (v + BLOCK - 1) / BLOCK;
    const int variant = (bf16 != 0) * 4 + (smooth != 0) * 2 + (out != NULL);
#pragma omp parallel num_threads(threads)
    {
        float *shifts = malloc(4 * sizeof(float) * blocks);
        float *scratch = out != NULL && bf16 ? malloc(sizeof(float) * v) : NULL;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) {
#define ROW(BF16, SMOOTH, OUT)                                                                \
    one_row(BF16, SMOOTH, OUT, i, x, out, v, target, weight, p_coef, t_coef, e_coef, z_coef,  \
            row_max, sum_exp, smooth_sum, shifts, scratch)
            switch (variant) {
                case 0: ROW(0, 0, 0); break;
                case 1: ROW(0, 0, 1); break;
                case 2: ROW(0, 1, 0); break;
                case 3: ROW(0, 1, 1); break;
                case 4: ROW(1, 0, 0); break;
                case 5: ROW(1, 0, 1); break;
                case 6: ROW(1, 1, 0); break;
                default: ROW(1, 1, 1); break;
            }
#undef ROW
        }
        free(shifts);
        free(scratch);
    }
}

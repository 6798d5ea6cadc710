/* A layer's elementwise work on bfloat16 rows, each row by one thread in a fixed order (so a row's bits depend
   only on its values), rounding to bfloat16 where torch's ops would: RMS norm, rotary embedding in place, and
   SiLU(gate) * up. Done by torch, each is several ops, each a pass over memory and a dispatch: at a decode
   step's few rows the dispatches cost more than the arithmetic. */
#include <math.h>

#include "bf16_math.h"

static inline __m256i round_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

/* out = w * bf16(x * rsqrt(mean(x^2) + eps)) */
void rms_norm_bf16(const uint16_t *x, int64_t rows, int64_t dim, int64_t ldx, const uint16_t *w, float eps,
                   uint16_t *out, int64_t ldo, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * ldx;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t j = 0; j < dim; j += 16) {
            __m512 v = load(xr + j, lanes(dim - j));
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)dim + eps));
        for (int64_t j = 0; j < dim; j += 16) {
            __mmask16 m = lanes(dim - j);
            __m512 y = widen(round_bf16(_mm512_mul_ps(load(xr + j, m), inv)));
            _mm256_mask_storeu_epi16(out + r * ldo + j, m, round_bf16(_mm512_mul_ps(load(w + j, m), y)));
        }
    }
}

/* heads [0, heads) of each row, 64 wide, in place: the halves (a, b) become (a cos - b sin, b cos + a sin) at
   the row's position (cos and sin: [positions, 32] float) */
void rope_bf16(uint16_t *x, int64_t rows, int64_t heads, int64_t ldx, const int64_t *pos, const float *cos,
               const float *sin, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + pos[r] * 32, *s = sin + pos[r] * 32;
        __m512 c0 = _mm512_loadu_ps(c), c1 = _mm512_loadu_ps(c + 16), s0 = _mm512_loadu_ps(s), s1 = _mm512_loadu_ps(s + 16);
        for (int64_t h = 0; h < heads; h++) {
            uint16_t *p = x + r * ldx + h * 64;
            __m512 a0 = widen(_mm256_loadu_si256((const __m256i *)p)), a1 = widen(_mm256_loadu_si256((const __m256i *)(p + 16)));
            __m512 b0 = widen(_mm256_loadu_si256((const __m256i *)(p + 32))), b1 = widen(_mm256_loadu_si256((const __m256i *)(p + 48)));
            _mm256_storeu_si256((__m256i *)p, round_bf16(_mm512_sub_ps(_mm512_mul_ps(a0, c0), _mm512_mul_ps(b0, s0))));
            _mm256_storeu_si256((__m256i *)(p + 16), round_bf16(_mm512_sub_ps(_mm512_mul_ps(a1, c1), _mm512_mul_ps(b1, s1))));
            _mm256_storeu_si256((__m256i *)(p + 32), round_bf16(_mm512_add_ps(_mm512_mul_ps(b0, c0), _mm512_mul_ps(a0, s0))));
            _mm256_storeu_si256((__m256i *)(p + 48), round_bf16(_mm512_add_ps(_mm512_mul_ps(b1, c1), _mm512_mul_ps(a1, s1))));
        }
    }
}

/* out = bf16(silu(gate)) * up, where each row of gu is [gate (n), up (n)] */
void silu_mul_bf16(const uint16_t *gu, int64_t rows, int64_t n, int64_t ldg, uint16_t *out, int64_t ldo, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g = gu + r * ldg, *u = g + n;
        for (int64_t j = 0; j < n; j += 16) {
            __mmask16 m = lanes(n - j);
            __m512 x = load(g + j, m);
            /* sigmoid from exp of -|x| <= 0: 1 / (1 + e) for x >= 0, e / (1 + e) below */
            __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
            __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
            __m512 sig = _mm512_mask_mul_ps(inv, neg, e, inv);
            __m512 silu = widen(round_bf16(_mm512_mul_ps(x, sig)));
            _mm256_mask_storeu_epi16(out + r * ldo + j, m, round_bf16(_mm512_mul_ps(silu, load(u + j, m))));
        }
    }
}

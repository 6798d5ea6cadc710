/* Attention of one query position over a layer's cached keys (a decode step), bfloat16 in and out.

   q: [H, 64], the G = H / Hkv query heads of a KV head consecutive; k, v: [Hkv, ctx, 64] (the layer's
   cache, keys [0, L) used); out: [H, 64]. Keys go in blocks of BLOCK; each (KV head, block) is one unit of
   work computing, for its G heads, the block's maximum score, its sum of exp and its exp-weighted sum of
   values in float. The blocks of a head are then merged in order, so the result's bits depend on L alone,
   not on the thread count. */
#include <math.h>
#include <stdlib.h>

#include "bf16_math.h"

#define HD 64
#define BLOCK 256
#define GMAX 16

typedef struct {
    float max[GMAX], sum[GMAX];
    float acc[GMAX][HD];
} Part;

/* keys [a, b) of one KV head for its G query heads qg (bf16 pairs, pre-scaled) */
static void block(const uint16_t *qg, const uint16_t *k, const uint16_t *v, int64_t a, int64_t b, int G, Part *out) {
    float s[GMAX][BLOCK];
    int64_t n = b - a;
    for (int g = 0; g < G; g++) {
        __m512bh q0 = (__m512bh)_mm512_loadu_si512(qg + g * HD), q1 = (__m512bh)_mm512_loadu_si512(qg + g * HD + 32);
        for (int64_t j = 0; j < n; j++) {
            const uint16_t *kj = k + (a + j) * HD;
            __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), q0, (__m512bh)_mm512_loadu_si512(kj));
            d = _mm512_dpbf16_ps(d, q1, (__m512bh)_mm512_loadu_si512(kj + 32));
            s[g][j] = _mm512_reduce_add_ps(d);
        }
    }
    for (int g = 0; g < G; g++) {
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < n; j += 16) {
            __mmask16 m = lanes(n - j);
            mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, s[g] + j));
        }
        float top = _mm512_reduce_max_ps(mx);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            __mmask16 m = lanes(n - j);
            __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s[g] + j), _mm512_set1_ps(top)));
            e = _mm512_maskz_mov_ps(m, e);
            _mm512_mask_storeu_ps(s[g] + j, m, e);
            sum = _mm512_add_ps(sum, e);
        }
        out->max[g] = top;
        out->sum[g] = _mm512_reduce_add_ps(sum);
    }
    __m512 acc[GMAX][4];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < 4; c++) acc[g][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        const uint16_t *vj = v + (a + j) * HD;
        __m512 v0 = widen(_mm256_loadu_si256((const __m256i *)vj)), v1 = widen(_mm256_loadu_si256((const __m256i *)(vj + 16)));
        __m512 v2 = widen(_mm256_loadu_si256((const __m256i *)(vj + 32))), v3 = widen(_mm256_loadu_si256((const __m256i *)(vj + 48)));
        for (int g = 0; g < G; g++) {
            __m512 p = _mm512_set1_ps(s[g][j]);
            acc[g][0] = _mm512_fmadd_ps(p, v0, acc[g][0]);
            acc[g][1] = _mm512_fmadd_ps(p, v1, acc[g][1]);
            acc[g][2] = _mm512_fmadd_ps(p, v2, acc[g][2]);
            acc[g][3] = _mm512_fmadd_ps(p, v3, acc[g][3]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(out->acc[g] + 16 * c, acc[g][c]);
}

int decode_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t H,
                          int64_t Hkv, int64_t L, int64_t ctx, float scale, int threads) {
    int G = (int)(H / Hkv);
    if (G > GMAX || L < 1) return -1;
    int64_t nb = (L + BLOCK - 1) / BLOCK;
    Part *parts = (Part *)malloc(sizeof(Part) * (size_t)(Hkv * nb));
    uint16_t *qs = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(H * HD));
    if (!parts || !qs) { free(parts); free(qs); return -1; }
    for (int64_t i = 0; i < H * HD; i += 16) {  /* q * scale, rounded back to bf16 as torch's q * scale is */
        __m512 x = _mm512_mul_ps(widen(_mm256_loadu_si256((const __m256i *)(q + i))), _mm512_set1_ps(scale));
        _mm256_storeu_si256((__m256i *)(qs + i), (__m256i)_mm512_cvtneps_pbh(x));
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t u = 0; u < Hkv * nb; u++) {
        int64_t h = u / nb, i = u % nb, a = i * BLOCK, b = a + BLOCK < L ? a + BLOCK : L;
        block(qs + h * G * HD, k + h * ctx * HD, v + h * ctx * HD, a, b, G, &parts[u]);
    }
    for (int64_t h = 0; h < Hkv; h++)
        for (int g = 0; g < G; g++) {
            float top = -INFINITY, sum = 0.0f;
            for (int64_t i = 0; i < nb; i++) top = fmaxf(top, parts[h * nb + i].max[g]);
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t i = 0; i < nb; i++) {
                Part *p = &parts[h * nb + i];
                float w = expf(p->max[g] - top);
                sum += w * p->sum[g];
                for (int c = 0; c < 4; c++) acc[c] = _mm512_fmadd_ps(_mm512_set1_ps(w), _mm512_loadu_ps(p->acc[g] + 16 * c), acc[c]);
            }
            __m512 inv = _mm512_set1_ps(1.0f / sum);
            uint16_t *o = out + (h * G + g) * HD;
            for (int c = 0; c < 4; c++) _mm256_storeu_si256((__m256i *)(o + 16 * c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[c], inv)));
        }
    free(parts);
    free(qs);
    return 0;
}

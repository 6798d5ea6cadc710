/* A decode step's attention for B rows at once, bfloat16 in and out: each row (one sequence) writes its new
   key and value into its own cache at position L - 1, then its query attends over that cache's keys [0, L).

   q: row b at q + b * q_stride, [H, 64], the G = H / Hkv query heads of a KV head consecutive; the new keys
   and values likewise [Hkv, 64]; caches: row b's at kc[b] and vc[b], each
   [Hkv, ctx, 64]; out: [B, H, 64]. Keys go in blocks of BLOCK; each (row, KV head, block) is one unit of work
   computing, for its G heads, the block's maximum score, its sum of exp and its exp-weighted sum of values in
   float. A row's blocks are then merged in order, so its bits depend on its L alone: not on the thread count,
   nor on the other rows.

   Rows may share a prefix: where same[b] = a >= 0, row a's caches hold row b's keys and values [0, upto[b])
   bit for bit (the caller knows: both prefilled the same tokens, cut alike), and row b reads its whole blocks
   below upto[b] from row a's caches. Units run in the order (KV head, block, row), so those reads hit what
   row a's unit just brought into the CPU's cache: a shared prefix is read from memory once a step. The
   arithmetic is the same, so are the bits. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bf16_math.h"
#include "scratch.h"

#define HD 64
#define BLOCK 256
#define GMAX 16

/* one unit's result for G heads: max[G], sum[G], acc[G][HD] */
#define PART_FLOATS(G) ((G) * (2 + HD))

/* the lane sums of 16 vectors, as one vector (lane j: the sum of d[j]'s lanes), by a tree of shuffles and
   adds: a horizontal sum per key cost several times the dot product itself */
static inline __m512 sum16(const __m512 d[16]) {
    __m512 t[8], u[4], v[2];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: [a0 + a2, b0 + b2, a1 + a3, b1 + b3] */
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(d[2 * i], d[2 * i + 1]), _mm512_unpackhi_ps(d[2 * i], d[2 * i + 1]));
    for (int i = 0; i < 4; i++)  /* per 128-bit lane: the 4 vectors' sums over that lane */
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; i++)
        v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88), _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x88), _mm512_shuffle_f32x4(v[0], v[1], 0xDD));
}

/* keys [a, b) of one KV head for its G query heads qg (bf16 pairs, pre-scaled) */
static void block(const uint16_t *qg, const uint16_t *k, const uint16_t *v, int64_t a, int64_t b, int G, float *part) {
    float s[GMAX][BLOCK];
    float *max = part, *sums = part + G, *accs = part + 2 * G;
    int64_t n = b - a;
    for (int g = 0; g < G; g++) {
        __m512bh q0 = (__m512bh)_mm512_loadu_si512(qg + g * HD), q1 = (__m512bh)_mm512_loadu_si512(qg + g * HD + 32);
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
            __m512 d[16];
            if (g == 0)  /* the values these keys weigh, and the next keys, on their way while these are scored */
                for (int64_t j = j0; j < j0 + 16 && j < n; j++) {
                    _mm_prefetch((const char *)(v + (a + j) * HD), _MM_HINT_T0);
                    _mm_prefetch((const char *)(v + (a + j) * HD + 32), _MM_HINT_T0);
                    if (j + 16 < n) {
                        _mm_prefetch((const char *)(k + (a + j + 16) * HD), _MM_HINT_T0);
                        _mm_prefetch((const char *)(k + (a + j + 16) * HD + 32), _MM_HINT_T0);
                    }
                }
            for (int64_t j = 0; j < 16; j++) {
                if (j0 + j >= n) {
                    d[j] = _mm512_setzero_ps();
                    continue;
                }
                const uint16_t *kj = k + (a + j0 + j) * HD;
                d[j] = _mm512_dpbf16_ps(_mm512_setzero_ps(), q0, (__m512bh)_mm512_loadu_si512(kj));
                d[j] = _mm512_dpbf16_ps(d[j], q1, (__m512bh)_mm512_loadu_si512(kj + 32));
            }
            _mm512_mask_storeu_ps(s[g] + j0, lanes(n - j0), sum16(d));
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
        max[g] = top;
        sums[g] = _mm512_reduce_add_ps(sum);
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
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(accs + g * HD + 16 * c, acc[g][c]);
}

int decode_attention_bf16(int64_t B, const uint16_t *q, int64_t q_stride, const uint16_t *knew, int64_t knew_stride,
                          const uint16_t *vnew, int64_t vnew_stride, uint16_t *const *kc, uint16_t *const *vc,
                          const int64_t *L, const int64_t *same, const int64_t *upto, int64_t ctx, uint16_t *out,
                          int64_t H, int64_t Hkv, float scale, int threads) {
    int G = (int)(H / Hkv);
    if (G > GMAX || B < 1) return -1;
    int64_t units = 0, most = 0;
    for (int64_t b = 0; b < B; b++) {
        if (L[b] < 1 || L[b] > ctx) return -1;
        if (same[b] >= 0 && (same[b] >= B || upto[b] > L[b] - 1 || upto[b] > L[same[b]] - 1)) return -1;
        units += Hkv * ((L[b] + BLOCK - 1) / BLOCK);
        if ((L[b] + BLOCK - 1) / BLOCK > most) most = (L[b] + BLOCK - 1) / BLOCK;
    }
    size_t part_bytes = sizeof(float) * (size_t)PART_FLOATS(G), q_bytes = sizeof(uint16_t) * (size_t)(B * H * HD);
    char *mem = grow(sizeof(int64_t) * (size_t)(B + 1 + 2 * units) + part_bytes * (size_t)units + q_bytes);
    if (!mem) return -1;
    int64_t *first = (int64_t *)mem;  /* row b's parts are [first[b], first[b + 1]), in the order (head, block) */
    int64_t *order = first + B + 1, *row = order + units;  /* the units' parts and rows, in the order they run */
    float *parts = (float *)(row + units);
    uint16_t *qs = (uint16_t *)((char *)parts + part_bytes * (size_t)units);
    first[0] = 0;
    for (int64_t b = 0; b < B; b++) {
        first[b + 1] = first[b] + Hkv * ((L[b] + BLOCK - 1) / BLOCK);
        for (int64_t h = 0; h < Hkv; h++) {
            memcpy(kc[b] + (h * ctx + L[b] - 1) * HD, knew + b * knew_stride + h * HD, HD * sizeof(uint16_t));
            memcpy(vc[b] + (h * ctx + L[b] - 1) * HD, vnew + b * vnew_stride + h * HD, HD * sizeof(uint16_t));
        }
        for (int64_t i = 0; i < H * HD; i += 16) {  /* q * scale, rounded back to bf16 as torch's q * scale is */
            __m512 x = _mm512_mul_ps(widen(_mm256_loadu_si256((const __m256i *)(q + b * q_stride + i))), _mm512_set1_ps(scale));
            _mm256_storeu_si256((__m256i *)(qs + b * H * HD + i), (__m256i)_mm512_cvtneps_pbh(x));
        }
    }
    int64_t n = 0;
    for (int64_t h = 0; h < Hkv; h++)
        for (int64_t i = 0; i < most; i++)
            for (int64_t b = 0; b < B; b++) {
                int64_t nb = (L[b] + BLOCK - 1) / BLOCK;
                if (i < nb) {
                    order[n] = first[b] + h * nb + i;
                    row[n++] = b;
                }
            }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t u = 0; u < units; u++) {
        int64_t b = row[u], nb = (L[b] + BLOCK - 1) / BLOCK, r = order[u] - first[b], h = r / nb, i = r % nb;
        int64_t a = i * BLOCK, e = a + BLOCK < L[b] ? a + BLOCK : L[b];
        int64_t s = same[b] >= 0 && e <= upto[b] ? same[b] : b;  /* whose caches hold this block */
        block(qs + (b * H + h * G) * HD, kc[s] + h * ctx * HD, vc[s] + h * ctx * HD, a, e, G,
              parts + order[u] * PART_FLOATS(G));
    }
    for (int64_t b = 0; b < B; b++) {
        int64_t nb = (L[b] + BLOCK - 1) / BLOCK;
        for (int64_t h = 0; h < Hkv; h++)
            for (int g = 0; g < G; g++) {
                const float *p0 = parts + (first[b] + h * nb) * PART_FLOATS(G);
                float top = -INFINITY, sum = 0.0f;
                for (int64_t i = 0; i < nb; i++) top = fmaxf(top, p0[i * PART_FLOATS(G) + g]);
                __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
                for (int64_t i = 0; i < nb; i++) {
                    const float *p = p0 + i * PART_FLOATS(G);
                    float w = expf(p[g] - top);
                    sum += w * p[G + g];
                    for (int c = 0; c < 4; c++)
                        acc[c] = _mm512_fmadd_ps(_mm512_set1_ps(w), _mm512_loadu_ps(p + 2 * G + g * HD + 16 * c), acc[c]);
                }
                __m512 inv = _mm512_set1_ps(1.0f / sum);
                uint16_t *o = out + (b * H + h * G + g) * HD;
                for (int c = 0; c < 4; c++)
                    _mm256_storeu_si256((__m256i *)(o + 16 * c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[c], inv)));
            }
    }
    return 0;
}

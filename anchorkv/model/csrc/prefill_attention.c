/* A prefill piece's attention, bfloat16 in and out: T queries at positions L - T .. L - 1 of one sequence over
   its cached keys, query t seeing keys [0, L - T + t].

   q: token t's H heads at q + t * q_stride, [H, 64], the G = H / Hkv query heads of a KV head consecutive;
   caches [Hkv, ctx, 64] holding keys [0, L); out: [T, H, 64].

   Each KV head's keys are first laid out as bfloat16 pairs along the head dimension, 16 keys a vector, and its
   values as pairs of consecutive keys, so both products are dot products of pairs (vdpbf16ps) with no
   horizontal sums. A query row's scores stay in a per-thread buffer: max, exp, sum, probabilities rounded to
   bfloat16, then the weighted sum of values. Every sum of a row runs in an order fixed by its own key count,
   so its bits depend only on its query and its keys: not on T, the tiling, the thread count, nor the rows
   computed beside it (probabilities past a row's keys are +0 and add nothing).

   With AMX (and the kernel asked to use it), both products run on the tile unit, 16 query rows a tile: the
   same layouts are its B operands as they are, and an element of a tile product sums its own row's pairs in a
   fixed order, so the rows stay independent. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"
#include "bf16_math.h"
#include "scratch.h"

#define HD 64
#define PAIRS (HD / 2)
#define ROWS 6   /* query rows a tile */
#define KEYS 64  /* keys a tile step: 4 vectors of 16 */

/* the 16 x 16 matrix of 32-bit lanes in r transposed in place: r[i] becomes what was lane i of every row */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
}

/* keys [k0, k0 + KEYS) of one KV head, of [0, L) in all, as kt[Lp / 16][PAIRS][16] (16 keys a vector, a pair of
   dimensions a lane), values as vp[Lp / 2][HD] (a pair of consecutive keys a lane); zero past L */
static void layout(const uint16_t *k, const uint16_t *v, int64_t L, int64_t k0, uint32_t *kt, uint32_t *vp) {
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    const __m512i z = _mm512_setzero_si512();
    for (int64_t g = k0 / 16; g < (k0 + KEYS) / 16; g++)
        for (int half = 0; half < 2; half++) {  /* pairs [16 half, 16 half + 16) of 16 keys: rows in, columns out */
            __m512i r[16];
            for (int j = 0; j < 16; j++) {
                int64_t key = g * 16 + j;
                r[j] = key < L ? _mm512_loadu_si512(k + key * HD + 32 * half) : z;
            }
            transpose16(r);
            for (int p = 0; p < 16; p++) _mm512_storeu_si512(kt + (g * PAIRS + 16 * half + p) * 16, r[p]);
        }
    for (int64_t m = k0 / 2; m < (k0 + KEYS) / 2; m++) {
        int64_t a = 2 * m, b = 2 * m + 1;
        for (int c = 0; c < 2; c++) {
            __m512i x = a < L ? _mm512_loadu_si512(v + a * HD + 32 * c) : z;
            __m512i y = b < L ? _mm512_loadu_si512(v + b * HD + 32 * c) : z;
            _mm512_storeu_si512(vp + m * HD + 32 * c, _mm512_permutex2var_epi16(x, lo, y));
            _mm512_storeu_si512(vp + m * HD + 32 * c + 16, _mm512_permutex2var_epi16(x, hi, y));
        }
    }
}

/* rows' scores s (n[r] keys each) as probabilities p in bfloat16, +0 from n[r] to pend; rows [rows, all) all +0 */
static void probabilities(float *s, uint16_t *p, const int64_t *n, int rows, int all, int64_t pend, int64_t Lp) {
    for (int r = 0; r < rows; r++) {
        float *sr = s + r * Lp;
        uint16_t *pr = p + r * Lp;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < n[r]; j += 16) {
            __mmask16 m = lanes(n[r] - j);
            mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, sr + j));
        }
        __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx)), sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n[r]; j += 16) {
            __mmask16 m = lanes(n[r] - j);
            __m512 e = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sr + j), top)));
            _mm512_storeu_ps(sr + j, e);
            sum = _mm512_add_ps(sum, e);
        }
        __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        for (int64_t j = 0; j < n[r]; j += 16) {
            __mmask16 m = lanes(n[r] - j);
            __m256i b = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(sr + j), inv));
            _mm256_mask_storeu_epi16(pr + j, m, b);
        }
        for (int64_t j = n[r]; j < pend; j++) pr[j] = 0;
    }
    for (int r = rows; r < all; r++) memset(p + r * Lp, 0, sizeof(uint16_t) * (size_t)pend);
}

/* rows r (n[r] keys each, at most nmax) of one KV head: qs[r] are bf16 pairs, pre-scaled */
static void tile(const uint32_t *const *qs, const int64_t *n, int rows, int64_t nmax, const uint32_t *kt,
                 const uint32_t *vp, float *s, uint16_t *p, int64_t Lp, uint16_t *const *out) {
    int64_t end = (nmax + KEYS - 1) / KEYS * KEYS;
    for (int64_t k0 = 0; k0 < end; k0 += KEYS) {
        __m512 acc[ROWS][4];
        for (int r = 0; r < ROWS; r++)
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
        const uint32_t *kg = kt + (k0 / 16) * PAIRS * 16;
        for (int j = 0; j < PAIRS; j++) {
            __m512bh kv[4];
            for (int c = 0; c < 4; c++) kv[c] = (__m512bh)_mm512_loadu_si512(kg + (c * PAIRS + j) * 16);
            for (int r = 0; r < ROWS; r++) {
                __m512bh qb = (__m512bh)_mm512_set1_epi32((int)qs[r][j]);
                for (int c = 0; c < 4; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qb, kv[c]);
            }
        }
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(s + r * Lp + k0 + 16 * c, acc[r][c]);
    }
    int64_t pend = (nmax + 1) / 2 * 2;
    probabilities(s, p, n, rows, ROWS, pend, Lp);
    __m512 acc[ROWS][4];
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t m = 0; m < pend / 2; m++) {
        __m512bh vv[4];
        for (int c = 0; c < 4; c++) vv[c] = (__m512bh)_mm512_loadu_si512(vp + m * HD + 16 * c);
        for (int r = 0; r < ROWS; r++) {
            __m512bh pb = (__m512bh)_mm512_set1_epi32(((const int32_t *)(p + r * Lp))[m]);
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pb, vv[c]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < 4; c++) _mm256_storeu_si256((__m256i *)(out[r] + 16 * c), (__m256i)_mm512_cvtneps_pbh(acc[r][c]));
}

#if HAVE_AMX
#define AMX_ROWS 16

/* as tile(), 16 rows on the tile unit: tmm0-1 the queries (or tmm0 the probabilities), tmm2-3 keys or
   values, tmm4-7 the output's four 16-column blocks. qb: [16, 64] bf16, o: [16, 64] floats. */
static void tile_amx(const uint32_t *const *qs, const int64_t *n, int rows, int64_t nmax, const uint32_t *kt,
                     const uint32_t *vp, float *s, uint16_t *p, int64_t Lp, uint16_t *const *out, uint16_t *qb,
                     float *o) {
    for (int r = 0; r < AMX_ROWS; r++) memcpy(qb + r * HD, qs[r], HD * sizeof(uint16_t));
    _tile_loadd(0, qb, HD * 2);
    _tile_loadd(1, qb + PAIRS, HD * 2);
    for (int64_t g = 0; g < (nmax + 15) / 16; g++) {
        _tile_zero(4);
        _tile_loadd(2, kt + g * PAIRS * 16, 64);
        _tile_loadd(3, kt + (g * PAIRS + 16) * 16, 64);
        _tile_dpbf16ps(4, 0, 2);
        _tile_dpbf16ps(4, 1, 3);
        _tile_stored(4, s + g * 16, Lp * sizeof(float));
    }
    int64_t pend = (nmax + 31) / 32 * 32;
    probabilities(s, p, n, rows, AMX_ROWS, pend, Lp);
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int64_t k0 = 0; k0 < pend; k0 += 32) {
        const uint32_t *vb = vp + (k0 / 2) * HD;
        _tile_loadd(0, p + k0, Lp * sizeof(uint16_t));
        _tile_loadd(2, vb, HD * 4);
        _tile_loadd(3, vb + 16, HD * 4);
        _tile_dpbf16ps(4, 0, 2);
        _tile_dpbf16ps(5, 0, 3);
        _tile_loadd(2, vb + 32, HD * 4);
        _tile_loadd(3, vb + 48, HD * 4);
        _tile_dpbf16ps(6, 0, 2);
        _tile_dpbf16ps(7, 0, 3);
    }
    _tile_stored(4, o, HD * 4);
    _tile_stored(5, o + 16, HD * 4);
    _tile_stored(6, o + 32, HD * 4);
    _tile_stored(7, o + 48, HD * 4);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < 4; c++)
            _mm256_storeu_si256((__m256i *)(out[r] + 16 * c), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(o + r * HD + 16 * c)));
}
#endif

/* 1 where this library was built for AMX and the kernel lets this process use its tiles, else 0 */
int prefill_attention_amx(void) { return amx_granted(); }

int prefill_attention_bf16(int64_t T, const uint16_t *q, int64_t q_stride, const uint16_t *kc, const uint16_t *vc,
                           int64_t ctx, int64_t L, uint16_t *out, int64_t H, int64_t Hkv, float scale, int amx,
                           int threads) {
    int64_t G = H / Hkv;
    if (T < 1 || L < T || L > ctx || G * Hkv != H || (amx && !prefill_attention_amx())) return -1;
#if HAVE_AMX
    const int per = amx ? AMX_ROWS : ROWS;  /* query rows a tile */
#else
    const int per = ROWS;
#endif
    int64_t Lp = (L + KEYS - 1) / KEYS * KEYS, R = G * T, tiles = (R + per - 1) / per;
    size_t head = sizeof(uint32_t) * (size_t)(Lp * PAIRS * 2);
    char *mem = grow(head * (size_t)Hkv + sizeof(uint16_t) * (size_t)(T * H * HD));
    if (!mem) return -1;
    uint16_t *qs = (uint16_t *)(mem + head * (size_t)Hkv);
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t u = 0; u < Hkv * (Lp / KEYS); u++) {
            int64_t h = u / (Lp / KEYS);
            uint32_t *kt = (uint32_t *)(mem + head * (size_t)h);
            layout(kc + h * ctx * HD, vc + h * ctx * HD, L, (u % (Lp / KEYS)) * KEYS, kt, kt + Lp * PAIRS);
        }
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++)
            for (int64_t i = 0; i < H * HD; i += 16) {  /* q * scale, rounded back to bf16 as torch's q * scale is */
                __m512 x = _mm512_mul_ps(widen(_mm256_loadu_si256((const __m256i *)(q + t * q_stride + i))), _mm512_set1_ps(scale));
                _mm256_storeu_si256((__m256i *)(qs + t * H * HD + i), (__m256i)_mm512_cvtneps_pbh(x));
            }
        float *s = malloc(sizeof(float) * (size_t)(per * Lp + 16 * HD));  /* scores, then tile_amx's output */
        uint16_t *p = malloc(sizeof(uint16_t) * (size_t)(per * Lp + 16 * HD));  /* probabilities, then its queries */
        if (!s || !p) {
            #pragma omp atomic write
            failed = 1;
        }
#if HAVE_AMX
        if (amx) tile_config();
#endif
        #pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < Hkv * tiles; u++) {
            if (!s || !p) continue;
            int64_t h = u / tiles, r0 = (u % tiles) * per;
            int rows = (int)(R - r0 < per ? R - r0 : per);
            const uint32_t *qr[16];
            uint16_t *o[16];
            int64_t n[16], nmax = 0;
            for (int r = 0; r < per; r++) {
                int64_t row = r0 + (r < rows ? r : 0), t = row / G, g = row % G;  /* rows ordered (token, group) */
                qr[r] = (const uint32_t *)(qs + (t * H + h * G + g) * HD);
                o[r] = out + (t * H + h * G + g) * HD;
                n[r] = L - T + t + 1;
                if (r < rows && n[r] > nmax) nmax = n[r];
            }
            const uint32_t *kt = (const uint32_t *)(mem + head * (size_t)h);
#if HAVE_AMX
            if (amx) {
                tile_amx(qr, n, rows, nmax, kt, kt + Lp * PAIRS, s, p, Lp, o, p + per * Lp, s + per * Lp);
                continue;
            }
#endif
            tile(qr, n, rows, nmax, kt, kt + Lp * PAIRS, s, p, Lp, o);
        }
#if HAVE_AMX
        if (amx) _tile_release();
#endif
        free(s);
        free(p);
    }
    return failed ? -1 : 0;
}

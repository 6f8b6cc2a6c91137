/* minquant's CPU kernels for 2-, 4- and 8-bit weights: y = x @ dequant(W)^T for a few rows, and
 * dequantization into a float buffer for many rows. Built at first use by minquant/kernels/cpu.py
 * with the machine's C compiler (the one torch.compile's CPU backend also needs) and cached on disk.
 *
 * Layout (made once per layer by cpu.py from the GPTQ buffers): the packed words are cut into tiles
 * of NB output columns, and each tile's words are stored contiguously, row after row:
 *     qw[tile][r][c] = qweight[r][tile * NB + c]     r: packed row (32 / bits inputs), c < NB
 * so one thread streams through memory in order instead of touching one page per row.
 * scales s and zs = zero * scale are fp32 (G, N_pad); N_pad is N rounded up to a whole tile.
 *
 * Per group g and column n:  sum_k x_k (q_kn - z_gn) s_gn = s_gn * sum_k x_k q_kn - zs_gn * sum_k x_k,
 * so the inner loop is one AND, one int->float conversion and one FMA per weight, on VW columns at
 * once; the scale and zero are applied once per column per group. The AND leaves value j of a word
 * in place, i.e. q * 2^(bits j): x_k is multiplied by 2^-(bits j) once per call instead (exact: a
 * power of two), and the top value takes a shift, since its AND would set the sign bit.
 *
 * Each column's sum runs in the same order whatever the vector width (lanes are columns), so an
 * AVX2 and an AVX-512 build give the same bits.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef VW
#define VW 8   /* floats per vector: 16 on AVX-512, 8 on AVX2 (cpu.py passes -DVW=...) */
#endif
#ifndef NV
#define NV 4   /* vectors per tile row: NB = VW * NV columns per tile */
#endif
#define NB (VW * NV)
#define MR_MAX 4
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 8
#endif /* rows of x per pass: MR_MAX * NV accumulators stay in registers */

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));

int mq_tile_columns(void) { return NB; }

/* x (M, K) -> xp (M, K): x_k * 2^-(bits (k mod vpw)) except the top value of each word, and
 * xs (M, G): the sum of x over each group. */
static void prescale(int bits, int M, int K, int gs, const float* x, float* xp, float* xs) {
    const int vpw = 32 / bits, G = K / gs;
    float step[16];
    for (int j = 0; j < vpw; j++) step[j] = (j == vpw - 1) ? 1.0f : 1.0f / (float)(1u << (bits * j));
    for (int m = 0; m < M; m++) {
        const float* xm = x + (int64_t)m * K;
        float* xpm = xp + (int64_t)m * K;
        for (int k0 = 0; k0 < K; k0 += vpw)
            for (int j = 0; j < vpw; j++) xpm[k0 + j] = xm[k0 + j] * step[j];
        for (int g = 0; g < G; g++) {
            float sum = 0.0f;
            for (int k = g * gs; k < (g + 1) * gs; k++) sum += xm[k];
            xs[(int64_t)m * G + g] = sum;
        }
    }
}

/* MR rows of y for one tile: the whole of K, so no other thread touches these outputs. */
static inline __attribute__((always_inline)) void gemv_tile(const int MR, const int bits, int K, int N, int gs,
        const float* xp, const float* xs, const int32_t* qw_tile, const float* s, const float* zs,
        const float* bias, float* out, int n0) {
    const int vpw = 32 / bits, wpg = gs / vpw, G = K / gs;
    vf total[MR_MAX][NV];
    for (int v = 0; v < NV; v++) {
        vf b = {0};
        if (bias) memcpy(&b, bias + n0 + v * VW, sizeof b);
        for (int m = 0; m < MR; m++) total[m][v] = b;
    }
    for (int g = 0; g < G; g++) {
        vf acc[MR_MAX][NV];
        for (int m = 0; m < MR; m++) for (int v = 0; v < NV; v++) acc[m][v] = (vf){0};
        for (int r = g * wpg; r < (g + 1) * wpg; r++) {
            vi w[NV];
            memcpy(w, qw_tile + (int64_t)r * NB, sizeof w);
            for (int c = 0; c < NB; c += 16)  /* a few rows ahead: the hardware prefetcher alone falls behind */
                __builtin_prefetch(qw_tile + (int64_t)(r + PREFETCH_ROWS) * NB + c, 0, 0);
            const float* xr = xp + (int64_t)r * vpw;
            for (int j = 0; j < vpw; j++) {
                vf q[NV];
                for (int v = 0; v < NV; v++)
                    q[v] = (j == vpw - 1) ? __builtin_convertvector((vi)((vu)w[v] >> (32 - bits)), vf)
                                          : __builtin_convertvector(w[v] & (((1 << bits) - 1) << (bits * j)), vf);
                for (int m = 0; m < MR; m++) {
                    const float xv = xr[(int64_t)m * K + j];
                    for (int v = 0; v < NV; v++) acc[m][v] += xv * q[v];
                }
            }
        }
        for (int v = 0; v < NV; v++) {
            vf sg, zg;
            memcpy(&sg, s + (int64_t)g * N + n0 + v * VW, sizeof sg);
            memcpy(&zg, zs + (int64_t)g * N + n0 + v * VW, sizeof zg);
            for (int m = 0; m < MR; m++) total[m][v] += sg * acc[m][v] - zg * xs[(int64_t)m * G + g];
        }
    }
    for (int m = 0; m < MR; m++) memcpy(out + (int64_t)m * N + n0, total[m], sizeof total[m]);
}

static inline __attribute__((always_inline)) void gemv_bits(const int bits, int M, int K, int N, int gs,
        const float* xp, const float* xs, const int32_t* qw, const float* s, const float* zs, const float* bias,
        float* out, int nthreads) {
    const int tiles = N / NB, G = K / gs;
    const int64_t tile_words = (int64_t)K / (32 / bits) * NB;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int t = 0; t < tiles; t++) {
        for (int m0 = 0; m0 < M; m0 += MR_MAX) {  /* each pass over the tile's words serves MR_MAX rows */
            const float* xp_m = xp + (int64_t)m0 * K;
            const float* xs_m = xs + (int64_t)m0 * G;
            float* out_m = out + (int64_t)m0 * N;
            const int32_t* qw_t = qw + t * tile_words;
            switch (M - m0 < MR_MAX ? M - m0 : MR_MAX) {
                case 1: gemv_tile(1, bits, K, N, gs, xp_m, xs_m, qw_t, s, zs, bias, out_m, t * NB); break;
                case 2: gemv_tile(2, bits, K, N, gs, xp_m, xs_m, qw_t, s, zs, bias, out_m, t * NB); break;
                case 3: gemv_tile(3, bits, K, N, gs, xp_m, xs_m, qw_t, s, zs, bias, out_m, t * NB); break;
                default: gemv_tile(4, bits, K, N, gs, xp_m, xs_m, qw_t, s, zs, bias, out_m, t * NB); break;
            }
        }
    }
}

/* y (M, N_pad) = x (M, K) @ dequant(W)^T (+ bias (N_pad), or NULL).
 * Returns 0, -1 for bits it has no copy for, -2 out of memory. */
int mq_gemv(int bits, int M, int K, int N, int gs, const float* x, const int32_t* qw, const float* s,
            const float* zs, const float* bias, float* out, int nthreads) {
    if (bits != 2 && bits != 4 && bits != 8) return -1;
    float* xp = malloc(sizeof(float) * ((size_t)M * K + (size_t)M * (K / gs)));
    if (!xp) return -2;
    float* xs = xp + (int64_t)M * K;
    prescale(bits, M, K, gs, x, xp, xs);
    switch (bits) {  /* bits a constant in each copy: the masks and loop counts fold away */
        case 2: gemv_bits(2, M, K, N, gs, xp, xs, qw, s, zs, bias, out, nthreads); break;
        case 4: gemv_bits(4, M, K, N, gs, xp, xs, qw, s, zs, bias, out, nthreads); break;
        default: gemv_bits(8, M, K, N, gs, xp, xs, qw, s, zs, bias, out, nthreads); break;
    }
    free(xp);
    return 0;
}

static inline __attribute__((always_inline)) void dequant_bits(const int bits, int K, int N, int gs,
        const int32_t* qw, const float* s, const float* z, float* wt, int nthreads) {
    const int vpw = 32 / bits, tiles = N / NB, rows = K / vpw;
    /* by packed rows: each thread writes whole rows of wt in order (by tiles it would write a strip of
     * every row, a new page each time); reading a tile's row is 8x fewer bytes, so its stride costs less */
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int r = 0; r < rows; r++) {
        const int g = r * vpw / gs;
        for (int t = 0; t < tiles; t++) {
            for (int v = 0; v < NV; v++) {
                vi w; vf sg, zg;
                memcpy(&w, qw + ((int64_t)t * rows + r) * NB + v * VW, sizeof w);
                memcpy(&sg, s + (int64_t)g * N + t * NB + v * VW, sizeof sg);
                memcpy(&zg, z + (int64_t)g * N + t * NB + v * VW, sizeof zg);
                for (int j = 0; j < vpw; j++) {
                    vf q = __builtin_convertvector((vi)(((vu)w >> (bits * j)) & ((1u << bits) - 1)), vf);
                    vf y = (q - zg) * sg;  /* as the reference rounds it: q - z is exact */
                    memcpy(wt + ((int64_t)r * vpw + j) * N + t * NB + v * VW, &y, sizeof y);
                }
            }
        }
    }
}

/* wt (K, N_pad) = dequant(W)^T in fp32, for a float matmul at large batch; z: the zero-points (G, N_pad). */
int mq_dequant(int bits, int K, int N, int gs, const int32_t* qw, const float* s, const float* z, float* wt,
               int nthreads) {
    switch (bits) {
        case 2: dequant_bits(2, K, N, gs, qw, s, z, wt, nthreads); return 0;
        case 4: dequant_bits(4, K, N, gs, qw, s, z, wt, nthreads); return 0;
        case 8: dequant_bits(8, K, N, gs, qw, s, z, wt, nthreads); return 0;
        default: return -1;
    }
}

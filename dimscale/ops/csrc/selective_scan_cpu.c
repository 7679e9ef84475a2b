/* Selective scan (Mamba-1 S6) for CPUs: one fused forward and a recomputing backward.
 *
 * For each batch row b and channel d (docs/reference.md §1.6; mamba-ssm `selective_scan_ref`):
 *     dt_t = softplus(delta_t + bias)                    (bias and softplus optional)
 *     h_t  = exp(dt_t A) * h_{t-1} + dt_t B_t u_t         (state (N,), fp32, h_{-1} = 0)
 *     out_t = (C_t . h_t + D u_t) * silu(z_t)             (D and z optional)
 * All tensors are fp32 and contiguous:
 *     u, delta, z, out: (Bt, L, D)   A2 = A log2(e): (N, D)   Bv, Cv: (Bt, L, N)   bias, Dv: (D,)
 *     states: (Bt, K+1, N, D), K = ceil(L / T) blocks of T steps; states[:, k] enters block k, states[:, K] is last.
 * The backward recomputes each block from its entering state (as mamba-ssm's CUDA kernel does) and runs the
 * adjoint scan g_{t-1} = a_t (g_t + C_t gy_t) backwards through it.
 *
 * Work is split over tiles of W channels; a thread owns whole tiles for every batch row, so per-channel
 * gradients (A, D, bias) have one writer, while dB and dC (sums over channels) go to per-thread partial sums
 * that the caller adds. Each tile's block is staged into small local arrays (W lanes, zero padded), so every
 * inner loop runs over a fixed W and the compiler vectorises it.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(LANES) || !defined(MAX_STATE)
#error "build with -DLANES=... -DMAX_STATE=... (dimscale/ops/scan_cpu.py sets them)"
#endif
#define W LANES
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

/* 2^x: round to the nearest integer k, e^(f ln 2) on f in [-1/2, 1/2] by its Taylor series to degree 7
 * (relative error < 1e-8, below fp32 rounding), times 2^k built in the exponent bits. Clamped to +-126 (a
 * decay that small is 0 to fp32 accuracy anyway). Branch-free, so loops over it vectorise. */
static inline float exp2_fast(float x) {
    x = x < -126.0f ? -126.0f : (x > 126.0f ? 126.0f : x);
    const float k = __builtin_rintf(x);
    const float f = (x - k) * LN2;
    float p = 1.0f / 5040.0f;
    p = p * f + 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    union { int32_t i; float f; } scale = { .i = ((int32_t)k + 127) << 23 };
    return p * scale.f;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp2_fast(-x * LOG2E)); }

/* softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1]; log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3,
 * by its odd series to s^15 (error < 1e-8). */
static inline float softplus(float x) {
    const float e = exp2_fast(-(x < 0.0f ? -x : x) * LOG2E);
    const float s = e / (2.0f + e), s2 = s * s;
    float p = 1.0f / 15.0f;
    p = p * s2 + 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return (x > 0.0f ? x : 0.0f) + 2.0f * s * p;
}

typedef struct {
    int64_t batch, L, D, N, T;
    int threads, use_softplus;
    const float *u, *delta, *bias, *A2, *Bv, *Cv, *Dv, *z;   /* bias, Dv, z may be NULL */
    float *out, *states;
    /* backward only; gB, gC: (threads, Bt, L, N) partial sums; gD, gz, gbias NULL when D, z, bias are */
    const float *gout, *glast;
    float *gu, *gdelta, *gA, *gB, *gC, *gD, *gz, *gbias;
} Args;

typedef struct { const Args *a; int id; } Job;

/* A tile's per-channel constants, zero padded to W lanes: A2 and A (N, W), bias and D (W). */
typedef struct { float A2[MAX_STATE * W], A[MAX_STATE * W], bias[W], D[W]; } Tile;   /* N <= MAX_STATE: the caller checks */

static void load_tile(Tile *c, const Args *a, int64_t d0, int64_t wn) {
    for (int w = 0; w < W; w++) {
        c->bias[w] = a->bias && w < wn ? a->bias[d0 + w] : 0.0f;
        c->D[w] = a->Dv && w < wn ? a->Dv[d0 + w] : 0.0f;
        for (int64_t n = 0; n < a->N; n++) {
            c->A2[n * W + w] = w < wn ? a->A2[n * a->D + d0 + w] : 0.0f;
            c->A[n * W + w] = c->A2[n * W + w] * LN2;   /* natural-log A, for d(dt A)/d dt */
        }
    }
}

/* Rows s..e of a (Bt, L, D) tensor, channels d0..d0+wn, into dst (T, W), zero padded. */
static void stage(float *dst, const float *src, const Args *a, int64_t b, int64_t s, int64_t e, int64_t d0,
                  int64_t wn) {
    for (int64_t t = s; t < e; t++) {
        float *row = dst + (t - s) * W;
        memcpy(row, src + (b * a->L + t) * a->D + d0, wn * sizeof(float));
        for (int64_t w = wn; w < W; w++) row[w] = 0.0f;
    }
}

/* The inverse of stage: the first wn lanes of src (T, W) into rows s..e of a (Bt, L, D) tensor. */
static void unstage(float *dst, const float *src, const Args *a, int64_t b, int64_t s, int64_t e, int64_t d0,
                    int64_t wn) {
    for (int64_t t = s; t < e; t++) memcpy(dst + (b * a->L + t) * a->D + d0, src + (t - s) * W, wn * sizeof(float));
}

/* The (N, W) state of tile d0 from / to states[b, k] of a (Bt, slots, N, D) tensor. */
static void load_state(float *h, const float *states, const Args *a, int64_t slots, int64_t b, int64_t k,
                       int64_t d0, int64_t wn) {
    const float *src = states + ((b * slots + k) * a->N) * a->D + d0;
    for (int64_t n = 0; n < a->N; n++) {
        memcpy(h + n * W, src + n * a->D, wn * sizeof(float));
        for (int64_t w = wn; w < W; w++) h[n * W + w] = 0.0f;
    }
}

static void store_state(float *states, const float *h, const Args *a, int64_t slots, int64_t b, int64_t k,
                        int64_t d0, int64_t wn) {
    float *dst = states + ((b * slots + k) * a->N) * a->D + d0;
    for (int64_t n = 0; n < a->N; n++) memcpy(dst + n * a->D, h + n * W, wn * sizeof(float));
}

/* Stages one tile's block of T steps: raw = delta + bias, dt, u (T, W). */
static void stage_inputs(const Args *a, const Tile *c, int64_t b, int64_t s, int64_t e, int64_t d0, int64_t wn,
                         float *restrict raw, float *restrict dt, float *restrict u) {
    stage(raw, a->delta, a, b, s, e, d0, wn);
    stage(u, a->u, a, b, s, e, d0, wn);
    for (int64_t t = 0; t < e - s; t++)
        for (int w = 0; w < W; w++) raw[t * W + w] += c->bias[w];
    if (a->use_softplus)
        for (int64_t i = 0; i < (e - s) * W; i++) dt[i] = softplus(raw[i]);
    else
        memcpy(dt, raw, sizeof(float) * (e - s) * W);
}

/* One tile's block of steps forward from state h (N, W), updated in place. Writes y = C . h + D u (T, W);
 * when H is given, also every state (T, N, W) and decay (T, N, W) for the backward. */
static void scan_block(const Args *a, const Tile *c, int64_t b, int64_t s, int64_t e, const float *restrict dt,
                       const float *restrict u, float *restrict h, float *restrict y, float *restrict H,
                       float *restrict dA) {
    const int64_t N = a->N;
    for (int64_t t = 0; t < e - s; t++) {
        const float *Bt = a->Bv + (b * a->L + s + t) * N, *Ct = a->Cv + (b * a->L + s + t) * N;
        const float *dtt = dt + t * W, *ut = u + t * W;
        float xu[W], acc[W];
        for (int w = 0; w < W; w++) {
            xu[w] = dtt[w] * ut[w];
            acc[w] = c->D[w] * ut[w];
        }
        for (int64_t n = 0; n < N; n++) {
            float *hn = h + n * W;
            const float *A2n = c->A2 + n * W;
            const float bn = Bt[n], cn = Ct[n];
            float an[W];
            for (int w = 0; w < W; w++) {
                an[w] = exp2_fast(dtt[w] * A2n[w]);
                hn[w] = an[w] * hn[w] + bn * xu[w];
                acc[w] += cn * hn[w];
            }
            if (H) {
                memcpy(H + (t * N + n) * W, hn, sizeof an);
                memcpy(dA + (t * N + n) * W, an, sizeof an);
            }
        }
        memcpy(y + t * W, acc, sizeof acc);
    }
}

static void *forward_worker(void *p) {
    const Job *job = p;
    const Args *a = job->a;
    const int64_t N = a->N, T = a->T, tiles = (a->D + W - 1) / W;
    const int64_t slots = a->L / T + (a->L % T != 0) + 1;
    Tile c;
    float *buf = malloc(sizeof(float) * (N * W + T * W * 5));
    float *h = buf, *raw = h + N * W, *dt = raw + T * W, *u = dt + T * W, *y = u + T * W, *z = y + T * W;
    for (int64_t tile = job->id; tile < tiles; tile += a->threads) {
        const int64_t d0 = tile * W, wn = a->D - d0 < W ? a->D - d0 : W;
        load_tile(&c, a, d0, wn);
        for (int64_t b = 0; b < a->batch; b++) {
            memset(h, 0, sizeof(float) * N * W);
            int64_t k = 0;
            for (int64_t s = 0; s < a->L; s += T, k++) {
                const int64_t e = s + T < a->L ? s + T : a->L;
                store_state(a->states, h, a, slots, b, k, d0, wn);
                stage_inputs(a, &c, b, s, e, d0, wn, raw, dt, u);
                scan_block(a, &c, b, s, e, dt, u, h, y, NULL, NULL);
                if (a->z) {
                    stage(z, a->z, a, b, s, e, d0, wn);
                    for (int64_t i = 0; i < (e - s) * W; i++) y[i] *= z[i] * sigmoid(z[i]);
                }
                unstage(a->out, y, a, b, s, e, d0, wn);
            }
            store_state(a->states, h, a, slots, b, k, d0, wn);
        }
    }
    free(buf);
    return NULL;
}

/* One step t of the adjoint scan for a tile. On entry g (N, W) is dL/dh_t carried from step t+1; adds the
 * direct C_t gy_t, writes dL/du_t and dL/ddt_t, accumulates dL/dA, dL/dB_t and dL/dC_t, and leaves
 * a_t g (dL/dh_{t-1}, carried) in g. H, Hprev, dA: this step's states, the previous states and decays (N, W). */
static void adjoint_step(int64_t N, float *restrict g, float *restrict gA, const float *restrict A,
                         const float *restrict H, const float *restrict Hprev, const float *restrict dA,
                         const float *restrict Bt, const float *restrict Ct, const float *restrict gy,
                         const float *restrict dt, const float *restrict u, float *restrict gB, float *restrict gC,
                         float *restrict gu, float *restrict gdt) {
    float xu[W], gxu[W] = {0}, gdA[W] = {0};
    for (int w = 0; w < W; w++) xu[w] = dt[w] * u[w];
    for (int64_t n = 0; n < N; n++) {
        float *restrict gn = g + n * W, *restrict gAn = gA + n * W;
        const float *restrict hn = H + n * W, *restrict an = dA + n * W, *restrict hp = Hprev + n * W;
        const float *restrict An = A + n * W;
        const float bn = Bt[n], cn = Ct[n];
        float sc = 0.0f, sb = 0.0f;
#pragma omp simd reduction(+ : sc, sb)
        for (int w = 0; w < W; w++) {
            const float gh = gn[w] + cn * gy[w];      /* dL/dh_t: carried + direct */
            const float x = gh * an[w] * hp[w];       /* dL/d(dt A) */
            sc += gy[w] * hn[w];                      /* dL/dC_t[n], this tile's part */
            sb += gh * xu[w];                         /* dL/dB_t[n] */
            gxu[w] += gh * bn;                        /* dL/d(dt u) */
            gdA[w] += x * An[w];
            gAn[w] += x * dt[w];
            gn[w] = gh * an[w];                       /* carried to h_{t-1} */
        }
        gC[n] += sc;
        gB[n] += sb;
    }
    for (int w = 0; w < W; w++) {
        gu[w] = gxu[w] * dt[w];
        gdt[w] = gdA[w] + gxu[w] * u[w];
    }
}

static void *backward_worker(void *p) {
    const Job *job = p;
    const Args *a = job->a;
    const int64_t N = a->N, T = a->T, tiles = (a->D + W - 1) / W;
    const int64_t K = a->L / T + (a->L % T != 0);
    Tile c;
    float *buf = malloc(sizeof(float) * (N * W * 4 + T * W * 9 + 2 * T * N * W));
    float *h0 = buf, *g = h0 + N * W, *gA = g + N * W, *hp = gA + N * W;
    float *raw = hp + N * W, *dt = raw + T * W, *u = dt + T * W, *y = u + T * W, *z = y + T * W, *gy = z + T * W;
    float *gu = gy + T * W, *gdt = gu + T * W, *gz = gdt + T * W, *H = gz + T * W, *dA = H + T * N * W;
    float *gB = a->gB + job->id * a->batch * a->L * N, *gC = a->gC + job->id * a->batch * a->L * N;
    for (int64_t tile = job->id; tile < tiles; tile += a->threads) {
        const int64_t d0 = tile * W, wn = a->D - d0 < W ? a->D - d0 : W;
        float gD[W] = {0}, gbias[W] = {0};
        load_tile(&c, a, d0, wn);
        memset(gA, 0, sizeof(float) * N * W);
        for (int64_t b = 0; b < a->batch; b++) {
            if (a->glast) load_state(g, a->glast, a, 1, b, 0, d0, wn);  /* glast: (Bt, 1, N, D) */
            else memset(g, 0, sizeof(float) * N * W);
            for (int64_t k = K - 1; k >= 0; k--) {
                const int64_t s = k * T, e = s + T < a->L ? s + T : a->L, n_t = e - s;
                load_state(h0, a->states, a, K + 1, b, k, d0, wn);
                memcpy(hp, h0, sizeof(float) * N * W);
                stage_inputs(a, &c, b, s, e, d0, wn, raw, dt, u);
                scan_block(a, &c, b, s, e, dt, u, hp, y, H, dA);
                stage(gy, a->gout, a, b, s, e, d0, wn);
                if (a->z) {                                     /* out = y silu(z) */
                    stage(z, a->z, a, b, s, e, d0, wn);
                    for (int64_t i = 0; i < n_t * W; i++) {
                        const float sz = sigmoid(z[i]);
                        gz[i] = gy[i] * y[i] * sz * (1.0f + z[i] * (1.0f - sz));
                        gy[i] *= z[i] * sz;
                    }
                    unstage(a->gz, gz, a, b, s, e, d0, wn);
                }
                for (int64_t t = n_t - 1; t >= 0; t--) {
                    const int64_t row = (b * a->L + s + t) * N;
                    adjoint_step(N, g, gA, c.A, H + t * N * W, t > 0 ? H + (t - 1) * N * W : h0, dA + t * N * W,
                                 a->Bv + row, a->Cv + row, gy + t * W, dt + t * W, u + t * W, gB + row, gC + row,
                                 gu + t * W, gdt + t * W);
                }
                if (a->use_softplus)                            /* softplus' = sigmoid */
                    for (int64_t i = 0; i < n_t * W; i++) gdt[i] *= sigmoid(raw[i]);
                for (int64_t t = 0; t < n_t; t++)
                    for (int w = 0; w < W; w++) {
                        gD[w] += gy[t * W + w] * u[t * W + w];  /* y = ... + D u */
                        gu[t * W + w] += gy[t * W + w] * c.D[w];
                        gbias[w] += gdt[t * W + w];
                    }
                unstage(a->gu, gu, a, b, s, e, d0, wn);
                unstage(a->gdelta, gdt, a, b, s, e, d0, wn);
            }
        }
        for (int64_t w = 0; w < wn; w++) {
            for (int64_t n = 0; n < N; n++) a->gA[n * a->D + d0 + w] = gA[n * W + w];
            if (a->gD) a->gD[d0 + w] = gD[w];
            if (a->gbias) a->gbias[d0 + w] = gbias[w];
        }
    }
    free(buf);
    return NULL;
}

static void run(Args *a, void *(*worker)(void *)) {
    pthread_t tid[256];
    Job jobs[256];
    for (int i = 0; i < a->threads; i++) {
        jobs[i] = (Job){a, i};
        if (i > 0) pthread_create(&tid[i], NULL, worker, &jobs[i]);
    }
    worker(&jobs[0]);
    for (int i = 1; i < a->threads; i++) pthread_join(tid[i], NULL);
}

/* Entry points (ctypes). `threads` must be in [1, min(256, ceil(D / 16))]: the caller sizes the gB/gC
 * partials by it. */
void scan_forward(int64_t batch, int64_t L, int64_t D, int64_t N, int64_t T, int threads, int use_softplus,
                  const float *u, const float *delta, const float *bias, const float *A2, const float *Bv,
                  const float *Cv, const float *Dv, const float *z, float *out, float *states) {
    Args a = {batch, L, D, N, T, threads, use_softplus, u, delta, bias, A2, Bv, Cv, Dv, z, out, states,
              NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    run(&a, forward_worker);
}

void scan_backward(int64_t batch, int64_t L, int64_t D, int64_t N, int64_t T, int threads, int use_softplus,
                   const float *u, const float *delta, const float *bias, const float *A2, const float *Bv,
                   const float *Cv, const float *Dv, const float *z, const float *states, const float *gout,
                   const float *glast, float *gu, float *gdelta, float *gA, float *gB, float *gC, float *gD,
                   float *gz, float *gbias) {
    Args a = {batch, L, D, N, T, threads, use_softplus, u, delta, bias, A2, Bv, Cv, Dv, z, NULL, (float *)states,
              gout, glast, gu, gdelta, gA, gB, gC, gD, gz, gbias};
    run(&a, backward_worker);
}

/* The Mamba block's two sequential pieces fused for CPUs, forward and backward, one row of the batch at a time:
 *
 *   the selective scan   dt_j = softplus(delta_j + delta_bias)   (each step optional, as in mamba-ssm's kernel)
 *                        h_j = exp(dt_j * A) * h_j-1 + dt_j * u_j * B_j,   y_j = (C_j . h_j + D * u_j) * silu(z_j)
 *   the causal conv      v_j = silu(bias + sum_s w_K-1-s * u_j-s)   (depthwise over rounds, s = 0..K-1)
 *
 * A row's scan states [L, M, d] stay in the core's cache and are never written to memory: the forward keeps only h,
 * the backward recomputes the row's states before walking back through them (as mamba-ssm's CUDA kernel does). The
 * PyTorch loop instead makes about ten passes over [b, d, M] tensors per round, forward and backward.
 *
 * cpu_kernels.py compiles this once per scalar type (SCALAR float or double; EXP, LOG1P the matching libm names;
 * -ffast-math lets GCC call glibc's vectorised versions). Layouts, row-major: u, delta, gu, gdelta [b, L, d];
 * y, z, gy, gz [b, L, d], or [b, d] when only the last round is read (last_only); B, C, gB, gC [b, L, M]. The b rows
 * are G groups of `group_rows` consecutive rows (several layers' learners in one call, one group each), and each
 * group has its own parameters: A_t [G, M, d] (A transposed), D, delta_bias [G, d], w [G, d, K], bias [G, d].
 * delta_bias and z may be NULL (not used). The inner loops run over the d channels, contiguous in every array, so
 * they vectorise. Gradients of the parameters (gA, gD, gdelta_bias, gw, gbias) are summed into one slice per thread
 * (*_parts [threads, G, ...], zeros from the caller), which the caller adds up.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

typedef SCALAR S;

/* exp for float as a polynomial GCC inlines and vectorises with the loop around it: glibc's vectorised expf is a call
 * per 8 values, and was half of the forward's time. x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so n ln2 is
 * exact), e^r by its Taylor series to r^7 (relative error below 1e-8 there), times 2^n built in the exponent bits.
 * x is clamped to [-87, 88], where 2^n stays a normal float. */
static inline float fast_expf(float x) {
  x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
  float n = __builtin_rintf(x * 1.44269504088896341f);
  float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  union { int i; float f; } scale = {.i = ((int)n + 127) << 23};
  return p * scale.f;
}

#define ROW(x, r, j, width) ((x) + ((r) * L + (j)) * (width)) /* row r, round j of a [b, L, width] array */
/* row r, round j of an array in y's layout: [b, L, d], or [b, d] holding the last round alone (last_only) */
#define OUT(x, r, j) (last_only ? (x) + (r) * d : ROW(x, r, j, d))
#define READ(j) (!last_only || (j) == L - 1) /* whether round j's output is read */

static inline S sigmoid(S x) { return 1 / (1 + EXP(-x)); }

/* dt_j: delta_j (+ delta_bias), through softplus if asked (PyTorch's: x above 20 passes as it is). */
static void step_sizes(const S *restrict delta_j, const S *restrict delta_bias, int softplus, S *restrict dt_j,
                       long d) {
  for (long c = 0; c < d; c++) {
    S x = delta_j[c] + (delta_bias ? delta_bias[c] : 0);
    dt_j[c] = softplus && x <= 20 ? LOG1P(EXP(x)) : x;
  }
}

void scan_forward(const S *restrict u, const S *restrict delta, const S *restrict delta_bias, int softplus,
                  const S *restrict A_t, const S *restrict B, const S *restrict C, const S *restrict D,
                  const S *restrict z, S *restrict y, long b, long L, long d, long M, long group_rows,
                  int last_only, int threads) {
#pragma omp parallel num_threads(threads)
  {
    S *restrict h = malloc(M * d * sizeof(S)), *restrict dt_j = malloc(d * sizeof(S));
#pragma omp for schedule(static)
    for (long r = 0; r < b; r++) {
      long g = r / group_rows; /* the row's group: its parameters */
      const S *restrict A_g = A_t + g * M * d, *restrict D_g = D + g * d;
      const S *restrict bias_g = delta_bias ? delta_bias + g * d : NULL;
      memset(h, 0, M * d * sizeof(S));
      for (long j = 0; j < L; j++) {
        const S *restrict u_j = ROW(u, r, j, d), *restrict B_j = ROW(B, r, j, M), *restrict C_j = ROW(C, r, j, M);
        int read = READ(j);
        S *restrict y_j = OUT(y, r, j);
        step_sizes(ROW(delta, r, j, d), bias_g, softplus, dt_j, d);
        if (read)
          for (long c = 0; c < d; c++) y_j[c] = D_g[c] * u_j[c];
        for (long m = 0; m < M; m++) {
          S *restrict h_m = h + m * d;
          const S *restrict A_m = A_g + m * d;
          S B_jm = B_j[m], C_jm = C_j[m];
          for (long c = 0; c < d; c++) h_m[c] = EXP(dt_j[c] * A_m[c]) * h_m[c] + dt_j[c] * u_j[c] * B_jm;
          if (read)
            for (long c = 0; c < d; c++) y_j[c] += C_jm * h_m[c];
        }
        if (read && z) {
          const S *restrict z_j = OUT(z, r, j);
          for (long c = 0; c < d; c++) y_j[c] *= z_j[c] * sigmoid(z_j[c]);
        }
      }
    }
    free(h);
    free(dt_j);
  }
}

/* The gradients of sum(gy * y) with respect to every input of scan_forward (gz only where z is given). The
 * recurrence of each state m is independent of the others, so each row is walked one state at a time: the round's
 * dA and h of that state are recomputed ([L, d], in L1), then walked back. */
void scan_backward(const S *restrict u, const S *restrict delta, const S *restrict delta_bias, int softplus,
                   const S *restrict A_t, const S *restrict B, const S *restrict C, const S *restrict D,
                   const S *restrict z, const S *restrict gy, S *restrict gu, S *restrict gdelta,
                   S *restrict gdelta_bias_parts, S *restrict gA_parts, S *restrict gB, S *restrict gC,
                   S *restrict gD_parts, S *restrict gz, long b, long L, long d, long M, long group_rows,
                   int last_only, int threads) {
  long G = b / group_rows;
#pragma omp parallel num_threads(threads)
  {
    /* per row [L, d]: dt, dt * u, the gated gy, the ungated output y0, and the gradients w.r.t. dt * u and dt */
    S *restrict dt = malloc(L * d * sizeof(S)), *restrict dtu = malloc(L * d * sizeof(S));
    S *restrict gyg = malloc(L * d * sizeof(S)), *restrict y0 = malloc(L * d * sizeof(S));
    S *restrict gdtu = malloc(L * d * sizeof(S)), *restrict gdt = malloc(L * d * sizeof(S));
    /* per state m: dA[j][c], h[j][c], and gh = dLoss/dh_j carried back through dA_j+1 */
    S *restrict dA = malloc(L * d * sizeof(S)), *restrict h = malloc(L * d * sizeof(S));
    S *restrict gh = malloc(d * sizeof(S));
    long thread = omp_get_thread_num();
#pragma omp for schedule(static)
    for (long r = 0; r < b; r++) {
      long g = r / group_rows; /* the row's group: its parameters and their gradients' slices */
      const S *restrict A_g = A_t + g * M * d, *restrict D_g = D + g * d;
      const S *restrict bias_g = delta_bias ? delta_bias + g * d : NULL;
      S *restrict gA = gA_parts + (thread * G + g) * M * d, *restrict gD = gD_parts + (thread * G + g) * d;
      S *restrict gdelta_bias = gdelta_bias_parts + (thread * G + g) * d;
      for (long j = 0; j < L; j++) {
        const S *restrict u_j = ROW(u, r, j, d);
        int read = READ(j);
        const S *restrict gy_j = read ? OUT(gy, r, j) : NULL;
        const S *restrict z_j = read && z ? OUT(z, r, j) : NULL;
        step_sizes(ROW(delta, r, j, d), bias_g, softplus, dt + j * d, d);
        for (long c = 0; c < d; c++) {
          dtu[j * d + c] = dt[j * d + c] * u_j[c];
          gyg[j * d + c] = !read ? 0 : z_j ? gy_j[c] * z_j[c] * sigmoid(z_j[c]) : gy_j[c];
          y0[j * d + c] = D_g[c] * u_j[c];
          gdtu[j * d + c] = gdt[j * d + c] = 0;
        }
      }
      for (long m = 0; m < M; m++) {
        const S *restrict A_m = A_g + m * d;
        S *restrict gA_m = gA + m * d;
        for (long j = 0; j < L; j++) { /* the forward of state m */
          S B_jm = ROW(B, r, j, M)[m], C_jm = ROW(C, r, j, M)[m];
          S *restrict dA_j = dA + j * d, *restrict h_j = h + j * d, *restrict y0_j = y0 + j * d;
          const S *restrict dt_j = dt + j * d, *restrict dtu_j = dtu + j * d;
          if (j) {
            const S *restrict h_prev = h_j - d;
            for (long c = 0; c < d; c++) {
              dA_j[c] = EXP(dt_j[c] * A_m[c]);
              h_j[c] = dA_j[c] * h_prev[c] + dtu_j[c] * B_jm;
              y0_j[c] += C_jm * h_j[c];
            }
          } else {
            for (long c = 0; c < d; c++) {
              dA_j[c] = EXP(dt_j[c] * A_m[c]);
              h_j[c] = dtu_j[c] * B_jm;
              y0_j[c] += C_jm * h_j[c];
            }
          }
        }
        memset(gh, 0, d * sizeof(S));
        for (long j = L - 1; j >= 0; j--) { /* and back */
          S B_jm = ROW(B, r, j, M)[m], C_jm = ROW(C, r, j, M)[m], gB_jm = 0, gC_jm = 0;
          const S *restrict dA_j = dA + j * d, *restrict h_j = h + j * d, *restrict gyg_j = gyg + j * d;
          const S *restrict dt_j = dt + j * d, *restrict dtu_j = dtu + j * d;
          S *restrict gdtu_j = gdtu + j * d, *restrict gdt_j = gdt + j * d;
          if (READ(j))
            for (long c = 0; c < d; c++) {
              gh[c] += gyg_j[c] * C_jm;
              gC_jm += gyg_j[c] * h_j[c];
            }
          if (j) {
            const S *restrict h_prev = h_j - d;
            for (long c = 0; c < d; c++) {
              S g_c = gh[c], q = g_c * dA_j[c] * h_prev[c]; /* q: dLoss/d(dt_j A) */
              gdtu_j[c] += g_c * B_jm;
              gB_jm += g_c * dtu_j[c];
              gdt_j[c] += q * A_m[c];
              gA_m[c] += q * dt_j[c];
              gh[c] = g_c * dA_j[c];
            }
          } else {
            for (long c = 0; c < d; c++) {
              gdtu_j[c] += gh[c] * B_jm;
              gB_jm += gh[c] * dtu_j[c];
            }
          }
          ROW(gC, r, j, M)[m] = gC_jm;
          ROW(gB, r, j, M)[m] = gB_jm;
        }
      }
      for (long j = 0; j < L; j++) {
        const S *restrict u_j = ROW(u, r, j, d), *restrict delta_j = ROW(delta, r, j, d);
        const S *restrict dt_j = dt + j * d, *restrict gyg_j = gyg + j * d;
        S *restrict gu_j = ROW(gu, r, j, d), *restrict gdelta_j = ROW(gdelta, r, j, d);
        for (long c = 0; c < d; c++) {
          S x = delta_j[c] + (bias_g ? bias_g[c] : 0);
          gdelta_j[c] = (gdt[j * d + c] + gdtu[j * d + c] * u_j[c]) * (softplus && x <= 20 ? sigmoid(x) : 1);
          gu_j[c] = gdtu[j * d + c] * dt_j[c] + gyg_j[c] * D_g[c];
          gD[c] += gyg_j[c] * u_j[c];
          gdelta_bias[c] += gdelta_j[c];
        }
        if (z && READ(j)) { /* the gate: silu'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z))) */
          const S *restrict gy_j = OUT(gy, r, j), *restrict z_j = OUT(z, r, j);
          S *restrict gz_j = OUT(gz, r, j);
          for (long c = 0; c < d; c++) {
            S sig = sigmoid(z_j[c]);
            gz_j[c] = gy_j[c] * y0[j * d + c] * sig * (1 + z_j[c] * (1 - sig));
          }
        }
      }
    }
    free(dt);
    free(dtu);
    free(gyg);
    free(y0);
    free(gdtu);
    free(gdt);
    free(dA);
    free(h);
    free(gh);
  }
}

void conv_silu_forward(const S *restrict u, const S *restrict w_all, const S *restrict bias_all, S *restrict v,
                       long b, long L, long d, long group_rows, long K, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long r = 0; r < b; r++) {
    const S *restrict w = w_all + r / group_rows * d * K, *restrict bias = bias_all + r / group_rows * d;
    for (long j = 0; j < L; j++) {
      S *restrict v_j = ROW(v, r, j, d);
      for (long c = 0; c < d; c++) v_j[c] = bias[c];
      for (long s = 0; s < K && s <= j; s++) {
        const S *restrict u_js = ROW(u, r, j - s, d);
        for (long c = 0; c < d; c++) v_j[c] += w[c * K + K - 1 - s] * u_js[c];
      }
      for (long c = 0; c < d; c++) v_j[c] *= sigmoid(v_j[c]);
    }
  }
}

/* The gradients of sum(gv * v) with respect to u (added into gu, zeros from the caller), w and bias; the
 * pre-activations are recomputed. */
void conv_silu_backward(const S *restrict u, const S *restrict w_all, const S *restrict bias_all,
                        const S *restrict gv, S *restrict gu, S *restrict gw_parts, S *restrict gbias_parts,
                        long b, long L, long d, long group_rows, long K, int threads) {
  long G = b / group_rows;
#pragma omp parallel num_threads(threads)
  {
    S *restrict ga = malloc(d * sizeof(S));
    long thread = omp_get_thread_num();
#pragma omp for schedule(static)
    for (long r = 0; r < b; r++) {
      long g = r / group_rows;
      const S *restrict w = w_all + g * d * K, *restrict bias = bias_all + g * d;
      S *restrict gw = gw_parts + (thread * G + g) * d * K, *restrict gbias = gbias_parts + (thread * G + g) * d;
      for (long j = 0; j < L; j++) {
        const S *restrict gv_j = ROW(gv, r, j, d);
        for (long c = 0; c < d; c++) ga[c] = bias[c];
        for (long s = 0; s < K && s <= j; s++) {
          const S *restrict u_js = ROW(u, r, j - s, d);
          for (long c = 0; c < d; c++) ga[c] += w[c * K + K - 1 - s] * u_js[c];
        }
        for (long c = 0; c < d; c++) { /* silu'(a) = sigmoid(a) * (1 + a * (1 - sigmoid(a))) */
          S sig = sigmoid(ga[c]);
          ga[c] = gv_j[c] * sig * (1 + ga[c] * (1 - sig));
          gbias[c] += ga[c];
        }
        for (long s = 0; s < K && s <= j; s++) {
          const S *restrict u_js = ROW(u, r, j - s, d);
          S *restrict gu_js = ROW(gu, r, j - s, d);
          for (long c = 0; c < d; c++) {
            gu_js[c] += w[c * K + K - 1 - s] * ga[c];
            gw[c * K + K - 1 - s] += ga[c] * u_js[c];
          }
        }
      }
    }
    free(ga);
  }
}

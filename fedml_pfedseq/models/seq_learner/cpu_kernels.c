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
 * y, z, gy, gz [b, L, d], or [b, d] when only the last round is read (last_only); A_t [M, d] (A transposed);
 * B, C, gB, gC [b, L, M]; D, delta_bias [d]; w [d, K]. delta_bias and z may be NULL (not used). The inner loops run
 * over the d channels, contiguous in every array, so they vectorise. Gradients of parameters shared by all rows
 * (gA, gD, gdelta_bias, gw, gbias) are summed into one slice per thread (*_parts, zeros from the caller), which the
 * caller adds up.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

typedef SCALAR S;
#define ROW(x, r, j, width) ((x) + ((r) * L + (j)) * (width)) /* row r, round j of a [b, L, width] array */

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
                  const S *restrict z, S *restrict y, long b, long L, long d, long M, int last_only, int threads) {
#pragma omp parallel num_threads(threads)
  {
    S *restrict h = malloc(M * d * sizeof(S)), *restrict dt_j = malloc(d * sizeof(S));
#pragma omp for schedule(static)
    for (long r = 0; r < b; r++) {
      memset(h, 0, M * d * sizeof(S));
      for (long j = 0; j < L; j++) {
        const S *restrict u_j = ROW(u, r, j, d), *restrict B_j = ROW(B, r, j, M), *restrict C_j = ROW(C, r, j, M);
        int read = !last_only || j == L - 1;
        S *restrict y_j = last_only ? y + r * d : ROW(y, r, j, d);
        step_sizes(ROW(delta, r, j, d), delta_bias, softplus, dt_j, d);
        if (read)
          for (long c = 0; c < d; c++) y_j[c] = D[c] * u_j[c];
        for (long m = 0; m < M; m++) {
          S *restrict h_m = h + m * d;
          const S *restrict A_m = A_t + m * d;
          for (long c = 0; c < d; c++) h_m[c] = EXP(dt_j[c] * A_m[c]) * h_m[c] + dt_j[c] * u_j[c] * B_j[m];
          if (read)
            for (long c = 0; c < d; c++) y_j[c] += C_j[m] * h_m[c];
        }
        if (read && z) {
          const S *restrict z_j = last_only ? z + r * d : ROW(z, r, j, d);
          for (long c = 0; c < d; c++) y_j[c] *= z_j[c] * sigmoid(z_j[c]);
        }
      }
    }
    free(h);
    free(dt_j);
  }
}

/* The gradients of sum(gy * y) with respect to every input of scan_forward (gz only where z is given). */
void scan_backward(const S *restrict u, const S *restrict delta, const S *restrict delta_bias, int softplus,
                   const S *restrict A_t, const S *restrict B, const S *restrict C, const S *restrict D,
                   const S *restrict z, const S *restrict gy, S *restrict gu, S *restrict gdelta,
                   S *restrict gdelta_bias_parts, S *restrict gA_parts, S *restrict gB, S *restrict gC,
                   S *restrict gD_parts, S *restrict gz, long b, long L, long d, long M, int last_only,
                   int threads) {
#pragma omp parallel num_threads(threads)
  {
    /* per row: dA[j][m][c], h[j][m][c] as the forward had them; dt[j][c]; the ungated output y0[j][c] */
    S *restrict dA = malloc(L * M * d * sizeof(S)), *restrict h = malloc(L * M * d * sizeof(S));
    S *restrict dt = malloc(L * d * sizeof(S)), *restrict y0 = malloc(L * d * sizeof(S));
    S *restrict g = malloc(M * d * sizeof(S)), *restrict gy_j = malloc(d * sizeof(S));
    S *restrict gdtu = malloc(d * sizeof(S)), *restrict gdt = malloc(d * sizeof(S));
    S *restrict dtu = malloc(d * sizeof(S));
    S *restrict gA = gA_parts + omp_get_thread_num() * M * d, *restrict gD = gD_parts + omp_get_thread_num() * d;
    S *restrict gdelta_bias = gdelta_bias_parts + omp_get_thread_num() * d;
#pragma omp for schedule(static)
    for (long r = 0; r < b; r++) {
      for (long j = 0; j < L; j++) { /* the forward again, keeping every round's states */
        const S *restrict u_j = ROW(u, r, j, d), *restrict B_j = ROW(B, r, j, M), *restrict C_j = ROW(C, r, j, M);
        S *restrict dt_j = dt + j * d, *restrict y0_j = y0 + j * d;
        int gated = z && (!last_only || j == L - 1); /* the gate's gradient needs y0 */
        step_sizes(ROW(delta, r, j, d), delta_bias, softplus, dt_j, d);
        if (gated)
          for (long c = 0; c < d; c++) y0_j[c] = D[c] * u_j[c];
        for (long m = 0; m < M; m++) {
          S *restrict dA_jm = dA + (j * M + m) * d, *restrict h_jm = h + (j * M + m) * d;
          const S *restrict A_m = A_t + m * d;
          for (long c = 0; c < d; c++) {
            dA_jm[c] = EXP(dt_j[c] * A_m[c]);
            h_jm[c] = dt_j[c] * u_j[c] * B_j[m];
          }
          if (j)
            for (long c = 0; c < d; c++) h_jm[c] += dA_jm[c] * h_jm[c - M * d];
          if (gated)
            for (long c = 0; c < d; c++) y0_j[c] += C_j[m] * h_jm[c];
        }
      }
      memset(g, 0, M * d * sizeof(S)); /* g = dLoss/dh_j, carried from round j+1 back through dA_j+1 */
      for (long j = L - 1; j >= 0; j--) {
        const S *restrict u_j = ROW(u, r, j, d), *restrict B_j = ROW(B, r, j, M), *restrict C_j = ROW(C, r, j, M);
        const S *restrict dt_j = dt + j * d, *restrict y0_j = y0 + j * d;
        int read = !last_only || j == L - 1;
        if (read) { /* the gate: y = y0 * silu(z), silu'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z))) */
          const S *restrict gy_r = last_only ? gy + r * d : ROW(gy, r, j, d);
          const S *restrict z_j = z ? (last_only ? z + r * d : ROW(z, r, j, d)) : NULL;
          S *restrict gz_j = z ? (last_only ? gz + r * d : ROW(gz, r, j, d)) : NULL;
          for (long c = 0; c < d; c++) {
            S sig = z ? sigmoid(z_j[c]) : 1;
            gy_j[c] = z ? gy_r[c] * z_j[c] * sig : gy_r[c];
            if (z) gz_j[c] = gy_r[c] * y0_j[c] * sig * (1 + z_j[c] * (1 - sig));
          }
        } else {
          memset(gy_j, 0, d * sizeof(S));
        }
        for (long c = 0; c < d; c++) {
          dtu[c] = dt_j[c] * u_j[c];
          gdtu[c] = gdt[c] = 0;
        }
        for (long m = 0; m < M; m++) {
          S *restrict g_m = g + m * d, *restrict gA_m = gA + m * d;
          const S *restrict dA_jm = dA + (j * M + m) * d, *restrict h_jm = h + (j * M + m) * d;
          const S *restrict h_prev = j ? h_jm - M * d : h_jm, *restrict A_m = A_t + m * d; /* h_-1 = 0 */
          S gC_jm = 0, gB_jm = 0;
          if (read)
            for (long c = 0; c < d; c++) {
              g_m[c] += gy_j[c] * C_j[m];
              gC_jm += gy_j[c] * h_jm[c];
            }
          for (long c = 0; c < d; c++) {
            S q = j ? g_m[c] * dA_jm[c] * h_prev[c] : 0; /* dLoss/d(dt_j A) */
            gdtu[c] += g_m[c] * B_j[m];
            gB_jm += g_m[c] * dtu[c];
            gdt[c] += q * A_m[c];
            gA_m[c] += q * dt_j[c];
            g_m[c] *= dA_jm[c];
          }
          ROW(gC, r, j, M)[m] = gC_jm;
          ROW(gB, r, j, M)[m] = gB_jm;
        }
        const S *restrict delta_j = ROW(delta, r, j, d);
        S *restrict gu_j = ROW(gu, r, j, d), *restrict gdelta_j = ROW(gdelta, r, j, d);
        for (long c = 0; c < d; c++) {
          S x = delta_j[c] + (delta_bias ? delta_bias[c] : 0);
          gdelta_j[c] = (gdt[c] + gdtu[c] * u_j[c]) * (softplus && x <= 20 ? sigmoid(x) : 1);
          gu_j[c] = gdtu[c] * dt_j[c] + gy_j[c] * D[c];
          gD[c] += gy_j[c] * u_j[c];
          gdelta_bias[c] += gdelta_j[c];
        }
      }
    }
    free(dA);
    free(h);
    free(dt);
    free(y0);
    free(g);
    free(gy_j);
    free(gdtu);
    free(gdt);
    free(dtu);
  }
}

void conv_silu_forward(const S *restrict u, const S *restrict w, const S *restrict bias, S *restrict v,
                       long b, long L, long d, long K, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long r = 0; r < b; r++)
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

/* The gradients of sum(gv * v) with respect to u (added into gu, zeros from the caller), w and bias; the
 * pre-activations are recomputed. */
void conv_silu_backward(const S *restrict u, const S *restrict w, const S *restrict bias, const S *restrict gv,
                        S *restrict gu, S *restrict gw_parts, S *restrict gbias_parts,
                        long b, long L, long d, long K, int threads) {
#pragma omp parallel num_threads(threads)
  {
    S *restrict ga = malloc(d * sizeof(S));
    S *restrict gw = gw_parts + omp_get_thread_num() * d * K, *restrict gbias = gbias_parts + omp_get_thread_num() * d;
#pragma omp for schedule(static)
    for (long r = 0; r < b; r++)
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
    free(ga);
  }
}

// Launchers of the CUDA backend's own kernels (kernels.cu, gemv.cu, attention.cu). Each takes raw device pointers,
// row strides in elements, and the stream; each checks its launch (QWEN_CUDA_LAUNCHED). Token ids, slots and
// positions are read on the device from StepParams, so every launcher is safe to record in a CUDA graph.
#pragma once

#include <vector>

#include "cuda/common.cuh"
#include "tensor.h"

namespace qwen {
namespace cuda {

// out F32 (T, H) = table[id of row t]                              table bf16 (vocab, H)
void launch_embed(float* out, int64_t ldo, const bf16* table, int64_t ldt, int64_t H, int64_t T,
                  const StepParams* params, cudaStream_t stream);

// out (rows, n) = x / sqrt(mean(x²) + eps) · w, per row; x F32, w F32 (n); out bf16 or F32.
void launch_rmsnorm(void* out, bool out_f32, int64_t ldo, const float* x, int64_t ldx, const float* w, int64_t n,
                    int64_t rows, float eps, cudaStream_t stream);

// Rotate-half RoPE in place on q (T, q_heads·hd) and k (T, k_heads·hd), bf16; row t at its position; cos, sin
// F32 (max_positions, hd/2) with row stride ldcs. Angles come from the float32 tables, the rotation in f32.
void launch_rope(bf16* q, int64_t ldq, int64_t q_heads, bf16* k, int64_t ldk, int64_t k_heads, int64_t hd,
                 const float* cos, const float* sin, int64_t ldcs, int64_t T, const StepParams* params,
                 cudaStream_t stream);

// Cache rows (slot · kv_heads + g) · max_pos + pos of row t ← k, v (T, kv_heads·hd) bf16.
void launch_kv_store(bf16* k_cache, bf16* v_cache, int64_t ldc, const bf16* k, int64_t ldk, const bf16* v,
                     int64_t ldv, int64_t kv_heads, int64_t hd, int64_t max_pos, int64_t T,
                     const StepParams* params, cudaStream_t stream);

// out bf16 (T, n) = silu(gate_up[:, :n]) · gate_up[:, n:], in f32.
void launch_silu_mul(bf16* out, int64_t ldo, const bf16* gate_up, int64_t ldg, int64_t n, int64_t T,
                     cudaStream_t stream);

// out (T, n) = src (T, n) F32 + bias (n) F32; out bf16 or F32 (an F32 out may be src itself).
void launch_add_bias(void* out, bool out_f32, int64_t ldo, const float* src, int64_t lds, const float* bias,
                     int64_t n, int64_t T, cudaStream_t stream);

// result[r] = argmax of row r of x (rows × n floats, row stride ldx), lowest index on ties, NaN never wins. Each
// row takes `blocks` blocks; the last of a row's blocks to finish reduces their partials and resets counters[r] to
// 0. part_v, part_i hold kArgmaxMaxBlocks entries, counters and result `rows`: blocks · rows <= kArgmaxMaxBlocks.
constexpr int kArgmaxMaxBlocks = 1024;
void launch_argmax(const float* x, int64_t ldx, int64_t n, int64_t rows, float* part_v, int32_t* part_i,
                   unsigned* counters, int32_t* result, int blocks, cudaStream_t stream);

// --- GEMV (one token): out (n) = W (n, k) · x (k) + bias, bf16 in, f32 accumulation --------------------------------
// Rows of W are read with 16-byte loads, so k and ldw must be multiples of 8 and W, x 16-byte aligned
// (gemv_supported). `warps_per_row` (1, 2, 4 or 8) splits each row's k across warps: more warps for short,
// wide matrices so the whole GPU streams. out is F32 (optionally += ) or bf16.
bool gemv_supported(const void* W, int64_t ldw, const void* x, int64_t k);
void launch_gemv(const bf16* W, int64_t ldw, const bf16* x, int64_t k, int64_t n, void* out, bool out_f32,
                 bool accumulate, const float* bias, int warps_per_row, cudaStream_t stream);
// A sensible split when nothing has been measured: enough warps in flight to cover `sms` multiprocessors. `units`
// are what one group of warps owns (rows; quantized: blocks of 4 rows), `chunks` a unit's bytes / 16.
int gemv_default_warps(int64_t units, int64_t chunks, int sms);

// --- quantized weights (tensor.h's Q8 / Q4 layout, the same bytes as on the host) ------------------------------
// One token: out (n) = W (n, k) · x (k) + bias, x bf16 and 16-byte aligned (qgemv_supported), f32 accumulation;
// each block of 4 rows split across `warps_per_block` (1, 2, 4 or 8) warps. out is F32 (optionally +=) or bf16.
bool qgemv_supported(const void* x, int64_t k);
void launch_qgemv(Format f, const uint8_t* W, const bf16* x, int64_t k, int64_t n, void* out, bool out_f32,
                  bool accumulate, const float* bias, int warps_per_block, cudaStream_t stream);
// out row t (of `rows`, row stride ldo) = row row0 + t of W, or with `ids` row (the token id of pass row t), as F32
// or bf16 (k values; nothing past k is written).
void launch_dequant(Format f, const uint8_t* W, int64_t k, int64_t row0, int64_t rows, void* out, bool out_f32,
                    int64_t ldo, const StepParams* ids, cudaStream_t stream);

// --- attention -------------------------------------------------------------------------------------------------
struct AttnArgs {
  const bf16* q;          // (T, heads·hd), row stride ldq
  int64_t ldq;
  const bf16* k_cache;    // (slots·kv_heads·max_pos, hd), row stride ldkv: [slot][kv head][position]
  const bf16* v_cache;
  int64_t ldkv;
  bf16* out;              // (T, heads·hd), row stride ldo
  int64_t ldo;
  int T, heads, kv_heads, group, hd, max_pos;
  int n_tiles;            // prefill only: tiles in StepParams
  float scale;
  const StepParams* params;
  // split-KV decode only
  float* part_o;          // (s_max, heads, hd): unnormalised partial outputs
  float* part_ml;         // (s_max, heads, 2): running max and sum of exponentials
  unsigned* counters;     // (kv_heads · n_hb), zero between launches
  int s_max, n_hb, min_chunk;
};
constexpr int kAttnMaxHeadDim = 256;
// Rows per decode block: query heads sharing one kv head handled together (more → blockIdx.z).
constexpr int kDecodeRows = 8;
#ifndef QWEN_CUDA_DECODE_MIN_CHUNK
#define QWEN_CUDA_DECODE_MIN_CHUNK 64
#endif
constexpr int kDecodeMinChunk = QWEN_CUDA_DECODE_MIN_CHUNK;  // keys per split at least: short contexts, few splits
// Causal prefill, any rows: one block per (tile, query head), a tile being up to 16 rows of one run (one slot,
// consecutive positions); K/V in 32-key shared-memory tiles, online softmax in f32; nothing of size T×T is stored.
void launch_attention_prefill(const AttnArgs& a, cudaStream_t stream);
// The tiles of a pass (host side; begin_forward copies them with the rows), the ones that see the most keys first.
void attention_tiles(const int32_t* slots, const int32_t* positions, int64_t T, std::vector<AttnTile>& tiles);
// One row (T = 1), its slot and position read on the device: split-KV flash-decoding. Blocks (split, kv head, head
// batch) each cover a slice of the slot's cache for all query heads of their kv head; the last block of a kv head
// to finish merges the slices.
void launch_attention_decode(const AttnArgs& a, cudaStream_t stream);
bool attention_layout_supported(const AttnArgs& a);

}  // namespace cuda
}  // namespace qwen

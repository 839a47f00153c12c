// Causal grouped-query attention over the bf16 KV cache, one kernel template for both cases:
//
//   prefill (T > 1): block = (tile, one query head), a tile being up to 16 rows of one run (StepParams' tiles: one
//                    slot, consecutive positions); keys 0 .. the position of the tile's last row, of that slot.
//                    Any mix of runs, single rows of other slots included.
//   decode  (T = 1): block = (split of the cache, kv head, batch of up to 8 query heads sharing that kv head);
//                    split-KV "flash-decoding" over the row's slot: each block covers a slice of positions, writes
//                    an unnormalised partial (output, running max, running sum), and the last block of its kv head
//                    to finish merges the slices and writes the output — one launch per layer. The slot and the
//                    position come from StepParams, so a recorded graph serves every slot.
//
// A block is 4 warps; each warp owns RPW query rows. Keys come through shared memory in tiles of 32 (one key per
// lane for the scores), rows padded by one word so that lane j reading key j's row hits its own bank. Softmax is
// online in f32 (running max m, running sum l, output rescaled when the max grows); no T×T score matrix exists
// anywhere, in shared or global memory. Scores, exponentials and the output accumulate in f32; the output is
// rounded to bf16 once.
#include <algorithm>

#include "cuda/kernels.cuh"

namespace qwen {
namespace cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 32;  // keys per shared-memory tile = lanes per warp
constexpr int kPrefillRpw = 4;                    // query rows per warp: 16 rows per prefill block
constexpr int kPrefillRows = kWarps * kPrefillRpw;
constexpr int kDecodeRpw = kDecodeRows / kWarps;  // 8 query heads per decode block

size_t smem_bytes(int rows, int hd) {
  const int hw = hd / 2;  // 32-bit words (bf16 pairs) per row
  return size_t(rows) * hw * 4 + size_t(kTile) * (hw + 1) * 4 + size_t(kTile) * hd * 2;
}

// NI: output dims per lane (ceil(hd / 32), rounded up to a power of two); RPW: query rows per warp.
template <int NI, int RPW, bool DECODE>
__global__ void __launch_bounds__(kThreads) attention_kernel(const AttnArgs a) {
  constexpr int ROWS = kWarps * RPW;
  extern __shared__ __align__(16) unsigned char smem[];
  const int hd = a.hd, hw = hd / 2;
  uint32_t* Qs = reinterpret_cast<uint32_t*>(smem);  // [ROWS][hw]      this block's query rows (bf16 pairs)
  uint32_t* Ks = Qs + ROWS * hw;                      // [kTile][hw + 1] key tile, padded
  bf16* Vs = reinterpret_cast<bf16*>(Ks + kTile * (hw + 1));  // [kTile][hd] value tile

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

  // --- which rows, which keys ---------------------------------------------------------------------------------
  int g;                       // the kv head every row of this block reads
  int slot, pos;               // the slot, and the position of the block's first row
  int key_begin, key_end;      // keys [key_begin, key_end) of the slot's cache
  int t0 = 0, h_first = 0;     // prefill: rows t0 + r of head h_first; decode: heads h_first + r of row 0
  int n_rows;                  // valid rows (the rest of the ROWS are padding)
  int L = 0, n_eff = 0, chunk = 0;
  if (!DECODE) {
    const AttnTile tile = step_tiles(a.params)[blockIdx.x];
    h_first = blockIdx.y;
    g = h_first / a.group;
    t0 = tile.row;
    n_rows = tile.rows;
    slot = tile.slot;
    pos = tile.pos;
    key_begin = 0;
    key_end = pos + n_rows;                    // row t0 + r sees positions 0 .. pos + r
  } else {
    const StepRow row = step_rows(a.params)[0];
    slot = row.slot;
    pos = row.pos;
    g = blockIdx.y;
    const int first = blockIdx.z * ROWS;       // index of the first row inside the group
    h_first = g * a.group + first;
    n_rows = min(ROWS, a.group - first);
    L = pos + 1;                               // the query at position pos sees 0 .. pos
    n_eff = min(a.s_max, (L + a.min_chunk - 1) / a.min_chunk);
    chunk = (L + n_eff - 1) / n_eff;
    key_begin = blockIdx.x * chunk;             // splits past the end (blockIdx.x >= n_eff or the tail) are empty
    key_end = min(L, key_begin + chunk);
  }
  const int64_t kv_base = (int64_t(slot) * a.kv_heads + g) * a.max_pos;  // cache row of (slot, g, position 0)
  auto row_q = [&](int r) -> const bf16* {
    return DECODE ? a.q + int64_t(h_first + r) * hd : a.q + int64_t(t0 + r) * a.ldq + int64_t(h_first) * hd;
  };

  // Per-row state of this warp's rows. Row r = warp * RPW + rr.
  bool ok[RPW];
  int limit[RPW];  // last position the row may see
  float m[RPW], l[RPW], acc[RPW][NI];
  int warp_limit = -1;
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int r = warp * RPW + rr;
    ok[rr] = r < n_rows;
    limit[rr] = ok[rr] ? (DECODE ? pos : pos + r) : -1;
    warp_limit = max(warp_limit, limit[rr]);
    m[rr] = -INFINITY;
    l[rr] = 0.0f;
#pragma unroll
    for (int i = 0; i < NI; ++i) acc[rr][i] = 0.0f;
  }

  // Query rows into shared memory (padding rows zero); an empty decode split never reads them.
  if (key_begin < key_end) {
    for (int idx = tid; idx < ROWS * hw; idx += kThreads) {
      const int r = idx / hw, w = idx - r * hw;
      Qs[idx] = r < n_rows ? reinterpret_cast<const uint32_t*>(row_q(r))[w] : 0u;
    }
  }

  for (int kt = key_begin; kt < key_end; kt += kTile) {  // block-uniform trip count
    __syncthreads();  // the previous tile is no longer read (and, the first time, Qs is written)
    for (int idx = tid; idx < kTile * hw; idx += kThreads) {
      const int j = idx / hw, w = idx - j * hw;
      const int key = kt + j;
      uint32_t kw = 0u, vw = 0u;  // keys past the end read as zeros: never NaN garbage times a zero weight
      if (key < key_end) {
        const int64_t row = kv_base + key;
        kw = reinterpret_cast<const uint32_t*>(a.k_cache + row * a.ldkv)[w];
        vw = reinterpret_cast<const uint32_t*>(a.v_cache + row * a.ldkv)[w];
      }
      Ks[j * (hw + 1) + w] = kw;
      reinterpret_cast<uint32_t*>(Vs)[j * hw + w] = vw;
    }
    __syncthreads();
    if (kt > warp_limit) continue;  // every row of this warp is masked for the whole tile (warp-uniform)

    // Scores: lane j takes key kt + j for all of the warp's rows.
    const int key = kt + lane;
    float s[RPW];
    {
      float d[RPW];
#pragma unroll
      for (int rr = 0; rr < RPW; ++rr) d[rr] = 0.0f;
      const uint32_t* kr = Ks + lane * (hw + 1);
      const uint32_t* qr = Qs + warp * RPW * hw;
      for (int w = 0; w < hw; ++w) {
        const uint32_t kw = kr[w];
        const float k0 = bf16_lo(kw), k1 = bf16_hi(kw);
#pragma unroll
        for (int rr = 0; rr < RPW; ++rr) {
          const uint32_t qw = qr[rr * hw + w];  // same address across the warp: broadcast
          d[rr] = fmaf(bf16_lo(qw), k0, d[rr]);
          d[rr] = fmaf(bf16_hi(qw), k1, d[rr]);
        }
      }
#pragma unroll
      for (int rr = 0; rr < RPW; ++rr)
        s[rr] = (key < key_end && key <= limit[rr]) ? d[rr] * a.scale : -INFINITY;
    }

    // Online softmax; s becomes the unnormalised probability p = exp(s - m).
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
      const float tile_max = warp_max(s[rr]);
      if (tile_max == -INFINITY) {  // warp-uniform: nothing visible to this row in this tile
        s[rr] = 0.0f;
        continue;
      }
      const float m_new = fmaxf(m[rr], tile_max);
      const float corr = expf(m[rr] - m_new);  // m = -inf the first time: 0
      const float p = expf(s[rr] - m_new);      // masked keys: exp(-inf) = 0
      l[rr] = l[rr] * corr + warp_sum(p);
#pragma unroll
      for (int i = 0; i < NI; ++i) acc[rr][i] *= corr;
      m[rr] = m_new;
      s[rr] = p;
    }

    // acc += p · V: key j's probability is broadcast from lane j; lane owns dims lane + 32 i.
    const int nk = min(kTile, key_end - kt);
    for (int j = 0; j < nk; ++j) {
      float pj[RPW];
#pragma unroll
      for (int rr = 0; rr < RPW; ++rr) pj[rr] = __shfl_sync(0xffffffffu, s[rr], j);
      const bf16* vr = Vs + j * hd;
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        const int dim = lane + 32 * i;
        if (dim < hd) {
          const float v = to_f32(vr[dim]);
#pragma unroll
          for (int rr = 0; rr < RPW; ++rr) acc[rr][i] = fmaf(pj[rr], v, acc[rr][i]);
        }
      }
    }
  }

  if (!DECODE) {
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
      if (!ok[rr]) continue;
      const int r = warp * RPW + rr;
      bf16* o = a.out + int64_t(t0 + r) * a.ldo + int64_t(h_first) * hd;
      const float inv = 1.0f / l[rr];  // l >= 1: key 0 is always visible
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        const int dim = lane + 32 * i;
        if (dim < hd) o[dim] = to_bf16(acc[rr][i] * inv);
      }
    }
    return;
  }

  // --- decode: publish this split's partials, then the last block of the kv head merges -------------------------
  const int split = blockIdx.x;
  if (key_begin < key_end) {
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
      if (!ok[rr]) continue;
      const int h = h_first + warp * RPW + rr;
      float* po = a.part_o + (int64_t(split) * a.heads + h) * hd;
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        const int dim = lane + 32 * i;
        if (dim < hd) po[dim] = acc[rr][i];
      }
      if (lane == 0) {
        a.part_ml[(int64_t(split) * a.heads + h) * 2] = m[rr];
        a.part_ml[(int64_t(split) * a.heads + h) * 2 + 1] = l[rr];
      }
    }
  }
  __threadfence();  // each thread's partials are visible device-wide before the block takes its ticket
  __syncthreads();
  __shared__ bool last;
  unsigned* counter = a.counters + blockIdx.y * gridDim.z + blockIdx.z;
  if (tid == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();

#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    if (!ok[rr]) continue;
    const int h = h_first + warp * RPW + rr;
    float mx = -INFINITY;
    for (int sp = 0; sp < n_eff; ++sp)
      if (sp * chunk < L) mx = fmaxf(mx, __ldcg(a.part_ml + (int64_t(sp) * a.heads + h) * 2));
    float sum = 0.0f, o[NI];
#pragma unroll
    for (int i = 0; i < NI; ++i) o[i] = 0.0f;
#pragma unroll 4
    for (int sp = 0; sp < n_eff; ++sp) {
      if (sp * chunk >= L) continue;  // an empty tail split wrote nothing
      const int64_t base = int64_t(sp) * a.heads + h;
      const float w = expf(__ldcg(a.part_ml + base * 2) - mx);
      sum = fmaf(w, __ldcg(a.part_ml + base * 2 + 1), sum);
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        const int dim = lane + 32 * i;
        if (dim < hd) o[i] = fmaf(w, __ldcg(a.part_o + base * hd + dim), o[i]);
      }
    }
    const float inv = 1.0f / sum;
    bf16* out = a.out + int64_t(h) * hd;  // token 0
#pragma unroll
    for (int i = 0; i < NI; ++i) {
      const int dim = lane + 32 * i;
      if (dim < hd) out[dim] = to_bf16(o[i] * inv);
    }
  }
  if (tid == 0) *counter = 0u;  // every block of this kv head has taken its ticket: ready for the next launch
}

template <int RPW, bool DECODE>
void launch_ni(const AttnArgs& a, dim3 grid, cudaStream_t stream) {
  const size_t smem = smem_bytes(kWarps * RPW, a.hd);
  if (a.hd <= 32) attention_kernel<1, RPW, DECODE><<<grid, kThreads, smem, stream>>>(a);
  else if (a.hd <= 64) attention_kernel<2, RPW, DECODE><<<grid, kThreads, smem, stream>>>(a);
  else if (a.hd <= 128) attention_kernel<4, RPW, DECODE><<<grid, kThreads, smem, stream>>>(a);
  else attention_kernel<8, RPW, DECODE><<<grid, kThreads, smem, stream>>>(a);
  QWEN_CUDA_LAUNCHED();
}

}  // namespace

bool attention_layout_supported(const AttnArgs& a) {
  // 32-bit loads of bf16 pairs: even head_dim, even row strides, 4-byte aligned bases.
  return a.hd >= 2 && a.hd <= kAttnMaxHeadDim && a.hd % 2 == 0 && a.ldq % 2 == 0 && a.ldkv % 2 == 0 &&
         reinterpret_cast<uintptr_t>(a.q) % 4 == 0 && reinterpret_cast<uintptr_t>(a.k_cache) % 4 == 0 &&
         reinterpret_cast<uintptr_t>(a.v_cache) % 4 == 0 && a.group >= 1 && a.heads == a.kv_heads * a.group;
}

void launch_attention_prefill(const AttnArgs& a, cudaStream_t stream) {
  const dim3 grid(unsigned(a.n_tiles), unsigned(a.heads));
  launch_ni<kPrefillRpw, false>(a, grid, stream);
}

void attention_tiles(const int32_t* slots, const int32_t* positions, int64_t T, std::vector<AttnTile>& tiles) {
  tiles.clear();
  for (int64_t t = 0; t < T;) {
    int64_t end = t + 1;
    while (end < T && slots[end] == slots[t]) ++end;
    for (int64_t r = t; r < end; r += kPrefillRows)
      tiles.push_back({int32_t(r), int32_t(std::min<int64_t>(kPrefillRows, end - r)), slots[t], positions[r]});
    t = end;
  }
  // The tiles that see the most keys start first, so that none of the longest is left to run alone at the end.
  std::stable_sort(tiles.begin(), tiles.end(),
                   [](const AttnTile& x, const AttnTile& y) { return x.pos + x.rows > y.pos + y.rows; });
}

void launch_attention_decode(const AttnArgs& a, cudaStream_t stream) {
  const dim3 grid(unsigned(a.s_max), unsigned(a.kv_heads), unsigned(a.n_hb));
  launch_ni<kDecodeRpw, true>(a, grid, stream);
}

}  // namespace cuda
}  // namespace qwen

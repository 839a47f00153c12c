// The one tensor type the model and the backends share: a 2-D row-major view into memory a backend owns.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace qwen {

enum class DType : uint8_t { F32, BF16, F16, I8, U8 };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::BF16: case DType::F16: return 2;
    default: return 1;
  }
}
inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::I8: return "I8";
    default: return "U8";
  }
}

// rows × cols elements; row r starts `ld` elements after row r-1, so a column range of a wider matrix is a view.
struct Tensor {
  void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 0, ld = 0;

  template <class T> T* ptr() const { return static_cast<T*>(data); }
  template <class T> T* row(int64_t r) const { return static_cast<T*>(data) + r * ld; }
  bool contiguous() const { return ld == cols; }
  int64_t numel() const { return rows * cols; }

  Tensor slice_cols(int64_t c0, int64_t n) const {
    Tensor t = *this;
    t.data = static_cast<char*>(data) + c0 * int64_t(dtype_size(dtype));
    t.cols = n;
    return t;
  }
  Tensor slice_rows(int64_t r0, int64_t n) const {
    Tensor t = *this;
    t.data = static_cast<char*>(data) + r0 * ld * int64_t(dtype_size(dtype));
    t.rows = n;
    return t;
  }
};

// How a parameter is stored. Plain formats hold one element per value, row by row. Quantized ones cut each row into
// groups of kQuantGroup values (the last one zero-padded):
//   Q8: value = d * q, q int8 in [-127, 127], d = D * a: the row's step D (bfloat16) and per group the code a
//       (uint8)                                                                                  8.25 bits per weight
//   Q4: value = d * q + m, q in [0, 15] (two per byte), d = D * a, m = -d * c / 8: the row's step D (bfloat16) and
//       per group the codes a (uint8) and c (int8, a zero point in eighths of a level)          4.5 bits per weight
//   Q6: value = d * (q - 32), q in [0, 63], d = D * a (for the embedding and lm_head of an int4 model, symmetric
//       as llama.cpp's Q6_K)                                                                     6.25 bits per weight
// (D has 8 significant bits and a 8, so d, d * q and m are exact in float32 and a value is one rounding of d q + m,
// or exact for Q8 and Q6.) Blocks keep kQuantRows rows together (the last block zero-padded), group by group, so that a
// one-row matmul reads the matrix as one sequential stream (rows of 1536 int8 are too short for the prefetchers
// one by one). A block of 4 rows is quant_block_bytes(f, cols) long: a header (D0..D3 as bfloat16), then its
// groups, group g at byte header + g * quant_group_bytes: the 4 rows' codes first (Q8, Q6: a0..a3; Q4: a0..a3,
// c0..c3), then each row's levels (Q8: 32 bytes; Q4 and Q6: 16 bytes, byte j
// holding the low 4 bits of value j in its low nibble and of value j + 16 in its high one), then (Q6) each row's
// top 2 bits of its levels (8 bytes: bits 2s, 2s + 1 of byte j those of value j + 8s). The model picks a format per
// tensor, so one model may mix them.
enum class Format : uint8_t { F32, BF16, Q8, Q4, Q6 };
constexpr int64_t kQuantGroup = 32, kQuantRows = 4;

inline const char* format_name(Format f) {
  switch (f) {
    case Format::F32: return "float32";
    case Format::BF16: return "bfloat16";
    case Format::Q8: return "int8";
    case Format::Q4: return "int4";
    default: return "int6";
  }
}
inline bool is_quantized(Format f) { return f == Format::Q8 || f == Format::Q4 || f == Format::Q6; }
constexpr int64_t quant_groups(int64_t cols) { return (cols + kQuantGroup - 1) / kQuantGroup; }
constexpr int64_t quant_blocks(int64_t rows) { return (rows + kQuantRows - 1) / kQuantRows; }
constexpr int64_t quant_header_bytes(Format) { return kQuantRows * 2; }
constexpr int64_t quant_scale_bytes(Format f) {  // the codes of one group of a block's 4 rows
  return f == Format::Q4 ? 2 * kQuantRows : kQuantRows;
}
constexpr int64_t quant_group_bytes(Format f) {  // one group of a block's 4 rows: their scales, then their levels
  return quant_scale_bytes(f) + kQuantRows * (f == Format::Q8   ? kQuantGroup
                                              : f == Format::Q4 ? kQuantGroup / 2
                                                                : kQuantGroup / 2 + kQuantGroup / 4);
}
constexpr int64_t quant_block_bytes(Format f, int64_t cols) {  // a block of 4 rows of `cols` values
  return quant_header_bytes(f) + quant_groups(cols) * quant_group_bytes(f);
}
// The element type of a plain format's data (quantized data is bytes).
inline DType format_dtype(Format f) {
  switch (f) {
    case Format::F32: return DType::F32;
    case Format::BF16: return DType::BF16;
    default: return DType::U8;
  }
}
// Bytes of a rows × cols matrix in format f, exactly (what the backend allocates for it).
inline int64_t format_bytes(Format f, int64_t rows, int64_t cols) {
  if (!is_quantized(f)) return rows * cols * int64_t(dtype_size(format_dtype(f)));
  return quant_blocks(rows) * quant_block_bytes(f, cols);
}

// A model parameter: its data in the backend's memory and the format that data is in. Matmuls and the embedding
// lookup dispatch on `format`.
struct Weight {
  Tensor data;  // plain: (rows, cols) of format_dtype(format); quantized: U8 (blocks, quant_block_bytes)
  Format format = Format::F32;
  int64_t n = 0, k = 0;  // rows and columns of the matrix it stands for
  // bf16 stored as the CPU's panel kernels read it (cpu/kernels.h: 32-row blocks of panels, data (blocks,
  // 32 * even k)) instead of plain rows; the CPU backend's choice, on CPUs with AVX-512.
  bool panels = false;

  int64_t rows() const { return n; }
  int64_t cols() const { return k; }
};

// bf16 is the top half of an f32: widening is exact, narrowing rounds to nearest even (NaN stays NaN).
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float f16_to_f32(uint16_t h);  // weights.cpp
uint16_t f32_to_f16(float f);  // weights.cpp: round to nearest even, saturating to ±inf beyond the range

}  // namespace qwen

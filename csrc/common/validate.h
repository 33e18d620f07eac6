// The one core that validates an op before any device sees it (CPU, CUDA and Metal share it).
//
// Two steps, both at prepare time, none on the timed path:
//   derive_params()   array shapes + layout + dtype -> OpParams, every shape checked against the
//                     geometry the pool defines;
//   validate_inputs() the values a kernel will use as indices: contexts and block-table entries.
// After both, a kernel may trust every address it forms: no block id outside the pool, no context
// beyond the table. Every message starts with the op in brackets and quotes the bad value, e.g.
//   [paged_sdpa] block id 9000 at table[1][3] outside the pool [0, 512)
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <string>
#include <utility>
#include <vector>

#include "device.h"
#include "layout.h"
#include "params.h"
#include "variant.h"

namespace kvmicro {

inline const char* op_name(OpKind op) {
  switch (op) {
    case OpKind::kSdpaContiguous: return "sdpa_contiguous";
    case OpKind::kGather: return "gather";
    case OpKind::kGatherSdpa: return "gather_sdpa";
    case OpKind::kPagedSdpa: return "paged_sdpa";
    case OpKind::kAppend: return "append";
  }
  return "unknown op";
}

inline const char* dtype_name(int32_t dtype) {
  switch (dtype) {
    case (int32_t)DType::kFloat16: return "float16";
    case (int32_t)DType::kBFloat16: return "bfloat16";
    case (int32_t)DType::kFloat32: return "float32";
  }
  return "unknown dtype";
}

inline bool is_attention(OpKind op) {
  return op == OpKind::kSdpaContiguous || op == OpKind::kGatherSdpa || op == OpKind::kPagedSdpa;
}

// Ops whose kernels index the pool through the block table.
inline bool reads_table(OpKind op) { return op != OpKind::kSdpaContiguous; }

namespace detail {

// Messages are built without iostreams on purpose: a module built by a newer GCC than the
// libstdc++ the host process already loaded crashed in its first `ostream << int64` (seen on the
// GPU machine); std::string and snprintf have no such dependency.
inline void put_one(std::string& out, const std::string& s) { out += s; }
inline void put_one(std::string& out, const char* s) { out += s; }
inline void put_one(std::string& out, char c) { out += c; }
template <class T>
void put_one(std::string& out, const T& value) {
  static_assert(std::is_arithmetic<T>::value, "message parts are strings or numbers");
  char buf[64];
  if constexpr (std::is_same<T, bool>::value) {
    out += value ? "true" : "false";
    return;
  } else if constexpr (std::is_floating_point<T>::value) {
    std::snprintf(buf, sizeof buf, "%g", (double)value);
  } else if constexpr (std::is_signed<T>::value) {
    std::snprintf(buf, sizeof buf, "%lld", (long long)value);
  } else {
    std::snprintf(buf, sizeof buf, "%llu", (unsigned long long)value);
  }
  out += buf;
}

inline void put(std::string&) {}
template <class T, class... Rest>
void put(std::string& out, const T& first, const Rest&... rest) {
  put_one(out, first);
  put(out, rest...);
}

}  // namespace detail

// "[op] " followed by the parts, as one string.
template <class... Parts>
std::string op_message(const char* op, const Parts&... parts) {
  std::string out = "[";
  out += op;
  out += "] ";
  detail::put(out, parts...);
  return out;
}

template <class... Parts>
[[noreturn]] void invalid(const char* op, const Parts&... parts) {
  throw InvalidArgument(op_message(op, parts...));
}

// A caller's string as a message quotes it: printable ASCII as is, anything else (an embedded
// NUL, a control or non-ASCII byte) as \xNN, so the message shows exactly what was passed.
inline std::string quoted(const std::string& text) {
  std::string out = "'";
  for (unsigned char c : text) {
    if (c >= 0x20 && c < 0x7f && c != '\\' && c != '\'') {
      out += (char)c;
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  return out + "'";
}

inline OpKind parse_op(const std::string& name) {
  const OpKind all[] = {OpKind::kSdpaContiguous, OpKind::kGather, OpKind::kGatherSdpa,
                        OpKind::kPagedSdpa, OpKind::kAppend};
  for (OpKind op : all)
    if (name == op_name(op)) return op;
  invalid("native", "unknown op ", quoted(name),
          "; expected one of sdpa_contiguous, gather, gather_sdpa, paged_sdpa, append");
}

inline DType parse_dtype(OpKind op, const std::string& name) {
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  if (name == "float32") return DType::kFloat32;
  invalid(op_name(op), "unknown dtype ", quoted(name), "; expected one of float16, bfloat16, float32");
}

// A layout string: exactly four bytes, a permutation of N, S, H, D (no NUL or anything after).
inline void check_layout(const char* op, const std::string& layout) {
  PoolView probe;
  if (layout.size() != 4 || layout.find('\0') != std::string::npos ||
      !make_pool_view(layout.c_str(), 1, 1, 1, 1, &probe))
    invalid(op, "layout ", quoted(layout), " is not a permutation of N, S, H, D");
}

inline std::string shape_string(const std::vector<int64_t>& dims) {
  std::string out = "(";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(dims[i]);
  }
  out += dims.size() == 1 ? ",)" : ")";
  return out;
}

// The shape of each input array as the caller holds it; `present == false` for an absent one.
struct ArrayDims {
  bool present = false;
  std::vector<int64_t> dims;
};

struct InputDims {
  ArrayDims q, k_pool, v_pool, block_table, ctx, k_dense, v_dense, k_new, v_new;
};

// Whether `op` needs array `name` (the rest may be absent; when present they are still checked).
inline bool requires_array(OpKind op, const std::string& name) {
  if (name == "k_pool" || name == "v_pool" || name == "block_table" || name == "ctx") return true;
  if (name == "q") return is_attention(op);
  if (name == "k_dense" || name == "v_dense") return op == OpKind::kSdpaContiguous;
  if (name == "k_new" || name == "v_new") return op == OpKind::kAppend;
  return false;
}

// Derive the op's geometry from the pool's physical shape and its layout, then check every other
// array's shape against it: q [B, Hq, q_len, D], block_table [B, max_blocks], ctx [B],
// dense [B, Hkv, max_blocks * block_size, D], new [B, Hkv, D].
inline OpParams derive_params(OpKind op, const std::string& layout, DType dtype, int64_t block_size,
                              double scale, const InputDims& in) {
  const char* name = op_name(op);
  const std::pair<const char*, const ArrayDims*> arrays[] = {
      {"q", &in.q},           {"k_pool", &in.k_pool},   {"v_pool", &in.v_pool},
      {"block_table", &in.block_table}, {"ctx", &in.ctx}, {"k_dense", &in.k_dense},
      {"v_dense", &in.v_dense}, {"k_new", &in.k_new},   {"v_new", &in.v_new}};
  for (const auto& a : arrays) {
    if (!a.second->present) {
      if (requires_array(op, a.first)) invalid(name, a.first, " is required");
      continue;
    }
    for (int64_t d : a.second->dims)
      if (d <= 0 || d > INT32_MAX)
        invalid(name, a.first, " has shape ", shape_string(a.second->dims),
                "; every dimension must be in [1, 2^31)");
  }
  if (!std::isfinite(scale)) invalid(name, "scale ", scale, " must be finite");
  if (std::fabs(scale) > 3.4028234663852886e38)
    invalid(name, "scale ", scale, " is outside the float32 range the kernels compute in");
  if (block_size <= 0) invalid(name, "block_size ", block_size, " must be positive");

  // Pool: its physical shape read through the layout gives N, S, H, D.
  if (in.k_pool.dims.size() != 4)
    invalid(name, "k_pool has shape ", shape_string(in.k_pool.dims), "; expected 4 dimensions (",
            layout, ")");
  if (in.v_pool.dims != in.k_pool.dims)
    invalid(name, "v_pool shape ", shape_string(in.v_pool.dims), " differs from k_pool shape ",
            shape_string(in.k_pool.dims));
  check_layout(name, layout);
  int64_t sizes[4] = {0, 0, 0, 0};  // by logical axis N, S, H, D
  const char letters[4] = {'N', 'S', 'H', 'D'};
  for (int i = 0; i < 4; ++i)
    for (int a = 0; a < 4; ++a)
      if (layout[i] == letters[a]) sizes[a] = in.k_pool.dims[i];
  if (sizes[kAxisS] != block_size)
    invalid(name, "block_size ", block_size, " does not match the pool's S axis ", sizes[kAxisS],
            " (layout ", layout, ", k_pool shape ", shape_string(in.k_pool.dims), ")");

  OpParams p{};
  if (!make_pool_view(layout.c_str(), (int32_t)sizes[kAxisN], (int32_t)sizes[kAxisS],
                      (int32_t)sizes[kAxisH], (int32_t)sizes[kAxisD], &p.pool))
    invalid(name, "layout ", quoted(layout), " is not a permutation of N, S, H, D");
  const int64_t Hkv = sizes[kAxisH], D = sizes[kAxisD];

  if (in.block_table.dims.size() != 2)
    invalid(name, "block_table has shape ", shape_string(in.block_table.dims),
            "; expected [batch, max_blocks]");
  const int64_t B = in.block_table.dims[0], max_blocks = in.block_table.dims[1];
  if (in.ctx.dims != std::vector<int64_t>{B})
    invalid(name, "ctx has shape ", shape_string(in.ctx.dims), " but block_table has ", B,
            " rows; expected (", B, ",)");
  if (max_blocks * block_size > INT32_MAX)
    invalid(name, "max_blocks ", max_blocks, " x block_size ", block_size,
            " exceeds 2^31 positions");
  const int64_t T = max_blocks * block_size;

  int64_t Hq = Hkv, q_len = 1;
  if (in.q.present) {
    const auto& q = in.q.dims;
    if (q.size() != 4 || q[0] != B || q[3] != D)
      invalid(name, "q has shape ", shape_string(q), "; expected [", B, ", q_heads, q_len, ", D,
              "] (batch from block_table, head_dim from the pool)");
    Hq = q[1];
    q_len = q[2];
    if (Hq % Hkv != 0)
      invalid(name, "q_heads ", Hq, " is not a multiple of kv_heads ", Hkv);
  }
  const std::vector<int64_t> dense{B, Hkv, T, D};
  for (const auto* a : {&in.k_dense, &in.v_dense})
    if (a->present && a->dims != dense)
      invalid(name, a == &in.k_dense ? "k_dense" : "v_dense", " has shape ", shape_string(a->dims),
              "; expected ", shape_string(dense), " = [batch, kv_heads, max_blocks * block_size, ",
              "head_dim]");
  const std::vector<int64_t> fresh{B, Hkv, D};
  for (const auto* a : {&in.k_new, &in.v_new})
    if (a->present && a->dims != fresh)
      invalid(name, a == &in.k_new ? "k_new" : "v_new", " has shape ", shape_string(a->dims),
              "; expected ", shape_string(fresh), " = [batch, kv_heads, head_dim]");

  p.batch = (int32_t)B;
  p.q_heads = (int32_t)Hq;
  p.group = (int32_t)(Hq / Hkv);
  p.q_len = (int32_t)q_len;
  p.max_blocks = (int32_t)max_blocks;
  p.max_ctx_pad = (int32_t)T;
  p.max_ctx = 0;  // known once the contexts are read: validate_inputs
  p.scale = (float)scale;
  p.dtype = (int32_t)dtype;
  return p;
}

namespace detail {

// Elements of `dtype` as float magnitudes. For IEEE formats the magnitude orders like the bit
// pattern without its sign, so the largest |x| of an array is one integer max over its bits
// (NaN patterns sort above infinity: a NaN anywhere makes the result NaN).
inline float magnitude_of_bits(uint32_t bits, int32_t dtype) {
  float f;
  if (dtype == (int32_t)DType::kFloat32) {
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  if (dtype == (int32_t)DType::kBFloat16) {
    const uint32_t wide = bits << 16;
    std::memcpy(&f, &wide, sizeof f);
    return f;
  }
  const int e = (int)((bits >> 10) & 0x1f), m = (int)(bits & 0x3ff);
  if (e == 31) return m ? NAN : INFINITY;
  return e == 0 ? std::ldexp((float)m, -24) : std::ldexp((float)(m | 0x400), e - 25);
}

inline uint32_t magnitude_bits(const void* data, int64_t i, int32_t dtype) {
  if (dtype == (int32_t)DType::kFloat32) {
    uint32_t bits;
    std::memcpy(&bits, static_cast<const char*>(data) + 4 * i, sizeof bits);
    return bits & 0x7fffffffu;
  }
  return static_cast<const uint16_t*>(data)[i] & 0x7fffu;
}

inline float max_magnitude(const void* data, int64_t n, int32_t dtype) {
  uint32_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = magnitude_bits(data, i, dtype);
    best = bits > best ? bits : best;
  }
  return magnitude_of_bits(best, dtype);
}

}  // namespace detail

// The scale contract (docs/backends.md): kernels compute scores scale * q.k in float32, the oracle
// in float64. With finite inputs, |scale * log2(e) * q.k| is at most c * max_row sum|q| *
// max|k| (c = |scale| log2(e)); when twice that bound could leave the float32 range, a kernel
// would produce inf - inf = NaN where the oracle is finite, so the case is refused naming the
// scale and the largest one these inputs take. Non-finite inputs are not refused: they propagate
// (a NaN in q or in a key row makes that head's output NaN, as in the oracle).
inline void check_scale_range(const OpInputs& in) {
  const OpParams& p = in.params;
  const char* name = op_name(in.op);
  const void* keys = in.op == OpKind::kSdpaContiguous ? in.k_dense : in.k_pool;
  if (!is_attention(in.op) || in.q == nullptr || keys == nullptr) return;
  const int64_t D = p.pool.head_dim;
  const int64_t rows = (int64_t)p.batch * p.q_heads * p.q_len;
  double q_sum = 0;  // largest sum_d |q[row][d]|
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0;
    for (int64_t d = 0; d < D; ++d)
      sum += detail::magnitude_of_bits(detail::magnitude_bits(in.q, r * D + d, p.dtype), p.dtype);
    q_sum = sum > q_sum ? sum : q_sum;
  }
  const int64_t n_keys = buffer_elements(p, in.op == OpKind::kSdpaContiguous ? kBufKDense
                                                                              : kBufKPool);
  const double k_max = detail::max_magnitude(keys, n_keys, p.dtype);
  const double log2e = 1.4426950408889634;
  const double reach = std::fabs((double)p.scale) * log2e * q_sum * (k_max > 1 ? k_max : 1.0);
  if (!std::isfinite(q_sum) || !std::isfinite(k_max)) return;  // non-finite data propagates
  const double limit = 0.5 * 3.4028234663852886e38;  // FLT_MAX / 2: score differences fit
  if (reach >= limit)
    invalid(name, "scale ", (double)p.scale, " is too large for these inputs: scores may reach ",
            reach, " (largest row sum |q| ", q_sum, ", largest |k| ", k_max,
            "), past the float32 range the kernels compute in (the float64 oracle would not "
            "overflow); these inputs take |scale| < ",
            limit / (log2e * q_sum * (k_max > 1 ? k_max : 1.0)));
}

// Check the values kernels index with, and fill params.max_ctx. For each sequence b:
// 1 <= ctx[b] <= max_blocks * block_size (append: < , it writes position ctx[b]); q_len <= ctx[b];
// the table entries covering its tokens (ctx[b] + 1 for append) lie in [0, num_blocks); entries
// after them are -1 or in the pool too (nothing may point outside it).
inline void validate_inputs(OpInputs& in) {
  const OpKind op = in.op;
  const char* name = op_name(op);
  OpParams& p = in.params;
  const PoolView& v = p.pool;
  if (p.dtype < 0 || p.dtype > (int32_t)DType::kFloat32) invalid(name, "unknown dtype ", p.dtype);
  if (v.num_blocks <= 0 || v.block_size <= 0 || v.kv_heads <= 0 || v.head_dim <= 0 ||
      p.batch <= 0 || p.q_heads <= 0 || p.q_len <= 0 || p.max_blocks <= 0)
    invalid(name, "every dimension must be positive (num_blocks ", v.num_blocks, ", block_size ",
            v.block_size, ", kv_heads ", v.kv_heads, ", head_dim ", v.head_dim, ", batch ",
            p.batch, ", q_heads ", p.q_heads, ", q_len ", p.q_len, ", max_blocks ", p.max_blocks,
            ")");
  if (p.q_heads % v.kv_heads != 0 || p.group != p.q_heads / v.kv_heads)
    invalid(name, "q_heads ", p.q_heads, " is not a multiple of kv_heads ", v.kv_heads);
  if ((int64_t)p.max_ctx_pad != (int64_t)p.max_blocks * v.block_size)
    invalid(name, "max_ctx_pad ", p.max_ctx_pad, " != max_blocks ", p.max_blocks,
            " x block_size ", v.block_size);
  if (in.ctx == nullptr || (reads_table(op) && in.table == nullptr))
    invalid(name, "ctx and block_table are required");

  const int64_t capacity = (int64_t)p.max_blocks * v.block_size;
  const int extra = op == OpKind::kAppend ? 1 : 0;  // append stores position ctx[b] itself
  int32_t max_ctx = 0;
  for (int b = 0; b < p.batch; ++b) {
    const int64_t c = in.ctx[b];
    if (c < 1) invalid(name, "ctx[", b, "] = ", c, " must be >= 1");
    if (c + extra > capacity) {
      if (extra)
        invalid(name, "ctx[", b, "] = ", c, " leaves no slot to append: position ", c,
                " is beyond the table's ", capacity, " positions (", p.max_blocks,
                " blocks x block_size ", v.block_size, ")");
      invalid(name, "ctx[", b, "] = ", c, " exceeds the table's ", capacity, " positions (",
              p.max_blocks, " blocks x block_size ", v.block_size, ")");
    }
    if (is_attention(op) && p.q_len > c)
      invalid(name, "q_len ", p.q_len, " exceeds ctx[", b, "] = ", c);
    if (c > max_ctx) max_ctx = (int32_t)c;
    if (!reads_table(op)) continue;
    const int64_t needed = (c + extra + v.block_size - 1) / v.block_size;
    const int32_t* row = in.table + (int64_t)b * p.max_blocks;
    for (int64_t j = 0; j < p.max_blocks; ++j) {
      const int64_t id = row[j];
      if (id >= 0 && id < v.num_blocks) continue;
      if (j < needed && id == -1)
        invalid(name, "table[", b, "][", j, "] = -1 (padding), but sequence ", b, " needs ",
                needed, " blocks for ", c + extra, " positions (block_size ", v.block_size, ")");
      if (j >= needed && id == -1) continue;
      invalid(name, "block id ", id, " at table[", b, "][", j, "] outside the pool [0, ",
              v.num_blocks, ")");
    }
  }
  p.max_ctx = max_ctx;
  check_scale_range(in);
}

// ---- kernel variant options (variant.h) ------------------------------------------------------

namespace detail {

inline std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + items[i];
  return out.empty() ? "(none)" : out;
}

// A decimal integer in [lo, hi], written as digits only (an optional leading '-').
inline int32_t parse_int_option(const char* op, const std::string& key, const std::string& text,
                                int64_t lo, int64_t hi) {
  const bool digits =
      !text.empty() && text.size() <= 12 &&
      text.find_first_not_of("0123456789", text[0] == '-' ? 1 : 0) == std::string::npos &&
      text != "-";
  if (!digits)
    invalid(op, "option ", key, "=", quoted(text), " is not an integer (expected ", lo, "..", hi,
            ")");
  const long long value = std::strtoll(text.c_str(), nullptr, 10);
  if (value < lo || value > hi)
    invalid(op, "option ", key, "=", value, " is outside ", lo, "..", hi);
  return (int32_t)value;
}

inline bool parse_bool_option(const char* op, const std::string& key, const std::string& text) {
  if (text == "1" || text == "true" || text == "True") return true;
  if (text == "0" || text == "false" || text == "False") return false;
  invalid(op, "option ", key, "=", quoted(text), " is not a boolean (expected 1/0 or true/false)");
}

// One of `all`, by the name `name` gives it; the message lists the names in `all`'s order.
template <typename E, typename NameFn>
E parse_choice_option(const char* op, const std::string& key, const std::string& text,
                      std::initializer_list<E> all, NameFn name) {
  std::vector<std::string> names;
  for (E e : all) {
    if (text == name(e)) return e;
    names.push_back(name(e));
  }
  invalid(op, "option ", key, "=", quoted(text), " is not one of ", join(names));
}

}  // namespace detail

// Parse the (key, value) pairs given for `device` into a Variant; unknown keys, repeated keys and
// bad values raise InvalidArgument naming them.
inline Variant parse_variant(const char* op, const std::string& device,
                             const std::vector<std::pair<std::string, std::string>>& items) {
  Variant v;
  const std::vector<std::string>& keys = variant_keys(device);
  std::vector<std::string> seen;
  for (const auto& item : items) {
    const std::string& key = item.first;
    const std::string& text = item.second;
    bool known = false;
    for (const std::string& k : keys) known = known || k == key;
    if (!known)
      invalid(op, "unknown option ", quoted(key), " for device ", device, "; expected one of ",
              detail::join(keys));
    for (const std::string& k : seen)
      if (k == key) invalid(op, "option ", key, " given twice");
    seen.push_back(key);
    if (key == "kernel") {
      v.kernel = detail::parse_choice_option(
          op, key, text, {AttnKernel::kAuto, AttnKernel::kSimt, AttnKernel::kMma, AttnKernel::kAsync,
                           AttnKernel::kBulk},
          attn_kernel_name);
    } else if (key == "splits") {
      v.splits = detail::parse_int_option(op, key, text, 0, kVariantMaxSplits);
    } else if (key == "min_chunk") {
      v.min_chunk = detail::parse_int_option(op, key, text, 1, INT32_MAX);
    } else if (key == "blocks_per_sm") {
      v.blocks_per_sm = detail::parse_int_option(op, key, text, 1, 64);
    } else if (key == "stages") {
      v.stages = detail::parse_int_option(op, key, text, INT32_MIN, INT32_MAX);
      if (v.stages != 2 && v.stages != 3)
        invalid(op, "option stages=", v.stages, " is not one of 2, 3");
    } else if (key == "l2_prefetch") {
      v.l2_prefetch = detail::parse_int_option(op, key, text, INT32_MIN, INT32_MAX);
      if (v.l2_prefetch != 0 && v.l2_prefetch != 128)
        invalid(op, "option l2_prefetch=", v.l2_prefetch, " is not one of 0, 128");
    } else if (key == "pdl") {
      v.pdl = detail::parse_bool_option(op, key, text);
    } else if (key == "pdl_entry") {
      v.pdl_entry = detail::parse_choice_option(
          op, key, text, {PdlEntry::kOff, PdlEntry::kExit, PdlEntry::kEarly, PdlEntry::kAuto},
          pdl_entry_name);
    } else if (key == "spread") {
      v.spread = detail::parse_bool_option(op, key, text);
    } else if (key == "combine") {
      v.combine = detail::parse_choice_option(
          op, key, text, {AttnCombine::kSeparate, AttnCombine::kLast, AttnCombine::kCluster},
          attn_combine_name);
    } else if (key == "schedule") {
      v.schedule = detail::parse_choice_option(
          op, key, text, {AttnSchedule::kStatic, AttnSchedule::kSteal}, attn_schedule_name);
    } else if (key == "simd") {
      v.simd = detail::parse_bool_option(op, key, text);
    }
  }
  return v;
}

}  // namespace kvmicro

// Sparse attention over the CPU KV store: for every (row, KV head), the selected rows of the offloaded keys and
// values (side by side in the store's blocks, [B, H, block, 2, D]: one contiguous read per token) are gathered
// straight from the blocks and attended by the KV group's query heads, with float32 accumulation. Work is split
// into (row, KV head, chunk of selected rows) tasks, which torch's threads take in turn, and the chunks' partial
// softmaxes are merged by their log-sum-exps, so a batch of one still uses every core. Where asked, the first rows
// of each selection are also copied out as they are read (the row cache's fill), so they cross memory once. Built
// with -march=native: on CPUs with AVX-512 a bfloat16 store's value sums run 16 floats wide, and with AVX512-BF16
// a bfloat16 model's scores use the dot-product instructions (both ~22% faster on a 2-core Zen 4 VM at 128K);
// -DA2ATS_PORTABLE leaves both out (the build tried where a compiler lacks the intrinsics).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <memory>
#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kChunk = 256;    // selected rows per task
constexpr int64_t kPrefetch = 8;  // rows ahead to prefetch

inline float to_float(float x) { return x; }
inline float to_float(double x) { return static_cast<float>(x); }
inline float to_float(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float to_float(at::Half x) { return static_cast<float>(x); }

template <typename T>
inline void load_row(const T* src, float* dst, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) dst[i] = to_float(src[i]);
}

template <typename T>
inline void prefetch_row(const T* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(reinterpret_cast<const char*>(p) + off);
}

// Register-tiled inner loops for a compile-time group size G and a head dimension that is a multiple of 8: the
// scores of all G query heads in one pass over a key row (G accumulators), and the value sums one 8-float slice
// of the head dimension at a time over every row of the chunk (G accumulators), so nothing but the rows streams
// through memory. 8-float vectors are GCC/Clang vector extensions (AVX with -march=native on x86).
// W-float vectors (8: AVX; 16: AVX-512), and the bfloat16 and integer vectors a load converts through.
template <int W>
struct Lanes {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef uint16_t h __attribute__((vector_size(2 * W)));
  typedef uint32_t u __attribute__((vector_size(4 * W)));
};
typedef Lanes<8>::f v8f;

template <int W>
inline typename Lanes<W>::f load(const float* p) {
  typename Lanes<W>::f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int W, typename T>
inline typename Lanes<W>::f load(const T* p) {
  float tmp[W];
  for (int i = 0; i < W; ++i) tmp[i] = to_float(p[i]);
  return load<W>(static_cast<const float*>(tmp));
}

template <int W>
inline typename Lanes<W>::f load(const at::BFloat16* p) {  // bfloat16 is the top half of a float32
  typename Lanes<W>::h half;
  std::memcpy(&half, p, sizeof(half));
  const typename Lanes<W>::u bits = __builtin_convertvector(half, typename Lanes<W>::u) << 16;
  typename Lanes<W>::f v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// exp(x) for x <= 0 on 8 floats: 2^n p(r), x = n ln2 + r, |r| <= ln2 / 2, p the degree-6 Taylor polynomial (relative
// error ~2e-7); below -87 it gives ~1e-38 instead of underflowing.
inline v8f exp8(v8f x) {
  typedef int32_t v8i __attribute__((vector_size(32)));
  x = x < -87.f ? v8f{} - 87.f : x;
  const v8i n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, v8i);  // nearest integer, as x <= 0
  const v8f nf = __builtin_convertvector(n, v8f);
  const v8f r = x - nf * 0.693145751953125f - nf * 1.428606765330187045e-06f;
  v8f p = r * (1.f / 720) + (1.f / 120);
  p = p * r + (1.f / 24);
  p = p * r + (1.f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const v8i bits = (n + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Softmax weights in place of the logits [n][G] (the buffer is a multiple of 8 long), and their sums per head.
template <int G>
inline void weights_tiled(float* logits, int64_t n, const float* maxes, float* sums) {
  static_assert(8 % G == 0, "G divides the vector width");
  v8f pattern, total = {};
  for (int i = 0; i < 8; ++i) pattern[i] = maxes[i % G];
  for (int64_t i = 0; i < n * G; i += 8) {
    const v8f w = exp8(load<8>(logits + i) - pattern);
    std::memcpy(logits + i, &w, sizeof(w));
    total += i + 8 <= n * G ? w : v8f{};
  }
  for (int64_t i = n * G / 8 * 8; i < n * G; ++i) total[i % 8] += logits[i];  // the partial last vector
  for (int g = 0; g < G; ++g) {
    sums[g] = 0.f;
    for (int i = g; i < 8; i += G) sums[g] += total[i];
  }
}

template <int G, typename T>
inline void scores_tiled(const float* q, const T* key, int64_t d, float scaling, float* out) {
  v8f acc[G] = {};
  for (int64_t i = 0; i < d; i += 8) {
    const v8f k = load<8>(key + i);
    for (int g = 0; g < G; ++g) acc[g] += load<8>(q + g * d + i) * k;
  }
  for (int g = 0; g < G; ++g) {
    const v8f a = acc[g];
    out[g] = (((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))) * scaling;
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512F__) && !defined(A2ATS_PORTABLE)
#include <immintrin.h>
#define A2ATS_BF16_DOT 1
// Scores of G query heads against a bfloat16 key row with AVX512-BF16's pairwise dot products (32 products an
// instruction, summed in float32): a fifth of the instructions of converting the key and multiplying. ``qb`` [G][d]
// holds the query in bfloat16, which the caller checked holds it exactly (a bfloat16 model's query does).
template <int G>
inline void scores_bf16(const uint16_t* qb, const at::BFloat16* key, int64_t d, float scaling, float* out) {
  __m512 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += 32) {
    const __m512bh k = (__m512bh)_mm512_loadu_si512(key + i);
    for (int g = 0; g < G; ++g) acc[g] = _mm512_dpbf16_ps(acc[g], (__m512bh)_mm512_loadu_si512(qb + g * d + i), k);
  }
  for (int g = 0; g < G; ++g) out[g] = _mm512_reduce_add_ps(acc[g]) * scaling;
}
#endif

// The value sums W floats of the head dimension at a time: 16 (AVX-512, a bfloat16 store) takes half the loads,
// conversions and FMAs of 8, each sum in the same order (the same result).
template <int G, int W, typename T>
inline void values_tiled(const T* const* rows, const float* weights, int64_t n, int64_t d, float* acc) {
  for (int64_t i = 0; i < d; i += W) {
    typename Lanes<W>::f sum[G] = {};
    for (int64_t j = 0; j < n; ++j) {
      const typename Lanes<W>::f v = load<W>(rows[j] + i);
      for (int g = 0; g < G; ++g) sum[g] += weights[j * G + g] * v;
    }
    for (int g = 0; g < G; ++g) std::memcpy(acc + g * d + i, &sum[g], sizeof(sum[g]));
  }
}

template <typename T, int G>
void run(const float* query, const std::vector<const T*>& blocks, const int32_t* indices, const int32_t* counts,
         int64_t batch, int64_t heads, int64_t group, int64_t d, int64_t width, int64_t block_size, float scaling,
         float* out, float* lse, T* copies, int64_t copied) {
  static_assert(G >= 0, "G is the group size, or 0 for one known only at run time");
  if (G) group = G;
  const bool tiled = G > 0 && d % 8 == 0;
  const int64_t pairs = batch * heads;
  // Task t covers rows [chunk * kChunk, ...) of pair task_pair[t].
  std::vector<int64_t> task_pair, task_chunk, first_task(pairs + 1, 0);
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t chunks = (counts[p] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      task_pair.push_back(p);
      task_chunk.push_back(c);
    }
    first_task[p + 1] = static_cast<int64_t>(task_pair.size());
  }
  const int64_t tasks = static_cast<int64_t>(task_pair.size());
  std::vector<float> acc(tasks * group * d), sums(tasks * group), maxes(tasks * group);
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));  // a key's or a value's
  // The query in bfloat16 for the dot-product instructions, where the store is bfloat16 and it holds the query
  // exactly (the low half of every float32 zero); else the float32 path.
  std::vector<uint16_t> query_bf16;
  bool bf16_dot = false;
#ifdef A2ATS_BF16_DOT
  if constexpr (std::is_same_v<T, at::BFloat16> && G > 0) {
    bf16_dot = d % 32 == 0;
    query_bf16.resize(bf16_dot ? pairs * group * d : 0);
    for (size_t i = 0; i < query_bf16.size() && bf16_dot; ++i) {
      uint32_t bits;
      std::memcpy(&bits, query + i, sizeof(bits));
      bf16_dot = (bits & 0xffffu) == 0;
      query_bf16[i] = static_cast<uint16_t>(bits >> 16);
    }
  }
#endif

  // Merge a pair's chunks: out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c, lse = M + log(l).
  auto merge = [&](int64_t p) {
    for (int64_t g = 0; g < group; ++g) {
      float* o = out + (p * group + g) * d;
      std::fill(o, o + d, 0.f);
      float big = -std::numeric_limits<float>::infinity(), total = 0.f;
      for (int64_t t = first_task[p]; t < first_task[p + 1]; ++t) big = std::max(big, maxes[t * group + g]);
      if (first_task[p] == first_task[p + 1]) {
        lse[p * group + g] = big;  // nothing selected: -inf, zero output
        continue;
      }
      for (int64_t t = first_task[p]; t < first_task[p + 1]; ++t) {
        const float f = std::exp(maxes[t * group + g] - big);
        total += f * sums[t * group + g];
        const float* a = acc.data() + (t * group + g) * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) o[i] += f * a[i];
      }
      for (int64_t i = 0; i < d; ++i) o[i] /= total;
      lse[p * group + g] = big + std::log(total);
    }
  };

  // Tasks are taken in turn from a shared counter (a thread slowed by the machine takes fewer), and the thread
  // that finishes a pair's last chunk merges the pair, so the call needs one parallel region.
  std::atomic<int64_t> next{0};
  std::unique_ptr<std::atomic<int64_t>[]> left(new std::atomic<int64_t>[pairs]);
  for (int64_t p = 0; p < pairs; ++p) {
    left[p] = first_task[p + 1] - first_task[p];
    if (left[p] == 0) merge(p);  // nothing selected
  }
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), tasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> row(d), logits(kChunk * group), m(group), l(group);  // a task's max and sum per head: here,
    std::vector<const T*> value_rows(kChunk);  // not in maxes / sums, whose neighbours other threads write
    for (int64_t t = next++; t < tasks; t = next++) {
      const int64_t p = task_pair[t];
      const int64_t start = task_chunk[t] * kChunk;
      const int64_t n = std::min<int64_t>(kChunk, counts[p] - start);
      const int32_t* idx = indices + p * width + start;
      const int64_t base = p * block_size * 2 * d;  // (row, head) offset inside every block
      const float* q = query + p * group * d;
      auto key_at = [&](int64_t j) { return blocks[idx[j] / block_size] + base + (idx[j] % block_size) * 2 * d; };
      auto value_at = [&](int64_t j) { return key_at(j) + d; };

      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < n; ++j) {
        if (j + kPrefetch < n) prefetch_row(key_at(j + kPrefetch), 2 * row_bytes);  // its value too: read next
        if (start + j < copied) std::memcpy(copies + (p * copied + start + j) * 2 * d, key_at(j), 2 * row_bytes);
        float* s = logits.data() + j * group;
        if constexpr (G > 0) {
#ifdef A2ATS_BF16_DOT
          if constexpr (std::is_same_v<T, at::BFloat16>) {
            if (bf16_dot) scores_bf16<G>(query_bf16.data() + p * group * d, key_at(j), d, scaling, s);
          }
#endif
          if (tiled && !bf16_dot) scores_tiled<G>(q, key_at(j), d, scaling, s);
        }
        if (!tiled) {
          load_row(key_at(j), row.data(), d);
          for (int64_t g = 0; g < group; ++g) {
            const float* qg = q + g * d;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < d; ++i) dot += qg[i] * row[i];
            s[g] = dot * scaling;
          }
        }
        for (int64_t g = 0; g < group; ++g) m[g] = std::max(m[g], s[g]);
      }
      float* a = acc.data() + t * group * d;
      std::fill(a, a + group * d, 0.f);
      std::fill(l.begin(), l.end(), 0.f);
      if constexpr (G > 0) {
        if (tiled) {
          for (int64_t j = 0; j < n; ++j) value_rows[j] = value_at(j);  // fetched with their keys
          weights_tiled<G>(logits.data(), n, m.data(), l.data());
#if defined(__AVX512F__) && !defined(A2ATS_PORTABLE)
          constexpr bool wide = std::is_same_v<T, at::BFloat16>;
#else
          constexpr bool wide = false;
#endif
          if (wide && d % 16 == 0) {
            values_tiled<G, wide ? 16 : 8>(value_rows.data(), logits.data(), n, d, a);
          } else {
            values_tiled<G, 8>(value_rows.data(), logits.data(), n, d, a);
          }
        }
      }
      if (!tiled) {
        for (int64_t j = 0; j < n; ++j) {  // weights, in place of the logits
          for (int64_t g = 0; g < group; ++g) {
            const float w = std::exp(logits[j * group + g] - m[g]);
            logits[j * group + g] = w;
            l[g] += w;
          }
        }
        for (int64_t j = 0; j < n; ++j) {
          load_row(value_at(j), row.data(), d);
          for (int64_t g = 0; g < group; ++g) {
            const float w = logits[j * group + g];
            float* ag = a + g * d;
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) ag[i] += w * row[i];
          }
        }
      }
      std::copy(m.begin(), m.end(), maxes.begin() + t * group);
      std::copy(l.begin(), l.end(), sums.begin() + t * group);
      if (--left[p] == 0) merge(p);
    }
  });
}

}  // namespace

// Writes into ``out`` [B, Hq, D] and ``lse`` [B, Hq] (contiguous float32: the caller's pinned hand-off buffers) and
// returns them; where ``copies`` [B, H, F, 2, D] (the blocks' dtype) is not empty, the first F selected rows of
// each (row, KV head), key and value, are copied into it too (entries past the counts are left as they were).
std::vector<torch::Tensor> sparse_attention(torch::Tensor query, std::vector<torch::Tensor> blocks,
                                            torch::Tensor indices, torch::Tensor counts, double scaling,
                                            torch::Tensor out, torch::Tensor lse, torch::Tensor copies) {
  TORCH_CHECK(query.dtype() == torch::kFloat32 && query.is_contiguous(), "query must be contiguous float32");
  TORCH_CHECK(indices.dtype() == torch::kInt32 && indices.is_contiguous(), "indices must be contiguous int32");
  TORCH_CHECK(counts.dtype() == torch::kInt32 && counts.is_contiguous(), "counts must be contiguous int32");
  TORCH_CHECK(!blocks.empty() && blocks[0].dim() == 5 && blocks[0].size(3) == 2, "blocks must be [B, H, n, 2, D]");
  const auto batch = blocks[0].size(0), heads = blocks[0].size(1), block_size = blocks[0].size(2),
             d = blocks[0].size(4);
  const auto group = query.size(1) / heads, width = indices.size(2);
  TORCH_CHECK(query.size(0) == batch && query.size(1) == heads * group && query.size(2) == d, "query shape");
  TORCH_CHECK(indices.size(0) == batch && indices.size(1) == heads && counts.numel() == batch * heads, "index shape");
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.sizes() == query.sizes(),
              "out must be contiguous float32 shaped like the query");
  TORCH_CHECK(lse.dtype() == torch::kFloat32 && lse.is_contiguous() && lse.numel() == batch * heads * group,
              "lse must be contiguous float32 [B, Hq]");
  const int64_t copied = copies.numel() ? copies.size(2) : 0;
  TORCH_CHECK(!copied || (copies.dim() == 5 && copies.is_contiguous() && copies.scalar_type() == blocks[0].dtype()
                          && copies.size(0) == batch && copies.size(1) == heads && copied <= width
                          && copies.size(3) == 2 && copies.size(4) == d),
              "copies must be contiguous [B, H, F <= K, 2, D] in the blocks' dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, blocks[0].scalar_type(), "sparse_attention", [&] {
    std::vector<const scalar_t*> bp;
    for (const auto& block : blocks) {
      TORCH_CHECK(block.is_contiguous(), "blocks must be contiguous");
      bp.push_back(block.data_ptr<scalar_t>());
    }
    auto go = [&](auto fixed) {
      run<scalar_t, decltype(fixed)::value>(query.data_ptr<float>(), bp, indices.data_ptr<int32_t>(),
                                             counts.data_ptr<int32_t>(), batch, heads, group, d, width, block_size,
                                             static_cast<float>(scaling), out.data_ptr<float>(), lse.data_ptr<float>(),
                                             copied ? copies.data_ptr<scalar_t>() : nullptr, copied);
    };
    switch (group) {  // group sizes of common models get register-tiled loops
      case 1: go(std::integral_constant<int, 1>{}); break;
      case 2: go(std::integral_constant<int, 2>{}); break;
      case 4: go(std::integral_constant<int, 4>{}); break;
      case 8: go(std::integral_constant<int, 8>{}); break;
      default: go(std::integral_constant<int, 0>{});
    }
  });
  return {out, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("sparse_attention", &sparse_attention, "A2ATS CPU sparse attention"); }

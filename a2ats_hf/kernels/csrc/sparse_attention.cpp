// Sparse attention over the CPU KV store: for every (row, KV head), the selected rows of the offloaded keys and
// values are gathered straight from the store's blocks and attended by the KV group's query heads, with float32
// accumulation. Work is split into (row, KV head, chunk of selected rows) tasks run on torch's thread pool, and
// the chunks' partial softmaxes are merged by their log-sum-exps, so a batch of one still uses every core.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
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

template <typename T>
void run(const float* query, const std::vector<const T*>& key_blocks, const std::vector<const T*>& value_blocks,
         const int32_t* indices, const int32_t* counts, int64_t batch, int64_t heads, int64_t group, int64_t d,
         int64_t width, int64_t block_size, float scaling, float* out, float* lse) {
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
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));

  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(d), logits(kChunk * group);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = task_pair[t];
      const int64_t start = task_chunk[t] * kChunk;
      const int64_t n = std::min<int64_t>(kChunk, counts[p] - start);
      const int32_t* idx = indices + p * width + start;
      const int64_t base = p * block_size * d;  // (row, head) offset inside every block
      const float* q = query + p * group * d;
      auto key_at = [&](int64_t j) { return key_blocks[idx[j] / block_size] + base + (idx[j] % block_size) * d; };
      auto value_at = [&](int64_t j) { return value_blocks[idx[j] / block_size] + base + (idx[j] % block_size) * d; };

      float* m = maxes.data() + t * group;
      for (int64_t g = 0; g < group; ++g) m[g] = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        if (j + kPrefetch < n) prefetch_row(key_at(j + kPrefetch), row_bytes);
        load_row(key_at(j), row.data(), d);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = q + g * d;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < d; ++i) s += qg[i] * row[i];
          s *= scaling;
          logits[j * group + g] = s;
          m[g] = std::max(m[g], s);
        }
      }
      float* a = acc.data() + t * group * d;
      float* l = sums.data() + t * group;
      std::fill(a, a + group * d, 0.f);
      std::fill(l, l + group, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        if (j + kPrefetch < n) prefetch_row(value_at(j + kPrefetch), row_bytes);
        load_row(value_at(j), row.data(), d);
        for (int64_t g = 0; g < group; ++g) {
          const float w = std::exp(logits[j * group + g] - m[g]);
          l[g] += w;
          float* ag = a + g * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) ag[i] += w * row[i];
        }
      }
    }
  });

  // Merge each pair's chunks: out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c, lse = M + log(l).
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
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
    }
  });
}

}  // namespace

std::vector<torch::Tensor> sparse_attention(torch::Tensor query, std::vector<torch::Tensor> key_blocks,
                                            std::vector<torch::Tensor> value_blocks, torch::Tensor indices,
                                            torch::Tensor counts, double scaling) {
  TORCH_CHECK(query.dtype() == torch::kFloat32 && query.is_contiguous(), "query must be contiguous float32");
  TORCH_CHECK(indices.dtype() == torch::kInt32 && indices.is_contiguous(), "indices must be contiguous int32");
  TORCH_CHECK(counts.dtype() == torch::kInt32 && counts.is_contiguous(), "counts must be contiguous int32");
  TORCH_CHECK(!key_blocks.empty() && key_blocks.size() == value_blocks.size(), "need matching key/value blocks");
  const auto batch = key_blocks[0].size(0), heads = key_blocks[0].size(1), block_size = key_blocks[0].size(2),
             d = key_blocks[0].size(3);
  const auto group = query.size(1) / heads, width = indices.size(2);
  TORCH_CHECK(query.size(0) == batch && query.size(1) == heads * group && query.size(2) == d, "query shape");
  TORCH_CHECK(indices.size(0) == batch && indices.size(1) == heads && counts.numel() == batch * heads, "index shape");
  auto out = torch::empty({batch, heads * group, d}, query.options());
  auto lse = torch::empty({batch, heads * group}, query.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key_blocks[0].scalar_type(), "sparse_attention", [&] {
    std::vector<const scalar_t*> kp, vp;
    for (size_t i = 0; i < key_blocks.size(); ++i) {
      TORCH_CHECK(key_blocks[i].is_contiguous() && value_blocks[i].is_contiguous(), "blocks must be contiguous");
      kp.push_back(key_blocks[i].data_ptr<scalar_t>());
      vp.push_back(value_blocks[i].data_ptr<scalar_t>());
    }
    run<scalar_t>(query.data_ptr<float>(), kp, vp, indices.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), batch,
                  heads, group, d, width, block_size, static_cast<float>(scaling), out.data_ptr<float>(),
                  lse.data_ptr<float>());
  });
  return {out, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("sparse_attention", &sparse_attention, "A2ATS CPU sparse attention"); }

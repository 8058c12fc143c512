// Host threading: a loop over [0, n) split into contiguous chunks over std::threads.
#pragma once
#include <stdint.h>

#include <algorithm>
#include <thread>
#include <vector>

namespace fastjac {
namespace host {

// Multiply-adds worth a thread of its own: below this a started thread costs more than it saves
// (on a loaded machine a new thread can wait milliseconds for a core).
constexpr double kGrain = 4e6;

// Runs body(begin, end) over [0, n) split into at most `threads` contiguous chunks, fewer when
// the items (`cost` multiply-adds each) are too little work to share.
template <class F>
void parallel_for(int64_t n, double cost, int threads, F body) {
  const int64_t by_work = int64_t(double(n) * cost / kGrain);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>({int64_t(threads), n, by_work}));
  if (workers == 1) return body(int64_t(0), n);
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < workers; ++t)
    pool.emplace_back(body, n * t / workers, n * (t + 1) / workers);
  body(int64_t(0), n / workers);
  for (auto& th : pool) th.join();
}

}  // namespace host
}  // namespace fastjac

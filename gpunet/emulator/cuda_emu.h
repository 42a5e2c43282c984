// CUDA on the CPU: enough of the CUDA C++ device language to compile gpunet's .cu files with
// the host C++ compiler and run them, slowly but faithfully, without a GPU.
//
// How a launch runs
//   Blocks run one after another. The threads of a block are cooperative fibers (ucontext, one
//   64 KiB stack per thread, reused from block to block and launch to launch). A fiber runs until
//   it reaches __syncthreads(), a warp-synchronous call (__shfl_*_sync, __ballot_sync,
//   __syncwarp, ...) or its end, and only then does another fiber run. So between two barriers
//   each thread's code runs in one piece, and the *order* setting (forward, reverse, shuffled)
//   decides which thread goes first: a kernel that is missing a __syncthreads() reads values
//   another thread has not written yet in at least one order, instead of passing by luck.
//   A barrier releases once every thread of the block that has not returned has reached one
//   (as on Volta and later). A warp-synchronous call is a rendezvous: it completes once every
//   lane named in the mask that exists and has not returned has reached it. Reading a lane that
//   does not take part (outside the block, returned, or left out of the mask) gives all-ones
//   bytes (NaN for float/double), which is undefined on a GPU. A state no thread can leave
//   (some threads at a barrier, others at a shuffle) is reported as a deadlock.
//
// Shared memory
//   `__shared__` expands to `static thread_local`. Blocks run one at a time on one OS thread,
//   so one copy per variable is all a block needs, and thread_local puts every __shared__
//   variable of the library (and nothing else: this header keeps its own state out of TLS)
//   into the library's TLS block, which the scheduler fills with 0xFF bytes (a NaN for float
//   and double) at the start of each block. Reading shared memory that the block has not
//   written then shows up as NaN. (A plain `static` would do for storage, and a section
//   attribute would make the variables findable, but GCC drops attributes on static locals of
//   templates; thread_local is a storage class and survives.)
//   `extern __shared__ T name[]` cannot be expressed this way: kernels take dynamic shared
//   memory with GPUNET_DYNAMIC_SHARED(T, name) from kernels/common.cuh, which here returns the
//   launch's dynamic arena (also 0xFF-filled per block, 16-byte aligned).
//
// Limits of the emulation
//   One launch at a time per library (the Python side holds a lock); no memory checking
//   (out-of-bounds accesses are not caught); host assert() aborts the process, use __trap();
//   no textures, cooperative groups, half types or cudaMemcpyToSymbol; the host compiler does
//   not contract a*b+c into FMA as nvcc does, so results differ from a GPU in the last bits.
//
// Include this header once per shared library (it defines the exported helper functions),
// before the .cu files, and compile with -DGPUNET_EMULATOR.
#pragma once

#ifndef GPUNET_EMULATOR
#define GPUNET_EMULATOR 1
#endif

#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
// After <cmath>: brings the float overloads (exp(float), ...) into :: as CUDA has them.
#include <math.h>

// ---------------------------------------------------------------------------------------------
// Qualifiers. Everything is host code here.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __constant__
#define __managed__
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static thread_local

// ---------------------------------------------------------------------------------------------
// Vector types and built-in variables.
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
        : x(x_), y(y_), z(z_) {}
};

#define GPUNET_EMU_VEC2(T, name, align)                                                        \
    struct __attribute__((aligned(align))) name { T x, y; };                                   \
    inline name make_##name(T x, T y) { return name{x, y}; }
#define GPUNET_EMU_VEC4(T, name, align)                                                        \
    struct __attribute__((aligned(align))) name { T x, y, z, w; };                             \
    inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }
GPUNET_EMU_VEC2(float, float2, 8)
GPUNET_EMU_VEC4(float, float4, 16)
GPUNET_EMU_VEC2(double, double2, 16)
GPUNET_EMU_VEC2(int, int2, 8)
GPUNET_EMU_VEC4(int, int4, 16)
GPUNET_EMU_VEC2(unsigned int, uint2, 8)
GPUNET_EMU_VEC4(unsigned int, uint4, 16)
#undef GPUNET_EMU_VEC2
#undef GPUNET_EMU_VEC4

namespace gpunet_emu {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxThreads = 1024;
constexpr size_t kStackBytes = 64 * 1024;

// Plain globals, not thread_local: the TLS block must hold the __shared__ variables only, since
// all of it is overwritten at each block start.
inline uint3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;

enum class State : unsigned char { Runnable, AtBarrier, AtWarpSync, Done };
enum class WarpOp : unsigned char { Shuffle, Ballot, Sync };

struct Fiber {
    ucontext_t ctx;
    uint3 tid;
    unsigned lane, warp;
    State state;
    // What this lane brought to a warp-synchronous call, and what it takes away.
    WarpOp op;
    unsigned mask;
    int src;  // lane to read from; -1: keep own value
    unsigned char value[16], result[16];
};

struct Warp {
    unsigned live;     // lanes that exist in this block and have not returned
    unsigned arrived;  // lanes waiting in a warp-synchronous call
};

struct Scheduler {
    Fiber* fibers = nullptr;
    unsigned capacity = 0, nthreads = 0;
    unsigned char* stacks = nullptr;
    size_t stacks_bytes = 0;
    Warp warps[kMaxThreads / kWarpSize];
    unsigned order_buf[kMaxThreads];
    ucontext_t home;  // the scheduler's own context
    Fiber* current = nullptr;
    unsigned alive = 0, at_barrier = 0;
    // For __syncthreads_count/_and/_or: votes so far, and the count and number of voters of
    // the barrier last released (stable until every thread has resumed from it).
    unsigned barrier_votes = 0, barrier_result = 0, barrier_voters = 0;
    void (*body)(void*) = nullptr;
    void* body_arg = nullptr;
    unsigned char* dynamic = nullptr;
    size_t dynamic_bytes = 0, dynamic_capacity = 0;
    unsigned char* tls = nullptr;  // this library's TLS block on the launching thread
    size_t tls_bytes = 0;
    bool failed = false;
    char error[1024] = {0};
};
inline Scheduler g;

// Touched before looking the TLS block up, so that the block exists on this thread. It is part
// of the 0xFF fill, which does not matter: nothing reads it.
static thread_local unsigned char tls_anchor;

// splitmix64: a small, portable generator, so "shuffled" with a seed is the same everywhere.
struct Rng {
    uint64_t s;
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    uint64_t below(uint64_t n) { return next() % n; }
};

inline void set_error(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline void set_error(const char* fmt, ...) {
    if (g.failed) return;  // keep the first cause
    g.failed = true;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g.error, sizeof g.error, fmt, ap);
    va_end(ap);
}

// Give control back to the scheduler; returns when the scheduler resumes this thread.
inline void yield() {
    asm volatile("" ::: "memory");
    swapcontext(&g.current->ctx, &g.home);
    asm volatile("" ::: "memory");
}

// Stop the whole launch from inside a thread (deadlock found, __trap(), misuse): the
// scheduler sees `failed` and abandons the block; this fiber is never resumed.
[[noreturn]] inline void abort_thread() {
    g.current->state = State::Done;
    swapcontext(&g.current->ctx, &g.home);
    __builtin_unreachable();
}

inline const char* trap_site(const uint3& t) {
    static char buf[128];
    snprintf(buf, sizeof buf, "block (%u, %u, %u), thread (%u, %u, %u)", block_idx.x,
             block_idx.y, block_idx.z, t.x, t.y, t.z);
    return buf;
}

// --- warp-synchronous calls ------------------------------------------------------------------

// If every live lane of `mask` has arrived, carry out the call for all of them and make them
// runnable. The last lane to arrive (or the last lane of the mask to return) does this, so each
// lane's result is in its own Fiber before any of them runs on.
inline bool try_complete(unsigned warp, unsigned mask) {
    Warp& w = g.warps[warp];
    const unsigned need = mask & w.live;
    if (need == 0 || (w.arrived & need) != need) return false;
    Fiber* lanes = g.fibers + warp * kWarpSize;
    unsigned ballot = 0;
    for (unsigned l = 0; l < kWarpSize; ++l) {
        if (!(need >> l & 1)) continue;
        const Fiber& f = lanes[l];
        if (f.mask != mask || f.op != lanes[__builtin_ctz(need)].op) {
            set_error("warp %u of block (%u, %u, %u): lanes meet in different warp-synchronous "
                      "calls or with different masks (0x%08x and 0x%08x)",
                      warp, block_idx.x, block_idx.y, block_idx.z, f.mask, mask);
            return true;
        }
        if (f.op == WarpOp::Ballot) {
            unsigned pred;
            std::memcpy(&pred, f.value, sizeof pred);
            if (pred) ballot |= 1u << l;
        }
    }
    for (unsigned l = 0; l < kWarpSize; ++l) {
        if (!(need >> l & 1)) continue;
        Fiber& f = lanes[l];
        if (f.op == WarpOp::Shuffle) {
            if (f.src < 0)
                std::memcpy(f.result, f.value, sizeof f.value);
            else if (need >> f.src & 1)
                std::memcpy(f.result, lanes[f.src].value, sizeof f.value);
            else  // the source lane takes no part: undefined on a GPU, NaN here
                std::memset(f.result, 0xFF, sizeof f.result);
        } else if (f.op == WarpOp::Ballot) {
            std::memcpy(f.result, &ballot, sizeof ballot);
            std::memcpy(f.result + 4, &need, sizeof need);
        }
        f.state = State::Runnable;
    }
    w.arrived &= ~need;
    return true;
}

// The calling lane brings `n` bytes of `value`; returns its result in `out`.
inline void warp_call(WarpOp op, unsigned mask, const void* value, size_t n, int src, void* out) {
    Fiber& f = *g.current;
    if (!(mask >> f.lane & 1)) {
        set_error("%s: lane %u called a warp-synchronous function with mask 0x%08x, which does "
                  "not include the lane", trap_site(f.tid), f.lane, mask);
        abort_thread();
    }
    // A lane that others are waiting for must join their call, not another one (on a GPU
    // the result is undefined). Seen only when the waiting lanes ran first: one more reason
    // to test in several orders.
    const Fiber* lanes = g.fibers + f.warp * kWarpSize;
    for (unsigned l = 0, waiting = g.warps[f.warp].arrived; l < kWarpSize; ++l)
        if ((waiting >> l & 1) && (lanes[l].mask >> f.lane & 1) &&
            (lanes[l].mask != mask || lanes[l].op != op)) {
            set_error("%s: lane %u enters a warp-synchronous call with mask 0x%08x while lane "
                      "%u waits for it in another call (mask 0x%08x)",
                      trap_site(f.tid), f.lane, mask, l, lanes[l].mask);
            abort_thread();
        }
    f.op = op;
    f.mask = mask;
    f.src = src;
    std::memset(f.value, 0, sizeof f.value);
    std::memcpy(f.value, value, n);
    g.warps[f.warp].arrived |= 1u << f.lane;
    f.state = State::AtWarpSync;
    if (!try_complete(f.warp, mask)) yield();
    if (g.failed) abort_thread();
    std::memcpy(out, f.result, n);
}

template <typename T>
inline T shuffle(unsigned mask, T v, int src) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16,
                  "warp shuffles take values of at most 16 bytes");
    T out;
    warp_call(WarpOp::Shuffle, mask, &v, sizeof v, src, &out);
    return out;
}

inline unsigned lane_id() { return g.current->lane; }

// The block's dynamic shared memory (GPUNET_DYNAMIC_SHARED in kernels/common.cuh).
template <typename T>
inline T* dynamic_shared() {
    return reinterpret_cast<T*>(g.dynamic);
}

// --- the scheduler ---------------------------------------------------------------------------

// Called on the fiber's own stack; returning resumes g.home through uc_link.
inline void fiber_main() {
    g.body(g.body_arg);
    Fiber& f = *g.current;
    f.state = State::Done;
    --g.alive;
    Warp& w = g.warps[f.warp];
    w.live &= ~(1u << f.lane);
    // Lanes waiting for this one in a warp-synchronous call may now be complete.
    for (unsigned l = 0; l < kWarpSize && w.arrived; ++l)
        if (w.arrived >> l & 1) try_complete(f.warp, g.fibers[f.warp * kWarpSize + l].mask);
}

inline bool reserve_fibers(unsigned n) {
    if (n <= g.capacity) return true;
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t slot = kStackBytes + page;
    if (g.stacks) munmap(g.stacks, g.stacks_bytes);
    delete[] g.fibers;
    g.fibers = nullptr;
    g.capacity = 0;
    void* mem = mmap(nullptr, slot * n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
    if (mem == MAP_FAILED) {
        g.stacks = nullptr;
        set_error("could not map %u thread stacks of %zu bytes", n, kStackBytes);
        return false;
    }
    g.stacks = static_cast<unsigned char*>(mem);
    g.stacks_bytes = slot * n;
    g.fibers = new Fiber[n];
    for (unsigned i = 0; i < n; ++i) {
        // A guard page below each stack turns a stack overflow into a crash, not corruption.
        mprotect(g.stacks + i * slot, page, PROT_NONE);
        getcontext(&g.fibers[i].ctx);
        g.fibers[i].ctx.uc_stack.ss_sp = g.stacks + i * slot + page;
        g.fibers[i].ctx.uc_stack.ss_size = kStackBytes;
    }
    g.capacity = n;
    return true;
}

inline bool reserve_dynamic(size_t bytes) {
    g.dynamic_bytes = bytes;
    if (bytes <= g.dynamic_capacity && g.dynamic) return true;
    std::free(g.dynamic);
    const size_t cap = (bytes + 15) / 16 * 16 + 16;
    g.dynamic = static_cast<unsigned char*>(std::aligned_alloc(16, cap));
    g.dynamic_capacity = g.dynamic ? cap : 0;
    if (!g.dynamic) set_error("could not allocate %zu bytes of dynamic shared memory", bytes);
    return g.dynamic != nullptr;
}

struct TlsSearch {
    void* base;
    unsigned char* data;
    size_t bytes;
};

inline int find_tls(dl_phdr_info* info, size_t, void* p) {
    auto* s = static_cast<TlsSearch*>(p);
    if (reinterpret_cast<void*>(info->dlpi_addr) != s->base) return 0;
    for (int i = 0; i < info->dlpi_phnum; ++i)
        if (info->dlpi_phdr[i].p_type == PT_TLS) {
            s->data = static_cast<unsigned char*>(info->dlpi_tls_data);
            s->bytes = info->dlpi_phdr[i].p_memsz;
        }
    return 1;
}

// This library's TLS block (its __shared__ variables) on the calling thread.
inline void locate_shared() {
    *reinterpret_cast<volatile unsigned char*>(&tls_anchor) = 0;
    Dl_info info;
    TlsSearch s{nullptr, nullptr, 0};
    if (dladdr(reinterpret_cast<void*>(&locate_shared), &info)) s.base = info.dli_fbase;
    dl_iterate_phdr(find_tls, &s);
    g.tls = s.data;
    g.tls_bytes = s.data ? s.bytes : 0;
}

inline void run_block(unsigned order, Rng& rng) {
    const unsigned n = g.nthreads;
    if (g.tls_bytes) std::memset(g.tls, 0xFF, g.tls_bytes);
    if (g.dynamic) std::memset(g.dynamic, 0xFF, g.dynamic_capacity);
    for (unsigned w = 0; w < (n + kWarpSize - 1) / kWarpSize; ++w) {
        const unsigned lanes = n - w * kWarpSize < kWarpSize ? n - w * kWarpSize : kWarpSize;
        g.warps[w].live = lanes == 32 ? 0xFFFFFFFFu : (1u << lanes) - 1;
        g.warps[w].arrived = 0;
    }
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = g.fibers[i];
        f.ctx.uc_link = &g.home;
        makecontext(&f.ctx, fiber_main, 0);
        f.state = State::Runnable;
    }
    g.alive = n;
    g.at_barrier = 0;
    g.barrier_votes = 0;
    for (;;) {
        // One round: every thread runnable now runs once, until it blocks or returns.
        unsigned count = 0;
        for (unsigned i = 0; i < n; ++i)
            if (g.fibers[i].state == State::Runnable) g.order_buf[count++] = i;
        if (order == 1) {
            for (unsigned i = 0; i < count / 2; ++i)
                std::swap(g.order_buf[i], g.order_buf[count - 1 - i]);
        } else if (order == 2) {
            for (unsigned i = count; i > 1; --i)
                std::swap(g.order_buf[i - 1], g.order_buf[rng.below(i)]);
        }
        for (unsigned k = 0; k < count; ++k) {
            Fiber& f = g.fibers[g.order_buf[k]];
            g.current = &f;
            thread_idx = f.tid;
            swapcontext(&g.home, &f.ctx);
            if (g.failed) return;
        }
        if (count) continue;
        if (g.alive == 0) return;
        if (g.at_barrier == g.alive) {
            g.barrier_result = g.barrier_votes;
            g.barrier_voters = g.at_barrier;
            g.barrier_votes = 0;
            g.at_barrier = 0;
            for (unsigned i = 0; i < n; ++i)
                if (g.fibers[i].state == State::AtBarrier) g.fibers[i].state = State::Runnable;
            continue;
        }
        unsigned at_warp = 0, first_warp = 0, first_barrier = 0;
        for (unsigned i = n; i-- > 0;) {
            if (g.fibers[i].state == State::AtWarpSync) ++at_warp, first_warp = i;
            if (g.fibers[i].state == State::AtBarrier) first_barrier = i;
        }
        set_error("deadlock in block (%u, %u, %u): %u thread(s) wait at __syncthreads() "
                  "(first: thread %u) while %u wait in a warp-synchronous call (first: thread "
                  "%u) for lanes that never arrive",
                  block_idx.x, block_idx.y, block_idx.z, g.at_barrier, first_barrier, at_warp,
                  first_warp);
        return;
    }
}

// Run body(arg) as every thread of every block. dims = grid x, y, z, block x, y, z.
// order: 0 forward, 1 reverse, 2 shuffled (blocks and threads), seeded by `seed`.
inline int run_grid(void (*body)(void*), void* arg, const unsigned* dims,
                    unsigned long long dynamic_bytes, int order, unsigned long long seed) {
    g.failed = false;
    g.error[0] = 0;
    const dim3 grid(dims[0], dims[1], dims[2]), block(dims[3], dims[4], dims[5]);
    const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
    if (threads == 0 || threads > kMaxThreads || grid.x == 0 || grid.y == 0 || grid.z == 0) {
        set_error("bad launch: grid (%u, %u, %u), block (%u, %u, %u)", grid.x, grid.y, grid.z,
                  block.x, block.y, block.z);
        return 1;
    }
    if (!reserve_fibers((unsigned)threads) || !reserve_dynamic(dynamic_bytes)) return 1;
    locate_shared();
    g.nthreads = (unsigned)threads;
    g.body = body;
    g.body_arg = arg;
    grid_dim = grid;
    block_dim = block;
    for (unsigned i = 0; i < g.nthreads; ++i) {
        Fiber& f = g.fibers[i];
        f.tid = uint3{i % block.x, i / block.x % block.y, i / (block.x * block.y)};
        f.lane = i % kWarpSize;
        f.warp = i / kWarpSize;
    }
    Rng rng{seed};
    const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
    // Shuffled block order without a table: b -> (a*b + c) mod blocks with gcd(a, blocks) = 1.
    unsigned long long a = 1, c = 0;
    if (order == 2 && blocks > 1) {
        auto gcd = [](unsigned long long x, unsigned long long y) {
            while (y) x %= y, std::swap(x, y);
            return x;
        };
        do a = 1 + rng.below(blocks - 1); while (gcd(a, blocks) != 1);
        c = rng.below(blocks);
    }
    for (unsigned long long b = 0; b < blocks; ++b) {
        unsigned long long lin = b;
        if (order == 1) lin = blocks - 1 - b;
        if (order == 2) lin = (unsigned long long)(((unsigned __int128)a * b + c) % blocks);
        block_idx = uint3{(unsigned)(lin % grid.x), (unsigned)(lin / grid.x % grid.y),
                          (unsigned)(lin / ((unsigned long long)grid.x * grid.y))};
        run_block((unsigned)order, rng);
        if (g.failed) return 1;
    }
    return 0;
}

// --- calling a kernel with arguments from Python ---------------------------------------------

// args[i] points at the i-th argument's bytes: a pointer-sized slot holding the array's address,
// or the scalar itself with the parameter's exact width.
template <typename... P, std::size_t... I>
inline void call_kernel(void (*k)(P...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(args[I])...);
}

template <typename... P>
inline int launch(void (*k)(P...), void** args, const unsigned* dims,
                  unsigned long long dynamic_bytes, int order, unsigned long long seed) {
    struct Call {
        void (*k)(P...);
        void** args;
    } call{k, args};
    auto body = [](void* p) {
        auto* c = static_cast<Call*>(p);
        call_kernel(c->k, c->args, std::index_sequence_for<P...>{});
    };
    return run_grid(body, &call, dims, dynamic_bytes, order, seed);
}

// A parameter's type as the Python side checks it: "f4" float, "i4" int, "u8" unsigned long
// long, "b1" bool, "*f8" pointer to double, "*v" pointer to void, "?N" anything else.
template <typename T>
inline int type_code(char* out, size_t n) {
    using U = std::remove_cv_t<T>;
    if (std::is_same<U, bool>::value) return snprintf(out, n, "b1");
    if (std::is_floating_point<U>::value) return snprintf(out, n, "f%zu", sizeof(U));
    if (std::is_integral<U>::value)
        return snprintf(out, n, "%c%zu", std::is_signed<U>::value ? 'i' : 'u', sizeof(U));
    return snprintf(out, n, "?%zu", sizeof(U));
}

template <typename P>
inline int param_code(char* out, size_t n) {
    using U = std::remove_cv_t<std::remove_reference_t<P>>;
    if constexpr (std::is_pointer<U>::value) {
        using E = std::remove_cv_t<std::remove_pointer_t<U>>;
        if constexpr (std::is_void<E>::value) return snprintf(out, n, "*v");
        else if constexpr (std::is_pointer<E>::value || std::is_class<E>::value)
            return snprintf(out, n, "*?");
        else return snprintf(out, n, "*") + type_code<E>(out + 1, n - 1);
    } else {
        return type_code<U>(out, n);
    }
}

template <typename T>
struct Tag {
    using type = T;
};

// Comma-separated parameter codes of kernel k, e.g. "*f4,*f4,i4".
template <typename... P>
inline const char* signature(void (*)(P...)) {
    static char buf[1024];
    size_t at = 0;
    auto add = [&](auto tag) {
        if (at) buf[at++] = ',';
        at += param_code<typename decltype(tag)::type>(buf + at, sizeof buf - at);
    };
    (add(Tag<P>{}), ...);
    buf[at] = 0;
    return buf;
}

}  // namespace gpunet_emu

inline const uint3& threadIdx = gpunet_emu::thread_idx;
inline const uint3& blockIdx = gpunet_emu::block_idx;
inline const dim3& blockDim = gpunet_emu::block_dim;
inline const dim3& gridDim = gpunet_emu::grid_dim;
inline constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// Synchronisation.
inline void __syncthreads() {
    gpunet_emu::Fiber& f = *gpunet_emu::g.current;
    f.state = gpunet_emu::State::AtBarrier;
    ++gpunet_emu::g.at_barrier;
    gpunet_emu::yield();
    if (gpunet_emu::g.failed) gpunet_emu::abort_thread();
}
inline int __syncthreads_count(int pred) {
    gpunet_emu::g.barrier_votes += pred != 0;
    __syncthreads();
    return (int)gpunet_emu::g.barrier_result;  // read before any thread can reach the next one
}
inline int __syncthreads_and(int pred) {
    return __syncthreads_count(pred) == (int)gpunet_emu::g.barrier_voters;
}
inline int __syncthreads_or(int pred) { return __syncthreads_count(pred) != 0; }

inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
    unsigned none = 0;
    gpunet_emu::warp_call(gpunet_emu::WarpOp::Sync, mask, &none, sizeof none, -1, &none);
}
inline void __threadfence() { asm volatile("" ::: "memory"); }
inline void __threadfence_block() { asm volatile("" ::: "memory"); }
inline void __threadfence_system() { asm volatile("" ::: "memory"); }

[[noreturn]] inline void __trap() {
    gpunet_emu::set_error("__trap() in %s", gpunet_emu::trap_site(threadIdx));
    gpunet_emu::abort_thread();
}

// ---------------------------------------------------------------------------------------------
// Warp shuffles, votes. width must be a power of two <= 32; lanes are split into segments of
// `width` as on the GPU, and a source outside the caller's segment (up, down, xor) keeps the
// caller's own value.
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    const int lane = (int)gpunet_emu::lane_id();
    const int src = (lane & ~(width - 1)) + (src_lane & (width - 1));
    return gpunet_emu::shuffle(mask, v, src);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const int lane = (int)gpunet_emu::lane_id();
    const int src = (lane & (width - 1)) < (int)delta ? -1 : lane - (int)delta;
    return gpunet_emu::shuffle(mask, v, src);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const int lane = (int)gpunet_emu::lane_id();
    const int src = (lane & (width - 1)) + (int)delta >= width ? -1 : lane + (int)delta;
    return gpunet_emu::shuffle(mask, v, src);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    const int lane = (int)gpunet_emu::lane_id();
    const int src = lane ^ lane_mask;
    const int last = (lane & ~(width - 1)) + width - 1;
    return gpunet_emu::shuffle(mask, v, src > last || src > 31 ? -1 : src);
}

inline unsigned gpunet_emu_vote(unsigned mask, int pred, unsigned* need) {
    unsigned p[2] = {pred != 0, 0}, out[2];  // out: the ballot, and the lanes that voted
    gpunet_emu::warp_call(gpunet_emu::WarpOp::Ballot, mask, p, sizeof p, -1, out);
    *need = out[1];
    return out[0];
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    unsigned need;
    return gpunet_emu_vote(mask, pred, &need);
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {
    unsigned need;
    return gpunet_emu_vote(mask, pred, &need) == need;
}
inline unsigned __activemask() {
    return gpunet_emu::g.warps[gpunet_emu::g.current->warp].live;
}

// ---------------------------------------------------------------------------------------------
// Atomics. Threads only switch at barriers and warp calls, so a plain read-modify-write is
// atomic. Only the overloads CUDA has are declared, so what compiles here compiles there.
#define GPUNET_EMU_ATOMIC(name, T, expr)                                                        \
    inline T name(T* address, T val) {                                                         \
        T old = *address;                                                                      \
        *address = (expr);                                                                     \
        return old;                                                                            \
    }
GPUNET_EMU_ATOMIC(atomicAdd, int, old + val)
GPUNET_EMU_ATOMIC(atomicAdd, unsigned int, old + val)
GPUNET_EMU_ATOMIC(atomicAdd, unsigned long long, old + val)
GPUNET_EMU_ATOMIC(atomicAdd, float, old + val)
GPUNET_EMU_ATOMIC(atomicAdd, double, old + val)
GPUNET_EMU_ATOMIC(atomicSub, int, old - val)
GPUNET_EMU_ATOMIC(atomicSub, unsigned int, old - val)
GPUNET_EMU_ATOMIC(atomicExch, int, val)
GPUNET_EMU_ATOMIC(atomicExch, unsigned int, val)
GPUNET_EMU_ATOMIC(atomicExch, unsigned long long, val)
GPUNET_EMU_ATOMIC(atomicExch, float, val)
GPUNET_EMU_ATOMIC(atomicMin, int, val < old ? val : old)
GPUNET_EMU_ATOMIC(atomicMin, unsigned int, val < old ? val : old)
GPUNET_EMU_ATOMIC(atomicMin, long long, val < old ? val : old)
GPUNET_EMU_ATOMIC(atomicMin, unsigned long long, val < old ? val : old)
GPUNET_EMU_ATOMIC(atomicMax, int, val > old ? val : old)
GPUNET_EMU_ATOMIC(atomicMax, unsigned int, val > old ? val : old)
GPUNET_EMU_ATOMIC(atomicMax, long long, val > old ? val : old)
GPUNET_EMU_ATOMIC(atomicMax, unsigned long long, val > old ? val : old)
GPUNET_EMU_ATOMIC(atomicAnd, int, old & val)
GPUNET_EMU_ATOMIC(atomicAnd, unsigned int, old & val)
GPUNET_EMU_ATOMIC(atomicAnd, unsigned long long, old & val)
GPUNET_EMU_ATOMIC(atomicOr, int, old | val)
GPUNET_EMU_ATOMIC(atomicOr, unsigned int, old | val)
GPUNET_EMU_ATOMIC(atomicOr, unsigned long long, old | val)
GPUNET_EMU_ATOMIC(atomicXor, int, old ^ val)
GPUNET_EMU_ATOMIC(atomicXor, unsigned int, old ^ val)
GPUNET_EMU_ATOMIC(atomicXor, unsigned long long, old ^ val)
GPUNET_EMU_ATOMIC(atomicInc, unsigned int, old >= val ? 0u : old + 1u)
GPUNET_EMU_ATOMIC(atomicDec, unsigned int, (old == 0u || old > val) ? val : old - 1u)
#undef GPUNET_EMU_ATOMIC

#define GPUNET_EMU_CAS(T)                                                                      \
    inline T atomicCAS(T* address, T compare, T val) {                                        \
        T old = *address;                                                                      \
        if (old == compare) *address = val;                                                    \
        return old;                                                                            \
    }
GPUNET_EMU_CAS(int)
GPUNET_EMU_CAS(unsigned int)
GPUNET_EMU_CAS(unsigned long long)
GPUNET_EMU_CAS(unsigned short)
#undef GPUNET_EMU_CAS

// ---------------------------------------------------------------------------------------------
// Math. expf, logf, tanhf, sqrtf, fmaxf, ... and the float overloads of exp, log, ... come from
// <cmath>/<math.h>. Below: CUDA's extra functions and intrinsics, at full precision (the GPU's
// fast intrinsics are less exact, so a test tolerance that passes on the GPU passes here).
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline double rcbrt(double x) { return 1.0 / cbrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline double __dadd_rn(double x, double y) { return x + y; }
inline double __dmul_rn(double x, double y) { return x * y; }
inline double __fma_rn(double x, double y, double z) { return fma(x, y, z); }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }
inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
inline double normcdf(double x) { return 0.5 * erfc(-x * 0.70710678118654752); }

inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline float __int2float_rn(int x) { return (float)x; }
inline int __double2int_rn(double x) { return (int)nearbyint(x); }
inline float __double2float_rn(double x) { return (float)x; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }
inline long long __double_as_longlong(double x) { long long i; std::memcpy(&i, &x, 8); return i; }
inline double __longlong_as_double(long long i) { double x; std::memcpy(&x, &i, 8); return x; }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i, x >>= 1) r = (r << 1) | (x & 1u);
    return r;
}
inline int __mul24(int x, int y) { return x * y; }
inline int __mulhi(int x, int y) { return (int)(((long long)x * y) >> 32); }
inline unsigned __umulhi(unsigned x, unsigned y) {
    return (unsigned)(((unsigned long long)x * y) >> 32);
}

template <typename T>
inline T __ldg(const T* p) { return *p; }

// CUDA's max/min overloads (the device headers declare them in the global namespace).
#define GPUNET_EMU_MINMAX(R, A, B)                                                              \
    inline R max(A a, B b) { return (R)a > (R)b ? (R)a : (R)b; }                                \
    inline R min(A a, B b) { return (R)a < (R)b ? (R)a : (R)b; }
GPUNET_EMU_MINMAX(int, int, int)
GPUNET_EMU_MINMAX(unsigned int, unsigned int, unsigned int)
GPUNET_EMU_MINMAX(unsigned int, int, unsigned int)
GPUNET_EMU_MINMAX(unsigned int, unsigned int, int)
GPUNET_EMU_MINMAX(long long, long long, long long)
GPUNET_EMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
GPUNET_EMU_MINMAX(long, long, long)
GPUNET_EMU_MINMAX(unsigned long, unsigned long, unsigned long)
#undef GPUNET_EMU_MINMAX
// For floating point, max/min follow fmaxf/fmin: a NaN operand loses to a number.
inline float max(float a, float b) { return fmaxf(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double max(double a, float b) { return fmax(a, b); }
inline double min(double a, float b) { return fmin(a, b); }

// ---------------------------------------------------------------------------------------------
// The library's exported functions. GPUNET_EMU_ENTRY(id, name expression) is written by the
// Python side once per kernel instantiation.
#define GPUNET_EMU_EXPORT extern "C" __attribute__((visibility("default")))

GPUNET_EMU_EXPORT const char* gpunet_emu_last_error() { return gpunet_emu::g.error; }

// Bytes of static __shared__ memory of all kernels in the library (per kernel: Python side).
GPUNET_EMU_EXPORT unsigned long long gpunet_emu_static_shared_bytes() {
    gpunet_emu::locate_shared();
    return gpunet_emu::g.tls_bytes;
}

#define GPUNET_EMU_ENTRY(id, ...)                                                               \
    GPUNET_EMU_EXPORT int gpunet_emu_launch_##id(void** args, const unsigned* dims,             \
                                                 unsigned long long dynamic_bytes, int order,   \
                                                 unsigned long long seed) {                     \
        return gpunet_emu::launch(&__VA_ARGS__, args, dims, dynamic_bytes, order, seed);        \
    }                                                                                           \
    GPUNET_EMU_EXPORT const char* gpunet_emu_signature_##id() {                                 \
        return gpunet_emu::signature(&__VA_ARGS__);                                             \
    }

/* owlsparse.c: owlctl's sparse Linear kernels for CPUs (y = x W^T + b with W stored as its nonzeros).

   Format ("bitmask"), built by owlctl/deploy/kernels/linear.py:
     mask  uint16 (n_out, ng): bit c of word j of row r is set when W[r, 16 j + c] != 0. ng is
           ceil(n_in / 16) rounded up to a multiple of 4, so one row's mask is whole 64-bit words; the
           padding bits are 0.
     vals  the nonzeros of each row in column order, rows one after another, in the weight's dtype
           (float32, bfloat16 or float16), followed by at least OWL_VPAD zeros: vector loads of 16 values
           may start at any nonzero and run past it.
     rp    int64 (n_out + 1): rp[r] is the index in vals of row r's first nonzero.
     bias  float32 (n_out) or NULL.
   Bytes per weight at density d: d x value size + 1/8, i.e. 0.33x dense at 70% sparsity in float32 and
   0.36x in bfloat16. Products are accumulated in float32 whatever the stored dtype.

   Decode (one token, T = 1) streams the matrix once: memory bound. Several tokens (prefill, batches) go in
   tiles of OWL_TT tokens transposed into a buffer (input-major, 64 tokens per input) whose chunks of
   OWL_KC inputs stay in L1 while the rows of a block of OWL_RB rows are applied to them; a row block's
   values stay in L2 across the tiles of a super-tile, so the matrix is read from memory once per
   OWL_ST tokens.

   Threads: a persistent pool (workers created on first use; they spin briefly, yield, then sleep on a
   condition variable, so an idle pool costs nothing). Rows are split across threads at points that balance
   the bytes each thread reads (nonzeros x value size + mask), computed when the matrix is set up. Each row
   is computed by one thread in an order that does not depend on the split, so results are bit-identical
   for every thread count.

   ISAs: one library holds three variants selected at run time (or forced by the caller): AVX-512 (masked
   expand of 16 values per mask word), AVX2 (an 8-bit mask -> permutation lookup table, vpermps and a zeroing
   mask) and portable C. Compiled without -march: each variant carries its own target attribute and is
   only called after __builtin_cpu_supports says the CPU (and OS) has it. */

#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define OWL_X86 1
#include <immintrin.h>
#else
#define OWL_X86 0
#endif

#define OWL_API __attribute__((visibility("default")))
#define OWL_INLINE static inline __attribute__((always_inline))

#define OWL_ABI 2           /* bumped when a signature or owl_mat changes; checked by linear.py */
#define OWL_MAX_THREADS 256
#define OWL_CHUNKS_PER_THREAD 4  /* row chunks per thread, claimed dynamically */
#define OWL_MAX_CHUNKS (OWL_CHUNKS_PER_THREAD * OWL_MAX_THREADS)
#define OWL_VPAD 32         /* zeros after the last value (the widest read is 16 values from a nonzero) */
#define OWL_TT 64           /* tokens per tile (4 vectors of 16) */
#define OWL_KC 8            /* mask words (of 16 inputs) per chunk at 64 tokens: 128 x 64 x 4 B = 32 KiB */
#define OWL_KCMAX 32        /* narrower tiles take wider chunks (32 / vectors words): same 32 KiB */
#define OWL_RB 128          /* rows per block */
#define OWL_ST 4            /* tiles per super-tile: 256 tokens */

enum { OWL_F32 = 0, OWL_BF16 = 1, OWL_F16 = 2 };
enum { OWL_PORTABLE = 0, OWL_AVX2 = 1, OWL_AVX512 = 2, OWL_AVX512V = 3, OWL_NISA = 4 };
enum { OWL_OK = 0, OWL_EARG = -1, OWL_EISA = -2, OWL_ENOMEM = -3 };

/* ------------------------------------------------------------------ scalar conversions */

OWL_INLINE float owl_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
OWL_INLINE uint32_t owl_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

OWL_INLINE float owl_bf16_f32(uint16_t h) { return owl_bits_f32((uint32_t)h << 16); }

OWL_INLINE uint16_t owl_f32_bf16(float f) {  /* round to nearest even; NaN -> 0x7fc0 as torch does */
    uint32_t u = owl_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static float owl_f16_f32(uint16_t h) {  /* exact */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp) {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (!man) {
        u = sign;
    } else {  /* subnormal: shift the leading 1 up to the implicit bit */
        uint32_t e = 113;
        while (!(man & 0x400u)) { man <<= 1; --e; }
        u = sign | (e << 23) | ((man & 0x3ffu) << 13);
    }
    return owl_bits_f32(u);
}

static uint16_t owl_f32_f16(float f) {  /* round to nearest even */
    uint32_t u = owl_f32_bits(f);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) return sign | 0x7e00u;          /* NaN */
    if (u >= 0x477ff000u) return sign | 0x7c00u;         /* >= 65520 rounds to infinity */
    if (u >= 0x38800000u) {                               /* normal half: rebias the exponent, round */
        uint32_t r = u - 0x38000000u;
        r += 0xfffu + ((r >> 13) & 1u);
        return sign | (uint16_t)(r >> 13);
    }
    /* subnormal half: adding 0.5 leaves the value's multiple of 2^-24 (rounded to even) in the low bits */
    const float t = owl_bits_f32(u) + 0.5f;
    return sign | (uint16_t)(owl_f32_bits(t) - 0x3f000000u);
}

OWL_INLINE float owl_load_val(const void *v, int64_t i, int vd) {
    if (vd == OWL_F32) return ((const float *)v)[i];
    if (vd == OWL_BF16) return owl_bf16_f32(((const uint16_t *)v)[i]);
    return owl_f16_f32(((const uint16_t *)v)[i]);
}

OWL_INLINE void owl_store_val(void *y, int64_t i, float f, int dt) {
    if (dt == OWL_F32) ((float *)y)[i] = f;
    else if (dt == OWL_BF16) ((uint16_t *)y)[i] = owl_f32_bf16(f);
    else ((uint16_t *)y)[i] = owl_f32_f16(f);
}

/* ------------------------------------------------------------------ lookup tables (built once) */

static int32_t owl_lut_expand[256][8] __attribute__((aligned(32)));  /* lane -> value slot, or sign bit: zero */
static uint8_t owl_lut_pos[256][8] __attribute__((aligned(8)));      /* the set bits' lane numbers, in order */
static uint8_t owl_lut_pc[256];                                      /* popcount of a byte */
static pthread_once_t owl_once = PTHREAD_ONCE_INIT;

static void owl_pool_atfork_child(void);
static int owl_isa_detect(int isa);
static int owl_isa_have[OWL_NISA];  /* filled once by owl_init_once */

static void owl_init_once(void) {
    for (int b = 0; b < 256; ++b) {
        int n = 0;
        for (int i = 0; i < 8; ++i) {
            owl_lut_pos[b][i] = 0;
            if (b >> i & 1) {
                owl_lut_expand[b][i] = n;
                owl_lut_pos[b][n++] = (uint8_t)i;
            } else {
                owl_lut_expand[b][i] = INT32_MIN;
            }
        }
        owl_lut_pc[b] = (uint8_t)n;
    }
    for (int isa = OWL_PORTABLE; isa < OWL_NISA; ++isa) owl_isa_have[isa] = owl_isa_detect(isa);
    pthread_atfork(NULL, NULL, owl_pool_atfork_child);
}

OWL_INLINE int owl_pc16(unsigned m) { return owl_lut_pc[m & 0xff] + owl_lut_pc[(m >> 8) & 0xff]; }

/* ------------------------------------------------------------------ CPU features */

static int owl_isa_detect(int isa) {
    if (isa == OWL_PORTABLE) return 1;
#if OWL_X86
    __builtin_cpu_init();
    if (isa == OWL_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt") &&
               __builtin_cpu_supports("f16c");
    if (isa == OWL_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("popcnt") &&
               __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
    if (isa == OWL_AVX512V) return owl_isa_detect(OWL_AVX512) && __builtin_cpu_supports("avx512vbmi2");
#endif
    return 0;
}

static int owl_isa_ok(int isa) {
    pthread_once(&owl_once, owl_init_once);
    return isa >= OWL_PORTABLE && isa < OWL_NISA && owl_isa_have[isa];
}

OWL_API int owl_abi(void) { return OWL_ABI; }
OWL_API int owl_isa_supported(int isa) { return owl_isa_ok(isa); }
OWL_API int owl_has_avx512(void) { return owl_isa_ok(OWL_AVX512); }  /* kept for owlctl's older callers */
OWL_API int owl_isa_best(void) {
    for (int isa = OWL_NISA - 1; isa > OWL_PORTABLE; --isa)
        if (owl_isa_ok(isa)) return isa;
    return OWL_PORTABLE;
}

/* ------------------------------------------------------------------ thread pool */

/* A job is nchunks calls fn(ctx, c, nchunks). Kernel jobs are dynamic: the caller and the woken workers
   claim chunks from an atomic counter (4 per thread, cut at balanced row boundaries), so a worker that
   wakes late, or is descheduled because the core is busy (torch's own OpenMP threads spin there between
   ops), costs nothing: the caller takes its chunks. The caller never waits for a worker that has not
   joined: it closes the job when the chunks run out and waits only for the workers inside. Joining is a
   compare-and-swap on (generation << 32 | CLOSED | active count), so a worker woken for an older job
   never touches the current one. One job runs at a time (owl_call_mu), so its fields are global.
   Static jobs (the bandwidth probe) give chunk p to thread p and wait for all of them: the probe needs
   its threads reading at the same time. */
typedef void (*owl_fn)(void *ctx, int part, int nparts);

#define OWL_CLOSED (1ull << 31)
#define OWL_ACTIVE 0x7fffffffull

static struct {
    owl_fn fn;
    void *ctx;
    int nchunks, is_static;
    atomic_int next;           /* dynamic: next unclaimed chunk */
    atomic_int done;           /* static: chunks finished by workers */
    _Atomic uint64_t state;    /* generation << 32 | OWL_CLOSED | workers inside */
} owl_job;
static uint32_t owl_job_gen;

typedef struct {
    _Alignas(64) atomic_uint gen;  /* bumped by the caller to wake this worker; it waits for a change */
    atomic_int sleeping;
    atomic_uint job_gen;           /* the job generation it was woken for */
    unsigned start_gen;
    int index;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t tid;
} owl_slot;

static owl_slot owl_slots[OWL_MAX_THREADS];
static int owl_nworkers;            /* workers running in slots 1..owl_nworkers */
static int owl_default_threads = 1;
static atomic_long owl_spin_ns = 0; /* how long an idle worker polls before it sleeps (owl_set_spin_us) */
static atomic_long owl_tile_from = 10;   /* token count from which the tile kernel beats the few-token one */
static pthread_mutex_t owl_call_mu = PTHREAD_MUTEX_INITIALIZER;  /* one kernel call at a time */

static uint64_t owl_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

OWL_INLINE void owl_pause(void) {
#if OWL_X86
    _mm_pause();
#else
    atomic_signal_fence(memory_order_seq_cst);
#endif
}

/* Wait for the slot's wake counter to move past `seen`: poll for owl_spin_ns (default 0: on a shared or
   small machine a polling worker takes the core from threads that have work, measured 2x slower end to
   end), then sleep on the condition variable. */
static unsigned owl_wait_wake(owl_slot *s, unsigned seen) {
    unsigned g;
    const long budget = atomic_load_explicit(&owl_spin_ns, memory_order_relaxed);
    if (budget > 0) {
        const uint64_t t0 = owl_now_ns();
        for (unsigned i = 1;; ++i) {
            if ((g = atomic_load_explicit(&s->gen, memory_order_acquire)) != seen) return g;
            owl_pause();
            if ((i & 63) == 0 && owl_now_ns() - t0 > (uint64_t)budget) break;
        }
    }
    pthread_mutex_lock(&s->mu);
    atomic_store(&s->sleeping, 1);  /* seq_cst, pairs with the caller's wake bump then sleeping check */
    while ((g = atomic_load(&s->gen)) == seen) pthread_cond_wait(&s->cv, &s->mu);
    atomic_store(&s->sleeping, 0);
    pthread_mutex_unlock(&s->mu);
    return g;
}

static void owl_chunks(void) {
    const int n = owl_job.nchunks;
    for (int c; (c = atomic_fetch_add_explicit(&owl_job.next, 1, memory_order_relaxed)) < n;)
        owl_job.fn(owl_job.ctx, c, n);
}

/* Join the job of generation g if it is still open, help, leave. */
static void owl_help(int index, uint32_t g) {
    uint64_t st = atomic_load_explicit(&owl_job.state, memory_order_acquire);
    do {
        if ((uint32_t)(st >> 32) != g || (st & OWL_CLOSED)) return;  /* too late: not ours any more */
    } while (!atomic_compare_exchange_weak_explicit(&owl_job.state, &st, st + 1, memory_order_acq_rel,
                                                    memory_order_acquire));
    if (owl_job.is_static) {
        owl_job.fn(owl_job.ctx, index, owl_job.nchunks);
        atomic_fetch_add_explicit(&owl_job.done, 1, memory_order_release);
    } else {
        owl_chunks();
    }
    atomic_fetch_sub_explicit(&owl_job.state, 1, memory_order_release);
}

static void *owl_worker(void *arg) {
    owl_slot *s = arg;
    unsigned seen = s->start_gen;
    for (;;) {
        seen = owl_wait_wake(s, seen);
        owl_help(s->index, atomic_load_explicit(&s->job_gen, memory_order_acquire));
    }
    return NULL;
}

/* A forked child has no workers (only the forking thread survives): start afresh. */
static void owl_pool_atfork_child(void) {
    owl_nworkers = 0;
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    owl_call_mu = fresh;
    atomic_store(&owl_job.state, (uint64_t)owl_job_gen << 32 | OWL_CLOSED);
}

/* Make sure nparts - 1 workers run; returns how many threads can run (fewer if threads cannot be made). */
static int owl_pool_ensure(int nparts) {
    if (nparts > OWL_MAX_THREADS) nparts = OWL_MAX_THREADS;
    if (nparts - 1 <= owl_nworkers) return nparts;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);  /* signals stay with the caller's threads */
    while (owl_nworkers < nparts - 1) {
        owl_slot *s = &owl_slots[owl_nworkers + 1];
        s->index = owl_nworkers + 1;
        s->start_gen = atomic_load(&s->gen);
        atomic_store(&s->sleeping, 0);
        pthread_mutex_init(&s->mu, NULL);
        pthread_cond_init(&s->cv, NULL);
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int rc = pthread_create(&s->tid, &attr, owl_worker, s);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        ++owl_nworkers;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return owl_nworkers + 1 < nparts ? owl_nworkers + 1 : nparts;
}

/* Run the nchunks chunks of fn on the calling thread and up to nthreads - 1 workers
   (owl_pool_ensure(nthreads) must have returned nthreads; static jobs need nchunks == nthreads). */
static void owl_run_job(owl_fn fn, void *ctx, int nchunks, int nthreads, int is_static) {
    if (nthreads <= 1 || nchunks <= 1) {
        for (int c = 0; c < nchunks; ++c) fn(ctx, c, nchunks);
        return;
    }
    const uint32_t g = ++owl_job_gen;
    owl_job.fn = fn;
    owl_job.ctx = ctx;
    owl_job.nchunks = nchunks;
    owl_job.is_static = is_static;
    atomic_store_explicit(&owl_job.next, 0, memory_order_relaxed);
    atomic_store_explicit(&owl_job.done, 0, memory_order_relaxed);
    atomic_store_explicit(&owl_job.state, (uint64_t)g << 32, memory_order_release);  /* publishes the fields */
    for (int i = 1; i < nthreads; ++i) {
        owl_slot *s = &owl_slots[i];
        atomic_store_explicit(&s->job_gen, g, memory_order_release);
        atomic_fetch_add(&s->gen, 1u);
        if (atomic_load(&s->sleeping)) {
            pthread_mutex_lock(&s->mu);
            pthread_cond_signal(&s->cv);
            pthread_mutex_unlock(&s->mu);
        }
    }
    if (is_static) {
        fn(ctx, 0, nchunks);
        for (unsigned i = 1; atomic_load_explicit(&owl_job.done, memory_order_acquire) < nthreads - 1; ++i)
            if (i < 256) owl_pause(); else sched_yield();  /* a worker may be waiting for this core */
    } else {
        owl_chunks();
    }
    const uint64_t st = atomic_fetch_or_explicit(&owl_job.state, OWL_CLOSED, memory_order_acq_rel);
    /* only workers that joined and hold a chunk remain; one may have been preempted, possibly onto this very
       core, so after a short poll give the core away rather than spin out a scheduler time slice */
    unsigned i = 0;
    for (uint64_t a = st & OWL_ACTIVE; a; a = atomic_load_explicit(&owl_job.state, memory_order_acquire) & OWL_ACTIVE)
        if (++i < 256) owl_pause(); else sched_yield();
}

static void owl_run(owl_fn fn, void *ctx, int nparts) { owl_run_job(fn, ctx, nparts, nparts, 1); }

/* Dynamic job of nchunks chunks on nthreads threads. */
static void owl_run_dyn(owl_fn fn, void *ctx, int nchunks, int nthreads) {
    owl_run_job(fn, ctx, nchunks, nthreads, 0);
}

OWL_API int owl_set_threads(int n) {
    pthread_once(&owl_once, owl_init_once);
    if (n < 1) n = 1;
    if (n > OWL_MAX_THREADS) n = OWL_MAX_THREADS;
    pthread_mutex_lock(&owl_call_mu);
    owl_default_threads = n;
    pthread_mutex_unlock(&owl_call_mu);
    return n;
}

OWL_API int owl_get_threads(void) { return owl_default_threads; }
OWL_API void owl_set_spin_us(int us) { atomic_store(&owl_spin_ns, us < 0 ? 0 : (long)us * 1000); }
OWL_API int owl_max_threads(void) { return OWL_MAX_THREADS; }
/* Tests and benchmarks move the switch between the few-token and the tile kernels; returns the old value. */
OWL_API int owl_set_tile_from(int tokens) {
    return (int)atomic_exchange(&owl_tile_from, tokens < 2 ? 2 : tokens);
}

/* ------------------------------------------------------------------ the matrix */

typedef struct {
    int64_t abi, n_out, n_in, ng, vdtype, nvals;
    const uint16_t *mask;
    const void *vals;
    const int64_t *rp;
    const float *bias;
    int64_t nsplit;                        /* split holds nsplit + 1 row boundaries (chunks) */
    int64_t split[OWL_MAX_CHUNKS + 1];
} owl_mat;

OWL_API int64_t owl_mat_size(void) { return (int64_t)sizeof(owl_mat); }

/* Bytes a thread reads for rows [0, r): values, mask words and a fixed per-row cost. */
static int64_t owl_cost(const owl_mat *m, int64_t r) {
    const int64_t vb = m->vdtype == OWL_F32 ? 4 : 2;
    return m->rp[r] * vb + r * (m->ng * 2 + 64);
}

/* Chunks for a job on nthreads threads: one per thread would leave the caller idle whenever a worker
   is late; a few per thread let whoever is running take the next. */
static int owl_nchunks(const owl_mat *m, int nthreads) {
    const int64_t n = nthreads <= 1 ? 1 : (int64_t)nthreads * OWL_CHUNKS_PER_THREAD;
    return (int)(n < m->n_out ? n : m->n_out);
}

static void owl_make_split(owl_mat *m, int nparts) {
    if (nparts > m->n_out) nparts = (int)m->n_out;
    if (nparts < 1) nparts = 1;
    const int64_t total = owl_cost(m, m->n_out);
    m->split[0] = 0;
    for (int p = 1; p < nparts; ++p) {  /* the first row whose prefix cost reaches p / nparts of the total */
        const int64_t goal = (int64_t)((double)total * p / nparts);
        int64_t lo = m->split[p - 1], hi = m->n_out;
        while (lo < hi) {
            const int64_t mid = lo + (hi - lo) / 2;
            if (owl_cost(m, mid) < goal) lo = mid + 1; else hi = mid;
        }
        m->split[p] = lo;
    }
    m->split[nparts] = m->n_out;
    m->nsplit = nparts;
}

/* Check everything the kernels rely on (so a malformed matrix is an error, not a wild read). */
OWL_API int owl_mat_init(owl_mat *m, int64_t n_out, int64_t n_in, int64_t ng, int vdtype, const uint16_t *mask,
                         const void *vals, int64_t nvals, const int64_t *rp, const float *bias, int threads) {
    pthread_once(&owl_once, owl_init_once);
    if (!m || n_out < 1 || n_in < 1 || ng < 1 || ng % 4 || ng * 16 < n_in || ng * 16 - n_in >= 64 || !mask ||
        !vals || !rp || vdtype < OWL_F32 || vdtype > OWL_F16)
        return OWL_EARG;
    if (rp[0] != 0 || nvals < rp[n_out] + OWL_VPAD) return OWL_EARG;
    for (int64_t r = 0; r < n_out; ++r) {
        const uint16_t *mk = mask + r * ng;
        int64_t n = 0;
        for (int64_t j = 0; j < ng; ++j) n += owl_pc16(mk[j]);
        if (rp[r + 1] - rp[r] != n) return OWL_EARG;
        /* padding inputs must be empty: the activations are zero-padded, but a weight there has no column */
        for (int64_t j = (n_in + 15) / 16; j < ng; ++j) if (mk[j]) return OWL_EARG;
        if (n_in % 16 && (mk[(n_in - 1) / 16] >> (n_in % 16))) return OWL_EARG;
    }
    memset(m, 0, sizeof *m);
    m->abi = OWL_ABI;
    m->n_out = n_out;
    m->n_in = n_in;
    m->ng = ng;
    m->vdtype = vdtype;
    m->nvals = nvals;
    m->mask = mask;
    m->vals = vals;
    m->rp = rp;
    m->bias = bias;
    owl_make_split(m, owl_nchunks(m, threads < 1 ? 1 : threads > OWL_MAX_THREADS ? OWL_MAX_THREADS : threads));
    return OWL_OK;
}

/* ------------------------------------------------------------------ decode: y (n_out) = W x + b */

typedef struct {
    const owl_mat *m;
    const float *x;    /* float32, ng * 16 entries, zero-padded */
    const float *xt;   /* prefill: the transposed super-tile */
    void *y;
    int ydtype, isa;
    int64_t T, t0, ntile, tn_last;  /* prefill: tokens, first token of the super-tile, tiles in it */
    const void *xin;   /* prefill: the caller's activations */
    int xdtype;
} owl_ctx;

OWL_INLINE float owl_finish(const owl_mat *m, int64_t r, float acc) { return m->bias ? acc + m->bias[r] : acc; }

/* portable: walk the set bits of each 64-bit mask word (count trailing zeros, clear lowest), four
   accumulators in turn so consecutive products do not wait on one another. */
OWL_INLINE void owlp_mv_t(const owl_mat *m, const float *x, void *y, int ydt, int64_t r0, int64_t r1, int vd) {
    const int64_t ng = m->ng;
    for (int64_t r = r0; r < r1; ++r) {
        const uint16_t *mk = m->mask + r * ng;
        int64_t k = m->rp[r];
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
        for (int64_t j = 0; j < ng; j += 4) {
            uint64_t w;
            memcpy(&w, mk + j, 8);
            const float *xj = x + 16 * j;
            while (w) {
                a0 += owl_load_val(m->vals, k++, vd) * xj[__builtin_ctzll(w)];
                w &= w - 1;
                if (!w) break;
                a1 += owl_load_val(m->vals, k++, vd) * xj[__builtin_ctzll(w)];
                w &= w - 1;
                if (!w) break;
                a2 += owl_load_val(m->vals, k++, vd) * xj[__builtin_ctzll(w)];
                w &= w - 1;
                if (!w) break;
                a3 += owl_load_val(m->vals, k++, vd) * xj[__builtin_ctzll(w)];
                w &= w - 1;
            }
        }
        owl_store_val(y, r, owl_finish(m, r, (a0 + a1) + (a2 + a3)), ydt);
    }
}

static void owlp_mv(const owl_mat *m, const float *x, void *y, int ydt, int64_t r0, int64_t r1) {
    switch (m->vdtype) {
    case OWL_F32: owlp_mv_t(m, x, y, ydt, r0, r1, OWL_F32); break;
    case OWL_BF16: owlp_mv_t(m, x, y, ydt, r0, r1, OWL_BF16); break;
    default: owlp_mv_t(m, x, y, ydt, r0, r1, OWL_F16); break;
    }
}

#if OWL_X86
/* Decode streams two arrays per row (mask words, values); the hardware prefetcher alone left a single core
   well below the bandwidth a plain streaming read reaches, so ask for the lines ~2 KiB ahead. */
#ifndef OWL_PF_BYTES
#define OWL_PF_BYTES 2048
#endif
OWL_INLINE void owl_prefetch(const void *vals, int64_t off, int vd, const uint16_t *mk) {
    const char *v = (const char *)vals + off * (vd == OWL_F32 ? 4 : 2);
    _mm_prefetch(v + OWL_PF_BYTES, _MM_HINT_T0);
    _mm_prefetch((const char *)mk + 256, _MM_HINT_T0);
}

#define OWL_T2 __attribute__((target("avx2,fma,f16c,popcnt")))
#define OWL_T5 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")))

/* AVX2: no expand instruction. Each byte of mask selects a row of owl_lut_expand: lane i takes value slot
   idx[i] (vpermps) or, where the sign bit is set, zero. */
OWL_T2 OWL_INLINE __m256 owl2_load8(const void *v, int64_t off, int vd) {
    if (vd == OWL_F32) return _mm256_loadu_ps((const float *)v + off);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)v + off));
    if (vd == OWL_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

OWL_T2 OWL_INLINE __m256 owl2_expand(const void *v, int64_t off, unsigned byte, int vd) {
    const __m256i idx = _mm256_load_si256((const __m256i *)owl_lut_expand[byte]);
    const __m256 e = _mm256_permutevar8x32_ps(owl2_load8(v, off, vd), idx);
    return _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_srai_epi32(idx, 31)), e);
}

OWL_T2 OWL_INLINE float owl2_hsum(__m256 a) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

/* One 64-bit mask word (64 inputs) of one row: 8 expands of 8 values, into 4 accumulators. */
OWL_T2 OWL_INLINE void owl2_word(const void *vals, int vd, uint64_t w, int64_t *offp, const float *xj, __m256 *a,
                                 const uint16_t *mk) {
    const int64_t off = *offp;
    owl_prefetch(vals, off, vd, mk);
    /* offsets of the 8 bytes' first values: popcounts of the lower bytes, independent of each other */
    const int64_t o1 = _mm_popcnt_u64(w & 0xffull), o2 = _mm_popcnt_u64(w & 0xffffull);
    const int64_t o3 = _mm_popcnt_u64(w & 0xffffffull), o4 = _mm_popcnt_u64(w & 0xffffffffull);
    const int64_t o5 = _mm_popcnt_u64(w & 0xffffffffffull), o6 = _mm_popcnt_u64(w & 0xffffffffffffull);
    const int64_t o7 = _mm_popcnt_u64(w & 0xffffffffffffffull), o8 = _mm_popcnt_u64(w);
    a[0] = _mm256_fmadd_ps(owl2_expand(vals, off, w & 0xff, vd), _mm256_loadu_ps(xj), a[0]);
    a[1] = _mm256_fmadd_ps(owl2_expand(vals, off + o1, (w >> 8) & 0xff, vd), _mm256_loadu_ps(xj + 8), a[1]);
    a[2] = _mm256_fmadd_ps(owl2_expand(vals, off + o2, (w >> 16) & 0xff, vd), _mm256_loadu_ps(xj + 16), a[2]);
    a[3] = _mm256_fmadd_ps(owl2_expand(vals, off + o3, (w >> 24) & 0xff, vd), _mm256_loadu_ps(xj + 24), a[3]);
    a[0] = _mm256_fmadd_ps(owl2_expand(vals, off + o4, (w >> 32) & 0xff, vd), _mm256_loadu_ps(xj + 32), a[0]);
    a[1] = _mm256_fmadd_ps(owl2_expand(vals, off + o5, (w >> 40) & 0xff, vd), _mm256_loadu_ps(xj + 40), a[1]);
    a[2] = _mm256_fmadd_ps(owl2_expand(vals, off + o6, (w >> 48) & 0xff, vd), _mm256_loadu_ps(xj + 48), a[2]);
    a[3] = _mm256_fmadd_ps(owl2_expand(vals, off + o7, (w >> 56) & 0xff, vd), _mm256_loadu_ps(xj + 56), a[3]);
    *offp = off + o8;
}

OWL_T2 OWL_INLINE float owl2_sum(const __m256 *a) {
    return owl2_hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
}

/* Rows are taken in pairs far apart (i and i + half of the range): four streams per core instead of two,
   which the prefetchers serve at a higher bandwidth, and two independent chains in flight. A row's own
   arithmetic is the same alone or paired, so results do not depend on the pairing (nor on the split). */
OWL_T2 OWL_INLINE void owl2_mv_t(const owl_mat *m, const float *x, void *y, int ydt, int64_t r0, int64_t r1, int vd) {
    const int64_t ng = m->ng, half = (r1 - r0) / 2;
    for (int64_t i = 0; i < half; ++i) {
        const int64_t ra = r0 + i, rb = r0 + half + i;
        const uint16_t *ma = m->mask + ra * ng, *mb = m->mask + rb * ng;
        int64_t oa = m->rp[ra], ob = m->rp[rb];
        __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        __m256 b[4] = {a[0], a[0], a[0], a[0]};
        for (int64_t j = 0; j < ng; j += 4) {
            uint64_t wa, wb;
            memcpy(&wa, ma + j, 8);
            memcpy(&wb, mb + j, 8);
            owl2_word(m->vals, vd, wa, &oa, x + 16 * j, a, ma + j);
            owl2_word(m->vals, vd, wb, &ob, x + 16 * j, b, mb + j);
        }
        owl_store_val(y, ra, owl_finish(m, ra, owl2_sum(a)), ydt);
        owl_store_val(y, rb, owl_finish(m, rb, owl2_sum(b)), ydt);
    }
    if ((r1 - r0) & 1) {
        const int64_t r = r1 - 1;
        const uint16_t *ma = m->mask + r * ng;
        int64_t oa = m->rp[r];
        __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t j = 0; j < ng; j += 4) {
            uint64_t wa;
            memcpy(&wa, ma + j, 8);
            owl2_word(m->vals, vd, wa, &oa, x + 16 * j, a, ma + j);
        }
        owl_store_val(y, r, owl_finish(m, r, owl2_sum(a)), ydt);
    }
}

OWL_T2 static void owl2_mv(const owl_mat *m, const float *x, void *y, int ydt, int64_t r0, int64_t r1) {
    switch (m->vdtype) {
    case OWL_F32: owl2_mv_t(m, x, y, ydt, r0, r1, OWL_F32); break;
    case OWL_BF16: owl2_mv_t(m, x, y, ydt, r0, r1, OWL_BF16); break;
    default: owl2_mv_t(m, x, y, ydt, r0, r1, OWL_F16); break;
    }
}

/* AVX-512: one 64-bit load gives 4 mask words; their value offsets are popcounts of its low 16/32/48 bits. */
OWL_T5 OWL_INLINE __m512 owl5_load16(const void *v, int64_t off, int vd) {
    if (vd == OWL_F32) return _mm512_loadu_ps((const float *)v + off);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)v + off));
    if (vd == OWL_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

/* The 16-bit halves of w as k-masks. The shifts are pinned in general registers: left alone, the compiler
   turns them into k-register shifts, and port 5, which runs every expand, also runs those. */
OWL_T5 OWL_INLINE void owl5_masks(uint64_t w, __mmask16 *k) {
    uint32_t w1 = (uint32_t)(w >> 16), w2 = (uint32_t)(w >> 32), w3 = (uint32_t)(w >> 48);
    __asm__("" : "+r"(w1), "+r"(w2), "+r"(w3));
    k[0] = _cvtu32_mask16((uint32_t)w & 0xffffu);
    k[1] = _cvtu32_mask16(w1 & 0xffffu);
    k[2] = _cvtu32_mask16(w2 & 0xffffu);
    k[3] = _cvtu32_mask16(w3);
}

/* One 64-bit mask word of one row: 4 expands of 16 values; offsets from popcounts of the low 16/32/48 bits. */
OWL_T5 OWL_INLINE void owl5_word(const void *vals, int vd, uint64_t w, int64_t *offp, const __m512 *xv, __m512 *a,
                                 const uint16_t *mk) {
    const int64_t off = *offp;
    owl_prefetch(vals, off, vd, mk);
    const int64_t o1 = _mm_popcnt_u64(w & 0xffffull), o2 = _mm_popcnt_u64(w & 0xffffffffull);
    const int64_t o3 = _mm_popcnt_u64(w & 0xffffffffffffull), o4 = _mm_popcnt_u64(w);
    __mmask16 k[4];
    owl5_masks(w, k);
    a[0] = _mm512_fmadd_ps(_mm512_maskz_expand_ps(k[0], owl5_load16(vals, off, vd)), xv[0], a[0]);
    a[1] = _mm512_fmadd_ps(_mm512_maskz_expand_ps(k[1], owl5_load16(vals, off + o1, vd)), xv[1], a[1]);
    a[2] = _mm512_fmadd_ps(_mm512_maskz_expand_ps(k[2], owl5_load16(vals, off + o2, vd)), xv[2], a[2]);
    a[3] = _mm512_fmadd_ps(_mm512_maskz_expand_ps(k[3], owl5_load16(vals, off + o3, vd)), xv[3], a[3]);
    *offp = off + o4;
}

OWL_T5 OWL_INLINE float owl5_sum(const __m512 *a) {
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
}

OWL_T5 OWL_INLINE void owl5_xload(const float *xj, __m512 *xv) {
    for (int i = 0; i < 4; ++i) xv[i] = _mm512_loadu_ps(xj + 16 * i);
}

/* WORD(vals, vd, w, &off, xv, acc, mk) consumes one mask word of one row; rows go in far-apart pairs as in
   owl2_mv_t. Shared by the AVX-512 and the AVX-512 + VBMI2 decoders. */
#define OWL5_MV_BODY(WORD)                                                                                         \
    const int64_t ng = m->ng, half = (r1 - r0) / 2;                                                                \
    for (int64_t i = 0; i < half; ++i) {                                                                           \
        const int64_t ra = r0 + i, rb = r0 + half + i;                                                             \
        const uint16_t *ma = m->mask + ra * ng, *mb = m->mask + rb * ng;                                           \
        int64_t oa = m->rp[ra], ob = m->rp[rb];                                                                    \
        __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};        \
        __m512 b[4] = {a[0], a[0], a[0], a[0]};                                                                    \
        for (int64_t j = 0; j < ng; j += 4) {                                                                      \
            uint64_t wa, wb;                                                                                       \
            memcpy(&wa, ma + j, 8);                                                                                \
            memcpy(&wb, mb + j, 8);                                                                                \
            __m512 xv[4];                                                                                          \
            owl5_xload(x + 16 * j, xv);                                                                            \
            WORD(m->vals, vd, wa, &oa, xv, a, ma + j);                                                             \
            WORD(m->vals, vd, wb, &ob, xv, b, mb + j);                                                             \
        }                                                                                                          \
        owl_store_val(y, ra, owl_finish(m, ra, owl5_sum(a)), ydt);                                                 \
        owl_store_val(y, rb, owl_finish(m, rb, owl5_sum(b)), ydt);                                                 \
    }                                                                                                              \
    if ((r1 - r0) & 1) {                                                                                           \
        const int64_t r = r1 - 1;                                                                                  \
        const uint16_t *ma = m->mask + r * ng;                                                                     \
        int64_t oa = m->rp[r];                                                                                     \
        __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};        \
        for (int64_t j = 0; j < ng; j += 4) {                                                                      \
            uint64_t wa;                                                                                           \
            memcpy(&wa, ma + j, 8);                                                                                \
            __m512 xv[4];                                                                                          \
            owl5_xload(x + 16 * j, xv);                                                                            \
            WORD(m->vals, vd, wa, &oa, xv, a, ma + j);                                                             \
        }                                                                                                          \
        owl_store_val(y, r, owl_finish(m, r, owl5_sum(a)), ydt);                                                   \
    }

OWL_T5 OWL_INLINE void owl5_mv_t(const owl_mat *m, const float *x, void *y, int ydt, int64_t r0, int64_t r1, int vd) {
    OWL5_MV_BODY(owl5_word)
}

OWL_T5 static void owl5_mv(const owl_mat *m, const float *x, void *y, int ydt, int64_t r0, int64_t r1) {
    switch (m->vdtype) {
    case OWL_F32: owl5_mv_t(m, x, y, ydt, r0, r1, OWL_F32); break;
    case OWL_BF16: owl5_mv_t(m, x, y, ydt, r0, r1, OWL_BF16); break;
    default: owl5_mv_t(m, x, y, ydt, r0, r1, OWL_F16); break;
    }
}

/* AVX-512 + VBMI2, 16-bit values: vpexpandw places 32 values (two mask words) in one instruction, half the
   expands of the float32 route. bfloat16 then needs no shuffle at all: the low halves of the 32-bit lanes
   (even inputs) become floats by a left shift, the high halves (odd inputs) by masking, so x is laid out
   even/odd per 32 inputs (owl_x_evenodd). float16 converts each 256-bit half in input order. */
#define OWL_T5V __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt")))

OWL_T5V OWL_INLINE void owl5v_word(const void *vals_, int vd, uint64_t w, int64_t *offp, const __m512 *xv,
                                   __m512 *a, const uint16_t *mk) {
    const uint16_t *vals = vals_;
    const int64_t off = *offp;
    owl_prefetch(vals, off, vd, mk);
    const int64_t o2 = _mm_popcnt_u64(w & 0xffffffffull), o4 = _mm_popcnt_u64(w);
    uint32_t whi = (uint32_t)(w >> 32);
    __asm__("" : "+r"(whi));
    const __m512i e0 = _mm512_maskz_expand_epi16(_cvtu32_mask32((uint32_t)w),
                                                 _mm512_loadu_si512((const void *)(vals + off)));
    const __m512i e1 = _mm512_maskz_expand_epi16(_cvtu32_mask32(whi),
                                                 _mm512_loadu_si512((const void *)(vals + off + o2)));
    __m512 w0, w1, w2, w3;
    if (vd == OWL_BF16) {
        const __m512i hi16 = _mm512_set1_epi32((int)0xffff0000u);
        w0 = _mm512_castsi512_ps(_mm512_slli_epi32(e0, 16));
        w1 = _mm512_castsi512_ps(_mm512_and_si512(e0, hi16));
        w2 = _mm512_castsi512_ps(_mm512_slli_epi32(e1, 16));
        w3 = _mm512_castsi512_ps(_mm512_and_si512(e1, hi16));
    } else {
        w0 = _mm512_cvtph_ps(_mm512_castsi512_si256(e0));
        w1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(e0, 1));
        w2 = _mm512_cvtph_ps(_mm512_castsi512_si256(e1));
        w3 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(e1, 1));
    }
    a[0] = _mm512_fmadd_ps(w0, xv[0], a[0]);
    a[1] = _mm512_fmadd_ps(w1, xv[1], a[1]);
    a[2] = _mm512_fmadd_ps(w2, xv[2], a[2]);
    a[3] = _mm512_fmadd_ps(w3, xv[3], a[3]);
    *offp = off + o4;
}

OWL_T5V OWL_INLINE void owl5v_mv_t(const owl_mat *m, const float *x, void *y, int ydt, int64_t r0, int64_t r1,
                                   int vd) {
    OWL5_MV_BODY(owl5v_word)
}

OWL_T5V static void owl5v_mv(const owl_mat *m, const float *x, void *y, int ydt, int64_t r0, int64_t r1) {
    if (m->vdtype == OWL_BF16) owl5v_mv_t(m, x, y, ydt, r0, r1, OWL_BF16);
    else owl5v_mv_t(m, x, y, ydt, r0, r1, OWL_F16);
}
#endif

/* ------------------------------------------------------------------ a few tokens (2 <= T < owl_tile_from)

   Small batches: each mask word is expanded once and multiplied into nt token vectors (nt = 2, 4 or 8,
   activations zero-padded to a multiple of nt), so the matrix is read once per call and the expansion is
   shared; the tile kernel below only pays off from a few dozen tokens. Each token keeps two accumulators,
   summed in a fixed order. */

typedef struct {
    const owl_mat *m;
    const float *x;   /* nt-padded tokens, npad floats each (even/odd order for VBMI2 + bfloat16) */
    void *y;
    int64_t T;
    int ydtype, nt;
} owl_mt_ctx;

#if OWL_X86
OWL_T5 OWL_INLINE void owl5_expand4(const void *vals, int vd, uint64_t w, int64_t off, __m512 *wv,
                                    const uint16_t *mk) {
    owl_prefetch(vals, off, vd, mk);
    const int64_t o1 = _mm_popcnt_u64(w & 0xffffull), o2 = _mm_popcnt_u64(w & 0xffffffffull);
    const int64_t o3 = _mm_popcnt_u64(w & 0xffffffffffffull);
    __mmask16 k[4];
    owl5_masks(w, k);
    wv[0] = _mm512_maskz_expand_ps(k[0], owl5_load16(vals, off, vd));
    wv[1] = _mm512_maskz_expand_ps(k[1], owl5_load16(vals, off + o1, vd));
    wv[2] = _mm512_maskz_expand_ps(k[2], owl5_load16(vals, off + o2, vd));
    wv[3] = _mm512_maskz_expand_ps(k[3], owl5_load16(vals, off + o3, vd));
}

OWL_T5V OWL_INLINE void owl5v_expand4(const void *vals_, int vd, uint64_t w, int64_t off, __m512 *wv,
                                      const uint16_t *mk) {
    const uint16_t *vals = vals_;
    owl_prefetch(vals, off, vd, mk);
    const int64_t o2 = _mm_popcnt_u64(w & 0xffffffffull);
    uint32_t whi = (uint32_t)(w >> 32);
    __asm__("" : "+r"(whi));
    const __m512i e0 = _mm512_maskz_expand_epi16(_cvtu32_mask32((uint32_t)w),
                                                 _mm512_loadu_si512((const void *)(vals + off)));
    const __m512i e1 = _mm512_maskz_expand_epi16(_cvtu32_mask32(whi),
                                                 _mm512_loadu_si512((const void *)(vals + off + o2)));
    if (vd == OWL_BF16) {
        const __m512i hi16 = _mm512_set1_epi32((int)0xffff0000u);
        wv[0] = _mm512_castsi512_ps(_mm512_slli_epi32(e0, 16));
        wv[1] = _mm512_castsi512_ps(_mm512_and_si512(e0, hi16));
        wv[2] = _mm512_castsi512_ps(_mm512_slli_epi32(e1, 16));
        wv[3] = _mm512_castsi512_ps(_mm512_and_si512(e1, hi16));
    } else {
        wv[0] = _mm512_cvtph_ps(_mm512_castsi512_si256(e0));
        wv[1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(e0, 1));
        wv[2] = _mm512_cvtph_ps(_mm512_castsi512_si256(e1));
        wv[3] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(e1, 1));
    }
}

#define OWL5_DEFINE_MT(P, ATTR, EXPAND4)                                                                           \
    ATTR OWL_INLINE void P##_mt_t(const owl_mt_ctx *c, int64_t r0, int64_t r1, int vd, int nt) {                   \
        const owl_mat *m = c->m;                                                                                   \
        const int64_t ng = m->ng, npad = ng * 16;                                                                  \
        for (int64_t r = r0; r < r1; ++r) {                                                                        \
            const uint16_t *mk = m->mask + r * ng;                                                                 \
            for (int64_t t0 = 0; t0 < c->T; t0 += nt) { /* the row stays in L1 across token groups */             \
                int64_t off = m->rp[r];                                                                            \
                __m512 acc[8][2];                                                                                  \
                for (int t = 0; t < nt; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();                          \
                const float *xb = c->x + t0 * npad;                                                                \
                for (int64_t j = 0; j < ng; j += 4) {                                                              \
                    uint64_t w;                                                                                    \
                    memcpy(&w, mk + j, 8);                                                                         \
                    __m512 wv[4];                                                                                  \
                    EXPAND4(m->vals, vd, w, off, wv, mk + j);                                                      \
                    off += _mm_popcnt_u64(w);                                                                      \
                    for (int t = 0; t < nt; ++t) {                                                                 \
                        const float *xt = xb + t * npad + 16 * j;                                                  \
                        acc[t][0] = _mm512_fmadd_ps(wv[0], _mm512_loadu_ps(xt), acc[t][0]);                        \
                        acc[t][1] = _mm512_fmadd_ps(wv[1], _mm512_loadu_ps(xt + 16), acc[t][1]);                   \
                        acc[t][0] = _mm512_fmadd_ps(wv[2], _mm512_loadu_ps(xt + 32), acc[t][0]);                   \
                        acc[t][1] = _mm512_fmadd_ps(wv[3], _mm512_loadu_ps(xt + 48), acc[t][1]);                   \
                    }                                                                                              \
                }                                                                                                  \
                const int64_t tn = c->T - t0 < nt ? c->T - t0 : nt;                                                \
                for (int t = 0; t < tn; ++t)                                                                       \
                    owl_store_val(c->y, (t0 + t) * m->n_out + r,                                                   \
                                  owl_finish(m, r, _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]))),     \
                                  c->ydtype);                                                                      \
            }                                                                                                      \
        }                                                                                                          \
    }                                                                                                              \
    ATTR OWL_INLINE void P##_mt_vd(const owl_mt_ctx *c, int64_t r0, int64_t r1, int vd) {                          \
        if (c->nt == 2) P##_mt_t(c, r0, r1, vd, 2);                                                                \
        else if (c->nt == 4) P##_mt_t(c, r0, r1, vd, 4);                                                           \
        else P##_mt_t(c, r0, r1, vd, 8);                                                                           \
    }

OWL5_DEFINE_MT(owl5, OWL_T5, owl5_expand4)
OWL5_DEFINE_MT(owl5v, OWL_T5V, owl5v_expand4)

OWL_T5 static void owl5_mt(const owl_mt_ctx *c, int64_t r0, int64_t r1) {
    switch (c->m->vdtype) {
    case OWL_F32: owl5_mt_vd(c, r0, r1, OWL_F32); break;
    case OWL_BF16: owl5_mt_vd(c, r0, r1, OWL_BF16); break;
    default: owl5_mt_vd(c, r0, r1, OWL_F16); break;
    }
}

OWL_T5V static void owl5v_mt(const owl_mt_ctx *c, int64_t r0, int64_t r1) {
    if (c->m->vdtype == OWL_BF16) owl5v_mt_vd(c, r0, r1, OWL_BF16);
    else owl5v_mt_vd(c, r0, r1, OWL_F16);
}

/* AVX2: half a word (32 inputs, 4 lookups of 8 lanes) at a time, nt <= 4 tokens. */
OWL_T2 OWL_INLINE void owl2_mt_t(const owl_mt_ctx *c, int64_t r0, int64_t r1, int vd, int nt) {
    const owl_mat *m = c->m;
    const int64_t ng = m->ng, npad = ng * 16;
    for (int64_t r = r0; r < r1; ++r) {
        const uint16_t *mk = m->mask + r * ng;
        for (int64_t t0 = 0; t0 < c->T; t0 += nt) {
            int64_t off = m->rp[r];
            __m256 acc[4][2];
            for (int t = 0; t < nt; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
            const float *xb = c->x + t0 * npad;
            for (int64_t j = 0; j < ng; j += 2) {
                uint32_t w;
                memcpy(&w, mk + j, 4);
                owl_prefetch(m->vals, off, vd, mk + j);
                const int64_t o1 = _mm_popcnt_u32(w & 0xffu), o2 = _mm_popcnt_u32(w & 0xffffu);
                const int64_t o3 = _mm_popcnt_u32(w & 0xffffffu);
                const __m256 w0 = owl2_expand(m->vals, off, w & 0xff, vd);
                const __m256 w1 = owl2_expand(m->vals, off + o1, (w >> 8) & 0xff, vd);
                const __m256 w2 = owl2_expand(m->vals, off + o2, (w >> 16) & 0xff, vd);
                const __m256 w3 = owl2_expand(m->vals, off + o3, w >> 24, vd);
                off += _mm_popcnt_u32(w);
                for (int t = 0; t < nt; ++t) {
                    const float *xt = xb + t * npad + 16 * j;
                    acc[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xt), acc[t][0]);
                    acc[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xt + 8), acc[t][1]);
                    acc[t][0] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xt + 16), acc[t][0]);
                    acc[t][1] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xt + 24), acc[t][1]);
                }
            }
            const int64_t tn = c->T - t0 < nt ? c->T - t0 : nt;
            for (int t = 0; t < tn; ++t)
                owl_store_val(c->y, (t0 + t) * m->n_out + r,
                              owl_finish(m, r, owl2_hsum(_mm256_add_ps(acc[t][0], acc[t][1]))), c->ydtype);
        }
    }
}

OWL_T2 static void owl2_mt(const owl_mt_ctx *c, int64_t r0, int64_t r1) {
    const int nt = c->nt == 2 ? 2 : 4;
    switch (c->m->vdtype) {
    case OWL_F32: nt == 2 ? owl2_mt_t(c, r0, r1, OWL_F32, 2) : owl2_mt_t(c, r0, r1, OWL_F32, 4); break;
    case OWL_BF16: nt == 2 ? owl2_mt_t(c, r0, r1, OWL_BF16, 2) : owl2_mt_t(c, r0, r1, OWL_BF16, 4); break;
    default: nt == 2 ? owl2_mt_t(c, r0, r1, OWL_F16, 2) : owl2_mt_t(c, r0, r1, OWL_F16, 4); break;
    }
}
#endif

/* portable: the decode loop once per token, the row in L1 after the first. */
OWL_INLINE void owlp_mt_t(const owl_mt_ctx *c, int64_t r0, int64_t r1, int vd) {
    const owl_mat *m = c->m;
    const int64_t ng = m->ng, npad = ng * 16;
    for (int64_t r = r0; r < r1; ++r) {
        const uint16_t *mk = m->mask + r * ng;
        for (int64_t t = 0; t < c->T; ++t) {
            int64_t k = m->rp[r];
            float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
            const float *x = c->x + t * npad;
            for (int64_t j = 0; j < ng; j += 4) {
                uint64_t w;
                memcpy(&w, mk + j, 8);
                const float *xj = x + 16 * j;
                while (w) {
                    a0 += owl_load_val(m->vals, k++, vd) * xj[__builtin_ctzll(w)];
                    w &= w - 1;
                    if (!w) break;
                    a1 += owl_load_val(m->vals, k++, vd) * xj[__builtin_ctzll(w)];
                    w &= w - 1;
                    if (!w) break;
                    a2 += owl_load_val(m->vals, k++, vd) * xj[__builtin_ctzll(w)];
                    w &= w - 1;
                    if (!w) break;
                    a3 += owl_load_val(m->vals, k++, vd) * xj[__builtin_ctzll(w)];
                    w &= w - 1;
                }
            }
            owl_store_val(c->y, t * m->n_out + r, owl_finish(m, r, (a0 + a1) + (a2 + a3)), c->ydtype);
        }
    }
}

static void owlp_mt(const owl_mt_ctx *c, int64_t r0, int64_t r1) {
    switch (c->m->vdtype) {
    case OWL_F32: owlp_mt_t(c, r0, r1, OWL_F32); break;
    case OWL_BF16: owlp_mt_t(c, r0, r1, OWL_BF16); break;
    default: owlp_mt_t(c, r0, r1, OWL_F16); break;
    }
}

typedef struct { owl_mt_ctx mt; int isa; } owl_mt_job;

static void owl_mt_part(void *arg, int p, int nparts) {
    const owl_mt_job *j = arg;
    const owl_mat *m = j->mt.m;
    (void)nparts;
    const int64_t r0 = m->split[p], r1 = m->split[p + 1];
#if OWL_X86
    if (j->isa == OWL_AVX512V && m->vdtype != OWL_F32) { owl5v_mt(&j->mt, r0, r1); return; }
    if (j->isa >= OWL_AVX512) { owl5_mt(&j->mt, r0, r1); return; }
    if (j->isa == OWL_AVX2) { owl2_mt(&j->mt, r0, r1); return; }
#endif
    owlp_mt(&j->mt, r0, r1);
}

/* x (npad floats) reordered for owl5v_mv with bfloat16 values: per 32 inputs, the 16 even then the 16 odd. */
static void owl_x_evenodd(float *dst, const float *src, int64_t npad) {
    for (int64_t b = 0; b < npad; b += 32)
        for (int i = 0; i < 16; ++i) {
            dst[b + i] = src[b + 2 * i];
            dst[b + 16 + i] = src[b + 2 * i + 1];
        }
}

static void owl_mv_part(void *arg, int p, int nparts) {
    const owl_ctx *c = arg;
    const owl_mat *m = c->m;
    (void)nparts;
    const int64_t r0 = m->split[p], r1 = m->split[p + 1];
#if OWL_X86
    if (c->isa == OWL_AVX512V && m->vdtype != OWL_F32) { owl5v_mv(m, c->x, c->y, c->ydtype, r0, r1); return; }
    if (c->isa >= OWL_AVX512) { owl5_mv(m, c->x, c->y, c->ydtype, r0, r1); return; }
    if (c->isa == OWL_AVX2) { owl2_mv(m, c->x, c->y, c->ydtype, r0, r1); return; }
#endif
    owlp_mv(m, c->x, c->y, c->ydtype, r0, r1);
}

/* ------------------------------------------------------------------ several tokens: Y (T, n_out) = X W^T + b */

typedef float owl_v16 __attribute__((vector_size(64)));  /* one zmm */

/* Columns (times the tile stride) of the nonzeros in kw mask words, written to cols; returns the count.
   cols needs 16 entries of slack: each word stores a full vector. */
OWL_INLINE int owlp_cols(const uint16_t *mk, int kw, int stride, int32_t *cols) {
    int n = 0;
    for (int j = 0; j < kw; ++j) {
        for (int h = 0; h < 2; ++h) {
            const unsigned b = (mk[j] >> (8 * h)) & 0xff;
            const int32_t base = 16 * j + 8 * h;
            for (int i = 0; i < 8; ++i) cols[n + i] = (base + owl_lut_pos[b][i]) * stride;
            n += owl_lut_pc[b];
        }
    }
    return n;
}

#if OWL_X86
OWL_T2 OWL_INLINE int owl2_cols(const uint16_t *mk, int kw, int stride, int32_t *cols) {
    int n = 0;
    const __m256i st = _mm256_set1_epi32(stride);
    for (int j = 0; j < kw; j += 4) {
        uint64_t w;
        memcpy(&w, mk + j, 8);
        int o[8];  /* store offsets of the 8 bytes: popcounts of the lower bytes (independent) */
        o[0] = 0;
        for (int h = 1; h < 8; ++h) o[h] = (int)_mm_popcnt_u64(w & ((1ull << (8 * h)) - 1));
        for (int h = 0; h < 8; ++h) {
            const unsigned b = (unsigned)(w >> (8 * h)) & 0xffu;
            __m256i pos = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)owl_lut_pos[b]));
            pos = _mm256_mullo_epi32(_mm256_add_epi32(pos, _mm256_set1_epi32(16 * j + 8 * h)), st);
            _mm256_storeu_si256((__m256i *)(cols + n + o[h]), pos);
        }
        n += (int)_mm_popcnt_u64(w);
    }
    return n;
}

/* Four words per 64-bit load: their store offsets are popcounts of its low 16/32/48 bits, so the stores do
   not wait on one another (kw is a multiple of 4: rows have whole 64-bit words). */
OWL_T5 OWL_INLINE int owl5_cols(const uint16_t *mk, int kw, int stride, int32_t *cols) {
    int n = 0;
    const __m512i lane = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(stride));
    const __m512i step = _mm512_set1_epi32(16 * stride);
    __m512i idx = lane;
    for (int j = 0; j < kw; j += 4) {
        uint64_t w;
        memcpy(&w, mk + j, 8);
        const int o1 = (int)_mm_popcnt_u64(w & 0xffffull), o2 = (int)_mm_popcnt_u64(w & 0xffffffffull);
        const int o3 = (int)_mm_popcnt_u64(w & 0xffffffffffffull), o4 = (int)_mm_popcnt_u64(w);
        __mmask16 k[4];
        owl5_masks(w, k);
        const __m512i i1 = _mm512_add_epi32(idx, step), i2 = _mm512_add_epi32(i1, step);
        const __m512i i3 = _mm512_add_epi32(i2, step);
        _mm512_storeu_si512((void *)(cols + n), _mm512_maskz_compress_epi32(k[0], idx));
        _mm512_storeu_si512((void *)(cols + n + o1), _mm512_maskz_compress_epi32(k[1], i1));
        _mm512_storeu_si512((void *)(cols + n + o2), _mm512_maskz_compress_epi32(k[2], i2));
        _mm512_storeu_si512((void *)(cols + n + o3), _mm512_maskz_compress_epi32(k[3], i3));
        n += o4;
        idx = _mm512_add_epi32(i3, step);
    }
    return n;
}
#endif

/* The n values from off as float32: the stored array itself for float32, else converted into buf (the
   vector variants read up to 15 values past the row: inside the padding). */
OWL_INLINE const float *owlp_vals(const owl_mat *m, int64_t off, int n, float *buf, int vd) {
    if (vd == OWL_F32) return (const float *)m->vals + off;
    const uint16_t *h = (const uint16_t *)m->vals + off;
    if (vd == OWL_BF16)
        for (int i = 0; i < n; ++i) buf[i] = owl_bf16_f32(h[i]);
    else
        for (int i = 0; i < n; ++i) buf[i] = owl_f16_f32(h[i]);
    return buf;
}

#if OWL_X86
OWL_T5 OWL_INLINE const float *owl5_vals(const owl_mat *m, int64_t off, int n, float *buf, int vd) {
    if (vd == OWL_F32) return (const float *)m->vals + off;
    if (vd == OWL_BF16)
        for (int i = 0; i < n; i += 16) _mm512_storeu_ps(buf + i, owl5_load16(m->vals, off + i, OWL_BF16));
    else
        for (int i = 0; i < n; i += 16) _mm512_storeu_ps(buf + i, owl5_load16(m->vals, off + i, OWL_F16));
    return buf;
}

OWL_T2 OWL_INLINE const float *owl2_vals(const owl_mat *m, int64_t off, int n, float *buf, int vd) {
    if (vd == OWL_F32) return (const float *)m->vals + off;
    if (vd == OWL_BF16)
        for (int i = 0; i < n; i += 8) _mm256_storeu_ps(buf + i, owl2_load8(m->vals, off + i, OWL_BF16));
    else
        for (int i = 0; i < n; i += 8) _mm256_storeu_ps(buf + i, owl2_load8(m->vals, off + i, OWL_F16));
    return buf;
}
#endif

/* P##_fma_row: yb (nv x 16 tokens) += sum_i w[i] * xc[cols[i] + t], t < 16 nv. VT is the ISA's native
   float vector (LANES floats: 16 zmm, 8 ymm, 4 xmm; wider generic vectors make GCC broadcast through the
   stack), REGS how many of them may hold accumulators without spilling. Consecutive nonzeros go to
   different accumulator sets (REGS / vectors per nonzero of them), so several independent FMA chains
   hide the FMA latency; the sets are summed in a fixed order. nv is a constant after inlining. */
#define OWL_DEFINE_FMA(P, ATTR, VT, LANES, REGS)                                                                   \
    ATTR OWL_INLINE VT P##_vload(const float *p) { VT v; memcpy(&v, p, sizeof v); return v; }                   \
    ATTR OWL_INLINE void P##_fma_row(float *yb, const float *xc, const int32_t *cols, const float *w, int n,     \
                                     int nv) {                                                                   \
        const int nvec = nv * (16 / (LANES)), sets = (REGS) / nvec > 1 ? (REGS) / nvec : 1;                     \
        VT acc[16][16];                                                                                          \
        for (int s = 0; s < sets; ++s)                                                                           \
            for (int v = 0; v < nvec; ++v) acc[s][v] = (VT){0};                                                  \
        int i = 0;                                                                                               \
        for (; i + sets <= n; i += sets)                                                                         \
            for (int s = 0; s < sets; ++s) {                                                                     \
                const float ws = w[i + s]; /* scalar * vector: one broadcast ({0} + w would add) */              \
                const float *xp = xc + cols[i + s];                                                              \
                for (int v = 0; v < nvec; ++v) acc[s][v] += ws * P##_vload(xp + (LANES) * v);                    \
            }                                                                                                    \
        for (; i < n; ++i) {                                                                                     \
            const float ws = w[i];                                                                               \
            const float *xp = xc + cols[i];                                                                      \
            for (int v = 0; v < nvec; ++v) acc[0][v] += ws * P##_vload(xp + (LANES) * v);                        \
        }                                                                                                        \
        for (int step = 1; step < sets; step *= 2) /* pairwise: (0+1) + (2+3) ... */                             \
            for (int s = 0; s + step < sets; s += 2 * step)                                                      \
                for (int v = 0; v < nvec; ++v) acc[s][v] += acc[s + step][v];                                    \
        for (int v = 0; v < nvec; ++v) {                                                                         \
            VT o = P##_vload(yb + (LANES) * v) + acc[0][v];                                                      \
            memcpy(yb + (LANES) * v, &o, sizeof o);                                                              \
        }                                                                                                        \
    }

typedef float owl_v4 __attribute__((vector_size(16)));
typedef float owl_v8 __attribute__((vector_size(32)));
OWL_DEFINE_FMA(owlp, , owl_v4, 4, 8)
#if OWL_X86
OWL_DEFINE_FMA(owl2, OWL_T2, owl_v8, 8, 8)
OWL_DEFINE_FMA(owl5, OWL_T5, owl_v16, 16, 8)
#endif

/* The rows of a block are visited chunk by chunk, so the value stream jumps between OWL_RB row segments,
   which the hardware prefetchers do not follow: fetch the segment (and mask words) OWL_PF_ROWS rows ahead. */
#define OWL_PF_ROWS 2
OWL_INLINE void owl_prefetch_seg(const owl_mat *m, int64_t r, int64_t k0, int kw, int64_t off) {
    const uint16_t *mk = m->mask + r * m->ng + k0;
    int64_t n = 0;
    for (int j = 0; j < kw; j += 4) {
        uint64_t w;
        memcpy(&w, mk + j, 8);
        n += __builtin_popcountll(w);
    }
    const int vb = m->vdtype == OWL_F32 ? 4 : 2;
    const char *v = (const char *)m->vals + off * vb, *end = v + n * vb;
    for (const char *p = (const char *)((uintptr_t)v & ~(uintptr_t)63); p < end; p += 64) __builtin_prefetch(p, 0, 3);
    __builtin_prefetch(mk + m->ng, 0, 3);  /* the mask words of the row after */
}

/* Write a row block's tile results (yb: row-major, stride floats per row) to y (token-major). */
OWL_INLINE void owl_mm_store(const owl_mat *m, const float *yb, int64_t r0, int64_t nr, void *y, int ydt, int64_t t0,
                             int64_t tn, int stride) {
    for (int64_t u = 0; u < tn; ++u)
        for (int64_t i = 0; i < nr; ++i)
            owl_store_val(y, (t0 + u) * m->n_out + r0 + i, owl_finish(m, r0 + i, yb[i * stride + u]), ydt);
}

/* The several-token kernel, instantiated once per ISA (P: name prefix, ATTR: target attribute, COLS/VALS:
   that ISA's column decoder and value converter; the FMA loop is the generic vector code compiled for ATTR).
   P##_mm_block: one row block [r0, r1) against one tile of tn tokens, nv = ceil(tn / 16) vectors, 16 nv
   floats per input in xt. Rows of the block are applied chunk by chunk (OWL_KC words = 128 inputs), so
   the chunk of xt stays in L1; each row's running value offset is kept in off[]. */
#define OWL_DEFINE_MM(P, ATTR, COLS, VALS)                                                                        \
    ATTR OWL_INLINE void P##_mm_block(const owl_mat *m, const float *xt, int64_t r0, int64_t r1, void *y, int ydt, \
                                      int64_t t0, int64_t tn, int nv, int vd) {                                   \
        float yb[OWL_RB * OWL_TT] __attribute__((aligned(64)));                                                  \
        int32_t cols[OWL_KCMAX * 16 + 16] __attribute__((aligned(64)));                                          \
        float vbuf[OWL_KCMAX * 16 + 16] __attribute__((aligned(64)));                                            \
        int64_t off[OWL_RB];                                                                                      \
        const int stride = 16 * nv;                                                                               \
        const int64_t ng = m->ng, nr = r1 - r0;                                                                   \
        for (int64_t i = 0; i < nr; ++i) off[i] = m->rp[r0 + i];                                                  \
        memset(yb, 0, sizeof(float) * (size_t)(nr * stride));                                                     \
        const int64_t kc = OWL_KCMAX / (nv == 3 ? 4 : nv);                                                        \
        for (int64_t k0 = 0; k0 < ng; k0 += kc) {                                                                 \
            const int kw = (int)(ng - k0 < kc ? ng - k0 : kc);                                                    \
            const float *xc = xt + k0 * 16 * stride;                                                              \
            for (int64_t i = 0; i < nr; ++i) {                                                                    \
                if (i + OWL_PF_ROWS < nr) owl_prefetch_seg(m, r0 + i + OWL_PF_ROWS, k0, kw, off[i + OWL_PF_ROWS]);\
                const int n = COLS(m->mask + (r0 + i) * ng + k0, kw, stride, cols);                               \
                const float *w = VALS(m, off[i], n, vbuf, vd);                                                    \
                off[i] += n;                                                                                      \
                P##_fma_row(yb + i * stride, xc, cols, w, n, nv);                                                 \
            }                                                                                                     \
        }                                                                                                         \
        owl_mm_store(m, yb, r0, nr, y, ydt, t0, tn, stride);                                                      \
    }                                                                                                             \
    ATTR OWL_INLINE void P##_mm_rows_t(const owl_ctx *c, int64_t r0, int64_t r1, int vd) {                       \
        const owl_mat *m = c->m;                                                                                  \
        const int64_t tile_floats = m->ng * 16 * OWL_TT;                                                          \
        for (int64_t b = r0; b < r1; b += OWL_RB) {                                                               \
            const int64_t b1 = b + OWL_RB < r1 ? b + OWL_RB : r1;                                                 \
            for (int64_t t = 0; t < c->ntile; ++t) {                                                              \
                const int64_t tn = t + 1 < c->ntile ? OWL_TT : c->tn_last;                                        \
                const float *xt = c->xt + t * tile_floats;                                                        \
                const int64_t t0 = c->t0 + t * OWL_TT;                                                            \
                switch ((tn + 15) / 16) {                                                                         \
                case 1: P##_mm_block(m, xt, b, b1, c->y, c->ydtype, t0, tn, 1, vd); break;                        \
                case 2: P##_mm_block(m, xt, b, b1, c->y, c->ydtype, t0, tn, 2, vd); break;                        \
                case 3: P##_mm_block(m, xt, b, b1, c->y, c->ydtype, t0, tn, 3, vd); break;                        \
                default: P##_mm_block(m, xt, b, b1, c->y, c->ydtype, t0, tn, 4, vd); break;                       \
                }                                                                                                 \
            }                                                                                                     \
        }                                                                                                         \
    }                                                                                                             \
    /* the value dtype stays a run-time argument: it only matters once per row chunk (VALS) */                 \
    ATTR static void P##_mm_rows(const owl_ctx *c, int64_t r0, int64_t r1) {                                      \
        P##_mm_rows_t(c, r0, r1, (int)c->m->vdtype);                                                              \
    }

OWL_DEFINE_MM(owlp, , owlp_cols, owlp_vals)
#if OWL_X86
OWL_DEFINE_MM(owl2, OWL_T2, owl2_cols, owl2_vals)
OWL_DEFINE_MM(owl5, OWL_T5, owl5_cols, owl5_vals)
#endif

static void owl_mm_part(void *arg, int p, int nparts) {
    const owl_ctx *c = arg;
    (void)nparts;
    const int64_t r0 = c->m->split[p], r1 = c->m->split[p + 1];
#if OWL_X86
    if (c->isa >= OWL_AVX512) { owl5_mm_rows(c, r0, r1); return; }  /* VBMI2 adds nothing here */
    if (c->isa == OWL_AVX2) { owl2_mm_rows(c, r0, r1); return; }
#endif
    owlp_mm_rows(c, r0, r1);
}

/* Transpose and convert the super-tile's tokens into xt: tile t, input i, token u at
   xt[t * tile_floats + i * stride + u] (stride = 16 x vectors of that tile); zeros past n_in and past the
   last token. Parts take interleaved (tile, block of 64 inputs) pieces. */
static void owl_transpose_part(void *arg, int p, int nparts) {
    const owl_ctx *c = arg;
    const owl_mat *m = c->m;
    const int64_t n_in = m->n_in, npad = m->ng * 16, tile_floats = npad * OWL_TT, nblk = npad / 64;
    for (int64_t piece = p; piece < c->ntile * nblk; piece += nparts) {
        const int64_t t = piece / nblk, i0 = (piece % nblk) * 64;
        const int64_t tn = t + 1 < c->ntile ? OWL_TT : c->tn_last;
        const int64_t stride = 16 * ((tn + 15) / 16);
        float *dst = (float *)c->xt + t * tile_floats;
        const int64_t tok0 = c->t0 + t * OWL_TT;
        for (int64_t i = i0; i < i0 + 64; ++i)
            for (int64_t u = tn; u < stride; ++u) dst[i * stride + u] = 0.f;
        for (int64_t u = 0; u < tn; ++u) {
            const int64_t row = (tok0 + u) * n_in;
            for (int64_t i = i0; i < i0 + 64; ++i)
                dst[i * stride + u] = i < n_in ? owl_load_val(c->xin, row + i, c->xdtype) : 0.f;
        }
    }
}

/* ------------------------------------------------------------------ scratch and the entry point */

static float *owl_scratch;
static size_t owl_scratch_bytes;

static float *owl_scratch_get(size_t bytes) {
    if (bytes > owl_scratch_bytes) {
        free(owl_scratch);
        owl_scratch = NULL;
        owl_scratch_bytes = 0;
        void *p = NULL;
        if (posix_memalign(&p, 64, bytes)) return NULL;
        owl_scratch = p;
        owl_scratch_bytes = bytes;
    }
    return owl_scratch;
}

/* Free the activation scratch (it grows to the largest super-tile seen: 256 tokens x inputs x 4 bytes). */
OWL_API void owl_release_scratch(void) {
    pthread_mutex_lock(&owl_call_mu);
    free(owl_scratch);
    owl_scratch = NULL;
    owl_scratch_bytes = 0;
    pthread_mutex_unlock(&owl_call_mu);
}

/* y (T, n_out) in ydtype = x (T, n_in) in xdtype times W^T plus bias. threads 0: the default (owl_set_threads);
   isa -1: the best the CPU has. Returns OWL_OK or a negative error code. */
OWL_API int owl_linear(owl_mat *m, const void *x, void *y, int64_t T, int xdtype, int ydtype, int threads, int isa) {
    if (!m || m->abi != OWL_ABI || !x || !y || T < 1 || xdtype < OWL_F32 || xdtype > OWL_F16 || ydtype < OWL_F32 ||
        ydtype > OWL_F16)
        return OWL_EARG;
    pthread_once(&owl_once, owl_init_once);
    if (isa < 0) isa = owl_isa_best();
    if (!owl_isa_ok(isa)) return OWL_EISA;
    pthread_mutex_lock(&owl_call_mu);
    int nthreads = threads > 0 ? threads : owl_default_threads;
    if (nthreads > OWL_MAX_THREADS) nthreads = OWL_MAX_THREADS;
    if (nthreads > m->n_out) nthreads = (int)m->n_out;
    if (nthreads < 1) nthreads = 1;
    nthreads = owl_pool_ensure(nthreads);  /* fewer if the system refuses threads */
    const int nparts = owl_nchunks(m, nthreads);
    if (m->nsplit != nparts) owl_make_split(m, nparts);
    owl_ctx c;
    memset(&c, 0, sizeof c);
    c.m = m;
    c.y = y;
    c.ydtype = ydtype;
    c.isa = isa;
    c.T = T;
    int rc = OWL_OK;
    const int64_t npad = m->ng * 16;
    if (T == 1) {
        float *xs = owl_scratch_get((size_t)npad * 2 * sizeof(float));
        if (!xs) { rc = OWL_ENOMEM; goto out; }
        for (int64_t i = 0; i < m->n_in; ++i) xs[i] = owl_load_val(x, i, xdtype);
        for (int64_t i = m->n_in; i < npad; ++i) xs[i] = 0.f;
        if (isa == OWL_AVX512V && m->vdtype == OWL_BF16) {
            owl_x_evenodd(xs + npad, xs, npad);
            xs += npad;
        }
        c.x = xs;
        owl_run_dyn(owl_mv_part, &c, nparts, nthreads);
    } else if (T < atomic_load_explicit(&owl_tile_from, memory_order_relaxed)) {
        owl_mt_job j;
        memset(&j, 0, sizeof j);
        const int nt = T <= 2 ? 2 : T <= 4 || isa == OWL_AVX2 ? 4 : 8;
        const int64_t tpad = (T + nt - 1) / nt * nt;
        float *xs = owl_scratch_get((size_t)(tpad * npad * 2) * sizeof(float));
        if (!xs) { rc = OWL_ENOMEM; goto out; }
        const int evenodd = isa == OWL_AVX512V && m->vdtype == OWL_BF16;
        float *xo = evenodd ? xs + tpad * npad : xs;
        for (int64_t t = 0; t < tpad; ++t) {
            float *row = xs + t * npad;
            for (int64_t i = 0; i < npad; ++i)
                row[i] = t < T && i < m->n_in ? owl_load_val(x, t * m->n_in + i, xdtype) : 0.f;
            if (evenodd) owl_x_evenodd(xo + t * npad, row, npad);
        }
        j.mt.m = m;
        j.mt.x = xo;
        j.mt.y = y;
        j.mt.T = T;
        j.mt.ydtype = ydtype;
        j.mt.nt = nt;
        j.isa = isa;
        owl_run_dyn(owl_mt_part, &j, nparts, nthreads);
    } else {
        const int64_t st_tokens = (int64_t)OWL_TT * OWL_ST;
        const int64_t first = T < st_tokens ? T : st_tokens;
        float *xt = owl_scratch_get((size_t)((first + OWL_TT - 1) / OWL_TT) * npad * OWL_TT * sizeof(float));
        if (!xt) { rc = OWL_ENOMEM; goto out; }
        c.xt = xt;
        c.xin = x;
        c.xdtype = xdtype;
        for (int64_t t0 = 0; t0 < T; t0 += st_tokens) {
            const int64_t n = T - t0 < st_tokens ? T - t0 : st_tokens;
            c.t0 = t0;
            c.ntile = (n + OWL_TT - 1) / OWL_TT;
            c.tn_last = n - (c.ntile - 1) * OWL_TT;
            int64_t tparts = (int64_t)nthreads * OWL_CHUNKS_PER_THREAD;
            if (tparts > c.ntile * (npad / 64)) tparts = c.ntile * (npad / 64);
            owl_run_dyn(owl_transpose_part, &c, (int)tparts, nthreads);
            owl_run_dyn(owl_mm_part, &c, nparts, nthreads);
        }
    }
out:
    pthread_mutex_unlock(&owl_call_mu);
    return rc;
}

/* ------------------------------------------------------------------ densify */

/* W back to dense (n_out, n_in) in the stored dtype: for many tokens with 16-bit values a dense GEMM that
   uses the CPU's bf16/fp16 dot-product units (through torch) beats any FMA-based sparse loop, so
   linear.py densifies into a scratch matrix and calls it. */
typedef struct { const owl_mat *m; void *out; int64_t r0, r1; } owl_dense_ctx;

#if OWL_X86
/* One expand and one full store per mask word (two words per vpexpandw for 16-bit values). The row's
   padding inputs (past n_in) are written to a row-sized stack buffer, not past the caller's row. */
OWL_T5V static void owl5v_densify_rows(const owl_mat *m, void *out, int64_t r0, int64_t r1, int64_t base) {
    const int vb = m->vdtype == OWL_F32 ? 4 : 2;
    const int64_t row_bytes = m->n_in * vb, full = m->n_in / 32;  /* whole 32-input blocks */
    for (int64_t r = r0; r < r1; ++r) {
        const uint16_t *mk = m->mask + r * m->ng;
        char *dst = (char *)out + (r - base) * row_bytes;
        int64_t off = m->rp[r];
        char tail[128] __attribute__((aligned(64)));
        for (int64_t b = 0; b < m->ng / 2; ++b) {
            uint32_t w;
            memcpy(&w, mk + 2 * b, 4);
            char *d = b < full ? dst + b * 32 * vb : tail;
            if (vb == 2) {
                const __m512i v = _mm512_loadu_si512((const void *)((const uint16_t *)m->vals + off));
                _mm512_storeu_si512((void *)d, _mm512_maskz_expand_epi16(_cvtu32_mask32(w), v));
            } else {
                const float *v = (const float *)m->vals + off;
                const __mmask16 k0 = _cvtu32_mask16(w & 0xffffu), k1 = _cvtu32_mask16(w >> 16);
                _mm512_storeu_ps((float *)d, _mm512_maskz_expand_ps(k0, _mm512_loadu_ps(v)));
                const __m512 hi = _mm512_loadu_ps(v + _mm_popcnt_u32(w & 0xffffu));
                _mm512_storeu_ps((float *)d + 16, _mm512_maskz_expand_ps(k1, hi));
            }
            if (b >= full) {
                const int64_t start = b * 32, n = m->n_in - start < 32 ? m->n_in - start : 32;
                if (n > 0) memcpy(dst + start * vb, tail, (size_t)(n * vb));
            }
            off += _mm_popcnt_u32(w);
        }
    }
}
#endif

/* Rows [c->r0, c->r1) into c->out (row r at row r - c->r0), split evenly across the parts. */
static void owl_densify_part(void *arg, int p, int nparts) {
    const owl_dense_ctx *c = arg;
    const owl_mat *m = c->m;
    const int64_t n = c->r1 - c->r0, r0 = c->r0 + n * p / nparts, r1 = c->r0 + n * (p + 1) / nparts;
#if OWL_X86
    if (owl_isa_ok(OWL_AVX512V)) {
        owl5v_densify_rows(m, c->out, r0, r1, c->r0);
        return;
    }
#endif
    const int vb = m->vdtype == OWL_F32 ? 4 : 2;
    for (int64_t r = r0; r < r1; ++r) {
        const uint16_t *mk = m->mask + r * m->ng;
        char *dst = (char *)c->out + (r - c->r0) * m->n_in * vb;
        const char *src = (const char *)m->vals + m->rp[r] * vb;
        memset(dst, 0, (size_t)(m->n_in * vb));
        for (int64_t j = 0; j < m->ng; ++j)
            for (unsigned w = mk[j]; w; w &= w - 1) {
                memcpy(dst + (16 * j + __builtin_ctz(w)) * vb, src, (size_t)vb);
                src += vb;
            }
    }
}

/* Rows [r0, r1) of W as a dense (r1 - r0, n_in) matrix in the stored dtype, written to out. */
OWL_API int owl_densify(owl_mat *m, void *out, int64_t r0, int64_t r1, int threads) {
    if (!m || m->abi != OWL_ABI || !out || r0 < 0 || r1 > m->n_out || r0 >= r1) return OWL_EARG;
    pthread_once(&owl_once, owl_init_once);
    pthread_mutex_lock(&owl_call_mu);
    int nthreads = threads > 0 ? threads : owl_default_threads;
    if (nthreads > OWL_MAX_THREADS) nthreads = OWL_MAX_THREADS;
    nthreads = owl_pool_ensure(nthreads < 1 ? 1 : nthreads);
    int64_t nchunks = nthreads <= 1 ? 1 : (int64_t)nthreads * OWL_CHUNKS_PER_THREAD;
    if (nchunks > r1 - r0) nchunks = r1 - r0;
    owl_dense_ctx c = {m, out, r0, r1};
    owl_run_dyn(owl_densify_part, &c, (int)nchunks, nthreads);
    pthread_mutex_unlock(&owl_call_mu);
    return OWL_OK;
}

/* ------------------------------------------------------------------ read-bandwidth probe */

typedef struct {
    const unsigned char *buf;
    int64_t bytes;
    int isa;
    uint64_t sink[OWL_MAX_THREADS];
} owl_probe;

/* Each thread reads its slice as 4 interleaved streams (quarters of the slice, in lockstep): one core
   keeps more lines in flight that way (measured: 11.5 vs 7 GB/s on one core), so the probe is what a
   well-fed core gets, not what a naive loop gets. The XOR of everything read goes to a sink. */
#define OWL_PROBE_STREAMS 4

static uint64_t owlp_read(const unsigned char *p, int64_t n) {
    const int64_t q = n / OWL_PROBE_STREAMS;
    uint64_t a[OWL_PROBE_STREAMS][4] = {{0}};
    for (int64_t i = 0; i + 32 <= q; i += 32)
        for (int s = 0; s < OWL_PROBE_STREAMS; ++s) {
            uint64_t w[4];
            memcpy(w, p + s * q + i, 32);
            for (int k = 0; k < 4; ++k) a[s][k] ^= w[k];
        }
    uint64_t r = 0;
    for (int s = 0; s < OWL_PROBE_STREAMS; ++s) r ^= a[s][0] ^ a[s][1] ^ a[s][2] ^ a[s][3];
    return r;
}

#if OWL_X86
OWL_T2 static uint64_t owl2_read(const unsigned char *p, int64_t n) {
    const int64_t q = n / OWL_PROBE_STREAMS;
    __m256i a[OWL_PROBE_STREAMS][2];
    for (int s = 0; s < OWL_PROBE_STREAMS; ++s) a[s][0] = a[s][1] = _mm256_setzero_si256();
    for (int64_t i = 0; i + 64 <= q; i += 64)
        for (int s = 0; s < OWL_PROBE_STREAMS; ++s) {
            const unsigned char *c = p + s * q + i;
            a[s][0] = _mm256_xor_si256(a[s][0], _mm256_loadu_si256((const __m256i *)c));
            a[s][1] = _mm256_xor_si256(a[s][1], _mm256_loadu_si256((const __m256i *)(c + 32)));
        }
    __m256i r = _mm256_setzero_si256();
    for (int s = 0; s < OWL_PROBE_STREAMS; ++s) r = _mm256_xor_si256(r, _mm256_xor_si256(a[s][0], a[s][1]));
    return (uint64_t)_mm256_extract_epi64(r, 0) ^ (uint64_t)_mm256_extract_epi64(r, 3);
}

OWL_T5 static uint64_t owl5_read(const unsigned char *p, int64_t n) {
    const int64_t q = n / OWL_PROBE_STREAMS;
    __m512i a[OWL_PROBE_STREAMS];
    for (int s = 0; s < OWL_PROBE_STREAMS; ++s) a[s] = _mm512_setzero_si512();
    for (int64_t i = 0; i + 64 <= q; i += 64)
        for (int s = 0; s < OWL_PROBE_STREAMS; ++s)
            a[s] = _mm512_xor_si512(a[s], _mm512_loadu_si512((const void *)(p + s * q + i)));
    __m512i r = _mm512_setzero_si512();
    for (int s = 0; s < OWL_PROBE_STREAMS; ++s) r = _mm512_xor_si512(r, a[s]);
    return (uint64_t)_mm512_reduce_add_epi64(r);
}
#endif

/* Slices are multiples of 256 bytes x OWL_PROBE_STREAMS, so every stream reads whole 64-byte lines. */
#define OWL_PROBE_ALIGN ((int64_t)256 * OWL_PROBE_STREAMS)

static void owl_probe_span(const owl_probe *pr, int p, int nparts, int64_t *b, int64_t *e) {
    const int64_t chunk = (pr->bytes / nparts) & ~(OWL_PROBE_ALIGN - 1);
    *b = chunk * p;
    *e = chunk * (p + 1);
}

static void owl_probe_touch(void *arg, int p, int nparts) {
    owl_probe *pr = arg;
    int64_t b, e;
    owl_probe_span(pr, p, nparts, &b, &e);
    for (int64_t i = b; i < e; ++i) ((unsigned char *)pr->buf)[i] = (unsigned char)(i * 131u);  /* first touch */
}

static void owl_probe_read(void *arg, int p, int nparts) {
    owl_probe *pr = arg;
    int64_t b, e;
    owl_probe_span(pr, p, nparts, &b, &e);
    uint64_t s;
#if OWL_X86
    if (pr->isa >= OWL_AVX512) s = owl5_read(pr->buf + b, e - b);
    else if (pr->isa == OWL_AVX2) s = owl2_read(pr->buf + b, e - b);
    else
#endif
        s = owlp_read(pr->buf + b, e - b);
    pr->sink[p] ^= s;
}

/* Stream `bytes` of memory with `threads` threads, reps times; writes each rep's seconds to secs (reps
   entries) and returns the best rate in bytes/s (negative: an error code). Use a buffer several times the
   last-level cache so the number is DRAM's. */
OWL_API double owl_read_bandwidth(int64_t bytes, int threads, int reps, int isa, double *secs) {
    pthread_once(&owl_once, owl_init_once);
    if (bytes < 4096 || threads < 1 || reps < 1) return OWL_EARG;
    if (isa < 0) isa = owl_isa_best();
    if (!owl_isa_ok(isa)) return OWL_EISA;
    void *buf = NULL;
    if (posix_memalign(&buf, 1 << 21, (size_t)bytes)) return OWL_ENOMEM;
    owl_probe *pr = calloc(1, sizeof *pr);
    if (!pr) { free(buf); return OWL_ENOMEM; }
    pr->buf = buf;
    pr->bytes = bytes;
    pr->isa = isa;
    pthread_mutex_lock(&owl_call_mu);
    threads = owl_pool_ensure(threads);
    owl_run(owl_probe_touch, pr, threads);
    owl_run(owl_probe_read, pr, threads);  /* warm-up */
    double best = 0.0;
    for (int r = 0; r < reps; ++r) {
        const uint64_t t0 = owl_now_ns();
        owl_run(owl_probe_read, pr, threads);
        const double s = (double)(owl_now_ns() - t0) * 1e-9;
        if (secs) secs[r] = s;
        const double rate = (double)((bytes / threads) & ~(OWL_PROBE_ALIGN - 1)) * threads / s;
        if (rate > best) best = rate;
    }
    pthread_mutex_unlock(&owl_call_mu);
    free(buf);
    free(pr);
    return best;
}

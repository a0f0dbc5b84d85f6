/* The three TVM backend hooks a kernel library exported by tvm.compile(target="llvm") calls,
 * so that it runs with only apache-tvm-ffi installed (no libtvm_runtime):
 *
 *   TVMBackendParallelLaunch   T.parallel loops: a small pthread pool, sized from the caller
 *                              (rnnsp_set_num_threads: torch.get_num_threads()); workers spin
 *                              briefly, then sleep on a condition variable, so they never take
 *                              the cores from torch/OpenMP for long (the prototype measured a
 *                              4x slow-down of oneDNN with both pools spinning).
 *   TVMBackendAllocWorkspace   local buffers too large for the stack (packed weight panels):
 *   TVMBackendFreeWorkspace    64-byte aligned malloc/free.
 *
 * rnn_sparsify.kernels.cpu_runtime compiles this file once per machine (cached) and stores
 * the addresses of these functions in each kernel library's __TVMBackend* pointers.
 * A launch from a second thread while one is running executes serially in that thread.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
  void* sync_handle;
  int32_t num_task;
} TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

#define MAX_THREADS 256
#define SPIN_ITERS 20000

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;   /* guards generation + cv */
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t launch_mu = PTHREAD_MUTEX_INITIALIZER; /* one launch at a time */
static int n_workers = 0;                                     /* started workers (ids 1..) */
static atomic_int n_threads = 1;                              /* threads per launch */
static FTVMParallelLambda job_f;
static void* job_data;
static TVMParallelGroupEnv job_env;
static atomic_long generation = 0;
static atomic_int pending = 0; /* workers that have not finished the current generation */
static atomic_int job_err = 0;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

static long start_generation[MAX_THREADS];

static void* worker_main(void* arg) {
  int id = (int)(intptr_t)arg;
  /* the generation current when the worker was created (not when it started running: a
   * launch may already have bumped it, and that launch waits for this worker) */
  long seen = start_generation[id];
  for (;;) {
    long g;
    int spins = 0;
    while ((g = atomic_load(&generation)) == seen) {
      if (++spins < SPIN_ITERS) {
        cpu_relax();
        continue;
      }
      pthread_mutex_lock(&pool_mu);
      while ((g = atomic_load(&generation)) == seen) pthread_cond_wait(&pool_cv, &pool_mu);
      pthread_mutex_unlock(&pool_mu);
      break;
    }
    seen = g;
    if (id < job_env.num_task) {
      int r = job_f(id, &job_env, job_data);
      if (r != 0) atomic_store(&job_err, r);
    }
    atomic_fetch_sub(&pending, 1);
  }
  return NULL;
}

static void ensure_workers(int want) {
  while (n_workers < want && n_workers < MAX_THREADS - 1) {
    pthread_t th;
    start_generation[n_workers + 1] = atomic_load(&generation);
    if (pthread_create(&th, NULL, worker_main, (void*)(intptr_t)(n_workers + 1)) != 0) break;
    pthread_detach(th);
    n_workers++;
  }
}

void rnnsp_set_num_threads(int n) {
  if (n < 1) n = 1;
  if (n > MAX_THREADS) n = MAX_THREADS;
  atomic_store(&n_threads, n);
}

int rnnsp_get_num_threads(void) { return atomic_load(&n_threads); }

/* When the process already runs an OpenMP runtime (torch's libgomp), parallel loops go
 * through it: one pool for torch and the kernels, none spinning against the other. */
typedef void (*gomp_parallel_t)(void (*)(void*), void*, unsigned, unsigned);
typedef int (*omp_thread_num_t)(void);
static gomp_parallel_t gomp_parallel = NULL;
static omp_thread_num_t omp_thread_num = NULL;

void rnnsp_use_gomp(void* parallel_fn, void* thread_num_fn) {
  gomp_parallel = (gomp_parallel_t)parallel_fn;
  omp_thread_num = (omp_thread_num_t)thread_num_fn;
}

typedef struct {
  FTVMParallelLambda f;
  void* cdata;
  TVMParallelGroupEnv env;
  atomic_int err;
} omp_job_t;

static void omp_body(void* p) {
  omp_job_t* job = (omp_job_t*)p;
  int id = omp_thread_num();
  if (id < job->env.num_task) {
    int r = job->f(id, &job->env, job->cdata);
    if (r != 0) atomic_store(&job->err, r);
  }
}

int TVMBackendParallelLaunch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  int n = num_task > 0 ? num_task : atomic_load(&n_threads);
  if (n > MAX_THREADS) n = MAX_THREADS;
  if (n > 1 && gomp_parallel != NULL) {
    omp_job_t job;
    job.f = flambda;
    job.cdata = cdata;
    job.env.sync_handle = NULL;
    job.env.num_task = n;
    atomic_store(&job.err, 0);
    gomp_parallel(omp_body, &job, (unsigned)n, 0);
    return atomic_load(&job.err);
  }
  if (n <= 1 || pthread_mutex_trylock(&launch_mu) != 0) {
    /* one thread, or another launch is running: execute every task here */
    TVMParallelGroupEnv env = {NULL, n};
    int err = 0;
    for (int i = 0; i < n; ++i) {
      int r = flambda(i, &env, cdata);
      if (r != 0) err = r;
    }
    return err;
  }
  ensure_workers(n - 1);
  job_f = flambda;
  job_data = cdata;
  job_env.sync_handle = NULL;
  job_env.num_task = n <= n_workers + 1 ? n : n_workers + 1;
  atomic_store(&job_err, 0);
  atomic_store(&pending, n_workers);
  pthread_mutex_lock(&pool_mu);
  atomic_fetch_add(&generation, 1);
  pthread_cond_broadcast(&pool_cv);
  pthread_mutex_unlock(&pool_mu);
  int r0 = flambda(0, &job_env, cdata);
  int spins = 0;
  while (atomic_load(&pending) > 0) {
    if (++spins < SPIN_ITERS) cpu_relax();
    else sched_yield();
  }
  int err = atomic_load(&job_err);
  pthread_mutex_unlock(&launch_mu);
  return r0 != 0 ? r0 : err;
}

void* TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code_hint,
                               int dtype_bits_hint) {
  (void)device_type;
  (void)device_id;
  (void)dtype_code_hint;
  (void)dtype_bits_hint;
  size_t size = (size_t)((nbytes + 63) / 64 * 64);
  if (size == 0) size = 64;
  return aligned_alloc(64, size);
}

int TVMBackendFreeWorkspace(int device_type, int device_id, void* ptr) {
  (void)device_type;
  (void)device_id;
  free(ptr);
  return 0;
}

// Implementation of the plan API declared in include/whittle_dnnl.h on oneDNN 2.6's C API.
#define _GNU_SOURCE  // pthread_setaffinity_np, CPU_SET
#include "whittle_dnnl.h"

#include <oneapi/dnnl/dnnl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern void omp_set_num_threads(int);
extern int omp_get_max_threads(void);

static dnnl_engine_t g_engine;
static dnnl_stream_t g_stream;
static dnnl_status_t g_init_status = dnnl_success;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void init_engine(void) {
    g_init_status = dnnl_engine_create(&g_engine, dnnl_cpu, 0);
    if (g_init_status == dnnl_success) g_init_status = dnnl_stream_create(&g_stream, g_engine, dnnl_stream_default_flags);
}

static const char *status_name(dnnl_status_t s) {
    switch (s) {
    case dnnl_success: return "success";
    case dnnl_out_of_memory: return "out of memory";
    case dnnl_invalid_arguments: return "invalid arguments";
    case dnnl_unimplemented: return "unimplemented";
    case dnnl_iterator_ends: return "iterator ends";
    case dnnl_runtime_error: return "runtime error";
    case dnnl_not_required: return "not required";
    default: return "unknown status";
    }
}

#define CHECK(call)                                                                                  \
    do {                                                                                             \
        dnnl_status_t st_ = (call);                                                                  \
        if (st_ != dnnl_success) {                                                                   \
            if (err && errlen) snprintf(err, errlen, "oneDNN: %s failed: %s", #call, status_name(st_)); \
            goto fail;                                                                               \
        }                                                                                            \
    } while (0)

static int engine_ready(char *err, size_t errlen) {
    pthread_once(&g_once, init_engine);
    if (g_init_status != dnnl_success) {
        if (err && errlen) snprintf(err, errlen, "oneDNN: engine creation failed: %s", status_name(g_init_status));
        return 0;
    }
    return 1;
}

#if defined(__GLIBC__)
#include <malloc.h>
#endif
void wk_tune_allocator(void) {
#if defined(__GLIBC__)
    mallopt(M_MMAP_THRESHOLD, 1 << 30);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif
}

void wk_release_free_memory(void) {
#if defined(__GLIBC__)
    malloc_trim(0);
#endif
}

void wk_set_num_threads(int n) { if (n > 0) omp_set_num_threads(n); }
int wk_get_max_threads(void) { return omp_get_max_threads(); }

// libgomp's entry point for `#pragma omp parallel` (this file is compiled without -fopenmp): runs fn(data) on a
// team of num_threads (0: the default), the caller being thread 0. The team's threads are the pool oneDNN's
// parallel regions reuse, so an affinity set here holds for them.
extern void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags);
extern int omp_get_thread_num(void);

typedef struct {
    int pin;            // 1: thread i to the i-th allowed CPU; 0: every thread back to `allowed`
    int count;          // CPUs in `allowed`
    int cpus[CPU_SETSIZE];
    cpu_set_t allowed;  // the CPUs the caller could run on when pinning began
    int failures;
} pin_job;

static pin_job g_pin;
static pthread_mutex_t g_pin_lock = PTHREAD_MUTEX_INITIALIZER;

static void pin_thread(void *data) {
    pin_job *job = data;
    cpu_set_t set;
    if (job->pin) {
        CPU_ZERO(&set);
        CPU_SET(job->cpus[omp_get_thread_num() % job->count], &set);
    } else {
        set = job->allowed;
    }
    if (pthread_setaffinity_np(pthread_self(), sizeof set, &set) != 0) __atomic_add_fetch(&job->failures, 1, __ATOMIC_RELAXED);
}

int wk_pin_threads(int pin) {
    pthread_mutex_lock(&g_pin_lock);
    int result = -1;
    if (pin) {
        if (sched_getaffinity(0, sizeof g_pin.allowed, &g_pin.allowed) == 0) {
            g_pin.count = 0;
            for (int c = 0; c < CPU_SETSIZE; c++)
                if (CPU_ISSET(c, &g_pin.allowed)) g_pin.cpus[g_pin.count++] = c;
        }
    }
    if (g_pin.count > 0) {
        g_pin.pin = pin;
        g_pin.failures = 0;
        GOMP_parallel(pin_thread, &g_pin, 0, 0);
        result = g_pin.failures == 0 ? (pin ? omp_get_max_threads() : 0) : -1;
    }
    pthread_mutex_unlock(&g_pin_lock);
    return result;
}

static dnnl_alg_kind_t eltwise_alg(wk_eltwise_t kind) {
    switch (kind) {
    case WK_ELTWISE_RELU: return dnnl_eltwise_relu;
    case WK_ELTWISE_CLIP: return dnnl_eltwise_clip_v2;
    case WK_ELTWISE_LOGISTIC: return dnnl_eltwise_logistic;
    case WK_ELTWISE_TANH: return dnnl_eltwise_tanh;
    case WK_ELTWISE_HARDSWISH: return dnnl_eltwise_hardswish;
    case WK_ELTWISE_LINEAR: return dnnl_eltwise_linear;
    case WK_ELTWISE_GELU_ERF: return dnnl_eltwise_gelu_erf;
    case WK_ELTWISE_GELU_TANH: return dnnl_eltwise_gelu_tanh;
    case WK_ELTWISE_EXP: return dnnl_eltwise_exp;
    case WK_ELTWISE_LOG: return dnnl_eltwise_log;
    case WK_ELTWISE_SQRT: return dnnl_eltwise_sqrt;
    case WK_ELTWISE_ABS: return dnnl_eltwise_abs;
    case WK_ELTWISE_SQUARE: return dnnl_eltwise_square;
    case WK_ELTWISE_SWISH: return dnnl_eltwise_swish;
    default: return dnnl_alg_kind_undef;
    }
}

/// Builds an attribute with an optional sum post-op followed by an optional eltwise post-op.
static dnnl_status_t make_attr(dnnl_primitive_attr_t *attr, wk_postop_t post, int sum_input) {
    dnnl_status_t st = dnnl_primitive_attr_create(attr);
    if (st != dnnl_success) return st;
    if (post.kind == WK_ELTWISE_NONE && !sum_input) return dnnl_success;
    dnnl_post_ops_t ops;
    st = dnnl_post_ops_create(&ops);
    if (st != dnnl_success) return st;
    if (sum_input) st = dnnl_post_ops_append_sum(ops, 1.0f);
    if (st == dnnl_success && post.kind != WK_ELTWISE_NONE)
        st = dnnl_post_ops_append_eltwise(ops, 1.0f, eltwise_alg(post.kind), post.alpha, post.beta);
    if (st == dnnl_success) st = dnnl_primitive_attr_set_post_ops(*attr, ops);
    dnnl_post_ops_destroy(ops);
    return st;
}

/// Copies `src` laid out as `from` into a new buffer laid out as `to` (a weights reorder, done once per plan).
static void *reorder_copy(const dnnl_memory_desc_t *from, const dnnl_memory_desc_t *to, const void *src,
                          char *err, size_t errlen) {
    void *buf = NULL;
    dnnl_primitive_desc_t rpd = NULL;
    dnnl_primitive_t r = NULL;
    dnnl_memory_t msrc = NULL, mdst = NULL;
    size_t size = dnnl_memory_desc_get_size(to);
    buf = aligned_alloc(64, (size + 63) / 64 * 64);
    if (!buf) { if (err && errlen) snprintf(err, errlen, "out of memory"); return NULL; }
    if (dnnl_memory_desc_equal(from, to)) { memcpy(buf, src, size); return buf; }
    CHECK(dnnl_reorder_primitive_desc_create(&rpd, from, g_engine, to, g_engine, NULL));
    CHECK(dnnl_primitive_create(&r, rpd));
    CHECK(dnnl_memory_create(&msrc, from, g_engine, (void *)src));
    CHECK(dnnl_memory_create(&mdst, to, g_engine, buf));
    dnnl_exec_arg_t args[2] = {{DNNL_ARG_FROM, msrc}, {DNNL_ARG_TO, mdst}};
    CHECK(dnnl_primitive_execute(r, g_stream, 2, args));
    CHECK(dnnl_stream_wait(g_stream));
    dnnl_memory_destroy(msrc); dnnl_memory_destroy(mdst); dnnl_primitive_destroy(r); dnnl_primitive_desc_destroy(rpd);
    return buf;
fail:
    if (msrc) dnnl_memory_destroy(msrc);
    if (mdst) dnnl_memory_destroy(mdst);
    if (r) dnnl_primitive_destroy(r);
    if (rpd) dnnl_primitive_desc_destroy(rpd);
    free(buf);
    return NULL;
}

// MARK: Convolution

/// The memory descriptors every convolution plan starts from: plain NCHW / (g)OIHW layouts of the caller's buffers,
/// their `any` twins for oneDNN to choose from, and the bias vector.
typedef struct {
    dnnl_memory_desc_t src, dst, src_any, dst_any, w_plain, w_any, bias;
} conv_mds;

static dnnl_status_t conv_mds_init(conv_mds *m, int64_t n, int64_t c, int64_t h, int64_t w, int64_t oc, int64_t oh,
                                   int64_t ow, int64_t kh, int64_t kw, int64_t groups) {
    dnnl_status_t st;
    dnnl_dims_t src_dims = {n, c, h, w}, dst_dims = {n, oc, oh, ow}, b_dims = {oc};
    if ((st = dnnl_memory_desc_init_by_tag(&m->src, 4, src_dims, dnnl_f32, dnnl_nchw)) != dnnl_success) return st;
    if ((st = dnnl_memory_desc_init_by_tag(&m->dst, 4, dst_dims, dnnl_f32, dnnl_nchw)) != dnnl_success) return st;
    if ((st = dnnl_memory_desc_init_by_tag(&m->src_any, 4, src_dims, dnnl_f32, dnnl_format_tag_any)) != dnnl_success) return st;
    if ((st = dnnl_memory_desc_init_by_tag(&m->dst_any, 4, dst_dims, dnnl_f32, dnnl_format_tag_any)) != dnnl_success) return st;
    if ((st = dnnl_memory_desc_init_by_tag(&m->bias, 1, b_dims, dnnl_f32, dnnl_x)) != dnnl_success) return st;
    if (groups > 1) {
        dnnl_dims_t wd = {groups, oc / groups, c / groups, kh, kw};
        if ((st = dnnl_memory_desc_init_by_tag(&m->w_plain, 5, wd, dnnl_f32, dnnl_goihw)) != dnnl_success) return st;
        return dnnl_memory_desc_init_by_tag(&m->w_any, 5, wd, dnnl_f32, dnnl_format_tag_any);
    }
    dnnl_dims_t wd = {oc, c, kh, kw};
    if ((st = dnnl_memory_desc_init_by_tag(&m->w_plain, 4, wd, dnnl_f32, dnnl_oihw)) != dnnl_success) return st;
    return dnnl_memory_desc_init_by_tag(&m->w_any, 4, wd, dnnl_f32, dnnl_format_tag_any);
}

struct wk_conv {
    dnnl_primitive_t prim;
    dnnl_memory_t src, weights, bias, dst;
    void *weights_buf;
    float *bias_buf;
    char impl[64];
    int sum_input;
    // When oneDNN prefers blocked activations (nChw16c…), the plan converts at its boundary: plain src → blocked,
    // blocked dst → plain (and plain dst → blocked first when accumulating into it).
    dnnl_primitive_t src_in, dst_in, dst_out;
    dnnl_memory_t user_src, user_dst;  // plain NCHW views of the caller's buffers
    size_t src_size, dst_size;          // bytes of the blocked buffers (0: the layout is plain NCHW)
    dnnl_memory_desc_t src_md, dst_md;  // the layouts the primitive computes in
};

void wk_conv_destroy(wk_conv *p) {
    if (!p) return;
    if (p->prim) dnnl_primitive_destroy(p->prim);
    if (p->src_in) dnnl_primitive_destroy(p->src_in);
    if (p->dst_in) dnnl_primitive_destroy(p->dst_in);
    if (p->dst_out) dnnl_primitive_destroy(p->dst_out);
    if (p->user_src) dnnl_memory_destroy(p->user_src);
    if (p->user_dst) dnnl_memory_destroy(p->user_dst);
    if (p->src) dnnl_memory_destroy(p->src);
    if (p->weights) dnnl_memory_destroy(p->weights);
    if (p->bias) dnnl_memory_destroy(p->bias);
    if (p->dst) dnnl_memory_destroy(p->dst);
    free(p->weights_buf);
    free(p->bias_buf);
    free(p);
}

wk_conv *wk_conv_create(int64_t n, int64_t c, int64_t h, int64_t w, int64_t oc, int64_t oh, int64_t ow,
                        int64_t kh, int64_t kw, int64_t groups, int64_t stride_h, int64_t stride_w,
                        int64_t dil_h, int64_t dil_w, int64_t pad_t, int64_t pad_l, int64_t pad_b, int64_t pad_r,
                        const float *weights, const float *bias, wk_postop_t post, int sum_input,
                        char *err, size_t errlen) {
    if (!engine_ready(err, errlen)) return NULL;
    wk_conv *p = calloc(1, sizeof *p);
    dnnl_primitive_attr_t attr = NULL;
    dnnl_primitive_desc_t pd = NULL;
    if (!p) return NULL;
    conv_mds m;
    CHECK(conv_mds_init(&m, n, c, h, w, oc, oh, ow, kh, kw, groups));
    dnnl_memory_desc_t src_md = m.src, dst_md = m.dst, src_any = m.src_any, dst_any = m.dst_any, w_plain = m.w_plain,
                       w_any = m.w_any, b_md = m.bias;
    dnnl_dims_t strides = {stride_h, stride_w}, dil = {dil_h - 1, dil_w - 1};
    dnnl_dims_t pl = {pad_t, pad_l}, pr = {pad_b, pad_r};
    dnnl_convolution_desc_t desc;
    CHECK(dnnl_dilated_convolution_forward_desc_init(&desc, dnnl_forward_inference, dnnl_convolution_direct, &src_any,
                                                      &w_any, bias ? &b_md : NULL, &dst_any, strides, dil, pl, pr));
    CHECK(make_attr(&attr, post, sum_input));
    CHECK(dnnl_primitive_desc_create(&pd, &desc, attr, g_engine, NULL));
    p->sum_input = sum_input;
    const dnnl_memory_desc_t *w_chosen = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    const dnnl_memory_desc_t *src_chosen = dnnl_primitive_desc_query_md(pd, dnnl_query_src_md, 0);
    const dnnl_memory_desc_t *dst_chosen = dnnl_primitive_desc_query_md(pd, dnnl_query_dst_md, 0);
    p->src_md = *src_chosen;
    p->dst_md = *dst_chosen;
    if (!dnnl_memory_desc_equal(src_chosen, &src_md)) {
        dnnl_primitive_desc_t rpd = NULL;
        CHECK(dnnl_reorder_primitive_desc_create(&rpd, &src_md, g_engine, src_chosen, g_engine, NULL));
        dnnl_status_t st = dnnl_primitive_create(&p->src_in, rpd);
        dnnl_primitive_desc_destroy(rpd);
        CHECK(st);
        p->src_size = dnnl_memory_desc_get_size(src_chosen);
    }
    if (!dnnl_memory_desc_equal(dst_chosen, &dst_md)) {
        dnnl_primitive_desc_t rpd = NULL;
        CHECK(dnnl_reorder_primitive_desc_create(&rpd, dst_chosen, g_engine, &dst_md, g_engine, NULL));
        dnnl_status_t st = dnnl_primitive_create(&p->dst_out, rpd);
        dnnl_primitive_desc_destroy(rpd);
        CHECK(st);
        if (sum_input) {
            CHECK(dnnl_reorder_primitive_desc_create(&rpd, &dst_md, g_engine, dst_chosen, g_engine, NULL));
            st = dnnl_primitive_create(&p->dst_in, rpd);
            dnnl_primitive_desc_destroy(rpd);
            CHECK(st);
        }
        p->dst_size = dnnl_memory_desc_get_size(dst_chosen);
    }
    p->weights_buf = reorder_copy(&w_plain, w_chosen, weights, err, errlen);
    if (!p->weights_buf) goto fail;
    const char *impl = NULL;
    if (dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl) == dnnl_success && impl)
        snprintf(p->impl, sizeof p->impl, "%s", impl);
    CHECK(dnnl_primitive_create(&p->prim, pd));
    CHECK(dnnl_memory_create(&p->src, src_chosen, g_engine, DNNL_MEMORY_NONE));
    CHECK(dnnl_memory_create(&p->dst, dst_chosen, g_engine, DNNL_MEMORY_NONE));
    CHECK(dnnl_memory_create(&p->user_src, &src_md, g_engine, DNNL_MEMORY_NONE));
    CHECK(dnnl_memory_create(&p->user_dst, &dst_md, g_engine, DNNL_MEMORY_NONE));
    CHECK(dnnl_memory_create(&p->weights, w_chosen, g_engine, p->weights_buf));
    if (bias) {
        p->bias_buf = malloc(sizeof(float) * (size_t)oc);
        if (!p->bias_buf) goto fail;
        memcpy(p->bias_buf, bias, sizeof(float) * (size_t)oc);
        CHECK(dnnl_memory_create(&p->bias, &b_md, g_engine, p->bias_buf));
    }
    dnnl_primitive_desc_destroy(pd);
    dnnl_primitive_attr_destroy(attr);
    return p;
fail:
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (attr) dnnl_primitive_attr_destroy(attr);
    wk_conv_destroy(p);
    return NULL;
}

const char *wk_conv_impl(wk_conv *p) { return p->impl; }

int wk_conv_run(wk_conv *p, const float *src, float *dst, char *err, size_t errlen) {
    return wk_conv_run_layout(p, src, dst, 0, 0, err, errlen);
}

size_t wk_conv_blocked_src_bytes(const wk_conv *p) { return p->src_in ? p->src_size : 0; }
size_t wk_conv_blocked_dst_bytes(const wk_conv *p) { return p->dst_out ? p->dst_size : 0; }

int wk_conv_layouts_match(const wk_conv *producer, const wk_conv *consumer, int as_summand) {
    return dnnl_memory_desc_equal(&producer->dst_md, as_summand ? &consumer->dst_md : &consumer->src_md);
}

/// The buffers and reorders of a convolution plan that computes in its own layouts: `src_in` converts the caller's
/// plain source into the computed one, `dst_out` the computed destination back, and `dst_in` (when accumulating
/// into the destination) the caller's plain destination in first; `user_src` / `user_dst` view the caller's buffers.
typedef struct {
    dnnl_primitive_t prim, src_in, dst_in, dst_out;
    dnnl_memory_t src, weights, bias, dst, user_src, user_dst;
    size_t src_size, dst_size;
} staged_conv;

/// Runs a staged convolution on `src` into `dst`, converting each side unless the caller's data is already in the
/// computed layout (`src_native`, `dst_native`). Staging buffers live only for the call, so a graph of many plans
/// holds no idle activation copies.
static int staged_conv_run(staged_conv p, const void *src, void *dst, int src_native, int dst_native, char *err, size_t errlen) {
    void *src_buf = NULL, *dst_buf = NULL;
    int stage_src = p.src_in && !src_native, stage_dst = p.dst_out && !dst_native;
    if (stage_src) {
        src_buf = aligned_alloc(64, (p.src_size + 63) / 64 * 64);
        if (!src_buf) goto oom;
        CHECK(dnnl_memory_set_data_handle(p.user_src, (void *)src));
        CHECK(dnnl_memory_set_data_handle(p.src, src_buf));
        dnnl_exec_arg_t r[2] = {{DNNL_ARG_FROM, p.user_src}, {DNNL_ARG_TO, p.src}};
        CHECK(dnnl_primitive_execute(p.src_in, g_stream, 2, r));
    } else {
        CHECK(dnnl_memory_set_data_handle(p.src, (void *)src));
    }
    if (stage_dst) {
        dst_buf = aligned_alloc(64, (p.dst_size + 63) / 64 * 64);
        if (!dst_buf) goto oom;
        CHECK(dnnl_memory_set_data_handle(p.user_dst, dst));
        CHECK(dnnl_memory_set_data_handle(p.dst, dst_buf));
        if (p.dst_in) {
            dnnl_exec_arg_t r[2] = {{DNNL_ARG_FROM, p.user_dst}, {DNNL_ARG_TO, p.dst}};
            CHECK(dnnl_primitive_execute(p.dst_in, g_stream, 2, r));
        }
    } else {
        CHECK(dnnl_memory_set_data_handle(p.dst, dst));
    }
    dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, p.src}, {DNNL_ARG_WEIGHTS, p.weights}, {DNNL_ARG_DST, p.dst},
                               {DNNL_ARG_BIAS, p.bias}};
    CHECK(dnnl_primitive_execute(p.prim, g_stream, p.bias ? 4 : 3, args));
    if (stage_dst) {
        dnnl_exec_arg_t r[2] = {{DNNL_ARG_FROM, p.dst}, {DNNL_ARG_TO, p.user_dst}};
        CHECK(dnnl_primitive_execute(p.dst_out, g_stream, 2, r));
    }
    CHECK(dnnl_stream_wait(g_stream));
    free(src_buf);
    free(dst_buf);
    return 0;
oom:
    if (err && errlen) snprintf(err, errlen, "out of memory for convolution staging buffers");
fail:
    free(src_buf);
    free(dst_buf);
    return 1;
}

int wk_conv_run_layout(wk_conv *p, const float *src, float *dst, int src_blocked, int dst_blocked,
                       char *err, size_t errlen) {
    staged_conv s = {p->prim, p->src_in, p->dst_in, p->dst_out, p->src, p->weights, p->bias, p->dst, p->user_src,
                     p->user_dst, p->src_size, p->dst_size};
    return staged_conv_run(s, src, dst, src_blocked, dst_blocked, err, errlen);
}

// MARK: Integer convolution

static dnnl_data_type_t qtype(wk_qtype_t t) { return t == WK_U8 ? dnnl_u8 : t == WK_S8 ? dnnl_s8 : dnnl_f32; }

struct wk_qconv {
    dnnl_primitive_t prim, src_in, dst_out;
    dnnl_memory_t src, weights, bias, dst, user_src, user_dst;
    void *weights_buf;
    int32_t *bias_buf;
    size_t src_size, dst_size;  // bytes of oneDNN's layouts when they differ from plain NCHW (0 otherwise)
    int nhwc;                   // bit 0: the source layout is plain NHWC; bit 1: the destination's
    char impl[64];
};

void wk_qconv_destroy(wk_qconv *p) {
    if (!p) return;
    if (p->prim) dnnl_primitive_destroy(p->prim);
    if (p->src_in) dnnl_primitive_destroy(p->src_in);
    if (p->dst_out) dnnl_primitive_destroy(p->dst_out);
    dnnl_memory_t ms[6] = {p->src, p->weights, p->bias, p->dst, p->user_src, p->user_dst};
    for (int i = 0; i < 6; i++) if (ms[i]) dnnl_memory_destroy(ms[i]);
    free(p->weights_buf);
    free(p->bias_buf);
    free(p);
}

static dnnl_status_t reorder_plan(dnnl_primitive_t *r, const dnnl_memory_desc_t *from, const dnnl_memory_desc_t *to) {
    dnnl_primitive_desc_t rpd = NULL;
    dnnl_status_t st = dnnl_reorder_primitive_desc_create(&rpd, from, g_engine, to, g_engine, NULL);
    if (st != dnnl_success) return st;
    st = dnnl_primitive_create(r, rpd);
    dnnl_primitive_desc_destroy(rpd);
    return st;
}

wk_qconv *wk_qconv_create(int64_t n, int64_t c, int64_t h, int64_t w, int64_t oc, int64_t oh, int64_t ow,
                          int64_t kh, int64_t kw, int64_t groups, int64_t stride_h, int64_t stride_w,
                          int64_t dil_h, int64_t dil_w, int64_t pad_t, int64_t pad_l, int64_t pad_b, int64_t pad_r,
                          wk_qtype_t src_type, wk_qtype_t dst_type, const int8_t *weights, const int32_t *bias,
                          const float *scales, int64_t scale_count, int32_t src_zero, int32_t dst_zero,
                          wk_postop_t post, char *err, size_t errlen) {
    if (!engine_ready(err, errlen)) return NULL;
    if (src_type == WK_F32 || (scale_count != 1 && scale_count != oc) || groups < 1 || c % groups || oc % groups) {
        if (err && errlen) snprintf(err, errlen, "integer convolution: bad arguments (source type, %lld scales for %lld outputs, %lld groups)",
                                    (long long)scale_count, (long long)oc, (long long)groups);
        return NULL;
    }
    wk_qconv *p = calloc(1, sizeof *p);
    dnnl_primitive_attr_t attr = NULL;
    dnnl_primitive_desc_t pd = NULL;
    if (!p) return NULL;
    dnnl_dims_t src_dims = {n, c, h, w}, dst_dims = {n, oc, oh, ow}, b_dims = {oc};
    dnnl_memory_desc_t src_md, dst_md, src_any, dst_any, w_plain, w_any, b_md;
    CHECK(dnnl_memory_desc_init_by_tag(&src_md, 4, src_dims, qtype(src_type), dnnl_nchw));
    CHECK(dnnl_memory_desc_init_by_tag(&dst_md, 4, dst_dims, qtype(dst_type), dnnl_nchw));
    CHECK(dnnl_memory_desc_init_by_tag(&src_any, 4, src_dims, qtype(src_type), dnnl_format_tag_any));
    CHECK(dnnl_memory_desc_init_by_tag(&dst_any, 4, dst_dims, qtype(dst_type), dnnl_format_tag_any));
    CHECK(dnnl_memory_desc_init_by_tag(&b_md, 1, b_dims, dnnl_s32, dnnl_x));
    if (groups > 1) {
        dnnl_dims_t wd = {groups, oc / groups, c / groups, kh, kw};
        CHECK(dnnl_memory_desc_init_by_tag(&w_plain, 5, wd, dnnl_s8, dnnl_goihw));
        CHECK(dnnl_memory_desc_init_by_tag(&w_any, 5, wd, dnnl_s8, dnnl_format_tag_any));
    } else {
        dnnl_dims_t wd = {oc, c, kh, kw};
        CHECK(dnnl_memory_desc_init_by_tag(&w_plain, 4, wd, dnnl_s8, dnnl_oihw));
        CHECK(dnnl_memory_desc_init_by_tag(&w_any, 4, wd, dnnl_s8, dnnl_format_tag_any));
    }
    dnnl_dims_t strides = {stride_h, stride_w}, dil = {dil_h - 1, dil_w - 1}, pl = {pad_t, pad_l}, pr = {pad_b, pad_r};
    dnnl_convolution_desc_t desc;
    CHECK(dnnl_dilated_convolution_forward_desc_init(&desc, dnnl_forward_inference, dnnl_convolution_direct, &src_any,
                                                      &w_any, bias ? &b_md : NULL, &dst_any, strides, dil, pl, pr));
    CHECK(make_attr(&attr, post, 0));
    CHECK(dnnl_primitive_attr_set_output_scales(attr, scale_count, scale_count == 1 ? 0 : 1 << 1, scales));
    if (src_zero != 0) CHECK(dnnl_primitive_attr_set_zero_points(attr, DNNL_ARG_SRC, 1, 0, &src_zero));
    if (dst_zero != 0 && dst_type != WK_F32) {
        // oneDNN's destination zero point is added in float before rounding, which moves values near a half across
        // it (-17.499994 + 146 is 128.5 in float32). Rounding first (eltwise round: half to even) and adding the
        // zero point to the integer after (exact) gives ONNX's round(v) + z.
        dnnl_post_ops_t ops = NULL;
        CHECK(dnnl_post_ops_create(&ops));
        dnnl_status_t st = dnnl_success;
        if (post.kind != WK_ELTWISE_NONE) st = dnnl_post_ops_append_eltwise(ops, 1.0f, eltwise_alg(post.kind), post.alpha, post.beta);
        if (st == dnnl_success) st = dnnl_post_ops_append_eltwise(ops, 1.0f, dnnl_eltwise_round, 0.0f, 0.0f);
        if (st == dnnl_success) st = dnnl_post_ops_append_eltwise(ops, 1.0f, dnnl_eltwise_linear, 1.0f, (float)dst_zero);
        if (st == dnnl_success) st = dnnl_primitive_attr_set_post_ops(attr, ops);
        dnnl_post_ops_destroy(ops);
        CHECK(st);
    }
    CHECK(dnnl_primitive_desc_create(&pd, &desc, attr, g_engine, NULL));
    const dnnl_memory_desc_t *w_chosen = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    const dnnl_memory_desc_t *src_chosen = dnnl_primitive_desc_query_md(pd, dnnl_query_src_md, 0);
    const dnnl_memory_desc_t *dst_chosen = dnnl_primitive_desc_query_md(pd, dnnl_query_dst_md, 0);
    if (!dnnl_memory_desc_equal(src_chosen, &src_md)) {
        CHECK(reorder_plan(&p->src_in, &src_md, src_chosen));
        p->src_size = dnnl_memory_desc_get_size(src_chosen);
    }
    if (!dnnl_memory_desc_equal(dst_chosen, &dst_md)) {
        CHECK(reorder_plan(&p->dst_out, dst_chosen, &dst_md));
        p->dst_size = dnnl_memory_desc_get_size(dst_chosen);
    }
    {
        dnnl_memory_desc_t src_nhwc, dst_nhwc;
        CHECK(dnnl_memory_desc_init_by_tag(&src_nhwc, 4, src_dims, qtype(src_type), dnnl_nhwc));
        CHECK(dnnl_memory_desc_init_by_tag(&dst_nhwc, 4, dst_dims, qtype(dst_type), dnnl_nhwc));
        p->nhwc = (dnnl_memory_desc_equal(src_chosen, &src_nhwc) ? 1 : 0) | (dnnl_memory_desc_equal(dst_chosen, &dst_nhwc) ? 2 : 0);
    }
    // s8 weights with u8 or s8 sources may carry a compensation oneDNN appends to the weights' buffer (the
    // reorder computes it); the reorder target is the chosen descriptor, extra included.
    p->weights_buf = reorder_copy(&w_plain, w_chosen, weights, err, errlen);
    if (!p->weights_buf) goto fail;
    const char *impl = NULL;
    if (dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl) == dnnl_success && impl)
        snprintf(p->impl, sizeof p->impl, "%s", impl);
    CHECK(dnnl_primitive_create(&p->prim, pd));
    CHECK(dnnl_memory_create(&p->src, src_chosen, g_engine, DNNL_MEMORY_NONE));
    CHECK(dnnl_memory_create(&p->dst, dst_chosen, g_engine, DNNL_MEMORY_NONE));
    CHECK(dnnl_memory_create(&p->user_src, &src_md, g_engine, DNNL_MEMORY_NONE));
    CHECK(dnnl_memory_create(&p->user_dst, &dst_md, g_engine, DNNL_MEMORY_NONE));
    CHECK(dnnl_memory_create(&p->weights, w_chosen, g_engine, p->weights_buf));
    if (bias) {
        p->bias_buf = malloc(sizeof(int32_t) * (size_t)oc);
        if (!p->bias_buf) goto fail;
        memcpy(p->bias_buf, bias, sizeof(int32_t) * (size_t)oc);
        CHECK(dnnl_memory_create(&p->bias, &b_md, g_engine, p->bias_buf));
    }
    dnnl_primitive_desc_destroy(pd);
    dnnl_primitive_attr_destroy(attr);
    return p;
fail:
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (attr) dnnl_primitive_attr_destroy(attr);
    wk_qconv_destroy(p);
    return NULL;
}

const char *wk_qconv_impl(wk_qconv *p) { return p->impl; }

int wk_qconv_nhwc(const wk_qconv *p) { return p->nhwc; }

int wk_qconv_run(wk_qconv *p, const void *src, void *dst, char *err, size_t errlen) {
    return wk_qconv_run_layout(p, src, dst, 0, 0, err, errlen);
}

int wk_qconv_run_layout(wk_qconv *p, const void *src, void *dst, int src_nhwc, int dst_nhwc, char *err, size_t errlen) {
    if ((src_nhwc && !(p->nhwc & 1)) || (dst_nhwc && !(p->nhwc & 2))) {
        if (err && errlen) snprintf(err, errlen, "integer convolution: channels-last data for a plan that does not compute in it");
        return 1;
    }
    staged_conv s = {p->prim, p->src_in, NULL, p->dst_out, p->src, p->weights, p->bias, p->dst, p->user_src, p->user_dst,
                     p->src_size, p->dst_size};
    return staged_conv_run(s, src, dst, src_nhwc, dst_nhwc, err, errlen);
}

int wk_cpu_has_vnni(void) {
    dnnl_cpu_isa_t isa = dnnl_get_effective_cpu_isa();
    return isa == dnnl_cpu_isa_avx512_core_vnni || isa == dnnl_cpu_isa_avx512_core_bf16 || isa == dnnl_cpu_isa_avx512_core_amx
        || isa == dnnl_cpu_isa_avx2_vnni;
}

const char *wk_cpu_isa_name(void) {
    switch (dnnl_get_effective_cpu_isa()) {
    case dnnl_cpu_isa_sse41: return "sse41";
    case dnnl_cpu_isa_avx: return "avx";
    case dnnl_cpu_isa_avx2: return "avx2";
    case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni";
    case dnnl_cpu_isa_avx512_mic: return "avx512_mic";
    case dnnl_cpu_isa_avx512_mic_4ops: return "avx512_mic_4ops";
    case dnnl_cpu_isa_avx512_core: return "avx512_core";
    case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx";
    default: return "other";
    }
}

// MARK: Pooling

struct wk_pool {
    dnnl_primitive_t prim;
    dnnl_memory_t src, dst;
};

void wk_pool_destroy(wk_pool *p) {
    if (!p) return;
    if (p->prim) dnnl_primitive_destroy(p->prim);
    if (p->src) dnnl_memory_destroy(p->src);
    if (p->dst) dnnl_memory_destroy(p->dst);
    free(p);
}

wk_pool *wk_pool_create(wk_pool_t kind, int64_t n, int64_t c, int64_t h, int64_t w, int64_t oh, int64_t ow,
                        int64_t kh, int64_t kw, int64_t stride_h, int64_t stride_w, int64_t dil_h, int64_t dil_w,
                        int64_t pad_t, int64_t pad_l, int64_t pad_b, int64_t pad_r, char *err, size_t errlen) {
    if (!engine_ready(err, errlen)) return NULL;
    wk_pool *p = calloc(1, sizeof *p);
    dnnl_primitive_desc_t pd = NULL;
    if (!p) return NULL;
    dnnl_memory_desc_t src_md, dst_md;
    dnnl_dims_t src_dims = {n, c, h, w}, dst_dims = {n, c, oh, ow};
    CHECK(dnnl_memory_desc_init_by_tag(&src_md, 4, src_dims, dnnl_f32, dnnl_nchw));
    CHECK(dnnl_memory_desc_init_by_tag(&dst_md, 4, dst_dims, dnnl_f32, dnnl_nchw));
    dnnl_dims_t strides = {stride_h, stride_w}, kernel = {kh, kw}, dil = {dil_h - 1, dil_w - 1};
    dnnl_dims_t pl = {pad_t, pad_l}, pr = {pad_b, pad_r};
    dnnl_alg_kind_t alg = kind == WK_POOL_MAX ? dnnl_pooling_max
                        : kind == WK_POOL_AVG_INCLUDE_PAD ? dnnl_pooling_avg_include_padding
                                                          : dnnl_pooling_avg_exclude_padding;
    dnnl_pooling_v2_desc_t desc;
    CHECK(dnnl_pooling_v2_forward_desc_init(&desc, dnnl_forward_inference, alg, &src_md, &dst_md, strides, kernel,
                                             dil, pl, pr));
    CHECK(dnnl_primitive_desc_create(&pd, &desc, NULL, g_engine, NULL));
    CHECK(dnnl_primitive_create(&p->prim, pd));
    CHECK(dnnl_memory_create(&p->src, &src_md, g_engine, DNNL_MEMORY_NONE));
    CHECK(dnnl_memory_create(&p->dst, &dst_md, g_engine, DNNL_MEMORY_NONE));
    dnnl_primitive_desc_destroy(pd);
    return p;
fail:
    if (pd) dnnl_primitive_desc_destroy(pd);
    wk_pool_destroy(p);
    return NULL;
}

int wk_pool_run(wk_pool *p, const float *src, float *dst, char *err, size_t errlen) {
    CHECK(dnnl_memory_set_data_handle(p->src, (void *)src));
    CHECK(dnnl_memory_set_data_handle(p->dst, dst));
    dnnl_exec_arg_t args[2] = {{DNNL_ARG_SRC, p->src}, {DNNL_ARG_DST, p->dst}};
    CHECK(dnnl_primitive_execute(p->prim, g_stream, 2, args));
    CHECK(dnnl_stream_wait(g_stream));
    return 0;
fail:
    return 1;
}

// MARK: Batch normalization

struct wk_bnorm {
    dnnl_primitive_t prim;
    dnnl_memory_t src, dst, scale, shift, mean, var;
    float *params; // scale, shift, mean, var: 4 · C floats
};

void wk_bnorm_destroy(wk_bnorm *p) {
    if (!p) return;
    if (p->prim) dnnl_primitive_destroy(p->prim);
    dnnl_memory_t mems[6] = {p->src, p->dst, p->scale, p->shift, p->mean, p->var};
    for (int i = 0; i < 6; i++) if (mems[i]) dnnl_memory_destroy(mems[i]);
    free(p->params);
    free(p);
}

wk_bnorm *wk_bnorm_create(int64_t n, int64_t c, int64_t spatial, float epsilon, const float *scale,
                          const float *shift, const float *mean, const float *var, wk_postop_t post,
                          char *err, size_t errlen) {
    if (!engine_ready(err, errlen)) return NULL;
    wk_bnorm *p = calloc(1, sizeof *p);
    dnnl_primitive_desc_t pd = NULL;
    dnnl_primitive_attr_t attr = NULL;
    if (!p) return NULL;
    p->params = malloc(sizeof(float) * 4 * (size_t)c);
    if (!p->params) goto fail;
    memcpy(p->params, scale, sizeof(float) * (size_t)c);
    memcpy(p->params + c, shift, sizeof(float) * (size_t)c);
    memcpy(p->params + 2 * c, mean, sizeof(float) * (size_t)c);
    memcpy(p->params + 3 * c, var, sizeof(float) * (size_t)c);
    dnnl_memory_desc_t data_md, c_md;
    dnnl_dims_t dims = {n, c, spatial}, cdims = {c};
    CHECK(dnnl_memory_desc_init_by_tag(&data_md, 3, dims, dnnl_f32, dnnl_abc));
    CHECK(dnnl_memory_desc_init_by_tag(&c_md, 1, cdims, dnnl_f32, dnnl_x));
    dnnl_batch_normalization_desc_t desc;
    CHECK(dnnl_batch_normalization_forward_desc_init(&desc, dnnl_forward_inference, &data_md, epsilon,
                                                     dnnl_use_global_stats | dnnl_use_scale | dnnl_use_shift));
    CHECK(make_attr(&attr, post, 0));
    CHECK(dnnl_primitive_desc_create(&pd, &desc, attr, g_engine, NULL));
    CHECK(dnnl_primitive_create(&p->prim, pd));
    CHECK(dnnl_memory_create(&p->src, &data_md, g_engine, DNNL_MEMORY_NONE));
    CHECK(dnnl_memory_create(&p->dst, &data_md, g_engine, DNNL_MEMORY_NONE));
    CHECK(dnnl_memory_create(&p->scale, &c_md, g_engine, p->params));
    CHECK(dnnl_memory_create(&p->shift, &c_md, g_engine, p->params + c));
    CHECK(dnnl_memory_create(&p->mean, &c_md, g_engine, p->params + 2 * c));
    CHECK(dnnl_memory_create(&p->var, &c_md, g_engine, p->params + 3 * c));
    dnnl_primitive_desc_destroy(pd);
    dnnl_primitive_attr_destroy(attr);
    return p;
fail:
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (attr) dnnl_primitive_attr_destroy(attr);
    wk_bnorm_destroy(p);
    return NULL;
}

int wk_bnorm_run(wk_bnorm *p, const float *src, float *dst, char *err, size_t errlen) {
    CHECK(dnnl_memory_set_data_handle(p->src, (void *)src));
    CHECK(dnnl_memory_set_data_handle(p->dst, dst));
    dnnl_exec_arg_t args[6] = {{DNNL_ARG_SRC, p->src},     {DNNL_ARG_DST, p->dst},   {DNNL_ARG_SCALE, p->scale},
                               {DNNL_ARG_SHIFT, p->shift}, {DNNL_ARG_MEAN, p->mean}, {DNNL_ARG_VARIANCE, p->var}};
    CHECK(dnnl_primitive_execute(p->prim, g_stream, 6, args));
    CHECK(dnnl_stream_wait(g_stream));
    return 0;
fail:
    return 1;
}

// MARK: Layer normalization

struct wk_lnorm {
    dnnl_primitive_t prim;
    dnnl_memory_t src, dst, scale, shift, mean, var;
    float *params; // scale, shift: 2 · INNER floats
    float *stats;  // mean, variance: 2 · OUTER floats (outputs of inference without global statistics)
};

void wk_lnorm_destroy(wk_lnorm *p) {
    if (!p) return;
    if (p->prim) dnnl_primitive_destroy(p->prim);
    dnnl_memory_t mems[6] = {p->src, p->dst, p->scale, p->shift, p->mean, p->var};
    for (int i = 0; i < 6; i++) if (mems[i]) dnnl_memory_destroy(mems[i]);
    free(p->params);
    free(p->stats);
    free(p);
}

wk_lnorm *wk_lnorm_create(int64_t outer, int64_t inner, float epsilon, const float *scale, const float *shift,
                          char *err, size_t errlen) {
    if (!engine_ready(err, errlen)) return NULL;
    wk_lnorm *p = calloc(1, sizeof *p);
    dnnl_primitive_desc_t pd = NULL;
    if (!p) return NULL;
    p->params = malloc(sizeof(float) * 2 * (size_t)inner);
    p->stats = malloc(sizeof(float) * 2 * (size_t)outer);
    if (!p->params || !p->stats) goto fail;
    for (int64_t i = 0; i < inner; i++) {
        p->params[i] = scale ? scale[i] : 1.0f;
        p->params[inner + i] = shift ? shift[i] : 0.0f;
    }
    dnnl_memory_desc_t data_md, c_md, stat_md;
    dnnl_dims_t dims = {outer, inner}, cdims = {inner}, sdims = {outer};
    CHECK(dnnl_memory_desc_init_by_tag(&data_md, 2, dims, dnnl_f32, dnnl_ab));
    CHECK(dnnl_memory_desc_init_by_tag(&c_md, 1, cdims, dnnl_f32, dnnl_x));
    CHECK(dnnl_memory_desc_init_by_tag(&stat_md, 1, sdims, dnnl_f32, dnnl_x));
    dnnl_layer_normalization_desc_t desc;
    CHECK(dnnl_layer_normalization_forward_desc_init(&desc, dnnl_forward_inference, &data_md, &stat_md, epsilon,
                                                     dnnl_use_scale | dnnl_use_shift));
    CHECK(dnnl_primitive_desc_create(&pd, &desc, NULL, g_engine, NULL));
    CHECK(dnnl_primitive_create(&p->prim, pd));
    CHECK(dnnl_memory_create(&p->src, &data_md, g_engine, DNNL_MEMORY_NONE));
    CHECK(dnnl_memory_create(&p->dst, &data_md, g_engine, DNNL_MEMORY_NONE));
    CHECK(dnnl_memory_create(&p->scale, &c_md, g_engine, p->params));
    CHECK(dnnl_memory_create(&p->shift, &c_md, g_engine, p->params + inner));
    CHECK(dnnl_memory_create(&p->mean, &stat_md, g_engine, p->stats));
    CHECK(dnnl_memory_create(&p->var, &stat_md, g_engine, p->stats + outer));
    dnnl_primitive_desc_destroy(pd);
    return p;
fail:
    if (pd) dnnl_primitive_desc_destroy(pd);
    wk_lnorm_destroy(p);
    return NULL;
}

int wk_lnorm_run(wk_lnorm *p, const float *src, float *dst, char *err, size_t errlen) {
    CHECK(dnnl_memory_set_data_handle(p->src, (void *)src));
    CHECK(dnnl_memory_set_data_handle(p->dst, dst));
    dnnl_exec_arg_t args[6] = {{DNNL_ARG_SRC, p->src},     {DNNL_ARG_DST, p->dst},   {DNNL_ARG_SCALE, p->scale},
                               {DNNL_ARG_SHIFT, p->shift}, {DNNL_ARG_MEAN, p->mean}, {DNNL_ARG_VARIANCE, p->var}};
    CHECK(dnnl_primitive_execute(p->prim, g_stream, 6, args));
    CHECK(dnnl_stream_wait(g_stream));
    return 0;
fail:
    return 1;
}

// MARK: Inner product

struct wk_inner {
    dnnl_primitive_t prim;
    dnnl_memory_t src, weights, bias, dst;
    void *weights_buf;
    float *bias_buf;
};

void wk_inner_destroy(wk_inner *p) {
    if (!p) return;
    if (p->prim) dnnl_primitive_destroy(p->prim);
    dnnl_memory_t mems[4] = {p->src, p->weights, p->bias, p->dst};
    for (int i = 0; i < 4; i++) if (mems[i]) dnnl_memory_destroy(mems[i]);
    free(p->weights_buf);
    free(p->bias_buf);
    free(p);
}

wk_inner *wk_inner_create(int64_t m, int64_t k, int64_t n, const float *weights, const float *bias,
                          wk_postop_t post, char *err, size_t errlen) {
    if (!engine_ready(err, errlen)) return NULL;
    wk_inner *p = calloc(1, sizeof *p);
    dnnl_primitive_desc_t pd = NULL;
    dnnl_primitive_attr_t attr = NULL;
    if (!p) return NULL;
    dnnl_memory_desc_t src_md, dst_md, w_plain, w_any, b_md;
    dnnl_dims_t sd = {m, k}, dd = {m, n}, wd = {n, k}, bd = {n};
    CHECK(dnnl_memory_desc_init_by_tag(&src_md, 2, sd, dnnl_f32, dnnl_nc));
    CHECK(dnnl_memory_desc_init_by_tag(&dst_md, 2, dd, dnnl_f32, dnnl_nc));
    CHECK(dnnl_memory_desc_init_by_tag(&w_plain, 2, wd, dnnl_f32, dnnl_oi));
    CHECK(dnnl_memory_desc_init_by_tag(&w_any, 2, wd, dnnl_f32, dnnl_format_tag_any));
    CHECK(dnnl_memory_desc_init_by_tag(&b_md, 1, bd, dnnl_f32, dnnl_x));
    dnnl_inner_product_desc_t desc;
    CHECK(dnnl_inner_product_forward_desc_init(&desc, dnnl_forward_inference, &src_md, &w_any, bias ? &b_md : NULL,
                                               &dst_md));
    CHECK(make_attr(&attr, post, 0));
    CHECK(dnnl_primitive_desc_create(&pd, &desc, attr, g_engine, NULL));
    const dnnl_memory_desc_t *w_chosen = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    p->weights_buf = reorder_copy(&w_plain, w_chosen, weights, err, errlen);
    if (!p->weights_buf) goto fail;
    CHECK(dnnl_primitive_create(&p->prim, pd));
    CHECK(dnnl_memory_create(&p->src, &src_md, g_engine, DNNL_MEMORY_NONE));
    CHECK(dnnl_memory_create(&p->dst, &dst_md, g_engine, DNNL_MEMORY_NONE));
    CHECK(dnnl_memory_create(&p->weights, w_chosen, g_engine, p->weights_buf));
    if (bias) {
        p->bias_buf = malloc(sizeof(float) * (size_t)n);
        if (!p->bias_buf) goto fail;
        memcpy(p->bias_buf, bias, sizeof(float) * (size_t)n);
        CHECK(dnnl_memory_create(&p->bias, &b_md, g_engine, p->bias_buf));
    }
    dnnl_primitive_desc_destroy(pd);
    dnnl_primitive_attr_destroy(attr);
    return p;
fail:
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (attr) dnnl_primitive_attr_destroy(attr);
    wk_inner_destroy(p);
    return NULL;
}

int wk_inner_run(wk_inner *p, const float *src, float *dst, char *err, size_t errlen) {
    CHECK(dnnl_memory_set_data_handle(p->src, (void *)src));
    CHECK(dnnl_memory_set_data_handle(p->dst, dst));
    dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, p->src}, {DNNL_ARG_WEIGHTS, p->weights}, {DNNL_ARG_DST, p->dst},
                               {DNNL_ARG_BIAS, p->bias}};
    CHECK(dnnl_primitive_execute(p->prim, g_stream, p->bias ? 4 : 3, args));
    CHECK(dnnl_stream_wait(g_stream));
    return 0;
fail:
    return 1;
}

// MARK: Element-wise

struct wk_binary {
    dnnl_primitive_t prim;
    dnnl_memory_t src0, src1, dst;
};

void wk_binary_destroy(wk_binary *p) {
    if (!p) return;
    if (p->prim) dnnl_primitive_destroy(p->prim);
    dnnl_memory_t mems[3] = {p->src0, p->src1, p->dst};
    for (int i = 0; i < 3; i++) if (mems[i]) dnnl_memory_destroy(mems[i]);
    free(p);
}

static dnnl_format_tag_t plain_tag(int ndims) {
    switch (ndims) {
    case 1: return dnnl_a;
    case 2: return dnnl_ab;
    case 3: return dnnl_abc;
    case 4: return dnnl_abcd;
    case 5: return dnnl_abcde;
    case 6: return dnnl_abcdef;
    default: return dnnl_format_tag_undef;
    }
}

wk_binary *wk_binary_create(int kind, int ndims, const int64_t *dims, const int64_t *dims1, char *err, size_t errlen) {
    if (!engine_ready(err, errlen)) return NULL;
    if (ndims < 1 || ndims > 6) { snprintf(err, errlen, "binary: rank %d is not supported", ndims); return NULL; }
    wk_binary *p = calloc(1, sizeof *p);
    dnnl_primitive_desc_t pd = NULL;
    if (!p) return NULL;
    dnnl_alg_kind_t alg = kind == 0 ? dnnl_binary_add : kind == 1 ? dnnl_binary_sub : kind == 2 ? dnnl_binary_mul : dnnl_binary_div;
    dnnl_memory_desc_t md0, md1;
    dnnl_dims_t d0, d1;
    for (int i = 0; i < ndims; i++) { d0[i] = dims[i]; d1[i] = dims1[i]; }
    CHECK(dnnl_memory_desc_init_by_tag(&md0, ndims, d0, dnnl_f32, plain_tag(ndims)));
    CHECK(dnnl_memory_desc_init_by_tag(&md1, ndims, d1, dnnl_f32, plain_tag(ndims)));
    dnnl_binary_desc_t desc;
    CHECK(dnnl_binary_desc_init(&desc, alg, &md0, &md1, &md0));
    CHECK(dnnl_primitive_desc_create(&pd, &desc, NULL, g_engine, NULL));
    CHECK(dnnl_primitive_create(&p->prim, pd));
    CHECK(dnnl_memory_create(&p->src0, &md0, g_engine, DNNL_MEMORY_NONE));
    CHECK(dnnl_memory_create(&p->src1, &md1, g_engine, DNNL_MEMORY_NONE));
    CHECK(dnnl_memory_create(&p->dst, &md0, g_engine, DNNL_MEMORY_NONE));
    dnnl_primitive_desc_destroy(pd);
    return p;
fail:
    if (pd) dnnl_primitive_desc_destroy(pd);
    wk_binary_destroy(p);
    return NULL;
}

int wk_binary_run(wk_binary *p, const float *src0, const float *src1, float *dst, char *err, size_t errlen) {
    CHECK(dnnl_memory_set_data_handle(p->src0, (void *)src0));
    CHECK(dnnl_memory_set_data_handle(p->src1, (void *)src1));
    CHECK(dnnl_memory_set_data_handle(p->dst, dst));
    dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC_0, p->src0}, {DNNL_ARG_SRC_1, p->src1}, {DNNL_ARG_DST, p->dst}};
    CHECK(dnnl_primitive_execute(p->prim, g_stream, 3, args));
    CHECK(dnnl_stream_wait(g_stream));
    return 0;
fail:
    return 1;
}

struct wk_eltwise {
    dnnl_primitive_t prim;
    dnnl_memory_t src, dst;
};

void wk_eltwise_destroy(wk_eltwise *p) {
    if (!p) return;
    if (p->prim) dnnl_primitive_destroy(p->prim);
    if (p->src) dnnl_memory_destroy(p->src);
    if (p->dst) dnnl_memory_destroy(p->dst);
    free(p);
}

wk_eltwise *wk_eltwise_create(wk_postop_t op, int64_t count, char *err, size_t errlen) {
    if (!engine_ready(err, errlen)) return NULL;
    wk_eltwise *p = calloc(1, sizeof *p);
    dnnl_primitive_desc_t pd = NULL;
    if (!p) return NULL;
    dnnl_memory_desc_t md;
    dnnl_dims_t dims = {count};
    CHECK(dnnl_memory_desc_init_by_tag(&md, 1, dims, dnnl_f32, dnnl_x));
    dnnl_eltwise_desc_t desc;
    CHECK(dnnl_eltwise_forward_desc_init(&desc, dnnl_forward_inference, eltwise_alg(op.kind), &md, op.alpha, op.beta));
    CHECK(dnnl_primitive_desc_create(&pd, &desc, NULL, g_engine, NULL));
    CHECK(dnnl_primitive_create(&p->prim, pd));
    CHECK(dnnl_memory_create(&p->src, &md, g_engine, DNNL_MEMORY_NONE));
    CHECK(dnnl_memory_create(&p->dst, &md, g_engine, DNNL_MEMORY_NONE));
    dnnl_primitive_desc_destroy(pd);
    return p;
fail:
    if (pd) dnnl_primitive_desc_destroy(pd);
    wk_eltwise_destroy(p);
    return NULL;
}

int wk_eltwise_run(wk_eltwise *p, const float *src, float *dst, char *err, size_t errlen) {
    CHECK(dnnl_memory_set_data_handle(p->src, (void *)src));
    CHECK(dnnl_memory_set_data_handle(p->dst, dst));
    dnnl_exec_arg_t args[2] = {{DNNL_ARG_SRC, p->src}, {DNNL_ARG_DST, p->dst}};
    CHECK(dnnl_primitive_execute(p->prim, g_stream, 2, args));
    CHECK(dnnl_stream_wait(g_stream));
    return 0;
fail:
    return 1;
}

// MARK: Softmax

struct wk_softmax {
    dnnl_primitive_t prim;
    dnnl_memory_t src, dst;
};

void wk_softmax_destroy(wk_softmax *p) {
    if (!p) return;
    if (p->prim) dnnl_primitive_destroy(p->prim);
    if (p->src) dnnl_memory_destroy(p->src);
    if (p->dst) dnnl_memory_destroy(p->dst);
    free(p);
}

wk_softmax *wk_softmax_create(int64_t outer, int64_t axis, int64_t inner, char *err, size_t errlen) {
    if (!engine_ready(err, errlen)) return NULL;
    wk_softmax *p = calloc(1, sizeof *p);
    dnnl_primitive_desc_t pd = NULL;
    if (!p) return NULL;
    dnnl_memory_desc_t md;
    dnnl_dims_t dims = {outer, axis, inner};
    CHECK(dnnl_memory_desc_init_by_tag(&md, 3, dims, dnnl_f32, dnnl_abc));
    dnnl_softmax_desc_t desc;
    CHECK(dnnl_softmax_forward_desc_init(&desc, dnnl_forward_inference, &md, 1));
    CHECK(dnnl_primitive_desc_create(&pd, &desc, NULL, g_engine, NULL));
    CHECK(dnnl_primitive_create(&p->prim, pd));
    CHECK(dnnl_memory_create(&p->src, &md, g_engine, DNNL_MEMORY_NONE));
    CHECK(dnnl_memory_create(&p->dst, &md, g_engine, DNNL_MEMORY_NONE));
    dnnl_primitive_desc_destroy(pd);
    return p;
fail:
    if (pd) dnnl_primitive_desc_destroy(pd);
    wk_softmax_destroy(p);
    return NULL;
}

int wk_softmax_run(wk_softmax *p, const float *src, float *dst, char *err, size_t errlen) {
    CHECK(dnnl_memory_set_data_handle(p->src, (void *)src));
    CHECK(dnnl_memory_set_data_handle(p->dst, dst));
    dnnl_exec_arg_t args[2] = {{DNNL_ARG_SRC, p->src}, {DNNL_ARG_DST, p->dst}};
    CHECK(dnnl_primitive_execute(p->prim, g_stream, 2, args));
    CHECK(dnnl_stream_wait(g_stream));
    return 0;
fail:
    return 1;
}

// MARK: GEMM

int wk_sgemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
             const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
    return dnnl_sgemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) == dnnl_success ? 0 : 1;
}

// MARK: Convolution for training

/// One primitive argument whose caller-side buffer is plain while the primitive may want another layout.
typedef struct {
    dnnl_memory_desc_t plain, chosen;
    dnnl_primitive_t to_chosen, to_plain;  // reorders, created only when the layouts differ
    dnnl_memory_t user, mem;               // user: plain view of the caller's buffer; mem: what the primitive reads
    size_t bytes;
    int same;
    int skip_finish;
} wk_arg;

/// 8 or 16 when `md` is the nChw8c / nChw16c layout of its dimensions, 0 when plain NCHW, -1 otherwise.
static int block_of(const dnnl_memory_desc_t *md) {
    if (md->ndims != 4) return -1;
    dnnl_memory_desc_t probe;
    dnnl_format_tag_t tags[3] = {dnnl_nchw, dnnl_nChw8c, dnnl_nChw16c};
    int blocks[3] = {0, 8, 16};
    for (int i = 0; i < 3; i++) {
        if (dnnl_memory_desc_init_by_tag(&probe, 4, md->dims, dnnl_f32, tags[i]) == dnnl_success &&
            dnnl_memory_desc_equal(&probe, md))
            return blocks[i];
    }
    return -1;
}

static dnnl_status_t arg_init(wk_arg *a, const dnnl_memory_desc_t *plain, const dnnl_memory_desc_t *chosen, int as_input,
                              int as_output) {
    dnnl_status_t st;
    a->plain = *plain;
    a->chosen = *chosen;
    a->same = dnnl_memory_desc_equal(plain, chosen);
    a->bytes = dnnl_memory_desc_get_size(chosen);
    if ((st = dnnl_memory_create(&a->user, plain, g_engine, DNNL_MEMORY_NONE)) != dnnl_success) return st;
    if ((st = dnnl_memory_create(&a->mem, chosen, g_engine, DNNL_MEMORY_NONE)) != dnnl_success) return st;
    if (a->same) return dnnl_success;
    dnnl_primitive_desc_t rpd;
    if (as_input) {
        if ((st = dnnl_reorder_primitive_desc_create(&rpd, plain, g_engine, chosen, g_engine, NULL)) != dnnl_success) return st;
        st = dnnl_primitive_create(&a->to_chosen, rpd);
        dnnl_primitive_desc_destroy(rpd);
        if (st != dnnl_success) return st;
    }
    if (as_output) {
        if ((st = dnnl_reorder_primitive_desc_create(&rpd, chosen, g_engine, plain, g_engine, NULL)) != dnnl_success) return st;
        st = dnnl_primitive_create(&a->to_plain, rpd);
        dnnl_primitive_desc_destroy(rpd);
        if (st != dnnl_success) return st;
    }
    return dnnl_success;
}

static void arg_destroy(wk_arg *a) {
    if (a->to_chosen) dnnl_primitive_destroy(a->to_chosen);
    if (a->to_plain) dnnl_primitive_destroy(a->to_plain);
    if (a->user) dnnl_memory_destroy(a->user);
    if (a->mem) dnnl_memory_destroy(a->mem);
}

/// Points the argument at `ptr` (an input), converting into a temporary when the layouts differ — unless the
/// caller says `ptr` is already in the primitive's layout (`in_layout`).
static dnnl_status_t arg_bind_input_ex(wk_arg *a, const void *ptr, void **tmp, int in_layout) {
    dnnl_status_t st;
    if (a->same || in_layout) return dnnl_memory_set_data_handle(a->mem, (void *)ptr);
    *tmp = aligned_alloc(64, (a->bytes + 63) / 64 * 64);
    if (!*tmp) return dnnl_out_of_memory;
    if ((st = dnnl_memory_set_data_handle(a->user, (void *)ptr)) != dnnl_success) return st;
    if ((st = dnnl_memory_set_data_handle(a->mem, *tmp)) != dnnl_success) return st;
    dnnl_exec_arg_t r[2] = {{DNNL_ARG_FROM, a->user}, {DNNL_ARG_TO, a->mem}};
    return dnnl_primitive_execute(a->to_chosen, g_stream, 2, r);
}

static dnnl_status_t arg_bind_input(wk_arg *a, const void *ptr, void **tmp) { return arg_bind_input_ex(a, ptr, tmp, 0); }

/// Points the argument at `ptr` (an output); `arg_finish_output` converts back after the primitive ran. With
/// `in_layout`, the caller wants the primitive's own layout and no conversion happens.
static dnnl_status_t arg_bind_output_ex(wk_arg *a, void *ptr, void **tmp, int in_layout) {
    dnnl_status_t st;
    if (a->same || in_layout) {
        a->skip_finish = 1;
        return dnnl_memory_set_data_handle(a->mem, ptr);
    }
    a->skip_finish = 0;
    *tmp = aligned_alloc(64, (a->bytes + 63) / 64 * 64);
    if (!*tmp) return dnnl_out_of_memory;
    if ((st = dnnl_memory_set_data_handle(a->user, ptr)) != dnnl_success) return st;
    return dnnl_memory_set_data_handle(a->mem, *tmp);
}

static dnnl_status_t arg_bind_output(wk_arg *a, void *ptr, void **tmp) { return arg_bind_output_ex(a, ptr, tmp, 0); }

static dnnl_status_t arg_finish_output(wk_arg *a) {
    if (a->same || a->skip_finish) return dnnl_success;
    dnnl_exec_arg_t r[2] = {{DNNL_ARG_FROM, a->mem}, {DNNL_ARG_TO, a->user}};
    return dnnl_primitive_execute(a->to_plain, g_stream, 2, r);
}

struct wk_conv_train {
    dnnl_primitive_t fwd, bwd_data, bwd_weights;
    int has_bias;
    // forward: src, weights, bias, dst
    wk_arg f_src, f_w, f_b, f_dst;
    // backward data: diff_dst, weights → diff_src
    wk_arg d_ddst, d_w, d_dsrc;
    // backward weights: src, diff_dst → diff_weights, diff_bias
    wk_arg w_src, w_ddst, w_dw, w_db;
};

void wk_conv_train_destroy(wk_conv_train *p) {
    if (!p) return;
    if (p->fwd) dnnl_primitive_destroy(p->fwd);
    if (p->bwd_data) dnnl_primitive_destroy(p->bwd_data);
    if (p->bwd_weights) dnnl_primitive_destroy(p->bwd_weights);
    wk_arg *args[] = {&p->f_src, &p->f_w, &p->f_b, &p->f_dst, &p->d_ddst, &p->d_w, &p->d_dsrc,
                      &p->w_src, &p->w_ddst, &p->w_dw, &p->w_db};
    for (size_t i = 0; i < sizeof args / sizeof *args; i++) arg_destroy(args[i]);
    free(p);
}

wk_conv_train *wk_conv_train_create(int64_t n, int64_t c, int64_t h, int64_t w, int64_t oc, int64_t oh, int64_t ow,
                                    int64_t kh, int64_t kw, int64_t groups, int64_t stride_h, int64_t stride_w,
                                    int64_t dil_h, int64_t dil_w, int64_t pad_t, int64_t pad_l, int64_t pad_b,
                                    int64_t pad_r, int has_bias, char *err, size_t errlen) {
    if (!engine_ready(err, errlen)) return NULL;
    wk_conv_train *p = calloc(1, sizeof *p);
    dnnl_primitive_desc_t fpd = NULL, dpd = NULL, wpd = NULL;
    if (!p) return NULL;
    p->has_bias = has_bias;
    conv_mds m;
    CHECK(conv_mds_init(&m, n, c, h, w, oc, oh, ow, kh, kw, groups));
    dnnl_memory_desc_t src_md = m.src, dst_md = m.dst, src_any = m.src_any, dst_any = m.dst_any, w_plain = m.w_plain,
                       w_any = m.w_any, b_md = m.bias;
    dnnl_dims_t strides = {stride_h, stride_w}, dil = {dil_h - 1, dil_w - 1};
    dnnl_dims_t pl = {pad_t, pad_l}, pr = {pad_b, pad_r};
    dnnl_convolution_desc_t fdesc, ddesc, wdesc;
    CHECK(dnnl_dilated_convolution_forward_desc_init(&fdesc, dnnl_forward_training, dnnl_convolution_direct, &src_any,
                                                      &w_any, has_bias ? &b_md : NULL, &dst_any, strides, dil, pl, pr));
    CHECK(dnnl_primitive_desc_create(&fpd, &fdesc, NULL, g_engine, NULL));
    CHECK(dnnl_dilated_convolution_backward_data_desc_init(&ddesc, dnnl_convolution_direct, &src_any, &w_any, &dst_any,
                                                            strides, dil, pl, pr));
    CHECK(dnnl_primitive_desc_create(&dpd, &ddesc, NULL, g_engine, fpd));
    CHECK(dnnl_dilated_convolution_backward_weights_desc_init(&wdesc, dnnl_convolution_direct, &src_any, &w_any,
                                                               has_bias ? &b_md : NULL, &dst_any, strides, dil, pl, pr));
    CHECK(dnnl_primitive_desc_create(&wpd, &wdesc, NULL, g_engine, fpd));
    CHECK(dnnl_primitive_create(&p->fwd, fpd));
    CHECK(dnnl_primitive_create(&p->bwd_data, dpd));
    CHECK(dnnl_primitive_create(&p->bwd_weights, wpd));
    CHECK(arg_init(&p->f_src, &src_md, dnnl_primitive_desc_query_md(fpd, dnnl_query_src_md, 0), 1, 0));
    CHECK(arg_init(&p->f_w, &w_plain, dnnl_primitive_desc_query_md(fpd, dnnl_query_weights_md, 0), 1, 0));
    CHECK(arg_init(&p->f_b, &b_md, &b_md, 1, 0));
    CHECK(arg_init(&p->f_dst, &dst_md, dnnl_primitive_desc_query_md(fpd, dnnl_query_dst_md, 0), 0, 1));
    CHECK(arg_init(&p->d_ddst, &dst_md, dnnl_primitive_desc_query_md(dpd, dnnl_query_diff_dst_md, 0), 1, 0));
    CHECK(arg_init(&p->d_w, &w_plain, dnnl_primitive_desc_query_md(dpd, dnnl_query_weights_md, 0), 1, 0));
    CHECK(arg_init(&p->d_dsrc, &src_md, dnnl_primitive_desc_query_md(dpd, dnnl_query_diff_src_md, 0), 0, 1));
    CHECK(arg_init(&p->w_src, &src_md, dnnl_primitive_desc_query_md(wpd, dnnl_query_src_md, 0), 1, 0));
    CHECK(arg_init(&p->w_ddst, &dst_md, dnnl_primitive_desc_query_md(wpd, dnnl_query_diff_dst_md, 0), 1, 0));
    CHECK(arg_init(&p->w_dw, &w_plain, dnnl_primitive_desc_query_md(wpd, dnnl_query_diff_weights_md, 0), 0, 1));
    CHECK(arg_init(&p->w_db, &b_md, &b_md, 0, 1));
    dnnl_primitive_desc_destroy(fpd);
    dnnl_primitive_desc_destroy(dpd);
    dnnl_primitive_desc_destroy(wpd);
    return p;
fail:
    if (fpd) dnnl_primitive_desc_destroy(fpd);
    if (dpd) dnnl_primitive_desc_destroy(dpd);
    if (wpd) dnnl_primitive_desc_destroy(wpd);
    wk_conv_train_destroy(p);
    return NULL;
}

int wk_conv_train_block(const wk_conv_train *p, int which) {
    const wk_arg *args[6] = {&p->f_src, &p->f_dst, &p->d_ddst, &p->d_dsrc, &p->w_src, &p->w_ddst};
    if (which < 0 || which > 5) return -1;
    return block_of(&args[which]->chosen);
}

int wk_conv_train_forward(wk_conv_train *p, const float *src, const float *weights, const float *bias, float *dst,
                          char *err, size_t errlen) {
    return wk_conv_train_forward_layout(p, src, weights, bias, dst, 0, 0, err, errlen);
}

int wk_conv_train_forward_layout(wk_conv_train *p, const float *src, const float *weights, const float *bias,
                                 float *dst, int src_blocked, int dst_blocked, char *err, size_t errlen) {
    void *t[3] = {NULL, NULL, NULL};
    int rc = 1;
    CHECK(arg_bind_input_ex(&p->f_src, src, &t[0], src_blocked));
    CHECK(arg_bind_input(&p->f_w, weights, &t[1]));
    CHECK(arg_bind_output_ex(&p->f_dst, dst, &t[2], dst_blocked));
    int nargs = 3;
    dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, p->f_src.mem}, {DNNL_ARG_WEIGHTS, p->f_w.mem}, {DNNL_ARG_DST, p->f_dst.mem}};
    if (p->has_bias) {
        CHECK(dnnl_memory_set_data_handle(p->f_b.mem, (void *)bias));
        args[nargs++] = (dnnl_exec_arg_t){DNNL_ARG_BIAS, p->f_b.mem};
    }
    CHECK(dnnl_primitive_execute(p->fwd, g_stream, nargs, args));
    CHECK(arg_finish_output(&p->f_dst));
    CHECK(dnnl_stream_wait(g_stream));
    rc = 0;
fail:
    for (int i = 0; i < 3; i++) free(t[i]);
    return rc;
}

int wk_conv_train_backward(wk_conv_train *p, const float *src, const float *weights, const float *diff_dst,
                           float *diff_src, float *diff_weights, float *diff_bias, char *err, size_t errlen) {
    return wk_conv_train_backward_layout(p, src, weights, diff_dst, diff_src, diff_weights, diff_bias, 0, 0, 0, err,
                                         errlen);
}

int wk_conv_train_backward_layout(wk_conv_train *p, const float *src, const float *weights, const float *diff_dst,
                                  float *diff_src, float *diff_weights, float *diff_bias, int src_blocked,
                                  int diff_dst_blocked, int diff_src_blocked, char *err, size_t errlen) {
    void *t[7] = {NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    int rc = 1;
    if (diff_src) {
        CHECK(arg_bind_input_ex(&p->d_ddst, diff_dst, &t[0], diff_dst_blocked));
        CHECK(arg_bind_input(&p->d_w, weights, &t[1]));
        CHECK(arg_bind_output_ex(&p->d_dsrc, diff_src, &t[2], diff_src_blocked));
        dnnl_exec_arg_t args[3] = {{DNNL_ARG_DIFF_DST, p->d_ddst.mem}, {DNNL_ARG_WEIGHTS, p->d_w.mem},
                                   {DNNL_ARG_DIFF_SRC, p->d_dsrc.mem}};
        CHECK(dnnl_primitive_execute(p->bwd_data, g_stream, 3, args));
        CHECK(arg_finish_output(&p->d_dsrc));
    }
    if (diff_weights || diff_bias) {
        float *bias_scratch = NULL;
        CHECK(arg_bind_input_ex(&p->w_src, src, &t[3], src_blocked));
        CHECK(arg_bind_input_ex(&p->w_ddst, diff_dst, &t[4], diff_dst_blocked));
        void *dw = diff_weights;
        if (!dw) { t[6] = aligned_alloc(64, (p->w_dw.bytes + 63) / 64 * 64); dw = t[6]; if (!dw) goto fail; }
        CHECK(arg_bind_output(&p->w_dw, dw, &t[5]));
        int nargs = 3;
        dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, p->w_src.mem}, {DNNL_ARG_DIFF_DST, p->w_ddst.mem},
                                   {DNNL_ARG_DIFF_WEIGHTS, p->w_dw.mem}};
        if (p->has_bias) {
            if (!diff_bias) {
                bias_scratch = malloc(p->w_db.bytes);
                if (!bias_scratch) goto fail;
            }
            dnnl_status_t st = dnnl_memory_set_data_handle(p->w_db.mem, diff_bias ? diff_bias : bias_scratch);
            if (st != dnnl_success) { free(bias_scratch); goto fail; }
            args[nargs++] = (dnnl_exec_arg_t){DNNL_ARG_DIFF_BIAS, p->w_db.mem};
        }
        dnnl_status_t st = dnnl_primitive_execute(p->bwd_weights, g_stream, nargs, args);
        if (st == dnnl_success && diff_weights) st = arg_finish_output(&p->w_dw);
        if (st == dnnl_success) st = dnnl_stream_wait(g_stream);
        free(bias_scratch);
        CHECK(st);
    }
    CHECK(dnnl_stream_wait(g_stream));
    rc = 0;
fail:
    for (int i = 0; i < 7; i++) free(t[i]);
    return rc;
}

// MARK: Batch normalization for training

struct wk_bnorm_train {
    dnnl_primitive_t fwd, bwd;
    dnnl_memory_t src, dst, scale, shift, mean, var, diff_dst, diff_src, diff_scale, diff_shift, workspace;
};

void wk_bnorm_train_destroy(wk_bnorm_train *p) {
    if (!p) return;
    if (p->fwd) dnnl_primitive_destroy(p->fwd);
    if (p->bwd) dnnl_primitive_destroy(p->bwd);
    dnnl_memory_t mems[] = {p->src, p->dst, p->scale, p->shift, p->mean, p->var, p->diff_dst, p->diff_src,
                            p->diff_scale, p->diff_shift, p->workspace};
    for (size_t i = 0; i < sizeof mems / sizeof *mems; i++) if (mems[i]) dnnl_memory_destroy(mems[i]);
    free(p);
}

wk_bnorm_train *wk_bnorm_train_create(int64_t n, int64_t c, int64_t spatial, float epsilon, int block, char *err,
                                      size_t errlen) {
    if (!engine_ready(err, errlen)) return NULL;
    wk_bnorm_train *p = calloc(1, sizeof *p);
    dnnl_primitive_desc_t fpd = NULL, bpd = NULL;
    if (!p) return NULL;
    dnnl_memory_desc_t data_md, c_md;
    // 4-D NCHW (spatial, 1): oneDNN's optimized batch-norm kernels cover 4-D layouts, 3-D only has the reference.
    dnnl_dims_t dims = {n, c, spatial, 1}, cdims = {c};
    dnnl_format_tag_t tag = block == 16 ? dnnl_nChw16c : block == 8 ? dnnl_nChw8c : dnnl_nchw;
    CHECK(dnnl_memory_desc_init_by_tag(&data_md, 4, dims, dnnl_f32, tag));
    CHECK(dnnl_memory_desc_init_by_tag(&c_md, 1, cdims, dnnl_f32, dnnl_x));
    unsigned flags = dnnl_use_scale | dnnl_use_shift;
    dnnl_batch_normalization_desc_t fdesc, bdesc;
    CHECK(dnnl_batch_normalization_forward_desc_init(&fdesc, dnnl_forward_training, &data_md, epsilon, flags));
    CHECK(dnnl_primitive_desc_create(&fpd, &fdesc, NULL, g_engine, NULL));
    CHECK(dnnl_batch_normalization_backward_desc_init(&bdesc, dnnl_backward, &data_md, &data_md, epsilon, flags));
    CHECK(dnnl_primitive_desc_create(&bpd, &bdesc, NULL, g_engine, fpd));
    CHECK(dnnl_primitive_create(&p->fwd, fpd));
    CHECK(dnnl_primitive_create(&p->bwd, bpd));
    dnnl_memory_t *data[] = {&p->src, &p->dst, &p->diff_dst, &p->diff_src};
    for (int i = 0; i < 4; i++) CHECK(dnnl_memory_create(data[i], &data_md, g_engine, DNNL_MEMORY_NONE));
    dnnl_memory_t *chan[] = {&p->scale, &p->shift, &p->mean, &p->var, &p->diff_scale, &p->diff_shift};
    for (int i = 0; i < 6; i++) CHECK(dnnl_memory_create(chan[i], &c_md, g_engine, DNNL_MEMORY_NONE));
    const dnnl_memory_desc_t *ws = dnnl_primitive_desc_query_md(fpd, dnnl_query_workspace_md, 0);
    if (ws && dnnl_memory_desc_get_size(ws) > 0) CHECK(dnnl_memory_create(&p->workspace, ws, g_engine, DNNL_MEMORY_ALLOCATE));
    dnnl_primitive_desc_destroy(fpd);
    dnnl_primitive_desc_destroy(bpd);
    return p;
fail:
    if (fpd) dnnl_primitive_desc_destroy(fpd);
    if (bpd) dnnl_primitive_desc_destroy(bpd);
    wk_bnorm_train_destroy(p);
    return NULL;
}

int wk_bnorm_train_forward(wk_bnorm_train *p, const float *src, const float *scale, const float *shift, float *dst,
                           float *mean, float *variance, char *err, size_t errlen) {
    CHECK(dnnl_memory_set_data_handle(p->src, (void *)src));
    CHECK(dnnl_memory_set_data_handle(p->dst, dst));
    CHECK(dnnl_memory_set_data_handle(p->scale, (void *)scale));
    CHECK(dnnl_memory_set_data_handle(p->shift, (void *)shift));
    CHECK(dnnl_memory_set_data_handle(p->mean, mean));
    CHECK(dnnl_memory_set_data_handle(p->var, variance));
    dnnl_exec_arg_t args[7] = {{DNNL_ARG_SRC, p->src},   {DNNL_ARG_DST, p->dst},       {DNNL_ARG_SCALE, p->scale},
                               {DNNL_ARG_SHIFT, p->shift}, {DNNL_ARG_MEAN, p->mean},   {DNNL_ARG_VARIANCE, p->var},
                               {DNNL_ARG_WORKSPACE, p->workspace}};
    CHECK(dnnl_primitive_execute(p->fwd, g_stream, p->workspace ? 7 : 6, args));
    CHECK(dnnl_stream_wait(g_stream));
    return 0;
fail:
    return 1;
}

int wk_bnorm_train_backward(wk_bnorm_train *p, const float *src, const float *diff_dst, const float *scale,
                            const float *shift, const float *mean, const float *variance, float *diff_src,
                            float *diff_scale, float *diff_shift, char *err, size_t errlen) {
    CHECK(dnnl_memory_set_data_handle(p->shift, (void *)shift));
    CHECK(dnnl_memory_set_data_handle(p->src, (void *)src));
    CHECK(dnnl_memory_set_data_handle(p->diff_dst, (void *)diff_dst));
    CHECK(dnnl_memory_set_data_handle(p->scale, (void *)scale));
    CHECK(dnnl_memory_set_data_handle(p->mean, (void *)mean));
    CHECK(dnnl_memory_set_data_handle(p->var, (void *)variance));
    CHECK(dnnl_memory_set_data_handle(p->diff_src, diff_src));
    CHECK(dnnl_memory_set_data_handle(p->diff_scale, diff_scale));
    CHECK(dnnl_memory_set_data_handle(p->diff_shift, diff_shift));
    dnnl_exec_arg_t args[10] = {{DNNL_ARG_SRC, p->src},           {DNNL_ARG_DIFF_DST, p->diff_dst},
                                {DNNL_ARG_SCALE, p->scale},       {DNNL_ARG_SHIFT, p->shift},
                                {DNNL_ARG_MEAN, p->mean},         {DNNL_ARG_VARIANCE, p->var},
                                {DNNL_ARG_DIFF_SRC, p->diff_src}, {DNNL_ARG_DIFF_SCALE, p->diff_scale},
                                {DNNL_ARG_DIFF_SHIFT, p->diff_shift}, {DNNL_ARG_WORKSPACE, p->workspace}};
    CHECK(dnnl_primitive_execute(p->bwd, g_stream, p->workspace ? 10 : 9, args));
    CHECK(dnnl_stream_wait(g_stream));
    return 0;
fail:
    return 1;
}

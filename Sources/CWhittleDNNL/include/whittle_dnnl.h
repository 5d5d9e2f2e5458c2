// Thin C layer over oneDNN's C API (Debian libdnnl-dev, oneDNN 2.6).
//
// Swift cannot use oneDNN's descriptor structs and variadic-free but deeply nested init calls comfortably, so each
// primitive Whittle uses gets a "plan": created once for fixed shapes (weights are reordered into the layout oneDNN
// prefers at creation), then executed many times on caller-owned buffers in plain NCHW / row-major layout.
// Every function reports failure by returning NULL or a non-zero status and writing a message into `err`.
#ifndef WHITTLE_DNNL_H
#define WHITTLE_DNNL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// Element-wise post-operation fused after a primitive (and the algorithms of the standalone eltwise plan).
typedef enum {
    WK_ELTWISE_NONE = 0,
    WK_ELTWISE_RELU = 1,      ///< max(x, 0) · 1, or leaky with alpha: x < 0 ? alpha·x : x
    WK_ELTWISE_CLIP = 2,      ///< min(max(x, alpha), beta)
    WK_ELTWISE_LOGISTIC = 3,  ///< 1 / (1 + e^-x)
    WK_ELTWISE_TANH = 4,
    WK_ELTWISE_HARDSWISH = 5, ///< x · min(max(x + 3, 0), 6) / 6
    WK_ELTWISE_LINEAR = 6,    ///< alpha · x + beta
    WK_ELTWISE_GELU_ERF = 7,  ///< x · (1 + erf(x / √2)) / 2
    WK_ELTWISE_GELU_TANH = 8, ///< x · (1 + tanh(√(2/π) · (x + 0.044715 x³))) / 2
    WK_ELTWISE_EXP = 9,
    WK_ELTWISE_LOG = 10,      ///< natural logarithm
    WK_ELTWISE_SQRT = 11,
    WK_ELTWISE_ABS = 12,
    WK_ELTWISE_SQUARE = 13,
    WK_ELTWISE_SWISH = 14,    ///< x · sigmoid(alpha · x) (SiLU with alpha 1)
} wk_eltwise_t;

typedef struct {
    wk_eltwise_t kind;
    float alpha;
    float beta;
} wk_postop_t;

/// Keeps large freed buffers in the C heap (glibc mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD at 1 GiB), so the
/// activation-sized arrays each training step allocates are reused instead of mapped, faulted and zeroed again.
void wk_tune_allocator(void);

/// Returns the heap's free memory to the system (glibc malloc_trim), for after a one-off peak such as compiling a model.
void wk_release_free_memory(void);

/// Sets the OpenMP thread count used by oneDNN (and, through the same runtime, by later calls).
void wk_set_num_threads(int n);
int wk_get_max_threads(void);

// MARK: Convolution (2-D)

/// src [N, C, H, W], weights [OC, C/groups, KH, KW], bias [OC] or NULL, dst [N, OC, OH, OW].
/// Dilations are ONNX-style (1 = dense). Pads: top, left, bottom, right.
typedef struct wk_conv wk_conv;
wk_conv *wk_conv_create(int64_t n, int64_t c, int64_t h, int64_t w, int64_t oc, int64_t oh, int64_t ow,
                        int64_t kh, int64_t kw, int64_t groups, int64_t stride_h, int64_t stride_w,
                        int64_t dil_h, int64_t dil_w, int64_t pad_t, int64_t pad_l, int64_t pad_b, int64_t pad_r,
                        const float *weights, const float *bias, wk_postop_t post, int sum_input,
                        char *err, size_t errlen);
/// When the plan was created with sum_input, `dst` must hold the tensor to add (dst = conv(src) + dst) before the call.
int wk_conv_run(wk_conv *plan, const float *src, float *dst, char *err, size_t errlen);
const char *wk_conv_impl(wk_conv *plan);
/// Like wk_conv_run, but `src` (when src_blocked) and `dst` (when dst_blocked, for input summand and output) are in
/// the plan's own blocked layouts, so no reorder is done on that side.
int wk_conv_run_layout(wk_conv *plan, const float *src, float *dst, int src_blocked, int dst_blocked,
                       char *err, size_t errlen);
/// Bytes of the plan's blocked source / destination layout, or 0 when it computes on plain NCHW.
size_t wk_conv_blocked_src_bytes(const wk_conv *plan);
size_t wk_conv_blocked_dst_bytes(const wk_conv *plan);
/// 1 when the producer's destination layout equals the consumer's source layout (or, with as_summand, the
/// consumer's destination layout), so a blocked tensor can pass between them unconverted.
int wk_conv_layouts_match(const wk_conv *producer, const wk_conv *consumer, int as_summand);
void wk_conv_destroy(wk_conv *plan);

// MARK: Convolution for training (weights change every step)

/// Forward (training), backward-data and backward-weights primitives for one geometry. All buffers are plain
/// (src/diff_src NCHW, weights/diff_weights OIHW, dst/diff_dst NCHW); the plan converts to and from the layouts
/// oneDNN picks on each call. Weights are passed per call.
typedef struct wk_conv_train wk_conv_train;
wk_conv_train *wk_conv_train_create(int64_t n, int64_t c, int64_t h, int64_t w, int64_t oc, int64_t oh, int64_t ow,
                                    int64_t kh, int64_t kw, int64_t groups, int64_t stride_h, int64_t stride_w,
                                    int64_t dil_h, int64_t dil_w, int64_t pad_t, int64_t pad_l, int64_t pad_b,
                                    int64_t pad_r, int has_bias, char *err, size_t errlen);
/// dst = conv(src, weights) + bias (bias may be NULL when the plan has none).
int wk_conv_train_forward(wk_conv_train *plan, const float *src, const float *weights, const float *bias, float *dst,
                          char *err, size_t errlen);
/// Gradients for the given diff_dst: any of diff_src, diff_weights, diff_bias may be NULL to skip it. Results
/// overwrite the buffers.
int wk_conv_train_backward(wk_conv_train *plan, const float *src, const float *weights, const float *diff_dst,
                           float *diff_src, float *diff_weights, float *diff_bias, char *err, size_t errlen);
void wk_conv_train_destroy(wk_conv_train *plan);
/// The layout oneDNN picked for an argument: 8 or 16 for nChw8c / nChw16c, 0 for plain NCHW, -1 for anything else.
/// which: 0 forward src, 1 forward dst, 2 backward-data diff_dst, 3 backward-data diff_src, 4 backward-weights src,
/// 5 backward-weights diff_dst.
int wk_conv_train_block(const wk_conv_train *plan, int which);
/// As forward/backward, with flags saying which activation buffers are already in the plan's own layouts.
int wk_conv_train_forward_layout(wk_conv_train *plan, const float *src, const float *weights, const float *bias,
                                 float *dst, int src_blocked, int dst_blocked, char *err, size_t errlen);
int wk_conv_train_backward_layout(wk_conv_train *plan, const float *src, const float *weights, const float *diff_dst,
                                  float *diff_src, float *diff_weights, float *diff_bias, int src_blocked,
                                  int diff_dst_blocked, int diff_src_blocked, char *err, size_t errlen);

// MARK: Batch normalization for training

/// Batch statistics forward and backward over data [N, C, S] (plain). Forward writes y, the batch mean and the
/// (biased) batch variance; backward gives diff_src, diff_scale and diff_shift from the saved mean and variance.
typedef struct wk_bnorm_train wk_bnorm_train;
/// block: 0 for plain NCHW data, 8 or 16 for nChw8c / nChw16c.
wk_bnorm_train *wk_bnorm_train_create(int64_t n, int64_t c, int64_t spatial, float epsilon, int block, char *err,
                                      size_t errlen);
int wk_bnorm_train_forward(wk_bnorm_train *plan, const float *src, const float *scale, const float *shift, float *dst,
                           float *mean, float *variance, char *err, size_t errlen);
int wk_bnorm_train_backward(wk_bnorm_train *plan, const float *src, const float *diff_dst, const float *scale,
                            const float *shift, const float *mean, const float *variance, float *diff_src,
                            float *diff_scale, float *diff_shift, char *err, size_t errlen);
void wk_bnorm_train_destroy(wk_bnorm_train *plan);

// MARK: Pooling (2-D)

typedef enum { WK_POOL_MAX = 0, WK_POOL_AVG_INCLUDE_PAD = 1, WK_POOL_AVG_EXCLUDE_PAD = 2 } wk_pool_t;
typedef struct wk_pool wk_pool;
/// src [N, C, H, W] → dst [N, C, OH, OW]; dilations ONNX-style (1 = dense).
wk_pool *wk_pool_create(wk_pool_t kind, int64_t n, int64_t c, int64_t h, int64_t w, int64_t oh, int64_t ow,
                        int64_t kh, int64_t kw, int64_t stride_h, int64_t stride_w, int64_t dil_h, int64_t dil_w,
                        int64_t pad_t, int64_t pad_l, int64_t pad_b, int64_t pad_r, char *err, size_t errlen);
int wk_pool_run(wk_pool *plan, const float *src, float *dst, char *err, size_t errlen);
void wk_pool_destroy(wk_pool *plan);

// MARK: Batch normalization (inference, global statistics)

/// Layer normalization over the last axis of data [OUTER, INNER] (inference): y = γ·(x − μ)/√(σ² + ε) + β with
/// the mean and biased variance of each row; scale and shift [INNER], each optional (NULL).
typedef struct wk_lnorm wk_lnorm;
wk_lnorm *wk_lnorm_create(int64_t outer, int64_t inner, float epsilon, const float *scale, const float *shift,
                          char *err, size_t errlen);
int wk_lnorm_run(wk_lnorm *plan, const float *src, float *dst, char *err, size_t errlen);
void wk_lnorm_destroy(wk_lnorm *plan);

typedef struct wk_bnorm wk_bnorm;
/// data [N, C, spatial...] flattened to [N, C, S]; y = scale · (x − mean) / sqrt(var + eps) + shift.
wk_bnorm *wk_bnorm_create(int64_t n, int64_t c, int64_t spatial, float epsilon, const float *scale,
                          const float *shift, const float *mean, const float *var, wk_postop_t post,
                          char *err, size_t errlen);
int wk_bnorm_run(wk_bnorm *plan, const float *src, float *dst, char *err, size_t errlen);
void wk_bnorm_destroy(wk_bnorm *plan);

// MARK: Inner product (Gemm with B transposed: y = x · Wᵀ + b)

typedef struct wk_inner wk_inner;
/// src [M, K], weights [N, K], bias [N] or NULL, dst [M, N].
wk_inner *wk_inner_create(int64_t m, int64_t k, int64_t n, const float *weights, const float *bias,
                          wk_postop_t post, char *err, size_t errlen);
int wk_inner_run(wk_inner *plan, const float *src, float *dst, char *err, size_t errlen);
void wk_inner_destroy(wk_inner *plan);

// MARK: Element-wise

/// Element-wise binary operation with NumPy broadcasting: dst[dims] = src0[dims] op src1[dims1], where dims1 has
/// the rank of dims and each of its sizes equals dims' or is 1. kind: 0 add, 1 sub, 2 mul, 3 div.
typedef struct wk_binary wk_binary;
wk_binary *wk_binary_create(int kind, int ndims, const int64_t *dims, const int64_t *dims1, char *err, size_t errlen);
int wk_binary_run(wk_binary *plan, const float *src0, const float *src1, float *dst, char *err, size_t errlen);
void wk_binary_destroy(wk_binary *plan);

typedef struct wk_eltwise wk_eltwise;
/// y = f(x) over `count` contiguous floats; in-place allowed.
wk_eltwise *wk_eltwise_create(wk_postop_t op, int64_t count, char *err, size_t errlen);
int wk_eltwise_run(wk_eltwise *plan, const float *src, float *dst, char *err, size_t errlen);
void wk_eltwise_destroy(wk_eltwise *plan);

// MARK: Softmax

typedef struct wk_softmax wk_softmax;
/// data viewed as [outer, axis, inner]; softmax along the middle dimension.
wk_softmax *wk_softmax_create(int64_t outer, int64_t axis, int64_t inner, char *err, size_t errlen);
int wk_softmax_run(wk_softmax *plan, const float *src, float *dst, char *err, size_t errlen);
void wk_softmax_destroy(wk_softmax *plan);

// MARK: Integer convolution (QDQ groups, as onnxruntime's QLinearConv)

/// Element types of integer plans' activations.
typedef enum { WK_U8 = 0, WK_S8 = 1, WK_F32 = 2 } wk_qtype_t;

/// src [N, C, H, W] u8 or s8 (plain NCHW), weights [OC, C/groups, KH, KW] s8, bias [OC] s32 or NULL, dst
/// [N, OC, OH, OW] u8, s8 or f32 (plain NCHW). With a = bias[oc] + Σ (src − src_zero) · w (int32, padding
/// contributes nothing), dst = saturate(round_half_even(post(scales[oc] · a)) + dst_zero); scale_count is 1 or OC.
/// For a QDQ group: scales[oc] = s_x · s_w[oc] / s_y and the bias is the int32 bias of scale s_x · s_w[oc].
/// Weights are reordered once, at creation; activations are converted to and from oneDNN's layouts per call.
typedef struct wk_qconv wk_qconv;
wk_qconv *wk_qconv_create(int64_t n, int64_t c, int64_t h, int64_t w, int64_t oc, int64_t oh, int64_t ow,
                          int64_t kh, int64_t kw, int64_t groups, int64_t stride_h, int64_t stride_w,
                          int64_t dil_h, int64_t dil_w, int64_t pad_t, int64_t pad_l, int64_t pad_b, int64_t pad_r,
                          wk_qtype_t src_type, wk_qtype_t dst_type, const int8_t *weights, const int32_t *bias,
                          const float *scales, int64_t scale_count, int32_t src_zero, int32_t dst_zero,
                          wk_postop_t post, char *err, size_t errlen);
int wk_qconv_run(wk_qconv *plan, const void *src, void *dst, char *err, size_t errlen);
/// Like wk_qconv_run, with `src` (when src_nhwc) and/or `dst` (when dst_nhwc) in channels-last order (NHWC), the
/// layout the plan computes in when wk_qconv_nhwc says so: no conversion on that side.
int wk_qconv_run_layout(wk_qconv *plan, const void *src, void *dst, int src_nhwc, int dst_nhwc, char *err, size_t errlen);
/// Bit 0: the plan computes its source in NHWC; bit 1: its destination.
int wk_qconv_nhwc(const wk_qconv *plan);
const char *wk_qconv_impl(wk_qconv *plan);
void wk_qconv_destroy(wk_qconv *plan);

/// 1 when the CPU (as oneDNN sees it, honouring DNNL_MAX_CPU_ISA) multiplies u8 × s8 with VNNI (AVX-512 VNNI,
/// AVX-VNNI or AMX), whose dot products accumulate in int32; without it, pairs of u8 · s8 products are summed in
/// saturating int16 first, which is exact only for weights within ±63 (7 bits, what --reduce-range writes).
int wk_cpu_has_vnni(void);
/// oneDNN's name of the instruction set it dispatches to.
const char *wk_cpu_isa_name(void);

/// pin 1: pins OpenMP's compute threads (the caller is thread 0) one to each CPU the caller may run on, in order,
/// and returns how many threads were pinned; pin 0: lets every one of them run on those CPUs again and returns 0.
/// -1 when an affinity could not be set.
int wk_pin_threads(int pin);

// MARK: GEMM

/// Row-major C[M, N] = alpha · op(A) · op(B) + beta · C, op = transpose when trans is 'T' ('N' otherwise).
int wk_sgemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
             const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

#ifdef __cplusplus
}
#endif
#endif

"""Training speed levers for the trainers: the same math, done in less time.

Every function here computes what the plain path computes (same loss formula, same
update rule): only float rounding differs, and ``ema_update_`` is bit-exact. What each
lever gave on the 2-core CPU is measured by ``benchmarks/train_ddpm.py`` and written up
in ``benchmarks/README.md``. The API the trainers call:

    prepare_unet_for_training(unet, device_or_cfg, *, compile=None, shards=None) -> nn.Module
    make_optimizer(params, *, lr, betas, weight_decay, eps, device) -> torch.optim.AdamW
    ema_update_(ema_params, params, decay) -> None
    cpu_shards(device, batch_size) -> int

``prepare_unet_for_training`` applies, on CPU, the two levers that move the needle:

* **A head_dim-8 attention kernel** (``HeadDim8AttnProcessor``): UNet2DModel's attention
  blocks use 8-wide heads, where torch's CPU flash-attention kernel spends its time in
  tiny K=8 matmul calls. A small C kernel (compiled on first use with the system C
  compiler, cached under ``~/.cache/diffusion-studio/kernels``; torch's SDPA where that
  is impossible) does the same softmax(q k^T / sqrt(8)) v and its backward about 3x
  faster. It runs wherever the calling thread has one torch thread.
* **Batch sharding over threads** (``shard_batches``): with two torch threads, intra-op
  parallelism on these small convolutions keeps the second core half idle, so the
  forward and backward of the batch are instead cut in slices that run at the same time,
  one per thread with one intra-op thread each (and the attention kernel). Every sample
  sees exactly the same computation (a ``UNet2DModel`` has no batch statistics), the
  output is the concatenation, and the parameter gradients are the slices' gradients
  added in a fixed order, so runs stay deterministic (bit-exact resume holds for a fixed
  thread count). With one torch thread it is a no-op.

Both act on the UNet instance itself: its parameters, ``state_dict``, config and
``save_pretrained`` output are unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

__all__ = ["prepare_unet_for_training", "make_optimizer", "ema_update_", "cpu_shards", "shard_batches",
           "unshard_unet", "use_fast_attention", "attention_head_dim8", "attention_kernel", "HeadDim8AttnProcessor"]


# ----------------------------------------------------------------------------- device
def _device_type(device_or_cfg: Any) -> str:
    """'cpu', 'cuda', 'mps' from a device string, a torch.device or a config with ``.device``."""
    if isinstance(device_or_cfg, torch.device):
        return device_or_cfg.type
    if isinstance(device_or_cfg, str):
        text = device_or_cfg
    else:
        text = str(getattr(device_or_cfg, "device", "cpu") or "cpu")
    if text.strip().lower() == "auto":
        from studio.devices import resolve_device

        text = resolve_device("auto")
    return torch.device(text).type


def cpu_shards(device: Any, batch_size: int) -> int:
    """How many thread shards a batch is cut into on ``device``.

    Args:
        device: A device string, ``torch.device`` or a config with a ``device`` field.
        batch_size: Images in the batch.

    Returns:
        ``torch.get_num_threads()`` of the calling thread, capped by the batch size, on
        CPU; 1 on accelerators and under autocast.
    """
    if _device_type(device) != "cpu" or torch.is_autocast_enabled("cpu"):
        return 1
    return max(1, min(torch.get_num_threads(), int(batch_size)))


# ----------------------------------------------------------------------------- thread pool
def _mkl_one_thread_here() -> None:
    """One MKL thread in the calling (worker) thread, whatever the process-wide MKL setting."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        lib.MKL_Set_Num_Threads_Local(1)  # the C entry point (lower-case names are the Fortran ones)
    except (OSError, AttributeError):  # another build of torch: MKL follows the OpenMP setting
        pass


class _ShardPool:
    """``n`` worker threads for batch slices, created once per ``n``."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.executor = ThreadPoolExecutor(n, thread_name_prefix="studio-shard", initializer=_mkl_one_thread_here)

    def map(self, fn, items: Sequence[Any]) -> list[Any]:
        futures = [self.executor.submit(fn, item) for item in items]
        return [f.result() for f in futures]


_THREADS_LOCK = threading.Lock()
_THREADS = {"depth": 0, "outer": 1}


@contextlib.contextmanager
def _one_intra_op_thread():
    """One intra-op thread for every torch op while the shards run, then the setting as it was.

    With libgomp the OpenMP thread count of threads that OpenMP did not start is one
    process-wide value, so it cannot be set per worker: it is set to 1 for the duration
    of the sharded forward (and of the sharded backward) only.
    """
    with _THREADS_LOCK:
        if _THREADS["depth"] == 0:
            _THREADS["outer"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS["depth"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS["depth"] -= 1
            if _THREADS["depth"] == 0:
                torch.set_num_threads(_THREADS["outer"])


_POOLS: dict[int, _ShardPool] = {}
_POOLS_LOCK = threading.Lock()


def _pool(n: int) -> _ShardPool:
    with _POOLS_LOCK:
        if n not in _POOLS:
            _POOLS[n] = _ShardPool(n)
        return _POOLS[n]


# ----------------------------------------------------------------------------- sharded UNet
def _split(value: Any, batch: int, n: int) -> list[Any]:
    """Cut a per-sample tensor into ``n`` slices along dim 0; anything else is shared."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return list(torch.tensor_split(value, n))
    return [value] * n


class _ShardedUNetFunction(torch.autograd.Function):
    """Forward and backward of the UNet on batch slices in worker threads.

    The parameters are inputs of this function, so their gradients reach
    ``AccumulateGrad`` (and DDP / accelerate hooks) exactly as in the plain path.
    """

    @staticmethod
    def forward(ctx, state: dict[str, Any], sample: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:  # noqa: D401
        pool, run_shard, pieces = state["pool"], state["run_shard"], state["pieces"]
        with _one_intra_op_thread():
            outs = pool.map(run_shard, pieces)
        ctx.state = state
        ctx.outs = outs
        ctx.sample_grad = sample.requires_grad
        return torch.cat([o.detach() for o in outs])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        state, outs = ctx.state, ctx.outs
        params = state["params"]
        grads_out = torch.tensor_split(grad_out, len(outs))

        def shard_backward(i: int):
            inputs = list(params) + ([state["pieces"][i][0]] if ctx.sample_grad else [])
            return torch.autograd.grad(outs[i], inputs, grads_out[i], allow_unused=True)

        with _one_intra_op_thread():
            results = state["pool"].map(shard_backward, range(len(outs)))
        ctx.outs = None
        total = list(results[0])
        for res in results[1:]:  # fixed order: deterministic sums
            both = [j for j, g in enumerate(res) if g is not None and total[j] is not None]
            if both:
                summed = torch._foreach_add([total[j] for j in both], [res[j] for j in both])
                for j, g in zip(both, summed):
                    total[j] = g
            for j, g in enumerate(res):
                if g is not None and total[j] is None:
                    total[j] = g
        n_params = len(params)
        param_grads = total[:n_params]
        sample_grad = torch.cat([res[n_params] for res in results]) if ctx.sample_grad else None
        return (None, sample_grad, *param_grads)


def _sharded_forward(self, sample: torch.Tensor, timestep: Any, class_labels: torch.Tensor | None = None,
                     return_dict: bool = True):
    """``UNet2DModel.forward`` computed on batch slices in parallel threads (see module doc)."""
    original = type(self).forward
    n = min(self._studio_shards or cpu_shards("cpu", sample.shape[0]), sample.shape[0])
    if n <= 1 or sample.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return original(self, sample, timestep, class_labels=class_labels, return_dict=return_dict)
    from diffusers.models.unets.unet_2d import UNet2DOutput

    batch = sample.shape[0]
    grad_mode = torch.is_grad_enabled()
    inference = torch.is_inference_mode_enabled()
    params = [p for p in self.parameters() if p.requires_grad] if grad_mode else []
    needs_graph = grad_mode and (bool(params) or sample.requires_grad)
    samples = _split(sample, batch, n)
    if needs_graph and sample.requires_grad:
        samples = [s.detach().requires_grad_() for s in samples]
    pieces = list(zip(samples, _split(timestep, batch, n), _split(class_labels, batch, n)))

    def run_shard(piece):
        x, t, c = piece
        with torch.inference_mode(inference), torch.set_grad_enabled(grad_mode):
            return original(self, x, t, class_labels=c, return_dict=False)[0]

    pool = _pool(n)
    if needs_graph:
        state = {"pool": pool, "run_shard": run_shard, "pieces": pieces, "params": params}
        out = _ShardedUNetFunction.apply(state, sample, *params)
    else:
        with _one_intra_op_thread():
            out = torch.cat(pool.map(run_shard, pieces))
    return UNet2DOutput(sample=out) if return_dict else (out,)


def unshard_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """Undo the batch sharding installed by ``prepare_unet_for_training`` (plain forward again)."""
    if "forward" in vars(unet) and getattr(unet, "_studio_shards", None) is not None:
        del unet.forward
        del unet._studio_shards
    return unet


def _can_shard(unet: torch.nn.Module) -> bool:
    from diffusers import UNet2DModel

    if not isinstance(unet, UNet2DModel):
        return False
    # dropout would draw from the shared CPU generator in two threads: not deterministic
    return not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in unet.modules())


# ----------------------------------------------------------------------------- attention, head_dim 8
#: The self-attention of UNet2DModel's attention blocks (head_dim 8) in C, compiled on first use.
#: Same math as ``F.scaled_dot_product_attention`` (softmax(q k^T / sqrt(8)) v, backward from the
#: saved log-sum-exp like flash attention); float sums in another order. torch's CPU flash kernel
#: spends most of its time in tiny K=8 matmul calls; these loops keep a query row (or, in the
#: backward, a block of 16 key columns) in registers instead: 3x faster on the 2-core CPU.
_ATTN8_C = r"""
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#define D 8

#ifdef __AVX512F__
/* exp on 16 floats: Cody-Waite reduction to r in [-ln2/2, ln2/2], Cephes' degree-6 polynomial
   (about 1 ulp), 2^n applied with scalef (exact, handles underflow to 0). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(88.72f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}
#endif
/* Attention softmax(q k^T * scale) v for head_dim 8. q,k,v,o: [N, L, 8] float32 contiguous; lse: [N, L]. */
static void transpose_in(const float *x, float *xT, long L) {
    for (long j = 0; j < L; j++)
        for (int d = 0; d < D; d++) xT[d * L + j] = x[j * D + d];
}
/* 1 where this build has the AVX-512 paths the speed-up was measured with. */
int attn8_vectorised(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}
void attn8_fwd(const float *q, const float *k, const float *v, float *o, float *lse, long N, long L, float scale) {
    float *kT = malloc(sizeof(float) * D * L), *vT = malloc(sizeof(float) * D * L), *s = malloc(sizeof(float) * L);
    for (long n = 0; n < N; n++) {
        const float *qn = q + n * L * D;
        float *on = o + n * L * D, *ln = lse + n * L;
        transpose_in(k + n * L * D, kT, L);
        transpose_in(v + n * L * D, vT, L);
        for (long i = 0; i < L; i++) {
            float qs[D];
            for (int d = 0; d < D; d++) qs[d] = qn[i * D + d] * scale;
            for (long j = 0; j < L; j++) {
                float acc = 0.f;
#pragma GCC unroll 8
                for (int d = 0; d < D; d++) acc += qs[d] * kT[d * L + j];
                s[j] = acc;
            }
            float m = s[0];
            for (long j = 0; j < L; j++) m = s[j] > m ? s[j] : m;
            float l = 0.f;
            long je = 0;
#ifdef __AVX512F__
            {
                const __m512 mv = _mm512_set1_ps(m);
                __m512 lv = _mm512_setzero_ps();
                for (; je + 16 <= L; je += 16) {
                    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + je), mv));
                    _mm512_storeu_ps(s + je, e);
                    lv = _mm512_add_ps(lv, e);
                }
                l = _mm512_reduce_add_ps(lv);
            }
#endif
            for (; je < L; je++) { s[je] = expf(s[je] - m); l += s[je]; }
            float acc[D] = {0};
            for (long j = 0; j < L; j++) {
#pragma GCC unroll 8
                for (int d = 0; d < D; d++) acc[d] += s[j] * vT[d * L + j];
            }
            const float inv = 1.f / l;
            for (int d = 0; d < D; d++) on[i * D + d] = acc[d] * inv;
            ln[i] = m + logf(l);
        }
    }
    free(kT); free(vT); free(s);
}
void attn8_bwd(const float *q, const float *k, const float *v, const float *o, const float *lse, const float *dout,
               float *dq, float *dk, float *dv, long N, long L, float scale) {
    float *kT = malloc(sizeof(float) * D * L), *vT = malloc(sizeof(float) * D * L);
    float *restrict P = malloc(sizeof(float) * L * L), *restrict S = malloc(sizeof(float) * L * L);
    for (long n = 0; n < N; n++) {
        const float *qn = q + n * L * D, *on = o + n * L * D, *don = dout + n * L * D, *ln = lse + n * L;
        float *dqn = dq + n * L * D, *dkn = dk + n * L * D, *dvn = dv + n * L * D;
        transpose_in(k + n * L * D, kT, L);
        transpose_in(v + n * L * D, vT, L);
        /* pass 1, by rows: P = softmax rows (from the saved log-sum-exp), dS = P * (dP - delta), dQ = dS K */
        for (long i = 0; i < L; i++) {
            float qs[D], dod[D], delta = 0.f;
            for (int d = 0; d < D; d++) { qs[d] = qn[i * D + d] * scale; dod[d] = don[i * D + d]; delta += dod[d] * on[i * D + d]; }
            const float li = ln[i];
            float *restrict p = P + i * L, *restrict ds = S + i * L;
            for (long j = 0; j < L; j++) {
                float sj = 0.f, dpj = 0.f;
#pragma GCC unroll 8
                for (int d = 0; d < D; d++) { sj += qs[d] * kT[d * L + j]; dpj += dod[d] * vT[d * L + j]; }
                p[j] = sj - li; ds[j] = dpj;
            }
            long je = 0;
#ifdef __AVX512F__
            {
                const __m512 dv = _mm512_set1_ps(delta);
                for (; je + 16 <= L; je += 16) {
                    const __m512 e = exp16(_mm512_loadu_ps(p + je));
                    _mm512_storeu_ps(p + je, e);
                    _mm512_storeu_ps(ds + je, _mm512_mul_ps(e, _mm512_sub_ps(_mm512_loadu_ps(ds + je), dv)));
                }
            }
#endif
            for (; je < L; je++) { p[je] = expf(p[je]); ds[je] = p[je] * (ds[je] - delta); }
            float acc[D] = {0};
            for (long j = 0; j < L; j++) {
#pragma GCC unroll 8
                for (int d = 0; d < D; d++) acc[d] += ds[j] * kT[d * L + j];
            }
            for (int d = 0; d < D; d++) dqn[i * D + d] = acc[d] * scale;
        }
        /* pass 2, by blocks of 16 columns held in registers: dK = dS^T Q * scale, dV = P^T dO */
        long jb = 0;
#ifdef __AVX512F__
        for (; jb + 16 <= L; jb += 16) {
            __m512 k0 = _mm512_setzero_ps(), k1 = k0, k2 = k0, k3 = k0, k4 = k0, k5 = k0, k6 = k0, k7 = k0;
            __m512 v0 = k0, v1 = k0, v2 = k0, v3 = k0, v4 = k0, v5 = k0, v6 = k0, v7 = k0;
            for (long i = 0; i < L; i++) {
                const __m512 pv = _mm512_loadu_ps(P + i * L + jb), sv = _mm512_loadu_ps(S + i * L + jb);
                const float *qi = qn + i * D, *gi = don + i * D;
                k0 = _mm512_fmadd_ps(_mm512_set1_ps(qi[0]), sv, k0); v0 = _mm512_fmadd_ps(_mm512_set1_ps(gi[0]), pv, v0);
                k1 = _mm512_fmadd_ps(_mm512_set1_ps(qi[1]), sv, k1); v1 = _mm512_fmadd_ps(_mm512_set1_ps(gi[1]), pv, v1);
                k2 = _mm512_fmadd_ps(_mm512_set1_ps(qi[2]), sv, k2); v2 = _mm512_fmadd_ps(_mm512_set1_ps(gi[2]), pv, v2);
                k3 = _mm512_fmadd_ps(_mm512_set1_ps(qi[3]), sv, k3); v3 = _mm512_fmadd_ps(_mm512_set1_ps(gi[3]), pv, v3);
                k4 = _mm512_fmadd_ps(_mm512_set1_ps(qi[4]), sv, k4); v4 = _mm512_fmadd_ps(_mm512_set1_ps(gi[4]), pv, v4);
                k5 = _mm512_fmadd_ps(_mm512_set1_ps(qi[5]), sv, k5); v5 = _mm512_fmadd_ps(_mm512_set1_ps(gi[5]), pv, v5);
                k6 = _mm512_fmadd_ps(_mm512_set1_ps(qi[6]), sv, k6); v6 = _mm512_fmadd_ps(_mm512_set1_ps(gi[6]), pv, v6);
                k7 = _mm512_fmadd_ps(_mm512_set1_ps(qi[7]), sv, k7); v7 = _mm512_fmadd_ps(_mm512_set1_ps(gi[7]), pv, v7);
            }
            float tk[D][16], tv[D][16];
            _mm512_storeu_ps(tk[0], k0); _mm512_storeu_ps(tk[1], k1); _mm512_storeu_ps(tk[2], k2); _mm512_storeu_ps(tk[3], k3);
            _mm512_storeu_ps(tk[4], k4); _mm512_storeu_ps(tk[5], k5); _mm512_storeu_ps(tk[6], k6); _mm512_storeu_ps(tk[7], k7);
            _mm512_storeu_ps(tv[0], v0); _mm512_storeu_ps(tv[1], v1); _mm512_storeu_ps(tv[2], v2); _mm512_storeu_ps(tv[3], v3);
            _mm512_storeu_ps(tv[4], v4); _mm512_storeu_ps(tv[5], v5); _mm512_storeu_ps(tv[6], v6); _mm512_storeu_ps(tv[7], v7);
            for (int t = 0; t < 16; t++)
                for (int d = 0; d < D; d++) { dkn[(jb + t) * D + d] = tk[d][t] * scale; dvn[(jb + t) * D + d] = tv[d][t]; }
        }
#endif
        for (long j = jb; j < L; j++) {
            float a[D] = {0}, b[D] = {0};
            for (long i = 0; i < L; i++)
                for (int d = 0; d < D; d++) { a[d] += qn[i * D + d] * S[i * L + j]; b[d] += don[i * D + d] * P[i * L + j]; }
            for (int d = 0; d < D; d++) { dkn[j * D + d] = a[d] * scale; dvn[j * D + d] = b[d]; }
        }
    }
    free(kT); free(vT); free(P); free(S);
}
"""
_KERNEL_FLAGS = (["-O3", "-march=native", "-ffast-math", "-shared", "-fPIC"], ["-lmvec", "-lm"])
_KERNEL: dict[str, Any] = {}
_KERNEL_LOCK = threading.Lock()


def _kernel_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "diffusion-studio" / "kernels"


def _cpu_fingerprint() -> str:
    """A key for -march=native builds: the CPU model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return "\n".join(lines + [platform.machine(), platform.processor()])


def attention_kernel() -> Any | None:
    """The compiled head_dim-8 attention library (ctypes), or None where it cannot be built.

    Built once per machine with the system C compiler into
    ``~/.cache/diffusion-studio/kernels/`` (atomic rename, so parallel processes are safe).
    Without a compiler, on a failed build, on a CPU without AVX-512 (where it was not
    measured) or with ``STUDIO_NO_C_KERNELS=1`` in the environment, the callers use
    torch's SDPA.
    """
    with _KERNEL_LOCK:
        if "lib" in _KERNEL:
            return _KERNEL["lib"]
        _KERNEL["lib"] = None
        if os.environ.get("STUDIO_NO_C_KERNELS") or platform.system() != "Linux":
            return None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not compiler:
            return None
        flags, libs = _KERNEL_FLAGS
        key = hashlib.sha256("\0".join([_ATTN8_C, compiler, *flags, *libs, _cpu_fingerprint()]).encode()).hexdigest()
        target = _kernel_cache_dir() / f"attn8-{key[:16]}.so"
        if not target.exists():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                    source = Path(tmp) / "attn8.c"
                    source.write_text(_ATTN8_C)
                    built = Path(tmp) / "attn8.so"
                    for extra in (libs, ["-lm"]):  # libmvec gives the vectorised expf; else plain libm
                        result = subprocess.run([compiler, *flags, str(source), "-o", str(built), *extra],
                                                capture_output=True, text=True, timeout=120)
                        if result.returncode == 0:
                            break
                    else:
                        return None
                    os.replace(built, target)
            except (OSError, subprocess.SubprocessError):
                return None
        try:
            lib = ctypes.CDLL(str(target))
        except OSError:
            return None
        ptr, long_, float_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
        lib.attn8_fwd.argtypes = [ptr] * 5 + [long_] * 2 + [float_]
        lib.attn8_fwd.restype = None
        lib.attn8_bwd.argtypes = [ptr] * 9 + [long_] * 2 + [float_]
        lib.attn8_bwd.restype = None
        lib.attn8_vectorised.restype = ctypes.c_int
        if not lib.attn8_vectorised():  # measured with AVX-512 only: elsewhere torch's SDPA is the safe bet
            return None
        _KERNEL["lib"] = lib
        return lib


class _Attention8Function(torch.autograd.Function):
    """softmax(q k^T * scale) v on ``[N, L, 8]`` float32 CPU tensors with the C kernel."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        lib = attention_kernel()
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        n, length, _ = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(n, length, dtype=q.dtype)
        lib.attn8_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), n, length, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        n, length, _ = q.shape
        attention_kernel().attn8_bwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
                                     grad_out.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), n, length,
                                     ctx.scale)
        return dq, dk, dv, None


def attention_head_dim8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v)`` for ``[..., L, 8]`` float32 CPU tensors, with the C kernel.

    Args:
        q: Queries ``[..., L, 8]``.
        k: Keys, same shape.
        v: Values, same shape.

    Returns:
        The attention output, same shape; differentiable.
    """
    shape = q.shape
    flat = [t.reshape(-1, shape[-2], 8) for t in (q, k, v)]
    return _Attention8Function.apply(*flat, 8 ** -0.5).view(shape)


def _kernel_applies(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any, attention_mask: Any) -> bool:
    if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 4:
        return False
    if hidden_states.device.type != "cpu" or hidden_states.dtype != torch.float32:
        return False
    if attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None:
        return False
    if attn.heads * 8 != attn.to_q.out_features or attn.scale != 8 ** -0.5 or not attn.scale_qk:
        return False
    # the kernel is single-threaded: used in one-thread runs and in the shard workers
    return torch.get_num_threads() == 1 and attention_kernel() is not None


class HeadDim8AttnProcessor:
    """diffusers' ``AttnProcessor2_0`` for UNet self-attention, with the C kernel for head_dim 8.

    The same steps in the same order (group norm, q/k/v projections, attention, output
    projection, residual, rescale); only the attention itself runs in the C kernel, when
    it applies (CPU float32, head_dim 8, no mask, one torch thread in the calling thread).
    Anything else goes to ``AttnProcessor2_0`` unchanged.
    """

    def __init__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.fallback = AttnProcessor2_0()

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        if not _kernel_applies(attn, hidden_states, encoder_hidden_states, attention_mask):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        heads = attn.heads
        query, key, value = (t.view(batch, -1, heads, 8).transpose(1, 2) for t in (query, key, value))
        hidden_states = attention_head_dim8(query, key, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, heads * 8).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def use_fast_attention(unet: torch.nn.Module) -> int:
    """Give every attention module of ``unet`` the ``HeadDim8AttnProcessor``; returns how many.

    Does nothing (returns 0) where the C kernel cannot be built.
    """
    from diffusers.models.attention_processor import Attention

    if attention_kernel() is None:
        return 0
    count = 0
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(HeadDim8AttnProcessor())
            count += 1
    return count


# ----------------------------------------------------------------------------- public API
def prepare_unet_for_training(unet: torch.nn.Module, device_or_cfg: Any = "cpu", *, compile: bool | None = None,
                              shards: int | None = None) -> torch.nn.Module:
    """Apply the speed levers that measurably help on the device; the math stays the same.

    On CPU: the head_dim-8 attention kernel on every attention module
    (``use_fast_attention``) and batch sharding over threads (``shard_batches``); both
    act on this instance, whose parameters, ``state_dict``, config and
    ``save_pretrained`` output are unchanged. Sharding is a no-op with one torch thread,
    under autocast and with active dropout. On CUDA/MPS nothing is changed (no GPU was
    available to measure a lever there).

    Args:
        unet: A diffusers ``UNet2DModel`` (other modules are returned unchanged).
        device_or_cfg: Where it trains: ``"cpu"``, ``"cuda"``, a ``torch.device`` or a
            config with a ``device`` field (``"auto"`` is resolved).
        compile: ``True`` returns ``torch.compile(unet, dynamic=False)`` and nothing else;
            ``None``/``False`` does not compile: on the 2-core CPU compiling changed the
            step by under 1 % after a one- to four-minute compile.
        shards: Threads to split each batch over; ``None`` uses ``torch.get_num_threads()``
            of the calling thread at every forward.

    Returns:
        The module to train (the same object unless ``compile`` is True).

    Raises:
        ConfigError: ``shards`` below 1.
    """
    if compile:
        return torch.compile(unet, dynamic=False)
    if shards is not None and shards < 1:
        from studio.errors import ConfigError

        raise ConfigError(f"shards must be at least 1, got {shards}.")
    if _device_type(device_or_cfg) != "cpu":
        return unet
    use_fast_attention(unet)
    shard_batches(unet, shards)
    return unet


def shard_batches(unet: torch.nn.Module, shards: int | None = None) -> bool:
    """Install batch sharding over threads on this ``UNet2DModel`` instance (CPU; see module doc).

    Args:
        unet: The UNet; its parameters, ``state_dict``, config and ``save_pretrained`` stay as they are.
        shards: Threads per batch; ``None`` uses ``torch.get_num_threads()`` at every forward.

    Returns:
        Whether sharding was installed (not for other modules or with active dropout).
    """
    if shards is not None and shards < 1:
        from studio.errors import ConfigError

        raise ConfigError(f"shards must be at least 1, got {shards}.")
    if not _can_shard(unet):
        return False
    unet._studio_shards = shards  # None: decided at each forward from the thread count
    unet.forward = types.MethodType(_sharded_forward, unet)
    return True


def make_optimizer(params: Iterable[torch.nn.Parameter], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                   weight_decay: float = 1e-2, eps: float = 1e-8, device: Any = "cpu") -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU and CUDA) or the foreach one (elsewhere).

    The update rule is torch's AdamW in every case; the fused kernel does it in one
    pass per tensor (~5 ms less per step than the default loop for a 1.1 M parameter
    UNet on CPU). Results agree with the default implementation to float rounding.

    Args:
        params: Parameters (or parameter groups) to optimise.
        lr: Learning rate.
        betas: Adam's (beta1, beta2).
        weight_decay: Decoupled weight decay.
        eps: Adam's epsilon.
        device: Where the parameters live (string, ``torch.device`` or config).
    """
    kind = _device_type(device)
    fast = {"fused": True} if kind in ("cpu", "cuda") else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, **fast)


@torch.no_grad()
def ema_update_(ema_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float) -> None:
    """One EMA step in place, bit-exact to diffusers ``EMAModel.step`` (non-foreach).

    ``ema -= (1 - decay) * (ema - param)`` for parameters that require grad, a copy for
    the others, done with foreach kernels (a few launches instead of three per tensor).

    Args:
        ema_params: The shadow tensors, updated in place.
        params: The model's parameters, in the same order.
        decay: The decay of this step (e.g. ``EMAModel.get_decay(step)``).
    """
    ema_params, params = list(ema_params), list(params)
    if len(ema_params) != len(params):
        from studio.errors import ConfigError

        raise ConfigError(f"EMA has {len(ema_params)} tensors but the model has {len(params)} parameters.")
    train_s = [s for s, p in zip(ema_params, params) if p.requires_grad]
    train_p = [p for p in params if p.requires_grad]
    frozen = [(s, p) for s, p in zip(ema_params, params) if not p.requires_grad]
    if frozen:
        torch._foreach_copy_([s for s, _ in frozen], [p for _, p in frozen])
    if train_s:
        diff = torch._foreach_sub(train_s, train_p)
        torch._foreach_mul_(diff, 1 - decay)
        torch._foreach_sub_(train_s, diff)

"""The multistep step's passes over parameter-sized vectors, each fused into one pass on the CPU.

A step of :mod:`~exponential_euler_solver.solvers.multistep` forms ``delta = alpha g + beta g_prev + a delta_prev +
V c``, the candidate ``theta + delta`` (in place, in the parameters) and ``||delta||``, and after the new gradient
the norm of ``E = g_new + c1 g + c2 g_prev + c3 delta_prev + V q``, ``V^T g_new`` and ``||g_new||``. As torch
operations that is a dozen passes over vectors of 2.6M entries (10 MB each in float32), read back from memory
after the gradient evicted them from the caches; here each group is one loop that reads every input once. Measured
on this project's 2-core CPU (2 threads, inputs evicted from the caches before each group): the adaptive step's two
groups 4.5-4.7 ms against 6.6-6.9 ms as torch operations; with 9 tracked vectors 18.7-19.7 ms against 19.9-21.0 ms,
where the two reads of ``V`` (95 MB each, near this machine's memory bandwidth) are most of the time.

The loops are a few lines of C, compiled the first time they are needed (0.4-0.6 s) with the system's C compiler
(``$CC``, else ``cc``) into ``~/.cache/exponential_euler_solver/kernels`` and loaded with :mod:`ctypes`. Without a
compiler, for tensors that are not on the CPU, not float32/float64 or not contiguous, or with the environment
variable ``EXPONENTIAL_EULER_SOLVER_FUSED=0``, :func:`combine` runs the same arithmetic as torch operations and
:func:`residual` returns None (the caller has its own torch path).

Sums are deterministic: each block of :data:`BLOCK` entries is summed in the vectors' dtype and the blocks' sums
are added in float64 in block order, whatever the number of threads (the accuracy of
:func:`~exponential_euler_solver.linalg.blocks.norm`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..files import atomic_write, cache_folder
from .blocks import norm

__all__ = ["available", "compiled", "combine", "residual", "BLOCK", "ENV_SWITCH"]

#: Entries per block: summed in the vectors' dtype, blocks summed in float64.
BLOCK = 4096
#: Set to ``0`` to use torch operations instead of the compiled loops.
ENV_SWITCH = "EXPONENTIAL_EULER_SOLVER_FUSED"
FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp")

_TEMPLATE = r"""
/* out = c0 x0 + c1 x1 [+ c2 x2] + V cv; shifted = base + out (when shifted is given; shifted may be base itself,
   updated in place); returns sum(out^2). Each
   block is formed in a local array (cache-resident), then written out once. */
double ees_combine_SFX(long n, int nt, const real *restrict x0, real c0, const real *restrict x1, real c1,
                       const real *restrict x2, real c2, const real *restrict V, long vi, long vj, int k,
                       const real *restrict cv, real *restrict out, const real *restrict base,
                       real *restrict shifted)
{
    long nb = (n + BLK - 1) / BLK;
    double *part = (double *)malloc((size_t)nb * sizeof(double));
    if (!part) return NAN;
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (long b = 0; b < nb; b++) {
        real o[BLK];
        long s = b * BLK, m = (s + BLK < n) ? BLK : n - s;
        const real *restrict a0 = x0 + s, *restrict a1 = x1 + s;
        if (x2) {
            const real *restrict a2 = x2 + s;
            #pragma omp simd
            for (long i = 0; i < m; i++) o[i] = c0 * a0[i] + c1 * a1[i] + c2 * a2[i];
        } else {
            #pragma omp simd
            for (long i = 0; i < m; i++) o[i] = c0 * a0[i] + c1 * a1[i];
        }
        for (int j = 0; j < k; j++) {
            const real *restrict v = V + s * vi + j * vj;
            real cj = cv[j];
            if (vi == 1) {
                #pragma omp simd
                for (long i = 0; i < m; i++) o[i] += cj * v[i];
            } else {
                for (long i = 0; i < m; i++) o[i] += cj * v[i * vi];
            }
        }
        real acc = 0;
        real *restrict d = out + s;
        if (shifted && shifted == base) {  /* in place: only the one pointer touches the parameters */
            real *restrict c = shifted + s;
            #pragma omp simd reduction(+:acc)
            for (long i = 0; i < m; i++) { d[i] = o[i]; c[i] += o[i]; acc += o[i] * o[i]; }
        } else if (shifted) {
            const real *restrict p = base + s;
            real *restrict c = shifted + s;
            #pragma omp simd reduction(+:acc)
            for (long i = 0; i < m; i++) { d[i] = o[i]; c[i] = p[i] + o[i]; acc += o[i] * o[i]; }
        } else {
            #pragma omp simd reduction(+:acc)
            for (long i = 0; i < m; i++) { d[i] = o[i]; acc += o[i] * o[i]; }
        }
        part[b] = (double)acc;
    }
    double total = 0.0;
    for (long b = 0; b < nb; b++) total += part[b];
    free(part);
    return total;
}

/* e = c0 x0 + c1 x1 + c2 x2 [+ c3 x3] + V q, never stored; returns sum(e^2) and writes out[0] = sum(x0^2),
   out[1 + j] = (V^T x0)_j (1 + k entries). */
double ees_residual_SFX(long n, int nt, const real *restrict x0, real c0, const real *restrict x1, real c1,
                        const real *restrict x2, real c2, const real *restrict x3, real c3,
                        const real *restrict V, long vi, long vj, int k, const real *restrict q,
                        double *restrict out)
{
    long nb = (n + BLK - 1) / BLK, w = 2 + k;
    double *part = (double *)malloc((size_t)nb * (size_t)w * sizeof(double));
    if (!part) return NAN;
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (long b = 0; b < nb; b++) {
        real e[BLK];
        long s = b * BLK, m = (s + BLK < n) ? BLK : n - s;
        const real *restrict a0 = x0 + s, *restrict a1 = x1 + s, *restrict a2 = x2 + s;
        real acc = 0, sq = 0;
        if (k == 0 && x3) {  /* the adaptive step: one loop, nothing kept */
            const real *restrict a3 = x3 + s;
            #pragma omp simd reduction(+:acc,sq)
            for (long i = 0; i < m; i++) {
                real r = c0 * a0[i] + c1 * a1[i] + c2 * a2[i] + c3 * a3[i];
                acc += r * r;
                sq += a0[i] * a0[i];
            }
            part[b * w] = (double)acc;
            part[b * w + 1] = (double)sq;
            continue;
        }
        if (x3) {
            const real *restrict a3 = x3 + s;
            #pragma omp simd reduction(+:sq)
            for (long i = 0; i < m; i++) {
                e[i] = c0 * a0[i] + c1 * a1[i] + c2 * a2[i] + c3 * a3[i];
                sq += a0[i] * a0[i];
            }
        } else {
            #pragma omp simd reduction(+:sq)
            for (long i = 0; i < m; i++) {
                e[i] = c0 * a0[i] + c1 * a1[i] + c2 * a2[i];
                sq += a0[i] * a0[i];
            }
        }
        for (int j = 0; j < k; j++) {
            const real *restrict v = V + s * vi + j * vj;
            real qj = q[j], pj = 0;
            if (vi == 1) {
                #pragma omp simd reduction(+:pj)
                for (long i = 0; i < m; i++) { pj += v[i] * a0[i]; e[i] += qj * v[i]; }
            } else {
                for (long i = 0; i < m; i++) { pj += v[i * vi] * a0[i]; e[i] += qj * v[i * vi]; }
            }
            part[b * w + 2 + j] = (double)pj;
        }
        #pragma omp simd reduction(+:acc)
        for (long i = 0; i < m; i++) acc += e[i] * e[i];
        part[b * w] = (double)acc;
        part[b * w + 1] = (double)sq;
    }
    double total = 0.0;
    for (int j = 0; j <= k; j++) out[j] = 0.0;
    for (long b = 0; b < nb; b++) {
        total += part[b * w];
        for (int j = 0; j <= k; j++) out[j] += part[b * w + 1 + j];
    }
    free(part);
    return total;
}
"""

_SUFFIX = {torch.float32: ("float", "f32"), torch.float64: ("double", "f64")}


def _source() -> str:
    head = f"#include <math.h>\n#include <stdlib.h>\n#define BLK {BLOCK}\n"
    return head + "".join(_TEMPLATE.replace("real", c).replace("SFX", s) for c, s in _SUFFIX.values())


def cache_dir() -> str:
    return cache_folder("kernels")


def _compile(cc: str, source: str, path: str) -> None:
    """Compile ``source`` into the shared library ``path``, written whole (:func:`~..files.atomic_write`)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = os.path.join(tmp, "fused.c"), os.path.join(tmp, "fused.so")
        with open(src, "w") as f:
            f.write(source)
        subprocess.run([cc, *FLAGS, src, "-o", lib], check=True, capture_output=True, text=True, timeout=120)
        with open(lib, "rb") as built:
            atomic_write(path, lambda f: shutil.copyfileobj(built, f))


@functools.lru_cache(maxsize=None)
def _library() -> Optional[ctypes.CDLL]:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    source = _source()
    key = hashlib.sha256("\0".join([source, cc, *FLAGS, platform.machine()]).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"fused-{key}.so")
    try:
        if not os.path.exists(path):
            _compile(cc, source, path)
        lib = ctypes.CDLL(path)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = str(getattr(exc, "stderr", None) or exc).strip()[-500:]
        warnings.warn(f"exponential_euler_solver: the fused CPU loops could not be built with {cc!r} ({detail}); "
                      f"the step uses torch operations instead (slower by a few passes over the parameters). Set "
                      f"{ENV_SWITCH}=0 to silence this.", RuntimeWarning, stacklevel=3)
        return None
    p, i, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    for c_type, sfx in _SUFFIX.values():
        r = ctypes.c_float if c_type == "float" else ctypes.c_double
        f = getattr(lib, f"ees_combine_{sfx}")
        f.restype, f.argtypes = ctypes.c_double, [n, i, p, r, p, r, p, r, p, n, n, i, p, p, p, p]
        f = getattr(lib, f"ees_residual_{sfx}")
        f.restype, f.argtypes = ctypes.c_double, [n, i, p, r, p, r, p, r, p, r, p, n, n, i, p, p]
    return lib


def compiled() -> bool:
    """Whether the compiled loops are built and switched on in this process (builds them on first call)."""
    return _library() is not None


def available(*tensors: Optional[Tensor]) -> bool:
    """Whether the compiled loops apply to these tensors (None entries are skipped): all on the CPU, of one dtype,
    float32 or float64; vectors contiguous."""
    present = [t for t in tensors if t is not None]
    if not present:
        return False
    dtype = present[0].dtype
    if dtype not in _SUFFIX or any(t.device.type != "cpu" or t.dtype != dtype for t in present):
        return False
    if any(t.dim() == 1 and not t.is_contiguous() for t in present):
        return False
    return compiled()


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _basis(V: Optional[Tensor], coef: Optional[Tensor], like: Tensor):
    if V is None or V.shape[1] == 0:
        return None, 0, 0, 0, None
    coef = coef.to(device=like.device, dtype=like.dtype).contiguous()
    return V, V.stride(0), V.stride(1), V.shape[1], coef


def combine(terms: Sequence[tuple[Tensor, float]], V: Optional[Tensor] = None, coef: Optional[Tensor] = None, *,
            out: Tensor, base: Optional[Tensor] = None, shifted: Optional[Tensor] = None) -> float:
    """``out = sum_i c_i x_i + V coef`` for two or three ``(x_i, c_i)`` terms, ``shifted = base + out`` when both
    are given (``shifted`` may be ``base`` itself: then ``base += out`` in place), and ``||out||^2`` (float64 sum
    of per-block sums) as a Python float. ``out`` and ``shifted`` must not overlap the other inputs."""
    if not 2 <= len(terms) <= 3:
        raise ValueError(f"combine takes two or three terms; got {len(terms)}")
    V, vi, vj, k, coef = _basis(V, coef, out)
    if available(out, shifted, base, V, *(x for x, _ in terms)):
        (x0, c0), (x1, c1), (x2, c2) = (*terms, (None, 0.0))[:3]
        fn = getattr(_library(), f"ees_combine_{_SUFFIX[out.dtype][1]}")
        shifted = shifted if base is not None else None
        return fn(out.numel(), torch.get_num_threads(), x0.data_ptr(), c0, x1.data_ptr(), c1, _ptr(x2), c2,
                  _ptr(V), vi, vj, k, _ptr(coef), out.data_ptr(), _ptr(base), _ptr(shifted))
    (x0, c0), *rest = terms
    torch.mul(x0, c0, out=out)
    for x, c in rest:
        out.add_(x, alpha=c)
    if V is not None:
        out.addmv_(V, coef)
    if base is not None and shifted is not None:
        torch.add(base, out, out=shifted)
    return norm(out) ** 2


def residual(terms: Sequence[tuple[Tensor, float]], V: Optional[Tensor] = None, q: Optional[Tensor] = None
             ) -> Optional[tuple[float, Optional[Tensor], float]]:
    """``(||e||^2, V^T x_0, ||x_0||^2)`` for ``e = sum_i c_i x_i + V q`` (three or four terms; ``e`` is never
    stored; ``V^T x_0`` float64, None without ``V``), or None when the compiled loops do not apply."""
    if not 3 <= len(terms) <= 4:
        raise ValueError(f"residual takes three or four terms; got {len(terms)}")
    x0 = terms[0][0]
    V, vi, vj, k, q = _basis(V, q, x0)
    if not available(V, *(x for x, _ in terms)):
        return None
    (x0, c0), (x1, c1), (x2, c2), (x3, c3) = (*terms, (None, 0.0))[:4]
    out = torch.zeros(1 + k, dtype=torch.float64)
    fn = getattr(_library(), f"ees_residual_{_SUFFIX[x0.dtype][1]}")
    ee = fn(x0.numel(), torch.get_num_threads(), x0.data_ptr(), c0, x1.data_ptr(), c1, x2.data_ptr(), c2, _ptr(x3),
            c3, _ptr(V), vi, vj, k, _ptr(q), out.data_ptr())
    return ee, (out[1:] if V is not None else None), float(out[0])

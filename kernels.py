"""The kernels quantize.py's and speed.py's layers call, and the byte layouts each one takes:
torch's int8 and int4 products (private aten ops, whose layouts depend on the device and the CPU),
and C kernels of our own for CPU decoding (kernels.c, compiled at first use): integer dot products
(int8 activations times int4 or int8 weights), bf16 products (AVX-512 BF16, for decoding and
prefill alike: tiles of 32 rows by up to 12 tokens), the attention of one query with RoPE and the
cache writes, RMSNorm and SwiGLU. quantize.py holds the numbers (what a weight rounds to); this
file holds where its bytes go.

torch's int4 CPU product converts each weight to float and multiplies in float, and oneDNN's int8
one (which w8a8 used) reads its weights at two thirds of the memory's speed in decoding.
llama.cpp's Q4_0 and Q8_0 are faster because they multiply 4- or 8-bit weights by 8-bit
activations with the CPU's integer dot products (AVX-512 VNNI's vpdpbusd: 64 u8 x s8 products
summed into 16 int32 per instruction), converting nothing but one sum per block. kernels.c does
the same for quantize.py's weights: --quantize w4a8 reads the int4 file, w8a8 the int8 one.

w4a8: each token's x is rounded per group of the weight's inputs (32, 64 or 128) to int8 on its
own scale d. With w = (q - 8) s + z in a group, and x ~ d qx there:
    sum w x = s d (sum q qx - 8 sum qx) + z sum x
where q qx is the integer dot product, and sum x is the block's exact float sum.
w8a8: each token's x is rounded to int8 on one scale, the weight is int8 per row (below).
attend_one: a decoding step's attention (speed.KernelAttention), in one call instead of about ten
torch ops, each of which costs more than the arithmetic for a single query.
decode_block: a whole block's decoding step (the kernels here in the modules' order, with their
roundings) in one call, for speed.KernelBlock.

The C has each loop twice: with AVX-512 (VNNI) intrinsics, and as plain C (any CPU; the tests run
both against the arithmetic written out in float64). It is built with the system's C compiler
(cc, -O3 -march=native -fopenmp: OpenMP is torch's own runtime, already loaded, so it shares
torch's threads) into ~/.cache/nano-llama3, keyed by the source and the CPU, and called through
ctypes. Without a compiler, quantize.check_device says so in one line, before anything is loaded
(and --fast's attention stays torch's, speed.DecodeAttention).
"""
import ctypes
import hashlib
import os
import platform
import mmap
import subprocess
from functools import cache
from pathlib import Path

import torch

import llama

aten = torch.ops.aten


# -----------------------------------------------------------------------------
# 1. torch's int8 and int4 kernels, and the layouts they take
# CPU: _convert_weight_to_int4pack_for_cpu takes q as int32 (out, in) and arranges it by blocks of
# 32 or 64 output rows (the CPU's vector width): for each input, a byte holds two of those rows.
# Blocks are independent, so a slice of whole blocks packs (and unpacks) on its own: the weight is
# packed a slice of rows at a time, and backward passes dequantize it slice by slice.
# Which rows share a byte depends on the CPU (AVX-512, AVX2 or neither); cpu_int4_layout finds out
# once, on a probe. This is why files hold the portable nibbles and packing happens at load.
# CUDA (tinygemm): _convert_weight_to_int4pack takes two values a byte, even inputs in the high
# nibble, and tiles the input dimension by inner_k_tiles * 16.


def unpack_cpu_int4(packed, block, halves):
    """packed (rows, in / 2) uint8 in the CPU layout -> q (rows, in) uint8, rows starting a block.
    In a whole block, a byte holds rows j and j + block / 2 (halves) or rows 2j and 2j + 1; in the
    last, shorter block (rows not a multiple of block), always the latter."""
    rows = packed.shape[0]
    full = rows // block * block
    parts = [(packed[:full], block, halves), (packed[full:], rows - full, False)]
    return torch.cat([unpack_blocks(p, b, h) for p, b, h in parts if len(p)])


def unpack_blocks(packed, block, halves):
    rows, n_in = packed.shape[0], packed.shape[1] * 2
    # (blocks, bytes of a block's rows, in): transposed while still packed, half the bytes to move
    p = packed.view(rows // block, n_in, block // 2).transpose(1, 2).contiguous()
    lo, hi = p & 15, p >> 4
    q = torch.cat([lo, hi], 1) if halves else torch.stack([lo, hi], 2).flatten(1, 2)
    return q.view(rows, n_in)  # (blocks, block, in) -> (rows, in)


@cache
def cpu_int4_layout():
    """(block, halves) for unpack_cpu_int4: the layout of this torch on this CPU."""
    g = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (176, 8), dtype=torch.int32, generator=g)
    packed = aten._convert_weight_to_int4pack_for_cpu(probe, 1)  # whole blocks and a short one
    for layout in ((64, True), (32, True), (32, False)):
        if torch.equal(unpack_cpu_int4(packed, *layout), probe.to(torch.uint8)):
            return layout
    raise RuntimeError("this torch packs int4 CPU weights in a layout kernels.py does not know")


def kernel_input(x):
    """x (rows, in) as the kernels read it: bfloat16 (their float32 paths are not vectorized),
    contiguous, and at an aligned address (the int8 CPU kernel crashes on others)."""
    x = x.bfloat16().contiguous()
    return x if x.data_ptr() % 64 == 0 else x.clone()


def inner_k_tiles(in_features):
    return next(t for t in (8, 4, 2) if in_features % (t * 16) == 0)


def pack_int4(q, slices):
    """q (out, in) uint8 in [0, 15] -> the int4 kernel's layout on q's device; on a CPU packed a
    slice of rows (start, end) at a time (the kernel's int32 copy of a 128k-row weight is 1 GB)."""
    if q.is_cuda:
        pairs = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()  # (out, in / 2)
        return aten._convert_weight_to_int4pack(pairs, inner_k_tiles(q.shape[1]))
    packed = torch.empty(q.shape[0], q.shape[1] // 2, dtype=torch.uint8)  # (out, in / 2)
    for a, b in slices:
        packed[a:b] = aten._convert_weight_to_int4pack_for_cpu(q[a:b].int(), 1)
    return packed


def int8_matmul(x, q, scales):
    """x (rows, in) -> (rows, out) bfloat16 x q^T * scales on the CPU: torch's int8 kernel."""
    return aten._weight_int8pack_mm(kernel_input(x), q, scales.bfloat16())


def int4_matmul(x, packed, group_size, scales_and_zeros):
    """x (rows, in) -> (rows, out) bfloat16: torch's int4 kernel (tinygemm's on CUDA)."""
    mm = aten._weight_int4pack_mm if x.is_cuda else aten._weight_int4pack_mm_for_cpu
    return mm(kernel_input(x), packed, group_size, scales_and_zeros)


HUGE_PAGE = 2 << 20


def on_huge_pages(t):
    """A copy of t in memory the kernel reads from 2 MB pages (Linux's transparent huge pages,
    asked for before the first write, in a fresh mapping: freed heap memory that malloc hands out
    again has its small pages already): a decoding step streams every weight once, and with 4 KB
    pages each 4 KB costs a TLB miss. Where the OS gives no huge pages, a plain copy. t may be a
    view in any order: it is laid out as it is copied."""
    if not hasattr(mmap, "MADV_HUGEPAGE") or t.nbytes < 2 * HUGE_PAGE:
        return t.contiguous()
    raw = mmap.mmap(-1, t.nbytes + HUGE_PAGE, mmap.MAP_PRIVATE)  # untouched; freed with t
    buffer = torch.frombuffer(raw, dtype=torch.uint8)
    offset = -buffer.data_ptr() % HUGE_PAGE
    raw.madvise(mmap.MADV_HUGEPAGE, offset, t.nbytes // HUGE_PAGE * HUGE_PAGE)
    return buffer[offset:offset + t.nbytes].view(t.dtype).view(t.shape).copy_(t)


# -----------------------------------------------------------------------------
# 2. C kernels of our own (kernels.c): w4a8, w8a8 and one-query attention

SOURCE = (Path(__file__).parent / "kernels.c").read_text()  # the C, beside this file


def cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nano-llama3"


@cache
def library(portable=False):
    """The compiled kernel (portable=True: the plain C loop only, for tests on any CPU)."""
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"] + (
        ["-DPORTABLE"] if portable else [])
    key = hashlib.sha256((SOURCE + " ".join(flags) + platform.processor() +
                          cpu_flags()).encode()).hexdigest()[:16]
    path = cache_dir() / f"kernels-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        src = path.with_suffix(f".{os.getpid()}.c")  # per process: another may be building too
        src.write_text(SOURCE)
        try:
            with llama.atomic_file(path) as tmp:  # whole or absent
                r = subprocess.run([os.environ.get("CC", "cc"), *flags, str(src), "-o", str(tmp)],
                                   capture_output=True, text=True)
                if r.returncode:
                    last = r.stderr.strip().splitlines()[-1:] or ["?"]
                    raise llama.InputError(f"kernels.c did not compile ({last[0]}); use "
                                           "--quantize int4 or int8")
        except FileNotFoundError:
            raise llama.InputError("w4a8 and w8a8 compile a C kernel at first use and found no "
                                   "C compiler: install gcc, or use --quantize int4 or int8"
                                   ) from None
        finally:
            src.unlink()
    lib = ctypes.CDLL(str(path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.w4a8_linear.argtypes = [p, ctypes.c_int, i64, i64, ctypes.c_int, p, i64, p]
    lib.w8a8_linear.argtypes = [p, ctypes.c_int, i64, i64, p, p, i64, p]
    lib.w4a8_dequantize.argtypes = [p, i64, i64, ctypes.c_int, p]
    lib.attend_one.argtypes = [p, p, p, ctypes.c_int, i64, i64, i64, i64, i64, i64, p]
    lib.rope_attend_one.argtypes = [p, ctypes.c_int, i64, i64, i64, i64, p, p, p, i64, i64, p,
                                    p]
    lib.rms_norm.argtypes = [p, p, ctypes.c_int, i64, i64, ctypes.c_float, p]
    lib.swiglu.argtypes = [p, ctypes.c_int, i64, i64, p]
    lib.bf16_linear.argtypes = [p, i64, i64, p, i64, p, ctypes.c_int]
    lib.bf16_linear.restype = ctypes.c_int
    lib.decode_block.argtypes = [p, p, i64, p, p, p, i64, i64, p]
    return lib


def cpu_flags():
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""


@cache
def available():
    """Whether the C kernels build on this machine (a C compiler)."""
    try:
        return bool(library())
    except llama.InputError:
        return False


def has_vnni():
    return bool(library().kernels_vnni())


def has_bf16dot():  # AVX-512 BF16: bf16_matmul at the memory's speed
    return bool(library().kernels_bf16dot())


def w4a8_layout(q, scales, zeros, group_size=32):
    """q (out, in) uint8 in [0, 15], scales and zeros (out, in / group_size) bf16 -> the kernel's
    (out / 4, blocks * (32 group_size + 256)) uint8: see kernels.c. in is padded up to whole
    blocks of 16 groups."""
    out, n = q.shape
    G = group_size
    nb = -(-n // (16 * G))
    pad = nb * 16 * G - n
    q = torch.nn.functional.pad(q, (0, pad))  # (padding: weights of zero scale and zero)
    s, z = (torch.nn.functional.pad(t, (0, pad // G)) for t in (scales, zeros))
    # input i of group g is chunk c = i // 4, k = i % 4; chunks 2v and 2v + 1 share vector v
    chunks = q.view(out // 4, 4, nb, 16, G // 8, 2, 4)  # (blocks of rows, row, block, g, v, 2, k)
    nibbles = (chunks[..., 0, :] | chunks[..., 1, :] << 4).permute(0, 2, 4, 1, 3, 5)  # v, row
    sz = [t.view(out // 4, 4, nb, 16).transpose(1, 2).reshape(out // 4, nb, 64).contiguous()
          .view(torch.uint8) for t in (s, z)]  # (blocks of rows, block, 4 rows x 16 x 2 bytes)
    return torch.cat([nibbles.reshape(out // 4, nb, 32 * G), *sz], 2).view(out // 4, -1)


def w4a8_unlayout(w, in_features, group_size=32):
    """w4a8_layout undone: -> q (out, in) uint8, scales and zeros (out, in / group_size) bf16."""
    G, rows = group_size, len(w)
    nb = w.shape[1] // (32 * G + 256)
    blocks = w.view(rows, nb, 32 * G + 256)
    nibbles = blocks[..., :32 * G].reshape(rows, nb, G // 8, 4, 16, 1, 4)
    chunks = torch.cat([nibbles & 15, nibbles >> 4], 5)  # (blocks of rows, block, v, row, g, 2, k)
    q = chunks.permute(0, 3, 1, 4, 2, 5, 6).reshape(rows * 4, nb * 16 * G)[:, :in_features]
    s, z = (blocks[..., a:a + 128].contiguous().view(torch.bfloat16).view(rows, nb, 4, 16)
            .transpose(1, 2).reshape(rows * 4, nb * 16)[:, :in_features // G]
            for a in (32 * G, 32 * G + 128))
    return q.contiguous(), s.contiguous(), z.contiguous()


def check_w4a8_layout(w, n, G):  # the C reads raw memory: the layout it assumes, checked
    if not (w.dtype == torch.uint8 and n % G == 0 and G in (32, 64, 128) and
            w.shape[1] == -(-n // (16 * G)) * (32 * G + 256) and w.is_contiguous() and
            w.device.type == "cpu"):
        raise ValueError("w4a8's kernels take w4a8_layout's uint8 (out / 4, blocks * (32 G + 256))"
                         " on the CPU for the layer's inputs, in groups of 32, 64 or 128")


def w4a8_dequantize(w, in_features, group_size=32, out=None):
    """Blocks of rows w (rows / 4, ...) of w4a8_layout -> (rows, in) float32 (q - 8) s + z, into
    out if given: one pass in C (prefill's and backward's slices)."""
    check_w4a8_layout(w, in_features, group_size)
    out = torch.empty(4 * len(w), in_features) if out is None else out
    if not (out.shape == (4 * len(w), in_features) and out.dtype == torch.float32 and
            out.is_contiguous()):
        raise ValueError("w4a8_dequantize writes a contiguous float32 (rows, in) out")
    library().w4a8_dequantize(w.data_ptr(), len(w), in_features, group_size, out.data_ptr())
    return out


def w4a8_matmul(x, w, group_size=32, portable=False):
    """x (tokens, in) float32 or bfloat16 -> float32 (tokens, out), with w from w4a8_layout."""
    tokens, n = x.shape
    G = group_size
    check_w4a8_layout(w, n, G)
    x = (x if x.dtype == torch.bfloat16 else x.float()).contiguous()
    y = torch.empty(tokens, 4 * len(w))
    if library(portable).w4a8_linear(x.data_ptr(), x.dtype == torch.bfloat16, tokens, n, G,
                                     w.data_ptr(), 4 * len(w), y.data_ptr()):
        raise MemoryError("w4a8: no memory for the rounded activations")
    return y


def w8a8_layout(q):
    """q (out, in) int8 in [-127, 127] -> (out / 4, in * 4) uint8 q + 128: for each block of 4 rows
    and each 64 inputs, the 4 rows' 64 bytes side by side."""
    out, n = q.shape
    u = (q.view(out // 4, 4, n // 64, 64).transpose(1, 2).to(torch.int16) + 128).to(torch.uint8)
    return u.reshape(out // 4, n * 4).contiguous()


def w8a8_unlayout(w):
    """w8a8_layout undone: (out / 4, in * 4) uint8 -> q (out, in) int8."""
    blocks, n = len(w), w.shape[1] // 4
    q = (w.view(blocks, n // 64, 4, 64).to(torch.int16) - 128).to(torch.int8)
    return q.transpose(1, 2).reshape(blocks * 4, n)


def w8a8_matmul(x, w, scales, portable=False):
    """x (tokens, in) float32 or bfloat16 -> float32 (tokens, out): each token rounded to int8 on
    its own scale, times w from w8a8_layout and its rows' scales (out,) float32."""
    tokens, n = x.shape
    if not (w.dtype == torch.uint8 and w.shape[1] == 4 * n and n % 64 == 0 and
            scales.dtype == torch.float32 and scales.shape == (4 * len(w),) and
            all(t.is_contiguous() and t.device.type == "cpu" for t in (w, scales))):
        raise ValueError("w8a8_matmul takes w8a8_layout's uint8 (out / 4, in * 4) and contiguous "
                         "float32 (out,) scales on the CPU, in a multiple of 64")
    x = (x if x.dtype == torch.bfloat16 else x.float()).contiguous()
    y = torch.empty(tokens, len(scales))
    if library(portable).w8a8_linear(x.data_ptr(), x.dtype == torch.bfloat16, tokens, n,
                                     w.data_ptr(), scales.data_ptr(), len(scales), y.data_ptr()):
        raise MemoryError("w8a8: no memory for the rounded activations")
    return y


def bf16_layout(w, copy=torch.Tensor.contiguous):
    """w (out, in) bfloat16 -> (out / 32, in * 32): for each block of 32 rows and each pair of
    inputs, the 32 rows' two values side by side, written by copy (on_huge_pages: straight into
    its pages)."""
    out, n = w.shape
    return copy(w.view(out // 32, 32, n // 2, 2).transpose(1, 2)).view(out // 32, n * 32)


def bf16_unlayout(w):
    """bf16_layout undone: (out / 32, in * 32) -> (out, in)."""
    blocks, n = len(w), w.shape[1] // 32
    return w.view(blocks, n // 2, 32, 2).transpose(1, 2).reshape(blocks * 32, n)


def bf16_matmul(x, w, out_dtype=torch.float32, portable=False):
    """x (tokens, in) bfloat16 -> (tokens, out) float32 or bfloat16, with w from bf16_layout."""
    tokens, n = x.shape
    if not (x.dtype == w.dtype == torch.bfloat16 and w.shape[1] == 32 * n and n % 2 == 0 and
            w.is_contiguous() and x.device.type == w.device.type == "cpu" and
            out_dtype in (torch.float32, torch.bfloat16)):
        raise ValueError("bf16_matmul takes bfloat16 x (tokens, in) and bf16_layout's contiguous "
                         "(out / 32, in * 32) on the CPU")
    x = x.contiguous()
    y = torch.empty(tokens, 32 * len(w), dtype=out_dtype)
    if not library(portable).bf16_linear(x.data_ptr(), tokens, n, w.data_ptr(), 32 * len(w),
                                         y.data_ptr(), out_dtype == torch.bfloat16):
        raise MemoryError("bf16_matmul: no memory for the activations' copy")
    return y


def attend_one(q, k, v, portable=False):
    """Decoding's attention for one query a row: q (B, 1, heads, hd); k, v (B, S, kv_heads, hd),
    views of a KV cache (rows of kv_heads * hd contiguous elements) -> (B, 1, heads, hd), in
    float32 inside, q's dtype out (bfloat16 or float32; hd a multiple of 16)."""
    B, T, H, hd = q.shape
    _, S, KV, _ = k.shape
    if not (T == 1 and q.dtype == k.dtype == v.dtype and q.dtype in ATTEND_DTYPES and
            hd % 16 == 0 and H % KV == 0 and k.shape == v.shape and q.is_contiguous() and
            k.stride()[1:] == v.stride()[1:] == (KV * hd, hd, 1) and k.stride(0) == v.stride(0)
            and all(t.device.type == "cpu" for t in (q, k, v))):
        raise ValueError("attend_one takes one bfloat16 or float32 query (B, 1, heads, hd) and "
                         "K/V cache views (B, S, kv_heads, hd) on the CPU, hd a multiple of 16")
    y = torch.empty_like(q)
    if library(portable).attend_one(q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                    q.dtype == torch.bfloat16, B, H, KV, hd, S, k.stride(0),
                                    y.data_ptr()):
        raise MemoryError("attend_one: no memory for the scores")
    return y


ATTEND_DTYPES = (torch.bfloat16, torch.float32)


def rope_attend_one(qkv, cs, k_cache, v_cache, pos, n_heads, portable=False):
    """The rest of a decoding step's attention in one call: qkv (B, 1, (H + 2 KV) hd), one token's
    stacked products; RoPE by cs (hd / 2, 2) float32 (cos, sin of position pos); k and v written
    into the caches (B, max_len, KV, hd) at pos; then attend_one over positions 0..pos.
    -> (B, 1, H, hd) in qkv's dtype."""
    B, T, width = qkv.shape
    _, max_len, KV, hd = k_cache.shape
    H = n_heads
    if not (T == 1 and width == (H + 2 * KV) * hd and qkv.dtype in ATTEND_DTYPES and
            qkv.dtype == k_cache.dtype == v_cache.dtype and hd % 16 == 0 and H % KV == 0 and
            cs.dtype == torch.float32 and cs.shape == (hd // 2, 2) and 0 <= pos < max_len and
            v_cache.shape == k_cache.shape and k_cache.shape[0] == B and
            all(t.is_contiguous() and t.device.type == "cpu"
                for t in (qkv, cs, k_cache, v_cache))):
        raise ValueError("rope_attend_one takes one token's contiguous (B, 1, (H + 2 KV) hd) q|k|v, "
                         "(hd / 2, 2) float32 cos and sin, and whole (B, max_len, KV, hd) caches "
                         "on the CPU, hd a multiple of 16")
    q, y = (torch.empty(B, 1, H, hd, dtype=qkv.dtype) for _ in range(2))
    if library(portable).rope_attend_one(qkv.data_ptr(), qkv.dtype == torch.bfloat16, B, H, KV,
                                         hd, cs.data_ptr(), k_cache.data_ptr(),
                                         v_cache.data_ptr(), max_len * KV * hd, pos, q.data_ptr(),
                                         y.data_ptr()):
        raise MemoryError("rope_attend_one: no memory for the scores")
    return y


def check_rows(name, *tensors):
    if not (tensors[0].dtype in ATTEND_DTYPES and all(
            t.dtype == tensors[0].dtype and t.is_contiguous() and t.device.type == "cpu"
            for t in tensors)):
        raise ValueError(f"{name} takes contiguous bfloat16 or float32 tensors of one dtype on the "
                         "CPU")


def rms_norm(x, weight, eps, portable=False):
    """llama.RMSNorm's forward in one pass: x (..., n), weight (n,) of x's dtype."""
    check_rows("rms_norm", x, weight)
    if weight.shape != x.shape[-1:]:
        raise ValueError("rms_norm's weight is (n,) for x (..., n)")
    y = torch.empty_like(x)
    library(portable).rms_norm(x.data_ptr(), weight.data_ptr(), x.dtype == torch.bfloat16,
                               x.numel() // x.shape[-1], x.shape[-1], eps, y.data_ptr())
    return y


def swiglu(h, portable=False):
    """h (..., 2 m) = [a | b] (w1's and w3's products stacked) -> silu(a) * b (..., m), rounded
    as torch's two ops round."""
    check_rows("swiglu", h)
    if h.shape[-1] % 2:
        raise ValueError("swiglu takes [a | b]: an even last dimension")
    y = h.new_empty(*h.shape[:-1], h.shape[-1] // 2)
    library(portable).swiglu(h.data_ptr(), h.dtype == torch.bfloat16, h.numel() // h.shape[-1],
                             h.shape[-1] // 2, y.data_ptr())
    return y


# -----------------------------------------------------------------------------
# 3. A decoding block in one call: the kernels above in the modules' order (speed.KernelBlock)

class Product(ctypes.Structure):  # kernels.c's struct product: one weight in a kernel's layout
    _fields_ = [("kind", ctypes.c_int64), ("G", ctypes.c_int64), ("n", ctypes.c_int64),
                ("out", ctypes.c_int64), ("w", ctypes.c_void_p), ("scales", ctypes.c_void_p)]


class Block(ctypes.Structure):  # kernels.c's struct block
    _fields_ = [("attention_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p),
                ("eps", ctypes.c_float), *((k, ctypes.c_int64) for k in
                                          ("dim", "H", "KV", "hd", "hidden")),
                *((k, Product) for k in ("qkv", "wo", "w13", "w2"))]


PRODUCT_KINDS = ("bf16", "w8a8", "w4a8")


def check_product(kind, w, scales, G, n, out):
    """One product's weight, as its own kernel checks it: (kind, weight, scales, G, in, out)."""
    if kind == "w4a8":
        check_w4a8_layout(w, n, G)
        ok = 4 * len(w) == out
    elif kind == "w8a8":
        ok = (w.dtype == torch.uint8 and w.shape == (out // 4, 4 * n) and n % 64 == 0 and
              scales.dtype == torch.float32 and scales.shape == (out,) and scales.is_contiguous())
    else:
        ok = kind == "bf16" and w.dtype == torch.bfloat16 and w.shape == (out // 32, 32 * n)
    if not (ok and w.is_contiguous() and w.device.type == "cpu"):
        raise ValueError(f"decode_block: a {kind} product's weight is not its kernel's layout")


def block_spec(attention_norm, ffn_norm, eps, n_heads, n_kv_heads, head_dim, products):
    """A Block for decode_block: the norms' bf16 weights (dim,), and products (kind, weight,
    scales or None, G, in, out) of q|k|v, wo, w1|w3 and w2 (PRODUCT_KINDS; their modules'
    kernel_product). It points into these tensors, and holds them while it lives."""
    dim, hidden = attention_norm.shape[0], products[3][4]
    shapes = ((dim, (n_heads + 2 * n_kv_heads) * head_dim), (n_heads * head_dim, dim),
              (dim, 2 * hidden), (hidden, dim))
    if not (all(w.dtype == torch.bfloat16 and w.shape == (dim,) and w.is_contiguous()
                for w in (attention_norm, ffn_norm)) and head_dim % 16 == 0 and
            n_heads % n_kv_heads == 0 and all(p[4:] == s for p, s in zip(products, shapes))):
        raise ValueError("decode_block takes bfloat16 (dim,) norms and the products of one "
                         "block, in order: q|k|v, wo, w1|w3, w2")
    for p in products:
        check_product(*p)
    block = Block(attention_norm.data_ptr(), ffn_norm.data_ptr(), eps, dim, n_heads, n_kv_heads,
                  head_dim, hidden, *(Product(PRODUCT_KINDS.index(kind), G, n, out, w.data_ptr(),
                                              None if s is None else s.data_ptr())
                                      for kind, w, s, G, n, out in products))
    block.tensors = [attention_norm, ffn_norm, *(t for p in products for t in p[1:3])]
    return block


def decode_block(block, x, cs, k_cache, v_cache, pos, portable=False):
    """llama.TransformerBlock's one-token step in one call: x (B, 1, dim) bfloat16, RoPE by cs
    (hd / 2, 2) float32 of position pos, the caches (B, max_len, KV, hd) written at pos ->
    (B, 1, dim), with the roundings of the modules' own path (rope_attend_one, rms_norm, swiglu,
    and each product's sums rounded to bf16)."""
    B, T, dim = x.shape
    _, max_len, KV, hd = k_cache.shape
    if not (T == 1 and dim == block.dim and x.dtype == k_cache.dtype == v_cache.dtype ==
            torch.bfloat16 and (KV, hd) == (block.KV, block.hd) and cs.shape == (hd // 2, 2) and
            cs.dtype == torch.float32 and v_cache.shape == k_cache.shape and
            k_cache.shape[0] == B and 0 <= pos < max_len and
            all(t.is_contiguous() and t.device.type == "cpu" for t in (x, cs, k_cache, v_cache))):
        raise ValueError("decode_block takes one token's contiguous bfloat16 (B, 1, dim), (hd / 2,"
                         " 2) float32 cos and sin, and the block's whole (B, max_len, KV, hd) "
                         "caches on the CPU")
    y = torch.empty_like(x)
    if library(portable).decode_block(ctypes.addressof(block), x.data_ptr(), B, cs.data_ptr(),
                                      k_cache.data_ptr(), v_cache.data_ptr(), max_len * KV * hd,
                                      pos, y.data_ptr()):
        raise MemoryError("decode_block: no memory for the activations")
    return y

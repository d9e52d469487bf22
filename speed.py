"""
Speed paths for inference beside llama.py, applied by swapping modules in at one assembly point
(generate.load calls for_inference; train_speed.py holds training's); llama.py itself keeps one
plain path. Each swapped-in module computes what the module it replaces computes (the tests compare
them). One rule for how: an object that keeps its state becomes a subclass in place (its
__class__: other methods; llama.Llama's step and kv_cache too, in StaticDecoding), a module with
state of its own (packed or stacked weights) replaces the old one in its parent. Hooks only add
work beside a module and change none: parallel.py's collectives (as torch's parallelize_module
adds its own) and train_speed.py's hand-back of freed memory.

- Devices and dtypes: the best the machine has unless asked (bf16 on GPUs, float32 on CPUs);
  memory handed back to the OS as weights are converted.
- CPU, bf16 generation (where oneDNN has native bf16 kernels): weights packed once into oneDNN's
  blocked layout (PackedLinear), or with --fast and AVX-512 BF16 without AMX into kernels.c's
  (KernelLinear), wq|wk|wv and w1|w3 as one product each; the memory-mapped
  originals are handed back to the OS as they are packed. Quantized weights are stacked the same
  way and copied onto huge pages.
- CPU, --fast decoding: a one-token step's RoPE, cache writes and attention, its RMSNorms and its
  SwiGLU each one call of kernels.c (KernelAttention, KernelRMSNorm, KernelFeedForward), or torch's
  one-query attention (DecodeAttention) where the C does not build.
- --fast sampling: top-p among the most likely tokens, not a sort of all 128k (top_p_sample).
- GPUs: the one-token decoding step compiled with torch.compile over a static KV cache
  (static_decoding).
- Prefill and training alike: the dtype frozen weights are multiplied in, and reused buffers.
"""

import ctypes
import functools
import math
import weakref
import mmap
import os
import sys
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
import llama


# -----------------------------------------------------------------------------
# Devices and dtypes: the best the machine has, unless asked; a bad --device is one line

def default_device():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype, device):
    """bf16 on GPUs that support it, float16 on other GPUs, float32 on CPU unless asked."""
    if dtype is not None:
        if dtype not in DTYPES:
            raise llama.InputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else torch.float32


def resolve_device(device):
    """--device: cpu, cuda, cuda:N or mps, checked against what this torch can use."""
    try:
        device = torch.device(device or default_device())
    except RuntimeError:
        raise llama.InputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise llama.InputError("--device cuda, but this torch has no CUDA (or no GPU is visible); "
                         "use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise llama.InputError("--device mps, but MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise llama.InputError(f"unsupported device {device}; use cpu, cuda or mps")
    return device


# -----------------------------------------------------------------------------
# Memory: hand pages back to the operating system

def release_freed_memory():
    """glibc keeps the pages of freed blocks for reuse, long after the tensors are gone: hand them
    back."""
    if sys.platform == "linux":
        ctypes.CDLL(None).malloc_trim(0)


def release_pages(t):
    """Drop a memory-mapped tensor's pages (madvise DONTNEED) once nothing will read it again; only
    whole pages inside it are touched. Without this the original stays resident beside its
    converted copy."""
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first and sys.platform == "linux" and t.device.type == "cpu":
        # 4: MADV_DONTNEED
        ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)


def to_device(state_dict, device, dtype):
    """Each weight in dtype on device, dropping the source's pages as soon as it is converted:
    loading bf16 weights as float32 then peaks near the float32 copy alone, not both. Consumes
    state_dict."""
    out = {}
    for key in list(state_dict):
        t = state_dict.pop(key)
        out[key] = t.to(device=device, dtype=dtype)
        if out[key].data_ptr() != t.data_ptr():
            release_pages(t)
    return out


# -----------------------------------------------------------------------------
# CPU bf16 generation: pre-packed weights

@functools.cache
def cpu_has_amx():
    """AMX tiles (Intel Sapphire Rapids and later) multiply bf16 several times faster than
    AVX-512."""
    return bool(getattr(torch._C._cpu, "_init_amx", lambda: False)())


@functools.cache
def bf16_products_fast():
    """Whether bf16 matrix products beat float32 on this CPU: with AMX (Intel), or with AVX-512 BF16
    on AMD (Zen 4 and later), several times over; elsewhere (Intel without AMX) oneDNN's bf16
    products run at about half the float32 rate. From the CPU's flags, so every run of a machine
    takes the same branch (a resumed run then repeats the same arithmetic)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return cpu_has_amx()
    return cpu_has_amx() or ("AuthenticAMD" in info and " avx512_bf16" in info)


# oneDNN's ISAs below AVX512_CORE_BF16 (ONEDNN_MAX_CPU_ISA can cap a CPU at one of them)
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                            "AVX512_CORE_VNNI")


def can_pack(device, dtype):
    """Only where oneDNN multiplies bf16 natively (AVX512_BF16 or AMX): there a packed weight's
    inner product and F.linear's matmul run the same brgemm kernel. Without it they are two other
    gemm kernels, one reading W and one W transposed, whose sums can round differently (and the
    packed layout is the plain one)."""
    cpu = getattr(torch._C._cpu, "_get_cpu_capability", dict)()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    return (device.type == "cpu" and dtype == torch.bfloat16
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            and bool(cpu.get("avx512_bf16") or cpu.get("amx_bf16"))
            and isa not in ONEDNN_ISAS_WITHOUT_BF16)


class PackedLinear(nn.Module):
    """A frozen bf16 Linear for CPU inference, its weight arranged once in oneDNN's blocked layout.
    F.linear re-arranges a bf16 weight on every call, so one-token decoding reads each weight ~1.6x
    over; pre-arranged, it runs near memory bandwidth. Same kernel, same arithmetic: bit-identical
    results, for the weights that packs_like_linear allows."""

    def __init__(self, weight):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


class KernelLinear(nn.Module):
    """A frozen bf16 Linear for --fast CPU inference where the CPU has AVX-512 BF16 but no AMX:
    its rows in blocks of 32 (kernels.bf16_layout, on huge pages), so that kernels.c's product
    reads one stream per block in decoding, where oneDNN's packed matrix-vector product reads well
    below the memory's speed, and keeps up with oneDNN's GEMM in prefill. Sums in float32 in
    another order than F.linear's."""

    def __init__(self, weight):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", kernels.bf16_layout(weight.detach(), kernels.on_huge_pages))

    def forward(self, x):
        y = kernels.bf16_matmul(x.reshape(-1, self.in_features), self.weight, x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def kernel_product(self):  # for kernels.block_spec
        return "bf16", self.weight, None, 0, self.in_features, self.out_features


def kernel_linear(weight):
    """A KernelLinear where the weight comes in whole blocks of 32 rows (every Llama 3 shape
    does), else a PackedLinear."""
    out, n = weight.shape
    return (KernelLinear if out % 32 == 0 and n % 2 == 0 else PackedLinear)(weight)


class FusedProducts(nn.Module):
    """Several Linears that read the same input (wq, wk, wv; w1, w3) as one product of their
    weights stacked (linear: a PackedLinear, or a quantized layer's concat): one pass over the
    input and one call, each output row the same dot product as before. part(i) stands in for
    the i-th Linear."""

    def __init__(self, linear, sizes):
        super().__init__()
        self.linear, self.sizes = linear, sizes
        self.input, self.outputs, self.unread = None, None, set()

    def part(self, i):
        return FusedPart(self, i)

    def compute(self, x, i):
        if x is not self.input or i not in self.unread:
            self.input, self.outputs = x, self.linear(x).split(self.sizes, -1)
            self.unread = set(range(len(self.sizes)))
        out = self.outputs[i]
        self.unread.discard(i)
        if not self.unread:  # every part read: do not hold on to the activations
            self.input = self.outputs = None
        return out


class FusedPart(nn.Module):
    def __init__(self, fused, i):
        super().__init__()
        self.fused, self.i = [fused], i  # a list: the shared module is owned by its first part only

    def forward(self, x):
        return self.fused[0].compute(x, self.i)


ONEDNN_MIN_PRODUCT = 16 ** 3


def packs_like_linear(weight):
    """Whether F.linear multiplies by this weight in oneDNN for every number of rows: a bf16
    product of rows x in x out <= 16**3 multiply-adds takes another kernel, whose sums can round
    differently (on AMX: one value in a tiny model's one-token steps). Meta's F.linear decides
    per call; a packed or fused weight would always be oneDNN's, so smaller weights (only tiny
    models have them) stay plain Linears."""
    return weight.shape[0] * weight.shape[1] > ONEDNN_MIN_PRODUCT


def fuse_products(model, fuse):
    """wq, wk, wv and w1, w3 of every layer as FusedProducts of fuse(linears) (None: left
    apart), one group at a time: peak memory stays near one copy of the weights."""
    for module, names in [(m, n) for layer in model.layers
                          for m, n in ((layer.attention, ("wq", "wk", "wv")),
                                       (layer.feed_forward, ("w1", "w3")))]:
        linears = [getattr(module, n) for n in names]
        stacked = fuse(linears)
        if stacked is None:
            continue
        fused = FusedProducts(stacked, [m.out_features for m in linears])
        for i, (n, m) in enumerate(zip(names, linears)):
            if isinstance(m, nn.Linear):
                release_pages(m.weight)
            setattr(module, n, fused.part(i))
        module.fused_products = fused  # owns the stacked weight
    return model


def packed_stack(linears, linear=PackedLinear):
    """fuse_products' fuse for bf16 Linears: their weights stacked and packed (linear: PackedLinear
    or kernel_linear). Not for quantized layers (they stack with their own concat), nor for small
    weights: fused, one would be multiplied by oneDNN where F.linear is not."""
    if all(type(m) is nn.Linear and packs_like_linear(m.weight) for m in linears):
        return linear(torch.cat([m.weight for m in linears]))
    return None


def quantized_stack(linears):
    """fuse_products' fuse for quantized layers of one kind: their concat (quantize.py's
    Int8Linear, Int4Linear, W8A8Linear, W4A8Linear), rows stacked as they are."""
    kind = type(linears[0])
    if all(type(m) is kind for m in linears) and hasattr(kind, "concat"):
        return kind.concat(linears)
    return None


def pack_for_cpu_inference(model, linear=PackedLinear):
    """Every projection (and the output, a packed copy when tied to the embedding) as packed
    products (linear: PackedLinear or kernel_linear), wq|wk|wv and w1|w3 each as one."""
    fuse_products(model, functools.partial(packed_stack, linear=linear))
    for module, name in llama.projections(model):
        child = getattr(module, name)
        if isinstance(child, nn.Linear) and packs_like_linear(child.weight):
            setattr(module, name, linear(child.weight))
            if child.weight is not model.tok_embeddings.weight:
                release_pages(child.weight)
    return model


# -----------------------------------------------------------------------------
# GPU generation: the one-token step compiled over a static KV cache

class StaticKVCache(llama.KVCache):
    """Writes at a tensor position and returns the whole cache: the same shapes at every step, so
    torch.compile makes one graph for all positions (attention is masked past the position)."""

    def update(self, start_pos, k, v):
        idx = start_pos + torch.arange(k.shape[1], device=k.device)
        self.k.index_copy_(1, idx, k)
        self.v.index_copy_(1, idx, v)
        return self.k, self.v


class StaticDecoding(llama.Llama):
    """A llama.Llama whose decoding step and KV cache have static shapes, the step compiled
    (static_decoding swaps the class in). The cache is kept between generations of the same batch
    size: a new one would mean a new compilation."""

    @contextmanager
    def kv_cache(self, batch_size, max_len):
        model, a = self.model, self.model.args
        w, cache = model.tok_embeddings.weight, model.layers[0].attention.cache
        if cache is None or cache.k.shape[0] != batch_size:
            for layer in model.layers:
                layer.attention.cache = StaticKVCache(batch_size, a.max_seq_len,
                                                      layer.attention.n_kv_heads, a.head_dim,
                                                      w.dtype, w.device)
        yield

    def step(self, tokens, start_pos, last_only=False):
        T, device, S = tokens.shape[1], tokens.device, self.args.max_seq_len
        positions = start_pos + torch.arange(T, device=device)  # (T,)
        mask = torch.arange(S, device=device)[None, :] <= positions[:, None]  # (T, S)
        # prompts are prefilled eagerly: their lengths vary
        forward = self.compiled if T == 1 else self.model
        return forward(tokens, torch.tensor(start_pos, device=device), mask=mask,
                       positions=positions, last_only=last_only)


def static_decoding(generator, compile=True):
    """A llama.Llama as a StaticDecoding, its one-token step compiled with torch.compile (unless
    compile=False: the same static shapes, eager)."""
    model = generator.model
    generator.compiled = torch.compile(model, dynamic=False) if compile else model
    generator.__class__ = StaticDecoding
    return generator


# -----------------------------------------------------------------------------
# CPU --fast decoding: one-token attention, and kernels.c's RoPE, attention, RMSNorm and SwiGLU

class DecodeAttention(llama.Attention):
    """For one-token steps on CPUs (--fast): torch's fused attention kernel takes 0.1-0.7 ms for a
    single query over 100-500 positions, more than the rest of the step's attention. This is
    Meta's arithmetic (scores, float32 softmax, values) with the query heads grouped by their K/V
    head, so K and V are read in place rather than repeated."""

    def attend(self, q, k, v, mask):
        if q.shape[1] > 1 or mask is not None:
            return super().attend(q, k, v, mask)
        return self.attend_one(q, k, v)

    def attend_one(self, q, k, v):
        B, S, n_kv, hd = k.shape
        q = q.reshape(B, n_kv, self.n_heads // n_kv, hd)  # (B, n_kv, n_rep, hd): head kv*n_rep + r
        scores = torch.matmul(q, k.permute(0, 2, 3, 1)) / math.sqrt(hd)  # (B, n_kv, n_rep, S)
        y = torch.matmul(F.softmax(scores.float(), dim=-1).type_as(q), v.transpose(1, 2))
        return y.reshape(B, 1, self.n_heads, hd)  # (B, 1, heads, hd)


class KernelAttention(DecodeAttention):
    """DecodeAttention's one-token step in kernels.c, not the twenty-odd torch ops that each cost
    more than the arithmetic of one query: with wq|wk|wv stacked (fuse_products) and a plain KV
    cache, RoPE, the cache writes and the attention are one call; otherwise the attention is."""

    def forward(self, x, freqs_cis, start_pos, mask):
        fused = getattr(self, "fused_products", None)
        if (x.shape[1] > 1 or mask is not None or fused is None or freqs_cis.dim() != 2 or
                type(self.cache) is not llama.KVCache):
            return super().forward(x, freqs_cis, start_pos, mask)
        cs = torch.view_as_real(freqs_cis[0])  # (head_dim / 2, 2): cos, sin of start_pos
        y = kernels.rope_attend_one(fused.linear(x).to(x.dtype).contiguous(), cs, self.cache.k,
                                    self.cache.v, start_pos, self.n_heads)
        return self.wo(y.view(*x.shape[:2], -1))

    def attend_one(self, q, k, v):
        return kernels.attend_one(q, k, v)


class KernelRMSNorm(llama.RMSNorm):
    """llama.RMSNorm in one call of kernels.c, where the weight has the activations' dtype."""

    def forward(self, x):
        if x.dtype != self.weight.dtype:
            return super().forward(x)
        return kernels.rms_norm(x.contiguous(), self.weight, self.eps)


class KernelFeedForward(llama.FeedForward):
    """SwiGLU of the stacked w1|w3 product in one call of kernels.c (fuse_products)."""

    def forward(self, x):
        fused = getattr(self, "fused_products", None)
        if fused is None:
            return super().forward(x)
        return self.w2(kernels.swiglu(fused.linear(x).to(x.dtype).contiguous()))


# each KernelBlock's kernels.Block: raw pointers, so kept apart from the module (a deepcopy of
# the model must not copy them)
KERNEL_BLOCKS = weakref.WeakKeyDictionary()


class KernelBlock(llama.TransformerBlock):
    """A block's one-token step in one call of kernels.c (kernels.decode_block), where every part
    of it is kernels.c's: bf16 activations, norms and KV cache, and products that multiply in a
    kernel of kernels.c (kernel_product: w4a8, w8a8, bf16 KernelLinear), wq|wk|wv and w1|w3
    stacked. Its roundings are the modules' own, so it gives their output bit for bit without
    their forty-odd Python calls a layer. Any other step is the modules'; so are all while
    one_call is False (bench_profile.py's timers sit on the modules)."""
    one_call = True

    def forward(self, x, freqs_cis, start_pos, mask):
        block = self.kernel_block(x, freqs_cis, mask) if self.one_call else None
        if block is None:
            return super().forward(x, freqs_cis, start_pos, mask)
        cache = self.attention.cache
        return kernels.decode_block(block, x, torch.view_as_real(freqs_cis[0]), cache.k, cache.v,
                                    start_pos)

    def kernel_block(self, x, freqs_cis, mask):
        """The kernels.Block of this block's weights (made once, again if a weight moved), or
        None where the step is not one decode_block takes."""
        a, f = self.attention, self.feed_forward
        stacks = [getattr(m, "fused_products", None) for m in (a, f)]
        if (x.shape[1] > 1 or mask is not None or x.dtype != torch.bfloat16 or None in stacks or
                freqs_cis.dim() != 2 or type(a.cache) is not llama.KVCache):
            return None
        products, norms = (stacks[0].linear, a.wo, stacks[1].linear, f.w2), (
            self.attention_norm, self.ffn_norm)
        if not (all(hasattr(m, "kernel_product") and x.shape[0] <= getattr(
                m, "kernel_max_rows", x.shape[0]) for m in products) and
                all(type(m) in (llama.RMSNorm, KernelRMSNorm) for m in norms) and
                norms[0].eps == norms[1].eps):
            return None
        key = [n.weight.data_ptr() for n in norms] + [m.kernel_product()[1].data_ptr()
                                                      for m in products]
        block = KERNEL_BLOCKS.get(self)
        if block is None or block.key != key:
            block = KERNEL_BLOCKS[self] = kernels.block_spec(
                norms[0].weight, norms[1].weight, norms[0].eps, a.n_heads, a.n_kv_heads,
                a.head_dim, [m.kernel_product() for m in products])
            block.key = key
        return block


def decode_kernels(model, dtype):
    """--fast on CPUs: the modules of a decoding step as kernels.c's where it builds here (for
    bf16 and float32), else torch's one-query attention (DecodeAttention)."""
    kernel = (dtype in kernels.ATTEND_DTYPES and model.args.head_dim % 16 == 0 and
              kernels.available())
    swaps = {llama.Attention: KernelAttention if kernel else DecodeAttention}
    if kernel:
        swaps.update({llama.RMSNorm: KernelRMSNorm, llama.FeedForward: KernelFeedForward,
                      llama.TransformerBlock: KernelBlock})
    for module in model.modules():
        if type(module) in swaps:
            module.__class__ = swaps[type(module)]


# -----------------------------------------------------------------------------
# --fast sampling: top-p without sorting the whole vocabulary

def top_p_sample(logits, temperature, top_p, top_k=0, generator=None, candidates=1024):
    """llama.sample's distribution, from other random draws: the nucleus (top-p) is looked for
    among the most likely tokens (torch.topk), and all 128k are sorted, as Meta's code sorts them
    on every step, only when some row's nucleus is wider than that. Greedy and top-k sampling are
    llama.sample's own."""
    if temperature == 0 or top_k:
        return llama.sample(logits, temperature, top_p, top_k, generator)
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, vocab)
    top, idx = torch.topk(probs, min(candidates, probs.shape[-1]), dim=-1)  # (B, candidates)
    if (top.sum(-1) <= top_p).any():  # the nucleus reaches past the candidates
        return llama.sample_top_p(probs, top_p, generator).reshape(-1)
    return torch.gather(idx, -1, llama.sample_top_p(top, top_p, generator)).reshape(-1)


# -----------------------------------------------------------------------------
# The assembly point: every inference speed path that applies on this device

def for_inference(model, device, dtype, compile=False):
    """The inference speed paths that apply on this device: on CPUs, packed weights for bf16 (not
    with compile: torch.compile cannot trace oneDNN's packed layout), wq|wk|wv and w1|w3 of
    quantized layers each as one product, and one-token attention without the fused kernel where
    the model uses it (--fast), with kernels.c's bf16 product where the CPU has AVX-512 BF16 and
    no AMX."""
    if can_pack(torch.device(device), dtype) and not compile:
        # AMX's tiles multiply far faster than AVX-512: with them, oneDNN's product for prefill
        fast = (model.args.fused_attention and kernels.available() and kernels.has_bf16dot() and
                not cpu_has_amx())
        pack_for_cpu_inference(model, kernel_linear if fast else PackedLinear)
    if torch.device(device).type == "cpu" and not compile:
        fuse_products(model, quantized_stack)
        for module in model.modules():  # quantized weights (buffers), each read once a step
            for name, b in module.named_buffers(recurse=False):
                if b.dtype in (torch.uint8, torch.int8):
                    setattr(module, name, kernels.on_huge_pages(b))
        release_freed_memory()  # the copies' originals
        if model.args.fused_attention:  # --fast (the C is built only then)
            decode_kernels(model, dtype)
    return model


# -----------------------------------------------------------------------------
# Products of frozen weights beyond the kernels' few rows (prefill, training): their dtype and
# reused buffers (quantize.py's slices; train_speed.py's Functions)

def matmul_dtype(x):
    """The dtype to multiply frozen weights in: float32 for bf16/fp16 on CPUs where bf16 products
    are slow (bf16_products_fast); x's own elsewhere. Both accumulate in float32."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
        return x.dtype
    return x.dtype if bf16_products_fast() else torch.float32


class Scratch:
    """Buffers reused by every call with the same slot name ("weight", "in", "out", "x_a", and
    quantize.py's "dequantized" ones): each holds one value at a time, which the caller consumes
    before asking for the slot again. Fresh 16-67 MB
    float32 temporaries would each cost page faults and heap growth."""
    buffers = {}

    @classmethod
    def get(cls, slot, shape, dtype, device):
        n, buf = math.prod(shape), cls.buffers.get(slot)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = cls.buffers[slot] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    @classmethod
    def upcast(cls, t, dtype, slot="weight"):
        return t if t.dtype == dtype else cls.get(slot, t.shape, dtype, t.device).copy_(t)


def needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

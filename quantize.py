"""
Weight-only quantization: int8 per output channel, int4 per group of inputs.

    python quantize.py --ckpt_dir DIR --mode int4    # once: DIR/model-int4-g32.safetensors
    python generate.py --ckpt_dir DIR --quantize int4 --prompt "Hi"   # reads it (or quantizes)

    model = quantize_model(model, "int4", group_size=32)  # swaps modules; llama.py is unchanged
    save_quantized(model, "model-int4.safetensors")  # the next start skips quantizing
    model = load_quantized(meta_model, "model-int4.safetensors")

As in gpt-fast's quantize.py, the model is built as usual and its Linear modules are then swapped:
every projection (wq wk wv wo w1 w2 w3) and the output layer; the embedding and the norms stay as
they are. The quantized modules are frozen, but gradients flow through them to their input, so
LoRA adapters can be trained on a quantized base (QLoRA).

Products of a few rows (decoding) run torch's CPU int8 and int4 kernels; they take bfloat16
activations, so float32 ones are rounded to bfloat16 there. Longer products (prefill, training)
dequantize a slice of rows at a time into a reused buffer. For QLoRA,
train_speed.for_training swaps in a LoRA layer over these bases whose backward keeps no float32 copies
of its input (it calls their product and input_grad).
--quantize w8a8 and w4a8 round the activations to int8 too and multiply integers by integers in
kernels.c's C kernel: faster than int8 and int4, at some precision (W8A8Linear, W4A8Linear).
On CUDA (untested here) int4 runs forward only: its tinygemm layout is not read back, so int4 on
CUDA neither trains nor saves (int8 does).
"""

import argparse
import sys
from functools import cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import checkpoints
import kernels
import llama
import speed

FORMATS = ("int8", "int4")  # what the files hold and what trains
# w8a8 / w4a8: the int8 / int4 weights (their files), multiplied with int8 activations; CPUs
MODES = FORMATS + ("w8a8", "w4a8")
GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 kernels take
W4A8_GROUP_SIZES = (32, 64, 128)  # kernels.c's (groups of 64: 4.5 bits a weight, as Q4_0)
# Weights are quantized, packed and dequantized a slice of rows at a time (row_slices): about
# SLICE_ELEMENTS weights, a multiple of 64 rows (the CPU int4 kernel's block), so that the float
# temporaries of a slice stay in the CPU's caches.
SLICE_ELEMENTS = 2**20
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# -----------------------------------------------------------------------------
# 1. Quantizers
# int8: symmetric per output row, w ~ q * scale, q in [-127, 127], scale in float32.
# int4: asymmetric per group of group_size inputs, w ~ (q - 8) * scale + zero, q in [0, 15]: the
# convention of torch's int4 kernels (tinygemm's), which read scale and zero in bfloat16. They are
# rounded to bfloat16 before q is computed, so that q is the best fit for the stored values.
# These are the portable forms, the ones written to files; kernels.py arranges them for a kernel.


def row_slices(out_features, in_features):
    """[(start, end), ...]: the slices of rows that cover a weight (out_features, in_features)."""
    rows = max(64, SLICE_ELEMENTS // in_features // 64 * 64)
    return [(r, min(r + rows, out_features)) for r in range(0, out_features, rows)]


def quantize_int8(w, absmax=None):
    """w (out, in) float -> q (out, in) int8, scales (out,) float32. absmax: each row's largest
    |w|, if not w's own (a row split over processes shares one)."""
    w = w.float()
    scales = (w.abs().amax(1) if absmax is None else absmax).clamp(min=1e-12) / 127  # (out,)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q, scales, dtype=torch.float32, out=None):
    """q * scale (out, in), computed in float32; into out if given."""
    return torch.mul(q, scales[:, None], out=out).to(dtype)


def quantize_int4(w, group_size):
    """w (out, in) float -> q (out, in) uint8 in [0, 15]; scales, zeros (out, groups) bfloat16."""
    out, n_in = w.shape
    g = w.float().view(out, n_in // group_size, group_size)  # (out, groups, group_size)
    lo, hi = g.amin(-1), g.amax(-1)  # (out, groups)
    scales = ((hi - lo).clamp(min=1e-12) / 15).bfloat16()
    zeros = (lo + 8 * scales.float()).bfloat16()  # the value that q = 8 stands for
    s, z = scales.float()[..., None], zeros.float()[..., None]
    q = torch.round((g - z) / s + 8).clamp(0, 15).to(torch.uint8)
    return q.view(out, n_in), scales, zeros


def dequantize_int4(q, scales, zeros, dtype=torch.float32, out=None):
    """(q - 8) s + z (out, in), computed in float32; into out (float32) if given. In place, one
    dtype: vectorized passes (mixed-dtype arithmetic is not)."""
    s = scales.float()[..., None]  # (out, groups, 1)
    w = torch.empty(q.shape, device=q.device) if out is None else out
    w.copy_(q).view(len(q), s.shape[1], -1).mul_(s).add_(zeros.float()[..., None] - 8 * s)
    return w.to(dtype)


def pack_nibbles(q):
    """(out, in) values in [0, 15] -> (out, in / 2) uint8, even inputs in the low nibbles."""
    return q[:, ::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p):
    return torch.stack([p & 15, p >> 4], -1).view(p.shape[0], -1)  # (out, in)


# -----------------------------------------------------------------------------
# 2. Quantized linear layers
# y = x W^T with W frozen. The backward pass gives dx = dy W only (the adapters of QLoRA train, W
# does not), summed over slices of dequantized rows: no float copy of the whole weight is made.


class QuantizedProduct(torch.autograd.Function):
    """module.product(x), with dx = dy W (module.input_grad) as the backward pass."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return module.product(x)

    @staticmethod
    def backward(ctx, dy):
        return ctx.module.input_grad(dy), None


class QuantizedLinear(nn.Module):
    """A frozen, bias-free Linear with a quantized weight. Subclasses give kernel(x) -> (rows, out)
    for x (rows, in), and dequantize(start, end, dtype) -> rows start:end of the weight,
    dequantized(...) the same in a reused buffer.
    The CPU kernels are faster for a few rows (decoding); for more (prefill, training) each slice of
    rows is dequantized into a reused buffer and multiplied in speed.matmul_dtype (bf16 where the
    CPU multiplies it fast). kernel_max_rows is about where they cross on an AVX-512 CPU."""

    def forward(self, x):  # autograd's Function only where a gradient flows: not in generation
        return QuantizedProduct.apply(x, self) if speed.needs_grad(x) else self.product(x)

    def product(self, x):
        x2 = x.reshape(-1, self.in_features)  # (tokens, in)
        few = len(x2) <= self.kernel_max_rows and x.dtype in KERNEL_DTYPES
        if x.is_cuda or few:
            return self.kernel(x2).to(x.dtype).view(*x.shape[:-1], self.out_features)
        c = speed.matmul_dtype(x)
        xc, y = x2.to(c), torch.empty(len(x2), self.out_features, dtype=c, device=x.device)
        for a, b in row_slices(self.out_features, self.in_features):
            torch.mm(xc, self.dequantized(a, b, c).t(), out=y[:, a:b])
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    @classmethod
    def concat(cls, layers):
        """One layer of the layers' rows stacked, the same products (for speed.fuse_products:
        wq|wk|wv as one call): the kernel's buffers joined as they are where their rows stack
        (row_dims), else built again from the portable forms, which always do."""
        dims = cls.row_dims(layers)
        if dims is None:
            parts = [m.portable() for m in layers]
            return cls.from_portable({k: torch.cat([p[k] for p in parts]) for k in parts[0]},
                                     layers[0].group_size)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.out_features = sum(m.out_features for m in layers)
        new.in_features, new.group_size = layers[0].in_features, layers[0].group_size
        for name, dim in dims.items():
            new.register_buffer(name, torch.cat([getattr(m, name) for m in layers], dim))
        return new

    @classmethod
    def row_dims(cls, layers):  # {buffer: the dimension of its rows} if they stack, else None
        return None

    def input_grad(self, dy):
        """dx = dy W, summed in float32 (or dy's wider dtype) over slices of dequantized rows, each
        slice's product in speed.matmul_dtype: no float copy of the whole weight is made."""
        shape, dtype, c = dy.shape, dy.dtype, speed.matmul_dtype(dy)
        dy = dy.reshape(-1, shape[-1]).to(c)  # (tokens, out)
        acc = torch.promote_types(c, torch.float32)
        dx = torch.zeros(len(dy), self.in_features, dtype=acc, device=dy.device)  # (tokens, in)
        part = speed.Scratch.get("quantized dx", dx.shape, c, dy.device) if c != acc else None
        for a, b in row_slices(self.out_features, self.in_features):
            if part is None:
                dx.addmm_(dy[:, a:b], self.dequantized(a, b, c))
            else:  # bf16 products, summed in float32
                dx += torch.mm(dy[:, a:b], self.dequantized(a, b, c), out=part)
        return dx.to(dtype).view(*shape[:-1], -1)

    def scratch(self, start, end, dtype, slot="dequantized"):
        """A buffer for rows start:end of the dequantized weight, reused by the next call (a slice
        is 2^20 weights, a few megabytes: fresh buffers would cost page faults and fragment the
        heap)."""
        shape = (min(end, self.out_features) - start, self.in_features)
        return speed.Scratch.get(slot, shape, dtype, self.qweight.device)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Linear(QuantizedLinear):
    mode, group_size, kernel_max_rows = "int8", None, 32

    def __init__(self, qweight, scales):
        """qweight (out, in) int8, scales (out,) float32."""
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        # The CPU kernel loads 16 inputs at a time from aligned addresses, and crashes otherwise:
        # it needs a multiple of 16 inputs (check_shape), and a copy of a tensor read at any offset
        # of a file.
        aligned = qweight.data_ptr() % 64 == 0
        self.register_buffer("qweight", qweight if aligned else qweight.clone())
        self.register_buffer("scales", scales)

    @classmethod
    def from_float(cls, weight, absmax=None):
        q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)  # (out, in)
        scales = torch.empty(len(weight), device=weight.device)  # (out,)
        for a, b in row_slices(*weight.shape):
            q[a:b], scales[a:b] = quantize_int8(weight[a:b].detach(),
                                                None if absmax is None else absmax[a:b])
        return cls(q, scales)

    @classmethod
    def from_portable(cls, tensors, group_size=None):
        return cls(tensors["qweight"], tensors["scales"])

    def portable(self):
        return {"qweight": self.qweight, "scales": self.scales}

    def kernel(self, x):
        if x.is_cuda:  # gpt-fast: torch.compile fuses the conversion into the product
            return F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        return kernels.int8_matmul(x, self.qweight, self.scales)

    def dequantize(self, start=0, end=None, dtype=torch.float32, out=None):
        return dequantize_int8(self.qweight[start:end], self.scales[start:end], dtype, out)

    def dequantized(self, start, end, dtype):  # dequantize, into scratch: one pass
        return self.dequantize(start, end, dtype, out=self.scratch(start, end, dtype))


class Int4Linear(QuantizedLinear):
    mode, kernel_max_rows = "int4", 128

    def __init__(self, q, scales, zeros, group_size):
        """q (out, in) uint8 in [0, 15]; scales, zeros (out, in // group_size) bfloat16; all on the
        device to run on (the packing depends on it)."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.register_buffer("qweight", kernels.pack_int4(q, row_slices(*q.shape)))
        # (groups, out, 2): the kernels' arrangement of scales and zeros
        sz = torch.stack([scales, zeros], -1).transpose(0, 1)
        self.register_buffer("scales_and_zeros", sz.contiguous())

    @classmethod
    def from_float(cls, weight, group_size):
        out, n_in = weight.shape
        q = torch.empty(out, n_in, dtype=torch.uint8, device=weight.device)
        scales, zeros = (torch.empty(out, n_in // group_size, dtype=torch.bfloat16,
                                     device=weight.device) for _ in range(2))  # (out, groups)
        for a, b in row_slices(out, n_in):
            q[a:b], scales[a:b], zeros[a:b] = quantize_int4(weight[a:b].detach(), group_size)
        return cls(q, scales, zeros, group_size)

    @classmethod
    def from_portable(cls, tensors, group_size):
        q = unpack_nibbles(tensors["qweight"])
        return cls(q, tensors["scales"], tensors["zeros"], group_size)

    def portable(self):
        slices = row_slices(self.out_features, self.in_features)
        q = torch.cat([pack_nibbles(self.unpack(a, b)) for a, b in slices])  # (out, in / 2)
        s, z = self.scales_and_zeros.transpose(0, 1).unbind(-1)  # (out, groups) each
        return {"qweight": q, "scales": s.contiguous(), "zeros": z.contiguous()}

    @classmethod
    def row_dims(cls, layers):  # the CPU layout's blocks of rows are independent (kernels.py)
        whole = all(m.out_features % kernels.cpu_int4_layout()[0] == 0 for m in layers[:-1])
        cpu = not any(m.qweight.is_cuda for m in layers)
        return {"qweight": 0, "scales_and_zeros": 1} if whole and cpu else None

    def kernel(self, x):
        return kernels.int4_matmul(x, self.qweight, self.group_size, self.scales_and_zeros)

    def unpack(self, start, end):
        if self.qweight.is_cuda:
            raise NotImplementedError("reading back a CUDA int4 weight (backward pass, saving) is "
                                      "not supported; quantize and save on the CPU, or use int8")
        layout = kernels.cpu_int4_layout()
        return kernels.unpack_cpu_int4(self.qweight[start:end], *layout)  # (rows, in)

    def dequantize(self, start=0, end=None, dtype=torch.float32, out=None):
        """Rows start:end (start a multiple of 64, as in row_slices); into out, float32, if
        given."""
        end = self.out_features if end is None else min(end, self.out_features)
        s, z = self.scales_and_zeros[:, start:end].transpose(0, 1).unbind(-1)  # (rows, groups)
        return dequantize_int4(self.unpack(start, end), s, z, dtype, out)

    def dequantized(self, start, end, dtype):  # dequantize, into scratch (float32, then dtype)
        w32 = self.scratch(start, end, torch.float32, "dequantized float32")
        w = self.dequantize(start, end, out=w32)
        return w if dtype == torch.float32 else self.scratch(start, end, dtype).copy_(w)


@cache
def vnni_kernel_max_rows():  # once: the CPU's flags do not change
    """w8a8's and w4a8's kernels multiply every row (prefill too) on AVX-512 VNNI CPUs, unless
    AMX's bf16 products of dequantized slices beat them; else only decoding's few rows."""
    return 16 if speed.cpu_has_amx() or not kernels.has_vnni() else 1 << 62


def _kernel_rows(layer):
    return layer.__dict__.get("max_rows", vnni_kernel_max_rows())


def _set_kernel_rows(layer, rows):  # (bench.py measures the kernel's rounding on every row)
    layer.__dict__["max_rows"] = rows


KERNEL_ROWS = property(_kernel_rows, _set_kernel_rows)  # kernel_max_rows of w8a8 and w4a8


class W8A8Linear(Int8Linear):
    """An int8 weight (Int8Linear's, per output row) times int8 activations, by kernels.c's
    kernel: each token's row of x is rounded to integers on its own scale (its largest value
    becomes 127), multiplied by the weight into int32 with the CPU's integer dot products, and
    the two scales apply to the sums. No weight is converted to float, so it is faster than
    weight-only int8 in decoding and in prefill; the activations lose precision (as llama.cpp's
    Q8_0 and torchao's int8dq do). Built from int8 weights as Int8Linear is (from_float,
    from_portable); the file it saves is the int8 one."""
    mode, kernel_max_rows = "w8a8", KERNEL_ROWS

    def __init__(self, qweight, scales):
        nn.Module.__init__(self)
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", kernels.w8a8_layout(qweight))  # (out / 4, in * 4)
        self.register_buffer("scales", scales.float().contiguous())  # (out,)

    @classmethod
    def row_dims(cls, layers):  # each block of 4 rows on its own
        return {"qweight": 0, "scales": 0}

    def kernel(self, x):
        return kernels.w8a8_matmul(x, self.qweight, self.scales)

    def kernel_product(self):  # for kernels.block_spec
        return "w8a8", self.qweight, self.scales, 0, self.in_features, self.out_features

    def dequantize(self, start=0, end=None, dtype=torch.float32, out=None):  # start: rows of 4
        end = self.out_features if end is None else min(end, self.out_features)
        q = kernels.w8a8_unlayout(self.qweight[start // 4:end // 4])
        return dequantize_int8(q, self.scales[start:end], dtype, out)

    def portable(self):
        return {"qweight": kernels.w8a8_unlayout(self.qweight), "scales": self.scales}


class W4A8Linear(Int4Linear):
    """An int4 weight (Int4Linear's groups, scale and zero) times int8 activations, rounded per
    group of inputs, by kernels.c's kernel: integer dot products (AVX-512 VNNI) where torch's
    int4 kernel converts weights to float. Backward passes, and prefill where the kernel does not
    take it (KERNEL_ROWS), dequantize slices as every QuantizedLinear does, from the same bytes:
    one buffer, blocks of 4 rows with their scales and zeros inline (kernels.w4a8_layout). Built
    from int4 weights as Int4Linear is (from_float, from_portable)."""
    mode, kernel_max_rows = "w4a8", KERNEL_ROWS

    def __init__(self, q, scales, zeros, group_size=32):
        nn.Module.__init__(self)
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.register_buffer("qweight", kernels.w4a8_layout(q, scales, zeros, group_size))

    @classmethod
    def row_dims(cls, layers):  # each block of 4 rows on its own
        return {"qweight": 0}

    def kernel(self, x):
        return kernels.w4a8_matmul(x, self.qweight, self.group_size)

    def kernel_product(self):  # for kernels.block_spec
        return "w4a8", self.qweight, None, self.group_size, self.in_features, self.out_features

    def unpacked(self, start=0, end=None):  # rows start:end (multiples of 4): q, scales, zeros
        end = self.out_features if end is None else min(end, self.out_features)
        return kernels.w4a8_unlayout(self.qweight[start // 4:end // 4], self.in_features,
                                     self.group_size)

    def unpack(self, start, end):  # (rows, in): as Int4Linear's
        return self.unpacked(start, end)[0]

    def dequantize(self, start=0, end=None, dtype=torch.float32, out=None):
        end = self.out_features if end is None else min(end, self.out_features)
        w = kernels.w4a8_dequantize(self.qweight[start // 4:end // 4], self.in_features,
                                    self.group_size, out)
        return w.to(dtype)

    def portable(self):  # the int4 file's form
        q, s, z = self.unpacked()
        return {"qweight": pack_nibbles(q), "scales": s, "zeros": z}


# -----------------------------------------------------------------------------
# 3. Swapping the modules of a model
# Each weight is quantized and its Linear replaced before the next one is read, so the float
# weights go one at a time: peak memory stays near the quantized model plus one float layer.
# Every shape is checked first: a bad setting fails before anything is changed.


def check_settings(mode, group_size):
    if mode not in MODES:
        raise llama.InputError(f"unknown quantization {mode!r}; use one of {', '.join(MODES)}")
    if mode == "w4a8" and group_size not in W4A8_GROUP_SIZES:
        raise llama.InputError(f"w4a8 multiplies int4 groups of 32, 64 or 128, not "
                               f"{group_size!r}; use --group_size 32")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise llama.InputError(f"int4 group size {group_size!r} is not supported; "
                               f"use one of {', '.join(map(str, GROUP_SIZES))}")


def weights_format(mode):
    """The weights a mode multiplies: w8a8 those of int8, w4a8 those of int4."""
    return {"w8a8": "int8", "w4a8": "int4"}.get(mode, mode)


def check_shape(name, out_features, in_features, mode, group_size):
    if mode in ("w8a8", "w4a8") and in_features % 64:
        raise llama.InputError(f"{name}: {mode} needs a multiple of 64 inputs, got {in_features}; "
                               f"use {weights_format(mode)}")
    if mode == "w8a8" and out_features % 4:
        raise llama.InputError(f"{name}: w8a8 needs a multiple of 4 output rows, got "
                               f"{out_features}; use int8")
    mode = weights_format(mode)
    if mode == "int8" and in_features % 16:
        raise llama.InputError(f"{name}: int8 needs a multiple of 16 inputs, got {in_features}")
    if mode == "int4" and in_features % group_size:
        raise llama.InputError(f"{name}: {in_features} inputs do not split into int4 groups of "
                               f"{group_size}; choose a group size that divides {in_features}")
    if mode == "int4" and out_features % 16:
        raise llama.InputError(f"{name}: int4 needs a multiple of 16 output rows, got "
                               f"{out_features}; use int8")


def weight_slots(model):
    """(name, parent, attribute) of every weight to quantize: llama.projections, named as in the
    state dict; a LoRALinear's base is the slot."""
    names = {id(m): n for n, m in model.named_modules()}
    slots = [(f"{names[id(parent)]}.{attr}".lstrip("."), parent, attr)
             for parent, attr in llama.projections(model)]
    return [(f"{name}.base", getattr(parent, attr), "base")
            if isinstance(getattr(parent, attr), llama.LoRALinear) else (name, parent, attr)
            for name, parent, attr in slots]


def slot_weight(parent, attr):
    module = getattr(parent, attr)
    return module.weight if isinstance(module, nn.Linear) else None


def quantize_model(model, mode, group_size=32, release=None, output=True, absmax=None):
    """Replace every projection (and, with output=True, the output layer) by an Int8Linear,
    Int4Linear or W8A8Linear. release(w), if given, is called on each float weight once it is
    quantized (speed.release_pages hands a memory-mapped weight's pages back to the OS).
    absmax(name, weight), if given, gives the rows' largest |w| for int8's scales (or None)."""
    check_settings(mode, group_size)
    check_device(mode, model.tok_embeddings.weight.device)
    slots = [s for s in weight_slots(model) if output or s[0] != "output"]
    for name, parent, attr in slots:
        check_slot(model, name, parent, attr, mode, group_size)
    for name, parent, attr in slots:
        weight = slot_weight(parent, attr)
        layer = (LAYERS[mode].from_float(weight, group_size) if weights_format(mode) == "int4"
                 else LAYERS[mode].from_float(weight, absmax and absmax(name, weight)))
        setattr(parent, attr, layer)
        if release and weight is not model.tok_embeddings.weight:
            release(weight)
        del weight  # the float weight goes with its Linear
    return model


LAYERS = {"int8": Int8Linear, "int4": Int4Linear, "w8a8": W8A8Linear, "w4a8": W4A8Linear}


def check_device(mode, device, compile=False, training=False):
    """Where each mode runs: w8a8 and w4a8 eagerly on CPUs (a C kernel); int4 trains on CPUs only
    (its CUDA layout is not read back for the backward pass)."""
    if mode == "int4" and training and torch.device(device).type == "cuda":
        raise llama.InputError("int4 on CUDA runs forward only (its packed layout is not read back "
                               "for the backward pass): use --quantize int8 to train on a GPU")
    if mode in ("w8a8", "w4a8") and torch.device(device).type != "cpu":
        raise llama.InputError(f"{mode} runs on CPUs (integer dot products); on a GPU use "
                               "--quantize int8 or int4")
    if mode in ("w8a8", "w4a8") and compile:
        raise llama.InputError(f"torch.compile cannot trace {mode}'s CPU kernels; drop "
                               "--compile (it is for GPUs)")
    if mode in ("w8a8", "w4a8"):
        kernels.library()  # built once (a second), or a one-line error now


def check_slot(model, name, parent, attr, mode, group_size):
    weight = slot_weight(parent, attr)
    if weight is None:
        kind = type(getattr(parent, attr)).__name__
        raise llama.InputError(f"{name} is a {kind}, not a Linear; quantize the model right after "
                               f"loading it")
    check_shape(name, *weight.shape, mode, group_size)


# -----------------------------------------------------------------------------
# 4. Files
# One safetensors file holds the whole model: the float tensors as they are, and for each quantized
# layer its portable form (int8 weight and scales; int4 nibbles, two a byte, scales and zeros),
# with {"quantize": mode, "group_size": ...} as metadata, written whole or not at all
# (llama.atomic_file).


def float_state(model):
    """The model's state dict less the quantized layers' buffers (which have a portable form)."""
    layers = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    return {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in layers}


def save_quantized(model, path):
    """Write a quantized model to one safetensors file, for load_quantized."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    settings = {(weights_format(m.mode), m.group_size) for m in layers.values()}
    if len(settings) != 1:
        kind = "mixed" if settings else "no"
        raise llama.InputError(f"the model has {kind} quantized layers; run quantize_model(model, "
                               f"mode) once before saving")
    (mode, group_size), = settings
    tensors = {k: v.contiguous() for k, v in float_state(model).items()}
    for name, m in layers.items():
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in m.portable().items()})
    with llama.atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={"quantize": mode, "group_size": str(group_size)})


def load_quantized(model, path, device="cpu", mode=None):
    """Load a save_quantized file into model (a Transformer of the same config, best built on the
    meta device: nothing is allocated twice); the quantized modules are swapped in and packed for
    device. Tensors are read a layer at a time, so memory stays near the quantized size. mode
    "w8a8" reads an int8 file and multiplies with int8 activations."""
    check_device(mode, device)
    try:
        f = safe_open(path, "pt", device="cpu")
        meta, keys = f.metadata() or {}, set(f.keys())
    except Exception as e:
        raise llama.InputError(f"cannot read {path}: {str(e).splitlines()[0]}; is it a complete "
                               f"safetensors file?") from None
    if meta.get("quantize") not in FORMATS:
        raise llama.InputError(f"{path} is not a quantized model; write one with save_quantized")
    if mode and weights_format(mode) != meta["quantize"]:
        raise llama.InputError(f"{path} holds {meta['quantize']} weights, not {mode}'s; use "
                               f"--quantize {meta['quantize']}, or quantize.py --mode "
                               f"{weights_format(mode)} for a file of those")
    group_size = meta.get("group_size", "None")
    group_size = None if group_size == "None" else int(group_size)
    if mode == "w4a8":
        check_settings(mode, group_size)
    quantized = LAYERS[mode or meta["quantize"]]
    slots = weight_slots(model)
    for name, parent, attr in slots:
        if f"{name}.qweight" not in keys:
            raise llama.InputError(f"{path} has no quantized {name}; it holds another model")
        weight = slot_weight(parent, attr)
        rows, cols = f.get_slice(f"{name}.qweight").get_shape()
        shape = (rows, cols * (1 if meta["quantize"] == "int8" else 2))  # int4: 2 a byte
        if weight is not None and tuple(weight.shape) != shape:
            raise llama.InputError(f"{name} is {tuple(weight.shape)} in the model but {shape} in "
                                   f"{path}; the config does not match")
        check_shape(name, *shape, mode or meta["quantize"], group_size)  # what kernels take
    for name, parent, attr in slots:
        part = {k: f.get_tensor(f"{name}.{k}").to(device) for k in ("qweight", "scales", "zeros")
                if f"{name}.{k}" in keys}
        keys -= {f"{name}.{k}" for k in part}
        layer = quantized.from_portable(part, group_size)
        kept = {b.data_ptr() for b in layer.buffers()}
        for t in part.values():  # copied or repacked into the layer: the file's pages go back
            if t.data_ptr() not in kept:
                speed.release_pages(t)
        setattr(parent, attr, layer)
    expected = set(float_state(model))
    if expected != keys:
        missing, unexpected = sorted(expected - keys), sorted(keys - expected)
        raise llama.InputError(f"{path} does not match the model: missing {missing[:4]}, "
                               f"unexpected {unexpected[:4]}")
    model.load_state_dict({k: f.get_tensor(k).to(device) for k in keys}, strict=False, assign=True)
    if model.freqs_cis.is_meta:  # a buffer computed at construction, not stored
        model.freqs_cis = llama.precompute_freqs_cis(model.args, device)
    return model.eval()


# -----------------------------------------------------------------------------
# 5. Command line: quantize a checkpoint once, so that generate.py --quantize starts quickly.

def saved_path(ckpt_dir, mode, group_size=32):
    """Where the command line saves a checkpoint's quantized weights, and generate.py looks."""
    suffix = f"-g{group_size}" if weights_format(mode) == "int4" else ""
    return Path(ckpt_dir) / f"model-{weights_format(mode)}{suffix}.safetensors"


def main(argv=None):
    p = argparse.ArgumentParser(description="Quantize a checkpoint's weights once, into "
                                "CKPT_DIR/model-MODE.safetensors, which generate.py --quantize "
                                "reads.")
    p.add_argument("--ckpt_dir", required=True, help="a checkpoint in either layout")
    p.add_argument("--mode", choices=FORMATS, default="int4",
                   help="(default int4; w8a8 reads the int8 file)")
    p.add_argument("--group_size", type=int, choices=GROUP_SIZES, default=32,
                   help="inputs per int4 scale (default 32)")
    a = p.parse_args(argv)
    check_settings(a.mode, a.group_size)
    args, state_dict = checkpoints.load_checkpoint(a.ckpt_dir)
    dtype = torch.bfloat16  # the kernels' dtype; Meta ships bf16, so nothing is lost
    model = llama.build_model(args, speed.to_device(state_dict, "cpu", dtype), "cpu", dtype)
    llama.log(f"quantizing to {a.mode} ...")
    quantize_model(model, a.mode, a.group_size, release=speed.release_pages)
    save_quantized(model, saved_path(a.ckpt_dir, a.mode, a.group_size))
    llama.log(f"saved {saved_path(a.ckpt_dir, a.mode, a.group_size)}")


if __name__ == "__main__":
    try:
        main()
    except llama.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

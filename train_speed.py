"""
Speed paths for training, beside llama.py, swapped in at one assembly point (finetune.py calls
for_training) as speed.py's are for inference: each module keeps its parameters and its forward
arithmetic, and only the backward is written out (the tests compare them with llama.py's modules).

- CPU: products with frozen bf16 weights run in float32 where bf16 products are slow (no AMX,
  speed.matmul_dtype); RMSNorm, SwiGLU and LoRA backwards written out so that no float32 copy of
  an activation is kept; LoRA over quantize.py's layers through their product and input_grad; the
  output layer's cross-entropy a chunk at a time, never holding the (tokens, vocab) logits; freed
  memory handed back to the OS before each step.
- Anywhere: activation checkpointing, a block at a time (CheckpointedBlock).
- GPU: compiled flex attention for packed documents skips their masked-out blocks.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import llama
from speed import Scratch, matmul_dtype, needs_grad, release_freed_memory

# -----------------------------------------------------------------------------
# Training on CPUs: lean autograd Functions. Each keeps for backward only what its backward needs.

def flat(t):
    return t.reshape(-1, t.shape[-1])  # (..., n) -> (rows, n)



class RMSNormFunction(torch.autograd.Function):
    """llama.RMSNorm's forward, ops unchanged, with its backward written out: it keeps x and one
    number per row, not autograd's float32 copy of x."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        # x.float(), but float64 stays (gradcheck)
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return (x32 * rstd).type_as(x) * weight

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd
        d_normed = (grad * weight).to(rstd.dtype)
        dx = rstd * (d_normed - normed * (d_normed * normed).mean(-1, keepdim=True))
        d_weight = None
        if ctx.needs_input_grad[1]:
            d_weight = (grad * normed.type_as(x)).flatten(0, -2).sum(0).to(weight.dtype)
        return dx.to(x.dtype), d_weight, None


class LeanRMSNorm(llama.RMSNorm):
    def forward(self, x):
        if needs_grad(x, self.weight):
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return super().forward(x)


class SwiGLU(torch.autograd.Function):
    """silu(a) * b. Autograd would keep a, b and silu(a); a and b are enough (silu is cheap to
    redo)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        # silu_backward: what autograd itself runs
        return torch.ops.aten.silu_backward(grad * b, a), grad * F.silu(a)


class LeanFeedForward(llama.FeedForward):
    def forward(self, x):
        a, b = self.w1(x), self.w3(x)
        return self.w2(SwiGLU.apply(a, b) if needs_grad(a, b) else F.silu(a) * b)


class LoRAProduct(torch.autograd.Function):
    """y = x W^T + scale * (x_a A^T) B^T with W frozen and x_a = dropout(x), and its backward
    written out. Autograd would keep a float32 copy of x for each adapter (A and B are float32).
    Here only x_a (the activation itself, shared by wq, wk and wv) and the thin (tokens, rank)
    product are kept, and the products run in matmul_dtype, their float32 operands in scratch
    buffers."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, x_a, weight, lora_a, lora_b, scale):
        c = matmul_dtype(x)
        xc = Scratch.upcast(flat(x), c, "in")
        u = (flat(x_a).to(c) if x_a is not x else xc) @ lora_a.to(c).t()  # (tokens, rank)
        y = Scratch.get("out", (len(xc), weight.shape[0]), c, x.device) if c != x.dtype else None
        y = (torch.mm(xc, Scratch.upcast(weight, c).t(), out=y)
             .addmm_(u, lora_b.to(c).t(), alpha=scale))
        ctx.save_for_backward(x if weight.requires_grad else None, x_a, weight, lora_a, lora_b, u)
        ctx.scale, ctx.x_shape, ctx.dropout = scale, x.shape, x_a is not x
        return y.to(x.dtype).view(*x.shape[:-1], -1)  # (..., out)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x, x_a, weight, lora_a, lora_b, u = ctx.saved_tensors
        c, scale = u.dtype, ctx.scale
        dy = Scratch.upcast(flat(dy), c, "in")  # (tokens, out)
        du, d_lora_a, d_lora_b = adapter_grads(dy, x_a, lora_a, lora_b, u, scale)
        d_weight = (dy.t() @ flat(x).to(c)).to(weight.dtype) if ctx.needs_input_grad[2] else None
        dx = (Scratch.get("out", (len(dy), weight.shape[1]), c, dy.device) if c != x_a.dtype
              else None)
        dx = torch.mm(dy, Scratch.upcast(weight, c), out=dx)  # (tokens, in): frozen weight's share
        # the adapter's share, added to dx when x_a is x
        dx_a = du @ lora_a.to(c) if ctx.dropout else None
        if not ctx.dropout:
            dx.addmm_(du, lora_a.to(c))
        as_x = lambda g: None if g is None else g.to(x_a.dtype).view(ctx.x_shape)  # noqa: E731
        return as_x(dx), as_x(dx_a), d_weight, d_lora_a, d_lora_b, None


def adapter_grads(dy, x_a, lora_a, lora_b, u, scale):
    """The adapter's share of a LoRA backward pass, dy (tokens, out) and u = x_a A^T (tokens, rank)
    in the matmul dtype: du = scale dy B (tokens, rank), and the gradients of A and B."""
    c = dy.dtype
    du = (dy @ lora_b.to(c)).mul_(scale)  # (tokens, rank)
    d_lora_b = (dy.t() @ u).mul_(scale).to(lora_b.dtype)  # (out, rank)
    # its own scratch slot: dy may be in "in"
    d_lora_a = (du.t() @ Scratch.upcast(flat(x_a), c, "x_a")).to(lora_a.dtype)  # (rank, in)
    return du, d_lora_a, d_lora_b


class LeanLoRALinear(llama.LoRALinear):
    def forward(self, x):
        x_a = self.dropout(x) if self.dropout.p and self.training else x
        return LoRAProduct.apply(x, x_a, self.base.weight, self.lora_a, self.lora_b, self.scale)


class QuantizedLoRAProduct(torch.autograd.Function):
    """A LoRALinear over a quantized base (quantize.py's layers: base.product(x) and
    base.input_grad(dy)), y = base(x) + scale (x_a A^T) B^T with x_a = dropout(x), its backward
    written out as LoRAProduct's is: it keeps x_a and the thin (tokens, rank) product, where
    autograd would keep a float32 copy of x for each adapter. LoRAProduct's sibling rather than
    one Function with it: a bf16 base can be trained too (its weight's gradient) and multiplies
    from scratch buffers; a quantized base only multiplies, in its own product and input_grad.
    Both share adapter_grads, and for_training picks one per layer."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, x_a, lora_a, lora_b, base, scale):
        c = matmul_dtype(x)
        u = flat(x_a).to(c) @ lora_a.to(c).t()  # (tokens, rank)
        y = flat(base.product(x))  # (tokens, out)
        y.add_(u @ lora_b.to(c).t(), alpha=scale)
        ctx.save_for_backward(x_a, lora_a, lora_b, u)
        ctx.base, ctx.scale, ctx.dropout = base, scale, x_a is not x
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x_a, lora_a, lora_b, u = ctx.saved_tensors
        grads = adapter_grads(flat(dy).to(u.dtype), x_a, lora_a, lora_b, u, ctx.scale)
        du, d_lora_a, d_lora_b = grads
        if not any(ctx.needs_input_grad[:2]):  # e.g. layer 0's wq: frozen embedding and norm
            return None, None, d_lora_a, d_lora_b, None, None
        dx, dx_a = ctx.base.input_grad(dy), (du @ lora_a.to(du.dtype)).view(x_a.shape)
        if not ctx.dropout:  # x_a is x: one gradient
            return dx.add_(dx_a), None, d_lora_a, d_lora_b, None, None
        return dx, dx_a.to(x_a.dtype), d_lora_a, d_lora_b, None, None


class QuantizedLoRALinear(llama.LoRALinear):
    def forward(self, x):
        x_a = self.dropout(x) if self.dropout.p and self.training else x
        return QuantizedLoRAProduct.apply(x, x_a, self.lora_a, self.lora_b, self.base, self.scale)


class HeadCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of a frozen output layer's logits (LoRA, norm tuning). Token t's
    loss depends on its own hidden state alone, so the forward pass computes d loss_t / d h_t right
    away ((softmax - one-hot) W) and keeps only that (N, dim): the (N, vocab) float32 logits, their
    softmax and gradient are never kept for backward, which scales it row by row. Tokens go a chunk
    at a time, the weight a slice at a time, multiplied in matmul_dtype."""
    # (tokens, vocab) float32 logits of at most 256 MB; weight slices
    max_logits, weight_rows = 2**26, 8192

    @staticmethod
    def forward(ctx, h, weight, targets):  # h: (N, dim) final-normed hidden states, targets: (N,)
        c, vocab = matmul_dtype(h), weight.shape[0]
        # logits and losses: float32 (float64 in gradcheck)
        acc = torch.promote_types(c, torch.float32)
        losses = torch.empty(len(h), dtype=acc, device=h.device)
        grad_h = torch.zeros(h.shape, dtype=c, device=h.device) if ctx.needs_input_grad[0] else None
        rows, cols = max(1, HeadCrossEntropy.max_logits // vocab), HeadCrossEntropy.weight_rows
        for i in range(0, len(h), rows):
            hc, t = h[i:i + rows].to(c), targets[i:i + rows, None]
            logits = torch.empty(len(hc), vocab, dtype=acc, device=h.device)  # (rows, vocab)
            for j in range(0, vocab, cols):
                logits[:, j:j + cols] = hc @ Scratch.upcast(weight[j:j + cols], c).t()
            target_logit, top = logits.gather(1, t), logits.amax(1, keepdim=True)
            probs = logits.sub_(top).exp_()  # in place: one (rows, vocab) buffer throughout
            total = probs.sum(1, keepdim=True)
            losses[i:i + rows] = (total.log() + top - target_logit)[:, 0]
            if grad_h is not None:
                minus_one = torch.full(t.shape, -1.0, dtype=acc, device=h.device)
                d_logits = probs.div_(total).scatter_add_(1, t, minus_one)
                for j in range(0, vocab, cols):
                    grad_h[i:i + rows].addmm_(d_logits[:, j:j + cols].to(c),
                                              Scratch.upcast(weight[j:j + cols], c))
        ctx.save_for_backward(grad_h)
        ctx.dtype = h.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        grad_h, = ctx.saved_tensors
        return (grad_h * grad_losses[:, None]).to(ctx.dtype), None, None


class ChunkedCrossEntropy(llama.CrossEntropy):
    def forward(self, h, output, targets):
        if h.device.type == "cpu" and torch.is_grad_enabled():
            release_freed_memory()  # the forward pass's temporaries, before the logits
        if type(output) is not nn.Linear or needs_grad(output.weight):
            return super().forward(h, output, targets)
        return (HeadCrossEntropy.apply(h.flatten(0, 1), output.weight, targets.flatten())
                .view(targets.shape))


def for_training(model):
    """Swap in the lean training modules: each is a subclass of the module it replaces, with the
    same parameters and the same forward arithmetic (only the backward is written out), so the
    class is swapped in place; on GPUs, flex attention. Call after apply_lora and set_trainable."""
    lean = {llama.RMSNorm: LeanRMSNorm, llama.FeedForward: LeanFeedForward,
            llama.LoRALinear: LeanLoRALinear, llama.CrossEntropy: ChunkedCrossEntropy}
    for module in model.modules():
        if type(module) is llama.LoRALinear and hasattr(module.base, "input_grad"):
            module.__class__ = QuantizedLoRALinear  # over quantize.py's layers
        elif type(module) in lean and (type(module) is not llama.LoRALinear
                                       or type(module.base) is nn.Linear):
            module.__class__ = lean[type(module)]
    device = next(model.parameters()).device
    if device.type == "cpu":
        # hand back what the last backward pass freed, before each step
        model.register_forward_pre_hook(
            lambda module, args: release_freed_memory() if module.training else None)
    elif device.type == "cuda":
        use_flex_attention(model)
    return model


class CheckpointedBlock(llama.TransformerBlock):
    """A block whose activations are recomputed in backward rather than kept (same weights: its
    class is swapped in): training holds one block's activations at a time, for a second forward
    pass."""

    def forward(self, x, freqs_cis, start_pos, mask):
        if not self.training:
            return super().forward(x, freqs_cis, start_pos, mask)
        return torch.utils.checkpoint.checkpoint(super().forward, x, freqs_cis, start_pos, mask,
                                                 use_reentrant=False)


def checkpoint_activations(model):
    """Every block a CheckpointedBlock. Before FSDP's fully_shard, which wraps each block as it
    is (the recomputation then runs inside the block's gathered weights)."""
    for layer in model.layers:
        layer.__class__ = CheckpointedBlock
    return model


# -----------------------------------------------------------------------------
# GPU training: flex attention skips the masked-out blocks of packed documents (compiled: GPUs only)

class FlexAttention(llama.Attention):
    """Attention through flex_attention, from the same masks (same weights: its class is swapped
    in). self.flex, shared by every layer: the kernel and the BlockMasks made so far (causal ones
    by shape, and the last document mask's: every layer of one forward pass gets the same mask,
    converted once)."""

    def attend(self, q, k, v, mask):
        from torch.nn.attention.flex_attention import create_block_mask

        # q: (B, T, heads, head_dim); mask: (B, 1, T, S) booleans or None: causal
        B, T, S, flex = q.shape[0], q.shape[1], k.shape[1], self.flex
        if mask is None:
            if (B, T, S) not in flex["causal"]:
                flex["causal"][B, T, S] = create_block_mask(lambda b, h, i, j: i >= j, B, None, T,
                                                            S, device=q.device)
            block = flex["causal"][B, T, S]
        else:
            if flex.get("mask") is not mask:
                flex.update(mask=mask, block=create_block_mask(
                    lambda b, h, i, j: mask[b, 0, i, j], B, None, T, S, device=q.device))
            block = flex["block"]
        y = flex["kernel"](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                           block_mask=block, enable_gqa=q.shape[2] != k.shape[2])
        return y.transpose(1, 2)


def use_flex_attention(model):
    from torch.nn.attention.flex_attention import flex_attention

    kernel = (torch.compile(flex_attention, dynamic=False) if model.freqs_cis.is_cuda
              else flex_attention)
    shared = {"kernel": kernel, "causal": {}}
    for layer in model.layers:
        layer.attention.flex = shared
        layer.attention.__class__ = FlexAttention
    return model

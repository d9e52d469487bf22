"""
One model over several processes (torchrun), beside llama.py: how Llama 3.1/3.3 70B (141 GB in
bf16) and 3.1 405B (810 GB) run where no single device holds them.

    torchrun --nproc_per_node 8 generate.py --ckpt_dir Llama-3.1-70B/original --prompt "Hi"
    torchrun --nproc_per_node 8 finetune.py --ckpt_dir Llama-3.1-70B/original --fsdp
    python parallel.py                        # the planning table: bytes per GPU, which GPUs fit

- Tensor parallel, for generation: Meta's split (fairscale's Column/RowParallelLinear and
  VocabParallelEmbedding, which Meta's reference runs), written as plain local shards and two
  all-reduces per layer, as gpt-fast's tp.py. wq, wk, wv, w1, w3 and the output keep 1/N of their
  output rows, wo and w2 1/N of their input columns, the embedding 1/N of the vocabulary; a K/V
  head is copied to N / n_kv_heads processes when there are more processes than K/V heads. Each
  process builds its shard on the meta device and reads only its slices of the files, in either
  layout. Every process computes the same whole logits, so every seeded sampler draws the same
  token and no broadcast is needed.
- Sharded data parallel, for finetuning (--fsdp): FSDP2's fully_shard per block, then the model:
  parameters, gradients and AdamW's state are each 1/N per process.
"""

import gc
import os
import sys
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

import checkpoints
import llama
from llama import InputError


# -----------------------------------------------------------------------------
# Processes

def world():
    """(rank, number of processes); (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def under_torchrun():
    return "RANK" in os.environ  # torchrun sets it, even for one process


def init_processes(device):
    """One process per device: gloo between CPUs, nccl between GPUs (this process's LOCAL_RANK)."""
    if not under_torchrun() or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if world()[0] > 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 prints the text (llama.log: rank 0 only)
    return device


def end_processes():
    """Leave the process group, with gloo's worker threads joined while Python still runs: a thread
    still releasing a finished collective's tensors as the interpreter exits aborts the process
    (SIGABRT). The group is destroyed only when nothing holds it: FSDP's modules do, in cycles."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


# -----------------------------------------------------------------------------
# Tensor parallel: which slice of each weight a process holds

ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")  # split along their inputs


def fits(args, n):
    kv = args.n_kv_heads % n == 0 or n % args.n_kv_heads == 0
    return kv and args.n_heads % n == 0 and args.ffn_hidden_dim % n == 0 and \
        args.vocab_size % n == 0


def check_tensor_parallel(args, n):
    """Any N that does not split heads, K/V heads, FFN width and vocabulary evenly: one line."""
    if not fits(args, n):
        ok = [k for k in range(1, 129) if fits(args, k)]
        raise InputError(f"{n} processes cannot split this model evenly ({args.n_heads} heads, "
                         f"{args.n_kv_heads} K/V heads, FFN {args.ffn_hidden_dim}, vocabulary "
                         f"{args.vocab_size}): use --nproc_per_node in {ok}")


def shard_range(key, size, args, rank, n):
    """(dim, start, end): the slice of a whole weight (size long along dim) that process rank of
    n holds, or None for a weight every process holds whole (the norms)."""
    dim = llama.meta_shard_dim(key)
    if dim is None:
        return None
    if key.endswith(("wk.weight", "wv.weight")):  # whole K/V heads, copied when n > n_kv_heads
        heads, first = max(args.n_kv_heads // n, 1), rank * args.n_kv_heads // n
        return dim, first * args.head_dim, (first + heads) * args.head_dim
    return dim, rank * size // n, (rank + 1) * size // n


class VocabShardEmbedding(nn.Embedding):
    """Rows vocab_start.. of the embedding: tokens outside give zeros, and the sum over processes
    (all-reduce) is every token's row (fairscale's VocabParallelEmbedding, as Meta's)."""

    def forward(self, tokens):
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        h = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, dim)
        h = h.masked_fill(outside[..., None], 0.0)
        dist.all_reduce(h)
        return h


def all_reduce(module, inputs, output):  # a block's partial sums -> the whole (the rows' outputs)
    dist.all_reduce(output)
    return output


def gather_vocab(module, inputs, logits):  # (B, T, vocab / n) on each process -> (B, T, vocab)
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, logits.contiguous())
    return torch.cat(parts, dim=-1)


def tensor_parallel(model, rank, n):
    """Cut a Transformer built on the meta device down to process rank's shard, with the
    collectives that join the pieces: an all-reduce after each attention and feed-forward (their
    wo, w2 sum over the inputs this process holds), one in the embedding, a gather of the logits.
    Quantization and the speed paths then act on the local nn.Linear modules as in one process."""
    a = model.args
    for key, p in list(model.named_parameters()):
        dim = llama.meta_shard_dim(key)
        if dim is None:
            continue
        _, start, end = shard_range(key, p.shape[dim], a, rank, n)
        module = model.get_submodule(key.rsplit(".", 1)[0])
        shape = list(p.shape)
        shape[dim] = end - start
        module.weight = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = shape
    if a.tie_embeddings:  # both split by vocabulary rows: the shards are tied too
        model.output.weight = model.tok_embeddings.weight
    emb = model.tok_embeddings
    emb.__class__, emb.num_embeddings = VocabShardEmbedding, emb.weight.shape[0]
    emb.vocab_start = rank * a.vocab_size // n
    for layer in model.layers:
        layer.attention.n_heads = a.n_heads // n  # local heads: the views and the KV cache follow
        layer.attention.n_kv_heads = max(a.n_kv_heads // n, 1)
        layer.attention.register_forward_hook(all_reduce)
        layer.feed_forward.register_forward_hook(all_reduce)
    model.register_forward_hook(gather_vocab)
    return model


def row_absmax(name, weight):
    """int8's per-row scale over the whole row: a row-parallel weight's rows are cut over the
    processes, and each piece takes the largest |w| of all pieces, so that the quantized weights
    equal one process's."""
    if not name.endswith(tuple(k.rsplit(".", 1)[0] for k in ROW_PARALLEL)):
        return None
    m = weight.detach().float().abs().amax(1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    return m


# -----------------------------------------------------------------------------
# Reading only this process's slices

def load_shard(ckpt_dir, rank, n):
    """-> (ModelArgs, this process's slices in Meta's names) of a checkpoint in either layout."""
    layout, d = checkpoints.checkpoint_layout(ckpt_dir)
    args = checkpoints.read_args(d)
    check_tensor_parallel(args, n)
    llama.log(f"reading process {rank}'s 1/{n} of {d}")
    args, state_dict = (read_meta_shard if layout == "meta" else read_hf_shard)(d, args, rank, n)
    return llama.tie_output(args, state_dict)


def read_meta_shard(d, args, rank, n):
    """Meta's consolidated.NN.pth, S of them: with n >= S processes, rank r reads file r * S // n
    (and slices it); with fewer, S / n consecutive files (joined), as Meta's own reference does."""
    paths = sorted(d.glob("consolidated.*.pth"))
    s = len(paths)
    if not paths or (s % n and n % s):
        raise InputError(f"{d} has {s} consolidated.*.pth files, which {n} processes cannot "
                         f"share: use a number of processes that divides or is a multiple of {s}")
    mine = range(rank * s // n, max(rank * s // n + 1, (rank + 1) * s // n))
    files = {}
    for i in mine:  # memory-mapped: only the slices used are read
        files[i] = torch.load(paths[i], map_location="cpu", weights_only=True, mmap=True)
    copies = checkpoints.kv_copies(  # duplicated K/V heads (405B on 16)
        [f["layers.0.attention.wk.weight"] for f in files.values()], args)
    args = replace(args, n_kv_heads=args.n_kv_heads // copies)
    out = {}
    for key, t in files[mine[0]].items():
        dim = llama.meta_shard_dim(key)
        if dim is None:
            out[key] = t
            continue
        kv = key.endswith(("wk.weight", "wv.weight"))
        part = t.shape[dim]  # file i holds [i * part, (i + 1) * part) of the whole (i // copies)
        whole = part * s // (copies if kv else 1)
        _, start, end = shard_range(key, whole, args, rank, n)
        pieces = {}
        for i, f in files.items():
            lo = (i // copies if kv else i) * part
            a, b = max(lo, start), min(lo + part, end)
            if a < b:
                piece = f[key].narrow(dim, a - lo, b - a)
                if a in pieces and not torch.equal(pieces[a], piece):
                    raise InputError(f"'{key}': files {paths[i].name} and the one before should "
                                     f"hold copies of one K/V head but differ; re-download them")
                pieces.setdefault(a, piece)
        parts = [pieces[a] for a in sorted(pieces)]
        out[key] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
    return args, out


def read_hf_shard(d, args, rank, n):
    """Hugging Face safetensors (one file, or many listed in model.safetensors.index.json): each
    tensor's slice read alone (get_slice), never the whole tensor."""
    index = d / "model.safetensors.index.json"
    where = (llama.read_json(index)["weight_map"] if index.exists() else
             {k: "model.safetensors" for k in safe_open(d / "model.safetensors", "pt").keys()})
    handles, out = {}, {}
    for key, hf in checkpoints.hf_names(args.n_layers).items():
        if hf not in where:
            continue  # a tied output (tie_output checks the rest)
        if where[hf] not in handles:
            handles[where[hf]] = safe_open(d / where[hf], framework="pt")
        sl = handles[where[hf]].get_slice(hf)
        dim = llama.meta_shard_dim(key)
        if dim is None:
            out[key] = sl[:]
            continue
        _, start, end = shard_range(key, sl.get_shape()[dim], args, rank, n)
        t = sl[start:end] if dim == 0 else sl[:, start:end]
        if key.endswith(("wq.weight", "wk.weight")):  # HF's rotary order, undone per head
            t = checkpoints.permute_rows_from_hf(t, t.shape[0] // args.head_dim)
        out[key] = t
    if not args.tie_embeddings and "output.weight" not in out:
        raise InputError(f"{d} has no lm_head.weight but config.json says it is not tied")
    return args, out


def load_tensor_parallel(ckpt_dir, device, dtype, settings):
    """This process's shard of the model, built on the meta device, its slices loaded, its config
    with settings (ModelArgs fields) replaced."""
    rank, n = world()
    args, state_dict = load_shard(ckpt_dir, rank, n)
    args = replace(args, **settings)
    state_dict = {k: t.to(device=device, dtype=dtype).contiguous() for k, t in state_dict.items()}
    model = llama.build_model(args, state_dict, device, dtype,
                              shard=lambda m: tensor_parallel(m, rank, n))
    sizes = [torch.zeros(n, dtype=torch.float64, device=device)]
    sizes[0][rank] = local_bytes(model)
    dist.all_reduce(sizes[0])
    llama.log("weights per process: " + ", ".join(f"{b / 1e9:.3f} GB" for b in sizes[0].tolist()))
    return model


def local_bytes_of(t):  # of this process's part: FSDP's parameters are sharded tensors (DTensor)
    t = t.to_local() if hasattr(t, "to_local") else t
    return 0 if t is None else t.numel() * t.element_size()


def local_bytes(model):
    """Bytes of this process's parameters and buffers (a tied weight once; FSDP's shards)."""
    return sum(local_bytes_of(t) for t in [*model.parameters(), *model.buffers()])


# -----------------------------------------------------------------------------
# Sharded finetuning (FSDP2)

def shard_for_training(model, device):
    """fully_shard per transformer block, then the rest (embedding, norm, output): each process
    keeps 1/N of every parameter, its gradient and AdamW's state; a block's weights are gathered
    whole only while it computes (forward, and backward's recomputation too). A model in CPU
    memory moves to device a block at a time, as its shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world()[1],))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    llama.log(f"parameters per process: {local_bytes(model) / 1e9:.3f} GB (FSDP2)")
    return model


# -----------------------------------------------------------------------------
# Planning: the bytes each process holds, before anything is loaded

FORMAT_BYTES = {"bf16": 2.0, "int8": 1.0, "int4": 0.5}


def bytes_per_process(args, n, fmt="bf16", group_size=32, kv_tokens=0):
    """Weights one of n tensor-parallel processes holds in fmt (int8/int4: every projection and
    the output quantized, the embedding and norms in bf16), plus a bf16 KV cache of kv_tokens."""
    hd, dim, f, v = args.head_dim, args.dim, args.ffn_hidden_dim, args.vocab_size
    kv_heads = max(args.n_kv_heads // n, 1)
    q_rows, kv_rows = args.n_heads * hd // n, kv_heads * hd
    # (rows, inputs) of each quantizable matrix on one process
    mats = [(q_rows, dim), (kv_rows, dim), (kv_rows, dim), (dim, q_rows),
            (f // n, dim), (f // n, dim), (dim, f // n)] * args.n_layers + [(v // n, dim)]
    b = FORMAT_BYTES[fmt]
    scales = {"bf16": lambda r, c: 0, "int8": lambda r, c: 4 * r,  # float32 per row
              "int4": lambda r, c: 4 * r * c // group_size}  # bf16 scale and zero per group
    weights = sum(r * c * b + scales[fmt](r, c) for r, c in mats)
    if fmt != "bf16" or not args.tie_embeddings:
        weights += v // n * dim * 2  # the bf16 embedding (tied in bf16: the output itself)
    norms = (2 * args.n_layers + 1) * dim * 2
    kv = 2 * args.n_layers * kv_tokens * kv_heads * hd * 2
    return int(weights + norms + kv)


SIZES = {"8B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden_dim=14336),
         "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden_dim=28672),
         "405B": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_hidden_dim=53248)}
GPUS_GB = (24, 40, 80, 141)
OVERHEAD_GB = 3  # CUDA context, activations and the logits of a short batch


def planning_table(kv_tokens=8192):
    """Markdown: GB per process for 8B/70B/405B, bf16/int8/int4, N = 1..16, and the smallest of
    GPUS_GB that holds it with a KV cache of kv_tokens (and OVERHEAD_GB)."""
    lines = ["| model | format | " + " | ".join(f"N={n}" for n in (1, 2, 4, 8, 16)) + " |",
             "|---|---|" + "---|" * 5]
    for name, shape in SIZES.items():
        args = llama.ModelArgs(vocab_size=128256, **shape)
        for fmt in FORMAT_BYTES:
            cells = []
            for n in (1, 2, 4, 8, 16):
                gb = bytes_per_process(args, n, fmt, kv_tokens=kv_tokens) / 1e9
                gpu = next((g for g in GPUS_GB if gb + OVERHEAD_GB <= g), None)
                cells.append(f"{gb:.1f} ({gpu} GB)" if gpu else f"{gb:.1f} (none)")
            lines.append(f"| {name} | {fmt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    argparse.ArgumentParser(description="Prints the planning table: GB per process of Llama 3.1 "
                            "8B, 70B and 405B over 1-16 processes (python parallel.py). Tensor-"
                            "parallel generation: torchrun --nproc_per_node N generate.py ...; "
                            "FSDP2 finetuning: torchrun --nproc_per_node N finetune.py --fsdp "
                            "...").parse_args()
    print(f"GB per process, weights + a bf16 KV cache of 8,192 tokens (the smallest GPU that "
          f"holds it with {OVERHEAD_GB} GB to spare):")
    print(planning_table())

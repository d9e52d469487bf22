"""
The scale view: what each process holds and does under tensor parallel decoding (1 and 2
processes) and under a training step with DDP and with FSDP2 (2 processes), each run its own
torchrun on the same random checkpoint as bench.py's.

    python bench_scale.py                            # Llama 3.2 1B shape, LoRA steps
    python bench_scale.py --shape 8B --new_tokens 32 --scale_mode full --json

The processes of one machine stand in for GPUs. They share its cores and memory bandwidth, and gloo
sends each all-reduce through shared memory and the kernel: these runs show what each process
holds, and only an upper bound on what communication costs; NCCL between GPUs is another world.
Rank 0 prints every rank's figures.
"""

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import bench
import checkpoints
import finetune
import generate
import llama
import parallel
import speed

SCALE_RUNS = (("decode", 1), ("decode", 2), ("ddp", 2), ("fsdp", 2))


def resident_gb(field="VmRSS"):
    return next(int(l.split()[1]) for l in open("/proc/self/status")
                if l.startswith(field)) * 1024 / 1e9


def reset_peak_rss():  # VmHWM starts again from VmRSS (Linux: clear_refs 5)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def tp_decode_child(ckpt, a):
    """Tensor-parallel bf16 --fast decoding, batch 1: this process's weights and tokens/s."""
    g = generate.load(ckpt, max_seq_len=a.prompt_len + a.new_tokens, device="cpu",
                      dtype="bfloat16", fast=True)
    planned = parallel.bytes_per_process(g.model.args, parallel.world()[1], "bf16")
    with torch.inference_mode():
        g.generate(bench.prompt_ids(8).tolist(), 4, temperature=0)  # warm-up
        t, steps = None, 0
        prompt = bench.prompt_ids(a.prompt_len).tolist()
        for _ in g.generate_steps(prompt, a.new_tokens, temperature=0):
            t, steps = t or time.perf_counter(), steps + 1  # timed from the first new token
        tok_s = (steps - 1) / (time.perf_counter() - t)
    return {"planned_weights_gb": planned / 1e9, "rss_after_load_gb": resident_gb(),
            "peak_rss_gb": bench.peak_rss_gb(), "decode_b1_tok_s": tok_s}


def train_step_child(kind, ckpt, a):
    """--scale_mode training steps (bf16 frozen weights, activation checkpointing, AdamW) under
    DDP (a whole copy in each process) or FSDP2 (fully_shard, as finetune.py --fsdp): this
    process's bytes of parameters, gradients and AdamW state, and its peak memory in the steps."""
    device = parallel.init_processes(torch.device("cpu"))
    args, sd = checkpoints.load_checkpoint(ckpt)
    args = replace(args, max_seq_len=a.prefill_len, fused_attention=True)
    # copies of the weights, not the checkpoint's mapped pages (which every process would count):
    # each process's own memory is what a GPU would hold
    sd = {k: t.to(torch.bfloat16, copy=True) for k, t in sd.items()}
    model = llama.build_model(args, sd, device, torch.bfloat16)
    del sd
    finetune.assemble(model, {**finetune.DEFAULTS, "mode": a.scale_mode, "fsdp": kind == "fsdp",
                              "activation_checkpointing": True}, device)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP's: the shards
    step_model = model if kind == "fsdp" else \
        torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = bench.prompt_ids(a.prefill_len + 1)
    speed.release_freed_memory()
    before = resident_gb()
    reset_peak_rss()
    times = []
    for _ in range(a.lora_steps + 1):  # the first one is a warm-up (AdamW's state appears)
        t = time.perf_counter()
        losses, weights = llama.token_losses(step_model, x[:, :-1], x[:, 1:], 128000)
        ((losses * weights).sum() / weights.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # the gradients stay, to be counted
        times.append(time.perf_counter() - t)
    states = [t for s in optimizer.state.values() for t in s.values() if t.dim()]
    gb = lambda ts: sum(parallel.local_bytes_of(t) for t in ts) / 1e9  # noqa: E731
    return {"params_gb": gb(model.parameters()), "grads_gb": gb(p.grad for p in params),
            "adamw_gb": gb(states), "rss_before_gb": before,
            "step_peak_rss_gb": bench.peak_rss_gb(), "step_s": statistics.median(times[1:])}


def scale_child(kind, ckpt, a):
    torch.set_num_threads(a.threads)
    out = tp_decode_child(ckpt, a) if kind == "decode" else train_step_child(kind, ckpt, a)
    every = [None] * parallel.world()[1]
    torch.distributed.all_gather_object(every, out)
    print(json.dumps(every))  # (other ranks print to /dev/null)
    parallel.end_processes()


def scale(ckpt, a):
    """ each of SCALE_RUNS under torchrun, the cores split among its processes."""
    results = {"machine": bench.machine_info(a), "mode": a.scale_mode, "scale": []}
    for kind, n in SCALE_RUNS:
        threads = max(1, a.threads // n)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(n), __file__, "--_child", kind, "--_ckpt", str(ckpt), "--threads",
               str(threads), "--prompt_len", str(a.prompt_len), "--new_tokens", str(a.new_tokens),
               "--prefill_len", str(a.prefill_len), "--lora_steps", str(a.lora_steps),
               "--scale_mode", a.scale_mode]
        ranks = bench.run_json(cmd, f"{kind} over {n} process(es), {threads} thread(s) each")
        results["scale"].append({"kind": kind, "processes": n, "threads": threads,
                                 "ranks": ranks})
    bench.report(results, a, print_scale)


def print_scale(results):
    m = results["machine"]
    print(f"\n{m['shape']} shape on {m['cpu']}, {m['threads']} threads in all, torch "
          f"{m['torch']}, {m['date']}; gloo between processes of one machine: communication-"
          f"bound and sharing the cores, not a forecast for GPUs")
    print("tensor-parallel decoding, bf16 --fast, batch 1 (per process):")
    print(f"  {'N':>3}{'threads':>9}{'planned GB':>12}{'RSS GB':>9}{'peak GB':>9}{'tok/s':>8}")
    runs = {(r["kind"], r["processes"]): r for r in results["scale"] if r["ranks"]}
    for (kind, n), r in runs.items():
        if kind == "decode":
            for x in r["ranks"][:1]:  # (every rank holds the same bytes; rank 0's are shown)
                print(f"  {n:>3}{r['threads']:>9}{x['planned_weights_gb']:>12.2f}"
                      f"{x['rss_after_load_gb']:>9.2f}{x['peak_rss_gb']:>9.2f}"
                      f"{x['decode_b1_tok_s']:>8.2f}")
    print(f"training step, {results['mode']}, bf16 frozen weights, activation checkpointing "
          f"(per process, the largest rank):")
    print(f"  {'':6}{'params GB':>11}{'grads GB':>10}{'AdamW GB':>10}{'RSS GB':>9}{'peak GB':>9}"
          f"{'step s':>8}")
    for kind in ("ddp", "fsdp"):
        if (kind, 2) in runs:
            x = {k: max(rank[k] for rank in runs[kind, 2]["ranks"])
                 for k in runs[kind, 2]["ranks"][0]}
            print(f"  {kind:6}{x['params_gb']:>11.3f}{x['grads_gb']:>10.3f}{x['adamw_gb']:>10.3f}"
                  f"{x['rss_before_gb']:>9.2f}{x['step_peak_rss_gb']:>9.2f}{x['step_s']:>8.2f}")


def main():
    p = bench.parser(__doc__)
    p.add_argument("--scale_mode", default="lora", choices=llama.MODES,
                   help="what the training step trains (default lora)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_ckpt", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:
        return scale_child(a._child, a._ckpt, a)
    scale(bench.make_checkpoint(a.shape, Path(a.ckpt_root) / a.shape), a)


if __name__ == "__main__":
    main()

"""
Finetune a Llama 3.x checkpoint: LoRA, RMSNorm weights, both, or everything, on TinyStories or your text.

    python finetune.py --ckpt_dir Llama-3.2-1B/original                   # LoRA on TinyStories
    python finetune.py --ckpt_dir DIR --data my_texts.txt --mode lora+norm  # blank-line separated
    python finetune.py --ckpt_dir DIR --data chat.jsonl --out_dir sft       # {"messages": [...]} lines
    python finetune.py --ckpt_dir DIR --quantize int4 --dtype bfloat16      # LoRA over an int4 base
    python finetune.py --out_dir out --resume                               # continue, same settings
    python finetune.py --out_dir out --resume --max_steps 2000              # ... and train longer
    torchrun --nproc_per_node 2 finetune.py --ckpt_dir DIR                  # data parallel (DDP)

Then: python generate.py --ckpt_dir DIR --lora out --prompt "Once upon a time"
      python checkpoints.py export out merged --to hf                    # a full checkpoint

Each save writes OUT_DIR/checkpoint atomically, then OUT_DIR/log.jsonl: per step {"step", "loss",
"lr", "grad_norm", "tokens_per_s"}, per evaluation {"step", "val_loss"}. Ctrl-C or SIGTERM stops at
the end of the step, saves, and exits with 130 (143 for SIGTERM).
"""

import argparse
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch

import checkpoints
import llama
import prepare
import quantize
import speed

DEFAULTS = dict(ckpt_dir=None, data="tinystories", data_dir="data", mode="lora", lora_rank=8,
                lora_alpha=16.0, lora_dropout=0.0, lora_targets="wq,wk,wv,wo,w1,w2,w3", seq_len=512,
                batch_size=8, grad_accum=4, max_steps=1000, lr=2e-4, warmup_steps=50,
                weight_decay=0.0, grad_clip=1.0, eval_every=100, eval_batches=10, sample_every=200,
                save_every=200, stop_at=None, seed=1337, device=None, dtype=None,
                activation_checkpointing=False, quantize=None, group_size=32)
CHANGEABLE = {"max_steps", "eval_every", "eval_batches", "sample_every", "save_every", "stop_at",
              "device"}
HELP = dict(ckpt_dir="base checkpoint (Meta or HF layout)", data="tinystories, or .txt / .jsonl",
            lora_targets=f"among {','.join(llama.LORA_TARGETS)}", seq_len="tokens per sequence",
            batch_size="sequences per micro-batch per process", lr="peak learning rate (full: ~1e-5)",
            grad_accum="micro-batches per step", weight_decay="AdamW decay, on matrices only",
            eval_every="validation loss every N steps (0: never)", stop_at="save and stop there",
            sample_every="print a sample every N steps (0: never)", device="default: the best one",
            dtype="frozen weights' dtype (default: bfloat16 on GPUs, float32 on CPUs; on CPUs, "
                  "bfloat16 makes LoRA faster in half the memory)",
            activation_checkpointing="recompute activations in backward: less memory",
            quantize="quantize the frozen base (LoRA and norms train in float32)",
            group_size="inputs per int4 scale")
CHOICES = dict(mode=llama.MODES, device=["cpu", "cuda", "mps"], dtype=list(speed.DTYPES),
               quantize=quantize.MODES, group_size=quantize.GROUP_SIZES)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in DEFAULTS.items():  # default None: a flag given is told from a saved one
        kind = {"action": "store_const", "const": True} if default is False else {
            "type": type(default) if default is not None else (int if name == "stop_at" else str),
            "choices": CHOICES.get(name)}
        p.add_argument(f"--{name}", default=None, help=f"{HELP.get(name, '')} (default {default})",
                       **kind)
    p.add_argument("--out_dir", default="out", help="checkpoint and log.jsonl (default out)")
    p.add_argument("--resume", action="store_true", help="continue --out_dir's run, its settings")
    p.add_argument("--overwrite", action="store_true", help="start over in --out_dir's place")
    return p.parse_args(argv)


def settings(a):
    """The defaults, then (with --resume) the run's saved settings, then the flags given; checked
    here, before anything slow."""
    given = {k: v for k, v in vars(a).items() if k in DEFAULTS and v is not None}
    if isinstance(given.get("lora_targets"), str):
        given["lora_targets"] = [t for t in given["lora_targets"].split(",") if t]
    for key in ("ckpt_dir", "data"):
        if given.get(key, "tinystories") != "tinystories":
            given[key] = str(Path(given[key]).resolve())
    out_dir = Path(a.out_dir)
    if a.resume:
        saved = {k: v for k, v in checkpoints.read_run(out_dir).items() if k in DEFAULTS}
        other = [k for k, v in given.items() if k not in CHANGEABLE and saved.get(k) != v]
        if other:
            raise llama.InputError(f"--resume: {out_dir} was trained with other settings (" + ", ".join(
                f"{k}={saved.get(k)!r}, not {given[k]!r}" for k in other) + "); drop those flags")
        cfg = {**DEFAULTS, **saved, **given}
    elif ((out_dir / "checkpoint").exists() or (out_dir / "log.jsonl").exists()) and not a.overwrite:
        raise llama.InputError(f"{out_dir} holds a finetune run; continue it with --resume, start "
                               f"over with --overwrite, or pass another --out_dir")
    else:
        cfg = {**DEFAULTS, "lora_targets": DEFAULTS["lora_targets"].split(","), **given}
    c = argparse.Namespace(**cfg, resume=a.resume, out_dir=out_dir)
    if c.ckpt_dir is None:
        raise llama.InputError("--ckpt_dir is required to start a run")
    for name in ("batch_size", "grad_accum", "max_steps", "save_every", "eval_batches", "lora_rank"):
        if getattr(c, name) < 1:
            raise llama.InputError(f"--{name} must be at least 1, got {getattr(c, name)}")
    if not (c.lr > 0 and c.grad_clip > 0 and 0 <= c.lora_dropout < 1 and c.weight_decay >= 0
            and c.warmup_steps >= 0 and c.eval_every >= 0):
        raise llama.InputError("--lr and --grad_clip must be positive, --lora_dropout in [0, 1), "
                               "--weight_decay, --warmup_steps and --eval_every at least 0")
    if c.mode in ("lora", "lora+norm"):
        llama.check_lora(c.lora_targets, c.lora_rank)
    if c.quantize and c.mode == "full":
        raise llama.InputError("--quantize freezes the base: use --mode lora, norm or lora+norm")
    context = checkpoints.read_args(c.ckpt_dir).context
    if not 2 <= c.seq_len <= context:
        raise llama.InputError(f"--seq_len {c.seq_len} must be between 2 and the context, {context}")
    prepare.check_source(c.data)
    speed.resolve_device(c.device)
    return c


def main(argv=None):
    cfg = settings(parse_args(argv))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = speed.resolve_device(cfg.device)
    if world > 1:  # torchrun: one process per device, gloo on CPUs, nccl on GPUs
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    dtype = speed.resolve_dtype(cfg.dtype, device)
    tokenizer = checkpoints.load_tokenizer(cfg.ckpt_dir)
    data_dir = Path(cfg.data_dir) / "tinystories" if cfg.data == "tinystories" else cfg.out_dir / "data"
    if rank == 0:
        prepare.prepare_data(cfg.data, tokenizer, data_dir)
    if world > 1:
        torch.distributed.barrier()
    train_data, val_data = (prepare.load_bin(data_dir / f"{s}.bin") for s in ("train", "val"))
    for name, (tokens, _) in (("training", train_data), ("validation", val_data)):
        if len(tokens) <= cfg.seq_len + 1 and (name == "training" or cfg.eval_every):
            raise llama.InputError(f"the {name} data has {len(tokens)} tokens, too few for "
                                   f"--seq_len {cfg.seq_len}; use more data or a smaller --seq_len")
    torch.manual_seed(cfg.seed)
    args, state_dict = checkpoints.load_checkpoint(cfg.ckpt_dir)
    args = replace(args, max_seq_len=max(cfg.seq_len, 256))
    model = llama.build_model(args, speed.convert(state_dict, device, dtype), device, dtype, True)
    if cfg.quantize:  # QLoRA: the frozen base quantized, adapters and norms in float32
        quantize.quantize_model(model, cfg.quantize, cfg.group_size, release=speed.release_pages)
    run = {k: getattr(cfg, k) for k in DEFAULTS}
    checkpoints.apply_run_lora(model, run)
    llama.set_trainable(model, cfg.mode)
    model.activation_checkpointing = cfg.activation_checkpointing
    speed.for_training(model)
    if device.type == "cuda":
        speed.use_flex_attention(model)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    llama.log(f"training {n_trained:,} of {sum(p.numel() for p in model.parameters()):,} parameters "
              f"({cfg.mode}); {len(train_data[0]):,} tokens; {world} process(es) on {device}")
    if not cfg.resume and rank == 0:  # --overwrite: the old run goes only now, when all is ready
        shutil.rmtree(cfg.out_dir / "checkpoint", ignore_errors=True)
        (cfg.out_dir / "log.jsonl").unlink(missing_ok=True)
        cfg.out_dir.mkdir(parents=True, exist_ok=True)

    def sample_text(model):
        model.eval()
        g = llama.Llama(model, tokenizer, max_batch_size=1, seed=cfg.seed, fast=True)
        text = g.text_completion(["Once upon a time"], temperature=0.8, max_gen_len=48)[0]
        model.train()
        return text["generation"]

    stopped = llama.train(model, tokenizer, train_data, val_data, cfg, cfg.out_dir, run, sample_text)
    if world > 1:
        torch.distributed.destroy_process_group()
    return model, stopped


if __name__ == "__main__":
    try:
        _, stopped = main()
    except llama.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit({2: 130, 15: 143}.get(stopped, 0))  # SIGINT, SIGTERM: as a shell reports them

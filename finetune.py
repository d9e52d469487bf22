"""
Finetune Llama 3.x: LoRA, RMSNorm weights, both, or everything, on TinyStories or your text.

    python finetune.py --ckpt_dir Llama-3.2-1B/original                   # LoRA on TinyStories
    python finetune.py --ckpt_dir DIR --data my_texts.txt --mode lora+norm  # blank lines between
    python finetune.py --ckpt_dir DIR --data chat.jsonl --out_dir sft       # {"messages": ...}
    python finetune.py --ckpt_dir DIR --quantize int4 --dtype bfloat16      # over an int4 base
    python finetune.py --out_dir out --resume --max_steps 2000              # continue, train longer
    torchrun --nproc_per_node 2 finetune.py --ckpt_dir DIR                  # data parallel (DDP)
    torchrun --nproc_per_node 8 finetune.py --ckpt_dir Llama-3.1-70B/original --fsdp  # sharded

Then use the run: generate.py --lora out, or convert.py export out merged --to hf. Saves go to
OUT_DIR/checkpoint (atomically), then OUT_DIR/log.jsonl. Ctrl-C or SIGTERM stops at the end of the
step, saves, and exits with 130 (143 for SIGTERM).
"""

import argparse
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch

import checkpoints
import llama
import parallel
import prepare
import quantize
import speed
import train_speed

DEFAULTS = dict(ckpt_dir=None, data="tinystories", data_dir="data", mode="lora",
                lora_rank=8, lora_alpha=16.0, lora_dropout=0.0,
                lora_targets=["wq", "wk", "wv", "wo", "w1", "w2", "w3"],
                seq_len=512, batch_size=8, grad_accum=4, max_steps=1000, lr=2e-4, warmup_steps=50,
                weight_decay=0.0, grad_clip=1.0,
                eval_every=100, eval_batches=10, sample_every=200, save_every=200, stop_at=None,
                seed=1337, device=None, dtype=None, activation_checkpointing=False,
                quantize=None, group_size=32, lora_init=None, fsdp=False)
CHANGEABLE = {"max_steps", "eval_every", "eval_batches", "sample_every", "save_every", "stop_at",
              "device"}
HELP = dict(ckpt_dir="base checkpoint (Meta or HF)", data="tinystories, or a .txt / .jsonl file",
            lora_targets=f"among {','.join(llama.LORA_TARGETS)}", seq_len="tokens per sequence",
            batch_size="sequences per micro-batch and process", eval_every="0: never",
            dtype="of frozen weights (bfloat16 on GPUs, else float32; on CPUs bfloat16 is faster)",
            quantize="the frozen base (LoRA and norms train in float32)", sample_every="0: never",
            lora_init="a PEFT LoRA adapter to start from (its rank, alpha, targets)",
            fsdp="under torchrun: shard weights, gradients and AdamW over the processes (FSDP2) "
                 "instead of a whole copy in each (DDP)")
CHOICES = dict(mode=llama.MODES, device=["cpu", "cuda", "mps"], dtype=list(speed.DTYPES),
               quantize=quantize.FORMATS, group_size=quantize.GROUP_SIZES)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in DEFAULTS.items():  # default None: a flag given is told from a saved one
        kind = {"action": "store_const", "const": True} if default is False else {
            "type": {"stop_at": int, "lora_targets": lambda s: [t for t in s.split(",") if t]}.get(
                name, type(default) if default is not None else str), "choices": CHOICES.get(name)}
        p.add_argument(f"--{name}", default=None, help=f"{HELP.get(name, '')} (default {default})",
                       **kind)
    p.add_argument("--out_dir", default="out", help="checkpoint and log.jsonl (default out)")
    p.add_argument("--resume", action="store_true", help="continue --out_dir's run, its settings")
    p.add_argument("--overwrite", action="store_true", help="start over in --out_dir's place")
    return p.parse_args(argv)


def run_settings(out_dir, given, resume, overwrite):
    """The defaults, then (on resume) what run.json saved, then the flags given. A flag that would
    change a resumed run (not in CHANGEABLE) is refused, and a run is never overwritten unasked."""
    if resume:
        saved = {k: v for k, v in checkpoints.read_run(out_dir).items() if k in DEFAULTS}
        other = [k for k, v in given.items() if k not in CHANGEABLE and saved.get(k) != v]
        if other:
            changed = ", ".join(f"{k}={saved.get(k)!r}, not {given[k]!r}" for k in other)
            raise llama.InputError(f"--resume: {out_dir} was trained with other settings "
                                   f"({changed}); drop those flags")
        return {**DEFAULTS, **saved, **given}
    if not overwrite and any((Path(out_dir) / f).exists() for f in ("checkpoint", "log.jsonl")):
        raise llama.InputError(f"{out_dir} holds a finetune run; continue it with --resume, start "
                               f"over with --overwrite, or pass another --out_dir")
    return {**DEFAULTS, **given}


def settings(a):
    """Defaults, then (on --resume) the run's saved settings, then the flags given; all checked."""
    given = {k: v for k, v in vars(a).items() if k in DEFAULTS and v is not None}
    for key in ("ckpt_dir", "data", "lora_init"):
        if given.get(key, "tinystories") != "tinystories":
            given[key] = str(Path(given[key]).resolve())
    out_dir = Path(a.out_dir)
    cfg = run_settings(out_dir, given, a.resume, a.overwrite)
    c = argparse.Namespace(**cfg, resume=a.resume, out_dir=out_dir)
    if c.ckpt_dir is None:
        raise llama.InputError("--ckpt_dir is required to start a run")
    for name in ("batch_size", "grad_accum", "max_steps", "save_every", "eval_batches",
                 "lora_rank"):
        if getattr(c, name) < 1:
            raise llama.InputError(f"--{name} must be at least 1, got {getattr(c, name)}")
    if not (c.lr > 0 and c.grad_clip > 0 and 0 <= c.lora_dropout < 1 and c.weight_decay >= 0
            and c.warmup_steps >= 0 and c.eval_every >= 0):
        raise llama.InputError("--lr and --grad_clip must be positive, --lora_dropout in [0, 1), "
                               "--weight_decay, --warmup_steps and --eval_every at least 0")
    if c.mode in ("lora", "lora+norm"):
        llama.check_lora(c.lora_targets, c.lora_rank)
        if c.lora_init:
            checkpoints.peft_settings(c.lora_init)  # a LoRA adapter we can start from
    if c.fsdp and c.quantize:
        raise llama.InputError("--fsdp shards parameters, and quantized weights are buffers it "
                               "would copy whole to every process: drop --quantize, or --fsdp "
                               "(DDP)")
    if c.quantize and c.mode == "full":
        raise llama.InputError("--quantize freezes the base: use --mode lora, norm or lora+norm")
    context = checkpoints.read_args(c.ckpt_dir).context
    if not 2 <= c.seq_len <= context:
        raise llama.InputError(f"--seq_len {c.seq_len} must be in [2, the context: {context}]")
    prepare.check_source(c.data)
    if c.quantize:
        quantize.check_device(c.quantize, speed.resolve_device(c.device), training=True)
    return c


def assemble(model, run, device):
    """The assembly point of training (bench.py's and bench_scale.py's steps use it too): a built
    model made ready to train as run says (DEFAULTS' keys): QLoRA's quantized base, the run's
    LoRA, what trains, activation checkpointing, FSDP's shards on device, the lean modules."""
    if run["quantize"]:  # the output stays: the chunked loss streams it, tied it costs nothing
        quantize.quantize_model(model, run["quantize"], run["group_size"],
                                release=speed.release_pages, output=False)
    checkpoints.apply_run_lora(model, run)
    llama.set_trainable(model, run["mode"])
    if run["activation_checkpointing"]:  # before fully_shard, which wraps each block as it is
        train_speed.checkpoint_activations(model)
    if run["fsdp"]:
        parallel.shard_for_training(model, device)
    return train_speed.for_training(model)  # lean training modules; flex attention on GPUs


def main(argv=None):
    cfg = settings(parse_args(argv))
    rank, world = parallel.world()
    device = parallel.init_processes(speed.resolve_device(cfg.device))
    dtype = speed.resolve_dtype(cfg.dtype, device)
    tokenizer = checkpoints.load_tokenizer(cfg.ckpt_dir)
    data_dir = cfg.out_dir / "data" if cfg.data != "tinystories" else Path(cfg.data_dir) / cfg.data
    if rank == 0:
        prepare.prepare_data(cfg.data, tokenizer, data_dir)
    if world > 1:
        torch.distributed.barrier()
    train_data, val_data = prepare.load_splits(data_dir, cfg.seq_len, need_val=cfg.eval_every > 0)
    torch.manual_seed(cfg.seed)
    args, state_dict = checkpoints.load_checkpoint(cfg.ckpt_dir)
    args = replace(args, max_seq_len=max(cfg.seq_len, 256), fused_attention=True)
    # under FSDP the whole model never reaches a GPU: it is built in CPU memory (the checkpoint's
    # mapped pages) and fully_shard moves each block's 1/N to the device
    at = torch.device("cpu") if cfg.fsdp else device
    model = llama.build_model(args, speed.to_device(state_dict, at, dtype), device=at, dtype=dtype)
    run = {k: getattr(cfg, k) for k in DEFAULTS}
    assemble(model, run, device)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    llama.log(f"training {n_trained:,} parameters ({cfg.mode}); "
              f"{len(train_data[0]):,} tokens; {world} process(es) on {device}")
    if not cfg.resume and rank == 0:  # --overwrite: the old run goes only now, when all is ready
        shutil.rmtree(cfg.out_dir / "checkpoint", ignore_errors=True)
        (cfg.out_dir / "log.jsonl").unlink(missing_ok=True)
        cfg.out_dir.mkdir(parents=True, exist_ok=True)

    def sample_text(model):  # a glimpse of the model while it trains
        g = llama.Llama(model.eval(), tokenizer, max_batch_size=1, seed=cfg.seed, last_only=True)
        text = g.text_completion(["Once upon a time"], temperature=0.8, max_gen_len=48)[0]
        model.train()
        return text["generation"]

    optimizer = llama.adamw(model, run)
    start = checkpoints.load_training_state(cfg.out_dir, model, optimizer) if cfg.resume \
        else (0, [])
    stopped = llama.train(model, optimizer, tokenizer, train_data, val_data, run, cfg.out_dir,
                          start, sample_text)
    if stopped:
        llama.log(f"continue with: python finetune.py --out_dir {cfg.out_dir} --resume")
    return model, stopped


if __name__ == "__main__":
    try:
        stopped = main()[1]  # (the model is let go here, so that the process group can end)
    except llama.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    parallel.end_processes()
    sys.exit({2: 130, 15: 143}.get(stopped, 0))  # SIGINT, SIGTERM: as a shell reports them

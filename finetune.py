"""
Finetune a Llama 3.x checkpoint: LoRA, RMSNorm weights, both, or everything, on TinyStories or your own text.

    python finetune.py --ckpt_dir Llama-3.2-1B/original                      # LoRA on TinyStories (downloads it)
    python finetune.py --ckpt_dir DIR --data my_texts.txt --mode lora+norm   # documents separated by blank lines
    python finetune.py --ckpt_dir DIR --data docs.jsonl --mode full --lr 1e-5 # one {"text": ...} per line
    python finetune.py --ckpt_dir DIR --out_dir out --resume                 # continue exactly where it stopped
    torchrun --nproc_per_node 2 finetune.py --ckpt_dir DIR ...                # data parallel (gloo on CPU, nccl on GPU)

Then use the result:
    python generate.py --ckpt_dir DIR --lora out --prompt "Once upon a time"
    python llama.py export out merged_ckpt --to hf                            # merged into a full checkpoint

Every step appends {"step", "loss", "lr", "tokens_per_s"} and every evaluation {"step", "val_loss"} to
OUT_DIR/log.jsonl. Ctrl-C saves a checkpoint and exits.
"""

import argparse
import sys

import llama


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", required=True, help="base checkpoint (Meta or Hugging Face layout)")
    p.add_argument("--data", default="tinystories", help="'tinystories', or a .txt / .jsonl file (default tinystories)")
    p.add_argument("--data_dir", default="data", help="where TinyStories is downloaded and tokenized (default data/)")
    p.add_argument("--out_dir", default="out", help="checkpoints and log.jsonl go here (default out/)")
    p.add_argument("--mode", default="lora", help="lora, norm, lora+norm or full (default lora)")
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--lora_alpha", type=float, default=16.0)
    p.add_argument("--lora_dropout", type=float, default=0.0)
    p.add_argument("--lora_targets", default="wq,wk,wv,wo,w1,w2,w3",
                   help=f"comma-separated, among {','.join(llama.LORA_TARGETS)} (default: attention and MLP)")
    p.add_argument("--seq_len", type=int, default=512, help="tokens per training sequence (default 512)")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per micro-batch per process (default 8)")
    p.add_argument("--grad_accum", type=int, default=4, help="micro-batches per optimizer step (default 4)")
    p.add_argument("--max_steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4; ~1e-5 for --mode full)")
    p.add_argument("--warmup_steps", type=int, default=50)
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW decay, on matrices only (default 0)")
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--eval_every", type=int, default=100, help="validation loss every N steps (0: never)")
    p.add_argument("--eval_batches", type=int, default=10)
    p.add_argument("--sample_every", type=int, default=200, help="print a generated sample every N steps (0: never)")
    p.add_argument("--save_every", type=int, default=200)
    p.add_argument("--stop_at", type=int, default=None, help="save and stop after this step (continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out_dir")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--dtype", default=None, help="weights' dtype (default: bf16 on GPU, float32 on CPU; on CPU, bfloat16 makes LoRA "
                                                "training faster in half the memory)")
    p.add_argument("--activation_checkpointing", action="store_true", help="recompute activations: less memory")
    a = p.parse_args(argv)
    a.lora_targets = [t for t in a.lora_targets.split(",") if t]
    for name in ("batch_size", "grad_accum", "max_steps", "save_every"):
        if getattr(a, name) < 1:
            raise llama.InputError(f"--{name} must be at least 1")
    return a


if __name__ == "__main__":
    try:
        llama.finetune(parse_args())
    except llama.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

"""
Run Meta's official Llama 3 reference implementation (the `llama-models` package: its Llama3.build
and its generation loop) on a checkpoint directory, and print the generated token ids as JSON on
stdout. test_llama.py compares llama.py against this, token for token.

    pip install llama-models fairscale
    python reference.py --ckpt_dir DIR --prompt "The capital of France is" \\
        --max_gen_len 32 --temperature 0
    python reference.py --ckpt_dir DIR --prompt_tokens '[[128000, 791]]' --dtype bfloat16 --logprobs
    torchrun --nproc_per_node 2 reference.py --ckpt_dir DIR --prompt "Hi"   # model parallel 2
    python reference.py --ckpt_dir DIR --runs '[{"prompt": ["Hi"]}, {"temperature": 0.7}]'

Output: {"tokens": [[ids of prompt 1], ...], "stops": [stop token id or null, ...],
"logprobs": [[...], ...]}: generated tokens only, the stop token excluded (it is in "stops"), at
most --max_gen_len per prompt (as Meta's original llama3 generation.py truncates). With --runs, a
list of those, one per run: the model is built once, and each run starts from its own seed.

What this script has to work around, and why each is harmless to the comparison:
- Meta's generation module imports torchvision through its multimodal (vision) model, and there is
  no CPU torchvision wheel. If the real import fails, an empty stand-in module is registered; the
  text model never touches it.
- Meta's loader needs a torch.distributed process group (gloo on CPU) and fairscale's model parallel
  state; a single-process group is set up here, or torchrun's N processes are used (Meta's model
  parallel over N: its Llama3.build reshards the consolidated.NN.pth files to N). Rank 0 prints.
- Meta's loader sets the whole process's default dtype to bf16, so it runs in its own process. For a
  float32 run its model is converted with .float() after loading, from the same bf16 checkpoint
  values that llama.py reads.
- Meta's Transformer always has an output layer. A checkpoint without `output.weight` (tied
  embeddings) gets it as the embedding matrix itself, which is what tying means.
- Meta always uses the tokenizer bundled in its package (the real Llama 3 tokenizer.model),
  whatever is in DIR.
"""

import argparse
import contextlib
import gc
import json
import os
import socket
import sys
import types


def install_torchvision_stand_in():
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or the CUDA wheel that cannot load on this machine
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        sys.modules["torchvision.transforms"].functional = \
            sys.modules["torchvision.transforms.functional"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", required=True,
                   help="Meta-format checkpoint: params.json + consolidated.NN.pth")
    p.add_argument("--prompt", action="append", default=[],
                   help="a text prompt (repeatable); BOS is prepended")
    p.add_argument("--prompt_tokens", help="JSON list of token-id lists, used as given")
    p.add_argument("--max_gen_len", type=int, default=32)
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--logprobs", action="store_true")
    p.add_argument("--runs", help="JSON list of runs, each an object of the flags above that "
                   "change, e.g. [{\"prompt_tokens\": [[128000]], \"seed\": 3}]; a model is "
                   "built once for the runs of each ckpt_dir")
    a = p.parse_args()
    first = {**vars(a), "prompt_tokens": json.loads(a.prompt_tokens or "[]")}
    runs = [{**first, **run} for run in json.loads(a.runs or "[{}]")]
    for ckpt_dir in {run["ckpt_dir"] for run in runs}:
        if not os.path.exists(os.path.join(ckpt_dir, "params.json")):
            sys.exit(f"error: {ckpt_dir} has no params.json; "
                     "Meta's reference reads Meta's layout only "
                     f"(convert with: python convert.py convert {ckpt_dir} DIR --to meta)")

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", free_port()), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    install_torchvision_stand_in()
    import torch
    from llama_models.llama3 import generation

    meta_reshard = generation.maybe_reshard_state_dict

    def reshard_with_tied_output(*args, **kwargs):
        state_dict = meta_reshard(*args, **kwargs)
        if "output.weight" not in state_dict:
            state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
        return state_dict

    generation.maybe_reshard_state_dict = reshard_with_tied_output

    # Meta prints progress to stdout; keep stdout for the JSON
    batch = max([1] + [len(r["prompt_tokens"]) + len(r["prompt"]) for r in runs])
    llama, built, outs = None, None, []
    with contextlib.redirect_stdout(sys.stderr):
        for run in runs:
            if run["ckpt_dir"] != built:
                del llama  # one model at a time
                llama = generation.Llama3.build(run["ckpt_dir"], max_seq_len=a.max_seq_len,
                                                max_batch_size=batch, seed=a.seed, device="cpu",
                                                world_size=int(os.environ["WORLD_SIZE"]))
                built = run["ckpt_dir"]
                if a.dtype == "float32":
                    llama.model.float()
            torch.manual_seed(run["seed"])  # (as Llama3.build seeds, for every run)
            outs.append(generate(llama, run))
    if os.environ["RANK"] == "0":
        print(json.dumps(outs if a.runs else outs[0]))
    del llama, outs
    gc.collect()  # gloo's threads joined while Python runs (else one can abort the exit)
    torch.distributed.destroy_process_group()


def generate(llama, run):
    """One run through Meta's generation loop -> its tokens and stops (and logprobs)."""
    from llama_models.llama3.chat_format import LLMInput

    prompts = run["prompt_tokens"] + [llama.formatter.encode_content(text).tokens
                                      for text in run["prompt"]]
    tokens, logprobs = [[] for _ in prompts], [[] for _ in prompts]
    finished, stops = [False] * len(prompts), [None] * len(prompts)
    for results in llama.generate([LLMInput(tokens=t) for t in prompts],
                                  temperature=run["temperature"], top_p=run["top_p"],
                                  max_gen_len=run["max_gen_len"], logprobs=run["logprobs"]):
        for r in results:
            i = r.batch_idx
            if r.source != "output" or r.ignore_token or finished[i]:
                continue
            if r.finished:  # this token is the stop token
                finished[i], stops[i] = True, r.token
                continue
            tokens[i].append(r.token)
            if run["logprobs"]:
                logprobs[i].append(r.logprobs[0])
            finished[i] = len(tokens[i]) >= run["max_gen_len"]
        if all(finished):
            break
    out = {"tokens": tokens, "stops": stops}
    if run["logprobs"]:
        out["logprobs"] = logprobs
    return out


if __name__ == "__main__":
    main()

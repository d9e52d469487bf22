"""
Tests of parallel.py: tensor-parallel generation against Meta's reference at the same model-parallel
size (both under torchrun, gloo on CPU), per-process memory against the planning function, and
FSDP2 finetuning against DDP.

    python -m pytest -q test_parallel.py
"""

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import checkpoints
import convert
import generate
import llama
import parallel
from test_llama import (META_TOKENIZER, PROMPTS, TOKENIZER, read_log, reference_argv,
                        run_processes, run_script, tiny_args, torchrun)

HERE = Path(__file__).parent

# Loads each job's checkpoint under torchrun through generate.load (the tensor-parallel path) and
# writes every process's results; rank 0 saves the logits of one prefill where a job asks. Then, in
# the same processes, Meta's reference at the same model-parallel size where sys.argv[4] gives its
# flags: one start-up of torch for both. Meta's Llama3.build makes its model-parallel groups over
# the process group ours made (as it would over its own), and ours leaves torch's settings as it
# found them (checked: Meta's code reads the defaults it sets itself).
WORKER = """
import contextlib, json, os, sys
sys.path.insert(0, sys.argv[1])
import torch, conftest, generate, parallel, reference
settings = conftest.numeric_settings()
jobs, results = json.loads(open(sys.argv[2]).read()), []
for job in jobs:
    g = generate.load(job["ckpt"], max_seq_len=512, max_batch_size=4, device="cpu",
                      dtype=job.get("dtype", "float32"), seed=job.get("seed", 1),
                      quantize=job.get("quantize"))
    out = {"bytes": parallel.local_bytes(g.model) - g.model.freqs_cis.numel() * 8,
           "n_kv_heads": g.model.layers[0].attention.n_kv_heads}
    ids = job["ids"]
    out["tokens"], _, out["stops"] = g.generate(ids, 24, temperature=job.get("temperature", 0),
                                                top_p=0.9)
    if job.get("logits"):
        with torch.inference_mode():
            logits = g.model(torch.tensor([ids[0]]))
        if os.environ["RANK"] == "0":
            torch.save(logits, job["logits"])
    results.append(out)
every = [None] * int(os.environ["WORLD_SIZE"])
torch.distributed.all_gather_object(every, results)
if os.environ["RANK"] == "0":
    open(sys.argv[3], "w").write(json.dumps(every))
torch.distributed.barrier()
del g
assert conftest.numeric_settings() == settings, (conftest.numeric_settings(), settings)
if len(sys.argv) > 5:
    out = sys.argv[5] if os.environ["RANK"] == "0" else os.devnull
    sys.argv = ["reference.py", *json.loads(sys.argv[4])]
    with open(out, "w") as f:
        with contextlib.redirect_stdout(f):
            reference.main()  # (it ends the process group)
parallel.end_processes()  # (gloo can abort at exit without it)
"""


def launch(root, n, jobs, meta=None):
    """Our jobs ({name: job}) on n processes, then Meta's run (run_meta's arguments) in the same
    processes -> ({name: the job and rank 0's results}, Meta's results, the log), after checking
    that every rank had the same tokens."""
    (root / "worker.py").write_text(WORKER)
    (root / "jobs.json").write_text(json.dumps(list(jobs.values())))
    argv = [root / "worker.py", HERE, root / "jobs.json", root / "out.json"]
    if meta is not None:
        argv += [json.dumps(reference_argv(**meta)), root / "meta.json"]
    r = run_processes(n, argv)
    assert r.returncode == 0, r.stderr[-3000:]
    every = json.loads((root / "out.json").read_text())
    for job in range(len(jobs)):  # the ranks never diverge: each sampled the same tokens
        assert all(e[job]["tokens"] == every[0][job]["tokens"] for e in every)
    ours = {name: {**job, **out} for (name, job), out in zip(jobs.items(), every[0])}
    meta = None if meta is None else json.loads((root / "meta.json").read_text())
    return ours, meta, r.stderr


IDS = [TOKENIZER.encode(p, bos=True) for p in PROMPTS]
# (a batch with a 1-token prompt and the 201-token one costs Meta's loop 224 one-token steps: the
# long prompt goes only where it is the point)
SHORT = IDS[:3]


@pytest.fixture(scope="module")
def ckpt_405b_style(tmp_path_factory, ckpt_stops):
    """ckpt_stops as Meta ships 405B for 16 ranks: n_kv_heads doubled in params.json, each K/V head
    stored twice, one file per query head (4 files)."""
    args, sd = checkpoints.load_checkpoint(ckpt_stops)
    hd, out = args.head_dim, dict(sd)
    for key in sd:
        if key.endswith(("wk.weight", "wv.weight")):
            out[key] = sd[key].view(args.n_kv_heads, 1, hd, -1).expand(-1, 2, -1, -1).reshape(
                2 * args.n_kv_heads * hd, -1)
    path = tmp_path_factory.mktemp("405b") / "ckpt"
    convert.save_meta_checkpoint(replace(args, n_kv_heads=2 * args.n_kv_heads), out, path,
                                 META_TOKENIZER, n_shards=4)
    return path


@pytest.fixture(scope="module")
def ckpt_wide(tmp_path_factory):
    """8 query and 4 K/V heads in 4 files (merged two by two on 2 processes), and the same weights
    as Hugging Face safetensors over several files with an index."""
    args = tiny_args(dim=128, n_heads=8, n_kv_heads=4, ffn_hidden_dim=384)
    sd = convert.random_state_dict(args, seed=4)
    root = tmp_path_factory.mktemp("wide")
    convert.save_meta_checkpoint(args, sd, root / "meta", META_TOKENIZER, n_shards=4)
    convert.save_hf_checkpoint(args, sd, root / "hf", META_TOKENIZER, max_shard_bytes=2**22)
    assert len(list((root / "hf").glob("*.safetensors"))) > 2
    return root


@pytest.fixture(scope="module")
def ckpt_tied(tmp_path_factory):  # Llama 3.2 style: the output is the embedding
    args = tiny_args(tie_embeddings=True)
    path = tmp_path_factory.mktemp("tied") / "ckpt"
    convert.save_meta_checkpoint(args, convert.random_state_dict(args, seed=3), path,
                                 META_TOKENIZER, n_shards=1)
    return path


SAMPLED_TP = dict(temperature=0.8, seed=7)
TIED = (("float32", None), ("bfloat16", None), ("bfloat16", "int8"), ("bfloat16", "int4"))


@pytest.fixture(scope="module")
def two(tmp_path_factory, ckpt_stops, ckpt_wide, ckpt_405b_style, ckpt_tied):
    """The jobs of the tests below at 2 processes, then Meta's runs at model parallel 2, in one
    launch -> launch's results."""
    root = tmp_path_factory.mktemp("two")
    jobs = {"batch": dict(ckpt=str(ckpt_stops), ids=IDS),
            "long": dict(ckpt=str(ckpt_stops), ids=IDS[3:]),
            "sampled": dict(ckpt=str(ckpt_stops), ids=SHORT, **SAMPLED_TP),
            "wide": dict(ckpt=str(ckpt_wide / "meta"), ids=SHORT),
            "wide hf": dict(ckpt=str(ckpt_wide / "hf"), ids=SHORT),
            "405b": dict(ckpt=str(ckpt_405b_style), ids=IDS[3:])}
    for dtype, q in TIED:
        jobs[f"tied {q or dtype}"] = dict(ckpt=str(ckpt_tied), ids=IDS[:1], dtype=dtype,
                                          quantize=q, logits=str(root / f"{q or dtype}.pt"))
    return launch(root, 2, jobs, dict(ckpt_dir=ckpt_stops, runs=[
        dict(prompt_tokens=IDS), dict(prompt_tokens=IDS[3:]),
        dict(prompt_tokens=SHORT, **SAMPLED_TP),
        dict(prompt_tokens=SHORT, ckpt_dir=str(ckpt_wide / "meta"))]))


def test_tensor_parallel_is_token_exact_with_meta_at_the_same_size(tmp_path, two, ckpt_stops,
                                                                   ckpt_wide):
    # float32 greedy: a ragged batch whose rows stop at different steps, one long prompt alone,
    # and sampled (temperature, top-p): Meta's tokens and stop tokens, at model parallel 2 and 4
    ours, (meta, meta_long, meta_sampled, meta_wide), log = two
    assert "weights per process: " in log
    assert (ours["batch"]["tokens"], ours["batch"]["stops"]) == (meta["tokens"], meta["stops"])
    assert len({s for s in meta["stops"] if s is not None}) >= 2  # rows end on stop tokens
    meta_long = meta_long["tokens"]
    assert ours["long"]["tokens"] == meta_long
    assert ours["sampled"]["tokens"] == meta_sampled["tokens"]
    # 4 files on 2 processes (joined two by two), and the same weights in HF's layout
    assert ours["wide"]["tokens"] == meta_wide["tokens"] == ours["wide hf"]["tokens"]
    # 405B's duplicated K/V heads are dropped on 2 processes: one K/V head each, the same model
    assert ours["405b"]["n_kv_heads"] == 1
    assert ours["405b"]["tokens"] == meta_long
    # 4 processes: Meta's at 4 (its code needs a K/V head per process), and more processes than
    # K/V heads, each head copied to two (Meta's cannot: its greedy tokens at 2, float32 apart)
    four, meta_four, _ = launch(tmp_path, 4, {
        "wide": dict(ckpt=str(ckpt_wide / "meta"), ids=SHORT),
        "long": dict(ckpt=str(ckpt_stops), ids=IDS[3:])},
        dict(ckpt_dir=ckpt_wide / "meta", prompt_tokens=SHORT))
    assert four["wide"]["tokens"] == meta_four["tokens"]
    assert four["long"]["n_kv_heads"] == 1 and four["long"]["tokens"] == meta_long


def test_tied_quantized_and_memory_per_process(two, ckpt_tied):
    # Meta's code has no tied output: the tied model under tensor parallel against one process of
    # ours, logits within float32 summation order (1e-5 relative); bf16 and quantized shards
    # against one process in bf16 and quantized alike (the same quantized weights): 1e-2 covers
    # bf16's partial sums, a tenth of what int8's rounding alone moves the logits.
    # Each process's bytes are the planning function's, and at most 1/N plus the norms.
    args = tiny_args(tie_embeddings=True)
    for dtype, q in TIED:
        job = two[0][f"tied {q or dtype}"]
        one = generate.load(ckpt_tied, max_seq_len=512, device="cpu", dtype=job["dtype"],
                            quantize=job["quantize"])
        with torch.inference_mode():
            expected = one.model(torch.tensor([IDS[0]]))
        got, tol = torch.load(job["logits"]), 1e-5 if job["dtype"] == "float32" else 1e-2
        assert (got - expected).norm() <= tol * expected.norm(), job
        if job["dtype"] == "bfloat16" and not job["quantize"]:
            continue  # packed for oneDNN: not parameters any more
        fmt, scale = job["quantize"] or "bf16", 2 if job["dtype"] == "float32" else 1
        assert job["bytes"] == scale * parallel.bytes_per_process(args, 2, fmt), job
        norms = (2 * args.n_layers + 1) * args.dim * 2
        whole = parallel.bytes_per_process(args, 1, fmt)
        # 1/N, plus the replicated: norms, and int8's scales of the rows that wo and w2 cut
        assert job["bytes"] <= scale * ((whole - norms) / 2 + norms) * 1.001, job


def test_sizes_that_do_not_divide_fail_in_one_line_before_loading(ckpt_gqa):
    args = tiny_args()  # 4 heads, 2 K/V heads
    with pytest.raises(llama.InputError, match=r"use --nproc_per_node in \[1, 2, 4\]"):
        parallel.check_tensor_parallel(args, 3)
    r = subprocess.run([*torchrun(3), str(HERE / "generate.py"), "--ckpt_dir", str(ckpt_gqa),
                        "--prompt", "Hi"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "error: 3 processes cannot split this model" in r.stderr
    # each process exits 2 with the message (torchrun then reports its failed children)
    assert "InputError" not in r.stderr and "loading" not in r.stderr


def test_planning_bytes_are_the_real_ones_in_one_process(ckpt_gqa):
    # the planning function against real models (untied, one process), and the table's shape
    args = checkpoints.read_args(ckpt_gqa)
    for q in (None, "int8", "int4"):  # (float32 for bf16: packed bf16 weights are no parameters)
        g = generate.load(ckpt_gqa, max_seq_len=64, device="cpu",
                          dtype="bfloat16" if q else "float32", quantize=q)
        real = parallel.local_bytes(g.model) - g.model.freqs_cis.numel() * 8
        assert real == (1 if q else 2) * parallel.bytes_per_process(args, 1, q or "bf16")
    table = parallel.planning_table()
    assert table.count("\n") == 1 + 9 and "| 405B | int4 |" in table
    # 405B in bf16 is 810 GB: on 16 processes, about 51 GB each plus its KV cache
    b = parallel.bytes_per_process(llama.ModelArgs(vocab_size=128256, **parallel.SIZES["405B"]),
                                   16)
    assert 50e9 < b < 52e9


def test_405b_style_duplicated_kv_heads_merge_in_one_process(ckpt_405b_style, ckpt_stops):
    args, sd = checkpoints.load_checkpoint(ckpt_405b_style)
    ref_args, ref = checkpoints.load_checkpoint(ckpt_stops)
    assert args.n_kv_heads == ref_args.n_kv_heads == 2
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


# ----------------------------------------------------------------------------- FSDP2 finetuning

# Runs finetune.main over each (out_dir, argv) in turn in the same processes (one start-up of
# torch and one rendezvous for all of them; main runs a whole run from its flags, seeds included,
# and init_processes keeps the group it finds); rank 0's log of each run goes to OUT_DIR.log.
FINETUNE_WORKER = """
import contextlib, json, os, sys
sys.path.insert(0, sys.argv[1])
import finetune, parallel
for out_dir, argv in json.loads(open(sys.argv[2]).read()):
    with open(f"{out_dir}.{os.environ['RANK']}.log", "w") as err, contextlib.redirect_stderr(err):
        finetune.main(argv)
parallel.end_processes()
"""
FINETUNE_FLAGS = ["--seq_len", 64, "--grad_accum", 2, "--max_steps", 4, "--lr", 3e-3,
                  "--eval_every", 2, "--eval_batches", 2, "--sample_every", 0, "--device", "cpu",
                  "--batch_size", 2, "--save_every", 2]
FSDP_MODES = {"full": (), "lora+norm": ("--dtype", "bfloat16", "--activation_checkpointing")}


def finetune_argv(out_dir, *flags):
    return [str(x) for x in [*FINETUNE_FLAGS, *flags, "--out_dir", out_dir]]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, ckpt_gqa, corpus):
    """Both modes' runs under DDP and FSDP2 on 2 processes, and lora+norm's FSDP run stopped at
    step 2 and resumed (--resume alone: the run's own settings), in one launch; then full's run
    in one process of 4 rows (here: finetune.main, as test_llama's finetuning tests run it).
    -> the root, OUT_DIR per run under it: root / mode / {ddp, fsdp, stop, one}."""
    root = tmp_path_factory.mktemp("fsdp")
    runs = []
    for mode, extra in FSDP_MODES.items():
        flags = ["--ckpt_dir", ckpt_gqa, "--data", corpus, "--mode", mode, *extra]
        (root / mode).mkdir()
        runs += [(root / mode / "ddp", flags), (root / mode / "fsdp", [*flags, "--fsdp"])]
    flags = runs[-1][1]
    runs += [(root / "lora+norm" / "stop", [*flags, "--stop_at", 2]),
             (root / "lora+norm" / "stop", ["--resume"])]
    (root / "worker.py").write_text(FINETUNE_WORKER)
    (root / "runs.json").write_text(json.dumps([(str(out), finetune_argv(out, *flags))
                                                for out, flags in runs]))
    r = run_processes(2, [root / "worker.py", HERE, root / "runs.json"])
    assert r.returncode == 0, r.stderr[-3000:]
    import finetune

    finetune.main(finetune_argv(root / "full" / "one", *runs[0][1], "--batch_size", 4))
    return root


def same_losses(a, b, rel):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        key = "loss" if "loss" in x else "val_loss"
        assert math.isclose(x[key], y[key], rel_tol=rel), (x, y)


@pytest.mark.parametrize("mode", FSDP_MODES)
def test_fsdp_losses_equal_ddp_and_its_checkpoint_generates(fsdp_runs, ckpt_gqa, mode):
    runs = fsdp_runs / mode
    ddp, fsdp = read_log(runs / "ddp"), read_log(runs / "fsdp")
    same_losses(ddp, fsdp, rel=1e-4)
    if mode == "full":  # and DDP's two processes of 2 rows are one process of 4 (float32)
        same_losses(read_log(runs / "one"), ddp, rel=1e-5)
    assert "parameters per process:" in (runs / "fsdp.0.log").read_text()
    # the one whole checkpoint rank 0 wrote is read as any run is
    prompt = [TOKENIZER.encode("Tom had a", bos=True)]
    a, b = (generate.load(ckpt_gqa, max_seq_len=64, device="cpu", lora=runs / r)
            .generate(prompt, 12, temperature=0)[0] for r in ("ddp", "fsdp"))
    assert a == b
    if mode == "full":
        return
    # stopped at step 2 and resumed under FSDP: exactly the uninterrupted run's losses
    same_losses(read_log(runs / "stop"), fsdp, rel=1e-6)


def test_bench_scale_view_and_fsdp_holds_half_of_everything(bench_ckpt_root):
    # bench_scale.py end to end on the tiny shape: tensor-parallel decoding at N=1 and 2, and a
    # full-finetuning step under DDP and FSDP2 on 2 processes
    r = subprocess.run([sys.executable, str(HERE / "bench_scale.py"), "--shape", "tiny",
                        "--scale_mode", "full", "--prompt_len", "8", "--new_tokens", "4",
                        "--prefill_len", "16", "--lora_steps", "1", "--json", "--ckpt_root",
                        str(bench_ckpt_root)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = {(x["kind"], x["processes"]): x["ranks"] for x in json.loads(r.stdout)["scale"]}
    assert all(runs.values()), r.stderr[-3000:]
    one, two = runs["decode", 1][0], runs["decode", 2]
    assert all(x["decode_b1_tok_s"] > 0 and x["peak_rss_gb"] > 0 for x in [one, *two])
    assert all(x["planned_weights_gb"] < one["planned_weights_gb"] for x in two)
    for key in ("params_gb", "grads_gb", "adamw_gb"):  # FSDP: half of DDP's whole copy, each rank
        whole = [x[key] for x in runs["ddp", 2]]
        assert whole[0] == whole[1] > 0, runs  # (DDP: the same in every process)
        assert all(whole[0] / 2 <= x[key] <= whole[0] / 2 * 1.01 for x in runs["fsdp", 2]), runs


def test_fsdp_refuses_quantized_bases(ckpt_gqa, corpus, tmp_path):
    r = run_script("finetune.py", "--ckpt_dir", ckpt_gqa, "--data", corpus, "--fsdp",
                   "--quantize", "int4", "--out_dir", tmp_path / "q")
    assert r.returncode == 2 and r.stderr.startswith("error: --fsdp shards parameters")

"""
Tests for the interchange formats of checkpoints.py (readers) and convert.py (writers), issue 14:
tokenizer.json both ways, PEFT LoRA adapters both ways, GGUF out. transformers, peft and gguf are the
independent readers and writers.

    python -m pytest -q test_formats.py
"""

import json
import math

import pytest
import torch

import checkpoints
import convert
import generate
import llama
from llama import InputError

META_TOKENIZER = convert.bundled_tokenizer()
TOKENIZER = checkpoints.read_tokenizer(META_TOKENIZER)

# Unicode, emoji, code, whitespace runs, long runs, numbers, and every
# special-token string as plain text.
CORPUS = [
    "The capital of France is Paris.", "", " ",
    "Ünïcödé: 日本語のテキスト, emoji 🦙🔥👩‍👩‍👧 and ça va?",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\n\n\n    if x != 0 && y >= 1e-5: pass\r\n",
    "spaces    between  \t\t words\n \n  \n", "a" * 3000, " " * 500 + "x",
    "1234567890 3.14159 -0.5e10", "I'm sure they'll say we've done it, didn't you? 'S 'T",
    "Привет, мир! مرحبا بالعالم 🙂 ∑∫√∞ ≠ ≤",
    "".join(llama.SPECIAL_TOKENS),
    "text<|eot_id|>more<|begin_of_text|> <|reserved_special_token_250|>",
    "\x00\x01\x7f\u200b\ufeff tabs\tand\u00a0nbsp", "https://example.com/path?q=1&r=%20#frag",
]


def tiny_args(**overrides):
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_hidden_dim=192,
                multiple_of=32, use_scaled_rope=True)
    return llama.ModelArgs(**{**base, **overrides})


@pytest.fixture(scope="module")
def meta_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("meta") / "ckpt"
    args = tiny_args()
    convert.save_meta_checkpoint(
        args, convert.random_state_dict(args, seed=3, dtype=torch.float32), path,
        META_TOKENIZER)
    return path


@pytest.fixture(scope="module")
def hf_ckpt(meta_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "ckpt"
    convert.main(["convert", str(meta_ckpt), str(path), "--to", "hf"])
    return path


def hf_model(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def our_model(ckpt):
    return llama.build_model(*checkpoints.load_checkpoint(ckpt), "cpu", torch.float32)


TOKENS = torch.tensor([TOKENIZER.encode(CORPUS[3], bos=True)[:24]])


# ----------------------------------------------------------------------------- tokenizer.json

def test_tokenizer_json_matches_tokenizer_model_and_transformers(hf_ckpt):
    from transformers import AutoTokenizer

    assert json.loads((hf_ckpt / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    ours = checkpoints.read_tokenizer_json(hf_ckpt / "tokenizer.json")
    assert ours.ranks == TOKENIZER.ranks and ours.special_tokens == TOKENIZER.special_tokens
    assert (hf_ckpt / "original" / "tokenizer.model").read_bytes() == META_TOKENIZER.read_bytes()
    # special strings as plain text
    hf = AutoTokenizer.from_pretrained(hf_ckpt, split_special_tokens=True)
    for text in CORPUS:
        expected = TOKENIZER.encode(text)
        assert ours.encode(text) == expected, text
        assert hf.encode(text, add_special_tokens=False) == expected, text
        assert hf.decode(expected) == text == ours.decode(expected)
    assert hf.encode("Hi")[0] == TOKENIZER.bos_id  # the post-processor prepends <|begin_of_text|>
    hf = AutoTokenizer.from_pretrained(hf_ckpt)
    dialogs = [[{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi, who are you?"}],
               [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 🦙 in French?"}],
               [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "get(city='Paris')",
                 "stop_reason": "end_of_message"},
                {"role": "tool", "content": "sunny"}]]
    # (contents without special-token strings: a template renders text that is then parsed for them,
    # where our encode_dialog keeps the user's "<|eot_id|>" as plain text)
    for dialog in dialogs:
        got = hf.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
        got = got["input_ids"] if isinstance(got, dict) or hasattr(got, "keys") else got
        assert got == TOKENIZER.encode_dialog_prompt(dialog), dialog


def test_hub_side_files(hf_ckpt):
    cfg = json.loads((hf_ckpt / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|begin_of_text|>" and cfg["eos_token"] == "<|end_of_text|>"
    assert cfg["added_tokens_decoder"]["128009"]["content"] == "<|eot_id|>" and \
        cfg["model_max_length"] == 131072
    assert json.loads((hf_ckpt / "generation_config.json").read_text())["eos_token_id"] == \
        [128001, 128008, 128009]
    special = json.loads((hf_ckpt / "special_tokens_map.json").read_text())
    assert special["bos_token"]["content"] == "<|begin_of_text|>"
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(hf_ckpt).eos_token_id == [128001, 128008, 128009]


def test_directory_with_tokenizer_json_only(hf_ckpt, tmp_path):
    import shutil

    d = tmp_path / "hf_json_only"
    shutil.copytree(hf_ckpt, d)
    shutil.rmtree(d / "original")
    assert checkpoints.find_tokenizer(d) == d / "tokenizer.json"
    # preferred
    assert checkpoints.find_tokenizer(hf_ckpt) == hf_ckpt / "original" / "tokenizer.model"
    g = generate.load(d, max_seq_len=64, device="cpu")
    assert g.tokenizer.ranks == TOKENIZER.ranks
    # converting it back to Meta's layout writes tokenizer.model from the
    # ranks: the same file as Meta's
    convert.main(["convert", str(d), str(tmp_path / "meta"), "--to", "meta"])
    assert (tmp_path / "meta" / "tokenizer.model").read_bytes() == META_TOKENIZER.read_bytes()


def test_tokenizer_json_of_another_kind_is_one_line_error(hf_ckpt, tmp_path):
    good = json.loads((hf_ckpt / "tokenizer.json").read_text())
    llama2 = {**good,
              "normalizer": {"type": "Sequence",
                             "normalizers": [{"type": "Prepend", "prepend": "▁"}]},
              "pre_tokenizer": None, "model": {**good["model"], "byte_fallback": True}}
    wordpiece = {**good,
                 "model": {"type": "WordPiece", "vocab": {"[UNK]": 0}, "unk_token": "[UNK]"}}
    gpt2 = {**good,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}
    swapped = {**good, "added_tokens": [{**t, "content": "<|x|>"} if t["id"] == 128009 else t
                                        for t in good["added_tokens"]]}
    ids = dict(good["model"]["vocab"])
    ids["Ġthe"], ids["Ġa"] = ids["Ġa"], ids["Ġthe"]  # ids that are not the merge order
    reordered = {**good, "model": {**good["model"], "vocab": ids}}
    for name, content, words in [("llama2", llama2, "SentencePiece"),
                                 ("wordpiece", wordpiece, "WordPiece"),
                                 ("gpt2", gpt2, "pre-tokenizer"),
                                 ("swapped", swapped, "special tokens"),
                                 ("reordered", reordered, "merge")]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(content))
        with pytest.raises(InputError, match=words) as e:
            checkpoints.read_tokenizer_json(path)
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- PEFT adapters

LORA = dict(targets=["wq", "wk", "wv", "w2", "output"], rank=4, alpha=12.0)


def random_lora(model, seed=0):
    llama.apply_lora(model, LORA["targets"], LORA["rank"], LORA["alpha"])
    g = torch.Generator().manual_seed(seed)
    for m in checkpoints.lora_modules(model).values():
        # nonzero: the adapter does something
        m.lora_b.data = torch.randn(m.lora_b.shape, generator=g) * 0.1
    return model


def write_run(model, ckpt, run_dir):
    """A finetune run directory as finetune.py leaves it, for a LoRA model (no training needed)."""
    from safetensors.torch import save_file

    (run_dir / "checkpoint").mkdir(parents=True)
    trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if ".lora_" in n}
    save_file(trained, run_dir / "checkpoint" / "trainable.safetensors")
    run = {"mode": "lora", "lora_rank": LORA["rank"], "lora_alpha": LORA["alpha"],
           "lora_dropout": 0.0, "lora_targets": LORA["targets"], "ckpt_dir": str(ckpt), "step": 1}
    (run_dir / "checkpoint" / "run.json").write_text(json.dumps(run))
    return run_dir


def test_our_lora_run_as_peft_adapter_in_transformers(meta_ckpt, hf_ckpt, tmp_path, capsys):
    from peft import PeftModel

    model = random_lora(our_model(meta_ckpt))
    with torch.no_grad():
        expected = model(TOKENS)
    run = write_run(model, meta_ckpt, tmp_path / "run")
    convert.main(["export", str(run), str(tmp_path / "adapter"), "--to", "peft"])
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 12.0 and cfg["task_type"] == "CAUSAL_LM"
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "down_proj", "lm_head"}
    hf = PeftModel.from_pretrained(hf_model(hf_ckpt), tmp_path / "adapter").eval()
    with torch.no_grad(), hf.disable_adapter():
        base = hf(TOKENS).logits
    with torch.no_grad():
        got = hf(TOKENS).logits
    assert not torch.allclose(got, base, atol=1e-3)  # the adapter acts
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # and back: the adapter applied here, unmerged and merged, and through generate.load(lora=...)
    back = checkpoints.load_peft_adapter(our_model(hf_ckpt), tmp_path / "adapter")
    for name, m in checkpoints.lora_modules(back).items():
        assert torch.equal(m.lora_b, checkpoints.lora_modules(model)[name].lora_b), name
    g = generate.load(hf_ckpt, max_seq_len=64, device="cpu", dtype="float32",
                      lora=tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(g.model(TOKENS), expected, atol=1e-4, rtol=1e-4)
    capsys.readouterr()
    generate.main(["--ckpt_dir", str(hf_ckpt), "--lora", str(tmp_path / "adapter"),
                   "--prompt", "Tom had a",
                   "--max_new_tokens", "6", "--temperature", "0", "--dtype", "float32"])
    tokens = g.text_completion(["Tom had a"], temperature=0, max_gen_len=6)[0]["tokens"]
    assert capsys.readouterr().out == "Tom had a" + g.tokenizer.decode(tokens) + "\n"
    # a model object exports the same adapter
    convert.save_peft_adapter(model, tmp_path / "adapter2")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "adapter" / "adapter_model.safetensors"), \
        load_file(tmp_path / "adapter2" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_peft_made_adapter_applies_here(hf_ckpt, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=6, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"])
    hf = get_peft_model(hf_model(hf_ckpt), config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = hf.eval()(TOKENS).logits
    model = checkpoints.load_peft_adapter(our_model(hf_ckpt), tmp_path / "peft")
    assert {n.rsplit(".", 1)[-1] for n in checkpoints.lora_modules(model)} == \
        {"wq", "wk", "wo", "w1", "w3"}
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), expected, atol=1e-4, rtol=1e-4)
        merged = checkpoints.load_finetuned(our_model(hf_ckpt), tmp_path / "peft")
        torch.testing.assert_close(merged(TOKENS), expected, atol=1e-4, rtol=1e-4)
    # finetune.py --lora_init starts from it: its modules, rank and alpha, and its weights (one step
    # at a negligible learning rate moves them by about 1e-9)
    import finetune

    corpus = tmp_path / "stories.txt"
    corpus.write_text("\n\n".join(f"Tom had {i} red balls. Tom was happy." for i in range(200)))
    tuned, _ = finetune.main(["--ckpt_dir", str(hf_ckpt), "--data", str(corpus), "--out_dir",
                              str(tmp_path / "run"), "--lora_init", str(tmp_path / "peft"),
                              "--seq_len", "32", "--batch_size", "2", "--grad_accum", "1",
                              "--max_steps", "1", "--lr", "1e-9", "--eval_every", "0",
                              "--sample_every", "0", "--device", "cpu"])
    started, adapter = checkpoints.lora_modules(tuned), checkpoints.lora_modules(model)
    assert started.keys() == adapter.keys()
    for name, m in started.items():
        assert m.scale == adapter[name].scale and m.lora_a.shape == adapter[name].lora_a.shape
        torch.testing.assert_close(m.lora_b, adapter[name].lora_b, atol=1e-6, rtol=0)


def test_peft_errors_are_one_line(meta_ckpt, tmp_path):
    d = tmp_path / "dora"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                       "use_dora": True}))
    with pytest.raises(InputError, match="DoRA"):
        checkpoints.check_finetuned(d)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(InputError, match="not LORA"):
        checkpoints.check_finetuned(d)
    model = our_model(meta_ckpt)
    llama.apply_lora(model, ["wq"], 4, 8.0)
    run = write_run(model, meta_ckpt, tmp_path / "run")
    cfg = json.loads((run / "checkpoint" / "run.json").read_text())
    (run / "checkpoint" / "run.json").write_text(json.dumps({**cfg, "mode": "lora+norm"}))
    with pytest.raises(InputError, match="norms"):
        convert.save_peft_adapter(run, tmp_path / "out")


# ----------------------------------------------------------------------------- GGUF

def read_gguf(path):
    import gguf
    import numpy as np

    class Reader(gguf.GGUFReader):
        # GGUFReader parses the file through ~3M slices of its np.memmap, and each slice of a
        # memmap runs numpy's Python __array_finalize__: three quarters of its 10 s on Llama 3's
        # tokenizer. A plain array over the same mapped bytes is parsed by the same code.
        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, mapped):
            self._plain = np.asarray(mapped)

    reader = Reader(path)
    fields = {name: f.contents() for name, f in reader.fields.items()
              if not name.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def dequantized(t):
    import gguf

    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(
        tuple(int(n) for n in reversed(t.shape)))


# GGUFReader parses every string of a file in Python: ~15 s (3 s over a plain array, read_gguf) for
# the 128,256 tokens and 280,147 merges of Llama 3. So the real tokenizer is read back once (an f32
# file); the other files are of a model whose tokenizer is the 256 single bytes (vocabulary 512
# with the special tokens), read back in a moment.
BYTES_TOKENIZER = llama.Tokenizer({bytes([i]): i for i in range(256)}, "bytes")


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    convert.write_tokenizer_model(BYTES_TOKENIZER, d / "bytes.model")
    args = tiny_args(vocab_size=512)
    sd = convert.random_state_dict(args, seed=5, dtype=torch.float32)
    convert.save_meta_checkpoint(args, sd, d / "ckpt", d / "bytes.model")
    return d / "ckpt"


def check_gguf_tensors(sd, tensors, dtype):
    """Every tensor equal to the source: f32 and bf16 exactly, q8_0 within its quantization step."""
    import gguf

    for key, want in sd.items():
        t = tensors[convert.gguf_name(key)]
        got = dequantized(t)
        assert got.shape == want.shape, key
        if want.dim() == 1 or dtype == "f32":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and \
                torch.equal(got, want.float()), key
        elif dtype == "bf16":
            assert t.tensor_type == gguf.GGMLQuantizationType.BF16
            assert torch.equal(got, want.to(torch.bfloat16).float()), key
        else:  # within half a step of its block of 32 (step = max |x| / 127), and the f16
            # rounding of the step
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            blocks, err = want.float().reshape(-1, 32), (got - want.float()).reshape(-1, 32)
            step = blocks.abs().amax(1, keepdim=True) / 127
            assert (err.abs() <= 0.57 * step).all() and (err != 0).any(), key


def test_gguf_holds_the_model_and_the_llama3_tokenizer(meta_ckpt, tmp_path):
    import gguf

    path = tmp_path / "model.gguf"
    convert.main(["convert", str(meta_ckpt), str(path), "--to", "gguf", "--gguf_dtype", "f32"])
    args, sd = checkpoints.load_checkpoint(meta_ckpt)
    fields, tensors = read_gguf(path)
    assert not list(tmp_path.glob(".*.tmp"))
    assert fields["tokenizer.ggml.add_eos_token"] is False
    expected = {"general.architecture": "llama", "llama.context_length": 131072,
                "llama.embedding_length": 64, "llama.block_count": 2,
                "llama.feed_forward_length": 192, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.rope.freq_base": 500000.0,
                "llama.attention.key_length": 16, "llama.rope.dimension_count": 16,
                "llama.vocab_size": 128256, "general.file_type": 0, "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.bos_token_id": 128000,
                "tokenizer.ggml.eos_token_id": 128001, "tokenizer.ggml.eot_token_id": 128009,
                "tokenizer.ggml.eom_token_id": 128008,
                "tokenizer.ggml.add_bos_token": True,
                "tokenizer.chat_template": checkpoints.CHAT_TEMPLATE}
    assert {k: fields.get(k) for k in expected} == expected
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    # the tokenizer: byte-level strings back to our ranks, 256 control tokens,
    # merges as in tokenizer.json
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 128256 and tokens[128000:] == llama.SPECIAL_TOKENS
    assert {bytes(checkpoints.UNICODE_TO_BYTE[c] for c in s): i
            for i, s in enumerate(tokens[:128000])} == TOKENIZER.ranks
    assert set(types[:128000]) == {gguf.TokenType.NORMAL} and \
        set(types[128000:]) == {gguf.TokenType.CONTROL}
    merges = fields["tokenizer.ggml.merges"]
    assert len(merges) == 280147 and merges[:3] == ["Ġ Ġ", "Ġ ĠĠĠ", "ĠĠ ĠĠ"]
    # the weights: Meta's layout (llama.cpp's converter un-permutes HF's q/k),
    # and llama3 RoPE's factors
    assert set(tensors) == {convert.gguf_name(k) for k in sd} | {"rope_freqs.weight"}
    check_gguf_tensors(sd, tensors, "f32")
    factors = dequantized(tensors["rope_freqs.weight"])
    torch.testing.assert_close(factors, llama_cpp_rope_factors(args), rtol=1e-6, atol=0)


def llama_cpp_rope_factors(args):
    """rope_freqs as llama.cpp's convert_hf_to_gguf.py computes it for llama3 scaling, written out
    independently of llama.rope_frequencies (which the export divides): 1 for short wavelengths,
    factor for long ones, interpolated between."""
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
    low, high, old_ctx = (args.rope_low_freq_factor, args.rope_high_freq_factor,
                          args.rope_original_context)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(args.rope_scaling_factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / args.rope_scaling_factor + smooth))
    return torch.tensor(factors)


@pytest.mark.parametrize("dtype", ["bf16", "q8_0"])
def test_gguf_bf16_and_q8_0(small_ckpt, tmp_path, dtype):
    path = tmp_path / f"model-{dtype}.gguf"
    convert.main(["convert", str(small_ckpt), str(path), "--to", "gguf", "--gguf_dtype", dtype])
    fields, tensors = read_gguf(path)
    assert fields["general.file_type"] == {"bf16": 32, "q8_0": 7}[dtype]
    assert len(fields["tokenizer.ggml.tokens"]) == fields["llama.vocab_size"] == 512
    check_gguf_tensors(checkpoints.load_checkpoint(small_ckpt)[1], tensors, dtype)


def test_gguf_tied_output_and_export_of_a_run(small_ckpt, tmp_path, monkeypatch):
    args, sd = checkpoints.load_checkpoint(small_ckpt)
    tied = {k: v for k, v in sd.items() if k != "output.weight"}
    convert.write_gguf(llama.ModelArgs(**{**vars(args), "tie_embeddings": True}),
                       tied, BYTES_TOKENIZER, tmp_path / "tied.gguf", "f32")
    tensors = read_gguf(tmp_path / "tied.gguf")[1]
    # llama.cpp reuses token_embd
    assert "output.weight" not in tensors and "token_embd.weight" in tensors
    # a LoRA run exported to GGUF holds the merged weights
    model = random_lora(our_model(small_ckpt))
    run = write_run(model, small_ckpt, tmp_path / "run")
    convert.main(["export", str(run), str(tmp_path / "run.gguf"), "--to", "gguf",
                  "--gguf_dtype", "f32"])
    merged = llama.merge_lora(model).state_dict()
    tensors = read_gguf(tmp_path / "run.gguf")[1]
    for key in ("layers.1.attention.wk.weight", "output.weight", "layers.0.feed_forward.w2.weight"):
        assert torch.equal(dequantized(tensors[convert.gguf_name(key)]), merged[key]), key
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # as if not installed
    with pytest.raises(InputError, match="pip install gguf"):
        convert.write_gguf(args, sd, BYTES_TOKENIZER, tmp_path / "x.gguf")

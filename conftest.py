"""
Shared by every test file: no test may change torch's process-wide numeric settings. A test that
lowers float32 matmul precision (tf32 or bf16 products on AMX CPUs), changes the default dtype or
the thread count makes later tests' tolerances fail on some machines only: such a leak fails here,
naming the test, and the settings are put back for the tests after it.

Also here: the checkpoints several test files use, made once a session, and tokenizer.model files
parsed once a session per content (tokenizer_files_parsed_once).
"""

import copy
import hashlib
from pathlib import Path

import pytest
import torch


def numeric_settings():
    return {"default_dtype": torch.get_default_dtype(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "fp32_precision": getattr(torch.backends, "fp32_precision", None),
            "mkldnn_matmul_fp32_precision": torch.backends.mkldnn.matmul.fp32_precision,
            "threads": torch.get_num_threads(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "grad_enabled": torch.is_grad_enabled()}


def restore(settings):
    torch.set_default_dtype(settings["default_dtype"])
    torch.set_float32_matmul_precision(settings["float32_matmul_precision"])
    if settings["fp32_precision"] is not None:
        torch.backends.fp32_precision = settings["fp32_precision"]
    torch.backends.mkldnn.matmul.fp32_precision = settings["mkldnn_matmul_fp32_precision"]
    torch.set_num_threads(settings["threads"])
    torch.use_deterministic_algorithms(settings["deterministic"])
    torch.set_grad_enabled(settings["grad_enabled"])


@pytest.fixture(autouse=True)
def numeric_settings_are_left_as_found(request):
    before = numeric_settings()
    yield
    after = numeric_settings()
    if after != before:
        restore(before)
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        pytest.fail(f"{request.node.nodeid} changed torch's global settings: {changed}")


# Checkpoints and data that test_llama.py's and test_parallel.py's tests share, made once a session
# (a module fixture imported into another module is made again there) by test_llama's makers.
@pytest.fixture(scope="session")
def ckpt_gqa(tmp_path_factory):
    import test_llama

    return test_llama.make_ckpt_gqa(tmp_path_factory.mktemp("gqa") / "ckpt")


@pytest.fixture(scope="session")
def ckpt_stops(tmp_path_factory, ckpt_gqa):
    import test_llama

    return test_llama.make_ckpt_stops(tmp_path_factory.mktemp("stops") / "ckpt", ckpt_gqa)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    import test_llama

    return test_llama.make_corpus(tmp_path_factory.mktemp("corpus") / "stories.txt")


@pytest.fixture(scope="session")
def bench_ckpt_root(tmp_path_factory):
    """--ckpt_root for bench.py and bench_scale.py: their random tiny checkpoint, made once."""
    return tmp_path_factory.mktemp("bench_ckpt")


# checkpoints.read_tokenizer_model parses Llama 3's tokenizer.model (128,000 base64 lines) in
# Python, a fifth of a second, and the tests here load checkpoints over 200 times, each with a copy
# of the same file. What it returns is a function of the file's bytes: each distinct content is
# parsed once a session, and each call gets a Tokenizer object of its own (over the same ranks,
# which nothing changes). An error is never kept (a bad file fails each time, naming its path);
# subprocesses parse as ever.
@pytest.fixture(scope="session", autouse=True)
def tokenizer_files_parsed_once():
    import checkpoints

    parse, parsed = checkpoints.read_tokenizer_model, {}

    def read_tokenizer_model(path):
        key = hashlib.sha256(Path(path).read_bytes()).digest()
        if key not in parsed:
            parsed[key] = parse(path)
        return copy.copy(parsed[key])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoints, "read_tokenizer_model", read_tokenizer_model)
        yield

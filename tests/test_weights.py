"""Weights load memory-mapped (RAM not doubled, measured) and pickles never run code."""

from __future__ import annotations

import collections
import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from studio.engine.context import UserError
from studio.engine.weights import load_into
from studio.models.weights_io import (
    load_pickle_weights,
    load_safetensors_mmap,
    load_weights,
    sniff_format,
)

MiB = 1 << 20
LAYERS, WIDTH = 12, 2048  # 12 x 2048 x 2048 fp32 = 192 MiB of weights (+ biases)


def big_model() -> nn.Module:
    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)))


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "big.safetensors"
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in big_model().state_dict().items()}
    save_file({k: torch.randn(s) * 0.02 for k, s in shapes.items()}, str(path))
    gc.collect()
    return path


# Measured in a fresh interpreter: in this one, memory freed by earlier tests sits in malloc's
# heap and would hide (or fake) growth.
_MEASURE = """
import json, sys, torch
from torch import nn
from studio.engine.weights import load_into
from studio.models.weights_io import load_safetensors_mmap

def rss():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out

path, width, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_grad_enabled(False)
before = rss()
sd = load_safetensors_mmap(path)
loaded = rss()
with torch.device("meta"):
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
load_into(model, sd)
same = model[0].weight.data_ptr() == sd["0.weight"].data_ptr()
total = sum(float(p.sum()) for p in model.parameters())  # touch every page
y = model(torch.ones(1, width))
touched = rss()
# The control: what an ordinary load_state_dict into a CPU model costs, a real copy.
copies = {k: t.clone() for k, t in sd.items()}
copied = rss()
print(json.dumps({"before": before, "loaded": loaded, "touched": touched, "copied": copied, "same": same,
                  "finite": bool(torch.isfinite(y).all()) and total == total}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_mmap_load_into_meta_model_does_not_duplicate_ram(big_file):
    size = big_file.stat().st_size
    assert size > 190 * MiB
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(big_file), str(WIDTH), str(LAYERS)],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    grow = {k: m["touched"][k] - m["before"][k] for k in m["before"]}
    assert m["same"] and m["finite"]  # assign=True: the parameters are the mapped tensors themselves
    # Nothing is read at load: the mapping costs page tables, not the file's size.
    assert m["loaded"]["VmRSS"] - m["before"]["VmRSS"] < 20 * MiB
    # Touching every weight pages the file in as file-backed memory shared with the page cache ...
    assert grow["RssFile"] > 0.8 * size
    # ... and no anonymous second copy appears.
    assert grow["RssAnon"] < 0.1 * size
    # The measurement can see a copy: cloning the weights grows anonymous RSS by the file's size.
    assert m["copied"]["RssAnon"] - m["touched"]["RssAnon"] > 0.9 * size


def test_dtype_conversion_applies_to_floats_only(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(4, 4), "ids": torch.arange(3)}, str(path))
    sd = load_safetensors_mmap(path, dtype=torch.bfloat16)
    assert sd["w"].dtype == torch.bfloat16 and sd["ids"].dtype == torch.int64
    assert sniff_format(path) == "safetensors"


def test_a_truncated_safetensors_file_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError) as err:
        load_safetensors_mmap(path)
    assert err.value.kind == "bad_model" and "download it again" in err.value.message


# -- pickles -------------------------------------------------------------------------


class Evil:
    def __reduce__(self):
        return (print, ("this would run at load time",))


def test_a_pickle_that_needs_globals_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "callback": Evil()}, path)
    with pytest.raises(UserError) as err:
        load_pickle_weights(path)
    assert err.value.kind == "bad_model"
    assert "needs Python code (print)" in err.value.message
    assert "never runs code from model files" in err.value.message


def test_a_plain_checkpoint_loads_mmapped_and_the_user_is_told(tmp_path):
    path = tmp_path / "weights.bin"  # the name says nothing: the content decides
    torch.save({"state_dict": collections.OrderedDict(w=torch.ones(2, 2)), "global_step": 7}, path)
    told: list[str] = []
    sd = load_weights(path, dtype=torch.float16, on_notice=told.append)
    assert list(sd) == ["w"] and sd["w"].dtype == torch.float16
    assert "weights-only loader (no code run), memory-mapped" in told[0]


def test_an_old_format_checkpoint_loads_without_mmap(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"a": torch.zeros(3)}, path, _use_new_zipfile_serialization=False)
    assert sniff_format(path) == "torch_legacy"
    told: list[str] = []
    assert torch.equal(load_pickle_weights(path, told.append)["a"], torch.zeros(3))
    assert "read whole into RAM" in told[0]


def test_unknown_and_gguf_files_are_named_for_what_they_are(tmp_path):
    junk = tmp_path / "x.safetensors"
    junk.write_bytes(b"hello world, not a model")
    with pytest.raises(UserError, match="not a safetensors, GGUF or PyTorch file"):
        load_weights(junk)
    gguf = tmp_path / "m.bin"
    gguf.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(UserError, match="is a GGUF file"):
        load_weights(gguf)


# -- load_into -----------------------------------------------------------------------


def small_sd() -> dict[str, torch.Tensor]:
    return nn.Linear(4, 3).state_dict()


def test_load_into_reports_missing_and_unexpected_keys_by_name():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3))
    sd = {"0.weight": torch.ones(3, 4), "extra.weight": torch.ones(1)}
    with pytest.raises(UserError, match=r"1 \(0\.bias\) missing, 1 \(extra\.weight\) unexpected"):
        load_into(model, sd)
    with pytest.raises(UserError, match=r"no weights for 1 \(0\.bias\)"):
        load_into(model, sd, strict=False)


def test_load_into_turns_shape_mismatch_into_a_user_error():
    with torch.device("meta"):
        model = nn.Linear(4, 5)
    with pytest.raises(UserError, match="size mismatch for weight"):
        load_into(model, small_sd())

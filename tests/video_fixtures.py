"""Tiny random Wan parts written in their real (diffusers) layouts, and a collecting JobContext.

Shared by test_video_pipeline.py and test_video_parity.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from studio.engine.context import JobContext, ModelCache
from studio.engine.device import probe
from studio.protocol import VideoJob

TEXT_DIM = 32
CACHE = ModelCache()  # loaded models shared by the tests, as the engine keeps them warm between jobs
WORDS = ["a", "red", "fox", "runs", "in", "snow", "blurry", "bad", "cat"]


def jiggle(model, scale: float = 0.05) -> None:
    with torch.no_grad():
        for p in model.parameters():  # move every weight off its init value so nothing is trivially zero
            p.add_(torch.randn_like(p) * scale)


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


def build_wan_folder(root: Path, layers: int = 2) -> Path:
    """A diffusers-layout Wan folder (transformer/, vae/, text_encoder/, tokenizer/) of tiny random models.

    Heads are 128 wide as in every released Wan: single files do not state the width.
    """
    import transformers
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    torch.manual_seed(0)
    net = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=128, in_channels=16,
                                out_channels=16, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=64, num_layers=layers,
                                cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    jiggle(net)
    net.save_pretrained(root / "transformer")
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    jiggle(vae, 0.02)
    vae.save_pretrained(root / "vae")
    cfg = transformers.UMT5Config(vocab_size=len(WORDS) + 3, d_model=TEXT_DIM, d_kv=8, num_heads=4, d_ff=48,
                                  num_layers=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                  dropout_rate=0.0)
    enc = transformers.UMT5EncoderModel(cfg)
    jiggle(enc, 0.1)
    enc.save_pretrained(root / "text_encoder")
    write_tokenizer(root / "tokenizer" / "tokenizer.json")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return root


class Collector:
    def __init__(self, tmp: Path, **settings) -> None:
        self.progress: list[tuple[int, int, str]] = []
        self.previews: list[tuple[bytes, int, int]] = []
        self.ctx = JobContext("job", probe("cpu"), on_progress=lambda s, t, st: self.progress.append((s, t, st)),
                              on_preview=lambda d, m, w, h: self.previews.append((d, w, h)),
                              settings={"outputs": str(tmp / "outputs"), **settings}, models=CACHE)

    def steps(self) -> list[int]:
        return [s for s, _, st in self.progress if st == "sampling"]


def make_job(folder: Path, tmp: Path, **kw) -> VideoJob:
    base = dict(model=str(folder), prompt="a red fox runs in snow", negative="blurry bad", width=32, height=32,
                frames=5, fps=8.0, steps=3, cfg=4.0, shift=3.0, sampler="unipc", seed=11, out=str(tmp / "clip.mp4"))
    base.update(kw)
    return VideoJob(**base)

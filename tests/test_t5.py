"""T5 v1.1 / umT5 encoder parity with transformers on tiny random models, in each key layout; tokenizer."""

from __future__ import annotations

import pytest
import torch

from studio.engine.context import UserError
from studio.models.t5 import T5Config, T5Encoder, T5Tokenizer, clean_prompt, load_t5_encoder

transformers = pytest.importorskip("transformers")

TOL = 1e-4
MAX_DISTANCE = 20  # the tiny reference config; every released T5 uses 128, our default


def _config(cls):
    return cls(vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
               relative_attention_num_buckets=8, relative_attention_max_distance=MAX_DISTANCE,
               feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6)


def _reference(umt5: bool, seed: int = 0):
    torch.manual_seed(seed)
    if umt5:
        model = transformers.UMT5EncoderModel(_config(transformers.UMT5Config))
    else:
        model = transformers.T5EncoderModel(_config(transformers.T5Config))
    with torch.no_grad():
        for p in model.parameters():  # norms and position biases off their init values too
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (2, 30), generator=g)  # 30 > max_distance: the log-spaced buckets are used
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    ids[1, 17:] = 0
    return ids, mask


@torch.no_grad()
def _check(ref, ours: T5Encoder) -> None:
    ids, mask = _inputs()
    want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    got = ours(ids, mask)
    assert got.shape == want.shape == (2, 30, 32)
    assert (got - want).abs().max().item() <= TOL
    # padding changes nothing for the real tokens of the shorter prompt
    short = ours(ids[1:, :17], mask[1:, :17])
    assert (short - got[1:, :17]).abs().max().item() <= TOL


def _hf_to_wan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF UMT5 keys -> the original Wan umT5 layout, written out by hand."""
    names = {
        "layer.0.SelfAttention.q.weight": "attn.q.weight", "layer.0.SelfAttention.k.weight": "attn.k.weight",
        "layer.0.SelfAttention.v.weight": "attn.v.weight", "layer.0.SelfAttention.o.weight": "attn.o.weight",
        "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
        "layer.0.layer_norm.weight": "norm1.weight", "layer.1.layer_norm.weight": "norm2.weight",
        "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight", "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
        "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
    }
    out = {}
    for key, v in sd.items():
        if key == "shared.weight":
            out["token_embedding.weight"] = v
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = v
        elif key.startswith("encoder.block."):
            _, _, i, rest = key.split(".", 3)
            out[f"blocks.{i}.{names[rest]}"] = v
    return out


def test_t5_v1_1_matches_transformers_from_hf_layout():
    ref = _reference(umt5=False)
    ours = load_t5_encoder(dict(ref.state_dict()), max_distance=MAX_DISTANCE)
    assert not ours.cfg.per_layer_bias and ours.cfg.heads == 4 and ours.cfg.head_dim == 8
    assert ours.blocks[1].pos_embedding is None
    _check(ref, ours)


def test_umt5_matches_transformers_with_a_bias_per_layer():
    ref = _reference(umt5=True)
    ours = load_t5_encoder(dict(ref.state_dict()), max_distance=MAX_DISTANCE)
    assert ours.cfg.per_layer_bias and ours.blocks[1].pos_embedding is not None
    _check(ref, ours)


def test_loads_prefixed_hf_layout_and_drops_decoder():
    ref = _reference(umt5=False)
    sd = {f"text_encoders.t5xxl.transformer.{k}": v for k, v in ref.state_dict().items()}
    sd["text_encoders.t5xxl.transformer.decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(32, 32)
    _check(ref, load_t5_encoder(sd, max_distance=MAX_DISTANCE))


def test_loads_original_wan_umt5_layout():
    ref = _reference(umt5=True)
    wan = _hf_to_wan(dict(ref.state_dict()))
    pinned = {"token_embedding.weight", "norm.weight", "blocks.0.attn.q.weight", "blocks.1.attn.o.weight",
              "blocks.0.norm1.weight", "blocks.0.norm2.weight", "blocks.0.ffn.gate.0.weight", "blocks.0.ffn.fc1.weight",
              "blocks.1.ffn.fc2.weight", "blocks.0.pos_embedding.embedding.weight",
              "blocks.1.pos_embedding.embedding.weight"}
    assert pinned <= set(wan) and len(wan) == 2 + 2 * 10  # 10 tensors per umT5 layer
    _check(ref, load_t5_encoder(wan, max_distance=MAX_DISTANCE))


def test_loads_llama_cpp_gguf_names():
    ref = _reference(umt5=False)
    names = {"layer.0.SelfAttention.q.weight": "attn_q.weight", "layer.0.SelfAttention.k.weight": "attn_k.weight",
             "layer.0.SelfAttention.v.weight": "attn_v.weight", "layer.0.SelfAttention.o.weight": "attn_o.weight",
             "layer.0.SelfAttention.relative_attention_bias.weight": "attn_rel_b.weight",
             "layer.0.layer_norm.weight": "attn_norm.weight", "layer.1.layer_norm.weight": "ffn_norm.weight",
             "layer.1.DenseReluDense.wi_0.weight": "ffn_gate.weight", "layer.1.DenseReluDense.wi_1.weight": "ffn_up.weight",
             "layer.1.DenseReluDense.wo.weight": "ffn_down.weight"}
    gguf = {"token_embd.weight": ref.shared.weight, "enc.output_norm.weight": ref.encoder.final_layer_norm.weight}
    for key, v in ref.state_dict().items():
        if key.startswith("encoder.block."):
            _, _, i, rest = key.split(".", 3)
            gguf[f"enc.blk.{i}.{names[rest]}"] = v
    assert {"enc.blk.0.attn_rel_b.weight", "enc.blk.1.ffn_gate.weight", "enc.blk.1.ffn_up.weight"} <= set(gguf)
    _check(ref, load_t5_encoder(gguf, max_distance=MAX_DISTANCE))


@torch.no_grad()
def test_encode_zeroes_positions_after_the_prompt():
    ours = load_t5_encoder(dict(_reference(umt5=True).state_dict()), max_distance=MAX_DISTANCE)
    ids, mask = _inputs()
    out = ours.encode(ids, mask)
    assert out[1, 17:].abs().max().item() == 0.0
    assert out[1, :17].abs().min().item() > 0.0
    assert torch.equal(out[0], ours(ids, mask)[0])


def test_named_configs_match_published_sizes():
    with torch.device("meta"):
        n = sum(p.numel() for p in T5Encoder(T5Config.named("umt5-xxl")).parameters())
    assert 5.5e9 < n < 5.8e9  # umT5-XXL encoder: 5.68 B parameters
    with torch.device("meta"):
        sd = T5Encoder(T5Config.named("t5-v1_1-xxl")).state_dict()
    assert T5Config.from_state_dict(sd) == T5Config.named("t5-v1_1-xxl")


def test_bad_weights_fail_clearly():
    with pytest.raises(UserError, match="no T5 encoder"):
        load_t5_encoder({"foo.weight": torch.zeros(2)})
    sd = dict(_reference(umt5=False).state_dict())
    sd.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight")
    with pytest.raises(UserError, match="do not fit"):
        load_t5_encoder(sd)


def _write_tokenizer(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "red": 4, "fox": 5, "runs": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(path))


def test_tokenizer_pads_truncates_and_keeps_eos(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    _write_tokenizer(tmp_path / "tokenizer" / "tokenizer.json")
    tok = T5Tokenizer.from_folder(tmp_path)
    ids, mask = tok(["a red fox", "a red fox runs a red fox"], max_length=5)
    assert ids.tolist() == [[3, 4, 5, 1, 0], [3, 4, 5, 6, 1]]
    assert mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_prompts_are_cleaned_like_wans_pipeline(tmp_path):
    _write_tokenizer(tmp_path / "tokenizer.json")
    tok = T5Tokenizer.from_folder(tmp_path)
    assert clean_prompt("  a &amp;amp; red\n\t fox  ") == "a & red fox"
    ids, _ = tok(["  a\n red   fox "], max_length=5)
    assert ids.tolist() == [[3, 4, 5, 1, 0]]


def test_missing_tokenizer_says_which_file_goes_where(tmp_path):
    with pytest.raises(UserError, match="tokenizer.json") as err:
        T5Tokenizer.from_folder(tmp_path)
    assert str(tmp_path / "tokenizer" / "tokenizer.json") in err.value.message


@torch.no_grad()
def test_bf16_weights_run_and_stay_close_to_fp32():
    ref = _reference(umt5=True)
    fp32 = load_t5_encoder(dict(ref.state_dict()), max_distance=MAX_DISTANCE)
    bf16 = load_t5_encoder(dict(ref.state_dict()), dtype=torch.bfloat16, max_distance=MAX_DISTANCE)
    ids, mask = _inputs()
    want = fp32(ids, mask)
    got = bf16(ids, mask)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().mean().item() < 0.03 * want.abs().mean().item()



@pytest.mark.parametrize("shared", [True, False])
def test_each_block_reads_its_position_table_inside_its_own_forward(shared):
    """Block streaming moves a block's weights to the device in its forward pre-hook: a table read
    outside that window would be on the wrong device (Wan's umT5 under a small VRAM budget)."""
    from studio.models.t5 import T5Config, T5Encoder

    cfg = T5Config(vocab_size=50, dim=16, ffn_dim=32, heads=2, head_dim=8, layers=3, num_buckets=8, max_distance=16,
                   per_layer_bias=not shared)
    enc = T5Encoder(cfg).eval()
    active: list[int] = []
    seen: list[tuple[int, bool]] = []
    for i, block in enumerate(enc.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: active.append(i))
        block.register_forward_hook(lambda m, a, o: [active.pop(), None][1])
        if block.pos_embedding is not None:
            block.pos_embedding.register_forward_hook(lambda m, a, o, i=i: seen.append((i, active[-1:] == [i])))
    with torch.no_grad():
        enc(torch.randint(0, 50, (1, 7)), torch.ones(1, 7, dtype=torch.long))
    assert seen == ([(0, True)] if shared else [(0, True), (1, True), (2, True)])

"""Read a Hugging Face LLM folder into a `LoadedLLM` (the same shape the GGUF loader returns).

A folder holds config.json, one or more *.safetensors (sharded ones are listed in
model.safetensors.index.json), tokenizer.json, and usually tokenizer_config.json (chat
template, bos/eos), chat_template.jinja and generation_config.json. Pickled .bin weights
are refused: we never unpickle.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from studio.errors import UserError
from studio.models.llm_build import LoadedLLM, chat_config

# Gemma3 multimodal checkpoints hold the language model under one of these prefixes.
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
_SKIP_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.",
                  "multi_modal_projector.")


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError("bad_model", f"{path.name} in {path.parent} cannot be read ({exc}). "
                        "The download may be incomplete: fetch the file again.") from None
    if not isinstance(data, dict):
        raise UserError("bad_model", f"{path} is not a JSON object; fetch the file again.")
    return data


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder, in shard order. Raises UserError when there are none."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError("bad_model", f"{index} has no weight_map; fetch it again.")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise UserError("bad_model", f"{folder} lacks {len(missing)} of its {len(names)} weight shards "
                            f"(first missing: {missing[0]}). Finish the download, then try again.")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
        raise UserError("unsupported", f"{folder} holds only pickled PyTorch weights (.bin/.pt), which Studio "
                        "never unpickles. Download the .safetensors version of this model.")
    raise UserError("bad_model", f"{folder} has no weights: no *.safetensors files. "
                    "Download the model's .safetensors files into this folder.")


def _text_key(key: str) -> str | None:
    if key.startswith(_SKIP_PREFIXES):
        return None
    for old, new in _TEXT_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def read_state_dict(files: list[Path], progress: Callable[[int, int], None] | None = None) -> dict:
    """All tensors of the files, memory-mapped by safetensors (no copy until a dtype cast)."""
    from safetensors import SafetensorError, safe_open

    out: dict = {}
    for i, f in enumerate(files):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for key in st.keys():
                    name = _text_key(key)
                    if name is not None:
                        out[name] = st.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise UserError("bad_model", f"{f.name} is not a readable safetensors file ({exc}). "
                            "It may be truncated: download it again.") from None
        if progress:
            progress(i + 1, len(files))
    return out


def read_chat_template(folder: Path, tok_cfg: dict) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tpl = tok_cfg.get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    if isinstance(tpl, str):
        return tpl
    processor = folder / "chat_template.json"
    if processor.is_file():
        tpl = _read_json(processor).get("chat_template")
        return tpl if isinstance(tpl, str) else None
    return None


def load_hf_folder(folder: str | Path, progress: Callable[[int, int], None] | None = None) -> LoadedLLM:
    """Read config, weights, tokenizer and chat metadata of a Hugging Face LLM folder."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError("model_not_found", f"{folder} is not a folder. Choose a model folder or a .gguf file.")
    if not (folder / "config.json").is_file():
        raise UserError("bad_model", f"{folder} has no config.json: a Hugging Face model folder needs it next "
                        "to the .safetensors files. Download config.json from the model's page.")
    config = _read_json(folder / "config.json")
    if config.get("model_type") == "gemma3" and isinstance(config.get("text_config"), dict):
        config = {**config["text_config"], "model_type": "gemma3_text",
                  "architectures": config.get("architectures", [])}
    chat_config(config)  # refuse an unknown architecture before reading gigabytes
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        extra = " (tokenizer.model alone is not enough)" if (folder / "tokenizer.model").is_file() else ""
        raise UserError("bad_model", f"{folder} has no tokenizer.json{extra}. Studio needs the fast "
                        "tokenizer file: download tokenizer.json from the model's page.")
    try:
        tokenizer = Tokenizer.from_file(str(tok_path))
    except Exception as exc:  # tokenizers raises a bare Exception for any parse failure
        raise UserError("bad_model", f"{tok_path} cannot be parsed ({exc}); download it again.") from None
    files = weight_files(folder)
    state_dict = read_state_dict(files, progress)
    if not state_dict:
        raise UserError("bad_model", f"The weight files of {folder} hold no language model tensors.")

    tok_cfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    special = (_read_json(folder / "special_tokens_map.json")
               if (folder / "special_tokens_map.json").is_file() else {})
    gen = _read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    bos = _token_text(tok_cfg.get("bos_token")) or _token_text(special.get("bos_token"))
    eos = _token_text(tok_cfg.get("eos_token")) or _token_text(special.get("eos_token"))
    stop: list[int] = []
    for ids in (_as_ids(gen.get("eos_token_id")), _as_ids(config.get("eos_token_id"))):
        stop += [i for i in ids if i not in stop]
    eos_id = tokenizer.token_to_id(eos) if eos else None
    if eos_id is not None and eos_id not in stop:
        stop.append(eos_id)
    defaults = {k: gen[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                if isinstance(gen.get(k), (int, float)) and not isinstance(gen.get(k), bool)}
    return LoadedLLM(
        config=config,
        state_dict=state_dict,
        tokenizer=tokenizer,
        chat_template=read_chat_template(folder, tok_cfg),
        bos_token=bos,
        eos_token=eos,
        stop_token_ids=stop,
        add_bos=bool(tok_cfg.get("add_bos_token", False)),
        generation_defaults=defaults,
        model_name=str(config.get("_name_or_path") or "").rstrip("/").rsplit("/", 1)[-1],
        source=str(folder),
    )

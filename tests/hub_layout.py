"""Checkpoints laid out as their hub repositories are, inside a Hugging Face cache.

``facebook/rag-token-nq`` (2020) holds ``config.json`` with the generation settings inside the model
config (no ``generation_config.json``), ``pytorch_model.bin`` and the slow tokenizers' files only
(``vocab.txt``; ``vocab.json`` + ``merges.txt``); its RagConfig names the hub's wiki_dpr index
(``index_name "compressed"``, ``dataset "wiki_dpr"``). :func:`write_hub_rag` writes a tiny factory
checkpoint that way; :func:`cache_repo` places a folder in a cache as ``hf download`` leaves it
(``models--org--name/blobs``, ``snapshots/<rev>/`` linking into them, ``refs/main``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

# What the 2020 configs carried next to the architecture (read back by transformers as generation defaults).
GENERATION_FIELDS = {"num_beams": 4, "max_length": 40, "min_length": 1, "no_repeat_ngram_size": 3,
                     "early_stopping": True, "length_penalty": 1.0}
WIKI_DPR = {"index_name": "compressed", "dataset": "wiki_dpr", "dataset_split": "train", "use_dummy_dataset": False,
            "index_path": None, "passages_path": None}


def _slow_wordpiece(fast_dir: Path, out: Path) -> None:
    model = json.loads((fast_dir / "tokenizer.json").read_text())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    (out / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}))


def _slow_bpe(fast_dir: Path, out: Path) -> None:
    model = json.loads((fast_dir / "tokenizer.json").read_text())["model"]
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>", "pad_token": "<pad>",
         "cls_token": "<s>", "mask_token": "<mask>"}))


def _state_dict_bin(model_dir: Path, out: Path, cls) -> None:
    import torch

    model = cls.from_pretrained(model_dir)
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, out / "pytorch_model.bin")


def write_hub_rag(checkpoint: Path, out: Path, rag_fields: dict | None = None) -> Path:
    """The factory checkpoint ``checkpoint`` (a BART RAG-Token or RAG-Sequence) as its hub repository
    looked in 2020: the generation defaults in ``config.json``, ``pytorch_model.bin``, slow tokenizer files
    and the hub's wiki_dpr index in the RagConfig (``rag_fields`` overrides those)."""
    from transformers import RagSequenceForGeneration, RagTokenForGeneration

    out.mkdir(parents=True)
    config = json.loads((checkpoint / "config.json").read_text())
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    config.update(WIKI_DPR, **(rag_fields or {}))
    for key in ("bos_token_id", "decoder_start_token_id", "eos_token_id", "forced_bos_token_id",
                "forced_eos_token_id", "pad_token_id"):
        config["generator"].setdefault(key, generation.get(key))
    config["generator"].update({k: generation.get(k, v) for k, v in GENERATION_FIELDS.items()})
    config["generator"]["architectures"] = ["BartForConditionalGeneration"]
    if "RagTokenForGeneration" in config["architectures"]:
        config.update({k: generation.get(k, v) for k, v in GENERATION_FIELDS.items()})
    config.pop("dtype", None)
    config["transformers_version"] = "3.5.0.dev0"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    cls = RagTokenForGeneration if "RagTokenForGeneration" in config["architectures"] else RagSequenceForGeneration
    _state_dict_bin(checkpoint, out, cls)
    for sub, writer in (("question_encoder_tokenizer", _slow_wordpiece), ("generator_tokenizer", _slow_bpe)):
        (out / sub).mkdir()
        writer(checkpoint / sub, out / sub)
    return out


def write_hub_dpr_context_encoder(encoder_dir: Path, out: Path) -> Path:
    """A factory DPR context encoder as ``facebook/dpr-ctx_encoder-single-nq-base`` is laid out:
    ``config.json``, ``pytorch_model.bin``, ``vocab.txt`` and a tokenizer config."""
    from transformers import DPRContextEncoder

    out.mkdir(parents=True)
    config = json.loads((encoder_dir / "config.json").read_text())
    config.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _state_dict_bin(encoder_dir, out, DPRContextEncoder)
    _slow_wordpiece(encoder_dir, out)
    return out


def cache_repo(folder: Path, cache: Path, repo_id: str, revision: str = "0" * 40) -> Path:
    """Place ``folder`` in the hub cache ``cache`` (HF_HUB_CACHE) as repository ``repo_id``, the way
    huggingface_hub stores a download: content-addressed blobs, a snapshot of links to them, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / revision
    blobs.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / digest)
        link = snapshot / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blobs / digest, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot

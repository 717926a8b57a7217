"""The lines an export ends with: what it wrote, what is missing, and the commands to run next, in order,
with the export's real directory in them."""

from __future__ import annotations

from pathlib import Path

from rag_runtime import constants as C
from rag_runtime.artifact import Manifest
from rag_runtime.files import dir_size_text

# The DPR context encoder that embedded the passages of a hub dataset a RagConfig can name. wiki_dpr's
# default embeddings (its "nq" configurations, the ones RagRetriever loads) come from DPR's single-nq
# context encoder, the one facebook/rag-token-nq and rag-sequence-nq were trained with; the "multiset"
# configurations come from dpr-ctx_encoder-multiset-base.
DATASET_CONTEXT_ENCODERS = {"wiki_dpr": "facebook/dpr-ctx_encoder-single-nq-base"}


def export_summary(out: Path, manifest: Manifest, rag_config) -> list[str]:
    """What the export in ``out`` holds and, without a knowledge index, the steps to one (the README's
    "From the hub" section explains them)."""
    graphs = ", ".join(manifest.graphs)
    lines = [f"wrote {out} ({dir_size_text(out)}): rag-{manifest.kind} with a {manifest.generator_type} generator; "
             f"graphs {graphs}; tokenizers; {C.MANIFEST_FILE}"
             + (f"; a knowledge index of {manifest.index.count:,} passages" if manifest.index else "")]
    if manifest.index:
        lines.append(f"next: rag-generate {out} \"your question\"   then: rag-serve {out}")
        return lines
    lines.append(f"missing: a knowledge index. {_index_story(rag_config)} Until one is attached, "
                 f"rag-generate needs --passages FILE and rag-serve refuses to start. Next, in order:")
    lines += [f"  {i}. {command}" for i, command in enumerate(_index_steps(out, manifest, rag_config), 1)]
    return lines


def _index_story(cfg) -> str:
    if cfg.index_name == "custom":
        return f"The checkpoint's own knowledge base ({cfg.passages_path}) was left out (--no-index)."
    if cfg.use_dummy_dataset:
        what = f"the small dummy sample of the hub dataset {cfg.dataset!r} (index {cfg.index_name!r}, made for tests)"
    elif cfg.dataset == "wiki_dpr":
        what = (f"the hub dataset 'wiki_dpr' (index {cfg.index_name!r}): 21M Wikipedia passages with their "
                "embeddings, tens of GB")
    else:
        what = f"the hub dataset {cfg.dataset!r} (index {cfg.index_name!r})"
    return f"The checkpoint retrieves from {what}, a datasets download that is not exported."


def _index_steps(out: Path, manifest: Manifest, cfg) -> list[str]:
    kb = out.parent / f"{out.name}-index"
    if cfg.index_name == "custom":
        return [f"rag-export-index import {cfg.passages_path} {cfg.index_path} {kb}", f"rag-index attach {out} {kb}",
                f"rag-generate {out} \"your question\"   then: rag-serve {out}"]
    wanted = DATASET_CONTEXT_ENCODERS.get(cfg.dataset)
    given = manifest.context_encoder_source
    steps = []
    if given is None:
        encoder = out.parent / f"{out.name}-context-encoder"
        steps.append(f"rag-export-index context-encoder {wanted or 'DPR_CONTEXT_ENCODER'} {encoder}   "
                     + (f"(the encoder {cfg.dataset}'s embeddings were made with)" if wanted else
                        "(the context encoder the index's embeddings were made with)"))
    else:
        encoder = out
    passages = f"{cfg.dataset.upper()}_FILES" if cfg.dataset else "PASSAGES"
    if given is not None and wanted is not None and given != wanted:
        steps.append(f"rag-index build PASSAGES {kb} --context-encoder {encoder}   (embeds every passage: "
                     f"{cfg.dataset}'s own embeddings were made with {wanted}, not {given})")
    else:
        steps.append(f"rag-index build {passages} {kb} --embeddings-column embeddings --context-encoder {encoder}   "
                     f"({passages}: the dataset's Parquet or Arrow files, with its embeddings; see the README's "
                     "'From the hub')")
    steps += [f"rag-index attach {out} {kb}", f"rag-generate {out} \"your question\"   then: rag-serve {out}"]
    return steps

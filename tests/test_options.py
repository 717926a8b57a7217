"""The generation option schema: one declaration per option, and everything derived from it (validation,
the rag-generate flags, the transformers parameters refused by name)."""

from __future__ import annotations

import json

import pytest
from transformers import GenerationConfig

from rag_runtime import InvalidOptionError, UnknownOptionError
from rag_runtime.cli import build_parser
from rag_runtime.cli import main as generate_main
from rag_runtime.errors import UnsupportedOptionError
from rag_runtime.options import OPTIONS, UNSUPPORTED


def test_every_transformers_generation_parameter_is_an_option_or_refused():
    """Against the installed transformers: a parameter it adds must be declared or refused by name."""
    params = {k for k in GenerationConfig().to_dict() if not k.startswith("_")} - {"transformers_version"}
    assert not params - set(OPTIONS) - set(UNSUPPORTED), "declare these in rag_runtime.options or refuse them"
    assert not set(OPTIONS) & set(UNSUPPORTED)


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_parameters_are_refused_by_name(bundles, name):
    with pytest.raises(UnsupportedOptionError, match=rf"^{name} is not supported by rag_runtime: .+") as e:
        bundles[("token", "bart")].pipeline.options(**{name: 1})
    assert e.value.field == name and "\n" not in str(e.value)


def test_a_misspelled_option_names_the_closest_ones(bundles):
    with pytest.raises(UnknownOptionError, match="'num_beam'; did you mean 'num_beams'") as e:
        bundles[("token", "bart")].pipeline.generate(["q"], num_beam=2)
    assert isinstance(e.value, TypeError) and e.value.field == "num_beam"


def test_new_token_counts_take_precedence_over_lengths(bundles):
    pipe = bundles[("sequence", "t5")].pipeline
    opts = pipe.options(max_length=30, max_new_tokens=6, min_length=20, min_new_tokens=2)
    assert (opts.max_length, opts.min_length) == (7, 3)
    assert pipe.options(max_length=30).max_length == 30
    with pytest.raises(InvalidOptionError, match=r"min_length \(12\) must not exceed max_length \(7\)") as e:
        pipe.options(max_new_tokens=6, min_new_tokens=11)
    assert e.value.field == "min_new_tokens"


@pytest.mark.parametrize(("kwargs", "field", "match"), [
    (dict(top_p=1.5), "top_p", r"top_p must be a number >= 0 and <= 1, got 1.5"),
    (dict(temperature=0), "temperature", r"temperature must be a number > 0, got 0.0"),
    (dict(top_k=-1), "top_k", r"top_k must be an integer >= 0"),
    (dict(seed=1.5), "seed", r"seed must be an integer, got 1.5"),
    (dict(do_sample="yes"), "do_sample", r"do_sample must be true or false"),
    (dict(suppress_tokens=[1, "a"]), "suppress_tokens", r"suppress_tokens must be a list of token ids"),
    (dict(begin_suppress_tokens=[10**7]), "begin_suppress_tokens", r"must hold token ids in \[0, \d+\)"),
    (dict(decoder_start_token_id=-1), "decoder_start_token_id", r"must hold non-negative token ids"),
    (dict(max_new_tokens=0), "max_new_tokens", r"max_new_tokens must be an integer >= 1"),
    (dict(max_new_tokens=5000), "max_new_tokens", r"max_length 5001 exceeds the generator's 1024 decoder positions"),
])
def test_invalid_values_name_their_option(bundles, kwargs, field, match):
    with pytest.raises(InvalidOptionError, match=match) as e:
        bundles[("token", "bart")].pipeline.options(**kwargs)
    assert e.value.field == field


def _generation_dests() -> set[str]:
    parser = build_parser()
    group = next(g for g in parser._action_groups if g.title.startswith("generation"))
    return {a.dest for a in group._group_actions}


def test_rag_generate_has_one_flag_per_option():
    assert _generation_dests() == set(OPTIONS)


def test_rag_generate_flags_parse_to_option_values():
    args = vars(build_parser().parse_args([
        "out", "q", "--bad-words-ids", "[[5, 6], [9]]", "--suppress-tokens", "3", "4", "--do-sample",
        "--early-stopping", "never", "--no-deduplication", "--top-p", "0.5", "--max-new-tokens", "7"]))
    assert {k: args[k] for k in args if k in OPTIONS} == {
        "bad_words_ids": [[5, 6], [9]], "suppress_tokens": [3, 4], "do_sample": True, "early_stopping": "never",
        "do_deduplication": False, "top_p": 0.5, "max_new_tokens": 7}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["out", "q", "--bad-words-ids", "[5, 6]"])


def test_rag_generate_new_options_answer_like_the_pipeline(bundles, questions, capsys):
    bundle = bundles[("sequence", "bart")]
    params = dict(max_new_tokens=6, min_new_tokens=3, decoder_start_token_id=5, do_sample=True, seed=4,
                  temperature=1.3, num_beams=2)
    flags = ["--max-new-tokens", "6", "--min-new-tokens", "3", "--decoder-start-token-id", "5", "--do-sample",
             "--seed", "4", "--temperature", "1.3", "--num-beams", "2"]
    assert generate_main([str(bundle.export), questions[3], "--json", *flags]) == 0
    got = json.loads(capsys.readouterr().out)
    want = bundle.pipeline.generate([questions[3]], **params)[0]
    assert got["answers"] == [{"text": a.text, "token_ids": a.token_ids, "score": a.score} for a in want.answers]
    assert all(a.token_ids[0] == 5 and len(a.token_ids) <= 7 for a in want.answers)


def test_the_readme_lists_every_option_and_every_refused_parameter():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Generation options", 1)[1].split("\n## ", 1)[0]
    missing = [n for n in [*OPTIONS, *UNSUPPORTED] if f"`{n}`" not in section]
    assert not missing, f"README's Generation options table lacks {missing}"

"""Small conveniences users reach for: Model.encode of a list, decode, to_str_tokens, `tinygpt --version`, and
backslash escapes in token flags (`--target "\\n"`)."""

from __future__ import annotations

import numpy as np
import pytest

import tinygpt
from tinygpt.cli import main
from tinygpt.cli.common import CLIError, token_arg, unescape


@pytest.fixture(scope="module")
def model():
    return tinygpt.load()


def test_encode_of_a_list_is_a_left_padded_batch_that_forwards_like_single_runs(model):
    texts = ["ROMEO: But soft", "JULIET:", "O Romeo, Romeo, wherefore art thou"]
    tokens, mask = model.encode(texts)
    singles = [model.encode(t)[0] for t in texts]
    assert tokens.shape == mask.shape == (3, max(len(s) for s in singles))
    for row, single in enumerate(singles):
        n = len(single)
        assert mask[row].tolist() == [0] * (tokens.shape[1] - n) + [1] * n  # padding first
        assert tokens[row, -n:].tolist() == single.tolist()
    batched = model(tokens, attention_mask=mask, keep=["logits"]).logits[:, -1]
    for row, single in enumerate(singles):
        alone = model(single[None], keep=["logits"]).logits[0, -1]
        np.testing.assert_allclose(batched[row], alone, atol=1e-4, rtol=0)


def test_decode_and_str_tokens_invert_encode(model):
    text = "ROMEO: But soft, what light\nthrough yonder window"
    tokens = model.encode(text)
    assert model.decode(tokens) == model.decode(tokens[0]) == text
    pieces = model.to_str_tokens(text)
    assert pieces == model.to_str_tokens(tokens) and len(pieces) == tokens.shape[1] and "".join(pieces) == text
    batch, _ = model.encode(["ab", "abc abc"])
    assert [d.endswith(t) for d, t in zip(model.decode(batch), ["ab", "abc abc"])] == [True, True]


def test_without_a_tokenizer_each_says_so(model):
    bare = tinygpt.Model(model.config, model.params, source="bare")
    for call in (lambda: bare.encode("x"), lambda: bare.encode(["x"]), lambda: bare.decode([1, 2]),
                 lambda: bare.to_str_tokens([1, 2])):
        with pytest.raises(tinygpt.InputError, match="has no tokenizer"):
            call()


def test_version_flag_prints_the_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tinygpt {tinygpt.version()}"
    assert tinygpt.version() not in ("", "unknown")


@pytest.mark.parametrize("typed, meant", [("\\n", "\n"), ("\\t", "\t"), ("\\\\", "\\"), ("\\x41", "A"),
                                          ("\\u00e9t\\u00e9", "été"), ("été\\n", "été\n"), ("plain", "plain"),
                                          ("日本\\n", "日本\n")])
def test_token_flags_read_backslash_escapes(typed, meant):
    assert unescape(typed, "--target") == meant


def test_a_newline_target_is_one_token_and_a_broken_escape_is_one_line(model):
    newline = model.tokenizer.encode("\n")
    assert len(newline) == 1 and token_arg(model, "\\n", None, "target") == newline[0]
    with pytest.raises(CLIError) as error:
        token_arg(model, "\\", None, "target")
    message = str(error.value)
    assert message.startswith("--target ") and "\n" not in message and message.endswith("(write a backslash as \\\\)")


def test_lens_takes_an_escaped_newline_target(capsys):
    import json

    import tinygpt

    assert main(["lens", "ROMEO: But soft", "--target", "\\n", "--json"]) == 0
    newline = tinygpt.load().tokenizer.encode("\n")
    assert len(newline) == 1 and json.loads(capsys.readouterr().out)["target"] == newline[0]  # the newline, not "\\n"

"""TransformerLens hook names, both ways: the table (`tinygpt.sites.TL_NAMES`), `keep=` / `edits=` with TL
names, and `Trace.to_transformer_lens()` against TransformerLens itself (skipped where it is not installed)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import tinygpt
from tinygpt.errors import SiteError
from tinygpt.sites import SITES, TL_NAMES, site_of_tl, tl_name

TOKENS = jnp.array([[1, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12]])


@pytest.fixture(scope="module")
def model():
    return tinygpt.load()


def test_table_covers_every_site_but_logits():
    assert set(TL_NAMES) == set(SITES) - {"logits"}


@pytest.mark.parametrize("site", sorted(TL_NAMES))
def test_round_trip(site):
    layers = range(12) if SITES[site].per_layer else [None]
    for layer in layers:
        assert site_of_tl(tl_name(site, layer)) == (site, layer)


def test_unknown_names_hint_over_both_vocabularies(model):
    with pytest.raises(SiteError, match="hook_resid_post"):
        model(TOKENS, keep=["blocks.0.hook_resid_psot"])
    with pytest.raises(SiteError, match="resid_post"):
        model(TOKENS, edits={"resid_psot": lambda v, l: v})
    with pytest.raises(SiteError):
        site_of_tl("blocks.x.hook_resid_post")
    with pytest.raises(SiteError):
        tl_name("logits")


def test_keep_with_tl_names_keeps_the_site(model):
    a = model(TOKENS, keep=["blocks.1.hook_resid_post", "hook_embed"])
    b = model(TOKENS, keep=["resid_post", "embed"])
    assert a.kept() == b.kept() == ("embed", "resid_post")
    np.testing.assert_array_equal(a.resid_post, b.resid_post)


def test_edits_with_tl_names_equal_site_named(model):
    def fn(v, layer):
        return v * 0.5

    a = model(TOKENS, keep=["logits"], edits={"blocks.0.hook_mlp_out": fn})
    b = model(TOKENS, keep=["logits"],
              edits={"mlp_out": lambda v, layer: jnp.where(layer == 0, v * 0.5, v)})
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-6, atol=1e-6)
    c = model(TOKENS, keep=["logits"], edits={"hook_embed": fn})
    d = model(TOKENS, keep=["logits"], edits={"embed": fn})
    np.testing.assert_array_equal(c.logits, d.logits)


def test_per_layer_edit_changes_only_that_layer(model):
    assert model.config.n_layer == 2
    clean = model(TOKENS, keep=["resid_post"])
    edited = model(TOKENS, keep=["resid_post"], edits={"blocks.1.hook_resid_post": lambda v, l: v + 1.0})
    np.testing.assert_array_equal(edited.resid_post[0], clean.resid_post[0])
    np.testing.assert_allclose(edited.resid_post[1], clean.resid_post[1] + 1.0, rtol=1e-6, atol=1e-6)


def test_to_transformer_lens_layouts(model):
    trace = model(TOKENS)
    tl = trace.to_transformer_lens()
    assert "blocks.1.hook_resid_post" in tl and not any("logits" in k for k in tl)
    np.testing.assert_array_equal(tl["blocks.1.hook_resid_post"], trace.resid_post[1])
    scores = tl["blocks.0.attn.hook_attn_scores"]
    assert np.isfinite(scores).all() and scores[0, 0, 0, 1] == np.finfo(np.float32).min
    x = trace.resid_pre[0]
    normalized = tl["blocks.0.ln1.hook_normalized"]
    blocks = model.params["blocks"]
    np.testing.assert_allclose(normalized * blocks["ln1_w"][0] + blocks["ln1_b"][0], trace.ln1[0],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(normalized, (x - x.mean(-1, keepdims=True)) / trace.ln1_scale[0], rtol=1e-6)
    only = model(TOKENS, keep=["ln1"]).to_transformer_lens()
    assert only == {}  # hook_normalized needs the LayerNorm's input and divisor


def test_against_transformer_lens(tmp_path):
    torch = pytest.importorskip("torch", reason="TransformerLens comparison needs torch")
    transformers = pytest.importorskip("transformers", reason="the checkpoint is written by transformers")
    bridge = pytest.importorskip("transformer_lens.model_bridge",
                                 reason="transformer-lens 4.x is not installed (pip install -e '.[bench]', "
                                 "torch pinned at 2.13.0)")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=100,
                                                              n_positions=32))
    hf.save_pretrained(tmp_path)
    tl_model = bridge.TransformerBridge.boot_transformers(str(tmp_path), device="cpu")  # no weight processing
    tokens = np.array([[1, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12]])
    logits, cache = tl_model.run_with_cache(torch.tensor(tokens))
    trace = tinygpt.load(str(tmp_path))(jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(trace.logits), logits.detach().numpy(), rtol=1e-5, atol=1e-5)
    ours = trace.to_transformer_lens()
    shared = sorted(set(ours) & set(cache.keys()))
    expected = {tl_name(s, l) for s in TL_NAMES if s != "head_out"
                for l in ((0, 1) if SITES[s].per_layer else (None,))}
    assert expected <= set(shared), sorted(expected - set(shared))
    for name in shared:
        theirs = cache[name].detach().numpy()
        mine = np.asarray(ours[name])
        assert mine.shape == theirs.shape, name
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5, err_msg=name)


def test_where_tl_names_are_not_taken_the_error_says_so_and_names_the_site():
    from tinygpt.sites import check_site_names

    with pytest.raises(SiteError) as caught:
        check_site_names(["blocks.3.hook_resid_pre"], "site")
    message = str(caught.value)
    assert "site takes tinygpt site names, not TransformerLens hook names" in message
    assert "site 'resid_pre' at layer 3" in message and "did you mean" not in message
    with pytest.raises(SiteError) as caught:
        check_site_names(["resid_pst"], "site")
    assert "did you mean 'resid_post'" in str(caught.value) and "TransformerLens" not in str(caught.value)
    # where they are taken, a misspelt hook name is matched at the layer written, not at layer 0
    with pytest.raises(SiteError, match=r"did you mean 'blocks\.3\.hook_resid_post'"):
        check_site_names(["blocks.3.hook_resid_pst"], "keep", tl=True)


@pytest.mark.parametrize("layer", [-1, True, 2.7, "1"])
def test_tl_name_refuses_a_layer_that_is_not_a_non_negative_int(layer):
    with pytest.raises(ValueError, match="layer must be a non-negative int") as caught:
        tl_name("resid_pre", layer)
    assert "\n" not in str(caught.value)
    assert tl_name("resid_pre", np.int64(2)) == "blocks.2.hook_resid_pre"

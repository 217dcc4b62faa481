"""Ablation and patching against the same interventions done with plain PyTorch forward hooks on Hugging Face's
GPT2LMHeadModel (same random checkpoint): logits agree within 1e-4.

    head (zero / mean)   a pre-hook on attn.c_proj rewrites that head's slice of the merged z
    MLP neurons          a hook on mlp.act rewrites the neurons' activations
    attention sublayer   a hook on attn replaces its output by zeros
    residual patch       a hook on block l rewrites its output at one position with the clean run's
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import tinygpt  # noqa: E402
from hf_oracle import hf_eager, make_hf_checkpoint  # noqa: E402
from probes import ablation, patching  # noqa: E402

TOL = 1e-4
SHAPE = dict(n_layer=2, n_head=3, n_embd=24, n_positions=16, vocab_size=61)
D_HEAD = SHAPE["n_embd"] // SHAPE["n_head"]
TOKENS = np.array([[5, 17, 3, 40, 22, 9, 31], [44, 2, 19, 7, 60, 13, 27]], np.int64)
REFERENCE = np.array([[6, 16, 30, 1, 2, 50, 4], [9, 8, 7, 6, 5, 4, 3], [33, 33, 1, 0, 12, 12, 40]], np.int64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("oracle")
    make_hf_checkpoint(directory, seed=7, init_std=0.1, **SHAPE)
    return tinygpt.load(directory), hf_eager(directory)


def hooked_logits(hf, tokens, hooks):
    """HF logits with (module, kind, fn) hooks registered for one forward; kind is "pre" or "post"."""
    handles = [module.register_forward_pre_hook(fn) if kind == "pre" else module.register_forward_hook(fn)
               for module, kind, fn in hooks]
    try:
        with torch.no_grad():
            return hf(torch.as_tensor(tokens)).logits.numpy()
    finally:
        for handle in handles:
            handle.remove()


def head_columns(head):
    return slice(head * D_HEAD, (head + 1) * D_HEAD)


def test_zero_head_ablation(models):
    ours, hf = models
    layer, head = 1, 2

    def zero_head(module, args):
        z = args[0].clone()
        z[..., head_columns(head)] = 0
        return (z,)

    expected = hooked_logits(hf, TOKENS, [(hf.transformer.h[layer].attn.c_proj, "pre", zero_head)])
    got = ablation.ablate(ours.params, TOKENS, ours.config, "z", layers=[layer], heads=[head]).logits
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_mean_head_ablation(models):
    ours, hf = models
    layer, head = 0, 1
    captured = []
    record = (hf.transformer.h[layer].attn.c_proj, "pre", lambda module, args: captured.append(args[0].clone()))
    hooked_logits(hf, REFERENCE, [record])
    mean_z = captured[0].mean(dim=0)  # [seq, n_embd]: the merged z, averaged over the reference batch

    def mean_head(module, args):
        z = args[0].clone()
        z[..., head_columns(head)] = mean_z[..., head_columns(head)]
        return (z,)

    expected = hooked_logits(hf, TOKENS, [(hf.transformer.h[layer].attn.c_proj, "pre", mean_head)])
    got = ablation.ablate(ours.params, TOKENS, ours.config, "z", layers=[layer], heads=[head], method="mean",
                          reference=REFERENCE).logits
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_neuron_ablation(models):
    ours, hf = models
    layer, neurons = 0, [3, 50, 95]

    def zero_neurons(module, args, output):
        output = output.clone()
        output[..., neurons] = 0
        return output

    expected = hooked_logits(hf, TOKENS, [(hf.transformer.h[layer].mlp.act, "post", zero_neurons)])
    got = ablation.ablate(ours.params, TOKENS, ours.config, "mlp_post", layers=[layer], neurons=neurons).logits
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_attention_sublayer_ablation(models):
    ours, hf = models

    def zero_attention(module, args, output):
        return (torch.zeros_like(output[0]),) + tuple(output[1:])

    expected = hooked_logits(hf, TOKENS, [(hf.transformer.h[1].attn, "post", zero_attention)])
    got = ablation.ablate(ours.params, TOKENS, ours.config, "attn_out", layers=[1]).logits
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_residual_patch_from_the_clean_run(models):
    ours, hf = models
    clean, corrupt = TOKENS, TOKENS.copy()
    corrupt[:, 2] = [50, 51]
    layer, position = 0, 2
    block = hf.transformer.h[layer]

    def hidden(output):
        return output[0] if isinstance(output, tuple) else output

    captured = []
    hooked_logits(hf, clean, [(block, "post", lambda module, args, output: captured.append(hidden(output).clone()))])

    def patch_position(module, args, output):
        h = hidden(output).clone()
        h[:, position] = captured[0][:, position]
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    expected = hooked_logits(hf, corrupt, [(block, "post", patch_position)])
    got = patching.patch(ours.params, clean, corrupt, ours.config, "resid_post", layers=[layer],
                         positions=[position]).logits
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)

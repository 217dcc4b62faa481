"""The checkpoint every contender loads, and the peers: Hugging Face transformers (PyTorch) and
TransformerLens 4.x (`TransformerBridge`), with the loops an interpretability user writes with them.

The checkpoint is a random-weight GPT2LMHeadModel of GPT-2 small's shape written by transformers'
`save_pretrained` (the official layout), plus a byte-level tokenizer (vocab.json + merges.txt: the 256
byte tokens and <|endoftext|>, no merges) because TransformerLens boots with one. Benchmarks feed token ids,
so the tokenizer never changes what is measured.

TransformerLens's `boot_transformers` keeps the raw HF weights (no LayerNorm folding), so its activations
are GPT-2's own and compare directly with tinygpt's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)

WRITE_CHECKPOINT = textwrap.dedent(
    """
    import json, sys, torch, transformers
    torch.manual_seed(0)
    shape = json.loads(sys.argv[2])
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).save_pretrained(sys.argv[1])
    """
)


def ensure_checkpoint(directory: Path, shape: dict = GPT2_SMALL) -> Path:
    """Write the random checkpoint (in a subprocess, so torch's memory is not this process's) unless
    `directory` already holds one of this shape, and the tokenizer files beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    config_file = directory / "config.json"
    fresh = not (directory / "model.safetensors").is_file() or not config_file.is_file() or any(
        json.loads(config_file.read_text()).get(k) != v for k, v in shape.items())
    if fresh:
        subprocess.run([sys.executable, "-c", WRITE_CHECKPOINT, str(directory), json.dumps(shape)], check=True,
                       env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    write_byte_tokenizer(directory)
    return directory


def write_byte_tokenizer(directory: Path) -> None:
    """GPT-2's byte-level alphabet as a vocabulary (ids 0-255, <|endoftext|> 256) and no merges."""
    from tinygpt.tokenizer import bytes_to_unicode

    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")


# ------------------------------------------------------------------------------------------------- peers


def torch_device(backend: str) -> str:
    return "cuda" if backend == "gpu" else "cpu"


def load_hf(directory: Path, device: str, dtype: str = "float32"):
    """transformers' GPT2LMHeadModel in eval mode, with its default attention (SDPA)."""
    import torch
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(directory, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def transformer_lens_version() -> str | None:
    """TransformerLens's version when its 4.x bridge can be imported, else None (the peer is skipped)."""
    try:
        from importlib import metadata

        from transformer_lens.model_bridge import TransformerBridge  # noqa: F401

        return metadata.version("transformer-lens")
    except Exception:  # not installed, or an install that does not import: measured as unavailable
        return None


def load_tl(directory: Path, device: str):
    """TransformerLens 4.x: `TransformerBridge.boot_transformers` on the local checkpoint, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    # transformers 5's GPT2TokenizerFast(vocab_file=, merges_file=) builds a one-token vocabulary; the slow
    # tokenizer reads the files correctly.
    tokenizer = transformers.GPT2Tokenizer.from_pretrained(directory)
    bridge = TransformerBridge.boot_transformers(str(directory), device=device, tokenizer=tokenizer)
    bridge.eval()
    return bridge


def to_torch(x, device: str):
    import torch

    return torch.as_tensor(np.asarray(x), dtype=torch.long, device=device)


def to_torch_float(x, device: str):
    import torch

    return torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------ the TransformerLens loops


def tl_sites(config) -> dict[str, str]:
    """tinygpt site -> TransformerLens hook name pattern ({} = layer) for the sites both expose with the
    same shape and meaning."""
    return {
        "resid_pre": "blocks.{}.hook_resid_pre", "ln1_scale": "blocks.{}.ln1.hook_scale",
        "ln1": "blocks.{}.ln1.hook_normalized", "q": "blocks.{}.attn.hook_q", "k": "blocks.{}.attn.hook_k",
        "v": "blocks.{}.attn.hook_v", "attn_pattern": "blocks.{}.attn.hook_pattern",
        "z": "blocks.{}.attn.hook_z", "attn_out": "blocks.{}.hook_attn_out",
        "resid_mid": "blocks.{}.hook_resid_mid", "ln2": "blocks.{}.ln2.hook_normalized",
        "mlp_pre": "blocks.{}.mlp.hook_pre", "mlp_post": "blocks.{}.mlp.hook_post",
        "mlp_out": "blocks.{}.hook_mlp_out", "resid_post": "blocks.{}.hook_resid_post",
        "ln_final": "ln_final.hook_normalized",
    }


def tl_head_sweep(bridge, tokens, targets, n_layer: int, n_head: int):
    """Every single-head zero ablation as a TransformerLens user runs it: one `run_with_hooks` per head,
    the hook zeroing that head's z; scores are the log-prob of `targets` at the last position.
    Returns [layer, head, batch] (numpy)."""
    import torch

    rows = torch.arange(tokens.shape[0], device=tokens.device)
    scores = np.empty((n_layer, n_head, tokens.shape[0]), np.float32)
    with torch.inference_mode():
        for layer in range(n_layer):
            for head in range(n_head):
                def ablate(z, hook, head=head):  # z [batch, seq, head, d_head]
                    z[:, :, head] = 0.0
                    return z

                logits = bridge.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])
                logprobs = torch.log_softmax(logits[:, -1].float(), dim=-1)
                scores[layer, head] = logprobs[rows, targets].cpu().numpy()
    return scores


def tl_causal_trace(bridge, tokens, noise, subject: slice, answer: int, n_layer: int):
    """ROME's causal trace as a TransformerLens user runs it: a clean run caching every block's output, then
    for every (layer, position) one run with noise added to the subject's embeddings in rows 1.. and that
    block output restored to the clean value at that position. Returns p(answer) at the last position,
    [layer, position, row] (numpy)."""
    import torch

    batch, seq = tokens.shape
    probs = np.empty((n_layer, seq, batch), np.float32)
    with torch.inference_mode():
        _, clean = bridge.run_with_cache(tokens[:1], names_filter=lambda name: name.endswith("hook_resid_post"))

        def corrupt(embed, hook):  # [batch, seq, d_model]
            embed[1:, subject] += noise
            return embed

        for layer in range(n_layer):
            clean_out = clean[f"blocks.{layer}.hook_resid_post"][0]  # [seq, d_model]
            for position in range(seq):
                def restore(resid, hook, position=position):
                    resid[1:, position] = clean_out[position]
                    return resid

                logits = bridge.run_with_hooks(tokens, fwd_hooks=[
                    ("hook_embed", corrupt), (f"blocks.{layer}.hook_resid_post", restore)])
                probs[layer, position] = torch.softmax(logits[:, -1].float(), dim=-1)[:, answer].cpu().numpy()
    return probs

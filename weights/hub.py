"""Finding a checkpoint: a local directory, or a Hugging Face hub repository (through huggingface_hub, with
its cache, revisions and offline mode)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import WeightsError

# Short names of the official GPT-2 checkpoints, as the hub redirects them.
ALIASES = {
    name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
} | {"distilgpt2": "distilbert/distilgpt2"}

CHECKPOINT_FILES = ["config.json", "model.safetensors", "vocab.json", "merges.txt"]


class HubError(WeightsError):
    """The hub could not provide the checkpoint (unknown id, unreachable, missing file)."""


def resolve(name_or_path: str | os.PathLike, *, revision: str | None = None, cache_dir=None,
            offline: bool | None = None) -> Path:
    """A local directory holding the checkpoint's files. Local directories are returned as they are; hub
    ids are downloaded (or found in the cache) with `huggingface_hub.snapshot_download`.

    offline=True (or HF_HUB_OFFLINE=1) uses only the local cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise WeightsError(f"{name} is a file; pass the directory holding config.json and model.safetensors")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise WeightsError(f"no such directory: {name}")
    return download(ALIASES.get(name, name), revision=revision, cache_dir=cache_dir, offline=offline)


def download(repo_id: str, *, revision=None, cache_dir=None, offline=None) -> Path:
    import huggingface_hub
    from huggingface_hub import constants, errors

    offline_because = offline_reasons(offline)
    what = repr(repo_id) + (f" (revision {revision!r})" if revision else "")
    where = "the local Hugging Face cache" + (f" ({cache_dir})" if cache_dir else "")
    local = ("To run without the hub, pass a local directory holding config.json + model.safetensors "
             "(+ vocab.json, merges.txt), e.g. tinygpt.load('/path/to/gpt2') or `--model /path/to/gpt2`")
    if offline_because:  # offline already: say how to go online, never to set what is set
        mode = f"offline mode is on ({', '.join(reason for reason, _ in offline_because)})"
        go_online = " and ".join(fix for _, fix in offline_because)
        local_hint = f"{local}; or, on a machine that can reach the hub, {go_online} so that it is downloaded."
    else:
        mode = None
        local_hint = (f"{local}; or download it once on a connected machine so it is in the cache, then set "
                      "HF_HUB_OFFLINE=1.")
    try:
        snapshot = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=CHECKPOINT_FILES,
            local_files_only=bool(offline_because),
        )
    except errors.RepositoryNotFoundError:
        raise HubError(
            f"unknown hub id {repo_id!r}: no such model repository on the Hugging Face hub (or it is private "
            "or gated; log in with `hf auth login`)"
        ) from None
    except errors.RevisionNotFoundError:
        raise HubError(f"hub repository {repo_id!r} has no revision {revision!r}") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as e:
        if isinstance(e, getattr(errors, "IncompleteSnapshotError", ())):  # not in older huggingface_hub
            raise HubError(
                f"the cached copy of {what} in {where} is incomplete and the hub cannot be used to finish it "
                f"({(str(e).splitlines() or [type(e).__name__])[0]}). " + local_hint
            ) from None
        if mode:
            raise HubError(f"{what} is not in {where} and {mode}. " + local_hint) from None
        raise HubError(
            f"could not reach the Hugging Face hub to download {what} ({_reason(e)}), and it is not in "
            f"{where}. " + local_hint
        ) from None
    except (OSError, ConnectionError) as e:  # network failures surface as OSError subclasses
        raise HubError(f"could not reach the Hugging Face hub to download {repo_id!r} ({_reason(e)}). "
                       + local_hint) from None
    path = Path(snapshot)
    for required in ("config.json", "model.safetensors"):
        if not (path / required).is_file():
            raise HubError(f"hub repository {repo_id!r} has no {required} (tinygpt reads safetensors checkpoints)")
    return path


TRUE_VALUES = ("1", "ON", "YES", "TRUE")  # as huggingface_hub reads its boolean variables


def offline_reasons(offline: bool | None) -> list[tuple[str, str]]:
    """What keeps huggingface_hub off the network, each as (reason, how to undo it); empty when it may
    download. `offline=True` is one reason; without an explicit `offline=False`, HF_HUB_OFFLINE or
    TRANSFORMERS_OFFLINE set now is another; and huggingface_hub's own flag (read from those variables when
    it was imported) refuses downloads whatever `offline` says."""
    from huggingface_hub import constants

    reasons = [("offline=True", "pass offline=False")] if offline else []
    set_now = [var for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
               if os.environ.get(var, "").upper() in TRUE_VALUES]
    if set_now and (offline is None or constants.HF_HUB_OFFLINE):
        reasons += [(f"{var} is set", f"unset {var}") for var in set_now]
    elif constants.HF_HUB_OFFLINE:
        reasons.append(("HF_HUB_OFFLINE was set when huggingface_hub was imported",
                        "start Python without HF_HUB_OFFLINE"))
    return reasons


def _reason(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    text = str(cause or e).strip().splitlines()
    return text[0] if text else type(e).__name__

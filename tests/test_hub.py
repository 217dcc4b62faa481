"""Getting checkpoints through the Hugging Face hub code path (weights/hub.py), without any network.

Every test runs with huggingface_hub's HTTP client replaced by one whose transport refuses all connections
(the `hub` fixture), so nothing can reach the network whether or not it is reachable; tests that need the
hub to answer install their own responses. Cached checkpoints are laid out by hand, as huggingface_hub
writes them:

    {cache}/models--{org}--{name}/
        blobs/{hash}                              file contents
        refs/{branch or tag}                      a commit hash (no newline)
        snapshots/{commit}/{file} -> ../../blobs/{hash}
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx2
import huggingface_hub
import jax
import numpy as np
import pytest
from huggingface_hub import constants, errors
from huggingface_hub.utils import hf_raise_for_status
from huggingface_hub.utils._http import hf_request_event_hook

import tinygpt
import weights
from tinygpt.params import param_shapes
from weights import HubError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
LOCAL_HINT = "pass a local directory holding config.json + model.safetensors"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two small checkpoint directories with different random weights."""
    config = tinygpt.Config(n_layer=2, n_head=2, d_model=8, d_head=4, d_mlp=32, n_ctx=8, vocab_size=20)
    dirs = []
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        params = jax.tree_util.tree_map(lambda shape: rng.standard_normal(shape, np.float32), param_shapes(config),
                                        is_leaf=lambda x: isinstance(x, tuple))
        directory = tmp_path_factory.mktemp(f"ckpt{seed}")
        weights.write(directory, config, params)
        dirs.append(directory)
    return dirs


@pytest.fixture(autouse=True)
def hub(monkeypatch):
    """No offline flag from the environment, and a hub that cannot be reached: every request fails as a
    refused connection does. `hub.respond = fn(request) -> httpx2.Response` makes it answer instead;
    `hub.requests` lists the URLs asked for."""

    class Hub:
        requests: list[str] = []
        respond = None

    def handler(request):
        Hub.requests.append(str(request.url))
        if Hub.respond is None:
            raise httpx2.ConnectError("[Errno 111] Connection refused", request=request)
        return Hub.respond(request)

    def client():  # as huggingface_hub's default_client_factory, over the fake transport
        return httpx2.Client(transport=httpx2.MockTransport(handler), event_hooks={"request": [hf_request_event_hook]},
                             follow_redirects=True)

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read from the environment at import
    previous = huggingface_hub.utils._http._GLOBAL_CLIENT_FACTORY
    huggingface_hub.set_client_factory(client)
    yield Hub
    huggingface_hub.set_client_factory(previous)


def add_to_cache(cache: Path, repo_id: str, directory: Path, *, commit=COMMIT, refs=("main",),
                 files=("config.json", "model.safetensors", "vocab.json", "merges.txt")) -> Path:
    """Put `directory`'s checkpoint files into a huggingface_hub cache as snapshot `commit` of `repo_id`."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in files:
        if not (directory / name).is_file():
            continue
        data = (directory / name).read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / blob)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # no trailing newline: huggingface_hub reads it verbatim
    return snapshot


def assert_same_params(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()


# ------------------------------------------------------------------------------------------ from the cache


def test_hand_built_cache_is_what_huggingface_hub_reads(tmp_path, checkpoints):
    add_to_cache(tmp_path, "someorg/tiny-gpt2", checkpoints[0])
    (repo,) = huggingface_hub.scan_cache_dir(tmp_path).repos
    assert repo.repo_id == "someorg/tiny-gpt2" and repo.repo_type == "model"
    (revision,) = repo.revisions
    assert revision.commit_hash == COMMIT and set(revision.refs) == {"main"}
    assert {f.file_name for f in revision.files} == {"config.json", "model.safetensors"}


def test_offline_load_from_cache(tmp_path, checkpoints, hub):
    add_to_cache(tmp_path, "someorg/tiny-gpt2", checkpoints[0])
    model = tinygpt.load("someorg/tiny-gpt2", cache_dir=tmp_path, offline=True)
    assert model.source == "someorg/tiny-gpt2"
    assert model.config == tinygpt.load(checkpoints[0]).config
    assert_same_params(model.params, tinygpt.load(checkpoints[0]).params)
    assert hub.requests == []


@pytest.mark.parametrize("set_at_import", [True, False], ids=["env-before-import", "env-set-later"])
def test_offline_from_environment(tmp_path, checkpoints, hub, monkeypatch, set_at_import):
    """HF_HUB_OFFLINE=1 as a user sets it (before huggingface_hub is imported, which copies it into
    `constants.HF_HUB_OFFLINE`), or set in the environment only after the import."""
    add_to_cache(tmp_path, "someorg/tiny-gpt2", checkpoints[0])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", set_at_import)
    assert_same_params(tinygpt.load("someorg/tiny-gpt2", cache_dir=tmp_path).params,
                       tinygpt.load(checkpoints[0]).params)
    assert hub.requests == []


def test_offline_default_cache_dir(tmp_path, checkpoints, hub, monkeypatch):
    """Without cache_dir, huggingface_hub's own cache (HF_HUB_CACHE, read at import) is used."""
    add_to_cache(tmp_path, "someorg/tiny-gpt2", checkpoints[0])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert_same_params(tinygpt.load("someorg/tiny-gpt2", offline=True).params, tinygpt.load(checkpoints[0]).params)


@pytest.mark.parametrize("alias, repo_id", [("gpt2", "openai-community/gpt2"),
                                            ("gpt2-xl", "openai-community/gpt2-xl"),
                                            ("distilgpt2", "distilbert/distilgpt2")])
def test_alias(tmp_path, checkpoints, alias, repo_id):
    assert weights.ALIASES[alias] == repo_id
    add_to_cache(tmp_path, repo_id, checkpoints[0])
    model = tinygpt.load(alias, cache_dir=tmp_path, offline=True)
    assert model.source == alias
    assert_same_params(model.params, tinygpt.load(checkpoints[0]).params)


def test_revision(tmp_path, checkpoints):
    """main -> COMMIT (weights 0); OTHER_COMMIT (weights 1) is reachable by its hash and by tag v1."""
    add_to_cache(tmp_path, "someorg/tiny-gpt2", checkpoints[0])
    add_to_cache(tmp_path, "someorg/tiny-gpt2", checkpoints[1], commit=OTHER_COMMIT, refs=("v1",))
    by_dir = [tinygpt.load(d).params for d in checkpoints]

    def load(**kw):
        return tinygpt.load("someorg/tiny-gpt2", cache_dir=tmp_path, offline=True, **kw).params

    assert_same_params(load(), by_dir[0])
    assert_same_params(load(revision="main"), by_dir[0])
    assert_same_params(load(revision=COMMIT), by_dir[0])
    assert_same_params(load(revision=OTHER_COMMIT), by_dir[1])
    assert_same_params(load(revision="v1"), by_dir[1])
    with pytest.raises(HubError, match=r"'someorg/tiny-gpt2' \(revision 'v2'\) is not in the local Hugging Face "
                                       r"cache .* offline mode is on"):
        load(revision="v2")


def test_unreachable_hub_falls_back_to_the_cache(tmp_path, checkpoints, hub):
    add_to_cache(tmp_path, "someorg/tiny-gpt2", checkpoints[0])
    model = tinygpt.load("someorg/tiny-gpt2", cache_dir=tmp_path)  # not offline: the hub is tried first
    assert hub.requests  # it was tried, and refused
    assert_same_params(model.params, tinygpt.load(checkpoints[0]).params)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("how", ["offline=True", "HF_HUB_OFFLINE=1"])
def test_not_cached_and_offline(tmp_path, hub, monkeypatch, how):
    kwargs = {}
    if how == "offline=True":
        kwargs["offline"] = True
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError) as e:
        tinygpt.load("someorg/tiny-gpt2", cache_dir=tmp_path, **kwargs)
    message = str(e.value)
    assert f"'someorg/tiny-gpt2' is not in the local Hugging Face cache ({tmp_path})" in message
    assert "offline mode is on" in message
    assert LOCAL_HINT in message
    assert hub.requests == []


def test_unreachable_hub(tmp_path, hub):
    with pytest.raises(HubError) as e:
        tinygpt.load("gpt2", cache_dir=tmp_path)
    message = str(e.value)
    assert message.startswith("could not reach the Hugging Face hub to download 'openai-community/gpt2'")
    assert "Connection refused" in message and "it is not in the local Hugging Face cache" in message
    assert LOCAL_HINT in message
    assert any("openai-community/gpt2" in url for url in hub.requests)


@pytest.mark.parametrize("how, reason, fix", [
    ("HF_HUB_OFFLINE=1", "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE"),
    ("TRANSFORMERS_OFFLINE=1", "TRANSFORMERS_OFFLINE is set", "unset TRANSFORMERS_OFFLINE"),
    ("offline=True", "offline=True", "pass offline=False"),
    ("set at import", "HF_HUB_OFFLINE was set when huggingface_hub was imported",
     "start Python without HF_HUB_OFFLINE"),
    ("offline=False, HF_HUB_OFFLINE=1 at import", "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE"),
])
def test_offline_message_names_what_is_set_and_never_advises_setting_it(tmp_path, hub, monkeypatch, how, reason, fix):
    """Offline and not cached: the message used to end 'then set HF_HUB_OFFLINE=1' when it was already set."""
    kwargs = {}
    if how == "offline=True":
        kwargs["offline"] = True
    elif how == "set at import":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    elif how.startswith("offline=False"):
        kwargs["offline"] = False
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setenv(how.split("=")[0], "1")
    with pytest.raises(HubError) as e:
        tinygpt.load("someorg/tiny-gpt2", cache_dir=tmp_path, **kwargs)
    message = str(e.value)
    assert f"is not in the local Hugging Face cache ({tmp_path}) and offline mode is on ({reason})" in message
    assert LOCAL_HINT in message and f"on a machine that can reach the hub, {fix} so that it is downloaded" in message
    assert "set HF_HUB_OFFLINE=1" not in message and "\n" not in message
    assert hub.requests == []


def test_unreachable_hub_online_advises_offline_mode(tmp_path, hub):
    with pytest.raises(HubError) as e:
        tinygpt.load("someorg/tiny-gpt2", cache_dir=tmp_path)
    message = str(e.value)
    assert "could not reach the Hugging Face hub" in message and "offline mode is on" not in message
    assert message.endswith("download it once on a connected machine so it is in the cache, then set "
                            "HF_HUB_OFFLINE=1.")


def test_unknown_hub_id(tmp_path, hub):
    def not_found(request):  # what the hub answers for a missing (or private) repository
        return httpx2.Response(401, headers={"X-Error-Code": "RepoNotFound"}, request=request)

    hub.respond = not_found
    with pytest.raises(HubError, match=r"^unknown hub id 'someorg/no-such-model': no such model repository"):
        tinygpt.load("someorg/no-such-model", cache_dir=tmp_path)


def _hub_error(cls, status, code):
    """An HTTP error exactly as huggingface_hub builds it from the hub's response."""
    request = httpx2.Request("GET", "https://huggingface.co/api/models/someorg/tiny-gpt2/revision/main")
    try:
        hf_raise_for_status(httpx2.Response(status, headers={"X-Error-Code": code}, request=request))
    except cls as e:
        return e
    raise AssertionError(f"hf_raise_for_status raised no {cls.__name__}")


def _connection_failure():
    """What snapshot_download raises when the hub can't be reached and nothing is cached (its source:
    `raise LocalEntryNotFoundError(...) from api_call_error`, the httpx2.ConnectError)."""
    cause = httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")
    try:
        raise errors.LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub") \
            from cause
    except errors.LocalEntryNotFoundError as e:
        return e


@pytest.mark.parametrize(
    "error, message",
    [
        (_connection_failure, r"^could not reach the Hugging Face hub to download 'someorg/tiny-gpt2' "
                              r"\(revision 'v9'\) \(\[Errno -3\] Temporary failure in name resolution\), and it is "
                              r"not in the local Hugging Face cache\. To run without the hub, pass a local directory"),
        (lambda: _hub_error(errors.RepositoryNotFoundError, 404, "RepoNotFound"),
         r"^unknown hub id 'someorg/tiny-gpt2'"),
        (lambda: _hub_error(errors.RevisionNotFoundError, 404, "RevisionNotFound"),
         r"^hub repository 'someorg/tiny-gpt2' has no revision 'v9'"),
        (lambda: errors.IncompleteSnapshotError("The cached snapshot is incomplete: 1 file(s) are missing "
                                                "(model.safetensors).", snapshot_path="/x"),
         r"^the cached copy of 'someorg/tiny-gpt2' \(revision 'v9'\) in the local Hugging Face cache is "
         r"incomplete .*model\.safetensors.*pass a local directory"),
    ],
    ids=["connection", "repo-not-found", "revision-not-found", "incomplete"],
)
def test_snapshot_download_errors(monkeypatch, error, message):
    exc = error()

    def snapshot_download(*args, **kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(HubError, match=message):
        tinygpt.load("someorg/tiny-gpt2", revision="v9")


def test_repo_without_safetensors(tmp_path, checkpoints):
    """A repository with only PyTorch pickles (pytorch_model.bin): named, not a confusing file error."""
    snapshot = add_to_cache(tmp_path, "someorg/old-gpt2", checkpoints[0], files=("config.json",))
    (snapshot / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(HubError, match=r"hub repository 'someorg/old-gpt2' has no model\.safetensors"):
        tinygpt.load("someorg/old-gpt2", cache_dir=tmp_path, offline=True)

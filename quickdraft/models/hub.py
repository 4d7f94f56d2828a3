"""Models named by Hugging Face hub id, resolved through ``huggingface_hub`` the way vLLM and
transformers do: the local cache first (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``; or ``download_dir``), then the hub, fetching only the files the
engine reads. ``HF_HUB_OFFLINE=1`` never touches the network; ``HF_ENDPOINT`` names another hub.

Forms accepted (``resolve_hub_model``):
    "org/name"                      safetensors checkpoint (config.json + *.safetensors + tokenizer)
    "org/name-GGUF:Q4_K_M"          the GGUF file of that quantization in a GGUF repo (llama.cpp's -hf)
    "org/name" + gguf_file="x.gguf" that file
    "org/name" holding one GGUF     that file
The environment is read at every call (huggingface_hub reads it once, at import).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# What the engine reads from a safetensors repo (weights, configs, tokenizer, chat template).
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json"]
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               *TOKENIZER_FILES]

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_QUANT_TAG = re.compile(r"^[A-Za-z0-9_]+$")


class HubModelNotFoundError(FileNotFoundError):
    """A hub id that is neither in the cache nor reachable (offline, no network, unknown repo)."""


@dataclass(frozen=True)
class HubSettings:
    cache_dir: Path
    offline: bool
    endpoint: str | None

    @classmethod
    def from_env(cls, download_dir: str | Path | None = None) -> "HubSettings":
        env = os.environ
        if download_dir is not None:
            cache = Path(download_dir).expanduser()
        elif env.get("HF_HUB_CACHE"):
            cache = Path(env["HF_HUB_CACHE"]).expanduser()
        elif env.get("HF_HOME"):
            cache = Path(env["HF_HOME"]).expanduser() / "hub"
        else:
            cache = Path(env.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface" / "hub"
        offline = any(env.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
                      for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        return cls(cache, offline, env.get("HF_ENDPOINT") or None)


def split_model_ref(model: str) -> tuple[str, str | None] | None:
    """'org/name' -> ('org/name', None); 'org/name:Q4_K_M' -> ('org/name', 'Q4_K_M'); None if
    the string cannot be a hub id (a path, a URL, spaces ...)."""
    repo, _, tag = model.partition(":")
    if not _REPO_ID.match(repo) or ".." in repo or (tag and not _QUANT_TAG.match(tag)) or model.endswith(":"):
        return None
    return repo, tag or None


def looks_like_repo_id(model: str) -> bool:
    return split_model_ref(model) is not None


def _fetch_hint(repo: str, revision: str | None, files: list[str] | None = None) -> str:
    rev = f" --revision {revision}" if revision else ""
    names = "".join(f" {f}" for f in files or [])
    return f"hf download {repo}{names}{rev}"


def _cached_snapshot(repo: str, revision: str | None, s: HubSettings) -> Path | None:
    """The cached snapshot folder of repo at revision (a branch, tag or commit), or None. Read
    from the cache layout itself (refs/<revision> -> snapshots/<commit>): huggingface_hub's
    local lookup also insists on files a filtered download deliberately skipped."""
    base = s.cache_dir / f"models--{repo.replace('/', '--')}"
    rev = revision or "main"
    ref = base / "refs" / rev
    commit = ref.read_text().strip() if ref.is_file() else rev
    folder = base / "snapshots" / commit
    return folder if folder.is_dir() else None


def _files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _remote_files(repo: str, revision: str | None, s: HubSettings) -> list[str]:
    from huggingface_hub import HfApi

    return sorted(HfApi(endpoint=s.endpoint).list_repo_files(repo, revision=revision))


def pick_gguf(repo: str, files: list[str], quant: str | None, gguf_file: str | None) -> str:
    """The one GGUF file of ``files`` that ``quant`` (a tag such as Q4_K_M, matched as a whole
    name part, any case) or ``gguf_file`` (a file name, or a path in the repo) selects; with
    neither, the repo's only GGUF. Errors list what the repo holds."""
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    if gguf_file is not None:
        hits = [f for f in ggufs if f == gguf_file or f.rsplit("/", 1)[-1] == gguf_file]
        what = f"gguf_file={gguf_file!r}"
    elif quant is not None:
        tag = re.compile(rf"(?:^|[-_./]){re.escape(quant)}(?=[-.]|$)", re.IGNORECASE)
        hits = [f for f in ggufs if tag.search(f[: -len(".gguf")])]
        what = f"quantization {quant!r}"
    else:
        hits, what = ggufs, "a GGUF file"
    if len(hits) == 1:
        return hits[0]
    held = ", ".join(ggufs) if ggufs else "no .gguf files"
    if not hits:
        raise FileNotFoundError(f"Repo {repo!r} has no {what}; it holds: {held}.")
    raise ValueError(f"Repo {repo!r} has several files for {what}: {', '.join(hits)}. Name one with "
                     f"'{repo}:QUANT' or gguf_file=...; the repo holds: {held}.")


def _not_found(repo: str, revision: str | None, s: HubSettings, why: str) -> HubModelNotFoundError:
    at = f" at revision {revision!r}" if revision else ""
    return HubModelNotFoundError(
        f"Model {repo!r}{at} is not a local folder or .gguf file, not in the Hugging Face cache "
        f"{str(s.cache_dir)!r}, and {why}. "
        f"Fetch it with `{_fetch_hint(repo, revision)}` (or set HF_HOME / HF_HUB_CACHE / download_dir to "
        f"the cache that holds it).")


def _hub_call(fn, repo: str, revision: str | None, s: HubSettings):
    """Run a network call; turn the hub's errors into ones that say what to do."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return fn()
    except GatedRepoError as e:
        raise HubModelNotFoundError(f"Model {repo!r} is gated: accept its terms on the hub and log in "
                                    f"(`hf auth login`). ({e})") from e
    except RepositoryNotFoundError as e:
        raise HubModelNotFoundError(f"Model {repo!r} does not exist on the hub (or is private: log in with "
                                    f"`hf auth login`), and it is not a local folder or .gguf file.") from e
    except RevisionNotFoundError as e:
        raise HubModelNotFoundError(f"Model {repo!r} has no revision {revision!r}.") from e
    except OfflineModeIsEnabled as e:
        raise _not_found(repo, revision, s, "HF_HUB_OFFLINE is set") from e
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code < 500:
            raise
        raise _not_found(repo, revision, s, f"the hub answered {e}") from e
    except Exception as e:  # connection errors: OSError, or the HTTP client's transport errors
        if not (isinstance(e, OSError) or type(e).__module__.split(".")[0].startswith("httpx")):
            raise
        raise _not_found(repo, revision, s, f"the hub could not be reached ({type(e).__name__}: {e})") from e


def resolve_hub_model(model: str, *, revision: str | None = None, download_dir: str | Path | None = None,
                      gguf_file: str | None = None, files: list[str] | None = None) -> Path:
    """A hub id (forms in the module docstring) -> a local HF folder or .gguf file, from the cache
    or downloaded. ``files``: the patterns to fetch from a safetensors repo (default MODEL_FILES;
    TOKENIZER_FILES for a tokenizer)."""
    ref = split_model_ref(model)
    if ref is None:
        raise ValueError(f"{model!r} is not a Hugging Face model id (ORG/NAME or ORG/NAME:QUANT).")
    repo, quant = ref
    if quant is not None and gguf_file is not None:
        raise ValueError(f"Give the GGUF file either as {model!r} or as gguf_file={gguf_file!r}, not both.")
    s = HubSettings.from_env(download_dir)
    patterns = files or MODEL_FILES
    wants_tokenizer_only = files is not None and "config.json" not in files
    snapshot = _cached_snapshot(repo, revision, s)
    missing: FileNotFoundError | None = None
    if snapshot is not None:
        held = _files_in(snapshot)
        try:
            found = _pick_local(repo, snapshot, held, quant, gguf_file, wants_tokenizer_only)
        except FileNotFoundError as e:  # the cached snapshot lacks that GGUF file; the hub may have it
            found, missing = None, e
        if found is not None:
            return found
    if s.offline:
        if missing is not None:
            raise FileNotFoundError(f"{missing} (HF_HUB_OFFLINE is set: only the cache {str(s.cache_dir)!r} was "
                                    f"searched; `{_fetch_hint(repo, revision)} --include '*.gguf'` fetches the "
                                    f"repo's GGUF files.)") from None
        raise _not_found(repo, revision, s, "HF_HUB_OFFLINE is set")
    remote = _hub_call(lambda: _remote_files(repo, revision, s), repo, revision, s)
    from huggingface_hub import hf_hub_download, snapshot_download

    ggufs = [f for f in remote if f.lower().endswith(".gguf")]
    if quant is not None or gguf_file is not None or (ggufs and "config.json" not in remote and not wants_tokenizer_only):
        name = pick_gguf(repo, remote, quant, gguf_file)
        return Path(_hub_call(lambda: hf_hub_download(repo, name, revision=revision, cache_dir=s.cache_dir,
                                                      endpoint=s.endpoint), repo, revision, s))
    if not wants_tokenizer_only and "config.json" not in remote:
        raise FileNotFoundError(f"Repo {repo!r} has no config.json and no .gguf file; it holds: "
                                f"{', '.join(remote) or 'nothing'}.")
    if not wants_tokenizer_only:
        # The config first: an architecture we cannot run fails before gigabytes of weights.
        from quickdraft.models.model_config import check_runnable

        config = Path(_hub_call(lambda: hf_hub_download(repo, "config.json", revision=revision,
                                                        cache_dir=s.cache_dir, endpoint=s.endpoint), repo, revision, s))
        check_runnable(config, repo)
    folder = _hub_call(lambda: snapshot_download(repo, revision=revision, cache_dir=s.cache_dir,
                                                 allow_patterns=patterns, endpoint=s.endpoint), repo, revision, s)
    return Path(folder)


def _pick_local(repo: str, snapshot: Path, held: list[str], quant: str | None, gguf_file: str | None,
                tokenizer_only: bool) -> Path | None:
    """What a cached snapshot provides for the request, or None if it lacks something (a
    FileNotFoundError from pick_gguf if it lacks the GGUF file asked for)."""
    ggufs = [f for f in held if f.lower().endswith(".gguf")]
    if quant is not None or gguf_file is not None or (ggufs and "config.json" not in held and not tokenizer_only):
        return snapshot / pick_gguf(repo, held, quant, gguf_file)
    if tokenizer_only:
        return snapshot if any(f in held for f in ("tokenizer.json", "tokenizer_config.json")) else None
    has_weights = any(f.endswith(".safetensors") for f in held)
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        import json

        shards = set(json.loads(index.read_text())["weight_map"].values())
        has_weights = shards <= set(held)
    return snapshot if "config.json" in held and has_weights else None

"""Models named by Hugging Face id (models/hub.py), without a network.

A temporary HF_HOME holds a hub cache written here in the layout huggingface_hub uses
(models--org--name/{blobs, refs, snapshots/<commit>}): tiny random checkpoints of two
architectures in two revisions of one repo, and a GGUF repo with two quantizations. Loading by
id must give what loading the same files by path gives. The download path runs against a
loopback stand-in for the hub's file API (fake_hub.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from quickdraft import LLM, SamplingParams
from quickdraft.entrypoints import cli
from quickdraft.models.hub import HubModelNotFoundError, pick_gguf, split_model_ref
from test_server import wait_healthy

KW = dict(dtype="float32", device="cpu", max_model_len=128, kv_cache_memory="4MiB")
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = ["def fibonacci(n):", "The quick brown fox"]
PROMPT_IDS = [[(i * 7) % 90 + 3 for i in range(20)], [(i * 11) % 90 + 3 for i in range(9)]]  # < the GGUFs' vocab 96
MAIN, V1 = "a" * 40, "b" * 40  # commits
GGUF_COMMIT = "c" * 40


def cache_repo(cache: Path, repo: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)) -> Path:
    """Write ``files`` as the snapshot ``commit`` of ``repo`` in hub-cache layout: content in
    blobs/<hash>, snapshot entries are relative symlinks to them, refs/<name> holds the commit."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = base / "snapshots" / commit
    for name, data in files.items():
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (base / "refs").mkdir(exist_ok=True)
        (base / "refs" / ref).write_text(commit)
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def greedy_texts(llm: LLM) -> list[list[int]]:
    """Greedy token ids for PROMPT_IDS."""
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPT_IDS], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    """Two quantizations of one tiny GGUF model (Q4_0 and Q8_0 linears)."""
    from gguf import GGMLQuantizationType as QT
    from test_gguf_loader import _tiny_model

    out = {}
    for name, qt in (("Q4_0", QT.Q4_0), ("Q8_0", QT.Q8_0)):
        folder = tmp_path_factory.mktemp(f"gguf_{name}")
        qtypes = {k: qt for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
        out[name] = _tiny_model(folder, "llama", qtypes=qtypes)[0]
    return out


@pytest.fixture()
def hub(tmp_path, monkeypatch, tiny_checkpoint, tiny_ggufs) -> Path:
    """HF_HOME with test-org/tiny (main: a Llama, tag v1: a Mistral) and test-org/tiny-GGUF."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf" / "hub"
    cache_repo(cache, "test-org/tiny", MAIN, {**folder_files(tiny_checkpoint("llama")), "README.md": b"# tiny"})
    cache_repo(cache, "test-org/tiny", V1, folder_files(tiny_checkpoint("mistral")), refs=("v1",))
    cache_repo(cache, "test-org/tiny-GGUF", GGUF_COMMIT,
               {f"tiny-{q}.gguf": p.read_bytes() for q, p in tiny_ggufs.items()})
    return cache


def test_hub_ids_parse():
    assert split_model_ref("org/name") == ("org/name", None)
    assert split_model_ref("org/Name-GGUF:Q4_K_M") == ("org/Name-GGUF", "Q4_K_M")
    assert split_model_ref("gpt2") == ("gpt2", None)
    for bad in ("/abs/path", "./rel/x", "a/b/c", "org/name:", "org/na me", "../x", "http://x/y"):
        assert split_model_ref(bad) is None, bad


def test_gguf_file_choice_by_quant_tag():
    files = ["README.md", "m-Q4_K_M.gguf", "m-Q4_K_S.gguf", "m.Q8_0.gguf", "sub/m-Q6_K.gguf"]
    assert pick_gguf("r", files, "Q4_K_M", None) == "m-Q4_K_M.gguf"
    assert pick_gguf("r", files, "q8_0", None) == "m.Q8_0.gguf"  # any case, '.' separated
    assert pick_gguf("r", files, "Q6_K", None) == "sub/m-Q6_K.gguf"
    assert pick_gguf("r", files, None, "m-Q4_K_S.gguf") == "m-Q4_K_S.gguf"
    with pytest.raises(FileNotFoundError, match="no quantization 'Q4_K'.*m-Q4_K_M.gguf, m-Q4_K_S.gguf"):
        pick_gguf("r", files, "Q4_K", None)  # a whole name part: Q4_K is not Q4_K_M
    with pytest.raises(ValueError, match="several files for a GGUF file"):
        pick_gguf("r", files, None, None)
    assert pick_gguf("r", ["only.gguf", "README.md"], None, None) == "only.gguf"


def test_model_by_id_and_revision_equals_by_path(hub, tiny_checkpoint):
    """main, a tag and a commit resolve to their snapshots; outputs equal loading by path."""
    by_path = greedy_texts(LLM(str(tiny_checkpoint("llama")), **KW))
    llm = LLM("test-org/tiny", **KW)
    assert llm.model_path == hub / "models--test-org--tiny" / "snapshots" / MAIN
    assert llm.model_config.architecture == "LlamaForCausalLM"
    assert greedy_texts(llm) == by_path
    mistral = greedy_texts(LLM(str(tiny_checkpoint("mistral")), **KW))
    for rev in ("v1", V1):
        llm = LLM("test-org/tiny", revision=rev, **KW)
        assert llm.model_config.architecture == "MistralForCausalLM"
        assert greedy_texts(llm) == mistral
    assert mistral != by_path


def test_gguf_repo_by_quant_and_by_file(hub, tiny_checkpoint, tiny_ggufs):
    tok = str(tiny_checkpoint("llama"))
    for quant in ("Q4_0", "Q8_0"):
        want = greedy_texts(LLM(str(tiny_ggufs[quant]), tokenizer=tok, **KW))
        by_tag = LLM(f"test-org/tiny-GGUF:{quant.lower()}", tokenizer=tok, **KW)
        assert by_tag.model_path.name == f"tiny-{quant}.gguf"
        assert greedy_texts(by_tag) == want
        by_file = LLM("test-org/tiny-GGUF", gguf_file=f"tiny-{quant}.gguf", tokenizer=tok, **KW)
        assert greedy_texts(by_file) == want
    with pytest.raises(ValueError, match=r"several files .* tiny-Q4_0.gguf, tiny-Q8_0.gguf"):
        LLM("test-org/tiny-GGUF", tokenizer=tok, **KW)
    with pytest.raises(FileNotFoundError, match=r"no quantization 'Q6_K'; it holds: tiny-Q4_0.gguf, tiny-Q8_0.gguf"):
        LLM("test-org/tiny-GGUF:Q6_K", tokenizer=tok, **KW)
    with pytest.raises(ValueError, match="not both"):
        LLM("test-org/tiny-GGUF:Q4_0", gguf_file="tiny-Q4_0.gguf", tokenizer=tok, **KW)


def test_tokenizer_by_id(hub, tiny_checkpoint, tiny_ggufs):
    """tokenizer= a hub id (its own revision too): the GGUF (no tokenizer inside) runs with it."""
    want = greedy_texts(LLM(str(tiny_ggufs["Q8_0"]), tokenizer=str(tiny_checkpoint("llama")), **KW))
    llm = LLM("test-org/tiny-GGUF:Q8_0", tokenizer="test-org/tiny", tokenizer_revision="main", **KW)
    assert greedy_texts(llm) == want


def test_draft_model_by_id(hub, tiny_checkpoint):
    """speculative_config["model"] (and "revision") by id: the Mistral revision drafts for the
    Llama target; greedy output equals plain decoding and drafts were verified."""
    plain = greedy_texts(LLM("test-org/tiny", **KW))
    spec = LLM(str(tiny_checkpoint("llama")), speculative_config={
        "model": "test-org/tiny", "revision": "v1", "num_speculative_tokens": 3, "draft_length_policy": "fixed"}, **KW)
    assert spec.engine.proposer.runner.model.cfg.architecture == "MistralForCausalLM"
    outs = spec.generate([{"prompt_token_ids": p} for p in PROMPT_IDS], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == plain
    assert sum(o.metrics.num_draft_tokens for o in outs) > 0
    same = LLM(str(tiny_checkpoint("llama")), speculative_config={
        "model": "test-org/tiny", "num_speculative_tokens": 3, "draft_length_policy": "fixed"}, **KW)
    outs = same.generate([{"prompt_token_ids": p} for p in PROMPT_IDS], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == plain
    assert sum(o.metrics.num_accepted_tokens for o in outs) == sum(o.metrics.num_draft_tokens for o in outs) > 0


def test_offline_and_not_cached_says_how_to_fetch(hub):
    with pytest.raises(HubModelNotFoundError) as e:
        LLM("test-org/missing", **KW)
    msg = str(e.value)
    assert "'test-org/missing'" in msg and str(hub) in msg and "HF_HUB_OFFLINE" in msg
    assert "`hf download test-org/missing`" in msg
    with pytest.raises(HubModelNotFoundError, match="`hf download test-org/tiny --revision v9`"):
        LLM("test-org/tiny", revision="v9", **KW)
    with pytest.raises(FileNotFoundError, match="expected a Hugging Face model folder, a .gguf file, a Hugging Face"):
        LLM("./no/such/folder", **KW)


def test_download_dir_is_the_cache(hub, tmp_path, monkeypatch):
    """download_dir= names the cache to read (HF_HOME is then not consulted)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    with pytest.raises(HubModelNotFoundError, match="elsewhere"):
        LLM("test-org/tiny", **KW)
    assert LLM("test-org/tiny", download_dir=str(hub), **KW).model_path.parent.name == "snapshots"


def test_custom_code_and_unknown_architectures_are_named(hub):
    cfg = {"architectures": ["FancyForCausalLM"], "auto_map": {"AutoModelForCausalLM": "modeling_fancy.Fancy"},
           "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 128}
    files = {"config.json": json.dumps(cfg).encode(), "model.safetensors": b"x"}
    cache_repo(hub, "test-org/fancy", "d" * 40, files)
    with pytest.raises(ValueError, match=r"\['FancyForCausalLM'\].*custom code \(auto_map.*modeling_fancy"):
        LLM("test-org/fancy", **KW)
    del cfg["auto_map"]
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cache_repo(hub, "test-org/gpt", "e" * 40, {**files, "config.json": json.dumps(cfg).encode()})
    with pytest.raises(ValueError, match=r"\['GPT2LMHeadModel'\] are not supported.*Supported architectures"):
        LLM("test-org/gpt", **KW)


def test_cli_generate_by_id(hub, capsys):
    want = LLM("test-org/tiny", **KW).generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0].outputs[0].text
    assert cli.main(["generate", PROMPTS[0], "--model", "test-org/tiny", "--temperature", "0", "--max-tokens", "12",
                     "--ignore-eos", "--dtype", "float32", "--max-model-len", "128", "--kv-cache-memory", "4MiB"]) == 0
    assert capsys.readouterr().out == want + "\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_by_id(hub):
    """`quickdraft serve ORG/NAME` in its own process: the id is the served model name and the
    answers equal offline generation."""
    want = LLM("test-org/tiny", **KW).generate([PROMPTS[1]], GREEDY, use_tqdm=False)[0].outputs[0].text
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "quickdraft", "serve", "test-org/tiny", "--port", str(port),
                             "--dtype", "float32", "--max-model-len", "128", "--kv-cache-memory", "4MiB",
                             "--disable-uvicorn-access-log"], env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, 120, alive=lambda: proc.poll() is None, poll=0.2)
        except RuntimeError as e:
            raise AssertionError(f"{e}: {proc.stderr.read() if proc.poll() is not None else ''}") from None
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["test-org/tiny"]
        r = httpx.post(f"{url}/v1/completions", json={"model": "test-org/tiny", "prompt": PROMPTS[1], "max_tokens": 12,
                                                      "temperature": 0, "ignore_eos": True}, timeout=60).json()
        assert r["choices"][0]["text"] == want
    finally:
        proc.terminate()
        proc.wait(30)


def online(monkeypatch, tmp_path: Path) -> None:
    """A fresh HF_HOME, and the hub reachable: huggingface_hub snapshots HF_HUB_OFFLINE when it is
    first imported (maybe under another test's setting); quickdraft reads the variable itself."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_download_from_the_hub_then_offline_from_the_cache(tmp_path, monkeypatch, tiny_checkpoint):
    """Not cached and online: the files the engine reads are downloaded from the hub (a loopback
    stand-in for its file API, fake_hub.py, named by HF_ENDPOINT) into HF_HOME's cache, and
    nothing else (no README, no other weights); outputs equal loading by path. Then, offline,
    the same id loads from the cache without a request; a GGUF repo downloads one file."""
    from fake_hub import fake_hub

    online(monkeypatch, tmp_path)
    files = {**folder_files(tiny_checkpoint("llama")), "README.md": b"# tiny", "pytorch_model.bin": b"old weights"}
    want = greedy_texts(LLM(str(tiny_checkpoint("llama")), **KW))
    with fake_hub("test-org/tiny", {MAIN: files}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        llm = LLM("test-org/tiny", **KW)
        fetched = set(hub.fetched())
        assert greedy_texts(llm) == want
        assert llm.model_path == tmp_path / "hf" / "hub" / "models--test-org--tiny" / "snapshots" / MAIN
        assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= fetched
        assert not fetched & {"README.md", "pytorch_model.bin"}
        n = len(hub.requests)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert greedy_texts(LLM("test-org/tiny", **KW)) == want
        assert len(hub.requests) == n  # served from the cache
        monkeypatch.delenv("HF_HUB_OFFLINE")
        with pytest.raises(HubModelNotFoundError, match="does not exist on the hub"):
            LLM("test-org/other", **KW)
        with pytest.raises(HubModelNotFoundError, match="no revision 'v7'"):
            LLM("test-org/tiny", revision="v7", **KW)


def test_download_one_gguf_of_a_repo(tmp_path, monkeypatch, tiny_checkpoint, tiny_ggufs):
    from fake_hub import fake_hub

    online(monkeypatch, tmp_path)
    tok = str(tiny_checkpoint("llama"))
    want = greedy_texts(LLM(str(tiny_ggufs["Q8_0"]), tokenizer=tok, **KW))
    files = {f"tiny-{q}.gguf": p.read_bytes() for q, p in tiny_ggufs.items()}
    with fake_hub("test-org/tiny-GGUF", {GGUF_COMMIT: files}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        llm = LLM("test-org/tiny-GGUF:Q8_0", tokenizer=tok, **KW)
        assert greedy_texts(llm) == want
        assert hub.fetched() == ["tiny-Q8_0.gguf"]
        with pytest.raises(FileNotFoundError, match="no quantization 'Q5_K'; it holds: tiny-Q4_0.gguf, tiny-Q8_0.gguf"):
            LLM("test-org/tiny-GGUF:Q5_K", tokenizer=tok, **KW)

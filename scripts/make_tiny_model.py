"""Write a small random Llama-family model in Hugging Face format, for demos and tests:

    python scripts/make_tiny_model.py models/tiny-llama [--arch llama|qwen2|mistral] [--seed 0]

The maker is the package services/models/tiny (also `python -m services.models.tiny`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.models.tiny.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

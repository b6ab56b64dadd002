"""Session fixtures: a real nats-server, tiny Hugging Face models, SmolLM2-135M-Instruct (a
real trained model), an OTLP receiver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.nats_server import NatsServer
from tests.system import OtlpReceiver, make_model, smollm2_dirs


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    server = NatsServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Differently shaped: q/k/v biases, tied embeddings, 3 layers, 6 heads."""
    return make_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", arch="qwen2")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"float32": dir, "bfloat16": dir} of SmolLM2-135M-Instruct in Hugging Face format."""
    return smollm2_dirs(tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="session")
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()

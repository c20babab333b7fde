"""Suite-wide test setup: offline Hub, offline wandb, and tiny pipelines built once per session.

The environment variables are set at import time, before any test module imports
huggingface_hub (which reads HF_HUB_OFFLINE once, at import): an online attempt would otherwise
wait ~45 s for a network that the test machines do not have.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def stepdistill_cache(tmp_path_factory) -> Path:
    """``$STEPDISTILL_CACHE`` for the session: a fresh temporary folder unless the caller set one.

    ``tiny:<family>`` pipelines are built there on first use (about a second each); subprocesses
    started by tests inherit the variable and reuse them. Export STEPDISTILL_CACHE yourself to keep
    the tiny pipelines between runs.
    """
    preset = os.environ.get("STEPDISTILL_CACHE")
    if preset:
        yield Path(preset)
        return
    path = tmp_path_factory.mktemp("stepdistill_cache")
    os.environ["STEPDISTILL_CACHE"] = str(path)
    yield path
    os.environ.pop("STEPDISTILL_CACHE", None)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(stepdistill_cache) -> Callable[[str], Path]:
    """``tiny_pipeline_dir(family)`` -> the folder of the tiny random pipeline of ``family``.

    Built once per session (the same folder ``tiny:<family>`` resolves to). Shared by all tests:
    treat it as read-only and copy it (``shutil.copytree``) before modifying anything in it.
    """
    from stepdistill.models.loading import resolve_pretrained

    def get(family: str) -> Path:
        return Path(resolve_pretrained(f"tiny:{family}"))

    return get

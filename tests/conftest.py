"""Shared fixtures. Tests always run the offline profile: no model hub, no dataset hub."""
import os

os.environ.setdefault("MINIPEFT_PROFILE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bert():
    """The course's offline 'bert' (pretrained MiniLM) and its tokenizer; copy before changing
    it."""
    from minipeft import course
    return course.load_model("bert", profile="offline")


@pytest.fixture(scope="session")
def sentiment():
    from minipeft.course.data import make_sentiment
    return make_sentiment()

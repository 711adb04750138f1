"""Bad configuration, fuzzed (Hypothesis): every bad value of a model or data argument ends `sagsae fit` with one
line that names the argument, before any language model loads, and never with a traceback. Values are given as
`--name=value`: argparse takes a separate `-5e-324` for an option of its own."""

from __future__ import annotations

import math
import string
from pathlib import Path
from unittest import mock

import pytest
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagsae.__main__ import main
from tests.test_cli import REPO

FUZZ = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
DTYPES = {"auto", "float32", "bfloat16", "float16"}


def fit_error(arguments: list[str], root: Path) -> str:
    """The message `sagsae fit` exits with; fails the test if a language model starts loading."""
    def no_model(*args, **kwargs):
        raise AssertionError("the language model was loaded before the bad argument was reported")

    with mock.patch.object(transformers.AutoModelForCausalLM, "from_pretrained", no_model), \
            pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "default.yaml"), "--trainer.default_root_dir", str(root),
              "--trainer.max_steps", "1", *arguments])
    message = exit_info.value.code
    assert isinstance(message, str) and "\n" not in message, message
    assert message.startswith("sagsae fit: ") and message.endswith("(--debug shows the traceback)"), message
    assert "Traceback" not in message
    return message


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@FUZZ
@given(width=st.integers(max_value=0))
def test_width_not_positive(width, root):
    assert f"width must be a positive integer, got {width}" in fit_error([f"--model.sae.init_args.width={width}"], root)


@FUZZ
@given(coefficient=st.one_of(st.floats(max_value=-1e-12, allow_infinity=False), st.just(math.nan)))
def test_sparsity_coefficient_negative_or_nan(coefficient, root):
    assert "model.sparsity_coefficient" in fit_error([f"--model.sparsity_coefficient={coefficient!r}"], root)


@FUZZ
@given(quantile=st.floats(allow_nan=False, allow_infinity=False).filter(lambda q: not 0 < q < 1))
def test_threshold_quantile_outside_zero_one(quantile, root):
    message = fit_error([f"--model.sae.init_args.theta_init_quantile={quantile!r}"], root)
    assert "theta_init_quantile must lie in (0, 1)" in message


@FUZZ
@given(batch_size=st.integers(max_value=0))
def test_batch_size_not_positive(batch_size, root):
    assert f"data.batch_size must be positive, got {batch_size}" in fit_error(
        [f"--data.init_args.batch_size={batch_size}"], root)


@FUZZ
@given(dtype=st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=12).filter(lambda s: s not in DTYPES))
def test_unknown_lm_dtype(dtype, root):
    assert f"Unknown lm_dtype {dtype!r}; choose one of auto, float32" in fit_error(["--data.init_args.lm_dtype", dtype], root)


@FUZZ
@given(path=st.from_regex(r"\A(datamodules|sagsae|nosuch)\.[A-Z][a-z]{2,10}DataModule\Z"))
def test_wrong_datamodule_class_path(path, root):
    assert 'Parser key "data"' in fit_error(["--data", path], root)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(context_length=st.integers(min_value=2049, max_value=10**7))
def test_context_longer_than_the_model(context_length, tiny_llama, root):
    """The tiny Llama has 2,048 positions: its config says so before any weight loads."""
    message = fit_error(["--data.init_args.model", str(tiny_llama), "--data.init_args.layer", "1",
                         "--data.init_args.context_length", str(context_length)], root)
    assert f"data.context_length {context_length} exceeds the 2048 positions" in message

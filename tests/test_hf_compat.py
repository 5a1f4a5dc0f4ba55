"""Current transformers without deprecation noise. The KV cache goes in under the name the
installed decoders take (`cache` in 5.2x, `past_key_values` before), and `--quiet` keeps library
warnings off the terminal."""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import warnings

import torch

from attanchor_export.load.hf_compat import cache_kwargs


def _deprecated(fn):  # what transformers' deprecate_kwarg does to a forward: a functools.wraps wrapper
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class _NewDecoder(torch.nn.Module):
    @_deprecated
    def forward(self, inputs_embeds=None, cache=None, use_cache=None):
        return cache


class _OldDecoder(torch.nn.Module):
    def forward(self, inputs_embeds=None, past_key_values=None, use_cache=None):
        return past_key_values


def test_cache_argument_follows_the_forward_signature():
    marker = object()
    assert cache_kwargs(_NewDecoder(), marker) == {"cache": marker}
    assert cache_kwargs(_OldDecoder(), marker) == {"past_key_values": marker}
    assert _OldDecoder()(**cache_kwargs(_OldDecoder(), marker)) is marker


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_export_path_never_uses_the_deprecated_cache_name(checkpoint, tmp_path):
    """Export + validation, the eager decoder wrapper that tracing runs and the greedy reference: no
    warning (warnings module or transformers' logger) about past_key_values."""
    from attanchor_export.exporter import ExportOptions, export_artifact
    from attanchor_export.load.checkpoint import load_checkpoint
    from attanchor_export.source_model import decoder_module, greedy_generate
    from attanchor_export.trace.decoder import example_inputs

    hf_logger = logging.getLogger("transformers")
    handler = _Records()
    hf_logger.addHandler(handler)
    once = getattr(logging.Logger, "warning_once", None)  # transformers' once-per-process cache: reset it
    if once is not None and hasattr(once, "cache_clear"):
        once.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = export_artifact(str(checkpoint("clip-llama")), ExportOptions(output=tmp_path / "art"))
            loaded = load_checkpoint(str(checkpoint("clip-llama")))
            decoder = decoder_module(loaded)
            with torch.no_grad():
                embeds, mask, positions, past = example_inputs(loaded.dims)
                decoder(embeds, mask, positions, past)
            tokens = greedy_generate(loaded, embeds, mask[:, -embeds.shape[1]:], positions - 3, 3)
    finally:
        hf_logger.removeHandler(handler)
    assert result.passed and tokens.shape == (2, 3)
    mentions = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    mentions += [m for m in handler.messages if "past_key_values" in m]
    assert not mentions, mentions[:3]


def test_library_quiet_drops_warnings_and_transformers_logs():
    from transformers.utils import logging as hf_logging

    from attanchor_export.cli import library_quiet

    logger, handler = hf_logging.get_logger("transformers.models.llama"), _Records()
    logging.getLogger("transformers").addHandler(handler)
    level = hf_logging.get_verbosity()
    try:
        for quiet in (False, True):  # the unquiet round proves both channels really are recorded
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with library_quiet(quiet):
                    warnings.warn("`x` is deprecated", FutureWarning, stacklevel=1)
                    logger.warning("a transformers warning")
            assert (len(caught), len(handler.messages)) == ((0, 0) if quiet else (1, 1))
            handler.messages.clear()
            assert hf_logging.get_verbosity() == level  # restored on the way out
    finally:
        logging.getLogger("transformers").removeHandler(handler)


def test_quiet_export_prints_nothing(checkpoint, tmp_path):
    """The real CLI in a fresh process (so transformers' log handler writes to the real stderr), with every
    warning forced on: --quiet must still print nothing at all."""
    env = {k: v for k, v in os.environ.items() if k != "ATTANCHOR_DEBUG"}
    env["PYTHONWARNINGS"] = "always"
    proc = subprocess.run(
        [sys.executable, "-m", "attanchor_export.cli", str(checkpoint("clip-llama")), "-o", str(tmp_path / "art"),
         "--quiet"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""
    assert proc.stdout == ""
    assert (tmp_path / "art" / "manifest.json").is_file()

"""attanchor-export: MODEL -> artifact folder, and the verbs that work on one (run, check, build, bench).

    attanchor-export MODEL [-o DIR] [--trt] [--dtype fp32|fp16] [--quant none|int8|int4] ...
    attanchor-export run DIR --image IMG --prompt TEXT
    attanchor-export check DIR | build DIR | bench DIR | lint DIR | demo
    attanchor-export serve DIR [--ray --replicas N]

Every user-facing failure ends as one `error: ...` line and a non-zero exit code; torch and
transformers are imported only by the verbs that need them, so `run` works on a Jetson without them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import click
from attanchor_runtime.errors import UserError

from attanchor_export import options as opts
from attanchor_export.trt.plan import EMPTY_PAST_MODES, BuildOptions

EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 2, 130, 143
VERIFY_CHOICES = ("none", "size", "sha256")
VERIFY_HELP = ("Check the artifact's files against the manifest first: none, size (cheap: catches truncated or "
               "missing files) or sha256 (reads every byte: also catches same-size damage).")


class Terminated(BaseException):
    """SIGTERM (`kill`, `timeout`, a service manager), raised in the main thread as Ctrl-C raises
    KeyboardInterrupt, so the same cleanup runs (staging folders removed) before exit code 143."""


class Reporter:
    """Progress for long steps on stderr (rich), silence with --quiet, one JSON document with --json."""

    def __init__(self, quiet: bool = False, as_json: bool = False):
        from rich.console import Console

        self.quiet, self.as_json = quiet, as_json
        # The stream as it is now: a step may hide the libraries' own output (sys.stderr) meanwhile.
        self.console = Console(file=sys.stderr, highlight=False)
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str):
        start = time.perf_counter()
        if self.quiet or self.as_json:
            yield
        else:
            with self.console.status(f"{name}..."):
                yield
        elapsed = time.perf_counter() - start
        self.timings[name] = round(elapsed, 3)
        if not (self.quiet or self.as_json):
            self.console.print(f"[green]✓[/green] {name} [dim]{elapsed:.1f}s[/dim]")

    def info(self, message: str) -> None:
        if not (self.quiet or self.as_json):
            self.console.print(message)

    def emit_json(self, data: dict) -> None:
        click.echo(json.dumps(data, indent=2, default=str))


@contextmanager
def library_quiet(enabled: bool):
    """--quiet is quiet: the libraries' own warnings (deprecations and the like, through the warnings
    module or transformers' logger) stay off the terminal; errors still raise. Scoped, so an in-process
    caller (tests, the demo) gets its warning filters and transformers verbosity back."""
    if not enabled:
        yield
        return
    import warnings

    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # verbs that run without transformers
        hf_logging = None
    level = hf_logging.get_verbosity() if hf_logging else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hf_logging:
            hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            if hf_logging:
                hf_logging.set_verbosity(level)


def _quiet_option(ctx, param, value):
    """--quiet's callback: library warnings stay silenced until the command (imports included) ends."""
    if value:
        ctx.with_resource(library_quiet(True))
    return value


def _fail(message: str, code: int = EXIT_FAILED):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@contextmanager
def _sigterm_raises():
    """SIGTERM raises Terminated for the duration (main thread only; the previous handler comes back)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def handle_errors(fn):
    """Turn known errors into one line; unknown ones into one line plus a hint to see the traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with _sigterm_raises():
                return fn(*args, **kwargs)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written under the output name", EXIT_INTERRUPTED)
        except Terminated:
            _fail("terminated (SIGTERM); nothing was written under the output name", EXIT_TERMINATED)
        except click.exceptions.Exit:
            raise
        except SystemExit:
            raise
        except click.ClickException:
            raise
        except Exception as e:  # noqa: BLE001 - the single place where errors become one line
            if getattr(e, "exit_code", None) == EXIT_UNAVAILABLE:
                _fail(str(e), EXIT_UNAVAILABLE)
            if isinstance(e, UserError):
                checks = getattr(e, "checks", None)
                if checks:
                    from attanchor_export.checks.tables import print_checks

                    print_checks(checks, only_failed=True)
                _fail(str(e))
            if os.environ.get("ATTANCHOR_DEBUG"):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _fail(f"internal error: {type(e).__name__}: {first} (set ATTANCHOR_DEBUG=1 for the traceback)")

    return wrapper


class ModelOrVerb(click.Group):
    """`attanchor-export MODEL ...` means `attanchor-export export MODEL ...`."""

    def parse_args(self, ctx, args):
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            _refuse_mistyped_verb(args[0], list(self.commands))
            args = ["export", *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx, formatter):
        formatter.write_usage(ctx.command_path, "MODEL [OPTIONS] | COMMAND [ARGS]...")


@click.group(cls=ModelOrVerb, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="attanchor-export")
def main():
    """Export AttAnchor vision-language models to ONNX and TensorRT, and run them.

    MODEL is an alias (tinyllava-1b, llava-1.5-7b, qwen2.5-vl-3b; the trained tiny models tiny-vqa,
    tiny-vqa-qwen, tiny-scenes, tiny-scenes-noanchor), a Hub id (downloaded unless --offline), or a folder.
    """


def _refuse_mistyped_verb(word: str, verbs: list[str]) -> None:
    """`chek DIR` is a typo, not a model to export: say which verb was meant (a folder, a Hub id or an
    alias of that name is still exported)."""
    import difflib

    if Path(word).expanduser().exists() or "/" in word or "\\" in word:
        return
    close = difflib.get_close_matches(word, [v for v in verbs if v != "export"], n=1, cutoff=0.6)
    if not close:
        return
    from attanchor_export.load.checkpoint import ALIASES, TINY_VQA

    if word not in (*ALIASES, TINY_VQA):
        _fail(f"no command {word!r} (did you mean {close[0]!r}?) and no model folder of that name", EXIT_USAGE)


def _default_output(model: str) -> Path:
    name = Path(model).name if Path(model).exists() else model.replace("/", "--")
    return Path("out") / f"{name}-onnx"


@main.command("export")
@click.argument("model")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Artifact folder [out/<model>-onnx].")
@click.option("--trt", is_flag=True, help="Also build TensorRT engines (needs a GPU and tensorrt).")
@click.option("--dtype", type=click.Choice(opts.DTYPES), default=opts.default(opts.ExportOptions, "dtype"),
              show_default=True, help="Float type of the graphs' weights (fp16 is gated against fp32).")
@click.option("--quant", type=click.Choice(opts.QUANTS), default=opts.default(opts.ExportOptions, "quant"),
              show_default=True, help="Weight-only quantization of the decoder, gated on accuracy.")
@click.option("--block-size", type=click.Choice([str(b) for b in opts.BLOCK_SIZES]),
              default=str(opts.default(opts.ExportOptions, "block_size")), show_default=True,
              help="int4 block size of the onnxruntime form (TensorRT's takes 64/128 and falls back). 256 decodes "
                   "faster on CPU and answers less accurately than 128 (docs/QUANTIZATION.md).")
@click.option("--calib", help="Calibration images: a folder or JSONL of {image, prompt} (int8 TensorRT).")
@click.option("--quantize-lm-head/--keep-lm-head", default=None,
              help="Quantize the lm_head too, or keep it fp32. [int4: quantized; int8: kept]")
@click.option("--quantize-vision", is_flag=True,
              help="Also quantize the vision tower, at --quant's weight-only format (--vision-quant: its own).")
@click.option("--vision-quant", metavar="|".join(opts.VISION_QUANTS), default=opts.default(opts.ExportOptions, "vision_quant"),
              callback=lambda ctx, param, value: _vision_quant(value),
              help="The vision tower's own precision, whatever --quant is: int8 = int8 weights and activations "
                   "(dynamic for onnxruntime, calibrated QDQ for TensorRT), gated like the decoder. [none]")
@click.option("--prefill-int8", is_flag=True,
              help="int4/int8: also write decoder.prefill.onnx, which onnxruntime runs prompts through: int8 "
                   "weights and per-token int8 activations on the CPU's 8-bit matrix units (a prompt in about "
                   "0.25x the int4 graph's time at 1B dims with AMX, 0.6x without; +1 byte per decoder "
                   "parameter on disk and in memory). Gated with the decoder.")
@click.option("--int4-8bit", callback=lambda ctx, param, value: _name_list(value), metavar="NAMES|none",
              help="int4: decoder linears to keep at 8 bits, comma-separated weight-name parts (e.g. "
                   "q_proj,k_proj,v_proj,down_proj): 8-bit MatMulNBits for onnxruntime, unquantized in the "
                   "TensorRT form. [the checkpoint's declared default, else none]")
@click.option("--smooth-alpha", callback=lambda ctx, param, value: _smooth_alpha(value), metavar="ALPHA|off",
              help="int8 TensorRT form: SmoothQuant's migration strength, 0 < ALPHA <= 1 (higher moves more of "
                   f"the activation outliers into the weights), or off. [{opts.default(opts.ExportOptions, 'smooth_alpha')}]")
@click.option("--ort-fusions/--no-ort-fusions", default=opts.default(opts.ExportOptions, "ort_fusions"),
              show_default=True,
              help="int4/int8: fuse RMSNorm, residual Add and rotary, and read the KV cache in place (no "
                   "whole-cache copy per step), in the onnxruntime-only decoder form (the TensorRT form stays "
                   "standard ops).")
@click.option("--gate-floor", multiple=True, metavar="METRIC=VALUE",
              help="Tighten or relax the accuracy gate, e.g. cos_mean=0.99 (see docs/QUANTIZATION.md).")
@click.option("--threshold", callback=lambda ctx, param, value: _threshold_value(value),
              help='Default anchor threshold: a number, or "auto" (the value at which ~10% of question tokens '
                   f"become anchors over the calibration set). [the checkpoint's declared default, else {opts.DEFAULT_THRESHOLD}]")
@click.option("--task", metavar="easy-vqa|FILE.jsonl",
              help="Questions with answers: quantized formats are also gated on task accuracy vs fp32.")
@click.option("--mode", type=click.Choice(opts.MODES), default=opts.default(opts.ExportOptions, "mode"),
              show_default=True, help="t2i: question words are copied next to image patches; i2t: the reverse.")
@click.option("--max-anchors", type=click.IntRange(min=1), help="Anchor budget K: static graph shapes.")
@click.option("--image-size", metavar="HxW",
              help="Qwen2.5-VL: the fixed image grid of the graphs, multiples of 28 (every image is resized to "
                   "it). [the largest square <= 448 within the processor's max_pixels]")
@click.option("--opset", type=click.IntRange(*opts.OPSETS), default=opts.DEFAULT_OPSET, show_default=True,
              help="ONNX opset of the graphs (TensorRT 10.3 parses up to 20).")
@click.option("--last-logits-only/--all-logits", default=opts.default(opts.ExportOptions, "last_logits_only"),
              show_default=True,
              help="Prefill returns only the last position's logits (all the runtime reads) or every position's.")
@click.option("--optimize/--no-optimize", default=opts.default(opts.ExportOptions, "optimize"), show_default=True,
              help="Rewrite the decoder's attention to grouped form (standard ops; validated like every graph).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--no-validate", is_flag=True, help="Skip the parity check against PyTorch (not recommended).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the checkpoint's own Python code.")
@click.option("--adapter", metavar="DIR_OR_HUB_ID", help="peft LoRA adapter to merge before export.")
@click.option("--revision", help="Hub revision to download or use: branch, tag or commit.")
@click.option("--offline", is_flag=True, help="Use the local Hugging Face cache only (as HF_HUB_OFFLINE=1).")
@click.option("--allow-pickle", is_flag=True, help="Download pickled weights (*.bin) when a repo has no safetensors.")
@click.option("--memory-budget", type=click.FloatRange(min=0.5), metavar="GIB",
              help="Memory the export may use; over it, PyTorch (layer-streamed) stands in for the fp32 decoder "
                   "graph in validation and the gate. [the memory available at start]")
@click.option("--quiet", is_flag=True, callback=_quiet_option, help="No progress, no library warnings.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document with the result.")
@handle_errors
def export_cmd(model, output, trt, dtype, quant, block_size, calib, quantize_lm_head, quantize_vision, vision_quant,
               prefill_int8,
               int4_8bit,
               smooth_alpha,
               ort_fusions,
               gate_floor,
               threshold, task, mode, max_anchors, image_size, opset, last_logits_only, optimize, force, no_validate, adapter,
               trust_remote_code, revision, offline, allow_pickle, memory_budget, quiet, as_json):
    """Export MODEL to ONNX graphs (vision, embedding with AnchorInsert, decoder) in a checked folder."""
    from attanchor_export.exporter import ExportOptions, export_artifact

    report = Reporter(quiet, as_json)
    if quiet or as_json:  # a download's progress bars are huggingface_hub's own
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    problem = opts.vision_quant_problem(dtype, vision_quant, quantize_vision) or \
        opts.prefill_int8_problem(dtype, quant, prefill_int8)
    if problem:  # a usage error, before any work
        raise click.UsageError(problem)
    output = output or _default_output(model)
    options = ExportOptions(
        output=output, mode=mode, threshold=threshold, task=task, max_anchors=max_anchors, image_size=image_size, opset=opset,
        last_logits_only=last_logits_only, optimize=optimize, force=force, validate=not no_validate,
        trust_remote_code=trust_remote_code, revision=revision, offline=offline, allow_pickle=allow_pickle,
        dtype=dtype, quant=quant,
        block_size=int(block_size), calib=calib, quantize_lm_head=quantize_lm_head,
        quantize_vision=quantize_vision, vision_quant=vision_quant, ort_fusions=ort_fusions, gate_floors=_parse_floors(gate_floor), adapter=adapter,
        memory_budget=memory_budget, smooth_alpha=smooth_alpha, int4_8bit=int4_8bit, prefill_int8=prefill_int8,
    )
    result = export_artifact(model, options, report.step)
    engines = None
    if trt:
        engines = str(_build_engines(output, report))
    manifest = result.manifest
    if as_json:
        report.emit_json({"folder": str(output), "passed": result.passed, "timings": report.timings,
                          "precision": manifest.precision.to_json(),
                          "export": manifest.export.to_json() if manifest.export else None,
                          "checks": [c.to_json() for c in result.checks], "engines": engines})
    else:
        if result.checks and not quiet:
            from attanchor_export.checks.tables import print_checks

            print_checks(result.checks, summary=True)
        gate = manifest.precision.gate
        if gate and gate.results:
            from attanchor_export.check import gate_summary

            report.info(f"accuracy gate ({gate.format}, floors {dict(gate.floors)}): {gate_summary(gate)}")
        elif gate and isinstance(gate.skipped, str):
            report.info(f"[yellow]accuracy gate ({gate.format}) not run: {gate.skipped}[/yellow]")
        report.info(f"[bold]wrote {output}[/bold] ({len(result.checks)} parity checks passed)")
        if manifest.export:
            from attanchor_export.export_cost import describe

            report.info(f"export cost: {describe(manifest.export)}")


def _name_list(value):
    """--int4-8bit: None when not given (the checkpoint's default), () for "none", else the names."""
    if value is None:
        return None
    if value.strip().lower() == "none":
        return ()
    names = tuple(n.strip() for n in value.split(","))
    if not all(names):
        raise click.BadParameter(f"{value!r}: give comma-separated linear names (e.g. q_proj,down_proj) or none")
    return names


def _vision_quant(value):
    problem = opts.vision_quant_problem("fp32", value, False)
    if problem:
        raise click.UsageError(problem)
    return value


def _smooth_alpha(value):
    if value is None:
        return opts.default(opts.ExportOptions, "smooth_alpha")
    if value == "off":
        return None
    try:
        alpha = float(value)
    except ValueError:
        alpha = -1.0
    if not 0 < alpha <= 1:
        raise click.BadParameter(f'{value!r}: expected a number in (0, 1] or "off"', param_hint="--smooth-alpha")
    return alpha


def _threshold_value(value):
    if value is None or value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        raise click.BadParameter(f'{value!r}: expected a number or "auto"', param_hint="--threshold") from None
    if not math.isfinite(number):  # stored as every later run's default, it would break them all
        raise click.BadParameter(f"{value!r}: expected a finite number", param_hint="--threshold")
    return number


def _parse_floors(items) -> dict | None:
    floors = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            floors[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: expected METRIC=NUMBER, e.g. cos_mean=0.99", param_hint="--gate-floor")
    return floors or None


def _fraction_option(ctx, param, value):
    """A gate's fraction, checked while parsing: anything but a number in [0, 1] is one error line."""
    if value is None:
        return None
    from attanchor_export.checks.regression import fraction
    from attanchor_export.errors import ExportError

    try:
        return fraction(param.opts[0], value)
    except ExportError as e:
        _fail(str(e), EXIT_USAGE)


@contextmanager
def _junit_on_error(junit: Path | None, verb: str):
    """A verb that stops with an error still leaves a JUnit file saying so, for the CI step that uploads it."""
    try:
        yield
    except Exception as e:
        if junit:
            from attanchor_export.checks.junit import error_case, write_junit

            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            write_junit(junit, f"attanchor-export {verb}", [error_case(verb, message)])
        raise


def _build_engines(folder: Path, report: Reporter, **options):
    from attanchor_export.trt.build import build_engines

    with report.step("build TensorRT engines"):
        return build_engines(folder, **options)


@main.command("check")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--model", help="Source checkpoint, if not where the manifest says.")
@click.option("--no-e2e", is_flag=True, help="Graph parity only, skip end-to-end generation.")
@click.option("--adapter", help="The LoRA adapter, if not where the manifest says (same files, by sha256).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document with every check on stdout.")
@click.option("--quiet", is_flag=True, callback=_quiet_option, help="No progress, no library warnings.")
@click.option("-v", "--verbose", is_flag=True, help="One row per case instead of the worst per metric.")
@click.option("--junit", type=click.Path(path_type=Path), metavar="FILE",
              help="Also write JUnit XML for CI (one test case per check; an error case if the check cannot run).")
@handle_errors
def check_cmd(folder, model, no_e2e, adapter, as_json, quiet, verbose, junit):
    """Re-run parity of an artifact against its PyTorch source and print a report."""
    from attanchor_export.check import check_artifact
    from attanchor_export.checks.junit import check_cases, write_junit
    from attanchor_export.checks.tables import print_checks

    if junit:
        _check_writable_file(junit, "--junit")  # before minutes of checking, not after
    report = Reporter(quiet, as_json)
    start = time.perf_counter()
    with _junit_on_error(junit, "check"):
        result = check_artifact(folder, model=model, end_to_end=not no_e2e, steps=report.step, adapter=adapter)
    if junit:
        write_junit(junit, "attanchor-export check", check_cases(result["checks"]), {"folder": folder},
                    time.perf_counter() - start)
    if as_json:
        report.emit_json(result)
    elif not quiet:
        print_checks(result["checks"], summary=not verbose)
        for name, value in result.get("sections", {}).items():
            report.info(f"[bold]{name}[/bold]: {value}")
    if not result["passed"]:
        _fail(f"{sum(not c['passed'] for c in result['checks'])} check(s) failed for {folder}")
    report.info(f"[bold green]all {len(result['checks'])} checks passed[/bold green]")


@main.command("run")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--image", required=True, help="Image file.")
@click.option("--prompt", required=True, help="Question about the image.")
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True,
              help="onnxruntime, or the TensorRT engines built with `build`.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="onnxruntime's device (cuda needs onnxruntime-gpu).")
@click.option("--threshold", type=float, help="Anchor threshold [the artifact's default].")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Stop after this many generated tokens.")
@click.option("--stream", is_flag=True, help="Print tokens as they are generated.")
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="With --sample: divide the logits by this (lower = closer to greedy).")
@click.option("--top-k", type=int, default=0, show_default=True,
              help="With --sample: keep only the K most likely tokens (0 = all).")
@click.option("--top-p", type=float, default=1.0, show_default=True,
              help="With --sample: keep the smallest set of tokens whose probabilities sum to P (1 = all).")
@click.option("--seed", type=int, help="With --sample: random seed, for repeatable answers.")
@click.option("--show-anchors", type=click.Path(path_type=Path), help="Write a PNG with the anchored patches.")
@click.option("--verify", type=click.Choice(VERIFY_CHOICES), default="size", show_default=True, help=VERIFY_HELP)
@click.option("--memory-budget", type=click.FloatRange(min=0.01), metavar="GIB",
              help="Refuse a prompt whose estimated memory (KV cache, attention, logits) is over this. "
                   "[the memory available]")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: the answer, its anchors (text index, image patch) and token ids.")
@handle_errors
def run_cmd(folder, image, prompt, backend, device, threshold, max_new_tokens, stream, sample, temperature,
            top_k, top_p, seed, show_anchors, verify, memory_budget, as_json):
    """Answer PROMPT about IMAGE with an exported artifact (no torch needed)."""
    from attanchor_runtime import Pipeline

    if show_anchors:
        _check_writable_file(show_anchors, "--show-anchors")  # before the answer, not after it
    pipe = Pipeline.load(folder, backend=backend, device=device, verify=verify, memory_budget=memory_budget)
    kwargs = dict(max_new_tokens=max_new_tokens, threshold=threshold, do_sample=sample, temperature=temperature,
                  top_k=top_k, top_p=top_p, seed=seed)
    pieces = []
    answer_stream = pipe.stream(prompt, image, **kwargs)
    for piece in answer_stream:
        pieces.append(piece)
        if stream and not as_json:
            click.echo(piece, nl=False)
    answer = "".join(pieces)
    out = answer_stream.output
    if as_json:
        click.echo(json.dumps({"answer": answer, "anchors": out.anchors[0], "tokens": out.tokens[0].tolist()}))
    else:
        click.echo("" if stream else answer)
    if show_anchors:
        from attanchor_runtime.visualize import draw_anchors

        draw_anchors(pipe, image, prompt, out.anchors[0], show_anchors)
        click.echo(f"anchors drawn to {show_anchors}", err=True)


@main.command("build")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--max-batch", type=click.IntRange(min=1), default=opts.default(BuildOptions, "max_batch"),
              show_default=True, help="Largest batch the engines accept.")
@click.option("--max-input-len", type=click.IntRange(min=1),
              help="Prefill positions incl. image tokens and anchors [image tokens + 512].")
@click.option("--max-seq-len", type=click.IntRange(min=2), help="Prompt + generated positions [min(model, 2048)].")
@click.option("--workspace", type=click.IntRange(min=64), default=opts.default(BuildOptions, "workspace_mib"),
              show_default=True, help="MiB.")
@click.option("--timing-cache", type=click.Path(path_type=Path), help="Reuse across builds [engine dir].")
@click.option("--empty-past", type=click.Choice(EMPTY_PAST_MODES), default=opts.default(BuildOptions, "empty_past"),
              show_default=True,
              help="How prefill passes an empty KV cache: zero-length, or one masked slot.")
@click.option("--no-gate", is_flag=True, help="Skip the engine-vs-onnxruntime check (not recommended).")
@click.option("--plan-only", is_flag=True, help="Print the build plan (profiles, flags) and stop; no GPU needed.")
@handle_errors
def build_cmd(folder, max_batch, max_input_len, max_seq_len, workspace, timing_cache, empty_past, no_gate,
              plan_only):
    """Build TensorRT engines for this GPU from an artifact's ONNX graphs (run it on the Jetson)."""
    from attanchor_export.trt.plan import BuildOptions, make_plan

    options = BuildOptions(max_batch=max_batch, max_input_len=max_input_len, max_seq_len=max_seq_len,
                           workspace_mib=workspace, timing_cache=str(timing_cache) if timing_cache else None,
                           empty_past=empty_past)
    if plan_only:
        click.echo(make_plan(folder, options).format_table())
        return
    report = Reporter()
    engines = _build_engines(folder, report, options=options, gate=not no_gate)
    report.info(f"engines written to {engines}")


@main.command("lint")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--target", default="10.3", show_default=True,
              help="TensorRT version to lint against: 10.3 (JetPack 6), 10.15, 11.4, 11.5, or latest.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (graph -> findings) on stdout.")
@handle_errors
def lint_cmd(folder, target, as_json):
    """Check every graph against TensorRT's ONNX operator support (no GPU needed)."""
    from attanchor_export.trt.lint import lint_artifact

    reports = lint_artifact(folder, target=target)
    if as_json:
        click.echo(json.dumps({name: r.to_json() for name, r in reports.items()}, indent=2))
    else:
        for name, r in reports.items():
            click.echo(f"== {name} ==\n{r.format_table()}")
    if not all(r.ok for r in reports.values()):
        _fail(f"graphs in {folder} use what TensorRT {target} cannot parse (see above)")


@main.command("bench")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--compare-torch", is_flag=True, help="Also time transformers eager on the same prompts.")
@click.option("--torch-dtype", type=click.Choice(list(opts.TORCH_DTYPES)), default="fp32", show_default=True,
              help="What transformers eager runs in with --compare-torch: bf16 holds half of fp32's memory "
                   "beside the runtime (an fp32 Qwen2.5-VL-3B is 15 GB).")
@click.option("--max-new-tokens", type=click.IntRange(min=2), default=32, show_default=True,
              help="Tokens generated per measured run.")
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime (and torch) intra-op threads.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Measured runs per prompt (after one warm-up).")
@click.option("--prompt", "prompts", multiple=True, help="Question(s) to time (default: two VQA questions).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="Image file (default: synthetic).")
@click.option("--threshold", default=None,
              help='Anchor threshold: a number, or "auto" (~10% of text tokens become anchors). '
                   "Default: the manifest's.")
@click.option("--quiet-wait", type=float, default=0.0, show_default=True,
              help="Seconds to wait for an idle CPU before each measured run (shared machines).")
@click.option("--verify", type=click.Choice(VERIFY_CHOICES), default="size", show_default=True, help=VERIFY_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object on stdout (no table).")
@click.option("--json-out", type=click.Path(path_type=Path), metavar="PATH",
              help="Also write the figures as JSON to PATH.")
@click.option("--chart", type=click.Path(path_type=Path), help="Write a PNG chart.")
@handle_errors
def bench_cmd(folder, compare_torch, torch_dtype, max_new_tokens, threads, repeats, prompts, image, threshold,
              quiet_wait, verify, as_json, json_out, chart):
    """Time to first token (vision / anchors / prefill), decode tokens/s, anchor overhead, memory."""
    from attanchor_export.bench import format_report, run_bench, write_chart

    if threshold not in (None, "auto"):
        try:
            threshold = float(threshold)
        except ValueError:
            _fail(f'--threshold must be a number or "auto", got {threshold!r}')
    for path, option in ((json_out, "--json-out"), (chart, "--chart")):
        if path:
            _check_writable_file(path, option)  # before minutes of timing, not after
    result = run_bench(folder, prompts=list(prompts) or None, image=image, max_new_tokens=max_new_tokens,
                       threads=threads, compare_torch=compare_torch, torch_dtype=torch_dtype, repeats=repeats,
                       threshold=threshold,
                       quiet_wait=quiet_wait, verify=verify)
    document = json.dumps(result, indent=2, default=float) + "\n"
    if as_json:
        click.echo(document, nl=False)
    else:
        click.echo(format_report(result))
    if json_out:
        Path(json_out).write_text(document)
    if chart:
        write_chart(result, chart)


@main.command("eval")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--data", required=True, metavar="easy-vqa|tiny-scenes|FILE.jsonl",
              help='"easy-vqa" (the PyPI data set), "tiny-scenes" (generated scenes of 2-4 shapes) or JSONL rows '
                   '{"image", "question", "answer"}.')
@click.option("--split", type=click.Choice(["train", "validation", "test"]), default="test", show_default=True,
              help="Split of easy-vqa or tiny-scenes (validation: what the quantization gate grades; easy-vqa's "
                   "is held-out train images).")
@click.option("--limit", type=click.IntRange(min=1), help="At most N questions (a fixed random subset for easy-vqa and tiny-scenes).")
@click.option("--threshold", type=float, help="Anchor threshold [the artifact's default].")
@click.option("--thresholds", help="Several thresholds, comma-separated, e.g. 0.3,0.5,2 (2 = no anchors).")
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True,
              help="onnxruntime, or the TensorRT engines built with `build`.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="onnxruntime's device (cuda needs onnxruntime-gpu).")
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Questions answered together (left-padded).")
@click.option("--compare-torch", is_flag=True,
              help="Also answer with the source PyTorch model: its accuracy and the share of identical answers.")
@click.option("--compare", type=click.Path(path_type=Path), metavar="DIR",
              help="Also answer with another artifact (another precision, or exported with --no-ort-fusions): "
                   "its accuracy and the share of identical answers.")
@click.option("--verify", type=click.Choice(VERIFY_CHOICES), default="size", show_default=True, help=VERIFY_HELP)
@click.option("--json", "as_json", is_flag=True,
              help="Print exactly one JSON object on stdout: the report, with every answer (a --baseline for later runs).")
@click.option("--baseline", type=click.Path(path_type=Path), metavar="REPORT.json",
              help="A committed report of `eval --json` on the same questions: compare answer by answer (the "
                   "baseline of --max-drop and --min-agreement).")
@click.option("--min-accuracy", callback=_fraction_option, metavar="FRACTION",
              help="Fail (exit 1, one line) when accuracy is below this, e.g. 0.90.")
@click.option("--max-drop", callback=_fraction_option, metavar="FRACTION",
              help="Fail when accuracy is more than this below the baseline's (--baseline or --compare), e.g. 0.01.")
@click.option("--min-agreement", callback=_fraction_option, metavar="FRACTION",
              help="Fail when the share of answers identical to the baseline's is below this, e.g. 0.99.")
@click.option("--junit", type=click.Path(path_type=Path), metavar="FILE",
              help="Also write JUnit XML for CI: one test case per gate and per question type.")
@handle_errors
def eval_cmd(folder, data, split, limit, threshold, thresholds, backend, device, batch, compare_torch, compare,
             verify, as_json, baseline, min_accuracy, max_drop, min_agreement, junit):
    """Task accuracy of an artifact through the torch-free runtime (overall and per question type), with
    regression gates for CI (docs/CI.md)."""
    from attanchor_export.checks.junit import write_junit
    from attanchor_export.checks.regression import eval_cases, judge
    from attanchor_export.checks.task_accuracy import run_eval

    values: list = [threshold]
    if thresholds:
        values = _thresholds_value(thresholds)
    if baseline is not None and compare is not None:
        _fail("--baseline and --compare are both baselines: give one", EXIT_USAGE)
    if baseline is None and compare is None:
        for option, value in (("--max-drop", max_drop), ("--min-agreement", min_agreement)):
            if value is not None:
                _fail(f"{option} needs a baseline: --baseline REPORT.json or --compare DIR", EXIT_USAGE)
    if junit:
        _check_writable_file(junit, "--junit")
    start = time.perf_counter()
    with library_quiet(as_json), _junit_on_error(junit, "eval"):
        result = run_eval(folder, data, split, limit, values, backend, device, batch, progress_factory=_progress_bar,
                          compare_torch=compare_torch, compare=compare, verify=verify,
                          on_skip=lambda message: click.echo(f"warning: {message}", err=True), baseline=baseline)
    gates = judge(result["results"][0], min_accuracy, max_drop, min_agreement)
    if gates:
        result["gates"] = gates
        result["passed"] = all(g["passed"] for g in gates)
    if junit:
        write_junit(junit, "attanchor-export eval", eval_cases(result),
                    {"folder": folder, "data": data, "split": result["split"], "precision": result["precision"],
                     "threshold": result["results"][0]["threshold"], "baseline": baseline or compare},
                    time.perf_counter() - start)
    if as_json:
        click.echo(json.dumps(result, default=float))
    else:
        from attanchor_export.checks.tables import print_eval

        print_eval(result)
    failed = [g["message"] for g in gates if not g["passed"]]
    if failed:
        _fail("eval gate failed: " + "; ".join(failed))


def _thresholds_value(text: str) -> list[float]:
    """--thresholds a,b,c: finite numbers, at least one."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected numbers separated by commas", param_hint="--thresholds") from None
    if not values:
        raise click.BadParameter(f"{text!r} holds no number: expected e.g. 0.3,0.5,2", param_hint="--thresholds")
    if not all(math.isfinite(v) for v in values):
        raise click.BadParameter(f"{text!r}: thresholds must be finite numbers", param_hint="--thresholds")
    return values


def _check_writable_file(path: Path, option: str) -> None:
    """An output file's folder must exist and be writable, and the path must not be a folder: said
    before the work, not as an internal error after it."""
    path = Path(path)
    parent = path.absolute().parent
    if path.is_dir():
        _fail(f"{option} {path} is a folder: give a file name")
    if not parent.is_dir():
        _fail(f"{option} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        _fail(f"{option} {path}: not writable")


@contextmanager
def _progress_bar(label: str, total: int):
    """A rich progress bar on stderr; yields the callback that advances it."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


@main.command("serve")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime threads per model copy [all cores; "
              "with --ray, the CPUs of a replica].")
@click.option("--api-key", envvar="ATTANCHOR_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/* "
              "[env ATTANCHOR_API_KEY]. Never printed or logged.")
@click.option("--model-name", help="The model id clients name [the artifact folder's name].")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests batched into one generate.")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Waiting requests past this get 429.")
@click.option("--batch-window-ms", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="How long a request waits for others to batch with.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds per request, queueing included (504 past it).")
@click.option("--max-tokens", "max_tokens_default", type=click.IntRange(min=1), default=256, show_default=True,
              help="max_tokens of a request that sets none.")
@click.option("--max-body-mb", type=click.FloatRange(min=0.001), default=20.0, show_default=True,
              help="Request body limit (413 past it).")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=4096 * 4096, show_default=True,
              help="Decoded width x height limit, checked before decoding.")
@click.option("--max-image-aspect", type=click.FloatRange(min=1), default=50.0, show_default=True,
              help="Long side / short side limit.")
@click.option("--allow-files", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Allow file:// image URLs under this folder.")
@click.option("--allow-remote-images", is_flag=True,
              help="Allow http(s):// image URLs (public addresses only, size-capped, time-limited).")
@click.option("--shutdown-grace", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM, seconds for requests in flight before they get 503.")
@click.option("--ray", "use_ray", is_flag=True, help="Serve through Ray Serve (the [ray] extra).")
@click.option("--replicas", type=click.IntRange(min=1), default=2, show_default=True, help="With --ray: model copies.")
@click.option("--ray-address", help="With --ray: join this cluster (e.g. auto, or HOST:6379) instead of starting "
              "a local head.")
@click.option("--replica-cpus", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="With --ray: CPUs Ray reserves per replica.")
@click.option("--replica-gpus", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="With --ray: GPUs Ray reserves per replica.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="uvicorn's log level (access lines at info).")
@handle_errors
def serve_cmd(folder, host, port, use_ray, replicas, ray_address, replica_cpus, replica_gpus, shutdown_grace,
              log_level, max_body_mb, **options):
    """Serve FOLDER over HTTP: the OpenAI chat-completions API with images, and a page at / (docs/SERVING.md)."""
    from attanchor_runtime.serve import ServeOptions

    if not (folder / "manifest.json").is_file():
        raise click.BadParameter(f"{folder} is not an artifact folder (no manifest.json)", param_hint="FOLDER")
    if host not in ("127.0.0.1", "localhost", "::1") and not options["api_key"]:
        click.echo(f"warning: serving on {host} without --api-key: anyone who reaches this port can use it", err=True)
    serve_options = ServeOptions(max_body_bytes=int(max_body_mb * 2**20), **options)
    if use_ray:
        from attanchor_runtime.serve.ray_app import serve_on_ray

        serve_on_ray(folder, serve_options, host, port, replicas, ray_address, replica_cpus, replica_gpus,
                     shutdown_grace)
    else:
        from attanchor_runtime.serve.run import serve

        serve(folder, serve_options, host, port, shutdown_grace, log_level)


@main.command("demo")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("out/demo"), show_default=True,
              help="Folder for the demo's files: artifact/, demo.png, anchors.png (only what the demo wrote "
                   "there before is replaced).")
@click.option("--fresh", is_flag=True, help="Export again even if a validated artifact is in the folder.")
@click.option("--quiet", is_flag=True, help="No progress and no report (the files are still written).")
@handle_errors
def demo_cmd(output, fresh, quiet):
    """Whole flow on the trained tiny-vqa model: build, export, check, answer, show the anchors."""
    from attanchor_export.demo import run_demo

    report = Reporter(quiet)
    with library_quiet(True):
        run_demo(output, report, fresh=fresh)


if __name__ == "__main__":
    main()

"""`attanchor-export bench DIR`: where the time goes between an image + prompt and the answer.

    run.py       run_bench, step by step (what is measured, and the result's keys)
    runners.py   one timed generate: the torch-free runtime, or transformers eager
    anchor_op.py AnchorInsert alone, and the scores behind threshold="auto"
    probes.py    machine probes: other processes' load, peak RSS, read bandwidth, weight bytes
    summary.py   runs -> medians, the bandwidth bound, torch ratios, targets
    report.py    the console table and the PNG chart
    inputs.py    default prompts and a synthetic picture
"""

from .inputs import DEFAULT_PROMPTS, synthetic_image
from .probes import decoder_weight_bytes, measure_read_bandwidth
from .report import format_report, write_chart
from .run import BENCH_SCHEMA, run_bench
from .summary import TARGETS

__all__ = [
    "BENCH_SCHEMA", "DEFAULT_PROMPTS", "TARGETS", "decoder_weight_bytes", "format_report",
    "measure_read_bandwidth", "run_bench", "synthetic_image", "write_chart",
]

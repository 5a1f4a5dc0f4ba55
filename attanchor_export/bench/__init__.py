"""`attanchor-export bench DIR`: where the time goes between an image + prompt and the answer."""

from .run import (BENCH_SCHEMA, DEFAULT_PROMPTS, TARGETS, decoder_weight_bytes, format_report,
                  measure_read_bandwidth, run_bench, synthetic_image, write_chart)

__all__ = [
    "BENCH_SCHEMA", "DEFAULT_PROMPTS", "TARGETS", "decoder_weight_bytes", "format_report",
    "measure_read_bandwidth", "run_bench", "synthetic_image", "write_chart",
]

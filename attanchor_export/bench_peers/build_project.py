"""This project's systems: decoder.onnx as `attanchor-export` writes it, fp32 traced from the checkpoint, the
int4/int8 forms quantized from that fp32 graph (project-fp32, their source), with embed_tokens.npy beside."""

from __future__ import annotations

import os
from pathlib import Path

from .common import BenchError
from .systems import System
from .weight_bytes import onnx_weight_bytes


def build_project(system: System, out: Path, cache: Path, ckpt: Path, source_build: dict | None) -> dict:
    """decoder.onnx as an export writes it: traced by export_decoder, pinned and checked, rewritten by the
    grouped-attention pass; int4 from that fp32 graph with the export's MatMulNBits path."""
    import numpy as np
    import onnx
    import onnx_ir as ir
    from attanchor_runtime.manifest import KV_CONCAT

    from attanchor_export.options import ARTIFACT_IR_VERSION, ExportOptions, default
    from attanchor_export.precision.ort_fusions import fuse_decoder_file
    from attanchor_export.precision.quantize import lm_head_quantized
    from attanchor_export.precision.streamed_weights import (
        linear_nodes,
        merge_shared_input_linears,
        quantize_graph,
        save_beside,
    )
    from attanchor_export.precision.weights import DEFAULT_ACCURACY_LEVEL

    if system.variant == "fp32":
        import torch
        from transformers import LlamaForCausalLM

        from attanchor_export.families.base import decoder_spec
        from attanchor_export.trace.decoder import export_decoder
        from attanchor_export.trace.optimize import optimize_decoder

        model = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        model_dims = project_dims(model.config)
        path = out / "decoder.onnx"
        export_decoder(model.model, model.lm_head, model_dims, decoder_spec(model_dims), path, 18)
        proto = onnx.load(str(path), load_external_data=False)
        proto.ir_version = ARTIFACT_IR_VERSION
        path.write_bytes(proto.SerializeToString())
        onnx.checker.check_model(str(path))
        optimized = optimize_decoder(path, model_dims)
        np.save(out / "embed_tokens.npy", model.model.embed_tokens.weight.detach().numpy().astype(np.float32))
        del model
        notes = {"optimize": {k: v for k, v in optimized.items() if isinstance(v, (int, float, str))},
                 "kv_cache": KV_CONCAT}
    else:
        from attanchor_runtime.manifest import Dims

        src = Path(source_build["model"])
        model = ir.load(str(src))
        quant = system.variant.split("-")[0]  # int4 | int8
        lm_head = lm_head_quantized(quant, False if system.variant == "int4-keep-lm-head" else None)
        nodes, _ = linear_nodes(model.graph, lm_head)
        linears, merged = len(nodes), []
        fused = system.variant != "int4-unfused"  # the export's onnxruntime form (ExportOptions.ort_fusions)
        if fused:  # q/k/v and gate/up as one MatMulNBits each, as the export's onnxruntime form writes them
            nodes, merged = merge_shared_input_linears(model.graph, nodes)
        level = DEFAULT_ACCURACY_LEVEL[quant]
        # what `--block-size 256` exports for the -b256 variant, else the export's default block
        block = 256 if system.variant.endswith("-b256") else default(ExportOptions, "block_size")
        count = quantize_graph(model, nodes, int(quant[3:]), block, symmetric=False, qdq=False, accuracy_level=level)
        if count != len(nodes):
            raise BenchError(f"{system.name}: quantized {count} of {len(nodes)} linears")
        path = out / "decoder.onnx"
        save_beside(model, path, ARTIFACT_IR_VERSION)
        del model
        os.link(src.with_name("embed_tokens.npy"), out / "embed_tokens.npy")
        model_dims = Dims.from_json(source_build["dims"])
        notes = {"block_size": block, "symmetric": False, "accuracy_level": level, "lm_head_quantized": lm_head,
                 "quantized_linears": linears, "kv_cache": KV_CONCAT}
        if fused:
            notes["ort_fusions"] = fuse_decoder_file(path, model_dims)
            notes["ort_fusions"]["merged_linears"] = {"groups": len(merged), "linears": sum(map(len, merged))}
            notes["kv_cache"] = notes["ort_fusions"]["kv_cache"]
        if system.variant.endswith("-prefill-int8"):  # the prompt graph an export with --prefill-int8 writes
            from attanchor_export.precision.prefill_int8 import write_prefill_graph

            notes["prefill"] = write_prefill_graph(path, out / "decoder.prefill.onnx")
    return {"model": str(path), "dims": model_dims.to_json(), "notes": notes,
            "weight_bytes_per_token": onnx_weight_bytes(path)}


def project_dims(config):
    from attanchor_runtime.manifest import Dims

    return Dims(
        hidden_size=config.hidden_size, num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads, head_dim=config.hidden_size // config.num_attention_heads,
        vocab_size=config.vocab_size, image_tokens=576, image_size=336, patch_size=14, vision_hidden_size=1024,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=False,
    )

"""Memory, FLOPs, time and artifact size of one training arm, from the architecture alone.

The estimates live by concern; this module gathers their names in one place for plan/ and its callers:
- adaptlab.plan.arms: `Arm` and `Shape`, the config and transforms training would use, parameter
  counts and the artifact's size on disk;
- adaptlab.plan.memory: peak training memory (`memory_breakdown`) and its terms, with the CPU
  calibration; GRPO's sampling memory and reference copy;
- adaptlab.plan.timing: seconds per step (`step_time_s`) and its FLOPs and traffic terms, with the
  time calibration; GRPO's sampling time and a reference's forward pass.
"""

from __future__ import annotations

from adaptlab.plan.arms import (
    ADAM_BYTES_PER_PARAM,
    FP32,
    NF4_BYTES_PER_PARAM,
    UNCAST_SAVERS,
    Arm,
    Shape,
    artifact_bytes,
    eager,
    held_block_params,
    held_params,
    run_config,
    trainable_params,
    transforms_report,
)
from adaptlab.plan.memory import (
    CPU_HEAP_SLACK,
    CPU_LOAD_RESIDUAL,
    CPU_LOAD_RESIDUAL_FROZEN,
    CPU_QLORA_DEQUANT_RESIDUAL,
    CPU_RUN_OVERHEAD_BYTES,
    GLIBC_MMAP_THRESHOLD_MAX,
    PY_BYTES_PER_TOKEN,
    generation_memory_bytes,
    layer_activation_bytes,
    loss_bytes,
    memory_breakdown,
    reference_copy_bytes,
)
from adaptlab.plan.timing import (
    ACTIVATION_PASSES,
    FUSED_LORA_DROPOUT_BYTES,
    FUSED_LORA_IN_PASSES,
    FUSED_LORA_OUT_PASSES,
    LOGIT_PASSES,
    LORA_IN_PASSES,
    LORA_OUT_PASSES,
    MATMUL_EFFICIENCY,
    MICRO_BATCH_OVERHEAD_S,
    NOMINAL_DROPOUT_DRAWS_PER_S,
    PEFT_DROPOUT_BYTES,
    attention_flops_per_token,
    dpo_reference,
    flops_per_token,
    forward_pass_s,
    generation_time_s,
    linear_flops_per_token,
    matmul_rate,
    step_time_at,
    step_time_s,
)

__all__ = [
    "ACTIVATION_PASSES",
    "ADAM_BYTES_PER_PARAM",
    "CPU_HEAP_SLACK",
    "CPU_LOAD_RESIDUAL",
    "CPU_LOAD_RESIDUAL_FROZEN",
    "CPU_QLORA_DEQUANT_RESIDUAL",
    "CPU_RUN_OVERHEAD_BYTES",
    "FP32",
    "FUSED_LORA_DROPOUT_BYTES",
    "FUSED_LORA_IN_PASSES",
    "FUSED_LORA_OUT_PASSES",
    "GLIBC_MMAP_THRESHOLD_MAX",
    "LOGIT_PASSES",
    "LORA_IN_PASSES",
    "LORA_OUT_PASSES",
    "MATMUL_EFFICIENCY",
    "MICRO_BATCH_OVERHEAD_S",
    "NF4_BYTES_PER_PARAM",
    "NOMINAL_DROPOUT_DRAWS_PER_S",
    "PEFT_DROPOUT_BYTES",
    "PY_BYTES_PER_TOKEN",
    "UNCAST_SAVERS",
    "Arm",
    "Shape",
    "artifact_bytes",
    "attention_flops_per_token",
    "dpo_reference",
    "eager",
    "flops_per_token",
    "forward_pass_s",
    "generation_memory_bytes",
    "generation_time_s",
    "held_block_params",
    "held_params",
    "layer_activation_bytes",
    "linear_flops_per_token",
    "loss_bytes",
    "matmul_rate",
    "memory_breakdown",
    "reference_copy_bytes",
    "run_config",
    "step_time_at",
    "step_time_s",
    "trainable_params",
    "transforms_report",
]

"""Random-weight models of a named shape, for throughput benchmarks of models larger than the embedded ones.

Speed and memory depend on a model's shape, not its weights, so a Llama-architecture model with seeded
random weights and the SmolLM2 tokenizer (vocabulary 49,152) stands in for a real checkpoint of that
size where none can be downloaded. `random-1b` has the shape of a ~1B Llama (hidden 2048, 16 layers,
32 query and 8 key/value heads, MLP 8192; 1.07B parameters with tied embeddings);
`random-smollm2-135m` has smollm2-135m's (for a machine the embedded model's files cannot reach; its
RoPE base is transformers' default, which changes no FLOP). Their losses mean nothing; their tokens/s,
MFU and memory do.

The directory is built once under adaptlab's cache (weights stored in bf16, loaded in fp32 by both
loops) and reused:

    python bench/random_model.py random-1b     # prints the directory
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

SHAPES: dict[str, dict[str, int]] = {
    "random-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    "random-smollm2-135m": {  # smollm2-135m's shape, where its 540 MB of weights cannot travel
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
    },
    "random-tiny": {  # for the benchmark's own test
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}
VERSION = 1


def is_random(spec: str) -> bool:
    return spec in SHAPES


def random_model_dir(spec: str) -> Path:
    """The directory of the random-weight model `spec` (one of SHAPES), built on first use."""
    from adaptlab.hub import cache_dir
    from adaptlab.models import build_atomically, save_random_llama

    def build(tmp: Path) -> None:
        save_random_llama(tmp, dtype=torch.bfloat16, max_positions=8192, **SHAPES[spec])

    return build_atomically(cache_dir() / f"bench-models-v{VERSION}" / spec, build, spec, about_s=30)


if __name__ == "__main__":
    print(random_model_dir(sys.argv[1] if len(sys.argv) > 1 else "random-1b"))

"""Generation and the OpenAI-compatible HTTP server for a base model and its LoRA adapters.

`generation` holds the engine (mixed-adapter batches, our own decode loop) and the batching queue;
`server` holds the FastAPI app and `serve()`, which runs it with uvicorn.
"""

from adaptlab.serve.generation import BASE, Batcher, Engine, Job, Sampling, generate_text, parse_adapter_specs

__all__ = ["BASE", "Batcher", "Engine", "Job", "Sampling", "generate_text", "parse_adapter_specs"]

"""Generation and the OpenAI-compatible HTTP server for a base model and its LoRA adapters.

`generation` holds the engine (mixed-adapter batches, our own decode loop) and the batching queue;
`server` assembles the FastAPI app and runs it with uvicorn (`serve()`); its parts are `requests`
(bodies, limits, reading), `api_errors`, `context`, `dispatch` (jobs -> JSON or SSE) and the
`routes_*` modules.
"""

from adaptlab.serve.generation import BASE, Batcher, Engine, Job, Sampling, generate_text, parse_adapter_specs

__all__ = ["BASE", "Batcher", "Engine", "Job", "Sampling", "generate_text", "parse_adapter_specs"]

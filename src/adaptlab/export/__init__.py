"""`adaptlab export --format gguf`: a tuned model or LoRA adapter as GGUF for llama.cpp and Ollama.

Written with the `gguf` package (llama.cpp's own writer), laid out as llama.cpp's converters lay it:

- a full or merged model (RUN/model, a merged HF directory, or a base model): tensors named as
  llama.cpp names them (`blk.N.attn_q.weight`, ...), attn_q/attn_k rows permuted for its rotary
  layout (convert_hf_to_gguf.py's LlamaModel.permute), 1-D tensors in F32, the model's hyperparameters
  and its tokenizer (`gpt2` BPE with merges, special ids, chat template) in the metadata;
- a LoRA adapter (RUN/adapter, a PEFT directory): the GGUF LoRA that convert_lora_to_gguf.py writes:
  `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and `<base tensor>.lora_a`
  (r x in) / `.lora_b` (out x r) pairs, lora_b of attn_q/attn_k permuted like their base rows.
  rsLoRA's scale alpha/sqrt(r) is written as alpha' = alpha*sqrt(r), since llama.cpp scales by alpha/r.

`--quant f16` stores 2-D tensors in F16; `q8_0` in Q8_0 (tensors whose rows are not a multiple of 32
values fall back to F16, as llama.cpp's converter does). After writing, every tensor is read back
with gguf's GGUFReader and compared with the source: F16 must equal the F16-cast source exactly;
Q8_0's error is reported and must stay within Q8_BOUND_STEPS quantization steps of its block.
`--ollama` writes a Modelfile next to it (an adapter: FROM the base exported beside it + ADAPTER).
Each GGUF is written and verified under a temp name beside it (`.NAME.XXXX.partial`) and renamed into
place only once verified, so a failed export (a full disk, a failed check) leaves no truncated .gguf.

Only llama-architecture models (LlamaForCausalLM, e.g. SmolLM2, Llama 2/3 without rope scaling)
are written; any other architecture is refused in one line naming it.

    adaptlab export runs/lora --format gguf --quant q8_0 --ollama --out gguf/lora

The package, one concern a module: llama.py (what a GGUF can hold: config, names, rotary layout),
tensors.py (the model's or the adapter's tensors), metadata.py (hyperparameters, tokenizer),
writer.py (write and read back), exporter.py (`export`: OUT's files).
"""

from __future__ import annotations

from adaptlab.export.exporter import QUANTS, ExportReport, export, modelfile
from adaptlab.export.llama import permute
from adaptlab.export.writer import Q8_BOUND_STEPS, TensorCheck

__all__ = ["Q8_BOUND_STEPS", "QUANTS", "ExportReport", "TensorCheck", "export", "modelfile", "permute"]

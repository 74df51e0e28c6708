"""Write a llama GGUF with the `gguf` package, and verify it by reading every tensor back.

2-D tensors are stored in F16, or Q8_0 where rows are a multiple of Q8_BLOCK values; 1-D tensors in F32.
F16 must read back equal to the F16-cast source; Q8_0's error must stay within Q8_BOUND_STEPS steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adaptlab.errors import UserError

Q8_BLOCK = 32
Q8_BOUND_STEPS = 0.5 + 127 * 2.0**-11
"""Q8_0's worst error in units of its block's step absmax/127: half a step from rounding, plus the scale's
F16 rounding (relative 2^-11) times the largest quantized value (127)."""


@dataclass
class TensorCheck:
    name: str
    dtype: str
    shape: list[int]
    max_abs_err: float
    max_err_in_steps: float | None = None
    """Q8_0: the largest error in units of its block's quantization step (absmax/127); <= Q8_BOUND_STEPS."""


def storage_type(array: np.ndarray, quant: str) -> Any:
    """F32 for 1-D tensors; F16; Q8_0 when rows are a multiple of 32 values (else F16)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if array.ndim < 2:
        return T.F32
    if quant == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        return T.Q8_0
    return T.F16


def encode(array: np.ndarray, qtype: Any) -> np.ndarray:
    import gguf

    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return array.astype(np.float32)
    if qtype == T.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array.astype(np.float32), qtype)


def write_gguf(
    path: Path, tensors: Iterator[tuple[str, np.ndarray]], quant: str, metadata: Any, name: str
) -> dict[str, tuple[np.ndarray, Any]]:
    """Write a llama GGUF; return name -> (source array, storage type) for the read-back check."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    written: dict[str, tuple[np.ndarray, Any]] = {}
    try:
        writer.add_name(name)
        metadata(writer)
        for tname, array in tensors:
            qtype = storage_type(array, quant)
            data = encode(array, qtype)
            raw_dtype = qtype if qtype == gguf.GGMLQuantizationType.Q8_0 else None
            writer.add_tensor(tname, data, raw_dtype=raw_dtype)
            written[tname] = (array, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        for fout in writer.fout or []:  # the caller removes the file; its buffered bytes need not land
            with contextlib.suppress(OSError):
                fout.close()
        raise
    writer.close()
    return written


def verify(
    path: Path, written: dict[str, tuple[np.ndarray, Any]], named: Path | None = None
) -> list[TensorCheck]:
    """Read every tensor back with GGUFReader and compare it with its source (see the module docstring);
    `named` is the path errors give (the final name of a GGUF written under a temp name)."""
    import gguf

    T = gguf.GGMLQuantizationType
    named = named or path
    reader = gguf.GGUFReader(str(path))
    found = {t.name: t for t in reader.tensors}
    if set(found) != set(written):
        raise UserError(f"{named}: read back {len(found)} tensors, {len(written)} were written")
    checks = []
    for name, (source, qtype) in written.items():
        t = found[name]
        if t.tensor_type != qtype:
            raise UserError(f"{named}: {name} reads back as {t.tensor_type.name}, not {qtype.name}")
        back = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(source.shape)
        reference = source.astype(np.float16).astype(np.float32) if qtype == T.F16 else source
        err = np.abs(back - reference)
        steps = None
        if qtype == T.Q8_0:
            blocks = np.abs(source.reshape(-1, Q8_BLOCK)).max(axis=1, keepdims=True) / 127.0
            steps = float((err.reshape(-1, Q8_BLOCK) / np.maximum(blocks, 1e-30)).max())
        checks.append(TensorCheck(name, qtype.name, list(source.shape), float(err.max()), steps))
    return checks


def summarize_checks(
    checks: list[TensorCheck], written: dict[str, tuple[np.ndarray, Any]]
) -> tuple[float, float, bool]:
    max_abs = max((c.max_abs_err for c in checks), default=0.0)
    scale = max((float(np.abs(a).max()) for a, _ in written.values() if a.size), default=1.0)
    exact = all(c.max_abs_err == 0.0 for c in checks if c.max_err_in_steps is None)
    return max_abs, max_abs / max(scale, 1e-30), exact

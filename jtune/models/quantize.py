"""Int8 weight-only quantisation of a parameter tree: symmetric, one scale per column.

Dense kernels ([in..., out...], `kernel`) get a scale per position of their trailing axes (the maximum |w| over
the first input axis / 127); embedding tables (`embedding`, [rows, width]) one per row. Everything else (biases,
LayerNorms) stays float32. The model still computes in float32: `dequantize` rebuilds the weights inside the
jitted call, so the int8 tree is what sits in memory and on disk (4x smaller for the matrices).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

QUANTIZED = {'kernel': 0, 'embedding': -1}  # leaf name -> the axis its scale reduces over


def quantize(params: Any) -> Any:
  """{'kernel': w} -> {'kernel': {'int8': q, 'scale': s}} with w ~ q * s, |q| <= 127 (numpy, on the host)."""
  if not isinstance(params, dict):
    return params
  out = {}
  for name, value in params.items():
    if name in QUANTIZED and not isinstance(value, dict) and np.ndim(value) >= 2:
      w = np.asarray(value, np.float32)
      scale = np.max(np.abs(w), axis=QUANTIZED[name], keepdims=True) / 127.0
      scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
      out[name] = {'int8': np.clip(np.round(w / scale), -127, 127).astype(np.int8), 'scale': scale}
    else:
      out[name] = quantize(value)
  return out


def dequantize(params: Any) -> Any:
  """The float32 tree again (inside jit: XLA fuses the multiply into the weights' first use)."""
  if not isinstance(params, dict):
    return params
  if set(params) == {'int8', 'scale'}:
    return params['int8'].astype(jnp.float32) * params['scale']
  return {name: dequantize(value) for name, value in params.items()}


def nbytes(params: Any) -> int:
  if isinstance(params, dict):
    return sum(nbytes(v) for v in params.values())
  return int(np.asarray(params).nbytes)

"""Argument checks shared by the Python entry points, the reference and the fake kernels.

Every message names the argument and what was expected (docs/kpos_loss.md, "Errors").
"""
from __future__ import annotations

import math

import torch

FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _shape(t: torch.Tensor) -> list:
    return list(t.shape)


def is_integer_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def check_k(k, name: str = "kpos_loss") -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name}: k must be an int >= -1, got {type(k).__name__} {k!r}")
    if k < -1:
        raise ValueError(f"{name}: k must be >= -1 (-1 = all same-class entries), got {k}")
    return k


def check_seed(seed, name: str = "kpos_loss", allow_none: bool = True):
    if seed is None:
        if allow_none:
            return None
        raise TypeError(f"{name}: seed must be an int, got None")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name}: seed must be an int or None, got {type(seed).__name__} {seed!r}")
    if not INT64_MIN <= seed <= INT64_MAX:
        raise ValueError(f"{name}: seed must fit in int64 [-2^63, 2^63 - 1], got {seed}")
    return seed


def check_temperature(temperature, name: str = "kpos_loss", allow_tensor: bool = False):
    """A positive finite float, or with `allow_tensor` a 0-d floating tensor (checked by its
    metadata only: its value is not read, which would synchronise with the device)."""
    if allow_tensor and isinstance(temperature, torch.Tensor):
        if temperature.dim() != 0 or not temperature.dtype.is_floating_point:
            raise ValueError(
                f"{name}: a temperature tensor must be a 0-d floating tensor (e.g. a learnable "
                f"torch.nn.Parameter(torch.tensor(0.07))), got {temperature.dtype} of shape "
                f"{_shape(temperature)}")
        return temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        expected = ("a positive finite float or a 0-d floating tensor" if allow_tensor
                    else "a positive finite float")
        raise TypeError(f"{name}: temperature must be {expected}, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0.0:
        raise ValueError(f"{name}: temperature must be a positive finite float, got {temperature}")
    return temperature


def check_temperature_device(temperature, query, name: str = "kpos_loss") -> None:
    """A temperature tensor lives on query's device or is a CPU scalar."""
    if (isinstance(temperature, torch.Tensor) and temperature.device != query.device
            and temperature.device.type != "cpu"):
        raise ValueError(f"{name}: a temperature tensor must be on query's device "
                         f"{query.device} (or the CPU), got {temperature.device}")


def check_reduction(reduction, name: str = "kpos_loss") -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_labels(query_labels, queue_labels, n=None, q=None, name: str = "kpos_loss"):
    for arg, t in (("query_labels", query_labels), ("queue_labels", queue_labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if not is_integer_dtype(t.dtype):
            raise TypeError(f"{name}: {arg} must have an integer dtype (e.g. torch.int64), got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name}: {arg} must be 1-D, got shape {_shape(t)}")
    if n is not None and query_labels.size(0) != n:
        raise ValueError(
            f"{name}: query_labels must be 1-D [N] with N = query.size(0) = {n}, got {_shape(query_labels)}"
        )
    if q is not None and queue_labels.size(0) != q:
        raise ValueError(
            f"{name}: queue_labels must be 1-D [Q] with Q = queue.size(0) = {q}, got {_shape(queue_labels)}"
        )
    if query_labels.device != queue_labels.device:
        raise ValueError(
            f"{name}: query_labels and queue_labels must be on one device, got "
            f"{query_labels.device} and {queue_labels.device}"
        )


def check_inputs(query, key, queue, query_labels, queue_labels, name: str = "kpos_loss") -> None:
    """Shape, dtype and device checks of the five tensors (metadata only: no host sync)."""
    for arg, t in (("query", query), ("key", key), ("queue", queue)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if query.dim() != 2:
        raise ValueError(f"{name}: query must be 2-D [N, D], got shape {_shape(query)}")
    n, d = query.shape
    if key.dim() != 2 or tuple(key.shape) != (n, d):
        raise ValueError(f"{name}: key must be 2-D [N, D] = {[n, d]} like query, got {_shape(key)}")
    if queue.dim() != 2 or queue.size(1) != d:
        raise ValueError(
            f"{name}: queue must be 2-D [Q, D] with D = query.size(1) = {d}, got {_shape(queue)}"
        )
    if query.dtype not in FEATURE_DTYPES:
        raise TypeError(
            f"{name}: query must be float32, float16, bfloat16 or float64, got {query.dtype}"
        )
    for arg, t in (("key", key), ("queue", queue)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name}: {arg} must have query's dtype {query.dtype}, got {t.dtype}")
    check_labels(query_labels, queue_labels, n, queue.size(0), name)
    for arg, t in (("key", key), ("queue", queue), ("query_labels", query_labels), ("queue_labels", queue_labels)):
        if t.device != query.device:
            raise ValueError(
                f"{name}: {arg} must be on query's device {query.device}, got {t.device}"
            )


def check_all(query, key, queue, query_labels, queue_labels, k, temperature, reduction, seed,
              name: str = "kpos_loss"):
    check_inputs(query, key, queue, query_labels, queue_labels, name)
    check_k(k, name)
    check_temperature(temperature, name, allow_tensor=True)
    check_temperature_device(temperature, query, name)
    check_reduction(reduction, name)
    check_seed(seed, name)

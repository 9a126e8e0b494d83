"""Numeric formats and their widths in bits (widths stay in bits; bytes are rounded up once)."""

from __future__ import annotations

from enum import StrEnum


class Dtype(StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    FP8 = "fp8"
    INT8 = "int8"
    INT4 = "int4"

    @property
    def bits(self) -> int:
        return _BITS[self]

    @property
    def is_16bit(self) -> bool:
        return self in (Dtype.BF16, Dtype.FP16)


_BITS = {Dtype.FP32: 32, Dtype.BF16: 16, Dtype.FP16: 16, Dtype.FP8: 8, Dtype.INT8: 8, Dtype.INT4: 4}

"""Normalized pixels on the wire (retinal.v1.NormalizedImage): images travel once, decoded."""

from __future__ import annotations

import numpy as np

from protos.retinal.v1 import common_pb2
from shared import findings
from shared.convert import to_proto


class InvalidImageMessage(ValueError):
    """A NormalizedImage whose bytes do not match its declared shape."""


def to_message(rgb: np.ndarray, info: findings.ImageInfo) -> common_pb2.NormalizedImage:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidImageMessage(f"expected uint8 HxWx3 pixels, got {rgb.dtype} {rgb.shape}")
    height, width, _ = rgb.shape
    return common_pb2.NormalizedImage(
        rgb=np.ascontiguousarray(rgb).tobytes(),
        width=width,
        height=height,
        info=to_proto(info, type(common_pb2.NormalizedImage().info)),
    )


def from_message(message: common_pb2.NormalizedImage) -> np.ndarray:
    """The HxWx3 uint8 array of a message, read-only and without a copy."""
    if message.width <= 0 or message.height <= 0:
        raise InvalidImageMessage(f"image size {message.width}x{message.height} is not positive")
    expected = message.width * message.height * 3
    if len(message.rgb) != expected:
        raise InvalidImageMessage(
            f"{len(message.rgb)} bytes of pixels for {message.width}x{message.height} RGB "
            f"(expected {expected})"
        )
    return np.frombuffer(message.rgb, dtype=np.uint8).reshape(message.height, message.width, 3)

"""Codec registry: name -> codec instance. Codec modules register themselves when imported."""

from __future__ import annotations

from moeserve.codecs.base import Codec, CodecError

_CODECS: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    if codec.name in _CODECS:
        raise ValueError(f"codec {codec.name!r} is registered twice")
    _CODECS[codec.name] = codec
    return codec


def get(name: str) -> Codec:
    try:
        return _CODECS[name]
    except KeyError:
        raise CodecError(f"unknown codec {name!r}; use one of {', '.join(names())}.") from None


def names() -> list[str]:
    return sorted(_CODECS)

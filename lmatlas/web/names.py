"""Site names in URLs: ``L5.H3`` (a head), ``L12.N1031`` (a neuron), checked against the atlas's model.

A name outside the grammar is :class:`~lmatlas.web.errors.Malformed` (422; the API's
path parameters carry the same patterns, so FastAPI refuses them first); a well-formed
name past the model's sizes is a :class:`~lmatlas.errors.SiteError` (404), with the
valid range in the message.
"""

from __future__ import annotations

import re

from lmatlas.model.arch import HeadLayout
from lmatlas.model.sites import check_layer, parse_head, parse_neuron
from lmatlas.web.errors import Malformed

HEAD_NAME = re.compile(r"^L\d{1,6}\.H\d{1,6}$")
NEURON_NAME = re.compile(r"^L\d{1,6}\.N\d{1,9}$")


def head(name: str, layout: HeadLayout) -> tuple[int, int]:
    """``"L5.H3" -> (5, 3)``."""
    if not HEAD_NAME.match(name):
        raise Malformed(f"{name!r} is not a head name: expected L<layer>.H<head>, e.g. 'L5.H3'.")
    return parse_head(name, layout)


def neuron(name: str, layout: HeadLayout) -> tuple[int, int]:
    """``"L12.N1031" -> (12, 1031)``."""
    if not NEURON_NAME.match(name):
        raise Malformed(f"{name!r} is not a neuron name: expected L<layer>.N<neuron>, e.g. 'L12.N1031'.")
    return parse_neuron(name, layout)


def layer(index: int, layout: HeadLayout) -> int:
    return check_layer(index, layout)

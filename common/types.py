"""Names for shapes that cross package lines without a model of their own."""

from __future__ import annotations

from typing import Any

#: A decoded JSON object (a Kubernetes object, a server payload) read field by field.
Json = dict[str, Any]

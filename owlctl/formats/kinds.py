"""Document kinds and their schema versions (stdlib only: read at start-up, before msgspec is needed).

A document's ``schema`` is ``owlctl.<kind>/<version>``. Readers accept every version from OLDEST to the
current one and upgrade older documents (formats.documents.upgrade); a newer version is refused with a
message naming the owlctl that wrote it.
"""

from __future__ import annotations

VERSIONS = {"profile": 2, "allocation": 2, "report": 2, "prune": 1, "eval": 2, "pipeline": 2, "finetune": 1,
            "packed": 2, "export": 1, "bench": 2,
            "generate": 1}
# the kinds owlctl reads back, and the oldest version it still reads (upgraded on reading)
OLDEST = {"profile": 1, "allocation": 1, "report": 1, "packed": 1, "export": 0}
# schemas of earlier owlctl versions that are now another kind: onnx-export.json was owlctl.onnx/1
RENAMED = {"owlctl.onnx/1": ("export", 0)}


def schema_name(kind: str) -> str:
    return f"owlctl.{kind}/{VERSIONS[kind]}"


def parse_schema(schema: object) -> tuple[str, int] | None:
    """("profile", 2) for "owlctl.profile/2"; None for anything that is not an owlctl schema tag."""
    if not isinstance(schema, str):
        return None
    if schema in RENAMED:
        return RENAMED[schema]
    head, _, version = schema.partition("/")
    if not head.startswith("owlctl.") or not version.isdigit():
        return None
    return head[len("owlctl."):], int(version)

"""Write layout keys into a GGUF file: run as a script by the converter's Python (it imports only the
`gguf` package of the llama.cpp tree, never sleb, torch or transformers).

    python gguf_layout.py IN.gguf OUT.gguf '{"attention.sliding_window_pattern": [true, false]}'

Each key is prefixed with the file's own architecture ("gemma3.attention.sliding_window_pattern"), and
the file is copied with the keys added or replaced, by gguf-py's own copy (`gguf_new_metadata`).
"""

import json
import sys


def main(source: str, target: str, fields: str) -> None:
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(source, "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    new = {}
    for key, value in json.loads(fields).items():
        kind = (gguf.GGUFValueType.ARRAY if isinstance(value, list) else gguf.GGUFValueType.BOOL
                if isinstance(value, bool) else gguf.GGUFValueType.UINT32)
        sub = gguf.GGUFValueType.BOOL if kind == gguf.GGUFValueType.ARRAY and all(
            isinstance(v, bool) for v in value) else None
        new[f"{arch}.{key}"] = MetadataDetails(kind, value, "written by sleb: the pruned layout", sub)
    writer = gguf.GGUFWriter(target, arch=arch, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    copy_with_new_metadata(reader, writer, new, [])


if __name__ == "__main__":
    main(*sys.argv[1:])

"""The files of one importer test case (tests/moe_import.sh, tests/memory_import.sh):
OUTDIR/<name>.pt or .safetensors (the state dict), OUTDIR/<name>.json (the importer's --from,
--config and extra arguments) and OUTDIR/<name>.io.safetensors (x and the source's output y)."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
import spex_torch as st  # noqa: E402


def write_case(out, name, source, cfg, state, x, y, ext=".pt", args=None):
    path = os.path.join(out, name + ext)
    if ext == ".pt":
        torch.save(state, path)
    else:
        st.write_safetensors(path, state)
    case = {"from": source, "config": cfg, "input": path}
    if args:
        case["args"] = args
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(case, f)
    st.write_safetensors(os.path.join(out, name + ".io.safetensors"), {"x": x, "y": y})
    print("wrote", name, source, path)

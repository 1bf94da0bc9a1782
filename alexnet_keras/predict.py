"""`alexnet-keras predict`: the top classes of image files under a trained model (serving.load_predictor),
options checked before any model is loaded; exit status 1 when some file is not a readable image."""

import json
import os
import sys
from typing import Sequence

from .data import DataError, walk_files
from .model.inference import check_options


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files as given; folders as every visible regular file under them; what a walk skipped on stderr."""
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            walk = walk_files(item)
            files.extend(os.path.join(item, name) for name in walk.files)
            if walk.skipped:
                print(walk.note(item), file=sys.stderr)
        else:
            files.append(item)
    return files


def format_text(results: list[dict], crops: str) -> str:
    lines = []
    for result in results:
        lines.append(f"{result['file']}  ({'10 crops' if crops == 'ten' else 'centre crop'})")
        if "error" in result:
            lines.append(f"  error: {result['error']}")
            continue
        width = max(len(p["class"]) for p in result["predictions"])
        for p in result["predictions"]:
            lines.append(f"  {p['rank']}. {p['class']:<{width}}  {p['probability']:.4f}")
    return "\n".join(lines)


def run_cli(model: str, inputs: Sequence[str], *, crops: str = "center", top: int = 5, as_json: bool = False,
            batch_size: int = 32, tracking_uri: str | None = None) -> int:
    check_options(crops, top, batch_size)
    files = expand_inputs(inputs)
    if not files:
        raise DataError("no image files given (pass files or folders after --model).")
    from . import serving, tracking

    if serving.mlflow_reference(model) and not os.path.exists(model):
        tracking.configure(tracking_uri)
    predictor = serving.load_predictor(model)
    results = predictor.predict_files(files, crops=crops, top=top, batch_size=batch_size)
    print(json.dumps({"model": model, "crops": crops, "preprocessing": predictor.preprocessing, "results": results},
                     indent=2) if as_json else format_text(results, crops))
    return 1 if any("error" in r for r in results) else 0

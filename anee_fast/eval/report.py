"""How an evaluation run ends: its table printed, its result written as JSON and drawn as a PNG."""
import json
import os


def _with_parent(path) -> str:
    """The path as a string, its parent folders made."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    return path


def write_json(path, value) -> str:
    """Writes value as indented JSON (and a newline), making parent folders; returns the path."""
    path = _with_parent(path)
    with open(path, "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")
    return path


def write_text(path, text: str) -> str:
    """Writes UTF-8 text (a markdown report), making parent folders; returns the path."""
    path = _with_parent(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def report(result, text: str, *, json_path, plot_path, plot, out):
    """Prints `text` to `out`, then writes `result` as JSON to json_path and plot(result,
    plot_path) as a PNG, each only when its path is given, printing the paths it wrote."""
    print(text, file=out)
    if json_path:
        print(f"records: {write_json(json_path, result)}", file=out)
    if plot_path:
        print(f"plot: {plot(result, plot_path)}", file=out)

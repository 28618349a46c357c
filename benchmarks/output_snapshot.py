"""Everything ninlab prints, over a corpus, to compare two versions byte for byte.

Run by hand (not in CI), before and after a change that should move no number:

    python benchmarks/output_snapshot.py snap/before      # on the old checkout
    python benchmarks/output_snapshot.py snap/after       # on the new one
    python benchmarks/output_snapshot.py --diff snap/before snap/after

Each command runs in a fresh process (`ninlab.cli.main`, this checkout's `src/`, models from
`tests/`): `summary` in JSON for every corpus model under SGD, Adam, inference and bf16 autocast
with channels-last, as a table with `--explain`; Markdown, CSV and `--fit` for a few; `measure`,
every `plot` kind, `report` and `compare`; two refusals and a help text. One file per command
holds its exit code, stdout and stderr, beside the files it wrote. `--diff` names the commands
whose output differs once run-to-run noise is set aside: matplotlib's random SVG ids and the
profiler's own log lines on stderr.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL_CNN = ["--input", "3x32x32", "--batch", "4"]
MODELS = {
    "nin": [],
    "nin1x1": ["--model", "nin-d2l-1x1", "--input", "1x96x96", "--batch", "8"],
    "ninbn": ["--model", "nin-d2l-bn", "--input", "1x72x72", "--batch", "16"],
    **{
        name: ["--model", factory, *SMALL_CNN]
        for name, factory in (
            ("resnet", "cnn_zoo:resnet_bn"),
            ("mobilenet", "cnn_zoo:mobilenet_relu6"),
            ("grouped", "cnn_zoo:grouped_net"),
            ("ceilpool", "cnn_zoo:ceil_pool_net"),
            ("vgg", "cnn_zoo:vgg_big_head"),
            ("mbconv", "layer_zoo:mbconv_silu"),
            ("convnext", "layer_zoo:convnext_ln"),
            ("attention", "layer_zoo:attention_net"),
            ("dense", "layer_zoo:dense_net"),
        )
    },
    "vit": ["--model", "layer_zoo:vit_encoder", "--input", "3x64x64", "--batch", "2"],
    "mlp": ["--model", "any_models:mlp", "--input", "784", "--batch", "8"],
    "lstm": ["--model", "any_models:lstm", "--input", "20x12", "--batch", "4"],
    "siamese": ["--model", "any_models:siamese", "--input", "1x16x16", "--input", "1x16x16"],
    "tokens": [
        *("--model", "any_models:text_cnn", "--input", "10", "--input-dtype", "long"),
        *("--input-range", "0:100", "--batch", "4"),
    ],
    "lazy": ["--model", "any_models:lazy_cnn", "--input", "1x28x28", "--batch", "4"],
}
STEPS = {
    "sgd": [],
    "adam": ["--optimizer", "adam"],
    "infer": ["--mode", "infer"],
    "bf16cl": ["--amp", "bf16", "--channels-last", "--optimizer", "adam"],
}
FEW = ("nin", "resnet", "tokens", "mlp", "vit")
CHARTS = ("geometry", "receptive-field", "flops", "timeline", "saved", "batch")
VARIANTS = ["nin-d2l", "nin-d2l-1x1", "nin-d2l:batch_norm=true"]


def commands() -> dict[str, list[str]]:
    """Each command's name and arguments; `{out}` stands for the folder its files go to."""
    runs = {}
    for model, given in MODELS.items():
        for step, options in STEPS.items():
            runs[f"summary-{model}-{step}"] = ["summary", "--format", "json", *given, *options]
        runs[f"summary-{model}-table"] = ["summary", "--explain", *given]
    for model in FEW:
        given = MODELS[model]
        runs[f"summary-{model}-md"] = ["summary", "--format", "markdown", "--explain", *given]
        runs[f"summary-{model}-csv"] = ["summary", "--format", "csv", *given]
        runs[f"summary-{model}-fit"] = ["summary", "--optimizer", "adam", "--fit", "64MiB", *given]
        for output in ("json", "markdown"):
            runs[f"summary-{model}-fit-{output}"] = [
                *("summary", "--format", output, "--fit", "64MiB", *given)
            ]
    runs["summary-nin-fit-8gib"] = ["summary", "--optimizer", "adam", "--fit", "8GiB"]
    for model in ("ninbn", "resnet", "mlp", "tokens"):
        runs[f"measure-{model}"] = ["measure", "--format", "json", *MODELS[model]]
        runs[f"measure-{model}-table"] = ["measure", *MODELS[model]]
    for kind in CHARTS:
        for model in ("nin", "resnet"):
            runs[f"plot-{kind}-{model}"] = [
                *("plot", kind, "-o", "{out}/chart.svg", "--budget", "256MiB", *MODELS[model])
            ]
    for model in ("nin", "resnet", "tokens"):
        runs[f"report-{model}"] = [
            *("report", "-o", "{out}/report.html", "--budget", "256MiB", *MODELS[model])
        ]
    runs["report-nin-plan"] = ["report", "-o", "{out}/report.html", "--plan", "--budget", "2GiB"]
    for output in ("table", "markdown", "json"):
        runs[f"compare-{output}"] = ["compare", *VARIANTS, "--format", output]
    runs["compare-plot"] = ["compare", *VARIANTS[:2], "--plot", "{out}/compare.svg"]
    runs["refused-too-small"] = ["summary", "--input", "1x60x60"]
    runs["refused-dtype"] = ["summary", "--dtype", "float64"]
    runs["help-summary"] = ["summary", "--help"]
    return runs


def run_one(name: str, argv: list[str], out: Path, work: Path) -> int:
    files = work / name
    files.mkdir(parents=True)
    argv = [part.replace("{out}", str(files)) for part in argv]
    env = os.environ | {"PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'tests'}", "COLUMNS": "200"}
    env |= {"MPLBACKEND": "Agg", "SOURCE_DATE_EPOCH": "0"}
    main = "import sys; from ninlab.cli import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", main, *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=files,
        check=False,  # a refusal's exit code is part of the output
    )
    text = f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    (out / f"{name}.txt").write_text(text.replace(str(files), "{out}"))
    for written in sorted(files.iterdir()):
        shutil.copyfile(written, out / f"{name}.{written.name}")
    return done.returncode


# Run-to-run noise: matplotlib's random clip-path and marker ids, the profiler's log lines.
_NOISE = ((re.compile(r"\b([pm])[0-9a-f]{10}\b"), r"\1ID"), (re.compile(r"(?m)^.*USDT:.*\n"), ""))


def _normalised(path: Path) -> str:
    text = path.read_text(errors="replace")
    for pattern, replacement in _NOISE:
        text = pattern.sub(replacement, text)
    return text


def differences(before: Path, after: Path) -> list[str]:
    names = sorted({path.name for path in (*before.iterdir(), *after.iterdir())})
    return [
        name
        for name in names
        if not (before / name).exists()
        or not (after / name).exists()
        or _normalised(before / name) != _normalised(after / name)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", help="a new folder for the outputs")
    parser.add_argument("--diff", type=Path, nargs=2, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--only", default="", help="a regular expression over command names")
    parser.add_argument("--jobs", type=int, default=1, help="commands run at once")
    args = parser.parse_args()
    if args.diff:
        changed = differences(*args.diff)
        print("\n".join(changed) if changed else "identical")
        return 1 if changed else 0
    if args.out is None or args.out.exists():
        parser.error("give a folder that does not exist yet")
    args.out.mkdir(parents=True)
    selected = {name: argv for name, argv in commands().items() if re.search(args.only, name)}
    with tempfile.TemporaryDirectory() as work, ThreadPoolExecutor(args.jobs) as pool:
        codes = pool.map(lambda item: run_one(*item, args.out, Path(work)), selected.items())
        for name, code in zip(selected, codes):
            print(f"{name}: exit {code}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

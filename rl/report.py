"""`python -m rl.report RUN_DIR [RUN_DIR ...] [-o report.html]`: one self-contained HTML page of one run or more.

The curves of the runs overlaid (reward, each reward function, held-out evaluation, entropy, completion length,
KL, clip ratios, step time by phase, memory; for DPO/ORPO/KTO/SFT runs their loss, margins and accuracies), the
settings in which the runs differ, and the sample completions with their rewards, filtered by step or text. The
plots are PNG images inside the page and its one script is inline: it opens from disk with no network, and can
be mailed or attached as it is. A run writes RUN_DIR/report.html at its end (tracking.report); this command
writes one on demand, for a run in progress or for several runs side by side (seeds, variants).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import re
import sys
from pathlib import Path

from rl.plot import eval_keys, read_metrics, smooth, written_keys

MAX_SAMPLES = 2000  # rows of samples.jsonl per run in the page (the newest kept): a page, not a database


def _keys(pattern: str):
    return lambda written: sorted(k for k in written if re.fullmatch(pattern, k))


# (title, the metrics it draws from those the runs wrote); a panel with none of them is left out
PANELS = [
    ("reward (weighted sum)", _keys("reward")),
    ("reward per function (mean)", _keys(r"rewards/[^/]+/mean")),
    ("held-out evaluation", eval_keys),
    ("policy entropy", _keys("entropy")),
    ("completion length (tokens)", _keys(r"completions/(mean|mean_terminated)_length")),
    ("truncated completions (fraction)", _keys("completions/clipped_ratio")),
    ("KL to reference", _keys("kl")),
    ("clip ratios", _keys(r"clip_ratio/.+")),
    ("step time by phase (s)", _keys(r"timing/(rollout|rewards|train|eval|lora_sync)")),
    ("memory (GB)", _keys(r"memory/.+_gb")),
    ("loss", _keys("loss")),
    ("reward margin, chosen - rejected", _keys("rewards/margins")),
    ("preference accuracy", _keys("rewards/accuracies")),
    ("NLL of the chosen completion (ORPO)", _keys("nll_loss")),
    ("gradient norm", _keys("grad_norm")),
    ("learning rate", _keys("learning_rate")),
]
STYLES = ["-", "--", ":", "-."]


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode()


def plots(runs: dict[str, list[dict]], window: int = 5) -> list[tuple[str, str]]:
    """-> (title, base64 PNG) of every panel with data; one colour per run, one line style per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = written_keys(runs) - {"step"}
    out = []
    for title, select in PANELS:
        keys = select(written)
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for color, (name, rows) in enumerate(runs.items()):
            for style, key in zip(STYLES * len(keys), keys):
                points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
                if not points:
                    continue
                steps, values = zip(*points)
                label = " ".join(x for x in (name if len(runs) > 1 else "", key if len(keys) > 1 else "") if x)
                sparse = key.startswith("eval/") or len(values) == 1  # a few whole evaluations: points, unsmoothed
                if not sparse and len(keys) == 1:
                    ax.plot(steps, values, color=f"C{color}", alpha=0.25)
                ax.plot(steps, values if sparse else smooth(list(values), window), style, color=f"C{color}",
                        marker="o" if sparse else None, label=label or None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        out.append((title, _png(fig)))
        plt.close(fig)
    return out


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"grpo": {"beta": 0.0}} -> {"grpo.beta": 0.0}"""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_config(run_dir: Path) -> dict:
    import yaml

    path = run_dir / "config.yaml"
    return _flatten(yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def read_samples(run_dir: Path) -> list[dict]:
    path = run_dir / "samples.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()][-MAX_SAMPLES:]


def _names(run_dirs: list[Path]) -> list[str]:
    """Short names that tell the runs apart: the directory's name, or its path where two names are equal."""
    names = [d.name or str(d) for d in run_dirs]
    return [str(d) if names.count(n) > 1 else n for d, n in zip(run_dirs, names)]


def _summary_rows(names, runs, configs) -> str:
    rows = []
    for name in names:
        metrics, config = runs[name], configs[name]
        last = [r["reward"] for r in metrics[-10:] if isinstance(r.get("reward"), (int, float))]
        wall = sum(r.get("timing/step") or 0 for r in metrics)
        cells = [name, config.get("model.name", "?"), str(metrics[-1]["step"] if metrics else 0),
                 f"{sum(last) / len(last):.3f}" if last else "", f"{wall / 60:.1f}" if wall else ""]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return ("<table><tr><th>run</th><th>model</th><th>steps</th><th>reward, last 10 steps</th>"
            "<th>step time, minutes</th></tr>" + "".join(rows) + "</table>")


def _config_section(names, configs) -> str:
    if len(names) > 1:
        keys = sorted({k for c in configs.values() for k in c})
        differ = [k for k in keys if len({json.dumps(configs[n].get(k), sort_keys=True) for n in names}) > 1]
        head = "<tr><th>setting</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"
        body = "".join("<tr><td>" + html.escape(k) + "</td>" + "".join(
            f"<td>{html.escape(json.dumps(configs[n].get(k)))}</td>" for n in names) + "</tr>" for k in differ)
        diff = (f"<table id='config-diff'>{head}{body}</table>" if differ
                else "<p>The runs' settings are the same.</p>")
    else:
        diff = ""
    full = "".join(f"<details><summary>{html.escape(n)}: every setting</summary><pre>"
                   + html.escape("\n".join(f"{k}: {json.dumps(v)}" for k, v in configs[n].items()))
                   + "</pre></details>" for n in names)
    return f"<h2>Settings</h2>{diff}{full}"


def _samples_section(names, samples) -> str:
    rows = [(n, s) for n in names for s in samples[n]]
    if not rows:
        return "<h2>Sample completions</h2><p>No samples.jsonl (tracking.log_completions_every is 0).</p>"
    reward_keys = sorted({k for _, s in rows for k in s if k.startswith("reward/")})
    columns = (["run"] if len(names) > 1 else []) + ["step", "reward", *reward_keys, "prompt", "completion"]

    def cell(value) -> str:
        text = f"{value:.3f}" if isinstance(value, float) else "" if value is None else str(value)
        return f"<td>{html.escape(text)}</td>"

    body = "".join(
        f"<tr data-step='{int(s.get('step', 0))}'>" + "".join(
            cell(n if c == "run" else s.get(c)) for c in columns) + "</tr>" for n, s in rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    return (
        "<h2>Sample completions</h2><p><label>step <input id='step' placeholder='e.g. 10 or 10-40' size='12'>"
        "</label> <label>text <input id='text' placeholder='in prompt or completion' size='24'></label> "
        f"<span id='shown'>{len(rows)}</span> of {len(rows)} rows</p>"
        f"<table id='samples'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


SCRIPT = """
function filterRows() {
  const step = document.getElementById('step').value.trim(), text = document.getElementById('text').value.toLowerCase();
  const m = step.match(/^(\\d+)\\s*(?:-\\s*(\\d+))?$/);
  const lo = m ? +m[1] : -Infinity, hi = m ? +(m[2] || m[1]) : Infinity;
  let shown = 0;
  for (const row of document.querySelectorAll('#samples tbody tr')) {
    const s = +row.dataset.step;
    const ok = s >= lo && s <= hi && (!text || row.textContent.toLowerCase().includes(text));
    row.style.display = ok ? '' : 'none';
    shown += ok;
  }
  document.getElementById('shown').textContent = shown;
}
for (const id of ['step', 'text']) {
  const el = document.getElementById(id);
  if (el) el.addEventListener('input', filterRows);
}
"""
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.plots { display: flex; flex-wrap: wrap; gap: 8px; }
.plots img { width: 540px; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 3px 6px; vertical-align: top; text-align: left; }
#samples td:nth-last-child(-n+2) { white-space: pre-wrap; max-width: 40em; font-family: monospace; }
"""


def render(run_dirs: list[Path], window: int = 5) -> str:
    names = _names(run_dirs)
    runs = {n: read_metrics(d) for n, d in zip(names, run_dirs)}
    configs = {n: read_config(d) for n, d in zip(names, run_dirs)}
    samples = {n: read_samples(d) for n, d in zip(names, run_dirs)}
    images = "".join(f"<img alt='{html.escape(t)}' title='{html.escape(t)}' src='data:image/png;base64,{png}'>"
                     for t, png in plots(runs, window))
    title = "Tandem report: " + ", ".join(names)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{_summary_rows(names, runs, configs)}"
            f"<h2>Curves</h2><p>Faint: each step; solid: the moving average over {window} steps; points: held-out "
            f"evaluations.</p><div class='plots'>{images}</div>{_config_section(names, configs)}"
            f"{_samples_section(names, samples)}<script>{SCRIPT}</script></body></html>")


def write_report(run_dirs: list[Path], output: Path, window: int = 5) -> Path:
    output.write_text(render(run_dirs, window), encoding="utf-8")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rl.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (train.output_dir)")
    parser.add_argument("-o", "--output", type=Path, help="HTML path (default: RUN_DIR/report.html of the first)")
    parser.add_argument("--window", type=int, default=5, help="moving-average window in steps")
    args = parser.parse_args(argv)
    print(write_report(args.runs, args.output or args.runs[0] / "report.html", args.window))
    return 0


if __name__ == "__main__":
    sys.exit(main())

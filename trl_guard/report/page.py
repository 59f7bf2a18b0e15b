"""Draw the GRPO-Guard paper's diagnostics for one or more runs from what the trainer logged.

Each run directory holds `log_history.json` (written by `save_model`) or a `checkpoint-*/trainer_state.json`, and
usually `guard_config.json` (the run's settings: its loss type and clip range epsilon). The report compares runs side
by side:

- gold against proxy at every evaluation, and a short verdict in words (`gold_vs_proxy.png`);
- rewards, and evaluation proxy and gold scores, against optimizer step (`rewards.png`, the paper's Fig. 1 and 4);
- per sampling step, the log-ratio each run's loss clips and plain `log r` (`timesteps.png`, Fig. 2);
- per sampling step, the fractions of ratios above `1 + epsilon` and below `1 - epsilon` (`clip_fractions.png`,
  Fig. 12);
- per sampling step, gradient norms and the loss weight (`grad_norms.png`, Fig. 3);
- every evaluation's samples of each run (the same prompts and seeds at several steps, the paper's Fig. 8), captioned
  with their prompts when those are given.

It writes the PNGs, the numbers behind them (`metrics.json`, `timesteps.csv`), the verdict (`verdict.txt`) and a
self-contained `index.html` that leads with it.

This module puts the page together; reading the runs is in `runs.py`, the figures in `figures.py` and the verdict in
`verdict.py`.
"""

from __future__ import annotations

import base64
import csv
import glob
import html
import io
import json
import math
import os
from collections.abc import Sequence

from .. import metrics
from ..metrics import Stat
from .figures import STYLE, _clip_figure, _grad_norm_figure, _log_ratio_figure, _rewards_figure
from .runs import (
    ReportInputError,
    _eval_scores,
    _gold_words,
    _grid_step,
    _reward_order,
    load_log_history,
    load_run_config,
    metric_title,
    run_labels,
    series,
    timestep_table,
)
from .verdict import _verdict

# An evaluation grid holds at most this many samples (the trainer's `_evaluate_dataset`), tiled as `make_grid` does.
GRID_SAMPLES = 16
# Samples on the page are at least this many CSS pixels wide: a 32 px toy sample is drawn 3x, pixel for pixel.
SAMPLE_MIN_WIDTH = 96
SAMPLE_MAX_WIDTH = 192


# ---- the report -------------------------------------------------------------------------------------------------


def build_report(
    run_dirs: Sequence[str],
    output_dir: str,
    labels: Sequence[str] | None = None,
    eval_prompts: Sequence[str] | None = None,
) -> str:
    """Write the report for `run_dirs` into `output_dir`; returns the path of `index.html`.

    Args:
        run_dirs: Each run's `output_dir`.
        output_dir: Where the page, its PNGs and the numbers go.
        labels: One distinct name per run, in order; by default each folder's name (with its parents when two
            folders share a name).
        eval_prompts: The evaluation prompts in the eval dataset's order, to caption each sample of the
            evaluation grids (a grid holds the first 16, tiled row by row, in a one-process run).

    Raises:
        FileNotFoundError: a run folder, or its logs, is missing.
        ReportInputError: the labels do not match the runs, or a run's logs are not what the trainer writes.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import to_hex
    except ImportError as error:
        raise ImportError('The report needs matplotlib: pip install "trl-guard[report]"') from error

    run_dirs = list(run_dirs)
    if not run_dirs:
        raise ReportInputError("No run folder given: pass at least one trl_guard output_dir.")
    labels = run_labels(run_dirs, labels)
    if eval_prompts is not None and not list(eval_prompts):
        raise ReportInputError("eval_prompts is empty: give the evaluation prompts in order, or leave it out.")
    histories = {label: load_log_history(d) for label, d in zip(labels, run_dirs)}
    configs = {label: load_run_config(d) for label, d in zip(labels, run_dirs)}
    tables = {label: timestep_table(h) for label, h in histories.items()}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # hex, as the page's CSS needs them too (a cycle may hold RGB tuples)
    colours = {label: to_hex(palette[i % len(palette)]) for i, label in enumerate(labels)}
    os.makedirs(output_dir, exist_ok=True)
    sections: list[dict] = []

    summary = {}
    for label, table in tables.items():
        norms = list(table.get(Stat.GRAD_NORM, {}).values())
        summary[label] = {
            "run_dir": os.path.abspath(run_dirs[labels.index(label)]),
            "given_as": run_dirs[labels.index(label)],
            "loss_type": configs[label].get("loss_type"),
            "epsilon": configs[label].get("epsilon"),
            "final": {},
            "grad_norm_max_over_min": max(norms) / min(norms) if norms and min(norms) > 0 else None,
            "timesteps": table,
        }

    with plt.rc_context(STYLE):
        # The answer first: gold against proxy for every run that evaluated both.
        verdict, verdict_figure = _verdict(histories, colours, output_dir, plt)
        with open(os.path.join(output_dir, "verdict.txt"), "w") as f:
            f.write(verdict)
        if verdict_figure:
            sections.append(
                {
                    "title": "Gold against proxy",
                    "text": "Each point is one evaluation, on the same prompts and seeds; lines join them in step "
                    "order. Moving right means training raised the proxy it optimises; a run whose line drops is "
                    "buying proxy with gold. At the same proxy, higher is better.",
                    "figure": verdict_figure,
                }
            )

        # Series that never change (in any run) say nothing and are left out.
        reward_keys = sorted(
            {
                k
                for h in histories.values()
                for e in h
                for k in e
                if k in ("reward", metrics.EVAL_KL)
                or k.startswith((metrics.REWARDS, metrics.EVAL_REWARD, metrics.EVAL_REWARDS, metrics.EVAL_GOLD))
                and not k.endswith("/std")
            },
            key=_reward_order,
        )
        for label in labels:
            summary[label]["final"] = {
                k: series(histories[label], k)[1][-1] for k in reward_keys if series(histories[label], k)[1]
            }
        varying, seen = [], set()
        for key in reward_keys:  # with one reward function, `rewards/<name>` repeats `reward`: draw it once
            curves = tuple(tuple(series(h, key)[1]) for h in histories.values())
            if len({v for curve in curves for v in curve}) > 1 and curves not in seen:
                varying.append(key)
                seen.add(curves)
        if varying:
            sections.append(
                {
                    "title": "Rewards and evaluation scores over training",
                    "text": "Training rewards are means over each sampling round; evaluation scores come from fixed "
                    "prompts and seeds. A proxy that keeps rising while a gold score falls is over-optimisation. "
                    "Series that never changed are left out.",
                    "figure": _rewards_figure(
                        plt, histories, colours, varying, os.path.join(output_dir, "rewards.png")
                    ),
                }
            )

        if any(Stat.LOG_RATIO_MEAN in t or Stat.RAW_LOG_RATIO_MEAN in t for t in tables.values()):
            sections.append(
                {
                    "title": "Log-ratio per sampling step (paper Fig. 2)",
                    "text": "log r = log p_new − log p_old of each sample's step, averaged over the run; sampling "
                    "step 0 is the noisiest. Each loss clips its own form of it: Flow-GRPO clips log r, GRPO-Guard "
                    "a normalised form about 100x smaller, hence their different ε. One panel per run shows the "
                    "form its loss clips (line: mean; band: ± one standard deviation over samples) on a "
                    "symmetric-log scale, logarithmic but for a linear stretch around 0 no wider than the clip range "
                    "±ε (dashed): steps orders of magnitude apart are all visible, and so is where each lands "
                    "against ε. A mean beyond −ε is a shifted ratio: clipping then acts on one side only. The wide "
                    "panel puts plain log r of every run on one scale.",
                    "figure": _log_ratio_figure(
                        plt, tables, configs, colours, os.path.join(output_dir, "timesteps.png")
                    ),
                }
            )
        if any(Stat.CLIP_FRAC_HIGH in t or Stat.CLIP_FRAC_LOW in t for t in tables.values()):
            sections.append(
                {
                    "title": "Clipping per sampling step (paper Fig. 12)",
                    "text": "The share of samples whose ratio r fell outside the clip range [1 − ε, 1 + ε], with each "
                    "run's ε from its guard_config.json. Similar shares above and below mean clipping restrains the "
                    "policy both ways; a large share on one side only means it is one-sided.",
                    "figure": _clip_figure(
                        plt, tables, configs, colours, os.path.join(output_dir, "clip_fractions.png")
                    ),
                }
            )
        if any(Stat.GRAD_NORM in t for t in tables.values()):
            sections.append(
                {
                    "title": "Gradient norm per sampling step (paper Fig. 3)",
                    "text": "The norm of the gradient each sampling step contributes, averaged over the logged "
                    "steps. Norms far apart mean some steps dominate training; GRPO-Guard's per-step loss weight "
                    "(right, 1 for Flow-GRPO) is there to even them out.",
                    "figure": _grad_norm_figure(
                        plt, tables, summary, colours, os.path.join(output_dir, "grad_norms.png")
                    ),
                }
            )

    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(output_dir, "timesteps.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        stats = sorted({s for t in tables.values() for s in t})
        writer.writerow(["run", "timestep", *stats])
        for label, table in tables.items():
            for step in sorted({t for s in table.values() for t in s}):
                writer.writerow([label, step, *[table.get(s, {}).get(step, "") for s in stats]])

    grids = {
        label: {_grid_step(image): image for image in glob.glob(os.path.join(run_dir, "eval_images", "*.png"))}
        for label, run_dir in zip(labels, run_dirs)
    }
    scores = {label: _eval_scores(history) for label, history in histories.items()}
    return _write_html(output_dir, verdict, sections, grids, scores, summary, colours, eval_prompts)


# ---- the page ---------------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1400px;margin:auto;padding:0 16px 48px;
  color:#1d2330;line-height:1.45}
h1{margin-bottom:.2em}
h2{margin-top:1.8em;border-bottom:1px solid #dde2ea;padding-bottom:.2em}
p.lead{color:#4a5568;max-width:75em}
figure{margin:0}
figure.plot img{display:block;width:100%;height:auto}
figure.plot figcaption{color:#4a5568;font-size:.9em;margin-top:.3em}
table{border-collapse:collapse}
td,th{padding:4px 10px;border-bottom:1px solid #dde2ea;vertical-align:top;text-align:left}
th{font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{background:#f3f6fa;border-left:4px solid #3a6ea5;padding:8px 16px;font-size:1.05em}
.swatch{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.4em;vertical-align:baseline}
.evaluation h3{margin:1.2em 0 .2em}
.evaluation .scores{color:#4a5568;margin:0 0 .6em;padding:0;list-style:none}
.grids{display:flex;flex-wrap:wrap;gap:16px}
.grids figure img{display:block;max-width:100%;height:auto}
.samples{display:grid;gap:14px 12px}
.sample{background:#f7f8fa;border:1px solid #e2e6ed;border-radius:6px;padding:6px}
.sample .pair{display:flex;gap:4px;justify-content:center}
.sample .pair figure{text-align:center;font-size:.75em;color:#4a5568}
.sample .pair img{display:block}
.sample figcaption.prompt{font-size:.85em;margin-top:4px;overflow-wrap:anywhere}
img.pixels{image-rendering:pixelated}
details{margin-top:1em}
summary{cursor:pointer;font-weight:600}
"""


def _embed(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def _embed_image(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _display_width(natural: int, smallest: int, largest: int) -> tuple[int, bool]:
    """CSS width for an image `natural` px wide: small images scaled up by a whole factor (sharp pixels) to at least
    `smallest`, large ones down to at most `largest`. Also whether it was scaled up."""
    if natural < smallest:
        return natural * math.ceil(smallest / natural), True
    return min(natural, largest), False


def _tiles(path: str, count: int) -> list | None:
    """The `count` samples of an evaluation grid, cut apart as `make_grid` tiled them (ceil(sqrt(n)) per row), or
    None when the grid's size does not fit that layout (videos are one strip per row)."""
    from PIL import Image

    if os.path.exists(path[: -len(".png")] + ".gif"):  # a video grid: one frame strip per row, not square tiles
        return None
    with Image.open(path) as grid:
        grid = grid.convert("RGB")
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    if grid.width % columns or grid.height % rows:
        return None
    width, height = grid.width // columns, grid.height // rows
    return [
        grid.crop(
            ((i % columns) * width, (i // columns) * height, (i % columns + 1) * width, (i // columns + 1) * height)
        )
        for i in range(count)
    ]


def _scores_text(label: str, values: dict[str, float] | None) -> str:
    if not values:
        return f"{label}: no scores logged"
    words = [f"proxy {values[metrics.EVAL_REWARD]:.3f}"] if metrics.EVAL_REWARD in values else []
    words += [f"{_gold_words(k)} {v:.3f}" for k, v in values.items() if k.startswith(metrics.EVAL_GOLD)]
    return f"{label}: " + ", ".join(words)


def _evaluation_html(step, grids, scores, colours, prompts) -> list[str]:
    labels = [label for label in grids if step in grids[label]]
    parts = [
        "<section class='evaluation'>",
        f"<h3>Evaluation at optimizer step {step}{' (before training)' if step == 0 else ''}</h3>",
        "<ul class='scores'>",
        *[
            f"<li><span class='swatch' style='background:{colours[lb]}'></span>"
            f"{html.escape(_scores_text(lb, scores[lb].get(step)))}</li>"
            for lb in labels
        ],
        "</ul>",
    ]
    tiles = None
    if prompts:
        count = min(GRID_SAMPLES, len(prompts))
        tiles = {label: _tiles(grids[label][step], count) for label in labels}
        if any(t is None for t in tiles.values()):
            tiles = None
    if tiles:
        # one card per prompt: the runs' samples side by side (same prompt, same seed) above the prompt
        sample = next(iter(tiles.values()))[0]
        width, upscaled = _display_width(sample.width, SAMPLE_MIN_WIDTH, SAMPLE_MAX_WIDTH)
        # as many cards a row as fit, stretched to share the row: no ragged gap at the right edge
        card = len(labels) * (width + 4) + 14
        parts.append(f"<div class='samples' style='grid-template-columns:repeat(auto-fill,minmax({card}px,1fr))'>")
        for index in range(len(next(iter(tiles.values())))):
            parts.append("<figure class='sample'><div class='pair'>")
            for label in labels:
                parts.append(
                    f"<figure><img class='{'pixels' if upscaled else ''}' width='{width}' "
                    f"src='{_embed_image(tiles[label][index])}' "
                    f"alt='{html.escape(label)}: {html.escape(prompts[index])}'>"
                    + (  # with one run, its name under every sample says nothing
                        f"<span class='swatch' style='background:{colours[label]}'></span>{html.escape(label)}"
                        if len(labels) > 1
                        else ""
                    )
                    + "</figure>"
                )
            parts.append(
                f"</div><figcaption class='prompt' style='max-width:{len(labels) * (width + 4)}px'>"
                f"{html.escape(prompts[index])}</figcaption></figure>"
            )
        parts.append("</div>")
    else:
        from PIL import Image

        parts.append("<div class='grids'>")
        for label in labels:
            with Image.open(grids[label][step]) as image:
                natural = image.width
            # two grids side by side fill a 1,400 px page; small grids are scaled up by whole factors to get there
            width, upscaled = _display_width(natural, 384, 660)
            parts.append(
                f"<figure><img class='{'pixels' if upscaled else ''}' width='{width}' "
                f"src='{_embed(grids[label][step])}' alt='evaluation samples of {html.escape(label)} at step {step}'>"
                f"<figcaption><span class='swatch' style='background:{colours[label]}'></span>"
                f"{html.escape(label)}, step {step}</figcaption></figure>"
            )
        parts.append("</div>")
        if prompts:  # the grid could not be cut into samples: name them in the grid's order instead
            parts.append("<p class='scores'>The samples, row by row:</p><ol class='prompts'>")
            parts += [f"<li>{html.escape(prompt)}</li>" for prompt in prompts[:GRID_SAMPLES]]
            parts.append("</ol>")
    parts.append("</section>")
    return parts


def _table_row(name: str, cells: list[str]) -> str:
    return (
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td class='num'>{html.escape(c)}</td>" for c in cells)
        + "</tr>"
    )


def _write_html(output_dir, verdict, sections, grids, scores, summary, colours, prompts) -> str:
    labels = list(summary)
    title = "trl_guard report: " + " vs ".join(labels)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p class='lead'>What each run logged, drawn as in the GRPO-Guard paper: whether training bought its proxy "
        "reward with gold score, then the per-sampling-step diagnostics that explain why (the log-ratio, how often "
        "it was clipped, and each step's gradient), then the evaluation samples themselves.</p>",
        "<h2>Runs</h2>",
        "<table><tr><th>run</th><th>loss type</th><th>clip range ε</th><th>folder</th></tr>",
    ]
    for label, data in summary.items():
        epsilon = "not recorded" if data["epsilon"] is None else f"{data['epsilon']:g}"
        parts.append(
            f"<tr><td><span class='swatch' style='background:{colours[label]}'></span>{html.escape(label)}</td>"
            f"<td>{html.escape(str(data['loss_type'] or 'not recorded'))}</td><td>{epsilon}</td>"
            f"<td><code>{html.escape(data['given_as'])}</code></td></tr>"
        )
    parts.append("</table>")
    if verdict:
        parts.append("<h2>Verdict</h2><div class='verdict'>")
        parts += [f"<p>{html.escape(line)}</p>" for line in verdict.splitlines()]
        parts.append("</div>")
    for section in sections:
        alt, path = section["figure"]
        parts += [
            f"<h2>{html.escape(section['title'])}</h2>",
            f"<figure class='plot'><img src='{_embed(path)}' alt='{html.escape(alt)}'>",
            f"<figcaption>{html.escape(section['text'])}</figcaption></figure>",
        ]
    if any(grids.values()):
        steps = sorted({step for by_step in grids.values() for step in by_step})
        parts.append("<h2>Evaluation samples</h2>")
        parts.append(
            "<p class='lead'>The same prompts and seeds at every evaluation, so each run's samples can be compared "
            "with each other and with the base model's at the first evaluation."
            + (
                ""
                if prompts
                else " Each grid holds the first samples of the evaluation set, row by row; pass the evaluation "
                "prompts (--eval-prompts) to see each sample with its prompt."
            )
            + "</p>"
        )
        shown = steps if len(steps) <= 2 else [steps[0], steps[-1]]
        for step in shown:
            parts += _evaluation_html(step, grids, scores, colours, prompts)
        hidden = [step for step in steps if step not in shown]
        if hidden:
            parts.append(f"<details><summary>The {len(hidden)} evaluations in between</summary>")
            for step in hidden:
                parts += _evaluation_html(step, grids, scores, colours, prompts)
            parts.append("</details>")
    keys = sorted({k for data in summary.values() for k in data["final"]}, key=_reward_order)
    parts.append("<h2>Last logged values</h2><table><tr><th>quantity</th>")
    parts += [f"<th>{html.escape(label)}</th>" for label in labels]
    parts.append("</tr>")
    for key in keys:
        values = [summary[label]["final"].get(key) for label in labels]
        parts.append(_table_row(metric_title(key), ["" if v is None else f"{v:.4g}" for v in values]))
    spreads = [summary[label]["grad_norm_max_over_min"] for label in labels]
    parts.append(
        _table_row(
            "Gradient norm, largest over smallest sampling step", ["" if v is None else f"{v:.1f}x" for v in spreads]
        )
    )
    parts.append("</table>")
    parts.append(
        "<p class='lead'>The numbers behind the figures are in metrics.json and timesteps.csv next to this page.</p>"
    )
    parts.append("</body></html>")
    path = os.path.join(output_dir, "index.html")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path

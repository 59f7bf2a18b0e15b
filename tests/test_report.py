"""`trl-guard report` draws the paper's diagnostics from what runs logged, for one run or several side by side."""

import base64
import copy
import html
import io
import json
import re

import pytest
from conftest import blueness
from datasets import Dataset
from helpers import make_trainer

from trl_guard.cli import main


def test_report_compares_runs(_base_pipeline, prompts, tmp_path, capsys):
    runs = []
    for loss_type in ("flow_grpo", "grpo_guard"):
        run = tmp_path / loss_type
        trainer = make_trainer(
            copy.deepcopy(_base_pipeline),
            [blueness],
            prompts,
            run,
            loss_type=loss_type,
            max_steps=2,
            eval_strategy="steps",
            eval_steps=2,
            eval_num_inference_steps=3,
            eval_dataset=Dataset.from_dict({"prompt": ["a red square", "a blue circle"]}),
            gold_reward_funcs=["jpeg_compressibility"],
        )
        trainer.train()
        trainer.save_model()
        runs.append(str(run))

    main(["report", *runs, "--output", str(tmp_path / "report")])
    index = tmp_path / "report" / "index.html"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(index)  # training printed its logs first
    page = index.read_text()
    assert page.count("data:image/png;base64,") >= 4  # rewards, timesteps and one image grid per run
    for name in ("rewards.png", "timesteps.png", "metrics.json", "timesteps.csv"):
        assert (tmp_path / "report" / name).exists(), name
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(metrics) == {"flow_grpo", "grpo_guard"}
    for run in metrics.values():
        assert set(run["timesteps"]["grad_norm"]) == {"0", "1", "2", "3"}  # JSON keys
        assert run["grad_norm_max_over_min"] >= 1.0
        assert "eval_gold/jpeg_compressibility" in run["final"]
    rows = (tmp_path / "report" / "timesteps.csv").read_text().splitlines()
    assert rows[0].startswith("run,timestep,") and len(rows) == 1 + 2 * 4


def test_report_on_a_folder_without_logs_says_what_it_needs(tmp_path):
    with pytest.raises(SystemExit, match="log_history.json"):
        main(["report", str(tmp_path)])


# ---- fast tests on run folders written by hand, shaped like what the trainer saves ------------------------------

STEPS = 4  # sampling steps per rollout


def _write_run(run, loss_type="grpo_guard", epsilon=2e-6, scale=1e-4, config=True, grid=True):
    """A run folder as `save_model` leaves it: log_history.json, guard_config.json and eval_images/."""
    import numpy as np
    from PIL import Image

    run.mkdir(parents=True)
    history = []
    for step in (2, 4):
        entry = {"step": step, "reward": 0.1 * step, "rewards/blueness/mean": 0.1 * step}
        for t in range(STEPS):
            entry[f"timestep/{t:02d}/log_ratio_mean"] = -scale * 10**t
            entry[f"timestep/{t:02d}/log_ratio_std"] = scale
            entry[f"timestep/{t:02d}/raw_log_ratio_mean"] = -1e-3 * 10**t
            entry[f"timestep/{t:02d}/clip_frac_high"] = 0.1
            entry[f"timestep/{t:02d}/clip_frac_low"] = 0.3
            entry[f"timestep/{t:02d}/grad_norm"] = 1.0 + t
            entry[f"timestep/{t:02d}/weight"] = 1.0
        history.append(entry)
        history.append({"step": step, "eval_reward": 0.1 * step, "eval_gold/caption_fidelity": 0.9 - 0.1 * step})
    (run / "log_history.json").write_text(json.dumps(history))
    if config:
        (run / "guard_config.json").write_text(json.dumps({"loss_type": loss_type, "epsilon": epsilon}))
    if grid:
        (run / "eval_images").mkdir()
        for step in (2, 4):  # four 8 px samples tiled 2 x 2, as make_grid does
            pixels = np.zeros((16, 16, 3), dtype=np.uint8)
            pixels[:8, 8:] = 255
            Image.fromarray(pixels).save(run / "eval_images" / f"step-{step:06d}.png")
    return str(run)


def test_runs_whose_folders_share_a_name_are_all_reported(tmp_path, capsys):
    first = _write_run(tmp_path / "seed0" / "grpo_guard")
    second = _write_run(tmp_path / "seed1" / "grpo_guard", scale=2e-4)
    main(["report", first, second, "--output", str(tmp_path / "report")])
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(metrics) == {"seed0/grpo_guard", "seed1/grpo_guard"}
    assert metrics["seed1/grpo_guard"]["timesteps"]["log_ratio_mean"]["0"] == -2e-4  # each label keeps its own run
    rows = (tmp_path / "report" / "timesteps.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * STEPS
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("seed0/grpo_guard") == page.count("seed1/grpo_guard") > 0


def test_run_labels_are_distinct_however_folders_collide(tmp_path):
    from trl_guard.report.runs import run_labels

    dirs = [tmp_path / "x" / "A" / "run", tmp_path / "y" / "A" / "run", tmp_path / "B" / "run", tmp_path / "solo"]
    assert run_labels([str(d) for d in dirs]) == ["x/A/run", "y/A/run", "B/run", "solo"]
    assert run_labels([str(tmp_path / "run"), str(tmp_path / "run") + "/"]) == ["run", "run (2)"]


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (["only"], "--labels gives 1 name for 2 run folders"),
        (["a", "b", "c"], "--labels gives 3 names for 2 run folders"),
        ([], "--labels gives 0 names for 2 run folders"),
        (["same", "same"], "--labels names two runs 'same'"),
    ],
)
def test_labels_that_do_not_name_each_run_once_are_refused(tmp_path, labels, expected):
    runs = [_write_run(tmp_path / "a"), _write_run(tmp_path / "b")]
    with pytest.raises(SystemExit, match=expected):
        main(["report", *runs, "--output", str(tmp_path / "report"), "--labels", *labels])
    assert not (tmp_path / "report" / "index.html").exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({}, r"holds an empty object \{\}; the report needs a non-empty list"),
        ([], r"holds an empty list \[\]; the report needs a non-empty list"),
        ({"step": 2}, "holds an object; the report needs a non-empty list"),
        ([{"step": 2}, 3], "entry 1 is an int, not an object"),
        ([{"loss": 0.1}], "no entry has a 'step'"),
    ],
)
def test_a_history_that_is_not_a_list_of_logged_entries_is_refused(tmp_path, content, expected):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log_history.json").write_text(json.dumps(content))
    with pytest.raises(SystemExit, match="log_history.json") as error:
        main(["report", str(run), "--output", str(tmp_path / "report")])
    assert re.search(expected, str(error.value)), str(error.value)


def test_a_checkpoint_state_without_entries_is_refused_naming_it(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": []}))
    with pytest.raises(SystemExit, match=r"checkpoint-4/trainer_state.json \(its 'log_history'\) holds an empty list"):
        main(["report", str(tmp_path / "run")])
    (checkpoint / "trainer_state.json").write_text("{}")
    with pytest.raises(SystemExit, match="trainer_state.json holds an empty object .* without a 'log_history'"):
        main(["report", str(tmp_path / "run")])


def _page_parts(page):
    """(CSS, h2 headings, alt text of each figure image) of a report page."""
    css = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    alts = re.findall(r"<figure class='plot'><img src='data:image/png;base64,[^']+' alt='([^']*)'>", page)
    return css, headings, [html.unescape(alt) for alt in alts]


def test_the_page_reads_in_words_at_page_width_and_names_each_epsilon(tmp_path):
    flow = _write_run(tmp_path / "flow_grpo", loss_type="flow_grpo", epsilon=1e-4, scale=1e-3)
    guard = _write_run(tmp_path / "grpo_guard")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na green star\na white cross\n")
    main(["report", flow, guard, "--output", str(tmp_path / "report"), "--eval-prompts", str(prompts)])
    page = (tmp_path / "report" / "index.html").read_text()
    css, headings, alts = _page_parts(page)

    # figures scale to the page: full width of a page at most 1,400 px wide
    assert re.search(r"figure\.plot img\{[^}]*width:100%", css) and "max-width:1400px" in css
    assert "<meta name='viewport'" in page
    assert len(alts) == 5  # gold against proxy, rewards, log-ratio, clipping, gradient norms
    for file in ("gold_vs_proxy.png", "rewards.png", "timesteps.png", "clip_fractions.png", "grad_norms.png"):
        assert (tmp_path / "report" / file).exists(), file

    # headings, panel titles and axes in words: no logged key shows
    text = " ".join(headings + alts)
    for key in ("log_ratio", "clip_frac", "grad_norm", "eval_gold", "eval_reward", "rewards/", "timestep/"):
        assert key not in text, key
    assert "Gold score: caption fidelity (never trained on) (score against optimizer step)" in alts[1]
    assert "flow_grpo: mean log-ratio its loss clips (flow_grpo loss, ε = 0.0001; dashed: ±ε)" in alts[2]
    assert "(log-ratio (symmetric log scale) against sampling step (0 = noisiest))" in alts[2]
    assert "grpo_guard: mean log-ratio its loss clips (grpo_guard loss, ε = 2e-06; dashed: ±ε)" in alts[2]
    # the clip-fraction panels name each run's epsilon
    assert "Share of samples with ratio r above 1 + ε" in alts[3]
    assert "lines: flow_grpo (ε = 0.0001), grpo_guard (ε = 2e-06)" in alts[3]

    # each run keeps its figures' colour on the page, as CSS can draw it
    swatches = re.findall(r"class='swatch' style='background:([^']*)'", page)
    assert swatches and all(re.fullmatch("#[0-9a-f]{6}", colour) for colour in swatches), set(swatches)
    assert len(set(swatches)) == 2

    # every run in the runs table, the last-values table and each evaluation, which captions each sample
    for label, epsilon in (("flow_grpo", "0.0001"), ("grpo_guard", "2e-06")):
        assert re.search(rf"{label}</td><td>{label}</td><td>{epsilon}</td>", page), label
        assert f"<th>{label}</th>" in page
    assert page.count("<figcaption class='prompt'") == 2 * 4  # two evaluations of four samples
    for prompt in ("a red square", "a blue circle", "a green star", "a white cross"):
        assert page.count(f">{prompt}</figcaption>") == 2, prompt
    samples = re.findall(r"<img class='pixels' width='(\d+)' src='data:image/png;base64,([^']+)'", page)
    assert len(samples) == 2 * 2 * 4  # two evaluations, two runs, four samples each
    assert {int(width) for width, _ in samples} == {96}  # 8 px samples drawn 12x, pixel for pixel
    from PIL import Image

    # cards go prompt by prompt, runs side by side: the grid was cut apart row by row into its samples
    first, second = (Image.open(io.BytesIO(base64.b64decode(data))) for _, data in (samples[0], samples[2]))
    assert first.size == second.size == (8, 8)
    assert first.getpixel((0, 0)) == (0, 0, 0) and second.getpixel((0, 0)) == (255, 255, 255)


def test_a_run_without_its_config_says_epsilon_was_not_recorded(tmp_path):
    run = _write_run(tmp_path / "run", config=False, grid=False)
    main(["report", run, "--output", str(tmp_path / "report")])
    page = (tmp_path / "report" / "index.html").read_text()
    _, _, alts = _page_parts(page)
    assert "ε not recorded (no guard_config.json)" in " ".join(alts)
    assert "<td>not recorded</td><td>not recorded</td>" in page
    assert "Evaluation samples" not in page


def test_video_grids_are_shown_whole_with_their_prompts_in_order(tmp_path):
    """A video family's grid is one frame strip per row: it must not be cut into square tiles."""
    from PIL import Image

    run = _write_run(tmp_path / "wan")
    for png in (tmp_path / "wan" / "eval_images").glob("*.png"):
        Image.open(png).save(png.with_suffix(".gif"))  # what log_image_grid writes next to a video grid
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na bird\na fish\n")
    main(["report", run, "--output", str(tmp_path / "report"), "--eval-prompts", str(prompts)])
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<figcaption class='prompt'" not in page
    assert page.count("alt='evaluation samples of wan at step") == 2
    assert len(re.findall(r"<ol class='prompts'>\s*<li>a cat</li>\s*<li>a dog</li>\s*<li>a bird</li>", page)) == 2


def test_symlog_scale_reaches_down_to_the_smallest_step_but_not_to_near_zero_noise():
    from trl_guard.report.figures import _symlog_threshold

    assert _symlog_threshold([-3e-6, -2e-2, 0.0]) == pytest.approx(1e-6)  # early steps on the logarithmic part
    assert _symlog_threshold([1e-15, -2e-2]) == pytest.approx(1e-8)  # at most six decades below the largest
    assert _symlog_threshold([0.0, 0.0]) is None  # nothing to scale: a linear axis

"""`trl-guard report` draws the paper's diagnostics from what runs logged, for one run or several side by side."""

import copy
import json

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
    import pytest

    with pytest.raises(FileNotFoundError, match="log_history.json"):
        main(["report", str(tmp_path)])

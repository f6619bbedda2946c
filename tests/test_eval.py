"""eval.py: metrics on hand-made cases with known answers."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as evaluation


def test_avg_and_pass_at_k_closed_form():
    correct = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert evaluation.avg_at_k(correct) == pytest.approx(5 / 12)
    assert evaluation.pass_at_k(correct) == pytest.approx(2 / 3)


@pytest.fixture
def two_questions(tmp_path):
    Image.new("RGB", (56, 56), (200, 10, 10)).save(tmp_path / "a.png")
    rows = [{"problem": "How many?", "answer": "3", "images": ["a.png"]},
            {"problem": "Which colour?", "answer": "red", "images": ["a.png"]}]
    path = data.write_jsonl(rows, tmp_path / "q.jsonl")
    return data.load_jsonl(path)


def test_evaluate_with_a_stub_policy_gives_exact_metrics(two_questions, monkeypatch):
    """A stub whose k = 4 completions are fixed: question 1 right 1/4 times (always formatted),
    question 2 right 2/4 (one unformatted); with the image masked, nothing is right."""
    fixed = {
        "How many?": ["<think>x</think> \\boxed{3}", "<think>x</think> \\boxed{4}",
                      "<think>x</think> \\boxed{2}", "<think>x</think> \\boxed{5}"],
        "Which colour?": ["<think>x</think> \\boxed{red}", "\\boxed{Red}",
                          "<think>x</think> \\boxed{blue}", "no answer"],
    }

    def fake_generate(policy, processor, prompts, *, num_samples, max_new_tokens, temperature,
                      top_p):
        texts, masked = [], []
        for p in prompts:
            question = p["messages"][0]["content"][-1]["text"].split("\n")[0]
            blind = np.asarray(p["images"][0]).max() == 0      # fully masked picture
            texts += ["\\boxed{0}"] * num_samples if blind else fixed[question]
        mask = torch.ones(len(texts), 5)
        return SimpleNamespace(texts=texts, completion_mask=mask)

    monkeypatch.setattr(evaluation.qwen, "generate_rollouts", fake_generate)
    out = evaluation.evaluate(None, None, two_questions, samples=4, mask_ratios=(1.0,),
                              kl_ratio=None)
    assert out["accuracy"] == pytest.approx(3 / 8)
    assert out["pass@4"] == pytest.approx(1.0)
    assert out["format"] == pytest.approx(6 / 8)
    assert out["accuracy_mask1.0"] == 0.0
    assert out["response_length"] == 5.0
    assert out["n"] == 2 and out["samples"] == 4


def test_eval_cli_writes_every_field_for_a_real_tiny_checkpoint(two_questions, tmp_path):
    """Smoke test of the command line on a saved tiny model: the JSON has every field."""
    import model as qwen
    policy, processor = qwen.build_tiny_model(seed=0, size="tiny")
    policy.save_pretrained(tmp_path / "ckpt"); processor.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "res.json"
    evaluation.main(["--model", str(tmp_path / "ckpt"), "--data", str(tmp_path / "q.jsonl"),
                     "--samples", "2", "--max-new-tokens", "4", "--out", str(out)])
    res = json.loads(out.read_text())[str(tmp_path / "q.jsonl")][str(tmp_path / "ckpt")]
    for key in ("n", "samples", "accuracy", "pass@2", "format", "response_length",
                "accuracy_mask0.6", "accuracy_mask1.0", "kl_prcp"):
        assert key in res, key
    assert res["kl_prcp"] >= 0.0


def test_side_by_side_columns_are_told_apart_by_their_shortest_distinct_tail():
    models = ["runs/exp-grpo-seed0/checkpoint-000150", "runs/exp-papo-g-seed0/checkpoint-000150",
              "Qwen/Qwen2.5-VL-3B-Instruct"]
    assert evaluation.column_names(models) == [
        "exp-grpo-seed0/checkpoint-000150", "exp-papo-g-seed0/checkpoint-000150",
        "Qwen/Qwen2.5-VL-3B-Instruct"]
    assert evaluation.column_names(["a/x", "b/y"]) == ["x", "y"]
    metrics = {"accuracy": 0.5, "n": 2}
    table = evaluation.format_table({"d.jsonl": {m: metrics for m in models}}, models)
    header = table.splitlines()[2]
    assert "exp-grpo-seed0/checkpoint-000150" in header and "exp-papo-g-seed0/checkpoint-000150" in header


def test_mean_of_seed_files_gives_mean_and_sample_std_column_by_column(tmp_path, capsys):
    files = []
    for seed, (a, b) in enumerate([(0.2, 0.5), (0.4, 0.5), (0.6, 0.8)]):
        result = {"d.jsonl": {f"runs/grpo-seed{seed}/ckpt": {"n": 4, "accuracy": a},
                              f"runs/papo-seed{seed}/ckpt": {"n": 4, "accuracy": b}}}
        files.append(str(tmp_path / f"seed{seed}.json"))
        (tmp_path / f"seed{seed}.json").write_text(json.dumps(result))
    evaluation.main(["--mean-of", *files])
    out = capsys.readouterr().out
    header, row = [line for line in out.splitlines() if "seed*" in line or "accuracy" in line]
    assert header.split() == ["grpo-seed*/ckpt", "papo-seed*/ckpt"]
    # grpo: mean 0.4, std sqrt(((-.2)^2 + 0 + .2^2) / 2) = 0.2; papo: mean 0.6, std 0.1732
    assert row.split() == ["accuracy", "0.400", "+-", "0.200", "0.600", "+-", "0.173"]
    assert "n " not in out.split("d.jsonl")[1]          # counts are not averaged

    (tmp_path / "short.json").write_text(json.dumps({"d.jsonl": {"runs/grpo-seed3/ckpt": {"accuracy": 1.0}}}))
    with pytest.raises(SystemExit, match="short.json does not have 2 models on d.jsonl"):
        evaluation.main(["--mean-of", files[0], str(tmp_path / "short.json")])

    (tmp_path / "nokey.json").write_text(json.dumps(
        {"d.jsonl": {"runs/grpo-seed4/ckpt": {"n": 4}, "runs/papo-seed4/ckpt": {"n": 4}}}))
    with pytest.raises(SystemExit, match="nokey.json has no 'accuracy' for model 1 on d.jsonl"):
        evaluation.main(["--mean-of", files[0], str(tmp_path / "nokey.json")])

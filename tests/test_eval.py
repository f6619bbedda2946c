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

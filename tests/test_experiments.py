"""experiments/shortcut.py: the statistics of its table, on hand-made runs with known answers."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "shortcut", Path(__file__).resolve().parents[1] / "experiments" / "shortcut.py")
shortcut = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shortcut)


def test_interval_is_the_students_t_interval_closed_form():
    # mean 2, sample std 1, n 3: half-width t(0.975, 2) / sqrt(3) = 4.303 / 1.732
    mean, low, high = shortcut.interval([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert high - mean == pytest.approx(4.303 / 3 ** 0.5) and mean - low == pytest.approx(high - mean)
    # 5 seeds: t(0.975, 4) = 2.776
    _, low, high = shortcut.interval([0.0, 0.0, 1.0, 1.0, 0.5])
    sd = (sum((x - 0.5) ** 2 for x in [0, 0, 1, 1, 0.5]) / 4) ** 0.5
    assert (high - low) / 2 == pytest.approx(2.776 * sd / 5 ** 0.5)
    with pytest.raises(ValueError):
        shortcut.interval([1.0])


def _run(acc, conflict):
    scores = {"accuracy": acc, "conflict_accuracy": conflict}
    return {"before": {"accuracy": 0.4, "conflict_accuracy": 0.3}, "after": scores, "curve": []}


def test_paired_differences_are_taken_seed_by_seed():
    """A recipe that beats GRPO by exactly +0.1 on every seed, though the seeds themselves
    differ by much more: the paired interval is +0.1 with zero width, the unpaired spread is not."""
    runs = {"grpo": {0: _run(0.2, 0.1), 1: _run(0.6, 0.5), 2: _run(0.4, 0.2)},
            "papo-g": {0: _run(0.3, 0.1), 1: _run(0.7, 0.5), 2: _run(0.5, 0.2)}}
    summary, table = shortcut.summarise(runs)
    assert summary["paired"]["papo-g"]["baseline"] == "grpo"
    paired = summary["paired"]["papo-g"]["accuracy"]
    assert paired["mean"] == pytest.approx(0.1)
    assert paired["low"] == pytest.approx(0.1) and paired["high"] == pytest.approx(0.1)
    assert paired["per_seed"] == pytest.approx([0.1, 0.1, 0.1])
    assert summary["paired"]["papo-g"]["conflict_accuracy"]["mean"] == pytest.approx(0.0)
    assert summary["recipes"]["grpo"]["accuracy"] == [0.2, 0.6, 0.4]
    # what RL did, per recipe: after minus its own warm start (0.4 on every seed here)
    assert summary["change"]["grpo"]["accuracy"]["per_seed"] == pytest.approx([-0.2, 0.2, 0.0])
    assert summary["change"]["papo-g"]["accuracy"]["mean"] == pytest.approx(0.1)
    assert "| papo-g | 3 | 0.500 ± 0.200 |" in table
    # a seed only one recipe finished is left out of the pairing
    runs["papo-g"][3] = _run(0.9, 0.9)
    assert shortcut.summarise(runs)[0]["paired"]["papo-g"]["accuracy"]["per_seed"] == \
        pytest.approx([0.1, 0.1, 0.1])


def test_one_common_seed_gives_a_difference_but_no_interval():
    runs = {"grpo": {0: _run(0.2, 0.1)}, "papo-g": {0: _run(0.3, 0.2)}}
    summary, table = shortcut.summarise(runs)
    assert summary["paired"]["papo-g"]["accuracy"]["low"] is None
    assert "[one seed]" in table


def test_papo_d_is_paired_with_dapo_and_papo_g_with_grpo():
    runs = {"grpo": {0: _run(0.2, 0.1), 1: _run(0.6, 0.5)},
            "dapo": {0: _run(0.5, 0.4), 1: _run(0.5, 0.4)},
            "papo-d": {0: _run(0.6, 0.4), 1: _run(0.7, 0.4)},
            "papo-g-gamma0.1": {0: _run(0.3, 0.1), 1: _run(0.6, 0.5)}}
    summary, table = shortcut.summarise(runs)
    assert summary["paired"]["papo-d"]["baseline"] == "dapo"
    assert summary["paired"]["papo-d"]["accuracy"]["per_seed"] == pytest.approx([0.1, 0.2])
    assert summary["paired"]["papo-g-gamma0.1"]["accuracy"]["per_seed"] == pytest.approx([0.1, 0.0])
    assert "dapo" not in summary["paired"] and "grpo" not in summary["paired"]
    assert "| papo-d - dapo | 2 |" in table


def _final(before_acc, after_acc, after_format=1.0):
    return {"before": {"accuracy": before_acc, "format": 1.0},
            "after": {"accuracy": after_acc, "format": after_format}, "curve": []}


def test_a_collapse_is_named_seed_by_seed():
    """Below half the warm start's held-out accuracy, or format below 0.5; the boundary itself
    is not a collapse."""
    assert shortcut.collapsed({"accuracy": 0.5}, {"accuracy": 0.24, "format": 1.0})
    assert not shortcut.collapsed({"accuracy": 0.5}, {"accuracy": 0.25, "format": 1.0})
    assert shortcut.collapsed({"accuracy": 0.5}, {"accuracy": 0.6, "format": 0.49})
    runs = {"papo-g-gamma0.2": {0: _final(0.5, 0.0, 0.0), 1: _final(0.5, 0.6), 2: _final(0.4, 0.1)}}
    summary, table = shortcut.summarise(runs)
    assert summary["recipes"]["papo-g-gamma0.2"]["collapsed"] == [0, 2]
    assert "- papo-g-gamma0.2: 2 of 3 (seed 0, 2)" in table


def test_a_warm_start_that_does_not_use_the_picture_is_named_by_seed():
    """runtime.blind_warning's rule on each seed's warm start: accuracy equal under every mask
    and KL_prcp below 1e-4. A warm start whose masked accuracy differs, or whose KL_prcp is not
    ~0, is not blind."""
    def run(acc, masked, kl):
        return {"before": {"accuracy": acc, "accuracy_mask0.6": masked, "accuracy_mask1.0": masked,
                           "kl_prcp": kl, "format": 1.0},
                "after": {"accuracy": acc, "format": 1.0}, "curve": []}
    runs = {"grpo": {0: run(0.4, 0.4, 0.0), 1: run(0.4, 0.2, 0.3), 2: run(0.3, 0.3, 5e-5),
                     3: run(0.3, 0.3, 2e-4)}}
    summary, table = shortcut.summarise(runs)
    assert summary["blind_warm_starts"] == [0, 2]
    assert "perception term has nothing to work with): seed 0, 2." in table
    assert shortcut.summarise({"grpo": {1: run(0.4, 0.2, 0.3)}})[0]["blind_warm_starts"] == []


def test_the_annealed_variant_is_the_largest_gamma_that_never_collapsed():
    ok, bad = _final(0.5, 0.6), _final(0.5, 0.0)
    seeds = [0, 1]
    runs = {"papo-g-gamma0.05": {0: ok, 1: ok}, "papo-g-gamma0.1": {0: ok, 1: ok},
            "papo-g-gamma0.2": {0: ok, 1: bad}}
    assert shortcut.annealed_recipe(runs, seeds) == "papo-g-gamma0.1-anneal"
    runs["papo-g-gamma0.2"][1] = ok
    assert shortcut.annealed_recipe(runs, seeds) == "papo-g-gamma0.2-anneal"
    # every gamma collapsed somewhere: the fewest collapses, the smaller gamma on a tie
    runs = {"papo-g-gamma0.05": {0: bad, 1: bad}, "papo-g-gamma0.1": {0: ok, 1: bad},
            "papo-g-gamma0.2": {0: bad, 1: ok}}
    assert shortcut.annealed_recipe(runs, seeds) == "papo-g-gamma0.1-anneal"
    # not decided before every seed of every gamma finished
    del runs["papo-g-gamma0.2"][1]
    assert shortcut.annealed_recipe(runs, seeds) is None
    # and each annealed recipe is its gamma's flags plus --gamma-anneal, paired with GRPO
    assert shortcut.RECIPES["papo-g-gamma0.1-anneal"] == \
        shortcut.RECIPES["papo-g-gamma0.1"] + ["--gamma-anneal"]
    assert shortcut.baseline_of("papo-g-gamma0.1-anneal") == "grpo"
    # the unguarded gamma 0.2 is compared with the guarded one: what the safeguards change
    assert shortcut.baseline_of("papo-g-gamma0.2-unguarded") == "papo-g-gamma0.2"


def test_every_recipe_is_a_valid_command_line():
    import config
    for name, flags in shortcut.RECIPES.items():
        cfg = config.parse_config([*shortcut.COMMON, *flags])
        assert cfg.toy_world == "shortcut" and cfg.steps == 100, name
        if name.startswith("papo-g-gamma") and not name.endswith("-unguarded"):
            assert (cfg.kl_prcp_clip, cfg.kl_prcp_token_fraction) == (0.2, 0.2), name
            assert cfg.gamma == float(name.split("gamma")[1].split("-")[0]), name
            assert cfg.gamma_anneal == name.endswith("-anneal"), name
    assert config.parse_config(shortcut.RECIPES["papo-d"]).dynamic_sampling


# --- the dark canvas: where PAPO's black squares hide without adding --------------------------

def test_on_the_dark_canvas_the_mask_only_hides():
    # The official mask writes (0, 0, 0). On the light canvas that is new, dark content (the tiny
    # model counts it as shapes); on the dark canvas a masked pixel becomes canvas, nothing else.
    import numpy as np
    import papo
    import toy
    added = {}
    for canvas in ("light", "dark"):
        added[canvas] = 0
        for i in range(40):
            ex = toy.sample_toy_example(np.random.default_rng([3, i]), ("count_conflict",),
                                        canvas=canvas)
            before = np.asarray(ex["image"])
            after = np.asarray(papo.mask_image(ex["image"], 14, 0.6, np.random.default_rng([4, i])))
            changed = (before != after).any(-1)
            new = changed & (after != np.array(toy.CANVASES[canvas])).any(-1)
            added[canvas] += bool(new.any())
            # the shapes are still there, in their colours: same draws on either canvas
            light = toy.sample_toy_example(np.random.default_rng([3, i]), ("count_conflict",))
            assert light["problem"] == ex["problem"] and light["answer"] == ex["answer"]
            shape = (before != np.array(toy.CANVASES[canvas])).any(-1)
            assert shape.any() and {tuple(p) for p in before[shape]} <= set(toy.COLOURS.values())
    assert added == {"light": 40, "dark": 0}


def test_the_dark_canvas_has_its_own_splits_and_warm_start(tmp_path):
    import config
    import toy
    light = config.parse_config(["--toy-world", "shortcut", "--cache", str(tmp_path)])
    dark = config.parse_config(["--toy-world", "shortcut", "--cache", str(tmp_path),
                                "--toy-canvas", "dark"])
    assert light.toy_canvas == "light"
    # the light names are the ones earlier caches used
    assert toy.toy_splits(light)["train"][0].parent.name == "toy-count+count_color+count_hint"
    assert toy.warm_start_path(light).name.startswith("warmstart-small-count")
    assert toy.warm_start_path(dark).name.startswith("warmstart-dark-small-count")
    assert all(toy.toy_splits(dark)[k][0] != toy.toy_splits(light)[k][0] for k in toy.toy_splits(light))
    assert "toy_canvas" not in config.RESUME_NEUTRAL          # a resumed run may not switch it
    with pytest.raises(SystemExit, match="--toy-canvas 'grey'"):
        config.check_config(config.parse_config(["--toy-canvas", "grey"]), world_size=1)
    toy.make_toy_dataset(4, seed=1, out_dir=tmp_path / "d", tasks=("count",), canvas="dark")
    import json
    from PIL import Image
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["canvas"] == "dark"
    assert Image.open(tmp_path / "d" / "images" / "00000.png").getpixel((0, 0)) == (0, 0, 0)
    with pytest.raises(ValueError, match="toy canvas 'grey'"):
        toy.make_toy_dataset(4, seed=1, out_dir=tmp_path / "e", canvas="grey")


def _fake_run(folder: Path, acc: float, decoy: float):
    import json
    folder.mkdir(parents=True)
    final = {"before": {"accuracy": 0.4, "conflict_decoy_rate": 0.3},
             "after": {"accuracy": acc, "conflict_decoy_rate": decoy}}
    (folder / "final_eval.json").write_text(json.dumps(final))
    rows = [{"step": 1, "reward": 0.5, "kl_prcp": 0.25, "t_step": 1.0},
            {"step": 2, "reward": 0.6, "eval_accuracy": acc}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_finished_runs_record_outlives_its_run_folder(tmp_path):
    import shutil
    out, results = tmp_path / "runs", tmp_path / "results"
    _fake_run(shortcut.run_folder(out, "grpo", 0), 0.5, 0.2)
    (out / "logs").mkdir()
    (out / "logs" / "grpo-seed0.log").write_text("step\nWARNING step 18: possible KL_prcp hacking\n")
    shortcut.write_record(out, results, "grpo", 0)
    shutil.rmtree(out)                                      # the runs are not kept
    assert shortcut.finished(out, results, "grpo", 0)
    assert not shortcut.finished(out, results, "grpo", 1)
    runs = shortcut.load_runs(out, ["grpo"], [0, 1], results)
    assert runs["grpo"][0]["after"] == {"accuracy": 0.5, "conflict_decoy_rate": 0.2}
    assert runs["grpo"][0]["curve"] == [{"step": 2, "eval_accuracy": 0.5}]
    import json
    record = json.loads((results / "grpo-seed0.json").read_text())
    assert record["train"] == [{"step": 1, "reward": 0.5, "kl_prcp": 0.25},
                               {"step": 2, "reward": 0.6}]
    assert record["warnings"] == ["WARNING step 18: possible KL_prcp hacking"]
    assert record["flags"] == shortcut.RECIPES["grpo"]


def test_one_job_at_a_time_runs_seed_major_and_skips_recorded_runs(tmp_path, monkeypatch):
    out, results = tmp_path / "runs", tmp_path / "results"
    _fake_run(shortcut.run_folder(out, "dapo", 0), 0.5, 0.2)   # finished, record not yet written
    calls = []
    monkeypatch.setattr(shortcut, "run", lambda cmd, log, threads: 0)   # the toy-data build
    monkeypatch.setattr(shortcut, "step", lambda o, r, s, *a: calls.append((r, s)))
    shortcut.run_all(out, [0, 1], ["grpo", "dapo"], jobs=1, threads=1, extra=[], results=results)
    assert calls == [("grpo", 0), ("grpo", 1), ("dapo", 1)]
    assert (results / "dapo-seed0.json").is_file()
    # the dark design: every fixed recipe and the unguarded gamma 0.2, on the dark canvas
    assert shortcut.DARK_RECIPES == [*shortcut.FIXED_RECIPES, "papo-g-gamma0.2-unguarded"]


def test_the_panel_figure_draws_each_recipe_against_its_baseline_last(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    def run(decoy, acc=0.5):
        return {"before": {"accuracy": 0.4, "conflict_decoy_rate": 0.3},
                "after": {"accuracy": acc, "conflict_decoy_rate": decoy},
                "curve": [{"step": 50, "eval_conflict_decoy_rate": decoy}]}
    runs = {"grpo": {0: run(0.4), 1: run(0.5)},
            "papo-g-gamma0.2": {0: run(0.2), 1: run(0.0, acc=0.1)}}    # seed 1 collapsed
    fig = shortcut.plot_panels(runs, path=tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000
    ax = fig.axes[0]
    assert ax.get_title() == "papo-g-gamma0.2 vs grpo" and ax.get_xlabel() and ax.get_ylabel()
    colours = [line.get_color() for line in ax.get_lines()]
    assert colours[-1] == "black"                          # the baseline's mean, drawn last
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    left_out = ", without seed 1"
    assert labels == ["papo-g-gamma0.2: mean of 1 seed(s)" + left_out, "grpo: mean of 1 seed(s)" + left_out]
    # both means leave the collapsed seed out, the baseline's too (its seed 1 ran to 0.5): so
    # the two thick lines start from the same warm starts and are paired
    mean = next(l for l in ax.get_lines() if l.get_label().startswith("papo-g"))
    assert list(mean.get_ydata()) == [0.3, 0.2]
    base_mean = next(l for l in ax.get_lines() if l.get_label().startswith("grpo"))
    assert list(base_mean.get_ydata()) == [0.3, 0.4]
    assert any("seed 1 collapsed" in t.get_text() for t in ax.texts)


def test_collapsed_seeds_are_left_out_of_the_means_they_would_distort():
    ok = {"before": {"accuracy": 0.4, "conflict_decoy_rate": 0.3},
          "after": {"accuracy": 0.5, "conflict_decoy_rate": 0.4}, "curve": []}
    dead = {"before": {"accuracy": 0.4, "conflict_decoy_rate": 0.3},
            "after": {"accuracy": 0.0, "conflict_decoy_rate": 0.0}, "curve": []}
    runs = {"grpo": {0: ok, 1: ok, 2: ok}, "papo-g-gamma0.2": {0: ok, 1: ok, 2: dead}}
    kept = shortcut.without_collapsed(runs)
    assert kept == {"grpo": {0: ok, 1: ok, 2: ok}, "papo-g-gamma0.2": {0: ok, 1: ok}}
    summary, _ = shortcut.summarise(kept)
    assert summary["paired"]["papo-g-gamma0.2"]["conflict_decoy_rate"]["per_seed"] == [0.0, 0.0]
    everything, _ = shortcut.summarise(runs)
    assert everything["paired"]["papo-g-gamma0.2"]["conflict_decoy_rate"]["mean"] < -0.1
    assert everything["recipes"]["papo-g-gamma0.2"]["collapsed"] == [2]


def _favours():
    spec = importlib.util.spec_from_file_location(
        "favours", Path(__file__).resolve().parents[1] / "experiments" / "favours.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_committed_favours_record_agrees_with_its_closed_forms():
    # push = pi - q, KL_prcp = k3 of the two log-probs (capped at 10), "favours" = the larger push
    import json
    import math
    favours = _favours()
    records = sorted((Path(__file__).resolve().parents[1] / "experiments" / "results")
                     .glob("*/favours-seed0.json"))
    assert records
    for path in records:
        rec = json.loads(path.read_text())
        assert rec["questions"] == len(rec["rows"]) == 32
        for row in rec["rows"]:
            assert row["right"] != row["letter"]
            for k in range(5):
                pi, q = row["pi"][k], row["q"][k]
                assert row["push"][k] == pytest.approx(pi - q, abs=2e-5)
                if pi > 1e-3 and q > 1e-3:       # the rounded probabilities still pin k3 down
                    x = math.log(q) - math.log(pi)
                    assert row["value"][k] == pytest.approx(min(10.0, math.exp(x) - x - 1),
                                                            abs=0.02 + 0.02 * row["value"][k])
            t, w = row["right"] - 1, row["letter"] - 1
            assert row["favours_right"] == (row["push"][t] > row["push"][w])
        share = sum(r["favours_right"] for r in rec["rows"]) / 32
        assert rec["favours_right_share"] == pytest.approx(share)
        assert 0 <= favours.favours_larger(rec) <= 32


def test_favours_larger_counts_the_questions_whose_push_follows_the_larger_count():
    favours = _favours()
    rows = [{"right": 5, "letter": 1, "favours_right": True},     # the larger, the right one
            {"right": 1, "letter": 5, "favours_right": False},    # the larger, the letter's
            {"right": 2, "letter": 4, "favours_right": True}]     # the smaller
    assert favours.favours_larger({"rows": rows}) == 2

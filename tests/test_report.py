"""report: headline keys, the original study's comparison read off constructed numbers, figures and export."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

from kd.core import arms as kd_arms
from kd.core.io import read_json, write_json
from kd.core.params import Scheme
from kd.evaluation.evaluate import summarize
from kd.report import card as card_module
from kd.report import registry, report

LOGIT = Scheme(terms={"logit": 1.0})
MULTI = Scheme(terms={"embedding": 1.0, "hidden": 1.0, "attention": 1.0, "logit": 1.0})
N_LAYERS = 2


def write_arm(
    train_dir, eval_dir, name: str, train_kl: float, test_kl: float, grad: float, multi: bool
) -> None:
    """Outputs of train@name and evaluate@name with the given levels."""
    rows = []
    for split, kl, n in (("train", train_kl, 3), ("test", test_kl, 2)):
        for b in range(n):
            row = {
                "split": split,
                "batch": b,
                "n_positions": 10,
                "n_masked": 10,
                "n_tokens": 50,
                "logit_kl_train_t": kl * (1 + 0.01 * b),
                "logit_kl_t1": kl * (1 + 0.01 * b),
                "agreement": 0.5,
                "mlm_loss": 3.0,
                "top1": 0.3,
                "top5": 0.5,
                "teacher_mlm_loss": 2.0,
                "teacher_top1": 0.4,
                "teacher_top5": 0.6,
            }
            if split == "test":
                row.update(
                    {
                        "embedding_lstsq": 0.2,
                        "hidden_lstsq/layer_1": 0.3,
                        "hidden_lstsq/layer_2": 0.4,
                        "hidden_lstsq": 0.7,
                        "attention_probs": 0.01,
                        "attention_scores": 1.0,
                    }
                )
                if multi:
                    row.update({"embedding_learned": 0.25, "hidden_learned": 0.8})
            rows.append(row)
    pd.DataFrame(rows).to_csv(eval_dir / f"{name}.csv", index=False)
    write_json(
        eval_dir / f"{name}.json",
        {
            **summarize(rows),
            "layer_map": [1, 2],
            "lstsq/fit_tokens": 150,
            "train_temperature": 1.0,
            "logit_positions": "masked",
            "runtime": {"device": "cpu", "precision": "fp32", "threads": 2, "torch": "2.x",
                        "transformers": "5.x", "numpy": "2.x"},
        },
    )
    terms = ["embedding", "hidden", "attention", "logit"] if multi else ["logit"]
    steps = pd.DataFrame(
        {
            "step": [5, 10],
            "tokens": [640, 1280],
            "flops": [1e12, 2e12 if not multi else 2.5e12],
            **{f"loss/{t}": [1.0, 0.5] for t in terms},
            "loss/total": [2.0, 1.0],
            **{f"grad_norm/layer_{i}": [grad, grad] for i in range(N_LAYERS)},
            "grad_norm/global": [2 * grad, 2 * grad],
            **({"attr/cos/hidden~logit": [float("nan"), 0.1]} if multi else {}),
        }
    )
    steps.to_csv(train_dir / f"{name}.csv", index=False)
    write_json(
        train_dir / f"{name}.json",
        {
            "steps": 10,
            "epochs": 1.0,
            "tokens": 1280,
            "layer_map": [1, 2],
            "flops": 2e12,
            "final/loss/total": 1.0,
            "mean/grad_norm/embeddings": grad,
            "mean/grad_norm/head": grad / 2,
            "mean/grad_norm/global": 2 * grad,
            **{f"mean/grad_norm/layer_{i}": grad * (1 + i) for i in range(N_LAYERS)},
            **(ATTRIBUTION if multi else {}),
            "attribution_steps": 2 if multi else 0,
        },
    )


# The multi arm's per-term gradient norms: hidden drives layer_0, logit layer_1; hidden and
# attention pull apart.
ATTRIBUTION = {
    **{f"mean/attr/{t}/{g}": v
       for t, vals in {"embedding": (0.1, 0.0, 0.0), "hidden": (0.2, 0.9, 0.1),
                       "attention": (0.1, 0.3, 0.2), "logit": (0.3, 0.2, 0.8)}.items()
       for g, v in zip(("embeddings", "layer_0", "layer_1"), vals, strict=True)},
    **{f"mean/attr/{t}/global": 1.0 for t in ("embedding", "hidden", "attention", "logit")},
    "mean/attr/cos/hidden~attention": -0.2,
    "mean/attr/cos/hidden~logit": 0.1,
}


def test_attribution_section_names_the_driving_term(tmp_path) -> None:
    loaded = arms(tmp_path, (0.5, 0.6, 1.0), (0.4, 0.5, 2.0))
    assert report.attribution_terms(loaded[0]) == []
    assert report.attribution_terms(loaded[1]) == ["embedding", "hidden", "attention", "logit"]
    text = "\n".join(report._attribution_section(loaded))
    assert "layer_0: **hidden**" in text and "layer_1: **logit**" in text
    assert "Pulling apart on average: hidden~attention" in text
    figs = report.figures(loaded, tmp_path)
    assert {p.name for p in figs} >= {"fig7_matched_compute.png", "fig8_attribution_multi.png"}


def arms(tmp_path, logit: tuple, multi: tuple) -> list[report.Arm]:
    train_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    train_dir.mkdir(exist_ok=True)
    eval_dir.mkdir(exist_ok=True)
    write_arm(train_dir, eval_dir, "logit", *logit, multi=False)
    write_arm(train_dir, eval_dir, "multi", *multi, multi=True)
    p = SimpleNamespace(
        paths=SimpleNamespace(train=train_dir, eval=eval_dir, students=tmp_path, probe=tmp_path)
    )
    return [
        report.load_arm(kd_arms.of_arm(p, "logit"), LOGIT),
        report.load_arm(kd_arms.of_arm(p, "multi"), MULTI),
    ]


def test_scheme_neutral_keys_for_any_headline(tmp_path) -> None:
    loaded = arms(tmp_path, (0.5, 0.6, 1.0), (0.4, 0.5, 2.0))
    by_headline = {h: report.comparison(loaded, h) for h in ("logit", "multi")}
    for headline, m in by_headline.items():
        assert m["scheme"] == headline
        for key in report.CORE_KEYS:
            assert m[key] is not None, (headline, key)
            assert f"arms/logit/{key}" in m and f"arms/multi/{key}" in m
    # The same columns whichever arm is the headline; only the values move.
    assert set(by_headline["logit"]) == set(by_headline["multi"])
    assert by_headline["logit"]["test/logit_kl_t1"] == pytest.approx(0.6 * 1.005)
    assert by_headline["multi"]["test/logit_kl_t1"] == pytest.approx(0.5 * 1.005)
    assert by_headline["logit"]["test/hidden_learned"] is None  # no learned projections
    assert by_headline["multi"]["mean_grad_norm"] == pytest.approx(2.0 * 1.5)
    # eval.json, what `dvc exp show` shows: a few headline keys and the runtime, never per arm.
    head = {h: report.headline_metrics(m, next(a for a in loaded if a.name == h))
            for h, m in by_headline.items()}
    assert set(head["logit"]) == set(head["multi"]) == {"scheme", *report.HEADLINE, "runtime"}
    assert head["multi"]["test/logit_kl_t1"] == by_headline["multi"]["test/logit_kl_t1"]
    assert head["multi"]["runtime"] == {"device": "cpu", "precision": "fp32", "threads": 2,
                                        "torch": "2.x", "transformers": "5.x"}


@pytest.mark.parametrize(
    "logit, multi, winners, verdict",
    [
        # logit wins everything: the original study's finding is reversed.
        (
            (0.3, 0.4, 2.0),
            (0.5, 0.6, 1.0),
            ("logit", "logit", "logit"),
            "does not hold: every claim is reversed or tied",
        ),
        # multi wins everything, as in the original study.
        ((0.5, 0.6, 1.0), (0.3, 0.4, 2.0), ("multi", "multi", "multi"), "holds"),
        # mixed: multi lower on train only.
        (
            (0.5, 0.3, 2.0),
            (0.3, 0.4, 1.0),
            ("multi", "logit", "logit"),
            "does not hold in full (1 of 3 claims hold)",
        ),
    ],
)
def test_report_reads_the_winner_off_the_numbers(tmp_path, logit, multi, winners, verdict) -> None:
    loaded = arms(tmp_path, logit, multi)
    md = report.markdown(loaded, "multi", [], None)
    lines = {
        "lower train logit loss": winners[0],
        "lower test logit loss": winners[1],
        "higher average gradient norm": winners[2],
    }
    for what, arm in lines.items():
        assert re.search(rf"\*\*{what.capitalize()}\*\*: \*\*{arm}\*\*", md), (what, md)
    assert f"the original study's finding **{verdict}**" in md
    f = report.findings(loaded)
    assert f["findings/lower_train_logit_kl"] == winners[0]
    assert f["findings/lower_test_logit_kl"] == winners[1]
    assert f["findings/higher_mean_grad_norm"] == winners[2]
    assert f["findings/study_holds/multi_vs_logit"] == (verdict == "holds")


def test_tie_names_no_winner(tmp_path) -> None:
    loaded = arms(tmp_path, (0.5, 0.6, 1.0), (0.5, 0.6, 1.0))
    assert report.best(loaded, "test/logit_kl_t1", lower=True)[0] is None
    assert "no single arm" in report.markdown(loaded, "logit", [], None)


def test_stage_writes_figures_report_metrics_and_distilled_model(
    tmp_path, monkeypatch, default_tokenizer
) -> None:
    from stages import report as stage

    arms(tmp_path, (0.5, 0.6, 1.0), (0.3, 0.4, 2.0))
    student = tmp_path / "students" / "multi"
    BertForMaskedLM(
        BertConfig(
            vocab_size=len(default_tokenizer),
            hidden_size=16,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=2,
            intermediate_size=37,
        )
    ).save_pretrained(student)
    default_tokenizer.save_pretrained(student)
    (student / "kd_config.json").write_text('{"arm": "multi"}')
    paths = {k: str(tmp_path / k)
             for k in ("metrics", "train", "eval", "students", "report", "distilled")}
    schemes = {"logit": LOGIT.model_dump(), "multi": MULTI.model_dump()}
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "paths": paths,
                "loss": {"scheme": "multi", "arms": ["logit", "multi"], "schemes": schemes},
            }
        )
    )
    split = {"docs": 10, "words": 500, "chars": 3000}
    write_json(tmp_path / "metrics" / "corpus.json", {"train": split, "test": split})
    monkeypatch.chdir(tmp_path)
    stage.main()

    out = tmp_path / "report"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "fig2_loss_components.png",
        "fig3_train_logit_loss.png",
        "fig4_test_logit_loss.png",
        "fig5_grad_norm.png",
        "fig6_grad_norm_per_layer.png",
        "fig7_matched_compute.png",
        "fig8_attribution_multi.png",
    ]
    assert all((out / p).stat().st_size > 1000 for p in pngs)
    md = (out / "report.md").read_text()
    assert "the original study's finding **holds**" in md and "(fig3_train_logit_loss.png)" in md
    m = read_json(tmp_path / "metrics" / "comparison.json")
    assert m["scheme"] == "multi" and m["findings/lower_test_logit_kl"] == "multi"
    head = read_json(tmp_path / "metrics" / "eval.json")
    assert head["scheme"] == "multi" and head["test/logit_kl_t1"] == m["test/logit_kl_t1"]
    assert not [k for k in head if k.startswith(("arms/", "floor/", "findings/"))]
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "distilled")
    assert model.config.hidden_size == 16
    assert (tmp_path / "distilled" / "tokenizer.json").exists()
    assert (tmp_path / "distilled" / "kd_config.json").exists()
    # The model card: Hugging Face front matter whose model-index holds eval.json's numbers.
    card = (tmp_path / "distilled" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["pipeline_tag"] == "fill-mask" and "multi" in meta["tags"]
    (index,) = meta["model-index"]
    got = {m["name"]: m["value"] for r in index["results"] for m in r["metrics"]}
    for key, _, name in card_module.MLM_METRICS:
        assert got[name] == round(head[key], 4), key
    assert all(f"{term} × 1" in card for term in MULTI.terms), card
    assert 'pipeline("fill-mask", model=' in card

    # The model registry: one version, tagged, under the alias, and it loads and fills a mask.
    import mlflow

    client = mlflow.MlflowClient()
    (version,) = client.search_model_versions(f"name = '{registry.NAME}'")
    assert version.tags["kd.scheme"] == "multi" and version.tags["kd.dvc_exp"] == "workspace"
    assert version.tags["metric.test/logit_kl_t1"] == f"{head['test/logit_kl_t1']:.4f}"
    alias = client.get_model_version_by_alias(registry.NAME, registry.ALIAS)
    assert alias.version == version.version
    fill = mlflow.transformers.load_model(f"models:/{registry.NAME}@{registry.ALIAS}")
    assert len(fill("The capital of France is [MASK].")) == 5
    # A second report run of the same pipeline execution keeps its one version.
    stage.main()
    assert len(client.search_model_versions(f"name = '{registry.NAME}'")) == 1

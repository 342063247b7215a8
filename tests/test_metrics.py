"""loran/pipeline/metrics.py: ROUGE against hand-computed overlaps and rouge-score itself; label parsing and
classification metrics."""
import pytest
from rouge_score import rouge_scorer

from loran.pipeline.metrics import classification, parse_label, primary_metric, rouge

BBC = ["business", "entertainment", "politics", "sports", "tech"]


def f1(overlap: int, n_pred: int, n_ref: int) -> float:
    """F-measure from an overlap count and the two lengths."""
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r) if overlap else 0.0


def test_rouge_matches_hand_counts():
    # "the cat sat on the mat" vs "the cat lay on the mat": 5/6 unigrams (the x2, cat, on, mat), 3/5 bigrams
    # (the cat, on the, the mat), LCS "the cat on the mat" = 5. "cats running" vs "cat runs": Porter stems
    # (cats->cat, running/runs->run) make them identical. "dogs bark" vs "a cat": nothing in common.
    preds = ["the cat sat on the mat", "cats running", "dogs bark"]
    refs = ["the cat lay on the mat", "cat runs", "a cat"]
    got = rouge(preds, refs)
    assert got["rouge1"] == pytest.approx((f1(5, 6, 6) + 1 + 0) / 3)
    assert got["rouge2"] == pytest.approx((f1(3, 5, 5) + 1 + 0) / 3)
    assert got["rougeL"] == pytest.approx((f1(5, 6, 6) + 1 + 0) / 3)
    assert set(got) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert all(0.0 <= v <= 1.0 for v in got.values())


def test_rouge_matches_rouge_score_scorer():
    preds = ["Police killed the gunman.\nThe gunman was shot.", "Stocks fell sharply on Monday", "an unrelated text"]
    refs = ["The gunman was killed by police.\nHe was shot.", "Shares dropped on Monday", "Markets rallied"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(preds, refs)]
    got = rouge(preds, refs)
    for key in got:
        assert got[key] == pytest.approx(sum(s[key].fmeasure for s in scores) / len(scores))


def test_rouge_lsum_splits_on_newlines():
    # Sentences swapped: one LCS over the whole text finds 2 of 4 tokens; per-sentence (union) LCS finds all 4.
    got = rouge(["alpha beta\ngamma delta"], ["gamma delta\nalpha beta"])
    assert got["rougeL"] == pytest.approx(0.5)
    assert got["rougeLsum"] == pytest.approx(1.0)


def test_rouge_multi_reference_takes_best():
    got = rouge(["the cat sat"], [["a dog ran", "the cat sat"]])
    assert got["rouge1"] == pytest.approx(1.0)


def test_rouge_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="equally many"):
        rouge(["a"], ["a", "b"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Sports", "sports"),  # case-insensitive
        ("This is about POLITICS and business.", "politics"),  # first mentioned wins
        ("business, not politics", "business"),
        ("category: tech.", "tech"),  # punctuation is a boundary
        ("sport", None),  # "sport" is not the label "sports"
        ("technology news", None),  # nor is "technology" the label "tech"
        ("biotechnology and sports", "sports"),  # a label inside a longer word does not count
        ("", None),
        ("I cannot tell.", None),
    ],
)
def test_parse_label(text, expected):
    assert parse_label(text, BBC) == expected


def test_parse_label_word_boundaries_both_ways():
    labels = ["sport", "sports"]
    assert parse_label("sports news", labels) == "sports"  # longest label at the same position
    assert parse_label("a sport story", labels) == "sport"
    assert parse_label("about c++ code", ["c", "c++"]) == "c++"  # labels ending in punctuation


def test_classification_metrics():
    preds = ["Sports", "politics then tech", "tech", "no idea", "Entertainment!"]
    refs = ["sports", "tech", "tech", "business", "entertainment"]
    got = classification(preds, refs, BBC)
    assert got == {"accuracy": pytest.approx(3 / 5), "no_class_rate": pytest.approx(1 / 5)}


def test_classification_rejects_unknown_reference():
    with pytest.raises(ValueError, match="not in labels"):
        classification(["sports"], ["sport"], BBC)


def test_per_example_scores_are_each_examples_own_and_average_to_the_dataset_value():
    scores = classification(["sports!", "Tech news", "nothing", "politics"], ["sports", "business", "tech", "politics"],
                            labels=["business", "politics", "sports", "tech"])
    assert [e["accuracy"] for e in scores.per_example] == [1.0, 0.0, 0.0, 1.0]
    assert [e["label"] for e in scores.per_example] == ["sports", "tech", None, "politics"]
    assert scores == {"accuracy": 0.5, "no_class_rate": 0.25}
    preds, refs = ["the cat sat", "a dog ran far"], ["the cat sat down", "the dog ran"]
    per = rouge(preds, refs).per_example
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    for p, r, e in zip(preds, refs, per):
        assert e["rouge1"] == scorer.score(r, p)["rouge1"].fmeasure and e["rougeL"] == scorer.score(r, p)["rougeL"].fmeasure
    assert rouge(preds, refs)["rouge2"] == pytest.approx((per[0]["rouge2"] + per[1]["rouge2"]) / 2, abs=1e-15)


# Metrics and spectrum details.
def test_labels_longest_first_regardless_of_case_and_duplicates_refused():
    from loran.pipeline.metrics import parse_label

    # Reverse alphabetical order would try "tech" before "Tech Support" ('t' > 'T'); longest first does not.
    assert parse_label("tech support news", ["tech", "Tech Support"]) == "Tech Support"
    with pytest.raises(ValueError, match=r"^labels must differ case-insensitively, got \['Tech', 'tech'\]$"):
        parse_label("x", ["Tech", "tech"])


@pytest.mark.parametrize("dataset, metric", [("bbc_news", "accuracy"), ("newsgroups20", "accuracy"),
                                             ("bbc_headlines", "rougeL"), ("samsum", "rougeL"), ("aclsum", "rougeL")])
def test_each_dataset_has_its_primary_metric(dataset, metric):
    """What the study's choices and tables rank by: a record's dataset metric function decides, read from its config."""
    from omegaconf import OmegaConf

    from conftest import CONFIGS

    target = OmegaConf.load(CONFIGS / "dataset" / f"{dataset}.yaml").metric._target_
    assert primary_metric({"identity": {"dataset": {"metric": {"_target_": target}}}}) == metric


def test_a_metric_function_without_a_primary_metric_is_refused_by_name():
    record = {"identity": {"dataset": {"metric": {"_target_": "my.metrics.bleu"}}}}
    with pytest.raises(ValueError, match=r"dataset.metric._target_='my.metrics.bleu' has no primary metric; known: "
                                         r"\['loran.pipeline.metrics.classification', 'loran.pipeline.metrics.rouge'\]"):
        primary_metric(record)

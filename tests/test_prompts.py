"""Prompt sets: the shipped file, other formats, column mapping and clear errors."""

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest

from rmod_distill.errors import UserError
from rmod_distill.prompts import PromptsConfig, load_prompts

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "data" / "prompts" / "default.jsonl"


def test_shipped_default_prompt_set():
    every = load_prompts(PromptsConfig(path=str(SHIPPED), split=None))
    assert len(every) >= 240
    splits = Counter(p.split for p in every)
    assert splits["eval"] >= 60 and splits["validation"] >= 150
    assert splits["train"] + splits["validation"] + splits["eval"] == len(every)
    cats = Counter(p.category for p in every)
    assert set(cats) == {"advice", "explanation", "opinion", "complaint", "creative", "borderline"}
    # The validation split covers every category evenly, so a choice made on it is not one category's.
    assert set(Counter(p.category for p in every if p.split == "validation").values()) == {30}
    texts = [" ".join(p.text.lower().split()) for p in every]
    assert len(set(texts)) == len(texts)  # no prompt is repeated across splits
    assert any(len(p.messages) > 1 for p in every)  # multi-turn prompts are there
    assert all(p.messages[-1]["role"] == "user" and p.text.strip() for p in every)
    train = load_prompts(PromptsConfig(path=str(SHIPPED), split="train"))
    assert {p.split for p in train} == {"train"} and len(train) == splits["train"]


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_shipped_extra_train_prompts_are_new_train_prompts():
    """data/prompts/extra-train.jsonl: 300 more train prompts of the six categories (docs/log/2026-12-06.md, E3),
    none an id or a text of the default set, so none can leak into its validation or eval split."""
    extra = load_prompts(PromptsConfig(path=str(SHIPPED.parent / "extra-train.jsonl"), split=None))
    default = load_prompts(PromptsConfig(path=str(SHIPPED), split=None))
    assert len(extra) == 300 and {p.split for p in extra} == {"train"}
    assert Counter(p.category for p in extra) == {c: 50 for c in {p.category for p in default}}
    assert not {p.id for p in extra} & {p.id for p in default}
    text = lambda p: " ".join(m["content"] for m in p.messages).lower()
    assert len({text(p) for p in extra}) == 300 and not {text(p) for p in extra} & {text(p) for p in default}


def test_column_mapping_parquet_and_system_prompt(tmp_path):
    rows = [{"qid": 7, "question": "why is the sky blue?"}, {"qid": 8, "question": "hello"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    (tmp_path / "system.txt").write_text("Be brief.\n")
    cfg = PromptsConfig(path=str(tmp_path / "p.parquet"), split=None, id_column="qid", text_column="question",
                        system_prompt=str(tmp_path / "system.txt"))
    prompts = load_prompts(cfg)
    assert [p.id for p in prompts] == ["7", "8"]
    assert prompts[0].messages == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "why is the sky blue?"}]


def test_rows_without_ids_are_numbered(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    assert [p.id for p in load_prompts(PromptsConfig(path=str(path), split=None, id_column=None))] == [
        "row-000000", "row-000001"]


@pytest.mark.parametrize(
    "rows, cfg, message",
    [
        ([{"id": "a", "prompt": "  "}], {}, "row 1 (id 'a'): empty prompt"),
        ([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}], {}, "row 2 (id 'a'): duplicate id"),
        ([{"id": "a", "text": "x"}], {}, "no column 'prompt' or 'messages'"),
        ([{"prompt": "x"}], {}, "no id column 'id'"),
        ([{"id": "a", "prompt": "x"}], {"split": "train"}, "no split column 'split'"),
        ([{"id": "a", "prompt": "x", "split": "eval"}], {"split": "train"}, "no prompts with split == 'train'"),
        ([{"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}],
         {}, "must end with a user turn"),
    ],
)
def test_bad_prompt_files(tmp_path, rows, cfg, message):
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError) as err:
        load_prompts(PromptsConfig(path=str(path), **{"split": None, **cfg}))
    assert message in str(err.value) and "bad.jsonl" in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl does not exist"):
        load_prompts(PromptsConfig(path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl"):
        load_prompts(PromptsConfig(path=str(tmp_path / "empty.jsonl"), split=None))


def test_hh_transcripts(tmp_path):
    transcript = "\n\nHuman: What is a good gift?\n\nAssistant: A book.\n\nHuman: For my dad?\n\nAssistant: A rod."
    path = write(tmp_path / "hh.jsonl", [{"chosen": transcript}, {"chosen": "no speaker tags"}])
    first = PromptsConfig(path=str(path), split=None, id_column=None, text_column="chosen",
                          text_format="hh_first_turn", limit=1)
    assert load_prompts(first)[0].messages == [{"role": "user", "content": "What is a good gift?"}]
    dialogue = PromptsConfig(path=str(path), split=None, id_column=None, text_column="chosen",
                             text_format="hh_dialogue", limit=1)
    assert [m["role"] for m in load_prompts(dialogue)[0].messages] == ["user", "assistant", "user"]
    with pytest.raises(ValueError, match="row 2 .*not an HH transcript"):
        load_prompts(PromptsConfig(path=str(path), split=None, id_column=None, text_column="chosen",
                                   text_format="hh_dialogue"))


def test_validation_subset_is_carved_from_the_split(tmp_path):
    from rmod_distill.prompts import held_out

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}", "split": "train"}) + "\n"
                            for i in range(200)))
    every = load_prompts(PromptsConfig(path=str(path)))
    fit = load_prompts(PromptsConfig(path=str(path), subset="fit", validation_fraction=0.2))
    val = load_prompts(PromptsConfig(path=str(path), subset="validation", validation_fraction=0.2))
    assert sorted(p.id for p in fit + val) == sorted(p.id for p in every) and not {p.id for p in fit} & {p.id for p in val}
    assert 20 < len(val) < 60 and all(held_out(p.id, 0.2) for p in val)
    # distill holds out (for its eval loss) a part of the same validation prompts, never a fit prompt
    assert all(not held_out(p.id, 0.1) for p in fit)

"""benchmarks/source_selection.py: the choice ``select`` makes, made again from matrix records, and the chosen rows."""

from __future__ import annotations

import json

from tests.conftest import load_benchmark

selection = load_benchmark("source_selection")


def _record(config, seed, test, val_last, style=None, share=None, val_miou=0.0):
    data = {"digitscapes_seed": 1, "blend": "diff"}
    if style:
        data["source_style"] = style
    if share is not None:
        data["difference_share"] = share
    return {
        "protocol": "da",
        "seed": seed,
        "data": data,
        "config": config,
        "test_miou": test,
        "val_miou": val_miou,
        "val_curve": [[1500, 0.0], [3000, val_last]],
    }


def test_each_seed_gets_the_style_its_last_validation_prefers(tmp_path, capsys):
    records = [
        # seed 0: blended's last validation is higher (its val_miou is not what select reads)
        _record("baseline-plateau", 0, 0.28, 0.29, val_miou=0.9),
        _record("baseline-plateau", 0, 0.35, 0.36, "blended"),
        # seed 1: a tie keeps the first candidate, textured
        _record("baseline-plateau", 1, 0.30, 0.33),
        _record("baseline-plateau", 1, 0.34, 0.33, "blended"),
        _record("plateau-online-lr4e-3-3000", 0, 0.36, 0.0),
        _record("plateau-online-lr4e-3-3000", 0, 0.47, 0.0, "blended"),
        _record("plateau-online-lr4e-3-3000", 1, 0.41, 0.0),
        _record("plateau-online-lr4e-3-3000", 1, 0.45, 0.0, "blended"),
        _record("baseline-plateau", 1, 0.99, 0.99, "blended", share=0.25),  # another share: not a candidate
        {**_record("oracle-plateau-6000", 0, 0.50, 0.5), "protocol": "oracle"},
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    rows, oracles = selection.read_records([path])
    assert selection.choices(rows[(1, "diff")]) == {0: "blended", 1: "textured"}
    lines = selection.build_table((1, "diff"), rows[(1, "diff")], oracles[(1, "diff")])
    chosen = next(line for line in lines if line.startswith("| chosen"))
    cells = [c.strip() for c in chosen.strip("|").split("|")]
    # source-only: blended's 35 on seed 0, textured's 30 on seed 1; the round 47 and 41; gains paired by seed
    assert cells[1] == "32.5 +- 3.5 (2)" and cells[2] == "65 %"
    assert cells[4] == "44.0 +- 4.2 (2)" and cells[5] == "11.5 +- 0.7 (2)"
    selection.main([str(path)])
    assert "- seed 1: textured 33.0 (step 3000), blended 33.0 (step 3000) -> textured\n" in capsys.readouterr().out


def test_an_early_choice_reads_the_last_validation_in_that_fraction_and_says_whether_it_agrees(tmp_path, capsys):
    early = {"val_curve": [[750, 0.20], [1500, 0.30], [3000, 0.30]]}
    records = [
        {**_record("baseline-plateau", 0, 0.30, 0.0), **early},  # textured: 30 at step 1500 and at the end
        {**_record("baseline-plateau", 0, 0.35, 0.0, "blended"), "val_curve": [[1500, 0.25], [3000, 0.36]]},
    ]
    assert selection.validation_at(records[0], 0.5) == (1500, 0.30)
    assert selection.validation_at(records[0], 0.4) == (750, 0.20)
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    rows, _ = selection.read_records([path])
    assert selection.choices(rows[(1, "diff")], 0.5) == {0: "textured"}
    assert selection.choices(rows[(1, "diff")]) == {0: "blended"}
    selection.main([str(path), "--decide-at", "0.5"])
    out = capsys.readouterr().out
    choice = "textured 30.0 (step 1500), blended 25.0 (step 1500) -> textured"
    assert f"{choice} (the final validations choose blended)" in out

from pathlib import Path

import pytest

from labelpipe.data.base import SampleRef
from labelpipe.data.split_lists import SplitEntry, load_user_splits, parse_split_list, resolve_split_list
from labelpipe.errors import LabelpipeError

ROOT = Path("/data/cityscapes")


def cityscapes_sample(split: str, city: str, stem: str) -> SampleRef:
    return SampleRef(
        id=f"{city}/{stem}",
        image=ROOT / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
        mask=ROOT / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
    )


SAMPLES = [
    cityscapes_sample("train", "aachen", "aachen_000000_000019"),
    cityscapes_sample("train", "aachen", "aachen_000001_000019"),
    cityscapes_sample("train", "bochum", "bochum_000000_000313"),
    cityscapes_sample("val", "frankfurt", "frankfurt_000000_000294"),
]
SUFFIXES = ("_leftImg8bit",)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_parse_reads_ids_paths_and_pairs_skipping_comments(tmp_path):
    path = write(
        tmp_path / "list.txt",
        "# labeled images\n"
        "aachen_000000_000019\n"
        "\n"
        "aachen/aachen_000001_000019   # trailing comment\n"
        "JPEGImages/2007_000032.jpg SegmentationClassAug/2007_000032.png\n"
        "/JPEGImages/2007_000039.jpg /SegmentationClassAug/2007_000039.png\n"
        "leftImg8bit\\train\\aachen\\aachen_000000_000019_leftImg8bit.png\n",
    )
    entries = parse_split_list(path, tmp_path)
    assert entries == [
        SplitEntry(line=2, id="aachen_000000_000019", image=None),
        SplitEntry(line=4, id="aachen/aachen_000001_000019", image=None),
        SplitEntry(5, None, "JPEGImages/2007_000032.jpg", "SegmentationClassAug/2007_000032.png"),
        SplitEntry(6, None, "JPEGImages/2007_000039.jpg", "SegmentationClassAug/2007_000039.png"),
        SplitEntry(7, None, "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"),
    ]


def test_parse_makes_absolute_paths_under_root_relative(tmp_path):
    path = write(tmp_path / "list.txt", f"{tmp_path}/JPEGImages/a.jpg\n")
    assert parse_split_list(path, tmp_path)[0].image == "JPEGImages/a.jpg"


def test_parse_rejects_three_fields_naming_file_and_line(tmp_path):
    path = write(tmp_path / "list.txt", "a.png b.png\na.png b.png c.png\n")
    with pytest.raises(LabelpipeError, match=r"list\.txt: line 2 has 3 fields"):
        parse_split_list(path, tmp_path)


def test_parse_rejects_an_id_followed_by_a_mask(tmp_path):
    path = write(tmp_path / "list.txt", "2007_000032 SegmentationClass/2007_000032.png\n")
    with pytest.raises(LabelpipeError, match="line 1"):
        parse_split_list(path, tmp_path)


def test_parse_names_a_missing_list(tmp_path):
    with pytest.raises(LabelpipeError, match="nolist.txt: split list is missing"):
        parse_split_list(tmp_path / "nolist.txt", tmp_path)


def test_resolve_accepts_every_published_form_of_the_same_image(tmp_path):
    path = write(
        tmp_path / "labeled.txt",
        "aachen_000000_000019\n"  # bare stem (UniMatch style)
        "aachen/aachen_000001_000019\n"  # full id
        "leftImg8bit/train/bochum/bochum_000000_000313_leftImg8bit.png "
        "gtFine/train/bochum/bochum_000000_000313_gtFine_labelTrainIds.png\n"  # DARS / U2PL pair
        "/elsewhere/frankfurt_000000_000294_leftImg8bit.png\n",  # absolute path of another machine
    )
    resolved = resolve_split_list(path, ROOT, SAMPLES, suffixes=SUFFIXES)
    assert resolved == SAMPLES


def test_resolve_uses_the_adapters_mask_not_the_listed_train_ids_file(tmp_path):
    path = write(
        tmp_path / "l.txt",
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png "
        "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png\n",
    )
    (sample,) = resolve_split_list(path, ROOT, SAMPLES, suffixes=SUFFIXES)
    assert sample.mask.name == "aachen_000000_000019_gtFine_labelIds.png"


def test_resolve_keeps_list_order_and_drops_repeats(tmp_path):
    path = write(tmp_path / "l.txt", "bochum_000000_000313\naachen_000000_000019\nbochum_000000_000313\n")
    resolved = resolve_split_list(path, ROOT, SAMPLES, suffixes=SUFFIXES)
    assert [s.id for s in resolved] == ["bochum/bochum_000000_000313", "aachen/aachen_000000_000019"]


def test_resolve_names_the_file_the_first_bad_line_and_the_count(tmp_path):
    path = write(tmp_path / "l.txt", "aachen_000000_000019\nnope_1\nnope_2\n")
    with pytest.raises(LabelpipeError, match=r"l\.txt: line 2: 'nope_1' matches no image .*\(2 lines fail\)"):
        resolve_split_list(path, ROOT, SAMPLES, suffixes=SUFFIXES)


def test_resolve_reports_a_name_shared_by_two_images(tmp_path):
    twins = [
        SampleRef("a/x", ROOT / "a" / "x.png"),
        SampleRef("b/x", ROOT / "b" / "x.png"),
    ]
    path = write(tmp_path / "l.txt", "x\n")
    with pytest.raises(LabelpipeError, match="matches several images"):
        resolve_split_list(path, ROOT, twins)
    write(path, "b/x\n")
    assert resolve_split_list(path, ROOT, twins) == [twins[1]]


def test_resolve_drops_entries_of_skipped_samples(tmp_path):
    path = write(tmp_path / "l.txt", "aachen_000000_000019\nbochum_000000_000313\n")
    resolved = resolve_split_list(path, ROOT, SAMPLES, suffixes=SUFFIXES, skip_ids={"aachen/aachen_000000_000019"})
    assert [s.id for s in resolved] == ["bochum/bochum_000000_000313"]


def test_user_splits_give_a_semi_protocol_per_folder(tmp_path):
    root = tmp_path
    samples = [SampleRef(f"{i}", root / "images" / f"{i}.png") for i in range(5)]
    write(root / "splits" / "1_4" / "labeled.txt", "0\n")
    write(root / "splits" / "1_2" / "labeled.txt", "0\n1\n")
    write(root / "splits" / "1_2" / "unlabeled.txt", "4\n")
    write(root / "splits" / "1_2" / "val.txt", "3\n")
    write(root / "splits" / "holdout.txt", "2\n")
    builtin = {"train": samples[:4], "val": samples[4:]}
    splits, protocols = load_user_splits(root, samples, pool="train", val="val", builtin=builtin)
    assert [s.id for s in splits["1_4/unlabeled"]] == ["1", "2", "3"]  # train minus labeled
    assert [s.id for s in splits["1_2/unlabeled"]] == ["4"]
    assert [s.id for s in splits["holdout"]] == ["2"]
    assert protocols == {
        "semi-1_2": {
            "labeled": "1_2/labeled",
            "unlabeled": "1_2/unlabeled",
            "val": "1_2/val",
            "test": "1_2/val",
        },
        "semi-1_4": {"labeled": "1_4/labeled", "unlabeled": "1_4/unlabeled", "val": "val", "test": "val"},
    }
    assert builtin == {"train": samples[:4], "val": samples[4:]}


def test_user_splits_without_a_splits_folder_are_empty(tmp_path):
    assert load_user_splits(tmp_path, [], pool="train", val="val", builtin={}) == ({}, {})
